//! The bandwidth measurement (`--bandwidth`, issue 18) on the simulated driver, which models
//! NVLink 4 between GPUs (370 GB/s one way), 2000 GB/s within one, and the fault kinds `slow`
//! (a path through the host, 20 GB/s) and `fast-wrong` (timed, but nothing moves). Figures are
//! the model's, so the assertions do not depend on the host's speed or load.

use std::process::Command;

use p2pcheck::json::{parse, Value};
use p2pcheck::sim::Simulation;
use p2pcheck::{Check, Floor, Link, Options, Pair, Problem, TableExtras};

const WORKER: &str = env!("CARGO_BIN_EXE_p2pcheck-worker");
/// The smallest transfer accepted: the model's figures do not depend on it, the simulator's
/// real work does.
const BYTES: &str = "2097152";

fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    match v {
        Value::Object(members) => members
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no {key:?} in {v:?}")),
        other => panic!("{key:?} of {other:?}"),
    }
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.parse().unwrap(),
        other => panic!("not a number: {other:?}"),
    }
}

/// The pair `src->tgt`'s `bandwidth` object in the CLI's JSON.
fn pair_bandwidth(json: &Value, src: u32, tgt: u32) -> &Value {
    let Value::Array(pairs) = get(json, "pairs") else {
        panic!("pairs is not an array")
    };
    let p = pairs
        .iter()
        .find(|p| number(get(p, "src")) as u32 == src && number(get(p, "tgt")) as u32 == tgt)
        .unwrap();
    get(p, "bandwidth")
}

#[test]
fn a_slow_pair_is_slow_in_the_json_with_its_link_and_floor_and_fails_the_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_p2pcheck"))
        .args([
            "--json",
            "--simulate",
            "2",
            "--fault",
            "0->1:slow",
            "--bandwidth",
        ])
        .args(["--bandwidth-bytes", BYTES, "--timeout", "30"])
        .env("P2PCHECK_WORKER", WORKER)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let json = parse(&text).unwrap();
    // Every pair passed its tiers: only the bandwidth fails the run.
    assert_eq!(get(&json, "all_ok"), &Value::Bool(true));
    let slow = pair_bandwidth(&json, 0, 1);
    assert_eq!(get(slow, "slow"), &Value::Bool(true));
    assert_eq!(
        get(slow, "link").clone(),
        Value::String("simulated NVLink 4.0 x18".into())
    );
    assert_eq!(number(get(slow, "floor_gbps")), 270.0);
    assert_eq!(
        get(slow, "floor_from").clone(),
        Value::String("link".into())
    );
    let figures = get(slow, "figures");
    for name in ["ce_write", "ce_read", "sm_write", "sm_read"] {
        let g = number(get(get(figures, name), "gbps"));
        assert!((g - 20.0).abs() < 0.5, "{name}: {g}");
    }
    let both = number(get(get(figures, "ce_both"), "gbps"));
    assert!((both - 40.0).abs() < 1.0, "ce_both: {both}");
    assert!(number(get(get(figures, "ce_write"), "cv")) < 0.03);
    assert!(number(get(slow, "latency_ns")) > 0.0);
    assert_eq!(get(slow, "error"), &Value::Null);

    let healthy = pair_bandwidth(&json, 1, 0);
    assert_eq!(get(healthy, "slow"), &Value::Bool(false));
    let g = number(get(get(get(healthy, "figures"), "ce_read"), "gbps"));
    assert!((g - 370.0).abs() < 5.0, "1->0: {g}");
    // One GPU's own memory: a reference, with no floor.
    let own = pair_bandwidth(&json, 1, 1);
    assert_eq!(get(own, "link").clone(), Value::String("same GPU".into()));
    assert_eq!(get(own, "floor_gbps"), &Value::Null);
    let g = number(get(get(get(own, "figures"), "sm_write"), "gbps"));
    assert!((g - 2000.0).abs() < 20.0, "1->1: {g}");
}

#[test]
fn the_table_marks_the_slow_pair_and_a_fast_wrong_copy_is_a_failure_never_a_figure() {
    let opts = Options {
        worker: Some(WORKER.into()),
        simulate: Some(Simulation {
            gpus: 3,
            faults: vec![
                "0->1:slow".parse().unwrap(),
                "1->2:fast-wrong".parse().unwrap(),
            ],
        }),
        bandwidth: true,
        bandwidth_bytes: 2 << 20,
        step_timeout: std::time::Duration::from_secs(30),
        ..Options::default()
    };
    let pairs = [(0, 1), (1, 2), (2, 0)].map(|(src, tgt)| Pair { src, tgt });
    let mut report = p2pcheck::check(Some(&pairs), &opts).unwrap();
    assert!(report.pairs.iter().all(|p| p.ok()), "{:?}", report.pairs);
    assert_eq!(report.bandwidth.len(), 3);

    let slow = report.bandwidth_of(0, 1).unwrap();
    assert!(slow.slow && slow.failed());
    assert_eq!(
        (slow.link, slow.floor),
        (Link::Simulated, Floor::Link(270.0))
    );
    let wrong = report.bandwidth_of(1, 2).unwrap();
    assert!(!wrong.slow && wrong.failed());
    match &wrong.measured {
        Err(Problem::Mismatch {
            check: Check::BandwidthCopies,
            wrong,
            total,
            stale,
            ..
        }) => {
            // Nothing moved: the bytes are the destination's old pattern, all but the few
            // that the two patterns share by chance.
            assert_eq!(*total, 2 << 20);
            assert!(
                *wrong > *total * 9 / 10 && stale == wrong,
                "{wrong} {stale}"
            );
        }
        other => panic!("1->2: {other:?}"),
    }
    let healthy = report.bandwidth_of(2, 0).unwrap();
    assert!(!healthy.failed(), "{healthy:?}");
    let m = healthy.measured.as_ref().unwrap();
    assert!((m.judged_gbps() - 370.0).abs() < 5.0, "{m:?}");

    let table = report.table(&TableExtras {
        cuda_visible_devices: "<unset>",
        machine: "simulated",
    });
    assert!(table.contains("bandwidth ce_write, GB/s:\n"), "{table}");
    assert!(table.contains("latency, ns:\n"), "{table}");
    let row = |after: &str, src: &str| -> String {
        let at = table.find(after).unwrap();
        table[at..]
            .lines()
            .find(|l| l.split_whitespace().next() == Some(src))
            .unwrap()
            .to_string()
    };
    let cells = |line: String| {
        line.split("  ")
            .filter(|c| !c.trim().is_empty())
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>()
    };
    // Rows src, columns tgt: 0 -> 1 is slow, 1 -> 2 failed, 2 -> 0 a figure.
    assert_eq!(
        cells(row("bandwidth ce_write", "0")),
        ["0", "-", "20.0 slow", "-"]
    );
    assert_eq!(
        cells(row("bandwidth ce_write", "1")),
        ["1", "-", "-", "FAIL"]
    );
    assert_eq!(
        cells(row("bandwidth ce_read", "2")),
        ["2", "370.1", "-", "-"]
    );
    assert!(
        table.contains(
            "0->1: slow: 20.0 GB/s one way by the copy engine, below the floor of 270.0 GB/s"
        ),
        "{table}"
    );
    assert!(
        table.contains("1->2: bandwidth not measured: the bandwidth measurement's copied bytes"),
        "{table}"
    );

    // The caller's floor wins over the link's: at 400 GB/s the healthy pair is slow too.
    report.judge_bandwidth(|_| Link::Simulated, Some(400.0));
    let judged = report.bandwidth_of(2, 0).unwrap();
    assert_eq!((judged.floor, judged.slow), (Floor::Given(400.0), true));
    // Where the link is unknown and no floor is given there is no verdict, and a note says so.
    report.judge_bandwidth(|_| Link::Unknown, None);
    assert!(report
        .bandwidth
        .iter()
        .all(|b| !b.slow && b.floor == Floor::None));
    assert!(report
        .bandwidth_table()
        .contains("no floor for 0->1, 2->0: the link is unknown"));
}

#[test]
fn the_vllm_engine_and_bad_sizes_are_refused_before_any_worker() {
    for args in [
        &["--engine", "vllm"][..],
        &["--bandwidth-bytes", "1000"],
        &["--min-gbps", "-3"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_p2pcheck"))
            .args(["--simulate", "2", "--bandwidth"])
            .args(args)
            .env("P2PCHECK_WORKER", WORKER)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("parallel engine only")
                || err.contains("multiple of 2 MiB")
                || err.contains("must be a positive number"),
            "{args:?}: {err}"
        );
    }
}

//! End to end on the simulated driver (no GPU): the CLI and the library on 1, 2, 4 and 8 GPUs,
//! every fault kind alone and mixed, with the expected verdict for every pair, `@once` faults in
//! the first attempt of each check only; bounded memory on 64 GPUs; hangs end at their
//! deadlines (bounded, with a large margin: never a measure of speed); after every run no
//! worker process and no shared-memory segment is left; concurrent runs do not interfere;
//! SIGTERM/SIGINT of the parent kills its workers.

use std::collections::HashMap;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use p2pcheck::json::{self, Value};

mod common;
use common::{output_within, worker_children, TempDir};

/// How long one run may take before the test fails: far beyond what any run here needs, even on
/// a loaded 2-core machine; it only proves that nothing waits for ever. Time bounds in these
/// tests prove that a wait ended at its deadline, with a large margin, never speed
/// (`scripts/bench.py` measures that).
const LIMIT: Duration = Duration::from_secs(300);

/// The margin a bound on a run's wall time allows beyond the deadlines the run may meet:
/// start-ups and teardowns of every worker on a machine busy with other work.
const MARGIN: Duration = Duration::from_secs(60);

const WORKER: &str = env!("CARGO_BIN_EXE_p2pcheck-worker");

/// A token no other run shares, put in the environment of one CLI run (and so of its workers).
fn token() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Pids of live processes whose environment holds `P2PCHECK_TEST_TOKEN=token`.
fn processes_with(token: &str) -> Vec<u32> {
    let needle = format!("P2PCHECK_TEST_TOKEN={token}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            env.split(|&b| b == 0)
                .any(|v| v == needle.as_bytes())
                .then_some(pid)
        })
        .collect()
}

fn shm_entries() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("p2pcheck"))
                .collect()
        })
        .unwrap_or_default()
}

fn command(args: &[&str], env: &[(&str, &str)], token: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pcheck"));
    cmd.args(args);
    // A simulated run that names no step timeout expects no hang: give it one that no healthy
    // step of a loaded machine reaches (it costs nothing when nothing hangs).
    if args.contains(&"--simulate") && !args.contains(&"--timeout") {
        cmd.args(["--timeout", HEALTHY_STEP]);
    }
    cmd.env("P2PCHECK_WORKER", WORKER)
        .env("P2PCHECK_TEST_TOKEN", token)
        .env_remove("CUDA_VISIBLE_DEVICES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// One CLI run; asserts that it left no process and no shared-memory segment behind.
fn cli(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let token = token();
    let started = Instant::now();
    let out = output_within(&mut command(args, env, &token), LIMIT);
    let took = started.elapsed();
    assert!(
        processes_with(&token).is_empty(),
        "workers left behind by {args:?}"
    );
    assert!(
        shm_entries().is_empty(),
        "shared memory left: {:?}",
        shm_entries()
    );
    (out, took)
}

/// The step timeout of the runs that meet a hang: long enough that no healthy step of a
/// loaded 2-core machine (the CI runs the suite beside busy loops and a second copy of these
/// tests) reaches it, so that only the `hang` fault times out; each hang costs it twice.
const STEP: &str = "3";

/// The step timeout of simulated runs that expect no hang (see [`command`]).
const HEALTHY_STEP: &str = "30";

/// [`STEP`] as a duration.
fn step() -> Duration {
    Duration::from_secs(STEP.parse().expect("STEP is whole seconds"))
}

/// A finished run's JSON: exit code, device count, and each pair's fields by "src->tgt" (legacy
/// IPC's) or "src->tgt@cumem" (the cuMem transport's).
struct Run {
    code: i32,
    devices: usize,
    restarts: usize,
    pairs: HashMap<String, HashMap<String, Value>>,
    top: HashMap<String, Value>,
    stderr: String,
}

/// The engine configurations every behaviour is checked in: the default (parallel engine, each
/// worker seeing its own GPU), the parallel engine with every worker seeing every GPU, and
/// vLLM's procedure.
const CONFIGS: [(&str, &[&str]); 3] = [
    ("parallel/one", &[]),
    ("parallel/all", &["--visibility", "all"]),
    ("vllm", &["--engine", "vllm"]),
];

/// Whether a configuration's consumers can ask the driver's claim for a pair of two GPUs
/// (they must see both).
fn claims_asked(config: &str) -> bool {
    config != "parallel/one"
}

impl Run {
    fn field(&self, pair: &str, key: &str) -> &Value {
        &self.pairs[pair][key]
    }
    fn verdict(&self, pair: &str) -> String {
        match self.field(pair, "verdict") {
            Value::String(s) => s.clone(),
            other => panic!("{pair}: verdict {other:?}"),
        }
    }
    fn reason(&self, pair: &str) -> String {
        match self.field(pair, "reason") {
            Value::String(s) => s.clone(),
            other => panic!("{pair}: reason {other:?}"),
        }
    }
    /// Every pair except `except` is ok.
    fn others_ok(&self, except: &[&str]) {
        for (pair, _) in self
            .pairs
            .iter()
            .filter(|(p, _)| !except.contains(&p.as_str()))
        {
            assert_eq!(self.verdict(pair), "ok", "{pair}: {}", self.reason(pair));
        }
    }
}

fn number(v: &Value) -> usize {
    match v {
        Value::Number(n) => n.parse().unwrap(),
        other => panic!("not a number: {other:?}"),
    }
}

fn object(v: Value) -> HashMap<String, Value> {
    match v {
        Value::Object(fields) => fields.into_iter().collect(),
        other => panic!("not an object: {other:?}"),
    }
}

fn simulate(gpus: u32, faults: &[&str], extra: &[&str], env: &[(&str, &str)]) -> (Run, Duration) {
    let gpus = gpus.to_string();
    let mut args = vec!["--json", "--simulate", gpus.as_str()];
    for f in faults {
        args.extend(["--fault", f]);
    }
    args.extend(extra);
    let (out, took) = cli(&args, env);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let top = object(
        json::parse(stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\nstderr: {stderr}")),
    );
    let Value::Array(pairs) = &top["pairs"] else {
        panic!("no pairs: {stdout}")
    };
    let pairs = pairs
        .iter()
        .map(|p| {
            let p = object(p.clone());
            let over = match &p["transport"] {
                Value::String(t) if t == "ipc" => String::new(),
                Value::String(t) => format!("@{t}"),
                other => panic!("transport {other:?}"),
            };
            let key = format!("{}->{}{over}", number(&p["src"]), number(&p["tgt"]));
            (key, p)
        })
        .collect();
    let run = Run {
        code: out.status.code().expect("exited"),
        devices: number(&top["device_count"]),
        restarts: number(&top["restarts"]),
        pairs,
        stderr,
        top,
    };
    (run, took)
}

#[test]
fn clean_machines_of_1_2_4_and_8_gpus_pass_every_pair() {
    for (config, flags) in CONFIGS {
        for n in [1, 2, 4, 8] {
            let (run, _) = simulate(n, &[], flags, &[]);
            assert_eq!(run.code, 0, "{config} {n} GPUs: {}", run.stderr);
            assert_eq!(run.devices, n as usize);
            assert_eq!(run.pairs.len(), (n * n) as usize);
            run.others_ok(&[]);
            for (pair, fields) in &run.pairs {
                assert_eq!(fields["kernel"], Value::String("ok".into()), "{pair}");
                let same_gpu = fields["src"] == fields["tgt"];
                let claim = if same_gpu || claims_asked(config) {
                    Value::Bool(true)
                } else {
                    Value::Null
                };
                assert_eq!(fields["driver_claim"], claim, "{config} {pair}");
                assert_eq!(fields["copy_ok"], Value::Bool(true), "{pair}");
                assert_eq!(fields["attempts"], Value::Number("1".into()), "{pair}");
            }
        }
    }
}

/// 64 GPUs, the most the simulator has, in bounded memory: every worker maps every other's
/// buffer of 64 slots (6 MiB each: 24 GiB in all), but memory holding a fill or a pattern
/// takes none (csrc/sim.c, MEMORY), so workers stay small whatever the count. Before, each
/// worker's memory grew with the GPU count (65 MiB at 8, 129 MiB at 16).
#[test]
fn sixty_four_gpus_run_in_bounded_memory() {
    let (run, _) = simulate(64, &[], &[], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.pairs.len(), 64 * 64);
    run.others_ok(&[]);
    let Value::Array(workers) = &run.top["workers"] else {
        panic!("no workers")
    };
    let peaks: Vec<usize> = workers
        .iter()
        .map(|w| number(&object(w.clone())["peak_rss_kb"]))
        .collect();
    assert_eq!(peaks.len(), 128);
    // Resident memory counts each shared page once per process mapping it: an upper bound.
    let (max, sum) = (*peaks.iter().max().unwrap(), peaks.iter().sum::<usize>());
    assert!(max < 64 << 10, "a worker peaked at {max} KiB");
    assert!(sum < 1536 << 10, "the workers peaked at {sum} KiB together");
}

/// The numbers behind "cost flat in the number of GPUs", counted on 8 simulated GPUs: the
/// parallel engine resets no device (vLLM's procedure: two per pair), starts at most two
/// workers per GPU, each seeing only its own GPU, and has at least one pair per GPU in flight
/// at once; both engines give the same verdicts.
#[test]
fn at_8_gpus_the_parallel_engine_starts_16_workers_that_see_one_gpu_and_never_reset() {
    // Calls made by p2pcheck itself (not the driver calls a shim kernel launch made).
    let count = |trace: &str, call: &str| {
        trace_lines(trace)
            .iter()
            .filter(|l| l["call"] == Value::String(call.into()) && !l.contains_key("via"))
            .count()
    };
    let (out, _) = cli(&["--json", "--simulate", "8"], &[("P2PCHECK_TRACE", "1")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    let top = object(json::parse(String::from_utf8_lossy(&out.stdout).trim()).unwrap());
    assert_eq!(count(&trace, "cudaDeviceReset"), 0);
    assert_eq!(number(&top["workers_started"]), 16);
    assert_eq!(count(&trace, "cuInit"), 16, "one CUDA start-up per worker");
    assert_eq!(count(&trace, "cudaSetDevice"), 16, "one context per worker");
    let Value::Array(workers) = &top["workers"] else {
        panic!("no workers")
    };
    for w in workers {
        assert_eq!(object(w.clone())["saw"], Value::Number("1".into()), "{w:?}");
    }
    assert!(
        number(&top["peak_in_flight"]) >= 8,
        "{:?}",
        top["peak_in_flight"]
    );
    // Every mapping and allocation is given back (Drop), none left to a reset.
    assert_eq!(count(&trace, "cudaIpcCloseMemHandle"), 64);
    assert_eq!(count(&trace, "cudaFree"), 8);
    let (out, _) = cli(
        &["--json", "--simulate", "8", "--engine", "vllm"],
        &[("P2PCHECK_TRACE", "1")],
    );
    assert_eq!(out.status.code(), Some(0));
    let trace = String::from_utf8_lossy(&out.stderr);
    assert_eq!(count(&trace, "cudaDeviceReset"), 128);
}

#[test]
fn both_engines_give_the_same_verdicts_for_every_fault_kind() {
    let faults: Vec<String> = p2pcheck::sim::FaultKind::ALL
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{}->{}:{}", i % 4, (i + 1) % 4, k.name()))
        .collect();
    for fault in &faults {
        let verdicts: Vec<Vec<(String, String)>> = CONFIGS
            .iter()
            .map(|(_, flags)| {
                let (run, _) = simulate(
                    4,
                    &[fault.as_str()],
                    &[&["--timeout", STEP], *flags].concat(),
                    &[],
                );
                let mut v: Vec<(String, String)> = run
                    .pairs
                    .keys()
                    .map(|p| (p.clone(), run.verdict(p)))
                    .collect();
                v.sort();
                v
            })
            .collect();
        assert_eq!(verdicts[0], verdicts[1], "{fault}");
        assert_eq!(verdicts[0], verdicts[2], "{fault}");
    }
}

#[test]
fn each_fault_kind_alone_gives_its_verdict_on_its_pair_only() {
    // (fault on 1->2, expected verdict of 1->2, text its reason must hold, copy_ok)
    let cases: [(&str, &str, &str, Option<bool>); 11] = [
        (
            "ipc-open-fails",
            "fails",
            "cudaErrorMapBufferObjectFailed",
            Some(false),
        ),
        (
            "drop-writes",
            "fails",
            "1024 of 1024 bytes wrong",
            Some(false),
        ),
        ("corrupt", "fails", "16 of 1024 bytes wrong", Some(false)),
        ("sm-only", "fails", "kernel tier", Some(true)),
        ("late-visibility", "fails", "handshake tier", Some(true)),
        ("hang", "hang", "no answer within 3.0 s", None),
        ("crash", "error", "SIGSEGV", None),
        ("one-way", "fails", "1024 of 1024 bytes wrong", Some(false)),
        ("claim-no", "ok", "", Some(true)),
        ("partial", "fails", "[partial:", Some(true)),
        ("shifted", "fails", "[wrong-data:", Some(true)),
    ];
    for ((kind, verdict, reason, copy_ok), (config, flags)) in cases
        .into_iter()
        .flat_map(|case| CONFIGS.into_iter().map(move |config| (case, config)))
    {
        let fault = format!("1->2:{kind}");
        let (run, took) = simulate(4, &[&fault], &[&["--timeout", STEP], flags].concat(), &[]);
        assert_eq!(run.devices, 4);
        assert_eq!(
            run.verdict("1->2"),
            verdict,
            "{kind}: {}",
            run.reason("1->2")
        );
        assert!(
            run.reason("1->2").contains(reason),
            "{kind}: {}",
            run.reason("1->2")
        );
        let expected_copy = copy_ok.map_or(Value::Null, Value::Bool);
        assert_eq!(run.field("1->2", "copy_ok"), &expected_copy, "{kind}");
        run.others_ok(&["1->2"]);
        assert_eq!(run.code, if verdict == "ok" { 0 } else { 1 }, "{kind}");
        let claim = run.field("1->2", "driver_claim");
        match kind {
            _ if !claims_asked(config) => assert_eq!(claim, &Value::Null, "{config}"),
            "claim-no" => assert_eq!(claim, &Value::Bool(false)),
            "hang" | "crash" => assert_eq!(claim, &Value::Null),
            _ => assert_eq!(claim, &Value::Bool(true), "{kind}"),
        }
        // Whatever did not pass is attempted again on fresh workers, after the pairs the
        // failure interrupted; only the same failure twice may be persisted.
        let (attempts, evidence, persistable) = match verdict {
            "ok" => ("1", "passed", true),
            "fails" => ("2", "confirmed", true),
            "hang" => ("2", "hang", false),
            _ => ("2", "error", false),
        };
        let what = format!("{config} {kind}");
        assert_eq!(
            run.field("1->2", "attempts"),
            &Value::Number(attempts.into()),
            "{what}"
        );
        assert_eq!(
            run.field("1->2", "evidence"),
            &Value::String(evidence.into()),
            "{what}"
        );
        assert_eq!(
            run.field("1->2", "persistable"),
            &Value::Bool(persistable),
            "{what}"
        );
        if verdict != "ok" {
            assert_eq!(run.restarts, 1, "{what}: fresh workers took over");
        }
        if kind == "hang" {
            // Two attempts of a step timeout each, and start-ups: bounded, not waiting on the
            // hang.
            let bound = 2 * step() + MARGIN;
            assert!(took < bound, "{config}: {took:?}");
        }
    }
}

#[test]
fn all_faults_mixed_on_8_gpus() {
    let faults = [
        "0->1:ipc-open-fails",
        "1->2:drop-writes",
        "2->3:corrupt",
        "3->4:sm-only",
        "4->5:late-visibility",
        "1->0:partial",
        "3->2:shifted",
        "5->6:hang",
        "6->7:crash",
        "7->0:one-way",
        "0->7:claim-no",
        "2->2:hang",
    ];
    for (config, flags) in CONFIGS {
        let (run, took) = simulate(8, &faults, &[&["--timeout", STEP], flags].concat(), &[]);
        assert_eq!(run.code, 1);
        assert_eq!(run.pairs.len(), 64);
        let expect = [
            ("0->1", "fails"),
            ("1->2", "fails"),
            ("2->3", "fails"),
            ("3->4", "fails"),
            ("5->6", "hang"),
            ("6->7", "error"),
            ("7->0", "fails"),
            ("2->2", "hang"),
            ("4->5", "fails"),
            ("1->0", "fails"),
            ("3->2", "fails"),
        ];
        for (pair, verdict) in expect {
            assert_eq!(run.verdict(pair), verdict, "{pair}: {}", run.reason(pair));
        }
        // one-way: the way back works; claim-no cannot be told from ok.
        let broken: Vec<&str> = expect.iter().map(|(p, _)| *p).collect();
        run.others_ok(&broken);
        if claims_asked(config) {
            assert_eq!(run.field("0->7", "driver_claim"), &Value::Bool(false));
        }
        // The parallel engine meets its hangs at once, and their retries at once; vLLM's
        // meets them one after another (two hangs, each twice). Handshakes that cannot
        // complete end at once in both (the simulator knows their flags cannot arrive).
        // Bounds with room for a loaded CI machine: what matters is that nothing waits
        // without a deadline (at most 8 step timeouts in a row, in vLLM's engine).
        let bound = 8 * step() + MARGIN;
        assert!(took < bound, "{config}: {took:?}");
        assert!(run.restarts >= 1, "{config}");
    }
}

/// Each tier catches exactly the faults it should, with the diagnosis that fits, in both
/// engines: the copy tier (vLLM's test) misses the faults of SM accesses and of resident
/// kernels; the kernel tier adds them but not late visibility; the handshake tier catches it.
#[test]
fn each_tier_catches_exactly_its_faults_with_the_right_diagnosis() {
    // (fault on 0->1, then (failed tier, class) at level copy, kernel, handshake; None: ok)
    type Expect = Option<(&'static str, &'static str)>;
    let table: [(&str, [Expect; 3]); 9] = [
        ("ipc-open-fails", [Some(("copy", "open-failed")); 3]),
        ("drop-writes", [Some(("copy", "never-written")); 3]),
        ("one-way", [Some(("copy", "never-written")); 3]),
        ("corrupt", [Some(("copy", "wrong-data")); 3]),
        (
            "sm-only",
            [
                None,
                Some(("kernel", "wrong-data")),
                Some(("kernel", "wrong-data")),
            ],
        ),
        (
            "partial",
            [
                None,
                Some(("kernel", "partial")),
                Some(("kernel", "partial")),
            ],
        ),
        (
            "shifted",
            [
                None,
                Some(("kernel", "wrong-data")),
                Some(("kernel", "wrong-data")),
            ],
        ),
        (
            "late-visibility",
            [None, None, Some(("handshake", "timeout"))],
        ),
        ("claim-no", [None, None, None]),
    ];
    for (fault, expect) in table {
        for (level, expected) in ["copy", "kernel", "handshake"].into_iter().zip(expect) {
            for engine in ["parallel", "vllm"] {
                let spec = format!("0->1:{fault}");
                let (run, _) = simulate(
                    2,
                    &[&spec],
                    &["--level", level, "--engine", engine, "--timeout", STEP],
                    &[],
                );
                let what = format!("{fault} at level {level}, {engine}");
                let pair = &run.pairs["0->1"];
                match expected {
                    None => assert_eq!(run.verdict("0->1"), "ok", "{what}: {}", run.reason("0->1")),
                    Some((tier, class)) => {
                        assert_eq!(run.verdict("0->1"), "fails", "{what}");
                        assert_eq!(pair["failed_tier"], Value::String(tier.into()), "{what}");
                        let diagnosis = object(pair["diagnosis"].clone());
                        assert_eq!(diagnosis["class"], Value::String(class.into()), "{what}");
                    }
                }
                run.others_ok(&["0->1"]);
            }
        }
    }
}

#[test]
fn vllms_copy_test_alone_cannot_see_sm_only_faults() {
    let (run, _) = simulate(2, &["0->1:sm-only"], &["--no-kernel-check"], &[]);
    assert_eq!(run.code, 0);
    run.others_ok(&[]);
    assert_eq!(
        run.field("0->1", "kernel"),
        &Value::String("not-run".into())
    );
}

#[test]
fn cuda_visible_devices_reordered_sparse_and_by_uuid() {
    // Physical 2 is local 0, physical 0 is local 1: the fault 2->0 shows at local 0->1.
    let (run, _) = simulate(
        4,
        &["2->0:drop-writes"],
        &[],
        &[("CUDA_VISIBLE_DEVICES", "2,0")],
    );
    assert_eq!(run.devices, 2);
    assert_eq!(run.verdict("0->1"), "fails");
    run.others_ok(&["0->1"]);
    let (run, _) = simulate(
        4,
        &["3->1:corrupt"],
        &[],
        &[("CUDA_VISIBLE_DEVICES", "1,3")],
    );
    assert_eq!(run.verdict("1->0"), "fails");
    run.others_ok(&["1->0"]);
    let uuid = "GPU-51a00000-0000-0000-0000-000000000003";
    let (run, _) = simulate(4, &[], &[], &[("CUDA_VISIBLE_DEVICES", uuid)]);
    assert_eq!((run.code, run.devices), (0, 1));
    // An invalid entry ends the list, as in CUDA, with a warning.
    let (run, _) = simulate(4, &[], &[], &[("CUDA_VISIBLE_DEVICES", "1,x,2")]);
    assert_eq!(run.devices, 1);
    let warnings = format!("{:?}", run.top["warnings"]);
    assert!(warnings.contains("ignores \\\"x,2\\\""), "{warnings}");
}

#[test]
fn empty_cuda_visible_devices_and_bad_simulations_exit_2() {
    for (args, env, needle) in [
        (
            &["--simulate", "2"][..],
            &[("CUDA_VISIBLE_DEVICES", "")][..],
            "set but empty",
        ),
        (
            &["--simulate", "2"][..],
            &[("CUDA_VISIBLE_DEVICES", "zz")][..],
            "CUDA stops at the first invalid entry, here the first (\"zz\")",
        ),
        (
            &["--simulate", "2"][..],
            &[("CUDA_VISIBLE_DEVICES", "-1")][..],
            "here the first (\"-1\")",
        ),
        (
            &["--simulate", "2", "--fault", "0->5:hang"][..],
            &[][..],
            "GPUs 0..2",
        ),
        (&["--fault", "0->1:hang"][..], &[][..], "needs --simulate"),
        (&["--simulate", "0"][..], &[][..], "CUDA_ERROR_NO_DEVICE"),
    ] {
        let (out, _) = cli(args, env);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn the_vllm_cache_is_written_only_into_an_explicit_folder_when_simulating() {
    let tmp = TempDir::new("p2pcheck-sim-cache");
    let dir = tmp.path().join("cache");
    let dir_s = dir.display().to_string();
    let (out, _) = cli(
        &[
            "--simulate",
            "2",
            "--fault",
            "1->0:drop-writes",
            "--write-vllm-cache",
            "--cache-dir",
            &dir_s,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = std::fs::read_to_string(dir.join("gpu_p2p_access_cache_for_0,1.json")).unwrap();
    assert_eq!(
        text,
        "{\n    \"0->0\": true,\n    \"0->1\": true,\n    \"1->0\": false,\n    \"1->1\": true\n}"
    );
    let (out, _) = cli(&["--simulate", "2"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("not consulted"));
}

#[test]
fn concurrent_runs_do_not_interfere() {
    let runs: Vec<(u32, Vec<&str>, &str)> = vec![
        (4, vec!["0->1:drop-writes"], "0->1"),
        (4, vec!["3->2:corrupt"], "3->2"),
        (2, vec!["1->1:ipc-open-fails"], "1->1"),
        (8, vec!["5->4:sm-only"], "5->4"),
    ];
    let handles: Vec<_> = runs
        .into_iter()
        .map(|(n, faults, bad)| {
            std::thread::spawn(move || {
                let (run, _) = simulate(n, &faults, &[], &[]);
                assert_eq!(run.verdict(bad), "fails", "{bad}: {}", run.reason(bad));
                run.others_ok(&[bad]);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a concurrent run failed");
    }
}

fn spawn_hanging(token: &str) -> Child {
    command(
        &["--simulate", "2", "--fault", "0->0:hang", "--timeout", "60"],
        &[],
        token,
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap()
}

#[test]
fn sigterm_or_sigint_of_the_parent_kills_its_workers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let token = token();
        let mut child = spawn_hanging(&token);
        // Wait until both workers run (the parent is one of the token's processes too).
        let started = Instant::now();
        while processes_with(&token).len() < 3 {
            assert!(started.elapsed() < MARGIN, "workers never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200)); // into the hanging pair
                                                        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
        let started = Instant::now();
        let status = loop {
            match child.try_wait().unwrap() {
                Some(status) => break status,
                None if started.elapsed() > MARGIN => {
                    let _ = child.kill();
                    panic!("the parent did not end within {MARGIN:?} of signal {signal}");
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        assert!(!status.success());
        let deadline = Instant::now() + MARGIN;
        while !processes_with(&token).is_empty() {
            assert!(Instant::now() < deadline, "workers outlived the parent");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn once_faults_hit_only_the_first_attempt_of_each_check() {
    // A hang and a crash that fire once: the first attempt at each pair hangs or dies, the
    // retry's fresh workers do not see them and pass. A hang or an error is never a fact, so
    // the pair is reported as such (answered false), with both attempts in its details and
    // nothing persistable. Each check has a ledger of its own: a second check fires them again.
    for (config, flags) in CONFIGS {
        for check in 0..2 {
            let (run, _) = simulate(
                4,
                &["0->1:hang@once", "2->3:crash@once"],
                &[&["--timeout", STEP], flags].concat(),
                &[],
            );
            assert_eq!(run.code, 1, "{config} check {check}: {}", run.stderr);
            run.others_ok(&["0->1", "2->3"]);
            for (pair, word, first) in [
                ("0->1", "hang", "no answer within"),
                ("2->3", "error", "SIGSEGV"),
            ] {
                assert_eq!(run.verdict(pair), word, "{config} check {check} {pair}");
                assert_eq!(run.field(pair, "evidence"), &Value::String(word.into()));
                assert_eq!(run.field(pair, "persistable"), &Value::Bool(false));
                assert_eq!(run.field(pair, "attempts"), &Value::Number("2".into()));
                let Value::Array(details) = run.field(pair, "details") else {
                    panic!("{pair}: no details")
                };
                for want in [first, "second attempt, on fresh workers: ok"] {
                    assert!(
                        details
                            .iter()
                            .any(|d| matches!(d, Value::String(s) if s.contains(want))),
                        "{config} check {check} {pair}: no {want:?} in {details:?}"
                    );
                }
            }
        }
    }
}

/// Issue 15's rule, end to end: a failure that does not repeat on fresh workers is reported
/// (answered false) but never written to vLLM's cache, by the CLI or by `access_check`; the
/// same failure twice is a fact and is written.
#[test]
fn a_failure_that_does_not_repeat_is_reported_but_never_written_to_vllms_cache() {
    for (config, flags) in CONFIGS {
        let tmp = TempDir::new("p2pcheck-once-cache");
        let dir = tmp.path().display().to_string();
        let cache = tmp.path().join("gpu_p2p_access_cache_for_0,1.json");
        let write = [&["--write-vllm-cache", "--cache-dir", dir.as_str()], flags].concat();
        let (run, _) = simulate(2, &["0->1:drop-writes@once"], &write, &[]);
        assert_eq!(run.code, 1, "{config}: {}", run.stderr);
        assert_eq!(run.verdict("0->1"), "fails", "{config}");
        assert_eq!(
            run.field("0->1", "evidence"),
            &Value::String("not-repeated".into())
        );
        assert_eq!(run.field("0->1", "persistable"), &Value::Bool(false));
        let Value::Object(note) = &run.top["vllm_cache"] else {
            panic!("{config}: no vllm_cache")
        };
        assert!(
            note.iter()
                .any(|(k, v)| k == "written" && *v == Value::Bool(false)),
            "{config}: {note:?}"
        );
        assert!(!cache.exists(), "{config}: {} was written", cache.display());

        // The same fault on every attempt: confirmed, and written as false.
        let (run, _) = simulate(2, &["0->1:drop-writes"], &write, &[]);
        assert_eq!(run.code, 1, "{config}: {}", run.stderr);
        assert_eq!(
            run.field("0->1", "evidence"),
            &Value::String("confirmed".into())
        );
        let text = std::fs::read_to_string(&cache).expect("the confirmed verdicts are written");
        assert!(text.contains("\"0->1\": false"), "{config}: {text}");
    }

    // The library's gpu_p2p_access_check: false, nothing written.
    let tmp = TempDir::new("p2pcheck-once-access");
    let opts = p2pcheck::AccessOptions {
        check: p2pcheck::Options {
            worker: Some(WORKER.into()),
            simulate: Some(p2pcheck::sim::Simulation {
                gpus: 2,
                faults: vec!["0->1:drop-writes@once".parse().unwrap()],
            }),
            ..p2pcheck::Options::default()
        },
        cache_dir: Some(tmp.path().to_path_buf()),
        ..p2pcheck::AccessOptions::default()
    };
    let access = p2pcheck::access_check(0, 1, &opts).unwrap();
    assert!(!access.answer);
    assert!(
        matches!(access.origin, p2pcheck::Origin::NotPersisted { .. }),
        "{:?}",
        access.origin
    );
    assert!(
        !access.path.exists(),
        "{} was written",
        access.path.display()
    );
}

#[test]
fn the_library_runs_on_the_simulator_in_batch_order() {
    let opts = p2pcheck::Options {
        worker: Some(WORKER.into()),
        simulate: Some(p2pcheck::sim::Simulation {
            gpus: 3,
            faults: vec!["2->0:drop-writes".parse().unwrap()],
        }),
        ..p2pcheck::Options::default()
    };
    let src = [2, 0, 1, 2, 2];
    let tgt = [0, 2, 1, 2, 0];
    let pairs: Vec<p2pcheck::Pair> = src
        .iter()
        .zip(&tgt)
        .map(|(&src, &tgt)| p2pcheck::Pair { src, tgt })
        .collect();
    let pending = p2pcheck::start(Some(pairs), opts.clone());
    let report = pending.wait().unwrap();
    // The answer comes before the workers have exited; finish() waits for them.
    assert!(pending.finish().is_empty(), "every worker exited cleanly");
    let verdicts: Vec<bool> = report.pairs.iter().map(|p| p.ok()).collect();
    assert_eq!(verdicts, [false, true, true, true, false]);
    assert!(matches!(
        report.pairs[0].verdict(),
        p2pcheck::Verdict::Fails(why) if why.contains("bytes wrong")
    ));
    let err = p2pcheck::can_actually_p2p_with(&[3], &[0], &opts).unwrap_err();
    assert!(format!("{err:#}").contains("cannot see"), "{err:#}");
    // Its workers were this test process's own children: all reaped, none left.
    assert!(worker_children().is_empty(), "{:?}", worker_children());
}

/// `access-check` ends its run's escaped descendants only once its check has reaped its own
/// workers: none of them is ever reported (or signalled) as left behind.
#[test]
fn access_check_never_mistakes_its_own_workers_for_leftovers() {
    let tmp = TempDir::new("p2pcheck-leftovers");
    let dir = tmp.path().display().to_string();
    for _ in 0..8 {
        let (out, _) = cli(
            &[
                "access-check",
                "0",
                "1",
                "--simulate",
                "2",
                "--cache-dir",
                &dir,
                "--refresh",
            ],
            &[],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "true\n");
        assert!(!err.contains("left behind"), "{err}");
    }
}

/// The state letter of process `pid` (`R`, `S`, `Z`, ...), from `/proc/PID/stat`.
fn state(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit(')').next()?;
    rest.split_whitespace().next().map(str::to_string)
}

/// The library touches only processes it started: two children of this test process that
/// p2pcheck did not start (one running, one exited and not yet reaped) are exactly as they
/// were after checks with a hang and a crash in both engines, their workers all reaped.
#[test]
fn checks_leave_the_hosts_own_children_alone() {
    let mut running = Command::new("sleep").arg("60").spawn().unwrap();
    let mut exited = Command::new("true").spawn().unwrap();
    let started = Instant::now();
    while state(exited.id()).as_deref() != Some("Z") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "`true` never exited"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for engine in [p2pcheck::Engine::Parallel, p2pcheck::Engine::Vllm] {
        let opts = p2pcheck::Options {
            engine,
            worker: Some(WORKER.into()),
            step_timeout: Duration::from_secs(1),
            simulate: Some(p2pcheck::sim::Simulation {
                gpus: 3,
                faults: vec!["0->1:hang".parse().unwrap(), "1->2:crash".parse().unwrap()],
            }),
            ..p2pcheck::Options::default()
        };
        let pending = p2pcheck::start(None, opts);
        let report = pending.wait().unwrap();
        assert_eq!(report.get(0, 1).unwrap().verdict().word(), "hang");
        assert_eq!(report.get(1, 2).unwrap().verdict().word(), "error");
        pending.finish();
    }
    assert!(matches!(state(running.id()).as_deref(), Some("S" | "R")));
    assert!(running.try_wait().unwrap().is_none(), "it still runs");
    assert_eq!(
        state(exited.id()).as_deref(),
        Some("Z"),
        "it is still not reaped"
    );
    assert!(
        exited.try_wait().unwrap().is_some_and(|s| s.success()),
        "reaped here, not by the check"
    );
    running.kill().unwrap();
    running.wait().unwrap();
}

#[test]
fn the_simulator_library_can_be_written_out() {
    let tmp = TempDir::new("p2pcheck-sim-lib");
    let path = tmp.path().join("libsim.so");
    let (out, _) = cli(&["--write-sim-lib", &path.display().to_string()], &[]);
    assert_eq!(out.status.code(), Some(0));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    // It is a libcuda: the CLI runs on it through the plain override variables.
    let lib = path.display().to_string();
    let (out, _) = cli(
        &["--json"],
        &[
            ("P2PCHECK_LIBCUDA", &lib),
            ("P2PCHECK_LIBCUDART", &lib),
            ("P2PCHECK_SIM_GPUS", "2"),
            ("P2PCHECK_SIM_FAULTS", "0->1:corrupt"),
            ("VLLM_CACHE_ROOT", &tmp.path().display().to_string()),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Child side of the next test: this test binary re-executed with `ACCESS_CHILD=1` calls
/// `gpu_p2p_access_check` for every pair in a fresh process, as an engine would.
#[test]
fn access_check_child() {
    if std::env::var_os("ACCESS_CHILD").is_none() {
        eprintln!("skipped: only runs as the child of the gpu_p2p_access_check test");
        return;
    }
    let n = p2pcheck::visible_device_count().unwrap();
    for src in 0..n {
        for tgt in 0..n {
            let access = p2pcheck::access_check(src, tgt, &Default::default()).unwrap();
            for w in &access.warnings {
                eprintln!("warning: {w}");
            }
            println!("pair {src}->{tgt} {}", access.answer);
        }
    }
    println!("cache {}", p2pcheck::vllm_cache_path(n).unwrap().display());
}

#[test]
fn gpu_p2p_access_check_computes_vllms_cache_once_and_recomputes_a_corrupt_one() {
    let t = token();
    let tmp = TempDir::new("p2pcheck-access");
    let dir = tmp.path().to_path_buf();
    let lib = dir.join("libsim.so");
    p2pcheck::sim::write_library(&lib).unwrap();
    let lib = lib.display().to_string();
    let run = |faults: &str| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "access_check_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ACCESS_CHILD", "1")
        .env("P2PCHECK_WORKER", WORKER)
        .env("P2PCHECK_TEST_TOKEN", &t)
        .env("P2PCHECK_LIBCUDA", &lib)
        .env("P2PCHECK_LIBCUDART", &lib)
        .env("P2PCHECK_SIM_GPUS", "4")
        .env("P2PCHECK_SIM_FAULTS", faults)
        .env("CUDA_VISIBLE_DEVICES", "3,1")
        .env("VLLM_CACHE_ROOT", &dir);
        let out = output_within(&mut cmd, LIMIT);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The child exited as soon as it had its answers: its workers, killed as their parent
        // died (PR_SET_PDEATHSIG), are gone within moments (a loaded machine may take longer).
        let exited = Instant::now();
        while !processes_with(&t).is_empty() {
            assert!(
                exited.elapsed() < Duration::from_secs(10),
                "workers left behind"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Physical 3 is local 0: the fault 3->1 is local 0->1.
    let (stdout, _) = run("3->1:drop-writes");
    assert!(
        stdout.contains("pair 0->0 true\npair 0->1 false\npair 1->0 true\npair 1->1 true\n"),
        "{stdout}"
    );
    let file = dir.join("gpu_p2p_access_cache_for_3,1.json");
    assert!(stdout.contains(&file.display().to_string()), "{stdout}");
    let expected =
        "{\n    \"0->0\": true,\n    \"0->1\": false,\n    \"1->0\": true,\n    \"1->1\": true\n}";
    assert_eq!(std::fs::read_to_string(&file).unwrap(), expected);
    // Cached: a different machine state is not re-checked (vLLM's semantics).
    let (stdout, _) = run("");
    assert!(stdout.contains("pair 0->1 false"), "{stdout}");
    // A truncated file is reported and recomputed.
    std::fs::write(&file, &expected[..20]).unwrap();
    let (stdout, stderr) = run("");
    assert!(stdout.contains("pair 0->1 true"), "{stdout}");
    assert!(stderr.contains("checked again"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        expected.replace("\"0->1\": false", "\"0->1\": true")
    );
}

#[test]
fn the_worker_is_found_beside_the_cli_without_configuration() {
    let token = token();
    let out = output_within(
        command(&["--simulate", "2"], &[], &token).env_remove("P2PCHECK_WORKER"),
        LIMIT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(processes_with(&token).is_empty());
}

/// The JSON trace lines (`P2PCHECK_TRACE=1`) among a run's stderr, each one whole object.
fn trace_lines(stderr: &str) -> Vec<HashMap<String, Value>> {
    stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| object(json::parse(l).unwrap_or_else(|e| panic!("{e}: {l}"))))
        .collect()
}

#[test]
fn the_trace_names_every_cuda_call_with_its_result() {
    let (out, _) = cli(
        &["--simulate", "2", "--engine", "vllm"],
        &[("P2PCHECK_TRACE", "1")],
    );
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let trace = trace_lines(&stderr);
    assert_eq!(
        trace.len(),
        stderr.lines().count(),
        "every stderr line is a trace line:\n{stderr}"
    );
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => panic!("not a string: {other:?}"),
    };
    let device = |l: &HashMap<String, Value>| match &l["device"] {
        Value::Null => None,
        d => Some(number(d)),
    };
    // (call, device, api): made, and succeeded with CUDA's name for success.
    for (call, dev, api) in [
        ("cuInit", None, "driver"),
        ("cudaGetDeviceCount", None, "runtime"),
        ("cudaSetDevice", Some(0), "runtime"),
        ("cudaMalloc", Some(0), "runtime"),
        ("cudaMemset", Some(0), "runtime"),
        ("cudaDeviceSynchronize", Some(0), "runtime"),
        ("cudaIpcGetMemHandle", Some(0), "runtime"),
        ("cudaDeviceCanAccessPeer", Some(1), "runtime"),
        ("cudaIpcOpenMemHandle", Some(0), "runtime"),
        ("cudaMemcpy", Some(0), "runtime"),
        ("cuModuleLoadData", Some(0), "driver"),
        ("cuModuleGetFunction", Some(0), "driver"),
        ("p2pc_pattern_store", Some(0), "shim"),
        ("p2pc_pattern_check", Some(0), "shim"),
        ("p2pc_handshake", Some(0), "shim"),
        ("cudaIpcCloseMemHandle", Some(1), "runtime"),
        ("cudaFree", Some(0), "runtime"),
        ("cuModuleUnload", Some(0), "driver"),
        ("cudaDeviceReset", Some(0), "runtime"),
    ] {
        let success = if api == "runtime" {
            "cudaSuccess"
        } else {
            "CUDA_SUCCESS"
        };
        assert!(
            trace.iter().any(|l| text(&l["call"]) == call
                && device(l) == dev
                && text(&l["api"]) == api
                && number(&l["code"]) == 0
                && text(&l["name"]) == success),
            "trace lacks {call} on {dev:?}:\n{stderr}"
        );
    }
    // Each shim function's driver calls follow it as lines of their own, in order, from the
    // same process, with `via` and `seq`.
    for (shim, inner) in [
        (
            "p2pc_pattern_store",
            &["cuLaunchKernel", "cuCtxSynchronize"][..],
        ),
        (
            "p2pc_pattern_check",
            &[
                "cuMemAlloc_v2",
                "cuMemsetD8_v2",
                "cuMemsetD8_v2",
                "cuMemsetD8_v2",
                "cuLaunchKernel",
                "cuCtxSynchronize",
                "cuMemcpyDtoH_v2",
                "cuMemFree_v2",
            ][..],
        ),
        (
            "p2pc_handshake",
            &[
                "cuMemAlloc_v2",
                "cuMemsetD8_v2",
                "cuMemsetD8_v2",
                "cuMemsetD8_v2",
                "cuMemsetD8_v2",
                "cuLaunchKernel",
                "cuCtxSynchronize",
                "cuMemcpyDtoH_v2",
                "cuMemFree_v2",
            ][..],
        ),
    ] {
        let at = trace.iter().position(|l| text(&l["call"]) == shim).unwrap();
        let pid = &trace[at]["pid"];
        let next: Vec<&HashMap<String, Value>> = trace[at + 1..]
            .iter()
            .filter(|l| &l["pid"] == pid)
            .take(inner.len())
            .collect();
        for (i, (l, call)) in next.iter().zip(inner).enumerate() {
            assert_eq!(text(&l["call"]), *call, "{shim} call {}", i + 1);
            assert_eq!(text(&l["via"]), shim);
            assert_eq!(number(&l["seq"]), i + 1);
            assert_eq!(l["ts_us"], trace[at]["ts_us"]);
            assert_eq!(l["dur_us"], Value::Null);
        }
    }
    // Both workers trace, each line with its pid.
    let pids: std::collections::HashSet<String> = trace
        .iter()
        .map(|l| number(&l["pid"]).to_string())
        .collect();
    assert_eq!(pids.len(), 2, "{stderr}");
}

/// The warm path: a second `access-check` in a fresh process answers from vLLM's file and the
/// fingerprint beside it without a single CUDA call; a changed machine (here: the recorded
/// driver version differs) is checked again, and `--refresh` forces a check.
#[test]
fn a_warm_answer_needs_no_cuda_and_a_changed_machine_is_checked_again() {
    let tmp = TempDir::new("p2pcheck-warm");
    let dir = tmp.path().display().to_string();
    let access = |extra: &[&str]| {
        let mut args = vec![
            "access-check",
            "0",
            "1",
            "--simulate",
            "2",
            "--fault",
            "0->1:drop-writes",
        ];
        args.extend(["--cache-dir", &dir]);
        args.extend(extra);
        let (out, _) = cli(&args, &[("P2PCHECK_TRACE", "1")]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let calls = |stderr: &str| {
        stderr
            .lines()
            .filter(|l| l.starts_with("{\"ts_us\":"))
            .count()
    };
    let (answer, stderr) = access(&[]);
    assert_eq!(answer, "false");
    assert!(calls(&stderr) > 0, "the first answer needs a check");
    let file = tmp.path().join("gpu_p2p_access_cache_for_0,1.json");
    let beside = tmp
        .path()
        .join(".gpu_p2p_access_cache_for_0,1.json.p2pcheck-fingerprint");
    let fp = std::fs::read_to_string(&beside).unwrap();
    assert!(fp.contains("driver=simulated\n"), "{fp}");
    assert!(fp.contains("level=handshake\n"), "{fp}");
    let cached = std::fs::read(&file).unwrap();
    // Warm: no CUDA call at all, the same answer, the file untouched.
    let (answer, stderr) = access(&[]);
    assert_eq!((answer.as_str(), calls(&stderr)), ("false", 0), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), cached);
    // The machine changed: checked again, and said so.
    std::fs::write(&beside, fp.replace("driver=simulated", "driver=580.159.04")).unwrap();
    let (answer, stderr) = access(&[]);
    assert_eq!(answer, "false");
    assert!(calls(&stderr) > 0);
    assert!(
        stderr.contains("the machine changed since it was written: driver"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&beside).unwrap(), fp);
    // --refresh checks even a valid cache.
    let (_, stderr) = access(&["--refresh"]);
    assert!(
        calls(&stderr) > 0 && stderr.contains("a fresh check was asked for"),
        "{stderr}"
    );
}

/// The diagnosis class of a pair that failed (`None` for one that did not).
fn class_of(run: &Run, pair: &str) -> Option<String> {
    match run.field(pair, "diagnosis") {
        Value::Object(fields) => fields.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("class", Value::String(c)) => Some(c.clone()),
            _ => None,
        }),
        _ => None,
    }
}

#[test]
fn every_cumem_fault_is_caught_and_classified_over_cumem_and_all_while_ipc_is_untouched() {
    // (fault, the cuMem pairs it breaks on 3 GPUs, their class): the export is the producer
    // device's (every pair from it); the others are the pair's alone.
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "1->2:cumem-export-fails",
            &["1->0", "1->1", "1->2"],
            "export-refused",
        ),
        ("1->2:cumem-import-fails", &["1->2"], "import-refused"),
        ("1->2:cumem-access-fails", &["1->2"], "map-refused"),
        ("1->2:cumem-drop-writes", &["1->2"], "never-written"),
    ];
    for (fault, broken, class) in cases {
        for transport in ["cumem", "all"] {
            for visibility in ["one", "all"] {
                let flags = ["--transport", transport, "--visibility", visibility];
                let (run, _) = simulate(3, &[fault], &flags, &[]);
                let what = format!("{fault} --transport {transport} --visibility {visibility}");
                assert_eq!(run.code, 1, "{what}: {}", run.stderr);
                assert_eq!(
                    run.top["transport"],
                    Value::String(transport.into()),
                    "{what}"
                );
                let ipc = if transport == "all" { 9 } else { 0 };
                assert_eq!(run.pairs.len(), 9 + ipc, "{what}");
                let broken: Vec<String> = broken.iter().map(|p| format!("{p}@cumem")).collect();
                for p in &broken {
                    assert_eq!(run.verdict(p), "fails", "{what} {p}: {}", run.reason(p));
                    assert_eq!(
                        run.field(p, "failed_tier"),
                        &Value::String("copy".into()),
                        "{what} {p}"
                    );
                    assert_eq!(class_of(&run, p).as_deref(), Some(class), "{what} {p}");
                    // Failed twice the same way: a fact about the machine.
                    assert_eq!(
                        run.field(p, "evidence"),
                        &Value::String("confirmed".into()),
                        "{what} {p}"
                    );
                }
                // Every other pair passes, over both transports: legacy IPC knows nothing of
                // the cuMem path's faults.
                let except: Vec<&str> = broken.iter().map(String::as_str).collect();
                run.others_ok(&except);
            }
        }
    }
}

#[test]
fn the_cumem_path_shares_the_paths_faults_and_keeps_its_own_tiers() {
    // A fault of the path between the GPUs breaks both transports, each at its own tier.
    let (run, _) = simulate(
        2,
        &["0->1:sm-only"],
        &["--transport", "all", "--timeout", STEP],
        &[],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    for p in ["0->1", "0->1@cumem"] {
        assert_eq!(run.verdict(p), "fails", "{p}: {}", run.reason(p));
        assert_eq!(
            run.field(p, "failed_tier"),
            &Value::String("kernel".into()),
            "{p}"
        );
        assert_eq!(run.field(p, "copy_ok"), &Value::Bool(true), "{p}");
    }
    run.others_ok(&["0->1", "0->1@cumem"]);
    // ipc-open-fails is legacy IPC's own: the cuMem path passes every tier.
    let (run, _) = simulate(2, &["1->0:ipc-open-fails"], &["--transport", "all"], &[]);
    assert_eq!(class_of(&run, "1->0").as_deref(), Some("open-failed"));
    run.others_ok(&["1->0"]);
    for (pair, fields) in run.pairs.iter().filter(|(p, _)| p.ends_with("@cumem")) {
        assert_eq!(fields["handshake"], Value::String("ok".into()), "{pair}");
    }
}

#[test]
fn legacy_results_and_the_vllm_cache_bytes_do_not_depend_on_the_cumem_transport() {
    let tmp = TempDir::new("p2pcheck-sim-cumem-cache");
    let mut files = Vec::new();
    for transport in ["ipc", "all"] {
        let dir = tmp.path().join(transport);
        let dir_s = dir.display().to_string();
        let (out, _) = cli(
            &[
                "--simulate",
                "2",
                "--fault",
                "1->0:drop-writes",
                "--fault",
                "0->1:cumem-import-fails",
                "--transport",
                transport,
                "--write-vllm-cache",
                "--cache-dir",
                &dir_s,
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        files.push(std::fs::read(dir.join("gpu_p2p_access_cache_for_0,1.json")).unwrap());
    }
    // The cuMem transport's failure of 0->1 is not in vLLM's cache: legacy IPC's verdicts are.
    assert_eq!(files[0], files[1]);
    assert_eq!(
        String::from_utf8_lossy(&files[0]),
        "{\n    \"0->0\": true,\n    \"0->1\": true,\n    \"1->0\": false,\n    \"1->1\": true\n}"
    );
    // The default is legacy IPC, and says so.
    let (run, _) = simulate(2, &[], &[], &[]);
    assert_eq!(run.top["transport"], Value::String("ipc".into()));
    assert_eq!(run.pairs.len(), 4);
    // The cuMem transport alone cannot write vLLM's cache, and vLLM's procedure has no cuMem.
    let dir = tmp.path().join("cumem").display().to_string();
    for args in [
        &[
            "--simulate",
            "2",
            "--transport",
            "cumem",
            "--write-vllm-cache",
            "--cache-dir",
            &dir,
        ][..],
        &["--simulate", "2", "--transport", "all", "--engine", "vllm"][..],
        &["--simulate", "2", "--transport", "both"][..],
    ] {
        let (out, _) = cli(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("transport"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_trace_records_the_cumem_calls_and_trace_summary_lists_them() {
    let tmp = TempDir::new("p2pcheck-sim-cumem-trace");
    let trace = tmp.path().join("trace.jsonl");
    let trace_s = trace.display().to_string();
    let (out, _) = cli(
        &[
            "--simulate",
            "2",
            "--transport",
            "cumem",
            "--level",
            "copy",
            "--trace",
            &trace_s,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines = trace_lines(&text);
    let calls = |name: &str| -> Vec<&HashMap<String, Value>> {
        lines
            .iter()
            .filter(|l| l["call"] == Value::String(name.into()))
            .collect()
    };
    // Two producers export one allocation each; four consumers (two second workers for the
    // same-GPU pairs) import, map and grant access: each with its arguments.
    assert_eq!(calls("cuMemCreate").len(), 2);
    assert_eq!(calls("cuMemExportToShareableHandle").len(), 2);
    assert_eq!(calls("cuMemImportFromShareableHandle").len(), 4);
    assert_eq!(calls("cuMemMap").len(), 6);
    assert_eq!(calls("cuMemSetAccess").len(), 6);
    assert_eq!(calls("cuMemUnmap").len(), 6);
    assert_eq!(calls("cuMemRelease").len(), 6);
    assert_eq!(calls("cuMemAddressFree").len(), 6);
    for l in calls("cuMemImportFromShareableHandle") {
        let Value::Object(args) = &l["args"] else {
            panic!("{l:?}")
        };
        assert!(args.iter().any(|(k, v)| k == "handle_type"
            && *v == Value::String("CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR".into())));
    }
    assert!(!text.contains("cuMulticast"));
    let (out, _) = cli(&["trace-summary", &trace_s], &[]);
    let summary = String::from_utf8_lossy(&out.stdout);
    for name in [
        "cuMemCreate x1",
        "cuMemExportToShareableHandle x1",
        "cuMemImportFromShareableHandle x1",
        "cuMemSetAccess",
    ] {
        assert!(summary.contains(name), "{name}: {summary}");
    }
}

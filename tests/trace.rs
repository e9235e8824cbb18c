//! The audit trace on the simulated driver: `--trace PATH` / `P2PCHECK_TRACE` write one JSON
//! object per line for every CUDA call of every process, never interleaved; a vLLM-engine copy
//! check follows SPEC section 2 call for call, pair by pair, and `trace-summary --spec` says so
//! (and names the pair when a call is missing); the default engine never resets a device; off,
//! nothing is written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use p2pcheck::json::{self, Value};

mod common;
use common::{output_within, TempDir};

/// How long one run may take before the test fails: far beyond what any run here needs, even on
/// a loaded machine; it only proves that nothing waits for ever (a FIFO's open would).
const LIMIT: Duration = Duration::from_secs(120);

fn p2pcheck(args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pcheck"));
    cmd.args(args)
        .env("P2PCHECK_WORKER", env!("CARGO_BIN_EXE_p2pcheck-worker"))
        .env_remove("P2PCHECK_TRACE")
        .env_remove("CUDA_VISIBLE_DEVICES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    output_within(&mut cmd, LIMIT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One trace line's fields.
type Line = HashMap<String, Value>;

/// Every line of a trace file, each parsed as exactly one JSON object (which a line with another
/// process's line written into it would not be).
fn read_trace(path: &Path) -> Vec<Line> {
    let raw = std::fs::read_to_string(path).expect("the trace file exists");
    assert!(raw.ends_with('\n'), "the last line is whole");
    raw.lines()
        .enumerate()
        .map(|(i, l)| match json::parse(l) {
            Ok(Value::Object(m)) => m.into_iter().collect(),
            other => panic!("line {}: not one JSON object ({other:?}): {l}", i + 1),
        })
        .collect()
}

fn s<'a>(l: &'a Line, key: &str) -> &'a str {
    match l.get(key) {
        Some(Value::String(s)) => s,
        other => panic!("{key}: {other:?} in {l:?}"),
    }
}

fn n(l: &Line, key: &str) -> i64 {
    match l.get(key) {
        Some(Value::Number(n)) => n.parse().unwrap(),
        other => panic!("{key}: {other:?} in {l:?}"),
    }
}

fn job(l: &Line) -> Option<(i64, i64, i64, String, String)> {
    match l.get("job") {
        Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            let m: Line = m.iter().cloned().collect();
            Some((
                n(&m, "index"),
                n(&m, "src"),
                n(&m, "tgt"),
                s(&m, "role").to_string(),
                s(&m, "tier").to_string(),
            ))
        }
        other => panic!("job: {other:?}"),
    }
}

#[test]
fn a_vllm_copy_check_makes_exactly_spec_section_2s_calls_for_every_pair() {
    let dir = TempDir::new("p2pcheck-trace-vllm");
    let path = dir.path().join("trace.jsonl");
    let p = path.to_str().unwrap();
    let out = p2pcheck(
        &[
            "--simulate",
            "2",
            "--engine",
            "vllm",
            "--level",
            "copy",
            "--trace",
            p,
        ],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let lines = read_trace(&path);

    // Per pair (job index) and side, the calls in order; outside jobs, per process.
    let mut pairs: BTreeMap<(i64, String), (i64, i64, Vec<String>)> = BTreeMap::new();
    let mut outside: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for l in &lines {
        assert_eq!(n(l, "code"), 0, "{l:?}");
        let success = match s(l, "api") {
            "driver" => "CUDA_SUCCESS",
            _ => "cudaSuccess",
        };
        assert_eq!(s(l, "name"), success, "{l:?}");
        match job(l) {
            None => outside
                .entry(n(l, "pid"))
                .or_default()
                .push(s(l, "call").into()),
            Some((index, src, tgt, role, tier)) => {
                assert_eq!(tier, "copy");
                assert_eq!(s(l, "role"), role, "a vLLM worker's role is its job's");
                let e = pairs.entry((index, role)).or_insert((src, tgt, Vec::new()));
                assert_eq!((e.0, e.1), (src, tgt));
                e.2.push(s(l, "call").into());
            }
        }
    }
    assert_eq!(outside.len(), 2, "two workers: {outside:?}");
    for calls in outside.values() {
        assert_eq!(calls, &["cuInit", "cudaGetDeviceCount"]);
    }
    let expect_pairs = [(0, 0), (0, 1), (1, 0), (1, 1)];
    assert_eq!(pairs.len(), 2 * expect_pairs.len());
    for (index, &(src, tgt)) in expect_pairs.iter().enumerate() {
        let producer = &pairs[&(index as i64, "producer".to_string())];
        assert_eq!((producer.0, producer.1), (src, tgt));
        assert_eq!(
            producer.2,
            [
                "cudaSetDevice",
                "cudaMalloc",
                "cudaMemset",
                "cudaDeviceSynchronize",
                "cudaIpcGetMemHandle",
                "cudaMemcpy",
                "cudaDeviceReset"
            ],
            "pair {src}->{tgt}"
        );
        let consumer = &pairs[&(index as i64, "consumer".to_string())];
        let mut expected = vec!["cudaSetDevice"];
        if src != tgt {
            // The named extra: p2pcheck asks the driver's claim.
            expected.push("cudaDeviceCanAccessPeer");
        }
        expected.extend([
            "cudaIpcOpenMemHandle",
            "cudaMemset",
            "cudaDeviceSynchronize",
            "cudaMemcpy",
            "cudaDeviceReset",
        ]);
        assert_eq!(consumer.2, expected, "pair {src}->{tgt}");
    }
    // The arguments read as SPEC section 2 states them.
    let find = |role: &str, index: i64, call: &str| -> &Line {
        lines
            .iter()
            .find(|l| s(l, "call") == call && job(l).is_some_and(|j| j.0 == index && j.3 == role))
            .unwrap()
    };
    let open = find("consumer", 1, "cudaIpcOpenMemHandle");
    let Some(Value::Object(args)) = open.get("args") else {
        panic!("{open:?}")
    };
    let args: Line = args.iter().cloned().collect();
    assert_eq!(s(&args, "flags"), "cudaIpcMemLazyEnablePeerAccess");
    let exported = find("producer", 1, "cudaIpcGetMemHandle");
    let Some(Value::Object(out)) = exported.get("out") else {
        panic!("{exported:?}")
    };
    let out: Line = out.iter().cloned().collect();
    assert_eq!(s(&out, "handle").len(), 128, "64 bytes in hex");
    assert_eq!(s(&out, "handle"), s(&args, "handle"));
    let memcpy = find("producer", 1, "cudaMemcpy");
    let Some(Value::Object(args)) = memcpy.get("args") else {
        panic!("{memcpy:?}")
    };
    let args: Line = args.iter().cloned().collect();
    assert_eq!(s(&args, "kind"), "cudaMemcpyDefault");
    assert_eq!(n(&args, "bytes"), 1024);
    assert!(s(&args, "src").starts_with("0x"));

    // trace-summary --spec agrees.
    let out = p2pcheck(&["trace-summary", p, "--spec"], &[], None);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("58 call(s) from 2 process(es), 0 failed\n"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("no difference from SPEC section 2 in 4 pair(s)\n"),
        "{stdout}"
    );
    for pair in [
        "pair 0->0 (job 0)",
        "pair 0->1 (job 1)",
        "pair 1->0 (job 2)",
        "pair 1->1 (job 3)",
    ] {
        assert!(
            stdout.contains(&format!("  {pair}: as SPEC section 2")),
            "{stdout}"
        );
    }

    // One call removed by hand: the consumer's cudaMemset of pair 1->0.
    let raw = std::fs::read_to_string(&path).unwrap();
    let target = raw
        .lines()
        .position(|l| {
            l.contains("\"call\":\"cudaMemset\"")
                && l.contains("\"job\":{\"index\":2,\"src\":1,\"tgt\":0,\"role\":\"consumer\"")
        })
        .expect("the consumer's cudaMemset of pair 1->0");
    let edited: String = raw
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != target)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let edited_path = dir.path().join("edited.jsonl");
    std::fs::write(&edited_path, edited).unwrap();
    let out = p2pcheck(
        &["trace-summary", edited_path.to_str().unwrap(), "--spec"],
        &[],
        None,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("  pair 1->0 (job 2): DIFFERS (below)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 difference(s) from SPEC section 2:\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  pair 1->0 (job 2) consumer (pid ")
            && stdout.contains(
                "call 4 differs: expected cudaMemset, got cudaDeviceSynchronize; SPEC: \
             cudaSetDevice, cudaDeviceCanAccessPeer, cudaIpcOpenMemHandle, cudaMemset, \
             cudaDeviceSynchronize, cudaMemcpy, cudaDeviceReset; traced: cudaSetDevice, \
             cudaDeviceCanAccessPeer, cudaIpcOpenMemHandle, cudaDeviceSynchronize, cudaMemcpy, \
             cudaDeviceReset\n"
            ),
        "{stdout}"
    );
    for other in [
        "pair 0->0 (job 0)",
        "pair 0->1 (job 1)",
        "pair 1->1 (job 3)",
    ] {
        assert!(
            stdout.contains(&format!("  {other}: as SPEC section 2")),
            "{stdout}"
        );
    }
}

#[test]
fn a_failed_open_is_spec_section_2s_false_not_a_difference() {
    let dir = TempDir::new("p2pcheck-trace-open-fails");
    let path = dir.path().join("trace.jsonl");
    let p = path.to_str().unwrap();
    let out = p2pcheck(
        &[
            "--simulate",
            "2",
            "--engine",
            "vllm",
            "--level",
            "copy",
            "--fault",
            "1->0:ipc-open-fails",
            "--trace",
            p,
        ],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let failed: Vec<Line> = read_trace(&path)
        .into_iter()
        .filter(|l| n(l, "code") != 0)
        .collect();
    // Once per attempt: the failure is confirmed on fresh workers.
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(s(&failed[1], "call"), "cudaIpcOpenMemHandle");
    assert_eq!(s(&failed[0], "call"), "cudaIpcOpenMemHandle");
    assert_eq!(s(&failed[0], "name"), "cudaErrorMapBufferObjectFailed");
    assert_eq!(
        failed[0].get("out"),
        None,
        "no out-values from a failed call"
    );
    let out = p2pcheck(&["trace-summary", p, "--spec"], &[], None);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    // The batch, then the failing pair again on a fresh producer and consumer.
    assert!(
        stdout.starts_with("68 call(s) from 4 process(es), 2 failed\n"),
        "{stdout}"
    );
    for (job, round) in [(2, 1), (0, 2)] {
        assert!(
            stdout.contains(&format!(
                "note: pair 1->0 (job {job}, round {round}): cudaIpcOpenMemHandle failed (205 \
                 cudaErrorMapBufferObjectFailed, line "
            )),
            "{stdout}"
        );
    }
    assert!(stdout.ends_with("no difference from SPEC section 2 in 5 pair(s)\n"));
}

#[test]
fn the_default_engine_traces_every_process_into_one_file_with_whole_lines_and_no_reset() {
    let dir = TempDir::new("p2pcheck-trace-parallel");
    // A relative path: the parent makes it absolute for the workers.
    let out = p2pcheck(
        &["--simulate", "4", "--trace", "trace.jsonl"],
        &[],
        Some(dir.path()),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let path = dir.path().join("trace.jsonl");
    let raw = std::fs::read_to_string(&path).unwrap();
    let lines = read_trace(&path);
    // Whole lines only: as many objects as lines, each line one object from its first byte.
    assert_eq!(raw.matches("{\"ts_us\":").count(), lines.len());
    assert!(raw
        .lines()
        .all(|l| l.starts_with("{\"ts_us\":") && l.ends_with('}')));
    let mut pids = BTreeSet::new();
    let mut calls = BTreeMap::<String, usize>::new();
    for l in &lines {
        for key in ["ts_us", "pid", "code"] {
            n(l, key);
        }
        for key in ["role", "part", "call", "api", "name"] {
            s(l, key);
        }
        assert!(l.contains_key("dur_us") && l.contains_key("job") && l.contains_key("args"));
        assert_eq!(s(l, "role"), "worker", "{l:?}");
        pids.insert(n(l, "pid"));
        *calls.entry(s(l, "call").to_string()).or_default() += 1;
        if let Some((_, src, tgt, role, _)) = job(l) {
            // A parallel worker plays both roles; its job says which, and its part names it.
            assert!(role == "producer" || role == "consumer");
            assert!(src < 4 && tgt < 4);
            assert!(s(l, "part").contains("worker of device 0, CUDA_VISIBLE_DEVICES=GPU-"));
        }
        if l.contains_key("via") {
            assert!(s(l, "via").starts_with("p2pc_"), "{l:?}");
            assert_eq!(l["dur_us"], Value::Null);
            assert!(n(l, "seq") >= 1);
        }
    }
    // 4 workers, one per GPU, and 4 second workers for the i->i pairs.
    assert_eq!(pids.len(), 8, "{pids:?}");
    assert_eq!(calls.get("cudaDeviceReset"), None, "{calls:?}");
    assert_eq!(calls["cuInit"], 8);
    assert_eq!(calls["cudaSetDevice"], 8);

    // trace-summary lists every process.
    let out = p2pcheck(&["trace-summary", path.to_str().unwrap()], &[], None);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with(&format!(
            "{} call(s) from 8 process(es), 0 failed\n",
            lines.len()
        )),
        "{stdout}"
    );
    for gpu in 0..4 {
        assert_eq!(
            stdout
                .lines()
                .filter(
                    |l| l.starts_with("pid ") && l.contains(&format!(", GPU {gpu} in its jobs:"))
                )
                .count(),
            2,
            "{stdout}"
        );
    }
    // Not SPEC section 2's procedure: --spec says so.
    let out = p2pcheck(
        &["trace-summary", path.to_str().unwrap(), "--spec"],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("a parallel-engine worker"));
}

#[test]
fn p2pcheck_trace_names_a_file_that_every_process_appends_to() {
    let dir = TempDir::new("p2pcheck-trace-env");
    let path = dir.path().join("env.jsonl");
    for _ in 0..2 {
        let out = p2pcheck(
            &["--simulate", "2", "--engine", "vllm", "--level", "copy"],
            &[("P2PCHECK_TRACE", path.to_str().unwrap())],
            None,
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        // Nothing on stderr: the lines went to the file.
        assert!(!text(&out.stderr).contains("\"ts_us\""));
    }
    // Two runs appended, 58 lines each: 2 workers x 2 start-up calls, 4 pairs x 7 producer
    // calls, 4 pairs x 6 consumer calls and 2 cudaDeviceCanAccessPeer.
    let lines = read_trace(&path);
    assert_eq!(lines.len(), 2 * 58);
    let pids: BTreeSet<i64> = lines.iter().map(|l| n(l, "pid")).collect();
    assert_eq!(pids.len(), 4);
    let out = p2pcheck(
        &["trace-summary", path.to_str().unwrap(), "--spec"],
        &[],
        None,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("pair 1->0 (job 2, round 2): as SPEC section 2"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("no difference from SPEC section 2 in 8 pair(s)\n"),
        "{stdout}"
    );
}

#[test]
fn the_library_traces_through_its_options_without_the_environment() {
    // No P2PCHECK_TRACE in this process: the option alone turns the workers' trace on.
    assert!(std::env::var_os("P2PCHECK_TRACE").is_none());
    let dir = TempDir::new("p2pcheck-trace-option");
    let path = dir.path().join("option.jsonl");
    let opts = p2pcheck::Options {
        engine: p2pcheck::Engine::Vllm,
        level: p2pcheck::Level::Copy,
        worker: Some(env!("CARGO_BIN_EXE_p2pcheck-worker").into()),
        simulate: Some(p2pcheck::sim::Simulation {
            gpus: 2,
            faults: Vec::new(),
        }),
        trace: Some(path.clone()),
        ..p2pcheck::Options::default()
    };
    let report = p2pcheck::check(None, &opts).expect("a simulated check runs");
    assert!(report.pairs.iter().all(|p| p.ok()));
    assert!(
        std::env::var_os("P2PCHECK_TRACE").is_none(),
        "the environment is left alone"
    );
    // The same 58 lines as `P2PCHECK_TRACE=FILE` gives for this check, from 2 workers.
    let lines = read_trace(&path);
    assert_eq!(lines.len(), 58);
    let pids: BTreeSet<i64> = lines.iter().map(|l| n(l, "pid")).collect();
    assert_eq!(pids.len(), 2);
    assert!(!pids.contains(&i64::from(std::process::id())));
}

#[test]
fn with_the_trace_off_no_file_is_created_and_nothing_is_printed() {
    for value in [None, Some(""), Some("0")] {
        let dir = TempDir::new("p2pcheck-trace-off");
        let env: Vec<(&str, &str)> = value.map(|v| ("P2PCHECK_TRACE", v)).into_iter().collect();
        let out = p2pcheck(
            &["--simulate", "2", "--engine", "vllm"],
            &env,
            Some(dir.path()),
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{value:?}: {}",
            text(&out.stderr)
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert!(left.is_empty(), "{value:?}: {left:?}");
        assert_eq!(text(&out.stderr), "", "{value:?}");
    }
}

#[test]
fn trace_arguments_and_files_that_cannot_be_used_exit_2_with_the_reason() {
    let dir = TempDir::new("p2pcheck-trace-bad");
    let missing = dir.path().join("no/such/folder/t.jsonl");
    let out = p2pcheck(
        &["--simulate", "2", "--trace", missing.to_str().unwrap()],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with(&format!(
            "p2pcheck: --trace: cannot use the trace file {}: No such file or directory",
            missing.display()
        )),
        "{}",
        text(&out.stderr)
    );
    let out = p2pcheck(&["--trace"], &[], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--trace needs a path"));

    let out = p2pcheck(&["trace-summary"], &[], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("needs the PATH"));
    let out = p2pcheck(&["trace-summary", missing.to_str().unwrap()], &[], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read"),
        "{}",
        text(&out.stderr)
    );
    let out = p2pcheck(&["trace-summary", "x", "--bogus"], &[], None);
    assert_eq!(out.status.code(), Some(2));

    let bad = dir.path().join("bad.jsonl");
    let good = "{\"pid\":7,\"role\":\"parent\",\"job\":null,\"call\":\"cuInit\",\"code\":0}";
    std::fs::write(
        &bad,
        format!("{good}\n{{\"pid\":7,\"role\":\"parent\",\"call\":\"cuInit\"\n{good}\n[]\n"),
    )
    .unwrap();
    let out = p2pcheck(
        &["trace-summary", bad.to_str().unwrap(), "--spec"],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stdout), "");
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines[1].starts_with("  line 2: not JSON: "), "{stderr}");
    assert_eq!(lines[2], "  line 4: not a JSON object");
}

#[test]
fn trace_summary_prints_each_process_calls_in_first_seen_order() {
    let dir = TempDir::new("p2pcheck-trace-summary");
    let path = dir.path().join("t.jsonl");
    let line = |pid: u32, role: &str, call: &str, via: &str, code: i32, name: &str| {
        format!(
            "{{\"ts_us\":1,\"dur_us\":2,\"pid\":{pid},\"role\":\"{role}\",\"part\":\"{role} \
             part\",\"job\":null,\"call\":\"{call}\"{via},\"api\":\"driver\",\"device\":1,\
             \"args\":{{}},\"code\":{code},\"name\":\"{name}\"}}\n"
        )
    };
    let ok = "CUDA_SUCCESS";
    let via = ",\"via\":\"p2pc_handshake\",\"seq\":1";
    let trace = [
        line(5, "worker", "cuInit", "", 0, ok),
        line(6, "parent", "cuInit", "", 0, ok),
        line(5, "worker", "cuModuleLoadData", "", 0, ok),
        line(
            5,
            "worker",
            "p2pc_handshake",
            "",
            700,
            "CUDA_ERROR_ILLEGAL_ADDRESS",
        ),
        line(
            5,
            "worker",
            "cuLaunchKernel",
            via,
            700,
            "CUDA_ERROR_ILLEGAL_ADDRESS",
        ),
        line(5, "worker", "cuModuleLoadData", "", 0, ok),
    ]
    .concat();
    std::fs::write(&path, trace).unwrap();
    let out = p2pcheck(&["trace-summary", path.to_str().unwrap()], &[], None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        "6 call(s) from 2 process(es), 2 failed\n\
         pid 5 worker (worker part): 5 call(s), 2 failed\n  \
         cuInit x1, cuModuleLoadData x2, p2pc_handshake x1, cuLaunchKernel in p2pc_handshake x1\n  \
         failed: line 4: p2pc_handshake on device 1 -> 700 CUDA_ERROR_ILLEGAL_ADDRESS\n  \
         failed: line 5: cuLaunchKernel (in p2pc_handshake) on device 1 -> 700 \
         CUDA_ERROR_ILLEGAL_ADDRESS\n\
         pid 6 parent (parent part): 1 call(s), 0 failed\n  \
         cuInit x1\n"
    );
}

/// Makes a FIFO at `path` (the mkfifo command: mkfifo(3) would need `unsafe`); `false` where
/// there is no mkfifo command.
fn mkfifo(path: &Path) -> bool {
    match Command::new("mkfifo").arg(path).status() {
        Ok(status) if status.success() => true,
        other => {
            eprintln!("FIFO cases skipped: no mkfifo command ({other:?})");
            false
        }
    }
}

#[test]
fn a_trace_destination_that_is_not_a_regular_file_is_refused_before_the_check() {
    let dir = TempDir::new("p2pcheck-trace-dest");
    let fifo = dir.path().join("fifo");
    let mut cases: Vec<(String, &str)> = vec![("/dev/null".into(), "a character device")];
    if mkfifo(&fifo) {
        cases.push((fifo.display().to_string(), "a FIFO"));
    }
    let refused = |out: &Output, source: &str, path: &str, what: &str| {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stderr),
            format!(
                "p2pcheck: {source}: cannot use the trace file {path}: it is {what}, not a \
                 regular file (P2PCHECK_TRACE=1 sends the trace to stderr)\n"
            )
        );
        assert_eq!(text(&out.stdout), "", "nothing ran");
    };
    for (path, what) in &cases {
        // Without a reader, a blocking open of the FIFO would wait for one for ever.
        let out = p2pcheck(&["--simulate", "2", "--trace", path], &[], None);
        refused(&out, "--trace", path, what);
        let out = p2pcheck(&["--simulate", "2"], &[("P2PCHECK_TRACE", path)], None);
        refused(&out, "P2PCHECK_TRACE", path, what);
    }
    if cases.len() == 2 {
        // With a reader, which could stop reading and block every write of every process (and
        // whose closing used to leave the workers' own opens waiting: "did not start CUDA").
        use std::os::unix::fs::OpenOptionsExt;
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let path = fifo.display().to_string();
        let out = p2pcheck(&["--simulate", "2", "--trace", &path], &[], None);
        refused(&out, "--trace", &path, "a FIFO");
    }
}

#[test]
fn trace_summary_reads_only_a_regular_file_within_its_limits() {
    let dir = TempDir::new("p2pcheck-trace-input");
    let fifo = dir.path().join("fifo");
    let mut cases: Vec<(String, String)> = vec![
        (
            "/dev/zero".into(),
            "it is a character device, not a regular file".into(),
        ),
        (
            "/dev/urandom".into(),
            "it is a character device, not a regular file".into(),
        ),
        (
            dir.path().display().to_string(),
            "it is a directory, not a regular file".into(),
        ),
    ];
    if mkfifo(&fifo) {
        // No writer: a blocking open would wait for one for ever.
        cases.push((
            fifo.display().to_string(),
            "it is a FIFO, not a regular file".into(),
        ));
    }
    // One byte over the limit (sparse: nothing is written, and nothing is read).
    let big = dir.path().join("big.jsonl");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(p2pcheck::trace_summary::MAX_TRACE_BYTES + 1)
        .unwrap();
    cases.push((
        big.display().to_string(),
        "larger than 1073741824 bytes (1 GiB), the most trace-summary reads: not the trace of a \
         check"
            .into(),
    ));
    for (path, why) in cases {
        for spec in [&[][..], &["--spec"][..]] {
            let out = p2pcheck(&[&["trace-summary", &path][..], spec].concat(), &[], None);
            assert_eq!(out.status.code(), Some(2), "{path}: {}", text(&out.stderr));
            assert_eq!(
                text(&out.stderr),
                format!("p2pcheck: trace-summary {path}:\n  cannot read {path}: {why}\n")
            );
            assert_eq!(text(&out.stdout), "");
        }
    }
}

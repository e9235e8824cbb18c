//! The parent against workers that misbehave on purpose (shell scripts speaking just enough of
//! the protocol): garbage on the pipe, an early exit, silence before or after Hello. Every case
//! ends with a precise verdict or error, within its deadline, and leaves no process behind.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{output_within, TempDir};

/// The bound on a run's wall time: far more than any run here needs with the timeouts it is
/// given (at most 2 x 5 s), even on a loaded machine, and far less than the 300 s the scripts
/// sleep (and the 300 s step deadline of the pipe-holder case), which a run waiting on the
/// wrong thing would meet. It proves what a run did not wait for, never speed.
const BOUND: Duration = Duration::from_secs(60);

/// A Barrier frame for pair 0 (0->0), from the producer, stage Copy: length 17, tag 5, job
/// (index, src, tgt: u32; role, tier, transport: u8), stage.
const BARRIER: &str =
    r"\x11\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

/// A Hello frame for one device: length 16, tag 1, "P2PC", version 4, pid 0, ok, count 1.
const HELLO: &str = r"\x10\x00\x00\x00\x01P2PC\x04\x00\x00\x00\x00\x00\x01\x01\x00\x00\x00";

/// Writes an executable worker script whose body runs after `exec 1>&3 3>&-` (the protocol's
/// output pipe is descriptor 3; its stdout and stderr are captured by the parent), in a folder
/// of its own that is removed when the returned guard drops.
fn fake_worker(name: &str, body: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new("p2pcheck-fake");
    let path = dir.path().join(name);
    std::fs::write(&path, format!("#!/bin/bash\nexec 1>&3 3>&-\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, path)
}

/// Runs the CLI with `worker` on `engine`. The parallel engine does its Hello and set-up before
/// any pair: a worker that breaks there leaves no answer (exit 2); the vLLM engine starts its
/// batch right after Hello, so the same breakage is the pair's verdict (retried once).
fn run_with(worker: &PathBuf, engine: &str, extra: &[&str]) -> (Output, Duration) {
    let token = format!("fake-{}-{}", std::process::id(), worker.display());
    let started = Instant::now();
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_p2pcheck"))
            .args(["--json", "--engine", engine, "--worker"])
            .arg(worker)
            .args(extra)
            .env("P2PCHECK_TEST_TOKEN", &token),
        BOUND * 5,
    );
    let took = started.elapsed();
    // No process of this run (the script or anything it started) is left: a killed one may
    // take a moment to be gone from /proc (reaped by init); a left one sleeps for 300 s.
    let left = || -> Vec<_> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("environ"))
                    .map(|env| {
                        env.split(|&b| b == 0)
                            .any(|v| v == format!("P2PCHECK_TEST_TOKEN={token}").as_bytes())
                    })
                    .unwrap_or(false)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left().is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes left by {}",
            worker.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (out, took)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn garbage_on_the_pipe_is_an_error_verdict() {
    let (_dir, w) = fake_worker(
        "garbage",
        &format!(
            "printf '{HELLO}'; head -c 4 >/dev/null; printf '\\xff\\xff\\xff\\xff'; sleep 300"
        ),
    );
    let (out, took) = run_with(&w, "vllm", &["--timeout", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let s = stdout(&out);
    assert!(s.contains("\"verdict\":\"error\""), "{s}");
    assert!(s.contains("malformed frame"), "{s}");
    assert!(s.contains("\"attempts\":2"), "retried once: {s}");
    assert!(took < BOUND, "{took:?}");
    let (out, took) = run_with(&w, "parallel", &["--timeout", "5"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let s = stdout(&out);
    assert!(
        s.contains("failed while starting") && s.contains("malformed frame"),
        "{s}"
    );
    assert!(took < BOUND, "{took:?}");
}

#[test]
fn a_worker_that_exits_mid_pair_is_an_error_verdict_with_its_exit_code() {
    let (_dir, w) = fake_worker(
        "exits",
        &format!("printf '{HELLO}'; head -c 4 >/dev/null; exit 7"),
    );
    let (out, _) = run_with(&w, "vllm", &[]);
    assert_eq!(out.status.code(), Some(1));
    let s = stdout(&out);
    assert!(s.contains("\"verdict\":\"error\""), "{s}");
    assert!(s.contains("exited with code 7"), "{s}");
    let (out, _) = run_with(&w, "parallel", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stdout(&out).contains("exited with code 7"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_silent_worker_is_a_hang_verdict_within_the_timeout() {
    let (_dir, w) = fake_worker("silent", &format!("printf '{HELLO}'; sleep 300"));
    let (out, took) = run_with(&w, "vllm", &["--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(1));
    let s = stdout(&out);
    assert!(s.contains("\"verdict\":\"hang\""), "{s}");
    assert!(
        s.contains("no answer within 0.5 s before the producer sent its IPC handle"),
        "{s}"
    );
    // Two attempts of 0.5 s each, and start-ups.
    assert!(took < BOUND, "{took:?}");
    let (out, took) = run_with(&w, "parallel", &["--startup-timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(2));
    let s = stdout(&out);
    assert!(s.contains("did not start CUDA and set up its GPU"), "{s}");
    assert!(took < BOUND, "{took:?}");
}

#[test]
fn a_worker_that_never_says_hello_is_a_start_up_error() {
    let (_dir, w) = fake_worker("mute", "sleep 300");
    for engine in ["vllm", "parallel"] {
        let (out, took) = run_with(&w, engine, &["--startup-timeout", "0.5"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            stdout(&out).contains("did not start CUDA"),
            "{engine}: {}",
            stdout(&out)
        );
        assert!(took < BOUND, "{took:?}");
    }
}

#[test]
fn a_worker_of_another_protocol_version_is_refused() {
    let (_dir, w) = fake_worker(
        "v9",
        r"printf '\x0a\x00\x00\x00\x01P2PC\x09\x00\x00\x00\x00'; sleep 300",
    );
    for engine in ["vllm", "parallel"] {
        let (out, _) = run_with(&w, engine, &[]);
        assert_eq!(out.status.code(), Some(2));
        let s = stdout(&out);
        assert!(s.contains("speaks protocol version 9"), "{engine}: {s}");
    }
}

#[test]
fn a_worker_flooding_valid_messages_cannot_keep_its_pair_alive() {
    // Hello, then, once the batch has started, one valid Barrier after another.
    let (_dir, w) = fake_worker(
        "flood",
        &format!("printf '{HELLO}'; head -c 4 >/dev/null; for i in $(seq 200); do printf '{BARRIER}'; done; sleep 300"),
    );
    let (out, took) = run_with(&w, "vllm", &["--timeout", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let s = stdout(&out);
    assert!(s.contains("\"verdict\":\"error\""), "{s}");
    assert!(s.contains("more than 16 messages for one pair"), "{s}");
    assert!(took < BOUND, "{took:?}");
    // The parallel engine takes no message it did not ask for.
    let (out, took) = run_with(&w, "parallel", &["--timeout", "5"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("Barrier while starting"),
        "{}",
        stdout(&out)
    );
    assert!(took < BOUND, "{took:?}");
}

#[test]
fn a_worker_that_dies_is_seen_at_once_though_a_descendant_holds_its_pipe() {
    // The background sleep inherits stdout, so the pipe stays open after the worker exits:
    // only its pidfd tells the parent, long before the 300 s step deadline.
    let (_dir, w) = fake_worker(
        "holder",
        &format!("printf '{HELLO}'; sleep 300 & head -c 4 >/dev/null; exit 7"),
    );
    for (engine, code) in [("vllm", 1), ("parallel", 2)] {
        let (out, took) = run_with(&w, engine, &["--timeout", "300"]);
        assert_eq!(out.status.code(), Some(code), "{engine}: {}", stdout(&out));
        assert!(
            stdout(&out).contains("exited with code 7"),
            "{engine}: {}",
            stdout(&out)
        );
        assert!(took < BOUND, "{engine}: {took:?}");
    }
}

#[test]
fn a_descendant_that_escaped_with_setsid_does_not_outlive_the_check() {
    // setsid puts the sleep in a session (and process group) of its own, out of reach of the
    // worker's group kill; the CLI adopts it when the worker dies and ends it.
    let (_dir, w) = fake_worker(
        "escaper",
        &format!("printf '{HELLO}'; setsid sleep 300 </dev/null >/dev/null 2>&1 & head -c 4 >/dev/null; exit 7"),
    );
    for engine in ["vllm", "parallel"] {
        // run_with asserts that no process of the run is left.
        let (out, took) = run_with(&w, engine, &["--timeout", "5"]);
        assert!(matches!(out.status.code(), Some(1 | 2)), "{engine}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("left behind by a worker"), "{engine}: {err}");
        assert!(took < BOUND, "{engine}: {took:?}");
    }
}

#[test]
fn a_worker_claiming_more_gpus_than_the_driver_lists_is_refused() {
    // Hello with a device count of 91, on a (simulated) machine of 2 GPUs: nothing is sized by
    // the claim (91 devices would be 8,281 pairs).
    let hello91 = r"\x10\x00\x00\x00\x01P2PC\x04\x00\x00\x00\x00\x00\x01\x5b\x00\x00\x00";
    let (_dir, w) = fake_worker("liar", &format!("printf '{hello91}'; sleep 300"));
    for engine in ["vllm", "parallel"] {
        let (out, took) = run_with(&w, engine, &["--simulate", "2"]);
        assert_eq!(out.status.code(), Some(2), "{engine}: {}", stdout(&out));
        assert!(
            stdout(&out).contains("claims to see 91 GPUs, but the driver lists 2"),
            "{engine}: {}",
            stdout(&out)
        );
        assert!(took < BOUND, "{engine}: {took:?}");
    }
}

#[test]
fn the_whole_check_has_a_deadline_that_no_number_of_pairs_can_stretch() {
    // Hello with a device count of 20 on a simulated machine of 20 GPUs, then silence: 400
    // pairs, each of which would cost a step timeout (and fresh workers) twice, over two
    // minutes. The whole check's deadline ends it (5 s), every pair accounted for.
    let hello20 = r"\x10\x00\x00\x00\x01P2PC\x04\x00\x00\x00\x00\x00\x01\x14\x00\x00\x00";
    let (_dir, w) = fake_worker("silent20", &format!("printf '{hello20}'; sleep 30"));
    let (out, took) = run_with(
        &w,
        "vllm",
        &[
            "--simulate",
            "20",
            "--level",
            "copy",
            "--timeout",
            "0.2",
            "--check-timeout",
            "5",
        ],
    );
    // 5 s: the start-up of the two fake workers fits it even on a loaded machine (a deadline
    // that passes during start-up is a check that could not run: exit 2).
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let s = stdout(&out);
    assert_eq!(s.matches("\"src\":").count(), 400, "{s}");
    assert!(s.contains("\"verdict\":\"hang\""), "{s}");
    assert!(s.contains("\"evidence\":\"not-attempted\""), "{s}");
    assert!(
        s.contains("not attempted: the check's deadline (5.0 s) passed"),
        "{s}"
    );
    assert!(!s.contains("\"persistable\":true"), "{s}");
    // The deadline, plus a step timeout and the workers' kill: bounded (room for a loaded
    // machine; never a measure of speed).
    assert!(took < BOUND, "{took:?}");
}

#[test]
fn a_worker_flooding_its_stderr_neither_blocks_nor_reaches_the_hosts_stderr() {
    // Hello, then stderr written without end: the pair is a hang within its timeout, the last
    // bytes are in its reason, and nothing of it reaches the CLI's own stderr.
    let (_dir, w) = fake_worker(
        "stderr-flood",
        &format!("printf '{HELLO}'; while :; do echo flood-from-the-worker; done >&2"),
    );
    let (out, took) = run_with(&w, "vllm", &["--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let s = stdout(&out);
    assert!(s.contains("\"verdict\":\"hang\""), "{s}");
    assert!(s.contains("earlier bytes not kept"), "{s}");
    assert!(s.contains("flood-from-the-worker"), "{s}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("flood-from-the-worker"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn what_a_worker_prints_on_stdout_or_stderr_is_in_the_report_not_on_the_hosts_stderr() {
    // Its fd 1 is the captured stderr pipe, not the protocol: printing there corrupts nothing.
    let (_dir, w) = fake_worker(
        "chatty",
        &format!(
            "echo said-on-stdout >&4; echo said-on-stderr >&2; printf '{HELLO}'; \
             head -c 4 >/dev/null; exit 7"
        ),
    );
    // The script's own stdout (now the protocol pipe) is not where it prints: descriptor 4 is
    // opened on the captured fd 1 before the exec in fake_worker moved it.
    let script = std::fs::read_to_string(&w).unwrap();
    std::fs::write(&w, script.replace("exec 1>&3 3>&-", "exec 4>&1 1>&3 3>&-")).unwrap();
    let (out, _) = run_with(&w, "vllm", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let s = stdout(&out);
    assert!(s.contains("exited with code 7; its stderr:"), "{s}");
    assert!(
        s.contains("said-on-stdout") && s.contains("said-on-stderr"),
        "{s}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("said-on-"), "{err}");
}

#[test]
fn a_worker_of_an_older_p2pcheck_speaking_on_its_stdout_is_named_as_such() {
    let (_dir, w) = fake_worker("older", &format!("printf '{HELLO}'; sleep 30"));
    let script = std::fs::read_to_string(&w).unwrap();
    std::fs::write(&w, script.replace("exec 1>&3 3>&-", "exec 3>&-")).unwrap();
    for engine in ["vllm", "parallel"] {
        let (out, took) = run_with(&w, engine, &["--startup-timeout", "0.5"]);
        assert_eq!(out.status.code(), Some(2), "{engine}: {}", stdout(&out));
        assert!(
            stdout(&out).contains("a worker of an older p2pcheck, which speaks on its stdout"),
            "{engine}: {}",
            stdout(&out)
        );
        assert!(took < Duration::from_secs(5), "{engine}: {took:?}");
    }
}

//! The CLI and the library on a machine without a usable driver: every failure is a clear
//! error with exit code 2, never a panic or a hang, and no worker is left behind.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn p2pcheck(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pcheck"));
    cmd.args(args)
        .env("P2PCHECK_WORKER", env!("CARGO_BIN_EXE_p2pcheck-worker"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = cmd.output().expect("p2pcheck runs");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_documents_options_and_exit_codes() {
    let out = p2pcheck(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for needle in [
        "--json",
        "--write-vllm-cache",
        "--no-kernel-check",
        "--timeout",
        "EXIT CODES",
        "0  every pair works",
        "1  some pair is not ok",
        "2  could not check",
        "P2PCHECK_LIBCUDA",
    ] {
        assert!(help.contains(needle), "help lacks {needle:?}");
    }
}

#[test]
fn version_names_the_bindings_source() {
    let out = p2pcheck(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let v = text(&out.stdout);
    assert!(
        v.starts_with("p2pcheck ") && v.contains("CUDA bindings"),
        "{v}"
    );
}

#[test]
fn bad_arguments_exit_2_with_a_reason() {
    for (args, needle) in [
        (&["--bogus"][..], "unknown argument"),
        (&["--timeout"][..], "needs a number"),
        (&["--timeout", "-1"][..], "positive number"),
        (&["--timeout", "abc"][..], "positive number"),
        (&["--cache-dir"][..], "needs a folder"),
    ] {
        let out = p2pcheck(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_missing_libcuda_is_a_clear_error_and_exit_2() {
    let out = p2pcheck(&[], &[("P2PCHECK_LIBCUDA", "/nonexistent/libcuda.so.1")]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("could not load libcuda"), "{err}");
    assert!(err.contains("/nonexistent/libcuda.so.1"), "{err}");
    assert!(err.contains("P2PCHECK_LIBCUDA"), "{err}");
    assert!(err.contains("No such file"), "dlerror text kept: {err}");
}

#[test]
fn a_stub_library_is_refused_by_path() {
    let out = p2pcheck(
        &[],
        &[("P2PCHECK_LIBCUDA", "/usr/local/cuda/lib64/stubs/libcuda.so")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("stub"), "{}", text(&out.stderr));
}

#[test]
fn json_mode_reports_the_error_as_json() {
    let out = p2pcheck(
        &["--json"],
        &[("P2PCHECK_LIBCUDA", "/nonexistent/libcuda.so.1")],
    );
    assert_eq!(out.status.code(), Some(2));
    let stdout = text(&out.stdout);
    let v = p2pcheck::json::parse(stdout.trim()).expect("stdout is JSON");
    let p2pcheck::json::Value::Object(fields) = v else {
        panic!("not an object: {stdout}")
    };
    assert_eq!(fields[0].0, "error");
}

#[test]
fn a_missing_worker_is_a_clear_error() {
    let out = p2pcheck(&[], &[("P2PCHECK_WORKER", "/nonexistent/p2pcheck-worker")]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("P2PCHECK_WORKER=/nonexistent/p2pcheck-worker"),
        "{err}"
    );
}

#[test]
fn the_worker_refuses_to_run_by_hand() {
    let out = Command::new(env!("CARGO_BIN_EXE_p2pcheck-worker"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not by hand"));
}

#[test]
fn library_rejects_unpaired_batches_and_accepts_empty_ones() {
    let err = p2pcheck::can_actually_p2p(&[0, 1], &[0]).unwrap_err();
    assert!(err.to_string().contains("must pair up"), "{err}");
    assert_eq!(
        p2pcheck::can_actually_p2p(&[], &[]).unwrap(),
        Vec::<bool>::new()
    );
}

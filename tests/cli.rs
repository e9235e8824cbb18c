//! The CLI and the library on a machine without a usable driver: every failure is a clear
//! error with exit code 2, never a panic or a hang, and no worker is left behind. And a vLLM
//! cache write that was asked for and failed is exit 2, never a warning.

use std::process::{Command, Output};
use std::time::Duration;

use p2pcheck::json::{self, Value};

mod common;
use common::{output_within, TempDir};

/// How long one run may take before the test fails: far beyond what any needs, even on a loaded
/// machine; it only proves that nothing waits for ever.
const LIMIT: Duration = Duration::from_secs(120);

fn p2pcheck(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pcheck"));
    cmd.args(args)
        .env("P2PCHECK_WORKER", env!("CARGO_BIN_EXE_p2pcheck-worker"))
        // The cache file's name depends on it.
        .env_remove("CUDA_VISIBLE_DEVICES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_within(&mut cmd, LIMIT)
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
    let v = json::parse(stdout.trim()).expect("stdout is JSON");
    let Value::Object(fields) = v else {
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
    let out = output_within(
        &mut Command::new(env!("CARGO_BIN_EXE_p2pcheck-worker")),
        LIMIT,
    );
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

/// `key` of a JSON object.
fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    match v {
        Value::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        _ => None,
    }
    .unwrap_or_else(|| panic!("no {key:?} in {v:?}"))
}

#[test]
fn a_vllm_cache_write_that_fails_is_exit_2_with_the_verdicts_printed() {
    let tmp = TempDir::new("p2pcheck-cli-cache");
    let name = "gpu_p2p_access_cache_for_0,1.json";
    // A folder where nothing can be created, even by root.
    let mut cases: Vec<(String, String)> = vec![(
        "/proc/1".into(),
        format!("cannot open the lock file /proc/1/{name}.lock"),
    )];
    // The lock refused: a directory in its place.
    let locked = tmp.path().join("locked");
    std::fs::create_dir_all(locked.join(format!("{name}.lock"))).unwrap();
    cases.push((
        locked.display().to_string(),
        "refusing to use the lock file".into(),
    ));
    // The file itself cannot be replaced: a folder that is not empty in its place.
    let blocked = tmp.path().join("blocked");
    std::fs::create_dir_all(blocked.join(name).join("x")).unwrap();
    cases.push((
        blocked.display().to_string(),
        "which the cache file cannot replace".into(),
    ));
    for (dir, why) in &cases {
        let base = ["--simulate", "2", "--cache-dir", dir, "--write-vllm-cache"];
        let out = p2pcheck(&base, &[]);
        let stdout = text(&out.stdout);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{dir}: {stdout}{stderr}");
        let path = format!("{dir}/{name}");
        assert!(
            stderr.contains(&format!("p2pcheck: could not write vLLM's cache: {path}: ")),
            "{dir}: {stderr}"
        );
        assert!(stderr.contains(why.as_str()), "{dir}: {stderr}");
        // The verdicts are printed all the same, and the table says the file was not written.
        assert!(stdout.contains("       1    ok    ok\n"), "{dir}: {stdout}");
        assert!(
            stdout.contains(&format!("vLLM cache: {path} (NOT written: {path}: ")),
            "{dir}: {stdout}"
        );
        let out = p2pcheck(&[&["--json"][..], &base].concat(), &[]);
        assert_eq!(out.status.code(), Some(2), "{dir}");
        let v = json::parse(text(&out.stdout).trim()).expect("one JSON object");
        assert_eq!(get(&v, "all_ok"), &Value::Bool(true));
        let cache = get(&v, "vllm_cache");
        assert_eq!(get(cache, "written"), &Value::Bool(false));
        match get(cache, "error") {
            Value::String(e) => assert!(e.contains(why.as_str()), "{dir}: {e}"),
            other => panic!("{dir}: error {other:?}"),
        }
    }
    // Nothing was written where it could not be.
    let left = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(left(&locked), [format!("{name}.lock")]);
    assert_eq!(left(&blocked), [name.to_string(), format!("{name}.lock")]);
}

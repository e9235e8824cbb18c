//! The command line as a hostile user would try it: wrong values, values out of range, bytes
//! that are not UTF-8, empty paths, files that are devices or FIFOs or cannot be written,
//! random mixtures. Each must end in exit code 2 (or a clean 0/1 for a mixture that happens to
//! be valid) with a message, never a panic or a signal, within its deadline, and leave no
//! process behind. The counts are printed (`--nocapture`) and quoted in the README.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::process::{Command, Output};
use std::time::Duration;

mod common;
use common::{output_within, TempDir};

/// How long one case may run before the test fails: each needs well under a second, but a
/// loaded machine may be many times slower; the limit only proves nothing waits for ever.
const LIMIT: Duration = Duration::from_secs(120);

fn p2pcheck(args: &[OsString], env: &[(&str, OsString)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pcheck"));
    cmd.args(args)
        .env("P2PCHECK_WORKER", env!("CARGO_BIN_EXE_p2pcheck-worker"))
        // No GPU driver on CI: a command line that is valid fails later, cleanly (exit 2).
        .env("P2PCHECK_LIBCUDA", "/nonexistent/libcuda.so.1")
        .env(
            "VLLM_CACHE_ROOT",
            std::env::temp_dir().join("p2pcheck-hostile-unused"),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_within(&mut cmd, LIMIT)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Asserts the outcome of one hostile case (which ended within [`LIMIT`]); returns whether it
/// held (it always does, or the assertion fails naming the case).
fn held(case: &str, out: Output, codes: &[i32]) -> bool {
    let code = out.status.code();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        code.is_some_and(|c| codes.contains(&c)),
        "{case}: exit {code:?} (a signal is None), stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
    assert!(
        code == Some(0) || code == Some(1) || stderr.contains("p2pcheck"),
        "{case}: no message: {stderr:?}"
    );
    true
}

#[test]
fn bad_command_lines_exit_2_with_a_message() {
    let tmp = TempDir::new("p2pcheck-hostile");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let file = file.display().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--bogus"],
        vec!["-x"],
        vec!["--json", "--json", "--nope"],
        vec!["--timeout"],
        vec!["--timeout", ""],
        vec!["--timeout", "-1"],
        vec!["--timeout", "0"],
        vec!["--timeout", "0.0000001"],
        vec!["--timeout", "1e300"],
        vec!["--timeout", "86401"],
        vec!["--timeout", "inf"],
        vec!["--timeout", "NaN"],
        vec!["--timeout", "5s"],
        vec!["--timeout", "0x10"],
        vec!["--startup-timeout", "-0"],
        vec!["--startup-timeout", "1e19"],
        vec!["--startup-timeout", "0.0001"],
        vec!["--cache-dir"],
        vec!["--cache-dir", ""],
        vec!["--cache-dir", &file],
        vec!["--engine"],
        vec!["--engine", "fast"],
        vec!["--engine", "VLLM"],
        vec!["--level"],
        vec!["--level", "all"],
        vec!["--level", "Kernel"],
        vec!["--visibility", "some"],
        vec!["--visibility"],
        vec!["--kernel-bytes", "0"],
        vec!["--kernel-bytes", "1000"],
        vec!["--kernel-bytes", "99999999999"],
        vec!["--kernel-bytes", "-262144"],
        vec!["--kernel-bytes", "2147483648"],
        vec!["--handshake-rounds", "0"],
        vec!["--handshake-rounds", "1000001"],
        vec!["--handshake-rounds", "x"],
        vec!["--simulate"],
        vec!["--simulate", "-1"],
        vec!["--simulate", "65"],
        vec!["--simulate", "4294967296"],
        vec!["--simulate", "two"],
        vec!["--simulate", "2", "--fault"],
        vec!["--simulate", "2", "--fault", "0->5:hang"],
        vec!["--simulate", "2", "--fault", "0->1"],
        vec!["--simulate", "2", "--fault", "0->1:melt"],
        vec!["--simulate", "2", "--fault", "0-1:hang"],
        vec!["--simulate", "2", "--fault", "->:hang"],
        vec!["--simulate", "2", "--fault", "99999999999->0:hang"],
        vec!["--fault", "0->1:hang"],
        vec!["--worker"],
        vec!["--worker", "/nonexistent/worker"],
        vec!["--worker", &file],
        vec!["--write-sim-lib"],
        vec!["--write-sim-lib", "/nonexistent/dir/lib.so"],
        vec!["access-check"],
        vec!["access-check", "0"],
        vec!["access-check", "a", "b"],
        vec!["access-check", "-1", "0"],
        vec!["access-check", "0", "4294967296"],
        vec!["access-check", "0", "0", "--simulate", "2"],
        vec!["--json", "access-check", "0", "0"],
        vec!["--simulate", "0"],
        // Files that are not what they must be: a device read or written for ever, a folder
        // that cannot be written.
        vec!["--trace", "/dev/zero"],
        vec!["--trace", "/dev/null", "--simulate", "2"],
        vec!["--trace", "/"],
        vec!["trace-summary", "/dev/zero"],
        vec!["trace-summary", "/dev/urandom", "--spec"],
        vec!["trace-summary", "/"],
        vec!["--write-sim-lib", "/dev/null"],
        vec!["--write-sim-lib", "/"],
        vec![
            "--simulate",
            "2",
            "--cache-dir",
            "/proc/1",
            "--write-vllm-cache",
        ],
    ];
    let mut tried = 0;
    let mut ok = 0;
    for case in &cases {
        tried += 1;
        ok += u32::from(held(&format!("{case:?}"), p2pcheck(&os(case), &[]), &[2]));
    }
    // Bytes that are not UTF-8, as an argument and as a value.
    let bad = || OsString::from_vec(vec![b'-', b'-', 0xff, 0xfe]);
    for args in [
        vec![bad()],
        vec![
            OsString::from("--cache-dir"),
            OsString::from_vec(vec![0xff]),
        ],
        vec![
            OsString::from("--timeout"),
            OsString::from_vec(vec![0x31, 0xff]),
        ],
        vec![OsString::from("--engine"), OsString::from_vec(vec![0xc3])],
    ] {
        tried += 1;
        ok += u32::from(held(&format!("{args:?}"), p2pcheck(&args, &[]), &[2]));
    }
    // Environment values the check must refuse or survive.
    for (name, value) in [
        ("CUDA_VISIBLE_DEVICES", OsString::from("")),
        ("CUDA_VISIBLE_DEVICES", OsString::from("zz")),
        ("CUDA_VISIBLE_DEVICES", OsString::from("-1")),
        (
            "CUDA_VISIBLE_DEVICES",
            OsString::from_vec(vec![0xff, b',', b'0']),
        ),
        ("CUDA_VISIBLE_DEVICES", OsString::from("0,".repeat(10_000))),
        ("P2PCHECK_WORKER", OsString::from("")),
        ("P2PCHECK_LIBCUDA", OsString::from_vec(vec![0xff])),
        ("VLLM_CACHE_ROOT", OsString::from("")),
    ] {
        tried += 1;
        let out = p2pcheck(
            &os(&[
                "--simulate",
                "2",
                "--cache-dir",
                &tmp.path().display().to_string(),
            ]),
            &[(name, value.clone())],
        );
        ok += u32::from(held(&format!("{name}={value:?}"), out, &[0, 1, 2]));
    }
    eprintln!("hostile command lines and environments: {tried} tried, {ok} held");
    assert_eq!(ok, tried);
}

#[test]
fn a_fifo_named_as_a_file_to_write_is_refused_at_once() {
    let tmp = TempDir::new("p2pcheck-hostile-fifo");
    let fifo = tmp.path().join("fifo");
    // mkfifo(3) would need `unsafe`; the mkfifo command makes the same FIFO.
    match Command::new("mkfifo").arg(&fifo).status() {
        Ok(status) if status.success() => {}
        other => {
            eprintln!("skipped: no mkfifo command ({other:?})");
            return;
        }
    }
    // Without a reader, a blocking open would wait for one for ever (the deadline fails it).
    let out = p2pcheck(
        &[OsString::from("--write-sim-lib"), fifo.clone().into()],
        &[],
    );
    held("--write-sim-lib FIFO", out.clone(), &[2]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "p2pcheck: writing {}: it is a FIFO, not a regular file\n",
            fifo.display()
        )
    );
}

#[test]
fn random_mixtures_of_arguments_never_panic() {
    let words = [
        "--json",
        "--engine",
        "vllm",
        "parallel",
        "--level",
        "copy",
        "kernel",
        "handshake",
        "--visibility",
        "one",
        "all",
        "--timeout",
        "0.5",
        "-3",
        "1e400",
        "--startup-timeout",
        "--cache-dir",
        "",
        "/",
        "--simulate",
        "2",
        "65",
        "--fault",
        "0->1:hang",
        "1->0:crash",
        "--write-vllm-cache",
        "--refresh",
        "access-check",
        "0",
        "9",
        "--kernel-bytes",
        "262144",
        "7",
        "--handshake-rounds",
        "--no-kernel-check",
        "-h",
        "-V",
        "--worker",
        "x",
    ];
    // xorshift: deterministic, no crates.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut tried = 0;
    for _ in 0..120 {
        let n = 1 + next() % 6;
        let args: Vec<&str> = (0..n)
            .map(|_| words[(next() % words.len() as u64) as usize])
            .collect();
        // Never write into the real cache folder, never a real simulated hang of 5 s.
        if args.contains(&"--write-vllm-cache") || args.contains(&"0->1:hang") {
            continue;
        }
        tried += 1;
        held(&format!("{args:?}"), p2pcheck(&os(&args), &[]), &[0, 1, 2]);
    }
    eprintln!("random argument mixtures: {tried} tried, {tried} held");
}

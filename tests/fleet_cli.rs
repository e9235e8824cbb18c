//! `p2pcheck env`, `p2pcheck exec` and the fleet formats on the simulator: a fault of each tier
//! gives its settings, the caches `env` writes are the ones `--write-vllm-cache` writes, `exec`
//! runs the command with them, and each format has its exit codes.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

use p2pcheck::json::{self, Value};

mod common;
use common::{output_within, TempDir};

/// Far beyond what any run needs, even on a loaded machine: it only proves nothing waits for
/// ever.
const LIMIT: Duration = Duration::from_secs(120);

fn p2pcheck(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pcheck"));
    cmd.args(args)
        .env("P2PCHECK_WORKER", env!("CARGO_BIN_EXE_p2pcheck-worker"))
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("NCCL_P2P_DISABLE")
        .env_remove("FORCE_NCCL_ALL_REDUCE_STRATEGY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_within(&mut cmd, LIMIT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn member<'a>(v: &'a Value, key: &str) -> &'a Value {
    match v {
        Value::Object(m) => m
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no {key:?} in {v:?}")),
        _ => panic!("not an object: {v:?}"),
    }
}

/// `env` on 3 simulated GPUs with `faults`: its stdout and exit code.
fn env_lines(faults: &[&str]) -> String {
    let mut args = vec!["env", "--simulate", "3"];
    for f in faults {
        args.extend(["--fault", f]);
    }
    let out = p2pcheck(&args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
}

fn exports(shell: &str) -> Vec<String> {
    shell
        .lines()
        .filter(|l| l.starts_with("export "))
        .map(|l| l.split("  #").next().unwrap_or(l).to_string())
        .collect()
}

#[test]
fn env_gives_each_tier_its_settings() {
    let fine = env_lines(&[]);
    assert!(exports(&fine).is_empty(), "{fine}");
    assert!(fine.contains("nothing to change"), "{fine}");

    let copy = env_lines(&["0->1:drop-writes"]);
    assert_eq!(
        exports(&copy),
        [
            "export NCCL_P2P_DISABLE=1",
            "export FORCE_NCCL_ALL_REDUCE_STRATEGY=1"
        ],
        "{copy}"
    );
    let nccl = copy
        .lines()
        .find(|l| l.contains("NCCL_P2P_DISABLE"))
        .unwrap();
    assert!(nccl.contains("copy tier failed: 0->1"), "{nccl}");
    assert!(copy.contains("--disable-custom-all-reduce"), "{copy}");

    for (fault, tier) in [
        ("1->2:sm-only", "kernel"),
        ("2->0:late-visibility", "handshake"),
    ] {
        let out = env_lines(&[fault]);
        assert_eq!(
            exports(&out),
            ["export FORCE_NCCL_ALL_REDUCE_STRATEGY=1"],
            "{out}"
        );
        let pair = &fault[..4];
        assert!(
            out.contains(&format!("{tier} tier failed: {pair}")),
            "{fault}: {out}"
        );
        assert!(out.contains("--disable-custom-all-reduce"), "{out}");
    }
}

#[test]
fn env_json_names_settings_and_causes() {
    let out = p2pcheck(
        &[
            "env",
            "--json",
            "--simulate",
            "2",
            "--fault",
            "0->1:ipc-open-fails",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json::parse(text(&out.stdout).trim()).expect("one JSON object");
    assert_eq!(member(&v, "schema"), &Value::Number("1".into()));
    assert_eq!(member(&v, "all_ok"), &Value::Bool(false));
    let Value::Array(settings) = member(&v, "settings") else {
        panic!("settings is not an array")
    };
    let names: Vec<&Value> = settings.iter().map(|s| member(s, "name")).collect();
    assert_eq!(
        names,
        [
            &Value::String("NCCL_P2P_DISABLE".into()),
            &Value::String("--disable-custom-all-reduce".into()),
            &Value::String("FORCE_NCCL_ALL_REDUCE_STRATEGY".into()),
        ]
    );
    let Value::Array(causes) = member(&settings[0], "causes") else {
        panic!("causes is not an array")
    };
    assert_eq!(member(&causes[0], "tier"), &Value::String("copy".into()));
}

#[test]
fn env_writes_the_caches_write_vllm_cache_writes() {
    let reference = TempDir::new("p2pcheck-env-ref");
    let vllm = TempDir::new("p2pcheck-env-vllm");
    let sglang = TempDir::new("p2pcheck-env-sglang");
    let faults = ["--fault", "1->0:drop-writes"];
    let r = p2pcheck(
        &[
            &["--simulate", "2", "--write-vllm-cache", "--cache-dir"][..],
            &[reference.path().to_str().unwrap()],
            &faults,
        ]
        .concat(),
        &[],
    );
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    let e = p2pcheck(
        &[
            &["env", "--simulate", "2", "--cache-dir"][..],
            &[vllm.path().to_str().unwrap(), "--sglang-cache-dir"],
            &[sglang.path().to_str().unwrap()],
            &faults,
        ]
        .concat(),
        &[],
    );
    assert_eq!(e.status.code(), Some(0), "{}", text(&e.stderr));
    let name = "gpu_p2p_access_cache_for_0,1.json";
    let want = std::fs::read(reference.path().join(name)).expect("the reference cache");
    assert!(text(&want).contains("\"1->0\": false"), "{}", text(&want));
    for dir in [&vllm, &sglang] {
        assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), want);
    }
    let shell = text(&e.stdout);
    assert!(shell.contains("# vllm's cache written: "), "{shell}");
    assert!(shell.contains("# sglang's cache written: "), "{shell}");
}

#[test]
fn env_json_stays_valid_whatever_the_cache_paths_hold() {
    // Quotes, a backslash, control characters, a JSON-looking tail and non-ASCII in the paths
    // that `caches` names (written) and quotes in its errors (not written).
    let hostile = "q\"b\\n\n\t\u{1}\"},{\"x\":[é€😀";
    let tmp = TempDir::new("p2pcheck-env-hostile");
    let vllm = tmp.path().join(hostile);
    let file = tmp.path().join(format!("{hostile}-a-file"));
    std::fs::write(&file, "not a folder").unwrap();
    let sglang = file.join("sglang");
    let out = p2pcheck(
        &[
            "env",
            "--json",
            "--simulate",
            "2",
            "--cache-dir",
            vllm.to_str().unwrap(),
            "--sglang-cache-dir",
            sglang.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let v = json::parse(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let Value::Array(caches) = member(&v, "caches") else {
        panic!("caches is not an array: {stdout}")
    };
    let string = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => panic!("not a string: {other:?} in {stdout}"),
    };
    let written = string(member(&caches[0], "path"));
    assert!(written.starts_with(vllm.to_str().unwrap()), "{written}");
    assert_eq!(member(&caches[0], "written"), &Value::Bool(true));
    let error = string(member(&caches[1], "error"));
    assert!(error.contains(hostile), "{error}");
    assert_eq!(member(&caches[1], "path"), &Value::Null);
}

#[test]
fn env_json_error_line_stays_valid_whatever_the_error_holds() {
    let hostile = "q\"b\\n\n\t\u{1}\"},{\"x\":[é€😀";
    let worker = format!("/nonexistent/{hostile}");
    let out = p2pcheck(
        &["env", "--json", "--simulate", "2"],
        &[("P2PCHECK_WORKER", &worker)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let v = json::parse(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let Value::String(error) = member(&v, "error") else {
        panic!("error is not a string: {stdout}")
    };
    assert!(error.contains(&worker), "{error}");
}

#[test]
fn exec_runs_the_command_with_the_settings() {
    let bin = TempDir::new("p2pcheck-exec");
    // A stand-in for vLLM's server: its name and `serve` make it one.
    let fake = bin.path().join("vllm");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"args: $*\"\necho \"nccl: ${NCCL_P2P_DISABLE-unset}\"\n\
         echo \"trt: ${FORCE_NCCL_ALL_REDUCE_STRATEGY-unset}\"\nexit 7\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = fake.to_str().unwrap();
    let run = |fault: &[&str]| {
        let out = p2pcheck(
            &[
                &["exec", "--simulate", "2"][..],
                fault,
                &["--", fake, "serve", "model", "--tp", "2"],
            ]
            .concat(),
            &[],
        );
        // The command's own exit code: p2pcheck became it.
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(
        run(&[]),
        "args: serve model --tp 2\nnccl: unset\ntrt: unset\n"
    );
    assert_eq!(
        run(&["--fault", "0->1:sm-only"]),
        "args: serve model --tp 2 --disable-custom-all-reduce\nnccl: unset\ntrt: 1\n"
    );
    assert_eq!(
        run(&["--fault", "0->1:drop-writes"]),
        "args: serve model --tp 2 --disable-custom-all-reduce\nnccl: 1\ntrt: 1\n"
    );
}

#[test]
fn exec_runs_nothing_when_it_could_not_check() {
    let out = p2pcheck(
        &["exec", "--simulate", "2", "--", "sh", "-c", "echo ran"],
        &[("CUDA_VISIBLE_DEVICES", "")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("was not run"),
        "{}",
        text(&out.stderr)
    );
    for bad in [&["exec", "--simulate", "2"][..], &["env", "--", "true"]] {
        assert_eq!(p2pcheck(bad, &[]).status.code(), Some(2), "{bad:?}");
    }
}

#[test]
fn prometheus_file_is_written_atomically_even_when_the_check_cannot_run() {
    let dir = TempDir::new("p2pcheck-prom");
    let file = dir.path().join("p2pcheck.prom");
    let f = file.to_str().unwrap();
    let out = p2pcheck(
        &[
            "--simulate",
            "2",
            "--fault",
            "0->1:drop-writes",
            "--format",
            "prometheus",
            "--output",
            f,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    let prom = std::fs::read_to_string(&file).unwrap();
    assert!(
        prom.contains("p2pcheck_pair_ok{src=\"0\",tgt=\"1\"} 0\n"),
        "{prom}"
    );
    assert!(prom.contains("p2pcheck_pair_tier{src=\"0\",tgt=\"1\",tier=\"copy\"} 0\n"));
    assert!(prom.contains("p2pcheck_check_success 1\n"));
    // Nothing else in the folder: the temp file was renamed over the target.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let out = p2pcheck(
        &["--simulate", "2", "--format", "prometheus", "--output", f],
        &[("CUDA_VISIBLE_DEVICES", "")],
    );
    assert_eq!(out.status.code(), Some(2));
    let prom = std::fs::read_to_string(&file).unwrap();
    assert!(prom.contains("p2pcheck_check_success 0\n"), "{prom}");
    assert!(!prom.contains("p2pcheck_pair_ok"), "{prom}");
}

#[test]
fn plugin_formats_have_their_exit_codes() {
    let code = |args: &[&str], env: &[(&str, &str)]| {
        let out = p2pcheck(&[&["--simulate", "2"][..], args].concat(), env);
        (out.status.code(), text(&out.stdout))
    };
    let (c, msg) = code(&["--format", "npd"], &[]);
    assert_eq!(
        (c, msg.as_str()),
        (Some(0), "p2pcheck: all 4 GPU pairs ok (handshake)\n")
    );
    assert_eq!(
        code(&["--format", "npd", "--fault", "0->1:sm-only"], &[]).0,
        Some(1)
    );
    assert_eq!(
        code(&["--format", "npd"], &[("CUDA_VISIBLE_DEVICES", "")]).0,
        Some(2)
    );
    assert_eq!(code(&["--format", "nagios"], &[]).0, Some(0));
    let (c, line) = code(&["--format", "nagios", "--fault", "0->1:sm-only"], &[]);
    assert_eq!(c, Some(1));
    assert!(line.starts_with("P2PCHECK WARNING - "), "{line}");
    let (c, line) = code(&["--format", "nagios", "--fault", "0->1:drop-writes"], &[]);
    assert_eq!(c, Some(2));
    assert!(line.starts_with("P2PCHECK CRITICAL - "), "{line}");
    assert_eq!(
        code(&["--format", "nagios"], &[("CUDA_VISIBLE_DEVICES", "")]).0,
        Some(3)
    );
    // Options that do not go together are refused before anything runs.
    for bad in [
        &["--json", "--format", "prometheus"][..],
        &["--output", "/tmp/x"],
        &["--format", "yaml"],
    ] {
        assert_eq!(code(bad, &[]).0, Some(2), "{bad:?}");
    }
}

#[test]
fn the_check_json_states_its_schema_version() {
    let out = p2pcheck(&["--json", "--simulate", "1"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json::parse(text(&out.stdout).trim()).expect("one JSON object");
    assert_eq!(member(&v, "schema"), &Value::Number("1".into()));
}

//! The simulated driver itself, driven from C (`tests/c/sim_driver.c`): its memory model against
//! a plain model of the bytes, across two processes; that memory holding a fill or a pattern
//! takes no memory; a handshake decided by what the other side did, never by a clock; `@once`
//! faults that hit only the first process of each check; the bandwidth measurement's modelled
//! time and its faults, through the C shim; the cuMem path (an allocation exported as a
//! descriptor, passed with SCM_RIGHTS, imported, mapped, granted access) and its faults.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use p2pcheck::sim::Simulation;

mod common;
use common::TempDir;

/// The C program and the simulator library, built once for all tests.
fn program() -> &'static (TempDir, PathBuf, PathBuf) {
    static BUILT: OnceLock<(TempDir, PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = TempDir::new("p2pcheck-sim-driver");
        let exe = dir.path().join("sim_driver");
        let out = Command::new("cc")
            .args(["-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/sim_driver.c"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc/shim.c"))
            .arg(format!("-I{}/csrc", env!("CARGO_MANIFEST_DIR")))
            .args(["-ldl", "-lpthread", "-o"])
            .arg(&exe)
            .output()
            .expect("cc");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = dir.path().join("libsim.so");
        p2pcheck::sim::write_library(&lib).unwrap();
        (dir, exe, lib)
    })
}

/// Runs the program with `args` and the simulator's `env` (1 GPU unless given), within a
/// generous deadline that only proves it ends; its stdout.
fn run(args: &[&str], env: &[(&str, &str)]) -> String {
    let (_, exe, lib) = program();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env_clear()
        .env("P2PCHECK_LIBCUDA", lib)
        .env("P2PCHECK_SIM_GPUS", "1")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} {env:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_simulated_memory_matches_a_plain_model_across_two_processes() {
    // Memsets, pattern stores (every width, shifted too), copies from the host and within the
    // allocation, over whole pages and parts of pages, by the owner and by a process mapping
    // it, each read back and pattern-checked against the model.
    for seed in ["1", "7", "2024"] {
        assert_eq!(run(&["memory", seed, "4000"], &[]), "memory ok 4000\n");
    }
}

#[test]
fn the_simulated_memory_matches_the_model_through_a_cumem_mapping_too() {
    // The same, with the memory made by cuMemCreate and mapped by both processes with
    // cuMemMap (the importer's metadata is found from the descriptor alone).
    for seed in ["3", "11"] {
        assert_eq!(
            run(&["memory", seed, "4000", "cumem"], &[]),
            "memory ok 4000\n"
        );
    }
}

#[test]
fn the_cumem_path_works_and_each_of_its_faults_breaks_its_own_step() {
    let cumem = |gpus: &str, faults: &str| {
        run(
            &["cumem"],
            &[("P2PCHECK_SIM_GPUS", gpus), ("P2PCHECK_SIM_FAULTS", faults)],
        )
    };
    // Healthy, on one GPU and across two: the importer's 2s reach the owner. On the way the C
    // program checks the rules: no access before cuMemSetAccess, no IPC handle of cuMem
    // memory, no freeing a reservation while mapped, nothing read from an unmapped one.
    assert_eq!(cumem("1", ""), "attribute 1\ncumem sees 2\n");
    assert_eq!(cumem("2", ""), "attribute 1\ncumem sees 2\n");
    // Each fault at its own call, with CUDA's code for it.
    assert_eq!(
        cumem("1", "0->0:cumem-export-fails"),
        "attribute 0\nexport rc 801\n"
    );
    assert_eq!(
        cumem("2", "0->1:cumem-import-fails"),
        "attribute 1\nimport rc 800\n"
    );
    assert_eq!(
        cumem("2", "0->1:cumem-access-fails"),
        "attribute 1\naccess rc 801\n"
    );
    // Writes through the importer's mapping vanish: the owner still sees its 1s. The path's
    // faults (drop-writes) apply to a cuMem peer mapping as to an IPC one.
    for fault in ["0->1:cumem-drop-writes", "0->1:drop-writes"] {
        assert_eq!(cumem("2", fault), "attribute 1\ncumem sees 1\n", "{fault}");
    }
    // A fault on another pair changes nothing here; the export fault names a device, so it
    // applies whatever its TGT.
    assert_eq!(
        cumem("2", "1->0:cumem-drop-writes,0->0:cumem-import-fails"),
        "attribute 1\ncumem sees 2\n"
    );
    assert_eq!(
        cumem("2", "0->0:cumem-export-fails"),
        "attribute 0\nexport rc 801\n"
    );
    // cumem-drop-writes leaves the IPC path alone: the IPC memory model still holds.
    assert_eq!(
        run(
            &["memory", "5", "1000"],
            &[("P2PCHECK_SIM_FAULTS", "0->0:cumem-drop-writes")]
        ),
        "memory ok 1000\n"
    );
    // The export fault takes no @once: refused like any invalid fault text.
    assert_eq!(
        run(
            &["count"],
            &[("P2PCHECK_SIM_FAULTS", "0->0:cumem-export-fails@once")]
        ),
        "count rc 1\n"
    );
}

#[test]
fn memory_holding_a_fill_or_a_pattern_takes_no_memory() {
    // 64 MiB set as a parallel worker's buffer is (a fill, then four patterns, checked, then
    // four others): what stays resident is the process itself, not the 64 MiB.
    let out = run(&["resident", "64"], &[]);
    let field = |key: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in {out}"))
    };
    assert!(field("resident") < 16 << 10, "{out}");
    // The checks still see every byte: none wrong against the pattern there, and against
    // another one, all but the bytes where the two agree by chance (about 1 in 256) wrong,
    // each still the old pattern.
    assert_eq!(field("right-pattern wrong"), 0);
    let stale = field("wrong-pattern stale");
    assert!((64 << 20) * 254 / 256 < stale && stale < 64 << 20, "{out}");
}

/// The two sides' lines of a handshake: (rounds done, payload errors, timed out, elapsed ns).
fn handshake(rounds: &str, budget_ns: &str, delay_ms: &str, faults: &str) -> [[u64; 4]; 2] {
    let out = run(
        &["handshake", rounds, budget_ns, delay_ms, "0"],
        &[("P2PCHECK_SIM_FAULTS", faults)],
    );
    let side = |name: &str| -> [u64; 4] {
        let line = out.lines().find_map(|l| l.strip_prefix(name)).unwrap();
        let v: Vec<u64> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        [v[0], v[1], v[2], v[3]]
    };
    [side("server "), side("driver ")]
}

#[test]
fn a_healthy_handshake_ends_by_the_other_sides_flags_never_by_a_clock() {
    // A budget of 1 ns: a wait decided by the clock would give up at once.
    for [done, errors, timed_out, _] in handshake("2000", "1", "0", "") {
        assert_eq!((done, errors, timed_out), (2000, 0, 0));
    }
    // The driver starting 300 ms late changes nothing: the server waits for its flags.
    for [done, errors, timed_out, _] in handshake("16", "1", "300", "") {
        assert_eq!((done, errors, timed_out), (16, 0, 0));
    }
    // Corrupt payload bytes are counted; the flags (bytes 0-3 of a line) arrive.
    let [server, driver] = handshake("16", "1", "0", "0->0:corrupt");
    assert_eq!(server[..3], [16, 16 * 4, 0]);
    assert_eq!(driver[..3], [16, 0, 0]);
}

#[test]
fn flags_that_can_never_arrive_end_both_waits_at_once_reporting_the_budget() {
    // A budget of an hour: both sides still end at once, each deciding from what the other
    // did (stored its flag, which cannot show; or ended), and report the hour their GPU
    // kernels would have waited.
    let hour = 3_600_000_000_000u64;
    for fault in [
        "late-visibility",
        "drop-writes",
        "sm-only",
        "shifted",
        "one-way",
    ] {
        for side in handshake("16", &hour.to_string(), "0", &format!("0->0:{fault}")) {
            assert_eq!(side, [0, 0, 1, hour], "{fault}");
        }
    }
}

#[test]
fn a_driver_that_dies_mid_handshake_ends_the_servers_wait() {
    // The driver stores round 1's flag, waits, and its process is killed; the server then
    // completes round 1 and, for round 2, knows the driver is gone.
    let out = run(
        &["handshake", "16", "3600000000000", "0", "300"],
        &[("P2PCHECK_SIM_FAULTS", "")],
    );
    assert_eq!(out, "driver killed\nserver 1 0 1 3600000000000\n");
}

#[test]
fn once_faults_hit_only_the_first_process_of_each_check() {
    let sim = Simulation {
        gpus: 1,
        faults: vec!["0->0:drop-writes@once".parse().unwrap()],
    };
    // Three fresh processes write 2 over 1 through the mapping, one after the other: the
    // first one's writes vanish (it claimed the fault), the later ones' land.
    let writers = |env: &p2pcheck::sim::WorkerEnv| {
        let vars: Vec<(&str, &str)> = env
            .vars
            .iter()
            .filter(|(k, _)| k.starts_with("P2PCHECK_SIM_"))
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        run(&["once", "3"], &vars)
    };
    let first_check = sim.worker_env().unwrap();
    assert_eq!(
        writers(&first_check),
        "writer 1 sees 1\nwriter 2 sees 2\nwriter 3 sees 2\n"
    );
    // The same check's ledger: its first attempt is over, nobody sees the fault.
    assert_eq!(
        writers(&first_check),
        "writer 1 sees 2\nwriter 2 sees 2\nwriter 3 sees 2\n"
    );
    // A new check: a new ledger, the fault fires again.
    let second_check = sim.worker_env().unwrap();
    assert_eq!(
        writers(&second_check),
        "writer 1 sees 1\nwriter 2 sees 2\nwriter 3 sees 2\n"
    );
    // Without a ledger an @once fault cannot be honoured: every call fails (invalid value).
    assert_eq!(
        run(
            &["count"],
            &[("P2PCHECK_SIM_FAULTS", "0->0:drop-writes@once")]
        ),
        "count rc 1\n"
    );
}

/// `sim_driver bandwidth 1` with `faults`: per figure (GB/s, held, wrong bytes), and latency.
fn bandwidth(faults: &str) -> (Vec<(String, [u64; 3])>, u64) {
    let out = run(
        &["bandwidth", "1"],
        &[("P2PCHECK_SIM_GPUS", "2"), ("P2PCHECK_SIM_FAULTS", faults)],
    );
    let mut figures = Vec::new();
    let mut latency = None;
    for line in out.lines() {
        let v: Vec<&str> = line.split_whitespace().collect();
        match v.as_slice() {
            ["latency", ns] => latency = ns.parse().ok(),
            [name, rest @ ..] if rest.len() == 3 => {
                let n: Vec<u64> = rest.iter().map(|x| x.parse().unwrap()).collect();
                figures.push((name.to_string(), [n[0], n[1], n[2]]));
            }
            _ => panic!("unexpected line {line:?} in {out}"),
        }
    }
    (figures, latency.expect("a latency line"))
}

#[test]
fn timed_copies_take_the_modelled_time_and_a_fast_wrong_copy_leaves_wrong_bytes() {
    // Two GPUs: NVLink's 370 GB/s one way, both ways at once twice that (two streams, full
    // duplex); every spin released by the host; every byte right.
    let (figures, latency) = bandwidth("");
    let got: Vec<(&str, [u64; 3])> = figures.iter().map(|(n, f)| (n.as_str(), *f)).collect();
    assert_eq!(
        got,
        [
            ("ce-write", [370, 1, 0]),
            ("sm-read", [370, 1, 0]),
            ("ce-both", [740, 1, 0])
        ]
    );
    assert_eq!(latency, 900);
    // slow: the path through the host, 20 GB/s, the bytes still right.
    let (figures, latency) = bandwidth("0->1:slow");
    assert!(
        figures.iter().all(|(_, f)| f[0] <= 40 && f[2] == 0),
        "{figures:?}"
    );
    assert_eq!(latency, 3000);
    // fast-wrong: NVLink's speed, and every destination byte still the old pattern (but the
    // few where two patterns agree by chance).
    let (figures, _) = bandwidth("0->1:fast-wrong");
    for (name, [gbps, _, wrong]) in &figures {
        let bytes: u64 = if name.ends_with("both") {
            2 << 20
        } else {
            1 << 20
        };
        assert!(*gbps >= 370, "{name}: {gbps}");
        assert!(
            wrong * 256 > bytes * 250,
            "{name}: {wrong} of {bytes} wrong"
        );
    }
}

//! Processes racing on a cold vLLM cache file compute it exactly once.
//!
//! The test re-runs this test binary as several child processes, each running only
//! [`race_child`] (which does nothing unless `RACER_ENV` is set), and counts how often their
//! compute closures ran.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p2pcheck::cache::{self, Origin};

/// Set (to the race's directory) in the children: makes [`race_child`] race.
const RACER_ENV: &str = "P2PCHECK_TEST_CACHE_RACER_DIR";
/// The moment, in ms since the epoch, the children start racing, so that they really overlap.
const START_ENV: &str = "P2PCHECK_TEST_CACHE_RACER_START_MS";
const RACERS: usize = 4;
const N: usize = 3;

/// The verdicts every racer computes: a pattern, to catch any mix-up of pairs.
fn verdicts() -> Vec<bool> {
    (0..N * N).map(|k| k % 4 != 1).collect()
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// One racer, when run as a child by [`processes_racing_on_a_cold_cache_compute_once`].
#[test]
fn race_child() {
    let Some(dir) = std::env::var_os(RACER_ENV).map(PathBuf::from) else {
        eprintln!(
            "race_child: skipped, {RACER_ENV} is not set \
             (it runs as a child of processes_racing_on_a_cold_cache_compute_once)"
        );
        return;
    };
    let start: u128 = std::env::var(START_ENV).unwrap().parse().unwrap();
    if let Some(wait) = start.checked_sub(now_ms()) {
        std::thread::sleep(Duration::from_millis(wait as u64));
    }
    let path = dir.join(cache::file_name("0,1,2"));
    let loaded = cache::load_or_compute(&path, N, Duration::from_secs(30), || {
        let mut counter = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("computed"))?;
        writeln!(counter, "{}", std::process::id())?; // one small O_APPEND write: atomic
        std::thread::sleep(Duration::from_millis(200)); // long enough for the others to pile up
        Ok(verdicts())
    })
    .unwrap();
    let origin = match loaded.origin {
        Origin::Computed => "computed",
        Origin::File => "file",
        other => panic!("unexpected origin {other:?}"),
    };
    println!("RACER {origin} {:?}", loaded.verdicts);
}

#[test]
fn processes_racing_on_a_cold_cache_compute_once() {
    if std::env::var_os(RACER_ENV).is_some() {
        return; // we are a child; only race_child runs there anyway
    }
    let dir = std::env::temp_dir().join(format!("p2pcheck-cache-lock-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let start = now_ms() + 300;
    let children: Vec<_> = (0..RACERS)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "race_child", "--nocapture", "--test-threads=1"])
                .env(RACER_ENV, &dir)
                .env(START_ENV, start.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut results = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "a racer failed: {}\n{stdout}\n{stderr}",
            out.status
        );
        let line = stdout
            .lines()
            // libtest may print "test race_child ... " just before it on the same line.
            .find_map(|l| l.split_once("RACER ").map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("a racer did not race:\n{stdout}\n{stderr}"))
            .to_string();
        results.push(line);
    }
    let computed = fs::read_to_string(dir.join("computed")).unwrap();
    assert_eq!(
        computed.lines().count(),
        1,
        "computed more than once (pids):\n{computed}"
    );
    let expected = format!("{:?}", verdicts());
    assert_eq!(
        results
            .iter()
            .filter(|r| r.starts_with("computed "))
            .count(),
        1,
        "{results:?}"
    );
    for r in &results {
        assert_eq!(r.split_once(' ').unwrap().1, expected, "{results:?}");
    }
    let text = fs::read_to_string(dir.join(cache::file_name("0,1,2"))).unwrap();
    assert_eq!(text, cache::render(N, &verdicts()));
    fs::remove_dir_all(&dir).unwrap();
}

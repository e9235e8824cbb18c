//! Never a stale or torn answer: vLLM's cache file and p2pcheck's fingerprint beside it answer
//! together only when the fingerprint vouches for exactly the verdicts the file holds, at the
//! level and with the settings asked for.
//!
//! The scenario throughout is the simulator's `sm-only` fault on `0->1`: the copy engines reach
//! the peer, SM loads and stores do not. A copy-level check finds `0->1` true, a handshake-level
//! check false; so a handshake-level answer of true can only come from pairing a copy-level
//! write's verdicts with a handshake-level fingerprint, or from ignoring the level.
//!
//! The first three tests drive the cache API with crafted fingerprints and a "check" that
//! returns the level's truth at once, so they run thousands of reads in a fraction of a second;
//! the later ones run the real check on the simulator, through the library and the CLI.

mod common;
#[path = "common/crafted.rs"]
mod crafted;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TempDir;
use p2pcheck::cache::{self, Ask, Computed, Origin, Trust};
use p2pcheck::fingerprint::{self, Fingerprint, Record};
use p2pcheck::sim::{Fault, Simulation};
use p2pcheck::{AccessOptions, Level, Options};

const WORKER: &str = env!("CARGO_BIN_EXE_p2pcheck-worker");
const CLI: &str = env!("CARGO_BIN_EXE_p2pcheck");

/// What a copy-level check finds with `0->1:sm-only`: every pair true.
const COPY: [bool; 4] = [true; 4];
/// What a handshake-level check finds: `0->1` false.
const HANDSHAKE: [bool; 4] = [true, false, true, true];

/// The conditions of a check at `level` on a two-GPU machine (as crafted as the verdicts).
fn now(level: &str) -> Fingerprint {
    crafted::crafted_fingerprint(level)
}

/// The truth at `level`.
fn truth(level: &str) -> [bool; 4] {
    if level == "copy" {
        COPY
    } else {
        HANDSHAKE
    }
}

fn file(dir: &Path) -> PathBuf {
    dir.join(cache::file_name("0,1"))
}

/// One reader: the verdicts `load_or_check` gives at `level`, where the check (counted in
/// `checks`) finds the level's truth and writes it.
fn read_at(dir: &Path, level: &str, checks: &AtomicUsize) -> cache::Loaded {
    let ask = Ask {
        refresh: false,
        trust: Trust::default(),
        lock_timeout: Duration::from_secs(60),
    };
    cache::load_or_check(&file(dir), &now(level), &ask, || {
        checks.fetch_add(1, Ordering::SeqCst);
        Ok(Computed {
            verdicts: truth(level).to_vec(),
            not_persisted: None,
        })
    })
    .unwrap()
}

/// One write of the level's truth with its fingerprint, as `store_report` makes it.
fn write_at(dir: &Path, level: &str) {
    cache::store_checked(&file(dir), &now(level), &truth(level), Trust::default()).unwrap();
}

/// The bytes each part of a write puts on disk at `level`.
fn cache_bytes(level: &str) -> String {
    cache::render(2, &truth(level))
}
fn fingerprint_bytes(level: &str) -> String {
    Record {
        fingerprint: now(level),
        verdicts: truth(level).to_vec(),
    }
    .render()
}

/// Which write the files in `dir` come from: `copy`, `handshake` or `-` each.
fn on_disk(dir: &Path) -> (String, String) {
    let which = |path: PathBuf, render: fn(&str) -> String| {
        let bytes = fs::read_to_string(path).unwrap_or_default();
        ["copy", "handshake"]
            .into_iter()
            .find(|l| render(l) == bytes)
            .unwrap_or("-")
            .to_string()
    };
    (
        which(file(dir), cache_bytes),
        which(fingerprint::path_beside(&file(dir)), fingerprint_bytes),
    )
}

/// Every state a write can leave when its process is killed between two of its steps, and
/// every mix of two writes of different levels: the cache file and the fingerprint each from
/// no write, a copy-level one or a handshake-level one (each is replaced by a rename, so it is
/// always one write's whole file), with or without the temp file a killed writer was filling
/// (`store_checked`'s steps: take the lock, fill the fingerprint's temp file, rename it, fill
/// the cache file's temp file, rename it, let go). In each, a reader at each level answers only
/// what its level verified: from the file only where both parts come from a write of its
/// level, else from its own check.
#[test]
fn every_state_a_killed_or_racing_writer_leaves_answers_only_what_the_level_verified() {
    let parts = [None, Some("copy"), Some("handshake")];
    let mut states = 0;
    for f in parts {
        for p in parts {
            for temp in [None, Some("cache"), Some("fingerprint")] {
                for reader in ["copy", "handshake"] {
                    let tmp = TempDir::new("p2pcheck-states");
                    let dir = tmp.path();
                    let beside = fingerprint::path_beside(&file(dir));
                    if let Some(level) = f {
                        fs::write(file(dir), cache_bytes(level)).unwrap();
                    }
                    if let Some(level) = p {
                        fs::write(&beside, fingerprint_bytes(level)).unwrap();
                    }
                    // A killed writer's half-filled temp file (and its lock, holding its pid).
                    let half = match temp {
                        Some("cache") => Some((file(dir), cache_bytes("handshake"))),
                        Some(_) => Some((beside.clone(), fingerprint_bytes("handshake"))),
                        None => None,
                    };
                    if let Some((of, bytes)) = &half {
                        let name = of.file_name().unwrap().to_string_lossy().into_owned();
                        let left = dir.join(format!(".{name}.tmp.999999.0.0"));
                        fs::write(left, &bytes[..bytes.len() / 2]).unwrap();
                        fs::write(cache::lock_path(&file(dir)), "999999\n").unwrap();
                    }
                    let checks = AtomicUsize::new(0);
                    let got = read_at(dir, reader, &checks);
                    let state = format!("file {f:?}, fingerprint {p:?}, temp {temp:?}");
                    assert_eq!(got.verdicts, truth(reader), "{reader} reader, {state}");
                    let whole = f == Some(reader) && p == Some(reader);
                    assert_eq!(
                        got.origin == Origin::File,
                        whole,
                        "{reader} reader, {state}: {:?}",
                        got.origin
                    );
                    assert_eq!(checks.load(Ordering::SeqCst), usize::from(!whole));
                    // A check leaves one whole write of the reader's level behind it.
                    let unit = (reader.to_string(), reader.to_string());
                    assert_eq!(on_disk(dir), unit, "{reader} reader, {state}");
                    states += 1;
                }
            }
        }
    }
    assert_eq!(states, 54);
}

/// Set in the child of the next test: the folder it writes in, forever, until killed.
const WRITER_ENV: &str = "P2PCHECK_TEST_CACHE_WRITER_DIR";

/// The writer child: writes copy-level and handshake-level verdicts by turns, as fast as it
/// can, and says so after its first write.
#[test]
fn writer_child() {
    let Some(dir) = std::env::var_os(WRITER_ENV).map(PathBuf::from) else {
        eprintln!("writer_child: skipped, {WRITER_ENV} is not set (it is a child of a test)");
        return;
    };
    // Killed long before; the deadline only bounds a child whose parent died first.
    let end = Instant::now() + Duration::from_secs(20);
    for k in 0u64.. {
        write_at(&dir, if k % 2 == 0 { "copy" } else { "handshake" });
        if k == 0 {
            println!("WRITING");
        }
        if Instant::now() >= end {
            return;
        }
    }
}

/// A child process, SIGKILLed and reaped when dropped (also when a test fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real writer process SIGKILLed at varied moments while it rewrites the cache: after each
/// kill, whatever it left, a handshake-level reader answers `0->1` false and a copy-level one
/// true.
#[test]
fn a_writer_killed_at_varied_moments_never_leaves_an_answer_its_level_did_not_verify() {
    if std::env::var_os(WRITER_ENV).is_some() {
        return;
    }
    let tmp = TempDir::new("p2pcheck-killed-writer");
    let dir = tmp.path();
    let mut seen = BTreeSet::new();
    for k in 0..10u64 {
        let mut child = Killed(
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
                .env(WRITER_ENV, dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
        assert!(
            lines.any(|l| l.is_ok_and(|l| l.contains("WRITING"))),
            "the writer did not start"
        );
        // 0 to 3 ms into its writes: a kill lands anywhere in a write.
        std::thread::sleep(Duration::from_micros(k * 300));
        drop(child); // SIGKILL, reaped
        seen.insert(on_disk(dir));
        let checks = AtomicUsize::new(0);
        for reader in ["handshake", "copy"] {
            let got = read_at(dir, reader, &checks);
            assert_eq!(
                got.verdicts,
                truth(reader),
                "{reader} reader after kill {k}"
            );
        }
    }
    println!("states left by the killed writer (cache file, fingerprint): {seen:?}");
}

/// Three readers at the handshake level race a writer that rewrites copy-level verdicts in a
/// loop (and a copy-level reader races them all): every handshake-level answer is `0->1`
/// false, every copy-level one true, whichever files each read paired.
#[test]
fn readers_racing_a_writer_of_another_level_answer_only_their_own_level() {
    let tmp = TempDir::new("p2pcheck-racing-readers");
    let dir = tmp.path();
    let stop = AtomicBool::new(false);
    let (writes, reads, checks) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                write_at(dir, "copy");
                writes.fetch_add(1, Ordering::SeqCst);
                // As a writer that checks between its writes: the lock is free meanwhile.
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let readers: Vec<_> = ["handshake", "handshake", "handshake", "copy"]
            .into_iter()
            .map(|level| {
                let (reads, checks) = (&reads, &checks);
                s.spawn(move || {
                    let end = Instant::now() + Duration::from_millis(1500);
                    let mut wrong = Vec::new();
                    loop {
                        let got = read_at(dir, level, checks);
                        reads.fetch_add(1, Ordering::SeqCst);
                        if got.verdicts != truth(level) {
                            wrong.push(got);
                        }
                        if Instant::now() >= end {
                            return wrong;
                        }
                    }
                })
            })
            .collect();
        let joined: Vec<_> = readers.into_iter().map(|r| r.join()).collect();
        stop.store(true, Ordering::SeqCst); // before any panic, so the writer ends
        let wrong: Vec<_> = joined.into_iter().flat_map(Result::unwrap).collect();
        assert!(
            wrong.is_empty(),
            "answers their level did not verify: {wrong:?}"
        );
    });
    println!(
        "{} copy-level writes; {} reads, {} of them checked again",
        writes.load(Ordering::SeqCst),
        reads.load(Ordering::SeqCst),
        checks.load(Ordering::SeqCst)
    );
    assert!(writes.load(Ordering::SeqCst) > 0);
}

/// The simulated machine with `0->1:sm-only`, and a worker to check it. The handshake's
/// budget is short: on the sm-only pair it runs out (the kernel tier has already failed it),
/// and whether another pair's handshake fits it changes no assertion here.
fn sm_only(level: Level) -> Options {
    Options {
        level,
        handshake_budget: Duration::from_millis(100),
        worker: Some(WORKER.into()),
        simulate: Some(Simulation {
            gpus: 2,
            faults: vec!["0->1:sm-only".parse::<Fault>().unwrap()],
        }),
        ..Options::default()
    }
}

/// The same with the real check: a copy-level report, written again and again through
/// `store_report` (as `p2pcheck --level copy --write-vllm-cache` does), raced by three readers
/// that each run `p2pcheck access-check 0 1` at the default (handshake) level in fresh
/// processes, for half a second (each check takes longer: about one each): every answer is
/// `false`.
#[test]
fn cli_readers_racing_a_copy_level_writer_on_the_simulator_answer_false() {
    let tmp = TempDir::new("p2pcheck-racing-cli");
    let dir = tmp.path();
    let copy = AccessOptions {
        check: sm_only(Level::Copy),
        cache_dir: Some(dir.to_path_buf()),
        ..AccessOptions::default()
    };
    let report = p2pcheck::check(None, &copy.check).unwrap();
    assert!(
        report.get(0, 1).unwrap().ok(),
        "the copy level cannot see sm-only"
    );
    let stop = AtomicBool::new(false);
    let writes = AtomicUsize::new(0);
    let answers: Vec<String> = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                p2pcheck::store_report(&report, &copy).unwrap();
                writes.fetch_add(1, Ordering::SeqCst);
            }
        });
        let readers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let end = Instant::now() + Duration::from_millis(500);
                    let mut answers = Vec::new();
                    loop {
                        let out = Command::new(CLI)
                            .args(["access-check", "0", "1", "--json", "--simulate", "2"])
                            .args(["--fault", "0->1:sm-only", "--cache-dir"])
                            .arg(dir)
                            .env("P2PCHECK_WORKER", WORKER)
                            .env_remove("CUDA_VISIBLE_DEVICES")
                            .output()
                            .unwrap();
                        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                        assert_eq!(
                            out.status.code(),
                            Some(0),
                            "{stdout}{}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        answers.push(stdout);
                        if Instant::now() >= end {
                            return answers;
                        }
                    }
                })
            })
            .collect();
        let joined: Vec<_> = readers.into_iter().map(|r| r.join()).collect();
        stop.store(true, Ordering::SeqCst); // before any panic, so the writer ends
        joined.into_iter().flat_map(Result::unwrap).collect()
    });
    assert!(writes.load(Ordering::SeqCst) > 0);
    assert!(answers.len() >= 3);
    for a in &answers {
        assert!(
            a.starts_with("{\"src\":0,\"tgt\":1,\"answer\":false,"),
            "{a}"
        );
    }
}

/// Issue 16: the in-process memo answers only a question asked with the same options. A check
/// where `0->1` fails, then, in the same process and folder, one on a machine without the
/// fault, one at another level and one with other settings: each answers from its own check,
/// and a repeated question from the memo.
#[test]
fn the_memo_answers_only_questions_asked_with_the_same_options() {
    let tmp = TempDir::new("p2pcheck-memo");
    let ask = |check: Options| {
        let opts = AccessOptions {
            check,
            cache_dir: Some(tmp.path().to_path_buf()),
            ..AccessOptions::default()
        };
        let access = p2pcheck::access_check(0, 1, &opts).unwrap();
        (access.answer, access.origin)
    };
    let (answer, origin) = ask(sm_only(Level::Handshake));
    assert!(!answer);
    assert_eq!(origin, Origin::Computed);
    let healthy = Options {
        handshake_budget: Options::default().handshake_budget,
        simulate: Some(Simulation {
            gpus: 2,
            faults: Vec::new(),
        }),
        ..sm_only(Level::Handshake)
    };
    let (answer, origin) = ask(healthy.clone());
    assert!(answer, "{origin:?}");
    assert!(
        matches!(&origin, Origin::Recomputed { reason } if reason.contains("faults=0->1:sm-only")),
        "{origin:?}"
    );
    let fewer_rounds = Options {
        handshake_rounds: 4,
        ..healthy.clone()
    };
    let (answer, origin) = ask(fewer_rounds);
    assert!(answer);
    assert!(
        matches!(&origin, Origin::Recomputed { reason } if reason.contains("handshake_rounds=4")),
        "{origin:?}"
    );
    let (answer, origin) = ask(sm_only(Level::Copy));
    assert!(answer, "the copy level cannot see sm-only: {origin:?}");
    assert!(
        matches!(&origin, Origin::Recomputed { reason } if reason.contains("level")),
        "{origin:?}"
    );
    // Each asked again: its own answer, from the memo.
    assert_eq!(ask(sm_only(Level::Handshake)), (false, Origin::Memo));
    assert_eq!(ask(healthy), (true, Origin::Memo));
    assert_eq!(ask(sm_only(Level::Copy)), (true, Origin::Memo));
}

/// Set in the child of the next test.
const UNNAMED_ENV: &str = "P2PCHECK_TEST_UNNAMED_LEVEL";

/// The child: `access_check(0, 1)` at the level named in its environment, on the simulated
/// driver loaded as libcuda (so the GPUs cannot be named from /proc/driver/nvidia).
#[test]
fn unnamed_child() {
    let Some(level) = std::env::var_os(UNNAMED_ENV) else {
        eprintln!("unnamed_child: skipped, {UNNAMED_ENV} is not set (it is a child of a test)");
        return;
    };
    let level: Level = level.to_str().unwrap().parse().unwrap();
    let opts = AccessOptions {
        check: Options {
            level,
            ..Options::default()
        },
        ..AccessOptions::default()
    };
    let access = p2pcheck::access_check(0, 1, &opts).unwrap();
    println!("ANSWER {} {:?}", access.answer, access.origin);
}

/// Without /proc/driver/nvidia (the GPUs counted by the driver, not named): a file vLLM wrote
/// (no fingerprint) answers a copy-level question, as vLLM trusts it, but never a
/// handshake-level one; a fingerprint that confirms the level and the verdicts lets it answer;
/// one of another level does not.
#[test]
fn without_proc_nvidia_a_level_above_copy_needs_a_fingerprint_that_confirms_it() {
    if std::env::var_os(UNNAMED_ENV).is_some() {
        return;
    }
    if Path::new("/proc/driver/nvidia").exists() {
        eprintln!("skipped: this machine has /proc/driver/nvidia, so its GPUs are named");
        return;
    }
    let tmp = TempDir::new("p2pcheck-unnamed");
    let dir = tmp.path();
    let lib = dir.join("libsim.so");
    p2pcheck::sim::write_library(&lib).unwrap();
    let cache = dir.join("cache");
    let run = |level: &str| {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "unnamed_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(UNNAMED_ENV, level)
            .env("P2PCHECK_WORKER", WORKER)
            .env("P2PCHECK_LIBCUDA", &lib)
            .env("P2PCHECK_LIBCUDART", &lib)
            .env("P2PCHECK_SIM_GPUS", "2")
            .env("P2PCHECK_SIM_FAULTS", "0->1:sm-only")
            .env("VLLM_CACHE_ROOT", &cache)
            .env_remove("CUDA_VISIBLE_DEVICES")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .find_map(|l| l.split_once("ANSWER ").map(|(_, a)| a.to_string()))
            .unwrap_or_else(|| panic!("no answer: {stdout}"))
    };
    let path = file(&cache);
    let beside = fingerprint::path_beside(&path);
    // vLLM's own check wrote the file: all true (the copy engines work).
    fs::create_dir(&cache).unwrap();
    fs::write(&path, cache::render(2, &COPY)).unwrap();
    assert_eq!(run("copy"), "true File");
    let answer = run("handshake");
    assert!(answer.starts_with("false Recomputed"), "{answer}");
    assert!(answer.contains("nothing confirms that it holds handshake-level verdicts"));
    let record = Record::parse(&fs::read_to_string(&beside).unwrap()).unwrap();
    assert_eq!(
        (record.fingerprint.devices, record.fingerprint.gpus.len()),
        (2, 0)
    );
    assert_eq!(record.verdicts, HANDSHAKE);
    // Confirmed by the fingerprint: answered from the file, with no check.
    assert_eq!(run("handshake"), "false File");
    // A copy-level question is not answered by a handshake-level fingerprint.
    let answer = run("copy");
    assert!(answer.starts_with("true Recomputed"), "{answer}");
    assert!(answer.contains("check level handshake -> copy"), "{answer}");
    // …and the copy-level write (the fingerprint first) answers no handshake question.
    let answer = run("handshake");
    assert!(answer.starts_with("false Recomputed"), "{answer}");
}

/// A requested write that cannot be done is an error, never a warning: a folder that cannot
/// be created, and a report whose options say another level.
#[test]
fn a_cache_write_that_fails_is_an_error() {
    let tmp = TempDir::new("p2pcheck-store-fails");
    let plain = tmp.path().join("plain");
    fs::write(&plain, "").unwrap();
    let copy = AccessOptions {
        check: sm_only(Level::Copy),
        cache_dir: Some(plain.join("sub")),
        ..AccessOptions::default()
    };
    let report = p2pcheck::check(None, &copy.check).unwrap();
    let err = p2pcheck::store_report(&report, &copy)
        .unwrap_err()
        .to_string();
    assert!(err.contains("plain/sub is not a folder"), "{err}");
    let other = AccessOptions {
        check: sm_only(Level::Handshake),
        cache_dir: Some(tmp.path().join("cache")),
        ..AccessOptions::default()
    };
    let err = p2pcheck::store_report(&report, &other)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checked at level copy"), "{err}");
    assert!(!tmp.path().join("cache").exists());
}

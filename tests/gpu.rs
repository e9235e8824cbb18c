//! Tests on real GPUs. They are `#[ignore]`d, so a plain `cargo test` lists them as ignored
//! (never as passed); the GPU run (scripts/gpu-run.sh) runs them with `--ignored` and
//! `P2PCHECK_GPU_TESTS=1`, and there a missing GPU or driver is a failure.

use std::path::PathBuf;

use p2pcheck::{all_pairs, Engine, Level, Options, TierOutcome};

mod common;
use common::worker_children;

/// Refuses to run by accident: `--ignored` alone (without the variable) fails loudly rather
/// than testing a machine that was not meant to be tested.
fn require_gpu_run() {
    assert!(
        std::env::var("P2PCHECK_GPU_TESTS").is_ok_and(|v| v == "1"),
        "GPU tests need P2PCHECK_GPU_TESTS=1 on a machine with NVIDIA GPUs"
    );
}

/// The worker: `$P2PCHECK_WORKER` where set (the binaries were moved to the GPU machine), else
/// the one cargo built beside this test.
fn worker() -> PathBuf {
    std::env::var_os("P2PCHECK_WORKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_p2pcheck-worker")))
}

fn options() -> Options {
    Options {
        worker: Some(worker()),
        ..Options::default()
    }
}

#[test]
#[ignore = "needs NVIDIA GPUs: run with --ignored and P2PCHECK_GPU_TESTS=1"]
fn every_pair_of_the_visible_gpus_passes_both_tiers_in_both_engines() {
    require_gpu_run();
    for engine in [Engine::Parallel, Engine::Vllm] {
        let opts = Options {
            engine,
            ..options()
        };
        let pending = p2pcheck::start(None, opts);
        let report = pending.wait().expect("the check runs on this GPU machine");
        let n = report.device_count;
        assert!(n >= 1);
        assert_eq!(report.pairs.len() as u32, n * n);
        assert_eq!(report.restarts, 0, "{engine:?}");
        for (p, expected) in report.pairs.iter().zip(all_pairs(n)) {
            assert_eq!(p.pair, expected, "pairs come back in batch order");
            assert!(p.ok(), "{engine:?} {}: {:?}", p.pair, p.details());
            assert_eq!(p.kernel(), TierOutcome::Ok);
            assert_eq!(p.handshake(), TierOutcome::Ok);
            assert_eq!(p.attempts, 1);
            // The claim is asked where the consumer sees both GPUs; an H200 machine's driver
            // claims every pair.
            assert_ne!(p.claim(), Some(false), "{engine:?} {}", p.pair);
        }
        if engine == Engine::Parallel {
            assert_eq!(
                report.visibility,
                p2pcheck::Visibility::One,
                "{:?}",
                report.warnings
            );
            assert!(report.workers.iter().all(|w| w.sees == Some(1)));
            assert_eq!(
                report.workers_started,
                2 * n,
                "one per GPU plus one per same-GPU pair"
            );
            assert!(report.peak_in_flight >= n, "pairs run at once");
        }
        pending.finish();
        assert!(worker_children().is_empty(), "no worker left behind");
    }
}

#[test]
#[ignore = "needs NVIDIA GPUs: run with --ignored and P2PCHECK_GPU_TESTS=1"]
fn exact_vllm_mode_and_batch_order() {
    require_gpu_run();
    let n = p2pcheck::visible_device_count().expect("driver answers");
    // A batch in an unusual order, with repeats: answers come back in the same order.
    let src: Vec<u32> = (0..n).rev().chain(0..n).collect();
    let tgt: Vec<u32> = (0..n).chain(0..n).collect();
    for engine in [Engine::Vllm, Engine::Parallel] {
        let opts = Options {
            engine,
            level: Level::Copy,
            ..options()
        };
        let report = p2pcheck::can_actually_p2p_with(&src, &tgt, &opts).expect("check runs");
        for (i, p) in report.pairs.iter().enumerate() {
            assert_eq!((p.pair.src, p.pair.tgt), (src[i], tgt[i]));
            assert_eq!(p.copy_ok(), Some(true));
            assert_eq!(p.kernel(), TierOutcome::NotRun);
        }
    }
    let err = p2pcheck::can_actually_p2p(&[n], &[0]).unwrap_err();
    assert!(format!("{err:#}").contains("cannot see"), "{err:#}");
}

#[test]
#[ignore = "needs NVIDIA GPUs: run with --ignored and P2PCHECK_GPU_TESTS=1"]
fn gpu_p2p_access_check_writes_vllms_cache_once() {
    require_gpu_run();
    let tmp = common::TempDir::new("p2pcheck-gpu-test");
    let dir = tmp.path().to_path_buf();
    std::env::set_var("VLLM_CACHE_ROOT", &dir);
    std::env::set_var("P2PCHECK_WORKER", worker());
    let n = p2pcheck::visible_device_count().unwrap();
    assert!(p2pcheck::gpu_p2p_access_check(0, n - 1).unwrap());
    let path = p2pcheck::vllm_cache_path(n).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        p2pcheck::cache::render(n as usize, &vec![true; (n * n) as usize])
    );
    // Memo and file answer now; the file is not rewritten.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    assert!(p2pcheck::gpu_p2p_access_check(n - 1, 0).unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    // The fingerprint beside it names this machine's GPUs.
    let beside = p2pcheck::fingerprint::path_beside(&path);
    let record =
        p2pcheck::fingerprint::Record::parse(&std::fs::read_to_string(&beside).unwrap()).unwrap();
    assert_eq!(record.verdicts, vec![true; (n * n) as usize]);
    let fp = record.fingerprint;
    assert_eq!(fp.gpus.len() as u32, n);
    assert!(fp.gpus.iter().all(|g| g.uuid.starts_with("GPU-")));
}

#[test]
#[ignore = "needs NVIDIA GPUs: run with --ignored and P2PCHECK_GPU_TESTS=1"]
fn a_worker_killed_mid_run_is_retried_not_persisted_and_leaves_nothing() {
    require_gpu_run();
    // A long batch (pair 0->0 twelve times, about 0.15 s each after start-up), and a killer
    // thread that SIGKILLs the consumer once the batch is under way.
    let src = [0u32; 12];
    let tgt = [0u32; 12];
    let killer = std::thread::spawn(|| {
        let started = std::time::Instant::now();
        loop {
            let workers = worker_children();
            if workers.len() == 2 && started.elapsed() > std::time::Duration::from_millis(900) {
                let consumer = *workers.iter().max().unwrap(); // spawned second
                                                               // SAFETY: SIGKILL to a child process of this test.
                unsafe { libc::kill(consumer as i32, libc::SIGKILL) };
                return consumer;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "no workers seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    });
    let pairs: Vec<p2pcheck::Pair> = src
        .iter()
        .zip(&tgt)
        .map(|(&src, &tgt)| p2pcheck::Pair { src, tgt })
        .collect();
    let opts = Options {
        engine: Engine::Vllm,
        ..options()
    };
    let pending = p2pcheck::start(Some(pairs), opts);
    let report = pending.wait().expect("check runs");
    let killed = killer.join().unwrap();
    let retried: Vec<_> = report.pairs.iter().filter(|p| p.attempts == 2).collect();
    eprintln!(
        "killed consumer {killed}; verdicts: {:?}",
        report.pairs.iter().map(|p| p.details()).collect::<Vec<_>>()
    );
    assert_eq!(report.pairs.len(), 12, "every pair accounted for");
    assert_eq!(retried.len(), 1, "exactly the pair in flight was retried");
    // The killed attempt gives the verdict (an error that did not repeat is no pass), and it
    // is not a fact: nothing of this run may be persisted.
    let why = retried[0].verdict().reason().to_string();
    assert!(why.contains("SIGKILL"), "{why}");
    assert_eq!(retried[0].evidence, p2pcheck::Evidence::Error);
    assert!(!report.persistable());
    assert_eq!(report.restarts, 1);
    assert!(
        report
            .pairs
            .iter()
            .filter(|p| p.attempts == 1)
            .all(|p| p.ok()),
        "the other pairs pass"
    );
    pending.finish();
    assert!(worker_children().is_empty(), "no worker left behind");
}

#[test]
#[ignore = "needs NVIDIA GPUs: run with --ignored and P2PCHECK_GPU_TESTS=1"]
fn a_planted_shifted_store_is_caught_by_the_kernel_tier_as_wrong_data() {
    require_gpu_run();
    // The test switch, read by the check in this process (the GPU tests run one at a time:
    // --test-threads=1); removed again at the end.
    std::env::set_var("P2PCHECK_TEST_PLANT_SHIFTED_STORES", "1");
    for engine in [Engine::Parallel, Engine::Vllm] {
        let opts = Options {
            engine,
            ..options()
        };
        let report = p2pcheck::check(None, &opts).expect("the check runs");
        for p in &report.pairs {
            assert_eq!(
                p.copy_ok(),
                Some(true),
                "{engine:?} {}: the copy tier cannot see it",
                p.pair
            );
            assert_eq!(
                p.failed_tier(),
                Some(Level::Kernel),
                "{engine:?} {}",
                p.pair
            );
            let TierOutcome::Failed(why) = p.kernel() else {
                panic!("{engine:?} {}: {:?}", p.pair, p.kernel())
            };
            assert_eq!(why.class(), p2pcheck::Class::WrongData, "{why}");
            eprintln!("{engine:?} {}: {why}", p.pair);
        }
    }
    std::env::remove_var("P2PCHECK_TEST_PLANT_SHIFTED_STORES");
}

//! Tests on real GPUs. Skipped (with a message) unless `P2PCHECK_GPU_TESTS=1`; with it set, a
//! missing GPU or driver is a failure. Run them on the GPU machine with scripts/gpu-run.sh.

use std::path::PathBuf;

use p2pcheck::check::{self, all_pairs, Options};
use p2pcheck::protocol::KernelOutcome;

mod common;
use common::worker_children;

fn gpu_tests_enabled(test: &str) -> bool {
    let on = std::env::var("P2PCHECK_GPU_TESTS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("skipped {test}: set P2PCHECK_GPU_TESTS=1 on a machine with NVIDIA GPUs");
    }
    on
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
fn every_pair_of_the_visible_gpus_passes_both_checks() {
    if !gpu_tests_enabled("every_pair_of_the_visible_gpus_passes_both_checks") {
        return;
    }
    let report = check::run(None, &options()).expect("the check runs on this GPU machine");
    let n = report.device_count;
    assert!(n >= 1);
    assert_eq!(report.pairs.len() as u32, n * n);
    for (p, expected) in report.pairs.iter().zip(all_pairs(n)) {
        assert_eq!(p.pair, expected, "pairs come back in batch order");
        assert!(p.ok(), "{}->{}: {:?}", p.pair.src, p.pair.tgt, p.details());
        assert_eq!(p.kernel(), KernelOutcome::Ok);
        assert_eq!(
            p.claim(),
            Some(true),
            "an H200 machine's driver claims every pair"
        );
    }
}

#[test]
fn exact_vllm_mode_and_batch_order() {
    if !gpu_tests_enabled("exact_vllm_mode_and_batch_order") {
        return;
    }
    let n = p2pcheck::visible_device_count().expect("driver answers");
    // A batch in an unusual order, with repeats: answers come back in the same order.
    let src: Vec<u32> = (0..n).rev().chain(0..n).collect();
    let tgt: Vec<u32> = (0..n).chain(0..n).collect();
    let opts = Options {
        kernel_check: false,
        ..options()
    };
    let report = p2pcheck::can_actually_p2p_with(&src, &tgt, &opts).expect("check runs");
    for (i, p) in report.pairs.iter().enumerate() {
        assert_eq!((p.pair.src, p.pair.tgt), (src[i], tgt[i]));
        assert_eq!(p.copy_ok(), Some(true));
        assert_eq!(p.kernel(), KernelOutcome::NotRun);
    }
    let err = p2pcheck::can_actually_p2p(&[n], &[0]).unwrap_err();
    assert!(format!("{err:#}").contains("cannot see"), "{err:#}");
}

#[test]
fn gpu_p2p_access_check_writes_vllms_cache_once() {
    if !gpu_tests_enabled("gpu_p2p_access_check_writes_vllms_cache_once") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("p2pcheck-gpu-test-{}", std::process::id()));
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
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_worker_killed_mid_run_gives_error_for_its_pair_and_leaves_nothing() {
    if !gpu_tests_enabled("a_worker_killed_mid_run_gives_error_for_its_pair_and_leaves_nothing") {
        return;
    }
    // A long batch (pair 0->0 twelve times, about 0.15 s each after start-up), and a killer
    // thread that SIGKILLs the consumer once the batch is under way.
    let src = vec![0u32; 12];
    let tgt = vec![0u32; 12];
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
    let report = p2pcheck::can_actually_p2p_with(&src, &tgt, &options()).expect("check runs");
    let killed = killer.join().unwrap();
    let errors: Vec<_> = report
        .pairs
        .iter()
        .filter(|p| matches!(p.verdict(), p2pcheck::Verdict::Error(_)))
        .collect();
    eprintln!(
        "killed consumer {killed}; verdicts: {:?}",
        report.pairs.iter().map(|p| p.verdict()).collect::<Vec<_>>()
    );
    assert_eq!(report.pairs.len(), 12, "every pair accounted for");
    assert_eq!(errors.len(), 1, "exactly the pair in flight is an error");
    assert!(
        errors[0].verdict().reason().contains("SIGKILL"),
        "{}",
        errors[0].verdict()
    );
    assert_eq!(report.restarts, 1);
    assert!(
        report.pairs.iter().filter(|p| p.ok()).count() == 11,
        "the other pairs still pass"
    );
    assert!(worker_children().is_empty(), "no worker left behind");
}

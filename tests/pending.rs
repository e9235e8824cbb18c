//! `p2pcheck::Pending` from the caller's side, on the simulated driver: a cancel from another
//! thread ends every wait at once, a wait with a timeout, the result kept for every wait, a
//! child of `fork` answered at once without touching the parent's locks or thread, and a child
//! of the caller that p2pcheck did not start left alone by checks with hangs and crashes.

use std::time::{Duration, Instant};

use p2pcheck::sim::Simulation;
use p2pcheck::{Error, Options, Pair, Pending};

const WORKER: &str = env!("CARGO_BIN_EXE_p2pcheck-worker");

/// Options on `gpus` simulated GPUs with `faults`, each step allowed `step`.
fn options(gpus: u32, faults: &[&str], step: Duration) -> Options {
    Options {
        worker: Some(WORKER.into()),
        simulate: Some(Simulation {
            gpus,
            faults: faults.iter().map(|f| f.parse().unwrap()).collect(),
        }),
        step_timeout: step,
        ..Options::default()
    }
}

/// A check that cannot end by itself within a test: 0->1 hangs, a step may take a minute.
fn hanging() -> Pending {
    p2pcheck::start(None, options(4, &["0->1:hang"], Duration::from_secs(60)))
}

#[test]
fn a_cancel_from_another_thread_ends_every_wait_at_once() {
    fn shared<T: Send + Sync>(_: &T) {}
    let pending = hanging();
    shared(&pending);
    // A bounded wait waits its time, then says the check still runs.
    let before = Instant::now();
    assert!(pending.wait_timeout(Duration::from_millis(200)).is_none());
    let waited = before.elapsed();
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    assert!(pending.try_wait().is_none());
    let (cancelled, after) = std::thread::scope(|s| {
        let unbounded = s.spawn(|| (pending.wait(), Instant::now()));
        let bounded = s.spawn(|| {
            let r = pending.wait_timeout(Duration::from_secs(3600));
            (r.expect("a result, not a timeout"), Instant::now())
        });
        std::thread::sleep(Duration::from_millis(300));
        let cancelled = Instant::now();
        pending.cancel();
        let returned = cancelled.elapsed();
        // Generous bounds (a loaded machine): they prove nothing blocks; the figures are
        // printed.
        assert!(
            returned < Duration::from_secs(1),
            "the cancel took {returned:?}"
        );
        let mut after = Vec::new();
        for waiter in [unbounded.join().unwrap(), bounded.join().unwrap()] {
            assert!(matches!(waiter.0, Err(Error::Cancelled)), "{:?}", waiter.0);
            after.push(waiter.1.duration_since(cancelled));
        }
        (returned, after)
    });
    for a in &after {
        assert!(
            *a < Duration::from_secs(2),
            "a wait ended {a:?} after the cancel"
        );
    }
    // The result is kept.
    assert!(matches!(pending.wait(), Err(Error::Cancelled)));
    let before = Instant::now();
    pending.finish();
    let finish = before.elapsed();
    assert!(finish < Duration::from_secs(30), "{finish:?}");
    eprintln!("cancel returned in {cancelled:?}; the waits {after:?} after it; finish {finish:?}");
}

#[test]
fn every_wait_gives_the_result_again() {
    let pending = p2pcheck::start(
        None,
        options(2, &["0->1:drop-writes"], Duration::from_secs(5)),
    );
    let first = pending.wait().unwrap();
    let verdicts = |r: &p2pcheck::Report| r.pairs.iter().map(|p| p.ok()).collect::<Vec<_>>();
    assert_eq!(verdicts(&first), [true, false, true, true]);
    for again in [
        pending.try_wait().unwrap().unwrap(),
        pending.wait_timeout(Duration::ZERO).unwrap().unwrap(),
        pending.wait().unwrap(),
    ] {
        assert_eq!(verdicts(&again), verdicts(&first));
        assert_eq!(again.answer, first.answer);
    }
    // A cancel after the result changes nothing.
    pending.cancel();
    assert_eq!(verdicts(&pending.wait().unwrap()), verdicts(&first));
    assert!(pending.finish().is_empty(), "every worker exited cleanly");

    // An error is kept too.
    let pending = p2pcheck::start(
        Some(vec![Pair { src: 9, tgt: 0 }]),
        options(2, &[], Duration::from_secs(5)),
    );
    let texts: Vec<String> = (0..3)
        .map(|_| match pending.wait() {
            Err(e @ Error::InvalidInput(_)) => e.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(texts[0].contains("9->0"), "{}", texts[0]);
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
}

#[test]
fn a_child_of_fork_is_answered_at_once() {
    let pending = hanging();
    let parent = std::process::id();
    // SAFETY: the child only calls the handle's methods, which touch no lock or thread of the
    // parent's in another process (what is tested), then leaves with _exit.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        let started = Instant::now();
        let answered = matches!(
            pending.wait_timeout(Duration::from_secs(3600)),
            Some(Err(Error::InvalidInput(why))) if why.contains(&format!(
                "this check was made by process {parent}, and this is process {}",
                std::process::id()
            ))
        ) && matches!(pending.wait(), Err(Error::InvalidInput(_)));
        pending.cancel();
        let warnings = pending.finish();
        let fast = started.elapsed() < Duration::from_secs(1);
        // SAFETY: ends the child at once, running nothing of the parent's.
        unsafe {
            libc::_exit(if answered && fast && warnings.is_empty() {
                0
            } else {
                1
            })
        };
    }
    let mut status = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: waitpid on our own child with a valid status pointer.
    while unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } == 0 {
        if Instant::now() > deadline {
            // SAFETY: our own child.
            unsafe { libc::kill(child, libc::SIGKILL) };
            panic!("the child hung on an inherited Pending");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(libc::WIFEXITED(status), "{status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child's answers were wrong or slow"
    );
    // The parent's check is its own still.
    assert!(pending.try_wait().is_none());
    pending.cancel();
    assert!(matches!(pending.wait(), Err(Error::Cancelled)));
    pending.finish();
}

#[test]
fn a_child_of_the_caller_lives_through_checks_with_hangs_and_crashes() {
    // A child of this process that p2pcheck did not start: the library touches only its own.
    let mut bystander = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("start sleep");
    let pid = bystander.id() as libc::pid_t;
    let alive_and_ours = || {
        // SAFETY: siginfo_t is plain data, valid all zeros.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child, with WNOWAIT: nothing is reaped; info is written.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is the field waitid fills (0: no child changed state).
        rc == 0 && unsafe { info.si_pid() } == 0
    };
    assert!(alive_and_ours());
    let pairs = vec![
        Pair { src: 0, tgt: 1 },
        Pair { src: 1, tgt: 0 },
        Pair { src: 2, tgt: 2 },
    ];
    for engine in [p2pcheck::Engine::Parallel, p2pcheck::Engine::Vllm] {
        let opts = Options {
            engine,
            ..options(4, &["0->1:hang", "1->0:crash"], Duration::from_millis(300))
        };
        let report = p2pcheck::check(Some(&pairs), &opts).unwrap();
        assert!(!report.pairs[0].ok() && !report.pairs[1].ok() && report.pairs[2].ok());
        assert!(alive_and_ours(), "after a check with the {engine:?} engine");
    }
    let pending = hanging();
    std::thread::sleep(Duration::from_millis(200));
    pending.cancel();
    pending.finish();
    assert!(alive_and_ours(), "after a cancelled check");
    bystander.kill().unwrap();
    let status = bystander.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "reaped here, by its parent"
    );
}

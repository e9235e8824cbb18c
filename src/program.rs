//! Process-wide set-up for a program of its own, such as the `p2pcheck` CLI — never for a
//! library inside someone else's process: these change the whole process, and end child
//! processes that no check started.
//!
//! Nothing else in this crate does either. A check touches only the processes it started: it
//! signals a worker's process group and reaps the worker only while the worker is its own
//! unreaped child, so neither id can name another process; everything that sets a worker up
//! (`PR_SET_PDEATHSIG`, its descriptors) happens in the child before exec; and the workers'
//! stderr is captured into the report.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::engine::{self, pool};
use crate::error::{Error, Result};
use crate::os;

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`), so
/// that a worker's descendant that escaped its process group (`setsid`) is reparented here
/// when the worker dies and [`end_adopted_orphans`] can end it.
///
/// # Errors
///
/// [`Error::Subreaper`] when the kernel refuses (`prctl`).
pub fn adopt_orphans() -> Result<()> {
    os::become_subreaper().map_err(|e| Error::Subreaper {
        source_text: e.to_string(),
    })
}

/// How long [`end_adopted_orphans`] waits for the checks of this process to reap their
/// workers: longer than any check's reaping takes (its workers' exit, then [`pool::KILL_WAIT`]
/// for the ones killed).
const CHECKS_WAIT: Duration = Duration::from_secs(20);

/// Ends every child process this process still has once its checks are over: for a program
/// whose only children are p2pcheck's workers (so, after [`adopt_orphans`], whatever else is
/// a child is a worker's descendant that escaped). It waits first, up to 20 s, until every
/// check of this process has reaped its workers (so it never races a check's own reaping),
/// then sends each child SIGKILL through a pidfd and reaps it through that pidfd, and does so
/// again for the orphans their deaths hand over, for at most 5 s. Call it only
/// where no other code of the process reaps children. Returns the pid of each process ended,
/// and why for each that could not be (`Err`).
pub fn end_adopted_orphans() -> Vec<std::result::Result<u32, String>> {
    if !engine::wait_for_checks(Instant::now() + CHECKS_WAIT) {
        return vec![Err(format!(
            "a check of this process was still reaping its workers after {} s; its children \
             were left alone",
            CHECKS_WAIT.as_secs()
        ))];
    }
    let deadline = Instant::now() + pool::KILL_WAIT;
    let mut results = Vec::new();
    // Each pass ends the children there are; the orphans a death hands over come next.
    while Instant::now() < deadline {
        let pids = os::child_pids();
        if pids.is_empty() {
            return results;
        }
        let mut open = Vec::new();
        for pid in pids {
            // The pid is this process's unreaped child, and nothing else here reaps: it names
            // no other process, and the pidfd pins it from here on.
            let fd = match os::pidfd_open(pid) {
                Ok(fd) => fd,
                Err(e) => {
                    results.push(Err(format!("process {pid}: {e}")));
                    continue;
                }
            };
            // One that is dead already (a worker's descendant killed with the worker's group,
            // then handed over) is only reaped: it was left behind by nobody.
            if os::readable_now(fd.as_fd()) {
                if let Err(e) = os::reap_pidfd(&fd) {
                    results.push(Err(format!("process {pid}: {e}")));
                }
                continue;
            }
            match os::pidfd_kill(&fd) {
                Ok(()) => open.push((pid, fd)),
                Err(e) => results.push(Err(format!("process {pid}: {e}"))),
            }
        }
        for (pid, fd) in open {
            let readable = os::poll_readable(&[fd.as_fd()], deadline);
            match readable.and_then(|_| os::reap_pidfd(&fd)) {
                Ok(true) => results.push(Ok(pid)),
                Ok(false) => results.push(Err(format!(
                    "process {pid} did not die within {} s of SIGKILL; left to the kernel",
                    pool::KILL_WAIT.as_secs()
                ))),
                Err(e) => results.push(Err(format!("process {pid}: {e}"))),
            }
        }
    }
    results
}

//! The one error type of p2pcheck's API: why a check could not be carried out at all.
//!
//! A pair that fails, hangs or errors is not an `Error`: it is an outcome in the
//! [`Report`](crate::Report). An `Error` means there is no answer: no worker, no CUDA, bad
//! input, a cache that cannot be used. Each variant names what failed, with the CUDA call, device
//! and code where there is one, so that the C ABI can map it to a status code and a person can
//! act on the text.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::cuda;
use crate::model::{deadline_passed, Problem, WorkerFault};

/// Why a check could not be carried out.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub enum Error {
    /// CUDA in this process: the library could not be loaded, lacks a symbol, or a call failed.
    Cuda(cuda::Error),
    /// A worker could not start CUDA (`cuInit`, device count): what it said.
    WorkerCuda {
        /// Which worker.
        worker: String,
        /// The failing call, with its code.
        problem: Problem,
    },
    /// The worker executable named by the options or `P2PCHECK_WORKER` cannot be used.
    WorkerUnusable {
        /// Where it was named: `worker (from options)` or `P2PCHECK_WORKER=PATH`.
        origin: String,
        /// Why it cannot be used.
        why: String,
    },
    /// No worker executable was found.
    WorkerNotFound {
        /// Where it was looked for, in order.
        tried: Vec<String>,
    },
    /// The worker executable could not be started.
    WorkerSpawn {
        /// The executable.
        path: PathBuf,
        /// The system's error.
        source_text: String,
    },
    /// A worker's pipes could not be set up.
    WorkerPipes {
        /// The system's error.
        source_text: String,
    },
    /// A worker did not start CUDA (and set up its GPU) within the start-up timeout.
    WorkerStartup {
        /// The worker; `None`: the vLLM engine's two workers.
        worker: Option<String>,
        /// The worker executable.
        path: PathBuf,
        /// The start-up timeout.
        timeout: Duration,
        /// What the worker(s) wrote to stderr, as `; its stderr: "…"` (empty when nothing).
        stderr: String,
    },
    /// A worker died, broke the protocol or stopped reading before the pairs ran.
    WorkerLost {
        /// When: while starting, before its Hello, or (`None`) when it was sent its work.
        during: Option<Phase>,
        /// What went wrong with it.
        fault: WorkerFault,
    },
    /// A worker sent a message it may not send while starting.
    WorkerProtocol {
        /// The worker.
        worker: String,
        /// The message.
        sent: String,
        /// When.
        during: Phase,
    },
    /// The whole check's deadline passed before the workers said Hello.
    StartDeadline {
        /// The check's budget.
        budget: Duration,
        /// The worker waited for; `None`: the vLLM engine's two workers.
        worker: Option<String>,
    },
    /// A worker claims to see more GPUs than the driver lists.
    WorkerClaim {
        /// The worker.
        worker: String,
        /// The GPUs it claims to see.
        claimed: u32,
        /// The GPUs the driver lists.
        listed: u32,
    },
    /// The vLLM engine's two workers see different device counts.
    DeviceCounts {
        /// The producer's count.
        producer: u32,
        /// The consumer's count.
        consumer: u32,
    },
    /// The workers see another device count than this process.
    DeviceCountChanged {
        /// The workers' count.
        workers: u32,
        /// This process's count.
        here: u32,
    },
    /// Rounds of fresh workers kept failing: the check gave up.
    GaveUp {
        /// Rounds of fresh workers started.
        rounds: u32,
    },
    /// The check's thread could not be started.
    Thread {
        /// The system's error.
        source_text: String,
    },
    /// `PR_SET_CHILD_SUBREAPER` failed.
    Subreaper {
        /// The system's error.
        source_text: String,
    },
    /// A bug in the check: a panic, caught (its message).
    Bug {
        /// The panic's message.
        what: String,
    },
    /// A state that cannot happen short of a bug (no result where there must be one).
    Internal {
        /// What happened.
        what: &'static str,
    },
    /// The worker speaks another protocol version.
    Version {
        /// The worker executable.
        worker: PathBuf,
        /// Its version.
        theirs: u16,
    },
    /// No GPU is visible (no device, or `CUDA_VISIBLE_DEVICES` selects none).
    NoDevice(String),
    /// Bad input: device ids out of range, an unpaired batch, an option out of range.
    InvalidInput(String),
    /// vLLM's cache folder, its cache file, the fingerprint beside it or its lock could not be
    /// used.
    Cache {
        /// The file asked about (empty where the folder could not even be located).
        path: PathBuf,
        /// What went wrong.
        kind: CacheErrorKind,
    },
    /// The check was cancelled before it finished.
    Cancelled,
    /// The simulated driver could not be made ready (written to a file, or shared with the
    /// workers through an in-memory file).
    Simulator {
        /// What was being done, naming the file: `writing /tmp/libsim.so`.
        doing: String,
        /// The operating system's error, as a kind ...
        kind: io::ErrorKind,
        /// ... and as its text.
        text: String,
    },
    /// An audit trace could not be read: each problem names its line (`line N: ...`).
    BadTrace {
        /// What is wrong, in file order.
        problems: Vec<String>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Cuda(e) => write!(f, "{e}"),
            Error::WorkerCuda { worker, problem } => {
                write!(f, "the {worker} could not start CUDA: {problem}")
            }
            Error::NoDevice(why) | Error::InvalidInput(why) => f.write_str(why),
            Error::WorkerUnusable { origin, why } => write!(f, "{origin}: {why}"),
            Error::WorkerNotFound { tried } => write!(
                f,
                "cannot find the p2pcheck-worker executable (tried {}); install it beside your \
                 program or set P2PCHECK_WORKER to its path",
                tried.join(", ")
            ),
            Error::WorkerSpawn { path, source_text } => {
                write!(f, "cannot start worker {}: {source_text}", path.display())
            }
            Error::WorkerPipes { source_text } => {
                write!(f, "cannot set up the worker's pipes: {source_text}")
            }
            Error::WorkerStartup {
                worker: Some(worker),
                timeout,
                stderr,
                ..
            } => write!(
                f,
                "the {worker} did not start CUDA and set up its GPU within the start-up timeout \
                 ({timeout:?}){stderr}"
            ),
            Error::WorkerStartup {
                worker: None,
                path,
                timeout,
                stderr,
            } => write!(
                f,
                "the workers did not start CUDA within the start-up timeout ({timeout:?}, {}){stderr}",
                path.display()
            ),
            Error::WorkerLost { during, fault } => match during {
                Some(Phase::Starting) => write!(f, "failed while starting: {fault}"),
                Some(Phase::Hello) => write!(f, "failed before saying Hello: {fault}"),
                None => write!(f, "{fault}"),
            },
            Error::WorkerProtocol {
                worker,
                sent,
                during,
            } => write!(
                f,
                "the {worker} sent {sent} {}",
                match during {
                    Phase::Starting => "while starting",
                    Phase::Hello => "before Hello",
                }
            ),
            Error::StartDeadline { budget, worker } => {
                write!(f, "{} before the ", deadline_passed(*budget))?;
                match worker {
                    Some(w) => write!(f, "{w} said Hello"),
                    None => write!(f, "workers said Hello"),
                }
            }
            Error::WorkerClaim {
                worker,
                claimed,
                listed,
            } => write!(
                f,
                "the {worker} claims to see {claimed} GPUs, but the driver lists {listed}: refused"
            ),
            Error::DeviceCounts { producer, consumer } => write!(
                f,
                "the workers see different device counts ({producer} and {consumer})"
            ),
            Error::DeviceCountChanged { workers, here } => {
                write!(f, "the workers see {workers} devices, this process {here}")
            }
            Error::GaveUp { rounds } => {
                write!(f, "gave up after {rounds} rounds of fresh workers")
            }
            Error::Thread { source_text } => {
                write!(f, "cannot start the check's thread: {source_text}")
            }
            Error::Subreaper { source_text } => {
                write!(f, "PR_SET_CHILD_SUBREAPER failed: {source_text}")
            }
            Error::Bug { what } => write!(f, "internal error in the check (a bug): {what}"),
            Error::Internal { what } => f.write_str(what),
            Error::Version { worker, theirs } => write!(
                f,
                "the worker {} speaks protocol version {theirs}, this library {}: install the \
                 matching p2pcheck-worker",
                worker.display(),
                crate::protocol::VERSION
            ),
            Error::Cache { path, kind } if path.as_os_str().is_empty() => write!(f, "{kind}"),
            Error::Cache { path, kind } => write!(f, "{}: {kind}", path.display()),
            Error::Cancelled => write!(f, "the check was cancelled"),
            Error::Simulator { doing, text, .. } => write!(f, "{doing}: {text}"),
            Error::BadTrace { problems } => f.write_str(&problems.join("\n")),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Cuda(e) => Some(e),
            _ => None,
        }
    }
}

impl From<cuda::Error> for Error {
    fn from(e: cuda::Error) -> Error {
        Error::Cuda(e)
    }
}

/// What went wrong with vLLM's cache folder or a file in it (see [`Error::Cache`]). Each text
/// names the files involved.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheErrorKind {
    /// A file system call failed.
    Io {
        /// What was being done, naming the file: `cannot read /c/f.json: cannot open the
        /// folder /c`.
        doing: String,
        /// The operating system's error, as a kind ...
        kind: io::ErrorKind,
        /// ... and as its text.
        text: String,
    },
    /// What is there is refused and left as it is: a file of a user this process does not
    /// trust, a lock file that is a link, a directory where the cache file should be.
    Refused {
        /// What was being done (`cannot read /c/f.json`), or empty.
        doing: String,
        /// Why, and what to change.
        why: String,
    },
    /// The path cannot name a cache folder or file (empty, a NUL byte, no file name, not a
    /// folder).
    BadPath(String),
    /// Another process held the lock past the deadline.
    LockTimeout {
        /// The lock file.
        lock: PathBuf,
        /// How long this process waited.
        waited: Duration,
        /// The pid that last took the lock, where it wrote one.
        holder: Option<u32>,
    },
    /// vLLM's cache folder cannot be located from the environment (`VLLM_CACHE_ROOT`,
    /// `XDG_CACHE_HOME`, `HOME`): why.
    NoFolder(String),
}

impl CacheErrorKind {
    /// This error as a step of `outer` ("cannot read /c/f.json"), which is named first.
    pub(crate) fn within(self, outer: String) -> CacheErrorKind {
        let join = |inner: String| match inner.is_empty() {
            true => outer.clone(),
            false => format!("{outer}: {inner}"),
        };
        match self {
            CacheErrorKind::Io { doing, kind, text } => CacheErrorKind::Io {
                doing: join(doing),
                kind,
                text,
            },
            CacheErrorKind::Refused { doing, why } => CacheErrorKind::Refused {
                doing: join(doing),
                why,
            },
            CacheErrorKind::BadPath(why) => CacheErrorKind::BadPath(join(why)),
            // Whole sentences of their own, never a step of another.
            other @ (CacheErrorKind::LockTimeout { .. } | CacheErrorKind::NoFolder(_)) => other,
        }
    }
}

impl fmt::Display for CacheErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheErrorKind::Io { doing, text, .. } => write!(f, "{doing}: {text}"),
            CacheErrorKind::Refused { doing, why } if doing.is_empty() => f.write_str(why),
            CacheErrorKind::Refused { doing, why } => write!(f, "{doing}: {why}"),
            CacheErrorKind::BadPath(why) | CacheErrorKind::NoFolder(why) => f.write_str(why),
            CacheErrorKind::LockTimeout {
                lock,
                waited,
                holder,
            } => {
                write!(
                    f,
                    "timed out after {waited:?} waiting for the lock {} (",
                    lock.display()
                )?;
                match holder {
                    Some(pid) => write!(f, "last taken by pid {pid}")?,
                    None => f.write_str("its holder is unknown")?,
                }
                f.write_str(
                    "); another process is probably computing the same cache: wait for it, or \
                     stop it",
                )
            }
        }
    }
}

/// When a worker went wrong before the pairs ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// While it started CUDA and set up its GPU.
    Starting,
    /// Before it said Hello.
    Hello,
}

/// Result of p2pcheck's API.
pub type Result<T> = std::result::Result<T, Error>;

//! The parent's worker processes: finding the executable, starting any number of workers, one
//! poll loop over all of them with a deadline per worker, and reaping them off the critical
//! path.
//!
//! A worker is its own process group (pgid = pid), so a kill reaches anything it started. Every
//! read waits on a deadline the engine set for the step it expects; every write is non-blocking
//! with a deadline too, so a worker that stops reading cannot stall the parent. A worker whose
//! work is done is moved to the [`Graveyard`]: its stdin is closed (its signal to exit), and it
//! is reaped later, after the verdicts have been handed over, or killed at a deadline.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use once_cell::sync::Lazy;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::os;
use crate::protocol::{self, FrameReader, Message, ProtocolError};
use crate::worker::{PARENT_PID_VAR, WORKER_FLAG};

/// Finds the worker executable, in this order:
/// 1. `explicit` (from [`crate::Options::worker`]);
/// 2. `$P2PCHECK_WORKER`;
/// 3. `p2pcheck-worker` beside the current executable, then beside the shared library holding
///    this code (a host that loads `libp2pcheck.so` from elsewhere);
/// 4. the current executable itself, only when its program declared that it serves as a
///    worker ([`this_executable_is_a_worker`]: the `p2pcheck` CLI does); an embedding host's
///    executable is never run, whatever its name;
/// 5. `p2pcheck-worker` on `$PATH`.
pub fn locate_worker(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return executable(p).map_err(|e| Error::Worker(format!("worker (from options): {e}")));
    }
    if let Some(p) = std::env::var_os("P2PCHECK_WORKER").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return executable(&p)
            .map_err(|e| Error::Worker(format!("P2PCHECK_WORKER={}: {e}", p.display())));
    }
    let exe = std::env::current_exe().ok();
    let mut dirs: Vec<PathBuf> = exe
        .iter()
        .filter_map(|e| e.parent().map(Path::to_path_buf))
        .collect();
    // Linked statically, the code is in the executable: its folder is not tried twice.
    if let Some(dir) = own_library_path().and_then(|l| l.parent().map(Path::to_path_buf)) {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    let mut tried = Vec::new();
    for dir in &dirs {
        let p = dir.join("p2pcheck-worker");
        if executable(&p).is_ok() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    if let Some(e) = exe.filter(|_| SELF_IS_WORKER.load(Ordering::Relaxed)) {
        return Ok(e);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("p2pcheck-worker");
        if executable(&p).is_ok() {
            return Ok(p);
        }
    }
    tried.push("p2pcheck-worker on $PATH".into());
    Err(Error::Worker(format!(
        "cannot find the p2pcheck-worker executable (tried {}); install it beside your program \
         or set P2PCHECK_WORKER to its path",
        tried.join(", ")
    )))
}

/// Whether this program's executable serves as a worker (see [`this_executable_is_a_worker`]).
static SELF_IS_WORKER: AtomicBool = AtomicBool::new(false);

/// Declares that this program runs [`crate::worker_main`] when its first argument is
/// [`crate::WORKER_FLAG`], as the `p2pcheck` CLI does, so that a check may run its executable
/// as the worker when no `p2pcheck-worker` is found ([`locate_worker`]). Call it from `main`,
/// before any check. A program that does not is never run as a worker (a host that embeds
/// p2pcheck is not one, whatever its executable is called).
pub fn this_executable_is_a_worker() {
    SELF_IS_WORKER.store(true, Ordering::Relaxed);
}

fn executable(p: &Path) -> std::result::Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not an executable file", p.display()));
    }
    Ok(p.to_path_buf())
}

/// The file (executable or shared library) that holds this function's code.
fn own_library_path() -> Option<PathBuf> {
    os::object_containing(own_library_path as fn() -> Option<PathBuf> as usize)
}

/// What a worker did, as the poll loop saw it.
// One event at a time, moved once into its handler: boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Event {
    /// A complete, valid message.
    Message(Message),
    /// Its deadline passed with nothing from it.
    Timeout,
    /// It closed its pipe or sent bytes that are not a frame: why, in words (it is reaped
    /// and its exit described when it is gone).
    Broken(String),
}

/// Why a message could not be sent.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The worker did not read within the deadline: why, in words.
    Stuck(String),
    /// Its end of the pipe is closed: it exited or died.
    Gone,
}

/// Pids of the workers started and not yet reaped, in this process: what
/// [`crate::kill_leftover_children`] must leave to the check that owns them.
static TRACKED: Lazy<Mutex<HashSet<u32>>> = Lazy::new(Mutex::default);

fn tracked() -> std::sync::MutexGuard<'static, HashSet<u32>> {
    TRACKED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `pid` is a worker a check started and has not reaped yet.
pub(crate) fn is_tracked(pid: u32) -> bool {
    tracked().contains(&pid)
}

/// One running worker process.
pub(crate) struct Worker {
    /// Who it is, for messages: "producer", "worker of GPU 2", ...
    pub label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    reader: FrameReader,
    _stdout: ChildStdout,
    /// Readable once the process has exited (where the kernel offers pidfds): its death is
    /// seen even if a descendant keeps the pipe open.
    pidfd: Option<OwnedFd>,
    reaped: Option<ExitStatus>,
    /// The step the engine waits for must arrive by then; `None`: nothing is expected.
    pub deadline: Option<Instant>,
    /// Whether the poll loop reads from it (a vLLM worker that sent all it owes is not read:
    /// its exit is expected).
    pub listening: bool,
    /// Devices its CUDA saw (from its Hello).
    pub sees: Option<u32>,
    /// Its peak resident memory as it last reported it, in KiB.
    pub peak_rss_kb: u32,
}

impl Worker {
    /// Starts `path` as a worker with `env` added to this process's environment.
    pub(crate) fn spawn(path: &Path, label: String, env: &[(String, String)]) -> Result<Worker> {
        let mut child = Command::new(path)
            .arg(WORKER_FLAG)
            .envs(env.iter().map(|(k, v)| (k, v)))
            // The worker asks to be killed when its parent dies (see worker::main); it needs
            // the parent's pid to close the race where the parent died before it asked.
            .env(PARENT_PID_VAR, std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group, so a kill reaches anything it started too.
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Worker(format!("cannot start worker {}: {e}", path.display())))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout was piped");
        if let Some(s) = &stdin {
            // Writes must never block: a worker that stops reading would stall the parent.
            os::set_nonblocking(s)
                .map_err(|e| Error::Worker(format!("cannot set up the worker's pipe: {e}")))?;
        }
        let pidfd = os::pidfd_open(child.id()).ok();
        tracked().insert(child.id());
        Ok(Worker {
            label,
            reader: FrameReader::new(&stdout),
            _stdout: stdout,
            pidfd,
            stdin,
            child,
            reaped: None,
            deadline: None,
            listening: true,
            sees: None,
            peak_rss_kb: 0,
        })
    }

    /// The worker's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// "worker of GPU 2 (pid 123)".
    pub(crate) fn name(&self) -> String {
        format!("{} (pid {})", self.label, self.child.id())
    }

    /// Sends `m`, giving up at `deadline`; `Err` says why in words.
    pub(crate) fn send(
        &mut self,
        m: &Message,
        deadline: Instant,
    ) -> std::result::Result<(), String> {
        self.try_send(m, deadline).map_err(|e| match e {
            SendError::Stuck(why) => why,
            SendError::Gone => self.death_note(),
        })
    }

    /// Sends `m`, giving up at `deadline`, telling a worker that stopped reading from one that
    /// is gone (whose last messages may still wait in its pipe: read them before its death).
    pub(crate) fn try_send(
        &mut self,
        m: &Message,
        deadline: Instant,
    ) -> std::result::Result<(), SendError> {
        let Some(stdin) = self.stdin.as_ref() else {
            return Err(SendError::Gone);
        };
        os::write_all_until(stdin, &protocol::encode(m), deadline).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                SendError::Stuck(format!("the {} stopped reading its pipe", self.name()))
            } else {
                SendError::Gone
            }
        })
    }

    /// Why a worker is gone or broken: it is reaped here if it exited (killed if it lingers).
    pub(crate) fn death_note(&mut self) -> String {
        match self.wait_until(Instant::now() + Duration::from_secs(1)) {
            Some(status) => format!("the {} {}", self.name(), describe_exit(status)),
            None => {
                self.kill();
                format!(
                    "the {} closed its pipe but did not exit; killed",
                    self.name()
                )
            }
        }
    }

    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.try_reap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn try_reap(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped = Some(status);
                tracked().remove(&self.child.id());
            }
        }
        self.reaped
    }

    /// SIGKILL to its process group, then reaps it.
    pub(crate) fn kill(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        // The worker was started as its own process group leader (pgid = pid).
        os::kill_process_group(self.child.id());
        if let Ok(status) = self.child.wait() {
            self.reaped = Some(status);
        }
        tracked().remove(&self.child.id());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// "exited with code 3", "was killed by signal 11 (SIGSEGV)".
pub(crate) fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    let sig = status.signal().unwrap_or(0);
    let name = match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    };
    format!("was killed by signal {sig} ({name})")
}

/// Waits for the next event from any listening worker of `workers`: a message already
/// buffered, one that arrives, a broken pipe, or the earliest deadline passing. Returns `None`
/// at `wake` (so the caller can look at a cancel flag) or when no listening worker has a
/// deadline (nothing the caller waits for can happen).
pub(crate) fn next_event(workers: &mut [Option<Worker>], wake: Instant) -> Option<(usize, Event)> {
    loop {
        for (i, w) in workers.iter_mut().enumerate() {
            let Some(w) = w.as_mut().filter(|w| w.listening) else {
                continue;
            };
            match w.reader.buffered() {
                Ok(Some(m)) => return Some((i, Event::Message(m))),
                Ok(None) => {}
                Err(e) => return Some((i, Event::Broken(broken(w, e)))),
            }
        }
        let live: Vec<usize> = (0..workers.len())
            .filter(|&i| workers[i].as_ref().is_some_and(|w| w.listening))
            .collect();
        let (first, deadline) = live
            .iter()
            .filter_map(|&i| workers[i].as_ref().and_then(|w| w.deadline).map(|d| (i, d)))
            .min_by_key(|&(_, d)| d)?;
        // Each worker's pipe, and its pidfd where there is one.
        let mut fds = Vec::new();
        let mut owners = Vec::new();
        for &i in &live {
            let w = workers[i].as_ref().expect("live");
            fds.push(w.reader.fd());
            owners.push((i, false));
            if let Some(p) = &w.pidfd {
                fds.push(p.as_raw_fd());
                owners.push((i, true));
            }
        }
        match os::poll_readable(&fds, deadline.min(wake)) {
            Ok(Some(k)) => {
                let (i, exited) = owners[k];
                let w = workers[i].as_mut().expect("live");
                if !exited {
                    if let Err(e) = w.reader.fill() {
                        return Some((i, Event::Broken(broken(w, e))));
                    }
                    continue;
                }
                // It exited: what it wrote before comes first, then its death (a bounded
                // drain: a descendant holding the pipe could keep writing).
                for _ in 0..16 {
                    if !os::readable_now(w.reader.fd()) {
                        break;
                    }
                    match w.reader.fill() {
                        Ok(()) => {}
                        Err(ProtocolError::Eof) => break,
                        Err(e) => return Some((i, Event::Broken(broken(w, e)))),
                    }
                }
                return Some(match w.reader.buffered() {
                    Ok(Some(m)) => (i, Event::Message(m)),
                    Ok(None) => (i, Event::Broken(w.death_note())),
                    Err(e) => (i, Event::Broken(broken(w, e))),
                });
            }
            Ok(None) if Instant::now() >= deadline => return Some((first, Event::Timeout)),
            Ok(None) => return None,
            Err(e) => {
                let w = workers[first].as_mut().expect("live");
                return Some((
                    first,
                    Event::Broken(format!("polling the {}: {e}", w.name())),
                ));
            }
        }
    }
}

fn broken(w: &mut Worker, e: ProtocolError) -> String {
    match e {
        ProtocolError::Eof => w.death_note(),
        e => format!("the {}: {e}", w.name()),
    }
}

/// Workers whose work is done: their stdin is closed and they are exiting (context teardown
/// takes about as long as creating it). They are reaped after the answer is out.
#[derive(Default)]
pub(crate) struct Graveyard {
    workers: Vec<Worker>,
}

impl Graveyard {
    /// Closes `w`'s stdin (its signal to exit) and keeps it for reaping.
    pub(crate) fn bury(&mut self, mut w: Worker) {
        w.stdin = None;
        w.listening = false;
        self.workers.push(w);
    }

    /// Kills `w` (a hung or broken worker) and keeps it for reaping.
    pub(crate) fn kill(&mut self, mut w: Worker) {
        w.kill();
        self.workers.push(w);
    }

    /// Reaps every worker, killing those still alive at `deadline`; returns a warning for each
    /// that did not exit cleanly on its own (every verdict is in by now, so nothing more).
    pub(crate) fn reap(mut self, deadline: Instant) -> Vec<String> {
        let mut warnings = Vec::new();
        for w in self.workers.iter_mut() {
            let killed = w.reaped.is_some() && w.stdin.is_some();
            match w.wait_until(deadline) {
                _ if killed => {}
                Some(status) if status.success() => {}
                Some(status) => warnings.push(format!(
                    "the {} {} after its work",
                    w.name(),
                    describe_exit(status)
                )),
                None => {
                    w.kill();
                    warnings.push(format!(
                        "the {} did not exit after its work; killed",
                        w.name()
                    ));
                }
            }
        }
        self.workers.clear();
        warnings
    }
}

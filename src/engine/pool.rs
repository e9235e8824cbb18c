//! The parent's worker processes: finding the executable, starting any number of workers, one
//! poll loop over all of them with a deadline per worker, and reaping them off the critical
//! path — every wait, the kill and the reap included, with a deadline.
//!
//! A worker is its own process group (pgid = pid), so a kill reaches anything it started; the
//! group is signalled only while its leader is not reaped yet, so its id cannot name another
//! process. Every read waits on a deadline the engine set for the step it expects; every write
//! is non-blocking with a deadline too, so a worker that stops reading cannot stall the parent.
//! A worker's stderr (and its fd 1, which its start points there) is a pipe the parent reads as
//! it comes, keeping the last [`STDERR_KEEP`] bytes for the report: nothing of it reaches the
//! host's own stderr, and a worker flooding it can neither block nor grow memory.
//!
//! A worker that is killed (it hung or broke the protocol) is not waited for where it was
//! killed: it goes to the [`Graveyard`] with the workers whose work is done (their stdin
//! closed: their signal to exit), which reaps them after the verdicts are handed over, through
//! their pidfds, killing those still alive at a deadline. One that does not die within
//! [`KILL_WAIT`] of SIGKILL (a process in uninterruptible sleep inside the driver: SIGKILL
//! takes effect only when it leaves the kernel) is reported as stuck and left to the kernel:
//! its handle is kept, and the next check of this process reaps it if it has died by then
//! (until then it is a child of this process, a zombie once it dies).

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cuda::trace;
use crate::error::{Error, Result};
use crate::model::{Fault, WorkerFault};
use crate::os;
use crate::protocol::{self, FrameReader, Message, ProtocolError};
use crate::worker::WORKER_FLAG;

/// Finds the worker executable, in this order:
/// 1. `explicit` (from [`crate::Options::worker`]);
/// 2. `$P2PCHECK_WORKER`;
/// 3. `p2pcheck-worker` beside the current executable, then beside the shared library holding
///    this code (a host that loads `libp2pcheck.so` from elsewhere);
/// 4. the current executable itself, only when its program declared that it serves as a
///    worker ([`this_executable_is_a_worker`]: the `p2pcheck` CLI does); an embedding host's
///    executable is never run, whatever its name;
/// 5. `p2pcheck-worker` on `$PATH`.
///
/// # Errors
///
/// [`Error::WorkerUnusable`] when the one named explicitly or by `$P2PCHECK_WORKER` is not an
/// executable file; [`Error::WorkerNotFound`], listing the places tried, when none is found.
pub fn locate_worker(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return executable(p).map_err(|why| Error::WorkerUnusable {
            origin: "worker (from options)".into(),
            why,
        });
    }
    if let Some(p) = std::env::var_os("P2PCHECK_WORKER").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return executable(&p).map_err(|why| Error::WorkerUnusable {
            origin: format!("P2PCHECK_WORKER={}", p.display()),
            why,
        });
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
    Err(Error::WorkerNotFound { tried })
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
    /// It closed its pipe or sent bytes that are not a frame: how (it is reaped and its exit
    /// described when it is gone).
    Broken(WorkerFault),
}

/// Why a message could not be sent.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The worker did not read within the deadline ([`Fault::StoppedReading`]).
    Stuck(WorkerFault),
    /// Its end of the pipe is closed: it exited or died.
    Gone,
}

/// The most bytes of a worker's stderr kept for the report: the last ones.
pub(crate) const STDERR_KEEP: usize = 4096;

/// How long a killed process gets to die before it is reported stuck: SIGKILL takes effect
/// when the process leaves the kernel, which a driver call in uninterruptible sleep delays.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long a worker whose pipe closed gets to exit before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Waits for exits look again at least this often: a process without a pidfd (kernels before
/// 5.3) shows its exit only to a look.
const POLL_TICK: Duration = Duration::from_millis(50);

/// Workers that did not die by their reap deadline: reaped by a later reap of this process
/// (see the module's documentation).
static PARKED: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// Reaps, without waiting, the parked workers that have died since.
fn reap_parked() {
    let mut parked = PARKED.lock().unwrap_or_else(|p| p.into_inner());
    parked.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
}

/// Reads what the non-blocking pipe `fd` holds now, handing each chunk to `take`; at most 64
/// reads (256 KiB), so a writer that never stops cannot hold the caller. `open` turns false at
/// its end of file (or on an error: the pipe is not looked at again).
fn drain(fd: BorrowedFd<'_>, open: &mut bool, mut take: impl FnMut(&[u8])) {
    let mut chunk = [0u8; 4096];
    for _ in 0..64 {
        if !*open {
            return;
        }
        match os::read(fd, &mut chunk) {
            Ok(0) => *open = false,
            Ok(n) => take(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => *open = false,
        }
    }
}

/// A worker's stderr: the pipe, and its last [`STDERR_KEEP`] bytes.
struct Captured {
    pipe: ChildStderr,
    open: bool,
    tail: Vec<u8>,
    /// Bytes read and not kept (before the tail).
    dropped: u64,
}

impl Captured {
    fn drain(&mut self) {
        let (tail, dropped) = (&mut self.tail, &mut self.dropped);
        drain(self.pipe.as_fd(), &mut self.open, |bytes| {
            tail.extend_from_slice(bytes);
            let excess = tail.len().saturating_sub(STDERR_KEEP);
            tail.drain(..excess);
            *dropped += excess as u64;
        });
    }

    /// `; its stderr: "…"`, or nothing when it wrote nothing.
    fn note(&self) -> String {
        let text = String::from_utf8_lossy(&self.tail);
        let text = text.trim();
        // A worker of an older p2pcheck speaks on its stdout, which lands here.
        let older = match self.tail.windows(4).any(|w| w == protocol::MAGIC) {
            true => {
                " (protocol frames: a worker of an older p2pcheck, which speaks on its \
                     stdout; use the worker of this version)"
            }
            false => "",
        };
        match (text.is_empty(), self.dropped) {
            (true, _) => String::new(),
            (false, 0) => format!("; its stderr{older}: {text:?}"),
            (false, n) => format!("; its stderr{older} ({n} earlier bytes not kept): {text:?}"),
        }
    }
}

/// How a process was reaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reaped {
    /// Its exit status.
    Exited(ExitStatus),
    /// Other code of this process reaped it (`waitpid(-1)`): its status is unknown.
    Elsewhere,
}

/// One running worker process.
pub(crate) struct Worker {
    /// Who it is, for messages: "producer", "worker of GPU 2", ...
    pub label: String,
    pid: u32,
    /// `None` once parked (it did not die by its reap deadline).
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// Owns the protocol pipe (the worker's stdout).
    reader: FrameReader,
    /// The protocol pipe may still hold bytes (false after its end of file).
    stdout_open: bool,
    /// `None` when it shares this process's stderr (the audit trace goes there).
    stderr: Option<Captured>,
    /// Readable once the process has exited (where the kernel offers pidfds): its death is
    /// seen even if a descendant keeps the pipe open, and reaping waits on it.
    pidfd: Option<OwnedFd>,
    reaped: Option<Reaped>,
    /// Lost during the check: SIGKILL was sent to its group (or it was dead already).
    killed: bool,
    /// The step the engine waits for must arrive by then; `None`: nothing is expected.
    pub deadline: Option<Instant>,
    /// Whether the poll loop reads from it (a vLLM worker that sent all it owes is not read:
    /// its exit is expected).
    pub listening: bool,
    /// Devices its CUDA saw (from its Hello).
    pub sees: Option<u32>,
    /// Its peak resident memory as it last reported it, in KiB.
    pub peak_rss_kb: u32,
    /// This side of its descriptor socket (the cuMem transport), when it was given one.
    socket: Option<OwnedFd>,
}

impl Worker {
    /// Starts `path` as a worker with `env` added to this process's environment, and with a
    /// descriptor socket when `socket` (the cuMem transport's: see [`os::fdpass`]). Everything
    /// that sets the worker up (its descriptors, `PR_SET_PDEATHSIG`) happens in the child
    /// before exec ([`os::worker_pre_exec`]): nothing of this process changes.
    pub(crate) fn spawn(
        path: &Path,
        label: String,
        env: &[(OsString, OsString)],
        socket: bool,
    ) -> Result<Worker> {
        let pipes = |e: std::io::Error| Error::WorkerPipes {
            source_text: format!("the descriptor socket: {e}"),
        };
        let (ours, theirs) = match socket {
            true => {
                let (a, b) = os::fdpass::socket_pair().map_err(pipes)?;
                (Some(a), Some(b))
            }
            false => (None, None),
        };
        // The audit trace to stderr (P2PCHECK_TRACE=1) asks for every process's lines there:
        // then the worker shares this process's stderr instead of having it captured.
        let trace_var = match env.iter().rev().find(|(k, _)| k == trace::VAR) {
            Some((_, v)) => Some(v.clone()),
            None => std::env::var_os(trace::VAR),
        };
        let to_stderr = trace::Setting::from_value(trace_var.as_deref()) == trace::Setting::Stderr;
        let mut cmd = Command::new(path);
        cmd.arg(WORKER_FLAG)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if to_stderr {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            // Its own process group, so a kill reaches anything it started too.
            .process_group(0);
        os::worker_pre_exec(&mut cmd, theirs.as_ref());
        let mut child = cmd.spawn().map_err(|e| Error::WorkerSpawn {
            path: path.to_path_buf(),
            source_text: e.to_string(),
        })?;
        // The child has its copy at its socket descriptor now.
        drop(theirs);
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().map(|pipe| Captured {
            pipe,
            open: true,
            tail: Vec::new(),
            dropped: 0,
        });
        let worker = Worker {
            label,
            pid,
            reader: FrameReader::new(stdout),
            stdout_open: true,
            stderr,
            pidfd: os::pidfd_open(pid).ok(),
            stdin,
            child: Some(child),
            reaped: None,
            killed: false,
            deadline: None,
            listening: true,
            sees: None,
            peak_rss_kb: 0,
            socket: ours,
        };
        // Writes must never block (a worker that stops reading would stall the parent), nor
        // reads of its output once poll said there is some (a drain reads until empty). On an
        // error the worker is dropped: killed, and reaped later.
        let blocking = |e: std::io::Error| Error::WorkerPipes {
            source_text: e.to_string(),
        };
        if let Some(s) = &worker.stdin {
            os::set_nonblocking(s).map_err(blocking)?;
        }
        os::set_nonblocking(&worker.reader.fd()).map_err(blocking)?;
        if let Some(c) = &worker.stderr {
            os::set_nonblocking(&c.pipe).map_err(blocking)?;
        }
        Ok(worker)
    }

    /// Sends `fd` with `payload` over its descriptor socket, by `deadline`.
    pub(crate) fn send_descriptor(
        &self,
        fd: BorrowedFd<'_>,
        payload: &[u8],
        deadline: Instant,
    ) -> std::io::Result<()> {
        os::fdpass::send_fd(self.descriptor_socket()?, fd, payload, deadline)
    }

    /// Receives a descriptor and its message (into `buf`: its length) from its descriptor
    /// socket, by `deadline`.
    pub(crate) fn recv_descriptor(
        &self,
        buf: &mut [u8],
        deadline: Instant,
    ) -> std::io::Result<(usize, OwnedFd)> {
        os::fdpass::recv_fd(self.descriptor_socket()?, buf, deadline)
    }

    fn descriptor_socket(&self) -> std::io::Result<BorrowedFd<'_>> {
        self.socket.as_ref().map(AsFd::as_fd).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the worker was started without a descriptor socket",
            )
        })
    }

    /// The worker's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// "worker of GPU 2 (pid 123)".
    pub(crate) fn name(&self) -> String {
        format!("{} (pid {})", self.label, self.pid)
    }

    /// What it wrote to its stderr so far (the last [`STDERR_KEEP`] bytes), as
    /// `; its stderr: "…"` to append to a message about it; empty when nothing.
    pub(crate) fn stderr_note(&mut self) -> String {
        match &mut self.stderr {
            Some(c) => {
                c.drain();
                c.note()
            }
            None => String::new(),
        }
    }

    /// Sends `m`, giving up at `deadline`; `Err` says what went wrong with the worker.
    pub(crate) fn send(
        &mut self,
        m: &Message,
        deadline: Instant,
    ) -> std::result::Result<(), WorkerFault> {
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
                SendError::Stuck(self.fault_noting_stderr(Fault::StoppedReading))
            } else {
                SendError::Gone
            }
        })
    }

    /// `fault`, from this worker (a breach of the protocol: what it wrote to stderr is left
    /// for its death, if it dies).
    pub(crate) fn fault(&self, fault: Fault) -> WorkerFault {
        WorkerFault {
            worker: self.name(),
            fault,
            stderr: String::new(),
        }
    }

    /// `fault`, from this worker, with what it wrote to stderr.
    pub(crate) fn fault_noting_stderr(&mut self, fault: Fault) -> WorkerFault {
        WorkerFault {
            stderr: self.stderr_note(),
            ..self.fault(fault)
        }
    }

    /// Why a worker is gone or broken, with what it wrote to stderr: it is reaped here if it
    /// exits within [`EXIT_WAIT`], killed otherwise (and reaped later).
    pub(crate) fn death_note(&mut self) -> WorkerFault {
        let fault = match self.wait_until(Instant::now() + EXIT_WAIT) {
            Some(Reaped::Exited(status)) => Fault::Exited(describe_exit(status)),
            Some(Reaped::Elsewhere) => Fault::ReapedElsewhere,
            None => {
                self.kill();
                Fault::ClosedPipe
            }
        };
        self.fault_noting_stderr(fault)
    }

    /// Waits until it has exited and is reaped, or until `deadline` (`None`).
    fn wait_until(&mut self, deadline: Instant) -> Option<Reaped> {
        loop {
            if let Some(r) = Mortal::try_reap(self) {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let fds: Vec<BorrowedFd<'_>> = self.pidfd.iter().map(AsFd::as_fd).collect();
            let _ = os::poll_readable(&fds, deadline.min(now + POLL_TICK));
        }
    }

    /// SIGKILL to its process group, without waiting (it is reaped later, with a deadline);
    /// from here on it counts as lost during the check, dead already or not.
    pub(crate) fn kill(&mut self) {
        if self.reaped.is_none() && !self.killed {
            // Its group id is its pid, which names no other process while it is not reaped.
            // A refusal (a pid that names no group of its own) leaves nothing to kill.
            let _ = os::kill_process_group(self.pid);
        }
        self.killed = true;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Workers end in a graveyard; one dropped elsewhere (an error while starting, a panic
        // unwinding) is killed and parked, never waited for here.
        if Mortal::try_reap(self).is_none() {
            Mortal::kill(self);
            Mortal::park(self);
        }
    }
}

/// What reaping needs of a process: [`Worker`] in a check, stand-ins in tests.
pub(crate) trait Mortal {
    /// "worker of GPU 2 (pid 123)".
    fn name(&self) -> String;
    /// Reaps it if it has exited, without waiting.
    fn try_reap(&mut self) -> Option<Reaped>;
    /// SIGKILL, without waiting.
    fn kill(&mut self);
    /// Whether [`Mortal::kill`] was called.
    fn killed(&self) -> bool;
    /// Descriptors that turn readable when it exits or writes: what to poll while waiting.
    fn wake_fds(&self) -> Vec<BorrowedFd<'_>>;
    /// Reads what its pipes hold now: a process blocked on a full pipe would never exit.
    fn drain(&mut self);
    /// `; its stderr: "…"`, or nothing.
    fn stderr_note(&mut self) -> String;
    /// Gives up on reaping it now: a later reap of this process tries again.
    fn park(&mut self);
}

impl Mortal for Worker {
    fn name(&self) -> String {
        Worker::name(self)
    }

    fn try_reap(&mut self) -> Option<Reaped> {
        if self.reaped.is_none() {
            // waitpid(pid, WNOHANG): the pid is this process's unreaped child, so it names no
            // other process.
            self.reaped = match self.child.as_mut()?.try_wait() {
                Ok(Some(status)) => Some(Reaped::Exited(status)),
                Ok(None) => None,
                Err(_) => Some(Reaped::Elsewhere),
            };
        }
        self.reaped
    }

    fn kill(&mut self) {
        Worker::kill(self);
    }

    fn killed(&self) -> bool {
        self.killed
    }

    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds: Vec<BorrowedFd<'_>> = self.pidfd.iter().map(AsFd::as_fd).collect();
        if self.stdout_open {
            fds.push(self.reader.fd());
        }
        fds.extend(
            self.stderr
                .iter()
                .filter(|c| c.open)
                .map(|c| c.pipe.as_fd()),
        );
        fds
    }

    fn drain(&mut self) {
        // Its work is done: what it still sends on the protocol pipe is not read.
        drain(self.reader.fd(), &mut self.stdout_open, |_| {});
        if let Some(c) = &mut self.stderr {
            c.drain();
        }
    }

    fn stderr_note(&mut self) -> String {
        Worker::stderr_note(self)
    }

    fn park(&mut self) {
        if let Some(child) = self.child.take() {
            PARKED.lock().unwrap_or_else(|p| p.into_inner()).push(child);
        }
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

/// Where a descriptor the poll loop watches comes from.
#[derive(Clone, Copy)]
enum Source {
    /// The protocol pipe.
    Pipe,
    /// The pidfd: the process exited.
    Exit,
    /// Its stderr.
    Stderr,
}

/// Waits for the next event from any listening worker of `workers`: a message already
/// buffered, one that arrives, a broken pipe, or the earliest deadline passing. Returns `None`
/// at `wake` (so the caller can look at a cancel flag) or when no listening worker has a
/// deadline (nothing the caller waits for can happen).
///
/// Once a deadline (or `wake`) has passed, the pipes are looked at once more without waiting:
/// an answer already written counts, however late this thread got to read it; then the
/// deadline is met. Nothing a worker writes (valid frames, a trickle of bytes, a flood on
/// stderr) can keep the loop from meeting it.
pub(crate) fn next_event(workers: &mut [Option<Worker>], wake: Instant) -> Option<(usize, Event)> {
    let mut last_look = false;
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
        let now = Instant::now();
        if now >= deadline.min(wake) {
            if last_look {
                return (now >= deadline).then_some((first, Event::Timeout));
            }
            last_look = true;
        }
        // Each worker's pipe and pidfd first, then the stderr pipes: poll names the first
        // ready descriptor, so a flood on stderr never hides an answer or a death.
        let mut fds = Vec::new();
        let mut owners = Vec::new();
        for &i in &live {
            let w = workers[i].as_ref().expect("live");
            fds.push(w.reader.fd());
            owners.push((i, Source::Pipe));
            if let Some(p) = &w.pidfd {
                fds.push(p.as_fd());
                owners.push((i, Source::Exit));
            }
        }
        for &i in &live {
            if let Some(c) = workers[i].as_ref().and_then(|w| w.stderr.as_ref()) {
                if c.open {
                    fds.push(c.pipe.as_fd());
                    owners.push((i, Source::Stderr));
                }
            }
        }
        let until = if last_look { now } else { deadline.min(wake) };
        match os::poll_readable(&fds, until) {
            Ok(None) => {}
            Ok(Some(k)) => {
                let (i, source) = owners[k];
                let w = workers[i].as_mut().expect("live");
                match source {
                    Source::Stderr => {
                        if let Some(c) = &mut w.stderr {
                            c.drain();
                        }
                    }
                    Source::Pipe => {
                        if let Err(e) = w.reader.fill() {
                            return Some((i, Event::Broken(broken(w, e))));
                        }
                    }
                    Source::Exit => return Some(exited(i, w)),
                }
            }
            Err(e) => {
                let w = workers[first].as_mut().expect("live");
                return Some((first, Event::Broken(w.fault(Fault::Poll(e.to_string())))));
            }
        }
    }
}

/// Worker `i` exited: what it wrote before comes first, then its death (a bounded drain: a
/// descendant holding the pipe could keep writing).
fn exited(i: usize, w: &mut Worker) -> (usize, Event) {
    for _ in 0..16 {
        if !os::readable_now(w.reader.fd()) {
            break;
        }
        match w.reader.fill() {
            Ok(()) => {}
            Err(ProtocolError::Eof) => break,
            Err(e) => return (i, Event::Broken(broken(w, e))),
        }
    }
    match w.reader.buffered() {
        Ok(Some(m)) => (i, Event::Message(m)),
        Ok(None) => (i, Event::Broken(w.death_note())),
        Err(e) => (i, Event::Broken(broken(w, e))),
    }
}

fn broken(w: &mut Worker, e: ProtocolError) -> WorkerFault {
    match e {
        ProtocolError::Eof => w.death_note(),
        e => w.fault_noting_stderr(Fault::Protocol(e.to_string())),
    }
}

/// Workers whose work is done, and killed ones: reaped after the answer is out.
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
        w.listening = false;
        self.workers.push(w);
    }

    /// Reaps every worker (and any parked earlier that has died since), killing those still
    /// alive at `exit_by`; returns a warning for each that did not exit cleanly on its own and
    /// was not killed during the check (every verdict is in by now, so nothing more). Returns
    /// by `exit_by` + [`KILL_WAIT`].
    pub(crate) fn reap(mut self, exit_by: Instant) -> Vec<String> {
        reap_parked();
        reap_all(&mut self.workers, exit_by, KILL_WAIT)
    }
}

/// Waits for every process of `procs` to exit until `exit_by`, then kills those still alive
/// and gives them `kill_wait` to die; returns a warning for each that did not exit cleanly on
/// its own and was not killed before, and for each that did not die at all (parked: "stuck in
/// the driver; left to the kernel"). Returns by `exit_by` + `kill_wait` (plus one poll).
pub(crate) fn reap_all<P: Mortal>(
    procs: &mut [P],
    exit_by: Instant,
    kill_wait: Duration,
) -> Vec<String> {
    wait_all(procs, exit_by);
    let mut late = vec![false; procs.len()];
    for (p, late) in procs.iter_mut().zip(&mut late) {
        if p.try_reap().is_none() {
            *late = !p.killed();
            p.kill();
        }
    }
    wait_all(procs, Instant::now() + kill_wait);
    let mut warnings = Vec::new();
    for (p, late) in procs.iter_mut().zip(late) {
        let name = p.name();
        match p.try_reap() {
            None => {
                p.park();
                warnings.push(format!(
                    "the {name} did not die within {:.1} s of SIGKILL: stuck in the driver; \
                     left to the kernel (a later check of this process reaps it){}",
                    kill_wait.as_secs_f64(),
                    p.stderr_note()
                ));
            }
            Some(_) if late => warnings.push(format!(
                "the {name} did not exit after its work; killed{}",
                p.stderr_note()
            )),
            // Killed during the check: its pair's verdict says why.
            Some(_) if p.killed() => {}
            Some(Reaped::Exited(status)) if status.success() => {}
            Some(Reaped::Exited(status)) => warnings.push(format!(
                "the {name} {} after its work{}",
                describe_exit(status),
                p.stderr_note()
            )),
            Some(Reaped::Elsewhere) => warnings.push(format!(
                "the {name} was reaped by other code of this process (a host must not reap \
                 children it did not start while a check runs)"
            )),
        }
    }
    warnings
}

/// Waits until every process of `procs` is reaped or `until` passes, draining their pipes.
fn wait_all<P: Mortal>(procs: &mut [P], until: Instant) {
    loop {
        let mut fds = Vec::new();
        let mut alive = false;
        for p in procs.iter_mut() {
            p.drain();
            if p.try_reap().is_none() {
                alive = true;
                fds.extend(p.wake_fds());
            }
        }
        let now = Instant::now();
        if !alive || now >= until {
            return;
        }
        let _ = os::poll_readable(&fds, until.min(now + POLL_TICK));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that exits on its own after `exits_after` looks, or, killed, after
    /// `dies_after` more (`None`: never, as in uninterruptible sleep inside a driver).
    struct Stub {
        looks: u32,
        exits_after: Option<u32>,
        dies_after: Option<u32>,
        killed_at: Option<u32>,
        parked: bool,
    }

    impl Stub {
        fn new(exits_after: Option<u32>, dies_after: Option<u32>) -> Stub {
            Stub {
                looks: 0,
                exits_after,
                dies_after,
                killed_at: None,
                parked: false,
            }
        }
    }

    impl Mortal for Stub {
        fn name(&self) -> String {
            "stub".into()
        }
        fn try_reap(&mut self) -> Option<Reaped> {
            self.looks += 1;
            let exited = self.exits_after.is_some_and(|n| self.looks > n);
            let died = matches!((self.killed_at, self.dies_after), (Some(k), Some(n)) if self.looks > k + n);
            (exited || died).then(|| {
                Reaped::Exited(ExitStatus::from_raw(if exited { 0 } else { libc::SIGKILL }))
            })
        }
        fn kill(&mut self) {
            self.killed_at.get_or_insert(self.looks);
        }
        fn killed(&self) -> bool {
            self.killed_at.is_some()
        }
        fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
            Vec::new()
        }
        fn drain(&mut self) {}
        fn stderr_note(&mut self) -> String {
            String::new()
        }
        fn park(&mut self) {
            self.parked = true;
        }
    }

    #[test]
    fn a_process_that_never_dies_after_sigkill_is_reported_stuck_by_the_deadline() {
        let mut procs = [
            Stub::new(Some(2), None),
            Stub::new(None, Some(3)),
            Stub::new(None, None),
        ];
        let started = Instant::now();
        let warnings = reap_all(
            &mut procs,
            started + Duration::from_millis(200),
            Duration::from_millis(300),
        );
        let took = started.elapsed();
        // Bounded: the two waits and a poll tick, with room for a loaded machine.
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(procs[0].killed_at.is_none() && !procs[0].parked);
        assert!(procs[1].killed() && !procs[1].parked);
        assert!(procs[2].killed() && procs[2].parked);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert_eq!(warnings[0], "the stub did not exit after its work; killed");
        assert!(
            warnings[1].starts_with(
                "the stub did not die within 0.3 s of SIGKILL: stuck in the driver; left to \
                 the kernel"
            ),
            "{}",
            warnings[1]
        );
    }

    #[test]
    fn processes_that_exit_in_time_are_not_waited_for_to_the_deadline() {
        let mut procs = [Stub::new(Some(1), None), Stub::new(Some(3), None)];
        let started = Instant::now();
        let warnings = reap_all(
            &mut procs,
            started + Duration::from_secs(30),
            Duration::from_secs(30),
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(procs.iter().all(|p| !p.killed() && !p.parked));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_flood_on_stderr_keeps_only_its_last_bytes_and_never_blocks_the_reader() {
        let (r, w) = os::pipe().unwrap();
        os::set_nonblocking(&r).unwrap();
        os::set_nonblocking(&w).unwrap();
        let mut c = Captured {
            pipe: ChildStderr::from(OwnedFd::from(r)),
            open: true,
            tail: Vec::new(),
            dropped: 0,
        };
        let mut written = 0u64;
        for i in 0..200u32 {
            // Fill the pipe as far as it takes, then read it: never more than it holds.
            while let Ok(n) = std::io::Write::write(&mut &w, format!("line {i}\n").as_bytes()) {
                written += n as u64;
            }
            c.drain();
            assert!(c.tail.len() <= STDERR_KEEP);
        }
        drop(w);
        c.drain();
        assert!(!c.open, "its end of file is seen");
        assert_eq!(c.tail.len() as u64 + c.dropped, written);
        let note = c.note();
        assert!(note.contains("line 199"), "{note}");
        assert!(note.contains("earlier bytes not kept"), "{note}");
    }

    #[test]
    fn a_killed_process_that_dies_is_no_news() {
        let mut p = Stub::new(None, Some(0));
        p.kill();
        let warnings = reap_all(
            std::slice::from_mut(&mut p),
            Instant::now(),
            Duration::from_secs(30),
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(!p.parked);
    }
}

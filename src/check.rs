//! The parent side of the check: finds and starts the two workers, relays between them, keeps a
//! deadline on every wait, and collects one [`PairReport`] per pair.
//!
//! The parent never touches CUDA here. The workers talk only to the parent (a star, not a line
//! between them), so the parent sees every step, can time each one out, and knows which pair
//! and which step a silent worker was stuck in. Any failure kills both workers with their whole
//! process groups and reaps them: no path leaves a child behind.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::os;
use crate::protocol::{
    self, FrameReader, KernelOutcome, Message, Pair, ProtocolError, Role, SideVerdict,
};
use crate::sim::Simulation;
use crate::visible::{self, VisibleDevices};
use crate::worker::{PARENT_PID_VAR, WORKER_FLAG};

/// How a check runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Also test SM-issued stores and loads through the mapping (the C shim's kernels). A pair
    /// whose kernels fail is then false even where vLLM's copy test passes. `false` gives
    /// exactly vLLM's algorithm.
    pub kernel_check: bool,
    /// How long a worker may take to start CUDA and say Hello.
    pub startup_timeout: Duration,
    /// How long the parent waits for any single step of a pair; a pair that takes longer is
    /// a [`Verdict::Hang`].
    pub step_timeout: Duration,
    /// The worker executable; `None` searches as [`locate_worker`] documents.
    pub worker: Option<PathBuf>,
    /// Run the workers on the simulated driver instead of the real one.
    pub simulate: Option<Simulation>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kernel_check: true,
            startup_timeout: Duration::from_secs(60),
            step_timeout: Duration::from_secs(5),
            worker: None,
            simulate: None,
        }
    }
}

/// A pair's verdict. Only [`Verdict::Ok`] is `true` for vLLM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Both processes saw every byte the other wrote (and, with the kernel check, SM loads and
    /// stores through the mapping worked).
    Ok,
    /// The pair ran to the end and something was wrong: what was seen.
    Fails(String),
    /// A worker stopped answering during this pair; it was killed and fresh workers took over.
    Hang(String),
    /// A worker died or broke the protocol during this pair: why.
    Error(String),
}

impl Verdict {
    /// The one-word name: `ok`, `fails`, `hang` or `error`.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Fails(_) => "fails",
            Verdict::Hang(_) => "hang",
            Verdict::Error(_) => "error",
        }
    }

    /// What was seen or why (empty for `Ok`).
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Ok => "",
            Verdict::Fails(r) | Verdict::Hang(r) | Verdict::Error(r) => r,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ok => write!(f, "ok"),
            v => write!(f, "{}: {}", v.word(), v.reason()),
        }
    }
}

/// How a pair's test ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran to the end; each side's own verdict.
    Done {
        /// The producer's verdict.
        producer: SideVerdict,
        /// The consumer's verdict.
        consumer: SideVerdict,
    },
    /// A worker stopped answering: where it was stuck.
    Hang(String),
    /// A worker died or broke the protocol: why.
    Error(String),
}

/// Everything known about one pair after the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairReport {
    /// The pair (local device ids).
    pub pair: Pair,
    /// How its test ended.
    pub outcome: Outcome,
}

impl PairReport {
    fn sides(&self) -> Option<(&SideVerdict, &SideVerdict)> {
        match &self.outcome {
            Outcome::Done { producer, consumer } => Some((producer, consumer)),
            _ => None,
        }
    }

    /// vLLM's boolean: both sides read back the consumer's bytes (false, with a warning, when
    /// they disagree); `None` when the pair never ran to the end.
    pub fn copy_ok(&self) -> Option<bool> {
        self.sides().map(|(p, c)| p.copy_ok && c.copy_ok)
    }

    /// The sides disagree on the copy test (vLLM logs a warning and answers false).
    pub fn disagree(&self) -> bool {
        self.sides().is_some_and(|(p, c)| p.copy_ok != c.copy_ok)
    }

    /// The kernel check, both sides combined: `Ok` only if both saw it pass.
    pub fn kernel(&self) -> KernelOutcome {
        let Some((p, c)) = self.sides() else {
            return KernelOutcome::NotRun;
        };
        match (&p.kernel, &c.kernel) {
            (KernelOutcome::Ok, KernelOutcome::Ok) => KernelOutcome::Ok,
            (KernelOutcome::Failed(a), KernelOutcome::Failed(b)) => {
                KernelOutcome::Failed(format!("{a}; {b}"))
            }
            (KernelOutcome::Failed(why), _) | (_, KernelOutcome::Failed(why)) => {
                KernelOutcome::Failed(why.clone())
            }
            _ => KernelOutcome::NotRun,
        }
    }

    /// The verdict.
    pub fn verdict(&self) -> Verdict {
        match &self.outcome {
            Outcome::Hang(why) => Verdict::Hang(why.clone()),
            Outcome::Error(why) => Verdict::Error(why.clone()),
            Outcome::Done { .. } => {
                let details = self.details();
                if details.is_empty() {
                    Verdict::Ok
                } else {
                    Verdict::Fails(details.join("; "))
                }
            }
        }
    }

    /// The boolean vLLM expects: only [`Verdict::Ok`] is true.
    pub fn ok(&self) -> bool {
        self.verdict() == Verdict::Ok
    }

    /// The driver's claim (`cudaDeviceCanAccessPeer(tgt, src)`), as the consumer asked it.
    pub fn claim(&self) -> Option<bool> {
        self.sides().and_then(|(_, c)| c.claim)
    }

    /// What was seen: why the pair failed, hung or errored; empty for a clean pass.
    pub fn details(&self) -> Vec<String> {
        let (producer, consumer) = match &self.outcome {
            Outcome::Done { producer, consumer } => (producer, consumer),
            Outcome::Hang(why) | Outcome::Error(why) => return vec![why.clone()],
        };
        let mut out = Vec::new();
        if self.disagree() {
            out.push(format!(
                "producer and consumer disagree (producer {}, consumer {}): counted as false",
                producer.copy_ok, consumer.copy_ok
            ));
        }
        for (side, v) in [("producer", producer), ("consumer", consumer)] {
            if !v.detail.is_empty() {
                out.push(format!("{side}: {}", v.detail));
            }
        }
        if let KernelOutcome::Failed(why) = self.kernel() {
            out.push(format!("kernel check: {why}"));
        }
        out.dedup();
        out
    }
}

/// The result of one check run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Devices the workers see.
    pub device_count: u32,
    /// One entry per pair, in batch order; every pair is accounted for.
    pub pairs: Vec<PairReport>,
    /// Wall time from spawning the first workers to reaping the last.
    pub elapsed: Duration,
    /// The worker executable used.
    pub worker: PathBuf,
    /// Whether the kernel check ran.
    pub kernel_check: bool,
    /// How many times workers were replaced after a hang or a death.
    pub restarts: u32,
}

impl Report {
    /// The report for `pair`, if it was checked.
    pub fn get(&self, src: u32, tgt: u32) -> Option<&PairReport> {
        self.pairs.iter().find(|p| p.pair == Pair { src, tgt })
    }
}

/// Every ordered pair of `n` devices, row-major (src outer), as vLLM's cache orders them.
pub fn all_pairs(n: u32) -> Vec<Pair> {
    (0..n)
        .flat_map(|src| (0..n).map(move |tgt| Pair { src, tgt }))
        .collect()
}

/// Finds the worker executable, in this order:
/// 1. `explicit` (from [`Options::worker`]);
/// 2. `$P2PCHECK_WORKER`;
/// 3. `p2pcheck-worker` beside the current executable, then beside the shared library holding
///    this code (a host that loads `libp2pcheck.so` from elsewhere);
/// 4. the current executable itself when it is the `p2pcheck` CLI (which also serves as a
///    worker);
/// 5. `p2pcheck-worker` on `$PATH`.
pub fn locate_worker(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return executable(p).with_context(|| format!("worker {} (from options)", p.display()));
    }
    if let Some(p) = std::env::var_os("P2PCHECK_WORKER").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return executable(&p).with_context(|| format!("P2PCHECK_WORKER={}", p.display()));
    }
    let exe = std::env::current_exe().ok();
    let mut dirs: Vec<PathBuf> = exe
        .iter()
        .filter_map(|e| e.parent().map(Path::to_path_buf))
        .collect();
    if let Some(lib) = own_library_path() {
        dirs.extend(lib.parent().map(Path::to_path_buf));
    }
    let mut tried = Vec::new();
    for dir in &dirs {
        let p = dir.join("p2pcheck-worker");
        if executable(&p).is_ok() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    if let Some(e) = exe.filter(|e| e.file_name().is_some_and(|n| n == "p2pcheck")) {
        return Ok(e);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("p2pcheck-worker");
        if executable(&p).is_ok() {
            return Ok(p);
        }
    }
    tried.push("p2pcheck-worker on $PATH".into());
    bail!(
        "cannot find the p2pcheck-worker executable (tried {}); install it beside your program \
         or set P2PCHECK_WORKER to its path",
        tried.join(", ")
    )
}

fn executable(p: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(p).with_context(|| format!("{} does not exist", p.display()))?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("{} is not an executable file", p.display());
    }
    Ok(p.to_path_buf())
}

/// The file (executable or shared library) that holds this function's code.
fn own_library_path() -> Option<PathBuf> {
    os::object_containing(own_library_path as fn() -> Option<PathBuf> as usize)
}

/// A running worker; dropping it kills its process group and reaps it.
struct Worker {
    role: Role,
    child: Child,
    stdin: Option<ChildStdin>,
    reader: FrameReader,
    _stdout: ChildStdout,
    reaped: bool,
}

impl Worker {
    fn spawn(path: &Path, role: Role, env: &[(&'static str, String)]) -> Result<Worker> {
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
            .with_context(|| format!("cannot start worker {}", path.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout was piped");
        Ok(Worker {
            role,
            reader: FrameReader::new(&stdout),
            _stdout: stdout,
            stdin,
            child,
            reaped: false,
        })
    }

    fn name(&self) -> String {
        format!("{} (pid {})", role_name(self.role), self.child.id())
    }

    fn send(&mut self, m: &Message) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stdin already closed"))?;
        os::write_all_without_sigpipe(stdin, &protocol::encode(m))
            .with_context(|| format!("cannot write to the {}", self.name()))
    }

    /// Waits until `deadline` for the worker to exit and reaps it; `None` if it is still alive.
    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.reaped = true;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return None,
            }
        }
    }

    /// Closes stdin (the worker's signal to exit) and reaps it, killing it at the deadline.
    /// Every verdict is in by now, so a bad exit is only worth a warning.
    fn finish(&mut self, deadline: Instant) {
        self.stdin = None;
        match self.wait_until(deadline) {
            Some(status) if status.success() => {}
            Some(status) => eprintln!(
                "p2pcheck: warning: the {} {} after its batch",
                self.name(),
                describe_exit(status)
            ),
            None => {
                self.kill();
                eprintln!(
                    "p2pcheck: warning: the {} did not exit after its batch; killed",
                    self.name()
                );
            }
        }
    }

    /// Why a worker that closed its pipe is gone (it is reaped here; killed if still alive).
    fn death_note(&mut self) -> String {
        match self.wait_until(Instant::now() + Duration::from_secs(1)) {
            Some(status) => format!("the {} {}", self.name(), describe_exit(status)),
            None => format!("the {} closed its pipe but did not exit", self.name()),
        }
    }

    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // The worker was started as its own process group leader (pgid = pid).
        os::kill_process_group(self.child.id());
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// "exited with code 3", "was killed by signal 11 (SIGSEGV)".
fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
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

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Producer => "producer",
        Role::Consumer => "consumer",
    }
}

/// Which worker a message came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Producer = 0,
    Consumer = 1,
}

/// Next message from either `active` worker, waiting at most until `deadline`. A worker that
/// has sent everything it owes is inactive: its exit (EOF) is not an error.
fn recv_any(
    workers: &mut [Worker; 2],
    active: [bool; 2],
    deadline: Instant,
) -> Result<(Side, Message), (Side, ProtocolError)> {
    let side = |i: usize| {
        if i == 0 {
            Side::Producer
        } else {
            Side::Consumer
        }
    };
    loop {
        for (i, w) in workers.iter_mut().enumerate().filter(|(i, _)| active[*i]) {
            if let Some(m) = w.reader.buffered().map_err(|e| (side(i), e))? {
                return Ok((side(i), m));
            }
        }
        let live: Vec<usize> = (0..2).filter(|&i| active[i]).collect();
        let fds: Vec<_> = live.iter().map(|&i| workers[i].reader.fd()).collect();
        match os::poll_readable(&fds, deadline) {
            Ok(Some(k)) => {
                let i = live[k];
                workers[i].reader.fill().map_err(|e| (side(i), e))?
            }
            Ok(None) => return Err((side(live[0]), ProtocolError::Timeout)),
            Err(e) => return Err((side(live[0]), ProtocolError::Io(e))),
        }
    }
}

/// Runs the check for `pairs` (all pairs of the visible devices when `None`).
///
/// Every pair is accounted for in the [`Report`]: a pair whose worker stops answering is a
/// [`Verdict::Hang`], one whose worker dies is a [`Verdict::Error`]; both workers are then
/// killed with their process groups and fresh ones take the remaining pairs. `Err` means the
/// check could not be carried out at all (no worker, no CUDA, bad device ids), and names why.
pub fn run(pairs: Option<&[Pair]>, opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let visible = visible::from_env();
    if matches!(&visible.devices, VisibleDevices::List(l) if l.is_empty()) {
        bail!("CUDA_VISIBLE_DEVICES is set but empty: this process may use no GPU");
    }
    if let Some(tail) = &visible.ignored {
        eprintln!(
            "p2pcheck: warning: CUDA_VISIBLE_DEVICES: CUDA ignores {tail:?} (an invalid or \
             repeated entry and everything after it)"
        );
    }
    let path = locate_worker(opts.worker.as_deref())?;
    let env = match &opts.simulate {
        Some(sim) => sim.worker_env()?,
        None => Vec::new(),
    };
    let mut batch: Option<Vec<Pair>> = pairs.map(<[Pair]>::to_vec);
    let mut device_count = 0;
    let mut reports: Vec<PairReport> = Vec::new();
    let mut restarts = 0;
    loop {
        let mut workers = [
            Worker::spawn(&path, Role::Producer, &env)?,
            Worker::spawn(&path, Role::Consumer, &env)?,
        ];
        let hello = hello(&mut workers, &path, Instant::now() + opts.startup_timeout);
        let all = match (&batch, hello) {
            (None, Ok(n)) => {
                device_count = n;
                batch.insert(all_pairs(n))
            }
            (Some(b), Ok(n)) if reports.is_empty() => {
                device_count = n;
                check_ids(b, n)?;
                b
            }
            (Some(b), Ok(_)) => b,
            (_, Err(e)) if reports.is_empty() => return Err(e),
            // Fresh workers after a hang or death could not start: every pair left is an error.
            (Some(b), Err(e)) => {
                let why = format!("no fresh worker could start after an earlier failure: {e:#}");
                let rest = b[reports.len()..].iter().map(|&pair| PairReport {
                    pair,
                    outcome: Outcome::Error(why.clone()),
                });
                reports.extend(rest);
                break;
            }
            (None, Err(_)) => unreachable!("the batch is known once any report exists"),
        };
        let remaining = &all[reports.len()..];
        if remaining.is_empty() {
            break;
        }
        for w in workers.iter_mut() {
            let role = w.role;
            w.send(&Message::Start {
                role,
                kernel_check: opts.kernel_check,
                pairs: remaining.to_vec(),
            })?;
        }
        let (done, broken) = relay(&mut workers, remaining, opts.step_timeout)?;
        reports.extend(done);
        match broken {
            // The workers are killed when `workers` drops; fresh ones take the rest.
            Some(report) => {
                reports.push(report);
                if reports.len() == all.len() {
                    break;
                }
                restarts += 1;
            }
            None => {
                let deadline = Instant::now() + opts.step_timeout;
                for w in workers.iter_mut() {
                    w.finish(deadline);
                }
                break;
            }
        }
    }
    Ok(Report {
        device_count,
        pairs: reports,
        elapsed: started.elapsed(),
        worker: path,
        kernel_check: opts.kernel_check,
        restarts,
    })
}

fn check_ids(pairs: &[Pair], device_count: u32) -> Result<()> {
    if let Some(bad) = pairs
        .iter()
        .find(|p| p.src >= device_count || p.tgt >= device_count)
    {
        bail!(
            "pair {}->{} names a device this process cannot see: {device_count} visible \
             (CUDA_VISIBLE_DEVICES={})",
            bad.src,
            bad.tgt,
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into())
        );
    }
    Ok(())
}

/// Waits for both Hellos; returns the device count.
fn hello(workers: &mut [Worker; 2], path: &Path, deadline: Instant) -> Result<u32> {
    let mut counts = [None, None];
    while counts.iter().any(Option::is_none) {
        let (from, msg) = recv_any(workers, [true, true], deadline).map_err(|(from, e)| {
            let w = &workers[from as usize];
            match e {
                ProtocolError::Timeout => anyhow!(
                    "the workers did not start CUDA within the start-up timeout ({})",
                    path.display()
                ),
                e => anyhow!("the {} failed before saying Hello: {e}", w.name()),
            }
        })?;
        let name = workers[from as usize].name();
        match msg {
            Message::Hello {
                version,
                device_count,
                ..
            } => {
                if version != protocol::VERSION {
                    bail!(
                        "the worker {} speaks protocol version {version}, this library {}: \
                         install the matching p2pcheck-worker",
                        path.display(),
                        protocol::VERSION
                    );
                }
                let n = device_count
                    .map_err(|why| anyhow!("the {name} could not start CUDA: {why}"))?;
                counts[from as usize] = Some(n);
            }
            other => bail!("the {name} sent {other:?} before Hello"),
        }
    }
    let [Some(a), Some(b)] = counts else {
        unreachable!("loop ends when both are set")
    };
    if a != b {
        bail!("the workers see different device counts ({a} and {b})");
    }
    if a == 0 {
        bail!(
            "no CUDA device is visible (CUDA_VISIBLE_DEVICES={:?})",
            std::env::var("CUDA_VISIBLE_DEVICES").ok()
        );
    }
    Ok(a)
}

/// The last event the parent saw of the pair in flight, for a hang's message.
fn last_event(last: Option<&(Side, Message)>) -> String {
    let Some((from, msg)) = last else {
        return "before the producer sent its IPC handle".into();
    };
    let who = role_name(match from {
        Side::Producer => Role::Producer,
        Side::Consumer => Role::Consumer,
    });
    let what = match msg {
        Message::Handle { .. } => "IPC handle".to_string(),
        Message::Opened { .. } => "answer to opening the handle".into(),
        Message::Barrier { stage, .. } => format!("{stage:?} barrier"),
        Message::Verdict { .. } => "verdict".into(),
        other => format!("{other:?}"),
    };
    format!("after the {who}'s {what}")
}

/// Forwards each message to the other worker and records verdicts until every pair has both,
/// or a worker hangs or dies. Returns the finished pairs and, if the batch broke off, the
/// report of the pair in flight ([`Outcome::Hang`] or [`Outcome::Error`]).
fn relay(
    workers: &mut [Worker; 2],
    pairs: &[Pair],
    step: Duration,
) -> Result<(Vec<PairReport>, Option<PairReport>)> {
    let mut verdicts: Vec<[Option<SideVerdict>; 2]> = vec![[None, None]; pairs.len()];
    let mut last: Option<(Side, Message)> = None;
    let mut current = 0;
    while current < pairs.len() {
        let active = [0, 1].map(|side| verdicts[current..].iter().any(|v| v[side].is_none()));
        let outcome = match recv_any(workers, active, Instant::now() + step) {
            Ok((from, msg)) => match route(workers, &mut verdicts, from, msg.clone()) {
                Ok(()) => {
                    last = Some((from, msg));
                    None
                }
                Err(why) => Some(Outcome::Error(why)),
            },
            Err((_, ProtocolError::Timeout)) => Some(Outcome::Hang(format!(
                "no answer for {:.1} s {}; the workers were killed",
                step.as_secs_f64(),
                last_event(last.as_ref())
            ))),
            Err((from, ProtocolError::Eof)) => {
                Some(Outcome::Error(workers[from as usize].death_note()))
            }
            Err((from, e)) => Some(Outcome::Error(format!(
                "the {}: {e}",
                workers[from as usize].name()
            ))),
        };
        if let Some(outcome) = outcome {
            let done = finished(pairs, &mut verdicts, current);
            let broken = PairReport {
                pair: pairs[current],
                outcome,
            };
            return Ok((done, Some(broken)));
        }
        while current < pairs.len() && verdicts[current].iter().all(Option::is_some) {
            current += 1;
            last = None;
        }
    }
    Ok((finished(pairs, &mut verdicts, pairs.len()), None))
}

/// Forwards `msg` from `from` to the other worker, or records it if it is a verdict; `Err`
/// says how the sender broke the protocol.
fn route(
    workers: &mut [Worker; 2],
    verdicts: &mut [[Option<SideVerdict>; 2]],
    from: Side,
    msg: Message,
) -> std::result::Result<(), String> {
    let name = workers[from as usize].name();
    let index = match &msg {
        Message::Handle { index, .. } if from == Side::Producer => *index,
        Message::Opened { index, .. } if from == Side::Consumer => *index,
        Message::Barrier { index, .. } | Message::Verdict { index, .. } => *index,
        m => return Err(format!("the {name} sent {m:?}, which it may not")),
    } as usize;
    if index >= verdicts.len() {
        return Err(format!(
            "the {name} sent a message for pair {index} of {}",
            verdicts.len()
        ));
    }
    match msg {
        Message::Verdict { verdict, .. } => {
            if verdicts[index][from as usize].replace(verdict).is_some() {
                return Err(format!("the {name} sent two verdicts for pair {index}"));
            }
            Ok(())
        }
        // A failed write means the receiver died: say how.
        m => {
            let to = &mut workers[1 - from as usize];
            to.send(&m).map_err(|_| to.death_note())
        }
    }
}

/// Reports for the first `count` pairs, whose verdicts are all in.
fn finished(
    pairs: &[Pair],
    verdicts: &mut [[Option<SideVerdict>; 2]],
    count: usize,
) -> Vec<PairReport> {
    pairs[..count]
        .iter()
        .zip(verdicts.iter_mut())
        .map(|(&pair, [p, c])| PairReport {
            pair,
            outcome: Outcome::Done {
                producer: p.take().expect("a finished pair has both verdicts"),
                consumer: c.take().expect("a finished pair has both verdicts"),
            },
        })
        .collect()
}

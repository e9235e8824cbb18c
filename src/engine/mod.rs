//! The parent side of the check: plans which processes see which GPUs, runs an engine over a
//! pool of worker processes, reruns what a hang or a death interrupted, attempts every pair
//! that did not pass a second time on fresh workers (a verdict is a fact only when the data
//! says it twice: [`Evidence`]), keeps the whole check within a deadline, and collects one
//! [`PairReport`] per pair.
//!
//! Two engines share the pool ([`pool`]) and the worker executable:
//! * [`Engine::Parallel`] (the default): one worker per GPU (two for the GPUs whose same-GPU
//!   pair is asked), each with one context for the whole run; every pair in flight at once; no
//!   device reset anywhere ([`parallel`]);
//! * [`Engine::Vllm`]: vLLM's procedure exactly (SPEC section 2): a producer and a consumer,
//!   pair after pair, each resetting its device after every pair ([`vllm`]).
//!
//! The parent never touches CUDA. The check runs on a thread of its own (see [`start`]), which
//! spawns every worker and lives until each is reaped: `PR_SET_PDEATHSIG` fires when the
//! *spawning thread* exits, so workers must not be spawned from a thread that ends earlier.

mod parallel;
pub(crate) mod pool;
mod vllm;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cuda::trace;
use crate::environment::Environment;
use crate::error::{Error, Result};
use crate::fingerprint::{self, Gpu};
use crate::model::{
    deadline_passed, Bandwidth, Engine, Evidence, Level, Link, Lost, Outcome, Pair, PairBandwidth,
    PairReport, Problem, Report, Route, TierParams, Transports, Visibility, WorkerInfo,
};
use crate::sim::Simulation;
use crate::visible::{self, VisibleDevices};
use pool::Graveyard;

pub use pool::{locate_worker, this_executable_is_a_worker};

/// How a check runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The procedure.
    pub engine: Engine,
    /// How much evidence: [`Level::Copy`] is vLLM's test exactly; [`Level::Kernel`] adds SM
    /// stores and loads through the mapping; [`Level::Handshake`] (the default) adds kernels
    /// resident on both sides at once, exchanging flags.
    pub level: Level,
    /// Bytes of the kernel tier's pattern area per pair: a multiple of 256 KiB, 256 KiB to
    /// 1 GiB [default: 2 MiB].
    pub kernel_bytes: u32,
    /// Handshake rounds between two GPUs, 1 to `MAX_HANDSHAKE_ROUNDS` (100,000) [default: 16;
    /// same-GPU pairs do 3].
    pub handshake_rounds: u32,
    /// The least budget each handshake kernel gets on the GPU clock [default: 1 s]. It is raised
    /// to what the rounds need (0.1 s, plus 5 ms a round) and capped at 60 % of
    /// [`Options::step_timeout`], so that the host's own deadline always outlasts the GPU's; a
    /// check whose rounds need more than that cap is refused, since a healthy pair could then
    /// fail for want of time.
    pub handshake_budget: Duration,
    /// What each parallel-engine worker sees (the vLLM engine ignores it).
    pub visibility: Visibility,
    /// Which transports every tier runs over [default: legacy IPC, what vLLM's check does].
    /// The cuMem transport needs the parallel engine: vLLM's procedure is legacy IPC's.
    pub transport: Transports,
    /// How long a worker may take to start CUDA, say Hello and set up its device.
    pub startup_timeout: Duration,
    /// How long the parent waits for any single step of a pair; a pair that takes longer is
    /// [`Verdict::Hang`](crate::Verdict::Hang). Traffic from a worker never extends it.
    pub step_timeout: Duration,
    /// The deadline for the whole check, from its start to the last verdict: pairs not
    /// attempted by then are [`Evidence::NotAttempted`], failures not confirmed by then
    /// [`Evidence::Unconfirmed`]. `None` (the default): [`Options::check_budget`] for the
    /// device count, once the workers have said it.
    pub check_timeout: Option<Duration>,
    /// The worker executable; `None` searches as [`locate_worker`] documents.
    pub worker: Option<PathBuf>,
    /// Run the workers on the simulated driver instead of the real one.
    pub simulate: Option<Simulation>,
    /// The audit trace (README, "Audit trace"): every CUDA call of every worker appended to
    /// this file, one JSON line each, as `P2PCHECK_TRACE=FILE` does (this option wins over the
    /// variable). This process's own calls go there too unless its trace was already decided
    /// (the first CUDA call, or [`open_trace`](crate::open_trace), decides it once per
    /// process). `None`: as `P2PCHECK_TRACE` says.
    pub trace: Option<PathBuf>,
    /// Measure every pair's bandwidth and latency through its legacy IPC mapping after the
    /// tiers (README, "Bandwidth"), into [`Report::bandwidth`] [default: off; the parallel
    /// engine only, with the IPC transport]. Each pair whose copy tier passed is measured alone; about 60 ms a pair over
    /// NVLink.
    pub bandwidth: bool,
    /// Bytes of each timed transfer of the bandwidth measurement: a multiple of 2 MiB from
    /// 2 MiB to 512 MiB [default: 64 MiB]. Each producer's buffer grows by twice this (and
    /// 6 MiB), each consumer allocates twice this. On the simulator at most 2 MiB: its figures
    /// are modelled, whatever the size, but its copies are real and slow.
    pub bandwidth_bytes: u32,
    /// The floor in GB/s under which a pair of two GPUs is `slow`, instead of its link's
    /// ([`Link::floor_gbps`]) [default: the link's; none where the link is unknown].
    pub min_gbps: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            engine: Engine::Parallel,
            level: Level::Handshake,
            kernel_bytes: DEFAULT_KERNEL_BYTES,
            handshake_rounds: 16,
            handshake_budget: Duration::from_secs(1),
            visibility: Visibility::One,
            transport: Transports::Ipc,
            startup_timeout: Duration::from_secs(60),
            step_timeout: Duration::from_secs(5),
            check_timeout: None,
            worker: None,
            simulate: None,
            trace: None,
            bandwidth: false,
            bandwidth_bytes: DEFAULT_BANDWIDTH_BYTES,
            min_gbps: None,
        }
    }
}

/// The simulator's largest bandwidth transfer (see [`Options::bandwidth_bytes`]).
const SIM_BANDWIDTH_BYTES: u32 = 2 << 20;

/// Bytes of each timed transfer of the bandwidth measurement by default: 64 MiB, large enough
/// that the link, not the start of a transfer, sets the figure (README, "Bandwidth").
pub const DEFAULT_BANDWIDTH_BYTES: u32 = 64 << 20;

/// The kernel tier's pattern area per pair by default: 2 MiB, many pages.
pub const DEFAULT_KERNEL_BYTES: u32 = 2 << 20;

/// The most handshake rounds a check accepts.
pub const MAX_HANDSHAKE_ROUNDS: u32 = 100_000;

/// What a handshake needs on the GPU clock besides its rounds: both kernels becoming resident,
/// and a same-GPU pair's 3 round trips (about 4.5 ms each on an H200), with room to spare.
const HANDSHAKE_BASE: Duration = Duration::from_millis(100);

/// What each round between two GPUs may take: about 6 us on an H200 over NVLink, but up to a
/// time slice (about 4.5 ms) when a GPU also runs other processes' kernels.
const HANDSHAKE_ROUND: Duration = Duration::from_millis(5);

/// The share of the step timeout a handshake kernel's budget may use: the host's deadline for
/// the step must outlast the GPU's.
const HANDSHAKE_SHARE: f64 = 0.6;

/// The GPU-clock budget `rounds` handshake rounds need on a healthy machine.
fn handshake_need(rounds: u32) -> Duration {
    HANDSHAKE_BASE + HANDSHAKE_ROUND * rounds
}

/// The shortest and longest timeouts accepted: below a millisecond every pair would hang,
/// and past a day a `Duration` deadline stops meaning anything.
pub const TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(86_400));

impl Options {
    /// Checks the options: timeouts within [`TIMEOUT_RANGE`], a valid simulation.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] naming the option out of range or inconsistent (a timeout,
    /// the handshake rounds against the step timeout), and the simulation's own error.
    pub fn validate(&self) -> Result<()> {
        for (name, t) in [
            ("step timeout", self.step_timeout),
            ("start-up timeout", self.startup_timeout),
        ] {
            if t < TIMEOUT_RANGE.0 || t > TIMEOUT_RANGE.1 {
                return Err(Error::InvalidInput(format!(
                    "the {name} {t:?} is outside 1 ms to 1 day"
                )));
            }
        }
        if let Some(t) = self.check_timeout {
            if t < TIMEOUT_RANGE.0 || t > TIMEOUT_RANGE.1 {
                return Err(Error::InvalidInput(format!(
                    "the check timeout {t:?} is outside 1 ms to 1 day"
                )));
            }
        }
        if self.engine == Engine::Vllm && self.transport != Transports::Ipc {
            return Err(Error::InvalidInput(format!(
                "transport {}: vLLM's procedure (--engine vllm) checks legacy CUDA IPC only, as \
                 vLLM's own check does; the cuMem transport runs on the parallel engine",
                self.transport.name()
            )));
        }
        let kb = self.kernel_bytes;
        if kb % (256 << 10) != 0 || !((256 << 10)..=(1 << 30)).contains(&kb) {
            return Err(Error::InvalidInput(format!(
                "kernel tier bytes {kb}: must be a multiple of 256 KiB from 256 KiB to 1 GiB"
            )));
        }
        if !(1..=MAX_HANDSHAKE_ROUNDS).contains(&self.handshake_rounds) {
            return Err(Error::InvalidInput(format!(
                "{} handshake rounds: from 1 to {MAX_HANDSHAKE_ROUNDS}",
                self.handshake_rounds
            )));
        }
        if self.handshake_budget < Duration::from_millis(1) {
            return Err(Error::InvalidInput(format!(
                "the handshake budget {:?} is below 1 ms",
                self.handshake_budget
            )));
        }
        let need = handshake_need(self.handshake_rounds);
        if self.level >= Level::Handshake && need > self.step_timeout.mul_f64(HANDSHAKE_SHARE) {
            return Err(Error::InvalidInput(format!(
                "{} handshake rounds need {:.3} s on the GPU clock (0.1 s, plus 5 ms a round), \
                 more than 60 % of the step timeout ({:.3} s): give a step timeout (--timeout) \
                 of at least {:.3} s, or fewer rounds",
                self.handshake_rounds,
                need.as_secs_f64(),
                self.step_timeout.as_secs_f64(),
                (need.as_secs_f64() / HANDSHAKE_SHARE * 1000.0).ceil() / 1000.0
            )));
        }
        let bb = self.bandwidth_bytes;
        if self.bandwidth && (bb % (2 << 20) != 0 || !((2 << 20)..=(512 << 20)).contains(&bb)) {
            return Err(Error::InvalidInput(format!(
                "bandwidth transfer bytes {bb}: must be a multiple of 2 MiB from 2 MiB to 512 MiB"
            )));
        }
        if self.bandwidth && self.transport == Transports::Cumem {
            return Err(Error::InvalidInput(
                "the bandwidth measurement goes through the legacy IPC mapping: give --transport \
                 ipc or all with it, not cumem alone"
                    .into(),
            ));
        }
        if self.bandwidth && self.engine == Engine::Vllm {
            return Err(Error::InvalidInput(
                "the bandwidth measurement runs on the parallel engine only, not --engine vllm"
                    .into(),
            ));
        }
        if let Some(g) = self.min_gbps {
            if !(g.is_finite() && g > 0.0) {
                return Err(Error::InvalidInput(format!(
                    "a bandwidth floor of {g} GB/s: must be a positive number"
                )));
            }
        }
        if let Some(sim) = &self.simulate {
            sim.validate()
                .map_err(|e| Error::InvalidInput(format!("{e:#}")))?;
        }
        Ok(())
    }
}

impl Options {
    /// The whole check's deadline when [`Options::check_timeout`] is not given, for `devices`
    /// GPUs: two start-ups, `4 x devices + 8` step timeouts (room for one GPU whose every pair
    /// hangs on both attempts, one after the other, as in vLLM's procedure) and 250 ms per
    /// pair (a healthy pair of vLLM's procedure, device resets included, takes about that on
    /// an H200). With the defaults: 336 s for 8 GPUs. With [`Options::bandwidth`], 2 step
    /// timeouts and 250 ms per pair more (a pair's measurement takes about 60 ms over NVLink).
    /// It bounds the sum of all steps: a worker that claims many GPUs and then stays silent
    /// costs this, not one timeout per pair.
    pub fn check_budget(&self, devices: u32) -> Duration {
        let n = u64::from(devices);
        let tiers = self.startup_timeout * 2
            + self.step_timeout * (4 * devices + 8)
            + Duration::from_millis(250 * n * n);
        // The bandwidth phase: a slow pair's step may take a good part of its timeout, and a
        // healthy one about 60 ms (250 ms of room).
        match self.bandwidth {
            true => tiers + self.step_timeout * 2 + Duration::from_millis(250 * n * n),
            false => tiers,
        }
    }
}

/// A check running in the background (see [`start`](crate::start)).
///
/// Every method takes `&self`, and `Pending` is `Send + Sync`: one thread may wait while
/// another cancels (share it with `std::sync::Arc` or a scoped thread). The result is kept:
/// every wait after the check ended gives the same result again (a copy of the report, or the
/// same error). A `Pending` belongs to the process that started the check: in the child of a
/// `fork`, every method answers at once without touching anything the parent's threads may
/// hold (waits give [`Error::InvalidInput`] saying so; [`Pending::cancel`] and
/// [`Pending::finish`] do nothing).
pub struct Pending {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Vec<String>>>,
    owner: ProcessOwner,
}

/// What a [`Pending`] and its check's thread share.
struct Shared {
    /// `None` while the check runs; then its result, never replaced.
    result: Mutex<Option<Arc<Result<Report>>>>,
    /// Signalled once, when the result is set.
    ready: Condvar,
    /// Read by the check's waits, which then kill the workers and return.
    cancel: AtomicBool,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            result: Mutex::new(None),
            ready: Condvar::new(),
            cancel: AtomicBool::new(false),
        }
    }

    /// The result slot; a panic while it was held cannot leave it half-written (it is one
    /// assignment), so a poisoned lock is used as it is.
    fn slot(&self) -> MutexGuard<'_, Option<Arc<Result<Report>>>> {
        self.result.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the result unless one is set already (a cancel's comes first); wakes every waiter.
    fn settle(&self, result: Result<Report>) {
        let mut slot = self.slot();
        if slot.is_none() {
            *slot = Some(Arc::new(result));
            self.ready.notify_all();
        }
    }
}

/// Sets a result when the check's thread ends without one (it cannot, short of a bug), so
/// that no waiter waits for ever.
struct SettleOnExit(Arc<Shared>);

impl Drop for SettleOnExit {
    fn drop(&mut self) {
        self.0.settle(Err(Error::Internal {
            what: "the check's thread ended without an answer",
        }));
    }
}

/// The process that made a handle (a [`Pending`], or a C ABI handle): after a `fork`, the
/// child's copy must not touch locks or threads that only exist in the parent. Public for
/// programs that wrap p2pcheck's handles in their own, as the C ABI does.
#[derive(Clone, Copy, Debug)]
pub struct ProcessOwner(u32);

impl ProcessOwner {
    /// This process.
    pub fn current() -> ProcessOwner {
        ProcessOwner(std::process::id())
    }

    /// Whether this is still the owner's process (the pid is asked each time: a child of
    /// `fork` has its own).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] naming `what` and both processes when called from another
    /// process than the owner's.
    pub fn check(self, what: &str) -> Result<()> {
        let here = std::process::id();
        match here == self.0 {
            true => Ok(()),
            false => Err(Error::InvalidInput(format!(
                "{what} was made by process {}, and this is process {here} (a child of fork?): \
                 a handle is used only in the process that made it",
                self.0
            ))),
        }
    }
}

impl Pending {
    /// The result if the check has ended, without waiting; `None` while it runs.
    pub fn try_wait(&self) -> Option<Result<Report>> {
        self.wait_timeout(Duration::ZERO)
    }

    /// Waits at most `timeout` for the result; `None` if the check still runs then. A
    /// [`Pending::cancel`] from another thread ends the wait at once with
    /// [`Error::Cancelled`] (unless the result was complete already).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<Report>> {
        if let Err(e) = self.owner.check("this check") {
            return Some(Err(e));
        }
        // A timeout too long for the clock is no timeout.
        let deadline = Instant::now().checked_add(timeout);
        let mut slot = self.shared.slot();
        loop {
            if let Some(result) = slot.as_ref() {
                let result = Arc::clone(result);
                drop(slot);
                return Some((*result).clone());
            }
            let ready = &self.shared.ready;
            slot = match deadline {
                None => ready.wait(slot).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    ready
                        .wait_timeout(slot, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Waits for the result (the check's own deadlines bound it). The workers may still be
    /// exiting: see [`Pending::finish`].
    ///
    /// # Errors
    ///
    /// The check's error, as [`crate::check`] gives it; [`Error::Cancelled`] after
    /// [`Pending::cancel`]; [`Error::InvalidInput`] in another process than the one that
    /// started the check.
    pub fn wait(&self) -> Result<Report> {
        self.wait_timeout(Duration::MAX)
            .unwrap_or(Err(Error::Internal {
                what: "the wait ended without a result",
            }))
    }

    /// Stops the check, from any thread, without blocking: unless the result was complete
    /// already it becomes [`Error::Cancelled`] at once (waits return), and the check's thread
    /// then kills and reaps its workers.
    pub fn cancel(&self) {
        if self.owner.check("this check").is_ok() {
            self.shared.cancel.store(true, Ordering::Relaxed);
            self.shared.settle(Err(Error::Cancelled));
        }
    }

    /// Waits until every worker has exited and been reaped; returns a warning for each that
    /// did not exit cleanly. A check that has no result yet is cancelled first.
    pub fn finish(mut self) -> Vec<String> {
        self.cancel();
        match self.owner.check("this check") {
            // In a child of fork the thread is the parent's: Drop leaves it alone.
            Err(_) => Vec::new(),
            Ok(()) => self
                .thread
                .take()
                .and_then(|t| t.join().ok())
                .unwrap_or_default(),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Nobody will read the result: stop early. The thread still reaps every worker.
        self.cancel();
        if self.owner.check("this check").is_err() {
            // The thread is the parent's: a child has nothing of it to join or detach.
            std::mem::forget(self.thread.take());
        }
    }
}

/// How often a waiting check looks at its cancel flag.
pub(crate) const CANCEL_POLL: Duration = Duration::from_millis(50);

/// How long workers get to exit after their work (context teardown) before they are killed.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many checks' threads of this process are running (checking, or reaping their
/// workers), with a condition variable signalled when one ends: see [`wait_for_checks`].
static RUNNING: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// One running check's thread, counted in [`RUNNING`] while it lives.
struct Running;

impl Running {
    fn enter() -> Running {
        *RUNNING.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        *RUNNING.0.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        RUNNING.1.notify_all();
    }
}

/// Waits until no check of this process is running any more (every worker it started is
/// reaped, or parked as stuck), or until `deadline`; whether none is.
pub(crate) fn wait_for_checks(deadline: Instant) -> bool {
    let mut running = RUNNING.0.lock().unwrap_or_else(|p| p.into_inner());
    while *running > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        running = RUNNING
            .1
            .wait_timeout(running, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    true
}

/// What the check's thread does to a finished report before handing it over, with what only a
/// layer above the engine knows (the links NVML describes, for the bandwidth verdicts).
pub(crate) type Finish = fn(&mut Report, &Options);

/// Starts checking `pairs` (all pairs of the visible devices when `None`) in the background
/// and returns at once, so a caller can overlap the check with its own start-up; `finish` is
/// applied to the report on the check's thread before it is handed over.
///
/// The check runs on its own thread, which spawns the workers and outlives them: after the
/// report is handed over it reaps every worker (they tear their contexts down off the critical
/// path). Dropping the [`Pending`] before the check has a result cancels it.
pub(crate) fn start(pairs: Option<Vec<Pair>>, opts: Options, finish: Finish) -> Pending {
    // The caller's environment at the call, read once: the check's thread never reads it again.
    let environment = Environment::read();
    let shared = Arc::new(Shared::new());
    let theirs = Arc::clone(&shared);
    // Counted from here, so that a wait for the checks that begins once this returns sees it.
    let running = Running::enter();
    let thread = std::thread::Builder::new()
        .name("p2pcheck".into())
        .spawn(move || {
            let _running = running;
            let settle = SettleOnExit(theirs);
            let mut graveyard = Graveyard::default();
            // A bug here must not take an embedding host down, nor leave the caller waiting.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_rounds(
                    pairs.as_deref(),
                    &opts,
                    &environment,
                    &mut graveyard,
                    &settle.0.cancel,
                )
                .map(|mut report| {
                    finish(&mut report, &opts);
                    report
                })
            }))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(Error::Bug { what })
            });
            settle.0.settle(result);
            graveyard.reap(Instant::now() + REAP_TIMEOUT)
        });
    let thread = match thread {
        Ok(t) => Some(t),
        Err(e) => {
            shared.settle(Err(Error::Thread {
                source_text: e.to_string(),
            }));
            None
        }
    };
    Pending {
        shared,
        thread,
        owner: ProcessOwner::current(),
    }
}

/// Runs the check for `pairs` (all pairs of the visible devices when `None`) and returns as
/// soon as every verdict is known; the workers exit and are reaped in the background.
///
/// Every pair is accounted for in the [`Report`]: a pair whose worker stops answering is a
/// [`Verdict::Hang`], one whose worker dies is a [`Verdict::Error`]; a pair that does not pass
/// at once is attempted again on fresh workers, and its [`Evidence`] says whether the verdict
/// is a fact; pairs a broken worker interrupted are rerun. The whole check has a deadline
/// ([`Options::check_timeout`]). `Err` means the check could not be carried out at all (no
/// worker, no CUDA, bad device ids), and names why.
pub(crate) fn run(pairs: Option<&[Pair]>, opts: &Options, finish: Finish) -> Result<Report> {
    start(pairs.map(<[Pair]>::to_vec), opts.clone(), finish).wait()
}

/// What an engine needs for one round.
pub(crate) struct Ctx<'a> {
    pub opts: &'a Options,
    /// The caller's environment, read once when the check started.
    pub environment: &'a Environment,
    pub path: PathBuf,
    /// Environment every worker gets on top of this process's (the simulator's variables, the
    /// trace's destination).
    pub env: Vec<(OsString, OsString)>,
    /// The visible GPUs in local order, when known without CUDA.
    pub gpus: Option<Vec<Gpu>>,
    pub visibility: Visibility,
    pub cancel: &'a AtomicBool,
    /// How the tiers beyond copy run, the run's seed included.
    pub tiers: TierParams,
    /// GPUs the kernel driver lists (`/proc/driver/nvidia`), where it could be read: no worker
    /// can see more, so a claim of more is refused before anything is sized by it.
    pub driver_gpus: Option<u32>,
    /// When the check started.
    pub started: Instant,
    /// The whole check's deadline: from [`Options::check_timeout`], else set by the first
    /// round that learns the device count ([`Ctx::arm_deadline`]).
    pub deadline: Cell<Option<Instant>>,
}

impl Ctx<'_> {
    /// Sets the whole check's deadline from [`Options::check_budget`] for `devices` GPUs,
    /// unless it is set already.
    pub fn arm_deadline(&self, devices: u32) {
        if self.deadline.get().is_none() {
            let budget = self.opts.check_budget(devices);
            self.deadline.set(Some(self.started + budget));
        }
    }

    /// Whether the whole check's deadline has passed.
    pub fn past_deadline(&self) -> bool {
        self.deadline.get().is_some_and(|d| Instant::now() >= d)
    }

    /// When a waiting engine looks up next (at its cancel flag and the check's deadline).
    pub fn wake(&self) -> Instant {
        let poll = Instant::now() + CANCEL_POLL;
        self.deadline.get().map_or(poll, |d| poll.min(d))
    }

    /// The whole check's budget: from its start to its deadline (zero while unset).
    pub fn budget(&self) -> Duration {
        self.deadline.get().map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(self.started)
        })
    }

    /// "the check's deadline (320.0 s) passed", for messages.
    fn deadline_words(&self) -> String {
        deadline_passed(self.budget())
    }
}

/// What a round produced.
pub(crate) struct RoundOut {
    /// Devices the workers see.
    pub n: u32,
    /// The pairs of the round, each over its transport.
    pub routes: Vec<Route>,
    /// One per route: its outcome, or `None` when a broken worker interrupted it before it ran.
    pub outcomes: Vec<Option<Outcome>>,
    /// The bandwidth measured in the round, per pair (empty without the measurement).
    pub measured: Vec<parallel::Measured>,
    pub workers: Vec<WorkerInfo>,
    pub peak_in_flight: u32,
}

/// Why a round gave no outcomes.
pub(crate) enum RoundError {
    /// The check cannot be carried out.
    Fatal(Error),
    /// Single-GPU visibility does not work here: run again seeing all (the reason).
    Fallback(String),
}

impl From<Error> for RoundError {
    fn from(e: Error) -> RoundError {
        RoundError::Fatal(e)
    }
}

/// An upper bound on rounds: every round gives at least one pair an attempt.
fn max_rounds(pairs: usize) -> u32 {
    2 * pairs as u32 + 2
}

/// The whole check: the first round, then rounds of fresh workers for what was interrupted
/// and for second attempts, until every pair is settled, the deadline passes or no fresh
/// worker can start; then each pair's attempts settled into its report.
fn run_rounds(
    pairs: Option<&[Pair]>,
    opts: &Options,
    environment: &Environment,
    graveyard: &mut Graveyard,
    cancel: &AtomicBool,
) -> Result<Report> {
    let started = Instant::now();
    opts.validate()?;
    let mut warnings = Vec::new();
    visible_devices(environment, &mut warnings)?;
    let path = locate_worker(opts.worker.as_deref())?;
    // Kept to the end of the check: it holds the simulation's @once ledger.
    let sim_env = match &opts.simulate {
        Some(sim) => Some(
            sim.worker_env()
                .map_err(|e| Error::InvalidInput(format!("{e:#}")))?,
        ),
        None => None,
    };
    let mut env: Vec<(OsString, OsString)> = sim_env
        .iter()
        .flat_map(|e| e.vars.iter())
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    if let Some(file) = &opts.trace {
        trace::open_destination(Some(file.as_os_str())).map_err(Error::InvalidInput)?;
        env.push((trace::VAR.into(), file.into()));
    }
    let machine = machine(opts.simulate.as_ref());
    let (gpus, visibility, note) = plan(opts, environment, machine.as_ref().map_err(Clone::clone));
    warnings.extend(note);
    let mut ctx = Ctx {
        opts,
        environment,
        path,
        env,
        gpus,
        visibility,
        cancel,
        tiers: tier_params(opts),
        driver_gpus: machine.ok().map(|m| m.gpus.len() as u32),
        started,
        deadline: Cell::new(opts.check_timeout.map(|t| started + t)),
    };
    let mut rounds = Rounds {
        graveyard,
        warnings,
        workers: Vec::new(),
        peak_in_flight: 0,
        measured: BTreeMap::new(),
    };
    let routes: Option<Vec<Route>> = pairs.map(|pairs| {
        opts.transport
            .list()
            .iter()
            .flat_map(|&transport| pairs.iter().map(move |&pair| Route { transport, pair }))
            .collect()
    });
    let first = rounds.round(&mut ctx, routes.as_deref(), usize::MAX)?;
    let n = first.n;
    let batch = first.routes.clone();
    let (tries, restarts) = rounds.attempt_all(&mut ctx, &batch, first)?;
    let pairs: Vec<PairReport> = batch
        .iter()
        .zip(tries)
        .map(|(&route, tries)| PairReport::settle(route, tries, ctx.budget()))
        .collect();
    let mut warnings = rounds.warnings;
    warnings.extend(settling_warnings(&ctx, &pairs));
    Ok(Report {
        device_count: n,
        pairs,
        engine: opts.engine,
        level: opts.level,
        transport: opts.transport,
        visibility: ctx.visibility,
        answer: started.elapsed(),
        worker: ctx.path,
        restarts,
        workers_started: rounds.workers.len() as u32,
        peak_in_flight: rounds.peak_in_flight,
        workers: rounds.workers,
        warnings,
        bandwidth: rounds
            .measured
            .into_iter()
            .map(|(pair, m)| PairBandwidth::judge(pair, m, known_link(pair, opts), opts.min_gbps))
            .collect(),
    })
}

/// The path of `pair` as the engine knows it: one GPU, or the simulator's modelled link; the
/// crate root refines the rest from NVML (`p2pcheck::link_bandwidth`).
fn known_link(pair: Pair, opts: &Options) -> Link {
    match (pair.src == pair.tgt, &opts.simulate) {
        (true, _) => Link::SameGpu,
        (false, Some(_)) => Link::Simulated,
        (false, None) => Link::Unknown,
    }
}

/// `CUDA_VISIBLE_DEVICES` as CUDA reads it: an error when it selects no GPU, a warning in
/// `warnings` for the part CUDA ignores.
fn visible_devices(environment: &Environment, warnings: &mut Vec<String>) -> Result<()> {
    // A value that is not valid UTF-8 is read lossily, so its bad part shows as ignored.
    let lossy = environment
        .cvd
        .as_deref()
        .map(|v| v.to_string_lossy().into_owned());
    let cvd = visible::parse(lossy.as_deref());
    if matches!(&cvd.devices, VisibleDevices::List(l) if l.is_empty()) {
        let value = environment.cvd.clone().unwrap_or_default();
        let first = value.to_string_lossy();
        let first = first.split(',').next().unwrap_or_default().trim();
        return Err(Error::NoDevice(if value.is_empty() {
            "CUDA_VISIBLE_DEVICES is set but empty: CUDA shows this process no GPU".into()
        } else {
            format!(
                "CUDA_VISIBLE_DEVICES={value:?} selects no GPU: CUDA stops at the first invalid \
                 entry, here the first ({first:?})"
            )
        }));
    }
    if let Some(tail) = &cvd.ignored {
        warnings.push(format!(
            "CUDA_VISIBLE_DEVICES: CUDA ignores {tail:?} (an invalid or repeated entry and \
             everything after it)"
        ));
    }
    Ok(())
}

/// The warnings the settled reports call for: pairs the deadline left unsettled, and pairs
/// whose two processes disagree.
fn settling_warnings(ctx: &Ctx, pairs: &[PairReport]) -> Vec<String> {
    let mut warnings = Vec::new();
    let count = |e: Evidence| pairs.iter().filter(|p| p.evidence == e).count();
    let (never, unconfirmed) = (count(Evidence::NotAttempted), count(Evidence::Unconfirmed));
    if never + unconfirmed > 0 {
        warnings.push(format!(
            "{} before every pair was settled: {never} pair(s) not attempted, {unconfirmed} \
             failure(s) not confirmed (the whole check's timeout allows more)",
            ctx.deadline_words()
        ));
    }
    for p in pairs.iter().filter(|p| p.disagree()) {
        warnings.push(format!(
            "{}: the two processes disagree ({}); counted as false",
            p.pair,
            p.details().join("; ")
        ));
    }
    warnings
}

/// What the rounds of one check share: where finished workers go, the warnings so far, every
/// worker started and the most pairs in flight at once.
struct Rounds<'g> {
    graveyard: &'g mut Graveyard,
    warnings: Vec<String>,
    workers: Vec<WorkerInfo>,
    peak_in_flight: u32,
    /// Each pair's latest bandwidth measurement.
    measured: BTreeMap<Pair, std::result::Result<Bandwidth, Problem>>,
}

impl Rounds<'_> {
    /// One round on fresh workers; `hold`: pairs from this position on are second attempts,
    /// run after the others, so that a second hang cannot interrupt them. A visibility that
    /// does not work here falls back to every GPU, with a warning, and the round runs again.
    fn round(&mut self, ctx: &mut Ctx, routes: Option<&[Route]>, hold: usize) -> Result<RoundOut> {
        loop {
            let out = match ctx.opts.engine {
                Engine::Parallel => parallel::round(ctx, routes, hold, self.graveyard),
                // The vLLM engine runs its batch in order: the second attempts are last already.
                Engine::Vllm => vllm::round(ctx, routes, self.graveyard),
            };
            match out {
                Ok(out) => return Ok(out),
                Err(RoundError::Fatal(e)) => return Err(e),
                Err(RoundError::Fallback(why)) => {
                    self.warnings
                        .push(format!("each worker sees every GPU: {why}"));
                    ctx.visibility = Visibility::All;
                    ctx.gpus = None;
                }
            }
        }
    }

    /// Runs rounds of fresh workers after `first` until each pair of `batch` passed or was
    /// attempted twice (or the deadline passed, or no fresh worker could start): each pair's
    /// attempts, and the rounds after the first.
    fn attempt_all(
        &mut self,
        ctx: &mut Ctx,
        batch: &[Route],
        first: RoundOut,
    ) -> Result<(Vec<Vec<Outcome>>, u32)> {
        // Each pair's attempts so far; it is final once it passed or was attempted twice.
        let mut tries: Vec<Vec<Outcome>> = vec![Vec::new(); batch.len()];
        let mut restarts = 0;
        let mut current: Vec<usize> = (0..batch.len()).collect();
        let mut out = first;
        loop {
            self.workers.append(&mut out.workers);
            self.measured.extend(out.measured.drain(..));
            self.peak_in_flight = self.peak_in_flight.max(out.peak_in_flight);
            let (next, hold) = record_round(&mut tries, &current, out.outcomes);
            if next.is_empty() {
                break;
            }
            if ctx.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            if ctx.past_deadline() {
                break;
            }
            restarts += 1;
            let rerun: Vec<Route> = next.iter().map(|&i| batch[i]).collect();
            let fresh = if restarts > max_rounds(batch.len()) {
                Err(Error::GaveUp { rounds: restarts })
            } else {
                self.round(ctx, Some(&rerun), hold)
            };
            out = match fresh {
                Ok(out) => out,
                Err(Error::Cancelled) => return Err(Error::Cancelled),
                Err(_) if ctx.past_deadline() => break,
                // No fresh worker could start: that is every pair's attempt left.
                Err(e) => {
                    let lost = Lost::NoFreshWorker { why: e.to_string() };
                    for &i in &next {
                        tries[i].push(Outcome::Error(lost.clone()));
                    }
                    break;
                }
            };
            current = next;
        }
        Ok((tries, restarts))
    }
}

/// Adds a round's outcomes (one per pair of `current`, positions in the batch) to `tries`;
/// returns the pairs to run next — first those interrupted before they ran (not an attempt),
/// then those that did not pass and have one attempt left — and where the second begin.
fn record_round(
    tries: &mut [Vec<Outcome>],
    current: &[usize],
    outcomes: Vec<Option<Outcome>>,
) -> (Vec<usize>, usize) {
    let (mut next, mut again) = (Vec::new(), Vec::new());
    for (&i, outcome) in current.iter().zip(outcomes) {
        let Some(o) = outcome else {
            next.push(i); // interrupted before it ran: not an attempt
            continue;
        };
        let passed = o.passed();
        tries[i].push(o);
        if !passed && tries[i].len() < 2 {
            again.push(i);
        }
    }
    let hold = next.len();
    next.append(&mut again);
    (next, hold)
}

/// The environment variable of the test switch that plants a fault on real GPUs: set to `1`,
/// the consumer's SM stores land 64 bytes off, which the kernel tier must catch (as
/// `wrong-data`) while the copy tier passes (tests/gpu.rs). Never set it to check a machine.
pub(crate) const PLANT_SHIFTED_STORES_ENV: &str = "P2PCHECK_TEST_PLANT_SHIFTED_STORES";

/// The kernel tier's store offset: 64 bytes under [`PLANT_SHIFTED_STORES_ENV`], else 0.
pub(crate) fn planted_shift() -> u32 {
    match std::env::var_os(PLANT_SHIFTED_STORES_ENV) {
        Some(v) if v == "1" => 64,
        _ => 0,
    }
}

/// The tiers' parameters for a run: the options, and a seed of its own (time and pid), so
/// that nothing left from an earlier run can pass for this one's pattern.
fn tier_params(opts: &Options) -> TierParams {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    TierParams {
        kernel_bytes: if opts.level >= Level::Kernel {
            opts.kernel_bytes
        } else {
            0
        },
        seed: now ^ (u64::from(std::process::id()) << 32),
        shift: planted_shift(),
        rounds: opts.handshake_rounds,
        bandwidth_bytes: match (opts.bandwidth, &opts.simulate) {
            (false, _) => 0,
            (true, None) => opts.bandwidth_bytes,
            (true, Some(_)) => opts.bandwidth_bytes.min(SIM_BANDWIDTH_BYTES),
        },
        budget_ms: opts
            .handshake_budget
            .max(handshake_need(opts.handshake_rounds))
            .min(opts.step_timeout.mul_f64(HANDSHAKE_SHARE))
            .as_millis()
            .clamp(1, u32::MAX as u128) as u32,
    }
}

/// The machine as the kernel driver's `/proc` files describe it (or the simulation, when
/// simulating), read without initialising CUDA.
pub(crate) fn machine(
    simulate: Option<&Simulation>,
) -> std::result::Result<fingerprint::Machine, String> {
    match simulate {
        Some(sim) => Ok(sim.machine()),
        None => fingerprint::read_machine(),
    }
}

/// The GPUs `cvd` (the raw `CUDA_VISIBLE_DEVICES`) selects on `machine`, in local order, under
/// `order` (the raw `CUDA_DEVICE_ORDER`); an error where they cannot be named without CUDA, or
/// when `/proc` lists none of them.
pub(crate) fn visible_gpus(
    machine: &fingerprint::Machine,
    cvd: Option<&str>,
    order: Option<&str>,
) -> std::result::Result<Vec<Gpu>, String> {
    let gpus = fingerprint::resolve_visible(cvd, order, machine)?;
    if gpus.is_empty() {
        return Err("/proc/driver/nvidia lists none of the visible GPUs".into());
    }
    Ok(gpus)
}

/// Which GPUs the workers see: their UUIDs in local order when they can be known without
/// CUDA, the visibility that gives, and why it differs from the one asked for.
fn plan(
    opts: &Options,
    environment: &Environment,
    machine: std::result::Result<&fingerprint::Machine, String>,
) -> (Option<Vec<Gpu>>, Visibility, Option<String>) {
    if opts.engine == Engine::Vllm {
        return (None, Visibility::All, None);
    }
    let cvd = &environment.cvd;
    let resolved = machine.and_then(|m| {
        let cvd = match &cvd {
            None => None,
            Some(v) => Some(v.to_str().ok_or_else(|| {
                "CUDA_VISIBLE_DEVICES is not UTF-8 text, so its GPUs cannot be named".to_string()
            })?),
        };
        visible_gpus(m, cvd, environment.device_order())
    });
    match (opts.visibility, resolved) {
        (Visibility::One, Ok(gpus)) => (Some(gpus), Visibility::One, None),
        (Visibility::One, Err(why)) => (
            None,
            Visibility::All,
            Some(format!("each worker sees every GPU: {why}")),
        ),
        (Visibility::All, r) => (r.ok(), Visibility::All, None),
    }
}

/// Checks that every pair names a device below `n`.
pub(crate) fn check_ids(pairs: &[Pair], n: u32, environment: &Environment) -> Result<()> {
    if let Some(bad) = pairs.iter().find(|p| p.src >= n || p.tgt >= n) {
        return Err(Error::InvalidInput(format!(
            "pair {bad} names a device this process cannot see: {n} visible \
             (CUDA_VISIBLE_DEVICES={})",
            environment.cvd_utf8().unwrap_or("<unset>")
        )));
    }
    Ok(())
}

/// A Hello's device count, checked: the worker could start CUDA, sees at least one GPU, and
/// no more than the driver lists (`limit`, where known).
pub(crate) fn hello_count(
    environment: &Environment,
    worker: &str,
    path: &std::path::Path,
    version: u16,
    count: std::result::Result<u32, Problem>,
    limit: Option<u32>,
) -> Result<u32> {
    if version != crate::protocol::VERSION {
        return Err(Error::Version {
            worker: path.to_path_buf(),
            theirs: version,
        });
    }
    match count {
        Err(problem) => Err(Error::WorkerCuda {
            worker: worker.to_string(),
            problem,
        }),
        Ok(0) => Err(Error::NoDevice(format!(
            "no CUDA device is visible (CUDA_VISIBLE_DEVICES={:?})",
            environment.cvd_utf8()
        ))),
        Ok(n) if limit.is_some_and(|l| n > l) => Err(Error::WorkerClaim {
            worker: worker.to_string(),
            claimed: n,
            listed: limit.unwrap_or(0),
        }),
        Ok(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_checks_budget_grows_with_the_gpus_and_the_timeouts() {
        let opts = Options::default();
        assert_eq!(opts.check_budget(8), Duration::from_secs(336));
        assert_eq!(opts.check_budget(1), Duration::from_millis(180_250));
        let short = Options {
            startup_timeout: Duration::from_secs(1),
            step_timeout: Duration::from_millis(100),
            ..Options::default()
        };
        assert_eq!(
            short.check_budget(2),
            Duration::from_millis(2000 + 1600 + 1000)
        );
        let bad = Options {
            check_timeout: Some(Duration::ZERO),
            ..Options::default()
        };
        assert!(bad.validate().is_err());
    }
}

#[cfg(test)]
mod handshake_budget_tests {
    use super::*;

    fn opts(rounds: u32, step_s: f64, level: Level) -> Options {
        Options {
            handshake_rounds: rounds,
            step_timeout: Duration::from_secs_f64(step_s),
            level,
            ..Options::default()
        }
    }

    #[test]
    fn the_default_budget_is_one_second_and_grows_with_the_rounds_up_to_the_share() {
        // 16 rounds need 0.18 s: the default 1 s stands.
        assert_eq!(
            tier_params(&opts(16, 5.0, Level::Handshake)).budget_ms,
            1000
        );
        // 500 rounds need 2.6 s, within 60 % of 5 s.
        assert_eq!(
            tier_params(&opts(500, 5.0, Level::Handshake)).budget_ms,
            2600
        );
        // A short step timeout caps it (0.6 s), and still fits 16 rounds.
        let short = opts(16, 1.0, Level::Handshake);
        assert!(short.validate().is_ok());
        assert_eq!(tier_params(&short).budget_ms, 600);
    }

    #[test]
    fn rounds_that_cannot_fit_the_step_timeout_are_refused_with_the_timeout_that_fits() {
        // 1000 rounds need 5.1 s: more than 60 % of 5 s.
        let err = opts(1000, 5.0, Level::Handshake).validate().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("1000 handshake rounds need 5.100 s"),
            "{text}"
        );
        assert!(text.contains("at least 8.500 s"), "{text}");
        // ... and that timeout is enough.
        assert!(opts(1000, 8.5, Level::Handshake).validate().is_ok());
        assert_eq!(
            tier_params(&opts(1000, 8.5, Level::Handshake)).budget_ms,
            5100
        );
        // Without the handshake tier the rounds do not matter, but their range does.
        assert!(opts(1000, 5.0, Level::Kernel).validate().is_ok());
        for bad in [0, MAX_HANDSHAKE_ROUNDS + 1, 1_000_000] {
            for level in [Level::Copy, Level::Handshake] {
                assert!(opts(bad, 86_400.0, level).validate().is_err(), "{bad}");
            }
        }
        // The most rounds, with a timeout that fits them: 500.1 s of budget.
        let most = opts(MAX_HANDSHAKE_ROUNDS, 833.5, Level::Handshake);
        assert!(most.validate().is_ok());
        assert_eq!(tier_params(&most).budget_ms, 500_100);
        // A step timeout too short for even one round's handshake.
        assert!(opts(1, 0.1, Level::Handshake).validate().is_err());
    }

    #[test]
    fn every_accepted_budget_holds_the_rounds_and_stays_within_the_share() {
        let mut accepted = 0;
        for rounds in [1, 3, 16, 100, 1000, 10_000, MAX_HANDSHAKE_ROUNDS] {
            for step_ms in [1, 50, 200, 1000, 5000, 60_000, 900_000, 86_400_000] {
                let o = Options {
                    handshake_budget: Duration::from_millis(1),
                    ..opts(rounds, step_ms as f64 / 1000.0, Level::Handshake)
                };
                if o.validate().is_err() {
                    continue;
                }
                let budget = u64::from(tier_params(&o).budget_ms);
                assert!(
                    budget as u128 >= handshake_need(rounds).as_millis(),
                    "{rounds} {step_ms}"
                );
                assert!(budget * 10 <= step_ms * 6, "{rounds} {step_ms}");
                accepted += 1;
            }
        }
        assert_eq!(accepted, 29);
    }
}

//! The parent side of the check: plans which processes see which GPUs, runs an engine over a
//! pool of worker processes, retries what a hang or a death interrupted, and collects one
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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fingerprint::{self, Gpu};
use crate::protocol::{Level, Pair, Problem, SideVerdict, TierOutcome, TierParams};
use crate::sim::Simulation;
use crate::visible::{self, VisibleDevices};
use pool::Graveyard;

pub use pool::locate_worker;

/// Which procedure checks the pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// One worker per GPU for the whole run, every pair at once, no device reset.
    Parallel,
    /// vLLM's procedure exactly: two workers, pair after pair, a device reset after each.
    Vllm,
}

impl Engine {
    /// `parallel` or `vllm`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Parallel => "parallel",
            Engine::Vllm => "vllm",
        }
    }
}

/// Which GPUs a parallel-engine worker's CUDA sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visibility {
    /// Only its own GPU (`CUDA_VISIBLE_DEVICES` = that GPU's UUID): CUDA starts faster the
    /// fewer GPUs it sees, and IPC mappings of a GPU it cannot see work the same. Needs the
    /// GPUs' UUIDs from `/proc/driver/nvidia`; where they cannot be known without CUDA (MIG,
    /// GPUs hidden from /proc, mixed models under CUDA's default order) the check falls back
    /// to [`Visibility::All`] and says why.
    One,
    /// Every GPU this process sees (its own `CUDA_VISIBLE_DEVICES`). The vLLM engine always
    /// runs this way.
    All,
}

impl Visibility {
    /// `one` or `all`.
    pub fn name(self) -> &'static str {
        match self {
            Visibility::One => "one",
            Visibility::All => "all",
        }
    }
}

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
    /// Handshake rounds between two GPUs, 1 to [`MAX_HANDSHAKE_ROUNDS`] [default: 16; same-GPU
    /// pairs do 3].
    pub handshake_rounds: u32,
    /// The least budget each handshake kernel gets on the GPU clock [default: 1 s]. It is raised
    /// to what the rounds need (0.1 s, plus 5 ms a round) and capped at 60 % of
    /// [`Options::step_timeout`], so that the host's own deadline always outlasts the GPU's; a
    /// check whose rounds need more than that cap is refused, since a healthy pair could then
    /// fail for want of time.
    pub handshake_budget: Duration,
    /// Test only: the consumer's SM stores land 64 bytes off, a planted fault the kernel tier
    /// must catch (as `wrong-data`). Never set it to check a machine.
    pub test_plant_shifted_stores: bool,
    /// What each parallel-engine worker sees (the vLLM engine ignores it).
    pub visibility: Visibility,
    /// How long a worker may take to start CUDA, say Hello and set up its device.
    pub startup_timeout: Duration,
    /// How long the parent waits for any single step of a pair; a pair that takes longer is
    /// [`Verdict::Hang`]. Traffic from a worker never extends it.
    pub step_timeout: Duration,
    /// The worker executable; `None` searches as [`locate_worker`] documents.
    pub worker: Option<PathBuf>,
    /// Run the workers on the simulated driver instead of the real one.
    pub simulate: Option<Simulation>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            engine: Engine::Parallel,
            level: Level::Handshake,
            kernel_bytes: DEFAULT_KERNEL_BYTES,
            handshake_rounds: 16,
            handshake_budget: Duration::from_secs(1),
            test_plant_shifted_stores: false,
            visibility: Visibility::One,
            startup_timeout: Duration::from_secs(60),
            step_timeout: Duration::from_secs(5),
            worker: None,
            simulate: None,
        }
    }
}

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
        if let Some(sim) = &self.simulate {
            sim.validate()
                .map_err(|e| Error::InvalidInput(format!("{e:#}")))?;
        }
        Ok(())
    }
}

/// A pair's verdict. Only [`Verdict::Ok`] is `true` for vLLM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Both processes saw every byte the other wrote, at every level asked for.
    Ok,
    /// The pair ran to the end and something was wrong: what was seen.
    Fails(String),
    /// A worker stopped answering during this pair; it was killed.
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
// One per pair, and most are `Done`: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran to the end; each side's own verdict.
    Done {
        /// The producer's verdict (the process that owns the memory, on `src`).
        producer: SideVerdict,
        /// The consumer's verdict (the process that maps it, on `tgt`).
        consumer: SideVerdict,
    },
    /// A worker stopped answering: where it was stuck.
    Hang(String),
    /// A worker died or broke the protocol: why.
    Error(String),
}

impl Outcome {
    fn is_fact(&self) -> bool {
        self.stopped().is_none()
    }

    /// The verdict of a pair that did not run to the end (`None` for one that did).
    fn stopped(&self) -> Option<Verdict> {
        match self {
            Outcome::Hang(why) => Some(Verdict::Hang(why.clone())),
            Outcome::Error(why) => Some(Verdict::Error(why.clone())),
            Outcome::Done { .. } => None,
        }
    }
}

/// Everything known about one pair after the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairReport {
    /// The pair (local device ids).
    pub pair: Pair,
    /// How its last attempt ended.
    pub outcome: Outcome,
    /// Attempts made: 1, or 2 when the first hung or errored and the pair was retried on fresh
    /// workers.
    pub attempts: u32,
    /// What the earlier attempt gave, when there was one.
    pub earlier: Option<String>,
}

impl PairReport {
    fn sides(&self) -> Option<(&SideVerdict, &SideVerdict)> {
        match &self.outcome {
            Outcome::Done { producer, consumer } => Some((producer, consumer)),
            _ => None,
        }
    }

    /// vLLM's boolean for the copy test: both sides read back the consumer's bytes (false when
    /// they disagree); `None` when the pair never ran to the end.
    pub fn copy_ok(&self) -> Option<bool> {
        self.sides().map(|(p, c)| p.copy.is_ok() && c.copy.is_ok())
    }

    /// The sides disagree on the copy test (vLLM logs a warning and answers false).
    pub fn disagree(&self) -> bool {
        self.sides()
            .is_some_and(|(p, c)| p.copy.is_ok() != c.copy.is_ok())
    }

    /// The kernel tier, both sides combined: `Ok` only if both saw it pass; the first failure
    /// otherwise (the consumer's first: it is the side that issued the SM accesses).
    pub fn kernel(&self) -> TierOutcome {
        let Some((p, c)) = self.sides() else {
            return TierOutcome::NotRun;
        };
        combine(&c.kernel, &p.kernel)
    }

    /// The handshake tier, both sides combined, as [`PairReport::kernel`].
    pub fn handshake(&self) -> TierOutcome {
        let Some((p, c)) = self.sides() else {
            return TierOutcome::NotRun;
        };
        combine(&c.handshake, &p.handshake)
    }

    /// The weakest tier that failed (`None`: none failed, or the pair never ran to the end).
    pub fn failed_tier(&self) -> Option<Level> {
        if self.copy_ok() == Some(false) {
            Some(Level::Copy)
        } else if matches!(self.kernel(), TierOutcome::Failed(_)) {
            Some(Level::Kernel)
        } else if matches!(self.handshake(), TierOutcome::Failed(_)) {
            Some(Level::Handshake)
        } else {
            None
        }
    }

    /// The verdict.
    pub fn verdict(&self) -> Verdict {
        self.outcome.stopped().unwrap_or_else(|| {
            let problems = self.problems();
            if problems.is_empty() {
                Verdict::Ok
            } else {
                Verdict::Fails(problems.join("; "))
            }
        })
    }

    /// The boolean vLLM expects: only [`Verdict::Ok`] is true.
    pub fn ok(&self) -> bool {
        self.verdict() == Verdict::Ok
    }

    /// Whether the verdict is a fact about the machine that may be written to vLLM's cache:
    /// it ran to the end, or it hung or errored on both attempts. A single hang or error may
    /// be the check's own trouble, not the machine's.
    pub fn persistable(&self) -> bool {
        self.outcome.is_fact() || self.attempts >= 2
    }

    /// The driver's claim (`cudaDeviceCanAccessPeer(tgt, src)`), where the consumer could ask.
    pub fn claim(&self) -> Option<bool> {
        self.sides().and_then(|(_, c)| c.claim)
    }

    /// Why a pair that ran to the end failed (empty when it passed).
    fn problems(&self) -> Vec<String> {
        let Some((producer, consumer)) = self.sides() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if self.disagree() {
            out.push(format!(
                "producer and consumer disagree (producer {}, consumer {}): counted as false",
                producer.copy.is_ok(),
                consumer.copy.is_ok()
            ));
        }
        for (side, v) in [("producer", producer), ("consumer", consumer)] {
            if let Err(p) = &v.copy {
                out.push(format!("copy tier, {side}: {}", diagnose(p)));
            }
        }
        if let TierOutcome::Failed(why) = self.kernel() {
            out.push(format!("kernel tier: {}", diagnose(&why)));
        }
        if let TierOutcome::Failed(why) = self.handshake() {
            out.push(format!("handshake tier: {}", diagnose(&why)));
        }
        out.dedup();
        out
    }

    /// What was seen: why the pair failed, hung or errored, and what an earlier attempt gave;
    /// empty for a clean pass at the first attempt.
    pub fn details(&self) -> Vec<String> {
        let mut out = match &self.outcome {
            Outcome::Hang(why) | Outcome::Error(why) => vec![why.clone()],
            Outcome::Done { .. } => self.problems(),
        };
        if let Some(e) = &self.earlier {
            out.push(format!("first attempt: {e}; retried on fresh workers"));
        }
        out
    }
}

/// Two sides' outcomes of a tier: `Ok` only if both passed; else the consumer's failure first
/// (it is the side that reached through the mapping), then the producer's.
fn combine(consumer: &TierOutcome, producer: &TierOutcome) -> TierOutcome {
    match (consumer, producer) {
        (TierOutcome::Ok, TierOutcome::Ok) => TierOutcome::Ok,
        (TierOutcome::Failed(why), _) | (_, TierOutcome::Failed(why)) => {
            TierOutcome::Failed(why.clone())
        }
        _ => TierOutcome::NotRun,
    }
}

/// What a failure is and what usually causes it: "never-written: writes ... (hint)".
fn diagnose(p: &Problem) -> String {
    let class = p.class();
    format!("{p} [{}: {}]", class.name(), class.hint())
}

/// One worker process of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its pid.
    pub pid: u32,
    /// Its part: "producer", "worker of GPU 2", ...
    pub label: String,
    /// How many GPUs its CUDA saw (`None`: it never said).
    pub sees: Option<u32>,
    /// Its peak resident memory as last reported, in KiB (0: never reported).
    pub peak_rss_kb: u32,
}

/// The result of one check run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Devices checked (the devices this process sees).
    pub device_count: u32,
    /// One entry per pair, in batch order; every pair is accounted for.
    pub pairs: Vec<PairReport>,
    /// The engine used.
    pub engine: Engine,
    /// The level checked.
    pub level: Level,
    /// What the workers saw (after any fallback).
    pub visibility: Visibility,
    /// Time from the start of the check to the last verdict (worker exit is not included:
    /// it happens after).
    pub answer: Duration,
    /// The worker executable used.
    pub worker: PathBuf,
    /// Rounds of fresh workers after a hang or a death (0 when nothing went wrong).
    pub restarts: u32,
    /// Worker processes started, in all rounds.
    pub workers_started: u32,
    /// The most pairs in flight at one moment.
    pub peak_in_flight: u32,
    /// Every worker started, in order.
    pub workers: Vec<WorkerInfo>,
    /// Things the caller should know that are not a pair's verdict (a visibility fallback,
    /// an ignored part of `CUDA_VISIBLE_DEVICES`, disagreeing sides).
    pub warnings: Vec<String>,
}

impl Report {
    /// The report for `pair`, if it was checked.
    pub fn get(&self, src: u32, tgt: u32) -> Option<&PairReport> {
        self.pairs.iter().find(|p| p.pair == Pair { src, tgt })
    }

    /// The largest peak resident memory any worker reported, in KiB.
    pub fn worker_max_rss_kb(&self) -> Option<u32> {
        self.workers
            .iter()
            .map(|w| w.peak_rss_kb)
            .filter(|&k| k > 0)
            .max()
    }

    /// Whether every verdict may be written to vLLM's cache (see [`PairReport::persistable`]).
    pub fn persistable(&self) -> bool {
        self.pairs.iter().all(PairReport::persistable)
    }
}

/// Every ordered pair of `n` devices, row-major (src outer), as vLLM's cache orders them.
pub fn all_pairs(n: u32) -> Vec<Pair> {
    (0..n)
        .flat_map(|src| (0..n).map(move |tgt| Pair { src, tgt }))
        .collect()
}

/// A check running in the background (see [`start`]).
pub struct Pending {
    answer: mpsc::Receiver<Result<Report>>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<String>>>,
    taken: bool,
}

impl Pending {
    /// The report if the check has finished, without waiting; `None` while it runs (and after
    /// the report was taken).
    pub fn try_wait(&mut self) -> Option<Result<Report>> {
        if self.taken {
            return None;
        }
        match self.answer.try_recv() {
            Ok(r) => {
                self.taken = true;
                Some(r)
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.taken = true;
                Some(Err(Error::Worker(
                    "the check's thread ended without an answer".into(),
                )))
            }
        }
    }

    /// Waits for the report. The workers may still be exiting: see [`Pending::finish`].
    pub fn wait(&mut self) -> Result<Report> {
        if self.taken {
            return Err(Error::InvalidInput("the report was already taken".into()));
        }
        self.taken = true;
        self.answer.recv().unwrap_or_else(|_| {
            Err(Error::Worker(
                "the check's thread ended without an answer".into(),
            ))
        })
    }

    /// Stops the check: workers are killed, [`Pending::wait`] gives [`Error::Cancelled`]
    /// unless the report was already complete.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits until every worker has exited and been reaped; returns a warning for each that
    /// did not exit cleanly. A check whose report was not taken is cancelled first.
    pub fn finish(mut self) -> Vec<String> {
        if !self.taken {
            self.cancel();
        }
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Nobody will read the answer: stop early. The thread still reaps every worker.
        if !self.taken {
            self.cancel();
        }
    }
}

/// How often a waiting check looks at its cancel flag.
pub(crate) const CANCEL_POLL: Duration = Duration::from_millis(50);

/// How long workers get to exit after their work (context teardown) before they are killed.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts checking `pairs` (all pairs of the visible devices when `None`) in the background
/// and returns at once, so a caller can overlap the check with its own start-up.
///
/// The check runs on its own thread, which spawns the workers and outlives them: after the
/// report is handed over it reaps every worker (they tear their contexts down off the critical
/// path). Dropping the [`Pending`] before taking the report cancels the check.
pub fn start(pairs: Option<Vec<Pair>>, opts: Options) -> Pending {
    let (tx, rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let thread = std::thread::Builder::new()
        .name("p2pcheck".into())
        .spawn(move || {
            let mut graveyard = Graveyard::default();
            // A bug here must not take an embedding host down, nor leave the caller waiting.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_rounds(pairs.as_deref(), &opts, &mut graveyard, &flag)
            }))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(Error::Worker(format!(
                    "internal error in the check (a bug): {what}"
                )))
            });
            let _ = tx.send(result);
            graveyard.reap(Instant::now() + REAP_TIMEOUT)
        });
    match thread {
        Ok(t) => Pending {
            answer: rx,
            cancel,
            thread: Some(t),
            taken: false,
        },
        Err(e) => {
            let (tx, rx) = mpsc::channel();
            let _ = tx.send(Err(Error::Worker(format!(
                "cannot start the check's thread: {e}"
            ))));
            Pending {
                answer: rx,
                cancel,
                thread: None,
                taken: false,
            }
        }
    }
}

/// Runs the check for `pairs` (all pairs of the visible devices when `None`) and returns as
/// soon as every verdict is known; the workers exit and are reaped in the background.
///
/// Every pair is accounted for in the [`Report`]: a pair whose worker stops answering is a
/// [`Verdict::Hang`], one whose worker dies is a [`Verdict::Error`], each retried once on fresh
/// workers; pairs a broken worker interrupted are rerun. `Err` means the check could not be
/// carried out at all (no worker, no CUDA, bad device ids), and names why.
pub fn run(pairs: Option<&[Pair]>, opts: &Options) -> Result<Report> {
    start(pairs.map(<[Pair]>::to_vec), opts.clone()).wait()
}

/// What an engine needs for one round.
pub(crate) struct Ctx<'a> {
    pub opts: &'a Options,
    pub path: PathBuf,
    /// Environment every worker gets (the simulator's variables).
    pub env: Vec<(String, String)>,
    /// The visible GPUs in local order, when known without CUDA.
    pub gpus: Option<Vec<Gpu>>,
    pub visibility: Visibility,
    pub cancel: &'a AtomicBool,
    /// How the tiers beyond copy run, the run's seed included.
    pub tiers: TierParams,
    /// GPUs the kernel driver lists (`/proc/driver/nvidia`), where it could be read: no worker
    /// can see more, so a claim of more is refused before anything is sized by it.
    pub driver_gpus: Option<u32>,
}

/// What a round produced.
pub(crate) struct RoundOut {
    /// Devices the workers see.
    pub n: u32,
    /// The pairs of the round.
    pub pairs: Vec<Pair>,
    /// One per pair: its outcome, or `None` when a broken worker interrupted it before it ran.
    pub outcomes: Vec<Option<Outcome>>,
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

fn run_rounds(
    pairs: Option<&[Pair]>,
    opts: &Options,
    graveyard: &mut Graveyard,
    cancel: &AtomicBool,
) -> Result<Report> {
    let started = Instant::now();
    opts.validate()?;
    let mut warnings = Vec::new();
    let cvd = visible::from_env();
    if matches!(&cvd.devices, VisibleDevices::List(l) if l.is_empty()) {
        let value = std::env::var_os(visible::VAR).unwrap_or_default();
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
    let path = locate_worker(opts.worker.as_deref())?;
    // Kept to the end of the check: it holds the simulation's @once ledger.
    let sim_env = match &opts.simulate {
        Some(sim) => Some(
            sim.worker_env()
                .map_err(|e| Error::InvalidInput(format!("{e:#}")))?,
        ),
        None => None,
    };
    let env: Vec<(String, String)> = sim_env
        .iter()
        .flat_map(|e| e.vars.iter())
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let machine = machine(opts.simulate.as_ref());
    let (gpus, visibility, note) = plan(opts, machine.as_ref().map_err(Clone::clone));
    warnings.extend(note);
    let mut ctx = Ctx {
        opts,
        path,
        env,
        gpus,
        visibility,
        cancel,
        tiers: tier_params(opts),
        driver_gpus: machine.ok().map(|m| m.gpus.len() as u32),
    };
    let mut workers = Vec::new();
    let mut peak_in_flight = 0;
    // `hold`: pairs from this position on are retries of a hang or an error; they run after
    // the others, so that a second hang cannot interrupt them.
    let mut round = |ctx: &mut Ctx, pairs: Option<&[Pair]>, hold: usize| -> Result<RoundOut> {
        loop {
            let out = match ctx.opts.engine {
                Engine::Parallel => parallel::round(ctx, pairs, hold, graveyard),
                // The vLLM engine runs its batch in order: the retries are last already.
                Engine::Vllm => vllm::round(ctx, pairs, graveyard),
            };
            match out {
                Ok(out) => return Ok(out),
                Err(RoundError::Fatal(e)) => return Err(e),
                Err(RoundError::Fallback(why)) => {
                    warnings.push(format!("each worker sees every GPU: {why}"));
                    ctx.visibility = Visibility::All;
                    ctx.gpus = None;
                }
            }
        }
    };
    let first = round(&mut ctx, pairs, usize::MAX)?;
    let n = first.n;
    let batch = first.pairs.clone();
    let mut finals: Vec<Option<PairReport>> = vec![None; batch.len()];
    let mut attempts = vec![0u32; batch.len()];
    let mut earlier: Vec<Option<String>> = vec![None; batch.len()];
    let mut restarts = 0;
    let mut current: Vec<usize> = (0..batch.len()).collect();
    let mut out = first;
    loop {
        workers.append(&mut out.workers);
        peak_in_flight = peak_in_flight.max(out.peak_in_flight);
        let (mut next, mut retry) = (Vec::new(), Vec::new());
        for (&i, outcome) in current.iter().zip(out.outcomes.drain(..)) {
            match outcome {
                None => next.push(i),
                Some(o) => {
                    attempts[i] += 1;
                    if let (Some(stopped), true) = (o.stopped(), attempts[i] < 2) {
                        earlier[i] = Some(stopped.to_string());
                        retry.push(i);
                    } else {
                        finals[i] = Some(PairReport {
                            pair: batch[i],
                            outcome: o,
                            attempts: attempts[i],
                            earlier: earlier[i].clone(),
                        });
                    }
                }
            }
        }
        let hold = next.len();
        next.append(&mut retry);
        if next.is_empty() {
            break;
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        restarts += 1;
        let rerun: Vec<Pair> = next.iter().map(|&i| batch[i]).collect();
        let fresh = if restarts > max_rounds(batch.len()) {
            Err(Error::Worker(format!(
                "gave up after {restarts} rounds of fresh workers"
            )))
        } else {
            round(&mut ctx, Some(&rerun), hold)
        };
        out = match fresh {
            Ok(out) => out,
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            // No fresh worker could start: every pair left is an error.
            Err(e) => {
                let why = format!("no fresh worker could start after an earlier failure: {e}");
                for &i in &next {
                    finals[i] = Some(PairReport {
                        pair: batch[i],
                        outcome: Outcome::Error(why.clone()),
                        attempts: attempts[i],
                        earlier: earlier[i].clone(),
                    });
                }
                break;
            }
        };
        current = next;
    }
    let pairs: Vec<PairReport> = finals
        .into_iter()
        .map(|p| p.expect("every pair is final when the rounds end"))
        .collect();
    for p in pairs.iter().filter(|p| p.disagree()) {
        warnings.push(format!(
            "{}: the two processes disagree ({}); counted as false",
            p.pair,
            p.details().join("; ")
        ));
    }
    Ok(Report {
        device_count: n,
        pairs,
        engine: opts.engine,
        level: opts.level,
        visibility: ctx.visibility,
        answer: started.elapsed(),
        worker: ctx.path,
        restarts,
        workers_started: workers.len() as u32,
        peak_in_flight,
        workers,
        warnings,
    })
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
        shift: if opts.test_plant_shifted_stores {
            64
        } else {
            0
        },
        rounds: opts.handshake_rounds,
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
/// this process's `CUDA_DEVICE_ORDER`; an error where they cannot be named without CUDA, or
/// when `/proc` lists none of them.
pub(crate) fn visible_gpus(
    machine: &fingerprint::Machine,
    cvd: Option<&str>,
) -> std::result::Result<Vec<Gpu>, String> {
    let order = std::env::var("CUDA_DEVICE_ORDER").ok();
    let gpus = fingerprint::resolve_visible(cvd, order.as_deref(), machine)?;
    if gpus.is_empty() {
        return Err("/proc/driver/nvidia lists none of the visible GPUs".into());
    }
    Ok(gpus)
}

/// Which GPUs the workers see: their UUIDs in local order when they can be known without
/// CUDA, the visibility that gives, and why it differs from the one asked for.
fn plan(
    opts: &Options,
    machine: std::result::Result<&fingerprint::Machine, String>,
) -> (Option<Vec<Gpu>>, Visibility, Option<String>) {
    if opts.engine == Engine::Vllm {
        return (None, Visibility::All, None);
    }
    let cvd = std::env::var_os(visible::VAR);
    let resolved = machine.and_then(|m| {
        let cvd = match &cvd {
            None => None,
            Some(v) => Some(v.to_str().ok_or_else(|| {
                "CUDA_VISIBLE_DEVICES is not UTF-8 text, so its GPUs cannot be named".to_string()
            })?),
        };
        visible_gpus(m, cvd)
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
pub(crate) fn check_ids(pairs: &[Pair], n: u32) -> Result<()> {
    if let Some(bad) = pairs.iter().find(|p| p.src >= n || p.tgt >= n) {
        return Err(Error::InvalidInput(format!(
            "pair {bad} names a device this process cannot see: {n} visible \
             (CUDA_VISIBLE_DEVICES={})",
            std::env::var(visible::VAR).unwrap_or_else(|_| "<unset>".into())
        )));
    }
    Ok(())
}

/// A Hello's device count, checked: the worker could start CUDA, sees at least one GPU, and
/// no more than the driver lists (`limit`, where known).
pub(crate) fn hello_count(
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
            std::env::var(visible::VAR).ok()
        ))),
        Ok(n) if limit.is_some_and(|l| n > l) => Err(Error::Worker(format!(
            "the {worker} claims to see {n} GPUs, but the driver lists {}: refused",
            limit.unwrap_or(0)
        ))),
        Ok(n) => Ok(n),
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

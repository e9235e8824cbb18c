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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fingerprint::{self, Gpu};
use crate::protocol::{Class, Level, Pair, Problem, SideVerdict, TierOutcome, TierParams};
use crate::sim::Simulation;
use crate::visible::{self, VisibleDevices};
use pool::Graveyard;

pub use pool::{locate_worker, this_executable_is_a_worker};

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
    /// The deadline for the whole check, from its start to the last verdict: pairs not
    /// attempted by then are [`Evidence::NotAttempted`], failures not confirmed by then
    /// [`Evidence::Unconfirmed`]. `None` (the default): [`Options::check_budget`] for the
    /// device count, once the workers have said it.
    pub check_timeout: Option<Duration>,
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
            check_timeout: None,
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
        if let Some(t) = self.check_timeout {
            if t < TIMEOUT_RANGE.0 || t > TIMEOUT_RANGE.1 {
                return Err(Error::InvalidInput(format!(
                    "the check timeout {t:?} is outside 1 ms to 1 day"
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

impl Options {
    /// The whole check's deadline when [`Options::check_timeout`] is not given, for `devices`
    /// GPUs: two start-ups, `4 x devices + 8` step timeouts (room for one GPU whose every pair
    /// hangs on both attempts, one after the other, as in vLLM's procedure) and 250 ms per
    /// pair (a healthy pair of vLLM's procedure, device resets included, takes about that on
    /// an H200). With the defaults: 336 s for 8 GPUs. It bounds the sum of all steps: a worker
    /// that claims many GPUs and then stays silent costs this, not one timeout per pair.
    pub fn check_budget(&self, devices: u32) -> Duration {
        let n = u64::from(devices);
        self.startup_timeout * 2
            + self.step_timeout * (4 * devices + 8)
            + Duration::from_millis(250 * n * n)
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
    /// A worker died or broke the protocol during this pair, or the pair could not be
    /// attempted (no fresh worker could start, the check's deadline passed first): why.
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

/// How one attempt at a pair ended.
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
    /// A worker died or broke the protocol, or the pair could not be attempted: why.
    Error(String),
}

impl Outcome {
    /// Whether the pair ran to the end and passed.
    pub(crate) fn passed(&self) -> bool {
        PairReport::settle(Pair { src: 0, tgt: 0 }, vec![self.clone()], "").ok()
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

/// What a pair's attempts show, and so whether its verdict is a fact that may be written to
/// vLLM's cache ([`Evidence::is_fact`]). A pair that does not pass at once is attempted a
/// second time on fresh workers, after every other pair; only a pass at once or the same
/// failure twice is a fact. Whatever is not a fact is reported, answered `false` unless it
/// passed at once (a wrong `true` is the worst answer), and never written: the next check
/// looks again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// Passed at its first attempt: a fact (`true`).
    Passed,
    /// Failed at both attempts, the second on fresh workers, at the same tier with the same
    /// diagnosis: a fact (`false`).
    Confirmed,
    /// Failed once, then passed on fresh workers: not a fact (the first failure may have been
    /// the check's own trouble, a worker's death nearby), answered `false`.
    NotRepeated,
    /// Failed at both attempts, but at different tiers or with different diagnoses.
    Inconsistent,
    /// A worker stopped answering during an attempt.
    Hang,
    /// A worker died or broke the protocol during an attempt, or no fresh worker could start
    /// for the second.
    Error,
    /// Failed once; the check's deadline passed before the failure could be confirmed.
    Unconfirmed,
    /// Never attempted: the check's deadline passed first.
    NotAttempted,
}

impl Evidence {
    /// `passed`, `confirmed`, `not-repeated`, `inconsistent`, `hang`, `error`, `unconfirmed`
    /// or `not-attempted`.
    pub fn name(self) -> &'static str {
        match self {
            Evidence::Passed => "passed",
            Evidence::Confirmed => "confirmed",
            Evidence::NotRepeated => "not-repeated",
            Evidence::Inconsistent => "inconsistent",
            Evidence::Hang => "hang",
            Evidence::Error => "error",
            Evidence::Unconfirmed => "unconfirmed",
            Evidence::NotAttempted => "not-attempted",
        }
    }

    /// Whether the verdict is a fact about the machine, which may be written to vLLM's cache.
    pub fn is_fact(self) -> bool {
        matches!(self, Evidence::Passed | Evidence::Confirmed)
    }

    /// What it means for the cache, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Evidence::Passed => "passed at once: may be written to vLLM's cache",
            Evidence::Confirmed => {
                "the same failure on fresh workers: confirmed, may be written to vLLM's cache"
            }
            Evidence::NotRepeated => {
                "the failure did not repeat on fresh workers: answered false, not written to \
                 vLLM's cache"
            }
            Evidence::Inconsistent => {
                "failed differently on fresh workers: not written to vLLM's cache"
            }
            Evidence::Hang => "a worker hung: not written to vLLM's cache",
            Evidence::Error => "a worker died or could not start: not written to vLLM's cache",
            Evidence::Unconfirmed => {
                "the check's deadline passed before the failure could be confirmed: not \
                 written to vLLM's cache"
            }
            Evidence::NotAttempted => {
                "the check's deadline passed before the pair was attempted: answered false, \
                 not written to vLLM's cache"
            }
        }
    }
}

/// Everything known about one pair after the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairReport {
    /// The pair (local device ids).
    pub pair: Pair,
    /// The attempt its verdict is read from: the one that did not pass (the later one when
    /// neither did), so that a failure that did not repeat is still reported, and answered
    /// `false`.
    pub outcome: Outcome,
    /// Attempts made: 1 when the first passed (or the check's deadline left no time for a
    /// second), 2 when it did not and the pair was attempted again on fresh workers, 0 when
    /// it was never attempted.
    pub attempts: u32,
    /// What the other attempt gave, in words, when there were two: `first attempt: …` or
    /// `second attempt, on fresh workers: …`.
    pub other_attempt: Option<String>,
    /// What the attempts show: whether the verdict may be written to vLLM's cache.
    pub evidence: Evidence,
}

impl PairReport {
    /// The report of `pair` from its attempts' outcomes, in order (none: never attempted;
    /// `not_attempted` says why).
    fn settle(pair: Pair, tries: Vec<Outcome>, not_attempted: &str) -> PairReport {
        let report = |outcome: Outcome, evidence, other_attempt| PairReport {
            pair,
            outcome,
            attempts: tries.len() as u32,
            other_attempt,
            evidence,
        };
        let alone = |o: &Outcome| report(o.clone(), Evidence::Passed, None);
        let stopped = |o: &Outcome| match o {
            Outcome::Hang(_) => Some(Evidence::Hang),
            Outcome::Error(_) => Some(Evidence::Error),
            Outcome::Done { .. } => None,
        };
        match tries.as_slice() {
            [] => report(
                Outcome::Error(not_attempted.to_string()),
                Evidence::NotAttempted,
                None,
            ),
            [only] => {
                let evidence = match alone(only).ok() {
                    true => Evidence::Passed,
                    false => stopped(only).unwrap_or(Evidence::Unconfirmed),
                };
                report(only.clone(), evidence, None)
            }
            [first, second, ..] => {
                let (a, b) = (alone(first), alone(second));
                if b.ok() {
                    // Not repeated: the failing attempt gives the verdict (false).
                    let evidence = stopped(first).unwrap_or(match a.ok() {
                        true => Evidence::Passed,
                        false => Evidence::NotRepeated,
                    });
                    let note = format!("second attempt, on fresh workers: {}", b.summary());
                    return report(first.clone(), evidence, Some(note));
                }
                let evidence = match (stopped(first), stopped(second)) {
                    (Some(Evidence::Hang), _) | (_, Some(Evidence::Hang)) => Evidence::Hang,
                    (Some(e), _) | (_, Some(e)) => e,
                    (None, None) if a.ok() => Evidence::Inconsistent,
                    (None, None) => match a.failure_class() == b.failure_class() {
                        true => Evidence::Confirmed,
                        false => Evidence::Inconsistent,
                    },
                };
                let note = format!("first attempt: {}", a.summary());
                report(second.clone(), evidence, Some(note))
            }
        }
    }

    /// The verdict in a few words: `ok`, `fails at the kernel tier (wrong-data)`, or a hang's
    /// or an error's whole reason (which names the worker and what it was doing).
    fn summary(&self) -> String {
        match (self.verdict(), self.failure()) {
            (Verdict::Fails(_), Some((tier, p))) => {
                format!("fails at the {} tier ({})", tier.name(), p.class().name())
            }
            (v, _) => v.to_string(),
        }
    }

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
        self.failure().map(|(tier, _)| tier)
    }

    /// The weakest tier that failed and its problem, the one its diagnosis is read from (for
    /// the copy tier the producer's, then the consumer's, in the order of
    /// [`PairReport::details`]); `None`: none failed, or the pair never ran to the end.
    pub fn failure(&self) -> Option<(Level, Problem)> {
        let (producer, consumer) = self.sides()?;
        if let Some(p) = producer
            .copy
            .as_ref()
            .err()
            .or(consumer.copy.as_ref().err())
        {
            return Some((Level::Copy, p.clone()));
        }
        match (self.kernel(), self.handshake()) {
            (TierOutcome::Failed(p), _) => Some((Level::Kernel, p)),
            (_, TierOutcome::Failed(p)) => Some((Level::Handshake, p)),
            _ => None,
        }
    }

    /// The weakest failed tier and its diagnosis: what "failing the same way" compares.
    fn failure_class(&self) -> Option<(Level, Class)> {
        self.failure().map(|(tier, p)| (tier, p.class()))
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
    /// it passed at once, or failed the same way twice ([`Evidence::is_fact`]).
    pub fn persistable(&self) -> bool {
        self.evidence.is_fact()
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

    /// What was seen: why the pair failed, hung or errored, what the other attempt gave, and
    /// what that means for vLLM's cache; empty for a pass at the first attempt.
    pub fn details(&self) -> Vec<String> {
        let mut out = match &self.outcome {
            Outcome::Hang(why) | Outcome::Error(why) => vec![why.clone()],
            Outcome::Done { .. } => self.problems(),
        };
        out.extend(self.other_attempt.clone());
        if self.evidence != Evidence::Passed {
            out.push(self.evidence.describe().to_string());
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
    /// Rounds of fresh workers after the first: for the pairs a hang or a death interrupted,
    /// and for second attempts (0 when every pair passed at once).
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
    owner: Owner,
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
        self.0.settle(Err(Error::Worker(
            "the check's thread ended without an answer".into(),
        )));
    }
}

/// The process that made a handle: after a `fork`, the child's copy must not touch locks or
/// threads that only exist in the parent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Owner(u32);

impl Owner {
    /// This process.
    pub(crate) fn current() -> Owner {
        Owner(std::process::id())
    }

    /// `Err` naming both processes when called from another process than the owner's (the
    /// pid is asked each time: a child of `fork` has its own).
    pub(crate) fn check(self, what: &str) -> std::result::Result<(), String> {
        let here = std::process::id();
        match here == self.0 {
            true => Ok(()),
            false => Err(format!(
                "{what} was made by process {}, and this is process {here} (a child of fork?): \
                 a handle is used only in the process that made it",
                self.0
            )),
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
        if let Err(why) = self.owner.check("this check") {
            return Some(Err(Error::InvalidInput(why)));
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
    pub fn wait(&self) -> Result<Report> {
        self.wait_timeout(Duration::MAX)
            .unwrap_or_else(|| Err(Error::Worker("the wait ended without a result".into())))
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

/// Starts checking `pairs` (all pairs of the visible devices when `None`) in the background
/// and returns at once, so a caller can overlap the check with its own start-up.
///
/// The check runs on its own thread, which spawns the workers and outlives them: after the
/// report is handed over it reaps every worker (they tear their contexts down off the critical
/// path). Dropping the [`Pending`] before the check has a result cancels it.
pub fn start(pairs: Option<Vec<Pair>>, opts: Options) -> Pending {
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
                run_rounds(pairs.as_deref(), &opts, &mut graveyard, &settle.0.cancel)
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
            settle.0.settle(result);
            graveyard.reap(Instant::now() + REAP_TIMEOUT)
        });
    let thread = match thread {
        Ok(t) => Some(t),
        Err(e) => {
            shared.settle(Err(Error::Worker(format!(
                "cannot start the check's thread: {e}"
            ))));
            None
        }
    };
    Pending {
        shared,
        thread,
        owner: Owner::current(),
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

    /// "the check's deadline (320.0 s) passed", for messages.
    fn deadline_words(&self) -> String {
        let budget = self.deadline.get().map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(self.started)
        });
        format!(
            "the check's deadline ({:.1} s) passed",
            budget.as_secs_f64()
        )
    }
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
        started,
        deadline: Cell::new(opts.check_timeout.map(|t| started + t)),
    };
    let mut workers = Vec::new();
    let mut peak_in_flight = 0;
    // `hold`: pairs from this position on are second attempts; they run after the others, so
    // that a second hang cannot interrupt them, and on fresh workers, as every round.
    let mut round = |ctx: &mut Ctx, pairs: Option<&[Pair]>, hold: usize| -> Result<RoundOut> {
        loop {
            let out = match ctx.opts.engine {
                Engine::Parallel => parallel::round(ctx, pairs, hold, graveyard),
                // The vLLM engine runs its batch in order: the second attempts are last already.
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
    // Each pair's attempts so far; it is final once it passed or was attempted twice.
    let mut tries: Vec<Vec<Outcome>> = vec![Vec::new(); batch.len()];
    let mut restarts = 0;
    let mut current: Vec<usize> = (0..batch.len()).collect();
    let mut out = first;
    loop {
        workers.append(&mut out.workers);
        peak_in_flight = peak_in_flight.max(out.peak_in_flight);
        let (mut next, mut again) = (Vec::new(), Vec::new());
        for (&i, outcome) in current.iter().zip(out.outcomes.drain(..)) {
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
        if next.is_empty() {
            break;
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        if ctx.past_deadline() {
            break;
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
            Err(_) if ctx.past_deadline() => break,
            // No fresh worker could start: that is every pair's attempt left.
            Err(e) => {
                let why = format!("no fresh worker could start after an earlier failure: {e}");
                for &i in &next {
                    tries[i].push(Outcome::Error(why.clone()));
                }
                break;
            }
        };
        current = next;
    }
    let not_attempted = format!("not attempted: {}", ctx.deadline_words());
    let pairs: Vec<PairReport> = batch
        .iter()
        .zip(tries)
        .map(|(&pair, tries)| PairReport::settle(pair, tries, &not_attempted))
        .collect();
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
        let order = std::env::var("CUDA_DEVICE_ORDER").ok();
        visible_gpus(m, cvd, order.as_deref())
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
mod tests {
    use super::*;
    use crate::protocol::Check;

    const PAIR: Pair = Pair { src: 0, tgt: 1 };

    fn side(copy: std::result::Result<(), Problem>, kernel: TierOutcome) -> SideVerdict {
        SideVerdict {
            copy,
            claim: Some(true),
            kernel,
            handshake: TierOutcome::NotRun,
        }
    }

    /// `wrong` of 1024 bytes wrong, `stale` of them still the old contents.
    fn mismatch(check: Check, wrong: u64, stale: u64) -> Problem {
        Problem::Mismatch {
            check,
            wrong,
            total: 1024,
            first_bad: 0,
            seen: Some(1),
            expected: 2,
            width: 0,
            stale,
        }
    }

    fn pass() -> Outcome {
        Outcome::Done {
            producer: side(Ok(()), TierOutcome::Ok),
            consumer: side(Ok(()), TierOutcome::Ok),
        }
    }

    /// The copy tier fails: never-written (every byte stale) or wrong-data.
    fn copy_fails(stale: u64) -> Outcome {
        let p = mismatch(Check::CopyReadBack, 1024, stale);
        Outcome::Done {
            producer: side(Err(p.clone()), TierOutcome::NotRun),
            consumer: side(Err(p), TierOutcome::NotRun),
        }
    }

    /// The copy tier passes and the kernel tier's loads are wrong.
    fn kernel_fails() -> Outcome {
        Outcome::Done {
            producer: side(Ok(()), TierOutcome::Ok),
            consumer: side(
                Ok(()),
                TierOutcome::Failed(mismatch(Check::KernelLoads, 1024, 0)),
            ),
        }
    }

    fn settle(tries: Vec<Outcome>) -> PairReport {
        PairReport::settle(PAIR, tries, "not attempted: the check's deadline passed")
    }

    #[test]
    fn only_a_pass_at_once_or_the_same_failure_twice_is_a_fact() {
        let passed = settle(vec![pass()]);
        assert_eq!((passed.evidence, passed.ok()), (Evidence::Passed, true));
        assert!(passed.persistable() && passed.details().is_empty());

        let confirmed = settle(vec![copy_fails(1024), copy_fails(1024)]);
        assert_eq!(confirmed.evidence, Evidence::Confirmed);
        assert!(confirmed.persistable() && !confirmed.ok());
        assert_eq!(confirmed.attempts, 2);
        assert_eq!(confirmed.failed_tier(), Some(Level::Copy));
        assert_eq!(
            confirmed.other_attempt.as_deref(),
            Some("first attempt: fails at the copy tier (never-written)")
        );

        // The same tier, another diagnosis; another tier.
        for second in [copy_fails(0), kernel_fails()] {
            let r = settle(vec![copy_fails(1024), second]);
            assert_eq!(r.evidence, Evidence::Inconsistent);
            assert!(!r.persistable() && !r.ok());
        }
    }

    #[test]
    fn a_failure_that_does_not_repeat_is_reported_answered_false_and_not_persisted() {
        let r = settle(vec![kernel_fails(), pass()]);
        assert_eq!(r.evidence, Evidence::NotRepeated);
        assert!(!r.ok() && !r.persistable());
        assert_eq!(
            r.failed_tier(),
            Some(Level::Kernel),
            "the failing attempt decides"
        );
        let details = r.details().join("\n");
        assert!(
            details.contains("second attempt, on fresh workers: ok"),
            "{details}"
        );
        assert!(details.contains("did not repeat"), "{details}");
    }

    #[test]
    fn hangs_errors_and_deaths_nearby_are_never_facts() {
        let hang = || Outcome::Hang("no answer".into());
        let death = || Outcome::Error("the consumer was killed by signal 9".into());
        for (tries, evidence, word) in [
            (vec![hang(), hang()], Evidence::Hang, "hang"),
            (vec![hang(), pass()], Evidence::Hang, "hang"),
            (vec![copy_fails(1024), hang()], Evidence::Hang, "hang"),
            (vec![death(), death()], Evidence::Error, "error"),
            (vec![death(), pass()], Evidence::Error, "error"),
            // A failure with a worker's death nearby, then the death itself.
            (vec![copy_fails(1024), death()], Evidence::Error, "error"),
            (vec![death(), copy_fails(1024)], Evidence::Error, "fails"),
        ] {
            let r = settle(tries);
            assert_eq!(r.evidence, evidence, "{:?}", r.details());
            assert_eq!(r.verdict().word(), word);
            assert!(!r.persistable() && !r.ok());
            assert!(r.other_attempt.is_some());
        }
    }

    #[test]
    fn what_the_deadline_cut_short_is_reported_so() {
        let never = settle(Vec::new());
        assert_eq!(
            (never.evidence, never.attempts),
            (Evidence::NotAttempted, 0)
        );
        assert_eq!(never.verdict().word(), "error");
        assert!(never.verdict().reason().contains("deadline"));
        let once = settle(vec![copy_fails(1024)]);
        assert_eq!(once.evidence, Evidence::Unconfirmed);
        assert!(!once.persistable() && !once.ok());
        let hung = settle(vec![Outcome::Hang("no answer".into())]);
        assert_eq!(hung.evidence, Evidence::Hang);
    }

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

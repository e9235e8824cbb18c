//! What one attempt at a pair gave: each side's verdict per tier ([`SideVerdict`]), how the
//! attempt ended ([`Outcome`]), and the pair's verdict ([`Verdict`]), each with its typed cause:
//! what failed ([`Failure`]), where a worker stopped answering ([`Hang`]), why an attempt was
//! lost ([`Lost`]). Their texts are rendered by `render`.

use std::time::Duration;

use super::{Class, Level, Pair, PairReport, Problem, Role, Route, Transport};

/// Outcome of a tier beyond copy as one side saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TierOutcome {
    /// Not run (not requested, or the mapping never opened).
    NotRun,
    /// Every byte matched.
    Ok,
    /// Wrong data or a failed call.
    Failed(Problem),
}

/// One side's verdict for one pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideVerdict {
    /// vLLM's test: `Ok` when this side read back all 2s after the consumer's memset.
    pub copy: Result<(), Problem>,
    /// Consumer only: `cudaDeviceCanAccessPeer(tgt, src)`, when it could be asked.
    pub claim: Option<bool>,
    /// The kernel tier, as this side saw it.
    pub kernel: TierOutcome,
    /// The handshake tier, as this side saw it.
    pub handshake: TierOutcome,
}

/// A pair's verdict. Only [`Verdict::Ok`] is `true` for vLLM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Both processes saw every byte the other wrote, at every level asked for.
    Ok,
    /// The pair ran to the end and something was wrong: what was seen.
    Fails(Failure),
    /// A worker stopped answering during this pair; it was killed.
    Hang(Hang),
    /// A worker died or broke the protocol during this pair, or the pair could not be
    /// attempted (no fresh worker could start, the check's deadline passed first): why.
    Error(Lost),
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
}

/// What a pair that ran to the end got wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The weakest tier that failed.
    pub tier: Level,
    /// That tier's problem, the one the diagnosis is read from (for the copy tier the
    /// producer's, then the consumer's).
    pub problem: Problem,
    /// Everything found wrong, in the order the reason lists it.
    pub findings: Vec<Finding>,
}

impl Failure {
    /// The diagnosis of the failed tier.
    pub fn class(&self) -> Class {
        self.problem.class()
    }

    /// Whether the reason, in words, contains `text`.
    pub fn contains(&self, text: &str) -> bool {
        self.to_string().contains(text)
    }
}

/// One thing a pair that ran to the end got wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The two sides disagree on the copy test (vLLM answers false): what each read back.
    Disagree {
        /// Whether the producer read back the consumer's bytes.
        producer: bool,
        /// Whether the consumer did.
        consumer: bool,
    },
    /// One side's copy test failed.
    Copy {
        /// The side.
        side: Role,
        /// What it found.
        problem: Problem,
    },
    /// A tier beyond copy failed (both sides combined: the consumer's problem first).
    Tier {
        /// [`Level::Kernel`] or [`Level::Handshake`].
        tier: Level,
        /// What failed.
        problem: Problem,
    },
}

/// A worker stopped answering during an attempt: which, and where it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hang {
    /// A worker gave no answer to a step within the step timeout; it was killed.
    Silent {
        /// The worker, e.g. `worker of GPU 1 (pid 123)`.
        worker: String,
        /// How long the parent waited.
        waited: Duration,
        /// The step it was given (its name) and the pair, `None` when it had none (idle).
        step: Option<(String, Pair)>,
        /// What it wrote to its stderr, as `; its stderr: "…"` (empty when nothing).
        stderr: String,
    },
    /// Neither worker of a pair (the vLLM engine's procedure) answered within the step
    /// timeout; both were killed.
    Pair {
        /// How long the parent waited.
        waited: Duration,
        /// The last message the parent saw of the pair: who sent it, and what it was.
        after: Option<(Role, String)>,
        /// What each worker wrote to its stderr, as `; the … (pid …)'s stderr: "…"`.
        stderr: String,
    },
    /// A worker stopped reading its pipe: a step could not be sent to it in time.
    StoppedReading(WorkerFault),
}

/// Why an attempt at a pair was lost: no verdict came of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// A worker died, broke the protocol, or could not be written to.
    Worker(WorkerFault),
    /// No fresh worker could start for this attempt, after an earlier failure: the error.
    NoFreshWorker {
        /// Why, in words.
        why: String,
    },
    /// The check's deadline passed before the pair was attempted.
    NotAttempted {
        /// The whole check's budget.
        budget: Duration,
    },
}

/// What went wrong with one worker process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerFault {
    /// The worker, e.g. `consumer (pid 123)`.
    pub worker: String,
    /// What it did.
    pub fault: Fault,
    /// What it wrote to its stderr, as `; its stderr: "…"` (empty when nothing, or not read).
    pub stderr: String,
}

/// What a worker did wrong, or how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// It exited: how (`exited with code 1`, `was killed by signal 9 (SIGKILL)`).
    Exited(String),
    /// It exited and was reaped by other code of this process: its status is unknown.
    ReapedElsewhere,
    /// It closed its pipe but did not exit; it was killed.
    ClosedPipe,
    /// Its pipe could not be read, or carried a malformed frame: the protocol error.
    Protocol(String),
    /// Polling its pipe failed: the error.
    Poll(String),
    /// It stopped reading its pipe.
    StoppedReading,
    /// It set up its GPU but exported no buffer.
    NoBuffer,
    /// It answered a step it was not given.
    StrayAnswer,
    /// It answered for another job than the one at the head of its queue (that job).
    WrongJob(String),
    /// It sent a message out of turn (the message's name).
    OutOfTurn(&'static str),
    /// It sent more messages for one pair than the procedure has (the limit).
    TooManyMessages(u32),
    /// It sent a message its role may not send (the message).
    Forbidden(String),
    /// It sent a message for a pair beyond the batch.
    PairOutOfRange {
        /// The pair's position it named.
        index: usize,
        /// The pairs of the batch.
        of: usize,
    },
    /// It sent two verdicts for one pair.
    TwoVerdicts {
        /// The pair's position.
        index: usize,
    },
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
    Hang(Hang),
    /// A worker died or broke the protocol, or the pair could not be attempted: why.
    Error(Lost),
}

impl Outcome {
    /// Whether the pair ran to the end and passed.
    pub(crate) fn passed(&self) -> bool {
        let route = Route {
            transport: Transport::Ipc,
            pair: Pair { src: 0, tgt: 0 },
        };
        PairReport::settle(route, vec![self.clone()], Duration::ZERO).ok()
    }

    /// The verdict of a pair that did not run to the end (`None` for one that did).
    pub(super) fn stopped(&self) -> Option<Verdict> {
        match self {
            Outcome::Hang(why) => Some(Verdict::Hang(why.clone())),
            Outcome::Error(why) => Some(Verdict::Error(why.clone())),
            Outcome::Done { .. } => None,
        }
    }
}

/// `the check's deadline (320.0 s) passed`: the words for a check's `budget` running out.
pub fn deadline_passed(budget: Duration) -> String {
    format!(
        "the check's deadline ({:.1} s) passed",
        budget.as_secs_f64()
    )
}

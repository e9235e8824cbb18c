//! What one attempt at a pair gave: each side's verdict per tier ([`SideVerdict`]), how the
//! attempt ended ([`Outcome`]), and the pair's verdict ([`Verdict`]).

use super::{Pair, PairReport, Problem};

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
    pub(super) fn stopped(&self) -> Option<Verdict> {
        match self {
            Outcome::Hang(why) => Some(Verdict::Hang(why.clone())),
            Outcome::Error(why) => Some(Verdict::Error(why.clone())),
            Outcome::Done { .. } => None,
        }
    }
}

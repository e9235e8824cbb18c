//! The domain model every layer speaks: pairs and levels, the problems a side can find, the
//! verdicts and outcomes of an attempt, the evidence of a pair's attempts, and a check's report.
//!
//! It imports nothing else of the crate: the wire format ([`crate::protocol`]) encodes it, the
//! engine produces it, the renderers ([`crate::render`]) turn it into text, JSON and the C
//! ABI's values.

mod bandwidth;
mod evidence;
mod link;
mod pair;
mod problem;
mod report;
mod verdict;

pub use bandwidth::{
    figure_name, Bandwidth, Direction, Figure, Floor, Mover, PairBandwidth, FIGURES,
};
pub use evidence::{Attempt, Evidence, OtherAttempt, PairReport};
pub use link::{Link, FLOOR_FRACTION};
pub use pair::{all_pairs, Level, Pair, Role, Route, TierParams, Transport, Transports};
#[cfg(test)]
pub(crate) use problem::tests::cuda_problem;
pub use problem::{Check, Class, Problem};
pub use report::{Engine, Report, Visibility, WorkerInfo};
pub use verdict::{
    deadline_passed, Failure, Fault, Finding, Hang, Lost, Outcome, SideVerdict, TierOutcome,
    Verdict, WorkerFault,
};

//! What a pair's attempts show ([`Evidence`]), and everything known about one pair after the
//! check ([`PairReport`]): its attempts settled into one verdict.

use std::time::Duration;

use super::{
    Class, Failure, Finding, Level, Lost, Outcome, Pair, Problem, Role, Route, SideVerdict,
    TierOutcome, Transport, Verdict,
};

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
    /// The transport it was checked over (only [`Transport::Ipc`]'s verdicts go to vLLM's
    /// cache).
    pub transport: Transport,
    /// The attempt its verdict is read from: the one that did not pass (the later one when
    /// neither did), so that a failure that did not repeat is still reported, and answered
    /// `false`.
    pub outcome: Outcome,
    /// Attempts made: 1 when the first passed (or the check's deadline left no time for a
    /// second), 2 when it did not and the pair was attempted again on fresh workers, 0 when
    /// it was never attempted.
    pub attempts: u32,
    /// What the other attempt gave, when there were two.
    pub other_attempt: Option<OtherAttempt>,
    /// What the attempts show: whether the verdict may be written to vLLM's cache.
    pub evidence: Evidence,
}

/// The attempt at a pair that its verdict is not read from, when there were two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherAttempt {
    /// Which attempt it was.
    pub which: Attempt,
    /// Its verdict.
    pub verdict: Verdict,
}

/// One of a pair's two attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The first attempt.
    First,
    /// The second attempt, on fresh workers.
    Second,
}

impl PairReport {
    /// The report of `route` (a pair over a transport) from its attempts' outcomes, in order
    /// (none: never attempted within the check's `budget`).
    pub(crate) fn settle(route: Route, tries: Vec<Outcome>, budget: Duration) -> PairReport {
        let pair = route.pair;
        let report = |outcome: Outcome, evidence, other_attempt| PairReport {
            pair,
            transport: route.transport,
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
        let other = |which, r: &PairReport| {
            Some(OtherAttempt {
                which,
                verdict: r.verdict(),
            })
        };
        match tries.as_slice() {
            [] => report(
                Outcome::Error(Lost::NotAttempted { budget }),
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
                    return report(first.clone(), evidence, other(Attempt::Second, &b));
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
                report(second.clone(), evidence, other(Attempt::First, &a))
            }
        }
    }

    /// Each side's verdict, when the attempt ran to the end.
    pub(crate) fn sides(&self) -> Option<(&SideVerdict, &SideVerdict)> {
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
    /// [`Failure::findings`]); `None`: none failed, or the pair never ran to the end.
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

    /// The verdict, with its cause.
    pub fn verdict(&self) -> Verdict {
        self.outcome
            .stopped()
            .unwrap_or_else(|| match self.failure() {
                None => Verdict::Ok,
                Some((tier, problem)) => Verdict::Fails(Failure {
                    tier,
                    problem,
                    findings: self.findings(),
                }),
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

    /// What a pair that ran to the end got wrong (empty when it passed).
    fn findings(&self) -> Vec<Finding> {
        let Some((producer, consumer)) = self.sides() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if self.disagree() {
            out.push(Finding::Disagree {
                producer: producer.copy.is_ok(),
                consumer: consumer.copy.is_ok(),
            });
        }
        for (side, v) in [(Role::Producer, producer), (Role::Consumer, consumer)] {
            if let Err(problem) = &v.copy {
                out.push(Finding::Copy {
                    side,
                    problem: problem.clone(),
                });
            }
        }
        for (tier, outcome) in [
            (Level::Kernel, self.kernel()),
            (Level::Handshake, self.handshake()),
        ] {
            if let TierOutcome::Failed(problem) = outcome {
                out.push(Finding::Tier { tier, problem });
            }
        }
        out.dedup();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Check, Fault, Hang, WorkerFault};

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

    fn no_answer() -> Hang {
        Hang::Silent {
            worker: "worker of GPU 1 (pid 8)".into(),
            waited: Duration::from_secs(5),
            step: None,
            stderr: String::new(),
        }
    }

    fn settle(tries: Vec<Outcome>) -> PairReport {
        let route = Route {
            transport: Transport::Ipc,
            pair: PAIR,
        };
        PairReport::settle(route, tries, Duration::from_secs(320))
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
            confirmed
                .other_attempt
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
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
        let hang = || Outcome::Hang(no_answer());
        let death = || {
            Outcome::Error(Lost::Worker(WorkerFault {
                worker: "consumer (pid 7)".into(),
                fault: Fault::Exited("was killed by signal 9 (SIGKILL)".into()),
                stderr: String::new(),
            }))
        };
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
        let hung = settle(vec![Outcome::Hang(no_answer())]);
        assert_eq!(hung.evidence, Evidence::Hang);
    }
}

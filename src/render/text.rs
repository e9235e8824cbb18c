//! The model in words: the `Display` of every verdict and cause, a verdict's reason, and a
//! pair's details, as the table, the JSON's texts and the C ABI's details show them.

use std::fmt::{self, Display, Formatter};

use crate::model::{
    deadline_passed, figure_name, Attempt, Evidence, Failure, Fault, Finding, Floor, Hang, Lost,
    OtherAttempt, Outcome, PairReport, Problem, Report, Transport, Transports, Verdict, Visibility,
    WorkerFault, FIGURES,
};

/// What a failure is and what usually causes it: "… [never-written: writes … (hint)]".
fn diagnose(f: &mut Formatter<'_>, p: &Problem) -> fmt::Result {
    let class = p.class();
    write!(f, "{p} [{}: {}]", class.name(), class.hint())
}

impl Display for Finding {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Disagree { producer, consumer } => write!(
                f,
                "producer and consumer disagree (producer {producer}, consumer {consumer}): \
                 counted as false"
            ),
            Finding::Copy { side, problem } => {
                write!(f, "copy tier, {}: ", side.name())?;
                diagnose(f, problem)
            }
            Finding::Tier { tier, problem } => {
                write!(f, "{} tier: ", tier.name())?;
                diagnose(f, problem)
            }
        }
    }
}

/// Every finding, joined by `; `.
impl Display for Failure {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for (i, finding) in self.findings.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{finding}")?;
        }
        Ok(())
    }
}

impl Display for Fault {
    /// What the worker did, after its name: `exited with code 1`, `: malformed frame: …`.
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Exited(how) => write!(f, " {how}"),
            Fault::ReapedElsewhere => f.write_str(
                " exited and was reaped by other code of this process (its status is unknown)",
            ),
            Fault::ClosedPipe => f.write_str(" closed its pipe but did not exit; killed"),
            Fault::Protocol(e) => write!(f, ": {e}"),
            Fault::Poll(e) => write!(f, ": {e}"),
            Fault::StoppedReading => f.write_str(" stopped reading its pipe"),
            Fault::NoBuffer => f.write_str(" exported no buffer"),
            Fault::StrayAnswer => f.write_str(" answered a step it was not given"),
            Fault::WrongJob(job) => {
                write!(f, " answered for {job}, not for the step it was given")
            }
            Fault::OutOfTurn(message) => write!(f, " sent {message} out of turn"),
            Fault::TooManyMessages(n) => write!(f, " sent more than {n} messages for one pair"),
            Fault::Forbidden(message) => write!(f, " sent {message}, which it may not"),
            Fault::PairOutOfRange { index, of } => {
                write!(f, " sent a message for pair {index} of {of}")
            }
            Fault::TwoVerdicts { index } => write!(f, " sent two verdicts for pair {index}"),
        }
    }
}

impl Display for WorkerFault {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if matches!(self.fault, Fault::Poll(_)) {
            f.write_str("polling ")?;
        }
        write!(f, "the {}{}{}", self.worker, self.fault, self.stderr)
    }
}

impl Display for Hang {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Hang::Silent {
                worker,
                waited,
                step,
                stderr,
            } => {
                write!(
                    f,
                    "the {worker} gave no answer within {:.1} s ",
                    waited.as_secs_f64()
                )?;
                match step {
                    Some((name, pair)) => write!(f, "to step {name} of pair {pair}")?,
                    None => f.write_str("while idle")?,
                }
                write!(f, "; it was killed{stderr}")
            }
            Hang::Pair {
                waited,
                after,
                stderr,
            } => {
                write!(f, "no answer within {:.1} s ", waited.as_secs_f64())?;
                match after {
                    Some((role, what)) => write!(f, "after the {}'s {what}", role.name())?,
                    None => f.write_str("before the producer sent its IPC handle")?,
                }
                write!(f, "; the workers were killed{stderr}")
            }
            Hang::StoppedReading(fault) => write!(f, "{fault}"),
        }
    }
}

impl Display for Lost {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Worker(fault) => write!(f, "{fault}"),
            Lost::NoFreshWorker { why } => write!(
                f,
                "no fresh worker could start after an earlier failure: {why}"
            ),
            Lost::NotAttempted { budget } => {
                write!(f, "not attempted: {}", deadline_passed(*budget))
            }
        }
    }
}

impl Verdict {
    /// What was seen or why (empty for `Ok`).
    pub fn reason(&self) -> String {
        match self {
            Verdict::Ok => String::new(),
            Verdict::Fails(failure) => failure.to_string(),
            Verdict::Hang(hang) => hang.to_string(),
            Verdict::Error(lost) => lost.to_string(),
        }
    }
}

/// `ok`, or the word and the reason: `hang: the consumer (pid 7) gave no answer …`.
impl Display for Verdict {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Ok => write!(f, "ok"),
            v => write!(f, "{}: {}", v.word(), v.reason()),
        }
    }
}

/// `first attempt: fails at the copy tier (never-written)`: a failure in a few words, a hang's
/// or an error's whole reason (which names the worker and what it was doing).
impl Display for OtherAttempt {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self.which {
            Attempt::First => "first attempt: ",
            Attempt::Second => "second attempt, on fresh workers: ",
        })?;
        match &self.verdict {
            Verdict::Fails(failure) => write!(
                f,
                "fails at the {} tier ({})",
                failure.tier.name(),
                failure.class().name()
            ),
            v => write!(f, "{v}"),
        }
    }
}

impl PairReport {
    /// What was seen: why the pair failed, hung or errored, what the other attempt gave, and
    /// what that means for vLLM's cache; empty for a pass at the first attempt.
    pub fn details(&self) -> Vec<String> {
        let mut out = match (&self.outcome, self.verdict()) {
            (Outcome::Hang(hang), _) => vec![hang.to_string()],
            (Outcome::Error(lost), _) => vec![lost.to_string()],
            (Outcome::Done { .. }, Verdict::Fails(failure)) => {
                failure.findings.iter().map(Finding::to_string).collect()
            }
            (Outcome::Done { .. }, _) => Vec::new(),
        };
        out.extend(self.other_attempt.as_ref().map(OtherAttempt::to_string));
        match (self.evidence, self.transport) {
            (Evidence::Passed, _) => {}
            (e, Transport::Ipc) => out.push(e.describe().to_string()),
            // What the attempts show, without the cache: it never holds this transport's.
            (e, _) => out.push(format!(
                "evidence: {} (vLLM's cache holds legacy IPC's verdicts only)",
                e.name()
            )),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Pair, Role};

    fn fault(fault: Fault, stderr: &str) -> WorkerFault {
        WorkerFault {
            worker: "consumer (pid 7)".into(),
            fault,
            stderr: stderr.into(),
        }
    }

    #[test]
    fn every_cause_reads_as_the_sentence_it_always_was() {
        let stderr = "; its stderr: \"boom\"";
        let cases: [(String, &str); 9] = [
            (
                Hang::Silent {
                    worker: "worker of GPU 1 (pid 9)".into(),
                    waited: Duration::from_millis(5000),
                    step: Some(("Write".into(), Pair { src: 0, tgt: 1 })),
                    stderr: stderr.into(),
                }
                .to_string(),
                "the worker of GPU 1 (pid 9) gave no answer within 5.0 s to step Write of pair \
                 0->1; it was killed; its stderr: \"boom\"",
            ),
            (
                Hang::Pair {
                    waited: Duration::from_millis(250),
                    after: Some((Role::Consumer, "Copy barrier".into())),
                    stderr: String::new(),
                }
                .to_string(),
                "no answer within 0.2 s after the consumer's Copy barrier; the workers were killed",
            ),
            (
                Hang::Pair {
                    waited: Duration::from_secs(1),
                    after: None,
                    stderr: String::new(),
                }
                .to_string(),
                "no answer within 1.0 s before the producer sent its IPC handle; the workers were \
                 killed",
            ),
            (
                fault(Fault::Exited("exited with code 3".into()), stderr).to_string(),
                "the consumer (pid 7) exited with code 3; its stderr: \"boom\"",
            ),
            (
                fault(Fault::Poll("EBADF".into()), "").to_string(),
                "polling the consumer (pid 7): EBADF",
            ),
            (
                fault(Fault::Protocol("malformed frame: x".into()), "").to_string(),
                "the consumer (pid 7): malformed frame: x",
            ),
            (
                fault(Fault::PairOutOfRange { index: 9, of: 2 }, "").to_string(),
                "the consumer (pid 7) sent a message for pair 9 of 2",
            ),
            (
                Lost::NotAttempted {
                    budget: Duration::from_secs(336),
                }
                .to_string(),
                "not attempted: the check's deadline (336.0 s) passed",
            ),
            (
                Lost::NoFreshWorker { why: "x".into() }.to_string(),
                "no fresh worker could start after an earlier failure: x",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}

/// What a report's table shows that the report does not hold.
#[derive(Clone, Copy, Debug)]
pub struct TableExtras<'a> {
    /// `CUDA_VISIBLE_DEVICES` as shown (`<unset>`, or the value quoted).
    pub cuda_visible_devices: &'a str,
    /// The machine: `real driver`, or the simulation and its faults.
    pub machine: &'a str,
}

impl Report {
    /// The report as the CLI's table: a header line, the matrix (rows src, columns tgt: `ok`,
    /// `FAIL:<tier>`, `HANG`, `ERROR`, with the driver's claim where it disagrees) of each
    /// transport checked (headed by its name unless legacy IPC alone was) and each troubled
    /// pair's details (the cuMem transport's saying so). Every line ends with a newline.
    pub fn table(&self, extras: &TableExtras<'_>) -> String {
        use std::fmt::Write as _;
        let n = self.device_count;
        let mut out = String::new();
        // Legacy IPC alone reads as it always did; another choice is named.
        let transport = match self.transport {
            Transports::Ipc => String::new(),
            t => format!(", transport {}", t.name()),
        };
        let _ = writeln!(
            out,
            "p2pcheck: {n} visible device(s) (CUDA_VISIBLE_DEVICES={}; {}), engine {}, level \
             {}{transport}, workers see {}, {:.2} s to answer, {} worker(s), {} restart(s)",
            extras.cuda_visible_devices,
            extras.machine,
            self.engine.name(),
            self.level.name(),
            match self.visibility {
                Visibility::One => "their own GPU",
                Visibility::All => "every GPU",
            },
            self.answer.as_secs_f64(),
            self.workers_started,
            self.restarts
        );
        for &t in self.transport.list() {
            if self.transport != Transports::Ipc {
                let _ = writeln!(out, "transport {}:", t.name());
            }
            self.matrix(t, &mut out);
        }
        let troubled: Vec<_> = self
            .pairs
            .iter()
            .filter(|p| !p.details().is_empty())
            .collect();
        if !troubled.is_empty() {
            out.push_str("details:\n");
            for p in troubled {
                // Legacy IPC's read as they always did; the cuMem transport's say so.
                let over = match p.transport {
                    Transport::Ipc => String::new(),
                    t => format!(" over {}", t.name()),
                };
                for d in p.details() {
                    let _ = writeln!(out, "  {}{over}: {d}", p.pair);
                }
            }
        }
        if !self.bandwidth.is_empty() {
            out.push_str(&self.bandwidth_table());
        }
        out
    }

    /// The verdict matrix of `transport` into `out`.
    fn matrix(&self, transport: Transport, out: &mut String) {
        let n = self.device_count;
        let cell = |src: u32, tgt: u32| -> String {
            let Some(p) = self.get_on(transport, src, tgt) else {
                return "-".into();
            };
            let word = match p.verdict() {
                Verdict::Ok => "ok".to_string(),
                Verdict::Fails(failure) => format!("FAIL:{}", failure.tier.name()),
                Verdict::Hang(_) => "HANG".into(),
                Verdict::Error(_) => "ERROR".into(),
            };
            match p.claim() {
                Some(claim) if claim != p.ok() => {
                    format!("{word} (driver: {})", if claim { "yes" } else { "no" })
                }
                _ => word,
            }
        };
        grid(out, n, cell);
    }

    /// The bandwidth measurement as tables: one matrix per figure (rows src, columns tgt,
    /// GB/s, `slow` marked), the latency matrix (ns), then each pair's floor where it is
    /// slow or has none, and each measurement that failed.
    pub fn bandwidth_table(&self) -> String {
        use std::fmt::Write as _;
        let n = self.device_count;
        let mut out = String::new();
        let figure = |i: usize| {
            move |src: u32, tgt: u32| -> String {
                let Some(b) = self.bandwidth_of(src, tgt) else {
                    return "-".into();
                };
                match (&b.measured, b.slow) {
                    (Err(_), _) => "FAIL".into(),
                    (Ok(m), true) if i < 2 => format!("{:.1} slow", m.figures[i].gbps),
                    (Ok(m), _) => format!("{:.1}", m.figures[i].gbps),
                }
            }
        };
        for (i, &(mover, direction)) in FIGURES.iter().enumerate() {
            let _ = writeln!(out, "bandwidth {}, GB/s:", figure_name(mover, direction));
            grid(&mut out, n, figure(i));
        }
        out.push_str("latency, ns:\n");
        grid(&mut out, n, |src, tgt| match self.bandwidth_of(src, tgt) {
            Some(b) => b
                .measured
                .as_ref()
                .map_or_else(|_| "FAIL".into(), |m| format!("{:.0}", m.latency_ns)),
            None => "-".into(),
        });
        let mut unknown = Vec::new();
        for b in &self.bandwidth {
            match (&b.measured, b.floor) {
                (Err(p), _) => {
                    let _ = writeln!(out, "  {}: bandwidth not measured: {p}", b.pair);
                }
                (Ok(m), floor) if b.slow => {
                    let _ = writeln!(
                        out,
                        "  {}: slow: {:.1} GB/s one way by the copy engine, below the floor of \
                         {:.1} GB/s ({}; link {})",
                        b.pair,
                        m.judged_gbps(),
                        floor.gbps().unwrap_or(0.0),
                        match floor {
                            Floor::Given(_) => "given",
                            _ => "the link's",
                        },
                        b.link
                    );
                }
                (Ok(_), Floor::None) if b.pair.src != b.pair.tgt => {
                    unknown.push(b.pair.to_string())
                }
                _ => {}
            }
        }
        if !unknown.is_empty() {
            let _ = writeln!(
                out,
                "  no floor for {}: the link is unknown (NVML did not say); no slow verdict \
                 (give --min-gbps)",
                unknown.join(", ")
            );
        }
        out
    }
}

/// An `n` x `n` matrix of `cell(src, tgt)`, rows src and columns tgt, right-aligned.
fn grid(out: &mut String, n: u32, cell: impl Fn(u32, u32) -> String) {
    use std::fmt::Write as _;
    let cells: Vec<Vec<String>> = (0..n)
        .map(|s| (0..n).map(|t| cell(s, t)).collect())
        .collect();
    let width = cells
        .iter()
        .flatten()
        .map(String::len)
        .max()
        .unwrap_or(2)
        .max(4);
    let _ = write!(out, "{:>8}", "src\\tgt");
    for t in 0..n {
        let _ = write!(out, "  {t:>width$}");
    }
    out.push('\n');
    for (s, row) in cells.iter().enumerate() {
        let _ = write!(out, "{s:>8}");
        for c in row {
            let _ = write!(out, "  {c:>width$}");
        }
        out.push('\n');
    }
}

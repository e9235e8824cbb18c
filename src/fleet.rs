//! A check's result in the formats fleets read: Prometheus text exposition (node-exporter's
//! textfile collector), a node-problem-detector custom plugin's exit code and message, and a
//! Nagios plugin's. Pure functions of a [`Report`] (or of why there is none); `docs/fleet.md`
//! shows them in use.

use crate::advice::{self, Remedy};
use crate::model::{Level, PairReport, Report, TierOutcome, Transport};

pub use crate::render::json::JSON_SCHEMA_VERSION;

/// What a check's result does not hold but its renderings name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunInfo {
    /// Each visible GPU's UUID, in CUDA's numbering, where known (not on the simulator, nor
    /// where the GPUs cannot be named without CUDA).
    pub uuids: Option<Vec<String>>,
    /// When the check ended, in seconds since the Unix epoch.
    pub finished_unix_s: f64,
    /// How long the whole check took, in seconds (for a result: its time to answer).
    pub duration_s: f64,
}

/// How a check ended, for a monitoring system: ordered from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Every pair passed every tier asked for.
    Ok,
    /// Only the kernel or handshake tier failed somewhere: NCCL may use P2P, custom
    /// all-reduce must be off.
    Degraded,
    /// A pair's copy tier failed or was never proven: the P2P path itself is broken there.
    Broken,
    /// The check could not run.
    Unknown,
}

impl Status {
    /// The status of `report`, from [`advice::advise`]'s settings.
    pub fn of(report: &Report) -> Status {
        let a = advice::advise(report);
        if a.settings.iter().any(|s| s.remedy == Remedy::NcclP2pOff) {
            Status::Broken
        } else if a.settings.is_empty() {
            Status::Ok
        } else {
            Status::Degraded
        }
    }
}

/// A Prometheus label value: `\`, `"` and newlines escaped (text exposition format).
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `# HELP` and `# TYPE` lines of a gauge.
fn gauge(out: &mut String, name: &str, help: &str) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
}

/// The metrics every rendering has: whether there was a result, when, how long it took.
fn run_metrics(out: &mut String, success: bool, info: &RunInfo) {
    gauge(
        out,
        "p2pcheck_check_success",
        "1 when the check gave a verdict for every pair, 0 when it could not check.",
    );
    out.push_str(&format!("p2pcheck_check_success {}\n", u8::from(success)));
    gauge(
        out,
        "p2pcheck_check_duration_seconds",
        "Seconds from the start of the check to its last verdict.",
    );
    out.push_str(&format!(
        "p2pcheck_check_duration_seconds {:.6}\n",
        info.duration_s
    ));
    gauge(
        out,
        "p2pcheck_last_run_timestamp_seconds",
        "When the check ended, in seconds since the Unix epoch.",
    );
    out.push_str(&format!(
        "p2pcheck_last_run_timestamp_seconds {:.3}\n",
        info.finished_unix_s
    ));
}

/// A pair's labels: `src`, `tgt`, and their UUIDs where known.
fn pair_labels(p: &PairReport, uuids: Option<&[String]>) -> String {
    let mut labels = format!("src=\"{}\",tgt=\"{}\"", p.pair.src, p.pair.tgt);
    // Legacy IPC's series read as they always did; the cuMem transport's are told apart.
    if p.transport != Transport::Ipc {
        labels.push_str(&format!(",transport=\"{}\"", p.transport.name()));
    }
    let uuid = |i: u32| uuids.and_then(|u| u.get(i as usize));
    if let (Some(s), Some(t)) = (uuid(p.pair.src), uuid(p.pair.tgt)) {
        labels.push_str(&format!(
            ",src_uuid=\"{}\",tgt_uuid=\"{}\"",
            label(s),
            label(t)
        ));
    }
    labels
}

/// A tier's result as a gauge value: 1 passed, 0 failed, -1 not run.
fn tier_value(p: &PairReport, tier: Level) -> i8 {
    let outcome = match tier {
        Level::Copy => return p.copy_ok().map_or(-1, i8::from),
        Level::Kernel => p.kernel(),
        Level::Handshake => p.handshake(),
    };
    match outcome {
        TierOutcome::NotRun => -1,
        TierOutcome::Ok => 1,
        TierOutcome::Failed(_) => 0,
    }
}

/// `report` as Prometheus text exposition (format 0.0.4), for node-exporter's textfile
/// collector: per pair `p2pcheck_pair_ok` and `p2pcheck_pair_tier` (one series per tier),
/// labelled `src`, `tgt` and, where known, `src_uuid`, `tgt_uuid`; the settings the result
/// calls for (`p2pcheck_remedy`); the devices, pairs and pairs not ok; the check's duration
/// and end time; and `p2pcheck_info` with the version, engine and level.
pub fn prometheus(report: &Report, info: &RunInfo) -> String {
    let mut out = String::new();
    run_metrics(&mut out, true, info);
    let uuids = info.uuids.as_deref();
    gauge(
        &mut out,
        "p2pcheck_info",
        "The p2pcheck version, engine and level of the check (always 1).",
    );
    out.push_str(&format!(
        "p2pcheck_info{{version=\"{}\",engine=\"{}\",level=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        report.engine.name(),
        report.level.name()
    ));
    gauge(&mut out, "p2pcheck_devices", "GPUs the check saw.");
    out.push_str(&format!("p2pcheck_devices {}\n", report.device_count));
    gauge(&mut out, "p2pcheck_pairs", "Ordered GPU pairs checked.");
    out.push_str(&format!("p2pcheck_pairs {}\n", report.pairs.len()));
    gauge(
        &mut out,
        "p2pcheck_pairs_not_ok",
        "Pairs whose verdict is not ok (fails, hang or error).",
    );
    out.push_str(&format!(
        "p2pcheck_pairs_not_ok {}\n",
        report.pairs.iter().filter(|p| !p.ok()).count()
    ));
    gauge(
        &mut out,
        "p2pcheck_pair_ok",
        "1 when a process on GPU tgt used memory of a process on GPU src, every tier passing.",
    );
    for p in &report.pairs {
        out.push_str(&format!(
            "p2pcheck_pair_ok{{{}}} {}\n",
            pair_labels(p, uuids),
            u8::from(p.ok())
        ));
    }
    gauge(
        &mut out,
        "p2pcheck_pair_tier",
        "Each tier of a pair: 1 passed, 0 failed, -1 not run (not asked for, or not reached).",
    );
    for p in &report.pairs {
        for tier in Level::ALL {
            out.push_str(&format!(
                "p2pcheck_pair_tier{{{},tier=\"{}\"}} {}\n",
                pair_labels(p, uuids),
                tier.name(),
                tier_value(p, tier)
            ));
        }
    }
    let advice = advice::advise(report);
    gauge(
        &mut out,
        "p2pcheck_remedy",
        "1 when the result calls for the setting (p2pcheck env): nccl-p2p-off, \
         custom-all-reduce-off.",
    );
    for remedy in [Remedy::NcclP2pOff, Remedy::CustomAllReduceOff] {
        let needed = advice.settings.iter().any(|s| s.remedy == remedy);
        out.push_str(&format!(
            "p2pcheck_remedy{{remedy=\"{}\"}} {}\n",
            remedy.name(),
            u8::from(needed)
        ));
    }
    out
}

/// Prometheus text for a check that could not run: `p2pcheck_check_success 0`, its time, and
/// `p2pcheck_check_error{error="…"} 1` with the first line of why (at most 200 characters).
pub fn prometheus_failed(error: &str, info: &RunInfo) -> String {
    let mut out = String::new();
    run_metrics(&mut out, false, info);
    gauge(
        &mut out,
        "p2pcheck_check_error",
        "Why the check could not run (always 1).",
    );
    out.push_str(&format!(
        "p2pcheck_check_error{{error=\"{}\"}} 1\n",
        label(&first_line(error, 200))
    ));
    out
}

/// `text`'s first line, cut to at most `max` characters (`...` marks a cut).
fn first_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    match line.chars().count() > max {
        false => line.to_string(),
        true => {
            let mut cut: String = line.chars().take(max.saturating_sub(3)).collect();
            cut.push_str("...");
            cut
        }
    }
}

/// The pairs not ok, in words: `0->1 copy, 3->0 hang`.
fn not_ok_pairs(report: &Report) -> String {
    report
        .pairs
        .iter()
        .filter(|p| !p.ok())
        .map(|p| match p.failed_tier() {
            Some(t) => format!("{}{} {}", p.pair, over(p), t.name()),
            None => format!("{}{} {}", p.pair, over(p), p.verdict().word()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// ` over cumem` for the cuMem transport's entries; nothing for legacy IPC's.
fn over(p: &PairReport) -> String {
    match p.transport {
        Transport::Ipc => String::new(),
        t => format!(" over {}", t.name()),
    }
}

/// The longest message node-problem-detector keeps by default (`max_output_length`).
pub const NPD_MESSAGE_MAX: usize = 80;

/// A node-problem-detector custom plugin's answer: exit 0 (OK: every pair passed), 1 (NonOK:
/// a pair did not) or 2 (Unknown: could not check), and a one-line message of at most
/// [`NPD_MESSAGE_MAX`] characters.
pub fn npd(result: Result<&Report, &str>) -> (u8, String) {
    let (code, message) = match result {
        Err(why) => (2, format!("p2pcheck could not check: {why}")),
        Ok(r) => match Status::of(r) {
            Status::Ok => (
                0,
                format!(
                    "p2pcheck: all {} GPU pairs ok ({})",
                    r.pairs.len(),
                    r.level.name()
                ),
            ),
            _ => (
                1,
                format!(
                    "p2pcheck: {} of {} GPU pairs not ok: {}",
                    r.pairs.iter().filter(|p| !p.ok()).count(),
                    r.pairs.len(),
                    not_ok_pairs(r)
                ),
            ),
        },
    };
    (code, first_line(&message, NPD_MESSAGE_MAX))
}

/// A Nagios plugin's answer: exit 0 OK (every pair passed), 1 WARNING (only the kernel or
/// handshake tier failed: custom all-reduce must be off), 2 CRITICAL (a pair's copy tier
/// failed or was never proven: NCCL's P2P must be off too), 3 UNKNOWN (could not check); one
/// line, `P2PCHECK <STATE> - <text> | <performance data>`.
pub fn nagios(result: Result<&Report, &str>, info: &RunInfo) -> (u8, String) {
    let perf = |pairs: usize, not_ok: usize| {
        format!(
            "pairs={pairs} not_ok={not_ok} duration={:.3}s",
            info.duration_s
        )
    };
    let r = match result {
        Err(why) => {
            return (
                3,
                format!(
                    "P2PCHECK UNKNOWN - could not check: {} | {}",
                    first_line(why, 200),
                    perf(0, 0)
                ),
            )
        }
        Ok(r) => r,
    };
    let not_ok = r.pairs.iter().filter(|p| !p.ok()).count();
    let (code, state, text) = match Status::of(r) {
        Status::Ok => (
            0,
            "OK",
            format!(
                "{} of {} GPU pairs ok at level {}",
                r.pairs.len(),
                r.pairs.len(),
                r.level.name()
            ),
        ),
        status => (
            if status == Status::Degraded { 1 } else { 2 },
            if status == Status::Degraded {
                "WARNING"
            } else {
                "CRITICAL"
            },
            format!(
                "{not_ok} of {} GPU pairs not ok ({}); {}",
                r.pairs.len(),
                not_ok_pairs(r),
                if status == Status::Degraded {
                    "custom all-reduce must be off"
                } else {
                    "NCCL P2P and custom all-reduce must be off"
                }
            ),
        ),
    };
    (
        code,
        format!(
            "P2PCHECK {state} - {text} | {}",
            perf(r.pairs.len(), not_ok)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advice::test_reports::{copy_fails, hangs, ok, report, tier_fails};

    fn info() -> RunInfo {
        RunInfo {
            uuids: Some(vec!["GPU-aaaa".into(), "GPU-b\"b".into()]),
            finished_unix_s: 1_800_000_000.5,
            duration_s: 0.75,
        }
    }

    #[test]
    fn prometheus_has_every_pair_and_tier_with_uuids() {
        let r = report(vec![ok(0, 1), copy_fails(1, 0)]);
        let text = prometheus(&r, &info());
        assert!(text.contains("p2pcheck_check_success 1\n"), "{text}");
        assert!(text.contains(
            "p2pcheck_pair_ok{src=\"0\",tgt=\"1\",src_uuid=\"GPU-aaaa\",tgt_uuid=\"GPU-b\\\"b\"} 1\n"
        ));
        assert!(text.contains(
            "p2pcheck_pair_tier{src=\"1\",tgt=\"0\",src_uuid=\"GPU-b\\\"b\",tgt_uuid=\"GPU-aaaa\",tier=\"copy\"} 0\n"
        ));
        assert!(text.contains("p2pcheck_pairs_not_ok 1\n"));
        assert!(text.contains("p2pcheck_remedy{remedy=\"nccl-p2p-off\"} 1\n"));
        assert!(text.contains("p2pcheck_last_run_timestamp_seconds 1800000000.500\n"));
        // Every sample line belongs to a family declared just before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap_or("").to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                assert_eq!(declared.last().map(String::as_str), Some(name), "{line}");
            }
        }
    }

    #[test]
    fn prometheus_without_uuids_and_for_a_failed_check() {
        let r = report(vec![ok(0, 0)]);
        let text = prometheus(&r, &RunInfo::default());
        assert!(
            text.contains("p2pcheck_pair_ok{src=\"0\",tgt=\"0\"} 1\n"),
            "{text}"
        );
        let failed = prometheus_failed("no GPU\nsecond line", &RunInfo::default());
        assert!(failed.contains("p2pcheck_check_success 0\n"));
        assert!(failed.contains("p2pcheck_check_error{error=\"no GPU\"} 1\n"));
        assert!(!failed.contains("p2pcheck_pair_ok"));
    }

    #[test]
    fn npd_and_nagios_exit_codes() {
        let fine = report(vec![ok(0, 1), ok(1, 0)]);
        let kernel = report(vec![ok(0, 1), tier_fails(1, 0, Level::Kernel)]);
        let copy = report(vec![copy_fails(0, 1), ok(1, 0)]);
        let hang = report(vec![hangs(0, 1)]);
        assert_eq!(npd(Ok(&fine)).0, 0);
        assert_eq!(npd(Ok(&kernel)).0, 1);
        assert_eq!(npd(Ok(&hang)).0, 1);
        assert_eq!(npd(Err("no GPU")).0, 2);
        assert_eq!(nagios(Ok(&fine), &info()).0, 0);
        assert_eq!(nagios(Ok(&kernel), &info()).0, 1);
        assert_eq!(nagios(Ok(&copy), &info()).0, 2);
        assert_eq!(nagios(Ok(&hang), &info()).0, 2);
        assert_eq!(nagios(Err("no GPU"), &info()).0, 3);
        let (_, line) = nagios(Ok(&kernel), &info());
        assert!(
            line.starts_with("P2PCHECK WARNING - 1 of 2 GPU pairs not ok (1->0 kernel)"),
            "{line}"
        );
        assert!(
            line.ends_with("| pairs=2 not_ok=1 duration=0.750s"),
            "{line}"
        );
        let (_, msg) = npd(Ok(&copy));
        assert_eq!(msg, "p2pcheck: 1 of 2 GPU pairs not ok: 0->1 copy");
        let long = "x".repeat(500);
        let (_, msg) = npd(Err(&long));
        assert_eq!(msg.chars().count(), NPD_MESSAGE_MAX);
        assert!(msg.ends_with("..."));
    }
}

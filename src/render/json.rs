//! The report as JSON (the CLI's `--json`; fields in README "JSON output"), written with the
//! crate's JSON writer ([`crate::json::Object`]).

use crate::json::{Json, Object};
use crate::model::{
    figure_name, Floor, Level, PairBandwidth, PairReport, Report, TierOutcome, Verdict, WorkerInfo,
    FIGURES,
};

/// What the `--json` object holds besides the report: facts of the run and of its caller.
#[derive(Clone, Debug)]
pub struct JsonExtras<'a> {
    /// `CUDA_VISIBLE_DEVICES` as the process saw it (`None`: unset).
    pub cuda_visible_devices: Option<&'a str>,
    /// Whether the run was simulated.
    pub simulated: bool,
    /// The warnings to print (the report's and the caller's).
    pub warnings: &'a [String],
    /// The vLLM cache file's state (`null` when there is none).
    pub vllm_cache: Json,
    /// The doctor's explanations of the failures.
    pub doctor: Json,
}

/// `not-run`, `ok` or `fail`.
fn tier_word(k: &TierOutcome) -> &'static str {
    match k {
        TierOutcome::NotRun => "not-run",
        TierOutcome::Ok => "ok",
        TierOutcome::Failed(_) => "fail",
    }
}

/// One pair: its verdict with the reason, each tier, the failed tier's diagnosis, the evidence
/// and the details; its `bandwidth` (`null` when not measured) when the report measured any.
fn pair(p: &PairReport, report: &Report) -> Json {
    let verdict = p.verdict();
    let failure = match &verdict {
        Verdict::Fails(failure) => Some(failure),
        _ => None,
    };
    let diagnosis = failure.map_or_else(Json::null, |f| {
        let class = f.class();
        Object::new()
            .str("class", class.name())
            .str("hint", class.hint())
            .finish()
    });
    let mut o = Object::new();
    o.uint("src", p.pair.src.into())
        .uint("tgt", p.pair.tgt.into())
        .str("transport", p.transport.name())
        .bool("ok", p.ok())
        .str("verdict", verdict.word())
        .str("reason", &verdict.reason())
        .opt_bool("copy_ok", p.copy_ok())
        .str("kernel", tier_word(&p.kernel()))
        .str("handshake", tier_word(&p.handshake()))
        .opt_str("failed_tier", failure.map(|f| f.tier.name()))
        .value("diagnosis", &diagnosis)
        .opt_bool("driver_claim", p.claim())
        .uint("attempts", p.attempts.into())
        .str("evidence", p.evidence.name())
        .bool("persistable", p.persistable())
        .value(
            "details",
            &Json::array(p.details().iter().map(|d| Json::string(d))),
        );
    if !report.bandwidth.is_empty() {
        let b = report.bandwidth_of(p.pair.src, p.pair.tgt);
        o.value("bandwidth", &b.map_or_else(Json::null, bandwidth));
    }
    o.finish()
}

/// A pair's bandwidth (README, "JSON output"): the link, the floor and where it came from,
/// `slow`, and the figures with their spread and the latency, or the error that stands for
/// them.
fn bandwidth(b: &PairBandwidth) -> Json {
    let (figures, latency, error) = match &b.measured {
        Ok(m) => {
            let mut o = Object::new();
            for (f, &(mover, direction)) in m.figures.iter().zip(FIGURES.iter()) {
                let figure = Object::new()
                    .fixed("gbps", f.gbps, 1)
                    .fixed("cv", f.cv, 4)
                    .finish();
                o.value(figure_name(mover, direction), &figure);
            }
            (o.finish(), m.latency_ns, None)
        }
        Err(p) => (Json::null(), f64::NAN, Some(p.to_string())),
    };
    Object::new()
        .str("link", &b.link.to_string())
        .fixed("floor_gbps", b.floor.gbps().unwrap_or(f64::NAN), 1)
        .opt_str(
            "floor_from",
            match b.floor {
                Floor::Given(_) => Some("given"),
                Floor::Link(_) => Some("link"),
                Floor::None => None,
            },
        )
        .bool("slow", b.slow)
        .value("figures", &figures)
        .fixed("latency_ns", latency, 1)
        .opt_str("error", error.as_deref())
        .finish()
}

fn worker(w: &WorkerInfo) -> Json {
    Object::new()
        .uint("pid", w.pid.into())
        .str("label", &w.label)
        .opt_uint("saw", w.sees.map(u64::from))
        .uint("peak_rss_kb", w.peak_rss_kb.into())
        .finish()
}

/// The version of p2pcheck's JSON formats (`docs/json-schema.md`): the check's `--json`, `env
/// --json`. A change that removes or redefines a field bumps it; a new field does not.
pub const JSON_SCHEMA_VERSION: u32 = 1;

impl Report {
    /// The report as the CLI's `--json` prints it, with `extras`.
    pub fn to_json(&self, extras: &JsonExtras<'_>) -> Json {
        let answer = self.answer.as_secs_f64();
        Object::new()
            .uint("schema", JSON_SCHEMA_VERSION.into())
            .str("p2pcheck", env!("CARGO_PKG_VERSION"))
            .uint("device_count", self.device_count.into())
            .opt_str("cuda_visible_devices", extras.cuda_visible_devices)
            .bool("simulated", extras.simulated)
            .str("engine", self.engine.name())
            .str("level", self.level.name())
            .bool("kernel_check", self.level >= Level::Kernel)
            .str("visibility", self.visibility.name())
            .str("transport", self.transport.name())
            .fixed("answer_s", answer, 4)
            .fixed("elapsed_s", answer, 4)
            .uint("restarts", self.restarts.into())
            .uint("workers_started", self.workers_started.into())
            .uint("peak_in_flight", self.peak_in_flight.into())
            .opt_uint("worker_max_rss_kb", self.worker_max_rss_kb().map(u64::from))
            .value("workers", &Json::array(self.workers.iter().map(worker)))
            .bool("all_ok", self.pairs.iter().all(PairReport::ok))
            .value(
                "pairs",
                &Json::array(self.pairs.iter().map(|p| pair(p, self))),
            )
            .value(
                "warnings",
                &Json::array(extras.warnings.iter().map(|w| Json::string(w))),
            )
            .value("vllm_cache", &extras.vllm_cache)
            .value("doctor", &extras.doctor)
            .finish()
    }
}

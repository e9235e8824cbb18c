//! What a check means for the software that uses peer access: the settings that make NCCL and
//! the inference engines safe on this machine (`p2pcheck env`, `p2pcheck exec`).
//!
//! A pure function of a [`Report`]: veto-only, so a pair that passed every tier asked for
//! changes nothing, and a pair that did not removes exactly what its failure makes unsafe.
//!
//! | what a pair showed | what is unsafe | settings |
//! |---|---|---|
//! | the copy tier failed, or the pair hung or errored before its copy tier was proven | the P2P path itself: NCCL's P2P transport and every custom all-reduce | `NCCL_P2P_DISABLE=1`, custom all-reduce off |
//! | only the kernel or handshake tier failed | SM loads and stores, or kernels synchronising, through the mapping: custom all-reduce kernels | custom all-reduce off |
//!
//! Custom all-reduce off is `--disable-custom-all-reduce` for vLLM and SGLang (command-line
//! flags: neither reads an environment variable for it) and `FORCE_NCCL_ALL_REDUCE_STRATEGY=1`
//! for TensorRT-LLM (its all-reduce plugin and op read it). NCCL reads `NCCL_P2P_DISABLE`
//! (NCCL's environment documentation). Sources are cited in `docs/engines.md`.

use crate::json::{Json, Object};
use crate::model::{Level, Pair, PairReport, Report};

/// The software a setting is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Consumer {
    /// NCCL (every engine's collectives).
    Nccl,
    /// vLLM.
    Vllm,
    /// SGLang.
    Sglang,
    /// TensorRT-LLM.
    TensorRtLlm,
}

impl Consumer {
    /// `nccl`, `vllm`, `sglang` or `tensorrt-llm`.
    pub fn name(self) -> &'static str {
        match self {
            Consumer::Nccl => "nccl",
            Consumer::Vllm => "vllm",
            Consumer::Sglang => "sglang",
            Consumer::TensorRtLlm => "tensorrt-llm",
        }
    }
}

/// How a setting is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Knob {
    /// An environment variable and its value.
    Env {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: &'static str,
    },
    /// A command-line flag of the engine's server.
    Flag(&'static str),
}

/// What a setting turns off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Remedy {
    /// NCCL's P2P transport (NCCL then uses shared memory or the network).
    NcclP2pOff,
    /// The engines' custom all-reduce kernels (they then use NCCL's all-reduce).
    CustomAllReduceOff,
}

impl Remedy {
    /// `nccl-p2p-off` or `custom-all-reduce-off`.
    pub fn name(self) -> &'static str {
        match self {
            Remedy::NcclP2pOff => "nccl-p2p-off",
            Remedy::CustomAllReduceOff => "custom-all-reduce-off",
        }
    }
}

/// A pair that is not `ok`, and what it showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cause {
    /// The pair.
    pub pair: Pair,
    /// Its verdict's word: `fails`, `hang` or `error`.
    pub verdict: &'static str,
    /// The weakest tier that failed; `None` when the pair hung or errored.
    pub tier: Option<Level>,
    /// Whether the copy tier passed (vLLM's own test): `false` also when the pair never got
    /// that far.
    pub copy_proven: bool,
}

impl Cause {
    /// What the pair showed, in words: `copy tier failed`, `hang before the copy tier was
    /// proven`, `handshake tier failed`, ...
    pub fn describe(&self) -> String {
        match (self.tier, self.copy_proven) {
            (Some(t), _) => format!("{} tier failed", t.name()),
            (None, true) => format!("{} after the copy tier passed", self.verdict),
            (None, false) => format!("{} before the copy tier was proven", self.verdict),
        }
    }
}

/// One setting and the pairs that call for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// What it turns off.
    pub remedy: Remedy,
    /// How it is applied.
    pub knob: Knob,
    /// Whom it is for.
    pub consumers: &'static [Consumer],
    /// The pairs that call for it, in the report's order.
    pub causes: Vec<Cause>,
}

impl Setting {
    /// The causes, grouped by what they showed: `copy tier failed: 0->1, 2->3; hang before
    /// the copy tier was proven: 3->0`.
    pub fn because(&self) -> String {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for c in &self.causes {
            let what = c.describe();
            match groups.iter_mut().find(|(w, _)| *w == what) {
                Some((_, pairs)) => pairs.push(c.pair.to_string()),
                None => groups.push((what, vec![c.pair.to_string()])),
            }
        }
        groups
            .iter()
            .map(|(what, pairs)| format!("{what}: {}", pairs.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The settings for one report: empty when every pair passed every tier asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advice {
    /// The level the check ran at (a pair that passed proves only the tiers up to it).
    pub level: Level,
    /// The pairs checked.
    pub pairs: usize,
    /// The settings, NCCL's first.
    pub settings: Vec<Setting>,
}

/// The flag that turns custom all-reduce off in vLLM and SGLang.
pub const DISABLE_CUSTOM_ALL_REDUCE: &str = "--disable-custom-all-reduce";

/// The settings `report` calls for (see the module's table).
pub fn advise(report: &Report) -> Advice {
    // The remedies here are for the legacy IPC path (the cuMem transport's alone when only it
    // was checked).
    let causes: Vec<Cause> = report.primary().filter(|p| !p.ok()).map(cause).collect();
    let path_broken: Vec<Cause> = causes.iter().filter(|c| !c.copy_proven).copied().collect();
    let mut settings = Vec::new();
    if !path_broken.is_empty() {
        settings.push(Setting {
            remedy: Remedy::NcclP2pOff,
            knob: Knob::Env {
                name: "NCCL_P2P_DISABLE",
                value: "1",
            },
            consumers: &[Consumer::Nccl],
            causes: path_broken,
        });
    }
    if !causes.is_empty() {
        let off = |knob, consumers| Setting {
            remedy: Remedy::CustomAllReduceOff,
            knob,
            consumers,
            causes: causes.clone(),
        };
        settings.push(off(
            Knob::Flag(DISABLE_CUSTOM_ALL_REDUCE),
            &[Consumer::Vllm, Consumer::Sglang],
        ));
        settings.push(off(
            Knob::Env {
                name: "FORCE_NCCL_ALL_REDUCE_STRATEGY",
                value: "1",
            },
            &[Consumer::TensorRtLlm],
        ));
    }
    Advice {
        level: report.level,
        pairs: report.primary().count(),
        settings,
    }
}

fn cause(p: &PairReport) -> Cause {
    Cause {
        pair: p.pair,
        verdict: p.verdict().word(),
        tier: p.failed_tier(),
        copy_proven: p.copy_ok() == Some(true),
    }
}

impl Advice {
    /// The environment variables to set, in order.
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        self.settings
            .iter()
            .filter_map(|s| match s.knob {
                Knob::Env { name, value } => Some((name, value)),
                Knob::Flag(_) => None,
            })
            .collect()
    }

    /// Shell lines: one `export` per variable, each with a comment naming the pairs and tiers
    /// that call for it, and a comment for each engine flag; `notes` come first, as comments.
    /// Nothing but comments when every pair passed.
    pub fn render_shell(&self, notes: &[String]) -> String {
        let mut out = String::new();
        for n in notes {
            out.push_str(&format!("# {n}\n"));
        }
        if self.settings.is_empty() {
            out.push_str(&format!(
                "# every pair passed every tier up to {}: nothing to change\n",
                self.level.name()
            ));
        }
        for s in &self.settings {
            let whom = consumers_text(s.consumers);
            match s.knob {
                Knob::Env { name, value } => out.push_str(&format!(
                    "export {name}={value}  # {whom}, {}: {}\n",
                    s.remedy.name(),
                    s.because()
                )),
                Knob::Flag(flag) => out.push_str(&format!(
                    "# {whom}: add {flag} to the server's command line ({}: {}); \
                     `p2pcheck exec` adds it\n",
                    s.remedy.name(),
                    s.because()
                )),
            }
        }
        out
    }

    /// The same as one JSON object (`docs/json-schema.md`, "env"), unfinished: the caller
    /// appends its own members (the CLI's `devices` and `caches`) and calls
    /// [`Object::finish`].
    pub fn json(&self) -> Object {
        let mut o = Object::new();
        o.uint("schema", crate::render::json::JSON_SCHEMA_VERSION.into())
            .str("level", self.level.name())
            .uint("pairs", self.pairs as u64)
            .bool("all_ok", self.settings.is_empty())
            .value(
                "settings",
                &Json::array(self.settings.iter().map(setting_json)),
            );
        o
    }
}

fn consumers_text(consumers: &[Consumer]) -> String {
    consumers
        .iter()
        .map(|c| match c {
            Consumer::Nccl => "NCCL",
            Consumer::Vllm => "vLLM",
            Consumer::Sglang => "SGLang",
            Consumer::TensorRtLlm => "TensorRT-LLM",
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

fn setting_json(s: &Setting) -> Json {
    let mut o = Object::new();
    match s.knob {
        Knob::Env { name, value } => o.str("kind", "env").str("name", name).str("value", value),
        Knob::Flag(flag) => o
            .str("kind", "flag")
            .str("name", flag)
            .value("value", &Json::null()),
    };
    let causes = s.causes.iter().map(|c| {
        Object::new()
            .value(
                "pair",
                &Json::array([c.pair.src, c.pair.tgt].map(|d| Json::uint(d.into()))),
            )
            .str("verdict", c.verdict)
            .opt_str("tier", c.tier.map(Level::name))
            .bool("copy_proven", c.copy_proven)
            .finish()
    });
    o.str("remedy", s.remedy.name())
        .value("for", &Json::strings(s.consumers.iter().map(|c| c.name())))
        .str("because", &s.because())
        .value("causes", &Json::array(causes))
        .finish()
}

/// The engine flags among `settings` that `argv` (a command about to run) takes: vLLM's
/// server (`vllm serve`, `python -m vllm.entrypoints.openai.api_server`) and SGLang's
/// (`python -m sglang.launch_server`), each flag once (not when `argv` has it already). Any
/// other command gets none: a flag it does not know would make it fail.
pub fn flags_for_command(advice: &Advice, argv: &[String]) -> Vec<&'static str> {
    let Some(engine) = engine_of(argv) else {
        return Vec::new();
    };
    let mut flags: Vec<&'static str> = Vec::new();
    for s in &advice.settings {
        if let Knob::Flag(flag) = s.knob {
            if s.consumers.contains(&engine)
                && !flags.contains(&flag)
                && !argv.iter().any(|a| a == flag)
            {
                flags.push(flag);
            }
        }
    }
    flags
}

/// Which engine's server `argv` starts, if it is one p2pcheck knows.
fn engine_of(argv: &[String]) -> Option<Consumer> {
    let program = argv.first()?;
    let base = program.rsplit('/').next().unwrap_or(program);
    if base == "vllm" && argv.get(1).map(String::as_str) == Some("serve") {
        return Some(Consumer::Vllm);
    }
    if !base.starts_with("python") {
        return None;
    }
    let module = argv
        .iter()
        .position(|a| a == "-m")
        .and_then(|i| argv.get(i + 1))?;
    match module.as_str() {
        "vllm.entrypoints.openai.api_server" | "vllm.entrypoints.api_server" => {
            Some(Consumer::Vllm)
        }
        "sglang.launch_server" => Some(Consumer::Sglang),
        _ => None,
    }
}

/// Reports built by hand for the tests of this module and of `fleet` (one place that knows how
/// a report is made).
#[cfg(test)]
pub(crate) mod test_reports {
    use crate::model::{
        Engine, Evidence, Fault, Hang, Level, Lost, Outcome, Pair, PairReport, Problem, Report,
        SideVerdict, TierOutcome, Transport, Transports, Visibility, WorkerFault,
    };

    fn side(copy_ok: bool, kernel: TierOutcome, handshake: TierOutcome) -> SideVerdict {
        SideVerdict {
            copy: match copy_ok {
                true => Ok(()),
                false => Err(Problem::Driver("the copy read back wrong bytes".into())),
            },
            kernel,
            handshake,
            claim: None,
        }
    }

    fn pair(src: u32, tgt: u32, outcome: Outcome) -> PairReport {
        PairReport {
            pair: Pair { src, tgt },
            transport: Transport::Ipc,
            outcome,
            attempts: 1,
            other_attempt: None,
            evidence: Evidence::Passed,
        }
    }

    fn done(copy_ok: bool, kernel: TierOutcome, handshake: TierOutcome) -> Outcome {
        Outcome::Done {
            producer: side(copy_ok, kernel.clone(), handshake.clone()),
            consumer: side(copy_ok, kernel, handshake),
        }
    }

    fn failed() -> TierOutcome {
        TierOutcome::Failed(Problem::Driver("the tier failed".into()))
    }

    /// A report of `pairs` on 4 GPUs at level handshake.
    pub fn report(pairs: Vec<PairReport>) -> Report {
        let mut r = Report::empty(
            Engine::Parallel,
            Level::Handshake,
            Transports::Ipc,
            Visibility::One,
        );
        r.device_count = 4;
        r.pairs = pairs;
        r
    }

    /// A pair that passed every tier.
    pub fn ok(src: u32, tgt: u32) -> PairReport {
        pair(src, tgt, done(true, TierOutcome::Ok, TierOutcome::Ok))
    }

    /// A pair whose copy tier failed.
    pub fn copy_fails(src: u32, tgt: u32) -> PairReport {
        pair(
            src,
            tgt,
            done(false, TierOutcome::NotRun, TierOutcome::NotRun),
        )
    }

    /// A pair whose copy tier passed and `tier` (kernel or handshake) failed.
    pub fn tier_fails(src: u32, tgt: u32, tier: Level) -> PairReport {
        match tier {
            Level::Handshake => pair(src, tgt, done(true, TierOutcome::Ok, failed())),
            _ => pair(src, tgt, done(true, failed(), TierOutcome::NotRun)),
        }
    }

    /// A pair whose worker hung.
    pub fn hangs(src: u32, tgt: u32) -> PairReport {
        pair(
            src,
            tgt,
            Outcome::Hang(Hang::Silent {
                worker: format!("worker of GPU {tgt}"),
                waited: std::time::Duration::from_secs(1),
                step: None,
                stderr: String::new(),
            }),
        )
    }

    /// A pair whose worker died.
    pub fn errs(src: u32, tgt: u32) -> PairReport {
        pair(
            src,
            tgt,
            Outcome::Error(Lost::Worker(WorkerFault {
                worker: format!("worker of GPU {tgt}"),
                fault: Fault::ReapedElsewhere,
                stderr: String::new(),
            })),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_reports::{copy_fails, errs, hangs, ok, report, tier_fails};
    use super::*;

    fn member<'a>(v: &'a crate::json::Value, key: &str) -> Option<&'a crate::json::Value> {
        match v {
            crate::json::Value::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    #[test]
    fn every_pair_passing_changes_nothing() {
        let a = advise(&report(vec![ok(0, 1), ok(1, 0)]));
        assert!(a.settings.is_empty());
        assert!(a.env().is_empty());
        let shell = a.render_shell(&[]);
        assert!(shell.lines().all(|l| l.starts_with('#')), "{shell}");
        assert!(shell.contains("nothing to change"), "{shell}");
        let v = crate::json::parse(a.json().finish().as_str()).expect("valid JSON");
        assert_eq!(member(&v, "all_ok"), Some(&crate::json::Value::Bool(true)));
    }

    #[test]
    fn a_copy_failure_turns_nccl_p2p_and_custom_all_reduce_off() {
        let a = advise(&report(vec![ok(0, 1), copy_fails(1, 2)]));
        assert_eq!(
            a.env(),
            vec![
                ("NCCL_P2P_DISABLE", "1"),
                ("FORCE_NCCL_ALL_REDUCE_STRATEGY", "1")
            ]
        );
        assert_eq!(a.settings[0].remedy, Remedy::NcclP2pOff);
        assert_eq!(a.settings[0].because(), "copy tier failed: 1->2");
        let shell = a.render_shell(&[]);
        let export = shell
            .lines()
            .find(|l| l.starts_with("export NCCL_P2P_DISABLE=1"))
            .expect("an export line");
        assert!(export.contains("copy tier failed: 1->2"), "{export}");
        assert!(shell.contains(DISABLE_CUSTOM_ALL_REDUCE), "{shell}");
    }

    #[test]
    fn a_kernel_or_handshake_failure_turns_only_custom_all_reduce_off() {
        for tier in [Level::Kernel, Level::Handshake] {
            let a = advise(&report(vec![tier_fails(2, 3, tier)]));
            let remedies: Vec<Remedy> = a.settings.iter().map(|s| s.remedy).collect();
            assert_eq!(
                remedies,
                vec![Remedy::CustomAllReduceOff, Remedy::CustomAllReduceOff]
            );
            assert_eq!(a.env(), vec![("FORCE_NCCL_ALL_REDUCE_STRATEGY", "1")]);
            assert_eq!(
                a.settings[0].because(),
                format!("{} tier failed: 2->3", tier.name())
            );
        }
    }

    #[test]
    fn a_hang_before_the_copy_tier_is_treated_as_a_broken_path() {
        let a = advise(&report(vec![hangs(3, 0), errs(0, 3)]));
        assert_eq!(a.settings[0].remedy, Remedy::NcclP2pOff);
        assert_eq!(
            a.settings[0].because(),
            "hang before the copy tier was proven: 3->0; error before the copy tier was \
             proven: 0->3"
        );
        // The caller's members, whatever their strings hold, keep the object valid.
        let hostile = "q\"b\\\n\u{1}\"},{\"x\":[é😀";
        let text = a.json().str("extra", hostile).finish();
        let v = crate::json::parse(text.as_str()).expect("JSON");
        assert_eq!(
            member(&v, "extra"),
            Some(&crate::json::Value::String(hostile.into()))
        );
    }

    #[test]
    fn engine_flags_go_only_to_servers_that_take_them() {
        let a = advise(&report(vec![tier_fails(0, 1, Level::Kernel)]));
        let argv = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            flags_for_command(&a, &argv("vllm serve m --tensor-parallel-size 2")),
            vec![DISABLE_CUSTOM_ALL_REDUCE]
        );
        assert_eq!(
            flags_for_command(&a, &argv("/usr/bin/python3 -m sglang.launch_server --tp 2")),
            vec![DISABLE_CUSTOM_ALL_REDUCE]
        );
        assert_eq!(
            flags_for_command(&a, &argv("python -m vllm.entrypoints.openai.api_server")),
            vec![DISABLE_CUSTOM_ALL_REDUCE]
        );
        // Already there, another program, or nothing to turn off: nothing added.
        assert!(
            flags_for_command(&a, &argv("vllm serve m --disable-custom-all-reduce")).is_empty()
        );
        assert!(flags_for_command(&a, &argv("trtllm-serve m")).is_empty());
        assert!(flags_for_command(&a, &argv("python train.py")).is_empty());
        assert!(flags_for_command(&a, &[]).is_empty());
        let fine = advise(&report(vec![ok(0, 1)]));
        assert!(flags_for_command(&fine, &argv("vllm serve m")).is_empty());
    }
}

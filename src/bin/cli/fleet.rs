//! The CLI's `env` and `exec` commands and its fleet formats (`--format prometheus|npd|nagios`,
//! `--output`): a check, then `p2pcheck::advice` or `p2pcheck::fleet` renders it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use p2pcheck::advice::{self, Advice};
use p2pcheck::fleet::{self, RunInfo};
use p2pcheck::json::{Json, Object};
use p2pcheck::{AccessOptions, Report};

use super::Args;

/// How a check's result is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The matrix and details (the default).
    Table,
    /// One JSON object (`--json`).
    Json,
    /// Prometheus text exposition.
    Prometheus,
    /// A node-problem-detector custom plugin: exit 0/1/2 and a short message.
    Npd,
    /// A Nagios plugin: exit 0/1/2/3 and one line.
    Nagios,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        Ok(match s {
            "table" => Format::Table,
            "json" => Format::Json,
            "prometheus" => Format::Prometheus,
            "npd" => Format::Npd,
            "nagios" => Format::Nagios,
            other => {
                return Err(format!(
                    "--format {other:?}: table, json, prometheus, npd or nagios"
                ))
            }
        })
    }
}

impl Format {
    /// Whether this module renders it (the table and JSON are the main file's).
    pub fn is_fleet(self) -> bool {
        matches!(self, Format::Prometheus | Format::Npd | Format::Nagios)
    }
}

fn now_unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Each visible GPU's UUID in CUDA's numbering, read without CUDA, when that is possible and
/// the check saw as many; `None` on the simulator (its GPUs are not this machine's).
fn visible_uuids(args: &Args, devices: Option<u32>) -> Option<Vec<String>> {
    if args.opts.simulate.is_some() {
        return None;
    }
    let uuids = p2pcheck::visible_gpu_uuids()?;
    match devices {
        Some(n) if n as usize != uuids.len() => None,
        _ => Some(uuids),
    }
}

/// Prints `text` on stdout, or writes it to `--output` atomically (a temp file in the same
/// folder, renamed over it: a collector never reads half a file).
fn emit(args: &Args, text: &str) -> Result<(), String> {
    match &args.output {
        None => {
            print!("{text}");
            Ok(())
        }
        Some(path) => p2pcheck::write_file_atomic(path, text)
            .map_err(|e| format!("--output {}: {e:#}", path.display())),
    }
}

/// The check for `--format prometheus|npd|nagios`; the exit code. Prometheus: the table's
/// codes (0, 1, 2), and a check that could not run still gets its file
/// (`p2pcheck_check_success 0`); npd: 0 OK, 1 NonOK, 2 Unknown; nagios: 0 OK, 1 WARNING, 2
/// CRITICAL, 3 UNKNOWN.
pub fn run_fleet(args: &Args) -> u8 {
    let started = Instant::now();
    let pending = p2pcheck::start(None, args.opts.clone());
    let result = pending.wait().map_err(|e| e.to_string());
    let info = RunInfo {
        uuids: visible_uuids(args, result.as_ref().ok().map(|r| r.device_count)),
        finished_unix_s: now_unix_s(),
        duration_s: match &result {
            Ok(r) => r.answer.as_secs_f64(),
            Err(_) => started.elapsed().as_secs_f64(),
        },
    };
    let mut warnings = Vec::new();
    let mut cache_failed = false;
    if let Ok(report) = &result {
        warnings.extend(report.warnings.iter().cloned());
        match super::cache_note(args, report, &mut warnings) {
            Ok(Some(note)) => {
                if let Some(e) = note.failed {
                    warnings.push(format!("could not write vLLM's cache: {e}"));
                    cache_failed = true;
                }
            }
            Ok(None) => {}
            Err(e) => warnings.push(e),
        }
    }
    let as_ref = result.as_ref().map_err(String::as_str);
    let (code, text) = match args.format {
        Format::Npd => {
            let (code, message) = fleet::npd(as_ref);
            (code, format!("{message}\n"))
        }
        Format::Nagios => {
            let (code, line) = fleet::nagios(as_ref, &info);
            (code, format!("{line}\n"))
        }
        _ => match &result {
            Ok(r) if cache_failed => (2, fleet::prometheus(r, &info)),
            Ok(r) => (
                u8::from(!r.pairs.iter().all(|p| p.ok())),
                fleet::prometheus(r, &info),
            ),
            Err(e) => (2, fleet::prometheus_failed(e, &info)),
        },
    };
    let code = match emit(args, &text) {
        Ok(()) => code,
        Err(e) => {
            eprintln!("p2pcheck: {e}");
            // A plugin's "could not tell", where the format has one.
            match args.format {
                Format::Nagios => 3,
                _ => 2,
            }
        }
    };
    if let Err(e) = &result {
        eprintln!("p2pcheck: could not check: {e}");
    }
    warnings.extend(pending.finish());
    for w in warnings {
        eprintln!("p2pcheck: warning: {w}");
    }
    code
}

/// One engine cache `env` wrote (or tried to).
struct CacheWrite {
    engine: &'static str,
    path: PathBuf,
    error: Option<String>,
}

/// SGLang's cache folder as SGLang names it: `os.path.expanduser("~/.cache/sglang")`
/// (`sglang/srt/distributed/device_communicators/custom_all_reduce_utils.py`).
fn sglang_cache_dir() -> Result<PathBuf, String> {
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(Path::new(&home).join(".cache").join("sglang")),
        None => Err("HOME is not set, so SGLang's folder ~/.cache/sglang is not known".into()),
    }
}

/// Writes `report` as vLLM's and SGLang's cache, where `env` writes them: the folders given
/// (`--cache-dir`, `--sglang-cache-dir`), else, on a real machine, the engines' own; a
/// simulation writes only where told.
fn write_caches(args: &Args, report: &Report) -> Vec<CacheWrite> {
    let simulated = args.opts.simulate.is_some();
    let vllm = match (&args.cache_dir, simulated) {
        (Some(d), _) => Some(Ok(d.clone())),
        (None, true) => None,
        (None, false) => Some(p2pcheck::vllm_cache_dir().map_err(|e| format!("{e:#}"))),
    };
    let sglang = match (&args.sglang_cache_dir, simulated) {
        (Some(d), _) => Some(Ok(d.clone())),
        (None, true) => None,
        (None, false) => Some(sglang_cache_dir()),
    };
    let mut written = Vec::new();
    for (engine, dir) in [("vllm", vllm), ("sglang", sglang)] {
        let Some(dir) = dir else { continue };
        let write = dir.and_then(|dir| {
            let opts = AccessOptions {
                check: args.opts.clone(),
                cache_dir: Some(dir.clone()),
                refresh: false,
                trust_cache_owner: args.trust_cache_owner,
            };
            let path = p2pcheck::vllm_cache_path_in(&dir, report.device_count)
                .map_err(|e| e.to_string())?;
            p2pcheck::store_report(report, &opts)
                .map(|_| path.clone())
                .map_err(|e| format!("{}: {e}", path.display()))
        });
        written.push(match write {
            Ok(path) => CacheWrite {
                engine,
                path,
                error: None,
            },
            Err(e) => CacheWrite {
                engine,
                path: PathBuf::new(),
                error: Some(e),
            },
        });
    }
    written
}

/// The check for `env` and `exec`, its advice and the caches written; `Err`: could not check.
fn advise(args: &Args) -> Result<(Report, Advice, Vec<CacheWrite>), String> {
    let pending = p2pcheck::start(None, args.opts.clone());
    let report = pending.wait().map_err(|e| e.to_string())?;
    for w in report.warnings.iter().cloned().chain(pending.finish()) {
        eprintln!("p2pcheck: warning: {w}");
    }
    let advice = advice::advise(&report);
    let caches = write_caches(args, &report);
    Ok((report, advice, caches))
}

/// `p2pcheck env`: the settings as `export` lines (or `--json`); exit 0 when the settings were
/// given (whatever they are), 2 when the check could not run.
pub fn env(args: &Args) -> u8 {
    let (report, advice, caches) = match advise(args) {
        Ok(x) => x,
        Err(e) => {
            if args.json {
                println!("{}", Object::new().str("error", &e).finish());
            }
            eprintln!("p2pcheck: could not check: {e}");
            return 2;
        }
    };
    if args.json {
        let caches = caches.iter().map(|c| {
            let path = c.path.display().to_string();
            Object::new()
                .str("engine", c.engine)
                .opt_str("path", c.error.is_none().then_some(path.as_str()))
                .bool("written", c.error.is_none())
                .opt_str("error", c.error.as_deref())
                .finish()
        });
        let json = advice
            .json()
            .uint("devices", report.device_count.into())
            .value("caches", &Json::array(caches))
            .finish();
        println!("{json}");
        return 0;
    }
    let mut notes = vec![format!(
        "p2pcheck env: {} GPU(s), {} pair(s) checked at level {}, {} not ok",
        report.device_count,
        report.pairs.len(),
        report.level.name(),
        report.pairs.iter().filter(|p| !p.ok()).count()
    )];
    for c in &caches {
        notes.push(match &c.error {
            None => format!("{}'s cache written: {}", c.engine, c.path.display()),
            Some(e) => format!("{}'s cache NOT written: {e}", c.engine),
        });
    }
    print!("{}", advice.render_shell(&notes));
    0
}

/// `p2pcheck exec [OPTIONS] -- CMD ARGS...`: the check, then CMD run in this process's place
/// with the settings' variables in its environment and, for vLLM's and SGLang's servers, their
/// flags appended. Returns only when CMD could not be run (exit 2, as when the check could not
/// run: a command is never started on an unknown machine state).
pub fn exec(args: &Args, command: Vec<OsString>) -> u8 {
    use std::os::unix::process::CommandExt;
    let Some((program, rest)) = command.split_first() else {
        eprintln!("p2pcheck: exec needs a command after `--` (see --help)");
        return 2;
    };
    let (_, advice, caches) = match advise(args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("p2pcheck: could not check, so {program:?} was not run: {e}");
            return 2;
        }
    };
    for c in caches.iter().filter(|c| c.error.is_some()) {
        eprintln!(
            "p2pcheck: warning: {}'s cache not written: {}",
            c.engine,
            c.error.as_deref().unwrap_or_default()
        );
    }
    let text: Vec<String> = command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let flags = advice::flags_for_command(&advice, &text);
    for s in &advice.settings {
        eprintln!(
            "p2pcheck: {} ({})",
            match s.knob {
                advice::Knob::Env { name, value } => format!("{name}={value}"),
                advice::Knob::Flag(f) if flags.contains(&f) => format!("{f} added"),
                advice::Knob::Flag(f) => format!("{f} not added (not a server p2pcheck knows)"),
            },
            s.because()
        );
    }
    let err = std::process::Command::new(program)
        .args(rest)
        .args(&flags)
        .envs(advice.env())
        .exec();
    eprintln!("p2pcheck: exec {program:?}: {err}");
    2
}

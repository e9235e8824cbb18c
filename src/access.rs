//! vLLM's `gpu_p2p_access_check` with p2pcheck's cache: the answer from this process's memo,
//! else from vLLM's cache file where p2pcheck's fingerprint vouches for it, else checked once
//! and written; and [`store_report`], which writes a report as that cache.
//!
//! Each call reads the environment once ([`Environment`]) and passes it down.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use once_cell::sync::{Lazy, OnceCell};

use crate::cache;
use crate::engine::{self, Options};
use crate::environment::Environment;
use crate::error::{CacheErrorKind, Error, Result};
use crate::fingerprint;
use crate::model::{Level, PairReport, Report, Transport, Transports};

/// How [`access_check`] finds or computes its answer.
#[derive(Clone, Debug, Default)]
pub struct AccessOptions {
    /// How a check runs, when one is needed (its level and the settings that change what a
    /// verdict means are recorded in the fingerprint).
    pub check: Options,
    /// The cache folder; `None`: vLLM's (`$VLLM_CACHE_ROOT`, ...), as the environment says at
    /// the call.
    pub cache_dir: Option<PathBuf>,
    /// Check again even if a valid cache file is there.
    pub refresh: bool,
    /// One more user (uid), besides this process's own and root, whose cache folder and files
    /// are trusted: for a folder shared between users on purpose (`--trust-cache-owner`). See
    /// [`crate::Origin::Untrusted`].
    pub trust_cache_owner: Option<u32>,
}

/// [`access_check`]'s answer and how it was reached.
#[derive(Clone, Debug)]
pub struct Access {
    /// Whether `tgt` can use `src`'s memory.
    pub answer: bool,
    /// Where the answer came from.
    pub origin: cache::Origin,
    /// vLLM's cache file.
    pub path: PathBuf,
    /// Things the caller should know (a stale, unusable or untrusted file, an answer not
    /// persisted, a machine that could not be fingerprinted without CUDA).
    pub warnings: Vec<String>,
}

/// Everything an answer depends on besides the pair: the cache folder (as resolved at the
/// call), the environment that selects and orders the GPUs and the CUDA libraries, the check's
/// level and settings ([`check_terms`]), and whose files are trusted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AnswerKey {
    dir: PathBuf,
    cvd: Option<OsString>,
    device_order: Option<OsString>,
    libraries: [Option<OsString>; 2],
    level: Level,
    terms: String,
    trust_cache_owner: Option<u32>,
}

impl AnswerKey {
    fn new(dir: &Path, env: &Environment, opts: &AccessOptions) -> AnswerKey {
        AnswerKey {
            dir: dir.to_path_buf(),
            cvd: env.cvd.clone(),
            device_order: env.device_order.clone(),
            libraries: env.libraries.clone(),
            level: opts.check.level,
            terms: check_terms(&opts.check),
            trust_cache_owner: opts.trust_cache_owner,
        }
    }
}

/// The device count, every verdict (row-major) and the cache file, for each [`AnswerKey`]
/// answered in this process.
type Answers = HashMap<AnswerKey, (u32, Vec<bool>, PathBuf)>;

/// Answers already given in this process: the one memo. Consulted before anything else, so a
/// repeated question costs one read of the environment, a lock and a hash lookup.
static ANSWERS: Lazy<Mutex<Answers>> = Lazy::new(Mutex::default);

/// The check's settings, besides its level, that change what a verdict means, as the
/// fingerprint's `check` line: the kernel tier's bytes (and the test-only planted fault), the
/// handshake's rounds and budget, and a simulation with its faults. Timeouts and the engine
/// are not among them: they change how long a check may take, not what a passing tier proves.
fn check_terms(opts: &Options) -> String {
    let mut terms = Vec::new();
    if opts.level >= Level::Kernel {
        terms.push(format!("kernel_bytes={}", opts.kernel_bytes));
        if crate::engine::planted_shift() != 0 {
            terms.push("test_plant_shifted_stores".into());
        }
    }
    if opts.level >= Level::Handshake {
        terms.push(format!("handshake_rounds={}", opts.handshake_rounds));
        terms.push(format!(
            "handshake_budget_ms={}",
            opts.handshake_budget.as_millis()
        ));
    }
    if let Some(sim) = &opts.simulate {
        let mut faults: Vec<String> = sim.faults.iter().map(|f| f.to_string()).collect();
        faults.sort();
        faults.dedup();
        terms.push(format!("simulated_gpus={}", sim.gpus));
        terms.push(format!("faults={}", faults.join(",")));
    }
    terms.join(" ")
}

/// What a cached answer under `opts` depends on now, read without CUDA (`opts.simulate`: the
/// simulated machine instead of /proc), and, where the GPUs cannot be named without CUDA, why
/// not: they are then only counted, by `count` (the driver, or the workers of a report).
fn current_fingerprint(
    env: &Environment,
    opts: &Options,
    count: impl FnOnce() -> Result<u32>,
) -> Result<(fingerprint::Fingerprint, Option<String>)> {
    let cvd = env.cvd_text()?;
    let machine = engine::machine(opts.simulate.as_ref());
    let named = match &machine {
        Ok(m) => engine::visible_gpus(m, cvd, env.device_order()),
        Err(why) => Err(why.clone()),
    };
    let (driver_version, boot_id) = match machine {
        Ok(m) => (m.driver_version, m.boot_id),
        // The boot id does not need NVIDIA's driver.
        Err(_) => (
            String::new(),
            fingerprint::read_boot_id().unwrap_or_default(),
        ),
    };
    let (gpus, unnamed) = match named {
        Ok(gpus) => (gpus, None),
        Err(why) => (Vec::new(), Some(why)),
    };
    let devices = match unnamed {
        None => gpus.len(),
        Some(_) => count()? as usize,
    };
    let fp = fingerprint::Fingerprint {
        version: env!("CARGO_PKG_VERSION").into(),
        level: opts.level.name().into(),
        check: check_terms(opts),
        driver_version,
        boot_id,
        cvd: cvd.map(str::to_string),
        devices,
        gpus,
    };
    Ok((fp, unnamed))
}

/// The cache folder of `opts`, checked ([`cache::check_dir`]): the one given, else vLLM's as
/// `env` places it.
fn cache_folder(opts: &AccessOptions, env: &Environment) -> Result<PathBuf> {
    let dir = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => env.cache_dir()?,
    };
    cache::check_dir(&dir)?;
    Ok(dir)
}

/// Writes `report`'s verdicts as vLLM's cache file in `opts`' folder, with the fingerprint
/// that vouches for them (the machine, `opts.check`'s level and settings, the verdicts),
/// atomically and under the lock, so that [`access_check`] answers
/// from it without CUDA. `opts.check` must be the options the report was checked with.
///
/// Every failure is an error and nothing is written: a verdict that is not a fact
/// ([`PairReport::persistable`]), a folder, lock or file that is not trusted
/// ([`crate::Origin::Untrusted`]), a machine whose GPUs `/proc` counts differently from the workers, a
/// failed write. Returns the file written and, where the GPUs could not be named without CUDA,
/// what the fingerprint therefore cannot notice (for a warning).
///
/// # Errors
///
/// [`Error::InvalidInput`] for a report of another level than `opts.check`'s, or not the whole
/// matrix, or a `CUDA_VISIBLE_DEVICES` that is not UTF-8; [`Error::Cache`] for everything
/// refused or failed above.
pub fn store_report(report: &Report, opts: &AccessOptions) -> Result<(PathBuf, Option<String>)> {
    let env = Environment::read();
    let dir = cache_folder(opts, &env)?;
    let path = env.cache_path_in(&dir, report.device_count)?;
    let refuse = |why: String| Error::Cache {
        path: path.clone(),
        kind: CacheErrorKind::Refused {
            doing: String::new(),
            why,
        },
    };
    if report.level != opts.check.level {
        return Err(Error::InvalidInput(format!(
            "the report was checked at level {}, but the options say {}",
            report.level.name(),
            opts.check.level.name()
        )));
    }
    if !report.transport.has(Transport::Ipc) {
        return Err(refuse(
            "not written: the report is of the cuMem transport alone, and vLLM's cache holds \
             legacy CUDA IPC's verdicts (check with --transport ipc or all)"
                .into(),
        ));
    }
    // The cache holds legacy IPC's verdicts, whatever else the report checked.
    if let Some(p) = report.on(Transport::Ipc).find(|p| !p.persistable()) {
        return Err(refuse(format!(
            "not written: pair {} is {} ({}): {}",
            p.pair,
            p.verdict().word(),
            p.evidence.name(),
            p.evidence.describe()
        )));
    }
    let n = report.device_count as usize;
    let verdicts: Vec<bool> = report.on(Transport::Ipc).map(PairReport::ok).collect();
    if verdicts.len() != n * n {
        return Err(Error::InvalidInput(format!(
            "a report of {} pairs is not the whole {n} x {n} matrix vLLM's cache holds",
            verdicts.len()
        )));
    }
    let (now, unnamed) = current_fingerprint(&env, &opts.check, || Ok(report.device_count))?;
    if now.devices != n {
        return Err(refuse(format!(
            "not written: /proc/driver/nvidia names {} visible GPUs, the workers saw {n}",
            now.devices
        )));
    }
    let trust = cache::Trust {
        owner: opts.trust_cache_owner,
    };
    cache::store_checked(&path, &now, &verdicts, trust)?;
    let note = unnamed.map(|why| {
        format!(
            "the GPUs cannot be named without CUDA ({why}): the fingerprint records their \
             number, not which they are"
        )
    });
    Ok((path, note))
}

/// vLLM's `gpu_p2p_access_check` with options: can a process on `tgt` use memory owned by a
/// process on `src`?
///
/// In order: this process's earlier answers under the same options, folder and environment;
/// vLLM's cache file, if p2pcheck's fingerprint beside it vouches for exactly its verdicts
/// under this machine and this check (driver version, each GPU's UUID and bus id, boot id,
/// `CUDA_VISIBLE_DEVICES`, p2pcheck's version, the level and the settings that change what a
/// verdict means — read from `/proc/driver/nvidia` and `/proc/sys/kernel/random/boot_id`
/// without initialising CUDA); else the check for all pairs, once (one process computes while
/// others wait on the lock), written atomically with its fingerprint. A pair that hung or
/// errored only once is answered `false` to this caller and nothing is written. A cache folder
/// or file that is not trusted ([`crate::Origin::Untrusted`]) is neither read nor written: the pairs are
/// checked and a warning says why.
///
/// Where the GPUs cannot be named without CUDA (no `/proc/driver/nvidia`, MIG) the device count
/// comes from the driver, and the file answers only where a fingerprint confirms the level,
/// the settings and the verdicts (a GPU swapped for another then goes unnoticed), or, at level
/// copy with no fingerprint, as vLLM trusts it; the warnings say so.
///
/// # Errors
///
/// [`Error::InvalidInput`] for options out of range, a device out of range, or a
/// `CUDA_VISIBLE_DEVICES` that is not UTF-8; [`Error::Cache`] for a cache folder or file that
/// cannot be used; the check's own error where one was needed and could not be carried out.
pub fn access_check(src: u32, tgt: u32, opts: &AccessOptions) -> Result<Access> {
    opts.check.validate()?;
    let env = Environment::read();
    let dir = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => env.cache_dir()?,
    };
    let key = AnswerKey::new(&dir, &env, opts);
    if !opts.refresh {
        if let Some(access) = remembered(&key, src, tgt) {
            return Ok(access);
        }
    }
    cache::check_dir(&dir)?;
    let mut warnings = Vec::new();
    let (now, unnamed) = current_fingerprint(&env, &opts.check, visible_device_count)?;
    if let Some(why) = unnamed {
        warnings.push(format!(
            "the GPUs cannot be named without CUDA ({why}): counted with the driver; the cache \
             file answers only where p2pcheck's fingerprint beside it confirms the level, the \
             check's settings and the verdicts (a GPU swapped for another is then not \
             noticed), or, at level copy without a fingerprint, as vLLM trusts it"
        ));
    }
    let n = now.devices as u32;
    if src >= n || tgt >= n {
        return Err(Error::InvalidInput(format!(
            "device {src}->{tgt} out of range: {n} devices are visible"
        )));
    }
    let path = env.cache_path_in(&dir, n)?;
    let ask = cache::Ask {
        refresh: opts.refresh,
        trust: cache::Trust {
            owner: opts.trust_cache_owner,
        },
        lock_timeout: cache::LOCK_TIMEOUT,
    };
    let loaded = cache::load_or_check(&path, &now, &ask, || check_all(&opts.check, n))?;
    warnings.extend(origin_warning(&loaded.origin, &path));
    if !matches!(loaded.origin, cache::Origin::NotPersisted { .. }) {
        let mut answers = ANSWERS.lock().unwrap_or_else(|p| p.into_inner());
        answers.insert(key, (n, loaded.verdicts.clone(), path.clone()));
    }
    Ok(Access {
        answer: loaded.verdicts[(src * n + tgt) as usize],
        origin: loaded.origin,
        path,
        warnings,
    })
}

/// The memo's answer for `src->tgt` under `key`, if this process gave one.
fn remembered(key: &AnswerKey, src: u32, tgt: u32) -> Option<Access> {
    let answers = ANSWERS.lock().unwrap_or_else(|p| p.into_inner());
    let (n, verdicts, path) = answers.get(key)?;
    (src < *n && tgt < *n).then(|| Access {
        answer: verdicts[(src * n + tgt) as usize],
        origin: cache::Origin::Memo,
        path: path.clone(),
        warnings: Vec::new(),
    })
}

/// Every pair checked under `opts`, as the cache's computation: the verdicts, and why they
/// must not be written where one is not a fact. The workers must see the `n` devices this
/// process counted.
fn check_all(opts: &Options, n: u32) -> Result<cache::Computed> {
    // vLLM's cache speaks of legacy CUDA IPC only, whatever transport the options name.
    let ipc = Options {
        transport: Transports::Ipc,
        ..opts.clone()
    };
    // No bandwidth here (the cache holds verdicts only): nothing to judge.
    let report = engine::run(None, &ipc, |_, _| {})?;
    if report.device_count != n {
        return Err(Error::DeviceCountChanged {
            workers: report.device_count,
            here: n,
        });
    }
    let not_persisted = (!report.persistable()).then(|| {
        let once: Vec<String> = report
            .pairs
            .iter()
            .filter(|p| !p.persistable())
            .map(|p| format!("{} {} ({})", p.pair, p.verdict().word(), p.evidence.name()))
            .collect();
        format!(
            "{} not a fact (no pass at once, no failure confirmed on fresh workers): \
             answered false, not written",
            once.join(", ")
        )
    });
    Ok(cache::Computed {
        verdicts: report.pairs.iter().map(PairReport::ok).collect(),
        not_persisted,
    })
}

/// What the caller should know about where an answer came from, if anything.
fn origin_warning(origin: &cache::Origin, path: &Path) -> Option<String> {
    match origin {
        cache::Origin::Recomputed { reason } => Some(format!(
            "{} was not used ({reason}); checked again",
            path.display()
        )),
        cache::Origin::NotPersisted { reason } => Some(reason.clone()),
        cache::Origin::Untrusted { reason } => Some(format!(
            "{reason}; the pairs were checked again, and nothing was written"
        )),
        _ => None,
    }
}

/// Devices visible to this process, from the driver (`cuInit` + `cuDeviceGetCount`), once per
/// process: the count of a process's own devices does not change while it runs.
pub(crate) fn visible_device_count() -> Result<u32> {
    static COUNT: OnceCell<u32> = OnceCell::new();
    COUNT
        .get_or_try_init(|| {
            crate::cuda::init()?;
            Ok(crate::cuda::device_count()? as u32)
        })
        .copied()
}

//! # p2pcheck
//!
//! Proves, with real memory traffic across processes, whether each ordered pair of NVIDIA GPUs
//! can reach the other's memory — the way multi-GPU inference engines use it — and answers
//! vLLM's questions in vLLM's formats:
//!
//! * [`check`] / [`start`]: every pair (or a batch) checked by worker processes, one per GPU,
//!   all pairs at once ([`Engine::Parallel`]) or vLLM's procedure exactly ([`Engine::Vllm`]);
//! * [`can_actually_p2p`]: vLLM's function of that name, one boolean per pair;
//! * [`gpu_p2p_access_check`]: the cached answer for one pair, reading and writing the same
//!   cache file vLLM does (byte-identical), atomically and under a lock, with a fingerprint
//!   beside it so that a changed machine is re-checked and a warm answer needs no CUDA at all;
//! * [`policy::should_nccl_symm_mem_allreduce`] and the all-reduce size tables.
//!
//! The layers, bottom to top: `sys` (generated bindings), `cuda` (dlopen, lazy symbols,
//! checked calls, owned resources), `model` (pairs, problems, verdicts and their causes,
//! reports: the vocabulary every layer speaks), `protocol` (the model over pipes), `worker`
//! (the child processes), `engine` (the parent: pool, engines, deadlines, rounds), `render`
//! (the model as text and JSON), [`cache`],
//! [`fingerprint`], [`policy`], and this API.
//!
//! ```no_run
//! // Which pairs of the visible GPUs really work? (Needs GPUs and the p2pcheck-worker binary.)
//! let ok = p2pcheck::can_actually_p2p(&[0, 1], &[1, 0])?;
//! println!("0->1: {}, 1->0: {}", ok[0], ok[1]);
//! // The cached answer, shared with vLLM through its cache file:
//! if p2pcheck::gpu_p2p_access_check(0, 1)? {
//!     println!("device 1 can use device 0's memory");
//! }
//! // Overlap the check with other start-up work:
//! let pending = p2pcheck::start(None, p2pcheck::Options::default());
//! // ... load weights ...
//! let report = pending.wait()?;
//! println!("{} pairs in {:?}", report.pairs.len(), report.answer);
//! # Ok::<(), p2pcheck::Error>(())
//! ```

// `unsafe` lives only at the FFI edges: `cuda` (CUDA), `os` (libc), `sys` (bindings),
// `capi` (the C ABI) and `doctor::nvml` (NVML).
#![deny(unsafe_code)]

pub mod cache;
pub mod capi;
mod cuda;
pub mod doctor;
mod engine;
mod error;
mod files;
pub mod fingerprint;
pub mod json;
mod model;
mod os;
pub mod policy;
pub mod program;
mod protocol;
mod render;
pub mod sim;
mod sys;
#[cfg(test)]
mod testutil;
pub mod trace_summary;
mod visible;
mod worker;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Mutex;

use once_cell::sync::{Lazy, OnceCell};

pub use cuda::trace::open_destination as open_trace;
pub use cuda::{Error as CudaError, Library};
pub use engine::{
    locate_worker, start, this_executable_is_a_worker, Options, Pending, DEFAULT_KERNEL_BYTES,
    TIMEOUT_RANGE,
};
pub use error::{Error, Phase, Result};
pub use model::{
    all_pairs, Attempt, Check, Class, Engine, Evidence, Failure, Fault, Finding, Hang, Level, Lost,
    OtherAttempt, Outcome, Pair, PairReport, Problem, Report, SideVerdict, TierOutcome, TierParams,
    Verdict, Visibility, WorkerFault, WorkerInfo,
};
pub use protocol::VERSION as PROTOCOL_VERSION;
pub use render::json::JsonExtras;
pub use sys::BINDINGS_SOURCE;
pub use worker::{main as worker_main, TEST_BYTES, WORKER_FLAG};

/// Checks `pairs` (every ordered pair of the visible devices when `None`) and returns when
/// every verdict is known; the workers exit and are reaped in the background. See [`start`]
/// to overlap the check with other work.
pub fn check(pairs: Option<&[Pair]>, opts: &Options) -> Result<Report> {
    engine::run(pairs, opts)
}

/// vLLM's `can_actually_p2p`: checks the pairs `(batch_src[i], batch_tgt[i])` and returns one
/// boolean per pair, in order.
///
/// "src->tgt" means: a process on `tgt` mapped memory owned by a process on `src` and both read
/// back what it wrote. Producer and consumer disagreeing counts as false (the report's
/// warnings say so). With the default [`Options`] the kernel tier runs too and the parallel
/// engine is used; [`can_actually_p2p_with`] with `engine: Engine::Vllm, level: Level::Copy`
/// is vLLM's exact test.
pub fn can_actually_p2p(batch_src: &[u32], batch_tgt: &[u32]) -> Result<Vec<bool>> {
    let report = can_actually_p2p_with(batch_src, batch_tgt, &Options::default())?;
    Ok(report.pairs.iter().map(PairReport::ok).collect())
}

/// [`can_actually_p2p`] with explicit options, returning the full [`Report`].
pub fn can_actually_p2p_with(
    batch_src: &[u32],
    batch_tgt: &[u32],
    opts: &Options,
) -> Result<Report> {
    if batch_src.len() != batch_tgt.len() {
        return Err(Error::InvalidInput(format!(
            "batch_src has {} devices but batch_tgt has {}: they must pair up",
            batch_src.len(),
            batch_tgt.len()
        )));
    }
    let pairs: Vec<Pair> = batch_src
        .iter()
        .zip(batch_tgt)
        .map(|(&src, &tgt)| Pair { src, tgt })
        .collect();
    if pairs.is_empty() {
        return Ok(Report {
            device_count: 0,
            pairs: Vec::new(),
            engine: opts.engine,
            level: opts.level,
            visibility: opts.visibility,
            answer: std::time::Duration::ZERO,
            worker: PathBuf::new(),
            restarts: 0,
            workers_started: 0,
            peak_in_flight: 0,
            workers: Vec::new(),
            warnings: Vec::new(),
        });
    }
    check(Some(&pairs), opts)
}

/// Devices visible to this process, from the driver (`cuInit` + `cuDeviceGetCount`), once.
pub fn visible_device_count() -> Result<u32> {
    static COUNT: OnceCell<u32> = OnceCell::new();
    COUNT
        .get_or_try_init(|| {
            cuda::init()?;
            Ok(cuda::device_count()? as u32)
        })
        .copied()
}

/// The vLLM cache file for `n` devices and this process's `CUDA_VISIBLE_DEVICES`.
pub fn vllm_cache_path(n: u32) -> Result<PathBuf> {
    let dir = cache::cache_dir().map_err(|e| Error::Cache {
        path: PathBuf::new(),
        message: format!("{e:#}"),
    })?;
    vllm_cache_path_in(&dir, n)
}

/// The vLLM cache file for `n` devices and this process's `CUDA_VISIBLE_DEVICES`, in `dir`.
/// A `CUDA_VISIBLE_DEVICES` that is not UTF-8 cannot name a cache file: that is an error.
pub fn vllm_cache_path_in(dir: &std::path::Path, n: u32) -> Result<PathBuf> {
    let cvd = cvd_text()?;
    Ok(dir.join(cache::file_name(&visible::cache_key(
        cvd.as_deref(),
        n as usize,
    ))))
}

/// `CUDA_VISIBLE_DEVICES` as text (`None`: unset).
fn cvd_text() -> Result<Option<String>> {
    std::env::var_os(visible::VAR)
        .map(|v| {
            v.into_string().map_err(|v| {
                Error::InvalidInput(format!(
                    "CUDA_VISIBLE_DEVICES={v:?} is not UTF-8 text, so it cannot name vLLM's \
                     cache file"
                ))
            })
        })
        .transpose()
}

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
    /// [`cache::Trust`].
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
    env: Vec<Option<OsString>>,
    level: Level,
    terms: String,
    trust_cache_owner: Option<u32>,
}

/// The variables [`AnswerKey`] holds: they change which GPUs are asked about, in which order,
/// or which driver answers.
const ANSWER_ENV: [&str; 4] = [
    visible::VAR,
    "CUDA_DEVICE_ORDER",
    "P2PCHECK_LIBCUDA",
    "P2PCHECK_LIBCUDART",
];

/// The device count, every verdict (row-major) and the cache file, for each [`AnswerKey`]
/// answered in this process.
type Answers = HashMap<AnswerKey, (u32, Vec<bool>, PathBuf)>;

/// Answers already given in this process. Consulted before anything else, so a repeated
/// question costs a few environment lookups, a lock and a hash lookup.
static ANSWERS: Lazy<Mutex<Answers>> = Lazy::new(Mutex::default);

/// The check's settings, besides its level, that change what a verdict means, as the
/// fingerprint's `check` line: the kernel tier's bytes (and the test-only planted fault), the
/// handshake's rounds and budget, and a simulation with its faults. Timeouts and the engine
/// are not among them: they change how long a check may take, not what a passing tier proves.
fn check_terms(opts: &Options) -> String {
    let mut terms = Vec::new();
    if opts.level >= Level::Kernel {
        terms.push(format!("kernel_bytes={}", opts.kernel_bytes));
        if opts.test_plant_shifted_stores {
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
    cvd: Option<&str>,
    opts: &Options,
    count: impl FnOnce() -> Result<u32>,
) -> Result<(fingerprint::Fingerprint, Option<String>)> {
    let machine = engine::machine(opts.simulate.as_ref());
    let named = match &machine {
        Ok(m) => engine::visible_gpus(m, cvd),
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

/// The cache folder of `opts`: the one given, else vLLM's as the environment says now.
fn cache_folder(opts: &AccessOptions) -> Result<PathBuf> {
    match &opts.cache_dir {
        Some(d) => Ok(d.clone()),
        None => cache::cache_dir().map_err(|e| Error::cache(std::path::Path::new(""), e)),
    }
}

/// [`cache::check_dir`] as this crate's error.
fn check_dir(dir: &std::path::Path) -> Result<()> {
    cache::check_dir(dir).map_err(|e| Error::cache(dir, e))
}

/// Writes `report`'s verdicts as vLLM's cache file in `opts`' folder, with the fingerprint
/// that vouches for them (the machine, `opts.check`'s level and settings, the verdicts; see
/// [`cache::store_checked`]), atomically and under the lock, so that [`access_check`] answers
/// from it without CUDA. `opts.check` must be the options the report was checked with.
///
/// Every failure is an error and nothing is written: a verdict that is not a fact
/// ([`PairReport::persistable`]), a folder, lock or file that is not trusted
/// ([`cache::Trust`]), a machine whose GPUs `/proc` counts differently from the workers, a
/// failed write. Returns the file written and, where the GPUs could not be named without CUDA,
/// what the fingerprint therefore cannot notice (for a warning).
pub fn store_report(report: &Report, opts: &AccessOptions) -> Result<(PathBuf, Option<String>)> {
    let dir = cache_folder(opts)?;
    check_dir(&dir)?;
    let path = vllm_cache_path_in(&dir, report.device_count)?;
    let refuse = |message: String| Error::Cache {
        path: path.clone(),
        message,
    };
    if report.level != opts.check.level {
        return Err(Error::InvalidInput(format!(
            "the report was checked at level {}, but the options say {}",
            report.level.name(),
            opts.check.level.name()
        )));
    }
    if let Some(p) = report.pairs.iter().find(|p| !p.persistable()) {
        return Err(refuse(format!(
            "not written: pair {} is {} ({}): {}",
            p.pair,
            p.verdict().word(),
            p.evidence.name(),
            p.evidence.describe()
        )));
    }
    let n = report.device_count as usize;
    let verdicts: Vec<bool> = report.pairs.iter().map(PairReport::ok).collect();
    if verdicts.len() != n * n {
        return Err(Error::InvalidInput(format!(
            "a report of {} pairs is not the whole {n} x {n} matrix vLLM's cache holds",
            verdicts.len()
        )));
    }
    let cvd = cvd_text()?;
    let (now, unnamed) =
        current_fingerprint(cvd.as_deref(), &opts.check, || Ok(report.device_count))?;
    if now.devices != n {
        return Err(refuse(format!(
            "not written: /proc/driver/nvidia names {} visible GPUs, the workers saw {n}",
            now.devices
        )));
    }
    let trust = cache::Trust {
        owner: opts.trust_cache_owner,
    };
    cache::store_checked(&path, &now, &verdicts, trust).map_err(|e| Error::cache(&path, e))?;
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
/// or file that is not trusted ([`cache::Trust`]) is neither read nor written: the pairs are
/// checked and a warning says why.
///
/// Where the GPUs cannot be named without CUDA (no `/proc/driver/nvidia`, MIG) the device count
/// comes from the driver, and the file answers only where a fingerprint confirms the level,
/// the settings and the verdicts (a GPU swapped for another then goes unnoticed), or, at level
/// copy with no fingerprint, as vLLM trusts it; the warnings say so.
pub fn access_check(src: u32, tgt: u32, opts: &AccessOptions) -> Result<Access> {
    opts.check.validate()?;
    let dir = cache_folder(opts)?;
    let key = AnswerKey {
        dir: dir.clone(),
        env: ANSWER_ENV.iter().map(std::env::var_os).collect(),
        level: opts.check.level,
        terms: check_terms(&opts.check),
        trust_cache_owner: opts.trust_cache_owner,
    };
    if !opts.refresh {
        let answers = ANSWERS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, verdicts, path)) = answers.get(&key) {
            if src < *n && tgt < *n {
                return Ok(Access {
                    answer: verdicts[(src * n + tgt) as usize],
                    origin: cache::Origin::Memo,
                    path: path.clone(),
                    warnings: Vec::new(),
                });
            }
        }
    }
    check_dir(&dir)?;
    let cvd = cvd_text()?;
    let mut warnings = Vec::new();
    let (now, unnamed) = current_fingerprint(cvd.as_deref(), &opts.check, visible_device_count)?;
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
    let path = vllm_cache_path_in(&dir, n)?;
    let mut failure: Option<Error> = None;
    let compute = || {
        let result = check(None, &opts.check).and_then(|report| {
            if report.device_count != n {
                return Err(Error::DeviceCountChanged {
                    workers: report.device_count,
                    here: n,
                });
            }
            Ok(report)
        });
        match result {
            Ok(report) => {
                let not_persisted = (!report.persistable()).then(|| {
                    let once: Vec<String> = report
                        .pairs
                        .iter()
                        .filter(|p| !p.persistable())
                        .map(|p| {
                            format!("{} {} ({})", p.pair, p.verdict().word(), p.evidence.name())
                        })
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
            Err(e) => {
                let text = e.to_string();
                failure = Some(e);
                Err(anyhow::anyhow!(text))
            }
        }
    };
    let ask = cache::Ask {
        refresh: opts.refresh,
        trust: cache::Trust {
            owner: opts.trust_cache_owner,
        },
        lock_timeout: cache::LOCK_TIMEOUT,
    };
    let loaded = match (cache::load_or_check(&path, &now, &ask, compute), failure) {
        (Ok(l), _) => l,
        (Err(_), Some(e)) => return Err(e),
        (Err(e), None) => return Err(Error::cache(&path, e)),
    };
    match &loaded.origin {
        cache::Origin::Recomputed { reason } => warnings.push(format!(
            "{} was not used ({reason}); checked again",
            path.display()
        )),
        cache::Origin::NotPersisted { reason } => warnings.push(reason.clone()),
        cache::Origin::Untrusted { reason } => warnings.push(format!(
            "{reason}; the pairs were checked again, and nothing was written"
        )),
        _ => {}
    }
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

/// vLLM's `gpu_p2p_access_check`: can a process on `tgt` use memory owned by a process on
/// `src`? [`access_check`] with the default options (the warnings are dropped; use
/// [`access_check`] to see them).
pub fn gpu_p2p_access_check(src: u32, tgt: u32) -> Result<bool> {
    access_check(src, tgt, &AccessOptions::default()).map(|a| a.answer)
}

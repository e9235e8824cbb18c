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
//! checked calls, owned resources), `protocol` (frames over pipes), `worker` (the child
//! processes), `engine` (the parent: pool, engines, deadlines, rounds), [`cache`],
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
//! let mut pending = p2pcheck::start(None, p2pcheck::Options::default());
//! // ... load weights ...
//! let report = pending.wait()?;
//! println!("{} pairs in {:?}", report.pairs.len(), report.answer);
//! # Ok::<(), p2pcheck::Error>(())
//! ```

// `unsafe` lives only at the FFI edges: `cuda` (CUDA), `os` (libc), `sys` (bindings) and
// `capi` (the C ABI).
#![deny(unsafe_code)]

pub mod cache;
pub mod capi;
mod cuda;
mod engine;
mod error;
mod files;
pub mod fingerprint;
pub mod json;
mod os;
pub mod policy;
mod protocol;
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
    all_pairs, locate_worker, start, Engine, Options, Outcome, PairReport, Pending, Report,
    Verdict, Visibility, WorkerInfo, DEFAULT_KERNEL_BYTES, TIMEOUT_RANGE,
};
pub use error::{Error, Result};
pub use protocol::{
    Check, Class, Level, Pair, Problem, SideVerdict, TierOutcome, TierParams,
    VERSION as PROTOCOL_VERSION,
};
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

/// For a program of its own, such as the CLI (never inside another program's process): makes
/// it the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`), so that a worker's
/// descendant that escaped its process group (`setsid`) is reparented here when the worker
/// dies and [`kill_leftover_children`] can end it.
pub fn adopt_orphans() -> Result<()> {
    os::become_subreaper().map_err(|e| Error::Worker(format!("PR_SET_CHILD_SUBREAPER failed: {e}")))
}

/// Kills and reaps every child process this process still has, returning their pids: after
/// a check has finished ([`Pending::finish`]), anything left is an escaped descendant of a
/// worker (see [`adopt_orphans`]).
/// Workers still being reaped by a check's own thread are left alone.
pub fn kill_leftover_children() -> Vec<u32> {
    os::kill_and_reap_children(engine::pool::is_tracked)
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
    /// How a check runs, when one is needed (its level is recorded in the fingerprint).
    pub check: Options,
    /// The cache folder; `None`: vLLM's (`$VLLM_CACHE_ROOT`, ...).
    pub cache_dir: Option<PathBuf>,
    /// Check again even if a valid cache file is there.
    pub refresh: bool,
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
    /// Things the caller should know (a stale or unusable file, an answer not persisted, a
    /// machine that could not be fingerprinted without CUDA).
    pub warnings: Vec<String>,
}

/// Answers already given in this process, by (`CUDA_VISIBLE_DEVICES`, cache folder, level):
/// the device count and every verdict. Consulted before anything else, so a repeated question
/// costs a lock and a hash lookup.
type AnswerKey = (Option<OsString>, Option<PathBuf>, Level);
/// The device count and every verdict, row-major.
type Answers = HashMap<AnswerKey, (u32, Vec<bool>)>;
static ANSWERS: Lazy<Mutex<Answers>> = Lazy::new(Mutex::default);

/// The most bytes a fingerprint file may have (a few lines per GPU).
const FINGERPRINT_MAX: u64 = 64 * 1024;

/// What a cached answer for `level` depends on, read without CUDA (`simulate`: the simulated
/// machine instead of /proc), or why it cannot be known.
fn current_fingerprint(
    cvd: Option<&str>,
    level: Level,
    simulate: Option<&sim::Simulation>,
) -> std::result::Result<fingerprint::Fingerprint, String> {
    let machine = engine::machine(simulate)?;
    let gpus = engine::visible_gpus(&machine, cvd)?;
    Ok(fingerprint::Fingerprint {
        version: env!("CARGO_PKG_VERSION").into(),
        level: level.name().into(),
        driver_version: machine.driver_version,
        boot_id: machine.boot_id,
        cvd: cvd.map(str::to_string),
        gpus,
    })
}

/// Writes `report`'s verdicts as vLLM's cache file in `dir` (atomically, under its lock) with
/// the fingerprint beside it, so that [`access_check`] answers from it without CUDA. Refused
/// when a verdict is not a fact ([`Report::persistable`]). Returns the file written and, when
/// the machine could not be fingerprinted without CUDA, why not (the file is then written
/// alone, as vLLM would).
pub fn store_report(
    dir: &std::path::Path,
    report: &Report,
    simulate: Option<&sim::Simulation>,
) -> Result<(PathBuf, Option<String>)> {
    cache::check_dir(dir).map_err(|e| Error::cache(dir, e))?;
    let path = vllm_cache_path_in(dir, report.device_count)?;
    if let Some(p) = report.pairs.iter().find(|p| !p.persistable()) {
        return Err(Error::Cache {
            path,
            message: format!(
                "not written: pair {} {} once and could not be retried to a verdict",
                p.pair,
                p.verdict().word()
            ),
        });
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
    let fp = current_fingerprint(cvd.as_deref(), report.level, simulate).and_then(|fp| {
        match fp.gpus.len() == n {
            true => Ok(fp),
            false => Err(format!(
                "/proc/driver/nvidia names {} visible GPUs, the workers saw {n}",
                fp.gpus.len()
            )),
        }
    });
    let beside = fingerprint::path_beside(&path);
    let _lock = cache::FileLock::acquire(&cache::lock_path(&path), cache::LOCK_TIMEOUT)
        .map_err(|e| Error::cache(&path, e))?;
    cache::write_atomic(&path, &cache::render(n, &verdicts)).map_err(|e| Error::cache(&path, e))?;
    match fp {
        Ok(fp) => {
            cache::write_atomic(&beside, &fp.render()).map_err(|e| Error::cache(&beside, e))?;
            Ok((path, None))
        }
        Err(why) => Ok((path, Some(why))),
    }
}

/// vLLM's `gpu_p2p_access_check` with options: can a process on `tgt` use memory owned by a
/// process on `src`?
///
/// In order: this process's earlier answers; vLLM's cache file, if the fingerprint beside it
/// matches the machine (driver version, each GPU's UUID and bus id, boot id,
/// `CUDA_VISIBLE_DEVICES`, p2pcheck's version and the check level — read from
/// `/proc/driver/nvidia` and `/proc/sys/kernel/random/boot_id` without initialising CUDA);
/// else the check for all pairs, once (one process computes while others wait on the lock),
/// written atomically with its fingerprint. A pair that hung or errored only once is answered
/// `false` to this caller and nothing is written. Where the GPUs cannot be named without CUDA
/// (no `/proc/driver/nvidia`, MIG) the device count comes from the driver and the file is
/// trusted as vLLM trusts it; the warnings say so.
pub fn access_check(src: u32, tgt: u32, opts: &AccessOptions) -> Result<Access> {
    let key: AnswerKey = (
        std::env::var_os(visible::VAR),
        opts.cache_dir.clone(),
        opts.check.level,
    );
    if !opts.refresh {
        let answers = ANSWERS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, verdicts)) = answers.get(&key) {
            if src < *n && tgt < *n {
                return Ok(Access {
                    answer: verdicts[(src * n + tgt) as usize],
                    origin: cache::Origin::Memo,
                    path: PathBuf::new(),
                    warnings: Vec::new(),
                });
            }
        }
    }
    let cvd = cvd_text()?;
    let mut warnings = Vec::new();
    let known = current_fingerprint(
        cvd.as_deref(),
        opts.check.level,
        opts.check.simulate.as_ref(),
    );
    let (n, current) = match known {
        Ok(fp) => (fp.gpus.len() as u32, Some(fp)),
        Err(why) => {
            warnings.push(format!(
                "the GPUs cannot be named without CUDA ({why}): counted with the driver, and \
                 the cache file is trusted as vLLM trusts it"
            ));
            (visible_device_count()?, None)
        }
    };
    if src >= n || tgt >= n {
        return Err(Error::InvalidInput(format!(
            "device {src}->{tgt} out of range: {n} devices are visible"
        )));
    }
    let dir = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => cache::cache_dir().map_err(|e| Error::cache(std::path::Path::new(""), e))?,
    };
    cache::check_dir(&dir).map_err(|e| Error::cache(&dir, e))?;
    let path = vllm_cache_path_in(&dir, n)?;
    let beside = fingerprint::path_beside(&path);
    if opts.refresh {
        cache::forget_memo();
    }
    let refresh_pending = std::cell::Cell::new(opts.refresh);
    let stale = || -> Option<String> {
        if refresh_pending.get() {
            return Some("a fresh check was asked for".into());
        }
        let fp = current.as_ref()?;
        let recorded = match cache::read_small(&beside, FINGERPRINT_MAX) {
            Ok(None) => {
                return Some(format!(
                    "no p2pcheck fingerprint beside it ({}): its origin is unknown",
                    beside.display()
                ))
            }
            Ok(Some(Ok(bytes))) => String::from_utf8(bytes)
                .map_err(|_| "not UTF-8 text".to_string())
                .and_then(|t| fingerprint::Fingerprint::parse(&t)),
            Ok(Some(Err(why))) => Err(why),
            Err(e) => Err(format!("{e:#}")),
        };
        match recorded {
            Ok(old) => fp
                .difference(&old)
                .map(|d| format!("the machine changed since it was written: {d}")),
            Err(why) => Some(format!(
                "its fingerprint {} is unusable: {why}",
                beside.display()
            )),
        }
    };
    let mut failure: Option<Error> = None;
    let compute = || {
        refresh_pending.set(false);
        let result = check(None, &opts.check).and_then(|report| {
            if report.device_count != n {
                return Err(Error::Worker(format!(
                    "the workers see {} devices, this process {n}",
                    report.device_count
                )));
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
                        .map(|p| format!("{} {}", p.pair, p.verdict().word()))
                        .collect();
                    format!(
                        "{} hung or errored once and could not be retried to a verdict: \
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
    let written = || match &current {
        Some(fp) => cache::write_atomic(&beside, &fp.render()),
        None => Ok(()),
    };
    let loaded = cache::load_or_compute_checked(
        &path,
        n as usize,
        cache::LOCK_TIMEOUT,
        stale,
        compute,
        written,
    );
    let loaded = match (loaded, failure) {
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
        _ => {}
    }
    if !matches!(loaded.origin, cache::Origin::NotPersisted { .. }) {
        let mut answers = ANSWERS.lock().unwrap_or_else(|p| p.into_inner());
        answers.insert(key, (n, loaded.verdicts.clone()));
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

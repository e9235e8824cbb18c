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
//! (the model as text and JSON), `cache` (vLLM's file, locked, trusted or not), `fingerprint`
//! (what vouches for a cached answer), [`policy`], and this API.
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
// and `doctor::nvml` (NVML); the C ABI is the crate `capi/`.
#![deny(unsafe_code)]

mod access;
pub mod advice;
// The cache and the fingerprint are implementation details. This crate's own integration tests
// reach them through the `test-internals` feature (Cargo.toml): not API, hidden from the docs.
#[cfg(feature = "test-internals")]
#[doc(hidden)]
pub mod cache;
#[cfg(not(feature = "test-internals"))]
mod cache;
mod cuda;
pub mod doctor;
mod engine;
mod environment;
mod error;
mod failed_call;
mod files;
#[cfg(feature = "test-internals")]
#[doc(hidden)]
pub mod fingerprint;
#[cfg(not(feature = "test-internals"))]
mod fingerprint;
pub mod fleet;
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

use std::path::PathBuf;

use environment::Environment;

pub use access::{access_check, store_report, Access, AccessOptions};
pub use cache::{CacheFile, Origin};
pub use cuda::{Error as CudaError, Library};
pub use engine::{
    locate_worker, this_executable_is_a_worker, Options, Pending, ProcessOwner,
    DEFAULT_BANDWIDTH_BYTES, DEFAULT_KERNEL_BYTES, TIMEOUT_RANGE,
};
pub use error::{CacheErrorKind, Error, Phase, Result};
pub use model::{
    all_pairs, Attempt, Check, Class, Engine, Evidence, Failure, Fault, Finding, Hang, Level, Lost,
    OtherAttempt, Outcome, Pair, PairReport, Problem, Report, Route, SideVerdict, TierOutcome,
    TierParams, Transport, Transports, Verdict, Visibility, WorkerFault, WorkerInfo,
};
pub use model::{
    figure_name, Bandwidth, Direction, Figure, Floor, Link, Mover, PairBandwidth, FIGURES,
    FLOOR_FRACTION,
};
pub use protocol::{MAX_DEVICES, VERSION as PROTOCOL_VERSION};
pub use render::json::JsonExtras;
pub use render::text::TableExtras;
pub use sys::BINDINGS_SOURCE;
pub use worker::{main as worker_main, TEST_BYTES, WORKER_FLAG};

/// Checks `pairs` (every ordered pair of the visible devices when `None`) and returns when
/// every verdict is known; the workers exit and are reaped in the background. See [`start`]
/// to overlap the check with other work.
///
/// # Errors
///
/// [`Error`] when the check cannot be carried out at all (no worker, no CUDA, no device, bad
/// options, cancelled); a pair that fails, hangs or errors is an outcome in the [`Report`].
pub fn check(pairs: Option<&[Pair]>, opts: &Options) -> Result<Report> {
    engine::run(pairs, opts, judge_bandwidth_links)
}

/// Starts checking `pairs` (all pairs of the visible devices when `None`) in the background
/// and returns at once, so a caller can overlap the check with its own start-up: the
/// [`Pending`] gives the same report as [`check`] would.
///
/// The check runs on its own thread, which spawns the workers and outlives them: after the
/// report is handed over it reaps every worker (they tear their contexts down off the critical
/// path). Dropping the [`Pending`] before the check has a result cancels it.
pub fn start(pairs: Option<Vec<Pair>>, opts: Options) -> Pending {
    engine::start(pairs, opts, judge_bandwidth_links)
}

/// Judges a report's bandwidth figures ([`Report::bandwidth`]) against the links NVML
/// describes (the doctor's [`doctor::Facts::link`]), on the check's thread before the report
/// is handed over: the engine knows only one GPU's own memory and the simulator's link.
/// Nothing changes when the check was simulated or measured nothing, or when the GPUs cannot
/// be numbered as CUDA numbers them without CUDA (then each link stays unknown: no floor,
/// unless [`Options::min_gbps`] gives one).
fn judge_bandwidth_links(report: &mut Report, opts: &Options) {
    if report.bandwidth.is_empty() || opts.simulate.is_some() {
        return;
    }
    let facts = doctor::gather();
    let numbered = matches!(facts.numbering, doctor::Numbering::Cuda)
        && facts.gpus.len() == report.device_count as usize;
    report.judge_bandwidth(
        |p| match (p.src == p.tgt, numbered) {
            (true, _) => Link::SameGpu,
            (false, true) => facts.link(p.src, p.tgt),
            (false, false) => Link::Unknown,
        },
        opts.min_gbps,
    );
}

/// vLLM's `can_actually_p2p`: checks the pairs `(batch_src[i], batch_tgt[i])` and returns one
/// boolean per pair, in order.
///
/// "src->tgt" means: a process on `tgt` mapped memory owned by a process on `src` and both read
/// back what it wrote. Producer and consumer disagreeing counts as false (the report's
/// warnings say so). With the default [`Options`] the kernel tier runs too and the parallel
/// engine is used; [`can_actually_p2p_with`] with `engine: Engine::Vllm, level: Level::Copy`
/// is vLLM's exact test.
///
/// # Errors
///
/// As [`can_actually_p2p_with`].
pub fn can_actually_p2p(batch_src: &[u32], batch_tgt: &[u32]) -> Result<Vec<bool>> {
    let report = can_actually_p2p_with(batch_src, batch_tgt, &Options::default())?;
    Ok(report.primary().map(PairReport::ok).collect())
}

/// [`can_actually_p2p`] with explicit options, returning the full [`Report`].
///
/// # Errors
///
/// [`Error::InvalidInput`] when the batches differ in length; otherwise as [`check`].
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
        return Ok(Report::empty(
            opts.engine,
            opts.level,
            opts.transport,
            opts.visibility,
        ));
    }
    check(Some(&pairs), opts)
}

/// Opens this process's audit-trace destination now rather than at its first CUDA call:
/// `file`, or as `P2PCHECK_TRACE` says when `None` (README, "Audit trace"). A process has one
/// destination, decided once: this call decides it unless it is decided already. Workers get
/// theirs from [`Options::trace`] or the environment.
///
/// # Errors
///
/// [`Error::InvalidInput`] when the file cannot be opened or created, or is not a regular file
/// (a FIFO or a device would block or misbehave): the message names it and says why.
pub fn open_trace(file: Option<&std::path::Path>) -> Result<()> {
    cuda::trace::open_destination(file.map(std::path::Path::as_os_str)).map_err(Error::InvalidInput)
}

/// Devices visible to this process, from the driver (`cuInit` + `cuDeviceGetCount`), once.
///
/// # Errors
///
/// [`Error::Cuda`] when CUDA cannot be loaded or either call fails.
pub fn visible_device_count() -> Result<u32> {
    access::visible_device_count()
}

/// The vLLM cache file for `n` devices and this process's `CUDA_VISIBLE_DEVICES`.
///
/// # Errors
///
/// As [`vllm_cache_path_in`], and [`Error::Cache`] where vLLM's cache folder cannot be
/// located.
pub fn vllm_cache_path(n: u32) -> Result<PathBuf> {
    let env = Environment::read();
    env.cache_path_in(&env.cache_dir()?, n)
}

/// The vLLM cache file for `n` devices and this process's `CUDA_VISIBLE_DEVICES`, in `dir`.
///
/// # Errors
///
/// [`Error::Cache`] ([`CacheErrorKind::BadPath`]) for a folder path that cannot hold the cache
/// (empty, with a NUL byte, or naming something that is not a folder);
/// [`Error::InvalidInput`] for a `CUDA_VISIBLE_DEVICES` that is not UTF-8 text: it cannot
/// name a cache file.
pub fn vllm_cache_path_in(dir: &std::path::Path, n: u32) -> Result<PathBuf> {
    cache::check_dir(dir)?;
    Environment::read().cache_path_in(dir, n)
}

/// vLLM's `gpu_p2p_access_check`: can a process on `tgt` use memory owned by a process on
/// `src`? [`access_check`] with the default options (the warnings are dropped; use
/// [`access_check`] to see them).
///
/// # Errors
///
/// As [`access_check`].
pub fn gpu_p2p_access_check(src: u32, tgt: u32) -> Result<bool> {
    access_check(src, tgt, &AccessOptions::default()).map(|a| a.answer)
}

/// vLLM's cache folder, as vLLM finds it: `$VLLM_CACHE_ROOT`, else `$XDG_CACHE_HOME/vllm`, else
/// `$HOME/.cache/vllm`.
///
/// # Errors
///
/// [`Error::Cache`] ([`CacheErrorKind::NoFolder`]) when none of them is set (or one is not
/// usable as a path).
pub fn vllm_cache_dir() -> Result<PathBuf> {
    Environment::read().cache_dir()
}

/// Checks that `dir` can be a cache folder before anything is checked or written there: not
/// empty, no NUL byte, and, when it exists, a folder (a symbolic link to one is fine). A
/// missing folder is created when a cache file is written.
///
/// # Errors
///
/// [`Error::Cache`] ([`CacheErrorKind::BadPath`]) for a path refused as above.
pub fn check_cache_dir(dir: &std::path::Path) -> Result<()> {
    cache::check_dir(dir)
}

/// What the vLLM cache file at `path` holds for `n` devices ([`vllm_cache_path_in`] names
/// it): nothing, its verdicts (row-major, `n * n`), or why it cannot be used. Read as
/// [`gpu_p2p_access_check`] reads it: without following links, only when trusted.
///
/// # Errors
///
/// [`Error::Cache`] when the folder or the file cannot be read at all.
pub fn read_vllm_cache(path: &std::path::Path, n: usize) -> Result<CacheFile> {
    cache::read(path, n)
}

/// Writes `text` to `path` atomically, as the cache files are written: a new file in the same
/// folder, flushed, then renamed over `path` (a reader never sees half a file), without
/// following a link and never over another user's file. For outputs a collector reads
/// (`p2pcheck --output`).
///
/// # Errors
///
/// [`Error::Cache`] naming the file when its folder cannot be created or trusted, or a step of
/// the write fails.
pub fn write_file_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    cache::write_atomic(path, text)
}

/// The visible GPUs' UUIDs in CUDA's numbering (`CUDA_VISIBLE_DEVICES`, `CUDA_DEVICE_ORDER`),
/// read from `/proc` without CUDA (to label metrics); `None` where they cannot be named so,
/// for example GPUs of different models without `CUDA_DEVICE_ORDER=PCI_BUS_ID`, or no driver.
pub fn visible_gpu_uuids() -> Option<Vec<String>> {
    let env = Environment::read();
    let machine = fingerprint::read_machine().ok()?;
    let cvd = env.cvd_text().ok()?;
    let gpus = fingerprint::resolve_visible(cvd, env.device_order(), &machine).ok()?;
    Some(gpus.into_iter().map(|g| g.uuid).collect())
}

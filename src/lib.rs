//! # p2pcheck
//!
//! Proves, with real memory traffic across processes, whether each ordered pair of NVIDIA GPUs
//! can reach the other's memory — the way multi-GPU inference engines use it — and answers
//! vLLM's questions in vLLM's formats:
//!
//! * [`can_actually_p2p`]: vLLM's batched two-process CUDA-IPC test of a list of pairs;
//! * [`gpu_p2p_access_check`]: the cached answer for one pair, reading and writing the same
//!   cache file vLLM does (byte-identical), atomically and under a lock;
//! * [`policy::should_nccl_symm_mem_allreduce`] and the all-reduce size tables.
//!
//! The layers, bottom to top: [`sys`] (generated bindings), [`driver`] (dlopen, lazy symbols,
//! checked calls), [`protocol`] (frames over pipes), [`worker`] (the child processes),
//! [`check`] (the parent: spawn, relay, deadlines), [`cache`], [`policy`], and this API.
//!
//! ```no_run
//! // Which pairs of the visible GPUs really work? (Needs GPUs and the p2pcheck-worker binary.)
//! let ok = p2pcheck::can_actually_p2p(&[0, 1], &[1, 0])?;
//! println!("0->1: {}, 1->0: {}", ok[0], ok[1]);
//! // The cached answer, shared with vLLM through its cache file:
//! if p2pcheck::gpu_p2p_access_check(0, 1)? {
//!     println!("device 1 can use device 0's memory");
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```

// `unsafe` lives only at the FFI edges: `driver` (CUDA), `os` (libc) and `sys` (bindings).
#![deny(unsafe_code)]

pub mod cache;
pub mod check;
pub mod driver;
pub mod fingerprint;
pub mod json;
pub mod os;
pub mod policy;

pub mod protocol;
pub mod sim;
pub mod sys;
#[cfg(test)]
mod testutil;
pub mod visible;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use once_cell::sync::OnceCell;

pub use check::{Options, PairReport, Report, Verdict};
pub use protocol::Pair;

/// vLLM's `can_actually_p2p`: checks the pairs `(batch_src[i], batch_tgt[i])` in one batch of
/// two worker processes and returns one boolean per pair, in order.
///
/// "src->tgt" means: a process on `tgt` mapped memory owned by a process on `src` and both read
/// back what it wrote. Producer and consumer disagreeing counts as false, with a warning on
/// stderr as vLLM logs one. With the default [`Options`] the SM-kernel check also runs (see
/// [`Options::kernel_check`]); use [`can_actually_p2p_with`] for vLLM's exact test.
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
        bail!(
            "batch_src has {} devices but batch_tgt has {}: they must pair up",
            batch_src.len(),
            batch_tgt.len()
        );
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
            elapsed: Duration::ZERO,
            worker: PathBuf::new(),
            kernel_check: opts.kernel_check,
            restarts: 0,
        });
    }
    let report = check::run(Some(&pairs), opts)?;
    warn_disagreements(&report);
    Ok(report)
}

/// Prints vLLM's warning for pairs whose two sides disagree.
fn warn_disagreements(report: &Report) {
    for p in report.pairs.iter().filter(|p| p.disagree()) {
        eprintln!(
            "p2pcheck: warning: {}->{}: the two processes disagree ({}); counted as false",
            p.pair.src,
            p.pair.tgt,
            p.details().join("; ")
        );
    }
}

/// Devices visible to this process, from the driver (`cuInit` + `cuDeviceGetCount`), once.
///
/// Needed only to name the cache file when `CUDA_VISIBLE_DEVICES` is unset and to check ids.
pub fn visible_device_count() -> Result<u32> {
    static COUNT: OnceCell<u32> = OnceCell::new();
    COUNT
        .get_or_try_init(|| {
            driver::init()?;
            Ok::<u32, driver::Error>(driver::device_count()? as u32)
        })
        .copied()
        .context("cannot count the visible CUDA devices")
}

/// The vLLM cache file for `n` devices and this process's `CUDA_VISIBLE_DEVICES`.
pub fn vllm_cache_path(n: u32) -> Result<PathBuf> {
    Ok(vllm_cache_path_in(&cache::cache_dir()?, n))
}

/// The vLLM cache file for `n` devices and this process's `CUDA_VISIBLE_DEVICES`, in `dir`.
pub fn vllm_cache_path_in(dir: &std::path::Path, n: u32) -> PathBuf {
    let cvd = std::env::var(visible::VAR).ok();
    dir.join(cache::file_name(&visible::cache_key(
        cvd.as_deref(),
        n as usize,
    )))
}

/// vLLM's `gpu_p2p_access_check`: can a process on `tgt` use memory owned by a process on
/// `src`? Answers from the in-process memo, else from vLLM's cache file, else runs the check
/// for all pairs once (one process computes it while others wait on the lock) and writes the
/// file atomically. A corrupt cache file is reported on stderr and recomputed.
pub fn gpu_p2p_access_check(src: u32, tgt: u32) -> Result<bool> {
    let n = visible_device_count()?;
    if src >= n || tgt >= n {
        bail!("device {src}->{tgt} out of range: {n} devices are visible");
    }
    let path = vllm_cache_path(n)?;
    let loaded = cache::load_or_compute(&path, n as usize, cache::LOCK_TIMEOUT, || {
        let report = check::run(None, &Options::default())?;
        warn_disagreements(&report);
        if report.device_count != n {
            bail!(
                "the workers see {} devices, this process {n}",
                report.device_count
            );
        }
        Ok(report.pairs.iter().map(PairReport::ok).collect())
    })?;
    if let cache::Origin::Recomputed { reason } = &loaded.origin {
        eprintln!(
            "p2pcheck: warning: {} was unusable ({reason}); recomputed",
            path.display()
        );
    }
    Ok(loaded.verdicts[(src * n + tgt) as usize])
}

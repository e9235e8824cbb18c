//! The process environment a cached answer depends on, read once per call at the API's entry
//! and passed down, so that one call sees one environment however often a step consults it.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::cache;
use crate::error::{Error, Result};
use crate::visible;

/// The variables that change which GPUs are asked about, in which order, which driver
/// answers, and where vLLM keeps its cache, as they were when the call began.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Environment {
    /// `CUDA_VISIBLE_DEVICES`, raw (`None`: unset).
    pub cvd: Option<OsString>,
    /// `CUDA_DEVICE_ORDER`, raw.
    pub device_order: Option<OsString>,
    /// `P2PCHECK_LIBCUDA` and `P2PCHECK_LIBCUDART`: which CUDA libraries answer.
    pub libraries: [Option<OsString>; 2],
    /// `VLLM_CACHE_ROOT`, `XDG_CACHE_HOME` and `HOME` (as text where they are), which locate
    /// vLLM's cache folder.
    pub cache_vars: [Option<String>; 3],
}

/// The variables of [`Environment::cache_vars`], in its order.
const CACHE_VARS: [&str; 3] = ["VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "HOME"];

impl Environment {
    /// This process's environment, now.
    pub fn read() -> Environment {
        Environment {
            cvd: std::env::var_os(visible::VAR),
            device_order: std::env::var_os("CUDA_DEVICE_ORDER"),
            libraries: ["P2PCHECK_LIBCUDA", "P2PCHECK_LIBCUDART"].map(std::env::var_os),
            cache_vars: CACHE_VARS.map(|name| std::env::var(name).ok()),
        }
    }

    /// `CUDA_VISIBLE_DEVICES` as text (`None`: unset). A value that is not UTF-8 cannot name
    /// vLLM's cache file: that is an error.
    pub fn cvd_text(&self) -> Result<Option<&str>> {
        self.cvd
            .as_deref()
            .map(|v| {
                v.to_str().ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "CUDA_VISIBLE_DEVICES={v:?} is not UTF-8 text, so it cannot name vLLM's \
                         cache file"
                    ))
                })
            })
            .transpose()
    }

    /// `CUDA_VISIBLE_DEVICES` as text where it is set and UTF-8 (`None` otherwise), for
    /// messages.
    pub fn cvd_utf8(&self) -> Option<&str> {
        self.cvd.as_deref().and_then(|v| v.to_str())
    }

    /// `CUDA_DEVICE_ORDER` as text, where it is.
    pub fn device_order(&self) -> Option<&str> {
        self.device_order.as_deref().and_then(|v| v.to_str())
    }

    /// vLLM's cache folder, as these variables place it ([`cache::cache_dir_from`]).
    pub fn cache_dir(&self) -> Result<PathBuf> {
        cache::cache_dir_from(|name| {
            CACHE_VARS
                .iter()
                .position(|v| *v == name)
                .and_then(|i| self.cache_vars[i].clone())
        })
    }

    /// The vLLM cache file for `n` devices under this `CUDA_VISIBLE_DEVICES`, in `dir`.
    pub fn cache_path_in(&self, dir: &std::path::Path, n: u32) -> Result<PathBuf> {
        let cvd = self.cvd_text()?;
        Ok(dir.join(cache::file_name(&visible::cache_key(cvd, n as usize))))
    }
}

//! The one error type of p2pcheck's API: why a check could not be carried out at all.
//!
//! A pair that fails, hangs or errors is not an `Error`: it is an outcome in the
//! [`Report`](crate::Report). An `Error` means there is no answer: no worker, no CUDA, bad
//! input, a cache that cannot be used. Each variant names what failed, with the CUDA call, device
//! and code where there is one, so that the C ABI can map it to a status code and a person can
//! act on the text.

use std::fmt;
use std::path::PathBuf;

use crate::cuda;
use crate::model::Problem;

/// Why a check could not be carried out.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub enum Error {
    /// CUDA in this process: the library could not be loaded, lacks a symbol, or a call failed.
    Cuda(cuda::Error),
    /// A worker could not start CUDA (`cuInit`, device count): what it said.
    WorkerCuda {
        /// Which worker.
        worker: String,
        /// The failing call, with its code.
        problem: Problem,
    },
    /// The worker executable could not be found or started, or misbehaved before any pair
    /// (silent at start-up, wrong first message).
    Worker(String),
    /// The worker speaks another protocol version.
    Version {
        /// The worker executable.
        worker: PathBuf,
        /// Its version.
        theirs: u16,
    },
    /// No GPU is visible (no device, or `CUDA_VISIBLE_DEVICES` selects none).
    NoDevice(String),
    /// Bad input: device ids out of range, an unpaired batch, an option out of range.
    InvalidInput(String),
    /// vLLM's cache file or its lock could not be used.
    Cache {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The check was cancelled before it finished.
    Cancelled,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Cuda(e) => write!(f, "{e}"),
            Error::WorkerCuda { worker, problem } => {
                write!(f, "the {worker} could not start CUDA: {problem}")
            }
            Error::Worker(why) | Error::NoDevice(why) | Error::InvalidInput(why) => {
                f.write_str(why)
            }
            Error::Version { worker, theirs } => write!(
                f,
                "the worker {} speaks protocol version {theirs}, this library {}: install the \
                 matching p2pcheck-worker",
                worker.display(),
                crate::protocol::VERSION
            ),
            Error::Cache { path, message } => write!(f, "{}: {message}", path.display()),
            Error::Cancelled => write!(f, "the check was cancelled"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Cuda(e) => Some(e),
            _ => None,
        }
    }
}

impl From<cuda::Error> for Error {
    fn from(e: cuda::Error) -> Error {
        Error::Cuda(e)
    }
}

impl Error {
    /// A cache error for `path` from the cache module's context chain.
    pub(crate) fn cache(path: &std::path::Path, e: anyhow::Error) -> Error {
        Error::Cache {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        }
    }
}

/// Result of p2pcheck's API.
pub type Result<T> = std::result::Result<T, Error>;

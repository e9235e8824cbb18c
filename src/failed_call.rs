//! A failed CUDA call in words, shared by the driver layer's own error (`cuda::Error`) and the
//! model's `Problem::Cuda`, which carries the same parts across the pipe: one sentence, whichever
//! side of the pipe failed. It imports nothing, so both layers may use it.

use std::fmt;

/// CUDA's `CUDA_ERROR_STUB_LIBRARY`: the code of CUDA's stub library, which stands in for a
/// missing driver (the bindings' constant; the drift test keeps the bindings true).
pub(crate) const CUDA_ERROR_STUB_LIBRARY: i32 = 34;

/// `call[ on device d] failed: name (text, code c)`, with what it usually means for the codes and
/// calls that have a known cause.
pub(crate) fn describe(
    f: &mut fmt::Formatter<'_>,
    call: &str,
    device: Option<i32>,
    code: i32,
    name: &str,
    text: &str,
) -> fmt::Result {
    write!(f, "{call}")?;
    if let Some(d) = device {
        write!(f, " on device {d}")?;
    }
    write!(f, " failed: {name} ({text}, code {code})")?;
    if code == CUDA_ERROR_STUB_LIBRARY {
        write!(
            f,
            "; this is CUDA's stub library, not a driver: no NVIDIA driver is installed or the \
             stub shadows it on the library path"
        )?;
    }
    if call == "cudaIpcOpenMemHandle" {
        write!(
            f,
            "; inside a container this usually means the processes do not share an IPC/PID \
             namespace (docker: --ipc=host --pid=host)"
        )?;
    }
    Ok(())
}

//! The kernels of the kernel and handshake tiers (`csrc/kernels.cu`): the module that holds
//! them, loaded once per worker and unloaded by `Drop`, and their launches through the C shim,
//! every driver call the shim makes checked, named in errors and traced.

use std::ffi::CStr;

use once_cell::sync::OnceCell;

use super::fatbin;
use super::memory::DeviceView;
use super::trace::{self, Api, Record};
use super::{c_text, check, describe, resolve, Error, Library, Result};
use crate::sys;

/// Bytes of the handshake kernel's area: its flags and two payloads (csrc/kernels.cu).
pub(crate) const HANDSHAKE_AREA_BYTES: u64 = 2048;

/// What `p2pc_pattern_check` counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PatternCount {
    /// Bytes that differed from the pattern.
    pub wrong: u64,
    /// Offset of the first such byte.
    pub first_bad: Option<u64>,
    /// Of the wrong bytes, those still holding the old pattern (writes that never arrived).
    pub stale: u64,
}

/// What one side of `p2pc_handshake` saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HandshakeResult {
    /// Rounds completed.
    pub rounds_done: u64,
    /// Payload bytes that were wrong when the flag said they were ready.
    pub payload_errors: u64,
    /// A wait reached its deadline on the GPU clock.
    pub timed_out: bool,
    /// GPU time from the kernel's start to its end.
    pub elapsed_ns: u64,
}

/// The loaded module and its three kernels, in the current context.
pub(crate) struct Kernels {
    device: i32,
    module: sys::CUmodule,
    store: sys::CUfunction,
    check: sys::CUfunction,
    handshake: sys::CUfunction,
}

impl Kernels {
    /// Loads the module into the current context of `device` (the driver takes the SASS for
    /// this GPU, or JIT-compiles the PTX where the image has none) and finds its kernels; the
    /// trace says which image it took.
    pub(crate) fn load(device: i32) -> Result<Kernels> {
        let mut module: sys::CUmodule = std::ptr::null_mut();
        let image = fatbin::image();
        cu!(
            c"cuModuleLoadData" as sys::PFN_cuModuleLoadData_v2000,
            Some(device),
            |f| f(&mut module, image.as_ptr().cast()),
            |t| {
                t.args
                    .text("image", &fatbin::describe())
                    .uint("bytes", image.len() as u64);
                t.out.ptr("module", module as usize as u64);
            }
        )?;
        let mut kernels = Kernels {
            device,
            module,
            store: std::ptr::null_mut(),
            check: std::ptr::null_mut(),
            handshake: std::ptr::null_mut(),
        };
        kernels.store = kernels.function(c"p2pc_pattern_store")?;
        kernels.check = kernels.function(c"p2pc_pattern_check")?;
        kernels.handshake = kernels.function(c"p2pc_handshake")?;
        let ptx = kernels.attribute(sys::CU_FUNC_ATTRIBUTE_PTX_VERSION, "ptx_version", None)?;
        kernels.attribute(
            sys::CU_FUNC_ATTRIBUTE_BINARY_VERSION,
            "binary_version",
            Some(ptx),
        )?;
        Ok(kernels)
    }

    /// `cuFuncGetAttribute` of the handshake kernel (all three are built alike); with
    /// `ptx_version` given, the binary version's trace line names the image the driver took.
    fn attribute(
        &self,
        attribute: sys::CUfunction_attribute,
        name: &str,
        ptx_version: Option<i32>,
    ) -> Result<i32> {
        let mut value = 0;
        cu!(
            c"cuFuncGetAttribute" as sys::PFN_cuFuncGetAttribute_v2020,
            Some(self.device),
            |f| f(&mut value, attribute, self.handshake),
            |t| {
                t.args
                    .text("attribute", name)
                    .ptr("function", self.handshake as usize as u64);
                t.out.int("value", i64::from(value));
                if let Some(ptx) = ptx_version {
                    t.out.text("image_taken", &fatbin::taken(ptx, value));
                }
            }
        )?;
        Ok(value)
    }

    fn function(&self, name: &CStr) -> Result<sys::CUfunction> {
        let mut f: sys::CUfunction = std::ptr::null_mut();
        cu!(
            c"cuModuleGetFunction" as sys::PFN_cuModuleGetFunction_v2000,
            Some(self.device),
            |g| g(&mut f, self.module, name.as_ptr()),
            |t| {
                t.args
                    .ptr("module", self.module as usize as u64)
                    .text("name", name.to_str().unwrap_or("?"));
                t.out.ptr("function", f as usize as u64);
            }
        )?;
        Ok(f)
    }

    /// `p2pc_pattern_store`: the pattern for `seed` into all `n` bytes of `view` with SM stores
    /// of `width` bytes, word i at offset (i*width + shift) % n; then a synchronise.
    pub(crate) fn pattern_store(
        &self,
        view: DeviceView<'_>,
        seed: u64,
        width: u32,
        shift: u64,
    ) -> Result<()> {
        let table = shim_table()?;
        let (p, n) = (view.ptr(), view.len());
        let describe = |t: &mut Record, _: &[u64; 4]| {
            t.args
                .ptr("ptr", p.0)
                .uint("bytes", n)
                .uint("seed", seed)
                .uint("width", u64::from(width))
                .uint("shift", shift);
        };
        self.run(c"p2pc_pattern_store", describe, |out| {
            // SAFETY: table holds resolved driver functions, store is a kernel of the loaded
            // module, p addresses the n bytes of device memory that the view's borrowed owner
            // (an allocation or a mapping) keeps live, out is a live report.
            unsafe {
                sys::shim::p2pcheck_shim_pattern_store(
                    &table,
                    self.store.cast(),
                    p.0,
                    n,
                    seed,
                    width,
                    shift,
                    out,
                )
            }
        })
        .map(|_| ())
    }

    /// `p2pc_pattern_check`: SM loads of all of `view` with loads of `width` bytes, counting
    /// bytes that differ from the pattern for `seed` (and, of those, the ones that still hold
    /// the pattern for `old_seed`).
    pub(crate) fn pattern_check(
        &self,
        view: DeviceView<'_>,
        seed: u64,
        old_seed: u64,
        width: u32,
    ) -> Result<PatternCount> {
        let table = shim_table()?;
        let (p, n) = (view.ptr(), view.len());
        let describe = |t: &mut Record, r: &[u64; 4]| {
            t.args
                .ptr("ptr", p.0)
                .uint("bytes", n)
                .uint("seed", seed)
                .uint("old_seed", old_seed)
                .uint("width", u64::from(width));
            t.out.uint("wrong", r[0]).uint("stale", r[2]);
            match r[1] {
                u64::MAX => t.out.text("first_bad", "none"),
                at => t.out.uint("first_bad", at),
            };
        };
        let r = self.run(c"p2pc_pattern_check", describe, |out| {
            // SAFETY: as in pattern_store; the shim allocates and frees its own counters.
            unsafe {
                sys::shim::p2pcheck_shim_pattern_check(
                    &table,
                    self.check.cast(),
                    p.0,
                    n,
                    seed,
                    old_seed,
                    width,
                    out,
                )
            }
        })?;
        Ok(PatternCount {
            wrong: r[0],
            first_bad: (r[1] != u64::MAX).then_some(r[1]),
            stale: r[2],
        })
    }

    /// `p2pc_handshake`: one side (`role` 0 owner, 1 through the mapping) of `rounds` rounds of
    /// ping-pong on the first [`HANDSHAKE_AREA_BYTES`] of `area` (an error, and no launch, when
    /// it is shorter), every wait ending at `budget_ns` on the GPU clock.
    pub(crate) fn handshake(
        &self,
        area: DeviceView<'_>,
        rounds: u32,
        role: u32,
        seed: u64,
        budget_ns: u64,
    ) -> Result<HandshakeResult> {
        let table = shim_table()?;
        let area = area.slice(0..HANDSHAKE_AREA_BYTES)?.ptr();
        let describe = |t: &mut Record, r: &[u64; 4]| {
            t.args
                .ptr("area", area.0)
                .uint("rounds", u64::from(rounds))
                .text(
                    "role",
                    match role {
                        0 => "owner",
                        1 => "peer (through the mapping)",
                        _ => "unknown",
                    },
                )
                .uint("seed", seed)
                .uint("budget_ns", budget_ns);
            t.out
                .uint("rounds_done", r[0])
                .uint("payload_errors", r[1])
                .flag("timed_out", r[2] != 0)
                .uint("elapsed_ns", r[3]);
        };
        let r = self.run(c"p2pc_handshake", describe, |out| {
            // SAFETY: as in pattern_store; area addresses the HANDSHAKE_AREA_BYTES (2048) the
            // kernel uses, checked by the slice above.
            unsafe {
                sys::shim::p2pcheck_shim_handshake(
                    &table,
                    self.handshake.cast(),
                    area.0,
                    rounds,
                    role,
                    seed,
                    budget_ns,
                    out,
                )
            }
        })?;
        Ok(HandshakeResult {
            rounds_done: r[0],
            payload_errors: r[1],
            timed_out: r[2] != 0,
            elapsed_ns: r[3],
        })
    }

    /// Runs one shim function, traces it (`describe_call` gives its arguments and results) and then
    /// each driver call it made, in order, as a line of its own, and turns its report into the
    /// kernel's results or the first failing call.
    fn run(
        &self,
        what: &'static CStr,
        describe_call: impl FnOnce(&mut Record, &[u64; 4]),
        call: impl FnOnce(*mut sys::shim::p2pc_report),
    ) -> Result<[u64; 4]> {
        let mut report = sys::shim::p2pc_report {
            failed_call: std::ptr::null(),
            code: 0,
            n_calls: 0,
            calls: [std::ptr::null(); sys::shim::P2PC_MAX_CALLS],
            codes: [0; sys::shim::P2PC_MAX_CALLS],
            results: [0; 4],
        };
        let started = trace::start();
        call(&mut report);
        let n = report.n_calls.max(0) as usize;
        let logged = n.min(sys::shim::P2PC_MAX_CALLS);
        let what = what.to_str().unwrap_or("?");
        if let Some(started) = started {
            let results = report.results;
            let device = Some(self.device);
            trace::record(&started, Api::Shim, what, device, report.code, |t| {
                describe_call(t, &results)
            });
            // The driver calls the shim made, in order, each with its return code.
            for i in 0..logged {
                let call = c_text(report.calls[i]).unwrap_or_else(|| "?".into());
                trace::record_inner(&started, what, i + 1, &call, device, report.codes[i]);
            }
        }
        if n > logged {
            // Never lose calls silently: a log too small is a bug to fix, reported as such.
            return Err(Error::Symbol {
                library: Library::Driver,
                symbol: "p2pc shim call log",
                path: String::new(),
                reason: format!("{what} made {n} driver calls, more than the {logged} it can log"),
            });
        }
        if let Some(call) = c_text(report.failed_call) {
            let call = SHIM_CALLS
                .iter()
                .find(|c| **c == call)
                .copied()
                .unwrap_or("p2pc shim call");
            let (name, text) = describe(Library::Driver, report.code);
            return Err(Error::Cuda {
                call,
                device: Some(self.device),
                code: report.code,
                name,
                text,
            });
        }
        Ok(report.results)
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        // Checked and traced like any call; there is no caller left to tell.
        let _ = (|| {
            cu!(
                c"cuModuleUnload" as sys::PFN_cuModuleUnload_v2000,
                Some(self.device),
                |f| f(self.module),
                |t| t.args.ptr("module", self.module as usize as u64)
            )
        })();
    }
}

fn shim_table() -> Result<sys::shim::p2pc_driver> {
    macro_rules! pfn {
        ($sym:literal) => {{
            static CELL: OnceCell<Result<usize>> = OnceCell::new();
            resolve(Library::Driver, &CELL, $sym)?
        }};
    }
    Ok(sys::shim::p2pc_driver {
        launch_kernel: pfn!(c"cuLaunchKernel"),
        ctx_synchronize: pfn!(c"cuCtxSynchronize"),
        mem_alloc: pfn!(c"cuMemAlloc_v2"),
        mem_free: pfn!(c"cuMemFree_v2"),
        memset_d8: pfn!(c"cuMemsetD8_v2"),
        memcpy_dtoh: pfn!(c"cuMemcpyDtoH_v2"),
    })
}

/// The driver calls the shim can name as failed (csrc/shim.c).
const SHIM_CALLS: [&str; 6] = [
    "cuLaunchKernel",
    "cuCtxSynchronize",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemsetD8_v2",
    "cuMemcpyDtoH_v2",
];

//! The CUDA driver (libcuda) and runtime (libcudart), loaded with `dlopen` at first use.
//!
//! Nothing links against CUDA: a machine without a GPU, or with an older driver, loads and runs
//! p2pcheck and gets an [`Error`] naming what is missing. Libraries load on first need (a
//! failed load is tried again, with the environment read again, at the next need), each
//! symbol resolves on first call (a symbol an old driver lacks fails only the call that needs
//! it), and every return code is checked: errors name the call, the device, and CUDA's own error
//! name and text. `P2PCHECK_TRACE` writes every call (arguments, result, duration, the process's
//! role and job) as one JSON line: the audit trail of exactly which calls were made ([`trace`]).
//!
//! This is the only module that touches raw pointers; everything above it is safe. Device
//! memory leaves it only as [`memory`]'s owners (which know their length and free by `Drop`)
//! and bounds-checked views of them; the calls that take a bare address are private `unsafe
//! fn`s, each stating what its caller must guarantee.

#![allow(unsafe_code)]

pub(crate) mod memory;
pub(crate) mod trace;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::path::PathBuf;

use once_cell::sync::OnceCell;

use crate::sys;

/// Bytes in a CUDA IPC memory handle (`cudaIpcMemHandle_t`).
pub const IPC_HANDLE_BYTES: usize = 64;

/// Which of the two libraries an error or symbol belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// libcuda, the driver API.
    Driver,
    /// libcudart, the runtime API.
    Runtime,
}

impl Library {
    fn name(self) -> &'static str {
        match self {
            Library::Driver => "libcuda",
            Library::Runtime => "libcudart",
        }
    }
    fn override_var(self) -> &'static str {
        match self {
            Library::Driver => "P2PCHECK_LIBCUDA",
            Library::Runtime => "P2PCHECK_LIBCUDART",
        }
    }
}

/// Everything that can go wrong below the check: loading, resolving, or a failed call.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The library could not be loaded; one line per path tried, each with `dlerror()`'s text.
    Load {
        /// Which library.
        library: Library,
        /// `path: reason` for every attempt, in order.
        attempts: Vec<String>,
    },
    /// The library was loaded but lacks a symbol (an older driver, say).
    Symbol {
        /// Which library.
        library: Library,
        /// The symbol name.
        symbol: &'static str,
        /// Where the library was loaded from.
        path: String,
        /// `dlerror()`'s text.
        reason: String,
    },
    /// A range of device memory asked for lies outside the memory or view it was asked of
    /// (an offset derived from a message, say); no call was made.
    OutOfBounds {
        /// The memory: whose buffer or mapping, and its length.
        memory: String,
        /// The first byte asked for, from the start of that memory.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The bytes of that memory the view it was asked of covers.
        bounds: std::ops::Range<u64>,
    },
    /// A call returned an error code.
    Cuda {
        /// The function called, e.g. `cudaIpcOpenMemHandle`.
        call: &'static str,
        /// The device the call concerned, where there is one.
        device: Option<i32>,
        /// The raw return code (`CUresult` or `cudaError_t`).
        code: i32,
        /// CUDA's name for it, e.g. `cudaErrorInvalidDevice`.
        name: String,
        /// CUDA's description, e.g. `invalid device ordinal`.
        text: String,
    },
}

impl Error {
    /// The CUDA error name of a failed call (`None` for load and symbol errors).
    pub fn cuda_name(&self) -> Option<&str> {
        match self {
            Error::Cuda { name, .. } => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Load { library, attempts } => {
                write!(
                    f,
                    "could not load {} (set {} to its path): ",
                    library.name(),
                    library.override_var()
                )?;
                if attempts.is_empty() {
                    write!(f, "nothing to try")
                } else {
                    write!(f, "{}", attempts.join("; "))
                }
            }
            Error::Symbol {
                library,
                symbol,
                path,
                reason,
            } => write!(
                f,
                "{} at {path} has no symbol {symbol} (driver too old?): {reason}",
                library.name()
            ),
            Error::OutOfBounds {
                memory,
                offset,
                len,
                bounds,
            } => write!(
                f,
                "bytes {offset}..{} of {memory} lie outside the view's {}..{}",
                offset.saturating_add(*len),
                bounds.start,
                bounds.end
            ),
            Error::Cuda {
                call,
                device,
                code,
                name,
                text,
            } => crate::failed_call::describe(f, call, *device, *code, name, text),
        }
    }
}

impl std::error::Error for Error {}

/// Result of a driver-layer operation.
pub type Result<T> = std::result::Result<T, Error>;

/// A `dlopen`ed library, kept for the life of the process.
struct Lib {
    handle: usize,
    path: String,
}

pub(crate) fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl* call on
    // this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dlerror".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

pub(crate) fn dlopen(path: &str, flags: c_int) -> std::result::Result<usize, String> {
    let c = CString::new(path).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: c is a valid C string; dlopen has no other preconditions.
    let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
    if h.is_null() {
        Err(dlerror_text())
    } else {
        Ok(h as usize)
    }
}

/// The file a loaded handle came from (the soname resolves to a real path).
fn loaded_path(handle: usize, symbol: &CStr) -> Option<String> {
    // SAFETY: handle came from dlopen and symbol is NUL-terminated.
    let addr = unsafe { libc::dlsym(handle as *mut c_void, symbol.as_ptr()) };
    if addr.is_null() {
        return None;
    }
    crate::os::object_containing(addr as usize).map(|p| p.display().to_string())
}

impl Lib {
    /// Tries `candidates` in order; a CUDA `stubs/` library is never accepted.
    fn open(library: Library, candidates: Vec<String>, probe: &CStr) -> Result<Lib> {
        let mut attempts = Vec::new();
        for path in candidates {
            if path.contains("/stubs/") {
                attempts.push(format!("{path}: refused, a CUDA stub library"));
                continue;
            }
            match dlopen(&path, libc::RTLD_NOW | libc::RTLD_LOCAL) {
                Ok(handle) => {
                    let real = loaded_path(handle, probe).unwrap_or_else(|| path.clone());
                    if real.contains("/stubs/") {
                        attempts.push(format!("{path}: resolved to the stub library {real}"));
                        continue;
                    }
                    return Ok(Lib { handle, path: real });
                }
                // dlerror's text usually starts with the path already.
                Err(e) if e.starts_with(&path) => attempts.push(e),
                Err(e) => attempts.push(format!("{path}: {e}")),
            }
        }
        Err(Error::Load { library, attempts })
    }

    fn symbol(&self, library: Library, name: &'static CStr) -> Result<usize> {
        // SAFETY: handle is a live dlopen handle; name is NUL-terminated.
        let addr = unsafe { libc::dlsym(self.handle as *mut c_void, name.as_ptr()) };
        if addr.is_null() {
            Err(Error::Symbol {
                library,
                symbol: name.to_str().unwrap_or("?"),
                path: self.path.clone(),
                reason: dlerror_text(),
            })
        } else {
            Ok(addr as usize)
        }
    }
}

// Only a loaded library is kept: a failure is tried again at the next need, reading
// `P2PCHECK_LIBCUDA`/`P2PCHECK_LIBCUDART` again, so a host that fixes its environment after a
// failure is not stuck with it. A loaded library stays for the life of the process.
static LIBCUDA: OnceCell<Lib> = OnceCell::new();
static LIBCUDART: OnceCell<Lib> = OnceCell::new();

fn env_path(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// The driver: `P2PCHECK_LIBCUDA` alone when set, else the soname `libcuda.so.1` (never the
/// unversioned `libcuda.so`, which in a toolkit is often the stub).
fn driver_candidates() -> Vec<String> {
    match env_path("P2PCHECK_LIBCUDA") {
        Some(p) => vec![p],
        None => vec!["libcuda.so.1".into()],
    }
}

/// The runtime: `P2PCHECK_LIBCUDART` alone when set; else a copy already loaded into this
/// process (a host that uses torch has one: two runtimes in one process is asking for trouble),
/// the sonames, `$CUDA_HOME`/`$CUDA_PATH`/`/usr/local/cuda`, and the pip wheels.
fn runtime_candidates() -> Vec<String> {
    if let Some(p) = env_path("P2PCHECK_LIBCUDART") {
        return vec![p];
    }
    let mut out = Vec::new();
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        if let Some(path) = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("/libcudart.so"))
        {
            out.push(path.to_string());
        }
    }
    for soname in ["libcudart.so", "libcudart.so.13", "libcudart.so.12"] {
        out.push(soname.into());
    }
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env_path(v).map(PathBuf::from))
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    for root in roots {
        for lib in ["lib64", "lib"] {
            out.push(root.join(lib).join("libcudart.so").display().to_string());
        }
    }
    for site in python_site_dirs() {
        out.push(
            site.join("nvidia/cu13/lib/libcudart.so.13")
                .display()
                .to_string(),
        );
        out.push(
            site.join("nvidia/cuda_runtime/lib/libcudart.so.12")
                .display()
                .to_string(),
        );
    }
    out
}

/// site-packages folders where a pip-installed CUDA runtime wheel may live.
fn python_site_dirs() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    if let Some(v) = env_path("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(v).join("lib"));
    }
    if let Some(h) = env_path("HOME") {
        prefixes.push(PathBuf::from(h).join(".local/lib"));
    }
    prefixes.push("/usr/local/lib".into());
    prefixes.push("/usr/lib".into());
    let mut out = Vec::new();
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(&prefix) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("python3") {
                out.push(e.path().join("site-packages"));
                out.push(e.path().join("dist-packages"));
            }
        }
    }
    out
}

fn lib(library: Library) -> Result<&'static Lib> {
    let (cell, candidates, probe): (_, fn() -> Vec<String>, &CStr) = match library {
        Library::Driver => (&LIBCUDA, driver_candidates, c"cuInit"),
        Library::Runtime => (&LIBCUDART, runtime_candidates, c"cudaGetErrorName"),
    };
    cell.get_or_try_init(|| Lib::open(library, candidates(), probe))
}

/// Resolves `name` once per call site and returns it as the bindgen function-pointer type `F`.
/// A library that could not be loaded is not remembered here (see [`lib`]); a symbol the
/// loaded library lacks is.
fn resolve<F: Copy>(
    library: Library,
    cell: &'static OnceCell<Result<usize>>,
    name: &'static CStr,
) -> Result<F> {
    // Only pointer-sized function-pointer types are ever requested (bindgen's PFN types).
    const { assert!(std::mem::size_of::<usize>() == std::mem::size_of::<Option<fn()>>()) };
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<usize>());
    let addr = match cell.get() {
        Some(known) => known.clone()?,
        None => {
            let loaded = lib(library)?;
            cell.get_or_init(|| loaded.symbol(library, name)).clone()?
        }
    };
    // SAFETY: addr is a non-null symbol address and F is the bindgen-generated
    // `Option<unsafe extern "C" fn(..)>` type that the CUDA headers declare for this symbol.
    Ok(unsafe { std::mem::transmute_copy::<usize, F>(&addr) })
}

/// Resolves a symbol (once per call site), makes the call, traces it, and returns its raw code.
///
/// The optional last part, `|t| fill`, describes the call for the trace: `t` is a
/// [`trace::Record`] whose `args` and `out` it fills (after the call, so out-parameters hold
/// their values). It is only built and called when the trace is on.
macro_rules! raw_call {
    ($library:expr, $sym:literal as $pfn:ty, $device:expr, |$f:ident| $call:expr) => {
        raw_call!($library, $sym as $pfn, $device, |$f| $call, |_t| {})
    };
    ($library:expr, $sym:literal as $pfn:ty, $device:expr, |$f:ident| $call:expr,
     |$t:ident| $fill:expr) => {{
        static CELL: OnceCell<Result<usize>> = OnceCell::new();
        let pfn: $pfn = resolve($library, &CELL, $sym)?;
        let $f = pfn.ok_or_else(|| Error::Symbol {
            library: $library,
            symbol: $sym.to_str().unwrap_or("?"),
            path: String::new(),
            reason: "null address".into(),
        })?;
        // Off: one atomic load; no clock read, nothing formatted, `fill` never built.
        let started = trace::start();
        // SAFETY: the symbol has the C type `$pfn` (bindgen, from the CUDA headers); every
        // pointer argument points to live memory of the declared type for the call's duration.
        let code = unsafe { $call } as i32;
        if let Some(started) = started {
            trace::record(
                &started,
                $library.into(),
                $sym.to_str().unwrap_or("?"),
                $device,
                code,
                |$t: &mut trace::Record| {
                    $fill;
                },
            );
        }
        code
    }};
}

/// A driver-API call: returns `Err` naming the call unless it returned `CUDA_SUCCESS`.
macro_rules! cu {
    ($sym:literal as $pfn:ty, $device:expr, |$f:ident| $call:expr $(, |$t:ident| $fill:expr)?) => {{
        let code = raw_call!(Library::Driver, $sym as $pfn, $device, |$f| $call $(, |$t| $fill)?);
        check(Library::Driver, $sym, $device, code)
    }};
}

/// A runtime-API call: returns `Err` naming the call unless it returned `cudaSuccess`.
macro_rules! cuda {
    ($sym:literal as $pfn:ty, $device:expr, |$f:ident| $call:expr $(, |$t:ident| $fill:expr)?) => {{
        let code = raw_call!(Library::Runtime, $sym as $pfn, $device, |$f| $call $(, |$t| $fill)?);
        check(Library::Runtime, $sym, $device, code)
    }};
}

fn c_text(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: CUDA's error-name functions return static NUL-terminated strings.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// CUDA's (name, text) for a code; falls back to the number when CUDA cannot say.
fn describe(library: Library, code: i32) -> (String, String) {
    let described = match library {
        Library::Driver => driver_describe(code),
        Library::Runtime => runtime_describe(code),
    };
    described.unwrap_or_else(|_| (format!("error {code}"), "no description available".into()))
}

fn driver_describe(code: i32) -> Result<(String, String)> {
    let mut name: *const c_char = std::ptr::null();
    let mut text: *const c_char = std::ptr::null();
    raw_call!(
        Library::Driver,
        c"cuGetErrorName" as sys::PFN_cuGetErrorName_v6000,
        None,
        |f| f(code as sys::CUresult, &mut name),
        |t| t.args.int("error", i64::from(code))
    );
    raw_call!(
        Library::Driver,
        c"cuGetErrorString" as sys::PFN_cuGetErrorString_v6000,
        None,
        |f| f(code as sys::CUresult, &mut text),
        |t| t.args.int("error", i64::from(code))
    );
    Ok((
        c_text(name).unwrap_or_else(|| format!("CUresult {code}")),
        c_text(text).unwrap_or_else(|| "unknown error".into()),
    ))
}

fn runtime_describe(code: i32) -> Result<(String, String)> {
    let name = resolve::<sys::p2pc_PFN_cudaGetErrorName>(
        Library::Runtime,
        {
            static C: OnceCell<Result<usize>> = OnceCell::new();
            &C
        },
        c"cudaGetErrorName",
    )?;
    let text = resolve::<sys::p2pc_PFN_cudaGetErrorString>(
        Library::Runtime,
        {
            static C: OnceCell<Result<usize>> = OnceCell::new();
            &C
        },
        c"cudaGetErrorString",
    )?;
    let (Some(name), Some(text)) = (name, text) else {
        return Err(Error::Load {
            library: Library::Runtime,
            attempts: vec!["cudaGetErrorName/String resolved to null".into()],
        });
    };
    // SAFETY: both take an error code and return a static string; any code is accepted.
    let (n, t) = unsafe {
        (
            name(code as sys::cudaError_t),
            text(code as sys::cudaError_t),
        )
    };
    Ok((
        c_text(n).unwrap_or_else(|| format!("cudaError {code}")),
        c_text(t).unwrap_or_else(|| "unknown error".into()),
    ))
}

/// CUDA's name for `code` (`cuGetErrorName` or `cudaGetErrorName`), asked without tracing: the
/// trace's own look-up for its `name` field, not a call of the check. Falls back to the number.
fn error_name_untraced(library: Library, code: i32) -> String {
    let name = match library {
        Library::Driver => resolve::<sys::PFN_cuGetErrorName_v6000>(
            Library::Driver,
            {
                static C: OnceCell<Result<usize>> = OnceCell::new();
                &C
            },
            c"cuGetErrorName",
        )
        .ok()
        .flatten()
        .and_then(|f| {
            let mut name: *const c_char = std::ptr::null();
            // SAFETY: cuGetErrorName takes any code and a pointer to a `const char *`, which it
            // sets to a static string (or leaves alone and fails for an unknown code).
            let rc = unsafe { f(code as sys::CUresult, &mut name) };
            if rc == 0 {
                c_text(name)
            } else {
                None
            }
        }),
        Library::Runtime => resolve::<sys::p2pc_PFN_cudaGetErrorName>(
            Library::Runtime,
            {
                static C: OnceCell<Result<usize>> = OnceCell::new();
                &C
            },
            c"cudaGetErrorName",
        )
        .ok()
        .flatten()
        // SAFETY: cudaGetErrorName takes any code and returns a static string.
        .and_then(|f| c_text(unsafe { f(code as sys::cudaError_t) })),
    };
    name.unwrap_or_else(|| format!("error {code}"))
}

fn check(library: Library, call: &'static CStr, device: Option<i32>, code: i32) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let (name, text) = describe(library, code);
    Err(Error::Cuda {
        call: call.to_str().unwrap_or("?"),
        device,
        code,
        name,
        text,
    })
}

// ---------------------------------------------------------------------------------------------
// Driver API

/// `cuInit(0)`. A stub library answers `CUDA_ERROR_STUB_LIBRARY`, reported as such.
pub(crate) fn init() -> Result<()> {
    cu!(c"cuInit" as sys::PFN_cuInit_v2000, None, |f| f(0), |t| t
        .args
        .uint("flags", 0))
}

/// `cuDeviceGetCount` (after [`init`]): the devices this process sees.
pub(crate) fn device_count() -> Result<i32> {
    let mut n: c_int = 0;
    cu!(
        c"cuDeviceGetCount" as sys::PFN_cuDeviceGetCount_v2000,
        None,
        |f| f(&mut n),
        |t| t.out.int("device_count", i64::from(n))
    )?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Driver API: the cuMem transport (virtual memory, POSIX descriptor handles). The multicast
// calls (cuMulticast*) are never resolved: p2pcheck does not use them (see docs/nvls.md).

/// `cuDriverGetVersion`: the CUDA version the driver supports (13000 for 13.0).
pub(crate) fn driver_version() -> Result<i32> {
    let mut v: c_int = 0;
    cu!(
        c"cuDriverGetVersion" as sys::PFN_cuDriverGetVersion_v2020,
        None,
        |f| f(&mut v),
        |t| t.out.int("driver_version", i64::from(v))
    )?;
    Ok(v)
}

/// `cuDeviceGet`: the driver's handle of local ordinal `device`.
fn device_handle(device: i32) -> Result<sys::CUdevice_v1> {
    let mut d: sys::CUdevice_v1 = 0;
    cu!(
        c"cuDeviceGet" as sys::PFN_cuDeviceGet_v2000,
        Some(device),
        |f| f(&mut d, device),
        |t| {
            t.args.int("ordinal", i64::from(device));
            t.out.int("device", i64::from(d));
        }
    )?;
    Ok(d)
}

/// Whether local ordinal `device` can export cuMem allocations as POSIX file descriptors
/// (`CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED`).
pub(crate) fn posix_fd_handles_supported(device: i32) -> Result<bool> {
    let handle = device_handle(device)?;
    let mut v: c_int = 0;
    cu!(
        c"cuDeviceGetAttribute" as sys::PFN_cuDeviceGetAttribute_v2000,
        Some(device),
        |f| f(
            &mut v,
            sys::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
            handle
        ),
        |t| {
            t.args
                .text(
                    "attribute",
                    "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED",
                )
                .int("device", i64::from(handle));
            t.out.int("value", i64::from(v));
        }
    )?;
    Ok(v != 0)
}

/// The properties of a pinned allocation on `device` exportable as a POSIX descriptor.
fn vmm_prop(device: sys::CUdevice_v1) -> sys::CUmemAllocationProp_v1 {
    sys::CUmemAllocationProp_v1 {
        type_: sys::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        location: sys::CUmemLocation {
            type_: sys::CU_MEM_LOCATION_TYPE_DEVICE,
            id: device,
        },
        ..Default::default()
    }
}

/// `cuMemGetAllocationGranularity(MINIMUM)` for [`vmm_prop`] on local ordinal `device`: every
/// cuMem size and reservation is a multiple of it.
fn mem_granularity(device: i32) -> Result<usize> {
    let prop = vmm_prop(device_handle(device)?);
    let mut g: usize = 0;
    cu!(
        c"cuMemGetAllocationGranularity" as sys::PFN_cuMemGetAllocationGranularity_v10020,
        Some(device),
        |f| f(&mut g, &prop, sys::CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        |t| {
            t.args
                .int("location", i64::from(prop.location.id))
                .text("option", "CU_MEM_ALLOC_GRANULARITY_MINIMUM");
            t.out.uint("granularity", g as u64);
        }
    )?;
    Ok(g)
}

/// `cuMemCreate(bytes)` of pinned memory on local ordinal `device`, exportable as a POSIX
/// descriptor: the allocation's handle (owned by the caller: [`mem_release`]).
fn mem_create(device: i32, bytes: usize) -> Result<u64> {
    let prop = vmm_prop(device_handle(device)?);
    let mut h: sys::CUmemGenericAllocationHandle_v1 = 0;
    cu!(
        c"cuMemCreate" as sys::PFN_cuMemCreate_v10020,
        Some(device),
        |f| f(&mut h, bytes, &prop, 0),
        |t| {
            t.args
                .uint("bytes", bytes as u64)
                .int("location", i64::from(prop.location.id))
                .text("handle_types", "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR");
            t.out.uint("handle", h);
        }
    )?;
    Ok(h)
}

/// `cuMemRelease`: forgets an allocation handle (the memory lives on while mapped).
///
/// # Safety
///
/// `handle` must come from [`mem_create`] or [`mem_import_fd`], not released yet, and nothing
/// may use it afterwards.
unsafe fn mem_release(device: i32, handle: u64) -> Result<()> {
    cu!(
        c"cuMemRelease" as sys::PFN_cuMemRelease_v10020,
        Some(device),
        |f| f(handle),
        |t| t.args.uint("handle", handle)
    )
}

/// `cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR)`: a new descriptor of the allocation,
/// owned by the caller.
fn mem_export_fd(device: i32, handle: u64) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut fd: c_int = -1;
    cu!(
        c"cuMemExportToShareableHandle" as sys::PFN_cuMemExportToShareableHandle_v10020,
        Some(device),
        |f| f(
            (&mut fd as *mut c_int).cast(),
            handle,
            sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            0
        ),
        |t| {
            t.args
                .uint("handle", handle)
                .text("handle_type", "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR");
            t.out.int("fd", i64::from(fd));
        }
    )?;
    if fd < 0 {
        return Err(Error::Cuda {
            call: "cuMemExportToShareableHandle",
            device: Some(device),
            code: sys::CUDA_ERROR_INVALID_HANDLE as i32,
            name: "CUDA_ERROR_INVALID_HANDLE".into(),
            text: format!("it succeeded but gave descriptor {fd}"),
        });
    }
    // SAFETY: the driver returned a new descriptor, owned by the caller alone.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `cuMemImportFromShareableHandle(fd, POSIX_FILE_DESCRIPTOR)`: a handle of this process to
/// the memory `fd` names (owned by the caller: [`mem_release`]). `fd` stays the caller's.
fn mem_import_fd(device: i32, fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let mut h: sys::CUmemGenericAllocationHandle_v1 = 0;
    cu!(
        c"cuMemImportFromShareableHandle" as sys::PFN_cuMemImportFromShareableHandle_v10020,
        Some(device),
        // The POSIX handle type passes the descriptor's number as the pointer's value.
        |f| f(
            &mut h,
            raw as isize as *mut c_void,
            sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        ),
        |t| {
            t.args
                .int("fd", i64::from(raw))
                .text("handle_type", "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR");
            t.out.uint("handle", h);
        }
    )?;
    Ok(h)
}

/// `cuMemAddressReserve(bytes)`: address space for a mapping (owned by the caller:
/// [`mem_address_free`]).
fn mem_address_reserve(device: i32, bytes: usize) -> Result<DevicePtr> {
    let mut p: sys::CUdeviceptr_v2 = 0;
    cu!(
        c"cuMemAddressReserve" as sys::PFN_cuMemAddressReserve_v10020,
        Some(device),
        |f| f(&mut p, bytes, 0, 0, 0),
        |t| {
            t.args.uint("bytes", bytes as u64);
            t.out.ptr("ptr", p);
        }
    )?;
    Ok(DevicePtr(p))
}

/// `cuMemAddressFree`.
///
/// # Safety
///
/// `p` and `bytes` must be exactly one reservation of [`mem_address_reserve`], with nothing
/// mapped in it any more, that nothing uses afterwards.
unsafe fn mem_address_free(device: i32, p: DevicePtr, bytes: usize) -> Result<()> {
    cu!(
        c"cuMemAddressFree" as sys::PFN_cuMemAddressFree_v10020,
        Some(device),
        |f| f(p.0, bytes),
        |t| t.args.ptr("ptr", p.0).uint("bytes", bytes as u64)
    )
}

/// `cuMemMap(p, bytes, 0, handle)`: maps all of an allocation of `bytes` bytes at `p`.
///
/// # Safety
///
/// `p` must start `bytes` bytes of a live reservation with nothing mapped there, and `handle`
/// a live allocation handle of exactly `bytes` bytes.
unsafe fn mem_map(device: i32, p: DevicePtr, bytes: usize, handle: u64) -> Result<()> {
    cu!(
        c"cuMemMap" as sys::PFN_cuMemMap_v10020,
        Some(device),
        |f| f(p.0, bytes, 0, handle, 0),
        |t| t
            .args
            .ptr("ptr", p.0)
            .uint("bytes", bytes as u64)
            .uint("offset", 0)
            .uint("handle", handle)
    )
}

/// `cuMemUnmap`.
///
/// # Safety
///
/// `p` and `bytes` must be exactly one mapping of [`mem_map`], that nothing uses afterwards.
unsafe fn mem_unmap(device: i32, p: DevicePtr, bytes: usize) -> Result<()> {
    cu!(
        c"cuMemUnmap" as sys::PFN_cuMemUnmap_v10020,
        Some(device),
        |f| f(p.0, bytes),
        |t| t.args.ptr("ptr", p.0).uint("bytes", bytes as u64)
    )
}

/// `cuMemSetAccess(p, bytes, {local ordinal `device`: read-write})`.
///
/// # Safety
///
/// `p` and `bytes` must be exactly one live mapping of [`mem_map`].
unsafe fn mem_set_access(device: i32, p: DevicePtr, bytes: usize) -> Result<()> {
    let desc = sys::CUmemAccessDesc_v1 {
        location: sys::CUmemLocation {
            type_: sys::CU_MEM_LOCATION_TYPE_DEVICE,
            id: device_handle(device)?,
        },
        flags: sys::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    cu!(
        c"cuMemSetAccess" as sys::PFN_cuMemSetAccess_v10020,
        Some(device),
        |f| f(p.0, bytes, &desc, 1),
        |t| t
            .args
            .ptr("ptr", p.0)
            .uint("bytes", bytes as u64)
            .int("location", i64::from(desc.location.id))
            .text("flags", "CU_MEM_ACCESS_FLAGS_PROT_READWRITE")
    )
}

// ---------------------------------------------------------------------------------------------
// Runtime API

/// A device allocation or IPC mapping, by address (never dereferenced on the host). Private to
/// this module: only [`memory`]'s owners and views hold one, and only for memory they keep live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DevicePtr(u64);

impl DevicePtr {
    fn as_mut_ptr(self) -> *mut c_void {
        self.0 as usize as *mut c_void
    }
}

/// `cudaGetDeviceCount`.
pub(crate) fn runtime_device_count() -> Result<i32> {
    let mut n: c_int = 0;
    cuda!(
        c"cudaGetDeviceCount" as sys::p2pc_PFN_cudaGetDeviceCount,
        None,
        |f| f(&mut n),
        |t| t.out.int("device_count", i64::from(n))
    )?;
    Ok(n)
}

/// `cudaSetDevice`.
pub(crate) fn set_device(device: i32) -> Result<()> {
    cuda!(
        c"cudaSetDevice" as sys::p2pc_PFN_cudaSetDevice,
        Some(device),
        |f| f(device),
        |t| t.args.int("device", i64::from(device))
    )
}

/// `cudaMalloc` on the current device (`device` is for error messages).
fn malloc(device: i32, bytes: usize) -> Result<DevicePtr> {
    let mut p: *mut c_void = std::ptr::null_mut();
    cuda!(
        c"cudaMalloc" as sys::p2pc_PFN_cudaMalloc,
        Some(device),
        |f| f(&mut p, bytes),
        |t| {
            t.args.uint("bytes", bytes as u64);
            t.out.ptr("ptr", p as usize as u64);
        }
    )?;
    Ok(DevicePtr(p as usize as u64))
}

/// `cudaMemset`.
///
/// # Safety
///
/// `p` must address `bytes` bytes of live device memory (an allocation or mapping the caller
/// keeps alive for the call).
unsafe fn memset(device: i32, p: DevicePtr, value: u8, bytes: usize) -> Result<()> {
    cuda!(
        c"cudaMemset" as sys::p2pc_PFN_cudaMemset,
        Some(device),
        |f| f(p.as_mut_ptr(), c_int::from(value), bytes),
        |t| t
            .args
            .ptr("ptr", p.0)
            .uint("value", u64::from(value))
            .uint("bytes", bytes as u64)
    )
}

/// `cudaDeviceSynchronize`.
pub(crate) fn device_synchronize(device: i32) -> Result<()> {
    cuda!(
        c"cudaDeviceSynchronize" as sys::p2pc_PFN_cudaDeviceSynchronize,
        Some(device),
        |f| f()
    )
}

/// `cudaDeviceReset`: destroys the current device's primary context (and every allocation,
/// mapping and module in it).
pub(crate) fn device_reset(device: i32) -> Result<()> {
    cuda!(
        c"cudaDeviceReset" as sys::p2pc_PFN_cudaDeviceReset,
        Some(device),
        |f| f()
    )
}

/// `cudaMemcpy(host, p, bytes, cudaMemcpyDefault)`, as vLLM's check does (kind default).
///
/// # Safety
///
/// `p` must address `bytes` bytes of live device memory: with the default kind CUDA takes an
/// address it does not know as host memory and reads it.
unsafe fn copy_to_host(device: i32, p: DevicePtr, bytes: usize) -> Result<Vec<u8>> {
    let mut host = vec![0u8; bytes];
    cuda!(
        c"cudaMemcpy" as sys::p2pc_PFN_cudaMemcpy,
        Some(device),
        |f| f(
            host.as_mut_ptr().cast(),
            p.as_mut_ptr(),
            bytes,
            sys::cudaMemcpyDefault
        ),
        |t| t
            .args
            .ptr("dst", host.as_ptr() as usize as u64)
            .ptr("src", p.0)
            .uint("bytes", bytes as u64)
            .text("kind", "cudaMemcpyDefault")
    )?;
    Ok(host)
}

/// `cudaFree`.
///
/// # Safety
///
/// `p` must be the base of a live `cudaMalloc` allocation that nothing uses afterwards (it is
/// freed once).
unsafe fn free(device: i32, p: DevicePtr) -> Result<()> {
    cuda!(
        c"cudaFree" as sys::p2pc_PFN_cudaFree,
        Some(device),
        |f| f(p.as_mut_ptr()),
        |t| t.args.ptr("ptr", p.0)
    )
}

/// `cudaIpcCloseMemHandle`: unmaps a peer's memory opened with [`ipc_open_mem_handle`].
///
/// # Safety
///
/// `p` must be an address [`ipc_open_mem_handle`] returned, not yet closed, that nothing uses
/// afterwards (it is closed once).
unsafe fn ipc_close_mem_handle(device: i32, p: DevicePtr) -> Result<()> {
    cuda!(
        c"cudaIpcCloseMemHandle" as sys::p2pc_PFN_cudaIpcCloseMemHandle,
        Some(device),
        |f| f(p.as_mut_ptr()),
        |t| t.args.ptr("ptr", p.0)
    )
}

/// `cudaIpcGetMemHandle`: the handle's raw 64 bytes.
///
/// # Safety
///
/// `p` must be the base of a live `cudaMalloc` allocation: the handle gives other processes
/// access to all of it.
unsafe fn ipc_get_mem_handle(device: i32, p: DevicePtr) -> Result<[u8; IPC_HANDLE_BYTES]> {
    let mut h = sys::cudaIpcMemHandle_t::default();
    cuda!(
        c"cudaIpcGetMemHandle" as sys::p2pc_PFN_cudaIpcGetMemHandle,
        Some(device),
        |f| f(&mut h, p.as_mut_ptr()),
        |t| {
            t.args.ptr("ptr", p.0);
            t.out.hex("handle", &h.reserved.map(|c| c as u8));
        }
    )?;
    Ok(h.reserved.map(|c| c as u8))
}

/// `cudaIpcOpenMemHandle(.., cudaIpcMemLazyEnablePeerAccess)` on the current device.
fn ipc_open_mem_handle(device: i32, handle: &[u8; IPC_HANDLE_BYTES]) -> Result<DevicePtr> {
    let h = sys::cudaIpcMemHandle_t {
        reserved: handle.map(|b| b as c_char),
    };
    let mut p: *mut c_void = std::ptr::null_mut();
    cuda!(
        c"cudaIpcOpenMemHandle" as sys::p2pc_PFN_cudaIpcOpenMemHandle,
        Some(device),
        |f| f(&mut p, h, sys::cudaIpcMemLazyEnablePeerAccess),
        |t| {
            t.args
                .hex("handle", handle)
                .text("flags", "cudaIpcMemLazyEnablePeerAccess");
            t.out.ptr("ptr", p as usize as u64);
        }
    )?;
    Ok(DevicePtr(p as usize as u64))
}

/// The driver's claim that `tgt` can reach `src`'s memory: `cudaDeviceCanAccessPeer(tgt,
/// src)`, as vLLM's fast path asks it. CUDA answers "no" for a device and itself, where access
/// needs no peer mapping at all, so that case is `true` without asking.
pub(crate) fn runtime_claims_peer(src: i32, tgt: i32) -> Result<bool> {
    if src == tgt {
        return Ok(true);
    }
    let mut can: c_int = 0;
    cuda!(
        c"cudaDeviceCanAccessPeer" as sys::p2pc_PFN_cudaDeviceCanAccessPeer,
        Some(tgt),
        |f| f(&mut can, tgt, src),
        |t| {
            t.args
                .int("device", i64::from(tgt))
                .int("peer_device", i64::from(src));
            t.out.int("can_access_peer", i64::from(can));
        }
    )?;
    Ok(can != 0)
}

// ---------------------------------------------------------------------------------------------
// The kernel and handshake tiers' kernels (after the macros, which it uses)

mod fatbin;
mod kernels;
pub(crate) use kernels::{Engine as Mover, Kernels, PatternCount, HANDSHAKE_AREA_BYTES};
pub(crate) use memory::{CumemBuffer, CumemMapping, DeviceBuffer, DeviceView, PeerMapping};

#[cfg(test)]
mod tests {
    /// The sentence's own copy of the stub library's code is the bindings' constant.
    #[test]
    fn the_stub_librarys_code_is_the_bindings() {
        assert_eq!(
            crate::failed_call::CUDA_ERROR_STUB_LIBRARY,
            super::sys::CUDA_ERROR_STUB_LIBRARY as i32
        );
    }
}

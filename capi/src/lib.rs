//! The C ABI of p2pcheck: every function `include/p2pcheck.h` declares, `#[no_mangle] extern
//! "C"`, built into `libp2pcheck_capi.a` and `libp2pcheck_capi.so` (soname `libp2pcheck.so.0`;
//! `scripts/install.sh` installs them as `libp2pcheck.a` and `libp2pcheck.so.0`). A crate of its
//! own, on the library's public API only, so that a Rust dependent of `p2pcheck` builds no C
//! library.
//!
//! The header is the reference for C callers; this crate is the Rust side of it. Every export
//! runs its body inside [`std::panic::catch_unwind`], so no panic crosses the boundary (it
//! becomes [`Status::Panic`]); a NULL where a pointer is required is [`Status::NullArgument`]
//! and a value out of range [`Status::InvalidArgument`], never a crash. Functions whose failures
//! need words take `char *msg, size_t msg_len`, a caller buffer that receives the error's full
//! text (empty on success), NUL-terminated and cut at a UTF-8 character boundary when it does
//! not fit; NULL or 0 means no message.
//!
//! Handles (`p2pcheck_options`, `p2pcheck_report`, `p2pcheck_pending`) are boxes handed to C
//! as opaque pointers, each with the process that made it ([`Handle`]): in a child of `fork`
//! a call on an inherited handle answers [`Status::WrongProcess`] before touching it. Options
//! sit behind a mutex, so two threads using one handle at once are serialised rather than
//! racing; a pending check is waited on and cancelled from any threads at once, no lock held
//! across a wait; a report never changes after it is made.
//!
//! The enum types here ([`Status`], [`EngineCode`], ...) and [`PairResult`] mirror the header's
//! enums and struct; `tests/capi.rs` compiles the header as C and C++ and compares every
//! constant, size, alignment and offset with these.

#![deny(unsafe_op_in_unsafe_fn)]

use std::ffi::{c_char, c_int, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use once_cell::sync::Lazy;

use p2pcheck::policy::{self, ComputeCapability, PolicyConfig};
use p2pcheck::sim::{Fault, Simulation};
use p2pcheck::{
    AccessOptions, Class, Engine, Error, Level, Options, Pair, PairBandwidth, PairReport, Pending,
    ProcessOwner, Report, TierOutcome, Transport, Transports, Verdict, Visibility,
    DEFAULT_BANDWIDTH_BYTES, MAX_DEVICES,
};

/// `p2pcheck_status`: what a call of the C ABI gave. `Ok` is 0; one code per [`Error`] variant
/// follows, then the ABI's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// `P2PCHECK_STATUS_OK`: it worked.
    Ok = 0,
    /// `P2PCHECK_STATUS_CUDA`: [`Error::Cuda`].
    Cuda = 1,
    /// `P2PCHECK_STATUS_WORKER_CUDA`: [`Error::WorkerCuda`].
    WorkerCuda = 2,
    /// `P2PCHECK_STATUS_WORKER`: a worker could not be found, started or kept
    /// ([`Error::WorkerSpawn`], [`Error::WorkerLost`], [`Error::GaveUp`] and the other worker
    /// variants).
    Worker = 3,
    /// `P2PCHECK_STATUS_VERSION`: [`Error::Version`].
    Version = 4,
    /// `P2PCHECK_STATUS_NO_DEVICE`: [`Error::NoDevice`].
    NoDevice = 5,
    /// `P2PCHECK_STATUS_INVALID_ARGUMENT`: [`Error::InvalidInput`], or an argument of the C
    /// call out of range.
    InvalidArgument = 6,
    /// `P2PCHECK_STATUS_CACHE`: [`Error::Cache`].
    Cache = 7,
    /// `P2PCHECK_STATUS_CANCELLED`: [`Error::Cancelled`].
    Cancelled = 8,
    /// `P2PCHECK_STATUS_NULL_ARGUMENT`: a required pointer was NULL.
    NullArgument = 9,
    /// `P2PCHECK_STATUS_PANIC`: a bug in p2pcheck, caught at the boundary.
    Panic = 10,
    /// `P2PCHECK_STATUS_BUFFER_TOO_SMALL`: the text did not fit; what fits was written.
    BufferTooSmall = 11,
    /// `P2PCHECK_STATUS_NOT_READY`: the background check is still running.
    NotReady = 12,
    /// `P2PCHECK_STATUS_NOT_FOUND`: a table has no entry for the arguments.
    NotFound = 13,
    /// `P2PCHECK_STATUS_OTHER`: an error this version does not name (reserved: a later
    /// version's error kinds map here for callers built against this header).
    Other = 14,
    /// `P2PCHECK_STATUS_WRONG_PROCESS`: the handle was made by another process (this is a
    /// child of `fork`); nothing of it was touched.
    WrongProcess = 15,
}

impl Status {
    /// Every status, in value order.
    pub const ALL: [Status; 16] = [
        Status::Ok,
        Status::Cuda,
        Status::WorkerCuda,
        Status::Worker,
        Status::Version,
        Status::NoDevice,
        Status::InvalidArgument,
        Status::Cache,
        Status::Cancelled,
        Status::NullArgument,
        Status::Panic,
        Status::BufferTooSmall,
        Status::NotReady,
        Status::NotFound,
        Status::Other,
        Status::WrongProcess,
    ];

    /// The status for an [`Error`].
    pub fn of(e: &Error) -> Status {
        match e {
            Error::Cuda(_) => Status::Cuda,
            Error::WorkerCuda { .. } => Status::WorkerCuda,
            Error::WorkerUnusable { .. }
            | Error::WorkerNotFound { .. }
            | Error::WorkerSpawn { .. }
            | Error::WorkerPipes { .. }
            | Error::WorkerStartup { .. }
            | Error::WorkerLost { .. }
            | Error::WorkerProtocol { .. }
            | Error::StartDeadline { .. }
            | Error::WorkerClaim { .. }
            | Error::DeviceCounts { .. }
            | Error::DeviceCountChanged { .. }
            | Error::GaveUp { .. }
            | Error::Thread { .. }
            | Error::Subreaper { .. }
            | Error::Bug { .. }
            | Error::Internal { .. } => Status::Worker,
            Error::Version { .. } => Status::Version,
            Error::NoDevice(_) => Status::NoDevice,
            Error::InvalidInput(_) => Status::InvalidArgument,
            Error::Cache { .. } => Status::Cache,
            Error::Cancelled => Status::Cancelled,
            // The simulator's set-up failing was an invalid argument before it had a variant
            // of its own; a trace is never read through the C ABI.
            Error::Simulator { .. } | Error::BadTrace { .. } => Status::InvalidArgument,
            // `Error` is non-exhaustive outside its crate: a variant added later is `Other`
            // until it is given a status here.
            _ => Status::Other,
        }
    }

    /// What the status means, in words (`p2pcheck_status_text`).
    pub fn text(self) -> &'static CStr {
        match self {
            Status::Ok => c"ok",
            Status::Cuda => {
                c"CUDA failed in this process: the library could not be loaded, lacks a symbol, \
                  or a call failed"
            }
            Status::WorkerCuda => c"a worker process could not start CUDA",
            Status::Worker => {
                c"the worker executable could not be found or started, or misbehaved before \
                  any pair"
            }
            Status::Version => c"the worker speaks another protocol version",
            Status::NoDevice => c"no GPU is visible",
            Status::InvalidArgument => c"an argument is invalid or out of range",
            Status::Cache => c"vLLM's cache file or its lock could not be used",
            Status::Cancelled => c"the check was cancelled",
            Status::NullArgument => c"a required pointer argument is NULL",
            Status::Panic => c"internal error in p2pcheck (a bug), caught at the C boundary",
            Status::BufferTooSmall => {
                c"the buffer is too small for the text; what fits was written"
            }
            Status::NotReady => c"the check is still running",
            Status::NotFound => c"the table has no entry for these arguments",
            Status::Other => c"another error",
            Status::WrongProcess => {
                c"the handle belongs to another process (this is a child of fork): nothing of \
                  it was touched"
            }
        }
    }
}

/// `p2pcheck_engine`: [`Engine`] as a C value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineCode {
    /// `P2PCHECK_ENGINE_PARALLEL`: [`Engine::Parallel`].
    Parallel = 0,
    /// `P2PCHECK_ENGINE_VLLM`: [`Engine::Vllm`].
    Vllm = 1,
}

/// `p2pcheck_level`: [`Level`] as a C value, and `None` for "no tier" in
/// [`PairResult::failed_tier`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LevelCode {
    /// `P2PCHECK_LEVEL_NONE`: no tier failed (never accepted as a level to check).
    None = -1,
    /// `P2PCHECK_LEVEL_COPY`: [`Level::Copy`].
    Copy = 0,
    /// `P2PCHECK_LEVEL_KERNEL`: [`Level::Kernel`].
    Kernel = 1,
    /// `P2PCHECK_LEVEL_HANDSHAKE`: [`Level::Handshake`].
    Handshake = 2,
}

/// `p2pcheck_visibility`: [`Visibility`] as a C value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VisibilityCode {
    /// `P2PCHECK_VISIBILITY_ONE`: [`Visibility::One`].
    One = 0,
    /// `P2PCHECK_VISIBILITY_ALL`: [`Visibility::All`].
    All = 1,
}

/// `p2pcheck_transport`: a [`Transport`] as a C value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportCode {
    /// `P2PCHECK_TRANSPORT_IPC`: [`Transport::Ipc`].
    Ipc = 0,
    /// `P2PCHECK_TRANSPORT_CUMEM`: [`Transport::Cumem`].
    Cumem = 1,
}

impl TransportCode {
    /// The code for a [`Transport`].
    pub fn of(t: Transport) -> TransportCode {
        match t {
            Transport::Ipc => TransportCode::Ipc,
            Transport::Cumem => TransportCode::Cumem,
        }
    }
}

/// `p2pcheck_transports`: a [`Transports`] choice as a C value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportsCode {
    /// `P2PCHECK_TRANSPORTS_IPC`: [`Transports::Ipc`].
    Ipc = 0,
    /// `P2PCHECK_TRANSPORTS_CUMEM`: [`Transports::Cumem`].
    Cumem = 1,
    /// `P2PCHECK_TRANSPORTS_ALL`: [`Transports::All`].
    All = 2,
}

impl TransportsCode {
    /// The [`Transports`] of a C value, if it is one.
    pub fn from_c(v: c_int) -> Option<Transports> {
        [
            (TransportsCode::Ipc, Transports::Ipc),
            (TransportsCode::Cumem, Transports::Cumem),
            (TransportsCode::All, Transports::All),
        ]
        .into_iter()
        .find(|(code, _)| *code as c_int == v)
        .map(|(_, t)| t)
    }
}

/// `p2pcheck_verdict`: the kind of [`Verdict`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerdictCode {
    /// `P2PCHECK_VERDICT_OK`: [`Verdict::Ok`].
    Ok = 0,
    /// `P2PCHECK_VERDICT_FAILS`: [`Verdict::Fails`].
    Fails = 1,
    /// `P2PCHECK_VERDICT_HANG`: [`Verdict::Hang`].
    Hang = 2,
    /// `P2PCHECK_VERDICT_ERROR`: [`Verdict::Error`].
    Error = 3,
}

/// `p2pcheck_tier`: one tier's result for a pair, both sides combined.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TierCode {
    /// `P2PCHECK_TIER_NOT_RUN`: not asked for, or the pair never got that far.
    NotRun = 0,
    /// `P2PCHECK_TIER_OK`: passed on both sides.
    Ok = 1,
    /// `P2PCHECK_TIER_FAILED`: failed on a side.
    Failed = 2,
}

/// `p2pcheck_class`: the diagnosis ([`Class`]) of a pair's failed tier, or `None`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClassCode {
    /// `P2PCHECK_CLASS_NONE`: no tier failed (an ok pair, a hang or an error).
    None = 0,
    /// `P2PCHECK_CLASS_NEVER_WRITTEN`: [`Class::NeverWritten`].
    NeverWritten = 1,
    /// `P2PCHECK_CLASS_PARTIAL`: [`Class::Partial`].
    Partial = 2,
    /// `P2PCHECK_CLASS_WRONG_DATA`: [`Class::WrongData`].
    WrongData = 3,
    /// `P2PCHECK_CLASS_OPEN_FAILED`: [`Class::OpenFailed`].
    OpenFailed = 4,
    /// `P2PCHECK_CLASS_TIMEOUT`: [`Class::Timeout`].
    Timeout = 5,
    /// `P2PCHECK_CLASS_OTHER`: [`Class::Other`].
    Other = 6,
    /// `P2PCHECK_CLASS_EXPORT_REFUSED`: [`Class::ExportRefused`].
    ExportRefused = 7,
    /// `P2PCHECK_CLASS_FD_NOT_PASSABLE`: [`Class::FdNotPassable`].
    FdNotPassable = 8,
    /// `P2PCHECK_CLASS_IMPORT_REFUSED`: [`Class::ImportRefused`].
    ImportRefused = 9,
    /// `P2PCHECK_CLASS_MAP_REFUSED`: [`Class::MapRefused`].
    MapRefused = 10,
}

impl ClassCode {
    /// The code for a [`Class`].
    pub fn of(class: Class) -> ClassCode {
        match class {
            Class::NeverWritten => ClassCode::NeverWritten,
            Class::Partial => ClassCode::Partial,
            Class::WrongData => ClassCode::WrongData,
            Class::OpenFailed => ClassCode::OpenFailed,
            Class::Timeout => ClassCode::Timeout,
            Class::ExportRefused => ClassCode::ExportRefused,
            Class::FdNotPassable => ClassCode::FdNotPassable,
            Class::ImportRefused => ClassCode::ImportRefused,
            Class::MapRefused => ClassCode::MapRefused,
            Class::Other => ClassCode::Other,
        }
    }

    /// The [`Class`] of a code (`None` for [`ClassCode::None`]).
    pub fn class(self) -> Option<Class> {
        Some(match self {
            ClassCode::None => return None,
            ClassCode::NeverWritten => Class::NeverWritten,
            ClassCode::Partial => Class::Partial,
            ClassCode::WrongData => Class::WrongData,
            ClassCode::OpenFailed => Class::OpenFailed,
            ClassCode::Timeout => Class::Timeout,
            ClassCode::Other => Class::Other,
            ClassCode::ExportRefused => Class::ExportRefused,
            ClassCode::FdNotPassable => Class::FdNotPassable,
            ClassCode::ImportRefused => Class::ImportRefused,
            ClassCode::MapRefused => Class::MapRefused,
        })
    }

    /// Every code, in value order.
    pub const ALL: [ClassCode; 11] = [
        ClassCode::None,
        ClassCode::NeverWritten,
        ClassCode::Partial,
        ClassCode::WrongData,
        ClassCode::OpenFailed,
        ClassCode::Timeout,
        ClassCode::Other,
        ClassCode::ExportRefused,
        ClassCode::FdNotPassable,
        ClassCode::ImportRefused,
        ClassCode::MapRefused,
    ];
}

/// `p2pcheck_pair_result`: one pair of a report as plain data (48 bytes, alignment 4, every
/// field a 32-bit integer; the header lists the offsets).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PairResult {
    /// The device that owns the memory.
    pub src: u32,
    /// The device that maps and accesses it.
    pub tgt: u32,
    /// 1 when the verdict is ok (vLLM's boolean), else 0.
    pub ok: i32,
    /// A [`VerdictCode`].
    pub verdict: i32,
    /// A [`TierCode`]: vLLM's copy test.
    pub copy: i32,
    /// A [`TierCode`]: the kernel tier.
    pub kernel: i32,
    /// A [`TierCode`]: the handshake tier.
    pub handshake: i32,
    /// A [`LevelCode`]: the weakest tier that failed, or [`LevelCode::None`].
    pub failed_tier: i32,
    /// A [`ClassCode`]: the diagnosis of the failed tier.
    pub diagnosis: i32,
    /// Attempts made: 1, or 2 when the first did not pass (see [`p2pcheck::Evidence`]).
    pub attempts: u32,
    /// The driver's claim (`cudaDeviceCanAccessPeer`): 1, 0, or -1 where it could not be asked.
    pub driver_claim: i32,
    /// 1 when the verdict is a fact that may be written to vLLM's cache.
    pub persistable: i32,
}

/// `p2pcheck_bandwidth`: one pair's bandwidth measurement as plain data (120 bytes, alignment
/// 8; the header lists the offsets).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BandwidthResult {
    /// 0 not measured, 1 measured (the figures hold), 2 failed (a transfer failed, or the
    /// bytes moved were wrong: no figure).
    pub state: i32,
    /// 1 when the pair is `slow`.
    pub slow: i32,
    /// The floor judged against, GB/s; 0 when there was none.
    pub floor_gbps: f64,
    /// Median GB/s of each figure, in [`p2pcheck::FIGURES`] order: copy engine write, read, both;
    /// SM write, read, both.
    pub gbps: [f64; 6],
    /// The coefficient of variation of each figure's samples (0.01 = 1 %).
    pub cv: [f64; 6],
    /// One dependent load through the mapping, in nanoseconds.
    pub latency_ns: f64,
}

impl BandwidthResult {
    /// The plain data of one pair's measurement (`None`: not measured).
    pub fn of(b: Option<&PairBandwidth>) -> BandwidthResult {
        let Some(b) = b else {
            return BandwidthResult::default();
        };
        let mut out = BandwidthResult {
            state: 2,
            slow: i32::from(b.slow),
            floor_gbps: b.floor.gbps().unwrap_or(0.0),
            ..BandwidthResult::default()
        };
        if let Ok(m) = &b.measured {
            out.state = 1;
            for (i, f) in m.figures.iter().enumerate() {
                out.gbps[i] = f.gbps;
                out.cv[i] = f.cv;
            }
            out.latency_ns = m.latency_ns;
        }
        out
    }
}

impl PairResult {
    /// The plain data of one pair.
    pub fn of(p: &PairReport) -> PairResult {
        let verdict = p.verdict();
        let code = match &verdict {
            Verdict::Ok => VerdictCode::Ok,
            Verdict::Fails(_) => VerdictCode::Fails,
            Verdict::Hang(_) => VerdictCode::Hang,
            Verdict::Error(_) => VerdictCode::Error,
        };
        let tier = |t: TierOutcome| match t {
            TierOutcome::NotRun => TierCode::NotRun,
            TierOutcome::Ok => TierCode::Ok,
            TierOutcome::Failed(_) => TierCode::Failed,
        };
        let copy = match p.copy_ok() {
            None => TierCode::NotRun,
            Some(true) => TierCode::Ok,
            Some(false) => TierCode::Failed,
        };
        // The failed tier and its diagnosis, from the verdict's cause.
        let failure = match &verdict {
            Verdict::Fails(failure) => Some(failure),
            _ => None,
        };
        PairResult {
            src: p.pair.src,
            tgt: p.pair.tgt,
            ok: i32::from(code == VerdictCode::Ok),
            verdict: code as i32,
            copy: copy as i32,
            kernel: tier(p.kernel()) as i32,
            handshake: tier(p.handshake()) as i32,
            failed_tier: failure.map_or(LevelCode::None, |f| LevelCode::of(f.tier)) as i32,
            diagnosis: failure.map_or(ClassCode::None, |f| ClassCode::of(f.class())) as i32,
            attempts: p.attempts,
            driver_claim: p.claim().map_or(-1, i32::from),
            persistable: i32::from(p.persistable()),
        }
    }
}

impl LevelCode {
    /// The code for a [`Level`].
    pub fn of(level: Level) -> LevelCode {
        match level {
            Level::Copy => LevelCode::Copy,
            Level::Kernel => LevelCode::Kernel,
            Level::Handshake => LevelCode::Handshake,
        }
    }
}

/// A value handed to C as an opaque pointer, with the process that made it: in the child of
/// a `fork` it answers [`Status::WrongProcess`] before anything of it is touched (a lock the
/// parent's threads held at the fork stays held in the child for ever).
pub struct Handle<T> {
    owner: ProcessOwner,
    value: T,
}

impl<T> Handle<T> {
    /// `value`, boxed, as C gets it.
    fn into_raw(value: T) -> *mut Handle<T> {
        Box::into_raw(Box::new(Handle {
            owner: ProcessOwner::current(),
            value,
        }))
    }
}

/// `p2pcheck_options`: how a check runs (opaque to C).
pub type OptionsHandle = Handle<Mutex<Options>>;

/// `p2pcheck_report`: the result of a check (opaque to C).
pub type ReportHandle = Handle<Report>;

/// `p2pcheck_pending`: a check running in the background (opaque to C). [`Pending`] is
/// `Sync`: its waits and its cancel run from any threads at once, with no lock held across a
/// wait.
pub type PendingHandle = Handle<Pending>;

/// The most pairs one call takes: every ordered pair of 256 devices (the most a worker may
/// see).
pub const MAX_PAIRS: usize = (MAX_DEVICES as usize) * (MAX_DEVICES as usize);

/// Why a call failed: its status and the text for `msg`.
struct Failure {
    status: Status,
    text: String,
}

impl Failure {
    fn new(status: Status, text: impl Into<String>) -> Failure {
        Failure {
            status,
            text: text.into(),
        }
    }

    fn null(what: &str) -> Failure {
        Failure::new(Status::NullArgument, format!("{what} is NULL"))
    }

    fn invalid(text: impl Into<String>) -> Failure {
        Failure::new(Status::InvalidArgument, text)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::new(Status::of(&e), e.to_string())
    }
}

/// What a caught panic said.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    format!("internal error in p2pcheck (a bug), caught at the C boundary: {what}")
}

/// A caller's text buffer: NULL, or `len` writable bytes.
#[derive(Clone, Copy)]
struct TextBuf {
    ptr: *mut c_char,
    len: usize,
}

impl TextBuf {
    /// The buffer `ptr`/`len`.
    ///
    /// # Safety
    /// `ptr` is NULL or valid for writes of `len` bytes while the value is used.
    unsafe fn new(ptr: *mut c_char, len: usize) -> TextBuf {
        TextBuf { ptr, len }
    }

    /// No buffer.
    fn none() -> TextBuf {
        TextBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }

    /// Writes `text` NUL-terminated, cut at a UTF-8 character boundary when it does not fit
    /// with its NUL; returns whether it all fit. Nothing is written when the buffer is NULL or
    /// 0 bytes long.
    fn write(self, text: &[u8]) -> bool {
        if self.ptr.is_null() || self.len == 0 {
            return false;
        }
        let mut cut = text.len().min(self.len - 1);
        // A continuation byte at the cut means the cut splits a character: back off to its
        // first byte.
        while cut > 0 && cut < text.len() && text[cut] & 0xC0 == 0x80 {
            cut -= 1;
        }
        // SAFETY: cut < len, so bytes 0..=cut are within the buffer new() was promised; text
        // is a Rust allocation of its own, so the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), self.ptr.cast::<u8>(), cut);
            self.ptr.add(cut).write(0);
        }
        cut == text.len()
    }

    /// An output text: written as [`TextBuf::write`], its length without the NUL stored in
    /// `needed`; `BufferTooSmall` when it did not fit.
    fn output(self, needed: Out<usize>, text: &[u8]) -> Result<Status, Failure> {
        if self.ptr.is_null() && self.len > 0 {
            return Err(Failure::null("buf (with a nonzero len)"));
        }
        needed.put_if_given(text.len());
        if self.write(text) {
            Ok(Status::Ok)
        } else {
            Err(Failure::new(
                Status::BufferTooSmall,
                format!("{} bytes and a NUL do not fit in {}", text.len(), self.len),
            ))
        }
    }
}

/// A caller's out-pointer: NULL, or valid for a write of a `T`.
struct Out<T>(*mut T);

impl<T> Out<T> {
    /// The out-pointer `ptr`.
    ///
    /// # Safety
    /// `ptr` is NULL or valid for a write of a `T` while the value is used.
    unsafe fn new(ptr: *mut T) -> Out<T> {
        Out(ptr)
    }

    /// Stores `value`; `NullArgument` (naming `what`) when the pointer is NULL.
    fn put(&self, what: &str, value: T) -> Result<Status, Failure> {
        if self.0.is_null() {
            return Err(Failure::null(what));
        }
        // SAFETY: not NULL, so valid for a write, as new() was promised.
        unsafe { self.0.write(value) };
        Ok(Status::Ok)
    }

    /// Stores `value` unless the pointer is NULL.
    fn put_if_given(&self, value: T) {
        let _ = self.put("", value);
    }

    /// `NullArgument` (naming `what`) when the pointer is NULL.
    fn required(&self, what: &str) -> Result<(), Failure> {
        match self.0.is_null() {
            true => Err(Failure::null(what)),
            false => Ok(()),
        }
    }
}

impl<T> Out<*mut T> {
    /// Stores NULL, so that a failure leaves no stale handle in the caller's variable.
    fn clear(&self) {
        self.put_if_given(std::ptr::null_mut());
    }
}

/// Runs `body` with panics caught, writes its error text (or an empty string) to `msg`, and
/// returns its status.
fn guard(msg: TextBuf, body: impl FnOnce() -> Result<Status, Failure>) -> Status {
    let (status, text) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => (status, String::new()),
        Ok(Err(f)) => (f.status, f.text),
        Err(panic) => (Status::Panic, panic_text(&*panic)),
    };
    msg.write(text.as_bytes());
    status
}

/// The value of a handle: `NullArgument` naming `what` without one, `WrongProcess` in another
/// process than the one that made it.
fn required<'a, T>(h: Option<&'a Handle<T>>, what: &str) -> Result<&'a T, Failure> {
    let h = h.ok_or_else(|| Failure::null(what))?;
    h.owner
        .check(what)
        .map_err(|e| Failure::new(Status::WrongProcess, e.to_string()))?;
    Ok(&h.value)
}

/// Frees a handle with `finish`; NULL is ignored. In another process than the one that made
/// it nothing is touched (the handle's memory stays until the process exits or execs).
///
/// # Safety
/// `p` is NULL or a live handle made by [`Handle::into_raw`], not used again.
unsafe fn free<T>(p: *mut Handle<T>, finish: impl FnOnce(T)) {
    if p.is_null() {
        return;
    }
    // SAFETY: made by Box::into_raw in Handle::into_raw; the caller gives it up.
    let owned = unsafe { Box::from_raw(p) };
    if owned.owner.check("").is_err() {
        std::mem::forget(owned);
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(move || finish(owned.value)));
}

/// Locks a handle's mutex; a panic in an earlier call left the data consistent (every update
/// is a whole-value swap), so a poisoned lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The options of a handle (the defaults without one), copied so that no lock is held while
/// a check runs.
fn options_or_default(h: Option<&OptionsHandle>) -> Result<Options, Failure> {
    match h {
        None => Ok(Options::default()),
        Some(_) => Ok(lock(required(h, "opts")?).clone()),
    }
}

/// A C string argument (`None`: NULL).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that stays valid for `'a`.
unsafe fn c_str<'a>(p: *const c_char) -> Option<&'a CStr> {
    // SAFETY: checked not NULL; the caller's promise that it is a NUL-terminated string.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

/// A folder or file argument: `None` when NULL.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn path_arg(p: *const c_char) -> Option<PathBuf> {
    // SAFETY: the caller's promise.
    unsafe { c_str(p) }.map(|d| PathBuf::from(OsStr::from_bytes(d.to_bytes())))
}

/// A cache folder argument, checked: an empty string names no folder.
fn cache_folder(dir: Option<PathBuf>) -> Result<Option<PathBuf>, Failure> {
    match dir {
        Some(d) if d.as_os_str().is_empty() => Err(Failure::invalid(
            "cache_dir is empty: name a folder (\".\" for the current one), or NULL for vLLM's",
        )),
        d => Ok(d),
    }
}

/// `n` devices from the C array `p` (empty when `n` is 0, whatever `p` is).
///
/// # Safety
/// `p` is NULL or valid for reads of `n` `u32`s that stay unchanged for `'a`.
unsafe fn devices<'a>(p: *const u32, n: usize, what: &str) -> Result<&'a [u32], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if n > MAX_PAIRS {
        return Err(Failure::invalid(format!(
            "{n} pairs: at most {MAX_PAIRS} (every ordered pair of {MAX_DEVICES} devices)"
        )));
    }
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not NULL, and the caller's promise of n readable elements (n is bounded, so
    // n * 4 bytes fits an isize).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The batch `src[i]->tgt[i]`; `None` (every pair) when `n` is 0.
fn batch(src: &[u32], tgt: &[u32]) -> Option<Vec<Pair>> {
    (!src.is_empty()).then(|| {
        src.iter()
            .zip(tgt)
            .map(|(&src, &tgt)| Pair { src, tgt })
            .collect()
    })
}

/// Hands a report to C.
fn give_report(out: &Out<*mut ReportHandle>, report: Report) -> Result<Status, Failure> {
    out.put("out", Handle::into_raw(report))
}

/// The crate version, NUL-terminated.
static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// `const char *p2pcheck_version(void)`: the library's version (`"0.1.0"`), a static string.
#[no_mangle]
pub extern "C" fn p2pcheck_version() -> *const c_char {
    catch_unwind(|| VERSION.as_ptr().cast::<c_char>()).unwrap_or(std::ptr::null())
}

/// `uint32_t p2pcheck_protocol_version(void)`: the worker protocol version this library speaks.
#[no_mangle]
pub extern "C" fn p2pcheck_protocol_version() -> u32 {
    catch_unwind(|| u32::from(p2pcheck::PROTOCOL_VERSION)).unwrap_or(0)
}

/// `const char *p2pcheck_status_text(p2pcheck_status)`: what a status means, a static string
/// (`"unknown status"` for a value this version does not define).
#[no_mangle]
pub extern "C" fn p2pcheck_status_text(status: c_int) -> *const c_char {
    catch_unwind(|| {
        Status::ALL
            .into_iter()
            .find(|s| *s as c_int == status)
            .map_or(c"unknown status", Status::text)
            .as_ptr()
    })
    .unwrap_or(std::ptr::null())
}

/// The classes' names and hints as C strings, made once.
static CLASS_TEXT: Lazy<Vec<(CString, CString)>> = Lazy::new(|| {
    ClassCode::ALL
        .iter()
        .map(|c| {
            let (name, hint) = c.class().map_or(("none", ""), |k| (k.name(), k.hint()));
            (
                CString::new(name).unwrap_or_default(),
                CString::new(hint).unwrap_or_default(),
            )
        })
        .collect()
});

/// The name or hint of a class value, a static string; empty for an unknown value.
fn class_text(class: c_int, hint: bool) -> *const c_char {
    catch_unwind(|| {
        ClassCode::ALL
            .iter()
            .position(|c| *c as c_int == class)
            .map_or(c"".as_ptr(), |i| {
                let (name, text) = &CLASS_TEXT[i];
                if hint {
                    text.as_ptr()
                } else {
                    name.as_ptr()
                }
            })
    })
    .unwrap_or(std::ptr::null())
}

/// `const char *p2pcheck_class_name(p2pcheck_class)`: `"never-written"`, ..., `"none"`.
#[no_mangle]
pub extern "C" fn p2pcheck_class_name(class: c_int) -> *const c_char {
    class_text(class, false)
}

/// `const char *p2pcheck_class_hint(p2pcheck_class)`: what usually causes the class.
#[no_mangle]
pub extern "C" fn p2pcheck_class_hint(class: c_int) -> *const c_char {
    class_text(class, true)
}

/// `p2pcheck_options *p2pcheck_options_new(void)`: the default options.
#[no_mangle]
pub extern "C" fn p2pcheck_options_new() -> *mut OptionsHandle {
    catch_unwind(|| Handle::into_raw(Mutex::new(Options::default())))
        .unwrap_or(std::ptr::null_mut())
}

/// `void p2pcheck_options_free(p2pcheck_options *)`; NULL is ignored.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`, not used again.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_free(opts: *mut OptionsHandle) {
    // SAFETY: the caller's promise.
    unsafe { free(opts, drop) }
}

/// Changes the options of `h` with `change`, keeping them only if they validate.
fn update(
    h: Option<&OptionsHandle>,
    msg: TextBuf,
    change: impl FnOnce(&mut Options) -> Result<(), Failure>,
) -> Status {
    guard(msg, || {
        let mut current = lock(required(h, "opts")?);
        let mut next = current.clone();
        change(&mut next)?;
        next.validate()?;
        *current = next;
        Ok(Status::Ok)
    })
}

/// `p2pcheck_options_set_engine(opts, engine, msg, msg_len)`.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_engine(
    opts: *mut OptionsHandle,
    engine: c_int,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, msg) = unsafe { (opts.as_ref(), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        o.engine = match engine {
            0 => Engine::Parallel,
            1 => Engine::Vllm,
            e => {
                return Err(Failure::invalid(format!(
                    "engine {e}: P2PCHECK_ENGINE_PARALLEL (0) or P2PCHECK_ENGINE_VLLM (1)"
                )))
            }
        };
        Ok(())
    })
}

/// `p2pcheck_options_set_level(opts, level, msg, msg_len)`.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_level(
    opts: *mut OptionsHandle,
    level: c_int,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, msg) = unsafe { (opts.as_ref(), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        o.level = *usize::try_from(level)
            .ok()
            .and_then(|i| Level::ALL.get(i))
            .ok_or_else(|| {
                Failure::invalid(format!(
                    "level {level}: P2PCHECK_LEVEL_COPY (0), P2PCHECK_LEVEL_KERNEL (1) or \
                     P2PCHECK_LEVEL_HANDSHAKE (2)"
                ))
            })?;
        Ok(())
    })
}

/// `p2pcheck_options_set_visibility(opts, visibility, msg, msg_len)`.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_visibility(
    opts: *mut OptionsHandle,
    visibility: c_int,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, msg) = unsafe { (opts.as_ref(), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        o.visibility = match visibility {
            0 => Visibility::One,
            1 => Visibility::All,
            v => {
                return Err(Failure::invalid(format!(
                    "visibility {v}: P2PCHECK_VISIBILITY_ONE (0) or P2PCHECK_VISIBILITY_ALL (1)"
                )))
            }
        };
        Ok(())
    })
}

/// `p2pcheck_options_set_transport(opts, transport, msg, msg_len)`: which transports every
/// tier runs over ([`Transports`]: 0 ipc, 1 cumem, 2 all).
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_transport(
    opts: *mut OptionsHandle,
    transport: c_int,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, msg) = unsafe { (opts.as_ref(), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        o.transport = TransportsCode::from_c(transport).ok_or_else(|| {
            Failure::invalid(format!(
                "transport {transport}: P2PCHECK_TRANSPORTS_IPC (0), \
                     P2PCHECK_TRANSPORTS_CUMEM (1) or P2PCHECK_TRANSPORTS_ALL (2)"
            ))
        })?;
        Ok(())
    })
}

/// `p2pcheck_options_set_timeouts_ms(opts, step_ms, startup_ms, msg, msg_len)`: 0 keeps a
/// value; each must be from 1 ms to 1 day.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_timeouts_ms(
    opts: *mut OptionsHandle,
    step_ms: u64,
    startup_ms: u64,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, msg) = unsafe { (opts.as_ref(), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        if step_ms > 0 {
            o.step_timeout = Duration::from_millis(step_ms);
        }
        if startup_ms > 0 {
            o.startup_timeout = Duration::from_millis(startup_ms);
        }
        Ok(())
    })
}

/// `p2pcheck_options_set_kernel_bytes(opts, bytes, msg, msg_len)`.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_kernel_bytes(
    opts: *mut OptionsHandle,
    bytes: u32,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, msg) = unsafe { (opts.as_ref(), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        o.kernel_bytes = bytes;
        Ok(())
    })
}

/// `p2pcheck_options_set_bandwidth(opts, on, transfer_bytes, min_gbps, msg, msg_len)`: the
/// bandwidth measurement on or off, its transfer size (0: the default) and the caller's floor
/// (0: the link's).
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_bandwidth(
    opts: *mut OptionsHandle,
    on: bool,
    transfer_bytes: u32,
    min_gbps: f64,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, msg) = unsafe { (opts.as_ref(), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        o.bandwidth = on;
        o.bandwidth_bytes = match transfer_bytes {
            0 => DEFAULT_BANDWIDTH_BYTES,
            b => b,
        };
        o.min_gbps = (min_gbps != 0.0).then_some(min_gbps);
        Ok(())
    })
}

/// `p2pcheck_options_set_worker(opts, path, msg, msg_len)`: NULL searches as the header says.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `path` is NULL or a NUL-terminated string;
/// `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_worker(
    opts: *mut OptionsHandle,
    path: *const c_char,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, path, msg) = unsafe { (opts.as_ref(), path_arg(path), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(Failure::invalid(
                "the worker path is empty: give a path, or NULL to search",
            ));
        }
        o.worker = path;
        Ok(())
    })
}

/// `p2pcheck_options_set_simulation(opts, gpus, faults, msg, msg_len)`: `gpus` 0 with no
/// faults turns the simulation off.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `faults` is NULL or a NUL-terminated string;
/// `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_options_set_simulation(
    opts: *mut OptionsHandle,
    gpus: u32,
    faults: *const c_char,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, spec, msg) = unsafe { (opts.as_ref(), c_str(faults), TextBuf::new(msg, msg_len)) };
    update(opts, msg, |o| {
        if gpus > p2pcheck::sim::MAX_GPUS {
            return Err(Failure::invalid(format!(
                "{gpus} simulated GPUs: at most {}",
                p2pcheck::sim::MAX_GPUS
            )));
        }
        let spec = match spec {
            None => "",
            Some(s) => s
                .to_str()
                .map_err(|_| Failure::invalid("the faults are not UTF-8 text"))?,
        };
        let faults = spec
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(str::parse::<Fault>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Failure::invalid(format!("{e:#}")))?;
        o.simulate = match (gpus, faults.is_empty()) {
            (0, true) => None,
            (0, false) => {
                return Err(Failure::invalid(
                    "faults without simulated GPUs: give their number",
                ))
            }
            (gpus, _) => Some(Simulation { gpus, faults }),
        };
        Ok(())
    })
}

/// `p2pcheck_check(opts, src, tgt, n_pairs, out, msg, msg_len)`: the whole check.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `src` and `tgt` are NULL or valid for reads of
/// `n_pairs` elements; `out` is NULL or valid for a write; `msg` is NULL or valid for `msg_len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_check(
    opts: *const OptionsHandle,
    src: *const u32,
    tgt: *const u32,
    n_pairs: usize,
    out: *mut *mut ReportHandle,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, out, msg) = unsafe { (opts.as_ref(), Out::new(out), TextBuf::new(msg, msg_len)) };
    out.clear();
    guard(msg, || {
        // SAFETY: the caller's promise about src, tgt and n_pairs.
        let (s, t) = unsafe { (devices(src, n_pairs, "src")?, devices(tgt, n_pairs, "tgt")?) };
        out.required("out")?;
        let report = p2pcheck::check(batch(s, t).as_deref(), &options_or_default(opts)?)?;
        give_report(&out, report)
    })
}

/// `void p2pcheck_report_free(p2pcheck_report *)`; NULL is ignored.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`, not used again.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_free(report: *mut ReportHandle) {
    // SAFETY: the caller's promise.
    unsafe { free(report, drop) }
}

/// Runs a report accessor: the report of `h`, the status of `body`.
fn with_report(
    h: Option<&ReportHandle>,
    body: impl FnOnce(&Report) -> Result<Status, Failure>,
) -> Status {
    guard(TextBuf::none(), || body(required(h, "report")?))
}

/// Position `i` of a list of `len`, or `InvalidArgument`.
fn in_range(i: usize, len: usize, what: &str) -> Result<usize, Failure> {
    if i < len {
        Ok(i)
    } else {
        Err(Failure::invalid(format!(
            "{what} {i} out of range: there are {len}"
        )))
    }
}

/// `p2pcheck_report_device_count(report, out)`.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_device_count(
    report: *const ReportHandle,
    out: *mut u32,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| out.put("out", r.device_count))
}

/// `p2pcheck_report_pair_count(report, out)`.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_pair_count(
    report: *const ReportHandle,
    out: *mut usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| out.put("out", r.pairs.len()))
}

/// `p2pcheck_report_pair(report, index, out)`: pair `index` as plain data.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_pair(
    report: *const ReportHandle,
    index: usize,
    out: *mut PairResult,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| {
        let i = in_range(index, r.pairs.len(), "pair")?;
        out.put("out", PairResult::of(&r.pairs[i]))
    })
}

/// `p2pcheck_report_pair_transport(report, index, out)`: the transport pair `index` was
/// checked over (0 ipc, 1 cumem).
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_pair_transport(
    report: *const ReportHandle,
    index: usize,
    out: *mut c_int,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| {
        let i = in_range(index, r.pairs.len(), "pair")?;
        out.put("out", TransportCode::of(r.pairs[i].transport) as c_int)
    })
}

/// `p2pcheck_report_pair_bandwidth(report, index, out)`: pair `index`'s bandwidth
/// measurement as plain data (state 0 when it was not measured: over the cuMem transport
/// never, the measurement goes through the legacy IPC mapping).
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_pair_bandwidth(
    report: *const ReportHandle,
    index: usize,
    out: *mut BandwidthResult,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| {
        let i = in_range(index, r.pairs.len(), "pair")?;
        let p = &r.pairs[i];
        let measured = match p.transport {
            Transport::Ipc => r.bandwidth_of(p.pair.src, p.pair.tgt),
            _ => None,
        };
        out.put("out", BandwidthResult::of(measured))
    })
}

/// `p2pcheck_report_pair_details(report, index, buf, len, needed)`: what was seen, one line
/// per detail.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `buf` is NULL or valid for `len` bytes;
/// `needed` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_pair_details(
    report: *const ReportHandle,
    index: usize,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, buf, needed) =
        unsafe { (report.as_ref(), TextBuf::new(buf, len), Out::new(needed)) };
    with_report(report, |r| {
        let i = in_range(index, r.pairs.len(), "pair")?;
        buf.output(needed, r.pairs[i].details().join("\n").as_bytes())
    })
}

/// `p2pcheck_report_answer_seconds(report, out)`.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_answer_seconds(
    report: *const ReportHandle,
    out: *mut f64,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| out.put("out", r.answer.as_secs_f64()))
}

/// `p2pcheck_report_restarts(report, out)`.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_restarts(
    report: *const ReportHandle,
    out: *mut u32,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| out.put("out", r.restarts))
}

/// `p2pcheck_report_workers_started(report, out)`.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_workers_started(
    report: *const ReportHandle,
    out: *mut u32,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| out.put("out", r.workers_started))
}

/// `p2pcheck_report_warning_count(report, out)`.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_warning_count(
    report: *const ReportHandle,
    out: *mut usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, out) = unsafe { (report.as_ref(), Out::new(out)) };
    with_report(report, |r| out.put("out", r.warnings.len()))
}

/// `p2pcheck_report_warning(report, index, buf, len, needed)`.
///
/// # Safety
/// `report` is NULL or a live `p2pcheck_report`; `buf` is NULL or valid for `len` bytes;
/// `needed` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_report_warning(
    report: *const ReportHandle,
    index: usize,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (report, buf, needed) =
        unsafe { (report.as_ref(), TextBuf::new(buf, len), Out::new(needed)) };
    with_report(report, |r| {
        let i = in_range(index, r.warnings.len(), "warning")?;
        buf.output(needed, r.warnings[i].as_bytes())
    })
}

/// `p2pcheck_can_actually_p2p(opts, src, tgt, n, results, msg, msg_len)`: vLLM's function.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `src` and `tgt` are NULL or valid for reads of
/// `n` elements, `results` for writes of `n`; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_can_actually_p2p(
    opts: *const OptionsHandle,
    src: *const u32,
    tgt: *const u32,
    n: usize,
    results: *mut bool,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, msg) = unsafe { (opts.as_ref(), TextBuf::new(msg, msg_len)) };
    guard(msg, || {
        // SAFETY: the caller's promise about src, tgt and n.
        let (s, t) = unsafe { (devices(src, n, "src")?, devices(tgt, n, "tgt")?) };
        if n == 0 {
            return Ok(Status::Ok);
        }
        if results.is_null() {
            return Err(Failure::null("results"));
        }
        let report = p2pcheck::can_actually_p2p_with(s, t, &options_or_default(opts)?)?;
        // SAFETY: not NULL, and the caller's promise of n writable elements (n is bounded by
        // devices() above).
        let results = unsafe { std::slice::from_raw_parts_mut(results, n) };
        for (r, p) in results.iter_mut().zip(report.primary()) {
            *r = p.ok();
        }
        Ok(Status::Ok)
    })
}

/// `p2pcheck_gpu_p2p_access_check(src, tgt, result, msg, msg_len)`: vLLM's function.
///
/// # Safety
/// `result` is NULL or valid for a write; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_gpu_p2p_access_check(
    src: u32,
    tgt: u32,
    result: *mut bool,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (result, msg) = unsafe { (Out::new(result), TextBuf::new(msg, msg_len)) };
    guard(msg, || {
        result.required("result")?;
        result.put("result", p2pcheck::gpu_p2p_access_check(src, tgt)?)
    })
}

/// `p2pcheck_access_check_with(opts, cache_dir, refresh, src, tgt, result, msg, msg_len)`.
///
/// # Safety
/// `opts` is NULL or a live `p2pcheck_options`; `cache_dir` is NULL or a NUL-terminated
/// string; `result` is NULL or valid for a write; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // the header's signature
pub unsafe extern "C" fn p2pcheck_access_check_with(
    opts: *const OptionsHandle,
    cache_dir: *const c_char,
    refresh: bool,
    src: u32,
    tgt: u32,
    result: *mut bool,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, cache_dir, result, msg) = unsafe {
        (
            opts.as_ref(),
            path_arg(cache_dir),
            Out::new(result),
            TextBuf::new(msg, msg_len),
        )
    };
    guard(msg, || {
        result.required("result")?;
        let access = AccessOptions {
            check: options_or_default(opts)?,
            cache_dir: cache_folder(cache_dir)?,
            refresh,
            ..AccessOptions::default()
        };
        result.put("result", p2pcheck::access_check(src, tgt, &access)?.answer)
    })
}

/// `p2pcheck_cache_path(n_devices, cache_dir, buf, len, needed, msg, msg_len)`: vLLM's cache
/// file for `n_devices` and this process's `CUDA_VISIBLE_DEVICES`.
///
/// # Safety
/// `cache_dir` is NULL or a NUL-terminated string; `buf` is NULL or valid for `len` bytes;
/// `needed` is NULL or valid for a write; `msg` is NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_cache_path(
    n_devices: u32,
    cache_dir: *const c_char,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (cache_dir, buf, needed, msg) = unsafe {
        (
            path_arg(cache_dir),
            TextBuf::new(buf, len),
            Out::new(needed),
            TextBuf::new(msg, msg_len),
        )
    };
    guard(msg, || {
        if n_devices == 0 || n_devices > MAX_DEVICES {
            return Err(Failure::invalid(format!(
                "{n_devices} devices: from 1 to {MAX_DEVICES}"
            )));
        }
        let path = match cache_folder(cache_dir)? {
            Some(dir) => p2pcheck::vllm_cache_path_in(&dir, n_devices)?,
            None => p2pcheck::vllm_cache_path(n_devices)?,
        };
        buf.output(needed, path.as_os_str().as_bytes())
    })
}

/// `p2pcheck_start(opts, src, tgt, n_pairs, out, msg, msg_len)`: the check in the background.
///
/// # Safety
/// As [`p2pcheck_check`].
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_start(
    opts: *const OptionsHandle,
    src: *const u32,
    tgt: *const u32,
    n_pairs: usize,
    out: *mut *mut PendingHandle,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (opts, out, msg) = unsafe { (opts.as_ref(), Out::new(out), TextBuf::new(msg, msg_len)) };
    out.clear();
    guard(msg, || {
        // SAFETY: the caller's promise about src, tgt and n_pairs.
        let (s, t) = unsafe { (devices(src, n_pairs, "src")?, devices(tgt, n_pairs, "tgt")?) };
        out.required("out")?;
        let opts = options_or_default(opts)?;
        out.put("out", Handle::into_raw(p2pcheck::start(batch(s, t), opts)))
    })
}

/// Waits at most `timeout` for a background check's result and hands C a copy of it: a new
/// report, or the check's error (the same each time); `NotReady` if it still runs then.
fn wait_for(
    h: Option<&PendingHandle>,
    timeout: Duration,
    out: Out<*mut ReportHandle>,
    msg: TextBuf,
) -> Status {
    out.clear();
    guard(msg, || {
        let pending = required(h, "pending")?;
        out.required("out")?;
        match pending.wait_timeout(timeout) {
            Some(result) => give_report(&out, result?),
            None => Err(Failure::new(Status::NotReady, "the check is still running")),
        }
    })
}

/// `p2pcheck_pending_try_wait(pending, out, msg, msg_len)`: the result if the check has
/// ended, else `NotReady`.
///
/// # Safety
/// `pending` is NULL or a live `p2pcheck_pending`; `out` is NULL or valid for a write; `msg` is
/// NULL or valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_pending_try_wait(
    pending: *mut PendingHandle,
    out: *mut *mut ReportHandle,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (pending, out, msg) =
        unsafe { (pending.as_ref(), Out::new(out), TextBuf::new(msg, msg_len)) };
    wait_for(pending, Duration::ZERO, out, msg)
}

/// `p2pcheck_pending_wait_ms(pending, timeout_ms, out, msg, msg_len)`: waits at most
/// `timeout_ms` milliseconds for the result, else `NotReady`.
///
/// # Safety
/// As [`p2pcheck_pending_try_wait`].
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_pending_wait_ms(
    pending: *mut PendingHandle,
    timeout_ms: u64,
    out: *mut *mut ReportHandle,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (pending, out, msg) =
        unsafe { (pending.as_ref(), Out::new(out), TextBuf::new(msg, msg_len)) };
    wait_for(pending, Duration::from_millis(timeout_ms), out, msg)
}

/// `p2pcheck_pending_wait(pending, out, msg, msg_len)`: waits for the result.
///
/// # Safety
/// As [`p2pcheck_pending_try_wait`].
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_pending_wait(
    pending: *mut PendingHandle,
    out: *mut *mut ReportHandle,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (pending, out, msg) =
        unsafe { (pending.as_ref(), Out::new(out), TextBuf::new(msg, msg_len)) };
    wait_for(pending, Duration::MAX, out, msg)
}

/// `p2pcheck_pending_cancel(pending)`: stops the check; never blocks.
///
/// # Safety
/// `pending` is NULL or a live `p2pcheck_pending`.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_pending_cancel(pending: *mut PendingHandle) -> Status {
    // SAFETY: the caller's promise.
    let pending = unsafe { pending.as_ref() };
    guard(TextBuf::none(), || {
        required(pending, "pending")?.cancel();
        Ok(Status::Ok)
    })
}

/// `void p2pcheck_pending_free(p2pcheck_pending *)`: cancels the check if it has no result yet
/// and waits until every worker is reaped; NULL is ignored.
///
/// # Safety
/// `pending` is NULL or a live `p2pcheck_pending`, not used again.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_pending_free(pending: *mut PendingHandle) {
    // SAFETY: the caller's promise.
    unsafe {
        free(pending, |p| {
            p.finish();
        })
    }
}

/// `bool p2pcheck_should_nccl_symm_mem_allreduce(world_size, nbytes, batch_invariant,
/// symm_mem_enabled)`: [`policy::should_nccl_symm_mem_allreduce`].
#[no_mangle]
pub extern "C" fn p2pcheck_should_nccl_symm_mem_allreduce(
    world_size: u32,
    nbytes: u64,
    batch_invariant: bool,
    symm_mem_enabled: bool,
) -> bool {
    let config = PolicyConfig {
        batch_invariant,
        symm_mem_enabled,
    };
    catch_unwind(|| policy::should_nccl_symm_mem_allreduce(world_size, nbytes, &config))
        .unwrap_or(false)
}

/// A max-size table lookup into `out`: `NotFound` without an entry.
fn max_size(
    lookup: fn(ComputeCapability, u32) -> Option<u64>,
    cc: ComputeCapability,
    world_size: u32,
    out: Out<u64>,
) -> Status {
    guard(TextBuf::none(), || {
        out.required("out")?;
        match lookup(cc, world_size) {
            Some(bytes) => out.put("out", bytes),
            None => Err(Failure::new(Status::NotFound, "no entry")),
        }
    })
}

/// `p2pcheck_custom_allreduce_max_size(major, minor, world_size, out)`:
/// [`policy::custom_allreduce_max_size`].
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_custom_allreduce_max_size(
    major: u32,
    minor: u32,
    world_size: u32,
    out: *mut u64,
) -> Status {
    // SAFETY: the caller's promise.
    let out = unsafe { Out::new(out) };
    let cc = ComputeCapability::new(major, minor);
    max_size(policy::custom_allreduce_max_size, cc, world_size, out)
}

/// `p2pcheck_symm_mem_max_size(major, minor, world_size, out)`: [`policy::symm_mem_max_size`].
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_symm_mem_max_size(
    major: u32,
    minor: u32,
    world_size: u32,
    out: *mut u64,
) -> Status {
    // SAFETY: the caller's promise.
    let out = unsafe { Out::new(out) };
    let cc = ComputeCapability::new(major, minor);
    max_size(policy::symm_mem_max_size, cc, world_size, out)
}

/// `p2pcheck_policy_config_from_env(batch_invariant, symm_mem_enabled, msg, msg_len)`:
/// [`PolicyConfig::from_env`].
///
/// # Safety
/// `batch_invariant` and `symm_mem_enabled` are NULL or valid for a write; `msg` is NULL or
/// valid for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn p2pcheck_policy_config_from_env(
    batch_invariant: *mut bool,
    symm_mem_enabled: *mut bool,
    msg: *mut c_char,
    msg_len: usize,
) -> Status {
    // SAFETY: the caller's promises.
    let (batch, symm, msg) = unsafe {
        (
            Out::new(batch_invariant),
            Out::new(symm_mem_enabled),
            TextBuf::new(msg, msg_len),
        )
    };
    guard(msg, || {
        batch.required("batch_invariant")?;
        symm.required("symm_mem_enabled")?;
        let config = PolicyConfig::from_env().map_err(|e| Failure::invalid(format!("{e:#}")))?;
        batch.put("batch_invariant", config.batch_invariant)?;
        symm.put("symm_mem_enabled", config.symm_mem_enabled)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(buf: &[u8]) -> &str {
        CStr::from_bytes_until_nul(buf).unwrap().to_str().unwrap()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let mut buf = [0xffu8; 200];
        // SAFETY: buf is valid for its length.
        let msg = unsafe { TextBuf::new(buf.as_mut_ptr().cast(), buf.len()) };
        let status = guard(msg, || -> Result<Status, Failure> { panic!("planted") });
        assert_eq!(status, Status::Panic);
        assert_eq!(
            text_of(&buf),
            "internal error in p2pcheck (a bug), caught at the C boundary: planted"
        );
        // A handle whose lock a panic poisoned is still usable.
        let h: OptionsHandle = Handle {
            owner: ProcessOwner::current(),
            value: Mutex::new(Options::default()),
        };
        let status = update(Some(&h), TextBuf::none(), |_| panic!("inside the lock"));
        assert_eq!(status, Status::Panic);
        let status = update(Some(&h), TextBuf::none(), |o| {
            o.kernel_bytes = 256 << 10;
            Ok(())
        });
        assert_eq!(status, Status::Ok);
        assert_eq!(lock(&h.value).kernel_bytes, 256 << 10);
    }

    #[test]
    fn texts_are_cut_at_character_boundaries() {
        let text = "ab\u{e9}c".as_bytes(); // a b 0xc3 0xa9 c
        for (len, expected, fits) in [
            (0, None, false),
            (1, Some(""), false),
            (3, Some("ab"), false),
            (4, Some("ab"), false),
            (5, Some("ab\u{e9}"), false),
            (6, Some("ab\u{e9}c"), true),
            (9, Some("ab\u{e9}c"), true),
        ] {
            let mut buf = [0xffu8; 10];
            // SAFETY: len <= buf.len().
            let all = unsafe { TextBuf::new(buf.as_mut_ptr().cast(), len) }.write(text);
            assert_eq!(all, fits, "{len}");
            match expected {
                None => assert_eq!(buf, [0xff; 10]),
                Some(e) => {
                    assert_eq!(text_of(&buf), e, "{len}");
                    assert!(buf[e.len() + 1..].iter().all(|&b| b == 0xff), "{len}");
                }
            }
        }
        assert!(!TextBuf::none().write(text));
    }

    #[test]
    fn every_error_has_its_status() {
        let cases = [
            (
                Error::WorkerNotFound {
                    tried: vec!["w".into()],
                },
                Status::Worker,
            ),
            (Error::GaveUp { rounds: 3 }, Status::Worker),
            (Error::NoDevice("n".into()), Status::NoDevice),
            (Error::InvalidInput("i".into()), Status::InvalidArgument),
            (Error::Cancelled, Status::Cancelled),
            (
                Error::Version {
                    worker: "w".into(),
                    theirs: 1,
                },
                Status::Version,
            ),
            (
                Error::Cache {
                    path: "p".into(),
                    kind: p2pcheck::CacheErrorKind::BadPath("m".into()),
                },
                Status::Cache,
            ),
        ];
        for (e, s) in cases {
            assert_eq!(Status::of(&e), s, "{e}");
        }
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert!(!s.text().to_bytes().is_empty());
        }
    }

    #[test]
    fn a_path_argument_keeps_its_bytes() {
        let raw = b"/tmp/\xff\xfe\0";
        // SAFETY: raw is NUL-terminated.
        let p = unsafe { path_arg(raw.as_ptr().cast()) }.unwrap();
        assert_eq!(p.as_os_str().as_bytes(), b"/tmp/\xff\xfe");
        // SAFETY: NULL is allowed.
        assert!(unsafe { path_arg(std::ptr::null()) }.is_none());
    }
}

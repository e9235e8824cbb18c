//! The audit trace: one JSON object per line for every CUDA call of every process of a check
//! (`P2PCHECK_TRACE`, which the workers inherit, or the check's `Options::trace` / the CLI's
//! `--trace PATH`, which the parent opens and hands to each worker in its environment).
//!
//! * unset, empty or `0`: off;
//! * `1`: the lines go to stderr (each with one `write(2)`, so lines of the processes sharing
//!   that stderr never interleave within a line);
//! * anything else: a file, opened once per process with `O_WRONLY|O_APPEND|O_CREAT|O_CLOEXEC`
//!   (mode 0600 when it is created); the parent and every worker append to it. Only a regular
//!   file is used ([`crate::files::open_regular`]): a FIFO would block `open(2)` until a reader
//!   came, and every write once its reader stopped reading; a device is no record.
//!
//! A line (fields in this order; see README "Audit trace"): `ts_us` (the call's start,
//! microseconds since the Unix epoch), `dur_us` (`null` for the driver calls a shim kernel
//! launch made: the shim does not time them one by one), `pid`, `role` (`parent`, `worker`,
//! `producer`, `consumer`), `part` (in words: `vLLM producer`, `worker of device 0`, ...), `job`
//! (`{index, src, tgt, role, tier}` or `null` outside a job), `call`, for a shim's inner calls
//! `via` (the shim function) and `seq` (1, 2, ... within it), `api` (`driver`, `runtime`,
//! `shim`), `device` (the device the call concerns, or `null`), `args`, `code`, `name` (CUDA's
//! name for the code) and, for a call that succeeded and returned values through
//! out-parameters, `out`.
//!
//! Off costs nothing that can be measured: [`start`] is one atomic load and a branch, and the
//! closure that describes a call's arguments is neither built nor called (see the `#[ignore]`d
//! benchmark `trace_off_costs_nothing_measurable` below for numbers).

use std::cell::Cell;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use once_cell::sync::OnceCell;

use super::Library;
use crate::json::{Json, Object};

/// The job a thread's calls belong to, as plain values set by its caller (the worker): the
/// pair's position in its batch, the pair, the role and the tier, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JobContext {
    /// Position of the pair in the batch.
    pub(crate) index: u32,
    /// The device that owns the memory.
    pub(crate) src: u32,
    /// The device that maps it.
    pub(crate) tgt: u32,
    /// `producer` or `consumer`.
    pub(crate) role: &'static str,
    /// `copy`, `kernel` or `handshake`.
    pub(crate) tier: &'static str,
    /// `cumem` for the cuMem transport; `None` for legacy IPC (written only when set, so a
    /// legacy check's trace reads as before).
    pub(crate) transport: Option<&'static str>,
}

/// The variable that turns the trace on: `1` (stderr) or a file path.
pub(crate) const VAR: &str = "P2PCHECK_TRACE";

/// The longest line written. Lines are far shorter by construction (every field is bounded:
/// the two free texts, `part` and `name`, are cut at [`MAX_TEXT`] bytes); a longer one loses
/// its `args` and `out`. Under `PIPE_BUF` (4096), so that even to a pipe (stderr) one write is
/// atomic.
const MAX_LINE: usize = 4000;
/// The longest `part` or error `name` kept.
const MAX_TEXT: usize = 160;

/// Where the trace goes, from the value of [`VAR`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Setting {
    /// Unset, empty or `0`.
    Off,
    /// `1`: stderr.
    Stderr,
    /// Anything else: this file, appended to.
    File(PathBuf),
}

impl Setting {
    /// The setting a value of [`VAR`] asks for.
    pub(crate) fn from_value(value: Option<&OsStr>) -> Setting {
        match value {
            None => Setting::Off,
            Some(v) if v.is_empty() || v == OsStr::new("0") => Setting::Off,
            Some(v) if v == OsStr::new("1") => Setting::Stderr,
            Some(v) => Setting::File(PathBuf::from(v)),
        }
    }
}

/// An open trace destination, one per process.
enum Sink {
    Stderr,
    File(File),
}

/// Warns once per process on stderr (a trace that cannot be written must not go unnoticed, nor
/// flood stderr).
fn warn_once(message: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        let line = format!("p2pcheck (pid {}): {message}\n", std::process::id());
        let _ = std::io::stderr().write(line.as_bytes());
    }
}

impl Sink {
    /// The destination `setting` names, opened; `Err` says which file could not be used, and
    /// why.
    fn open(setting: Setting) -> Result<Option<Sink>, String> {
        match setting {
            Setting::Off => Ok(None),
            Setting::Stderr => Ok(Some(Sink::Stderr)),
            Setting::File(path) => {
                // append(true) is O_WRONLY|O_APPEND; O_CLOEXEC so that nothing this process
                // starts inherits the descriptor (a worker opens the file itself).
                let mut options = OpenOptions::new();
                options.append(true).create(true).mode(0o600);
                crate::files::open_regular(&path, &mut options)
                    .map(|f| Some(Sink::File(f)))
                    .map_err(|e| {
                        let hint = match e.kind() {
                            io::ErrorKind::InvalidInput => {
                                format!(" ({VAR}=1 sends the trace to stderr)")
                            }
                            _ => String::new(),
                        };
                        format!("cannot use the trace file {}: {e}{hint}", path.display())
                    })
            }
        }
    }

    /// Writes one whole line with ONE `write(2)`. Several processes append to the same file
    /// (or share stderr): `write_all`, which may split a line into several writes when one is
    /// short, could let another process's line land in the middle of ours. An `O_APPEND` write
    /// of a whole buffer to a regular file on a local file system is atomic with respect to
    /// other such writes (the kernel holds the inode's lock for the seek-to-end and the copy),
    /// and a write of at most `PIPE_BUF` bytes to a pipe is atomic too ([`MAX_LINE`] is below
    /// it). A short write is reported, never completed by a second write.
    fn write_line(&self, line: &[u8]) {
        let written = match self {
            Sink::Stderr => std::io::stderr().write(line),
            Sink::File(f) => (&*f).write(line),
        };
        match written {
            Ok(n) if n == line.len() => {}
            Ok(n) => warn_once(&format!(
                "a trace line was cut short ({n} of {} bytes written)",
                line.len()
            )),
            Err(e) => warn_once(&format!("cannot write the trace: {e}")),
        }
    }
}

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

/// The cached answer to "is the trace on?", read before anything else is done.
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static SINK: OnceCell<Option<Sink>> = OnceCell::new();

/// Whether the trace is on in this process (decided once, from [`VAR`], at first use).
#[inline]
pub(crate) fn enabled() -> bool {
    match STATE.load(Ordering::Acquire) {
        ON => true,
        OFF => false,
        _ => init(),
    }
}

/// The destination [`VAR`] names now.
fn setting_now() -> Setting {
    Setting::from_value(std::env::var_os(VAR).as_deref())
}

#[cold]
fn init() -> bool {
    let sink = SINK.get_or_init(|| {
        Sink::open(setting_now()).unwrap_or_else(|why| {
            warn_once(&format!("{why}; this process is not traced"));
            None
        })
    });
    let on = sink.is_some();
    STATE.store(if on { ON } else { OFF }, Ordering::Release);
    on
}

/// Opens this process's trace destination now, rather than at the first CUDA call: `file`, or
/// as `P2PCHECK_TRACE` names it when `None`. The CLI calls it before the check, so that a
/// destination that cannot be used (a missing folder, a FIFO, a device) is an error before
/// anything runs, not a warning. `Ok` when the trace is off or goes to stderr, or was already
/// decided in this process (once decided, it stays: a process has one destination).
///
/// # Errors
/// The file cannot be opened or created, or is not a regular file: the message names it and
/// says why.
pub fn open_destination(file: Option<&OsStr>) -> Result<(), String> {
    let setting = match file {
        Some(f) => Setting::File(PathBuf::from(f)),
        None => setting_now(),
    };
    let on = SINK.get_or_try_init(|| Sink::open(setting))?.is_some();
    STATE.store(if on { ON } else { OFF }, Ordering::Release);
    Ok(())
}

/// A process's role in the check, for the `role` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProcessRole {
    /// The process that runs the check (the CLI or the library's caller); the default.
    Parent,
    /// A worker before its engine is chosen, or a parallel-engine worker (producer and consumer
    /// by turns: each job says which).
    Worker,
    /// The vLLM engine's producer.
    Producer,
    /// The vLLM engine's consumer.
    Consumer,
}

impl ProcessRole {
    fn name(self) -> &'static str {
        match self {
            ProcessRole::Parent => "parent",
            ProcessRole::Worker => "worker",
            ProcessRole::Producer => "producer",
            ProcessRole::Consumer => "consumer",
        }
    }
}

/// This process's role and part (`None`: the parent).
static WHO: Mutex<Option<(ProcessRole, String)>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// The job the calls of this thread belong to.
    static JOB: Cell<Option<JobContext>> = const { Cell::new(None) };
}

/// Sets this process's role and its part in words (e.g. `worker of device 2`), for every line
/// that follows. Does nothing when the trace is off.
pub(crate) fn set_role(role: ProcessRole, part: &str) {
    if enabled() {
        *lock(&WHO) = Some((role, cut(part).to_string()));
    }
}

/// Sets the job this thread's calls belong to from now on (`None`: outside any job). Does
/// nothing when the trace is off.
pub(crate) fn set_job(job: Option<JobContext>) {
    if enabled() {
        JOB.with(|j| j.set(job));
    }
}

/// When a traced call started.
pub(crate) struct Start {
    wall_us: u64,
    at: Instant,
}

/// `Some` when the trace is on: the start of a call about to be made. Off, this is one atomic
/// load and a branch; no clock is read.
#[inline]
pub(crate) fn start() -> Option<Start> {
    if !enabled() {
        return None;
    }
    let wall_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    Some(Start {
        wall_us,
        at: Instant::now(),
    })
}

/// The members of one JSON object, written as they are added with the crate's JSON writer
/// (keys are this module's constants; values are numbers, strings or hex strings).
#[derive(Debug, Default)]
pub(crate) struct Fields(Object);

impl Fields {
    /// An unsigned number (sizes in bytes, seeds, counts).
    pub(crate) fn uint(&mut self, key: &str, value: u64) -> &mut Fields {
        self.0.uint(key, value);
        self
    }
    /// A signed number (device ordinals, C ints).
    pub(crate) fn int(&mut self, key: &str, value: i64) -> &mut Fields {
        self.0.int(key, value);
        self
    }
    /// A string, escaped (flag and kind names, kernel names).
    pub(crate) fn text(&mut self, key: &str, value: &str) -> &mut Fields {
        self.0.str(key, value);
        self
    }
    /// A pointer (device or host address) as `"0x…"`.
    pub(crate) fn ptr(&mut self, key: &str, address: u64) -> &mut Fields {
        self.0.str(key, &format!("0x{address:x}"));
        self
    }
    /// Bytes (an IPC handle) as one lowercase hex string.
    pub(crate) fn hex(&mut self, key: &str, bytes: &[u8]) -> &mut Fields {
        let mut hex = String::with_capacity(2 * bytes.len());
        for b in bytes {
            let _ = write!(hex, "{b:02x}");
        }
        self.0.str(key, &hex);
        self
    }
    /// `true` or `false`.
    pub(crate) fn flag(&mut self, key: &str, value: bool) -> &mut Fields {
        self.0.bool(key, value);
        self
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn object(&self) -> Json {
        self.0.finish()
    }
}

/// What a call's `fill` closure describes: its arguments, and what it returned through its
/// out-parameters (written only when the call succeeded).
#[derive(Debug, Default)]
pub(crate) struct Record {
    /// The call's arguments.
    pub(crate) args: Fields,
    /// Values returned through out-parameters.
    pub(crate) out: Fields,
}

/// Which code space a call's return code belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// The driver API (`CUresult`).
    Driver,
    /// The runtime API (`cudaError_t`).
    Runtime,
    /// A function of the C shim (its code is the first failing driver call's `CUresult`).
    Shim,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Driver => "driver",
            Api::Runtime => "runtime",
            Api::Shim => "shim",
        }
    }
    fn library(self) -> Library {
        match self {
            Api::Runtime => Library::Runtime,
            Api::Driver | Api::Shim => Library::Driver,
        }
    }
}

impl From<Library> for Api {
    fn from(library: Library) -> Api {
        match library {
            Library::Driver => Api::Driver,
            Library::Runtime => Api::Runtime,
        }
    }
}

/// CUDA's name for `code`: the success names without asking, else the library's own name for it
/// (asked without tracing: the look-up is the trace's, not a call of the check).
fn code_name(api: Api, code: i32) -> String {
    match (code, api.library()) {
        (0, Library::Driver) => "CUDA_SUCCESS".into(),
        (0, Library::Runtime) => "cudaSuccess".into(),
        (_, library) => cut(&super::error_name_untraced(library, code)).to_string(),
    }
}

/// `s` cut to at most [`MAX_TEXT`] bytes, on a character boundary.
fn cut(s: &str) -> &str {
    if s.len() <= MAX_TEXT {
        return s;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Everything one line says.
struct Line<'a> {
    ts_us: u64,
    dur_us: Option<u64>,
    pid: u32,
    role: ProcessRole,
    part: &'a str,
    job: Option<JobContext>,
    call: &'a str,
    /// For a shim's inner call: the shim function and the call's position in it.
    via: Option<(&'a str, usize)>,
    api: Api,
    device: Option<i32>,
    args: &'a Fields,
    code: i32,
    name: &'a str,
    /// Written when non-empty.
    out: Option<&'a Fields>,
}

fn job_json(job: Option<JobContext>) -> Json {
    match job {
        None => Json::null(),
        Some(j) => {
            let mut o = Object::new();
            o.uint("index", j.index.into())
                .uint("src", j.src.into())
                .uint("tgt", j.tgt.into())
                .str("role", j.role)
                .str("tier", j.tier);
            // Written only for the cuMem transport: a legacy check's trace reads as before.
            if let Some(t) = j.transport {
                o.str("transport", t);
            }
            o.finish()
        }
    }
}

impl Line<'_> {
    /// The line, newline included.
    fn to_json(&self) -> String {
        let out = self.out.filter(|o| !o.is_empty()).map(Fields::object);
        let text = self.format(&self.args.object(), out.as_ref());
        if text.len() <= MAX_LINE {
            return text;
        }
        let mut dropped = Fields::default();
        dropped.text("dropped", "args and out: the line would exceed 4000 bytes");
        self.format(&dropped.object(), None)
    }

    fn format(&self, args: &Json, out: Option<&Json>) -> String {
        let mut line = Object::new();
        line.uint("ts_us", self.ts_us)
            .opt_uint("dur_us", self.dur_us)
            .uint("pid", self.pid.into())
            .str("role", self.role.name())
            .str("part", self.part)
            .value("job", &job_json(self.job))
            .str("call", self.call);
        if let Some((via, seq)) = self.via {
            line.str("via", via).uint("seq", seq as u64);
        }
        line.str("api", self.api.name())
            .opt_int("device", self.device.map(i64::from))
            .value("args", args)
            .int("code", self.code.into())
            .str("name", self.name);
        if let Some(out) = out {
            line.value("out", out);
        }
        format!("{}\n", line.finish())
    }
}

/// Fills in who and which job, and writes the line.
fn emit(line: impl FnOnce(u32, ProcessRole, &str, Option<JobContext>) -> String) {
    let Some(sink) = SINK.get().and_then(Option::as_ref) else {
        return;
    };
    let (role, part) = match &*lock(&WHO) {
        Some((role, part)) => (*role, part.clone()),
        None => (ProcessRole::Parent, "parent".to_string()),
    };
    let job = JOB.with(Cell::get);
    let text = line(std::process::id(), role, &part, job);
    sink.write_line(text.as_bytes());
}

/// Writes the line of a call that started at `start` and returned `code`; `fill` describes its
/// arguments and out-values (only called here, so only when the trace is on).
pub(crate) fn record(
    start: &Start,
    api: Api,
    call: &str,
    device: Option<i32>,
    code: i32,
    fill: impl FnOnce(&mut Record),
) {
    let dur_us = u64::try_from(start.at.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut record = Record::default();
    fill(&mut record);
    let name = code_name(api, code);
    emit(|pid, role, part, job| {
        Line {
            ts_us: start.wall_us,
            dur_us: Some(dur_us),
            pid,
            role,
            part,
            job,
            call,
            via: None,
            api,
            device,
            args: &record.args,
            code,
            name: &name,
            out: (code == 0 && !record.out.is_empty()).then_some(&record.out),
        }
        .to_json()
    });
}

/// Writes the line of a driver call that the shim function `via` (started at `start`) made as
/// its `seq`-th call: its name and code are all the shim logs.
pub(crate) fn record_inner(
    start: &Start,
    via: &str,
    seq: usize,
    call: &str,
    device: Option<i32>,
    code: i32,
) {
    let name = code_name(Api::Driver, code);
    let args = Fields::default();
    emit(|pid, role, part, job| {
        Line {
            ts_us: start.wall_us,
            dur_us: None,
            pid,
            role,
            part,
            job,
            call,
            via: Some((via, seq)),
            api: Api::Driver,
            device,
            args: &args,
            code,
            name: &name,
            out: None,
        }
        .to_json()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_variable_means_off_stderr_or_a_file() {
        assert_eq!(Setting::from_value(None), Setting::Off);
        assert_eq!(Setting::from_value(Some(OsStr::new(""))), Setting::Off);
        assert_eq!(Setting::from_value(Some(OsStr::new("0"))), Setting::Off);
        assert_eq!(Setting::from_value(Some(OsStr::new("1"))), Setting::Stderr);
        assert_eq!(
            Setting::from_value(Some(OsStr::new("/tmp/t.jsonl"))),
            Setting::File("/tmp/t.jsonl".into())
        );
        assert_eq!(
            Setting::from_value(Some(OsStr::new("00"))),
            Setting::File("00".into())
        );
    }

    /// Opens `setting` in a thread, so that an open that blocked fails the test instead of
    /// hanging it.
    fn open_within_seconds(setting: Setting) -> Result<bool, String> {
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || send.send(Sink::open(setting).map(|s| s.is_some())));
        receive
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("opening the trace destination blocked")
    }

    #[test]
    fn only_a_regular_file_is_a_trace_destination_and_opening_never_blocks() {
        let dir = std::env::temp_dir().join(format!("p2pcheck-trace-dest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.jsonl");
        assert_eq!(open_within_seconds(Setting::File(file.clone())), Ok(true));
        assert!(file.is_file());
        let refused = |path: &Path, what: &str| {
            let err = open_within_seconds(Setting::File(path.to_path_buf())).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "cannot use the trace file {}: it is {what}, not a regular file \
                     (P2PCHECK_TRACE=1 sends the trace to stderr)",
                    path.display()
                )
            );
        };
        refused(Path::new("/dev/null"), "a character device");
        // mkfifo(3) would need `unsafe`, denied here; the mkfifo command makes the same FIFO.
        let fifo = dir.join("fifo");
        match std::process::Command::new("mkfifo").arg(&fifo).status() {
            Ok(status) if status.success() => {
                // Without a reader (a blocking open would wait for one for ever)...
                refused(&fifo, "a FIFO");
                // ...and with one (whose reading could stop and block every write).
                let _reader = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo)
                    .unwrap();
                refused(&fifo, "a FIFO");
            }
            other => eprintln!("FIFO cases skipped: no mkfifo command ({other:?})"),
        }
        let err = open_within_seconds(Setting::File(dir.clone())).unwrap_err();
        assert!(err.ends_with("Is a directory (os error 21)"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn job() -> JobContext {
        JobContext {
            index: 3,
            src: 1,
            tgt: 0,
            role: "consumer",
            tier: "copy",
            transport: None,
        }
    }

    #[test]
    fn a_runtime_call_reads_as_one_json_object() {
        let mut r = Record::default();
        r.args
            .hex("handle", &[0, 1, 0xab, 0xff])
            .text("flags", "cudaIpcMemLazyEnablePeerAccess");
        r.out.ptr("ptr", 0x7f00_dead_0000);
        let line = Line {
            ts_us: 1_764_000_000_000_001,
            dur_us: Some(16),
            pid: 42,
            role: ProcessRole::Consumer,
            part: "vLLM \"consumer\"",
            job: Some(job()),
            call: "cudaIpcOpenMemHandle",
            via: None,
            api: Api::Runtime,
            device: Some(0),
            args: &r.args,
            code: 0,
            name: "cudaSuccess",
            out: Some(&r.out),
        }
        .to_json();
        assert_eq!(
            line,
            "{\"ts_us\":1764000000000001,\"dur_us\":16,\"pid\":42,\"role\":\"consumer\",\
             \"part\":\"vLLM \\\"consumer\\\"\",\"job\":{\"index\":3,\"src\":1,\"tgt\":0,\
             \"role\":\"consumer\",\"tier\":\"copy\"},\"call\":\"cudaIpcOpenMemHandle\",\
             \"api\":\"runtime\",\"device\":0,\"args\":{\"handle\":\"0001abff\",\
             \"flags\":\"cudaIpcMemLazyEnablePeerAccess\"},\"code\":0,\"name\":\"cudaSuccess\",\
             \"out\":{\"ptr\":\"0x7f00dead0000\"}}\n"
        );
        assert!(crate::json::parse(line.trim_end()).is_ok());
    }

    /// Quotes, backslashes, control characters, a JSON-looking tail and non-ASCII.
    const HOSTILE: &str = "q\"b\\n\n\t\u{0}\u{1f}\"},{\"x\":[é€😀\u{2028}";

    #[test]
    fn hostile_text_in_every_string_still_makes_one_json_line() {
        let mut r = Record::default();
        r.args.text(HOSTILE, HOSTILE).int("device", -1);
        r.out.text("kernel", HOSTILE);
        let line = Line {
            ts_us: 1,
            dur_us: Some(2),
            pid: 3,
            role: ProcessRole::Worker,
            part: HOSTILE,
            job: Some(JobContext {
                role: HOSTILE,
                tier: HOSTILE,
                ..job()
            }),
            call: HOSTILE,
            via: Some((HOSTILE, 4)),
            api: Api::Shim,
            device: Some(-1),
            args: &r.args,
            code: -5,
            name: HOSTILE,
            out: Some(&r.out),
        }
        .to_json();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let Ok(crate::json::Value::Object(members)) = crate::json::parse(line.trim_end()) else {
            panic!("not one JSON object: {line}");
        };
        let text = |key: &str| {
            members
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let hostile = Some(crate::json::Value::String(HOSTILE.into()));
        for key in ["part", "call", "via", "name"] {
            assert_eq!(text(key), hostile, "{key}");
        }
        let Some(crate::json::Value::Object(args)) = text("args") else {
            panic!("args: {line}");
        };
        assert_eq!(
            args[0],
            (HOSTILE.into(), crate::json::Value::String(HOSTILE.into()))
        );
    }

    #[test]
    fn an_inner_call_has_via_and_seq_and_no_duration() {
        let args = Fields::default();
        let line = Line {
            ts_us: 7,
            dur_us: None,
            pid: 9,
            role: ProcessRole::Worker,
            part: "worker of device 0",
            job: None,
            call: "cuLaunchKernel",
            via: Some(("p2pc_pattern_store", 1)),
            api: Api::Driver,
            device: Some(2),
            args: &args,
            code: 700,
            name: "CUDA_ERROR_ILLEGAL_ADDRESS",
            out: None,
        }
        .to_json();
        assert_eq!(
            line,
            "{\"ts_us\":7,\"dur_us\":null,\"pid\":9,\"role\":\"worker\",\
             \"part\":\"worker of device 0\",\"job\":null,\"call\":\"cuLaunchKernel\",\
             \"via\":\"p2pc_pattern_store\",\"seq\":1,\"api\":\"driver\",\"device\":2,\
             \"args\":{},\"code\":700,\"name\":\"CUDA_ERROR_ILLEGAL_ADDRESS\"}\n"
        );
    }

    #[test]
    fn an_oversized_line_drops_its_args_and_stays_one_object() {
        let mut r = Record::default();
        r.args.hex("huge", &[0u8; 3000]);
        let line = Line {
            ts_us: 1,
            dur_us: Some(1),
            pid: 1,
            role: ProcessRole::Parent,
            part: "parent",
            job: None,
            call: "cuInit",
            via: None,
            api: Api::Driver,
            device: None,
            args: &r.args,
            code: 0,
            name: "CUDA_SUCCESS",
            out: None,
        }
        .to_json();
        assert!(line.len() < MAX_LINE, "{}", line.len());
        assert!(line
            .contains("\"args\":{\"dropped\":\"args and out: the line would exceed 4000 bytes\"}"));
        assert!(crate::json::parse(line.trim_end()).is_ok());
    }

    #[test]
    fn free_texts_are_cut_on_a_character_boundary() {
        let long = "é".repeat(200);
        let c = cut(&long);
        assert_eq!(c.len(), MAX_TEXT);
        assert_eq!(c.chars().count(), MAX_TEXT / 2);
        assert_eq!(cut("short"), "short");
    }

    /// Times 1,000,000 calls through the real traced path (`cuda::set_device`, the `cuda!` macro
    /// over the simulated runtime) with the trace off against the same function called bare
    /// through the same resolved pointer, and prints both. Run alone, in release:
    /// `cargo test --release --lib trace_off -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark: run with --ignored --nocapture, in release"]
    fn trace_off_costs_nothing_measurable() {
        // The simulated driver as build.rs left it (the crate embeds the same file).
        let lib = env!("P2PCHECK_SIM_LIB");
        std::env::set_var("P2PCHECK_LIBCUDA", lib);
        std::env::set_var("P2PCHECK_LIBCUDART", lib);
        std::env::set_var("P2PCHECK_SIM_GPUS", "1");
        STATE.store(OFF, Ordering::Release);
        assert!(start().is_none());
        super::super::init().unwrap();
        super::super::set_device(0).unwrap();
        let bare: crate::sys::p2pc_PFN_cudaSetDevice = super::super::resolve(
            Library::Runtime,
            {
                static C: OnceCell<super::super::Result<usize>> = OnceCell::new();
                &C
            },
            c"cudaSetDevice",
        )
        .unwrap();
        let bare = bare.unwrap();
        const N: u32 = 1_000_000;
        let (mut best_bare, mut best_traced) = (f64::MAX, f64::MAX);
        for _ in 0..7 {
            let t = Instant::now();
            for _ in 0..N {
                // SAFETY: the simulated runtime's cudaSetDevice; device 0 exists.
                let rc = unsafe { bare(std::hint::black_box(0)) };
                assert_eq!(rc, 0);
            }
            best_bare = best_bare.min(t.elapsed().as_nanos() as f64 / f64::from(N));
            let t = Instant::now();
            for _ in 0..N {
                super::super::set_device(std::hint::black_box(0)).unwrap();
            }
            best_traced = best_traced.min(t.elapsed().as_nanos() as f64 / f64::from(N));
        }
        println!(
            "1,000,000 x cudaSetDevice on the simulator, best of 7: bare {best_bare:.1} ns/call, \
             through cuda::set_device with the trace off {best_traced:.1} ns/call (difference \
             {:.1} ns)",
            best_traced - best_bare
        );
        // The trace's own part alone: start() and the `if let Some` around a function that does
        // nothing, against the bare function.
        #[inline(never)]
        fn nothing(x: i32) -> i32 {
            std::hint::black_box(x)
        }
        #[inline(never)]
        fn traced_nothing(x: i32) -> i32 {
            let started = start();
            let code = nothing(x);
            if let Some(s) = started {
                record(&s, Api::Runtime, "nothing", None, code, |t| {
                    t.args.int("x", i64::from(x));
                });
            }
            code
        }
        let (mut best_bare, mut best_traced) = (f64::MAX, f64::MAX);
        for _ in 0..7 {
            let t = Instant::now();
            for i in 0..N {
                std::hint::black_box(nothing(std::hint::black_box(i as i32)));
            }
            best_bare = best_bare.min(t.elapsed().as_nanos() as f64 / f64::from(N));
            let t = Instant::now();
            for i in 0..N {
                std::hint::black_box(traced_nothing(std::hint::black_box(i as i32)));
            }
            best_traced = best_traced.min(t.elapsed().as_nanos() as f64 / f64::from(N));
        }
        println!(
            "1,000,000 x an empty function, best of 7: bare {best_bare:.2} ns/call, with the \
             trace's check (off) {best_traced:.2} ns/call (difference {:.2} ns)",
            best_traced - best_bare
        );
    }
}

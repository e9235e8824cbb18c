//! Reading an audit trace (`P2PCHECK_TRACE=path`, `p2pcheck --trace PATH`; the format is in
//! README "Audit trace"): `p2pcheck trace-summary PATH [--spec]`.
//!
//! [`read`] streams the file line by line (a line longer than [`MAX_LINE_BYTES`] is malformed)
//! and keeps per process the calls in first-seen order with their counts and its failed calls;
//! [`Trace::summary`] prints them. Only a regular file is read, and every input is bounded, so
//! that neither a device (`/dev/zero`) nor a huge or hostile file can make it run or grow
//! without end: at most [`MAX_TRACE_BYTES`] are read and at most [`MAX_KEPT_BYTES`] are kept,
//! each with an error naming the limit, and no step costs more than a hash look-up per line.
//! [`Trace::check_spec`] compares a trace of `--engine vllm --level copy` with SPEC section 2's
//! sequence pair by pair, and names every difference.
//! Nothing here panics on any input: a malformed line is reported with its line number.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{Error, Result};
use crate::json::{self, Value};

/// The longest line accepted (the writer's lines are under 4000 bytes).
pub const MAX_LINE_BYTES: usize = 65_536;
/// The most bytes read: the trace of a check of 8 GPUs at the handshake level is 3.2 MB, so one
/// of 64 GPUs (the most `--simulate` accepts; 64 times the pairs) would be about 200 MB; a
/// larger file is not read.
pub const MAX_TRACE_BYTES: u64 = 1 << 30;
/// The most that is kept in memory while reading, counted as the bytes of the lines, names and
/// keys kept plus `ENTRY_BYTES` for each entry: a trace of a check keeps far less (its copy
/// tier and the calls outside jobs, about 55 MB for 64 GPUs); past it the file is not read
/// further, so memory stays bounded whatever the file holds.
pub const MAX_KEPT_BYTES: usize = 256 << 20;
/// What each kept entry (a process, a call's name, a job, a call kept for `--spec`) is counted
/// for beyond its text.
const ENTRY_BYTES: usize = 64;
/// The most distinct roles of one process (a check's have at most two: `worker`, then the
/// engine's role).
const MAX_ROLES: usize = 8;
/// The most malformed lines listed (the count of the rest is given).
const MAX_PROBLEMS: usize = 20;
/// The most failed calls listed per process.
const MAX_FAILURES_SHOWN: usize = 10;

/// The job a line belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct JobKey {
    index: u64,
    src: u64,
    tgt: u64,
    role: String,
    tier: String,
}

/// One call as `--spec` needs it.
#[derive(Clone, Debug)]
struct Step {
    line: u64,
    call: String,
    via: Option<String>,
    code: i64,
    name: String,
    args: Vec<(String, Value)>,
    out: Vec<(String, Value)>,
}

impl Step {
    fn arg(&self, key: &str) -> Option<&Value> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn out(&self, key: &str) -> Option<&Value> {
        self.out.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// The copy-tier calls of one job of one process, and how many calls other tiers made in it.
#[derive(Debug)]
struct JobCalls {
    index: u64,
    src: u64,
    tgt: u64,
    role: String,
    steps: Vec<Step>,
    other_tiers: BTreeMap<String, u64>,
}

/// One process of the trace.
#[derive(Debug)]
struct Process {
    pid: u64,
    roles: Vec<String>,
    part: String,
    calls: Vec<(String, u64)>,
    call_index: HashMap<String, usize>,
    lines: u64,
    failures: Vec<String>,
    failed: u64,
    /// GPUs (the parent's numbering) this process played in its jobs.
    gpus: BTreeSet<u64>,
    /// Calls outside any job, in order.
    outside: Vec<Step>,
    jobs: Vec<JobCalls>,
    /// Where each job (index, src, tgt, role) is in `jobs`.
    job_index: HashMap<(u64, u64, u64, String), usize>,
    first_job_line: Option<u64>,
}

impl Process {
    fn new(pid: u64) -> Process {
        Process {
            pid,
            roles: Vec::new(),
            part: String::new(),
            calls: Vec::new(),
            call_index: HashMap::new(),
            lines: 0,
            failures: Vec::new(),
            failed: 0,
            gpus: BTreeSet::new(),
            outside: Vec::new(),
            jobs: Vec::new(),
            job_index: HashMap::new(),
            first_job_line: None,
        }
    }

    fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Its role for people: `producer`, `consumer` or `parent` over the `worker` it started as.
    fn role_shown(&self) -> String {
        let specific: Vec<&str> = self
            .roles
            .iter()
            .map(String::as_str)
            .filter(|r| *r != "worker")
            .collect();
        match specific.is_empty() {
            true if self.roles.is_empty() => "?".into(),
            true => "worker".into(),
            false => specific.join("/"),
        }
    }

    fn name(&self) -> String {
        let mut s = format!("pid {} {}", self.pid, self.role_shown());
        if !self.part.is_empty() {
            let _ = write!(s, " ({})", self.part);
        }
        s
    }
}

/// A whole trace, read.
#[derive(Debug, Default)]
pub struct Trace {
    lines: u64,
    failed: u64,
    processes: Vec<Process>,
    by_pid: HashMap<u64, usize>,
    /// What is kept, counted as [`MAX_KEPT_BYTES`] says.
    kept_bytes: usize,
    /// A limit was reached: nothing more is read.
    stopped: bool,
}

/// Reads the trace file at `path` (streamed, line by line): only a regular file, at most
/// [`MAX_TRACE_BYTES`] of it.
///
/// # Errors
///
/// [`Error::BadTrace`] where the file cannot be read, or has lines that are not a trace's.
pub fn read(path: &Path) -> Result<Trace> {
    let fail = |why: String| Error::BadTrace {
        problems: vec![format!("cannot read {}: {why}", path.display())],
    };
    let file = crate::files::open_regular(path, std::fs::OpenOptions::new().read(true))
        .map_err(|e| fail(e.to_string()))?;
    let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    if len > MAX_TRACE_BYTES {
        return Err(fail(too_big()));
    }
    read_from(BufReader::new(file))
}

/// Why a trace is not read past [`MAX_TRACE_BYTES`].
fn too_big() -> String {
    format!(
        "larger than {MAX_TRACE_BYTES} bytes (1 GiB), the most trace-summary reads: not the trace \
         of a check"
    )
}

/// Reads a trace from `input`: at most [`MAX_TRACE_BYTES`], and stops there with an error.
///
/// # Errors
///
/// [`Error::BadTrace`], listing the lines that are not a trace's (the first
/// twenty, then how many more).
pub fn read_from(input: impl BufRead) -> Result<Trace> {
    read_lines(input).map_err(|problems| Error::BadTrace { problems })
}

/// [`read_from`], the problems as they are listed.
fn read_lines(input: impl BufRead) -> std::result::Result<Trace, Vec<String>> {
    let mut input = input.take(MAX_TRACE_BYTES + 1);
    let mut trace = Trace::default();
    let mut problems = Vec::new();
    let mut bad = 0usize;
    let mut number = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        number += 1;
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = match input.by_ref().take(limit).read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) => {
                problems.push(format!("line {number}: cannot read: {e}"));
                break;
            }
        };
        if n == 0 {
            break;
        }
        let whole = buf.last() == Some(&b'\n');
        let result = if !whole && buf.len() > MAX_LINE_BYTES {
            // Skip the rest of the line (the whole input is bounded, so this ends).
            let mut rest = Vec::new();
            loop {
                rest.clear();
                match input.by_ref().take(limit).read_until(b'\n', &mut rest) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if rest.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
            Err(format!("longer than {MAX_LINE_BYTES} bytes"))
        } else {
            match std::str::from_utf8(&buf) {
                Err(_) => Err("not UTF-8 text".to_string()),
                Ok(text) if text.trim().is_empty() => Ok(()),
                Ok(text) => trace.add(number, text.trim()),
            }
        };
        if let Err(why) = result {
            bad += 1;
            if bad <= MAX_PROBLEMS || trace.stopped {
                problems.push(format!("line {number}: {why}"));
            }
            if trace.stopped {
                break;
            }
        }
    }
    if bad > MAX_PROBLEMS {
        let more = bad - MAX_PROBLEMS - usize::from(trace.stopped);
        if more > 0 {
            problems.push(format!("... and {more} more malformed line(s)"));
        }
    }
    if input.limit() == 0 {
        problems.push(too_big());
    }
    match problems.is_empty() {
        true => Ok(trace),
        false => Err(problems),
    }
}

/// How many values `v` is made of (itself and, in an array or object, each member's).
fn values(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(values).sum(),
        Value::Object(members) => members.iter().map(|(_, v)| values(v)).sum(),
        _ => 0,
    }
}

fn members(v: Value) -> Option<Vec<(String, Value)>> {
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn field<'a>(m: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    m.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn unsigned(v: Option<&Value>) -> Option<u64> {
    match v {
        Some(Value::Number(n)) => n.parse().ok(),
        _ => None,
    }
}

fn signed(v: Option<&Value>) -> Option<i64> {
    match v {
        Some(Value::Number(n)) => n.parse().ok(),
        _ => None,
    }
}

fn string(v: Option<&Value>) -> Option<&str> {
    match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

fn object(v: Option<&Value>) -> Option<Vec<(String, Value)>> {
    match v {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => None,
    }
}

fn job_of(v: Option<&Value>) -> std::result::Result<Option<JobKey>, String> {
    let m = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("\"job\" is neither null nor an object".into()),
    };
    let number = |key: &str| {
        unsigned(field(m, key))
            .ok_or_else(|| format!("\"job\" has no \"{key}\" (a non-negative integer)"))
    };
    let text = |key: &str| {
        string(field(m, key))
            .map(str::to_string)
            .ok_or_else(|| format!("\"job\" has no \"{key}\" (a string)"))
    };
    Ok(Some(JobKey {
        index: number("index")?,
        src: number("src")?,
        tgt: number("tgt")?,
        role: text("role")?,
        tier: text("tier")?,
    }))
}

impl Trace {
    /// Adds line `number`, or says why it is malformed.
    fn add(&mut self, number: u64, text: &str) -> std::result::Result<(), String> {
        let value = json::parse(text).map_err(|e| format!("not JSON: {e}"))?;
        let m = members(value).ok_or("not a JSON object")?;
        let pid = unsigned(field(&m, "pid")).ok_or("no \"pid\" (a non-negative integer)")?;
        let role = string(field(&m, "role")).ok_or("no \"role\" (a string)")?;
        let call = string(field(&m, "call")).ok_or("no \"call\" (a string)")?;
        let code = signed(field(&m, "code")).ok_or("no \"code\" (an integer)")?;
        let part = match field(&m, "part") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s,
            Some(_) => return Err("\"part\" is not a string".into()),
        };
        let via = match field(&m, "via") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("\"via\" is not a string".into()),
        };
        let name = string(field(&m, "name")).unwrap_or("").to_string();
        let job = job_of(field(&m, "job"))?;
        let args = object(field(&m, "args")).ok_or("\"args\" is not an object")?;
        let out = object(field(&m, "out")).ok_or("\"out\" is not an object")?;
        let device = signed(field(&m, "device"));

        // What this line adds to memory, counted as MAX_KEPT_BYTES says.
        let mut cost = 0;
        let i = match self.by_pid.get(&pid) {
            Some(&i) => i,
            None => {
                cost += std::mem::size_of::<Process>() + 8 * ENTRY_BYTES;
                self.processes.push(Process::new(pid));
                self.by_pid.insert(pid, self.processes.len() - 1);
                self.processes.len() - 1
            }
        };
        let p = &mut self.processes[i];
        if !p.has_role(role) {
            if p.roles.len() == MAX_ROLES {
                self.stopped = true;
                return Err(format!(
                    "pid {pid} has more than {MAX_ROLES} roles: not the trace of a check; not \
                     read further"
                ));
            }
            cost += ENTRY_BYTES + role.len();
            p.roles.push(role.to_string());
        }
        self.lines += 1;
        p.lines += 1;
        if !part.is_empty() && p.part != part {
            // Replaced, never accumulated: bounded by the line.
            p.part = part.to_string();
        }
        let key = match &via {
            Some(via) => format!("{call} in {via}"),
            None => call.to_string(),
        };
        match p.call_index.get(&key) {
            Some(&k) => p.calls[k].1 += 1,
            None => {
                cost += ENTRY_BYTES + 2 * key.len();
                p.call_index.insert(key.clone(), p.calls.len());
                p.calls.push((key, 1));
            }
        }
        if code != 0 {
            self.failed += 1;
            p.failed += 1;
            if p.failures.len() < MAX_FAILURES_SHOWN {
                let mut s = format!("line {number}: {call}");
                if let Some(via) = &via {
                    let _ = write!(s, " (in {via})");
                }
                if let Some(d) = device {
                    let _ = write!(s, " on device {d}");
                }
                let _ = write!(s, " -> {code} {name}");
                if let Some(j) = &job {
                    let _ = write!(
                        s,
                        " (job {}: {}->{} {}, {})",
                        j.index, j.src, j.tgt, j.role, j.tier
                    );
                }
                cost += ENTRY_BYTES + s.len();
                p.failures.push(s);
            }
        }
        let step = Step {
            line: number,
            call: call.to_string(),
            via,
            code,
            name,
            args,
            out,
        };
        // A kept call is counted as its line (its parsed fields hold the line's text) and each
        // value parsed from it.
        let values: usize = step
            .args
            .iter()
            .chain(&step.out)
            .map(|(_, v)| values(v))
            .sum();
        let step_cost = std::mem::size_of::<Step>() + text.len() + ENTRY_BYTES * values;
        match job {
            None => {
                p.outside.push(step);
                cost += step_cost;
            }
            Some(j) => {
                p.first_job_line.get_or_insert(number);
                let gpu = match j.role.as_str() {
                    "producer" => Some(j.src),
                    "consumer" => Some(j.tgt),
                    _ => None,
                };
                if gpu.is_some_and(|g| p.gpus.insert(g)) {
                    cost += ENTRY_BYTES;
                }
                let key = (j.index, j.src, j.tgt, j.role);
                let at = match p.job_index.get(&key) {
                    Some(&at) => at,
                    None => {
                        cost += std::mem::size_of::<JobCalls>() + 4 * ENTRY_BYTES + 2 * key.3.len();
                        p.jobs.push(JobCalls {
                            index: key.0,
                            src: key.1,
                            tgt: key.2,
                            role: key.3.clone(),
                            steps: Vec::new(),
                            other_tiers: BTreeMap::new(),
                        });
                        p.job_index.insert(key, p.jobs.len() - 1);
                        p.jobs.len() - 1
                    }
                };
                let calls = &mut p.jobs[at];
                if j.tier == "copy" {
                    calls.steps.push(step);
                    cost += step_cost;
                } else {
                    let count = calls.other_tiers.entry(j.tier).or_insert_with_key(|tier| {
                        cost += ENTRY_BYTES + tier.len();
                        0
                    });
                    *count += 1;
                }
            }
        }
        self.kept_bytes += cost;
        if self.kept_bytes > MAX_KEPT_BYTES {
            self.stopped = true;
            return Err(format!(
                "more than {MAX_KEPT_BYTES} bytes (256 MiB) of calls, names and jobs to keep, \
                 the most trace-summary keeps: not the trace of a check; not read further"
            ));
        }
        Ok(())
    }

    /// Calls in the trace (lines read).
    pub fn calls(&self) -> u64 {
        self.lines
    }

    /// Calls that returned an error code.
    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// Processes in the trace.
    pub fn processes(&self) -> usize {
        self.processes.len()
    }

    /// Per process, in the order they first appear: pid, role and part, its calls in first-seen
    /// order with counts (`cudaSetDevice x4, ...`; a call a shim function made reads `cuLaunchKernel
    /// in p2pc_pattern_store`), the number of failed calls and the first of them.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} call(s) from {} process(es), {} failed\n",
            self.lines,
            self.processes.len(),
            self.failed
        );
        for p in &self.processes {
            let _ = write!(s, "{}", p.name());
            if !p.gpus.is_empty() {
                let gpus: Vec<String> = p.gpus.iter().map(u64::to_string).collect();
                let plural = if gpus.len() > 1 { "s" } else { "" };
                let _ = write!(s, ", GPU{plural} {} in its jobs", gpus.join(", "));
            }
            let _ = writeln!(s, ": {} call(s), {} failed", p.lines, p.failed);
            let calls: Vec<String> = p.calls.iter().map(|(c, n)| format!("{c} x{n}")).collect();
            let _ = writeln!(s, "  {}", calls.join(", "));
            for f in &p.failures {
                let _ = writeln!(s, "  failed: {f}");
            }
            if p.failed > p.failures.len() as u64 {
                let _ = writeln!(
                    s,
                    "  failed: ... and {} more",
                    p.failed - p.failures.len() as u64
                );
            }
        }
        s
    }

    /// Compares the trace with SPEC section 2 (vLLM's `can_actually_p2p`), pair by pair: see
    /// [`SpecCheck`].
    pub fn check_spec(&self) -> SpecCheck {
        spec::check(self)
    }
}

/// The outcome of [`Trace::check_spec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecCheck {
    /// One line per pair checked: `pair 0->1 (job 1): as SPEC section 2 ...`.
    pub pairs: Vec<String>,
    /// What happened that SPEC section 2 allows (a failed open: the answer "false").
    pub notes: Vec<String>,
    /// Every difference from SPEC section 2; none means the trace follows it exactly.
    pub differences: Vec<String>,
}

impl SpecCheck {
    /// The report `trace-summary --spec` prints.
    pub fn render(&self) -> String {
        let mut s = String::from("SPEC section 2 (vLLM's can_actually_p2p), pair by pair:\n");
        for p in &self.pairs {
            let _ = writeln!(s, "  {p}");
        }
        s.push_str("allowed extras (named; not in SPEC section 2):\n");
        for e in spec::EXTRAS {
            let _ = writeln!(s, "  {e}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        if self.differences.is_empty() {
            let _ = writeln!(
                s,
                "no difference from SPEC section 2 in {} pair(s)",
                self.pairs.len()
            );
        } else {
            let _ = writeln!(
                s,
                "{} difference(s) from SPEC section 2:",
                self.differences.len()
            );
            for d in &self.differences {
                let _ = writeln!(s, "  {d}");
            }
        }
        s
    }
}

/// SPEC section 2's sequence, and p2pcheck's named extras (see `src/worker/vllm.rs`).
mod spec {
    use super::*;

    /// What p2pcheck does beyond SPEC section 2's calls, each allowed where stated.
    pub(super) const EXTRAS: [&str; 3] = [
        "cuInit and cudaGetDeviceCount, once each per worker before its first pair: the worker \
         starts CUDA and reports the device count in its Hello (cuInit and cuDeviceGetCount in \
         the parent, which counts the GPUs only when it cannot name them without CUDA)",
        "cudaDeviceCanAccessPeer(tgt, src) by the consumer between cudaSetDevice and \
         cudaIpcOpenMemHandle, for a pair of two GPUs: p2pcheck asks the driver's claim (as \
         vLLM's fast path does) to show it beside the verdict; never for i->i (CUDA answers no \
         for a device and itself)",
        "cuGetErrorName and cuGetErrorString after a failed driver call: p2pcheck names the \
         error",
    ];

    const BYTES: i64 = crate::worker::TEST_BYTES as i64;

    /// An argument SPEC section 2 fixes.
    enum Want {
        Int(&'static str, i64),
        Text(&'static str, &'static str),
    }

    struct Expected {
        call: &'static str,
        args: Vec<Want>,
    }

    fn want(call: &'static str, args: Vec<Want>) -> Expected {
        Expected { call, args }
    }

    fn is_error_name(s: &Step) -> bool {
        s.via.is_none() && (s.call == "cuGetErrorName" || s.call == "cuGetErrorString")
    }

    fn producer(src: i64, open_failed: bool) -> Vec<Expected> {
        let mut v = vec![
            want("cudaSetDevice", vec![Want::Int("device", src)]),
            want("cudaMalloc", vec![Want::Int("bytes", BYTES)]),
            want(
                "cudaMemset",
                vec![Want::Int("value", 1), Want::Int("bytes", BYTES)],
            ),
            want("cudaDeviceSynchronize", vec![]),
            want("cudaIpcGetMemHandle", vec![]),
        ];
        if !open_failed {
            v.push(memcpy());
        }
        v.push(want("cudaDeviceReset", vec![]));
        v
    }

    fn consumer(src: i64, tgt: i64, open_failed: bool) -> Vec<Expected> {
        let mut v = vec![want("cudaSetDevice", vec![Want::Int("device", tgt)])];
        if src != tgt {
            v.push(want(
                "cudaDeviceCanAccessPeer",
                vec![Want::Int("device", tgt), Want::Int("peer_device", src)],
            ));
        }
        v.push(want(
            "cudaIpcOpenMemHandle",
            vec![Want::Text("flags", "cudaIpcMemLazyEnablePeerAccess")],
        ));
        if !open_failed {
            v.push(want(
                "cudaMemset",
                vec![Want::Int("value", 2), Want::Int("bytes", BYTES)],
            ));
            v.push(want("cudaDeviceSynchronize", vec![]));
            v.push(memcpy());
        }
        v.push(want("cudaDeviceReset", vec![]));
        v
    }

    fn memcpy() -> Expected {
        want(
            "cudaMemcpy",
            vec![
                Want::Int("bytes", BYTES),
                Want::Text("kind", "cudaMemcpyDefault"),
            ],
        )
    }

    fn shown(v: Option<&Value>) -> String {
        match v {
            None => "absent".into(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.clone(),
            Some(other) => format!("{other:?}"),
        }
    }

    /// Compares one side's calls with what SPEC section 2 expects; pushes each difference.
    fn compare(
        what: &str,
        got: &[&Step],
        expected: &[Expected],
        differences: &mut Vec<String>,
    ) -> bool {
        let names: Vec<&str> = got.iter().map(|s| s.call.as_str()).collect();
        let wanted: Vec<&str> = expected.iter().map(|e| e.call).collect();
        if names != wanted {
            let at = names
                .iter()
                .zip(&wanted)
                .position(|(a, b)| a != b)
                .unwrap_or(names.len().min(wanted.len()));
            let first = match (names.get(at), wanted.get(at)) {
                (Some(g), Some(w)) => format!("expected {w}, got {g}"),
                (None, Some(w)) => format!("expected {w}, got nothing"),
                (Some(g), None) => format!("expected nothing, got {g}"),
                (None, None) => String::new(),
            };
            let failed: Vec<String> = got
                .iter()
                .filter(|s| s.code != 0)
                .map(|s| format!("{} -> {} {} (line {})", s.call, s.code, s.name, s.line))
                .collect();
            let mut d = format!(
                "{what}: call {} differs: {first}; SPEC: {}; traced: {}",
                at + 1,
                wanted.join(", "),
                if names.is_empty() {
                    "nothing".to_string()
                } else {
                    names.join(", ")
                }
            );
            if !failed.is_empty() {
                let _ = write!(d, " (after a failed call: {})", failed.join("; "));
            }
            differences.push(d);
            return false;
        }
        let before = differences.len();
        for (s, e) in got.iter().zip(expected) {
            for w in &e.args {
                let (key, ok, wanted) = match w {
                    Want::Int(key, v) => (*key, signed(s.arg(key)) == Some(*v), v.to_string()),
                    Want::Text(key, v) => (*key, string(s.arg(key)) == Some(*v), v.to_string()),
                };
                if !ok {
                    differences.push(format!(
                        "{what}: {} (line {}): {key} {}, SPEC: {wanted}",
                        s.call,
                        s.line,
                        shown(s.arg(key))
                    ));
                }
            }
        }
        differences.len() == before
    }

    fn find<'a>(steps: &[&'a Step], call: &str) -> Option<&'a Step> {
        steps.iter().copied().find(|s| s.call == call)
    }

    /// Picks a value of a call (an argument or an out-value).
    type Pick = for<'a> fn(&'a Step) -> Option<&'a Value>;
    /// A call (if made) and the value to compare from it.
    type Side<'s> = (Option<&'s Step>, Pick);

    /// The value `a.1` picks from call `a.0` equals the one `b.1` picks from `b.0` (where both
    /// calls and values are there), else a difference saying what it `means`.
    fn same(what: &str, (a, va): Side, (b, vb): Side, means: &str, differences: &mut Vec<String>) {
        let (Some(a), Some(b)) = (a, b) else {
            return;
        };
        if let (Some(x), Some(y)) = (va(a), vb(b)) {
            if x != y {
                differences.push(format!(
                    "{what}: {means}: {} (line {}) has {}, {} (line {}) has {}",
                    a.call,
                    a.line,
                    shown(Some(x)),
                    b.call,
                    b.line,
                    shown(Some(y))
                ));
            }
        }
    }

    pub(super) fn check<'a>(trace: &'a Trace) -> SpecCheck {
        let mut pairs = Vec::new();
        let mut notes = Vec::new();
        let mut differences = Vec::new();
        let mut producers = Vec::new();
        let mut consumers = Vec::new();
        for p in &trace.processes {
            let is_p = p.has_role("producer");
            let is_c = p.has_role("consumer");
            let with_jobs = !p.jobs.is_empty();
            if is_p && is_c {
                differences.push(format!(
                    "{}: both producer and consumer; SPEC section 2 has one process for each",
                    p.name()
                ));
                continue;
            }
            if !is_p && !is_c && with_jobs {
                differences.push(format!(
                    "{}: a parallel-engine worker; SPEC section 2 is the vLLM engine's procedure \
                     (trace `p2pcheck --engine vllm --level copy`)",
                    p.name()
                ));
                continue;
            }
            // Calls outside any pair.
            let worker = is_p || is_c || p.has_role("worker");
            let allowed: &[&str] = if worker {
                &["cuInit", "cudaGetDeviceCount"]
            } else {
                &["cuInit", "cuDeviceGetCount"]
            };
            let mut seen: Vec<&str> = Vec::new();
            for s in &p.outside {
                if is_error_name(s) {
                    continue;
                }
                let early = p.first_job_line.map_or(true, |first| s.line < first);
                let once = !seen.contains(&s.call.as_str());
                if allowed.contains(&s.call.as_str()) && s.via.is_none() && early && once {
                    seen.push(&s.call);
                    continue;
                }
                differences.push(format!(
                    "{}: {} (line {}) outside any pair{}",
                    p.name(),
                    s.call,
                    s.line,
                    if allowed.contains(&s.call.as_str()) {
                        " (allowed once, before the first pair)"
                    } else {
                        ""
                    }
                ));
            }
            if is_p {
                producers.push(p);
            } else if is_c {
                consumers.push(p);
            }
        }
        if producers.len() != consumers.len() {
            differences.push(format!(
                "{} producer(s) and {} consumer(s): SPEC section 2 pairs one producer with one \
                 consumer",
                producers.len(),
                consumers.len()
            ));
        }
        let rounds = producers.len().min(consumers.len());
        if rounds == 0 {
            differences.push(
                "no pair of the vLLM engine in the trace (trace `p2pcheck --engine vllm --level \
                 copy`)"
                    .into(),
            );
        }
        for (round, (p, c)) in producers.iter().zip(&consumers).enumerate() {
            let mut indices: BTreeSet<u64> = p.jobs.iter().map(|j| j.index).collect();
            indices.extend(c.jobs.iter().map(|j| j.index));
            // Each side's first job of each index, found by a look-up, not a search per index.
            let first = |p: &'a Process, role: &str| -> HashMap<u64, &'a JobCalls> {
                p.jobs
                    .iter()
                    .rev()
                    .filter(|j| j.role == role)
                    .map(|j| (j.index, j))
                    .collect()
            };
            let (p_jobs, c_jobs) = (first(p, "producer"), first(c, "consumer"));
            for index in indices {
                let pj = p_jobs.get(&index).copied();
                let cj = c_jobs.get(&index).copied();
                let (src, tgt) = match (pj, cj) {
                    (Some(j), _) | (None, Some(j)) => (j.src, j.tgt),
                    (None, None) => continue,
                };
                let mut name = format!("pair {src}->{tgt} (job {index}");
                if rounds > 1 {
                    let _ = write!(name, ", round {}", round + 1);
                }
                name.push(')');
                let before = differences.len();
                let (Some(pj), Some(cj)) = (pj, cj) else {
                    let missing = if pj.is_none() { p.name() } else { c.name() };
                    differences.push(format!("{name}: no calls of {missing} for this pair"));
                    pairs.push(format!("{name}: DIFFERS"));
                    continue;
                };
                if (pj.src, pj.tgt) != (cj.src, cj.tgt) {
                    differences.push(format!(
                        "{name}: the consumer's job {index} is pair {}->{}",
                        cj.src, cj.tgt
                    ));
                }
                for (side, j) in [("producer", pj), ("consumer", cj)] {
                    if !j.other_tiers.is_empty() {
                        let tiers: Vec<String> = j
                            .other_tiers
                            .iter()
                            .map(|(t, n)| format!("{n} call(s) of tier {t}"))
                            .collect();
                        differences.push(format!(
                            "{name} {side}: {}; SPEC section 2 is the copy test alone (trace a \
                             --level copy run)",
                            tiers.join(", ")
                        ));
                    }
                }
                let psteps: Vec<&Step> = pj.steps.iter().filter(|s| !is_error_name(s)).collect();
                let csteps: Vec<&Step> = cj.steps.iter().filter(|s| !is_error_name(s)).collect();
                let open = find(&csteps, "cudaIpcOpenMemHandle");
                let open_failed = open.is_some_and(|s| s.code != 0);
                if let Some(s) = open.filter(|s| s.code != 0) {
                    notes.push(format!(
                        "{name}: cudaIpcOpenMemHandle failed ({} {}, line {}): SPEC's answer \
                         \"false\"; step 3 skipped, as SPEC says",
                        s.code, s.name, s.line
                    ));
                }
                let (s, t) = (src as i64, tgt as i64);
                let p_ok = compare(
                    &format!("{name} producer ({})", p.name()),
                    &psteps,
                    &producer(s, open_failed),
                    &mut differences,
                );
                let c_ok = compare(
                    &format!("{name} consumer ({})", c.name()),
                    &csteps,
                    &consumer(s, t, open_failed),
                    &mut differences,
                );
                if p_ok && c_ok {
                    let malloc = find(&psteps, "cudaMalloc");
                    let export = find(&psteps, "cudaIpcGetMemHandle");
                    let arg_ptr: Pick = |s| s.arg("ptr");
                    let arg_src: Pick = |s| s.arg("src");
                    let out_ptr: Pick = |s| s.out("ptr");
                    let links: [(Side, Side, &str); 6] = [
                        (
                            (find(&psteps, "cudaMemset"), arg_ptr),
                            (malloc, out_ptr),
                            "the producer sets another buffer than it allocated",
                        ),
                        (
                            (export, arg_ptr),
                            (malloc, out_ptr),
                            "the producer exports another buffer than it allocated",
                        ),
                        (
                            (find(&psteps, "cudaMemcpy"), arg_src),
                            (malloc, out_ptr),
                            "the producer reads back another buffer than it allocated",
                        ),
                        (
                            (export, |s| s.out("handle")),
                            (open, |s| s.arg("handle")),
                            "the consumer opens another handle than the producer exported",
                        ),
                        (
                            (find(&csteps, "cudaMemset"), arg_ptr),
                            (open, out_ptr),
                            "the consumer sets another address than it mapped",
                        ),
                        (
                            (find(&csteps, "cudaMemcpy"), arg_src),
                            (open, out_ptr),
                            "the consumer reads back another address than it mapped",
                        ),
                    ];
                    for (a, b, means) in links {
                        same(&name, a, b, means, &mut differences);
                    }
                }
                for (side, steps) in [("producer", &psteps), ("consumer", &csteps)] {
                    for s in steps.iter().filter(|s| s.code != 0) {
                        if s.call != "cudaIpcOpenMemHandle" || side != "consumer" {
                            notes.push(format!(
                                "{name} {side}: {} failed ({} {}, line {}): the pair is false",
                                s.call, s.code, s.name, s.line
                            ));
                        }
                    }
                }
                let extra = if src != tgt {
                    ", with the consumer's cudaDeviceCanAccessPeer"
                } else {
                    ""
                };
                pairs.push(match differences.len() == before {
                    true => format!(
                        "{name}: as SPEC section 2{extra} (producer pid {}, consumer pid {})",
                        p.pid, c.pid
                    ),
                    false => format!("{name}: DIFFERS (below)"),
                });
            }
        }
        SpecCheck {
            pairs,
            notes,
            differences,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        pid: u32,
        role: &str,
        job: Option<(u32, u32, u32, &str)>,
        call: &str,
        rest: &str,
    ) -> String {
        let job = match job {
            None => "null".to_string(),
            Some((i, s, t, r)) => format!(
                "{{\"index\":{i},\"src\":{s},\"tgt\":{t},\"role\":\"{r}\",\"tier\":\"copy\"}}"
            ),
        };
        format!(
            "{{\"ts_us\":1,\"dur_us\":1,\"pid\":{pid},\"role\":\"{role}\",\"part\":\"vLLM {role}\",\
             \"job\":{job},\"call\":\"{call}\",\"api\":\"runtime\",\"device\":0,{rest}}}\n"
        )
    }

    /// A clean vLLM trace of the pairs given, as the engine writes it.
    fn vllm_trace(pairs: &[(u32, u32)]) -> String {
        let ok = "\"code\":0,\"name\":\"cudaSuccess\"";
        let h = "\"0a0b\"";
        let mut t = String::new();
        for (pid, role) in [(10, "producer"), (11, "consumer")] {
            t += &line(
                pid,
                "worker",
                None,
                "cuInit",
                &format!("\"args\":{{}},{ok}"),
            );
            t += &line(
                pid,
                "worker",
                None,
                "cudaGetDeviceCount",
                &format!("\"args\":{{}},{ok}"),
            );
            for (i, &(s, g)) in pairs.iter().enumerate() {
                let j = Some((i as u32, s, g, role));
                let l = |call: &str, args: &str, out: &str| {
                    let out = if out.is_empty() {
                        String::new()
                    } else {
                        format!(",\"out\":{{{out}}}")
                    };
                    line(
                        pid,
                        role,
                        j,
                        call,
                        &format!("\"args\":{{{args}}},{ok}{out}"),
                    )
                };
                if role == "producer" {
                    t += &l("cudaSetDevice", &format!("\"device\":{s}"), "");
                    t += &l("cudaMalloc", "\"bytes\":1024", "\"ptr\":\"0x10\"");
                    t += &l(
                        "cudaMemset",
                        "\"ptr\":\"0x10\",\"value\":1,\"bytes\":1024",
                        "",
                    );
                    t += &l("cudaDeviceSynchronize", "", "");
                    t += &l(
                        "cudaIpcGetMemHandle",
                        "\"ptr\":\"0x10\"",
                        &format!("\"handle\":{h}"),
                    );
                    t += &l("cudaMemcpy", "\"dst\":\"0x1\",\"src\":\"0x10\",\"bytes\":1024,\"kind\":\"cudaMemcpyDefault\"", "");
                    t += &l("cudaDeviceReset", "", "");
                } else {
                    t += &l("cudaSetDevice", &format!("\"device\":{g}"), "");
                    if s != g {
                        t += &l(
                            "cudaDeviceCanAccessPeer",
                            &format!("\"device\":{g},\"peer_device\":{s}"),
                            "\"can_access_peer\":1",
                        );
                    }
                    t += &l(
                        "cudaIpcOpenMemHandle",
                        &format!("\"handle\":{h},\"flags\":\"cudaIpcMemLazyEnablePeerAccess\""),
                        "\"ptr\":\"0x20\"",
                    );
                    t += &l(
                        "cudaMemset",
                        "\"ptr\":\"0x20\",\"value\":2,\"bytes\":1024",
                        "",
                    );
                    t += &l("cudaDeviceSynchronize", "", "");
                    t += &l("cudaMemcpy", "\"dst\":\"0x2\",\"src\":\"0x20\",\"bytes\":1024,\"kind\":\"cudaMemcpyDefault\"", "");
                    t += &l("cudaDeviceReset", "", "");
                }
            }
        }
        t
    }

    fn parse(text: &str) -> std::result::Result<Trace, Vec<String>> {
        read_lines(text.as_bytes())
    }

    #[test]
    fn a_clean_vllm_trace_follows_spec_section_2() {
        let t = parse(&vllm_trace(&[(0, 0), (0, 1), (1, 0), (1, 1)])).unwrap();
        let check = t.check_spec();
        assert_eq!(check.differences, Vec::<String>::new());
        assert_eq!(check.notes, Vec::<String>::new());
        assert_eq!(
            check.pairs,
            vec![
                "pair 0->0 (job 0): as SPEC section 2 (producer pid 10, consumer pid 11)",
                "pair 0->1 (job 1): as SPEC section 2, with the consumer's cudaDeviceCanAccessPeer \
                 (producer pid 10, consumer pid 11)",
                "pair 1->0 (job 2): as SPEC section 2, with the consumer's cudaDeviceCanAccessPeer \
                 (producer pid 10, consumer pid 11)",
                "pair 1->1 (job 3): as SPEC section 2 (producer pid 10, consumer pid 11)",
            ]
        );
    }

    #[test]
    fn the_summary_counts_calls_in_first_seen_order() {
        let t = parse(&vllm_trace(&[(0, 1), (1, 0)])).unwrap();
        assert_eq!(t.calls(), 4 + 7 * 2 + 7 * 2);
        assert_eq!(
            t.summary(),
            "32 call(s) from 2 process(es), 0 failed\n\
             pid 10 producer (vLLM producer), GPUs 0, 1 in its jobs: 16 call(s), 0 failed\n  \
             cuInit x1, cudaGetDeviceCount x1, cudaSetDevice x2, cudaMalloc x2, cudaMemset x2, \
             cudaDeviceSynchronize x2, cudaIpcGetMemHandle x2, cudaMemcpy x2, cudaDeviceReset x2\n\
             pid 11 consumer (vLLM consumer), GPUs 0, 1 in its jobs: 16 call(s), 0 failed\n  \
             cuInit x1, cudaGetDeviceCount x1, cudaSetDevice x2, cudaDeviceCanAccessPeer x2, \
             cudaIpcOpenMemHandle x2, cudaMemset x2, cudaDeviceSynchronize x2, cudaMemcpy x2, \
             cudaDeviceReset x2\n"
        );
    }

    #[test]
    fn a_missing_call_is_a_difference_naming_the_pair() {
        let text = vllm_trace(&[(0, 1), (1, 0)]);
        // Remove the producer's cudaMalloc of job 1 (pair 1->0).
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.contains("\"index\":1,") && l.contains("cudaMalloc"))
            .unwrap();
        let edited: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != at)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let check = parse(&edited).unwrap().check_spec();
        assert_eq!(
            check.differences,
            vec![
                "pair 1->0 (job 1) producer (pid 10 producer (vLLM producer)): call 2 differs: \
                 expected cudaMalloc, got cudaMemset; SPEC: cudaSetDevice, cudaMalloc, \
                 cudaMemset, cudaDeviceSynchronize, cudaIpcGetMemHandle, cudaMemcpy, \
                 cudaDeviceReset; traced: cudaSetDevice, cudaMemset, cudaDeviceSynchronize, \
                 cudaIpcGetMemHandle, cudaMemcpy, cudaDeviceReset"
            ]
        );
        assert_eq!(check.pairs[1], "pair 1->0 (job 1): DIFFERS (below)");
        assert!(check
            .render()
            .contains("1 difference(s) from SPEC section 2:"));
    }

    #[test]
    fn a_wrong_argument_is_a_difference() {
        let text = vllm_trace(&[(0, 1)]).replace("\"value\":2", "\"value\":3");
        let check = parse(&text).unwrap().check_spec();
        assert_eq!(check.differences.len(), 1, "{:?}", check.differences);
        assert!(check.differences[0].contains("cudaMemset (line "));
        assert!(check.differences[0].ends_with("value 3, SPEC: 2"));
    }

    #[test]
    fn a_consumer_opening_another_handle_is_a_difference() {
        let text = vllm_trace(&[(0, 1)]).replacen(
            "\"handle\":\"0a0b\",\"flags\"",
            "\"handle\":\"ffff\",\"flags\"",
            1,
        );
        let check = parse(&text).unwrap().check_spec();
        assert_eq!(
            check.differences,
            vec![
                "pair 0->1 (job 0): the consumer opens another handle than the producer \
                 exported: cudaIpcGetMemHandle (line 7) has 0a0b, cudaIpcOpenMemHandle (line 14) \
                 has ffff"
            ]
        );
    }

    #[test]
    fn a_parallel_trace_and_an_empty_one_are_not_spec_section_2() {
        let ok = "\"args\":{},\"code\":0,\"name\":\"cudaSuccess\"";
        let t = parse(&line(
            5,
            "worker",
            Some((0, 0, 1, "producer")),
            "cudaMemcpy",
            ok,
        ))
        .unwrap();
        let d = t.check_spec().differences;
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("pid 5 worker (vLLM worker): a parallel-engine worker"));
        assert!(d[1].starts_with("no pair of the vLLM engine in the trace"));
        assert_eq!(parse("").unwrap().check_spec().differences.len(), 1);
    }

    #[test]
    fn malformed_lines_are_reported_by_number() {
        let good = line(1, "parent", None, "cuInit", "\"args\":{},\"code\":0");
        let text = format!(
            "{good}not json\n{{\"pid\":1}}\n\n[1]\n{}\n{good}",
            "x".repeat(MAX_LINE_BYTES + 10)
        );
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(b"\xff\n");
        let err = read_lines(&bytes[..]).unwrap_err();
        assert_eq!(err.len(), 5, "{err:?}");
        assert!(err[0].starts_with("line 2: not JSON"), "{err:?}");
        assert_eq!(err[1], "line 3: no \"role\" (a string)");
        assert_eq!(err[2], "line 5: not a JSON object");
        assert_eq!(
            err[3],
            format!("line 6: longer than {MAX_LINE_BYTES} bytes")
        );
        assert_eq!(err[4], "line 8: not UTF-8 text");
    }

    /// An endless input of the lines `line(i)` makes, for i = 0, 1, 2...
    struct Lines<F: FnMut(u64) -> String> {
        line: F,
        next: u64,
        pending: Vec<u8>,
        at: usize,
    }

    impl<F: FnMut(u64) -> String> Read for Lines<F> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.at == self.pending.len() {
                self.pending = (self.line)(self.next).into_bytes();
                self.next += 1;
                self.at = 0;
            }
            let n = out.len().min(self.pending.len() - self.at);
            out[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn endless<F: FnMut(u64) -> String>(line: F) -> BufReader<Lines<F>> {
        BufReader::new(Lines {
            line,
            next: 0,
            pending: Vec::new(),
            at: 0,
        })
    }

    #[test]
    fn an_endless_input_is_read_up_to_the_size_limit_and_no_further() {
        // /dev/zero without the device: one endless line, skipped, then the limit.
        let err = read_lines(BufReader::new(std::io::repeat(0))).unwrap_err();
        assert_eq!(
            err,
            vec![
                format!("line 1: longer than {MAX_LINE_BYTES} bytes"),
                "larger than 1073741824 bytes (1 GiB), the most trace-summary reads: not the \
                 trace of a check"
                    .to_string()
            ]
        );
    }

    #[test]
    fn what_is_kept_is_bounded_whatever_the_lines_hold() {
        // Each line a new process, a new call and a new job: everything a line can add.
        let err = read_lines(endless(|i| {
            format!(
                "{{\"pid\":{i},\"role\":\"consumer\",\"call\":\"c{i}\",\"code\":0,\"job\":\
                 {{\"index\":{i},\"src\":{i},\"tgt\":0,\"role\":\"consumer\",\"tier\":\"copy\"}},\
                 \"args\":{{\"a\":[1,2,3,4,5,6,7,8]}}}}\n"
            )
        }))
        .unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(
            err[0].ends_with(
                "more than 268435456 bytes (256 MiB) of calls, names and jobs to keep, the \
                 most trace-summary keeps: not the trace of a check; not read further"
            ),
            "{err:?}"
        );
        // Roles are few per process: a line with yet another one is not kept.
        let err = read_lines(endless(|i| {
            format!("{{\"pid\":1,\"role\":\"r{i}\",\"call\":\"c\",\"code\":0}}\n")
        }))
        .unwrap_err();
        assert_eq!(
            err,
            vec![format!(
                "line 9: pid 1 has more than {MAX_ROLES} roles: not the trace of a check; not \
                 read further"
            )]
        );
    }

    #[test]
    fn a_failed_call_is_counted_and_shown() {
        let text = line(
            3,
            "consumer",
            Some((2, 1, 0, "consumer")),
            "cudaIpcOpenMemHandle",
            "\"args\":{},\"code\":201,\"name\":\"cudaErrorDeviceUninitialized\"",
        );
        let t = parse(&text).unwrap();
        assert_eq!(t.failed(), 1);
        assert_eq!(
            t.summary(),
            "1 call(s) from 1 process(es), 1 failed\n\
             pid 3 consumer (vLLM consumer), GPU 0 in its jobs: 1 call(s), 1 failed\n  \
             cudaIpcOpenMemHandle x1\n  failed: line 1: cudaIpcOpenMemHandle on device 0 -> 201 \
             cudaErrorDeviceUninitialized (job 2: 1->0 consumer, copy)\n"
        );
    }
}

//! The framed binary protocol between the parent and its worker processes, over pipes.
//!
//! A frame is `u32` little-endian length, then that many bytes: a one-byte tag and the payload.
//! Decoding is strict (unknown tags, short or overlong payloads, bad UTF-8 and trailing bytes are
//! errors) and bounded ([`MAX_FRAME`]), so a confused or hostile worker yields a
//! [`ProtocolError`], never a panic or an unbounded allocation. The first frame a worker sends is
//! [`Message::Hello`] carrying [`VERSION`]; the parent refuses any other version.
//!
//! Version 2: every message about a pair carries its [`Job`] (position, pair, role, tier), so
//! several pairs can be in flight on one pipe, and outcomes are typed ([`Problem`]): the failing
//! CUDA call with its code, or the mismatch count and first bad offset, never just a string.
//! The IPC handle travels as its raw 64 bytes.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::cuda::{self, IPC_HANDLE_BYTES};
use crate::os;

/// Protocol version; bumped on any change to the encoding.
pub const VERSION: u16 = 2;
/// Magic bytes at the start of a Hello payload.
pub const MAGIC: [u8; 4] = *b"P2PC";
/// Largest frame accepted, tag included: far above any real message (a Start of 8 x 8 pairs is
/// about 1.3 KB), small enough that garbage on the pipe cannot make us allocate much.
pub const MAX_FRAME: usize = 64 * 1024;
/// Longest string carried (error texts), in bytes; longer ones are cut at a char boundary.
pub const MAX_TEXT: usize = 4096;
/// Most devices a worker may claim to see, or a Setup may name: far above any machine (NVLink
/// domains reach 72 GPUs), small enough that N x N pairs stay cheap.
pub const MAX_DEVICES: u32 = 256;

/// The part a worker plays in a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Owns the memory: allocates on `src`, exports the IPC handle, checks it afterwards.
    Producer,
    /// Maps the producer's memory on `tgt` and writes it.
    Consumer,
}

impl Role {
    /// `producer` or `consumer`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
        }
    }
}

/// One ordered pair: memory on `src`, accessed from `tgt` (local device ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    /// Device that owns the memory.
    pub src: u32,
    /// Device that maps and accesses it.
    pub tgt: u32,
}

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.src, self.tgt)
    }
}

/// How much evidence a check gathers, cumulative: each level includes the ones below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// vLLM's test: copy-engine memset through the mapping, both sides read back.
    Copy = 0,
    /// Also SM-issued stores and loads of a position-dependent pattern through the mapping,
    /// 1, 4, 8 and 16 bytes wide, over many pages (the C shim's kernels).
    Kernel = 1,
    /// Also kernels resident at the same time on both sides, exchanging a payload and a flag
    /// for several rounds with system-scope release/acquire (how all-reduce kernels
    /// synchronise), every wait bounded on the GPU clock.
    Handshake = 2,
}

impl Level {
    /// Every level, weakest first.
    pub const ALL: [Level; 3] = [Level::Copy, Level::Kernel, Level::Handshake];

    /// `copy`, `kernel` or `handshake`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Copy => "copy",
            Level::Kernel => "kernel",
            Level::Handshake => "handshake",
        }
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Level, String> {
        Level::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| format!("unknown level {s:?} (copy, kernel or handshake)"))
    }
}

/// How the tiers beyond copy run: the same for every pair of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierParams {
    /// Bytes of the kernel tier's pattern area per pair (a multiple of 256 KiB); 0 at level
    /// copy (then nothing beyond vLLM's 1 KiB is allocated).
    pub kernel_bytes: u32,
    /// The run's seed: every pattern derives from it, so stale data from an earlier run shows.
    pub seed: u64,
    /// Test only: the consumer's SM stores land this many bytes off (a planted fault, which
    /// the kernel tier must catch); 0 otherwise.
    pub shift: u32,
    /// Handshake rounds between two GPUs (same-GPU pairs do fewer: their kernels time-slice).
    pub rounds: u32,
    /// Each handshake kernel's budget on the GPU clock, in milliseconds.
    pub budget_ms: u32,
}

/// What a message is about: the pair's position in its batch, the pair, the sender's or
/// receiver's role in it, and the tier it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Job {
    /// Position of the pair in the batch (a batch may hold one pair twice).
    pub index: u32,
    /// The pair.
    pub pair: Pair,
    /// The role of the worker this message comes from or goes to.
    pub role: Role,
    /// The tier the step belongs to.
    pub tier: Level,
}

/// Rendezvous points of one pair in the vLLM engine, in the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// vLLM's barrier: the consumer has written 2s and synchronised.
    Copy = 0,
    /// Kernel tier: the consumer's SM stores are done.
    KernelStored = 1,
    /// Kernel tier: the producer has checked them and written the load pattern.
    ProducerRewrote = 2,
    /// Handshake tier: the producer launches its kernel; the consumer launches its own.
    Handshake = 3,
}

/// Which read-back found wrong bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A copy-engine read-back (`cudaMemcpy` to the host) after the consumer's memset.
    CopyReadBack,
    /// The owner's read-back of the consumer's SM stores.
    KernelStores,
    /// The consumer's SM loads of what the owner wrote.
    KernelLoads,
}

impl Check {
    /// What was checked, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Check::CopyReadBack => "copy read-back",
            Check::KernelStores => "peer SM stores, as the owner sees them",
            Check::KernelLoads => "SM loads through the mapping",
        }
    }
}

/// Why one side's part of a pair failed: typed, so that reports, the C ABI and the trace can
/// use the parts; [`Display`](fmt::Display) is for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A CUDA call returned an error code.
    Cuda {
        /// The function, e.g. `cudaIpcOpenMemHandle`.
        call: String,
        /// The device it concerned (the worker's local ordinal), where there is one.
        device: Option<i32>,
        /// The raw return code.
        code: i32,
        /// CUDA's name for it, e.g. `cudaErrorMapBufferObjectFailed`.
        name: String,
        /// CUDA's description.
        text: String,
    },
    /// The CUDA libraries could not be loaded or lack a symbol.
    Driver(String),
    /// Bytes read back were not what was written.
    Mismatch {
        /// Which read-back.
        check: Check,
        /// Bytes that differed.
        wrong: u64,
        /// Bytes checked.
        total: u64,
        /// Offset of the first differing byte.
        first_bad: u64,
        /// The value found there (`None` where the kernel does not report it).
        seen: Option<u8>,
        /// The value expected (for a pattern: 0, the bytes differ by offset).
        expected: u8,
        /// Width of the accesses in bytes: 0 for the copy engine, else 1, 4, 8 or 16 (SM).
        width: u8,
        /// Of the wrong bytes, those still holding the old contents: writes that never arrived.
        stale: u64,
    },
    /// The handshake tier did not complete.
    Handshake {
        /// Rounds asked for.
        rounds: u32,
        /// Rounds completed.
        done: u64,
        /// Payload bytes wrong when their flag said they were ready.
        payload_errors: u64,
        /// A wait reached its deadline on the GPU clock.
        timed_out: bool,
        /// GPU time the kernel ran.
        elapsed_ns: u64,
    },
    /// The other side could not do its part, so this side could not test: what it said.
    Peer(Box<Problem>),
}

impl From<cuda::Error> for Problem {
    fn from(e: cuda::Error) -> Problem {
        match e {
            cuda::Error::Cuda {
                call,
                device,
                code,
                name,
                text,
            } => Problem::Cuda {
                call: call.to_string(),
                device,
                code,
                name,
                text,
            },
            other => Problem::Driver(other.to_string()),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Cuda {
                call,
                device,
                code,
                name,
                text,
            } => cuda::fmt_failure(f, call, *device, *code, name, text),
            Problem::Driver(why) => f.write_str(why),
            Problem::Mismatch {
                check,
                wrong,
                total,
                first_bad,
                seen,
                expected,
                width,
                stale,
            } => {
                write!(f, "{}", check.describe())?;
                if *width > 0 {
                    write!(f, " ({width}-byte accesses)")?;
                }
                write!(
                    f,
                    ": {wrong} of {total} bytes wrong, first at byte {first_bad}"
                )?;
                if let Some(seen) = seen {
                    write!(f, " ({seen:#04x}, expected {expected:#04x})")?;
                }
                if *stale > 0 {
                    write!(f, ", {stale} of them still the old contents")?;
                }
                Ok(())
            }
            Problem::Handshake {
                rounds,
                done,
                payload_errors,
                timed_out,
                elapsed_ns,
            } => {
                write!(f, "handshake: {done} of {rounds} rounds")?;
                if *timed_out {
                    write!(
                        f,
                        ", then no flag from the other kernel within {:.1} ms",
                        *elapsed_ns as f64 / 1e6
                    )?;
                }
                if *payload_errors > 0 {
                    write!(f, ", {payload_errors} payload bytes wrong")?;
                }
                Ok(())
            }
            Problem::Peer(p) => write!(f, "the other side could not take part: {p}"),
        }
    }
}

/// What kind of failure a [`Problem`] is: the diagnosis a person acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Nothing written through the mapping arrived: the old contents remain.
    NeverWritten,
    /// Some pages arrived, others kept their old contents.
    Partial,
    /// Data arrived, but wrong.
    WrongData,
    /// `cudaIpcOpenMemHandle` failed: the memory could not be mapped at all.
    OpenFailed,
    /// A flag from the other kernel never became visible within the deadline.
    Timeout,
    /// Another failed call, or the driver could not be used.
    Other,
}

impl Class {
    /// `never-written`, `partial`, `wrong-data`, `open-failed`, `timeout`, `other`.
    pub fn name(self) -> &'static str {
        match self {
            Class::NeverWritten => "never-written",
            Class::Partial => "partial",
            Class::WrongData => "wrong-data",
            Class::OpenFailed => "open-failed",
            Class::Timeout => "timeout",
            Class::Other => "other",
        }
    }

    /// What usually causes it, for a person.
    pub fn hint(self) -> &'static str {
        match self {
            Class::NeverWritten => {
                "writes through the peer mapping never arrived; over PCIe, ACS with a \
                 translating IOMMU does this (check ACS in `lspci -vvv` and the IOMMU mode)"
            }
            Class::Partial => "only some pages arrived: a peer path that loses part of the traffic",
            Class::WrongData => "data arrived but wrong: a broken peer path or driver",
            Class::OpenFailed => {
                "the memory could not be mapped; in a container the processes must share the \
                 IPC and PID namespaces (docker: --ipc=host --pid=host)"
            }
            Class::Timeout => {
                "kernels running at the same time did not see each other's flags: a peer \
                 path that does not keep resident kernels coherent (what all-reduce needs)"
            }
            Class::Other => "see the failing call",
        }
    }
}

impl Problem {
    /// The diagnosis.
    pub fn class(&self) -> Class {
        match self {
            Problem::Cuda { call, .. } if call == "cudaIpcOpenMemHandle" => Class::OpenFailed,
            Problem::Cuda { .. } | Problem::Driver(_) => Class::Other,
            // A pattern's byte equals the old pattern's by chance at about 1 offset in 256,
            // and such bytes cannot be told wrong: "all" allows for them (1/64 of the bytes).
            Problem::Mismatch {
                wrong,
                total,
                stale,
                ..
            } => match (*stale == *wrong, *wrong + *total / 64 >= *total) {
                (true, true) => Class::NeverWritten,
                (true, false) => Class::Partial,
                (false, _) => Class::WrongData,
            },
            Problem::Handshake {
                timed_out: true, ..
            } => Class::Timeout,
            Problem::Handshake { .. } => Class::WrongData,
            Problem::Peer(p) => p.class(),
        }
    }
}

/// Outcome of a tier beyond copy as one side saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TierOutcome {
    /// Not run (not requested, or the mapping never opened).
    NotRun,
    /// Every byte matched.
    Ok,
    /// Wrong data or a failed call.
    Failed(Problem),
}

/// One side's verdict for one pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideVerdict {
    /// vLLM's test: `Ok` when this side read back all 2s after the consumer's memset.
    pub copy: Result<(), Problem>,
    /// Consumer only: `cudaDeviceCanAccessPeer(tgt, src)`, when it could be asked.
    pub claim: Option<bool>,
    /// The kernel tier, as this side saw it.
    pub kernel: TierOutcome,
    /// The handshake tier, as this side saw it.
    pub handshake: TierOutcome,
}

/// One step of a pair in the parallel engine, as the parent asks a worker to do it. Slots are
/// the producer's buffer cut in equal pieces (`worker::Layout`), one per consumer device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Consumer: map the producer's buffer (once per handle), set the slot's copy bytes to
    /// `value` (copy engine), synchronise, read them back.
    Write {
        /// The producer's buffer.
        handle: [u8; IPC_HANDLE_BYTES],
        /// The byte.
        value: u8,
    },
    /// Producer: check that the slot's copy bytes hold `expect` everywhere.
    Verify {
        /// The byte expected.
        expect: u8,
    },
    /// Consumer: SM stores of the store pattern into the slot's kernel area, every width.
    KernelStore,
    /// Producer: check the store pattern in its slot with SM loads, then write the load
    /// pattern there.
    VerifyStores,
    /// Consumer: SM loads of the load pattern through the mapping, every width.
    KernelLoad,
    /// Either side: its half of the handshake on the slot's handshake area (the producer
    /// serves on its own memory, the consumer drives through the mapping).
    Handshake,
}

/// Every message, both directions. Which side may send which is the engine's business.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Worker -> parent, first frame: CUDA started (`device_count`) or not.
    Hello {
        /// The worker's protocol version.
        version: u16,
        /// The worker's pid.
        pid: u32,
        /// Devices the worker sees, or why CUDA could not start.
        device_count: Result<u32, Problem>,
    },
    /// Parent -> worker (vLLM engine): the batch.
    Start {
        /// Producer or consumer.
        role: Role,
        /// How much to check.
        level: Level,
        /// How the tiers beyond copy run.
        tiers: TierParams,
        /// The pairs, in order.
        pairs: Vec<Pair>,
    },
    /// Producer -> parent -> consumer: the handle of a pair, or why there is none.
    Handle {
        /// The pair.
        job: Job,
        /// The raw handle, or the producer's error.
        handle: Result<[u8; IPC_HANDLE_BYTES], Problem>,
    },
    /// Consumer -> parent -> producer: whether `cudaIpcOpenMemHandle` worked.
    Opened {
        /// The pair.
        job: Job,
        /// Ok, or the open's error.
        result: Result<(), Problem>,
    },
    /// Either way: a barrier token.
    Barrier {
        /// The pair.
        job: Job,
        /// Which rendezvous.
        stage: Stage,
    },
    /// Worker -> parent (vLLM engine): this side's verdict for a pair.
    Verdict {
        /// The pair.
        job: Job,
        /// The verdict.
        verdict: SideVerdict,
        /// The worker's peak resident memory so far (`VmHWM`), in KiB.
        peak_rss_kb: u32,
    },
    /// Parent -> worker (parallel engine): use local device `device` for the whole run and, if
    /// `slots` > 0, export a buffer of that many slots, all set to the producer's value.
    Setup {
        /// The local ordinal this worker uses.
        device: u32,
        /// Slots to export (0: this worker only maps others' memory).
        slots: u32,
        /// How the tiers beyond copy run (the slot layout follows from it).
        tiers: TierParams,
    },
    /// Worker -> parent (parallel engine): the device is set up; the buffer's handle if one
    /// was asked for.
    Ready {
        /// The handle (`None` when no slots were asked for), or why set-up failed.
        result: Result<Option<[u8; IPC_HANDLE_BYTES]>, Problem>,
    },
    /// Parent -> worker (parallel engine): do `op` on `slot` for `job`.
    Step {
        /// The pair and role.
        job: Job,
        /// The slot of the producer's buffer.
        slot: u32,
        /// What to do.
        op: Op,
    },
    /// Worker -> parent (parallel engine): how a step went.
    Done {
        /// The pair and role.
        job: Job,
        /// Done, or what failed.
        result: Result<(), Problem>,
        /// A consumer's write: the driver's claim (`cudaDeviceCanAccessPeer(tgt, src)`), where
        /// the worker could ask it (it sees both devices).
        claim: Option<bool>,
        /// The worker's peak resident memory so far (`VmHWM`), in KiB.
        peak_rss_kb: u32,
    },
}

/// A frame that could not be read or decoded.
#[derive(Debug)]
pub enum ProtocolError {
    /// The peer closed its end (a worker that exited or died).
    Eof,
    /// A read or write failed.
    Io(io::Error),
    /// The bytes are not a valid frame.
    Malformed(String),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Eof => write!(f, "pipe closed"),
            ProtocolError::Io(e) => write!(f, "pipe I/O failed: {e}"),
            ProtocolError::Malformed(why) => write!(f, "malformed frame: {why}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        ProtocolError::Io(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn text(&mut self, s: &str) {
        let mut end = s.len().min(MAX_TEXT);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn opt_bool(&mut self, b: Option<bool>) {
        self.u8(match b {
            None => 2,
            Some(b) => u8::from(b),
        });
    }
    fn opt_u8(&mut self, v: Option<u8>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.u8(v);
            }
        }
    }
    fn handle(&mut self, h: &[u8; IPC_HANDLE_BYTES]) {
        self.0.extend_from_slice(h);
    }
    fn pair(&mut self, p: Pair) {
        self.u32(p.src);
        self.u32(p.tgt);
    }
    fn job(&mut self, j: &Job) {
        self.u32(j.index);
        self.pair(j.pair);
        self.u8(j.role as u8);
        self.u8(j.tier as u8);
    }
    fn problem(&mut self, p: &Problem) {
        match p {
            Problem::Cuda {
                call,
                device,
                code,
                name,
                text,
            } => {
                self.u8(0);
                self.text(call);
                match device {
                    None => self.u8(0),
                    Some(d) => {
                        self.u8(1);
                        self.i32(*d);
                    }
                }
                self.i32(*code);
                self.text(name);
                self.text(text);
            }
            Problem::Driver(why) => {
                self.u8(1);
                self.text(why);
            }
            Problem::Mismatch {
                check,
                wrong,
                total,
                first_bad,
                seen,
                expected,
                width,
                stale,
            } => {
                self.u8(2);
                self.u8(*check as u8);
                self.u64(*wrong);
                self.u64(*total);
                self.u64(*first_bad);
                self.opt_u8(*seen);
                self.u8(*expected);
                self.u8(*width);
                self.u64(*stale);
            }
            Problem::Handshake {
                rounds,
                done,
                payload_errors,
                timed_out,
                elapsed_ns,
            } => {
                self.u8(4);
                self.u32(*rounds);
                self.u64(*done);
                self.u64(*payload_errors);
                self.u8(u8::from(*timed_out));
                self.u64(*elapsed_ns);
            }
            Problem::Peer(inner) => {
                self.u8(3);
                // One level deep is all a peer report needs; deeper nesting is flattened.
                match inner.as_ref() {
                    Problem::Peer(deeper) => self.problem(&Problem::Driver(deeper.to_string())),
                    p => self.problem(p),
                }
            }
        }
    }
    fn result_unit(&mut self, r: &Result<(), Problem>) {
        match r {
            Ok(()) => self.u8(1),
            Err(p) => {
                self.u8(0);
                self.problem(p);
            }
        }
    }
    fn tiers(&mut self, t: &TierParams) {
        self.u32(t.kernel_bytes);
        self.u64(t.seed);
        self.u32(t.shift);
        self.u32(t.rounds);
        self.u32(t.budget_ms);
    }
    fn tier(&mut self, t: &TierOutcome) {
        match t {
            TierOutcome::NotRun => self.u8(0),
            TierOutcome::Ok => self.u8(1),
            TierOutcome::Failed(p) => {
                self.u8(2);
                self.problem(p);
            }
        }
    }
}

const TAG_HELLO: u8 = 1;
const TAG_START: u8 = 2;
const TAG_HANDLE: u8 = 3;
const TAG_OPENED: u8 = 4;
const TAG_BARRIER: u8 = 5;
const TAG_VERDICT: u8 = 6;
const TAG_SETUP: u8 = 7;
const TAG_READY: u8 = 8;
const TAG_STEP: u8 = 9;
const TAG_DONE: u8 = 10;

/// Encodes `msg` as one complete frame (length prefix included).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut e = Enc(vec![0; 4]);
    match msg {
        Message::Hello {
            version,
            pid,
            device_count,
        } => {
            e.u8(TAG_HELLO);
            e.0.extend_from_slice(&MAGIC);
            e.u16(*version);
            e.u32(*pid);
            match device_count {
                Ok(n) => {
                    e.u8(1);
                    e.u32(*n);
                }
                Err(why) => {
                    e.u8(0);
                    e.problem(why);
                }
            }
        }
        Message::Start {
            role,
            level,
            tiers,
            pairs,
        } => {
            e.u8(TAG_START);
            e.u8(*role as u8);
            e.u8(*level as u8);
            e.tiers(tiers);
            e.u32(pairs.len() as u32);
            for p in pairs {
                e.pair(*p);
            }
        }
        Message::Handle { job, handle } => {
            e.u8(TAG_HANDLE);
            e.job(job);
            match handle {
                Ok(h) => {
                    e.u8(1);
                    e.handle(h);
                }
                Err(why) => {
                    e.u8(0);
                    e.problem(why);
                }
            }
        }
        Message::Opened { job, result } => {
            e.u8(TAG_OPENED);
            e.job(job);
            e.result_unit(result);
        }
        Message::Barrier { job, stage } => {
            e.u8(TAG_BARRIER);
            e.job(job);
            e.u8(*stage as u8);
        }
        Message::Verdict {
            job,
            verdict,
            peak_rss_kb,
        } => {
            e.u8(TAG_VERDICT);
            e.job(job);
            e.result_unit(&verdict.copy);
            e.opt_bool(verdict.claim);
            e.tier(&verdict.kernel);
            e.tier(&verdict.handshake);
            e.u32(*peak_rss_kb);
        }
        Message::Setup {
            device,
            slots,
            tiers,
        } => {
            e.u8(TAG_SETUP);
            e.u32(*device);
            e.u32(*slots);
            e.tiers(tiers);
        }
        Message::Ready { result } => {
            e.u8(TAG_READY);
            match result {
                Ok(None) => e.u8(1),
                Ok(Some(h)) => {
                    e.u8(2);
                    e.handle(h);
                }
                Err(why) => {
                    e.u8(0);
                    e.problem(why);
                }
            }
        }
        Message::Step { job, slot, op } => {
            e.u8(TAG_STEP);
            e.job(job);
            e.u32(*slot);
            match op {
                Op::Write { handle, value } => {
                    e.u8(1);
                    e.handle(handle);
                    e.u8(*value);
                }
                Op::Verify { expect } => {
                    e.u8(2);
                    e.u8(*expect);
                }
                Op::KernelStore => e.u8(3),
                Op::VerifyStores => e.u8(4),
                Op::KernelLoad => e.u8(5),
                Op::Handshake => e.u8(6),
            }
        }
        Message::Done {
            job,
            result,
            claim,
            peak_rss_kb,
        } => {
            e.u8(TAG_DONE);
            e.job(job);
            e.result_unit(result);
            e.opt_bool(*claim);
            e.u32(*peak_rss_kb);
        }
    }
    let len = (e.0.len() - 4) as u32;
    e.0[..4].copy_from_slice(&len.to_le_bytes());
    e.0
}

// ---------------------------------------------------------------------------------------------
// Decoding

struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn malformed<T>(why: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError::Malformed(why.into()))
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() - self.pos < n {
            return malformed(format!("payload ends inside {what}"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &str) -> Result<i32, ProtocolError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    fn flag(&mut self, what: &str) -> Result<bool, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => malformed(format!("{what}: {v} is not a boolean")),
        }
    }
    fn opt_bool(&mut self, what: &str) -> Result<Option<bool>, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(Some(false)),
            1 => Ok(Some(true)),
            2 => Ok(None),
            v => malformed(format!("{what}: {v} is not an optional boolean")),
        }
    }
    fn opt_u8(&mut self, what: &str) -> Result<Option<u8>, ProtocolError> {
        Ok(if self.flag(what)? {
            Some(self.u8(what)?)
        } else {
            None
        })
    }
    fn text(&mut self, what: &str) -> Result<String, ProtocolError> {
        let n = self.u16(what)? as usize;
        if n > MAX_TEXT {
            return malformed(format!(
                "{what}: {n} bytes is over the {MAX_TEXT}-byte limit"
            ));
        }
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).or_else(|_| malformed(format!("{what}: not UTF-8")))
    }
    fn role(&mut self) -> Result<Role, ProtocolError> {
        match self.u8("role")? {
            0 => Ok(Role::Producer),
            1 => Ok(Role::Consumer),
            v => malformed(format!("role {v} is neither producer nor consumer")),
        }
    }
    fn level(&mut self) -> Result<Level, ProtocolError> {
        let v = self.u8("level")?;
        Level::ALL
            .into_iter()
            .find(|l| *l as u8 == v)
            .map_or_else(|| malformed(format!("unknown level {v}")), Ok)
    }
    fn device(&mut self, what: &str) -> Result<u32, ProtocolError> {
        let d = self.u32(what)?;
        if d >= MAX_DEVICES {
            return malformed(format!("{what} {d} is not below {MAX_DEVICES}"));
        }
        Ok(d)
    }
    fn pair(&mut self) -> Result<Pair, ProtocolError> {
        Ok(Pair {
            src: self.device("src")?,
            tgt: self.device("tgt")?,
        })
    }
    fn job(&mut self) -> Result<Job, ProtocolError> {
        Ok(Job {
            index: self.u32("job index")?,
            pair: self.pair()?,
            role: self.role()?,
            tier: self.level()?,
        })
    }
    fn check(&mut self) -> Result<Check, ProtocolError> {
        match self.u8("check")? {
            0 => Ok(Check::CopyReadBack),
            1 => Ok(Check::KernelStores),
            2 => Ok(Check::KernelLoads),
            v => malformed(format!("unknown check {v}")),
        }
    }
    fn problem(&mut self, depth: u8) -> Result<Problem, ProtocolError> {
        Ok(match self.u8("problem kind")? {
            0 => Problem::Cuda {
                call: self.text("call")?,
                device: if self.flag("has device")? {
                    Some(self.i32("device")?)
                } else {
                    None
                },
                code: self.i32("code")?,
                name: self.text("error name")?,
                text: self.text("error text")?,
            },
            1 => Problem::Driver(self.text("driver problem")?),
            2 => Problem::Mismatch {
                check: self.check()?,
                wrong: self.u64("wrong bytes")?,
                total: self.u64("total bytes")?,
                first_bad: self.u64("first bad offset")?,
                seen: self.opt_u8("seen")?,
                expected: self.u8("expected")?,
                width: self.u8("width")?,
                stale: self.u64("stale bytes")?,
            },
            4 => Problem::Handshake {
                rounds: self.u32("rounds")?,
                done: self.u64("rounds done")?,
                payload_errors: self.u64("payload errors")?,
                timed_out: self.flag("timed out")?,
                elapsed_ns: self.u64("elapsed")?,
            },
            3 if depth == 0 => Problem::Peer(Box::new(self.problem(1)?)),
            v => return malformed(format!("unknown problem kind {v} at depth {depth}")),
        })
    }
    fn result_unit(&mut self, what: &str) -> Result<Result<(), Problem>, ProtocolError> {
        Ok(if self.flag(what)? {
            Ok(())
        } else {
            Err(self.problem(0)?)
        })
    }
    fn tiers(&mut self) -> Result<TierParams, ProtocolError> {
        Ok(TierParams {
            kernel_bytes: self.u32("kernel bytes")?,
            seed: self.u64("seed")?,
            shift: self.u32("shift")?,
            rounds: self.u32("rounds")?,
            budget_ms: self.u32("budget")?,
        })
    }
    fn tier(&mut self) -> Result<TierOutcome, ProtocolError> {
        Ok(match self.u8("tier outcome")? {
            0 => TierOutcome::NotRun,
            1 => TierOutcome::Ok,
            2 => TierOutcome::Failed(self.problem(0)?),
            v => return malformed(format!("unknown tier outcome {v}")),
        })
    }
}

/// Decodes one frame body (tag and payload, without the length prefix).
pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
    let mut d = Dec { buf: body, pos: 0 };
    let msg = match d.u8("tag")? {
        TAG_HELLO => {
            if d.take(4, "magic")? != MAGIC {
                return malformed("Hello without the P2PC magic: not a p2pcheck worker");
            }
            let version = d.u16("version")?;
            if version != VERSION {
                // Later fields may be laid out differently: stop here, the caller reports it.
                return Ok(Message::Hello {
                    version,
                    pid: 0,
                    device_count: Err(Problem::Driver(format!("protocol version {version}"))),
                });
            }
            let pid = d.u32("pid")?;
            // A count beyond any machine is refused here, before anything is sized by it.
            let device_count = if d.flag("hello status")? {
                let n = d.u32("device count")?;
                if n > MAX_DEVICES {
                    return malformed(format!("a device count of {n} is over {MAX_DEVICES}"));
                }
                Ok(n)
            } else {
                Err(d.problem(0)?)
            };
            Message::Hello {
                version,
                pid,
                device_count,
            }
        }
        TAG_START => {
            let role = d.role()?;
            let level = d.level()?;
            let tiers = d.tiers()?;
            let n = d.u32("pair count")? as usize;
            if n > (MAX_FRAME - 31) / 8 {
                return malformed(format!("{n} pairs cannot fit in a frame"));
            }
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                pairs.push(d.pair()?);
            }
            Message::Start {
                role,
                level,
                tiers,
                pairs,
            }
        }
        TAG_HANDLE => {
            let job = d.job()?;
            let handle = if d.flag("handle status")? {
                Ok(d.array("IPC handle")?)
            } else {
                Err(d.problem(0)?)
            };
            Message::Handle { job, handle }
        }
        TAG_OPENED => Message::Opened {
            job: d.job()?,
            result: d.result_unit("open result")?,
        },
        TAG_BARRIER => {
            let job = d.job()?;
            let stage = match d.u8("stage")? {
                0 => Stage::Copy,
                1 => Stage::KernelStored,
                2 => Stage::ProducerRewrote,
                3 => Stage::Handshake,
                v => return malformed(format!("unknown barrier stage {v}")),
            };
            Message::Barrier { job, stage }
        }
        TAG_VERDICT => Message::Verdict {
            job: d.job()?,
            verdict: SideVerdict {
                copy: d.result_unit("copy result")?,
                claim: d.opt_bool("claim")?,
                kernel: d.tier()?,
                handshake: d.tier()?,
            },
            peak_rss_kb: d.u32("peak RSS")?,
        },
        TAG_SETUP => Message::Setup {
            device: d.device("device")?,
            slots: d.device("slots")?,
            tiers: d.tiers()?,
        },
        TAG_READY => Message::Ready {
            result: match d.u8("ready status")? {
                0 => Err(d.problem(0)?),
                1 => Ok(None),
                2 => Ok(Some(d.array("IPC handle")?)),
                v => return malformed(format!("unknown ready status {v}")),
            },
        },
        TAG_STEP => {
            let job = d.job()?;
            let slot = d.device("slot")?;
            let op = match d.u8("op")? {
                1 => Op::Write {
                    handle: d.array("IPC handle")?,
                    value: d.u8("value")?,
                },
                2 => Op::Verify {
                    expect: d.u8("expect")?,
                },
                3 => Op::KernelStore,
                4 => Op::VerifyStores,
                5 => Op::KernelLoad,
                6 => Op::Handshake,
                v => return malformed(format!("unknown op {v}")),
            };
            Message::Step { job, slot, op }
        }
        TAG_DONE => Message::Done {
            job: d.job()?,
            result: d.result_unit("step status")?,
            claim: d.opt_bool("claim")?,
            peak_rss_kb: d.u32("peak RSS")?,
        },
        tag => return malformed(format!("unknown tag {tag}")),
    };
    if d.pos != body.len() {
        return malformed(format!("{} trailing bytes", body.len() - d.pos));
    }
    Ok(msg)
}

/// Writes one message (blocking; frames are small enough to fit a pipe buffer).
pub fn send(w: &mut impl Write, msg: &Message) -> Result<(), ProtocolError> {
    w.write_all(&encode(msg))?;
    w.flush()?;
    Ok(())
}

/// Blocking read of one frame (the worker's side: its parent governs every deadline).
pub fn recv_blocking(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut len = [0u8; 4];
    read_exact_or_eof(r, &mut len)?;
    let len = frame_len(len)?;
    let mut body = vec![0u8; len];
    read_exact_or_eof(r, &mut body)?;
    decode(&body)
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Eof,
        _ => ProtocolError::Io(e),
    })
}

fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 || len > MAX_FRAME {
        return malformed(format!("frame length {len} outside 1..={MAX_FRAME}"));
    }
    Ok(len)
}

/// Reads frames from a pipe with deadlines (the parent's side), without blocking past them.
pub struct FrameReader {
    pipe: OwnedFd,
    buf: Vec<u8>,
}

impl FrameReader {
    /// Takes a readable pipe end (it is closed with the reader).
    pub fn new(pipe: impl Into<OwnedFd>) -> FrameReader {
        FrameReader {
            pipe: pipe.into(),
            buf: Vec::new(),
        }
    }

    /// The pipe's descriptor, for polling several readers at once.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.pipe.as_fd()
    }

    /// A complete frame already buffered, if any.
    pub fn buffered(&mut self) -> Result<Option<Message>, ProtocolError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = frame_len(self.buf[..4].try_into().expect("4 bytes"))?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// Reads what the pipe has now (call after `poll` said it is readable).
    pub fn fill(&mut self) -> Result<(), ProtocolError> {
        let mut chunk = [0u8; 4096];
        match os::read(self.pipe.as_fd(), &mut chunk) {
            Ok(0) => Err(ProtocolError::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => Ok(()),
                _ => Err(ProtocolError::Io(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn job(role: Role) -> Job {
        Job {
            index: 3,
            pair: Pair { src: 7, tgt: 2 },
            role,
            tier: Level::Kernel,
        }
    }

    fn cuda_problem() -> Problem {
        Problem::Cuda {
            call: "cudaIpcOpenMemHandle".into(),
            device: Some(1),
            code: 205,
            name: "cudaErrorMapBufferObjectFailed".into(),
            text: "mapping of buffer object failed".into(),
        }
    }

    fn mismatch() -> Problem {
        Problem::Mismatch {
            check: Check::KernelLoads,
            wrong: 17,
            total: 1024,
            first_bad: 7,
            seen: Some(0xee),
            expected: 4,
            width: 16,
            stale: 3,
        }
    }

    fn tiers() -> TierParams {
        TierParams {
            kernel_bytes: 2 << 20,
            seed: 0x0123_4567_89ab_cdef,
            shift: 64,
            rounds: 16,
            budget_ms: 1000,
        }
    }

    fn samples() -> Vec<Message> {
        let mut h = [0u8; IPC_HANDLE_BYTES];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        vec![
            Message::Hello {
                version: VERSION,
                pid: 4242,
                device_count: Ok(8),
            },
            Message::Hello {
                version: VERSION,
                pid: 1,
                device_count: Err(Problem::Cuda {
                    call: "cuInit".into(),
                    device: None,
                    code: 100,
                    name: "CUDA_ERROR_NO_DEVICE".into(),
                    text: "no CUDA-capable device is detected".into(),
                }),
            },
            Message::Start {
                role: Role::Consumer,
                level: Level::Kernel,
                tiers: tiers(),
                pairs: vec![Pair { src: 0, tgt: 1 }, Pair { src: 7, tgt: 3 }],
            },
            Message::Handle {
                job: job(Role::Producer),
                handle: Ok(h),
            },
            Message::Handle {
                job: job(Role::Producer),
                handle: Err(Problem::Driver("could not load libcudart".into())),
            },
            Message::Opened {
                job: job(Role::Consumer),
                result: Err(cuda_problem()),
            },
            Message::Opened {
                job: job(Role::Consumer),
                result: Ok(()),
            },
            Message::Barrier {
                job: job(Role::Consumer),
                stage: Stage::ProducerRewrote,
            },
            Message::Verdict {
                job: job(Role::Consumer),
                verdict: SideVerdict {
                    copy: Err(Problem::Peer(Box::new(cuda_problem()))),
                    claim: Some(false),
                    kernel: TierOutcome::Failed(mismatch()),
                    handshake: TierOutcome::Failed(Problem::Handshake {
                        rounds: 16,
                        done: 3,
                        payload_errors: 2,
                        timed_out: true,
                        elapsed_ns: 1_000_000_000,
                    }),
                },
                peak_rss_kb: 107_000,
            },
            Message::Verdict {
                job: job(Role::Producer),
                verdict: SideVerdict {
                    copy: Ok(()),
                    claim: None,
                    kernel: TierOutcome::Ok,
                    handshake: TierOutcome::NotRun,
                },
                peak_rss_kb: 0,
            },
            Message::Setup {
                device: 5,
                slots: 8,
                tiers: tiers(),
            },
            Message::Ready {
                result: Ok(Some(h)),
            },
            Message::Ready { result: Ok(None) },
            Message::Ready {
                result: Err(cuda_problem()),
            },
            Message::Step {
                job: job(Role::Consumer),
                slot: 2,
                op: Op::Write {
                    handle: h,
                    value: 2,
                },
            },
            Message::Step {
                job: job(Role::Producer),
                slot: 2,
                op: Op::Verify { expect: 2 },
            },
            Message::Step {
                job: job(Role::Consumer),
                slot: 1,
                op: Op::KernelStore,
            },
            Message::Step {
                job: job(Role::Producer),
                slot: 1,
                op: Op::VerifyStores,
            },
            Message::Step {
                job: job(Role::Consumer),
                slot: 1,
                op: Op::KernelLoad,
            },
            Message::Step {
                job: job(Role::Producer),
                slot: 1,
                op: Op::Handshake,
            },
            Message::Done {
                job: job(Role::Consumer),
                result: Ok(()),
                claim: Some(true),
                peak_rss_kb: 5,
            },
            Message::Done {
                job: job(Role::Producer),
                result: Err(mismatch()),
                claim: None,
                peak_rss_kb: 5,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let frame = encode(&m);
            let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 4);
            assert_eq!(decode(&frame[4..]).unwrap(), m);
            assert_eq!(recv_blocking(&mut &frame[..]).unwrap(), m);
        }
    }

    #[test]
    fn the_handle_travels_as_its_raw_64_bytes() {
        let h = [0xabu8; IPC_HANDLE_BYTES];
        let frame = encode(&Message::Handle {
            job: job(Role::Producer),
            handle: Ok(h),
        });
        // length(4) tag(1) job(4+8+1+1) status(1) handle(64)
        assert_eq!(frame.len(), 4 + 1 + 14 + 1 + 64);
        assert_eq!(&frame[20..], &h[..]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for m in samples() {
            let frame = encode(&m);
            for cut in 0..frame.len() - 4 {
                assert!(
                    matches!(decode(&frame[4..4 + cut]), Err(ProtocolError::Malformed(_))),
                    "{m:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: deterministic, no crates. Mutations of real frames reach deep branches.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let frames: Vec<Vec<u8>> = samples().iter().map(|m| encode(m)[4..].to_vec()).collect();
        for i in 0..20_000 {
            let mut body = frames[i % frames.len()].clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % body.len();
                body[at] = next() as u8;
            }
            let _ = decode(&body);
        }
    }

    #[test]
    fn trailing_bytes_unknown_tags_and_bad_values_are_rejected() {
        let mut body = encode(&Message::Barrier {
            job: job(Role::Producer),
            stage: Stage::Copy,
        })[4..]
            .to_vec();
        body.push(0);
        assert!(
            matches!(decode(&body), Err(ProtocolError::Malformed(m)) if m.contains("trailing"))
        );
        assert!(
            matches!(decode(&[99]), Err(ProtocolError::Malformed(m)) if m.contains("unknown tag"))
        );
        let mut barrier = encode(&Message::Barrier {
            job: job(Role::Producer),
            stage: Stage::Copy,
        })[4..]
            .to_vec();
        *barrier.last_mut().unwrap() = 7;
        assert!(
            matches!(decode(&barrier), Err(ProtocolError::Malformed(m)) if m.contains("stage"))
        );
        let mut hello = vec![TAG_HELLO];
        hello.extend_from_slice(b"XXXX");
        assert!(matches!(decode(&hello), Err(ProtocolError::Malformed(m)) if m.contains("magic")));
        // A pair count that cannot fit is refused before allocating.
        let mut start = vec![TAG_START, 0, 0];
        start.extend_from_slice(&[0; 24]); // the tier parameters
        start.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&start), Err(ProtocolError::Malformed(m)) if m.contains("pairs")));
        // A device id beyond any machine is refused, not used to size anything.
        let setup = encode(&Message::Setup {
            device: 0,
            slots: 1,
            tiers: tiers(),
        });
        let mut huge = setup[4..].to_vec();
        huge[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(ProtocolError::Malformed(m)) if m.contains("slots")));
        // Invalid UTF-8 in a text.
        let mut bad_text = encode(&Message::Opened {
            job: job(Role::Consumer),
            result: Err(Problem::Driver("ab".into())),
        })[4..]
            .to_vec();
        let n = bad_text.len();
        bad_text[n - 2..].copy_from_slice(&[0xff, 0xfe]);
        assert!(
            matches!(decode(&bad_text), Err(ProtocolError::Malformed(m)) if m.contains("UTF-8"))
        );
    }

    #[test]
    fn nested_peer_problems_are_flattened_and_refused_on_the_wire() {
        let deep = Problem::Peer(Box::new(Problem::Peer(Box::new(mismatch()))));
        let m = Message::Opened {
            job: job(Role::Consumer),
            result: Err(deep),
        };
        match decode(&encode(&m)[4..]).unwrap() {
            Message::Opened {
                result: Err(Problem::Peer(inner)),
                ..
            } => assert!(matches!(*inner, Problem::Driver(_))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_version_is_reported_not_misparsed() {
        let mut body = vec![TAG_HELLO];
        body.extend_from_slice(&MAGIC);
        body.extend_from_slice(&(VERSION + 1).to_le_bytes());
        body.extend_from_slice(&[1, 2, 3]); // a layout this version does not know
        match decode(&body).unwrap() {
            Message::Hello { version, .. } => assert_eq!(version, VERSION + 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn problems_are_classified_as_a_person_needs() {
        let m = |wrong, stale| Problem::Mismatch {
            check: Check::KernelStores,
            wrong,
            total: 1 << 21,
            first_bad: 0,
            seen: None,
            expected: 0,
            width: 4,
            stale,
        };
        // All wrong but the bytes the two patterns share by chance: nothing arrived.
        assert_eq!(
            m((1 << 21) - 8200, (1 << 21) - 8200).class(),
            Class::NeverWritten
        );
        assert_eq!(m(1 << 21, 1 << 21).class(), Class::NeverWritten);
        // Half the pages kept their old contents.
        assert_eq!(m(1 << 20, 1 << 20).class(), Class::Partial);
        // Wrong bytes that are not the old contents.
        assert_eq!(m(1 << 20, 4000).class(), Class::WrongData);
        assert_eq!(cuda_problem().class(), Class::OpenFailed);
        assert_eq!(
            Problem::Peer(Box::new(cuda_problem())).class(),
            Class::OpenFailed
        );
        let hs = |timed_out, payload_errors| Problem::Handshake {
            rounds: 16,
            done: 3,
            payload_errors,
            timed_out,
            elapsed_ns: 1,
        };
        assert_eq!(hs(true, 0).class(), Class::Timeout);
        assert_eq!(hs(false, 5).class(), Class::WrongData);
        assert_eq!(Problem::Driver("x".into()).class(), Class::Other);
        for c in [
            Class::NeverWritten,
            Class::Partial,
            Class::WrongData,
            Class::OpenFailed,
            Class::Timeout,
        ] {
            assert!(!c.hint().is_empty() && !c.name().is_empty());
        }
    }

    #[test]
    fn a_hello_claiming_more_devices_than_any_machine_is_refused() {
        let mut frame = encode(&Message::Hello {
            version: VERSION,
            pid: 1,
            device_count: Ok(MAX_DEVICES),
        });
        assert!(decode(&frame[4..]).is_ok());
        let n = frame.len();
        frame[n - 4..].copy_from_slice(&(MAX_DEVICES + 1).to_le_bytes());
        assert!(
            matches!(decode(&frame[4..]), Err(ProtocolError::Malformed(m)) if m.contains("device count"))
        );
        frame[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&frame[4..]).is_err());
    }

    #[test]
    fn frame_lengths_are_bounded() {
        let mut r = &(MAX_FRAME as u32 + 1).to_le_bytes()[..];
        assert!(matches!(
            recv_blocking(&mut r),
            Err(ProtocolError::Malformed(_))
        ));
        let mut r = &0u32.to_le_bytes()[..];
        assert!(matches!(
            recv_blocking(&mut r),
            Err(ProtocolError::Malformed(_))
        ));
        let mut empty = &[][..];
        assert!(matches!(recv_blocking(&mut empty), Err(ProtocolError::Eof)));
    }

    #[test]
    fn long_texts_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_TEXT); // 2 bytes each
        let m = Message::Opened {
            job: job(Role::Consumer),
            result: Err(Problem::Driver(long)),
        };
        match decode(&encode(&m)[4..]).unwrap() {
            Message::Opened {
                result: Err(Problem::Driver(t)),
                ..
            } => {
                assert!(t.len() <= MAX_TEXT && t.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }

    /// One message, waiting at most until `deadline` (`None` at the deadline).
    fn recv(reader: &mut FrameReader, deadline: Instant) -> Result<Option<Message>, ProtocolError> {
        loop {
            if let Some(m) = reader.buffered()? {
                return Ok(Some(m));
            }
            match os::poll_readable(&[reader.fd()], deadline)? {
                Some(_) => reader.fill()?,
                None => return Ok(None),
            }
        }
    }

    #[test]
    fn reader_reassembles_split_frames_and_honours_deadlines() {
        let (r, mut w) = os::pipe().unwrap();
        let mut reader = FrameReader::new(r);
        let msgs = samples();
        let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
        // Nothing written: times out promptly.
        let t = Instant::now();
        assert!(matches!(
            recv(&mut reader, Instant::now() + Duration::from_millis(50)),
            Ok(None)
        ));
        // Generous: proves the wait ended, not how fast (a loaded machine is slow).
        assert!(t.elapsed() < Duration::from_secs(30));
        let writer = std::thread::spawn(move || {
            for chunk in bytes.chunks(3) {
                w.write_all(chunk).unwrap();
            }
            // w dropped: EOF after the last frame.
        });
        for m in &msgs {
            assert_eq!(
                &recv(&mut reader, Instant::now() + Duration::from_secs(5))
                    .unwrap()
                    .unwrap(),
                m
            );
        }
        writer.join().unwrap();
        assert!(matches!(
            recv(&mut reader, Instant::now() + Duration::from_secs(5)),
            Err(ProtocolError::Eof)
        ));
    }
}

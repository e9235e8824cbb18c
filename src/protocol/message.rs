//! Every message between the parent and its workers, and why a frame could not be read.

use std::fmt;
use std::io;

use super::IPC_HANDLE_BYTES;
use crate::model::{Bandwidth, Level, Pair, Problem, Role, SideVerdict, TierParams, Transport};

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
    /// The transport the step uses (the vLLM engine's are all [`Transport::Ipc`]).
    pub transport: Transport,
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
    /// Consumer, cuMem transport: map the producer's cuMem allocation (once: its descriptor
    /// waits on the worker's socket, sent by the parent just before this step, when this
    /// worker has not mapped that producer's yet), then as [`Op::Write`].
    WriteCumem {
        /// The allocation's length, as its producer said.
        bytes: u64,
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
    /// Consumer: measure bandwidth and latency through the mapping of the producer's
    /// bandwidth area, and check the bytes moved; answered by [`Message::Measured`].
    Bandwidth,
}

/// Every message, both directions. Which side may send which is the engine's business.
#[derive(Clone, Debug, PartialEq)]
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
        /// Also export the slots as a cuMem allocation (with `slots` > 0), its descriptor sent
        /// over the worker's socket; and, either way, map peers' cuMem allocations on request.
        cumem: bool,
    },
    /// Worker -> parent (parallel engine): the device is set up; the buffer's handle if one
    /// was asked for.
    Ready {
        /// The handle (`None` when no slots were asked for), or why set-up failed.
        result: Result<Option<[u8; IPC_HANDLE_BYTES]>, Problem>,
        /// The cuMem allocation when one was asked for: its length (its descriptor was sent
        /// over the worker's socket just before this message), or why there is none.
        cumem: Option<Result<u64, Problem>>,
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
    /// Worker -> parent (parallel engine): the answer to an [`Op::Bandwidth`] step.
    Measured {
        /// The pair and role.
        job: Job,
        /// The figures, or what failed (a transfer, or the check of the bytes moved).
        result: Result<Bandwidth, Problem>,
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

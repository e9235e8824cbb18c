//! What is checked: ordered pairs of devices, the level of evidence, the roles the two
//! processes of a pair play, and how the tiers beyond copy run.

use std::fmt;

/// The part a worker plays in a pair.
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

/// How a pair's processes reach each other's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// Legacy CUDA IPC: `cudaIpcGetMemHandle`/`cudaIpcOpenMemHandle`, what vLLM's custom
    /// all-reduce and its check use (the vLLM cache speaks of this transport only).
    Ipc = 0,
    /// The driver's virtual memory API: `cuMemCreate` with POSIX descriptor handles, the
    /// descriptor exported (`cuMemExportToShareableHandle`), passed to the other process over a
    /// Unix socket (`SCM_RIGHTS`), imported, mapped and granted access there (`cuMemMap`,
    /// `cuMemSetAccess`): what PyTorch's symmetric memory and NCCL (`NCCL_CUMEM_ENABLE`) use.
    Cumem = 1,
}

impl Transport {
    /// Every transport, in report order.
    pub const ALL: [Transport; 2] = [Transport::Ipc, Transport::Cumem];

    /// `ipc` or `cumem`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ipc => "ipc",
            Transport::Cumem => "cumem",
        }
    }
}

/// Which transports a check runs every tier over (`--transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Transports {
    /// Legacy IPC alone (the default: what vLLM's check does).
    #[default]
    Ipc,
    /// The cuMem path alone.
    Cumem,
    /// Both, legacy IPC first.
    All,
}

impl Transports {
    /// Every choice.
    pub const ALL: [Transports; 3] = [Transports::Ipc, Transports::Cumem, Transports::All];

    /// `ipc`, `cumem` or `all`.
    pub fn name(self) -> &'static str {
        match self {
            Transports::Ipc => "ipc",
            Transports::Cumem => "cumem",
            Transports::All => "all",
        }
    }

    /// The transports chosen, in report order.
    pub fn list(self) -> &'static [Transport] {
        match self {
            Transports::Ipc => &[Transport::Ipc],
            Transports::Cumem => &[Transport::Cumem],
            Transports::All => &Transport::ALL,
        }
    }

    /// Whether `t` is among them.
    pub fn has(self, t: Transport) -> bool {
        self.list().contains(&t)
    }
}

impl std::str::FromStr for Transports {
    type Err = String;
    fn from_str(s: &str) -> Result<Transports, String> {
        Transports::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown transport {s:?} (ipc, cumem or all)"))
    }
}

/// One ordered pair over one transport: what one attempt checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// The transport (first: a batch sorted by route runs legacy IPC first).
    pub transport: Transport,
    /// The pair.
    pub pair: Pair,
}

/// Every ordered pair of `n` devices, row-major (src outer), as vLLM's cache orders them.
pub fn all_pairs(n: u32) -> Vec<Pair> {
    (0..n)
        .flat_map(|src| (0..n).map(move |tgt| Pair { src, tgt }))
        .collect()
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
    /// Bytes of each timed transfer of the bandwidth measurement (a multiple of 2 MiB); 0 when
    /// it does not run (then nothing is allocated for it).
    pub bandwidth_bytes: u32,
}

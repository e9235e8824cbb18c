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
}

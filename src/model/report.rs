//! The result of one check run ([`Report`]), and the run's settings it records.

use std::path::PathBuf;
use std::time::Duration;

use super::{Level, Link, Pair, PairBandwidth, PairReport, Transport, Transports};

/// Which procedure checks the pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// One worker per GPU for the whole run, every pair at once, no device reset.
    Parallel,
    /// vLLM's procedure exactly: two workers, pair after pair, a device reset after each.
    Vllm,
}

impl Engine {
    /// `parallel` or `vllm`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Parallel => "parallel",
            Engine::Vllm => "vllm",
        }
    }
}

/// Which GPUs a parallel-engine worker's CUDA sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visibility {
    /// Only its own GPU (`CUDA_VISIBLE_DEVICES` = that GPU's UUID): CUDA starts faster the
    /// fewer GPUs it sees, and IPC mappings of a GPU it cannot see work the same. Needs the
    /// GPUs' UUIDs from `/proc/driver/nvidia`; where they cannot be known without CUDA (MIG,
    /// GPUs hidden from /proc, mixed models under CUDA's default order) the check falls back
    /// to [`Visibility::All`] and says why.
    One,
    /// Every GPU this process sees (its own `CUDA_VISIBLE_DEVICES`). The vLLM engine always
    /// runs this way.
    All,
}

impl Visibility {
    /// `one` or `all`.
    pub fn name(self) -> &'static str {
        match self {
            Visibility::One => "one",
            Visibility::All => "all",
        }
    }
}

/// One worker process of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its pid.
    pub pid: u32,
    /// Its part: "producer", "worker of GPU 2", ...
    pub label: String,
    /// How many GPUs its CUDA saw (`None`: it never said).
    pub sees: Option<u32>,
    /// Its peak resident memory as last reported, in KiB (0: never reported).
    pub peak_rss_kb: u32,
}

/// The result of one check run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Devices checked (the devices this process sees).
    pub device_count: u32,
    /// One entry per pair and transport, in batch order, transport by transport (legacy IPC
    /// first); every pair is accounted for over every transport asked for.
    pub pairs: Vec<PairReport>,
    /// The engine used.
    pub engine: Engine,
    /// The level checked.
    pub level: Level,
    /// The transports every tier ran over.
    pub transport: Transports,
    /// What the workers saw (after any fallback).
    pub visibility: Visibility,
    /// Time from the start of the check to the last verdict (worker exit is not included:
    /// it happens after).
    pub answer: Duration,
    /// The worker executable used.
    pub worker: PathBuf,
    /// Rounds of fresh workers after the first: for the pairs a hang or a death interrupted,
    /// and for second attempts (0 when every pair passed at once).
    pub restarts: u32,
    /// Worker processes started, in all rounds.
    pub workers_started: u32,
    /// The most pairs in flight at one moment.
    pub peak_in_flight: u32,
    /// Every worker started, in order.
    pub workers: Vec<WorkerInfo>,
    /// Things the caller should know that are not a pair's verdict (a visibility fallback,
    /// an ignored part of `CUDA_VISIBLE_DEVICES`, disagreeing sides).
    pub warnings: Vec<String>,
    /// The bandwidth of each pair measured (`Options::bandwidth`; empty without it): the
    /// pairs whose copy tier passed, in pair order.
    pub bandwidth: Vec<PairBandwidth>,
}

impl Report {
    /// A report of no pair: what an empty batch gives, without a worker.
    pub fn empty(
        engine: Engine,
        level: Level,
        transport: Transports,
        visibility: Visibility,
    ) -> Report {
        Report {
            device_count: 0,
            pairs: Vec::new(),
            engine,
            level,
            transport,
            visibility,
            answer: Duration::ZERO,
            worker: PathBuf::new(),
            restarts: 0,
            workers_started: 0,
            peak_in_flight: 0,
            workers: Vec::new(),
            warnings: Vec::new(),
            bandwidth: Vec::new(),
        }
    }

    /// Judges every bandwidth measurement again, with the path `link` gives for its pair and
    /// the caller's floor `min_gbps` ([`PairBandwidth::judge`]).
    pub fn judge_bandwidth(&mut self, link: impl Fn(Pair) -> Link, min_gbps: Option<f64>) {
        for b in &mut self.bandwidth {
            *b = PairBandwidth::judge(b.pair, b.measured.clone(), link(b.pair), min_gbps);
        }
    }

    /// The bandwidth measured for `pair`, if it was.
    pub fn bandwidth_of(&self, src: u32, tgt: u32) -> Option<&PairBandwidth> {
        self.bandwidth.iter().find(|b| b.pair == Pair { src, tgt })
    }

    /// The report for `pair` over the first transport checked (legacy IPC unless only the
    /// cuMem transport was), if it was checked.
    pub fn get(&self, src: u32, tgt: u32) -> Option<&PairReport> {
        self.get_on(self.transport.list()[0], src, tgt)
    }

    /// The report for `pair` over `transport`, if it was checked.
    pub fn get_on(&self, transport: Transport, src: u32, tgt: u32) -> Option<&PairReport> {
        self.on(transport).find(|p| p.pair == Pair { src, tgt })
    }

    /// The entries of `transport`, in batch order.
    pub fn on(&self, transport: Transport) -> impl Iterator<Item = &PairReport> {
        self.pairs.iter().filter(move |p| p.transport == transport)
    }

    /// The entries of the first transport checked: legacy IPC's (the answers vLLM's
    /// functions give), or the cuMem transport's when only it was checked.
    pub fn primary(&self) -> impl Iterator<Item = &PairReport> {
        self.on(self.transport.list()[0])
    }

    /// The largest peak resident memory any worker reported, in KiB.
    pub fn worker_max_rss_kb(&self) -> Option<u32> {
        self.workers
            .iter()
            .map(|w| w.peak_rss_kb)
            .filter(|&k| k > 0)
            .max()
    }

    /// Whether every verdict for vLLM's cache (legacy IPC's) may be written to it (see
    /// [`PairReport::persistable`]).
    pub fn persistable(&self) -> bool {
        self.on(Transport::Ipc).all(PairReport::persistable)
    }
}

//! What the bandwidth measurement (`--bandwidth`) found for a pair, and its verdict: `slow`
//! when a figure is below the floor of the pair's link ([`Link::floor_gbps`]) or the caller's
//! own floor.

use super::{Link, Pair, Problem};

/// How a figure's bytes move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mover {
    /// The copy engine (`cuMemcpyDtoDAsync`).
    CopyEngine,
    /// SM loads and stores (`p2pc_copy`), as an all-reduce kernel moves data.
    Sm,
}

/// Which way a figure's bytes go, seen from the consumer (the process on `tgt` that maps
/// `src`'s memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Local memory into the mapping (`tgt` writes `src`'s memory).
    Write,
    /// The mapping into local memory (`tgt` reads `src`'s memory).
    Read,
    /// A write and a read at once, on two streams (the figure counts both).
    Both,
}

/// The figures of a pair, in the order [`Bandwidth::figures`] holds them.
pub const FIGURES: [(Mover, Direction); 6] = [
    (Mover::CopyEngine, Direction::Write),
    (Mover::CopyEngine, Direction::Read),
    (Mover::CopyEngine, Direction::Both),
    (Mover::Sm, Direction::Write),
    (Mover::Sm, Direction::Read),
    (Mover::Sm, Direction::Both),
];

/// The name of a figure in JSON and tables: `ce_write`, `sm_both`, ...
pub fn figure_name(mover: Mover, direction: Direction) -> &'static str {
    match (mover, direction) {
        (Mover::CopyEngine, Direction::Write) => "ce_write",
        (Mover::CopyEngine, Direction::Read) => "ce_read",
        (Mover::CopyEngine, Direction::Both) => "ce_both",
        (Mover::Sm, Direction::Write) => "sm_write",
        (Mover::Sm, Direction::Read) => "sm_read",
        (Mover::Sm, Direction::Both) => "sm_both",
    }
}

/// One figure: the median of its timed samples and their spread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Figure {
    /// Median GB/s (10^9 bytes a second) of the samples.
    pub gbps: f64,
    /// Coefficient of variation of the samples (standard deviation over mean), 0.01 = 1 %.
    pub cv: f64,
}

impl Figure {
    /// The median and coefficient of variation of `gbps` (0 and 0 when empty).
    pub fn of(gbps: &[f64]) -> Figure {
        if gbps.is_empty() {
            return Figure { gbps: 0.0, cv: 0.0 };
        }
        let mut sorted = gbps.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let mean = gbps.iter().sum::<f64>() / n as f64;
        let var = gbps.iter().map(|g| (g - mean) * (g - mean)).sum::<f64>() / n as f64;
        let cv = if mean > 0.0 { var.sqrt() / mean } else { 0.0 };
        Figure { gbps: median, cv }
    }
}

/// Every figure of a pair, measured through the IPC mapping by the consumer.
#[derive(Clone, Debug, PartialEq)]
pub struct Bandwidth {
    /// One per entry of [`FIGURES`], in that order.
    pub figures: [Figure; 6],
    /// One dependent 8-byte load through the mapping (a pointer chase), in nanoseconds.
    pub latency_ns: f64,
}

impl Bandwidth {
    /// The figure for `mover` and `direction`.
    pub fn figure(&self, mover: Mover, direction: Direction) -> Figure {
        let i = FIGURES
            .iter()
            .position(|&f| f == (mover, direction))
            .unwrap_or(0);
        self.figures[i]
    }

    /// The figures the floor applies to: the copy engine's one-way write and read (the floors
    /// come from published copy-engine figures, one direction at a time), the lower of them.
    pub fn judged_gbps(&self) -> f64 {
        let w = self.figure(Mover::CopyEngine, Direction::Write).gbps;
        let r = self.figure(Mover::CopyEngine, Direction::Read).gbps;
        w.min(r)
    }
}

/// Where a pair's floor came from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Floor {
    /// The caller's (`--min-gbps`, [`Options::min_gbps`](crate::Options::min_gbps)).
    Given(f64),
    /// The link's ([`Link::floor_gbps`]).
    Link(f64),
    /// None: the link is unknown (or one GPU's own memory) and the caller gave none.
    None,
}

impl Floor {
    /// The floor in GB/s, if there is one.
    pub fn gbps(self) -> Option<f64> {
        match self {
            Floor::Given(g) | Floor::Link(g) => Some(g),
            Floor::None => None,
        }
    }
}

/// A pair's bandwidth: what was measured, the path, the floor and the verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct PairBandwidth {
    /// The pair.
    pub pair: Pair,
    /// The figures, or why there are none (a failed transfer, or wrong bytes after the
    /// copies: a fast wrong copy is a failure, never a figure).
    pub measured: Result<Bandwidth, Problem>,
    /// The path between the two GPUs, as far as it is known.
    pub link: Link,
    /// The floor the figures were judged against.
    pub floor: Floor,
    /// Whether a judged figure ([`Bandwidth::judged_gbps`]) is below the floor.
    pub slow: bool,
}

impl PairBandwidth {
    /// Judges `measured` for `pair` over `link`: the caller's floor `min_gbps` wins (for two
    /// GPUs; one GPU's own memory is a reference, never slow), else the link's.
    pub fn judge(
        pair: Pair,
        measured: Result<Bandwidth, Problem>,
        link: Link,
        min_gbps: Option<f64>,
    ) -> PairBandwidth {
        let floor = match (min_gbps, link.floor_gbps()) {
            _ if pair.src == pair.tgt => Floor::None,
            (Some(g), _) => Floor::Given(g),
            (None, Some(g)) => Floor::Link(g),
            (None, None) => Floor::None,
        };
        let slow = match (&measured, floor.gbps()) {
            (Ok(b), Some(f)) => b.judged_gbps() < f,
            _ => false,
        };
        PairBandwidth {
            pair,
            measured,
            link,
            floor,
            slow,
        }
    }

    /// Whether the measurement found a fault: a slow pair, or one whose figures could not be
    /// had (a failed transfer or wrong bytes).
    pub fn failed(&self) -> bool {
        self.slow || self.measured.is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(ce: f64) -> Bandwidth {
        let mut figures = [Figure {
            gbps: 360.0,
            cv: 0.01,
        }; 6];
        figures[0].gbps = ce;
        Bandwidth {
            figures,
            latency_ns: 2000.0,
        }
    }

    #[test]
    fn median_and_spread_of_samples() {
        let f = Figure::of(&[10.0, 30.0, 20.0, 20.0, 20.0]);
        assert_eq!(f.gbps, 20.0);
        assert!((f.cv - 40.0f64.sqrt() / 20.0).abs() < 1e-12);
        assert_eq!(Figure::of(&[1.0, 3.0]).gbps, 2.0);
        assert_eq!(Figure::of(&[]), Figure { gbps: 0.0, cv: 0.0 });
    }

    #[test]
    fn a_pair_below_its_links_floor_is_slow_and_the_given_floor_wins() {
        let pair = Pair { src: 0, tgt: 1 };
        let nv4 = Link::NvLink {
            version: 6,
            links: 18,
        };
        let host = PairBandwidth::judge(pair, Ok(figures(20.0)), nv4, None);
        assert_eq!((host.floor, host.slow), (Floor::Link(270.0), true));
        let healthy = PairBandwidth::judge(pair, Ok(figures(370.0)), nv4, None);
        assert!(!healthy.slow && !healthy.failed());
        let azure = PairBandwidth::judge(pair, Ok(figures(330.0)), nv4, Some(335.0));
        assert_eq!((azure.floor, azure.slow), (Floor::Given(335.0), true));
        let unknown = PairBandwidth::judge(pair, Ok(figures(20.0)), Link::Unknown, None);
        assert_eq!((unknown.floor, unknown.slow), (Floor::None, false));
        let own = PairBandwidth::judge(Pair { src: 1, tgt: 1 }, Ok(figures(20.0)), nv4, Some(1e4));
        assert_eq!((own.floor, own.slow), (Floor::None, false));
        let wrong = PairBandwidth::judge(pair, Err(Problem::Driver("x".into())), nv4, None);
        assert!(!wrong.slow && wrong.failed());
    }
}

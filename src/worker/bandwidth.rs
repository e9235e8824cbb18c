//! The bandwidth measurement, on the consumer's side (README, "Bandwidth"): every figure
//! through the mapping of the producer's bandwidth area, timed on the GPU, then the bytes
//! moved checked with the kernel tier's pattern check, so that a fast wrong copy is a failure,
//! never a figure; then the latency of one dependent load through the mapping.
//!
//! Remote memory (the producer's area): transfer `X` (written), transfer `Y` (read) and the
//! chase area. Local memory (the consumer's own buffer): `A` (the source of writes) and `B`
//! (the destination of reads). Both ways at once is `A -> X` and `Y -> B` on two streams.

use crate::cuda::{DeviceView, Kernels, Mover as CudaMover};
use crate::model::{Bandwidth, Check, Direction, Figure, Mover, Problem, FIGURES};

/// Transfers queued per sample, back to back behind the spin kernel (the shim takes up to
/// `P2PC_MAX_LOOPS`).
const LOOPS: u32 = 4;
/// Timed samples per figure, after one untimed warm-up (which also pays the first touch of
/// the mapping's range: README, "The bimodal SM-store figure").
const SAMPLES: usize = 5;
/// The spin kernel's own deadline on the GPU clock: far above the time to queue a sample.
const SPIN_BUDGET_NS: u64 = 100_000_000;
/// The pointer chase: slots 4160 bytes apart (not a power of two: no cache-set aliasing),
/// one warm-up pass over every slot, then the timed hops.
const CHASE_SLOTS: u64 = 1024;
const CHASE_STRIDE: u64 = 4160;
const CHASE_HOPS: u64 = 4096;
/// The chase area: 1024 x 4160 bytes, rounded up to whole 2 MiB pages.
const CHASE_AREA: u64 = (CHASE_SLOTS * CHASE_STRIDE).div_ceil(2 << 20) * (2 << 20);
const _: () = assert!(CHASE_AREA >= CHASE_SLOTS * CHASE_STRIDE);

/// Bytes of a producer's bandwidth area for transfers of `transfer` bytes (0: none).
pub(crate) fn area_bytes(transfer: u64) -> u64 {
    match transfer {
        0 => 0,
        t => 2 * t + CHASE_AREA,
    }
}

/// Bytes of the consumer's own buffer for transfers of `transfer` bytes.
pub(crate) fn local_bytes(transfer: u64) -> u64 {
    2 * transfer
}

/// Measures every figure and the latency: `remote` is the producer's bandwidth area through
/// the mapping ([`area_bytes`]), `local` the consumer's buffer ([`local_bytes`]), `seed` the
/// run's (every figure's patterns derive from it, so bytes left by an earlier figure show).
pub(crate) fn measure(
    k: &Kernels,
    remote: DeviceView<'_>,
    local: DeviceView<'_>,
    transfer: u64,
    seed: u64,
) -> Result<Bandwidth, Problem> {
    let bw = k.bandwidth()?;
    let t = transfer;
    let (x, y) = (remote.slice(0..t)?, remote.slice(t..2 * t)?);
    let chase = remote.slice(2 * t..2 * t + CHASE_AREA)?;
    let (a, b) = (local.slice(0..t)?, local.slice(t..2 * t)?);
    let mut figures = [Figure { gbps: 0.0, cv: 0.0 }; 6];
    for (i, &(mover, direction)) in FIGURES.iter().enumerate() {
        let s = seed ^ (0xb4d0_u64 << 48) ^ ((i as u64 + 1) << 40);
        // (destination, source, the source's pattern) of each transfer.
        let copies: Vec<(DeviceView<'_>, DeviceView<'_>, u64)> = match direction {
            Direction::Write => vec![(x, a, s)],
            Direction::Read => vec![(b, y, s)],
            Direction::Both => vec![(x, a, s), (b, y, s + 2)],
        };
        for &(dst, src, p) in &copies {
            k.pattern_store(src, p, 16, 0)?;
            k.pattern_store(dst, p ^ 1, 16, 0)?;
        }
        let engine = match mover {
            Mover::CopyEngine => CudaMover::CopyEngine,
            Mover::Sm => CudaMover::Sm,
        };
        let (dst, src, _) = copies[0];
        let second = copies.get(1).map(|&(d, s, _)| (d, s));
        let bytes = t as f64 * f64::from(LOOPS) * copies.len() as f64;
        let mut gbps = Vec::with_capacity(SAMPLES);
        for sample in 0..=SAMPLES {
            let r = bw.timed_copy(engine, dst, src, second, LOOPS, SPIN_BUDGET_NS)?;
            if r.elapsed_ns == 0 {
                return Err(Problem::Driver(format!(
                    "the {} timed 0 ns for {bytes} bytes: no figure",
                    figure_words(mover, direction)
                )));
            }
            if sample > 0 {
                gbps.push(bytes / r.elapsed_ns as f64);
            }
        }
        for &(dst, _, p) in &copies {
            let c = k.pattern_check(dst, p, p ^ 1, 16)?;
            if c.wrong > 0 {
                return Err(Problem::Mismatch {
                    check: Check::BandwidthCopies,
                    wrong: c.wrong,
                    total: t,
                    first_bad: c.first_bad.unwrap_or(0),
                    seen: None,
                    expected: 0,
                    width: 16,
                    stale: c.stale,
                });
            }
        }
        figures[i] = Figure::of(&gbps);
    }
    let c = bw.chase(chase, CHASE_SLOTS, CHASE_STRIDE, CHASE_SLOTS, CHASE_HOPS)?;
    let end = ((CHASE_SLOTS + CHASE_HOPS) % CHASE_SLOTS) * CHASE_STRIDE;
    if c.reached != end {
        return Err(Problem::Driver(format!(
            "the pointer chase through the mapping ended at offset {}, not {end}: the chain \
             read back wrong",
            c.reached
        )));
    }
    Ok(Bandwidth {
        figures,
        latency_ns: c.ns as f64 / CHASE_HOPS as f64,
    })
}

/// "copy engine's write", for messages.
fn figure_words(mover: Mover, direction: Direction) -> String {
    let m = match mover {
        Mover::CopyEngine => "copy engine",
        Mover::Sm => "SM copy",
    };
    let d = match direction {
        Direction::Write => "write",
        Direction::Read => "read",
        Direction::Both => "write and read at once",
    };
    format!("{m}'s {d}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_area_holds_two_transfers_and_the_chain_on_whole_pages() {
        assert_eq!(CHASE_AREA, 6 << 20);
        assert_eq!(area_bytes(0), 0);
        assert_eq!(area_bytes(64 << 20), (128 + 6) << 20);
        assert_eq!(local_bytes(64 << 20), 128 << 20);
    }
}

//! The kernel and handshake tiers, one side at a time: the same code for both engines.
//!
//! Each pair gets a *slot* of the producer's memory: vLLM's 1 KiB copy bytes at its start, a
//! 2 KiB handshake area on the same page, and (at 2 MiB) the kernel tier's pattern area of
//! `kernel_bytes`, cut in four parts tested with SM accesses 1, 4, 8 and 16 bytes wide. Every
//! byte of a pattern depends on its offset and the run's seed, so a store to a wrong address, a
//! lost page or stale contents show as wrong bytes; the bytes that still hold the old pattern
//! tell "never arrived" from "arrived wrong".

use std::ops::Range;

use crate::cuda::{self, DeviceView, Kernels, PatternCount, HANDSHAKE_AREA_BYTES};
use crate::model::{Check, Problem, TierParams};

use super::TEST_BYTES;

/// Where the parts of a slot are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    kernel_bytes: u64,
}

/// Offset of the handshake area in a slot (page 0, with the copy bytes).
const HANDSHAKE_OFFSET: u64 = 4096;
/// Offset of the pattern area: its own huge page on.
const KERNEL_OFFSET: u64 = 2 << 20;
/// Bytes after the pattern area that no pair uses.
const GUARD_BYTES: u64 = 2 << 20;
/// The access widths of the pattern area's four parts.
pub(crate) const WIDTHS: [u32; 4] = [1, 4, 8, 16];
/// Handshake rounds for a same-GPU pair: two processes' kernels on one GPU time-slice (about
/// 4.5 ms a round trip on an H200), so a few rounds prove the path without a long wait.
const SAME_GPU_ROUNDS: u32 = 3;

/// What a pattern is for; each gives the run's seed a different twist.
#[derive(Clone, Copy)]
enum Pattern {
    /// The producer's initial contents: what a write that never arrived leaves behind.
    Old = 1,
    /// The consumer's SM stores.
    Store = 2,
    /// The producer's contents for the consumer's SM loads.
    Load = 3,
    /// The handshake payloads.
    Handshake = 4,
}

/// A slot's handshake area.
fn handshake_area(slot: DeviceView<'_>) -> cuda::Result<DeviceView<'_>> {
    slot.slice(HANDSHAKE_OFFSET..HANDSHAKE_OFFSET + HANDSHAKE_AREA_BYTES)
}

fn seed(tiers: &TierParams, pattern: Pattern, part: usize) -> u64 {
    tiers.seed ^ ((pattern as u64) << 56) ^ (part as u64 + 1).wrapping_mul(0x1_0000_0001)
}

impl Layout {
    /// The layout for `tiers` (no pattern area at level copy).
    pub(crate) fn new(tiers: &TierParams) -> Layout {
        Layout {
            kernel_bytes: u64::from(tiers.kernel_bytes),
        }
    }

    /// Whether the tiers beyond copy run.
    pub(crate) fn has_tiers(&self) -> bool {
        self.kernel_bytes > 0
    }

    /// Bytes of one slot: vLLM's 1 KiB at level copy.
    pub(crate) fn slot_bytes(&self) -> u64 {
        if self.has_tiers() {
            KERNEL_OFFSET + self.kernel_bytes + GUARD_BYTES
        } else {
            TEST_BYTES as u64
        }
    }

    fn part_bytes(&self) -> u64 {
        self.kernel_bytes / WIDTHS.len() as u64
    }

    /// The bytes of slot `slot` in a buffer of slots (saturating: a slot number too large for
    /// any buffer gives a range that no view holds).
    pub(crate) fn slot_range(&self, slot: u32) -> Range<u64> {
        let start = u64::from(slot).saturating_mul(self.slot_bytes());
        start..start.saturating_add(self.slot_bytes())
    }

    /// Part `part` of a slot's pattern area.
    fn part<'a>(&self, slot: DeviceView<'a>, part: usize) -> cuda::Result<DeviceView<'a>> {
        let start = KERNEL_OFFSET + part as u64 * self.part_bytes();
        slot.slice(start..start + self.part_bytes())
    }

    /// Producer, at set-up: the slot's pattern area holds the old pattern and its handshake
    /// area is zero (both sides start with flags at 0).
    pub(crate) fn prepare(
        &self,
        k: &Kernels,
        device: i32,
        slot: DeviceView<'_>,
        tiers: &TierParams,
    ) -> Result<(), Problem> {
        handshake_area(slot)?.memset(0)?;
        cuda::device_synchronize(device)?;
        for q in 0..WIDTHS.len() {
            let s = seed(tiers, Pattern::Old, q);
            k.pattern_store(self.part(slot, q)?, s, 16, 0)?;
        }
        Ok(())
    }

    /// Consumer: SM stores of the store pattern through the mapping, each part at its width.
    pub(crate) fn store(
        &self,
        k: &Kernels,
        slot: DeviceView<'_>,
        tiers: &TierParams,
    ) -> Result<(), Problem> {
        for (q, &width) in WIDTHS.iter().enumerate() {
            let s = seed(tiers, Pattern::Store, q);
            k.pattern_store(self.part(slot, q)?, s, width, u64::from(tiers.shift))?;
        }
        Ok(())
    }

    /// Producer: checks the consumer's stores with SM loads of its own memory, then writes the
    /// load pattern for the consumer (also when the check failed, so the loads still test).
    pub(crate) fn verify_stores(
        &self,
        k: &Kernels,
        slot: DeviceView<'_>,
        tiers: &TierParams,
    ) -> Result<(), Problem> {
        let seen = self.check(
            k,
            slot,
            tiers,
            Pattern::Store,
            Pattern::Old,
            Check::KernelStores,
        );
        let mut refill = Ok(());
        for q in 0..WIDTHS.len() {
            let s = seed(tiers, Pattern::Load, q);
            let stored = self
                .part(slot, q)
                .and_then(|part| k.pattern_store(part, s, 16, 0));
            if let Err(e) = stored {
                refill = Err(Problem::from(e));
                break;
            }
        }
        seen.and(refill)
    }

    /// Consumer: SM loads of the load pattern through the mapping, each part at its width.
    pub(crate) fn load(
        &self,
        k: &Kernels,
        slot: DeviceView<'_>,
        tiers: &TierParams,
    ) -> Result<(), Problem> {
        self.check(
            k,
            slot,
            tiers,
            Pattern::Load,
            Pattern::Store,
            Check::KernelLoads,
        )
    }

    /// Checks every part against `expect`, counting bytes still holding `old` as stale; the
    /// problem names the first failing part's width and offset and the totals.
    fn check(
        &self,
        k: &Kernels,
        slot: DeviceView<'_>,
        tiers: &TierParams,
        expect: Pattern,
        old: Pattern,
        check: Check,
    ) -> Result<(), Problem> {
        let mut counts: Vec<(usize, PatternCount)> = Vec::new();
        for (q, &width) in WIDTHS.iter().enumerate() {
            let c = k.pattern_check(
                self.part(slot, q)?,
                seed(tiers, expect, q),
                seed(tiers, old, q),
                width,
            )?;
            counts.push((q, c));
        }
        let wrong: u64 = counts.iter().map(|(_, c)| c.wrong).sum();
        let Some((q, first)) = counts.iter().find(|(_, c)| c.wrong > 0) else {
            return Ok(());
        };
        Err(Problem::Mismatch {
            check,
            wrong,
            total: self.kernel_bytes,
            first_bad: *q as u64 * self.part_bytes() + first.first_bad.unwrap_or(0),
            seen: None,
            expected: 0,
            width: WIDTHS[*q] as u8,
            stale: counts.iter().map(|(_, c)| c.stale).sum(),
        })
    }

    /// One side of the handshake on the slot's area: `role` 0 serves (the owner), 1 drives
    /// (through the mapping).
    pub(crate) fn handshake(
        &self,
        k: &Kernels,
        slot: DeviceView<'_>,
        role: u32,
        same_gpu: bool,
        tiers: &TierParams,
    ) -> Result<(), Problem> {
        let rounds = if same_gpu {
            tiers.rounds.min(SAME_GPU_ROUNDS)
        } else {
            tiers.rounds
        };
        let budget_ns = u64::from(tiers.budget_ms) * 1_000_000;
        let r = k.handshake(
            handshake_area(slot)?,
            rounds,
            role,
            seed(tiers, Pattern::Handshake, 0),
            budget_ns,
        )?;
        if r.timed_out || r.payload_errors > 0 || r.rounds_done < u64::from(rounds) {
            return Err(Problem::Handshake {
                rounds,
                done: r.rounds_done,
                payload_errors: r.payload_errors,
                timed_out: r.timed_out,
                elapsed_ns: r.elapsed_ns,
            });
        }
        Ok(())
    }
}

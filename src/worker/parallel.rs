//! The parallel engine's worker: one GPU, one context for the whole run, no device reset.
//!
//! After `Setup` it exports one buffer of `slots` slots (one per consumer device, so pairs in
//! flight never share bytes; see [`Layout`]) and then does whatever steps the parent sends, in
//! order, for any number of pairs: as the producer of its own buffer, as the consumer of its
//! peers'. Peer buffers are mapped once per handle and kept; the kernels' module is loaded
//! once; everything is freed by `Drop` at the end.

use std::collections::HashMap;
use std::io::{Read, Write};

use super::{peak_rss_kb, unexpected, verify, Layout, Link, PRODUCER_FILL, TEST_BYTES};
use crate::cuda::trace::{self, ProcessRole};
use crate::cuda::{self, DeviceBuffer, DeviceView, Kernels, PeerMapping, IPC_HANDLE_BYTES};
use crate::model::{Check, Problem, Role, TierParams};
use crate::protocol::{Job, Message, Op, ProtocolError, MAX_DEVICES};

/// Serves the parallel engine on local device `device`, exporting `slots` slots.
pub(super) fn run<R: Read, W: Write>(
    link: &mut Link<R, W>,
    device: u32,
    slots: u32,
    tiers: &TierParams,
    sees: u32,
) -> Result<(), ProtocolError> {
    let d = device as i32;
    trace::set_role(ProcessRole::Worker, &part(device, slots));
    let layout = Layout::new(tiers);
    let set_up = (|| {
        cuda::set_device(d)?;
        let kernels = match layout.has_tiers() {
            true => Some(Kernels::load(d)?),
            false => None,
        };
        if slots == 0 {
            return Ok((kernels, None, None));
        }
        let bytes = slots as usize * layout.slot_bytes() as usize;
        let buffer = DeviceBuffer::new(d, bytes)?;
        buffer.view().memset(PRODUCER_FILL)?;
        cuda::device_synchronize(d)?;
        if let Some(k) = &kernels {
            for slot in 0..slots {
                let at = buffer.view().slice(layout.slot_range(slot))?;
                layout.prepare(k, d, at, tiers)?;
            }
        }
        let handle = buffer.ipc_handle()?;
        Ok::<_, Problem>((kernels, Some(buffer), Some(handle)))
    })();
    let (kernels, buffer, handle) = match set_up {
        Ok(ok) => ok,
        Err(why) => {
            link.send(Message::Ready { result: Err(why) })?;
            return Ok(());
        }
    };
    link.send(Message::Ready { result: Ok(handle) })?;
    let mut worker = Worker {
        device: d,
        sees,
        slots,
        layout,
        tiers: *tiers,
        kernels,
        buffer,
        mappings: HashMap::new(),
    };
    loop {
        let (job, slot, op) = match link.recv() {
            Ok(Message::Step { job, slot, op }) => (job, slot, op),
            // The parent closes the pipe when it has every answer: the normal end.
            Err(ProtocolError::Eof) => break,
            Ok(other) => return unexpected("Step", other),
            Err(e) => return Err(e),
        };
        trace::set_job(Some(job.into()));
        let (result, claim) = worker.step(job, slot, op);
        trace::set_job(None);
        link.send(Message::Done {
            job,
            result,
            claim,
            peak_rss_kb: peak_rss_kb(),
        })?;
    }
    worker.release();
    Ok(())
}

/// This worker's part in words, for the trace: its device in its own numbering (the parent's
/// GPU number is in each job), and what it sees when that is one GPU.
fn part(device: u32, slots: u32) -> String {
    let which = match slots {
        0 => "second worker",
        _ => "worker",
    };
    match std::env::var(crate::visible::VAR) {
        Ok(v) if !v.is_empty() && !v.contains(',') => {
            format!("{which} of device {device}, CUDA_VISIBLE_DEVICES={v}")
        }
        _ => format!("{which} of device {device}"),
    }
}

/// Slot `slot` (a number from the parent) of `memory`, or the error the parent is told.
fn slot_of<'a>(
    memory: DeviceView<'a>,
    layout: &Layout,
    slot: u32,
) -> Result<DeviceView<'a>, Problem> {
    memory
        .slice(layout.slot_range(slot))
        .map_err(|e| Problem::Driver(format!("slot {slot} from the parent: {e}")))
}

struct Worker {
    device: i32,
    /// Devices this worker's CUDA sees: the driver's claim can be asked only when it sees both.
    sees: u32,
    slots: u32,
    layout: Layout,
    tiers: TierParams,
    kernels: Option<Kernels>,
    buffer: Option<DeviceBuffer>,
    /// Peer buffers, by the producer's device.
    mappings: HashMap<u32, PeerMapping>,
}

impl Worker {
    fn step(&mut self, job: Job, slot: u32, op: Op) -> (Result<(), Problem>, Option<bool>) {
        let d = self.device;
        let (layout, tiers) = (self.layout, self.tiers);
        let same_gpu = job.pair.src == job.pair.tgt;
        let copy_bytes = 0..TEST_BYTES as u64;
        match (job.role, op) {
            (Role::Producer, Op::Verify { expect }) => (
                self.own(slot)
                    .and_then(|v| verify(v.slice(copy_bytes)?, expect, Check::CopyReadBack)),
                None,
            ),
            (Role::Producer, Op::VerifyStores) => (
                self.own(slot)
                    .and_then(|v| layout.verify_stores(self.kernels()?, v, &tiers)),
                None,
            ),
            (Role::Producer, Op::Handshake) => (
                self.own(slot)
                    .and_then(|v| layout.handshake(self.kernels()?, v, 0, same_gpu, &tiers)),
                None,
            ),
            (Role::Consumer, Op::Write { handle, value }) => {
                let claim = self.claim(job);
                let result = self.map(job.pair.src, &handle).and_then(|m| {
                    let q = slot_of(m.view(), &layout, slot)?.slice(copy_bytes)?;
                    q.memset(value)?;
                    cuda::device_synchronize(d)?;
                    verify(q, value, Check::CopyReadBack)
                });
                (result, claim)
            }
            (Role::Consumer, Op::KernelStore) => (
                self.peer(job.pair.src, slot)
                    .and_then(|v| layout.store(self.kernels()?, v, &tiers)),
                None,
            ),
            (Role::Consumer, Op::KernelLoad) => (
                self.peer(job.pair.src, slot)
                    .and_then(|v| layout.load(self.kernels()?, v, &tiers)),
                None,
            ),
            (Role::Consumer, Op::Handshake) => (
                self.peer(job.pair.src, slot)
                    .and_then(|v| layout.handshake(self.kernels()?, v, 1, same_gpu, &tiers)),
                None,
            ),
            (role, op) => (
                Err(Problem::Driver(format!(
                    "the parent asked a {} for {op:?}, which only the other role does",
                    role.name()
                ))),
                None,
            ),
        }
    }

    fn kernels(&self) -> Result<&Kernels, Problem> {
        self.kernels.as_ref().ok_or_else(|| {
            Problem::Driver("a kernel step at level copy: no kernels were loaded".into())
        })
    }

    /// Slot `slot` of this worker's own buffer.
    fn own(&self, slot: u32) -> Result<DeviceView<'_>, Problem> {
        match &self.buffer {
            Some(b) => slot_of(b.view(), &self.layout, slot),
            None => Err(Problem::Driver(format!(
                "slot {slot} of this worker's buffer: it exports none"
            ))),
        }
    }

    /// Slot `slot` of `src`'s buffer, through its mapping.
    fn peer(&self, src: u32, slot: u32) -> Result<DeviceView<'_>, Problem> {
        slot_of(self.mapped(src)?.view(), &self.layout, slot)
    }

    /// The driver's claim for the job's pair, where this worker sees both devices.
    fn claim(&self, job: Job) -> Option<bool> {
        let (src, tgt) = (job.pair.src, job.pair.tgt);
        if src == tgt {
            return Some(true); // no peer mapping at all (see cuda::runtime_claims_peer)
        }
        let sees_both = src.max(tgt) < self.sees && tgt as i32 == self.device;
        sees_both
            .then(|| cuda::runtime_claims_peer(src as i32, tgt as i32).ok())
            .flatten()
    }

    /// The mapping of `src`'s buffer `handle`, opened now if this handle is new (a replaced
    /// producer exports a new one: the old mapping is closed first).
    fn map(&mut self, src: u32, handle: &[u8; IPC_HANDLE_BYTES]) -> Result<&PeerMapping, Problem> {
        if self.mappings.get(&src).is_some_and(|m| !m.is_of(handle)) {
            if let Some(old) = self.mappings.remove(&src) {
                old.release()?;
            }
        }
        if !self.mappings.contains_key(&src) {
            // Every producer of the engine exports as many slots as its Setup names, the same
            // count for all (engine::parallel's set-up); a worker that exports none (a second
            // worker of a GPU, slots 0) is not told that count and takes the most any Setup
            // may name.
            let slots = match self.slots {
                0 => MAX_DEVICES,
                n => n,
            };
            let bytes = u64::from(slots) * self.layout.slot_bytes();
            // For a second worker that is an upper bound: a slot number at or past the
            // producer's real count is caught only by the producer's own step (the wire does
            // not carry the count to it).
            let m = PeerMapping::open(self.device, handle, bytes)?;
            self.mappings.insert(src, m);
        }
        self.mapped(src)
    }

    fn mapped(&self, src: u32) -> Result<&PeerMapping, Problem> {
        self.mappings.get(&src).ok_or_else(|| {
            Problem::Driver(format!(
                "no mapping of device {src}'s buffer: it never opened"
            ))
        })
    }

    /// Unmaps every peer buffer, then frees its own and unloads the kernels (the order CUDA
    /// IPC needs: a producer's memory must outlive the mappings of it).
    fn release(self) {
        for (_, m) in self.mappings {
            let _ = m.release();
        }
        if let Some(b) = self.buffer {
            let _ = b.release();
        }
        drop(self.kernels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Level, Pair};

    /// A worker of device 0 at level copy (1 KiB slots) whose buffer holds `slots` slots and
    /// which has mapped device 1's buffer of as many, all at made-up addresses: a step that
    /// reached CUDA would fail to load it (no driver here), so an error naming the slot and the
    /// memory proves the step was refused before any call.
    fn worker(slots: u32, handle: &[u8; IPC_HANDLE_BYTES]) -> Worker {
        let tiers = TierParams {
            kernel_bytes: 0,
            seed: 1,
            shift: 0,
            rounds: 0,
            budget_ms: 0,
        };
        let layout = Layout::new(&tiers);
        let bytes = u64::from(slots) * layout.slot_bytes();
        Worker {
            device: 0,
            sees: 0,
            slots,
            layout,
            tiers,
            kernels: None,
            buffer: (slots > 0).then(|| DeviceBuffer::unbacked(0, bytes)),
            mappings: HashMap::from([(1, PeerMapping::unbacked(0, handle, bytes))]),
        }
    }

    fn job(role: Role) -> Job {
        Job {
            index: 0,
            pair: Pair { src: 1, tgt: 0 },
            role,
            tier: Level::Copy,
        }
    }

    fn refusal(result: Result<(), Problem>) -> String {
        match result {
            Err(Problem::Driver(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_slot_out_of_range_from_the_parent_is_an_error_reported_not_an_access() {
        let handle = [9; IPC_HANDLE_BYTES];
        let mut w = worker(2, &handle);
        let producer = [Op::Verify { expect: 2 }, Op::VerifyStores, Op::Handshake];
        let consumer = [
            Op::Write { handle, value: 2 },
            Op::KernelStore,
            Op::KernelLoad,
            Op::Handshake,
        ];
        for slot in [2, 7, u32::MAX] {
            let start = u64::from(slot) * 1024;
            for op in &producer {
                let (result, claim) = w.step(job(Role::Producer), slot, op.clone());
                assert_eq!(claim, None);
                assert_eq!(
                    refusal(result),
                    format!(
                        "slot {slot} from the parent: bytes {start}..{} of device 0's buffer of \
                         2048 bytes lie outside the view's 0..2048",
                        start + 1024
                    ),
                    "{op:?}"
                );
            }
            for op in &consumer {
                let (result, _) = w.step(job(Role::Consumer), slot, op.clone());
                assert_eq!(
                    refusal(result),
                    format!(
                        "slot {slot} from the parent: bytes {start}..{} of device 0's mapping \
                         of a peer's buffer of 2048 bytes lie outside the view's 0..2048",
                        start + 1024
                    ),
                    "{op:?}"
                );
            }
        }
        // A worker that exports nothing has no slot to give.
        let mut second = worker(0, &handle);
        let (result, _) = second.step(job(Role::Producer), 0, Op::Verify { expect: 2 });
        assert_eq!(
            refusal(result),
            "slot 0 of this worker's buffer: it exports none"
        );
    }
}

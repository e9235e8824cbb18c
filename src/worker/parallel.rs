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
use crate::cuda::owned::{DeviceBuffer, PeerMapping};
use crate::cuda::trace::{self, ProcessRole};
use crate::cuda::{self, Kernels, IPC_HANDLE_BYTES};
use crate::model::{Check, Problem, Role, TierParams};
use crate::protocol::{Job, Message, Op, ProtocolError};

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
        cuda::memset(d, buffer.at(0), PRODUCER_FILL, bytes)?;
        cuda::device_synchronize(d)?;
        if let Some(k) = &kernels {
            for slot in 0..slots {
                let at = buffer.at(u64::from(slot) * layout.slot_bytes());
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
        let offset = u64::from(slot) * self.layout.slot_bytes();
        let (layout, tiers) = (self.layout, self.tiers);
        let same_gpu = job.pair.src == job.pair.tgt;
        match (job.role, op) {
            (Role::Producer, Op::Verify { expect }) => (
                self.own(slot)
                    .and_then(|p| verify(d, p, TEST_BYTES, expect, Check::CopyReadBack)),
                None,
            ),
            (Role::Producer, Op::VerifyStores) => (
                self.own(slot)
                    .and_then(|p| layout.verify_stores(self.kernels()?, p, &tiers)),
                None,
            ),
            (Role::Producer, Op::Handshake) => (
                self.own(slot)
                    .and_then(|p| layout.handshake(self.kernels()?, p, 0, same_gpu, &tiers)),
                None,
            ),
            (Role::Consumer, Op::Write { handle, value }) => {
                let claim = self.claim(job);
                let result = self.map(job.pair.src, &handle).and_then(|m| {
                    let q = m.at(offset);
                    cuda::memset(d, q, value, TEST_BYTES)?;
                    cuda::device_synchronize(d)?;
                    verify(d, q, TEST_BYTES, value, Check::CopyReadBack)
                });
                (result, claim)
            }
            (Role::Consumer, Op::KernelStore) => (
                self.mapped(job.pair.src)
                    .and_then(|m| layout.store(self.kernels()?, m.at(offset), &tiers)),
                None,
            ),
            (Role::Consumer, Op::KernelLoad) => (
                self.mapped(job.pair.src)
                    .and_then(|m| layout.load(self.kernels()?, m.at(offset), &tiers)),
                None,
            ),
            (Role::Consumer, Op::Handshake) => (
                self.mapped(job.pair.src).and_then(|m| {
                    layout.handshake(self.kernels()?, m.at(offset), 1, same_gpu, &tiers)
                }),
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
    fn own(&self, slot: u32) -> Result<cuda::DevicePtr, Problem> {
        match &self.buffer {
            Some(b) if slot < self.slots => Ok(b.at(u64::from(slot) * self.layout.slot_bytes())),
            _ => Err(Problem::Driver(format!(
                "slot {slot} of a buffer of {} slots",
                self.slots
            ))),
        }
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
            let m = PeerMapping::open(self.device, handle)?;
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

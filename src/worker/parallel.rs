//! The parallel engine's worker: one GPU, one context for the whole run, no device reset.
//!
//! After `Setup` it exports one buffer of `slots` slots (one per consumer device, so pairs in
//! flight never share bytes) and then does whatever steps the parent sends, in order, for any
//! number of pairs: as the producer of its own buffer, as the consumer of its peers'. Peer
//! buffers are mapped once per handle and kept; everything is freed by `Drop` at the end.

use std::collections::HashMap;
use std::io::{Read, Write};

use super::{kernel_verify, peak_rss_kb, unexpected, verify, Link, PRODUCER_FILL, TEST_BYTES};
use crate::cuda::owned::{DeviceBuffer, PeerMapping};
use crate::cuda::{self, IPC_HANDLE_BYTES};
use crate::protocol::{Check, Job, Message, Op, Problem, ProtocolError, Role};

/// Bytes per slot of a producer's buffer.
pub const SLOT_BYTES: u64 = TEST_BYTES as u64;

/// Serves the parallel engine on local device `device`, exporting `slots` slots.
pub(super) fn run<R: Read, W: Write>(
    link: &mut Link<R, W>,
    device: u32,
    slots: u32,
    sees: u32,
) -> Result<(), ProtocolError> {
    let d = device as i32;
    let set_up = (|| {
        cuda::set_device(d)?;
        if slots == 0 {
            return Ok((None, None));
        }
        let bytes = slots as usize * SLOT_BYTES as usize;
        let buffer = DeviceBuffer::new(d, bytes)?;
        cuda::memset(d, buffer.at(0), PRODUCER_FILL, bytes)?;
        cuda::device_synchronize(d)?;
        let handle = buffer.ipc_handle()?;
        Ok::<_, cuda::Error>((Some(buffer), Some(handle)))
    })()
    .map_err(Problem::from);
    let (buffer, handle) = match set_up {
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
        let (result, claim) = worker.step(job, slot, op);
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

struct Worker {
    device: i32,
    /// Devices this worker's CUDA sees: the driver's claim can be asked only when it sees both.
    sees: u32,
    slots: u32,
    buffer: Option<DeviceBuffer>,
    /// Peer buffers, by the producer's device.
    mappings: HashMap<u32, PeerMapping>,
}

impl Worker {
    fn step(&mut self, job: Job, slot: u32, op: Op) -> (Result<(), Problem>, Option<bool>) {
        let d = self.device;
        let offset = u64::from(slot) * SLOT_BYTES;
        let bytes = TEST_BYTES;
        match (job.role, op) {
            (Role::Producer, Op::Fill { value }) => (
                self.own(slot).and_then(|p| {
                    cuda::memset(d, p, value, bytes)?;
                    Ok(cuda::device_synchronize(d)?)
                }),
                None,
            ),
            (
                Role::Producer,
                Op::Verify {
                    expect,
                    check,
                    refill,
                },
            ) => (
                self.own(slot).and_then(|p| {
                    let seen = verify(d, p, bytes, expect, check);
                    let refilled = match refill {
                        None => Ok(()),
                        Some(v) => cuda::memset(d, p, v, bytes)
                            .and_then(|_| cuda::device_synchronize(d))
                            .map_err(Problem::from),
                    };
                    seen.and(refilled)
                }),
                None,
            ),
            (Role::Consumer, Op::Write { handle, value }) => {
                let claim = self.claim(job);
                let result = self.map(job.pair.src, &handle).and_then(|m| {
                    let q = m.at(offset);
                    cuda::memset(d, q, value, bytes)?;
                    cuda::device_synchronize(d)?;
                    verify(d, q, bytes, value, Check::CopyReadBack)
                });
                (result, claim)
            }
            (Role::Consumer, Op::KernelStore { value }) => (
                self.mapped(job.pair.src)
                    .and_then(|m| Ok(cuda::kernel_store(d, m.at(offset), bytes, value)?)),
                None,
            ),
            (Role::Consumer, Op::KernelLoad { expect }) => (
                self.mapped(job.pair.src)
                    .and_then(|m| kernel_verify(d, m.at(offset), bytes, expect)),
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

    /// Slot `slot` of this worker's own buffer.
    fn own(&self, slot: u32) -> Result<cuda::DevicePtr, Problem> {
        match &self.buffer {
            Some(b) if slot < self.slots => Ok(b.at(u64::from(slot) * SLOT_BYTES)),
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

    /// Unmaps every peer buffer, then frees its own (the order CUDA IPC needs: a producer's
    /// memory must outlive its mappings, and ours are ours to close first).
    fn release(self) {
        for (_, m) in self.mappings {
            let _ = m.release();
        }
        if let Some(b) = self.buffer {
            let _ = b.release();
        }
    }
}

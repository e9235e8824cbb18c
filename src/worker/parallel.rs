//! The parallel engine's worker: one GPU, one context for the whole run, no device reset.
//!
//! After `Setup` it exports one buffer of `slots` slots (one per consumer device, so pairs in
//! flight never share bytes; see [`Layout`]) and then does whatever steps the parent sends, in
//! order, for any number of pairs: as the producer of its own buffer, as the consumer of its
//! peers'. Peer buffers are mapped once per handle and kept; the kernels' module is loaded
//! once; everything is freed by `Drop` at the end.
//!
//! With the cuMem transport it also exports the same slots as a `cuMemCreate` allocation (laid
//! out and filled as the IPC buffer), whose POSIX descriptor it sends to the parent over its
//! socket ([`os::fdpass`]); as a consumer it takes a producer's descriptor from that socket
//! (the parent relays it just before the first step that needs it), imports and maps it once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use super::{bandwidth, peak_rss_kb, unexpected, verify, Layout, Link, PRODUCER_FILL, TEST_BYTES};
use crate::cuda::trace::{self, ProcessRole};
use crate::cuda::{
    self, CumemBuffer, CumemMapping, DeviceBuffer, DeviceView, Kernels, PeerMapping,
    IPC_HANDLE_BYTES,
};
use crate::model::{Bandwidth, Check, Problem, Role, TierParams, Transport};
use crate::os::fdpass;
use crate::protocol::{Job, Message, Op, ProtocolError, MAX_DEVICES};

/// How long a consumer waits for a producer's descriptor on its socket: the parent sends it
/// before the step that needs it, so it is there already unless something is wrong.
const DESCRIPTOR_WAIT: Duration = Duration::from_secs(5);

/// What a descriptor's message says: the producer's device (the parent's numbering) and the
/// allocation's length, little-endian.
pub(crate) fn descriptor_payload(src: u32, bytes: u64) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(&src.to_le_bytes());
    p[4..].copy_from_slice(&bytes.to_le_bytes());
    p
}

/// Serves the parallel engine on local device `device`, exporting `slots` slots (also as a
/// cuMem allocation when `cumem`).
pub(super) fn run<R: Read, W: Write>(
    link: &mut Link<R, W>,
    device: u32,
    slots: u32,
    tiers: &TierParams,
    sees: u32,
    cumem: bool,
) -> Result<(), ProtocolError> {
    let d = device as i32;
    trace::set_role(ProcessRole::Worker, &part(device, slots));
    let layout = Layout::new(tiers);
    let set_up = (|| {
        cuda::set_device(d)?;
        let kernels = match layout.needs_kernels() {
            true => Some(Kernels::load(d)?),
            false => None,
        };
        if slots == 0 {
            return Ok((kernels, None, None));
        }
        let bytes = usize::try_from(layout.buffer_bytes(slots))
            .map_err(|_| Problem::Driver(format!("a buffer of {slots} slots: too large")))?;
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
            link.send(Message::Ready {
                result: Err(why),
                cumem: None,
            })?;
            return Ok(());
        }
    };
    let (socket, cumem_buffer, cumem_ready) = match cumem {
        false => (None, None, None),
        true => cumem_set_up(d, slots, &layout, kernels.as_ref(), tiers),
    };
    match link.send(Message::Ready {
        result: Ok(handle),
        cumem: cumem_ready,
    }) {
        // The parent had every answer before this worker was ready (its pairs were decided by
        // another worker's set-up) and closed the pipe: the normal end.
        Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        sent => sent?,
    }
    let mut worker = Worker {
        device: d,
        sees,
        slots,
        layout,
        tiers: *tiers,
        kernels,
        buffer,
        local: None,
        mappings: HashMap::new(),
        socket,
        cumem_buffer,
        cumem_mappings: HashMap::new(),
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
        let answer = match (job.role, op) {
            (Role::Consumer, Op::Bandwidth) => Message::Measured {
                job,
                result: worker.bandwidth(job.pair.src),
                peak_rss_kb: peak_rss_kb(),
            },
            (_, op) => {
                let (result, claim) = worker.step(job, slot, op);
                Message::Done {
                    job,
                    result,
                    claim,
                    peak_rss_kb: peak_rss_kb(),
                }
            }
        };
        trace::set_job(None);
        link.send(answer)?;
    }
    worker.release();
    Ok(())
}

/// The cuMem transport's set-up: the descriptor socket, and with `slots` > 0 the allocation,
/// filled and prepared as the IPC buffer, its descriptor sent to the parent. What `Ready` says
/// of it: `None` never (it was asked for), its length, or why there is none; a failure here
/// leaves the IPC transport untouched.
fn cumem_set_up(
    d: i32,
    slots: u32,
    layout: &Layout,
    kernels: Option<&Kernels>,
    tiers: &TierParams,
) -> (
    Option<OwnedFd>,
    Option<CumemBuffer>,
    Option<Result<u64, Problem>>,
) {
    let socket = match fdpass::worker_socket() {
        Ok(s) => s,
        Err(e) => {
            let why = format!("this worker has no descriptor socket: {e}");
            return (None, None, Some(Err(Problem::Descriptor(why))));
        }
    };
    if slots == 0 {
        return (Some(socket), None, Some(Ok(0)));
    }
    let made = (|| {
        let bytes = slots as usize * layout.slot_bytes() as usize;
        let buffer = CumemBuffer::new(d, bytes).map_err(|e| with_cumem_facts(d, e.into()))?;
        buffer.view().memset(PRODUCER_FILL)?;
        cuda::device_synchronize(d)?;
        if let Some(k) = kernels {
            for slot in 0..slots {
                let at = buffer.view().slice(layout.slot_range(slot))?;
                layout.prepare(k, d, at, tiers)?;
            }
        }
        let fd = buffer.export().map_err(|e| with_cumem_facts(d, e.into()))?;
        // The parent knows whose it is; the device here is this worker's own numbering.
        let payload = descriptor_payload(d as u32, buffer.len());
        fdpass::send_fd(
            socket.as_fd(),
            fd.as_fd(),
            &payload,
            Instant::now() + DESCRIPTOR_WAIT,
        )
        .map_err(|e| Problem::Descriptor(format!("sending it to the parent: {e}")))?;
        Ok::<_, Problem>(buffer)
    })();
    match made {
        Ok(buffer) => {
            let len = buffer.len();
            (Some(socket), Some(buffer), Some(Ok(len)))
        }
        Err(why) => (Some(socket), None, Some(Err(why))),
    }
}

/// A failed cuMem allocation or export, with what the driver says of the device: whether it
/// supports POSIX descriptor handles, and the driver's version (the hint of `export-refused`).
fn with_cumem_facts(d: i32, problem: Problem) -> Problem {
    let Problem::Cuda {
        call,
        device,
        code,
        name,
        text,
    } = problem
    else {
        return problem;
    };
    let support = match cuda::posix_fd_handles_supported(d) {
        Ok(true) => "supported".to_string(),
        Ok(false) => "NOT supported".to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    let driver = match cuda::driver_version() {
        Ok(v) => format!("{}.{}", v / 1000, v % 1000 / 10),
        Err(e) => format!("unknown ({e})"),
    };
    Problem::Cuda {
        call,
        device,
        code,
        name,
        text: format!(
            "{text}; this device: POSIX descriptor handles {support} \
             (CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED), driver CUDA {driver}"
        ),
    }
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

/// The consumer's copy test on `q`: a copy-engine memset to `value`, a synchronise, and the
/// read-back of every byte (vLLM's consumer half).
fn write_and_read_back(d: i32, q: DeviceView<'_>, value: u8) -> Result<(), Problem> {
    q.memset(value)?;
    cuda::device_synchronize(d)?;
    verify(q, value, Check::CopyReadBack)
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
    /// The bandwidth measurement's own memory, allocated at its first step.
    local: Option<DeviceBuffer>,
    /// Peer buffers, by the producer's device.
    mappings: HashMap<u32, PeerMapping>,
    /// The cuMem transport's descriptor socket (when it was asked for).
    socket: Option<OwnedFd>,
    /// Its own slots as a cuMem allocation (a producer, with the cuMem transport).
    cumem_buffer: Option<CumemBuffer>,
    /// Peers' cuMem allocations, by the producer's device.
    cumem_mappings: HashMap<u32, CumemMapping>,
}

impl Worker {
    fn step(&mut self, job: Job, slot: u32, op: Op) -> (Result<(), Problem>, Option<bool>) {
        let d = self.device;
        let (layout, tiers) = (self.layout, self.tiers);
        let same_gpu = job.pair.src == job.pair.tgt;
        let copy_bytes = 0..TEST_BYTES as u64;
        let t = job.transport;
        match (job.role, op) {
            (Role::Producer, Op::Verify { expect }) => (
                self.own(slot, t)
                    .and_then(|v| verify(v.slice(copy_bytes)?, expect, Check::CopyReadBack)),
                None,
            ),
            (Role::Producer, Op::VerifyStores) => (
                self.own(slot, t)
                    .and_then(|v| layout.verify_stores(self.kernels()?, v, &tiers)),
                None,
            ),
            (Role::Producer, Op::Handshake) => (
                self.own(slot, t)
                    .and_then(|v| layout.handshake(self.kernels()?, v, 0, same_gpu, &tiers)),
                None,
            ),
            (Role::Consumer, Op::Write { handle, value }) => {
                let claim = self.claim(job);
                let result = self.map(job.pair.src, &handle).and_then(|m| {
                    let q = slot_of(m.view(), &layout, slot)?.slice(copy_bytes)?;
                    write_and_read_back(d, q, value)
                });
                (result, claim)
            }
            (Role::Consumer, Op::WriteCumem { bytes, value }) => {
                let claim = self.claim(job);
                let result = self.map_cumem(job.pair.src, bytes).and_then(|m| {
                    let q = slot_of(m.view(), &layout, slot)?.slice(copy_bytes)?;
                    write_and_read_back(d, q, value)
                });
                (result, claim)
            }
            (Role::Consumer, Op::KernelStore) => (
                self.peer(job.pair.src, slot, t)
                    .and_then(|v| layout.store(self.kernels()?, v, &tiers)),
                None,
            ),
            (Role::Consumer, Op::KernelLoad) => (
                self.peer(job.pair.src, slot, t)
                    .and_then(|v| layout.load(self.kernels()?, v, &tiers)),
                None,
            ),
            (Role::Consumer, Op::Handshake) => (
                self.peer(job.pair.src, slot, t)
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

    /// The bandwidth measurement through the mapping of `src`'s bandwidth area (its buffer
    /// is mapped by the pair's copy step, which passed before the parent asks this).
    fn bandwidth(&mut self, src: u32) -> Result<Bandwidth, Problem> {
        let transfer = u64::from(self.tiers.bandwidth_bytes);
        if transfer == 0 {
            return Err(Problem::Driver(
                "a bandwidth step without a bandwidth transfer size in the Setup".into(),
            ));
        }
        if self.local.is_none() {
            let bytes = usize::try_from(bandwidth::local_bytes(transfer))
                .map_err(|_| Problem::Driver(format!("transfers of {transfer} bytes")))?;
            self.local = Some(DeviceBuffer::new(self.device, bytes)?);
        }
        let remote = self
            .mapped(src)?
            .view()
            .slice(self.layout.bandwidth_range())?;
        let local = match &self.local {
            Some(b) => b.view(),
            None => return Err(Problem::Driver("no local buffer".into())),
        };
        bandwidth::measure(self.kernels()?, remote, local, transfer, self.tiers.seed)
    }

    fn kernels(&self) -> Result<&Kernels, Problem> {
        self.kernels.as_ref().ok_or_else(|| {
            Problem::Driver("a kernel step at level copy: no kernels were loaded".into())
        })
    }

    /// Slot `slot` of this worker's own buffer of transport `t`.
    fn own(&self, slot: u32, t: Transport) -> Result<DeviceView<'_>, Problem> {
        let view = match t {
            Transport::Ipc => self.buffer.as_ref().map(DeviceBuffer::view),
            Transport::Cumem => self.cumem_buffer.as_ref().map(CumemBuffer::view),
        };
        match view {
            Some(v) => slot_of(v, &self.layout, slot),
            None => Err(Problem::Driver(format!(
                "slot {slot} of this worker's {} buffer: it exports none",
                t.name()
            ))),
        }
    }

    /// Slot `slot` of `src`'s buffer of transport `t`, through its mapping.
    fn peer(&self, src: u32, slot: u32, t: Transport) -> Result<DeviceView<'_>, Problem> {
        let view = match t {
            Transport::Ipc => self.mapped(src)?.view(),
            Transport::Cumem => self
                .cumem_mappings
                .get(&src)
                .ok_or_else(|| {
                    Problem::Driver(format!(
                        "no cuMem mapping of device {src}'s allocation: it never opened"
                    ))
                })?
                .view(),
        };
        slot_of(view, &self.layout, slot)
    }

    /// The cuMem mapping of `src`'s allocation of `bytes` bytes, made now when there is none:
    /// its descriptor is taken from the socket (the parent sent it before this step).
    fn map_cumem(&mut self, src: u32, bytes: u64) -> Result<&CumemMapping, Problem> {
        if !self.cumem_mappings.contains_key(&src) {
            let socket = self.socket.as_ref().ok_or_else(|| {
                Problem::Descriptor("this worker was given no descriptor socket".into())
            })?;
            let mut payload = [0u8; 12];
            let (n, fd) = fdpass::recv_fd(
                socket.as_fd(),
                &mut payload,
                Instant::now() + DESCRIPTOR_WAIT,
            )
            .map_err(|e| Problem::Descriptor(format!("receiving device {src}'s: {e}")))?;
            let said = u64::from_le_bytes(payload[4..12].try_into().unwrap_or_default());
            if n != payload.len() || said != bytes {
                return Err(Problem::Descriptor(format!(
                    "device {src}'s came with {n} bytes saying {said} bytes, not {bytes}"
                )));
            }
            let m = CumemMapping::import(self.device, fd.as_fd(), bytes)?;
            // The mapping holds the memory: the descriptor closes here (`fd` drops).
            self.cumem_mappings.insert(src, m);
        }
        self.cumem_mappings
            .get(&src)
            .ok_or_else(|| Problem::Driver(format!("device {src}'s cuMem mapping vanished")))
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
            let bytes = self.layout.buffer_bytes(slots);
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
        for (_, m) in self.cumem_mappings {
            let _ = m.release();
        }
        if let Some(b) = self.buffer {
            let _ = b.release();
        }
        if let Some(b) = self.cumem_buffer {
            let _ = b.release();
        }
        if let Some(b) = self.local {
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
            bandwidth_bytes: 0,
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
            local: None,
            mappings: HashMap::from([(1, PeerMapping::unbacked(0, handle, bytes))]),
            socket: None,
            cumem_buffer: None,
            cumem_mappings: HashMap::new(),
        }
    }

    fn job(role: Role) -> Job {
        Job {
            index: 0,
            pair: Pair { src: 1, tgt: 0 },
            role,
            tier: Level::Copy,
            transport: Transport::Ipc,
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
            "slot 0 of this worker's ipc buffer: it exports none"
        );
        // Nor a worker asked for no cuMem allocation one of that transport; and a consumer
        // without a descriptor socket cannot map one.
        let cumem = Job {
            transport: Transport::Cumem,
            ..job(Role::Producer)
        };
        let (result, _) = w.step(cumem, 0, Op::Verify { expect: 2 });
        assert_eq!(
            refusal(result),
            "slot 0 of this worker's cumem buffer: it exports none"
        );
        let write = Op::WriteCumem {
            bytes: 2 << 20,
            value: 2,
        };
        let (result, _) = w.step(
            Job {
                role: Role::Consumer,
                ..cumem
            },
            0,
            write,
        );
        assert_eq!(
            result,
            Err(Problem::Descriptor(
                "this worker was given no descriptor socket".into()
            ))
        );
    }
}

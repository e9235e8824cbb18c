//! The vLLM engine's worker: producer or consumer for a whole batch of pairs, SPEC section 2
//! step for step (`cudaSetDevice`, ..., `cudaDeviceReset` after every pair), then, when the
//! level asks for them, the kernel and handshake tiers on a second buffer (vLLM's 1 KiB and
//! its calls stay exactly vLLM's).

use std::io::{Read, Write};

use super::{
    peak_rss_kb, unexpected, verify, Layout, Link, CONSUMER_FILL, PRODUCER_FILL, TEST_BYTES,
};
use crate::cuda::trace::{self, ProcessRole};
use crate::cuda::{self, DeviceBuffer, Kernels, PeerMapping, IPC_HANDLE_BYTES};
use crate::model::{
    Check, Level, Pair, Problem, Role, SideVerdict, TierOutcome, TierParams, Transport,
};
use crate::protocol::{Job, Message, ProtocolError, Stage};

impl<R: Read, W: Write> Link<R, W> {
    /// The next message must be this pair's `Handle` (of the tier `job` names).
    fn recv_handle(
        &mut self,
        job: Job,
    ) -> Result<Result<[u8; IPC_HANDLE_BYTES], Problem>, ProtocolError> {
        match self.recv()? {
            Message::Handle { job: j, handle } if j.index == job.index && j.tier == job.tier => {
                Ok(handle)
            }
            other => unexpected("Handle", other),
        }
    }
    fn recv_opened(&mut self, job: Job) -> Result<Result<(), Problem>, ProtocolError> {
        match self.recv()? {
            Message::Opened { job: j, result } if j.index == job.index && j.tier == job.tier => {
                Ok(result)
            }
            other => unexpected("Opened", other),
        }
    }
    fn barrier_in(&mut self, job: Job, stage: Stage) -> Result<(), ProtocolError> {
        match self.recv()? {
            Message::Barrier { job: j, stage: s } if j.index == job.index && s == stage => Ok(()),
            other => unexpected("Barrier", other),
        }
    }
    fn barrier_out(&mut self, job: Job, stage: Stage) -> Result<(), ProtocolError> {
        self.send(Message::Barrier { job, stage })
    }
}

/// Runs the batch `pairs` in `role`.
pub(super) fn run<R: Read, W: Write>(
    link: &mut Link<R, W>,
    role: Role,
    level: Level,
    tiers: &TierParams,
    pairs: &[Pair],
) -> Result<(), ProtocolError> {
    match role {
        Role::Producer => trace::set_role(ProcessRole::Producer, "vLLM producer"),
        Role::Consumer => trace::set_role(ProcessRole::Consumer, "vLLM consumer"),
    }
    for (index, &pair) in pairs.iter().enumerate() {
        let job = Job {
            index: index as u32,
            pair,
            role,
            tier: Level::Copy,
            transport: Transport::Ipc,
        };
        trace::set_job(Some(job.into()));
        let device = match role {
            Role::Producer => pair.src as i32,
            Role::Consumer => pair.tgt as i32,
        };
        let mut verdict = match role {
            Role::Producer => produce(link, job, level, tiers)?,
            Role::Consumer => consume(link, job, level, tiers)?,
        };
        // vLLM resets after every pair, so that each pair starts from a clean context. A failed
        // reset fails this side's copy test (the next pair would start from a dirty context).
        // The reset is SPEC section 2's step 4: traced as the pair's copy job, after any tiers.
        trace::set_job(Some(job.into()));
        if let Err(e) = cuda::device_reset(device) {
            if verdict.copy.is_ok() {
                verdict.copy = Err(e.into());
            }
        }
        trace::set_job(None);
        link.send(Message::Verdict {
            job,
            verdict,
            peak_rss_kb: peak_rss_kb(),
        })?;
    }
    Ok(())
}

fn outcome(r: Option<Result<(), Problem>>) -> TierOutcome {
    match r {
        None => TierOutcome::NotRun,
        Some(Ok(())) => TierOutcome::Ok,
        Some(Err(p)) => TierOutcome::Failed(p),
    }
}

/// One side's verdict from its copy test, its claim, and its tiers (`None`: not run).
fn side_verdict(
    copy: Result<(), Problem>,
    claim: Option<bool>,
    (kernel, handshake): Tiers,
) -> SideVerdict {
    SideVerdict {
        copy,
        claim,
        kernel: outcome(kernel),
        handshake: outcome(handshake),
    }
}

type Tiers = (Option<Result<(), Problem>>, Option<Result<(), Problem>>);

/// Both tiers failed for the same reason (the tier buffer could not be set up or mapped).
fn tiers_failed(level: Level, why: Problem) -> Tiers {
    (
        Some(Err(why.clone())),
        (level >= Level::Handshake).then_some(Err(why)),
    )
}

/// Producer steps 1, 3 and 4 of SPEC section 2, plus its half of the tiers.
fn produce<R: Read, W: Write>(
    link: &mut Link<R, W>,
    job: Job,
    level: Level,
    tiers: &TierParams,
) -> Result<SideVerdict, ProtocolError> {
    let d = job.pair.src as i32;
    // vLLM's calls exactly; the allocation is not freed: the reset after the pair releases it.
    let exported = (|| {
        cuda::set_device(d)?;
        let p = DeviceBuffer::until_reset(d, TEST_BYTES)?;
        p.view().memset(PRODUCER_FILL)?;
        cuda::device_synchronize(d)?;
        let handle = p.ipc_handle()?;
        Ok::<_, cuda::Error>((p, handle))
    })()
    .map_err(Problem::from);
    let p = match exported {
        Ok((p, handle)) => {
            link.send(Message::Handle {
                job,
                handle: Ok(handle),
            })?;
            p
        }
        Err(why) => {
            link.send(Message::Handle {
                job,
                handle: Err(why.clone()),
            })?;
            // The consumer answers with an error (it had no handle); the verdict is ours.
            let _ = link.recv_opened(job)?;
            return Ok(side_verdict(Err(why), None, (None, None)));
        }
    };
    if let Err(why) = link.recv_opened(job)? {
        let why = Problem::Peer(Box::new(why));
        return Ok(side_verdict(Err(why), None, (None, None)));
    }
    link.barrier_out(job, Stage::Copy)?;
    link.barrier_in(job, Stage::Copy)?;
    let copy = verify(p.view(), CONSUMER_FILL, Check::CopyReadBack);
    let tiers_seen = if level >= Level::Kernel {
        produce_tiers(link, job, level, tiers)?
    } else {
        (None, None)
    };
    Ok(side_verdict(copy, None, tiers_seen))
}

/// The producer's half of the kernel and handshake tiers, on a buffer of their own.
fn produce_tiers<R: Read, W: Write>(
    link: &mut Link<R, W>,
    job: Job,
    level: Level,
    tiers: &TierParams,
) -> Result<Tiers, ProtocolError> {
    let d = job.pair.src as i32;
    let job = Job {
        tier: Level::Kernel,
        ..job
    };
    trace::set_job(Some(job.into()));
    let layout = Layout::new(tiers);
    let set_up = (|| {
        let k = Kernels::load(d)?;
        let buffer = DeviceBuffer::new(d, layout.slot_bytes() as usize)?;
        layout.prepare(&k, d, buffer.view(), tiers)?;
        let handle = buffer.ipc_handle()?;
        Ok::<_, Problem>((k, buffer, handle))
    })();
    let (k, buffer) = match set_up {
        Ok((k, buffer, handle)) => {
            link.send(Message::Handle {
                job,
                handle: Ok(handle),
            })?;
            (k, buffer)
        }
        Err(why) => {
            link.send(Message::Handle {
                job,
                handle: Err(why.clone()),
            })?;
            let _ = link.recv_opened(job)?;
            return Ok(tiers_failed(level, why));
        }
    };
    if let Err(why) = link.recv_opened(job)? {
        return Ok(tiers_failed(level, Problem::Peer(Box::new(why))));
    }
    link.barrier_in(job, Stage::KernelStored)?;
    let kernel = layout.verify_stores(&k, buffer.view(), tiers);
    link.barrier_out(job, Stage::ProducerRewrote)?;
    let handshake = if level >= Level::Handshake {
        // Both kernels must be resident at once: the consumer launches on this token.
        link.barrier_out(job, Stage::Handshake)?;
        let same_gpu = job.pair.src == job.pair.tgt;
        trace::set_job(Some(
            Job {
                tier: Level::Handshake,
                ..job
            }
            .into(),
        ));
        let shook = layout.handshake(&k, buffer.view(), 0, same_gpu, tiers);
        trace::set_job(Some(job.into()));
        Some(shook)
    } else {
        None
    };
    // The consumer is done with the buffer when it says so (its verdict goes to the parent),
    // so wait for its token before freeing: a mapping must not outlive its memory.
    link.barrier_in(job, Stage::Handshake)?;
    let freed = buffer.release().map_err(Problem::from);
    drop(k);
    Ok((Some(kernel.and(freed)), handshake))
}

/// Consumer steps 2, 3 and 4 of SPEC section 2, plus its half of the tiers.
fn consume<R: Read, W: Write>(
    link: &mut Link<R, W>,
    job: Job,
    level: Level,
    tiers: &TierParams,
) -> Result<SideVerdict, ProtocolError> {
    let pair = job.pair;
    let d = pair.tgt as i32;
    let selected = cuda::set_device(d).map_err(Problem::from);
    let handle = link.recv_handle(job)?;
    let claim = cuda::runtime_claims_peer(pair.src as i32, d).ok();
    let opened = match (selected, handle) {
        (Err(why), _) => Err(why),
        (_, Err(why)) => Err(Problem::Peer(Box::new(why))),
        // The producer allocated TEST_BYTES (produce, SPEC section 2).
        (Ok(()), Ok(h)) => {
            PeerMapping::until_reset(d, &h, TEST_BYTES as u64).map_err(Problem::from)
        }
    };
    let q = match opened {
        Ok(q) => q,
        Err(why) => {
            link.send(Message::Opened {
                job,
                result: Err(why.clone()),
            })?;
            return Ok(side_verdict(Err(why), claim, (None, None)));
        }
    };
    link.send(Message::Opened {
        job,
        result: Ok(()),
    })?;
    // A failure here is this side's "false"; the barriers still run so the producer is not
    // left waiting.
    let wrote = q
        .view()
        .memset(CONSUMER_FILL)
        .and_then(|_| cuda::device_synchronize(d))
        .map_err(Problem::from);
    link.barrier_in(job, Stage::Copy)?;
    link.barrier_out(job, Stage::Copy)?;
    let copy = wrote.and_then(|_| verify(q.view(), CONSUMER_FILL, Check::CopyReadBack));
    let tiers_seen = if level >= Level::Kernel {
        consume_tiers(link, job, level, tiers)?
    } else {
        (None, None)
    };
    Ok(side_verdict(copy, claim, tiers_seen))
}

/// The consumer's half of the kernel and handshake tiers, through a mapping of the producer's
/// tier buffer.
fn consume_tiers<R: Read, W: Write>(
    link: &mut Link<R, W>,
    job: Job,
    level: Level,
    tiers: &TierParams,
) -> Result<Tiers, ProtocolError> {
    let d = job.pair.tgt as i32;
    let job = Job {
        tier: Level::Kernel,
        ..job
    };
    trace::set_job(Some(job.into()));
    let layout = Layout::new(tiers);
    let handle = link.recv_handle(job)?;
    let opened = handle
        .map_err(|why| Problem::Peer(Box::new(why)))
        .and_then(|h| {
            let k = Kernels::load(d)?;
            // The producer allocated one slot of the same layout (produce_tiers).
            Ok((k, PeerMapping::open(d, &h, layout.slot_bytes())?))
        });
    let (k, mapping) = match opened {
        Ok(ok) => {
            link.send(Message::Opened {
                job,
                result: Ok(()),
            })?;
            ok
        }
        Err(why) => {
            link.send(Message::Opened {
                job,
                result: Err(why.clone()),
            })?;
            return Ok(tiers_failed(level, why));
        }
    };
    let stored = layout.store(&k, mapping.view(), tiers);
    link.barrier_out(job, Stage::KernelStored)?;
    link.barrier_in(job, Stage::ProducerRewrote)?;
    let loaded = layout.load(&k, mapping.view(), tiers);
    let handshake = if level >= Level::Handshake {
        link.barrier_in(job, Stage::Handshake)?;
        let same_gpu = job.pair.src == job.pair.tgt;
        trace::set_job(Some(
            Job {
                tier: Level::Handshake,
                ..job
            }
            .into(),
        ));
        let shook = layout.handshake(&k, mapping.view(), 1, same_gpu, tiers);
        trace::set_job(Some(job.into()));
        Some(shook)
    } else {
        None
    };
    let closed = mapping.release().map_err(Problem::from);
    link.barrier_out(job, Stage::Handshake)?;
    drop(k);
    Ok((Some(stored.and(loaded).and(closed)), handshake))
}

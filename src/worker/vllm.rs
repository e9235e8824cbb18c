//! The vLLM engine's worker: producer or consumer for a whole batch of pairs, SPEC section 2
//! step for step (`cudaSetDevice`, ..., `cudaDeviceReset` after every pair), plus the kernel
//! tier when the level asks for it.

use std::io::{Read, Write};

use super::{
    kernel_verify, peak_rss_kb, unexpected, verify, Link, CONSUMER_FILL, KERNEL_STORE,
    PRODUCER_FILL, PRODUCER_REWRITE, TEST_BYTES,
};
use crate::cuda;
use crate::protocol::{
    Check, Job, Level, Message, Pair, Problem, ProtocolError, Role, SideVerdict, Stage, TierOutcome,
};

impl<R: Read, W: Write> Link<R, W> {
    /// The next message must be this pair's `Handle`.
    fn recv_handle(
        &mut self,
        job: Job,
    ) -> Result<Result<[u8; cuda::IPC_HANDLE_BYTES], Problem>, ProtocolError> {
        match self.recv()? {
            Message::Handle { job: j, handle } if j.index == job.index => Ok(handle),
            other => unexpected("Handle", other),
        }
    }
    fn recv_opened(&mut self, job: Job) -> Result<Result<(), Problem>, ProtocolError> {
        match self.recv()? {
            Message::Opened { job: j, result } if j.index == job.index => Ok(result),
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
    pairs: &[Pair],
) -> Result<(), ProtocolError> {
    for (index, &pair) in pairs.iter().enumerate() {
        let job = Job {
            index: index as u32,
            pair,
            role,
            tier: Level::Copy,
        };
        let device = match role {
            Role::Producer => pair.src as i32,
            Role::Consumer => pair.tgt as i32,
        };
        let mut verdict = match role {
            Role::Producer => produce(link, job, level)?,
            Role::Consumer => consume(link, job, level)?,
        };
        // vLLM resets after every pair, so that each pair starts from a clean context. A failed
        // reset fails this side's copy test (the next pair would start from a dirty context).
        if let Err(e) = cuda::device_reset(device) {
            if verdict.copy.is_ok() {
                verdict.copy = Err(e.into());
            }
        }
        link.send(Message::Verdict {
            job,
            verdict,
            peak_rss_kb: peak_rss_kb(),
        })?;
    }
    Ok(())
}

/// One side's verdict from its copy test, its claim, and its kernel tier (`None`: not run).
fn side_verdict(
    copy: Result<(), Problem>,
    claim: Option<bool>,
    kernel: Option<Result<(), Problem>>,
) -> SideVerdict {
    SideVerdict {
        copy,
        claim,
        kernel: match kernel {
            None => TierOutcome::NotRun,
            Some(Ok(())) => TierOutcome::Ok,
            Some(Err(p)) => TierOutcome::Failed(p),
        },
    }
}

/// Producer steps 1, 3 and 4 of SPEC section 2, plus its half of the kernel tier.
fn produce<R: Read, W: Write>(
    link: &mut Link<R, W>,
    job: Job,
    level: Level,
) -> Result<SideVerdict, ProtocolError> {
    let d = job.pair.src as i32;
    // vLLM's calls exactly; the allocation is not freed: the reset after the pair releases it.
    let exported = (|| {
        cuda::set_device(d)?;
        let p = cuda::malloc(d, TEST_BYTES)?;
        cuda::memset(d, p, PRODUCER_FILL, TEST_BYTES)?;
        cuda::device_synchronize(d)?;
        Ok::<_, cuda::Error>((p, cuda::ipc_get_mem_handle(d, p)?))
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
            return Ok(side_verdict(Err(why), None, None));
        }
    };
    if let Err(why) = link.recv_opened(job)? {
        return Ok(side_verdict(Err(Problem::Peer(Box::new(why))), None, None));
    }
    link.barrier_out(job, Stage::Copy)?;
    link.barrier_in(job, Stage::Copy)?;
    let copy = verify(d, p, TEST_BYTES, CONSUMER_FILL, Check::CopyReadBack);
    let kernel = if level >= Level::Kernel {
        // The consumer's SM stores must not overwrite the 2s before this side has read them.
        link.barrier_out(job, Stage::CopyChecked)?;
        link.barrier_in(job, Stage::KernelStored)?;
        let seen = verify(d, p, TEST_BYTES, KERNEL_STORE, Check::KernelStores);
        let rewrite = cuda::memset(d, p, PRODUCER_REWRITE, TEST_BYTES)
            .and_then(|_| cuda::device_synchronize(d))
            .map_err(Problem::from);
        link.barrier_out(job, Stage::ProducerRewrote)?;
        Some(seen.and(rewrite))
    } else {
        None
    };
    Ok(side_verdict(copy, None, kernel))
}

/// Consumer steps 2, 3 and 4 of SPEC section 2, plus its half of the kernel tier.
fn consume<R: Read, W: Write>(
    link: &mut Link<R, W>,
    job: Job,
    level: Level,
) -> Result<SideVerdict, ProtocolError> {
    let pair = job.pair;
    let d = pair.tgt as i32;
    let selected = cuda::set_device(d).map_err(Problem::from);
    let handle = link.recv_handle(job)?;
    let claim = cuda::runtime_claims_peer(pair.src as i32, d).ok();
    let opened = match (selected, handle) {
        (Err(why), _) => Err(why),
        (_, Err(why)) => Err(Problem::Peer(Box::new(why))),
        (Ok(()), Ok(h)) => cuda::ipc_open_mem_handle(d, &h).map_err(Problem::from),
    };
    let q = match opened {
        Ok(q) => q,
        Err(why) => {
            link.send(Message::Opened {
                job,
                result: Err(why.clone()),
            })?;
            return Ok(side_verdict(Err(why), claim, None));
        }
    };
    link.send(Message::Opened {
        job,
        result: Ok(()),
    })?;
    // A failure here is this side's "false"; the barriers still run so the producer is not
    // left waiting.
    let wrote = cuda::memset(d, q, CONSUMER_FILL, TEST_BYTES)
        .and_then(|_| cuda::device_synchronize(d))
        .map_err(Problem::from);
    link.barrier_in(job, Stage::Copy)?;
    link.barrier_out(job, Stage::Copy)?;
    let copy = wrote.and_then(|_| verify(d, q, TEST_BYTES, CONSUMER_FILL, Check::CopyReadBack));
    let kernel = if level >= Level::Kernel {
        link.barrier_in(job, Stage::CopyChecked)?;
        let stored = cuda::kernel_store(d, q, TEST_BYTES, KERNEL_STORE).map_err(Problem::from);
        link.barrier_out(job, Stage::KernelStored)?;
        link.barrier_in(job, Stage::ProducerRewrote)?;
        let loaded = kernel_verify(d, q, TEST_BYTES, PRODUCER_REWRITE);
        Some(stored.and(loaded))
    } else {
        None
    };
    Ok(side_verdict(copy, claim, kernel))
}

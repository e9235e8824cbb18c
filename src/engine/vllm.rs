//! vLLM's procedure (SPEC section 2) over the pool: a producer and a consumer take the batch
//! pair after pair; the parent relays every message between them (a star, not a line between
//! them), so it sees every step, can time each pair out, and knows which pair and step a silent
//! worker was stuck in.

use std::time::Instant;

use super::pool::{next_event, Event, Graveyard, Worker};
use super::{check_ids, hello_count, Ctx, RoundError, RoundOut};
use crate::error::{Error, Phase};
use crate::model::{
    all_pairs, Fault, Hang, Level, Lost, Outcome, Pair, Role, Route, SideVerdict, TierParams,
    Transport, WorkerFault, WorkerInfo,
};
use crate::protocol::{self, Job, Message};

/// Messages one side may send for one pair: two Handles or Openeds, five barriers, a verdict —
/// and some slack. More is a worker flooding the pipe, which must not keep a pair alive.
const MAX_MESSAGES_PER_PAIR: u32 = 16;

/// Runs `pairs` (all pairs when `None`) on a fresh producer and consumer.
/// Runs `routes` (all pairs when `None`), legacy IPC only: vLLM's procedure knows no other
/// transport (the options refuse one).
pub(super) fn round(
    ctx: &Ctx,
    routes: Option<&[Route]>,
    graveyard: &mut Graveyard,
) -> Result<RoundOut, RoundError> {
    let pairs: Option<Vec<Pair>> = routes.map(|r| r.iter().map(|r| r.pair).collect());
    let pairs = pairs.as_deref();
    let mut workers: Vec<Option<Worker>> = Vec::new();
    let mut result = Ok(());
    for role in [Role::Producer, Role::Consumer] {
        match Worker::spawn(&ctx.path, role.name().to_string(), &ctx.env, false) {
            Ok(w) => workers.push(Some(w)),
            Err(e) => {
                result = Err(RoundError::Fatal(e));
                break;
            }
        }
    }
    let result = result.and_then(|()| batch(ctx, pairs, &mut workers));
    let infos = workers
        .iter()
        .flatten()
        .map(|w| WorkerInfo {
            pid: w.pid(),
            label: w.label.clone(),
            sees: w.sees,
            peak_rss_kb: w.peak_rss_kb,
        })
        .collect();
    // Workers that hung, died or broke the protocol are killed; after a clean batch they are
    // told to exit (stdin closed) and reaped later.
    let clean = matches!(&result, Ok((_, _, outcomes))
        if outcomes.iter().all(|o| matches!(o, Some(Outcome::Done { .. }))));
    for w in workers.into_iter().flatten() {
        if !clean {
            graveyard.kill(w);
        } else {
            graveyard.bury(w);
        }
    }
    let (n, pairs, outcomes) = result?;
    Ok(RoundOut {
        n,
        routes: pairs
            .into_iter()
            .map(|pair| Route {
                transport: Transport::Ipc,
                pair,
            })
            .collect(),
        outcomes,
        // The vLLM engine does not measure bandwidth (Options::validate refuses it).
        measured: Vec::new(),
        workers: infos,
        peak_in_flight: 1,
    })
}

type Batch = (u32, Vec<Pair>, Vec<Option<Outcome>>);

fn batch(
    ctx: &Ctx,
    pairs: Option<&[Pair]>,
    workers: &mut [Option<Worker>],
) -> Result<Batch, RoundError> {
    let n = hello(ctx, workers)?;
    ctx.arm_deadline(n);
    let pairs = match pairs {
        Some(p) => {
            check_ids(p, n, ctx.environment)?;
            p.to_vec()
        }
        None => all_pairs(n),
    };
    let mut outcomes: Vec<Option<Outcome>> = vec![None; pairs.len()];
    if pairs.is_empty() {
        return Ok((n, pairs, outcomes));
    }
    let deadline = Instant::now() + ctx.opts.step_timeout;
    for (i, role) in [Role::Producer, Role::Consumer].into_iter().enumerate() {
        let w = workers[i].as_mut().expect("spawned");
        let start = start_message(role, ctx.opts.level, ctx.tiers, &pairs)?;
        w.send(&start, deadline).map_err(|fault| {
            RoundError::Fatal(Error::WorkerLost {
                during: None,
                fault,
            })
        })?;
    }
    relay(ctx, workers, &pairs, &mut outcomes)?;
    Ok((n, pairs, outcomes))
}

/// The Start message of `role` for `pairs`; refused when it does not fit one frame (vLLM's
/// procedure sends the whole batch at once: at most 8,188 pairs, all pairs of 90 GPUs).
fn start_message(
    role: Role,
    level: Level,
    tiers: TierParams,
    pairs: &[Pair],
) -> Result<Message, RoundError> {
    let start = Message::Start {
        role,
        level,
        tiers,
        pairs: pairs.to_vec(),
    };
    let bytes = protocol::encode(&start).len() - 4;
    if bytes > protocol::MAX_FRAME {
        return Err(Error::InvalidInput(format!(
            "the vLLM engine sends its whole batch in one message, and {} pairs take {bytes} \
             bytes, more than a frame's {} (all pairs of at most 90 GPUs fit): use the \
             parallel engine, or check a smaller batch",
            pairs.len(),
            protocol::MAX_FRAME
        ))
        .into());
    }
    Ok(start)
}

/// Waits for both Hellos; returns the device count.
fn hello(ctx: &Ctx, workers: &mut [Option<Worker>]) -> Result<u32, RoundError> {
    let deadline = Instant::now() + ctx.opts.startup_timeout;
    for w in workers.iter_mut().flatten() {
        w.deadline = Some(deadline);
    }
    let mut counts = [None, None];
    while counts.iter().any(Option::is_none) {
        if ctx.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Cancelled.into());
        }
        if ctx.past_deadline() {
            return Err(Error::StartDeadline {
                budget: ctx.budget(),
                worker: None,
            }
            .into());
        }
        let Some((from, event)) = next_event(workers, ctx.wake()) else {
            continue;
        };
        let name = workers[from].as_ref().expect("spawned").name();
        match event {
            Event::Message(Message::Hello {
                version,
                device_count,
                ..
            }) => {
                let n = hello_count(
                    ctx.environment,
                    &name,
                    &ctx.path,
                    version,
                    device_count,
                    ctx.driver_gpus,
                )?;
                let w = workers[from].as_mut().expect("spawned");
                w.sees = Some(n);
                w.deadline = None;
                counts[from] = Some(n);
            }
            Event::Message(other) => {
                return Err(Error::WorkerProtocol {
                    worker: name,
                    sent: format!("{other:?}"),
                    during: Phase::Hello,
                }
                .into())
            }
            Event::Timeout => {
                return Err(Error::WorkerStartup {
                    worker: None,
                    path: ctx.path.clone(),
                    timeout: ctx.opts.startup_timeout,
                    stderr: stderr_notes(workers),
                }
                .into())
            }
            Event::Broken(fault) => {
                return Err(Error::WorkerLost {
                    during: Some(Phase::Hello),
                    fault,
                }
                .into())
            }
        }
    }
    let [Some(a), Some(b)] = counts else {
        unreachable!("the loop ends when both are set")
    };
    if a != b {
        return Err(Error::DeviceCounts {
            producer: a,
            consumer: b,
        }
        .into());
    }
    Ok(a)
}

/// The last message the parent saw of the pair in flight, for a hang's cause: who sent it
/// and what it was.
fn last_event(last: Option<&(usize, Message)>) -> Option<(Role, String)> {
    let (from, msg) = last?;
    let who = if *from == 0 {
        Role::Producer
    } else {
        Role::Consumer
    };
    let what = match msg {
        Message::Handle { .. } => "IPC handle".to_string(),
        Message::Opened { .. } => "answer to opening the handle".into(),
        Message::Barrier { stage, .. } => format!("{stage:?} barrier"),
        Message::Verdict { .. } => "verdict".into(),
        other => format!("{other:?}"),
    };
    Some((who, what))
}

/// Forwards each message to the other worker and records verdicts until every pair has both,
/// or a worker hangs or dies. The pair in flight when it breaks gets [`Outcome::Hang`] or
/// [`Outcome::Error`]; the pairs after it stay `None` (interrupted).
///
/// Each pair has one deadline, set when it becomes the pair in flight: messages do not extend
/// it, and a side may send only so many messages for it.
fn relay(
    ctx: &Ctx,
    workers: &mut [Option<Worker>],
    pairs: &[Pair],
    outcomes: &mut [Option<Outcome>],
) -> Result<(), RoundError> {
    let step = ctx.opts.step_timeout;
    let mut verdicts: Vec<[Option<SideVerdict>; 2]> = vec![[None, None]; pairs.len()];
    let mut last: Option<(usize, Message)> = None;
    let mut current = 0;
    let mut deadline = Instant::now() + step;
    let mut sent = [0u32; 2];
    while current < pairs.len() {
        if ctx.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Cancelled.into());
        }
        if ctx.past_deadline() {
            // The pair in flight and those after it stay interrupted; the workers are killed.
            return Ok(());
        }
        for (side, w) in workers.iter_mut().enumerate() {
            let w = w.as_mut().expect("spawned");
            // A worker that sent everything it owes exits: that is not an error.
            w.listening = verdicts[current..].iter().any(|v| v[side].is_none());
            w.deadline = Some(deadline);
        }
        let Some((from, event)) = next_event(workers, ctx.wake()) else {
            continue;
        };
        let outcome = match event {
            Event::Message(msg) => {
                sent[from] += 1;
                if sent[from] > MAX_MESSAGES_PER_PAIR {
                    let w = workers[from].as_ref().expect("spawned");
                    let fault = w.fault(Fault::TooManyMessages(MAX_MESSAGES_PER_PAIR));
                    Some(Outcome::Error(Lost::Worker(fault)))
                } else {
                    match route(workers, &mut verdicts, from, msg.clone(), deadline) {
                        Ok(()) => {
                            last = Some((from, msg));
                            None
                        }
                        Err(fault) => Some(Outcome::Error(Lost::Worker(fault))),
                    }
                }
            }
            Event::Timeout => Some(Outcome::Hang(Hang::Pair {
                waited: step,
                after: last_event(last.as_ref()),
                stderr: stderr_notes(workers),
            })),
            Event::Broken(fault) => Some(Outcome::Error(Lost::Worker(fault))),
        };
        if let Some(outcome) = outcome {
            // The pairs before it have their outcomes; those after it stay interrupted.
            outcomes[current] = Some(outcome);
            return Ok(());
        }
        while current < pairs.len() && verdicts[current].iter().all(Option::is_some) {
            outcomes[current] = done(&mut verdicts[current]);
            current += 1;
            last = None;
            deadline = Instant::now() + step;
            sent = [0, 0];
        }
    }
    Ok(())
}

/// What each worker wrote to its stderr: `; the producer (pid 1)'s stderr: "…"`, for each
/// that wrote anything.
fn stderr_notes(workers: &mut [Option<Worker>]) -> String {
    workers
        .iter_mut()
        .flatten()
        .map(|w| {
            let note = w.stderr_note();
            match note.strip_prefix("; its stderr") {
                Some(rest) => format!("; the {}'s stderr{rest}", w.name()),
                None => note,
            }
        })
        .collect()
}

fn done(v: &mut [Option<SideVerdict>; 2]) -> Option<Outcome> {
    let [p, c] = v;
    Some(Outcome::Done {
        producer: p.take().expect("a finished pair has both verdicts"),
        consumer: c.take().expect("a finished pair has both verdicts"),
    })
}

/// Forwards `msg` from worker `from` to the other, or records it if it is a verdict; `Err`
/// says how the sender broke the protocol (or what went wrong with the receiver).
fn route(
    workers: &mut [Option<Worker>],
    verdicts: &mut [[Option<SideVerdict>; 2]],
    from: usize,
    msg: Message,
    deadline: Instant,
) -> Result<(), WorkerFault> {
    let sender = workers[from].as_mut().expect("spawned");
    let job: Job = match &msg {
        Message::Handle { job, .. } if from == 0 => *job,
        Message::Opened { job, .. } if from == 1 => *job,
        Message::Barrier { job, .. } | Message::Verdict { job, .. } => *job,
        m => return Err(sender.fault(Fault::Forbidden(format!("{m:?}")))),
    };
    let index = job.index as usize;
    if index >= verdicts.len() {
        return Err(sender.fault(Fault::PairOutOfRange {
            index,
            of: verdicts.len(),
        }));
    }
    match msg {
        Message::Verdict {
            verdict,
            peak_rss_kb,
            ..
        } => {
            sender.peak_rss_kb = peak_rss_kb;
            if verdicts[index][from].replace(verdict).is_some() {
                return Err(sender.fault(Fault::TwoVerdicts { index }));
            }
            Ok(())
        }
        m => workers[1 - from]
            .as_mut()
            .expect("spawned")
            .send(&m, deadline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_that_does_not_fit_one_frame_is_refused_before_anything_is_sent() {
        let tiers = super::super::tier_params(&super::super::Options::default());
        let fits = start_message(Role::Producer, Level::Copy, tiers, &all_pairs(90));
        let decoded = fits.map(|m| protocol::decode(&protocol::encode(&m)[4..]));
        assert!(matches!(decoded, Ok(Ok(Message::Start { pairs, .. })) if pairs.len() == 8100));
        match start_message(Role::Consumer, Level::Copy, tiers, &all_pairs(91)) {
            Err(RoundError::Fatal(Error::InvalidInput(why))) => {
                assert!(why.contains("8281 pairs"), "{why}");
                assert!(why.contains("use the parallel engine"), "{why}");
            }
            _ => panic!("91 GPUs' pairs were not refused"),
        }
    }
}

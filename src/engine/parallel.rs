//! The parallel engine: one worker per GPU, each with one context for the whole run, every
//! pair in flight at once, no device reset.
//!
//! Worker `P[d]` owns GPU `d`'s buffer (one slot per consumer device) and maps every peer's;
//! a same-GPU pair `d->d` needs a second process on `d`, `S[d]`, started only when that pair is
//! asked. All workers start together; each says Hello, is told its device, exports its buffer
//! once, and then does the steps the parent sends, in order. A pair's steps alternate between
//! its consumer and its producer ([`steps`]); pairs on different workers run concurrently.
//!
//! Deadlines: each worker has at most one step "at its head"; its clock starts when the step
//! becomes the head (sent to an idle worker, or the one before it answered) and nothing the
//! worker sends extends it — a reply that is not the head step's is a protocol error. A worker
//! that misses its deadline is killed: its head pair is `hang`; one that dies or breaks the
//! protocol makes its head pair `error`; every other unfinished pair it was part of is
//! interrupted and run again by the next round on fresh workers, while the pairs that do not
//! involve it finish here. A lost worker is killed without waiting; the graveyard reaps it.
//! When the whole check's deadline passes, every unfinished pair is interrupted and every
//! worker killed.
//!
//! Transports: a pair asked over both is two jobs on the same workers, each with its own
//! steps, verdicts and retries. For the cuMem transport each worker gets a descriptor socket
//! at spawn; a producer exports its cuMem allocation at set-up and sends its descriptor to
//! the parent (which holds it for the round), and the parent relays it to each consumer just
//! before that consumer's first step with it. So the descriptor crosses two process
//! boundaries by `SCM_RIGHTS`, the way PyTorch's symmetric memory hands it between ranks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::pool::{next_event, Event, Graveyard, SendError, Worker};
use super::{check_ids, hello_count, Ctx, RoundError, RoundOut};
use crate::error::{Error, Phase};
use crate::model::{
    all_pairs, Bandwidth, Class, Fault, Hang, Level, Lost, Outcome, Pair, Problem, Role, Route,
    SideVerdict, TierOutcome, Transport, Visibility, WorkerInfo,
};
use crate::protocol::{Job, Message, Op, IPC_HANDLE_BYTES};
use crate::visible;
use crate::worker::{descriptor_payload, CONSUMER_FILL};

/// How long a descriptor may take to cross a socket between the parent and a worker: it is
/// sent before the message that announces it, so it is there at once unless something is wrong.
const DESCRIPTOR_WAIT: Duration = Duration::from_secs(5);

/// The steps of one pair at `level`: who does what, in order.
fn steps(level: Level) -> Vec<(Who, StepKind)> {
    let mut s = vec![
        (Who::Consumer, StepKind::Write),
        (Who::Producer, StepKind::VerifyCopy),
    ];
    if level >= Level::Kernel {
        s.extend([
            (Who::Consumer, StepKind::KernelStore),
            (Who::Producer, StepKind::VerifyStores),
            (Who::Consumer, StepKind::KernelLoad),
        ]);
    }
    if level >= Level::Handshake {
        s.push((Who::Both, StepKind::Handshake));
    }
    s
}

/// Which of a pair's workers does a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Producer,
    Consumer,
    /// Both at once: kernels that must be resident at the same time.
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepKind {
    /// Consumer: map, copy-engine memset of 2s, read back (vLLM's consumer half).
    Write,
    /// Producer: read back the 2s (vLLM's producer half).
    VerifyCopy,
    /// Consumer: SM stores of the store pattern.
    KernelStore,
    /// Producer: check them, write the load pattern.
    VerifyStores,
    /// Consumer: SM loads of the load pattern.
    KernelLoad,
    /// Both: the resident ping-pong.
    Handshake,
}

impl StepKind {
    fn tier(self) -> Level {
        match self {
            StepKind::Write | StepKind::VerifyCopy => Level::Copy,
            StepKind::KernelStore | StepKind::VerifyStores | StepKind::KernelLoad => Level::Kernel,
            StepKind::Handshake => Level::Handshake,
        }
    }
}

/// A worker's part in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// `P[d]`: owns GPU d's buffer; consumer of every other GPU's.
    Primary(u32),
    /// `S[d]`: the second process on GPU d, consumer of `d->d`.
    Secondary(u32),
}

impl Part {
    fn device(self) -> u32 {
        match self {
            Part::Primary(d) | Part::Secondary(d) => d,
        }
    }
    fn label(self) -> String {
        match self {
            Part::Primary(d) => format!("worker of GPU {d}"),
            Part::Secondary(d) => format!("second worker of GPU {d}"),
        }
    }
}

enum State {
    /// Started; no Hello yet.
    Starting,
    /// Told its device; no Ready yet.
    SettingUp,
    /// Ready: its buffer's handle (primaries).
    Ready(Option<[u8; IPC_HANDLE_BYTES]>),
    /// Set-up failed: why (its pairs fail with it, as vLLM's would).
    Failed(Problem),
    /// Killed or dead.
    Gone,
}

struct Member {
    part: Part,
    state: State,
    /// The cuMem transport, when asked for: a primary's allocation (its length and the
    /// descriptor the parent received; a length of 0 for a worker that exports none), or why
    /// this worker cannot take part in it.
    cumem: Option<Result<(u64, Option<OwnedFd>), Problem>>,
    /// Steps sent and not yet answered, oldest first: (job, step number, role in the job).
    queue: VecDeque<(usize, usize, Role)>,
    /// A handshake step is in its queue: no second one may be sent (two workers each running
    /// one pair's handshake kernel while the other waits behind the other pair's would only
    /// meet at the deadline).
    in_handshake: bool,
    info: WorkerInfo,
}

struct JobState {
    pair: Pair,
    transport: Transport,
    producer: usize,
    consumer: usize,
    /// The next step to send.
    next: usize,
    /// Replies still awaited for the step in flight (2 for a handshake).
    pending: u8,
    started: bool,
    finished: bool,
    p: SideVerdict,
    c: SideVerdict,
    kernel_c: Vec<Result<(), Problem>>,
    outcome: Option<Outcome>,
    /// A retry: starts when every other job has finished.
    held: bool,
}

fn fresh_side() -> SideVerdict {
    SideVerdict {
        copy: Ok(()),
        claim: None,
        kernel: TierOutcome::NotRun,
        handshake: TierOutcome::NotRun,
    }
}

/// Runs `pairs` (all pairs when `None`) on fresh workers, one (or two) per GPU.
///
/// Pairs at positions `hold` and later (retries of a hang or an error) start only when every
/// other pair has finished, so that a second hang interrupts nothing else.
pub(super) fn round(
    ctx: &Ctx,
    routes: Option<&[Route]>,
    hold: usize,
    graveyard: &mut Graveyard,
) -> Result<RoundOut, RoundError> {
    let mut run = Run {
        ctx,
        workers: Vec::new(),
        lost: Vec::new(),
        members: Vec::new(),
        jobs: Vec::new(),
        in_flight: 0,
        peak_in_flight: 0,
        n: 0,
        handshakes_waiting: VecDeque::new(),
        relayed: BTreeSet::new(),
    };
    let result = run.go(routes, hold);
    let infos: Vec<WorkerInfo> = run.members.iter().map(|m| m.info.clone()).collect();
    for w in run.workers.drain(..).flatten() {
        if result.is_ok() {
            graveyard.bury(w);
        } else {
            graveyard.kill(w);
        }
    }
    for w in run.lost.drain(..) {
        graveyard.kill(w);
    }
    let (routes, outcomes, measured) = result?;
    Ok(RoundOut {
        n: run.n,
        routes,
        outcomes,
        measured,
        workers: infos,
        peak_in_flight: run.peak_in_flight,
    })
}

struct Run<'a> {
    ctx: &'a Ctx<'a>,
    workers: Vec<Option<Worker>>,
    /// Workers lost (killed) during the round, for the graveyard to reap.
    lost: Vec<Worker>,
    members: Vec<Member>,
    jobs: Vec<JobState>,
    in_flight: u32,
    peak_in_flight: u32,
    n: u32,
    /// Jobs whose handshake waits for one of its workers to finish another.
    handshakes_waiting: VecDeque<usize>,
    /// (producer, consumer) members whose producer's cuMem descriptor went to the consumer.
    relayed: BTreeSet<(usize, usize)>,
}

type Outcomes = (Vec<Route>, Vec<Option<Outcome>>, Vec<Measured>);

/// A pair's bandwidth measurement, or why it has none.
pub(super) type Measured = (Pair, Result<Bandwidth, Problem>);

impl Run<'_> {
    fn go(&mut self, routes: Option<&[Route]>, hold: usize) -> Result<Outcomes, RoundError> {
        // The device count: known from /proc when the GPUs could be named; otherwise one
        // worker seeing every GPU is started first and asked.
        let n = match &self.ctx.gpus {
            Some(g) => g.len() as u32,
            None => {
                let i = self.spawn(Part::Primary(0))?;
                self.wait_hello(i)?
            }
        };
        self.n = n;
        self.ctx.arm_deadline(n);
        let batch: Vec<Route> = match routes {
            Some(r) => {
                let pairs: Vec<Pair> = r.iter().map(|r| r.pair).collect();
                check_ids(&pairs, n, self.ctx.environment)?;
                r.to_vec()
            }
            None => self
                .ctx
                .opts
                .transport
                .list()
                .iter()
                .flat_map(|&transport| {
                    all_pairs(n)
                        .into_iter()
                        .map(move |pair| Route { transport, pair })
                })
                .collect(),
        };
        // A pair asked twice runs once: both positions get its outcome.
        let mut unique: BTreeMap<Route, Vec<usize>> = BTreeMap::new();
        for (i, r) in batch.iter().enumerate() {
            unique.entry(*r).or_default().push(i);
        }
        let mut parts: Vec<Part> = Vec::new();
        for p in unique.keys().map(|r| r.pair) {
            let needed = if p.src == p.tgt {
                vec![Part::Primary(p.src), Part::Secondary(p.src)]
            } else {
                vec![Part::Primary(p.src), Part::Primary(p.tgt)]
            };
            for part in needed {
                if !parts.contains(&part) {
                    parts.push(part);
                }
            }
        }
        for part in &parts {
            if !self.members.iter().any(|m| m.part == *part) {
                self.spawn(*part)?;
            }
        }
        let index_of = |members: &[Member], part: Part| {
            members
                .iter()
                .position(|m| m.part == part)
                .expect("every part was spawned")
        };
        for (&Route { transport, pair }, positions) in &unique {
            let consumer = if pair.src == pair.tgt {
                Part::Secondary(pair.src)
            } else {
                Part::Primary(pair.tgt)
            };
            self.jobs.push(JobState {
                pair,
                transport,
                producer: index_of(&self.members, Part::Primary(pair.src)),
                consumer: index_of(&self.members, consumer),
                next: 0,
                pending: 0,
                started: false,
                finished: false,
                p: fresh_side(),
                c: fresh_side(),
                kernel_c: Vec::new(),
                outcome: None,
                held: positions.iter().all(|&i| i >= hold),
            });
        }
        // A worker already past Hello (the one asked for the count) is set up now.
        for i in 0..self.members.len() {
            if matches!(self.members[i].state, State::SettingUp) {
                self.setup(i)?;
            }
        }
        self.event_loop()?;
        let measured = match self.ctx.tiers.bandwidth_bytes {
            0 => Vec::new(),
            _ => self.measure_all()?,
        };
        let by_pair: BTreeMap<Route, Option<Outcome>> = self
            .jobs
            .iter()
            .map(|j| {
                let route = Route {
                    transport: j.transport,
                    pair: j.pair,
                };
                (route, j.outcome.clone())
            })
            .collect();
        let outcomes = batch.iter().map(|p| by_pair[p].clone()).collect();
        Ok((batch, outcomes, measured))
    }

    /// The bandwidth phase, after every pair's tiers: each pair whose copy tier passed on both
    /// sides over legacy IPC, measured by its consumer one at a time (so that no two pairs share a link while
    /// measured), in pair order, until the whole check's deadline.
    fn measure_all(&mut self) -> Result<Vec<Measured>, RoundError> {
        let mut out = Vec::new();
        for j in 0..self.jobs.len() {
            let job = &self.jobs[j];
            // Through the legacy IPC mapping: the cuMem transport's jobs are not measured.
            let copied = job.transport == Transport::Ipc
                && matches!(&job.outcome, Some(Outcome::Done { producer, consumer })
                if producer.copy.is_ok() && consumer.copy.is_ok());
            let alive =
                self.workers[job.producer].is_some() && self.workers[job.consumer].is_some();
            if !copied || !alive {
                continue;
            }
            self.check_cancel()?;
            if self.ctx.past_deadline() {
                break;
            }
            let pair = job.pair;
            out.push((pair, self.measure(j)?));
        }
        Ok(out)
    }

    /// Job `j`'s bandwidth step: sent to its consumer, answered within the step timeout. A
    /// consumer that does not answer, dies or answers something else is killed (its pair's
    /// verdict stands: the measurement failed, with why).
    fn measure(&mut self, j: usize) -> Result<Result<Bandwidth, Problem>, RoundError> {
        let (c, pair) = (self.jobs[j].consumer, self.jobs[j].pair);
        let job = Job {
            index: j as u32,
            pair,
            role: Role::Consumer,
            tier: Level::Copy,
            transport: Transport::Ipc,
        };
        let message = Message::Step {
            job,
            slot: pair.tgt,
            op: Op::Bandwidth,
        };
        let timeout = self.ctx.opts.step_timeout;
        let deadline = Instant::now() + timeout;
        let worker = self.worker(c);
        worker.deadline = Some(deadline);
        let name = worker.name();
        if let Err(e) = worker.try_send(&message, deadline) {
            let why = match e {
                SendError::Stuck(fault) => fault.to_string(),
                SendError::Gone => "it is gone".into(),
            };
            self.kill(c);
            return Ok(Err(Problem::Driver(format!(
                "the bandwidth step could not be sent to the {name}: {why}"
            ))));
        }
        loop {
            self.check_cancel()?;
            let Some((from, event)) = next_event(&mut self.workers, self.ctx.wake()) else {
                continue;
            };
            let why = match (event, from == c) {
                (
                    Event::Message(Message::Measured {
                        job: answered,
                        result,
                        peak_rss_kb,
                    }),
                    true,
                ) if answered == job => {
                    self.members[c].info.peak_rss_kb = peak_rss_kb;
                    self.worker(c).deadline = None;
                    return Ok(result);
                }
                (Event::Timeout, true) => format!(
                    "the {name} gave no bandwidth figures within {:.1} s",
                    timeout.as_secs_f64()
                ),
                (Event::Broken(fault), true) => format!("the bandwidth step: {fault}"),
                (Event::Message(other), true) => format!(
                    "the {name} answered the bandwidth step with {}",
                    message_name(&other)
                ),
                // Another worker spoke out of turn or ended: it is not needed any more.
                (_, false) => {
                    self.kill(from);
                    continue;
                }
            };
            self.kill(c);
            return Ok(Err(Problem::Driver(why)));
        }
    }

    /// Kills worker `w` (the graveyard reaps it) without touching any verdict.
    fn kill(&mut self, w: usize) {
        self.members[w].state = State::Gone;
        if let Some(mut worker) = self.workers[w].take() {
            worker.kill();
            self.lost.push(worker);
        }
    }

    fn spawn(&mut self, part: Part) -> Result<usize, RoundError> {
        let mut env = self.ctx.env.clone();
        if let (Visibility::One, Some(gpus)) = (self.ctx.visibility, &self.ctx.gpus) {
            let gpu = &gpus[part.device() as usize];
            env.push((visible::VAR.into(), gpu.uuid.clone().into()));
        }
        let cumem = self.ctx.opts.transport.has(Transport::Cumem);
        let mut w = Worker::spawn(&self.ctx.path, part.label(), &env, cumem)?;
        w.deadline = Some(Instant::now() + self.ctx.opts.startup_timeout);
        self.members.push(Member {
            part,
            state: State::Starting,
            cumem: None,
            queue: VecDeque::new(),
            in_handshake: false,
            info: WorkerInfo {
                pid: w.pid(),
                label: part.label(),
                sees: None,
                peak_rss_kb: 0,
            },
        });
        self.workers.push(Some(w));
        Ok(self.workers.len() - 1)
    }

    /// Waits for worker `i`'s Hello alone (the count-first start): its device count.
    fn wait_hello(&mut self, i: usize) -> Result<u32, RoundError> {
        while matches!(self.members[i].state, State::Starting) {
            self.check_cancel()?;
            if self.ctx.past_deadline() {
                return Err(Error::StartDeadline {
                    budget: self.ctx.budget(),
                    worker: Some(self.worker(i).name()),
                }
                .into());
            }
            if let Some((from, event)) = next_event(&mut self.workers, self.ctx.wake()) {
                self.on_event(from, event)?;
            }
        }
        Ok(self.members[i].info.sees.unwrap_or(0))
    }

    fn check_cancel(&self) -> Result<(), RoundError> {
        if self.ctx.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled.into());
        }
        Ok(())
    }

    fn worker(&mut self, i: usize) -> &mut Worker {
        self.workers[i].as_mut().expect("a live worker")
    }

    fn setup(&mut self, i: usize) -> Result<(), RoundError> {
        let part = self.members[i].part;
        let (device, slots) = match (self.ctx.visibility, part) {
            (Visibility::One, Part::Primary(_)) => (0, self.n),
            (Visibility::One, Part::Secondary(_)) => (0, 0),
            (Visibility::All, Part::Primary(d)) => (d, self.n),
            (Visibility::All, Part::Secondary(d)) => (d, 0),
        };
        let deadline = Instant::now() + self.ctx.opts.startup_timeout;
        self.worker(i).deadline = Some(deadline);
        let tiers = self.ctx.tiers;
        let cumem = self.ctx.opts.transport.has(Transport::Cumem);
        let w = self.worker(i);
        w.send(
            &Message::Setup {
                device,
                slots,
                tiers,
                cumem,
            },
            deadline,
        )
        .map_err(|fault| {
            RoundError::Fatal(Error::WorkerLost {
                during: None,
                fault,
            })
        })?;
        self.members[i].state = State::SettingUp;
        Ok(())
    }

    fn event_loop(&mut self) -> Result<(), RoundError> {
        while self.jobs.iter().any(|j| !j.finished) {
            self.check_cancel()?;
            if self.ctx.past_deadline() {
                self.stop_all();
                break;
            }
            let Some((from, event)) = next_event(&mut self.workers, self.ctx.wake()) else {
                continue;
            };
            self.on_event(from, event)?;
        }
        Ok(())
    }

    /// The whole check's deadline passed: every unfinished pair is interrupted (not an
    /// attempt) and every worker killed.
    fn stop_all(&mut self) {
        for j in self.jobs.iter_mut().filter(|j| !j.finished) {
            j.finished = true;
            j.outcome = None;
        }
        self.in_flight = 0;
        for w in 0..self.workers.len() {
            self.kill(w);
        }
    }

    fn on_event(&mut self, from: usize, event: Event) -> Result<(), RoundError> {
        let name = self.worker(from).name();
        let starting = matches!(self.members[from].state, State::Starting | State::SettingUp);
        match event {
            Event::Timeout if starting => Err(Error::WorkerStartup {
                worker: Some(name),
                path: self.ctx.path.clone(),
                timeout: self.ctx.opts.startup_timeout,
                stderr: self.worker(from).stderr_note(),
            }
            .into()),
            Event::Broken(fault) if starting => Err(Error::WorkerLost {
                during: Some(Phase::Starting),
                fault,
            }
            .into()),
            Event::Timeout => {
                if let Some(later) = self.held_up_by_partner(from) {
                    self.worker(from).deadline = Some(later);
                    return Ok(());
                }
                let hang = Hang::Silent {
                    worker: name,
                    waited: self.ctx.opts.step_timeout,
                    step: self.head_step(from),
                    stderr: self.worker(from).stderr_note(),
                };
                self.lose(from, Outcome::Hang(hang));
                Ok(())
            }
            Event::Broken(fault) => {
                self.lose(from, Outcome::Error(Lost::Worker(fault)));
                Ok(())
            }
            Event::Message(m) => self.on_message(from, m),
        }
    }

    fn on_message(&mut self, from: usize, m: Message) -> Result<(), RoundError> {
        let name = self.worker(from).name();
        match (&self.members[from].state, m) {
            (
                State::Starting,
                Message::Hello {
                    version,
                    device_count,
                    ..
                },
            ) => {
                let sees = hello_count(
                    self.ctx.environment,
                    &name,
                    &self.ctx.path,
                    version,
                    device_count,
                    self.ctx.driver_gpus,
                )?;
                self.members[from].info.sees = Some(sees);
                self.worker(from).sees = Some(sees);
                match self.ctx.visibility {
                    Visibility::One if sees != 1 => {
                        return Err(RoundError::Fallback(format!(
                            "the {name}, shown only its GPU's UUID, saw {sees} GPUs"
                        )))
                    }
                    Visibility::All if self.n != 0 && sees != self.n => {
                        return Err(RoundError::Fallback(format!(
                            "/proc/driver/nvidia lists {} visible GPUs but the driver counts {sees}",
                            self.n
                        )))
                    }
                    _ => {}
                }
                self.members[from].state = State::SettingUp;
                if self.n != 0 {
                    self.setup(from)?;
                } else {
                    self.worker(from).deadline = None;
                }
                Ok(())
            }
            (State::SettingUp, Message::Ready { result, cumem }) => {
                self.worker(from).deadline = None;
                // A worker names devices as its CUDA sees them: as this process numbers them.
                let device = self.members[from].part.device() as i32;
                self.members[from].cumem = cumem.map(|c| {
                    self.take_descriptor(from, c)
                        .map_err(|p| renumbered(p, device))
                });
                self.members[from].state = match result {
                    Ok(handle) => State::Ready(handle),
                    Err(p) => State::Failed(p),
                };
                if matches!(self.members[from].part, Part::Primary(_))
                    && matches!(self.members[from].state, State::Ready(None))
                {
                    self.lose_to(from, Fault::NoBuffer);
                }
                self.start_ready_jobs();
                Ok(())
            }
            (
                State::Ready(_),
                Message::Done {
                    job,
                    result,
                    claim,
                    peak_rss_kb,
                },
            ) => {
                self.members[from].info.peak_rss_kb = peak_rss_kb;
                let Some(&(j, step, role)) = self.members[from].queue.front() else {
                    self.lose_to(from, Fault::StrayAnswer);
                    return Ok(());
                };
                let expected = &self.jobs[j];
                if job.pair != expected.pair
                    || job.role != role
                    || job.index != j as u32
                    || job.transport != expected.transport
                {
                    self.lose_to(from, Fault::WrongJob(format!("{job:?}")));
                    return Ok(());
                }
                self.members[from].queue.pop_front();
                let next_head = !self.members[from].queue.is_empty();
                let deadline = Instant::now() + self.ctx.opts.step_timeout;
                self.worker(from).deadline = next_head.then_some(deadline);
                if steps(self.ctx.opts.level)[step].1 == StepKind::Handshake {
                    self.members[from].in_handshake = false;
                }
                self.record(j, step, role, result, claim);
                self.start_waiting_handshakes();
                Ok(())
            }
            (State::Starting | State::SettingUp, other) => Err(Error::WorkerProtocol {
                worker: name,
                sent: message_name(&other).into(),
                during: Phase::Starting,
            }
            .into()),
            (_, other) => {
                self.lose_to(from, Fault::OutOfTurn(message_name(&other)));
                Ok(())
            }
        }
    }

    /// What worker `from`'s `Ready` said of the cuMem transport, with the descriptor of its
    /// allocation taken from its socket (where it waits already) when it exported one.
    fn take_descriptor(
        &mut self,
        from: usize,
        said: Result<u64, Problem>,
    ) -> Result<(u64, Option<OwnedFd>), Problem> {
        let bytes = said?;
        if bytes == 0 {
            return Ok((0, None)); // a worker that exports none
        }
        let mut payload = [0u8; 12];
        let (n, fd) = self
            .worker(from)
            .recv_descriptor(&mut payload, Instant::now() + DESCRIPTOR_WAIT)
            .map_err(|e| Problem::Descriptor(format!("receiving it from the producer: {e}")))?;
        let said = u64::from_le_bytes(payload[4..].try_into().unwrap_or_default());
        if n != payload.len() || said != bytes {
            return Err(Problem::Descriptor(format!(
                "the producer's came with {n} bytes saying {said} bytes, not {bytes}"
            )));
        }
        Ok((bytes, Some(fd)))
    }

    /// Why member `m` cannot take part in a job of `transport` as `role`, if it cannot: its
    /// set-up failed, or (a producer, cuMem transport) it has no allocation to share. A
    /// consumer needs nothing of its own for the cuMem transport: what it lacks shows in its
    /// step.
    fn unable(&self, m: usize, transport: Transport, role: Role) -> Option<Problem> {
        match (
            &self.members[m].state,
            transport,
            role,
            &self.members[m].cumem,
        ) {
            (State::Failed(why), _, _, _) => Some(why.clone()),
            (_, Transport::Cumem, Role::Producer, Some(Err(why))) => Some(why.clone()),
            _ => None,
        }
    }

    /// Starts every job whose two workers are set up (retries once the others are done).
    fn start_ready_jobs(&mut self) {
        let others_done = self.jobs.iter().all(|j| j.held || j.finished);
        for j in 0..self.jobs.len() {
            let job = &self.jobs[j];
            if job.started || job.finished || (job.held && !others_done) {
                continue;
            }
            let (p, c, t) = (job.producer, job.consumer, job.transport);
            // A worker that could not set up (or, for the cuMem transport, could not export or
            // has no socket) fails its pairs at the copy tier, as vLLM's would.
            if let Some(why) = self.unable(p, t, Role::Producer) {
                let job = &mut self.jobs[j];
                job.p.copy = Err(why.clone());
                job.c.copy = Err(Problem::Peer(Box::new(why)));
                self.finish(j);
                continue;
            }
            if let Some(why) = self.unable(c, t, Role::Consumer) {
                let job = &mut self.jobs[j];
                job.c.copy = Err(why.clone());
                job.p.copy = Err(Problem::Peer(Box::new(why)));
                self.finish(j);
                continue;
            }
            if matches!(self.members[p].state, State::Ready(Some(_)))
                && matches!(self.members[c].state, State::Ready(_))
            {
                self.jobs[j].started = true;
                self.in_flight += 1;
                self.peak_in_flight = self.peak_in_flight.max(self.in_flight);
                self.send_next(j);
            }
        }
    }

    /// Sends job `j`'s next step to whichever worker does it (both, for a handshake), or
    /// finishes the job.
    fn send_next(&mut self, j: usize) {
        let plan = steps(self.ctx.opts.level);
        let step = self.jobs[j].next;
        if step >= plan.len() {
            self.finish(j);
            return;
        }
        let (who, kind) = plan[step];
        let (p, c) = (self.jobs[j].producer, self.jobs[j].consumer);
        if who == Who::Both {
            if self.members[p].in_handshake || self.members[c].in_handshake {
                self.handshakes_waiting.push_back(j);
                return;
            }
            self.members[p].in_handshake = true;
            self.members[c].in_handshake = true;
        }
        let handle = match &self.members[p].state {
            State::Ready(Some(h)) => *h,
            _ => [0; IPC_HANDLE_BYTES],
        };
        let transport = self.jobs[j].transport;
        let op = match (kind, transport) {
            (StepKind::Write, Transport::Ipc) => Op::Write {
                handle,
                value: CONSUMER_FILL,
            },
            (StepKind::Write, Transport::Cumem) => match self.relay(p, c) {
                Ok(bytes) => Op::WriteCumem {
                    bytes,
                    value: CONSUMER_FILL,
                },
                Err(why) => {
                    // Nothing reached the consumer: the pair fails here, at the copy tier.
                    let job = &mut self.jobs[j];
                    job.c.copy = Err(why.clone());
                    job.p.copy = Err(Problem::Peer(Box::new(why)));
                    self.finish(j);
                    return;
                }
            },
            (StepKind::VerifyCopy, _) => Op::Verify {
                expect: CONSUMER_FILL,
            },
            (StepKind::KernelStore, _) => Op::KernelStore,
            (StepKind::VerifyStores, _) => Op::VerifyStores,
            (StepKind::KernelLoad, _) => Op::KernelLoad,
            (StepKind::Handshake, _) => Op::Handshake,
        };
        let targets: &[(usize, Role)] = match who {
            Who::Producer => &[(p, Role::Producer)],
            Who::Consumer => &[(c, Role::Consumer)],
            Who::Both => &[(p, Role::Producer), (c, Role::Consumer)],
        };
        self.jobs[j].next = step + 1;
        self.jobs[j].pending = targets.len() as u8;
        for &(w, role) in targets {
            let message = Message::Step {
                job: Job {
                    index: j as u32,
                    pair: self.jobs[j].pair,
                    role,
                    tier: kind.tier(),
                    transport,
                },
                slot: self.jobs[j].pair.tgt,
                op: op.clone(),
            };
            if self.workers[w].is_none() {
                continue; // lost meanwhile: the job is already interrupted
            }
            let idle = self.members[w].queue.is_empty();
            self.members[w].queue.push_back((j, step, role));
            let deadline = Instant::now() + self.ctx.opts.step_timeout;
            let worker = self.worker(w);
            if idle {
                worker.deadline = Some(deadline);
            }
            match worker.try_send(&message, deadline) {
                Ok(()) => {}
                Err(SendError::Stuck(fault)) => {
                    self.lose(w, Outcome::Hang(Hang::StoppedReading(fault)));
                }
                // Its exit shows on its pipe, after whatever it answered before dying: the
                // poll loop reads those first, then the pair at its head gets the error.
                Err(SendError::Gone) => {}
            }
        }
    }

    /// The length of producer `p`'s cuMem allocation, its descriptor sent to consumer `c`
    /// first unless it was already (the consumer maps each producer's once); or why it could
    /// not be.
    fn relay(&mut self, p: usize, c: usize) -> Result<u64, Problem> {
        let (bytes, fd) = match &self.members[p].cumem {
            Some(Ok((bytes, Some(fd)))) => (*bytes, fd),
            _ => {
                return Err(Problem::Descriptor(
                    "the producer exported no cuMem allocation".into(),
                ))
            }
        };
        if self.relayed.contains(&(p, c)) {
            return Ok(bytes);
        }
        let Some(consumer) = self.workers[c].as_ref() else {
            return Err(Problem::Descriptor("the consumer is gone".into()));
        };
        let src = match self.members[p].part {
            Part::Primary(d) | Part::Secondary(d) => d,
        };
        consumer
            .send_descriptor(
                fd.as_fd(),
                &descriptor_payload(src, bytes),
                Instant::now() + DESCRIPTOR_WAIT,
            )
            .map_err(|e| Problem::Descriptor(format!("sending it to the consumer: {e}")))?;
        self.relayed.insert((p, c));
        Ok(bytes)
    }

    /// Sends the handshakes that waited for a worker that is free now.
    fn start_waiting_handshakes(&mut self) {
        for _ in 0..self.handshakes_waiting.len() {
            let Some(j) = self.handshakes_waiting.pop_front() else {
                break;
            };
            if !self.jobs[j].finished {
                // Sends it, or puts it back at the end of the queue.
                self.send_next(j);
            }
        }
    }

    /// Records the answer to step `step` of job `j` and moves the job on.
    fn record(
        &mut self,
        j: usize,
        step: usize,
        role: Role,
        result: Result<(), Problem>,
        claim: Option<bool>,
    ) {
        if self.jobs[j].finished {
            return; // interrupted meanwhile: the answer no longer matters
        }
        let kind = steps(self.ctx.opts.level)[step].1;
        // A worker names devices as its CUDA sees them (ordinal 0 when it sees only its own
        // GPU): report the device as this process numbers it.
        let pair = self.jobs[j].pair;
        let result = result.map_err(|p| {
            renumbered(
                p,
                match role {
                    Role::Producer => pair.src as i32,
                    Role::Consumer => pair.tgt as i32,
                },
            )
        });
        let job = &mut self.jobs[j];
        match kind {
            StepKind::Write => {
                job.c.claim = claim;
                // Without a mapping nothing else can run: the producer's side is the peer's
                // failure, as in vLLM when the open fails (or, for the cuMem transport, the
                // descriptor could not come, be imported or mapped).
                let unmapped = matches!(&result, Err(Problem::Driver(_)))
                    || matches!(&result, Err(p) if matches!(
                        p.class(),
                        Class::OpenFailed
                            | Class::FdNotPassable
                            | Class::ImportRefused
                            | Class::MapRefused
                    ));
                if let (true, Err(why)) = (unmapped, &result) {
                    job.p.copy = Err(Problem::Peer(Box::new(why.clone())));
                    job.c.copy = result;
                    self.finish(j);
                    return;
                }
                job.c.copy = result;
            }
            StepKind::VerifyCopy => job.p.copy = result,
            StepKind::KernelStore | StepKind::KernelLoad => job.kernel_c.push(result),
            StepKind::VerifyStores => job.p.kernel = tier_outcome(result),
            StepKind::Handshake => match role {
                Role::Producer => job.p.handshake = tier_outcome(result),
                Role::Consumer => job.c.handshake = tier_outcome(result),
            },
        }
        job.pending = job.pending.saturating_sub(1);
        if job.pending == 0 {
            self.send_next(j);
        }
    }

    fn finish(&mut self, j: usize) {
        let job = &mut self.jobs[j];
        if job.finished {
            return;
        }
        if !job.kernel_c.is_empty() {
            job.c.kernel = match job.kernel_c.drain(..).find(Result::is_err) {
                Some(Err(p)) => TierOutcome::Failed(p),
                _ => TierOutcome::Ok,
            };
        }
        job.finished = true;
        if job.started {
            self.in_flight -= 1;
        }
        job.outcome = Some(Outcome::Done {
            producer: job.p.clone(),
            consumer: job.c.clone(),
        });
        if self.jobs.iter().any(|j| j.held && !j.started) {
            self.start_ready_jobs();
        }
    }

    /// When worker `w`'s head step is a handshake that its partner has not reached yet (the
    /// partner is still busy with earlier steps, perhaps stuck in one of them), `w` cannot be
    /// blamed before the partner's own deadline has decided: it waits until that deadline plus
    /// a step timeout. Otherwise which of the two deadlines the poll loop meets first (a
    /// matter of scheduling) would decide whether the handshake's pair is a hang or is rerun
    /// after the partner's. Bounded: the partner's steps ahead of the handshake are few, each
    /// has its deadline, and so has the whole check.
    fn held_up_by_partner(&self, w: usize) -> Option<Instant> {
        let &(j, step, _) = self.members[w].queue.front()?;
        if steps(self.ctx.opts.level)[step].1 != StepKind::Handshake {
            return None;
        }
        let job = &self.jobs[j];
        let partner = if job.producer == w {
            job.consumer
        } else {
            job.producer
        };
        let reached = self.members[partner]
            .queue
            .front()
            .is_some_and(|&(k, s, _)| k == j && s == step);
        if reached || partner == w {
            return None;
        }
        let theirs = self.workers[partner].as_ref()?.deadline?;
        Some(theirs + self.ctx.opts.step_timeout)
    }

    /// The step worker `w` was doing (its name) and its pair, for a hang's cause; `None`
    /// when idle.
    fn head_step(&self, w: usize) -> Option<(String, Pair)> {
        let &(j, step, _) = self.members[w].queue.front()?;
        let kind = steps(self.ctx.opts.level)[step].1;
        Some((format!("{kind:?}"), self.jobs[j].pair))
    }

    /// Worker `w` broke the protocol (`fault`): it is lost, with what it wrote to stderr.
    fn lose_to(&mut self, w: usize, fault: Fault) {
        let fault = self.worker(w).fault(fault);
        self.lose(w, Outcome::Error(Lost::Worker(fault)));
    }

    /// Worker `w` hung, died or broke the protocol: it is killed; the pair at its head gets
    /// `outcome`; every other unfinished pair it takes part in is interrupted (`None`: the
    /// next round reruns it on fresh workers). When it died (an error, not a hang: a hung
    /// worker's memory stays valid until it is killed, and then nothing of it is read), so
    /// are the pairs it takes part in that finished with a failure: such a failure may be the
    /// death's doing (a consumer's open of a dead producer's memory fails), and whether the
    /// parent read it before or after the death is the host's scheduling. So it is no
    /// attempt, whichever came first.
    fn lose(&mut self, w: usize, outcome: Outcome) {
        let died = matches!(outcome, Outcome::Error(_));
        let head = self.members[w].queue.front().map(|&(j, _, _)| j);
        self.members[w].state = State::Gone;
        self.members[w].queue.clear();
        self.members[w].in_handshake = false;
        if let Some(mut worker) = self.workers[w].take() {
            worker.kill();
            self.members[w].info.peak_rss_kb =
                self.members[w].info.peak_rss_kb.max(worker.peak_rss_kb);
            self.lost.push(worker);
        }
        for j in 0..self.jobs.len() {
            let job = &mut self.jobs[j];
            if job.producer != w && job.consumer != w {
                continue;
            }
            if job.finished {
                let failed = |o: &Outcome| matches!(o, Outcome::Done { .. }) && !o.passed();
                if died && job.outcome.as_ref().is_some_and(failed) {
                    job.outcome = None;
                }
                continue;
            }
            job.finished = true;
            if job.started {
                self.in_flight -= 1;
            }
            job.outcome = (head == Some(j)).then(|| outcome.clone());
        }
        if self.jobs.iter().any(|j| j.held && !j.started) {
            self.start_ready_jobs();
        }
    }
}

/// `p` with the device of its failed call, if it names one, as `device` (this process's
/// numbering of the worker's GPU).
fn renumbered(p: Problem, device: i32) -> Problem {
    match p {
        Problem::Cuda {
            call,
            device: Some(_),
            code,
            name,
            text,
        } => Problem::Cuda {
            call,
            device: Some(device),
            code,
            name,
            text,
        },
        p => p,
    }
}

fn tier_outcome(result: Result<(), Problem>) -> TierOutcome {
    match result {
        Ok(()) => TierOutcome::Ok,
        Err(p) => TierOutcome::Failed(p),
    }
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Start { .. } => "Start",
        Message::Handle { .. } => "Handle",
        Message::Opened { .. } => "Opened",
        Message::Barrier { .. } => "Barrier",
        Message::Verdict { .. } => "Verdict",
        Message::Setup { .. } => "Setup",
        Message::Ready { .. } => "Ready",
        Message::Step { .. } => "Step",
        Message::Done { .. } => "Done",
        Message::Measured { .. } => "Measured",
    }
}

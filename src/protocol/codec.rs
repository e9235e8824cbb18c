//! The byte layout of each message: little-endian integers, length-prefixed UTF-8 texts, and
//! tags. Decoding is strict and bounded (see the module above).

use super::{
    Job, Message, Op, ProtocolError, Stage, IPC_HANDLE_BYTES, MAGIC, MAX_DEVICES, MAX_FRAME,
    MAX_TEXT, VERSION,
};
use crate::model::{
    Bandwidth, Check, Figure, Level, Pair, Problem, Role, SideVerdict, TierOutcome, TierParams,
    Transport,
};

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn text(&mut self, s: &str) {
        let mut end = s.len().min(MAX_TEXT);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn opt_bool(&mut self, b: Option<bool>) {
        self.u8(match b {
            None => 2,
            Some(b) => u8::from(b),
        });
    }
    fn opt_u8(&mut self, v: Option<u8>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.u8(v);
            }
        }
    }
    fn handle(&mut self, h: &[u8; IPC_HANDLE_BYTES]) {
        self.0.extend_from_slice(h);
    }
    fn pair(&mut self, p: Pair) {
        self.u32(p.src);
        self.u32(p.tgt);
    }
    fn job(&mut self, j: &Job) {
        self.u32(j.index);
        self.pair(j.pair);
        self.u8(j.role as u8);
        self.u8(j.tier as u8);
        self.u8(j.transport as u8);
    }
    fn problem(&mut self, p: &Problem) {
        match p {
            Problem::Cuda {
                call,
                device,
                code,
                name,
                text,
            } => {
                self.u8(0);
                self.text(call);
                match device {
                    None => self.u8(0),
                    Some(d) => {
                        self.u8(1);
                        self.i32(*d);
                    }
                }
                self.i32(*code);
                self.text(name);
                self.text(text);
            }
            Problem::Driver(why) => {
                self.u8(1);
                self.text(why);
            }
            Problem::Mismatch {
                check,
                wrong,
                total,
                first_bad,
                seen,
                expected,
                width,
                stale,
            } => {
                self.u8(2);
                self.u8(*check as u8);
                self.u64(*wrong);
                self.u64(*total);
                self.u64(*first_bad);
                self.opt_u8(*seen);
                self.u8(*expected);
                self.u8(*width);
                self.u64(*stale);
            }
            Problem::Handshake {
                rounds,
                done,
                payload_errors,
                timed_out,
                elapsed_ns,
            } => {
                self.u8(4);
                self.u32(*rounds);
                self.u64(*done);
                self.u64(*payload_errors);
                self.u8(u8::from(*timed_out));
                self.u64(*elapsed_ns);
            }
            Problem::Descriptor(why) => {
                self.u8(5);
                self.text(why);
            }
            Problem::Peer(inner) => {
                self.u8(3);
                // One level deep is all a peer report needs; deeper nesting is flattened.
                match inner.as_ref() {
                    Problem::Peer(deeper) => self.problem(&Problem::Driver(deeper.to_string())),
                    p => self.problem(p),
                }
            }
        }
    }
    fn result_unit(&mut self, r: &Result<(), Problem>) {
        match r {
            Ok(()) => self.u8(1),
            Err(p) => {
                self.u8(0);
                self.problem(p);
            }
        }
    }
    fn tiers(&mut self, t: &TierParams) {
        self.u32(t.kernel_bytes);
        self.u64(t.seed);
        self.u32(t.shift);
        self.u32(t.rounds);
        self.u32(t.budget_ms);
        self.u32(t.bandwidth_bytes);
    }
    fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    fn tier(&mut self, t: &TierOutcome) {
        match t {
            TierOutcome::NotRun => self.u8(0),
            TierOutcome::Ok => self.u8(1),
            TierOutcome::Failed(p) => {
                self.u8(2);
                self.problem(p);
            }
        }
    }
}

pub(super) const TAG_HELLO: u8 = 1;
pub(super) const TAG_START: u8 = 2;
pub(super) const TAG_HANDLE: u8 = 3;
pub(super) const TAG_OPENED: u8 = 4;
pub(super) const TAG_BARRIER: u8 = 5;
pub(super) const TAG_VERDICT: u8 = 6;
pub(super) const TAG_SETUP: u8 = 7;
pub(super) const TAG_READY: u8 = 8;
pub(super) const TAG_STEP: u8 = 9;
pub(super) const TAG_DONE: u8 = 10;
pub(super) const TAG_MEASURED: u8 = 11;

/// Encodes `msg` as one complete frame (length prefix included).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut e = Enc(vec![0; 4]);
    match msg {
        Message::Hello {
            version,
            pid,
            device_count,
        } => {
            e.u8(TAG_HELLO);
            e.0.extend_from_slice(&MAGIC);
            e.u16(*version);
            e.u32(*pid);
            match device_count {
                Ok(n) => {
                    e.u8(1);
                    e.u32(*n);
                }
                Err(why) => {
                    e.u8(0);
                    e.problem(why);
                }
            }
        }
        Message::Start {
            role,
            level,
            tiers,
            pairs,
        } => {
            e.u8(TAG_START);
            e.u8(*role as u8);
            e.u8(*level as u8);
            e.tiers(tiers);
            e.u32(pairs.len() as u32);
            for p in pairs {
                e.pair(*p);
            }
        }
        Message::Handle { job, handle } => {
            e.u8(TAG_HANDLE);
            e.job(job);
            match handle {
                Ok(h) => {
                    e.u8(1);
                    e.handle(h);
                }
                Err(why) => {
                    e.u8(0);
                    e.problem(why);
                }
            }
        }
        Message::Opened { job, result } => {
            e.u8(TAG_OPENED);
            e.job(job);
            e.result_unit(result);
        }
        Message::Barrier { job, stage } => {
            e.u8(TAG_BARRIER);
            e.job(job);
            e.u8(*stage as u8);
        }
        Message::Verdict {
            job,
            verdict,
            peak_rss_kb,
        } => {
            e.u8(TAG_VERDICT);
            e.job(job);
            e.result_unit(&verdict.copy);
            e.opt_bool(verdict.claim);
            e.tier(&verdict.kernel);
            e.tier(&verdict.handshake);
            e.u32(*peak_rss_kb);
        }
        Message::Setup {
            device,
            slots,
            tiers,
            cumem,
        } => {
            e.u8(TAG_SETUP);
            e.u32(*device);
            e.u32(*slots);
            e.tiers(tiers);
            e.u8(u8::from(*cumem));
        }
        Message::Ready { result, cumem } => {
            e.u8(TAG_READY);
            match result {
                Ok(None) => e.u8(1),
                Ok(Some(h)) => {
                    e.u8(2);
                    e.handle(h);
                }
                Err(why) => {
                    e.u8(0);
                    e.problem(why);
                }
            }
            match cumem {
                None => e.u8(0),
                Some(Ok(bytes)) => {
                    e.u8(1);
                    e.u64(*bytes);
                }
                Some(Err(why)) => {
                    e.u8(2);
                    e.problem(why);
                }
            }
        }
        Message::Step { job, slot, op } => {
            e.u8(TAG_STEP);
            e.job(job);
            e.u32(*slot);
            match op {
                Op::Write { handle, value } => {
                    e.u8(1);
                    e.handle(handle);
                    e.u8(*value);
                }
                Op::Verify { expect } => {
                    e.u8(2);
                    e.u8(*expect);
                }
                Op::WriteCumem { bytes, value } => {
                    e.u8(7);
                    e.u64(*bytes);
                    e.u8(*value);
                }
                Op::KernelStore => e.u8(3),
                Op::VerifyStores => e.u8(4),
                Op::KernelLoad => e.u8(5),
                Op::Handshake => e.u8(6),
                Op::Bandwidth => e.u8(8),
            }
        }
        Message::Done {
            job,
            result,
            claim,
            peak_rss_kb,
        } => {
            e.u8(TAG_DONE);
            e.job(job);
            e.result_unit(result);
            e.opt_bool(*claim);
            e.u32(*peak_rss_kb);
        }
        Message::Measured {
            job,
            result,
            peak_rss_kb,
        } => {
            e.u8(TAG_MEASURED);
            e.job(job);
            match result {
                Ok(b) => {
                    e.u8(1);
                    for f in &b.figures {
                        e.f64(f.gbps);
                        e.f64(f.cv);
                    }
                    e.f64(b.latency_ns);
                }
                Err(p) => {
                    e.u8(0);
                    e.problem(p);
                }
            }
            e.u32(*peak_rss_kb);
        }
    }
    let len = (e.0.len() - 4) as u32;
    e.0[..4].copy_from_slice(&len.to_le_bytes());
    e.0
}

// ---------------------------------------------------------------------------------------------
// Decoding

struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

pub(super) fn malformed<T>(why: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError::Malformed(why.into()))
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() - self.pos < n {
            return malformed(format!("payload ends inside {what}"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &str) -> Result<i32, ProtocolError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    fn flag(&mut self, what: &str) -> Result<bool, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => malformed(format!("{what}: {v} is not a boolean")),
        }
    }
    fn opt_bool(&mut self, what: &str) -> Result<Option<bool>, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(Some(false)),
            1 => Ok(Some(true)),
            2 => Ok(None),
            v => malformed(format!("{what}: {v} is not an optional boolean")),
        }
    }
    fn opt_u8(&mut self, what: &str) -> Result<Option<u8>, ProtocolError> {
        Ok(if self.flag(what)? {
            Some(self.u8(what)?)
        } else {
            None
        })
    }
    fn text(&mut self, what: &str) -> Result<String, ProtocolError> {
        let n = self.u16(what)? as usize;
        if n > MAX_TEXT {
            return malformed(format!(
                "{what}: {n} bytes is over the {MAX_TEXT}-byte limit"
            ));
        }
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).or_else(|_| malformed(format!("{what}: not UTF-8")))
    }
    fn role(&mut self) -> Result<Role, ProtocolError> {
        match self.u8("role")? {
            0 => Ok(Role::Producer),
            1 => Ok(Role::Consumer),
            v => malformed(format!("role {v} is neither producer nor consumer")),
        }
    }
    fn level(&mut self) -> Result<Level, ProtocolError> {
        let v = self.u8("level")?;
        Level::ALL
            .into_iter()
            .find(|l| *l as u8 == v)
            .map_or_else(|| malformed(format!("unknown level {v}")), Ok)
    }
    fn device(&mut self, what: &str) -> Result<u32, ProtocolError> {
        let d = self.u32(what)?;
        if d >= MAX_DEVICES {
            return malformed(format!("{what} {d} is not below {MAX_DEVICES}"));
        }
        Ok(d)
    }
    fn pair(&mut self) -> Result<Pair, ProtocolError> {
        Ok(Pair {
            src: self.device("src")?,
            tgt: self.device("tgt")?,
        })
    }
    fn job(&mut self) -> Result<Job, ProtocolError> {
        Ok(Job {
            index: self.u32("job index")?,
            pair: self.pair()?,
            role: self.role()?,
            tier: self.level()?,
            transport: match self.u8("transport")? {
                0 => Transport::Ipc,
                1 => Transport::Cumem,
                v => return malformed(format!("unknown transport {v}")),
            },
        })
    }
    fn check(&mut self) -> Result<Check, ProtocolError> {
        match self.u8("check")? {
            0 => Ok(Check::CopyReadBack),
            1 => Ok(Check::KernelStores),
            2 => Ok(Check::KernelLoads),
            3 => Ok(Check::BandwidthCopies),
            v => malformed(format!("unknown check {v}")),
        }
    }
    fn problem(&mut self, depth: u8) -> Result<Problem, ProtocolError> {
        Ok(match self.u8("problem kind")? {
            0 => Problem::Cuda {
                call: self.text("call")?,
                device: if self.flag("has device")? {
                    Some(self.i32("device")?)
                } else {
                    None
                },
                code: self.i32("code")?,
                name: self.text("error name")?,
                text: self.text("error text")?,
            },
            1 => Problem::Driver(self.text("driver problem")?),
            2 => Problem::Mismatch {
                check: self.check()?,
                wrong: self.u64("wrong bytes")?,
                total: self.u64("total bytes")?,
                first_bad: self.u64("first bad offset")?,
                seen: self.opt_u8("seen")?,
                expected: self.u8("expected")?,
                width: self.u8("width")?,
                stale: self.u64("stale bytes")?,
            },
            4 => Problem::Handshake {
                rounds: self.u32("rounds")?,
                done: self.u64("rounds done")?,
                payload_errors: self.u64("payload errors")?,
                timed_out: self.flag("timed out")?,
                elapsed_ns: self.u64("elapsed")?,
            },
            3 if depth == 0 => Problem::Peer(Box::new(self.problem(1)?)),
            5 => Problem::Descriptor(self.text("descriptor problem")?),
            v => return malformed(format!("unknown problem kind {v} at depth {depth}")),
        })
    }
    fn result_unit(&mut self, what: &str) -> Result<Result<(), Problem>, ProtocolError> {
        Ok(if self.flag(what)? {
            Ok(())
        } else {
            Err(self.problem(0)?)
        })
    }
    fn tiers(&mut self) -> Result<TierParams, ProtocolError> {
        Ok(TierParams {
            kernel_bytes: self.u32("kernel bytes")?,
            seed: self.u64("seed")?,
            shift: self.u32("shift")?,
            rounds: self.u32("rounds")?,
            budget_ms: self.u32("budget")?,
            bandwidth_bytes: self.u32("bandwidth bytes")?,
        })
    }
    fn f64(&mut self, what: &str) -> Result<f64, ProtocolError> {
        Ok(f64::from_bits(self.u64(what)?))
    }
    fn tier(&mut self) -> Result<TierOutcome, ProtocolError> {
        Ok(match self.u8("tier outcome")? {
            0 => TierOutcome::NotRun,
            1 => TierOutcome::Ok,
            2 => TierOutcome::Failed(self.problem(0)?),
            v => return malformed(format!("unknown tier outcome {v}")),
        })
    }
}

/// Decodes one frame body (tag and payload, without the length prefix).
pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
    let mut d = Dec { buf: body, pos: 0 };
    let msg = match d.u8("tag")? {
        TAG_HELLO => {
            if d.take(4, "magic")? != MAGIC {
                return malformed("Hello without the P2PC magic: not a p2pcheck worker");
            }
            let version = d.u16("version")?;
            if version != VERSION {
                // Later fields may be laid out differently: stop here, the caller reports it.
                return Ok(Message::Hello {
                    version,
                    pid: 0,
                    device_count: Err(Problem::Driver(format!("protocol version {version}"))),
                });
            }
            let pid = d.u32("pid")?;
            // A count beyond any machine is refused here, before anything is sized by it.
            let device_count = if d.flag("hello status")? {
                let n = d.u32("device count")?;
                if n > MAX_DEVICES {
                    return malformed(format!("a device count of {n} is over {MAX_DEVICES}"));
                }
                Ok(n)
            } else {
                Err(d.problem(0)?)
            };
            Message::Hello {
                version,
                pid,
                device_count,
            }
        }
        TAG_START => {
            let role = d.role()?;
            let level = d.level()?;
            let tiers = d.tiers()?;
            let n = d.u32("pair count")? as usize;
            // Tag, role, level, the tier parameters (28 bytes) and the count come first.
            if n > (MAX_FRAME - 35) / 8 {
                return malformed(format!("{n} pairs cannot fit in a frame"));
            }
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                pairs.push(d.pair()?);
            }
            Message::Start {
                role,
                level,
                tiers,
                pairs,
            }
        }
        TAG_HANDLE => {
            let job = d.job()?;
            let handle = if d.flag("handle status")? {
                Ok(d.array("IPC handle")?)
            } else {
                Err(d.problem(0)?)
            };
            Message::Handle { job, handle }
        }
        TAG_OPENED => Message::Opened {
            job: d.job()?,
            result: d.result_unit("open result")?,
        },
        TAG_BARRIER => {
            let job = d.job()?;
            let stage = match d.u8("stage")? {
                0 => Stage::Copy,
                1 => Stage::KernelStored,
                2 => Stage::ProducerRewrote,
                3 => Stage::Handshake,
                v => return malformed(format!("unknown barrier stage {v}")),
            };
            Message::Barrier { job, stage }
        }
        TAG_VERDICT => Message::Verdict {
            job: d.job()?,
            verdict: SideVerdict {
                copy: d.result_unit("copy result")?,
                claim: d.opt_bool("claim")?,
                kernel: d.tier()?,
                handshake: d.tier()?,
            },
            peak_rss_kb: d.u32("peak RSS")?,
        },
        TAG_SETUP => Message::Setup {
            device: d.device("device")?,
            slots: d.device("slots")?,
            tiers: d.tiers()?,
            cumem: d.flag("cumem")?,
        },
        TAG_READY => Message::Ready {
            result: match d.u8("ready status")? {
                0 => Err(d.problem(0)?),
                1 => Ok(None),
                2 => Ok(Some(d.array("IPC handle")?)),
                v => return malformed(format!("unknown ready status {v}")),
            },
            cumem: match d.u8("cumem status")? {
                0 => None,
                1 => Some(Ok(d.u64("cumem bytes")?)),
                2 => Some(Err(d.problem(0)?)),
                v => return malformed(format!("unknown cumem status {v}")),
            },
        },
        TAG_STEP => {
            let job = d.job()?;
            let slot = d.device("slot")?;
            let op = match d.u8("op")? {
                1 => Op::Write {
                    handle: d.array("IPC handle")?,
                    value: d.u8("value")?,
                },
                2 => Op::Verify {
                    expect: d.u8("expect")?,
                },
                3 => Op::KernelStore,
                4 => Op::VerifyStores,
                5 => Op::KernelLoad,
                6 => Op::Handshake,
                7 => Op::WriteCumem {
                    bytes: d.u64("cumem bytes")?,
                    value: d.u8("value")?,
                },
                8 => Op::Bandwidth,
                v => return malformed(format!("unknown op {v}")),
            };
            Message::Step { job, slot, op }
        }
        TAG_DONE => Message::Done {
            job: d.job()?,
            result: d.result_unit("step status")?,
            claim: d.opt_bool("claim")?,
            peak_rss_kb: d.u32("peak RSS")?,
        },
        TAG_MEASURED => {
            let job = d.job()?;
            let result = if d.flag("measure status")? {
                let mut figures = [Figure { gbps: 0.0, cv: 0.0 }; 6];
                for f in &mut figures {
                    f.gbps = d.f64("figure")?;
                    f.cv = d.f64("spread")?;
                }
                Ok(Bandwidth {
                    figures,
                    latency_ns: d.f64("latency")?,
                })
            } else {
                Err(d.problem(0)?)
            };
            Message::Measured {
                job,
                result,
                peak_rss_kb: d.u32("peak RSS")?,
            }
        }
        tag => return malformed(format!("unknown tag {tag}")),
    };
    if d.pos != body.len() {
        return malformed(format!("{} trailing bytes", body.len() - d.pos));
    }
    Ok(msg)
}

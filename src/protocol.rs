//! The framed binary protocol between the parent and its worker processes, over pipes.
//!
//! A frame is `u32` little-endian length, then that many bytes: a one-byte tag and the payload.
//! Decoding is strict (unknown tags, short or overlong payloads, bad UTF-8 and trailing bytes are
//! errors) and bounded ([`MAX_FRAME`]), so a confused or hostile worker yields a
//! [`ProtocolError`], never a panic or an unbounded allocation. The first frame a worker sends is
//! [`Message::Hello`] carrying [`VERSION`]; the parent refuses any other version.
//!
//! The IPC handle travels as its raw 64 bytes.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use crate::driver::IPC_HANDLE_BYTES;
use crate::os;

/// Protocol version; bumped on any change to the encoding.
pub const VERSION: u16 = 1;
/// Magic bytes at the start of a Hello payload.
pub const MAGIC: [u8; 4] = *b"P2PC";
/// Largest frame accepted, tag included: far above any real message (a Start of 8 x 8 pairs is
/// about 520 bytes), small enough that garbage on the pipe cannot make us allocate much.
pub const MAX_FRAME: usize = 64 * 1024;
/// Longest string carried (error texts), in bytes; longer ones are cut at a char boundary.
pub const MAX_TEXT: usize = 4096;

/// The part a worker plays for every pair of its batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Owns the memory: allocates on `src`, exports the IPC handle, checks it afterwards.
    Producer,
    /// Maps the producer's memory on `tgt` and writes it.
    Consumer,
}

/// One ordered pair: memory on `src`, accessed from `tgt` (local device ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    /// Device that owns the memory.
    pub src: u32,
    /// Device that maps and accesses it.
    pub tgt: u32,
}

/// Rendezvous points of one pair, in the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// vLLM's barrier: the consumer has written 2s and synchronised.
    Copy = 0,
    /// Kernel check: the producer has read the 2s back, so the consumer may overwrite them.
    CopyChecked = 1,
    /// Kernel check: the consumer's SM stores are done.
    KernelStored = 2,
    /// Kernel check: the producer has checked them and written its own value for the consumer.
    ProducerRewrote = 3,
}

/// Outcome of the kernel check as one side saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelOutcome {
    /// Not run (disabled, or the mapping never opened).
    NotRun,
    /// Every byte matched.
    Ok,
    /// Wrong data or a failed call; the text says which.
    Failed(String),
}

/// One side's verdict for one pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideVerdict {
    /// vLLM's boolean: this side read back all 2s after the consumer's memset.
    pub copy_ok: bool,
    /// Why `copy_ok` is false (empty when true).
    pub detail: String,
    /// Consumer only: `cudaDeviceCanAccessPeer(tgt, src)`, when it could be asked.
    pub claim: Option<bool>,
    /// The kernel check, as this side saw it.
    pub kernel: KernelOutcome,
}

/// Every message, both directions. Which side may send which is the check's business.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Worker -> parent, first frame: CUDA started (`device_count`) or not (`error`).
    Hello {
        /// The worker's protocol version.
        version: u16,
        /// The worker's pid.
        pid: u32,
        /// Devices the worker sees, or why CUDA could not start.
        device_count: Result<u32, String>,
    },
    /// Parent -> worker: the batch.
    Start {
        /// Producer or consumer.
        role: Role,
        /// Run the SM-kernel stage after vLLM's copy stage.
        kernel_check: bool,
        /// The pairs, in order.
        pairs: Vec<Pair>,
    },
    /// Producer -> parent -> consumer: the handle of pair `index`, or why there is none.
    Handle {
        /// Position in the batch.
        index: u32,
        /// The raw handle, or the producer's error.
        handle: Result<[u8; IPC_HANDLE_BYTES], String>,
    },
    /// Consumer -> parent -> producer: whether `cudaIpcOpenMemHandle` worked.
    Opened {
        /// Position in the batch.
        index: u32,
        /// Ok, or the open's error.
        result: Result<(), String>,
    },
    /// Either way: a barrier token.
    Barrier {
        /// Position in the batch.
        index: u32,
        /// Which rendezvous.
        stage: Stage,
    },
    /// Worker -> parent: this side's verdict for pair `index`.
    Verdict {
        /// Position in the batch.
        index: u32,
        /// The verdict.
        verdict: SideVerdict,
    },
}

/// A frame that could not be read or decoded.
#[derive(Debug)]
pub enum ProtocolError {
    /// The peer closed its end (a worker that exited or died).
    Eof,
    /// The deadline passed with no complete frame.
    Timeout,
    /// A read or write failed.
    Io(io::Error),
    /// The bytes are not a valid frame.
    Malformed(String),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Eof => write!(f, "pipe closed"),
            ProtocolError::Timeout => write!(f, "no message before the deadline"),
            ProtocolError::Io(e) => write!(f, "pipe I/O failed: {e}"),
            ProtocolError::Malformed(why) => write!(f, "malformed frame: {why}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        ProtocolError::Io(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

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
    fn text(&mut self, s: &str) {
        let mut end = s.len().min(MAX_TEXT);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn flag(&mut self, b: bool) {
        self.u8(u8::from(b));
    }
    fn opt_bool(&mut self, b: Option<bool>) {
        self.u8(match b {
            None => 2,
            Some(b) => u8::from(b),
        });
    }
    fn result_text(&mut self, r: &Result<(), String>) {
        match r {
            Ok(()) => self.u8(1),
            Err(e) => {
                self.u8(0);
                self.text(e);
            }
        }
    }
}

const TAG_HELLO: u8 = 1;
const TAG_START: u8 = 2;
const TAG_HANDLE: u8 = 3;
const TAG_OPENED: u8 = 4;
const TAG_BARRIER: u8 = 5;
const TAG_VERDICT: u8 = 6;

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
                    e.text(why);
                }
            }
        }
        Message::Start {
            role,
            kernel_check,
            pairs,
        } => {
            e.u8(TAG_START);
            e.u8(match role {
                Role::Producer => 0,
                Role::Consumer => 1,
            });
            e.flag(*kernel_check);
            e.u32(pairs.len() as u32);
            for p in pairs {
                e.u32(p.src);
                e.u32(p.tgt);
            }
        }
        Message::Handle { index, handle } => {
            e.u8(TAG_HANDLE);
            e.u32(*index);
            match handle {
                Ok(h) => {
                    e.u8(1);
                    e.0.extend_from_slice(h);
                }
                Err(why) => {
                    e.u8(0);
                    e.text(why);
                }
            }
        }
        Message::Opened { index, result } => {
            e.u8(TAG_OPENED);
            e.u32(*index);
            e.result_text(result);
        }
        Message::Barrier { index, stage } => {
            e.u8(TAG_BARRIER);
            e.u32(*index);
            e.u8(*stage as u8);
        }
        Message::Verdict { index, verdict } => {
            e.u8(TAG_VERDICT);
            e.u32(*index);
            e.flag(verdict.copy_ok);
            e.text(&verdict.detail);
            e.opt_bool(verdict.claim);
            match &verdict.kernel {
                KernelOutcome::NotRun => e.u8(0),
                KernelOutcome::Ok => e.u8(1),
                KernelOutcome::Failed(why) => {
                    e.u8(2);
                    e.text(why);
                }
            }
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

fn malformed<T>(why: impl Into<String>) -> Result<T, ProtocolError> {
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
    fn u8(&mut self, what: &str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
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
    fn result_text(&mut self, what: &str) -> Result<Result<(), String>, ProtocolError> {
        Ok(if self.flag(what)? {
            Ok(())
        } else {
            Err(self.text(what)?)
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
                    device_count: Err(format!("protocol version {version}")),
                });
            }
            let pid = d.u32("pid")?;
            let device_count = if d.flag("hello status")? {
                Ok(d.u32("device count")?)
            } else {
                Err(d.text("hello error")?)
            };
            Message::Hello {
                version,
                pid,
                device_count,
            }
        }
        TAG_START => {
            let role = match d.u8("role")? {
                0 => Role::Producer,
                1 => Role::Consumer,
                v => return malformed(format!("role {v} is neither producer nor consumer")),
            };
            let kernel_check = d.flag("kernel_check")?;
            let n = d.u32("pair count")? as usize;
            if n > (MAX_FRAME - 10) / 8 {
                return malformed(format!("{n} pairs cannot fit in a frame"));
            }
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                pairs.push(Pair {
                    src: d.u32("src")?,
                    tgt: d.u32("tgt")?,
                });
            }
            Message::Start {
                role,
                kernel_check,
                pairs,
            }
        }
        TAG_HANDLE => {
            let index = d.u32("index")?;
            let handle = if d.flag("handle status")? {
                Ok(d.take(IPC_HANDLE_BYTES, "IPC handle")?
                    .try_into()
                    .expect("64 bytes"))
            } else {
                Err(d.text("handle error")?)
            };
            Message::Handle { index, handle }
        }
        TAG_OPENED => Message::Opened {
            index: d.u32("index")?,
            result: d.result_text("open result")?,
        },
        TAG_BARRIER => {
            let index = d.u32("index")?;
            let stage = match d.u8("stage")? {
                0 => Stage::Copy,
                1 => Stage::CopyChecked,
                2 => Stage::KernelStored,
                3 => Stage::ProducerRewrote,
                v => return malformed(format!("unknown barrier stage {v}")),
            };
            Message::Barrier { index, stage }
        }
        TAG_VERDICT => {
            let index = d.u32("index")?;
            let copy_ok = d.flag("copy_ok")?;
            let detail = d.text("detail")?;
            let claim = d.opt_bool("claim")?;
            let kernel = match d.u8("kernel outcome")? {
                0 => KernelOutcome::NotRun,
                1 => KernelOutcome::Ok,
                2 => KernelOutcome::Failed(d.text("kernel detail")?),
                v => return malformed(format!("unknown kernel outcome {v}")),
            };
            Message::Verdict {
                index,
                verdict: SideVerdict {
                    copy_ok,
                    detail,
                    claim,
                    kernel,
                },
            }
        }
        tag => return malformed(format!("unknown tag {tag}")),
    };
    if d.pos != body.len() {
        return malformed(format!("{} trailing bytes", body.len() - d.pos));
    }
    Ok(msg)
}

/// Writes one message (blocking; frames are small enough to fit a pipe buffer).
pub fn send(w: &mut impl Write, msg: &Message) -> Result<(), ProtocolError> {
    w.write_all(&encode(msg))?;
    w.flush()?;
    Ok(())
}

/// Blocking read of one frame (the worker's side: its parent governs every deadline).
pub fn recv_blocking(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut len = [0u8; 4];
    read_exact_or_eof(r, &mut len)?;
    let len = frame_len(len)?;
    let mut body = vec![0u8; len];
    read_exact_or_eof(r, &mut body)?;
    decode(&body)
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Eof,
        _ => ProtocolError::Io(e),
    })
}

fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 || len > MAX_FRAME {
        return malformed(format!("frame length {len} outside 1..={MAX_FRAME}"));
    }
    Ok(len)
}

/// Reads frames from a pipe with deadlines (the parent's side), without blocking past them.
pub struct FrameReader {
    fd: RawFd,
    buf: Vec<u8>,
}

impl FrameReader {
    /// Wraps a readable pipe end; the caller keeps the owner alive as long as the reader.
    pub fn new(pipe: &impl AsRawFd) -> FrameReader {
        FrameReader {
            fd: pipe.as_raw_fd(),
            buf: Vec::new(),
        }
    }

    /// The pipe's descriptor, for polling several readers at once.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// A complete frame already buffered, if any.
    pub fn buffered(&mut self) -> Result<Option<Message>, ProtocolError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = frame_len(self.buf[..4].try_into().expect("4 bytes"))?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// Reads what the pipe has now (call after `poll` said it is readable).
    pub fn fill(&mut self) -> Result<(), ProtocolError> {
        let mut chunk = [0u8; 4096];
        match os::read(self.fd, &mut chunk) {
            Ok(0) => Err(ProtocolError::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => Ok(()),
                _ => Err(ProtocolError::Io(e)),
            },
        }
    }

    /// One message, waiting at most until `deadline`.
    pub fn recv(&mut self, deadline: Instant) -> Result<Message, ProtocolError> {
        loop {
            if let Some(m) = self.buffered()? {
                return Ok(m);
            }
            match os::poll_readable(&[self.fd], deadline)? {
                Some(_) => self.fill()?,
                None => return Err(ProtocolError::Timeout),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn samples() -> Vec<Message> {
        let mut h = [0u8; IPC_HANDLE_BYTES];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        vec![
            Message::Hello {
                version: VERSION,
                pid: 4242,
                device_count: Ok(8),
            },
            Message::Hello {
                version: VERSION,
                pid: 1,
                device_count: Err("cuInit failed: CUDA_ERROR_NO_DEVICE".into()),
            },
            Message::Start {
                role: Role::Consumer,
                kernel_check: true,
                pairs: vec![Pair { src: 0, tgt: 1 }, Pair { src: 7, tgt: 3 }],
            },
            Message::Start {
                role: Role::Producer,
                kernel_check: false,
                pairs: vec![],
            },
            Message::Handle {
                index: 3,
                handle: Ok(h),
            },
            Message::Handle {
                index: 0,
                handle: Err("cudaMalloc failed".into()),
            },
            Message::Opened {
                index: 9,
                result: Ok(()),
            },
            Message::Opened {
                index: 9,
                result: Err("cudaErrorMapBufferObjectFailed ünïcode".into()),
            },
            Message::Barrier {
                index: 2,
                stage: Stage::ProducerRewrote,
            },
            Message::Verdict {
                index: 5,
                verdict: SideVerdict {
                    copy_ok: false,
                    detail: "byte 0 is 0x01".into(),
                    claim: Some(true),
                    kernel: KernelOutcome::Failed("3 bytes wrong".into()),
                },
            },
            Message::Verdict {
                index: 5,
                verdict: SideVerdict {
                    copy_ok: true,
                    detail: String::new(),
                    claim: None,
                    kernel: KernelOutcome::Ok,
                },
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let frame = encode(&m);
            let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 4);
            assert_eq!(decode(&frame[4..]).unwrap(), m);
            assert_eq!(recv_blocking(&mut &frame[..]).unwrap(), m);
        }
    }

    #[test]
    fn the_handle_travels_as_its_raw_64_bytes() {
        let h = [0xabu8; IPC_HANDLE_BYTES];
        let frame = encode(&Message::Handle {
            index: 1,
            handle: Ok(h),
        });
        // length(4) tag(1) index(4) status(1) handle(64)
        assert_eq!(frame.len(), 4 + 1 + 4 + 1 + 64);
        assert_eq!(&frame[10..], &h[..]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for m in samples() {
            let frame = encode(&m);
            for cut in 0..frame.len() - 4 {
                assert!(
                    matches!(decode(&frame[4..4 + cut]), Err(ProtocolError::Malformed(_))),
                    "{m:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_unknown_tags_and_bad_values_are_rejected() {
        let mut body = encode(&Message::Barrier {
            index: 1,
            stage: Stage::Copy,
        })[4..]
            .to_vec();
        body.push(0);
        assert!(
            matches!(decode(&body), Err(ProtocolError::Malformed(m)) if m.contains("trailing"))
        );
        assert!(
            matches!(decode(&[99]), Err(ProtocolError::Malformed(m)) if m.contains("unknown tag"))
        );
        assert!(
            matches!(decode(&[TAG_BARRIER, 0, 0, 0, 0, 7]), Err(ProtocolError::Malformed(m)) if m.contains("stage"))
        );
        assert!(
            matches!(decode(&[TAG_OPENED, 0, 0, 0, 0, 5]), Err(ProtocolError::Malformed(m)) if m.contains("boolean"))
        );
        let mut hello = vec![TAG_HELLO];
        hello.extend_from_slice(b"XXXX");
        assert!(matches!(decode(&hello), Err(ProtocolError::Malformed(m)) if m.contains("magic")));
        // A pair count that cannot fit is refused before allocating.
        let mut start = vec![TAG_START, 0, 0];
        start.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&start), Err(ProtocolError::Malformed(m)) if m.contains("pairs")));
        // Invalid UTF-8 in a text.
        let bad_text = [TAG_OPENED, 0, 0, 0, 0, 0, 2, 0, 0xff, 0xfe];
        assert!(
            matches!(decode(&bad_text), Err(ProtocolError::Malformed(m)) if m.contains("UTF-8"))
        );
    }

    #[test]
    fn another_version_is_reported_not_misparsed() {
        let mut body = vec![TAG_HELLO];
        body.extend_from_slice(&MAGIC);
        body.extend_from_slice(&(VERSION + 1).to_le_bytes());
        body.extend_from_slice(&[1, 2, 3]); // a layout this version does not know
        match decode(&body).unwrap() {
            Message::Hello { version, .. } => assert_eq!(version, VERSION + 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frame_lengths_are_bounded() {
        let mut r = &(MAX_FRAME as u32 + 1).to_le_bytes()[..];
        assert!(matches!(
            recv_blocking(&mut r),
            Err(ProtocolError::Malformed(_))
        ));
        let mut r = &0u32.to_le_bytes()[..];
        assert!(matches!(
            recv_blocking(&mut r),
            Err(ProtocolError::Malformed(_))
        ));
        let mut empty = &[][..];
        assert!(matches!(recv_blocking(&mut empty), Err(ProtocolError::Eof)));
    }

    #[test]
    fn long_texts_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_TEXT); // 2 bytes each
        let m = Message::Opened {
            index: 0,
            result: Err(long),
        };
        match decode(&encode(&m)[4..]).unwrap() {
            Message::Opened { result: Err(t), .. } => {
                assert!(t.len() <= MAX_TEXT && t.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reader_reassembles_split_frames_and_honours_deadlines() {
        let (r, mut w) = os::pipe().unwrap();
        let mut reader = FrameReader::new(&r);
        let msgs = samples();
        let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
        // Nothing written: times out promptly.
        let t = Instant::now();
        assert!(matches!(
            reader.recv(Instant::now() + Duration::from_millis(50)),
            Err(ProtocolError::Timeout)
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
        let writer = std::thread::spawn(move || {
            for chunk in bytes.chunks(3) {
                w.write_all(chunk).unwrap();
            }
            // w dropped: EOF after the last frame.
        });
        for m in &msgs {
            assert_eq!(
                &reader
                    .recv(Instant::now() + Duration::from_secs(5))
                    .unwrap(),
                m
            );
        }
        writer.join().unwrap();
        assert!(matches!(
            reader.recv(Instant::now() + Duration::from_secs(5)),
            Err(ProtocolError::Eof)
        ));
    }
}

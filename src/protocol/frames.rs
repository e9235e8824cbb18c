//! Frames over pipes: a blocking reader and writer (the worker's side) and a reader that never
//! blocks past the caller's deadline (the parent's side).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::codec::malformed;
use super::{decode, encode, Message, ProtocolError, MAX_FRAME};
use crate::os;

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
    pipe: OwnedFd,
    buf: Vec<u8>,
}

impl FrameReader {
    /// Takes a readable pipe end (it is closed with the reader).
    pub fn new(pipe: impl Into<OwnedFd>) -> FrameReader {
        FrameReader {
            pipe: pipe.into(),
            buf: Vec::new(),
        }
    }

    /// The pipe's descriptor, for polling several readers at once.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.pipe.as_fd()
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
        match os::read(self.pipe.as_fd(), &mut chunk) {
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
}

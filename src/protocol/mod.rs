//! The wire format: the framed binary protocol between the parent and its worker processes, over pipes.
//!
//! A frame is `u32` little-endian length, then that many bytes: a one-byte tag and the payload.
//! Decoding is strict (unknown tags, short or overlong payloads, bad UTF-8 and trailing bytes are
//! errors) and bounded ([`MAX_FRAME`]), so a confused or hostile worker yields a
//! [`ProtocolError`], never a panic or an unbounded allocation. The first frame a worker sends is
//! [`Message::Hello`] carrying [`VERSION`]; the parent refuses any other version.
//!
//! Version 2: every message about a pair carries its [`Job`] (position, pair, role, tier), so
//! several pairs can be in flight on one pipe, and outcomes are typed ([`Problem`]): the failing
//! CUDA call with its code, or the mismatch count and first bad offset, never just a string.
//! The IPC handle travels as its raw 64 bytes.
//!
//! Version 3: a job names its transport (legacy IPC or cuMem); a parallel worker may be asked
//! to export a cuMem allocation too (`Setup`), whose descriptor then travels beside the pipe,
//! over a Unix socket (`os::fdpass`), never in a frame.
//!
//! Version 4: the tiers' parameters carry the bandwidth transfer size, a `Step` may ask for
//! the bandwidth measurement (`Op::Bandwidth`), answered by `Measured` (figures as `f64` bits).

//! The domain values it carries ([`Pair`](crate::model::Pair), [`Problem`](crate::model::Problem),
//! ...) are the model's ([`crate::model`]); this module only encodes them: the messages
//! ([`message`]), their byte layout ([`codec`]) and frames over pipes ([`frames`]).

mod codec;
mod frames;
mod message;

pub use codec::{decode, encode};
pub use frames::{recv_blocking, send, FrameReader};
pub use message::{Job, Message, Op, ProtocolError, Stage};

/// Protocol version; bumped on any change to the encoding.
pub const VERSION: u16 = 4;
/// Magic bytes at the start of a Hello payload.
pub const MAGIC: [u8; 4] = *b"P2PC";
/// Largest frame accepted, tag included: far above any real message (a Start of 8 x 8 pairs is
/// about 1.3 KB), small enough that garbage on the pipe cannot make us allocate much.
pub const MAX_FRAME: usize = 64 * 1024;
/// Longest string carried (error texts), in bytes; longer ones are cut at a char boundary.
pub const MAX_TEXT: usize = 4096;
/// The most devices a check takes (a worker that sees more is refused): far above any machine
/// (NVLink domains reach 72 GPUs), small enough that N x N pairs stay cheap.
pub const MAX_DEVICES: u32 = 256;

/// Bytes of a CUDA IPC memory handle (`cudaIpcMemHandle_t`), carried raw. The worker passes
/// the driver layer's handles (`cuda::IPC_HANDLE_BYTES`) through: a different size would not
/// compile.
pub const IPC_HANDLE_BYTES: usize = 64;

#[cfg(test)]
mod tests;

//! The child side of the check: a worker process that does its part of each pair, talking to
//! its parent with [`crate::protocol`] over its stdin and a pipe on descriptor 3
//! (`os::PROTOCOL_FD`).
//!
//! A worker is started by fork+exec of the `p2pcheck-worker` executable (or any program that
//! calls [`main`] when its first argument is [`WORKER_FLAG`]), never by a bare fork: the parent
//! may own a CUDA context, which a forked child cannot use. It exits when its stdin closes.
//! The parent's first message picks the engine: `Start` runs vLLM's producer or consumer for a
//! batch ([`vllm`]), `Setup` makes it one GPU's worker in the parallel engine ([`parallel`]).
//! Every CUDA failure becomes part of an outcome; only a broken pipe or a protocol violation
//! ends the worker early (the parent then sees EOF at once).

mod bandwidth;
mod convert;
mod parallel;
mod tiers;
mod vllm;

pub(crate) use parallel::descriptor_payload;
pub(crate) use tiers::Layout;

use std::io::{self, Read, Write};

use crate::cuda::{self, DeviceView};
use crate::model::{Check, Problem};
use crate::os;
use crate::protocol::{self, Message, ProtocolError};

/// The first argument that makes a program act as a p2pcheck worker.
pub const WORKER_FLAG: &str = "--p2pcheck-worker";
/// Bytes tested per pair, as in vLLM.
pub const TEST_BYTES: usize = 1024;
/// The producer's initial value (vLLM: 1).
pub(crate) const PRODUCER_FILL: u8 = 1;
/// The consumer's value written with cudaMemset (vLLM: 2).
pub(crate) const CONSUMER_FILL: u8 = 2;

/// Exit code when CUDA could not start (the Hello says why).
pub const EXIT_NO_CUDA: i32 = 4;
/// Exit code on a protocol violation or broken pipe.
pub const EXIT_PROTOCOL: i32 = 3;

/// Runs a worker over this process's stdin and the protocol descriptor its parent set up
/// (descriptor 3), and returns its exit code. Call it from a program's `main`
/// when its first argument is [`WORKER_FLAG`] (the `p2pcheck-worker` executable and the CLI do).
///
/// It changes nothing process-wide: the parent arranged everything between fork and exec (fd
/// 1 pointed at stderr, so that nothing a library prints can corrupt the stream, which the
/// parent captures; `PR_SET_PDEATHSIG`, so the worker dies with its parent). A program not
/// started that way has no protocol descriptor and gets an error and exit code 3
/// (`EXIT_PROTOCOL`).
pub fn main() -> i32 {
    let out = match os::protocol_output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!(
                "p2pcheck worker: no protocol pipe on descriptor {} ({e}): workers are started \
                 by p2pcheck (the CLI or the library), not by hand",
                os::PROTOCOL_FD
            );
            return EXIT_PROTOCOL;
        }
    };
    match serve(io::stdin().lock(), out) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("p2pcheck worker {}: {e}", std::process::id());
            EXIT_PROTOCOL
        }
    }
}

/// The worker's two pipe ends.
pub(crate) struct Link<R, W> {
    input: R,
    output: W,
}

impl<R: Read, W: Write> Link<R, W> {
    pub(crate) fn send(&mut self, m: Message) -> Result<(), ProtocolError> {
        protocol::send(&mut self.output, &m)
    }
    pub(crate) fn recv(&mut self) -> Result<Message, ProtocolError> {
        protocol::recv_blocking(&mut self.input)
    }
}

/// A protocol violation: the parent sent `got` where `wanted` belonged.
pub(crate) fn unexpected<T>(wanted: &str, got: Message) -> Result<T, ProtocolError> {
    Err(ProtocolError::Malformed(format!(
        "expected {wanted}, got {got:?}"
    )))
}

/// Serves one run: Hello, then the engine the parent's first message names. Returns the exit
/// code.
pub fn serve(input: impl Read, output: impl Write) -> Result<i32, ProtocolError> {
    let mut link = Link { input, output };
    cuda::trace::set_role(cuda::trace::ProcessRole::Worker, "worker (starting CUDA)");
    // Starting CUDA is the costly part (cuInit); the Hello reports its outcome. The driver is
    // loaded first, through p2pcheck's own search (P2PCHECK_LIBCUDA), so the runtime then
    // finds that same library already loaded instead of searching on its own.
    let count = cuda::init()
        .and_then(|_| cuda::runtime_device_count())
        .map(|n| n as u32)
        .map_err(Problem::from);
    link.send(Message::Hello {
        version: protocol::VERSION,
        pid: std::process::id(),
        device_count: count.clone(),
    })?;
    let Ok(sees) = count else {
        return Ok(EXIT_NO_CUDA);
    };
    let first = match link.recv() {
        // The parent had every answer before it needed this worker (its pairs were decided by
        // another worker's set-up): the normal end.
        Err(ProtocolError::Eof) => return Ok(0),
        other => other?,
    };
    match first {
        Message::Start {
            role,
            level,
            tiers,
            pairs,
        } => vllm::run(&mut link, role, level, &tiers, &pairs)?,
        Message::Setup {
            device,
            slots,
            tiers,
            cumem,
        } => parallel::run(&mut link, device, slots, &tiers, sees, cumem)?,
        other => return unexpected("Start or Setup", other),
    }
    Ok(0)
}

/// Copies `view` to the host (`cudaMemcpy`, kind default, as vLLM) and checks that every byte
/// is `expected`; bytes still the producer's fill count as stale.
pub(crate) fn verify(view: DeviceView<'_>, expected: u8, check: Check) -> Result<(), Problem> {
    let host = view.copy_to_host()?;
    let mut wrong = host.iter().enumerate().filter(|(_, &b)| b != expected);
    match wrong.next() {
        None => Ok(()),
        Some((first, &seen)) => Err(Problem::Mismatch {
            check,
            wrong: 1 + wrong.count() as u64,
            total: host.len() as u64,
            first_bad: first as u64,
            seen: Some(seen),
            expected,
            width: 0,
            stale: host.iter().filter(|&&b| b == PRODUCER_FILL).count() as u64,
        }),
    }
}

/// This process's peak resident memory so far (`VmHWM` in `/proc/self/status`), in KiB; 0
/// where the kernel does not say.
pub(crate) fn peak_rss_kb() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

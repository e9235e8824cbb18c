//! The child side of the check: a worker process that plays producer or consumer for a batch of
//! pairs (SPEC section 2), talking to its parent over stdin/stdout with [`crate::protocol`].
//!
//! A worker is started by fork+exec of the `p2pcheck-worker` executable (or any program that
//! calls [`main`] when its first argument is [`WORKER_FLAG`]), never by a bare fork: the parent
//! may own a CUDA context, which a forked child cannot use. It exits when its stdin closes.
//! Every CUDA failure becomes part of a verdict; only a broken pipe or a protocol violation ends
//! the worker early (the parent then sees EOF at once).

use std::io::{self, Read, Write};

use crate::driver::{self, DevicePtr};
use crate::os;
use crate::protocol::{
    self, KernelOutcome, Message, Pair, ProtocolError, Role, SideVerdict, Stage,
};

/// The first argument that makes a program act as a p2pcheck worker.
pub const WORKER_FLAG: &str = "--p2pcheck-worker";
/// Bytes tested per pair, as in vLLM.
pub const TEST_BYTES: usize = 1024;
/// The producer's initial value (vLLM: 1).
const PRODUCER_FILL: u8 = 1;
/// The consumer's value written with cudaMemset (vLLM: 2).
const CONSUMER_FILL: u8 = 2;
/// The consumer's value written by SM stores (kernel check).
const KERNEL_STORE: u8 = 3;
/// The producer's value for the consumer's SM loads (kernel check).
const PRODUCER_REWRITE: u8 = 4;

/// The variable through which the parent passes its pid (see [`main`]).
pub const PARENT_PID_VAR: &str = "P2PCHECK_PARENT_PID";

/// Exit code when CUDA could not start (the Hello says why).
pub const EXIT_NO_CUDA: i32 = 4;
/// Exit code on a protocol violation or broken pipe.
pub const EXIT_PROTOCOL: i32 = 3;

/// Runs a worker over this process's stdin and stdout and returns its exit code.
///
/// Stdout is moved to a private descriptor first and fd 1 pointed at stderr, so that nothing a
/// library prints can corrupt the protocol stream. The worker asks the kernel to kill it when
/// its parent dies (`PR_SET_PDEATHSIG`), so a parent killed by Ctrl-C, SIGTERM or SIGKILL never
/// leaves a worker behind; if the parent is already gone by then, it exits at once.
pub fn main() -> i32 {
    if let Err(e) = os::die_with_parent() {
        eprintln!("p2pcheck worker: PR_SET_PDEATHSIG failed: {e}");
        return EXIT_PROTOCOL;
    }
    let parent = std::env::var(PARENT_PID_VAR)
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    if parent.is_some_and(|p| p != std::os::unix::process::parent_id()) {
        eprintln!("p2pcheck worker: the parent that started it is gone");
        return EXIT_PROTOCOL;
    }
    let out = match os::take_stdout() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("p2pcheck worker: cannot set up descriptors: {e}");
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

struct Link<R, W> {
    input: R,
    output: W,
}

impl<R: Read, W: Write> Link<R, W> {
    fn send(&mut self, m: Message) -> Result<(), ProtocolError> {
        protocol::send(&mut self.output, &m)
    }
    fn recv(&mut self) -> Result<Message, ProtocolError> {
        protocol::recv_blocking(&mut self.input)
    }
    /// The next message must be this pair's `Handle`.
    fn recv_handle(&mut self, index: u32) -> Result<Result<[u8; 64], String>, ProtocolError> {
        match self.recv()? {
            Message::Handle { index: i, handle } if i == index => Ok(handle),
            other => unexpected(index, "Handle", other),
        }
    }
    fn recv_opened(&mut self, index: u32) -> Result<Result<(), String>, ProtocolError> {
        match self.recv()? {
            Message::Opened { index: i, result } if i == index => Ok(result),
            other => unexpected(index, "Opened", other),
        }
    }
    fn barrier_in(&mut self, index: u32, stage: Stage) -> Result<(), ProtocolError> {
        match self.recv()? {
            Message::Barrier { index: i, stage: s } if i == index && s == stage => Ok(()),
            other => unexpected(index, "Barrier", other),
        }
    }
    fn barrier_out(&mut self, index: u32, stage: Stage) -> Result<(), ProtocolError> {
        self.send(Message::Barrier { index, stage })
    }
}

fn unexpected<T>(index: u32, wanted: &str, got: Message) -> Result<T, ProtocolError> {
    Err(ProtocolError::Malformed(format!(
        "pair {index}: expected {wanted}, got {got:?}"
    )))
}

/// Serves one batch: Hello, Start, then every pair. Returns the exit code.
pub fn serve(input: impl Read, output: impl Write) -> Result<i32, ProtocolError> {
    let mut link = Link { input, output };
    // Starting CUDA is the costly part (cuInit); the Hello reports its outcome. The driver is
    // loaded first, through p2pcheck's own search (P2PCHECK_LIBCUDA), so the runtime then
    // finds that same library already loaded instead of searching on its own.
    let count = driver::init()
        .and_then(|_| driver::runtime_device_count())
        .map(|n| n as u32)
        .map_err(|e| e.to_string());
    let failed = count.is_err();
    link.send(Message::Hello {
        version: protocol::VERSION,
        pid: std::process::id(),
        device_count: count,
    })?;
    if failed {
        return Ok(EXIT_NO_CUDA);
    }
    let (role, kernel_check, pairs) = match link.recv()? {
        Message::Start {
            role,
            kernel_check,
            pairs,
        } => (role, kernel_check, pairs),
        other => return unexpected(0, "Start", other),
    };
    for (index, pair) in pairs.iter().enumerate() {
        let index = index as u32;
        let device = match role {
            Role::Producer => pair.src as i32,
            Role::Consumer => pair.tgt as i32,
        };
        let mut verdict = match role {
            Role::Producer => produce(&mut link, index, *pair, kernel_check)?,
            Role::Consumer => consume(&mut link, index, *pair, kernel_check)?,
        };
        // vLLM resets after every pair, so that each pair starts from a clean context.
        if let Err(e) = driver::device_reset(device) {
            verdict.detail = join(&verdict.detail, &e.to_string());
        }
        link.send(Message::Verdict { index, verdict })?;
    }
    Ok(0)
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}; {b}")
    }
}

/// One side's verdict from its copy test, its claim, and its kernel check (`None`: not run).
fn side_verdict(
    copy: Result<(), String>,
    claim: Option<bool>,
    kernel: Option<Result<(), String>>,
) -> SideVerdict {
    SideVerdict {
        copy_ok: copy.is_ok(),
        detail: copy.err().unwrap_or_default(),
        claim,
        kernel: match kernel {
            None => KernelOutcome::NotRun,
            Some(Ok(())) => KernelOutcome::Ok,
            Some(Err(why)) => KernelOutcome::Failed(why),
        },
    }
}

/// Reads `p` back to the host and describes any byte that is not `expected`.
fn verify(device: i32, p: DevicePtr, expected: u8, what: &str) -> Result<(), String> {
    let bytes = driver::copy_to_host(device, p, TEST_BYTES).map_err(|e| e.to_string())?;
    let wrong: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != expected).collect();
    match wrong.first() {
        None => Ok(()),
        Some(&first) => Err(format!(
            "{what}: {} of {} bytes wrong; byte {first} is {:#04x}, expected {expected:#04x}",
            wrong.len(),
            bytes.len(),
            bytes[first]
        )),
    }
}

/// Producer steps 1, 3 and 4 of SPEC section 2, plus its half of the kernel check.
fn produce<R: Read, W: Write>(
    link: &mut Link<R, W>,
    index: u32,
    pair: Pair,
    kernel_check: bool,
) -> Result<SideVerdict, ProtocolError> {
    let d = pair.src as i32;
    let exported = (|| {
        driver::set_device(d)?;
        let p = driver::malloc(d, TEST_BYTES)?;
        driver::memset(d, p, PRODUCER_FILL, TEST_BYTES)?;
        driver::device_synchronize(d)?;
        Ok::<_, driver::Error>((p, driver::ipc_get_mem_handle(d, p)?))
    })()
    .map_err(|e| e.to_string());
    let p = match exported {
        Ok((p, handle)) => {
            link.send(Message::Handle {
                index,
                handle: Ok(handle),
            })?;
            p
        }
        Err(why) => {
            link.send(Message::Handle {
                index,
                handle: Err(why.clone()),
            })?;
            // The consumer answers with an error (it had no handle); the verdict is ours.
            let _ = link.recv_opened(index)?;
            return Ok(side_verdict(Err(why), None, None));
        }
    };
    if let Err(why) = link.recv_opened(index)? {
        let why = format!("the consumer could not map it: {why}");
        return Ok(side_verdict(Err(why), None, None));
    }
    link.barrier_out(index, Stage::Copy)?;
    link.barrier_in(index, Stage::Copy)?;
    let copy = verify(d, p, CONSUMER_FILL, "producer read-back");
    let kernel = if kernel_check {
        // The consumer's SM stores must not overwrite the 2s before this side has read them.
        link.barrier_out(index, Stage::CopyChecked)?;
        link.barrier_in(index, Stage::KernelStored)?;
        let seen = verify(d, p, KERNEL_STORE, "peer SM stores, as the owner sees them");
        let rewrite = driver::memset(d, p, PRODUCER_REWRITE, TEST_BYTES)
            .and_then(|_| driver::device_synchronize(d))
            .map_err(|e| e.to_string());
        link.barrier_out(index, Stage::ProducerRewrote)?;
        Some(seen.and(rewrite))
    } else {
        None
    };
    Ok(side_verdict(copy, None, kernel))
}

/// Consumer steps 2, 3 and 4 of SPEC section 2, plus its half of the kernel check.
fn consume<R: Read, W: Write>(
    link: &mut Link<R, W>,
    index: u32,
    pair: Pair,
    kernel_check: bool,
) -> Result<SideVerdict, ProtocolError> {
    let d = pair.tgt as i32;
    let selected = driver::set_device(d).map_err(|e| e.to_string());
    let handle = link.recv_handle(index)?;
    let claim = driver::runtime_claims_peer(pair.src as i32, d).ok();
    let opened = match (selected, handle) {
        (Err(why), _) => Err(why),
        (_, Err(why)) => Err(format!("the producer could not export memory: {why}")),
        (Ok(()), Ok(h)) => driver::ipc_open_mem_handle(d, &h).map_err(|e| e.to_string()),
    };
    let q = match opened {
        Ok(q) => q,
        Err(why) => {
            link.send(Message::Opened {
                index,
                result: Err(why.clone()),
            })?;
            return Ok(side_verdict(Err(why), claim, None));
        }
    };
    link.send(Message::Opened {
        index,
        result: Ok(()),
    })?;
    // A failure here is this side's "false"; the barriers still run so the producer is not
    // left waiting.
    let wrote = driver::memset(d, q, CONSUMER_FILL, TEST_BYTES)
        .and_then(|_| driver::device_synchronize(d))
        .map_err(|e| e.to_string());
    link.barrier_in(index, Stage::Copy)?;
    link.barrier_out(index, Stage::Copy)?;
    let copy = wrote.and_then(|_| verify(d, q, CONSUMER_FILL, "consumer read-back"));
    let kernel = if kernel_check {
        link.barrier_in(index, Stage::CopyChecked)?;
        let stored =
            driver::kernel_store(d, q, TEST_BYTES, KERNEL_STORE).map_err(|e| e.to_string());
        link.barrier_out(index, Stage::KernelStored)?;
        link.barrier_in(index, Stage::ProducerRewrote)?;
        let loaded = driver::kernel_check(d, q, TEST_BYTES, PRODUCER_REWRITE)
            .map_err(|e| e.to_string())
            .and_then(|r| match r.first_bad {
                None => Ok(()),
                Some(first) => Err(format!(
                    "SM loads through the mapping: {} of {TEST_BYTES} bytes wrong, first at byte {first}",
                    r.mismatches
                )),
            });
        Some(stored.and(loaded))
    } else {
        None
    };
    Ok(side_verdict(copy, claim, kernel))
}

//! `p2pcheck`: the command-line tool. See `p2pcheck --help`.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use p2pcheck::doctor;
#[path = "cli/fleet.rs"]
mod fleet_cli;
use fleet_cli::Format;
use p2pcheck::json::{Json, Object};
use p2pcheck::sim::{self, Fault, Simulation};
use p2pcheck::{
    AccessOptions, Engine, JsonExtras, Level, Options, Report, TableExtras, Transport, Visibility,
};

const HELP: &str = "\
p2pcheck - prove which GPU pairs can really reach each other's memory across processes

USAGE:
    p2pcheck [OPTIONS]
    p2pcheck access-check SRC TGT [OPTIONS]
    p2pcheck env [OPTIONS] [--sglang-cache-dir DIR]
    p2pcheck exec [OPTIONS] [--sglang-cache-dir DIR] -- COMMAND [ARGS...]
    p2pcheck trace-summary PATH [--spec]
    p2pcheck doctor [--json] [--root DIR]

Checks every ordered pair (src, tgt) of the visible GPUs in three tiers: copy (a process on src
owns memory, a process on tgt maps it through CUDA IPC and writes it, both read it back:
vLLM's can_actually_p2p), kernel (SM-issued stores and loads of a pattern through the mapping)
and handshake (kernels resident on both sides at once, exchanging flags). A failure is
classified (never-written, partial, wrong-data, open-failed, timeout; over the cuMem
transport also export-refused, fd-not-passable, import-refused, map-refused) with a hint. By
default one worker process per GPU checks every pair at once, each seeing only its own GPU;
--engine vllm runs vLLM's procedure exactly (two processes, pair after pair, a device reset
after each). Prints the matrix (rows src, columns tgt) of verdicts - ok, FAIL:TIER (ran; the
weakest tier that failed), HANG (a worker stopped answering: killed), ERROR (a worker died) - with the
driver's own claim (cudaDeviceCanAccessPeer) where it differs, the reason for every failure,
and where the vLLM cache file is. A pair that does not pass is attempted again on fresh
workers, after every other pair; only a pass at once or the same failure twice (same tier, same
diagnosis) is a fact that may go into vLLM's cache (anything else is answered false and not
written). Every wait has a deadline, and so does the whole check; no worker outlives it.

access-check SRC TGT answers vLLM's gpu_p2p_access_check(SRC, TGT): true or false, from vLLM's
cache file when the fingerprint beside it vouches for exactly its verdicts on this machine at
this level and settings (no CUDA call at all), else from a check of every pair, written to the
cache with its fingerprint. Cache files of other users, or that others can write, are not
trusted: the pairs are checked again (see --trust-cache-owner).

trace-summary PATH reads an audit trace (--trace) and prints, per process, its calls in order
of first use with their counts and its failed calls. With --spec it also compares a trace of
`--engine vllm --level copy` with vLLM's procedure (SPEC section 2) pair by pair and prints
every difference: exit 0 when there is none, 1 when there are some, 2 when the file cannot be
read or has a malformed line (named by its number). Only a regular file is read, at most 1 GiB
of it, lines of at most 64 KiB, keeping at most 256 MiB; past a limit, exit 2 naming it.

env checks the pairs and prints the settings that make NCCL and the engines safe on this
machine, one `export` line per variable with a comment naming the pairs and tiers that call
for it (--json: one object): nothing when every pair passes every tier; a copy tier that
failed, or a pair that hung or errored before its copy tier passed: NCCL_P2P_DISABLE=1 and
custom all-reduce off; only the kernel or handshake tier failed: custom all-reduce off
(vLLM and SGLang: --disable-custom-all-reduce; TensorRT-LLM: FORCE_NCCL_ALL_REDUCE_STRATEGY=1).
It also writes vLLM's cache and SGLang's (~/.cache/sglang) with the verdicts (on the
simulator only into --cache-dir and --sglang-cache-dir). Exit 0 with the settings, 2 when it
could not check. exec does the same, then runs COMMAND in its place with those variables and,
for `vllm serve`, `python -m vllm.entrypoints.openai.api_server` and `python -m
sglang.launch_server`, the flags appended; when it could not check, COMMAND is not run (2).

doctor says why a pair fails or is slow, and what to change: the PCIe path of each GPU pair
(bridges, ACS, IOMMU groups and mode, kernel command line; from sysfs, without root where
possible), NVLink, NVML's P2P status, the NVSwitch fabric, persistence, MIG and compute modes
(NVML, loaded if present), the process's namespaces and container, and the NCCL and CUDA
variables in effect; then the causes, ranked, each with the pairs it bears on, its fix and how
to confirm it. --json prints one JSON object (fields in the README, section Doctor); --root DIR
reads the files under DIR instead of / (testing). Exit 0, 1 when a finding breaks peer access,
2 for bad arguments. A failing check prints the top cause of each failure under its details.

OPTIONS:
    --json                 Print one JSON object on stdout instead of the table
    --format FORMAT        table (default), json (= --json), prometheus (text exposition for
                           node-exporter's textfile collector), npd (node-problem-detector
                           custom plugin: exit 0 OK, 1 NonOK, 2 Unknown, a short message) or
                           nagios (exit 0 OK, 1 WARNING: kernel/handshake tier failed, 2
                           CRITICAL: copy tier failed or not proven, 3 UNKNOWN)
    --output FILE          With --format prometheus, npd or nagios: write the text to FILE
                           atomically (a temp file renamed over it) instead of stdout; a check
                           that cannot run still writes p2pcheck_check_success 0
    --engine ENGINE        parallel (default) or vllm (vLLM's procedure exactly)
    --level LEVEL          copy (vLLM's test only), kernel (also SM stores and loads of a
                           position-dependent pattern, 1/4/8/16 bytes wide) or handshake (also
                           kernels resident on both sides exchanging flags) [default: handshake]
    --no-kernel-check      The same as --level copy
    --kernel-bytes BYTES   The kernel tier's pattern area per pair [default: 2097152; a
                           multiple of 262144]
    --handshake-rounds N   Handshake rounds between two GPUs, 1 to 100000 [default: 16; same
                           GPU: 3]. Their kernels get 0.1 s plus 5 ms a round on the GPU clock
                           (at least 1 s), which must fit in 60 % of --timeout: more rounds
                           than that are refused
    --bandwidth            After the tiers, measure every pair whose copy tier passed, one at a
                           time, through its legacy IPC mapping (not over --transport cumem):
                           copy engine and SM copies, write, read
                           and both at once (GB/s, median of 5 timed samples, with their CV),
                           the bytes moved checked; latency of one dependent load. Prints a
                           matrix per figure; a pair of two GPUs whose copy-engine write or read
                           is below the floor of its link (NVML: 0.6 of NVLink's or PCIe's
                           theoretical figure; the simulator: NVLink 4, 270 GB/s) is `slow`.
                           Parallel engine only; about 60 ms a pair over NVLink
    --min-gbps GBPS        With --bandwidth: the floor for every pair of two GPUs instead of
                           its link's (needed for a verdict where the link is unknown)
    --bandwidth-bytes BYTES
                           With --bandwidth: bytes of each timed transfer [default: 67108864;
                           a multiple of 2 MiB up to 512 MiB]
    --transport WHICH      ipc (default: legacy CUDA IPC, what vLLM's check and its custom
                           all-reduce use), cumem (cuMemCreate memory exported as a POSIX
                           descriptor, passed to the other process over a Unix socket,
                           imported, mapped: PyTorch's symmetric memory, NCCL_CUMEM_ENABLE) or
                           all (both); every tier runs over each, a matrix per transport. vLLM's
                           cache holds the ipc verdicts only; cumem needs --engine parallel
    --visibility WHICH     one (default: each worker sees only its GPU, by UUID) or all (each
                           sees every GPU; used anyway where GPUs cannot be named: MIG, no
                           /proc/driver/nvidia)
    --write-vllm-cache     Write vLLM's cache file gpu_p2p_access_cache_for_<CVD>.json with these
                           verdicts and p2pcheck's fingerprint beside it (atomically, under a
                           lock), so vLLM never runs its own check. A write that fails is exit 2
                           (the verdicts are printed all the same); a pair that hung or errored
                           only once is not written (a warning)
    --cache-dir DIR        Folder of that file [default: $VLLM_CACHE_ROOT, else
                           $XDG_CACHE_HOME/vllm, else ~/.cache/vllm]
    --sglang-cache-dir DIR env, exec: SGLang's cache folder [default: ~/.cache/sglang]
    --refresh              access-check: check again even if the cache is valid
    --trust-cache-owner UID
                           Also trust the cache folder and files of user UID (a folder shared
                           on purpose); otherwise only this user's and root's are used, and
                           only where no one else can write them (see README, Security)
    --timeout SECS         Deadline for each step of a pair; past it the pair is HANG
                           [default: 5; 0.001 to 86400; at level handshake, at least what the
                           rounds need: 0.3 for 16, see --handshake-rounds]
    --startup-timeout SECS Deadline for a worker to start CUDA [default: 60; 0.001 to 86400]
    --check-timeout SECS   Deadline for the whole check; pairs not settled by then are
                           reported so (not-attempted, unconfirmed) [default: 2 x start-up
                           timeout + (4 x GPUs + 8) x step timeout + 0.25 s per pair; with
                           --bandwidth 2 step timeouts and 0.25 s per pair more]
    --worker PATH          The worker executable [default: $P2PCHECK_WORKER, else
                           p2pcheck-worker beside this program, else this program]
    --simulate N           Run on the built-in simulated driver with N GPUs instead of the real
                           one (no GPU needed); CUDA_VISIBLE_DEVICES applies over them. The vLLM
                           cache is then only touched in an explicit --cache-dir
    --fault SRC->TGT:KIND[@once]
                           With --simulate: break pair SRC->TGT (physical ids; repeatable).
                           KIND: ipc-open-fails, drop-writes, corrupt, sm-only, late-visibility,
                           hang, crash, one-way, claim-no, partial, shifted, slow,
                           fast-wrong, cumem-export-fails, cumem-import-fails,
                           cumem-access-fails, cumem-drop-writes (see README).
                           @once: only in the first attempt at the pair; the fresh workers of
                           a retry do not see it
    --write-sim-lib PATH   Write the simulated driver library to PATH, a regular file (created
                           or replaced; a FIFO or a device is refused: exit 2), and exit (load
                           it as libcuda/libcudart to test your own code without a GPU)
    --trace PATH           Append the audit trace to PATH, a regular file (created with mode
                           0600; a FIFO or a device is refused: exit 2): one JSON line for
                           every CUDA call of this process and of every worker (wins over
                           P2PCHECK_TRACE; see README, Audit trace)
    -h, --help             Print this help
    -V, --version          Print the version and where the CUDA bindings came from

ENVIRONMENT:
    CUDA_VISIBLE_DEVICES   The GPUs to check (indices, GPU-/MIG- UUIDs, any order)
    P2PCHECK_LIBCUDA       Path of libcuda to load [default: libcuda.so.1]
    P2PCHECK_LIBCUDART     Path of libcudart to load [default: search, see README]
    P2PCHECK_WORKER        Path of the worker executable
    P2PCHECK_LIBNVML       Path of NVML for doctor [default: libnvidia-ml.so.1]
    P2PCHECK_DOCTOR_ROOT   Testing: explain a check's failures from the sysfs/proc tree in this
                           folder (also with --simulate, which otherwise gets no doctor)
    P2PCHECK_TRACE         Audit trace of every CUDA call of every process, one JSON line
                           each: 1 = to stderr, a path = appended to that file (a regular
                           file, checked as --trace is), 0/empty = off

EXIT CODES:
    0  every pair works (access-check: the answer was given, true or false; env: the settings
       were printed)
    1  some pair is not ok: FAIL, HANG or ERROR (the output says which and why); with
       --bandwidth also a pair that is slow or whose measurement failed (wrong bytes moved)
    2  could not check (no GPU, no driver, bad arguments, a worker failed or timed out), or
       could not write the vLLM cache file --write-vllm-cache asked for (the verdicts are
       printed all the same)
    --format npd and nagios have their own (see --format); exec exits with COMMAND's code
";

struct Args {
    trace: Option<PathBuf>,
    json: bool,
    /// `--format`; `--json` is `Format::Json`.
    format: Format,
    /// `--output FILE`: the fleet formats' text goes there, atomically, instead of stdout.
    output: Option<PathBuf>,
    /// `env`/`exec`: SGLang's cache folder instead of `~/.cache/sglang`.
    sglang_cache_dir: Option<PathBuf>,
    write_cache: bool,
    refresh: bool,
    cache_dir: Option<PathBuf>,
    trust_cache_owner: Option<u32>,
    access: Option<(u32, u32)>,
    opts: Options,
}

/// A command-line error: the message, for exit code 2.
type ArgResult<T> = Result<T, String>;

fn text(flag: &str, value: Option<OsString>, what: &str) -> ArgResult<String> {
    let v = value.ok_or_else(|| format!("{flag} needs {what}"))?;
    v.into_string()
        .map_err(|v| format!("{flag} {v:?}: not UTF-8 text"))
}

fn seconds(flag: &str, value: Option<OsString>) -> ArgResult<Duration> {
    let v = text(flag, value, "a number of seconds")?;
    let (lo, hi) = p2pcheck::TIMEOUT_RANGE;
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| format!("{flag} {v:?}: expected a positive number of seconds"))
        .and_then(|s| {
            if s < lo.as_secs_f64() || s > hi.as_secs_f64() {
                Err(format!(
                    "{flag} {v}: must be between {} and {} seconds",
                    lo.as_secs_f64(),
                    hi.as_secs_f64()
                ))
            } else {
                Ok(Duration::from_secs_f64(s))
            }
        })
}

fn device(what: &str, value: Option<OsString>) -> ArgResult<u32> {
    let v = text("access-check", value, what)?;
    v.parse()
        .map_err(|_| format!("access-check {what} {v:?}: expected a device number"))
}

/// Parses the arguments; `Ok(None)` means the work is already done (help, version, sim lib).
fn parse_args(mut it: impl Iterator<Item = OsString>) -> ArgResult<Option<Args>> {
    let mut args = Args {
        trace: None,
        json: false,
        format: Format::Table,
        output: None,
        sglang_cache_dir: None,
        write_cache: false,
        refresh: false,
        cache_dir: None,
        trust_cache_owner: None,
        access: None,
        opts: Options::default(),
    };
    let mut faults: Vec<Fault> = Vec::new();
    let mut first = true;
    while let Some(a) = it.next() {
        let a = a
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8 text"))?;
        match a.as_str() {
            "access-check" if first => {
                args.access = Some((device("SRC", it.next())?, device("TGT", it.next())?))
            }
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!(
                    "p2pcheck {} (protocol {}, CUDA bindings {})",
                    env!("CARGO_PKG_VERSION"),
                    p2pcheck::PROTOCOL_VERSION,
                    p2pcheck::BINDINGS_SOURCE
                );
                return Ok(None);
            }
            "--json" => args.json = true,
            "--format" => args.format = text(&a, it.next(), "a format")?.parse()?,
            "--output" => {
                let path = PathBuf::from(it.next().ok_or("--output needs a file")?);
                if path.as_os_str().is_empty() {
                    return Err("--output needs a file, not an empty argument".into());
                }
                args.output = Some(path);
            }
            "--sglang-cache-dir" => {
                let dir = PathBuf::from(it.next().ok_or("--sglang-cache-dir needs a folder")?);
                p2pcheck::check_cache_dir(&dir)
                    .map_err(|e| format!("--sglang-cache-dir: {e:#}"))?;
                args.sglang_cache_dir = Some(dir);
            }
            "--write-vllm-cache" => args.write_cache = true,
            "--refresh" => args.refresh = true,
            "--no-kernel-check" => args.opts.level = Level::Copy,
            "--kernel-bytes" => {
                let v = text(&a, it.next(), "a number of bytes")?;
                args.opts.kernel_bytes = v
                    .parse()
                    .map_err(|_| format!("--kernel-bytes {v:?}: expected a number of bytes"))?;
            }
            "--bandwidth" => args.opts.bandwidth = true,
            "--bandwidth-bytes" => {
                let v = text(&a, it.next(), "a number of bytes")?;
                args.opts.bandwidth_bytes = v
                    .parse()
                    .map_err(|_| format!("--bandwidth-bytes {v:?}: expected a number of bytes"))?;
            }
            "--min-gbps" => {
                let v = text(&a, it.next(), "GB/s")?;
                args.opts.min_gbps = Some(
                    v.parse()
                        .map_err(|_| format!("--min-gbps {v:?}: expected a number of GB/s"))?,
                );
            }
            "--handshake-rounds" => {
                let v = text(&a, it.next(), "a number of rounds")?;
                args.opts.handshake_rounds = v
                    .parse()
                    .map_err(|_| format!("--handshake-rounds {v:?}: expected a number"))?;
            }
            "--level" => {
                args.opts.level = text(&a, it.next(), "copy, kernel or handshake")?.parse()?
            }
            "--engine" => {
                args.opts.engine = match text(&a, it.next(), "parallel or vllm")?.as_str() {
                    "parallel" => Engine::Parallel,
                    "vllm" => Engine::Vllm,
                    other => return Err(format!("--engine {other:?}: parallel or vllm")),
                }
            }
            "--transport" => {
                args.opts.transport = text(&a, it.next(), "ipc, cumem or all")?.parse()?
            }
            "--visibility" => {
                args.opts.visibility = match text(&a, it.next(), "one or all")?.as_str() {
                    "one" => Visibility::One,
                    "all" => Visibility::All,
                    other => return Err(format!("--visibility {other:?}: one or all")),
                }
            }
            "--cache-dir" => {
                let dir = PathBuf::from(it.next().ok_or("--cache-dir needs a folder")?);
                p2pcheck::check_cache_dir(&dir)
                    .map_err(|e| format!("--cache-dir: {}", cache_why(e)))?;
                args.cache_dir = Some(dir);
            }
            "--trust-cache-owner" => {
                let v = text(&a, it.next(), "a user id")?;
                let uid = v
                    .parse()
                    .map_err(|_| format!("{a} {v:?}: expected a user id"))?;
                args.trust_cache_owner = Some(uid);
            }
            "--timeout" => args.opts.step_timeout = seconds(&a, it.next())?,
            "--startup-timeout" => args.opts.startup_timeout = seconds(&a, it.next())?,
            "--check-timeout" => args.opts.check_timeout = Some(seconds(&a, it.next())?),
            "--worker" => {
                args.opts.worker = Some(PathBuf::from(it.next().ok_or("--worker needs a path")?))
            }
            "--simulate" => {
                let n = text(&a, it.next(), "a GPU count")?;
                let gpus = n
                    .parse()
                    .map_err(|_| format!("--simulate {n:?}: expected a number of GPUs"))?;
                args.opts.simulate = Some(Simulation {
                    gpus,
                    faults: Vec::new(),
                });
            }
            "--fault" => faults.push(
                text(&a, it.next(), "SRC->TGT:KIND")?
                    .parse()
                    .map_err(|e| format!("{e:#}"))?,
            ),
            "--trace" => {
                let path = PathBuf::from(it.next().ok_or("--trace needs a path")?);
                if path.as_os_str().is_empty() {
                    return Err("--trace needs a path, not an empty argument".into());
                }
                args.trace = Some(path);
            }
            "--write-sim-lib" => {
                let path = PathBuf::from(it.next().ok_or("--write-sim-lib needs a path")?);
                sim::write_library(&path).map_err(|e| format!("{e:#}"))?;
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
        first = false;
    }
    match args.format {
        Format::Json => args.json = true,
        Format::Table if args.json => args.format = Format::Json,
        _ if args.json => return Err("--json and --format are two answers to one question".into()),
        _ => {}
    }
    if args.output.is_some() && !args.format.is_fleet() {
        return Err("--output goes with --format prometheus, npd or nagios".into());
    }
    match &mut args.opts.simulate {
        Some(s) => s.faults = faults,
        None if !faults.is_empty() => return Err("--fault needs --simulate".into()),
        None => {}
    }
    if args.write_cache && !args.opts.transport.has(Transport::Ipc) {
        return Err(
            "--write-vllm-cache needs the legacy IPC transport (--transport ipc or \
                    all): vLLM's cache holds its verdicts"
                .into(),
        );
    }
    args.opts.validate().map_err(|e| e.to_string())?;
    Ok(Some(args))
}

/// Where the vLLM cache file is, and what happened to it.
struct CacheNote {
    path: PathBuf,
    written: bool,
    existing: Option<Result<bool, String>>, // Some(Ok(agrees)) when a readable file was there
    /// Why a write that --write-vllm-cache asked for failed: the run then ends with exit 2.
    failed: Option<String>,
}

/// The vLLM cache file for this run; `None` for a simulation without an explicit --cache-dir
/// (simulated verdicts must never land in the real cache by accident). Warnings are added to
/// `warnings`.
fn cache_note(
    args: &Args,
    report: &Report,
    warnings: &mut Vec<String>,
) -> Result<Option<CacheNote>, String> {
    let n = report.device_count as usize;
    let dir = match (&args.cache_dir, &args.opts.simulate) {
        // vLLM's cache holds legacy IPC's verdicts: a check without them says nothing of it.
        _ if !report.transport.has(Transport::Ipc) => return Ok(None),
        (Some(d), _) => d.clone(),
        (None, Some(_)) => return Ok(None),
        (None, None) => p2pcheck::vllm_cache_dir().map_err(|e| format!("{e:#}"))?,
    };
    let path =
        p2pcheck::vllm_cache_path_in(&dir, report.device_count).map_err(|e| e.to_string())?;
    let verdicts: Vec<bool> = report.on(Transport::Ipc).map(|p| p.ok()).collect();
    // An existing file that cannot be read is reported as unusable, not as absent.
    let existing = match p2pcheck::read_vllm_cache(&path, n) {
        Ok(p2pcheck::CacheFile::Absent) => None,
        Ok(p2pcheck::CacheFile::Verdicts(v)) => Some(Ok(v == verdicts)),
        Ok(p2pcheck::CacheFile::Unusable(why)) => Some(Err(why)),
        Err(e) => Some(Err(cache_why(e))),
    };
    let mut written = false;
    let mut failed = None;
    if args.write_cache {
        match p2pcheck::store_report(report, &access_options(args, Some(dir))) {
            Ok((_, note)) => {
                written = true;
                warnings.extend(note);
            }
            // A verdict that is not a fact (a single hang) is not written on purpose: the
            // run's answer stands, so that is a warning. Any other failure is the write that
            // was asked for failing: an error.
            Err(e) if !report.persistable() => warnings.push(e.to_string()),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    Ok(Some(CacheNote {
        path,
        written,
        existing,
        failed,
    }))
}

/// What went wrong with a file of the cache folder, without the file asked about (the text
/// names it where it is shown).
fn cache_why(e: p2pcheck::Error) -> String {
    match e {
        p2pcheck::Error::Cache { kind, .. } => kind.to_string(),
        other => other.to_string(),
    }
}

fn cvd_shown() -> String {
    match std::env::var_os("CUDA_VISIBLE_DEVICES") {
        None => "<unset>".into(),
        Some(v) => format!("{v:?}"),
    }
}

fn print_table(args: &Args, report: &Report, note: Option<&CacheNote>, warnings: &[String]) {
    let machine = match &args.opts.simulate {
        Some(s) => format!(
            "simulated, {} GPU(s), faults [{}]",
            s.gpus,
            s.faults
                .iter()
                .map(Fault::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "real driver".into(),
    };
    print!(
        "{}",
        report.table(&TableExtras {
            cuda_visible_devices: &cvd_shown(),
            machine: &machine,
        })
    );
    print_doctor(&doctor_explanations(args, report));
    for w in warnings {
        println!("warning: {w}");
    }
    let Some(note) = note else {
        match report.transport.has(Transport::Ipc) {
            true => {
                println!("vLLM cache: not consulted (simulation; give --cache-dir to write one)")
            }
            false => println!(
                "vLLM cache: not consulted (it holds legacy IPC's verdicts; this run checked the \
                 cuMem transport only)"
            ),
        }
        return;
    };
    let state = match (&note.existing, note.written, &note.failed) {
        (_, _, Some(e)) => format!("NOT written: {e}"),
        (_, true, None) => "written".to_string(),
        (None, false, None) => "absent; --write-vllm-cache writes it".into(),
        (Some(Ok(true)), false, None) => "present, agrees with this run".into(),
        (Some(Ok(false)), false, None) => {
            "present, DISAGREES with this run; --write-vllm-cache replaces it".into()
        }
        (Some(Err(e)), false, None) => {
            format!("present but unusable ({e}); --write-vllm-cache replaces it")
        }
    };
    println!("vLLM cache: {} ({state})", note.path.display());
}

fn print_json(args: &Args, report: &Report, note: Option<&CacheNote>, warnings: &[String]) {
    let cvd = std::env::var_os("CUDA_VISIBLE_DEVICES").map(|v| v.to_string_lossy().into_owned());
    let vllm_cache = note.map_or_else(Json::null, |note| {
        let before = match &note.existing {
            None => "absent".to_string(),
            Some(Ok(true)) => "agrees".into(),
            Some(Ok(false)) => "disagrees".into(),
            Some(Err(e)) => format!("unusable: {e}"),
        };
        Object::new()
            .str("path", &note.path.display().to_string())
            .bool("written", note.written)
            .str("before", &before)
            .opt_str("error", note.failed.as_deref())
            .finish()
    });
    let extras = JsonExtras {
        cuda_visible_devices: cvd.as_deref(),
        simulated: args.opts.simulate.is_some(),
        warnings,
        vllm_cache,
        doctor: doctor_json(&doctor_explanations(args, report)),
    };
    println!("{}", report.to_json(&extras));
}

/// The check and its output; the exit code: 0 every pair ok, 1 some not, 2 the cache write
/// that was asked for failed (the verdicts are printed all the same).
fn run(args: &Args) -> Result<u8, String> {
    let pending = p2pcheck::start(None, args.opts.clone());
    let report = pending.wait().map_err(|e| e.to_string())?;
    let mut warnings = report.warnings.clone();
    let note = cache_note(args, &report, &mut warnings)?;
    if args.json {
        print_json(args, &report, note.as_ref(), &warnings);
    } else {
        print_table(args, &report, note.as_ref(), &warnings);
    }
    // The answer is out before the workers have torn their contexts down.
    let _ = std::io::stdout().flush();
    for w in pending.finish() {
        eprintln!("p2pcheck: warning: {w}");
    }
    if let Some(e) = note.as_ref().and_then(|n| n.failed.as_ref()) {
        eprintln!("p2pcheck: could not write vLLM's cache: {e}");
        return Ok(2);
    }
    let measured_well = !report.bandwidth.iter().any(p2pcheck::PairBandwidth::failed);
    Ok(match report.pairs.iter().all(|p| p.ok()) && measured_well {
        true => 0,
        false => 1,
    })
}

/// How `args` read and write vLLM's cache, in `cache_dir`.
fn access_options(args: &Args, cache_dir: Option<PathBuf>) -> AccessOptions {
    AccessOptions {
        check: args.opts.clone(),
        cache_dir,
        refresh: args.refresh,
        trust_cache_owner: args.trust_cache_owner,
    }
}

fn access_check(args: &Args, src: u32, tgt: u32) -> Result<u8, String> {
    let opts = access_options(args, args.cache_dir.clone());
    if args.opts.simulate.is_some() && args.cache_dir.is_none() {
        return Err("access-check --simulate needs an explicit --cache-dir".into());
    }
    let access = p2pcheck::access_check(src, tgt, &opts).map_err(|e| e.to_string())?;
    for w in &access.warnings {
        eprintln!("p2pcheck: warning: {w}");
    }
    if args.json {
        let answer = Object::new()
            .uint("src", src.into())
            .uint("tgt", tgt.into())
            .bool("answer", access.answer)
            .str("origin", &format!("{:?}", access.origin))
            .str("cache", &access.path.display().to_string())
            .finish();
        println!("{answer}");
    } else {
        println!("{}", access.answer);
    }
    Ok(0)
}

/// Opens the trace destination before anything runs, so that one that cannot be used (a missing
/// folder, a FIFO, a device: only a regular file is written) ends the run with exit 2 instead
/// of blocking or being skipped with a warning. `--trace PATH` is made absolute and given to
/// the check through its options (for this process and the workers); without it,
/// `P2PCHECK_TRACE` as the caller set it is checked the same way.
fn open_trace(args: &mut Args) -> ArgResult<()> {
    let Some(path) = args.trace.take() else {
        return p2pcheck::open_trace(None).map_err(|e| format!("P2PCHECK_TRACE: {e}"));
    };
    let path = match path.is_absolute() {
        true => path,
        false => std::env::current_dir()
            .map_err(|e| format!("--trace: cannot know the current folder: {e}"))?
            .join(path),
    };
    p2pcheck::open_trace(Some(&path)).map_err(|e| format!("--trace: {e}"))?;
    args.opts.trace = Some(path.clone());
    args.trace = Some(path);
    Ok(())
}

/// `p2pcheck trace-summary PATH [--spec]`.
fn trace_summary(mut it: impl Iterator<Item = OsString>) -> ExitCode {
    let mut path: Option<PathBuf> = None;
    let mut spec = false;
    for a in it.by_ref() {
        match a.to_str() {
            Some("--spec") => spec = true,
            Some("-h" | "--help") => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            Some(s) if s.starts_with('-') && s.len() > 1 => {
                eprintln!("p2pcheck: trace-summary: unknown argument {s:?} (see --help)");
                return ExitCode::from(2);
            }
            _ if path.is_none() => path = Some(PathBuf::from(a)),
            _ => {
                eprintln!("p2pcheck: trace-summary takes one PATH (see --help)");
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = path else {
        eprintln!("p2pcheck: trace-summary needs the PATH of a trace (see --help)");
        return ExitCode::from(2);
    };
    let trace = match p2pcheck::trace_summary::read(&path) {
        Ok(t) => t,
        Err(p2pcheck::Error::BadTrace { problems }) => {
            eprintln!("p2pcheck: trace-summary {}:", path.display());
            for p in &problems {
                eprintln!("  {p}");
            }
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("p2pcheck: trace-summary {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    print!("{}", trace.summary());
    if !spec {
        return ExitCode::SUCCESS;
    }
    let check = trace.check_spec();
    print!("{}", check.render());
    match check.differences.is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(1),
    }
}

/// The doctor's top finding for each failing pair of `report`, from this machine's facts, or
/// from the tree `P2PCHECK_DOCTOR_ROOT` names (tests). A simulation without it checks no GPU
/// of this machine: nothing to explain.
fn doctor_explanations(args: &Args, report: &Report) -> Vec<(p2pcheck::Pair, doctor::Finding)> {
    if report.pairs.iter().all(|p| p.ok()) {
        return Vec::new();
    }
    let facts = match (
        std::env::var_os("P2PCHECK_DOCTOR_ROOT"),
        &args.opts.simulate,
    ) {
        (Some(root), _) => doctor::gather_at(
            std::path::Path::new(&root),
            Some(&doctor::NvmlSource::from_env()),
        ),
        (None, Some(_)) => return Vec::new(),
        (None, None) => doctor::gather(),
    };
    doctor::explain(&facts, report)
}

/// Under the failures in the table: each one's most likely cause, its fix and how to confirm
/// it, once per finding.
fn print_doctor(explained: &[(p2pcheck::Pair, doctor::Finding)]) {
    if explained.is_empty() {
        return;
    }
    println!("doctor (the most likely cause; `p2pcheck doctor` shows every fact):");
    let mut shown: Vec<u32> = Vec::new();
    for (_, f) in explained {
        if shown.contains(&f.rank) {
            continue;
        }
        shown.push(f.rank);
        let pairs: Vec<String> = explained
            .iter()
            .filter(|(_, g)| g.rank == f.rank)
            .map(|(p, _)| p.to_string())
            .collect();
        println!(
            "  {}: [{}] {}: {}",
            pairs.join(", "),
            f.severity.name(),
            f.kind.name(),
            f.title
        );
        for (label, lines) in [("fix", &f.fix), ("confirm", &f.confirm)] {
            for l in lines {
                println!("     {label}: {l}");
            }
        }
    }
}

/// The same for `--json`: `[{"pair":[src,tgt],"finding":{…}}]`.
fn doctor_json(explained: &[(p2pcheck::Pair, doctor::Finding)]) -> Json {
    Json::array(explained.iter().map(|(p, f)| {
        Object::new()
            .value(
                "pair",
                &Json::array([p.src, p.tgt].map(|d| Json::uint(d.into()))),
            )
            .value("finding", &doctor::finding_json(f))
            .finish()
    }))
}

/// `p2pcheck doctor [--json] [--root DIR]`: exit 0, or 1 when a finding breaks peer access,
/// 2 for bad arguments.
fn doctor(it: impl Iterator<Item = OsString>) -> ExitCode {
    let mut json = false;
    let mut root = PathBuf::from("/");
    let mut it = it;
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--json") => json = true,
            Some("--root") => match it.next() {
                Some(dir) if !dir.is_empty() => root = PathBuf::from(dir),
                _ => {
                    eprintln!("p2pcheck: doctor --root needs a folder");
                    return ExitCode::from(2);
                }
            },
            Some("-h" | "--help") => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("p2pcheck: doctor: unknown argument {a:?} (see --help)");
                return ExitCode::from(2);
            }
        }
    }
    let facts = doctor::gather_at(&root, Some(&doctor::NvmlSource::from_env()));
    let findings = doctor::findings(&facts, &[]);
    match json {
        true => println!("{}", doctor::render_json(&facts, &findings)),
        false => print!("{}", doctor::render_table(&facts, &findings)),
    }
    match findings
        .iter()
        .any(|f| f.severity == doctor::Severity::Breaks)
    {
        true => ExitCode::from(1),
        false => ExitCode::SUCCESS,
    }
}

fn main() -> ExitCode {
    let mut argv = std::env::args_os().skip(1).peekable();
    // The CLI doubles as a worker, so it works with no p2pcheck-worker installed beside it.
    if argv.peek().and_then(|a| a.to_str()) == Some(p2pcheck::WORKER_FLAG) {
        return ExitCode::from(p2pcheck::worker_main() as u8);
    }
    p2pcheck::this_executable_is_a_worker();
    if argv.peek().and_then(|a| a.to_str()) == Some("trace-summary") {
        argv.next();
        return trace_summary(argv);
    }
    if argv.peek().and_then(|a| a.to_str()) == Some("doctor") {
        argv.next();
        return doctor(argv);
    }
    // `env` and `exec` take the check's options; exec's command follows `--`.
    let command = match argv.peek().and_then(|a| a.to_str()) {
        Some(c @ ("env" | "exec")) => Some(c == "exec"),
        _ => None,
    };
    let mut argv: Vec<OsString> = argv.collect();
    let mut exec_command = Vec::new();
    if let Some(is_exec) = command {
        argv.remove(0);
        if let Some(i) = argv.iter().position(|a| a == "--") {
            exec_command = argv.split_off(i + 1);
            argv.pop();
        }
        if !is_exec && !exec_command.is_empty() {
            eprintln!("p2pcheck: env takes no command (did you mean exec?)");
            return ExitCode::from(2);
        }
    }
    let args = match parse_args(argv.into_iter()).and_then(|mut a| {
        if let Some(a) = &mut a {
            open_trace(a)?;
        }
        Ok(a)
    }) {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2pcheck: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Some(true) => {
            if args.access.is_some() {
                eprintln!("p2pcheck: exec takes the check's options, not access-check");
                return ExitCode::from(2);
            }
            // No orphans are adopted here: the command this process becomes would inherit
            // the subreaper role and the orphans with it.
            return ExitCode::from(fleet_cli::exec(&args, exec_command));
        }
        Some(false) if args.access.is_some() => {
            eprintln!("p2pcheck: env takes the check's options, not access-check");
            return ExitCode::from(2);
        }
        _ => {}
    }
    // A worker's descendant that escaped its process group becomes ours when the worker dies,
    // and is ended below, once the checks have reaped their workers: nothing started by the
    // check outlives it. (A program of its own may do this; the library never does.)
    let adopted = p2pcheck::program::adopt_orphans();
    let result = match (args.access, command) {
        (Some((src, tgt)), _) => access_check(&args, src, tgt),
        (None, Some(_)) => Ok(fleet_cli::env(&args)),
        (None, None) if args.format.is_fleet() => Ok(fleet_cli::run_fleet(&args)),
        (None, None) => run(&args),
    };
    if adopted.is_ok() {
        for ended in p2pcheck::program::end_adopted_orphans() {
            match ended {
                Ok(pid) => {
                    eprintln!("p2pcheck: warning: killed process {pid}, left behind by a worker")
                }
                Err(why) => eprintln!("p2pcheck: warning: {why}"),
            }
        }
    }
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if args.json {
                println!("{}", Object::new().str("error", &e).finish());
            }
            eprintln!("p2pcheck: could not check: {e}");
            ExitCode::from(2)
        }
    }
}

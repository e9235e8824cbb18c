//! `p2pcheck`: the command-line tool. See `p2pcheck --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use p2pcheck::check::{self, Options, Report, Verdict};
use p2pcheck::protocol::KernelOutcome;
use p2pcheck::sim::{self, Fault, Simulation};
use p2pcheck::{cache, json};

const HELP: &str = "\
p2pcheck - prove which GPU pairs can really reach each other's memory across processes

USAGE:
    p2pcheck [OPTIONS]

Checks every ordered pair (src, tgt) of the visible GPUs the way vLLM's can_actually_p2p does:
a producer process allocates 1 KiB on src and sets it to 1, a consumer process on tgt maps it
through CUDA IPC and sets it to 2, both read it back. It then also checks SM-issued stores and
loads through the mapping (the kernel check; --no-kernel-check turns it off). Prints the matrix
(rows src, columns tgt) of verdicts - ok, FAIL (ran, wrong data or a failed call), HANG (a
worker stopped answering: killed, fresh workers took the remaining pairs), ERROR (a worker died)
- with the driver's own claim (cudaDeviceCanAccessPeer) where it differs, the reason for every
failure, and where the vLLM cache file is. Every wait has a deadline; no worker outlives it.

OPTIONS:
    --json                 Print one JSON object on stdout instead of the table
    --write-vllm-cache     Write vLLM's cache file gpu_p2p_access_cache_for_<CVD>.json with these
                           verdicts (atomically, under a lock), so vLLM never runs its own check
    --cache-dir DIR        Folder of that file [default: $VLLM_CACHE_ROOT, else
                           $XDG_CACHE_HOME/vllm, else ~/.cache/vllm]
    --no-kernel-check      Only vLLM's copy test (memset/memcpy), nothing more
    --timeout SECS         Deadline for each step of a pair; past it the pair is HANG [default: 5]
    --startup-timeout SECS Deadline for the workers to start CUDA [default: 60]
    --worker PATH          The worker executable [default: $P2PCHECK_WORKER, else
                           p2pcheck-worker beside this program, else this program]
    --simulate N           Run on the built-in simulated driver with N GPUs instead of the real
                           one (no GPU needed); CUDA_VISIBLE_DEVICES applies over them. The vLLM
                           cache is then only touched in an explicit --cache-dir
    --fault SRC->TGT:KIND  With --simulate: break pair SRC->TGT (physical ids; repeatable).
                           KIND: ipc-open-fails, drop-writes, corrupt, sm-only, late-visibility,
                           hang, crash, one-way, claim-no (see README)
    --write-sim-lib PATH   Write the simulated driver library to PATH and exit (load it as
                           libcuda/libcudart to test your own code without a GPU)
    -h, --help             Print this help
    -V, --version          Print the version and where the CUDA bindings came from

ENVIRONMENT:
    CUDA_VISIBLE_DEVICES   Passed to the workers unchanged (indices, GPU-/MIG- UUIDs, any order)
    P2PCHECK_LIBCUDA       Path of libcuda to load [default: libcuda.so.1]
    P2PCHECK_LIBCUDART     Path of libcudart to load [default: search, see README]
    P2PCHECK_WORKER        Path of the worker executable
    P2PCHECK_TRACE=1       Print every CUDA call the workers make, with result and duration

EXIT CODES:
    0  every pair works
    1  some pair is not ok: FAIL, HANG or ERROR (the output says which and why)
    2  could not check (no GPU, no driver, bad arguments, a worker failed or timed out)
";

struct Args {
    json: bool,
    write_cache: bool,
    cache_dir: Option<PathBuf>,
    opts: Options,
}

fn seconds(flag: &str, value: Option<String>) -> Result<Duration> {
    let v = value.ok_or_else(|| anyhow!("{flag} needs a number of seconds"))?;
    let s: f64 = v
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0)
        .ok_or_else(|| anyhow!("{flag} {v:?}: expected a positive number of seconds"))?;
    Ok(Duration::from_secs_f64(s))
}

/// Parses the arguments; `Ok(None)` means the work is already done (help, version, sim lib).
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>> {
    let mut args = Args {
        json: false,
        write_cache: false,
        cache_dir: None,
        opts: Options::default(),
    };
    let mut faults: Vec<Fault> = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!(
                    "p2pcheck {} (protocol {}, CUDA bindings {})",
                    env!("CARGO_PKG_VERSION"),
                    p2pcheck::protocol::VERSION,
                    p2pcheck::sys::BINDINGS_SOURCE
                );
                return Ok(None);
            }
            "--json" => args.json = true,
            "--write-vllm-cache" => args.write_cache = true,
            "--no-kernel-check" => args.opts.kernel_check = false,
            "--cache-dir" => {
                args.cache_dir = Some(PathBuf::from(
                    it.next()
                        .ok_or_else(|| anyhow!("--cache-dir needs a folder"))?,
                ))
            }
            "--timeout" => args.opts.step_timeout = seconds("--timeout", it.next())?,
            "--startup-timeout" => {
                args.opts.startup_timeout = seconds("--startup-timeout", it.next())?
            }
            "--worker" => {
                args.opts.worker = Some(PathBuf::from(
                    it.next().ok_or_else(|| anyhow!("--worker needs a path"))?,
                ))
            }
            "--simulate" => {
                let n = it
                    .next()
                    .ok_or_else(|| anyhow!("--simulate needs a GPU count"))?;
                let gpus = n
                    .parse()
                    .map_err(|_| anyhow!("--simulate {n:?}: expected a number of GPUs"))?;
                args.opts.simulate = Some(Simulation {
                    gpus,
                    faults: Vec::new(),
                });
            }
            "--fault" => faults.push(
                it.next()
                    .ok_or_else(|| anyhow!("--fault needs SRC->TGT:KIND"))?
                    .parse()?,
            ),
            "--write-sim-lib" => {
                let path = it
                    .next()
                    .ok_or_else(|| anyhow!("--write-sim-lib needs a path"))?;
                sim::write_library(path.as_ref())?;
                return Ok(None);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    match &mut args.opts.simulate {
        Some(s) => {
            s.faults = faults;
            s.validate()?;
        }
        None if !faults.is_empty() => bail!("--fault needs --simulate"),
        None => {}
    }
    Ok(Some(args))
}

fn kernel_word(k: &KernelOutcome) -> &'static str {
    match k {
        KernelOutcome::NotRun => "not-run",
        KernelOutcome::Ok => "ok",
        KernelOutcome::Failed(_) => "fail",
    }
}

/// Where the vLLM cache file is, and what happened to it.
struct CacheNote {
    path: PathBuf,
    written: bool,
    existing: Option<Result<bool, String>>, // Some(Ok(agrees)) when a readable file was there
}

/// The vLLM cache file for this run; `None` for a simulation without an explicit --cache-dir
/// (simulated verdicts must never land in the real cache by accident).
fn cache_note(args: &Args, report: &Report, verdicts: &[bool]) -> Result<Option<CacheNote>> {
    let n = report.device_count as usize;
    let dir = match (&args.cache_dir, &args.opts.simulate) {
        (Some(d), _) => d.clone(),
        (None, Some(_)) => return Ok(None),
        (None, None) => cache::cache_dir()?,
    };
    let path = p2pcheck::vllm_cache_path_in(&dir, report.device_count);
    // An existing file that cannot be read is reported as unusable, not as absent.
    let existing = match cache::read(&path, n) {
        Ok(file) => file.map(|parsed| parsed.map(|v| v == verdicts)),
        Err(e) => Some(Err(format!("{e:#}"))),
    };
    if args.write_cache {
        cache::store(&path, n, verdicts).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(Some(CacheNote {
        path,
        written: args.write_cache,
        existing,
    }))
}

fn print_table(args: &Args, report: &Report, note: Option<&CacheNote>) {
    let n = report.device_count;
    let cvd = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into());
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
    println!(
        "p2pcheck: {n} visible device(s) (CUDA_VISIBLE_DEVICES={cvd}; {machine}), kernel check {}, \
         {:.2} s, {} worker restart(s)",
        if report.kernel_check { "on" } else { "off" },
        report.elapsed.as_secs_f64(),
        report.restarts
    );
    let cell = |src: u32, tgt: u32| -> String {
        let Some(p) = report.get(src, tgt) else {
            return "-".into();
        };
        let word = match p.verdict() {
            Verdict::Ok => "ok",
            Verdict::Fails(_) => "FAIL",
            Verdict::Hang(_) => "HANG",
            Verdict::Error(_) => "ERROR",
        };
        match p.claim() {
            Some(claim) if claim != p.ok() => {
                format!("{word} (driver: {})", if claim { "yes" } else { "no" })
            }
            _ => word.into(),
        }
    };
    let cells: Vec<Vec<String>> = (0..n)
        .map(|s| (0..n).map(|t| cell(s, t)).collect())
        .collect();
    let width = cells
        .iter()
        .flatten()
        .map(String::len)
        .max()
        .unwrap_or(2)
        .max(4);
    print!("{:>8}", "src\\tgt");
    for t in 0..n {
        print!("  {t:>width$}");
    }
    println!();
    for (s, row) in cells.iter().enumerate() {
        print!("{s:>8}");
        for c in row {
            print!("  {c:>width$}");
        }
        println!();
    }
    let troubled: Vec<_> = report
        .pairs
        .iter()
        .filter(|p| !p.details().is_empty())
        .collect();
    if !troubled.is_empty() {
        println!("details:");
        for p in troubled {
            for d in p.details() {
                println!("  {}->{}: {d}", p.pair.src, p.pair.tgt);
            }
        }
    }
    let Some(note) = note else {
        println!("vLLM cache: not consulted (simulation; give --cache-dir to write one)");
        return;
    };
    let state = match (&note.existing, note.written) {
        (_, true) => "written".to_string(),
        (None, false) => "absent; --write-vllm-cache writes it".into(),
        (Some(Ok(true)), false) => "present, agrees with this run".into(),
        (Some(Ok(false)), false) => {
            "present, DISAGREES with this run; --write-vllm-cache replaces it".into()
        }
        (Some(Err(e)), false) => {
            format!("present but unusable ({e}); --write-vllm-cache replaces it")
        }
    };
    println!("vLLM cache: {} ({state})", note.path.display());
}

fn print_json(args: &Args, report: &Report, note: Option<&CacheNote>) {
    let cvd = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| json::escape(&v))
        .unwrap_or_else(|_| "null".into());
    let opt = |b: Option<bool>| b.map_or("null".to_string(), |b| b.to_string());
    let pairs: Vec<String> = report
        .pairs
        .iter()
        .map(|p| {
            let verdict = p.verdict();
            let details: Vec<String> = p.details().iter().map(|d| json::escape(d)).collect();
            format!(
                "{{\"src\":{},\"tgt\":{},\"ok\":{},\"verdict\":\"{}\",\"reason\":{},\"copy_ok\":{},\"kernel\":\"{}\",\"driver_claim\":{},\"details\":[{}]}}",
                p.pair.src,
                p.pair.tgt,
                p.ok(),
                verdict.word(),
                json::escape(verdict.reason()),
                opt(p.copy_ok()),
                kernel_word(&p.kernel()),
                opt(p.claim()),
                details.join(",")
            )
        })
        .collect();
    let cache = match note {
        None => "null".to_string(),
        Some(note) => {
            let before = match &note.existing {
                None => "\"absent\"".to_string(),
                Some(Ok(true)) => "\"agrees\"".into(),
                Some(Ok(false)) => "\"disagrees\"".into(),
                Some(Err(e)) => json::escape(&format!("unusable: {e}")),
            };
            format!(
                "{{\"path\":{},\"written\":{},\"before\":{before}}}",
                json::escape(&note.path.display().to_string()),
                note.written
            )
        }
    };
    println!(
        "{{\"p2pcheck\":{},\"device_count\":{},\"cuda_visible_devices\":{cvd},\"simulated\":{},\"kernel_check\":{},\"elapsed_s\":{:.3},\"restarts\":{},\"all_ok\":{},\"pairs\":[{}],\"vllm_cache\":{cache}}}",
        json::escape(env!("CARGO_PKG_VERSION")),
        report.device_count,
        args.opts.simulate.is_some(),
        report.kernel_check,
        report.elapsed.as_secs_f64(),
        report.restarts,
        report.pairs.iter().all(|p| p.ok()),
        pairs.join(","),
    );
}

fn run(args: &Args) -> Result<bool> {
    let report = check::run(None, &args.opts)?;
    let verdicts: Vec<bool> = report.pairs.iter().map(|p| p.ok()).collect();
    let note = cache_note(args, &report, &verdicts)?;
    if args.json {
        print_json(args, &report, note.as_ref());
    } else {
        print_table(args, &report, note.as_ref());
    }
    Ok(verdicts.iter().all(|&v| v))
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1).peekable();
    // The CLI doubles as a worker, so it works with no p2pcheck-worker installed beside it.
    if argv.peek().map(String::as_str) == Some(p2pcheck::worker::WORKER_FLAG) {
        return ExitCode::from(p2pcheck::worker::main() as u8);
    }
    let args = match parse_args(argv) {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2pcheck: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            if args.json {
                println!("{{\"error\":{}}}", json::escape(&format!("{e:#}")));
            }
            eprintln!("p2pcheck: could not check: {e:#}");
            ExitCode::from(2)
        }
    }
}

//! The simulated CUDA driver: a machine of N GPUs whose peer paths break on purpose.
//!
//! `csrc/sim.c` is a shared library exporting the libcuda and libcudart functions p2pcheck
//! calls; device memory is host shared memory (one memfd per allocation, so nothing is left in
//! `/dev/shm` however a process dies), IPC handles really cross processes, and the check's
//! kernels run by name. It is embedded in this crate and selected per check with
//! [`crate::Options::simulate`] (`p2pcheck --simulate N --fault SRC->TGT:KIND`), which points the
//! workers' `P2PCHECK_LIBCUDA`/`P2PCHECK_LIBCUDART` at it. Downstream projects can write it out
//! with [`write_library`] (`p2pcheck --write-sim-lib PATH`) and load it in place of libcuda to
//! test their own fallback paths on machines without a GPU. The header comment of `csrc/sim.c`
//! is the reference for its configuration and fault semantics.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use once_cell::sync::OnceCell;

use crate::os;

/// The simulator's bytes, built by `build.rs` from `csrc/sim.c`.
const LIBRARY: &[u8] = include_bytes!(env!("P2PCHECK_SIM_LIB"));

/// The most simulated GPUs (the simulator's own limit).
pub const MAX_GPUS: u32 = 64;

/// How a pair's peer path is broken. Each applies to one ordered pair `src->tgt`: a process on
/// `tgt` accessing memory owned by `src` through a peer mapping, of CUDA IPC or of the cuMem
/// transport (the kinds named `cumem-*` concern the cuMem path alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// `cudaIpcOpenMemHandle` fails, as in a container without a shared IPC namespace.
    IpcOpenFails,
    /// The driver says yes; writes through the mapping vanish.
    DropWrites,
    /// Writes through the mapping land with some bytes changed.
    Corrupt,
    /// Copies and memsets work; SM loads and stores through the mapping do not.
    SmOnly,
    /// A kernel's peer stores become visible only when the kernel ends.
    LateVisibility,
    /// The first access through the mapping never returns.
    Hang,
    /// The process dies on its first access through the mapping.
    Crash,
    /// `src->tgt` broken like drop-writes, `tgt->src` fine.
    OneWay,
    /// The driver says no, but access works.
    ClaimNo,
    /// Writes through the mapping to odd 64 KiB pages vanish; even pages and reads work.
    Partial,
    /// SM stores through the mapping land 4096 bytes further than addressed.
    Shifted,
    /// Bandwidth: timed transfers through the mapping run at the speed of a path through the
    /// host (20 GB/s modelled, against 370 for two GPUs' NVLink); the bytes land.
    Slow,
    /// Bandwidth: timed transfers through the mapping take their modelled time but move
    /// nothing (a fast wrong copy, for the data check to catch).
    FastWrong,
    /// `cuMemExportToShareableHandle` of `src`'s memory fails, and `src` says it does not
    /// support POSIX descriptor handles: every pair from `src` fails on the cuMem path. No
    /// `@once` (the export is made once per device).
    CumemExportFails,
    /// `cuMemImportFromShareableHandle` of `src`'s memory fails on `tgt`.
    CumemImportFails,
    /// `cuMemSetAccess` granting `tgt` access to its mapping of `src`'s memory fails.
    CumemAccessFails,
    /// Writes through a cuMem mapping vanish; the IPC mapping of the same pair works.
    CumemDropWrites,
}

impl FaultKind {
    /// Every kind, in documentation order.
    pub const ALL: [FaultKind; 17] = [
        FaultKind::IpcOpenFails,
        FaultKind::DropWrites,
        FaultKind::Corrupt,
        FaultKind::SmOnly,
        FaultKind::LateVisibility,
        FaultKind::Hang,
        FaultKind::Crash,
        FaultKind::OneWay,
        FaultKind::ClaimNo,
        FaultKind::Partial,
        FaultKind::Shifted,
        FaultKind::Slow,
        FaultKind::FastWrong,
        FaultKind::CumemExportFails,
        FaultKind::CumemImportFails,
        FaultKind::CumemAccessFails,
        FaultKind::CumemDropWrites,
    ];

    /// The name used on the command line and by the simulator.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::IpcOpenFails => "ipc-open-fails",
            FaultKind::DropWrites => "drop-writes",
            FaultKind::Corrupt => "corrupt",
            FaultKind::SmOnly => "sm-only",
            FaultKind::LateVisibility => "late-visibility",
            FaultKind::Hang => "hang",
            FaultKind::Crash => "crash",
            FaultKind::OneWay => "one-way",
            FaultKind::ClaimNo => "claim-no",
            FaultKind::Partial => "partial",
            FaultKind::Shifted => "shifted",
            FaultKind::Slow => "slow",
            FaultKind::FastWrong => "fast-wrong",
            FaultKind::CumemExportFails => "cumem-export-fails",
            FaultKind::CumemImportFails => "cumem-import-fails",
            FaultKind::CumemAccessFails => "cumem-access-fails",
            FaultKind::CumemDropWrites => "cumem-drop-writes",
        }
    }
}

/// One injected fault: `src->tgt:kind[@once]`, in physical simulated GPU ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fault {
    /// The GPU that owns the memory.
    pub src: u32,
    /// The GPU whose process accesses it.
    pub tgt: u32,
    /// What goes wrong.
    pub kind: FaultKind,
    /// `@once`: only in the first attempt at the pair within a check, that is in the one process
    /// that first opens, asks about or accesses `src`'s memory from `tgt` (the pair's consumer in
    /// the check's first round); fresh workers of a retry never see it. Each check fires it
    /// again (its own ledger: see [`Simulation::worker_env`]).
    pub once: bool,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}:{}", self.src, self.tgt, self.kind.name())?;
        if self.once {
            f.write_str("@once")?;
        }
        Ok(())
    }
}

impl FromStr for Fault {
    type Err = Error;

    /// Parses `SRC->TGT:KIND[@once]`, e.g. `0->1:drop-writes` or `0->1:hang@once`.
    fn from_str(s: &str) -> Result<Fault> {
        let kinds = || {
            FaultKind::ALL
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let bad = |why: String| Error::InvalidInput(format!("fault {s:?}: {why}"));
        let (pair, kind) = s
            .split_once(':')
            .ok_or_else(|| bad("expected SRC->TGT:KIND".into()))?;
        let (kind, once) = match kind.split_once('@') {
            None => (kind, false),
            Some((kind, "once")) => (kind, true),
            Some((_, other)) => return Err(bad(format!("unknown modifier @{other} (only @once)"))),
        };
        let (src, tgt) = pair
            .split_once("->")
            .ok_or_else(|| bad("expected SRC->TGT before the colon".into()))?;
        let id = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|e| bad(format!("{t:?} is not a GPU id: {e}")))
        };
        let kind = FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == kind.trim())
            .ok_or_else(|| bad(format!("unknown kind {kind:?} (one of {})", kinds())))?;
        if once && kind == FaultKind::CumemExportFails {
            return Err(bad(
                "cumem-export-fails takes no @once (the export is made once per device)".into(),
            ));
        }
        Ok(Fault {
            src: id(src)?,
            tgt: id(tgt)?,
            kind,
            once,
        })
    }
}

/// A simulated machine: how many GPUs, and which faults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Simulation {
    /// Physical GPUs (`CUDA_VISIBLE_DEVICES` then applies over them as CUDA does).
    pub gpus: u32,
    /// Injected faults.
    pub faults: Vec<Fault>,
}

impl Simulation {
    /// Checks the GPU count and that every fault names existing GPUs.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for more than [`MAX_GPUS`] GPUs, or a fault naming a GPU the
    /// simulated machine does not have.
    pub fn validate(&self) -> Result<()> {
        if self.gpus > MAX_GPUS {
            return Err(Error::InvalidInput(format!(
                "--simulate {}: at most {MAX_GPUS} GPUs",
                self.gpus
            )));
        }
        if let Some(f) = self
            .faults
            .iter()
            .find(|f| f.src >= self.gpus || f.tgt >= self.gpus)
        {
            return Err(Error::InvalidInput(format!(
                "fault {f}: the simulated machine has GPUs 0..{}",
                self.gpus
            )));
        }
        Ok(())
    }

    /// The simulated machine as `/proc/driver/nvidia` would describe it: GPU k has the UUID
    /// the simulator gives it (`csrc/sim.c`), bus id `0000:<k+1>:00.0`, one model; so single-GPU
    /// visibility works on the simulator exactly as on a real machine.
    pub(crate) fn machine(&self) -> crate::fingerprint::Machine {
        crate::fingerprint::Machine {
            driver_version: "simulated".into(),
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            gpus: (0..self.gpus)
                .map(|k| crate::fingerprint::Gpu {
                    bus_id: format!("0000:{:02x}:00.0", k + 1),
                    uuid: format!("GPU-51a00000-0000-0000-0000-{k:012x}"),
                    model: "p2pcheck simulated GPU".into(),
                })
                .collect(),
        }
    }

    /// The environment the workers of one check need to run on this simulation. With `@once`
    /// faults it holds a fresh ledger (an in-memory file the simulator marks a pair's `@once`
    /// faults in when a process claims them), so each check fires them again; keep the
    /// [`WorkerEnv`] until the check's workers have started.
    ///
    /// # Errors
    ///
    /// As [`Simulation::validate`]; [`Error::Simulator`] where the in-memory files cannot be
    /// made.
    pub fn worker_env(&self) -> Result<WorkerEnv> {
        self.validate()?;
        let lib = library_path()?.display().to_string();
        let faults: Vec<String> = self.faults.iter().map(Fault::to_string).collect();
        let mut vars = vec![
            ("P2PCHECK_LIBCUDA", lib.clone()),
            ("P2PCHECK_LIBCUDART", lib),
            ("P2PCHECK_SIM_GPUS", self.gpus.to_string()),
            ("P2PCHECK_SIM_FAULTS", faults.join(",")),
        ];
        let ledger = match self.faults.iter().any(|f| f.once) {
            true => {
                // Zeros: no pair claimed. The simulator sizes it (MAX_GPUS squared u64s).
                let fd = os::memfd(c"p2pcheck-sim-ledger")
                    .map_err(simulator("memfd_create for the ledger"))?;
                vars.push(("P2PCHECK_SIM_LEDGER", proc_path(&fd)));
                Some(fd)
            }
            false => None,
        };
        Ok(WorkerEnv {
            vars,
            _ledger: ledger,
        })
    }
}

/// What the workers of one check on a [`Simulation`] need: their environment, and the ledger
/// of its `@once` faults, which lives as long as this value (the workers open it by a
/// `/proc/<pid>/fd` path when they start).
#[derive(Debug)]
pub struct WorkerEnv {
    /// The variables to set in every worker.
    pub vars: Vec<(&'static str, String)>,
    _ledger: Option<OwnedFd>,
}

/// A `/proc/<pid>/fd/<n>` path to this process's descriptor `fd`, which its children can open.
fn proc_path(fd: &OwnedFd) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())
}

/// A path to the simulator that this process and its children can `dlopen`: an anonymous
/// in-memory file (memfd), named through `/proc/<pid>/fd`, so there is no file to clean up.
///
/// # Errors
///
/// [`Error::Simulator`] where the in-memory file cannot be made or written.
pub fn library_path() -> Result<PathBuf> {
    static MEMFD: OnceCell<OwnedFd> = OnceCell::new();
    let fd = MEMFD.get_or_try_init(|| {
        let fd = os::memfd(c"p2pcheck-sim").map_err(simulator("memfd_create for the simulator"))?;
        let mut file =
            std::fs::File::from(fd.try_clone().map_err(simulator("writing the simulator"))?);
        std::io::Write::write_all(&mut file, LIBRARY)
            .map_err(simulator("writing the simulator"))?;
        Ok::<_, Error>(fd)
    })?;
    Ok(PathBuf::from(proc_path(fd)))
}

/// [`Error::Simulator`] for a failed step `doing`.
fn simulator(doing: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let doing = doing.into();
    move |e| Error::Simulator {
        doing,
        kind: e.kind(),
        text: e.to_string(),
    }
}

/// Writes the simulator library to `path` (for loading in place of libcuda/libcudart): a
/// regular file, created or replaced; a FIFO, a device or a directory there is refused.
///
/// # Errors
///
/// [`Error::Simulator`] where `path` is refused or cannot be written.
pub fn write_library(path: &Path) -> Result<()> {
    use std::io::Write;
    // Only a regular file: a FIFO would block the open (or the write) for ever.
    crate::files::open_regular(
        path,
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true),
    )
    .and_then(|mut f| f.write_all(LIBRARY))
    .map_err(simulator(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_print_round_trip() {
        for kind in FaultKind::ALL {
            let onces: &[bool] = match kind {
                FaultKind::CumemExportFails => &[false],
                _ => &[false, true],
            };
            for &once in onces {
                let text = format!("3->1:{}{}", kind.name(), if once { "@once" } else { "" });
                let f: Fault = text.parse().unwrap();
                assert_eq!(
                    f,
                    Fault {
                        src: 3,
                        tgt: 1,
                        kind,
                        once
                    }
                );
                assert_eq!(f.to_string(), text);
            }
        }
        let spaced: Fault = " 0 -> 2 : hang".parse().unwrap();
        assert_eq!(spaced.to_string(), "0->2:hang");
    }

    #[test]
    fn the_simulator_knows_every_kind() {
        // Its parser's table holds each name as a NUL-terminated string.
        for kind in FaultKind::ALL {
            let name = format!("{}\0", kind.name());
            assert!(
                LIBRARY.windows(name.len()).any(|w| w == name.as_bytes()),
                "{}",
                kind.name()
            );
        }
    }

    #[test]
    fn bad_faults_say_what_is_wrong() {
        for (text, needle) in [
            ("0->1", "SRC->TGT:KIND"),
            ("0-1:hang", "SRC->TGT before"),
            ("a->1:hang", "not a GPU id"),
            ("0->1:melt", "unknown kind"),
            ("0->1:melt", "drop-writes"),
            ("0->1:hang@twice", "only @once"),
            ("0->1:hang@", "only @once"),
            ("0->1:cumem-export-fails@once", "no @once"),
        ] {
            let err = text.parse::<Fault>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn simulations_are_validated() {
        let sim = |gpus, faults: &[&str]| Simulation {
            gpus,
            faults: faults.iter().map(|f| f.parse().unwrap()).collect(),
        };
        assert!(sim(4, &["3->0:hang"]).validate().is_ok());
        assert!(sim(4, &["4->0:hang"]).validate().is_err());
        assert!(sim(65, &[]).validate().is_err());
        let env = sim(2, &["0->1:crash", "1->0:corrupt"])
            .worker_env()
            .unwrap();
        let get = |k| env.vars.iter().find(|(n, _)| *n == k).map(|v| v.1.clone());
        assert_eq!(get("P2PCHECK_SIM_GPUS").unwrap(), "2");
        assert_eq!(
            get("P2PCHECK_SIM_FAULTS").unwrap(),
            "0->1:crash,1->0:corrupt"
        );
        assert_eq!(get("P2PCHECK_LIBCUDA"), get("P2PCHECK_LIBCUDART"));
        // No @once fault: no ledger.
        assert_eq!(get("P2PCHECK_SIM_LEDGER"), None);
        // The path names an in-memory copy of the library: an ELF shared object.
        let bytes = std::fs::read(get("P2PCHECK_LIBCUDA").unwrap()).unwrap();
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(bytes.len(), LIBRARY.len());
    }

    #[test]
    fn each_check_gets_a_fresh_ledger_that_leaves_no_file() {
        let sim = Simulation {
            gpus: 2,
            faults: vec!["0->1:drop-writes@once".parse().unwrap()],
        };
        let ledger = |env: &WorkerEnv| {
            env.vars
                .iter()
                .find(|(n, _)| *n == "P2PCHECK_SIM_LEDGER")
                .map(|v| v.1.clone())
                .unwrap()
        };
        let (a, b) = (sim.worker_env().unwrap(), sim.worker_env().unwrap());
        let (pa, pb) = (ledger(&a), ledger(&b));
        assert_ne!(pa, pb);
        // An in-memory file, all zeros (nothing claimed), readable by path while it lives.
        let target = std::fs::read_link(&pa).unwrap();
        assert!(target
            .to_string_lossy()
            .starts_with("/memfd:p2pcheck-sim-ledger"));
        assert!(std::fs::read(&pa).unwrap().iter().all(|&b| b == 0));
        drop(a);
        assert!(std::fs::metadata(&pa).is_err(), "{pa} outlived its check");
        assert!(std::fs::metadata(&pb).is_ok());
    }
}

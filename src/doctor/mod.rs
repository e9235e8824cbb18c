//! `p2pcheck doctor`: why a GPU pair fails or is slow, and what to change.
//!
//! [`gather`] collects facts about the machine without root where possible and without CUDA
//! (nothing here initialises CUDA):
//!
//! * the PCIe path of each pair of GPUs, from sysfs: the upstream bridges (from the
//!   `/sys/bus/pci/devices/<bus id>` links), the bridge they share, the bridges' ACS capability
//!   and control (config space; only root can read past its first 64 bytes, so without root it
//!   is reported as not readable), IOMMU groups and whether the IOMMU translates (the group's
//!   `type`), the kernel command line's IOMMU and ACS settings;
//! * from NVML (`libnvidia-ml.so.1`, loaded with `dlopen`; absent NVML is reported, not an
//!   error): the NVLink links of each GPU and their state, NVML's P2P status per pair (read,
//!   write, atomics, NVLink), the NVSwitch fabric state, persistence, MIG and compute modes,
//!   the driver version;
//! * the process's PID and IPC namespaces against the host's, container markers, its cgroup,
//!   and `NCCL_P2P_DISABLE`, `NCCL_P2P_LEVEL`, `NCCL_CUMEM_ENABLE`, `CUDA_VISIBLE_DEVICES`.
//!
//! [`findings`] maps those facts, and the failures a check saw ([`observations`] of a
//! [`Report`](crate::Report)), to ranked causes, each tied to the pairs it bears on, with the fix that fits
//! and how to confirm it; [`explain`] gives the top one for each failing pair of a report.
//! [`render_table`] and [`render_json`] print them (the JSON's fields are documented in the
//! README, section "Doctor").
//!
//! Everything is read under a root folder ([`gather_at`]), so that tests stand a recorded
//! sysfs/proc tree in for the machine; every file is read with a size bound and without
//! blocking, and nothing in it can make the doctor panic or hang.

mod host;
mod nvml;
mod pci;
mod render;
mod rules;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::model::Link;
pub use nvml::{Gpu as NvmlGpu, P2pStatus, DEFAULT_LIBRARY as DEFAULT_NVML, LIBRARY_VAR};
pub use render::{finding_json, finding_text, render_json, render_table, JSON_VERSION};
pub use rules::{explain, findings, observations, Finding, Kind, Observation, Severity, Symptom};

use crate::fingerprint;

/// How long NVML may take to answer everything before it is reported as not responding.
const NVML_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the doctor found out about the machine.
#[derive(Clone, Debug)]
pub struct Facts {
    /// The root the files were read under (`/` for the machine itself).
    pub root: PathBuf,
    /// What the GPUs' indices mean.
    pub numbering: Numbering,
    /// The GPUs, by index.
    pub gpus: Vec<Gpu>,
    /// Every bridge above a GPU, once, in the order first met.
    pub bridges: Vec<Bridge>,
    /// Every pair of GPUs (`a < b`).
    pub pairs: Vec<PairFacts>,
    /// The IOMMU as the kernel set it up.
    pub iommu: Iommu,
    /// NVML: which library answered and the driver version, or why there is no NVML.
    pub nvml: Result<Nvml, String>,
    /// The process's namespaces, container, cgroup and environment.
    pub host: Host,
    /// What could not be read, and other things to know about the facts themselves.
    pub notes: Vec<String>,
}

/// What a GPU's index means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Numbering {
    /// CUDA's device ordinals in this process (`CUDA_VISIBLE_DEVICES` applied), the numbering
    /// a check's report uses.
    Cuda,
    /// PCI bus order over every GPU, because CUDA's numbering could not be known without CUDA
    /// (the reason).
    BusOrder(String),
}

/// One GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// Its index (see [`Numbering`]).
    pub index: u32,
    /// PCI bus id, `0000:19:00.0`.
    pub bus_id: String,
    /// `GPU-…`, from `/proc/driver/nvidia` or NVML.
    pub uuid: Option<String>,
    /// The model name, from `/proc/driver/nvidia`.
    pub model: Option<String>,
    /// Its NUMA node (sysfs).
    pub numa_node: Option<i32>,
    /// The host bridge it hangs from, `pci0000:00`.
    pub root_complex: Option<String>,
    /// The bridges above it, the root port first (empty: directly on the host bridge, or not
    /// found in sysfs: see the notes).
    pub upstream: Vec<String>,
    /// Its IOMMU group.
    pub iommu_group: Option<u32>,
    /// The group's domain type: `DMA` and `DMA-FQ` translate, `identity` passes through.
    pub iommu_type: Option<String>,
    /// Whether the IOMMU translates this GPU's DMA (peer traffic included): from the group's
    /// type; no group means no IOMMU in the way; without a type file, from the kernel command
    /// line; `None`: unknown.
    pub iommu_translating: Option<bool>,
    /// What NVML said about it (`None`: no NVML, or NVML does not know it: see the notes).
    pub nvml: Option<NvmlGpu>,
}

/// A bridge (root port or switch port) above a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bridge {
    /// Its PCI bus id.
    pub bus_id: String,
    /// Its ACS capability and control.
    pub acs: Acs,
}

/// A bridge's Access Control Services, from its config space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acs {
    /// Config space past the first 64 bytes could not be read (without root it cannot), or the
    /// file could not be read at all: why.
    Unreadable(String),
    /// The bridge has no ACS capability (so it never redirects peer traffic).
    Absent,
    /// The ACS Capability and Control registers.
    Present {
        /// What the bridge can do (same bits as `control`).
        capability: u16,
        /// What is enabled: bit 0 Source Validation, 1 Translation Blocking, 2 P2P Request
        /// Redirect, 3 P2P Completion Redirect, 4 Upstream Forwarding, 5 P2P Egress Control,
        /// 6 Direct Translated P2P.
        control: u16,
    },
}

impl Acs {
    /// Whether the bridge sends peer traffic up to the root complex (or blocks it): P2P
    /// Request Redirect, P2P Completion Redirect or P2P Egress Control enabled. `None`:
    /// unreadable.
    pub fn redirects(&self) -> Option<bool> {
        match self {
            Acs::Unreadable(_) => None,
            Acs::Absent => Some(false),
            Acs::Present { control, .. } => Some(control & pci::ACS_REDIRECTING != 0),
        }
    }

    /// The control register as `lspci -vvv` prints it: `SrcValid+ TransBlk- ReqRedir+ …`.
    pub fn control_text(&self) -> String {
        match self {
            Acs::Unreadable(why) => format!("not readable ({why})"),
            Acs::Absent => "no ACS capability".into(),
            Acs::Present { control, .. } => pci::ACS_BITS
                .iter()
                .enumerate()
                .map(|(bit, (_, name))| {
                    let on = control & (1 << bit) != 0;
                    format!("{name}{}", if on { '+' } else { '-' })
                })
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// How two GPUs are connected over PCIe, in `nvidia-smi topo -m`'s terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathKind {
    /// Through at most one bridge on each side below a shared bridge (one PCIe switch).
    Pix,
    /// Through several bridges below a shared bridge (cascaded switches).
    Pxb,
    /// No shared bridge: through their host bridge (the CPU's root complex).
    Phb,
    /// Different host bridges of one NUMA node.
    Node,
    /// Different NUMA nodes: across the CPUs' interconnect.
    Sys,
    /// Not known (a GPU not found in sysfs, or NUMA nodes unknown).
    Unknown,
}

impl PathKind {
    /// `PIX`, `PXB`, `PHB`, `NODE`, `SYS`, `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Pix => "PIX",
            PathKind::Pxb => "PXB",
            PathKind::Phb => "PHB",
            PathKind::Node => "NODE",
            PathKind::Sys => "SYS",
            PathKind::Unknown => "unknown",
        }
    }

    /// Whether peer traffic crosses a host bridge (where an IOMMU sits).
    pub fn crosses_host_bridge(self) -> bool {
        matches!(self, PathKind::Phb | PathKind::Node | PathKind::Sys)
    }
}

/// One pair of GPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairFacts {
    /// The two GPUs' indices, `a < b`.
    pub gpus: (u32, u32),
    /// How they are connected over PCIe.
    pub path: PathKind,
    /// The bridge they share (`PIX`, `PXB`) or their host bridge (`PHB`).
    pub common: Option<String>,
    /// The bridges whose ACS settings apply to their peer traffic: below the shared bridge,
    /// or all the way up to the root ports when there is none.
    pub ports: Vec<String>,
    /// NVML's P2P status between them.
    pub nvml: Option<P2pStatus>,
}

impl PairFacts {
    /// Whether NVLink connects them (NVML's NVLink P2P status is OK); `None` without NVML.
    pub fn nvlink(&self) -> Option<bool> {
        self.nvml.map(|s| s.nvlink == 0)
    }
}

impl Facts {
    /// The path between GPUs `a` and `b` for the bandwidth floor ([`Link`]): NVLink when NVML
    /// says the pair's P2P goes over it (the links joining the two directly, else, through
    /// NVSwitch, the fewer active links of the two), else PCIe with the lower generation and
    /// width of the two GPUs' links; [`Link::Unknown`] where NVML cannot say.
    pub fn link(&self, a: u32, b: u32) -> Link {
        if a == b {
            return Link::SameGpu;
        }
        let nvml = |i: u32| self.gpus.get(i as usize).and_then(|g| g.nvml.as_ref());
        let (Some(na), Some(nb)) = (nvml(a), nvml(b)) else {
            return Link::Unknown;
        };
        let pair = self.pairs.iter().find(|p| p.gpus == (a.min(b), a.max(b)));
        if pair.and_then(PairFacts::nvlink) == Some(true) {
            let place = |i: u32| self.gpus.get(i as usize).and_then(|g| pci_place(&g.bus_id));
            let direct = na
                .link_remotes
                .iter()
                .filter(|r| r.is_some() && **r == place(b))
                .count() as u32;
            let active = |g: &NvmlGpu| g.links.iter().filter(|&&up| up).count() as u32;
            if let Some(version) = na.nvlink_version.or(nb.nvlink_version) {
                let links = if direct > 0 {
                    direct
                } else {
                    active(na).min(active(nb))
                };
                return Link::NvLink { version, links };
            }
        }
        match (na.pcie, nb.pcie) {
            (Some((ga, wa)), Some((gb, wb))) => Link::Pcie {
                generation: ga.min(gb),
                width: wa.min(wb),
            },
            _ => Link::Unknown,
        }
    }
}

/// `(domain, bus, device)` of a bus id `dddd:bb:dd.f` (hex), as NVML's `nvmlPciInfo_t` has them.
fn pci_place(bus_id: &str) -> Option<(u32, u32, u32)> {
    let mut parts = bus_id.split([':', '.']);
    let mut next = || u32::from_str_radix(parts.next()?, 16).ok();
    Some((next()?, next()?, next()?))
}

/// The IOMMU as the kernel set it up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iommu {
    /// `sys/class/iommu`: `dmar*` is Intel VT-d, `ivhd*` AMD-Vi.
    pub units: Vec<String>,
    /// The kernel command line's IOMMU, `pci=` and ACS settings (`intel_iommu=on`,
    /// `iommu=pt`, `pcie_acs_override=…`).
    pub cmdline: Vec<String>,
}

impl Iommu {
    /// `intel`, `amd` or `None`, from the IOMMU units' names.
    pub fn vendor(&self) -> Option<&'static str> {
        if self.units.iter().any(|u| u.starts_with("dmar")) {
            Some("intel")
        } else if self.units.iter().any(|u| u.starts_with("ivhd")) {
            Some("amd")
        } else {
            None
        }
    }
}

/// NVML's library and the driver version it gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nvml {
    /// The library loaded.
    pub library: String,
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: Option<String>,
}

/// The process's surroundings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The PID and IPC namespaces.
    pub namespaces: Vec<Namespace>,
    /// Why this looks like a container (empty: nothing says so).
    pub container: Vec<String>,
    /// `/proc/self/cgroup`, line by line.
    pub cgroup: Vec<String>,
    /// `CUDA_VISIBLE_DEVICES`, `CUDA_DEVICE_ORDER`, `NCCL_P2P_DISABLE`, `NCCL_P2P_LEVEL`,
    /// `NCCL_CUMEM_ENABLE`: each one's value, `None` when unset.
    pub env: Vec<(&'static str, Option<String>)>,
}

impl Host {
    /// The value of one of the reported variables.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// One namespace of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// `pid` or `ipc`.
    pub kind: &'static str,
    /// This process's, as `readlink /proc/self/ns/<kind>` prints it: `ipc:[4026531839]`.
    pub this: String,
    /// Process 1's (`unknown (…)` where it cannot be read: it needs root).
    pub init: String,
    /// Whether it is the host's initial namespace (known from its fixed inode number).
    pub host_initial: Option<bool>,
    /// Whether process 1 (in this process's view) has the same one.
    pub same_as_init: Option<bool>,
}

/// Where NVML comes from, and how long it may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmlSource {
    /// The library to `dlopen` (a soname or a path).
    pub library: String,
    /// How long NVML may take to answer everything; past it, it is reported as not
    /// responding (its thread is left behind, blocked in NVML).
    pub timeout: Duration,
}

impl NvmlSource {
    /// `$P2PCHECK_LIBNVML` when set and not empty, else `libnvidia-ml.so.1`; 30 seconds.
    pub fn from_env() -> NvmlSource {
        NvmlSource {
            library: nvml::library_from_env(),
            timeout: NVML_TIMEOUT,
        }
    }
}

/// Gathers the facts about this machine: root `/`, NVML from [`NvmlSource::from_env`].
pub fn gather() -> Facts {
    gather_at(Path::new("/"), Some(&NvmlSource::from_env()))
}

/// Gathers the facts with every file read under `root`, and NVML from `nvml` (`None`: without
/// NVML). Never fails: what cannot be read is a note.
pub fn gather_at(root: &Path, nvml: Option<&NvmlSource>) -> Facts {
    let mut notes = Vec::new();
    let host = host::read(root, |v| std::env::var_os(v));
    let (ids, numbering) = gpu_ids(root, &host, &mut notes);
    let cmdline = match pci::read_text(&root.join("proc/cmdline")) {
        Ok(text) => pci::cmdline_settings(&text),
        Err(e) => {
            notes.push(e);
            Vec::new()
        }
    };
    let iommu = Iommu {
        units: pci::iommu_units(root),
        cmdline,
    };
    let by_cmdline = pci::cmdline_translates(&iommu.cmdline);
    let mut gpus = Vec::new();
    let mut placed = Vec::new();
    for (index, (bus_id, uuid, model)) in ids.into_iter().enumerate() {
        let place = pci::place(root, &bus_id);
        let mut gpu = Gpu {
            index: index as u32,
            bus_id,
            uuid,
            model,
            numa_node: None,
            root_complex: None,
            upstream: Vec::new(),
            iommu_group: None,
            iommu_type: None,
            iommu_translating: None,
            nvml: None,
        };
        match &place {
            Ok(p) => {
                gpu.numa_node = pci::numa_node(&p.dir);
                gpu.root_complex = p.root_complex.clone();
                gpu.upstream = p.upstream.clone();
                gpu.iommu_group = pci::iommu_group(&p.dir);
                if let Some(group) = gpu.iommu_group {
                    match pci::iommu_group_type(root, group) {
                        Ok(t) => gpu.iommu_type = Some(t),
                        Err(e) => notes.push(e),
                    }
                }
                gpu.iommu_translating = match (gpu.iommu_group, gpu.iommu_type.as_deref()) {
                    (None, _) => Some(false),
                    (Some(_), Some("DMA" | "DMA-FQ")) => Some(true),
                    (Some(_), Some("identity")) => Some(false),
                    (Some(_), Some(_)) => None,
                    (Some(_), None) => by_cmdline,
                };
            }
            Err(e) => notes.push(format!("GPU {index} ({}): {e}", gpu.bus_id)),
        }
        gpus.push(gpu);
        placed.push(place.ok());
    }
    let mut bridges: Vec<Bridge> = Vec::new();
    for p in placed.iter().flatten() {
        for bus_id in &p.upstream {
            if bridges.iter().any(|b| &b.bus_id == bus_id) {
                continue;
            }
            // The bridge's folder is the one of its name above the GPU's.
            let dir = p
                .dir
                .ancestors()
                .find(|d| d.file_name().is_some_and(|n| n == bus_id.as_str()));
            bridges.push(match dir {
                Some(dir) => pci::bridge(bus_id, dir),
                None => Bridge {
                    bus_id: bus_id.clone(),
                    acs: Acs::Unreadable(format!("no folder {bus_id} above {}", p.dir.display())),
                },
            });
        }
    }
    let nvml = nvml.map_or(Err("not asked (no NVML library given)".into()), |source| {
        let bus_ids: Vec<String> = gpus.iter().map(|g| g.bus_id.clone()).collect();
        nvml::query(&source.library, &bus_ids, source.timeout)
    });
    let mut pair_status = Vec::new();
    let nvml = nvml.map(|answers| {
        for (gpu, answer) in gpus.iter_mut().zip(answers.gpus) {
            match answer {
                Ok(n) => {
                    if gpu.uuid.is_none() {
                        gpu.uuid = n.uuid.clone();
                    }
                    gpu.nvml = Some(n);
                }
                Err(e) => notes.push(format!("NVML, GPU {} ({}): {e}", gpu.index, gpu.bus_id)),
            }
        }
        pair_status = answers.pairs;
        Nvml {
            library: answers.library,
            driver_version: answers.driver_version,
        }
    });
    let mut pairs = Vec::new();
    for a in 0..gpus.len() {
        for b in a + 1..gpus.len() {
            let (kind, common, ports) = match (&placed[a], &placed[b]) {
                (Some(x), Some(y)) => pci::path(x, y, (gpus[a].numa_node, gpus[b].numa_node)),
                _ => (PathKind::Unknown, None, Vec::new()),
            };
            pairs.push(PairFacts {
                gpus: (a as u32, b as u32),
                path: kind,
                common,
                ports,
                nvml: pair_status
                    .iter()
                    .find(|((i, j), _)| (*i, *j) == (a, b))
                    .map(|(_, s)| *s),
            });
        }
    }
    Facts {
        root: root.to_path_buf(),
        numbering,
        gpus,
        bridges,
        pairs,
        iommu,
        nvml,
        host,
        notes,
    }
}

/// The GPUs (bus id, UUID, model) in the numbering a check uses where it can be known: from
/// `/proc/driver/nvidia` with `CUDA_VISIBLE_DEVICES` applied; else every GPU in bus order,
/// from `/proc/driver/nvidia` or the `nvidia` driver's devices in sysfs.
type GpuId = (String, Option<String>, Option<String>);

fn gpu_ids(root: &Path, host: &Host, notes: &mut Vec<String>) -> (Vec<GpuId>, Numbering) {
    let as_ids = |gpus: Vec<fingerprint::Gpu>| -> Vec<GpuId> {
        gpus.into_iter()
            .map(|g| (g.bus_id, Some(g.uuid), Some(g.model)))
            .collect()
    };
    match fingerprint::read_machine_at(root) {
        Ok(machine) => {
            let cvd = host.var("CUDA_VISIBLE_DEVICES");
            match fingerprint::resolve_visible(cvd, host.var("CUDA_DEVICE_ORDER"), &machine) {
                Ok(visible) => {
                    let hidden = machine.gpus.len() - visible.len();
                    if hidden > 0 {
                        notes.push(format!(
                            "{hidden} of {} GPUs are hidden by CUDA_VISIBLE_DEVICES and not \
                             shown",
                            machine.gpus.len()
                        ));
                    }
                    (as_ids(visible), Numbering::Cuda)
                }
                Err(why) => (as_ids(machine.gpus), Numbering::BusOrder(why)),
            }
        }
        Err(proc_error) => match pci::nvidia_driver_devices(root) {
            Ok(bus_ids) => {
                let why = format!(
                    "GPUs listed from sysfs: {proc_error}; CUDA may number them differently"
                );
                let ids = bus_ids.into_iter().map(|b| (b, None, None)).collect();
                (ids, Numbering::BusOrder(why))
            }
            Err(sys_error) => {
                notes.push(format!("no GPU found: {proc_error}; {sys_error}"));
                (Vec::new(), Numbering::BusOrder("no GPU found".into()))
            }
        },
    }
}

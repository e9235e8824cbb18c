//! From facts (and the failures a check saw) to ranked causes, each with the pairs it bears on,
//! the fix that fits and how to confirm it.

use crate::model::{Class, Pair};
use crate::model::{Report, Verdict};

use super::host::{nccl_level, nccl_p2p_disabled, NCCL_LEVELS};
use super::{Facts, Gpu, Numbering, PairFacts, PathKind};

/// What kind of cause a finding names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// ACS on a bridge of the path redirects peer traffic to the root complex, and/or the
    /// IOMMU translates it: writes through the peer mapping can vanish.
    AcsIommu,
    /// The driver itself says P2P is not supported for the pair (NVML's P2P status).
    DriverP2p,
    /// The NVSwitch fabric is not ready (fabric manager).
    Fabric,
    /// A GPU is in MIG mode, or `CUDA_VISIBLE_DEVICES` names MIG instances.
    Mig,
    /// A GPU's compute mode is exclusive or prohibited.
    ComputeMode,
    /// NVLink links are down.
    NvlinkDown,
    /// The process's PID or IPC namespace is not the host's (a container).
    ContainerNamespaces,
    /// NCCL's environment turns P2P off for some pairs.
    NcclEnv,
    /// Persistence mode is off: every first start-up initialises the GPU again.
    PersistenceOff,
}

impl Kind {
    /// `acs-iommu`, `driver-p2p`, `fabric`, `mig`, `compute-mode`, `nvlink-down`,
    /// `container-namespaces`, `nccl-env`, `persistence-off`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::AcsIommu => "acs-iommu",
            Kind::DriverP2p => "driver-p2p",
            Kind::Fabric => "fabric",
            Kind::Mig => "mig",
            Kind::ComputeMode => "compute-mode",
            Kind::NvlinkDown => "nvlink-down",
            Kind::ContainerNamespaces => "container-namespaces",
            Kind::NcclEnv => "nccl-env",
            Kind::PersistenceOff => "persistence-off",
        }
    }

    /// The failures of a check this kind of cause produces.
    fn explains(self, symptom: Symptom) -> bool {
        use Class::*;
        use Symptom::{Class as C, Error, Hang};
        match self {
            Kind::AcsIommu => matches!(symptom, C(NeverWritten | Partial | Timeout) | Hang),
            Kind::DriverP2p => matches!(symptom, C(OpenFailed | NeverWritten | Other)),
            Kind::Fabric | Kind::Mig | Kind::ComputeMode => {
                matches!(symptom, C(OpenFailed | Other) | Error)
            }
            Kind::NvlinkDown => matches!(symptom, C(Timeout | Partial) | Hang),
            Kind::ContainerNamespaces => matches!(symptom, C(OpenFailed)),
            Kind::NcclEnv | Kind::PersistenceOff => false,
        }
    }
}

/// How much a finding matters, most first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Peer access or the check fails with it.
    Breaks,
    /// It works, slower or not always.
    Degrades,
    /// Worth knowing; harmless on its own.
    Note,
}

impl Severity {
    /// `breaks`, `degrades`, `note`.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Breaks => "breaks",
            Severity::Degrades => "degrades",
            Severity::Note => "note",
        }
    }
}

/// How a pair failed in a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Symptom {
    /// It ran to the end and failed: the diagnosis of its weakest failing tier.
    Class(Class),
    /// A worker stopped answering.
    Hang,
    /// A worker died.
    Error,
}

impl Symptom {
    /// The class's name, or `hang`, `error`.
    pub fn name(self) -> &'static str {
        match self {
            Symptom::Class(c) => c.name(),
            Symptom::Hang => "hang",
            Symptom::Error => "error",
        }
    }
}

/// A pair that failed in a check, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The pair, in the check's numbering (CUDA's).
    pub pair: Pair,
    /// How it failed.
    pub symptom: Symptom,
}

/// One cause, ranked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// 1 for the most likely cause, then 2, ...
    pub rank: u32,
    /// What kind of cause.
    pub kind: Kind,
    /// How much it matters.
    pub severity: Severity,
    /// One line for a person.
    pub title: String,
    /// The GPUs it concerns (empty: the whole host).
    pub gpus: Vec<u32>,
    /// The ordered pairs (src, tgt) it bears on, by GPU index.
    pub pairs: Vec<Pair>,
    /// The failures of the check it explains (empty without a check, or when it explains
    /// none of them).
    pub explains: Vec<Observation>,
    /// The facts it rests on.
    pub facts: Vec<String>,
    /// What to change, the best fit first.
    pub fix: Vec<String>,
    /// How to confirm it, and that the fix worked.
    pub confirm: Vec<String>,
}

/// The failing pairs of a check's report, with how each failed.
pub fn observations(report: &Report) -> Vec<Observation> {
    report
        .pairs
        .iter()
        .filter_map(|p| {
            let symptom = match p.verdict() {
                Verdict::Ok => return None,
                Verdict::Hang(_) => Symptom::Hang,
                Verdict::Error(_) => Symptom::Error,
                Verdict::Fails(_) => Symptom::Class(p.failure()?.1.class()),
            };
            Some(Observation {
                pair: p.pair,
                symptom,
            })
        })
        .collect()
}

/// For each failing pair of `report`, the top-ranked finding that explains it (pairs nothing
/// explains are left out). The facts should be this machine's ([`super::gather`]).
pub fn explain(facts: &Facts, report: &Report) -> Vec<(Pair, Finding)> {
    let observed = observations(report);
    let ranked = findings(facts, &observed);
    observed
        .iter()
        .filter_map(|o| {
            let top = ranked
                .iter()
                .find(|f| f.explains.iter().any(|e| e.pair == o.pair))?;
            Some((o.pair, top.clone()))
        })
        .collect()
}

/// Every finding the facts support, ranked: first those that explain failures the check saw
/// (`observed`), then by severity, then by how many failures and pairs they bear on.
pub fn findings(facts: &Facts, observed: &[Observation]) -> Vec<Finding> {
    let mut out = Vec::new();
    acs_iommu(facts, &mut out);
    driver_p2p(facts, &mut out);
    per_gpu(facts, &mut out);
    nvlink(facts, &mut out);
    container(facts, &mut out);
    nccl(facts, &mut out);
    // A GPU-specific finding can only be matched to the check's pairs when the indices are
    // CUDA's; a host-wide one explains any pair.
    let comparable = facts.numbering == Numbering::Cuda;
    for f in &mut out {
        f.explains = observed
            .iter()
            .filter(|o| f.kind.explains(o.symptom))
            .filter(|o| f.gpus.is_empty() || (comparable && f.pairs.contains(&o.pair)))
            .copied()
            .collect();
    }
    out.sort_by_key(|f| {
        (
            f.explains.is_empty(),
            f.severity,
            std::cmp::Reverse(f.explains.len()),
            std::cmp::Reverse(f.pairs.len()),
            f.kind,
        )
    });
    for (i, f) in out.iter_mut().enumerate() {
        f.rank = i as u32 + 1;
    }
    out
}

/// A finding before ranking.
fn finding(kind: Kind, severity: Severity, title: String, gpus: Vec<u32>) -> Finding {
    Finding {
        rank: 0,
        kind,
        severity,
        title,
        gpus,
        pairs: Vec::new(),
        explains: Vec::new(),
        facts: Vec::new(),
        fix: Vec::new(),
        confirm: Vec::new(),
    }
}

/// A finding about `gpus`, bearing on every pair of them among `n` GPUs.
fn gpu_finding(kind: Kind, severity: Severity, title: String, gpus: &[&Gpu], n: u32) -> Finding {
    let mut f = finding(
        kind,
        severity,
        title,
        gpus.iter().map(|g| g.index).collect(),
    );
    f.pairs = pairs_of(&f.gpus, n);
    f
}

/// Both directions of an unordered pair.
fn both(p: &PairFacts) -> [Pair; 2] {
    let (a, b) = p.gpus;
    [Pair { src: a, tgt: b }, Pair { src: b, tgt: a }]
}

/// Every ordered pair that involves one of `gpus` (the same-GPU pairs included: they run in
/// two processes too), among `n` GPUs.
fn pairs_of(gpus: &[u32], n: u32) -> Vec<Pair> {
    (0..n)
        .flat_map(|src| (0..n).map(move |tgt| Pair { src, tgt }))
        .filter(|p| gpus.contains(&p.src) || gpus.contains(&p.tgt))
        .collect()
}

fn gpu_names(gpus: &[&Gpu]) -> String {
    gpus.iter()
        .map(|g| format!("{} ({})", g.index, g.bus_id))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pair_names(pairs: &[&PairFacts]) -> String {
    pairs
        .iter()
        .map(|p| format!("{}-{}", p.gpus.0, p.gpus.1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pair whose peer traffic ACS or the IOMMU gets in the way of.
struct AcsHit<'a> {
    pair: &'a PairFacts,
    /// Bridges of its path whose ACS redirects.
    redirect: Vec<&'a String>,
    /// Bridges of its path whose ACS cannot be read.
    unknown: Vec<&'a String>,
    /// Whether the IOMMU translates either GPU's traffic.
    translating: Option<bool>,
    severity: Severity,
}

/// ACS and the IOMMU, for the pairs whose peer traffic crosses PCIe bridges (not NVLink).
fn acs_iommu(facts: &Facts, out: &mut Vec<Finding>) {
    let acs = |bus_id: &String| facts.bridges.iter().find(|b| &b.bus_id == bus_id);
    let mut hits: Vec<AcsHit> = Vec::new();
    for p in &facts.pairs {
        if p.nvlink() == Some(true) || p.path == PathKind::Unknown {
            continue;
        }
        let redirect: Vec<&String> = p
            .ports
            .iter()
            .filter(|b| acs(b).and_then(|b| b.acs.redirects()) == Some(true))
            .collect();
        let unknown: Vec<&String> = p
            .ports
            .iter()
            .filter(|b| acs(b).map_or(true, |b| b.acs.redirects().is_none()))
            .collect();
        let translates = |i: u32| facts.gpus.get(i as usize).and_then(|g| g.iommu_translating);
        let (ta, tb) = (translates(p.gpus.0), translates(p.gpus.1));
        let translating = match (ta, tb) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        };
        let severity = match (translating, !redirect.is_empty()) {
            (Some(true), true) => Severity::Breaks,
            (_, true) => Severity::Degrades,
            (Some(true), false) if !unknown.is_empty() || p.path.crosses_host_bridge() => {
                Severity::Degrades
            }
            _ => continue,
        };
        hits.push(AcsHit {
            pair: p,
            redirect,
            unknown,
            translating,
            severity,
        });
    }
    for severity in [Severity::Breaks, Severity::Degrades] {
        let group: Vec<&AcsHit> = hits.iter().filter(|h| h.severity == severity).collect();
        if group.is_empty() {
            continue;
        }
        let pairs: Vec<&PairFacts> = group.iter().map(|h| h.pair).collect();
        let mut gpus: Vec<u32> = pairs.iter().flat_map(|p| [p.gpus.0, p.gpus.1]).collect();
        gpus.sort_unstable();
        gpus.dedup();
        let translating = group.iter().any(|h| h.translating == Some(true));
        let mut redirect: Vec<&String> = group.iter().flat_map(|h| h.redirect.clone()).collect();
        redirect.sort();
        redirect.dedup();
        let mut unknown: Vec<&String> = group.iter().flat_map(|h| h.unknown.clone()).collect();
        unknown.sort();
        unknown.dedup();
        let title = match (translating, redirect.is_empty()) {
            (true, false) => "ACS redirects peer traffic to the root complex and the IOMMU translates it: writes through the peer mapping can vanish".to_string(),
            (false, false) => "ACS redirects peer traffic up to the root complex: slower, and lost where the root complex does not forward peer traffic".to_string(),
            (true, true) if !unknown.is_empty() => "the IOMMU translates peer traffic, and the bridges' ACS settings cannot be read without root: if ACS redirects, writes through the peer mapping vanish".to_string(),
            _ => "peer traffic crosses the root complex, where the IOMMU translates it".to_string(),
        };
        let mut f = finding(Kind::AcsIommu, severity, title, gpus.clone());
        f.pairs = pairs.iter().flat_map(|p| both(p)).collect();
        for p in &pairs {
            f.facts.push(format!(
                "GPUs {}-{}: PCIe path {}{} over bridges {}",
                p.gpus.0,
                p.gpus.1,
                p.path.name(),
                p.common
                    .as_ref()
                    .map_or(String::new(), |c| format!(" (shared: {c})")),
                match p.ports.is_empty() {
                    true => "none".to_string(),
                    false => p.ports.join(", "),
                }
            ));
        }
        if pairs.iter().any(|p| p.nvlink().is_none()) {
            f.facts.push(
                "without NVML it is not known whether NVLink carries these pairs (then none of \
                 this applies)"
                    .into(),
            );
        }
        for b in &redirect {
            if let Some(bridge) = acs(b) {
                f.facts
                    .push(format!("{b}: ACSCtl {}", bridge.acs.control_text()));
            }
        }
        if !unknown.is_empty() {
            f.facts.push(format!(
                "ACS of {} not readable without root",
                unknown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for g in gpus.iter().filter_map(|&i| facts.gpus.get(i as usize)) {
            f.facts.push(format!(
                "GPU {} ({}): IOMMU group {}, {}",
                g.index,
                g.bus_id,
                g.iommu_group.map_or("none".to_string(), |n| n.to_string()),
                match (g.iommu_type.as_deref(), g.iommu_translating) {
                    (Some(t), Some(true)) => format!("type {t}: translating"),
                    (Some(t), Some(false)) => format!("type {t}: not translating"),
                    (Some(t), None) => format!("type {t}"),
                    (None, Some(true)) => "translating (kernel command line)".into(),
                    (None, Some(false)) => "not translating".into(),
                    (None, None) => "translation unknown".into(),
                }
            ));
        }
        if !facts.iommu.cmdline.is_empty() {
            f.facts.push(format!(
                "kernel command line: {}",
                facts.iommu.cmdline.join(" ")
            ));
        }
        if !redirect.is_empty() || !unknown.is_empty() {
            let ports: Vec<&str> = redirect
                .iter()
                .chain(&unknown)
                .map(|s| s.as_str())
                .collect();
            f.fix.push(
                "turn ACS off for the GPUs' PCIe switches in the BIOS (PCIe ACS / ACS Control: \
                 disabled)"
                    .into(),
            );
            f.fix.push(format!(
                "or, until the next reboot, as root: {}",
                ports
                    .iter()
                    .map(|p| format!("setpci -s {p} ECAP_ACS+0x6.w=0000"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
            f.fix.push(format!(
                "or on the kernel command line: pci=disable_acs_redir={}",
                ports.join(";")
            ));
        }
        if translating {
            f.fix.push(match facts.iommu.vendor() {
                Some("amd") => "let the IOMMU pass device DMA through: add iommu=pt (or amd_iommu=off) to the kernel command line, or turn the IOMMU off in the BIOS".into(),
                Some("intel") => "let the IOMMU pass device DMA through: add iommu=pt (with intel_iommu=on) to the kernel command line, or turn VT-d off in the BIOS".into(),
                _ => "let the IOMMU pass device DMA through: add iommu=pt (or iommu.passthrough=1) to the kernel command line, or turn the IOMMU off in the BIOS".into(),
            });
        }
        f.confirm.push(format!(
            "re-run p2pcheck: pairs {} pass",
            pair_names(&pairs)
        ));
        if translating {
            f.confirm.push(
                "cat /sys/kernel/iommu_groups/*/type shows identity for the GPUs' groups".into(),
            );
        }
        if !redirect.is_empty() || !unknown.is_empty() {
            f.confirm.push(format!(
                "sudo lspci -vvv -s {} | grep ACSCtl shows ReqRedir- CmpltRedir- EgressCtrl-",
                redirect
                    .iter()
                    .chain(&unknown)
                    .next()
                    .map_or("", |s| s.as_str())
            ));
        }
        out.push(f);
    }
}

/// A `nvmlGpuP2PStatus_t` in words.
fn p2p_status_name(status: u32) -> &'static str {
    match status {
        0 => "ok",
        1 => "chipset not supported",
        2 => "GPU not supported",
        3 => "IOH topology not supported",
        4 => "disabled by registry key",
        5 => "not supported",
        _ => "unknown",
    }
}

/// The fix for the driver's reason to refuse P2P.
fn p2p_fix(status: u32) -> &'static str {
    match status {
        1 => "the chipset (the CPU's root complex) does not carry peer traffic between these GPUs: put them under one PCIe switch, or connect them with NVLink",
        2 => "these GPUs do not support peer access (the driver turns it off on most consumer GPUs): use GPUs that do, or run without P2P (vLLM: --disable-custom-all-reduce)",
        3 => "the GPUs hang off different root complexes (sockets or host bridges) where the driver does not allow P2P: place them under one socket or PCIe switch, or connect them with NVLink",
        4 => "a registry key of the NVIDIA driver turns P2P off: remove it from NVreg_RegistryDwords (see /proc/driver/nvidia/params and /etc/modprobe.d) and reload the driver",
        _ => "the driver does not support P2P on this path: connect the GPUs with NVLink or put them under one PCIe switch",
    }
}

/// NVML's own P2P answer per pair.
fn driver_p2p(facts: &Facts, out: &mut Vec<Finding>) {
    for p in &facts.pairs {
        let Some(s) = p.nvml else {
            continue;
        };
        let worst = [s.read, s.write].into_iter().find(|&v| v != 0);
        let Some(status) = worst else {
            continue;
        };
        let mut f = finding(
            Kind::DriverP2p,
            Severity::Breaks,
            format!(
                "the driver does not allow P2P between GPUs {} and {}: {}",
                p.gpus.0,
                p.gpus.1,
                p2p_status_name(status)
            ),
            vec![p.gpus.0, p.gpus.1],
        );
        f.pairs = both(p).to_vec();
        f.facts.push(format!(
            "NVML P2P status: read {}, write {}, atomics {}, NVLink {}; PCIe path {}",
            p2p_status_name(s.read),
            p2p_status_name(s.write),
            p2p_status_name(s.atomics),
            p2p_status_name(s.nvlink),
            p.path.name()
        ));
        f.fix.push(p2p_fix(status).into());
        f.confirm
            .push("nvidia-smi topo -p2p rw shows OK for the pair; re-run p2pcheck".into());
        out.push(f);
    }
}

/// MIG, compute mode, persistence and the fabric: one finding each, for every GPU it applies
/// to.
fn per_gpu(facts: &Facts, out: &mut Vec<Finding>) {
    let n = facts.gpus.len() as u32;
    let select = |test: &dyn Fn(&super::NvmlGpu) -> bool| -> Vec<&Gpu> {
        facts
            .gpus
            .iter()
            .filter(|g| g.nvml.as_ref().is_some_and(test))
            .collect()
    };
    let bus = |gpus: &[&Gpu]| {
        gpus.iter()
            .map(|g| g.bus_id.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };

    let mig = select(&|n| n.mig.is_some_and(|(current, _)| current));
    if !mig.is_empty() {
        let mut f = gpu_finding(
            Kind::Mig,
            Severity::Breaks,
            format!(
                "MIG mode is on for GPU {}: P2P between GPUs (PCIe and NVLink) does not work in \
                 MIG mode, nor CUDA IPC across GPU instances",
                gpu_names(&mig)
            ),
            &mig,
            n,
        );
        for g in &mig {
            if let Some((current, pending)) = g.nvml.as_ref().and_then(|n| n.mig) {
                f.facts.push(format!(
                    "GPU {}: MIG current {}, pending {}",
                    g.index,
                    on_off(current),
                    on_off(pending)
                ));
            }
        }
        f.fix.push(format!(
            "turn MIG off: sudo nvidia-smi -i {} -mig 0, then reset the GPU (sudo nvidia-smi -i \
             {} -r) or reboot",
            bus(&mig),
            bus(&mig)
        ));
        f.fix.push(
            "or keep MIG and run the engine without P2P (one GPU instance per engine)".into(),
        );
        f.confirm.push(
            "nvidia-smi --query-gpu=index,pci.bus_id,mig.mode.current,mig.mode.pending \
             --format=csv shows Disabled"
                .into(),
        );
        out.push(f);
    }
    if let Some(cvd) = facts.host.var("CUDA_VISIBLE_DEVICES") {
        if cvd.split(',').any(|e| e.trim().starts_with("MIG-")) {
            let mut f = finding(
                Kind::Mig,
                Severity::Breaks,
                "CUDA_VISIBLE_DEVICES names MIG instances: CUDA IPC across GPU instances and \
                 P2P between them do not work"
                    .into(),
                Vec::new(),
            );
            f.pairs = pairs_of(&(0..n).collect::<Vec<_>>(), n);
            f.facts.push(format!("CUDA_VISIBLE_DEVICES={cvd}"));
            f.fix.push(
                "give each engine whole GPUs (GPU UUIDs or indices in CUDA_VISIBLE_DEVICES), or \
                 run it without P2P"
                    .into(),
            );
            f.confirm
                .push("nvidia-smi -L lists the instances; re-run p2pcheck with whole GPUs".into());
            out.push(f);
        }
    }

    let exclusive = select(&|n| n.compute_mode.is_some_and(|m| m != 0));
    if !exclusive.is_empty() {
        let mut f = gpu_finding(
            Kind::ComputeMode,
            Severity::Breaks,
            format!(
                "compute mode of GPU {} is not Default: a second process cannot use the GPU, \
                 and P2P checks and engines open each GPU from several processes",
                gpu_names(&exclusive)
            ),
            &exclusive,
            n,
        );
        for g in &exclusive {
            let mode = g.nvml.as_ref().and_then(|n| n.compute_mode).unwrap_or(0);
            f.facts.push(format!(
                "GPU {}: compute mode {}",
                g.index,
                compute_mode_name(mode)
            ));
        }
        f.fix
            .push(format!("sudo nvidia-smi -i {} -c DEFAULT", bus(&exclusive)));
        f.confirm.push(
            "nvidia-smi --query-gpu=index,pci.bus_id,compute_mode --format=csv shows Default"
                .into(),
        );
        out.push(f);
    }

    let fabric = select(&|n| {
        n.fabric
            .is_some_and(|(state, status)| state == 1 || state == 2 || (state == 3 && status != 0))
    });
    if !fabric.is_empty() {
        let mut f = gpu_finding(
            Kind::Fabric,
            Severity::Breaks,
            format!(
                "the NVSwitch fabric is not ready for GPU {}: no peer access over NVLink until \
                 the fabric manager has registered it",
                gpu_names(&fabric)
            ),
            &fabric,
            n,
        );
        for g in &fabric {
            if let Some((state, status)) = g.nvml.as_ref().and_then(|n| n.fabric) {
                f.facts.push(format!(
                    "GPU {}: fabric state {}, status {status}",
                    g.index,
                    fabric_state_name(state)
                ));
            }
        }
        let driver = facts
            .nvml
            .as_ref()
            .ok()
            .and_then(|n| n.driver_version.clone())
            .unwrap_or_else(|| "the driver's".into());
        f.fix.push(format!(
            "start NVIDIA Fabric Manager, version {driver} like the driver: sudo systemctl \
             enable --now nvidia-fabricmanager (its log: journalctl -u nvidia-fabricmanager)"
        ));
        f.fix.push("if it is running and the state stays in progress, wait for it; if the status is an error, restart it and then reset the GPUs".into());
        f.confirm.push(format!(
            "nvidia-smi -q -i {} | grep -A 3 -i fabric shows State: Completed, Status: Success",
            bus(&fabric)
        ));
        out.push(f);
    }

    let persistence = select(&|n| n.persistence == Some(false));
    if !persistence.is_empty() {
        let mut f = gpu_finding(
            Kind::PersistenceOff,
            Severity::Note,
            format!(
                "persistence mode is off for GPU {}: whenever no process holds it, the driver \
                 tears the GPU's state down, and the next CUDA start-up (every worker of a \
                 check) sets it up again: slow first start-ups",
                gpu_names(&persistence)
            ),
            &persistence,
            n,
        );
        f.facts.push(format!(
            "persistence mode: disabled on {}",
            bus(&persistence)
        ));
        f.fix.push(
            "sudo systemctl enable --now nvidia-persistenced (or sudo nvidia-smi -pm 1)".into(),
        );
        f.confirm.push(
            "nvidia-smi --query-gpu=index,persistence_mode --format=csv shows Enabled; \
             p2pcheck's start-up gets shorter"
                .into(),
        );
        out.push(f);
    }
}

/// `on` or `off`.
pub(super) fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `nvmlComputeMode_t` in words.
pub(super) fn compute_mode_name(mode: u32) -> &'static str {
    match mode {
        0 => "Default",
        1 => "Exclusive_Thread",
        2 => "Prohibited",
        3 => "Exclusive_Process",
        _ => "unknown",
    }
}

/// `nvmlGpuFabricState_t` in words.
pub(super) fn fabric_state_name(state: u8) -> &'static str {
    match state {
        0 => "not supported",
        1 => "not started",
        2 => "in progress",
        3 => "completed",
        _ => "unknown",
    }
}

/// NVLink links that are down, per GPU: all of them (breaks: no NVLink at all) or some
/// (degrades: less bandwidth).
fn nvlink(facts: &Facts, out: &mut Vec<Finding>) {
    let n = facts.gpus.len() as u32;
    let with_links: Vec<u32> = facts
        .gpus
        .iter()
        .filter(|g| g.nvml.as_ref().is_some_and(|n| !n.links.is_empty()))
        .map(|g| g.index)
        .collect();
    for severity in [Severity::Breaks, Severity::Degrades] {
        let down: Vec<&Gpu> = facts
            .gpus
            .iter()
            .filter(|g| {
                let Some(links) = g.nvml.as_ref().map(|n| &n.links) else {
                    return false;
                };
                let active = links.iter().filter(|&&a| a).count();
                match severity {
                    Severity::Breaks => !links.is_empty() && active == 0,
                    _ => active > 0 && active < links.len(),
                }
            })
            .collect();
        if down.is_empty() {
            continue;
        }
        let what = match severity {
            Severity::Breaks => "every NVLink link is down",
            _ => "some NVLink links are down",
        };
        let mut f = finding(
            Kind::NvlinkDown,
            severity,
            format!(
                "{what} on GPU {}: peer traffic with the other NVLink GPUs is slower, or \
                 falls back to PCIe, or fails",
                gpu_names(&down)
            ),
            down.iter().map(|g| g.index).collect(),
        );
        f.pairs = pairs_of(&f.gpus, n)
            .into_iter()
            .filter(|p| {
                p.src != p.tgt && with_links.contains(&p.src) && with_links.contains(&p.tgt)
            })
            .collect();
        for g in &down {
            if let Some(links) = g.nvml.as_ref().map(|n| &n.links) {
                let inactive: Vec<String> = links
                    .iter()
                    .enumerate()
                    .filter(|(_, &a)| !a)
                    .map(|(i, _)| i.to_string())
                    .collect();
                f.facts.push(format!(
                    "GPU {}: {} of {} links active; inactive: {}",
                    g.index,
                    links.len() - inactive.len(),
                    links.len(),
                    inactive.join(", ")
                ));
            }
        }
        let bus: Vec<&str> = down.iter().map(|g| g.bus_id.as_str()).collect();
        f.fix.push(format!(
            "reset the GPU while idle (sudo nvidia-smi -i {} -r) or reboot; on NVSwitch systems \
             check the fabric manager too",
            bus.join(",")
        ));
        f.fix.push(format!(
            "if links stay down, the NVLink bridge, cable or baseboard needs service: nvidia-smi \
             nvlink -e -i {} shows the error counters",
            bus[0]
        ));
        f.confirm.push(format!(
            "nvidia-smi nvlink -s -i {} lists every link with its speed, none inactive",
            bus[0]
        ));
        out.push(f);
    }
}

/// A PID or IPC namespace of its own: processes in two such containers cannot open each
/// other's CUDA IPC memory.
fn container(facts: &Facts, out: &mut Vec<Finding>) {
    let own: Vec<&super::Namespace> = facts
        .host
        .namespaces
        .iter()
        .filter(|ns| ns.host_initial == Some(false))
        .collect();
    if own.is_empty() {
        return;
    }
    let n = facts.gpus.len() as u32;
    let kinds: Vec<&str> = own.iter().map(|ns| ns.kind).collect();
    let mut f = finding(
        Kind::ContainerNamespaces,
        Severity::Note,
        format!(
            "this process runs in its own {} namespace (a container): processes of two such \
             containers cannot open each other's CUDA IPC memory",
            kinds.join(" and ")
        ),
        Vec::new(),
    );
    f.pairs = pairs_of(&(0..n).collect::<Vec<_>>(), n);
    for ns in &facts.host.namespaces {
        f.facts.push(format!(
            "{} namespace {}{}, process 1's {}",
            ns.kind,
            ns.this,
            match ns.host_initial {
                Some(true) => " (the host's)",
                Some(false) => " (not the host's)",
                None => "",
            },
            ns.init
        ));
    }
    f.facts.extend(facts.host.container.iter().cloned());
    f.fix.push(
        "run every process that shares GPU memory in one container, or share the host's \
         namespaces: docker/podman run --ipc=host --pid=host; Kubernetes: hostIPC: true and \
         hostPID: true in the pod spec"
            .into(),
    );
    f.confirm.push(
        "readlink /proc/self/ns/ipc /proc/self/ns/pid prints the same in every container of \
         the engine (here: "
            .to_string()
            + &facts
                .host
                .namespaces
                .iter()
                .map(|ns| ns.this.clone())
                .collect::<Vec<_>>()
                .join(" ")
            + "); re-run p2pcheck there",
    );
    out.push(f);
}

/// `NCCL_P2P_DISABLE` and `NCCL_P2P_LEVEL`: the pairs NCCL will not use P2P for.
fn nccl(facts: &Facts, out: &mut Vec<Finding>) {
    let host = &facts.host;
    let disable = host.var("NCCL_P2P_DISABLE");
    let level = host.var("NCCL_P2P_LEVEL");
    let n = facts.gpus.len() as u32;
    let all: Vec<u32> = (0..n).collect();
    let (pairs, why, fix): (Vec<Pair>, String, String) = if nccl_p2p_disabled(disable) {
        (
            pairs_of(&all, n)
                .into_iter()
                .filter(|p| p.src != p.tgt)
                .collect(),
            format!("NCCL_P2P_DISABLE={}", disable.unwrap_or_default()),
            "unset NCCL_P2P_DISABLE".into(),
        )
    } else if let Some(value) = level {
        match nccl_level(value) {
            Ok(max) => {
                let off: Vec<&PairFacts> = facts
                    .pairs
                    .iter()
                    .filter(|p| !nccl_allows(p, max))
                    .collect();
                if off.is_empty() {
                    return;
                }
                let needed = off
                    .iter()
                    .map(|p| path_level(p))
                    .max()
                    .unwrap_or(NCCL_LEVELS.len() - 1);
                (
                    off.iter().flat_map(|p| both(p)).collect(),
                    format!(
                        "NCCL_P2P_LEVEL={value}: NCCL uses P2P only up to {}; pairs {} are \
                         further apart",
                        NCCL_LEVELS[max],
                        pair_names(&off)
                    ),
                    format!(
                        "unset NCCL_P2P_LEVEL (NCCL then decides), or set it to {}",
                        NCCL_LEVELS[needed]
                    ),
                )
            }
            Err(why) => {
                let mut f = finding(Kind::NcclEnv, Severity::Note, why, Vec::new());
                f.fix
                    .push("set NCCL_P2P_LEVEL to a name, or unset it".into());
                f.confirm.push(
                    "NCCL_DEBUG=INFO in the engine's log shows the transport of each pair".into(),
                );
                out.push(f);
                return;
            }
        }
    } else {
        return;
    };
    if pairs.is_empty() {
        return;
    }
    let mut f = finding(
        Kind::NcclEnv,
        Severity::Degrades,
        format!("NCCL will not use P2P for some pairs ({why})"),
        Vec::new(),
    );
    f.pairs = pairs;
    f.facts.push(why);
    if let Some(cumem) = host.var("NCCL_CUMEM_ENABLE") {
        f.facts.push(format!("NCCL_CUMEM_ENABLE={cumem}"));
    }
    f.fix.push(fix);
    f.confirm.push(
        "NCCL_DEBUG=INFO in the engine's log shows \"via P2P/IPC\" or \"via P2P/CUMEM\" for \
         these pairs, not \"via SHM\""
            .into(),
    );
    out.push(f);
}

/// The pair's distance as an index into NCCL's levels: NVLink, else its PCIe path (NODE counts
/// as PHB: NCCL has no level between), unknown as SYS.
fn path_level(p: &PairFacts) -> usize {
    if p.nvlink() == Some(true) {
        return 1;
    }
    match p.path {
        PathKind::Pix => 3,
        PathKind::Pxb => 4,
        PathKind::Phb | PathKind::Node => 6,
        PathKind::Sys | PathKind::Unknown => 7,
    }
}

fn nccl_allows(p: &PairFacts, max: usize) -> bool {
    path_level(p) <= max
}

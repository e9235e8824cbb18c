//! The PCIe side, from sysfs and `/proc/cmdline`, without root and without CUDA: where each GPU
//! sits (its upstream bridges, from the `/sys/bus/pci/devices/<bus id>` link), the path between
//! two GPUs, the bridges' ACS settings (from their config space, which only root can read past
//! its first 64 bytes), IOMMU groups and whether the IOMMU translates, and the kernel command
//! line's IOMMU and ACS settings.
//!
//! Every file is read with a size bound and never blocks (see `files::read_bounded`);
//! links are read as text and resolved by hand inside the root, never followed out of it.

use std::path::{Component, Path, PathBuf};

use super::{Acs, Bridge, PathKind};
use crate::files::read_bounded;
use crate::fingerprint::parse_bus_id;

/// The most bytes read from a small sysfs or procfs text file.
pub(super) const MAX_TEXT: u64 = 64 * 1024;

/// A device's whole config space (PCIe: 4 KiB).
const MAX_CONFIG: u64 = 4096;

/// What an unprivileged read of config space gives: the standard header only.
const UNPRIVILEGED_CONFIG: usize = 64;

/// Where extended capabilities start, and the ACS extended capability's id.
const EXT_CAP_START: usize = 0x100;
const EXT_CAP_ACS: u32 = 0x000d;

/// The ACS Control register's bits, lowest first: JSON name and `lspci`'s name.
pub(super) const ACS_BITS: [(&str, &str); 7] = [
    ("source_validation", "SrcValid"),
    ("translation_blocking", "TransBlk"),
    ("p2p_request_redirect", "ReqRedir"),
    ("p2p_completion_redirect", "CmpltRedir"),
    ("upstream_forwarding", "UpstreamFwd"),
    ("p2p_egress_control", "EgressCtrl"),
    ("direct_translated", "DirectTrans"),
];

/// The ACS Control bits that send peer traffic up to the root complex (request and completion
/// redirect) or block it (egress control), instead of letting a switch route it directly.
pub(super) const ACS_REDIRECTING: u16 = 1 << 2 | 1 << 3 | 1 << 5;

/// Components a device's link may have: far above any real PCI hierarchy.
const MAX_DEPTH: usize = 64;

/// One PCI device as sysfs places it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Placed {
    /// `pciDDDD:BB`, the host bridge (root complex) it hangs from.
    pub root_complex: Option<String>,
    /// Its upstream bridges' bus ids, the root port first, its parent last.
    pub upstream: Vec<String>,
    /// Its folder under `sys/devices`, inside the root.
    pub dir: PathBuf,
}

/// Resolves `link`'s target lexically against the folder holding the link, staying inside
/// `root`: `..` never climbs above it, and an absolute target is taken from `root`.
fn resolve_in(root: &Path, link: &Path, target: &Path) -> PathBuf {
    let mut out = match target.is_absolute() {
        true => root.to_path_buf(),
        false => link.parent().unwrap_or(root).to_path_buf(),
    };
    for c in target.components() {
        match c {
            Component::ParentDir => {
                if out != root && out.starts_with(root) {
                    out.pop();
                }
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Where the device `bus_id` sits: its `sys/bus/pci/devices/<bus id>` link names the path from
/// its host bridge through every bridge above it (`../../../devices/pci0000:00/0000:00:01.0/
/// 0000:01:00.0`).
pub(super) fn place(root: &Path, bus_id: &str) -> Result<Placed, String> {
    let link = root.join("sys/bus/pci/devices").join(bus_id);
    let target = std::fs::read_link(&link)
        .map_err(|e| format!("cannot read the link {}: {e}", link.display()))?;
    let mut placed = Placed {
        dir: resolve_in(root, &link, &target),
        ..Placed::default()
    };
    let mut chain = Vec::new();
    for c in target.components().take(MAX_DEPTH + 1) {
        let Some(name) = c.as_os_str().to_str() else {
            continue;
        };
        if parse_bus_id(name).is_some() {
            chain.push(name.to_ascii_lowercase());
        } else if chain.is_empty() && is_host_bridge(name) {
            placed.root_complex = Some(name.to_string());
        }
    }
    if chain.len() > MAX_DEPTH {
        return Err(format!(
            "{}: a path of more than {MAX_DEPTH} devices is not a PCI hierarchy",
            link.display()
        ));
    }
    match chain.pop() {
        Some(last) if last.eq_ignore_ascii_case(bus_id) => {}
        _ => {
            return Err(format!(
                "{} points at {}, not at a device {bus_id}",
                link.display(),
                target.display()
            ))
        }
    }
    placed.upstream = chain;
    Ok(placed)
}

/// `pciDDDD:BB` (a domain of 4 to 8 hex digits): a host bridge's folder under `/sys/devices`.
fn is_host_bridge(name: &str) -> bool {
    name.strip_prefix("pci")
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(domain, bus)| {
            (4..=8).contains(&domain.len())
                && bus.len() == 2
                && [domain, bus]
                    .iter()
                    .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
        })
}

/// A small text file, trimmed; `Err` names the file and why.
pub(super) fn read_text(path: &Path) -> Result<String, String> {
    let bytes = read_bounded(path, MAX_TEXT).map_err(|e| e.to_string())?;
    String::from_utf8(bytes)
        .map(|t| t.trim().to_string())
        .map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

/// The device's NUMA node (`numa_node`; -1, absent or unreadable: `None`).
pub(super) fn numa_node(dir: &Path) -> Option<i32> {
    read_text(&dir.join("numa_node"))
        .ok()?
        .parse()
        .ok()
        .filter(|n| *n >= 0)
}

/// The device's IOMMU group number (`iommu_group` links to `.../iommu_groups/<n>`); `None`
/// where the device has none (no IOMMU).
pub(super) fn iommu_group(dir: &Path) -> Option<u32> {
    let target = std::fs::read_link(dir.join("iommu_group")).ok()?;
    target.file_name()?.to_str()?.parse().ok()
}

/// The group's domain type (`DMA`, `DMA-FQ`, `identity`, `blocked`, `unmanaged`), from
/// `sys/kernel/iommu_groups/<n>/type` (Linux 5.11 and later).
pub(super) fn iommu_group_type(root: &Path, group: u32) -> Result<String, String> {
    let text = read_text(&root.join(format!("sys/kernel/iommu_groups/{group}/type")))?;
    match text.len() <= 32 && text.bytes().all(|b| b.is_ascii_graphic()) {
        true => Ok(text),
        false => Err(format!("group {group}: {text:?} is not a domain type")),
    }
}

/// The ACS capability and control of the bridge in `dir`, from its config space.
pub(super) fn bridge(bus_id: &str, dir: &Path) -> Bridge {
    let acs = match read_bounded(&dir.join("config"), MAX_CONFIG) {
        Ok(bytes) => acs(&bytes),
        Err(e) => Acs::Unreadable(e.to_string()),
    };
    Bridge {
        bus_id: bus_id.to_string(),
        acs,
    }
}

/// ACS from a config space read: walks the extended capabilities for ACS (id 0x000D) and reads
/// its Capability (offset 4) and Control (offset 6) registers.
pub(super) fn acs(config: &[u8]) -> Acs {
    if config.len() <= UNPRIVILEGED_CONFIG {
        return Acs::Unreadable(format!(
            "only {} bytes of config space are readable: not readable without root \
             (CAP_SYS_ADMIN)",
            config.len()
        ));
    }
    let u32_at = |off: usize| {
        config
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut offset = EXT_CAP_START;
    // Each capability is at least 4 bytes, so a chain longer than this loops.
    for _ in 0..(MAX_CONFIG as usize - EXT_CAP_START) / 4 {
        let Some(header) = u32_at(offset) else {
            return Acs::Absent;
        };
        if header == 0 || header == u32::MAX {
            return Acs::Absent;
        }
        if header & 0xffff == EXT_CAP_ACS {
            return match u32_at(offset + 4) {
                Some(regs) => Acs::Present {
                    capability: regs as u16,
                    control: (regs >> 16) as u16,
                },
                None => Acs::Absent,
            };
        }
        let next = (header >> 20) as usize & 0xffc;
        if next < EXT_CAP_START {
            return Acs::Absent;
        }
        offset = next;
    }
    Acs::Absent
}

/// How two GPUs are connected over PCIe, in `nvidia-smi topo`'s terms, from their upstream
/// bridges, host bridges and NUMA nodes; and the bridges whose ACS settings apply to their
/// peer traffic (below the common bridge, or every one up to the root ports when there is none).
pub(super) fn path(
    a: &Placed,
    b: &Placed,
    numa: (Option<i32>, Option<i32>),
) -> (PathKind, Option<String>, Vec<String>) {
    let shared = a
        .upstream
        .iter()
        .zip(&b.upstream)
        .take_while(|(x, y)| x == y)
        .count();
    let (below_a, below_b) = (&a.upstream[shared..], &b.upstream[shared..]);
    let mut ports: Vec<String> = below_a.iter().chain(below_b).cloned().collect();
    ports.dedup();
    if shared > 0 {
        let kind = match below_a.len() <= 1 && below_b.len() <= 1 {
            true => PathKind::Pix,
            false => PathKind::Pxb,
        };
        return (kind, Some(a.upstream[shared - 1].clone()), ports);
    }
    let kind = match (&a.root_complex, &b.root_complex, numa) {
        (Some(x), Some(y), _) if x == y => PathKind::Phb,
        (_, _, (Some(x), Some(y))) if x == y => PathKind::Node,
        (_, _, (Some(_), Some(_))) => PathKind::Sys,
        _ => PathKind::Unknown,
    };
    let common = match kind {
        PathKind::Phb => a.root_complex.clone(),
        _ => None,
    };
    (kind, common, ports)
}

/// The kernel command line's words about the IOMMU and ACS: every `*iommu*` setting, every
/// `pci=` setting, and anything naming ACS (`pcie_acs_override=`).
pub(super) fn cmdline_settings(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter(|w| {
            let key = w.split_once('=').map_or(*w, |(k, _)| k);
            key.contains("iommu") || key == "pci" || key.contains("acs")
        })
        .map(str::to_string)
        .collect()
}

/// What the command line asks of the IOMMU: `Some(false)` when it turns translation off for
/// devices (`iommu=pt`, `iommu.passthrough=1`, `intel_iommu=off`, `amd_iommu=off`,
/// `iommu=off`), `Some(true)` when it turns the IOMMU on without passthrough, `None` when it
/// says nothing (the kernel's default then decides).
pub(super) fn cmdline_translates(settings: &[String]) -> Option<bool> {
    let mut answer = None;
    for s in settings {
        let (key, value) = s.split_once('=').unwrap_or((s, ""));
        let values: Vec<&str> = value.split(',').collect();
        match key {
            "iommu" if values.iter().any(|v| ["pt", "off"].contains(v)) => answer = Some(false),
            "iommu" if values.contains(&"nopt") => answer = answer.or(Some(true)),
            "iommu.passthrough" => {
                answer = Some(!["1", "on", "y", "Y"].contains(&value));
            }
            "intel_iommu" | "amd_iommu" if values.contains(&"off") => answer = Some(false),
            "intel_iommu" if values.contains(&"on") => answer = answer.or(Some(true)),
            _ => {}
        }
    }
    answer
}

/// The IOMMU units the kernel registered (`sys/class/iommu`: `dmar0` Intel VT-d, `ivhd0`
/// AMD-Vi, ...), sorted; at most 256.
pub(super) fn iommu_units(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root.join("sys/class/iommu")) else {
        return Vec::new();
    };
    let mut units: Vec<String> = entries
        .take(256)
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    units.sort();
    units
}

/// The GPUs bound to the `nvidia` driver (`sys/bus/pci/drivers/nvidia/<bus id>`), sorted by bus
/// id; for when `/proc/driver/nvidia` cannot be read.
pub(super) fn nvidia_driver_devices(root: &Path) -> Result<Vec<String>, String> {
    let dir = root.join("sys/bus/pci/drivers/nvidia");
    let entries =
        std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut found: Vec<((u32, u32, u32, u32), String)> = entries
        .take(4096)
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_ascii_lowercase();
            Some((parse_bus_id(&name)?, name))
        })
        .collect();
    found.sort();
    found.dedup();
    Ok(found.into_iter().take(1024).map(|(_, n)| n).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 KiB config space with AER at 0x100, then ACS at 0x148 with `control`.
    fn config_with_acs(control: u16) -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | 1 << 16 | 0x148 << 20).to_le_bytes());
        c[0x148..0x14c].copy_from_slice(&(0x000du32 | 1 << 16).to_le_bytes());
        c[0x14c..0x150].copy_from_slice(&(0x005f | (control as u32) << 16).to_le_bytes());
        c
    }

    #[test]
    fn acs_is_found_after_other_capabilities() {
        assert_eq!(
            acs(&config_with_acs(0x001d)),
            Acs::Present {
                capability: 0x005f,
                control: 0x001d
            }
        );
    }

    #[test]
    fn an_unprivileged_read_is_reported_not_guessed() {
        let c = config_with_acs(0x001d);
        match acs(&c[..64]) {
            Acs::Unreadable(why) => assert!(why.contains("without root"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn broken_capability_chains_end() {
        // A chain pointing at itself, one pointing below 0x100, one past the end, all-ones
        // (a device that is gone), a 256-byte config space, and random bytes.
        let mut looped = vec![0u8; 4096];
        looped[0x100..0x104].copy_from_slice(&(0x0001u32 | 0x100 << 20).to_le_bytes());
        let mut low = vec![0u8; 4096];
        low[0x100..0x104].copy_from_slice(&(0x0001u32 | 0x40 << 20).to_le_bytes());
        let mut end = vec![0u8; 4096];
        end[0x100..0x104].copy_from_slice(&0x000du32.to_le_bytes());
        let short_acs = &end[..0x106];
        for c in [
            &looped[..],
            &low,
            &vec![0xffu8; 4096],
            &vec![0u8; 256],
            short_acs,
        ] {
            assert_eq!(acs(c), Acs::Absent);
        }
        let mut x: u32 = 12345;
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..4096)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = acs(&bytes);
        }
    }

    #[test]
    fn the_path_names_the_common_bridge_and_the_ports_below_it() {
        let placed = |rc: &str, up: &[&str]| Placed {
            root_complex: Some(rc.into()),
            upstream: up.iter().map(|s| s.to_string()).collect(),
            dir: PathBuf::new(),
        };
        let a = placed(
            "pci0000:00",
            &["0000:00:01.0", "0000:01:00.0", "0000:02:08.0"],
        );
        let b = placed(
            "pci0000:00",
            &["0000:00:01.0", "0000:01:00.0", "0000:02:10.0"],
        );
        let (kind, common, ports) = path(&a, &b, (Some(0), Some(0)));
        assert_eq!(kind, PathKind::Pix);
        assert_eq!(common.as_deref(), Some("0000:01:00.0"));
        assert_eq!(ports, ["0000:02:08.0", "0000:02:10.0"]);
        let deep = placed(
            "pci0000:00",
            &[
                "0000:00:01.0",
                "0000:01:00.0",
                "0000:02:10.0",
                "0000:05:00.0",
                "0000:06:00.0",
            ],
        );
        assert_eq!(path(&a, &deep, (None, None)).0, PathKind::Pxb);
        let other_port = placed("pci0000:00", &["0000:00:03.0"]);
        let (kind, common, ports) = path(&a, &other_port, (None, None));
        assert_eq!(
            (kind, common.as_deref()),
            (PathKind::Phb, Some("pci0000:00"))
        );
        assert_eq!(ports.len(), 4);
        let other_rc = placed("pci0000:80", &["0000:80:01.0"]);
        assert_eq!(path(&a, &other_rc, (Some(0), Some(0))).0, PathKind::Node);
        assert_eq!(path(&a, &other_rc, (Some(0), Some(1))).0, PathKind::Sys);
        assert_eq!(path(&a, &other_rc, (None, Some(1))).0, PathKind::Unknown);
    }

    #[test]
    fn the_command_line_says_whether_the_iommu_translates() {
        let s = |line: &str| cmdline_settings(line);
        let line = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet intel_iommu=on iommu=pt \
                    pci=realloc,disable_acs_redir=0000:01:00.0 pcie_acs_override=downstream";
        assert_eq!(
            s(line),
            [
                "intel_iommu=on",
                "iommu=pt",
                "pci=realloc,disable_acs_redir=0000:01:00.0",
                "pcie_acs_override=downstream"
            ]
        );
        assert_eq!(cmdline_translates(&s(line)), Some(false));
        assert_eq!(cmdline_translates(&s("intel_iommu=on")), Some(true));
        assert_eq!(cmdline_translates(&s("amd_iommu=off")), Some(false));
        assert_eq!(cmdline_translates(&s("iommu.passthrough=0")), Some(true));
        assert_eq!(cmdline_translates(&s("iommu.passthrough=1")), Some(false));
        assert_eq!(cmdline_translates(&s("quiet splash")), None);
    }

    #[test]
    fn links_resolve_inside_the_root() {
        let root = Path::new("/fake/root");
        let link = root.join("sys/bus/pci/devices/0000:01:00.0");
        let up = Path::new("../../../../../../../../devices/pci0000:00/0000:01:00.0");
        assert_eq!(
            resolve_in(root, &link, up),
            root.join("devices/pci0000:00/0000:01:00.0")
        );
        assert_eq!(
            resolve_in(root, &link, Path::new("/sys/devices/x")),
            root.join("sys/devices/x")
        );
        assert!(is_host_bridge("pci0000:00") && is_host_bridge("pci10000:e0"));
        assert!(
            !is_host_bridge("pci0000") && !is_host_bridge("pcie:00") && !is_host_bridge("pci:")
        );
    }
}

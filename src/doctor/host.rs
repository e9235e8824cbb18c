//! The process's surroundings: its PID and IPC namespaces (CUDA IPC between two processes needs
//! them shared), whether it runs in a container, its cgroup, and the environment variables that
//! change how GPUs and peer access are used.

use std::ffi::OsString;
use std::path::Path;

use super::pci::read_text;
use super::{Host, Namespace};

/// The inode numbers of the host's initial namespaces (`include/linux/proc_ns.h`: fixed since
/// Linux 3.8), so that "is this the host's namespace" needs no access to another process.
const INITIAL_NAMESPACES: [(&str, u64); 2] = [("pid", 0xEFFF_FFFC), ("ipc", 0xEFFF_FFFF)];

/// The environment variables reported, in this order.
pub(super) const VARIABLES: [&str; 5] = [
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NCCL_P2P_DISABLE",
    "NCCL_P2P_LEVEL",
    "NCCL_CUMEM_ENABLE",
];

/// Words in a cgroup path that container runtimes put there.
const CONTAINER_CGROUPS: [&str; 7] = [
    "docker",
    "kubepods",
    "containerd",
    "libpod",
    "crio",
    "lxc",
    "podman",
];

/// The most cgroup lines kept (cgroup v1 has about a dozen).
const MAX_CGROUP_LINES: usize = 32;

/// Reads the host facts under `root`, with `var` for the environment.
pub(super) fn read(root: &Path, var: impl Fn(&str) -> Option<OsString>) -> Host {
    let namespaces: Vec<Namespace> = INITIAL_NAMESPACES
        .iter()
        .map(|&(kind, initial)| namespace(root, kind, initial))
        .collect();
    let cgroup: Vec<String> = match read_text(&root.join("proc/self/cgroup")) {
        Ok(text) => text
            .lines()
            .take(MAX_CGROUP_LINES)
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut container = Vec::new();
    for marker in [".dockerenv", "run/.containerenv"] {
        if root.join(marker).symlink_metadata().is_ok() {
            container.push(format!("/{marker} exists"));
        }
    }
    if let Some(line) = cgroup.iter().find(|l| {
        let l = l.to_ascii_lowercase();
        CONTAINER_CGROUPS.iter().any(|w| l.contains(w))
    }) {
        container.push(format!("cgroup {line}"));
    }
    for ns in &namespaces {
        if ns.host_initial == Some(false) {
            container.push(format!("{} namespace is not the host's", ns.kind));
        }
    }
    let env = VARIABLES
        .iter()
        .map(|&name| (name, var(name).map(|v| v.to_string_lossy().into_owned())))
        .collect();
    Host {
        namespaces,
        container,
        cgroup,
        env,
    }
}

/// `proc/self/ns/<kind>` against the initial namespace's inode and `proc/1/ns/<kind>`.
fn namespace(root: &Path, kind: &'static str, initial: u64) -> Namespace {
    let link = |pid: &str| {
        std::fs::read_link(root.join("proc").join(pid).join("ns").join(kind))
            .map(|t| t.to_string_lossy().into_owned())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied: another process's namespaces need root".to_string()
                }
                _ => e.to_string(),
            })
    };
    let this = link("self");
    let init = link("1");
    let inode = |text: &str| -> Option<u64> {
        text.strip_prefix(kind)?
            .strip_prefix(":[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    };
    let host_initial = this.as_deref().ok().and_then(inode).map(|i| i == initial);
    let same_as_init = match (&this, &init) {
        (Ok(a), Ok(b)) => Some(a == b),
        _ => None,
    };
    Namespace {
        kind,
        this: this.unwrap_or_else(|e| format!("unknown ({e})")),
        init: init.unwrap_or_else(|e| format!("unknown ({e})")),
        host_initial,
        same_as_init,
    }
}

/// `NCCL_P2P_DISABLE` as NCCL reads it (an integer; not 0 disables P2P).
pub(super) fn nccl_p2p_disabled(value: Option<&str>) -> bool {
    value
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|v| v != 0)
}

/// NCCL's path types in order of distance, as `NCCL_P2P_LEVEL` names them.
pub(super) const NCCL_LEVELS: [&str; 8] = ["LOC", "NVL", "NVB", "PIX", "PXB", "PXN", "PHB", "SYS"];

/// `NCCL_P2P_LEVEL`'s place in [`NCCL_LEVELS`]: a name, or `0` (the one integer whose meaning
/// never changed: never). `Err` says why another value cannot be judged.
pub(super) fn nccl_level(value: &str) -> Result<usize, String> {
    let v = value.trim();
    if v == "0" {
        return Ok(0);
    }
    if let Some(i) = NCCL_LEVELS.iter().position(|l| l.eq_ignore_ascii_case(v)) {
        return Ok(i);
    }
    match v.parse::<u32>() {
        Ok(_) => Err(format!(
            "NCCL_P2P_LEVEL={v}: an integer level's meaning depends on NCCL's version; use a \
             name (LOC, NVL, PIX, PXB, PHB, SYS)"
        )),
        Err(_) => Err(format!("NCCL_P2P_LEVEL={v:?} is not a level NCCL knows")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_values_are_read_as_nccl_reads_them() {
        assert!(nccl_p2p_disabled(Some("1")) && nccl_p2p_disabled(Some(" 2 ")));
        assert!(!nccl_p2p_disabled(Some("0")) && !nccl_p2p_disabled(Some("yes")));
        assert!(!nccl_p2p_disabled(None));
        assert_eq!(nccl_level("pix"), Ok(3));
        assert_eq!(nccl_level("SYS"), Ok(7));
        assert_eq!(nccl_level("0"), Ok(0));
        assert!(nccl_level("3")
            .unwrap_err()
            .contains("depends on NCCL's version"));
        assert!(nccl_level("far").is_err());
    }
}

//! What a pair's path should carry, and the floor under which its measured bandwidth is `slow`.
//!
//! A pair's path is known without CUDA: NVML's NVLink generation and active links per GPU (and
//! which links end at the peer) and the PCIe generation and width of each GPU's link. Its
//! theoretical bandwidth per direction follows from NVIDIA's figures per link; the floor is
//! [`FLOOR_FRACTION`] of it. Sources (README, "Bandwidth"):
//! - NVLink: 20 GB/s per link and direction for NVLink 1 (P100), 25 for NVLink 2, 3 and 4 (V100,
//!   A100, H100/H200: 18 links, 450 GB/s), 50 for NVLink 5 (B200: 18 links, 900 GB/s), from
//!   NVIDIA's data sheets. NVML numbers its versions as an enum (`nvmlNvlinkVersion_t`: 1 = 1.0,
//!   2 = 2.0, 3 = 2.2, 4 = 3.0, 5 = 3.1, 6 = 4.0, 7 = 5.0).
//! - PCIe: 2.5, 5, 8, 16, 32 and 64 GT/s per lane for generations 1 to 6, 8b/10b coded up to
//!   generation 2 and 128b/130b after (PCI-SIG): Gen5 x16 is 63 GB/s per direction.
//! - The floor: Azure's node health check passes an H100/H200 pair from 335 GB/s of
//!   device-to-device copy (`check_gpu_bw 48 335`, azurehpc-health-checks, 0.74 of 450);
//!   measured figures are 371-389 GB/s (0.83-0.86), a path through the host about 37 GB/s. The
//!   default floor, 0.6 of the theory (270 GB/s on H100/H200), flags a pair far below its link
//!   (half its links down, a PCIe or host path) without flagging an ordinary spread; a fleet
//!   that wants Azure's bar gives `--min-gbps 335`.

use std::fmt;

/// The fraction of a path's theoretical bandwidth under which a pair is `slow`.
pub const FLOOR_FRACTION: f64 = 0.6;

/// The path between two GPUs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Link {
    /// One GPU (two processes on it): its own memory, no floor.
    SameGpu,
    /// NVLink of NVML's version `version` (the `nvmlNvlinkVersion_t` enum) with `links` links
    /// the pair's traffic can use: those joining the two GPUs directly, or, through NVSwitch,
    /// the fewer active links of the two.
    NvLink {
        /// NVML's version enum.
        version: u32,
        /// Links in use.
        links: u32,
    },
    /// PCIe: the lower generation and width of the two GPUs' links.
    Pcie {
        /// Generation 1 to 6.
        generation: u32,
        /// Lanes.
        width: u32,
    },
    /// The simulated machine: the simulator models NVLink 4 with 18 links (`csrc/sim.c`).
    Simulated,
    /// Not known (no NVML, or it did not say): figures without a floor.
    Unknown,
}

/// NVLink GB/s per link and direction for NVML's version enum.
fn nvlink_gbps_per_link(version: u32) -> Option<f64> {
    match version {
        1 => Some(20.0),
        2..=6 => Some(25.0),
        7 => Some(50.0),
        _ => None,
    }
}

/// NVML's version enum in words.
fn nvlink_name(version: u32) -> &'static str {
    match version {
        1 => "1.0",
        2 => "2.0",
        3 => "2.2",
        4 => "3.0",
        5 => "3.1",
        6 => "4.0",
        7 => "5.0",
        _ => "?",
    }
}

/// PCIe GB/s per lane and direction for a generation (after line coding).
fn pcie_gbps_per_lane(generation: u32) -> Option<f64> {
    let (gt, coding) = match generation {
        1 => (2.5, 0.8),
        2 => (5.0, 0.8),
        3 => (8.0, 128.0 / 130.0),
        4 => (16.0, 128.0 / 130.0),
        5 => (32.0, 128.0 / 130.0),
        6 => (64.0, 128.0 / 130.0),
        _ => return None,
    };
    Some(gt * coding / 8.0)
}

impl Link {
    /// The path's theoretical bandwidth per direction, GB/s; `None` where there is no floor.
    pub fn theoretical_gbps(&self) -> Option<f64> {
        match *self {
            Link::NvLink { version, links } if links > 0 => {
                nvlink_gbps_per_link(version).map(|g| g * f64::from(links))
            }
            Link::Pcie { generation, width } if width > 0 => {
                pcie_gbps_per_lane(generation).map(|g| g * f64::from(width))
            }
            Link::Simulated => Some(450.0),
            _ => None,
        }
    }

    /// The floor: [`FLOOR_FRACTION`] of the theory.
    pub fn floor_gbps(&self) -> Option<f64> {
        self.theoretical_gbps().map(|g| g * FLOOR_FRACTION)
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Link::SameGpu => f.write_str("same GPU"),
            Link::NvLink { version, links } => {
                write!(f, "NVLink {} x{links}", nvlink_name(version))
            }
            Link::Pcie { generation, width } => write!(f, "PCIe Gen{generation} x{width}"),
            Link::Simulated => f.write_str("simulated NVLink 4.0 x18"),
            Link::Unknown => f.write_str("unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_follow_the_published_figures() {
        let h100 = Link::NvLink {
            version: 6,
            links: 18,
        };
        assert_eq!(h100.theoretical_gbps(), Some(450.0));
        assert_eq!(h100.floor_gbps(), Some(270.0));
        assert_eq!(h100.to_string(), "NVLink 4.0 x18");
        // A100 (NVML answers 5 for NVLink 3.1): 12 links, 300 GB/s per direction.
        let a100 = Link::NvLink {
            version: 5,
            links: 12,
        };
        assert_eq!(a100.theoretical_gbps(), Some(300.0));
        let b200 = Link::NvLink {
            version: 7,
            links: 18,
        };
        assert_eq!(b200.theoretical_gbps(), Some(900.0));
        let gen5 = Link::Pcie {
            generation: 5,
            width: 16,
        }
        .theoretical_gbps()
        .unwrap();
        assert!((gen5 - 63.015).abs() < 0.01, "{gen5}");
        // A host-staged H100 pair (about 37 GB/s measured) is far under NVLink's floor.
        assert!(37.0 < h100.floor_gbps().unwrap());
    }

    #[test]
    fn no_floor_without_knowledge() {
        for link in [
            Link::SameGpu,
            Link::Unknown,
            Link::NvLink {
                version: 0,
                links: 18,
            },
            Link::NvLink {
                version: 6,
                links: 0,
            },
            Link::Pcie {
                generation: 9,
                width: 16,
            },
        ] {
            assert_eq!(link.floor_gbps(), None, "{link:?}");
        }
    }
}

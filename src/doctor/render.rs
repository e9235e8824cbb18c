//! The doctor's output: a table for people, one JSON object for machines (its field names are
//! stable and documented in the README, section "Doctor").

use std::fmt::Write as _;

use super::pci::ACS_BITS;
use super::rules::{compute_mode_name, fabric_state_name, on_off};
use super::{Acs, Facts, Finding, Gpu, Host, Numbering, PairFacts};
use crate::json::{Json, Object};

/// The format version of [`render_json`]'s object (its `doctor` field).
pub const JSON_VERSION: u32 = 1;

fn nvml_json(g: &Gpu) -> Json {
    let Some(n) = &g.nvml else {
        return Json::null();
    };
    let mig = n.mig.map(|(current, pending)| {
        Object::new()
            .bool("current", current)
            .bool("pending", pending)
            .finish()
    });
    let fabric = n.fabric.map(|(state, status)| {
        Object::new()
            .str("state", fabric_state_name(state))
            .int("status", status.into())
            .finish()
    });
    Object::new()
        .opt_bool("persistence", n.persistence)
        .opt_value("mig", mig.as_ref())
        .opt_str("compute_mode", n.compute_mode.map(compute_mode_name))
        .value(
            "nvlinks",
            &Json::array(n.links.iter().map(|&l| Json::bool(l))),
        )
        .opt_value("fabric", fabric.as_ref())
        .value("unavailable", &Json::strings(&n.unavailable))
        .finish()
}

fn acs_json(acs: &Acs) -> Json {
    let mut o = Object::new();
    match acs {
        Acs::Unreadable(why) => o
            .str("state", "unreadable")
            .str("why", why)
            .value("capability", &Json::null())
            .value("control", &Json::null())
            .value("control_bits", &Json::null())
            .value("redirects", &Json::null()),
        Acs::Absent => o
            .str("state", "absent")
            .value("why", &Json::null())
            .value("capability", &Json::null())
            .value("control", &Json::null())
            .value("control_bits", &Json::null())
            .bool("redirects", false),
        Acs::Present {
            capability,
            control,
        } => {
            let mut bits = Object::new();
            for (bit, (name, _)) in ACS_BITS.iter().enumerate() {
                bits.bool(name, control & (1 << bit) != 0);
            }
            o.str("state", "present")
                .value("why", &Json::null())
                .uint("capability", (*capability).into())
                .uint("control", (*control).into())
                .value("control_bits", &bits.finish())
                .opt_bool("redirects", acs.redirects())
        }
    };
    o.finish()
}

/// `[a,b]`: two device numbers.
fn two(a: u32, b: u32) -> Json {
    Json::array([a, b].map(|d| Json::uint(d.into())))
}

/// One finding as a JSON object (an element of [`render_json`]'s `findings`).
pub fn finding_json(f: &Finding) -> Json {
    let pairs = Json::array(f.pairs.iter().map(|p| two(p.src, p.tgt)));
    let explains = Json::array(f.explains.iter().map(|o| {
        Object::new()
            .value("pair", &two(o.pair.src, o.pair.tgt))
            .str("symptom", o.symptom.name())
            .finish()
    }));
    Object::new()
        .uint("rank", f.rank.into())
        .str("kind", f.kind.name())
        .str("severity", f.severity.name())
        .str("title", &f.title)
        .value(
            "gpus",
            &Json::array(f.gpus.iter().map(|&g| Json::uint(g.into()))),
        )
        .value("pairs", &pairs)
        .value("explains", &explains)
        .value("facts", &Json::strings(&f.facts))
        .value("fix", &Json::strings(&f.fix))
        .value("confirm", &Json::strings(&f.confirm))
        .finish()
}

fn gpu_json(g: &Gpu) -> Json {
    Object::new()
        .uint("index", g.index.into())
        .str("bus_id", &g.bus_id)
        .opt_str("uuid", g.uuid.as_deref())
        .opt_str("model", g.model.as_deref())
        .opt_int("numa_node", g.numa_node.map(i64::from))
        .opt_str("root_complex", g.root_complex.as_deref())
        .value("upstream", &Json::strings(&g.upstream))
        .opt_uint("iommu_group", g.iommu_group.map(u64::from))
        .opt_str("iommu_type", g.iommu_type.as_deref())
        .opt_bool("iommu_translating", g.iommu_translating)
        .value("nvml", &nvml_json(g))
        .finish()
}

fn pair_json(p: &PairFacts) -> Json {
    let status = p.nvml.map(|s| {
        Object::new()
            .uint("read", s.read.into())
            .uint("write", s.write.into())
            .uint("atomics", s.atomics.into())
            .uint("nvlink", s.nvlink.into())
            .finish()
    });
    Object::new()
        .value("gpus", &two(p.gpus.0, p.gpus.1))
        .str("path", p.path.name())
        .opt_str("common", p.common.as_deref())
        .value("ports", &Json::strings(&p.ports))
        .opt_bool("nvlink", p.nvlink())
        .opt_value("nvml_p2p", status.as_ref())
        .finish()
}

fn host_json(h: &Host) -> Json {
    let namespaces = Json::array(h.namespaces.iter().map(|ns| {
        Object::new()
            .str("kind", ns.kind)
            .str("this", &ns.this)
            .str("init", &ns.init)
            .opt_bool("host_initial", ns.host_initial)
            .opt_bool("same_as_init", ns.same_as_init)
            .finish()
    }));
    let mut env = Object::new();
    for (k, v) in &h.env {
        env.opt_str(k, v.as_deref());
    }
    Object::new()
        .bool("container", !h.container.is_empty())
        .value("container_evidence", &Json::strings(&h.container))
        .value("namespaces", &namespaces)
        .value("cgroup", &Json::strings(&h.cgroup))
        .value("env", &env.finish())
        .finish()
}

/// The facts and findings as one JSON object on one line.
pub fn render_json(facts: &Facts, findings: &[Finding]) -> String {
    let (numbering, numbering_note) = match &facts.numbering {
        Numbering::Cuda => ("cuda", None),
        Numbering::BusOrder(why) => ("bus-order", Some(why.as_str())),
    };
    let (nvml, nvml_error) = match &facts.nvml {
        Ok(n) => {
            let nvml = Object::new()
                .str("library", &n.library)
                .opt_str("driver_version", n.driver_version.as_deref())
                .finish();
            (Some(nvml), None)
        }
        Err(e) => (None, Some(e.as_str())),
    };
    let iommu = Object::new()
        .value("units", &Json::strings(&facts.iommu.units))
        .opt_str("vendor", facts.iommu.vendor())
        .value("cmdline", &Json::strings(&facts.iommu.cmdline))
        .finish();
    let bridges = facts.bridges.iter().map(|b| {
        Object::new()
            .str("bus_id", &b.bus_id)
            .value("acs", &acs_json(&b.acs))
            .finish()
    });
    Object::new()
        .uint("doctor", JSON_VERSION.into())
        .str("p2pcheck", env!("CARGO_PKG_VERSION"))
        .str("root", &facts.root.display().to_string())
        .str("numbering", numbering)
        .opt_str("numbering_note", numbering_note)
        .opt_value("nvml", nvml.as_ref())
        .opt_str("nvml_error", nvml_error)
        .value("iommu", &iommu)
        .value("host", &host_json(&facts.host))
        .value("gpus", &Json::array(facts.gpus.iter().map(gpu_json)))
        .value("bridges", &Json::array(bridges))
        .value("pairs", &Json::array(facts.pairs.iter().map(pair_json)))
        .value("findings", &Json::array(findings.iter().map(finding_json)))
        .value("notes", &Json::strings(&facts.notes))
        .finish()
        .to_string()
}

/// Rows of cells, each column padded to its widest cell, two spaces apart, indented.
fn columns(rows: &[Vec<String>], indent: &str) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = indent.to_string();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

/// One finding for a person: its rank, severity, kind and title, then what it rests on, the
/// fix and how to confirm it, each line indented by `indent`.
pub fn finding_text(f: &Finding, indent: &str) -> String {
    let mut out = format!(
        "{indent}{}. [{}] {}: {}\n",
        f.rank,
        f.severity.name(),
        f.kind.name(),
        f.title
    );
    let pairs: Vec<String> = f
        .pairs
        .iter()
        .map(|p| format!("{}->{}", p.src, p.tgt))
        .collect();
    if !pairs.is_empty() {
        let _ = writeln!(out, "{indent}   pairs: {}", pairs.join(", "));
    }
    if !f.explains.is_empty() {
        let seen: Vec<String> = f
            .explains
            .iter()
            .map(|o| format!("{} ({})", o.pair, o.symptom.name()))
            .collect();
        let _ = writeln!(out, "{indent}   explains: {}", seen.join(", "));
    }
    for (label, lines) in [("fact", &f.facts), ("fix", &f.fix), ("confirm", &f.confirm)] {
        for l in lines {
            let _ = writeln!(out, "{indent}   {label}: {l}");
        }
    }
    out
}

/// The facts and findings as a table for people.
pub fn render_table(facts: &Facts, findings: &[Finding]) -> String {
    let mut out = String::new();
    let numbering = match (&facts.numbering, facts.gpus.is_empty()) {
        (_, true) => String::new(),
        (Numbering::Cuda, false) => ", numbered as CUDA numbers them in this process".into(),
        (Numbering::BusOrder(why), false) => format!(", numbered in PCI bus order ({why})"),
    };
    let nvml = match &facts.nvml {
        Ok(n) => format!(
            "driver {} ({})",
            n.driver_version.as_deref().unwrap_or("?"),
            n.library
        ),
        Err(e) => format!("not available ({e})"),
    };
    let _ = writeln!(
        out,
        "p2pcheck doctor: {} GPU(s){numbering}; NVML: {nvml}",
        facts.gpus.len()
    );
    let iommu = &facts.iommu;
    let _ = writeln!(
        out,
        "IOMMU units: {}{}; kernel command line: {}",
        match iommu.units.is_empty() {
            true => "none".to_string(),
            false => iommu.units.join(" "),
        },
        iommu.vendor().map_or(String::new(), |v| format!(" ({v})")),
        match iommu.cmdline.is_empty() {
            true => "no IOMMU or ACS settings".to_string(),
            false => iommu.cmdline.join(" "),
        }
    );
    let h = &facts.host;
    let ns: Vec<String> = h
        .namespaces
        .iter()
        .map(|n| {
            let whose = match n.host_initial {
                Some(true) => " (the host's)",
                Some(false) => " (its own)",
                None => "",
            };
            format!("{}{whose}", n.this)
        })
        .collect();
    let _ = writeln!(
        out,
        "host: namespaces {}; container: {}",
        ns.join(" "),
        match h.container.is_empty() {
            true => "none seen".to_string(),
            false => h.container.join("; "),
        }
    );
    let env: Vec<String> = h
        .env
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("<unset>")))
        .collect();
    let _ = writeln!(out, "environment: {}", env.join(" "));
    if !facts.gpus.is_empty() {
        let mut rows = vec![[
            "GPU",
            "bus id",
            "model",
            "NUMA",
            "bridges above",
            "IOMMU",
            "persist",
            "MIG",
            "compute",
            "NVLink",
            "fabric",
        ]
        .map(String::from)
        .to_vec()];
        for g in &facts.gpus {
            let n = g.nvml.as_ref();
            rows.push(vec![
                g.index.to_string(),
                g.bus_id.clone(),
                or_dash(g.model.clone()),
                or_dash(g.numa_node.map(|n| n.to_string())),
                match g.upstream.is_empty() {
                    true => "-".into(),
                    false => g.upstream.join(" > "),
                },
                match (g.iommu_group, &g.iommu_type) {
                    (None, _) => "none".into(),
                    (Some(n), Some(t)) => format!("{n} {t}"),
                    (Some(n), None) => n.to_string(),
                },
                or_dash(n.and_then(|n| n.persistence).map(|p| on_off(p).into())),
                or_dash(n.and_then(|n| n.mig).map(|(c, _)| on_off(c).into())),
                or_dash(
                    n.and_then(|n| n.compute_mode)
                        .map(|m| compute_mode_name(m).into()),
                ),
                or_dash(n.filter(|n| !n.links.is_empty()).map(|n| {
                    let active = n.links.iter().filter(|&&a| a).count();
                    format!("{active}/{} up", n.links.len())
                })),
                or_dash(
                    n.and_then(|n| n.fabric)
                        .map(|(s, _)| fabric_state_name(s).into()),
                ),
            ]);
        }
        out.push_str(&columns(&rows, ""));
    }
    if !facts.bridges.is_empty() {
        out.push_str("bridges (ACS control):\n");
        let rows: Vec<Vec<String>> = facts
            .bridges
            .iter()
            .map(|b| vec![b.bus_id.clone(), b.acs.control_text()])
            .collect();
        out.push_str(&columns(&rows, "  "));
    }
    if !facts.pairs.is_empty() {
        out.push_str("pairs:\n");
        let rows: Vec<Vec<String>> = facts
            .pairs
            .iter()
            .map(|p| {
                vec![
                    format!("{}-{}", p.gpus.0, p.gpus.1),
                    p.path.name().into(),
                    p.common.clone().map_or("-".into(), |c| format!("via {c}")),
                    match p.nvlink() {
                        Some(true) => "NVLink".into(),
                        Some(false) => "no NVLink".into(),
                        None => "NVLink ?".into(),
                    },
                    p.nvml.map_or("NVML P2P ?".into(), |s| {
                        format!(
                            "NVML P2P read {} write {} atomics {}",
                            p2p_word(s.read),
                            p2p_word(s.write),
                            p2p_word(s.atomics)
                        )
                    }),
                ]
            })
            .collect();
        out.push_str(&columns(&rows, "  "));
    }
    match findings.is_empty() {
        true => out.push_str("findings: none\n"),
        false => {
            out.push_str("findings (most likely cause first):\n");
            for f in findings {
                out.push_str(&finding_text(f, "  "));
            }
        }
    }
    if !facts.notes.is_empty() {
        out.push_str("notes:\n");
        for n in &facts.notes {
            let _ = writeln!(out, "  {n}");
        }
    }
    out
}

fn p2p_word(status: u32) -> String {
    match status {
        0 => "ok".into(),
        s => format!("no({s})"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::doctor::{
        Bridge, Host, Iommu, Kind, Namespace, Nvml, NvmlGpu, Observation, P2pStatus, PathKind,
        Severity, Symptom,
    };
    use crate::json::{parse, Value};
    use crate::model::Pair;

    /// Quotes, backslashes, control characters, a JSON-looking tail and non-ASCII.
    const HOSTILE: &str = "q\"b\\n\n\t\u{0}\u{1f}\"},{\"x\":[é€😀\u{2028}";

    fn h() -> String {
        HOSTILE.to_string()
    }

    /// Facts and a finding with [`HOSTILE`] in every text field.
    fn hostile() -> (Facts, Finding) {
        let gpu = Gpu {
            index: 0,
            bus_id: h(),
            uuid: Some(h()),
            model: Some(h()),
            numa_node: Some(-1),
            root_complex: Some(h()),
            upstream: vec![h(), h()],
            iommu_group: Some(7),
            iommu_type: Some(h()),
            iommu_translating: Some(true),
            nvml: Some(NvmlGpu {
                uuid: Some(h()),
                persistence: Some(false),
                mig: Some((true, false)),
                compute_mode: Some(3),
                links: vec![true, false],
                fabric: Some((3, -1)),
                unavailable: vec![h()],
            }),
        };
        let facts = Facts {
            root: PathBuf::from(HOSTILE),
            numbering: Numbering::BusOrder(h()),
            gpus: vec![gpu.clone(), Gpu { index: 1, ..gpu }],
            bridges: vec![
                Bridge {
                    bus_id: h(),
                    acs: Acs::Unreadable(h()),
                },
                Bridge {
                    bus_id: h(),
                    acs: Acs::Present {
                        capability: 0x5f,
                        control: 0x1d,
                    },
                },
            ],
            pairs: vec![PairFacts {
                gpus: (0, 1),
                path: PathKind::Phb,
                common: Some(h()),
                ports: vec![h()],
                nvml: Some(P2pStatus {
                    read: 0,
                    write: 1,
                    atomics: 2,
                    nvlink: 3,
                }),
            }],
            iommu: Iommu {
                units: vec![h()],
                cmdline: vec![h()],
            },
            nvml: Ok(Nvml {
                library: h(),
                driver_version: Some(h()),
            }),
            host: Host {
                namespaces: vec![Namespace {
                    kind: "pid",
                    this: h(),
                    init: h(),
                    host_initial: Some(false),
                    same_as_init: None,
                }],
                container: vec![h()],
                cgroup: vec![h()],
                env: vec![
                    ("CUDA_VISIBLE_DEVICES", Some(h())),
                    ("NCCL_P2P_LEVEL", None),
                ],
            },
            notes: vec![h()],
        };
        let pair = Pair { src: 0, tgt: 1 };
        let finding = Finding {
            rank: 1,
            kind: Kind::AcsIommu,
            severity: Severity::Breaks,
            title: h(),
            gpus: vec![0, 1],
            pairs: vec![pair],
            explains: vec![Observation {
                pair,
                symptom: Symptom::Hang,
            }],
            facts: vec![h()],
            fix: vec![h()],
            confirm: vec![h()],
        };
        (facts, finding)
    }

    /// Every string in `v`, depth first.
    fn strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
            Value::Object(members) => members.iter().for_each(|(_, v)| strings(v, out)),
            _ => {}
        }
    }

    #[test]
    fn hostile_text_in_every_field_still_makes_valid_json() {
        let (mut facts, finding) = hostile();
        let text = render_json(&facts, std::slice::from_ref(&finding));
        let v = parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let mut found = Vec::new();
        strings(&v, &mut found);
        // Every hostile text came through whole: 11 of the machine and host, 8 per GPU, 3 of
        // the bridges, 2 of the pair, 4 of the finding and the note.
        assert_eq!(found.iter().filter(|s| *s == HOSTILE).count(), 37, "{text}");
        // The same with NVML's error instead.
        facts.nvml = Err(h());
        let text = render_json(&facts, &[]);
        assert!(parse(&text).is_ok(), "{text}");
        let finding = finding_json(&finding);
        assert!(parse(finding.as_str()).is_ok(), "{finding}");
    }
}

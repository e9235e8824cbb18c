//! The doctor's output: a table for people, one JSON object for machines (its field names are
//! stable and documented in the README, section "Doctor").

use std::fmt::Write as _;

use super::pci::ACS_BITS;
use super::rules::{compute_mode_name, fabric_state_name, on_off};
use super::{Acs, Facts, Finding, Gpu, Numbering};
use crate::json::escape;

/// The format version of [`render_json`]'s object (its `doctor` field).
pub const JSON_VERSION: u32 = 1;

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("null".into(), |v| v.to_string())
}

fn opt_str(v: Option<&str>) -> String {
    v.map_or("null".into(), escape)
}

fn strings<S: AsRef<str>>(items: &[S]) -> String {
    let items: Vec<String> = items.iter().map(|s| escape(s.as_ref())).collect();
    format!("[{}]", items.join(","))
}

fn nvml_json(g: &Gpu) -> String {
    let Some(n) = &g.nvml else {
        return "null".into();
    };
    let mig = n.mig.map_or("null".into(), |(current, pending)| {
        format!("{{\"current\":{current},\"pending\":{pending}}}")
    });
    let fabric = n.fabric.map_or("null".into(), |(state, status)| {
        format!(
            "{{\"state\":{},\"status\":{status}}}",
            escape(fabric_state_name(state))
        )
    });
    let links: Vec<String> = n.links.iter().map(bool::to_string).collect();
    format!(
        "{{\"persistence\":{},\"mig\":{mig},\"compute_mode\":{},\"nvlinks\":[{}],\"fabric\":{fabric},\"unavailable\":{}}}",
        opt(n.persistence),
        opt_str(n.compute_mode.map(compute_mode_name)),
        links.join(","),
        strings(&n.unavailable)
    )
}

fn acs_json(acs: &Acs) -> String {
    match acs {
        Acs::Unreadable(why) => format!(
            "{{\"state\":\"unreadable\",\"why\":{},\"capability\":null,\"control\":null,\"control_bits\":null,\"redirects\":null}}",
            escape(why)
        ),
        Acs::Absent => "{\"state\":\"absent\",\"why\":null,\"capability\":null,\"control\":null,\"control_bits\":null,\"redirects\":false}".into(),
        Acs::Present {
            capability,
            control,
        } => {
            let bits: Vec<String> = ACS_BITS
                .iter()
                .enumerate()
                .map(|(bit, (name, _))| format!("\"{name}\":{}", control & (1 << bit) != 0))
                .collect();
            format!(
                "{{\"state\":\"present\",\"why\":null,\"capability\":{capability},\"control\":{control},\"control_bits\":{{{}}},\"redirects\":{}}}",
                bits.join(","),
                opt(acs.redirects())
            )
        }
    }
}

/// One finding as a JSON object (an element of [`render_json`]'s `findings`).
pub fn finding_json(f: &Finding) -> String {
    let pairs: Vec<String> = f
        .pairs
        .iter()
        .map(|p| format!("[{},{}]", p.src, p.tgt))
        .collect();
    let explains: Vec<String> = f
        .explains
        .iter()
        .map(|o| {
            format!(
                "{{\"pair\":[{},{}],\"symptom\":\"{}\"}}",
                o.pair.src,
                o.pair.tgt,
                o.symptom.name()
            )
        })
        .collect();
    let gpus: Vec<String> = f.gpus.iter().map(u32::to_string).collect();
    format!(
        "{{\"rank\":{},\"kind\":\"{}\",\"severity\":\"{}\",\"title\":{},\"gpus\":[{}],\"pairs\":[{}],\"explains\":[{}],\"facts\":{},\"fix\":{},\"confirm\":{}}}",
        f.rank,
        f.kind.name(),
        f.severity.name(),
        escape(&f.title),
        gpus.join(","),
        pairs.join(","),
        explains.join(","),
        strings(&f.facts),
        strings(&f.fix),
        strings(&f.confirm)
    )
}

/// The facts and findings as one JSON object on one line.
pub fn render_json(facts: &Facts, findings: &[Finding]) -> String {
    let (numbering, numbering_note) = match &facts.numbering {
        Numbering::Cuda => ("cuda", None),
        Numbering::BusOrder(why) => ("bus-order", Some(why.as_str())),
    };
    let (nvml, nvml_error) = match &facts.nvml {
        Ok(n) => (
            format!(
                "{{\"library\":{},\"driver_version\":{}}}",
                escape(&n.library),
                opt_str(n.driver_version.as_deref())
            ),
            "null".to_string(),
        ),
        Err(e) => ("null".to_string(), escape(e)),
    };
    let gpus: Vec<String> = facts
        .gpus
        .iter()
        .map(|g| {
            format!(
                "{{\"index\":{},\"bus_id\":{},\"uuid\":{},\"model\":{},\"numa_node\":{},\"root_complex\":{},\"upstream\":{},\"iommu_group\":{},\"iommu_type\":{},\"iommu_translating\":{},\"nvml\":{}}}",
                g.index,
                escape(&g.bus_id),
                opt_str(g.uuid.as_deref()),
                opt_str(g.model.as_deref()),
                opt(g.numa_node),
                opt_str(g.root_complex.as_deref()),
                strings(&g.upstream),
                opt(g.iommu_group),
                opt_str(g.iommu_type.as_deref()),
                opt(g.iommu_translating),
                nvml_json(g)
            )
        })
        .collect();
    let bridges: Vec<String> = facts
        .bridges
        .iter()
        .map(|b| {
            format!(
                "{{\"bus_id\":{},\"acs\":{}}}",
                escape(&b.bus_id),
                acs_json(&b.acs)
            )
        })
        .collect();
    let pairs: Vec<String> = facts
        .pairs
        .iter()
        .map(|p| {
            let status = p.nvml.map_or("null".into(), |s| {
                format!(
                    "{{\"read\":{},\"write\":{},\"atomics\":{},\"nvlink\":{}}}",
                    s.read, s.write, s.atomics, s.nvlink
                )
            });
            format!(
                "{{\"gpus\":[{},{}],\"path\":\"{}\",\"common\":{},\"ports\":{},\"nvlink\":{},\"nvml_p2p\":{status}}}",
                p.gpus.0,
                p.gpus.1,
                p.path.name(),
                opt_str(p.common.as_deref()),
                strings(&p.ports),
                opt(p.nvlink())
            )
        })
        .collect();
    let h = &facts.host;
    let namespaces: Vec<String> = h
        .namespaces
        .iter()
        .map(|ns| {
            format!(
                "{{\"kind\":\"{}\",\"this\":{},\"init\":{},\"host_initial\":{},\"same_as_init\":{}}}",
                ns.kind,
                escape(&ns.this),
                escape(&ns.init),
                opt(ns.host_initial),
                opt(ns.same_as_init)
            )
        })
        .collect();
    let env: Vec<String> = h
        .env
        .iter()
        .map(|(k, v)| format!("\"{k}\":{}", opt_str(v.as_deref())))
        .collect();
    let findings: Vec<String> = findings.iter().map(finding_json).collect();
    format!(
        "{{\"doctor\":{JSON_VERSION},\"p2pcheck\":{},\"root\":{},\"numbering\":\"{numbering}\",\"numbering_note\":{},\"nvml\":{nvml},\"nvml_error\":{nvml_error},\"iommu\":{{\"units\":{},\"vendor\":{},\"cmdline\":{}}},\"host\":{{\"container\":{},\"container_evidence\":{},\"namespaces\":[{}],\"cgroup\":{},\"env\":{{{}}}}},\"gpus\":[{}],\"bridges\":[{}],\"pairs\":[{}],\"findings\":[{}],\"notes\":{}}}",
        escape(env!("CARGO_PKG_VERSION")),
        escape(&facts.root.display().to_string()),
        opt_str(numbering_note),
        strings(&facts.iommu.units),
        opt_str(facts.iommu.vendor()),
        strings(&facts.iommu.cmdline),
        !h.container.is_empty(),
        strings(&h.container),
        namespaces.join(","),
        strings(&h.cgroup),
        env.join(","),
        gpus.join(","),
        bridges.join(","),
        pairs.join(","),
        findings.join(","),
        strings(&facts.notes)
    )
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

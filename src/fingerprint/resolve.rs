//! `CUDA_VISIBLE_DEVICES` mapped onto the GPUs `/proc` lists: which GPU each local ordinal
//! is, where that can be known without CUDA.

use super::{Gpu, Machine};
use crate::visible::{self, DeviceSelector, VisibleDevices};

/// Why local ordinals cannot be mapped to GPUs without CUDA, or the mapping.
/// `cvd` is the raw CUDA_VISIBLE_DEVICES value (None = unset).
///
/// Rules (CUDA's): unset = all GPUs in enumeration order; entries are indices into the
/// enumeration, GPU UUIDs or unique UUID prefixes (`GPU-1317` matches if exactly one GPU's uuid
/// starts with it), or MIG ids; whitespace around entries is ignored; the first invalid /
/// out-of-range / repeated / ambiguous / unmatched entry ends the list (it and all later
/// entries ignored); an empty value = no GPU. A GPU named twice, even spelt differently (`0`
/// and its UUID), counts as repeated.
///
/// The enumeration order is taken to be PCI bus order (`device_order` is the raw
/// `CUDA_DEVICE_ORDER`). That is exact with `PCI_BUS_ID`, and also under CUDA's default
/// (`FASTEST_FIRST`) when every GPU is the same model (ties fall back to bus order). When the
/// models differ, `device_order` is not `PCI_BUS_ID` and an in-range index is reached (or the
/// value is unset), the order is unknown without CUDA: `Err`.
///
/// Also `Err`: any MIG entry in the list (a MIG instance is not a whole GPU), and a UUID entry
/// that matches differently when letter case is ignored (whether CUDA ignores case is not
/// known here, so neither answer is safe).
///
/// # Errors
///
/// Why the GPUs cannot be named without CUDA, as above.
pub fn resolve_visible(
    cvd: Option<&str>,
    device_order: Option<&str>,
    machine: &Machine,
) -> Result<Vec<Gpu>, String> {
    let gpus = &machine.gpus;
    let bus_order_is_cuda_order = device_order == Some("PCI_BUS_ID")
        || gpus.windows(2).all(|pair| pair[0].model == pair[1].model);
    let order_unknown = |why: String| {
        let mut models: Vec<&str> = Vec::new();
        for gpu in gpus {
            if !models.contains(&gpu.model.as_str()) {
                models.push(&gpu.model);
            }
        }
        format!(
            "{why}, but this machine mixes GPU models ({}) and CUDA_DEVICE_ORDER is not \
             PCI_BUS_ID: CUDA then puts the fastest first, an order not known without CUDA",
            models.join(", ")
        )
    };
    let selectors = match visible::parse(cvd).devices {
        VisibleDevices::Unset if bus_order_is_cuda_order => return Ok(gpus.clone()),
        VisibleDevices::Unset => {
            return Err(order_unknown(
                "CUDA_VISIBLE_DEVICES is unset, so all GPUs are visible in CUDA's order".into(),
            ))
        }
        VisibleDevices::List(selectors) => selectors,
    };
    if let Some(mig) = selectors.iter().find_map(|s| match s {
        DeviceSelector::Mig(mig) => Some(mig),
        _ => None,
    }) {
        return Err(format!(
            "{mig} in CUDA_VISIBLE_DEVICES: a MIG instance is not a whole GPU, and which GPU \
             it belongs to is not known without CUDA"
        ));
    }
    let mut chosen: Vec<usize> = Vec::new();
    for selector in &selectors {
        let found = match selector {
            DeviceSelector::Index(i) => match usize::try_from(*i) {
                // Out of range ends the list whatever the order, so only an index in range
                // needs the order to be known.
                Ok(i) if i < gpus.len() => {
                    if !bus_order_is_cuda_order {
                        return Err(order_unknown(format!(
                            "CUDA_VISIBLE_DEVICES entry {i} is an index into CUDA's order"
                        )));
                    }
                    Some(i)
                }
                _ => None,
            },
            DeviceSelector::Uuid(prefix) => match_uuid(prefix, gpus)?,
            // Refused above; ending the list here keeps this arm harmless.
            DeviceSelector::Mig(_) => None,
        };
        match found {
            Some(g) if !chosen.contains(&g) => chosen.push(g),
            _ => break,
        }
    }
    Ok(chosen.into_iter().map(|g| gpus[g].clone()).collect())
}

/// The one GPU whose UUID starts with `prefix` (`GPU-` included), `None` when none or several
/// do, or `Err` when ignoring letter case would change the answer.
fn match_uuid(prefix: &str, gpus: &[Gpu]) -> Result<Option<usize>, String> {
    let matching = |fold: bool| -> Vec<usize> {
        (0..gpus.len())
            .filter(|&g| {
                let uuid = &gpus[g].uuid;
                if fold {
                    uuid.len() >= prefix.len()
                        && uuid.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
                } else {
                    uuid.starts_with(prefix)
                }
            })
            .collect()
    };
    let exact = matching(false);
    if matching(true) != exact {
        return Err(format!(
            "CUDA_VISIBLE_DEVICES entry {prefix} matches this machine's GPU UUIDs differently \
             when letter case is ignored, and whether CUDA ignores case is not known here"
        ));
    }
    Ok(match exact[..] {
        [g] => Some(g),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::fixtures::*;

    /// `resolve_visible` on `m`, as indices into `m.gpus`.
    fn pick(cvd: Option<&str>, order: Option<&str>, m: &Machine) -> Result<Vec<usize>, String> {
        let gpus = resolve_visible(cvd, order, m)?;
        Ok(gpus
            .iter()
            .map(|g| m.gpus.iter().position(|h| h == g).unwrap())
            .collect())
    }

    #[test]
    fn cuda_visible_devices_indices() {
        let m = four();
        let p = |cvd| pick(cvd, None, &m);
        assert_eq!(p(None), Ok(vec![0, 1, 2, 3]));
        assert_eq!(p(Some("")), Ok(vec![]));
        assert_eq!(p(Some("  ")), Ok(vec![]));
        assert_eq!(p(Some("0")), Ok(vec![0]));
        assert_eq!(p(Some("1,0")), Ok(vec![1, 0]));
        assert_eq!(p(Some("2,0")), Ok(vec![2, 0]));
        assert_eq!(p(Some(" 3 ,\t1 ")), Ok(vec![3, 1]));
        assert_eq!(p(Some("0,0")), Ok(vec![0]));
        assert_eq!(p(Some("0,1,0,2")), Ok(vec![0, 1]));
        assert_eq!(p(Some("0,zz,1")), Ok(vec![0]));
        assert_eq!(p(Some("-1")), Ok(vec![]));
        assert_eq!(p(Some("-1,0")), Ok(vec![]));
        assert_eq!(p(Some("7")), Ok(vec![]));
        assert_eq!(p(Some("1,7,0")), Ok(vec![1]));
        assert_eq!(p(Some("4294967295")), Ok(vec![]));
        assert_eq!(p(Some("0,1,")), Ok(vec![0, 1]));
        assert_eq!(pick(Some("0"), None, &machine(vec![])), Ok(vec![]));
        assert_eq!(pick(None, None, &machine(vec![])), Ok(vec![]));
    }

    #[test]
    fn cuda_visible_devices_uuids_and_prefixes() {
        let m = four();
        let p = |cvd: &str| pick(Some(cvd), None, &m);
        let uuid = |i: usize| m.gpus[i].uuid.clone();
        assert_eq!(p(&format!("{},{}", uuid(3), uuid(1))), Ok(vec![3, 1]));
        assert_eq!(p(&format!("2, {} ,0", uuid(3))), Ok(vec![2, 3, 0]));
        // Unique prefixes.
        assert_eq!(p("GPU-aaf"), Ok(vec![2]));
        assert_eq!(p("GPU-13170708-7,GPU-5"), Ok(vec![0, 3]));
        // Ambiguous (0 and 1) or unmatched prefixes end the list.
        assert_eq!(p("GPU-1317"), Ok(vec![]));
        assert_eq!(p("3,GPU-13170708-,2"), Ok(vec![3]));
        assert_eq!(p("1,GPU-ffff,2"), Ok(vec![1]));
        assert_eq!(p(&format!("{}0", uuid(0))), Ok(vec![]));
        // The same GPU spelt twice is a repeat.
        assert_eq!(p(&format!("0,{},1", uuid(0))), Ok(vec![0]));
        assert_eq!(p("GPU-aaf,2,3"), Ok(vec![2]));
        assert_eq!(p("GPU-5e,GPU-5e1d,1"), Ok(vec![3]));
        // Whether CUDA ignores letter case is unknown, so a match that depends on it is refused.
        assert_eq!(
            p("GPU-AAF244DA"),
            Err(
                "CUDA_VISIBLE_DEVICES entry GPU-AAF244DA matches this machine's GPU UUIDs differently \
                 when letter case is ignored, and whether CUDA ignores case is not known here"
                    .into()
            )
        );
        // Upper-case letters that match nothing either way end the list as usual.
        assert_eq!(p("2,GPU-BBB,3"), Ok(vec![2]));
        assert_eq!(
            p("0,GPU-5E1D"),
            Err(
                "CUDA_VISIBLE_DEVICES entry GPU-5E1D matches this machine's GPU UUIDs differently \
                 when letter case is ignored, and whether CUDA ignores case is not known here"
                    .into()
            )
        );
    }

    #[test]
    fn mig_instances_are_refused() {
        let m = four();
        let mig = "MIG-c6cd5f2d-3a6e-5a5b-9a8c-1d4a1b7e6f20";
        let expected = format!(
            "{mig} in CUDA_VISIBLE_DEVICES: a MIG instance is not a whole GPU, and which GPU it \
             belongs to is not known without CUDA"
        );
        assert_eq!(resolve_visible(Some(mig), None, &m), Err(expected.clone()));
        assert_eq!(
            resolve_visible(Some(&format!("0,{mig}")), Some("PCI_BUS_ID"), &m),
            Err(expected)
        );
        let old = "MIG-GPU-13170708-7d46-8d3e-f89b-a874380bab3d/1/0";
        assert!(resolve_visible(Some(old), None, &m)
            .unwrap_err()
            .starts_with(&format!("{old} in CUDA_VISIBLE_DEVICES: a MIG instance")));
        // A MIG id after the part CUDA reads is ignored like any other ignored text.
        assert_eq!(pick(Some(&format!("1,zz,{mig}")), None, &m), Ok(vec![1]));
    }

    #[test]
    fn mixed_models_need_pci_bus_order_for_indices() {
        let mut m = four();
        m.gpus[2].model = "NVIDIA H100 80GB HBM3".into();
        let unknown = |why: &str| {
            Err(format!(
                "{why}, but this machine mixes GPU models (NVIDIA H200, NVIDIA H100 80GB HBM3) \
                 and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA then puts the fastest first, an \
                 order not known without CUDA"
            ))
        };
        assert_eq!(
            pick(None, None, &m),
            unknown("CUDA_VISIBLE_DEVICES is unset, so all GPUs are visible in CUDA's order")
        );
        let index = unknown("CUDA_VISIBLE_DEVICES entry 1 is an index into CUDA's order");
        assert_eq!(pick(Some("1"), None, &m), index);
        assert_eq!(pick(Some("1"), Some("FASTEST_FIRST"), &m), index);
        assert_eq!(pick(Some("1"), Some("pci_bus_id"), &m), index);
        assert_eq!(pick(Some("GPU-aaf,1"), Some(""), &m), index);
        // With PCI_BUS_ID the order is the bus order.
        let bus = Some("PCI_BUS_ID");
        assert_eq!(pick(None, bus, &m), Ok(vec![0, 1, 2, 3]));
        assert_eq!(pick(Some("2,0"), bus, &m), Ok(vec![2, 0]));
        // UUIDs, out-of-range indices and empty lists do not depend on the order.
        assert_eq!(pick(Some("GPU-aaf,GPU-5e"), None, &m), Ok(vec![2, 3]));
        assert_eq!(pick(Some("7,0"), None, &m), Ok(vec![]));
        assert_eq!(pick(Some("GPU-aaf,GPU-ff,0"), None, &m), Ok(vec![2]));
        assert_eq!(pick(Some(""), None, &m), Ok(vec![]));
    }
}

//! `CUDA_VISIBLE_DEVICES`: which devices a process sees, parsed the way CUDA does, and the key
//! vLLM derives from it for its cache file name.
//!
//! CUDA's rule: the value is a comma-separated list of entries, each a device index, a GPU UUID
//! (`GPU-…`) or a MIG instance (`MIG-…`); whitespace around an entry is ignored; the first
//! invalid entry ends the list and it and everything after it are ignored. [`parse`] reports
//! that ignored tail so callers can warn about it. (Whether an index names an existing device is
//! for the driver to say, so an out-of-range index is not detected here.)

use std::fmt;

/// The environment variable this module reads.
pub const VAR: &str = "CUDA_VISIBLE_DEVICES";

/// The devices a `CUDA_VISIBLE_DEVICES` value selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisibleDevices {
    /// The variable is not set: every device is visible, in the driver's order.
    Unset,
    /// These devices, in this order. Empty (e.g. the variable is set to `""`) means none.
    List(Vec<DeviceSelector>),
}

/// One entry of `CUDA_VISIBLE_DEVICES`. [`Display`](fmt::Display) writes it back as given,
/// without the surrounding whitespace (an index in plain decimal: `007` is written `7`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelector {
    /// A device index in the driver's enumeration.
    Index(u32),
    /// A GPU UUID or a prefix of one, as written, `GPU-` included.
    Uuid(String),
    /// A MIG instance, as written, `MIG-` included: `MIG-<uuid>` or the older
    /// `MIG-GPU-<uuid>/<gpu instance>/<compute instance>`.
    Mig(String),
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::Index(i) => write!(f, "{i}"),
            DeviceSelector::Uuid(s) | DeviceSelector::Mig(s) => f.write_str(s),
        }
    }
}

/// What [`parse`] made of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The devices CUDA will use.
    pub devices: VisibleDevices,
    /// The text CUDA ignores, from the first invalid or repeated entry to the end, when it is
    /// more than whitespace (a trailing comma loses nothing, so it is not reported).
    pub ignored: Option<String>,
}

/// Parses a `CUDA_VISIBLE_DEVICES` value (`None`: the variable is unset).
pub fn parse(value: Option<&str>) -> Parsed {
    let Some(value) = value else {
        return Parsed {
            devices: VisibleDevices::Unset,
            ignored: None,
        };
    };
    let mut devices: Vec<DeviceSelector> = Vec::new();
    let mut ignored = None;
    let mut start = 0; // byte offset of the current entry
    for entry in value.split(',') {
        match selector(entry.trim()) {
            Some(d) if !devices.contains(&d) => devices.push(d),
            _ => {
                let tail = &value[start..];
                ignored = (!tail.trim().is_empty()).then(|| tail.to_string());
                break;
            }
        }
        start += entry.len() + 1;
    }
    Parsed {
        devices: VisibleDevices::List(devices),
        ignored,
    }
}

/// The `CUDA_VISIBLE_DEVICES` part of vLLM's cache file name: the value exactly as set (even
/// empty, even with parts CUDA ignores), or `0,1,…,n-1` for `n` devices when unset.
pub fn cache_key(value: Option<&str>, n: usize) -> String {
    match value {
        Some(v) => v.to_string(),
        None => (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(","),
    }
}

/// One trimmed entry, or `None` if CUDA would stop at it.
fn selector(entry: &str) -> Option<DeviceSelector> {
    if let Some(uuid) = entry.strip_prefix("GPU-") {
        return is_uuid(uuid).then(|| DeviceSelector::Uuid(entry.to_string()));
    }
    if let Some(mig) = entry.strip_prefix("MIG-") {
        return is_mig(mig).then(|| DeviceSelector::Mig(entry.to_string()));
    }
    if !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit()) {
        return entry.parse().ok().map(DeviceSelector::Index); // None past u32::MAX
    }
    None
}

/// A UUID or a prefix of one: hex digits and dashes (CUDA accepts any unique prefix).
fn is_uuid(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// After `MIG-`: a MIG UUID, or `GPU-<uuid>/<gi>/<ci>` (drivers before R470).
fn is_mig(s: &str) -> bool {
    let is_number = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    match s
        .strip_prefix("GPU-")
        .map(|rest| rest.split('/').collect::<Vec<_>>())
    {
        Some(parts) => {
            matches!(parts[..], [uuid, gi, ci] if is_uuid(uuid) && is_number(gi) && is_number(ci))
        }
        None => is_uuid(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceSelector::{Index, Mig, Uuid};

    const GPU0: &str = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6";
    const MIG_NEW: &str = "MIG-c6cd5f2d-3a6e-5a5b-9a8c-1d4a1b7e6f20";
    const MIG_OLD: &str = "MIG-GPU-8932f937-d72c-4106-c12f-20bd9faed9f6/1/0";

    fn list(v: &str) -> Vec<DeviceSelector> {
        let p = parse(Some(v));
        assert_eq!(p.ignored, None, "{v:?}");
        match p.devices {
            VisibleDevices::List(l) => l,
            VisibleDevices::Unset => panic!("set"),
        }
    }

    fn ignored(v: &str) -> (Vec<DeviceSelector>, String) {
        let p = parse(Some(v));
        match (p.devices, p.ignored) {
            (VisibleDevices::List(l), Some(tail)) => (l, tail),
            other => panic!("{v:?}: {other:?}"),
        }
    }

    #[test]
    fn unset_and_empty_differ() {
        assert_eq!(
            parse(None),
            Parsed {
                devices: VisibleDevices::Unset,
                ignored: None
            }
        );
        assert_eq!(list(""), vec![]);
        assert_eq!(list("  "), vec![]);
    }

    #[test]
    fn indices_keep_their_order() {
        assert_eq!(list("0"), vec![Index(0)]);
        assert_eq!(
            list("0,1,2,3"),
            vec![Index(0), Index(1), Index(2), Index(3)]
        );
        assert_eq!(list("2,0"), vec![Index(2), Index(0)]);
        assert_eq!(list("1,3"), vec![Index(1), Index(3)]);
        assert_eq!(list("4294967295"), vec![Index(u32::MAX)]);
    }

    #[test]
    fn whitespace_around_entries_is_ignored() {
        assert_eq!(list(" 1 , 0\t"), vec![Index(1), Index(0)]);
        assert_eq!(
            list(&format!(" {GPU0} ,\n0")),
            vec![Uuid(GPU0.into()), Index(0)]
        );
    }

    #[test]
    fn uuids_and_mig_ids() {
        assert_eq!(list(GPU0), vec![Uuid(GPU0.into())]);
        assert_eq!(list("GPU-8932f937"), vec![Uuid("GPU-8932f937".into())]);
        assert_eq!(
            list(&format!("{MIG_NEW},{MIG_OLD}")),
            vec![Mig(MIG_NEW.into()), Mig(MIG_OLD.into())]
        );
        assert_eq!(
            list(&format!("1,{GPU0}")),
            vec![Index(1), Uuid(GPU0.into())]
        );
    }

    #[test]
    fn display_gives_the_entry_back() {
        let shown: Vec<String> = list(&format!("3, {GPU0},{MIG_OLD}"))
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(shown, ["3", GPU0, MIG_OLD]);
    }

    #[test]
    fn parsing_stops_at_the_first_invalid_entry() {
        assert_eq!(ignored("0,1,x,2"), (vec![Index(0), Index(1)], "x,2".into()));
        assert_eq!(ignored("0,-1"), (vec![Index(0)], "-1".into()));
        assert_eq!(ignored("-1"), (vec![], "-1".into()));
        assert_eq!(ignored("0, 1a ,2"), (vec![Index(0)], " 1a ,2".into()));
        assert_eq!(ignored("0,,1"), (vec![Index(0)], ",1".into()));
        assert_eq!(ignored("+1"), (vec![], "+1".into()));
        assert_eq!(
            ignored("0,4294967296"),
            (vec![Index(0)], "4294967296".into())
        );
        assert_eq!(ignored("GPU-"), (vec![], "GPU-".into()));
        assert_eq!(ignored("GPU-xyz,0"), (vec![], "GPU-xyz,0".into()));
        assert_eq!(ignored("gpu-8932f937"), (vec![], "gpu-8932f937".into()));
        assert_eq!(
            ignored("MIG-GPU-8932f937/1"),
            (vec![], "MIG-GPU-8932f937/1".into())
        );
        assert_eq!(
            ignored("MIG-GPU-8932f937/1/x"),
            (vec![], "MIG-GPU-8932f937/1/x".into())
        );
    }

    #[test]
    fn a_repeated_entry_ends_the_list() {
        assert_eq!(ignored("0,1,0,2"), (vec![Index(0), Index(1)], "0,2".into()));
        assert_eq!(ignored("1, 01"), (vec![Index(1)], " 01".into()));
        assert_eq!(
            ignored(&format!("{GPU0},{GPU0}")),
            (vec![Uuid(GPU0.into())], GPU0.into())
        );
    }

    #[test]
    fn a_trailing_comma_loses_nothing() {
        assert_eq!(list("0,1,"), vec![Index(0), Index(1)]);
        assert_eq!(list("0, "), vec![Index(0)]);
    }

    #[test]
    fn non_ascii_text_is_sliced_safely() {
        assert_eq!(ignored("0,é,1"), (vec![Index(0)], "é,1".into()));
        assert_eq!(ignored("é"), (vec![], "é".into()));
    }

    #[test]
    fn cache_key_is_the_value_as_given_or_all_indices() {
        assert_eq!(cache_key(None, 0), "");
        assert_eq!(cache_key(None, 1), "0");
        assert_eq!(cache_key(None, 4), "0,1,2,3");
        assert_eq!(cache_key(Some(""), 4), "");
        assert_eq!(cache_key(Some(" 2, 0"), 2), " 2, 0");
        assert_eq!(cache_key(Some("0,x"), 1), "0,x");
        assert_eq!(cache_key(Some(MIG_OLD), 1), MIG_OLD);
    }
}

//! What the NVIDIA kernel driver says about this machine, read from `/proc` without
//! initialising CUDA, and the fingerprint a cached P2P answer depends on.
//!
//! Why without CUDA: `cuInit` takes seconds on a large machine and claims resources on every
//! GPU, while "is the cached answer still valid?" is asked on every start-up and should cost no
//! more than reading a few small files. Those files are:
//!
//! * `/proc/driver/nvidia/version`: the driver version, on the `NVRM version:` line;
//! * `/proc/driver/nvidia/gpus/<bus id>/information`: each GPU's model and UUID;
//! * `/proc/sys/kernel/random/boot_id`: new at every boot.
//!
//! Every read is bounded (64 KiB) and opened `O_NONBLOCK`, and only a regular file is read, so a
//! FIFO, a device or a huge file put where a `/proc` file should be can neither hang nor flood
//! the caller.
//!
//! [`resolve_visible`] maps `CUDA_VISIBLE_DEVICES` onto those GPUs. It assumes CUDA enumerates
//! exactly the GPUs listed under `/proc/driver/nvidia/gpus`; where it may order them differently
//! (mixed models without `CUDA_DEVICE_ORDER=PCI_BUS_ID`) or where an entry is a MIG instance, it
//! says so instead of guessing.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::visible::{self, DeviceSelector, VisibleDevices};

/// The most bytes read from one file: the real files are under 1 KiB, so anything near this is
/// not the driver's file and is refused rather than read without end.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// The most entries accepted under the GPUs folder: far above any real machine, low enough that
/// a folder full of junk cannot make the reader allocate without bound.
const MAX_GPUS: usize = 1024;

/// The driver version file, relative to the root.
const VERSION_FILE: &str = "proc/driver/nvidia/version";
/// The folder with one sub-folder per GPU, relative to the root.
const GPUS_DIR: &str = "proc/driver/nvidia/gpus";
/// The boot id file, relative to the root.
const BOOT_ID_FILE: &str = "proc/sys/kernel/random/boot_id";

/// One GPU as the kernel driver lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// PCI bus id, lower-case, as the driver names the GPU's folder: `0000:19:00.0`.
    pub bus_id: String,
    /// The GPU's UUID, `GPU-` included, as the driver writes it.
    pub uuid: String,
    /// The model name, e.g. `NVIDIA H200`.
    pub model: String,
}

/// What the driver's /proc files say about this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// The kernel driver's version, e.g. `580.159.04`.
    pub driver_version: String,
    /// The kernel's boot id (a UUID, new at every boot).
    pub boot_id: String,
    /// The GPUs, sorted by PCI bus id (numerically: domain, bus, device, function).
    pub gpus: Vec<Gpu>,
}

/// Reads /proc (the real root "/").
pub fn read_machine() -> Result<Machine, String> {
    read_machine_at(Path::new("/"))
}

/// Same, with every path under `root` (tests build a fake tree in a temp dir).
///
/// Fails, naming the file and the reason, when a file is missing, unreadable, not a regular
/// file, over 64 KiB, not UTF-8 or not in the driver's format; when the GPUs folder holds
/// anything but bus-id folders; or when two GPUs share a bus id or UUID. A folder with no GPUs
/// gives an empty list.
pub fn read_machine_at(root: &Path) -> Result<Machine, String> {
    let version_path = root.join(VERSION_FILE);
    let version_text = read_text(&version_path).map_err(|e| {
        if e.kind == io::ErrorKind::NotFound {
            format!("{} (is the NVIDIA kernel driver loaded?)", e.message)
        } else {
            e.message
        }
    })?;
    let driver_version = driver_version(&version_text).ok_or_else(|| {
        format!(
            "{}: no driver version (digits and dots) on an `NVRM version:` line",
            version_path.display()
        )
    })?;
    Ok(Machine {
        driver_version,
        boot_id: read_boot_id_at(root)?,
        gpus: read_gpus(&root.join(GPUS_DIR))?,
    })
}

/// The kernel's boot id (new at every boot), which is there with or without NVIDIA's driver.
pub fn read_boot_id() -> Result<String, String> {
    read_boot_id_at(Path::new("/"))
}

fn read_boot_id_at(root: &Path) -> Result<String, String> {
    let boot_path = root.join(BOOT_ID_FILE);
    let boot_text = read_text(&boot_path).map_err(|e| e.message)?;
    let boot_id = boot_text.trim();
    if !is_uuid(boot_id) {
        return Err(format!(
            "{}: {boot_id:?} is not a boot id (a UUID)",
            boot_path.display()
        ));
    }
    Ok(boot_id.to_string())
}

/// A failed read: the message names the file; the kind lets the caller add a hint.
struct ReadError {
    kind: io::ErrorKind,
    message: String,
}

/// Reads a small text file without ever blocking on it (see [`read_bounded`]), at most
/// [`MAX_FILE_BYTES`] of it, as UTF-8.
fn read_text(path: &Path) -> Result<String, ReadError> {
    let bytes = read_bounded(path, MAX_FILE_BYTES).map_err(|e| ReadError {
        kind: e.kind(),
        message: e.to_string(),
    })?;
    String::from_utf8(bytes).map_err(|e| ReadError {
        kind: io::ErrorKind::InvalidData,
        message: format!(
            "cannot read {}: it is not UTF-8 text (bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ),
    })
}

/// Reads a small file without ever blocking on it: `O_NONBLOCK` makes opening a FIFO return at
/// once, and only a regular file is then read, at most `max` bytes of it (procfs and sysfs
/// files report sizes that are not what a read gives, so the size has to be found by reading);
/// a longer file is an error. Every error's text names the file and says why.
pub(crate) fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let fail = |kind: io::ErrorKind, why: String| {
        io::Error::new(kind, format!("cannot read {}: {why}", path.display()))
    };
    let io_fail = |e: io::Error| fail(e.kind(), e.to_string());
    let file = OpenOptions::new()
        .read(true)
        // O_NOCTTY: a terminal put in place of the file must not become our controlling tty.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_fail)?;
    let file_type = file.metadata().map_err(io_fail)?.file_type();
    if !file_type.is_file() {
        let what = if file_type.is_dir() {
            "a directory"
        } else if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_socket() {
            "a socket"
        } else if file_type.is_char_device() || file_type.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(fail(
            io::ErrorKind::InvalidData,
            format!("it is {what}, not a regular file"),
        ));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io_fail)?;
    if bytes.len() as u64 > max {
        return Err(fail(
            io::ErrorKind::InvalidData,
            format!("it is larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// The version on the first `NVRM version:` line: its first token of digits and dots with at
/// least one dot (`580.159.04`). Both the open and the proprietary module write it there, after
/// words that never look like that (`x86_64`, `Module`).
fn driver_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find_map(|line| line.trim_start().strip_prefix("NVRM version:"))?;
    let is_version = |token: &&str| {
        token.contains('.')
            && token
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    };
    line.split_whitespace().find(is_version).map(str::to_string)
}

/// A UUID in the kernel's and the driver's shape: hex groups of 8-4-4-4-12, dash-separated.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A PCI bus id `domain:bus:device.function` as numbers, for sorting the way the PCI bus
/// orders devices (a plain string sort would misplace a 5-digit domain, as VMD creates).
pub(crate) fn parse_bus_id(s: &str) -> Option<(u32, u32, u32, u32)> {
    let hex = |part: &str, min: usize, max: usize| {
        let ok = (min..=max).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_hexdigit());
        // Checked first because from_str_radix also accepts a leading `+`.
        ok.then(|| u32::from_str_radix(part, 16).ok()).flatten()
    };
    let (domain, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    Some((
        hex(domain, 4, 8)?,
        hex(bus, 2, 2)?,
        hex(device, 2, 2)?,
        hex(function, 1, 1)?,
    ))
}

/// Every GPU folder under `dir`, sorted by bus id. Anything that is not a readable bus-id
/// folder is an error rather than skipped: a GPU left out would shift every index after it.
fn read_gpus(dir: &Path) -> Result<Vec<Gpu>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut gpus: Vec<((u32, u32, u32, u32), Gpu)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        if gpus.len() == MAX_GPUS {
            return Err(format!(
                "{}: more than {MAX_GPUS} entries; not the driver's GPU list",
                dir.display()
            ));
        }
        let name = entry.file_name();
        let key = name.to_str().and_then(parse_bus_id).ok_or_else(|| {
            format!(
                "{}: {name:?} is not a PCI bus id (like 0000:19:00.0)",
                dir.display()
            )
        })?;
        // Validated as ASCII above, so the lossy conversion loses nothing.
        let bus_id = name.to_string_lossy().to_ascii_lowercase();
        let info_path = entry.path().join("information");
        let text = read_text(&info_path).map_err(|e| e.message)?;
        let gpu = parse_information(&text, &bus_id)
            .map_err(|why| format!("{}: {why}", info_path.display()))?;
        gpus.push((key, gpu));
    }
    gpus.sort_by_key(|(key, _)| *key);
    for (i, (key, gpu)) in gpus.iter().enumerate() {
        if let Some((_, twin)) = gpus[..i].iter().find(|(k, _)| k == key) {
            return Err(format!(
                "{}: {} and {} are the same bus id",
                dir.display(),
                twin.bus_id,
                gpu.bus_id
            ));
        }
        if let Some((_, twin)) = gpus[..i].iter().find(|(_, g)| g.uuid == gpu.uuid) {
            return Err(format!(
                "{}: {} and {} both have UUID {}",
                dir.display(),
                twin.bus_id,
                gpu.bus_id,
                gpu.uuid
            ));
        }
    }
    Ok(gpus.into_iter().map(|(_, gpu)| gpu).collect())
}

/// One GPU's `information` file: `Key: <spaces and tabs> value` lines, of which `Model` and
/// `GPU UUID` are needed and `Bus Location`, when present, must name the GPU's own folder.
fn parse_information(text: &str, bus_id: &str) -> Result<Gpu, String> {
    let (mut model, mut uuid, mut bus) = (None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "Model" => &mut model,
            "GPU UUID" => &mut uuid,
            "Bus Location" => &mut bus,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("`{}` appears twice", key.trim()));
        }
        *slot = Some(value.trim());
    }
    let model = model.ok_or("no `Model:` line")?;
    let uuid = uuid.ok_or("no `GPU UUID:` line")?;
    if model.is_empty() || model.chars().any(char::is_control) {
        return Err(format!("model {model:?} is not a model name"));
    }
    if !uuid.strip_prefix("GPU-").is_some_and(is_uuid) {
        return Err(format!("{uuid:?} is not a GPU UUID (GPU-<uuid>)"));
    }
    if let Some(bus) = bus {
        if !bus.eq_ignore_ascii_case(bus_id) {
            return Err(format!(
                "`Bus Location` is {bus:?}, but the folder is {bus_id}"
            ));
        }
    }
    Ok(Gpu {
        bus_id: bus_id.to_string(),
        uuid: uuid.to_string(),
        model: model.to_string(),
    })
}

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

/// The fingerprint file format this module writes and reads. Format 1 had no `check`,
/// `devices` or `verdicts`: it vouches for no verdicts, so such a file is never used.
const FORMAT: &str = "2";

/// The value of the `cvd` key when `CUDA_VISIBLE_DEVICES` is unset. A set value never renders
/// as this, because `<` in a set value is escaped.
const UNSET: &str = "<unset>";

/// The keys before the `gpu` lines, in the order they are written.
const KEYS: [&str; 9] = [
    "format", "p2pcheck", "level", "check", "driver", "boot_id", "cvd", "devices", "verdicts",
];

/// What a cached answer depends on: the machine, `CUDA_VISIBLE_DEVICES`, p2pcheck's version
/// and how the check ran.
///
/// Where the GPUs cannot be named without CUDA (no `/proc/driver/nvidia`, MIG, mixed models),
/// `gpus` is empty and only their number is known (`devices`, counted by the driver), and
/// `driver_version` and `boot_id` are what could still be read (empty if nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    /// The p2pcheck version that wrote the answer (e.g. `0.1.0`).
    pub version: String,
    /// The check level the answer came from (e.g. `kernel`, `copy`).
    pub level: String,
    /// The check's other settings that change what a verdict means (the kernel tier's bytes,
    /// the handshake's rounds and budget, a simulation and its faults), as text; empty when
    /// none applies (level copy on real GPUs).
    pub check: String,
    /// The kernel driver's version; empty where it cannot be read.
    pub driver_version: String,
    /// The kernel's boot id; empty where it cannot be read.
    pub boot_id: String,
    /// The raw `CUDA_VISIBLE_DEVICES` value; `None` when unset.
    pub cvd: Option<String>,
    /// How many GPUs are visible.
    pub devices: usize,
    /// The visible GPUs, in local (CUDA ordinal) order; empty when they cannot be named
    /// without CUDA.
    pub gpus: Vec<Gpu>,
}

/// A fingerprint file: the verdicts one check found and what they were checked against. It
/// vouches for exactly those verdicts: vLLM's file beside it answers only while it holds them
/// (see [`Fingerprint::vouched`]), so a fingerprint and a cache file of two different writes
/// never make an answer together.
///
/// Rendered as a small text file, one `key=value` per line. Keys, in this order: `format`
/// (`2`), `p2pcheck` (the crate version), `level`, `check`, `driver`, `boot_id`, `cvd` (the raw
/// `CUDA_VISIBLE_DEVICES` value, or the literal `<unset>`), `devices`, `verdicts` (one row of
/// `1`/`0` per source device, `1` for true, rows separated by one space: `11 01`), then one
/// line `gpu=<local index> <uuid> <bus id> <model>` per visible GPU in local order (without
/// ` <model>` when the model is empty; no gpu line when the GPUs could not be named).
///
/// Values are written as they are, except that control characters (newline and tab included)
/// and `%` are written `%XX` per UTF-8 byte (upper-case hex), as are spaces in a UUID or bus id
/// and `<` in `cvd`: so any value survives the line format, and a set `cvd` never reads as
/// `<unset>`. Real values (`0,1`, `GPU-…`, `580.159.04`) need none of this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// What the verdicts were checked against.
    pub fingerprint: Fingerprint,
    /// The verdicts, row-major (`verdicts[src * devices + tgt]`), `devices²` of them.
    pub verdicts: Vec<bool>,
}

impl Record {
    /// The file's text: one `key=value` line each, every line ending in a newline.
    ///
    /// # Panics
    ///
    /// If there are not `devices²` verdicts: a bug in the caller, not bad data.
    pub fn render(&self) -> String {
        let f = &self.fingerprint;
        assert_eq!(
            Some(self.verdicts.len()),
            f.devices.checked_mul(f.devices),
            "a fingerprint of {} devices needs their square of verdicts",
            f.devices
        );
        let mut out = String::new();
        let cvd = match &f.cvd {
            None => UNSET.to_string(),
            Some(v) => escape(v, &['<']),
        };
        let rows: Vec<String> = self
            .verdicts
            .chunks(f.devices.max(1))
            .map(|row| row.iter().map(|&v| if v { '1' } else { '0' }).collect())
            .collect();
        let values = [
            FORMAT.to_string(),
            escape(&f.version, &[]),
            escape(&f.level, &[]),
            escape(&f.check, &[]),
            escape(&f.driver_version, &[]),
            escape(&f.boot_id, &[]),
            cvd,
            f.devices.to_string(),
            rows.join(" "),
        ];
        for (key, value) in KEYS.iter().zip(values) {
            let _ = writeln!(out, "{key}={value}");
        }
        for (i, gpu) in f.gpus.iter().enumerate() {
            let _ = write!(
                out,
                "gpu={i} {} {}",
                escape(&gpu.uuid, &[' ']),
                escape(&gpu.bus_id, &[' '])
            );
            if !gpu.model.is_empty() {
                let _ = write!(out, " {}", escape(&gpu.model, &[]));
            }
            out.push('\n');
        }
        out
    }

    /// Strict parse of `render`'s output: unknown keys, duplicates, missing keys, keys out of
    /// order, bad gpu lines, values with control chars, a missing final newline (a truncated
    /// file), verdicts that are not `devices` rows of `devices` digits, gpu lines that are
    /// neither none nor one per device, or any other text `render` would not write -> Err.
    /// Never panics, and allocates nothing by what `devices` says.
    ///
    /// A gpu line needs its index (0, 1, … in order), a non-empty UUID and bus id, and no UUID
    /// or bus id seen on an earlier line.
    pub fn parse(text: &str) -> Result<Record, String> {
        if text.is_empty() {
            return Err("the fingerprint is empty".into());
        }
        let body = text
            .strip_suffix('\n')
            .ok_or("the last line has no newline (a truncated file?)")?;
        let mut values: [Option<&str>; KEYS.len()] = [None; KEYS.len()];
        let mut gpus: Vec<Gpu> = Vec::new();
        for (n, line) in body.split('\n').enumerate() {
            let at = |why: String| format!("line {}: {why}", n + 1);
            if let Some(c) = line.chars().find(|c| c.is_control()) {
                return Err(at(format!("control character {c:?}")));
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| at(format!("{line:?} is not key=value")))?;
            let first_missing = |upto: usize| {
                KEYS[..upto]
                    .iter()
                    .zip(&values)
                    .find(|(_, v)| v.is_none())
                    .map(|(k, _)| *k)
            };
            if key == "gpu" {
                if let Some(missing) = first_missing(KEYS.len()) {
                    return Err(at(format!("a gpu line before `{missing}`")));
                }
                let gpu = parse_gpu(value, gpus.len()).map_err(at)?;
                if let Some(twin) = gpus
                    .iter()
                    .position(|g| g.uuid == gpu.uuid || g.bus_id == gpu.bus_id)
                {
                    return Err(at(format!(
                        "GPU {} repeats GPU {twin}'s UUID or bus id",
                        gpus.len()
                    )));
                }
                gpus.push(gpu);
                continue;
            }
            let slot = KEYS
                .iter()
                .position(|k| *k == key)
                .ok_or_else(|| at(format!("unknown key {key:?}")))?;
            // A key after the gpu lines is caught here: gpu lines need every key before them.
            if values[slot].is_some() {
                return Err(at(format!("`{key}` appears twice")));
            }
            if let Some(missing) = first_missing(slot) {
                return Err(at(format!("`{key}` comes before `{missing}`")));
            }
            values[slot] = Some(value);
        }
        let [format, version, level, check, driver, boot_id, cvd, devices, verdicts] = values;
        fn need<'a>(value: Option<&'a str>, key: &str) -> Result<&'a str, String> {
            value.ok_or_else(|| format!("no `{key}` line"))
        }
        let format = need(format, "format")?;
        if format != FORMAT {
            return Err(format!(
                "format {format:?} is not {FORMAT} (written by another p2pcheck?)"
            ));
        }
        let field = |value: Option<&str>, key: &str| {
            unescape(need(value, key)?).map_err(|why| format!("`{key}`: {why}"))
        };
        let devices_text = need(devices, "devices")?;
        let devices = devices_text
            .parse::<usize>()
            .ok()
            .filter(|d| d.to_string() == devices_text)
            .ok_or_else(|| format!("`devices`: {devices_text:?} is not a number of GPUs"))?;
        let verdicts = parse_verdicts(need(verdicts, "verdicts")?, devices)?;
        if !gpus.is_empty() && gpus.len() != devices {
            return Err(format!(
                "{} gpu lines for {devices} devices (one per device, or none)",
                gpus.len()
            ));
        }
        let record = Record {
            fingerprint: Fingerprint {
                version: field(version, "p2pcheck")?,
                level: field(level, "level")?,
                check: field(check, "check")?,
                driver_version: field(driver, "driver")?,
                boot_id: field(boot_id, "boot_id")?,
                cvd: match need(cvd, "cvd")? {
                    UNSET => None,
                    _ => Some(field(cvd, "cvd")?),
                },
                devices,
                gpus,
            },
            verdicts,
        };
        // Everything above accepted, the text must still be exactly what render writes
        // (upper-case escapes, no needless ones): one text per fingerprint, so a file that
        // anything but p2pcheck touched is treated as stale.
        if record.render() != text {
            return Err("it is not exactly what p2pcheck writes (needless or lower-case escapes, or spacing)".into());
        }
        Ok(record)
    }
}

/// The `verdicts` value for `n` devices: `n` rows of `n` digits `1`/`0`, one space between
/// rows. Checked row by row, so a huge `n` with a short value fails at once.
fn parse_verdicts(value: &str, n: usize) -> Result<Vec<bool>, String> {
    let bad = |why: String| Err(format!("`verdicts`: {why}"));
    if n == 0 {
        return match value {
            "" => Ok(Vec::new()),
            _ => bad("verdicts for 0 devices".into()),
        };
    }
    let mut verdicts = Vec::new();
    let mut rows = 0;
    for row in value.split(' ') {
        rows += 1;
        if rows > n {
            return bad(format!("more than {n} rows"));
        }
        if row.len() != n {
            return bad(format!(
                "row {} has {} digits, not {n}",
                rows - 1,
                row.len()
            ));
        }
        for b in row.bytes() {
            match b {
                b'1' => verdicts.push(true),
                b'0' => verdicts.push(false),
                _ => {
                    return bad(format!(
                        "row {} holds {:?}, not 1 or 0",
                        rows - 1,
                        b as char
                    ))
                }
            }
        }
    }
    if rows != n {
        return bad(format!("{rows} rows, not {n}"));
    }
    Ok(verdicts)
}

/// An empty value (unknown) in words, for a difference.
fn shown(value: &str) -> &str {
    if value.is_empty() {
        "unknown"
    } else {
        value
    }
}

impl Fingerprint {
    /// Whether the GPUs are named (from `/proc/driver/nvidia`), not only counted.
    pub fn is_named(&self) -> bool {
        !self.gpus.is_empty()
    }

    /// The first difference from `other` in words ("check level kernel -> copy", "driver
    /// 580.1 -> 580.2", "GPU 1 is now GPU-xxx (was GPU-yyy)", "the machine rebooted (boot id
    /// … -> …)"), or None when equal: [`Fingerprint::check_difference`], else
    /// [`Fingerprint::machine_difference`].
    ///
    /// `self` is what holds now and `other` what was recorded, so arrows point from `other` to
    /// `self`.
    pub fn difference(&self, other: &Fingerprint) -> Option<String> {
        self.check_difference(other)
            .or_else(|| self.machine_difference(other))
    }

    /// How the check differs from `other`'s, in this order: p2pcheck's version, the level, the
    /// other settings.
    pub fn check_difference(&self, other: &Fingerprint) -> Option<String> {
        if self.version != other.version {
            return Some(format!("p2pcheck {} -> {}", other.version, self.version));
        }
        if self.level != other.level {
            return Some(format!("check level {} -> {}", other.level, self.level));
        }
        if self.check != other.check {
            return Some(format!(
                "check settings {:?} -> {:?}",
                other.check, self.check
            ));
        }
        None
    }

    /// How the machine differs from `other`'s, in this order: driver, boot id,
    /// `CUDA_VISIBLE_DEVICES`, the number of visible GPUs, whether they are named, then each
    /// GPU's UUID, bus id and model.
    pub fn machine_difference(&self, other: &Fingerprint) -> Option<String> {
        if self.driver_version != other.driver_version {
            return Some(format!(
                "driver {} -> {}",
                shown(&other.driver_version),
                shown(&self.driver_version)
            ));
        }
        if self.boot_id != other.boot_id {
            return Some(format!(
                "the machine rebooted (boot id {} -> {})",
                shown(&other.boot_id),
                shown(&self.boot_id)
            ));
        }
        if self.cvd != other.cvd {
            let show = |cvd: &Option<String>| match cvd {
                None => "unset".to_string(),
                Some(v) => format!("{v:?}"),
            };
            return Some(format!(
                "CUDA_VISIBLE_DEVICES {} -> {}",
                show(&other.cvd),
                show(&self.cvd)
            ));
        }
        if self.devices != other.devices {
            return Some(format!(
                "visible GPUs {} -> {}",
                other.devices, self.devices
            ));
        }
        if self.is_named() != other.is_named() {
            return Some(match self.is_named() {
                true => "the GPUs could not be named without CUDA when it was written".into(),
                false => "the GPUs cannot be named without CUDA now".into(),
            });
        }
        for (i, (now, was)) in self.gpus.iter().zip(&other.gpus).enumerate() {
            if now.uuid != was.uuid {
                return Some(format!("GPU {i} is now {} (was {})", now.uuid, was.uuid));
            }
            if now.bus_id != was.bus_id {
                return Some(format!(
                    "GPU {i} ({}) is now at {} (was at {})",
                    now.uuid, now.bus_id, was.bus_id
                ));
            }
            if now.model != was.model {
                return Some(format!(
                    "GPU {i} ({}) model {:?} -> {:?}",
                    now.uuid, was.model, now.model
                ));
            }
        }
        None
    }

    /// Whether vLLM's cache file, holding `verdicts`, may answer a question asked now (under
    /// `self`), given the text of p2pcheck's fingerprint file beside it (`None`: there is
    /// none): `Ok`, or why not.
    ///
    /// It may when the fingerprint parses, was written by this p2pcheck at this level with
    /// these settings on this machine, and vouches for exactly `verdicts`. Without a
    /// fingerprint it may only where vLLM's own trust is all there is: GPUs that cannot be
    /// named without CUDA, asked at level `copy` (vLLM's own test); at any other level nothing
    /// would confirm that the file holds that level's verdicts.
    pub fn vouched(&self, beside: Option<&str>, verdicts: &[bool]) -> Result<(), String> {
        let Some(text) = beside else {
            return match (self.is_named(), self.level.as_str()) {
                (false, "copy") => Ok(()),
                (false, level) => Err(format!(
                    "no p2pcheck fingerprint beside it, and the GPUs cannot be named without \
                     CUDA: nothing confirms that it holds {level}-level verdicts"
                )),
                (true, _) => Err("no p2pcheck fingerprint beside it: its origin is unknown".into()),
            };
        };
        let record = Record::parse(text)
            .map_err(|why| format!("its p2pcheck fingerprint is unusable: {why}"))?;
        if let Some(d) = self.check_difference(&record.fingerprint) {
            return Err(format!("it was written by another check: {d}"));
        }
        if let Some(d) = self.machine_difference(&record.fingerprint) {
            return Err(format!("the machine changed since it was written: {d}"));
        }
        if record.verdicts != verdicts {
            return Err(
                "its p2pcheck fingerprint vouches for other verdicts than it holds (a write \
                 that was interrupted, or another program wrote it since)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// One gpu line's value: `<index> <uuid> <bus id>[ <model>]`, the index being `expected`.
fn parse_gpu(value: &str, expected: usize) -> Result<Gpu, String> {
    let mut parts = value.splitn(4, ' ');
    let index = parts.next().unwrap_or_default();
    if index != expected.to_string() {
        return Err(format!("gpu index {index:?} where {expected} was due"));
    }
    let (Some(uuid), Some(bus_id)) = (parts.next(), parts.next()) else {
        return Err(format!(
            "gpu line {value:?} is not `<index> <uuid> <bus id> <model>`"
        ));
    };
    let gpu = Gpu {
        uuid: unescape(uuid).map_err(|why| format!("GPU {expected}'s UUID: {why}"))?,
        bus_id: unescape(bus_id).map_err(|why| format!("GPU {expected}'s bus id: {why}"))?,
        model: unescape(parts.next().unwrap_or_default())
            .map_err(|why| format!("GPU {expected}'s model: {why}"))?,
    };
    if gpu.uuid.is_empty() || gpu.bus_id.is_empty() {
        return Err(format!("GPU {expected} has an empty UUID or bus id"));
    }
    Ok(gpu)
}

/// `s` with control characters, `%` and the `extra` characters written `%XX`, one per UTF-8
/// byte: the line format then holds any string, and `unescape` gives it back.
fn escape(s: &str, extra: &[char]) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '%' || extra.contains(&c) {
            let mut utf8 = [0; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`escape`]: every `%XX` back to its byte. Whether the escapes were needed is
/// left to the caller (parse compares with a fresh render).
fn unescape(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let byte = bytes
            .get(i + 1..i + 3)
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .ok_or_else(|| format!("a `%` at byte {i} is not followed by two hex digits"))?;
        out.push(byte);
        i += 3;
    }
    String::from_utf8(out).map_err(|_| "its escapes do not make UTF-8 text".to_string())
}

/// The fingerprint file that sits beside vLLM's cache file `cache_file`: same folder, name
/// `.<cache file name>.p2pcheck-fingerprint` (hidden so vLLM's folder looks unchanged).
///
/// A path without a file name (`/`, `..`) has none to copy, so the name is then
/// `..p2pcheck-fingerprint`; vLLM's cache paths always have one.
pub fn path_beside(cache_file: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(cache_file.file_name().unwrap_or_default());
    name.push(".p2pcheck-fingerprint");
    match cache_file.parent() {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fake root under the system temp dir, removed on drop (so also when a test fails).
    struct Tree(PathBuf);

    impl Tree {
        /// An empty root.
        fn empty() -> Tree {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "p2pcheck-fingerprint-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Tree(dir)
        }

        /// A root with the driver's files for `gpus`, their folders created in reverse.
        fn with(gpus: &[Gpu]) -> Tree {
            let tree = Tree::empty();
            tree.put(VERSION_FILE, OPEN_VERSION);
            tree.put(BOOT_ID_FILE, "c07e6ca8-09fe-4094-92d3-bd719ae256df\n");
            fs::create_dir_all(tree.0.join(GPUS_DIR)).unwrap();
            for gpu in gpus.iter().rev() {
                tree.put(&info_file(&gpu.bus_id), information(gpu));
            }
            tree
        }

        fn put(&self, rel: &str, contents: impl AsRef<[u8]>) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }

        fn path(&self, rel: &str) -> String {
            self.0.join(rel).display().to_string()
        }

        fn read(&self) -> Result<Machine, String> {
            read_machine_at(&self.0)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The open kernel module's version file, as an H200 machine has it.
    const OPEN_VERSION: &str = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  \
        580.159.04  Release Build  (dvs-builder@U22-I3-AM02-24-3)  Wed Oct 29 01:23:45 UTC 2025\n\
        GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04) \n";

    const BOOT: &str = "c07e6ca8-09fe-4094-92d3-bd719ae256df";

    fn info_file(bus_id: &str) -> String {
        format!("{GPUS_DIR}/{bus_id}/information")
    }

    /// An `information` file as the driver writes it (tabs and all).
    fn information(gpu: &Gpu) -> String {
        format!(
            "Model: \t\t {}\nIRQ:   \t\t 41\nGPU UUID: \t {}\nVideo BIOS: \t 96.00.a5.00.1a\n\
             Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\n\
             Bus Location: \t {}\nDevice Minor: \t 0\nGPU Firmware: \t 580.159.04\n\
             GPU Excluded:\t No\n",
            gpu.model, gpu.uuid, gpu.bus_id
        )
    }

    fn gpu(bus_id: &str, uuid: &str, model: &str) -> Gpu {
        Gpu {
            bus_id: bus_id.into(),
            uuid: uuid.into(),
            model: model.into(),
        }
    }

    /// The bus ids of an 8-GPU H200 machine, in bus order.
    const BUSES: [&str; 8] = [
        "0000:19:00.0",
        "0000:3b:00.0",
        "0000:4c:00.0",
        "0000:5d:00.0",
        "0000:9b:00.0",
        "0000:bb:00.0",
        "0000:cb:00.0",
        "0000:db:00.0",
    ];

    /// `n` H200s in bus order with distinct UUIDs.
    fn h200s(n: usize) -> Vec<Gpu> {
        (0..n)
            .map(|i| {
                gpu(
                    BUSES[i],
                    &format!("GPU-{:08x}-7d46-8d3e-f89b-a874380bab3d", 0x1317_0708 + i),
                    "NVIDIA H200",
                )
            })
            .collect()
    }

    #[test]
    fn reads_the_drivers_real_formats() {
        let h200 = gpu(
            "0000:00:06.0",
            "GPU-aaf244da-41be-4bcb-f81d-0101b7560a41",
            "NVIDIA H200",
        );
        let tree = Tree::with(&[]);
        // Byte for byte what an H200 machine's driver wrote (its builder field is empty).
        tree.put(
            VERSION_FILE,
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release \
             Build  (nixbld@)  \nGCC version:  gcc version 15.3.0 (GCC) \n",
        );
        tree.put(
            &info_file("0000:00:06.0"),
            "Model: \t\t NVIDIA H200\nIRQ:   \t\t 41\nGPU UUID: \t \
             GPU-aaf244da-41be-4bcb-f81d-0101b7560a41\nVideo BIOS: \t 96.00.a5.00.1a\n\
             Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\n\
             Bus Location: \t 0000:00:06.0\nDevice Minor: \t 0\nGPU Firmware: \t 580.159.04\n\
             GPU Excluded:\t No\n",
        );
        assert_eq!(
            tree.read(),
            Ok(Machine {
                driver_version: "580.159.04".into(),
                boot_id: BOOT.into(),
                gpus: vec![h200],
            })
        );
    }

    #[test]
    fn driver_version_is_the_first_dotted_number_on_the_nvrm_line() {
        assert_eq!(driver_version(OPEN_VERSION), Some("580.159.04".into()));
        assert_eq!(
            driver_version(
                "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Thu Oct 19 \
                 18:56:32 UTC 2023\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14) \n"
            ),
            Some("535.129.03".into())
        );
        assert_eq!(
            driver_version("GCC version: 12.3.0\n  NVRM version: Module 550.54\n"),
            Some("550.54".into())
        );
        assert_eq!(
            driver_version("NVRM version: Module 1..2 .5 5. 5 x86_64\n"),
            None
        );
        assert_eq!(driver_version("GCC version:  gcc version 12.3.0\n"), None);
        // Only the first NVRM line counts.
        assert_eq!(
            driver_version("NVRM version: none\nNVRM version: 1.2\n"),
            None
        );
        assert_eq!(driver_version(""), None);
    }

    #[test]
    fn one_two_four_and_eight_gpus_come_back_in_bus_order() {
        for n in [1, 2, 4, 8] {
            let tree = Tree::with(&h200s(n));
            let machine = tree.read().unwrap();
            assert_eq!(machine.gpus, h200s(n), "{n} GPUs");
            assert_eq!(machine.driver_version, "580.159.04");
            assert_eq!(machine.boot_id, BOOT);
        }
    }

    #[test]
    fn bus_order_is_numeric_and_bus_ids_lower_case() {
        let tree = Tree::with(&[]);
        let folders = [
            "0000:C1:00.0",
            "10000:01:00.0",
            "0000:19:00.1",
            "0000:19:00.0",
        ];
        for (i, bus) in folders.iter().enumerate() {
            let uuid = format!("GPU-0000000{i}-7d46-8d3e-f89b-a874380bab3d");
            tree.put(
                &info_file(bus),
                information(&gpu(bus, &uuid, "NVIDIA H100")),
            );
        }
        let buses: Vec<String> = tree
            .read()
            .unwrap()
            .gpus
            .into_iter()
            .map(|g| g.bus_id)
            .collect();
        assert_eq!(
            buses,
            [
                "0000:19:00.0",
                "0000:19:00.1",
                "0000:c1:00.0",
                "10000:01:00.0"
            ]
        );
    }

    #[test]
    fn no_gpus_is_an_empty_list() {
        assert_eq!(tree_gpus(&Tree::with(&[])), Ok(vec![]));
    }

    fn tree_gpus(tree: &Tree) -> Result<Vec<Gpu>, String> {
        tree.read().map(|m| m.gpus)
    }

    #[test]
    fn a_missing_version_file_or_gpus_folder_is_an_error() {
        let tree = Tree::with(&h200s(2));
        fs::remove_file(tree.0.join(VERSION_FILE)).unwrap();
        assert_eq!(
            tree.read(),
            Err(format!(
                "cannot read {}: No such file or directory (os error 2) (is the NVIDIA kernel \
                 driver loaded?)",
                tree.path(VERSION_FILE)
            ))
        );
        let tree = Tree::with(&h200s(2));
        fs::remove_dir_all(tree.0.join(GPUS_DIR)).unwrap();
        assert_eq!(
            tree.read(),
            Err(format!(
                "cannot list {}: No such file or directory (os error 2)",
                tree.path(GPUS_DIR)
            ))
        );
        let tree = Tree::with(&h200s(1));
        fs::remove_file(tree.0.join(BOOT_ID_FILE)).unwrap();
        assert_eq!(
            tree.read(),
            Err(format!(
                "cannot read {}: No such file or directory (os error 2)",
                tree.path(BOOT_ID_FILE)
            ))
        );
    }

    #[test]
    fn a_directory_in_place_of_a_file_is_refused() {
        let tree = Tree::with(&h200s(1));
        fs::remove_file(tree.0.join(VERSION_FILE)).unwrap();
        fs::create_dir(tree.0.join(VERSION_FILE)).unwrap();
        assert_eq!(
            tree.read(),
            Err(format!(
                "cannot read {}: it is a directory, not a regular file",
                tree.path(VERSION_FILE)
            ))
        );
        let tree = Tree::with(&h200s(1));
        let info = info_file(BUSES[0]);
        fs::remove_file(tree.0.join(&info)).unwrap();
        fs::create_dir(tree.0.join(&info)).unwrap();
        assert_eq!(
            tree.read(),
            Err(format!(
                "cannot read {}: it is a directory, not a regular file",
                tree.path(&info)
            ))
        );
    }

    #[test]
    fn files_up_to_64_kib_are_read_and_larger_ones_refused() {
        let tree = Tree::with(&h200s(1));
        let mut text = OPEN_VERSION.to_string();
        text.push_str(&"#".repeat(64 * 1024 - text.len()));
        assert_eq!(text.len(), 65536);
        tree.put(VERSION_FILE, &text);
        assert_eq!(tree.read().unwrap().driver_version, "580.159.04");
        text.push('#');
        tree.put(VERSION_FILE, &text);
        assert_eq!(
            tree.read(),
            Err(format!(
                "cannot read {}: it is larger than 65536 bytes",
                tree.path(VERSION_FILE)
            ))
        );
        let info = info_file(BUSES[0]);
        tree.put(VERSION_FILE, OPEN_VERSION);
        tree.put(&info, vec![b'\n'; 1 << 20]);
        assert_eq!(
            tree.read(),
            Err(format!(
                "cannot read {}: it is larger than 65536 bytes",
                tree.path(&info)
            ))
        );
    }

    #[test]
    fn a_fifo_in_place_of_a_file_does_not_block() {
        // mkfifo(3) would need `unsafe`, denied here; the mkfifo command makes the same FIFO.
        let tree = Tree::with(&h200s(1));
        let path = tree.0.join(BOOT_ID_FILE);
        fs::remove_file(&path).unwrap();
        match std::process::Command::new("mkfifo").arg(&path).status() {
            Ok(status) if status.success() => {}
            other => {
                eprintln!("skipped: no mkfifo command ({other:?})");
                return;
            }
        }
        let root = tree.0.clone();
        let (send, receive) = std::sync::mpsc::channel();
        // A read that blocked would hang the test forever; in a thread it fails it instead.
        std::thread::spawn(move || send.send(read_machine_at(&root)));
        let got = receive
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO blocked");
        assert_eq!(
            got,
            Err(format!(
                "cannot read {}: it is a FIFO, not a regular file",
                path.display()
            ))
        );
    }

    #[test]
    fn text_that_is_not_the_drivers_is_an_error() {
        let tree = Tree::with(&h200s(1));
        tree.put(VERSION_FILE, "NVRM version: unknown\n");
        assert_eq!(
            tree.read(),
            Err(format!(
                "{}: no driver version (digits and dots) on an `NVRM version:` line",
                tree.path(VERSION_FILE)
            ))
        );
        tree.put(VERSION_FILE, b"NVRM version: 1.2 \xff\n");
        assert_eq!(
            tree.read(),
            Err(format!(
                "cannot read {}: it is not UTF-8 text (bad byte at offset 18)",
                tree.path(VERSION_FILE)
            ))
        );
        tree.put(VERSION_FILE, OPEN_VERSION);
        tree.put(BOOT_ID_FILE, "not-a-uuid\n");
        assert_eq!(
            tree.read(),
            Err(format!(
                "{}: \"not-a-uuid\" is not a boot id (a UUID)",
                tree.path(BOOT_ID_FILE)
            ))
        );
    }

    #[test]
    fn bad_gpu_folders_and_information_files_are_errors() {
        let bad = |edit: &dyn Fn(&Tree)| {
            let tree = Tree::with(&h200s(2));
            edit(&tree);
            tree.read().map(|_| ()).map_err(|e| {
                // Paths differ per tree; the message after the tree's root is what counts.
                e.replace(&tree.0.display().to_string(), "")
            })
        };
        let info0 = info_file(BUSES[0]);
        let path0 = format!("/{info0}");
        assert_eq!(
            bad(&|t| t.put(&info0, "Model: \t\t NVIDIA H200\n")),
            Err(format!("{path0}: no `GPU UUID:` line"))
        );
        assert_eq!(
            bad(&|t| t.put(
                &info0,
                "GPU UUID: \t GPU-aaf244da-41be-4bcb-f81d-0101b7560a41\n"
            )),
            Err(format!("{path0}: no `Model:` line"))
        );
        assert_eq!(
            bad(&|t| t.put(&info0, "Model: \t\t NVIDIA H200\nGPU UUID: \t ??\n")),
            Err(format!("{path0}: \"??\" is not a GPU UUID (GPU-<uuid>)"))
        );
        assert_eq!(
            bad(&|t| t.put(
                &info0,
                "Model: \t\t \nGPU UUID: \t GPU-aaf244da-41be-4bcb-f81d-0101b7560a41\n"
            )),
            Err(format!("{path0}: model \"\" is not a model name"))
        );
        assert_eq!(
            bad(&|t| t.put(
                &info0,
                information(&gpu(BUSES[3], &h200s(1)[0].uuid, "NVIDIA H200"))
            )),
            Err(format!(
                "{path0}: `Bus Location` is \"0000:5d:00.0\", but the folder is 0000:19:00.0"
            ))
        );
        assert_eq!(
            bad(&|t| t.put(&info0, format!("Model: x\n{}", information(&h200s(1)[0])))),
            Err(format!("{path0}: `Model` appears twice"))
        );
        assert_eq!(
            bad(&|t| t.put(
                &info0,
                information(&gpu(BUSES[0], &h200s(2)[1].uuid, "NVIDIA H200"))
            )),
            Err(format!(
                "/{GPUS_DIR}: 0000:19:00.0 and 0000:3b:00.0 both have UUID {}",
                h200s(2)[1].uuid
            ))
        );
        assert_eq!(
            bad(&|t| t.put(&format!("{GPUS_DIR}/0000:19:00.0x/information"), "")),
            Err(format!(
                "/{GPUS_DIR}: \"0000:19:00.0x\" is not a PCI bus id (like 0000:19:00.0)"
            ))
        );
        assert_eq!(
            bad(&|t| t.put(&format!("{GPUS_DIR}/0000:+9:00.0/information"), "")),
            Err(format!(
                "/{GPUS_DIR}: \"0000:+9:00.0\" is not a PCI bus id (like 0000:19:00.0)"
            ))
        );
        // A GPU folder spelt in upper case is the same bus id as the lower-case one.
        assert_eq!(
            bad(&|t| t.put(
                &info_file("0000:3B:00.0"),
                information(&gpu("0000:3B:00.0", &h200s(3)[2].uuid, "NVIDIA H200"))
            )),
            Err(format!(
                "/{GPUS_DIR}: 0000:3b:00.0 and 0000:3b:00.0 are the same bus id"
            ))
        );
        // A plain file where a GPU folder should be.
        assert_eq!(
            bad(&|t| t.put(&format!("{GPUS_DIR}/0000:ff:00.0"), "")),
            Err(format!(
                "cannot read /{GPUS_DIR}/0000:ff:00.0/information: Not a directory (os error 20)"
            ))
        );
    }

    #[test]
    fn read_machine_reads_the_real_root() {
        assert_eq!(read_machine(), read_machine_at(Path::new("/")));
    }

    /// A machine with `gpus` and the test driver and boot id.
    fn machine(gpus: Vec<Gpu>) -> Machine {
        Machine {
            driver_version: "580.159.04".into(),
            boot_id: BOOT.into(),
            gpus,
        }
    }

    /// Four H200s whose UUIDs share prefixes: 0 and 1 start `GPU-13170708-`.
    fn four() -> Machine {
        machine(vec![
            gpu(
                BUSES[0],
                "GPU-13170708-7d46-8d3e-f89b-a874380bab3d",
                "NVIDIA H200",
            ),
            gpu(
                BUSES[1],
                "GPU-13170708-aa11-4bcb-f81d-0101b7560a41",
                "NVIDIA H200",
            ),
            gpu(
                BUSES[2],
                "GPU-aaf244da-41be-4bcb-f81d-0101b7560a41",
                "NVIDIA H200",
            ),
            gpu(
                BUSES[3],
                "GPU-5e1d0c2b-0a9f-7e36-1c44-9d0e2b3f4a5c",
                "NVIDIA H200",
            ),
        ])
    }

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

    /// A typical fingerprint: two GPUs, kernel level.
    fn typical() -> Fingerprint {
        Fingerprint {
            version: "0.1.0".into(),
            level: "kernel".into(),
            check: "kernel_bytes=2097152".into(),
            driver_version: "580.159.04".into(),
            boot_id: BOOT.into(),
            cvd: Some("1,0".into()),
            devices: 2,
            gpus: vec![h200s(2)[1].clone(), h200s(2)[0].clone()],
        }
    }

    /// `typical()` vouching for `1->0` false, the rest true.
    fn record(fingerprint: Fingerprint) -> Record {
        let n = fingerprint.devices;
        Record {
            fingerprint,
            verdicts: (0..n * n).map(|k| k != n).collect(),
        }
    }

    const TYPICAL: &str = "format=2\np2pcheck=0.1.0\nlevel=kernel\ncheck=kernel_bytes=2097152\n\
        driver=580.159.04\nboot_id=c07e6ca8-09fe-4094-92d3-bd719ae256df\ncvd=1,0\ndevices=2\n\
        verdicts=11 01\n\
        gpu=0 GPU-13170709-7d46-8d3e-f89b-a874380bab3d 0000:3b:00.0 NVIDIA H200\n\
        gpu=1 GPU-13170708-7d46-8d3e-f89b-a874380bab3d 0000:19:00.0 NVIDIA H200\n";

    /// The keys before `cvd`, as `typical()` renders them.
    const HEAD: &str = "format=2\np2pcheck=0.1.0\nlevel=kernel\ncheck=kernel_bytes=2097152\n\
        driver=580.159.04\nboot_id=c07e6ca8-09fe-4094-92d3-bd719ae256df\n";

    #[test]
    fn render_writes_one_key_per_line() {
        assert_eq!(record(typical()).render(), TYPICAL);
        let unnamed = Fingerprint {
            cvd: None,
            driver_version: String::new(),
            devices: 3,
            gpus: vec![],
            ..typical()
        };
        assert_eq!(
            Record {
                fingerprint: unnamed,
                verdicts: vec![true, false, false, true, true, false, true, true, true],
            }
            .render(),
            "format=2\np2pcheck=0.1.0\nlevel=kernel\ncheck=kernel_bytes=2097152\ndriver=\n\
             boot_id=c07e6ca8-09fe-4094-92d3-bd719ae256df\ncvd=<unset>\ndevices=3\n\
             verdicts=100 110 111\n"
        );
        let none = Fingerprint {
            devices: 0,
            gpus: vec![],
            ..typical()
        };
        assert!(Record {
            fingerprint: none,
            verdicts: vec![],
        }
        .render()
        .ends_with("devices=0\nverdicts=\n"));
    }

    #[test]
    #[should_panic(expected = "a fingerprint of 2 devices needs their square of verdicts")]
    fn render_refuses_verdicts_of_another_size() {
        Record {
            fingerprint: typical(),
            verdicts: vec![true; 3],
        }
        .render();
    }

    #[test]
    fn parse_gives_back_what_render_wrote() {
        assert_eq!(Record::parse(TYPICAL), Ok(record(typical())));
        let odd = [
            Fingerprint {
                cvd: None,
                ..typical()
            },
            Fingerprint {
                cvd: Some(String::new()),
                gpus: vec![],
                ..typical()
            },
            // A set value that reads `<unset>` stays set.
            Fingerprint {
                cvd: Some("<unset>".into()),
                gpus: vec![],
                devices: 1,
                ..typical()
            },
            Fingerprint {
                cvd: Some(" 0,\t1\n%2,é\u{85}=x".into()),
                version: "0.1.0 %41".into(),
                level: String::new(),
                check: "a=b c%\n".into(),
                driver_version: String::new(),
                boot_id: String::new(),
                gpus: vec![gpu("bus 1", "GPU-a b%", ""), gpu("b", "u", " model  x\r")],
                ..typical()
            },
            Fingerprint {
                devices: 0,
                gpus: vec![],
                ..typical()
            },
        ];
        for fingerprint in odd {
            let r = record(fingerprint);
            let text = r.render();
            assert_eq!(Record::parse(&text), Ok(r), "{text:?}");
        }
        let escaped = Fingerprint {
            cvd: Some("<unset>".into()),
            gpus: vec![gpu("bus 1", "GPU-a b%", ""), gpu("b", "u", "m\tn")],
            ..typical()
        };
        assert!(record(escaped)
            .render()
            .ends_with("cvd=%3Cunset>\ndevices=2\nverdicts=11 01\ngpu=0 GPU-a%20b%25 bus%201\ngpu=1 u b m%09n\n"));
    }

    #[test]
    fn parse_rejects_anything_render_would_not_write() {
        let head = HEAD;
        let tail = "devices=1\nverdicts=1\n";
        let err = |text: &str| Record::parse(text).unwrap_err();
        assert_eq!(err(""), "the fingerprint is empty");
        assert_eq!(
            err(&TYPICAL[..TYPICAL.len() - 1]),
            "the last line has no newline (a truncated file?)"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}extra=1\n")),
            "line 10: unknown key \"extra\""
        );
        assert_eq!(
            err(&format!("{head}cvd=\ncvd=0\n")),
            "line 8: `cvd` appears twice"
        );
        assert_eq!(
            err(&format!("{head}level=copy\n")),
            "line 7: `level` appears twice"
        );
        assert_eq!(err(&format!("{head}cvd=\n")), "no `devices` line");
        assert_eq!(
            err(&head.replace("level=kernel\n", "")),
            "line 3: `check` comes before `level`"
        );
        assert_eq!(
            err(&format!("cvd=\n{head}")),
            "line 1: `cvd` comes before `format`"
        );
        assert_eq!(
            err(&format!("{head}cvd=\ndevices=1\ngpu=0 u b\nverdicts=1\n")),
            "line 9: a gpu line before `verdicts`"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}gpu=0 u b\ncvd=\n")),
            "line 11: `cvd` appears twice"
        );
        assert_eq!(
            err(&head.replace("format=2", "format=1")),
            "format \"1\" is not 2 (written by another p2pcheck?)"
        );
        assert_eq!(
            err(&format!("{head}cvd=0\r\n")),
            "line 7: control character '\\r'"
        );
        assert_eq!(
            err(&format!("{head}cvd=0\n\n")),
            "line 8: \"\" is not key=value"
        );
        assert_eq!(
            err(&format!("{head}cvd\n")),
            "line 7: \"cvd\" is not key=value"
        );
        // The verdicts: `devices` rows of `devices` digits, and none or one gpu line each.
        for (devices, verdicts, why) in [
            ("x", "1", "`devices`: \"x\" is not a number of GPUs"),
            ("01", "1", "`devices`: \"01\" is not a number of GPUs"),
            ("+1", "1", "`devices`: \"+1\" is not a number of GPUs"),
            ("", "", "`devices`: \"\" is not a number of GPUs"),
            ("1", "", "`verdicts`: row 0 has 0 digits, not 1"),
            ("1", "2", "`verdicts`: row 0 holds '2', not 1 or 0"),
            ("1", "1 1", "`verdicts`: more than 1 rows"),
            ("2", "11 1", "`verdicts`: row 1 has 1 digits, not 2"),
            ("2", "11", "`verdicts`: 1 rows, not 2"),
            ("2", "11  11", "`verdicts`: row 1 has 0 digits, not 2"),
            ("0", "1", "`verdicts`: verdicts for 0 devices"),
            (
                "18446744073709551615",
                "1",
                "`verdicts`: row 0 has 1 digits, not 18446744073709551615",
            ),
            (
                "18446744073709551616",
                "1",
                "`devices`: \"18446744073709551616\" is not a number of GPUs",
            ),
        ] {
            assert_eq!(
                err(&format!(
                    "{head}cvd=\ndevices={devices}\nverdicts={verdicts}\n"
                )),
                why,
                "{devices} {verdicts}"
            );
        }
        assert_eq!(
            err(&format!(
                "{head}cvd=\ndevices=2\nverdicts=11 11\ngpu=0 u b\n"
            )),
            "1 gpu lines for 2 devices (one per device, or none)"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}gpu=1 u b\n")),
            "line 10: gpu index \"1\" where 0 was due"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}gpu=00 u b\n")),
            "line 10: gpu index \"00\" where 0 was due"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}gpu=0 u\n")),
            "line 10: gpu line \"0 u\" is not `<index> <uuid> <bus id> <model>`"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}gpu=0  b\n")),
            "line 10: GPU 0 has an empty UUID or bus id"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}gpu=0 u b\ngpu=1 v b\n")),
            "line 11: GPU 1 repeats GPU 0's UUID or bus id"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}gpu=0 u b\ngpu=1 u c\n")),
            "line 11: GPU 1 repeats GPU 0's UUID or bus id"
        );
        assert_eq!(
            err(&format!("{head}cvd=%4\n{tail}")),
            "`cvd`: a `%` at byte 0 is not followed by two hex digits"
        );
        assert_eq!(
            err(&format!("{head}cvd=0%zz\n{tail}")),
            "`cvd`: a `%` at byte 1 is not followed by two hex digits"
        );
        assert_eq!(
            err(&format!("{head}cvd=%FF\n{tail}")),
            "`cvd`: its escapes do not make UTF-8 text"
        );
        assert_eq!(
            err(&format!("{head}cvd=\n{tail}gpu=0 u%G0 b\n")),
            "line 10: GPU 0's UUID: a `%` at byte 1 is not followed by two hex digits"
        );
        // Escapes that decode but that render would not write: lower case, or needless.
        let canonical =
            "it is not exactly what p2pcheck writes (needless or lower-case escapes, or spacing)";
        assert_eq!(err(&format!("{head}cvd=%3c\n{tail}")), canonical);
        assert_eq!(err(&format!("{head}cvd=%41\n{tail}")), canonical);
        assert_eq!(err(&format!("{head}cvd=\n{tail}gpu=0 u b \n")), canonical);
        // A gpu line without a model is what render writes for an empty model.
        assert_eq!(
            Record::parse(&format!("{head}cvd=\n{tail}gpu=0 u b\n")).map(|r| r.fingerprint.gpus),
            Ok(vec![gpu("b", "u", "")])
        );
    }

    #[test]
    fn difference_names_the_first_change() {
        let was = typical();
        let now = |edit: &dyn Fn(&mut Fingerprint)| {
            let mut f = typical();
            edit(&mut f);
            f.difference(&was)
        };
        assert_eq!(was.difference(&typical()), None);
        assert_eq!(
            now(&|f| f.version = "0.2.0".into()),
            Some("p2pcheck 0.1.0 -> 0.2.0".into())
        );
        assert_eq!(
            now(&|f| f.level = "copy".into()),
            Some("check level kernel -> copy".into())
        );
        assert_eq!(
            now(&|f| f.check = "kernel_bytes=262144".into()),
            Some("check settings \"kernel_bytes=2097152\" -> \"kernel_bytes=262144\"".into())
        );
        assert_eq!(
            now(&|f| f.driver_version = "580.160.01".into()),
            Some("driver 580.159.04 -> 580.160.01".into())
        );
        assert_eq!(
            now(&|f| f.driver_version = String::new()),
            Some("driver 580.159.04 -> unknown".into())
        );
        assert_eq!(
            now(&|f| f.boot_id = "0bd7dd0c-3a6e-4e5b-9a8c-1d4a1b7e6f20".into()),
            Some(
                "the machine rebooted (boot id c07e6ca8-09fe-4094-92d3-bd719ae256df -> \
                 0bd7dd0c-3a6e-4e5b-9a8c-1d4a1b7e6f20)"
                    .into()
            )
        );
        assert_eq!(
            now(&|f| f.cvd = None),
            Some("CUDA_VISIBLE_DEVICES \"1,0\" -> unset".into())
        );
        assert_eq!(
            now(&|f| f.cvd = Some(" 1,0".into())),
            Some("CUDA_VISIBLE_DEVICES \"1,0\" -> \" 1,0\"".into())
        );
        assert_eq!(
            now(&|f| {
                f.devices = 1;
                f.gpus.truncate(1)
            }),
            Some("visible GPUs 2 -> 1".into())
        );
        assert_eq!(
            now(&|f| f.gpus.clear()),
            Some("the GPUs cannot be named without CUDA now".into())
        );
        assert_eq!(
            Fingerprint {
                gpus: vec![],
                ..typical()
            }
            .difference(&Fingerprint {
                gpus: vec![],
                ..typical()
            }),
            None
        );
        assert_eq!(
            typical().difference(&Fingerprint {
                gpus: vec![],
                ..typical()
            }),
            Some("the GPUs could not be named without CUDA when it was written".into())
        );
        assert_eq!(
            now(&|f| f.gpus[1].uuid = "GPU-5e1d0c2b-0a9f-7e36-1c44-9d0e2b3f4a5c".into()),
            Some(
                "GPU 1 is now GPU-5e1d0c2b-0a9f-7e36-1c44-9d0e2b3f4a5c (was \
                 GPU-13170708-7d46-8d3e-f89b-a874380bab3d)"
                    .into()
            )
        );
        assert_eq!(
            now(&|f| f.gpus[0].bus_id = "0000:bb:00.0".into()),
            Some(
                "GPU 0 (GPU-13170709-7d46-8d3e-f89b-a874380bab3d) is now at 0000:bb:00.0 (was \
                 at 0000:3b:00.0)"
                    .into()
            )
        );
        assert_eq!(
            now(&|f| f.gpus[0].model = String::new()),
            Some(
                "GPU 0 (GPU-13170709-7d46-8d3e-f89b-a874380bab3d) model \"NVIDIA H200\" -> \"\""
                    .into()
            )
        );
        // Several changes: the first in the documented order is named.
        assert_eq!(
            now(&|f| {
                f.boot_id = "x".into();
                f.driver_version = "1.2".into();
                f.gpus.clear();
            }),
            Some("driver 580.159.04 -> 1.2".into())
        );
        assert_eq!(
            now(&|f| {
                f.driver_version = "1.2".into();
                f.check = String::new();
            }),
            Some("check settings \"kernel_bytes=2097152\" -> \"\"".into())
        );
    }

    #[test]
    fn a_fingerprint_vouches_for_exactly_its_verdicts_under_its_check_and_machine() {
        let now = typical();
        let vouching = record(typical());
        let text = vouching.render();
        let mine = vouching.verdicts.clone();
        assert_eq!(now.vouched(Some(&text), &mine), Ok(()));
        // The same fingerprint beside other verdicts (another write's file): not an answer.
        for k in 0..mine.len() {
            let mut other = mine.clone();
            other[k] = !other[k];
            assert_eq!(
                now.vouched(Some(&text), &other),
                Err(
                    "its p2pcheck fingerprint vouches for other verdicts than it holds (a \
                     write that was interrupted, or another program wrote it since)"
                        .into()
                )
            );
        }
        // Another level or settings: another check, whatever the verdicts.
        for edit in [
            (|f: &mut Fingerprint| f.level = "copy".into()) as fn(&mut Fingerprint),
            |f| f.check = "kernel_bytes=262144".into(),
            |f| f.version = "0.0.9".into(),
        ] {
            let mut f = typical();
            edit(&mut f);
            let text = record(f).render();
            let why = now.vouched(Some(&text), &mine).unwrap_err();
            assert!(
                why.starts_with("it was written by another check: "),
                "{why}"
            );
        }
        let moved = record(Fingerprint {
            boot_id: "0bd7dd0c-3a6e-4e5b-9a8c-1d4a1b7e6f20".into(),
            ..typical()
        })
        .render();
        let why = now.vouched(Some(&moved), &mine).unwrap_err();
        assert!(
            why.starts_with("the machine changed since it was written: the machine rebooted"),
            "{why}"
        );
        assert_eq!(
            now.vouched(Some("format=1\n"), &mine),
            Err(
                "its p2pcheck fingerprint is unusable: format \"1\" is not 2 (written by \
                 another p2pcheck?)"
                    .into()
            )
        );
        assert_eq!(
            now.vouched(None, &mine),
            Err("no p2pcheck fingerprint beside it: its origin is unknown".into())
        );
    }

    #[test]
    fn unnamed_gpus_answer_without_a_fingerprint_only_at_level_copy() {
        let unnamed = |level: &str| Fingerprint {
            level: level.into(),
            driver_version: String::new(),
            gpus: vec![],
            ..typical()
        };
        let v = record(unnamed("copy")).verdicts;
        // vLLM's own file, vLLM's own test: trusted as vLLM trusts it.
        assert_eq!(unnamed("copy").vouched(None, &v), Ok(()));
        for level in ["kernel", "handshake"] {
            assert_eq!(
                unnamed(level).vouched(None, &v),
                Err(format!(
                    "no p2pcheck fingerprint beside it, and the GPUs cannot be named without \
                     CUDA: nothing confirms that it holds {level}-level verdicts"
                ))
            );
            // A fingerprint confirms the level and the verdicts: it answers.
            let text = record(unnamed(level)).render();
            assert_eq!(unnamed(level).vouched(Some(&text), &v), Ok(()));
            let copy = record(unnamed("copy")).render();
            assert_eq!(
                unnamed(level).vouched(Some(&copy), &v),
                Err(format!(
                    "it was written by another check: check level copy -> {level}"
                ))
            );
        }
        // At level copy a fingerprint, where there is one, must still vouch.
        let text = record(unnamed("handshake")).render();
        assert!(unnamed("copy").vouched(Some(&text), &v).is_err());
    }

    #[test]
    fn the_fingerprint_file_is_hidden_beside_the_cache_file() {
        assert_eq!(
            path_beside(Path::new(
                "/home/u/.cache/vllm/gpu_p2p_access_cache_for_0,1.json"
            )),
            PathBuf::from(
                "/home/u/.cache/vllm/.gpu_p2p_access_cache_for_0,1.json.p2pcheck-fingerprint"
            )
        );
        assert_eq!(
            path_beside(Path::new("c.json")),
            PathBuf::from(".c.json.p2pcheck-fingerprint")
        );
        assert_eq!(
            path_beside(Path::new("/")),
            PathBuf::from("..p2pcheck-fingerprint")
        );
        assert_eq!(
            path_beside(Path::new("/tmp/..")),
            PathBuf::from("/tmp/..p2pcheck-fingerprint")
        );
    }

    /// xorshift64: a few hundred reproducible pseudo-random inputs without a crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Pieces the fuzz inputs are built from: the format's own syntax, and trouble.
    const PIECES: [&str; 24] = [
        "=",
        "\n",
        "%",
        " ",
        "0",
        "1",
        "9",
        "A",
        "f",
        "<unset>",
        "-",
        ".",
        ":",
        "\t",
        "\r",
        "é",
        "\u{85}",
        "gpu=",
        "cvd=",
        "format=2\n",
        "%3C",
        "%C2%85",
        "GPU-",
        "MIG-1",
    ];

    /// One to three random edits of `text`: insert, delete, replace, repeat or drop a line, cut.
    fn mutate(rng: &mut Rng, text: &str) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(chars.len() + 1);
            let piece: Vec<char> = PIECES[rng.below(PIECES.len())].chars().collect();
            match rng.below(5) {
                0 => {
                    chars.splice(at..at, piece);
                }
                1 if at < chars.len() => {
                    chars.remove(at);
                }
                2 if at < chars.len() => {
                    chars.splice(at..at + 1, piece);
                }
                3 => {
                    let s: String = chars.iter().collect();
                    let mut lines: Vec<&str> = s.split_inclusive('\n').collect();
                    if !lines.is_empty() {
                        let i = rng.below(lines.len());
                        if rng.below(2) == 0 {
                            lines.insert(i, lines[i]);
                        } else {
                            lines.remove(i);
                        }
                    }
                    chars = lines.concat().chars().collect();
                }
                _ => chars.truncate(at),
            }
        }
        chars.into_iter().collect()
    }

    #[test]
    fn fuzzed_input_never_panics_and_what_parses_renders_back() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let base = [
            TYPICAL.to_string(),
            record(Fingerprint {
                cvd: None,
                ..typical()
            })
            .render(),
        ];
        let m = four();
        let (mut parsed, mut refused) = (0, 0);
        for round in 0..600 {
            let text = if round % 3 == 0 {
                (0..rng.below(40))
                    .map(|_| PIECES[rng.below(PIECES.len())])
                    .collect::<String>()
            } else {
                mutate(&mut rng, &base[round % 2])
            };
            match Record::parse(&text) {
                Ok(f) => {
                    assert_eq!(f.render(), text);
                    parsed += 1;
                }
                Err(why) => {
                    assert!(!why.is_empty());
                    refused += 1;
                }
            }
            // The same text as driver files and as CUDA_VISIBLE_DEVICES: no panic, and a
            // mapping never names a GPU twice.
            let _ = driver_version(&text);
            let _ = parse_information(&text, "0000:19:00.0");
            let _ = parse_bus_id(&text);
            for order in [None, Some("PCI_BUS_ID")] {
                if let Ok(gpus) = resolve_visible(Some(&text), order, &m) {
                    for (i, g) in gpus.iter().enumerate() {
                        assert!(!gpus[..i].contains(g), "{text:?}");
                    }
                }
            }
        }
        // Both outcomes are exercised (some edits, like a changed digit, still parse); the
        // exact counts pin the acceptance rule, so a change to it shows up here.
        assert_eq!((parsed, refused), (58, 542));
    }
}

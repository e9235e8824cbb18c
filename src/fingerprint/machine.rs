//! The machine as NVIDIA's kernel driver describes it in `/proc`, read without CUDA:
//!
//! * `/proc/driver/nvidia/version`: the driver version, on the `NVRM version:` line;
//! * `/proc/driver/nvidia/gpus/<bus id>/information`: each GPU's model and UUID;
//! * `/proc/sys/kernel/random/boot_id`: new at every boot.
//!
//! Every read is bounded (64 KiB) and never blocks ([`files::read_bounded`]), so a FIFO, a
//! device or a huge file put where a `/proc` file should be can neither hang nor flood the
//! caller.

use std::fs;
use std::io;
use std::path::Path;

use crate::files;

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
///
/// # Errors
///
/// As [`read_machine_at`].
pub fn read_machine() -> Result<Machine, String> {
    read_machine_at(Path::new("/"))
}

/// Same, with every path under `root` (tests build a fake tree in a temp dir).
///
/// Fails, naming the file and the reason, when a file is missing, unreadable, not a regular
/// file, over 64 KiB, not UTF-8 or not in the driver's format; when the GPUs folder holds
/// anything but bus-id folders; or when two GPUs share a bus id or UUID. A folder with no GPUs
/// gives an empty list.
///
/// # Errors
///
/// The text above, naming the file: why the machine cannot be described without CUDA.
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
///
/// # Errors
///
/// Why it cannot be read, naming the file, or why what it holds is not a boot id.
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

/// Reads a small text file without ever blocking on it (see [`files::read_bounded`]), at most
/// [`MAX_FILE_BYTES`] of it, as UTF-8.
fn read_text(path: &Path) -> Result<String, ReadError> {
    let bytes = files::read_bounded(path, MAX_FILE_BYTES).map_err(|e| ReadError {
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

/// The version on the first `NVRM version:` line: its first token of digits and dots with at
/// least one dot (`580.159.04`). Both the open and the proprietary module write it there, after
/// words that never look like that (`x86_64`, `Module`).
pub(super) fn driver_version(text: &str) -> Option<String> {
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
pub(super) fn parse_information(text: &str, bus_id: &str) -> Result<Gpu, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::fixtures::*;
    use std::path::PathBuf;
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

    const OPEN_VERSION: &str = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  \
        580.159.04  Release Build  (dvs-builder@U22-I3-AM02-24-3)  Wed Oct 29 01:23:45 UTC 2025\n\
        GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04) \n";

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
}

//! What a cached P2P answer depends on (the [`Fingerprint`]), read without initialising CUDA,
//! and whether the fingerprint file beside vLLM's cache file vouches for its verdicts.
//!
//! Why without CUDA: `cuInit` takes seconds on a large machine and claims resources on every
//! GPU, while "is the cached answer still valid?" is asked on every start-up and should cost no
//! more than reading a few small files. One concern per file:
//!
//! * `machine`: the driver's `/proc` files ([`read_machine`]);
//! * `resolve`: `CUDA_VISIBLE_DEVICES` mapped onto those GPUs ([`resolve_visible`]). It
//!   assumes CUDA enumerates exactly the GPUs listed under `/proc/driver/nvidia/gpus`; where it
//!   may order them differently (mixed models without `CUDA_DEVICE_ORDER=PCI_BUS_ID`) or where
//!   an entry is a MIG instance, it says so instead of guessing;
//! * `format`: the fingerprint file's text ([`Record`]);
//! * here: the fingerprint, its differences, and vouching ([`Fingerprint::vouched`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

mod format;
mod machine;
mod resolve;

pub use format::Record;
pub(crate) use machine::parse_bus_id;
pub use machine::{read_boot_id, read_machine, read_machine_at, Gpu, Machine};
pub use resolve::resolve_visible;

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
    /// `self`. (The two in one, for the tests.)
    #[cfg(test)]
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
    ///
    /// # Errors
    ///
    /// Why the file may not answer (its origin unknown, another check, a changed machine,
    /// other verdicts), for [`cache::Origin::Recomputed`](crate::cache::Origin::Recomputed).
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

/// Values the tests of this folder share: GPUs, machines, fingerprints.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub(crate) const BOOT: &str = "c07e6ca8-09fe-4094-92d3-bd719ae256df";

    pub(crate) fn gpu(bus_id: &str, uuid: &str, model: &str) -> Gpu {
        Gpu {
            bus_id: bus_id.into(),
            uuid: uuid.into(),
            model: model.into(),
        }
    }

    /// The bus ids of an 8-GPU H200 machine, in bus order.
    pub(crate) const BUSES: [&str; 8] = [
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
    pub(crate) fn h200s(n: usize) -> Vec<Gpu> {
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

    /// A machine with `gpus` and the test driver and boot id.
    pub(crate) fn machine(gpus: Vec<Gpu>) -> Machine {
        Machine {
            driver_version: "580.159.04".into(),
            boot_id: BOOT.into(),
            gpus,
        }
    }

    /// Four H200s whose UUIDs share prefixes: 0 and 1 start `GPU-13170708-`.
    pub(crate) fn four() -> Machine {
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

    /// A typical fingerprint: two GPUs, kernel level.
    pub(crate) fn typical() -> Fingerprint {
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
    pub(crate) fn record(fingerprint: Fingerprint) -> Record {
        let n = fingerprint.devices;
        Record {
            fingerprint,
            verdicts: (0..n * n).map(|k| k != n).collect(),
        }
    }

    pub(crate) const TYPICAL: &str =
        "format=2\np2pcheck=0.1.0\nlevel=kernel\ncheck=kernel_bytes=2097152\n\
        driver=580.159.04\nboot_id=c07e6ca8-09fe-4094-92d3-bd719ae256df\ncvd=1,0\ndevices=2\n\
        verdicts=11 01\n\
        gpu=0 GPU-13170709-7d46-8d3e-f89b-a874380bab3d 0000:3b:00.0 NVIDIA H200\n\
        gpu=1 GPU-13170708-7d46-8d3e-f89b-a874380bab3d 0000:19:00.0 NVIDIA H200\n";

    /// The keys before `cvd`, as `typical()` renders them.
    pub(crate) const HEAD: &str =
        "format=2\np2pcheck=0.1.0\nlevel=kernel\ncheck=kernel_bytes=2097152\n\
        driver=580.159.04\nboot_id=c07e6ca8-09fe-4094-92d3-bd719ae256df\n";
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::machine::{driver_version, parse_information};
    use super::*;

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

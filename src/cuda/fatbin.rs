//! The kernels' image, `csrc/kernels.fatbin` (made by `scripts/gen-kernels.sh`): a CUDA fat
//! binary with SASS for the GPUs of `SASS_ARCHS` and PTX for `PTX_ARCH` (its tests' pins), so
//! that on those GPUs `cuModuleLoadData` takes ready machine code and nothing waits for the
//! driver's JIT (whose cache is empty in a fresh container), while newer GPUs still JIT-compile
//! the PTX.
//!
//! The container's layout (as `cuobjdump` reads it): a 16-byte header (magic `0xBA55ED50`, u16
//! version, u16 header size, u64 size of what follows), then entries, each a header (u16 kind:
//! 1 PTX, 2 ELF/SASS; u16 version; u32 header size; u64 payload size; ...; u32 architecture at
//! byte 28) and its payload.

/// Architectures whose SASS the image must hold (`sm_XY` as XY), in `scripts/gen-kernels.sh`'s
/// order: data-centre and workstation GPUs CUDA 13 supports.
#[cfg(test)]
const SASS_ARCHS: [u32; 7] = [75, 80, 86, 89, 90, 100, 120];

/// The virtual architecture of the PTX the image must hold (the JIT's input on newer GPUs).
#[cfg(test)]
const PTX_ARCH: u32 = 75;

/// The image, aligned as the driver wants a fat binary in memory.
#[repr(C, align(16))]
struct Aligned<T: ?Sized>(T);
static IMAGE: &Aligned<[u8]> = &Aligned(*include_bytes!("../../csrc/kernels.fatbin"));

/// The embedded image's bytes.
pub(crate) fn image() -> &'static [u8] {
    &IMAGE.0
}

const MAGIC: u32 = 0xBA55_ED50;

/// What an entry of the container holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Code {
    /// PTX for a virtual architecture (`compute_XY`).
    Ptx,
    /// Machine code for one GPU architecture (`sm_XY`).
    Sass,
}

/// One entry of the container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub code: Code,
    /// `XY` of `sm_XY` / `compute_XY`.
    pub arch: u32,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The entries of the fat binary `b`, in order; `Err` says where it is malformed. Every size
/// is checked against the bytes there before it is used.
pub(crate) fn entries(b: &[u8]) -> Result<Vec<Entry>, String> {
    let magic = u32_at(b, 0).ok_or("shorter than a fat binary header")?;
    if magic != MAGIC {
        return Err(format!("magic {magic:#x}, not a fat binary ({MAGIC:#x})"));
    }
    let header = usize::from(u16_at(b, 6).ok_or("truncated header")?);
    let body = u64_at(b, 8).ok_or("truncated header")?;
    let end = usize::try_from(body)
        .ok()
        .and_then(|body| header.checked_add(body))
        .filter(|&end| end <= b.len() && header >= 16)
        .ok_or_else(|| {
            format!(
                "its header claims {body} bytes after {header}, {} are there",
                b.len()
            )
        })?;
    let mut out = Vec::new();
    let mut at = header;
    while at < end {
        let bad = || format!("entry {} at byte {at} is truncated or oversized", out.len());
        let kind = u16_at(b, at).ok_or_else(bad)?;
        let entry_header = u32_at(b, at + 4).ok_or_else(bad)? as usize;
        let payload = u64_at(b, at + 8).ok_or_else(bad)?;
        let arch = u32_at(b, at + 28).ok_or_else(bad)?;
        let next = usize::try_from(payload)
            .ok()
            .and_then(|p| at.checked_add(entry_header)?.checked_add(p))
            .filter(|&next| next <= end && entry_header >= 32)
            .ok_or_else(bad)?;
        let code = match kind {
            1 => Code::Ptx,
            2 => Code::Sass,
            k => {
                return Err(format!(
                    "entry {} at byte {at} is of unknown kind {k}",
                    out.len()
                ))
            }
        };
        out.push(Entry { code, arch });
        at = next;
    }
    Ok(out)
}

/// What the driver loaded for a kernel, from `cuFuncGetAttribute`'s PTX and binary versions:
/// every SASS of this image was compiled from PTX of its own architecture, so a binary built
/// from PTX of another architecture (the image's PTX entry) is the JIT's work.
pub(crate) fn taken(ptx_version: i32, binary_version: i32) -> String {
    if ptx_version == binary_version {
        format!("SASS sm_{binary_version}")
    } else {
        format!("PTX compute_{ptx_version}, JIT-compiled for sm_{binary_version}")
    }
}

/// The embedded image in words, from its own entries, for the trace: "csrc/kernels.fatbin
/// (embedded): SASS sm_75 ..., PTX compute_75".
pub(crate) fn describe() -> String {
    match entries(image()) {
        Ok(entries) => {
            let list = |code: Code, prefix: &str| {
                let names: Vec<String> = entries
                    .iter()
                    .filter(|e| e.code == code)
                    .map(|e| format!("{prefix}{}", e.arch))
                    .collect();
                names.join(" ")
            };
            format!(
                "csrc/kernels.fatbin (embedded): SASS {}, PTX {}",
                list(Code::Sass, "sm_"),
                list(Code::Ptx, "compute_")
            )
        }
        Err(why) => format!("csrc/kernels.fatbin (embedded; unreadable here: {why})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_image_holds_sass_for_every_listed_architecture_and_the_ptx() {
        let got = entries(image()).expect("csrc/kernels.fatbin parses");
        let sass: Vec<u32> = got
            .iter()
            .filter(|e| e.code == Code::Sass)
            .map(|e| e.arch)
            .collect();
        assert_eq!(sass, SASS_ARCHS, "SASS entries of csrc/kernels.fatbin");
        let ptx: Vec<u32> = got
            .iter()
            .filter(|e| e.code == Code::Ptx)
            .map(|e| e.arch)
            .collect();
        assert_eq!(ptx, [PTX_ARCH], "PTX entries of csrc/kernels.fatbin");
        assert_eq!(
            image().as_ptr() as usize % 16,
            0,
            "the image is 16-byte aligned"
        );
        assert_eq!(
            describe(),
            "csrc/kernels.fatbin (embedded): SASS sm_75 sm_80 sm_86 sm_89 sm_90 sm_100 sm_120, \
             PTX compute_75"
        );
    }

    #[test]
    fn malformed_images_are_refused_with_a_reason() {
        let good = image();
        assert!(entries(&good[..8]).unwrap_err().contains("truncated"));
        assert!(entries(b"not a fatbin at all")
            .unwrap_err()
            .contains("magic"));
        // A header claiming more bytes than there are.
        let mut long = good[..64].to_vec();
        long[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(entries(&long).unwrap_err().contains("claims"));
        // An entry whose payload runs past the end.
        let mut cut = good[..4096].to_vec();
        cut[8..16].copy_from_slice(&(4096u64 - 16).to_le_bytes());
        assert!(entries(&cut).unwrap_err().contains("entry 0"));
        // An unknown kind.
        let mut odd = good.to_vec();
        odd[16] = 9;
        assert!(entries(&odd).unwrap_err().contains("unknown kind 9"));
    }

    #[test]
    fn the_image_taken_is_named_from_the_kernels_versions() {
        assert_eq!(taken(90, 90), "SASS sm_90");
        assert_eq!(taken(75, 90), "PTX compute_75, JIT-compiled for sm_90");
    }
}

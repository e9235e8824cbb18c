//! The fingerprint file's text: `key=value` lines with `%XX` escapes ([`Record`]).

use std::fmt::Write as _;

use super::{Fingerprint, Gpu};

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
    ///
    /// # Errors
    ///
    /// What makes the text not a fingerprint file, naming its line.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::fixtures::*;

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
}

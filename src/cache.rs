//! vLLM's P2P access cache file: where it lives, its exact bytes, and computing it once.
//!
//! vLLM's `gpu_p2p_access_check` keeps one file per `CUDA_VISIBLE_DEVICES` value,
//! `$VLLM_CACHE_ROOT/gpu_p2p_access_cache_for_{CVD}.json`, holding one flat JSON object with a
//! boolean for every ordered device pair, `"src->tgt"`, written by `json.dump(cache, f,
//! indent=4)`. This module writes the same bytes ([`render`]) and reads any JSON with those keys
//! ([`parse`]), and improves on vLLM where vLLM can go wrong:
//!
//! * the file is written atomically (temp file, fsync, rename: [`write_atomic`]), so a crash
//!   never leaves a truncated file behind;
//! * processes racing on a cold cache compute it once: the writer holds an advisory lock
//!   ([`FileLock`], on [`lock_path`]) that waiters give up on after a deadline;
//! * a corrupt file is recomputed and reported ([`Origin::Recomputed`]) instead of crashing.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use once_cell::sync::Lazy;

use crate::json::{self, Value};
use crate::os;

/// The directory vLLM keeps its cache in, given an environment lookup: `$VLLM_CACHE_ROOT`, else
/// `$XDG_CACHE_HOME/vllm`, else `$HOME/.cache/vllm`; a leading `~` is expanded with `$HOME` as
/// vLLM's `os.path.expanduser` does.
///
/// Differences from vLLM, all for cases where vLLM's answer is useless: a variable set to the
/// empty string counts as unset (vLLM would use a path relative to the working directory), and
/// `~user/…` or a `~` without `$HOME` is an error (vLLM asks the password database).
pub fn cache_dir_from(lookup: impl Fn(&str) -> Option<String>) -> Result<PathBuf> {
    let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
    let (var, dir) = if let Some(root) = get("VLLM_CACHE_ROOT") {
        ("VLLM_CACHE_ROOT", root)
    } else if let Some(xdg) = get("XDG_CACHE_HOME") {
        ("XDG_CACHE_HOME", format!("{xdg}/vllm"))
    } else if let Some(home) = get("HOME") {
        ("HOME", format!("{home}/.cache/vllm"))
    } else {
        bail!(
            "cannot locate vLLM's cache directory: \
             none of VLLM_CACHE_ROOT, XDG_CACHE_HOME and HOME is set"
        );
    };
    let Some(rest) = dir.strip_prefix('~') else {
        return Ok(PathBuf::from(dir));
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        bail!("{var} is {dir:?}: only `~` and `~/…` are expanded, write the home directory out");
    }
    let home = get("HOME")
        .with_context(|| format!("{var} is {dir:?}, but HOME is not set to expand `~`"))?;
    // As Python: the home directory without trailing slashes, then the rest ("/" if nothing).
    let expanded = format!("{}{rest}", home.trim_end_matches('/'));
    Ok(PathBuf::from(if expanded.is_empty() {
        "/".to_string()
    } else {
        expanded
    }))
}

/// [`cache_dir_from`] this process's environment.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(|name| std::env::var(name).ok())
}

/// The cache file's name for a `CUDA_VISIBLE_DEVICES` key (see [`crate::visible::cache_key`]).
///
/// A `/` in the key (old-style MIG ids, `MIG-GPU-<uuid>/1/0`) is written `_`, to keep the name a
/// single file name. vLLM does not do this: its `os.makedirs(os.path.dirname(path))` turns each
/// `/` into a subdirectory level (`gpu_p2p_access_cache_for_MIG-GPU-<uuid>/1/0.json`), so for
/// such keys vLLM and this crate do not share a file.
pub fn file_name(cvd_key: &str) -> String {
    format!(
        "gpu_p2p_access_cache_for_{}.json",
        cvd_key.replace('/', "_")
    )
}

/// The lock file that guards the cache file `path`: `path` with `.lock` appended.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

/// The cache file's contents for `n` devices, byte for byte what vLLM's
/// `json.dump(cache, f, indent=4)` writes: keys `"i->j"` row-major (`i` outer), no trailing
/// newline, `{}` for no devices.
///
/// # Panics
///
/// If `verdicts.len() != n * n`: that is a bug in the caller, not bad data.
/// [`load_or_compute`] and [`store`] check it and return an error instead.
pub fn render(n: usize, verdicts: &[bool]) -> String {
    assert_eq!(
        verdicts.len(),
        n * n,
        "render: {n} devices need {} verdicts",
        n * n
    );
    if n == 0 {
        return "{}".to_string();
    }
    let members: Vec<String> = verdicts
        .iter()
        .enumerate()
        .map(|(k, v)| format!("    {}: {v}", json::escape(&pair_key(k / n, k % n))))
        .collect();
    format!("{{\n{}\n}}", members.join(",\n"))
}

/// Reads a cache file's text for `n` devices into row-major verdicts.
///
/// Accepts any JSON object (any formatting, any member order) that has a boolean for every key
/// `"i->j"`, `i, j < n`. Other keys are ignored, as vLLM ignores them, except keys naming a
/// device `>= n`: those mean the file was written for more devices, so it is rejected (vLLM
/// would use it). The error says what is wrong, for a message such as "recomputed because …".
pub fn parse(text: &str, n: usize) -> Result<Vec<bool>, String> {
    if text.is_empty() {
        return Err("the file is empty".into());
    }
    let members = match json::parse(text).map_err(|e| e.to_string())? {
        Value::Object(members) => members,
        other => return Err(format!("it holds {}, not a JSON object", other.kind())),
    };
    let mut verdicts: Vec<Option<bool>> = vec![None; n * n];
    for (key, value) in &members {
        let Some((i, j)) = parse_pair_key(key) else {
            continue;
        };
        if i >= n || j >= n {
            return Err(format!(
                "key {} names device {}, but {n} device(s) were expected: the file is for more",
                json::escape(key),
                i.max(j)
            ));
        }
        match value {
            Value::Bool(b) => verdicts[i * n + j] = Some(*b),
            other => {
                return Err(format!(
                    "key {} holds {}, not true or false",
                    json::escape(key),
                    other.kind()
                ))
            }
        }
    }
    let found = verdicts.iter().filter(|v| v.is_some()).count();
    verdicts
        .iter()
        .enumerate()
        .map(|(k, v)| {
            v.ok_or_else(|| {
                format!(
                    "key {} is missing (the file has {found} of the {} pairs)",
                    json::escape(&pair_key(k / n, k % n)),
                    n * n
                )
            })
        })
        .collect()
}

/// `"i->j"`.
fn pair_key(i: usize, j: usize) -> String {
    format!("{i}->{j}")
}

/// The inverse of [`pair_key`]: `Some((i, j))` only for keys it could have written (plain
/// decimal, no leading zeros), as those are the only keys vLLM looks up.
fn parse_pair_key(key: &str) -> Option<(usize, usize)> {
    let (i, j) = key.split_once("->")?;
    let index = |s: &str| -> Option<usize> {
        let v: usize = s.parse().ok()?;
        (v.to_string() == s).then_some(v) // rejects "+1", "01"
    };
    Some((index(i)?, index(j)?))
}

/// Writes `contents` to `path` atomically: readers see the old file or the new one, never a
/// part. Writes a temp file in the same directory (created if missing), fsyncs it, renames it
/// over `path` and fsyncs the directory; the temp file is removed if any step fails.
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .with_context(|| format!("cannot write {}: it names no file", path.display()))?;
    let dir = create_parent(path)?;
    // Unique per process and call, and hidden, so no two writers share one and `ls` skips it.
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = write_then_rename(&tmp, path, contents);
    if written.is_err() {
        let _ = fs::remove_file(&tmp); // it may not exist; the first error is the one to report
    }
    written?;
    // Make the rename itself durable. Best effort: some file systems refuse to fsync a
    // directory, and the new file is already in place either way.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_then_rename(tmp: &Path, path: &Path, contents: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .with_context(|| format!("cannot create the temp file {}", tmp.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write the temp file {}", tmp.display()))?;
    fs::rename(tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// Creates `path`'s parent directory if missing and returns it (`.` for a bare file name).
fn create_parent(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    Ok(dir)
}

/// An exclusive advisory lock (`flock(2)`) on a file, held until dropped.
///
/// The lock file is never deleted: deleting it would let a process lock the old, unlinked file
/// while another locks a new one. The holder writes its pid into it, so a waiter that gives up
/// can say who had it.
#[derive(Debug)]
pub struct FileLock {
    /// Closing the file (on drop) releases the lock.
    file: File,
    path: PathBuf,
}

impl FileLock {
    /// Locks `path` (created, with its directory, if missing), waiting at most `timeout` for
    /// another holder to let go; the error then names the lock file, the timeout and the pid
    /// that last took the lock.
    pub fn acquire(path: &Path, timeout: Duration) -> Result<FileLock> {
        create_parent(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false) // the holder's pid is in there
            .open(path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_millis(2);
        while !os::try_lock_exclusive(&file)
            .with_context(|| format!("cannot lock {}", path.display()))?
        {
            let now = Instant::now();
            if now >= deadline {
                return Err(anyhow!(
                    "timed out after {timeout:?} waiting for the lock {} ({}); another process is \
                     probably computing the same cache: wait for it, or stop it",
                    path.display(),
                    last_holder(file)
                ));
            }
            // Short naps, growing to 100 ms: quick when the holder is quick, cheap when not.
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(100));
        }
        let mut lock = FileLock {
            file,
            path: path.to_path_buf(),
        };
        lock.record_holder();
        Ok(lock)
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes our pid into the lock file, for [`last_holder`]. Best effort: it only feeds a
    /// message.
    fn record_holder(&mut self) {
        let _ = self.file.set_len(0).and_then(|()| {
            self.file
                .write_all(format!("{}\n", std::process::id()).as_bytes())
        });
    }
}

/// Who last took a lock, from the pid its holder wrote.
fn last_holder(mut file: File) -> String {
    let mut text = String::new();
    match file
        .read_to_string(&mut text)
        .map(|_| text.trim().parse::<u32>())
    {
        Ok(Ok(pid)) => format!("last taken by pid {pid}"),
        _ => "its holder is unknown".to_string(),
    }
}

/// Where [`load_or_compute`]'s answer came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// This process already had it.
    Memo,
    /// Read from the cache file.
    File,
    /// There was no cache file: computed and written.
    Computed,
    /// The cache file was unusable: computed and written over it.
    Recomputed {
        /// What was wrong with the file, e.g. `key "0->1" is missing (…)`.
        reason: String,
    },
}

/// [`load_or_compute`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// One verdict per ordered pair, row-major: `verdicts[src * n + tgt]`.
    pub verdicts: Vec<bool>,
    /// Where they came from.
    pub origin: Origin,
}

/// Verdicts already loaded by this process, by cache file path as given.
static MEMO: Lazy<Mutex<HashMap<PathBuf, Vec<bool>>>> = Lazy::new(Mutex::default);

fn memo() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Vec<bool>>> {
    // A panic elsewhere while holding the lock cannot leave the map half-updated.
    MEMO.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Forgets what this process loaded, so the next [`load_or_compute`] reads the file again.
pub fn forget_memo() {
    memo().clear();
}

/// The verdicts for `n` devices from the cache file `path`, computing and writing them if the
/// file is missing or unusable.
///
/// In order: this process's memo; the file, read without the lock (vLLM's fast path); else,
/// under [`FileLock`] on [`lock_path`] (waiting at most `lock_timeout`), the file again (another
/// process may just have written it), else `compute()` (which must return `n * n` verdicts,
/// row-major), written with [`write_atomic`]. So racing processes compute once. An unreadable
/// file (permissions, a directory) is an error; an unparsable one is recomputed.
pub fn load_or_compute(
    path: &Path,
    n: usize,
    lock_timeout: Duration,
    compute: impl FnOnce() -> Result<Vec<bool>>,
) -> Result<Loaded> {
    if let Some(verdicts) = memo().get(path).filter(|v| v.len() == n * n) {
        return Ok(Loaded {
            verdicts: verdicts.clone(),
            origin: Origin::Memo,
        });
    }
    let loaded = |verdicts: Vec<bool>, origin| {
        memo().insert(path.to_path_buf(), verdicts.clone());
        Loaded { verdicts, origin }
    };
    if let Some(Ok(verdicts)) = read(path, n)? {
        return Ok(loaded(verdicts, Origin::File));
    }
    let _lock = FileLock::acquire(&lock_path(path), lock_timeout)?;
    let origin = match read(path, n)? {
        Some(Ok(verdicts)) => return Ok(loaded(verdicts, Origin::File)),
        Some(Err(reason)) => Origin::Recomputed { reason },
        None => Origin::Computed,
    };
    let verdicts = compute()
        .with_context(|| format!("cannot compute the P2P verdicts for {}", path.display()))?;
    check_len(n, &verdicts).context("the P2P check returned the wrong number of verdicts")?;
    write_atomic(path, &render(n, &verdicts))?;
    Ok(loaded(verdicts, origin))
}

/// How long a caller waits for another process that holds the lock (it is computing the same
/// file): ample for a cold 8-GPU check. [`store`] uses it; `gpu_p2p_access_check` passes it.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(300);

/// Writes `verdicts` for `n` devices (row-major) to the cache file `path`, under its lock, and
/// remembers them in the memo: for writing vLLM's cache from a check run by hand.
pub fn store(path: &Path, n: usize, verdicts: &[bool]) -> Result<()> {
    check_len(n, verdicts)?;
    let _lock = FileLock::acquire(&lock_path(path), LOCK_TIMEOUT)?;
    write_atomic(path, &render(n, verdicts))?;
    memo().insert(path.to_path_buf(), verdicts.to_vec());
    Ok(())
}

fn check_len(n: usize, verdicts: &[bool]) -> Result<()> {
    if verdicts.len() != n * n {
        bail!(
            "{} verdicts for {n} devices; expected {}",
            verdicts.len(),
            n * n
        );
    }
    Ok(())
}

/// The cache file: `None` if absent, else its verdicts or what is wrong with it; `Err` only
/// when it exists but cannot be read.
pub fn read(path: &Path, n: usize) -> Result<Option<Result<Vec<bool>, String>>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(Some(match String::from_utf8(bytes) {
        Ok(text) => parse(&text, n),
        Err(e) => Err(format!(
            "it is not UTF-8 text (bad byte at offset {})",
            e.utf8_error().valid_up_to()
        )),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "p2pcheck-cache-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join(file_name("0,1"))
        }

        fn names(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Serializes the tests that assert [`Origin::Memo`] with the one that clears the memo.
    static MEMO_TESTS: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        MEMO_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    const N2: &str =
        "{\n    \"0->0\": true,\n    \"0->1\": false,\n    \"1->0\": true,\n    \"1->1\": true\n}";
    const V2: [bool; 4] = [true, false, true, true];
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn never() -> Result<Vec<bool>> {
        bail!("compute must not be called")
    }

    use crate::testutil::env;

    #[test]
    fn render_writes_python_json_dump_bytes() {
        assert_eq!(render(0, &[]), "{}");
        assert_eq!(render(1, &[true]), "{\n    \"0->0\": true\n}");
        assert_eq!(render(2, &V2), N2);
    }

    #[test]
    fn render_four_gpus() {
        // Two pairs of GPUs; P2P only within a pair (and to itself).
        let v: Vec<bool> = (0..16).map(|k| k / 4 / 2 == k % 4 / 2).collect();
        let expected = "{
    \"0->0\": true,
    \"0->1\": true,
    \"0->2\": false,
    \"0->3\": false,
    \"1->0\": true,
    \"1->1\": true,
    \"1->2\": false,
    \"1->3\": false,
    \"2->0\": false,
    \"2->1\": false,
    \"2->2\": true,
    \"2->3\": true,
    \"3->0\": false,
    \"3->1\": false,
    \"3->2\": true,
    \"3->3\": true
}";
        assert_eq!(render(4, &v), expected);
        assert_eq!(parse(expected, 4).unwrap(), v);
    }

    #[test]
    #[should_panic(expected = "2 devices need 4 verdicts")]
    fn render_rejects_the_wrong_number_of_verdicts() {
        render(2, &[true]);
    }

    #[test]
    fn parse_reads_back_what_render_writes() {
        for n in 0..6 {
            let v: Vec<bool> = (0..n * n).map(|k| k % 3 != 1).collect();
            assert_eq!(parse(&render(n, &v), n).unwrap(), v, "n={n}");
        }
    }

    #[test]
    fn parse_accepts_any_json_with_the_keys() {
        let minified = r#"{"0->0":true,"0->1":false,"1->0":true,"1->1":true}"#;
        let reordered =
            "{ \"1->1\" : true , \"0->1\" : false,\r\n\t\"1->0\": true, \"0->0\": true }\n";
        let extra = r#"{"note": [1, {"x": null}], "00->1": 7, "0->0": true, "0->1": false,
            "1->0": true, "1->1": true, "a->b": "c", "-1->0": 1}"#;
        // Python's json keeps the last of repeated keys.
        let repeated = r#"{"0->0": true, "0->1": true, "1->0": true, "1->1": true, "0->1": false}"#;
        for text in [minified, reordered, extra, repeated] {
            assert_eq!(parse(text, 2).unwrap(), V2, "{text}");
        }
    }

    #[test]
    fn parse_explains_every_corruption() {
        for (text, n, reason) in [
            ("", 2, "the file is empty"),
            (
                " \n",
                2,
                "invalid JSON at byte 2: expected a JSON value, found end of input",
            ),
            (
                "{\"0->0\": tru",
                1,
                "invalid JSON at byte 12: expected true, found end of input",
            ),
            (
                "{\"0->0\": true}}",
                1,
                "invalid JSON at byte 14: expected end of input, found '}'",
            ),
            ("[true]", 1, "it holds an array, not a JSON object"),
            ("true", 1, "it holds a boolean, not a JSON object"),
            (
                "{}",
                1,
                "key \"0->0\" is missing (the file has 0 of the 1 pairs)",
            ),
            (
                "{\"0->0\": 1}",
                1,
                "key \"0->0\" holds a number, not true or false",
            ),
            (
                "{\"0->0\": \"true\"}",
                1,
                "key \"0->0\" holds a string, not true or false",
            ),
            (
                "{\"0->0\": null}",
                1,
                "key \"0->0\" holds null, not true or false",
            ),
            // Written for 1 device, read for 2, and the other way round.
            (
                "{\"0->0\": true}",
                2,
                "key \"0->1\" is missing (the file has 1 of the 4 pairs)",
            ),
            (
                N2,
                1,
                "key \"0->1\" names device 1, but 1 device(s) were expected: the file is for more",
            ),
            (
                N2,
                0,
                "key \"0->0\" names device 0, but 0 device(s) were expected: the file is for more",
            ),
        ] {
            assert_eq!(parse(text, n), Err(reason.to_string()), "{text:?} for {n}");
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let v: Vec<bool> = (0..9).map(|k| k % 2 == 0).collect();
        let full = render(3, &v);
        for end in 0..full.len() {
            assert!(parse(&full[..end], 3).is_err(), "{:?}", &full[..end]);
        }
        assert_eq!(parse(&full, 3).unwrap(), v);
    }

    #[test]
    fn cache_dir_follows_vllm() {
        let dir = |vars: &[(&str, &str)]| cache_dir_from(env(vars)).map_err(|e| e.to_string());
        let all = [
            ("VLLM_CACHE_ROOT", "/r"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(dir(&all), Ok("/r".into()));
        assert_eq!(dir(&all[1..]), Ok("/x/vllm".into()));
        assert_eq!(dir(&all[2..]), Ok("/h/.cache/vllm".into()));
        // Empty counts as unset.
        assert_eq!(
            dir(&[
                ("VLLM_CACHE_ROOT", ""),
                ("XDG_CACHE_HOME", ""),
                ("HOME", "/h")
            ]),
            Ok("/h/.cache/vllm".into())
        );
        // `~` is expanded, as vLLM's os.path.expanduser does.
        assert_eq!(
            dir(&[("VLLM_CACHE_ROOT", "~/c"), ("HOME", "/h/")]),
            Ok("/h/c".into())
        );
        assert_eq!(
            dir(&[("VLLM_CACHE_ROOT", "~"), ("HOME", "/h")]),
            Ok("/h".into())
        );
        assert_eq!(
            dir(&[("VLLM_CACHE_ROOT", "~"), ("HOME", "/")]),
            Ok("/".into())
        );
        assert_eq!(
            dir(&[("XDG_CACHE_HOME", "~/x"), ("HOME", "/h")]),
            Ok("/h/x/vllm".into())
        );
        assert_eq!(dir(&[("VLLM_CACHE_ROOT", "a~/c")]), Ok("a~/c".into()));
        let err = dir(&[("VLLM_CACHE_ROOT", "~bob/c"), ("HOME", "/h")]).unwrap_err();
        assert!(err.contains("VLLM_CACHE_ROOT is \"~bob/c\""), "{err}");
        let err = dir(&[("XDG_CACHE_HOME", "~/x")]).unwrap_err();
        assert!(
            err.contains("XDG_CACHE_HOME is \"~/x/vllm\", but HOME is not set"),
            "{err}"
        );
        let err = dir(&[("HOME", "")]).unwrap_err();
        assert!(
            err.contains("none of VLLM_CACHE_ROOT, XDG_CACHE_HOME and HOME is set"),
            "{err}"
        );
    }

    #[test]
    fn file_names_follow_vllm_but_stay_one_file() {
        assert_eq!(file_name("0,1"), "gpu_p2p_access_cache_for_0,1.json");
        assert_eq!(file_name(""), "gpu_p2p_access_cache_for_.json");
        assert_eq!(
            file_name("MIG-GPU-8932f937-d72c-4106-c12f-20bd9faed9f6/1/0"),
            "gpu_p2p_access_cache_for_MIG-GPU-8932f937-d72c-4106-c12f-20bd9faed9f6_1_0.json"
        );
        assert_eq!(
            lock_path(Path::new("/c/a.json")),
            Path::new("/c/a.json.lock")
        );
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temp_files() {
        let tmp = TempDir::new();
        let path = tmp.0.join("sub/dir").join(file_name("0"));
        write_atomic(&path, "first").unwrap(); // creates the directories
        write_atomic(&path, N2).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), N2);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_removes_its_temp_file() {
        let tmp = TempDir::new();
        let path = tmp.0.join("taken");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("x"), "").unwrap(); // a non-empty directory cannot be renamed over
        let err = format!("{:#}", write_atomic(&path, N2).unwrap_err());
        assert!(
            err.contains("cannot rename") && err.contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(tmp.names(), ["taken"]);
    }

    #[test]
    fn a_directory_that_cannot_be_created_is_named() {
        let tmp = TempDir::new();
        fs::write(tmp.0.join("file"), "").unwrap();
        let path = tmp.0.join("file/sub/cache.json");
        let err = format!("{:#}", write_atomic(&path, N2).unwrap_err());
        assert!(
            err.contains(&format!(
                "cannot create the directory {}",
                tmp.0.join("file/sub").display()
            )),
            "{err}"
        );
    }

    #[test]
    fn computes_once_then_answers_from_memo_then_file() {
        let _serial = serial();
        let tmp = TempDir::new();
        let path = tmp.file();
        let got = load_or_compute(&path, 2, TIMEOUT, || Ok(V2.to_vec())).unwrap();
        assert_eq!(
            got,
            Loaded {
                verdicts: V2.to_vec(),
                origin: Origin::Computed
            }
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), N2);
        let got = load_or_compute(&path, 2, TIMEOUT, never).unwrap();
        assert_eq!(
            got,
            Loaded {
                verdicts: V2.to_vec(),
                origin: Origin::Memo
            }
        );
        forget_memo();
        let got = load_or_compute(&path, 2, TIMEOUT, never).unwrap();
        assert_eq!(
            got,
            Loaded {
                verdicts: V2.to_vec(),
                origin: Origin::File
            }
        );
        let names = tmp.names();
        assert_eq!(
            names,
            [file_name("0,1"), format!("{}.lock", file_name("0,1"))]
        );
    }

    #[test]
    fn a_file_written_by_vllm_is_used() {
        let tmp = TempDir::new();
        let path = tmp.file();
        fs::write(
            &path,
            r#"{"0->0": true, "0->1": false, "1->0": true, "1->1": true}"#,
        )
        .unwrap();
        let got = load_or_compute(&path, 2, TIMEOUT, never).unwrap();
        assert_eq!(
            got,
            Loaded {
                verdicts: V2.to_vec(),
                origin: Origin::File
            }
        );
        assert_eq!(
            tmp.names(),
            [file_name("0,1")],
            "the fast path takes no lock"
        );
    }

    #[test]
    fn the_memo_is_per_device_count() {
        let _serial = serial();
        let tmp = TempDir::new();
        let path = tmp.file();
        load_or_compute(&path, 2, TIMEOUT, || Ok(V2.to_vec())).unwrap();
        let got = load_or_compute(&path, 1, TIMEOUT, || Ok(vec![false])).unwrap();
        assert!(matches!(got.origin, Origin::Recomputed { .. }), "{got:?}");
        assert_eq!(
            load_or_compute(&path, 1, TIMEOUT, never).unwrap().origin,
            Origin::Memo
        );
    }

    #[test]
    fn a_corrupt_file_is_recomputed_and_says_why() {
        for (bytes, reason) in [
            (
                &b"{\"0->0\": true, \"0->1\": fa"[..],
                "invalid JSON at byte 25",
            ),
            (b"", "the file is empty"),
            (b"{\"0->0\": true}", "key \"0->1\" is missing"),
            (
                b"{\"0->0\": 1, \"0->1\": 1, \"1->0\": 1, \"1->1\": 1}",
                "holds a number",
            ),
            (
                b"{\"0->0\": \xff}",
                "it is not UTF-8 text (bad byte at offset 9)",
            ),
        ] {
            let tmp = TempDir::new();
            let path = tmp.file();
            fs::write(&path, bytes).unwrap();
            let got = load_or_compute(&path, 2, TIMEOUT, || Ok(V2.to_vec())).unwrap();
            let Origin::Recomputed { reason: why } = &got.origin else {
                panic!("{got:?}")
            };
            assert!(why.contains(reason), "{why}");
            assert_eq!(got.verdicts, V2);
            assert_eq!(fs::read_to_string(&path).unwrap(), N2);
        }
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_a_recompute() {
        let tmp = TempDir::new();
        let path = tmp.file();
        fs::create_dir(&path).unwrap();
        let err = format!(
            "{:#}",
            load_or_compute(&path, 2, TIMEOUT, never).unwrap_err()
        );
        assert!(
            err.starts_with(&format!("cannot read {}", path.display())),
            "{err}"
        );
    }

    #[test]
    fn compute_errors_are_passed_on_and_nothing_is_written() {
        let tmp = TempDir::new();
        let path = tmp.file();
        let err = format!(
            "{:#}",
            load_or_compute(&path, 2, TIMEOUT, || bail!("no GPUs")).unwrap_err()
        );
        assert_eq!(
            err,
            format!(
                "cannot compute the P2P verdicts for {}: no GPUs",
                path.display()
            )
        );
        let err = format!(
            "{:#}",
            load_or_compute(&path, 2, TIMEOUT, || Ok(vec![true])).unwrap_err()
        );
        assert!(
            err.contains("1 verdicts for 2 devices; expected 4"),
            "{err}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn waiting_for_the_lock_times_out_with_a_clear_error() {
        let tmp = TempDir::new();
        let path = tmp.file();
        let lock = FileLock::acquire(&lock_path(&path), TIMEOUT).unwrap();
        assert_eq!(lock.path(), lock_path(&path));
        let start = Instant::now();
        let err = load_or_compute(&path, 2, Duration::from_millis(200), never).unwrap_err();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        let err = format!("{err:#}");
        let expected = format!(
            "timed out after 200ms waiting for the lock {} (last taken by pid {})",
            lock_path(&path).display(),
            std::process::id()
        );
        assert!(err.starts_with(&expected), "{err}");
        drop(lock);
        // Released on drop: the next caller gets it at once.
        let got = load_or_compute(&path, 2, Duration::ZERO, || Ok(V2.to_vec())).unwrap();
        assert_eq!(got.origin, Origin::Computed);
    }

    #[test]
    fn threads_racing_compute_once() {
        let tmp = TempDir::new();
        let path = tmp.file();
        let calls = AtomicU64::new(0);
        std::thread::scope(|s| {
            let racers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        load_or_compute(&path, 2, TIMEOUT, || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(100));
                            Ok(V2.to_vec())
                        })
                        .unwrap()
                        .verdicts
                    })
                })
                .collect();
            for r in racers {
                assert_eq!(r.join().unwrap(), V2);
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn store_writes_under_the_lock_and_memoizes() {
        let _serial = serial();
        let tmp = TempDir::new();
        let path = tmp.file();
        fs::write(&path, "garbage").unwrap();
        store(&path, 2, &V2).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), N2);
        assert_eq!(
            load_or_compute(&path, 2, TIMEOUT, never).unwrap().origin,
            Origin::Memo
        );
        let err = store(&path, 2, &[true]).unwrap_err().to_string();
        assert_eq!(err, "1 verdicts for 2 devices; expected 4");
    }
}

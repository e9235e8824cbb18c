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
//! * a corrupt file is recomputed and reported ([`Origin::Recomputed`]) instead of crashing;
//! * the verdicts and what they were checked against are one unit: p2pcheck's fingerprint
//!   beside vLLM's file ([`crate::fingerprint::Record`]) names the exact verdicts it vouches
//!   for, is written before the cache file, and an answer comes from the file only when the
//!   fingerprint read vouches for exactly the verdicts read ([`load_or_check`]): no reader,
//!   racing a writer or after a writer was killed, pairs one write's verdicts with another's
//!   fingerprint;
//! * no other user can plant an answer: the folder and its files are trusted only when owned
//!   by this user (or root, or a user named in [`Trust`]) and writable by no one else; an
//!   untrusted one is never used, followed, truncated or replaced ([`Origin::Untrusted`]), and
//!   the files written are mode 0644 whatever the umask;
//! * hostile folder contents cannot redirect it: every file in the cache folder is reached
//!   through the open folder by its name alone, never following a symbolic link and never
//!   blocking on a FIFO or reading a device; reads are bounded ([`max_file_len`]); a lock file
//!   that is not a plain regular file is refused, untouched ([`FileLock`]). So nothing outside
//!   the cache folder is created, truncated or written. The folder path itself may be a link.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{CacheErrorKind, Error, Result};
use crate::files::kind;
use crate::fingerprint::{self, Fingerprint, Record};
use crate::json::{self, Json, Object, Value};
use crate::os;

/// A step's result inside this module: what went wrong, without the file asked about, which
/// the public functions add ([`Error::Cache`]).
type Fallible<T> = std::result::Result<T, CacheErrorKind>;

/// Naming what a failed step was doing ("cannot read /c/f.json"), as the error's first words.
trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Fallible<T>;
}

impl<T> Doing<T> for io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Fallible<T> {
        self.map_err(|e| CacheErrorKind::Io {
            doing: what(),
            kind: e.kind(),
            text: e.to_string(),
        })
    }
}

impl<T> Doing<T> for Fallible<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Fallible<T> {
        self.map_err(|kind| kind.within(what()))
    }
}

/// Refused, left as it is: why.
fn refused(why: String) -> CacheErrorKind {
    CacheErrorKind::Refused {
        doing: String::new(),
        why,
    }
}

/// A step's error as this crate's, for the file `path` asked about.
fn at<T>(path: &Path, result: Fallible<T>) -> Result<T> {
    result.map_err(|kind| Error::Cache {
        path: path.to_path_buf(),
        kind,
    })
}

/// The directory vLLM keeps its cache in, given an environment lookup: `$VLLM_CACHE_ROOT`, else
/// `$XDG_CACHE_HOME/vllm`, else `$HOME/.cache/vllm`; a leading `~` is expanded with `$HOME` as
/// vLLM's `os.path.expanduser` does.
///
/// Differences from vLLM, all for cases where vLLM's answer is useless: a variable set to the
/// empty string counts as unset (vLLM would use a path relative to the working directory), and
/// `~user/…` or a `~` without `$HOME` is an error (vLLM asks the password database).
///
/// # Errors
///
/// [`Error::Cache`] ([`CacheErrorKind::NoFolder`]) when none of the variables is set, or a `~`
/// cannot be expanded.
pub fn cache_dir_from(lookup: impl Fn(&str) -> Option<String>) -> Result<PathBuf> {
    let no_folder = |why: String| Error::Cache {
        path: PathBuf::new(),
        kind: CacheErrorKind::NoFolder(why),
    };
    let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
    let (var, dir) = if let Some(root) = get("VLLM_CACHE_ROOT") {
        ("VLLM_CACHE_ROOT", root)
    } else if let Some(xdg) = get("XDG_CACHE_HOME") {
        ("XDG_CACHE_HOME", format!("{xdg}/vllm"))
    } else if let Some(home) = get("HOME") {
        ("HOME", format!("{home}/.cache/vllm"))
    } else {
        return Err(no_folder(
            "cannot locate vLLM's cache directory: \
             none of VLLM_CACHE_ROOT, XDG_CACHE_HOME and HOME is set"
                .into(),
        ));
    };
    let Some(rest) = dir.strip_prefix('~') else {
        return Ok(PathBuf::from(dir));
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Err(no_folder(format!(
            "{var} is {dir:?}: only `~` and `~/…` are expanded, write the home directory out"
        )));
    }
    let home = get("HOME").ok_or_else(|| {
        no_folder(format!(
            "{var} is {dir:?}, but HOME is not set to expand `~`"
        ))
    })?;
    // As Python: the home directory without trailing slashes, then the rest ("/" if nothing).
    let expanded = format!("{}{rest}", home.trim_end_matches('/'));
    Ok(PathBuf::from(if expanded.is_empty() {
        "/".to_string()
    } else {
        expanded
    }))
}

/// The cache file's name for a `CUDA_VISIBLE_DEVICES` key (`CUDA_VISIBLE_DEVICES` as set, or `0,1,…,n-1` when unset).
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
    let mut cache = Object::new();
    for (k, &v) in verdicts.iter().enumerate() {
        cache.bool(&pair_key(k / n, k % n), v);
    }
    cache.finish_indented().to_string()
}

/// Reads a cache file's text for `n` devices into row-major verdicts.
///
/// Accepts any JSON object (any formatting, any member order) that has a boolean for every key
/// `"i->j"`, `i, j < n`. Other keys are ignored, as vLLM ignores them, except keys naming a
/// device `>= n`: those mean the file was written for more devices, so it is rejected (vLLM
/// would use it). The error says what is wrong, for a message such as "recomputed because …".
///
/// # Errors
///
/// Why the text is not a cache for `n` devices (not a verdict error: the file is then
/// recomputed, [`Origin::Recomputed`]).
pub fn parse(text: &str, n: usize) -> std::result::Result<Vec<bool>, String> {
    if text.is_empty() {
        return Err("the file is empty".into());
    }
    let members = match json::parse(text).map_err(|e| e.to_string())? {
        Value::Object(members) => members,
        other => return Err(format!("it holds {}, not a JSON object", other.kind())),
    };
    // Found verdicts by pair: no bigger than the text, whatever `n` is.
    let mut found: HashMap<(usize, usize), bool> = HashMap::new();
    for (key, value) in &members {
        let Some((i, j)) = parse_pair_key(key) else {
            continue;
        };
        if i >= n || j >= n {
            return Err(format!(
                "key {} names device {}, but {n} device(s) were expected: the file is for more",
                Json::string(key),
                i.max(j)
            ));
        }
        match value {
            Value::Bool(b) => {
                found.insert((i, j), *b);
            }
            other => {
                return Err(format!(
                    "key {} holds {}, not true or false",
                    Json::string(key),
                    other.kind()
                ))
            }
        }
    }
    let pairs = n
        .checked_mul(n)
        .ok_or_else(|| format!("{n} devices are too many"))?;
    // Stops at the first missing key: after at most found.len() + 1 pairs, whatever `n` is.
    (0..pairs)
        .map(|k| {
            found.get(&(k / n, k % n)).copied().ok_or_else(|| {
                format!(
                    "key {} is missing (the file has {} of the {pairs} pairs)",
                    Json::string(&pair_key(k / n, k % n)),
                    found.len()
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

/// Checks a cache folder path where it enters p2pcheck (a `--cache-dir` argument, say), before
/// anything is read or written in it.
///
/// Refused: the empty path (the files would land in the current directory: write `.` to mean
/// that), a path with a NUL byte, and a path that exists but is not a folder (after following
/// symbolic links: the folder path itself may be a link, that is the user's choice). A missing
/// folder is fine: it is created when the cache file is written.
///
/// # Errors
///
/// [`Error::Cache`] ([`CacheErrorKind::BadPath`]) for a path refused as above.
pub fn check_dir(path: &Path) -> Result<()> {
    at(path, check_dir_path(path))?;
    match fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => at(
            path,
            Err(CacheErrorKind::BadPath(format!(
                "the cache folder {} is not a folder: it is {}",
                path.display(),
                kind(meta.mode())
            ))),
        ),
        // Missing: created on write; unreadable: the error comes where it is used.
        _ => Ok(()),
    }
}

/// The checks of [`check_dir`] that need no file system.
fn check_dir_path(path: &Path) -> Fallible<()> {
    if path.as_os_str().is_empty() {
        return Err(CacheErrorKind::BadPath(
            "the cache folder path is empty: name a folder (`.` for the current one)".into(),
        ));
    }
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(CacheErrorKind::BadPath(format!(
            "the cache folder path {path:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// A cache file (or lock file) path split into its folder, never empty, and its name, one
/// path component.
fn split(path: &Path) -> Fallible<(&Path, &OsStr)> {
    if path.as_os_str().is_empty() {
        return Err(CacheErrorKind::BadPath(
            "the cache file path is empty".into(),
        ));
    }
    let name = path.file_name().ok_or_else(|| {
        CacheErrorKind::BadPath(format!("cannot use {}: it names no file", path.display()))
    })?;
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    check_dir_path(dir).doing(|| format!("cannot use {}", path.display()))?;
    Ok((dir, name))
}

fn is_regular(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFREG
}

fn is_dir(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFDIR
}

/// `ELOOP` from an `open_at`: the entry is a symbolic link (`O_NOFOLLOW`).
fn is_link_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// `render(n, all false).len()`, the longest file [`render`] writes for `n` devices, computed
/// without rendering (so no `n` can exhaust memory); saturates instead of overflowing.
fn rendered_len(n: usize) -> u64 {
    if n == 0 {
        return 2; // "{}"
    }
    let n = n as u64;
    // The decimal digits of all of 0..n together.
    let (mut digits, mut lo, mut hi, mut width) = (0u64, 0u64, 10u64, 1u64);
    while lo < n {
        digits = digits.saturating_add((n.min(hi) - lo).saturating_mul(width));
        lo = hi;
        hi = hi.saturating_mul(10);
        width += 1;
    }
    // Each member is `    "i->j": false` (15 bytes and the digits of i and j), members are
    // joined by ",\n" and wrapped in "{\n" … "\n}": 17 n² + 2 + 2 n·digits.
    n.saturating_mul(n)
        .saturating_mul(17)
        .saturating_add(2)
        .saturating_add(n.saturating_mul(digits).saturating_mul(2))
}

/// The most bytes [`read`] accepts in a cache file for `n` devices: twice the longest file
/// [`render`] writes, plus 4 KiB, as vLLM reads any JSON with the right keys (other spacing,
/// extra keys). A bigger file is unusable (and recomputed), and no more than this plus one
/// byte is ever read from it.
pub fn max_file_len(n: usize) -> u64 {
    rendered_len(n).saturating_mul(2).saturating_add(4096)
}

/// The mode of every file p2pcheck creates in the cache folder, whatever the umask: vLLM (and
/// any reader running as the same user, or as a trusted one) can read it, no one else can
/// write it.
const FILE_MODE: u32 = 0o644;

/// The mode of a cache folder p2pcheck creates (less the umask, which only takes bits away):
/// never writable by group or others. An existing folder's mode is never changed.
const DIR_MODE: u32 = 0o755;

/// Whose cache folder and files are trusted: this process's effective user, root, and
/// optionally one more user, for a folder deliberately shared between users.
///
/// A folder is trusted when such a user owns it and neither group nor others can write it, or
/// when they can but its sticky bit is set (as on `/tmp`: then only a file's owner can replace
/// or remove it). A file in it (vLLM's cache file, the fingerprint, the lock) is trusted when
/// such a user owns it and neither group nor others can write it. Nothing in an untrusted
/// folder, and no file owned by another user, is used, followed, truncated, replaced or
/// removed; the pairs are checked again instead and nothing is written (see
/// [`Origin::Untrusted`]). A trusted user's own file that group or others can write is not
/// used either, but it is replaced by the next write (its content may be anyone's; the name
/// is the user's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Trust {
    /// One more user whose cache folder and files are trusted (`--trust-cache-owner UID`).
    pub owner: Option<u32>,
}

impl Trust {
    fn owns(&self, uid: u32) -> bool {
        uid == 0 || uid == os::effective_uid() || self.owner == Some(uid)
    }

    /// Why `what`, owned by `uid`, is not trusted, or `None` when it is.
    fn owner_problem(&self, what: &str, uid: u32) -> Option<String> {
        (!self.owns(uid)).then(|| {
            format!(
                "{what} is owned by uid {uid}, not by this user (uid {}) or root: not trusted, and \
                 left as it is (remove it, or trust that user with --trust-cache-owner {uid})",
                os::effective_uid()
            )
        })
    }
}

/// Who may write a file or folder of mode `mode`, in words, if anyone but its owner may.
fn loose(mode: u32) -> Option<&'static str> {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => None,
        (true, false) => Some("its group"),
        (false, true) => Some("others"),
        (true, true) => Some("its group and others"),
    }
}

/// A cache folder, open: every entry in it is reached through this descriptor by one name,
/// and never followed when it is a symbolic link, so nothing outside the folder is touched.
struct Folder<'a> {
    fd: File,
    path: &'a Path,
    trust: Trust,
    /// Why nothing in it may be trusted or written, if so.
    distrust: Option<String>,
}

impl<'a> Folder<'a> {
    /// Opens the folder `dir`; `None` if it does not exist.
    fn open(dir: &'a Path, trust: Trust) -> Fallible<Option<Folder<'a>>> {
        match os::open_dir(dir) {
            Ok(fd) => Folder::judged(File::from(fd), dir, trust).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Folder::open_error(dir, e)),
        }
    }

    /// Opens the folder `dir`, creating it (and its parents) with [`DIR_MODE`] if missing;
    /// refuses a folder it does not trust.
    fn create(dir: &'a Path, trust: Trust) -> Fallible<Folder<'a>> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .doing(|| format!("cannot create the directory {}", dir.display()))?;
        let folder = match os::open_dir(dir) {
            Ok(fd) => Folder::judged(File::from(fd), dir, trust)?,
            Err(e) => return Err(Folder::open_error(dir, e)),
        };
        if let Some(why) = &folder.distrust {
            return Err(refused(why.clone()));
        }
        Ok(folder)
    }

    /// The folder open as `fd`, with what its owner and mode say about trusting it.
    fn judged(fd: File, path: &'a Path, trust: Trust) -> Fallible<Folder<'a>> {
        let meta = fd
            .metadata()
            .doing(|| format!("cannot stat the folder {}", path.display()))?;
        let what = format!("the cache folder {}", path.display());
        let distrust = trust
            .owner_problem(&what, meta.uid())
            .map(|why| format!("{why}; nothing in it is trusted or written"))
            .or_else(|| {
                let sticky = meta.mode() & libc::S_ISVTX != 0;
                loose(meta.mode()).filter(|_| !sticky).map(|who| {
                    format!(
                        "{what} is writable by {who} (mode {:04o}) without the sticky bit, so \
                         anyone could replace the files in it: nothing in it is trusted or \
                         written (`chmod go-w` or `chmod +t` it, or use another folder)",
                        meta.mode() & 0o7777
                    )
                })
            });
        Ok(Folder {
            fd,
            path,
            trust,
            distrust,
        })
    }

    fn open_error(dir: &Path, e: io::Error) -> CacheErrorKind {
        if e.raw_os_error() == Some(libc::ENOTDIR) {
            CacheErrorKind::BadPath(format!("{} is not a folder", dir.display()))
        } else {
            CacheErrorKind::Io {
                doing: format!("cannot open the folder {}", dir.display()),
                kind: e.kind(),
                text: e.to_string(),
            }
        }
    }

    /// The entry `name`, not followed; `None` if there is none.
    fn stat(&self, name: &OsStr) -> io::Result<Option<os::EntryStat>> {
        match os::stat_at(&self.fd, name) {
            Ok(entry) => Ok(Some(entry)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Why the entry `name` (at `path`) belongs to a user this process does not trust, if it
    /// exists and does.
    fn foreign(&self, name: &OsStr, path: &Path) -> io::Result<Option<String>> {
        Ok(self.stat(name)?.and_then(|entry| {
            self.trust
                .owner_problem(&path.display().to_string(), entry.uid)
        }))
    }

    /// What the entry `name` of type `mode` is, in words; for a symbolic link with its target
    /// (read, never followed), best effort.
    fn describe(&self, name: &OsStr, mode: u32) -> String {
        let what = kind(mode);
        if mode & libc::S_IFMT != libc::S_IFLNK {
            return what.to_string();
        }
        match fs::read_link(self.path.join(name)) {
            Ok(target) => format!("{what} (to {})", target.display()),
            Err(_) => what.to_string(),
        }
    }

    /// Writes `contents` to the temp file `tmp` (created, never reused, mode [`FILE_MODE`]),
    /// fsyncs it and renames it over `name`; the temp file is removed if a step after its
    /// creation fails.
    fn write_then_rename(
        &self,
        tmp: &OsStr,
        name: &OsStr,
        contents: &str,
        path: &Path,
    ) -> Fallible<()> {
        let tmp_path = self.path.join(tmp);
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        let mut file = os::open_at(&self.fd, tmp, flags, 0o600)
            .doing(|| format!("cannot create the temp file {}", tmp_path.display()))?;
        let written = file
            // fchmod: the mode does not depend on the umask.
            .set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .and_then(|()| file.write_all(contents.as_bytes()))
            .and_then(|()| file.sync_all())
            .doing(|| format!("cannot write the temp file {}", tmp_path.display()))
            .and_then(|()| {
                os::rename_at(&self.fd, tmp, name).doing(|| {
                    let mut what =
                        format!("cannot rename {} to {}", tmp_path.display(), path.display());
                    if let Ok(Some(entry)) = self.stat(name) {
                        if is_dir(entry.mode) {
                            what.push_str(
                                ": it is a directory, which the cache file cannot replace \
                                 (remove it)",
                            );
                        }
                    }
                    what
                })
            });
        if written.is_err() {
            // Ours (O_EXCL made it); the first error is the one to report.
            let _ = os::unlink_at(&self.fd, tmp);
        }
        written
    }

    /// An error if the cache file `name` (at `path`) or its fingerprint belongs to a user this
    /// process does not trust: they are not replaced.
    fn refuse_foreign(&self, name: &OsStr, path: &Path) -> Fallible<()> {
        let beside = fingerprint::path_beside(path);
        let beside_name = beside.file_name().unwrap_or_default();
        for (entry, at) in [(name, path), (beside_name, beside.as_path())] {
            if let Some(why) = self
                .foreign(entry, at)
                .doing(|| format!("cannot write {}", path.display()))?
            {
                return Err(refused(format!("not written: {why}")));
            }
        }
        Ok(())
    }

    /// Writes the cache file `name` (at `path`) and, first, the fingerprint `beside` it if
    /// given, each atomically; then makes the renames durable. Refuses, before writing
    /// anything, when either entry belongs to a user this process does not trust.
    ///
    /// The fingerprint goes first: it names the exact verdicts it vouches for, so a process
    /// killed between the two renames leaves a fingerprint that does not vouch for the cache
    /// file beside it (unless it holds the same verdicts), and never a state without one.
    fn write_unit(
        &self,
        name: &OsStr,
        path: &Path,
        contents: &str,
        beside: Option<&str>,
    ) -> Fallible<()> {
        self.refuse_foreign(name, path)?;
        let beside_path = fingerprint::path_beside(path);
        let beside_name = beside_path.file_name().unwrap_or_default();
        if let Some(text) = beside {
            self.write_then_rename(&temp_name(beside_name), beside_name, text, &beside_path)?;
        }
        if let Err(e) = self.write_then_rename(&temp_name(name), name, contents, path) {
            // vLLM's file was not replaced: the fingerprint just placed vouches for verdicts
            // that are not there (never answered from, but a leftover): a failed write leaves
            // nothing of its own.
            if beside.is_some() {
                let _ = os::unlink_at(&self.fd, beside_name);
            }
            return Err(e);
        }
        // Make the renames durable. Best effort: some file systems refuse to fsync a
        // directory, and the new files are already in place either way.
        let _ = self.fd.sync_all();
        Ok(())
    }
}

/// A temp file name for the cache file `name`: hidden (so `ls` skips it), unique per process,
/// call and moment (a process killed mid-write leaves one behind, which a later process of
/// the same pid must not collide with), and short enough to be a valid name whatever `name`'s
/// length.
fn temp_name(name: &OsStr) -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let full = name.to_string_lossy();
    let mut stem = String::new();
    for c in full.chars() {
        if stem.len() + c.len_utf8() > 150 {
            break;
        }
        stem.push(c);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    OsString::from(format!(
        ".{stem}.tmp.{}.{}.{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes `contents` to `path` atomically: readers see the old file or the new one, never a
/// part. Writes a temp file (mode 0644) in the same directory (created if missing, mode 0755),
/// fsyncs it, renames it over `path` and fsyncs the directory; the temp file is removed if any
/// step fails.
///
/// Every file is reached through the open folder by its name alone: the temp file is created
/// new (`O_EXCL`, never through a link), and the rename replaces the directory entry `path`,
/// whatever it is (a symbolic link, a FIFO…), without writing through it. A directory there
/// cannot be replaced: that is an error. An empty folder path (a bare file name), a folder
/// this process does not trust ([`Trust`]) and a `path` owned by another user are refused.
///
/// # Errors
///
/// [`Error::Cache`] for a path, folder or file refused as above, and for a failed step.
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    at(path, write_atomic_steps(path, contents))
}

fn write_atomic_steps(path: &Path, contents: &str) -> Fallible<()> {
    let (dir, name) = split(path)?;
    let folder = Folder::create(dir, Trust::default())?;
    if let Some(why) = folder
        .foreign(name, path)
        .doing(|| format!("cannot write {}", path.display()))?
    {
        return Err(refused(format!("not written: {why}")));
    }
    folder.write_then_rename(&temp_name(name), name, contents, path)?;
    let _ = folder.fd.sync_all(); // as in write_unit
    Ok(())
}

/// An exclusive advisory lock (`flock(2)`) on a file, held until dropped.
///
/// The lock file is never deleted: deleting it would let a process lock the old, unlinked file
/// while another locks a new one. The holder writes its pid into it, so a waiter that gives up
/// can say who had it.
///
/// Only a regular file with one name, owned by a trusted user ([`Trust`]), in a trusted folder,
/// is used as the lock file: anything else in its place is refused with an error naming it,
/// and left as it is (never followed, truncated, replaced or removed). It holds no data, so a
/// lock of this process's own user that group or others could write is made 0644 rather than
/// refused.
#[derive(Debug)]
pub struct FileLock {
    /// Closing the file (on drop) releases the lock.
    file: File,
    /// The lock file, for the tests ([`FileLock::path`]).
    #[cfg(any(test, feature = "test-internals"))]
    path: PathBuf,
}

impl FileLock {
    #[cfg(any(test, feature = "test-internals"))]
    /// Locks `path` (created, mode 0644, with its directory, if missing), waiting at most
    /// `timeout` for another holder to let go; the error then names the lock file, the timeout
    /// and the pid that last took the lock. An existing `path` that is not a regular file with
    /// a single name of this process's user or root is refused at once, untouched.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`]: [`CacheErrorKind::LockTimeout`] after `timeout`; a lock file, folder
    /// or path refused as above; a failed step.
    pub fn acquire(path: &Path, timeout: Duration) -> Result<FileLock> {
        FileLock::acquire_trusting(path, timeout, Trust::default())
    }

    #[cfg(any(test, feature = "test-internals"))]
    /// [`FileLock::acquire`], trusting `trust`'s users too.
    ///
    /// # Errors
    ///
    /// As [`FileLock::acquire`].
    pub fn acquire_trusting(path: &Path, timeout: Duration, trust: Trust) -> Result<FileLock> {
        at(path, FileLock::take(path, timeout, trust))
    }

    fn take(path: &Path, timeout: Duration, trust: Trust) -> Fallible<FileLock> {
        let (dir, name) = split(path)?;
        let folder = Folder::create(dir, trust)?;
        let file = open_lock_file(&folder, name, path)?;
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_millis(2);
        while !os::try_lock_exclusive(&file).doing(|| format!("cannot lock {}", path.display()))? {
            let now = Instant::now();
            if now >= deadline {
                return Err(CacheErrorKind::LockTimeout {
                    lock: path.to_path_buf(),
                    waited: timeout,
                    holder: last_holder(file),
                });
            }
            // Short naps, growing to 100 ms: quick when the holder is quick, cheap when not.
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(100));
        }
        let mut lock = FileLock {
            file,
            #[cfg(any(test, feature = "test-internals"))]
            path: path.to_path_buf(),
        };
        lock.record_holder();
        Ok(lock)
    }

    #[cfg(any(test, feature = "test-internals"))]
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes our pid into the lock file, for [`last_holder`]. Best effort: it only feeds a
    /// message (and a lock of another trusted user may be open read-only).
    fn record_holder(&mut self) {
        let _ = self.file.set_len(0).and_then(|()| {
            self.file
                .write_all(format!("{}\n", std::process::id()).as_bytes())
        });
    }
}

/// Why the lock file `name` (at `path`) of `folder` cannot be used, from what it is: a
/// regular file with one name, of a trusted user, is fine.
fn lock_problem(
    folder: &Folder,
    name: &OsStr,
    path: &Path,
    mode: u32,
    nlink: u64,
    uid: u32,
) -> Option<String> {
    let refuse = |what: String| {
        format!(
            "refusing to use the lock file {}: it is {what}, not a regular file with a single \
             name; p2pcheck does not follow, truncate, replace or remove it: if nothing needs \
             it, remove it",
            path.display()
        )
    };
    if !is_regular(mode) {
        return Some(refuse(folder.describe(name, mode)));
    }
    if nlink > 1 {
        return Some(refuse(format!(
            "a regular file with {nlink} hard links (another name of a file that may be \
             outside {})",
            folder.path.display()
        )));
    }
    folder
        .trust
        .owner_problem(&format!("the lock file {}", path.display()), uid)
}

/// Opens (creating if missing, mode 0644) the lock file `name` in `folder`, refusing what
/// [`lock_problem`] refuses: checked on the entry before opening (so no FIFO or device is even
/// opened) and again on the open descriptor (in case the entry changed in between).
fn open_lock_file(folder: &Folder, name: &OsStr, path: &Path) -> Fallible<File> {
    let cannot = || format!("cannot open the lock file {}", path.display());
    if let Some(entry) = folder.stat(name).doing(cannot)? {
        if let Some(why) = lock_problem(folder, name, path, entry.mode, entry.nlink, entry.uid) {
            return Err(refused(why));
        }
    }
    let open = |flags| os::open_at(&folder.fd, name, flags | libc::O_NONBLOCK, 0o600);
    let (file, created) = match open(libc::O_RDWR | libc::O_CREAT | libc::O_EXCL) {
        Ok(file) => (file, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Another trusted user's lock may be readable only; flock needs no more.
            match open(libc::O_RDWR).or_else(|e| match e.raw_os_error() {
                Some(libc::EACCES) => open(libc::O_RDONLY),
                _ => Err(e),
            }) {
                Ok(file) => (file, false),
                Err(e) if is_link_error(&e) => {
                    return Err(refused(
                        lock_problem(folder, name, path, libc::S_IFLNK, 1, 0).unwrap_or_default(),
                    ))
                }
                Err(e) => return Err(e).doing(cannot),
            }
        }
        Err(e) => return Err(e).doing(cannot),
    };
    let meta = file.metadata().doing(cannot)?;
    if let Some(why) = lock_problem(folder, name, path, meta.mode(), meta.nlink(), meta.uid()) {
        return Err(refused(why));
    }
    if created || (loose(meta.mode()).is_some() && meta.uid() == os::effective_uid()) {
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .doing(cannot)?;
    }
    // O_NONBLOCK only kept open(2) from blocking on a FIFO; it changes nothing for a regular
    // file, so it stays.
    Ok(file)
}

/// Who last took a lock, from the pid its holder wrote (the first 64 bytes at most).
fn last_holder(file: File) -> Option<u32> {
    let mut bytes = Vec::new();
    file.take(64)
        .read_to_end(&mut bytes)
        .ok()
        .and_then(|_| std::str::from_utf8(&bytes).ok())
        .and_then(|text| text.trim().parse::<u32>().ok())
}

/// Where an answer came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// This process already had it (`crate::access_check`'s memo).
    Memo,
    /// Read from the cache file.
    File,
    /// There was no cache file: computed and written.
    Computed,
    /// The cache file was unusable: computed and written over it.
    Recomputed {
        /// What was wrong with the file, e.g. `key "0->1" is missing (…)`, or why it is stale.
        reason: String,
    },
    /// Computed but not written: an answer for this call only.
    NotPersisted {
        /// Why (a pair whose verdict is not a fact: see [`crate::Evidence`]).
        reason: String,
    },
    /// The cache folder or a file in it is not trusted: computed, and nothing was read from
    /// the folder or written to it. Trusted are a folder owned by this process's user, root or
    /// the user given as [`crate::AccessOptions::trust_cache_owner`], which neither group nor
    /// others can write unless its sticky bit is set (as on `/tmp`), and the files in it owned
    /// by such a user which neither group nor others can write.
    Untrusted {
        /// What is not trusted, why, and what to change.
        reason: String,
    },
}

/// A cached or computed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// One verdict per ordered pair, row-major: `verdicts[src * n + tgt]`.
    pub verdicts: Vec<bool>,
    /// Where they came from.
    pub origin: Origin,
}

/// What a computation gave [`load_or_check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Computed {
    /// One verdict per ordered pair, row-major.
    pub verdicts: Vec<bool>,
    /// Why the verdicts must not be written (a hang or an error seen once is not a fact about
    /// the machine), or `None` to write them.
    pub not_persisted: Option<String>,
}

/// The most bytes a fingerprint file may have: 64 KiB holds the verdicts of 250 GPUs.
const FINGERPRINT_MAX: u64 = 64 * 1024;

/// What one look into the cache folder found for a cache file.
struct Found {
    /// vLLM's file: `None` if absent, else its verdicts or why it cannot be used.
    file: Option<std::result::Result<Vec<bool>, String>>,
    /// p2pcheck's fingerprint beside it: `None` if absent, else its text or why it cannot be
    /// used.
    beside: Option<std::result::Result<String, String>>,
}

/// What one look into the cache folder allows.
enum Look {
    /// The folder and its files are trusted (or absent): what is there.
    Found(Found),
    /// The folder, or the cache file, the fingerprint or the lock, is not trusted: why.
    HandsOff(String),
}

/// One look at the cache file `path` for `n` devices, its fingerprint (if `with_beside`) and
/// its lock, without taking the lock.
fn look(path: &Path, n: usize, trust: Trust, with_beside: bool) -> Fallible<Look> {
    let (dir, name) = split(path)?;
    let cannot = || format!("cannot read {}", path.display());
    let Some(folder) = Folder::open(dir, trust).doing(cannot)? else {
        return Ok(Look::Found(Found {
            file: None,
            beside: None,
        }));
    };
    if let Some(why) = &folder.distrust {
        return Ok(Look::HandsOff(why.clone()));
    }
    let lock = lock_path(path);
    let lock_name = lock.file_name().unwrap_or_default();
    if let Some(entry) = folder.stat(lock_name).doing(cannot)? {
        if let Some(why) = lock_problem(
            &folder,
            lock_name,
            &lock,
            entry.mode,
            entry.nlink,
            entry.uid,
        ) {
            return Ok(Look::HandsOff(why));
        }
    }
    let file = match read_entry(&folder, name, path, max_file_len(n), |len| too_big(n, len))? {
        None => None,
        Some(Entry::Foreign(why)) => return Ok(Look::HandsOff(why)),
        Some(Entry::Unusable(why)) => Some(Err(why)),
        Some(Entry::Bytes(bytes)) => Some(verdicts_of(bytes, n)),
    };
    let beside = if with_beside {
        let at = fingerprint::path_beside(path);
        let beside_name = at.file_name().unwrap_or_default();
        let bound = |len| format!("it is {len} bytes, more than {FINGERPRINT_MAX}");
        match read_entry(&folder, beside_name, &at, FINGERPRINT_MAX, bound)? {
            None => None,
            Some(Entry::Foreign(why)) => return Ok(Look::HandsOff(why)),
            Some(Entry::Unusable(why)) => Some(Err(format!(
                "its p2pcheck fingerprint {} is unusable: {why}",
                at.display()
            ))),
            Some(Entry::Bytes(bytes)) => Some(String::from_utf8(bytes).map_err(|_| {
                format!(
                    "its p2pcheck fingerprint {} is unusable: not UTF-8 text",
                    at.display()
                )
            })),
        }
    } else {
        None
    };
    Ok(Look::Found(Found { file, beside }))
}

/// The verdicts for `n` devices from the cache folder, or computed: the core of
/// [`load_or_compute`] and [`load_or_check`].
///
/// In order: the folder, read without the lock (vLLM's fast path), answers if `accept` takes
/// what is there; else, under [`FileLock`] on [`lock_path`] (waiting at most `lock_timeout`),
/// the folder again (another process may just have written it), else `compute()` (which must
/// return `n * n` verdicts, row-major), written (with the fingerprint `vouch` renders for
/// them, if given, first) — unless the computation says its verdicts must not persist: then
/// they are the answer for this call only. So racing processes compute once. Where the folder
/// or a file in it is not trusted, the verdicts are computed and nothing is read or written
/// ([`Origin::Untrusted`]). An unreadable file (permissions, a directory) is an error; an
/// unparsable one is recomputed.
fn load(
    path: &Path,
    n: usize,
    lock_timeout: Duration,
    trust: Trust,
    accept: impl Fn(&Found) -> std::result::Result<Vec<bool>, String>,
    compute: impl FnOnce() -> Result<Computed>,
    vouching: Option<&Fingerprint>,
) -> Result<Loaded> {
    // What a look allows: the answer, or (under the lock, which the write needs) where the
    // verdicts to compute come from, or why nothing may be read or written.
    let answer = |look: Look| match look {
        Look::HandsOff(why) => Err(Err(why)),
        Look::Found(found) => match accept(&found) {
            Ok(verdicts) => Ok(Loaded {
                verdicts,
                origin: Origin::File,
            }),
            Err(reason) => Err(Ok(match found.file {
                None => Origin::Computed,
                Some(_) => Origin::Recomputed { reason },
            })),
        },
    };
    let with_beside = vouching.is_some();
    let decided = 'decided: {
        match answer(at(path, look(path, n, trust, with_beside))?) {
            Ok(loaded) => return Ok(loaded),
            Err(Err(why)) => break 'decided Err(why),
            Err(Ok(_)) => {}
        }
        // The lock serves the cache file: its errors are about that file.
        let lock = at(path, FileLock::take(&lock_path(path), lock_timeout, trust))?;
        match answer(at(path, look(path, n, trust, with_beside))?) {
            Ok(loaded) => return Ok(loaded),
            Err(decided) => decided.map(|origin| (origin, lock)),
        }
    };
    // The computation's own error is the caller's to see as it is: it is not the cache's.
    let computed = compute()?;
    check_len(n, &computed.verdicts).map_err(|e| {
        Error::InvalidInput(format!(
            "the P2P check returned the wrong number of verdicts: {e}"
        ))
    })?;
    let verdicts = computed.verdicts;
    let (origin, _lock) = match (computed.not_persisted, decided) {
        (Some(reason), _) => {
            return Ok(Loaded {
                verdicts,
                origin: Origin::NotPersisted { reason },
            })
        }
        (None, Err(why)) => {
            return Ok(Loaded {
                verdicts,
                origin: Origin::Untrusted { reason: why },
            })
        }
        (None, Ok(decided)) => decided,
    };
    let beside = vouching.map(|now| {
        Record {
            fingerprint: now.clone(),
            verdicts: verdicts.clone(),
        }
        .render()
    });
    at(
        path,
        split(path).and_then(|(dir, name)| {
            Folder::create(dir, trust)?.write_unit(
                name,
                path,
                &render(n, &verdicts),
                beside.as_deref(),
            )
        }),
    )?;
    Ok(Loaded { verdicts, origin })
}

#[cfg(any(test, feature = "test-internals"))]
/// vLLM's own semantics, atomic, computed once and safe in a hostile folder: the verdicts for
/// `n` devices from the cache file `path`, used whatever wrote it, else computed and written
/// (the file without the lock, then under the lock the file again, else `compute()`),
/// trusting this process's user and root ([`Trust`]).
///
/// # Errors
///
/// `compute`'s error as it is; [`Error::InvalidInput`] when it gives other than `n * n`
/// verdicts; [`Error::Cache`] for a file that exists but cannot be read or replaced, a lock
/// not taken in `lock_timeout`, a failed write.
pub fn load_or_compute(
    path: &Path,
    n: usize,
    lock_timeout: Duration,
    compute: impl FnOnce() -> Result<Vec<bool>>,
) -> Result<Loaded> {
    load(
        path,
        n,
        lock_timeout,
        Trust::default(),
        |found| match &found.file {
            Some(file) => file.clone(),
            None => Err(String::new()),
        },
        || {
            Ok(Computed {
                verdicts: compute()?,
                not_persisted: None,
            })
        },
        None,
    )
}

/// How [`load_or_check`] treats the cache folder.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    /// Check again even if the cache file answers.
    pub refresh: bool,
    /// Whose folder and files are trusted.
    pub trust: Trust,
    /// How long to wait for another process that holds the lock.
    pub lock_timeout: Duration,
}

/// The verdicts for the GPUs `now` describes, from vLLM's cache file `path` where p2pcheck's
/// fingerprint beside it vouches for them under `now` (this machine, this check: see
/// [`Fingerprint::vouched`]), else from `check()`, written with its fingerprint (see
/// the order `load_or_compute` follows).
///
/// Readers take no lock: the fingerprint names the exact verdicts it vouches for, so a reader
/// that sees the fingerprint of one write beside the cache file of another (a writer killed
/// between its two renames, or racing) answers only if both hold the same verdicts — which
/// the fingerprint's check then found — and otherwise checks again.
///
/// # Errors
///
/// As [`load_or_compute`], `check`'s error passed on as it is.
pub fn load_or_check(
    path: &Path,
    now: &Fingerprint,
    ask: &Ask,
    check: impl FnOnce() -> Result<Computed>,
) -> Result<Loaded> {
    let accept = |found: &Found| -> std::result::Result<Vec<bool>, String> {
        if ask.refresh {
            return Err("a fresh check was asked for".into());
        }
        let verdicts = match &found.file {
            Some(file) => file.clone()?,
            None => return Err(String::new()),
        };
        let beside = match &found.beside {
            None => None,
            Some(Ok(text)) => Some(text.as_str()),
            Some(Err(why)) => return Err(why.clone()),
        };
        now.vouched(beside, &verdicts)?;
        Ok(verdicts)
    };
    load(
        path,
        now.devices,
        ask.lock_timeout,
        ask.trust,
        accept,
        check,
        Some(now),
    )
}

/// How long a writer waits for another process's lock on the cache file by default.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(300);

#[cfg(any(test, feature = "test-internals"))]
/// Writes `verdicts` for `n` devices (row-major) to the cache file `path`, under its lock, as
/// vLLM would (no fingerprint).
///
/// # Errors
///
/// [`Error::InvalidInput`] for other than `n * n` verdicts; [`Error::Cache`] as for
/// [`write_atomic`] and [`FileLock::acquire`].
pub fn store(path: &Path, n: usize, verdicts: &[bool]) -> Result<()> {
    check_len(n, verdicts)?;
    store_unit(path, n, verdicts, Trust::default(), None)
}

/// Writes `verdicts` for the GPUs `now` describes (row-major) to the cache file `path` with
/// the fingerprint that vouches for them, under its lock: the fingerprint first, then the
/// cache file (see [`load_or_check`]). Refused, with nothing written, where the folder, the
/// lock, the cache file or the fingerprint is not trusted ([`Trust`]).
///
/// # Errors
///
/// As [`store`], and [`Error::Cache`] for the refusals above.
pub fn store_checked(
    path: &Path,
    now: &Fingerprint,
    verdicts: &[bool],
    trust: Trust,
) -> Result<()> {
    check_len(now.devices, verdicts)?;
    let record = Record {
        fingerprint: now.clone(),
        verdicts: verdicts.to_vec(),
    };
    store_unit(path, now.devices, verdicts, trust, Some(&record.render()))
}

fn store_unit(
    path: &Path,
    n: usize,
    verdicts: &[bool],
    trust: Trust,
    beside: Option<&str>,
) -> Result<()> {
    // Split first, so that a bad path is named as given, not as its lock file.
    let (dir, name) = at(path, split(path))?;
    // Refused before the lock is even taken (and again under it, by write_unit).
    if let Some(folder) = at(path, Folder::open(dir, trust))? {
        at(path, folder.refuse_foreign(name, path))?;
    }
    let _lock = at(path, FileLock::take(&lock_path(path), LOCK_TIMEOUT, trust))?;
    at(
        path,
        Folder::create(dir, trust)
            .and_then(|folder| folder.write_unit(name, path, &render(n, verdicts), beside)),
    )
}

/// `n * n` verdicts, or [`Error::InvalidInput`] saying how many there are.
fn check_len(n: usize, verdicts: &[bool]) -> Result<()> {
    if n.checked_mul(n) != Some(verdicts.len()) {
        return Err(Error::InvalidInput(format!(
            "{} verdicts for {n} devices; expected {}",
            verdicts.len(),
            n.saturating_mul(n)
        )));
    }
    Ok(())
}

/// Why a cache file of `len` bytes is too big for `n` devices.
fn too_big(n: usize, len: u64) -> String {
    format!(
        "it is {len} bytes, more than the {} a cache of {n} device(s) can hold",
        max_file_len(n)
    )
}

/// A cache file's bytes as verdicts for `n` devices, or what is wrong with them.
fn verdicts_of(bytes: Vec<u8>, n: usize) -> std::result::Result<Vec<bool>, String> {
    match String::from_utf8(bytes) {
        Ok(text) => parse(&text, n),
        Err(e) => Err(format!(
            "it is not UTF-8 text (bad byte at offset {})",
            e.utf8_error().valid_up_to()
        )),
    }
}

/// What [`crate::read_vllm_cache`] found in place of a cache file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheFile {
    /// There is none.
    Absent,
    /// Its verdicts, row-major.
    Verdicts(Vec<bool>),
    /// It cannot be used (but may be replaced): what is wrong with it, or why it is not
    /// trusted ([`Origin::Untrusted`]).
    Unusable(String),
}

/// The cache file: absent, its verdicts, or what is wrong with it (including why it is not
/// trusted, see [`Trust`]).
///
/// The file is opened through its folder, by name, never following a symbolic link and never
/// blocking: a symbolic link, FIFO, socket or device in its place is not opened at all but
/// reported as unusable ("it is a FIFO, not a regular file"), and so is a file bigger than
/// [`max_file_len`] (no more than that plus one byte is read). Such an entry is safe to replace
/// (the rename replaces the entry, never writes through it); a directory is not: it is an
/// `Err`. An empty folder path (a bare file name) is an `Err` too.
///
/// # Errors
///
/// [`Error::Cache`] when the file exists but cannot be read or replaced (a directory), or the
/// path names no file in a folder.
pub fn read(path: &Path, n: usize) -> Result<CacheFile> {
    at(path, read_steps(path, n))
}

fn read_steps(path: &Path, n: usize) -> Fallible<CacheFile> {
    let (dir, name) = split(path)?;
    let cannot = || format!("cannot read {}", path.display());
    let Some(folder) = Folder::open(dir, Trust::default()).doing(cannot)? else {
        return Ok(CacheFile::Absent);
    };
    let entry = read_entry(&folder, name, path, max_file_len(n), |len| too_big(n, len))?;
    Ok(match (entry, &folder.distrust) {
        (None, _) => CacheFile::Absent,
        (Some(Entry::Foreign(why) | Entry::Unusable(why)), _) => CacheFile::Unusable(why),
        (Some(Entry::Bytes(_)), Some(why)) => CacheFile::Unusable(why.clone()),
        (Some(Entry::Bytes(bytes)), None) => match verdicts_of(bytes, n) {
            Ok(verdicts) => CacheFile::Verdicts(verdicts),
            Err(why) => CacheFile::Unusable(why),
        },
    })
}

/// One file of the cache folder, as found.
enum Entry {
    /// A regular file of a trusted user that only they can write: its bytes.
    Bytes(Vec<u8>),
    /// Not usable (what it is, or why), but safe to replace: a rename replaces the entry,
    /// never writes through it.
    Unusable(String),
    /// Owned by a user this process does not trust: neither used nor replaced.
    Foreign(String),
}

/// The entry `name` (at `path`) of `folder`, read as a small file: `None` if absent. Reached
/// by name through the folder, no link followed, never blocking, regular files only, at most
/// `bound` bytes (`too_big` says why a bigger one is unusable), its owner and mode checked on
/// the open descriptor ([`Trust`]).
fn read_entry(
    folder: &Folder,
    name: &OsStr,
    path: &Path,
    bound: u64,
    too_big: impl Fn(u64) -> String,
) -> Fallible<Option<Entry>> {
    let cannot = || format!("cannot read {}", path.display());
    let shown = path.display().to_string();
    let judge = |mode: u32, uid: u32| -> Fallible<Option<Entry>> {
        if let Some(why) = folder.trust.owner_problem(&shown, uid) {
            return Ok(Some(Entry::Foreign(why)));
        }
        if is_dir(mode) {
            return Err(refused(
                "it is a directory, which the cache file cannot replace (remove it)".into(),
            ));
        }
        if !is_regular(mode) {
            let what = folder.describe(name, mode);
            return Ok(Some(Entry::Unusable(format!(
                "it is {what}, not a regular file"
            ))));
        }
        Ok(loose(mode).map(|who| {
            Entry::Unusable(format!(
                "it is writable by {who} (mode {:04o}), so anyone could have written it",
                mode & 0o7777
            ))
        }))
    };
    let Some(entry) = folder.stat(name).doing(cannot)? else {
        return Ok(None);
    };
    // Not even opened unless it is a regular file of a trusted user.
    match judge(entry.mode, entry.uid).doing(cannot)? {
        Some(Entry::Unusable(_)) if is_regular(entry.mode) => {} // decided on the descriptor
        Some(found) => return Ok(Some(found)),
        None => {}
    }
    let file = match os::open_at(&folder.fd, name, libc::O_RDONLY | libc::O_NONBLOCK, 0) {
        Ok(file) => file,
        // The entry changed since it was looked at.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_link_error(&e) => {
            return Ok(Some(Entry::Unusable(format!(
                "it is {}, not a regular file",
                folder.describe(name, libc::S_IFLNK)
            ))))
        }
        Err(e) => return Err(e).doing(cannot),
    };
    let meta = file.metadata().doing(cannot)?;
    if let Some(found) = judge(meta.mode(), meta.uid()).doing(cannot)? {
        return Ok(Some(found));
    }
    if meta.len() > bound {
        return Ok(Some(Entry::Unusable(too_big(meta.len()))));
    }
    let mut bytes = Vec::new();
    file.take(bound.saturating_add(1))
        .read_to_end(&mut bytes)
        .doing(cannot)?;
    if bytes.len() as u64 > bound {
        return Ok(Some(Entry::Unusable(too_big(bytes.len() as u64)))); // it grew since the fstat
    }
    Ok(Some(Entry::Bytes(bytes)))
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

    const N2: &str =
        "{\n    \"0->0\": true,\n    \"0->1\": false,\n    \"1->0\": true,\n    \"1->1\": true\n}";
    const V2: [bool; 4] = [true, false, true, true];
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn never() -> Result<Vec<bool>> {
        Err(Error::InvalidInput("compute must not be called".into()))
    }

    /// What went wrong, without the file asked about: the text of a cache error's kind.
    fn why(e: Error) -> String {
        match e {
            Error::Cache { kind, .. } => kind.to_string(),
            other => other.to_string(),
        }
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
        let err = why(write_atomic(&path, N2).unwrap_err());
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
        let err = why(write_atomic(&path, N2).unwrap_err());
        assert!(
            err.contains(&format!(
                "cannot create the directory {}",
                tmp.0.join("file/sub").display()
            )),
            "{err}"
        );
    }

    #[test]
    fn computes_once_then_answers_from_the_file() {
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
        let err = why(load_or_compute(&path, 2, TIMEOUT, never).unwrap_err());
        assert!(
            err.starts_with(&format!("cannot read {}", path.display())),
            "{err}"
        );
    }

    #[test]
    fn compute_errors_are_passed_on_and_nothing_is_written() {
        let tmp = TempDir::new();
        let path = tmp.file();
        let err = why(load_or_compute(&path, 2, TIMEOUT, || {
            Err(Error::InvalidInput("no GPUs".into()))
        })
        .unwrap_err());
        // The computation's own error, as it is.
        assert_eq!(err, "no GPUs");
        let err = why(load_or_compute(&path, 2, TIMEOUT, || Ok(vec![true])).unwrap_err());
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
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(30),
            "{waited:?}"
        );
        let err = why(err);
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
    fn store_writes_under_the_lock() {
        let tmp = TempDir::new();
        let path = tmp.file();
        fs::write(&path, "garbage").unwrap();
        store(&path, 2, &V2).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), N2);
        assert_eq!(
            load_or_compute(&path, 2, TIMEOUT, never).unwrap().origin,
            Origin::File
        );
        let err = store(&path, 2, &[true]).unwrap_err().to_string();
        assert_eq!(err, "1 verdicts for 2 devices; expected 4");
    }

    #[test]
    fn the_size_bound_follows_the_longest_rendering() {
        for n in 0..=120 {
            let longest = render(n, &vec![false; n * n]).len() as u64;
            assert_eq!(rendered_len(n), longest, "n={n}");
            assert_eq!(max_file_len(n), 2 * longest + 4096, "n={n}");
        }
        // Any n, without overflow or rendering.
        assert_eq!(max_file_len(usize::MAX), u64::MAX);
        assert!(max_file_len(1 << 20) > max_file_len(1 << 19));
    }

    #[test]
    fn parse_and_check_len_take_any_device_count() {
        assert_eq!(
            parse("{}", 1 << 20),
            Err("key \"0->0\" is missing (the file has 0 of the 1099511627776 pairs)".into())
        );
        assert_eq!(
            parse(N2, usize::MAX),
            Err(format!("{} devices are too many", usize::MAX))
        );
        let err = check_len(usize::MAX, &V2).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "4 verdicts for {} devices; expected {}",
                usize::MAX,
                usize::MAX
            )
        );
    }

    #[test]
    fn paths_are_split_into_a_folder_and_one_name() {
        fn split(p: &'static str) -> std::result::Result<(&'static Path, &'static OsStr), String> {
            super::split(Path::new(p)).map_err(|e| format!("{e:#}"))
        }
        assert_eq!(
            split("/c/a.json"),
            Ok((Path::new("/c"), OsStr::new("a.json")))
        );
        assert_eq!(
            split("./a.json"),
            Ok((Path::new("."), OsStr::new("a.json")))
        );
        let empty = "the cache folder path is empty: name a folder (`.` for the current one)";
        assert_eq!(split("a.json"), Err(format!("cannot use a.json: {empty}")));
        assert_eq!(split(""), Err("the cache file path is empty".into()));
        assert_eq!(split("/"), Err("cannot use /: it names no file".into()));
        assert_eq!(
            split("/c/.."),
            Err("cannot use /c/..: it names no file".into())
        );
        assert_eq!(
            why(check_dir(Path::new("a\0b")).unwrap_err()),
            "the cache folder path \"a\\0b\" contains a NUL byte"
        );
    }

    #[test]
    fn temp_names_stay_valid_file_names() {
        let long = "é".repeat(200); // 400 bytes: too long for a name, kept short in the temp
        let tmp = temp_name(OsStr::new(&long));
        let tmp = tmp.to_str().unwrap();
        assert!(tmp.len() < 200, "{}", tmp.len());
        assert!(tmp.starts_with(".éé") && tmp.contains(".tmp."), "{tmp}");
        assert_ne!(temp_name(OsStr::new("a")), temp_name(OsStr::new("a")));
    }

    #[test]
    fn a_regular_file_in_place_of_the_folder_is_named() {
        let tmp = TempDir::new();
        let plain = tmp.0.join("plain");
        fs::write(&plain, "").unwrap();
        let path = plain.join("cache.json");
        let err = why(read(&path, 2).unwrap_err());
        assert_eq!(
            err,
            format!(
                "cannot read {}: {} is not a folder",
                path.display(),
                plain.display()
            )
        );
        assert_eq!(
            why(check_dir(&plain).unwrap_err()),
            format!(
                "the cache folder {} is not a folder: it is a regular file",
                plain.display()
            )
        );
    }

    #[test]
    fn a_symlinked_temp_name_is_never_written_through() {
        // The temp file is created O_EXCL: a planted entry of that name fails the write (and
        // is not removed, as it is not ours), whatever it points to.
        let tmp = TempDir::new();
        let victim = tmp.0.join("victim");
        fs::write(&victim, "precious").unwrap();
        let dir = tmp.0.join("cache");
        fs::create_dir(&dir).unwrap();
        let folder = Folder::create(&dir, Trust::default()).unwrap();
        let name = OsStr::new("c.json");
        let planted = OsStr::new(".c.json.tmp.planted");
        std::os::unix::fs::symlink(&victim, dir.join(planted)).unwrap();
        let err = format!(
            "{}",
            folder
                .write_then_rename(planted, name, N2, &dir.join(name))
                .unwrap_err()
        );
        assert!(err.starts_with("cannot create the temp file"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(fs::symlink_metadata(dir.join(planted))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(dir.join(name)).is_err());
    }
}

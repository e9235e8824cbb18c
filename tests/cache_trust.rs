//! No other user can plant a verdict: the cache folder and its files are trusted only when
//! owned by this user (or root, or a user named with `--trust-cache-owner`) and writable by no
//! one else (a folder: or sticky, as `/tmp`). Anything else is not trusted: the pairs are
//! checked again and the answer is the machine's, the untrusted files are left as they are
//! (never followed, truncated or replaced) and nothing is written; a trusted user's own file
//! that others could write is not used either, but replaced. Files p2pcheck writes are 0644
//! whatever the umask; an existing folder's mode never changes.
//!
//! Every planted cache here is a consistent forgery: vLLM's file and p2pcheck's fingerprint
//! both say `0->1` is true on a machine where it is false, so only the trust rules stand
//! between it and the answer. CI runs as root, so the tests can give files to another user
//! (65534, `nobody`); as another user they are skipped, saying so.

mod common;
#[path = "common/crafted.rs"]
mod crafted;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::TempDir;
use p2pcheck::cache::{self, Ask, Computed, Loaded, Origin, Trust};
use p2pcheck::fingerprint::{self, Fingerprint, Record};

const WORKER: &str = env!("CARGO_BIN_EXE_p2pcheck-worker");
const CLI: &str = env!("CARGO_BIN_EXE_p2pcheck");

/// Another user: `nobody`.
const OTHER: u32 = 65534;

/// What the machine says: `0->1` does not work.
const MACHINE: [bool; 4] = [true, false, true, true];
/// What the forgery says.
const FORGED: [bool; 4] = [true; 4];

/// Whether this process may give files away (root): else the test is skipped.
fn can_chown() -> bool {
    let tmp = TempDir::new("p2pcheck-chown-probe");
    let probe = tmp.path().join("probe");
    fs::write(&probe, "").unwrap();
    let ok = chown(&probe, Some(OTHER), None).is_ok();
    if !ok {
        eprintln!("skipped: this process cannot chown files to uid {OTHER} (not root)");
    }
    ok
}

/// The check's conditions on a crafted two-GPU machine.
fn now() -> Fingerprint {
    crafted::crafted_fingerprint("handshake")
}

/// A cache folder `cache/` (mode 0755) and, beside it, `outside/` with a file that must never
/// change.
struct Scene {
    tmp: TempDir,
}

impl Scene {
    fn new() -> Scene {
        let tmp = TempDir::new("p2pcheck-trust");
        fs::create_dir(tmp.path().join("cache")).unwrap();
        fs::set_permissions(tmp.path().join("cache"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(tmp.path().join("outside")).unwrap();
        fs::write(tmp.path().join("outside/precious"), "precious\n").unwrap();
        Scene { tmp }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    fn file(&self) -> PathBuf {
        self.dir().join(cache::file_name("0,1"))
    }

    fn beside(&self) -> PathBuf {
        fingerprint::path_beside(&self.file())
    }

    fn lock(&self) -> PathBuf {
        cache::lock_path(&self.file())
    }

    /// The three files, consistent, holding `verdicts` under [`now`].
    fn plant(&self, verdicts: [bool; 4]) {
        fs::write(self.file(), cache::render(2, &verdicts)).unwrap();
        let record = Record {
            fingerprint: now(),
            verdicts: verdicts.to_vec(),
        };
        fs::write(self.beside(), record.render()).unwrap();
        fs::write(self.lock(), "1\n").unwrap();
        for path in [self.file(), self.beside(), self.lock()] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
        }
    }

    fn mode(&self, path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Every file under the scene: its owner, mode and bytes.
    fn snapshot(&self) -> BTreeMap<PathBuf, (u32, u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        for sub in ["cache", "outside"] {
            for entry in fs::read_dir(self.tmp.path().join(sub)).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let bytes = fs::read(&path).unwrap_or_default();
                out.insert(path, (meta.uid(), meta.mode(), bytes));
            }
        }
        out
    }

    /// `load_or_check` at the handshake level, trusting `trust`: what it answered, and how
    /// often it checked (the machine's answer is [`MACHINE`]).
    fn ask(&self, trust: Trust) -> (Loaded, usize) {
        let checks = AtomicUsize::new(0);
        let ask = Ask {
            refresh: false,
            trust,
            lock_timeout: Duration::from_secs(5),
        };
        let got = cache::load_or_check(&self.file(), &now(), &ask, || {
            checks.fetch_add(1, Ordering::SeqCst);
            Ok(Computed {
                verdicts: MACHINE.to_vec(),
                not_persisted: None,
            })
        })
        .unwrap();
        (got, checks.load(Ordering::SeqCst))
    }

    /// The planted cache is not trusted for a reason containing `why`: the pairs are checked
    /// again, the machine's answer comes back, and nothing under the scene changed (the
    /// untrusted files not replaced, nothing outside touched); an explicit write is refused.
    fn assert_untrusted(&self, why: &str) {
        let before = self.snapshot();
        let (got, checks) = self.ask(Trust::default());
        assert_eq!((got.verdicts.as_slice(), checks), (&MACHINE[..], 1));
        match &got.origin {
            Origin::Untrusted { reason } => assert!(reason.contains(why), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(self.snapshot(), before);
        let err =
            cache::store_checked(&self.file(), &now(), &MACHINE, Trust::default()).unwrap_err();
        assert!(format!("{err:#}").contains(why), "{err:#}");
        assert_eq!(self.snapshot(), before);
    }
}

#[test]
fn a_cache_planted_by_another_user_is_not_trusted_unless_that_user_is() {
    if !can_chown() {
        return;
    }
    let s = Scene::new();
    s.mode(&s.dir(), 0o1777); // a shared cache root, as /tmp
    s.plant(FORGED);
    for path in [s.file(), s.beside(), s.lock()] {
        chown(&path, Some(OTHER), Some(OTHER)).unwrap();
    }
    s.assert_untrusted(&format!(
        "is owned by uid {OTHER}, not by this user (uid 0) or root: not trusted, and left as \
         it is (remove it, or trust that user with --trust-cache-owner {OTHER})"
    ));
    // Trusting that user on purpose trusts what they wrote.
    let (got, checks) = s.ask(Trust { owner: Some(OTHER) });
    assert_eq!(
        (got.verdicts, got.origin, checks),
        (FORGED.to_vec(), Origin::File, 0)
    );
}

#[test]
fn each_file_owned_by_another_user_alone_is_not_trusted() {
    if !can_chown() {
        return;
    }
    for which in ["file", "fingerprint", "lock"] {
        let s = Scene::new();
        s.plant(FORGED);
        let path = match which {
            "file" => s.file(),
            "fingerprint" => s.beside(),
            _ => s.lock(),
        };
        chown(&path, Some(OTHER), None).unwrap();
        s.assert_untrusted(&format!("{} is owned by uid {OTHER}", path.display()));
    }
}

#[test]
fn a_folder_of_another_user_or_writable_by_others_without_the_sticky_bit_is_not_trusted() {
    let s = Scene::new();
    s.plant(FORGED);
    for (mode, who) in [
        (0o777, "its group and others (mode 0777)"),
        (0o775, "its group (mode 0775)"),
        (0o757, "others (mode 0757)"),
    ] {
        s.mode(&s.dir(), mode);
        s.assert_untrusted(&format!(
            "the cache folder {} is writable by {who} without the sticky bit",
            s.dir().display()
        ));
        assert_eq!(fs::metadata(s.dir()).unwrap().mode() & 0o7777, mode);
    }
    if can_chown() {
        s.mode(&s.dir(), 0o755);
        chown(s.dir(), Some(OTHER), None).unwrap();
        s.assert_untrusted(&format!(
            "the cache folder {} is owned by uid {OTHER}",
            s.dir().display()
        ));
    }
}

#[test]
fn a_sticky_folder_writable_by_others_is_trusted_with_the_users_own_files() {
    let s = Scene::new();
    s.mode(&s.dir(), 0o1777);
    s.plant(MACHINE);
    let (got, checks) = s.ask(Trust::default());
    assert_eq!(
        (got.verdicts, got.origin, checks),
        (MACHINE.to_vec(), Origin::File, 0)
    );
    assert_eq!(fs::metadata(s.dir()).unwrap().mode() & 0o7777, 0o1777);
}

#[test]
fn an_own_file_others_can_write_is_not_used_but_replaced() {
    for (which, mode, who) in [
        ("file", 0o664, "its group (mode 0664)"),
        ("file", 0o646, "others (mode 0646)"),
        ("fingerprint", 0o666, "its group and others (mode 0666)"),
    ] {
        let s = Scene::new();
        s.plant(FORGED);
        let path = if which == "file" {
            s.file()
        } else {
            s.beside()
        };
        s.mode(&path, mode);
        let outside = fs::read(s.tmp.path().join("outside/precious")).unwrap();
        let (got, checks) = s.ask(Trust::default());
        assert_eq!((got.verdicts.as_slice(), checks), (&MACHINE[..], 1));
        match &got.origin {
            Origin::Recomputed { reason } => {
                assert!(
                    reason.contains(&format!("it is writable by {who}")),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Replaced: the machine's verdicts, mode 0644.
        assert_eq!(
            fs::read_to_string(s.file()).unwrap(),
            cache::render(2, &MACHINE)
        );
        for path in [s.file(), s.beside()] {
            assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
        }
        assert_eq!(
            fs::read(s.tmp.path().join("outside/precious")).unwrap(),
            outside
        );
    }
}

#[test]
fn an_own_lock_others_can_write_is_tightened_when_taken() {
    let s = Scene::new();
    fs::write(s.lock(), "").unwrap();
    s.mode(&s.lock(), 0o666);
    let (got, checks) = s.ask(Trust::default());
    assert_eq!(
        (got.verdicts, got.origin, checks),
        (MACHINE.to_vec(), Origin::Computed, 1)
    );
    assert_eq!(fs::metadata(s.lock()).unwrap().mode() & 0o7777, 0o644);
}

/// `p2pcheck` with `args` on two simulated GPUs where `0->1` drops writes, in `dir`, under
/// `umask` (exit code 1 for a check, as `0->1` fails; 0 for an answer).
fn cli(dir: &Path, umask: &str, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask} && exec \"$0\" \"$@\""))
        .arg(CLI)
        .args(args)
        .args([
            "--simulate",
            "2",
            "--fault",
            "0->1:drop-writes",
            "--cache-dir",
        ])
        .arg(dir)
        .env("P2PCHECK_WORKER", WORKER)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap()
}

/// The issue's own scenario, through the CLI: a cache folder of mode 1777; `access-check 0 1`
/// computes false and writes the cache; another user's forgery (the file and its fingerprint
/// edited to say true, all three files given to uid 65534) is not trusted: false again, and
/// the files are left as they are; `--trust-cache-owner 65534` trusts it on purpose.
#[test]
fn the_cli_answers_the_machine_not_a_forgery_of_another_user() {
    if !can_chown() {
        return;
    }
    let s = Scene::new();
    s.mode(&s.dir(), 0o1777);
    let dir = s.dir();
    let access = |extra: &[&str]| {
        let mut args = vec!["access-check", "0", "1", "--json"];
        args.extend(extra);
        let out = cli(&dir, "022", &args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (stdout, _) = access(&[]);
    assert!(
        stdout.contains("\"answer\":false,\"origin\":\"Computed\""),
        "{stdout}"
    );
    let text = fs::read_to_string(s.file()).unwrap();
    fs::write(s.file(), text.replace("\"0->1\": false", "\"0->1\": true")).unwrap();
    let fp = fs::read_to_string(s.beside()).unwrap();
    assert!(fp.contains("verdicts=10 11\n"), "{fp}");
    fs::write(
        s.beside(),
        fp.replace("verdicts=10 11\n", "verdicts=11 11\n"),
    )
    .unwrap();
    for path in [s.file(), s.beside(), s.lock()] {
        chown(&path, Some(OTHER), Some(OTHER)).unwrap();
    }
    let before = s.snapshot();
    let (stdout, stderr) = access(&[]);
    assert!(
        stdout.contains("\"answer\":false,\"origin\":\"Untrusted"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("is owned by uid {OTHER}"))
            && stderr.contains(&format!("--trust-cache-owner {OTHER}"))
            && stderr.contains("the pairs were checked again, and nothing was written"),
        "{stderr}"
    );
    assert_eq!(s.snapshot(), before);
    // --write-vllm-cache refuses to write over them (exit 1: 0->1 fails; or 2, where a
    // failed write is the error it should be), the files unchanged.
    let out = cli(&dir, "022", &["--write-vllm-cache"]);
    assert!(matches!(out.status.code(), Some(1 | 2)));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&format!("owned by uid {OTHER}")), "{said}");
    assert_eq!(s.snapshot(), before);
    let (stdout, _) = access(&["--trust-cache-owner", &OTHER.to_string()]);
    assert!(
        stdout.contains("\"answer\":true,\"origin\":\"File\""),
        "{stdout}"
    );
}

#[test]
fn written_files_are_0644_whatever_the_umask_and_a_folder_keeps_its_mode() {
    for (umask, folder) in [("000", 0o700), ("777", 0o755), ("022", 0o1777)] {
        let s = Scene::new();
        s.mode(&s.dir(), folder);
        let out = cli(&s.dir(), umask, &["--write-vllm-cache"]);
        assert_eq!(out.status.code(), Some(1), "0->1 fails");
        for path in [s.file(), s.beside(), s.lock()] {
            let mode = fs::metadata(&path).unwrap().mode() & 0o7777;
            assert_eq!(mode, 0o644, "umask {umask}: {}", path.display());
        }
        assert_eq!(fs::metadata(s.dir()).unwrap().mode() & 0o7777, folder);
        assert_eq!(
            fs::read_to_string(s.file()).unwrap(),
            cache::render(2, &MACHINE)
        );
    }
    // A folder p2pcheck creates is 0755 less the umask: never writable by others.
    let s = Scene::new();
    let new = s.dir().join("new/sub");
    assert_eq!(
        cli(&new, "000", &["--write-vllm-cache"]).status.code(),
        Some(1)
    );
    for dir in [s.dir().join("new"), new] {
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
    }
}

#[test]
fn trust_cache_owner_needs_a_user_id() {
    let out = Command::new(CLI)
        .args(["access-check", "0", "1", "--trust-cache-owner", "nobody"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--trust-cache-owner \"nobody\": expected a user id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

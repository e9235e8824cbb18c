//! Helpers shared by the integration tests.

// Each test crate uses its own subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh, empty folder under the system temp folder, removed with all it holds when dropped,
/// so a test leaves nothing behind, even when it fails (the drop runs while unwinding).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// `<temp>/<prefix>-<pid>-<n>`, unique in this process; anything left there by an earlier
    /// process with the same pid is removed first.
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // remove_dir_all removes symbolic links themselves, never what they point to.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Live or zombie children of this process that are p2pcheck workers (workers started by a CLI
/// run are the CLI's children, not counted here).
pub fn worker_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": the fields after the last ')'.
            let ppid = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .to_string();
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let worker = String::from_utf8_lossy(&cmdline).contains("--p2pcheck-worker");
            (ppid == me && worker).then_some(pid)
        })
        .collect()
}

/// Runs `cmd` to its end and returns its output, or fails the test once it has run `limit`
/// (the child is then killed): no test waits on a child for ever. stdin is `/dev/null`.
/// `limit` only proves the child's waits are bounded; it must be generous (a loaded machine
/// runs everything many times slower), never a measure of speed.
pub fn output_within(cmd: &mut std::process::Command, limit: std::time::Duration) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::Instant;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} cannot start: {e}"));
    // Each pipe drained by a thread, so that a child writing much never blocks on it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap_or_default();
            panic!(
                "{cmd:?} still ran after {limit:?}: killed; stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // A descendant that kept a pipe open would keep it from ending: bounded too.
    let rest = deadline
        .saturating_duration_since(Instant::now())
        .max(std::time::Duration::from_secs(5));
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>, which: &str| {
        rx.recv_timeout(rest).unwrap_or_else(|_| {
            panic!("{cmd:?} exited, but its {which} stayed open (a descendant holds it)")
        })
    };
    Output {
        status,
        stdout: collect(stdout, "stdout"),
        stderr: collect(stderr, "stderr"),
    }
}

//! Helpers shared by the integration tests.

// Each test crate uses its own subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
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

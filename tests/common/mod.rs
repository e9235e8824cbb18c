//! Helpers shared by the integration tests.

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

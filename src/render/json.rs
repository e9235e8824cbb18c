//! The report as JSON (the CLI's `--json`).

//! A crafted fingerprint for the cache tests, which reach the fingerprint through the crate's
//! `test-internals` feature (apart from `mod.rs`, which the C ABI crate's tests share without
//! that feature).

/// The conditions of a check at `level` on a crafted two-GPU machine (what the cache tests
/// write and read fingerprints against).
pub fn crafted_fingerprint(level: &str) -> p2pcheck::fingerprint::Fingerprint {
    let gpu = |k: usize| p2pcheck::fingerprint::Gpu {
        bus_id: format!("0000:{:02x}:00.0", k + 1),
        uuid: format!("GPU-51a00000-0000-0000-0000-{k:012x}"),
        model: "p2pcheck simulated GPU".into(),
    };
    p2pcheck::fingerprint::Fingerprint {
        version: env!("CARGO_PKG_VERSION").into(),
        level: level.into(),
        check: String::new(),
        driver_version: "simulated".into(),
        boot_id: "00000000-0000-0000-0000-000000000000".into(),
        cvd: None,
        devices: 2,
        gpus: vec![gpu(0), gpu(1)],
    }
}

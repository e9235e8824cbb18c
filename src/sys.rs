//! Raw CUDA declarations: the bindgen output for `csrc/wrapper.h` (types, constants and
//! function-pointer types only; nothing here links to CUDA), plus the C shim's interface.
//!
//! `build.rs` regenerates the bindings when CUDA headers and libclang are present and otherwise
//! uses the committed `src/sys/bindings.rs`. The test below fails when the two drift apart;
//! `BLESS=1 cargo test` accepts the regenerated output.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]
#![allow(clippy::all)]
#![allow(unsafe_code)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// Where this build's bindings came from: `generated from <include dir>` or `committed`.
pub const BINDINGS_SOURCE: &str = env!("P2PCHECK_BINDINGS_SOURCE");

/// The C shim (`csrc/shim.h`): launches the kernel and handshake tiers' kernels.
pub mod shim {
    use std::os::raw::{c_char, c_int, c_uint, c_ulonglong, c_void};

    /// `p2pc_driver`: driver entry points handed to the shim. The fields use the driver's
    /// own pointer types (ABI-identical to the `void *`-based C declarations), so the table is
    /// filled from resolved symbols without casts.
    #[repr(C)]
    pub struct p2pc_driver {
        pub launch_kernel: super::PFN_cuLaunchKernel_v4000,
        pub ctx_synchronize: super::PFN_cuCtxSynchronize_v2000,
        pub mem_alloc: super::PFN_cuMemAlloc_v3020,
        pub mem_free: super::PFN_cuMemFree_v3020,
        pub memset_d8: super::PFN_cuMemsetD8_v3020,
        pub memcpy_dtoh: super::PFN_cuMemcpyDtoH_v3020,
    }

    /// `P2PC_MAX_CALLS`.
    pub const P2PC_MAX_CALLS: usize = 16;

    /// `p2pc_report`.
    #[repr(C)]
    pub struct p2pc_report {
        pub failed_call: *const c_char,
        pub code: c_int,
        pub n_calls: c_int,
        pub calls: [*const c_char; P2PC_MAX_CALLS],
        pub codes: [c_int; P2PC_MAX_CALLS],
        pub results: [c_ulonglong; 4],
    }

    extern "C" {
        pub fn p2pcheck_shim_pattern_store(
            d: *const p2pc_driver,
            function: *mut c_void,
            ptr: c_ulonglong,
            n: c_ulonglong,
            seed: c_ulonglong,
            width: c_uint,
            shift: c_ulonglong,
            out: *mut p2pc_report,
        );
        pub fn p2pcheck_shim_pattern_check(
            d: *const p2pc_driver,
            function: *mut c_void,
            ptr: c_ulonglong,
            n: c_ulonglong,
            seed: c_ulonglong,
            old_seed: c_ulonglong,
            width: c_uint,
            out: *mut p2pc_report,
        );
        pub fn p2pcheck_shim_handshake(
            d: *const p2pc_driver,
            function: *mut c_void,
            area: c_ulonglong,
            rounds: c_uint,
            role: c_uint,
            seed: c_ulonglong,
            budget_ns: c_ulonglong,
            out: *mut p2pc_report,
        );
    }
}

#[cfg(test)]
mod drift {
    /// The committed bindings must equal what this build generated (when it generated any).
    #[test]
    fn committed_bindings_match_generated() {
        let committed_path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/sys/bindings.rs");
        let generated = include_str!(concat!(env!("OUT_DIR"), "/bindings.rs"));
        if !super::BINDINGS_SOURCE.starts_with("generated") {
            assert!(
                std::env::var_os("P2PCHECK_REQUIRE_BINDGEN").is_none(),
                "P2PCHECK_REQUIRE_BINDGEN is set but build.rs did not run bindgen: bindings {}",
                super::BINDINGS_SOURCE
            );
            eprintln!(
                "skipped: bindings were not regenerated in this build: {}",
                super::BINDINGS_SOURCE
            );
            return;
        }
        let committed = std::fs::read_to_string(committed_path).unwrap_or_default();
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(committed_path, generated).expect("write src/sys/bindings.rs");
            return;
        }
        assert!(
            committed == generated,
            "src/sys/bindings.rs differs from the bindings generated {}; \
             run `BLESS=1 cargo test --lib drift` to accept them",
            super::BINDINGS_SOURCE
        );
    }
}

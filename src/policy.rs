//! vLLM's all-reduce selection policy: when to use NCCL symmetric memory, and the largest
//! tensors the custom all-reduce and the symmetric-memory all-reduce handle.
//!
//! This is a reimplementation of `should_nccl_symm_mem_allreduce` and of the two max-size
//! tables (`CUSTOM_ALL_REDUCE_MAX_SIZES`, `SYMM_MEM_ALL_REDUCE_MAX_SIZES`) in vLLM's
//! `vllm/distributed/device_communicators/all_reduce_utils.py`, so that a caller can decide
//! ahead of time which all-reduce vLLM would pick for a given world size and message size.
//!
//! Everything here is pure data and pure functions; the only contact with the process
//! environment is [`PolicyConfig::from_env`].
//!
//! ```
//! use p2pcheck::policy::{
//!     custom_allreduce_max_size, should_nccl_symm_mem_allreduce, ComputeCapability,
//!     PolicyConfig,
//! };
//!
//! let config = PolicyConfig { batch_invariant: false, symm_mem_enabled: true };
//! // On 8 GPUs the custom all-reduce is preferred for 16 KiB < nbytes < 128 KiB…
//! assert!(!should_nccl_symm_mem_allreduce(8, 64 * 1024, &config));
//! // …and NCCL symmetric memory everywhere else.
//! assert!(should_nccl_symm_mem_allreduce(8, 1 << 20, &config));
//!
//! let hopper = ComputeCapability::new(9, 0);
//! assert_eq!(hopper.to_string(), "9.0");
//! assert_eq!(custom_allreduce_max_size(hopper, 8), Some(256 * 1024));
//! assert_eq!(custom_allreduce_max_size(hopper, 3), None);
//! ```

use std::fmt;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A CUDA compute capability, `major.minor` (e.g. 9.0 for H100, 10.0 for B200/GB200).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ComputeCapability {
    /// The major version (9 in 9.0).
    pub major: u32,
    /// The minor version (0 in 9.0).
    pub minor: u32,
}

impl ComputeCapability {
    /// The compute capability `major.minor`.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }
}

impl fmt::Display for ComputeCapability {
    /// Formats as vLLM's table keys do: `9.0`, `10.3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One max-size table: for each compute capability, `(world_size, max_bytes)` entries.
pub type MaxSizeTable = [(ComputeCapability, [(u32, u64); 4]); 3];

/// The largest tensor, in bytes, that vLLM's custom all-reduce handles, by compute capability
/// and world size (vLLM's `CUSTOM_ALL_REDUCE_MAX_SIZES`). Read it with
/// [`custom_allreduce_max_size`].
pub const CUSTOM_ALLREDUCE_MAX_SIZES: MaxSizeTable = [
    (
        ComputeCapability::new(9, 0),
        [(2, 64 * MIB), (4, 32 * MIB), (6, 512 * KIB), (8, 256 * KIB)],
    ),
    (
        ComputeCapability::new(10, 0),
        [(2, 2 * MIB), (4, 2 * MIB), (6, MIB), (8, MIB)],
    ),
    (
        ComputeCapability::new(10, 3),
        [(2, 4 * MIB), (4, 4 * MIB), (6, 8 * MIB), (8, 4 * MIB)],
    ),
];

/// The largest tensor, in bytes, that vLLM's symmetric-memory all-reduce handles, by compute
/// capability and world size (vLLM's `SYMM_MEM_ALL_REDUCE_MAX_SIZES`). Read it with
/// [`symm_mem_max_size`].
pub const SYMM_MEM_MAX_SIZES: MaxSizeTable = [
    (
        ComputeCapability::new(9, 0),
        [(2, 64 * MIB), (4, 32 * MIB), (6, 64 * MIB), (8, 64 * MIB)],
    ),
    (
        ComputeCapability::new(10, 0),
        [(2, 8 * MIB), (4, 32 * MIB), (6, 128 * MIB), (8, 128 * MIB)],
    ),
    (
        ComputeCapability::new(10, 3),
        [(2, 4 * MIB), (4, 32 * MIB), (6, 32 * MIB), (8, 64 * MIB)],
    ),
];

/// For each world size listed, the open range `(lower, upper)` of message sizes in bytes where
/// vLLM's custom all-reduce beats NCCL symmetric memory; outside it (`nbytes <= lower` or
/// `nbytes >= upper`) NCCL symmetric memory is used.
///
/// Why these figures (benchmarks on H100/GB200):
///
/// * 8 GPUs: NCCL symmetric memory wins at 2–16 KiB (1.35–1.48x), the custom all-reduce wins
///   at 32–64 KiB, and NCCL wins again from 128 KiB to 1 GiB (1.12–6.14x);
/// * 4 GPUs: NCCL wins at 2–16 KiB (1.21–1.30x), the custom all-reduce wins at 32–256 KiB
///   (1.07–1.35x), and NCCL wins from 512 KiB to 1 GiB (1.10–2.32x).
pub const CUSTOM_ALLREDUCE_PREFERRED: [(u32, (u64, u64)); 2] =
    [(4, (16 * KIB, 512 * KIB)), (8, (16 * KIB, 128 * KIB))];

/// Below this world size NCCL symmetric memory is never used.
const MIN_WORLD_SIZE: u32 = 4;

/// Above this world size (with no preferred range listed) NCCL symmetric memory is always used.
const ALWAYS_USE_ABOVE_WORLD_SIZE: u32 = 8;

/// The one lookup both max-size tables share.
fn lookup(table: &MaxSizeTable, cc: ComputeCapability, world_size: u32) -> Option<u64> {
    let (_, sizes) = table.iter().find(|(c, _)| *c == cc)?;
    sizes
        .iter()
        .find(|(ws, _)| *ws == world_size)
        .map(|&(_, max)| max)
}

/// The largest tensor in bytes vLLM's custom all-reduce handles on `world_size` GPUs of compute
/// capability `cc` ([`CUSTOM_ALLREDUCE_MAX_SIZES`]); `None` when the table has no entry for
/// that compute capability or world size.
pub fn custom_allreduce_max_size(cc: ComputeCapability, world_size: u32) -> Option<u64> {
    lookup(&CUSTOM_ALLREDUCE_MAX_SIZES, cc, world_size)
}

/// The largest tensor in bytes vLLM's symmetric-memory all-reduce handles on `world_size` GPUs
/// of compute capability `cc` ([`SYMM_MEM_MAX_SIZES`]); `None` when the table has no entry for
/// that compute capability or world size.
pub fn symm_mem_max_size(cc: ComputeCapability, world_size: u32) -> Option<u64> {
    lookup(&SYMM_MEM_MAX_SIZES, cc, world_size)
}

/// The switches that can rule NCCL symmetric memory out regardless of sizes.
///
/// `Default` is both off, as vLLM's defaults are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT`): when on, NCCL symmetric memory is
    /// never used, since its reduction order may depend on the batch.
    pub batch_invariant: bool,
    /// Whether NCCL symmetric memory is enabled at all (`VLLM_USE_NCCL_SYMM_MEM`).
    pub symm_mem_enabled: bool,
}

impl PolicyConfig {
    /// The environment variable for [`PolicyConfig::batch_invariant`].
    pub const BATCH_INVARIANT_VAR: &'static str = "VLLM_BATCH_INVARIANT";
    /// The environment variable for [`PolicyConfig::symm_mem_enabled`].
    pub const SYMM_MEM_VAR: &'static str = "VLLM_USE_NCCL_SYMM_MEM";

    /// The configuration from a variable lookup (`lookup(name)` is the variable's value, `None`
    /// if unset), so that it can be built without touching the process environment.
    ///
    /// * `batch_invariant` from `VLLM_BATCH_INVARIANT`, default off;
    /// * `symm_mem_enabled` from `VLLM_USE_NCCL_SYMM_MEM`, default off.
    ///
    /// Each is on for `1` or `true`, off for `0` or `false` (case-insensitive, surrounding
    /// whitespace ignored); unset or empty means the default. Any other value is an error
    /// naming the variable and the value, rather than being silently taken as off.
    ///
    /// ```
    /// use p2pcheck::policy::PolicyConfig;
    ///
    /// let config = PolicyConfig::from_lookup(|name| {
    ///     (name == "VLLM_USE_NCCL_SYMM_MEM").then(|| "1".to_string())
    /// })?;
    /// assert!(config.symm_mem_enabled && !config.batch_invariant);
    /// assert!(PolicyConfig::from_lookup(|_| Some("maybe".to_string())).is_err());
    /// # Ok::<(), p2pcheck::policy::BadFlag>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`BadFlag`] for the first variable set to anything but the values above.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, BadFlag> {
        let flag = |name: &str| parse_flag(name, lookup(name).as_deref());
        Ok(Self {
            batch_invariant: flag(Self::BATCH_INVARIANT_VAR)?,
            symm_mem_enabled: flag(Self::SYMM_MEM_VAR)?,
        })
    }

    /// [`PolicyConfig::from_lookup`] this process's environment. A value that is not valid
    /// UTF-8 is reported as invalid, not ignored.
    ///
    /// # Errors
    ///
    /// As [`PolicyConfig::from_lookup`].
    pub fn from_env() -> Result<Self, BadFlag> {
        Self::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }
}

/// A policy variable set to a value that is not a boolean. (This module stands alone, below
/// the rest of the crate, so it has its own error rather than [`crate::Error`].)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadFlag {
    /// The variable.
    pub name: String,
    /// Its value, as set.
    pub value: String,
}

impl fmt::Display for BadFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is {:?}: expected 1, true, 0 or false (case-insensitive)",
            self.name, self.value
        )
    }
}

impl std::error::Error for BadFlag {}

/// One boolean variable: `1`/`true` on, `0`/`false`/unset/empty off, anything else an error.
fn parse_flag(name: &str, value: Option<&str>) -> Result<bool, BadFlag> {
    let Some(raw) = value else {
        return Ok(false);
    };
    let v = raw.trim();
    if v.is_empty() {
        // As elsewhere in this crate, an empty variable counts as unset.
        Ok(false)
    } else if v == "1" || v.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if v == "0" || v.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(BadFlag {
            name: name.to_string(),
            value: raw.to_string(),
        })
    }
}

/// Whether vLLM would all-reduce `nbytes` bytes across `world_size` GPUs with NCCL symmetric
/// memory (vLLM's `should_nccl_symm_mem_allreduce`):
///
/// 1. never in batch-invariant mode, nor when symmetric memory is not enabled;
/// 2. never below 4 GPUs;
/// 3. where [`CUSTOM_ALLREDUCE_PREFERRED`] lists a range `(lower, upper)` for `world_size`,
///    exactly when `nbytes <= lower` or `nbytes >= upper` (inside it the custom all-reduce is
///    faster — see that table for the benchmarks);
/// 4. otherwise exactly when `world_size > 8`.
///
/// ```
/// use p2pcheck::policy::{should_nccl_symm_mem_allreduce, PolicyConfig};
///
/// let on = PolicyConfig { batch_invariant: false, symm_mem_enabled: true };
/// assert!(should_nccl_symm_mem_allreduce(4, 16 * 1024, &on));
/// assert!(!should_nccl_symm_mem_allreduce(4, 16 * 1024 + 1, &on));
/// assert!(!should_nccl_symm_mem_allreduce(2, 1 << 30, &on));
/// assert!(should_nccl_symm_mem_allreduce(16, 1, &on));
/// assert!(!should_nccl_symm_mem_allreduce(16, 1, &PolicyConfig::default()));
/// ```
pub fn should_nccl_symm_mem_allreduce(world_size: u32, nbytes: u64, config: &PolicyConfig) -> bool {
    if config.batch_invariant || !config.symm_mem_enabled {
        return false;
    }
    if world_size < MIN_WORLD_SIZE {
        return false;
    }
    if let Some(&(_, (lower, upper))) = CUSTOM_ALLREDUCE_PREFERRED
        .iter()
        .find(|(ws, _)| *ws == world_size)
    {
        // Inside the open range the custom all-reduce wins; at or beyond its ends NCCL does.
        return nbytes <= lower || nbytes >= upper;
    }
    world_size > ALWAYS_USE_ABOVE_WORLD_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: PolicyConfig = PolicyConfig {
        batch_invariant: false,
        symm_mem_enabled: true,
    };

    fn should(world_size: u32, nbytes: u64) -> bool {
        should_nccl_symm_mem_allreduce(world_size, nbytes, &ON)
    }

    /// Every boundary of one preferred range, with the range written out literally.
    fn check_range(world_size: u32, lower: u64, upper: u64) {
        let cases = [
            (0, true),
            (1, true),
            (lower - 1, true),
            (lower, true),
            (lower + 1, false),
            (upper - 1, false),
            (upper, true),
            (upper + 1, true),
            (1 << 40, true),
            (u64::MAX, true),
        ];
        for (nbytes, want) in cases {
            assert_eq!(
                should(world_size, nbytes),
                want,
                "world {world_size}, {nbytes} bytes"
            );
        }
    }

    #[test]
    fn world_4_range_boundaries() {
        check_range(4, 16_384, 524_288);
    }

    #[test]
    fn world_8_range_boundaries() {
        check_range(8, 16_384, 131_072);
    }

    #[test]
    fn preferred_table_is_literal() {
        assert_eq!(
            CUSTOM_ALLREDUCE_PREFERRED,
            [(4, (16_384, 524_288)), (8, (16_384, 131_072))]
        );
    }

    #[test]
    fn small_worlds_never() {
        for ws in 0..=3 {
            for nbytes in [0, 1, 16_384, 65_536, 1 << 20, 1 << 30, u64::MAX] {
                assert!(!should(ws, nbytes), "world {ws}, {nbytes} bytes");
            }
        }
    }

    #[test]
    fn worlds_without_range_up_to_8_never() {
        for ws in [5, 6, 7] {
            for nbytes in [0, 1, 16_384, 65_536, 1 << 20, 1 << 30, u64::MAX] {
                assert!(!should(ws, nbytes), "world {ws}, {nbytes} bytes");
            }
        }
    }

    #[test]
    fn worlds_above_8_always() {
        for ws in [9, 16, 32, u32::MAX] {
            for nbytes in [0, 1, 16_384, 65_536, 1 << 20, 1 << 30, u64::MAX] {
                assert!(should(ws, nbytes), "world {ws}, {nbytes} bytes");
            }
        }
    }

    #[test]
    fn each_flag_disables() {
        let batch_invariant = PolicyConfig {
            batch_invariant: true,
            symm_mem_enabled: true,
        };
        let disabled = PolicyConfig {
            batch_invariant: false,
            symm_mem_enabled: false,
        };
        let both = PolicyConfig {
            batch_invariant: true,
            symm_mem_enabled: false,
        };
        // Cases that are true with ON, so only the flag can make them false.
        for (ws, nbytes) in [
            (4, 0),
            (4, 1 << 30),
            (8, 16_384),
            (8, 131_072),
            (9, 1),
            (16, 1),
        ] {
            assert!(should(ws, nbytes), "world {ws}, {nbytes} bytes");
            for config in [batch_invariant, disabled, both] {
                assert!(
                    !should_nccl_symm_mem_allreduce(ws, nbytes, &config),
                    "{config:?}, world {ws}, {nbytes} bytes"
                );
            }
        }
    }

    const MIB_LIT: u64 = 1_048_576;
    const KIB_LIT: u64 = 1_024;

    #[test]
    fn custom_allreduce_table_cells() {
        let cells = [
            ((9, 0), 2, 64 * MIB_LIT),
            ((9, 0), 4, 32 * MIB_LIT),
            ((9, 0), 6, 512 * KIB_LIT),
            ((9, 0), 8, 256 * KIB_LIT),
            ((10, 0), 2, 2 * MIB_LIT),
            ((10, 0), 4, 2 * MIB_LIT),
            ((10, 0), 6, MIB_LIT),
            ((10, 0), 8, MIB_LIT),
            ((10, 3), 2, 4 * MIB_LIT),
            ((10, 3), 4, 4 * MIB_LIT),
            ((10, 3), 6, 8 * MIB_LIT),
            ((10, 3), 8, 4 * MIB_LIT),
        ];
        for ((major, minor), ws, want) in cells {
            let cc = ComputeCapability { major, minor };
            assert_eq!(
                custom_allreduce_max_size(cc, ws),
                Some(want),
                "{cc}, world {ws}"
            );
        }
    }

    #[test]
    fn symm_mem_table_cells() {
        let cells = [
            ((9, 0), 2, 64 * MIB_LIT),
            ((9, 0), 4, 32 * MIB_LIT),
            ((9, 0), 6, 64 * MIB_LIT),
            ((9, 0), 8, 64 * MIB_LIT),
            ((10, 0), 2, 8 * MIB_LIT),
            ((10, 0), 4, 32 * MIB_LIT),
            ((10, 0), 6, 128 * MIB_LIT),
            ((10, 0), 8, 128 * MIB_LIT),
            ((10, 3), 2, 4 * MIB_LIT),
            ((10, 3), 4, 32 * MIB_LIT),
            ((10, 3), 6, 32 * MIB_LIT),
            ((10, 3), 8, 64 * MIB_LIT),
        ];
        for ((major, minor), ws, want) in cells {
            let cc = ComputeCapability { major, minor };
            assert_eq!(symm_mem_max_size(cc, ws), Some(want), "{cc}, world {ws}");
        }
    }

    #[test]
    fn unknown_cc_or_world_is_none() {
        let known = [(9, 0), (10, 0), (10, 3)];
        let unknown = [(8, 0), (8, 9), (9, 1), (10, 1), (10, 2), (11, 0), (12, 0)];
        for (major, minor) in unknown {
            let cc = ComputeCapability::new(major, minor);
            for ws in [2, 4, 6, 8] {
                assert_eq!(custom_allreduce_max_size(cc, ws), None, "{cc}, world {ws}");
                assert_eq!(symm_mem_max_size(cc, ws), None, "{cc}, world {ws}");
            }
        }
        for (major, minor) in known {
            let cc = ComputeCapability::new(major, minor);
            for ws in [0, 1, 3, 5, 7, 9, 16] {
                assert_eq!(custom_allreduce_max_size(cc, ws), None, "{cc}, world {ws}");
                assert_eq!(symm_mem_max_size(cc, ws), None, "{cc}, world {ws}");
            }
        }
    }

    #[test]
    fn compute_capability_display_and_eq() {
        assert_eq!(ComputeCapability::new(9, 0).to_string(), "9.0");
        assert_eq!(ComputeCapability::new(10, 3).to_string(), "10.3");
        assert_eq!(
            ComputeCapability::new(10, 0),
            ComputeCapability {
                major: 10,
                minor: 0
            }
        );
        assert_ne!(ComputeCapability::new(10, 0), ComputeCapability::new(10, 3));
    }

    use crate::testutil::env;

    #[test]
    fn env_unset_is_default_off() {
        let config = PolicyConfig::from_lookup(env(&[])).unwrap();
        assert_eq!(config, PolicyConfig::default());
        assert!(!config.batch_invariant && !config.symm_mem_enabled);
    }

    #[test]
    fn env_truthy_and_falsy() {
        for var in ["VLLM_BATCH_INVARIANT", "VLLM_USE_NCCL_SYMM_MEM"] {
            for (value, want) in [
                ("1", true),
                ("true", true),
                ("TRUE", true),
                ("True", true),
                (" 1 ", true),
                ("0", false),
                ("false", false),
                ("FALSE", false),
                ("False", false),
                ("", false),
                ("  ", false),
            ] {
                let config = PolicyConfig::from_lookup(env(&[(var, value)])).unwrap();
                let (got, other) = if var == "VLLM_BATCH_INVARIANT" {
                    (config.batch_invariant, config.symm_mem_enabled)
                } else {
                    (config.symm_mem_enabled, config.batch_invariant)
                };
                assert_eq!(got, want, "{var}={value:?}");
                assert!(!other, "{var}={value:?} must not set the other flag");
            }
        }
        let both = PolicyConfig::from_lookup(env(&[
            ("VLLM_BATCH_INVARIANT", "true"),
            ("VLLM_USE_NCCL_SYMM_MEM", "1"),
        ]))
        .unwrap();
        assert_eq!(
            both,
            PolicyConfig {
                batch_invariant: true,
                symm_mem_enabled: true
            }
        );
    }

    #[test]
    fn env_invalid_is_error_naming_var_and_value() {
        for var in ["VLLM_BATCH_INVARIANT", "VLLM_USE_NCCL_SYMM_MEM"] {
            for value in ["maybe", "yes", "2", "-1", "on", "tru", "1.0"] {
                let err = PolicyConfig::from_lookup(env(&[(var, value)]))
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(var), "{err}");
                assert!(err.contains(&format!("{value:?}")), "{err}");
            }
        }
    }
}

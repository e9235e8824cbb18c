//! Why one side's part of a pair failed ([`Problem`]), which read-back found it ([`Check`]), and
//! the diagnosis a person acts on ([`Class`]).

use std::fmt;

use crate::failed_call;

/// Which read-back found wrong bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A copy-engine read-back (`cudaMemcpy` to the host) after the consumer's memset.
    CopyReadBack,
    /// The owner's read-back of the consumer's SM stores.
    KernelStores,
    /// The consumer's SM loads of what the owner wrote.
    KernelLoads,
    /// The destination of the bandwidth measurement's timed copies, checked after them.
    BandwidthCopies,
}

impl Check {
    /// What was checked, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Check::CopyReadBack => "copy read-back",
            Check::KernelStores => "peer SM stores, as the owner sees them",
            Check::KernelLoads => "SM loads through the mapping",
            Check::BandwidthCopies => "the bandwidth measurement's copied bytes",
        }
    }
}

/// Why one side's part of a pair failed: typed, so that reports, the C ABI and the trace can
/// use the parts; [`Display`](fmt::Display) is for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A CUDA call returned an error code.
    Cuda {
        /// The function, e.g. `cudaIpcOpenMemHandle`.
        call: String,
        /// The device it concerned (the worker's local ordinal), where there is one.
        device: Option<i32>,
        /// The raw return code.
        code: i32,
        /// CUDA's name for it, e.g. `cudaErrorMapBufferObjectFailed`.
        name: String,
        /// CUDA's description.
        text: String,
    },
    /// The CUDA libraries could not be loaded or lack a symbol.
    Driver(String),
    /// Bytes read back were not what was written.
    Mismatch {
        /// Which read-back.
        check: Check,
        /// Bytes that differed.
        wrong: u64,
        /// Bytes checked.
        total: u64,
        /// Offset of the first differing byte.
        first_bad: u64,
        /// The value found there (`None` where the kernel does not report it).
        seen: Option<u8>,
        /// The value expected (for a pattern: 0, the bytes differ by offset).
        expected: u8,
        /// Width of the accesses in bytes: 0 for the copy engine, else 1, 4, 8 or 16 (SM).
        width: u8,
        /// Of the wrong bytes, those still holding the old contents: writes that never arrived.
        stale: u64,
    },
    /// The handshake tier did not complete.
    Handshake {
        /// Rounds asked for.
        rounds: u32,
        /// Rounds completed.
        done: u64,
        /// Payload bytes wrong when their flag said they were ready.
        payload_errors: u64,
        /// A wait reached its deadline on the GPU clock.
        timed_out: bool,
        /// GPU time the kernel ran.
        elapsed_ns: u64,
    },
    /// The other side could not do its part, so this side could not test: what it said.
    Peer(Box<Problem>),
    /// The cuMem transport's descriptor could not be passed between the processes (over the
    /// Unix socket, `SCM_RIGHTS`): why.
    Descriptor(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Cuda {
                call,
                device,
                code,
                name,
                text,
            } => failed_call::describe(f, call, *device, *code, name, text),
            Problem::Driver(why) => f.write_str(why),
            Problem::Mismatch {
                check,
                wrong,
                total,
                first_bad,
                seen,
                expected,
                width,
                stale,
            } => {
                write!(f, "{}", check.describe())?;
                if *width > 0 {
                    write!(f, " ({width}-byte accesses)")?;
                }
                write!(
                    f,
                    ": {wrong} of {total} bytes wrong, first at byte {first_bad}"
                )?;
                if let Some(seen) = seen {
                    write!(f, " ({seen:#04x}, expected {expected:#04x})")?;
                }
                if *stale > 0 {
                    write!(f, ", {stale} of them still the old contents")?;
                }
                Ok(())
            }
            Problem::Handshake {
                rounds,
                done,
                payload_errors,
                timed_out,
                elapsed_ns,
            } => {
                write!(f, "handshake: {done} of {rounds} rounds")?;
                if *timed_out {
                    write!(
                        f,
                        ", then no flag from the other kernel within {:.1} ms",
                        *elapsed_ns as f64 / 1e6
                    )?;
                }
                if *payload_errors > 0 {
                    write!(f, ", {payload_errors} payload bytes wrong")?;
                }
                Ok(())
            }
            Problem::Peer(p) => write!(f, "the other side could not take part: {p}"),
            Problem::Descriptor(why) => {
                write!(
                    f,
                    "the cuMem allocation's descriptor could not be passed: {why}"
                )
            }
        }
    }
}

/// What kind of failure a [`Problem`] is: the diagnosis a person acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Nothing written through the mapping arrived: the old contents remain.
    NeverWritten,
    /// Some pages arrived, others kept their old contents.
    Partial,
    /// Data arrived, but wrong.
    WrongData,
    /// `cudaIpcOpenMemHandle` failed: the memory could not be mapped at all.
    OpenFailed,
    /// A flag from the other kernel never became visible within the deadline.
    Timeout,
    /// cuMem transport: the driver refused to make or export the allocation as a POSIX
    /// descriptor (`cuMemCreate`, `cuMemExportToShareableHandle`).
    ExportRefused,
    /// cuMem transport: the descriptor could not be passed to the other process.
    FdNotPassable,
    /// cuMem transport: the driver refused to import the descriptor
    /// (`cuMemImportFromShareableHandle`).
    ImportRefused,
    /// cuMem transport: the imported memory could not be mapped or made accessible
    /// (`cuMemAddressReserve`, `cuMemMap`, `cuMemSetAccess`).
    MapRefused,
    /// Another failed call, or the driver could not be used.
    Other,
}

impl Class {
    /// `never-written`, `partial`, `wrong-data`, `open-failed`, `timeout`, `export-refused`,
    /// `fd-not-passable`, `import-refused`, `map-refused`, `other`.
    pub fn name(self) -> &'static str {
        match self {
            Class::NeverWritten => "never-written",
            Class::Partial => "partial",
            Class::WrongData => "wrong-data",
            Class::OpenFailed => "open-failed",
            Class::Timeout => "timeout",
            Class::ExportRefused => "export-refused",
            Class::FdNotPassable => "fd-not-passable",
            Class::ImportRefused => "import-refused",
            Class::MapRefused => "map-refused",
            Class::Other => "other",
        }
    }

    /// What usually causes it, for a person.
    pub fn hint(self) -> &'static str {
        match self {
            Class::NeverWritten => {
                "writes through the peer mapping never arrived; over PCIe, ACS with a \
                 translating IOMMU does this (check ACS in `lspci -vvv` and the IOMMU mode)"
            }
            Class::Partial => "only some pages arrived: a peer path that loses part of the traffic",
            Class::WrongData => "data arrived but wrong: a broken peer path or driver",
            Class::OpenFailed => {
                "the memory could not be mapped; in a container the processes must share the \
                 IPC and PID namespaces (docker: --ipc=host --pid=host)"
            }
            Class::Timeout => {
                "kernels running at the same time did not see each other's flags: a peer \
                 path that does not keep resident kernels coherent (what all-reduce needs)"
            }
            Class::ExportRefused => {
                "the driver would not export the allocation as a POSIX file descriptor: the \
                 reason says whether the device supports it \
                 (CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED) and the \
                 driver's version; the cuMem path needs a driver of CUDA 10.2 or later"
            }
            Class::FdNotPassable => {
                "the descriptor could not cross between the processes over a Unix socket \
                 (SCM_RIGHTS): a seccomp or LSM policy, or a descriptor limit (ulimit -n), \
                 stops it; in containers the processes must be able to share a socket"
            }
            Class::ImportRefused => {
                "the driver would not import the other process's descriptor: in a container \
                 the processes need the same driver and access to each other's GPU device \
                 files (/dev/nvidia*); PyTorch's symmetric memory and NCCL's cuMem path fail \
                 the same way"
            }
            Class::MapRefused => {
                "the imported memory could not be mapped or made accessible from this GPU \
                 (cuMemMap, cuMemSetAccess): the driver does not allow peer access between the \
                 two GPUs over this path"
            }
            Class::Other => "see the failing call",
        }
    }
}

impl Problem {
    /// The diagnosis.
    pub fn class(&self) -> Class {
        match self {
            Problem::Cuda { call, .. } => match call.as_str() {
                "cudaIpcOpenMemHandle" => Class::OpenFailed,
                "cuMemCreate" | "cuMemExportToShareableHandle" => Class::ExportRefused,
                "cuMemImportFromShareableHandle" => Class::ImportRefused,
                "cuMemAddressReserve" | "cuMemMap" | "cuMemSetAccess" => Class::MapRefused,
                _ => Class::Other,
            },
            Problem::Descriptor(_) => Class::FdNotPassable,
            Problem::Driver(_) => Class::Other,
            // A pattern's byte equals the old pattern's by chance at about 1 offset in 256,
            // and such bytes cannot be told wrong: "all" allows for them (1/64 of the bytes).
            Problem::Mismatch {
                wrong,
                total,
                stale,
                ..
            } => match (*stale == *wrong, *wrong + *total / 64 >= *total) {
                (true, true) => Class::NeverWritten,
                (true, false) => Class::Partial,
                (false, _) => Class::WrongData,
            },
            Problem::Handshake {
                timed_out: true, ..
            } => Class::Timeout,
            Problem::Handshake { .. } => Class::WrongData,
            Problem::Peer(p) => p.class(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A failed `cudaIpcOpenMemHandle`, as the tests here and the wire format's use it.
    pub(crate) fn cuda_problem() -> Problem {
        Problem::Cuda {
            call: "cudaIpcOpenMemHandle".into(),
            device: Some(1),
            code: 205,
            name: "cudaErrorMapBufferObjectFailed".into(),
            text: "mapping of buffer object failed".into(),
        }
    }

    #[test]
    fn problems_are_classified_as_a_person_needs() {
        let m = |wrong, stale| Problem::Mismatch {
            check: Check::KernelStores,
            wrong,
            total: 1 << 21,
            first_bad: 0,
            seen: None,
            expected: 0,
            width: 4,
            stale,
        };
        // All wrong but the bytes the two patterns share by chance: nothing arrived.
        assert_eq!(
            m((1 << 21) - 8200, (1 << 21) - 8200).class(),
            Class::NeverWritten
        );
        assert_eq!(m(1 << 21, 1 << 21).class(), Class::NeverWritten);
        // Half the pages kept their old contents.
        assert_eq!(m(1 << 20, 1 << 20).class(), Class::Partial);
        // Wrong bytes that are not the old contents.
        assert_eq!(m(1 << 20, 4000).class(), Class::WrongData);
        assert_eq!(cuda_problem().class(), Class::OpenFailed);
        assert_eq!(
            Problem::Peer(Box::new(cuda_problem())).class(),
            Class::OpenFailed
        );
        let hs = |timed_out, payload_errors| Problem::Handshake {
            rounds: 16,
            done: 3,
            payload_errors,
            timed_out,
            elapsed_ns: 1,
        };
        assert_eq!(hs(true, 0).class(), Class::Timeout);
        assert_eq!(hs(false, 5).class(), Class::WrongData);
        assert_eq!(Problem::Driver("x".into()).class(), Class::Other);
        let call = |name: &str| Problem::Cuda {
            call: name.into(),
            device: Some(0),
            code: 801,
            name: "CUDA_ERROR_NOT_SUPPORTED".into(),
            text: "operation not supported".into(),
        };
        for (name, class) in [
            ("cuMemCreate", Class::ExportRefused),
            ("cuMemExportToShareableHandle", Class::ExportRefused),
            ("cuMemImportFromShareableHandle", Class::ImportRefused),
            ("cuMemAddressReserve", Class::MapRefused),
            ("cuMemMap", Class::MapRefused),
            ("cuMemSetAccess", Class::MapRefused),
            ("cuMemRelease", Class::Other),
        ] {
            assert_eq!(call(name).class(), class, "{name}");
            assert_eq!(Problem::Peer(Box::new(call(name))).class(), class, "{name}");
        }
        assert_eq!(
            Problem::Descriptor("sendmsg: EPERM".into()).class(),
            Class::FdNotPassable
        );
        for c in [
            Class::NeverWritten,
            Class::Partial,
            Class::WrongData,
            Class::OpenFailed,
            Class::Timeout,
            Class::ExportRefused,
            Class::FdNotPassable,
            Class::ImportRefused,
            Class::MapRefused,
        ] {
            assert!(!c.hint().is_empty() && !c.name().is_empty());
        }
    }
}

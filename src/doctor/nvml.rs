//! NVML (`libnvidia-ml.so.1`), loaded with `dlopen`, for what sysfs cannot say: NVLink state,
//! the driver's own P2P answer per pair, the NVSwitch fabric, persistence, MIG and compute
//! modes. Absent NVML is a fact to report, never an error.
//!
//! NVML's headers are not part of the bindgen setup (`build.rs` generates CUDA's only), so the
//! few prototypes used here are declared by hand from `nvml.h` (NVML API version 12): plain C
//! functions over an opaque device handle, `unsigned int` out-parameters for its enums, and two
//! small structs for the fabric. Every symbol but the four needed to start is optional: an
//! older driver that lacks one reports that fact as not available, nothing more. This module is
//! an FFI edge: its `unsafe` is the symbol look-up and the calls.
//!
//! NVML can block (a GPU that fell off the bus, a driver still initialising), so the queries
//! run on a thread of their own and the caller waits for them with a deadline
//! ([`query`]); a thread that does not answer in time is left behind and reported.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::mpsc;
use std::time::Duration;

use crate::cuda::{dlerror_text, dlopen};

/// The library loaded when `P2PCHECK_LIBNVML` is unset or empty.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// The variable naming another NVML library to load (tests: the simulated one).
pub const LIBRARY_VAR: &str = "P2PCHECK_LIBNVML";

/// `NVML_NVLINK_MAX_LINKS` of current headers (18 since Hopper): links are asked up to it.
const MAX_LINKS: c_uint = 18;

/// `NVML_SUCCESS`, `NVML_ERROR_INVALID_ARGUMENT`, `NVML_ERROR_NOT_SUPPORTED`.
const SUCCESS: c_int = 0;
const INVALID_ARGUMENT: c_int = 2;
const NOT_SUPPORTED: c_int = 3;

/// `nvmlGpuP2PCapsIndex_t`: `NVML_P2P_CAPS_INDEX_READ`, `_WRITE`, `_NVLINK`, `_ATOMICS`.
const CAPS_READ: c_uint = 0;
const CAPS_WRITE: c_uint = 1;
const CAPS_NVLINK: c_uint = 2;
const CAPS_ATOMICS: c_uint = 3;

/// `NVML_GPU_FABRIC_STATE_NOT_SUPPORTED`: the GPU is not on an NVSwitch fabric.
const FABRIC_NOT_SUPPORTED: u8 = 0;

/// An `nvmlDevice_t`: an opaque pointer NVML hands out and takes back.
type Device = *mut c_void;

/// `nvmlGpuFabricInfo_t` (R535 and later).
#[repr(C)]
#[derive(Default)]
struct FabricInfoV1 {
    cluster_uuid: [u8; 16],
    status: c_int,
    clique_id: c_uint,
    state: u8,
}

/// `nvmlGpuFabricInfo_v2_t`, the `nvmlDeviceGetGpuFabricInfoV` form (R550 and later).
#[repr(C)]
#[derive(Default)]
struct FabricInfoV2 {
    version: c_uint,
    cluster_uuid: [u8; 16],
    status: c_int,
    clique_id: c_uint,
    state: u8,
    health_mask: c_uint,
}

/// `NVML_STRUCT_VERSION(GpuFabricInfo, 2)`: the struct's size, and the version in the top byte.
const FABRIC_INFO_V2: c_uint = std::mem::size_of::<FabricInfoV2>() as c_uint | 2 << 24;

type InitFn = unsafe extern "C" fn() -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type TextFn = unsafe extern "C" fn(*mut c_char, c_uint) -> c_int;
type ByBusIdFn = unsafe extern "C" fn(*const c_char, *mut Device) -> c_int;
type DeviceTextFn = unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int;
type DeviceUintFn = unsafe extern "C" fn(Device, *mut c_uint) -> c_int;
type DeviceTwoUintFn = unsafe extern "C" fn(Device, *mut c_uint, *mut c_uint) -> c_int;
type LinkStateFn = unsafe extern "C" fn(Device, c_uint, *mut c_uint) -> c_int;
type P2pStatusFn = unsafe extern "C" fn(Device, Device, c_uint, *mut c_uint) -> c_int;
type FabricV1Fn = unsafe extern "C" fn(Device, *mut FabricInfoV1) -> c_int;
type FabricV2Fn = unsafe extern "C" fn(Device, *mut FabricInfoV2) -> c_int;
type RemotePciFn = unsafe extern "C" fn(Device, c_uint, *mut PciInfo) -> c_int;

/// `nvmlPciInfo_t`: where a link's far end is.
#[repr(C)]
struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

/// What NVML said about one GPU; `None` in a field: NVML could not say (the reason is in
/// [`Gpu::unavailable`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gpu {
    /// `nvmlDeviceGetUUID`.
    pub uuid: Option<String>,
    /// `nvmlDeviceGetPersistenceMode`: enabled.
    pub persistence: Option<bool>,
    /// `nvmlDeviceGetMigMode`: (current, pending) enabled; `None` also on GPUs without MIG.
    pub mig: Option<(bool, bool)>,
    /// `nvmlDeviceGetComputeMode`: 0 default, 1 exclusive thread, 2 prohibited, 3 exclusive
    /// process.
    pub compute_mode: Option<u32>,
    /// `nvmlDeviceGetNvLinkState` for each link the GPU has (true: active); empty without
    /// NVLink.
    pub links: Vec<bool>,
    /// `nvmlDeviceGetGpuFabricInfo(V)`: (state, status); `None` where the GPU is not on an
    /// NVSwitch fabric or the driver cannot say.
    pub fabric: Option<(u8, i32)>,
    /// `nvmlDeviceGetNvLinkVersion` of the first active link: NVML's version enum (6: NVLink
    /// 4.0); `None` without an active link or where NVML cannot say.
    pub nvlink_version: Option<u32>,
    /// `nvmlDeviceGetNvLinkRemotePciInfo_v2` per active link: the far end's (domain, bus,
    /// device), to count the links that join two GPUs directly; `None` where NVML cannot say.
    pub link_remotes: Vec<Option<(u32, u32, u32)>>,
    /// `nvmlDeviceGetMaxPcieLinkGeneration` and `nvmlDeviceGetCurrPcieLinkWidth`: the link's
    /// generation (the maximum: an idle GPU lowers its current one) and its trained width.
    pub pcie: Option<(u32, u32)>,
    /// What could not be asked, and why (`"persistence: Not Supported"`).
    pub unavailable: Vec<String>,
}

/// NVML's P2P status of one pair of GPUs, per capability: `nvmlGpuP2PStatus_t` values
/// (0 ok, 1 chipset not supported, 2 GPU not supported, 3 IOH topology not supported,
/// 4 disabled by regkey, 5 not supported, 6 unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct P2pStatus {
    /// `NVML_P2P_CAPS_INDEX_READ`.
    pub read: u32,
    /// `NVML_P2P_CAPS_INDEX_WRITE`.
    pub write: u32,
    /// `NVML_P2P_CAPS_INDEX_ATOMICS`.
    pub atomics: u32,
    /// `NVML_P2P_CAPS_INDEX_NVLINK`.
    pub nvlink: u32,
}

/// Everything NVML said, for the GPUs asked about (by PCI bus id, in the order given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answers {
    /// The library that answered (the path given to `dlopen`).
    pub library: String,
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: Option<String>,
    /// One per bus id asked: NVML's facts, or why it has none (`NVML_ERROR_NOT_FOUND`, ...).
    pub gpus: Vec<Result<Gpu, String>>,
    /// `((i, j), status)` for every pair `i < j` of GPUs NVML knows (indices into `gpus`).
    pub pairs: Vec<((usize, usize), P2pStatus)>,
}

/// The library to load: `P2PCHECK_LIBNVML` when set and not empty, else the soname.
pub fn library_from_env() -> String {
    std::env::var(LIBRARY_VAR)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_LIBRARY.into())
}

/// Asks NVML about the GPUs at `bus_ids`, on a thread of its own, waiting at most `timeout`.
/// `Err` says why there is no answer at all: the library is absent, `nvmlInit` failed, or NVML
/// did not answer in time (its thread is then left behind, blocked in NVML).
pub fn query(library: &str, bus_ids: &[String], timeout: Duration) -> Result<Answers, String> {
    let (tx, rx) = mpsc::channel();
    let (library, bus_ids) = (library.to_string(), bus_ids.to_vec());
    std::thread::Builder::new()
        .name("p2pcheck-nvml".into())
        .spawn(move || {
            let _ = tx.send(ask(&library, &bus_ids));
        })
        .map_err(|e| format!("cannot start a thread for NVML: {e}"))?;
    rx.recv_timeout(timeout).unwrap_or_else(|e| match e {
        mpsc::RecvTimeoutError::Timeout => Err(format!(
            "NVML did not answer within {} s (a GPU or the driver is not responding)",
            timeout.as_secs_f64()
        )),
        mpsc::RecvTimeoutError::Disconnected => Err("NVML's thread ended without an answer".into()),
    })
}

/// NVML's functions, resolved from one loaded library.
struct Api {
    library: String,
    error_string: Option<ErrorStringFn>,
    shutdown: InitFn,
    driver_version: Option<TextFn>,
    by_bus_id: ByBusIdFn,
    uuid: Option<DeviceTextFn>,
    persistence: Option<DeviceUintFn>,
    mig: Option<DeviceTwoUintFn>,
    compute: Option<DeviceUintFn>,
    link_state: Option<LinkStateFn>,
    p2p: Option<P2pStatusFn>,
    fabric_v1: Option<FabricV1Fn>,
    fabric_v2: Option<FabricV2Fn>,
    nvlink_version: Option<LinkStateFn>,
    link_remote: Option<RemotePciFn>,
    pcie_generation: Option<DeviceUintFn>,
    pcie_width: Option<DeviceUintFn>,
}

/// The address of `name` in the library `handle`, as the function-pointer type `F`.
///
/// # Safety
///
/// `F` must be the `unsafe extern "C" fn` type that `nvml.h` declares for `name`.
unsafe fn symbol<F: Copy>(handle: usize, name: &CStr) -> Option<F> {
    const { assert!(std::mem::size_of::<usize>() == std::mem::size_of::<InitFn>()) };
    if std::mem::size_of::<F>() != std::mem::size_of::<usize>() {
        return None;
    }
    // SAFETY: handle is a live dlopen handle and name is NUL-terminated.
    let addr = unsafe { libc::dlsym(handle as *mut c_void, name.as_ptr()) } as usize;
    // SAFETY: addr is a non-null function address, and the caller vouches that F is its type.
    (addr != 0).then(|| unsafe { std::mem::transmute_copy::<usize, F>(&addr) })
}

impl Api {
    /// Loads `library` and resolves every function; `Err` if it cannot be loaded or lacks one
    /// of those needed to start.
    fn load(library: &str) -> Result<(Api, InitFn), String> {
        let handle = dlopen(library, libc::RTLD_NOW | libc::RTLD_LOCAL).map_err(|e| match e {
            e if e.starts_with(library) => e,
            e => format!("{library}: {e}"),
        })?;
        let missing = |name: &str| format!("{library} has no symbol {name}: {}", dlerror_text());
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: each field's type is the prototype nvml.h declares for $name.
                unsafe { symbol(handle, $name) }
            };
        }
        let init: InitFn = sym!(c"nvmlInit_v2").ok_or_else(|| missing("nvmlInit_v2"))?;
        let api = Api {
            library: library.to_string(),
            error_string: sym!(c"nvmlErrorString"),
            shutdown: sym!(c"nvmlShutdown").ok_or_else(|| missing("nvmlShutdown"))?,
            driver_version: sym!(c"nvmlSystemGetDriverVersion"),
            by_bus_id: sym!(c"nvmlDeviceGetHandleByPciBusId_v2")
                .ok_or_else(|| missing("nvmlDeviceGetHandleByPciBusId_v2"))?,
            uuid: sym!(c"nvmlDeviceGetUUID"),
            persistence: sym!(c"nvmlDeviceGetPersistenceMode"),
            mig: sym!(c"nvmlDeviceGetMigMode"),
            compute: sym!(c"nvmlDeviceGetComputeMode"),
            link_state: sym!(c"nvmlDeviceGetNvLinkState"),
            p2p: sym!(c"nvmlDeviceGetP2PStatus"),
            fabric_v1: sym!(c"nvmlDeviceGetGpuFabricInfo"),
            fabric_v2: sym!(c"nvmlDeviceGetGpuFabricInfoV"),
            nvlink_version: sym!(c"nvmlDeviceGetNvLinkVersion"),
            link_remote: sym!(c"nvmlDeviceGetNvLinkRemotePciInfo_v2"),
            pcie_generation: sym!(c"nvmlDeviceGetMaxPcieLinkGeneration"),
            pcie_width: sym!(c"nvmlDeviceGetCurrPcieLinkWidth"),
        };
        Ok((api, init))
    }

    /// NVML's name for a return code: `"Not Supported (code 3)"`.
    fn describe(&self, code: c_int) -> String {
        let text = self.error_string.and_then(|f| {
            // SAFETY: nvmlErrorString takes any code and returns NULL or a static C string.
            let p = unsafe { f(code) };
            // SAFETY: p is NULL or points to NVML's NUL-terminated static text.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        });
        format!("{} (code {code})", text.as_deref().unwrap_or("NVML error"))
    }

    /// A text out-parameter call (`f(buffer, length)`), read as UTF-8 up to its NUL.
    fn text(&self, call: impl Fn(*mut c_char, c_uint) -> c_int) -> Result<String, String> {
        let mut buf = [0 as c_char; 128];
        let code = call(buf.as_mut_ptr(), buf.len() as c_uint - 1);
        if code != SUCCESS {
            return Err(self.describe(code));
        }
        // The last byte was never handed to NVML: the text is NUL-terminated within the buffer.
        // SAFETY: buf holds a NUL at its last position at least.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    fn device(&self, bus_id: &str) -> Result<Device, String> {
        let c = CString::new(bus_id).map_err(|_| format!("bus id {bus_id:?} holds a NUL byte"))?;
        let mut dev: Device = std::ptr::null_mut();
        // SAFETY: c is a C string and dev a live out-parameter of the handle type.
        let code = unsafe { (self.by_bus_id)(c.as_ptr(), &mut dev) };
        match code {
            SUCCESS if !dev.is_null() => Ok(dev),
            SUCCESS => Err("NVML gave a null handle".into()),
            _ => Err(format!(
                "nvmlDeviceGetHandleByPciBusId_v2({bus_id}): {}",
                self.describe(code)
            )),
        }
    }

    fn gpu(&self, dev: Device) -> Gpu {
        let mut gpu = Gpu::default();
        let mut note = |what: &str, why: String| gpu.unavailable.push(format!("{what}: {why}"));
        let absent = || "not in this NVML (older driver)".to_string();
        let uuid = match self.uuid {
            // SAFETY: dev is NVML's handle; f writes at most n bytes into the buffer.
            Some(f) => self.text(|b, n| unsafe { f(dev, b, n) }),
            None => Err(absent()),
        };
        let uint = |f: Option<DeviceUintFn>| -> Result<u32, String> {
            let f = f.ok_or_else(absent)?;
            let mut v: c_uint = 0;
            // SAFETY: dev is NVML's handle; v is a live out-parameter of the enum's size.
            match unsafe { f(dev, &mut v) } {
                SUCCESS => Ok(v),
                code => Err(self.describe(code)),
            }
        };
        let persistence = uint(self.persistence);
        let compute = uint(self.compute);
        gpu.pcie = uint(self.pcie_generation)
            .and_then(|g| Ok((g, uint(self.pcie_width)?)))
            .ok();
        let mig = self.mig.ok_or_else(absent).and_then(|f| {
            let (mut current, mut pending): (c_uint, c_uint) = (0, 0);
            // SAFETY: dev is NVML's handle; both out-parameters are live.
            match unsafe { f(dev, &mut current, &mut pending) } {
                SUCCESS => Ok(Some((current == 1, pending == 1))),
                NOT_SUPPORTED => Ok(None),
                code => Err(self.describe(code)),
            }
        });
        match uuid {
            Ok(u) => gpu.uuid = Some(u),
            Err(e) => note("uuid", e),
        }
        match persistence {
            Ok(p) => gpu.persistence = Some(p == 1),
            Err(e) => note("persistence mode", e),
        }
        match compute {
            Ok(c) => gpu.compute_mode = Some(c),
            Err(e) => note("compute mode", e),
        }
        match mig {
            Ok(m) => gpu.mig = m,
            Err(e) => note("MIG mode", e),
        }
        match self.links(dev) {
            Ok(links) => gpu.links = links,
            Err(e) => note("NVLink", e),
        }
        let active: Vec<c_uint> = (0..)
            .zip(&gpu.links)
            .filter(|(_, &up)| up)
            .map(|(i, _)| i)
            .collect();
        gpu.nvlink_version = active.first().and_then(|&l| self.link_version(dev, l));
        gpu.link_remotes = active.iter().map(|&l| self.link_remote(dev, l)).collect();
        match self.fabric(dev) {
            Ok(f) => gpu.fabric = f,
            Err(e) => note("fabric", e),
        }
        gpu
    }

    /// Each link's state, asked until NVML says the link does not exist.
    fn links(&self, dev: Device) -> Result<Vec<bool>, String> {
        let f = self
            .link_state
            .ok_or("not in this NVML (older driver)".to_string())?;
        let mut links = Vec::new();
        for link in 0..MAX_LINKS {
            let mut active: c_uint = 0;
            // SAFETY: dev is NVML's handle; active is a live out-parameter.
            match unsafe { f(dev, link, &mut active) } {
                SUCCESS => links.push(active == 1),
                // Past the GPU's last link, or no NVLink at all.
                INVALID_ARGUMENT | NOT_SUPPORTED => break,
                code => return Err(format!("link {link}: {}", self.describe(code))),
            }
        }
        Ok(links)
    }

    /// NVML's version enum of one link.
    fn link_version(&self, dev: Device, link: c_uint) -> Option<u32> {
        let f = self.nvlink_version?;
        let mut v: c_uint = 0;
        // SAFETY: dev is NVML's handle; v is a live out-parameter.
        (unsafe { f(dev, link, &mut v) } == SUCCESS).then_some(v)
    }

    /// The (domain, bus, device) at the far end of one link.
    fn link_remote(&self, dev: Device, link: c_uint) -> Option<(u32, u32, u32)> {
        let f = self.link_remote?;
        let mut info = PciInfo {
            bus_id_legacy: [0; 16],
            domain: 0,
            bus: 0,
            device: 0,
            pci_device_id: 0,
            pci_sub_system_id: 0,
            bus_id: [0; 32],
        };
        // SAFETY: dev is NVML's handle; info is the struct nvml.h declares for this call.
        (unsafe { f(dev, link, &mut info) } == SUCCESS).then_some((
            info.domain,
            info.bus,
            info.device,
        ))
    }

    /// The fabric state and status: the versioned call first, the first form where a driver
    /// has only that; neither (before R535), `NOT_SUPPORTED` or the state "not supported" (no
    /// NVSwitch fabric): `None`.
    fn fabric(&self, dev: Device) -> Result<Option<(u8, i32)>, String> {
        Ok(self
            .fabric_info(dev)?
            .filter(|&(state, _)| state != FABRIC_NOT_SUPPORTED))
    }

    fn fabric_info(&self, dev: Device) -> Result<Option<(u8, i32)>, String> {
        if let Some(f) = self.fabric_v2 {
            let mut info = FabricInfoV2 {
                version: FABRIC_INFO_V2,
                ..FabricInfoV2::default()
            };
            // SAFETY: dev is NVML's handle; info is the v2 struct with its version set.
            match unsafe { f(dev, &mut info) } {
                SUCCESS => return Ok(Some((info.state, info.status))),
                NOT_SUPPORTED => return Ok(None),
                // A driver that knows the call but not this version: try the first form.
                _ if self.fabric_v1.is_some() => {}
                code => return Err(self.describe(code)),
            }
        }
        let Some(f) = self.fabric_v1 else {
            return Ok(None);
        };
        let mut info = FabricInfoV1::default();
        // SAFETY: dev is NVML's handle; info is the struct nvml.h declares for this call.
        match unsafe { f(dev, &mut info) } {
            SUCCESS => Ok(Some((info.state, info.status))),
            NOT_SUPPORTED => Ok(None),
            code => Err(self.describe(code)),
        }
    }

    fn p2p(&self, a: Device, b: Device) -> Option<P2pStatus> {
        let f = self.p2p?;
        let ask = |index| {
            let mut status: c_uint = 6;
            // SAFETY: a and b are NVML's handles; status is a live out-parameter.
            match unsafe { f(a, b, index, &mut status) } {
                SUCCESS => Some(status),
                _ => None,
            }
        };
        Some(P2pStatus {
            read: ask(CAPS_READ)?,
            write: ask(CAPS_WRITE)?,
            atomics: ask(CAPS_ATOMICS)?,
            nvlink: ask(CAPS_NVLINK)?,
        })
    }
}

/// Loads NVML, asks everything, shuts it down.
fn ask(library: &str, bus_ids: &[String]) -> Result<Answers, String> {
    let (api, init) = Api::load(library)?;
    // SAFETY: nvmlInit_v2 takes no argument.
    let code = unsafe { init() };
    if code != SUCCESS {
        return Err(format!(
            "nvmlInit_v2 failed: {} ({library})",
            api.describe(code)
        ));
    }
    let driver_version = api.driver_version.and_then(|f| {
        // SAFETY: f writes at most n bytes into the buffer it is given.
        api.text(|b, n| unsafe { f(b, n) }).ok()
    });
    let devices: Vec<Result<Device, String>> = bus_ids.iter().map(|b| api.device(b)).collect();
    let gpus = devices
        .iter()
        .map(|d| d.as_ref().map(|&d| api.gpu(d)).map_err(Clone::clone))
        .collect();
    let mut pairs = Vec::new();
    for (i, a) in devices.iter().enumerate() {
        for (j, b) in devices.iter().enumerate().skip(i + 1) {
            if let (Ok(a), Ok(b)) = (a, b) {
                if let Some(status) = api.p2p(*a, *b) {
                    pairs.push(((i, j), status));
                }
            }
        }
    }
    // SAFETY: NVML was initialised above; shutting down takes no argument.
    unsafe { (api.shutdown)() };
    Ok(Answers {
        library: api.library,
        driver_version,
        gpus,
        pairs,
    })
}

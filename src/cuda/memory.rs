//! Device memory as owners that know their length, and borrowed views of them whose every
//! offset is checked: the only way above this module to name device memory.
//!
//! An owner ([`DeviceBuffer`], [`PeerMapping`]) holds an allocation or an IPC mapping and its
//! length, and ends it by `Drop` (or, for vLLM's exact calls, leaves it to the device reset that
//! ends the pair). A [`DeviceView`] borrows a range of one, so it cannot outlive it; a narrower
//! view comes only from [`DeviceView::slice`], which refuses a range outside the view with an
//! [`Error::OutOfBounds`] naming the memory, the range asked and the range there is. The
//! operations on views (`memset`, `copy_to_host`, the kernels) therefore reach only memory the
//! view covers; the raw-address calls under them are `unsafe fn`s of this module's parent.
//!
//! `release()` frees explicitly and returns CUDA's answer; `Drop` is the fallback for early
//! returns, where the code is still checked (and traced) but there is no caller to tell.
//!
//! The cuMem transport's owners ([`CumemBuffer`], [`CumemMapping`]) hold an allocation handle,
//! a reservation of address space and the mapping in it; each undoes what it holds, in reverse
//! order (unmap, release, free the reservation), including what a failed set-up had done.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::{BorrowedFd, OwnedFd};

use super::{DevicePtr, Error, Result, IPC_HANDLE_BYTES};

/// What ends an owner's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ends {
    /// `release()` or `Drop` frees or unmaps it.
    Drop,
    /// The `cudaDeviceReset` that ends the pair does (vLLM's calls exactly: no free, no
    /// unmap); the owner must be gone before that reset, which its scope ensures.
    Reset,
}

/// Which memory a view is of, for errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Buffer,
    Mapping,
    CumemBuffer,
    CumemMapping,
}

/// The memory a view belongs to: its kind, its device and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Memory {
    kind: Kind,
    device: i32,
    bytes: u64,
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Buffer => write!(f, "device {}'s buffer", self.device),
            Kind::Mapping => write!(f, "device {}'s mapping of a peer's buffer", self.device),
            Kind::CumemBuffer => write!(f, "device {}'s cuMem allocation", self.device),
            Kind::CumemMapping => {
                write!(
                    f,
                    "device {}'s cuMem mapping of a peer's allocation",
                    self.device
                )
            }
        }?;
        write!(f, " of {} bytes", self.bytes)
    }
}

/// Memory from `cudaMalloc` on the current device, of a known length.
#[derive(Debug)]
pub(crate) struct DeviceBuffer {
    memory: Memory,
    ptr: DevicePtr,
    ends: Ends,
}

impl DeviceBuffer {
    /// `cudaMalloc(bytes)` on the current device (`device` names it in errors), freed with
    /// `cudaFree` by [`release`](Self::release) or `Drop`.
    pub(crate) fn new(device: i32, bytes: usize) -> Result<DeviceBuffer> {
        Self::malloc(device, bytes, Ends::Drop)
    }

    /// `cudaMalloc(bytes)`, never freed here: the device reset that ends the pair frees it
    /// (vLLM's calls exactly). Drop it before that reset.
    pub(crate) fn until_reset(device: i32, bytes: usize) -> Result<DeviceBuffer> {
        Self::malloc(device, bytes, Ends::Reset)
    }

    fn malloc(device: i32, bytes: usize, ends: Ends) -> Result<DeviceBuffer> {
        Ok(DeviceBuffer {
            memory: Memory {
                kind: Kind::Buffer,
                device,
                bytes: bytes as u64,
            },
            ptr: super::malloc(device, bytes)?,
            ends,
        })
    }

    /// All of it.
    pub(crate) fn view(&self) -> DeviceView<'_> {
        DeviceView::whole(self.memory, self.ptr)
    }

    /// Its IPC handle (`cudaIpcGetMemHandle`).
    pub(crate) fn ipc_handle(&self) -> Result<[u8; IPC_HANDLE_BYTES]> {
        // SAFETY: ptr is the base of this live allocation (it is freed only by release/Drop,
        // which take it).
        unsafe { super::ipc_get_mem_handle(self.memory.device, self.ptr) }
    }

    /// Frees it now (nothing for one the reset frees), returning CUDA's answer.
    pub(crate) fn release(self) -> Result<()> {
        let (device, ptr, ends) = (self.memory.device, self.ptr, self.ends);
        std::mem::forget(self);
        match ends {
            // SAFETY: ptr came from cudaMalloc and is freed once: `self` is forgotten, so Drop
            // does not free it again, and no view outlives it (views borrow the owner).
            Ends::Drop => unsafe { super::free(device, ptr) },
            Ends::Reset => Ok(()),
        }
    }

    /// A buffer at a made-up address that no call ever touches (`Drop` makes none): for tests
    /// of the bounds alone.
    #[cfg(test)]
    pub(crate) fn unbacked(device: i32, bytes: u64) -> DeviceBuffer {
        DeviceBuffer {
            memory: Memory {
                kind: Kind::Buffer,
                device,
                bytes,
            },
            ptr: DevicePtr(1 << 40),
            ends: Ends::Reset,
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ends == Ends::Drop {
            // SAFETY: as in release: the allocation is live and freed this once.
            let _ = unsafe { super::free(self.memory.device, self.ptr) };
        }
    }
}

/// A peer's memory mapped with `cudaIpcOpenMemHandle`, of the length its exporter allocated.
#[derive(Debug)]
pub(crate) struct PeerMapping {
    memory: Memory,
    ptr: DevicePtr,
    handle: [u8; IPC_HANDLE_BYTES],
    ends: Ends,
}

impl PeerMapping {
    /// Maps `handle` on the current device (lazy peer access, as vLLM does), unmapped with
    /// `cudaIpcCloseMemHandle` by [`release`](Self::release) or `Drop`.
    ///
    /// `bytes` is the length of the allocation `handle` exports, as its exporter says: CUDA
    /// maps the whole allocation but does not say how long it is. Like the handle itself, it
    /// is the exporter's word (the protocol's), and every view of the mapping trusts it.
    pub(crate) fn open(
        device: i32,
        handle: &[u8; IPC_HANDLE_BYTES],
        bytes: u64,
    ) -> Result<PeerMapping> {
        Self::map(device, handle, bytes, Ends::Drop)
    }

    /// Maps `handle` like [`open`](Self::open) (`bytes` as there), never unmapped here: the
    /// device reset that ends the pair does (vLLM's calls exactly). Drop it before that reset.
    pub(crate) fn until_reset(
        device: i32,
        handle: &[u8; IPC_HANDLE_BYTES],
        bytes: u64,
    ) -> Result<PeerMapping> {
        Self::map(device, handle, bytes, Ends::Reset)
    }

    fn map(
        device: i32,
        handle: &[u8; IPC_HANDLE_BYTES],
        bytes: u64,
        ends: Ends,
    ) -> Result<PeerMapping> {
        Ok(PeerMapping {
            memory: Memory {
                kind: Kind::Mapping,
                device,
                bytes,
            },
            ptr: super::ipc_open_mem_handle(device, handle)?,
            handle: *handle,
            ends,
        })
    }

    /// Whether this is the mapping of `handle` (a replaced producer exports a new one).
    pub(crate) fn is_of(&self, handle: &[u8; IPC_HANDLE_BYTES]) -> bool {
        &self.handle == handle
    }

    /// All of it.
    pub(crate) fn view(&self) -> DeviceView<'_> {
        DeviceView::whole(self.memory, self.ptr)
    }

    /// Unmaps it now (nothing for one the reset unmaps), returning CUDA's answer.
    pub(crate) fn release(self) -> Result<()> {
        let (device, ptr, ends) = (self.memory.device, self.ptr, self.ends);
        std::mem::forget(self);
        match ends {
            // SAFETY: ptr came from cudaIpcOpenMemHandle and is unmapped once: `self` is
            // forgotten, so Drop does not unmap it again, and no view outlives it.
            Ends::Drop => unsafe { super::ipc_close_mem_handle(device, ptr) },
            Ends::Reset => Ok(()),
        }
    }

    /// A mapping at a made-up address that no call ever touches (`Drop` makes none): for
    /// tests of the bounds alone.
    #[cfg(test)]
    pub(crate) fn unbacked(device: i32, handle: &[u8; IPC_HANDLE_BYTES], bytes: u64) -> Self {
        PeerMapping {
            memory: Memory {
                kind: Kind::Mapping,
                device,
                bytes,
            },
            ptr: DevicePtr(1 << 41),
            handle: *handle,
            ends: Ends::Reset,
        }
    }
}

impl Drop for PeerMapping {
    fn drop(&mut self) {
        if self.ends == Ends::Drop {
            // SAFETY: as in release: the mapping is live and unmapped this once.
            let _ = unsafe { super::ipc_close_mem_handle(self.memory.device, self.ptr) };
        }
    }
}

/// A cuMem allocation mapped into this process, as far as its set-up got: the handle, the
/// reservation and the mapping (with access granted to the device), each undone by
/// [`Vmm::undo`] (or `Drop`) in reverse order.
#[derive(Debug)]
struct Vmm {
    device: i32,
    bytes: usize,
    handle: Option<u64>,
    reserved: Option<DevicePtr>,
    mapped: bool,
}

impl Vmm {
    /// Maps the allocation `handle` of `bytes` bytes (owned from here on, released on any
    /// failure): a reservation, the mapping, read-write access for `device`.
    fn map(device: i32, handle: u64, bytes: usize) -> Result<Vmm> {
        let mut v = Vmm {
            device,
            bytes,
            handle: Some(handle),
            reserved: None,
            mapped: false,
        };
        let p = super::mem_address_reserve(device, bytes)?;
        v.reserved = Some(p);
        // SAFETY: p starts a fresh reservation of `bytes` bytes with nothing mapped, and the
        // handle is live (owned by v) and of `bytes` bytes, as its maker said.
        unsafe { super::mem_map(device, p, bytes, handle) }?;
        v.mapped = true;
        // SAFETY: p and bytes are exactly the mapping just made, live while v holds it.
        unsafe { super::mem_set_access(device, p, bytes) }?;
        Ok(v)
    }

    /// The mapping's address (valid while `self` holds it).
    fn ptr(&self) -> DevicePtr {
        self.reserved.unwrap_or(DevicePtr(0))
    }

    /// Unmaps, releases the handle and frees the reservation, whichever it holds; every step is
    /// tried, the first failure returned.
    fn undo(&mut self) -> Result<()> {
        let mut first = Ok(());
        let mut keep = |r: Result<()>| {
            if first.is_ok() {
                first = r;
            }
        };
        if let (true, Some(p)) = (self.mapped, self.reserved) {
            self.mapped = false;
            // SAFETY: p and bytes are the mapping made in `map`, unmapped this once; no view
            // outlives the owner holding self.
            keep(unsafe { super::mem_unmap(self.device, p, self.bytes) });
        }
        if let Some(h) = self.handle.take() {
            // SAFETY: the handle is live and released this once (taken out of self).
            keep(unsafe { super::mem_release(self.device, h) });
        }
        if let Some(p) = self.reserved.take() {
            // SAFETY: p is the reservation made in `map`, nothing mapped in it any more (the
            // unmap above ran first), freed this once.
            keep(unsafe { super::mem_address_free(self.device, p, self.bytes) });
        }
        first
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.undo();
    }
}

/// Memory from `cuMemCreate` on the current device, exportable as a POSIX descriptor, mapped
/// into this process and accessible from its device: the cuMem transport's producer buffer.
#[derive(Debug)]
pub(crate) struct CumemBuffer {
    memory: Memory,
    vmm: Vmm,
}

impl CumemBuffer {
    /// At least `bytes` bytes (rounded up to the allocation granularity) on local ordinal
    /// `device`, unmapped and released by [`release`](Self::release) or `Drop`.
    pub(crate) fn new(device: i32, bytes: usize) -> Result<CumemBuffer> {
        let granularity = super::mem_granularity(device)?.max(1);
        let size = bytes.div_ceil(granularity) * granularity;
        let handle = super::mem_create(device, size)?;
        Ok(CumemBuffer {
            memory: Memory {
                kind: Kind::CumemBuffer,
                device,
                bytes: size as u64,
            },
            vmm: Vmm::map(device, handle, size)?,
        })
    }

    /// Its length in bytes (the size asked for, rounded up to the granularity).
    pub(crate) fn len(&self) -> u64 {
        self.memory.bytes
    }

    /// All of it.
    pub(crate) fn view(&self) -> DeviceView<'_> {
        DeviceView::whole(self.memory, self.vmm.ptr())
    }

    /// A new POSIX descriptor of the allocation (`cuMemExportToShareableHandle`), for another
    /// process to import.
    pub(crate) fn export(&self) -> Result<OwnedFd> {
        let handle = self.vmm.handle.ok_or(Error::Cuda {
            call: "cuMemExportToShareableHandle",
            device: Some(self.memory.device),
            code: crate::sys::CUDA_ERROR_INVALID_HANDLE as i32,
            name: "CUDA_ERROR_INVALID_HANDLE".into(),
            text: "the allocation's handle was released".into(),
        })?;
        super::mem_export_fd(self.memory.device, handle)
    }

    /// Unmaps and releases it now, returning CUDA's answer.
    pub(crate) fn release(mut self) -> Result<()> {
        self.vmm.undo()
    }
}

/// A peer's cuMem allocation, imported from its descriptor, mapped and accessible from this
/// process's device: the cuMem transport's consumer side.
#[derive(Debug)]
pub(crate) struct CumemMapping {
    memory: Memory,
    vmm: Vmm,
}

impl CumemMapping {
    /// Imports the allocation `fd` names (`bytes` long, as its exporter says: the driver maps
    /// the whole allocation and the mapping must be its size), maps it and grants local
    /// ordinal `device` access; undone by [`release`](Self::release) or `Drop`. `fd` stays the
    /// caller's.
    pub(crate) fn import(device: i32, fd: BorrowedFd<'_>, bytes: u64) -> Result<CumemMapping> {
        let size = usize::try_from(bytes).map_err(|_| Error::OutOfBounds {
            memory: format!("a peer's cuMem allocation of {bytes} bytes"),
            offset: 0,
            len: bytes,
            bounds: 0..usize::MAX as u64,
        })?;
        let handle = super::mem_import_fd(device, fd)?;
        Ok(CumemMapping {
            memory: Memory {
                kind: Kind::CumemMapping,
                device,
                bytes,
            },
            vmm: Vmm::map(device, handle, size)?,
        })
    }

    /// All of it.
    pub(crate) fn view(&self) -> DeviceView<'_> {
        DeviceView::whole(self.memory, self.vmm.ptr())
    }

    /// Unmaps and releases it now, returning CUDA's answer.
    pub(crate) fn release(mut self) -> Result<()> {
        self.vmm.undo()
    }
}

/// A range of an owner's memory, borrowed from it: what every operation on device memory
/// takes. It covers only bytes the owner holds, so the operations cannot go out of bounds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceView<'a> {
    memory: Memory,
    /// The owner's base address.
    base: DevicePtr,
    /// The range of the owner this view covers.
    range: Range64,
    owner: PhantomData<&'a ()>,
}

/// A `Range<u64>` that is `Copy`.
#[derive(Clone, Copy, Debug)]
struct Range64 {
    start: u64,
    end: u64,
}

impl<'a> DeviceView<'a> {
    fn whole(memory: Memory, base: DevicePtr) -> DeviceView<'a> {
        DeviceView {
            memory,
            base,
            range: Range64 {
                start: 0,
                end: memory.bytes,
            },
            owner: PhantomData,
        }
    }

    /// Bytes `range` of this view (offsets from its start), or [`Error::OutOfBounds`] when any
    /// of them lies outside it (an empty or reversed range is refused too).
    pub(crate) fn slice(&self, range: Range<u64>) -> Result<DeviceView<'a>> {
        let start = self.range.start.checked_add(range.start);
        let end = self.range.start.checked_add(range.end);
        match (start, end) {
            (Some(start), Some(end)) if start < end && end <= self.range.end => Ok(DeviceView {
                range: Range64 { start, end },
                ..*self
            }),
            _ => Err(Error::OutOfBounds {
                memory: self.memory.to_string(),
                offset: self.range.start.saturating_add(range.start),
                len: range.end.saturating_sub(range.start),
                bounds: self.range.start..self.range.end,
            }),
        }
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// The device whose current context made the owner (named in errors).
    pub(crate) fn device(&self) -> i32 {
        self.memory.device
    }

    /// The address of its first byte: inside the owner's live memory, with [`len`](Self::len)
    /// bytes after it, for as long as the view lives.
    pub(super) fn ptr(&self) -> DevicePtr {
        DevicePtr(self.base.0 + self.range.start)
    }

    /// `cudaMemset` of all of it to `value`.
    pub(crate) fn memset(&self, value: u8) -> Result<()> {
        // SAFETY: ptr() addresses len() bytes of memory the borrowed owner keeps live.
        unsafe { super::memset(self.device(), self.ptr(), value, self.len() as usize) }
    }

    /// All of it copied to the host (`cudaMemcpy`, kind default, as vLLM does).
    pub(crate) fn copy_to_host(&self) -> Result<Vec<u8>> {
        // SAFETY: ptr() addresses len() bytes of device memory the borrowed owner keeps live,
        // so the default kind finds it as device memory, never as a host address.
        unsafe { super::copy_to_host(self.device(), self.ptr(), self.len() as usize) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_cover_only_their_owner_and_name_it_when_refused() {
        let b = DeviceBuffer::unbacked(3, 4096);
        let whole = b.view();
        assert_eq!((whole.len(), whole.device()), (4096, 3));
        let part = whole.slice(1024..3072).unwrap();
        assert_eq!(part.ptr().0, (1 << 40) + 1024);
        let inner = part.slice(1000..2048).unwrap();
        assert_eq!((inner.ptr().0, inner.len()), ((1 << 40) + 2024, 1048));
        // Past the end of the view (though inside the owner), empty, reversed, overflowing.
        let e = part.slice(1024..2049).unwrap_err();
        assert_eq!(
            e,
            Error::OutOfBounds {
                memory: "device 3's buffer of 4096 bytes".into(),
                offset: 2048,
                len: 1025,
                bounds: 1024..3072,
            }
        );
        assert_eq!(
            e.to_string(),
            "bytes 2048..3073 of device 3's buffer of 4096 bytes lie outside the view's \
             1024..3072"
        );
        #[allow(clippy::reversed_empty_ranges)] // refused, which is what this tests
        let refused = [0..0, 10..5, u64::MAX - 1..u64::MAX, 4096..4097];
        for r in refused {
            assert!(whole.slice(r.clone()).is_err(), "{r:?}");
        }
        let m = PeerMapping::unbacked(1, &[7; IPC_HANDLE_BYTES], 100);
        assert!(m.is_of(&[7; IPC_HANDLE_BYTES]) && !m.is_of(&[8; IPC_HANDLE_BYTES]));
        let e = m.view().slice(50..150).unwrap_err().to_string();
        assert!(
            e.contains("device 1's mapping of a peer's buffer of 100 bytes"),
            "{e}"
        );
    }
}

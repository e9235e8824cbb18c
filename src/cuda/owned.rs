//! CUDA resources a worker owns, freed by `Drop`: so the parallel engine, which never resets a
//! device, leaves nothing allocated or mapped behind a pair, whichever way the pair ended.
//!
//! `release()` frees explicitly and returns CUDA's answer; `Drop` is the fallback for early
//! returns, where the code is still checked (and traced) but there is no caller to tell.

use super::{DevicePtr, Result, IPC_HANDLE_BYTES};

/// Memory from `cudaMalloc` on the current device, freed with `cudaFree`.
#[derive(Debug)]
pub(crate) struct DeviceBuffer {
    device: i32,
    ptr: Option<DevicePtr>,
    bytes: usize,
}

impl DeviceBuffer {
    /// `cudaMalloc(bytes)` on the current device (`device` names it in errors).
    pub(crate) fn new(device: i32, bytes: usize) -> Result<DeviceBuffer> {
        Ok(DeviceBuffer {
            device,
            ptr: Some(super::malloc(device, bytes)?),
            bytes,
        })
    }

    /// The address of byte `offset` (`offset` < the size, checked by the caller's slot maths).
    pub(crate) fn at(&self, offset: u64) -> DevicePtr {
        debug_assert!(offset < self.bytes as u64);
        self.ptr.expect("live until dropped").offset(offset)
    }

    /// Its IPC handle (`cudaIpcGetMemHandle`).
    pub(crate) fn ipc_handle(&self) -> Result<[u8; IPC_HANDLE_BYTES]> {
        super::ipc_get_mem_handle(self.device, self.at(0))
    }

    /// Frees it now, returning CUDA's answer.
    pub(crate) fn release(mut self) -> Result<()> {
        match self.ptr.take() {
            Some(p) => super::free(self.device, p),
            None => Ok(()),
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(p) = self.ptr.take() {
            let _ = super::free(self.device, p);
        }
    }
}

/// A peer's memory mapped with `cudaIpcOpenMemHandle`, unmapped with `cudaIpcCloseMemHandle`.
#[derive(Debug)]
pub(crate) struct PeerMapping {
    device: i32,
    ptr: Option<DevicePtr>,
    handle: [u8; IPC_HANDLE_BYTES],
}

impl PeerMapping {
    /// Maps `handle` on the current device (lazy peer access, as vLLM does).
    pub(crate) fn open(device: i32, handle: &[u8; IPC_HANDLE_BYTES]) -> Result<PeerMapping> {
        Ok(PeerMapping {
            device,
            ptr: Some(super::ipc_open_mem_handle(device, handle)?),
            handle: *handle,
        })
    }

    /// Whether this is the mapping of `handle` (a replaced producer exports a new one).
    pub(crate) fn is_of(&self, handle: &[u8; IPC_HANDLE_BYTES]) -> bool {
        &self.handle == handle
    }

    /// The address of byte `offset` of the peer's buffer.
    pub(crate) fn at(&self, offset: u64) -> DevicePtr {
        self.ptr.expect("live until dropped").offset(offset)
    }

    /// Unmaps it now, returning CUDA's answer.
    pub(crate) fn release(mut self) -> Result<()> {
        match self.ptr.take() {
            Some(p) => super::ipc_close_mem_handle(self.device, p),
            None => Ok(()),
        }
    }
}

impl Drop for PeerMapping {
    fn drop(&mut self) {
        if let Some(p) = self.ptr.take() {
            let _ = super::ipc_close_mem_handle(self.device, p);
        }
    }
}

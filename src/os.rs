//! The operating-system edge: the few libc calls p2pcheck makes outside CUDA, as safe
//! functions. With [`crate::driver`] (the CUDA edge) this is the only place with `unsafe`.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Instant;

/// The file (executable or shared library) whose code contains `addr`, from the loader.
pub fn object_containing(addr: usize) -> Option<PathBuf> {
    // SAFETY: dladdr only reads the loader's tables; info is a valid out-parameter, and
    // dli_fname, when set, is a NUL-terminated string owned by the loader, copied at once.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr as *const libc::c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(PathBuf::from(
            CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned(),
        ))
    }
}

/// SIGKILL to the process group `pgid` (a worker started as its own group leader).
pub fn kill_process_group(pgid: u32) {
    // SAFETY: kill(2) has no memory effects; a negative pid names the group.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

/// Writes all of `bytes` to `fd`; a reader that is gone gives `EPIPE` instead of SIGPIPE
/// killing the process (a host program may not ignore SIGPIPE the way Rust's runtime does).
pub fn write_all_without_sigpipe(fd: &impl AsRawFd, bytes: &[u8]) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut pipe_set: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = pipe_set;
    // SAFETY: valid sigset_t pointers; only this thread's mask changes, restored below.
    unsafe {
        libc::sigemptyset(&mut pipe_set);
        libc::sigaddset(&mut pipe_set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe_set, &mut old);
    }
    let mut done = 0;
    let mut result = Ok(());
    while done < bytes.len() {
        // SAFETY: fd is open for the call; the pointer and length describe live memory.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if e.raw_os_error() == Some(libc::EPIPE) {
            // Consume the SIGPIPE raised while it was blocked, so it never fires later.
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid sigset_t and timespec; a null siginfo is allowed.
            unsafe { libc::sigtimedwait(&pipe_set, std::ptr::null_mut(), &zero) };
        }
        result = Err(e);
        break;
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

/// One `read(2)` from `fd` into `buf`: `Ok(0)` at end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is writable memory of the length passed; fd is the caller's open descriptor.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Waits until one of `fds` is readable (or hung up); returns its position, or `None` at the
/// deadline.
pub fn poll_readable(fds: &[RawFd], deadline: Instant) -> io::Result<Option<usize>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfds is a live array of pollfd of the length passed.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if let Some(i) = pfds.iter().position(|p| p.revents != 0) {
            return Ok(Some(i));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

/// Tries to take an exclusive `flock(2)` on `file` without waiting: `Ok(false)` when another
/// holder has it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: the descriptor is open for the whole call; flock touches no memory of ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// An anonymous in-memory file (`memfd_create`, close-on-exec).
pub fn memfd(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; the new descriptor is owned by the OwnedFd alone.
    unsafe {
        let raw = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC);
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(raw))
    }
}

/// Asks the kernel to SIGKILL this process when its parent dies (`PR_SET_PDEATHSIG`).
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves stdout to a new descriptor, returned, and points fd 1 at stderr: whatever else in the
/// process prints to stdout then lands on stderr, not in the returned stream.
pub fn take_stdout() -> io::Result<File> {
    // SAFETY: dup/dup2 on this process's own standard descriptors; the duplicate is owned by
    // the returned File alone.
    unsafe {
        let fd = libc::dup(1);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let out = File::from_raw_fd(fd);
        if libc::dup2(2, 1) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(out)
    }
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a two-element array, as pipe2(2) requires; both new descriptors are owned
    // by the Files alone.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])))
    }
}

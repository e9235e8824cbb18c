//! The operating-system edge: the few libc calls p2pcheck makes outside CUDA, as safe
//! functions. With [`crate::cuda`] (the CUDA edge) this is the only place with `unsafe`.
//!
//! Descriptors are taken as [`BorrowedFd`] or `&impl AsFd` (and handed out as [`OwnedFd`] or
//! `File`), never as bare numbers: a safe caller cannot name a descriptor it does not hold open.

#![allow(unsafe_code)]

pub mod fdpass;

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
///
/// # Errors
///
/// `InvalidInput`, sending nothing, for a `pgid` that names no single other group: 0 (`kill`
/// would signal the caller's own group), 1 (`kill(-1)` signals every process it may) or one
/// beyond `pid_t` (it would turn into a single process's pid). Otherwise what `kill(2)` says.
pub fn kill_process_group(pgid: u32) -> io::Result<()> {
    let group = match libc::pid_t::try_from(pgid) {
        Ok(g) if g > 1 => g,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{pgid} names no single process group other than our own"),
            ))
        }
    };
    // SAFETY: kill(2) has no memory effects; a negative pid (below -1) names one group.
    if unsafe { libc::kill(-group, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3+): readable once the process has exited, so
/// a poll loop sees a worker's death even when a descendant still holds its pipe open. `Err`
/// on older kernels; callers then rely on the pipe alone.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; the
    // descriptor is owned by the OwnedFd alone.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as RawFd;
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`): a
/// worker's grandchild that escaped its process group (`setsid`) becomes this process's child
/// when the worker dies, so it can be found and killed. For a program of its own (the CLI), not
/// for a library inside someone else's process.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER and 1 has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pids of this process's children, live or not yet reaped (`/proc/self/task/*/children`).
pub fn child_pids() -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|s| {
                    s.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILL to the process a pidfd refers to (`pidfd_send_signal(2)`): unlike `kill(pid)`, it
/// can never reach another process that reused the pid.
pub fn pidfd_kill(pidfd: &impl AsFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a descriptor, a signal, a null siginfo and flags 0; it
    // touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_fd().as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps the exited child a pidfd refers to (`waitid(P_PIDFD, WEXITED | WNOHANG)`, Linux
/// 5.4+), without waiting: `Ok(true)` when it was reaped, `Ok(false)` while it runs.
pub fn reap_pidfd(pidfd: &impl AsFd) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain data; waitid fills it (and zeroes si_pid when no child has
    // exited, with WNOHANG) before it is read.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: info is a valid, writable siginfo_t; the descriptor is open for the call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_fd().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc == 0 {
            // SAFETY: waitid succeeded, so info holds a SIGCHLD siginfo (or zeroes).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The descriptor a worker speaks the protocol on (its stdin is the other direction). Its fd 1
/// goes to its stderr, so that nothing a library inside it prints can corrupt the stream.
pub const PROTOCOL_FD: RawFd = 3;

/// Sets up a worker's process in the child, between fork and exec, so that nothing of it
/// reaches the process that starts it: the piped stdout moved to [`PROTOCOL_FD`] and fd 1
/// pointed at the child's stderr; `socket`, when given (the child's end of the cuMem
/// transport's descriptor socket, from [`fdpass::socket_pair`]: at 3 or above), at
/// [`fdpass::WORKER_SOCKET_FD`]; `PR_SET_PDEATHSIG` (SIGKILL when the thread that started it
/// ends, so a parent killed by Ctrl-C, SIGTERM or SIGKILL leaves no worker behind); and no exec
/// at all when the parent died before that was set (the spawn then fails). `socket` must stay
/// open until `cmd` is spawned.
pub fn worker_pre_exec(cmd: &mut std::process::Command, socket: Option<&OwnedFd>) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    let socket = socket.map(AsRawFd::as_raw_fd);
    // Descriptors 3 and 4 of the child are never std's exec-error pipe: that pipe is made after
    // the stdin, stdout and stderr pipes, which take the six lowest free descriptors first.
    // Whatever else they held is close-on-exec. The socket moves first, so that making
    // descriptor 3 cannot close it.
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe calls (dup2, fcntl, prctl, getppid) that allocate nothing and touch no
    // memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            let to = fdpass::WORKER_SOCKET_FD;
            let moved = match socket {
                None => 0,
                // dup2 onto itself would leave it close-on-exec.
                Some(s) if s == to => libc::fcntl(s, libc::F_SETFD, 0),
                Some(s) => libc::dup2(s, to),
            };
            if moved < 0 || libc::dup2(1, PROTOCOL_FD) < 0 || libc::dup2(2, 1) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// The worker's end of the protocol's output pipe ([`PROTOCOL_FD`], set up by
/// [`worker_pre_exec`]), made close-on-exec. `Err` when that descriptor is not a pipe (the
/// program was not started as a worker), and at every call after one that succeeded: that
/// call's `File` owns the descriptor.
pub fn protocol_output() -> io::Result<File> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    take_inherited(&TAKEN, PROTOCOL_FD, libc::S_IFIFO, "a pipe").map(File::from)
}

/// Takes descriptor `fd`, set up by the parent between fork and exec, once: it must be of file
/// type `kind` (`what` in words), and is made close-on-exec. Only one call takes it (`taken`
/// says whether one did): two owners closing one descriptor would close whatever reused its
/// number. A call that fails gives it back.
fn take_inherited(
    taken: &AtomicBool,
    fd: RawFd,
    kind: libc::mode_t,
    what: &str,
) -> io::Result<OwnedFd> {
    if taken.swap(true, Ordering::SeqCst) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("descriptor {fd} is owned already (taken by an earlier call)"),
        ));
    }
    let result = take_descriptor(fd, kind, what);
    if result.is_err() {
        taken.store(false, Ordering::SeqCst);
    }
    result
}

fn take_descriptor(fd: RawFd, kind: libc::mode_t, what: &str) -> io::Result<OwnedFd> {
    // SAFETY: stat is plain data, written by fstat before it is read; fstat on a descriptor
    // that is not open fails with EBADF and touches nothing else.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable stat.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != kind {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not {what}"),
        ));
    }
    // SAFETY: fcntl on an open descriptor; F_SETFD touches no memory of ours.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (fstat succeeded) and, taken by one call only, owned by
    // the OwnedFd alone from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is readable (or hung up) right now, without waiting.
pub fn readable_now(fd: BorrowedFd<'_>) -> bool {
    poll_readable(&[fd], Instant::now()).is_ok_and(|r| r.is_some())
}

/// Sets `O_NONBLOCK` on `fd` (the parent's end of a worker's stdin: writes must never block).
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: fcntl on the caller's open descriptor; F_GETFL/F_SETFL touch no memory of ours.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes all of `bytes` to the non-blocking `fd`, waiting for room at most until `deadline`
/// (then `TimedOut`: a reader that stopped reading cannot stall us). A reader that is gone gives
/// `EPIPE` instead of SIGPIPE killing the process (a host program may not ignore SIGPIPE the way
/// Rust's runtime does).
pub fn write_all_until(fd: &impl AsFd, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    let fd = fd.as_fd();
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
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                bytes[done..].as_ptr().cast(),
                bytes.len() - done,
            )
        };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => match poll_one(fd, libc::POLLOUT, deadline) {
                Ok(true) => continue,
                Ok(false) => {
                    result = Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the reader did not make room before the deadline",
                    ));
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            },
            _ => {
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
        }
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

/// Waits until `fd` has one of `events` (or an error or hang-up): `Ok(false)` at the deadline.
fn poll_one(fd: BorrowedFd<'_>, events: i16, deadline: Instant) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: p is one live pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if p.revents != 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// One `read(2)` from `fd` into `buf`: `Ok(0)` at end of file.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is writable memory of the length passed; fd is borrowed, so open for the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Waits until one of `fds` is readable (or hung up); returns its position, or `None` at the
/// deadline.
pub fn poll_readable(fds: &[BorrowedFd<'_>], deadline: Instant) -> io::Result<Option<usize>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfds is a live array of pollfd of the length passed; its descriptors are
        // borrowed, so open for the call.
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

/// A pipe: (read end, write end), both close-on-exec.
#[cfg(test)]
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

// ---- Files inside one folder, by descriptor, never through a symbolic link ----
//
// The cache module opens its folder once ([`open_dir`]) and then reaches every entry in it
// through that descriptor: a name is always a single path component, and the last (only)
// component is never followed when it is a symbolic link. So whatever the entries are, nothing
// outside the folder is opened, created, truncated, renamed or removed.

/// `name` as a C string, if it is one file name: not empty, not `.` or `..`, no `/` and no NUL.
/// A name with a `/` would walk through further directories (and follow links there).
fn entry_name(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single file name"),
        ));
    }
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} contains a NUL byte"),
        )
    })
}

/// Opens the folder `path` (`O_DIRECTORY | O_CLOEXEC`, read-only) as a handle for the `*_at`
/// functions below. The path itself may go through symbolic links; an entry that is not a
/// folder is `ENOTDIR`.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", path.display()),
        )
    })?;
    loop {
        // SAFETY: c_path is NUL-terminated and outlives the call; the new descriptor is owned by
        // the OwnedFd alone.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd was just returned by open(2) and nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, mode)`: opens the entry `name`
/// of the folder `dir` without following it when it is a symbolic link (that is `ELOOP`,
/// whatever `flags` say) and without making a terminal this process's controlling terminal.
/// `mode` matters only with `O_CREAT` (less the umask). `name` must be one file name.
pub fn open_at(
    dir: &impl AsFd,
    name: &OsStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    let c_name = entry_name(name)?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY;
    loop {
        // SAFETY: the folder descriptor is borrowed, so open for the call; c_name is
        // NUL-terminated; openat reads the mode argument only with O_CREAT, and it is passed as
        // the unsigned int the variadic call expects. The new descriptor is owned by the File
        // alone.
        let fd = unsafe {
            libc::openat(
                dir.as_fd().as_raw_fd(),
                c_name.as_ptr(),
                flags,
                libc::c_uint::from(mode),
            )
        };
        if fd >= 0 {
            // SAFETY: fd was just returned by openat(2) and nothing else owns it.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What `fstatat(2)` says of one folder entry, the entry itself (a symbolic link is described,
/// not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryStat {
    /// `st_mode`: the file type (`mode & libc::S_IFMT`) and permission bits.
    pub mode: u32,
    /// `st_nlink`: how many names the file has.
    pub nlink: u64,
    /// `st_size`, in bytes (for a symbolic link, the length of its target).
    pub size: u64,
    /// `st_uid`: the owner (of a symbolic link: the link's own).
    pub uid: u32,
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: the entry `name` of the folder `dir`, not
/// followed. `name` must be one file name.
pub fn stat_at(dir: &impl AsFd, name: &OsStr) -> io::Result<EntryStat> {
    let c_name = entry_name(name)?;
    // SAFETY: stat is plain data, written by fstatat before it is read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the folder descriptor is borrowed, so open for the call; c_name is NUL-terminated;
    // st is a valid, writable stat.
    let rc = unsafe {
        libc::fstatat(
            dir.as_fd().as_raw_fd(),
            c_name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(EntryStat {
        mode: st.st_mode,
        #[allow(clippy::useless_conversion)] // nlink_t is u32 on some targets
        nlink: u64::from(st.st_nlink),
        size: u64::try_from(st.st_size).unwrap_or(0),
        uid: st.st_uid,
    })
}

/// This process's effective user id (`geteuid(2)`), whose files the cache trusts.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no argument, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// `renameat(dir, from, dir, to)`: atomically points the entry `to` of the folder `dir` at the
/// file now named `from`, replacing whatever entry `to` was (a symbolic link is replaced, never
/// written through). Both must be single file names.
pub fn rename_at(dir: &impl AsFd, from: &OsStr, to: &OsStr) -> io::Result<()> {
    let (c_from, c_to) = (entry_name(from)?, entry_name(to)?);
    let fd = dir.as_fd().as_raw_fd();
    // SAFETY: the folder descriptor is borrowed, so open for the call; both names are
    // NUL-terminated and outlive it.
    if unsafe { libc::renameat(fd, c_from.as_ptr(), fd, c_to.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `unlinkat(dir, name, 0)`: removes the entry `name` (not a folder) of the folder `dir`; a
/// symbolic link is removed itself, its target untouched. `name` must be one file name.
pub fn unlink_at(dir: &impl AsFd, name: &OsStr) -> io::Result<()> {
    let c_name = entry_name(name)?;
    // SAFETY: the folder descriptor is borrowed, so open for the call; c_name is NUL-terminated.
    if unsafe { libc::unlinkat(dir.as_fd().as_raw_fd(), c_name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod write_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reader_that_never_reads_cannot_block_a_write_past_its_deadline() {
        let (_r, w) = pipe().unwrap();
        set_nonblocking(&w).unwrap();
        // More than any pipe buffer: the write must give up at the deadline.
        let big = vec![7u8; 4 << 20];
        let started = Instant::now();
        let e = write_all_until(&w, &big, Instant::now() + Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Generous: proves the wait ended, not how fast (a loaded machine is slow).
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_reader_that_is_gone_gives_epipe_not_sigpipe() {
        let (r, w) = pipe().unwrap();
        drop(r);
        set_nonblocking(&w).unwrap();
        let e = write_all_until(&w, b"x", Instant::now() + Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_process_group_refuses_our_own_group_everyone_and_lone_pids() {
        // 0 is the caller's own group, 1 is kill(-1) (every process), and beyond pid_t the
        // negation would name a single process: each is refused before kill(2) is called (a
        // refusal that failed would kill this test's own group).
        for pgid in [0, 1, i32::MAX as u32 + 1, u32::MAX] {
            let e = kill_process_group(pgid).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{pgid}: {e}");
            assert!(e.to_string().contains(&pgid.to_string()), "{e}");
        }
    }

    #[test]
    fn kill_process_group_kills_a_group_of_its_own() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap();
        kill_process_group(child.id()).unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn entry_functions_take_one_file_name_only() {
        let dir = open_dir(Path::new("/")).unwrap();
        for bad in ["", ".", "..", "../etc", "a/b", "tmp/", "a\0b"] {
            let name = OsStr::new(bad);
            for e in [
                open_at(&dir, name, libc::O_RDONLY, 0)
                    .map(|_| ())
                    .unwrap_err(),
                stat_at(&dir, name).map(|_| ()).unwrap_err(),
                rename_at(&dir, name, OsStr::new("x")).unwrap_err(),
                rename_at(&dir, OsStr::new("x"), name).unwrap_err(),
                unlink_at(&dir, name).unwrap_err(),
            ] {
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {e}");
            }
        }
        assert_eq!(
            open_dir(Path::new("/\0")).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn links_are_described_not_followed() {
        let dir = std::env::temp_dir().join(format!("p2pcheck-os-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).unwrap();
        let fd = open_dir(&dir);
        let results = fd.map(|fd| {
            (
                stat_at(&fd, OsStr::new("zero")).map(|st| st.mode & libc::S_IFMT),
                open_at(&fd, OsStr::new("zero"), libc::O_RDONLY, 0).map_err(|e| e.raw_os_error()),
                open_at(
                    &fd,
                    OsStr::new("new"),
                    libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
                .map(|_| ()),
                rename_at(&fd, OsStr::new("new"), OsStr::new("zero")),
                stat_at(&fd, OsStr::new("zero")).map(|st| (st.mode & libc::S_IFMT, st.nlink)),
                unlink_at(&fd, OsStr::new("zero")),
            )
        });
        let names = std::fs::read_dir(&dir).map(|d| d.count());
        let _ = std::fs::remove_dir_all(&dir);
        let (link, open, create, rename, replaced, unlink) = results.unwrap();
        assert_eq!(link.unwrap(), libc::S_IFLNK);
        assert_eq!(open.unwrap_err(), Some(libc::ELOOP));
        create.unwrap();
        rename.unwrap();
        assert_eq!(replaced.unwrap(), (libc::S_IFREG, 1));
        unlink.unwrap();
        assert_eq!(names.unwrap(), 0);
    }
}

//! Passing a file descriptor to another process over a Unix socket (`SCM_RIGHTS`), the way
//! PyTorch's symmetric memory and NCCL pass a cuMem allocation's exported descriptor.
//!
//! The socket is a `SOCK_SEQPACKET` pair, so each message keeps its bounds: a few bytes saying
//! what the descriptor is, and the descriptor. Every send and receive has a deadline (the
//! calls never block: `MSG_DONTWAIT`, then `poll` until the deadline), and a descriptor that
//! arrives is owned at once ([`OwnedFd`]), so it is closed on every path, an error's included.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// The descriptor a worker receives and sends cuMem descriptors on, when its parent gave it a
/// socket ([`super::worker_pre_exec`]).
pub const WORKER_SOCKET_FD: RawFd = 4;

/// The worker's end of its descriptor socket ([`WORKER_SOCKET_FD`]), made close-on-exec:
/// `Err` when that descriptor is not a socket (the parent gave none), and at every call after
/// one that succeeded (that call's descriptor owns it).
pub fn worker_socket() -> io::Result<OwnedFd> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    super::take_inherited(&TAKEN, WORKER_SOCKET_FD, libc::S_IFSOCK, "a socket")
}

/// A connected pair of Unix sequenced-packet sockets (`socketpair(AF_UNIX, SOCK_SEQPACKET)`),
/// both close-on-exec and numbered 3 or above (so that a child's standard descriptors, set up
/// by the spawn, can never replace one).
pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [-1; 2];
    // SAFETY: fds is a two-element array, as socketpair(2) requires; both new descriptors are
    // owned by the OwnedFds alone.
    unsafe {
        if libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let (a, b) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        Ok((above_standard(a)?, above_standard(b)?))
    }
}

/// `fd` itself when it is 3 or above, else a close-on-exec duplicate that is (the original
/// closed).
fn above_standard(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: fcntl duplicates an open descriptor; the new one is owned by the OwnedFd alone.
    unsafe {
        let dup = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3);
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(dup))
    }
}

/// Room for the control message of one descriptor, aligned as `cmsghdr` needs.
#[repr(C)]
union Control {
    header: libc::cmsghdr,
    // Two descriptors' worth, so that a message carrying more than one is seen (and refused)
    // rather than cut.
    bytes: [u8; 64],
}

/// Sends `payload` (1 to 255 bytes) with a duplicate of `fd` attached, waiting for room at most
/// until `deadline` (then `TimedOut`). A peer that is gone is `EPIPE`, never SIGPIPE.
pub fn send_fd(
    sock: BorrowedFd<'_>,
    fd: BorrowedFd<'_>,
    payload: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    if payload.is_empty() || payload.len() > 255 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a descriptor's message takes 1 to 255 bytes",
        ));
    }
    let raw: RawFd = fd.as_raw_fd();
    loop {
        // SAFETY: Control is plain data; zeroed is a valid value of it.
        let mut control: Control = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
        // SAFETY: msghdr is plain data; zeroed, then its pointers are set to live memory.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&mut control as *mut Control).cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as _;
        // SAFETY: msg points at the control buffer, large enough for one descriptor's header
        // (CMSG_SPACE above is at most its size), so CMSG_FIRSTHDR is non-null and CMSG_DATA
        // lies inside it; sendmsg reads the iovec's payload and the control buffer, both live
        // for the call, and duplicates the descriptor for the receiver (ours stays ours).
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), raw);
            libc::sendmsg(
                sock.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                if !super::poll_one(sock, libc::POLLOUT, deadline)? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the receiver made no room for the descriptor before the deadline",
                    ));
                }
            }
            _ => return Err(e),
        }
    }
}

/// Receives one message and the descriptor attached to it, waiting at most until `deadline`
/// (then `TimedOut`); the payload goes to `buf`, whose length it returns. A peer that closed
/// is `UnexpectedEof`; a message without exactly one descriptor, with its control data cut, or
/// longer than `buf`, is `InvalidData` (whatever descriptors came with it are closed).
pub fn recv_fd(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<(usize, OwnedFd)> {
    loop {
        // SAFETY: Control is plain data; zeroed is a valid value of it.
        let mut control: Control = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; zeroed, then its pointers are set to live memory.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&mut control as *mut Control).cast();
        msg.msg_controllen = std::mem::size_of::<Control>() as _;
        // SAFETY: msg describes buf and the control buffer, both writable and live for the
        // call; new descriptors are close-on-exec (MSG_CMSG_CLOEXEC) and taken below.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    if !super::poll_one(sock, libc::POLLIN, deadline)? {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no descriptor arrived before the deadline",
                        ));
                    }
                    continue;
                }
                _ => return Err(e),
            }
        }
        // Own every descriptor that arrived before looking at anything else.
        let received = take_descriptors(&msg);
        if n == 0 && received.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the sender closed its socket",
            ));
        }
        let refuse = |why: &str| Err(io::Error::new(io::ErrorKind::InvalidData, why.to_string()));
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return refuse("the descriptor's control data was cut (MSG_CTRUNC)");
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return refuse("the message was longer than expected");
        }
        let mut received = received.into_iter();
        return match (received.next(), received.next()) {
            (Some(fd), None) => Ok((n as usize, fd)),
            (None, _) => refuse("a message came without a descriptor"),
            (Some(_), Some(_)) => refuse("a message came with more than one descriptor"),
        };
    }
}

/// The descriptors of every `SCM_RIGHTS` control message in `msg`, owned.
fn take_descriptors(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    // SAFETY: msg was filled by recvmsg: its control buffer is live and msg_controllen says how
    // much of it holds well-formed headers, which CMSG_FIRSTHDR/CMSG_NXTHDR walk within. Each
    // SCM_RIGHTS header carries (cmsg_len - CMSG_LEN(0)) / 4 descriptors, new in this process
    // and owned by nothing else, read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let bytes = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    if fd >= 0 {
                        out.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[test]
    fn a_descriptor_crosses_with_its_message_and_names_the_same_file() {
        let (a, b) = socket_pair().unwrap();
        let memfd = crate::os::memfd(c"p2pcheck-fdpass-test").unwrap();
        std::fs::File::from(memfd.try_clone().unwrap())
            .write_all(b"through the socket")
            .unwrap();
        send_fd(a.as_fd(), memfd.as_fd(), b"export 7", soon()).unwrap();
        let mut buf = [0u8; 32];
        let (n, got) = recv_fd(b.as_fd(), &mut buf, soon()).unwrap();
        assert_eq!(&buf[..n], b"export 7");
        assert_ne!(got.as_raw_fd(), memfd.as_raw_fd());
        let mut file = std::fs::File::from(got);
        file.rewind().unwrap();
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, "through the socket");
    }

    #[test]
    fn a_wait_for_a_descriptor_ends_at_its_deadline() {
        let (_a, b) = socket_pair().unwrap();
        let started = Instant::now();
        let e = recv_fd(
            b.as_fd(),
            &mut [0u8; 8],
            Instant::now() + Duration::from_millis(50),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Generous: proves the wait ended, not how fast.
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_closed_sender_a_missing_descriptor_and_a_long_message_are_errors() {
        let (a, b) = socket_pair().unwrap();
        // A message without a descriptor (a plain write on the socket).
        std::fs::File::from(a.try_clone().unwrap())
            .write_all(b"no fd")
            .unwrap();
        let e = recv_fd(b.as_fd(), &mut [0u8; 8], soon()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // A message longer than the buffer: refused, its descriptor closed with it.
        send_fd(a.as_fd(), a.as_fd(), b"a long message", soon()).unwrap();
        let e = recv_fd(b.as_fd(), &mut [0u8; 4], soon()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        drop(a);
        let e = recv_fd(b.as_fd(), &mut [0u8; 8], soon()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[test]
    fn a_send_to_a_receiver_that_never_reads_ends_at_its_deadline_and_a_gone_one_fails() {
        let (a, b) = socket_pair().unwrap();
        let small: libc::c_int = 1; // the kernel's minimum: full after a few messages
                                    // SAFETY: setsockopt reads one c_int from a live local for the call.
        let rc = unsafe {
            libc::setsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let memfd = crate::os::memfd(c"p2pcheck-fdpass-test").unwrap();
        let started = Instant::now();
        let e = loop {
            if let Err(e) = send_fd(
                a.as_fd(),
                memfd.as_fd(),
                b"x",
                Instant::now() + Duration::from_millis(20),
            ) {
                break e;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "never full");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        drop(b);
        // Gone with messages unread: reset; either way an error, not SIGPIPE.
        let e = send_fd(a.as_fd(), memfd.as_fd(), b"x", soon()).unwrap_err();
        assert!(
            [Some(libc::EPIPE), Some(libc::ECONNRESET)].contains(&e.raw_os_error()),
            "{e}"
        );
        assert!(send_fd(a.as_fd(), memfd.as_fd(), b"", soon()).is_err());
    }
}

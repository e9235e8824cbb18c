//! Opening a file a user names (the trace destination, a trace to summarize, the simulator
//! library to write) so that what is there cannot block the opener or feed it without end.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` with `options` without ever blocking, and only if it is a regular file.
/// `O_NONBLOCK` makes `open(2)` of a FIFO return at once (for writing, `ENXIO` without a
/// reader) and keeps a device from waiting in its open; `O_NOCTTY` keeps a terminal from
/// becoming the controlling one. Anything but a regular file is then refused with what it is
/// ("it is a FIFO, not a regular file"): reading it may never end, writing it may block. For a
/// regular file `O_NONBLOCK` changes nothing.
pub(crate) fn open_regular(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let not_regular = |mode: u32| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", kind(mode)),
        )
    };
    let file = match options
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        // A FIFO without a reader (or a device with nothing behind it), opened for writing:
        // say what it is rather than "No such device or address".
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(std::fs::metadata(path).map_or(e, |m| not_regular(m.mode())))
        }
        Err(e) => return Err(e),
    };
    let mode = file.metadata()?.mode();
    if mode & libc::S_IFMT != libc::S_IFREG {
        return Err(not_regular(mode));
    }
    Ok(file)
}

/// Reads a small file without ever blocking on it ([`open_regular`]: only a regular file is
/// read), at most `max` bytes of it (procfs and sysfs files report sizes that are not what a
/// read gives, so the size has to be found by reading); a longer file is an error. Every
/// error's text names the file and says why.
pub(crate) fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let fail = |kind: io::ErrorKind, why: String| {
        io::Error::new(kind, format!("cannot read {}: {why}", path.display()))
    };
    let io_fail = |e: io::Error| fail(e.kind(), e.to_string());
    let file = open_regular(path, OpenOptions::new().read(true)).map_err(io_fail)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_fail)?;
    if bytes.len() as u64 > max {
        return Err(fail(
            io::ErrorKind::InvalidData,
            format!("it is larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// What a file is, from its `st_mode`, in words: "a symbolic link", "a FIFO", ….
pub(crate) fn kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "a file of unknown type",
    }
}

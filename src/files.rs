//! Opening a file a user names (the trace destination, a trace to summarize, the simulator
//! library to write) so that what is there cannot block the opener or feed it without end.

use std::fs::{File, OpenOptions};
use std::io;
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
            format!("it is {}, not a regular file", crate::cache::kind(mode)),
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

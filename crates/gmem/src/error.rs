//! Errors of private-memory files. Every error carries the errno a kernel
//! user would get for the same mistake, so that results can be compared with
//! the kernel's (the seed's shmem changes, or guest_memfd).

pub use rustix::io::Errno;

use crate::types::PageIndex;

/// An error from a private-memory file operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Host access to a GUEST-sealed file (read, write, map, ...): `EPERM`.
    #[error("{op}: the file is GUEST-sealed; its content is not accessible from the host")]
    GuestSealed {
        /// The refused operation.
        op: &'static str,
    },
    /// Adding the GUEST seal to a file that is mapped or not empty: `EBUSY`.
    #[error("adding the GUEST seal: the file {why}")]
    SealBusy {
        /// What makes the file busy.
        why: &'static str,
    },
    /// A seal forbids the operation, like the kernel's `EPERM`.
    #[error("{op}: forbidden by the file's seals")]
    SealForbids {
        /// The refused operation.
        op: &'static str,
    },
    /// An offset or length of a GUEST-sealed file that is not page-aligned: `EINVAL`.
    #[error("{op}: {value:#x} is not a multiple of {align:#x} (the file's page size)")]
    Unaligned {
        /// The refused operation.
        op: &'static str,
        /// The offending offset or length.
        value: u64,
        /// What it must be a multiple of: 4 KiB, or 2 MiB on huge pages.
        align: u64,
    },
    /// Huge pages of the kind asked for are not offered here: `EINVAL`.
    #[error("{what}: unavailable: {why}")]
    NoHugePages {
        /// The kind asked for.
        what: String,
        /// Why this host does not offer them.
        why: String,
    },
    /// The host's hugetlbfs pool has too few free pages for the file:
    /// `ENOMEM`.
    #[error("{bytes:#x} bytes of hugetlbfs pages: not enough free huge pages (HugePages_Free in /proc/meminfo)")]
    NoFreeHugePages {
        /// Bytes the file needed.
        bytes: u64,
    },
    /// A page at or past the end of the file: `EINVAL`.
    #[error("{page} is past the end of the file ({size:#x} bytes)")]
    PastEof {
        /// The page asked for.
        page: PageIndex,
        /// The file size at the time.
        size: u64,
    },
    /// Binding an owner to a file that is not GUEST-sealed: `EINVAL`.
    #[error("only a GUEST-sealed file can be bound to an owner")]
    NotGuestFile,
    /// Binding a second owner to a bound file: `EPERM`.
    #[error("the file is already bound to another owner")]
    OwnerConflict,
    /// The call would wait for something the calling thread itself holds: `EDEADLK`.
    #[error("{op}: this thread holds {held}; waiting for it would deadlock")]
    WouldDeadlock {
        /// The refused operation.
        op: &'static str,
        /// What the thread holds.
        held: String,
    },
    /// Part of the range is being invalidated right now; try again: `EAGAIN`.
    #[error("{op}: part of the range is being invalidated; try again")]
    Again {
        /// The refused operation.
        op: &'static str,
    },
    /// The file's size or a range of it cannot be represented: `EINVAL` / `EFBIG`.
    #[error("{op}: bad argument: {why}")]
    InvalidArgument {
        /// The refused operation.
        op: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// Locking the file's pages in memory failed because of `RLIMIT_MEMLOCK`.
    #[error("locking {bytes:#x} bytes of guest memory in RAM: {errno} (raise RLIMIT_MEMLOCK, `ulimit -l`, or grant CAP_IPC_LOCK)")]
    MemlockLimit {
        /// Bytes that were to be locked.
        bytes: u64,
        /// `ENOMEM` or `EAGAIN`, as returned by `mlock2`.
        errno: Errno,
    },
    /// Shrinking a file below the end of a live owner window (a guest
    /// region would lose its backing): `EBUSY`.
    #[error("ftruncate to {size:#x}: an owner window maps the file up to {window_end:#x}")]
    WindowBusy {
        /// The refused size.
        size: u64,
        /// Where the furthest live window ends.
        window_end: u64,
    },
    /// A system call failed.
    #[error("{op}: {errno}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
}

impl Error {
    /// The errno a kernel user would see for this error.
    pub fn errno(&self) -> Errno {
        match self {
            Error::GuestSealed { .. } | Error::SealForbids { .. } | Error::OwnerConflict => {
                Errno::PERM
            }
            Error::SealBusy { .. } | Error::WindowBusy { .. } => Errno::BUSY,
            Error::Unaligned { .. }
            | Error::PastEof { .. }
            | Error::NotGuestFile
            | Error::InvalidArgument { .. }
            | Error::NoHugePages { .. } => Errno::INVAL,
            Error::NoFreeHugePages { .. } => Errno::NOMEM,
            Error::WouldDeadlock { .. } => Errno::DEADLK,
            Error::Again { .. } => Errno::AGAIN,
            Error::MemlockLimit { errno, .. } | Error::Os { errno, .. } => *errno,
        }
    }

    /// An error for a failed system call; a kernel `EPERM` becomes
    /// [`Error::SealForbids`], since that is what it means on a memfd.
    pub(crate) fn os(op: &'static str, errno: Errno) -> Self {
        if errno == Errno::PERM {
            Error::SealForbids { op }
        } else {
            Error::Os { op, errno }
        }
    }
}

impl Error {
    /// An error for a failed `std` I/O call, keeping its errno.
    pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |e| Error::Os { op, errno: Errno::from_io_error(&e).unwrap_or(Errno::IO) }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = std::io::Error::from_raw_os_error(e.errno().raw_os_error()).kind();
        std::io::Error::new(kind, e)
    }
}

/// Result of private-memory file operations.
pub type Result<T> = std::result::Result<T, Error>;

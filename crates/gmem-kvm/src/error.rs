//! Errors of the KVM side. Each keeps the errno a kernel user would see.

pub use gmem::Errno;

/// An error from a VM, its memory or its vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{op}: {errno}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// Another system call failed (userfaultfd, eventfd, signals).
    #[error("{op}: {errno}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The private-memory file refused the operation.
    #[error(transparent)]
    Memory(#[from] gmem::Error),
    /// The host touched a private page: only shared pages are reachable
    /// (`EPERM`). Devices see it inside vm-memory's error: see
    /// [`Error::private_page_in`].
    #[error("{0} is private: the host may not access it")]
    PrivatePage(crate::Gpa),
    /// A range not inside guest RAM (`EINVAL`).
    #[error("{gpa}+{len:#x} is not inside guest RAM")]
    OutsideRam {
        /// Where the range starts.
        gpa: crate::Gpa,
        /// Its length in bytes.
        len: u64,
    },
    /// A conversion or punch of pages a device has pinned for I/O
    /// ([`crate::DeviceMemory::pin`]); try again once the I/O is done (`EAGAIN`).
    #[error("{gpa}+{len:#x} is pinned for device I/O")]
    Pinned {
        /// Where the refused range starts.
        gpa: crate::Gpa,
        /// Its length in bytes.
        len: u64,
    },
    /// A bad argument: unaligned, empty or otherwise malformed (`EINVAL`).
    #[error("{0}")]
    InvalidArgument(String),
    /// A range already taken: overlapping memslots, a file range bound twice (`EEXIST`).
    #[error("{0}")]
    Exists(String),
    /// Not allowed in the VM's state, e.g. populating after the VM ran (`EPERM`).
    #[error("{0}")]
    NotPermitted(String),
    /// A malformed guest image (`ENOEXEC`).
    #[error("bad guest image: {0}")]
    BadImage(String),
    /// The host cannot do it (`EOPNOTSUPP`), e.g. native guest_memfd that does not serve guests.
    #[error("{0}")]
    Unsupported(String),
    /// Busy: e.g. restoring a snapshot into memory that already holds pages (`EBUSY`).
    #[error("{0}")]
    Busy(String),
    /// A snapshot that is not one, or was altered or cut short: a bad
    /// magic or version, a failed check of its header, index or state, a
    /// length that does not match (`EBADMSG`).
    #[error("bad snapshot: {0}")]
    BadSnapshot(String),
    /// A snapshot or migration sealed under another key (or whose
    /// identity was altered, which derives another key) (`EKEYREJECTED`).
    #[error("key rejected: sealed under another key")]
    WrongKey,
    /// A snapshot page failed its check when read (`EBADMSG`): altered,
    /// moved, or from another snapshot. The guest never sees it.
    #[error("snapshot page for {gpa} failed its check: {why}")]
    SnapshotPage {
        /// The page's guest address.
        gpa: crate::Gpa,
        /// What failed.
        why: &'static str,
    },
    /// A snapshot that does not fit this memory: another region layout,
    /// or a diff on another base (`EINVAL`).
    #[error("snapshot does not fit: {0}")]
    SnapshotMismatch(String),
    /// A migration peer broke the protocol: not a gmem migration, a frame
    /// out of place, a bound exceeded (`EPROTO`).
    #[error("migration: {0}")]
    Protocol(String),
    /// The migration link broke while pages were still on the other side
    /// (`ENOLINK`): in post-copy, the destination's guest cannot go on.
    #[error(
        "migration link lost ({why}): {pages} page(s) still at the source, the first at {gpa}"
    )]
    MigrationLost {
        /// The first page not received.
        gpa: crate::Gpa,
        /// Pages not received.
        pages: u64,
        /// How the link broke.
        why: String,
    },
    /// A guest page fault that could not be served.
    #[error(transparent)]
    Fault(Box<crate::faults::FaultError>),
}

impl Error {
    /// The errno a kernel user would see.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Kvm { errno, .. } | Error::Os { errno, .. } => *errno,
            Error::Memory(e) => e.errno(),
            Error::PrivatePage(_) => Errno::PERM,
            Error::OutsideRam { .. } | Error::InvalidArgument(_) => Errno::INVAL,
            Error::Pinned { .. } => Errno::AGAIN,
            Error::Exists(_) => Errno::EXIST,
            Error::NotPermitted(_) => Errno::PERM,
            Error::BadImage(_) => Errno::NOEXEC,
            Error::Unsupported(_) => Errno::OPNOTSUPP,
            Error::Fault(fault) => fault.errno(),
            Error::Busy(_) => Errno::BUSY,
            Error::BadSnapshot(_) | Error::SnapshotPage { .. } => Errno::BADMSG,
            Error::WrongKey => Errno::from_raw_os_error(libc::EKEYREJECTED),
            Error::SnapshotMismatch(_) => Errno::INVAL,
            Error::Protocol(_) => Errno::PROTO,
            Error::MigrationLost { .. } => Errno::NOLINK,
        }
    }

    /// An error for a failed kvm-ioctls call, keeping its errno.
    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |e| Error::Kvm { op, errno: Errno::from_raw_os_error(e.errno()) }
    }

    /// An error for a failed system call.
    pub fn os(op: &'static str) -> impl FnOnce(Errno) -> Error {
        move |errno| Error::Os { op, errno }
    }

    /// An error for a failed `std` I/O call, keeping its errno.
    pub fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |e| Error::Os { op, errno: Errno::from_io_error(&e).unwrap_or(Errno::IO) }
    }
}

impl Error {
    /// The private page a device's vm-memory access was refused on, if
    /// that is why it failed (the view's errors wrap an [`Error`]).
    pub fn private_page_in(error: &vm_memory::GuestMemoryError) -> Option<crate::Gpa> {
        match error {
            vm_memory::GuestMemoryError::IOError(io) => match io.get_ref()?.downcast_ref()? {
                Error::PrivatePage(gpa) => Some(*gpa),
                _ => None,
            },
            _ => None,
        }
    }
}

impl From<Error> for std::io::Error {
    /// An I/O error of the same errno, with this error inside.
    fn from(error: Error) -> Self {
        let kind = std::io::Error::from(error.errno()).kind();
        std::io::Error::new(kind, error)
    }
}

/// Result of KVM-side operations.
pub type Result<T> = std::result::Result<T, Error>;

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
    /// A bad argument: unaligned, empty or outside guest RAM (`EINVAL`).
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
            Error::InvalidArgument(_) => Errno::INVAL,
            Error::Exists(_) => Errno::EXIST,
            Error::NotPermitted(_) => Errno::PERM,
            Error::BadImage(_) => Errno::NOEXEC,
            Error::Unsupported(_) => Errno::OPNOTSUPP,
            Error::Fault(fault) => fault.errno(),
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

/// Result of KVM-side operations.
pub type Result<T> = std::result::Result<T, Error>;

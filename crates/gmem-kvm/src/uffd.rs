//! The few userfaultfd operations gmem needs, over raw ioctls.
//!
//! Written by hand because the `userfaultfd` crate needs libclang at build
//! time; the structures and ioctl numbers come from `linux-raw-sys`.

use std::os::fd::{AsRawFd, OwnedFd};

use linux_raw_sys::general::{
    uffd_msg, uffdio_api, uffdio_continue, uffdio_range, uffdio_register, _UFFDIO_CONTINUE,
    UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT,
    UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM,
};
use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_CONTINUE, UFFDIO_REGISTER, UFFDIO_WAKE};
use rustix::io::Errno;
use rustix::mm::UserfaultfdFlags;

use crate::error::{Error, Result};

/// A userfaultfd that reports missing and minor faults on shmem ranges.
#[derive(Debug)]
pub(crate) struct Userfaultfd {
    fd: OwnedFd,
}

/// Result of `UFFDIO_CONTINUE`: the bytes mapped before an error.
pub(crate) struct ContinueError {
    pub(crate) errno: Errno,
    pub(crate) mapped: u64,
}

impl Userfaultfd {
    /// Opens a non-blocking userfaultfd with the shmem MISSING and MINOR features.
    pub(crate) fn new() -> Result<Self> {
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: creates a new descriptor; no memory is affected until a
        // range is registered.
        let fd = unsafe { rustix::mm::userfaultfd(flags) }.map_err(|errno| Error::Os {
            op: "userfaultfd (needs root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)",
            errno,
        })?;
        let uffd = Self { fd };
        let mut api = uffdio_api {
            api: UFFD_API.into(),
            features: (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM).into(),
            ioctls: 0,
        };
        uffd.ioctl(UFFDIO_API, &mut api, "UFFDIO_API (shmem MISSING|MINOR)")?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, request: u32, arg: &mut T, op: &'static str) -> Result<()> {
        // SAFETY: `request` is a userfaultfd ioctl whose argument type is `T`
        // (each caller pairs them as the uapi header does), and `arg` is a
        // live, exclusive reference for the duration of the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) };
        if ret < 0 {
            return Err(Error::io(op)(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reports missing and minor faults on `[addr, addr + len)`.
    pub(crate) fn register(&self, addr: u64, len: u64) -> Result<()> {
        let mut reg = uffdio_register {
            range: uffdio_range { start: addr, len },
            mode: (UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR).into(),
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg, "UFFDIO_REGISTER")?;
        if reg.ioctls & (1 << _UFFDIO_CONTINUE) == 0 {
            return Err(Error::Unsupported(
                "userfaultfd: UFFDIO_CONTINUE not offered for shmem".into(),
            ));
        }
        Ok(())
    }

    /// Maps the page-cache pages of `[addr, addr + len)` and wakes the
    /// faulting threads. On error, says how many bytes were mapped first.
    pub(crate) fn continue_range(
        &self,
        addr: u64,
        len: u64,
    ) -> std::result::Result<(), ContinueError> {
        let mut arg =
            uffdio_continue { range: uffdio_range { start: addr, len }, mode: 0, mapped: 0 };
        self.ioctl(UFFDIO_CONTINUE, &mut arg, "UFFDIO_CONTINUE").map_err(|e| ContinueError {
            errno: e.errno(),
            mapped: u64::try_from(arg.mapped).unwrap_or(0),
        })
    }

    /// Wakes threads waiting on faults in `[addr, addr + len)`.
    pub(crate) fn wake(&self, addr: u64, len: u64) -> Result<()> {
        let mut range = uffdio_range { start: addr, len };
        self.ioctl(UFFDIO_WAKE, &mut range, "UFFDIO_WAKE")
    }

    /// Reads pending page-fault addresses into `out`; returns when none is left.
    pub(crate) fn read_faults(&self, out: &mut Vec<u64>) -> Result<()> {
        const BATCH: usize = 64;
        let mut raw = [0u8; BATCH * std::mem::size_of::<uffd_msg>()];
        loop {
            let n = match rustix::io::read(&self.fd, &mut raw) {
                Ok(n) => n,
                Err(Errno::AGAIN) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(Error::Os { op: "read userfaultfd", errno }),
            };
            for chunk in raw[..n].chunks_exact(std::mem::size_of::<uffd_msg>()) {
                // SAFETY: the kernel wrote whole `uffd_msg`s; reading one
                // unaligned from its bytes is valid for this plain C struct.
                let msg: uffd_msg = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
                if u32::from(msg.event) == UFFD_EVENT_PAGEFAULT {
                    // SAFETY: `pagefault` is the union member for this event.
                    out.push(unsafe { msg.arg.pagefault.address });
                }
            }
        }
    }

    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }
}

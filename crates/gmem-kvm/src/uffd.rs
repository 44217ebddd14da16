//! The few userfaultfd operations gmem needs, over raw ioctls.
//!
//! Written by hand because the `userfaultfd` crate needs libclang at build
//! time; the structures and ioctl numbers come from `linux-raw-sys`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use gmem::PAGE_SIZE;
use linux_raw_sys::general::{
    uffd_msg, uffdio_api, uffdio_continue, uffdio_range, uffdio_register, uffdio_zeropage,
    _UFFDIO_CONTINUE, UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING, UFFD_API,
    UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM,
    UFFD_FEATURE_SIGBUS, UFFD_FEATURE_THREAD_ID, UFFD_PAGEFAULT_FLAG_MINOR,
};
use linux_raw_sys::ioctl::{
    UFFDIO_API, UFFDIO_CONTINUE, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
};
use rustix::io::Errno;
use rustix::mm::UserfaultfdFlags;

use crate::error::{Error, Result};

/// An argument of a userfaultfd ioctl, tied to its request number, so that
/// no request can be made with the wrong argument type.
trait UffdArg {
    const REQUEST: u32;
}

impl UffdArg for uffdio_api {
    const REQUEST: u32 = UFFDIO_API;
}
impl UffdArg for uffdio_register {
    const REQUEST: u32 = UFFDIO_REGISTER;
}
impl UffdArg for uffdio_continue {
    const REQUEST: u32 = UFFDIO_CONTINUE;
}
impl UffdArg for uffdio_zeropage {
    const REQUEST: u32 = UFFDIO_ZEROPAGE;
}
/// `UFFDIO_WAKE`'s range.
#[repr(transparent)]
struct Wake(uffdio_range);
impl UffdArg for Wake {
    const REQUEST: u32 = UFFDIO_WAKE;
}
/// `UFFDIO_UNREGISTER`'s range.
#[repr(transparent)]
struct Unregister(uffdio_range);
impl UffdArg for Unregister {
    const REQUEST: u32 = UFFDIO_UNREGISTER;
}

/// A guest page fault read from a userfaultfd.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fault {
    /// The faulting address in a registered window.
    pub(crate) addr: u64,
    /// The faulting thread's id (a vCPU's).
    pub(crate) thread: u32,
    /// A minor fault: the page is in the file, only unmapped here.
    pub(crate) minor: bool,
}

/// What [`Userfaultfd::continue_run`] did: bytes passed over, and
/// bytes of them newly mapped.
struct Filled {
    len: u64,
    mapped: u64,
}

/// Which faults of a registered range are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Registration {
    /// Every first touch (missing) and every touch of a page in the file
    /// but not mapped here (minor).
    MissingAndMinor,
    /// Minor faults only: the kernel allocates holes itself.
    MinorOnly,
    /// Missing faults only: the kernel maps pages that are in the file
    /// itself (a host view of a file on huge pages, whose mappings the
    /// kernel's own collapses remove at any time).
    MissingOnly,
}

impl Registration {
    fn other(self) -> Self {
        match self {
            Self::MissingAndMinor => Self::MinorOnly,
            Self::MinorOnly | Self::MissingOnly => Self::MissingAndMinor,
        }
    }
}

/// A userfaultfd for shmem ranges, registered for missing and minor faults.
#[derive(Debug)]
pub(crate) struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Opens a non-blocking userfaultfd that reports faults as events, with
    /// the faulting thread's id (for a fault-serving thread).
    pub(crate) fn new() -> Result<Self> {
        Self::create()?.enable_faults()
    }

    /// [`new`](Self::new) on a userfaultfd the caller opened (no
    /// `UFFDIO_API` yet; `EINVAL` otherwise).
    pub(crate) fn adopt(fd: OwnedFd) -> Result<Self> {
        Self { fd }.enable_faults()
    }

    fn enable_faults(self) -> Result<Self> {
        self.enable(UFFD_FEATURE_THREAD_ID, "UFFDIO_API (shmem MISSING|MINOR, THREAD_ID)")
    }

    /// Opens a userfaultfd whose registered ranges raise `SIGBUS` on any
    /// access to a page not mapped by [`continue_range`](Self::continue_range):
    /// a mapping that holds only the pages put there, never one faulted in.
    pub(crate) fn new_sigbus() -> Result<Self> {
        Self::create()?.enable_sigbus()
    }

    /// [`new_sigbus`](Self::new_sigbus) on a userfaultfd the caller opened.
    pub(crate) fn adopt_sigbus(fd: OwnedFd) -> Result<Self> {
        Self { fd }.enable_sigbus()
    }

    fn enable_sigbus(self) -> Result<Self> {
        self.enable(UFFD_FEATURE_SIGBUS, "UFFDIO_API (shmem MISSING|MINOR, SIGBUS)")
    }

    /// The features this kernel's userfaultfd offers (`UFFD_FEATURE_*`).
    pub(crate) fn supported_features() -> Result<u64> {
        let uffd = Self::create()?;
        let mut api = uffdio_api { api: UFFD_API.into(), features: 0, ioctls: 0 };
        uffd.ioctl(&mut api, "UFFDIO_API")?;
        Ok(api.features)
    }

    /// A new userfaultfd: the system call where this process may use it
    /// (root or `CAP_SYS_PTRACE`, or `vm.unprivileged_userfaultfd=1`),
    /// otherwise `/dev/userfaultfd` (Linux 6.1+), whose file mode decides,
    /// as a jailed VMM's is meant to.
    fn create() -> Result<Self> {
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: creates a new descriptor; no memory is affected until a
        // range is registered.
        match unsafe { rustix::mm::userfaultfd(flags) } {
            Ok(fd) => Ok(Self { fd }),
            Err(Errno::PERM) => Self::from_device(flags),
            Err(errno) => Err(Error::Os { op: "userfaultfd", errno }),
        }
    }

    /// A userfaultfd from `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`).
    fn from_device(flags: UserfaultfdFlags) -> Result<Self> {
        const OP: &str = "userfaultfd: the system call needs CAP_SYS_PTRACE or \
                          vm.unprivileged_userfaultfd=1, and /dev/userfaultfd";
        /// `_IO(0xAA, 0x00)` of linux/userfaultfd.h (not in linux-raw-sys).
        const USERFAULTFD_IOC_NEW: u32 = 0xAA00;
        let device = rustix::fs::open(
            "/dev/userfaultfd",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|errno| Error::Os { op: OP, errno })?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as
        // its integer argument and returns a new descriptor or -1.
        let fd = unsafe {
            libc::ioctl(device.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags.bits() as libc::c_int)
        };
        if fd < 0 {
            return Err(Error::io(OP)(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// The API handshake, with the shmem features and `extra_features`.
    fn enable(self, extra_features: u32, op: &'static str) -> Result<Self> {
        let uffd = self;
        let mut api = uffdio_api {
            api: UFFD_API.into(),
            features: (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | extra_features)
                .into(),
            ioctls: 0,
        };
        uffd.ioctl(&mut api, op)?;
        Ok(uffd)
    }

    fn ioctl<T: UffdArg>(&self, arg: &mut T, op: &'static str) -> Result<()> {
        // SAFETY: `T::REQUEST` is the userfaultfd ioctl whose argument type
        // is `T` (the `UffdArg` impls pair them as the uapi header does),
        // and `arg` is a live, exclusive reference for the whole call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), T::REQUEST as _, arg as *mut T) };
        if ret < 0 {
            return Err(Error::io(op)(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reports the faults `registration` names on `[addr, addr + len)`.
    pub(crate) fn register(&self, addr: u64, len: u64, registration: Registration) -> Result<()> {
        let mode = match registration {
            Registration::MissingAndMinor => {
                UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR
            }
            Registration::MinorOnly => UFFDIO_REGISTER_MODE_MINOR,
            Registration::MissingOnly => UFFDIO_REGISTER_MODE_MISSING,
        };
        let mut reg = uffdio_register {
            range: uffdio_range { start: addr, len },
            mode: mode.into(),
            ioctls: 0,
        };
        self.ioctl(&mut reg, "UFFDIO_REGISTER")?;
        if registration != Registration::MissingOnly && reg.ioctls & (1 << _UFFDIO_CONTINUE) == 0 {
            return Err(Error::Unsupported(
                "userfaultfd: UFFDIO_CONTINUE not offered for shmem".into(),
            ));
        }
        Ok(())
    }

    /// Registers `[addr, addr + len)` (registered as the other
    /// [`Registration`]) anew as `registration`. The kernel wakes the
    /// faults pending there (they fault again, and are served as the new
    /// registration says); where the new registration fails, the old one
    /// is restored.
    /// Stops reporting faults on `[addr, addr + len)` and wakes the threads
    /// waiting on them: the kernel serves their faults from now on.
    pub(crate) fn unregister(&self, addr: u64, len: u64) -> Result<()> {
        self.ioctl(&mut Unregister(uffdio_range { start: addr, len }), "UFFDIO_UNREGISTER")
    }

    pub(crate) fn reregister(&self, addr: u64, len: u64, registration: Registration) -> Result<()> {
        self.unregister(addr, len)?;
        self.register(addr, len, registration).inspect_err(|_| {
            let _ = self.register(addr, len, registration.other());
        })
    }

    /// Maps the page-cache pages of `[addr, addr + len)` and wakes the
    /// faulting threads. Pages already mapped are skipped; returns how many
    /// bytes were newly mapped. The pages must exist in the file.
    pub(crate) fn continue_range(&self, addr: u64, len: u64) -> Result<u64> {
        self.continue_run(addr, addr + len, false).map(|run| run.mapped)
    }

    /// Maps `[addr, addr + len)` and wakes the faulting threads: a hole of
    /// the file becomes a new zero-filled page (`UFFDIO_ZEROPAGE`, which
    /// allocates it in the file and maps it here only), a page in the file
    /// is mapped (`UFFDIO_CONTINUE`), a page already mapped is skipped.
    /// Returns how many bytes were newly mapped. The caller keeps the
    /// range from being punched meanwhile (page locks).
    pub(crate) fn fill_range(&self, addr: u64, len: u64) -> Result<u64> {
        let end = addr + len;
        let mut next = addr;
        let mut mapped = 0;
        while next < end {
            let mut arg = uffdio_zeropage {
                range: uffdio_range { start: next, len: end - next },
                mode: 0,
                zeropage: 0,
            };
            match self.ioctl(&mut arg, "UFFDIO_ZEROPAGE") {
                Ok(()) => return Ok(mapped + end - next),
                // Zero-filled up to a page that exists.
                Err(e) if e.errno() == Errno::AGAIN && arg.zeropage > 0 => {
                    mapped += arg.zeropage as u64;
                    next += arg.zeropage as u64;
                }
                // The page exists in the file (or is mapped): map the run
                // of such pages from it, up to the next hole.
                Err(e) if e.errno() == Errno::EXIST => {
                    let run = self.continue_run(next, end, true)?;
                    mapped += run.mapped;
                    next += run.len;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(mapped)
    }

    /// Maps the pages from `addr` to `end` that exist in the file, skipping
    /// those already mapped (`UFFDIO_CONTINUE`); stops at the first hole
    /// after `addr` if `until_hole`, else fails there (`EFAULT`).
    fn continue_run(&self, addr: u64, end: u64, until_hole: bool) -> Result<Filled> {
        let mut filled = Filled { len: 0, mapped: 0 };
        while addr + filled.len < end {
            let start = addr + filled.len;
            let mut arg = uffdio_continue {
                range: uffdio_range { start, len: end - start },
                mode: 0,
                mapped: 0,
            };
            match self.ioctl(&mut arg, "UFFDIO_CONTINUE") {
                Ok(()) => {
                    filled.len += end - start;
                    filled.mapped += end - start;
                }
                // Mapped up to a hole or an already-mapped page.
                Err(e) if e.errno() == Errno::AGAIN && arg.mapped > 0 => {
                    filled.len += arg.mapped as u64;
                    filled.mapped += arg.mapped as u64;
                }
                // The first page is already mapped: skip it.
                Err(e) if e.errno() == Errno::EXIST => filled.len += PAGE_SIZE,
                // A hole, after at least one page (the first exists: the
                // caller found it so, and the range cannot be punched).
                Err(e) if until_hole && e.errno() == Errno::FAULT && filled.len > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }

    /// Wakes threads waiting on faults in `[addr, addr + len)`.
    pub(crate) fn wake(&self, addr: u64, len: u64) -> Result<()> {
        self.ioctl(&mut Wake(uffdio_range { start: addr, len }), "UFFDIO_WAKE")
    }

    /// Reads pending page faults into `out`; returns when none is left.
    pub(crate) fn read_faults(&self, out: &mut Vec<Fault>) -> Result<()> {
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
                    let fault = unsafe { msg.arg.pagefault };
                    // SAFETY: `ptid` is the member of `feat` that
                    // UFFD_FEATURE_THREAD_ID fills (a plain u32 either way).
                    let thread = unsafe { fault.feat.ptid };
                    let minor = fault.flags & u64::from(UFFD_PAGEFAULT_FLAG_MINOR) != 0;
                    out.push(Fault { addr: fault.address, thread, minor });
                }
            }
        }
    }

    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }
}

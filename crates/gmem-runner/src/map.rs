//! Plain mappings (vm-memory's owned `MmapRegion`, unmapped on drop) with
//! the kernel's errno on failure: the anonymous baseline memory of
//! benchmark VMs, and the selftests' mappings of guest_memfd, whose
//! refusals they compare with the kernel's documented ones.

use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::mm::MapFlags;
use vm_memory::mmap::{MmapRegion, MmapRegionError};

/// A readable and writable mapping of `len` bytes at a kernel-chosen
/// address; no Rust reference ever points into it.
pub(crate) struct Map(MmapRegion<()>);

fn errno(error: MmapRegionError) -> Errno {
    match error {
        MmapRegionError::Mmap(e) => Errno::from_io_error(&e).unwrap_or(Errno::NOMEM),
        _ => Errno::INVAL,
    }
}

impl Map {
    /// Maps `len` bytes of `fd` from offset 0 with `flags`.
    pub(crate) fn new(fd: &OwnedFd, len: usize, flags: MapFlags) -> Result<Self, Errno> {
        let file = std::fs::File::from(
            fd.try_clone().map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::NOMEM))?,
        );
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let file = Some(vm_memory::FileOffset::new(file, 0));
        let flags = flags.bits() as i32;
        MmapRegion::build(file, len, prot, flags).map(Self).map_err(errno)
    }

    /// Maps `len` bytes of private anonymous memory, reserving no swap.
    pub(crate) fn anonymous(len: usize) -> Result<Self, Errno> {
        MmapRegion::new(len).map(Self).map_err(errno)
    }

    /// Asks for transparent huge pages (`MADV_HUGEPAGE`).
    pub(crate) fn advise_huge(&self) -> Result<(), Errno> {
        // SAFETY: advice on this mapping, which no Rust reference points into.
        unsafe {
            rustix::mm::madvise(self.at(0).cast(), self.0.size(), rustix::mm::Advice::LinuxHugepage)
        }
    }

    /// The address of byte `offset`.
    pub(crate) fn at(&self, offset: usize) -> *mut u8 {
        self.0.as_ptr().wrapping_add(offset)
    }
}

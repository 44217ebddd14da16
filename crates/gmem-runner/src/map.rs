//! An owned mapping, unmapped on drop: the anonymous baseline memory of
//! benchmark VMs, and the selftests' mappings of guest_memfd.

use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

/// A readable and writable mapping of `len` bytes at a kernel-chosen
/// address; no Rust reference ever points into it.
pub(crate) struct Map(*mut u8, usize);

// SAFETY: the mapping is memory the value owns; it hands out raw addresses
// only, and every access through them is the user's own unsafe promise.
unsafe impl Send for Map {}

impl Map {
    /// Maps `len` bytes of `fd` from offset 0 with `flags`.
    pub(crate) fn new(fd: &OwnedFd, len: usize, flags: MapFlags) -> Result<Self, Errno> {
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a new mapping at a kernel-chosen address, owned by `Map`.
        unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) }
            .map(|p| Self(p.cast(), len))
    }

    /// Maps `len` bytes of private anonymous memory, reserving no swap.
    pub(crate) fn anonymous(len: usize) -> Result<Self, Errno> {
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        let flags = MapFlags::PRIVATE | MapFlags::NORESERVE;
        // SAFETY: a new private mapping at a kernel-chosen address, owned by `Map`.
        unsafe { rustix::mm::mmap_anonymous(std::ptr::null_mut(), len, prot, flags) }
            .map(|p| Self(p.cast(), len))
    }

    /// The address of byte `offset`.
    pub(crate) fn at(&self, offset: usize) -> *mut u8 {
        self.0.wrapping_add(offset)
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the mapping made by `Map::new` or `Map::anonymous`, owned
        // by `self`; unmapping memory a memslot still names is safe (KVM's
        // MMU notifier drops its mappings).
        let _ = unsafe { rustix::mm::munmap(self.0.cast(), self.1) };
    }
}

//! The host's view of shared guest memory through vm-memory's traits, so
//! that rust-vmm device crates (virtio-queue and friends) can use it.
//!
//! Each memslot is one [`SharedRegion`]. Every access first checks that the
//! pages are shared: on a private page it fails with
//! [`GuestMemoryError::IOError`] whose inner error is a
//! [`crate::Error::NotPermitted`] (`EPERM`) naming the GPA. Never a fault,
//! never a silent zero. The slices handed out point into the slot's host
//! view, which holds shared pages only: if the guest converts a range back
//! to private while a device still holds a slice of it, the device's next
//! access raises `SIGBUS` instead of reaching private data (the contract of
//! the kernel's mmap-able guest_memfd). [`crate::Vm::read_guest`] and
//! [`crate::Vm::write_guest`] hold the range's state for the whole copy and
//! never fault.
//!
//! ```no_run
//! use gmem_kvm::{memory::ATTRIBUTE_PRIVATE, Gpa, Vm};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let (vm, _file) = Vm::with_ram(4 << 20)?;
//! vm.convert(Gpa(0x30_0000), 0x1000, 0)?;
//! let shared = vm.shared_memory();
//! shared.write_obj(0x1234_5678u32, GuestAddress(0x30_0000)).unwrap();
//! assert_eq!(shared.read_obj::<u32>(GuestAddress(0x30_0000)).unwrap(), 0x1234_5678);
//! // Private memory is refused.
//! assert!(shared.read_obj::<u32>(GuestAddress(0x20_0000)).is_err());
//! vm.convert(Gpa(0x30_0000), 0x1000, ATTRIBUTE_PRIVATE)?;
//! # Ok::<(), gmem_kvm::Error>(())
//! ```

use std::sync::Arc;

use gmem::PAGE_SIZE;
use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use crate::memory::{GuestMemory, Slot};
use crate::{Error, Gpa};

/// The shared view of a VM's private memory slots (one region per slot).
pub struct SharedMemory {
    regions: Vec<SharedRegion>,
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory").field("regions", &self.regions.len()).finish()
    }
}

impl SharedMemory {
    pub(crate) fn new(memory: &Arc<GuestMemory>) -> Self {
        let mut regions: Vec<SharedRegion> = memory
            .slots()
            .iter()
            .map(|slot| SharedRegion { memory: memory.clone(), slot: slot.clone() })
            .collect();
        regions.sort_by_key(|r| r.slot.gpa);
        Self { regions }
    }
}

impl GuestMemoryBackend for SharedMemory {
    type R = SharedRegion;

    fn iter(&self) -> impl Iterator<Item = &SharedRegion> {
        self.regions.iter()
    }
}

/// One memslot's shared pages.
pub struct SharedRegion {
    memory: Arc<GuestMemory>,
    slot: Arc<Slot>,
}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("gpa", &self.slot.gpa)
            .field("size", &self.slot.size)
            .finish()
    }
}

impl SharedRegion {
    /// Host address of `count` bytes at `offset`, all in shared pages.
    fn host_range(&self, offset: MemoryRegionAddress, count: usize) -> Result<*mut u8, Error> {
        let start = offset.0;
        let end = start.checked_add(count as u64).filter(|&end| end <= self.slot.size);
        let Some(end) = end else {
            return Err(Error::InvalidArgument(format!(
                "{:#x}+{count:#x} is past the end of the region",
                self.slot.gpa.0 + start
            )));
        };
        let pages = start / PAGE_SIZE..end.div_ceil(PAGE_SIZE).max(start / PAGE_SIZE + 1);
        let _states = self.slot.read_states();
        self.memory.check_shared(&self.slot, pages.clone())?;
        let base = self.memory.map_host_view(&self.slot, pages)?;
        Ok(base.wrapping_add((start % PAGE_SIZE) as usize))
    }
}

/// vm-memory's error for `error`: a private page is an `EPERM` I/O error
/// whose inner error names the GPA; a range past the region is invalid.
fn to_vm_memory(error: Error, gpa: Gpa) -> GuestMemoryError {
    match error {
        Error::InvalidArgument(_) => GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa.0)),
        error => {
            let kind = std::io::Error::from(error.errno()).kind();
            GuestMemoryError::IOError(std::io::Error::new(kind, error))
        }
    }
}

impl GuestMemoryRegion for SharedRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.slot.size
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.slot.gpa.0)
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    /// The host address of a shared page; an error for a private one.
    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        self.host_range(addr, 1).map_err(|e| to_vm_memory(e, Gpa(self.slot.gpa.0 + addr.0)))
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let host = self
            .host_range(offset, count)
            .map_err(|e| to_vm_memory(e, Gpa(self.slot.gpa.0 + offset.0)))?;
        // SAFETY: `host` points at `count` bytes of the slot's host view,
        // a mapping that lives as long as the slot, which `self` keeps
        // alive for the slice's lifetime. Guest and host reach the pages
        // only through volatile or uncached accesses (KVM, vm-memory).
        Ok(unsafe { VolatileSlice::new(host, count) })
    }
}

impl GuestMemoryRegionBytes for SharedRegion {}

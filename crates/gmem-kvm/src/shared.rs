//! The host's view of shared guest memory through vm-memory's traits, so
//! that rust-vmm device crates (virtio-queue and friends) can use it.
//!
//! A [`SharedView`] holds all of guest memory in the change gate
//! (`gate.rs`) for as long as it lives: no page can be converted, punched or truncated away while a
//! device holds it (those wait), so the slices it hands out stay valid
//! and a device never faults. Each region is one [`SharedRegion`]; every
//! access first checks that the pages are shared: a private page is a
//! [`GuestMemoryError::IOError`] whose inner error is a
//! [`crate::Error::NotPermitted`] (`EPERM`) naming the GPA. Never a fault,
//! never a silent zero. Slices borrow the view, so none outlives it; a raw
//! address from [`GuestMemoryRegion::get_host_address`] is valid only while
//! the view lives, and only for the page it was asked for.
//!
//! Hold a view for a batch of device work, not for ever: a guest's
//! conversion request waits for it. A thread that holds a view and
//! converts or punches gets `EDEADLK`.
//!
//! ```no_run
//! # fn demo(memory: &gmem_kvm::PrivateMemory) -> Result<(), Box<dyn std::error::Error>> {
//! use vm_memory::{Bytes, GuestAddress};
//! let view = memory.shared();
//! let header: u64 = view.read_obj(GuestAddress(0x30_0000))?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use crate::access::Shared;
use crate::memory::PrivateMemory;
use crate::region::PrivateRegion;
use crate::{Error, Gpa};

/// The shared pages of guest memory, one region per private region, held
/// still while the view lives (see the module docs).
pub struct SharedView<'a> {
    regions: Vec<SharedRegion<'a>>,
    _shared: Shared<'a>,
}

impl std::fmt::Debug for SharedView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedView").field("regions", &self.regions.len()).finish()
    }
}

impl PrivateMemory {
    /// A view of the shared pages for vm-memory users, taken once no
    /// conversion or punch is under way; conversions and discards wait
    /// while it lives.
    pub fn shared(&self) -> SharedView<'_> {
        let shared = self.gate.access(crate::access::EVERYWHERE);
        let mut regions: Vec<SharedRegion<'_>> = self
            .regions()
            .iter()
            .map(|r| SharedRegion { memory: self, region: r.clone() })
            .collect();
        regions.sort_by_key(|r| r.region.gpa);
        SharedView { regions, _shared: shared }
    }
}

impl<'a> GuestMemoryBackend for SharedView<'a> {
    type R = SharedRegion<'a>;

    fn iter(&self) -> impl Iterator<Item = &SharedRegion<'a>> {
        self.regions.iter()
    }
}

/// One region's shared pages, inside a [`SharedView`].
pub struct SharedRegion<'a> {
    memory: &'a PrivateMemory,
    region: Arc<PrivateRegion>,
}

impl std::fmt::Debug for SharedRegion<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("gpa", &self.region.gpa)
            .field("size", &self.region.size)
            .finish()
    }
}

/// vm-memory's error for `error`: a private page is an `EPERM` I/O error
/// whose inner error names the GPA; a range past the region is invalid.
fn to_vm_memory(error: Error, gpa: Gpa) -> GuestMemoryError {
    match error {
        Error::OutsideRam { .. } => GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa.0)),
        error => GuestMemoryError::IOError(error.into()),
    }
}

impl SharedRegion<'_> {
    /// [`PrivateMemory::map_shared`] of `len` bytes at `offset`, with
    /// vm-memory's error.
    fn map_shared(
        &self,
        offset: MemoryRegionAddress,
        len: usize,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        self.memory
            .map_shared(&self.region, offset.0, len)
            .map_err(|e| to_vm_memory(e, Gpa(self.region.gpa.0.saturating_add(offset.0))))
    }
}

impl GuestMemoryRegion for SharedRegion<'_> {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.region.size
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.region.gpa.0)
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    /// The host address of a shared page (valid while the view lives); an
    /// error for a private one.
    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        self.map_shared(addr, 1)
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let host = self.map_shared(offset, count)?;
        // SAFETY: `host` points at `count` bytes of the region's host view,
        // all shared and mapped (map_shared checked them); the view's shared
        // hold on the access lock keeps them so until it is dropped, and the
        // slice borrows the view. Guest and host reach the pages only
        // through volatile accesses (KVM, vm-memory).
        Ok(unsafe { VolatileSlice::new(host, count) })
    }
}

impl GuestMemoryRegionBytes for SharedRegion<'_> {}

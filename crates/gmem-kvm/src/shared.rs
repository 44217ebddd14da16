//! Device access to shared guest memory through vm-memory's traits, so
//! that rust-vmm device crates (virtio-queue and friends) can use it, on
//! any thread.
//!
//! - [`DeviceMemory`]: the handle a device keeps (`Clone + Send + Sync`),
//!   a vm-memory [`GuestAddressSpace`] as `GuestMemoryAtomic` is: each
//!   [`memory()`](GuestAddressSpace::memory) is a [`SharedView`] for one
//!   piece of device work (a request, a descriptor chain), which sees the
//!   regions added or removed since the last one.
//! - [`SharedView`]: the [`GuestMemoryBackend`] a device walks. Every slice
//!   it hands out holds its GPA range in the change gate (`gate.rs`)
//!   from then until the view is dropped: those pages cannot be converted,
//!   punched or freed under the device (the change waits), while every
//!   other page converts freely. Every access first checks that its pages
//!   are shared: a private page is a [`GuestMemoryError::IOError`] whose
//!   inner error is [`Error::PrivatePage`] (`EPERM`, see
//!   [`Error::private_page_in`]). Never a fault, never a silent zero.
//!   Slices borrow the view, so none outlives it; a raw address from
//!   [`GuestMemoryRegion::get_host_address`] is valid only while the view
//!   lives, and only for the page it was asked for. A view's holds belong
//!   to its thread, so it is not `Send`: a thread that holds one and
//!   converts or punches gets `EDEADLK`, never a wait for itself.
//! - [`PinnedRange`]: shared pages held for I/O that outlives a call
//!   (asynchronous I/O straight into guest buffers), released on whichever
//!   thread drops it. A conversion or punch of pinned pages is refused
//!   with [`Error::Pinned`] (`EAGAIN`, which a guest's conversion request
//!   gets back) instead of waiting for I/O that nothing bounds.
//!
//! A VMM that mixes ordinary memory with gmem's (firmware, a shared
//! swiotlb pool, pmem) adds those `GuestRegionMmap`s to the handle
//! ([`DeviceMemory::add_plain_region`]): a device walks one address space
//! over both, and plain regions are reached as vm-memory reaches them.
//!
//! `GuestMemoryAtomic<M>` itself cannot hold gmem's memory: it hands every
//! device the same `M` for as long as the map lives, so nothing would ever
//! say when a device's access ends. [`DeviceMemory`] takes its place for
//! devices generic over [`GuestAddressSpace`].
//!
//! ```no_run
//! # fn demo(memory: &std::sync::Arc<gmem_kvm::PrivateMemory>) -> Result<(), Box<dyn std::error::Error>> {
//! use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
//! let device = gmem_kvm::DeviceMemory::new(memory);
//! std::thread::spawn(move || {
//!     let view = device.memory();
//!     let header: Result<u64, _> = view.read_obj(GuestAddress(0x30_0000));
//! });
//! # Ok(()) }
//! ```

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::sync::{Arc, RwLock};

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryRegionBytes, GuestRegionMmap, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use crate::memory::{PrivateMemory, Regions};
use crate::region::PrivateRegion;
use crate::{Error, Gpa, Result};

/// The ranges a view holds in the change gate, released when it goes,
/// and the snapshot of the region table that keeps its regions mapped.
struct Holds {
    memory: Arc<PrivateMemory>,
    regions: Regions,
    spans: RefCell<Vec<(u64, Range<u64>)>>,
}

impl Holds {
    /// Holds `span` (unless a hold of this view covers it already), for
    /// `access`; released again if `access` fails.
    fn with<T>(&self, span: Range<u64>, access: impl FnOnce() -> Result<T>) -> Result<T> {
        let covered =
            self.spans.borrow().iter().any(|(_, h)| h.start <= span.start && span.end <= h.end);
        if covered {
            return access();
        }
        let id = self.memory.gate.hold(span.clone(), false);
        match access() {
            Ok(value) => {
                self.spans.borrow_mut().push((id, span));
                Ok(value)
            }
            Err(error) => {
                self.memory.gate.release(id);
                Err(error)
            }
        }
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        for (id, _) in self.spans.get_mut().drain(..) {
            self.memory.gate.release(id);
        }
    }
}

/// The shared pages of guest memory, one region per private region, for
/// one piece of device work (see the module docs).
pub struct SharedView {
    regions: Vec<SharedRegion>,
}

impl std::fmt::Debug for SharedView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedView").field("regions", &self.regions.len()).finish()
    }
}

impl PrivateMemory {
    /// A view of the shared pages for vm-memory users on this thread. Each
    /// range it hands out is held until the view is dropped: conversions
    /// and punches of those pages wait, all others go on.
    pub fn shared(self: &Arc<Self>) -> SharedView {
        self.view_with(&[])
    }

    /// A view of the shared pages and of `plain` regions.
    fn view_with(self: &Arc<Self>, plain: &[Arc<GuestRegionMmap<()>>]) -> SharedView {
        let regions = self.regions();
        let count = regions.len();
        let holds = Rc::new(Holds { memory: self.clone(), regions, spans: RefCell::default() });
        let private =
            (0..count).map(|index| SharedRegion(Kind::Private { index, holds: holds.clone() }));
        let plain = plain.iter().map(|r| SharedRegion(Kind::Plain(r.clone())));
        let mut regions: Vec<SharedRegion> = private.chain(plain).collect();
        regions.sort_by_key(|r| r.start_addr());
        SharedView { regions }
    }
}

impl GuestMemoryBackend for SharedView {
    type R = SharedRegion;

    fn iter(&self) -> impl Iterator<Item = &SharedRegion> {
        self.regions.iter()
    }
}

/// One region of a [`SharedView`]: a private region's shared pages, or a
/// plain region the VMM added to its [`DeviceMemory`].
pub struct SharedRegion(Kind);

enum Kind {
    /// Region `index` of the view's snapshot.
    Private {
        index: usize,
        holds: Rc<Holds>,
    },
    Plain(Arc<GuestRegionMmap<()>>),
}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("gpa", &self.start_addr())
            .field("size", &self.len())
            .field("plain", &matches!(self.0, Kind::Plain(_)))
            .finish()
    }
}

/// vm-memory's error for `error`: a private page is an `EPERM` I/O error
/// whose inner error names the GPA; a range past the region is invalid.
fn to_vm_memory(error: Error, gpa: Gpa) -> GuestMemoryError {
    match error {
        Error::OutsideRam { .. } => GuestMemoryError::InvalidGuestAddress(gpa.into()),
        error => GuestMemoryError::IOError(error.into()),
    }
}

/// The host address of the `len` shared bytes at `offset` of the view's
/// region `index`, held for the view's life; vm-memory's error otherwise.
fn map_shared(
    index: usize,
    holds: &Holds,
    offset: MemoryRegionAddress,
    len: usize,
) -> vm_memory::guest_memory::Result<*mut u8> {
    let region = &holds.regions[index];
    let gpa = region.gpa.0.saturating_add(offset.0);
    let memory = &holds.memory;
    holds
        .with(gpa..gpa.saturating_add(len as u64), || memory.map_shared(region, offset.0, len))
        .map_err(|e| to_vm_memory(e, Gpa(gpa)))
}

impl GuestMemoryRegion for SharedRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        match &self.0 {
            Kind::Private { index, holds } => holds.regions[*index].size,
            Kind::Plain(region) => region.len(),
        }
    }

    fn start_addr(&self) -> GuestAddress {
        match &self.0 {
            Kind::Private { index, holds } => holds.regions[*index].gpa.into(),
            Kind::Plain(region) => region.start_addr(),
        }
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    /// The host address of a shared page (valid while the view lives); an
    /// error for a private one.
    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        match &self.0 {
            Kind::Private { index, holds } => map_shared(*index, holds, addr, 1),
            Kind::Plain(region) => region.get_host_address(addr),
        }
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let (index, holds) = match &self.0 {
            Kind::Private { index, holds } => (*index, holds),
            Kind::Plain(region) => return region.get_slice(offset, count),
        };
        let host = map_shared(index, holds, offset, count)?;
        // SAFETY: `host` points at `count` bytes of the region's host view,
        // all shared and mapped (map_shared checked them); the view's hold
        // on their range keeps them so until the view is dropped, and the
        // slice borrows the view. Guest and host reach the pages only
        // through volatile accesses (KVM, vm-memory).
        Ok(unsafe { VolatileSlice::new(host, count) })
    }
}

impl GuestMemoryRegionBytes for SharedRegion {}

/// The handle a device thread keeps: guest memory as a vm-memory
/// [`GuestAddressSpace`], whose [`memory()`](GuestAddressSpace::memory) is
/// a fresh [`SharedView`] (see the module docs).
#[derive(Clone, Debug)]
pub struct DeviceMemory {
    memory: Arc<PrivateMemory>,
    /// Ordinary regions the VMM added, shared by every clone.
    plain: Arc<RwLock<Vec<Arc<GuestRegionMmap<()>>>>>,
}

impl DeviceMemory {
    /// A handle on `memory` for devices.
    pub fn new(memory: &Arc<PrivateMemory>) -> Self {
        Self { memory: memory.clone(), plain: Arc::default() }
    }

    /// Adds an ordinary vm-memory region (firmware, a shared swiotlb pool,
    /// pmem: memory the VMM registers with KVM itself) to every view of
    /// this handle and its clones, from the next
    /// [`memory()`](GuestAddressSpace::memory) on. `EEXIST` where it
    /// overlaps a private region or another plain one.
    pub fn add_plain_region(&self, region: Arc<GuestRegionMmap<()>>) -> Result<()> {
        let mut plain = self.plain.write().unwrap_or_else(|p| p.into_inner());
        let span = region.start_addr().0..region.start_addr().0.saturating_add(region.len());
        let private =
            self.memory.regions().iter().map(|r| r.gpa.0..r.gpa.0 + r.size).collect::<Vec<_>>();
        let others = plain.iter().map(|r| r.start_addr().0..r.start_addr().0 + r.len());
        if let Some(taken) =
            private.into_iter().chain(others).find(|r| crate::access::overlaps(r, &span))
        {
            return Err(Error::Exists(format!(
                "plain region {:#x}..{:#x} overlaps guest memory at {:#x}..{:#x}",
                span.start, span.end, taken.start, taken.end
            )));
        }
        plain.push(region);
        Ok(())
    }

    /// Holds the shared pages of `[gpa, gpa + len)` for I/O until the pin
    /// is dropped, on any thread: conversions and punches of them are
    /// refused with [`Error::Pinned`] (`EAGAIN`) meanwhile. Waits for a
    /// change of the range under way (`EAGAIN` instead if this thread holds
    /// a view or copy); `EPERM` ([`Error::PrivatePage`]) if a page is
    /// private, `EINVAL` ([`Error::OutsideRam`]) for a byte outside RAM
    /// or an empty range.
    pub fn pin(&self, gpa: GuestAddress, len: usize) -> Result<PinnedRange> {
        let memory = &self.memory;
        if len == 0 {
            return Err(crate::memory::outside(gpa.into(), 0));
        }
        let span = gpa.0..gpa.0.saturating_add(len as u64);
        let hold = memory.gate.hold(span, true);
        let mut pin = PinnedRange { memory: memory.clone(), hold, parts: Vec::new() };
        for (region, offset, part) in memory.parts(gpa.into(), len as u64)? {
            let host = memory.map_shared(&region, offset, part as usize)?;
            pin.parts.push((region, host as usize, part as usize));
        }
        Ok(pin)
    }
}

impl GuestAddressSpace for DeviceMemory {
    type M = SharedView;
    type T = Rc<SharedView>;

    fn memory(&self) -> Rc<SharedView> {
        let plain = self.plain.read().unwrap_or_else(|p| p.into_inner());
        Rc::new(self.memory.view_with(&plain))
    }
}

/// Shared guest pages pinned for device I/O ([`DeviceMemory::pin`]);
/// released on drop, on any thread.
pub struct PinnedRange {
    memory: Arc<PrivateMemory>,
    hold: u64,
    /// Each region the range spans (kept mapped), with the host address
    /// and length of its part.
    parts: Vec<(Arc<PrivateRegion>, usize, usize)>,
}

impl std::fmt::Debug for PinnedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedRange").field("parts", &self.parts.len()).finish()
    }
}

impl PinnedRange {
    /// The pinned bytes, one slice per region they span, in GPA order:
    /// for copies, or as the buffers (`as_ptr`, `len`) of asynchronous
    /// I/O that ends before the pin is dropped.
    pub fn slices(&self) -> Vec<VolatileSlice<'_>> {
        self.parts
            .iter()
            // SAFETY: each part is `len` bytes of its region's host view,
            // checked shared and mapped when pinned; the pin keeps them so
            // (conversions and punches of them are refused) and keeps the
            // region, so its host view stays mapped; the slices borrow it.
            .map(|&(_, host, len)| unsafe { VolatileSlice::new(host as *mut u8, len) })
            .collect()
    }
}

impl Drop for PinnedRange {
    fn drop(&mut self) {
        self.memory.gate.release(self.hold);
    }
}

//! Guest memory served from private-memory files (the user-space backend).
//!
//! The VM binds itself as each file's owner and maps the file into a
//! KVM-only window (a memslot's `userspace_addr`) registered with
//! userfaultfd. The first guest access to a page makes KVM fault on the
//! window; the fault thread calls get-and-lock for a batch of pages around
//! it (fault-around), maps the ones not yet mapped with `UFFDIO_CONTINUE`
//! and drops the guard. A punch or truncate on the file calls
//! `GuestMemory`'s invalidation callback, which forgets the pages; the
//! kernel then frees them, unmapping them from the window, and KVM's MMU
//! notifier zaps its own mappings. The next access faults again and gets a
//! fresh zero page.
//!
//! Every page is also private or shared (all private at launch), one bit per
//! page. Shared pages stay in the same file, in place (where upstream
//! guest_memfd is heading), so no GPA is ever backed twice and no conversion
//! splits a VMA. The host reaches shared pages through a second window, the
//! *host view*, registered with a userfaultfd in SIGBUS mode: it holds only
//! pages that gmem put there after checking that they are shared, so a stale
//! host pointer to a page converted back to private faults instead of
//! reading private data. Converting a range, in either direction, punches
//! it from the file (freeing the memory, with invalidation): it reads zero
//! afterwards.
//!
//! Policy for guest accesses that do not match a page's state: a GPA has one
//! mapping in the guest, and an access always reaches the page's current
//! backing. A guest that touches a page it converted to shared sees the
//! shared content (what the host wrote, else zero); there is no implicit
//! conversion and no exit. Only host accesses are checked.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use gmem::{
    Binding, FileId, FileOffset, GuestOwner, OwnerWindow, PageIndex, PageRange, PrivateMemFile,
    PAGE_SIZE,
};

use crate::error::{Error, Result};
use crate::uffd::Userfaultfd;
use crate::Gpa;

/// Pages served per fault by default: 512 (2 MiB, the huge-page size).
/// `gmem bench` on this kind of host (first touch, ratio to plain KVM
/// memory, with sequential read-ahead): 0.15x for 1 page per fault, about
/// 1.07x for 64 and 1.15x for 512. The userfaultfd round trip is what
/// batching pays for; the cost is that a touch allocates up to 2 MiB of the
/// guest's RAM around it (`--fault-around` trades it back).
pub const DEFAULT_FAULT_AROUND_PAGES: u64 = 512;

/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`: the only attribute bit a conversion may carry.
pub const ATTRIBUTE_PRIVATE: u64 = kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE as u64;

/// One bit per page of a slot.
#[derive(Debug)]
struct PageBits(Box<[AtomicU64]>);

impl PageBits {
    fn new(pages: u64) -> Self {
        Self((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn get(&self, page: u64) -> bool {
        self.0[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn set(&self, pages: Range<u64>, value: bool) {
        let mut page = pages.start;
        while page < pages.end {
            // Whole words at once where the range covers them.
            let bits = (64 - page % 64).min(pages.end - page);
            let mask = if bits == 64 { u64::MAX } else { ((1 << bits) - 1) << (page % 64) };
            let word = &self.0[(page / 64) as usize];
            if value {
                word.fetch_or(mask, Ordering::AcqRel);
            } else {
                word.fetch_and(!mask, Ordering::AcqRel);
            }
            page += bits;
        }
    }

    /// Maximal runs inside `pages` whose bits are `value`.
    fn runs(&self, pages: Range<u64>, value: bool) -> Vec<Range<u64>> {
        let mut runs = Vec::new();
        let mut start = None;
        for page in pages.start..=pages.end {
            let hit = page < pages.end && self.get(page) == value;
            match (hit, start) {
                (true, None) => start = Some(page),
                (false, Some(first)) => {
                    runs.push(first..page);
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.0)
    }
}

/// A private memslot: guest physical range ↔ file range, through the owner window.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) id: u32,
    pub(crate) gpa: Gpa,
    pub(crate) size: u64,
    pub(crate) file_offset: u64,
    pub(crate) file_id: FileId,
    pub(crate) binding: Binding,
    pub(crate) window: OwnerWindow,
    /// Pages mapped in `window` (KVM's view).
    mapped: PageBits,
    /// Pages that are shared (clear: private).
    shared: PageBits,
    /// The host's view of shared pages (SIGBUS on anything not put there).
    host_view: OwnerWindow,
    /// Pages mapped in `host_view`.
    host_mapped: PageBits,
    /// Conversions take it for writing; host accesses for reading, so that
    /// a page's state cannot change while the host touches it.
    states: RwLock<()>,
    /// End (slot page) of the batch served last, for sequential read-ahead.
    last_batch_end: AtomicU64,
}

impl Slot {
    fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    fn window_addr(&self) -> u64 {
        self.window.as_ptr() as u64
    }

    /// Slot pages of `[gpa, gpa + len)`, which the slot contains.
    fn pages_of(&self, gpa: Gpa, len: u64) -> Range<u64> {
        let start = (gpa.0 - self.gpa.0) / PAGE_SIZE;
        start..(gpa.0 - self.gpa.0 + len).div_ceil(PAGE_SIZE)
    }

    pub(crate) fn read_states(&self) -> RwLockReadGuard<'_, ()> {
        self.states.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_states(&self) -> RwLockWriteGuard<'_, ()> {
        self.states.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of per-page metadata (the three bitmaps).
    fn metadata_bytes(&self) -> usize {
        self.mapped.heap_bytes() + self.shared.heap_bytes() + self.host_mapped.heap_bytes()
    }

    /// File pages of the slot-relative pages `pages`.
    fn file_pages(&self, pages: &Range<u64>) -> PageRange {
        let first = self.file_offset / PAGE_SIZE;
        PageRange::new(PageIndex(first + pages.start), PageIndex(first + pages.end))
    }

    pub(crate) fn contains(&self, gpa: Gpa) -> bool {
        gpa.0 >= self.gpa.0 && gpa.0 - self.gpa.0 < self.size
    }

    /// File offset of `gpa`, which the slot contains.
    pub(crate) fn offset_of(&self, gpa: Gpa) -> FileOffset {
        FileOffset(self.file_offset + (gpa.0 - self.gpa.0))
    }
}

/// Counters of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Pages mapped into the guest by the fault thread.
    pub pages_served: u64,
    /// Faults handled (each serves up to a fault-around batch).
    pub faults: u64,
    /// Invalidation callbacks received from the files.
    pub invalidations: u64,
    /// Pages those callbacks covered.
    pub invalidated_pages: u64,
    /// Conversion requests carried out.
    pub conversions: u64,
    /// Pages whose state those conversions changed.
    pub converted_pages: u64,
    /// Host accesses refused because a page is private.
    pub host_denials: u64,
    /// Bytes of per-page metadata (states and mapping bitmaps) of all slots.
    pub metadata_bytes: u64,
    /// Pages of guest RAM in all slots.
    pub pages: u64,
}

#[derive(Default)]
struct Counters {
    pages_served: AtomicU64,
    faults: AtomicU64,
    invalidations: AtomicU64,
    invalidated_pages: AtomicU64,
    conversions: AtomicU64,
    converted_pages: AtomicU64,
    host_denials: AtomicU64,
}

/// The guest memory of one VM, and the owner of its files.
pub(crate) struct GuestMemory {
    slots: RwLock<Vec<Arc<Slot>>>,
    uffd: Userfaultfd,
    /// Registered on every slot's host view: SIGBUS, never an event.
    host_uffd: Userfaultfd,
    fault_around: u64,
    counters: Counters,
}

impl GuestOwner for GuestMemory {
    fn invalidate_page_range(&self, file: FileId, pages: PageRange) {
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        self.counters.invalidated_pages.fetch_add(pages.len(), Ordering::Relaxed);
        for slot in self.slots().iter().filter(|s| s.file_id == file) {
            let first = slot.file_offset / PAGE_SIZE;
            let start = pages.start.0.max(first);
            let end = pages.end.0.min(first + slot.pages());
            if start < end {
                // The kernel unmaps the pages from the window when it frees
                // them, right after this returns; forget them now, while
                // their locks keep the fault thread off.
                slot.mapped.set(start - first..end - first, false);
                slot.host_mapped.set(start - first..end - first, false);
            }
        }
    }
}

impl GuestMemory {
    pub(crate) fn new(fault_around: u64) -> Result<Self> {
        if fault_around == 0 || !fault_around.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "fault-around must be a power of two of pages, not {fault_around}"
            )));
        }
        Ok(Self {
            slots: RwLock::new(Vec::new()),
            uffd: Userfaultfd::new()?,
            host_uffd: Userfaultfd::new_sigbus()?,
            fault_around,
            counters: Counters::default(),
        })
    }

    pub(crate) fn slots(&self) -> RwLockReadGuard<'_, Vec<Arc<Slot>>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn uffd(&self) -> &Userfaultfd {
        &self.uffd
    }

    /// Binds `file` to `owner` (this memory), maps `[offset, offset + size)`
    /// of it as a window and registers the window for fault serving.
    /// `EINVAL` for unaligned or empty ranges and for a file range already
    /// bound (as guest_memfd), `EEXIST` for a GPA range that overlaps a slot,
    /// `EPERM` for a file bound to another VM.
    pub(crate) fn add_slot(
        owner: &Arc<Self>,
        id: u32,
        gpa: Gpa,
        file: &Arc<PrivateMemFile>,
        offset: FileOffset,
        size: u64,
    ) -> Result<Arc<Slot>> {
        if gpa.0 % PAGE_SIZE != 0 || offset.0 % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || size == 0
        {
            return Err(Error::InvalidArgument(format!(
                "memslot gpa {:#x}, offset {:#x}, size {:#x}: must be page-aligned and non-empty",
                gpa.0, offset.0, size
            )));
        }
        let gpa_end = gpa
            .0
            .checked_add(size)
            .ok_or_else(|| Error::InvalidArgument("memslot wraps".into()))?;
        for slot in owner.slots().iter() {
            if gpa.0 < slot.gpa.0 + slot.size && slot.gpa.0 < gpa_end {
                return Err(Error::Exists(format!(
                    "memslot {:#x}..{:#x} overlaps slot {} at {:#x}..{:#x}",
                    gpa.0,
                    gpa_end,
                    slot.id,
                    slot.gpa.0,
                    slot.gpa.0 + slot.size
                )));
            }
            if slot.file_id == file.id()
                && offset.0 < slot.file_offset + slot.size
                && slot.file_offset < offset.0 + size
            {
                // EINVAL, not EEXIST: what the kernel's guest_memfd returns.
                return Err(Error::InvalidArgument(format!(
                    "file range {:#x}..{:#x} is already bound to slot {}",
                    offset.0,
                    offset.0 + size,
                    slot.id
                )));
            }
        }
        let binding = file.bind(owner)?;
        let window = binding.map_window(offset, size)?;
        owner.uffd.register(window.as_ptr() as u64, size)?;
        let host_view = binding.map_window(offset, size)?;
        owner.host_uffd.register(host_view.as_ptr() as u64, size)?;
        let slot = Arc::new(Slot {
            id,
            gpa,
            size,
            file_offset: offset.0,
            file_id: file.id(),
            binding,
            window,
            mapped: PageBits::new(size / PAGE_SIZE),
            shared: PageBits::new(size / PAGE_SIZE),
            host_view,
            host_mapped: PageBits::new(size / PAGE_SIZE),
            states: RwLock::new(()),
            last_batch_end: AtomicU64::new(u64::MAX),
        });
        owner.slots.write().unwrap_or_else(|p| p.into_inner()).push(slot.clone());
        Ok(slot)
    }

    /// Serves the fault at window address `addr`: get-and-lock a batch of
    /// pages around it, map the unmapped ones, unlock. When the fault lands
    /// right after the batch served before (a sequential toucher), the next
    /// batch is mapped too, while the woken vCPU already runs (read-ahead).
    pub(crate) fn serve(&self, addr: u64) -> Result<()> {
        let slot = self
            .slots()
            .iter()
            .find(|s| addr >= s.window_addr() && addr < s.window_addr() + s.size)
            .cloned()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("fault at {addr:#x} outside every window"))
            })?;
        let page = (addr - slot.window_addr()) / PAGE_SIZE;
        let start = page & !(self.fault_around - 1);
        let served = self.serve_batch(&slot, start)?;
        if served == 0 {
            // Another fault mapped the page first; wake whoever waits on it.
            self.uffd.wake(slot.window_addr() + page * PAGE_SIZE, PAGE_SIZE)?;
        }
        let next = start + self.fault_around;
        if slot.last_batch_end.swap(next, Ordering::Relaxed) == start && next < slot.pages() {
            self.serve_batch(&slot, next)?;
            slot.last_batch_end.store(next + self.fault_around, Ordering::Relaxed);
        }
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Maps the unmapped pages of the batch starting at slot page `start`;
    /// returns how many it mapped.
    fn serve_batch(&self, slot: &Slot, start: u64) -> Result<u64> {
        let batch = start..(start + self.fault_around).min(slot.pages());
        let guard = slot.binding.get_and_lock_range(slot.file_pages(&batch))?;
        let mut served = 0;
        let mut run_start = None;
        for p in batch.start..=batch.end {
            let unmapped = p < batch.end && !slot.mapped.get(p);
            match (unmapped, run_start) {
                (true, None) => run_start = Some(p),
                (false, Some(first)) => {
                    served += self.map_run(slot, first..p)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        drop(guard);
        self.counters.pages_served.fetch_add(served, Ordering::Relaxed);
        Ok(served)
    }

    /// Maps the slot pages `run` (locked by the caller) into the window,
    /// skipping pages the kernel already has mapped. Returns pages mapped.
    fn map_run(&self, slot: &Slot, run: Range<u64>) -> Result<u64> {
        let addr = slot.window_addr() + run.start * PAGE_SIZE;
        let mapped = self.uffd.continue_range(addr, (run.end - run.start) * PAGE_SIZE)?;
        slot.mapped.set(run, true);
        Ok(mapped / PAGE_SIZE)
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        MemoryStats {
            pages_served: self.counters.pages_served.load(Ordering::Relaxed),
            faults: self.counters.faults.load(Ordering::Relaxed),
            invalidations: self.counters.invalidations.load(Ordering::Relaxed),
            invalidated_pages: self.counters.invalidated_pages.load(Ordering::Relaxed),
            conversions: self.counters.conversions.load(Ordering::Relaxed),
            converted_pages: self.counters.converted_pages.load(Ordering::Relaxed),
            host_denials: self.counters.host_denials.load(Ordering::Relaxed),
            metadata_bytes: self.slots().iter().map(|s| s.metadata_bytes() as u64).sum(),
            pages: self.slots().iter().map(|s| s.pages()).sum(),
        }
    }

    /// The slot holding `gpa`.
    pub(crate) fn slot_of(&self, gpa: Gpa) -> Option<Arc<Slot>> {
        self.slots().iter().find(|s| s.contains(gpa)).cloned()
    }

    /// The slot holding all of `[gpa, gpa + len)`; `EINVAL` if none does.
    pub(crate) fn slot_holding(&self, gpa: Gpa, len: u64) -> Result<Arc<Slot>> {
        self.slot_of(gpa)
            .filter(|s| len <= s.size - (gpa.0 - s.gpa.0))
            .ok_or_else(|| outside(gpa, len))
    }
}

impl GuestMemory {
    /// Slots covering `[gpa, gpa + len)` without a gap, in GPA order, each
    /// with the slot pages of the range; `EINVAL` where RAM has a hole.
    fn slots_covering(&self, gpa: Gpa, len: u64) -> Result<Vec<(Arc<Slot>, Range<u64>)>> {
        let end = gpa.0.checked_add(len).ok_or_else(|| outside(gpa, len))?;
        let mut covering = Vec::new();
        let mut at = gpa.0;
        while at < end {
            let slot = self.slot_of(Gpa(at)).ok_or_else(|| outside(gpa, len))?;
            let upto = end.min(slot.gpa.0 + slot.size);
            covering.push((slot.clone(), slot.pages_of(Gpa(at), upto - at)));
            at = upto;
        }
        Ok(covering)
    }

    /// Converts `[gpa, gpa + size)` to shared (`attributes` 0) or private
    /// ([`ATTRIBUTE_PRIVATE`]), whole or not at all: `EINVAL` for an
    /// unaligned or empty range, one outside guest RAM, or unknown attribute
    /// bits. Pages whose state changes are discarded (see
    /// [`discard`](Self::discard)) and read zero afterwards; pages already
    /// in that state keep their content. Returns how many pages changed state.
    pub(crate) fn convert(&self, gpa: Gpa, size: u64, attributes: u64) -> Result<u64> {
        if attributes & !ATTRIBUTE_PRIVATE != 0 {
            return Err(Error::InvalidArgument(format!(
                "conversion: unknown attribute bits {:#x}",
                attributes & !ATTRIBUTE_PRIVATE
            )));
        }
        if size == 0 || gpa.0 % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
            return Err(Error::InvalidArgument(format!(
                "conversion of {:#x}+{size:#x}: must be page-aligned and non-empty",
                gpa.0
            )));
        }
        let shared = attributes == 0;
        let covering = self.slots_covering(gpa, size)?;
        // In GPA order, as every taker of several of these locks does.
        let _states: Vec<_> = covering.iter().map(|(slot, _)| slot.write_states()).collect();
        let mut changed = 0;
        for (slot, pages) in &covering {
            for run in slot.shared.runs(pages.clone(), !shared) {
                self.discard(slot, run.clone())?;
                slot.shared.set(run.clone(), shared);
                changed += run.end - run.start;
            }
        }
        self.counters.conversions.fetch_add(1, Ordering::Relaxed);
        self.counters.converted_pages.fetch_add(changed, Ordering::Relaxed);
        Ok(changed)
    }

    /// Discards slot pages `run`, whose state is changing (the caller holds
    /// the slot's states for writing): a punch, with invalidation.
    fn discard(&self, slot: &Slot, run: Range<u64>) -> Result<()> {
        // The kernel unmaps the pages from every window, the host view
        // included; the invalidation callback forgets them.
        let bytes = slot.file_pages(&run).bytes();
        slot.binding.file().fallocate(
            gmem::Fallocate::PunchHole,
            FileOffset(bytes.start),
            bytes.end - bytes.start,
        )?;
        Ok(())
    }

    /// Runs `access` on the host address of `[gpa, gpa + len)` if every page
    /// of it is shared, with the pages locked and mapped in the host view;
    /// `EPERM` naming the first private page otherwise, `EINVAL` for a
    /// range that is not inside one slot.
    pub(crate) fn host_access<T>(
        &self,
        gpa: Gpa,
        len: u64,
        access: impl FnOnce(*mut u8) -> T,
    ) -> Result<T> {
        let slot = self.slot_holding(gpa, len)?;
        if len == 0 {
            return Ok(access(std::ptr::null_mut()));
        }
        let pages = slot.pages_of(gpa, len);
        let _states = slot.read_states();
        self.check_shared(&slot, pages.clone())?;
        let _locked = slot.binding.get_and_lock_range(slot.file_pages(&pages))?;
        self.map_locked(&slot, pages)?;
        Ok(access(slot.host_view.as_ptr().wrapping_add((gpa.0 - slot.gpa.0) as usize)))
    }

    /// `EPERM` naming the first private page of `pages`, counted as a denial.
    pub(crate) fn check_shared(&self, slot: &Slot, pages: Range<u64>) -> Result<()> {
        match slot.shared.runs(pages, false).first() {
            None => Ok(()),
            Some(private) => {
                self.counters.host_denials.fetch_add(1, Ordering::Relaxed);
                Err(Error::NotPermitted(format!(
                    "GPA {:#x} is private: the host may not access it",
                    slot.gpa.0 + private.start * PAGE_SIZE
                )))
            }
        }
    }

    /// Maps the shared slot `pages` into the host view, allocating them
    /// where needed; returns their host address. The caller holds the
    /// slot's states (read) so that they stay shared.
    pub(crate) fn map_host_view(&self, slot: &Slot, pages: Range<u64>) -> Result<*mut u8> {
        if !slot.host_mapped.runs(pages.clone(), false).is_empty() {
            let _locked = slot.binding.get_and_lock_range(slot.file_pages(&pages))?;
            self.map_locked(slot, pages.clone())?;
        }
        Ok(slot.host_view.as_ptr().wrapping_add((pages.start * PAGE_SIZE) as usize))
    }

    /// Maps the unmapped `pages` (locked by the caller) into the host view.
    fn map_locked(&self, slot: &Slot, pages: Range<u64>) -> Result<()> {
        for run in slot.host_mapped.runs(pages, false) {
            let addr = slot.host_view.as_ptr() as u64 + run.start * PAGE_SIZE;
            self.host_uffd.continue_range(addr, (run.end - run.start) * PAGE_SIZE)?;
            slot.host_mapped.set(run, true);
        }
        Ok(())
    }
}

fn outside(gpa: Gpa, len: u64) -> Error {
    Error::InvalidArgument(format!(
        "{:#x}..{:#x} is not inside guest RAM (one memslot)",
        gpa.0,
        gpa.0.saturating_add(len)
    ))
}

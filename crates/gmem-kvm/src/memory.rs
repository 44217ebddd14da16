//! Guest memory served from private-memory files (the user-space backend).
//!
//! The VM binds itself as each file's owner and maps the file into a
//! KVM-only window (a memslot's `userspace_addr`) registered with
//! userfaultfd. The first guest access to a page makes KVM fault on the
//! window; the fault thread calls get-and-lock for a batch of pages around
//! it (fault-around), maps the ones not yet mapped with `UFFDIO_CONTINUE`
//! and drops the guard. A punch or truncate on the file calls
//! [`GuestMemory`]'s invalidation callback, which forgets the pages; the
//! kernel then frees them, unmapping them from the window, and KVM's MMU
//! notifier zaps its own mappings. The next access faults again and gets a
//! fresh zero page.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

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

/// One bit per page of a slot: mapped in the window or not.
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
        for page in pages {
            let bit = 1 << (page % 64);
            let word = &self.0[(page / 64) as usize];
            if value {
                word.fetch_or(bit, Ordering::AcqRel);
            } else {
                word.fetch_and(!bit, Ordering::AcqRel);
            }
        }
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
    mapped: PageBits,
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
}

#[derive(Default)]
struct Counters {
    pages_served: AtomicU64,
    faults: AtomicU64,
    invalidations: AtomicU64,
    invalidated_pages: AtomicU64,
}

/// The guest memory of one VM, and the owner of its files.
pub(crate) struct GuestMemory {
    slots: RwLock<Vec<Arc<Slot>>>,
    uffd: Userfaultfd,
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
        let slot = Arc::new(Slot {
            id,
            gpa,
            size,
            file_offset: offset.0,
            file_id: file.id(),
            binding,
            window,
            mapped: PageBits::new(size / PAGE_SIZE),
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
        let base = slot.window_addr();
        let mut next = run.start;
        let mut served = 0;
        while next < run.end {
            let len = (run.end - next) * PAGE_SIZE;
            match self.uffd.continue_range(base + next * PAGE_SIZE, len) {
                Ok(()) => {
                    served += run.end - next;
                    next = run.end;
                }
                // Part of the run was mapped, up to an already-mapped page.
                Err(e) if e.errno == gmem::Errno::AGAIN && e.mapped > 0 => {
                    served += e.mapped / PAGE_SIZE;
                    next += e.mapped / PAGE_SIZE;
                }
                // The first page is already mapped: skip it.
                Err(e) if e.errno == gmem::Errno::EXIST => next += 1,
                Err(e) => return Err(Error::Os { op: "UFFDIO_CONTINUE", errno: e.errno }),
            }
        }
        slot.mapped.set(run, true);
        Ok(served)
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        MemoryStats {
            pages_served: self.counters.pages_served.load(Ordering::Relaxed),
            faults: self.counters.faults.load(Ordering::Relaxed),
            invalidations: self.counters.invalidations.load(Ordering::Relaxed),
            invalidated_pages: self.counters.invalidated_pages.load(Ordering::Relaxed),
        }
    }

    /// The slot holding `gpa`.
    pub(crate) fn slot_of(&self, gpa: Gpa) -> Option<Arc<Slot>> {
        self.slots().iter().find(|s| s.contains(gpa)).cloned()
    }
}

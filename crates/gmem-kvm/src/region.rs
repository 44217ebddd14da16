//! A private region: a range of guest physical memory that appears as a
//! KVM memslot, with its per-page states, backed either by a gmem
//! private-memory file (the user-space backend) or by the kernel's own
//! guest_memfd (the native backend).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gmem::{
    Binding, FileId, FileOffset, OwnerWindow, PageIndex, PageRange, PrivateMemFile, PAGE_SIZE,
};

use crate::bits::PageBits;
use crate::first_touch::FirstTouch;
use crate::native::{GuestMemfd, GuestMemfdMap};
use crate::Gpa;

/// What a VMM asks for: `size` bytes of `file` at `file_offset` appear to
/// the guest at `gpa`, as KVM memslot `slot` (the VMM's own numbering).
#[derive(Debug, Clone)]
pub struct RegionSpec {
    /// The KVM memslot id.
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub gpa: Gpa,
    /// The GUEST-sealed file that backs the region.
    pub file: Arc<PrivateMemFile>,
    /// Offset in the file of the first byte.
    pub file_offset: FileOffset,
    /// Size in bytes (page-aligned, non-zero).
    pub size: u64,
}

/// Private or shared: what the host may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Only the guest can use the page (every page starts so).
    Private,
    /// The host may read and write the page (device I/O).
    Shared,
}

/// Which backend a region uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// A GUEST-sealed gmem file served through userfaultfd.
    Userspace,
    /// The kernel's guest_memfd, mapped as the memslot's memory.
    Native,
}

/// A region's memory: a gmem file and its windows, or a guest_memfd.
pub(crate) enum Backing {
    File(Box<FileBacking>),
    GuestMemfd(NativeBacking),
}

/// A range of a gmem file, with KVM's window (registered with userfaultfd)
/// and the host view (userfaultfd SIGBUS mode: only pages put there).
pub(crate) struct FileBacking {
    pub(crate) file_offset: u64,
    pub(crate) file_id: FileId,
    pub(crate) binding: Binding,
    /// Declared (so dropped) before `window`: where the VMM has let go of
    /// the file, the locked window then holds its last reference, and its
    /// pages need not be locked in the frame window as it goes (they go
    /// with the file).
    pub(crate) host_view: OwnerWindow,
    /// Pages mapped in `host_view`.
    pub(crate) host_mapped: PageBits,
    pub(crate) window: OwnerWindow,
    /// Pages mapped in `window` (KVM's view).
    pub(crate) mapped: PageBits,
    /// Where recent faults' batches ended: a fault there is sequential.
    pub(crate) streams: Streams,
    /// Whether gmem or the kernel serves first touches.
    pub(crate) first_touch: FirstTouch,
}

/// Where recent faults' batches ended, and how long they were: one slot
/// each for up to [`Streams::SLOTS`] interleaved sequential touchers
/// (vCPUs). A fault that continues a stream moves that stream's slot on;
/// any other fault starts a stream in the next slot round the table, which
/// forgets the stream that was there. A slot packs `end << 4 | log2(len)`;
/// 0 is empty.
#[derive(Debug)]
pub(crate) struct Streams {
    ends: [AtomicU64; Streams::SLOTS],
    next: AtomicU64,
}

impl Default for Streams {
    fn default() -> Self {
        Self { ends: [const { AtomicU64::new(0) }; Self::SLOTS], next: AtomicU64::new(0) }
    }
}

/// A recent batch that a fault continues: its stream's slot and length.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stream {
    slot: usize,
    pub(crate) len: u64,
}

impl Streams {
    /// As many as the vCPUs that may touch one region in step: a table
    /// of 16, with every fault taking the next slot, lost the streams of
    /// 16 vCPUs touching 256 MiB (4868 faults where 8 vCPUs took 421) and
    /// handed 32 vCPUs' dense first touches to the kernel.
    const SLOTS: usize = 64;

    /// The recent batch that a fault at `page` continues.
    pub(crate) fn continues(&self, page: u64) -> Option<Stream> {
        self.ends.iter().enumerate().find_map(|(slot, packed)| {
            let packed = packed.load(Ordering::Relaxed);
            (packed != 0 && packed >> 4 == page).then(|| Stream { slot, len: 1 << (packed & 15) })
        })
    }

    /// Records that a fault's batch of `len` pages (a power of two) ended
    /// before `end`: in the slot of the stream it `continued`, or else in
    /// a new one.
    pub(crate) fn record(&self, continued: Option<Stream>, end: u64, len: u64) {
        let slot = continued.map_or_else(
            || self.next.fetch_add(1, Ordering::Relaxed) as usize % Self::SLOTS,
            |stream| stream.slot,
        );
        self.ends[slot].store(end << 4 | u64::from(len.trailing_zeros()), Ordering::Relaxed);
    }
}

/// A guest_memfd of its own, and its one mapping: the memslot's memory,
/// through which the host reaches shared pages too.
pub(crate) struct NativeBacking {
    pub(crate) memfd: GuestMemfd,
    pub(crate) map: GuestMemfdMap,
}

/// A registered region: a memslot whose pages are private or shared.
pub struct PrivateRegion {
    pub(crate) slot: u32,
    pub(crate) gpa: Gpa,
    pub(crate) size: u64,
    /// Pages that are shared (clear: private).
    pub(crate) shared: PageBits,
    /// Pages changed since the last snapshot (punched, converted, or
    /// written by the guest as KVM's dirty log said): see
    /// [`crate::snapshot`].
    changed: PageBits,
    pub(crate) backing: Backing,
}

impl std::fmt::Debug for PrivateRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateRegion")
            .field("slot", &self.slot)
            .field("gpa", &self.gpa)
            .field("size", &self.size)
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl PrivateRegion {
    /// A region of `size` bytes at `gpa` in memslot `slot`, every page
    /// private.
    pub(crate) fn new(slot: u32, gpa: Gpa, size: u64, backing: Backing) -> Arc<Self> {
        let pages = size / PAGE_SIZE;
        Arc::new(Self {
            slot,
            gpa,
            size,
            shared: PageBits::new(pages),
            changed: PageBits::new(pages),
            backing,
        })
    }

    /// The KVM memslot id.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Guest physical address of the first byte.
    pub fn gpa(&self) -> Gpa {
        self.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Which backend serves the region.
    pub fn backend(&self) -> BackendKind {
        match self.backing {
            Backing::File(_) => BackendKind::Userspace,
            Backing::GuestMemfd(_) => BackendKind::Native,
        }
    }

    /// The backing gmem file (user-space backend only).
    pub fn file(&self) -> Option<&Arc<PrivateMemFile>> {
        self.file_backing().map(|f| f.binding.file())
    }

    /// Offset in the gmem file of the region's first byte (0 for a
    /// guest_memfd region, which has a file of its own).
    pub fn file_offset(&self) -> FileOffset {
        FileOffset(self.file_backing().map_or(0, |f| f.file_offset))
    }

    /// The memslot's `userspace_addr`: KVM's window of a gmem file, or the
    /// guest_memfd mapping. Only KVM may touch it; it is here for VMMs
    /// that log or compare memslots.
    pub fn userspace_addr(&self) -> u64 {
        match &self.backing {
            Backing::File(f) => f.window.as_ptr() as u64,
            Backing::GuestMemfd(n) => n.map.addr() as u64,
        }
    }

    /// The region as KVM's memslot, with `flags`.
    pub(crate) fn memslot(&self, flags: u32) -> kvm_bindings::kvm_userspace_memory_region {
        kvm_bindings::kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.gpa.0,
            memory_size: self.size,
            userspace_addr: self.userspace_addr(),
        }
    }

    /// Whether `gpa` lies in the region.
    pub fn contains(&self, gpa: Gpa) -> bool {
        gpa.0 >= self.gpa.0 && gpa.0 - self.gpa.0 < self.size
    }

    /// The state of the page holding `gpa`, if the region holds it.
    pub fn page_state(&self, gpa: Gpa) -> Option<PageState> {
        self.contains(gpa).then(|| {
            if self.shared.get((gpa.0 - self.gpa.0) / PAGE_SIZE) {
                PageState::Shared
            } else {
                PageState::Private
            }
        })
    }

    pub(crate) fn file_backing(&self) -> Option<&FileBacking> {
        match &self.backing {
            Backing::File(f) => Some(f),
            Backing::GuestMemfd(_) => None,
        }
    }

    /// Records that region pages `pages` changed since the last snapshot.
    pub(crate) fn mark_changed(&self, pages: Range<u64>) {
        self.changed.set(pages, true);
    }

    /// Runs of pages changed since the last snapshot, taken: they are
    /// unchanged from here on, word by word atomically (a change marked
    /// meanwhile is in the runs or stays marked).
    pub(crate) fn take_changed(&self) -> Vec<Range<u64>> {
        self.changed.take_runs(self.pages())
    }

    /// How many pages changed since the last snapshot.
    pub(crate) fn changed_count(&self) -> u64 {
        self.changed.count()
    }

    /// Forgets the changes: a snapshot holds them now.
    pub(crate) fn clear_changed(&self) {
        self.changed.set(0..self.pages(), false);
    }

    pub(crate) fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Region pages of `[gpa, gpa + len)`, which the region contains.
    pub(crate) fn pages_of(&self, gpa: Gpa, len: u64) -> Range<u64> {
        let start = (gpa.0 - self.gpa.0) / PAGE_SIZE;
        start..(gpa.0 - self.gpa.0 + len).div_ceil(PAGE_SIZE)
    }

    /// Guest address of region page `page`.
    pub(crate) fn gpa_of(&self, page: u64) -> Gpa {
        Gpa(self.gpa.0 + page * PAGE_SIZE)
    }

    /// Bytes of per-page metadata (the state bitmap, and the mapping
    /// bitmaps of a gmem file).
    pub(crate) fn metadata_bytes(&self) -> usize {
        self.shared.heap_bytes()
            + self.changed.heap_bytes()
            + self.file_backing().map_or(0, |f| f.mapped.heap_bytes() + f.host_mapped.heap_bytes())
    }
}

impl FileBacking {
    pub(crate) fn window_addr(&self) -> u64 {
        self.window.as_ptr() as u64
    }

    /// File pages of the region pages `pages`.
    pub(crate) fn file_pages(&self, pages: &Range<u64>) -> PageRange {
        let first = self.file_offset / PAGE_SIZE;
        PageRange::new(PageIndex(first + pages.start), PageIndex(first + pages.end))
    }

    /// Region pages of the file pages `pages`, clipped to a region of
    /// `region_pages` pages.
    pub(crate) fn region_pages(&self, pages: PageRange, region_pages: u64) -> Option<Range<u64>> {
        let first = self.file_offset / PAGE_SIZE;
        let start = pages.start.0.max(first);
        let end = pages.end.0.min(first + region_pages);
        (start < end).then(|| start - first..end - first)
    }
}

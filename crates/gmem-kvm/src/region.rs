//! A private region: a range of one private-memory file that appears as a
//! KVM memslot, with its windows and per-page states.

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use gmem::{
    Binding, FileId, FileOffset, OwnerWindow, PageIndex, PageRange, PrivateMemFile, PAGE_SIZE,
};

use crate::bits::PageBits;
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

/// A registered region: a memslot served from a private-memory file.
///
/// Its KVM window (the memslot's `userspace_addr`) is a mapping of the file
/// that only KVM touches; its host view is a second mapping, in userfaultfd
/// SIGBUS mode, that holds only the shared pages the host asked for.
pub struct PrivateRegion {
    pub(crate) slot: u32,
    pub(crate) gpa: Gpa,
    pub(crate) size: u64,
    pub(crate) file_offset: u64,
    pub(crate) file_id: FileId,
    pub(crate) binding: Binding,
    pub(crate) window: OwnerWindow,
    /// Pages mapped in `window` (KVM's view).
    pub(crate) mapped: PageBits,
    /// Pages that are shared (clear: private).
    pub(crate) shared: PageBits,
    /// The host's view of shared pages (SIGBUS on anything not put there).
    pub(crate) host_view: OwnerWindow,
    /// Pages mapped in `host_view`.
    pub(crate) host_mapped: PageBits,
    /// End (region page) of the batch served last, for sequential read-ahead.
    pub(crate) last_batch_end: AtomicU64,
}

impl std::fmt::Debug for PrivateRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateRegion")
            .field("slot", &self.slot)
            .field("gpa", &self.gpa)
            .field("size", &self.size)
            .field("file_offset", &self.file_offset)
            .finish_non_exhaustive()
    }
}

impl PrivateRegion {
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

    /// The backing file.
    pub fn file(&self) -> &Arc<PrivateMemFile> {
        self.binding.file()
    }

    /// Offset in the file of the region's first byte.
    pub fn file_offset(&self) -> FileOffset {
        FileOffset(self.file_offset)
    }

    /// The memslot's `userspace_addr`: the KVM window. Only KVM may touch
    /// it; it is here for VMMs that log or compare memslots.
    pub fn userspace_addr(&self) -> u64 {
        self.window.as_ptr() as u64
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

    pub(crate) fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub(crate) fn window_addr(&self) -> u64 {
        self.window.as_ptr() as u64
    }

    /// Region pages of `[gpa, gpa + len)`, which the region contains.
    pub(crate) fn pages_of(&self, gpa: Gpa, len: u64) -> Range<u64> {
        let start = (gpa.0 - self.gpa.0) / PAGE_SIZE;
        start..(gpa.0 - self.gpa.0 + len).div_ceil(PAGE_SIZE)
    }

    /// File pages of the region pages `pages`.
    pub(crate) fn file_pages(&self, pages: &Range<u64>) -> PageRange {
        let first = self.file_offset / PAGE_SIZE;
        PageRange::new(PageIndex(first + pages.start), PageIndex(first + pages.end))
    }

    /// Region pages of the file pages `pages`, clipped to the region.
    pub(crate) fn region_pages(&self, pages: PageRange) -> Option<Range<u64>> {
        let first = self.file_offset / PAGE_SIZE;
        let start = pages.start.0.max(first);
        let end = pages.end.0.min(first + self.pages());
        (start < end).then(|| start - first..end - first)
    }

    /// Guest address of region page `page`.
    pub(crate) fn gpa_of(&self, page: u64) -> Gpa {
        Gpa(self.gpa.0 + page * PAGE_SIZE)
    }

    /// Bytes of per-page metadata (the three bitmaps).
    pub(crate) fn metadata_bytes(&self) -> usize {
        self.mapped.heap_bytes() + self.shared.heap_bytes() + self.host_mapped.heap_bytes()
    }
}

//! Newtypes for the units the file deals in, so that a page index is never
//! passed where a byte offset is expected.

use std::fmt;
use std::ops::Range;

/// Size of the pages the file is managed in (x86-64 base pages).
pub const PAGE_SIZE: u64 = 4096;

/// Index of a page in a private-memory file (byte offset / [`PAGE_SIZE`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

/// Byte offset in a private-memory file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileOffset(pub u64);

impl PageIndex {
    /// Byte offset of the first byte of this page.
    pub const fn offset(self) -> FileOffset {
        FileOffset(self.0 * PAGE_SIZE)
    }
}

impl FileOffset {
    /// Page that holds this byte.
    pub const fn page(self) -> PageIndex {
        PageIndex(self.0 / PAGE_SIZE)
    }

    /// Whether the offset is a multiple of [`PAGE_SIZE`].
    pub const fn is_page_aligned(self) -> bool {
        self.0 % PAGE_SIZE == 0
    }
}

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {:#x}", self.0)
    }
}

impl fmt::Display for FileOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offset {:#x}", self.0)
    }
}

/// A half-open run of pages, `start..end`.
///
/// The seed's `invalidate_page_range(start, end)` passed an inclusive end;
/// gmem uses Rust's half-open convention everywhere (`end` is not included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// First page of the run.
    pub start: PageIndex,
    /// One past the last page of the run.
    pub end: PageIndex,
}

impl PageRange {
    /// The pages `start..end`.
    pub const fn new(start: PageIndex, end: PageIndex) -> Self {
        Self { start, end }
    }

    /// The pages that hold the bytes `offset..offset + len` (rounded outwards).
    pub const fn covering(offset: u64, len: u64) -> Self {
        Self {
            start: PageIndex(offset / PAGE_SIZE),
            end: PageIndex((offset + len).div_ceil(PAGE_SIZE)),
        }
    }

    /// Number of pages in the run.
    pub const fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// Whether the run holds no page.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the two runs share a page.
    pub const fn overlaps(&self, other: &PageRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }

    /// Whether `page` is in the run.
    pub const fn contains(&self, page: PageIndex) -> bool {
        self.start.0 <= page.0 && page.0 < self.end.0
    }

    /// The run as byte offsets.
    pub const fn bytes(&self) -> Range<u64> {
        self.start.0 * PAGE_SIZE..self.end.0 * PAGE_SIZE
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pages {:#x}..{:#x}", self.start.0, self.end.0)
    }
}

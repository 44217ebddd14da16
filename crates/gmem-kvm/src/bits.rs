//! One bit per page, for a region's page states and mappings: 1 bit of
//! metadata per 4 KiB page, however sparse the guest.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// A bitmap with one bit per page of a region.
#[derive(Debug)]
pub(crate) struct PageBits(Box<[AtomicU64]>);

impl PageBits {
    pub(crate) fn new(pages: u64) -> Self {
        Self((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    pub(crate) fn get(&self, page: u64) -> bool {
        self.0[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    pub(crate) fn set(&self, pages: Range<u64>, value: bool) {
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
    pub(crate) fn runs(&self, pages: Range<u64>, value: bool) -> Vec<Range<u64>> {
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

    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.0)
    }
}

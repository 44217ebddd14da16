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

    /// The first page of `pages` whose bit is `value`, a word at a time.
    pub(crate) fn first(&self, pages: Range<u64>, value: bool) -> Option<u64> {
        let mut page = pages.start;
        while page < pages.end {
            let word = self.0[(page / 64) as usize].load(Ordering::Acquire);
            let word = (if value { word } else { !word }) >> (page % 64);
            if word != 0 {
                let found = page + u64::from(word.trailing_zeros());
                return (found < pages.end).then_some(found);
            }
            page += 64 - page % 64;
        }
        None
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

    /// Clears every bit, a word at a time atomically, and returns the
    /// maximal runs of pages (below `pages`) that were set.
    pub(crate) fn take_runs(&self, pages: u64) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for (index, word) in self.0.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            let first = index as u64 * 64;
            while bits != 0 {
                let (at, len) =
                    (bits.trailing_zeros(), (bits >> bits.trailing_zeros()).trailing_ones());
                let run = first + u64::from(at)..(first + u64::from(at + len)).min(pages);
                match runs.last_mut() {
                    Some(last) if last.end == run.start => last.end = run.end,
                    _ => runs.push(run),
                }
                bits &= if len == 64 { 0 } else { !(((1u64 << len) - 1) << at) };
            }
        }
        runs
    }

    /// How many bits are set, a word at a time (bits past the last page
    /// are never set).
    pub(crate) fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_runs_merge_across_words_and_clear() {
        let bits = PageBits::new(200);
        bits.set(3..5, true);
        bits.set(60..130, true);
        bits.set(199..200, true);
        assert_eq!(bits.take_runs(200), vec![3..5, 60..130, 199..200]);
        assert_eq!(bits.count(), 0);
        assert!(bits.take_runs(200).is_empty());
    }

    #[test]
    fn first_and_runs_agree_across_words() {
        let bits = PageBits::new(300);
        bits.set(3..5, true);
        bits.set(60..130, true);
        bits.set(299..300, true);
        for range in [0..300, 4..300, 5..60, 64..129, 129..131, 131..299, 200..200, 63..64] {
            for value in [false, true] {
                let expected = bits.runs(range.clone(), value).first().map(|r| r.start);
                assert_eq!(bits.first(range.clone(), value), expected, "{range:?} {value}");
            }
        }
        assert_eq!(bits.runs(0..300, true), vec![3..5, 60..130, 299..300]);
        assert_eq!(bits.count(), 2 + 70 + 1);
    }
}

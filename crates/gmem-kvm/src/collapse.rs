//! Making split 2 MiB pages huge again.
//!
//! A region on transparent huge pages is mapped by the kernel's own shmem
//! faults, which map a 2 MiB page with one PMD, so that KVM maps it huge.
//! A 4 KiB conversion discards 4 KiB (a hole punch), which splits that one
//! 2 MiB page into small ones: the other 511 pages keep their memory,
//! their content and their mappings, no GPA is backed twice, and the guest
//! runs on 4 KiB mappings there.
//!
//! When a conversion leaves such a range uniform again, it is made huge
//! again by `MADV_COLLAPSE`:
//!
//! - in the background, [`COLLAPSE_AFTER`] after the conversion that made
//!   it all private (a guest's I/O buffer going back and forth is left
//!   alone meanwhile), by whoever serves faults
//!   ([`PrivateMemory::serve_faults`], woken through
//!   [`fault_fd`](PrivateMemory::fault_fd)'s timer): an all-private range
//!   has no page in the host's view, so nothing waits on host accesses;
//! - when the VMM asks ([`PrivateMemory::collapse`]), for ranges all
//!   private or all shared (the host's view of shared pages is made anew,
//!   after the host accesses to the range have ended).
//!
//! A collapse allocates the range's holes (zero pages): its memory is
//! 2 MiB again.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gmem::{PageKind, HUGE_PAGE_SIZE, PAGE_SIZE};

use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::region::{Backing, PrivateRegion};
use crate::Gpa;

/// How long after the conversion that made a split range all private it
/// is collapsed in the background.
pub const COLLAPSE_AFTER: Duration = Duration::from_millis(20);

const SMALL_PAGES: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;

/// Split ranges waiting for their background collapse: a 2 MiB-aligned
/// GPA each, and when it is due.
#[derive(Debug, Default)]
pub(crate) struct Collapses {
    due: Mutex<Vec<(u64, Instant)>>,
    /// 2 MiB ranges made huge again.
    pub(crate) done: AtomicU64,
    /// Nanoseconds spent making them huge.
    pub(crate) nanos: AtomicU64,
}

impl Collapses {
    fn due(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Instant)>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Collapses the range at `gpa` after [`COLLAPSE_AFTER`] (from now,
    /// where it was waiting already).
    pub(crate) fn schedule(&self, gpa: u64) {
        let at = Instant::now() + COLLAPSE_AFTER;
        let mut due = self.due();
        match due.iter_mut().find(|(g, _)| *g == gpa) {
            Some(entry) => entry.1 = at,
            None => due.push((gpa, at)),
        }
    }

    /// Whether no range waits.
    pub(crate) fn is_idle(&self) -> bool {
        self.due().is_empty()
    }

    /// How long until the next range is due, if any waits.
    pub(crate) fn due_in(&self) -> Option<Duration> {
        let now = Instant::now();
        self.due().iter().map(|&(_, at)| at.saturating_duration_since(now)).min()
    }

    /// Takes the ranges that are due.
    fn take_due(&self) -> Vec<u64> {
        let now = Instant::now();
        let mut due = self.due();
        let (ready, waiting) = due.drain(..).partition(|&(_, at)| at <= now);
        *due = waiting;
        ready.into_iter().map(|(gpa, _)| gpa).collect::<Vec<_>>()
    }
}

/// Whether `region` is on transparent huge pages.
pub(crate) fn splits(region: &PrivateRegion) -> bool {
    region.file().is_some_and(|f| f.page_kind() == PageKind::TransparentHuge)
}

/// The 2 MiB ranges (first region page of each) that a conversion of
/// region pages `run` covers in part: the ones it splits (at most its
/// first and its last).
pub(crate) fn split_by(run: &Range<u64>) -> impl Iterator<Item = u64> {
    let (start, end) = (run.start, run.end);
    let first = start / SMALL_PAGES * SMALL_PAGES;
    let last = (end - 1) / SMALL_PAGES * SMALL_PAGES;
    let in_part = move |range: u64| start > range || end < range + SMALL_PAGES;
    let last = (last != first).then_some(last);
    std::iter::once(first).chain(last).filter(move |&range| in_part(range))
}

impl PrivateMemory {
    /// Makes the split 2 MiB pages of `[gpa, gpa + len)` huge again where
    /// each is uniform (all private or all shared): see
    /// [`collapse`](crate::collapse). Returns how many it made huge (one
    /// already huge counts too; one with mixed states is left alone).
    ///
    /// `EINVAL` unless the range is 2 MiB-aligned and lies in regions on
    /// transparent huge pages; `EAGAIN` where pages of it are pinned;
    /// `EDEADLK` if this thread holds a host access or converts (a
    /// listener). Waits for host accesses to the range to end; the
    /// kernel's errno where it cannot collapse (`ENOMEM`, `EAGAIN`).
    pub fn collapse(&self, gpa: Gpa, len: u64) -> Result<u64> {
        if len == 0 || gpa.0 % HUGE_PAGE_SIZE != 0 || len % HUGE_PAGE_SIZE != 0 {
            return Err(Error::InvalidArgument(format!(
                "collapse of {:#x}+{len:#x}: must be whole 2 MiB pages",
                gpa.0
            )));
        }
        let covering = self.regions_covering(gpa, len)?;
        if let Some((region, _)) = covering.iter().find(|(r, _)| !splits(r)) {
            return Err(Error::InvalidArgument(format!(
                "collapse: the region at {} is not on transparent huge pages",
                region.gpa
            )));
        }
        self.gate.check_not_shared_here("collapse")?;
        let _turn = self.gate.conversion_turn()?;
        let span = gpa.0..gpa.0 + len;
        let _changing = self.gate.begin_change("collapse", span.clone())?;
        let _exclusive = self.gate.exclusive("collapse", span)?;
        let mut collapsed = 0;
        for (region, pages) in &covering {
            let starts = (pages.start..pages.end).step_by(SMALL_PAGES as usize);
            collapsed += self.collapse_uniform(region, starts, true)?;
        }
        Ok(collapsed)
    }

    /// Collapses the ranges whose background collapse is due, where each
    /// is still all private; one it cannot collapse now (a conversion
    /// under way) waits again.
    pub(crate) fn collapse_due(&self) {
        let due = self.collapses.take_due();
        if due.is_empty() {
            return;
        }
        // Never wait here: this is a fault-serving thread.
        let Some(_turn) = self.gate.try_conversion_turn() else {
            due.into_iter().for_each(|gpa| self.collapses.schedule(gpa));
            return;
        };
        let mut due = due;
        due.sort_unstable();
        let mut rest = &due[..];
        while let Some(&first) = rest.first() {
            let Some(region) = self.region_of(Gpa(first)) else {
                rest = &rest[1..];
                continue;
            };
            let inside = rest.iter().take_while(|&&gpa| region.contains(Gpa(gpa))).count();
            let starts = rest[..inside].iter().map(|&gpa| (gpa - region.gpa.0) / PAGE_SIZE);
            let _ = self.collapse_uniform(&region, starts, false);
            rest = &rest[inside..];
        }
    }

    /// Collapses those of the 2 MiB ranges at region pages `starts`
    /// (ascending) that are uniform: all private, or with `shared_too` all
    /// shared (the caller then holds them exclusively). Consecutive ones
    /// go in one `MADV_COLLAPSE`, which drains every CPU's page lists once
    /// per call. Called with the conversion turn; returns how many.
    fn collapse_uniform(
        &self,
        region: &PrivateRegion,
        starts: impl Iterator<Item = u64>,
        shared_too: bool,
    ) -> Result<u64> {
        let Backing::File(f) = &region.backing else { return Ok(0) };
        let uniform = |start: u64| {
            let pages = start..start + SMALL_PAGES;
            let shared = region.shared.first(pages.clone(), true).is_some();
            let mixed = shared && region.shared.first(pages, false).is_some();
            !mixed && (shared_too || !shared)
        };
        let mut runs: Vec<Range<u64>> = Vec::new();
        for start in starts.filter(|&start| uniform(start)) {
            match runs.last_mut() {
                Some(run) if run.end == start => run.end += SMALL_PAGES,
                _ => runs.push(start..start + SMALL_PAGES),
            }
        }
        let mut collapsed = 0;
        for pages in runs {
            let began = Instant::now();
            f.binding.collapse(&f.window, f.file_pages(&pages))?;
            // The host's view of the old small pages is gone.
            f.host_mapped.set(pages.clone(), false);
            let count = (pages.end - pages.start) / SMALL_PAGES;
            self.collapses.nanos.fetch_add(began.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.collapses.done.fetch_add(count, Ordering::Relaxed);
            collapsed += count;
        }
        Ok(collapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversion_splits_the_huge_pages_it_covers_in_part() {
        let split = |start, end| split_by(&(start..end)).collect::<Vec<_>>();
        assert_eq!(split(5, 6), [0]);
        assert_eq!(split(0, 512), [] as [u64; 0]);
        assert_eq!(split(0, 1024), [] as [u64; 0]);
        assert_eq!(split(511, 513), [0, 512]);
        assert_eq!(split(512, 1000), [512]);
        assert_eq!(split(100, 1536), [0]);
        assert_eq!(split(1024, 1536), [] as [u64; 0]);
    }

    #[test]
    fn background_collapses_wait_their_turn() {
        let collapses = Collapses::default();
        assert_eq!(collapses.due_in(), None);
        collapses.schedule(2 << 20);
        collapses.schedule(2 << 20);
        assert!(collapses.due_in().unwrap() <= COLLAPSE_AFTER);
        assert!(collapses.take_due().is_empty(), "not due yet");
        std::thread::sleep(COLLAPSE_AFTER);
        assert_eq!(collapses.take_due(), [2 << 20]);
        assert_eq!(collapses.due_in(), None);
    }
}

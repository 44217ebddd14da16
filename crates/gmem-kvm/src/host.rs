//! Host access to shared guest memory: the copies a device model makes.
//!
//! Every access holds its GPA range in the memory's change gate
//! ([`crate::gate`]) for its whole length, so no page it touches can be
//! converted or freed under it (changes elsewhere go on), and holds the
//! regions it copies from, so that a region the VMM removes meanwhile
//! stays mapped until the copy is done. It checks that
//! every page is shared (`EPERM` naming the first private GPA otherwise),
//! after waiting out any conversion or punch of it under way, and maps the
//! pages into the region's host view. Copies are volatile
//! (vm-memory's), since the guest may write the same pages at any time.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use crate::error::{Error, Result};
use crate::memory::{parts_in, PrivateMemory};
use crate::region::{Backing, PrivateRegion};
use crate::Gpa;

impl PrivateMemory {
    /// Reads shared guest memory at `gpa` into `buf` (across adjacent
    /// regions too), after any conversion or punch of the range under way.
    /// Nothing is read unless all of it can be: `EPERM` naming the GPA if
    /// any page is private; `EINVAL` where a byte lies outside every
    /// region; `EAGAIN` if the file is being punched directly (not through
    /// this memory) right now, or if this thread already held an access
    /// when another thread's change began; `EDEADLK` for a range this
    /// thread is changing (a listener reading what its change discards).
    pub fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<()> {
        let _shared = self.gate.copy_access(gpa.0..gpa.0.saturating_add(buf.len() as u64));
        let regions = self.regions();
        let mut at = 0;
        for slice in self.host_slices(&regions, gpa, buf.len())? {
            slice.copy_to(&mut buf[at..at + slice.len()]);
            at += slice.len();
        }
        Ok(())
    }

    /// Writes `data` into shared guest memory at `gpa`, all of it or
    /// nothing; errors as [`read`](Self::read).
    pub fn write(&self, gpa: Gpa, data: &[u8]) -> Result<()> {
        let _shared = self.gate.copy_access(gpa.0..gpa.0.saturating_add(data.len() as u64));
        let regions = self.regions();
        let mut at = 0;
        for slice in self.host_slices(&regions, gpa, data.len())? {
            slice.copy_from(&data[at..at + slice.len()]);
            at += slice.len();
        }
        Ok(())
    }

    /// The host view of `[gpa, gpa + len)`, one slice per region of
    /// `regions` (a snapshot of the table) it spans, every page shared and
    /// mapped. The slices borrow the snapshot, which keeps the regions
    /// (and so their windows) alive however soon the VMM removes them; the
    /// caller holds the access lock shared for as long as it uses them.
    fn host_slices<'r>(
        &self,
        regions: &'r [Arc<PrivateRegion>],
        gpa: Gpa,
        len: usize,
    ) -> Result<Vec<VolatileSlice<'r>>> {
        let mut slices = Vec::new();
        for (region, offset, part) in parts_in(regions, gpa, len as u64)? {
            let host = self.map_shared(region, offset, part as usize)?;
            // SAFETY: `host` points at `part` bytes of the region's host
            // view (map_shared checked the range), mapped and shared; the
            // caller's shared hold on the access lock keeps them so for the
            // slice's use, and the snapshot the slice borrows keeps the
            // region, and so its host view, mapped.
            slices.push(unsafe { VolatileSlice::new(host, part as usize) });
        }
        Ok(slices)
    }

    /// Checks that the `len` bytes at region offset `offset` are shared and
    /// maps them into the host view; returns their host address. The caller
    /// holds the access lock shared. `len` 0 is the (unmapped) address.
    pub(crate) fn map_shared(
        &self,
        region: &PrivateRegion,
        offset: u64,
        len: usize,
    ) -> Result<*mut u8> {
        let end = offset.checked_add(len as u64).filter(|&end| end <= region.size);
        let Some(end) = end else {
            return Err(crate::memory::outside(
                Gpa(region.gpa.0.saturating_add(offset)),
                len as u64,
            ));
        };
        let pages = offset / gmem::PAGE_SIZE..end.div_ceil(gmem::PAGE_SIZE);
        if len != 0 {
            self.check_shared(region, pages.clone())?;
            self.gate.check_not_changing(region.gpa.0 + offset..region.gpa.0 + end)?;
        }
        match &region.backing {
            // The guest_memfd's one mapping holds every page (made on first
            // access, INIT_SHARED); the states gate the host.
            Backing::GuestMemfd(n) => Ok(n.map.addr().wrapping_add(offset as usize)),
            Backing::File(f) => {
                if len != 0 && f.host_mapped.first(pages.clone(), false).is_some() {
                    // A shared page still in the snapshot restored is
                    // fetched first (EAGAIN, as below, while punched).
                    self.fetch(region, pages.clone(), true)?;
                    // EAGAIN rather than a wait while part of it is being
                    // discarded: the invalidation waits for our hold to end.
                    let _locked = f.binding.get_and_lock_range_or_again(f.file_pages(&pages))?;
                    // On huge pages, the kernel maps what is in the file.
                    if f.binding.file().page_kind() != gmem::PageKind::Small {
                        f.host_mapped.set(pages.clone(), true);
                    }
                    for run in f.host_mapped.runs(pages, false) {
                        let addr = f.host_view.as_ptr() as u64 + run.start * gmem::PAGE_SIZE;
                        self.host_uffd
                            .continue_range(addr, (run.end - run.start) * gmem::PAGE_SIZE)?;
                        f.host_mapped.set(run, true);
                    }
                }
                Ok(f.host_view.as_ptr().wrapping_add(offset as usize))
            }
        }
    }

    /// `EPERM` naming the first private page of `pages`, counted as a denial.
    fn check_shared(&self, region: &PrivateRegion, pages: Range<u64>) -> Result<()> {
        match region.shared.first(pages, false) {
            None => Ok(()),
            Some(private) => {
                self.counters.host_denials.fetch_add(1, Ordering::Relaxed);
                Err(Error::PrivatePage(region.gpa_of(private)))
            }
        }
    }
}

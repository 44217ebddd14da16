//! Which pages changed since the last snapshot: guest writes from KVM's
//! dirty log, punches and conversions from gmem's own record
//! ([`PrivateRegion::mark_changed`](crate::PrivateRegion)).

use std::sync::atomic::Ordering;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::region::PrivateRegion;

impl PrivateMemory {
    /// Starts tracking changed pages, for diff snapshots: KVM logs guest
    /// writes to every region's memslot (`KVM_MEM_LOG_DIRTY_PAGES`, and
    /// for regions added later), and gmem records punches and conversions.
    /// A diff holds what changed since the last snapshot saved or restored
    /// after this call. Idempotent. `EOPNOTSUPP` for native regions (KVM
    /// refuses dirty logging on guest_memfd memslots).
    pub fn track_dirty_pages(&self) -> Result<()> {
        let regions = self.regions();
        if regions.iter().any(|r| r.file_backing().is_none()) {
            return Err(Error::Unsupported(
                "dirty tracking of native (guest_memfd) regions: KVM refuses dirty logging there"
                    .into(),
            ));
        }
        if self.snapshots.tracking.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for region in regions.iter() {
            self.set_memslot_flags(region, KVM_MEM_LOG_DIRTY_PAGES)?;
        }
        Ok(())
    }

    /// Whether [`track_dirty_pages`](Self::track_dirty_pages) is on.
    pub fn tracks_dirty_pages(&self) -> bool {
        self.snapshots.tracking.load(Ordering::SeqCst)
    }

    /// The memslot flags of regions added from now on.
    pub(crate) fn memslot_flags(&self) -> u32 {
        if self.tracks_dirty_pages() {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    /// Sets `region`'s memslot flags (KVM changes the flags in place).
    fn set_memslot_flags(&self, region: &PrivateRegion, flags: u32) -> Result<()> {
        let Some(vm) = self.vm() else { return Ok(()) };
        let kvm_region = region.memslot(flags);
        // SAFETY: the same live window the memslot already points at, which
        // this memory keeps until it deletes the memslot; only the flags change.
        self.with_faults_served(|| unsafe { vm.set_user_memory_region(kvm_region) })
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (dirty log)"))
    }

    /// Moves KVM's dirty log (which it clears as it hands it over) into
    /// each region's record of changed pages, where it stays until a
    /// snapshot that holds them is saved.
    pub(crate) fn harvest_dirty_log(&self) -> Result<()> {
        let Some(vm) = self.vm().filter(|_| self.tracks_dirty_pages()) else { return Ok(()) };
        for region in self.regions().iter() {
            let log = vm
                .get_dirty_log(region.slot, region.size as usize)
                .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
            for (word_index, &word) in log.iter().enumerate() {
                let first = word_index as u64 * 64;
                let mut bits = word;
                while bits != 0 {
                    let start = bits.trailing_zeros();
                    let len = (bits >> start).trailing_ones();
                    let run = first + u64::from(start)..first + u64::from(start + len);
                    region.mark_changed(run.start..run.end.min(region.pages()));
                    bits = bits.checked_shr(start + len).map_or(0, |rest| rest << (start + len));
                }
            }
        }
        Ok(())
    }

    /// Pages changed since the last snapshot saved or restored (guest
    /// writes, punches, conversions), in all regions; 0 unless
    /// [`track_dirty_pages`](Self::track_dirty_pages) is on.
    pub fn changed_pages(&self) -> Result<u64> {
        self.harvest_dirty_log()?;
        Ok(self.regions().iter().map(|r| r.changed_count()).sum())
    }
}

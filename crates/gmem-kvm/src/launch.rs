//! Launching through vm-memory: loaders that write an image into an
//! `M: GuestMemory` (linux-loader, vm-fdt, the arch crates' boot
//! parameters) load straight into private memory.
//!
//! The host may not map private pages, so a [`LaunchMemory`] has the
//! regions' layout over anonymous staging memory (touched pages only are
//! allocated) whose writes vm-memory marks dirty page by page;
//! [`LaunchMemory::commit`] then populates every page written, as
//! [`PrivateMemory::populate`] does, and frees the staging memory. Reads
//! through it see what was written through it (zero elsewhere), not the
//! private content.
//!
//! ```no_run
//! # fn demo(memory: &std::sync::Arc<gmem_kvm::PrivateMemory>) -> gmem_kvm::Result<()> {
//! use vm_memory::{Bytes, GuestAddress};
//! let launch = memory.launch_memory()?;
//! launch.write_slice(b"kernel image...", GuestAddress(0x20_0000)).unwrap();
//! launch.commit()?;
//! memory.finish_launch();
//! # Ok(()) }
//! ```

use std::sync::Arc;

use gmem::PAGE_SIZE;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::Gpa;

/// The regions' layout over staging memory, for loaders (see the module
/// docs). A vm-memory [`GuestMemoryBackend`]: pass `&launch` wherever a
/// loader takes an `M: GuestMemory`.
#[derive(Debug)]
pub struct LaunchMemory {
    staging: GuestMemoryMmap<AtomicBitmap>,
    memory: Arc<PrivateMemory>,
}

impl PrivateMemory {
    /// Staging memory with the layout of the regions registered now, whose
    /// writes [`LaunchMemory::commit`] populates. `EPERM` once the launch
    /// is finished; `ENOMEM` where the staging cannot be mapped.
    pub fn launch_memory(self: &Arc<Self>) -> Result<LaunchMemory> {
        self.check_launching()?;
        let mut ranges: Vec<(GuestAddress, usize)> = self
            .regions()
            .iter()
            .map(|r| Ok((r.gpa.into(), usize::try_from(r.size).map_err(|_| too_large())?)))
            .collect::<Result<_>>()?;
        ranges.sort_by_key(|&(gpa, _)| gpa);
        let staging = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| Error::Os { op: "map launch staging memory", errno: errno_of(&e) })?;
        Ok(LaunchMemory { staging, memory: self.clone() })
    }
}

fn too_large() -> Error {
    Error::InvalidArgument("a region too large to stage on this host".into())
}

fn errno_of(error: &vm_memory::mmap::FromRangesError) -> crate::Errno {
    use std::error::Error as _;
    error
        .source()
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .and_then(crate::Errno::from_io_error)
        .unwrap_or(crate::Errno::NOMEM)
}

impl LaunchMemory {
    /// Populates every page written through this view (each whole page, as
    /// staged) and frees the staging memory; returns the bytes populated.
    /// `EPERM` if the launch was finished meanwhile; `EINVAL` if a region
    /// was removed meanwhile.
    pub fn commit(self) -> Result<u64> {
        let mut populated = 0;
        for region in self.staging.iter() {
            let pages = region.len() / PAGE_SIZE;
            let written = |page: u64| region.bitmap().dirty_at((page * PAGE_SIZE) as usize);
            let mut page = 0;
            while page < pages {
                if !written(page) {
                    page += 1;
                    continue;
                }
                let start = page;
                while page < pages && written(page) {
                    page += 1;
                }
                populated += self.populate_run(region, start..page)?;
            }
        }
        Ok(populated)
    }

    /// Populates region pages `run` from their staged bytes.
    fn populate_run(
        &self,
        region: &GuestRegionMmap<AtomicBitmap>,
        run: std::ops::Range<u64>,
    ) -> Result<u64> {
        let gpa = region.start_addr().0 + run.start * PAGE_SIZE;
        let mut bytes = vec![0u8; ((run.end - run.start) * PAGE_SIZE) as usize];
        self.staging
            .read_slice(&mut bytes, GuestAddress(gpa))
            .map_err(|_| crate::memory::outside(Gpa(gpa), bytes.len() as u64))?;
        self.memory.populate(Gpa(gpa), &bytes)?;
        Ok(bytes.len() as u64)
    }
}

impl GuestMemoryBackend for LaunchMemory {
    type R = GuestRegionMmap<AtomicBitmap>;

    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.staging.iter()
    }
}

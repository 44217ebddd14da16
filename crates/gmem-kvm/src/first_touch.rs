//! Who serves a region's first touches: gmem or the kernel.
//!
//! gmem serves a first touch through userfaultfd: a round trip to a fault
//! thread, which pays off for a sequential toucher (one fault maps a batch
//! of up to 2 MiB, the next batch is mapped while the vCPU runs on) but not
//! for a guest that touches one page here and one there, where the round
//! trip costs several times what the kernel's own shmem fault does.
//!
//! So a region whose faults keep landing away from every recent batch
//! hands its first touches to the kernel: its KVM window stays registered
//! for minor faults only (a page already in the file is still mapped by
//! gmem), and a touch of a hole is allocated and mapped by the kernel's
//! shmem fault, one zero-filled page, exactly what was touched. Nothing
//! needs checking there: the page is new, the seal keeps it out of host
//! reach, and a punch or truncate invalidates it through the file like any
//! other. The window is locked in RAM (`mlock2(ONFAULT)`, when the region
//! was added), so pages the kernel allocates through it are locked as they
//! appear; where the memlock limit refused that, gmem keeps serving.
//!
//! Nothing tells gmem how a region is touched while the kernel serves it,
//! so every [`PROBE_AFTER`] gmem takes first touches back: a sparse guest
//! hands them over again after [`SCATTERED_FAULTS`] faults (fewer while
//! another region is handed over), a guest that has turned sequential
//! keeps its batches.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use gmem::OwnerWindow;

use crate::uffd::{Registration, Userfaultfd};

/// Consecutive faults away from every recent batch after which the kernel
/// serves a region's first touches (more than vCPUs starting to touch
/// memory at once, each one fault away from its own stream).
pub const SCATTERED_FAULTS: u32 = 32;

/// The same, while the kernel serves another region's first touches: the
/// guest is known to be sparse, and a VMM's RAM in many regions (memslots)
/// should not pay the full count in each. A sequential toucher still never
/// gets there: only the first fault of its stream is away from a batch.
pub const SCATTERED_FAULTS_WHILE_SPARSE: u32 = 4;

/// How long the kernel serves a region's first touches before gmem takes
/// them back to look again.
pub const PROBE_AFTER: Duration = Duration::from_millis(100);

/// A region's first-touch state.
#[derive(Debug)]
pub(crate) struct FirstTouch {
    /// Held shared while serving a fault: the window's registration does not
    /// change under a `UFFDIO_ZEROPAGE` or `UFFDIO_CONTINUE`. `Some(since)`
    /// while the kernel serves.
    kernel_since: RwLock<Option<Instant>>,
    /// Mirrors `kernel_since.is_some()`, for a check without the lock.
    kernel: AtomicBool,
    /// Faults in a row that continued no recent batch.
    scattered: AtomicU32,
    /// Hand-overs to the kernel so far.
    pub(crate) handovers: AtomicU64,
}

impl Default for FirstTouch {
    fn default() -> Self {
        Self {
            kernel_since: RwLock::new(None),
            kernel: AtomicBool::new(false),
            scattered: AtomicU32::new(0),
            handovers: AtomicU64::new(0),
        }
    }
}

impl FirstTouch {
    /// Held while serving a fault of the region.
    pub(crate) fn serving(&self) -> RwLockReadGuard<'_, Option<Instant>> {
        self.kernel_since.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the kernel serves the region's first touches now.
    pub(crate) fn kernel_serves(&self) -> bool {
        self.kernel.load(Ordering::Relaxed)
    }

    /// Counts a served fault of `window`, `scattered` or continuing a
    /// batch; after `threshold` scattered ones in a row
    /// ([`SCATTERED_FAULTS`] or [`SCATTERED_FAULTS_WHILE_SPARSE`]), hands
    /// first touches to the kernel. Not called with
    /// [`serving`](Self::serving) held. Where the window is not locked in
    /// RAM or cannot be registered anew, gmem goes on serving.
    pub(crate) fn record(
        &self,
        scattered: bool,
        threshold: u32,
        uffd: &Userfaultfd,
        window: &OwnerWindow,
    ) {
        if !scattered {
            self.scattered.store(0, Ordering::Relaxed);
            return;
        }
        if self.scattered.fetch_add(1, Ordering::Relaxed) + 1 < threshold {
            return;
        }
        let mut since = self.kernel_since.write().unwrap_or_else(|p| p.into_inner());
        if since.is_some() {
            return;
        }
        // Pages the kernel allocates through an unlocked window would not
        // be locked in RAM.
        if !window.is_locked_in_ram() {
            return;
        }
        let (addr, len) = (window.as_ptr() as u64, window.len() as u64);
        if uffd.reregister(addr, len, Registration::MinorOnly).is_ok() {
            *since = Some(Instant::now());
            self.kernel.store(true, Ordering::Relaxed);
            self.handovers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes first touches of `window` back from the kernel when it has
    /// served them for [`PROBE_AFTER`].
    pub(crate) fn take_back(&self, uffd: &Userfaultfd, window: &OwnerWindow) {
        if !self.kernel_serves() {
            return;
        }
        let mut since = self.kernel_since.write().unwrap_or_else(|p| p.into_inner());
        if since.is_none_or(|at| at.elapsed() < PROBE_AFTER) {
            return;
        }
        let (addr, len) = (window.as_ptr() as u64, window.len() as u64);
        if uffd.reregister(addr, len, Registration::MissingAndMinor).is_ok() {
            *since = None;
            self.kernel.store(false, Ordering::Relaxed);
            self.scattered.store(0, Ordering::Relaxed);
        }
    }
}

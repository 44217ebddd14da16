//! Who serves a region's first touches: gmem or the kernel.
//!
//! gmem serves a first touch through userfaultfd: a round trip to a fault
//! thread, which pays off for a sequential toucher (one fault maps a batch
//! of up to 2 MiB, the next batch is mapped while the vCPU runs on) but not
//! for a guest that touches one page here and one there, where the round
//! trip costs several times what the kernel's own shmem fault does.
//!
//! So where a vCPU's faults keep landing away from every recent batch, the
//! region of its latest fault hands its first touches to the kernel: its
//! KVM window stays registered for minor faults only (a page already in the
//! file is still mapped by gmem), and a touch of a hole is allocated and
//! mapped by the kernel's shmem fault, one zero-filled page, exactly what
//! was touched. Nothing
//! needs checking there: the page is new, the seal keeps it out of host
//! reach, and a punch or truncate invalidates it through the file like any
//! other. The window is locked in RAM (`mlock2(ONFAULT)`, when the region
//! was added), so pages the kernel allocates through it are locked as they
//! appear; where the memlock limit refused that, gmem keeps serving.
//!
//! Nothing tells gmem how a region is touched while the kernel serves it,
//! so every [`PROBE_AFTER`] gmem takes first touches back: a vCPU still
//! touching here and there hands them over again at its next scattered
//! fault, one that has turned sequential keeps its batches.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use gmem::OwnerWindow;

use crate::uffd::{Registration, Userfaultfd};

/// A vCPU's consecutive faults away from every recent batch after which
/// the kernel serves the first touches of the region of the last one (a
/// vCPU starting a stream has one or two: its stack, the stream's first
/// page).
pub const SCATTERED_FAULTS: u32 = 32;

/// The same, while the kernel serves some region's first touches: the
/// guest is known to be sparse, and its other vCPUs should not pay the
/// full count. A vCPU starting a stream still never gets there.
pub const SCATTERED_FAULTS_WHILE_SPARSE: u32 = 4;

/// How long the kernel serves a region's first touches before gmem takes
/// them back to look again.
pub const PROBE_AFTER: Duration = Duration::from_millis(100);

/// Scattered faults in a row (faults that continued no recent batch), per
/// faulting thread: a vCPU touching here and there, not many vCPUs each
/// starting a stream at once (their stacks, their streams' first pages),
/// is what makes a region hand first touches to the kernel. A table
/// indexed by thread id modulo its size (thread ids are mostly
/// consecutive); a thread that finds another's id in its entry starts it
/// from 0: two vCPUs that share an entry delay or forgo a hand-over, and
/// gmem serves their first touches itself, slower.
#[derive(Debug)]
pub(crate) struct ScatteredFaults {
    /// `thread << 32 | count`.
    entries: Box<[AtomicU64; ScatteredFaults::ENTRIES]>,
}

impl Default for ScatteredFaults {
    fn default() -> Self {
        Self { entries: Box::new([const { AtomicU64::new(0) }; Self::ENTRIES]) }
    }
}

impl ScatteredFaults {
    const ENTRIES: usize = 1024;

    /// Counts a served fault of `thread`, `scattered` or continuing a
    /// batch; returns the thread's scattered faults in a row. (A vCPU has
    /// one fault pending at a time, so its entry has one writer at a time.)
    pub(crate) fn record(&self, thread: u32, scattered: bool) -> u32 {
        let entry = &self.entries[thread as usize % Self::ENTRIES];
        let packed = entry.load(Ordering::Relaxed);
        let before = if packed >> 32 == u64::from(thread) { packed as u32 } else { 0 };
        let now = if scattered { before.saturating_add(1) } else { 0 };
        entry.store(u64::from(thread) << 32 | u64::from(now), Ordering::Relaxed);
        now
    }
}

/// A region's first-touch state.
#[derive(Debug)]
pub(crate) struct FirstTouch {
    /// Held shared while serving a fault: the window's registration does not
    /// change under a `UFFDIO_ZEROPAGE` or `UFFDIO_CONTINUE`. `Some(since)`
    /// while the kernel serves.
    kernel_since: RwLock<Option<Instant>>,
    /// Mirrors `kernel_since.is_some()`, for a check without the lock.
    kernel: AtomicBool,
    /// Hand-overs to the kernel so far.
    pub(crate) handovers: AtomicU64,
}

impl Default for FirstTouch {
    fn default() -> Self {
        Self {
            kernel_since: RwLock::new(None),
            kernel: AtomicBool::new(false),
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

    /// Hands the region's first touches to the kernel, unless it serves
    /// them already: registers `window` anew for minor faults only. Not
    /// called with [`serving`](Self::serving) held. Where the window is not
    /// locked in RAM or cannot be registered anew, gmem goes on serving.
    pub(crate) fn hand_over(&self, uffd: &Userfaultfd, window: &OwnerWindow) {
        // Pages the kernel allocates through an unlocked window would not
        // be locked in RAM.
        if self.kernel_serves() || !window.is_locked_in_ram() {
            return;
        }
        let mut since = self.kernel_since.write().unwrap_or_else(|p| p.into_inner());
        if since.is_some() {
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
    /// How long until [`take_back`](Self::take_back) would take first
    /// touches back, while the kernel serves them.
    pub(crate) fn due_in(&self) -> Option<Duration> {
        self.serving().map(|since| PROBE_AFTER.saturating_sub(since.elapsed()))
    }

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
        }
    }
}

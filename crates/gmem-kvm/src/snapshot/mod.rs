//! Snapshots of private memory: sealed, restored lazily through the fault
//! path, with dirty tracking for diff snapshots.
//!
//! - [`PrivateMemory::save_snapshot`] writes a paused VM's memory to any
//!   `Write` (a file, a socket): every allocated page with its state, the
//!   states of shared holes, the region layout, and an opaque state blob
//!   of the VMM's (vCPU registers, devices). Holes stay holes. Every page,
//!   private or shared, is encrypted with AES-256-GCM under a key derived
//!   from the VMM's [`SnapshotKey`] and the snapshot's random identity, and
//!   bound to its GPA, state and the snapshot (see [`format`](mod@format)'s table).
//! - [`SnapshotFile::open`] checks a snapshot before anything is restored:
//!   the key, the header, the index, the VMM state, the length and the end
//!   tag; a wrong key is [`Error::WrongKey`], anything altered or cut short
//!   [`Error::BadSnapshot`].
//! - [`PrivateMemory::restore_snapshot`] restores into fresh memory of the
//!   same layout. Lazily, the guest runs at once: a first touch of a page
//!   is served from the snapshot (a positioned read of its record, opened
//!   and checked) by the same fault path that serves zero pages, with the
//!   same read-ahead; a host access to a shared page fetches it first. A
//!   page that fails its check is never mapped: the fault fails naming its
//!   GPA ([`Error::SnapshotPage`]). [`PrivateMemory::start_prefetch`]
//!   fetches the rest in the background; [`RestoreMode::Eager`] fetches
//!   everything before returning. Each page is fetched once, under its page
//!   lock; pages the guest converts or the host punches before they were
//!   fetched are never fetched afterwards. Diffs in the chain are applied
//!   on top, eagerly.
//! - Dirty tracking ([`PrivateMemory::track_dirty_pages`]): KVM's dirty
//!   log on gmem's memslots (ordinary memory to KVM, unlike guest_memfd's)
//!   for guest writes, and gmem's own record of punches and conversions.
//!   A diff ([`PrivateMemory::save_diff_snapshot`]) holds the pages that
//!   changed since the last snapshot saved or restored, and every shared
//!   page: the host may write those by any path (copies, views, pinned
//!   I/O through raw pointers), so none is trusted to be unchanged.
//!
//! Regions on huge pages are restored eagerly (KVM's window there is
//! served by the kernel's own faults); native (guest_memfd) regions are
//! refused (`EOPNOTSUPP`).

#[cfg(doc)]
use crate::{Error, PrivateMemory};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};

use crate::error::Result;

mod dirty;
pub mod format;
pub(crate) mod restore;
pub(crate) mod save;

pub use format::{SnapshotId, SnapshotKey};
pub use restore::{Prefetch, RestoreMode, SnapshotFile};
pub use save::SnapshotInfo;

std::thread_local! {
    /// Each thread's buffers for sealed records and plain pages: reads and
    /// fetches of 256 KiB-1 MiB would otherwise map, zero and unmap fresh
    /// memory each.
    pub(crate) static SEALED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    pub(crate) static PLAIN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` bytes of this thread's buffer `which` (their content
/// is whatever was there: `f` overwrites what it reads).
pub(crate) fn scratch<T>(
    which: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u8>>>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> Result<T>,
) -> Result<T> {
    which.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        f(&mut buffer[..len])
    })
}

/// A memory's snapshot state: dirty tracking, the point diffs start from,
/// and the snapshot it was restored from.
#[derive(Default)]
pub(crate) struct SnapshotState {
    /// Whether KVM logs guest writes to the memslots.
    tracking: AtomicBool,
    /// The snapshot saved or restored last: a diff's base.
    base: Mutex<Option<SnapshotId>>,
    /// Pages still to be fetched from the snapshot restored.
    restored: OnceLock<restore::Lazy>,
    /// Whether a migration is sending this memory.
    pub(crate) sending: AtomicBool,
}

impl SnapshotState {
    fn base(&self) -> std::sync::MutexGuard<'_, Option<SnapshotId>> {
        self.base.lock().unwrap_or_else(|p| p.into_inner())
    }
}

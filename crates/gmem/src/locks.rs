//! Page locks and the file's resize lock.
//!
//! The seed used the kernel's page lock (get_lock_pfn locks, put_unlock_pfn
//! unlocks, truncation waits) and the inode lock. Here a page lock is a run of
//! pages recorded with a token (what unlocks it, from any thread) and the
//! thread that took it; an invalidation marks its run as pending, which both
//! waits for the holders and keeps new lockers out until the pages are gone.
//! A thread that would wait for itself gets `EDEADLK` instead of hanging (the
//! kernel would hang).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::types::PageRange;

/// A small, process-unique id of the calling thread (never 0).
pub(crate) fn current_thread() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    ID.with(|id| *id)
}

#[derive(Debug, Clone, Copy)]
struct Held {
    pages: PageRange,
    thread: u64,
    token: u64,
}

/// What unlocks a run taken with [`PageLocks::lock`] or
/// [`PageLocks::begin_invalidate`], from whichever thread drops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockToken(u64);

#[derive(Debug, Default)]
struct Table {
    locked: Vec<Held>,
    invalidating: Vec<Held>,
    /// The token of the last run taken: tokens are unique per table.
    last_token: u64,
}

impl Table {
    fn overlapping(&self, pages: PageRange) -> impl Iterator<Item = &Held> {
        self.locked.iter().chain(&self.invalidating).filter(move |h| h.pages.overlaps(&pages))
    }

    /// `Ok(true)` when `pages` is free, `Ok(false)` when another thread holds
    /// part of it, and `EDEADLK` when this thread does.
    fn free(&self, pages: PageRange, op: &'static str, me: u64) -> Result<bool> {
        let mut free = true;
        for held in self.overlapping(pages) {
            if held.thread == me {
                return Err(Error::WouldDeadlock { op, held: format!("a lock on {}", held.pages) });
            }
            free = false;
        }
        Ok(free)
    }

    fn invalidating(&self, pages: PageRange) -> bool {
        self.invalidating.iter().any(|h| h.pages.overlaps(&pages))
    }
}

/// Locks on runs of pages, and runs being invalidated.
#[derive(Debug, Default)]
pub(crate) struct PageLocks {
    table: Mutex<Table>,
    changed: Condvar,
}

impl PageLocks {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no other thread holds or invalidates part of `pages`
    /// (with `again_if_invalidating`, an invalidation in progress is
    /// `EAGAIN` instead of a wait), then records them in `list` for this
    /// thread.
    fn take(
        &self,
        pages: PageRange,
        op: &'static str,
        again_if_invalidating: bool,
        list: impl FnOnce(&mut Table) -> &mut Vec<Held>,
    ) -> Result<LockToken> {
        let thread = current_thread();
        let mut table = self.table();
        loop {
            if again_if_invalidating && table.invalidating(pages) {
                return Err(Error::Again { op });
            }
            if table.free(pages, op, thread)? {
                break;
            }
            table = self.changed.wait(table).unwrap_or_else(|p| p.into_inner());
        }
        table.last_token += 1;
        let token = table.last_token;
        list(&mut table).push(Held { pages, thread, token });
        Ok(LockToken(token))
    }

    /// Locks `pages`, waiting for holders and invalidations of any of them
    /// (or, with `again_if_invalidating`, failing with `EAGAIN` while part
    /// of them is being invalidated).
    pub(crate) fn lock(&self, pages: PageRange, again_if_invalidating: bool) -> Result<LockToken> {
        self.take(pages, "get-and-lock", again_if_invalidating, |t| &mut t.locked)
    }

    /// Releases a run locked with [`PageLocks::lock`], from any thread.
    pub(crate) fn unlock(&self, token: LockToken) {
        self.remove(token, |t| &mut t.locked);
    }

    /// Marks `pages` as being invalidated once no thread holds any of them.
    pub(crate) fn begin_invalidate(&self, pages: PageRange, op: &'static str) -> Result<LockToken> {
        self.take(pages, op, false, |t| &mut t.invalidating)
    }

    /// Ends an invalidation started with [`PageLocks::begin_invalidate`].
    pub(crate) fn end_invalidate(&self, token: LockToken) {
        self.remove(token, |t| &mut t.invalidating);
    }

    fn remove(&self, token: LockToken, list: impl FnOnce(&mut Table) -> &mut Vec<Held>) {
        let mut table = self.table();
        let list = list(&mut table);
        if let Some(i) = list.iter().position(|h| h.token == token.0) {
            list.swap_remove(i);
        }
        drop(table);
        self.changed.notify_all();
    }

    /// Pages currently locked by get-and-lock.
    pub(crate) fn locked_pages(&self) -> u64 {
        self.table().locked.iter().map(|h| h.pages.len()).sum()
    }
}

/// The file's "inode lock": serializes size changes, hole punches and seal
/// changes. Taking it again from the thread that holds it (say, from an
/// owner's invalidation callback) fails with `EDEADLK`.
#[derive(Debug, Default)]
pub(crate) struct ResizeLock {
    lock: Mutex<()>,
    holder: AtomicU64,
}

/// Held [`ResizeLock`]; released on drop.
pub(crate) struct ResizeGuard<'a> {
    _guard: MutexGuard<'a, ()>,
    holder: &'a AtomicU64,
}

impl ResizeLock {
    pub(crate) fn lock(&self, op: &'static str) -> Result<ResizeGuard<'_>> {
        let me = current_thread();
        if self.holder.load(Ordering::Acquire) == me {
            return Err(Error::WouldDeadlock {
                op,
                held: "the file's resize lock (in an invalidation callback?)".into(),
            });
        }
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.holder.store(me, Ordering::Release);
        Ok(ResizeGuard { _guard: guard, holder: &self.holder })
    }
}

impl Drop for ResizeGuard<'_> {
    fn drop(&mut self) {
        self.holder.store(0, Ordering::Release);
    }
}

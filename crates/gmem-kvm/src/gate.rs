//! The change gate: the one place where host accesses and the changes that
//! take pages away (conversions, punches, invalidations) meet.
//!
//! It owns the range [access lock](crate::access), the GPA ranges being
//! changed through the memory, and the turn of conversions (one at a
//! time). A change marks its range once no host access overlaps it; from
//! then until it ends, host accesses to the range wait, while the change
//! itself runs without the access lock (its discards take the file's resize
//! lock and then, in the invalidation, the access lock; holding the access
//! lock across them would deadlock with a punch made on the file directly).
//!
//! No call waits for its own thread: a thread inside a change (a listener
//! called back from it) gets its accesses without waiting, `EDEADLK` for
//! the range its own change is taking away and for a second conversion,
//! `EAGAIN` for a range another thread is changing.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;

use crate::access::{overlaps, AccessLock, Exclusive, QuickShared, Shared};
use crate::error::{Error, Result};

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct ChangeGate {
    access: AccessLock,
    /// Ranges being changed, with the thread changing each.
    changing: Mutex<Vec<(Range<u64>, ThreadId)>>,
    /// How many: host accesses look at the list only when there are some.
    changes: AtomicUsize,
    changed: Condvar,
    /// The thread whose conversion runs now.
    converting: Mutex<Option<ThreadId>>,
    converted: Condvar,
}

impl ChangeGate {
    fn changing(&self) -> MutexGuard<'_, Vec<(Range<u64>, ThreadId)>> {
        self.changing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A host access to `span`: held shared once no change overlaps it. A
    /// thread that holds the access lock already does not wait (it could
    /// wait for itself); [`check_not_changing`](Self::check_not_changing)
    /// tells it what it may not touch.
    pub(crate) fn access(&self, span: Range<u64>) -> Shared<'_> {
        self.access.adopt(self.hold(span, false))
    }

    /// [`access`](Self::access) for a copy, which takes no other hold and
    /// waits for nothing while it holds: a quick hold where no writer is
    /// about and nothing changes (see [`crate::access`]).
    pub(crate) fn copy_access(&self, span: Range<u64>) -> CopyAccess<'_> {
        if let Some(quick) = self.access.quick_shared(span.clone()) {
            if self.changes.load(Ordering::SeqCst) == 0 {
                return CopyAccess { _quick: Some(quick), _held: None };
            }
        }
        CopyAccess { _quick: None, _held: Some(self.access(span)) }
    }

    /// [`access`](Self::access) as a hold id for [`release`](Self::release):
    /// a view's (this thread's) or, if `pin`, a pin's (no thread's).
    pub(crate) fn hold(&self, span: Range<u64>, pin: bool) -> u64 {
        loop {
            let (id, nested) = self.access.hold(span.clone(), pin);
            if nested || self.changes.load(Ordering::SeqCst) == 0 {
                return id;
            }
            let changing = self.changing();
            if !changing.iter().any(|(r, _)| overlaps(r, &span)) {
                return id;
            }
            self.access.release(id);
            drop(self.changed.wait(changing).unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Ends hold `id` of [`hold`](Self::hold), on any thread.
    pub(crate) fn release(&self, id: u64) {
        self.access.release(id);
    }

    /// `EDEADLK` if `span` overlaps a change of this thread's (a listener
    /// reading what its change takes away), `EAGAIN` if another thread's
    /// (seen by a thread that held the access lock before it began).
    pub(crate) fn check_not_changing(&self, span: Range<u64>) -> Result<()> {
        if self.changes.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let me = std::thread::current().id();
        let changing = self.changing();
        match changing.iter().find(|(r, _)| overlaps(r, &span)) {
            None => Ok(()),
            Some((_, thread)) if *thread == me => Err(Error::Memory(gmem::Error::WouldDeadlock {
                op: "host access",
                held: format!("a change of {:#x}..{:#x} on this thread", span.start, span.end),
            })),
            Some(_) => Err(Error::Memory(gmem::Error::Again { op: "host access during a change" })),
        }
    }

    /// Marks `span` as changing once no host access overlaps it (`EDEADLK`
    /// if this thread holds one); unmarked when the mark is dropped.
    pub(crate) fn begin_change(&self, op: &'static str, span: Range<u64>) -> Result<Changing<'_>> {
        let _exclusive = self.access.exclusive(op, span.clone())?;
        let mut changing = self.changing();
        changing.push((span.clone(), std::thread::current().id()));
        self.changes.store(changing.len(), Ordering::SeqCst);
        Ok(Changing { gate: self, span })
    }

    /// Holds `span` exclusively (see [`AccessLock::exclusive`]).
    pub(crate) fn exclusive(&self, op: &'static str, span: Range<u64>) -> Result<Exclusive<'_>> {
        self.access.exclusive(op, span)
    }

    /// `EDEADLK` if this thread holds a host access.
    pub(crate) fn check_not_shared_here(&self, op: &'static str) -> Result<()> {
        self.access.check_not_shared_here(op)
    }

    /// `EDEADLK` if this thread holds a host access or is inside a change.
    pub(crate) fn check_not_held_here(&self, op: &'static str) -> Result<()> {
        self.access.check_not_held_here(op)
    }

    /// This thread's turn to convert if no conversion runs now.
    pub(crate) fn try_conversion_turn(&self) -> Option<ConversionTurn<'_>> {
        let mut converting = self.converting.lock().unwrap_or_else(|p| p.into_inner());
        if converting.is_some() {
            return None;
        }
        *converting = Some(std::thread::current().id());
        Some(ConversionTurn(self))
    }

    /// This thread's turn to convert, once no other conversion runs;
    /// `EDEADLK` inside a conversion of its own (a listener converting).
    pub(crate) fn conversion_turn(&self) -> Result<ConversionTurn<'_>> {
        let me = std::thread::current().id();
        let mut converting = self.converting.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *converting {
                None => break,
                Some(thread) if thread == me => {
                    return Err(Error::Memory(gmem::Error::WouldDeadlock {
                        op: "convert",
                        held: "a conversion on this thread (a listener converting?)".into(),
                    }))
                }
                Some(_) => {
                    converting = self.converted.wait(converting).unwrap_or_else(|p| p.into_inner())
                }
            }
        }
        *converting = Some(me);
        Ok(ConversionTurn(self))
    }
}

/// A copy's hold ([`ChangeGate::copy_access`]), quick or not; released
/// on drop.
#[derive(Debug)]
pub(crate) struct CopyAccess<'a> {
    _quick: Option<QuickShared<'a>>,
    _held: Option<Shared<'a>>,
}

/// A range marked as changing; unmarked on drop, however the change ends.
pub(crate) struct Changing<'a> {
    gate: &'a ChangeGate,
    span: Range<u64>,
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        let me = std::thread::current().id();
        let mut changing = self.gate.changing();
        if let Some(i) = changing.iter().position(|(r, t)| *r == self.span && *t == me) {
            changing.swap_remove(i);
        }
        self.gate.changes.store(changing.len(), Ordering::SeqCst);
        drop(changing);
        self.gate.changed.notify_all();
    }
}

/// A conversion's turn; the next one's on drop.
pub(crate) struct ConversionTurn<'a>(&'a ChangeGate);

impl Drop for ConversionTurn<'_> {
    fn drop(&mut self) {
        *self.0.converting.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.0.converted.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::EVERYWHERE;
    use crate::Errno;

    #[test]
    fn a_thread_inside_its_own_change_is_told_not_made_to_wait() {
        let gate = &ChangeGate::default();
        let _turn = gate.conversion_turn().unwrap();
        let change = gate.begin_change("test", 0x1000..0x3000).unwrap();
        let _flip = gate.exclusive("test", 0x1000..0x3000).unwrap();
        // A listener called back now: its accesses do not wait.
        let _read = gate.access(EVERYWHERE);
        assert_eq!(gate.check_not_changing(0x2000..0x2008).unwrap_err().errno(), Errno::DEADLK);
        assert!(gate.check_not_changing(0x3000..0x4000).is_ok());
        assert_eq!(gate.conversion_turn().map(drop).unwrap_err().errno(), Errno::DEADLK);
        drop(change);
        assert!(gate.check_not_changing(0x2000..0x2008).is_ok());
    }

    #[test]
    fn another_thread_waits_for_a_change_of_its_range_only() {
        let gate = &ChangeGate::default();
        let change = gate.begin_change("test", 0..0x1000).unwrap();
        std::thread::scope(|scope| {
            // Elsewhere: at once, and told EAGAIN for the changing range.
            scope
                .spawn(move || {
                    let _read = gate.access(0x1000..0x2000);
                    assert_eq!(gate.check_not_changing(0..8).unwrap_err().errno(), Errno::AGAIN);
                })
                .join()
                .unwrap();
            let (started, waiting) = std::sync::mpsc::channel();
            let reader = scope.spawn(move || {
                started.send(()).unwrap();
                let _read = gate.access(0..8);
            });
            waiting.recv().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!reader.is_finished());
            drop(change);
            reader.join().unwrap();
        });
    }

    #[test]
    fn conversions_take_turns_across_threads() {
        let gate = &ChangeGate::default();
        let turn = gate.conversion_turn().unwrap();
        std::thread::scope(|scope| {
            let other = scope.spawn(move || drop(gate.conversion_turn().unwrap()));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!other.is_finished());
            drop(turn);
            other.join().unwrap();
        });
    }
}

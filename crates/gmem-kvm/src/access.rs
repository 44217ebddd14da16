//! The lock between host accesses and the changes that take pages away,
//! by GPA range.
//!
//! A host access (a copy, the vm-memory view) holds its range shared; an
//! invalidation (the owner callback, before the kernel frees pages) and the
//! steps of a conversion or punch that touch page states hold theirs
//! exclusively. So a page the host is reading cannot be converted or freed
//! under it: the change waits until the accesses that overlap it are done,
//! which is what makes device access fault-free (no SIGBUS, no private
//! bytes), while accesses elsewhere go on. It is never held across a file
//! operation: a punch or truncate takes the file's resize lock first and
//! this lock in its callback, and the other order would deadlock with it.
//!
//! Unlike `std`'s lock it knows its holders, so that no call waits for
//! itself:
//! - a thread that holds the lock (either way) nests shared holds without
//!   waiting for waiting writers, and may take it shared where it holds it
//!   exclusively (a change's own invalidation);
//! - exclusive while this thread holds it shared is `EDEADLK`; a nested
//!   exclusive (a listener's punch inside a conversion) widens the hold and
//!   waits for other threads' accesses to the new range, which never wait
//!   for anything while they hold (a copy waits for no one, and a view
//!   spans all of memory, so it cannot coexist with a writer);
//! - a waiting writer keeps new overlapping readers out for at most
//!   [`WRITER_GRACE`], so that conversions are not starved by a stream of
//!   accesses, and a reader that another reader waits for (a device thread
//!   holding a view while it waits for another device thread) still gets in.
//!
//! One writer holds the lock at a time; readers of other ranges go on.

use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a new reader stays out of the way of a waiting writer whose
/// range it overlaps.
pub(crate) const WRITER_GRACE: Duration = Duration::from_millis(2);

/// The whole guest physical address space.
pub(crate) const EVERYWHERE: Range<u64> = 0..u64::MAX;

fn current_thread() -> ThreadId {
    std::thread::current().id()
}

/// Whether two ranges share an element.
pub(crate) fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

#[derive(Debug)]
struct Writer {
    thread: ThreadId,
    span: Range<u64>,
    depth: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Shared holds: (hold id, thread, range).
    readers: Vec<(u64, ThreadId, Range<u64>)>,
    writer: Option<Writer>,
    /// Writers waiting: (thread, range).
    waiting: Vec<(ThreadId, Range<u64>)>,
    next_hold: u64,
    /// Threads asleep on `changed`: a release wakes them only if any.
    sleepers: usize,
}

impl State {
    fn reads(&self, thread: ThreadId) -> bool {
        self.readers.iter().any(|(_, t, _)| *t == thread)
    }

    fn writes(&self, thread: ThreadId) -> bool {
        self.writer.as_ref().is_some_and(|w| w.thread == thread)
    }

    /// Another thread's shared hold overlaps `span`.
    fn read_by_others(&self, me: ThreadId, span: &Range<u64>) -> bool {
        self.readers.iter().any(|(_, t, r)| *t != me && overlaps(r, span))
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct AccessLock {
    state: Mutex<State>,
    changed: Condvar,
}

/// Holds are per thread: a guard cannot move to another one.
type NotSend = std::marker::PhantomData<*const ()>;

/// A shared hold; released on drop, on the thread that took it.
#[derive(Debug)]
pub(crate) struct Shared<'a>(&'a AccessLock, u64, NotSend);

/// An exclusive hold; released on drop, on the thread that took it.
#[derive(Debug)]
pub(crate) struct Exclusive<'a>(&'a AccessLock, NotSend);

impl AccessLock {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        until: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        let left = until.map(|until| until.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            return state;
        }
        state.sleepers += 1;
        let mut state = match left {
            Some(left) => {
                self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0
            }
            None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
        };
        state.sleepers -= 1;
        state
    }

    /// Wakes the sleepers, if any (a wake is a system call).
    fn release(&self, state: MutexGuard<'_, State>) {
        let sleepers = state.sleepers;
        drop(state);
        if sleepers > 0 {
            self.changed.notify_all();
        }
    }

    /// Takes `span` shared: waits while another thread holds an overlapping
    /// range exclusively, and (unless this thread holds the lock already)
    /// for at most [`WRITER_GRACE`] while another thread waits to. Also
    /// says whether this thread held the lock already.
    pub(crate) fn shared(&self, span: Range<u64>) -> (Shared<'_>, bool) {
        let me = current_thread();
        let mut state = self.state();
        let holder = state.reads(me) || state.writes(me);
        let grace = Instant::now() + WRITER_GRACE;
        loop {
            let written =
                state.writer.as_ref().is_some_and(|w| w.thread != me && overlaps(&w.span, &span));
            let awaited = !holder
                && Instant::now() < grace
                && state.waiting.iter().any(|(t, r)| *t != me && overlaps(r, &span));
            match (written, awaited) {
                (false, false) => break,
                (true, _) => state = self.wait(state, None),
                (false, true) => state = self.wait(state, Some(grace)),
            }
        }
        let id = state.next_hold;
        state.next_hold += 1;
        state.readers.push((id, me, span));
        (Shared(self, id, NotSend::default()), holder)
    }

    /// Whether this thread holds the lock, shared or exclusively.
    #[cfg(test)]
    fn held_here(&self) -> bool {
        let me = current_thread();
        let state = self.state();
        state.reads(me) || state.writes(me)
    }

    /// `EDEADLK` if this thread holds the lock shared (and not
    /// exclusively): it must not wait for a change that waits for its own
    /// access.
    pub(crate) fn check_not_shared_here(&self, op: &'static str) -> Result<()> {
        let me = current_thread();
        let state = self.state();
        if state.reads(me) && !state.writes(me) {
            return Err(would_deadlock(op, "host access to guest memory (a read, write or view)"));
        }
        Ok(())
    }

    /// Takes `span` exclusively, once no other thread's access overlaps it
    /// and no other writer holds the lock; `EDEADLK` if this thread holds
    /// it shared. Nested in this thread's own exclusive hold, it widens
    /// that hold to `span` and waits for other threads' accesses there.
    pub(crate) fn exclusive(&self, op: &'static str, span: Range<u64>) -> Result<Exclusive<'_>> {
        // Only this thread changes its own holds: the check stays true
        // after the state lock is dropped and taken again.
        self.check_not_shared_here(op)?;
        let me = current_thread();
        let mut state = self.state();
        if let Some(writer) = state.writer.as_mut().filter(|w| w.thread == me) {
            // Widened first: new accesses to `span` wait from now on.
            writer.span = writer.span.start.min(span.start)..writer.span.end.max(span.end);
            writer.depth += 1;
            while state.read_by_others(me, &span) {
                state = self.wait(state, None);
            }
            return Ok(Exclusive(self, NotSend::default()));
        }
        state.waiting.push((me, span.clone()));
        while state.writer.is_some() || state.read_by_others(me, &span) {
            state = self.wait(state, None);
        }
        if let Some(i) = state.waiting.iter().position(|(t, r)| *t == me && *r == span) {
            state.waiting.swap_remove(i);
        }
        state.writer = Some(Writer { thread: me, span, depth: 1 });
        Ok(Exclusive(self, NotSend::default()))
    }
}

fn would_deadlock(op: &'static str, held: &str) -> Error {
    Error::Memory(gmem::Error::WouldDeadlock { op, held: held.into() })
}

impl Drop for Shared<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        if let Some(i) = state.readers.iter().position(|(id, _, _)| *id == self.1) {
            state.readers.swap_remove(i);
        }
        self.0.release(state);
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        if let Some(writer) = state.writer.as_mut() {
            writer.depth -= 1;
            if writer.depth == 0 {
                state.writer = None;
            }
        }
        self.0.release(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn errno(result: Result<Exclusive<'_>>) -> crate::Errno {
        result.map(drop).unwrap_err().errno()
    }

    #[test]
    fn holds_of_one_thread_nest_and_never_wait_for_themselves() {
        let lock = &AccessLock::default();
        let outer = lock.exclusive("test", 0..100).unwrap();
        let inner = lock.exclusive("test", 200..300).unwrap();
        let read = lock.shared(50..60).0;
        assert!(lock.held_here());
        drop((read, inner, outer));
        let read = lock.shared(EVERYWHERE).0;
        assert_eq!(errno(lock.exclusive("test", 0..1)), crate::Errno::DEADLK);
        let nested = lock.shared(0..1).0;
        drop((nested, read));
        assert!(!lock.held_here());
    }

    /// Holds `span` shared on a thread of `scope` until the returned
    /// sender is used; returns once the hold is taken.
    fn reader<'s>(
        scope: &'s std::thread::Scope<'s, '_>,
        lock: &'s AccessLock,
        span: Range<u64>,
    ) -> (std::thread::ScopedJoinHandle<'s, ()>, mpsc::Sender<()>) {
        let ((held_tx, held_rx), (release_tx, release_rx)) =
            (mpsc::channel(), mpsc::channel::<()>());
        let reader = scope.spawn(move || {
            let _read = lock.shared(span).0;
            held_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        });
        held_rx.recv().unwrap();
        (reader, release_tx)
    }

    #[test]
    fn a_writer_waits_only_for_overlapping_readers() {
        let lock = &AccessLock::default();
        std::thread::scope(|scope| {
            let (reader, release_tx) = reader(scope, lock, 0..100);
            // Elsewhere: at once.
            drop(lock.exclusive("test", 100..200).unwrap());
            // Over the reader's range: only once it is done.
            let (taken, took) = mpsc::channel();
            let writer = scope.spawn(move || {
                let _write = lock.exclusive("test", 50..150).unwrap();
                taken.send(()).unwrap();
            });
            assert!(took.recv_timeout(Duration::from_millis(100)).is_err());
            release_tx.send(()).unwrap();
            took.recv_timeout(Duration::from_secs(10)).unwrap();
            reader.join().unwrap();
            writer.join().unwrap();
        });
    }

    /// A nested exclusive hold widens to its range and waits for another
    /// thread's access there; new accesses to it wait for the writer.
    #[test]
    fn a_nested_writer_waits_for_readers_of_its_new_range() {
        let lock = &AccessLock::default();
        std::thread::scope(|scope| {
            let (reader, release_tx) = reader(scope, lock, 500..600);
            let outer = lock.exclusive("test", 0..100).unwrap();
            let releaser = scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                release_tx.send(()).unwrap();
            });
            let inner = lock.exclusive("test", 550..560).unwrap();
            reader.join().unwrap();
            releaser.join().unwrap();
            drop((inner, outer));
        });
    }

    /// A reader that a waiting writer keeps out gets in after the grace,
    /// so a reader that waits for it (while holding) is not stuck, and the
    /// writer goes once both are done.
    #[test]
    fn a_waiting_writer_keeps_new_readers_out_for_a_grace_only() {
        let lock = &AccessLock::default();
        std::thread::scope(|scope| {
            let (to_c, c_asked) = mpsc::channel::<()>();
            let (to_a, c_answered) = mpsc::channel::<()>();
            let a = scope.spawn(move || {
                let _read = lock.shared(EVERYWHERE).0;
                std::thread::sleep(Duration::from_millis(50));
                to_c.send(()).unwrap();
                c_answered.recv_timeout(Duration::from_secs(10)).unwrap();
            });
            let b = scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                drop(lock.exclusive("test", 0..4096).unwrap());
            });
            let c = scope.spawn(move || {
                c_asked.recv().unwrap();
                let _read = lock.shared(0..8).0;
                to_a.send(()).unwrap();
            });
            a.join().unwrap();
            b.join().unwrap();
            c.join().unwrap();
        });
    }
}

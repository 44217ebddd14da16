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
//!   exclusive (a listener's punch inside a conversion) widens the hold if
//!   no other thread's access overlaps the new range, and is `EAGAIN`
//!   otherwise: that access may be a view's, whose thread waits for this
//!   writer to take its next range;
//! - a pin (device I/O that outlives a call, released on any thread) is a
//!   shared hold of no thread: an exclusive hold over one is refused
//!   (`EAGAIN`, [`Error::Pinned`]) rather than waiting, since nothing says
//!   when, or on which thread, the I/O ends;
//! - a waiting writer keeps new overlapping readers out for at most
//!   [`WRITER_GRACE`], so that conversions are not starved by a stream of
//!   accesses, and a reader that another reader waits for (a device thread
//!   holding a view while it waits for another device thread) still gets in.
//!
//! One writer holds the lock at a time; readers of other ranges go on.
//!
//! Copies (`PrivateMemory::read`/`write`) take their hold without the
//! lock's mutex where no writer is about ([`AccessLock::quick_shared`]):
//! each thread publishes its range in a slot of its own cache line, so
//! copies on many cores share no written memory, and a writer, once
//! announced, waits for the slots that overlap its range to empty.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a new reader stays out of the way of a waiting writer whose
/// range it overlaps.
pub(crate) const WRITER_GRACE: Duration = Duration::from_millis(2);

/// The whole guest physical address space.
#[cfg(test)]
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
    /// Shared holds: (hold id, thread or `None` for a pin, range).
    readers: Vec<(u64, Option<ThreadId>, Range<u64>)>,
    writer: Option<Writer>,
    /// Writers waiting: (thread, range).
    waiting: Vec<(ThreadId, Range<u64>)>,
    next_hold: u64,
    /// Threads asleep on `changed`: a release wakes them only if any.
    sleepers: usize,
}

impl State {
    fn reads(&self, thread: ThreadId) -> bool {
        self.readers.iter().any(|(_, t, _)| *t == Some(thread))
    }

    fn writes(&self, thread: ThreadId) -> bool {
        self.writer.as_ref().is_some_and(|w| w.thread == thread)
    }

    /// Another thread's shared hold (or a pin) overlaps `span`.
    fn read_by_others(&self, me: ThreadId, span: &Range<u64>) -> bool {
        self.readers.iter().any(|(_, t, r)| *t != Some(me) && overlaps(r, span))
    }

    /// `Error::Pinned` for the first pin that overlaps `span`.
    fn check_not_pinned(&self, span: &Range<u64>) -> Result<()> {
        match self.readers.iter().find(|(_, t, r)| t.is_none() && overlaps(r, span)) {
            None => Ok(()),
            Some((_, _, pinned)) => {
                let start = pinned.start.max(span.start);
                let len = pinned.end.min(span.end) - start;
                Err(Error::Pinned { gpa: crate::Gpa(start), len })
            }
        }
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct AccessLock {
    state: Mutex<State>,
    changed: Condvar,
    quick: QuickReaders,
}

/// How many threads may hold quick holds at once (more take the mutex).
const QUICK_SLOTS: usize = 16;

/// The quick holds: a range per slot, and how many writers are about
/// (waiting or holding). A reader publishes its range, then checks that
/// no writer is about; a writer announces itself, then looks at the
/// slots. Both sequentially consistent, so one of the two sees the other.
#[derive(Debug)]
struct QuickReaders {
    slots: Box<[QuickSlot]>,
    writers: AtomicUsize,
}

impl Default for QuickReaders {
    fn default() -> Self {
        Self {
            slots: (0..QUICK_SLOTS).map(|_| QuickSlot::default()).collect(),
            writers: AtomicUsize::new(0),
        }
    }
}

/// A thread's quick hold: its own cache lines, written by that thread.
#[derive(Debug, Default)]
#[repr(align(128))]
struct QuickSlot {
    busy: AtomicBool,
    start: AtomicU64,
    end: AtomicU64,
}

impl QuickReaders {
    /// Whether a quick hold overlaps `span`.
    fn overlap(&self, span: &Range<u64>) -> bool {
        self.slots.iter().any(|slot| {
            let (start, end) = (slot.start.load(SeqCst), slot.end.load(SeqCst));
            overlaps(&(start..end), span)
        })
    }

    /// Waits until no quick hold overlaps `span`. Quick holds are copies
    /// that wait for nothing while they hold, so this ends soon.
    fn wait_for(&self, span: &Range<u64>) {
        let mut spins = 0u32;
        while self.overlap(span) {
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

/// A quick shared hold ([`AccessLock::quick_shared`]); released on drop.
#[derive(Debug)]
pub(crate) struct QuickShared<'a>(&'a QuickSlot, NotSend);

impl Drop for QuickShared<'_> {
    fn drop(&mut self) {
        self.0.end.store(0, SeqCst);
        self.0.start.store(0, SeqCst);
        self.0.busy.store(false, SeqCst);
    }
}

/// This thread's quick slot, given out round-robin.
fn quick_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, SeqCst) % QUICK_SLOTS;
    }
    SLOT.with(|slot| *slot)
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
    fn wake(&self, state: MutexGuard<'_, State>) {
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
    #[cfg(test)]
    pub(crate) fn shared(&self, span: Range<u64>) -> (Shared<'_>, bool) {
        let (id, holder) = self.hold(span, false);
        (self.adopt(id), holder)
    }

    /// [`shared`](Self::shared) as a hold id, released by
    /// [`release`](Self::release): a hold of this thread, or, if `pin`, of
    /// none (taken as this thread would take one).
    pub(crate) fn hold(&self, span: Range<u64>, pin: bool) -> (u64, bool) {
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
        state.readers.push((id, (!pin).then_some(me), span));
        (id, holder)
    }

    /// Hold `id` of this thread as a guard.
    pub(crate) fn adopt(&self, id: u64) -> Shared<'_> {
        Shared(self, id, NotSend::default())
    }

    /// `span` held shared without the mutex, where no writer is about and
    /// this thread's slot is free (`None` otherwise: take
    /// [`hold`](Self::hold)). For holds during which the thread takes no
    /// other hold and waits for nothing (a copy).
    pub(crate) fn quick_shared(&self, span: Range<u64>) -> Option<QuickShared<'_>> {
        let quick = &self.quick;
        if quick.writers.load(SeqCst) != 0 {
            return None;
        }
        let slot = &quick.slots[quick_slot()];
        if slot.busy.swap(true, SeqCst) {
            return None;
        }
        slot.start.store(span.start, SeqCst);
        slot.end.store(span.end, SeqCst);
        let held = QuickShared(slot, NotSend::default());
        (quick.writers.load(SeqCst) == 0).then_some(held)
    }

    /// Ends hold `id`, on any thread.
    pub(crate) fn release(&self, id: u64) {
        let mut state = self.state();
        if let Some(i) = state.readers.iter().position(|(held, _, _)| *held == id) {
            state.readers.swap_remove(i);
        }
        self.wake(state);
    }

    /// Whether this thread holds the lock, shared or exclusively.
    fn held_here(&self) -> bool {
        let me = current_thread();
        let state = self.state();
        state.reads(me) || state.writes(me)
    }

    /// `EDEADLK` if this thread holds the lock either way: for work that
    /// waits on page locks from other threads, which a change of this
    /// thread's (its invalidation, a listener inside it) may hold.
    pub(crate) fn check_not_held_here(&self, op: &'static str) -> Result<()> {
        if self.held_here() {
            return Err(would_deadlock(
                op,
                "a host access or change of guest memory (a listener?)",
            ));
        }
        Ok(())
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
    /// it shared, `EAGAIN` ([`Error::Pinned`]) while a pin overlaps it.
    /// Nested in this thread's own exclusive hold, it widens that hold to
    /// `span`, or is `EAGAIN` while another thread's access overlaps it.
    pub(crate) fn exclusive(&self, op: &'static str, span: Range<u64>) -> Result<Exclusive<'_>> {
        // Only this thread changes its own holds: the check stays true
        // after the state lock is dropped and taken again.
        self.check_not_shared_here(op)?;
        // Announced first: no quick hold begins from now on. The quick
        // holds there are end before this thread queues as a writer, so
        // it is never a writer that new readers wait for while it waits.
        self.quick.writers.fetch_add(1, SeqCst);
        self.quick.wait_for(&span);
        let taken = self.take_exclusive(op, span);
        if taken.is_err() {
            self.quick.writers.fetch_sub(1, SeqCst);
        }
        taken
    }

    fn take_exclusive(&self, op: &'static str, span: Range<u64>) -> Result<Exclusive<'_>> {
        let me = current_thread();
        let mut state = self.state();
        state.check_not_pinned(&span)?;
        if state.writes(me) {
            if state.read_by_others(me, &span) {
                return Err(Error::Memory(gmem::Error::Again { op }));
            }
            let writer = state.writer.as_mut().expect("this thread's");
            writer.span = writer.span.start.min(span.start)..writer.span.end.max(span.end);
            writer.depth += 1;
            return Ok(Exclusive(self, NotSend::default()));
        }
        state.waiting.push((me, span.clone()));
        let pinned = loop {
            if let Err(pinned) = state.check_not_pinned(&span) {
                break Err(pinned);
            }
            if state.writer.is_none() && !state.read_by_others(me, &span) {
                break Ok(());
            }
            state = self.wait(state, None);
        };
        if let Some(i) = state.waiting.iter().position(|(t, r)| *t == me && *r == span) {
            state.waiting.swap_remove(i);
        }
        if let Err(pinned) = pinned {
            // Readers kept out for this writer may go now.
            self.wake(state);
            return Err(pinned);
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
        self.0.release(self.1);
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.0.quick.writers.fetch_sub(1, SeqCst);
        let mut state = self.0.state();
        if let Some(writer) = state.writer.as_mut() {
            writer.depth -= 1;
            if writer.depth == 0 {
                state.writer = None;
            }
        }
        self.0.wake(state);
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

    /// A nested exclusive hold widens to its range, or is `EAGAIN` while
    /// another thread's access is there: that thread may be waiting for
    /// this writer (a view taking its next range).
    #[test]
    fn a_nested_writer_does_not_wait_for_readers_of_its_new_range() {
        let lock = &AccessLock::default();
        std::thread::scope(|scope| {
            let (reader, release_tx) = reader(scope, lock, 500..600);
            let outer = lock.exclusive("test", 0..100).unwrap();
            assert_eq!(errno(lock.exclusive("test", 550..560)), crate::Errno::AGAIN);
            release_tx.send(()).unwrap();
            reader.join().unwrap();
            let inner = lock.exclusive("test", 550..560).unwrap();
            drop((inner, outer));
        });
    }

    /// A quick hold keeps a writer of its range out until it ends (and not
    /// one of another range); none is given while a writer is about.
    #[test]
    fn quick_holds_and_writers_see_each_other() {
        let lock = &AccessLock::default();
        let quick = lock.quick_shared(0x1000..0x2000).expect("no writer about");
        drop(lock.exclusive("test", 0x2000..0x3000).unwrap());
        std::thread::scope(|scope| {
            let (taken, took) = mpsc::channel();
            let writer = scope.spawn(move || {
                let write = lock.exclusive("test", 0..0x1800).unwrap();
                taken.send(()).unwrap();
                // Announced and holding: no quick hold anywhere.
                assert!(lock.quick_shared(0x8000..0x9000).is_none());
                drop(write);
            });
            assert!(took.recv_timeout(Duration::from_millis(100)).is_err(), "did not wait");
            drop(quick);
            took.recv_timeout(Duration::from_secs(10)).unwrap();
            writer.join().unwrap();
        });
        assert!(lock.quick_shared(0..8).is_some(), "free again once the writer is gone");
    }

    /// A pin is no thread's: an exclusive hold over it is refused at once
    /// (`Error::Pinned`, `EAGAIN`), even on the thread that pinned; it ends
    /// on whichever thread releases it.
    #[test]
    fn pins_refuse_writers_until_released_on_any_thread() {
        let lock = &AccessLock::default();
        let (pin, _) = lock.hold(0x1000..0x3000, true);
        assert!(!lock.held_here(), "a pin is not this thread's hold");
        match lock.exclusive("test", 0x2000..0x5000).map(drop) {
            Err(Error::Pinned { gpa, len }) => assert_eq!((gpa.0, len), (0x2000, 0x1000)),
            other => panic!("{other:?}"),
        }
        drop(lock.exclusive("test", 0x3000..0x5000).unwrap());
        std::thread::scope(|scope| scope.spawn(move || lock.release(pin)).join().unwrap());
        drop(lock.exclusive("test", 0..0x5000).unwrap());
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

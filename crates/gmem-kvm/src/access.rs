//! The lock between host accesses and the changes that take pages away.
//!
//! Host accesses (copies, the vm-memory view) hold it shared; every
//! invalidation (the owner callback, before the kernel frees pages) and the
//! two steps of a conversion that touch page states hold it exclusively. So
//! a page the host is reading cannot be converted or freed under it: the
//! change waits until the host is done, which is what makes device access
//! fault-free (no SIGBUS, no private bytes). It is never held across a file
//! operation: a punch or truncate takes the file's resize lock first and
//! this lock in its callback, and the other order would deadlock with it.
//!
//! Unlike `std`'s lock it knows its holders: a thread may nest shared holds, may take it shared while it holds it
//! exclusively (a conversion's own invalidation), gets `EDEADLK` for
//! exclusive while it holds it shared, and a waiting writer keeps new
//! readers out so that conversions are not starved.

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};

fn current_thread() -> std::thread::ThreadId {
    std::thread::current().id()
}

#[derive(Debug, Default)]
struct State {
    readers: Vec<(std::thread::ThreadId, usize)>,
    writer: Option<(std::thread::ThreadId, usize)>,
    writers_waiting: usize,
}

impl State {
    fn reads(&self, thread: std::thread::ThreadId) -> bool {
        self.readers.iter().any(|(t, _)| *t == thread)
    }

    fn writes(&self, thread: std::thread::ThreadId) -> bool {
        self.writer.is_some_and(|(t, _)| t == thread)
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
pub(crate) struct Shared<'a>(&'a AccessLock, NotSend);

/// An exclusive hold; released on drop, on the thread that took it.
#[derive(Debug)]
pub(crate) struct Exclusive<'a>(&'a AccessLock, NotSend);

impl AccessLock {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(state).unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the lock shared.
    pub(crate) fn shared(&self) -> Shared<'_> {
        let me = current_thread();
        let mut state = self.state();
        // A holder nests; anyone else waits for writers, waiting ones too.
        while !(state.writes(me) || state.reads(me))
            && (state.writer.is_some() || state.writers_waiting > 0)
        {
            state = self.wait(state);
        }
        match state.readers.iter_mut().find(|(t, _)| *t == me) {
            Some((_, n)) => *n += 1,
            None => state.readers.push((me, 1)),
        }
        Shared(self, NotSend::default())
    }

    /// Whether this thread holds the lock shared.
    pub(crate) fn held_shared_here(&self) -> bool {
        self.state().reads(current_thread())
    }

    /// `EDEADLK` if this thread holds the lock shared: it must not wait for
    /// a change that waits for its own access.
    pub(crate) fn check_not_shared_here(&self, op: &'static str) -> Result<()> {
        let me = current_thread();
        let state = self.state();
        if state.reads(me) && !state.writes(me) {
            return Err(Error::Memory(gmem::Error::WouldDeadlock {
                op,
                held: "host access to guest memory (a read, write or shared view)".into(),
            }));
        }
        Ok(())
    }

    /// Takes the lock exclusively; `EDEADLK` if this thread holds it shared.
    pub(crate) fn exclusive(&self, op: &'static str) -> Result<Exclusive<'_>> {
        // Only this thread changes its own holds: the check stays true
        // after the state lock is dropped and taken again.
        self.check_not_shared_here(op)?;
        let me = current_thread();
        let mut state = self.state();
        state.writers_waiting += 1;
        loop {
            match state.writer {
                Some((t, depth)) if t == me => {
                    state.writer = Some((me, depth + 1));
                    break;
                }
                None if state.readers.is_empty() => {
                    state.writer = Some((me, 1));
                    break;
                }
                _ => state = self.wait(state),
            }
        }
        state.writers_waiting -= 1;
        Ok(Exclusive(self, NotSend::default()))
    }
}

impl Drop for Shared<'_> {
    fn drop(&mut self) {
        let me = current_thread();
        let mut state = self.0.state();
        if let Some(i) = state.readers.iter().position(|(t, _)| *t == me) {
            state.readers[i].1 -= 1;
            if state.readers[i].1 == 0 {
                state.readers.swap_remove(i);
            }
        }
        drop(state);
        self.0.changed.notify_all();
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        if let Some((_, depth)) = state.writer.as_mut() {
            *depth -= 1;
            if *depth == 0 {
                state.writer = None;
            }
        }
        drop(state);
        self.0.changed.notify_all();
    }
}

//! Kicking vCPU threads out of `KVM_RUN`, the rust-vmm way: set the vCPU's
//! `immediate_exit`, then send its thread a signal whose handler does
//! nothing. A vCPU about to enter `KVM_RUN` sees `immediate_exit`; one
//! inside it gets `EINTR`.
//!
//! The signal is `SIGUSR2`, a standard signal: at most one is ever pending
//! per thread, and the kernel delivers it even when the user's queue of
//! real-time signals is full or `RLIMIT_SIGPENDING` is 0 (a real-time
//! signal, resent while a vCPU is stuck, filled that queue and then failed
//! with `EAGAIN`). This is gmem's own VMM: a library must not take a signal.

use std::sync::Once;

use gmem_kvm::{Errno, Error, Result};

/// The signal that kicks vCPU threads.
pub const KICK_SIGNAL: i32 = libc::SIGUSR2;

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the no-op handler of [`KICK_SIGNAL`] (once per process).
pub fn install_handler() -> Result<()> {
    static INSTALLED: Once = Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_kick as *const () as usize;
        // SAFETY: installs a handler that does nothing (async-signal-safe)
        // for a signal only this module sends.
        if unsafe { libc::sigaction(KICK_SIGNAL, &action, std::ptr::null_mut()) } != 0 {
            let errno =
                Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL);
            result = Err(Error::Os { op: "sigaction", errno });
        }
    });
    result
}

/// What kicks one vCPU thread: its `kvm_run` area and its pthread.
#[derive(Clone, Copy)]
pub(crate) struct Kicker {
    run: *mut kvm_bindings::kvm_run,
    thread: libc::pthread_t,
}

// SAFETY: the pointer is only written through (a volatile byte store to a
// kernel-shared page) while the vCPU it belongs to is alive, which the run
// loop guarantees by keeping every VcpuFd until the kicking is over.
unsafe impl Send for Kicker {}

impl Kicker {
    /// A kicker for the calling thread, which runs the vCPU whose `kvm_run`
    /// is `run`.
    pub(crate) fn for_current_thread(run: *mut kvm_bindings::kvm_run) -> Self {
        // SAFETY: pthread_self has no preconditions.
        Self { run, thread: unsafe { libc::pthread_self() } }
    }

    /// Makes the vCPU leave `KVM_RUN` (or not enter it again).
    ///
    /// # Safety
    ///
    /// The vCPU's `VcpuFd` (which owns the `kvm_run` mapping) and its
    /// thread must still exist.
    pub(crate) unsafe fn kick(&self) {
        // SAFETY: the caller keeps the kvm_run mapping alive, so the field's
        // address is in bounds of a live allocation.
        let immediate_exit = unsafe { std::ptr::addr_of_mut!((*self.run).immediate_exit) };
        // SAFETY: as above; a volatile byte store is what KVM reads at the
        // next entry.
        unsafe { immediate_exit.write_volatile(1) };
        // SAFETY: the caller keeps the thread alive; the signal has a
        // no-op handler (install_handler ran before any vCPU thread).
        unsafe { libc::pthread_kill(self.thread, KICK_SIGNAL) };
    }
}

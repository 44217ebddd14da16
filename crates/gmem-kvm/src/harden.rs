//! Process hardening a VMM can opt into: what a library must not do behind
//! its user's back, but every VMM holding private guest memory wants.
//!
//! gmem already keeps every mapping of guest memory out of core dumps
//! (`MADV_DONTDUMP`) and out of forked children (`MADV_DONTFORK`).
//! [`harden_process`] adds `PR_SET_DUMPABLE` 0: no core dump at all, and
//! `/proc/PID/mem`, `/proc/PID/fd` and ptrace are closed to processes of
//! the same user that lack `CAP_SYS_PTRACE`. What user space cannot stop:
//! root (or `CAP_SYS_PTRACE`) reading the process, and code of this
//! process itself. The kernel's guest_memfd with `NO_DIRECT_MAP` goes
//! further where the kernel has it.

use crate::error::{Error, Result};

/// Makes the process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`); see the
/// module docs. Process-wide and irreversible in practice: call it once, at
/// VMM start-up, if you want it.
pub fn harden_process() -> Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(Error::os("prctl(PR_SET_DUMPABLE, 0)"))
}

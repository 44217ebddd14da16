//! A jailed VMM's privileges: userfaultfd without `CAP_SYS_PTRACE` (where
//! `vm.unprivileged_userfaultfd` is 0, the system call is refused and
//! `/dev/userfaultfd` is the way), and userfaultfds the caller opened.

mod common;

use std::os::fd::OwnedFd;

use common::{kvm, RAM};
use gmem_kvm::{Errno, PrivateMemory, DEFAULT_FAULT_AROUND_PAGES};
use gmem_runner::{Outcome, Vm};

const CHILD: &str = "GMEM_TEST_JAILED_CHILD";

/// Runs in a child process (this test binary again) that drops
/// `CAP_SYS_PTRACE`: the `userfaultfd` system call is refused there, and a
/// guest still runs, its faults served through a userfaultfd from
/// `/dev/userfaultfd`.
#[test]
fn guests_run_without_cap_sys_ptrace_through_dev_userfaultfd() {
    if !kvm() {
        return;
    }
    if std::env::var_os(CHILD).is_some() {
        return jailed_child();
    }
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd");
    if sysctl.is_ok_and(|s| s.trim() == "1") {
        eprintln!("SKIPPED: vm.unprivileged_userfaultfd=1 lets the system call through anyway");
        return;
    }
    let (passed, text) =
        common::run_in_child("guests_run_without_cap_sys_ptrace_through_dev_userfaultfd", CHILD);
    assert!(passed, "{text}");
    assert!(text.contains("jailed child: the guest exited 0"), "{text}");
}

fn jailed_child() {
    use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
    let mut caps = capabilities(None).unwrap();
    caps.effective -= CapabilitySet::SYS_PTRACE;
    caps.permitted -= CapabilitySet::SYS_PTRACE;
    caps.inheritable -= CapabilitySet::SYS_PTRACE;
    set_capabilities(None, caps).unwrap();
    let flags = rustix::mm::UserfaultfdFlags::CLOEXEC;
    // SAFETY: creates a descriptor (or fails); no memory is affected.
    let refused = unsafe { rustix::mm::userfaultfd(flags) }.map(drop);
    assert_eq!(refused, Err(Errno::PERM), "the system call must be refused here");
    let (vm, _file) = Vm::with_ram(RAM).unwrap();
    let report = common::run(&vm, "touch", 1, &|_, _| {});
    assert_eq!(report.outcome, Outcome::Exit(0));
    assert!(vm.stats().memory.pages_served > 0, "gmem served the first touches");
    println!("jailed child: the guest exited 0");
}

/// Userfaultfds the VMM opened itself make a memory; a descriptor that is
/// not a userfaultfd is refused (`ENOTTY`, the kernel's answer), as is one
/// already set up (`EINVAL`).
#[test]
fn memory_takes_userfaultfds_the_caller_opened() {
    if !kvm() {
        return;
    }
    let open = || -> OwnedFd {
        let flags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        // SAFETY: creates a descriptor; no memory is affected.
        unsafe { rustix::mm::userfaultfd(flags) }.unwrap()
    };
    let memory =
        PrivateMemory::with_userfaultfds(DEFAULT_FAULT_AROUND_PAGES, open(), open()).unwrap();
    drop(memory);
    let memfd = || rustix::fs::memfd_create("not-a-uffd", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let refused = PrivateMemory::with_userfaultfds(DEFAULT_FAULT_AROUND_PAGES, memfd(), open());
    assert_eq!(refused.unwrap_err().errno(), Errno::NOTTY);
    // One userfaultfd twice: its second handshake is refused.
    let once = open();
    let twice = once.try_clone().unwrap();
    let refused = PrivateMemory::with_userfaultfds(DEFAULT_FAULT_AROUND_PAGES, once, twice);
    assert_eq!(refused.unwrap_err().errno(), Errno::INVAL);
    let refused = PrivateMemory::with_userfaultfds(0, open(), open());
    assert_eq!(refused.unwrap_err().errno(), Errno::INVAL);
}

//! Guests whose KVM window the memlock limit refuses to lock (the file's
//! frame window was locked first). Alone in its own test binary:
//! `RLIMIT_MEMLOCK` counts every locked mapping of the process.

mod common;

use std::sync::Arc;

use common::{console, kvm, RAM};
use gmem::{FileOffset, PrivateMemFile};
use gmem_runner::{Gpa, Outcome, Vm};

/// What a guest run under the limit left: its outcome and console, the
/// memory's counters, and the KVM window's smaps `Locked:` and `VmFlags`.
struct Run {
    outcome: Outcome,
    console: String,
    stats: gmem_kvm::MemoryStats,
    locked_pages: u64,
    vm_flags: String,
}

/// Runs `guest` where its KVM window is not locked: refused by a 1 MiB
/// limit without `CAP_IPC_LOCK`, or (`files_only`) by the memory's policy.
fn run_unlocked(guest: &'static str, files_only: bool) -> Run {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
    std::thread::spawn(move || {
        // The file's frame window is locked first, with CAP_IPC_LOCK.
        let vm = Vm::new().unwrap();
        let file = Arc::new(PrivateMemFile::new_guest("ram").unwrap());
        file.set_len(RAM).unwrap();
        if files_only {
            vm.memory().set_memlock_policy(gmem_kvm::MemlockPolicy::FilesOnly);
            vm.add_private_memory(Gpa(0), &file, FileOffset(0), RAM).unwrap();
            return finish(&vm, guest);
        }
        // Capabilities are per thread: drop CAP_IPC_LOCK in this one (and
        // the vCPU and fault threads it starts) only; the process's locked
        // memory is already past a 1 MiB limit.
        let mut caps = capabilities(None).unwrap();
        caps.effective.remove(CapabilitySet::IPC_LOCK);
        set_capabilities(None, caps).unwrap();
        let old = getrlimit(Resource::Memlock);
        let limit = old.current.map_or(1 << 20, |current| current.min(1 << 20));
        setrlimit(Resource::Memlock, Rlimit { current: Some(limit), maximum: old.maximum })
            .unwrap();
        vm.add_private_memory(Gpa(0), &file, FileOffset(0), RAM).unwrap();
        setrlimit(Resource::Memlock, old).unwrap();
        finish(&vm, guest)
    })
    .join()
    .unwrap()
}

/// Runs `guest` on `vm` and says what its KVM window holds.
fn finish(vm: &Vm, guest: &'static str) -> Run {
    let report = common::launch(vm, guest, RAM, &common::config(1), || {}, &|_, _| {});
    let window = vm.memory().regions()[0].userspace_addr();
    let flags = common::smaps_entry(window).into_iter().find(|l| l.starts_with("VmFlags"));
    Run {
        console: console(&report),
        outcome: report.outcome,
        stats: vm.stats().memory,
        locked_pages: common::locked_pages_of_mapping(window),
        vm_flags: flags.unwrap(),
    }
}

/// Where the limit (or the `FilesOnly` policy) leaves KVM's window
/// unlocked, first touches are
/// allocated in the frame window, as before windows were locked: dense and
/// sparse guests run, a sparse one is not handed to the kernel (the pages
/// the kernel allocated would be locked by nothing), and the window holds
/// no locked page of its own.
#[test]
fn guests_run_where_kvm_windows_cannot_be_locked() {
    if !kvm() {
        return;
    }
    // Refused by the limit, or by the memory's policy (RAM charged once).
    for (guest, files_only) in
        [("touch", false), ("sparse", false), ("touch", true), ("sparse", true)]
    {
        let run = run_unlocked(guest, files_only);
        assert_eq!(run.outcome, Outcome::Exit(0), "{guest}: {}", run.console);
        assert!(!run.vm_flags.contains(" lf"), "{guest}: window not locked: {}", run.vm_flags);
        assert_eq!(run.stats.kernel_handovers, 0, "{guest}: {:?}", run.stats);
        assert!(run.stats.pages_served > 0, "{guest}: {:?}", run.stats);
        // Every page served is locked by the frame window, none by this one.
        assert_eq!(run.locked_pages, 0, "{guest}");
    }
}

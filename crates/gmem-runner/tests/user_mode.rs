//! GUEST_ABI 1.2: guests that switch to user mode and reach the VMM
//! through the doorbell, and the doorbell's refusals.

mod common;

use std::sync::Mutex;

use common::{config, console, kvm, launch, run, RAM};
use gmem::Errno;
use gmem_runner::{Gpa, Outcome, Vm};

/// The `user` guest, on 2 vCPUs both in user mode: it converts, syncs
/// (the host reads its message and writes the exit code), converts back,
/// gets -22 for a bad request and exits with the host's byte.
#[test]
fn a_user_mode_guest_converts_syncs_and_exits_through_the_doorbell() {
    if !kvm() {
        return;
    }
    let (vm, _files) = Vm::with_ram(RAM).unwrap();
    let seen = Mutex::new(Vec::new());
    let report = run(&vm, "user", 2, &|vm, stage| {
        assert_eq!(stage, 1);
        let mut message = [0u8; 10];
        vm.memory().read(Gpa(0x60_0000), &mut message).unwrap();
        seen.lock().unwrap().extend_from_slice(&message);
        vm.memory().write(Gpa(0x60_0040), &[42]).unwrap();
        // The next page stayed private: the host is refused.
        let denied = vm.memory().read(Gpa(0x60_1000), &mut [0u8; 8]).unwrap_err();
        assert_eq!(denied.errno(), Errno::PERM, "{denied}");
    });
    assert_eq!(report.outcome, Outcome::Exit(42), "{}", console(&report));
    assert_eq!(&*seen.lock().unwrap(), b"user->host");
    assert!(console(&report).contains("user: in user mode on 2 vCPU(s)"), "{}", console(&report));
    let stats = vm.stats();
    // Two conversions carried out, one refused, all through the doorbell.
    assert_eq!(stats.conversion_requests, 3, "{stats:?}");
    assert_eq!(stats.memory.conversions, 2, "{stats:?}");
}

/// The `badbell` guest makes, in user mode, the doorbell access the word
/// at 0x600000 names: a read, an offset that is no port and an 8-byte
/// write stop the VM with an error naming the GPA; a 2-byte exit write is
/// a valid exit.
#[test]
fn doorbell_misuse_stops_the_vm_with_an_error_naming_the_gpa() {
    if !kvm() {
        return;
    }
    let cases: [(u64, &str); 3] = [
        (0, "doorbell read at GPA 0xdffff0f4"),
        (1, "doorbell write at GPA 0xdffff010: offset 0x10 is no port"),
        (2, "doorbell write of 8 bytes at GPA 0xdffff0f4"),
    ];
    let run_case = |case: u64| {
        let (vm, _files) = Vm::with_ram(RAM).unwrap();
        let populate = || vm.populate(Gpa(0x60_0000), &case.to_le_bytes()).unwrap();
        launch(&vm, "badbell", RAM, &config(1), populate, &|_, _| {})
    };
    for (case, expected) in cases {
        let report = run_case(case);
        match &report.outcome {
            Outcome::Error(why) => assert!(why.contains(expected), "case {case}: {why}"),
            other => panic!("case {case}: {other:?}: {}", console(&report)),
        }
    }
    assert_eq!(run_case(3).outcome, Outcome::Exit(0x1234));
}

/// The TLB-bound benchmark guest reads back, in user mode, what it wrote
/// into every page of its RAM (here 64 MiB, above and below nothing).
#[test]
fn the_tlb_guest_reads_back_its_first_touches() {
    if !kvm() {
        return;
    }
    let (vm, _files) = Vm::with_ram(RAM).unwrap();
    let report = run(&vm, "tlb", 1, &|_, _| {});
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    let pages = (RAM - (4 << 20) - gmem_runner::boot::STACK_SIZE) / gmem::PAGE_SIZE;
    assert!(console(&report).contains(&format!("pages={pages}")), "{}", console(&report));
}

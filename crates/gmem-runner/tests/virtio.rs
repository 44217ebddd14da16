//! The virtio-blk device against a hostile driver: descriptors pointing at
//! private pages, outside RAM or into the gap, chains that loop, a queue in
//! private memory. The device answers with an error status or marks itself
//! as needing reset, moves no private byte into the file and no file byte
//! into private memory, and the transport goes on answering.

mod common;

use common::rig::*;
use common::{kvm, RAM};
use gmem_runner::{Gpa, Vm};

#[test]
fn buffers_outside_shared_memory_get_an_io_error_and_move_nothing() {
    if !kvm() {
        return;
    }
    let vm = Vm::with_ram(RAM).unwrap().0;
    let mut rig = Rig::new(&vm, "buffers");
    // A good request first: the rig works.
    rig.memory.write(Gpa(DATA), &[0x5a; 512]).unwrap();
    assert_eq!(rig.request(OUT, DATA, 512), 0);
    assert_eq!(&rig.file()[..512], &[0x5a; 512]);
    let stats = rig.disk.device().stats();
    for (what, data) in [
        ("a private page", PRIVATE),
        ("outside RAM", RAM + 0x1000),
        ("the MMIO gap", 0xD000_0000),
        ("an address that wraps", u64::MAX - 100),
    ] {
        // OUT: no private (or absent) byte reaches the file.
        let before = rig.file();
        assert_eq!(rig.request(OUT, data, 512), IOERR, "OUT from {what}");
        assert_eq!(rig.file(), before, "OUT from {what} changed the file");
        // IN: no file byte lands there.
        assert_eq!(rig.request(IN, data, 512), IOERR, "IN into {what}");
        assert_eq!(
            rig.disk.status() & NEEDS_RESET,
            0,
            "{what}: a bad buffer is an I/O error, not a reset"
        );
    }
    let after = rig.disk.device().stats();
    assert_eq!((after.bytes_in, after.bytes_out), (stats.bytes_in, stats.bytes_out));
    assert_eq!(after.errors, stats.errors + 8);
    assert!(!rig.file().windows(8).any(|w| w == b"PRIVATE-"), "private bytes in the disk file");
}

#[test]
fn chains_that_loop_or_overrun_mark_the_device_as_needing_reset() {
    if !kvm() {
        return;
    }
    let vm = Vm::with_ram(RAM).unwrap().0;
    let mut rig = Rig::new(&vm, "loop");
    rig.header(IN, 0);
    rig.desc(0, HEADER, 16, NEXT, 1);
    rig.desc(1, DATA, 512, NEXT | WRITE, 0);
    assert_eq!(rig.submit(), 0xff, "no status written for a looping chain");
    assert_ne!(rig.disk.status() & NEEDS_RESET, 0);
    assert!(
        rig.disk.reset_reason.as_deref().unwrap().contains("loops"),
        "{:?}",
        rig.disk.reset_reason
    );
    // A driver reset brings the device back.
    let vm = Vm::with_ram(RAM).unwrap().0;
    let mut rig = Rig::new(&vm, "too-long");
    rig.header(IN, 0);
    for i in 0..8u16 {
        rig.desc(u64::from(i), DATA + 512 * u64::from(i), 512, NEXT | WRITE, (i + 1) % 8);
    }
    rig.submit();
    assert_ne!(rig.disk.status() & NEEDS_RESET, 0);
}

#[test]
fn a_queue_or_status_in_private_memory_marks_the_device_as_needing_reset() {
    if !kvm() {
        return;
    }
    let vm = Vm::with_ram(RAM).unwrap().0;
    let mut rig = Rig::new(&vm, "private-queue");
    // The available ring moved into a private page.
    rig.reg(0x44, 0);
    rig.reg(0x90, PRIVATE as u32);
    rig.reg(0x44, 1);
    rig.reg(0x50, 0);
    assert_ne!(rig.disk.status() & NEEDS_RESET, 0);
    assert!(
        rig.disk
            .reset_reason
            .as_deref()
            .unwrap()
            .contains("rings are not in (shared) guest memory"),
        "{:?}",
        rig.disk.reset_reason
    );
    // A status byte in private memory.
    let vm = Vm::with_ram(RAM).unwrap().0;
    let mut rig = Rig::new(&vm, "private-status");
    rig.header(IN, 0);
    rig.desc(0, HEADER, 16, NEXT, 1);
    rig.desc(1, DATA, 512, NEXT | WRITE, 2);
    rig.desc(2, PRIVATE, 1, WRITE, 0);
    rig.submit();
    assert_ne!(rig.disk.status() & NEEDS_RESET, 0);
    assert!(
        rig.disk.reset_reason.as_deref().unwrap().contains("status byte"),
        "{:?}",
        rig.disk.reset_reason
    );
    // Reset: the device works again.
    rig.reg(0x70, 0);
    assert_eq!(rig.disk.status(), 0);
}

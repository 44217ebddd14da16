//! The virtio-blk device against a hostile driver: descriptors pointing at
//! private pages, outside RAM or into the gap, chains that loop, a queue in
//! private memory. The device answers with an error status or marks itself
//! as needing reset, moves no private byte into the file and no file byte
//! into private memory, and the transport goes on answering.

mod common;

use common::{kvm, RAM};
use gmem_kvm::PageState;
use gmem_runner::{Disk, Gpa, Vm};
use gmem_virtio::blk::Block;
use gmem_virtio::mmio::VirtioMmio;

const QUEUE: u64 = 0xA0_0000;
const AVAIL: u64 = QUEUE + 0x100;
const USED: u64 = QUEUE + 0x200;
const HEADER: u64 = 0xA1_0000;
const STATUS: u64 = HEADER + 0x10;
const DATA: u64 = 0xA1_1000;
const PRIVATE: u64 = 0xB0_0000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const NEEDS_RESET: u32 = 64;

struct Rig {
    vm: Vm,
    disk: Disk,
    path: std::path::PathBuf,
    avail: u16,
}

impl Rig {
    /// A VM whose queue and bounce pages are shared, a 1 MiB disk, and a
    /// driver that set up queue 0 of 8 entries.
    fn new(name: &str) -> Self {
        let (vm, _file) = Vm::with_ram(RAM).unwrap();
        vm.memory().convert(Gpa(QUEUE), DATA + 0x1_0000 - QUEUE, PageState::Shared).unwrap();
        vm.memory().populate(Gpa(PRIVATE), b"PRIVATE-SECRET-BYTES").unwrap();
        let path = std::env::temp_dir().join(format!("gmem-virtio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let disk = VirtioMmio::new(Block::open(&path, 1 << 20).unwrap());
        let mut rig = Rig { vm, disk, path, avail: 0 };
        for (offset, value) in [
            (0x70, 1 | 2),
            (0x14, 1),
            (0x24, 1),
            (0x20, 1),
            (0x70, 1 | 2 | 8),
            (0x30, 0),
            (0x38, 8),
            (0x80, QUEUE as u32),
            (0x90, AVAIL as u32),
            (0xa0, USED as u32),
            (0x44, 1),
            (0x70, 1 | 2 | 8 | 4),
        ] {
            rig.reg(offset, value);
        }
        rig
    }

    fn reg(&mut self, offset: u64, value: u32) {
        let view = self.vm.memory().shared();
        self.disk.write(offset, &value.to_le_bytes(), &view);
    }

    fn desc(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = addr.to_le_bytes().to_vec();
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&next.to_le_bytes());
        self.vm.memory().write(Gpa(QUEUE + 16 * index), &raw).unwrap();
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut raw = kind.to_le_bytes().to_vec();
        raw.extend_from_slice(&[0; 4]);
        raw.extend_from_slice(&sector.to_le_bytes());
        self.vm.memory().write(Gpa(HEADER), &raw).unwrap();
        self.vm.memory().write(Gpa(STATUS), &[0xff]).unwrap();
    }

    /// Makes chain 0 available and notifies; returns the status byte.
    fn submit(&mut self) -> u8 {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % 8);
        self.vm.memory().write(Gpa(slot), &0u16.to_le_bytes()).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.vm.memory().write(Gpa(AVAIL + 2), &self.avail.to_le_bytes()).unwrap();
        self.reg(0x50, 0);
        let mut status = [0u8];
        self.vm.memory().read(Gpa(STATUS), &mut status).unwrap();
        status[0]
    }

    /// A request: header, one data buffer, status.
    fn request(&mut self, kind: u32, data: u64, len: u32) -> u8 {
        self.header(kind, 0);
        let flags = if kind == 0 { NEXT | WRITE } else { NEXT };
        self.desc(0, HEADER, 16, NEXT, 1);
        self.desc(1, data, len, flags, 2);
        self.desc(2, STATUS, 1, WRITE, 0);
        self.submit()
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const IN: u32 = 0;
const OUT: u32 = 1;
const IOERR: u8 = 1;

#[test]
fn buffers_outside_shared_memory_get_an_io_error_and_move_nothing() {
    if !kvm() {
        return;
    }
    let mut rig = Rig::new("buffers");
    // A good request first: the rig works.
    rig.vm.memory().write(Gpa(DATA), &[0x5a; 512]).unwrap();
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
    let mut rig = Rig::new("loop");
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
    let mut rig = Rig::new("too-long");
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
    let mut rig = Rig::new("private-queue");
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
    let mut rig = Rig::new("private-status");
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

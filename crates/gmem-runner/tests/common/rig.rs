//! A virtio-blk device and a driver on the host side: the driver writes
//! the queue into shared pages as a guest's would, the device reaches them
//! through a [`DeviceMemory`] handle.

use std::sync::Arc;

use gmem_kvm::{DeviceMemory, PageState, PrivateMemory};
use gmem_runner::{Disk, Gpa, Vm};
use gmem_virtio::blk::Block;
use gmem_virtio::mmio::VirtioMmio;
use vm_memory::GuestAddressSpace;

pub const QUEUE: u64 = 0xA0_0000;
pub const AVAIL: u64 = QUEUE + 0x100;
pub const USED: u64 = QUEUE + 0x200;
pub const HEADER: u64 = 0xA1_0000;
pub const STATUS: u64 = HEADER + 0x10;
pub const DATA: u64 = 0xA1_1000;
pub const PRIVATE: u64 = 0xB0_0000;
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const NEEDS_RESET: u32 = 64;

pub struct Rig {
    pub memory: Arc<PrivateMemory>,
    pub device: DeviceMemory,
    pub disk: Disk,
    path: std::path::PathBuf,
    avail: u16,
}

impl Rig {
    /// `vm`'s queue and bounce pages made shared, a 1 MiB disk whose
    /// device reaches memory through a [`DeviceMemory`] handle, and a
    /// driver that set up queue 0 of 8 entries. Works on any thread.
    pub fn new(vm: &Vm, name: &str) -> Self {
        let memory = vm.memory().clone();
        memory.convert(Gpa(QUEUE), DATA + 0x1_0000 - QUEUE, PageState::Shared).unwrap();
        memory.populate(Gpa(PRIVATE), b"PRIVATE-SECRET-BYTES").unwrap();
        let path = std::env::temp_dir().join(format!("gmem-virtio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let disk = VirtioMmio::new(Block::open(&path, 1 << 20).unwrap());
        let device = DeviceMemory::new(&memory);
        let mut rig = Rig { memory, device, disk, path, avail: 0 };
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

    pub fn reg(&mut self, offset: u64, value: u32) {
        let view = self.device.memory();
        self.disk.write(offset, &value.to_le_bytes(), &*view);
    }

    pub fn desc(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = addr.to_le_bytes().to_vec();
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&next.to_le_bytes());
        self.memory.write(Gpa(QUEUE + 16 * index), &raw).unwrap();
    }

    pub fn header(&self, kind: u32, sector: u64) {
        let mut raw = kind.to_le_bytes().to_vec();
        raw.extend_from_slice(&[0; 4]);
        raw.extend_from_slice(&sector.to_le_bytes());
        self.memory.write(Gpa(HEADER), &raw).unwrap();
        self.memory.write(Gpa(STATUS), &[0xff]).unwrap();
    }

    /// Makes chain 0 available and notifies; returns the status byte.
    pub fn submit(&mut self) -> u8 {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % 8);
        self.memory.write(Gpa(slot), &0u16.to_le_bytes()).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.memory.write(Gpa(AVAIL + 2), &self.avail.to_le_bytes()).unwrap();
        self.reg(0x50, 0);
        let mut status = [0u8];
        self.memory.read(Gpa(STATUS), &mut status).unwrap();
        status[0]
    }

    /// A request: header, one data buffer, status.
    pub fn request(&mut self, kind: u32, data: u64, len: u32) -> u8 {
        self.header(kind, 0);
        let flags = if kind == 0 { NEXT | WRITE } else { NEXT };
        self.desc(0, HEADER, 16, NEXT, 1);
        self.desc(1, data, len, flags, 2);
        self.desc(2, STATUS, 1, WRITE, 0);
        self.submit()
    }

    pub fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub const IN: u32 = 0;
pub const OUT: u32 = 1;
pub const IOERR: u8 = 1;

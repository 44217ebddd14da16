//! A no_std virtio-blk driver over virtio-mmio for the guests (GUEST_ABI
//! 1.1 devices): one virtqueue and bounce buffers in pages the guest
//! converted to shared; the device serves each request during its notify.
#![allow(dead_code)]

use core::sync::atomic::{fence, Ordering};

use crate::rt;

/// The virtqueue: descriptor table, available ring, used ring (shared).
pub const QUEUE: u64 = 0xA0_0000;
pub const AVAIL: u64 = QUEUE + 0x100;
pub const USED: u64 = QUEUE + 0x200;
/// Bounce buffers (shared): request header, status byte, id, data.
pub const HEADER: u64 = 0xA1_0000;
pub const STATUS: u64 = HEADER + 0x10;
pub const ID: u64 = HEADER + 0x20;
pub const DATA: u64 = 0xA1_1000;
/// Everything shared: the queue page up to the end of the data buffer.
pub const SHARED_END: u64 = DATA + MAX_REQUEST;
pub const MAX_REQUEST: u64 = 64 << 10;
pub const QSIZE: u16 = 8;

pub const IN: u32 = 0;
pub const OUT: u32 = 1;
pub const FLUSH: u32 = 4;
pub const GET_ID: u32 = 8;

pub fn r32(gpa: u64) -> u32 {
    // SAFETY: an identity-mapped device register or RAM word.
    unsafe { core::ptr::read_volatile(gpa as *const u32) }
}
pub fn w32(gpa: u64, v: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(gpa as *mut u32, v) }
}
pub fn r16(gpa: u64) -> u16 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(gpa as *const u16) }
}
pub fn w16(gpa: u64, v: u16) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(gpa as *mut u16, v) }
}
pub fn r8(gpa: u64) -> u8 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(gpa as *const u8) }
}
pub fn w8(gpa: u64, v: u8) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(gpa as *mut u8, v) }
}

/// Copies `len` bytes (a multiple of 8) between guest addresses, with
/// one `rep movsq` (KVM's emulator, where guest code runs through it, then
/// moves the whole run in one instruction rather than one per word).
pub fn copy(to: u64, from: u64, len: u64) {
    // SAFETY: both ranges are identity-mapped RAM the caller owns; the
    // direction flag is clear (interrupts are off and nothing sets it).
    unsafe {
        core::arch::asm!("rep movsq", inout("rdi") to => _, inout("rsi") from => _,
                         inout("rcx") len / 8 => _, options(nostack, preserves_flags))
    }
}

pub fn pattern(run: u64, sector: u64, word: u64) -> u64 {
    ((sector << 9) + word * 8 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ run
}

pub struct Driver {
    base: u64,
    avail: u16,
}

impl Driver {
    fn reg(&self, offset: u64) -> u64 {
        self.base + offset
    }

    /// Resets the device, negotiates VERSION_1 and FLUSH, sets up queue 0.
    pub fn init(base: u64) -> Result<Self, &'static str> {
        let d = Driver { base, avail: 0 };
        if r32(d.reg(0)) != 0x7472_6976 || r32(d.reg(4)) != 2 || r32(d.reg(8)) != 2 {
            return Err("not a virtio-mmio v2 block device");
        }
        w32(d.reg(0x70), 0);
        w32(d.reg(0x70), 1 | 2);
        w32(d.reg(0x14), 1);
        if r32(d.reg(0x10)) & 1 == 0 {
            return Err("the device does not offer VIRTIO_F_VERSION_1");
        }
        w32(d.reg(0x14), 0);
        let flush = r32(d.reg(0x10)) & (1 << 9);
        if flush == 0 {
            return Err("the device does not offer FLUSH");
        }
        w32(d.reg(0x24), 0);
        w32(d.reg(0x20), flush);
        w32(d.reg(0x24), 1);
        w32(d.reg(0x20), 1);
        w32(d.reg(0x70), 1 | 2 | 8);
        if r32(d.reg(0x70)) & 8 == 0 {
            return Err("FEATURES_OK was not kept");
        }
        w32(d.reg(0x30), 0);
        if r32(d.reg(0x34)) < u32::from(QSIZE) {
            return Err("the queue is too small");
        }
        w32(d.reg(0x38), u32::from(QSIZE));
        for (low, at) in [(0x80, QUEUE), (0x90, AVAIL), (0xa0, USED)] {
            w32(d.reg(low), at as u32);
            w32(d.reg(low + 4), (at >> 32) as u32);
        }
        w32(d.reg(0x44), 1);
        w32(d.reg(0x70), 1 | 2 | 8 | 4);
        Ok(d)
    }

    pub fn capacity(&self) -> u64 {
        u64::from(r32(self.reg(0x100))) | u64::from(r32(self.reg(0x104))) << 32
    }

    fn desc(i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = QUEUE + 16 * i;
        rt::write_u64(at, addr);
        w32(at + 8, len);
        w16(at + 12, flags);
        w16(at + 14, next);
    }

    /// One request: header, optional data buffer of `len` bytes at DATA
    /// (device-writable for IN and GET_ID), status byte. Returns the status.
    pub fn request(&mut self, kind: u32, sector: u64, len: u64) -> u8 {
        w32(HEADER, kind);
        w32(HEADER + 4, 0);
        rt::write_u64(HEADER + 8, sector);
        w8(STATUS, 0xff);
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let data = if kind == GET_ID { ID } else { DATA };
        if len == 0 {
            Self::desc(0, HEADER, 16, NEXT, 1);
            Self::desc(1, STATUS, 1, WRITE, 0);
        } else {
            let flags = if kind == OUT { NEXT } else { NEXT | WRITE };
            Self::desc(0, HEADER, 16, NEXT, 1);
            Self::desc(1, data, len as u32, flags, 2);
            Self::desc(2, STATUS, 1, WRITE, 0);
        }
        w16(AVAIL + 4 + 2 * u64::from(self.avail % QSIZE), 0);
        fence(Ordering::SeqCst);
        self.avail = self.avail.wrapping_add(1);
        w16(AVAIL + 2, self.avail);
        fence(Ordering::SeqCst);
        w32(self.reg(0x50), 0);
        // The device serves the queue during the notify; poll all the same.
        while r16(USED + 2) != self.avail {
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        r8(STATUS)
    }
}


/// Shares the queue and bounce pages and sets the first device up.
pub fn setup(boot: &rt::BootInfo) -> Result<Driver, &'static str> {
    let base = boot.first_device().ok_or("no device (run with --disk PATH)")?;
    if rt::convert(QUEUE, SHARED_END - QUEUE, rt::SHARED) != 0 {
        return Err("the bounce pages could not be shared");
    }
    Driver::init(base)
}

//! Test guest: a no_std virtio-blk driver over virtio-mmio (GUEST_ABI 1.1
//! devices), with its virtqueue and bounce buffers in pages it converted to
//! shared, and its data in private memory.
//!
//! It reads sector 0: a header from an earlier run ("GMEMDISK" and a run
//! number) makes it check that run's data first. Then it writes a pattern
//! for this run with several request sizes (each copied from private memory
//! through the bounce buffer), writes the header, flushes, reads everything
//! back into private memory and checks it. Exit 0 on success.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::{fence, Ordering};

/// The virtqueue: descriptor table, available ring, used ring (shared).
const QUEUE: u64 = 0xA0_0000;
const AVAIL: u64 = QUEUE + 0x100;
const USED: u64 = QUEUE + 0x200;
/// Bounce buffers (shared): request header, status byte, id, data.
const HEADER: u64 = 0xA1_0000;
const STATUS: u64 = HEADER + 0x10;
const ID: u64 = HEADER + 0x20;
const DATA: u64 = 0xA1_1000;
/// Everything shared: the queue page up to the end of the data buffer.
const SHARED_END: u64 = DATA + MAX_REQUEST;
/// Private memory: the pattern to write, and what is read back.
const SOURCE: u64 = 0xB0_0000;
const CHECK: u64 = 0xB2_0000;
const MAX_REQUEST: u64 = 64 << 10;
const QSIZE: u16 = 8;
/// Request sizes in bytes, each used twice, one after another on the disk.
const SIZES: [u64; 4] = [512, 4096, 16384, MAX_REQUEST];
const FIRST_SECTOR: u64 = 8;
const MAGIC: u64 = 0x4b53_4944_4d45_4d47; // "GMEMDISK"

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;

fn r32(gpa: u64) -> u32 {
    // SAFETY: an identity-mapped device register or RAM word.
    unsafe { core::ptr::read_volatile(gpa as *const u32) }
}
fn w32(gpa: u64, v: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(gpa as *mut u32, v) }
}
fn r16(gpa: u64) -> u16 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(gpa as *const u16) }
}
fn w16(gpa: u64, v: u16) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(gpa as *mut u16, v) }
}
fn r8(gpa: u64) -> u8 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(gpa as *const u8) }
}
fn w8(gpa: u64, v: u8) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(gpa as *mut u8, v) }
}

/// Copies `len` bytes (a multiple of 8) between guest addresses.
fn copy(to: u64, from: u64, len: u64) {
    for off in (0..len).step_by(8) {
        rt::write_u64(to + off, rt::read_u64(from + off));
    }
}

fn pattern(run: u64, sector: u64, word: u64) -> u64 {
    ((sector << 9) + word * 8 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ run
}

struct Driver {
    base: u64,
    avail: u16,
}

impl Driver {
    fn reg(&self, offset: u64) -> u64 {
        self.base + offset
    }

    /// Resets the device, negotiates VERSION_1 and FLUSH, sets up queue 0.
    fn init(base: u64) -> Result<Self, &'static str> {
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

    fn capacity(&self) -> u64 {
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
    fn request(&mut self, kind: u32, sector: u64, len: u64) -> u8 {
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

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    let devices = boot as *const rt::BootInfo as u64 + 40 + 16 * u64::from(boot.region_count);
    if rt::read_u64(devices) & 0xffff_ffff == 0 {
        rt::out().s("disk: no device (run with --disk PATH)\n");
        return 1;
    }
    let base = rt::read_u64(devices + 8);
    if rt::convert(QUEUE, SHARED_END - QUEUE, rt::SHARED) != 0 {
        rt::out().s("disk: the bounce pages could not be shared\n");
        return 2;
    }
    let mut d = match Driver::init(base) {
        Ok(d) => d,
        Err(why) => {
            rt::out().s("disk: ").s(why).s("\n");
            return 2;
        }
    };
    if d.request(GET_ID, 0, 20) != 0 || r32(ID) != u32::from_le_bytes(*b"gmem") {
        rt::out().s("disk: GET_ID failed\n");
        return 3;
    }
    let needed = FIRST_SECTOR + 2 * SIZES.iter().sum::<u64>() / 512;
    if d.capacity() < needed {
        rt::out().s("disk: the disk is too small: ").dec(needed).s(" sectors needed\n");
        return 3;
    }
    // An earlier run's data, if any.
    if d.request(IN, 0, 512) != 0 {
        rt::out().s("disk: reading sector 0 failed\n");
        return 3;
    }
    let previous = if rt::read_u64(DATA) == MAGIC { rt::read_u64(DATA + 8) } else { 0 };
    let requests = |f: &mut dyn FnMut(u64, u64) -> u32| -> u32 {
        let mut sector = FIRST_SECTOR;
        for size in SIZES.iter().chain(SIZES.iter()) {
            let code = f(sector, *size);
            if code != 0 {
                return code;
            }
            sector += size / 512;
        }
        0
    };
    // Reads `size` bytes at `sector` into private memory and checks `run`'s pattern.
    let read_check = |d: &mut Driver, run: u64, sector: u64, size: u64| -> u32 {
        if d.request(IN, sector, size) != 0 {
            return 3;
        }
        copy(CHECK, DATA, size);
        let ok = (0..size / 8).all(|w| rt::read_u64(CHECK + 8 * w) == pattern(run, sector, w));
        if ok { 0 } else { 4 }
    };
    if previous != 0 {
        let code = requests(&mut |sector, size| read_check(&mut d, previous, sector, size));
        if code != 0 {
            rt::out().s("disk: run ").dec(previous).s("'s data did not read back\n");
            return 5;
        }
    }
    let run = previous + 1;
    let code = requests(&mut |sector, size| {
        for w in 0..size / 8 {
            rt::write_u64(SOURCE + 8 * w, pattern(run, sector, w));
        }
        copy(DATA, SOURCE, size);
        if d.request(OUT, sector, size) != 0 { 3 } else { 0 }
    });
    rt::write_u64(DATA, MAGIC);
    rt::write_u64(DATA + 8, run);
    for w in 2..64 {
        rt::write_u64(DATA + 8 * w, 0);
    }
    if code != 0 || d.request(OUT, 0, 512) != 0 || d.request(FLUSH, 0, 0) != 0 {
        rt::out().s("disk: writing failed\n");
        return 3;
    }
    if requests(&mut |sector, size| read_check(&mut d, run, sector, size)) != 0 {
        rt::out().s("disk: what was written did not read back\n");
        return 4;
    }
    let sectors = 2 * SIZES.iter().sum::<u64>() / 512;
    rt::out().s("disk: run ").dec(run).s(": wrote, flushed and read back ").dec(sectors).s(" sectors in 8 requests of 512 B to 64 KiB");
    if previous != 0 {
        rt::out().s("; run ").dec(previous).s("'s data was there");
    }
    rt::out().s("\n");
    0
}

//! Test guest: a no_std virtio-blk driver over virtio-mmio (GUEST_ABI 1.1
//! devices), with its virtqueue and bounce buffers in pages it converted to
//! shared, and its data in private memory.
//!
//! It reads sector 0: a header from an earlier run ("GMEMDISK" and a run
//! number) makes it check that run's data first. Then it writes a pattern
//! for this run with several request sizes (each copied from private memory
//! through the bounce buffer), writes the header, flushes, reads everything
//! back into private memory and checks it (after sync stage 1, where a
//! snapshot may be taken). Exit 0 on success.
#![no_std]
#![no_main]

mod rt;
mod virtio;

use virtio::{copy, pattern, Driver, DATA, FLUSH, GET_ID, ID, IN, MAX_REQUEST, OUT};

/// Private memory: the pattern to write, and what is read back.
const SOURCE: u64 = 0xB0_0000;
const CHECK: u64 = 0xB2_0000;
/// Request sizes in bytes, each used twice, one after another on the disk.
const SIZES: [u64; 4] = [512, 4096, 16384, MAX_REQUEST];
const FIRST_SECTOR: u64 = 8;
const MAGIC: u64 = 0x4b53_4944_4d45_4d47; // "GMEMDISK"

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    if boot.first_device().is_none() {
        rt::out().s("disk: no device (run with --disk PATH)\n");
        return 1;
    }
    let mut d = match virtio::setup(boot) {
        Ok(d) => d,
        Err(why) => {
            rt::out().s("disk: ").s(why).s("\n");
            return 2;
        }
    };
    if d.request(GET_ID, 0, 20) != 0 || virtio::r32(ID) != u32::from_le_bytes(*b"gmem") {
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
    // Where a snapshot may be taken: the data is on the disk, the read
    // back still to come.
    rt::sync(1);
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

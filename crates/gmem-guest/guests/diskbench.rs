//! Benchmark guest for `gmem bench`'s virtio-blk row: 16 writes and 16
//! reads of 64 KiB, timed with the TSC around each request, twice over:
//! bounced (the data copied from private memory into the shared bounce
//! buffer before a write, and out of it after a read) and direct (the data
//! made and left in the shared buffer: what a guest whose memory the device
//! may reach would do). Prints `bounce=CYCLES/BYTES direct=CYCLES/BYTES
//! copy=CYCLES/BYTES`, the last the bounced requests' copies alone.
//! Runs in user mode (GUEST_ABI 1.2): the copies run at hardware speed and
//! the driver reaches its device and the VMM by MMIO.
#![no_std]
#![no_main]

mod rt;
mod virtio;

use virtio::{copy, pattern, DATA, IN, MAX_REQUEST, OUT};

/// Private memory the bounced requests copy from and into.
const PRIVATE: u64 = 0xB0_0000;
const REQUESTS: u64 = 16;
const FIRST_SECTOR: u64 = 8;

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    if vcpu != 0 {
        rt::halt();
    }
    let mut d = match virtio::setup(boot) {
        Ok(d) => d,
        Err(why) => {
            rt::out().s("diskbench: ").s(why).s("\n");
            return 2;
        }
    };
    if d.capacity() < FIRST_SECTOR + REQUESTS * MAX_REQUEST / 512 {
        rt::out().s("diskbench: the disk is too small\n");
        return 3;
    }
    // Both buffers and the disk's blocks are in place before anything is
    // timed, as a driver's persistent bounce buffers and a used disk are:
    // otherwise the bounced round, which runs first, pays the first
    // touches of the shared buffer and the file's block allocation.
    for w in 0..MAX_REQUEST / 8 {
        rt::write_u64(DATA + 8 * w, 0);
        rt::write_u64(PRIVATE + 8 * w, 0);
    }
    for request in 0..REQUESTS {
        if d.request(OUT, FIRST_SECTOR + request * MAX_REQUEST / 512, MAX_REQUEST) != 0 {
            rt::out().s("diskbench: a request failed\n");
            return 4;
        }
    }
    let mut cycles = [0u64; 2];
    let mut copying = 0;
    for (mode, total) in cycles.iter_mut().enumerate() {
        let bounce = mode == 0;
        for request in 0..REQUESTS {
            let sector = FIRST_SECTOR + request * MAX_REQUEST / 512;
            let buffer = if bounce { PRIVATE } else { DATA };
            for w in 0..MAX_REQUEST / 8 {
                rt::write_u64(buffer + 8 * w, pattern(mode as u64, sector, w));
            }
            let start = rt::rdtsc();
            if bounce {
                copy(DATA, PRIVATE, MAX_REQUEST);
                copying += rt::rdtsc() - start;
            }
            let written = d.request(OUT, sector, MAX_REQUEST);
            *total += rt::rdtsc() - start;
            let start = rt::rdtsc();
            let read = d.request(IN, sector, MAX_REQUEST);
            if bounce {
                let copy_start = rt::rdtsc();
                copy(PRIVATE, DATA, MAX_REQUEST);
                copying += rt::rdtsc() - copy_start;
            }
            *total += rt::rdtsc() - start;
            let back = (0..MAX_REQUEST / 8).step_by(97).all(|w| rt::read_u64(buffer + 8 * w) == pattern(mode as u64, sector, w));
            if written != 0 || read != 0 || !back {
                rt::out().s("diskbench: a request failed\n");
                return 4;
            }
        }
    }
    let bytes = 2 * REQUESTS * MAX_REQUEST;
    rt::out().s("bounce=").dec(cycles[0]).s("/").dec(bytes).s(" direct=").dec(cycles[1]).s("/").dec(bytes);
    rt::out().s(" copy=").dec(copying).s("/").dec(bytes).s("\n");
    0
}

//! Benchmark guest: writes one word in every page of RAM from 4 MiB up to
//! the stacks, in every RAM region (first touch of guest memory), then
//! exits 0.
#![no_std]
#![no_main]

mod rt;

const BASE: u64 = 0x40_0000;

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    for index in 0..boot.region_count {
        let (start, size) = boot.region(index);
        let end = (start + size).min(boot.stacks_floor());
        let mut gpa = start.max(BASE);
        while gpa < end {
            rt::write_u64(gpa, gpa);
            gpa += 4096;
        }
    }
    0
}

//! Benchmark guest: writes one word in every page from 4 MiB up to the
//! stacks (first touch of guest memory), then exits 0.
#![no_std]
#![no_main]

mod rt;

const BASE: u64 = 0x40_0000;

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    let end = boot.ram_size - u64::from(boot.vcpu_count) * 0x10000;
    let mut gpa = BASE;
    while gpa < end {
        rt::write_u64(gpa, gpa);
        gpa += 4096;
    }
    0
}

//! Benchmark guest: conversion round trips (request -> resumed) against a
//! bare port-I/O exit (a request the VMM refuses at once: an empty range),
//! timed with the TSC around the `out` instruction only. At CPL 0, where a
//! request is cheapest (a port exit, not an MMIO one). Each conversion discards pages the guest wrote just before.
//! Prints one line: `convbench bare=C/N c4k=C/N c2m=C/N` (TSC cycles over
//! request counts) and exits 0.
#![no_std]
#![no_main]

mod rt;

const PAGE: u64 = 0x60_0000;
const BIG: u64 = 0xa0_0000;
const BIG_LEN: u64 = 2 << 20;
const BARE: u64 = 400;
const SMALL: u64 = 400;
const LARGE: u64 = 8;

fn timed(f: impl FnOnce() -> i64) -> u64 {
    let start = rt::rdtsc();
    let ret = f();
    let cycles = rt::rdtsc() - start;
    if ret != 0 {
        rt::out().s("convbench: conversion refused: ").dec(ret.unsigned_abs()).s("\n");
        rt::exit(1);
    }
    cycles
}

fn guest_main(_boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    const EINVAL: i64 = -22;
    let bare: u64 = (0..BARE).map(|_| timed(|| rt::convert(PAGE, 0, rt::SHARED) - EINVAL)).sum();
    let mut small = 0;
    for round in 0..SMALL {
        rt::write_u64(PAGE, round + 1);
        let attrs = if round % 2 == 0 { rt::SHARED } else { rt::PRIVATE };
        small += timed(|| rt::convert(PAGE, 4096, attrs));
    }
    let mut large = 0;
    for round in 0..LARGE {
        for page in (BIG..BIG + BIG_LEN).step_by(4096) {
            rt::write_u64(page, round + 1);
        }
        let attrs = if round % 2 == 0 { rt::SHARED } else { rt::PRIVATE };
        large += timed(|| rt::convert(BIG, BIG_LEN, attrs));
    }
    rt::out()
        .s("convbench bare=").dec(bare).s("/").dec(BARE)
        .s(" c4k=").dec(small).s("/").dec(SMALL)
        .s(" c2m=").dec(large).s("/").dec(LARGE)
        .s("\n");
    0
}

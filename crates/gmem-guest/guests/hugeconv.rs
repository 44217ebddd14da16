//! Test and benchmark guest for huge pages, vCPU 0 in user mode: writes a
//! marker into every page from [`BASE`] to the stacks (region 0), syncs
//! ([`TOUCHED`]); converts one 4 KiB page in every 2 MiB to shared, timed
//! by the TSC, and syncs ([`SHARED`]: the host sees each 2 MiB page split,
//! and reads the converted pages); converts them back to private and syncs
//! ([`PRIVATE_AGAIN`]: the host sees them made huge again). Then checks
//! every page: a converted one reads zero (each conversion discards), any
//! other its marker. Prints `hugeconv: pages=N converted=M
//! convert=CYCLES/M` and exits 0; 1 at the first page that is wrong, 2 if
//! a conversion fails.
#![no_std]
#![no_main]

mod rt;
mod huge_layout;

use huge_layout::{marker, BASE, CONVERTED_OFFSET, PRIVATE_AGAIN, SHARED, TOUCHED};

const HUGE: u64 = 2 << 20;

fn convert_all(lo: u64, hi: u64, attrs: u64) -> Result<u64, u32> {
    let start = rt::rdtsc();
    for range in (lo..hi).step_by(HUGE as usize) {
        let ret = rt::convert(range + CONVERTED_OFFSET, 4096, attrs);
        if ret != 0 {
            rt::out().s("hugeconv: conversion at ").hex(range + CONVERTED_OFFSET).s(" got ").dec(ret.unsigned_abs()).s("\n");
            return Err(2);
        }
    }
    Ok(rt::rdtsc() - start)
}

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    if vcpu != 0 {
        rt::halt();
    }
    let (start, size) = boot.region(0);
    let lo = start.max(BASE);
    let hi = (start + size).min(boot.stacks_floor()) / HUGE * HUGE;
    for gpa in (lo..hi).step_by(4096) {
        rt::write_u64(gpa, marker(gpa));
    }
    rt::sync(TOUCHED);
    let cycles = match convert_all(lo, hi, rt::SHARED) {
        Ok(cycles) => cycles,
        Err(code) => return code,
    };
    rt::sync(SHARED);
    if let Err(code) = convert_all(lo, hi, rt::PRIVATE) {
        return code;
    }
    rt::sync(PRIVATE_AGAIN);
    for gpa in (lo..hi).step_by(4096) {
        let expected = if gpa % HUGE == CONVERTED_OFFSET { 0 } else { marker(gpa) };
        let seen = rt::read_u64(gpa);
        if seen != expected {
            rt::out().s("hugeconv: page ").hex(gpa).s(" reads ").hex(seen).s(", not ").hex(expected).s("\n");
            return 1;
        }
    }
    let converted = (hi - lo) / HUGE;
    rt::out().s("hugeconv: pages=").dec((hi - lo) / 4096).s(" converted=").dec(converted)
        .s(" convert=").dec(cycles).s("/").dec(converted).s("\n");
    0
}

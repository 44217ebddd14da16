//! Test guest: every vCPU converts its own page at 0x600000 + 4 KiB * index
//! back and forth 300 times. Before each conversion it fills the page with
//! a marker (`0x5ec0_0000 + round`: private on even rounds); after it, the
//! page must hold only zeros or the host's pattern (the host may write a
//! shared page). The last vCPU to finish exits 0.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::{AtomicU32, Ordering};

/// What the host writes into shared pages.
const HOST: u64 = 0x4848_4848_4848_4848;
const ROUNDS: u64 = 300;

static DONE: AtomicU32 = AtomicU32::new(0);

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    let page = 0x60_0000 + u64::from(vcpu) * 4096;
    for round in 0..ROUNDS {
        rt::fill_page(page, 0x5ec0_0000 + round);
        let attrs = if round % 2 == 0 { rt::SHARED } else { rt::PRIVATE };
        if rt::convert(page, 4096, attrs) != 0 {
            rt::out().s("convstorm: conversion refused\n");
            return 1;
        }
        let clean = (0..4096).step_by(8).all(|off| matches!(rt::read_u64(page + off), 0 | HOST));
        if !clean {
            rt::out().s("convstorm: a converted page kept old content\n");
            return 2;
        }
    }
    if DONE.fetch_add(1, Ordering::SeqCst) + 1 == boot.vcpu_count {
        rt::out().s("convstorm: all conversions ok\n");
        return 0;
    }
    rt::halt()
}

//! Test guest: vCPU 0 converts the page at 0x600000 back and forth while
//! vCPU 1 writes increasing tokens to it and reads them back; before each
//! conversion vCPU 0 waits for a fresh touch, so every conversion discards
//! a page in use. A read must give the token just written or zero (the page
//! was converted in between): anything else is stale content. The pages
//! around it, never converted, must keep their content. Exit 0 on success.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::{AtomicU32, Ordering};

const PAGE: u64 = 0x60_0000;
const BEFORE: u64 = PAGE - 4096;
const AFTER: u64 = PAGE + 4096;
const ROUNDS: u64 = 200;

static STOP: AtomicU32 = AtomicU32::new(0);
static ZEROS: AtomicU32 = AtomicU32::new(0);
static TOUCHES: AtomicU32 = AtomicU32::new(0);

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if boot.vcpu_count < 2 {
        rt::out().s("convsmp: needs 2 vCPUs\n");
        return 2;
    }
    match vcpu {
        0 => {
            rt::fill_page(BEFORE, 0xbef0);
            rt::fill_page(AFTER, 0xaf7e);
            for round in 0..ROUNDS {
                let touched = TOUCHES.load(Ordering::SeqCst);
                while TOUCHES.load(Ordering::SeqCst) == touched {
                    core::hint::spin_loop();
                }
                let attrs = if round % 2 == 0 { rt::SHARED } else { rt::PRIVATE };
                if rt::convert(PAGE, 4096, attrs) != 0 {
                    rt::out().s("convsmp: conversion refused\n");
                    return 3;
                }
            }
            STOP.store(1, Ordering::SeqCst);
            while STOP.load(Ordering::SeqCst) != 2 {
                core::hint::spin_loop();
            }
            let ok = |gpa: u64, v: u64| (0..4096).step_by(8).all(|off| rt::read_u64(gpa + off) == v);
            if !ok(BEFORE, 0xbef0) || !ok(AFTER, 0xaf7e) {
                rt::out().s("convsmp: a neighbour page lost its content\n");
                return 4;
            }
            rt::out()
                .s("convsmp: ")
                .dec(ROUNDS)
                .s(" conversions; the toucher saw zero ")
                .dec(u64::from(ZEROS.load(Ordering::SeqCst)))
                .s(" times, never stale data\n");
            0
        }
        1 => {
            let mut token = 1u64;
            while STOP.load(Ordering::SeqCst) == 0 {
                rt::write_u64(PAGE + (token % 512) * 8, token);
                let seen = rt::read_u64(PAGE + (token % 512) * 8);
                if seen == 0 {
                    ZEROS.fetch_add(1, Ordering::SeqCst);
                } else if seen != token {
                    rt::out().s("convsmp: stale token ").dec(seen).s(" after writing ").dec(token).s("\n");
                    rt::exit(5);
                }
                token += 1;
                TOUCHES.fetch_add(1, Ordering::SeqCst);
            }
            STOP.store(2, Ordering::SeqCst);
            rt::halt()
        }
        _ => rt::halt(),
    }
}

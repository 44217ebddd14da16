//! Test guest: writes a pattern into 16 pages at 0x600000, pauses at sync
//! stage 1 (the host may punch some), then lists the pages that read zero
//! and exits with their number: each page must read all zero (punched) or
//! all its pattern (kept). Exit 200 if a page holds anything else (torn).
#![no_std]
#![no_main]

mod rt;

const BASE: u64 = 0x60_0000;
const PAGES: u64 = 16;

fn guest_main(_boot: &rt::BootInfo, _vcpu: u32) -> u32 {
    for page in 0..PAGES {
        let gpa = BASE + page * 4096;
        for off in (0..4096).step_by(8) {
            rt::write_u64(gpa + off, gpa + off);
        }
    }
    rt::sync(1);
    let mut zero = 0;
    rt::out().s("punch: pages that read zero:");
    for page in 0..PAGES {
        let gpa = BASE + page * 4096;
        let first = rt::read_u64(gpa);
        let expect = if first == 0 { 0 } else { gpa };
        for off in (0..4096).step_by(8) {
            let want = if expect == 0 { 0 } else { gpa + off };
            if rt::read_u64(gpa + off) != want {
                rt::out().s("\npunch: page ").hex(gpa).s(" offset ").hex(off).s(" is torn\n");
                return 200;
            }
        }
        if first == 0 {
            rt::out().s(" ").hex(gpa);
            zero += 1;
        }
    }
    rt::out().s(if zero == 0 { " none" } else { "" }).s(" (").dec(zero).s(" of ").dec(PAGES);
    rt::out().s(", the exit status); the others kept their data, none is torn\n");
    zero as u32
}

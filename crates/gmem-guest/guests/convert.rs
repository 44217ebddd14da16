//! Test guest for conversions (port 0xF0). One vCPU:
//! 1. fills the page at 0x600000, converts it to shared, checks it reads
//!    zero, writes "guest->host" at its start, pauses at sync 1 (the host
//!    reads it and writes "host->guest" at offset 64), checks the host's bytes;
//! 2. converts it back to private, checks zero, pauses at sync 2 (the host's
//!    read is denied);
//! 3. sends bad requests, each must answer -22 with nothing changed;
//! 4. round-trips 2 MiB at 0xA00000 the same way, then exits 0.
//! Any failure prints why and exits with the step's number.
#![no_std]
#![no_main]

mod rt;

const PAGE: u64 = 0x60_0000;
const NEIGHBOUR: u64 = PAGE + 4096;
const BIG: u64 = 0xa0_0000;
const BIG_LEN: u64 = 2 << 20;
const EINVAL: i64 = -22;

fn fail(step: u32, why: &str) -> u32 {
    rt::out().s("convert: step ").dec(u64::from(step)).s(": ").s(why).s("\n");
    step
}

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    rt::fill_page(PAGE, 0x1111);
    rt::fill_page(NEIGHBOUR, 0x2222);
    if rt::convert(PAGE, 4096, rt::SHARED) != 0 {
        return fail(1, "private -> shared refused");
    }
    if !rt::page_is_zero(PAGE) {
        return fail(1, "page does not read zero after private -> shared");
    }
    rt::write_u64(PAGE, u64::from_le_bytes(*b"guest->h"));
    rt::write_u64(PAGE + 8, u64::from_le_bytes(*b"ost\0\0\0\0\0"));
    rt::sync(1);
    if rt::read_u64(PAGE + 64) != u64::from_le_bytes(*b"host->gu") {
        return fail(1, "the host's write is not visible");
    }
    if rt::convert(PAGE, 4096, rt::PRIVATE) != 0 {
        return fail(2, "shared -> private refused");
    }
    if !rt::page_is_zero(PAGE) {
        return fail(2, "page does not read zero after shared -> private");
    }
    rt::fill_page(PAGE, 0x3333);
    rt::sync(2);

    let ram = boot.ram_size;
    let bad: [(u64, u64, u64, &str); 8] = [
        (PAGE + 8, 4096, rt::SHARED, "unaligned GPA"),
        (PAGE, 100, rt::SHARED, "unaligned size"),
        (PAGE, 0, rt::SHARED, "empty range"),
        (ram, 4096, rt::SHARED, "range past RAM"),
        (ram - 4096, 8192, rt::SHARED, "range straddling the end of RAM"),
        (u64::MAX & !4095, 4096, rt::SHARED, "range that wraps"),
        (PAGE, 4096, 1, "unknown attribute bit 0"),
        (PAGE, 4096, rt::PRIVATE | 0x10, "unknown attribute bit 4"),
    ];
    for (gpa, size, attrs, what) in bad {
        if rt::convert(gpa, size, attrs) != EINVAL {
            return fail(3, what);
        }
    }
    if (0..4096).step_by(8).any(|off| rt::read_u64(PAGE + off) != 0x3333)
        || (0..4096).step_by(8).any(|off| rt::read_u64(NEIGHBOUR + off) != 0x2222)
    {
        return fail(3, "a refused request changed memory");
    }

    for page in (BIG..BIG + BIG_LEN).step_by(4096) {
        rt::write_u64(page, page);
    }
    for (attrs, what) in [(rt::SHARED, "2 MiB private -> shared"), (rt::PRIVATE, "2 MiB shared -> private")] {
        if rt::convert(BIG, BIG_LEN, attrs) != 0 {
            return fail(4, what);
        }
        if (BIG..BIG + BIG_LEN).step_by(4096).any(|page| !rt::page_is_zero(page)) {
            return fail(4, what);
        }
        for page in (BIG..BIG + BIG_LEN).step_by(4096) {
            rt::write_u64(page, page);
        }
    }
    rt::out().s("convert: all conversions ok\n");
    0
}

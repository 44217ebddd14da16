//! The built-in demo guest: every vCPU fills its share of a 4 MiB buffer of
//! private memory and checksums it; vCPU 0 then checks that pages nobody
//! touched read zero, shares the page at 0x800000 and leaves a message there
//! for the host (read at sync stage 1), takes the page back (it must read
//! zero again), reports on the console and exits 0 on success.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const BUF: u64 = 0x40_0000;
const BUF_LEN: u64 = 4 << 20;
const PAGE: u64 = 4096;
/// The page the demo shares with the host (`gmem_guest::needs("demo")`'s host side reads it).
const MESSAGE: u64 = BUF + BUF_LEN;

static DONE: AtomicU32 = AtomicU32::new(0);
static SUM: AtomicU64 = AtomicU64::new(0);
static BAD: AtomicU32 = AtomicU32::new(0);

fn pattern(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x676d_656d
}

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    let vcpus = boot.vcpu_count as u64;
    let stacks = vcpus * 0x10000;
    if boot.ram_size < BUF + BUF_LEN + stacks + PAGE {
        rt::out().s("demo: needs more than ").dec((BUF + BUF_LEN + stacks + PAGE - 1) >> 20).s(" MiB of RAM\n");
        return 2;
    }
    let share = BUF_LEN / PAGE / vcpus * PAGE;
    let start = BUF + vcpu as u64 * share;
    let end = if vcpu as u64 == vcpus - 1 { BUF + BUF_LEN } else { start + share };
    let mut sum = 0u64;
    for gpa in (start..end).step_by(64) {
        rt::write_u64(gpa, pattern(gpa));
    }
    for gpa in (start..end).step_by(64) {
        let value = rt::read_u64(gpa);
        if value != pattern(gpa) {
            BAD.fetch_add(1, Ordering::SeqCst);
        }
        sum = sum.wrapping_add(value);
    }
    SUM.fetch_add(sum, Ordering::SeqCst);
    DONE.fetch_add(1, Ordering::SeqCst);
    if vcpu != 0 {
        rt::halt();
    }
    while DONE.load(Ordering::SeqCst) != boot.vcpu_count {
        core::hint::spin_loop();
    }
    let expected = (BUF..BUF + BUF_LEN).step_by(64).fold(0u64, |s, gpa| s.wrapping_add(pattern(gpa)));
    // Pages above the buffer, in the first RAM region and below the
    // stacks, were never touched.
    let (gpa, size) = boot.region(0);
    let (lo, hi) = (BUF + BUF_LEN, (gpa + size).min(boot.stacks_floor()));
    let step = ((hi - lo) / 64 / PAGE).max(1) * PAGE;
    let mut zero_pages = 0;
    for page in (lo..hi).step_by(step as usize) {
        if (0..PAGE).step_by(8).any(|off| rt::read_u64(page + off) != 0) {
            rt::out().s("demo: untouched page ").hex(page).s(" does not read zero\n");
            return 4;
        }
        zero_pages += 1;
    }
    if rt::convert(MESSAGE, PAGE, rt::SHARED) != 0 {
        rt::out().s("demo: the host refused to share a page\n");
        return 5;
    }
    rt::write_bytes(MESSAGE, b"hello from the guest, through a shared page\0");
    rt::sync(1);
    if rt::convert(MESSAGE, PAGE, rt::PRIVATE) != 0 || !rt::page_is_zero(MESSAGE) {
        rt::out().s("demo: the shared page did not come back private and zeroed\n");
        return 6;
    }
    let sum = SUM.load(Ordering::SeqCst);
    if BAD.load(Ordering::SeqCst) != 0 || sum != expected {
        rt::out().s("demo: checksum ").hex(sum).s(", expected ").hex(expected).s("\n");
        return 3;
    }
    rt::out()
        .s("gmem demo: ")
        .dec(vcpus)
        .s(" vCPU(s) filled ")
        .dec(BUF_LEN >> 20)
        .s(" MiB of private memory, checksum ")
        .hex(sum)
        .s(" ok; ")
        .dec(zero_pages)
        .s(" untouched pages read zero; shared a page and took it back\n");
    0
}

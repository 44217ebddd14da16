//! GUEST_ABI 1.2 guest: every vCPU switches to user mode at once and talks
//! to the VMM through the doorbell only. vCPU 0 shares the page at
//! 0x600000, writes "user->host" there and pauses at sync 1, where the host
//! may read it and write bytes at offset 64; it then takes the page back,
//! checks it reads zero, checks that a bad request answers -22, and exits
//! with the first byte the host wrote (0 when it wrote nothing). Any
//! failure prints why and exits 100 + the step.
#![no_std]
#![no_main]

mod rt;

const PAGE: u64 = 0x60_0000;
/// Where the host's bytes go at sync 1.
const HOST_BYTES: u64 = PAGE + 64;
const EINVAL: i64 = -22;

fn fail(step: u32, why: &str) -> u32 {
    rt::out().s("user: step ").dec(u64::from(step)).s(": ").s(why).s("\n");
    100 + step
}

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if boot.abi_minor < 2 {
        return fail(0, "the VMM is older than GUEST_ABI 1.2");
    }
    rt::enter_user_mode();
    if !rt::in_user_mode() {
        return fail(1, "still at CPL 0 after iretq");
    }
    if vcpu != 0 {
        rt::halt();
    }
    rt::fill_page(PAGE, 0x5555);
    if rt::convert(PAGE, 4096, rt::SHARED) != 0 || !rt::page_is_zero(PAGE) {
        return fail(2, "private -> shared refused, or the page does not read zero");
    }
    rt::write_bytes(PAGE, b"user->host\0");
    if rt::sync(1) != 0 {
        return fail(3, "sync did not answer 0");
    }
    let code = rt::read_u64(HOST_BYTES) as u8;
    if rt::convert(PAGE, 4096, rt::PRIVATE) != 0 || !rt::page_is_zero(PAGE) {
        return fail(4, "shared -> private refused, or the page does not read zero");
    }
    if rt::convert(PAGE + 8, 4096, rt::SHARED) != EINVAL {
        return fail(5, "an unaligned request was not refused with -22");
    }
    rt::out().s("user: in user mode on ").dec(u64::from(boot.vcpu_count)).s(" vCPU(s); ");
    if code == 0 {
        rt::out().s("the host wrote nothing at 0x600040; exit 0\n");
    } else {
        rt::out().s("exit with the host's byte ").dec(u64::from(code)).s("\n");
    }
    u32::from(code)
}

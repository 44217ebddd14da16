//! Test guest: converts the page at 0x600000 to shared and back with the
//! KVM_HC_MAP_GPA_RANGE hypercall instead of port 0xF0, checking that it
//! reads zero each time. Needs `--hypercall-exits`. Exit 0 on success.
#![no_std]
#![no_main]

mod rt;

const PAGE: u64 = 0x60_0000;

fn guest_main(_boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    // KVM's encoding (GUEST_ABI 1.1): bit 4 (ENCRYPTED) is private, bits
    // 0-1 = 0 count 4 KiB pages.
    for (attrs, step) in [(0, 1), (rt::MAP_GPA_RANGE_ENCRYPTED, 2)] {
        rt::fill_page(PAGE, 0x4444);
        let ret = rt::map_gpa_range(PAGE, 1, attrs);
        if ret != 0 {
            rt::out().s("hypercall: MAP_GPA_RANGE answered -").dec(ret.unsigned_abs()).s("\n");
            return step;
        }
        if !rt::page_is_zero(PAGE) {
            rt::out().s("hypercall: the page does not read zero\n");
            return 10 + step;
        }
    }
    if rt::map_gpa_range(PAGE, 0, rt::SHARED) != -22 {
        rt::out().s("hypercall: an empty range was not refused\n");
        return 3;
    }
    rt::out().s("hypercall: conversions by hypercall ok\n");
    0
}

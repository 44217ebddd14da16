//! Test guest: checks the GUEST_ABI 1.1 memory map in the boot info (RAM
//! regions ascending, below 3 GiB and from 4 GiB, summing to `ram_size`,
//! `ram_end` one past the last, no devices), then writes and reads back a
//! word at the start and end of every region (below the stacks). Exit 0.
#![no_std]
#![no_main]

mod rt;

const GIB: u64 = 1 << 30;

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    if boot.abi_minor != rt::abi::ABI_MINOR || boot.region_count == 0 || boot.region_count > 2 {
        rt::out().s("memmap: not a GUEST_ABI 1.1 boot info\n");
        return 1;
    }
    let mut total = 0;
    let mut last_end = 0;
    for index in 0..boot.region_count {
        let (gpa, size) = boot.region(index);
        let expected_gpa = if index == 0 { 0 } else { 4 * GIB };
        if gpa != expected_gpa || size == 0 || (index == 0 && gpa + size > 3 * GIB) {
            rt::out().s("memmap: region ").dec(u64::from(index)).s(" at ").hex(gpa).s(" is misplaced\n");
            return 2;
        }
        total += size;
        last_end = gpa + size;
    }
    if total != boot.ram_size || last_end != boot.ram_end {
        rt::out().s("memmap: regions do not add up to ram_size / ram_end\n");
        return 3;
    }
    if boot.first_device().is_some() {
        rt::out().s("memmap: unexpected devices\n");
        return 4;
    }
    for index in 0..boot.region_count {
        let (gpa, size) = boot.region(index);
        let first = gpa.max(0x40_0000);
        let last = (gpa + size).min(boot.stacks_floor()) - 8;
        for at in [first, last] {
            rt::write_u64(at, at ^ 0x6d65_6d6d_6170);
            if rt::read_u64(at) != at ^ 0x6d65_6d6d_6170 {
                rt::out().s("memmap: RAM at ").hex(at).s(" does not hold a write\n");
                return 5;
            }
        }
    }
    rt::out().s("memmap: ").dec(u64::from(boot.region_count)).s(" RAM region(s) ok\n");
    0
}

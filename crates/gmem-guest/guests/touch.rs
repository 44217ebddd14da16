//! Benchmark guest: every vCPU writes one word in every page of its share
//! of RAM (from 4 MiB up to the stacks, every region): the first touch of
//! guest memory. Then it syncs at stage 1 (where a snapshot may be taken)
//! and checks that every word it wrote is still there: a vCPU that finds
//! one that is not exits 1 at once. The last vCPU to finish exits 0.
//! Runs in user mode (GUEST_ABI 1.2), where this host runs guest code at
//! hardware speed.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::AtomicU32;

static DONE: AtomicU32 = AtomicU32::new(0);

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    rt::touch_share(boot, vcpu, 4096);
    rt::sync(1);
    if !rt::share_intact("touch", boot, vcpu, u64::MAX) {
        return 1;
    }
    rt::last_one_exits(boot, &DONE)
}

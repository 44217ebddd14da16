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

use core::sync::atomic::{AtomicU32, Ordering};

static DONE: AtomicU32 = AtomicU32::new(0);

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    rt::touch_share(boot, vcpu, 4096);
    rt::sync(1);
    let wrong = rt::check_share(boot, vcpu, 4096, u64::MAX);
    if wrong != 0 {
        rt::out().s("touch: ").dec(wrong).s(" pages lost what this vCPU wrote\n");
        return 1;
    }
    if DONE.fetch_add(1, Ordering::SeqCst) + 1 == boot.vcpu_count {
        return 0;
    }
    rt::halt()
}

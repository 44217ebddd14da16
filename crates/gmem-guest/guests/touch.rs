//! Benchmark guest: every vCPU writes one word in every page of its share
//! of RAM (from 4 MiB up to the stacks, every region): the first touch of
//! guest memory. The last vCPU to finish exits 0.
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
    if DONE.fetch_add(1, Ordering::SeqCst) + 1 == boot.vcpu_count {
        return 0;
    }
    rt::halt()
}

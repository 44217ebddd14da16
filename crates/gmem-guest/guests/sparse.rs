//! Benchmark guest: every vCPU writes one word per 64 KiB of its share of
//! RAM (a sparse first touch: one page in 16), then prints how many pages
//! it touched. The last vCPU to finish prints the total and exits 0.
//! Runs in user mode (GUEST_ABI 1.2), where this host runs guest code at
//! hardware speed.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

static DONE: AtomicU32 = AtomicU32::new(0);
static TOUCHED: AtomicU64 = AtomicU64::new(0);

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    TOUCHED.fetch_add(rt::touch_share(boot, vcpu, 64 << 10), Ordering::SeqCst);
    if DONE.fetch_add(1, Ordering::SeqCst) + 1 == boot.vcpu_count {
        rt::out().s("touched=").dec(TOUCHED.load(Ordering::SeqCst)).s("\n");
        return 0;
    }
    rt::halt()
}

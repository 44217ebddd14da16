//! Migration guest: every vCPU writes one word in every page of its share
//! of RAM (as `touch` does: each word its own GPA), syncs at stage 1
//! (where a migration may start), then [`BURSTS`] times rewrites the next
//! hundredth of its share and syncs at stage 2 (where `gmem bench` paces
//! the bursts: one every 100 ms, a guest dirtying 1% of its pages at a
//! time). Then it checks its whole share: a vCPU that finds a word lost
//! exits 1 at once; the last one to finish exits 0. In user mode (GUEST_ABI
//! 1.2), at hardware speed.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::AtomicU32;

/// Bursts of writes, each to 1% of the share.
const BURSTS: u64 = 100;

static TOUCHED: AtomicU32 = AtomicU32::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    let touched = rt::touch_share_together(boot, vcpu, &TOUCHED);
    rt::sync(1);
    let burst = touched.div_ceil(100);
    for n in 0..BURSTS {
        rt::touch_share_from(boot, vcpu, 4096, (n * burst) % touched.max(1), burst);
        rt::sync(2);
    }
    if !rt::share_intact("dirty", boot, vcpu, u64::MAX) {
        return 1;
    }
    rt::last_one_exits(boot, &DONE)
}

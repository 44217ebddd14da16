//! Snapshot guest: every vCPU writes one word in every page of its share
//! of RAM (as `touch` does: each word its own GPA), syncs at stage 1
//! (where a snapshot is taken), then checks and rewrites the first tenth
//! of its share (its working set) and syncs at stage 2 (where a diff holds
//! those pages). A vCPU that finds a word lost exits 1 at once; the last
//! one to finish exits 0. In user mode (GUEST_ABI 1.2), at hardware speed.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::AtomicU32;

static TOUCHED: AtomicU32 = AtomicU32::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    // The pages revisited may be another vCPU's: all are touched first.
    let touched = rt::touch_share_together(boot, vcpu, &TOUCHED);
    rt::sync(1);
    let tenth = touched.div_ceil(10);
    if !rt::share_intact("revisit", boot, vcpu, tenth) {
        return 1;
    }
    rt::touch_share_from(boot, vcpu, 4096, 0, tenth);
    rt::sync(2);
    rt::last_one_exits(boot, &DONE)
}

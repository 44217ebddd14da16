//! Test guest: every vCPU faults concurrently on the same 64 pages (atomic
//! increments) and on 256 pages of its own (tokens); vCPU 0 checks both
//! after all are done. Exit 0 on success.
#![no_std]
#![no_main]

mod rt;

use core::sync::atomic::{AtomicU32, Ordering};

const SHARED: u64 = 0x80_0000;
const SHARED_PAGES: u64 = 64;
const OWN: u64 = 0x100_0000;
const OWN_PAGES: u64 = 256;
const ROUNDS: u64 = 8;

static DONE: AtomicU32 = AtomicU32::new(0);

fn own_base(vcpu: u64) -> u64 {
    OWN + vcpu * OWN_PAGES * 4096
}

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    let vcpu = vcpu as u64;
    for round in 0..ROUNDS {
        for page in 0..SHARED_PAGES {
            // Start on a different page per vCPU so that faults interleave.
            let page = (page + vcpu * 7 + round) % SHARED_PAGES;
            rt::counter(SHARED + page * 4096).fetch_add(1, Ordering::SeqCst);
        }
    }
    for page in 0..OWN_PAGES {
        rt::write_u64(own_base(vcpu) + page * 4096 + 8, (vcpu << 32) | page);
    }
    DONE.fetch_add(1, Ordering::SeqCst);
    if vcpu != 0 {
        rt::halt();
    }
    while DONE.load(Ordering::SeqCst) != boot.vcpu_count {
        core::hint::spin_loop();
    }
    let vcpus = boot.vcpu_count as u64;
    for page in 0..SHARED_PAGES {
        let count = rt::counter(SHARED + page * 4096).load(Ordering::SeqCst);
        if count != vcpus * ROUNDS {
            rt::out().s("smp: shared page ").dec(page).s(" counted ").dec(count).s(", expected ").dec(vcpus * ROUNDS).s("\n");
            return 1;
        }
    }
    for v in 0..vcpus {
        for page in 0..OWN_PAGES {
            if rt::read_u64(own_base(v) + page * 4096 + 8) != (v << 32) | page {
                rt::out().s("smp: vCPU ").dec(v).s(" page ").dec(page).s(" lost its token\n");
                return 2;
            }
        }
    }
    rt::out().s("smp: ").dec(vcpus).s(" vCPUs ok\n");
    0
}

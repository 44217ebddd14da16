//! Test guest that never exits (for timeouts).
#![no_std]
#![no_main]

mod rt;

fn guest_main(_boot: &rt::BootInfo, _vcpu: u32) -> u32 {
    rt::out().s("spin: looping forever\n");
    loop {
        core::hint::spin_loop();
    }
}

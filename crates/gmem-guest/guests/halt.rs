//! Test guest: every vCPU but 0 halts at once, vCPU 0 loops forever: a VM
//! most of whose vCPU threads are gone when it is stopped.
#![no_std]
#![no_main]

mod rt;

fn guest_main(_boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if vcpu != 0 {
        rt::halt();
    }
    loop {
        core::hint::spin_loop();
    }
}

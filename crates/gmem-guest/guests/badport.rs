//! Test guest that writes to a port the ABI does not define.
#![no_std]
#![no_main]

mod rt;

fn guest_main(_boot: &rt::BootInfo, _vcpu: u32) -> u32 {
    // SAFETY: a port write; the VMM stops the VM.
    unsafe { core::arch::asm!("out 0x80, al", in("al") 0u8) };
    0
}

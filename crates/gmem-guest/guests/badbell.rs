//! Test guest for the doorbell's refusals (GUEST_ABI 1.2): in user mode,
//! vCPU 0 makes the access that the word at [`CASE`] names (0 when nobody
//! wrote it): 0, a read of the exit offset; 1, a write at an offset that is
//! no port; 2, an 8-byte write at the exit offset; 3, a valid 2-byte write
//! at the exit offset with code 0x1234. Cases 0-2 must stop the VM with an
//! error naming the GPA.
#![no_std]
#![no_main]

mod rt;

use rt::abi::{DOORBELL, PORT_EXIT};

/// The case to run: a word the VMM may populate at launch.
pub const CASE: u64 = 0x60_0000;

fn guest_main(_boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    if vcpu != 0 {
        rt::halt();
    }
    let exit = DOORBELL + u64::from(PORT_EXIT);
    // SAFETY (each): doorbell accesses the VMM answers by stopping the VM.
    match rt::read_u64(CASE) {
        0 => unsafe {
            core::arch::asm!("mov eax, dword ptr [{at}]", at = in(reg) exit, out("eax") _)
        },
        1 => unsafe {
            core::arch::asm!("mov dword ptr [{at}], eax", at = in(reg) DOORBELL + 0x10, in("eax") 1)
        },
        2 => unsafe {
            core::arch::asm!("mov qword ptr [{at}], rax", at = in(reg) exit, in("rax") 1u64)
        },
        _ => unsafe {
            core::arch::asm!("mov word ptr [{at}], ax", at = in(reg) exit, in("ax") 0x1234u16)
        },
    }
    rt::out().s("badbell: the VM did not stop\n");
    1
}

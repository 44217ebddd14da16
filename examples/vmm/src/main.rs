//! A minimal VMM that adopts gmem private memory: its own `VmFd` from
//! kvm-ioctls, its own memslot numbers, its own vCPU loop and fault-serving
//! event loop, and gmem-kvm for guest RAM. It boots the GUEST_ABI demo
//! guest (boot layout from gmem-runner's `boot` module), serves its
//! conversion requests, and reads the message the guest shares, through
//! vm-memory. Exit status 0 when the guest exits 0 and the message came.

use std::sync::Arc;

use gmem::{FileOffset, PrivateMemFile};
use gmem_kvm::convert::ConversionRequest;
use gmem_kvm::{GuestMemory, RegionSpec, DEFAULT_FAULT_AROUND_PAGES};
use gmem_runner::boot;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 64 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;

    // 1. Guest RAM: one GUEST-sealed file, one private region in slot 7.
    let memory = GuestMemory::new(DEFAULT_FAULT_AROUND_PAGES)?;
    let file = Arc::new(PrivateMemFile::new_guest("example-ram")?);
    file.set_len(RAM)?;
    let spec =
        RegionSpec { slot: 7, gpa: gmem_kvm::Gpa(0), file, file_offset: FileOffset(0), size: RAM };
    // SAFETY: `vm` is this memory's VM; `memory` lives until after the
    // vCPU below is gone (it is declared before, so dropped after, `vm`
    // is no longer run).
    unsafe { memory.add_region(&vm, spec) }?;

    // 2. Launch: the image and boot data, written into private memory.
    let image = boot::GuestImage::parse(gmem_guest::demo(), RAM)?;
    boot::load(&image, RAM, 1, |gpa, bytes| memory.populate(gpa, bytes))?;
    memory.finish_launch();

    // 3. Fault serving in our own event loop: a thread polling the fd.
    let faults = memory.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let server = std::thread::spawn(move || {
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let fd = faults.fault_fd();
            let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
            let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
            if rustix::event::poll(&mut fds, Some(&timeout)).unwrap_or(0) > 0 {
                let (_, failed) = faults.serve_faults().expect("reading guest faults");
                for fault in failed {
                    eprintln!("example vmm: {fault}");
                }
            }
        }
    });

    // 4. Our own vCPU loop.
    let mut vcpu = vm.create_vcpu(0)?;
    boot::init_vcpu(&kvm, &vcpu, image.entry, 0, RAM)?;
    let (message_gpa, message_len, message_stage) = gmem_guest::DEMO_MESSAGE;
    let mut message = None;
    let code = loop {
        match vcpu.run()? {
            VcpuExit::IoOut(0xE9, data) => eprint!("{}", data[0] as char),
            VcpuExit::IoOut(0xF4, data) => break data[0],
            VcpuExit::IoOut(port @ (0xF0 | 0xF8), _) => {
                let mut regs = vcpu.get_regs()?;
                regs.rax = if port == 0xF0 {
                    memory.convert_for_guest(ConversionRequest::from_port(
                        regs.rdi, regs.rsi, regs.rdx,
                    ))
                } else {
                    if regs.rdi == message_stage {
                        // A device reads the shared page through vm-memory.
                        let view = memory.shared();
                        let mut bytes = vec![0u8; message_len as usize];
                        view.read_slice(&mut bytes, GuestAddress(message_gpa))?;
                        message =
                            Some(String::from_utf8_lossy(&bytes).trim_end_matches('\0').to_owned());
                    }
                    0
                };
                vcpu.set_regs(&regs)?;
            }
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().map_err(|_| "the fault thread panicked")?;
    let message = message.ok_or("the guest never shared its message")?;
    println!("example vmm: guest exited with {code}; it shared: {message:?}");
    std::process::exit(i32::from(code));
}

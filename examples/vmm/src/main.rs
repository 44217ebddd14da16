//! A minimal VMM that adopts gmem private memory: its own `VmFd` from
//! kvm-ioctls, its own memslot numbers, its own vCPU loop and fault-serving
//! event loop, gmem-kvm for guest RAM and gmem-boot for GUEST_ABI's boot
//! layout (nothing of gmem's own runner). It boots the GUEST_ABI demo
//! guest, serves its conversion requests, and reads the message the guest
//! shares through vm-memory, as a device would (a `DeviceMemory` handle).
//! Exit status 0 when the guest exits 0 and the message came.
//!
//! `gmem-example-vmm --disk PATH` boots the `disk` guest instead, with a
//! virtio-blk device (gmem-virtio) wired into the same loop: the device's
//! MMIO window in the gap, listed in the boot info, and every notify served
//! through a view of the shared pages it touches.

use std::sync::Arc;

use gmem::{FileOffset, PrivateMemFile};
use gmem_boot as boot;
use gmem_kvm::{DeviceMemory, PrivateMemory, RegionSpec, DEFAULT_FAULT_AROUND_PAGES};
use gmem_virtio::blk::Block;
use gmem_virtio::mmio::{Device, VirtioMmio};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const RAM: u64 = 64 << 20;

/// Whether `gpa` is in device 0's register window.
fn window(gpa: u64) -> bool {
    (gmem_virtio::device_gpa(0)..gmem_virtio::device_gpa(0) + gmem_virtio::WINDOW).contains(&gpa)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::new()?;
    // Shared with the memory, which deletes its memslots when it goes.
    let vm = Arc::new(kvm.create_vm()?);

    // 1. Guest RAM: one GUEST-sealed file, one private region in slot 7.
    let memory = PrivateMemory::new(DEFAULT_FAULT_AROUND_PAGES)?;
    let file = Arc::new(PrivateMemFile::new_guest("example-ram")?);
    file.set_len(RAM)?;
    let spec =
        RegionSpec { slot: 7, gpa: gmem_kvm::Gpa(0), file, file_offset: FileOffset(0), size: RAM };
    // Safe: the memory keeps `vm` and deletes the memslot before it unmaps
    // the region's window.
    memory.add_region(&vm, spec)?;

    // 2. A disk, if asked for: device 0 of GUEST_ABI 1.1's device list.
    let disk_path = std::env::args().skip_while(|a| a != "--disk").nth(1);
    let mut disk = match &disk_path {
        Some(path) => Some(VirtioMmio::new(Block::open(std::path::Path::new(path), 8 << 20)?)),
        None => None,
    };
    let devices: Vec<(gmem_kvm::Gpa, u32)> = disk
        .iter()
        .map(|d| (gmem_kvm::Gpa(gmem_virtio::device_gpa(0)), d.device().device_id()))
        .collect();

    // 3. Launch: the image and boot data, written into private memory.
    let guest = if disk.is_some() {
        gmem_guest::guest("disk").ok_or("no disk guest")?
    } else {
        gmem_guest::demo()
    };
    let image = boot::GuestImage::parse(guest, RAM)?;
    boot::load_with_devices(&image, RAM, 1, &devices, |gpa, bytes| memory.populate(gpa, bytes))?;
    memory.finish_launch();

    // 4. Fault serving in our own event loop: a thread polling the fd.
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

    // 5. Our own vCPU loop; devices reach memory through their handle.
    let device_memory = DeviceMemory::new(&memory);
    let mut vcpu = vm.create_vcpu(0)?;
    boot::init_vcpu(&kvm, &vcpu, image.entry, 0, RAM)?;
    let (message_gpa, message_len, message_stage) = gmem_guest::DEMO_MESSAGE;
    let mut message = None;
    let code = loop {
        match vcpu.run()? {
            VcpuExit::IoOut(0xE9, data) => eprint!("{}", data[0] as char),
            // The device's registers; a notify serves its queue through the
            // view of shared pages (a private buffer gets an I/O error).
            VcpuExit::MmioRead(gpa, data) if disk.is_some() && window(gpa) => {
                disk.as_ref().ok_or("no disk")?.read(gpa - gmem_virtio::device_gpa(0), data)
            }
            VcpuExit::MmioWrite(gpa, data) if disk.is_some() && window(gpa) => {
                let view = device_memory.memory();
                disk.as_mut().ok_or("no disk")?.write(
                    gpa - gmem_virtio::device_gpa(0),
                    data,
                    &*view,
                )
            }
            VcpuExit::IoOut(0xF4, data) => break data[0],
            // A conversion request: decoded, served and answered in one call.
            VcpuExit::IoOut(0xF0, _) => {
                memory.serve_conversion_exit(&mut vcpu)?;
            }
            VcpuExit::IoOut(0xF8, _) => {
                let mut regs = vcpu.get_regs()?;
                // The demo shares its message at this stage; the disk
                // guest's stage is only where a snapshot could be taken.
                if disk.is_none() && regs.rdi == message_stage {
                    // A device reads the shared page through vm-memory.
                    let view = device_memory.memory();
                    let mut bytes = vec![0u8; message_len as usize];
                    view.read_slice(&mut bytes, GuestAddress(message_gpa))?;
                    message =
                        Some(String::from_utf8_lossy(&bytes).trim_end_matches('\0').to_owned());
                }
                regs.rax = 0;
                vcpu.set_regs(&regs)?;
            }
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().map_err(|_| "the fault thread panicked")?;
    if disk_path.is_some() {
        println!("example vmm: disk guest exited with {code}");
        std::process::exit(i32::from(code));
    }
    let message = message.ok_or("the guest never shared its message")?;
    println!("example vmm: guest exited with {code}; it shared: {message:?}");
    std::process::exit(i32::from(code));
}

//! # gmem-virtio: device I/O for private-memory guests
//!
//! A guest whose RAM is private does I/O through pages it shares: its
//! virtqueues and the buffers its descriptors point at must be shared, and
//! a device must reach guest memory only through a view that refuses
//! private pages (gmem-kvm's `GuestMemory::shared`). This crate is such a
//! device, built on rust-vmm's `virtio-queue`, generic over any vm-memory
//! `GuestMemory`, so a VMM lifts it as it is:
//!
//! - [`mmio::VirtioMmio`]: the virtio-mmio (version 2) register file of one
//!   device, driven by the VMM's MMIO exits;
//! - [`blk::Block`]: virtio-blk over a host file: IN, OUT, FLUSH (fsync) and
//!   GET_ID.
//!
//! A hostile guest gets errors, never data: a descriptor pointing at a
//! private page, outside RAM or into the MMIO gap gets an I/O error status
//! (or, where even the status cannot be written, the device marks itself
//! `DEVICE_NEEDS_RESET`); a chain that loops or is longer than the queue,
//! or a queue placed in private memory, marks the device
//! `DEVICE_NEEDS_RESET`. No private byte is read into the file, and no file
//! byte is written into private memory.

pub mod blk;
pub mod mmio;

/// Where GUEST_ABI 1.1 places virtio-mmio device `n`: 0x200 bytes at
/// `0xD000_0000 + n * 0x1000`, in the x86 MMIO gap.
pub const fn device_gpa(n: u32) -> u64 {
    0xD000_0000 + n as u64 * 0x1000
}

/// Bytes of a device's register window.
pub const WINDOW: u64 = 0x200;

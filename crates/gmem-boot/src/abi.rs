//! GUEST_ABI 1.2, the part host and guest both read: the boot info's
//! layout, the ports, the doorbell and the user-mode selectors. This one
//! file is the VMM's (`gmem_boot::abi`) and is compiled into every guest
//! (through gmem-guest's `rt.rs`), so that the two cannot drift apart.
#![allow(dead_code)]

/// Boot info magic, "GMEMABI1".
pub const BOOT_MAGIC: u64 = 0x3149_4241_4d45_4d47;
/// The minor version a 1.2 VMM writes into [`BootInfo::abi_minor`].
pub const ABI_MINOR: u32 = 2;
/// Stack bytes each vCPU owns below its stack top.
pub const STACK_SIZE: u64 = 0x1_0000;

/// The boot info at the GPA the VMM passes in RDI. The RAM regions follow
/// it (`region_count` × [`MemoryRegion`]), then the device list
/// (a [`DeviceListHeader`] and `device_count` × [`DeviceEntry`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// RAM in bytes.
    pub ram_size: u64,
    /// vCPUs.
    pub vcpu_count: u32,
    /// 4096.
    pub page_size: u32,
    /// One past the highest RAM GPA (1.1).
    pub ram_end: u64,
    /// RAM regions that follow, 1 or 2 (1.1).
    pub region_count: u32,
    /// 1 on a 1.1 VMM, 2 on a 1.2 VMM.
    pub abi_minor: u32,
}

/// A RAM region in the boot info (1.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First GPA.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
}

/// The device list's header, right after the RAM regions (1.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceListHeader {
    /// Devices that follow.
    pub device_count: u32,
    /// Zero.
    pub reserved: u32,
}

/// A virtio-mmio device in the boot info (1.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Its registers' GPA.
    pub gpa: u64,
    /// The virtio device id.
    pub device_id: u32,
    /// Zero.
    pub reserved: u32,
}

/// Port 0xE9: one byte (AL) of console output.
pub const PORT_CONSOLE: u16 = 0xE9;
/// Port 0xF0: convert RDI..RDI+RSI to RDX; RAX = 0 or a negative errno.
pub const PORT_CONVERT: u16 = 0xF0;
/// Port 0xF4: the VM stops; EAX is the exit code.
pub const PORT_EXIT: u16 = 0xF4;
/// Port 0xF8: sync at stage RDI; RAX = 0 on resume.
pub const PORT_SYNC: u16 = 0xF8;
/// Every port of the ABI.
pub const PORTS: [u16; 4] = [PORT_CONSOLE, PORT_CONVERT, PORT_EXIT, PORT_SYNC];

/// The doorbell page (1.2): a write of 1, 2 or 4 bytes at offset P does
/// what `out P` does.
pub const DOORBELL: u64 = 0xDFFF_F000;
/// The doorbell's size.
pub const DOORBELL_SIZE: u64 = 0x1000;

/// Attributes of a conversion request: shared.
pub const SHARED: u64 = 0;
/// Attributes of a conversion request: private (KVM_MEMORY_ATTRIBUTE_PRIVATE).
pub const PRIVATE: u64 = 8;

/// The kernel's 64-bit code selector.
pub const KERNEL_CS: u16 = 0x08;
/// The kernel's data selector.
pub const KERNEL_DS: u16 = 0x10;
/// The user-mode 64-bit code selector (GDT index 3, RPL 3) (1.2).
pub const USER_CS: u16 = 0x1B;
/// The user-mode data selector (GDT index 4, RPL 3) (1.2).
pub const USER_DS: u16 = 0x23;

// The layouts above have no padding: the host writes them as bytes and
// the guest reads them in place.
const _: () = assert!(core::mem::size_of::<BootInfo>() == 40);
const _: () = assert!(core::mem::size_of::<MemoryRegion>() == 16);
const _: () = assert!(core::mem::size_of::<DeviceListHeader>() == 8);
const _: () = assert!(core::mem::size_of::<DeviceEntry>() == 16);

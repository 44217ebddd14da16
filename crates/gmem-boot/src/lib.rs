//! # gmem-boot: GUEST_ABI 1.2's boot layer, for any VMM
//!
//! Guest images and the machine of GUEST_ABI 1.2 (`docs/GUEST_ABI.md`):
//! the memory map (RAM above 3 GiB goes above 4 GiB, leaving the x86 MMIO
//! gap), long mode, identity page tables for all of RAM with U/S set at
//! every level (user mode reaches RAM, devices and the doorbell), a flat
//! GDT with kernel and user descriptors and the boot info, all in the VMM's
//! region `[0, 0x200000)`, and a vCPU's entry state. A VMM takes it without
//! gmem's runner: [`load`] writes through any `populate` function (gmem's
//! [`gmem_kvm::PrivateMemory::populate`], or a plain copy), [`init_vcpu`]
//! sets up a kvm-ioctls vCPU.
//!
//! [`abi`] is the one definition of the layouts host and guest share: the
//! same file is compiled into every guest program.
//!
//! ```
//! let ram = 64 << 20;
//! let image = gmem_boot::GuestImage::parse(gmem_guest::demo(), ram)?;
//! let mut written = 0;
//! gmem_boot::load(&image, ram, 1, |_gpa, bytes| {
//!     written += bytes.len();
//!     Ok(())
//! })?;
//! assert!(written > 0);
//! # Ok::<(), gmem_kvm::Error>(())
//! ```

pub mod abi;

use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{elf, Endianness, Object};

use abi::{BootInfo, DeviceEntry, DeviceListHeader, MemoryRegion};
use gmem_kvm::{Error, Gpa, Result};

/// The page size of the machine's page tables and boot info.
pub const PAGE_SIZE: u64 = 4096;

/// First GPA a guest image may use; below it is the VMM's.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// Where the boot info lives.
pub const BOOT_INFO: Gpa = Gpa(0x1000);
/// Stack bytes each vCPU owns below its stack top.
pub const STACK_SIZE: u64 = abi::STACK_SIZE;

const GDT: u64 = 0x2000;
const PML4: u64 = 0x1_0000;
const PDPT: u64 = 0x1_1000;
const PD: u64 = 0x1_2000;
const GIB: u64 = 1 << 30;
/// Page directories fit between `PD` and `IMAGE_BASE`: at most 64 GiB of RAM.
pub const MAX_RAM: u64 = 64 * GIB;
/// RAM below the MMIO gap: `[0, LOW_RAM_END)`.
pub const LOW_RAM_END: u64 = 3 * GIB;
/// Where RAM above the gap starts.
pub const HIGH_RAM_START: u64 = 4 * GIB;

/// The RAM regions of `ram_size` bytes, per GUEST_ABI 1.1: `(gpa, size)`,
/// ascending, one or two.
pub fn ram_regions(ram_size: u64) -> Vec<(Gpa, u64)> {
    let low = ram_size.min(LOW_RAM_END);
    let mut regions = vec![(Gpa(0), low)];
    if ram_size > low {
        regions.push((Gpa(HIGH_RAM_START), ram_size - low));
    }
    regions
}

/// One past the highest RAM GPA.
pub fn ram_end(ram_size: u64) -> u64 {
    ram_regions(ram_size).last().map_or(0, |(gpa, size)| gpa.0 + size)
}

/// Whether `[gpa, gpa + len)` lies in RAM (inside one region).
pub fn in_ram(ram_size: u64, gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else { return false };
    ram_regions(ram_size).iter().any(|(base, size)| gpa >= base.0 && end <= base.0 + size)
}

/// Flat descriptors: null, 64-bit kernel code (0x08) and data (0x10), and
/// (1.2) 64-bit user code (index 3, selector 0x1B) and user data (index 4,
/// selector 0x23), both DPL 3.
const GDT_ENTRIES: [u64; 5] =
    [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff];
const GDT_LIMIT: u16 = (GDT_ENTRIES.len() * 8 - 1) as u16;

/// A loadable segment: bytes to copy at `gpa`; memory up to `gpa + mem_size` reads zero.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Physical (= virtual) load address.
    pub gpa: Gpa,
    /// Bytes from the file.
    pub data: Vec<u8>,
    /// Size in memory (at least `data.len()`).
    pub mem_size: u64,
}

/// A guest program checked against GUEST_ABI for a given RAM size.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Entry point (`e_entry`).
    pub entry: u64,
    /// Segments to load.
    pub segments: Vec<Segment>,
}

impl GuestImage {
    /// Parses a static x86-64 ELF executable whose segments lie in
    /// `[IMAGE_BASE, ram_size)`. Errors name what is wrong.
    pub fn parse(bytes: &[u8], ram_size: u64) -> Result<Self> {
        let bad = |why: String| Error::BadImage(why);
        // The ELF parser reads headers in place and needs them aligned;
        // images come from anywhere (include_bytes!, files), so copy.
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` owns at least `bytes.len()` initialized bytes, u8
        // has no alignment needs, and the view is dropped with `words`.
        let aligned: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), bytes.len()) };
        aligned.copy_from_slice(bytes);
        let bytes: &[u8] = aligned;
        let file = ElfFile64::<Endianness>::parse(bytes)
            .map_err(|e| bad(format!("not an ELF64 file: {e}")))?;
        let header = file.elf_header();
        let endian = file.endian();
        if header.e_type(endian) != elf::ET_EXEC {
            return Err(bad("not a static executable (ET_EXEC)".into()));
        }
        if header.e_machine(endian) != elf::EM_X86_64 || !file.is_little_endian() {
            return Err(bad("not a little-endian x86-64 image".into()));
        }
        let mut segments = Vec::new();
        for ph in file.elf_program_headers() {
            if ph.p_type(endian) != elf::PT_LOAD {
                continue;
            }
            if ph.p_memsz(endian) == 0 {
                if ph.p_filesz(endian) != 0 {
                    return Err(bad(format!(
                        "segment at {:#x} has file bytes but no memory size",
                        ph.p_paddr(endian)
                    )));
                }
                continue;
            }
            let (gpa, mem_size) = (ph.p_paddr(endian), ph.p_memsz(endian));
            let end = gpa
                .checked_add(mem_size)
                .ok_or_else(|| bad(format!("segment at {gpa:#x} wraps")))?;
            if gpa < IMAGE_BASE {
                return Err(bad(format!(
                    "segment at {gpa:#x} lies below {IMAGE_BASE:#x} (the VMM's region)"
                )));
            }
            if !in_ram(ram_size, gpa, mem_size) {
                return Err(bad(format!(
                    "segment {gpa:#x}..{end:#x} does not fit in {ram_size:#x} bytes of RAM"
                )));
            }
            if ph.p_vaddr(endian) != ph.p_paddr(endian) {
                return Err(bad(format!(
                    "segment at {:#x}: virtual address {:#x} differs (GUEST_ABI: virtual equals physical)",
                    ph.p_paddr(endian),
                    ph.p_vaddr(endian)
                )));
            }
            let data = ph
                .data(endian, bytes)
                .map_err(|_| bad(format!("segment at {gpa:#x} lies outside the file")))?;
            if data.len() as u64 > mem_size {
                return Err(bad(format!("segment at {gpa:#x}: file size exceeds memory size")));
            }
            if segments.iter().any(|s: &Segment| gpa < s.gpa.0 + s.mem_size && s.gpa.0 < end) {
                return Err(bad(format!("segment at {gpa:#x} overlaps another")));
            }
            segments.push(Segment { gpa: Gpa(gpa), data: data.to_vec(), mem_size });
        }
        if segments.is_empty() {
            return Err(bad("no loadable segment".into()));
        }
        let entry = header.e_entry(endian);
        if !segments.iter().any(|s| entry >= s.gpa.0 && entry < s.gpa.0 + s.mem_size) {
            return Err(bad(format!("entry point {entry:#x} is not inside a loaded segment")));
        }
        Ok(Self { entry, segments })
    }
}

/// The VMM region's content for `ram_size` bytes of RAM, `vcpus` vCPUs and
/// virtio-mmio `devices` ((GPA, virtio device id) each): (GPA, bytes)
/// pairs to populate before the first vCPU runs.
pub fn vmm_region(ram_size: u64, vcpus: u32, devices: &[(Gpa, u32)]) -> Vec<(Gpa, Vec<u8>)> {
    let regions = ram_regions(ram_size);
    let end = ram_end(ram_size);
    let mut boot_info = Vec::with_capacity(64);
    push_bytes(
        &mut boot_info,
        &BootInfo {
            magic: abi::BOOT_MAGIC,
            ram_size,
            vcpu_count: vcpus,
            page_size: PAGE_SIZE as u32,
            ram_end: end,
            region_count: regions.len() as u32,
            abi_minor: abi::ABI_MINOR,
        },
    );
    for (gpa, size) in &regions {
        push_bytes(&mut boot_info, &MemoryRegion { gpa: gpa.0, size: *size });
    }
    push_bytes(
        &mut boot_info,
        &DeviceListHeader { device_count: devices.len() as u32, reserved: 0 },
    );
    for (gpa, device_id) in devices {
        push_bytes(&mut boot_info, &DeviceEntry { gpa: gpa.0, device_id: *device_id, reserved: 0 });
    }

    let gdt = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();

    // Identity map with 2 MiB pages up to the end of RAM, and at least the
    // first 4 GiB, so that the gap (devices, the doorbell) is mapped too:
    // PML4[0] → PDPT; PDPT[i] → PD i. Every entry is present, writable and
    // user-accessible (1.2).
    const PRESENT_RW_USER: u64 = 0b111;
    const HUGE: u64 = 1 << 7;
    let end = end.max(HIGH_RAM_START);
    let gibs = end.div_ceil(GIB);
    let pml4 = (PDPT | PRESENT_RW_USER).to_le_bytes().to_vec();
    let pdpt =
        (0..gibs).flat_map(|i| ((PD + i * 0x1000) | PRESENT_RW_USER).to_le_bytes()).collect();
    let two_mib = end.div_ceil(2 << 20);
    let pd =
        (0..two_mib).flat_map(|j| ((j << 21) | PRESENT_RW_USER | HUGE).to_le_bytes()).collect();

    vec![
        (BOOT_INFO, boot_info),
        (Gpa(GDT), gdt),
        (Gpa(PML4), pml4),
        (Gpa(PDPT), pdpt),
        (Gpa(PD), pd),
    ]
}

/// Appends `value`'s bytes: one of [`abi`]'s boot info layouts.
fn push_bytes<T: Copy>(out: &mut Vec<u8>, value: &T) {
    // SAFETY: the boot info types are `repr(C)` integers without padding
    // (`abi.rs` asserts their sizes), so every byte is initialized; the
    // guest reads them in place on the same little-endian architecture.
    let bytes = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    out.extend_from_slice(bytes);
}

/// Checks that no segment of `image` lies over the vCPU stacks of a
/// machine with `ram_size` bytes and `vcpus` vCPUs (`ENOEXEC`).
pub fn check_layout(image: &GuestImage, ram_size: u64, vcpus: u32) -> Result<()> {
    let floor = ram_end(ram_size).saturating_sub(u64::from(vcpus) * STACK_SIZE);
    match image.segments.iter().find(|s| s.gpa.0 + s.mem_size > floor) {
        Some(s) => Err(Error::BadImage(format!(
            "segment at {:#x} overlaps the vCPU stacks ({floor:#x} up)",
            s.gpa.0
        ))),
        None => Ok(()),
    }
}

/// Writes everything a GUEST_ABI guest needs at launch, the VMM region and
/// `image`'s segments, with `populate` (e.g. [`gmem_kvm::PrivateMemory::populate`]).
pub fn load(
    image: &GuestImage,
    ram_size: u64,
    vcpus: u32,
    populate: impl FnMut(Gpa, &[u8]) -> Result<()>,
) -> Result<()> {
    load_with_devices(image, ram_size, vcpus, &[], populate)
}

/// As [`load`], with virtio-mmio `devices` ((GPA, device id) each) listed
/// in the boot info.
pub fn load_with_devices(
    image: &GuestImage,
    ram_size: u64,
    vcpus: u32,
    devices: &[(Gpa, u32)],
    mut populate: impl FnMut(Gpa, &[u8]) -> Result<()>,
) -> Result<()> {
    check_layout(image, ram_size, vcpus)?;
    for (gpa, bytes) in vmm_region(ram_size, vcpus, devices) {
        populate(gpa, &bytes)?;
    }
    for segment in &image.segments {
        populate(segment.gpa, &segment.data)?;
    }
    Ok(())
}

/// Checks that `ram_size` and `vcpus` fit GUEST_ABI.
pub fn check_machine(ram_size: u64, vcpus: u32) -> Result<()> {
    let stacks = u64::from(vcpus) * STACK_SIZE;
    if vcpus == 0 || vcpus > 255 {
        return Err(Error::InvalidArgument(format!("{vcpus} vCPUs: between 1 and 255")));
    }
    if ram_size % (2 << 20) != 0 || ram_size < IMAGE_BASE + stacks + (2 << 20) || ram_size > MAX_RAM
    {
        return Err(Error::InvalidArgument(format!(
            "RAM size {ram_size:#x}: a multiple of 2 MiB, at least 4 MiB plus 64 KiB per vCPU, at most 64 GiB"
        )));
    }
    if ram_regions(ram_size).last().is_some_and(|(_, size)| *size < stacks) {
        return Err(Error::InvalidArgument(format!(
            "RAM size {ram_size:#x}: the {vcpus} vCPU stacks must fit in the RAM above 4 GiB"
        )));
    }
    Ok(())
}

/// Puts `vcpu` in GUEST_ABI's entry state: long mode, flat segments, the
/// VMM's page tables, SSE enabled, RIP = `entry`, RSI = `index`, RDI = the
/// boot info, RSP = `ram_end - index * 64 KiB`.
pub fn init_vcpu(
    kvm: &kvm_ioctls::Kvm,
    vcpu: &kvm_ioctls::VcpuFd,
    entry: u64,
    index: u32,
    ram_size: u64,
) -> Result<()> {
    use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES};
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let segment = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = segment(abi::KERNEL_CS, 0xb, 1, 0);
    let data = segment(abi::KERNEL_DS, 0x3, 0, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.cr3 = PML4;
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_WP | CR0_PG;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
    let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsp: ram_end(ram_size) - u64::from(index) * STACK_SIZE,
        rdi: BOOT_INFO.0,
        rsi: u64::from(index),
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(bytes: &[u8]) -> Vec<u64> {
        bytes.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn every_paging_entry_is_user_accessible_and_the_gdt_has_user_descriptors() {
        let region = vmm_region(5 << 30, 2, &[]);
        let at = |gpa: u64| &region.iter().find(|(g, _)| g.0 == gpa).unwrap().1;
        for table in [PML4, PDPT, PD] {
            let entries = words(at(table));
            assert!(!entries.is_empty());
            assert!(entries.iter().all(|e| e & 0b111 == 0b111), "table {table:#x}");
        }
        // 2 MiB pages up to the end of RAM (6 GiB), the gap included.
        assert_eq!(words(at(PD)).len(), 3 * 1024);
        let gdt = words(at(GDT));
        let dpl = |entry: u64| (entry >> 45) & 3;
        let present = |entry: u64| entry >> 47 & 1 == 1;
        for (selector, long_code) in [(abi::USER_CS, true), (abi::USER_DS, false)] {
            assert_eq!(selector & 3, 3, "RPL 3");
            let entry = gdt[usize::from(selector >> 3)];
            assert!(present(entry) && dpl(entry) == 3, "{selector:#x}: {entry:#x}");
            assert_eq!(entry >> 53 & 1 == 1, long_code, "{selector:#x}: L bit");
        }
        assert_eq!(dpl(gdt[usize::from(abi::KERNEL_CS >> 3)]), 0);
    }

    #[test]
    fn the_boot_info_says_abi_1_2_in_abi_s_layout() {
        let region = vmm_region(64 << 20, 3, &[(Gpa(0xD000_0000), 2)]);
        let info = &region.iter().find(|(g, _)| *g == BOOT_INFO).unwrap().1;
        let words = words(info);
        assert_eq!(words[0], abi::BOOT_MAGIC);
        assert_eq!(words[1], 64 << 20);
        assert_eq!(words[4] >> 32, u64::from(abi::ABI_MINOR));
        assert_eq!(abi::ABI_MINOR, 2);
        // One region, then one device.
        assert_eq!((words[5], words[6]), (0, 64 << 20));
        assert_eq!((words[7], words[8], words[9]), (1, 0xD000_0000, 2));
    }
}

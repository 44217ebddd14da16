//! Guest images and the machine state of GUEST_ABI v1: long mode, identity
//! page tables for all of RAM, a flat GDT and the boot info, all in the
//! VMM's region `[0, 0x200000)`.

use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{elf, Endianness, Object};

use crate::error::{Error, Result};
use crate::Gpa;

/// First GPA a guest image may use; below it is the VMM's.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// Where the boot info lives.
pub const BOOT_INFO: Gpa = Gpa(0x1000);
/// Boot info magic, "GMEMABI1".
pub const BOOT_MAGIC: u64 = 0x3149_4241_4d45_4d47;
/// Stack bytes each vCPU owns below its stack top.
pub const STACK_SIZE: u64 = 0x1_0000;

const GDT: u64 = 0x2000;
const PML4: u64 = 0x1_0000;
const PDPT: u64 = 0x1_1000;
const PD: u64 = 0x1_2000;
const GIB: u64 = 1 << 30;
/// Page directories fit between `PD` and `IMAGE_BASE`: at most 64 GiB of RAM.
pub const MAX_RAM: u64 = 64 * GIB;

/// Flat 64-bit code and data descriptors (null, code at 0x8, data at 0x10).
const GDT_ENTRIES: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
pub(crate) const CODE_SELECTOR: u16 = 0x8;
pub(crate) const DATA_SELECTOR: u16 = 0x10;
pub(crate) const GDT_BASE: u64 = GDT;
pub(crate) const GDT_LIMIT: u16 = (GDT_ENTRIES.len() * 8 - 1) as u16;
pub(crate) const PAGE_TABLE_ROOT: u64 = PML4;

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

/// A guest program checked against GUEST_ABI v1 for a given RAM size.
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
            if ph.p_type(endian) != elf::PT_LOAD || ph.p_memsz(endian) == 0 {
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
            if end > ram_size {
                return Err(bad(format!(
                    "segment {gpa:#x}..{end:#x} does not fit in {ram_size:#x} bytes of RAM"
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

/// The VMM region's content for `ram_size` bytes of RAM and `vcpus` vCPUs:
/// (GPA, bytes) pairs to populate before the first vCPU runs.
pub(crate) fn vmm_region(ram_size: u64, vcpus: u32) -> Vec<(Gpa, Vec<u8>)> {
    let mut boot_info = Vec::with_capacity(24);
    boot_info.extend_from_slice(&BOOT_MAGIC.to_le_bytes());
    boot_info.extend_from_slice(&ram_size.to_le_bytes());
    boot_info.extend_from_slice(&vcpus.to_le_bytes());
    boot_info.extend_from_slice(&(gmem::PAGE_SIZE as u32).to_le_bytes());

    let gdt = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();

    // Identity map with 2 MiB pages: PML4[0] → PDPT; PDPT[i] → PD i.
    const PRESENT_RW: u64 = 0b11;
    const HUGE: u64 = 1 << 7;
    let gibs = ram_size.div_ceil(GIB);
    let pml4 = (PDPT | PRESENT_RW).to_le_bytes().to_vec();
    let pdpt = (0..gibs).flat_map(|i| ((PD + i * 0x1000) | PRESENT_RW).to_le_bytes()).collect();
    let two_mib = ram_size.div_ceil(2 << 20);
    let pd = (0..two_mib).flat_map(|j| ((j << 21) | PRESENT_RW | HUGE).to_le_bytes()).collect();

    vec![
        (BOOT_INFO, boot_info),
        (Gpa(GDT), gdt),
        (Gpa(PML4), pml4),
        (Gpa(PDPT), pdpt),
        (Gpa(PD), pd),
    ]
}

/// Checks that `ram_size` and `vcpus` fit GUEST_ABI v1.
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
    Ok(())
}

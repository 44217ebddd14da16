//! The kernel selftests' guest_memfd checklist, run on this host's
//! guest_memfd as the selftests run them: `guest_memfd_test.c`
//! (around v7.0), `set_memory_region_test.c`, and the capability gates of
//! `pre_fault_memory_test.c`, `x86/private_mem_conversions_test.c` and
//! `x86/private_mem_kvm_exits_test.c`. Each row names its source; a few
//! expectations come from the kernel source (`virt/kvm/guest_memfd.c`,
//! `virt/kvm/kvm_main.c`) and say so.
//!
//! SIGBUS checks need no signal handler: `write(2)` from an address the
//! kernel cannot fault in fails with `EFAULT` where a user access would
//! raise SIGBUS.

use std::os::fd::{AsRawFd, OwnedFd};

use gmem::PAGE_SIZE;
use gmem_kvm::native::{
    GuestMemfd, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS,
};
use gmem_kvm::{Errno, Error, Result};
use kvm_bindings::{
    kvm_userspace_memory_region, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::{Kvm, VmFd};
use rustix::fs::FallocateFlags;
use rustix::mm::MapFlags;

use crate::check::{Backend, Check, Status};
use crate::conformance::errno_name;
use crate::map::Map;

const GMEM_TEST: &str = "guest_memfd_test.c";
const REGION_TEST: &str = "set_memory_region_test.c";

/// A row: passes when `problem` is `None`.
fn row(name: impl Into<String>, source: &str, problem: Option<String>, ok: &str) -> Check {
    let (status, detail) = match problem {
        None => (Status::Pass, format!("{ok} ({source})")),
        Some(why) => (Status::Fail, format!("{why} ({source})")),
    };
    Check { name: name.into(), backend: Backend::Native, status, errno: None, detail }
}

fn unsupported(name: impl Into<String>, why: String) -> Check {
    Check {
        name: name.into(),
        backend: Backend::Native,
        status: Status::Unsupported,
        errno: None,
        detail: why,
    }
}

/// `Some(problem)` unless `got` is `want` (`None`: success).
fn expect(what: &str, got: Option<Errno>, want: Option<Errno>) -> Option<String> {
    (got != want).then(|| format!("{what}: {}, expected {}", errno_name(got), errno_name(want)))
}

fn create(vm: &VmFd, size: u64, flags: u64) -> std::result::Result<GuestMemfd, Errno> {
    GuestMemfd::create(vm, size, flags).map_err(|e| e.errno())
}

/// The checklist's probes of a mapping.
impl Map {
    /// Whether the kernel can read one byte at `offset` (false where a
    /// user access would raise SIGBUS).
    fn readable(&self, offset: usize, pipe: &(OwnedFd, OwnedFd)) -> bool {
        // SAFETY: write(2) copies from user memory with the kernel's checked
        // copy: an address it cannot fault in is EFAULT, never a fault here.
        let copied = unsafe { libc::write(pipe.1.as_raw_fd(), self.at(offset).cast(), 1) } == 1;
        let mut byte = 0u8;
        // SAFETY: read(2) into one byte of a local.
        copied && unsafe { libc::read(pipe.0.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) } == 1
    }

    /// Fills `range` with `value`; only for offsets `readable` said yes to.
    fn fill(&self, range: std::ops::Range<usize>, value: u8) {
        // SAFETY: `range` lies in the mapping, its pages can be faulted in
        // (the callers checked), and no Rust reference points into it.
        unsafe { std::ptr::write_bytes(self.at(range.start), value, range.len()) }
    }

    /// Whether every byte of `range` is `value`.
    fn holds(&self, range: std::ops::Range<usize>, value: u8) -> bool {
        range.into_iter().all(|i| {
            // SAFETY: as in `fill`; a volatile read of one mapped byte.
            unsafe { std::ptr::read_volatile(self.at(i)) == value }
        })
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe().map_err(Error::os("pipe"))
}

/// Runs the checklist. Needs /dev/kvm with KVM_CAP_GUEST_MEMFD.
pub fn run() -> Result<Vec<Check>> {
    let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    let valid =
        u64::try_from(vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS.into())).unwrap_or(0);
    let mut rows = vec![flags_row(&vm, valid), multiple_row(&vm)];
    let sets = [
        (0, "flags 0"),
        (GUEST_MEMFD_FLAG_MMAP, "MMAP"),
        (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, "MMAP|INIT_SHARED"),
    ];
    for (flags, name) in sets {
        if valid & flags != flags {
            rows.push(unsupported(
                format!("[{name}] file checks"),
                format!("KVM_CAP_GUEST_MEMFD_FLAGS {valid:#x} lacks {flags:#x} ({GMEM_TEST})"),
            ));
            continue;
        }
        rows.extend(file_rows(&vm, flags, name)?);
    }
    rows.push(guest_row(&kvm, valid));
    rows.extend(region_rows(&kvm)?);
    rows.extend(gated_rows(&kvm, &vm));
    Ok(rows)
}

/// Every flag bit: the capability's bits succeed, the others EINVAL.
fn flags_row(vm: &VmFd, valid: u64) -> Check {
    let wrong: Vec<String> = (0..64)
        .filter_map(|bit| {
            let flag = 1u64 << bit;
            let want = if valid & flag != 0 { None } else { Some(Errno::INVAL) };
            let got = create(vm, PAGE_SIZE, flag).err();
            (got != want).then(|| format!("bit {bit}: {}", errno_name(got)))
        })
        .collect();
    let problem = (!wrong.is_empty()).then(|| wrong.join(", "));
    row(
        "create with each flag bit 0-63",
        GMEM_TEST,
        problem,
        &format!("the offered {valid:#x} succeed, every other bit EINVAL"),
    )
}

/// Two files of 1 and 2 pages: their sizes, and different inodes.
fn multiple_row(vm: &VmFd) -> Check {
    let stat = |pages: u64| {
        let file = create(vm, pages * PAGE_SIZE, 0).map_err(|e| format!("create: {e}"))?;
        let st = rustix::fs::fstat(file.fd()).map_err(|e| format!("fstat: {e}"))?;
        Ok::<_, String>((st.st_size as u64, st.st_ino, file))
    };
    let problem = match (stat(1), stat(2)) {
        (Ok((s1, i1, _f1)), Ok((s2, i2, _f2)))
            if s1 == PAGE_SIZE && s2 == 2 * PAGE_SIZE && i1 != i2 =>
        {
            None
        }
        (Ok((s1, i1, _)), Ok((s2, i2, _))) => {
            Some(format!("sizes {s1:#x}, {s2:#x}, inodes {i1}, {i2}"))
        }
        (Err(e), _) | (_, Err(e)) => Some(e),
    };
    row("two files: sizes and inodes", GMEM_TEST, problem, "1 and 2 pages, different inodes")
}

/// The per-flag-set file checks of `__test_guest_memfd`.
fn file_rows(vm: &VmFd, flags: u64, set: &str) -> Result<Vec<Check>> {
    let mut rows = Vec::new();
    let name = |what: &str| format!("[{set}] {what}");
    let total = 4 * PAGE_SIZE;
    let pipe = pipe()?;

    let bad_sizes: Vec<u64> =
        (1..PAGE_SIZE).filter(|&s| create(vm, s, flags).err() != Some(Errno::INVAL)).collect();
    rows.push(row(
        name("sizes 1-4095 refused"),
        GMEM_TEST,
        (!bad_sizes.is_empty()).then(|| format!("not EINVAL for sizes {bad_sizes:?}")),
        "EINVAL for each",
    ));

    let file = GuestMemfd::create(vm, total, flags)?;
    let fd = file.fd();
    let mut buf = [0u8; 64];
    let io = [
        ("read", rustix::io::read(fd, &mut buf).err()),
        ("write", rustix::io::write(fd, &buf).err()),
        ("pread", rustix::io::pread(fd, &mut buf, 0).err()),
        ("pwrite", rustix::io::pwrite(fd, &buf, 0).err()),
    ];
    let succeeded: Vec<&str> = io.iter().filter(|(_, e)| e.is_none()).map(|(n, _)| *n).collect();
    rows.push(row(
        name("read, write, pread, pwrite fail"),
        GMEM_TEST,
        (!succeeded.is_empty()).then(|| format!("{succeeded:?} succeeded")),
        "each fails",
    ));

    let len = total as usize;
    if flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        let page = Map::new(fd, PAGE_SIZE as usize, MapFlags::SHARED).err();
        let all = Map::new(fd, len, MapFlags::SHARED).err();
        rows.push(row(
            name("mmap refused"),
            GMEM_TEST,
            (page.is_none() || all.is_none()).then(|| "a shared mapping was made".to_string()),
            &format!("{} (the errno is the kernel's, not the selftest's)", errno_name(page)),
        ));
    } else {
        rows.push(row(
            name("copy-on-write (MAP_PRIVATE) refused"),
            GMEM_TEST,
            Map::new(fd, len, MapFlags::PRIVATE)
                .is_ok()
                .then(|| "MAP_PRIVATE succeeded".to_string()),
            "refused",
        ));
        if flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
            rows.push(row(
                name("mmap, write, punch page 0"),
                GMEM_TEST,
                mmap_supported(fd, len, &pipe),
                "page 0 reads zero, the rest intact, writable again",
            ));
            rows.push(row(
                name("a mapping 4x the file"),
                GMEM_TEST,
                fault_overflow(fd, len, &pipe),
                "SIGBUS past the end, the data inside intact",
            ));
            rows.extend(madvise_rows(fd, len, set, &pipe));
        } else {
            let map = Map::new(fd, len, MapFlags::SHARED).map_err(Error::os("mmap guest_memfd"))?;
            let reachable: Vec<usize> =
                (0..len).step_by(PAGE_SIZE as usize).filter(|&o| map.readable(o, &pipe)).collect();
            rows.push(row(
                name("host access without INIT_SHARED"),
                GMEM_TEST,
                (!reachable.is_empty()).then(|| format!("offsets {reachable:x?} were readable")),
                "SIGBUS on every page (the pages are private)",
            ));
        }
    }

    let st = rustix::fs::fstat(fd).map_err(Error::os("fstat"))?;
    rows.push(row(
        name("file size and block size"),
        GMEM_TEST,
        (st.st_size as u64 != total || st.st_blksize as u64 != PAGE_SIZE)
            .then(|| format!("st_size {:#x}, st_blksize {:#x}", st.st_size, st.st_blksize)),
        "st_size is the size, st_blksize the page size",
    ));
    rows.push(row(
        name("fallocate rules"),
        GMEM_TEST,
        fallocate_rules(fd, total),
        "9 steps as the selftest makes them",
    ));

    let punch = FallocateFlags::KEEP_SIZE | FallocateFlags::PUNCH_HOLE;
    let p = PAGE_SIZE;
    let cases = [
        (0, 1),
        (0, p - 1),
        (0, p + 1),
        (1, 1),
        (1, p - 1),
        (1, p),
        (1, p + 1),
        (p, 1),
        (p, p - 1),
        (p, p + 1),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|&(offset, len)| {
            let got = rustix::fs::fallocate(fd, punch, offset, len).err();
            (got != Some(Errno::INVAL))
                .then(|| format!("({offset:#x}, {len:#x}): {}", errno_name(got)))
        })
        .collect();
    rows.push(row(
        name("ten unaligned punches"),
        GMEM_TEST,
        (!wrong.is_empty()).then(|| wrong.join(", ")),
        "EINVAL for each",
    ));
    Ok(rows)
}

fn mmap_supported(fd: &OwnedFd, len: usize, pipe: &(OwnedFd, OwnedFd)) -> Option<String> {
    let map = match Map::new(fd, len, MapFlags::SHARED) {
        Ok(map) => map,
        Err(e) => return Some(format!("mmap: {e}")),
    };
    if !map.readable(0, pipe) {
        return Some("the mapping cannot be faulted in".into());
    }
    map.fill(0..len, 0xaa);
    if !map.holds(0..len, 0xaa) {
        return Some("written bytes did not read back".into());
    }
    let punch = FallocateFlags::KEEP_SIZE | FallocateFlags::PUNCH_HOLE;
    if let Err(e) = rustix::fs::fallocate(fd, punch, 0, PAGE_SIZE) {
        return Some(format!("punching page 0: {e}"));
    }
    let page = PAGE_SIZE as usize;
    if !map.holds(0..page, 0) || !map.holds(page..len, 0xaa) {
        return Some("after punching page 0, page 0 is not zero or the rest changed".into());
    }
    map.fill(0..page, 0xaa);
    (!map.holds(0..len, 0xaa)).then(|| "page 0 could not be written again".into())
}

fn fault_overflow(fd: &OwnedFd, len: usize, pipe: &(OwnedFd, OwnedFd)) -> Option<String> {
    let map = match Map::new(fd, 4 * len, MapFlags::SHARED) {
        Ok(map) => map,
        Err(e) => return Some(format!("mmap 4x: {e}")),
    };
    map.fill(0..len, 0xaa);
    let past: Vec<usize> =
        (len..4 * len).step_by(PAGE_SIZE as usize).filter(|&o| map.readable(o, pipe)).collect();
    if !past.is_empty() {
        return Some(format!("offsets {past:x?} past the end were readable"));
    }
    (!map.holds(0..len, 0xaa)).then(|| "the data inside changed".into())
}

/// The madvise checks; the kernel source decides each answer.
fn madvise_rows(fd: &OwnedFd, len: usize, set: &str, pipe: &(OwnedFd, OwnedFd)) -> Vec<Check> {
    const SRC: &str = "kernel source: shmem-backed shared mapping";
    let Ok(map) = Map::new(fd, len, MapFlags::SHARED) else {
        return vec![unsupported(format!("[{set}] madvise"), "mmap failed".into())];
    };
    let advise = |advice: rustix::mm::Advice| {
        // SAFETY: advice on the mapping `map` owns; none frees memory that a
        // Rust reference points to.
        unsafe { rustix::mm::madvise(map.at(0).cast(), len, advice) }.err()
    };
    let mut rows = vec![row(
        format!("[{set}] MADV_HUGEPAGE"),
        SRC,
        expect("MADV_HUGEPAGE", advise(rustix::mm::Advice::LinuxHugepage), None),
        "accepted",
    )];
    // MADV_COLLAPSE (25) is not in rustix's Advice: the raw call.
    // SAFETY: as above; collapse changes no content.
    let collapse = unsafe { libc::madvise(map.at(0).cast(), len, 25) };
    let collapse = if collapse != 0 { last_errno() } else { None };
    rows.push(row(
        format!("[{set}] MADV_COLLAPSE"),
        SRC,
        expect("MADV_COLLAPSE", collapse, Some(Errno::INVAL)),
        "EINVAL",
    ));
    map.fill(0..len, 0x5a);
    let dontneed = advise(rustix::mm::Advice::LinuxDontNeed);
    let refault = map.readable(0, pipe) && map.holds(0..len, 0x5a);
    rows.push(row(
        format!("[{set}] MADV_DONTNEED, then refault"),
        SRC,
        expect("MADV_DONTNEED", dontneed, None)
            .or_else(|| (!refault).then(|| "the refaulted pages lost the file's bytes".into())),
        "accepted; the refault reads the file's bytes (a shared mapping drops only its PTEs)",
    ));
    let nodes = std::fs::read_to_string("/sys/devices/system/node/online").unwrap_or_default();
    // SAFETY: mbind with an invalid mode on the mapping `map` owns; it
    // changes nothing when refused.
    let bad_mode =
        unsafe { libc::syscall(libc::SYS_mbind, map.at(0), len, 999usize, 0usize, 0usize, 0usize) };
    let bad_mode = if bad_mode != 0 { last_errno() } else { None };
    rows.push(row(
        format!("[{set}] mbind with policy 999"),
        "kernel source: mm/mempolicy.c",
        expect("mbind", bad_mode, Some(Errno::INVAL)),
        "EINVAL",
    ));
    if nodes.trim() == "0" {
        rows.push(unsupported(
            format!("[{set}] NUMA placement (mbind, get_mempolicy)"),
            "one NUMA node (node 0 only): nothing to place".into(),
        ));
    }
    rows
}

fn fallocate_rules(fd: &OwnedFd, total: u64) -> Option<String> {
    let keep = FallocateFlags::KEEP_SIZE;
    let punch = keep | FallocateFlags::PUNCH_HOLE;
    let p = PAGE_SIZE;
    let steps: [(&str, FallocateFlags, u64, u64, bool); 9] = [
        ("allocate all", keep, 0, total, true),
        ("punch at an unaligned offset", punch, p - 1, p, false),
        ("allocate at the end", keep, total, p, false),
        ("allocate past the end", keep, total + p, p, false),
        ("punch at the end", punch, total, p, true),
        ("punch past the end", punch, total + p, p, true),
        ("punch an unaligned length", punch, p, p - 1, false),
        ("punch a page", punch, p, p, true),
        ("allocate the hole again", keep, p, p, true),
    ];
    steps.iter().find_map(|&(what, flags, offset, len, ok)| {
        let got = rustix::fs::fallocate(fd, flags, offset, len);
        (got.is_ok() != ok).then(|| format!("{what}: {}", errno_name(got.err())))
    })
}

/// `test_guest_memfd_guest`: a guest reads a guest_memfd-only memslot
/// (`userspace_addr` 0) that the host filled with 0xaa through its mapping,
/// writes 0xff, and the host sees it. A real-mode guest does it here:
/// `mov al, [0x8000]; out 0xe9, al; mov byte [0x8000], 0xff; hlt`. Where
/// KVM cannot run it, the row is unsupported and says what happened.
fn guest_row(kvm: &Kvm, valid: u64) -> Check {
    let name = "a guest reads and writes a guest_memfd-only memslot";
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    if valid & flags != flags {
        return unsupported(
            name,
            format!("KVM_CAP_GUEST_MEMFD_FLAGS {valid:#x} lacks MMAP|INIT_SHARED ({GMEM_TEST})"),
        );
    }
    match run_guest_memfd_guest(kvm) {
        Ok(None) => row(name, GMEM_TEST, None, "the guest read 0xaa; the host sees its 0xff"),
        Ok(Some(what)) => {
            unsupported(name, format!("KVM does not run it here: {what} ({GMEM_TEST})"))
        }
        Err(e) => row(name, GMEM_TEST, Some(format!("could not set it up: {e}")), ""),
    }
}

/// `Ok(None)` when the guest behaved as upstream expects, else what it did.
fn run_guest_memfd_guest(kvm: &Kvm) -> Result<Option<String>> {
    const DATA: u64 = 0x8000;
    const CODE: [u8; 10] = [0xa0, 0x00, 0x80, 0xe6, 0xe9, 0xc6, 0x06, 0x00, 0x80, 0xff];
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    let memfd =
        GuestMemfd::create(&vm, PAGE_SIZE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)?;
    let data = Map::new(memfd.fd(), PAGE_SIZE as usize, MapFlags::SHARED)
        .map_err(Error::os("mmap guest_memfd"))?;
    data.fill(0..PAGE_SIZE as usize, 0xaa);
    let code = Map::anonymous(DATA as usize).map_err(Error::os("mmap"))?;
    // SAFETY: the code fits in the fresh mapping at 0x1000; no reference
    // points into it.
    unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), code.at(0x1000), CODE.len()) };
    // SAFETY: the last byte is `hlt` (0xf4), right after the code.
    unsafe { code.at(0x1000 + CODE.len()).write(0xf4) };
    let low = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: DATA,
        userspace_addr: code.at(0) as u64,
    };
    // SAFETY: `code` is a mapping of DATA bytes that outlives the VM's
    // only run, below.
    unsafe { vm.set_user_memory_region(low) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    // SAFETY: `userspace_addr` 0: no host memory behind the guest_memfd slot.
    unsafe { memfd.bind(&vm, 1, DATA, PAGE_SIZE, 0, 0) }?;
    let mut vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    (sregs.cs.base, sregs.cs.selector, sregs.ds.base, sregs.ds.selector) = (0, 0, 0, 0);
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    let mut read = None;
    for _ in 0..16 {
        match vcpu.run() {
            Ok(kvm_ioctls::VcpuExit::IoOut(0xe9, bytes)) => read = bytes.first().copied(),
            Ok(kvm_ioctls::VcpuExit::Hlt) => break,
            Ok(other) => return Ok(Some(format!("exit {other:?}"))),
            Err(e) => return Ok(Some(format!("KVM_RUN: {e}"))),
        }
    }
    Ok(match read {
        Some(0xaa) if data.holds(0..1, 0xff) => None,
        Some(byte) => Some(format!(
            "the guest read {byte:#x}; the host sees {:#x}",
            if data.holds(0..1, 0xff) { 0xff } else { 0 }
        )),
        None => Some("the guest never reported".into()),
    })
}

/// `set_memory_region_test.c`'s guest_memfd rules. Upstream runs them on a
/// KVM_X86_SW_PROTECTED_VM; where the host has none, they run on the
/// default VM type, which binds guest_memfd too, and the rows say so.
fn region_rows(kvm: &Kvm) -> Result<Vec<Check>> {
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    let protected = kvm.check_extension_raw(kvm_bindings::KVM_CAP_VM_TYPES.into()) as u64
        & (1 << kvm_bindings::KVM_X86_SW_PROTECTED_VM)
        != 0;
    let source = if protected {
        REGION_TEST.to_string()
    } else {
        format!("{REGION_TEST}, on the default VM type: this host has no SW-protected VM type")
    };
    const SIZE: u64 = 2 << 20;
    let v2 = |vm: &VmFd, slot, flags, gpa, size, fd: u32, offset| {
        let region = kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: 0,
            guest_memfd_offset: offset,
            guest_memfd: fd,
            ..Default::default()
        };
        // SAFETY: `userspace_addr` 0: no host memory is mapped into the guest.
        unsafe { vm.set_user_memory_region2(region) }
            .err()
            .map(|e| Errno::from_raw_os_error(e.errno()))
    };
    let mut rows = Vec::new();
    let supported = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY;
    let wrong_v1: Vec<u32> = (0..32)
        .map(|bit| 1u32 << bit)
        .filter(|&flag| supported & flag == 0 || flag == KVM_MEM_GUEST_MEMFD)
        .filter(|&flag| {
            let region = kvm_userspace_memory_region {
                slot: 0,
                flags: flag,
                guest_phys_addr: 0,
                memory_size: SIZE,
                userspace_addr: 0,
            };
            // SAFETY: `userspace_addr` 0 maps no host memory.
            let got = unsafe { vm.set_user_memory_region(region) }.err().map(|e| e.errno());
            got != Some(libc::EINVAL)
        })
        .collect();
    rows.push(row(
        "v1 ioctl with a v2-only or unknown flag",
        &source,
        (!wrong_v1.is_empty()).then(|| format!("not EINVAL for {wrong_v1:x?}")),
        "EINVAL for each",
    ));
    let memfd = GuestMemfd::create(&vm, 4 * SIZE, 0)?;
    let gfd = memfd.fd().as_raw_fd() as u32;
    let wrong_v2: Vec<u32> = (3..32)
        .map(|bit| 1u32 << bit)
        .filter(|&flag| {
            flag != KVM_MEM_GUEST_MEMFD && v2(&vm, 0, flag, 0, SIZE, 0, 0) != Some(Errno::INVAL)
        })
        .collect();
    rows.push(row(
        "v2 ioctl with unknown flags",
        &source,
        (!wrong_v2.is_empty()).then(|| format!("not EINVAL for {wrong_v2:x?}")),
        "EINVAL for each",
    ));
    rows.push(row(
        "dirty logging with guest_memfd",
        &source,
        expect(
            "bind",
            v2(&vm, 0, KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES, 0, SIZE, gfd, 0),
            Some(Errno::INVAL),
        ),
        "EINVAL",
    ));
    rows.push(row(
        "read-only with guest_memfd",
        "kernel source: virt/kvm/kvm_main.c",
        expect(
            "bind",
            v2(&vm, 0, KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY, 0, SIZE, gfd, 0),
            Some(Errno::INVAL),
        ),
        "EINVAL",
    ));
    let kvm_fd = kvm.as_raw_fd() as u32;
    let vm_fd = vm.as_raw_fd() as u32;
    rows.push(row(
        "bind the /dev/kvm fd or the VM fd",
        &source,
        expect(
            "/dev/kvm fd",
            v2(&vm, 0, KVM_MEM_GUEST_MEMFD, 0, SIZE, kvm_fd, 0),
            Some(Errno::INVAL),
        )
        .or_else(|| {
            expect("VM fd", v2(&vm, 0, KVM_MEM_GUEST_MEMFD, 0, SIZE, vm_fd, 0), Some(Errno::INVAL))
        }),
        "EINVAL for both",
    ));
    let unaligned: Vec<u64> = (1..PAGE_SIZE)
        .filter(|&o| v2(&vm, 0, KVM_MEM_GUEST_MEMFD, 0, SIZE, gfd, o) != Some(Errno::INVAL))
        .collect();
    rows.push(row(
        "bind at unaligned offsets 1-4095",
        &source,
        (!unaligned.is_empty()).then(|| format!("not EINVAL at {unaligned:?}")),
        "EINVAL for each",
    ));
    // Two slots on one file, then a rebinding that overlaps each half.
    let gpa = 1u64 << 30;
    let setup = expect("slot 0", v2(&vm, 10, KVM_MEM_GUEST_MEMFD, gpa, 2 * SIZE, gfd, 0), None)
        .or_else(|| {
            expect(
                "slot 1",
                v2(&vm, 11, KVM_MEM_GUEST_MEMFD, 2 * gpa, 2 * SIZE, gfd, 2 * SIZE),
                None,
            )
        })
        .or_else(|| {
            expect("delete slot 0", v2(&vm, 10, KVM_MEM_GUEST_MEMFD, gpa, 0, gfd, 0), None)
        });
    // As upstream, the rebinding overlaps the other slot's GPA range too,
    // which kvm_main.c refuses with EEXIST before guest_memfd is asked.
    let exist = Some(Errno::EXIST);
    let problem = setup.or_else(|| {
        expect(
            "front half",
            v2(&vm, 10, KVM_MEM_GUEST_MEMFD, 2 * gpa - SIZE, 2 * SIZE, gfd, 0),
            exist,
        )
        .or_else(|| {
            expect(
                "back half",
                v2(&vm, 10, KVM_MEM_GUEST_MEMFD, 2 * gpa + SIZE, 2 * SIZE, gfd, 0),
                exist,
            )
        })
    });
    rows.push(row(
        "bindings overlapping another slot, from both sides",
        &source,
        problem,
        "EEXIST",
    ));
    let plain = rustix::fs::memfd_create("not-guest-memfd", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(Error::os("memfd_create"))?;
    rustix::fs::ftruncate(&plain, SIZE).map_err(Error::os("ftruncate"))?;
    rows.push(row(
        "bind a regular memfd",
        &source,
        expect(
            "bind",
            v2(&vm, 12, KVM_MEM_GUEST_MEMFD, 8 * gpa, SIZE, plain.as_raw_fd() as u32, 0),
            Some(Errno::INVAL),
        ),
        "EINVAL",
    ));
    rows.push(row(
        "punch without KEEP_SIZE",
        "kernel source: virt/kvm/guest_memfd.c",
        expect(
            "punch",
            rustix::fs::fallocate(memfd.fd(), FallocateFlags::PUNCH_HOLE, 0, PAGE_SIZE).err(),
            Some(Errno::OPNOTSUPP),
        ),
        "EOPNOTSUPP",
    ));
    rows.push(row(
        "delete a bound slot",
        &source,
        expect("delete", v2(&vm, 11, KVM_MEM_GUEST_MEMFD, 2 * gpa, 0, gfd, 0), None),
        "succeeds",
    ));
    Ok(rows)
}

/// What binding a guest_memfd range that is already bound (at another GPA)
/// gets: EEXIST in the newest selftest; kernels up to 6.18 (their
/// `kvm_gmem_bind`) say EINVAL.
pub(crate) fn overlap_errno() -> (String, Errno) {
    let release = rustix::system::uname().release().to_string_lossy().into_owned();
    let mut parts =
        release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version <= (6, 18) {
        (format!("kernel {release}: EINVAL up to 6.18 (kvm_gmem_bind)"), Errno::INVAL)
    } else {
        (format!("kernel {release}: EEXIST from 6.19 on"), Errno::EXIST)
    }
}

/// The selftests that need a capability this host may lack: each runs
/// where it exists, and is unsupported naming it where it does not.
fn gated_rows(kvm: &Kvm, vm: &VmFd) -> Vec<Check> {
    let pre_fault = vm.check_extension_raw(kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY.into()) > 0;
    let types = kvm.check_extension_raw(kvm_bindings::KVM_CAP_VM_TYPES.into()) as u64;
    let attrs = vm.check_extension_raw(kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES.into()) as u64;
    let protected = types & (1 << kvm_bindings::KVM_X86_SW_PROTECTED_VM) != 0;
    let private = attrs & u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0;
    let mut rows = vec![unsupported(
        "memory failure (hwpoison) on guest_memfd pages",
        format!(
            "not attempted: it poisons host pages through /sys/kernel/debug/hwpoison or \
             MADV_HWPOISON, which gmem check does not do to a host ({GMEM_TEST}, newest)"
        ),
    )];
    for (name, source, present, missing) in [
        (
            "pre-fault guest memory",
            "pre_fault_memory_test.c",
            pre_fault,
            "KVM_CAP_PRE_FAULT_MEMORY",
        ),
        (
            "private/shared conversions by the kernel",
            "x86/private_mem_conversions_test.c",
            protected && private,
            "KVM_X86_SW_PROTECTED_VM and KVM_MEMORY_ATTRIBUTE_PRIVATE",
        ),
        (
            "exits on private memory (KVM_EXIT_MEMORY_FAULT)",
            "x86/private_mem_kvm_exits_test.c",
            protected && private,
            "KVM_X86_SW_PROTECTED_VM and KVM_MEMORY_ATTRIBUTE_PRIVATE",
        ),
    ] {
        let why = if present {
            format!("{missing} present, but gmem check does not run this yet ({source})")
        } else {
            format!("this host lacks {missing} (VM types {types:#x}, memory attributes {attrs:#x}) ({source})")
        };
        rows.push(unsupported(name, why));
    }
    rows
}

/// The errno of the last failed libc call.
fn last_errno() -> Option<Errno> {
    Errno::from_io_error(&std::io::Error::last_os_error())
}

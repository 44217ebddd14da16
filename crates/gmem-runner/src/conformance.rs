//! The same operations on the kernel's guest_memfd and on a gmem file,
//! side by side, with the errnos compared. Where they differ, the
//! difference is either deliberate (gmem follows the seed, or offers what
//! a user-space file can) and says why, or it is a bug.

use std::sync::Arc;

use gmem::{Fallocate, FileOffset, PrivateMemFile, PAGE_SIZE};
use kvm_ioctls::{Kvm, VmFd};
use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use rustix::mm::MapFlags;

use crate::{Gpa, Vm};
use gmem_kvm::native::GuestMemfd;
use gmem_kvm::{Error, Result};

/// Binds a guest_memfd range with no shared backing (`userspace_addr` 0),
/// in a VM of the conformance table, which never runs a vCPU.
fn bind_private(
    native: &GuestMemfd,
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    offset: u64,
) -> Result<()> {
    // SAFETY: `userspace_addr` 0 maps no host memory into the guest, and
    // the table's VMs run no vCPU that could reach the slot at all.
    unsafe { native.bind(vm, slot, gpa, size, offset, 0) }
}

/// What the kernel's guest_memfd answers, per its selftests and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Success.
    Ok,
    /// This errno.
    Errno(Errno),
    /// Some error (the selftests check only that it fails).
    Fails,
}

impl Expect {
    /// Whether `result` (`None` for success) is what is expected.
    pub fn matches(self, result: Option<Errno>) -> bool {
        match self {
            Expect::Ok => result.is_none(),
            Expect::Errno(errno) => result == Some(errno),
            Expect::Fails => result.is_some(),
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Ok => f.write_str("success"),
            Expect::Errno(errno) => write!(f, "{}", errno_name(Some(*errno))),
            Expect::Fails => f.write_str("an error"),
        }
    }
}

/// `EINVAL`-style name of an errno; "success" for `None`.
pub fn errno_name(errno: Option<Errno>) -> String {
    let Some(errno) = errno else { return "success".into() };
    let names = [
        (Errno::PERM, "EPERM"),
        (Errno::INVAL, "EINVAL"),
        (Errno::EXIST, "EEXIST"),
        (Errno::BUSY, "EBUSY"),
        (Errno::NODEV, "ENODEV"),
        (Errno::SPIPE, "ESPIPE"),
        (Errno::OPNOTSUPP, "EOPNOTSUPP"),
        (Errno::BADF, "EBADF"),
        (Errno::NOMEM, "ENOMEM"),
        (Errno::FAULT, "EFAULT"),
        (Errno::DEADLK, "EDEADLK"),
        (Errno::ACCESS, "EACCES"),
        (Errno::NOENT, "ENOENT"),
        (Errno::NOSYS, "ENOSYS"),
    ];
    names
        .iter()
        .find(|(e, _)| *e == errno)
        .map_or_else(|| format!("errno {}", errno.raw_os_error()), |(_, n)| (*n).to_string())
}

/// One operation on both backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// What was done.
    pub name: &'static str,
    /// What the kernel should answer.
    pub expected: Expect,
    /// The kernel guest_memfd's result (`Some(None)` for success), or
    /// `None` where it was not run: this kernel has no guest_memfd.
    pub kernel: Option<Option<Errno>>,
    /// gmem's result: `None` for success.
    pub gmem: Option<Errno>,
    /// Where gmem deliberately answers differently: what it must answer,
    /// and why; `None` where the two must agree.
    pub deliberate: Option<Deliberate>,
    /// Where the kernel's expected answer comes from: a selftest, or the
    /// kernel source where no selftest checks the case.
    pub source: String,
}

/// The source of a row's expectation, by its name.
fn source_of(name: &str) -> String {
    let source = match name {
        "create with an unaligned size"
        | "create with unknown flags"
        | "read"
        | "write"
        | "punch an unaligned offset"
        | "punch an unaligned length"
        | "allocate, keeping the size"
        | "punch an aligned range"
        | "file size" => "guest_memfd_test.c",
        "bind a range" | "bind an unaligned offset" | "bind to another VM" => {
            "set_memory_region_test.c"
        }
        "bind the same file range twice" => return crate::selftests::overlap_errno().0,
        _ => "kernel source: virt/kvm/guest_memfd.c, virt/kvm/kvm_main.c",
    };
    source.to_owned()
}

/// A documented difference from the kernel: gmem's own expected answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deliberate {
    /// What gmem must answer: `None` for success.
    pub gmem: Option<Errno>,
    /// Why it differs from guest_memfd.
    pub why: &'static str,
}

/// gmem answers `gmem` (`None`: success) on purpose, for the reason `why`.
const fn deliberate(gmem: Option<Errno>, why: &'static str) -> Option<Deliberate> {
    Some(Deliberate { gmem, why })
}

impl Comparison {
    /// Whether gmem answers as it must: as the kernel did, or, for a
    /// documented difference, exactly the answer that difference names.
    /// Without the kernel's answer, gmem must give the expected one.
    pub fn conforms(&self) -> bool {
        match (self.deliberate, self.kernel) {
            (Some(d), _) => self.gmem == d.gmem,
            (None, Some(kernel)) => kernel == self.gmem,
            (None, None) => self.expected.matches(self.gmem),
        }
    }
}

fn errno_of<T>(result: std::result::Result<T, Errno>) -> Option<Errno> {
    result.err()
}

fn gmem_errno<T>(result: gmem::Result<T>) -> Option<Errno> {
    result.err().map(|e| e.errno())
}

fn kvm_errno<T>(result: Result<T>) -> Option<Errno> {
    result.err().map(|e| e.errno())
}

const SIZE: u64 = 2 << 20;

/// The kernel's side of the table: two VMs and a guest_memfd.
struct Kernel {
    vm: VmFd,
    other_vm: VmFd,
    native: GuestMemfd,
}

impl Kernel {
    fn fd(&self) -> &std::os::fd::OwnedFd {
        self.native.fd()
    }
}

/// Runs every comparison: gmem's side always (needs /dev/kvm), the
/// kernel's only where `with_kernel` and KVM_CAP_GUEST_MEMFD; without it
/// each row's `kernel` is `None` and gmem is held to the expectation.
pub fn compare(with_kernel: bool) -> Result<Vec<Comparison>> {
    let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
    let gvm = Vm::new()?;
    let other_gvm = Vm::new()?;
    let guest_memfd = with_kernel && gmem_kvm::native::probe()?.guest_memfd;
    let k = match guest_memfd {
        true => {
            let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
            let other_vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
            let native = GuestMemfd::create(&vm, SIZE, 0)?;
            Some(Kernel { vm, other_vm, native })
        }
        false => None,
    };
    let kernel = |f: &dyn Fn(&Kernel) -> Option<Errno>| k.as_ref().map(f);
    let ours = Arc::new(PrivateMemFile::new_guest("conformance")?);
    ours.set_len(SIZE)?;
    let mut out = Vec::new();
    let mut add = |name, expected, kernel, gmem, deliberate| {
        out.push(Comparison { name, expected, kernel, gmem, deliberate, source: source_of(name) })
    };

    add(
        "create with an unaligned size",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| kvm_errno(GuestMemfd::create(&k.vm, PAGE_SIZE + 1, 0))),
        gmem_errno(PrivateMemFile::new_guest("x").and_then(|f| f.set_len(PAGE_SIZE + 1))),
        None,
    );
    add(
        "create with size 0",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| kvm_errno(GuestMemfd::create(&k.vm, 0, 0))),
        gmem_errno(PrivateMemFile::new_guest("x").and_then(|f| f.set_len(0))),
        deliberate(
            None,
            "a gmem file is sized after creation (the seed's ftruncate); size 0 is its starting point",
        ),
    );
    add(
        "create with unknown flags",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| kvm_errno(GuestMemfd::create(&k.vm, SIZE, 1 << 40))),
        gmem_errno(ours.add_seals(gmem::Seals::from_bits_retain(1 << 30))),
        None,
    );
    add(
        "read",
        Expect::Fails,
        kernel(&|k| errno_of(rustix::io::pread(k.fd(), &mut [0u8; 8], 0))),
        gmem_errno(ours.read_at(&mut [0u8; 8], FileOffset(0))),
        deliberate(
            Some(Errno::PERM),
            "the seed's GUEST seal refuses host reads with EPERM; guest_memfd has no read method (pread: ESPIPE)",
        ),
    );
    add(
        "write",
        Expect::Fails,
        kernel(&|k| errno_of(rustix::io::pwrite(k.fd(), b"x", 0))),
        gmem_errno(ours.write_at(b"x", FileOffset(0))),
        deliberate(
            Some(Errno::PERM),
            "the seed's GUEST seal refuses host writes with EPERM; guest_memfd has no write method (pwrite: ESPIPE)",
        ),
    );
    add(
        "mmap without the MMAP flag",
        Expect::Errno(Errno::NODEV),
        kernel(&|k| map_errno(k.fd(), MapFlags::SHARED)),
        gmem_errno(ours.map(FileOffset(0), 4096, false)),
        deliberate(
            Some(Errno::PERM),
            "the seed refuses mmap of a sealed file with EPERM; guest_memfd says ENODEV",
        ),
    );
    let keep = FallocateFlags::KEEP_SIZE;
    let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    add(
        "punch an unaligned offset",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| errno_of(rustix::fs::fallocate(k.fd(), punch, 1, PAGE_SIZE))),
        gmem_errno(ours.fallocate(Fallocate::PunchHole, FileOffset(1), PAGE_SIZE)),
        None,
    );
    add(
        "punch an unaligned length",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| errno_of(rustix::fs::fallocate(k.fd(), punch, 0, PAGE_SIZE + 1))),
        gmem_errno(ours.fallocate(Fallocate::PunchHole, FileOffset(0), PAGE_SIZE + 1)),
        None,
    );
    add(
        "allocate, keeping the size",
        Expect::Ok,
        kernel(&|k| errno_of(rustix::fs::fallocate(k.fd(), keep, 0, SIZE))),
        gmem_errno(ours.fallocate(Fallocate::AllocateKeepSize, FileOffset(0), SIZE)),
        None,
    );
    add(
        "allocate past the end, keeping the size",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| errno_of(rustix::fs::fallocate(k.fd(), keep, SIZE - PAGE_SIZE, 2 * PAGE_SIZE))),
        gmem_errno(ours.fallocate(
            Fallocate::AllocateKeepSize,
            FileOffset(SIZE - PAGE_SIZE),
            2 * PAGE_SIZE,
        )),
        None,
    );
    add(
        "allocate, growing the file",
        Expect::Errno(Errno::OPNOTSUPP),
        kernel(&|k| errno_of(rustix::fs::fallocate(k.fd(), FallocateFlags::empty(), 0, 2 * SIZE))),
        gmem_errno(ours.fallocate(Fallocate::Allocate, FileOffset(0), 2 * SIZE)),
        deliberate(
            None,
            "a gmem file can grow (the seed's shmem file could); guest_memfd has a fixed size",
        ),
    );
    ours.set_len(SIZE)?;
    add(
        "punch an aligned range",
        Expect::Ok,
        kernel(&|k| errno_of(rustix::fs::fallocate(k.fd(), punch, 0, PAGE_SIZE))),
        gmem_errno(ours.fallocate(Fallocate::PunchHole, FileOffset(0), PAGE_SIZE)),
        None,
    );
    add(
        "ftruncate to an aligned size",
        Expect::Fails,
        kernel(&|k| errno_of(rustix::fs::ftruncate(k.fd(), SIZE))),
        gmem_errno(ours.set_len(SIZE)),
        deliberate(
            None,
            "the seed allows page-aligned ftruncate on a sealed file; guest_memfd refuses any",
        ),
    );
    add(
        "file size",
        Expect::Ok,
        kernel(&|k| {
            (rustix::fs::fstat(k.fd()).map(|s| s.st_size as u64).ok() != Some(SIZE))
                .then_some(Errno::INVAL)
        }),
        (ours.size() != SIZE).then_some(Errno::INVAL),
        None,
    );

    // Binding to memslots.
    add(
        "bind a range",
        Expect::Ok,
        kernel(&|k| kvm_errno(bind_private(&k.native, &k.vm, 0, 0, SIZE / 2, 0))),
        kvm_errno(gvm.add_private_memory(Gpa(0), &ours, FileOffset(0), SIZE / 2)),
        None,
    );
    add(
        "bind the same file range twice",
        Expect::Errno(crate::selftests::overlap_errno().1),
        kernel(&|k| kvm_errno(bind_private(&k.native, &k.vm, 1, 1 << 30, SIZE / 2, 0))),
        kvm_errno(gvm.add_private_memory(Gpa(1 << 30), &ours, FileOffset(0), SIZE / 2)),
        None,
    );
    add(
        "bind another file range over a bound GPA range",
        Expect::Errno(Errno::EXIST),
        kernel(&|k| {
            kvm_errno(
                GuestMemfd::create(&k.vm, SIZE, 0)
                    .and_then(|g| bind_private(&g, &k.vm, 5, SIZE / 4, SIZE / 2, 0)),
            )
        }),
        kvm_errno(
            PrivateMemFile::new_guest("overlap")
                .map_err(Error::from)
                .and_then(|f| {
                    let f = Arc::new(f);
                    f.set_len(SIZE)?;
                    gvm.add_private_memory(Gpa(SIZE / 4), &f, FileOffset(0), SIZE / 2)
                })
                .map(drop),
        ),
        None,
    );
    add(
        "bind an unaligned offset",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| kvm_errno(bind_private(&k.native, &k.vm, 2, 2 << 30, PAGE_SIZE, 1))),
        kvm_errno(gvm.add_private_memory(Gpa(2 << 30), &ours, FileOffset(1), PAGE_SIZE)),
        None,
    );
    add(
        "bind past the end of the file",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| kvm_errno(bind_private(&k.native, &k.vm, 3, 3 << 30, SIZE, SIZE / 2))),
        kvm_errno(gvm.add_private_memory(Gpa(3 << 30), &ours, FileOffset(SIZE / 2), SIZE)),
        None,
    );
    add(
        "bind to another VM",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| kvm_errno(bind_private(&k.native, &k.other_vm, 0, 0, SIZE / 2, SIZE / 2))),
        kvm_errno(other_gvm.add_private_memory(Gpa(0), &ours, FileOffset(SIZE / 2), SIZE / 2)),
        deliberate(
            Some(Errno::PERM),
            "the seed refuses a second owner with EPERM; guest_memfd says EINVAL for a foreign VM",
        ),
    );
    add(
        "bind an unaligned size",
        Expect::Errno(Errno::INVAL),
        kernel(&|k| kvm_errno(bind_private(&k.native, &k.vm, 4, 4 << 30, PAGE_SIZE + 1, SIZE / 2))),
        kvm_errno(gvm.add_private_memory(Gpa(4 << 30), &ours, FileOffset(SIZE / 2), PAGE_SIZE + 1)),
        None,
    );
    drop((gvm, other_gvm));
    let k = k.map(|k| k.native);
    let kernel = |f: &dyn Fn(&GuestMemfd) -> Option<Errno>| k.as_ref().map(f);
    add(
        "punch after the VM is gone",
        Expect::Ok,
        kernel(&|k| errno_of(rustix::fs::fallocate(k.fd(), punch, 0, SIZE))),
        gmem_errno(ours.fallocate(Fallocate::PunchHole, FileOffset(0), SIZE)),
        None,
    );
    add(
        "allocate again after the VM is gone",
        Expect::Ok,
        kernel(&|k| errno_of(rustix::fs::fallocate(k.fd(), keep, 0, SIZE))),
        gmem_errno(ours.fallocate(Fallocate::AllocateKeepSize, FileOffset(0), SIZE)),
        None,
    );
    Ok(out)
}

/// The errno of mapping the first page of `fd` read-only with `flags`.
fn map_errno(fd: &std::os::fd::OwnedFd, flags: MapFlags) -> Option<Errno> {
    use rustix::mm::{mmap, munmap, ProtFlags};
    // SAFETY: a new mapping at a kernel-chosen address, unmapped below.
    let map = unsafe { mmap(std::ptr::null_mut(), 4096, ProtFlags::READ, flags, fd, 0) };
    map.map(|ptr| {
        // SAFETY: the 4096-byte mapping just made; nothing refers to it.
        let _ = unsafe { munmap(ptr, 4096) };
    })
    .err()
}

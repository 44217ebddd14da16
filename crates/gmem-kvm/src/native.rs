//! The kernel's own guest_memfd (Linux 6.8+): capability probing, a check
//! that the kernel really serves guest reads from it, and the native file
//! used as the conformance oracle for gmem's user-space backend.
//!
//! Probe, don't assume: a kernel may accept KVM_CREATE_GUEST_MEMFD and
//! KVM_SET_USER_MEMORY_REGION2 and still serve guest accesses from
//! `userspace_addr` (seen on kvm_pvm hosts), and without memory attributes
//! nothing makes guest_memfd pages private. [`probe`] runs a tiny real-mode
//! guest to find out.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region2, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES, KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, VolatileMemory};

use crate::error::{Error, Result};

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (not in kvm-bindings yet).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `GUEST_MEMFD_FLAG_MMAP`: the file may be mmapped by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: pages start shared (host-accessible).
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;

/// What the host's KVM offers for guest_memfd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeSupport {
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: the flags KVM_CREATE_GUEST_MEMFD accepts.
    pub guest_memfd_flags: u64,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: bool,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`: attributes a VM's memory may carry (8 = private).
    pub memory_attributes: u64,
    /// `KVM_CAP_VM_TYPES` bitmap.
    pub vm_types: u64,
    /// Whether a guest reads guest_memfd content (not `userspace_addr`),
    /// found by running a tiny guest; `Err` says why it could not be told.
    pub serves_guest: std::result::Result<bool, String>,
}

impl NativeSupport {
    /// Whether the native backend can run guests here: guest_memfd that
    /// can be created mappable and shared (`MMAP | INIT_SHARED`) and bound
    /// with `KVM_SET_USER_MEMORY_REGION2`. Its mapping is the memslot's
    /// memory, so the guest runs on guest_memfd pages whether KVM faults
    /// them from the file or from `userspace_addr`; gmem's page states
    /// gate the host's access on top.
    pub fn usable(&self) -> std::result::Result<(), String> {
        if !self.guest_memfd {
            return Err("KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD)".into());
        }
        if !self.user_memory2 {
            return Err("KVM has no KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2)".into());
        }
        let needed = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        if self.guest_memfd_flags & needed != needed {
            return Err(format!(
                "guest_memfd cannot be created mappable and shared (KVM_CAP_GUEST_MEMFD_FLAGS \
                 {:#x} lacks MMAP|INIT_SHARED)",
                self.guest_memfd_flags
            ));
        }
        Ok(())
    }
}

/// A guest_memfd of a VM: the kernel's file, for the native backend and
/// for conformance checks.
#[derive(Debug)]
pub struct GuestMemfd {
    fd: OwnedFd,
}

impl GuestMemfd {
    /// `KVM_CREATE_GUEST_MEMFD` on `vm`.
    pub fn create(vm: &VmFd, size: u64, flags: u64) -> Result<Self> {
        let raw = vm
            .create_guest_memfd(kvm_create_guest_memfd { size, flags, ..Default::default() })
            .map_err(Error::kvm("KVM_CREATE_GUEST_MEMFD"))?;
        // SAFETY: KVM just returned this descriptor and nothing else owns it.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(raw) } })
    }

    /// Any descriptor posing as a guest_memfd, for checking that KVM
    /// refuses what is not one (KVM checks the file's type itself).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// The descriptor, for system calls a conformance check makes on it.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Binds `[offset, offset + size)` at `gpa` in `slot` with
    /// KVM_SET_USER_MEMORY_REGION2; `userspace_addr` may be 0.
    ///
    /// # Safety
    ///
    /// `userspace_addr` is 0 (no shared backing) or the address of a
    /// mapping of at least `size` bytes that no Rust reference points into
    /// and that stays mapped until the slot is deleted or the VM is gone:
    /// the guest writes to it.
    pub unsafe fn bind(
        &self,
        vm: &VmFd,
        slot: u32,
        gpa: u64,
        size: u64,
        offset: u64,
        userspace_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr,
            guest_memfd_offset: offset,
            guest_memfd: self.fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the caller's promise on `userspace_addr` (see above).
        unsafe { vm.set_user_memory_region2(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION2"))
    }
}

fn cap(kvm: &Kvm, cap: u32) -> u64 {
    u64::try_from(kvm.check_extension_raw(cap.into())).unwrap_or(0)
}

/// Probes the host's KVM for guest_memfd support and checks with a real
/// guest whether guest accesses are served from guest_memfd.
pub fn probe() -> Result<NativeSupport> {
    let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
    let guest_memfd = cap(&kvm, KVM_CAP_GUEST_MEMFD) != 0;
    let guest_memfd_flags = cap(&kvm, KVM_CAP_GUEST_MEMFD_FLAGS);
    let vm_types = cap(&kvm, KVM_CAP_VM_TYPES);
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    let memory_attributes =
        u64::try_from(vm.check_extension_raw(KVM_CAP_MEMORY_ATTRIBUTES.into())).unwrap_or(0);
    let user_memory2 = cap(&kvm, KVM_CAP_USER_MEMORY2) != 0;
    let serves_guest = if !guest_memfd || !user_memory2 {
        Err("no guest_memfd or KVM_SET_USER_MEMORY_REGION2".into())
    } else if guest_memfd_flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        Err("guest_memfd cannot be mmapped here, so no marker can be planted in it".into())
    } else {
        serves_guest(&vm, guest_memfd_flags).map_err(|e| e.to_string())
    };
    Ok(NativeSupport {
        guest_memfd,
        guest_memfd_flags,
        user_memory2,
        memory_attributes,
        vm_types,
        serves_guest,
    })
}

/// Runs, in real mode, `mov al, [0]; out 0xe9, al; hlt` with the same code
/// in guest_memfd and in `userspace_addr`, but a different byte at GPA 0:
/// the byte the guest prints says which backing serves it.
fn serves_guest(vm: &VmFd, flags: u64) -> Result<bool> {
    const SIZE: usize = 2 << 20;
    const CODE_AT: usize = 0x1000;
    const CODE: [u8; 6] = [0xa0, 0x00, 0x00, 0xe6, 0xe9, 0xf4];
    const FROM_GMEM: u8 = 0x47;
    const FROM_USER: u8 = 0x55;
    let gmem = GuestMemfd::create(
        vm,
        SIZE as u64,
        flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED),
    )?;
    let gmem_map = map_shared_fd(gmem.fd(), SIZE)?;
    let user_map = MmapRegion::<()>::new(SIZE).map_err(mmap_error)?;
    for (map, marker) in [(&gmem_map, FROM_GMEM), (&user_map, FROM_USER)] {
        let bytes = map.as_volatile_slice();
        let planted = bytes.write_slice(&[marker], 0).and(bytes.write_slice(&CODE, CODE_AT));
        planted.map_err(|e| Error::Unsupported(format!("planting the probe's code: {e}")))?;
    }
    // SAFETY: `user_map` is a mapping of SIZE bytes, referred to by no
    // Rust reference while the vCPU runs, and this VM's only vCPU runs in
    // this function only, while `user_map` lives.
    unsafe { gmem.bind(vm, 0, 0, SIZE as u64, 0, user_map.as_ptr() as u64) }?;
    let mut vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs { rip: CODE_AT as u64, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    for _ in 0..16 {
        match vcpu.run().map_err(Error::kvm("KVM_RUN"))? {
            VcpuExit::IoOut(0xe9, data) => {
                return match data[0] {
                    FROM_GMEM => Ok(true),
                    FROM_USER => Ok(false),
                    other => Err(Error::Unsupported(format!("probe guest read {other:#x}"))),
                }
            }
            VcpuExit::Hlt => break,
            _ => {}
        }
    }
    Err(Error::Unsupported("probe guest did not report".into()))
}

/// The one mapping of a native region's guest_memfd: the memslot's memory
/// and the host's way to shared pages. Locked in RAM as pages are faulted
/// in, out of core dumps and forked children; unmapped on drop.
pub(crate) struct GuestMemfdMap(MmapRegion<()>);

impl GuestMemfdMap {
    pub(crate) fn new(memfd: &GuestMemfd, len: u64) -> Result<Self> {
        let len = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument("guest_memfd region too large".into()))?;
        let map = map_shared_fd(memfd.fd(), len)?;
        let addr = map.as_ptr().cast();
        // SAFETY: the range is exactly this new mapping, owned by `map`.
        unsafe { rustix::mm::mlock_with(addr, len, rustix::mm::MlockFlags::ONFAULT) }
            .map_err(Error::os("mlock2 (guest_memfd mapping; RLIMIT_MEMLOCK or CAP_IPC_LOCK)"))?;
        for advice in [rustix::mm::Advice::LinuxDontFork, rustix::mm::Advice::LinuxDontDump] {
            // SAFETY: advice that changes no content, on this mapping only.
            unsafe { rustix::mm::madvise(addr, len, advice) }
                .map_err(Error::os("madvise (guest_memfd mapping)"))?;
        }
        Ok(Self(map))
    }

    pub(crate) fn addr(&self) -> *mut u8 {
        self.0.as_ptr()
    }
}

/// A shared mapping of `len` bytes of `fd` from offset 0 (vm-memory's
/// owned mapping, unmapped on drop).
fn map_shared_fd(fd: &OwnedFd, len: usize) -> Result<MmapRegion<()>> {
    let file = fd.try_clone().map_err(Error::io("dup guest_memfd"))?;
    let file = vm_memory::FileOffset::new(std::fs::File::from(file), 0);
    MmapRegion::from_file(file, len).map_err(mmap_error)
}

fn mmap_error(error: vm_memory::mmap::MmapRegionError) -> Error {
    match error {
        vm_memory::mmap::MmapRegionError::Mmap(e) => Error::io("mmap (guest_memfd)")(e),
        other => Error::InvalidArgument(format!("mmap (guest_memfd): {other}")),
    }
}

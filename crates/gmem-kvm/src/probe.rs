//! What this host offers gmem, and which backend `--backend auto` picks:
//! the report behind `gmem probe`. Everything is asked of the kernel
//! (capabilities, a userfaultfd handshake, a tiny guest), nothing guessed.

use kvm_bindings::{KVM_CAP_EXIT_HYPERCALL, KVM_CAP_MEMORY_FAULT_INFO, KVM_CAP_SYNC_REGS};
use kvm_ioctls::Kvm;
use linux_raw_sys::general::{
    UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_SIGBUS,
};

use crate::convert::KVM_HC_MAP_GPA_RANGE;
use crate::error::{Error, Result};
use crate::native::{self, NativeSupport};
use crate::uffd::Userfaultfd;

/// The host, as gmem sees it.
#[derive(Debug, Clone)]
pub struct HostReport {
    /// `KVM_GET_API_VERSION` (12 on every kernel since 2.6.22).
    pub api_version: i32,
    /// guest_memfd support, and whether it really serves guests.
    pub native: NativeSupport,
    /// `KVM_CAP_MEMORY_FAULT_INFO`.
    pub memory_fault_info: bool,
    /// `KVM_CAP_EXIT_HYPERCALL`: hypercalls KVM can exit to user space on.
    pub exit_hypercall: u64,
    /// `KVM_CAP_SYNC_REGS`: register sets KVM syncs through `kvm_run`.
    pub sync_regs: u64,
    /// The userfaultfd features offered, or why userfaultfd is unusable.
    pub userfaultfd: std::result::Result<u64, String>,
    /// `RLIMIT_MEMLOCK` (soft, hard) in bytes; `None` is unlimited.
    pub memlock: (Option<u64>, Option<u64>),
    /// Whether the process runs as root.
    pub root: bool,
    /// Whether `CAP_IPC_LOCK` is in the calling thread's effective set, so
    /// that `RLIMIT_MEMLOCK` does not apply (root without it is limited).
    pub ipc_lock: bool,
}

/// A backend choice and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// `"userspace"` or `"native"`.
    pub backend: &'static str,
    /// Why.
    pub reason: String,
}

impl HostReport {
    /// Whether KVM exits to user space on KVM_HC_MAP_GPA_RANGE.
    pub fn map_gpa_range_exits(&self) -> bool {
        self.exit_hypercall & (1 << KVM_HC_MAP_GPA_RANGE) != 0
    }

    /// Whether userfaultfd has what the user-space backend needs.
    pub fn userspace_usable(&self) -> std::result::Result<(), String> {
        let features = self.userfaultfd.clone()?;
        let needed =
            u64::from(UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_SIGBUS);
        if features & needed != needed {
            return Err(format!(
                "userfaultfd lacks shmem MISSING/MINOR or SIGBUS (offers {features:#x})"
            ));
        }
        Ok(())
    }

    /// What `--backend auto` runs on, and why. The policy: the user-space
    /// backend keeps guest memory in a sealed file whose pages live only in
    /// locked, undumpable mappings, lets the host reach shared pages only
    /// (through a view that faults on anything else), and works on any KVM
    /// host; it is `auto`'s choice. The native backend keeps memory in the
    /// kernel's guest_memfd, with the same page states on top; it would
    /// protect more only where the kernel removes guest pages from its
    /// direct map or makes them private (memory attributes), paths no host
    /// here offers and gmem does not use untested. So it runs when asked
    /// for (`--backend native`), never by default.
    pub fn auto_backend(&self) -> std::result::Result<Choice, String> {
        let why_not_native = match self.native.usable() {
            Ok(()) => "it runs guests here, but protects nothing more than the user-space \
                       backend on this kernel (use --backend native to run on it)"
                .to_owned(),
            Err(why) => why,
        };
        self.userspace_usable().map_err(|why| format!("{why}; and native: {why_not_native}"))?;
        Ok(Choice { backend: "userspace", reason: format!("native not chosen: {why_not_native}") })
    }
}

/// Probes the host. `Err` when /dev/kvm cannot be opened (`ENOENT`: no
/// KVM; `EACCES`: no permission).
pub fn host() -> Result<HostReport> {
    let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    let vm_cap = |cap: u32| u64::try_from(vm.check_extension_raw(cap.into())).unwrap_or(0);
    let memlock = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    Ok(HostReport {
        api_version: kvm.get_api_version(),
        native: native::probe()?,
        memory_fault_info: vm_cap(KVM_CAP_MEMORY_FAULT_INFO) != 0,
        exit_hypercall: vm_cap(KVM_CAP_EXIT_HYPERCALL),
        sync_regs: vm_cap(KVM_CAP_SYNC_REGS),
        userfaultfd: Userfaultfd::supported_features().map_err(|e| e.to_string()),
        memlock: (memlock.current, memlock.maximum),
        root: rustix::process::geteuid().is_root(),
        ipc_lock: rustix::thread::capabilities(None)
            .is_ok_and(|caps| caps.effective.contains(rustix::thread::CapabilitySet::IPC_LOCK)),
    })
}

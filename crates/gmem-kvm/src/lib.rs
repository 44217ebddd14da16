//! # gmem-kvm: guest private memory for your own KVM VMM
//!
//! The library a VMM adopts to back guest RAM with gmem's sealed
//! [`gmem::PrivateMemFile`]s. It has no VM, no vCPU, no run loop and no
//! signal handler: the VMM keeps its own `kvm_ioctls::VmFd`, slot numbering
//! and vCPU loop (and kicks its vCPUs its own way, e.g. `immediate_exit`).
//!
//! - [`PrivateMemory`]: the VM's guest memory and the owner of its files.
//!   [`PrivateMemory::add_region`] registers a [`RegionSpec`] with KVM; the
//!   memory keeps the VM and deletes its memslots when dropped, so no
//!   memslot outlives its mapping (no `unsafe` for the VMM).
//! - [`faults`]: serve guest first touches from your event loop
//!   ([`PrivateMemory::fault_fd`] + [`PrivateMemory::serve_faults`]) or from a
//!   thread ([`PrivateMemory::start_fault_server`]); a fault that cannot be
//!   served ends `KVM_RUN` instead of hanging it.
//! - [`convert`]: one conversion primitive ([`PrivateMemory::convert`]),
//!   a guest's request served at its exit in one call
//!   ([`PrivateMemory::serve_conversion_exit`]), decoding of
//!   `KVM_HC_MAP_GPA_RANGE` exits, and [`MemoryListener`]s told of every
//!   discard and conversion.
//! - Host access that never faults: [`PrivateMemory::read`] /
//!   [`PrivateMemory::write`], and for device threads [`DeviceMemory`], a
//!   vm-memory `GuestAddressSpace` whose views hold only the pages a
//!   device touches, with [`PinnedRange`]s for I/O that outlives a call
//!   ([`shared`]).
//! - [`launch`]: loaders that write through vm-memory load straight into
//!   private memory ([`LaunchMemory`]).
//! - [`snapshot`]: sealed snapshots, restored lazily through the fault
//!   path, with dirty tracking for diffs; [`migrate`]: live migration
//!   over any stream (pre-copy, post-copy, hybrid), built on both.
//! - [`probe`]: what the host offers, and which backend to use;
//!   [`harden`]: opt-in process hardening.
//!
//! ## Example: a VM with one private region
//!
//! ```
//! use std::sync::Arc;
//! use gmem::{FileOffset, PrivateMemFile};
//! use gmem_kvm::{PrivateMemory, Gpa, PageState, RegionSpec, DEFAULT_FAULT_AROUND_PAGES};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! # if !std::path::Path::new("/dev/kvm").exists() { return Ok(()); }
//! let kvm = kvm_ioctls::Kvm::new().unwrap();
//! let vm = Arc::new(kvm.create_vm().unwrap());
//! let memory = PrivateMemory::new(DEFAULT_FAULT_AROUND_PAGES)?;
//! let file = Arc::new(PrivateMemFile::new_guest("guest-ram")?);
//! file.set_len(16 << 20)?;
//! let spec = RegionSpec { slot: 0, gpa: Gpa(0), file, file_offset: FileOffset(0), size: 16 << 20 };
//! let region = memory.add_region(&vm, spec)?;
//! let _faults = memory.start_fault_server(|e| eprintln!("{e}"))?;
//! // ... create vCPUs on `vm` and run them; the guest's RAM is private.
//!
//! // The host reaches shared pages only.
//! assert_eq!(memory.read(Gpa(0x1000), &mut [0; 8]).unwrap_err().errno(), gmem::Errno::PERM);
//! memory.convert(Gpa(0x1000), 0x1000, PageState::Shared)?;
//! memory.shared().write_obj(0xfeed_u64, GuestAddress(0x1000)).unwrap();
//! let mut back = [0; 8];
//! memory.read(Gpa(0x1000), &mut back)?;
//! assert_eq!(u64::from_le_bytes(back), 0xfeed);
//! memory.remove_region(region.slot())?;
//! # Ok::<(), gmem_kvm::Error>(())
//! ```

mod access;
mod bits;
pub mod collapse;
pub mod convert;
mod error;
pub mod faults;
pub mod first_touch;
mod gate;
pub mod harden;
mod host;
mod kvm_stats;
pub mod launch;
pub mod memory;
pub mod migrate;
pub mod native;
pub mod probe;
mod region;
pub mod shared;
pub mod snapshot;
mod uffd;

pub use convert::ConversionRequest;
pub use error::{Errno, Error, Result};
pub use faults::{FaultError, FaultServer};
pub use kvm_stats::VmStatistics;
pub use launch::LaunchMemory;
pub use memory::{
    MemlockPolicy, MemoryListener, MemoryStats, PrivateMemory, Regions, DEFAULT_FAULT_AROUND_PAGES,
};
pub use migrate::{IncomingMigration, IncomingPages, MigrationInfo, MigrationMode, SendError};
pub use region::{BackendKind, PageState, PrivateRegion, RegionSpec};
pub use shared::{DeviceMemory, PinnedRange, SharedView};
pub use snapshot::{Prefetch, RestoreMode, SnapshotFile, SnapshotId, SnapshotInfo, SnapshotKey};

/// A guest physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

impl From<vm_memory::GuestAddress> for Gpa {
    fn from(address: vm_memory::GuestAddress) -> Self {
        Gpa(address.0)
    }
}

impl From<Gpa> for vm_memory::GuestAddress {
    fn from(gpa: Gpa) -> Self {
        vm_memory::GuestAddress(gpa.0)
    }
}

impl std::fmt::Display for Gpa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GPA {:#x}", self.0)
    }
}

/// Test support shared by the workspace's test suites.
#[doc(hidden)]
pub mod test_support {
    /// Whether tests that need /dev/kvm can run. Without it they are
    /// skipped loudly, unless `GMEM_REQUIRE_KVM=1` (set by `.ci/run` where
    /// /dev/kvm exists): then a missing or unusable /dev/kvm fails the test.
    pub fn kvm_available() -> bool {
        let required = std::env::var("GMEM_REQUIRE_KVM").is_ok_and(|v| v == "1");
        match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Ok(_) => true,
            Err(e) if required => panic!("GMEM_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: this test needs /dev/kvm ({e}); GMEM_REQUIRE_KVM=1 makes it fail instead");
                false
            }
        }
    }
}

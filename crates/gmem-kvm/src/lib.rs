//! # gmem-kvm: KVM guests whose RAM is served from gmem private memory
//!
//! The seed's "KVM side", made real: a [`Vm`] binds itself as the owner of
//! GUEST-sealed [`gmem::PrivateMemFile`]s, maps them into KVM-only windows
//! and serves every first guest touch through userfaultfd and get-and-lock
//! (see [`memory`] for the path of a page). Punches and
//! truncations of the files reach the VM's invalidation callback and the
//! guest then reads fresh zero pages.
//!
//! Pages are private or shared: the guest converts them through port 0xF0
//! of GUEST_ABI v1 (or [`Vm::convert`]), and the host reaches shared pages
//! only, through [`Vm::read_guest`]/[`Vm::write_guest`] or the vm-memory
//! view of [`shared`].
//!
//! ```no_run
//! use gmem_kvm::{GuestImage, RunConfig, Vm, Outcome};
//!
//! let ram = 64 << 20;
//! let (vm, _file) = Vm::with_ram(ram)?;
//! let image = GuestImage::parse(gmem_guest::demo(), ram)?;
//! vm.load(&image, ram, 1)?;
//! let config = RunConfig::new(1);
//! let report = vm.run(&image, ram, &config, &|_, _| {})?;
//! assert_eq!(report.outcome, Outcome::Exit(0));
//! # Ok::<(), gmem_kvm::Error>(())
//! ```

pub mod bench;
pub mod boot;
pub mod check;
pub mod conformance;
mod error;
pub mod memory;
pub mod native;
pub mod probe;
pub mod shared;
mod uffd;
mod vm;

pub use boot::GuestImage;
pub use error::{Errno, Error, Result};
pub use memory::MemoryStats;
pub use vm::{
    ports, Outcome, RunConfig, RunReport, SyncHandler, Vm, VmStats, KVM_HC_MAP_GPA_RANGE,
};

/// A guest physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

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

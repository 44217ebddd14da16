//! # gmem-runner: gmem's own VMM
//!
//! The GUEST_ABI 1.2 VM behind `gmem run`, `gmem bench` and `gmem check`,
//! built on [`gmem_kvm`]'s public API only, as any VMM would: its own
//! `VmFd`, slot numbers, vCPU threads and kicks ([`kick`]), and a
//! [`gmem_kvm::PrivateMemory`] for RAM.
//!
//! ```
//! use gmem_runner::{GuestImage, Outcome, RunConfig, Vm};
//!
//! # if !std::path::Path::new("/dev/kvm").exists() { return Ok(()); }
//! let ram = 64 << 20;
//! let (vm, _file) = Vm::with_ram(ram)?;
//! let image = GuestImage::parse(gmem_guest::demo(), ram)?;
//! vm.load(&image, ram, 1)?;
//! let report = vm.run(&image, ram, &RunConfig::new(1), &|_, _| {})?;
//! assert_eq!(report.outcome, Outcome::Exit(0));
//! # Ok::<(), gmem_kvm::Error>(())
//! ```

pub mod bench;
pub mod check;
pub mod conformance;
pub mod kick;
mod map;
pub mod migrate;
pub mod scenarios;
pub mod selftests;
pub mod snapshot;
pub mod stress;
mod vcpu;
mod vm;

pub use gmem_boot::{self as boot, abi, GuestImage};
pub use gmem_kvm::Gpa;
pub use migrate::{Link, Listener, MigrationAddress};
pub use snapshot::VmState;
pub use vm::{
    probe_hypercall_exits, Disk, Outcome, RunConfig, RunReport, SyncHandler, Vm, VmStats,
    RAM_FILE_SIZE,
};

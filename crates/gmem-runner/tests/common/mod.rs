//! Helpers for tests that need /dev/kvm.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use gmem_runner::{GuestImage, Outcome, RunConfig, RunReport, Vm};

pub use gmem_kvm::test_support::kvm_available as kvm;

pub const RAM: u64 = 64 << 20;

pub fn config(vcpus: u32) -> RunConfig {
    RunConfig { timeout: Some(Duration::from_secs(60)), ..RunConfig::new(vcpus) }
}

/// Loads the built-in guest `name` into `vm` and runs it.
pub fn run(vm: &Vm, name: &str, vcpus: u32, on_sync: gmem_runner::SyncHandler<'_>) -> RunReport {
    let image = GuestImage::parse(gmem_guest::guest(name).unwrap(), RAM).unwrap();
    vm.load(&image, RAM, vcpus).unwrap();
    let report = vm.run(&image, RAM, &config(vcpus), on_sync).unwrap();
    if !matches!(report.outcome, Outcome::Exit(_)) {
        eprintln!("console: {}", String::from_utf8_lossy(&report.console));
    }
    report
}

pub fn console(report: &RunReport) -> String {
    String::from_utf8_lossy(&report.console).into_owned()
}

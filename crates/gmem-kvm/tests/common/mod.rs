//! Helpers for tests that need /dev/kvm.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use gmem_kvm::{GuestImage, Outcome, RunConfig, RunReport, Vm};

/// Whether KVM tests can run. Without /dev/kvm they are skipped loudly,
/// unless GMEM_REQUIRE_KVM=1 (set by .ci/run where /dev/kvm exists), where
/// a missing or unusable /dev/kvm fails the test.
pub fn kvm() -> bool {
    let required = std::env::var("GMEM_REQUIRE_KVM").is_ok_and(|v| v == "1");
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) if required => panic!("GMEM_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"),
        Err(e) => {
            eprintln!(
                "SKIPPED: this test needs /dev/kvm ({e}); set GMEM_REQUIRE_KVM=1 to fail instead"
            );
            false
        }
    }
}

pub const RAM: u64 = 64 << 20;

pub fn config(vcpus: u32) -> RunConfig {
    RunConfig { vcpus, timeout: Some(Duration::from_secs(60)), echo_console: false }
}

/// Loads the built-in guest `name` into `vm` and runs it.
pub fn run(vm: &Vm, name: &str, vcpus: u32, on_sync: gmem_kvm::SyncHandler<'_>) -> RunReport {
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

//! Helpers for tests that need /dev/kvm.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use gmem_runner::{GuestImage, Outcome, RunConfig, RunReport, Vm};

pub mod rig;

pub use gmem_kvm::test_support::kvm_available as kvm;

pub const RAM: u64 = 64 << 20;

pub fn config(vcpus: u32) -> RunConfig {
    RunConfig { timeout: Some(Duration::from_secs(60)), ..RunConfig::new(vcpus) }
}

/// Loads the built-in guest `name` into `vm` (`ram` bytes of RAM), calls
/// `launched` between the load and the run, and runs it as `config` says.
pub fn launch(
    vm: &Vm,
    name: &str,
    ram: u64,
    config: &RunConfig,
    launched: impl FnOnce(),
    on_sync: gmem_runner::SyncHandler<'_>,
) -> RunReport {
    let image = GuestImage::parse(gmem_guest::guest(name).unwrap(), ram).unwrap();
    vm.load(&image, ram, config.vcpus).unwrap();
    launched();
    vm.run(&image, ram, config, on_sync).unwrap()
}

/// Loads the built-in guest `name` into `vm` and runs it.
pub fn run(vm: &Vm, name: &str, vcpus: u32, on_sync: gmem_runner::SyncHandler<'_>) -> RunReport {
    let report = launch(vm, name, RAM, &config(vcpus), || {}, on_sync);
    if !matches!(report.outcome, Outcome::Exit(_)) {
        eprintln!("console: {}", String::from_utf8_lossy(&report.console));
    }
    report
}

/// A new GUEST-sealed file of `size` bytes.
pub fn guest_file(size: u64) -> std::sync::Arc<gmem::PrivateMemFile> {
    let file = std::sync::Arc::new(gmem::PrivateMemFile::new_guest("test-ram").unwrap());
    file.set_len(size).unwrap();
    file
}

pub fn console(report: &RunReport) -> String {
    String::from_utf8_lossy(&report.console).into_owned()
}

/// The /proc/self/smaps entry of the mapping that starts at `addr`: its
/// lines from the header through `VmFlags`, the last field.
pub fn smaps_entry(addr: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let start = format!("{addr:x}-");
    let mut entry = Vec::new();
    for line in smaps.lines().skip_while(|l| !l.starts_with(&start)) {
        entry.push(line.to_owned());
        if line.starts_with("VmFlags") {
            break;
        }
    }
    assert!(!entry.is_empty(), "no mapping at {start}");
    entry
}

/// `Locked:` of the mapping at `addr` in this process, in pages
/// (proportional: a page mapped twice counts half in each mapping).
pub fn locked_pages_of_mapping(addr: u64) -> u64 {
    let entry = smaps_entry(addr);
    let kib = entry
        .iter()
        .find_map(|l| l.strip_prefix("Locked:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    kib * 1024 / gmem::PAGE_SIZE
}

/// Runs test `name` of this test binary again, in a child process with
/// `env` set (`KEY=1`); returns whether it passed, and its output. A child
/// still running after two minutes is killed and fails the test.
pub fn run_in_child(name: &str, env: &str) -> (bool, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: the child process hung for two minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut text);
    let _ = child.stderr.take().unwrap().read_to_string(&mut text);
    (status.success(), text)
}

//! Memory cost of conversions: resident memory and VMAs. In a test binary
//! of its own, one test at a time, so that process-wide figures are not
//! disturbed by other tests.

mod common;

use std::sync::Mutex;

use common::{kvm, RAM};
use gmem_kvm::convert::ATTRIBUTE_PRIVATE;
use gmem_runner::{Gpa, Vm};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn vma_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

#[test]
fn memory_is_not_held_twice_after_conversions() {
    if !kvm() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const LEN: u64 = 16 << 20;
    const BASE: u64 = 0x100_0000;
    let (vm, files) = Vm::with_ram(RAM).unwrap();
    let file = &files[0];
    let allocated = file.stats().allocated_pages;
    let resident = status_kib("RssShmem:");
    let data = vec![0x5a; LEN as usize];
    let mut peaks = Vec::new();
    for _ in 0..3 {
        vm.convert(Gpa(BASE), LEN, 0).unwrap();
        vm.write_guest(Gpa(BASE), &data).unwrap();
        assert_eq!(file.stats().allocated_pages, allocated + LEN / 4096, "held once, in the file");
        peaks.push(status_kib("RssShmem:"));
        vm.convert(Gpa(BASE), LEN, ATTRIBUTE_PRIVATE).unwrap();
        assert_eq!(file.stats().allocated_pages, allocated, "conversion back frees the pages");
        assert!(status_kib("RssShmem:") < resident + 1024, "resident memory back to its start");
    }
    let slack = 1024;
    assert!(peaks[0] >= resident + LEN / 1024 - slack, "{peaks:?} from {resident} KiB");
    assert!(peaks.iter().all(|&p| p <= peaks[0] + slack), "no growth over rounds: {peaks:?}");
}

#[test]
fn scattered_conversions_do_not_split_vmas() {
    if !kvm() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const BASE: u64 = 0x100_0000;
    const PAGES: u64 = 8192;
    let (vm, _file) = Vm::with_ram(RAM).unwrap();
    let before = vma_count();
    // Every other page: 4096 conversions, each page then written by the host.
    for page in (0..PAGES).step_by(2) {
        let gpa = Gpa(BASE + page * 4096);
        vm.convert(gpa, 4096, 0).unwrap();
        vm.write_guest(gpa, &page.to_le_bytes()).unwrap();
    }
    let shared = vma_count();
    for page in (0..PAGES).step_by(4) {
        vm.convert(Gpa(BASE + page * 4096), 4096, ATTRIBUTE_PRIVATE).unwrap();
    }
    let after = vma_count();
    assert!(shared <= before + 2 && after <= before + 2, "VMAs: {before} -> {shared} -> {after}");
}

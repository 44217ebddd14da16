//! Every allocated page of a sealed file is locked in RAM, and the file
//! costs its size in `RLIMIT_MEMLOCK` once. Alone in its own test binary:
//! it reads the process's locked memory, which other tests would change.

mod common;

use std::sync::Arc;

use common::{guest_file, Recorder};
use gmem::{FileOffset, PageIndex, PageRange, PAGE_SIZE};

/// Locked bytes of the process: the sum of `Locked:` in /proc/self/smaps
/// (resident pages of locked mappings).
fn locked_bytes() -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    smaps
        .lines()
        .filter_map(|l| l.strip_prefix("Locked:"))
        .map(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024)
        .sum()
}

/// `VmLck` of the process: what RLIMIT_MEMLOCK is checked against.
fn vm_lck() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("VmLck:")).unwrap();
    line.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

#[test]
fn pages_are_locked_once_and_windows_cost_no_memlock() {
    const SIZE: u64 = 8 << 20;
    let before = vm_lck();
    let file = guest_file(SIZE);
    assert_eq!(vm_lck() - before, SIZE, "the file is charged its size");
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    let windows: Vec<_> =
        (0..3).map(|_| binding.map_window(FileOffset(0), SIZE).unwrap()).collect();
    assert_eq!(vm_lck() - before, SIZE, "owner windows are not charged again");

    let locked = locked_bytes();
    let guard = binding.get_and_lock_range(PageRange::new(PageIndex(16), PageIndex(48))).unwrap();
    guard.write(0, b"private").unwrap();
    drop(guard);
    assert_eq!(
        locked_bytes() - locked,
        32 * PAGE_SIZE,
        "pages made by get-and-lock are locked before anything maps them"
    );
    // Growing the file moves the pages to a new locked window: still locked.
    file.set_len(2 * SIZE).unwrap();
    assert_eq!(locked_bytes() - locked, 32 * PAGE_SIZE);
    assert_eq!(vm_lck() - before, 2 * SIZE);
    drop(windows);
}

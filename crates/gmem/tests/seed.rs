//! The seed's own tests, ported: its userspace test program (and each `#if 0`
//! variant) and its debugfs harness flow (in `gmem::seed`, which `gmem
//! check` runs too), and one test per defect of the seed.

mod common;

use std::sync::Arc;

use common::{errno, guest_file, Recorder};
use gmem::{Errno, Fallocate, FileOffset, PageIndex, PageRange, PrivateMemFile, PAGE_SIZE};

/// The seed's userspace program (and each `#if 0` variant) and its debugfs
/// harness flow, as `gmem check` runs them: every one must pass.
#[test]
fn seed_flows_pass() {
    let checks = gmem::seed::checks();
    assert_eq!(checks.len(), 5);
    for check in checks {
        assert!(check.outcome.is_ok(), "{}: {:?}", check.name, check.outcome);
    }
}

/// Seed defect: `guest_owner` was never stored, so a second owner was never
/// refused. Here it gets EPERM, and the same owner may bind again.
#[test]
fn second_owner_is_refused() {
    let file = guest_file(PAGE_SIZE);
    let first = Arc::new(Recorder::default());
    let second = Arc::new(Recorder::default());
    let a = file.bind(&first).unwrap();
    let b = file.bind(&first).unwrap();
    assert_eq!(errno(file.bind(&second)), Errno::PERM);
    drop(a);
    assert_eq!(errno(file.bind(&second)), Errno::PERM, "still bound through b");
    drop(b);
    let _c = file.bind(&second).unwrap();
}

/// Only a GUEST-sealed file can be bound.
#[test]
fn unsealed_file_cannot_be_bound() {
    let file = Arc::new(PrivateMemFile::new("plain").unwrap());
    assert_eq!(errno(file.bind(&Arc::new(Recorder::default()))), Errno::INVAL);
}

/// Seed defects: get_lock_pfn returned an errno as an unsigned pfn (and the
/// harness tested `pfn < 0`), and SGP_WRITE let the consumer allocate past
/// EOF. Here: EINVAL as an error value, and nothing allocated or grown.
#[test]
fn get_and_lock_past_eof_is_einval_and_allocates_nothing() {
    let file = guest_file(4 * PAGE_SIZE);
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    assert_eq!(errno(binding.get_and_lock(PageIndex(4))), Errno::INVAL);
    assert_eq!(errno(binding.get_and_lock(PageIndex(u64::MAX))), Errno::INVAL);
    assert_eq!(
        errno(binding.get_and_lock_range(PageRange::new(PageIndex(2), PageIndex(5)))),
        Errno::INVAL
    );
    assert_eq!(
        errno(binding.get_and_lock_range(PageRange::new(PageIndex(2), PageIndex(2)))),
        Errno::INVAL
    );
    let stats = file.stats();
    assert_eq!((stats.size, stats.allocated_pages, stats.locked_pages), (4 * PAGE_SIZE, 0, 0));
    // The last page is fine.
    drop(binding.get_and_lock(PageIndex(3)).unwrap());
}

/// Seed caveat: invalidate could run after the owner (struct kvm) was freed.
/// Here the owner is weak: a gone owner is skipped and counted.
#[test]
fn invalidation_after_owner_is_gone_is_skipped() {
    let file = guest_file(16 * PAGE_SIZE);
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    drop(binding.get_and_lock_range(PageRange::new(PageIndex(0), PageIndex(4))).unwrap());
    drop(owner);
    file.fallocate(Fallocate::PunchHole, FileOffset(0), 16 * PAGE_SIZE).unwrap();
    let stats = file.stats();
    assert_eq!((stats.invalidations, stats.skipped_invalidations), (0, 1));
    assert_eq!(stats.allocated_pages, 0);
    drop(binding);
    // Once unbound, a new owner can take the file.
    let _again = file.bind(&Arc::new(Recorder::default())).unwrap();
}

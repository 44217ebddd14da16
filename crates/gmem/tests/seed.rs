//! The seed's own tests, ported: its userspace test program (and each `#if 0`
//! variant), its debugfs harness flow, and one test per defect of the seed.

mod common;

use std::sync::Arc;

use common::{errno, guest_file, Recorder};
use gmem::{Errno, Fallocate, FileOffset, PageIndex, PageRange, PrivateMemFile, Seals, PAGE_SIZE};

/// The seed's userspace program, step by step, with the seed's errnos.
#[test]
fn seed_test_program() {
    let file = Arc::new(PrivateMemFile::new("memfd_guest").unwrap());
    file.add_seals(Seals::GUEST).unwrap();
    file.set_len(2 << 20).unwrap();

    assert_eq!(errno(file.write_at(b"test", FileOffset(0))), Errno::PERM);
    assert_eq!(errno(file.read_at(&mut [0; 4], FileOffset(0))), Errno::PERM);
    assert_eq!(errno(file.map(FileOffset(0), 4096, false)), Errno::PERM);

    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    drop(binding.get_and_lock(PageIndex(0x100)).unwrap());
    drop(binding.get_and_lock(PageIndex(0x1)).unwrap());
    file.set_len(0).unwrap();
    drop(binding);
    assert!(!file.is_bound());
    assert_eq!(file.stats().allocated_pages, 0);
}

/// `#if 0` variant 1: a write before sealing makes the seal fail with EBUSY.
#[test]
fn seal_after_write_is_busy() {
    let file = PrivateMemFile::new("memfd_guest").unwrap();
    assert_eq!(file.write_at(b"test", FileOffset(0)).unwrap(), 4);
    assert_eq!(errno(file.add_seals(Seals::GUEST)), Errno::BUSY);
    assert!(!file.is_guest());
}

/// `#if 0` variant 2: ftruncate before sealing → EBUSY.
#[test]
fn seal_after_ftruncate_is_busy() {
    let file = PrivateMemFile::new("memfd_guest").unwrap();
    file.set_len(4096).unwrap();
    assert_eq!(errno(file.add_seals(Seals::GUEST)), Errno::BUSY);
    // Back to size 0, sealing works.
    file.set_len(0).unwrap();
    file.add_seals(Seals::GUEST).unwrap();
}

/// `#if 0` variant 3: mmap before sealing → EBUSY, even at size 0; after the
/// mapping is gone sealing works.
#[test]
fn seal_while_mapped_is_busy() {
    let file = PrivateMemFile::new("memfd_guest").unwrap();
    let map = file.map(FileOffset(0), 4096, false).unwrap();
    assert_eq!(errno(file.add_seals(Seals::GUEST)), Errno::BUSY);
    drop(map);
    file.add_seals(Seals::GUEST).unwrap();
    assert_eq!(file.seals().unwrap() & Seals::GUEST, Seals::GUEST);
}

/// The debugfs harness: bind, get-and-lock at 0x100 and 0x1, truncate to 0:
/// the callback sees exactly those pages; unbind.
#[test]
fn debugfs_harness_flow() {
    let file = guest_file(2 << 20);
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    for page in [0x100, 0x1] {
        let guard = binding.get_and_lock(PageIndex(page)).unwrap();
        assert_eq!(guard.pages(), PageRange::new(PageIndex(page), PageIndex(page + 1)));
        assert_eq!(guard.offset(), FileOffset(page * PAGE_SIZE));
        let frames = guard.frames().unwrap();
        assert_eq!(frames.len(), 1);
        assert_ne!(frames[0], 0, "as root, pagemap shows the frame");
    }
    assert_eq!(file.stats().allocated_pages, 2);
    assert_eq!(file.stats().locked_pages, 0);
    file.set_len(0).unwrap();
    let seen = owner.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (file.id(), PageRange::new(PageIndex(0x1), PageIndex(0x2))),
            (file.id(), PageRange::new(PageIndex(0x100), PageIndex(0x101))),
        ]
    );
    let stats = file.stats();
    assert_eq!((stats.invalidations, stats.invalidated_pages, stats.allocated_pages), (2, 2, 0));
    drop(binding);
    assert!(!file.is_bound());
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

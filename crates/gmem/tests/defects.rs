//! Defects found by trying the core as a hostile caller would; each test
//! failed before its fix.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{errno, guest_file, Recorder};
use gmem::{
    Errno, Fallocate, FileId, FileOffset, GuestOwner, PageIndex, PageRange, PrivateMemFile,
};

/// A page guard dropped on another thread unlocks its pages: a later punch
/// does not block forever.
#[test]
fn a_guard_dropped_on_another_thread_unlocks() {
    let file = guest_file(1 << 20);
    let owner = Arc::new(Recorder::default());
    let binding = Arc::new(file.bind(&owner).unwrap());
    std::thread::scope(|scope| {
        let guard = binding.get_and_lock(PageIndex(3)).unwrap();
        scope.spawn(move || drop(guard)).join().unwrap();
    });
    let (done, finished) = std::sync::mpsc::channel();
    let puncher = file.clone();
    std::thread::spawn(move || {
        let _ = done.send(puncher.fallocate(Fallocate::PunchHole, FileOffset(0), 1 << 20));
    });
    let result = finished.recv_timeout(Duration::from_secs(20)).expect("the punch hung");
    assert_eq!(result, Ok(()));
    assert_eq!(file.stats().locked_pages, 0);
}

/// Host mapping accesses at offsets near `usize::MAX` are refused, not
/// wrapped around into memory outside the mapping.
#[test]
fn host_mapping_offsets_do_not_wrap() {
    let file = PrivateMemFile::new("plain").unwrap();
    file.set_len(8192).unwrap();
    let map = file.map(FileOffset(0), 8192, true).unwrap();
    let mut buf = [0u8; 16];
    for offset in [usize::MAX, usize::MAX - 8, 8192 - 15, 8193] {
        assert_eq!(map.read(offset, &mut buf).unwrap_err().errno(), Errno::INVAL, "{offset}");
        assert_eq!(map.write(offset, &buf).unwrap_err().errno(), Errno::INVAL, "{offset}");
    }
    map.write(8192 - 16, b"0123456789abcdef").unwrap();
    map.read(8192 - 16, &mut buf).unwrap();
    assert_eq!(&buf, b"0123456789abcdef");
}

struct Panicking;

impl GuestOwner for Panicking {
    fn invalidate_page_range(&self, _file: FileId, _pages: PageRange) {
        panic!("the owner's callback panics");
    }
}

/// An owner whose invalidation callback panics: the punch reports the
/// panic to its caller, and the pages are not left fenced off for ever.
#[test]
fn a_panicking_owner_callback_leaves_no_page_fenced() {
    let file = guest_file(1 << 20);
    let owner = Arc::new(Panicking);
    let binding = file.bind(&owner).unwrap();
    drop(binding.get_and_lock(PageIndex(1)).unwrap());
    let punch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        file.fallocate(Fallocate::PunchHole, FileOffset(0), 1 << 20)
    }));
    assert!(punch.is_err(), "the callback's panic reaches the caller");
    let (done, finished) = std::sync::mpsc::channel();
    let binding = Arc::new(binding);
    let locker = binding.clone();
    std::thread::spawn(move || {
        let _ = done.send(locker.get_and_lock(PageIndex(1)).map(|g| g.pages()));
    });
    let locked = finished.recv_timeout(Duration::from_secs(20)).expect("get-and-lock hung");
    assert_eq!(locked.unwrap(), PageRange::new(PageIndex(1), PageIndex(2)));
}

/// A page guard's `read` and `write` at an offset whose end overflows are
/// refused with EINVAL; the offset plus the length used to overflow (a
/// panic in debug builds).
#[test]
fn page_guard_offsets_whose_end_overflows_are_einval() {
    let file = guest_file(1 << 20);
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    let guard = binding.get_and_lock(PageIndex(1)).unwrap();
    for offset in [u64::MAX, u64::MAX - 10, u64::MAX - 4096 - 8, u64::MAX - (1 << 20)] {
        let err = guard.read(offset, &mut [0u8; 100]).unwrap_err();
        assert_eq!(err.errno(), Errno::INVAL, "read at {offset:#x}");
        let err = guard.write(offset, &[1u8; 100]).unwrap_err();
        assert_eq!(err.errno(), Errno::INVAL, "write at {offset:#x}");
    }
    assert_eq!(guard.read(4000, &mut [0u8; 96]), Ok(()));
    assert_eq!(guard.read(4000, &mut [0u8; 97]).unwrap_err().errno(), Errno::INVAL);
}

/// A bound file cannot shrink below a live owner window (a guest region
/// would lose its backing, and the guest's next access there would be a
/// plain MMIO exit instead of a fault error): `EBUSY`, nothing changed.
/// It may grow, and shrink again once the window is gone.
#[test]
fn shrinking_below_a_live_owner_window_is_ebusy() {
    let file = guest_file(1 << 20);
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    let window = binding.map_window(FileOffset(0x4000), 0x4000).unwrap();
    binding.get_and_lock(PageIndex(5)).map(drop).unwrap();
    assert_eq!(errno(file.set_len(0x4000)), Errno::BUSY);
    assert_eq!(errno(file.set_len(0)), Errno::BUSY);
    assert_eq!(file.size(), 1 << 20);
    assert_eq!(file.stats().allocated_pages, 1, "nothing was freed");
    file.set_len(0x8000).unwrap();
    file.set_len(2 << 20).unwrap();
    drop(window);
    file.set_len(0).unwrap();
    assert_eq!(file.stats().allocated_pages, 0);
}

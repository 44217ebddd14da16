//! Host file operations on real memfds: unsealed files behave like memfds,
//! ordinary seals are the kernel's, GUEST-sealed files refuse host access and
//! unaligned sizes, and nothing deadlocks on itself.

mod common;

use std::sync::{Arc, Mutex};

use common::{errno, guest_file, Recorder};
use gmem::{
    Errno, Fallocate, FileId, FileOffset, GuestOwner, PageIndex, PageRange, PrivateMemFile, Seals,
    PAGE_SIZE,
};

#[test]
fn unsealed_file_reads_writes_and_maps() {
    let file = PrivateMemFile::new("plain").unwrap();
    assert_eq!(file.write_at(b"hello", FileOffset(4090)).unwrap(), 5);
    assert_eq!(file.size(), 4095);
    let mut buf = [0u8; 5];
    assert_eq!(file.read_at(&mut buf, FileOffset(4090)).unwrap(), 5);
    assert_eq!(&buf, b"hello");

    file.set_len(2 * PAGE_SIZE).unwrap();
    let map = file.map(FileOffset(0), 2 * PAGE_SIZE as usize, true).unwrap();
    map.read(4090, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    map.write(PAGE_SIZE as usize, b"via map").unwrap();
    let mut back = [0u8; 7];
    file.read_at(&mut back, FileOffset(PAGE_SIZE)).unwrap();
    assert_eq!(&back, b"via map");

    file.fallocate(Fallocate::PunchHole, FileOffset(PAGE_SIZE), PAGE_SIZE).unwrap();
    map.read(PAGE_SIZE as usize, &mut back).unwrap();
    assert_eq!(back, [0; 7], "a punched page reads zero through the mapping");
    assert_eq!(file.size(), 2 * PAGE_SIZE, "punch keeps the size");

    file.fallocate(Fallocate::Allocate, FileOffset(0), 4 * PAGE_SIZE).unwrap();
    assert_eq!(file.size(), 4 * PAGE_SIZE);
    file.fallocate(Fallocate::AllocateKeepSize, FileOffset(0), 8 * PAGE_SIZE).unwrap();
    assert_eq!(file.size(), 4 * PAGE_SIZE);
    assert_eq!(file.stats().allocated_pages, 8);
    // Unaligned sizes are fine before sealing.
    file.set_len(100).unwrap();
}

#[test]
fn kernel_seals_are_honoured() {
    let file = PrivateMemFile::new("sealed").unwrap();
    file.write_at(b"data", FileOffset(0)).unwrap();
    file.add_seals(Seals::SHRINK | Seals::GROW).unwrap();
    assert_eq!(errno(file.set_len(0)), Errno::PERM);
    assert_eq!(errno(file.set_len(8192)), Errno::PERM);
    assert_eq!(errno(file.write_at(b"more", FileOffset(4))), Errno::PERM);

    let map = file.map(FileOffset(0), 4096, true).unwrap();
    // F_SEAL_WRITE with a writable mapping: the kernel says EBUSY.
    assert_eq!(errno(file.add_seals(Seals::WRITE)), Errno::BUSY);
    drop(map);
    file.add_seals(Seals::WRITE).unwrap();
    assert_eq!(errno(file.write_at(b"x", FileOffset(0))), Errno::PERM);
    assert_eq!(errno(file.map(FileOffset(0), 4096, true)), Errno::PERM);
    let _read_only = file.map(FileOffset(0), 4096, false).unwrap();

    file.add_seals(Seals::SEAL).unwrap();
    assert_eq!(file.seals().unwrap(), Seals::SEAL | Seals::SHRINK | Seals::GROW | Seals::WRITE);
    assert_eq!(errno(file.add_seals(Seals::GUEST)), Errno::PERM);
}

#[test]
fn guest_seal_rules() {
    let file = Arc::new(PrivateMemFile::new_guest("guest").unwrap());
    assert!(file.seals().unwrap().contains(Seals::GUEST));
    assert_eq!(errno(file.add_seals(Seals::from_bits_retain(1 << 30))), Errno::INVAL);
    // Re-adding is harmless.
    file.add_seals(Seals::GUEST).unwrap();
    assert_eq!(errno(file.set_len(100)), Errno::INVAL);
    assert_eq!(errno(file.set_len(PAGE_SIZE + 1)), Errno::INVAL);
    file.set_len(16 * PAGE_SIZE).unwrap();
    for (offset, len) in [(1, PAGE_SIZE), (0, 100), (PAGE_SIZE, PAGE_SIZE + 7)] {
        for mode in [Fallocate::Allocate, Fallocate::AllocateKeepSize, Fallocate::PunchHole] {
            assert_eq!(errno(file.fallocate(mode, FileOffset(offset), len)), Errno::INVAL);
        }
    }
    assert_eq!(errno(file.fallocate(Fallocate::Allocate, FileOffset(0), 0)), Errno::INVAL);
    assert_eq!(errno(file.write_at(b"x", FileOffset(0))), Errno::PERM);
    assert_eq!(errno(file.read_at(&mut [0], FileOffset(0))), Errno::PERM);
    assert_eq!(errno(file.map(FileOffset(0), 4096, false)), Errno::PERM);

    // As guest_memfd: no keep-size allocation past the end of a guest file.
    assert_eq!(
        errno(file.fallocate(
            Fallocate::AllocateKeepSize,
            FileOffset(8 * PAGE_SIZE),
            9 * PAGE_SIZE
        )),
        Errno::INVAL
    );
    // Allocation grows the file and locks the pages in; sizes stay aligned.
    file.fallocate(Fallocate::Allocate, FileOffset(0), 32 * PAGE_SIZE).unwrap();
    let stats = file.stats();
    assert_eq!((stats.size, stats.allocated_pages), (32 * PAGE_SIZE, 32));
    // Kernel seals still apply to a guest file, checked before alignment.
    file.add_seals(Seals::SHRINK).unwrap();
    assert_eq!(errno(file.set_len(100)), Errno::PERM);
    file.set_len(64 * PAGE_SIZE).unwrap();
}

#[test]
fn owner_window_rules() {
    let file = guest_file(16 * PAGE_SIZE);
    let binding = file.bind(&Arc::new(Recorder::default())).unwrap();
    assert_eq!(errno(binding.map_window(FileOffset(1), PAGE_SIZE)), Errno::INVAL);
    assert_eq!(errno(binding.map_window(FileOffset(0), 100)), Errno::INVAL);
    assert_eq!(errno(binding.map_window(FileOffset(0), 0)), Errno::INVAL);
    assert_eq!(errno(binding.map_window(FileOffset(0), 17 * PAGE_SIZE)), Errno::INVAL);
    assert_eq!(errno(binding.map_window(FileOffset(!4095), PAGE_SIZE)), Errno::INVAL);
    let window = binding.map_window(FileOffset(8 * PAGE_SIZE), 8 * PAGE_SIZE).unwrap();
    assert_eq!(
        (window.len(), window.file_offset()),
        (8 * PAGE_SIZE as usize, FileOffset(8 * PAGE_SIZE))
    );
    // An owner window is not a host mapping: the file can still be resized.
    file.set_len(32 * PAGE_SIZE).unwrap();
}

/// An owner may allocate pages through its own window only where that
/// window is locked in RAM and maps them; otherwise `EINVAL`, and no page is
/// locked.
#[test]
fn lock_range_to_fill_needs_a_locked_window_that_maps_the_pages() {
    let file = guest_file(16 * PAGE_SIZE);
    let binding = file.bind(&Arc::new(Recorder::default())).unwrap();
    let window = binding.map_window(FileOffset(8 * PAGE_SIZE), 8 * PAGE_SIZE).unwrap();
    let inside = PageRange::new(PageIndex(8), PageIndex(12));
    assert!(!window.is_locked_in_ram());
    assert_eq!(errno(binding.lock_range_to_fill(&window, inside)), Errno::INVAL);
    window.lock_in_ram().unwrap();
    assert!(window.is_locked_in_ram());
    for outside in [(7, 9), (15, 17), (0, 1)] {
        let pages = PageRange::new(PageIndex(outside.0), PageIndex(outside.1));
        assert_eq!(errno(binding.lock_range_to_fill(&window, pages)), Errno::INVAL, "{pages:?}");
    }
    let other = guest_file(16 * PAGE_SIZE);
    let other_binding = other.bind(&Arc::new(Recorder::default())).unwrap();
    assert_eq!(errno(other_binding.lock_range_to_fill(&window, inside)), Errno::INVAL);
    assert_eq!(file.stats().locked_pages, 0, "a refused lock locks nothing");

    let guard = binding.lock_range_to_fill(&window, inside).unwrap();
    assert_eq!(file.stats().locked_pages, 4);
    assert_eq!(file.stats().allocated_pages, 0, "the owner allocates, not gmem");
    // Page locks keep out punches as get-and-lock's do.
    assert_eq!(errno(binding.get_and_lock_range_or_again(inside)), Errno::DEADLK);
    assert_eq!(guard.frames().unwrap().len(), 4);
    assert_eq!(file.stats().allocated_pages, 4, "frames() gets the pages, as get-and-lock does");
    drop(guard);
    // The file cannot shrink under the window (it would cut its pages off).
    assert_eq!(errno(file.set_len(10 * PAGE_SIZE)), Errno::BUSY);
    drop(binding.lock_range_to_fill(&window, inside).unwrap());
}

/// A page guard held by the thread that truncates, or an invalidation
/// callback that re-enters the file, gets EDEADLK instead of hanging.
#[test]
fn self_deadlocks_are_refused() {
    let file = guest_file(16 * PAGE_SIZE);
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    let guard = binding.get_and_lock(PageIndex(3)).unwrap();
    assert_eq!(errno(file.set_len(0)), Errno::DEADLK);
    assert_eq!(
        errno(file.fallocate(Fallocate::PunchHole, FileOffset(0), 16 * PAGE_SIZE)),
        Errno::DEADLK
    );
    assert_eq!(errno(binding.get_and_lock(PageIndex(3))), Errno::DEADLK);
    // Pages outside the held one are fine.
    file.fallocate(Fallocate::PunchHole, FileOffset(4 * PAGE_SIZE), PAGE_SIZE).unwrap();
    drop(guard);
    file.set_len(0).unwrap();
    assert_eq!(file.stats().locked_pages, 0);
}

struct Reentrant {
    file: Mutex<Option<Arc<PrivateMemFile>>>,
    binding: Mutex<Option<gmem::Binding>>,
    results: Mutex<Vec<(&'static str, Result<(), Errno>)>>,
}

impl GuestOwner for Reentrant {
    fn invalidate_page_range(&self, _file: FileId, pages: PageRange) {
        let file = self.file.lock().unwrap().clone().unwrap();
        let binding = self.binding.lock().unwrap();
        let binding = binding.as_ref().unwrap();
        let mut results = self.results.lock().unwrap();
        results.push(("set_len", file.set_len(0).map_err(|e| e.errno())));
        results
            .push(("inside", binding.get_and_lock(pages.start).map(drop).map_err(|e| e.errno())));
        results
            .push(("outside", binding.get_and_lock(PageIndex(0)).map(drop).map_err(|e| e.errno())));
    }
}

#[test]
fn invalidation_callback_may_reenter_without_deadlock() {
    let file = guest_file(16 * PAGE_SIZE);
    let owner = Arc::new(Reentrant {
        file: Mutex::new(Some(file.clone())),
        binding: Mutex::new(None),
        results: Mutex::new(Vec::new()),
    });
    let binding = file.bind(&owner).unwrap();
    drop(binding.get_and_lock(PageIndex(8)).unwrap());
    *owner.binding.lock().unwrap() = Some(binding);
    file.fallocate(Fallocate::PunchHole, FileOffset(8 * PAGE_SIZE), PAGE_SIZE).unwrap();
    assert_eq!(
        *owner.results.lock().unwrap(),
        [("set_len", Err(Errno::DEADLK)), ("inside", Err(Errno::DEADLK)), ("outside", Ok(()))]
    );
    owner.binding.lock().unwrap().take();
}

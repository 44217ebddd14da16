//! Pages an owner allocates through its own locked window are locked in RAM
//! while the window maps them, and after it goes. Alone in its own test
//! binary: it reads the process's locked memory, which other tests change.

mod common;

use std::sync::Arc;

use common::{guest_file, Recorder};
use gmem::{FileOffset, PageIndex, PageRange, PAGE_SIZE};

/// `Locked:` of every mapping of a memfd named `name` (/proc/self/smaps:
/// proportional, so a page mapped twice counts half in each).
fn locked_bytes_of(name: &str) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut ours = false;
    let mut locked = 0;
    for line in smaps.lines() {
        if line.split_whitespace().next().is_some_and(|w| w.contains('-') && !w.ends_with(':')) {
            ours = line.contains(&format!("/memfd:{name}"));
        } else if let Some(kb) = line.strip_prefix("Locked:").filter(|_| ours) {
            locked += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024;
        }
    }
    locked
}

#[test]
fn pages_filled_through_a_locked_window_stay_locked_after_it() {
    const SIZE: u64 = 4 << 20;
    let file = guest_file(SIZE);
    let binding = file.bind(&Arc::new(Recorder::default())).unwrap();
    let window = binding.map_window(FileOffset(0), SIZE).unwrap();
    window.lock_in_ram().unwrap();
    let pages = PageRange::new(PageIndex(16), PageIndex(48));
    let guard = binding.lock_range_to_fill(&window, pages).unwrap();
    for page in 16..48 {
        let byte = window.as_ptr().wrapping_add((page * PAGE_SIZE) as usize);
        // SAFETY: the byte lies inside the window, a shared mapping of the
        // file that no Rust reference points into; the test is its owner.
        unsafe { byte.write_volatile(0x5a) };
    }
    drop(guard);
    assert_eq!(file.stats().allocated_pages, 32);
    assert_eq!(locked_bytes_of("test"), 32 * PAGE_SIZE, "locked by the window alone");

    // Another window on the file, unlocked, takes nothing with it.
    drop(binding.map_window(FileOffset(0), SIZE).unwrap());
    assert_eq!(locked_bytes_of("test"), 32 * PAGE_SIZE);
    // The locked window goes while the file stays: the frame window locks
    // its pages (before, they were locked by nothing).
    drop(window);
    assert_eq!(file.stats().allocated_pages, 32);
    assert_eq!(locked_bytes_of("test"), 32 * PAGE_SIZE, "locked in the frame window");
    let mut byte = [0];
    binding.get_and_lock(PageIndex(20)).unwrap().read(0, &mut byte).unwrap();
    assert_eq!(byte, [0x5a], "the pages kept their content");
}

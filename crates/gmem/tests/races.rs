//! Races with many threads: truncate and punch against get-and-lock, and the
//! GUEST seal against read and set-length. No deadlock, and no page is ever
//! served after its invalidation.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use common::guest_file;
use gmem::{
    Errno, Fallocate, FileId, FileOffset, GuestOwner, PageIndex, PageRange, PrivateMemFile, Seals,
    PAGE_SIZE,
};

const PAGES: u64 = 64;

/// Tracks, per page, a generation bumped by every invalidation. A guard
/// taken at generation g must not still be held when g is invalidated: each
/// holder writes its token into the page and checks it is still there (and
/// the generation unchanged) before unlocking.
#[derive(Default)]
struct Tracker {
    generation: Mutex<HashMap<u64, u64>>,
    callbacks: AtomicU64,
}

impl GuestOwner for Tracker {
    fn invalidate_page_range(&self, _file: FileId, pages: PageRange) {
        let mut generation = self.generation.lock().unwrap();
        for page in pages.start.0..pages.end.0 {
            *generation.entry(page).or_default() += 1;
        }
        self.callbacks.fetch_add(1, Ordering::Relaxed);
    }
}

impl Tracker {
    fn generation(&self, page: u64) -> u64 {
        *self.generation.lock().unwrap().get(&page).unwrap_or(&0)
    }
}

fn hammer(remove: impl Fn(&PrivateMemFile, u64) + Send + Sync + 'static) {
    let file = guest_file(PAGES * PAGE_SIZE);
    let owner = Arc::new(Tracker::default());
    let binding = Arc::new(file.bind(&owner).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4u64)
        .map(|worker| {
            let (binding, owner, stop, served) =
                (binding.clone(), owner.clone(), stop.clone(), served.clone());
            thread::spawn(move || {
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let page = (i >> 33) % PAGES;
                    let guard = match binding.get_and_lock(PageIndex(page)) {
                        Ok(guard) => guard,
                        Err(e) => {
                            assert_eq!(e.errno(), Errno::INVAL, "only past-EOF may fail");
                            continue;
                        }
                    };
                    let before = owner.generation(page);
                    let token = (worker << 48) | (i & 0xffff_ffff_ffff);
                    guard.write(8, &token.to_le_bytes()).unwrap();
                    thread::yield_now();
                    let mut back = [0u8; 8];
                    guard.read(8, &mut back).unwrap();
                    assert_eq!(u64::from_le_bytes(back), token, "page changed under its lock");
                    assert_eq!(owner.generation(page), before, "page invalidated while locked");
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let the workers get going first: on a loaded machine 300 removals can
    // finish before a new thread takes its first page.
    while served.load(Ordering::Relaxed) < 4 {
        thread::yield_now();
    }
    for round in 0..300 {
        remove(&file, round);
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    assert!(served.load(Ordering::Relaxed) > 0);
    assert!(owner.callbacks.load(Ordering::Relaxed) > 0, "some invalidation reached the owner");
    assert_eq!(file.stats().locked_pages, 0);
}

#[test]
fn punch_against_get_and_lock() {
    hammer(|file, round| {
        let start = (round * 7) % PAGES;
        let len = 1 + round % (PAGES - start);
        file.fallocate(Fallocate::PunchHole, FileOffset(start * PAGE_SIZE), len * PAGE_SIZE)
            .unwrap();
    });
}

#[test]
fn truncate_against_get_and_lock() {
    hammer(|file, round| {
        let size = (round * 13) % (PAGES + 1);
        file.set_len(size * PAGE_SIZE).unwrap();
        thread::yield_now();
        file.set_len(PAGES * PAGE_SIZE).unwrap();
    });
}

/// A page that was punched reads zero to the next holder: content never
/// survives its invalidation.
#[test]
fn punched_content_never_comes_back() {
    let file = guest_file(PAGES * PAGE_SIZE);
    let owner = Arc::new(Tracker::default());
    let binding = Arc::new(file.bind(&owner).unwrap());
    let barrier = Arc::new(Barrier::new(2));
    let puncher = {
        let (file, barrier) = (file.clone(), barrier.clone());
        thread::spawn(move || {
            for _ in 0..200 {
                barrier.wait();
                file.fallocate(Fallocate::PunchHole, FileOffset(0), PAGES * PAGE_SIZE).unwrap();
                barrier.wait();
            }
        })
    };
    for _ in 0..200 {
        barrier.wait();
        // Racing the punch: write a marker into every page, noting the
        // page's invalidation generation while it is locked.
        let written: Vec<u64> = (0..PAGES)
            .map(|page| {
                let guard = binding.get_and_lock(PageIndex(page)).unwrap();
                guard.write(0, b"marker").unwrap();
                owner.generation(page)
            })
            .collect();
        barrier.wait();
        for (page, generation) in (0..PAGES).zip(written) {
            let guard = binding.get_and_lock(PageIndex(page)).unwrap();
            let mut buf = [0u8; 6];
            guard.read(0, &mut buf).unwrap();
            if owner.generation(page) > generation {
                assert_eq!(buf, [0; 6], "page {page}: content survived its invalidation");
            } else {
                assert_eq!(&buf, b"marker", "page {page}: lost without an invalidation");
            }
            guard.write(0, &[0; 6]).unwrap();
        }
    }
    puncher.join().unwrap();
}

/// The thread's ordering question: the GUEST seal racing reads, writes and
/// set-length. Every read/write either happens entirely before the seal
/// (and then the seal sees a non-empty file and fails with EBUSY, or the
/// file was emptied) or fails with EPERM; nothing written before the seal
/// is readable after it.
#[test]
fn guest_seal_against_read_and_set_len() {
    for _ in 0..200 {
        let file = Arc::new(PrivateMemFile::new("race").unwrap());
        let barrier = Arc::new(Barrier::new(3));
        let writer = {
            let (file, barrier) = (file.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let grew = file.set_len(PAGE_SIZE);
                let wrote = file.write_at(b"secret", FileOffset(0));
                (grew.map_err(|e| e.errno()), wrote.map_err(|e| e.errno()))
            })
        };
        let reader = {
            let (file, barrier) = (file.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let mut buf = [0u8; 6];
                file.read_at(&mut buf, FileOffset(0))
                    .map(|n| buf[..n].to_vec())
                    .map_err(|e| e.errno())
            })
        };
        barrier.wait();
        let sealed = file.add_seals(Seals::GUEST).map_err(|e| e.errno());
        let (grew, wrote) = writer.join().unwrap();
        let read = reader.join().unwrap();
        match sealed {
            Ok(()) => {
                // Sealed at size 0: the writer's set_len came after (aligned,
                // fine) and its write was refused; the reader saw nothing.
                assert_eq!(grew, Ok(()));
                assert_eq!(wrote, Err(Errno::PERM));
                assert!(matches!(read, Err(Errno::PERM)) || read == Ok(vec![]), "{read:?}");
            }
            Err(errno) => {
                assert_eq!(errno, Errno::BUSY);
                assert_eq!(grew, Ok(()));
                assert_eq!(wrote, Ok(6));
            }
        }
        if file.is_guest() {
            assert_eq!(file.read_at(&mut [0; 6], FileOffset(0)).unwrap_err().errno(), Errno::PERM);
        }
    }
}

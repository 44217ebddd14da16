//! Files on 2 MiB pages: a tmpfs of the test's own (mounted with
//! `huge=always` in a temporary directory; no host-wide setting changes),
//! 4 KiB punches that split one huge page only, collapse, and the refusals.

mod common;

use std::sync::Arc;

use common::{errno, Recorder};
use gmem::{
    Errno, Fallocate, FileOffset, HugePages, PageIndex, PageKind, PageRange, PrivateMemFile, Seals,
    TmpfsMount, HUGE_PAGE_SIZE, PAGE_SIZE,
};

/// A huge-page tmpfs, or `None` (said loudly) where this process may not
/// mount one; under `GMEM_REQUIRE_KVM=1` (CI, as root) that fails.
fn huge_tmpfs() -> Option<TmpfsMount> {
    match TmpfsMount::huge(64 << 20) {
        Ok(mount) => Some(mount),
        Err(e) if std::env::var("GMEM_REQUIRE_KVM").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: mounting a tmpfs needs root ({e})");
            None
        }
        Err(e) => panic!("cannot mount a huge-page tmpfs: {e}"),
    }
}

const SMALL_PAGES: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;

#[test]
fn a_4k_punch_splits_one_huge_page_and_collapse_makes_it_huge_again() {
    let Some(mount) = huge_tmpfs() else { return };
    let file = Arc::new(PrivateMemFile::new_guest_huge("huge", &mount.huge_pages()).unwrap());
    assert_eq!(file.page_kind(), PageKind::TransparentHuge);
    // Sizes in whole 2 MiB pages.
    assert_eq!(errno(file.set_len(3 << 20)), Errno::INVAL);
    file.set_len(8 << 20).unwrap();
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    assert_eq!(errno(binding.map_window(FileOffset(PAGE_SIZE), 4 << 20)), Errno::INVAL);
    let window = binding.map_window(FileOffset(2 << 20), 4 << 20).unwrap();
    assert_eq!(window.as_ptr() as u64 % HUGE_PAGE_SIZE, 0, "the window is 2 MiB-aligned");
    // Two huge pages, every small page marked.
    let pages = PageRange::new(PageIndex(SMALL_PAGES), PageIndex(3 * SMALL_PAGES));
    for page in pages.start.0..pages.end.0 {
        binding.get_and_lock(PageIndex(page)).unwrap().write(0, &page.to_le_bytes()).unwrap();
    }
    assert_eq!(file.stats().allocated_pages, 2 * SMALL_PAGES);
    // The window faults them in by PMD.
    let touch = |offset: u64| {
        // SAFETY: inside the owner's live window; a volatile read of a page
        // the file holds.
        let at = window.as_ptr().wrapping_add(offset as usize) as *const u64;
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(at) }
    };
    assert_eq!(touch(0), SMALL_PAGES);
    assert_eq!(touch(HUGE_PAGE_SIZE), 2 * SMALL_PAGES);
    assert_eq!(window.huge_mapped_bytes().unwrap(), 4 << 20);

    // A 4 KiB punch frees exactly that page; its huge page is split, the
    // other stays huge, and every other page keeps its content.
    let punched = SMALL_PAGES + 5;
    file.fallocate(Fallocate::PunchHole, PageIndex(punched).offset(), PAGE_SIZE).unwrap();
    assert_eq!(file.stats().allocated_pages, 2 * SMALL_PAGES - 1);
    assert_eq!(window.huge_mapped_bytes().unwrap(), 2 << 20);
    for page in pages.start.0..pages.end.0 {
        let offset = (page - SMALL_PAGES) * PAGE_SIZE;
        assert_eq!(touch(offset), if page == punched { 0 } else { page }, "page {page}");
    }
    // A shared mapping's read of a hole allocates it: one small page, not
    // a new huge one over the split range.
    assert_eq!(file.stats().allocated_pages, 2 * SMALL_PAGES);
    assert_eq!(window.huge_mapped_bytes().unwrap(), 2 << 20);

    // Collapse: the hole is filled with zeros, the range is huge again.
    let first = PageRange::new(PageIndex(SMALL_PAGES), PageIndex(2 * SMALL_PAGES));
    binding.collapse(&window, first).unwrap();
    assert_eq!(file.stats().allocated_pages, 2 * SMALL_PAGES);
    assert_eq!(touch(5 * PAGE_SIZE), 0);
    assert_eq!(touch(6 * PAGE_SIZE), SMALL_PAGES + 6);
    let _ = touch(0);
    assert_eq!(window.huge_mapped_bytes().unwrap(), 4 << 20);

    // Collapse takes whole huge pages of the window only.
    let half = PageRange::new(PageIndex(SMALL_PAGES), PageIndex(SMALL_PAGES + 256));
    assert_eq!(errno(binding.collapse(&window, half)), Errno::INVAL);
    let outside = PageRange::new(PageIndex(0), PageIndex(SMALL_PAGES));
    assert_eq!(errno(binding.collapse(&window, outside)), Errno::INVAL);
}

#[test]
fn a_tmpfs_file_is_sealed_by_gmem_alone() {
    let Some(mount) = huge_tmpfs() else { return };
    let file = PrivateMemFile::new_guest_huge("huge", &mount.huge_pages()).unwrap();
    assert_eq!(file.seals().unwrap(), Seals::GUEST);
    // No kernel seals on a tmpfs file: EPERM, as the kernel answers.
    assert_eq!(errno(file.add_seals(Seals::SHRINK)), Errno::PERM);
    file.set_len(2 << 20).unwrap();
    assert_eq!(errno(file.read_at(&mut [0; 8], FileOffset(0))), Errno::PERM);
    assert_eq!(errno(file.map(FileOffset(0), 4096, false)), Errno::PERM);
}

#[test]
fn directories_without_huge_pages_are_refused() {
    // Not a tmpfs.
    let err = PrivateMemFile::new_huge("x", &HugePages::Tmpfs("/proc".into())).unwrap_err();
    assert_eq!(err.errno(), Errno::INVAL, "{err}");
    assert!(err.to_string().contains("not on a tmpfs"), "{err}");
    let missing = HugePages::Tmpfs("/nonexistent/gmem".into());
    assert_eq!(errno(PrivateMemFile::new_huge("x", &missing)), Errno::INVAL);
    // A tmpfs mounted without huge pages.
    let Ok(plain) = TmpfsMount::new(4 << 20, "huge=never") else {
        return eprintln!("SKIPPED: mounting a tmpfs needs root");
    };
    let err = PrivateMemFile::new_huge("x", &plain.huge_pages()).unwrap_err();
    assert_eq!(err.errno(), Errno::INVAL, "{err}");
    assert!(err.to_string().contains("huge=never"), "{err}");
}

/// hugetlbfs pages come from the host's pool: where it has none free (this
/// project's machines reserve none, and tests never change that), a size
/// is refused with `ENOMEM` and the file keeps its old size.
#[test]
fn hugetlbfs_files_need_free_pages_and_whole_huge_pages() {
    let file = match PrivateMemFile::new_guest_huge("tlb", &HugePages::HugeTlb) {
        Ok(file) => file,
        Err(e) => {
            assert_eq!(e.errno(), Errno::INVAL, "{e}");
            return eprintln!("SKIPPED: no hugetlbfs here: {e}");
        }
    };
    assert_eq!(file.page_kind(), PageKind::HugeTlb);
    assert_eq!(errno(file.set_len(PAGE_SIZE)), Errno::INVAL);
    match HugePages::HugeTlb.offered() {
        Err(why) => {
            let err = file.set_len(2 << 20).unwrap_err();
            assert_eq!(err.errno(), Errno::NOMEM, "{err} ({why})");
            assert_eq!(file.size(), 0);
        }
        Ok(_) => {
            file.set_len(2 << 20).unwrap();
            // Never split: 4 KiB punches are refused.
            let punch = file.fallocate(Fallocate::PunchHole, FileOffset(0), PAGE_SIZE);
            assert_eq!(errno(punch), Errno::INVAL);
        }
    }
}

#[test]
fn memfd_huge_pages_follow_the_hosts_shmem_setting() {
    let result = PrivateMemFile::new_huge("memfd", &HugePages::Memfd);
    match HugePages::Memfd.offered() {
        Ok(_) => assert_eq!(result.unwrap().page_kind(), PageKind::TransparentHuge),
        Err(why) => assert_eq!(errno(result), Errno::INVAL, "{why}"),
    }
}

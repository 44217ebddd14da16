//! Guests on 2 MiB pages (a tmpfs of the test's own, mounted with
//! `huge=always` in a temporary directory; no host-wide setting changes):
//! KVM maps them huge, a 4 KiB conversion splits only its 2 MiB page and
//! discards only its 4 KiB, nothing is backed twice, and split pages are
//! made huge again.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{config, console, kvm, launch, RAM};
use gmem::{Errno, FileOffset, HugePages, PrivateMemFile, TmpfsMount, HUGE_PAGE_SIZE, PAGE_SIZE};
use gmem_guest::huge_layout::{BASE, CONVERTED_OFFSET, PRIVATE_AGAIN, SHARED, TOUCHED};
use gmem_kvm::PageState;
use gmem_runner::{Gpa, Outcome, Vm};
use vm_memory::Bytes;

/// A huge-page tmpfs for one test; KVM tests need root, which mounting
/// needs too: a failure here fails the test.
fn huge_tmpfs() -> TmpfsMount {
    TmpfsMount::huge(4 * RAM).expect("mount a huge-page tmpfs (root)")
}

/// How many 2 MiB ranges the `hugeconv` guest touches and converts in.
/// (One vCPU, RAM below 3 GiB: its stacks end RAM.)
fn converted_ranges() -> u64 {
    let stacks = RAM - gmem_runner::boot::STACK_SIZE;
    (stacks / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE - BASE) / HUGE_PAGE_SIZE
}

/// A VM whose RAM is on `mount`'s huge pages, after the `touch` guest
/// touched all of it.
fn touched_on(mount: &TmpfsMount) -> Vm {
    let vm = Vm::new().unwrap();
    vm.add_ram_on(RAM, Some(&mount.huge_pages())).unwrap();
    let report = launch(&vm, "touch", RAM, &config(1), || {}, &|_, _| {});
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    vm
}

/// Waits (at most 10 s) until `done` holds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_guest_on_huge_pages_splits_only_what_it_converts_and_is_made_huge_again() {
    if !kvm() {
        return;
    }
    let mount = huge_tmpfs();
    let vm = Vm::new().unwrap();
    vm.add_ram_on(RAM, Some(&mount.huge_pages())).unwrap();
    let ranges = converted_ranges();
    let memory = vm.memory().clone();
    let seen = Mutex::new(Vec::new());
    let report = launch(&vm, "hugeconv", RAM, &config(1), || {}, &|vm, stage| {
        let stats = memory.stats();
        let huge = memory.huge_mapped_bytes().unwrap();
        seen.lock().unwrap().push((stage, stats.allocated_pages, huge));
        // (Released at once: the stages below read it.)
        match stage {
            TOUCHED => {
                // Everything touched is mapped by 2 MiB entries, in the
                // window and in KVM's MMU.
                assert!(huge >= ranges * HUGE_PAGE_SIZE, "{huge:#x} for {ranges} ranges");
                let kvm = vm.kvm_statistics().unwrap();
                let pages_2m = kvm.get("pages_2m").expect("KVM reports pages_2m");
                assert!(pages_2m >= ranges, "KVM maps {pages_2m} 2 MiB pages for {ranges}");
            }
            SHARED => {
                // The converted pages are shared and read zero; the host's
                // read maps them (allocating them) after the counts above.
                for range in 0..ranges {
                    let gpa = Gpa(BASE + range * HUGE_PAGE_SIZE + CONVERTED_OFFSET);
                    assert_eq!(memory.page_state(gpa), Some(PageState::Shared));
                    let mut word = [0xffu8; 8];
                    memory.read(gpa, &mut word).unwrap();
                    assert_eq!(word, [0; 8], "{gpa}");
                    // Its private neighbour is still refused.
                    let neighbour = Gpa(gpa.0 + PAGE_SIZE);
                    assert_eq!(memory.read(neighbour, &mut word).unwrap_err().errno(), Errno::PERM);
                }
            }
            PRIVATE_AGAIN => {
                // Made huge again in the background, every range.
                let before = seen.lock().unwrap()[0].2;
                wait_until("the background collapse", || {
                    memory.stats().collapses == ranges
                        && memory.huge_mapped_bytes().unwrap() >= before
                });
            }
            other => panic!("unexpected stage {other}"),
        }
    });
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    let seen = seen.into_inner().unwrap();
    let [(_, touched, huge_touched), (_, split, huge_split), (_, _, _)] = seen[..] else {
        panic!("stages {seen:?}");
    };
    // Each conversion discarded exactly 4 KiB: the other 511 pages of its
    // 2 MiB page stayed allocated (the guest found their markers), and no
    // page is held twice.
    assert_eq!(split, touched - ranges, "{seen:?}");
    assert!(huge_split + ranges * HUGE_PAGE_SIZE <= huge_touched, "{seen:?}");
    // The guest's final reads ran on 2 MiB mappings again.
    let pages_2m = vm.kvm_statistics().unwrap().get("pages_2m").unwrap();
    assert!(pages_2m >= ranges, "{pages_2m} 2 MiB mappings for {ranges} ranges");
    assert!(console(&report).contains(&format!("converted={ranges}")), "{}", console(&report));
}

/// The VMM asks: a mixed range stays split, a uniform shared one is made
/// huge and the host reads it through a fresh view; bad requests get
/// `EINVAL`.
#[test]
fn the_vmm_collapses_uniform_ranges_on_request() {
    if !kvm() {
        return;
    }
    let mount = huge_tmpfs();
    let vm = touched_on(&mount);
    let memory = vm.memory();
    let range = Gpa(8 << 20);
    let full = memory.huge_mapped_bytes().unwrap();
    memory.convert(Gpa(range.0 + PAGE_SIZE), PAGE_SIZE, PageState::Shared).unwrap();
    memory.write(Gpa(range.0 + PAGE_SIZE), b"shared").unwrap();
    assert_eq!(memory.huge_mapped_bytes().unwrap(), full - HUGE_PAGE_SIZE);
    assert_eq!(memory.collapse(range, HUGE_PAGE_SIZE).unwrap(), 0, "mixed: left split");
    // All shared: collapsed, and the host's view is made anew.
    memory.convert(range, PAGE_SIZE, PageState::Shared).unwrap();
    memory
        .convert(Gpa(range.0 + 2 * PAGE_SIZE), HUGE_PAGE_SIZE - 2 * PAGE_SIZE, PageState::Shared)
        .unwrap();
    assert_eq!(memory.collapse(range, HUGE_PAGE_SIZE).unwrap(), 1);
    assert_eq!(memory.huge_mapped_bytes().unwrap(), full);
    let mut back = [0u8; 6];
    memory.read(Gpa(range.0 + PAGE_SIZE), &mut back).unwrap();
    assert_eq!(&back, b"shared");
    // Refusals.
    for (gpa, len) in [(range.0 + PAGE_SIZE, HUGE_PAGE_SIZE), (range.0, PAGE_SIZE), (range.0, 0)] {
        assert_eq!(memory.collapse(Gpa(gpa), len).unwrap_err().errno(), Errno::INVAL);
    }
    assert_eq!(memory.collapse(Gpa(RAM), HUGE_PAGE_SIZE).unwrap_err().errno(), Errno::INVAL);
    let small = Vm::with_ram(RAM).unwrap().0;
    let refused = small.memory().collapse(range, HUGE_PAGE_SIZE).unwrap_err();
    assert_eq!(refused.errno(), Errno::INVAL, "{refused}");
}

/// Regions on huge pages take whole 2 MiB pages; regions on hugetlbfs
/// are not offered yet (`EOPNOTSUPP`, never a 2 MiB discard for 4 KiB).
#[test]
fn regions_on_huge_pages_take_whole_huge_pages() {
    if !kvm() {
        return;
    }
    let mount = huge_tmpfs();
    let vm = Vm::new().unwrap();
    let file =
        std::sync::Arc::new(PrivateMemFile::new_guest_huge("r", &mount.huge_pages()).unwrap());
    file.set_len(8 << 20).unwrap();
    let refused = |gpa: u64, offset: u64, size: u64| {
        vm.add_private_memory(Gpa(gpa), &file, FileOffset(offset), size).unwrap_err().errno()
    };
    assert_eq!(refused(1 << 20, 0, 2 << 20), Errno::INVAL, "GPA");
    assert_eq!(refused(0, PAGE_SIZE, 2 << 20), Errno::INVAL, "offset");
    assert_eq!(refused(0, 0, 3 << 20), Errno::INVAL, "size");
    // Nothing half-built: the whole file is still free to use.
    vm.add_private_memory(Gpa(0), &file, FileOffset(0), 8 << 20).unwrap();
    assert_eq!(vm.memory().regions().len(), 1);
    if let Ok(tlb) = PrivateMemFile::new_guest_huge("tlb", &HugePages::HugeTlb) {
        if tlb.set_len(2 << 20).is_ok() {
            let tlb = std::sync::Arc::new(tlb);
            let err =
                vm.add_private_memory(Gpa(16 << 20), &tlb, FileOffset(0), 2 << 20).unwrap_err();
            assert_eq!(err.errno(), Errno::OPNOTSUPP, "{err}");
        }
    }
}

/// The kernel collapses split 2 MiB pages behind gmem's back (khugepaged
/// roams every huge-page mapping; here `MADV_COLLAPSE` on KVM's window
/// does what it does), which removes the host's view of shared pages in
/// the range. The host still reads and writes them. (It died of SIGBUS
/// before: the view only ever held what gmem had put there.)
#[test]
fn a_collapse_by_the_kernel_leaves_shared_pages_readable() {
    if !kvm() {
        return;
    }
    let mount = huge_tmpfs();
    let vm = touched_on(&mount);
    let memory = vm.memory();
    let page = Gpa((8 << 20) + PAGE_SIZE);
    memory.convert(page, PAGE_SIZE, PageState::Shared).unwrap();
    memory.write(page, b"shared").unwrap();
    let region = memory.region_of(page).unwrap();
    let range = region.userspace_addr() + (8 << 20) - region.gpa().0;
    // SAFETY: advice on KVM's window of a live region: MADV_COLLAPSE keeps
    // the content, as khugepaged's collapse does.
    let rc = unsafe { libc::madvise(range as *mut libc::c_void, HUGE_PAGE_SIZE as usize, 25) };
    assert_eq!(rc, 0, "MADV_COLLAPSE: {}", std::io::Error::last_os_error());
    let mut back = [0u8; 6];
    memory.read(page, &mut back).unwrap();
    assert_eq!(&back, b"shared");
    memory.write(page, b"again!").unwrap();
    memory.shared().read_slice(&mut back, page.into()).unwrap();
    assert_eq!(&back, b"again!");
    // Its private neighbour is still refused.
    let neighbour = Gpa(page.0 + PAGE_SIZE);
    assert_eq!(memory.read(neighbour, &mut back).unwrap_err().errno(), Errno::PERM);
}

/// Under `MemlockPolicy::FilesOnly` a region on huge pages still locks
/// KVM's window, where the kernel allocates its pages: they never reach
/// swap. (It was left unlocked before: pages locked by no mapping.)
#[test]
fn huge_pages_are_locked_in_ram_whatever_the_policy() {
    if !kvm() {
        return;
    }
    let mount = huge_tmpfs();
    let vm = Vm::new().unwrap();
    vm.memory().set_memlock_policy(gmem_kvm::MemlockPolicy::FilesOnly);
    vm.add_ram_on(RAM, Some(&mount.huge_pages())).unwrap();
    let report = launch(&vm, "touch", RAM, &config(1), || {}, &|_, _| {});
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    for region in vm.memory().regions().iter() {
        let entry = common::smaps_entry(region.userspace_addr());
        let flags = entry.iter().find(|l| l.starts_with("VmFlags")).unwrap();
        assert!(flags.contains(" lf"), "KVM's window is not locked: {flags}");
        let locked = entry.iter().find(|l| l.starts_with("Locked:")).unwrap();
        let kib: u64 = locked.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(kib >= (RAM - (8 << 20)) >> 10, "{locked}");
    }
}

//! A hostile guest and a careless VMM: each test failed before its fix.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{config, console, kvm, RAM};
use gmem::{FileOffset, PrivateMemFile};
use gmem_kvm::{Errno, PageState, PrivateMemory, RegionSpec, DEFAULT_FAULT_AROUND_PAGES};
use gmem_runner::{Gpa, GuestImage, Outcome, RunConfig, Vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const STORM_BASE: u64 = 0x60_0000;
const HOST: u64 = 0x4848_4848_4848_4848;

/// A conversion storm on 4 vCPUs while host threads read (both APIs),
/// write and punch the same pages: the host never faults (SIGBUS would kill
/// this test), never sees a marker the guest wrote while a page was private,
/// and every converted page reads zero (or the host's bytes) to the guest.
#[test]
fn a_conversion_storm_never_crashes_or_leaks_to_the_host() {
    if !kvm() {
        return;
    }
    let (vm, _file) = Vm::with_ram(RAM).unwrap();
    let image = GuestImage::parse(gmem_guest::guest("convstorm").unwrap(), RAM).unwrap();
    vm.load(&image, RAM, 4).unwrap();
    let done = AtomicBool::new(false);
    let (reads, denials, leaks) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let check = |value: u64| {
        // Markers of even rounds were written while the page was private.
        if (0x5ec0_0000..0x5ec0_0000 + 300).contains(&value) && value % 2 == 0 {
            leaks.fetch_add(1, Ordering::Relaxed);
        }
    };
    let report = std::thread::scope(|scope| {
        let vm = &vm;
        for reader in 0..2u64 {
            let (done, reads, denials, check) = (&done, &reads, &denials, &check);
            scope.spawn(move || {
                let mut i = reader;
                while !done.load(Ordering::Relaxed) {
                    let gpa = STORM_BASE + (i % 4) * 4096 + (i % 512) * 8;
                    let result = if i % 2 == 0 {
                        vm.shared_memory().read_obj::<u64>(GuestAddress(gpa)).map_err(|_| ())
                    } else {
                        let mut buf = [0; 8];
                        vm.read_guest(Gpa(gpa), &mut buf).map(|()| u64::from_le_bytes(buf)).map_err(
                            |e| {
                                assert!(matches!(e.errno(), Errno::PERM | Errno::AGAIN), "{e}");
                            },
                        )
                    };
                    match result {
                        Ok(value) => {
                            check(value);
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(()) => {
                            denials.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 2;
                }
            });
        }
        let done_ref = &done;
        scope.spawn(move || {
            let mut i = 0u64;
            while !done_ref.load(Ordering::Relaxed) {
                let page = STORM_BASE + (i % 4) * 4096;
                let _ = vm.write_guest(Gpa(page + (i % 512) * 8), &HOST.to_le_bytes());
                if i % 64 == 0 {
                    vm.punch(Gpa(page), 4096).unwrap();
                }
                i += 1;
            }
        });
        let report = vm.run(&image, RAM, &config(4), &|_, _| {}).unwrap();
        done.store(true, Ordering::Relaxed);
        report
    });
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    assert_eq!(leaks.load(Ordering::Relaxed), 0, "the host saw private content");
    assert!(reads.load(Ordering::Relaxed) + denials.load(Ordering::Relaxed) > 0);
    assert_eq!(vm.stats().memory.conversions, 4 * 300);
}

/// Shrinking a file under a live region is refused (`EBUSY`, issue 19
/// defect 7): before, it succeeded, and the guest's accesses past the new
/// end were plain MMIO exits or an EFAULT with no fault error for the VMM.
/// The guest touches every page of both files and finishes.
#[test]
fn a_file_under_a_live_region_cannot_shrink() {
    if !kvm() {
        return;
    }
    let vm = Vm::new().unwrap();
    let low = Arc::new(PrivateMemFile::new_guest("low").unwrap());
    low.set_len(32 << 20).unwrap();
    let high = Arc::new(PrivateMemFile::new_guest("high").unwrap());
    high.set_len(32 << 20).unwrap();
    vm.add_private_memory(Gpa(0), &low, FileOffset(0), 32 << 20).unwrap();
    vm.add_private_memory(Gpa(32 << 20), &high, FileOffset(0), 32 << 20).unwrap();
    let image = GuestImage::parse(gmem_guest::guest("touch").unwrap(), RAM).unwrap();
    vm.load(&image, RAM, 1).unwrap();
    assert_eq!(low.set_len(31 << 20).unwrap_err().errno(), Errno::BUSY);
    assert_eq!(low.size(), 32 << 20);
    let config = RunConfig { timeout: Some(Duration::from_secs(20)), ..RunConfig::new(1) };
    let report = vm.run(&image, RAM, &config, &|_, _| {}).unwrap();
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    let stats = vm.stats().memory;
    assert_eq!(stats.fenced_pages, 0, "{stats:?}");
    // Every page it touched is there, whoever served it (gmem, or the
    // kernel where the faults looked scattered on a busy machine).
    assert!(stats.allocated_pages >= (RAM - (4 << 20)) / 4096, "{stats:?}");
}

/// A panic in a sync handler stops the VM with an error; `run` returns.
#[test]
fn a_panicking_sync_handler_stops_the_vm() {
    if !kvm() {
        return;
    }
    let (vm, _file) = Vm::with_ram(RAM).unwrap();
    let report = common::run(&vm, "demo", 1, &|_, _| panic!("the handler fails"));
    match report.outcome {
        Outcome::Error(message) => assert!(message.contains("the handler fails"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A region KVM refuses leaves nothing behind, and two concurrent adds of
/// overlapping regions cannot both succeed.
#[test]
fn a_region_kvm_refuses_leaves_nothing() {
    if !kvm() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let memory = PrivateMemory::new(DEFAULT_FAULT_AROUND_PAGES).unwrap();
    let file = Arc::new(PrivateMemFile::new_guest("refused").unwrap());
    file.set_len(4 << 20).unwrap();
    let spec = |slot, gpa, offset| RegionSpec {
        slot,
        gpa: Gpa(gpa),
        file: file.clone(),
        file_offset: FileOffset(offset),
        size: 2 << 20,
    };
    let refused = memory.add_region(&vm, spec(0, 1 << 60, 0));
    assert_eq!(refused.unwrap_err().errno(), Errno::INVAL);
    assert!(memory.regions().is_empty());
    assert_eq!(
        memory.convert(Gpa(1 << 60), 4096, PageState::Shared).unwrap_err().errno(),
        Errno::INVAL
    );
    assert_eq!(memory.write(Gpa(1 << 60), b"x").unwrap_err().errno(), Errno::INVAL);
    assert_eq!(memory.shared().num_regions(), 0);
    // The same file range is free again.
    let results: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8u32)
            .map(|i| {
                let (memory, vm, spec) = (&memory, &vm, spec(i + 1, 8 << 20, 0));
                scope.spawn(move || memory.add_region(vm, spec).map(|_| ()))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert_eq!(memory.regions().len(), 1);
    // One memory serves one VM.
    let other = Arc::new(kvm.create_vm().unwrap());
    let refused = memory.add_region(&other, spec(20, 32 << 20, 2 << 20));
    assert_eq!(refused.unwrap_err().errno(), Errno::INVAL);
}

/// A zero-length slice at the very end of a region is empty, not a panic.
#[test]
fn an_empty_slice_at_the_end_of_a_region() {
    if !kvm() {
        return;
    }
    let (vm, _file) = Vm::with_ram(RAM).unwrap();
    let view = vm.shared_memory();
    let region = view.iter().next().unwrap();
    let slice = region.get_slice(MemoryRegionAddress(RAM), 0).unwrap();
    assert_eq!(slice.len(), 0);
    assert!(region.get_slice(MemoryRegionAddress(RAM), 1).is_err());
    assert!(region.get_slice(MemoryRegionAddress(u64::MAX), 0).is_err());
}

/// Listeners hear of every discard and conversion, and one that panics is
/// counted without breaking the conversion.
#[test]
fn listeners_are_told_and_a_panicking_one_is_contained() {
    if !kvm() {
        return;
    }
    #[derive(Default)]
    struct Log(std::sync::Mutex<Vec<(&'static str, u64, u64)>>);
    impl gmem_kvm::MemoryListener for Log {
        fn discarded(&self, gpa: Gpa, len: u64) {
            self.0.lock().unwrap().push(("discarded", gpa.0, len));
        }
        fn converted(&self, gpa: Gpa, len: u64, _state: PageState) {
            self.0.lock().unwrap().push(("converted", gpa.0, len));
        }
    }
    struct Panics;
    impl gmem_kvm::MemoryListener for Panics {
        fn converted(&self, _: Gpa, _: u64, _: PageState) {
            panic!("listener bug");
        }
    }
    let (vm, _file) = Vm::with_ram(RAM).unwrap();
    let log = Arc::new(Log::default());
    vm.memory().add_listener(log.clone());
    vm.memory().add_listener(Arc::new(Panics));
    vm.memory().populate(Gpa(STORM_BASE), b"private").unwrap();
    vm.memory().convert(Gpa(STORM_BASE), 8192, PageState::Shared).unwrap();
    vm.memory().write(Gpa(STORM_BASE), b"shared").unwrap();
    vm.punch(Gpa(STORM_BASE), 4096).unwrap();
    let seen = log.0.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("discarded", STORM_BASE, 4096),
            ("converted", STORM_BASE, 8192),
            ("discarded", STORM_BASE, 4096)
        ]
    );
    assert_eq!(vm.stats().memory.listener_panics, 1);
}

/// Conversions racing punches made on the file itself (not through the
/// memory), and host reads: no deadlock between the file's resize lock and
/// the memory's access lock, whichever is taken first.
#[test]
fn conversions_racing_direct_file_punches_do_not_deadlock() {
    if !kvm() {
        return;
    }
    let (vm, files) = Vm::with_ram(RAM).unwrap();
    let file = files[0].clone();
    let (done, finished) = std::sync::mpsc::channel();
    let vm = Arc::new(vm);
    let worker = vm.clone();
    std::thread::spawn(move || {
        let converting = AtomicBool::new(true);
        std::thread::scope(|scope| {
            let (file, vm, converting) = (&file, &worker, &converting);
            scope.spawn(move || {
                while converting.load(Ordering::Relaxed) {
                    // Allocated pages, so that the punch invalidates.
                    vm.populate(Gpa(STORM_BASE), &[1; 8192]).unwrap();
                    file.fallocate(gmem::Fallocate::PunchHole, FileOffset(STORM_BASE), 8192)
                        .unwrap();
                }
            });
            scope.spawn(move || {
                while converting.load(Ordering::Relaxed) {
                    let _ = vm.read_guest(Gpa(STORM_BASE), &mut [0; 8]);
                }
            });
            for round in 0..20_000u64 {
                let state = if round % 2 == 0 { PageState::Shared } else { PageState::Private };
                vm.memory().convert(Gpa(STORM_BASE), 8192, state).unwrap();
            }
            converting.store(false, Ordering::Relaxed);
        });
        let _ = done.send(());
    });
    finished.recv_timeout(Duration::from_secs(120)).expect("conversions and punches deadlocked");
    assert_eq!(vm.stats().memory.conversions, 20_000);
}

/// A fault that cannot be served (here EDEADLK: the serving thread itself
/// holds a lock on the page) fences the page off: the vCPU's `KVM_RUN`
/// returns instead of faulting for ever, and the VMM gets the error with
/// the GPA. Driven by hand, as a VMM with its own event loop does.
#[test]
fn an_unservable_fault_is_fenced_and_reported() {
    if !kvm() {
        return;
    }
    let (how, failed, stats) = unservable_fault(|| {});
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].gpa, Gpa(STUCK));
    assert_eq!(failed[0].errno(), Errno::DEADLK);
    assert_ne!(how, "guest exit", "the fenced page was never reached");
    assert_eq!(stats.fenced_pages, 1);
}

const STUCK: u64 = 16 << 20;
const FENCE_CHILD: &str = "GMEM_TEST_FENCE_CHILD";

/// Issue 19, defect 5: a page fence is an `mprotect` that splits the
/// window's mapping, and that needs memory (a VMA); where it fails the
/// vCPU used to retry the fault for ever inside `KVM_RUN`. Here it fails
/// for real, in a child process whose mappings are at `vm.max_map_count`
/// (a per-process limit: nothing host-wide changes): `KVM_RUN` still ends,
/// and the VMM gets the fault error.
#[test]
fn an_unservable_fault_ends_the_run_when_no_page_fence_can_be_made() {
    if !kvm() {
        return;
    }
    if std::env::var_os(FENCE_CHILD).is_some() {
        let (how, failed, stats) = unservable_fault(exhaust_map_count);
        assert_eq!(failed.first().map(|f| f.gpa), Some(Gpa(STUCK)), "{failed:?}");
        assert_ne!(how, "guest exit", "the unservable page was never reached");
        println!("fence child: {how}, {} fenced pages", stats.fenced_pages);
        return;
    }
    let (passed, text) = common::run_in_child(
        "an_unservable_fault_ends_the_run_when_no_page_fence_can_be_made",
        FENCE_CHILD,
    );
    assert!(passed, "{text}");
    assert!(text.contains("fence child: "), "{text}");
}

/// Maps one-page anonymous mappings that cannot merge until the kernel
/// refuses (`vm.max_map_count`): no mapping can be split from then on.
fn exhaust_map_count() {
    use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
    for n in 0u64.. {
        let prot = if n % 2 == 0 { ProtFlags::READ } else { ProtFlags::READ | ProtFlags::WRITE };
        // SAFETY: a new anonymous mapping, never used and never unmapped
        // (the child process ends with it).
        let mapped = unsafe { mmap_anonymous(std::ptr::null_mut(), 4096, prot, MapFlags::PRIVATE) };
        if mapped.is_err() {
            return;
        }
    }
}

/// Runs the touch guest on a vCPU while this thread serves faults and
/// holds a lock on the page at `STUCK`; `before_run` runs once the vCPU
/// thread is started, before it enters the guest. Returns how the vCPU
/// left `KVM_RUN`, the faults that could not be served, and the stats.
fn unservable_fault(
    before_run: impl FnOnce(),
) -> (String, Vec<gmem_kvm::FaultError>, gmem_kvm::MemoryStats) {
    use gmem_runner::boot;
    use kvm_ioctls::VcpuExit;
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let memory = PrivateMemory::new(DEFAULT_FAULT_AROUND_PAGES).unwrap();
    let file = Arc::new(PrivateMemFile::new_guest("fenced").unwrap());
    file.set_len(RAM).unwrap();
    let spec = RegionSpec {
        slot: 0,
        gpa: Gpa(0),
        file: file.clone(),
        file_offset: FileOffset(0),
        size: RAM,
    };
    memory.add_region(&vm, spec).unwrap();
    let image = GuestImage::parse(gmem_guest::guest("touch").unwrap(), RAM).unwrap();
    boot::load(&image, RAM, 1, |gpa, bytes| memory.populate(gpa, bytes)).unwrap();
    let binding = file.bind(&memory).unwrap();
    let _held = binding.get_and_lock(gmem::PageIndex(STUCK / 4096)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    boot::init_vcpu(&kvm, &vcpu, image.entry, 0, RAM).unwrap();
    let (exited, exit) = std::sync::mpsc::channel();
    let (go, start) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ = start.recv();
        let how = loop {
            match vcpu.run() {
                Ok(VcpuExit::MmioRead(gpa, _) | VcpuExit::MmioWrite(gpa, _)) => {
                    break format!("mmio {gpa:#x}")
                }
                Ok(VcpuExit::IoOut(0xF4, _)) => break "guest exit".into(),
                Ok(_) => {}
                Err(e) => break format!("error {}", e.errno()),
            }
        };
        let _ = exited.send(how);
    });
    let mut failed = Vec::with_capacity(16);
    before_run();
    go.send(()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let how = loop {
        if let Ok(how) = exit.try_recv() {
            break how;
        }
        assert!(std::time::Instant::now() < deadline, "the vCPU never left KVM_RUN");
        failed.extend(memory.serve_faults().unwrap().1);
        std::thread::sleep(Duration::from_micros(200));
    };
    (how, failed, memory.stats())
}

//! Guest memory as concurrent VMMs hold it (issue 19's defects): host
//! copies racing a region's removal, listeners that call back into the
//! memory, views taken on several threads that wait for each other, and
//! memslot changes from the thread that serves faults. Each test failed
//! (crashed or hung) before its fix; a hang fails through a watchdog.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::{guest_file, kvm};
use gmem::FileOffset;
use gmem_kvm::{DeviceMemory, Errno, MemoryListener, PageState, PrivateMemory};
use gmem_runner::{Gpa, Vm};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const BASE: u64 = 0x40_0000;
const SIZE: u64 = 2 << 20;

/// Runs `test` on a thread; fails if it has not finished in 60 s (a hang).
fn within_a_minute(name: &str, test: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => thread.join().unwrap(),
        // The test thread panicked: join to report its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => thread.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: hung for a minute"),
    }
}

/// Host reads and writes of shared pages race the removal (and re-adding)
/// of their region: each either copies or fails cleanly (EINVAL once the
/// region is gone, EPERM while it is new and private), never faults. The
/// copies used to run on a window already unmapped: SIGSEGV or SIGBUS.
#[test]
fn host_copies_racing_a_region_removal_never_fault() {
    if !kvm() {
        return;
    }
    let vm = Arc::new(Vm::new().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let copies = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let (vm, stop, copies) = (vm.clone(), stop.clone(), copies.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while !stop.load(Ordering::Relaxed) {
                    let result = if i == 0 {
                        vm.memory().read(Gpa(BASE), &mut buf)
                    } else {
                        vm.memory().write(Gpa(BASE), &buf)
                    };
                    match result {
                        Ok(()) => drop(copies.fetch_add(1, Ordering::Relaxed)),
                        Err(e) => assert!(
                            [Errno::INVAL, Errno::PERM, Errno::AGAIN].contains(&e.errno()),
                            "{e}"
                        ),
                    }
                }
            })
        })
        .collect();
    for _ in 0..300 {
        let file = guest_file(SIZE);
        let slot = vm.add_private_memory(Gpa(BASE), &file, FileOffset(0), SIZE).unwrap();
        vm.memory().convert(Gpa(BASE), 64 << 10, PageState::Shared).unwrap();
        std::thread::sleep(Duration::from_micros(200));
        vm.remove_memory(slot).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert!(copies.load(Ordering::Relaxed) > 0, "no copy ever ran");
}

/// A listener that, inside `discarded` and `converted`, reads the range
/// being changed, reads another shared page, takes a view, converts
/// another page, punches a page and adds a listener: each call works or
/// returns an error (EDEADLK where it would wait for its own change),
/// never hangs. Each used to deadlock.
#[test]
fn listeners_that_call_back_into_the_memory_never_hang() {
    if !kvm() {
        return;
    }
    within_a_minute("calling-back listener", || {
        let (vm, _files) = Vm::with_ram(16 << 20).unwrap();
        let memory = vm.memory().clone();
        // Allocated, so that conversions and punches discard them.
        vm.populate(Gpa(BASE), &[1; 0x2000]).unwrap();
        memory.convert(Gpa(BASE + 0x10_0000), 0x1000, PageState::Shared).unwrap();
        let listener = Arc::new(CallingBack {
            memory: Arc::downgrade(&memory),
            results: Mutex::default(),
            busy: AtomicBool::new(false),
            told: Arc::default(),
        });
        memory.add_listener(listener.clone());
        for state in [PageState::Shared, PageState::Private] {
            memory.convert(Gpa(BASE), 0x2000, state).unwrap();
        }
        memory.convert(Gpa(BASE), 0x1000, PageState::Shared).unwrap();
        memory.write(Gpa(BASE), &[2; 8]).unwrap();
        memory.punch(Gpa(BASE), 0x1000).unwrap();
        let results = listener.results.lock().unwrap();
        // discarded and converted of the first conversion, converted of
        // the others, discarded of the punch: 5 callbacks, 6 calls each.
        assert!(results.len() >= 5 * 6, "{results:?}");
        // The other shared page is readable from inside every callback.
        assert!(results.iter().any(|(what, r)| what == "read other" && r.is_ok()), "{results:?}");
        // Reading the range being changed would wait for itself.
        for (what, result) in results.iter() {
            if let Err(errno) = result {
                assert!(
                    [Errno::DEADLK, Errno::AGAIN, Errno::PERM].contains(errno),
                    "{what}: {errno}"
                );
            }
        }
        drop(results);
        // The listeners added from callbacks are told of later changes.
        let before = listener.told.load(Ordering::SeqCst);
        memory.convert(Gpa(BASE + 0x20_0000), 0x1000, PageState::Shared).unwrap();
        assert!(listener.told.load(Ordering::SeqCst) > before);
    });
}

struct CallingBack {
    memory: std::sync::Weak<PrivateMemory>,
    results: Mutex<Vec<(String, Result<(), Errno>)>>,
    busy: AtomicBool,
    /// Changes told to the listeners this one added.
    told: Arc<AtomicU64>,
}

impl CallingBack {
    fn call_back(&self, gpa: Gpa) {
        // One level deep: the calls below change memory, and so call us.
        if self.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(memory) = self.memory.upgrade() else { return };
        let mut buf = [0u8; 8];
        let other = Gpa(BASE + 0x10_0000);
        let calls: Vec<(&str, Result<(), gmem_kvm::Error>)> = vec![
            ("read changing", memory.read(gpa, &mut buf)),
            ("read other", memory.read(other, &mut buf)),
            (
                "view",
                memory
                    .shared()
                    .read_obj::<u64>(GuestAddress(other.0))
                    .map(drop)
                    .map_err(|e| gmem_kvm::Error::InvalidArgument(format!("view: {e}"))),
            ),
            (
                "convert other",
                memory.convert(Gpa(BASE + 0x30_0000), 0x1000, PageState::Shared).map(drop),
            ),
            ("punch other", memory.punch(Gpa(BASE + 0x40_0000), 0x1000)),
        ];
        memory.add_listener(Arc::new(Counting(self.told.clone())));
        let mut results = self.results.lock().unwrap();
        for (what, result) in calls {
            results.push((what.to_owned(), result.map_err(|e| e.errno())));
        }
        results.push(("add listener".into(), Ok(())));
        self.busy.store(false, Ordering::SeqCst);
    }
}

impl MemoryListener for CallingBack {
    fn discarded(&self, gpa: Gpa, _len: u64) {
        self.call_back(gpa);
    }

    fn converted(&self, gpa: Gpa, _len: u64, _state: PageState) {
        self.call_back(gpa);
    }
}

struct Counting(Arc<AtomicU64>);

impl MemoryListener for Counting {
    fn converted(&self, _gpa: Gpa, _len: u64, _state: PageState) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Thread A holds a view and waits for thread C, which takes a view, while
/// B's conversion waits for A: all three used to hang (a waiting writer
/// kept C out). Now C gets its view, A ends, and B converts.
#[test]
fn views_on_threads_that_wait_for_each_other_do_not_deadlock_a_conversion() {
    if !kvm() {
        return;
    }
    within_a_minute("views across threads", || {
        let (vm, _files) = Vm::with_ram(16 << 20).unwrap();
        let memory = vm.memory().clone();
        memory.convert(Gpa(BASE), 0x1000, PageState::Shared).unwrap();
        memory.write(Gpa(BASE), &7u64.to_le_bytes()).unwrap();
        let (to_c, c_asked) = mpsc::channel::<()>();
        let (to_a, c_answered) = mpsc::channel::<u64>();
        let memory = &memory;
        std::thread::scope(|scope| {
            let a = scope.spawn(move || {
                let view = memory.shared();
                let mine: u64 = view.read_obj(GuestAddress(BASE)).unwrap();
                // Let B's conversion start waiting for this view.
                std::thread::sleep(Duration::from_millis(200));
                to_c.send(()).unwrap();
                let theirs = c_answered.recv().unwrap();
                drop(view);
                mine + theirs
            });
            let b = scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                memory.convert(Gpa(BASE + 0x10_0000), 0x1000, PageState::Shared)
            });
            let c = scope.spawn(move || {
                c_asked.recv().unwrap();
                let view = memory.shared();
                let value: u64 = view.read_obj(GuestAddress(BASE)).unwrap();
                to_a.send(value).unwrap();
            });
            assert_eq!(a.join().unwrap(), 14);
            assert_eq!(b.join().unwrap().unwrap(), 1);
            c.join().unwrap();
        });
    });
}

/// A VM driven by hand, as an event-loop VMM drives it: `guest` (a
/// built-in user-mode guest) in `ram` bytes of one region, served
/// `fault_around` pages per fault, on a vCPU thread that returns the
/// guest's exit status. The caller serves faults. The image is loaded
/// with `populate`, or (`staged`) through vm-memory's `Bytes` on a
/// `LaunchMemory`, as linux-loader would write it.
struct HandDriven {
    memory: Arc<PrivateMemory>,
    vcpu_thread: Option<std::thread::JoinHandle<u8>>,
    vm: Arc<kvm_ioctls::VmFd>,
}

impl HandDriven {
    fn start(guest: &str, ram: u64, fault_around: u64) -> Self {
        Self::start_loaded(guest, ram, fault_around, false)
    }

    fn start_loaded(guest: &str, ram: u64, fault_around: u64, staged: bool) -> Self {
        use kvm_ioctls::VcpuExit;
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let memory = PrivateMemory::new(fault_around).unwrap();
        let spec = gmem_kvm::RegionSpec {
            slot: 0,
            gpa: Gpa(0),
            file: guest_file(ram),
            file_offset: FileOffset(0),
            size: ram,
        };
        memory.add_region(&vm, spec).unwrap();
        let image = gmem_runner::GuestImage::parse(gmem_guest::guest(guest).unwrap(), ram).unwrap();
        if staged {
            let launch = memory.launch_memory().unwrap();
            gmem_runner::boot::load(&image, ram, 1, |gpa, bytes| {
                launch.write_slice(bytes, gpa.into()).map_err(|e| {
                    gmem_kvm::Error::InvalidArgument(format!("launch write at {gpa}: {e}"))
                })
            })
            .unwrap();
            assert!(launch.commit().unwrap() > 0);
        } else {
            gmem_runner::boot::load(&image, ram, 1, |gpa, bytes| memory.populate(gpa, bytes))
                .unwrap();
        }
        memory.finish_launch();
        let vcpu = vm.create_vcpu(0).unwrap();
        gmem_runner::boot::init_vcpu(&kvm, &vcpu, image.entry, 0, ram).unwrap();
        let vcpu_thread = std::thread::spawn(move || {
            let mut vcpu = vcpu;
            loop {
                match vcpu.run() {
                    // The guest's exit, through the doorbell.
                    Ok(VcpuExit::MmioWrite(0xDFFF_F0F4, data)) => return data[0],
                    Ok(VcpuExit::MmioWrite(..) | VcpuExit::IoOut(..)) => {}
                    other => panic!("unexpected exit {other:?}"),
                }
            }
        });
        Self { memory, vcpu_thread: Some(vcpu_thread), vm }
    }

    /// Whether `fault_fd` became readable within `timeout`.
    fn faults_ready(&self, timeout: Duration) -> bool {
        let fd = self.memory.fault_fd();
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        let timeout = rustix::event::Timespec::try_from(timeout).unwrap();
        rustix::event::poll(&mut fds, Some(&timeout)).unwrap() > 0
    }

    fn running(&self) -> bool {
        self.vcpu_thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits for the guest's exit status (once); the memory and VM stay.
    fn finish(&mut self) -> u8 {
        self.vcpu_thread.take().expect("finished once").join().unwrap()
    }
}

/// An event-loop VMM: one thread polls `fault_fd`, serves faults and
/// changes memslots; a vCPU touches its RAM one page per fault. Adding and
/// removing a region while the vCPU sleeps on a fault that only this
/// thread serves used to hang: KVM's memslot update waits for the vCPU,
/// which waits for the thread inside KVM.
#[test]
fn memslot_changes_from_the_fault_serving_thread_complete() {
    if !kvm() {
        return;
    }
    within_a_minute("memslot changes from the fault thread", || {
        // One page per fault: the vCPU waits on a fault most of the time.
        let mut vm = HandDriven::start("touch", 32 << 20, 1);
        let mut changes = 0;
        while vm.running() {
            if !vm.faults_ready(Duration::from_millis(10)) {
                continue;
            }
            // The vCPU sleeps on a fault: change memslots before serving it.
            if changes < 20 {
                let spec = gmem_kvm::RegionSpec {
                    slot: 1,
                    gpa: Gpa(1 << 30),
                    file: guest_file(SIZE),
                    file_offset: FileOffset(0),
                    size: SIZE,
                };
                vm.memory.add_region(&vm.vm, spec).unwrap();
                vm.memory.remove_region(1).unwrap();
                changes += 1;
            }
            vm.memory.serve_faults().unwrap();
        }
        assert_eq!(vm.finish(), 0);
        // Each change's own fault thread serves the vCPU meanwhile, so on a
        // loaded host the guest may finish before 20 of them.
        assert!(changes >= 1, "no memslot change while the vCPU waited on a fault");
    });
}

/// A guest image written through vm-memory (`LaunchMemory`, as
/// linux-loader writes kernels) lands in private memory and runs; the
/// staging shows only what was written through it, never private content,
/// and is refused once the launch is finished.
#[test]
fn a_guest_loaded_through_vm_memory_runs() {
    if !kvm() {
        return;
    }
    within_a_minute("launch through vm-memory", || {
        let mut vm = HandDriven::start_loaded("touch", 32 << 20, 512, true);
        while vm.running() {
            if vm.faults_ready(Duration::from_millis(10)) {
                vm.memory.serve_faults().unwrap();
            }
        }
        assert_eq!(vm.finish(), 0);
        let refused = vm.memory.launch_memory().map(drop);
        assert_eq!(refused.unwrap_err().errno(), Errno::PERM);
    });
    within_a_minute("launch staging", || {
        let vm = Vm::with_ram(common::RAM).unwrap().0;
        vm.memory().populate(Gpa(BASE), b"private").unwrap();
        let launch = vm.memory().launch_memory().unwrap();
        assert_eq!(launch.read_obj::<u64>(GuestAddress(BASE)).unwrap(), 0, "staging, not RAM");
        assert!(launch.write_slice(b"x", GuestAddress(common::RAM)).is_err(), "outside RAM");
        launch.write_slice(b"staged", GuestAddress(BASE + 4096)).unwrap();
        assert_eq!(launch.commit().unwrap(), 4096, "one page written");
    });
}

/// `fault_fd` becomes readable when first touches the kernel has served
/// for a sparse guest are due to be taken back, so a poll loop with no
/// timeout of its own takes them back after the guest stops faulting (it
/// used to sleep for ever, and the region stayed with the kernel).
#[test]
fn fault_fd_wakes_the_event_loop_when_first_touches_are_due_back() {
    if !kvm() {
        return;
    }
    within_a_minute("take-back timer", || {
        // The guest may end right after a take-back (a window of a few
        // faults): then run it again.
        let vm = (0..5)
            .map(|_| {
                let mut vm =
                    HandDriven::start("sparse", 64 << 20, gmem_kvm::DEFAULT_FAULT_AROUND_PAGES);
                while vm.running() {
                    if vm.faults_ready(Duration::from_millis(10)) {
                        vm.memory.serve_faults().unwrap();
                    }
                }
                assert_eq!(vm.finish(), 0);
                vm
            })
            .find(|vm| vm.memory.stats().kernel_serving_regions > 0)
            .expect("the kernel serves the sparse guest's first touches at its end");
        // No fault will come now: only the timer can make the fd readable.
        let mut wakes = 0;
        while vm.memory.stats().kernel_serving_regions > 0 {
            assert!(vm.faults_ready(Duration::from_secs(10)), "fault_fd never became readable");
            vm.memory.serve_faults().unwrap();
            wakes += 1;
            assert!(wakes < 100, "readable without work");
        }
        // Done: nothing is due, so the descriptor stays quiet.
        assert!(!vm.faults_ready(Duration::from_millis(300)));
    });
}

/// A virtio-blk device (virtio-queue underneath) on its own thread, holding
/// memory through a [`DeviceMemory`] handle, serves requests while two
/// vCPUs convert their pages back and forth (convstorm), and a third
/// thread reads those pages through another handle: every request
/// completes with its data, the prober sees only what the guest wrote
/// while a page was shared (never a marker written while it was private)
/// or an `EPERM` naming the page, and the guest finishes.
#[test]
fn a_virtio_device_thread_serves_requests_while_the_guest_converts() {
    use common::rig::{Rig, DATA, IN, OUT};
    if !kvm() {
        return;
    }
    within_a_minute("device thread", || {
        let vm = Vm::with_ram(common::RAM).unwrap().0;
        let memory = vm.memory().clone();
        let rig = Rig::new(&vm, "device-thread");
        let stop = AtomicBool::new(false);
        let (stop, memory) = (&stop, &memory);
        std::thread::scope(|scope| {
            let device = scope.spawn(move || {
                let mut rig = rig;
                let mut requests = 0u32;
                while requests < 50 || !stop.load(Ordering::Relaxed) {
                    let pattern = [(requests % 251) as u8 + 1; 512];
                    rig.memory.write(Gpa(DATA), &pattern).unwrap();
                    assert_eq!(rig.request(OUT, DATA, 512), 0, "OUT {requests}");
                    rig.memory.write(Gpa(DATA), &[0; 512]).unwrap();
                    assert_eq!(rig.request(IN, DATA, 512), 0, "IN {requests}");
                    let mut back = [0u8; 512];
                    rig.memory.read(Gpa(DATA), &mut back).unwrap();
                    assert_eq!(back, pattern, "request {requests} read back other data");
                    requests += 1;
                }
                requests
            });
            let prober = scope.spawn(move || {
                let device = DeviceMemory::new(memory);
                let (mut seen, mut denied) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    for gpa in [0x60_0000u64, 0x60_1000] {
                        match device.memory().read_obj::<u64>(GuestAddress(gpa + 0x800)) {
                            Ok(value) => {
                                let marker = value.wrapping_sub(0x5ec0_0000);
                                let shared_marker = marker < 300 && marker % 2 == 1;
                                assert!(
                                    value == 0 || value == 0x4848_4848_4848_4848 || shared_marker,
                                    "the host saw {value:#x} at {gpa:#x}: written while private"
                                );
                                seen += 1;
                            }
                            Err(e) => {
                                assert_eq!(gmem_kvm::Error::private_page_in(&e), Some(Gpa(gpa)));
                                denied += 1;
                            }
                        }
                    }
                }
                (seen, denied)
            });
            let report = common::run(&vm, "convstorm", 2, &|_, _| {});
            stop.store(true, Ordering::Relaxed);
            assert_eq!(report.outcome, gmem_runner::Outcome::Exit(0));
            let requests = device.join().unwrap();
            let (seen, denied) = prober.join().unwrap();
            assert!(requests >= 50 && seen + denied > 0, "{requests} {seen} {denied}");
        });
        assert_eq!(vm.stats().memory.conversions, 2 * 300 + 1, "the guest's and the rig's");
    });
}

/// A VM whose `pages` pages from `BASE` are shared, its memory, and a
/// device handle on it.
fn shared_pages(pages: u64) -> (Vm, Arc<PrivateMemory>, DeviceMemory) {
    let vm = Vm::with_ram(common::RAM).unwrap().0;
    let memory = vm.memory().clone();
    memory.convert(Gpa(BASE), pages * 4096, PageState::Shared).unwrap();
    let device = DeviceMemory::new(&memory);
    (vm, memory, device)
}

/// A view holds only what it touched: a conversion of another page goes
/// on while it lives (a view used to hold all of memory: a device holding
/// one for 300 ms stalled every conversion for as long), and a conversion
/// of a page it read waits until it is dropped.
#[test]
fn a_view_holds_only_the_pages_it_touched() {
    if !kvm() {
        return;
    }
    within_a_minute("view holds", || {
        let (_vm, memory, device) = shared_pages(2);
        let view = device.memory();
        view.read_obj::<u64>(GuestAddress(BASE)).unwrap();
        let other = memory.clone();
        let elsewhere =
            std::thread::spawn(move || other.convert(Gpa(BASE + 4096), 4096, PageState::Private));
        // Joined while the view lives: it must not wait for it.
        elsewhere.join().unwrap().unwrap();
        let (done, converted) = mpsc::channel();
        let other = memory.clone();
        let here = std::thread::spawn(move || {
            let _ = done.send(other.convert(Gpa(BASE), 4096, PageState::Private));
        });
        assert!(converted.recv_timeout(Duration::from_millis(100)).is_err(), "did not wait");
        drop(view);
        converted.recv().unwrap().unwrap();
        here.join().unwrap();
        assert_eq!(memory.page_state(Gpa(BASE)), Some(PageState::Private));
    });
}

/// A pinned range (I/O that outlives a call) refuses conversions and
/// punches of its pages with `EAGAIN` (a guest's request gets -11), lets
/// every other page change, gives out its bytes as slices, and is released
/// on another thread. Bad pins get the errno a kernel user expects.
#[test]
fn pins_refuse_changes_of_their_pages_until_dropped_on_any_thread() {
    if !kvm() {
        return;
    }
    within_a_minute("pins", || {
        let (_vm, memory, device) = shared_pages(4);
        let pin = device.pin(GuestAddress(BASE + 0x800), 4096).unwrap();
        match memory.convert(Gpa(BASE + 4096), 4096, PageState::Private) {
            Err(gmem_kvm::Error::Pinned { gpa, len }) => {
                assert_eq!((gpa, len), (Gpa(BASE + 4096), 0x800))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(memory.punch(Gpa(BASE), 4096).unwrap_err().errno(), Errno::AGAIN);
        let request = gmem_kvm::ConversionRequest::from_port(BASE, 8192, 8);
        assert_eq!(memory.convert_for_guest(request) as i64, -11);
        assert_eq!(memory.page_state(Gpa(BASE)), Some(PageState::Shared), "nothing converted");
        memory.convert(Gpa(BASE + 2 * 4096), 4096, PageState::Private).unwrap();
        let slices = pin.slices();
        assert_eq!(slices.iter().map(|s| s.len()).sum::<usize>(), 4096);
        slices[0].write_slice(b"pinned", 0).unwrap();
        drop(slices);
        let mut back = [0u8; 6];
        memory.read(Gpa(BASE + 0x800), &mut back).unwrap();
        assert_eq!(&back, b"pinned");
        std::thread::spawn(move || drop(pin)).join().unwrap();
        memory.convert(Gpa(BASE), 8192, PageState::Private).unwrap();

        let errno = |r: gmem_kvm::Result<gmem_kvm::PinnedRange>| r.unwrap_err().errno();
        assert_eq!(errno(device.pin(GuestAddress(BASE), 4096)), Errno::PERM);
        assert_eq!(errno(device.pin(GuestAddress(BASE + 3 * 4096), 0)), Errno::INVAL);
        assert_eq!(errno(device.pin(GuestAddress(common::RAM - 8), 16)), Errno::INVAL);
        assert_eq!(errno(device.pin(GuestAddress(u64::MAX - 8), usize::MAX)), Errno::INVAL);
        // A refused pin holds nothing.
        memory.convert(Gpa(BASE + 3 * 4096), 4096, PageState::Private).unwrap();
    });
}

/// Ordinary vm-memory regions (firmware, a swiotlb pool) beside private
/// ones in one address space: a device walks both, an access spanning
/// the end of RAM and a plain region right after it works, a virtio
/// request's buffer may lie in the plain region, and overlaps are `EEXIST`.
#[test]
fn plain_regions_join_private_ones_in_the_device_view() {
    use common::rig::{Rig, IN, OUT};
    use vm_memory::{GuestMemoryBackend, GuestRegionMmap};
    if !kvm() {
        return;
    }
    within_a_minute("plain regions", || {
        let ram = common::RAM;
        let vm = Vm::with_ram(ram).unwrap().0;
        let mut rig = Rig::new(&vm, "plain");
        let memory = vm.memory().clone();
        let plain = |gpa: u64| {
            let map = vm_memory::mmap::MmapRegion::new(1 << 20).unwrap();
            Arc::new(GuestRegionMmap::new(map, GuestAddress(gpa)).unwrap())
        };
        rig.device.add_plain_region(plain(ram)).unwrap();
        let overlap = rig.device.add_plain_region(plain(ram - 4096)).unwrap_err();
        assert_eq!(overlap.errno(), Errno::EXIST);
        assert_eq!(
            rig.device.add_plain_region(plain(ram + 4096)).unwrap_err().errno(),
            Errno::EXIST
        );
        memory.convert(Gpa(ram - 4096), 4096, PageState::Shared).unwrap();
        let view = rig.device.memory();
        assert_eq!(view.num_regions(), 2);
        let across = [0x77u8; 8192];
        view.write_slice(&across, GuestAddress(ram - 4096)).unwrap();
        let mut back = [0u8; 8192];
        view.read_slice(&mut back, GuestAddress(ram - 4096)).unwrap();
        assert_eq!(back, across);
        drop(view);
        // A clone of the handle sees the plain region too.
        let clone = rig.device.clone();
        clone.memory().write_slice(&[0x3c; 512], GuestAddress(ram + 0x1000)).unwrap();
        assert_eq!(rig.request(OUT, ram + 0x1000, 512), 0);
        clone.memory().write_slice(&[0; 512], GuestAddress(ram + 0x1000)).unwrap();
        assert_eq!(rig.request(IN, ram + 0x1000, 512), 0);
        assert_eq!(
            clone.memory().read_obj::<u64>(GuestAddress(ram + 0x1000)).unwrap(),
            0x3c3c_3c3c_3c3c_3c3c
        );
    });
}

/// The memory keeps its VM and deletes its memslots when dropped, so a
/// VmFd that outlives it (a VMM holding it elsewhere) has no memslot left
/// on the unmapped windows: the GPA range is free for a new slot.
#[test]
fn dropping_the_memory_deletes_its_memslots() {
    if !kvm() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let memory = PrivateMemory::new(gmem_kvm::DEFAULT_FAULT_AROUND_PAGES).unwrap();
    let spec = |slot| gmem_kvm::RegionSpec {
        slot,
        gpa: Gpa(0),
        file: guest_file(SIZE),
        file_offset: FileOffset(0),
        size: SIZE,
    };
    memory.add_region(&vm, spec(3)).unwrap();
    let plain = vm_memory::mmap::MmapRegion::<()>::new(SIZE as usize).unwrap();
    let slot = kvm_bindings::kvm_userspace_memory_region {
        slot: 9,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: SIZE,
        userspace_addr: plain.as_ptr() as u64,
    };
    // SAFETY: `plain` outlives the VM's use of it: the slot is deleted
    // below before `plain` goes, and no vCPU ever runs.
    let taken = unsafe { vm.set_user_memory_region(slot) }.unwrap_err();
    assert_eq!(taken.errno(), libc::EEXIST, "the region's memslot is there");
    drop(memory);
    // SAFETY: as above.
    unsafe { vm.set_user_memory_region(slot) }.expect("the memslot went with the memory");
    // SAFETY: deleting a memslot maps nothing.
    unsafe {
        vm.set_user_memory_region(kvm_bindings::kvm_userspace_memory_region {
            memory_size: 0,
            ..slot
        })
    }
    .unwrap();
}

//! Benchmark figures, measured as ratios against a baseline in the same run
//! (these machines are noisy): never as timed tests.

use std::time::{Duration, Instant};

use gmem::PAGE_SIZE;

use crate::map::Map;
use crate::{Gpa, GuestImage, Outcome, RunConfig, Vm};
use gmem_kvm::{Error, Result};

/// Guest memory below the touched range (image, VMM region).
const TOUCH_BASE: u64 = 4 << 20;

/// Where the `touch` guest's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// gmem's user-space backend, serving this many pages per fault.
    Gmem {
        /// Fault-around in pages.
        fault_around: u64,
    },
    /// gmem's user-space backend on 2 MiB pages of this kind.
    GmemHuge(gmem::HugePages),
    /// Plain anonymous KVM memory (the baseline).
    Anonymous,
    /// Plain anonymous KVM memory with transparent huge pages
    /// (`MADV_HUGEPAGE`).
    AnonymousHuge,
    /// A plain memfd mapped as the memslot: the kernel's shmem faults, no
    /// userfaultfd, nothing locked (the floor of memfd-backed memory).
    Memfd,
    /// The native backend: the kernel's guest_memfd, mapped.
    Native,
}

/// A VM with `ram` bytes of RAM on `backing`.
fn vm_on(backing: &Backing, ram: u64) -> Result<Vm> {
    match backing {
        Backing::Gmem { fault_around } => {
            let vm = Vm::with_fault_around(*fault_around)?;
            vm.add_ram(ram)?;
            Ok(vm)
        }
        Backing::GmemHuge(huge) => {
            let vm = Vm::new()?;
            vm.add_ram_on(ram, Some(huge))?;
            Ok(vm)
        }
        Backing::Anonymous | Backing::AnonymousHuge | Backing::Memfd => {
            let vm = Vm::new()?;
            for (gpa, size) in crate::boot::ram_regions(ram) {
                match backing {
                    Backing::Memfd => vm.add_memfd_memory(gpa, size)?,
                    Backing::AnonymousHuge => vm.add_anonymous_memory_huge(gpa, size)?,
                    _ => vm.add_anonymous_memory(gpa, size)?,
                };
            }
            Ok(vm)
        }
        Backing::Native => Vm::with_native_ram(ram),
    }
}

/// Time for a touching guest (`touch`, or `sparse`) on `vcpus` vCPUs to
/// first-touch its shares of `mib` MiB on `backing`, guest run only (VM
/// set-up and image load excluded), with its console output and, on gmem,
/// the pages the run allocated in the file (the launch's not counted).
pub fn first_touch(
    touch_guest: &[u8],
    mib: u64,
    backing: Backing,
    vcpus: u32,
) -> Result<(Duration, String, Option<u64>)> {
    let ram = TOUCH_BASE + (mib << 20) + (2 << 20) + u64::from(vcpus) * crate::boot::STACK_SIZE;
    let ram = ram.div_ceil(2 << 20) * (2 << 20);
    let vm = vm_on(&backing, ram)?;
    let on_gmem = matches!(backing, Backing::Gmem { .. } | Backing::GmemHuge(_));
    let allocated = || on_gmem.then(|| vm.memory().stats().allocated_pages);
    let mut at_launch = None;
    let (console, time) = run_with(&vm, touch_guest, ram, vcpus, &mut || at_launch = allocated())?;
    let touched = allocated().zip(at_launch).map(|(after, before)| after - before);
    Ok((time, console, touched))
}

/// Nanoseconds of one random 8-byte read by the `tlb` guest over `mib`
/// MiB of RAM on `backing` (its first touches excluded), by its TSC.
pub fn tlb_read_ns(tlb_guest: &[u8], mib: u64, backing: Backing) -> Result<f64> {
    let (_, console, _) = first_touch(tlb_guest, mib, backing, 1)?;
    per_unit(&console, "reads=").map(|seconds| seconds * 1e9)
}

/// The pages a touching guest (`sparse`) reports it touched: its
/// `touched=N` field.
pub fn touched_pages(console: &str) -> Option<u64> {
    console.split_whitespace().find_map(|w| w.strip_prefix("touched=")?.parse().ok())
}

/// Loads `guest` into `vm` (`ram` bytes of RAM at GPA 0) and runs it on
/// `vcpus` vCPUs; returns its console output and how long the run took.
/// An error unless the guest exits 0.
fn run_to_success(vm: &Vm, guest: &[u8], ram: u64, vcpus: u32) -> Result<(String, Duration)> {
    run_with(vm, guest, ram, vcpus, &mut || {})
}

/// As [`run_to_success`], calling `launched` between the load and the run.
fn run_with(
    vm: &Vm,
    guest: &[u8],
    ram: u64,
    vcpus: u32,
    launched: &mut dyn FnMut(),
) -> Result<(String, Duration)> {
    let image = GuestImage::parse(guest, ram)?;
    vm.load(&image, ram, vcpus)?;
    launched();
    let config = RunConfig { timeout: Some(Duration::from_secs(600)), ..RunConfig::new(vcpus) };
    let start = Instant::now();
    let report = vm.run(&image, ram, &config, &|_, _| {})?;
    let elapsed = start.elapsed();
    let console = String::from_utf8_lossy(&report.console).replace('\0', "");
    match report.outcome {
        Outcome::Exit(0) => Ok((console, elapsed)),
        other => Err(Error::Unsupported(format!("the guest did not exit 0: {other:?}: {console}"))),
    }
}

/// What the `hugeconv` guest's run showed: its RAM converts one 4 KiB page
/// in every 2 MiB to shared and back (see `gmem_guest::huge_layout`).
#[derive(Clone, Copy, Debug)]
pub struct HugeConversions {
    /// Pages allocated in the files once everything was touched.
    pub allocated_touched: u64,
    /// The same once one page per 2 MiB was converted to shared.
    pub allocated_converted: u64,
    /// One 4 KiB conversion to shared, by the guest's TSC.
    pub convert_4k: Duration,
    /// From the guest's last conversion back to private until every split
    /// 2 MiB page was huge again (`None`: not within 10 s, or not on huge
    /// pages).
    pub huge_again_after: Option<Duration>,
    /// Time spent per collapse of a 2 MiB page.
    pub collapse_cost: Option<Duration>,
    /// The guest's 4 KiB conversions (both ways).
    pub conversions: u64,
    /// Split 2 MiB pages made huge again.
    pub collapses: u64,
    /// KVM's 2 MiB mappings at the end (`pages_2m`), where KVM says.
    pub kvm_pages_2m: Option<u64>,
}

/// Runs the `hugeconv` guest on `ram` bytes of `backing`.
pub fn huge_conversions(
    hugeconv_guest: &[u8],
    backing: &Backing,
    ram: u64,
) -> Result<HugeConversions> {
    use gmem_guest::huge_layout::{PRIVATE_AGAIN, SHARED, TOUCHED};
    let vm = vm_on(backing, ram)?;
    let huge = matches!(backing, Backing::GmemHuge(_));
    let allocated = std::sync::Mutex::new([0u64; 2]);
    let waited = std::sync::Mutex::new(None);
    let image = GuestImage::parse(hugeconv_guest, ram)?;
    vm.load(&image, ram, 1)?;
    let on_sync = |vm: &Vm, stage: u64| {
        let stats = vm.memory().stats();
        let mut allocated = allocated.lock().unwrap_or_else(|p| p.into_inner());
        match stage {
            TOUCHED => allocated[0] = stats.allocated_pages,
            SHARED => allocated[1] = stats.allocated_pages,
            PRIVATE_AGAIN if huge => {
                let start = Instant::now();
                let split = stats.conversions / 2;
                while vm.memory().stats().collapses < split && start.elapsed().as_secs() < 10 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                if vm.memory().stats().collapses >= split {
                    *waited.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
                }
            }
            _ => {}
        }
    };
    let config = RunConfig { timeout: Some(Duration::from_secs(600)), ..RunConfig::new(1) };
    let report = vm.run(&image, ram, &config, &on_sync)?;
    let console = String::from_utf8_lossy(&report.console).replace('\0', "");
    if report.outcome != Outcome::Exit(0) {
        return Err(Error::Unsupported(format!("hugeconv: {:?}: {console}", report.outcome)));
    }
    let stats = vm.memory().stats();
    let [allocated_touched, allocated_converted] =
        allocated.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(HugeConversions {
        allocated_touched,
        allocated_converted,
        convert_4k: Duration::from_secs_f64(per_unit(&console, "convert=")?),
        huge_again_after: waited.into_inner().unwrap_or_else(|p| p.into_inner()),
        collapse_cost: (stats.collapses > 0)
            .then(|| Duration::from_nanos(stats.collapse_nanos / stats.collapses)),
        conversions: stats.conversions,
        collapses: stats.collapses,
        kvm_pages_2m: vm.kvm_statistics()?.get("pages_2m"),
    })
}

/// Round trips of the `convbench` guest (request -> guest resumed), per
/// request, timed by the guest's TSC around the `out` instruction.
#[derive(Clone, Copy, Debug)]
pub struct ConversionTimes {
    /// A bare port-I/O exit (console byte): the baseline.
    pub bare_exit: Duration,
    /// Converting one 4 KiB page (alternately to shared and to private).
    pub convert_4k: Duration,
    /// Converting a 2 MiB range.
    pub convert_2m: Duration,
}

/// Runs the `convbench` guest once on `backing` and returns its
/// per-request times.
pub fn conversions(convbench_guest: &[u8], backing: Backing) -> Result<ConversionTimes> {
    const RAM: u64 = 32 << 20;
    let vm = vm_on(&backing, RAM)?;
    let (console, _) = run_to_success(&vm, convbench_guest, RAM, 1)?;
    let time = |key: &str| per_unit(&console, key).map(Duration::from_secs_f64);
    Ok(ConversionTimes {
        bare_exit: time("bare=")?,
        convert_4k: time("c4k=")?,
        convert_2m: time("c2m=")?,
    })
}

/// Seconds per unit of a `KEY=CYCLES/UNITS` field a guest printed, timed
/// by its TSC.
fn per_unit(console: &str, key: &str) -> Result<f64> {
    let field = console.split_whitespace().find_map(|w| w.strip_prefix(key));
    let ratio = field.and_then(|field| {
        let (cycles, units) = field.split_once('/')?;
        Some(cycles.parse::<f64>().ok()? / units.parse::<f64>().ok()?)
    });
    let cycles = ratio
        .ok_or_else(|| Error::Unsupported(format!("no {key} in the guest's report: {console}")))?;
    Ok(cycles / tsc_cycles_per_ns() * 1e-9)
}

/// The `diskbench` guest's virtio-blk throughput in MiB/s: bounced through
/// shared pages from private memory, and direct from the shared buffer.
/// 64 KiB requests, on a fresh 16 MiB disk file in `dir`.
pub fn virtio_blk(diskbench_guest: &[u8], dir: &std::path::Path) -> Result<(f64, f64)> {
    const RAM: u64 = 32 << 20;
    let path = dir.join(format!("gmem-bench-disk-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let (vm, _file) = Vm::with_ram(RAM)?;
    vm.attach_disk(&path, 16 << 20)?;
    let result = run_to_success(&vm, diskbench_guest, RAM, 1);
    let _ = std::fs::remove_file(&path);
    let (console, _) = result?;
    let rate = |key: &str| {
        per_unit(&console, key).map(|seconds_per_byte| 1.0 / seconds_per_byte / f64::from(1 << 20))
    };
    Ok((rate("bounce=")?, rate("direct=")?))
}

/// The host's TSC rate, against the monotonic clock over 50 ms. Guests
/// read the same counter (KVM does not scale it here).
fn tsc_cycles_per_ns() -> f64 {
    let tsc = || {
        // SAFETY: rdtsc only reads the time-stamp counter; every x86-64
        // CPU has it.
        unsafe { std::arch::x86_64::_rdtsc() }
    };
    let (start, cycles) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(50));
    let cycles = tsc() - cycles;
    cycles as f64 / start.elapsed().as_nanos() as f64
}

/// Bytes of per-page metadata (page states and mapping bitmaps) gmem keeps
/// for a guest with `ram` bytes of untouched RAM, per 4 KiB page.
pub fn metadata_bytes_per_page(ram: u64) -> Result<f64> {
    let (vm, _file) = Vm::with_ram(ram)?;
    let stats = vm.stats().memory;
    Ok(stats.metadata_bytes as f64 / stats.pages as f64)
}

/// Times of writing `mib` MiB into fresh memory: gmem's launch-time
/// [`Vm::populate`] of private memory, and a plain `memcpy` into a fresh
/// anonymous mapping (page faults included in both).
pub fn populate(mib: u64, backing: Backing) -> Result<(Duration, Duration)> {
    let len = mib << 20;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let vm = vm_on(&backing, len + (2 << 20))?;
    let start = Instant::now();
    vm.populate(Gpa(0), &data)?;
    let gmem = start.elapsed();

    let size = usize::try_from(len).map_err(|_| Error::InvalidArgument("too large".into()))?;
    let dst = Map::anonymous(size).map_err(Error::os("mmap"))?;
    let start = Instant::now();
    // SAFETY: `dst` is a fresh writable mapping of `size` bytes, disjoint from `data`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.at(0), size) };
    let memcpy = start.elapsed();
    Ok((gmem, memcpy))
}

/// Times of punching `mib` MiB of allocated pages out of a file.
#[derive(Clone, Copy, Debug)]
pub struct PunchTimes {
    /// A GUEST-sealed gmem file bound to an owner, with invalidation.
    pub gmem: Duration,
    /// A plain memfd: `fallocate(PUNCH_HOLE)` and nothing else.
    pub memfd: Duration,
    /// A plain memfd whose pages are mapped once (as guest RAM always is,
    /// in KVM's window; gmem's pages are also always mapped, in the locked
    /// frame window): the kernel unmaps each page too.
    pub mapped_memfd: Duration,
    /// The kernel's guest_memfd, where KVM has it.
    pub guest_memfd: Option<Duration>,
    /// [`PrivateMemory::punch`](gmem_kvm::PrivateMemory::punch) of a native
    /// region (guest_memfd under gmem's states, listeners told), where the
    /// native backend runs.
    pub native: Option<Duration>,
}

/// An owner that only counts invalidated pages.
#[derive(Default)]
struct Counter(std::sync::atomic::AtomicU64);

impl gmem::GuestOwner for Counter {
    fn invalidate_page_range(&self, _file: gmem::FileId, pages: gmem::PageRange) {
        self.0.fetch_add(pages.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Punches `mib` MiB of allocated pages from a gmem file (its owner told
/// about every page), a plain memfd and, where KVM has one, a guest_memfd.
pub fn punch(mib: u64) -> Result<PunchTimes> {
    use gmem::{Fallocate, FileOffset, PageIndex, PageRange, PrivateMemFile};
    use rustix::fs::FallocateFlags;
    let len = mib << 20;
    let punch_flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    let timed = |punch: &dyn Fn() -> Result<()>| -> Result<Duration> {
        let start = Instant::now();
        punch()?;
        Ok(start.elapsed())
    };

    let file = std::sync::Arc::new(PrivateMemFile::new_guest("bench-punch")?);
    file.set_len(len)?;
    let owner = std::sync::Arc::new(Counter::default());
    let binding = file.bind(&owner)?;
    drop(binding.get_and_lock_range(PageRange::new(PageIndex(0), PageIndex(len / PAGE_SIZE)))?);
    let gmem = timed(&|| Ok(file.fallocate(Fallocate::PunchHole, FileOffset(0), len)?))?;
    let told = owner.0.load(std::sync::atomic::Ordering::Relaxed);
    if told != len / PAGE_SIZE {
        return Err(Error::Unsupported(format!("the owner was told of {told} pages, not all")));
    }

    let memfd = rustix::fs::memfd_create("bench-punch", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(Error::os("memfd_create"))?;
    rustix::fs::ftruncate(&memfd, len).map_err(Error::os("ftruncate"))?;
    rustix::fs::fallocate(&memfd, FallocateFlags::KEEP_SIZE, 0, len)
        .map_err(Error::os("fallocate"))?;
    let raw = timed(&|| {
        rustix::fs::fallocate(&memfd, punch_flags, 0, len).map_err(Error::os("fallocate"))
    })?;
    let mapped_memfd = {
        let size = usize::try_from(len).map_err(|_| Error::InvalidArgument("too large".into()))?;
        let map = Map::new(&memfd, size, rustix::mm::MapFlags::SHARED)
            .map_err(Error::os("mmap memfd"))?;
        // SAFETY: faults in (zero-filled) pages of the mapping made above,
        // mapped as gmem maps its pages (a read fault).
        unsafe {
            rustix::mm::madvise(map.at(0).cast(), size, rustix::mm::Advice::LinuxPopulateRead)
        }
        .map_err(Error::os("MADV_POPULATE_READ"))?;
        timed(&|| {
            rustix::fs::fallocate(&memfd, punch_flags, 0, len).map_err(Error::os("fallocate"))
        })?
    };

    let kvm = kvm_ioctls::Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
    let guest_memfd = if kvm.check_extension_raw(kvm_bindings::KVM_CAP_GUEST_MEMFD.into()) > 0 {
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        let native = gmem_kvm::native::GuestMemfd::create(&vm, len, 0)?;
        rustix::fs::fallocate(native.fd(), FallocateFlags::KEEP_SIZE, 0, len)
            .map_err(Error::os("fallocate guest_memfd"))?;
        Some(timed(&|| {
            rustix::fs::fallocate(native.fd(), punch_flags, 0, len)
                .map_err(Error::os("fallocate guest_memfd"))
        })?)
    } else {
        None
    };
    let native = match gmem_kvm::native::probe()?.usable() {
        Ok(()) => {
            let vm = Vm::with_native_ram(len + (2 << 20))?;
            vm.populate(Gpa(0), &vec![1u8; len as usize])?;
            Some(timed(&|| vm.punch(Gpa(0), len))?)
        }
        Err(_) => None,
    };
    Ok(PunchTimes { gmem, memfd: raw, mapped_memfd, guest_memfd, native })
}

/// The median of `samples` (which must not be empty).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Pages of shared memory the host-access rows read from.
const HOST_PAGES: u64 = 1024;

/// A VM whose first [`HOST_PAGES`] pages from 4 MiB are shared and
/// allocated, for the host-access rows (no vCPU runs).
fn shared_pages_vm() -> Result<Vm> {
    let (vm, _files) = Vm::with_ram(64 << 20)?;
    let len = HOST_PAGES * PAGE_SIZE;
    vm.memory().convert(Gpa(TOUCH_BASE), len, gmem_kvm::PageState::Shared)?;
    vm.memory().write(Gpa(TOUCH_BASE), &vec![1u8; len as usize])?;
    Ok(vm)
}

/// Bytes per second that `threads` host threads read from shared pages
/// with [`PrivateMemory::read`](gmem_kvm::PrivateMemory::read), 4 KiB at a
/// time, each its own pages, for `duration`.
pub fn host_read_rate(threads: usize, duration: Duration) -> Result<f64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let vm = shared_pages_vm()?;
    let bytes = AtomicU64::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for thread in 0..threads as u64 {
            let (vm, bytes, failed) = (&vm, &bytes, &failed);
            scope.spawn(move || {
                let mut buf = vec![0u8; PAGE_SIZE as usize];
                let start = Instant::now();
                let mut page = thread;
                while start.elapsed() < duration {
                    let gpa = Gpa(TOUCH_BASE + (page % HOST_PAGES) * PAGE_SIZE);
                    if let Err(e) = vm.memory().read(gpa, &mut buf) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return;
                    }
                    bytes.fetch_add(PAGE_SIZE, Ordering::Relaxed);
                    page += threads as u64;
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(bytes.into_inner() as f64 / duration.as_secs_f64()),
    }
}

/// 4 KiB conversions per second of one page (back and forth) for
/// `duration`, while `readers` device threads keep reading other shared
/// pages 4 KiB at a time, each read a view of its own through a
/// [`DeviceMemory`](gmem_kvm::DeviceMemory) handle.
pub fn conversion_rate(readers: usize, duration: Duration) -> Result<f64> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let vm = shared_pages_vm()?;
    let page = Gpa(TOUCH_BASE + HOST_PAGES * PAGE_SIZE);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for thread in 0..readers as u64 {
            let (device, stop) = (gmem_kvm::DeviceMemory::new(vm.memory()), &stop);
            scope.spawn(move || {
                use vm_memory::{Bytes, GuestAddressSpace};
                let mut buf = vec![0u8; PAGE_SIZE as usize];
                let mut at = thread;
                while !stop.load(Ordering::Relaxed) {
                    let gpa = vm_memory::GuestAddress(TOUCH_BASE + (at % HOST_PAGES) * PAGE_SIZE);
                    let _ = device.memory().read_slice(&mut buf, gpa);
                    at += readers as u64;
                }
            });
        }
        let start = Instant::now();
        let mut conversions = 0u64;
        let mut result = Ok(());
        while start.elapsed() < duration {
            let state = match conversions % 2 {
                0 => gmem_kvm::PageState::Shared,
                _ => gmem_kvm::PageState::Private,
            };
            if let Err(e) = vm.memory().convert(page, PAGE_SIZE, state) {
                result = Err(e);
                break;
            }
            conversions += 1;
        }
        stop.store(true, Ordering::Relaxed);
        result.map(|()| conversions as f64 / start.elapsed().as_secs_f64())
    })
}

/// Figures of snapshots of the `revisit` guest (one vCPU, `ram` bytes of
/// RAM, every page of its share touched when the snapshot is taken).
#[derive(Clone, Copy, Debug)]
pub struct SnapshotFigures {
    /// Saving the full snapshot (sealed, into a file), then `fsync`.
    pub save: Duration,
    /// A plain `write` of as many bytes into a file in the same
    /// directory, then `fsync`.
    pub plain_write: Duration,
    /// `save` without the `fsync`: into the page cache.
    pub save_cached: Duration,
    /// `plain_write` without the `fsync`.
    pub plain_write_cached: Duration,
    /// Bytes of the full snapshot.
    pub bytes: u64,
    /// From the restore call until the guest may run: lazily, eagerly.
    pub restore_lazy: Duration,
    /// See `restore_lazy`.
    pub restore_eager: Duration,
    /// From the restore call until the guest exits, after it revisited one
    /// page in ten: lazily, eagerly.
    pub run_lazy: Duration,
    /// See `run_lazy`.
    pub run_eager: Duration,
    /// Bytes of the diff on the full snapshot, after the guest rewrote
    /// one page in ten.
    pub diff_bytes: u64,
    /// Bytes the guest rewrote.
    pub changed_bytes: u64,
}

/// Measures [`SnapshotFigures`], with files in `dir` (removed after).
pub fn snapshots(revisit_guest: &[u8], ram: u64, dir: &std::path::Path) -> Result<SnapshotFigures> {
    let key = gmem_kvm::SnapshotKey::new([0x6b; 32]);
    let path = |name: &str| dir.join(format!("gmem-bench-{name}-{}", std::process::id()));
    let (full, plain, diff) = (path("full.snap"), path("plain"), path("diff.snap"));
    let result = (|| {
        let image = GuestImage::parse(revisit_guest, ram)?;
        let (vm, _files) = Vm::with_ram(ram)?;
        vm.load(&image, ram, 1)?;
        let pause_at = |stage| {
            move |vm: &Vm, at: u64| {
                if at == stage {
                    vm.pause();
                }
            }
        };
        let config = RunConfig { timeout: Some(Duration::from_secs(600)), ..RunConfig::new(1) };
        let paused = vm.run(&image, ram, &config, &pause_at(1))?;
        expect_paused(&paused)?;
        vm.memory().track_dirty_pages()?;
        let save = |to: &std::path::Path, diff: bool| -> Result<(Duration, Duration, u64)> {
            settle_page_cache();
            let start = Instant::now();
            let mut out = std::io::BufWriter::with_capacity(1 << 20, create(to)?);
            let info = vm.save_snapshot(&mut out, &key, diff)?;
            let file =
                out.into_inner().map_err(|e| Error::io("write the snapshot")(e.into_error()))?;
            let cached = start.elapsed();
            file.sync_all().map_err(Error::io("fsync the snapshot"))?;
            Ok((cached, start.elapsed(), info.bytes))
        };
        let (save_cached, save_time, bytes) = save(&full, false)?;
        let (plain_write_cached, plain_write) = write_plain(&plain, bytes)?;
        let paused = vm.resume(&config, &pause_at(2))?;
        expect_paused(&paused)?;
        let (_, _, diff_bytes) = save(&diff, true)?;
        // Its memory goes before the restores, which need as much again.
        drop(vm);
        // The guest rewrote the first tenth of its share (4 MiB up to its stack).
        let share = (ram - crate::boot::STACK_SIZE - TOUCH_BASE) / PAGE_SIZE;
        let changed_bytes = share.div_ceil(10) * PAGE_SIZE;
        let restore = |mode| -> Result<(Duration, Duration)> {
            let (vm, _files) = Vm::with_ram(ram)?;
            let start = Instant::now();
            let file = std::fs::File::open(&full).map_err(Error::io("open the snapshot"))?;
            vm.restore_snapshot(vec![gmem_kvm::SnapshotFile::open(file, &key)?], mode, false)?;
            let ready = start.elapsed();
            let report = vm.resume(&config, &|_, _| {})?;
            if report.outcome != Outcome::Exit(0) {
                return Err(Error::InvalidArgument(format!("revisit: {:?}", report.outcome)));
            }
            Ok((ready, start.elapsed()))
        };
        let (restore_lazy, run_lazy) = restore(gmem_kvm::RestoreMode::Lazy)?;
        let (restore_eager, run_eager) = restore(gmem_kvm::RestoreMode::Eager)?;
        Ok(SnapshotFigures {
            save: save_time,
            plain_write,
            save_cached,
            plain_write_cached,
            bytes,
            restore_lazy,
            restore_eager,
            run_lazy,
            run_eager,
            diff_bytes,
            changed_bytes,
        })
    })();
    for file in [&full, &plain, &diff] {
        let _ = std::fs::remove_file(file);
    }
    result
}

fn expect_paused(report: &crate::RunReport) -> Result<()> {
    match &report.outcome {
        Outcome::Paused => Ok(()),
        other => Err(Error::InvalidArgument(format!("the guest did not pause: {other:?}"))),
    }
}

fn create(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(Error::io("create a bench file"))
}

/// Writes back what the page cache holds dirty, so that each write
/// measured starts from the same state (a write into a cache full of dirty
/// pages is throttled to the disk's speed).
fn settle_page_cache() {
    rustix::fs::sync();
}

/// Writes `bytes` bytes (not zero: no file system keeps them sparse) to a
/// new file at `path`, 1 MiB at a time; how long it took, and how long
/// with the `fsync` after.
fn write_plain(path: &std::path::Path, bytes: u64) -> Result<(Duration, Duration)> {
    let chunk = vec![0x5au8; 1 << 20];
    settle_page_cache();
    let start = Instant::now();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, create(path)?);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        std::io::Write::write_all(&mut out, &chunk[..n]).map_err(Error::io("write"))?;
        left -= n as u64;
    }
    let file = out.into_inner().map_err(|e| Error::io("write")(e.into_error()))?;
    let cached = start.elapsed();
    file.sync_all().map_err(Error::io("fsync"))?;
    Ok((cached, start.elapsed()))
}

/// Snapshot bytes per byte allocated, for a guest that touched one page
/// per 64 KiB (the `sparse` guest, one vCPU, `ram` bytes of RAM): holes
/// stay holes.
pub fn sparse_snapshot_ratio(sparse_guest: &[u8], ram: u64) -> Result<f64> {
    let (vm, _files) = Vm::with_ram(ram)?;
    run_to_success(&vm, sparse_guest, ram, 1)?;
    let allocated = vm.memory().stats().allocated_pages * PAGE_SIZE;
    let key = gmem_kvm::SnapshotKey::new([0x6b; 32]);
    let info = vm.memory().save_snapshot(&mut std::io::sink(), &key, &[])?;
    Ok(info.bytes as f64 / allocated as f64)
}

/// One live migration of the `dirty` guest between two VMs of this
/// process over a Unix socket pair.
#[derive(Clone, Copy, Debug)]
pub struct MigrationFigures {
    /// What the source sent, and the pause and total times.
    pub info: gmem_kvm::MigrationInfo,
    /// Pages allocated at the source when it paused.
    pub allocated: u64,
    /// A plain copy of as many bytes over a Unix socket pair, from a
    /// buffer of that size into another, fresh (its pages allocated as
    /// they arrive, as a destination's are), by a writer and a reader thread.
    pub plain_copy: Duration,
    /// The same copy again, into the same buffer (its pages there).
    pub plain_copy_warm: Duration,
}

/// Migrates the `dirty` guest (one vCPU, `ram` bytes of RAM) as `mode`
/// says, from its sync stage 1. `paced`: the guest rewrites 1% of its
/// pages every 100 ms meanwhile; otherwise it waits at stage 1 until the
/// switch (nothing changes while memory moves). The destination runs it
/// to its first burst and, in post-copy, until every page arrived.
pub fn migration(
    dirty_guest: &[u8],
    ram: u64,
    mode: gmem_kvm::MigrationMode,
    paced: bool,
) -> Result<MigrationFigures> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let key = gmem_kvm::SnapshotKey::new([0x6d; 32]);
    let (here, there) = std::os::unix::net::UnixStream::pair().map_err(Error::io("socketpair"))?;
    let link = |s| crate::Link::unix(s).map_err(Error::io("socket timeouts"));
    let (out, into) = (link(here)?, link(there)?);
    let config = RunConfig { timeout: Some(Duration::from_secs(600)), ..RunConfig::new(1) };
    let image = GuestImage::parse(dirty_guest, ram)?;
    let (source, _files) = Vm::with_ram(ram)?;
    source.load(&image, ram, 1)?;
    let (start, started) = std::sync::mpsc::channel::<()>();
    let start = std::sync::Mutex::new(Some(start));
    let over = AtomicBool::new(false);
    let wait_while = |vm: &Vm, busy: &dyn Fn() -> bool| {
        while busy() && !vm.is_stopping() {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    std::thread::scope(|scope| {
        let destination = scope.spawn(|| -> Result<()> {
            let (input, output) = into.split();
            let incoming = gmem_kvm::IncomingMigration::accept(input, output, &key)?;
            let (vm, _files) = Vm::with_ram(ram)?;
            vm.receive_migration(incoming)?;
            let paused = vm.resume(&config, &|vm, at| {
                if at == 2 {
                    vm.pause();
                }
            })?;
            expect_paused(&paused)?;
            vm.take_incoming_pages().map_or(Ok(()), |pages| pages.wait())
        });
        let (vm, over, key) = (&source, &over, &key);
        let migrating = scope.spawn(move || {
            started.recv().ok()?;
            let sent = vm.migrate_to(out, key, mode);
            over.store(true, Ordering::SeqCst);
            Some(sent)
        });
        let report = source.run(&image, ram, &config, &|vm, at| {
            let first = start.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(first) = first.filter(|_| at == 1) {
                let _ = first.send(());
                if !paced {
                    wait_while(vm, &|| !over.load(Ordering::SeqCst));
                }
            } else if at == 2 && paced {
                let burst = Instant::now();
                wait_while(vm, &|| burst.elapsed() < Duration::from_millis(100));
            }
        });
        drop(start.lock().unwrap_or_else(|p| p.into_inner()).take());
        let sent = migrating.join().ok().flatten();
        let received = destination.join().unwrap_or_else(|_| {
            Err(Error::InvalidArgument("the destination thread panicked".into()))
        });
        expect_paused(&report?)?;
        let info = sent
            .ok_or_else(|| Error::InvalidArgument("the migration never started".into()))?
            .map_err(|e| e.error)?;
        received?;
        let allocated = source.memory().stats().allocated_pages;
        let (plain_copy, plain_copy_warm) = plain_socket_copy(info.bytes)?;
        Ok(MigrationFigures { info, allocated, plain_copy, plain_copy_warm })
    })
}

/// Copies `bytes` bytes over a Unix socket pair, from a buffer of that
/// size (touched first) into another, by a writer and a reader thread:
/// into fresh memory, then again into the same.
fn plain_socket_copy(bytes: u64) -> Result<(Duration, Duration)> {
    use std::io::{Read, Write};
    let from = vec![0x5au8; bytes as usize];
    let mut into = vec![0u8; bytes as usize];
    let mut copy = || -> Result<Duration> {
        let (mut writer, mut reader) =
            std::os::unix::net::UnixStream::pair().map_err(Error::io("socketpair"))?;
        let start = Instant::now();
        std::thread::scope(|scope| {
            let sending = scope.spawn(|| writer.write_all(&from));
            reader.read_exact(&mut into).map_err(Error::io("read the plain copy"))?;
            sending.join().unwrap_or(Ok(())).map_err(Error::io("write the plain copy"))
        })?;
        Ok(start.elapsed())
    };
    Ok((copy()?, copy()?))
}

//! `gmem stress`: a soak of gmem's invariants under a hostile guest and a
//! busy host at once.
//!
//! The `stress` guest (see its source) converts, writes and checks random
//! runs of its pages on every vCPU and makes invalid requests, failing on
//! anything it should not see. Meanwhile host threads read (through
//! [`PrivateMemory::read`] and the vm-memory view), write and punch the
//! guest's pages, and convert, write and read a range of their own, and
//! make invalid requests. The host checks that it never reads a token the
//! guest wrote into a private page, that every refusal has the errno it
//! must, and that its own conversions read zero. Before and after, the
//! process's descriptors, threads, mappings and locked memory are counted:
//! they must come back to where they were.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gmem_guest::stress_layout::{window, Rng, HOST, MAX_VCPUS, PRIVATE_MARK, STOP, WINDOW};
use gmem_kvm::{Errno, PageState, PrivateMemory};
use vm_memory::{Bytes, GuestAddress};

use crate::{Gpa, GuestImage, Outcome, RunConfig, Vm};

/// The host's own range: 64 pages only host threads convert.
const HOST_RANGE: u64 = window(MAX_VCPUS);
const HOST_PAGES: u64 = 64;
/// Guest RAM: room for the windows, the host range and 64 vCPU stacks.
pub const RAM: u64 = gmem_guest::stress_layout::RAM;

/// What to run.
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// How long the guest and host threads run.
    pub duration: Duration,
    /// Guest vCPUs (1-64).
    pub vcpus: u32,
    /// Host threads.
    pub host_threads: u32,
    /// Run on the native backend (the kernel's guest_memfd) instead of
    /// gmem's user-space one.
    pub native: bool,
    /// Guest RAM on 2 MiB pages of this kind (user-space backend): the
    /// guest's conversions split them and background collapses make them
    /// huge again while host threads read and punch.
    pub huge: Option<gmem::HugePages>,
}

/// Counts of a stress run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StressReport {
    /// Guest operations, conversions, refused invalid requests and checks.
    pub guest: [u64; 4],
    /// Host reads through `PrivateMemory::read`, and through the view.
    pub host_reads: u64,
    /// Of those, through the vm-memory view.
    pub host_view_reads: u64,
    /// Host writes to guest pages.
    pub host_writes: u64,
    /// Host punches of guest pages.
    pub host_punches: u64,
    /// Host conversions of the host's own range.
    pub host_conversions: u64,
    /// Invalid host requests, all refused as they must be.
    pub host_invalid: u64,
    /// Host accesses refused because the page was private (EPERM) or being
    /// changed (EAGAIN).
    pub denials: u64,
    /// What went wrong; empty when every invariant held.
    pub violations: Vec<String>,
    /// Split 2 MiB pages made huge again (on huge pages).
    pub collapses: u64,
}

/// Counts of the process's resources: descriptors, threads, mappings of
/// memfds and KVM objects (the allocator's own arenas, kept for reuse after
/// threads end, are not gmem's), locked memory (`VmLck`, KiB).
fn resources() -> [u64; 4] {
    let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count() as u64);
    let maps = std::fs::read_to_string("/proc/self/maps").map_or(0, |m| {
        m.lines().filter(|l| l.contains("/memfd:") || l.contains("anon_inode:")).count() as u64
    });
    let locked = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find_map(|l| l.strip_prefix("VmLck:"))?.to_owned();
            line.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or(0);
    [count("/proc/self/fd"), count("/proc/self/task"), maps, locked]
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    view_reads: AtomicU64,
    writes: AtomicU64,
    punches: AtomicU64,
    conversions: AtomicU64,
    invalid: AtomicU64,
    denials: AtomicU64,
}

/// The host side: threads that work on the guest's memory until `stop`.
struct Host<'a> {
    memory: &'a Arc<PrivateMemory>,
    vcpus: u32,
    stop: &'a AtomicBool,
    counters: Counters,
    violations: Mutex<Vec<String>>,
}

impl Host<'_> {
    fn violation(&self, what: String) {
        let mut violations = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        if violations.len() < 20 {
            violations.push(what);
        }
    }

    /// A refusal must be a denial (EPERM: private; EAGAIN: being changed).
    fn refused(&self, op: &str, gpa: u64, errno: Errno) {
        if errno == Errno::PERM || errno == Errno::AGAIN {
            self.counters.denials.fetch_add(1, Ordering::Relaxed);
        } else {
            self.violation(format!("host {op} at {gpa:#x}: unexpected {errno}"));
        }
    }

    fn read_checked(&self, value: u64, gpa: u64) {
        if value >> 48 == PRIVATE_MARK {
            self.violation(format!("the host read private content {value:#x} at {gpa:#x}"));
        }
    }

    /// One host thread: random operations on random guest pages; thread 0
    /// also owns the host range.
    fn work(&self, index: u32) {
        let mut rng = Rng(0xd1b5_4a32_d192_ed03 ^ u64::from(index + 1).wrapping_mul(0x9e37_79b9));
        let window_pages = u64::from(self.vcpus) * WINDOW;
        let mut host_shared = [false; HOST_PAGES as usize];
        while !self.stop.load(Ordering::Relaxed) {
            let r = rng.next_word();
            let (vcpu, slot) = ((r % window_pages) / WINDOW, r % WINDOW);
            let page = window(vcpu) + slot * 4096;
            match (r >> 32) % 8 {
                0 | 1 => {
                    let mut buf = [0u8; 8];
                    match self.memory.read(Gpa(page), &mut buf) {
                        Ok(()) => self.read_checked(u64::from_le_bytes(buf), page),
                        Err(e) => self.refused("read", page, e.errno()),
                    }
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                }
                2 => {
                    match self.memory.shared().read_obj::<u64>(GuestAddress(page)) {
                        Ok(value) => self.read_checked(value, page),
                        Err(vm_memory::GuestMemoryError::IOError(e)) => {
                            let errno = e.raw_os_error().map(Errno::from_raw_os_error);
                            let errno = errno.or_else(|| {
                                e.get_ref()?.downcast_ref::<gmem_kvm::Error>().map(|e| e.errno())
                            });
                            self.refused("view read", page, errno.unwrap_or(Errno::IO));
                        }
                        Err(e) => self.violation(format!("host view read at {page:#x}: {e}")),
                    }
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    self.counters.view_reads.fetch_add(1, Ordering::Relaxed);
                }
                3 | 4 => {
                    if let Err(e) = self.memory.write(Gpa(page), &HOST.to_le_bytes()) {
                        self.refused("write", page, e.errno());
                    }
                    self.counters.writes.fetch_add(1, Ordering::Relaxed);
                }
                5 => {
                    let pages = 1 + (r >> 8) % 4;
                    let len = pages.min(WINDOW - slot) * 4096;
                    if let Err(e) = self.memory.punch(Gpa(page), len) {
                        self.violation(format!("host punch at {page:#x}+{len:#x}: {e}"));
                    }
                    self.counters.punches.fetch_add(1, Ordering::Relaxed);
                }
                6 if index == 0 => self.host_range(&mut rng, &mut host_shared),
                _ => self.invalid(r),
            }
        }
    }

    /// Converts a page of the host's own range and checks what it reads:
    /// zero after a conversion to shared, its own bytes after a write,
    /// EPERM once private again.
    fn host_range(&self, rng: &mut Rng, shared: &mut [bool; HOST_PAGES as usize]) {
        let index = (rng.next_word() % HOST_PAGES) as usize;
        let gpa = HOST_RANGE + index as u64 * 4096;
        let state = if shared[index] { PageState::Private } else { PageState::Shared };
        if let Err(e) = self.memory.convert(Gpa(gpa), 4096, state) {
            return self.violation(format!("host conversion at {gpa:#x}: {e}"));
        }
        self.counters.conversions.fetch_add(1, Ordering::Relaxed);
        shared[index] = !shared[index];
        let mut buf = [0xffu8; 8];
        match (shared[index], self.memory.read(Gpa(gpa), &mut buf)) {
            (true, Ok(())) if buf == [0; 8] => {
                let mark = (gpa ^ HOST).to_le_bytes();
                let wrote = self.memory.write(Gpa(gpa), &mark);
                let back = self.memory.read(Gpa(gpa), &mut buf);
                if wrote.is_err() || back.is_err() || buf != mark {
                    self.violation(format!("host range {gpa:#x}: its own write did not read back"));
                }
            }
            (false, Err(e)) if e.errno() == Errno::PERM => {}
            (state, result) => self.violation(format!(
                "host range {gpa:#x} after converting (shared: {state}): read {result:?}, {buf:?}"
            )),
        }
    }

    /// An invalid request of a random kind; each must be refused with EINVAL.
    fn invalid(&self, r: u64) {
        let result = match (r >> 8) % 4 {
            0 => self.memory.convert(Gpa(HOST_RANGE + 8), 4096, PageState::Shared).map(drop),
            1 => self.memory.convert(Gpa(RAM), 4096, PageState::Private).map(drop),
            2 => self.memory.read(Gpa(u64::MAX - 3), &mut [0; 8]),
            _ => self.memory.punch(Gpa(window(0) + 1), 4096),
        };
        match result {
            Err(e) if e.errno() == Errno::INVAL => {}
            other => self.violation(format!("an invalid host request was answered {other:?}")),
        }
        self.counters.invalid.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the `stress` guest (`guest`, the ELF image) per `config`.
pub fn run(guest: &[u8], config: &StressConfig) -> gmem_kvm::Result<StressReport> {
    if config.vcpus == 0 || config.vcpus > 64 {
        return Err(gmem_kvm::Error::InvalidArgument(format!(
            "{} vCPUs: stress runs 1 to 64",
            config.vcpus
        )));
    }
    let before = resources();
    let mut report = stress_vm(guest, config)?;
    // KVM tears a VM down asynchronously (its NX-huge-page recovery thread
    // is a thread of this process and leaves after the VM's last fd): wait
    // up to 10 s for the counts to come back.
    let mut after = resources();
    let deadline = Instant::now() + Duration::from_secs(10);
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        after = resources();
    }
    for (name, (b, a)) in ["descriptors", "threads", "memfd and KVM mappings", "locked KiB"]
        .iter()
        .zip(before.iter().zip(&after))
    {
        if b != a {
            report.violations.push(format!("{name}: {b} before the run, {a} after"));
        }
    }
    Ok(report)
}

fn stress_vm(guest: &[u8], config: &StressConfig) -> gmem_kvm::Result<StressReport> {
    let vm = if config.native {
        Vm::with_native_ram(RAM)?
    } else {
        let vm = Vm::new()?;
        vm.add_ram_on(RAM, config.huge.as_ref())?;
        vm
    };
    let image = GuestImage::parse(guest, RAM)?;
    vm.load(&image, RAM, config.vcpus)?;
    let stop = AtomicBool::new(false);
    let host = Host {
        memory: vm.memory(),
        vcpus: config.vcpus,
        stop: &stop,
        counters: Counters::default(),
        violations: Mutex::new(Vec::new()),
    };
    let run_config = RunConfig {
        timeout: Some(config.duration + Duration::from_secs(60)),
        ..RunConfig::new(config.vcpus)
    };
    let outcome = std::thread::scope(|scope| {
        let guest_run = scope.spawn(|| vm.run(&image, RAM, &run_config, &|_, _| {}));
        for index in 0..config.host_threads {
            let host = &host;
            scope.spawn(move || host.work(index));
        }
        let end = Instant::now() + config.duration;
        while Instant::now() < end && !guest_run.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        // The guest shares its stop page first thing: retry until it has.
        while !guest_run.is_finished() && vm.memory().write(Gpa(STOP), &1u64.to_le_bytes()).is_err()
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        guest_run.join().unwrap_or_else(|_| Err(gmem_kvm::Error::Unsupported("panicked".into())))
    })?;
    let mut report = StressReport {
        host_reads: host.counters.reads.load(Ordering::Relaxed),
        host_view_reads: host.counters.view_reads.load(Ordering::Relaxed),
        host_writes: host.counters.writes.load(Ordering::Relaxed),
        host_punches: host.counters.punches.load(Ordering::Relaxed),
        host_conversions: host.counters.conversions.load(Ordering::Relaxed),
        host_invalid: host.counters.invalid.load(Ordering::Relaxed),
        denials: host.counters.denials.load(Ordering::Relaxed),
        violations: host.violations.into_inner().unwrap_or_else(|p| p.into_inner()),
        collapses: vm.memory().stats().collapses,
        ..StressReport::default()
    };
    let console = String::from_utf8_lossy(&outcome.console).into_owned();
    match outcome.outcome {
        Outcome::Exit(0) => {
            for vcpu in 0..u64::from(config.vcpus) {
                let mut counts = [0u8; 32];
                vm.memory().read(Gpa(STOP + 64 + 32 * vcpu), &mut counts)?;
                for (total, word) in report.guest.iter_mut().zip(counts.chunks_exact(8)) {
                    *total += u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
                }
            }
        }
        other => {
            report.violations.push(format!("the guest ended with {other:?}: {}", console.trim()))
        }
    }
    Ok(report)
}

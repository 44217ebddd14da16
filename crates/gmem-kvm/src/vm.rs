//! A KVM VM whose RAM is served from private-memory files, its vCPUs (one
//! thread each) and the run loop of GUEST_ABI v1.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gmem::{Fallocate, FileOffset, PageRange, PrivateMemFile, PAGE_SIZE};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};

use crate::boot::{self, GuestImage, BOOT_INFO, STACK_SIZE};
use crate::error::{Errno, Error, Result};
use crate::memory::{GuestMemory, MemoryStats, DEFAULT_FAULT_AROUND_PAGES};
use crate::Gpa;

/// Ports of GUEST_ABI v1.
pub mod ports {
    /// Console: one byte of output.
    pub const CONSOLE: u16 = 0xE9;
    /// Conversion request.
    pub const CONVERT: u16 = 0xF0;
    /// Exit with a code.
    pub const EXIT: u16 = 0xF4;
    /// Sync point.
    pub const SYNC: u16 = 0xF8;
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote its exit code to port 0xF4.
    Exit(u32),
    /// The timeout passed first.
    Timeout,
    /// The VM stopped on an error (unknown port, triple fault, ...).
    Error(String),
}

/// What [`Vm::run`] needs besides the VM.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Number of vCPUs, each on its own thread.
    pub vcpus: u32,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
    /// Echo console output to stderr as it comes.
    pub echo_console: bool,
    /// Take KVM_HC_MAP_GPA_RANGE hypercalls as conversion requests
    /// (KVM_CAP_EXIT_HYPERCALL). Off by default: on kvm_pvm hosts a
    /// `vmcall` hangs the vCPU, with or without it.
    pub hypercall_exits: bool,
}

impl RunConfig {
    /// `vcpus` vCPUs, no timeout, no echo, no hypercall exits.
    pub fn new(vcpus: u32) -> Self {
        Self { vcpus, timeout: None, echo_console: false, hypercall_exits: false }
    }
}

/// `KVM_HC_MAP_GPA_RANGE`: the hypercall number of a conversion request.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// All console output.
    pub console: Vec<u8>,
}

/// Counters of a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Guest memory counters (faults, pages served, invalidations,
    /// conversions, host denials).
    pub memory: MemoryStats,
    /// Conversion requests the guest made (port 0xF0), refused ones too.
    pub conversion_requests: u64,
}

/// The host's answer to a sync point (port 0xF8): it runs while the
/// vCPU that reached it waits. Other vCPUs keep running.
pub type SyncHandler<'a> = &'a (dyn Fn(&Vm, u64) + Sync);

/// Stop state shared by the vCPU threads, the fault thread and the watchdog.
#[derive(Default)]
struct Control {
    outcome: Mutex<Option<Outcome>>,
    changed: Condvar,
    stopping: AtomicBool,
}

impl Control {
    fn outcome(&self) -> MutexGuard<'_, Option<Outcome>> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the first outcome and asks every vCPU to stop.
    fn stop(&self, outcome: Outcome) {
        let mut current = self.outcome();
        if current.is_none() {
            *current = Some(outcome);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

/// The thread that serves userfaultfd faults for the VM's memory.
struct FaultServer {
    stop: std::os::fd::OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl FaultServer {
    fn start(memory: Arc<GuestMemory>, control: Arc<Control>) -> Result<Self> {
        let stop = eventfd(0, EventfdFlags::CLOEXEC).map_err(Error::os("eventfd"))?;
        let stop_seen = stop.try_clone().map_err(Error::io("dup eventfd"))?;
        let thread = std::thread::Builder::new()
            .name("gmem-faults".into())
            .spawn(move || Self::serve(&memory, &control, &stop_seen))
            .map_err(Error::io("spawn fault thread"))?;
        Ok(Self { stop, thread: Some(thread) })
    }

    fn serve(memory: &GuestMemory, control: &Control, stop: &std::os::fd::OwnedFd) {
        let mut faults = Vec::new();
        let uffd = memory.uffd().as_fd();
        loop {
            let mut fds = [PollFd::new(&uffd, PollFlags::IN), PollFd::new(stop, PollFlags::IN)];
            match poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(errno) => {
                    control.stop(Outcome::Error(format!("polling userfaultfd: {errno}")));
                    return;
                }
            }
            if !fds[1].revents().is_empty() {
                return;
            }
            if let Err(e) = memory.uffd().read_faults(&mut faults) {
                control.stop(Outcome::Error(format!("reading faults: {e}")));
                return;
            }
            for addr in faults.drain(..) {
                if let Err(e) = memory.serve(addr) {
                    control.stop(Outcome::Error(format!("serving a guest page fault: {e}")));
                    // Let the vCPU retry: it sees the stop and leaves.
                    let _ = memory.uffd().wake(addr & !(PAGE_SIZE - 1), PAGE_SIZE);
                }
            }
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A KVM VM with private memory served by gmem (the user-space backend).
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: Arc<GuestMemory>,
    control: Arc<Control>,
    _server: FaultServer,
    next_slot: AtomicU32,
    has_run: AtomicBool,
    conversion_requests: AtomicU64,
    sync_lock: Mutex<()>,
    /// Plain anonymous slots (benchmark baselines): GPA, size, host address.
    anonymous: Mutex<Vec<(Gpa, u64, usize)>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("slots", &self.memory.slots().len()).finish_non_exhaustive()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for &(_, size, addr) in self.anonymous.get_mut().unwrap_or_else(|p| p.into_inner()).iter() {
            // SAFETY: the mapping was made by add_anonymous_memory and only the
            // VM refers to it; unmapping memory of a live memslot is safe (KVM's
            // MMU notifier drops its mappings), and no vCPU runs any more.
            let _ = unsafe { rustix::mm::munmap(addr as *mut std::ffi::c_void, size as usize) };
        }
    }
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM with the default fault-around.
    pub fn new() -> Result<Self> {
        Self::with_fault_around(DEFAULT_FAULT_AROUND_PAGES)
    }

    /// Creates a VM that serves `pages` pages (a power of two) per fault.
    pub fn with_fault_around(pages: u64) -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        let memory = Arc::new(GuestMemory::new(pages)?);
        let control = Arc::new(Control::default());
        let server = FaultServer::start(memory.clone(), control.clone())?;
        static HANDLER: Once = Once::new();
        let mut registered = Ok(());
        HANDLER.call_once(|| {
            registered =
                vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(
                    |e| Error::Os { op: "sigaction", errno: Errno::from_raw_os_error(e.errno()) },
                );
        });
        registered?;
        Ok(Self {
            kvm,
            fd,
            memory,
            control,
            _server: server,
            next_slot: AtomicU32::new(0),
            has_run: AtomicBool::new(false),
            conversion_requests: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            anonymous: Mutex::new(Vec::new()),
        })
    }

    /// Creates a VM with `ram_size` bytes of RAM at GPA 0 in one new
    /// GUEST-sealed file, and returns the file too.
    pub fn with_ram(ram_size: u64) -> Result<(Self, Arc<PrivateMemFile>)> {
        let vm = Self::new()?;
        let file = vm.add_ram(ram_size)?;
        Ok((vm, file))
    }

    /// Adds `ram_size` bytes of RAM at GPA 0 from one new GUEST-sealed
    /// file, and returns the file.
    pub fn add_ram(&self, ram_size: u64) -> Result<Arc<PrivateMemFile>> {
        let file = Arc::new(PrivateMemFile::new_guest("gmem-guest-ram")?);
        file.set_len(ram_size)?;
        self.add_private_memory(Gpa(0), &file, FileOffset(0), ram_size)?;
        Ok(file)
    }

    /// Adds a private memslot: `size` bytes of `file` at `offset` appear at
    /// `gpa`. The VM becomes the file's owner. `EINVAL` for unaligned or
    /// empty ranges, ranges past the file's end or a file range bound twice
    /// (as guest_memfd), `EEXIST` for overlapping GPAs, `EPERM` for a file
    /// another VM owns.
    pub fn add_private_memory(
        &self,
        gpa: Gpa,
        file: &Arc<PrivateMemFile>,
        offset: FileOffset,
        size: u64,
    ) -> Result<u32> {
        let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let slot = GuestMemory::add_slot(&self.memory, id, gpa, file, offset, size)?;
        // The window is owned by the slot, which the VM's memory keeps for
        // as long as the VM exists.
        self.set_region(id, gpa, size, slot.window.as_ptr() as u64)?;
        Ok(id)
    }

    /// Adds plain anonymous memory at `gpa`: not private, not served by
    /// gmem; the baseline that benchmarks compare gmem against.
    pub fn add_anonymous_memory(&self, gpa: Gpa, size: u64) -> Result<u32> {
        let len =
            usize::try_from(size).map_err(|_| Error::InvalidArgument("size too large".into()))?;
        // SAFETY: a new private anonymous mapping at a kernel-chosen address.
        let addr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .map_err(Error::os("mmap anonymous"))?;
        let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
        // The mapping stays until the VM is dropped (see Drop).
        self.set_region(id, gpa, size, addr as u64)?;
        self.anonymous.lock().unwrap_or_else(|p| p.into_inner()).push((gpa, size, addr as usize));
        Ok(id)
    }

    /// Makes `[addr, addr + size)` of this process guest memory at `gpa`.
    /// Callers keep the mapping alive for as long as the VM exists.
    fn set_region(&self, slot: u32, gpa: Gpa, size: u64, addr: u64) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa.0,
            memory_size: size,
            userspace_addr: addr,
        };
        // SAFETY: `addr` is a live mapping of `size` bytes that the caller
        // keeps for the VM's lifetime (a slot's window or an anonymous slot).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))
    }

    /// The host address of `[gpa, gpa + len)` in an anonymous slot.
    fn anonymous_range(&self, gpa: Gpa, len: u64) -> Option<*mut u8> {
        let slots = self.anonymous.lock().unwrap_or_else(|p| p.into_inner());
        let (base, _, addr) =
            slots.iter().find(|(base, size, _)| gpa.0 >= base.0 && gpa.0 + len <= base.0 + size)?;
        Some((*addr as *mut u8).wrapping_add((gpa.0 - base.0) as usize))
    }

    fn host_range(&self, gpa: Gpa, len: u64) -> Result<(Arc<crate::memory::Slot>, FileOffset)> {
        let slot = self.memory.slot_holding(gpa, len)?;
        let offset = slot.offset_of(gpa);
        Ok((slot, offset))
    }

    /// Launch-time populate: copies `bytes` into private memory at `gpa`
    /// (the one host write a sealed file accepts, like guest_memfd's
    /// populate). `EPERM` once a vCPU has run.
    pub fn populate(&self, gpa: Gpa, bytes: &[u8]) -> Result<()> {
        if self.has_run.load(Ordering::SeqCst) {
            return Err(Error::NotPermitted("populate: the VM has already run".into()));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        if let Some(host) = self.anonymous_range(gpa, bytes.len() as u64) {
            // SAFETY: the range lies inside a live anonymous slot mapping
            // (checked by anonymous_range) and cannot overlap `bytes`.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), host, bytes.len()) };
            return Ok(());
        }
        let (slot, offset) = self.host_range(gpa, bytes.len() as u64)?;
        let pages = PageRange::covering(offset.0, bytes.len() as u64);
        let guard = slot.binding.get_and_lock_range(pages)?;
        guard.write(offset.0 - pages.start.offset().0, bytes)?;
        Ok(())
    }

    /// Loads `image` and the VMM region (page tables, GDT, boot info) for
    /// `vcpus` vCPUs into RAM `[0, ram_size)`.
    pub fn load(&self, image: &GuestImage, ram_size: u64, vcpus: u32) -> Result<()> {
        boot::check_machine(ram_size, vcpus)?;
        if !self.covers(ram_size) {
            return Err(Error::InvalidArgument(format!(
                "memslots do not cover RAM 0..{ram_size:#x}"
            )));
        }
        for (gpa, bytes) in boot::vmm_region(ram_size, vcpus) {
            self.populate(gpa, &bytes)?;
        }
        for segment in &image.segments {
            self.populate(segment.gpa, &segment.data)?;
        }
        Ok(())
    }

    fn covers(&self, ram_size: u64) -> bool {
        let slots = self.memory.slots();
        let anonymous = self.anonymous.lock().unwrap_or_else(|p| p.into_inner());
        let ranges = slots
            .iter()
            .map(|s| (s.gpa.0, s.size))
            .chain(anonymous.iter().map(|(g, size, _)| (g.0, *size)));
        let ranges: Vec<(u64, u64)> = ranges.collect();
        let mut at = 0;
        while at < ram_size {
            match ranges.iter().find(|(gpa, size)| at >= *gpa && at < gpa + size) {
                Some((gpa, size)) => at = gpa + size,
                None => return false,
            }
        }
        true
    }

    /// Discards `[gpa, gpa + len)` from its backing: a hole punch on the
    /// file, with invalidation. The guest reads zero there afterwards.
    pub fn punch(&self, gpa: Gpa, len: u64) -> Result<()> {
        let (slot, offset) = self.host_range(gpa, len)?;
        slot.binding.file().fallocate(Fallocate::PunchHole, offset, len)?;
        Ok(())
    }

    /// Converts `[gpa, gpa + size)` to shared (`attributes` 0) or private
    /// ([`ATTRIBUTE_PRIVATE`](crate::memory::ATTRIBUTE_PRIVATE)), as port
    /// 0xF0 does for the guest: whole or not at all, `EINVAL` for unaligned
    /// or empty ranges, ranges outside guest RAM and unknown attribute bits.
    /// Pages that change state read zero afterwards. Returns how many did.
    pub fn convert(&self, gpa: Gpa, size: u64, attributes: u64) -> Result<u64> {
        self.memory.convert(gpa, size, attributes)
    }

    /// Host read of guest memory (device emulation): the bytes of shared
    /// pages; `EPERM` naming the GPA if any page is private, `EINVAL` for a
    /// range outside one memslot.
    pub fn read_guest(&self, gpa: Gpa, buf: &mut [u8]) -> Result<()> {
        self.memory.host_access(gpa, buf.len() as u64, |host| {
            // SAFETY: `host` maps the `buf.len()` bytes at `gpa` in the host
            // view, locked and shared for the duration of this closure; `buf`
            // is a Rust slice outside every guest mapping.
            unsafe { std::ptr::copy_nonoverlapping(host, buf.as_mut_ptr(), buf.len()) }
        })
    }

    /// Host write of guest memory; allowed on shared pages only (`EPERM`
    /// naming the GPA of the first private page).
    pub fn write_guest(&self, gpa: Gpa, data: &[u8]) -> Result<()> {
        self.memory.host_access(gpa, data.len() as u64, |host| {
            // SAFETY: as in read_guest, with the copy going the other way.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) }
        })
    }

    /// The shared pages of guest memory as a vm-memory
    /// [`GuestMemoryBackend`](vm_memory::GuestMemoryBackend), for rust-vmm
    /// device crates. See [`SharedMemory`](crate::shared::SharedMemory).
    pub fn shared_memory(&self) -> crate::shared::SharedMemory {
        crate::shared::SharedMemory::new(&self.memory)
    }

    /// The VM's counters.
    pub fn stats(&self) -> VmStats {
        VmStats {
            memory: self.memory.stats(),
            conversion_requests: self.conversion_requests.load(Ordering::Relaxed),
        }
    }

    /// Runs `config.vcpus` vCPUs from `image`'s entry until the guest exits,
    /// the VM fails or the timeout passes. The image must have been loaded.
    /// A VM runs once (`EPERM` after).
    pub fn run(
        &self,
        image: &GuestImage,
        ram_size: u64,
        config: &RunConfig,
        on_sync: SyncHandler<'_>,
    ) -> Result<RunReport> {
        boot::check_machine(ram_size, config.vcpus)?;
        if self.has_run.load(Ordering::SeqCst) {
            return Err(Error::NotPermitted("a VM runs once; create a new one".into()));
        }
        if self.fd.check_extension_int(Cap::SyncRegs) & SyncReg::Register as i32 == 0 {
            return Err(Error::Unsupported("KVM lacks KVM_CAP_SYNC_REGS for registers".into()));
        }
        if config.hypercall_exits {
            self.enable_hypercall_exits()?;
        }
        let vcpus: Vec<VcpuFd> = (0..config.vcpus)
            .map(|i| {
                let vcpu =
                    self.fd.create_vcpu(u64::from(i)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
                self.setup_vcpu(&vcpu, image.entry, i, ram_size)?;
                Ok(vcpu)
            })
            .collect::<Result<_>>()?;
        self.has_run.store(true, Ordering::SeqCst);
        let console = Mutex::new(Vec::new());
        let running = AtomicU32::new(config.vcpus);
        let deadline = config.timeout.map(|t| Instant::now() + t);

        let threads_ids = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for (index, vcpu) in vcpus.into_iter().enumerate() {
                let (console, running, ids) = (&console, &running, &threads_ids);
                scope.spawn(move || {
                    // Registered before the first look at the stop flag, so
                    // that the kicks below cannot miss this thread.
                    // SAFETY: pthread_self has no preconditions.
                    ids.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(unsafe { libc::pthread_self() });
                    self.vcpu_loop(vcpu, index as u32, config.echo_console, console, on_sync);
                    if running.fetch_sub(1, Ordering::SeqCst) == 1 {
                        self.control
                            .stop(Outcome::Error("every vCPU halted without an exit".into()));
                    }
                });
            }
            self.watch(deadline);
            // Kick until every vCPU thread has left KVM_RUN (a kick that
            // lands just before a thread enters KVM_RUN is repeated).
            while running.load(Ordering::SeqCst) != 0 {
                for &id in threads_ids.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    // SAFETY: scoped threads are joined only when the scope
                    // ends, so their pthread ids stay valid here; the kick
                    // signal has a no-op handler installed.
                    unsafe { libc::pthread_kill(id, kick_signal()) };
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let outcome = self.control.outcome().clone().unwrap_or(Outcome::Error("stopped".into()));
        Ok(RunReport { outcome, console: console.into_inner().unwrap_or_else(|p| p.into_inner()) })
    }

    /// Asks KVM to exit to us on KVM_HC_MAP_GPA_RANGE; `EOPNOTSUPP` where
    /// the kernel cannot.
    fn enable_hypercall_exits(&self) -> Result<()> {
        let mask = 1u64 << KVM_HC_MAP_GPA_RANGE;
        let supported = self.fd.check_extension_int(Cap::ExitHypercall);
        if (supported as u64) & mask == 0 {
            return Err(Error::Unsupported(format!(
                "hypercall exits: KVM_CAP_EXIT_HYPERCALL offers {supported:#x}, without \
                 KVM_HC_MAP_GPA_RANGE"
            )));
        }
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXIT_HYPERCALL,
            ..Default::default()
        };
        cap.args[0] = mask;
        self.fd.enable_cap(&cap).map_err(Error::kvm("KVM_ENABLE_CAP(EXIT_HYPERCALL)"))
    }

    /// Carries out a guest's conversion request; RAX for the guest: 0 or
    /// a negative errno.
    fn guest_convert(&self, gpa: u64, size: Option<u64>, attributes: u64) -> u64 {
        self.conversion_requests.fetch_add(1, Ordering::Relaxed);
        let result = match size {
            Some(size) => self.memory.convert(Gpa(gpa), size, attributes),
            None => Err(Error::InvalidArgument("conversion: the page count overflows".into())),
        };
        match result {
            Ok(_) => 0,
            Err(e) => (-i64::from(e.errno().raw_os_error())) as u64,
        }
    }

    /// Waits until the VM stops or the deadline passes.
    fn watch(&self, deadline: Option<Instant>) {
        let mut outcome = self.control.outcome();
        while outcome.is_none() {
            match deadline {
                None => {
                    outcome = self.control.changed.wait(outcome).unwrap_or_else(|p| p.into_inner())
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        drop(outcome);
                        self.control.stop(Outcome::Timeout);
                        return;
                    }
                    outcome = self
                        .control
                        .changed
                        .wait_timeout(outcome, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    fn setup_vcpu(&self, vcpu: &VcpuFd, entry: u64, index: u32, ram_size: u64) -> Result<()> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let segment = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db,
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = segment(boot::CODE_SELECTOR, 0xb, 1, 0);
        let data = segment(boot::DATA_SELECTOR, 0x3, 0, 1);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = boot::GDT_BASE;
        sregs.gdt.limit = boot::GDT_LIMIT;
        sregs.cr3 = boot::PAGE_TABLE_ROOT;
        const CR0_PE: u64 = 1;
        const CR0_MP: u64 = 1 << 1;
        const CR0_ET: u64 = 1 << 4;
        const CR0_WP: u64 = 1 << 16;
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const CR4_OSFXSR: u64 = 1 << 9;
        const CR4_OSXMMEXCPT: u64 = 1 << 10;
        const EFER_LME: u64 = 1 << 8;
        const EFER_LMA: u64 = 1 << 10;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_WP | CR0_PG;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_LME | EFER_LMA;
        vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: entry,
            rsp: ram_size - u64::from(index) * STACK_SIZE,
            rdi: BOOT_INFO.0,
            rsi: u64::from(index),
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        Ok(())
    }

    fn vcpu_loop(
        &self,
        mut vcpu: VcpuFd,
        index: u32,
        echo: bool,
        console: &Mutex<Vec<u8>>,
        on_sync: SyncHandler<'_>,
    ) {
        let stop = |why: String| self.control.stop(Outcome::Error(format!("vCPU {index}: {why}")));
        // KVM copies the registers into kvm_run on every exit, and back in
        // when marked dirty: on kvm_pvm hosts a KVM_GET_REGS/KVM_SET_REGS
        // pair costs about as much as the exit itself.
        vcpu.set_sync_valid_reg(SyncReg::Register);
        while !self.control.stopping.load(Ordering::SeqCst) {
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => return stop(format!("KVM_RUN failed: {e}")),
            };
            // Port writes that need registers are handled after `exit`
            // (which borrows the vCPU) is gone.
            let port = match exit {
                VcpuExit::IoOut(ports::CONSOLE, data) => {
                    let mut out = console.lock().unwrap_or_else(|p| p.into_inner());
                    out.extend_from_slice(&data[..1]);
                    if echo {
                        use std::io::Write;
                        let _ = std::io::stderr().write_all(&data[..1]);
                    }
                    continue;
                }
                VcpuExit::IoOut(ports::EXIT, data) => {
                    let mut code = [0u8; 4];
                    code[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                    self.control.stop(Outcome::Exit(u32::from_le_bytes(code)));
                    return;
                }
                VcpuExit::IoOut(port @ (ports::SYNC | ports::CONVERT), _) => port,
                VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) => {
                    let rip = vcpu.sync_regs().regs.rip;
                    return stop(format!("access to unknown port {port:#x} at RIP {rip:#x}"));
                }
                // Only KVM_HC_MAP_GPA_RANGE exits are enabled.
                VcpuExit::Hypercall(call) => {
                    let [gpa, pages, attributes, ..] = call.args;
                    *call.ret = self.guest_convert(gpa, pages.checked_mul(PAGE_SIZE), attributes);
                    continue;
                }
                VcpuExit::Hlt => return,
                VcpuExit::Shutdown => return stop("triple fault (shutdown)".into()),
                VcpuExit::MmioRead(gpa, _) | VcpuExit::MmioWrite(gpa, _) => {
                    return stop(format!("access to GPA {gpa:#x} outside guest RAM"))
                }
                VcpuExit::InternalError => {
                    // SAFETY: KVM filled the `internal` member for this exit.
                    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = vcpu.sync_regs().regs.rip;
                    // Suberror 1 is an emulation failure; on kvm_pvm hosts any
                    // guest SSE instruction ends this way.
                    return stop(format!(
                        "KVM internal error (suberror {suberror}{}) at RIP {rip:#x}",
                        if suberror == 1 {
                            ": KVM could not emulate the instruction; kvm_pvm hosts cannot run guest SSE code"
                        } else {
                            ""
                        }
                    ));
                }
                VcpuExit::FailEntry(reason, _) => {
                    return stop(format!("VM entry failed ({reason:#x})"))
                }
                other => return stop(format!("unexpected exit {other:?}")),
            };
            let regs = vcpu.sync_regs().regs;
            let rax = match port {
                ports::SYNC => {
                    let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
                    on_sync(self, regs.rdi);
                    0
                }
                _ => self.guest_convert(regs.rdi, Some(regs.rsi), regs.rdx),
            };
            vcpu.sync_regs_mut().regs.rax = rax;
            vcpu.set_sync_dirty_reg(SyncReg::Register);
        }
    }
}

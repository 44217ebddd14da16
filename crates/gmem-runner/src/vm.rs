//! gmem's own GUEST_ABI VM: a KVM VM whose RAM is a [`PrivateMemory`] of
//! gmem-kvm, used through that library's public API only, like any VMM.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gmem::{FileOffset, PrivateMemFile};
use gmem_kvm::shared::SharedView;
use gmem_kvm::{
    ConversionRequest, Error, FaultServer, IncomingMigration, IncomingPages, MemoryStats,
    MigrationInfo, MigrationMode, PrivateMemory, RegionSpec, Result, SendError, SnapshotKey,
    DEFAULT_FAULT_AROUND_PAGES,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuFd, VmFd};

use crate::boot::{self, GuestImage};
use crate::kick::{self, Kicker};
use crate::map::Map;
use crate::snapshot::{VcpuState, VmState};
use crate::Gpa;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote its exit code to port 0xF4.
    Exit(u32),
    /// The timeout passed first.
    Timeout,
    /// The VM stopped on an error (unknown port, triple fault, ...).
    Error(String),
    /// The VM was paused ([`Vm::pause`]): its vCPUs' state is kept for
    /// [`Vm::save_snapshot`].
    Paused,
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
    /// Bytes of private memory mapped by 2 MiB entries in the KVM windows.
    pub huge_mapped_bytes: u64,
    /// KVM's mappings of guest memory by size (`pages_4k`, `pages_2m`,
    /// `pages_1g`), where KVM reports them.
    pub kvm_pages: Option<[u64; 3]>,
    /// Pages still to be fetched from the snapshot restored.
    pub pending_snapshot_pages: u64,
}

/// The most RAM one file backs. The kernel allocates a shmem file's pages
/// under locks of that file, so one file caps how fast many vCPUs can
/// first-touch memory: on a 16-core host, 16 processes populating one
/// memfd reach 3.4-4.3 GiB/s and populating 16 memfds 11-14 GiB/s; 16 vCPUs
/// first-touching 3 GiB of gmem memory got 1.0-1.3 GiB/s from one file and
/// 3.0-4.6 GiB/s from 256 MiB files.
pub const RAM_FILE_SIZE: u64 = 256 << 20;

/// The host's answer to a sync point (port 0xF8): it runs while the
/// vCPU that reached it waits. Other vCPUs keep running.
pub type SyncHandler<'a> = &'a (dyn Fn(&Vm, u64) + Sync);

/// Stop state shared by the vCPU threads, the fault thread and the watchdog.
#[derive(Default)]
pub(crate) struct Control {
    outcome: Mutex<Option<Outcome>>,
    changed: Condvar,
    pub(crate) stopping: AtomicBool,
}

impl Control {
    fn outcome(&self) -> MutexGuard<'_, Option<Outcome>> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the outcome of a paused run, to go on with it.
    fn reset(&self) {
        *self.outcome() = None;
        self.stopping.store(false, Ordering::SeqCst);
    }

    /// Records the first outcome and asks every vCPU to stop.
    pub(crate) fn stop(&self, outcome: Outcome) {
        let mut current = self.outcome();
        if current.is_none() {
            *current = Some(outcome);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for `done` to hold; callers make it hold only
    /// together with a [`stop`](Self::stop), which wakes this wait.
    fn wait_until(&self, timeout: Duration, done: impl Fn() -> bool) {
        let outcome = self.outcome();
        if !done() {
            drop(self.changed.wait_timeout(outcome, timeout));
        }
    }

    /// Waits up to `timeout` for an outcome to be recorded.
    pub(crate) fn wait_for_outcome(&self, timeout: Duration) {
        let outcome = self.outcome();
        if outcome.is_none() {
            drop(self.changed.wait_timeout(outcome, timeout));
        }
    }

    /// Waits until the VM stops or the deadline passes.
    fn watch(&self, deadline: Option<Instant>) {
        let mut outcome = self.outcome();
        while outcome.is_none() {
            let wait = match deadline {
                None => Duration::from_secs(3600),
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => {
                        drop(outcome);
                        return self.stop(Outcome::Timeout);
                    }
                },
            };
            outcome = self.changed.wait_timeout(outcome, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Whether `KVM_HC_MAP_GPA_RANGE` hypercall exits really reach user space
/// here: the capability may say yes while a guest's `vmcall` never exits
/// (kvm_pvm hosts). Runs the built-in `hypercall` guest with hypercall
/// exits for at most half a second; `Err` says why they cannot be used.
pub fn probe_hypercall_exits() -> Result<std::result::Result<(), String>> {
    let wait = Duration::from_millis(500);
    const RAM: u64 = 16 << 20;
    let guest = gmem_guest::guest("hypercall").expect("the hypercall guest is built in");
    let image = GuestImage::parse(guest, RAM)?;
    let (vm, _files) = Vm::with_ram(RAM)?;
    vm.load(&image, RAM, 1)?;
    let config = RunConfig { timeout: Some(wait), hypercall_exits: true, ..RunConfig::new(1) };
    let report = match vm.run(&image, RAM, &config, &|_, _| {}) {
        Ok(report) => report,
        Err(e) if e.errno() == gmem_kvm::Errno::OPNOTSUPP => return Ok(Err(e.to_string())),
        Err(e) => return Err(e),
    };
    Ok(match report.outcome {
        Outcome::Exit(0) => Ok(()),
        Outcome::Timeout => Err(format!(
            "KVM offers them, but a guest's vmcall got no exit in {} ms (it hangs the vCPU)",
            wait.as_millis()
        )),
        other => Err(format!("a hypercall guest ended with {other:?}")),
    })
}

/// Plain anonymous memory at a GPA (benchmark baselines), unmapped on drop.
struct AnonymousSlot {
    slot: u32,
    gpa: Gpa,
    size: u64,
    map: Map,
}

/// A KVM VM with private memory served by gmem (the user-space backend).
pub struct Vm {
    kvm: Kvm,
    /// Shared with `memory`, which deletes its memslots before it lets go.
    pub(crate) fd: Arc<VmFd>,
    memory: Arc<PrivateMemory>,
    pub(crate) control: Arc<Control>,
    _server: FaultServer,
    next_slot: AtomicU32,
    has_run: AtomicBool,
    pub(crate) conversion_requests: AtomicU64,
    pub(crate) sync_lock: Mutex<()>,
    anonymous: Mutex<Vec<AnonymousSlot>>,
    /// virtio-mmio devices, device n at `gmem_virtio::device_gpa(n)`.
    devices: Mutex<Vec<Arc<Mutex<Disk>>>>,
    /// The state a paused run left, to save; or a restored one, to resume.
    saved: Mutex<Option<VmState>>,
    /// A paused run's vCPUs, to go on with ([`Vm::resume`]).
    parked: Mutex<Vec<VcpuFd>>,
    /// Whether vCPUs run (a migration's pause waits for them to stop).
    running: AtomicBool,
    /// A migration received up to its switch, told at resume that the VM runs.
    incoming: Mutex<Option<IncomingMigration>>,
    /// The pages of a post-copy migration still coming in.
    incoming_pages: Mutex<Option<IncomingPages>>,
}

/// A virtio-blk disk behind the virtio-mmio transport.
pub type Disk = gmem_virtio::mmio::VirtioMmio<gmem_virtio::blk::Block>;

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("memory", &self.memory).finish_non_exhaustive()
    }
}

impl Drop for Vm {
    /// Deletes the plain memslots before their maps go (the VmFd may live
    /// on in the memory, which deletes its own).
    fn drop(&mut self) {
        for slot in self.anonymous.get_mut().unwrap_or_else(|p| p.into_inner()).iter() {
            let delete = kvm_userspace_memory_region {
                slot: slot.slot,
                flags: 0,
                guest_phys_addr: slot.gpa.0,
                memory_size: 0,
                userspace_addr: 0,
            };
            // SAFETY: deleting a memslot maps nothing; KVM stops using the map.
            let _ = unsafe { self.fd.set_user_memory_region(delete) };
        }
    }
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM with the default fault-around.
    pub fn new() -> Result<Self> {
        Self::with_fault_around(DEFAULT_FAULT_AROUND_PAGES)
    }

    /// Creates a VM that serves `pages` pages (a power of two up to 512)
    /// per fault.
    pub fn with_fault_around(pages: u64) -> Result<Self> {
        let memory = PrivateMemory::new(pages)?;
        let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
        let fd = Arc::new(kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?);
        let control = Arc::new(Control::default());
        let on_error = control.clone();
        // One fault thread per core (at most 16): many vCPUs' first
        // touches are served in parallel.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(16));
        let server = memory
            .start_fault_servers(threads, move |e| on_error.stop(Outcome::Error(e.to_string())))?;
        kick::install_handler()?;
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
            devices: Mutex::new(Vec::new()),
            saved: Mutex::new(None),
            parked: Mutex::new(Vec::new()),
            running: AtomicBool::new(false),
            incoming: Mutex::new(None),
            incoming_pages: Mutex::new(None),
        })
    }

    /// Creates a VM with `ram_size` bytes of RAM laid out per GUEST_ABI 1.1
    /// in new GUEST-sealed files (see [`add_ram`](Self::add_ram)), and
    /// returns the files too, in GPA order.
    pub fn with_ram(ram_size: u64) -> Result<(Self, Vec<Arc<PrivateMemFile>>)> {
        let vm = Self::new()?;
        let files = vm.add_ram(ram_size)?;
        Ok((vm, files))
    }

    /// Adds `ram_size` bytes of RAM laid out per GUEST_ABI 1.1 (below 3 GiB,
    /// then from 4 GiB for the rest), in memslots of at most
    /// [`RAM_FILE_SIZE`] bytes, each a new GUEST-sealed file of its own;
    /// returns the files in GPA order.
    pub fn add_ram(&self, ram_size: u64) -> Result<Vec<Arc<PrivateMemFile>>> {
        self.add_ram_on(ram_size, None)
    }

    /// [`add_ram`](Self::add_ram), on 2 MiB pages of the kind `huge` says
    /// where it says one (see [`gmem_kvm::collapse`]).
    pub fn add_ram_on(
        &self,
        ram_size: u64,
        huge: Option<&gmem::HugePages>,
    ) -> Result<Vec<Arc<PrivateMemFile>>> {
        let mut files = Vec::new();
        for (gpa, size) in boot::ram_regions(ram_size) {
            let mut at = 0;
            while at < size {
                let len = RAM_FILE_SIZE.min(size - at);
                let name = "gmem-guest-ram";
                let file = Arc::new(match huge {
                    Some(huge) => PrivateMemFile::new_guest_huge(name, huge)?,
                    None => PrivateMemFile::new_guest(name)?,
                });
                file.set_len(len)?;
                self.add_private_memory(Gpa(gpa.0 + at), &file, FileOffset(0), len)?;
                files.push(file);
                at += len;
            }
        }
        Ok(files)
    }

    /// Creates a VM with `ram_size` bytes of RAM laid out per GUEST_ABI 1.1
    /// on the native backend: one guest_memfd per memslot
    /// ([`PrivateMemory::add_native_region`]).
    pub fn with_native_ram(ram_size: u64) -> Result<Self> {
        let vm = Self::new()?;
        for (gpa, size) in boot::ram_regions(ram_size) {
            let slot = vm.next_slot.fetch_add(1, Ordering::Relaxed);
            vm.memory.add_native_region(&vm.fd, slot, gpa, size)?;
        }
        Ok(vm)
    }

    /// Adds a private memslot: `size` bytes of `file` at `offset` appear at
    /// `gpa` (see [`PrivateMemory::add_region`] for the errors).
    pub fn add_private_memory(
        &self,
        gpa: Gpa,
        file: &Arc<PrivateMemFile>,
        offset: FileOffset,
        size: u64,
    ) -> Result<u32> {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let spec = RegionSpec { slot, gpa, file: file.clone(), file_offset: offset, size };
        self.memory.add_region(&self.fd, spec)?;
        Ok(slot)
    }

    /// Deletes memslot `slot` ([`PrivateMemory::remove_region`]), even while
    /// vCPUs run: their next access there stops the VM with an error that
    /// names the GPA.
    pub fn remove_memory(&self, slot: u32) -> Result<()> {
        self.memory.remove_region(slot).map(drop)
    }

    /// Adds plain anonymous memory at `gpa`: not private, not served by
    /// gmem; the baseline that benchmarks compare gmem against.
    pub fn add_anonymous_memory(&self, gpa: Gpa, size: u64) -> Result<u32> {
        let len =
            usize::try_from(size).map_err(|_| Error::InvalidArgument("size too large".into()))?;
        self.add_plain_slot(gpa, size, Map::anonymous(len).map_err(Error::os("mmap anonymous"))?)
    }

    /// [`add_anonymous_memory`](Self::add_anonymous_memory) with
    /// transparent huge pages (`MADV_HUGEPAGE`): the baseline of guests
    /// on huge pages.
    pub fn add_anonymous_memory_huge(&self, gpa: Gpa, size: u64) -> Result<u32> {
        let len =
            usize::try_from(size).map_err(|_| Error::InvalidArgument("size too large".into()))?;
        let map = Map::anonymous(len).map_err(Error::os("mmap anonymous"))?;
        map.advise_huge().map_err(Error::os("MADV_HUGEPAGE"))?;
        self.add_plain_slot(gpa, size, map)
    }

    /// Adds a plain memfd at `gpa`, mapped shared: not private, not served
    /// by gmem, every page allocated by the kernel's shmem fault. The floor
    /// of any memory a memfd backs (a benchmark baseline).
    pub fn add_memfd_memory(&self, gpa: Gpa, size: u64) -> Result<u32> {
        let len =
            usize::try_from(size).map_err(|_| Error::InvalidArgument("size too large".into()))?;
        let memfd = rustix::fs::memfd_create("gmem-baseline", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(Error::os("memfd_create"))?;
        rustix::fs::ftruncate(&memfd, size).map_err(Error::os("ftruncate"))?;
        let map =
            Map::new(&memfd, len, rustix::mm::MapFlags::SHARED).map_err(Error::os("mmap memfd"))?;
        self.add_plain_slot(gpa, size, map)
    }

    /// Makes `map` (`size` bytes) the memslot at `gpa`.
    fn add_plain_slot(&self, gpa: Gpa, size: u64, map: Map) -> Result<u32> {
        let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let region = kvm_userspace_memory_region {
            slot: id,
            flags: 0,
            guest_phys_addr: gpa.0,
            memory_size: size,
            userspace_addr: map.at(0) as u64,
        };
        let slot = AnonymousSlot { slot: id, gpa, size, map };
        // Owned by the VM from here, which deletes the memslot on drop
        // before it unmaps it.
        self.anonymous.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
        // SAFETY: the slot's map is a live mapping of `size` bytes that the
        // VM keeps until it has deleted the memslot (on drop).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(id)
    }

    /// Attaches a virtio-blk disk backed by `path` (created with `size`
    /// bytes if missing) as the next virtio-mmio device (GUEST_ABI 1.1: in
    /// the gap, listed in the boot info). Before [`load`](Self::load).
    pub fn attach_disk(&self, path: &std::path::Path, size: u64) -> Result<Arc<Mutex<Disk>>> {
        let block =
            gmem_virtio::blk::Block::open(path, size).map_err(|e| match e.raw_os_error() {
                Some(_) => Error::io("open the disk")(e),
                None => Error::InvalidArgument(format!("the disk: {e}")),
            })?;
        let disk = Arc::new(Mutex::new(gmem_virtio::mmio::VirtioMmio::new(block)));
        self.devices.lock().unwrap_or_else(|p| p.into_inner()).push(disk.clone());
        Ok(disk)
    }

    /// The device whose register window holds `gpa`, and the offset in it.
    pub(crate) fn device_at(&self, gpa: u64) -> Option<(Arc<Mutex<Disk>>, u64)> {
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        devices.iter().enumerate().find_map(|(n, disk)| {
            let base = gmem_virtio::device_gpa(n as u32);
            (gpa >= base && gpa < base + gmem_virtio::WINDOW).then(|| (disk.clone(), gpa - base))
        })
    }

    /// The guest memory, for everything gmem-kvm offers (conversions,
    /// host access, listeners, stats).
    pub fn memory(&self) -> &Arc<PrivateMemory> {
        &self.memory
    }

    /// Launch-time populate of private memory (or of an anonymous slot).
    pub fn populate(&self, gpa: Gpa, bytes: &[u8]) -> Result<()> {
        let anonymous = self.anonymous.lock().unwrap_or_else(|p| p.into_inner());
        let end = gpa.0.saturating_add(bytes.len() as u64);
        if let Some(slot) = anonymous.iter().find(|s| gpa.0 >= s.gpa.0 && end <= s.gpa.0 + s.size) {
            let host = slot.map.at((gpa.0 - slot.gpa.0) as usize);
            // SAFETY: the range lies inside a live anonymous slot mapping
            // (checked above), which no Rust reference points into, and
            // cannot overlap `bytes`; no vCPU runs before launch.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), host, bytes.len()) };
            return Ok(());
        }
        self.memory.populate(gpa, bytes)
    }

    /// Loads `image` and the VMM region (page tables, GDT, boot info) for
    /// `vcpus` vCPUs into RAM of `ram_size` bytes (GUEST_ABI 1.1 layout).
    pub fn load(&self, image: &GuestImage, ram_size: u64, vcpus: u32) -> Result<()> {
        boot::check_machine(ram_size, vcpus)?;
        if !self.covers(ram_size) {
            return Err(Error::InvalidArgument(format!(
                "memslots do not cover the RAM of {ram_size:#x} bytes"
            )));
        }
        use gmem_virtio::mmio::Device;
        let devices: Vec<(Gpa, u32)> = self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .map(|(n, disk)| {
                let id = disk.lock().unwrap_or_else(|p| p.into_inner()).device().device_id();
                (Gpa(gmem_virtio::device_gpa(n as u32)), id)
            })
            .collect();
        boot::load_with_devices(image, ram_size, vcpus, &devices, |gpa, bytes| {
            self.populate(gpa, bytes)
        })
    }

    fn covers(&self, ram_size: u64) -> bool {
        let anonymous = self.anonymous.lock().unwrap_or_else(|p| p.into_inner());
        boot::ram_regions(ram_size).iter().all(|(gpa, size)| {
            let mut at = gpa.0;
            while at < gpa.0 + size {
                let next = match self.memory.region_of(Gpa(at)) {
                    Some(region) => region.gpa().0 + region.size(),
                    None => match anonymous.iter().find(|s| at >= s.gpa.0 && at < s.gpa.0 + s.size)
                    {
                        Some(slot) => slot.gpa.0 + slot.size,
                        None => return false,
                    },
                };
                at = next;
            }
            true
        })
    }

    /// Discards `[gpa, gpa + len)` ([`PrivateMemory::punch`]).
    pub fn punch(&self, gpa: Gpa, len: u64) -> Result<()> {
        self.memory.punch(gpa, len)
    }

    /// Converts `[gpa, gpa + size)` as port 0xF0 does for the guest:
    /// `attributes` 0 is shared, `ATTRIBUTE_PRIVATE` private, anything else
    /// `EINVAL` (see [`PrivateMemory::convert`]). Returns how many pages
    /// changed state.
    pub fn convert(&self, gpa: Gpa, size: u64, attributes: u64) -> Result<u64> {
        let request = ConversionRequest::from_port(gpa.0, size, attributes)?;
        self.memory.convert(request.gpa, request.len, request.state)
    }

    /// Host read of shared guest memory ([`PrivateMemory::read`]).
    pub fn read_guest(&self, gpa: Gpa, buf: &mut [u8]) -> Result<()> {
        self.memory.read(gpa, buf)
    }

    /// Host write of shared guest memory ([`PrivateMemory::write`]).
    pub fn write_guest(&self, gpa: Gpa, data: &[u8]) -> Result<()> {
        self.memory.write(gpa, data)
    }

    /// The shared pages as a vm-memory view ([`PrivateMemory::shared`]).
    pub fn shared_memory(&self) -> SharedView {
        self.memory.shared()
    }

    /// KVM's statistics of this VM now (`pages_2m`: guest memory KVM maps
    /// with 2 MiB pages).
    pub fn kvm_statistics(&self) -> Result<gmem_kvm::VmStatistics> {
        gmem_kvm::VmStatistics::read(&self.fd)
    }

    /// The VM's counters.
    pub fn stats(&self) -> VmStats {
        let kvm = self.kvm_statistics().ok();
        let kvm_pages = kvm.and_then(|k| {
            Some([k.get("pages_4k")?, k.get("pages_2m")?, k.get("pages_1g").unwrap_or(0)])
        });
        VmStats {
            memory: self.memory.stats(),
            conversion_requests: self.conversion_requests.load(Ordering::Relaxed),
            huge_mapped_bytes: self.memory.huge_mapped_bytes().unwrap_or(0),
            kvm_pages,
            pending_snapshot_pages: self.memory.pending_snapshot_pages(),
        }
    }

    /// Starts fetching the restored snapshot's pages in the background
    /// ([`PrivateMemory::start_prefetch`]); a page that fails its check
    /// stops the VM with an error naming its GPA.
    pub fn start_prefetch(&self) -> Result<gmem_kvm::Prefetch> {
        let control = self.control.clone();
        self.memory.start_prefetch(move |e| control.stop(Outcome::Error(e.to_string())))
    }

    /// Runs `config.vcpus` vCPUs from `image`'s entry until the guest exits,
    /// the VM fails or the timeout passes. The image must have been loaded.
    /// A VM runs once (`EPERM` after). A panic in `on_sync` stops the VM
    /// with an error naming it.
    pub fn run(
        &self,
        image: &GuestImage,
        ram_size: u64,
        config: &RunConfig,
        on_sync: SyncHandler<'_>,
    ) -> Result<RunReport> {
        boot::check_machine(ram_size, config.vcpus)?;
        let vcpus = self.new_vcpus(config, |i, vcpu| {
            boot::init_vcpu(&self.kvm, vcpu, image.entry, i, ram_size)
        })?;
        self.run_vcpus(ram_size, config, on_sync, vcpus)
    }

    /// Goes on with a paused run ([`Outcome::Paused`]: its vCPUs where
    /// they stopped, after a snapshot was saved or failed to be), or with
    /// the guest of the snapshot restored
    /// ([`restore_snapshot`](Self::restore_snapshot)), as [`run`](Self::run)
    /// runs one. `EINVAL` with neither, or for another number of vCPUs than
    /// the snapshot had.
    pub fn resume(&self, config: &RunConfig, on_sync: SyncHandler<'_>) -> Result<RunReport> {
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|p| p.into_inner()));
        if !parked.is_empty() {
            let ram_size = self.saved().take().map_or(0, |s| s.ram_size);
            if parked.len() != config.vcpus as usize {
                return Err(Error::InvalidArgument(format!(
                    "the paused run has {} vCPU(s), not {}",
                    parked.len(),
                    config.vcpus
                )));
            }
            self.control.reset();
            return self.run_vcpus(ram_size, config, on_sync, parked);
        }
        let state = self.saved().take().ok_or_else(|| {
            Error::InvalidArgument("no paused run, and no snapshot was restored".into())
        })?;
        if state.vcpus() != config.vcpus {
            return Err(Error::SnapshotMismatch(format!(
                "the snapshot has {} vCPU(s), not {}",
                state.vcpus(),
                config.vcpus
            )));
        }
        let vcpus = boot::check_machine(state.ram_size, config.vcpus).and_then(|()| {
            let cpuid = self
                .kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
            self.new_vcpus(config, |i, vcpu| {
                vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
                state.vcpus[i as usize].apply(vcpu)
            })
        });
        let incoming = self.incoming.lock().unwrap_or_else(|p| p.into_inner()).take();
        let vcpus = match (vcpus, incoming) {
            (Err(e), Some(incoming)) => {
                incoming.refuse(&e);
                return Err(e);
            }
            (vcpus, None) => vcpus?,
            // The source hands the VM over now: it runs here from this on.
            (Ok(vcpus), Some(incoming)) => {
                let control = self.control.clone();
                let on_error = move |e: Error| control.stop(Outcome::Error(e.to_string()));
                let pages = incoming.start(&self.memory, on_error)?;
                *self.incoming_pages.lock().unwrap_or_else(|p| p.into_inner()) = Some(pages);
                vcpus
            }
        };
        self.run_vcpus(state.ram_size, config, on_sync, vcpus)
    }

    /// Stops the VM for a snapshot: from a sync handler (or any thread),
    /// every vCPU leaves `KVM_RUN` and the run ends with
    /// [`Outcome::Paused`], its vCPUs' state kept for
    /// [`save_snapshot`](Self::save_snapshot).
    pub fn pause(&self) {
        self.control.stop(Outcome::Paused);
    }

    /// Whether vCPUs run (between the start of [`run`](Self::run) or
    /// [`resume`](Self::resume) and their end).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether the run is ending: paused, exited, failed or timed out (a
    /// sync handler that waits for something, a migration's switch say,
    /// returns once this holds).
    pub fn is_stopping(&self) -> bool {
        self.control.stopping.load(Ordering::SeqCst)
    }

    fn saved(&self) -> MutexGuard<'_, Option<VmState>> {
        self.saved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn disks(&self) -> Vec<Arc<Mutex<Disk>>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes a snapshot of the paused VM (after a run ended with
    /// [`Outcome::Paused`]) to `out`, sealed under `key`: guest memory
    /// ([`PrivateMemory::save_snapshot`], or with `diff` the pages changed
    /// since the snapshot restored, [`PrivateMemory::save_diff_snapshot`]),
    /// its vCPUs and its devices. `EINVAL` unless paused. The VM keeps its
    /// state: a failed save may be tried again.
    pub fn save_snapshot(
        &self,
        out: &mut dyn std::io::Write,
        key: &gmem_kvm::SnapshotKey,
        diff: bool,
    ) -> Result<gmem_kvm::SnapshotInfo> {
        let state = self.saved().as_ref().map(VmState::encode).ok_or_else(|| {
            Error::InvalidArgument("the VM is not paused: nothing to save".into())
        })?;
        match diff {
            false => self.memory.save_snapshot(out, key, &state),
            true => self.memory.save_diff_snapshot(out, key, &state),
        }
    }

    /// Restores `chain` (a full snapshot, then diffs on it) into this VM,
    /// which must be fresh: RAM of the snapshot's size added
    /// ([`add_ram`](Self::add_ram), not loaded) and the same devices
    /// attached (their backing files are the VMM's: a disk must hold what
    /// it held at the save). Restores memory as `mode` says
    /// ([`PrivateMemory::restore_snapshot`]) and the devices' state, and
    /// keeps the vCPUs' for [`resume`](Self::resume). With `track_dirty`,
    /// KVM logs guest writes from here, for a diff of this run.
    pub fn restore_snapshot(
        &self,
        chain: Vec<gmem_kvm::SnapshotFile>,
        mode: gmem_kvm::RestoreMode,
        track_dirty: bool,
    ) -> Result<()> {
        let last = chain.last().ok_or_else(|| Error::InvalidArgument("no snapshot".into()))?;
        let state = VmState::decode(last.vmm_state())?;
        if state.devices() != self.disks().len() {
            return Err(Error::SnapshotMismatch(format!(
                "the snapshot has {} device(s), this VM {}",
                state.devices(),
                self.disks().len()
            )));
        }
        if track_dirty {
            self.memory.track_dirty_pages()?;
        }
        self.memory.restore_snapshot(chain, mode)?;
        self.restore_devices(&state)?;
        *self.saved() = Some(state);
        Ok(())
    }

    /// Sends this VM, whose run goes on on another thread, to a migration
    /// destination over `link` ([`PrivateMemory::send_migration`] under
    /// `key`, as `mode` says). At the switch it pauses the run (which ends
    /// with [`Outcome::Paused`]), flushes the disks to their files and
    /// sends the vCPUs' and devices' state. On failure before the
    /// destination runs the VM (`switched: false`), [`resume`](Self::resume)
    /// goes on with it here.
    pub fn migrate_to(
        &self,
        mut link: crate::migrate::Link,
        key: &SnapshotKey,
        mode: MigrationMode,
    ) -> std::result::Result<MigrationInfo, SendError> {
        let input = std::mem::replace(&mut link.input, Box::new(std::io::empty()));
        let mut pause = || {
            self.pause();
            loop {
                if let Some(state) = self.saved().as_ref().map(VmState::encode) {
                    for disk in self.disks() {
                        let disk = disk.lock().unwrap_or_else(|p| p.into_inner());
                        disk.device().sync_all().map_err(Error::io("flush a disk"))?;
                    }
                    return Ok(state);
                }
                if !self.running.load(Ordering::SeqCst) && self.saved().is_none() {
                    return Err(Error::NotPermitted(
                        "the VM stopped before the switch (it is not running)".into(),
                    ));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        };
        let sent = self.memory.send_migration(input, &mut link.output, key, mode, &mut pause);
        // The thread reading the destination's answers ends with the link.
        link.close();
        sent
    }

    /// Receives a migration into this VM, which must be fresh: RAM of the
    /// source's layout added ([`add_ram`](Self::add_ram) of the size
    /// `incoming.regions()` add up to) and the same devices attached
    /// (a disk on storage the source flushed). Then
    /// [`resume`](Self::resume) runs it: the source is told the VM runs
    /// once the vCPUs have their state. On failure the source is told it
    /// keeps the VM. Returns the number of vCPUs to resume with.
    pub fn receive_migration(&self, mut incoming: IncomingMigration) -> Result<u32> {
        let received = incoming.receive(&self.memory).and_then(|state| {
            let state = VmState::decode(&state)?;
            self.restore_devices(&state)?;
            Ok(state)
        });
        match received {
            Ok(state) => {
                let vcpus = state.vcpus();
                *self.saved() = Some(state);
                *self.incoming.lock().unwrap_or_else(|p| p.into_inner()) = Some(incoming);
                Ok(vcpus)
            }
            Err(e) => {
                incoming.refuse(&e);
                Err(e)
            }
        }
    }

    /// The pages of a post-copy migration still coming in (after
    /// [`resume`](Self::resume) started a received one), taken.
    pub fn take_incoming_pages(&self) -> Option<IncomingPages> {
        self.incoming_pages.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Gives the attached devices `state`'s (`EINVAL` for another number).
    fn restore_devices(&self, state: &VmState) -> Result<()> {
        let disks = self.disks();
        if state.devices() != disks.len() {
            return Err(Error::SnapshotMismatch(format!(
                "the VM state has {} device(s), this VM {}",
                state.devices(),
                disks.len()
            )));
        }
        for (disk, saved) in disks.iter().zip(&state.devices) {
            disk.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(saved)
                .map_err(|why| Error::BadSnapshot(format!("a device's state: {why}")))?;
        }
        Ok(())
    }

    /// Creates `config.vcpus` vCPUs, each set up by `setup` (its index,
    /// the new vCPU), for the VM's one run.
    fn new_vcpus(
        &self,
        config: &RunConfig,
        setup: impl Fn(u32, &VcpuFd) -> Result<()>,
    ) -> Result<Vec<VcpuFd>> {
        if self.has_run.load(Ordering::SeqCst) {
            return Err(Error::NotPermitted("a VM runs once; create a new one".into()));
        }
        if self.fd.check_extension_int(Cap::SyncRegs) & SyncReg::Register as i32 == 0 {
            return Err(Error::Unsupported("KVM lacks KVM_CAP_SYNC_REGS for registers".into()));
        }
        if config.hypercall_exits {
            crate::vcpu::enable_hypercall_exits(&self.fd)?;
        }
        let vcpus = (0..config.vcpus)
            .map(|i| {
                let vcpu =
                    self.fd.create_vcpu(u64::from(i)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
                setup(i, &vcpu)?;
                Ok(vcpu)
            })
            .collect::<Result<_>>()?;
        self.has_run.store(true, Ordering::SeqCst);
        self.memory.finish_launch();
        Ok(vcpus)
    }

    /// Runs `vcpus` until the guest exits, the VM fails, is paused or the
    /// timeout passes. Paused, the vCPUs' state is read and they are kept
    /// for [`resume`](Self::resume).
    fn run_vcpus(
        &self,
        ram_size: u64,
        config: &RunConfig,
        on_sync: SyncHandler<'_>,
        mut vcpus: Vec<VcpuFd>,
    ) -> Result<RunReport> {
        self.running.store(true, Ordering::SeqCst);
        let console = Mutex::new(Vec::new());
        let running = AtomicU32::new(config.vcpus);
        let deadline = config.timeout.and_then(|t| Instant::now().checked_add(t));
        let kickers = Mutex::new(Vec::new());

        // The VcpuFds (and their kvm_run mappings) outlive the scope, so
        // that a kick never reaches an unmapped kvm_run.
        std::thread::scope(|scope| {
            for (index, vcpu) in vcpus.iter_mut().enumerate() {
                let (console, running, kickers) = (&console, &running, &kickers);
                scope.spawn(move || {
                    // Registered before the first look at the stop flag, so
                    // that the kicks below cannot miss this thread.
                    let kicker = Kicker::for_current_thread(vcpu.get_kvm_run());
                    kickers.lock().unwrap_or_else(|p| p.into_inner()).push((index, kicker));
                    let vcpu_loop = std::panic::AssertUnwindSafe(|| {
                        self.vcpu_loop(vcpu, index as u32, config.echo_console, console, on_sync)
                    });
                    if let Err(panic) = std::panic::catch_unwind(vcpu_loop) {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        self.control.stop(Outcome::Error(format!("vCPU {index} panicked: {what}")));
                    }
                    // Unregistered before the thread ends (a halted vCPU's
                    // ends while the VM runs on): a thread that has ended is
                    // no longer there to signal (its pthread is freed).
                    kickers.lock().unwrap_or_else(|p| p.into_inner()).retain(|(i, _)| *i != index);
                    if running.fetch_sub(1, Ordering::SeqCst) == 1 {
                        self.control
                            .stop(Outcome::Error("every vCPU halted without an exit".into()));
                    }
                });
            }
            self.control.watch(deadline);
            // Kick until every vCPU thread has left KVM_RUN. A stuck vCPU
            // gets one pending signal at most (SIGUSR2 does not queue).
            while running.load(Ordering::SeqCst) != 0 {
                for (_, kicker) in kickers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    // SAFETY: the VcpuFds live until after this scope, and a
                    // thread unregisters its kicker, under this lock, before
                    // it ends.
                    unsafe { kicker.kick() };
                }
                // The last vCPU to leave stops the control, which wakes us.
                self.control
                    .wait_until(Duration::from_millis(5), || running.load(Ordering::SeqCst) == 0);
            }
        });
        let mut outcome =
            self.control.outcome().clone().unwrap_or(Outcome::Error("stopped".into()));
        if outcome == Outcome::Paused {
            let states = vcpus.iter_mut().map(VcpuState::capture).collect::<Result<Vec<_>>>();
            let devices = self.disks();
            let devices =
                devices.iter().map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).save_state());
            match states {
                Ok(states) => {
                    *self.saved() =
                        Some(VmState { ram_size, vcpus: states, devices: devices.collect() });
                    *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = vcpus;
                }
                Err(e) => outcome = Outcome::Error(format!("reading the paused vCPUs: {e}")),
            }
        }
        self.running.store(false, Ordering::SeqCst);
        Ok(RunReport { outcome, console: console.into_inner().unwrap_or_else(|p| p.into_inner()) })
    }
}

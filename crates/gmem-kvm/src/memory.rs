//! A VM's guest memory: the private regions a VMM registered, the owner of
//! their files, and the listeners told of every discard and conversion.
//!
//! The path of a page: the VMM registers a region ([`PrivateMemory::add_region`]),
//! which binds the memory as the file's owner and maps a KVM-only window,
//! registered with userfaultfd, as the memslot. A guest's first touch makes
//! KVM fault on the window; fault serving ([`crate::faults`]) locks a batch
//! around the page and maps it, allocating holes through the window. A
//! punch, truncate or conversion reaches
//! [`GuestOwner::invalidate_page_range`] here, which waits for host
//! accesses to end, forgets the pages and tells the listeners; the kernel
//! then frees the pages (unmapping them from every window) and KVM's MMU
//! notifier zaps its own mappings.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use arc_swap::ArcSwap;

use gmem::{FileId, FileOffset, GuestOwner, PageKind, PageRange, HUGE_PAGE_SIZE, PAGE_SIZE};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use crate::access::overlaps;
use crate::bits::PageBits;
use crate::error::{Error, Result};
use crate::faults::FaultReadiness;
use crate::first_touch::ScatteredFaults;
use crate::gate::ChangeGate;
use crate::native::{
    GuestMemfd, GuestMemfdMap, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
};
use crate::region::{Backing, FileBacking, NativeBacking, PageState, PrivateRegion, RegionSpec};
use crate::uffd::{Registration, Userfaultfd};
use crate::Gpa;

/// Pages served per fault by default: 512 (2 MiB, the huge-page size).
/// `gmem bench` on this kind of host (first touch, ratio to plain KVM
/// memory, with sequential read-ahead): 0.15x for 1 page per fault, about
/// 1.07x for 64 and 1.15x for 512. The userfaultfd round trip is what
/// batching pays for; the cost is that a touch allocates up to 2 MiB of the
/// guest's RAM around it.
pub const DEFAULT_FAULT_AROUND_PAGES: u64 = 512;

/// Told of changes to guest memory, as QEMU's RamDiscardListener or a
/// VFIO/vhost backend needs to be. Called on the thread that made the
/// change, with no page of the range reachable by the host; a panic is
/// caught and counted ([`MemoryStats::listener_panics`]).
pub trait MemoryListener: Send + Sync {
    /// `[gpa, gpa + len)` was discarded (punch, truncate or conversion):
    /// it reads zero from now on. Drop any mapping or DMA of it.
    fn discarded(&self, gpa: Gpa, len: u64) {
        let _ = (gpa, len);
    }

    /// `[gpa, gpa + len)` changed to `state`.
    fn converted(&self, gpa: Gpa, len: u64, state: PageState) {
        let _ = (gpa, len, state);
    }
}

/// How much memory gmem locks in RAM (`RLIMIT_MEMLOCK` for a VMM without
/// `CAP_IPC_LOCK`). A sealed file's frame window is always locked (mlock
/// on fault: charged its size at `set_len`, pinned as pages are
/// allocated), so that private pages never reach swap; the policy says
/// whether each region's KVM window is locked too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemlockPolicy {
    /// Lock each region's KVM window too, where the limit allows: first
    /// touches allocate each page once, in KVM's window, and a sparse
    /// guest's may be handed to the kernel. RAM is charged twice.
    #[default]
    KvmWindows,
    /// The files' frame windows only: RAM is charged once. First touches
    /// are allocated in the frame window and mapped into KVM's (slower),
    /// and never handed to the kernel. Regions on huge pages lock KVM's
    /// window all the same: the kernel allocates their pages there.
    FilesOnly,
}

/// Counters of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Pages mapped into the guest by fault serving.
    pub pages_served: u64,
    /// Faults handled (each serves up to a fault-around batch).
    pub faults: u64,
    /// Pages fenced off after faults that could not be served (a whole
    /// region where a page fence could not be made).
    pub fenced_pages: u64,
    /// Invalidation callbacks received from the files.
    pub invalidations: u64,
    /// Pages those callbacks covered.
    pub invalidated_pages: u64,
    /// Conversions carried out.
    pub conversions: u64,
    /// Pages whose state those conversions changed.
    pub converted_pages: u64,
    /// Host accesses refused because a page is private.
    pub host_denials: u64,
    /// Listener calls that panicked.
    pub listener_panics: u64,
    /// Bytes of per-page metadata (states and mapping bitmaps) of all regions.
    pub metadata_bytes: u64,
    /// Pages of guest RAM in all regions.
    pub pages: u64,
    /// Times a region handed its first touches to the kernel (its faults
    /// kept landing away from every recent batch: a sparse guest); see
    /// [`first_touch`](crate::first_touch).
    pub kernel_handovers: u64,
    /// Regions whose first touches the kernel serves now.
    pub kernel_serving_regions: u64,
    /// Pages allocated in the regions' gmem files (each file counted once),
    /// by gmem or, after a hand-over, by the kernel.
    pub allocated_pages: u64,
    /// Split 2 MiB pages made huge again ([`crate::collapse`]).
    pub collapses: u64,
    /// Nanoseconds those collapses took.
    pub collapse_nanos: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) pages_served: AtomicU64,
    pub(crate) faults: AtomicU64,
    pub(crate) fenced_pages: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidated_pages: AtomicU64,
    pub(crate) conversions: AtomicU64,
    pub(crate) converted_pages: AtomicU64,
    pub(crate) host_denials: AtomicU64,
    pub(crate) listener_panics: AtomicU64,
}

/// A region being registered with KVM: its slot and ranges count for
/// overlaps (a guest_memfd region has no file range to share).
#[derive(Clone)]
struct Reserved {
    slot: u32,
    gpa: std::ops::Range<u64>,
    file: Option<FileId>,
    file_range: std::ops::Range<u64>,
}

impl Reserved {
    fn of(region: &PrivateRegion) -> Self {
        let offset = region.file_offset().0;
        Self {
            slot: region.slot,
            gpa: region.gpa.0..region.gpa.0 + region.size,
            file: region.file_backing().map(|f| f.file_id),
            file_range: offset..offset + region.size,
        }
    }
}

/// The guest memory of one VM, and the owner of its files.
///
/// Shared as `Arc<PrivateMemory>`: fault serving, device threads and the
/// VMM's vCPU loop all use it at once. It creates no thread of its own
/// (see [`PrivateMemory::start_fault_server`] for the one it can start on
/// request), installs no signal handler and keeps no global state.
pub struct PrivateMemory {
    /// Read on every access without a shared counter (arc-swap), replaced
    /// whole under `regions_update`.
    regions: ArcSwap<Vec<Arc<PrivateRegion>>>,
    regions_update: Mutex<()>,
    reserved: Mutex<Vec<Reserved>>,
    pub(crate) uffd: Userfaultfd,
    /// What makes `fault_fd` readable ([`crate::faults`]).
    pub(crate) readiness: FaultReadiness,
    /// Registered on every region's host view: SIGBUS, never an event.
    pub(crate) host_uffd: Userfaultfd,
    pub(crate) fault_around: u64,
    /// Each vCPU's scattered faults in a row ([`crate::first_touch`]).
    pub(crate) scattered_faults: ScatteredFaults,
    /// Where host accesses and changes meet (see [`crate::gate`]).
    pub(crate) gate: ChangeGate,
    listeners: RwLock<Vec<Arc<dyn MemoryListener>>>,
    launched: AtomicBool,
    /// Whether regions added from now on lock their KVM window.
    lock_kvm_windows: AtomicBool,
    /// The VM whose memslots the regions are, kept until they are deleted.
    vm: OnceLock<Arc<VmFd>>,
    pub(crate) counters: Counters,
    /// Split huge pages waiting to be made huge again.
    pub(crate) collapses: crate::collapse::Collapses,
    /// Dirty tracking, diff bases and lazy restores ([`crate::snapshot`]).
    pub(crate) snapshots: crate::snapshot::SnapshotState,
}

impl std::fmt::Debug for PrivateMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateMemory")
            .field("regions", &self.regions().len())
            .finish_non_exhaustive()
    }
}

impl Drop for PrivateMemory {
    /// Deletes every memslot first: KVM never uses a window once it is
    /// unmapped (a vCPU still running gets exits for those GPAs).
    fn drop(&mut self) {
        // The kernel serves the windows' faults from now on: a vCPU asleep
        // on one is woken, and KVM's memslot update, which waits for it,
        // needs no fault thread (there may be none to start).
        for region in self.regions().iter() {
            if let Some(f) = region.file_backing() {
                let _ = self.uffd.unregister(f.window_addr(), f.window.len() as u64);
            }
        }
        for region in self.regions().iter() {
            let _ = self.delete_memslot(region);
        }
    }
}

impl GuestOwner for PrivateMemory {
    fn invalidate_page_range(&self, file: FileId, pages: PageRange) {
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        self.counters.invalidated_pages.fetch_add(pages.len(), Ordering::Relaxed);
        let runs: Vec<_> = self
            .regions()
            .iter()
            .filter_map(|region| {
                let f = region.file_backing().filter(|f| f.file_id == file)?;
                Some((region.clone(), f.region_pages(pages, region.pages())?))
            })
            .collect();
        let (Some(first), Some(last)) = (
            runs.iter().map(|(r, run)| r.gpa_of(run.start).0).min(),
            runs.iter().map(|(r, run)| r.gpa_of(run.end).0).max(),
        ) else {
            return;
        };
        // Wait for host accesses to these pages to end (a conversion or
        // punch of ours already holds them). A thread that holds a host
        // access itself and punches the file directly cannot be made to
        // wait for itself: it goes on, and its own stale slices may fault.
        let _exclusive = self.gate.exclusive("invalidate", first..last).ok();
        for (region, run) in &runs {
            let f = region.file_backing().expect("a file region");
            // The kernel unmaps the pages from every window right after
            // this returns; forget them now, while their locks keep fault
            // serving off.
            f.mapped.set(run.clone(), false);
            f.host_mapped.set(run.clone(), false);
            region.mark_changed(run.clone());
        }
        // Told with no lock of the memory's held but the access lock (a
        // listener may read elsewhere, take a view, convert, add a
        // listener or a region).
        for (region, run) in runs {
            let gpa = region.gpa_of(run.start);
            self.notify(|l| l.discarded(gpa, (run.end - run.start) * PAGE_SIZE));
        }
    }
}

impl PrivateMemory {
    /// Guest memory with no region yet, serving `fault_around` pages (a
    /// power of two, at most 512) per fault; `EINVAL` otherwise. Opens its
    /// two userfaultfds (root, `CAP_SYS_PTRACE` or
    /// `vm.unprivileged_userfaultfd=1`).
    ///
    /// Where the `userfaultfd` system call is not allowed, they come from
    /// `/dev/userfaultfd` (Linux 6.1+, as its file mode allows); a jailed
    /// VMM may also pass descriptors it was given
    /// ([`with_userfaultfds`](Self::with_userfaultfds)).
    pub fn new(fault_around: u64) -> Result<Arc<Self>> {
        Self::check_fault_around(fault_around)?;
        Self::build(fault_around, Userfaultfd::new()?, Userfaultfd::new_sigbus()?)
    }

    /// As [`new`](Self::new), on two userfaultfds the caller opened (with
    /// `O_CLOEXEC | O_NONBLOCK`, no `UFFDIO_API` yet): one for guest faults,
    /// one for the host's view. `ENOTTY` for a descriptor that is not a
    /// userfaultfd, `EINVAL` for one already set up.
    pub fn with_userfaultfds(
        fault_around: u64,
        faults: std::os::fd::OwnedFd,
        host: std::os::fd::OwnedFd,
    ) -> Result<Arc<Self>> {
        Self::check_fault_around(fault_around)?;
        Self::build(fault_around, Userfaultfd::adopt(faults)?, Userfaultfd::adopt_sigbus(host)?)
    }

    fn check_fault_around(fault_around: u64) -> Result<()> {
        if fault_around == 0 || !fault_around.is_power_of_two() || fault_around > 512 {
            return Err(Error::InvalidArgument(format!(
                "fault-around must be a power of two of pages up to 512, not {fault_around}"
            )));
        }
        Ok(())
    }

    fn build(fault_around: u64, uffd: Userfaultfd, host_uffd: Userfaultfd) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            regions: ArcSwap::default(),
            regions_update: Mutex::new(()),
            reserved: Mutex::new(Vec::new()),
            readiness: FaultReadiness::new(&uffd)?,
            uffd,
            host_uffd,
            fault_around,
            scattered_faults: ScatteredFaults::default(),
            gate: ChangeGate::default(),
            listeners: RwLock::new(Vec::new()),
            launched: AtomicBool::new(false),
            lock_kvm_windows: AtomicBool::new(true),
            vm: OnceLock::new(),
            counters: Counters::default(),
            collapses: Default::default(),
            snapshots: Default::default(),
        }))
    }

    /// Sets the [`MemlockPolicy`] of regions added from now on.
    pub fn set_memlock_policy(&self, policy: MemlockPolicy) {
        let windows = policy == MemlockPolicy::KvmWindows;
        self.lock_kvm_windows.store(windows, Ordering::Relaxed);
    }

    /// The registered regions, in registration order: a snapshot, which
    /// keeps them (and their mappings) alive while it lives.
    pub fn regions(&self) -> Regions {
        Regions(self.regions.load())
    }

    /// Replaces the region table with `change` applied to it.
    fn update_regions(&self, change: impl FnOnce(&mut Vec<Arc<PrivateRegion>>)) {
        let _one_at_a_time = self.regions_update.lock().unwrap_or_else(|p| p.into_inner());
        let mut regions = Vec::clone(&self.regions.load());
        change(&mut regions);
        self.regions.store(Arc::new(regions));
    }

    /// Adds a private region and registers it with KVM as memslot
    /// `spec.slot` (`KVM_SET_USER_MEMORY_REGION`). The memory becomes the
    /// file's owner. All or nothing: where KVM refuses, nothing stays.
    ///
    /// The region's KVM window is locked in RAM (`mlock2(MLOCK_ONFAULT)`,
    /// charged to `RLIMIT_MEMLOCK` besides the file's frame window), so
    /// that first touches allocate each page once, there. Where the limit
    /// refuses that, the region still works, its first touches slower and
    /// never handed to the kernel.
    ///
    /// `EINVAL` for unaligned or empty ranges, ranges past the file's end, a
    /// file range already bound (as guest_memfd) or a file that is not
    /// GUEST-sealed; `EEXIST` for a GPA range or slot id already taken;
    /// `EPERM` for a file another VM owns; KVM's errno where it refuses.
    ///
    /// The memory keeps `vm` (the first region's VM; `EINVAL` for
    /// another) and deletes its memslots when it is dropped, so no memslot
    /// outlives the mapping it points at: unlike kvm-ioctls'
    /// `set_user_memory_region`, this is safe. Do not replace or delete
    /// the slot through the `VmFd` yourself (that is `unsafe` there).
    pub fn add_region(
        self: &Arc<Self>,
        vm: &Arc<VmFd>,
        spec: RegionSpec,
    ) -> Result<Arc<PrivateRegion>> {
        let vm = self.serve_vm(vm)?;
        let RegionSpec { slot, gpa, ref file, file_offset: FileOffset(offset), size } = spec;
        if offset % PAGE_SIZE != 0 || offset.checked_add(size).is_none() {
            return Err(Error::InvalidArgument(format!(
                "region file offset {offset:#x}: must be page-aligned and not wrap"
            )));
        }
        match file.page_kind() {
            PageKind::Small => {}
            PageKind::HugeTlb => {
                return Err(Error::Unsupported(
                    "regions on hugetlbfs files: the host's view of shared pages would need \
                     2 MiB userfaultfd minor faults, not done yet"
                        .into(),
                ))
            }
            PageKind::TransparentHuge => {
                if [gpa.0, offset, size].iter().any(|v| v % HUGE_PAGE_SIZE != 0) {
                    return Err(Error::InvalidArgument(format!(
                        "region on 2 MiB pages at {gpa}, file offset {offset:#x}, size {size:#x}: \
                         each must be a multiple of 2 MiB"
                    )));
                }
            }
        }
        self.reserve(slot, gpa, size, Some((file.id(), offset)))?;
        let region = self.file_region(&spec).and_then(|region| {
            let kvm_region = region.memslot(self.memslot_flags());
            // SAFETY: the window is a live mapping of `size` bytes owned by
            // the region, which this memory keeps until it deletes the
            // memslot (remove_region, or on drop).
            self.with_faults_served(|| unsafe { vm.set_user_memory_region(kvm_region) })
                .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
            Ok(region)
        });
        self.settle(slot, region)
    }

    /// Adds a region of `size` bytes at `gpa` backed by a new guest_memfd
    /// of the kernel's, created mappable and shared (`MMAP | INIT_SHARED`)
    /// and mapped as the memslot's memory (`KVM_SET_USER_MEMORY_REGION2`
    /// with both the guest_memfd and that mapping). gmem's page states
    /// apply as on the user-space backend: the host reaches shared pages
    /// only, conversions discard in place. Errors as
    /// [`add_region`](Self::add_region); `EOPNOTSUPP`-like KVM errnos where
    /// the kernel lacks the flags (see [`crate::native::probe`]).
    ///
    /// As [`add_region`](Self::add_region), the memory keeps `vm` and
    /// deletes the memslot when dropped.
    pub fn add_native_region(
        self: &Arc<Self>,
        vm: &Arc<VmFd>,
        slot: u32,
        gpa: Gpa,
        size: u64,
    ) -> Result<Arc<PrivateRegion>> {
        let vm = self.serve_vm(vm)?;
        self.reserve(slot, gpa, size, None)?;
        let region = (|| {
            let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
            let memfd = GuestMemfd::create(vm, size, flags)?;
            let map = GuestMemfdMap::new(&memfd, size)?;
            // SAFETY: `map` is a mapping of `size` bytes owned by the region
            // (no Rust reference points into it), which this memory keeps
            // until it deletes the memslot.
            self.with_faults_served(|| unsafe {
                memfd.bind(vm, slot, gpa.0, size, 0, map.addr() as u64)
            })?;
            Ok(PrivateRegion::new(
                slot,
                gpa,
                size,
                Backing::GuestMemfd(NativeBacking { memfd, map }),
            ))
        })();
        self.settle(slot, region)
    }

    /// Ends the reservation of `slot`; keeps `region` if KVM took it.
    fn settle(&self, slot: u32, region: Result<Arc<PrivateRegion>>) -> Result<Arc<PrivateRegion>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        reserved.retain(|r| r.slot != slot);
        if let Ok(region) = &region {
            self.update_regions(|regions| regions.push(region.clone()));
        }
        region
    }

    /// Checks a new region against every region and reservation and
    /// reserves its slot and ranges until KVM has it (KVM is called without
    /// our locks: it waits for vCPUs in faults that only we can serve).
    fn reserve(&self, slot: u32, gpa: Gpa, size: u64, file: Option<(FileId, u64)>) -> Result<()> {
        if gpa.0 % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || size == 0 {
            return Err(Error::InvalidArgument(format!(
                "region gpa {:#x}, size {size:#x}: must be page-aligned and non-empty",
                gpa.0
            )));
        }
        let gpa_end =
            gpa.0.checked_add(size).ok_or_else(|| Error::InvalidArgument("region wraps".into()))?;
        let new = Reserved {
            slot,
            gpa: gpa.0..gpa_end,
            file: file.map(|(id, _)| id),
            file_range: file.map_or(0..0, |(_, offset)| offset..offset + size),
        };
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let regions = self.regions();
        for other in regions.iter().map(|r| Reserved::of(r)).chain(reserved.iter().cloned()) {
            if overlaps(&new.gpa, &other.gpa) {
                return Err(Error::Exists(format!(
                    "region {:#x}..{gpa_end:#x} overlaps {:#x}..{:#x}",
                    gpa.0, other.gpa.start, other.gpa.end
                )));
            }
            if new.file.is_some()
                && other.file == new.file
                && overlaps(&new.file_range, &other.file_range)
            {
                // EINVAL, not EEXIST: what the kernel's guest_memfd returns.
                return Err(Error::InvalidArgument(format!(
                    "file range {:#x}..{:#x} is already bound",
                    new.file_range.start, new.file_range.end
                )));
            }
            if other.slot == slot {
                return Err(Error::Exists(format!("memslot {slot} is taken")));
            }
        }
        reserved.push(new);
        Ok(())
    }

    /// Binds `spec`'s file to this memory and maps its windows: the region,
    /// not yet known to KVM.
    fn file_region(self: &Arc<Self>, spec: &RegionSpec) -> Result<Arc<PrivateRegion>> {
        let RegionSpec { slot, gpa, ref file, file_offset: FileOffset(offset), size } = *spec;
        let binding = file.bind(self)?;
        let window = binding.map_window(FileOffset(offset), size)?;
        // Locked in RAM, the window is where first touches allocate pages,
        // each mapped once. Where the policy or the memlock limit refuses a
        // second charge (the frame window has the first), they are
        // allocated in the frame window and mapped here too: slower, and no
        // first touch is handed to the kernel.
        //
        // On huge pages the kernel allocates every page through KVM's
        // window, so it is locked whatever the policy (or the region is
        // refused): its pages would otherwise be locked by no mapping.
        let small = file.page_kind() == PageKind::Small;
        if !small {
            window.lock_in_ram()?;
        } else if self.lock_kvm_windows.load(Ordering::Relaxed) {
            let _ = window.lock_in_ram();
        }
        // On huge pages the kernel's shmem faults serve KVM's window: they
        // map 2 MiB pages by PMD, which KVM then maps huge (userfaultfd
        // maps 4 KiB only). See `crate::collapse`.
        if small {
            self.uffd.register(window.as_ptr() as u64, size, Registration::MissingAndMinor)?;
        }
        // The host's view never allocates a page (a hole raises SIGBUS).
        // On 4 KiB pages it maps only what gmem put there; on huge pages
        // the kernel's collapses (khugepaged's too, which no process
        // setting stops short of losing huge pages altogether) remove its
        // mappings at any time, so the kernel maps pages in the file again
        // on access: the gate is what keeps the host to shared pages there.
        let host_view = binding.map_window(FileOffset(offset), size)?;
        if !small {
            host_view.map_small_pages_only()?;
        }
        let host_faults =
            if small { Registration::MissingAndMinor } else { Registration::MissingOnly };
        self.host_uffd.register(host_view.as_ptr() as u64, size, host_faults)?;
        let backing = Backing::File(Box::new(FileBacking {
            file_offset: offset,
            file_id: file.id(),
            binding,
            window,
            mapped: PageBits::new(size / PAGE_SIZE),
            host_view,
            host_mapped: PageBits::new(size / PAGE_SIZE),
            streams: crate::region::Streams::default(),
            first_touch: crate::first_touch::FirstTouch::default(),
        }));
        Ok(PrivateRegion::new(slot, gpa, size, backing))
    }

    /// Deletes memslot `slot` from KVM, then forgets the region (its
    /// windows go once nothing else holds it: a host copy under way
    /// finishes on them). `EINVAL` for an unknown slot. Like
    /// [`add_region`](Self::add_region), callable from any thread, the one
    /// that serves faults included: faults are served by a thread of the
    /// call's own while KVM waits for the vCPUs.
    pub fn remove_region(&self, slot: u32) -> Result<Arc<PrivateRegion>> {
        let region = self
            .regions()
            .iter()
            .find(|r| r.slot == slot)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("no region in memslot {slot}")))?;
        self.delete_memslot(&region)?;
        self.update_regions(|regions| regions.retain(|r| r.slot != slot));
        Ok(region)
    }

    /// The VM this memory serves: `vm`, kept from its first region on;
    /// `EINVAL` for another.
    fn serve_vm<'a>(&'a self, vm: &Arc<VmFd>) -> Result<&'a VmFd> {
        let served = self.vm.get_or_init(|| vm.clone());
        if !Arc::ptr_eq(served, vm) {
            return Err(Error::InvalidArgument(
                "this memory serves another VM: one PrivateMemory per VM (and per boot)".into(),
            ));
        }
        Ok(served)
    }

    /// The VM whose memslots the regions are, once a region was added.
    pub(crate) fn vm(&self) -> Option<&Arc<VmFd>> {
        self.vm.get()
    }

    /// Deletes `region`'s memslot: KVM stops using its window.
    fn delete_memslot(&self, region: &PrivateRegion) -> Result<()> {
        let Some(vm) = self.vm.get() else { return Ok(()) };
        let delete = kvm_userspace_memory_region {
            slot: region.slot,
            flags: 0,
            guest_phys_addr: region.gpa.0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a memslot maps nothing; KVM stops using the window.
        self.with_faults_served(|| unsafe { vm.set_user_memory_region(delete) })
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (delete)"))
    }

    /// Tells `listener` of every later discard and conversion.
    pub fn add_listener(&self, listener: Arc<dyn MemoryListener>) {
        self.listeners.write().unwrap_or_else(|p| p.into_inner()).push(listener);
    }

    /// Calls every listener, with the list not locked: a listener may add
    /// one.
    pub(crate) fn notify(&self, call: impl Fn(&dyn MemoryListener)) {
        let listeners = self.listeners.read().unwrap_or_else(|p| p.into_inner()).clone();
        for listener in &listeners {
            let call = std::panic::AssertUnwindSafe(|| call(listener.as_ref()));
            if std::panic::catch_unwind(call).is_err() {
                self.counters.listener_panics.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The region holding `gpa`.
    pub fn region_of(&self, gpa: Gpa) -> Option<Arc<PrivateRegion>> {
        self.regions().iter().find(|r| r.contains(gpa)).cloned()
    }

    /// The state of the page holding `gpa`; `None` outside every region.
    pub fn page_state(&self, gpa: Gpa) -> Option<PageState> {
        self.region_of(gpa)?.page_state(gpa)
    }

    /// Regions covering `[gpa, gpa + len)` without a gap, in GPA order,
    /// each with its pages of the range; `EINVAL` where RAM has a hole.
    pub(crate) fn regions_covering(
        &self,
        gpa: Gpa,
        len: u64,
    ) -> Result<Vec<(Arc<PrivateRegion>, std::ops::Range<u64>)>> {
        let parts = self.parts(gpa, len)?;
        Ok(parts
            .into_iter()
            .map(|(region, offset, len)| {
                let pages = region.pages_of(Gpa(region.gpa.0 + offset), len);
                (region, pages)
            })
            .collect())
    }

    /// The parts of `[gpa, gpa + len)` in each region that covers it, in
    /// GPA order: region, offset in it, length; `EINVAL` where RAM has a
    /// hole. Adjacent regions (a VMM's RAM in several memslots) serve one
    /// range together. An empty range is one empty part, of the region
    /// holding `gpa`.
    pub(crate) fn parts(&self, gpa: Gpa, len: u64) -> Result<Vec<(Arc<PrivateRegion>, u64, u64)>> {
        let regions = self.regions();
        let parts = parts_in(&regions, gpa, len)?;
        Ok(parts.into_iter().map(|(region, offset, len)| (region.clone(), offset, len)).collect())
    }

    /// Launch-time populate: copies `bytes` into private memory at `gpa`
    /// (the one host write a sealed file accepts, like guest_memfd's
    /// populate, or SEV's LAUNCH_UPDATE_DATA). `EPERM` after
    /// [`finish_launch`](Self::finish_launch); `EINVAL` where no region
    /// holds a byte of it (nothing is written then).
    pub fn populate(&self, gpa: Gpa, bytes: &[u8]) -> Result<()> {
        self.check_launching()?;
        if bytes.is_empty() {
            return Ok(());
        }
        let mut rest = bytes;
        for (region, offset, len) in self.parts(gpa, bytes.len() as u64)? {
            let (part, after) = rest.split_at(len as usize);
            rest = after;
            match &region.backing {
                Backing::File(f) => f.binding.populate(FileOffset(f.file_offset + offset), part)?,
                Backing::GuestMemfd(n) => {
                    let host = n.map.addr().wrapping_add(offset as usize);
                    // SAFETY: the `part.len()` bytes at `host` lie inside the
                    // guest_memfd's mapping (`parts` clipped them to the
                    // region), which the region owns; the guest may write
                    // them too, so the copy is volatile.
                    unsafe { vm_memory::VolatileSlice::new(host, part.len()) }.copy_from(part);
                }
            }
        }
        Ok(())
    }

    /// `EPERM` once the launch is finished.
    pub(crate) fn check_launching(&self) -> Result<()> {
        if self.launched.load(Ordering::SeqCst) {
            return Err(Error::NotPermitted("populate: the launch is finished".into()));
        }
        Ok(())
    }

    /// Ends the launch: from now on [`populate`](Self::populate) is `EPERM`
    /// and private memory is the guest's alone. Call it before the first
    /// vCPU runs.
    pub fn finish_launch(&self) {
        self.launched.store(true, Ordering::SeqCst);
    }

    /// Discards `[gpa, gpa + len)` from its backing (private or shared): a
    /// hole punch on the file, with invalidation; the guest reads zero there
    /// afterwards. Its invalidation waits for host accesses to the memory to
    /// end; `EDEADLK` if this thread holds one. `EINVAL` for unaligned
    /// ranges or ranges with a byte outside every region.
    pub fn punch(&self, gpa: Gpa, len: u64) -> Result<()> {
        let covering = self.regions_covering(gpa, len)?;
        if gpa.0 % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(Error::InvalidArgument(format!(
                "punch of {:#x}+{len:#x}: must be page-aligned and non-empty",
                gpa.0
            )));
        }
        let _changing = self.gate.begin_change("punch", gpa.0..gpa.0 + len)?;
        covering.iter().try_for_each(|(region, pages)| self.discard(region, pages.clone()))
    }

    /// Discards region pages `run` from the region's backing: a punch of
    /// the gmem file (whose invalidation reaches us), or of the guest_memfd
    /// (told here: host accesses waited out, listeners told). The caller
    /// holds no host access.
    pub(crate) fn discard(&self, region: &PrivateRegion, run: std::ops::Range<u64>) -> Result<()> {
        // Never fetched from a snapshot afterwards, and part of the next diff.
        self.forget_pending(region, run.clone());
        region.mark_changed(run.clone());
        match &region.backing {
            Backing::File(f) => {
                let bytes = f.file_pages(&run).bytes();
                f.binding.file().fallocate(
                    gmem::Fallocate::PunchHole,
                    FileOffset(bytes.start),
                    bytes.end - bytes.start,
                )?;
            }
            Backing::GuestMemfd(n) => {
                let span = region.gpa_of(run.start).0..region.gpa_of(run.end).0;
                let _exclusive = self.gate.exclusive("discard", span)?;
                let flags =
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
                let (offset, len) = (run.start * PAGE_SIZE, (run.end - run.start) * PAGE_SIZE);
                rustix::fs::fallocate(n.memfd.fd(), flags, offset, len)
                    .map_err(Error::os("fallocate(PUNCH_HOLE) on guest_memfd"))?;
                self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                self.counters.invalidated_pages.fetch_add(run.end - run.start, Ordering::Relaxed);
                let gpa = region.gpa_of(run.start);
                self.notify(|l| l.discarded(gpa, len));
            }
        }
        Ok(())
    }

    /// Bytes of the regions' KVM windows mapped by 2 MiB page table
    /// entries now (`/proc/self/smaps`), which KVM can map huge: 0 but on
    /// regions on huge pages, less than their size where conversions split
    /// pages (see [`crate::collapse`]).
    pub fn huge_mapped_bytes(&self) -> Result<u64> {
        let regions = self.regions();
        let windows = regions.iter().filter_map(|r| r.file_backing()).map(|f| &f.window);
        Ok(gmem::OwnerWindow::huge_mapped_bytes_of(windows)?)
    }

    /// The memory's counters.
    pub fn stats(&self) -> MemoryStats {
        let c = &self.counters;
        let regions = self.regions();
        let first_touches =
            || regions.iter().filter_map(|r| r.file_backing()).map(|f| &f.first_touch);
        let mut files: Vec<&Arc<gmem::PrivateMemFile>> = Vec::new();
        for file in regions.iter().filter_map(|r| r.file()) {
            if !files.iter().any(|f| Arc::ptr_eq(f, file)) {
                files.push(file);
            }
        }
        MemoryStats {
            pages_served: c.pages_served.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            fenced_pages: c.fenced_pages.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            invalidated_pages: c.invalidated_pages.load(Ordering::Relaxed),
            conversions: c.conversions.load(Ordering::Relaxed),
            converted_pages: c.converted_pages.load(Ordering::Relaxed),
            host_denials: c.host_denials.load(Ordering::Relaxed),
            listener_panics: c.listener_panics.load(Ordering::Relaxed),
            metadata_bytes: regions.iter().map(|r| r.metadata_bytes() as u64).sum(),
            pages: regions.iter().map(|r| r.pages()).sum(),
            kernel_handovers: first_touches().map(|t| t.handovers.load(Ordering::Relaxed)).sum(),
            kernel_serving_regions: first_touches().filter(|t| t.kernel_serves()).count() as u64,
            allocated_pages: files.iter().map(|f| f.stats().allocated_pages).sum(),
            collapses: self.collapses.done.load(Ordering::Relaxed),
            collapse_nanos: self.collapses.nanos.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of the region table ([`PrivateMemory::regions`]).
pub struct Regions(arc_swap::Guard<Arc<Vec<Arc<PrivateRegion>>>>);

impl std::ops::Deref for Regions {
    type Target = [Arc<PrivateRegion>];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::fmt::Debug for Regions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// [`PrivateMemory::parts`] of a region table, borrowing its regions.
pub(crate) fn parts_in(
    regions: &[Arc<PrivateRegion>],
    gpa: Gpa,
    len: u64,
) -> Result<Vec<(&Arc<PrivateRegion>, u64, u64)>> {
    let end = gpa.0.checked_add(len).ok_or_else(|| outside(gpa, len))?;
    let region_of = |at: u64| regions.iter().find(|r| r.contains(Gpa(at)));
    if len == 0 {
        let region = region_of(gpa.0).ok_or_else(|| outside(gpa, len))?;
        return Ok(vec![(region, gpa.0 - region.gpa.0, 0)]);
    }
    let mut parts = Vec::new();
    let mut at = gpa.0;
    while at < end {
        let region = region_of(at).ok_or_else(|| outside(gpa, len))?;
        let upto = end.min(region.gpa.0 + region.size);
        parts.push((region, at - region.gpa.0, upto - at));
        at = upto;
    }
    Ok(parts)
}

pub(crate) fn outside(gpa: Gpa, len: u64) -> Error {
    Error::OutsideRam { gpa, len }
}

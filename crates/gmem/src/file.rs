//! The private-memory file: a memfd with the seed's GUEST seal.
//!
//! # What user space can and cannot enforce
//!
//! The seed enforced the GUEST seal in shmem, for every process. gmem is a
//! library, so it enforces it where it can:
//!
//! - The memfd is close-on-exec and its descriptor never leaves this object;
//!   a sealed file offers no read, write or map (`EPERM`), so safe Rust in this
//!   process has no way to the content but an owner's page guards.
//! - The kernel adds teeth where its seals fit: the GUEST seal also adds
//!   `F_SEAL_EXEC` (the file can never be made executable), and ordinary
//!   seals are the kernel's own. `F_SEAL_WRITE`/`F_SEAL_FUTURE_WRITE` cannot
//!   be used for the GUEST seal, since they would forbid the writable windows
//!   KVM needs.
//! - Every page gmem allocates is mapped in the file's frame window, a
//!   mapping locked in RAM (`mlock2(MLOCK_ONFAULT)`, so never swapped): the
//!   file costs its size in `RLIMIT_MEMLOCK`, once, however many windows an
//!   owner maps. An owner that allocates pages through its window
//!   ([`Binding::lock_range_to_fill`]), or lets the kernel do so, locks that
//!   window too ([`OwnerWindow::lock_in_ram`], charged again); when it goes
//!   and the file stays, its pages are faulted into the frame window. Every
//!   mapping of a sealed file is excluded from core dumps and from forked
//!   children.
//! - Not enforceable from user space: code of this process that opens
//!   `/proc/self/fd/N` or reads `/proc/self/mem`, ptrace by a privileged
//!   process, and page migration (the kernel may still migrate locked pages;
//!   the seed disabled that in the kernel).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use rustix::fs::{self, FallocateFlags, MemfdFlags, SealFlags, SeekFrom};
use rustix::io::Errno;
use rustix::mm::ProtFlags;

use crate::error::{Error, Result};
use crate::huge::{HugePages, PageKind, HUGE_PAGE_SIZE};
use crate::locks::{LockToken, PageLocks, ResizeLock};
use crate::mapping::{HostMapping, Mapping, OwnerWindow};
use crate::seals::Seals;
use crate::types::{FileOffset, PageIndex, PageRange, PAGE_SIZE};

/// Identity of a private-memory file (its inode number), passed to owners
/// so that an owner of several files knows which one is invalidating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId(pub u64);

/// The owner of a GUEST-sealed file (the seed's `guest_ops`): the VM that
/// maps the file's pages and must drop those mappings before pages go away.
pub trait GuestOwner: Send + Sync {
    /// Called before the allocated `pages` of `file` are freed by a truncate
    /// or a hole punch, after the page locks on them were released. Once it
    /// returns, no page of the run is served again until it is freed.
    ///
    /// It may call get-and-lock for pages outside `pages`; for pages inside,
    /// and for resizing the file, it gets `EDEADLK`.
    fn invalidate_page_range(&self, file: FileId, pages: PageRange);
}

/// How [`PrivateMemFile::fallocate`] changes the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// Allocate the range, growing the file if it ends past the end.
    Allocate,
    /// Allocate the range without changing the size (`FALLOC_FL_KEEP_SIZE`).
    AllocateKeepSize,
    /// Free the range, keeping the size (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
    PunchHole,
}

/// Counters of a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// File size in bytes.
    pub size: u64,
    /// Pages the kernel holds for the file.
    pub allocated_pages: u64,
    /// Pages locked by live page guards.
    pub locked_pages: u64,
    /// Invalidation callbacks delivered to the owner.
    pub invalidations: u64,
    /// Pages covered by those callbacks.
    pub invalidated_pages: u64,
    /// Invalidations skipped because the owner no longer existed.
    pub skipped_invalidations: u64,
}

#[derive(Debug)]
struct Inode {
    size: u64,
    guest: bool,
    /// Frame window of a sealed, non-empty file: the whole file, locked in RAM.
    window: Option<Mapping>,
}

struct OwnerSlot {
    owner: Weak<dyn GuestOwner>,
    bindings: usize,
}

#[derive(Default)]
struct Counters {
    invalidations: AtomicU64,
    invalidated_pages: AtomicU64,
    skipped: AtomicU64,
}

/// A private-memory file: a real memfd that, once GUEST-sealed, only its
/// bound owner can use, page by page, through get-and-lock.
pub struct PrivateMemFile {
    fd: OwnedFd,
    id: FileId,
    /// 4 KiB, transparent huge or hugetlbfs pages.
    kind: PageKind,
    /// Whether the kernel seals the file (memfds; not tmpfs files).
    kernel_sealing: bool,
    resize: ResizeLock,
    inode: RwLock<Inode>,
    pages: PageLocks,
    host_mappings: Arc<AtomicUsize>,
    owner: Mutex<Option<OwnerSlot>>,
    /// Where each live owner window ends: the file may not shrink below.
    window_ends: Mutex<Vec<u64>>,
    counters: Counters,
}

impl std::fmt::Debug for PrivateMemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateMemFile").field("id", &self.id).finish_non_exhaustive()
    }
}

impl PrivateMemFile {
    /// Creates an empty, unsealed file (`memfd_create` with
    /// `MFD_ALLOW_SEALING | MFD_CLOEXEC`).
    pub fn new(name: &str) -> Result<Self> {
        let fd = fs::memfd_create(name, MemfdFlags::ALLOW_SEALING | MemfdFlags::CLOEXEC)
            .map_err(|errno| Error::Os { op: "memfd_create", errno })?;
        Self::from_fd(fd, PageKind::Small, true)
    }

    /// Creates an empty, unsealed file on 2 MiB pages of the kind `huge`
    /// says (`EINVAL` where this host does not offer them: see
    /// [`HugePages::offered`]).
    ///
    /// A GUEST-sealed file on huge pages takes sizes in whole 2 MiB pages
    /// (`EINVAL`); a file on hugetlbfs is allocated and punched in whole
    /// 2 MiB pages too, and a size the host's free pages cannot back gets
    /// `ENOMEM` when set. A tmpfs file has no kernel seals: adding one is
    /// `EPERM`, as the kernel answers; the GUEST seal, gmem's own, holds.
    pub fn new_huge(name: &str, huge: &HugePages) -> Result<Self> {
        let (fd, kind, kernel_sealing) = huge.create(name)?;
        Self::from_fd(fd, kind, kernel_sealing)
    }

    /// [`new_huge`](Self::new_huge), GUEST-sealed from the start.
    pub fn new_guest_huge(name: &str, huge: &HugePages) -> Result<Self> {
        let file = Self::new_huge(name, huge)?;
        file.add_seals(Seals::GUEST)?;
        Ok(file)
    }

    fn from_fd(fd: OwnedFd, kind: PageKind, kernel_sealing: bool) -> Result<Self> {
        let id = FileId(fs::fstat(&fd).map_err(|errno| Error::Os { op: "fstat", errno })?.st_ino);
        Ok(Self {
            fd,
            id,
            kind,
            kernel_sealing,
            resize: ResizeLock::default(),
            inode: RwLock::new(Inode { size: 0, guest: false, window: None }),
            pages: PageLocks::default(),
            host_mappings: Arc::new(AtomicUsize::new(0)),
            owner: Mutex::new(None),
            window_ends: Mutex::default(),
            counters: Counters::default(),
        })
    }

    /// Creates a file that is GUEST-sealed from the start (the thread's
    /// "switch at open time"): there is never a moment when it is accessible.
    pub fn new_guest(name: &str) -> Result<Self> {
        let file = Self::new(name)?;
        file.add_seals(Seals::GUEST)?;
        Ok(file)
    }

    fn window_ends(&self) -> MutexGuard<'_, Vec<u64>> {
        self.window_ends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a live owner window ending at `end` (until
    /// [`window_gone`](Self::window_gone)).
    pub(crate) fn window_made(&self, end: u64) {
        self.window_ends().push(end);
    }

    pub(crate) fn window_gone(&self, end: u64) {
        let mut ends = self.window_ends();
        if let Some(i) = ends.iter().position(|&e| e == end) {
            ends.swap_remove(i);
        }
    }

    /// How the file's pages are sized.
    pub fn page_kind(&self) -> PageKind {
        self.kind
    }

    /// The file's identity, as passed to the owner's callback.
    pub fn id(&self) -> FileId {
        self.id
    }

    fn inode(&self) -> RwLockReadGuard<'_, Inode> {
        self.inode.read().unwrap_or_else(|p| p.into_inner())
    }

    fn inode_mut(&self) -> RwLockWriteGuard<'_, Inode> {
        self.inode.write().unwrap_or_else(|p| p.into_inner())
    }

    fn owner_slot(&self) -> MutexGuard<'_, Option<OwnerSlot>> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.inode().size
    }

    /// Whether the GUEST seal is set.
    pub fn is_guest(&self) -> bool {
        self.inode().guest
    }

    fn host_access(&self, op: &'static str) -> Result<RwLockReadGuard<'_, Inode>> {
        let inode = self.inode();
        if inode.guest {
            return Err(Error::GuestSealed { op });
        }
        Ok(inode)
    }

    /// Reads at `offset` (`pread`). `EPERM` once GUEST-sealed.
    pub fn read_at(&self, buf: &mut [u8], offset: FileOffset) -> Result<usize> {
        let _inode = self.host_access("read")?;
        rustix::io::pread(&self.fd, buf, offset.0).map_err(|e| Error::os("read", e))
    }

    /// Writes at `offset` (`pwrite`), growing the file as needed. `EPERM`
    /// once GUEST-sealed, or when a kernel seal forbids it.
    pub fn write_at(&self, data: &[u8], offset: FileOffset) -> Result<usize> {
        let mut inode = self.inode_mut();
        if inode.guest {
            return Err(Error::GuestSealed { op: "write" });
        }
        let n = rustix::io::pwrite(&self.fd, data, offset.0).map_err(|e| Error::os("write", e))?;
        inode.size = inode.size.max(offset.0 + n as u64);
        Ok(n)
    }

    /// Maps `len` bytes at `offset`, shared (`mmap`). `EPERM` once
    /// GUEST-sealed; kernel seals apply (no writable map under `F_SEAL_WRITE`).
    pub fn map(&self, offset: FileOffset, len: usize, writable: bool) -> Result<HostMapping> {
        let _inode = self.host_access("mmap")?;
        let prot = if writable { ProtFlags::READ | ProtFlags::WRITE } else { ProtFlags::READ };
        let map = Mapping::new(self.fd.as_fd(), offset.0, len, prot, "mmap")?;
        Ok(HostMapping::new(map, self.host_mappings.clone()))
    }

    /// A read-write mapping of `len` bytes at `offset`, aligned to the
    /// file's page size.
    fn map_aligned(&self, offset: u64, len: usize, op: &'static str) -> Result<Mapping> {
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        Mapping::new_aligned(self.fd.as_fd(), offset, len, prot, self.kind.page_size() as usize, op)
    }

    /// The kernel seals of the memfd.
    fn kernel_seals(&self) -> Result<Seals> {
        if !self.kernel_sealing {
            return Ok(Seals::empty());
        }
        let flags = fs::fcntl_get_seals(&self.fd)
            .map_err(|errno| Error::Os { op: "F_GET_SEALS", errno })?;
        Ok(Seals::from_kernel(flags))
    }

    /// The file's seals.
    pub fn seals(&self) -> Result<Seals> {
        let guest = self.inode().guest;
        Ok(self.kernel_seals()? | if guest { Seals::GUEST } else { Seals::empty() })
    }

    /// Adds seals (`F_ADD_SEALS`). The GUEST seal needs an empty, unmapped
    /// file (`EBUSY` otherwise), as in the seed; `EPERM` under `F_SEAL_SEAL`;
    /// unknown bits `EINVAL`, as the kernel.
    pub fn add_seals(&self, seals: Seals) -> Result<()> {
        if !Seals::all().contains(seals) {
            return Err(Error::InvalidArgument { op: "add seals", why: "unknown seal bits" });
        }
        let _resize = self.resize.lock("add seals")?;
        let mut inode = self.inode_mut();
        if self.kernel_seals()?.contains(Seals::SEAL) {
            return Err(Error::SealForbids { op: "add seals" });
        }
        let new_guest = seals.contains(Seals::GUEST) && !inode.guest;
        if new_guest {
            if self.host_mappings.load(Ordering::SeqCst) != 0 {
                return Err(Error::SealBusy { why: "is mapped" });
            }
            if inode.size != 0 {
                return Err(Error::SealBusy { why: "is not empty" });
            }
        }
        if new_guest {
            // F_SEAL_EXEC on an executable memfd also adds the write seals
            // (W^X); a file without exec bits gets F_SEAL_EXEC alone.
            fs::fchmod(&self.fd, fs::Mode::RUSR | fs::Mode::WUSR)
                .map_err(|errno| Error::Os { op: "fchmod", errno })?;
        }
        let kernel = seals.to_kernel();
        if !self.kernel_sealing && !kernel.is_empty() {
            return Err(Error::SealForbids { op: "add seals (a tmpfs file has no kernel seals)" });
        }
        let with_exec = match new_guest && self.kernel_sealing {
            true => kernel | SealFlags::EXEC,
            false => kernel,
        };
        if !with_exec.is_empty() {
            match fs::fcntl_add_seals(&self.fd, with_exec) {
                // Kernels before 6.3 lack F_SEAL_EXEC; the rest still applies.
                Err(Errno::INVAL) if with_exec != kernel && !kernel.is_empty() => {
                    fs::fcntl_add_seals(&self.fd, kernel)
                }
                Err(Errno::INVAL) if with_exec != kernel => Ok(()),
                other => other,
            }
            .map_err(|e| Error::os("F_ADD_SEALS", e))?;
        }
        inode.guest |= new_guest;
        Ok(())
    }

    fn check_alignment(op: &'static str, align: u64, values: &[u64]) -> Result<()> {
        match values.iter().find(|v| *v % align != 0) {
            Some(&value) => Err(Error::Unaligned { op, value, align }),
            None => Ok(()),
        }
    }

    /// Sets the size (`ftruncate`). Shrinking invalidates and frees the pages
    /// past the new end. A GUEST-sealed file takes page-aligned sizes only
    /// (`EINVAL`); kernel seals `SHRINK`/`GROW` give `EPERM`.
    pub fn set_len(&self, size: u64) -> Result<()> {
        let _resize = self.resize.lock("ftruncate")?;
        let (old, guest) = {
            let inode = self.inode();
            (inode.size, inode.guest)
        };
        if guest {
            let kernel = self.kernel_seals()?;
            if (size < old && kernel.contains(Seals::SHRINK))
                || (size > old && kernel.contains(Seals::GROW))
            {
                return Err(Error::SealForbids { op: "ftruncate" });
            }
            Self::check_alignment("ftruncate", self.kind.page_size(), &[size])?;
        }
        i64::try_from(size)
            .map_err(|_| Error::InvalidArgument { op: "ftruncate", why: "size too large" })?;
        // Windows are made under the resize lock too: none appears meanwhile.
        if let Some(&window_end) = self.window_ends().iter().max().filter(|&&end| end > size) {
            return Err(Error::WindowBusy { size, window_end });
        }
        let removed =
            PageRange::new(PageIndex(size.div_ceil(PAGE_SIZE)), PageIndex(old.div_ceil(PAGE_SIZE)));
        self.remove_pages("ftruncate", removed, |file, inode| {
            let window = file.window_for(inode, size)?;
            fs::ftruncate(&file.fd, size).map_err(|e| Error::os("ftruncate", e))?;
            inode.size = size;
            inode.window = window;
            Ok(())
        })
    }

    /// The frame window a file of `size` bytes needs (sealed files only),
    /// with the pages allocated so far (and kept by the new size) already
    /// mapped, so that they stay locked when the old window goes.
    fn window_for(&self, inode: &Inode, size: u64) -> Result<Option<Mapping>> {
        if !inode.guest || size == 0 {
            return Ok(None);
        }
        let len = usize::try_from(size)
            .map_err(|_| Error::InvalidArgument { op: "ftruncate", why: "size too large" })?;
        let map = self.map_aligned(0, len, "map frame window").map_err(|e| match e.errno() {
            // hugetlbfs reserves the pages of a shared mapping when it is made.
            Errno::NOMEM if self.kind == PageKind::HugeTlb => {
                Error::NoFreeHugePages { bytes: size }
            }
            _ => e,
        })?;
        map.lock_in_ram()?;
        map.keep_private()?;
        let kept = PageRange::new(PageIndex(0), PageIndex(inode.size.min(size) / PAGE_SIZE));
        self.fault_in_allocated(&map, kept)?;
        Ok(Some(map))
    }

    /// Faults the allocated pages of `pages` into `frame_window` (which
    /// maps the file from offset 0 and covers them): the pages are locked
    /// in RAM by it, and no hole is allocated.
    fn fault_in_allocated(&self, frame_window: &Mapping, pages: PageRange) -> Result<()> {
        for run in self.allocated_runs(pages)? {
            let bytes = run.bytes();
            frame_window.fault_in(bytes.start as usize, (bytes.end - bytes.start) as usize)?;
        }
        Ok(())
    }

    /// Locks the allocated pages of `pages` in RAM through the frame
    /// window: for a locked owner window that goes, whose pages the frame
    /// window may not hold. Under the resize lock, so that no punch or
    /// truncate turns a page found allocated into a hole that faulting in
    /// would allocate.
    pub(crate) fn keep_locked(&self, pages: PageRange) -> Result<()> {
        let _resize = self.resize.lock("unmap a locked owner window")?;
        let inode = self.inode();
        let Some(window) = &inode.window else { return Ok(()) };
        let end = pages.end.0.min(inode.size / PAGE_SIZE);
        if pages.start.0 >= end {
            return Ok(());
        }
        self.fault_in_allocated(window, PageRange::new(pages.start, PageIndex(end)))
    }

    /// Allocates or punches a range (`fallocate`). On a GUEST-sealed file
    /// offset and length must be page-aligned (`EINVAL`), for punching too
    /// (the seed checked allocation only; guest_memfd checks both), and a
    /// keep-size allocation must lie inside the file (`EINVAL`, as
    /// guest_memfd). Allocated pages of a sealed file are locked in RAM.
    pub fn fallocate(&self, mode: Fallocate, offset: FileOffset, len: u64) -> Result<()> {
        let op = "fallocate";
        let _resize = self.resize.lock(op)?;
        let (size, guest) = {
            let inode = self.inode();
            (inode.size, inode.guest)
        };
        let end = offset.0.checked_add(len).filter(|&e| i64::try_from(e).is_ok());
        let Some(end) = end.filter(|_| len != 0) else {
            return Err(Error::InvalidArgument { op, why: "empty or overflowing range" });
        };
        if guest {
            Self::check_alignment(op, self.kind.punch_unit(), &[offset.0, len])?;
        }
        match mode {
            Fallocate::PunchHole => {
                let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                let inside = end.min(size);
                let freed = PageRange::new(
                    PageIndex(offset.0.div_ceil(PAGE_SIZE)),
                    PageIndex(inside / PAGE_SIZE),
                );
                self.remove_pages(op, freed, |file, _| {
                    fs::fallocate(&file.fd, flags, offset.0, len).map_err(|e| Error::os(op, e))
                })
            }
            Fallocate::Allocate | Fallocate::AllocateKeepSize => {
                let keep = mode == Fallocate::AllocateKeepSize;
                if guest && keep && end > size {
                    // As guest_memfd: no page of a sealed file exists past its
                    // end, so every allocated page is in the locked window.
                    return Err(Error::InvalidArgument {
                        op,
                        why: "allocation past the end of a guest file",
                    });
                }
                let flags = if keep { FallocateFlags::KEEP_SIZE } else { FallocateFlags::empty() };
                let mut inode = self.inode_mut();
                let new_size = if keep { size } else { size.max(end) };
                let window =
                    if new_size != size { Some(self.window_for(&inode, new_size)?) } else { None };
                fs::fallocate(&self.fd, flags, offset.0, len).map_err(|e| Error::os(op, e))?;
                inode.size = new_size;
                if let Some(window) = window {
                    inode.window = window;
                }
                // Fault the new pages into the locked window, so that they are
                // locked in RAM like pages served by get-and-lock.
                if let Some(window) = &inode.window {
                    let locked_end = end.min(new_size);
                    if locked_end > offset.0 {
                        window.fault_in(offset.0 as usize, (locked_end - offset.0) as usize)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Runs `free` (which frees `pages` in the kernel) after waiting for the
    /// page locks on them and telling the owner which allocated runs go away.
    /// The caller holds the resize lock.
    fn remove_pages(
        &self,
        op: &'static str,
        pages: PageRange,
        free: impl FnOnce(&Self, &mut Inode) -> Result<()>,
    ) -> Result<()> {
        if pages.is_empty() {
            return free(self, &mut self.inode_mut());
        }
        /// Ends the invalidation however the owner's callback returns
        /// (a panicking callback must not leave the pages fenced forever).
        struct Invalidating<'a>(&'a PageLocks, LockToken);
        impl Drop for Invalidating<'_> {
            fn drop(&mut self) {
                self.0.end_invalidate(self.1);
            }
        }
        let _invalidating = Invalidating(&self.pages, self.pages.begin_invalidate(pages, op)?);
        for run in self.allocated_runs(pages)? {
            self.invalidate(run);
        }
        free(self, &mut self.inode_mut())
    }

    /// Allocated runs of pages inside `pages` (`SEEK_DATA`/`SEEK_HOLE`).
    /// `SEEK_HOLE` walks the whole data run, however far past `pages` it
    /// goes (16 us for a 4 KiB punch inside a few MiB of guest memory), so
    /// short ranges are probed page by page with `SEEK_DATA` instead.
    fn allocated_runs(&self, pages: PageRange) -> Result<Vec<PageRange>> {
        let seek = |to| match fs::seek(&self.fd, to) {
            Err(Errno::NXIO) => Ok(None),
            other => other.map(Some).map_err(|errno| Error::Os { op: "lseek", errno }),
        };
        let end = pages.bytes().end;
        let mut pos = pages.bytes().start;
        let mut runs = Vec::new();
        while pos < end {
            let Some(data) = seek(SeekFrom::Data(pos))?.filter(|&d| d < end) else {
                break;
            };
            const PROBE_PAGES: u64 = 64;
            let hole = if end - data <= PROBE_PAGES * PAGE_SIZE {
                let mut at = data + PAGE_SIZE;
                while at < end && seek(SeekFrom::Data(at))? == Some(at) {
                    at += PAGE_SIZE;
                }
                at
            } else {
                seek(SeekFrom::Hole(data))?.unwrap_or(end).min(end)
            };
            runs.push(PageRange::covering(data, hole - data));
            pos = hole;
        }
        Ok(runs)
    }

    /// Tells the owner, if it still exists, that `pages` are going away.
    fn invalidate(&self, pages: PageRange) {
        let owner = match self.owner_slot().as_ref() {
            None => return,
            Some(slot) => slot.owner.upgrade(),
        };
        match owner {
            Some(owner) => {
                owner.invalidate_page_range(self.id, pages);
                self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                self.counters.invalidated_pages.fetch_add(pages.len(), Ordering::Relaxed);
            }
            // The seed's caveat: the file outlived its owner. Skip, never touch it.
            None => {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The file's counters.
    pub fn stats(&self) -> Stats {
        let blocks = fs::fstat(&self.fd).map(|st| st.st_blocks as u64).unwrap_or(0);
        Stats {
            size: self.size(),
            allocated_pages: blocks * 512 / PAGE_SIZE,
            locked_pages: self.pages.locked_pages(),
            invalidations: self.counters.invalidations.load(Ordering::Relaxed),
            invalidated_pages: self.counters.invalidated_pages.load(Ordering::Relaxed),
            skipped_invalidations: self.counters.skipped.load(Ordering::Relaxed),
        }
    }

    /// Binds `owner` to this GUEST-sealed file (the seed's
    /// `memfd_register_guest`) and returns the owner's handle to its pages.
    ///
    /// `EINVAL` if the file is not GUEST-sealed; binding the owner that is
    /// already bound succeeds; another owner gets `EPERM`. The owner is held
    /// weakly: invalidations after it is gone are skipped. The file stays
    /// bound until every [`Binding`] is dropped.
    pub fn bind<O: GuestOwner + 'static>(self: &Arc<Self>, owner: &Arc<O>) -> Result<Binding> {
        if !self.is_guest() {
            return Err(Error::NotGuestFile);
        }
        let weak: Weak<dyn GuestOwner> = Arc::downgrade(owner) as Weak<dyn GuestOwner>;
        let mut slot = self.owner_slot();
        match slot.as_mut() {
            Some(bound) if !Weak::ptr_eq(&bound.owner, &weak) => return Err(Error::OwnerConflict),
            Some(bound) => bound.bindings += 1,
            None => *slot = Some(OwnerSlot { owner: weak.clone(), bindings: 1 }),
        }
        Ok(Binding { file: self.clone() })
    }

    /// Whether an owner is bound.
    pub fn is_bound(&self) -> bool {
        self.owner_slot().is_some()
    }

    fn unbind(&self) {
        let mut slot = self.owner_slot();
        if let Some(bound) = slot.as_mut() {
            bound.bindings -= 1;
            if bound.bindings == 0 {
                *slot = None;
            }
        }
    }
}

/// An owner's handle to a bound file (the seed's `guest_mem_ops`): it gets
/// and locks pages, and maps the owner's window. Dropping the last binding
/// unbinds the owner.
#[derive(Debug)]
pub struct Binding {
    file: Arc<PrivateMemFile>,
}

impl Binding {
    /// The bound file.
    pub fn file(&self) -> &Arc<PrivateMemFile> {
        &self.file
    }

    /// Gets and locks one page (the seed's `get_lock_pfn`).
    pub fn get_and_lock(&self, page: PageIndex) -> Result<PageGuard<'_>> {
        let size = self.file.size();
        let end = page.0.checked_add(1).ok_or(Error::PastEof { page, size })?;
        self.get_and_lock_range(PageRange::new(page, PageIndex(end)))
    }

    /// Gets and locks a run of pages: each is allocated (zero-filled) if it
    /// was not, and locked in RAM; `EINVAL` if the run reaches past the end
    /// of the file (the seed's `SGP_WRITE` allocated there; gmem does not).
    /// Waits while any page of the run is locked or being invalidated.
    pub fn get_and_lock_range(&self, pages: PageRange) -> Result<PageGuard<'_>> {
        self.lock_range(pages, Fill::Allocate { again_if_invalidating: false }, &[])
    }

    /// Locks a run of pages without allocating them, for an owner that
    /// allocates the holes it needs itself through `window` (userfaultfd's
    /// `UFFDIO_ZEROPAGE`, say): each page is then mapped once, in the
    /// window, where get-and-lock maps it in the frame window too. The
    /// window must be locked in RAM ([`OwnerWindow::lock_in_ram`]), so that
    /// what it allocates is, and must map the pages: `EINVAL` otherwise,
    /// and past the end of the file. Waits as get-and-lock does.
    pub fn lock_range_to_fill(
        &self,
        window: &OwnerWindow,
        pages: PageRange,
    ) -> Result<PageGuard<'_>> {
        let op = "lock to fill";
        if !window.is_locked_in_ram() {
            return Err(Error::InvalidArgument { op, why: "the window is not locked in RAM" });
        }
        let mapped = window.pages();
        if !Arc::ptr_eq(window.file(), &self.file)
            || pages.start.0 < mapped.start.0
            || pages.end.0 > mapped.end.0
        {
            return Err(Error::InvalidArgument { op, why: "pages outside the window" });
        }
        self.lock_range(pages, Fill::Owner, &[])
    }

    /// Writes `data` at `offset` into the file (the owner's launch-time
    /// populate): locks the pages it covers, writes through the page cache
    /// (which allocates them, zero-filling only what `data` leaves out) and
    /// locks them in RAM. `EINVAL` past the end of the file.
    pub fn populate(&self, offset: FileOffset, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let end = offset
            .0
            .checked_add(len)
            .ok_or(Error::InvalidArgument { op: "populate", why: "range wraps" })?;
        if len == 0 {
            return Ok(());
        }
        let pages = PageRange::covering(offset.0, end - offset.0);
        let fill = Fill::Allocate { again_if_invalidating: false };
        self.lock_range(pages, fill, &[(offset.0 - pages.start.offset().0, data)]).map(drop)
    }

    /// Locks a run of pages as they are: holes stay holes, nothing is
    /// locked in RAM yet. For an owner that writes the pages' content
    /// itself ([`PageGuard::write`], a snapshot restore) and then calls
    /// [`PageGuard::fill`], or only reads them ([`PageGuard::read`] reads
    /// a hole as zero). Waits as get-and-lock does, or with
    /// `again_if_invalidating` fails with `EAGAIN` while part of the run
    /// is being invalidated.
    pub fn lock_range_unfilled(
        &self,
        pages: PageRange,
        again_if_invalidating: bool,
    ) -> Result<PageGuard<'_>> {
        if pages.is_empty() {
            return Err(Error::InvalidArgument { op: "lock", why: "empty page range" });
        }
        let token = self.file.pages.lock(pages, again_if_invalidating)?;
        let guard = PageGuard { binding: self, pages, token };
        let size = self.file.size();
        if pages.end.0 > size / PAGE_SIZE {
            return Err(Error::PastEof { page: PageIndex(pages.end.0.saturating_sub(1)), size });
        }
        Ok(guard)
    }

    /// Allocated runs of pages inside `pages` (`SEEK_DATA`/`SEEK_HOLE`),
    /// in order: what a snapshot of the file must hold.
    pub fn allocated_runs(&self, pages: PageRange) -> Result<Vec<PageRange>> {
        self.file.allocated_runs(pages)
    }

    /// As [`get_and_lock_range`](Self::get_and_lock_range), but fails with
    /// `EAGAIN` instead of waiting while part of the run is being
    /// invalidated: for a caller that may hold up the invalidation itself
    /// (e.g. through a lock the owner's callback takes).
    pub fn get_and_lock_range_or_again(&self, pages: PageRange) -> Result<PageGuard<'_>> {
        self.lock_range(pages, Fill::Allocate { again_if_invalidating: true }, &[])
    }

    /// Locks `pages`, writes `writes` (offset into the pages, bytes) through
    /// the page cache, then, as `fill` says, allocates whatever is left by
    /// faulting the pages into the frame window.
    fn lock_range(
        &self,
        pages: PageRange,
        fill: Fill,
        writes: &[(u64, &[u8])],
    ) -> Result<PageGuard<'_>> {
        if pages.is_empty() {
            return Err(Error::InvalidArgument { op: "get-and-lock", why: "empty page range" });
        }
        let file = &*self.file;
        let again_if_invalidating = matches!(fill, Fill::Allocate { again_if_invalidating: true });
        let token = file.pages.lock(pages, again_if_invalidating)?;
        let guard = PageGuard { binding: self, pages, token };
        let inode = file.inode();
        if pages.end.0 > inode.size / PAGE_SIZE {
            return Err(Error::PastEof { page: PageIndex(pages.end.0 - 1), size: inode.size });
        }
        for (at, data) in writes {
            guard.write(*at, data)?;
        }
        if fill == Fill::Owner {
            return Ok(guard);
        }
        // Allocate by faulting the pages into the frame window: zero-filled
        // (unless just written), "uptodate" (so SEEK_DATA sees them for
        // invalidation) and locked in RAM from the start, by the one mapping
        // charged to RLIMIT_MEMLOCK.
        let window = inode.window.as_ref().ok_or(Error::PastEof { page: pages.start, size: 0 })?;
        let bytes = pages.bytes();
        window.fault_in(bytes.start as usize, (bytes.end - bytes.start) as usize)?;
        drop(inode);
        Ok(guard)
    }

    /// Makes the 2 MiB pages of `pages` huge again after 4 KiB punches
    /// split them (`MADV_COLLAPSE` through `window`, which then maps them by
    /// PMD; other mappings of the file fault them in again). Holes in the
    /// range are allocated first, as zero pages. The pages are locked meanwhile
    /// (invalidations wait), and stay locked in RAM through the frame
    /// window afterwards.
    ///
    /// `EINVAL` unless the file has transparent huge pages and `pages` is a
    /// run of whole 2 MiB pages inside `window`; the kernel's errno where
    /// it cannot collapse (`EAGAIN`: a page was busy; `ENOMEM`).
    pub fn collapse(&self, window: &OwnerWindow, pages: PageRange) -> Result<()> {
        let op = "collapse";
        if self.file.kind != PageKind::TransparentHuge {
            return Err(Error::InvalidArgument { op, why: "not a file on transparent huge pages" });
        }
        let bytes = pages.bytes();
        PrivateMemFile::check_alignment(op, HUGE_PAGE_SIZE, &[bytes.start, bytes.end])?;
        let mapped = window.pages();
        if !Arc::ptr_eq(window.file(), &self.file)
            || pages.is_empty()
            || pages.start.0 < mapped.start.0
            || pages.end.0 > mapped.end.0
        {
            return Err(Error::InvalidArgument { op, why: "pages outside the window" });
        }
        // Holes are allocated first (the kernel refuses to fill them where
        // a mapping of the file reports missing pages to a userfaultfd).
        self.file.fallocate(
            Fallocate::AllocateKeepSize,
            FileOffset(bytes.start),
            bytes.end - bytes.start,
        )?;
        let guard = self.lock_range(pages, Fill::Owner, &[])?;
        let at = (bytes.start - window.file_offset().0) as usize;
        let collapsed = window.mapping().collapse(at, (bytes.end - bytes.start) as usize);
        drop(guard);
        // After the page locks: a punch takes the resize lock, then them.
        self.file.keep_locked(pages)?;
        collapsed
    }

    /// Maps `len` bytes of the file at `offset` as the owner's window.
    /// Both must be multiples of the file's page size (4 KiB, or 2 MiB on
    /// huge pages) and inside the file (`EINVAL`). On huge pages the
    /// window is 2 MiB-aligned, so that they can be mapped huge.
    pub fn map_window(&self, offset: FileOffset, len: u64) -> Result<OwnerWindow> {
        let op = "map owner window";
        PrivateMemFile::check_alignment(op, self.file.kind.page_size(), &[offset.0, len])?;
        // No resize between the check and the window's count (set_len).
        let _resize = self.file.resize.lock(op)?;
        let inside = offset.0.checked_add(len).is_some_and(|end| end <= self.file.size());
        if len == 0 || !inside {
            return Err(Error::InvalidArgument {
                op,
                why: "range empty or past the end of the file",
            });
        }
        let len =
            usize::try_from(len).map_err(|_| Error::InvalidArgument { op, why: "too large" })?;
        let map = self.file.map_aligned(offset.0, len, op)?;
        map.keep_private()?;
        Ok(OwnerWindow::new(map, offset.0, self.file.clone()))
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.file.unbind();
    }
}

/// Who allocates the holes of a run that [`Binding::lock_range`] locks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// gmem, in the frame window (get-and-lock); waiting while part of the
    /// run is being invalidated, or failing with `EAGAIN`.
    Allocate { again_if_invalidating: bool },
    /// The owner, through its locked window.
    Owner,
}

/// Locked pages of a bound file. Dropping it is the seed's
/// `put_unlock_pfn`: the pages are unlocked. (Shmem pages have no backing
/// store, so "mark dirty" has nothing to do: the kernel never writes them back.)
#[derive(Debug)]
pub struct PageGuard<'a> {
    binding: &'a Binding,
    pages: PageRange,
    token: LockToken,
}

impl PageGuard<'_> {
    /// The locked pages.
    pub fn pages(&self) -> PageRange {
        self.pages
    }

    /// File offset of the first locked page: with the owner's window, what a
    /// consumer needs to map it.
    pub fn offset(&self) -> FileOffset {
        self.pages.start.offset()
    }

    /// Physical frame numbers of the locked pages (from `/proc/self/pagemap`
    /// of the frame window, which maps them; 0 where the kernel hides them
    /// from an unprivileged process). Pages of a
    /// [`lock_range_to_fill`](Binding::lock_range_to_fill) guard are
    /// faulted into the frame window first (a hole is allocated, as
    /// get-and-lock would have).
    pub fn frames(&self) -> Result<Vec<u64>> {
        use std::os::unix::fs::FileExt;
        self.fill()?;
        let inode = self.binding.file.inode();
        // Locked pages lie inside the file, so the window exists.
        let window =
            inode.window.as_ref().ok_or(Error::PastEof { page: self.pages.start, size: 0 })?;
        let bytes = self.pages.bytes();
        let pagemap =
            std::fs::File::open("/proc/self/pagemap").map_err(Error::io("open pagemap"))?;
        let first = (window.addr() as u64 + bytes.start) / PAGE_SIZE;
        let mut raw = vec![0u8; self.pages.len() as usize * 8];
        pagemap.read_exact_at(&mut raw, first * 8).map_err(Error::io("read pagemap"))?;
        Ok(raw
            .chunks_exact(8)
            .map(|entry| {
                u64::from_le_bytes(entry.try_into().expect("8-byte entry")) & ((1 << 55) - 1)
            })
            .collect())
    }

    /// Allocates the locked pages that are holes (zero-filled) and locks
    /// every one in RAM, through the frame window: what get-and-lock does,
    /// after the owner wrote their content
    /// ([`Binding::lock_range_unfilled`]).
    pub fn fill(&self) -> Result<()> {
        let inode = self.binding.file.inode();
        let window =
            inode.window.as_ref().ok_or(Error::PastEof { page: self.pages.start, size: 0 })?;
        let bytes = self.pages.bytes();
        window.fault_in(bytes.start as usize, (bytes.end - bytes.start) as usize)
    }

    fn span(&self, offset: u64, len: usize) -> Result<usize> {
        let bytes = self.pages.bytes();
        let start = bytes
            .start
            .checked_add(offset)
            .filter(|s| s.checked_add(len as u64).is_some_and(|end| end <= bytes.end));
        start.map(|s| s as usize).ok_or(Error::InvalidArgument {
            op: "page guard access",
            why: "outside the locked pages",
        })
    }

    /// Writes `data` at `offset` bytes into the locked pages (the owner's
    /// own access, e.g. populating a guest image). `EINVAL` outside them.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let at = self.span(offset, data.len())?;
        // Through the page cache: a copy per page, no page fault per page
        // in the frame window (a third faster for populate).
        let mut done = 0;
        while done < data.len() {
            done += rustix::io::pwrite(&self.binding.file.fd, &data[done..], (at + done) as u64)
                .map_err(|errno| Error::Os { op: "pwrite", errno })?;
        }
        Ok(())
    }

    /// Reads from the locked pages at `offset` into `buf`. `EINVAL` outside them.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.span(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let n = rustix::io::pread(&self.binding.file.fd, &mut buf[done..], (at + done) as u64)
                .map_err(|errno| Error::Os { op: "pread", errno })?;
            if n == 0 {
                return Err(Error::Os { op: "pread", errno: Errno::IO });
            }
            done += n;
        }
        Ok(())
    }
}

impl Drop for PageGuard<'_> {
    fn drop(&mut self) {
        self.binding.file.pages.unlock(self.token);
    }
}

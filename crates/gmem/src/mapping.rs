//! Shared mappings of a private-memory file.
//!
//! Three kinds exist: [`HostMapping`], what host user space gets from an
//! unsealed file (counted, since the GUEST seal needs none to exist);
//! [`OwnerWindow`], the owner's (KVM's) view of a sealed file, the only
//! mapping a sealed file ever has outside gmem; and the file's own frame
//! window, through which gmem allocates and locks pages.

use std::ffi::c_void;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use rustix::mm::{self, Advice, MapFlags, MlockFlags, ProtFlags};

use crate::error::{Error, Result};
use crate::{PageRange, PrivateMemFile};

/// An owned `mmap` of part of a file; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; accessing
// it from several threads is no different from accessing a memfd through
// pread/pwrite, and all access goes through raw-pointer copies.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, shared.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        prot: ProtFlags,
        op: &'static str,
    ) -> Result<Self> {
        if len == 0 {
            return Err(Error::InvalidArgument { op, why: "empty mapping" });
        }
        // SAFETY: a new mapping at a kernel-chosen address, so no existing
        // memory is replaced; the result is owned by the returned value.
        let ptr =
            unsafe { mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, offset) }
                .map_err(|e| Error::os(op, e))?;
        let ptr = NonNull::new(ptr).ok_or(Error::Os { op, errno: rustix::io::Errno::NOMEM })?;
        Ok(Self { ptr, len })
    }

    /// As [`new`](Self::new), at an address that is a multiple of `align`
    /// (a power of two), where `offset` is too: a file's 2 MiB pages can
    /// then be mapped by PMDs (and KVM maps them huge). A reservation of
    /// `len + align` bytes is mapped, the file placed at its first aligned
    /// address and the rest unmapped. Asks for huge pages too
    /// (`MADV_HUGEPAGE`: needed where the host's setting is `advise`).
    pub(crate) fn new_aligned(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        prot: ProtFlags,
        align: usize,
        op: &'static str,
    ) -> Result<Self> {
        if align <= crate::PAGE_SIZE as usize {
            return Self::new(fd, offset, len, prot, op);
        }
        let span = len
            .checked_add(align)
            .ok_or(Error::InvalidArgument { op, why: "mapping too large" })?;
        // SAFETY: a new anonymous reservation, at an address the kernel
        // picks: nothing else is there.
        let reserved = unsafe {
            mm::mmap_anonymous(std::ptr::null_mut(), span, ProtFlags::empty(), MapFlags::PRIVATE)
        }
        .map_err(|e| Error::os(op, e))?;
        let base = reserved as usize;
        let at = base.next_multiple_of(align);
        // SAFETY: `[at, at + len)` lies inside the reservation made above,
        // which no one else uses; MAP_FIXED replaces that part of it.
        let placed = unsafe {
            mm::mmap(at as *mut c_void, len, prot, MapFlags::SHARED | MapFlags::FIXED, fd, offset)
        };
        let tail = at + len;
        if at > base {
            // SAFETY: the reservation's slack before the file's mapping, unused.
            let _ = unsafe { mm::munmap(reserved, at - base) };
        }
        if tail < base + span {
            // SAFETY: the reservation's slack after the file's mapping, unused.
            let _ = unsafe { mm::munmap(tail as *mut c_void, base + span - tail) };
        }
        let ptr = match placed {
            Ok(ptr) => ptr,
            Err(errno) => {
                // SAFETY: the part of the reservation that held the file.
                let _ = unsafe { mm::munmap(at as *mut c_void, len) };
                return Err(Error::os(op, errno));
            }
        };
        let map =
            Self { ptr: NonNull::new(ptr).ok_or(Error::os(op, rustix::io::Errno::NOMEM))?, len };
        // SAFETY: the mapping just made, which this object owns.
        unsafe { mm::madvise(map.ptr.as_ptr(), len, Advice::LinuxHugepage) }
            .map_err(|errno| Error::Os { op: "MADV_HUGEPAGE", errno })?;
        Ok(map)
    }

    /// Makes the 2 MiB pages of `[offset, offset + len)` huge again
    /// (`MADV_COLLAPSE`: holes are filled with zero pages, small pages
    /// copied into a new huge one, which this mapping maps by PMD).
    pub(crate) fn collapse(&self, offset: usize, len: usize) -> Result<()> {
        let at = self.span(offset, len)?;
        // MADV_COLLAPSE (25) is not in rustix's `Advice`: the raw call.
        // SAFETY: the range lies in this mapping; MADV_COLLAPSE keeps its
        // content.
        if unsafe { libc::madvise(at.cast(), len, 25) } == 0 {
            return Ok(());
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        Err(Error::Os { op: "MADV_COLLAPSE", errno: rustix::io::Errno::from_raw_os_error(errno) })
    }

    /// Locks the pages of the mapping in RAM as they are faulted in
    /// (`mlock2(MLOCK_ONFAULT)`). The kernel charges the whole length to
    /// `RLIMIT_MEMLOCK`, so a file has one such mapping: its frame window.
    pub(crate) fn lock_in_ram(&self) -> Result<()> {
        // SAFETY: the range is exactly this mapping, owned by `self`.
        unsafe { mm::mlock_with(self.ptr.as_ptr(), self.len, MlockFlags::ONFAULT) }.map_err(
            |errno| match errno {
                rustix::io::Errno::NOMEM | rustix::io::Errno::AGAIN | rustix::io::Errno::PERM => {
                    Error::MemlockLimit { bytes: self.len as u64, errno }
                }
                errno => Error::Os { op: "mlock2", errno },
            },
        )
    }

    /// Keeps the mapping out of core dumps and forked children.
    pub(crate) fn keep_private(&self) -> Result<()> {
        for advice in [Advice::LinuxDontFork, Advice::LinuxDontDump] {
            // SAFETY: advice that changes no content, on this mapping only.
            unsafe { mm::madvise(self.ptr.as_ptr(), self.len, advice) }
                .map_err(|errno| Error::Os { op: "madvise", errno })?;
        }
        Ok(())
    }

    /// Faults in (allocating where needed) the pages of `offset..offset +
    /// len`, as a read access would: a read fault on a shmem hole allocates a
    /// zero-filled page, and maps it without the write-fault path, which
    /// costs a quarter of populate's rate (`gmem bench`).
    pub(crate) fn fault_in(&self, offset: usize, len: usize) -> Result<()> {
        let at = self.span(offset, len)?;
        // SAFETY: the range lies inside this mapping (checked by span);
        // populating changes no content (new shmem pages are zero-filled).
        unsafe { mm::madvise(at.cast(), len, Advice::LinuxPopulateRead) }
            .map_err(|errno| Error::Os { op: "MADV_POPULATE_READ", errno })
    }

    pub(crate) fn addr(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The mapping's address of `len` bytes at `offset`; `EINVAL` where
    /// they do not lie inside it (checked without overflow).
    fn span(&self, offset: usize, len: usize) -> Result<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr().wrapping_add(offset)),
            _ => Err(Error::InvalidArgument { op: "mapping access", why: "outside the mapping" }),
        }
    }

    /// Copies `src` into the mapping at `offset`; `EINVAL` past the end.
    pub(crate) fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        let dst = self.span(offset, src.len())?;
        // SAFETY: the destination lies inside the mapping (checked by span)
        // and cannot overlap `src`, a Rust slice outside it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    /// Copies bytes at `offset` of the mapping into `dst`; `EINVAL` past the end.
    pub(crate) fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let src = self.span(offset, dst.len())?;
        // SAFETY: the source lies inside the mapping (checked by span) and
        // cannot overlap `dst`, a Rust slice outside it.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `Mapping::new` and is owned by
        // `self`; nothing refers to it after drop.
        let _ = unsafe { mm::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// A host mapping of an unsealed private-memory file; unmapped on drop.
///
/// While one exists, the GUEST seal cannot be added (`EBUSY`).
#[derive(Debug)]
pub struct HostMapping {
    map: Mapping,
    live: Arc<AtomicUsize>,
}

impl HostMapping {
    pub(crate) fn new(map: Mapping, live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Self { map, live }
    }

    /// Address of the first mapped byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.addr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty (never: mappings have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Copies `src` into the mapping at `offset`; `EINVAL` if any byte
    /// would land past the end (offsets near `usize::MAX` included).
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.map.write(offset, src)
    }

    /// Copies bytes at `offset` into `dst`; `EINVAL` past the end.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.map.read(offset, dst)
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The owner's window on a GUEST-sealed file: a shared, read-write mapping
/// kept out of core dumps and children, that gmem never reads or writes.
/// KVM maps guest memory from it (its address becomes a memslot's
/// `userspace_addr`). The owner serves its pages with get-and-lock, which
/// allocates them in the file's frame window (locked in RAM, so a window
/// costs no `RLIMIT_MEMLOCK`), or, once the window itself is locked in RAM
/// ([`lock_in_ram`](Self::lock_in_ram)), allocates them through the window
/// ([`Binding::lock_range_to_fill`](crate::Binding::lock_range_to_fill)):
/// each page is then mapped once, not twice. Pages a locked window holds
/// are mapped into the frame window when it goes, so they stay locked.
#[derive(Debug)]
pub struct OwnerWindow {
    map: Mapping,
    offset: u64,
    file: Arc<PrivateMemFile>,
    locked: AtomicBool,
}

impl OwnerWindow {
    /// Counts as a live window of `file`, which cannot shrink below its
    /// end while it lives.
    pub(crate) fn new(map: Mapping, offset: u64, file: Arc<PrivateMemFile>) -> Self {
        file.window_made(offset + map.len() as u64);
        Self { map, offset, file, locked: AtomicBool::new(false) }
    }

    /// Address of the first byte of the window.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.addr()
    }

    /// Length of the window in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the window is empty (never: windows have at least one page).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// File offset of the window's first byte.
    pub fn file_offset(&self) -> crate::FileOffset {
        crate::FileOffset(self.offset)
    }

    /// Locks the window's pages in RAM as they are faulted in, for an owner
    /// that allocates pages through it, or lets the kernel do so (the frame
    /// window then does not hold them). Charges the window's length to
    /// `RLIMIT_MEMLOCK` (`EAGAIN`/`ENOMEM`/`EPERM` beyond it, as
    /// [`Error::MemlockLimit`](crate::Error::MemlockLimit)).
    pub fn lock_in_ram(&self) -> Result<()> {
        self.map.lock_in_ram()?;
        self.locked.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether [`lock_in_ram`](Self::lock_in_ram) succeeded.
    pub fn is_locked_in_ram(&self) -> bool {
        self.locked.load(Ordering::Acquire)
    }

    /// Bytes of the window mapped by PMDs (2 MiB page table entries) now:
    /// its `ShmemPmdMapped` (or `FilePmdMapped`) in `/proc/self/smaps`.
    pub fn huge_mapped_bytes(&self) -> Result<u64> {
        Self::huge_mapped_bytes_of([self])
    }

    /// [`huge_mapped_bytes`](Self::huge_mapped_bytes) of several windows,
    /// summed, from one read of `/proc/self/smaps`.
    pub fn huge_mapped_bytes_of<'a>(windows: impl IntoIterator<Item = &'a Self>) -> Result<u64> {
        let spans: Vec<(u64, u64)> = windows
            .into_iter()
            .map(|w| (w.as_ptr() as u64, w.as_ptr() as u64 + w.len() as u64))
            .collect();
        if spans.is_empty() {
            return Ok(0);
        }
        let smaps = std::fs::read_to_string("/proc/self/smaps")
            .map_err(crate::error::Error::io("read /proc/self/smaps"))?;
        let mut inside = false;
        let mut kib = 0;
        for line in smaps.lines() {
            // A mapping's header: `START-END PERMS ...`; its fields end in kB.
            let range = line.split(' ').next().and_then(|r| r.split_once('-'));
            if let Some((a, b)) = range.filter(|_| !line.ends_with("kB")) {
                let parse = |x| u64::from_str_radix(x, 16).ok();
                if let (Some(a), Some(b)) = (parse(a), parse(b)) {
                    inside = spans.iter().any(|&(start, end)| a >= start && b <= end);
                    continue;
                }
            }
            let field = line
                .strip_prefix("ShmemPmdMapped:")
                .or_else(|| line.strip_prefix("FilePmdMapped:"));
            if let Some(value) = field.filter(|_| inside) {
                kib += value.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            }
        }
        Ok(kib * 1024)
    }

    /// Maps the window's pages 4 KiB at a time only (`MADV_NOHUGEPAGE`): a
    /// view that must not map a whole 2 MiB page for one of its pages.
    pub fn map_small_pages_only(&self) -> Result<()> {
        // SAFETY: advice on the window's own mapping; no content changes.
        unsafe { mm::madvise(self.map.addr().cast(), self.len(), Advice::LinuxNoHugepage) }
            .map_err(|errno| Error::Os { op: "MADV_NOHUGEPAGE", errno })
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The file the window maps.
    pub(crate) fn file(&self) -> &Arc<PrivateMemFile> {
        &self.file
    }

    /// The file pages the window maps.
    pub(crate) fn pages(&self) -> PageRange {
        PageRange::covering(self.offset, self.map.len() as u64)
    }
}

impl Drop for OwnerWindow {
    fn drop(&mut self) {
        // Pages allocated through a locked window may be mapped nowhere
        // else: keep them locked, in the frame window, unless the file
        // goes with the window. Where that cannot be done (the resize lock
        // is this thread's own, out of memory) they stay in the file
        // unlocked, as a shmem page of a plain memfd is.
        if self.is_locked_in_ram() && Arc::strong_count(&self.file) > 1 {
            let _ = self.file.keep_locked(self.pages());
        }
        self.file.window_gone(self.offset + self.map.len() as u64);
    }
}

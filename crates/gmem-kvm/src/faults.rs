//! Serving guest page faults, driven by the VMM.
//!
//! KVM's first touch of a page in a region's window raises a userfaultfd
//! event (unless a sparse guest's region has handed first touches to the
//! kernel: see [`first_touch`](crate::first_touch)). The VMM either polls
//! [`PrivateMemory::fault_fd`] in its own event loop and calls
//! [`PrivateMemory::serve_faults`], or lets
//! [`PrivateMemory::start_fault_server`] run a thread that does so and hands
//! it the errors.
//!
//! A fault that cannot be served (the host is out of memory, the page is
//! locked for good) must not leave the vCPU retrying for ever inside
//! `KVM_RUN`, where no signal gets it out: the page is fenced off
//! (`PROT_NONE` in the KVM window, once; the whole window where the kernel
//! cannot split the mapping) and the vCPU woken, so that `KVM_RUN` returns
//! (an MMIO exit on some hosts, `EFAULT` on others) and the VMM, told of
//! the error, can stop the VM.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use gmem::PAGE_SIZE;
use rustix::event::{eventfd, EventfdFlags};

use crate::error::{Errno, Error, Result};
use crate::first_touch::{SCATTERED_FAULTS, SCATTERED_FAULTS_WHILE_SPARSE};
use crate::memory::PrivateMemory;
use crate::region::{Backing, FileBacking, PrivateRegion};
use crate::uffd::Fault;
use crate::Gpa;

/// Pages of a snapshot fetched at least around a first touch.
const FETCH_AROUND: u64 = 16;

/// The epoll tokens of a fault thread's descriptors.
const FAULT_EVENT: u64 = 0;
const STOP_EVENT: u64 = 1;
const TIMER_EVENT: u64 = 2;

/// What makes [`PrivateMemory::fault_fd`] readable: guest faults, and a
/// timer that fires when first touches are due to be taken back from the
/// kernel, so that a poll loop needs no timeout of its own.
#[derive(Debug)]
pub(crate) struct FaultReadiness {
    epoll: OwnedFd,
    timer: OwnedFd,
    /// Whether the timer is set (or has fired unread): while it is not,
    /// serving faults makes no timer system call.
    armed: std::sync::Mutex<bool>,
}

impl FaultReadiness {
    /// An epoll of `uffd` and of a new, disarmed timer.
    pub(crate) fn new(uffd: &crate::uffd::Userfaultfd) -> Result<Self> {
        use rustix::event::epoll;
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let flags = TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK;
        let timer = timerfd_create(TimerfdClockId::Monotonic, flags)
            .map_err(Error::os("timerfd_create"))?;
        let epoll =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(Error::os("epoll_create"))?;
        for (fd, token) in [(uffd.as_fd(), FAULT_EVENT), (timer.as_fd(), TIMER_EVENT)] {
            epoll::add(&epoll, fd, epoll::EventData::new_u64(token), epoll::EventFlags::IN)
                .map_err(Error::os("epoll_ctl (fault readiness)"))?;
        }
        Ok(Self { epoll, timer, armed: std::sync::Mutex::new(false) })
    }

    fn armed(&self) -> std::sync::MutexGuard<'_, bool> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fires the timer at the time `due()` says (at least 1 ms from now),
    /// or disarms it where nothing is due. `due` runs under the lock, so
    /// two threads cannot undo each other's fresher answer.
    fn arm(&self, due: impl FnOnce() -> Option<std::time::Duration>) {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
        let mut armed = self.armed();
        let after = due().map(|d| d.max(std::time::Duration::from_millis(1)));
        if after.is_none() && !*armed {
            return;
        }
        *armed = after.is_some();
        let value = after.map_or(Timespec { tv_sec: 0, tv_nsec: 0 }, |d| Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
        let _ = timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec);
    }

    /// Takes the timer's expiry, if any, so that it stops being readable.
    fn clear(&self) {
        if *self.armed() {
            let _ = rustix::io::read(&self.timer, &mut [0u8; 8]);
        }
    }
}

/// A guest page fault that could not be served.
#[derive(Debug, thiserror::Error)]
#[error("guest page fault at {gpa} could not be served (the page is fenced off): {error}")]
pub struct FaultError {
    /// The faulting guest address (page-aligned).
    pub gpa: Gpa,
    /// Why.
    #[source]
    pub error: Error,
}

impl FaultError {
    /// The errno of the underlying error.
    pub fn errno(&self) -> Errno {
        self.error.errno()
    }
}

impl PrivateMemory {
    /// The descriptor to poll (`POLLIN`) for pending guest faults, and
    /// for first touches due to be taken back from the kernel: call
    /// [`serve_faults`](Self::serve_faults) whenever it is readable, with
    /// no timeout of your own. It is an epoll descriptor: add it to your
    /// epoll without `EPOLLEXCLUSIVE`, which epoll refuses there.
    pub fn fault_fd(&self) -> BorrowedFd<'_> {
        self.readiness.epoll.as_fd()
    }

    /// Serves every pending guest fault without blocking; returns how many
    /// it served, and the faults it could not serve (each fenced off).
    ///
    /// It also takes first touches back from the kernel where it has
    /// served them for [`PROBE_AFTER`](crate::first_touch::PROBE_AFTER) (see
    /// [`first_touch`](crate::first_touch));
    /// [`fault_fd`](Self::fault_fd) becomes readable when that is due.
    pub fn serve_faults(&self) -> Result<(usize, Vec<FaultError>)> {
        self.readiness.clear();
        self.take_back_first_touches();
        self.collapse_due();
        self.schedule_timer();
        let mut faults = Vec::new();
        self.uffd.read_faults(&mut faults)?;
        let mut failed = Vec::new();
        for &fault in &faults {
            if let Err(error) = self.serve(fault) {
                failed.push(error);
            }
        }
        Ok((faults.len() - failed.len(), failed))
    }

    /// Starts a thread that serves faults until the returned server is
    /// dropped. `on_error` gets every fault that could not be served (and
    /// an error of the fault descriptor itself, after which the thread
    /// ends); a panic in it is caught, and serving goes on.
    pub fn start_fault_server(
        self: &Arc<Self>,
        on_error: impl Fn(Error) + Send + Sync + 'static,
    ) -> Result<FaultServer> {
        self.start_fault_servers(1, on_error)
    }

    /// As [`start_fault_server`](Self::start_fault_server), with `threads`
    /// threads (at least one) serving the same descriptor: faults of many
    /// vCPUs are served in parallel (page locks keep them apart).
    pub fn start_fault_servers(
        self: &Arc<Self>,
        threads: usize,
        on_error: impl Fn(Error) + Send + Sync + 'static,
    ) -> Result<FaultServer> {
        let stop = eventfd(0, EventfdFlags::CLOEXEC).map_err(Error::os("eventfd"))?;
        let on_error = Arc::new(on_error);
        let mut server = FaultServer { stop, threads: Vec::new() };
        for _ in 0..threads.max(1) {
            let waiter = self.fault_waiter(&server.stop)?;
            let (memory, on_error) = (self.clone(), on_error.clone());
            let report = move |error: Error| {
                let call = std::panic::AssertUnwindSafe(|| on_error(error));
                let _ = std::panic::catch_unwind(call);
            };
            let thread = std::thread::Builder::new()
                .name("gmem-faults".into())
                .spawn(move || memory.serve_until_stopped(&waiter, report))
                .map_err(Error::io("spawn a fault thread"))?;
            server.threads.push(thread);
        }
        Ok(server)
    }

    /// An epoll of the userfaultfd, added `EPOLLEXCLUSIVE` (a fault wakes
    /// one of the threads waiting, not all), of the take-back timer and of
    /// `stop`.
    fn fault_waiter(&self, stop: &OwnedFd) -> Result<OwnedFd> {
        use rustix::event::epoll;
        let waiter =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(Error::os("epoll_create"))?;
        let exclusive = epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE;
        epoll::add(&waiter, self.uffd.as_fd(), epoll::EventData::new_u64(FAULT_EVENT), exclusive)
            .map_err(Error::os("epoll_ctl (userfaultfd)"))?;
        let timer = epoll::EventData::new_u64(TIMER_EVENT);
        epoll::add(&waiter, &self.readiness.timer, timer, epoll::EventFlags::IN)
            .map_err(Error::os("epoll_ctl (timer)"))?;
        epoll::add(&waiter, stop, epoll::EventData::new_u64(STOP_EVENT), epoll::EventFlags::IN)
            .map_err(Error::os("epoll_ctl (stop)"))?;
        Ok(waiter)
    }

    /// Runs `change` (a memslot ioctl) while a thread of its own serves
    /// guest faults: KVM's memslot update waits for every vCPU, and a vCPU
    /// asleep on a fault waits for whoever serves faults, who may be the
    /// caller itself (a VMM serving faults from its event loop). A fault
    /// that thread cannot serve is fenced as always, which ends its
    /// vCPU's `KVM_RUN`. Where no thread can be started, `change` runs
    /// alone.
    pub(crate) fn with_faults_served<T>(&self, change: impl FnOnce() -> T) -> T {
        let Ok(stop) = eventfd(0, EventfdFlags::CLOEXEC) else { return change() };
        let Ok(waiter) = self.fault_waiter(&stop) else { return change() };
        std::thread::scope(|scope| {
            let server = std::thread::Builder::new()
                .name("gmem-memslot".into())
                .spawn_scoped(scope, || self.serve_until_stopped(&waiter, |_| {}));
            let result = change();
            let _ = rustix::io::write(&stop, &1u64.to_ne_bytes());
            if let Ok(server) = server {
                let _ = server.join();
            }
            result
        })
    }

    /// A fault thread: waits in `waiter` (the fault descriptor and the
    /// server's stop descriptor) and serves faults until told to stop or
    /// the descriptor fails.
    fn serve_until_stopped(&self, waiter: &OwnedFd, report: impl Fn(Error)) {
        use rustix::event::epoll;
        let mut events = Vec::with_capacity(3);
        loop {
            events.clear();
            match epoll::wait(waiter, rustix::buffer::spare_capacity(&mut events), None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(errno) => return report(Error::Os { op: "epoll_wait", errno }),
            }
            if events.iter().any(|e| e.data.u64() == STOP_EVENT) {
                return;
            }
            match self.serve_faults() {
                Ok((_, failed)) => {
                    failed.into_iter().for_each(|f| report(Error::Fault(Box::new(f))))
                }
                Err(error) => return report(error),
            }
        }
    }

    /// Serves `fault`: lock its page, or for a sequential toucher a batch of
    /// pages around it (clipped to the region and to the file's current
    /// size), map the unmapped ones (allocating holes), unlock. When the
    /// fault lands right after the batch served before, the next batch is
    /// mapped too, while the woken vCPU already runs (read-ahead).
    fn serve(&self, fault: Fault) -> std::result::Result<(), FaultError> {
        let addr = fault.addr;
        let Some(region) = self
            .regions()
            .iter()
            .find(|r| {
                r.file_backing()
                    .is_some_and(|f| addr >= f.window_addr() && addr < f.window_addr() + r.size)
            })
            .cloned()
        else {
            // A region removed while its fault was queued: nothing to serve.
            return Ok(());
        };
        let Backing::File(f) = &region.backing else { return Ok(()) };
        let serving = f.first_touch.serving();
        let page = (addr - f.window_addr()) / PAGE_SIZE;
        // A page in the file (populated, restored from a snapshot) costs
        // nothing to map: its whole fault-around window is mapped at once.
        if fault.minor && self.serve_existing(&region, f, page).unwrap_or(false) {
            self.counters.faults.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // Fault-around adapts to the access pattern, like the page cache's
        // read-ahead: a fault where a recent batch ended continues a
        // sequential toucher (one of several vCPUs, say) and gets a batch
        // twice as long, up to the fault-around size (then the next batch
        // is mapped too, while the vCPU runs on); a fault anywhere else gets
        // its page alone, so that a sparse guest allocates what it touches.
        let own = f.streams.continues(page);
        let continued = own.map(|stream| stream.len).or_else(|| {
            // A stream that ran to the end of the region just below (RAM
            // in several memslots) goes on here.
            let below = self.region_of(Gpa(region.gpa.0.checked_sub(1)?))?;
            let below_file = below.file_backing()?;
            (page == 0).then(|| below_file.streams.continues(below.pages()))?.map(|s| s.len)
        });
        let len = continued.map_or(1, |len| (2 * len).min(self.fault_around));
        let sequential = len == self.fault_around && len > 1;
        // Recorded before the batch wakes the vCPU, whose next fault (on
        // another fault thread, maybe) must find it.
        let mut end = (page + len).min(region.pages());
        // A page still in a snapshot is fetched with the aligned 64 KiB
        // around it: served so, its stream goes on from there.
        if self.is_pending(&region, page) {
            end = end.max((page / FETCH_AROUND + 1) * FETCH_AROUND).min(region.pages());
        }
        f.streams.record(own, end, len);
        // A batch that cannot be served (a page of it locked for good, cut
        // off by a truncate) is retried as the faulting page alone: only a
        // page that cannot be served itself is fenced.
        // A fault on a read-ahead batch's first page finds the rest of the
        // batch mapped: only that page is served before the vCPU goes on.
        let now = match f.mapped.runs(page..end, false).first() {
            Some(run) if sequential && run.start == page => run.end - page,
            _ => end - page,
        };
        let served = self.serve_batch(&region, f, page, now, page);
        let served = match served {
            Err(_) if now > 1 => self.serve_batch(&region, f, page, 1, page),
            served => served,
        };
        let served = served.map_err(|error| {
            let gpa = region.gpa_of(page);
            self.fence(f, page);
            FaultError { gpa, error }
        })?;
        if served == 0 {
            // Another fault mapped the page first; wake whoever waits on it.
            let _ = self.uffd.wake(f.window_addr() + page * PAGE_SIZE, PAGE_SIZE);
        }
        // Read-ahead: the next batch but its first page, where the vCPU's
        // next fault (recorded above as continuing this stream) starts the
        // batch after it while the vCPU runs through this one, like the
        // page cache's read-ahead marker.
        if sequential && end + 1 < region.pages() {
            let _ = self.serve_batch(&region, f, end + 1, len - 1, end + 1);
        }
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        drop(serving);
        // A page someone else mapped first says nothing of the pattern.
        if served > 0 {
            let scattered = self.scattered_faults.record(fault.thread, continued.is_none());
            let threshold = if scattered > 0 && self.kernel_serves_first_touches() {
                SCATTERED_FAULTS_WHILE_SPARSE
            } else {
                SCATTERED_FAULTS
            };
            // A hole there may still be a page of the snapshot restored,
            // which the kernel would allocate zero-filled.
            if scattered >= threshold && !self.has_pending(&region) {
                f.first_touch.hand_over(&self.uffd, &f.window);
                self.schedule_timer();
            }
        }
        Ok(())
    }

    /// Whether the kernel serves some region's first touches.
    fn kernel_serves_first_touches(&self) -> bool {
        self.regions()
            .iter()
            .any(|r| r.file_backing().is_some_and(|f| f.first_touch.kernel_serves()))
    }

    /// Arms the timer for the first take-back or background collapse
    /// due, if any.
    pub(crate) fn schedule_timer(&self) {
        self.readiness.arm(|| {
            let regions = self.regions();
            let take_backs = regions.iter().filter_map(|r| r.file_backing()?.first_touch.due_in());
            take_backs.chain(self.collapses.due_in()).min()
        });
    }

    /// Takes first touches back from the kernel in every region where it
    /// has served them for [`PROBE_AFTER`].
    fn take_back_first_touches(&self) {
        for region in self.regions().iter() {
            if let Some(f) = region.file_backing() {
                f.first_touch.take_back(&self.uffd, &f.window);
            }
        }
    }

    /// Maps the pages of the file in the aligned fault-around window of
    /// region page `page` that are not mapped yet (allocating nothing);
    /// whether `page` is mapped afterwards (not if it was punched
    /// meanwhile: then it is a first touch).
    fn serve_existing(&self, region: &PrivateRegion, f: &FileBacking, page: u64) -> Result<bool> {
        let file_pages = f.binding.file().size() / PAGE_SIZE;
        let in_file = file_pages.saturating_sub(f.file_offset / PAGE_SIZE).min(region.pages());
        let start = page / self.fault_around * self.fault_around;
        let window = start..(start + self.fault_around).min(in_file);
        if window.start >= window.end || page >= window.end {
            return Ok(false);
        }
        let guard = f.binding.lock_range_unfilled(f.file_pages(&window), false)?;
        let mut served = 0;
        for run in f.binding.allocated_runs(f.file_pages(&window))? {
            let Some(run) = f.region_pages(run, region.pages()) else { continue };
            for unmapped in f.mapped.runs(run, false) {
                let addr = f.window_addr() + unmapped.start * PAGE_SIZE;
                served +=
                    self.uffd.continue_range(addr, (unmapped.end - unmapped.start) * PAGE_SIZE)?;
                f.mapped.set(unmapped, true);
            }
        }
        drop(guard);
        self.counters.pages_served.fetch_add(served / PAGE_SIZE, Ordering::Relaxed);
        if f.mapped.get(page) {
            // Another thread may have mapped it first: wake its vCPU.
            let _ = self.uffd.wake(f.window_addr() + page * PAGE_SIZE, PAGE_SIZE);
            return Ok(true);
        }
        Ok(false)
    }

    /// Maps the unmapped pages of the `len` pages from region page `start`
    /// (clipped to what exists of the file, but always holding `needed`);
    /// returns how many it mapped.
    fn serve_batch(
        &self,
        region: &PrivateRegion,
        f: &FileBacking,
        start: u64,
        len: u64,
        needed: u64,
    ) -> Result<u64> {
        let file_pages = f.binding.file().size() / PAGE_SIZE;
        let in_file = file_pages.saturating_sub(f.file_offset / PAGE_SIZE);
        let end = (start + len).min(region.pages()).min(in_file.max(needed + 1));
        let batch = start..end;
        // Pages of a snapshot restored lazily are written into the file
        // first (at least the aligned 64 KiB around, which costs less than
        // the faults it saves); then they are mapped like any page in the file.
        let around = batch.start / FETCH_AROUND * FETCH_AROUND
            ..(batch.end.div_ceil(FETCH_AROUND) * FETCH_AROUND).min(region.pages());
        self.fetch(region, around, false)?;
        // Where KVM's window is locked in RAM, holes are allocated through
        // it, each page mapped once; otherwise in the locked frame window
        // (get-and-lock), then mapped here too.
        let fill = f.window.is_locked_in_ram();
        let pages = f.file_pages(&batch);
        let guard = if fill {
            f.binding.lock_range_to_fill(&f.window, pages)?
        } else {
            f.binding.get_and_lock_range(pages)?
        };
        let mut served = 0;
        for run in f.mapped.runs(batch, false) {
            let (addr, len) = (f.window_addr() + run.start * PAGE_SIZE, run.end - run.start);
            served += if fill {
                self.uffd.fill_range(addr, len * PAGE_SIZE)?
            } else {
                self.uffd.continue_range(addr, len * PAGE_SIZE)?
            };
            f.mapped.set(run, true);
        }
        drop(guard);
        self.counters.pages_served.fetch_add(served / PAGE_SIZE, Ordering::Relaxed);
        Ok(served / PAGE_SIZE)
    }

    /// Fences region page `page` off for KVM and wakes its vCPU, so that
    /// its access ends `KVM_RUN` instead of faulting again. A page fence
    /// splits the window's mapping, which needs memory (a VMA) the kernel
    /// may refuse (`ENOMEM` at `vm.max_map_count`, or in a memory cgroup
    /// at its limit); then the whole window is fenced, which splits
    /// nothing, and failing even that, its faults are handed to the kernel
    /// (unregistered), whose own fault either maps the page or ends
    /// `KVM_RUN`: the vCPU never retries for ever.
    fn fence(&self, f: &FileBacking, page: u64) {
        let window = f.window_addr();
        let addr = window + page * PAGE_SIZE;
        let len = f.window.len() as u64;
        let protect_none = |addr: u64, len: u64| {
            // SAFETY: the range lies in the region's KVM window, a mapping
            // the region owns that no Rust reference points into; taking
            // its access away only makes KVM's next access to it fail.
            unsafe {
                rustix::mm::mprotect(
                    addr as *mut std::ffi::c_void,
                    len as usize,
                    rustix::mm::MprotectFlags::empty(),
                )
            }
        };
        if protect_none(addr, PAGE_SIZE).is_ok() {
            self.counters.fenced_pages.fetch_add(1, Ordering::Relaxed);
        } else if protect_none(window, len).is_ok() {
            self.counters.fenced_pages.fetch_add(len / PAGE_SIZE, Ordering::Relaxed);
        } else {
            let _ = self.uffd.unregister(window, len);
        }
        let _ = self.uffd.wake(addr, PAGE_SIZE);
    }
}

/// The fault-serving threads of [`PrivateMemory::start_fault_servers`];
/// stopped and joined on drop.
#[derive(Debug)]
pub struct FaultServer {
    stop: OwnedFd,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

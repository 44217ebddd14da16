//! Restoring a snapshot: checked whole before anything is restored, then
//! fetched page by page on first touch (or all at once), each page under
//! its page lock and fetched once.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gmem::PAGE_SIZE;

use super::format::{Entry, Header, Sealer, SnapshotId, SnapshotKey, RECORD_BYTES, TAG_BYTES};
use super::{scratch, PLAIN, SEALED};
use crate::bits::PageBits;
use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::region::{PageState, PrivateRegion};
use crate::Gpa;

/// Pages fetched under one lock.
const FETCH_PAGES: u64 = 64;

/// How [`PrivateMemory::restore_snapshot`] restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    /// The guest may run at once; each page is fetched on first touch
    /// (or by [`PrivateMemory::start_prefetch`]).
    Lazy,
    /// Every page is fetched and checked before the call returns.
    Eager,
}

/// A snapshot file, checked: its key, header, index, VMM state, length
/// and end tag. Its pages are checked as they are read.
pub struct SnapshotFile {
    records: Records,
    pub(crate) header: Header,
    pub(crate) entries: Vec<Entry>,
    pub(crate) sealer: Sealer,
    vmm_state: Vec<u8>,
}

/// Where a snapshot's page records are: in a file, read at their offsets,
/// or at a migration's source, asked for over the link (post-copy).
pub(crate) enum Records {
    File(File),
    Remote(Arc<crate::migrate::RemoteRecords>),
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile")
            .field("id", &self.header.id)
            .field("base", &self.header.base)
            .field("pages", &self.header.records)
            .finish_non_exhaustive()
    }
}

impl SnapshotFile {
    /// Opens and checks the snapshot in `file` (a regular file: pages are
    /// read from it at their offsets as the guest needs them).
    /// [`Error::WrongKey`] for another key; [`Error::BadSnapshot`] for
    /// anything that is not a whole, unaltered snapshot (no page is read
    /// before that is known); `EINVAL` for a FIFO, device or directory.
    pub fn open(file: File, key: &SnapshotKey) -> Result<Self> {
        let meta = file.metadata().map_err(Error::io("stat the snapshot"))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(
                "a snapshot is read from a regular file (not a FIFO, device or directory)".into(),
            ));
        }
        let mut offset = 0;
        let read = |len: u64, what: &str| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len as usize];
            match file.read_exact_at(&mut buf, offset) {
                Ok(()) => {
                    offset += len;
                    Ok(buf)
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::BadSnapshot(
                    format!("cut short in its {what} ({} bytes)", meta.len()),
                )),
                Err(e) => Err(Error::io("read the snapshot")(e)),
            }
        };
        let length = |header: &Header| {
            let total = header.total_len();
            if meta.len() == total {
                return Ok(());
            }
            let how = if meta.len() < total { "cut short" } else { "longer than it says" };
            Err(Error::BadSnapshot(format!(
                "{how}: {} bytes where the header says {total}",
                meta.len()
            )))
        };
        let head = Head::read(read, key, length)?;
        let mut end = [0u8; TAG_BYTES];
        file.read_exact_at(&mut end, head.header.record_offset(head.header.records))
            .map_err(Error::io("read the snapshot"))?;
        if !head.sealer.check_end(head.header.records, &end) {
            return Err(Error::BadSnapshot("its end tag was altered".into()));
        }
        Ok(head.with_records(Records::File(file)))
    }

    /// Its identity.
    pub fn id(&self) -> SnapshotId {
        self.header.id
    }

    /// Its base's identity, for a diff.
    pub fn base(&self) -> Option<SnapshotId> {
        self.header.base
    }

    /// The VMM state saved with it.
    pub fn vmm_state(&self) -> &[u8] {
        &self.vmm_state
    }

    /// The region layout of the memory it was taken of: GPA and size.
    pub fn regions(&self) -> Vec<(Gpa, u64)> {
        self.header.regions.iter().map(|&(gpa, size)| (Gpa(gpa), size)).collect()
    }

    /// Pages whose content it holds.
    pub fn pages(&self) -> u64 {
        self.header.records
    }

    /// The runs of pages whose content it holds, in the order of their
    /// records: first GPA, pages, state.
    pub fn data_runs(&self) -> Vec<(Gpa, u64, PageState)> {
        let data = self.entries.iter().filter(|e| e.data);
        data.map(|e| (Gpa(e.gpa), e.pages, e.state)).collect()
    }

    /// Reads and opens `count` records from `record` on, the pages from
    /// `gpa` on in `state`, into `out` (`count` pages), from the file.
    fn read_pages(
        &self,
        record: u64,
        gpa: u64,
        state: PageState,
        count: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let Records::File(file) = &self.records else {
            return Err(Error::InvalidArgument("a migration's records are not read here".into()));
        };
        scratch(&SEALED, (count * RECORD_BYTES) as usize, |sealed| {
            let offset = self.header.record_offset(record);
            file.read_exact_at(sealed, offset).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    Error::SnapshotPage { gpa: Gpa(gpa), why: "the file was cut short" }
                }
                _ => Error::io("read the snapshot")(e),
            })?;
            open_records(&self.sealer, record, gpa, state, sealed, out)
        })
    }

    /// The data entries of region `[gpa, gpa + size)` as extents.
    fn extents_in(&self, gpa: u64, size: u64) -> Vec<Extent> {
        let mut record = 0;
        let mut extents = Vec::new();
        for entry in &self.entries {
            if entry.data && entry.gpa >= gpa && entry.gpa < gpa + size {
                let page = (entry.gpa - gpa) / PAGE_SIZE;
                extents.push(Extent { page, pages: entry.pages, record, state: entry.state });
            }
            record += if entry.data { entry.pages } else { 0 };
        }
        extents
    }
}

/// A snapshot's header, index and VMM state, checked; its records follow.
pub(crate) struct Head {
    pub(crate) header: Header,
    pub(crate) entries: Vec<Entry>,
    pub(crate) sealer: Sealer,
    pub(crate) vmm_state: Vec<u8>,
}

impl Head {
    /// Reads and checks a snapshot's header, index and VMM state, which
    /// `read` gives in order (its length in bytes, what it is), with
    /// `check` run on the header before the index is read (no record yet:
    /// see [`Records`]).
    pub(crate) fn read(
        mut read: impl FnMut(u64, &str) -> Result<Vec<u8>>,
        key: &SnapshotKey,
        check: impl FnOnce(&Header) -> Result<()>,
    ) -> Result<Self> {
        let mut head = read(Header::FIXED as u64, "header")?;
        let rest = Header::length(&head)? - Header::FIXED;
        head.extend(read(rest as u64, "header")?);
        let header = Header::decode(&head)?;
        let sealer = Sealer::new(key, header.id);
        sealer.check_key(&header.key_check)?;
        check(&header)?;
        let tag = TAG_BYTES as u64;
        let mut index = read(header.index_len() + tag, "index")?;
        let index_tag = index.split_off(header.index_len() as usize);
        if !sealer.open_index(&head, &mut index, &index_tag) {
            return Err(Error::BadSnapshot("its header or index was altered".into()));
        }
        let entries = Entry::decode_all(&header, &index)?;
        let mut vmm_state = read(header.state_len + tag, "VMM state")?;
        let state_tag = vmm_state.split_off(header.state_len as usize);
        if !sealer.open_state(&head, &mut vmm_state, &state_tag) {
            return Err(Error::BadSnapshot("its VMM state was altered".into()));
        }
        Ok(Self { header, entries, sealer, vmm_state })
    }

    /// The snapshot of this head, its records at `records`.
    pub(crate) fn with_records(self, records: Records) -> SnapshotFile {
        let Self { header, entries, sealer, vmm_state } = self;
        SnapshotFile { records, header, entries, sealer, vmm_state }
    }
}

/// Data pages of one region in a snapshot: region pages from `page`, in
/// records from `record`.
#[derive(Clone, Copy, Debug)]
struct Extent {
    page: u64,
    pages: u64,
    record: u64,
    state: PageState,
}

/// A region's pages still in the snapshot.
struct LazyRegion {
    /// The region restored (not whatever the VMM adds at its GPA later).
    region: std::sync::Weak<PrivateRegion>,
    pending: PageBits,
    extents: Vec<Extent>,
}

/// The snapshot a memory was restored from, and what is still to fetch.
pub(crate) struct Lazy {
    source: SnapshotFile,
    regions: Vec<LazyRegion>,
}

impl LazyRegion {
    /// The records of region pages `run` (all pending), as runs of
    /// records: first, count.
    fn records_of(&self, run: Range<u64>) -> Vec<(u64, u64)> {
        let first = self.extents.partition_point(|e| e.page + e.pages <= run.start);
        let overlapping = self.extents[first..].iter().take_while(|e| e.page < run.end);
        overlapping
            .map(|e| {
                let start = run.start.max(e.page);
                let end = run.end.min(e.page + e.pages);
                (e.record + (start - e.page), end - start)
            })
            .collect()
    }
}

impl Lazy {
    fn region(&self, region: &PrivateRegion) -> Option<&LazyRegion> {
        self.regions.iter().find(|r| std::ptr::eq(r.region.as_ptr(), region))
    }
}

impl PrivateMemory {
    /// Restores `chain` (a full snapshot, then diffs each on the one
    /// before) into this memory, which must be fresh: its regions added
    /// with the snapshot's layout (`EINVAL`, [`Error::SnapshotMismatch`],
    /// otherwise, and for a diff on another base), no page allocated, no
    /// snapshot restored before (`EBUSY`). Page states are set at once;
    /// the pages come lazily or eagerly as `mode` says (regions on huge
    /// pages eagerly: KVM's window there is served by the kernel). Diffs
    /// are applied eagerly. Ends the launch ([`finish_launch`](Self::finish_launch)).
    ///
    /// Nothing runs on bad data: a page that fails its check when fetched
    /// is never mapped ([`Error::SnapshotPage`] names its GPA: the fault
    /// fails, or this call where the page is fetched here).
    pub fn restore_snapshot(&self, chain: Vec<SnapshotFile>, mode: RestoreMode) -> Result<()> {
        let mut regions: Vec<Arc<PrivateRegion>> = self.regions().to_vec();
        regions.sort_by_key(|r| r.gpa.0);
        if regions.iter().any(|r| r.file_backing().is_none()) {
            return Err(Error::Unsupported("restoring native (guest_memfd) regions".into()));
        }
        let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa.0, r.size)).collect();
        let mut chain = chain.into_iter();
        let Some(full) = chain.next() else {
            return Err(Error::InvalidArgument("no snapshot to restore".into()));
        };
        let diffs: Vec<SnapshotFile> = chain.collect();
        let mut expected = None;
        for snapshot in std::iter::once(&full).chain(&diffs) {
            if snapshot.base() != expected {
                return Err(Error::SnapshotMismatch(match (snapshot.base(), expected) {
                    (Some(base), None) => format!(
                        "snapshot {} is a diff on {base}: restore its base first",
                        snapshot.id()
                    ),
                    (base, Some(wanted)) => format!(
                        "snapshot {} is {}, not a diff on {wanted}",
                        snapshot.id(),
                        base.map_or("a full snapshot".into(), |b| format!("a diff on {b}"))
                    ),
                    (None, None) => unreachable!("the base matched"),
                }));
            }
            if snapshot.header.regions != layout {
                return Err(Error::SnapshotMismatch(format!(
                    "snapshot {} was taken of regions {}; this memory has {}",
                    snapshot.id(),
                    describe(&snapshot.header.regions),
                    describe(&layout)
                )));
            }
            expected = Some(snapshot.id());
        }
        self.check_fresh(&regions)?;
        self.install_lazy(&regions, full)?;
        let restored = self.snapshots.restored.get().expect("just set");
        set_states(&regions, &restored.source.entries);
        for diff in &diffs {
            self.apply_entries(&regions, &diff.entries, |record, gpa, state, count, plain| {
                diff.read_pages(record, gpa, state, count, plain)
            })?;
        }
        self.finish_launch();
        // The memory is the chain's last snapshot now: diffs start here.
        regions.iter().for_each(|r| r.clear_changed());
        *self.snapshots.base() = Some(expected.expect("a chain of at least one"));
        for region in &regions {
            if region.file().is_some_and(|f| f.page_kind() != gmem::PageKind::Small) {
                self.fetch(region, 0..region.pages(), false)?;
            }
        }
        if mode == RestoreMode::Eager {
            self.fetch_all()?;
        }
        Ok(())
    }

    /// Whether this memory is fresh: launching, no page allocated, no
    /// snapshot restored (`EBUSY` otherwise).
    pub(crate) fn check_fresh(&self, regions: &[Arc<PrivateRegion>]) -> Result<()> {
        if self.snapshots.restored.get().is_some() {
            return Err(Error::Busy("a snapshot was restored into this memory already".into()));
        }
        self.check_launching()?;
        for region in regions {
            let f = region.file_backing().expect("file regions");
            if !f.binding.allocated_runs(f.file_pages(&(0..region.pages())))?.is_empty() {
                return Err(Error::Busy(format!(
                    "the region at {} holds pages: restore into fresh memory",
                    region.gpa
                )));
            }
        }
        Ok(())
    }

    /// Makes `snapshot`'s data pages the pending ones, fetched from it on
    /// first touch (once per memory: `EBUSY` after).
    pub(crate) fn install_lazy(
        &self,
        regions: &[Arc<PrivateRegion>],
        snapshot: SnapshotFile,
    ) -> Result<()> {
        let lazy = Lazy {
            regions: regions
                .iter()
                .map(|r| {
                    let extents = snapshot.extents_in(r.gpa.0, r.size);
                    let pending = PageBits::new(r.pages());
                    extents.iter().for_each(|e| pending.set(e.page..e.page + e.pages, true));
                    LazyRegion { region: Arc::downgrade(r), pending, extents }
                })
                .collect(),
            source: snapshot,
        };
        if self.snapshots.restored.set(lazy).is_err() {
            return Err(Error::Busy("a snapshot was restored into this memory already".into()));
        }
        Ok(())
    }

    /// Takes `snapshot` (a migration's switch round, its records at the
    /// source) lazily: states set, its holes punched, its data pages
    /// punched (an earlier round's content) and pending.
    pub(crate) fn restore_lazily(
        &self,
        regions: &[Arc<PrivateRegion>],
        snapshot: SnapshotFile,
    ) -> Result<()> {
        set_states(regions, &snapshot.entries);
        for entry in &snapshot.entries {
            let region =
                regions.iter().find(|r| r.contains(Gpa(entry.gpa))).expect("the layout matched");
            self.discard(region, region.pages_of(Gpa(entry.gpa), entry.pages * PAGE_SIZE))?;
        }
        self.install_lazy(regions, snapshot)
    }

    /// Writes `sealed`, records from `first` on of the snapshot restored
    /// lazily (arrived from a migration's source), opened and checked,
    /// into the pages still pending. `plain` is a buffer to reuse.
    pub(crate) fn write_arrived(
        &self,
        first: u64,
        sealed: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Result<()> {
        let restored =
            self.snapshots.restored.get().ok_or_else(|| {
                Error::Protocol("records arrived for memory that awaits none".into())
            })?;
        let end = first + sealed.len() as u64 / RECORD_BYTES;
        let mut record = first;
        while record < end {
            let holding = restored.regions.iter().find_map(|lazy| {
                let i = lazy.extents.partition_point(|e| e.record + e.pages <= record);
                lazy.extents.get(i).filter(|e| e.record <= record).map(|e| (lazy, *e))
            });
            let (lazy, extent) =
                holding.ok_or_else(|| Error::Protocol(format!("record {record} holds no page")))?;
            let upto = end.min(extent.record + extent.pages);
            let page = extent.page + (record - extent.record);
            let count = upto - record;
            let part = &mut sealed[((record - first) * RECORD_BYTES) as usize..]
                [..(count * RECORD_BYTES) as usize];
            plain.resize((count * PAGE_SIZE) as usize, 0);
            // The region was removed meanwhile: nothing to write.
            let Some(region) = lazy.region.upgrade() else {
                record = upto;
                continue;
            };
            let gpa = region.gpa_of(page).0;
            open_records(&restored.source.sealer, record, gpa, extent.state, part, plain)?;
            for run in lazy.pending.runs(page..page + count, true) {
                // Page by page where the guest discarded some meanwhile.
                let write = |run: Range<u64>| {
                    self.write_run(&region, run.clone(), false, |buf| {
                        if lazy.pending.first(run.clone(), false).is_some() {
                            return Ok(false);
                        }
                        let from = ((run.start - page) * PAGE_SIZE) as usize;
                        buf.copy_from_slice(&plain[from..from + buf.len()]);
                        Ok(true)
                    })
                };
                if !write(run.clone())? {
                    for one in run {
                        write(one..one + 1)?;
                    }
                }
            }
            record = upto;
        }
        Ok(())
    }

    /// Checks the end tag of the snapshot restored lazily from a migration.
    pub(crate) fn check_remote_end(&self, records: u64, tag: &[u8]) -> Result<()> {
        let restored = self.snapshots.restored.get();
        let source = restored.map(|r| &r.source);
        match source {
            Some(s) if s.header.records == records && s.sealer.check_end(records, tag) => Ok(()),
            _ => Err(Error::BadSnapshot("the switch round's end tag failed its check".into())),
        }
    }

    /// The error of a migration link lost (`why`) while pages were still
    /// pending: the first and the count. `None` if none was.
    pub(crate) fn migration_lost(&self, why: String) -> Option<Error> {
        let restored = self.snapshots.restored.get()?;
        let pages = self.pending_snapshot_pages();
        let first = restored.regions.iter().find_map(|lazy| {
            let region = lazy.region.upgrade()?;
            lazy.pending.first(0..region.pages(), true).map(|page| region.gpa_of(page))
        })?;
        Some(Error::MigrationLost { gpa: first, pages, why })
    }

    /// Applies a diff's `entries`: states, then its pages written (taking
    /// them from the pending ones) and its holes punched. `read` gives
    /// the pages of `count` records from a record on (the GPA of the first,
    /// their state), in the order of the records.
    pub(crate) fn apply_entries(
        &self,
        regions: &[Arc<PrivateRegion>],
        entries: &[Entry],
        mut read: impl FnMut(u64, u64, PageState, u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        set_states(regions, entries);
        let mut record = 0;
        for entry in entries {
            let region =
                regions.iter().find(|r| r.contains(Gpa(entry.gpa))).expect("the layout matched");
            let pages = region.pages_of(Gpa(entry.gpa), entry.pages * PAGE_SIZE);
            if !entry.data {
                self.discard(region, pages)?;
                continue;
            }
            let mut at = pages.start;
            while at < pages.end {
                let run = at..pages.end.min(at + FETCH_PAGES);
                let count = run.end - run.start;
                let (gpa, first) = (region.gpa_of(run.start).0, record + (run.start - pages.start));
                self.write_run(region, run.clone(), false, |plain| {
                    read(first, gpa, entry.state, count, plain).map(|()| true)
                })?;
                at = run.end;
            }
            record += entry.pages;
        }
        Ok(())
    }

    /// Under the page locks of region pages `run`: `content` fills their
    /// bytes (or says `false`: nothing to write), which are written, taken
    /// from the pending pages and locked in RAM. Whether it wrote. With
    /// `again_if_invalidating`, `EAGAIN` instead of waiting for a punch.
    fn write_run(
        &self,
        region: &PrivateRegion,
        run: Range<u64>,
        again_if_invalidating: bool,
        content: impl FnOnce(&mut [u8]) -> Result<bool>,
    ) -> Result<bool> {
        let f = region.file_backing().expect("file regions");
        let guard = f.binding.lock_range_unfilled(f.file_pages(&run), again_if_invalidating)?;
        let len = ((run.end - run.start) * PAGE_SIZE) as usize;
        let wrote = scratch(&PLAIN, len, |plain| {
            let write = content(plain)?;
            if write {
                guard.write(0, plain)?;
            }
            Ok(write)
        })?;
        if wrote {
            if let Some(lazy) = self.snapshots.restored.get().and_then(|l| l.region(region)) {
                lazy.pending.set(run, false);
            }
            guard.fill()?;
        }
        Ok(wrote)
    }

    /// Fetches the pending pages of region pages `pages` from the snapshot
    /// restored, if any: each run read, opened and checked, then written
    /// under its page lock, which makes sure no page is fetched twice. With
    /// `again_if_invalidating`, `EAGAIN` instead of waiting for a punch.
    pub(crate) fn fetch(
        &self,
        region: &PrivateRegion,
        pages: Range<u64>,
        again_if_invalidating: bool,
    ) -> Result<()> {
        let Some(restored) = self.snapshots.restored.get() else { return Ok(()) };
        let Some(lazy) = restored.region(region) else { return Ok(()) };
        if let Records::Remote(remote) = &restored.source.records {
            // Asked for; written by the migration's receiving thread.
            for run in lazy.pending.runs(pages.clone(), true) {
                for (record, count) in lazy.records_of(run) {
                    remote.request(record, count);
                }
            }
            let done = || lazy.pending.first(pages.clone(), true).is_none();
            return remote.wait_until(done).map_err(|why| {
                let first = lazy.pending.first(pages.clone(), true).unwrap_or(pages.start);
                let pages = self.pending_snapshot_pages();
                Error::MigrationLost { gpa: region.gpa_of(first), pages, why }
            });
        }
        let mut at = pages.start;
        while let Some(start) = lazy.pending.first(at..pages.end, true) {
            let limit = pages.end.min(start + FETCH_PAGES);
            let end = lazy.pending.first(start..limit, false).unwrap_or(limit);
            let run = start..end;
            let fetched = self.write_run(region, run.clone(), again_if_invalidating, |plain| {
                // Part of it was fetched or discarded meanwhile: look again.
                if lazy.pending.first(run.clone(), false).is_some() {
                    return Ok(false);
                }
                let first = lazy.extents.partition_point(|e| e.page + e.pages <= start);
                let mut page = start;
                for extent in &lazy.extents[first..] {
                    if page >= end {
                        break;
                    }
                    let upto = end.min(extent.page + extent.pages);
                    let into = &mut plain[((page - start) * PAGE_SIZE) as usize..]
                        [..((upto - page) * PAGE_SIZE) as usize];
                    let record = extent.record + (page - extent.page);
                    let gpa = region.gpa_of(page).0;
                    restored.source.read_pages(record, gpa, extent.state, upto - page, into)?;
                    page = upto;
                }
                Ok(true)
            })?;
            if !fetched {
                at = start;
                continue;
            }
            at = end;
        }
        Ok(())
    }

    /// Fetches every pending page, on a thread per core (at most 8), each
    /// taking the next 2 MiB, from the regions in turn: writes into one
    /// file take its inode lock, so threads on one file wait for each other.
    pub(crate) fn fetch_all(&self) -> Result<()> {
        let regions = self.regions();
        let step = gmem::HUGE_PAGE_SIZE / PAGE_SIZE;
        let pending: Vec<&PrivateRegion> =
            regions.iter().filter(|r| self.has_pending(r)).map(|r| &**r).collect();
        let most = pending.iter().map(|r| r.pages()).max().unwrap_or(0);
        let pieces: Vec<(&PrivateRegion, Range<u64>)> = (0..most)
            .step_by(step as usize)
            .flat_map(|p| {
                let within = pending.iter().filter(move |r| p < r.pages());
                within.map(move |r| (*r, p..(p + step).min(r.pages())))
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        std::thread::scope(|scope| {
            let fetching: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some((region, pages)) = pieces.get(index) else { return Ok(()) };
                        if let Err(e) = self.fetch(region, pages.clone(), false) {
                            next.store(pieces.len(), Ordering::Relaxed);
                            return Err(e);
                        }
                    })
                })
                .collect();
            fetching.into_iter().try_for_each(|thread| {
                thread.join().unwrap_or_else(|_| {
                    Err(Error::InvalidArgument("a snapshot fetch thread panicked".into()))
                })
            })
        })
    }

    /// Forgets region pages `pages` of the snapshot (they are discarded).
    pub(crate) fn forget_pending(&self, region: &PrivateRegion, pages: Range<u64>) {
        if let Some(lazy) = self.snapshots.restored.get().and_then(|l| l.region(region)) {
            lazy.pending.set(pages, false);
        }
    }

    /// Whether region page `page` is still to fetch from a snapshot.
    pub(crate) fn is_pending(&self, region: &PrivateRegion, page: u64) -> bool {
        let lazy = self.snapshots.restored.get().and_then(|l| l.region(region));
        lazy.is_some_and(|l| page < region.pages() && l.pending.get(page))
    }

    /// Whether `region` has pages still to fetch from a snapshot.
    pub(crate) fn has_pending(&self, region: &PrivateRegion) -> bool {
        let lazy = self.snapshots.restored.get().and_then(|l| l.region(region));
        lazy.is_some_and(|l| l.pending.first(0..region.pages(), true).is_some())
    }

    /// Pages still to fetch from the snapshot this memory was restored
    /// from (0 after an eager restore, or once all were fetched).
    pub fn pending_snapshot_pages(&self) -> u64 {
        let Some(restored) = self.snapshots.restored.get() else { return 0 };
        self.regions().iter().filter_map(|r| restored.region(r)).map(|l| l.pending.count()).sum()
    }

    /// Starts a thread that fetches every page still in the snapshot
    /// (after a lazy restore), a chunk at a time and each page once,
    /// while the guest runs; it ends when none is left or the returned
    /// handle is dropped. `on_error` gets a page that failed its check
    /// (the VM should stop: the guest would fault on it).
    pub fn start_prefetch(
        self: &Arc<Self>,
        on_error: impl Fn(Error) + Send + 'static,
    ) -> Result<Prefetch> {
        let stop = Arc::new(AtomicBool::new(false));
        let (memory, stopped) = (self.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("gmem-prefetch".into())
            .spawn(move || {
                for region in memory.regions().iter() {
                    let mut at = 0;
                    while at < region.pages() && !stopped.load(Ordering::Relaxed) {
                        let chunk = at..region.pages().min(at + 4 * FETCH_PAGES);
                        match memory.fetch(region, chunk.clone(), true) {
                            // Being punched: those pages need no fetch.
                            Ok(()) => at = chunk.end,
                            Err(e) if e.errno() == crate::Errno::AGAIN => at = chunk.end,
                            Err(e) => return on_error(e),
                        }
                    }
                }
            })
            .map_err(Error::io("spawn the prefetch thread"))?;
        Ok(Prefetch { stop, thread: Some(thread) })
    }
}

/// Opens `sealed`, the records from `record` on (the pages from `gpa` on,
/// in `state`), into `out`: [`Error::SnapshotPage`] names the first that
/// fails its check.
pub(crate) fn open_records(
    sealer: &Sealer,
    record: u64,
    gpa: u64,
    state: PageState,
    sealed: &mut [u8],
    out: &mut [u8],
) -> Result<()> {
    for (i, record_bytes) in sealed.chunks_exact_mut(RECORD_BYTES as usize).enumerate() {
        let at = gpa + i as u64 * PAGE_SIZE;
        let (page, tag) = record_bytes.split_at_mut(PAGE_SIZE as usize);
        if !sealer.open_page(record + i as u64, at, state, page, tag) {
            let why = "altered, moved, or from another snapshot or key";
            return Err(Error::SnapshotPage { gpa: Gpa(at), why });
        }
        out[i * PAGE_SIZE as usize..][..PAGE_SIZE as usize].copy_from_slice(page);
    }
    Ok(())
}

/// Sets the states of `entries`' pages.
fn set_states(regions: &[Arc<PrivateRegion>], entries: &[Entry]) {
    for entry in entries {
        if let Some(region) = regions.iter().find(|r| r.contains(Gpa(entry.gpa))) {
            let pages = region.pages_of(Gpa(entry.gpa), entry.pages * PAGE_SIZE);
            region.shared.set(pages, entry.state == PageState::Shared);
        }
    }
}

fn describe(regions: &[(u64, u64)]) -> String {
    let parts: Vec<String> =
        regions.iter().map(|(gpa, size)| format!("{gpa:#x}+{size:#x}")).collect();
    parts.join(", ")
}

/// The prefetch thread of [`PrivateMemory::start_prefetch`]: stopped and
/// joined on drop.
#[derive(Debug)]
pub struct Prefetch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prefetch {
    /// Waits until every page is fetched (or the thread met an error).
    pub fn wait(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

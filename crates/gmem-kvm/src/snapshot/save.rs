//! Saving a snapshot: the index first (the memory is paused, so what is
//! allocated is known), then the pages, read under their page locks and
//! sealed on a thread of their own while the caller's thread writes.

use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use gmem::PAGE_SIZE;

use super::format::{
    Entry, Header, Sealer, SnapshotId, SnapshotKey, MAX_ENTRIES, MAX_STATE, RECORD_BYTES,
};
use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::region::{PageState, PrivateRegion};

/// Pages read and sealed at a time: 1 MiB, so that a writer's 1 MiB
/// buffer passes the records through uncopied.
const CHUNK_PAGES: u64 = 256;

/// What a save wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot's identity.
    pub id: SnapshotId,
    /// Its base's, for a diff.
    pub base: Option<SnapshotId>,
    /// Pages whose content it holds.
    pub pages: u64,
    /// Bytes written.
    pub bytes: u64,
}

impl PrivateMemory {
    /// Writes a full snapshot of this memory to `out`, sealed under `key`,
    /// with `vmm_state` (at most 64 MiB; sealed too) for the VMM to get
    /// back at restore. The VM must be paused (no vCPU in `KVM_RUN`):
    /// the pages are read as they are. Pages still to be fetched from a
    /// snapshot this memory was restored from are fetched first.
    ///
    /// Conversions wait meanwhile (`EDEADLK` from inside a listener, a
    /// conversion or punch, or while this thread holds a host access); `EOPNOTSUPP` for native
    /// regions; `out`'s errno where it fails, after which what was written
    /// is no snapshot (its end tag is missing) and the memory is
    /// unchanged. Afterwards this snapshot is the base of the next diff.
    pub fn save_snapshot(
        &self,
        out: &mut dyn Write,
        key: &SnapshotKey,
        vmm_state: &[u8],
    ) -> Result<SnapshotInfo> {
        self.save(out, key, vmm_state, false)
    }

    /// Writes a diff snapshot: the pages changed since the last snapshot
    /// saved or restored (its base), and every shared page. Needs
    /// [`track_dirty_pages`](Self::track_dirty_pages) on since that base
    /// (`EINVAL` otherwise). Errors as [`save_snapshot`](Self::save_snapshot);
    /// a failed diff leaves the changes recorded for the next one.
    pub fn save_diff_snapshot(
        &self,
        out: &mut dyn Write,
        key: &SnapshotKey,
        vmm_state: &[u8],
    ) -> Result<SnapshotInfo> {
        self.save(out, key, vmm_state, true)
    }

    fn save(
        &self,
        out: &mut dyn Write,
        key: &SnapshotKey,
        vmm_state: &[u8],
        diff: bool,
    ) -> Result<SnapshotInfo> {
        // Its readers wait for page locks that a punch of this thread's
        // (a listener inside it) would hold until the listener returns.
        self.gate.check_not_held_here("save a snapshot")?;
        let _no_conversions = self.gate.conversion_turn()?;
        let base = *self.snapshots.base();
        let id =
            match (diff, base) {
                (false, _) => SnapshotId::new(0)?,
                (true, Some(base)) if self.tracks_dirty_pages() => {
                    SnapshotId::new(base.generation + 1)?
                }
                (true, _) => return Err(Error::InvalidArgument(
                    "a diff snapshot needs dirty tracking on since a snapshot saved or restored"
                        .into(),
                )),
            };
        let plan = self.plan_snapshot(key, id, base.filter(|_| diff), vmm_state)?;
        let written = plan.write_head(out).and_then(|()| {
            self.write_records(out, &plan.sealer, &plan.regions, &plan.entries)?;
            plan.write_end(out)
        });
        if let Err(e) = written {
            plan.give_back();
            return Err(e);
        }
        *self.snapshots.base() = Some(id);
        Ok(plan.info())
    }

    /// What snapshot `id` will hold (a diff on `base`, or a full one), with
    /// its changes taken: the caller holds the conversion turn, and writes
    /// it whole ([`SnapshotPlan::write_head`], the records, the end) or
    /// gives the changes back ([`SnapshotPlan::give_back`]).
    pub(crate) fn plan_snapshot(
        &self,
        key: &SnapshotKey,
        id: SnapshotId,
        base: Option<SnapshotId>,
        vmm_state: &[u8],
    ) -> Result<SnapshotPlan> {
        if vmm_state.len() as u64 > MAX_STATE {
            return Err(Error::InvalidArgument(format!(
                "VMM state of {} bytes: at most {MAX_STATE}",
                vmm_state.len()
            )));
        }
        let mut regions: Vec<Arc<PrivateRegion>> = self.regions().to_vec();
        regions.sort_by_key(|r| r.gpa.0);
        if regions.is_empty() || regions.iter().any(|r| r.file_backing().is_none()) {
            return Err(Error::Unsupported(
                "snapshots of memory without regions, or with native (guest_memfd) regions".into(),
            ));
        }
        let diff = base.is_some();
        if !diff {
            self.fetch_all()?;
        }
        self.harvest_dirty_log()?;
        // Taken now: changes from here on are the next snapshot's.
        let taken: Vec<Vec<Range<u64>>> = regions.iter().map(|r| r.take_changed()).collect();
        let entries = (|| {
            let mut entries = Vec::new();
            for (region, changed) in regions.iter().zip(&taken) {
                entries.extend(self.entries_of(region, diff.then_some(&changed[..]))?);
            }
            if entries.len() as u64 > MAX_ENTRIES {
                return Err(Error::InvalidArgument(format!(
                    "{} runs of pages: a snapshot's index holds at most {MAX_ENTRIES}",
                    entries.len()
                )));
            }
            Ok(entries)
        })();
        let entries = match entries {
            Ok(entries) => entries,
            Err(e) => {
                give_back(&regions, &taken);
                return Err(e);
            }
        };
        let records: u64 = entries.iter().filter(|e| e.data).map(|e| e.pages).sum();
        let sealer = Sealer::new(key, id);
        let header = Header {
            id,
            base,
            regions: regions.iter().map(|r| (r.gpa.0, r.size)).collect(),
            entries: entries.len() as u64,
            records,
            state_len: vmm_state.len() as u64,
            key_check: sealer.key_check(),
        };
        let mut head = header.encode();
        let mut index = Entry::encode_all(&entries);
        let index_tag = sealer.seal_index(&head, &mut index);
        let mut state = vmm_state.to_vec();
        let state_tag = sealer.seal_state(&head, &mut state);
        head.extend([&index[..], &index_tag, &state, &state_tag].concat());
        Ok(SnapshotPlan { header, head, entries, sealer, regions, taken })
    }

    /// The index entries of `region`: for a full snapshot its allocated
    /// pages and its shared holes; for a diff its changed pages (data where
    /// allocated, holes elsewhere) and its allocated shared pages.
    fn entries_of(
        &self,
        region: &PrivateRegion,
        changed: Option<&[Range<u64>]>,
    ) -> Result<Vec<Entry>> {
        let f = region.file_backing().expect("checked: file regions only");
        let all = 0..region.pages();
        let allocated: Vec<Range<u64>> = f
            .binding
            .allocated_runs(f.file_pages(&all))?
            .into_iter()
            .filter_map(|run| f.region_pages(run, region.pages()))
            .collect();
        let mut data = PageSet::default();
        let mut holes = PageSet::default();
        let shared = region.shared.runs(all.clone(), true);
        if let Some(changed) = changed {
            data.extend(intersect(changed, &allocated));
            holes.extend(subtract(changed, &allocated));
            data.extend(intersect(&shared, &allocated));
        } else {
            data.extend(allocated.iter().cloned());
            holes.extend(subtract(&shared, &allocated));
        }
        let mut entries = Vec::new();
        for (runs, is_data) in [(data.runs(), true), (holes.runs(), false)] {
            for run in runs {
                // Split by state.
                for (state, value) in [(PageState::Shared, true), (PageState::Private, false)] {
                    for part in region.shared.runs(run.clone(), value) {
                        entries.push(Entry {
                            gpa: region.gpa_of(part.start).0,
                            pages: part.end - part.start,
                            state,
                            data: is_data,
                        });
                    }
                }
            }
        }
        entries.sort_by_key(|e| e.gpa);
        Ok(entries)
    }

    /// Reads, seals and writes the data pages of `entries`, in order:
    /// threads (one per core) read and seal chunks while this one writes
    /// them in order.
    pub(crate) fn write_records(
        &self,
        out: &mut dyn Write,
        sealer: &Sealer,
        regions: &[Arc<PrivateRegion>],
        entries: &[Entry],
    ) -> Result<()> {
        let chunks = chunks_of(regions, entries);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let next = AtomicUsize::new(0);
        let (sealed, written) =
            std::sync::mpsc::sync_channel::<(usize, Result<Vec<u8>>)>(2 * workers);
        // Buffers written go back to the workers (fresh ones would be
        // mapped and zeroed by the kernel each time).
        let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
        let recycled = std::sync::Mutex::new(recycled);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let (sealed, next, chunks, recycled) = (sealed.clone(), &next, &chunks, &recycled);
                scope.spawn(move || loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(chunk) = chunks.get(index) else { return };
                    let reused = recycled.lock().ok().and_then(|r| r.try_recv().ok());
                    let mut buffer = reused.unwrap_or_default();
                    let bytes = seal_chunk(chunk, sealer, &mut buffer).map(|()| buffer);
                    let failed = bytes.is_err();
                    if sealed.send((index, bytes)).is_err() || failed {
                        return;
                    }
                });
            }
            drop(sealed);
            // Chunks come in any order; they are written in theirs.
            let mut waiting = std::collections::BTreeMap::new();
            let mut due = 0;
            let mut result = Ok(());
            for (index, bytes) in written.iter() {
                waiting.insert(index, bytes);
                while let Some(bytes) = waiting.remove(&due) {
                    result = bytes.and_then(|bytes| {
                        out.write_all(&bytes).map_err(Error::io("write the snapshot"))?;
                        let _ = recycle.send(bytes);
                        Ok(())
                    });
                    due += 1;
                    if result.is_err() {
                        break;
                    }
                }
                if result.is_err() {
                    break;
                }
            }
            // Stops the workers: the next chunk they take is past the end,
            // and their sends fail once the receiver is gone.
            next.store(chunks.len(), Ordering::Relaxed);
            drop(written);
            result
        })
    }
}

/// A snapshot about to be written: its header and the bytes up to its
/// records, its entries, and the changes it took from its regions.
pub(crate) struct SnapshotPlan {
    pub(crate) header: Header,
    head: Vec<u8>,
    pub(crate) entries: Vec<Entry>,
    pub(crate) sealer: Sealer,
    pub(crate) regions: Vec<Arc<PrivateRegion>>,
    taken: Vec<Vec<Range<u64>>>,
}

impl SnapshotPlan {
    /// The header, index and VMM state, sealed.
    pub(crate) fn write_head(&self, out: &mut dyn Write) -> Result<()> {
        out.write_all(&self.head).map_err(Error::io("write the snapshot"))
    }

    /// The end tag; then flushes `out`.
    pub(crate) fn write_end(&self, out: &mut dyn Write) -> Result<()> {
        let io = || Error::io("write the snapshot");
        out.write_all(&self.sealer.end_tag(self.header.records)).map_err(io())?;
        out.flush().map_err(io())
    }

    /// Marks the changes this snapshot took as changed again (it was not
    /// written whole: the next diff holds them).
    pub(crate) fn give_back(&self) {
        give_back(&self.regions, &self.taken);
    }

    /// What was written.
    pub(crate) fn info(&self) -> SnapshotInfo {
        let header = &self.header;
        SnapshotInfo {
            id: header.id,
            base: header.base,
            pages: header.records,
            bytes: header.total_len(),
        }
    }

    /// The records' chunks, in order.
    pub(crate) fn chunks(&self) -> Vec<Chunk<'_>> {
        chunks_of(&self.regions, &self.entries)
    }
}

/// Marks the changes `taken` from `regions` as changed again.
fn give_back(regions: &[Arc<PrivateRegion>], taken: &[Vec<Range<u64>>]) {
    for (region, taken) in regions.iter().zip(taken) {
        taken.iter().for_each(|run| region.mark_changed(run.clone()));
    }
}

/// A run of data pages sealed as one: the region, its pages, their state,
/// and the record of the first.
pub(crate) struct Chunk<'a> {
    pub(crate) region: &'a PrivateRegion,
    pub(crate) pages: Range<u64>,
    pub(crate) state: PageState,
    pub(crate) record: u64,
}

/// The data pages of `entries` in chunks of at most [`CHUNK_PAGES`].
fn chunks_of<'a>(regions: &'a [Arc<PrivateRegion>], entries: &[Entry]) -> Vec<Chunk<'a>> {
    let mut chunks = Vec::new();
    let mut record = 0;
    for entry in entries.iter().filter(|e| e.data) {
        let region = regions
            .iter()
            .find(|r| r.contains(crate::Gpa(entry.gpa)))
            .expect("entries lie in the regions");
        let first = (entry.gpa - region.gpa.0) / PAGE_SIZE;
        let mut page = first;
        while page < first + entry.pages {
            let len = CHUNK_PAGES.min(first + entry.pages - page);
            chunks.push(Chunk { region, pages: page..page + len, state: entry.state, record });
            record += len;
            page += len;
        }
    }
    chunks
}

/// Reads a chunk's pages (under their page locks: a hole reads zero)
/// and seals them into `sealed`: its records, each the sealed page and
/// its tag.
pub(crate) fn seal_chunk(chunk: &Chunk<'_>, sealer: &Sealer, sealed: &mut Vec<u8>) -> Result<()> {
    let Chunk { region, ref pages, state, record } = *chunk;
    let f = region.file_backing().expect("file regions only");
    let count = (pages.end - pages.start) as usize;
    sealed.reserve(count * RECORD_BYTES as usize);
    super::scratch(&super::PLAIN, count * PAGE_SIZE as usize, |plain| {
        {
            let guard = f.binding.lock_range_unfilled(f.file_pages(pages), false)?;
            guard.read(0, plain)?;
        }
        sealed.clear();
        for (i, page) in plain.chunks_exact_mut(PAGE_SIZE as usize).enumerate() {
            let gpa = region.gpa_of(pages.start + i as u64).0;
            let tag = sealer.seal_page(record + i as u64, gpa, state, page);
            sealed.extend_from_slice(page);
            sealed.extend_from_slice(&tag);
        }
        Ok(())
    })
}

/// A set of page runs, merged.
#[derive(Default)]
struct PageSet(Vec<Range<u64>>);

impl PageSet {
    fn extend(&mut self, runs: impl IntoIterator<Item = Range<u64>>) {
        self.0.extend(runs.into_iter().filter(|r| !r.is_empty()));
    }

    fn runs(mut self) -> Vec<Range<u64>> {
        self.0.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for run in self.0 {
            match merged.last_mut() {
                Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
                _ => merged.push(run),
            }
        }
        merged
    }
}

/// The parts of `a`'s runs inside `b`'s (both ascending, disjoint).
fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (start, end) = (a[i].start.max(b[j].start), a[i].end.min(b[j].end));
        if start < end {
            out.push(start..end);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The parts of `a`'s runs outside `b`'s (both ascending, disjoint).
fn subtract(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let (mut j, mut out) = (0, Vec::new());
    for x in a {
        while j < b.len() && b[j].end <= x.start {
            j += 1;
        }
        let mut at = x.start;
        for y in b[j..].iter().take_while(|y| y.start < x.end) {
            if y.start > at {
                out.push(at..y.start);
            }
            at = at.max(y.end);
        }
        if at < x.end {
            out.push(at..x.end);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_intersect_subtract_and_merge() {
        let a = [0..10, 20..30];
        let b = [5..25, 40..50];
        assert_eq!(intersect(&a, &b), [5..10, 20..25]);
        assert_eq!(subtract(&a, &b), [0..5, 25..30]);
        assert_eq!(subtract(&a, &[]), a);
        let mut set = PageSet::default();
        set.extend([8..12, 0..4, 3..8, 20..20]);
        assert_eq!(set.runs(), std::iter::once(0..12).collect::<Vec<_>>());
    }
}

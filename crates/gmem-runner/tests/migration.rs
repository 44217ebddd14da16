//! Live migration of real guests between two VMs of this process over
//! Unix socket pairs: pre-copy, post-copy and hybrid finish the guest as
//! an uninterrupted run would; a destination that dies, a wrong key or a
//! link dropped before the switch leave the source's guest finishing
//! normally; a link dropped in post-copy stops the destination naming
//! the pages it lost.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::{config, console, kvm, launch, RAM};
use gmem_kvm::{IncomingMigration, MigrationInfo, MigrationMode, SendError, SnapshotKey};
use gmem_runner::{Link, Outcome, RunReport, Vm};

fn key() -> SnapshotKey {
    SnapshotKey::new([0x3c; 32])
}

/// A connected pair of links.
fn links() -> (Link, Link) {
    let (a, b) = UnixStream::pair().unwrap();
    (Link::unix(a).unwrap(), Link::unix(b).unwrap())
}

/// What a migration did on each side.
struct Migrated {
    source: RunReport,
    sent: Result<MigrationInfo, SendError>,
    destination: Option<gmem_kvm::Result<RunReport>>,
}

/// Runs guest `name` on a source VM and, from its sync stage `stage`,
/// migrates it over `link` (`mode`, under `key`) while `destination`
/// (run on its own thread with the other end) takes it. A source whose
/// migration failed before the switch resumes its guest.
fn migrate_with(
    name: &str,
    vcpus: u32,
    stage: u64,
    mode: MigrationMode,
    link: Link,
    destination: impl FnOnce() -> Option<gmem_kvm::Result<RunReport>> + Send,
) -> Migrated {
    let source = Vm::with_ram(RAM).unwrap().0;
    let (trigger, triggered) = mpsc::channel::<()>();
    let over = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let dest = scope.spawn(destination);
        let source_ref = &source;
        let over_ref = &over;
        let migrating = scope.spawn(move || {
            triggered.recv().ok()?;
            let sent = source_ref.migrate_to(link, &key(), mode);
            over_ref.store(true, Ordering::SeqCst);
            Some(sent)
        });
        let trigger = std::sync::Mutex::new(Some(trigger));
        // The vCPU at the stage waits there until the switch (or the
        // failure), as `gmem run --migrate-at` does; the others run on.
        let mut report = launch(&source, name, RAM, &config(vcpus), || {}, &|vm, at| {
            if at == stage {
                if let Some(t) = trigger.lock().unwrap().take() {
                    t.send(()).unwrap();
                    while !vm.is_stopping() && !over.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        });
        drop(trigger.lock().unwrap().take());
        let sent = migrating.join().unwrap().expect("the stage was reached");
        if let Err(e) = &sent {
            if !e.switched && report.outcome == Outcome::Paused {
                let mut console = report.console;
                report = source.resume(&config(vcpus), &|_, _| {}).unwrap();
                console.append(&mut report.console);
                report.console = console;
            }
        }
        Migrated { source: report, sent, destination: dest.join().unwrap() }
    })
}

/// The destination side: accepts on `link`, receives into a fresh VM and
/// runs it (its sync stages go to `on_sync`).
fn destination(link: Link, vcpus: u32) -> Option<gmem_kvm::Result<RunReport>> {
    destination_with(link, vcpus, &key())
}

fn destination_with(
    link: Link,
    vcpus: u32,
    key: &SnapshotKey,
) -> Option<gmem_kvm::Result<RunReport>> {
    let (input, output) = link.split();
    let incoming = IncomingMigration::accept(input, output, key);
    let run = incoming.and_then(|incoming| {
        let vm = Vm::new()?;
        let ram: u64 = incoming.regions().iter().map(|(_, size)| size).sum();
        vm.add_ram(ram)?;
        vm.receive_migration(incoming)?;
        let report = vm.resume(&config(vcpus), &|_, _| {})?;
        // A guest that finished got every page it needed; the rest come.
        if report.outcome == Outcome::Exit(0) {
            if let Some(pages) = vm.take_incoming_pages() {
                pages.wait()?;
            }
            assert_eq!(vm.memory().pending_snapshot_pages(), 0, "every page arrived");
        }
        Ok(report)
    });
    Some(run)
}

fn migrate(name: &str, vcpus: u32, stage: u64, mode: MigrationMode) -> Migrated {
    let (out, into) = links();
    migrate_with(name, vcpus, stage, mode, out, move || destination(into, vcpus))
}

#[test]
fn a_touch_guest_migrates_in_every_mode_and_finishes_there() {
    if !kvm() {
        return;
    }
    for mode in [MigrationMode::PreCopy, MigrationMode::PostCopy, MigrationMode::Hybrid] {
        let migrated = migrate("touch", 2, 1, mode);
        let info = migrated.sent.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_eq!(migrated.source.outcome, Outcome::Paused, "{mode:?}: the source stopped");
        let report = migrated.destination.unwrap().unwrap();
        assert_eq!(report.outcome, Outcome::Exit(0), "{mode:?}: {}", console(&report));
        assert!(info.pages() > 1000, "{mode:?}: {info:?}");
        match mode {
            MigrationMode::PreCopy => {
                assert!(info.rounds >= 1 && info.postcopy_pages == 0, "{info:?}")
            }
            MigrationMode::PostCopy => {
                assert!(info.rounds == 0 && info.precopy_pages == 0, "{info:?}")
            }
            MigrationMode::Hybrid => assert!(info.rounds >= 1, "{info:?}"),
        }
    }
}

#[test]
fn a_stress_guest_converting_while_migrated_loses_nothing() {
    if !kvm() {
        return;
    }
    // Stress converts pages all the time: rounds run while it does.
    for mode in [MigrationMode::PreCopy, MigrationMode::Hybrid] {
        let (out, into) = links();
        let migrated = migrate_with("stress", 2, 1, mode, out, move || {
            let (input, output) = into.split();
            let incoming = IncomingMigration::accept(input, output, &key()).unwrap();
            let vm = Vm::with_ram(RAM).unwrap().0;
            vm.receive_migration(incoming).unwrap();
            // The stress guest's host side: STOP at stage 2.
            let report = vm.resume(&config(2), &|vm, at| {
                if at == 2 {
                    vm.write_guest(gmem_runner::Gpa(0xf00000), &[1]).unwrap();
                }
            });
            Some(report)
        });
        migrated.sent.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let report = migrated.destination.unwrap().unwrap();
        assert_eq!(report.outcome, Outcome::Exit(0), "{mode:?}: {}", console(&report));
    }
}

#[test]
fn a_destination_that_dies_before_the_switch_leaves_the_guest_here() {
    if !kvm() {
        return;
    }
    let (out, into) = links();
    // Takes the hello, then is gone (every descriptor of its end closed).
    let migrated = migrate_with("touch", 2, 1, MigrationMode::PreCopy, out, move || {
        let (input, output) = into.split();
        drop(IncomingMigration::accept(input, output, &key()).unwrap());
        None
    });
    let e = migrated.sent.unwrap_err();
    assert!(!e.switched);
    assert_eq!(migrated.source.outcome, Outcome::Exit(0), "{}", console(&migrated.source));
}

/// Forwards bytes between a source's link and a destination's, and cuts
/// both (shut down, as a dropped connection) when `cut` says so: it sees
/// how many bytes went each way so far (to the destination, back).
fn proxy(
    cut: impl Fn(u64, u64) -> bool + Send + Sync + 'static,
) -> (Link, Link, std::thread::JoinHandle<()>) {
    let (source, near) = UnixStream::pair().unwrap();
    let (far, destination) = UnixStream::pair().unwrap();
    let cut = std::sync::Arc::new(cut);
    let counts = std::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let sockets = [near.try_clone().unwrap(), far.try_clone().unwrap()];
    let pump = move |mut from: UnixStream, mut to: UnixStream, way: usize| {
        let (cut, counts) = (cut.clone(), counts.clone());
        let sockets = [sockets[0].try_clone().unwrap(), sockets[1].try_clone().unwrap()];
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
                counts[way].fetch_add(n as u64, Ordering::SeqCst);
                if cut(counts[0].load(Ordering::SeqCst), counts[1].load(Ordering::SeqCst)) {
                    break;
                }
            }
            sockets.iter().for_each(|s| drop(s.shutdown(std::net::Shutdown::Both)));
        })
    };
    let forth = pump(near.try_clone().unwrap(), far.try_clone().unwrap(), 0);
    let back = pump(far, near, 1);
    let joined = std::thread::spawn(move || {
        forth.join().unwrap();
        back.join().unwrap();
    });
    (Link::unix(source).unwrap(), Link::unix(destination).unwrap(), joined)
}

#[test]
fn a_wrong_key_leaves_the_guest_here_and_the_destination_refuses() {
    if !kvm() {
        return;
    }
    let (out, into) = links();
    let other = SnapshotKey::new([0x3d; 32]);
    let migrated = migrate_with("touch", 2, 1, MigrationMode::PreCopy, out, move || {
        destination_with(into, 2, &other)
    });
    let e = migrated.sent.unwrap_err();
    assert!(matches!(e.error, gmem_kvm::Error::WrongKey) && !e.switched, "{e}");
    assert_eq!(migrated.source.outcome, Outcome::Exit(0), "{}", console(&migrated.source));
    let refused = migrated.destination.unwrap().unwrap_err();
    assert!(matches!(refused, gmem_kvm::Error::WrongKey), "{refused}");
}

#[test]
fn a_link_dropped_in_a_round_leaves_the_guest_here() {
    if !kvm() {
        return;
    }
    // Cut after 1 MiB of round 0.
    let (out, into, proxy) = proxy(|forth, _| forth > 1 << 20);
    let migrated =
        migrate_with("touch", 2, 1, MigrationMode::PreCopy, out, move || destination(into, 2));
    proxy.join().unwrap();
    assert!(!migrated.sent.unwrap_err().switched);
    assert_eq!(migrated.source.outcome, Outcome::Exit(0), "{}", console(&migrated.source));
    let lost = migrated.destination.unwrap().unwrap_err();
    assert_eq!(lost.errno(), gmem_kvm::Errno::CONNRESET, "{lost}");
}

#[test]
fn a_link_dropped_in_postcopy_stops_the_destination_naming_what_was_lost() {
    if !kvm() {
        return;
    }
    // Cut once the destination said it runs (its second message, 48
    // bytes each): no page has been pushed yet.
    let (out, into, proxy) = proxy(|_, back| back >= 96);
    let migrated =
        migrate_with("touch", 2, 1, MigrationMode::PostCopy, out, move || destination(into, 2));
    proxy.join().unwrap();
    let e = migrated.sent.unwrap_err();
    assert!(e.switched, "the destination ran the VM: {e}");
    assert_eq!(migrated.source.outcome, Outcome::Paused, "the source never resumes it");
    let report = migrated.destination.unwrap().unwrap();
    let Outcome::Error(why) = &report.outcome else { panic!("{:?}", report.outcome) };
    assert!(
        why.contains("migration link lost") && why.contains("page(s) still at the source"),
        "{why}"
    );
}

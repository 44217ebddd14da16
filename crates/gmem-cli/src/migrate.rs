//! `gmem run`'s migrations: the destination waiting for its source, and
//! the source's migration, on a thread of its own while the guest runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use gmem_kvm::{Error, IncomingMigration, MigrationInfo, MigrationMode, SendError, SnapshotKey};
use gmem_runner::{boot, MigrationAddress, RunReport, Vm};
use serde_json::json;

use crate::args::RunArgs;
use crate::run::{fail, Failure, BAD_INPUT, TIMEOUT};

/// How long `--incoming` waits for a source without `--timeout`.
const DEFAULT_WAIT: f64 = 60.0;

/// Listens at `--incoming`, waits for one source (at most `--timeout`
/// seconds: status 124) and takes its hello (status 2 for a wrong key or
/// a peer that speaks something else).
pub(crate) fn accept(args: &RunArgs, key: &SnapshotKey) -> Result<IncomingMigration, Failure> {
    let address = args.incoming.as_ref().expect("--incoming");
    let listener = address
        .listen()
        .or_else(|e| fail(BAD_INPUT, format!("--incoming {address}: cannot listen: {e}")))?;
    eprintln!("gmem run: waiting for a migration at {}", listener.address());
    // `--timeout 0` waits for ever, as it runs the guest for ever.
    let wait = args.timeout.unwrap_or(DEFAULT_WAIT);
    let within = match wait {
        0.0 => Duration::MAX,
        wait => Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX),
    };
    let link = listener.accept(within).or_else(|e| {
        let status = if e.kind() == std::io::ErrorKind::TimedOut { TIMEOUT } else { BAD_INPUT };
        fail(status, format!("--incoming {address}: no migration came in {wait} s: {e}"))
    })?;
    let (input, output) = link.split();
    IncomingMigration::accept(input, output, key)
        .or_else(|e| fail(BAD_INPUT, format!("--incoming {address}: refused: {e}")))
}

/// The RAM size of the source's layout: `gmem run`'s own for that size.
pub(crate) fn ram_size(incoming: &IncomingMigration) -> Result<u64, String> {
    let regions = incoming.regions();
    let ram = regions.iter().try_fold(0u64, |sum, (_, size)| sum.checked_add(*size));
    let ram = ram.ok_or("the source's regions add up past 2^64 bytes")?;
    boot::check_machine(ram, 1).map_err(|e| format!("the source's memory: {e}"))?;
    Ok(ram)
}

/// A migration's figures, as `--json` reports them.
pub(crate) fn describe(info: &MigrationInfo) -> serde_json::Value {
    json!({
        "rounds": info.rounds,
        "pages": info.pages(),
        "precopy_pages": info.precopy_pages,
        "paused_pages": info.paused_pages,
        "postcopy_pages": info.postcopy_pages,
        "bytes": info.bytes,
        "downtime_ms": info.downtime.as_secs_f64() * 1e3,
        "total_ms": info.total.as_secs_f64() * 1e3,
    })
}

/// `--migrate-to`: the migration thread, started at once or at
/// `--migrate-at`'s stage.
pub(crate) struct Outgoing<'a> {
    to: Option<(&'a MigrationAddress, MigrationMode)>,
    at: Option<u64>,
    trigger: Mutex<Option<Sender<()>>>,
    triggered: Mutex<Option<Receiver<()>>>,
    over: AtomicBool,
    /// Whether the run ended.
    ran: AtomicBool,
}

impl<'a> Outgoing<'a> {
    pub(crate) fn new(args: &'a RunArgs) -> Self {
        let (trigger, triggered) = std::sync::mpsc::channel();
        Self {
            to: args.migrate_to.as_ref().map(|to| (to, args.migrate_mode.into())),
            at: args.migrate_at,
            trigger: Mutex::new(Some(trigger)),
            triggered: Mutex::new(Some(triggered)),
            over: AtomicBool::new(false),
            ran: AtomicBool::new(false),
        }
    }

    /// Starts the migration (once) from a sync handler, whose vCPU waits
    /// until the VM pauses for the switch or the migration failed.
    pub(crate) fn start_and_wait(&self, vm: &Vm) {
        if self.start() {
            while !vm.is_stopping() && !self.over.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Starts the migration, if it has not started yet.
    fn start(&self) -> bool {
        let trigger = self.trigger.lock().unwrap_or_else(|p| p.into_inner()).take();
        trigger.is_some_and(|t| t.send(()).is_ok())
    }

    /// Runs the VM (`run`) while the migration goes on beside it.
    pub(crate) fn run(
        &self,
        vm: &Vm,
        key: Option<&SnapshotKey>,
        run: impl FnOnce() -> gmem_kvm::Result<RunReport>,
    ) -> (gmem_kvm::Result<RunReport>, Option<Result<MigrationInfo, SendError>>) {
        let (Some((to, mode)), Some(key)) = (self.to, key) else { return (run(), None) };
        let triggered = self.triggered.lock().unwrap_or_else(|p| p.into_inner()).take();
        std::thread::scope(|scope| {
            let migrating = scope.spawn(move || {
                triggered?.recv().ok()?;
                // Started at once: it pauses a VM whose run has begun.
                while !vm.is_running() {
                    if self.ran.load(Ordering::SeqCst) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                let sent = to
                    .connect()
                    .map_err(|e| SendError {
                        error: Error::io("connect to the destination")(e),
                        switched: false,
                    })
                    .and_then(|link| vm.migrate_to(link, key, mode));
                self.over.store(true, Ordering::SeqCst);
                Some(sent)
            });
            if self.at.is_none() {
                self.start();
            }
            let ran = run();
            self.ran.store(true, Ordering::SeqCst);
            // Never started (the run ended before its stage): it ends too.
            drop(self.trigger.lock().unwrap_or_else(|p| p.into_inner()).take());
            (ran, migrating.join().unwrap_or(None))
        })
    }
}

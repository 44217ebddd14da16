//! `gmem run`: boot a guest on private memory and report per GUEST_ABI 1.2.

use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Mutex;
use std::time::Duration;

use gmem_kvm::probe;
use gmem_runner::{boot, Gpa, GuestImage, Outcome, RunConfig, Vm};
use serde_json::json;

use crate::args::{parse_sync, Action, Backend, RunArgs, SyncSpec};

/// Exit status for bad arguments or a bad image.
pub(crate) const BAD_INPUT: u8 = 2;
/// Exit status for a VM error.
const VM_ERROR: u8 = 3;
/// Exit status when `--save-at` could not save: the guest ran on to its end.
const SAVE_FAILED: u8 = 4;
/// Exit status when `--migrate-to` failed before the destination ran the
/// VM: the guest ran on here to its end.
const MIGRATE_FAILED: u8 = 5;
/// Exit status on timeout.
pub(crate) const TIMEOUT: u8 = 124;
/// `--mem`'s default.
const DEFAULT_MEM: u64 = 64 << 20;

/// What one sync action did.
struct SyncRecord {
    stage: u64,
    action: &'static str,
    gpa: u64,
    len: u64,
    denied: Option<String>,
    data: Option<Vec<u8>>,
}

/// Why a run could not start or finish: the exit status and the message.
pub(crate) struct Failure {
    status: u8,
    message: String,
}

pub(crate) fn fail<T>(status: u8, message: impl std::fmt::Display) -> Result<T, Failure> {
    Err(Failure { status, message: message.to_string() })
}

/// The largest guest image file `gmem run` reads.
const MAX_IMAGE: u64 = 256 << 20;

/// A guest image to run: its bytes, and its name if it is a built-in one.
struct Guest {
    bytes: Vec<u8>,
    built_in: Option<&'static str>,
}

/// The guest image: a regular file of at most [`MAX_IMAGE`] bytes (and no
/// more than RAM) that starts like an ELF file, else a built-in guest of
/// that name. A FIFO, a device or a directory is refused without reading.
fn guest_image(guest: Option<&str>, ram: u64) -> Result<Guest, String> {
    let built_in = |name: &str| {
        gmem_guest::GUESTS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(name, elf)| Guest { bytes: elf.to_vec(), built_in: Some(name) })
    };
    let Some(guest) = guest else { return built_in("demo").ok_or("no demo guest".into()) };
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(guest) {
        Ok(file) => guest_file(guest, file, ram).map(|bytes| Guest { bytes, built_in: None }),
        Err(e) => built_in(guest).ok_or_else(|| {
            let names: Vec<&str> = gmem_guest::GUESTS.iter().map(|(name, _)| *name).collect();
            format!(
                "no guest '{guest}': not a file ({e}), nor a built-in guest ({})",
                names.join(", ")
            )
        }),
    }
}

/// The bytes of the guest image file `file` (opened from `guest`).
fn guest_file(guest: &str, file: std::fs::File, ram: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let meta = file.metadata().map_err(|e| format!("guest image '{guest}': {e}"))?;
    if !meta.is_file() {
        return Err(format!("guest image '{guest}' is not a regular file"));
    }
    let limit = MAX_IMAGE.min(ram);
    if meta.len() > limit {
        return Err(format!(
            "guest image '{guest}' is {} bytes; an image must fit in RAM and in {limit} bytes",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    let mut reader = file.take(limit + 1);
    reader.by_ref().take(4).read_to_end(&mut bytes).map_err(|e| format!("'{guest}': {e}"))?;
    if bytes != b"\x7fELF" {
        return Err(format!("guest image '{guest}' is not an ELF file"));
    }
    reader.read_to_end(&mut bytes).map_err(|e| format!("'{guest}': {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("guest image '{guest}' grew past {limit} bytes while read"));
    }
    Ok(bytes)
}

/// Warns when `ram` is more than this host can give a guest that touches
/// all of it (memory and swap available, and the memory cgroup's limit).
fn warn_if_too_big(ram: u64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    let available =
        field("MemAvailable:").unwrap_or(u64::MAX).saturating_add(field("SwapFree:").unwrap_or(0));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned))
        .and_then(|path| std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok())
        .and_then(|max| max.trim().parse::<u64>().ok());
    let limit = available.min(cgroup.unwrap_or(u64::MAX));
    if ram > limit {
        eprintln!(
            "gmem run: warning: --mem {} MiB is more than this host can give ({} MiB available{}); \
             a guest that touches all of it will be killed for lack of memory",
            ram >> 20,
            available >> 20,
            cgroup.map(|c| format!(", memory cgroup limit {} MiB", c >> 20)).unwrap_or_default()
        );
    }
}

/// Picks the backend, or says why the one asked for cannot be had.
fn choose_backend(asked: Backend) -> Result<(&'static str, String), String> {
    if asked == Backend::Userspace {
        return Ok(("userspace", "asked for".into()));
    }
    let host = probe::host().map_err(|e| format!("probing the host failed: {e}"))?;
    match asked {
        Backend::Native => match host.native.usable() {
            Ok(()) => Ok(("native", "asked for: the kernel's guest_memfd, mapped".into())),
            Err(why) => Err(format!("--backend native is not available here: {why}")),
        },
        _ => host.auto_backend().map(|choice| (choice.backend, choice.reason)),
    }
}

fn check_syncs(syncs: &[SyncSpec], ram: u64) -> Result<(), String> {
    for sync in syncs {
        let (gpa, len) = sync.action.range();
        if !boot::in_ram(ram, gpa, len) {
            return Err(format!(
                "sync {}: {gpa:#x}+{len:#x} lies outside guest RAM ({ram:#x} bytes, GUEST_ABI 1.1 layout)",
                sync.stage
            ));
        }
        if matches!(sync.action, Action::Punch { .. })
            && (gpa % gmem::PAGE_SIZE != 0 || len % gmem::PAGE_SIZE != 0)
        {
            return Err(format!("sync {}: punch needs a page-aligned GPA and length", sync.stage));
        }
    }
    Ok(())
}

fn run_action(vm: &Vm, sync: &SyncSpec) -> SyncRecord {
    let (gpa, len) = sync.action.range();
    let (denied, data) = match &sync.action {
        Action::Punch { .. } => (vm.punch(Gpa(gpa), len).err(), None),
        Action::Read { .. } => {
            let mut buf = vec![0; len as usize];
            match vm.read_guest(Gpa(gpa), &mut buf) {
                Ok(()) => (None, Some(buf)),
                Err(e) => (Some(e), None),
            }
        }
        Action::Write { data, .. } => (vm.write_guest(Gpa(gpa), data).err(), None),
    };
    SyncRecord {
        stage: sync.stage,
        action: sync.action.name(),
        gpa,
        len,
        denied: denied.map(|e| e.to_string()),
        data,
    }
}

/// The sync actions to run: the user's, or without any, a built-in
/// guest's own host side (those of its actions that lie in RAM).
fn syncs_for(args: &RunArgs, needs: &gmem_guest::Needs, mem: u64) -> Vec<SyncSpec> {
    if !args.syncs.is_empty() {
        return args.syncs.clone();
    }
    let in_ram = |sync: &SyncSpec| {
        let (gpa, len) = sync.action.range();
        boot::in_ram(mem, gpa, len)
    };
    needs.host_side.iter().filter_map(|text| parse_sync(text).ok()).filter(in_ram).collect()
}

/// What a built-in guest needs that the arguments lack, as a message;
/// and the vCPUs and timeout it runs with.
fn check_needs(
    args: &RunArgs,
    name: &str,
    needs: &gmem_guest::Needs,
) -> Result<(u32, f64), String> {
    let vcpus = args.vcpus.unwrap_or(needs.min_vcpus);
    if vcpus < needs.min_vcpus {
        return Err(format!("the {name} guest needs at least {} vCPUs (--vcpus)", needs.min_vcpus));
    }
    if needs.disk && args.disk.is_none() {
        return Err(format!(
            "the {name} guest drives a virtio-blk disk: give it --disk PATH[:SIZE]"
        ));
    }
    if needs.hypercall_exits && !args.hypercall_exits {
        return Err(format!(
            "the {name} guest converts by vmcall: run it with --hypercall-exits, where KVM \
             delivers hypercall exits (`gmem probe` says whether it does)"
        ));
    }
    let timeout = match args.timeout {
        Some(timeout) => timeout,
        None if needs.never_exits => {
            eprintln!(
                "gmem run: the {name} guest never exits (it is for timeouts and stops): \
                 stopping it after {NEVER_EXITS_TIMEOUT} s (--timeout)"
            );
            NEVER_EXITS_TIMEOUT
        }
        None => DEFAULT_TIMEOUT,
    };
    Ok((vcpus, timeout))
}

/// `--timeout`'s default.
const DEFAULT_TIMEOUT: f64 = 60.0;
/// `--timeout`'s default for a built-in guest that never exits.
const NEVER_EXITS_TIMEOUT: f64 = 2.0;

/// `bytes` up to the first NUL as text, if that is printable ASCII.
fn text(bytes: &[u8]) -> Option<&str> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = &bytes[..end];
    (!text.is_empty() && text.iter().all(|b| b.is_ascii_graphic() || *b == b' '))
        .then(|| std::str::from_utf8(text).ok())
        .flatten()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Goes on with a run that paused for a save or a migration that failed:
/// its console goes on where it stopped.
fn resume_here(
    vm: &Vm,
    config: &RunConfig,
    on_sync: gmem_runner::SyncHandler<'_>,
    report: &mut gmem_runner::RunReport,
) -> Result<(), Failure> {
    let mut console = std::mem::take(&mut report.console);
    *report = vm
        .resume(config, on_sync)
        .or_else(|e| fail(VM_ERROR, format!("cannot resume the VM: {e}")))?;
    console.append(&mut report.console);
    report.console = console;
    Ok(())
}

/// Runs `gmem run`; returns the process exit status. With `--json`,
/// stdout gets one JSON object however the run ends.
pub(crate) fn run(args: &RunArgs) -> u8 {
    match run_guest(args) {
        Ok(status) => status,
        Err(Failure { status, message }) => {
            eprintln!("gmem run: {message}");
            if args.json {
                let stats = gmem_runner::VmStats::default();
                let json = report_json(Report {
                    exit_code: None,
                    reason: "error",
                    error: Some(&message),
                    backend: None,
                    console: b"",
                    records: &[],
                    stats: &stats,
                    snapshot: None,
                    migration: None,
                });
                println!("{json}");
            }
            status
        }
    }
}

/// What GUEST_ABI's `--json` reports of a run.
struct Report<'a> {
    exit_code: Option<u32>,
    reason: &'a str,
    error: Option<&'a str>,
    backend: Option<&'a str>,
    console: &'a [u8],
    records: &'a [SyncRecord],
    stats: &'a gmem_runner::VmStats,
    snapshot: Option<serde_json::Value>,
    migration: Option<serde_json::Value>,
}

/// The JSON report of GUEST_ABI's `--json`.
fn report_json(report: Report<'_>) -> serde_json::Value {
    let Report { exit_code, reason, error, backend, console, records, stats, snapshot, migration } =
        report;
    let syncs: Vec<_> = records
        .iter()
        .map(|r| {
            json!({
                "stage": r.stage, "action": r.action, "gpa": r.gpa, "len": r.len,
                "result": if r.denied.is_some() { "denied" } else { "ok" },
                "data_hex": r.data.as_deref().map(hex), "detail": r.denied,
            })
        })
        .collect();
    json!({
        "exit_code": exit_code,
        "reason": reason,
        "error": error,
        "backend": backend,
        "console": String::from_utf8_lossy(console),
        "syncs": syncs,
        "stats": {
            "pages_served": stats.memory.pages_served,
            "allocated_pages": stats.memory.allocated_pages,
            "kernel_handovers": stats.memory.kernel_handovers,
            "faults": stats.memory.faults,
            "invalidations": stats.memory.invalidations,
            "conversions": stats.memory.conversions,
            "conversion_requests": stats.conversion_requests,
            "converted_pages": stats.memory.converted_pages,
            "host_denials": stats.memory.host_denials,
            "huge_mapped_bytes": stats.huge_mapped_bytes,
            "collapses": stats.memory.collapses,
            "kvm_pages_4k": stats.kvm_pages.map(|p| p[0]),
            "kvm_pages_2m": stats.kvm_pages.map(|p| p[1]),
            "kvm_pages_1g": stats.kvm_pages.map(|p| p[2]),
            "pending_snapshot_pages": stats.pending_snapshot_pages,
        },
        "snapshot": snapshot,
        "migration": migration,
    })
}

/// What the VM starts from: a guest image booted, or snapshots restored.
enum Start {
    Boot(GuestImage),
    Restore(Vec<gmem_kvm::SnapshotFile>),
    Incoming(gmem_kvm::IncomingMigration),
}

/// What `--save-at` asks for.
struct Save {
    stage: u64,
    path: std::path::PathBuf,
    diff: bool,
}

/// The snapshot key, where snapshots are asked for (status 2 without one).
fn snapshot_key(args: &RunArgs) -> Result<Option<gmem_kvm::SnapshotKey>, Failure> {
    let wanted = args.save_at.is_some()
        || !args.restore.is_empty()
        || args.migrate_to.is_some()
        || args.incoming.is_some();
    match (&args.key_file, wanted) {
        (Some(path), true) => {
            crate::snapshot::read_key(path).map(Some).or_else(|e| fail(BAD_INPUT, e))
        }
        (None, true) => {
            fail(BAD_INPUT, "--save-at, --restore, --migrate-to and --incoming need --key-file KEY")
        }
        (Some(_), false) => {
            fail(BAD_INPUT, "--key-file is for --save-at, --restore, --migrate-to and --incoming")
        }
        (None, false) => Ok(None),
    }
}

fn run_guest(args: &RunArgs) -> Result<u8, Failure> {
    let key = snapshot_key(args)?;
    let (start, mem, mut vcpus, timeout, syncs) = match (&key, args.restore.is_empty()) {
        (Some(key), _) if args.incoming.is_some() => {
            let incoming = crate::migrate::accept(args, key)?;
            let timeout = args.timeout.unwrap_or(DEFAULT_TIMEOUT);
            let mem = crate::migrate::ram_size(&incoming).or_else(|e| fail(BAD_INPUT, e))?;
            (Start::Incoming(incoming), mem, 0, timeout, args.syncs.clone())
        }
        (Some(key), false) => {
            let chain =
                crate::snapshot::open_chain(&args.restore, key).or_else(|e| fail(BAD_INPUT, e))?;
            let last = chain.last().expect("clap: --restore has a value");
            let state = gmem_runner::VmState::decode(last.vmm_state())
                .or_else(|e| fail(BAD_INPUT, format!("{}: {e}", args.restore[0].display())))?;
            if args.mem.is_some_and(|m| m != state.ram_size()) {
                return fail(
                    BAD_INPUT,
                    format!(
                        "the snapshot is of a guest with --mem {}M, not {}M",
                        state.ram_size() >> 20,
                        args.mem.unwrap_or(0) >> 20
                    ),
                );
            }
            if args.vcpus.is_some_and(|v| v != state.vcpus()) {
                return fail(
                    BAD_INPUT,
                    format!(
                        "the snapshot is of a guest with --vcpus {}, not {}",
                        state.vcpus(),
                        args.vcpus.unwrap_or(0)
                    ),
                );
            }
            if args.backend == Backend::Native {
                return fail(BAD_INPUT, "snapshots need the user-space backend");
            }
            let timeout = args.timeout.unwrap_or(DEFAULT_TIMEOUT);
            (Start::Restore(chain), state.ram_size(), state.vcpus(), timeout, args.syncs.clone())
        }
        _ => {
            let mem = args.mem.unwrap_or(DEFAULT_MEM);
            let guest = guest_image(args.guest.as_deref(), mem).or_else(|e| fail(BAD_INPUT, e))?;
            let needs = guest.built_in.map(gmem_guest::needs).unwrap_or(gmem_guest::needs(""));
            let (vcpus, timeout) = match guest.built_in {
                Some(name) => check_needs(args, name, &needs).or_else(|e| fail(BAD_INPUT, e))?,
                None => (args.vcpus.unwrap_or(1), args.timeout.unwrap_or(DEFAULT_TIMEOUT)),
            };
            if let Err(e) = boot::check_machine(mem, vcpus) {
                return fail(BAD_INPUT, e);
            }
            let image = GuestImage::parse(&guest.bytes, mem)
                .and_then(|image| boot::check_layout(&image, mem, vcpus).map(|()| image))
                .or_else(|e| fail(BAD_INPUT, e))?;
            (Start::Boot(image), mem, vcpus, timeout, syncs_for(args, &needs, mem))
        }
    };
    check_syncs(&syncs, mem).or_else(|e| fail(BAD_INPUT, e))?;
    let save = match &args.save_at {
        Some((stage, path)) => {
            crate::snapshot::check_save_path(path).or_else(|e| fail(BAD_INPUT, e))?;
            Some(Save { stage: *stage, path: path.clone(), diff: args.save_diff.is_some() })
        }
        None => None,
    };
    if let (Some(base), Some(key), Start::Restore(chain)) = (&args.save_diff, &key, &start) {
        let base_id = crate::snapshot::open_chain(std::slice::from_ref(base), key)
            .or_else(|e| fail(BAD_INPUT, format!("--save-diff: {e}")))?[0]
            .id();
        let restored = chain.last().expect("a chain").id();
        if base_id != restored {
            return fail(BAD_INPUT, format!(
                "--save-diff {}: snapshot {base_id} is not the one this VM is restored from ({restored})",
                base.display()
            ));
        }
    }
    let huge = args.huge.huge_pages.as_ref();
    let (backend, reason) = match (huge, args.backend) {
        (Some(_), Backend::Native) => {
            return fail(BAD_INPUT, "--huge-pages needs the user-space backend".to_string())
        }
        // Only gmem's backend has huge pages.
        (Some(huge), _) => ("userspace", format!("{huge}")),
        (None, asked) => choose_backend(asked).or_else(|e| fail(BAD_INPUT, e))?,
    };
    if (save.is_some() || key.is_some()) && backend == "native" {
        return fail(
            BAD_INPUT,
            "snapshots and migration need the user-space backend (--backend userspace)",
        );
    }
    if args.hypercall_exits {
        match gmem_runner::probe_hypercall_exits() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return fail(BAD_INPUT, format!("--hypercall-exits: {why}")),
            Err(e) => return fail(BAD_INPUT, format!("--hypercall-exits: probing failed: {e}")),
        }
    }
    match (args.backend, huge) {
        (Backend::Auto, None) => {
            eprintln!("gmem run: backend {backend} (auto: `gmem probe` says why)")
        }
        _ => eprintln!("gmem run: backend {backend} ({reason})"),
    }
    warn_if_too_big(mem);
    // A VM this host cannot create is a backend it cannot provide (no
    // /dev/kvm, no userfaultfd permission): the same status as `auto`.
    let vm = if backend == "native" {
        Vm::with_native_ram(mem)
    } else {
        Vm::with_fault_around(args.fault_around).and_then(|vm| vm.add_ram_on(mem, huge).map(|_| vm))
    };
    let vm = vm.or_else(|e| fail(BAD_INPUT, format!("cannot create the VM: {e}")))?;
    if let Some((path, size)) = &args.disk {
        vm.attach_disk(path, *size)
            .or_else(|e| fail(BAD_INPUT, format!("disk {}: {e}", path.display())))?;
    }
    let mut prefetch = None;
    let image = match start {
        Start::Boot(image) => {
            if let Err(e) = vm.load(&image, mem, vcpus) {
                return fail(VM_ERROR, format!("cannot load the guest: {e}"));
            }
            Some(image)
        }
        Start::Restore(chain) => {
            let mode = match args.restore_eager {
                true => gmem_kvm::RestoreMode::Eager,
                false => gmem_kvm::RestoreMode::Lazy,
            };
            // Nothing runs on a snapshot that fails its checks.
            vm.restore_snapshot(chain, mode, save.is_some())
                .or_else(|e| fail(BAD_INPUT, format!("cannot restore: {e}")))?;
            if args.prefetch {
                prefetch = Some(vm.start_prefetch().or_else(|e| fail(VM_ERROR, e))?);
            }
            None
        }
        Start::Incoming(incoming) => {
            // Nothing runs on a stream that fails its checks.
            vcpus = vm.receive_migration(incoming).or_else(|e| {
                fail(BAD_INPUT, format!("the migration failed before the switch: {e}"))
            })?;
            eprintln!("gmem run: migration received; the guest runs here ({vcpus} vCPUs)");
            None
        }
    };

    let records = Mutex::new(Vec::new());
    let outgoing = crate::migrate::Outgoing::new(args);
    // Armed until the stage is reached: after a failed save the guest goes
    // on past it.
    let pause_armed = std::sync::atomic::AtomicBool::new(save.is_some());
    let on_sync = |vm: &Vm, stage: u64| {
        for sync in syncs.iter().filter(|s| s.stage == stage) {
            let record = run_action(vm, sync);
            if !args.json {
                let result = match (&record.denied, &record.data) {
                    (Some(why), _) => format!("denied: {why}"),
                    (None, Some(data)) => match text(data) {
                        Some(text) => format!("ok: {text:?} ({} bytes)", data.len()),
                        None => format!("ok: {}", hex(data)),
                    },
                    (None, None) => "ok".into(),
                };
                eprintln!(
                    "gmem run: sync {stage}: {} {:#x}+{:#x}: {result}",
                    record.action, record.gpa, record.len
                );
            }
            records.lock().unwrap_or_else(|p| p.into_inner()).push(record);
        }
        if save.as_ref().is_some_and(|s| s.stage == stage) && pause_armed.swap(false, SeqCst) {
            vm.pause();
        }
        if args.migrate_at == Some(stage) {
            outgoing.start_and_wait(vm);
        }
    };
    let config = RunConfig {
        timeout: (timeout > 0.0).then(|| Duration::from_secs_f64(timeout)),
        echo_console: true,
        hypercall_exits: args.hypercall_exits,
        ..RunConfig::new(vcpus)
    };
    let (ran, sent) = outgoing.run(&vm, key.as_ref(), || match &image {
        Some(image) => vm.run(image, mem, &config, &on_sync),
        None => vm.resume(&config, &on_sync),
    });
    let mut report = match ran {
        Ok(report) => report,
        // Asked for what this host cannot do (hypercall exits): a bad argument.
        Err(e) if e.errno() == gmem_kvm::Errno::OPNOTSUPP => return fail(BAD_INPUT, e),
        Err(e) => return fail(VM_ERROR, format!("cannot run the VM: {e}")),
    };
    let mut saved = None;
    let mut save_error = None;
    let mut migration = None;
    match (&report.outcome, sent) {
        (_, None) if args.migrate_to.is_some() => {
            let message = "the run ended before the migration started".to_string();
            eprintln!("gmem run: {message}");
            save_error = Some(message);
        }
        (_, None) => {}
        (Outcome::Paused, Some(Ok(info))) => {
            eprintln!(
                "gmem run: migrated to {}: {} pages ({} pre-copy rounds), {} bytes; paused {:.1} ms of {:.1} ms",
                args.migrate_to.as_ref().map(|a| a.to_string()).unwrap_or_default(),
                info.pages(),
                info.rounds,
                info.bytes,
                info.downtime.as_secs_f64() * 1e3,
                info.total.as_secs_f64() * 1e3
            );
            migration = Some(crate::migrate::describe(&info));
        }
        (_, Some(Ok(_))) => unreachable!("a migration ends with the run paused"),
        (_, Some(Err(e))) if e.switched => {
            // The destination runs the VM: it is no longer here to resume.
            return fail(VM_ERROR, format!("the migration failed after the switch: {e}"));
        }
        (outcome, Some(Err(e))) => {
            eprintln!("gmem run: the migration failed: {e}; the guest goes on here");
            save_error = Some(format!("the migration failed: {e}"));
            if *outcome == Outcome::Paused {
                resume_here(&vm, &config, &on_sync, &mut report)?;
            }
        }
    }
    if let (Outcome::Paused, Some(save), Some(key), None) =
        (&report.outcome, &save, &key, &migration)
    {
        drop(prefetch.take());
        match crate::snapshot::save(&vm, &save.path, key, save.diff) {
            Ok(info) => {
                eprintln!(
                    "gmem run: sync {}: saved {} {} ({} pages, {} bytes)",
                    save.stage,
                    if save.diff { "diff snapshot" } else { "snapshot" },
                    save.path.display(),
                    info.pages,
                    info.bytes
                );
                saved = Some(json!({
                    "path": save.path, "stage": save.stage, "id": info.id.to_string(),
                    "base": info.base.map(|b| b.to_string()), "pages": info.pages,
                    "bytes": info.bytes,
                }));
            }
            Err(e) => {
                // The VM is not lost: it goes on from where it paused.
                eprintln!("gmem run: the snapshot could not be saved: {e}; the guest goes on");
                save_error = Some(format!("the snapshot could not be saved: {e}"));
                resume_here(&vm, &config, &on_sync, &mut report)?;
            }
        }
    }
    drop(prefetch);
    if let (Some(save), true) = (&save, pause_armed.load(SeqCst)) {
        let message = format!(
            "the run ended before sync stage {}: no snapshot was saved to {}",
            save.stage,
            save.path.display()
        );
        eprintln!("gmem run: {message}");
        save_error = Some(message);
    }

    let stats = vm.stats();
    let (mut status, reason, exit_code, mut error) = match &report.outcome {
        Outcome::Exit(code) => ((code & 0xff) as u8, "exit", Some(*code), None),
        Outcome::Timeout => (TIMEOUT, "timeout", None, None),
        Outcome::Error(message) => (VM_ERROR, "error", None, Some(message.clone())),
        Outcome::Paused if migration.is_some() => (0, "migrated", None, None),
        Outcome::Paused => (0, "saved", None, None),
    };
    if save_error.is_some() {
        let failed = if args.migrate_to.is_some() { MIGRATE_FAILED } else { SAVE_FAILED };
        (status, error) = (failed, save_error);
    }
    if let Some(pages) = vm.take_incoming_pages() {
        // The source waits for the pages the guest never touched to arrive.
        if let Err(e) = pages.wait() {
            eprintln!("gmem run: the migration's last pages did not all arrive: {e}");
        }
    }
    let records = records.into_inner().unwrap_or_else(|p| p.into_inner());
    if args.json {
        let out = report_json(Report {
            exit_code,
            reason,
            error: error.as_deref(),
            backend: Some(backend),
            console: &report.console,
            records: &records,
            stats: &stats,
            snapshot: saved,
            migration: migration.clone(),
        });
        println!("{out}");
    }
    match &report.outcome {
        Outcome::Exit(code) => eprintln!(
            "gmem run: guest exited with {code}; {} pages served in {} faults, {} invalidations",
            stats.memory.pages_served, stats.memory.faults, stats.memory.invalidations
        ),
        Outcome::Timeout => eprintln!("gmem run: timed out after {timeout}s"),
        Outcome::Error(message) => eprintln!("gmem run: VM error: {message}"),
        Outcome::Paused => {}
    }
    Ok(status)
}

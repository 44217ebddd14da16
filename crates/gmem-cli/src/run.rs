//! `gmem run`: boot a guest on private memory and report per GUEST_ABI v1.

use std::sync::Mutex;
use std::time::Duration;

use gmem_kvm::probe;
use gmem_runner::{Gpa, GuestImage, Outcome, RunConfig, Vm};
use serde_json::json;

use crate::args::{Action, Backend, RunArgs, SyncSpec};

/// Exit status for bad arguments or a bad image.
const BAD_INPUT: u8 = 2;
/// Exit status for a VM error.
const VM_ERROR: u8 = 3;
/// Exit status on timeout.
const TIMEOUT: u8 = 124;

/// What one sync action did.
struct SyncRecord {
    stage: u64,
    action: &'static str,
    gpa: u64,
    len: u64,
    denied: Option<String>,
    data: Option<Vec<u8>>,
}

fn fail(status: u8, message: impl std::fmt::Display) -> u8 {
    eprintln!("gmem run: {message}");
    status
}

fn guest_bytes(guest: Option<&str>) -> Result<Vec<u8>, String> {
    let Some(guest) = guest else { return Ok(gmem_guest::demo().to_vec()) };
    match std::fs::read(guest) {
        Ok(bytes) => Ok(bytes),
        Err(e) => gmem_guest::guest(guest)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("cannot read guest image '{guest}': {e}")),
    }
}

/// Picks the backend, or says why the one asked for cannot be had.
fn choose_backend(asked: Backend) -> Result<(&'static str, String), String> {
    if asked == Backend::Userspace {
        return Ok(("userspace", "asked for".into()));
    }
    let host = probe::host().map_err(|e| format!("probing the host failed: {e}"))?;
    match asked {
        Backend::Native => Err(format!(
            "--backend native is not available here: {}",
            host.native.usable().err().unwrap_or_default()
        )),
        _ => host.auto_backend().map(|choice| (choice.backend, choice.reason)),
    }
}

fn check_syncs(syncs: &[SyncSpec], ram: u64) -> Result<(), String> {
    for sync in syncs {
        let (gpa, len) = sync.action.range();
        if gpa.checked_add(len).is_none_or(|end| end > ram) {
            return Err(format!(
                "sync {}: {gpa:#x}+{len:#x} lies outside guest RAM ({ram:#x} bytes)",
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

/// The sync actions to run: the user's, or for the built-in demo guest
/// without any, a read of the message it shares.
fn syncs_for(args: &RunArgs) -> Vec<SyncSpec> {
    if args.guest.is_some() || !args.syncs.is_empty() {
        return args.syncs.clone();
    }
    let (gpa, len, stage) = gmem_guest::DEMO_MESSAGE;
    vec![SyncSpec { stage, action: Action::Read { gpa, len } }]
}

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

/// Runs `gmem run`; returns the process exit status.
pub(crate) fn run(args: &RunArgs) -> u8 {
    let bytes = match guest_bytes(args.guest.as_deref()) {
        Ok(bytes) => bytes,
        Err(e) => return fail(BAD_INPUT, e),
    };
    if let Err(e) = gmem_runner::boot::check_machine(args.mem, args.vcpus) {
        return fail(BAD_INPUT, e);
    }
    let image = match GuestImage::parse(&bytes, args.mem) {
        Ok(image) => image,
        Err(e) => return fail(BAD_INPUT, e),
    };
    let syncs = syncs_for(args);
    if let Err(e) = check_syncs(&syncs, args.mem) {
        return fail(BAD_INPUT, e);
    }
    let (backend, reason) = match choose_backend(args.backend) {
        Ok(choice) => choice,
        Err(e) => return fail(BAD_INPUT, e),
    };
    eprintln!("gmem run: backend {backend} ({reason})");
    let vm = match Vm::with_fault_around(args.fault_around) {
        Ok(vm) => vm,
        Err(e) => return fail(VM_ERROR, format!("cannot create the VM: {e}")),
    };
    if let Err(e) = vm.add_ram(args.mem).and_then(|_| vm.load(&image, args.mem, args.vcpus)) {
        return fail(VM_ERROR, format!("cannot load the guest: {e}"));
    }

    let records = Mutex::new(Vec::new());
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
    };
    let timeout = (args.timeout > 0.0).then(|| Duration::from_secs_f64(args.timeout));
    let config = RunConfig {
        timeout,
        echo_console: true,
        hypercall_exits: args.hypercall_exits,
        ..RunConfig::new(args.vcpus)
    };
    let report = match vm.run(&image, args.mem, &config, &on_sync) {
        Ok(report) => report,
        // Asked for what this host cannot do (hypercall exits): a bad argument.
        Err(e) if e.errno() == gmem_kvm::Errno::OPNOTSUPP => return fail(BAD_INPUT, e),
        Err(e) => return fail(VM_ERROR, format!("cannot run the VM: {e}")),
    };

    let stats = vm.stats();
    let (status, reason, exit_code, error) = match &report.outcome {
        Outcome::Exit(code) => ((code & 0xff) as u8, "exit", Some(*code), None),
        Outcome::Timeout => (TIMEOUT, "timeout", None, None),
        Outcome::Error(message) => (VM_ERROR, "error", None, Some(message.clone())),
    };
    let records = records.into_inner().unwrap_or_else(|p| p.into_inner());
    if args.json {
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
        let out = json!({
            "exit_code": exit_code,
            "reason": reason,
            "error": error,
            "backend": backend,
            "console": String::from_utf8_lossy(&report.console),
            "syncs": syncs,
            "stats": {
                "pages_served": stats.memory.pages_served,
                "faults": stats.memory.faults,
                "invalidations": stats.memory.invalidations,
                "conversions": stats.memory.conversions,
                "conversion_requests": stats.conversion_requests,
                "converted_pages": stats.memory.converted_pages,
                "host_denials": stats.memory.host_denials,
            },
        });
        println!("{out}");
    }
    match &report.outcome {
        Outcome::Exit(code) => eprintln!(
            "gmem run: guest exited with {code}; {} pages served in {} faults, {} invalidations",
            stats.memory.pages_served, stats.memory.faults, stats.memory.invalidations
        ),
        Outcome::Timeout => eprintln!("gmem run: timed out after {}s", args.timeout),
        Outcome::Error(message) => eprintln!("gmem run: VM error: {message}"),
    }
    status
}

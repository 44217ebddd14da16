//! GUEST_ABI guest scenarios run on both backends, for `gmem check`: the
//! same guest, vCPUs, RAM and host actions at sync points, on gmem's
//! user-space backend and on the native backend. Their outcomes and
//! what each host action saw must match.

use std::sync::Mutex;
use std::time::Duration;

use gmem::FileOffset;
use gmem_kvm::Result;

use crate::{Gpa, GuestImage, Outcome, RunConfig, Vm};

/// A host action at a sync point.
#[derive(Debug, Clone, Copy)]
pub enum HostAction {
    /// Read `len` bytes at a GPA.
    Read(u64, usize),
    /// Write bytes at a GPA.
    Write(u64, &'static [u8]),
    /// Punch `len` bytes at a GPA.
    Punch(u64, u64),
}

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The built-in guest.
    pub guest: &'static str,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in bytes.
    pub ram: u64,
    /// Host actions, by sync stage.
    pub syncs: &'static [(u64, HostAction)],
    /// The exit code the guest must give.
    pub exit: u32,
    /// On the user-space backend, allocate the whole file before the run
    /// (fallocate), so that conversions discard allocated pages.
    pub allocate_first: bool,
}

/// The convert guest's host actions: a read and a write of the page it
/// shares at stage 1, a read of its private neighbour, and a read of the
/// page once it is private again.
const CONVERT_SYNCS: &[(u64, HostAction)] = &[
    (1, HostAction::Read(0x60_0000, 11)),
    (1, HostAction::Write(0x60_0040, b"host->gu")),
    (1, HostAction::Read(0x60_1000, 8)),
    (2, HostAction::Read(0x60_0000, 8)),
];

/// The scenarios `gmem check` runs on both backends.
pub fn scenarios() -> Vec<Scenario> {
    const MIB: u64 = 1 << 20;
    let plain = |guest, vcpus, ram, exit| Scenario {
        guest,
        vcpus,
        ram,
        syncs: &[],
        exit,
        allocate_first: false,
    };
    vec![
        Scenario {
            syncs: &[(1, HostAction::Read(0x80_0000, 64))],
            ..plain("demo", 2, 64 * MIB, 0)
        },
        Scenario { syncs: CONVERT_SYNCS, ..plain("convert", 1, 64 * MIB, 0) },
        Scenario { syncs: CONVERT_SYNCS, allocate_first: true, ..plain("convert", 1, 64 * MIB, 0) },
        Scenario {
            syncs: &[(1, HostAction::Punch(0x60_0000, 0x3000))],
            ..plain("punch", 1, 64 * MIB, 3)
        },
        plain("convsmp", 2, 64 * MIB, 0),
        plain("convstorm", 4, 64 * MIB, 0),
        plain("smp", 4, 64 * MIB, 0),
        plain("memmap", 2, 3 * 1024 * MIB + 64 * MIB, 0),
        plain("hugeconv", 1, 64 * MIB, 0),
    ]
}

/// What a run of a scenario gave: its outcome, and per host action "ok"
/// with the bytes read, or the errno of a refusal.
pub type ScenarioResult = (Outcome, Vec<String>);

/// Runs `scenario` on the native backend (`native`) or on gmem's, there
/// on 2 MiB pages where `huge` says.
pub fn run(
    scenario: &Scenario,
    native: bool,
    huge: Option<&gmem::HugePages>,
) -> Result<ScenarioResult> {
    let vm = if native {
        Vm::with_native_ram(scenario.ram)?
    } else {
        let vm = Vm::new()?;
        let files = vm.add_ram_on(scenario.ram, huge)?;
        if scenario.allocate_first {
            for file in files {
                file.fallocate(gmem::Fallocate::AllocateKeepSize, FileOffset(0), file.size())?;
            }
        }
        vm
    };
    let guest = gmem_guest_image(scenario.guest)?;
    let image = GuestImage::parse(guest, scenario.ram)?;
    vm.load(&image, scenario.ram, scenario.vcpus)?;
    let seen = Mutex::new(Vec::new());
    let on_sync = |vm: &Vm, stage: u64| {
        for (_, action) in scenario.syncs.iter().filter(|(s, _)| *s == stage) {
            let result = match *action {
                HostAction::Read(gpa, len) => {
                    let mut buf = vec![0; len];
                    vm.read_guest(Gpa(gpa), &mut buf).map(|()| format!("ok {buf:02x?}"))
                }
                HostAction::Write(gpa, bytes) => {
                    vm.write_guest(Gpa(gpa), bytes).map(|()| "ok".into())
                }
                HostAction::Punch(gpa, len) => vm.punch(Gpa(gpa), len).map(|()| "ok".into()),
            };
            let line = result.unwrap_or_else(|e| format!("refused: {}", e.errno()));
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    };
    let config =
        RunConfig { timeout: Some(Duration::from_secs(60)), ..RunConfig::new(scenario.vcpus) };
    let report = vm.run(&image, scenario.ram, &config, &on_sync)?;
    Ok((report.outcome, seen.into_inner().unwrap_or_else(|p| p.into_inner())))
}

/// gmem's answer to a memslot deleted while a vCPU uses it: the `punch`
/// guest runs with RAM in two memslots of one file ([0, 4 MiB) and the
/// rest, which holds its pages at 6 MiB and its stack); at its sync point
/// the host deletes the second. The vCPU's next access there must stop the
/// VM with an error that names a GPA in the deleted range, not hang.
pub fn memslot_deleted_under_a_vcpu() -> Result<Outcome> {
    const RAM: u64 = 64 << 20;
    const SPLIT: u64 = 4 << 20;
    let vm = Vm::new()?;
    let file = std::sync::Arc::new(gmem::PrivateMemFile::new_guest("split")?);
    file.set_len(RAM)?;
    vm.add_private_memory(Gpa(0), &file, gmem::FileOffset(0), SPLIT)?;
    let second = vm.add_private_memory(Gpa(SPLIT), &file, gmem::FileOffset(SPLIT), RAM - SPLIT)?;
    let image = GuestImage::parse(gmem_guest_image("punch")?, RAM)?;
    vm.load(&image, RAM, 1)?;
    let removed = Mutex::new(None);
    let on_sync = |vm: &Vm, _: u64| {
        *removed.lock().unwrap_or_else(|p| p.into_inner()) = Some(vm.remove_memory(second));
    };
    let config = RunConfig { timeout: Some(Duration::from_secs(60)), ..RunConfig::new(1) };
    let report = vm.run(&image, RAM, &config, &on_sync)?;
    removed.into_inner().unwrap_or_else(|p| p.into_inner()).transpose()?;
    Ok(report.outcome)
}

/// The built-in guest `name`, embedded by gmem-guest at build time.
fn gmem_guest_image(name: &str) -> Result<&'static [u8]> {
    gmem_guest::guest(name)
        .ok_or_else(|| gmem_kvm::Error::InvalidArgument(format!("no built-in guest {name}")))
}

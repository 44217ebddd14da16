//! GUEST_ABI guest scenarios run on both backends, for `gmem check`: the
//! same guest, vCPUs, RAM and host actions at sync points, on gmem's
//! user-space backend and on the native backend. Their outcomes and
//! what each host action saw must match.

use std::sync::Mutex;
use std::time::Duration;

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
}

/// The scenarios `gmem check` runs on both backends.
pub fn scenarios() -> Vec<Scenario> {
    const MIB: u64 = 1 << 20;
    vec![
        Scenario {
            guest: "demo",
            vcpus: 2,
            ram: 64 * MIB,
            syncs: &[(1, HostAction::Read(0x80_0000, 64))],
            exit: 0,
        },
        Scenario {
            guest: "convert",
            vcpus: 1,
            ram: 64 * MIB,
            syncs: &[
                (1, HostAction::Read(0x60_0000, 11)),
                (1, HostAction::Write(0x60_0040, b"host->gu")),
                (1, HostAction::Read(0x60_1000, 8)),
                (2, HostAction::Read(0x60_0000, 8)),
            ],
            exit: 0,
        },
        Scenario {
            guest: "punch",
            vcpus: 1,
            ram: 64 * MIB,
            syncs: &[(1, HostAction::Punch(0x60_0000, 0x3000))],
            exit: 3,
        },
        Scenario { guest: "convsmp", vcpus: 2, ram: 64 * MIB, syncs: &[], exit: 0 },
        Scenario { guest: "convstorm", vcpus: 4, ram: 64 * MIB, syncs: &[], exit: 0 },
        Scenario { guest: "smp", vcpus: 4, ram: 64 * MIB, syncs: &[], exit: 0 },
        Scenario { guest: "memmap", vcpus: 2, ram: 3 * 1024 * MIB + 64 * MIB, syncs: &[], exit: 0 },
    ]
}

/// What a run of a scenario gave: its outcome, and per host action "ok"
/// with the bytes read, or the errno of a refusal.
pub type ScenarioResult = (Outcome, Vec<String>);

/// Runs `scenario` on the native backend (`native`) or on gmem's.
pub fn run(scenario: &Scenario, native: bool) -> Result<ScenarioResult> {
    let vm =
        if native { Vm::with_native_ram(scenario.ram)? } else { Vm::with_ram(scenario.ram)?.0 };
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

/// The built-in guest `name`, embedded by gmem-guest at build time.
fn gmem_guest_image(name: &str) -> Result<&'static [u8]> {
    gmem_guest::guest(name)
        .ok_or_else(|| gmem_kvm::Error::InvalidArgument(format!("no built-in guest {name}")))
}

//! Benchmark figures, measured as ratios against a baseline in the same run
//! (these machines are noisy): never as timed tests.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::{Gpa, GuestImage, Outcome, RunConfig, Vm};

/// Guest memory below the touched range (image, VMM region).
const TOUCH_BASE: u64 = 4 << 20;

/// Where the `touch` guest's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// gmem's user-space backend, serving this many pages per fault.
    Gmem {
        /// Fault-around in pages.
        fault_around: u64,
    },
    /// Plain anonymous KVM memory (the baseline).
    Anonymous,
}

/// Time for the `touch` guest to first-touch `mib` MiB on `backing`,
/// guest run only (VM set-up and image load excluded).
pub fn first_touch(touch_guest: &[u8], mib: u64, backing: Backing) -> Result<Duration> {
    let ram = TOUCH_BASE + (mib << 20) + (2 << 20);
    let vm = match backing {
        Backing::Gmem { fault_around } => {
            let vm = Vm::with_fault_around(fault_around)?;
            vm.add_ram(ram)?;
            vm
        }
        Backing::Anonymous => {
            let vm = Vm::new()?;
            vm.add_anonymous_memory(Gpa(0), ram)?;
            vm
        }
    };
    Ok(run_to_success(&vm, touch_guest, ram)?.1)
}

/// Loads `guest` into `vm` (`ram` bytes of RAM at GPA 0) and runs it on
/// one vCPU; returns its console output and how long the run took. An
/// error unless the guest exits 0.
fn run_to_success(vm: &Vm, guest: &[u8], ram: u64) -> Result<(String, Duration)> {
    let image = GuestImage::parse(guest, ram)?;
    vm.load(&image, ram, 1)?;
    let config = RunConfig { timeout: Some(Duration::from_secs(600)), ..RunConfig::new(1) };
    let start = Instant::now();
    let report = vm.run(&image, ram, &config, &|_, _| {})?;
    let elapsed = start.elapsed();
    let console = String::from_utf8_lossy(&report.console).replace('\0', "");
    match report.outcome {
        Outcome::Exit(0) => Ok((console, elapsed)),
        other => Err(Error::Unsupported(format!("the guest did not exit 0: {other:?}: {console}"))),
    }
}

/// Round trips of the `convbench` guest (request -> guest resumed), per
/// request, timed by the guest's TSC around the `out` instruction.
#[derive(Clone, Copy, Debug)]
pub struct ConversionTimes {
    /// A bare port-I/O exit (console byte): the baseline.
    pub bare_exit: Duration,
    /// Converting one 4 KiB page (alternately to shared and to private).
    pub convert_4k: Duration,
    /// Converting a 2 MiB range.
    pub convert_2m: Duration,
}

/// Runs the `convbench` guest once and returns its per-request times.
pub fn conversions(convbench_guest: &[u8]) -> Result<ConversionTimes> {
    const RAM: u64 = 32 << 20;
    let (vm, _file) = Vm::with_ram(RAM)?;
    let (console, _) = run_to_success(&vm, convbench_guest, RAM)?;
    let per_request = |key: &str| -> Option<f64> {
        let field = console.split_whitespace().find_map(|w| w.strip_prefix(key))?;
        let (cycles, count) = field.split_once('/')?;
        Some(cycles.parse::<f64>().ok()? / count.parse::<f64>().ok()?)
    };
    let ns_per_cycle = 1.0 / tsc_cycles_per_ns();
    let time = |key: &str| {
        per_request(key)
            .map(|cycles| Duration::from_secs_f64(cycles * ns_per_cycle * 1e-9))
            .ok_or_else(|| Error::Unsupported(format!("no {key} in the guest's report: {console}")))
    };
    Ok(ConversionTimes {
        bare_exit: time("bare=")?,
        convert_4k: time("c4k=")?,
        convert_2m: time("c2m=")?,
    })
}

/// The host's TSC rate, against the monotonic clock over 50 ms. Guests
/// read the same counter (KVM does not scale it here).
fn tsc_cycles_per_ns() -> f64 {
    let tsc = || {
        // SAFETY: rdtsc only reads the time-stamp counter; every x86-64
        // CPU has it.
        unsafe { std::arch::x86_64::_rdtsc() }
    };
    let (start, cycles) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(50));
    let cycles = tsc() - cycles;
    cycles as f64 / start.elapsed().as_nanos() as f64
}

/// Per-page metadata of a sparse guest: what gmem keeps per 4 KiB page
/// of RAM (states and mapping bitmaps) and the resident memory the
/// process grew by when the VM and its RAM were set up.
#[derive(Clone, Copy, Debug)]
pub struct Metadata {
    /// Pages of guest RAM.
    pub pages: u64,
    /// Bytes of per-page metadata, from the data structures.
    pub bytes_per_page: f64,
    /// Growth of the process's resident memory, per page of RAM.
    pub resident_bytes_per_page: f64,
}

/// Sets up a VM with `ram` bytes of (untouched) RAM and measures its
/// per-page metadata.
pub fn metadata(ram: u64) -> Result<Metadata> {
    let before = resident_bytes()?;
    let (vm, _file) = Vm::with_ram(ram)?;
    let after = resident_bytes()?;
    let stats = vm.stats().memory;
    Ok(Metadata {
        pages: stats.pages,
        bytes_per_page: stats.metadata_bytes as f64 / stats.pages as f64,
        resident_bytes_per_page: after.saturating_sub(before) as f64 / stats.pages as f64,
    })
}

/// The process's resident memory (`VmRSS`).
fn resident_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(Error::io("read status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| Error::Unsupported("no VmRSS in /proc/self/status".into()))
}

/// The median of `samples` (which must not be empty).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

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
    let image = GuestImage::parse(touch_guest, ram)?;
    vm.load(&image, ram, 1)?;
    let config =
        RunConfig { vcpus: 1, timeout: Some(Duration::from_secs(600)), echo_console: false };
    let start = Instant::now();
    let report = vm.run(&image, ram, &config, &|_, _| {})?;
    let elapsed = start.elapsed();
    match report.outcome {
        Outcome::Exit(0) => Ok(elapsed),
        other => Err(Error::Unsupported(format!("the touch guest did not exit 0: {other:?}"))),
    }
}

/// The median of `samples` (which must not be empty).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

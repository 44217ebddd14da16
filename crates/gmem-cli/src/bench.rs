//! `gmem bench`: side-by-side figures with ratios against a baseline
//! measured in the same run.

use std::time::Duration;

use gmem_kvm::bench::{first_touch, median, Backing};
use gmem_kvm::memory::DEFAULT_FAULT_AROUND_PAGES;
use serde_json::json;

/// `gmem bench` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// MiB of guest memory each first-touch run touches.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16384))]
    mib: u64,
    /// Repetitions of each measurement (interleaved; the median counts).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    reps: u64,
    /// A short run (16 MiB, 3 repetitions), well under a minute.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

struct Figure {
    name: String,
    value: f64,
    baseline: f64,
    target: f64,
}

/// Runs `gmem bench`; returns the process exit status.
pub(crate) fn bench(args: &BenchArgs) -> u8 {
    let (mib, reps) = if args.quick { (16, 3) } else { (args.mib, args.reps) };
    let touch = gmem_guest::guest("touch").expect("the touch guest is built in");
    let fault_arounds = [1, 64, DEFAULT_FAULT_AROUND_PAGES];
    let mut backings = vec![Backing::Anonymous];
    backings.extend(fault_arounds.iter().map(|&fault_around| Backing::Gmem { fault_around }));
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); backings.len()];
    for rep in 1..=reps {
        eprint!("\rgmem bench: first touch of {mib} MiB, round {rep}/{reps}   ");
        for (backing, samples) in backings.iter().zip(&mut samples) {
            match first_touch(touch, mib, *backing) {
                Ok(time) => samples.push(time),
                Err(e) => {
                    eprintln!("\ngmem bench: {backing:?}: {e}");
                    return 1;
                }
            }
        }
    }
    eprintln!();
    let rate = |samples: &mut Vec<Duration>| mib as f64 / median(samples).as_secs_f64();
    let baseline = rate(&mut samples[0]);
    let figures: Vec<Figure> = fault_arounds
        .iter()
        .zip(samples.iter_mut().skip(1))
        .map(|(&pages, samples)| Figure {
            name: if pages == DEFAULT_FAULT_AROUND_PAGES {
                "first-touch".into()
            } else {
                format!("first-touch-fault-around-{pages}")
            },
            value: rate(samples),
            baseline,
            target: 1.0,
        })
        .collect();
    if args.json {
        let results: Vec<_> = figures
            .iter()
            .map(|f| {
                let ratio = f.value / f.baseline;
                json!({
                    "name": f.name, "value": f.value, "unit": "MiB/s", "baseline": f.baseline,
                    "ratio": ratio, "target": f.target, "met": ratio >= f.target,
                })
            })
            .collect();
        println!("{}", json!({ "results": results }));
    } else {
        println!(
            "{:34} {:>12} {:>14} {:>7} {:>7}",
            "figure", "gmem", "plain KVM", "ratio", "target"
        );
        for f in &figures {
            let ratio = f.value / f.baseline;
            let met = if ratio >= f.target { "met" } else { "not met" };
            println!(
                "{:34} {:>7.1} MiB/s {:>8.1} MiB/s {:>6.2}x {:>5.1}x {met}",
                f.name, f.value, f.baseline, ratio, f.target
            );
        }
        println!("({mib} MiB first-touched by a real guest, median of {reps} interleaved runs)");
    }
    0
}

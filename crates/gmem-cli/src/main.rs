//! `gmem`: run guests whose RAM is fd-based private memory.
//!
//! A thin layer over `gmem-kvm`: `probe` reports the host, `run` boots a
//! guest per GUEST_ABI v1 (exit statuses, `--json`), `check` runs the
//! conformance suite, `bench` measures against baselines.

mod args;
mod bench;
mod check;
mod plot;
mod probe;
mod run;
mod stress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// fd-based guest private memory for KVM.
#[derive(Parser, Debug)]
#[command(name = "gmem", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// What this host supports and which backend gmem will use.
    Probe(probe::ProbeArgs),
    /// Boot a guest program (GUEST_ABI v1) on private memory.
    Run(args::RunArgs),
    /// Measure gmem against plain KVM memory in one run (ratios).
    Bench(bench::BenchArgs),
    /// Conformance: the seed's flows, the kernel's guest_memfd checklist,
    /// and both backends side by side (exit status 1 if a check fails).
    Check(check::CheckArgs),
    /// Soak: a hostile guest and busy host threads, invariants checked
    /// the whole time (exit status 1 on any violation).
    Stress(stress::StressArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Probe(args) => ExitCode::from(probe::probe(&args)),
        Command::Run(args) => ExitCode::from(run::run(&args)),
        Command::Bench(args) => ExitCode::from(bench::bench(&args)),
        Command::Check(args) => ExitCode::from(check::check(&args)),
        Command::Stress(args) => ExitCode::from(stress::stress(&args)),
    }
}

//! `gmem`: run guests whose RAM is fd-based private memory.
//!
//! A thin layer over `gmem-kvm`: it parses arguments, picks a backend, runs
//! the guest and reports per GUEST_ABI v1 (exit statuses, `--json`).

mod args;
mod bench;
mod run;

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
    /// Boot a guest program (GUEST_ABI v1) on private memory.
    Run(args::RunArgs),
    /// Measure gmem against plain KVM memory in one run (ratios).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => ExitCode::from(run::run(&args)),
        Command::Bench(args) => ExitCode::from(bench::bench(&args)),
    }
}

//! `gmem`: run guests whose RAM is fd-based private memory.
//!
//! A thin layer over `gmem-kvm`: `probe` reports the host, `run` boots a
//! guest per GUEST_ABI 1.2 (exit statuses, `--json`), `check` runs the
//! conformance suite, `bench` measures against baselines.

mod args;
mod bench;
mod check;
mod migrate;
mod plot;
mod probe;
mod run;
mod snapshot;
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
    /// Boot a guest program (GUEST_ABI 1.2) on private memory.
    Run(Box<args::RunArgs>),
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

#[cfg(test)]
mod fuzz {
    //! A fuzzer of the argument parser (bounded, run in CI): random argument
    //! vectors built from the real options and hostile values never panic;
    //! clap answers with a parse or a usage error.

    use clap::Parser;
    use proptest::prelude::*;

    use super::Cli;

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                "run",
                "bench",
                "check",
                "probe",
                "stress",
                "--mem",
                "--vcpus",
                "--timeout",
                "--sync",
                "--guest",
                "--backend",
                "--fault-around",
                "--json",
                "--quick",
                "--mib",
                "--plot",
                "--duration",
                "--threads",
                "--check",
                "--hypercall-exits",
                "--migrate-to",
                "--migrate-at",
                "--migrate-mode",
                "--incoming",
                "tcp:127.0.0.1:99999",
                "unix:",
                "tcp::1",
                "hybrid",
                "auto",
                "native",
                "userspace",
                "demo",
                "64M",
                "1e20",
                "-1",
                "0x10",
                "0",
                "4G",
                "99999999999G",
                "1:write:0x800000:a\u{e9}b",
                "1:read:0:0xf00000000",
                "1:punch:0:4096",
                "1:write:0:+1",
                "NaN",
                "inf",
                "10s",
                "0ms",
                "25h",
                "\u{e9}",
                "",
            ])
            .prop_map(str::to_owned),
            "[ -~]{0,12}",
            ".{0,6}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arguments_never_panic(words in proptest::collection::vec(word(), 0..8)) {
            let argv = std::iter::once("gmem".to_owned()).chain(words);
            let _ = Cli::try_parse_from(argv);
        }
    }
}

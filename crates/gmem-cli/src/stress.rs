//! `gmem stress`: a hostile guest and busy host threads for a while, with
//! gmem's invariants checked the whole time (see `gmem_runner::stress`).

use std::time::Duration;

use gmem_runner::stress::{self, StressConfig};
use serde_json::json;

/// `gmem stress` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct StressArgs {
    /// How long to run: seconds, or with a unit (500ms, 10s, 2m); at most 24h.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Guest vCPUs, each converting and checking its own pages.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: u32,
    /// Host threads reading, writing, punching and converting meanwhile.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// Run on the native backend (the kernel's guest_memfd, where the
    /// kernel can) instead of gmem's user-space backend.
    #[arg(long)]
    native: bool,
    #[command(flatten)]
    huge: crate::args::HugePagesArg,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// `10`, `10s`, `500ms`, `2m`: at most a day.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("'{text}': a duration is a number with ms, s, m or h")),
    };
    match number.parse::<f64>().map(|n| n * scale) {
        Ok(seconds) if seconds > 0.0 && seconds <= 86400.0 => Ok(Duration::from_secs_f64(seconds)),
        _ => Err(format!("'{text}': a duration from 1ms to 24h")),
    }
}

/// Runs `gmem stress`; returns the exit status: 0 when every invariant
/// held, 1 on a violation, 2 for huge pages this host does not offer (as
/// for other bad arguments), 3 when the VM could not run.
pub(crate) fn stress(args: &StressArgs) -> u8 {
    let guest = gmem_guest::guest("stress").expect("the stress guest is built in");
    let config = StressConfig {
        duration: args.duration,
        vcpus: args.vcpus,
        host_threads: args.threads,
        native: args.native,
        huge: args.huge.huge_pages.clone(),
    };
    if let Some(huge) = &config.huge {
        // Bad arguments, as clap's: status 2.
        if args.native {
            eprintln!("gmem stress: --huge-pages needs the user-space backend");
            return 2;
        }
        if let Err(why) = huge.offered() {
            eprintln!("gmem stress: --huge-pages: {huge}: {why}");
            return 2;
        }
    }
    eprintln!(
        "gmem stress: {:.1} s, {} vCPU(s), {} host thread(s), {} backend{}",
        args.duration.as_secs_f64(),
        args.vcpus,
        args.threads,
        if args.native { "native" } else { "user-space" },
        config.huge.as_ref().map(|h| format!(", {h}")).unwrap_or_default()
    );
    let report = match stress::run(guest, &config) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("gmem stress: cannot run: {e}");
            return 3;
        }
    };
    let [ops, conversions, invalid, checks] = report.guest;
    if args.json {
        let out = json!({
            "duration_s": args.duration.as_secs_f64(),
            "vcpus": args.vcpus,
            "host_threads": args.threads,
            "guest": { "operations": ops, "conversions": conversions,
                       "invalid_refused": invalid, "checks": checks },
            "host": { "reads": report.host_reads, "view_reads": report.host_view_reads,
                      "writes": report.host_writes, "punches": report.host_punches,
                      "conversions": report.host_conversions,
                      "invalid_refused": report.host_invalid, "denials": report.denials },
            "collapses": report.collapses,
            "violations": report.violations,
        });
        println!("{out}");
    } else {
        println!(
            "guest: {ops} operations ({conversions} conversions, {invalid} invalid requests \
             refused, {checks} page checks)"
        );
        println!(
            "host:  {} reads ({} through vm-memory), {} writes, {} punches, {} conversions, \
             {} invalid requests refused; {} denials",
            report.host_reads,
            report.host_view_reads,
            report.host_writes,
            report.host_punches,
            report.host_conversions,
            report.host_invalid,
            report.denials
        );
        if config.huge.is_some() {
            println!("huge pages: {} split 2 MiB pages made huge again", report.collapses);
        }
        println!("violations: {}", report.violations.len());
        for violation in &report.violations {
            println!("  {violation}");
        }
    }
    u8::from(!report.violations.is_empty())
}

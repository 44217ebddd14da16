//! `gmem check`: the conformance suite, as a table or one JSON object.

use gmem_runner::check::{self, Status};
use gmem_runner::conformance::errno_name;
use serde_json::json;

/// `gmem check` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct CheckArgs {
    /// Print one JSON object on stdout:
    /// {"checks": [{"name", "backend", "status", "errno", "detail"}]}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    huge: crate::args::HugePagesArg,
}

/// Runs `gmem check`; exit status 0 only when no check fails.
pub(crate) fn check(args: &CheckArgs) -> u8 {
    let checks = check::run(args.huge.huge_pages.as_ref());
    if args.json {
        let rows: Vec<_> = checks
            .iter()
            .map(|c| {
                json!({
                    "name": c.name, "backend": c.backend.as_str(), "status": c.status.as_str(),
                    "errno": c.errno.map(|e| e.raw_os_error()), "detail": c.detail,
                })
            })
            .collect();
        println!("{}", json!({ "checks": rows }));
    } else {
        println!("{:11} {:9} {:46} {:11} detail", "status", "backend", "check", "errno");
        for c in &checks {
            let errno = c.errno.map_or_else(|| "-".into(), |e| errno_name(Some(e)));
            println!(
                "{:11} {:9} {:46} {:11} {}",
                c.status.as_str(),
                c.backend.as_str(),
                c.name,
                errno,
                c.detail
            );
        }
    }
    let count = |status| checks.iter().filter(|c| c.status == status).count();
    let failed = count(Status::Fail);
    eprintln!(
        "gmem check: {} passed, {failed} failed, {} unsupported",
        count(Status::Pass),
        count(Status::Unsupported)
    );
    u8::from(failed > 0)
}

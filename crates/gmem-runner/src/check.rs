//! `gmem check`: a conformance suite for any host. Three parts:
//!
//! - the seed's own flows on the user-space backend ([`gmem::seed`]);
//! - the kernel selftests' guest_memfd checklist on the kernel's
//!   guest_memfd ([`selftests`]), each row naming its source;
//! - the GUEST_ABI guests' scenarios on both backends ([`scenarios`]);
//! - the same operation sequences on both backends
//!   ([`conformance::compare`]), gmem's errno against the kernel's: where
//!   they differ, the row says whether it is deliberate, and why.

use rustix::io::Errno;

use crate::conformance::{self, errno_name, Comparison, Expect};
use crate::{scenarios, selftests, Outcome};
use gmem_kvm::native;

/// Which backend a check ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// gmem's user-space backend.
    Userspace,
    /// The kernel's guest_memfd.
    Native,
}

impl Backend {
    /// `"userspace"` or `"native"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Userspace => "userspace",
            Backend::Native => "native",
        }
    }
}

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// As expected.
    Pass,
    /// Not as expected: a bug in gmem or in the kernel.
    Fail,
    /// This host cannot run it; the detail says why.
    Unsupported,
}

impl Status {
    /// `"pass"`, `"fail"` or `"unsupported"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Unsupported => "unsupported",
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Where it ran.
    pub backend: Backend,
    /// How it went.
    pub status: Status,
    /// The errno seen; `None` for success or where none applies.
    pub errno: Option<Errno>,
    /// What was seen and expected, or why it could not run.
    pub detail: String,
}

/// Runs every check, the guests' scenarios on 2 MiB pages where `huge`
/// says (and then a check of the huge pages themselves). Never fails as a
/// whole: what cannot run is reported as unsupported, with the reason.
pub fn run(huge: Option<&gmem::HugePages>) -> Vec<Check> {
    let mut checks: Vec<Check> = gmem::seed::checks()
        .into_iter()
        .map(|seed| {
            let (status, detail) = match seed.outcome {
                Ok(detail) => (Status::Pass, detail),
                Err(detail) => (Status::Fail, detail),
            };
            let name = seed.name.to_string();
            Check { name, backend: Backend::Userspace, status, errno: seed.errno, detail }
        })
        .collect();
    checks.extend(scenario_rows(huge));
    checks.extend(huge.map(huge_row));
    let guest_memfd = match native::probe() {
        Ok(support) => support.guest_memfd,
        Err(_) => false,
    };
    if guest_memfd {
        match selftests::run() {
            Ok(rows) => checks.extend(rows),
            Err(e) => checks.push(failed("guest_memfd selftests checklist", Backend::Native, e)),
        }
    } else {
        checks.push(Check {
            name: "guest_memfd selftests checklist".into(),
            backend: Backend::Native,
            status: Status::Unsupported,
            errno: None,
            detail: NO_GUEST_MEMFD.into(),
        });
    }
    match conformance::compare(true) {
        Ok(comparisons) => {
            for c in comparisons {
                checks.push(native_row(c.name.into(), c.expected, c.kernel, &c.source));
                checks.push(userspace_row(&c));
            }
        }
        Err(e) => checks.push(failed("side-by-side comparison", Backend::Userspace, e)),
    }
    checks
}

/// The GUEST_ABI guests' scenarios: each must exit as it should on gmem's
/// backend, and the native backend must match it exactly (outcome and
/// every host action's result), or be unsupported with the reason.
fn scenario_rows(huge: Option<&gmem::HugePages>) -> Vec<Check> {
    let native = native::probe().map_err(|e| e.to_string()).and_then(|n| n.usable());
    let mut rows = Vec::new();
    for scenario in scenarios::scenarios() {
        let name = format!(
            "guest {} ({} vCPUs, {} MiB{}{})",
            scenario.guest,
            scenario.vcpus,
            scenario.ram >> 20,
            if scenario.allocate_first { ", file allocated first" } else { "" },
            if huge.is_some() { ", 2 MiB pages" } else { "" }
        );
        let ours = scenarios::run(&scenario, false, huge);
        let (status, detail) = match &ours {
            Ok((Outcome::Exit(code), _)) if *code == scenario.exit => {
                (Status::Pass, format!("exit {code}"))
            }
            Ok((outcome, _)) => {
                (Status::Fail, format!("{outcome:?}, expected exit {}", scenario.exit))
            }
            Err(e) => (Status::Fail, format!("could not run: {e}")),
        };
        rows.push(Check {
            name: name.clone(),
            backend: Backend::Userspace,
            status,
            errno: None,
            detail,
        });
        let (status, detail) = match (&native, &ours) {
            (Err(why), _) => (Status::Unsupported, why.clone()),
            (Ok(()), Err(_)) => {
                (Status::Unsupported, "the user-space run failed: nothing to match".into())
            }
            (Ok(()), Ok(ours)) => match scenarios::run(&scenario, true, None) {
                Ok(theirs) if theirs == *ours => (
                    Status::Pass,
                    format!(
                        "same as the user-space backend: {:?}, {} host actions",
                        ours.0,
                        ours.1.len()
                    ),
                ),
                Ok(theirs) => (Status::Fail, format!("native {theirs:?}, user space {ours:?}")),
                Err(e) => (Status::Fail, format!("could not run: {e}")),
            },
        };
        rows.push(Check { name, backend: Backend::Native, status, errno: None, detail });
    }
    let (status, detail) = match scenarios::memslot_deleted_under_a_vcpu() {
        Ok(Outcome::Error(why)) if why.contains("GPA 0x") => {
            (Status::Pass, format!("the VM stopped: {why}"))
        }
        Ok(outcome) => (Status::Fail, format!("{outcome:?}: expected an error naming the GPA")),
        Err(e) => (Status::Fail, format!("could not run: {e}")),
    };
    let name = "a memslot deleted while a vCPU uses it".to_string();
    rows.push(Check { name, backend: Backend::Userspace, status, errno: None, detail });
    rows
}

/// The `hugeconv` guest on `huge` pages: KVM maps them with 2 MiB pages,
/// and its 4 KiB conversions were made huge again.
fn huge_row(huge: &gmem::HugePages) -> Check {
    let name = "huge pages: 2 MiB mappings, 4 KiB conversions split and collapse".to_string();
    let hugeconv = gmem_guest::guest("hugeconv").expect("built in");
    let run = crate::bench::huge_conversions(
        hugeconv,
        &crate::bench::Backing::GmemHuge(huge.clone()),
        64 << 20,
    );
    let (status, detail) = match run {
        Ok(seen) => {
            let pages_2m = seen.kvm_pages_2m.unwrap_or(0);
            let detail = format!(
                "{} conversions, {} collapses, KVM maps {pages_2m} 2 MiB pages",
                seen.conversions, seen.collapses
            );
            match pages_2m > 0 && seen.collapses > 0 {
                true => (Status::Pass, detail),
                false => (Status::Fail, format!("{detail}: expected 2 MiB mappings and collapses")),
            }
        }
        Err(e) if e.errno() == Errno::INVAL => (Status::Unsupported, e.to_string()),
        Err(e) => (Status::Fail, format!("could not run: {e}")),
    };
    Check { name, backend: Backend::Userspace, status, errno: None, detail }
}

fn failed(name: &str, backend: Backend, error: gmem_kvm::Error) -> Check {
    Check {
        name: name.into(),
        backend,
        status: Status::Fail,
        errno: Some(error.errno()),
        detail: format!("could not run: {error}"),
    }
}

/// Why a native row could not run on a kernel without guest_memfd.
const NO_GUEST_MEMFD: &str = "this kernel has no guest_memfd (KVM_CAP_GUEST_MEMFD)";

/// The kernel's answer against the selftests' expectation; unsupported
/// where the kernel has no guest_memfd (`kernel` is `None`).
fn native_row(
    name: String,
    expected: Expect,
    kernel: Option<Option<Errno>>,
    source: &str,
) -> Check {
    let Some(kernel) = kernel else {
        let detail = format!("{NO_GUEST_MEMFD}; expected {expected} ({source})");
        return Check {
            name,
            backend: Backend::Native,
            status: Status::Unsupported,
            errno: None,
            detail,
        };
    };
    let seen = errno_name(kernel);
    let (status, detail) = if expected.matches(kernel) {
        (Status::Pass, format!("{seen}, as expected ({source})"))
    } else {
        (Status::Fail, format!("{seen}; expected {expected} ({source})"))
    };
    Check { name, backend: Backend::Native, status, errno: kernel, detail }
}

/// gmem's answer against the kernel's.
fn userspace_row(c: &Comparison) -> Check {
    let gmem = errno_name(c.gmem);
    let status = if c.conforms() { Status::Pass } else { Status::Fail };
    let Some(kernel) = c.kernel else {
        let detail = match c.deliberate {
            Some(d) => format!(
                "{gmem}; the kernel's source expects {} ({}): deliberate difference (gmem must answer {}): {}",
                c.expected,
                c.source,
                errno_name(d.gmem),
                d.why
            ),
            None => format!("{gmem}; expected {} ({}), no guest_memfd here to compare", c.expected, c.source),
        };
        return Check {
            name: c.name.into(),
            backend: Backend::Userspace,
            status,
            errno: c.gmem,
            detail,
        };
    };
    let kernel_name = errno_name(kernel);
    let detail = match c.deliberate {
        _ if c.gmem == kernel => format!("{gmem}, same as the kernel"),
        Some(d) => format!(
            "{gmem}, kernel {kernel_name}: deliberate difference (gmem must answer {}): {}",
            errno_name(d.gmem),
            d.why
        ),
        None => format!("{gmem}, kernel {kernel_name}: an undocumented difference (bug)"),
    };
    Check { name: c.name.into(), backend: Backend::Userspace, status, errno: c.gmem, detail }
}

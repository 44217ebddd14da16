//! `gmem probe`: what this host supports and what gmem will use.

use gmem_kvm::native::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem_kvm::probe::{self, HostReport};
use serde_json::{json, Value};

/// `gmem probe` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct ProbeArgs {
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Runs `gmem probe`; exit status 1 when /dev/kvm is missing or closed to us.
pub(crate) fn probe(args: &ProbeArgs) -> u8 {
    let host = match probe::host() {
        Ok(host) => host,
        Err(e) => {
            let hint = match e.errno() {
                gmem_kvm::Errno::NOENT => "no /dev/kvm: KVM is not available on this host",
                gmem_kvm::Errno::ACCESS | gmem_kvm::Errno::PERM => {
                    "no permission to open /dev/kvm: run as root or join the kvm group"
                }
                _ => "KVM is not usable here",
            };
            eprintln!("gmem probe: {hint} ({e})");
            return 1;
        }
    };
    let auto = host.auto_backend();
    let hypercall = hypercall_exits(&host);
    if args.json {
        println!("{}", report_json(&host, &auto, &hypercall));
    } else {
        for (name, value) in rows(&host, &auto, &hypercall) {
            println!("{name:34} {value}");
        }
    }
    0
}

fn yes(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

fn limit(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "unlimited".into(), |b| format!("{} KiB", b / 1024))
}

/// Each flag the kernel offers, by name where gmem knows it (others, such
/// as a direct-map removal flag on newer kernels, by bit: gmem does not use
/// what it has not tested).
fn flag_names(flags: u64) -> String {
    let known = [(GUEST_MEMFD_FLAG_MMAP, "MMAP"), (GUEST_MEMFD_FLAG_INIT_SHARED, "INIT_SHARED")];
    let names: Vec<String> = (0..64)
        .map(|bit| 1u64 << bit)
        .filter(|flag| flags & flag != 0)
        .map(|flag| match known.iter().find(|(k, _)| *k == flag) {
            Some((_, name)) => (*name).to_owned(),
            None => format!("bit {}: not used by gmem", flag.trailing_zeros()),
        })
        .collect();
    format!("{flags:#x} ({})", if names.is_empty() { "none".into() } else { names.join("|") })
}

type Auto = Result<probe::Choice, String>;

/// Whether `vmcall` KVM_HC_MAP_GPA_RANGE exits reach user space: asked of
/// a tiny guest where KVM offers them.
fn hypercall_exits(host: &HostReport) -> Result<(), String> {
    if !host.map_gpa_range_exits() {
        return Err("KVM_CAP_EXIT_HYPERCALL lacks KVM_HC_MAP_GPA_RANGE".into());
    }
    gmem_runner::probe_hypercall_exits()
        .unwrap_or_else(|e| Err(format!("the probe guest could not run: {e}")))
}

fn rows(
    host: &HostReport,
    auto: &Auto,
    hypercall: &Result<(), String>,
) -> Vec<(&'static str, String)> {
    let n = &host.native;
    let uffd = match &host.userfaultfd {
        Ok(features) => format!(
            "{features:#x} ({})",
            match host.userspace_usable() {
                Ok(()) => "shmem MISSING, MINOR and SIGBUS: enough for gmem".into(),
                Err(why) => why,
            }
        ),
        Err(why) => format!("unusable: {why}"),
    };
    let serves = match &n.serves_guest {
        Ok(true) => "yes (checked with a tiny guest)".into(),
        Ok(false) => "no: a tiny guest read userspace_addr, not guest_memfd".into(),
        Err(why) => format!("unknown: {why}"),
    };
    vec![
        ("/dev/kvm", "opened".into()),
        ("KVM API version", host.api_version.to_string()),
        ("VM types (KVM_CAP_VM_TYPES)", format!("{:#x}", n.vm_types)),
        ("KVM_CAP_GUEST_MEMFD", yes(n.guest_memfd).into()),
        ("guest_memfd flags (cap 244)", flag_names(n.guest_memfd_flags)),
        ("KVM_CAP_USER_MEMORY2", yes(n.user_memory2).into()),
        ("KVM_CAP_MEMORY_ATTRIBUTES", format!("{:#x}", n.memory_attributes)),
        ("KVM_CAP_MEMORY_FAULT_INFO", yes(host.memory_fault_info).into()),
        (
            "KVM_CAP_EXIT_HYPERCALL",
            format!(
                "{:#x} (KVM_HC_MAP_GPA_RANGE: {})",
                host.exit_hypercall,
                yes(host.map_gpa_range_exits())
            ),
        ),
        (
            "vmcall exits reach user space",
            match hypercall {
                Ok(()) => "yes (checked with a tiny guest)".into(),
                Err(why) => format!("no: {why}"),
            },
        ),
        ("KVM_CAP_SYNC_REGS", format!("{:#x}", host.sync_regs)),
        ("guest_memfd serves guest faults", serves),
        (
            "--backend native",
            match n.usable() {
                Ok(()) => {
                    "runs guests (guest_memfd MMAP|INIT_SHARED, mapped as the memslot)".into()
                }
                Err(why) => format!("unavailable: {why}"),
            },
        ),
        ("userfaultfd features", uffd),
        (
            "RLIMIT_MEMLOCK (soft / hard)",
            format!(
                "{} / {}{}",
                limit(host.memlock.0),
                limit(host.memlock.1),
                if host.ipc_lock {
                    " (CAP_IPC_LOCK is effective: no limit applies)"
                } else {
                    " (no effective CAP_IPC_LOCK: twice the guest RAM must fit the soft limit)"
                }
            ),
        ),
        ("huge pages: memfd (--huge-pages memfd)", offered(&gmem::HugePages::Memfd)),
        ("huge pages: hugetlbfs (--huge-pages hugetlb)", offered(&gmem::HugePages::HugeTlb)),
        ("huge pages: tmpfs (--huge-pages DIR)", huge_tmpfs()),
        (
            "--backend auto",
            match auto {
                Ok(choice) => format!("{} ({})", choice.backend, choice.reason),
                Err(why) => format!("none: {why}"),
            },
        ),
    ]
}

/// Whether these huge pages are offered here, and why not.
fn offered(huge: &gmem::HugePages) -> String {
    match (huge.offered(), huge) {
        (Ok(what), gmem::HugePages::HugeTlb) => {
            format!("{what}; files only: regions on hugetlbfs are not offered yet")
        }
        (Ok(what), _) => format!("yes ({what})"),
        (Err(why), _) => format!("no: {why}"),
    }
}

/// The huge-page tmpfs mounts there are, or how to make one.
fn huge_tmpfs() -> String {
    let mounts = gmem::huge_tmpfs_mounts();
    if mounts.is_empty() {
        return "none mounted; as root: mount -t tmpfs -o huge=always,size=SIZE gmem DIR \
                (`gmem bench` mounts its own)"
            .into();
    }
    let list: Vec<String> =
        mounts.iter().map(|(dir, option)| format!("{} (huge={option})", dir.display())).collect();
    list.join(", ")
}

fn report_json(host: &HostReport, auto: &Auto, hypercall: &Result<(), String>) -> Value {
    let n = &host.native;
    json!({
        "kvm": { "device": "/dev/kvm", "api_version": host.api_version, "vm_types": n.vm_types },
        "guest_memfd": {
            "supported": n.guest_memfd,
            "flags": n.guest_memfd_flags,
            "mmap": n.guest_memfd_flags & GUEST_MEMFD_FLAG_MMAP != 0,
            "init_shared": n.guest_memfd_flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0,
            "serves_guest": n.serves_guest.as_ref().ok(),
            "serves_guest_detail": n.serves_guest.as_ref().err(),
        },
        "native": { "usable": n.usable().is_ok(), "detail": n.usable().err() },
        "user_memory2": n.user_memory2,
        "memory_attributes": n.memory_attributes,
        "memory_fault_info": host.memory_fault_info,
        "exit_hypercall": host.exit_hypercall,
        "map_gpa_range_exits": host.map_gpa_range_exits(),
        "hypercall_exits_work": hypercall.is_ok(),
        "hypercall_exits_detail": hypercall.as_ref().err(),
        "sync_regs": host.sync_regs,
        "userfaultfd": {
            "features": host.userfaultfd.as_ref().ok(),
            "error": host.userfaultfd.as_ref().err(),
            "usable": host.userspace_usable().is_ok(),
        },
        "memlock": { "soft": host.memlock.0, "hard": host.memlock.1, "root": host.root, "cap_ipc_lock": host.ipc_lock },
        "huge_pages": {
            "memfd": huge_json(&gmem::HugePages::Memfd),
            "hugetlb": huge_json(&gmem::HugePages::HugeTlb),
            "tmpfs_mounts": gmem::huge_tmpfs_mounts().iter()
                .map(|(dir, option)| json!({ "path": dir, "huge": option }))
                .collect::<Vec<_>>(),
        },
        "auto_backend": auto.as_ref().ok().map(|c| c.backend),
        "auto_reason": match auto { Ok(c) => c.reason.clone(), Err(why) => why.clone() },
    })
}

fn huge_json(huge: &gmem::HugePages) -> Value {
    let offered = huge.offered();
    json!({ "offered": offered.is_ok(), "detail": offered.unwrap_or_else(|why| why) })
}

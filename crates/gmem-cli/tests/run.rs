//! The `gmem` binary end to end: probe, run, check and bench; exit
//! statuses, `--json` shapes, bad arguments.

use std::process::{Command, Output};

use serde_json::Value;

mod common;

use common::{gmem, gmem_bounded, json, kvm, status, stderr, CONVERT_SYNCS};

#[test]
fn demo_exits_zero() {
    if !kvm() {
        return;
    }
    let out = gmem(&["run", "--vcpus", "2"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("gmem demo: 2 vCPU(s) filled 4 MiB of private memory"));
    assert!(
        stderr(&out).contains("\"hello from the guest, through a shared page\""),
        "the host prints the message the demo shares: {}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "without --json stdout stays empty");
}

#[test]
fn sync_read_and_write_follow_the_page_states() {
    if !kvm() {
        return;
    }
    let out = gmem(
        &[
            &["run", "--guest", "convert", "--json"][..],
            &CONVERT_SYNCS,
            &["--sync", "2:write:0x600000:00"],
        ]
        .concat(),
    );
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    let syncs = v["syncs"].as_array().unwrap();
    let results: Vec<_> = syncs.iter().map(|s| s["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["ok", "ok", "denied", "denied", "denied"]);
    assert_eq!(syncs[0]["data_hex"], hex_of(b"guest->host"));
    assert_eq!(syncs[2]["data_hex"], Value::Null);
    assert!(syncs[2]["detail"].as_str().unwrap().contains("0x601000"), "{}", syncs[2]);
    let stats = &v["stats"];
    assert_eq!(stats["conversions"], 4);
    assert_eq!(stats["conversion_requests"], 12);
    assert_eq!(stats["host_denials"], 3);
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn json_has_the_abi_fields() {
    if !kvm() {
        return;
    }
    let out = gmem(&[
        "run",
        "--guest",
        "punch",
        "--json",
        "--sync",
        "1:punch:0x600000:0x3000",
        "--sync",
        "1:read:0x600000:16",
        "--sync",
        "1:write:0x600000:414243",
    ]);
    assert_eq!(status(&out), 3, "the guest's exit code (3 pages read zero): {}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["reason"], "exit");
    let punched = "punch: pages that read zero: 0x0000000000600000 0x0000000000601000 \
                   0x0000000000602000 (3 of 16, the exit status)";
    assert!(v["console"].as_str().unwrap().starts_with(punched), "{}", v["console"]);
    assert!(stderr(&out).contains(punched), "the console also goes to stderr");
    let syncs = v["syncs"].as_array().unwrap();
    assert_eq!(syncs.len(), 3);
    assert_eq!(syncs[0]["action"], "punch");
    assert_eq!(syncs[0]["result"], "ok");
    assert_eq!(syncs[0]["gpa"], 0x60_0000);
    assert_eq!(syncs[0]["len"], 0x3000);
    assert_eq!(syncs[1]["action"], "read");
    assert_eq!(syncs[1]["result"], "denied", "all of RAM is private");
    assert_eq!(syncs[1]["data_hex"], Value::Null);
    assert_eq!(syncs[2]["result"], "denied");
    assert_eq!(syncs[2]["stage"], 1);
    let stats = &v["stats"];
    assert!(stats["pages_served"].as_u64().unwrap() > 16);
    assert!(stats["invalidations"].as_u64().unwrap() >= 1);
    assert_eq!(stats["conversions"], 0);
    assert_eq!(stats["conversion_requests"], 0);
    assert_eq!(stats["host_denials"], 2);
}

#[test]
fn timeout_is_124_and_does_not_hang() {
    if !kvm() {
        return;
    }
    let out = gmem(&["run", "--guest", "spin", "--timeout", "0.5", "--vcpus", "2", "--json"]);
    assert_eq!(status(&out), 124);
    let v = json(&out);
    assert_eq!(v["reason"], "timeout");
    assert_eq!(v["exit_code"], Value::Null);
}

#[test]
fn unknown_port_is_a_vm_error() {
    if !kvm() {
        return;
    }
    let out = gmem(&["run", "--guest", "badport", "--json"]);
    assert_eq!(status(&out), 3);
    let v = json(&out);
    assert_eq!(v["reason"], "error");
    assert!(v["error"].as_str().unwrap().contains("unknown port 0x80"));
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let bad_elf = std::env::temp_dir().join(format!("gmem-bad-elf-{}", std::process::id()));
    std::fs::write(&bad_elf, b"\x7fELF but not really").unwrap();
    let bad_elf = bad_elf.to_str().unwrap().to_owned();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--vcpus", "0"], "vcpus"),
        (&["run", "--mem", "3M"], "RAM size"),
        (&["run", "--mem", "lots"], "not a decimal"),
        (&["run", "--timeout=-1"], "seconds"),
        (&["run", "--sync", "1:poke:0:1"], "unknown sync action"),
        (&["run", "--sync", "1:punch:0x600001:4096"], "page-aligned"),
        (&["run", "--sync", "1:read:0x4000000:16"], "outside guest RAM"),
        (&["run", "--guest", "/nonexistent/guest.elf"], "not a file (No such file"),
        (&["run", "--guest", &bad_elf], "bad guest image"),
        (&["run", "--backend", "bogus"], "bogus"),
        (&["bench", "--reps", "0"], "reps"),
        (&["bench", "--mib", "lots"], "mib"),
        (&["bench", "--plot"], "--plot"),
        (&["bench", "--vcpus", "1"], "vcpus"),
        (&["bench", "--vcpus", "65"], "vcpus"),
        (&["probe", "--verbose"], "--verbose"),
        (&["check", "extra"], "extra"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let out = gmem(args);
        assert_eq!(status(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    let _ = std::fs::remove_file(&bad_elf);
}

#[test]
fn bench_json_has_ratios() {
    if !kvm() {
        return;
    }
    let plot = std::env::temp_dir().join(format!("gmem-bench-{}.svg", std::process::id()));
    let plot_arg = plot.to_str().unwrap();
    let out = gmem(&["bench", "--quick", "--vcpus", "3", "--json", "--check", "--plot", plot_arg]);
    assert!(stderr(&out).contains("first touch on 3 vCPUs"), "{}", stderr(&out));
    // Progress goes a line at a time to a log (stderr is not a terminal).
    assert!(!out.stderr.contains(&b'\r'), "carriage returns in a log");
    assert!(stderr(&out).lines().filter(|l| l.starts_with("gmem bench: ")).count() > 5);
    let svg = std::fs::read_to_string(&plot).unwrap();
    let _ = std::fs::remove_file(&plot);
    assert!(svg.starts_with("<svg") && svg.contains("convert-4k"), "{svg}");
    let v = json(&out);
    let results = v["results"].as_array().unwrap();
    let names: Vec<_> = results.iter().map(|r| r["name"].as_str().unwrap()).collect();
    // `--check`: status 1 exactly when a target is not met.
    let missed = results.iter().any(|r| r["met"] == false);
    assert_eq!(status(&out), i32::from(missed), "{}", stderr(&out));
    for name in [
        "first-touch",
        "populate",
        "punch",
        "convert-4k",
        "convert-2m",
        "metadata-bytes-per-page",
        "tlb-random",
        // On huge pages (the bench mounts its own tmpfs: tests run as root).
        "first-touch-huge",
        "tlb-huge",
        "memory-after-convert",
        "convert-4k-huge",
        "collapse",
        "collapse-cost",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    for r in results {
        let (value, baseline, ratio) = (
            r["value"].as_f64().unwrap(),
            r["baseline"].as_f64().unwrap(),
            r["ratio"].as_f64().unwrap(),
        );
        assert!(value > 0.0 && baseline > 0.0, "{r}");
        // Oriented so that higher is better: rates over, costs under the baseline.
        let rate = r["unit"].as_str().unwrap().ends_with("/s");
        let expected = if rate { value / baseline } else { baseline / value };
        assert!((ratio - expected).abs() < 1e-9, "{r}");
        assert!(
            ["MiB/s", "conv/s", "us", "ms", "ns", "B/page", "pages/page", "x"]
                .contains(&r["unit"].as_str().unwrap()),
            "{r}"
        );
        match r["target"].as_f64() {
            Some(target) => assert_eq!(r["met"], ratio >= target, "{r}"),
            None => assert_eq!(r["met"], Value::Null, "{r}"),
        }
    }
    let metadata = results.iter().find(|r| r["name"] == "metadata-bytes-per-page").unwrap();
    assert!(metadata["value"].as_f64().unwrap() < 10.0, "single-digit bytes per page: {metadata}");
}

#[test]
fn probe_json_reports_the_host_and_the_backend() {
    if !kvm() {
        return;
    }
    let out = gmem(&["probe", "--json"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["kvm"]["api_version"], 12);
    for key in ["supported", "flags", "mmap", "init_shared", "serves_guest"] {
        assert!(v["guest_memfd"].get(key).is_some(), "guest_memfd.{key} missing: {v}");
    }
    for key in ["user_memory2", "memory_attributes", "memory_fault_info", "exit_hypercall"] {
        assert!(v.get(key).is_some(), "{key} missing: {v}");
    }
    assert_eq!(v["userfaultfd"]["usable"], true, "the user-space backend runs here");
    assert!(v["memlock"].get("soft").is_some());
    assert_eq!(v["auto_backend"], "userspace");
    assert!(!v["auto_reason"].as_str().unwrap().is_empty());
    let table = gmem(&["probe"]);
    assert_eq!(status(&table), 0);
    let text = String::from_utf8_lossy(&table.stdout);
    for row in ["KVM API version", "KVM_CAP_GUEST_MEMFD", "userfaultfd features", "--backend auto"]
    {
        assert!(text.contains(row), "{row} missing: {text}");
    }
}

/// Runs gmem with `args` in a mount namespace whose /dev is empty (no
/// /dev/kvm); `None` (with a SKIPPED line) where that needs root we lack.
fn gmem_without_dev_kvm(args: &[&str]) -> Option<Output> {
    use std::os::unix::process::CommandExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: hiding /dev/kvm needs root");
        return None;
    }
    let mut command = Command::new(env!("CARGO_BIN_EXE_gmem"));
    command.args(args);
    let hide_dev = || {
        use rustix::mount::{mount, mount_change, MountFlags, MountPropagationFlags};
        // SAFETY: the child is single-threaded between fork and exec, so a
        // new mount namespace for it breaks no other thread's assumptions.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }?;
        mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)?;
        mount("none", "/dev", "tmpfs", MountFlags::empty(), None)?;
        Ok(())
    };
    // SAFETY: between fork and exec the hook makes only async-signal-safe
    // system calls (unshare, mount) on memory prepared before the fork.
    unsafe { command.pre_exec(hide_dev) };
    Some(command.output().unwrap())
}

/// Without /dev/kvm (hidden in a mount namespace of the child): a clear
/// message and exit status 1. Needs root for the namespace.
#[test]
fn probe_without_dev_kvm_exits_1() {
    if !kvm() {
        return;
    }
    let Some(out) = gmem_without_dev_kvm(&["probe", "--json"]) else { return };
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("no /dev/kvm"), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "no JSON when there is nothing to report");
}

/// Without /dev/kvm, every backend is one this host cannot provide:
/// status 2 for `userspace` as for `auto`, with one JSON object.
#[test]
fn run_without_dev_kvm_exits_2_on_every_backend() {
    if !kvm() {
        return;
    }
    for backend in ["auto", "userspace", "native"] {
        let Some(out) = gmem_without_dev_kvm(&["run", "--backend", backend, "--json"]) else {
            return;
        };
        assert_eq!(status(&out), 2, "{backend}: {}", stderr(&out));
        assert_eq!(json(&out)["reason"], "error", "{backend}");
    }
}

#[test]
fn check_passes_here_and_json_has_the_rows() {
    if !kvm() {
        return;
    }
    let out = gmem(&["check", "--json"]);
    let v = json(&out);
    let checks = v["checks"].as_array().unwrap();
    let failed: Vec<_> = checks.iter().filter(|c| c["status"] == "fail").collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(status(&out), 0, "exit 0 when nothing fails");
    for c in checks {
        assert!(["userspace", "native"].contains(&c["backend"].as_str().unwrap()), "{c}");
        assert!(["pass", "fail", "unsupported"].contains(&c["status"].as_str().unwrap()), "{c}");
        assert!(c["errno"].is_null() || c["errno"].as_i64().is_some(), "{c}");
        assert!(!c["name"].as_str().unwrap().is_empty() && c["detail"].is_string(), "{c}");
    }
    let row = |name: &str, backend: &str| {
        checks.iter().find(|c| c["name"] == name && c["backend"] == backend).cloned()
    };
    assert_eq!(row("seed test program", "userspace").unwrap()["errno"], 1, "EPERM");
    let twice = row("bind the same file range twice", "userspace").unwrap();
    assert_eq!((twice["status"].as_str(), twice["errno"].as_i64()), (Some("pass"), Some(22)));
    // The native half needs the kernel's guest_memfd; without it every
    // side-by-side row is still there, unsupported, naming the capability.
    let native = row("bind the same file range twice", "native").unwrap();
    if json(&gmem(&["probe", "--json"]))["guest_memfd"]["supported"] == true {
        assert_eq!((native["status"].as_str(), native["errno"].as_i64()), (Some("pass"), Some(22)));
    } else {
        assert_eq!(native["status"], "unsupported", "{native}");
        assert!(native["detail"].as_str().unwrap().contains("KVM_CAP_GUEST_MEMFD"), "{native}");
        eprintln!("SKIPPED: check_passes_here_and_json_has_the_rows (native rows) needs KVM_CAP_GUEST_MEMFD");
    }
    let userspace = checks.iter().filter(|c| c["backend"] == "userspace").count();
    assert!(userspace >= 38, "the user-space half runs on every host: {userspace} rows");
    let foreign = row("bind to another VM", "userspace").unwrap();
    assert!(foreign["detail"].as_str().unwrap().contains("deliberate"), "{foreign}");
}

/// With no room for queued signals (`ulimit -i 0`), a guest that never
/// exits still times out: kicks are a standard signal plus
/// `immediate_exit`, which need no signal queue (a real-time kick failed
/// with EAGAIN and the run never ended).
#[test]
fn a_spinning_guest_times_out_without_a_signal_queue() {
    if !kvm() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_gmem"));
    command.args(["run", "--guest", "spin", "--vcpus", "2", "--timeout", "1"]);
    let no_queue = || {
        let zero = rustix::process::Rlimit { current: Some(0), maximum: Some(0) };
        rustix::process::setrlimit(rustix::process::Resource::Sigpending, zero)?;
        Ok(())
    };
    // SAFETY: between fork and exec the hook makes one async-signal-safe
    // system call (setrlimit) on memory prepared before the fork.
    unsafe { command.pre_exec(no_queue) };
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("gmem run did not end on its 1 s timeout");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(124));
}

/// Bad arguments are exit status 2 with a message: never a panic, an
/// abort or a hang (each of these did one of those before).
#[test]
fn bad_arguments_are_status_2_never_a_panic() {
    for args in [
        &["run", "--timeout", "1e19"][..],
        &["run", "--timeout", "1e20"],
        &["run", "--timeout", "-1"],
        &["run", "--timeout", "NaN"],
        &["run", "--sync", "1:write:0x800000:a\u{e9}b"],
        &["run", "--sync", "1:write:0x800000:+1"],
        &["run", "--mem", "64G", "--sync", "1:read:0:0xf00000000"],
        &["run", "--fault-around", "0"],
        &["run", "--fault-around", "3"],
        &["run", "--fault-around", "1048576"],
        &["run", "--mem", "4M"],
        &["run", "--mem", "65G"],
        &["bench", "--quick", "--mib", "8"],
    ] {
        let out = gmem_bounded(args);
        assert_eq!(status(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).trim().is_empty(), "{args:?}: no message");
    }
}

/// Guest images that are not regular ELF files are refused before they are
/// read whole: /dev/zero, a FIFO nobody writes, a 2 GiB sparse file, a
/// directory. With `--json`, stdout still gets one JSON object.
#[test]
fn hostile_image_files_are_refused_up_front() {
    let dir = std::env::temp_dir().join(format!("gmem-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
    let sparse = dir.join("sparse");
    std::fs::File::create(&sparse).unwrap().set_len(2 << 30).unwrap();
    let text = dir.join("text");
    std::fs::write(&text, "not an image").unwrap();
    let huge_elf = dir.join("huge-elf");
    let file = std::fs::File::create(&huge_elf).unwrap();
    std::io::Write::write_all(&mut &file, b"\x7fELF").unwrap();
    file.set_len(100 << 20).unwrap();
    for (image, why) in [
        ("/dev/zero", "not a regular file"),
        (fifo.to_str().unwrap(), "not a regular file"),
        (dir.to_str().unwrap(), "not a regular file"),
        (sparse.to_str().unwrap(), "must fit in RAM"),
        (huge_elf.to_str().unwrap(), "must fit in RAM"),
        (text.to_str().unwrap(), "not an ELF file"),
    ] {
        let out = gmem_bounded(&["run", "--guest", image, "--json"]);
        assert_eq!(status(&out), 2, "{image}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{image}: {}", stderr(&out));
        let report = json(&out);
        assert_eq!(report["reason"], "error");
        assert!(report["exit_code"].is_null());
        assert!(report["error"].as_str().unwrap().contains(why));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--guest demo` is the default guest, with its message read; with too
/// little RAM for that message, no sync the user never gave fails: the
/// demo itself says what it needs.
#[test]
fn the_demo_by_name_is_the_default_and_small_ram_is_its_own_answer() {
    if !kvm() {
        return;
    }
    let out = gmem(&["run", "--guest", "demo"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("hello from the guest"), "{}", stderr(&out));
    let out = gmem(&["run", "--mem", "8M", "--json"]);
    assert!(!stderr(&out).contains("sync"), "{}", stderr(&out));
    assert!(stderr(&out).contains("demo: needs more than 8 MiB"), "{}", stderr(&out));
    assert_eq!(json(&out)["exit_code"], 2);
}

/// A plot path that cannot be written fails before anything is measured.
#[test]
fn an_unwritable_plot_fails_up_front() {
    let out = gmem_bounded(&["bench", "--quick", "--plot", "/nonexistent/dir/x.svg"]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot write /nonexistent/dir/x.svg"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("first touch"), "nothing measured first: {}", stderr(&out));
}

/// Hex and the full range of fault-around sizes are accepted.
#[test]
fn fault_around_takes_hex() {
    if !kvm() {
        return;
    }
    let out = gmem(&["run", "--guest", "smp", "--vcpus", "2", "--fault-around", "0x10"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
}

/// More RAM than the host can give: a warning with the numbers up front
/// (the guest here touches little of it, so it runs).
#[test]
fn too_much_ram_is_warned_about_with_the_numbers() {
    if !kvm() {
        return;
    }
    let out = gmem_bounded(&["run", "--guest", "spin", "--mem", "64G", "--timeout", "0.5"]);
    assert_eq!(status(&out), 124, "{}", stderr(&out));
    assert!(stderr(&out).contains("warning: --mem 65536 MiB is more than"), "{}", stderr(&out));
}

/// `gmem stress` for 10 s (issue 11's CI run): a hostile guest on 2 vCPUs
/// and 2 host threads; every invariant holds, and both sides did work.
#[test]
fn stress_for_ten_seconds_finds_no_violation() {
    if !kvm() {
        return;
    }
    let out = gmem_bounded(&["stress", "--duration", "10s", "--json"]);
    let report = json(&out);
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    for (side, field) in [
        ("guest", "conversions"),
        ("guest", "invalid_refused"),
        ("guest", "checks"),
        ("host", "reads"),
        ("host", "view_reads"),
        ("host", "punches"),
        ("host", "conversions"),
        ("host", "invalid_refused"),
    ] {
        assert!(report[side][field].as_u64().unwrap() > 0, "{side}.{field}: {report}");
    }
}

/// Every built-in guest runs on the native backend (the kernel's
/// guest_memfd, mapped) with the same exit status, the same sync results
/// and the same bytes read as on the user-space backend.
#[test]
fn guests_behave_the_same_on_both_backends() {
    if !kvm() {
        return;
    }
    let native = gmem(&["probe", "--json"]);
    if json(&native)["native"]["usable"] != true {
        eprintln!(
            "SKIPPED: this host's guest_memfd cannot run guests: {}",
            json(&native)["native"]
        );
        return;
    }
    let cases: Vec<Vec<&str>> = vec![
        vec!["--guest", "demo", "--vcpus", "2"],
        [&["--guest", "convert"][..], &CONVERT_SYNCS].concat(),
        vec!["--guest", "convsmp", "--vcpus", "2"],
        vec!["--guest", "convstorm", "--vcpus", "4"],
        vec!["--guest", "punch", "--sync", "1:punch:0x600000:0x3000"],
        vec!["--guest", "smp", "--vcpus", "4"],
        vec!["--guest", "touch"],
        vec!["--guest", "memmap", "--mem", "3136M"],
        vec!["--guest", "badport"],
    ];
    for case in cases {
        let mut reports = Vec::new();
        for backend in ["userspace", "native"] {
            let args = [&["run", "--json", "--backend", backend][..], &case].concat();
            let out = gmem(&args);
            let report = json(&out);
            assert_eq!(report["backend"], backend, "{case:?}");
            reports.push((status(&out), report["exit_code"].clone(), report["syncs"].clone()));
        }
        assert_eq!(reports[0], reports[1], "{case:?}: userspace vs native");
    }
}

/// The same soak on the native backend: the kernel's guest_memfd under
/// gmem's states keeps every invariant too.
#[test]
fn stress_on_the_native_backend_finds_no_violation() {
    if !kvm() {
        return;
    }
    if json(&gmem(&["probe", "--json"]))["native"]["usable"] != true {
        eprintln!("SKIPPED: the native backend cannot run on this host");
        return;
    }
    let out = gmem_bounded(&["stress", "--native", "--duration", "3s", "--json"]);
    let report = json(&out);
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(report["guest"]["conversions"].as_u64().unwrap() > 0, "{report}");
}

/// `gmem run --guest disk --disk PATH` twice: the first run creates the
/// disk and writes it, the second finds the first's data (on both
/// backends); a disk that is not whole sectors is refused with status 2.
#[test]
fn the_disk_guest_finds_its_data_on_the_second_run() {
    if !kvm() {
        return;
    }
    let disk = std::env::temp_dir().join(format!("gmem-cli-disk-{}", std::process::id()));
    let _ = std::fs::remove_file(&disk);
    for (run, backend) in [(1, "userspace"), (2, "userspace"), (3, "native")] {
        if backend == "native" && json(&gmem(&["probe", "--json"]))["native"]["usable"] != true {
            break;
        }
        let out = gmem(&[
            "run",
            "--guest",
            "disk",
            "--backend",
            backend,
            "--disk",
            disk.to_str().unwrap(),
        ]);
        assert_eq!(status(&out), 0, "run {run}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("disk: run {run}:")), "{}", stderr(&out));
        if run > 1 {
            assert!(
                stderr(&out).contains(&format!("run {}'s data was there", run - 1)),
                "{}",
                stderr(&out)
            );
        }
    }
    std::fs::write(&disk, [0u8; 1000]).unwrap();
    let out = gmem(&["run", "--guest", "disk", "--disk", disk.to_str().unwrap()]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("512-byte sectors"), "{}", stderr(&out));
    let out = gmem(&["run", "--guest", "disk", "--disk", "/tmp/x.img:1000"]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    let _ = std::fs::remove_file(&disk);
}

/// 8 GiB of RAM, every page of it touched by two vCPUs (both sides of the
/// gap): the run ends with exit 0, and every page was allocated (served by
/// gmem in batches, or by the kernel where a region handed first touches
/// over).
#[test]
fn an_8_gib_guest_touches_all_of_its_ram() {
    if !kvm() {
        return;
    }
    let out = gmem_bounded(&[
        "run",
        "--guest",
        "touch",
        "--mem",
        "8G",
        "--vcpus",
        "2",
        "--json",
        "--timeout",
        "300",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let stats = &json(&out)["stats"];
    let allocated = stats["allocated_pages"].as_u64().unwrap();
    // Everything from 4 MiB up to the stacks, in both regions.
    let touched = ((8u64 << 30) - (4 << 20) - 2 * 0x10000) / 4096;
    assert!(allocated >= touched, "{allocated} pages allocated, {touched} touched: {stats}");
    assert!(allocated <= (8 << 30) / 4096, "{stats}");
    // Each vCPU's faults continue its own stream, whichever fault thread
    // serves them: a dense guest keeps its batches.
    assert_eq!(stats["kernel_handovers"], 0, "{stats}");
}

/// Built-in guests as a newcomer meets them: each does its host side by
/// default, says what it needs before anything runs (status 2, the
/// message naming the option), and stops by itself.
#[test]
fn built_in_guests_do_their_host_side_or_say_what_they_need() {
    if !kvm() {
        return;
    }
    // Without --sync, convert and user get their host side and succeed.
    let out = gmem(&["run", "--guest", "convert", "--json"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let results: Vec<_> =
        json(&out)["syncs"].as_array().unwrap().iter().map(|s| s["result"].clone()).collect();
    assert_eq!(results, ["ok", "ok", "denied", "denied"]);
    let out = gmem(&["run", "--guest", "user"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("ok: \"user->host\""), "{}", stderr(&out));
    // punch: the host punches 3 pages, the guest says which.
    let out = gmem(&["run", "--guest", "punch"]);
    assert_eq!(status(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("(3 of 16, the exit status)"), "{}", stderr(&out));
    // convsmp runs on 2 vCPUs unless told otherwise.
    assert_eq!(status(&gmem(&["run", "--guest", "convsmp"])), 0);
    for (args, needs) in [
        (&["--guest", "convsmp", "--vcpus", "1"][..], "--vcpus"),
        (&["--guest", "disk"], "--disk"),
        (&["--guest", "diskbench"], "--disk"),
        (&["--guest", "hypercall"], "--hypercall-exits"),
    ] {
        let out = gmem(&[&["run"][..], args].concat());
        assert_eq!(status(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needs), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("gmem run: backend"), "{args:?}: refused before the VM");
    }
    // A guest that never exits says so and stops after 2 s, not 60.
    let started = std::time::Instant::now();
    let out = gmem(&["run", "--guest", "halt", "--vcpus", "2"]);
    assert_eq!(status(&out), 124, "{}", stderr(&out));
    assert!(stderr(&out).contains("never exits"), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn an_unknown_guest_is_named_with_the_built_in_ones() {
    let out = gmem(&["run", "--guest", "nosuch"]);
    assert_eq!(status(&out), 2);
    for (name, _) in gmem_guest::GUESTS {
        assert!(stderr(&out).contains(name), "{name} is not named: {}", stderr(&out));
    }
}

/// A disk argument without a path is refused; it used to create a file
/// named ':8M' in the current directory.
#[test]
fn a_disk_without_a_path_is_refused_and_creates_nothing() {
    let dir = std::env::temp_dir().join(format!("gmem-disk-arg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(["run", "--disk", ":8M"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "a file was created");
    std::fs::remove_dir(&dir).unwrap();
}

/// The guest console carries no NUL bytes from the conversion benchmark,
/// and a run says which backend it uses in one short line.
#[test]
fn convbench_prints_text_and_the_backend_line_is_short() {
    if !kvm() {
        return;
    }
    let out = gmem(&["run", "--guest", "convbench"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(!out.stderr.contains(&0), "NUL bytes on the console");
    let line =
        stderr(&out).lines().find(|l| l.starts_with("gmem run: backend")).unwrap().to_owned();
    assert!(line.len() <= 80, "{line}");
}

/// `--hypercall-exits` is refused (status 2, saying why) where a guest's
/// vmcall never reaches user space, as on kvm_pvm hosts, instead of
/// hanging the guest until the timeout; where it does, the guest converts.
#[test]
fn hypercall_exits_run_or_are_refused_as_the_probe_says() {
    if !kvm() {
        return;
    }
    let probe = json(&gmem(&["probe", "--json"]));
    let started = std::time::Instant::now();
    let out = gmem(&["run", "--guest", "hypercall", "--hypercall-exits"]);
    if probe["hypercall_exits_work"] == true {
        assert_eq!(status(&out), 0, "{}", stderr(&out));
    } else {
        assert_eq!(status(&out), 2, "{}", stderr(&out));
        assert!(stderr(&out).contains("--hypercall-exits: "), "{}", stderr(&out));
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "it waited for --timeout");
    }
}

/// `gmem stress --huge-pages DIR` (a huge tmpfs of the test's own): the
/// soak keeps every invariant while conversions split 2 MiB pages and
/// background collapses make them huge again, host threads reading and
/// punching throughout.
#[test]
fn stress_on_huge_pages_splits_and_collapses_with_no_violation() {
    if !kvm() {
        return;
    }
    let mount = gmem::TmpfsMount::huge(512 << 20).expect("mount a huge tmpfs (root)");
    let dir = mount.path().to_str().unwrap();
    let out = gmem_bounded(&["stress", "--duration", "4s", "--huge-pages", dir, "--json"]);
    let report = json(&out);
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(report["collapses"].as_u64().unwrap() > 0, "{report}");
    assert!(report["host"]["punches"].as_u64().unwrap() > 0, "{report}");
}

/// `gmem run --huge-pages DIR --json` reports KVM's 2 MiB mappings; what
/// this host does not offer is a bad argument (status 2) with the reason.
#[test]
fn run_on_huge_pages_reports_kvm_mappings_and_refuses_what_is_not_offered() {
    if !kvm() {
        return;
    }
    let mount = gmem::TmpfsMount::huge(512 << 20).expect("mount a huge tmpfs (root)");
    let dir = mount.path().to_str().unwrap();
    let out = gmem(&["run", "--guest", "touch", "--huge-pages", dir, "--json"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let stats = &json(&out)["stats"];
    assert!(stats["kvm_pages_2m"].as_u64().unwrap() >= 25, "{stats}");
    assert!(stats["huge_mapped_bytes"].as_u64().unwrap() >= 50 << 20, "{stats}");
    // And on 4 KiB pages, none.
    let small = json(&gmem(&["run", "--guest", "touch", "--backend", "userspace", "--json"]));
    assert_eq!(small["stats"]["huge_mapped_bytes"], 0, "{small}");

    let plain = gmem::TmpfsMount::new(64 << 20, "huge=never").unwrap();
    for (args, why) in [
        (vec!["--huge-pages", "/proc"], "not on a tmpfs"),
        (vec!["--huge-pages", plain.path().to_str().unwrap()], "huge=never"),
        (vec!["--huge-pages", dir, "--backend", "native"], "needs the user-space backend"),
    ] {
        let out = gmem(&[&["run"][..], &args].concat());
        assert_eq!(status(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{args:?}: {}", stderr(&out));
    }
    // hugetlbfs: refused with the reason where the host has no free pages.
    if gmem::HugePages::HugeTlb.offered().is_err() {
        let out = gmem(&["run", "--huge-pages", "hugetlb"]);
        assert_eq!(status(&out), 2, "{}", stderr(&out));
        assert!(stderr(&out).contains("not enough free huge pages"), "{}", stderr(&out));
    }
    let out = gmem(&["stress", "--duration", "1s", "--huge-pages", "/proc"]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
}

//! No private bytes leave through the process's side doors: forked
//! children, core dumps, and (with `harden_process`) dumps at all.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::{kvm, RAM};
use gmem_runner::{Gpa, GuestImage, RunConfig, Vm};

/// Where the token goes: in the 2 MiB batch the `punch` guest touches, so
/// it is mapped in KVM's window too, not only in the locked frame window.
const TOKEN_GPA: u64 = 0x6F_0000;

/// A token made at run time, so that no copy of it sits in the binary.
fn token() -> Vec<u8> {
    format!("GMEM-PRIVATE-TOKEN-{:08x}", std::process::id() ^ 0x5a5a_a5a5).into_bytes()
}

/// Populates the token into private memory, then wipes the source buffer:
/// afterwards the token exists only in guest memory.
fn plant_token(vm: &Vm) {
    let mut token = token();
    vm.populate(Gpa(TOKEN_GPA), &token).unwrap();
    for byte in token.iter_mut() {
        // SAFETY: a valid, exclusive reference to a byte of `token`.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
}

/// Address ranges of every mapping of the guest-RAM memfd in this process.
fn guest_mappings() -> Vec<(usize, usize)> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| line.contains("/memfd:gmem-guest-ram"))
        .map(|line| {
            let range = line.split_whitespace().next().unwrap();
            let (start, end) = range.split_once('-').unwrap();
            (usize::from_str_radix(start, 16).unwrap(), usize::from_str_radix(end, 16).unwrap())
        })
        .collect()
}

/// A child forked after the guest ran has none of guest memory's mappings:
/// the kernel cannot even copy a byte from where they were (EFAULT).
#[test]
fn a_forked_child_cannot_read_guest_memory() {
    if !kvm() {
        return;
    }
    let (vm, _file) = Vm::with_ram(RAM).unwrap();
    plant_token(&vm);
    let image = GuestImage::parse(gmem_guest::guest("punch").unwrap(), RAM).unwrap();
    vm.load(&image, RAM, 1).unwrap();
    vm.run(&image, RAM, &common::config(1), &|_, _| {}).unwrap();
    let mappings = guest_mappings();
    assert!(mappings.len() >= 3, "frame window, KVM window, host view: {mappings:?}");
    let mut pipe = [0; 2];
    // SAFETY: creates a pipe into the two-element array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // Whether the kernel can copy one byte from `addr`: write(2) into the
    // pipe (EFAULT where nothing is mapped), then drain it.
    let readable = |addr: usize| {
        let mut byte = 0u8;
        // SAFETY: write(2) reads user memory through the kernel's checked
        // copy: EFAULT for an unmapped address, never a fault.
        let copied = unsafe { libc::write(pipe[1], addr as *const libc::c_void, 1) } == 1;
        // SAFETY: read(2) fills one byte of a local.
        copied && unsafe { libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1) } == 1
    };
    // The frame window holds the token and is readable here: the probe
    // can tell readable from not.
    assert!(mappings.iter().any(|&(start, _)| readable(start)));
    // SAFETY: the child makes only async-signal-safe calls (write, read,
    // _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let leaked =
            mappings.iter().flat_map(|&(start, end)| (start..end).step_by(4096)).any(readable);
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(i32::from(leaked)) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child could read guest memory ({status:#x})"
    );
}

/// Run as a child process by the tests below: plants the token, runs the
/// `punch` guest and aborts in the middle of the run (at its sync point),
/// with a control token in ordinary heap memory. `harden` first makes the
/// process non-dumpable.
#[test]
#[ignore = "run as a child process by the core dump tests"]
fn core_dump_child() {
    let Ok(mode) = std::env::var("GMEM_CORE_CHILD") else { return };
    if mode == "harden" {
        gmem_kvm::harden::harden_process().unwrap();
    }
    let rlimit = rustix::process::Rlimit { current: None, maximum: None };
    rustix::process::setrlimit(rustix::process::Resource::Core, rlimit).unwrap();
    let control = std::hint::black_box(b"GMEM-CONTROL-HEAP-TOKEN".repeat(4));
    let (vm, _file) = Vm::with_ram(RAM).unwrap();
    plant_token(&vm);
    let image = GuestImage::parse(gmem_guest::guest("punch").unwrap(), RAM).unwrap();
    vm.load(&image, RAM, 1).unwrap();
    let _ = vm.run(&image, RAM, &RunConfig::new(1), &|_, _| std::process::abort());
    drop(control);
}

/// Runs the child in a fresh directory; returns the core file's bytes, if
/// one was written. `None` from the outer option: core dumps do not land
/// in the working directory on this host (the test says so and skips).
fn crash_child(mode: &str) -> Option<Option<Vec<u8>>> {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    if pattern.trim() != "core" {
        eprintln!("SKIPPED: core_pattern is {pattern:?}, not \"core\": cores do not land here");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("gmem-core-{mode}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "core_dump_child", "--ignored", "--nocapture"])
        .env("GMEM_CORE_CHILD", mode)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let core = std::fs::read(dir.join("core")).ok();
    let _ = std::fs::remove_dir_all(&dir);
    Some(core)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A VMM killed mid-run dumps core without the guest's private bytes (its
/// heap is in the dump: the control token shows the dump is real).
#[test]
fn a_core_dump_holds_no_guest_memory() {
    if !kvm() {
        return;
    }
    let Some(core) = crash_child("plain") else { return };
    let core = core.expect("the child dumped core");
    assert!(contains(&core, b"GMEM-CONTROL-HEAP-TOKEN"), "the dump holds ordinary memory");
    assert!(!contains(&core, b"GMEM-PRIVATE-TOKEN-"), "the dump holds guest memory");
}

/// After `harden_process`, a crash dumps no core at all.
#[test]
fn a_hardened_vmm_dumps_no_core() {
    if !kvm() {
        return;
    }
    let Some(core) = crash_child("harden") else { return };
    assert!(core.is_none(), "a non-dumpable process dumped core");
}

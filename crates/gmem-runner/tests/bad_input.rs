//! Bad input to the KVM side: each gets the errno the kernel would give, and
//! nothing hangs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{kvm, RAM};
use gmem::{Errno, FileOffset, PrivateMemFile, PAGE_SIZE};
use gmem_runner::{Gpa, GuestImage, Outcome, RunConfig, Vm};

fn guest_file(size: u64) -> Arc<PrivateMemFile> {
    let file = Arc::new(PrivateMemFile::new_guest("bad").unwrap());
    file.set_len(size).unwrap();
    file
}

#[test]
fn memslot_errors() {
    if !kvm() {
        return;
    }
    let vm = Vm::new().unwrap();
    let file = guest_file(16 << 20);
    vm.add_private_memory(Gpa(0), &file, FileOffset(0), 8 << 20).unwrap();
    let errno = |r: gmem_kvm::Result<u32>| r.unwrap_err().errno();
    // Overlapping GPAs (another file).
    let other = guest_file(16 << 20);
    assert_eq!(
        errno(vm.add_private_memory(Gpa(4 << 20), &other, FileOffset(0), 8 << 20)),
        Errno::EXIST
    );
    // The same file range bound twice, at another GPA: EINVAL, as the
    // kernel's guest_memfd answers (measured on Linux 6.18).
    assert_eq!(
        errno(vm.add_private_memory(Gpa(32 << 20), &file, FileOffset(4 << 20), 8 << 20)),
        Errno::INVAL
    );
    // Unaligned GPA, offset, size; empty.
    assert_eq!(
        errno(vm.add_private_memory(Gpa(32 << 20 | 1), &file, FileOffset(8 << 20), PAGE_SIZE)),
        Errno::INVAL
    );
    assert_eq!(
        errno(vm.add_private_memory(Gpa(32 << 20), &file, FileOffset(8 << 20 | 5), PAGE_SIZE)),
        Errno::INVAL
    );
    assert_eq!(
        errno(vm.add_private_memory(Gpa(32 << 20), &file, FileOffset(8 << 20), 100)),
        Errno::INVAL
    );
    assert_eq!(
        errno(vm.add_private_memory(Gpa(32 << 20), &file, FileOffset(8 << 20), 0)),
        Errno::INVAL
    );
    // Past the end of the file.
    assert_eq!(
        errno(vm.add_private_memory(Gpa(32 << 20), &file, FileOffset(12 << 20), 8 << 20)),
        Errno::INVAL
    );
    // A file owned by another VM.
    let vm2 = Vm::new().unwrap();
    assert_eq!(
        errno(vm2.add_private_memory(Gpa(0), &file, FileOffset(8 << 20), 8 << 20)),
        Errno::PERM
    );
    // An unsealed file cannot be guest memory.
    let plain = Arc::new(PrivateMemFile::new("plain").unwrap());
    plain.set_len(8 << 20).unwrap();
    assert_eq!(errno(vm2.add_private_memory(Gpa(0), &plain, FileOffset(0), 8 << 20)), Errno::INVAL);
    // The rest of the file is still usable by the first VM.
    vm.add_private_memory(Gpa(8 << 20), &file, FileOffset(8 << 20), 8 << 20).unwrap();
}

#[test]
fn bad_images_are_refused() {
    let errno = |bytes: &[u8], ram| GuestImage::parse(bytes, ram).unwrap_err();
    assert_eq!(errno(b"not an elf", RAM).errno(), Errno::NOEXEC);
    assert_eq!(errno(&[], RAM).errno(), Errno::NOEXEC);
    let demo = gmem_guest::demo();
    // Too little RAM for the image's segments.
    let err = errno(demo, 0x20_1000);
    assert!(err.to_string().contains("does not fit"), "{err}");
    // A segment below 0x200000: move the first program header's paddr.
    let mut low = demo.to_vec();
    let phoff = u64::from_le_bytes(low[32..40].try_into().unwrap()) as usize;
    low[phoff + 24..phoff + 32].copy_from_slice(&0x1000u64.to_le_bytes());
    let err = errno(&low, RAM);
    assert!(err.to_string().contains("below 0x200000"), "{err}");
    // Truncated file.
    assert_eq!(errno(&demo[..100], RAM).errno(), Errno::NOEXEC);
}

#[test]
fn bad_machine_sizes_are_refused() {
    if !kvm() {
        return;
    }
    let (vm, _f) = Vm::with_ram(RAM).unwrap();
    let image = GuestImage::parse(gmem_guest::demo(), RAM).unwrap();
    assert_eq!(vm.load(&image, RAM, 0).unwrap_err().errno(), Errno::INVAL);
    assert_eq!(vm.load(&image, RAM + 4096, 1).unwrap_err().errno(), Errno::INVAL);
    // RAM not covered by memslots.
    assert_eq!(vm.load(&image, 2 * RAM, 1).unwrap_err().errno(), Errno::INVAL);
}

#[test]
fn a_guest_that_never_exits_times_out_without_hanging() {
    if !kvm() {
        return;
    }
    let (vm, _f) = Vm::with_ram(RAM).unwrap();
    let image = GuestImage::parse(gmem_guest::guest("spin").unwrap(), RAM).unwrap();
    vm.load(&image, RAM, 2).unwrap();
    let config = RunConfig { timeout: Some(Duration::from_millis(500)), ..RunConfig::new(2) };
    let start = Instant::now();
    let report = vm.run(&image, RAM, &config, &|_, _| {}).unwrap();
    assert_eq!(report.outcome, Outcome::Timeout);
    assert!(start.elapsed() < Duration::from_secs(30), "stopping took {:?}", start.elapsed());
    // Both vCPUs printed their line (bytes interleave).
    assert_eq!(report.console.len(), 2 * "spin: looping forever\n".len());
}

#[test]
fn an_unknown_port_stops_the_vm_with_its_number_and_rip() {
    if !kvm() {
        return;
    }
    let (vm, _f) = Vm::with_ram(RAM).unwrap();
    let image = GuestImage::parse(gmem_guest::guest("badport").unwrap(), RAM).unwrap();
    vm.load(&image, RAM, 1).unwrap();
    let config = RunConfig { timeout: Some(Duration::from_secs(30)), ..RunConfig::new(1) };
    let report = vm.run(&image, RAM, &config, &|_, _| {}).unwrap();
    match report.outcome {
        Outcome::Error(message) => {
            assert!(
                message.contains("unknown port 0x80") && message.contains("RIP 0x2"),
                "{message}"
            )
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

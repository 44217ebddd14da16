//! Bad input to the KVM side: each gets the errno the kernel would give, and
//! nothing hangs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guest_file, kvm, RAM};
use gmem::{Errno, FileOffset, PrivateMemFile, PAGE_SIZE};
use gmem_runner::{Gpa, GuestImage, Outcome, RunConfig, Vm};

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
    // Program header fields, by offset in the first program header.
    let with = |offset: usize, value: u64| {
        let mut image = demo.to_vec();
        image[phoff + offset..phoff + offset + 8].copy_from_slice(&value.to_le_bytes());
        image
    };
    // Field `field` of program header `i`.
    let at = |i: usize, field: usize| {
        let o = phoff + i * 56 + field;
        u64::from_le_bytes(demo[o..o + 8].try_into().unwrap())
    };
    let (paddr, filesz) = (at(0, 24), at(0, 32));
    assert!(filesz > 0);
    // File bytes but no memory: refused, not skipped.
    let err = errno(&with(40, 0), RAM);
    assert!(err.to_string().contains("no memory size"), "{err}");
    // Virtual and physical addresses differ (GUEST_ABI: virtual = physical).
    let err = errno(&with(16, paddr + 0x1000), RAM);
    assert!(err.to_string().contains("virtual equals physical"), "{err}");
    // The highest loadable segment, made to reach up to the end of RAM:
    // it fits in RAM but runs over the vCPU stacks.
    let phnum = u16::from_le_bytes(demo[56..58].try_into().unwrap()) as usize;
    let last = (0..phnum).filter(|&i| at(i, 0) as u32 == 1).max_by_key(|&i| at(i, 24)).unwrap();
    let mut long = demo.to_vec();
    let o = phoff + last * 56 + 40;
    long[o..o + 8].copy_from_slice(&(RAM - at(last, 24)).to_le_bytes());
    let long = GuestImage::parse(&long, RAM).unwrap();
    let err = gmem_runner::boot::check_layout(&long, RAM, 1).unwrap_err();
    assert_eq!(err.errno(), Errno::NOEXEC);
    assert!(err.to_string().contains("vCPU stacks"), "{err}");
    gmem_runner::boot::check_layout(&GuestImage::parse(demo, RAM).unwrap(), RAM, 255).unwrap();
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
    // Whatever the vCPUs printed before the timeout is made of their line's
    // bytes (they interleave), at most twice over.
    let line = b"spin: looping forever\n";
    assert!(report.console.len() <= 2 * line.len());
    assert!(report.console.iter().all(|b| line.contains(b)), "{:?}", report.console);
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

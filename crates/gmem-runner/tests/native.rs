//! The kernel's guest_memfd side by side with gmem: probing, and the same
//! operations on both with their errnos compared.

mod common;

use common::kvm;
use gmem::Errno;
use gmem_kvm::native;
use gmem_runner::conformance;

#[test]
fn probe_reports_what_the_kernel_does() {
    if !kvm() {
        return;
    }
    let support = native::probe().unwrap();
    eprintln!("{support:#?}");
    // The native run path is not built: the probe refuses it, and names the
    // first thing this host lacks, from what it found.
    let why = support.usable().unwrap_err();
    let expected = if !support.guest_memfd {
        "KVM_CAP_GUEST_MEMFD"
    } else if support.serves_guest.is_err() {
        "could not check"
    } else if support.serves_guest == Ok(false) {
        "guests read userspace_addr"
    } else if support.memory_attributes & u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0
    {
        "KVM_CAP_MEMORY_ATTRIBUTES"
    } else {
        "not built"
    };
    assert!(why.contains(expected), "{why} (expected it to name {expected})");
    if support.guest_memfd && support.guest_memfd_flags & native::GUEST_MEMFD_FLAG_MMAP != 0 {
        assert!(support.serves_guest.is_ok(), "the probe guest ran: {:?}", support.serves_guest);
    }
}

#[test]
fn gmem_matches_guest_memfd_or_differs_deliberately() {
    if !kvm() {
        return;
    }
    let support = native::probe().unwrap();
    if !support.guest_memfd {
        eprintln!("SKIPPED: this kernel has no guest_memfd to compare with");
        return;
    }
    let results = conformance::compare().unwrap();
    for c in &results {
        eprintln!(
            "{:45} kernel {:?} gmem {:?} {}",
            c.name,
            c.kernel,
            c.gmem,
            c.deliberate.map_or("", |d| d.why)
        );
    }
    let failed: Vec<_> = results.iter().filter(|c| !c.conforms()).collect();
    assert!(failed.is_empty(), "undocumented differences: {failed:#?}");
    // Spot checks against the kernel's documented behaviour.
    let by_name = |name: &str| results.iter().find(|c| c.name == name).unwrap();
    assert_eq!(by_name("bind the same file range twice").kernel, Some(Errno::INVAL));
    assert_eq!(by_name("bind another file range over a bound GPA range").gmem, Some(Errno::EXIST));
    assert_eq!(by_name("punch an unaligned offset").gmem, Some(Errno::INVAL));
    assert_eq!(by_name("read").gmem, Some(Errno::PERM));
    assert_eq!(by_name("punch after the VM is gone").gmem, None);
    // A deliberate difference passes only with the answer it names: a write
    // to a sealed file that succeeded would fail the row.
    let mut write = by_name("write").clone();
    assert!(write.conforms());
    write.gmem = None;
    assert!(!write.conforms(), "a sealed file that took a write must not pass");
    write.gmem = Some(Errno::INVAL);
    assert!(!write.conforms());
}

#[test]
fn guest_memfd_answers_as_its_selftests_expect() {
    if !kvm() {
        return;
    }
    if !native::probe().unwrap().guest_memfd {
        eprintln!("SKIPPED: this kernel has no guest_memfd");
        return;
    }
    let mut seen = Vec::new();
    for c in conformance::compare().unwrap() {
        seen.push((c.name.to_string(), c.expected, c.kernel));
    }
    for k in conformance::kernel_only().unwrap() {
        seen.push((k.name, k.expected, k.kernel));
    }
    assert!(seen.len() > 25, "{seen:?}");
    let wrong: Vec<_> = seen.iter().filter(|(_, expected, got)| !expected.matches(*got)).collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

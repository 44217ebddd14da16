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
    // Whatever the host, the native backend is only offered when it both
    // serves guests from guest_memfd and can make pages private; the reason
    // is always given.
    let why = support.usable().unwrap_err();
    assert!(!why.is_empty());
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
            c.deliberate.unwrap_or("")
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

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
    // The native backend runs where guest_memfd can be created mappable
    // and shared and bound with USER_MEMORY2; else the probe names the first
    // thing this host lacks, from what it found.
    let needed = native::GUEST_MEMFD_FLAG_MMAP | native::GUEST_MEMFD_FLAG_INIT_SHARED;
    let missing = if !support.guest_memfd {
        Some("KVM_CAP_GUEST_MEMFD")
    } else if !support.user_memory2 {
        Some("KVM_CAP_USER_MEMORY2")
    } else if support.guest_memfd_flags & needed != needed {
        Some("MMAP|INIT_SHARED")
    } else {
        None
    };
    match (missing, support.usable()) {
        (None, Ok(())) => {}
        (Some(expected), Err(why)) => {
            assert!(why.contains(expected), "{why} (expected it to name {expected})")
        }
        (missing, usable) => panic!("probe says {usable:?}, but the host lacks {missing:?}"),
    }
    if support.guest_memfd && support.guest_memfd_flags & native::GUEST_MEMFD_FLAG_MMAP != 0 {
        assert!(support.serves_guest.is_ok(), "the probe guest ran: {:?}", support.serves_guest);
    }
}

/// The side-by-side table without the kernel's half, as on a host with no
/// guest_memfd: on every host, gmem answers as the kernel's source
/// expects, or exactly as its documented difference says.
#[test]
fn gmem_alone_answers_as_the_kernel_source_expects() {
    if !kvm() {
        return;
    }
    let results = conformance::compare(false).unwrap();
    assert!(results.len() >= 20, "{results:#?}");
    assert!(results.iter().all(|c| c.kernel.is_none()), "the kernel was not asked");
    let failed: Vec<_> = results.iter().filter(|c| !c.conforms()).collect();
    assert!(failed.is_empty(), "gmem differs from the expectation: {failed:#?}");
    let by_name = |name: &str| results.iter().find(|c| c.name == name).unwrap();
    assert_eq!(by_name("bind an unaligned offset").gmem, Some(Errno::INVAL));
    assert_eq!(by_name("bind to another VM").gmem, Some(Errno::PERM));
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
    let results = conformance::compare(true).unwrap();
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
    assert_eq!(by_name("bind the same file range twice").kernel, Some(Some(Errno::INVAL)));
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
    use gmem_runner::check::Status;
    let rows = gmem_runner::selftests::run().unwrap();
    assert!(rows.len() > 30, "{rows:#?}");
    let failed: Vec<_> = rows.iter().filter(|r| r.status == Status::Fail).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    // Every row names where its expectation comes from, or why it cannot run.
    for r in &rows {
        assert!(
            r.detail.contains(".c")
                || r.detail.contains("kernel source")
                || r.detail.contains("NUMA"),
            "{r:?}"
        );
    }
    // What cannot run here is unsupported with the missing capability named.
    let names: Vec<_> =
        rows.iter().filter(|r| r.status == Status::Unsupported).map(|r| &r.detail).collect();
    for r in &names {
        assert!(!r.is_empty());
    }
}

/// The native backend's region: guest_memfd pages under gmem's states. The
/// host reaches shared pages only (both paths), conversions discard in
/// place, punches read zero, listeners hear of it, and the mapping is kept
/// out of dumps and children.
#[test]
fn native_regions_keep_gmem_states() {
    if !kvm() {
        return;
    }
    if let Err(why) = native::probe().unwrap().usable() {
        eprintln!("SKIPPED: the native backend cannot run here: {why}");
        return;
    }
    use gmem_kvm::{MemoryListener, PageState};
    use gmem_runner::{Gpa, Vm};
    use vm_memory::{Bytes, GuestAddress};
    #[derive(Default)]
    struct Discards(std::sync::Mutex<Vec<(u64, u64)>>);
    impl MemoryListener for Discards {
        fn discarded(&self, gpa: Gpa, len: u64) {
            self.0.lock().unwrap().push((gpa.0, len));
        }
    }
    const PAGE: u64 = 0x60_0000;
    let vm = Vm::with_native_ram(64 << 20).unwrap();
    let memory = vm.memory();
    assert_eq!(memory.regions()[0].backend(), gmem_kvm::BackendKind::Native);
    assert!(memory.regions()[0].file().is_none());
    let discards = std::sync::Arc::new(Discards::default());
    memory.add_listener(discards.clone());
    memory.populate(Gpa(PAGE), b"private secret").unwrap();
    assert_eq!(memory.read(Gpa(PAGE), &mut [0; 8]).unwrap_err().errno(), Errno::PERM);
    assert!(memory.shared().read_obj::<u64>(GuestAddress(PAGE)).is_err());
    // Private to shared: discarded, reads zero, then host bytes both ways.
    assert_eq!(memory.convert(Gpa(PAGE), 0x2000, PageState::Shared).unwrap(), 2);
    let mut buf = [0xffu8; 14];
    memory.read(Gpa(PAGE), &mut buf).unwrap();
    assert_eq!(buf, [0; 14], "the private bytes are gone");
    memory.write(Gpa(PAGE + 8), b"from host").unwrap();
    assert_eq!(memory.shared().read_obj::<u8>(GuestAddress(PAGE + 8)).unwrap(), b'f');
    // A punch reads zero; the listener heard of both discards.
    memory.punch(Gpa(PAGE), 0x1000).unwrap();
    memory.read(Gpa(PAGE + 8), &mut buf[..9]).unwrap();
    assert_eq!(&buf[..9], &[0; 9]);
    assert_eq!(*discards.0.lock().unwrap(), [(PAGE, 0x2000), (PAGE, 0x1000)]);
    // Back to private: refused again; bad requests are EINVAL.
    memory.convert(Gpa(PAGE), 0x2000, PageState::Private).unwrap();
    assert_eq!(memory.write(Gpa(PAGE), b"x").unwrap_err().errno(), Errno::PERM);
    assert_eq!(
        memory.convert(Gpa(PAGE + 1), 4096, PageState::Shared).unwrap_err().errno(),
        Errno::INVAL
    );
    assert_eq!(memory.punch(Gpa(64 << 20), 4096).unwrap_err().errno(), Errno::INVAL);
    // The guest_memfd mapping is locked, and out of dumps and children.
    let entry = common::smaps_entry(memory.regions()[0].userspace_addr());
    let flags = entry.iter().find(|l| l.starts_with("VmFlags")).expect("the mapping's VmFlags");
    for flag in [" dc", " dd", " lf"] {
        assert!(flags.contains(flag), "{flag} missing: {flags}");
    }
}

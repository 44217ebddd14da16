//! The example VMM boots the demo guest on gmem memory (needs /dev/kvm).

#[test]
fn the_example_vmm_boots_the_demo_guest() {
    if !gmem_kvm::test_support::kvm_available() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gmem-example-vmm")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}: {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("hello from the guest, through a shared page"), "{stdout}");
}

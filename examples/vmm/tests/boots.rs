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

/// With `--disk`, the example VMM wires the virtio-blk device into its own
/// loop: the `disk` guest writes, flushes and reads back, twice, the second
/// run finding the first's data.
#[test]
fn the_example_vmm_runs_the_disk_guest_twice() {
    if !gmem_kvm::test_support::kvm_available() {
        return;
    }
    let disk = std::env::temp_dir().join(format!("gmem-example-disk-{}", std::process::id()));
    let _ = std::fs::remove_file(&disk);
    for run in 1..=2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gmem-example-vmm"))
            .args(["--disk", disk.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "run {run}: {:?}: {stderr}", out.status);
        assert!(stderr.contains(&format!("disk: run {run}:")), "{stderr}");
    }
    let _ = std::fs::remove_file(&disk);
}

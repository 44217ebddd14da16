//! Builds the guest programs in `guests/` as static x86-64 ELF images with
//! the same rustc that builds this crate (no nested cargo, no other
//! toolchain), and embeds them. Each guest is one no_std file plus `rt.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let dir = Path::new("guests");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let script = std::fs::canonicalize(dir.join("guest.ld")).expect("guest.ld");
    println!("cargo:rerun-if-changed=guests");
    println!("cargo:rerun-if-changed=../gmem-boot/src/abi.rs");

    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("guests/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".rs").map(str::to_owned))
        .filter(|n| !["rt", "virtio", "stress_layout", "huge_layout"].contains(&n.as_str()))
        .collect();
    names.sort();

    let mut table = String::from(
        "/// Every built-in guest program, by name.\npub const GUESTS: &[(&str, &[u8])] = &[\n",
    );
    for name in &names {
        let elf = out.join(format!("{name}.elf"));
        let status = Command::new(&rustc)
            .args(["--edition", "2021", "--crate-type", "bin", "--crate-name", name])
            .args([
                "-C",
                "panic=abort",
                "-C",
                "opt-level=2",
                "-C",
                "debuginfo=0",
                "-C",
                "strip=symbols",
            ])
            .args(["-C", "relocation-model=static", "-C", "target-cpu=x86-64"])
            // No SSE: KVM on kvm_pvm hosts fails to run guest SSE instructions
            // (emulation failure). The guests use no floating point, and
            // rt.rs avoids core::fmt, whose precompiled code uses SSE.
            .args(["-C", "target-feature=-sse,-sse2"])
            .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
            .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
            .args(["-C", "link-arg=-Wl,--build-id=none"])
            .arg("-C")
            .arg(format!("link-arg=-Wl,-T,{}", script.display()))
            .arg("-o")
            .arg(&elf)
            .arg(dir.join(format!("{name}.rs")))
            .status()
            .expect("running rustc for a guest program");
        assert!(status.success(), "building guest program {name} failed");
        table.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            elf.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("guests.rs"), table).expect("writing guests.rs");
}

//! Running the `gmem` binary in tests.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

pub use gmem_kvm::test_support::kvm_available as kvm;

pub fn gmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmem")).args(args).output().expect("running gmem")
}

pub fn status(out: &Output) -> i32 {
    out.status.code().expect("gmem exited normally")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

/// Waits for `child` at most a minute (a hang guard, not a timing check).
pub fn finish(mut child: std::process::Child) -> Output {
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("gmem hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

pub fn gmem_bounded(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    finish(child)
}

/// A directory of the test's own, removed on drop, with a key in it.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gmem-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("key"), [0x42u8; 32]).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }

    pub fn key(&self) -> String {
        self.path("key")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `gmem run --json` with `args`, bounded.
pub fn run_json(args: &[&str]) -> Output {
    gmem_bounded(&[&["run", "--json"][..], args].concat())
}

/// The guest's console of a `--json` run.
pub fn console(out: &Output) -> String {
    json(out)["console"].as_str().unwrap().to_owned()
}

/// Asserts that the consoles and syncs of `first` and `then` (one guest
/// run in two parts: saved and resumed, migrated) add up to `whole`'s.
pub fn assert_adds_up(first: &Output, then: &Output, whole: &Output, what: &str) {
    assert_eq!(console(first) + &console(then), console(whole), "{what}: the consoles differ");
    let syncs = |out: &Output| json(out)["syncs"].as_array().unwrap().clone();
    assert_eq!([syncs(first), syncs(then)].concat(), syncs(whole), "{what}: the syncs differ");
}

/// Host accesses around the convert guest's stages: it shares 0x600000 at
/// stage 1 and takes it back at stage 2; 0x601000 stays private. Stage
/// 1's come first: [`CONVERT_STAGE_1`] of them.
pub const CONVERT_SYNCS: [&str; 8] = [
    "--sync",
    "1:read:0x600000:11",
    "--sync",
    "1:write:0x600040:686f73742d3e6775",
    "--sync",
    "1:read:0x601000:8",
    "--sync",
    "2:read:0x600000:8",
];

/// How many of [`CONVERT_SYNCS`] are stage 1's.
pub const CONVERT_STAGE_1: usize = 6;

//! The seed's own tests as checks anyone can run on a host: its user-space
//! test program (with each `#if 0` variant) and its debugfs harness flow.
//! `gmem check` reports them; the test suite requires them to pass.
//!
//! ```
//! for check in gmem::seed::checks() {
//!     assert!(check.outcome.is_ok(), "{}: {:?}", check.name, check.outcome);
//! }
//! ```

use std::sync::{Arc, Mutex};

use crate::{Errno, FileId, FileOffset, GuestOwner, PageIndex, PageRange, PrivateMemFile, Seals};

/// One seed flow and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedCheck {
    /// The flow.
    pub name: &'static str,
    /// The errno the flow is about, where it expects one.
    pub errno: Option<Errno>,
    /// What was seen: `Ok` when it went as the seed says, `Err` why not.
    pub outcome: Result<String, String>,
}

/// Runs every seed flow.
pub fn checks() -> Vec<SeedCheck> {
    vec![
        check("seed test program", Some(Errno::PERM), test_program),
        check("seed #if 0: write before the GUEST seal", Some(Errno::BUSY), seal_after_write),
        check(
            "seed #if 0: ftruncate before the GUEST seal",
            Some(Errno::BUSY),
            seal_after_truncate,
        ),
        check("seed #if 0: mmap before the GUEST seal", Some(Errno::BUSY), seal_while_mapped),
        check("seed debugfs harness flow", None, debugfs_harness),
    ]
}

type Flow = fn() -> Result<String, String>;

fn check(name: &'static str, errno: Option<Errno>, flow: Flow) -> SeedCheck {
    SeedCheck { name, errno, outcome: flow() }
}

/// An owner that records the invalidations it is told about.
#[derive(Default)]
struct Recorder(Mutex<Vec<(FileId, PageRange)>>);

impl GuestOwner for Recorder {
    fn invalidate_page_range(&self, file: FileId, pages: PageRange) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((file, pages));
    }
}

/// `Ok` if `result` failed with `errno`.
fn expect_errno<T>(what: &str, result: crate::Result<T>, errno: Errno) -> Result<(), String> {
    match result {
        Err(e) if e.errno() == errno => Ok(()),
        Err(e) => Err(format!("{what}: {e} ({}), expected {errno}", e.errno())),
        Ok(_) => Err(format!("{what} succeeded, expected {errno}")),
    }
}

fn ok<T>(what: &str, result: crate::Result<T>) -> Result<T, String> {
    result.map_err(|e| format!("{what}: {e}"))
}

/// The seed's program: seal, size, host read/write/mmap refused (EPERM),
/// bind, get-and-lock pages 0x100 and 0x1, truncate to 0, unbind.
fn test_program() -> Result<String, String> {
    let file = Arc::new(ok("memfd_create", PrivateMemFile::new("memfd_guest"))?);
    ok("F_SEAL_GUEST", file.add_seals(Seals::GUEST))?;
    ok("ftruncate", file.set_len(2 << 20))?;
    expect_errno("write", file.write_at(b"test", FileOffset(0)), Errno::PERM)?;
    expect_errno("read", file.read_at(&mut [0; 4], FileOffset(0)), Errno::PERM)?;
    expect_errno("mmap", file.map(FileOffset(0), 4096, false), Errno::PERM)?;
    let owner = Arc::new(Recorder::default());
    let binding = ok("bind", file.bind(&owner))?;
    for page in [0x100, 0x1] {
        drop(ok("get-and-lock", binding.get_and_lock(PageIndex(page)))?);
    }
    ok("truncate to 0", file.set_len(0))?;
    drop(binding);
    let allocated = file.stats().allocated_pages;
    if file.is_bound() || allocated != 0 {
        return Err(format!("after unbind: bound {}, {allocated} pages", file.is_bound()));
    }
    Ok("host read/write/mmap EPERM; bind, 2 pages locked, truncated, unbound".into())
}

fn seal_after_write() -> Result<String, String> {
    let file = ok("memfd_create", PrivateMemFile::new("memfd_guest"))?;
    ok("write", file.write_at(b"test", FileOffset(0)))?;
    expect_errno("F_SEAL_GUEST after a write", file.add_seals(Seals::GUEST), Errno::BUSY)?;
    Ok("sealing a written file is EBUSY".into())
}

fn seal_after_truncate() -> Result<String, String> {
    let file = ok("memfd_create", PrivateMemFile::new("memfd_guest"))?;
    ok("ftruncate", file.set_len(4096))?;
    expect_errno("F_SEAL_GUEST after ftruncate", file.add_seals(Seals::GUEST), Errno::BUSY)?;
    ok("ftruncate to 0", file.set_len(0))?;
    ok("F_SEAL_GUEST at size 0", file.add_seals(Seals::GUEST))?;
    Ok("sealing a sized file is EBUSY; at size 0 it works".into())
}

fn seal_while_mapped() -> Result<String, String> {
    let file = ok("memfd_create", PrivateMemFile::new("memfd_guest"))?;
    let map = ok("mmap", file.map(FileOffset(0), 4096, false))?;
    expect_errno("F_SEAL_GUEST while mapped", file.add_seals(Seals::GUEST), Errno::BUSY)?;
    drop(map);
    ok("F_SEAL_GUEST after munmap", file.add_seals(Seals::GUEST))?;
    Ok("sealing a mapped file is EBUSY; after munmap it works".into())
}

/// The debugfs harness: bind, get-and-lock 0x100 and 0x1 (each a real
/// frame), truncate to 0: the callback sees exactly those two pages.
fn debugfs_harness() -> Result<String, String> {
    let file = Arc::new(ok("memfd_create", PrivateMemFile::new_guest("memfd_guest"))?);
    ok("ftruncate", file.set_len(2 << 20))?;
    let owner = Arc::new(Recorder::default());
    let binding = ok("bind", file.bind(&owner))?;
    let mut frames = Vec::new();
    for page in [0x100, 0x1] {
        let guard = ok("get-and-lock", binding.get_and_lock(PageIndex(page)))?;
        frames.extend(ok("frames", guard.frames())?);
    }
    ok("truncate to 0", file.set_len(0))?;
    let seen: Vec<PageRange> =
        owner.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, r)| *r).collect();
    let expected = [0x1, 0x100].map(|p| PageRange::new(PageIndex(p), PageIndex(p + 1))).to_vec();
    if seen != expected {
        return Err(format!("invalidations {seen:?}, expected {expected:?}"));
    }
    drop(binding);
    if file.is_bound() {
        return Err("still bound after the binding was dropped".into());
    }
    let frames: Vec<String> =
        frames.iter().map(|&f| if f == 0 { "hidden".into() } else { format!("{f:#x}") }).collect();
    Ok(format!("frames {}; invalidated exactly pages 0x1 and 0x100", frames.join(", ")))
}

//! Helpers shared by the core's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};

use gmem::{Errno, FileId, GuestOwner, PageRange, PrivateMemFile, Result, Seals};

/// An owner that records every invalidation it is told about.
#[derive(Default)]
pub struct Recorder {
    pub seen: Mutex<Vec<(FileId, PageRange)>>,
}

impl GuestOwner for Recorder {
    fn invalidate_page_range(&self, file: FileId, pages: PageRange) {
        self.seen.lock().unwrap().push((file, pages));
    }
}

impl Recorder {
    pub fn ranges(&self) -> Vec<PageRange> {
        self.seen.lock().unwrap().iter().map(|(_, r)| *r).collect()
    }
}

/// A GUEST-sealed file of `size` bytes.
pub fn guest_file(size: u64) -> Arc<PrivateMemFile> {
    let file = Arc::new(PrivateMemFile::new("test").unwrap());
    file.add_seals(Seals::GUEST).unwrap();
    file.set_len(size).unwrap();
    file
}

/// The errno of a result that must be an error.
pub fn errno<T: std::fmt::Debug>(result: Result<T>) -> Errno {
    result.expect_err("the operation must fail").errno()
}

//! The memlock limit, alone in its own test binary: `RLIMIT_MEMLOCK` counts
//! every locked page of the process, so no other test may run beside it.

use gmem::{Errno, PrivateMemFile, PAGE_SIZE};

/// Without CAP_IPC_LOCK and with a small RLIMIT_MEMLOCK, sizing a sealed
/// file beyond the limit is a clear error, and the file keeps its old size.
#[test]
fn memlock_limit_is_a_clear_error() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
    let result = std::thread::spawn(|| {
        // Capabilities are per thread: drop CAP_IPC_LOCK in this one only.
        let mut caps = capabilities(None).unwrap();
        caps.effective.remove(CapabilitySet::IPC_LOCK);
        set_capabilities(None, caps).unwrap();
        let old = getrlimit(Resource::Memlock);
        setrlimit(Resource::Memlock, Rlimit { current: Some(64 << 10), maximum: old.maximum })
            .unwrap();
        let file = PrivateMemFile::new_guest("locked").unwrap();
        let small = file.set_len(4 * PAGE_SIZE);
        let big = file.set_len(64 << 20);
        setrlimit(Resource::Memlock, old).unwrap();
        (small, big.map_err(|e| (e.errno(), e.to_string())), file.size())
    })
    .join()
    .unwrap();
    assert_eq!(result.0, Ok(()));
    let (errno, message) = result.1.unwrap_err();
    assert!(errno == Errno::NOMEM || errno == Errno::AGAIN, "{errno:?}");
    assert!(message.contains("RLIMIT_MEMLOCK"), "{message}");
    assert_eq!(result.2, 4 * PAGE_SIZE, "a failed resize changes nothing");
}

//! Guest programs for gmem, per GUEST_ABI 1.1: no_std Rust compiled for the
//! host target, linked at GPA 0x200000, embedded here as ELF images.
//!
//! - `demo`: the built-in guest of `gmem run`: fills and checksums 4 MiB of
//!   private memory on every vCPU, checks untouched pages read zero, shares
//!   a page with a message for the host ([`DEMO_MESSAGE`], sync stage 1),
//!   takes it back, exits 0.
//! - `punch`: writes 16 pages at 0x600000, syncs at stage 1, exits with the
//!   number of pages that read zero (200 if one is torn).
//! - `smp`: all vCPUs fault on the same and on their own pages; exits 0.
//! - `spin`: never exits. `halt`: every vCPU but 0 halts, vCPU 0 never
//!   exits. `badport`: writes to an undefined port.
//! - `touch`: writes one word per page from 4 MiB up (first-touch benchmark);
//!   `sparse`: one word per 64 KiB, and prints `touched=N`.
//! - `convert`: conversion round trips, host access at syncs 1 and 2, bad
//!   requests; `convsmp`: one vCPU converts while another touches the page;
//!   `convbench`: conversion round trips against bare exits (TSC cycles);
//!   `convstorm`: every vCPU converts its own page back and forth.
//! - `memmap`: checks the 1.1 memory map and uses RAM in every region.
//! - `hypercall`: conversions by `KVM_HC_MAP_GPA_RANGE`, KVM's encoding.
//! - `stress`: the hostile soak guest of `gmem stress`.
//! - `disk`: a virtio-blk driver (queue and bounce buffers in shared pages)
//!   that writes, flushes and reads back, and checks an earlier run's data;
//!   `diskbench`: bounced against direct 64 KiB requests (TSC cycles).
//!
//! ```
//! let demo = gmem_guest::guest("demo").unwrap();
//! assert_eq!(&demo[..4], b"\x7fELF");
//! ```

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

#[path = "../guests/abi.rs"]
pub mod abi;

#[path = "../guests/stress_layout.rs"]
pub mod stress_layout;

/// Where the demo guest leaves its message for the host: GPA, bytes, and
/// the sync stage at which it is there (a shared page, NUL-terminated).
pub const DEMO_MESSAGE: (u64, u64, u64) = (0x80_0000, 64, 1);

/// The built-in guest called `name`.
pub fn guest(name: &str) -> Option<&'static [u8]> {
    GUESTS.iter().find(|(n, _)| *n == name).map(|(_, elf)| *elf)
}

/// The demo guest that `gmem run` boots by default.
pub fn demo() -> &'static [u8] {
    guest("demo").expect("the demo guest is built in")
}

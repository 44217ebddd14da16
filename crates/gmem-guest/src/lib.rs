//! Guest programs for gmem, per GUEST_ABI 1.2: no_std Rust compiled for the
//! host target, linked at GPA 0x200000, embedded here as ELF images.
//!
//! - `demo`: the built-in guest of `gmem run`: fills and checksums 4 MiB of
//!   private memory on every vCPU, checks untouched pages read zero, shares
//!   a page with a message for the host ([`DEMO_MESSAGE`], sync stage 1),
//!   takes it back, exits 0.
//! - `punch`: writes 16 pages at 0x600000, syncs at stage 1, exits with the
//!   number of pages that read zero (200 if one is torn).
//! - `user` (GUEST_ABI 1.2): every vCPU enters user mode; vCPU 0 converts,
//!   syncs and exits with a byte the host wrote, all through the doorbell;
//!   `badbell`: doorbell misuse in user mode (a test guest).
//! - `smp`: all vCPUs fault on the same and on their own pages; exits 0.
//! - `spin`: never exits. `halt`: every vCPU but 0 halts, vCPU 0 never
//!   exits. `badport`: writes to an undefined port.
//! - `touch`: writes one word per page from 4 MiB up (first-touch benchmark);
//!   `sparse`: one word per 64 KiB, and prints `touched=N`; `tlb`: random
//!   8-byte reads over its first-touched RAM (TSC cycles). These three run
//!   in user mode.
//! - `revisit` and `dirty`: touch all of RAM, sync, then rewrite part of
//!   it (a tenth once; 1% at a time, a hundred times) for snapshots and
//!   migrations, in user mode.
//! - `convert`: conversion round trips, host access at syncs 1 and 2, bad
//!   requests; `convsmp`: one vCPU converts while another touches the page;
//!   `convbench`: conversion round trips against bare exits (TSC cycles);
//!   `convstorm`: every vCPU converts its own page back and forth.
//! - `hugeconv`: converts one 4 KiB page in every 2 MiB of its RAM and
//!   back, in user mode, and checks that no other page lost its content
//!   (huge pages split and collapsed; [`huge_layout`]).
//! - `memmap`: checks the 1.1 memory map and uses RAM in every region.
//! - `hypercall`: conversions by `KVM_HC_MAP_GPA_RANGE`, KVM's encoding.
//! - `stress`: the hostile soak guest of `gmem stress` (odd vCPUs in user
//!   mode).
//! - `disk`: a virtio-blk driver (queue and bounce buffers in shared pages)
//!   that writes, flushes and reads back, and checks an earlier run's data;
//!   `diskbench`: bounced against direct 64 KiB requests (TSC cycles), in
//!   user mode.
//!
//! GUEST_ABI's layouts and constants are `gmem_boot::abi`, compiled into
//! every guest; [`needs`] says what each built-in guest needs from the VMM.
//!
//! ```
//! let demo = gmem_guest::guest("demo").unwrap();
//! assert_eq!(&demo[..4], b"\x7fELF");
//! ```

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

#[path = "../guests/stress_layout.rs"]
pub mod stress_layout;

#[path = "../guests/huge_layout.rs"]
pub mod huge_layout;

/// Where the demo guest leaves its message for the host: GPA, bytes, and
/// the sync stage at which it is there (a shared page, NUL-terminated).
pub const DEMO_MESSAGE: (u64, u64, u64) = (0x80_0000, 64, 1);

/// What a built-in guest needs from the VMM to do its work, besides RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    /// The host's side of its sync points, in `gmem run --sync` syntax
    /// (`N:punch:GPA:LEN`, `N:read:GPA:LEN`, `N:write:GPA:HEX`): what a
    /// VMM does at each stage when nobody says otherwise.
    pub host_side: &'static [&'static str],
    /// The fewest vCPUs it works with.
    pub min_vcpus: u32,
    /// A virtio-blk disk.
    pub disk: bool,
    /// `KVM_HC_MAP_GPA_RANGE` hypercall exits.
    pub hypercall_exits: bool,
    /// It never exits by itself (it tests timeouts and stops).
    pub never_exits: bool,
}

const NOTHING: Needs =
    Needs { host_side: &[], min_vcpus: 1, disk: false, hypercall_exits: false, never_exits: false };

/// The built-in guest `name`'s needs (nothing special for unknown names).
pub fn needs(name: &str) -> Needs {
    match name {
        // Reads the message at DEMO_MESSAGE.
        "demo" => Needs { host_side: &["1:read:0x800000:64"], ..NOTHING },
        // Reads the message of the page shared at stage 1 and writes
        // "host->gu" after it; the neighbour stays private; at stage 2 the
        // page is private again.
        "convert" => Needs {
            host_side: &[
                "1:read:0x600000:11",
                "1:write:0x600040:686f73742d3e6775",
                "1:read:0x601000:8",
                "2:read:0x600000:8",
            ],
            ..NOTHING
        },
        // Punches 3 of its 16 pages: it exits with 3.
        "punch" => Needs { host_side: &["1:punch:0x600000:0x3000"], ..NOTHING },
        "user" => Needs { host_side: &["1:read:0x600000:10"], ..NOTHING },
        // Ends the soak at vCPU 0's stage 2 (the STOP word of
        // stress_layout, in a page it shared).
        "stress" => Needs { host_side: &["2:write:0xf00000:01"], ..NOTHING },
        "convsmp" => Needs { min_vcpus: 2, ..NOTHING },
        "disk" | "diskbench" => Needs { disk: true, ..NOTHING },
        "hypercall" => Needs { hypercall_exits: true, ..NOTHING },
        "spin" | "halt" => Needs { never_exits: true, ..NOTHING },
        _ => NOTHING,
    }
}

/// The built-in guest called `name`.
pub fn guest(name: &str) -> Option<&'static [u8]> {
    GUESTS.iter().find(|(n, _)| *n == name).map(|(_, elf)| *elf)
}

/// The demo guest that `gmem run` boots by default.
pub fn demo() -> &'static [u8] {
    guest("demo").expect("the demo guest is built in")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_s_host_side_reads_its_message() {
        let (gpa, len, stage) = super::DEMO_MESSAGE;
        assert_eq!(super::needs("demo").host_side, [format!("{stage}:read:{gpa:#x}:{len}")]);
    }

    #[test]
    fn the_stress_host_side_writes_its_stop_word_at_stage_2() {
        let stop = super::stress_layout::STOP;
        assert_eq!(super::needs("stress").host_side, [format!("2:write:{stop:#x}:01")]);
    }
}

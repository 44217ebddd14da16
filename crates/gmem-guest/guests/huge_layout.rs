//! The layout the `hugeconv` guest shares with its host: one definition,
//! compiled into the guest and into `gmem_guest::huge_layout`.

/// The first page the guest touches (below: its image and stacks' VMM
/// region); a multiple of 2 MiB.
pub const BASE: u64 = 0x40_0000;

/// The page the guest converts in every 2 MiB from [`BASE`]: this offset
/// into each.
pub const CONVERTED_OFFSET: u64 = 0x1000;

/// Sync stages: everything touched; one page per 2 MiB shared; those
/// pages private again.
pub const TOUCHED: u64 = 1;
/// See [`TOUCHED`].
pub const SHARED: u64 = 2;
/// See [`TOUCHED`].
pub const PRIVATE_AGAIN: u64 = 3;

/// The word the guest writes at the start of the page at `gpa`.
pub const fn marker(gpa: u64) -> u64 {
    gpa ^ 0x4855_4745_0000_0000
}

//! The memory layout that the `stress` guest and `gmem stress`'s host
//! threads agree on, and the PRNG both draw their moves from: compiled into
//! the guest and exported by this crate as `gmem_guest::stress_layout`, so
//! the two sides cannot drift apart.

/// The host writes a non-zero word here to stop the guest (the guest
/// shares this page first; its counts follow the word).
pub const STOP: u64 = 0xF0_0000;
/// The first vCPU window.
pub const WINDOWS: u64 = 0x100_0000;
/// Pages per vCPU window.
pub const WINDOW: u64 = 64;
/// From one vCPU's window to the next: one window per 2 MiB page, so that
/// on huge pages a vCPU's conversions split its own 2 MiB page only, and
/// its window going all private makes that page uniform again.
pub const WINDOW_STRIDE: u64 = 2 << 20;
/// The most vCPUs the layout has windows for.
pub const MAX_VCPUS: u64 = 64;
/// The first page of vCPU `vcpu`'s window.
pub const fn window(vcpu: u64) -> u64 {
    WINDOWS + vcpu * WINDOW_STRIDE
}
/// Guest RAM that holds the windows of [`MAX_VCPUS`], the host's own
/// range above them and the vCPU stacks.
pub const RAM: u64 = window(MAX_VCPUS) + (16 << 20);
/// What the host writes into shared pages (the guest accepts it).
pub const HOST: u64 = 0x4848_4848_4848_4848;
/// Top 16 bits of a token the guest writes into a private page: the host
/// must never read one.
pub const PRIVATE_MARK: u64 = 0xF00D;

/// A small PRNG (xorshift64*); each side seeds one per vCPU or thread.
pub struct Rng(pub u64);

impl Rng {
    /// The next pseudo-random word.
    pub fn next_word(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

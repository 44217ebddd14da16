//! Seals: the kernel's memfd seals plus the seed's GUEST seal.

use rustix::fs::SealFlags;

bitflags::bitflags! {
    /// Seals of a private-memory file.
    ///
    /// All but [`Seals::GUEST`] are the kernel's `F_SEAL_*` and are enforced by
    /// the kernel. `GUEST` keeps the seed's value (`0x20`); note that Linux 6.3
    /// later gave that bit to `F_SEAL_EXEC`, so it is never passed to `fcntl`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Seals: u32 {
        /// `F_SEAL_SEAL`: no further seals may be added.
        const SEAL = 0x0001;
        /// `F_SEAL_SHRINK`: the file may not shrink.
        const SHRINK = 0x0002;
        /// `F_SEAL_GROW`: the file may not grow.
        const GROW = 0x0004;
        /// `F_SEAL_WRITE`: no writes, no writable shared mappings.
        const WRITE = 0x0008;
        /// `F_SEAL_FUTURE_WRITE`: no new writes or writable mappings.
        const FUTURE_WRITE = 0x0010;
        /// The seed's `F_SEAL_GUEST`: the content is for the guest only.
        const GUEST = 0x0020;
    }
}

impl Seals {
    /// The seals the kernel enforces itself.
    pub const KERNEL: Seals = Seals::SEAL
        .union(Seals::SHRINK)
        .union(Seals::GROW)
        .union(Seals::WRITE)
        .union(Seals::FUTURE_WRITE);

    pub(crate) fn to_kernel(self) -> SealFlags {
        let mut flags = SealFlags::empty();
        for (ours, theirs) in Self::PAIRS {
            if self.contains(ours) {
                flags |= theirs;
            }
        }
        flags
    }

    pub(crate) fn from_kernel(flags: SealFlags) -> Seals {
        Self::PAIRS
            .iter()
            .filter(|(_, theirs)| flags.contains(*theirs))
            .fold(Seals::empty(), |acc, (ours, _)| acc | *ours)
    }

    const PAIRS: [(Seals, SealFlags); 5] = [
        (Seals::SEAL, SealFlags::SEAL),
        (Seals::SHRINK, SealFlags::SHRINK),
        (Seals::GROW, SealFlags::GROW),
        (Seals::WRITE, SealFlags::WRITE),
        (Seals::FUTURE_WRITE, SealFlags::FUTURE_WRITE),
    ];
}

//! Conversions between private and shared: one primitive, and the decoding
//! of the two ways a guest asks for one (GUEST_ABI's port 0xF0 and KVM's
//! `KVM_HC_MAP_GPA_RANGE` hypercall exit).

use std::sync::atomic::Ordering;

use gmem::PAGE_SIZE;

use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::region::PageState;
use crate::Gpa;

/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`: the only attribute bit of a GUEST_ABI
/// port 0xF0 request.
pub const ATTRIBUTE_PRIVATE: u64 = kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE as u64;

/// `KVM_HC_MAP_GPA_RANGE`: the hypercall number of a conversion request.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;

/// `KVM_MAP_GPA_RANGE_ENCRYPTED`: the hypercall's "make private" bit.
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;

/// A guest's request to convert `[gpa, gpa + len)` to `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionRequest {
    /// First byte.
    pub gpa: Gpa,
    /// Length in bytes.
    pub len: u64,
    /// The state asked for.
    pub state: PageState,
}

impl ConversionRequest {
    /// A GUEST_ABI port 0xF0 request: RDI = GPA, RSI = bytes, RDX =
    /// attributes (0 shared, [`ATTRIBUTE_PRIVATE`] private; any other bit
    /// `EINVAL`).
    pub fn from_port(gpa: u64, len: u64, attributes: u64) -> Result<Self> {
        let state = match attributes {
            0 => PageState::Shared,
            ATTRIBUTE_PRIVATE => PageState::Private,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "conversion: unknown attribute bits {:#x}",
                    other & !ATTRIBUTE_PRIVATE
                )))
            }
        };
        Ok(Self { gpa: Gpa(gpa), len, state })
    }

    /// A `KVM_HC_MAP_GPA_RANGE` hypercall exit's arguments, in KVM's own
    /// encoding: `gpa`, a page count, and attributes whose bit 4
    /// ([`KVM_MAP_GPA_RANGE_ENCRYPTED`]) means private and whose bits 0-1
    /// give the page size of the count (0: 4 KiB, 1: 2 MiB, 2: 1 GiB).
    /// Any other bit, page size 3 or a length that overflows: `EINVAL`.
    pub fn from_hypercall(gpa: u64, pages: u64, attributes: u64) -> Result<Self> {
        let known = KVM_MAP_GPA_RANGE_ENCRYPTED | 0b11;
        if attributes & !known != 0 || attributes & 0b11 == 3 {
            return Err(Error::InvalidArgument(format!(
                "MAP_GPA_RANGE: bad attributes {attributes:#x}"
            )));
        }
        let page_size = [PAGE_SIZE, 2 << 20, 1 << 30][(attributes & 0b11) as usize];
        let len = pages.checked_mul(page_size).ok_or_else(|| {
            Error::InvalidArgument(format!("MAP_GPA_RANGE: {pages} pages overflow"))
        })?;
        let state = if attributes & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
            PageState::Private
        } else {
            PageState::Shared
        };
        Ok(Self { gpa: Gpa(gpa), len, state })
    }
}

impl PrivateMemory {
    /// Converts `[gpa, gpa + len)` to `state`. Pages whose state changes are
    /// discarded (a punch, with invalidation and listeners told) and read
    /// zero afterwards, in both directions; pages already in `state` keep
    /// their content (as KVM_SET_MEMORY_ATTRIBUTES makes a no-op of them).
    /// Returns how many pages changed state.
    ///
    /// Whole or not at all: the request is checked first (`EINVAL` for an
    /// unaligned or empty range, or one not covered by regions). The states
    /// flip only once every discard succeeded; if a discard fails, the range
    /// keeps its states, and the pages already discarded read zero. Waits
    /// for host accesses to end (new ones to the range wait for the
    /// conversion); `EDEADLK` if this thread holds one.
    pub fn convert(&self, gpa: Gpa, len: u64, state: PageState) -> Result<u64> {
        if len == 0 || gpa.0 % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Error::InvalidArgument(format!(
                "conversion of {:#x}+{len:#x}: must be page-aligned and non-empty",
                gpa.0
            )));
        }
        let covering = self.regions_covering(gpa, len)?;
        self.gate.check_not_shared_here("convert")?;
        let _one_at_a_time = self.gate.conversion_turn()?;
        let to_shared = state == PageState::Shared;
        let changing: Vec<_> = covering
            .iter()
            .flat_map(|(region, pages)| {
                region
                    .shared
                    .runs(pages.clone(), !to_shared)
                    .into_iter()
                    .map(move |run| (region, run))
            })
            .collect();
        // Host accesses to the range wait from here until the states flip.
        let span = gpa.0..gpa.0 + len;
        let _changing = self.gate.begin_change("convert", span.clone())?;
        for (region, run) in &changing {
            self.discard(region, run.clone())?;
        }
        let _exclusive = self.gate.exclusive("convert", span)?;
        let mut changed = 0;
        for (region, run) in &changing {
            region.shared.set(run.clone(), to_shared);
            changed += run.end - run.start;
        }
        // Split huge pages left all private are made huge again later.
        for (region, run) in changing.iter().filter(|(r, _)| crate::collapse::splits(r)) {
            for start in crate::collapse::split_by(run) {
                let range = start..start + gmem::HUGE_PAGE_SIZE / PAGE_SIZE;
                if region.shared.first(range, true).is_none() {
                    self.collapses.schedule(region.gpa_of(start).0);
                }
            }
        }
        if !self.collapses.is_idle() {
            self.schedule_timer();
        }
        for (region, run) in changing {
            let gpa = region.gpa_of(run.start);
            self.notify(|l| l.converted(gpa, (run.end - run.start) * PAGE_SIZE, state));
        }
        self.counters.conversions.fetch_add(1, Ordering::Relaxed);
        self.counters.converted_pages.fetch_add(changed, Ordering::Relaxed);
        Ok(changed)
    }

    /// Serves the conversion request a vCPU just exited with (GUEST_ABI's
    /// port 0xF0 or its doorbell: RDI = GPA, RSI = bytes, RDX =
    /// attributes) in one call: the request is read from the registers KVM
    /// synced at the exit, carried out, and its result written into RAX
    /// for the next `KVM_RUN`, with no `KVM_GET_REGS`/`KVM_SET_REGS` pair.
    /// It turns register syncing on for the vCPU's later exits; an exit
    /// without it (the first) reads and writes the registers with ioctls.
    /// Returns what the guest gets in RAX (0 or a negative errno); `Err`
    /// only if those ioctls fail. A VMM that also sets registers itself at
    /// this exit must do so through `sync_regs_mut` too.
    pub fn serve_conversion_exit(&self, vcpu: &mut kvm_ioctls::VcpuFd) -> Result<u64> {
        use kvm_ioctls::SyncReg;
        let synced = vcpu.get_kvm_run().kvm_valid_regs & u64::from(kvm_bindings::KVM_SYNC_X86_REGS);
        let mut regs = match synced {
            0 => vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
            _ => vcpu.sync_regs().regs,
        };
        regs.rax =
            self.convert_for_guest(ConversionRequest::from_port(regs.rdi, regs.rsi, regs.rdx));
        if synced == 0 {
            vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        } else {
            vcpu.sync_regs_mut().regs.rax = regs.rax;
            vcpu.set_sync_dirty_reg(SyncReg::Register);
        }
        vcpu.set_sync_valid_reg(SyncReg::Register);
        Ok(regs.rax)
    }

    /// Carries out a guest's request; what the guest gets back in RAX:
    /// 0, or a negative errno.
    pub fn convert_for_guest(&self, request: Result<ConversionRequest>) -> u64 {
        let result = request.and_then(|r| self.convert(r.gpa, r.len, r.state));
        match result {
            Ok(_) => 0,
            Err(e) => (-i64::from(e.errno().raw_os_error())) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Errno;

    #[test]
    fn hypercall_requests_use_kvm_encoding() {
        let req = |gpa, pages, attrs| ConversionRequest::from_hypercall(gpa, pages, attrs);
        let private = KVM_MAP_GPA_RANGE_ENCRYPTED;
        assert_eq!(
            req(0x60_0000, 3, 0).unwrap(),
            ConversionRequest { gpa: Gpa(0x60_0000), len: 3 * 4096, state: PageState::Shared }
        );
        assert_eq!(req(0, 2, private | 1).unwrap().len, 4 << 20);
        assert_eq!(
            req(0, 1, private | 2).unwrap(),
            ConversionRequest { gpa: Gpa(0), len: 1 << 30, state: PageState::Private }
        );
        // Port 0xF0's "private" bit (8) is not KVM's: EINVAL, like page
        // size 3, unknown bits and a length that overflows.
        for (pages, attrs) in [(1, 8), (1, 3), (1, 1 << 5), (u64::MAX, 1), (1 << 53, 0)] {
            assert_eq!(
                req(0, pages, attrs).unwrap_err().errno(),
                Errno::INVAL,
                "{pages} {attrs:#x}"
            );
        }
    }

    #[test]
    fn port_requests_take_only_the_private_bit() {
        assert_eq!(ConversionRequest::from_port(0, 4096, 0).unwrap().state, PageState::Shared);
        assert_eq!(
            ConversionRequest::from_port(0, 4096, ATTRIBUTE_PRIVATE).unwrap().state,
            PageState::Private
        );
        for attrs in [0x10, ATTRIBUTE_PRIVATE | 1, u64::MAX] {
            assert_eq!(
                ConversionRequest::from_port(0, 4096, attrs).unwrap_err().errno(),
                Errno::INVAL
            );
        }
    }
}

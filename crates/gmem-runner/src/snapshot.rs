//! Snapshots of gmem's own VM: guest memory through gmem-kvm's sealed
//! snapshots ([`gmem_kvm::snapshot`]), with the vCPUs' and devices' state
//! as the VMM state sealed inside them.
//!
//! A VM paused at a sync stage ([`Vm::pause`], then [`Outcome::Paused`]
//! from [`Vm::run`]) is saved with [`Vm::save_snapshot`]; a fresh VM with
//! the same RAM and devices takes it with [`Vm::restore_snapshot`] and
//! goes on with [`Vm::resume`].

#[cfg(doc)]
use crate::{Outcome, Vm};
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xsave};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

use gmem_kvm::{Error, Result};

/// The state of one vCPU, as KVM hands it out.
pub(crate) struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    events: kvm_vcpu_events,
    xsave: kvm_xsave,
}

const MAGIC: [u8; 8] = *b"GMEMVM01";
const VCPU_BYTES: usize = std::mem::size_of::<kvm_regs>()
    + std::mem::size_of::<kvm_sregs>()
    + std::mem::size_of::<kvm_vcpu_events>()
    + std::mem::size_of::<kvm_xsave>();

impl VcpuState {
    /// Completes the exit `vcpu` left KVM_RUN with (KVM finishes an I/O
    /// exit only at the next KVM_RUN: with `immediate_exit` it does so and
    /// returns at once, running no guest instruction), then reads its state.
    pub(crate) fn capture(vcpu: &mut VcpuFd) -> Result<Self> {
        vcpu.set_kvm_immediate_exit(1);
        let completed = vcpu.run().map(|_| ());
        vcpu.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => {}
            Ok(()) => return Err(Error::InvalidArgument("KVM_RUN ran with immediate_exit".into())),
            Err(e) => return Err(Error::kvm("KVM_RUN (complete the last exit)")(e)),
        }
        Ok(Self {
            regs: vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
            events: vcpu.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
            xsave: vcpu.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?,
        })
    }

    /// Gives `vcpu` (new, its CPUID set) this state.
    pub(crate) fn apply(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_sregs(&self.sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        // SAFETY: the buffer came from KVM_GET_XSAVE of a vCPU of the
        // same VM type on this host (its size is the legacy 4 KiB one).
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
        vcpu.set_vcpu_events(&self.events).map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.regs.as_bytes());
        out.extend_from_slice(self.sregs.as_bytes());
        out.extend_from_slice(self.events.as_bytes());
        out.extend_from_slice(self.xsave.as_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (regs, rest) = kvm_regs::read_from_prefix(bytes).ok()?;
        let (sregs, rest) = kvm_sregs::read_from_prefix(rest).ok()?;
        let (events, rest) = kvm_vcpu_events::read_from_prefix(rest).ok()?;
        let xsave = kvm_xsave::read_from_bytes(rest).ok()?;
        Some(Self { regs, sregs, events, xsave })
    }
}

/// What gmem's VM keeps in a snapshot besides memory: its RAM size, its
/// vCPUs' state and its devices' (one definition of that layout: magic,
/// RAM size, vCPU count, device count, each vCPU's KVM structures, each
/// device's state with its length).
pub struct VmState {
    pub(crate) ram_size: u64,
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) devices: Vec<Vec<u8>>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("ram_size", &self.ram_size)
            .field("vcpus", &self.vcpus.len())
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl VmState {
    /// The guest's RAM size in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// How many vCPUs it had.
    pub fn vcpus(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// How many devices it had.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.ram_size.to_le_bytes());
        out.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.devices.len() as u32).to_le_bytes());
        self.vcpus.iter().for_each(|v| v.encode(&mut out));
        for device in &self.devices {
            out.extend_from_slice(&(device.len() as u32).to_le_bytes());
            out.extend_from_slice(device);
        }
        out
    }

    /// The state in a snapshot's VMM state; `EBADMSG` for one that is not
    /// gmem's VM's (the snapshot checked it was not altered: this catches
    /// another VMM's snapshot).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = || Error::BadSnapshot("its VMM state is not gmem's VM's".into());
        let le = |at: usize, n: usize| -> Result<u64> {
            let part = bytes.get(at..at + n).ok_or_else(bad)?;
            Ok(part.iter().rev().fold(0, |acc, &b| acc << 8 | u64::from(b)))
        };
        if bytes.get(..8) != Some(&MAGIC[..]) {
            return Err(bad());
        }
        let ram_size = le(8, 8)?;
        let (vcpus, devices) = (le(16, 4)? as usize, le(20, 4)? as usize);
        let mut at = 24;
        let mut state = Self { ram_size, vcpus: Vec::new(), devices: Vec::new() };
        for _ in 0..vcpus {
            let part = bytes.get(at..at + VCPU_BYTES).ok_or_else(bad)?;
            state.vcpus.push(VcpuState::decode(part).ok_or_else(bad)?);
            at += VCPU_BYTES;
        }
        for _ in 0..devices {
            let len = le(at, 4)? as usize;
            state.devices.push(bytes.get(at + 4..at + 4 + len).ok_or_else(bad)?.to_vec());
            at += 4 + len;
        }
        if at != bytes.len() || state.vcpus.is_empty() {
            return Err(bad());
        }
        Ok(state)
    }
}

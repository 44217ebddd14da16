//! The vCPU loop of GUEST_ABI 1.2: console, exit, sync and conversion
//! requests by port (CPL 0) or through the doorbell (either CPL),
//! `KVM_HC_MAP_GPA_RANGE` exits, and every other exit as a VM error.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use gmem_boot::abi::{self, PORT_CONSOLE, PORT_EXIT, PORT_SYNC};
use gmem_kvm::convert::{ConversionRequest, KVM_HC_MAP_GPA_RANGE};
use gmem_kvm::{Error, Result};
use kvm_ioctls::{Cap, SyncReg, VcpuExit, VcpuFd, VmFd};

use crate::vm::{Outcome, SyncHandler, Vm};

/// A request to the VMM: an `out` to one of the ABI's ports, or a doorbell
/// write at that port's offset; `value` is AL/EAX, zero-extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Request {
    port: u16,
    value: u32,
}

impl Request {
    /// An `out` of `data` to `port`; `None` for a port the ABI lacks.
    fn from_port(port: u16, data: &[u8]) -> Option<Self> {
        abi::PORTS.contains(&port).then(|| Self { port, value: le_value(data) })
    }

    /// A doorbell write of `data` at `gpa` (inside the doorbell page):
    /// 1, 2 or 4 bytes at a port's offset, or why it stops the VM.
    fn from_doorbell(gpa: u64, data: &[u8]) -> std::result::Result<Self, String> {
        let offset = gpa - abi::DOORBELL;
        if ![1, 2, 4].contains(&data.len()) {
            return Err(format!(
                "doorbell write of {} bytes at GPA {gpa:#x}: writes are 1, 2 or 4 bytes",
                data.len()
            ));
        }
        u16::try_from(offset)
            .ok()
            .and_then(|port| Self::from_port(port, data))
            .ok_or_else(|| format!("doorbell write at GPA {gpa:#x}: offset {offset:#x} is no port"))
    }
}

/// `data`'s first (up to) four bytes as a little-endian value.
fn le_value(data: &[u8]) -> u32 {
    let mut value = [0u8; 4];
    let n = data.len().min(4);
    value[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(value)
}

/// Whether `gpa` lies in the doorbell page.
fn is_doorbell(gpa: u64) -> bool {
    gpa.wrapping_sub(abi::DOORBELL) < abi::DOORBELL_SIZE
}

/// Asks KVM to exit to us on KVM_HC_MAP_GPA_RANGE; `EOPNOTSUPP` where
/// the kernel cannot.
pub(crate) fn enable_hypercall_exits(vm: &VmFd) -> Result<()> {
    let mask = 1u64 << KVM_HC_MAP_GPA_RANGE;
    let supported = vm.check_extension_int(Cap::ExitHypercall);
    if (supported as u64) & mask == 0 {
        return Err(Error::Unsupported(format!(
            "hypercall exits: KVM_CAP_EXIT_HYPERCALL offers {supported:#x}, without \
             KVM_HC_MAP_GPA_RANGE"
        )));
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_EXIT_HYPERCALL,
        ..Default::default()
    };
    cap.args[0] = mask;
    vm.enable_cap(&cap).map_err(Error::kvm("KVM_ENABLE_CAP(EXIT_HYPERCALL)"))
}

impl Vm {
    /// Carries out a guest's conversion request; RAX for the guest.
    fn guest_convert(&self, request: Result<ConversionRequest>) -> u64 {
        self.conversion_requests.fetch_add(1, Ordering::Relaxed);
        self.memory().convert_for_guest(request)
    }

    /// Why an MMIO exit at `gpa`, where no device is, stops the VM.
    fn unserved_access(&self, gpa: u64) -> String {
        let why = match self.memory().region_of(gmem_kvm::Gpa(gpa)) {
            Some(_) => "could not be served (fenced off after a fault error)",
            None => "is outside guest RAM",
        };
        format!("access to GPA {gpa:#x} {why}")
    }

    pub(crate) fn vcpu_loop(
        &self,
        vcpu: &mut VcpuFd,
        index: u32,
        echo: bool,
        console: &Mutex<Vec<u8>>,
        on_sync: SyncHandler<'_>,
    ) {
        let stop = |why: String| self.control.stop(Outcome::Error(format!("vCPU {index}: {why}")));
        // KVM copies the registers into kvm_run on every exit, and back in
        // when marked dirty: on kvm_pvm hosts a KVM_GET_REGS/KVM_SET_REGS
        // pair costs about as much as the exit itself.
        vcpu.set_sync_valid_reg(SyncReg::Register);
        while !self.control.stopping.load(Ordering::SeqCst) {
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) if e.errno() == libc::EFAULT => {
                    // A page gmem could not serve is fenced off; a user-mode
                    // access to it, or to a memslot page no file page backs,
                    // ends KVM_RUN with EFAULT (at CPL 0 it is an MMIO exit
                    // with the GPA). The fault thread reports the GPA of a
                    // fenced fault right after fencing: the better outcome.
                    self.control.wait_for_outcome(std::time::Duration::from_secs(1));
                    let rip = vcpu.sync_regs().regs.rip;
                    return stop(format!(
                        "KVM_RUN failed with EFAULT at RIP {rip:#x}: a guest access that no \
                         page backs (this KVM names no GPA for a user-mode access)"
                    ));
                }
                Err(e) => return stop(format!("KVM_RUN failed: {e}")),
            };
            // Requests that need registers are handled after `exit` (which
            // borrows the vCPU) is gone.
            let request = match exit {
                VcpuExit::IoOut(port, data) => match Request::from_port(port, data) {
                    Some(request) => request,
                    None => {
                        let rip = vcpu.sync_regs().regs.rip;
                        return stop(format!("access to unknown port {port:#x} at RIP {rip:#x}"));
                    }
                },
                VcpuExit::IoIn(port, _) => {
                    let rip = vcpu.sync_regs().regs.rip;
                    return stop(format!("access to unknown port {port:#x} at RIP {rip:#x}"));
                }
                VcpuExit::MmioWrite(gpa, data) if is_doorbell(gpa) => {
                    match Request::from_doorbell(gpa, data) {
                        Ok(request) => request,
                        Err(why) => return stop(why),
                    }
                }
                VcpuExit::MmioRead(gpa, _) if is_doorbell(gpa) => {
                    return stop(format!(
                        "doorbell read at GPA {gpa:#x}: the doorbell is write-only"
                    ))
                }
                // Only KVM_HC_MAP_GPA_RANGE exits are enabled.
                VcpuExit::Hypercall(call) => {
                    let [gpa, pages, attributes, ..] = call.args;
                    *call.ret = self
                        .guest_convert(ConversionRequest::from_hypercall(gpa, pages, attributes));
                    continue;
                }
                VcpuExit::Hlt => return,
                VcpuExit::Shutdown => return stop("triple fault (shutdown)".into()),
                VcpuExit::MmioRead(gpa, data) => match self.device_at(gpa) {
                    Some((disk, offset)) => {
                        disk.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
                        continue;
                    }
                    None => return stop(self.unserved_access(gpa)),
                },
                VcpuExit::MmioWrite(gpa, data) => match self.device_at(gpa) {
                    Some((disk, offset)) => {
                        // The device reaches guest memory through the view
                        // of shared pages only.
                        let view = self.memory().shared();
                        disk.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data, &view);
                        continue;
                    }
                    None => return stop(self.unserved_access(gpa)),
                },
                VcpuExit::InternalError => {
                    // SAFETY: KVM filled the `internal` member for this exit.
                    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = vcpu.sync_regs().regs.rip;
                    // Suberror 1 is an emulation failure; on kvm_pvm hosts any
                    // guest SSE instruction ends this way.
                    return stop(format!(
                        "KVM internal error (suberror {suberror}{}) at RIP {rip:#x}",
                        if suberror == 1 {
                            ": KVM could not emulate the instruction; kvm_pvm hosts cannot run guest SSE code"
                        } else {
                            ""
                        }
                    ));
                }
                VcpuExit::FailEntry(reason, _) => {
                    return stop(format!("VM entry failed ({reason:#x})"))
                }
                other => return stop(format!("unexpected exit {other:?}")),
            };
            let rax = match request.port {
                PORT_CONSOLE => {
                    let byte = request.value as u8;
                    console.lock().unwrap_or_else(|p| p.into_inner()).push(byte);
                    if echo {
                        use std::io::Write;
                        let _ = std::io::stderr().write_all(&[byte]);
                    }
                    continue;
                }
                PORT_EXIT => return self.control.stop(Outcome::Exit(request.value)),
                PORT_SYNC => {
                    let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
                    on_sync(self, vcpu.sync_regs().regs.rdi);
                    0
                }
                // PORT_CONVERT: a request holds one of the ABI's ports.
                _ => {
                    self.conversion_requests.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.memory().serve_conversion_exit(vcpu) {
                        return stop(format!("serving a conversion request: {e}"));
                    }
                    continue;
                }
            };
            vcpu.sync_regs_mut().regs.rax = rax;
            vcpu.set_sync_dirty_reg(SyncReg::Register);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_writes_of_1_2_or_4_bytes_at_a_port_are_requests() {
        for port in abi::PORTS {
            let gpa = abi::DOORBELL + u64::from(port);
            assert_eq!(Request::from_doorbell(gpa, &[7]), Ok(Request { port, value: 7 }));
            assert_eq!(
                Request::from_doorbell(gpa, &[0x34, 0x12]),
                Ok(Request { port, value: 0x1234 })
            );
            let value = 0xdead_beef_u32;
            assert_eq!(
                Request::from_doorbell(gpa, &value.to_le_bytes()),
                Ok(Request { port, value })
            );
        }
    }

    #[test]
    fn other_doorbell_writes_are_refused_naming_the_gpa() {
        let exit = abi::DOORBELL + u64::from(PORT_EXIT);
        for data in [&[0u8; 3][..], &[0; 8], &[]] {
            let why = Request::from_doorbell(exit, data).unwrap_err();
            assert!(why.contains("GPA 0xdffff0f4") && why.contains("1, 2 or 4 bytes"), "{why}");
        }
        for offset in [0, 0xE8, 0xF1, 0xFFF] {
            let why = Request::from_doorbell(abi::DOORBELL + offset, &[1]).unwrap_err();
            assert!(why.contains(&format!("GPA {:#x}", abi::DOORBELL + offset)), "{why}");
        }
        assert!(is_doorbell(abi::DOORBELL) && is_doorbell(abi::DOORBELL + 0xFFF));
        assert!(!is_doorbell(abi::DOORBELL - 1) && !is_doorbell(abi::DOORBELL + 0x1000));
    }

    #[test]
    fn ports_outside_the_abi_are_not_requests() {
        assert_eq!(Request::from_port(0x80, &[1]), None);
        assert_eq!(
            Request::from_port(PORT_SYNC, &[1, 0, 0, 0]),
            Some(Request { port: PORT_SYNC, value: 1 })
        );
    }
}

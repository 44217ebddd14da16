//! The vCPU loop of GUEST_ABI 1.1: console, exit, sync and conversion ports,
//! `KVM_HC_MAP_GPA_RANGE` exits, and every other exit as a VM error.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use gmem_kvm::convert::{ConversionRequest, KVM_HC_MAP_GPA_RANGE};
use gmem_kvm::{Error, Result};
use kvm_ioctls::{Cap, SyncReg, VcpuExit, VcpuFd, VmFd};

use crate::vm::{Outcome, SyncHandler, Vm};

/// Ports of GUEST_ABI 1.1.
pub mod ports {
    /// Console: one byte of output.
    pub const CONSOLE: u16 = 0xE9;
    /// Conversion request.
    pub const CONVERT: u16 = 0xF0;
    /// Exit with a code.
    pub const EXIT: u16 = 0xF4;
    /// Sync point.
    pub const SYNC: u16 = 0xF8;
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
                Err(e) => return stop(format!("KVM_RUN failed: {e}")),
            };
            // Port writes that need registers are handled after `exit`
            // (which borrows the vCPU) is gone.
            let port = match exit {
                VcpuExit::IoOut(ports::CONSOLE, data) => {
                    let mut out = console.lock().unwrap_or_else(|p| p.into_inner());
                    out.extend_from_slice(&data[..1]);
                    if echo {
                        use std::io::Write;
                        let _ = std::io::stderr().write_all(&data[..1]);
                    }
                    continue;
                }
                VcpuExit::IoOut(ports::EXIT, data) => {
                    let mut code = [0u8; 4];
                    code[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                    self.control.stop(Outcome::Exit(u32::from_le_bytes(code)));
                    return;
                }
                VcpuExit::IoOut(port @ (ports::SYNC | ports::CONVERT), _) => port,
                VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) => {
                    let rip = vcpu.sync_regs().regs.rip;
                    return stop(format!("access to unknown port {port:#x} at RIP {rip:#x}"));
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
            let regs = vcpu.sync_regs().regs;
            let rax = match port {
                ports::SYNC => {
                    let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
                    on_sync(self, regs.rdi);
                    0
                }
                _ => self.guest_convert(ConversionRequest::from_port(regs.rdi, regs.rsi, regs.rdx)),
            };
            vcpu.sync_regs_mut().regs.rax = rax;
            vcpu.set_sync_dirty_reg(SyncReg::Register);
        }
    }
}

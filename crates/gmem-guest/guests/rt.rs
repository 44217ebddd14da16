//! Guest runtime for GUEST_ABI 1.2: entry, boot info, the VMM's requests
//! (console, exit, convert, sync) by port at CPL 0 and by the doorbell in
//! user mode, the switch to user mode, console output, panic.
#![allow(dead_code)]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

#[path = "../../gmem-boot/src/abi.rs"]
pub mod abi;

pub use abi::{BootInfo, DeviceEntry, DeviceListHeader, MemoryRegion, PRIVATE, SHARED};

/// `KVM_MAP_GPA_RANGE_ENCRYPTED`: "make private" in a MAP_GPA_RANGE hypercall.
pub const MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;

impl BootInfo {
    /// RAM region `index` (below `region_count`): (GPA, size).
    pub fn region(&self, index: u32) -> (u64, u64) {
        let at = self.regions_at() + core::mem::size_of::<MemoryRegion>() as u64 * u64::from(index);
        (read_u64(at), read_u64(at + 8))
    }

    /// The lowest byte of the vCPU stacks: below it, RAM is the guest's.
    pub fn stacks_floor(&self) -> u64 {
        self.ram_end - u64::from(self.vcpu_count) * abi::STACK_SIZE
    }

    /// The GPA of the device list's header.
    pub fn devices_at(&self) -> u64 {
        self.regions_at() + core::mem::size_of::<MemoryRegion>() as u64 * u64::from(self.region_count)
    }

    /// The first virtio-mmio device's registers; `None` without one.
    pub fn first_device(&self) -> Option<u64> {
        let header = self.devices_at();
        (read_u64(header) & 0xffff_ffff != 0)
            .then(|| read_u64(header + core::mem::size_of::<DeviceListHeader>() as u64))
    }

    fn regions_at(&self) -> u64 {
        self as *const Self as u64 + core::mem::size_of::<Self>() as u64
    }
}

// The VMM enters with a 16-byte aligned RSP and no return address pushed:
// realign and call, so that Rust code sees the SysV stack alignment.
global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "and rsp, -16",
    "call {main}",
    "ud2",
    main = sym entry,
);

extern "C" fn entry(boot: &'static BootInfo, vcpu: u64) -> ! {
    if boot.magic != abi::BOOT_MAGIC {
        exit(90);
    }
    exit(crate::guest_main(boot, vcpu as u32))
}

/// Switches this vCPU to user mode (CPL 3) for good, as GUEST_ABI 1.2
/// says: `iretq` to the user selectors with the same stack. Afterwards the
/// requests below go through the doorbell; `hlt` and port I/O would fault.
/// Needs a 1.2 VMM (`abi_minor` 2): on 1.1 the switch triple-faults.
pub fn enter_user_mode() {
    // SAFETY: the VMM's GDT has the user descriptors and its page tables
    // map all of RAM with U/S set (GUEST_ABI 1.2); the frame returns here
    // with the same RSP and every other register kept.
    unsafe {
        asm!(
            "mov {sp}, rsp",
            "push {ss}",
            "push {sp}",
            "push 0x2",
            "push {cs}",
            "lea {sp}, [rip + 2f]",
            "push {sp}",
            "iretq",
            "2:",
            sp = out(reg) _,
            ss = const abi::USER_DS as u64,
            cs = const abi::USER_CS as u64,
        )
    };
}

/// Whether this vCPU runs in user mode (CS's RPL is 3).
pub fn in_user_mode() -> bool {
    let cs: u64;
    // SAFETY: reading CS has no effect.
    unsafe { asm!("mov {0:r}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3 == 3
}

/// Where a doorbell write for `port` goes.
fn doorbell(port: u16) -> u64 {
    abi::DOORBELL + u64::from(port)
}

/// Stops the whole VM with `code` (port or doorbell 0xF4).
pub fn exit(code: u32) -> ! {
    loop {
        if in_user_mode() {
            // SAFETY: a doorbell write the VMM handles; it does not return to us.
            unsafe { asm!("mov dword ptr [{db}], eax", db = in(reg) doorbell(abi::PORT_EXIT), in("eax") code) };
        } else {
            // SAFETY: a port write the VMM handles; it does not return to us.
            unsafe { asm!("out 0xf4, eax", in("eax") code) };
        }
    }
}

/// Pauses this vCPU while the host runs the stage's actions (0xF8).
pub fn sync(stage: u64) -> i64 {
    let ret: i64;
    if in_user_mode() {
        // SAFETY: a doorbell write; the VMM sets RAX before resuming.
        unsafe {
            asm!("mov dword ptr [{db}], eax", db = in(reg) doorbell(abi::PORT_SYNC), in("rdi") stage,
                 inout("rax") 0i64 => ret)
        };
    } else {
        // SAFETY: a port write; the VMM sets RAX before resuming.
        unsafe { asm!("out 0xf8, eax", in("rdi") stage, inout("rax") 0i64 => ret) };
    }
    ret
}

/// Converts `[gpa, gpa + size)` to `attrs` (0xF0); 0 or a negative errno.
pub fn convert(gpa: u64, size: u64, attrs: u64) -> i64 {
    let ret: i64;
    if in_user_mode() {
        // SAFETY: a doorbell write; the VMM sets RAX before resuming.
        unsafe {
            asm!("mov dword ptr [{db}], eax", db = in(reg) doorbell(abi::PORT_CONVERT), in("rdi") gpa,
                 in("rsi") size, in("rdx") attrs, inout("rax") 0i64 => ret)
        };
    } else {
        // SAFETY: a port write; the VMM sets RAX before resuming.
        unsafe {
            asm!("out 0xf0, eax", in("rdi") gpa, in("rsi") size, in("rdx") attrs,
                 inout("rax") 0i64 => ret)
        };
    }
    ret
}

/// `vmcall` KVM_HC_MAP_GPA_RANGE (12): the same request as [`convert`],
/// in pages; only where the VMM enabled hypercall exits.
pub fn map_gpa_range(gpa: u64, pages: u64, attrs: u64) -> i64 {
    let ret: i64;
    // SAFETY: a hypercall the VMM answers in RAX; rbx is reserved by LLVM,
    // so it is swapped in and out around the call.
    unsafe {
        asm!("xchg rbx, {gpa}", "vmcall", "xchg rbx, {gpa}", gpa = inout(reg) gpa => _,
             in("rcx") pages, in("rdx") attrs, inout("rax") 12i64 => ret)
    };
    ret
}

/// One byte of console output (0xE9): the cheapest exit to the VMM.
pub fn console(byte: u8) {
    if in_user_mode() {
        // SAFETY: a doorbell write the VMM handles.
        unsafe { asm!("mov byte ptr [{db}], al", db = in(reg) doorbell(abi::PORT_CONSOLE), in("al") byte) };
    } else {
        // SAFETY: a console port write.
        unsafe { asm!("out 0xe9, al", in("al") byte) };
    }
}

/// The time-stamp counter (same clock as the host's, unscaled).
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter (CR4.TSD is clear).
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Whether every word of the page at `gpa` is zero.
pub fn page_is_zero(gpa: u64) -> bool {
    (0..4096).step_by(8).all(|off| read_u64(gpa + off) == 0)
}

/// Fills the page at `gpa` with `value` in every word.
pub fn fill_page(gpa: u64, value: u64) {
    for off in (0..4096).step_by(8) {
        write_u64(gpa + off, value);
    }
}

/// Ends this vCPU's work: `hlt` with interrupts off at CPL 0 (the vCPU's
/// thread ends); in user mode, where `hlt` faults, a `pause` loop until
/// another vCPU stops the VM.
pub fn halt() -> ! {
    loop {
        if in_user_mode() {
            core::hint::spin_loop();
        } else {
            // SAFETY: hlt with interrupts disabled ends this vCPU's work.
            unsafe { asm!("hlt") };
        }
    }
}

/// Console output without `core::fmt`: libcore's formatting code is built
/// with SSE, which some hosts' KVM (kvm_pvm) cannot run in a guest.
pub struct Out;

pub fn out() -> Out {
    Out
}

impl Out {
    pub fn s(self, text: &str) -> Self {
        for b in text.bytes() {
            console(b);
        }
        self
    }

    pub fn dec(self, mut value: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[19 - n] = b'0' + (value % 10) as u8;
            n += 1;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.s(core::str::from_utf8(&digits[20 - n..]).unwrap_or("?"))
    }

    pub fn hex(self, value: u64) -> Self {
        let mut digits = *b"0x0000000000000000";
        for i in 0..16 {
            let nibble = (value >> (60 - 4 * i)) & 0xf;
            digits[2 + i] = b"0123456789abcdef"[nibble as usize];
        }
        self.s(core::str::from_utf8(&digits).unwrap_or("?"))
    }
}

/// Volatile access to guest memory by physical (= virtual) address.
pub fn read_u64(gpa: u64) -> u64 {
    // SAFETY: RAM is identity-mapped; callers pass addresses inside RAM.
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

pub fn write_u64(gpa: u64, value: u64) {
    // SAFETY: as for read_u64.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, value) }
}

/// Writes `bytes` at `gpa`.
pub fn write_bytes(gpa: u64, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: as for read_u64.
        unsafe { core::ptr::write_volatile((gpa + i as u64) as *mut u8, *b) }
    }
}

/// Atomic counter in guest memory, shared between vCPUs.
pub fn counter(gpa: u64) -> &'static core::sync::atomic::AtomicU64 {
    // SAFETY: RAM is identity-mapped and the address is 8-byte aligned.
    unsafe { &*(gpa as *const core::sync::atomic::AtomicU64) }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let console = out().s("guest panic");
    if let Some(location) = info.location() {
        console.s(" at ").s(location.file()).s(":").dec(u64::from(location.line()));
    }
    out().s("\n");
    exit(101)
}

// No libc: the few memory routines the compiler may call.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract is memcpy's.
    unsafe { asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _) };
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        // SAFETY: forward copy is safe when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy for an overlapping dst after src.
    unsafe {
        asm!("std", "rep movsb", "cld", inout("rcx") n => _,
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _)
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract is memset's.
    unsafe { asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8) };
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's contract is memcmp's.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// libcore is built with unwind tables; with panic=abort nothing calls this.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Writes one word in every `stride`-th byte of this vCPU's share of RAM
/// (from 4 MiB up to the stacks, every region, split into `vcpu_count`
/// contiguous shares), then returns how many words it wrote. The inner loop
/// is a bare store and add: on hosts that emulate guest code, every extra
/// instruction there counts.
pub fn touch_share(boot: &BootInfo, vcpu: u32, stride: u64) -> u64 {
    share_words(boot, vcpu, stride, 0, u64::MAX, |gpa| write_u64(gpa, gpa))
}

/// [`touch_share`] on every vCPU, then waits until all have touched
/// theirs (`touched` counts them: a static of the guest's, from 0).
pub fn touch_share_together(boot: &BootInfo, vcpu: u32, touched: &AtomicU32) -> u64 {
    let words = touch_share(boot, vcpu, 4096);
    touched.fetch_add(1, Ordering::SeqCst);
    while touched.load(Ordering::SeqCst) != boot.vcpu_count {
        core::hint::spin_loop();
    }
    words
}

/// Whether the first `words` words of this vCPU's share still hold what
/// [`touch_share`] wrote; says how many did not, as `name`, if any.
pub fn share_intact(name: &str, boot: &BootInfo, vcpu: u32, words: u64) -> bool {
    let wrong = check_share(boot, vcpu, 4096, words);
    if wrong != 0 {
        out().s(name).s(": ").dec(wrong).s(" pages lost what this vCPU wrote\n");
    }
    wrong == 0
}

/// A vCPU's end: the last of them to get here (`done` counts them: a
/// static of the guest's, from 0) exits 0, the others halt.
pub fn last_one_exits(boot: &BootInfo, done: &AtomicU32) -> u32 {
    if done.fetch_add(1, Ordering::SeqCst) + 1 == boot.vcpu_count {
        return 0;
    }
    halt()
}

/// [`touch_share`] of `words` words of the share from word `first` on.
pub fn touch_share_from(boot: &BootInfo, vcpu: u32, stride: u64, first: u64, words: u64) -> u64 {
    share_words(boot, vcpu, stride, first, words, |gpa| write_u64(gpa, gpa))
}

/// How many of the first `words` words of this vCPU's share (as
/// [`touch_share`] wrote them: each holds its own GPA) hold something else.
pub fn check_share(boot: &BootInfo, vcpu: u32, stride: u64, words: u64) -> u64 {
    let mut wrong = 0;
    share_words(boot, vcpu, stride, 0, words, |gpa| wrong += u64::from(read_u64(gpa) != gpa));
    wrong
}

/// Calls `word` for every `stride`-th GPA of this vCPU's share of RAM (see
/// [`touch_share`]) from the `first`th on, `limit` of them at most;
/// returns how many.
fn share_words(
    boot: &BootInfo,
    vcpu: u32,
    stride: u64,
    first: u64,
    limit: u64,
    mut word: impl FnMut(u64),
) -> u64 {
    const BASE: u64 = 0x40_0000;
    let range = |i: u32| {
        let (start, size) = boot.region(i);
        (start.max(BASE), (start + size).min(boot.stacks_floor()))
    };
    let total: u64 = (0..boot.region_count).map(|i| range(i)).map(|(lo, hi)| hi.saturating_sub(lo)).sum();
    let share = total / u64::from(boot.vcpu_count) / stride * stride;
    let start = share * u64::from(vcpu);
    let to = if vcpu + 1 == boot.vcpu_count { total } else { start + share };
    let from = start.saturating_add(first.saturating_mul(stride)).min(to);
    let to = to.min(from.saturating_add(limit.saturating_mul(stride)));
    let (mut linear, mut touched) = (0, 0);
    for i in 0..boot.region_count {
        let (lo, hi) = range(i);
        let len = hi.saturating_sub(lo);
        let (a, b) = (from.max(linear), to.min(linear + len));
        if a < b {
            let (mut gpa, end) = (lo + (a - linear), lo + (b - linear));
            touched += (end - gpa).div_ceil(stride);
            while gpa < end {
                word(gpa);
                gpa += stride;
            }
        }
        linear += len;
    }
    touched
}

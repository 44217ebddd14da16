//! Soak guest for `gmem stress`: a hostile guest that checks what it sees.
//!
//! Every vCPU owns a window of [`WINDOW`] pages at `WINDOWS + index *
//! WINDOW * 4096` and, until the host writes a non-zero word at [`STOP`],
//! does random operations on random runs of 1-8 of its pages: conversions
//! (either way), token writes, read checks, and invalid conversion requests
//! (unaligned, empty, wrapping, outside RAM, unknown bits), which must get
//! -EINVAL. It tracks each page's state and the token last written:
//!
//! - a page that changed state reads zero (a shared one may also hold the
//!   host's pattern, the host may write shared pages);
//! - a private page reads its last token, or zero (the host may punch it);
//!   anything else is stale data or a host write into private memory;
//! - tokens written into private pages carry [`PRIVATE_MARK`] in their top
//!   16 bits: the host must never read one.
//!
//! At the stop, each vCPU stores its counts in the STOP page (shared) at
//! `STOP + 64 + 32 * index`: operations, conversions, invalid requests,
//! checks. vCPU 0 exits 0 once all are done. A violation prints what was
//! seen and exits 1 at once. Odd-numbered vCPUs do all this in user mode,
//! through the doorbell (GUEST_ABI 1.2); even ones at CPL 0, through ports.
//! vCPU 0 syncs at stage 1 after [`SYNC_OPS`] operations and at stage 2
//! after twice that: where `gmem run` may take a snapshot, and stop the
//! soak by writing the STOP word (the built-in host side of stage 2).
#![no_std]
#![no_main]

mod rt;
mod stress_layout;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use stress_layout::{window, Rng, HOST, PRIVATE_MARK, STOP, WINDOW};

/// Top 16 bits of a token written while the page was shared.
const SHARED_MARK: u64 = 0x5A4E;
const MAX_VCPUS: usize = stress_layout::MAX_VCPUS as usize;
/// TSC cycles a vCPU waits after its whole window went private (tens of
/// ms): long enough for a huge page's background collapse to come.
const SETTLE_CYCLES: u64 = 100_000_000;
/// vCPU 0's operations before each of its two sync stages.
const SYNC_OPS: u64 = 400;

/// Per page of every window: bit 0 = shared; the rest, the last token.
static PAGES: [AtomicU64; MAX_VCPUS * WINDOW as usize] =
    [const { AtomicU64::new(0) }; MAX_VCPUS * WINDOW as usize];
static DONE: AtomicU32 = AtomicU32::new(0);

fn violation(vcpu: u32, what: &str, gpa: u64, seen: u64) -> u32 {
    rt::out().s("stress: VIOLATION on vCPU ").dec(u64::from(vcpu)).s(": ").s(what);
    rt::out().s(" at ").hex(gpa).s(", read ").hex(seen).s("\n");
    1
}

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    if boot.vcpu_count as usize > MAX_VCPUS
        || window(u64::from(boot.vcpu_count)) > boot.stacks_floor()
    {
        rt::out().s("stress: too many vCPUs for the RAM\n");
        return 2;
    }
    if vcpu == 0 && rt::convert(STOP, 4096, rt::SHARED) != 0 {
        rt::out().s("stress: the stop page could not be shared\n");
        return 2;
    }
    // Odd vCPUs run in user mode (GUEST_ABI 1.2): their requests go
    // through the doorbell, the others' through ports, so that one soak
    // covers both exit paths.
    if vcpu % 2 == 1 {
        rt::enter_user_mode();
    }
    let base = window(u64::from(vcpu));
    let slots = &PAGES[vcpu as usize * WINDOW as usize..][..WINDOW as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(vcpu) + 1).wrapping_mul(rt::rdtsc() | 1));
    let (mut ops, mut conversions, mut invalid, mut checks, mut tokens) = (0u64, 0u64, 0u64, 0u64, 0u64);
    while rt::read_u64(STOP) == 0 {
        let r = rng.next_word();
        let first = r % WINDOW;
        let count = (1 + (r >> 8) % 8).min(WINDOW - first);
        let gpa = base + first * 4096;
        ops += 1;
        if vcpu == 0 && ops % SYNC_OPS == 0 && ops <= 2 * SYNC_OPS {
            rt::sync(ops / SYNC_OPS);
        }
        match (r >> 16) % 8 {
            0 | 1 => {
                // Now and then the whole window goes private and stays so
                // for a while: on huge pages its 2 MiB page is uniform
                // again, and is collapsed meanwhile.
                let whole = (r >> 28) % 256 == 0;
                let (first, count, gpa) = if whole { (0, WINDOW, base) } else { (first, count, gpa) };
                let to_shared = !whole && (r >> 24) & 1 == 1;
                let attrs = if to_shared { rt::SHARED } else { rt::PRIVATE };
                let ret = rt::convert(gpa, count * 4096, attrs);
                if ret != 0 {
                    return violation(vcpu, "a valid conversion was refused", gpa, ret as u64);
                }
                conversions += 1;
                for page in first..first + count {
                    let slot = &slots[page as usize];
                    let was_shared = slot.load(Ordering::Relaxed) & 1 == 1;
                    if was_shared != to_shared {
                        slot.store(u64::from(to_shared), Ordering::Relaxed);
                        let at = base + page * 4096;
                        let seen = rt::read_u64(at);
                        if !(seen == 0 || (to_shared && seen == HOST)) {
                            return violation(vcpu, "a converted page kept content", at, seen);
                        }
                    }
                }
                if whole {
                    let start = rt::rdtsc();
                    while rt::rdtsc() - start < SETTLE_CYCLES && rt::read_u64(STOP) == 0 {
                        core::hint::spin_loop();
                    }
                }
            }
            2 | 3 => {
                for page in first..first + count {
                    let slot = &slots[page as usize];
                    let shared = slot.load(Ordering::Relaxed) & 1;
                    let mark = if shared == 1 { SHARED_MARK } else { PRIVATE_MARK };
                    tokens += 1;
                    // Bit 0 of a token is its page's state, as in the slot.
                    let token = mark << 48 | u64::from(vcpu) << 32 | (tokens << 1 & 0xffff_fffe) | shared;
                    slot.store(token, Ordering::Relaxed);
                    rt::write_u64(base + page * 4096, token);
                }
            }
            4..=6 => {
                for page in first..first + count {
                    let slot = &slots[page as usize];
                    let expected = slot.load(Ordering::Relaxed);
                    let shared = expected & 1 == 1;
                    let at = base + page * 4096;
                    let seen = rt::read_u64(at);
                    checks += 1;
                    let fine = seen == 0
                        || (expected >> 1 != 0 && seen == expected)
                        || (shared && seen == HOST);
                    if !fine {
                        return violation(vcpu, "stale or foreign data", at, seen);
                    }
                    if seen == 0 && !shared {
                        // Punched by the host: it holds nothing now.
                        slot.store(0, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                let bad = match (r >> 24) % 5 {
                    0 => rt::convert(gpa + 8, 4096, rt::SHARED),
                    1 => rt::convert(gpa, 0, rt::PRIVATE),
                    2 => rt::convert(!0xfff, 0x2000, rt::SHARED),
                    3 => rt::convert(boot.ram_end, 4096, rt::SHARED),
                    _ => rt::convert(gpa, 4096, 0x10),
                };
                if bad != -22 {
                    return violation(vcpu, "a bad request was not EINVAL", gpa, bad as u64);
                }
                invalid += 1;
            }
        }
    }
    let report = STOP + 64 + 32 * u64::from(vcpu);
    for (i, value) in [ops, conversions, invalid, checks].into_iter().enumerate() {
        rt::write_u64(report + 8 * i as u64, value);
    }
    DONE.fetch_add(1, Ordering::SeqCst);
    if vcpu != 0 {
        rt::halt();
    }
    while DONE.load(Ordering::SeqCst) != boot.vcpu_count {
        core::hint::spin_loop();
    }
    0
}

//! Benchmark guest, TLB-bound: vCPU 0, in user mode, first touches every
//! page from 4 MiB up to the stacks (every region), then makes [`READS`]
//! random 8-byte reads over that memory, timed with the TSC, and prints
//! `reads=CYCLES/READS pages=N`. With 4 KiB mappings nearly every read
//! misses the TLB: what huge pages are judged by. Exits 0; 1 if a read
//! finds a word that its first touch did not write.
#![no_std]
#![no_main]

mod rt;
#[allow(dead_code)]
mod stress_layout;

const BASE: u64 = 0x40_0000;
const READS: u64 = 1 << 24;

fn guest_main(boot: &rt::BootInfo, vcpu: u32) -> u32 {
    rt::enter_user_mode();
    if vcpu != 0 {
        rt::halt();
    }
    // The pages to touch and read, as (first GPA, pages) per region.
    let mut ranges = [(0u64, 0u64); 2];
    for i in 0..boot.region_count.min(2) {
        let (start, size) = boot.region(i);
        let (lo, hi) = (start.max(BASE), (start + size).min(boot.stacks_floor()));
        ranges[i as usize] = (lo, hi.saturating_sub(lo) / 4096);
        for gpa in (lo..hi).step_by(4096) {
            rt::write_u64(gpa, gpa);
        }
    }
    let pages = ranges[0].1 + ranges[1].1;
    let mut rng = stress_layout::Rng(0x9e37_79b9_7f4a_7c15);
    let mut bad = 0u64;
    let start = rt::rdtsc();
    for _ in 0..READS {
        let mut page = rng.next_word() % pages;
        let (mut first, count) = ranges[0];
        if page >= count {
            page -= count;
            first = ranges[1].0;
        }
        let gpa = first + page * 4096;
        bad |= rt::read_u64(gpa) ^ gpa;
    }
    let cycles = rt::rdtsc() - start;
    rt::out().s("reads=").dec(cycles).s("/").dec(READS).s(" pages=").dec(pages).s("\n");
    u32::from(bad != 0)
}

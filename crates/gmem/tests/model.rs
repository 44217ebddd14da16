//! Random operation sequences on a bound, GUEST-sealed file, checked against
//! a small reference model: sizes, allocated pages, page content, the errno of
//! every refused operation, and the exact runs each invalidation reports.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{guest_file, Recorder};
use gmem::{Errno, Fallocate, FileOffset, PageIndex, PageRange, PAGE_SIZE};
use proptest::prelude::*;

const MAX_PAGES: u64 = 24;

#[derive(Clone, Debug)]
enum Op {
    SetLen { pages: u64, skew: u64 },
    Punch { start: u64, len: u64, skew: u64 },
    Allocate { start: u64, len: u64, keep_size: bool },
    Touch { page: u64, token: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    let skew = prop_oneof![4 => Just(0u64), 1 => 1..PAGE_SIZE];
    prop_oneof![
        1 => (0..=MAX_PAGES, skew.clone()).prop_map(|(pages, skew)| Op::SetLen { pages, skew }),
        1 => (0..MAX_PAGES, 0..8u64, skew).prop_map(|(start, len, skew)| Op::Punch { start, len, skew }),
        1 => (0..MAX_PAGES, 1..8u64, any::<bool>())
            .prop_map(|(start, len, keep_size)| Op::Allocate { start, len, keep_size }),
        3 => (0..MAX_PAGES + 2, 1..=255u8).prop_map(|(page, token)| Op::Touch { page, token }),
    ]
}

/// The model: size in pages and the content token of every allocated page
/// (0 = zero-filled).
#[derive(Default)]
struct Model {
    size: u64,
    pages: BTreeMap<u64, u8>,
}

impl Model {
    /// Allocated runs inside `start..end`, as the owner must be told.
    fn runs(&self, start: u64, end: u64) -> Vec<PageRange> {
        let mut runs: Vec<PageRange> = Vec::new();
        if start >= end {
            return runs;
        }
        for &page in self.pages.range(start..end).map(|(p, _)| p) {
            match runs.last_mut() {
                Some(run) if run.end.0 == page => run.end.0 += 1,
                _ => runs.push(PageRange::new(PageIndex(page), PageIndex(page + 1))),
            }
        }
        runs
    }
}

fn run(ops: Vec<Op>) {
    let file = guest_file(0);
    let owner = Arc::new(Recorder::default());
    let binding = file.bind(&owner).unwrap();
    let mut model = Model::default();
    for op in ops {
        let before = owner.ranges().len();
        let expected_runs;
        match op {
            Op::SetLen { pages, skew } => {
                let result = file.set_len(pages * PAGE_SIZE + skew);
                if skew != 0 {
                    assert_eq!(result.unwrap_err().errno(), Errno::INVAL);
                    expected_runs = vec![];
                } else {
                    result.unwrap();
                    expected_runs =
                        if pages < model.size { model.runs(pages, model.size) } else { vec![] };
                    model.pages.retain(|&p, _| p < pages);
                    model.size = pages;
                }
            }
            Op::Punch { start, len, skew } => {
                let result = file.fallocate(
                    Fallocate::PunchHole,
                    FileOffset(start * PAGE_SIZE + skew),
                    len * PAGE_SIZE,
                );
                if skew != 0 || len == 0 {
                    assert_eq!(result.unwrap_err().errno(), Errno::INVAL);
                    expected_runs = vec![];
                } else {
                    result.unwrap();
                    expected_runs = model.runs(start, (start + len).min(model.size));
                    model.pages.retain(|&p, _| !(start..start + len).contains(&p));
                }
            }
            Op::Allocate { start, len, keep_size } => {
                let mode =
                    if keep_size { Fallocate::AllocateKeepSize } else { Fallocate::Allocate };
                let result = file.fallocate(mode, FileOffset(start * PAGE_SIZE), len * PAGE_SIZE);
                if keep_size && start + len > model.size {
                    assert_eq!(result.unwrap_err().errno(), Errno::INVAL);
                } else {
                    result.unwrap();
                    model.size = model.size.max(start + len);
                    for page in start..start + len {
                        model.pages.entry(page).or_insert(0);
                    }
                }
                expected_runs = vec![];
            }
            Op::Touch { page, token } => {
                expected_runs = vec![];
                match binding.get_and_lock(PageIndex(page)) {
                    Err(e) => {
                        assert!(page >= model.size, "page {page} of {} refused: {e}", model.size);
                        assert_eq!(e.errno(), Errno::INVAL);
                    }
                    Ok(guard) => {
                        assert!(page < model.size);
                        let mut byte = [0xaa];
                        guard.read(0, &mut byte).unwrap();
                        let old = model.pages.insert(page, token).unwrap_or(0);
                        assert_eq!(byte[0], old, "page {page} content");
                        guard.write(0, &[token]).unwrap();
                    }
                }
            }
        }
        assert_eq!(owner.ranges()[before..], expected_runs[..], "invalidations");
        let stats = file.stats();
        assert_eq!(stats.size, model.size * PAGE_SIZE);
        assert_eq!(stats.allocated_pages, model.pages.len() as u64, "allocated pages");
        assert_eq!(stats.locked_pages, 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn file_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}

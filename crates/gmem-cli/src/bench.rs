//! `gmem bench`: side-by-side figures with ratios against a baseline
//! measured in the same run.

use std::time::Duration;

use gmem_kvm::DEFAULT_FAULT_AROUND_PAGES;
use gmem_runner::bench::{
    conversion_rate, conversions, first_touch, host_read_rate, huge_conversions, median,
    metadata_bytes_per_page, populate, punch, snapshots, sparse_snapshot_ratio, tlb_read_ns,
    touched_pages, virtio_blk, Backing,
};
use serde_json::json;

use crate::plot::{svg, Bar};

/// `gmem bench` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// MiB of guest memory each first-touch run touches.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16384))]
    mib: u64,
    /// Repetitions of each measurement (interleaved; the median counts).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    reps: u64,
    /// A short run (16 MiB, 3 repetitions), well under a minute.
    #[arg(long, conflicts_with_all = ["mib", "reps"])]
    quick: bool,
    /// vCPUs of the first-touch-smp row [default: the host's cores, at
    /// least 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=64))]
    vcpus: Option<u32>,
    /// Exit with status 1 when a figure misses its target (for CI jobs).
    #[arg(long)]
    check: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Huge pages for the huge-page rows [default: a tmpfs of its own,
    /// mounted with huge=always in a temporary directory, where it runs as
    /// root; the rows are left out otherwise].
    #[command(flatten)]
    huge: crate::args::HugePagesArg,
    /// Also draw the ratios into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
}

/// One line of the report.
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    baseline: f64,
    baseline_name: &'static str,
    /// gmem's figure over the baseline's, oriented so that higher is better.
    ratio: f64,
    /// The ratio to reach, where there is one.
    target: Option<f64>,
}

impl Figure {
    /// A figure where more is better (a rate).
    fn rate(name: &str, value: f64, unit: &'static str, baseline: (f64, &'static str)) -> Self {
        Self::new(name, value, unit, baseline, value / baseline.0)
    }

    /// A figure where less is better (a time, a cost).
    fn cost(name: &str, value: f64, unit: &'static str, baseline: (f64, &'static str)) -> Self {
        Self::new(name, value, unit, baseline, baseline.0 / value)
    }

    fn new(
        name: &str,
        value: f64,
        unit: &'static str,
        (baseline, baseline_name): (f64, &'static str),
        ratio: f64,
    ) -> Self {
        Self { name: name.into(), value, unit, baseline, baseline_name, ratio, target: None }
    }

    fn target(self, target: f64) -> Self {
        Self { target: Some(target), ..self }
    }

    fn met(&self) -> Option<bool> {
        self.target.map(|t| self.ratio >= t)
    }
}

/// Progress on stderr: overwriting one line on a terminal, a line each
/// elsewhere (a log).
fn progress(what: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprint!("\rgmem bench: {what:<60}");
    } else {
        eprintln!("gmem bench: {what}");
    }
}

/// Runs `gmem bench`; returns the process exit status.
pub(crate) fn bench(args: &BenchArgs) -> u8 {
    let (mib, reps) = if args.quick { (16, 3) } else { (args.mib, args.reps) };
    // The plot's file is created before anything is measured: a path that
    // cannot be written fails in a moment, not after the whole bench.
    let plot = match args.plot.as_ref().map(|path| std::fs::File::create(path).map(|f| (path, f))) {
        Some(Err(e)) => {
            eprintln!(
                "gmem bench: cannot write {}: {e}",
                args.plot.as_ref().map_or(String::new(), |p| p.display().to_string())
            );
            return 2;
        }
        Some(Ok(plot)) => Some(plot),
        None => None,
    };
    let mut figures = Vec::new();
    let native = native_runs();
    let measured = first_touch_figures(mib, reps, native, &mut figures)
        .and_then(|()| size_figures(mib, reps, args.vcpus, native, &mut figures))
        .and_then(|()| tlb_figures(mib, reps, &mut figures))
        .and_then(|()| populate_figures(mib, reps, native, &mut figures))
        .and_then(|()| punch_figures(mib, reps, &mut figures))
        .and_then(|()| conversion_figures(reps, native, &mut figures))
        .and_then(|()| virtio_figures(reps, &mut figures))
        .and_then(|()| host_access_figures(reps, &mut figures))
        .and_then(|()| metadata_figures(&mut figures))
        .and_then(|()| huge_figures(args, mib, reps, &mut figures))
        .and_then(|()| snapshot_figures(args.quick, reps, &mut figures))
        .and_then(|()| migration_figures(args.quick, reps, &mut figures));
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    if let Err(e) = measured {
        eprintln!("gmem bench: {e}");
        return 1;
    }
    if let Some((path, mut file)) = plot {
        let bars: Vec<_> = figures
            .iter()
            .map(|f| Bar { name: &f.name, ratio: f.ratio, target: f.target })
            .collect();
        let title = format!("gmem bench: ratios to baselines ({mib} MiB, median of {reps})");
        if let Err(e) = std::io::Write::write_all(&mut file, svg(&title, &bars).as_bytes()) {
            eprintln!("gmem bench: cannot write {}: {e}", path.display());
            return 2;
        }
        eprintln!("gmem bench: plot written to {}", path.display());
    }
    if args.json {
        let results: Vec<_> = figures
            .iter()
            .map(|f| {
                json!({
                    "name": f.name, "value": f.value, "unit": f.unit, "baseline": f.baseline,
                    "baseline_name": f.baseline_name, "ratio": f.ratio, "target": f.target,
                    "met": f.met(),
                })
            })
            .collect();
        println!("{}", json!({ "results": results }));
    } else {
        println!(
            "{:32} {:>16} {:>16} {:20} {:>8} {:>7}",
            "figure", "gmem", "baseline", "(baseline is)", "ratio", "target"
        );
        for f in &figures {
            let target = match (f.target, f.met()) {
                (Some(t), Some(true)) => format!("{t:>6.2}x met"),
                (Some(t), _) => format!("{t:>6.2}x NOT MET"),
                (None, _) => String::new(),
            };
            println!(
                "{:32} {:>9.2} {:6} {:>9.2} {:6} {:20} {:>7.2}x {target}",
                f.name, f.value, f.unit, f.baseline, f.unit, f.baseline_name, f.ratio
            );
        }
        println!(
            "(ratios: higher is better; first touch of {mib} MiB and conversions by real \
             guests, median of {reps} interleaved runs)"
        );
    }
    let missed: Vec<&str> =
        figures.iter().filter(|f| f.met() == Some(false)).map(|f| f.name.as_str()).collect();
    if args.check && !missed.is_empty() {
        eprintln!("gmem bench: targets not met: {}", missed.join(", "));
        return 1;
    }
    0
}

/// Whether the native backend runs here; else why not (said once).
fn native_runs() -> bool {
    match gmem_kvm::native::probe().map(|n| n.usable()) {
        Ok(Ok(())) => true,
        Ok(Err(why)) => {
            eprintln!("gmem bench: the native backend is not measured: {why}");
            false
        }
        Err(e) => {
            eprintln!("gmem bench: the native backend is not measured: {e}");
            false
        }
    }
}

/// First touch by the `touch` guest: gmem at several fault-arounds and the
/// native backend, against plain anonymous KVM memory.
fn first_touch_figures(
    mib: u64,
    reps: u64,
    native: bool,
    figures: &mut Vec<Figure>,
) -> Result<(), String> {
    let touch = gmem_guest::guest("touch").expect("the touch guest is built in");
    let fault_arounds = [DEFAULT_FAULT_AROUND_PAGES, 64, 1];
    let mut backings = vec![Backing::Anonymous];
    backings.extend(fault_arounds.iter().map(|&fault_around| Backing::Gmem { fault_around }));
    if native {
        backings.push(Backing::Native);
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); backings.len()];
    for rep in 1..=reps {
        progress(&format!("first touch of {mib} MiB, round {rep}/{reps}"));
        for (backing, samples) in backings.iter().zip(&mut samples) {
            let (time, _, _) = first_touch(touch, mib, backing.clone(), 1)
                .map_err(|e| format!("{backing:?}: {e}"))?;
            samples.push(time);
        }
    }
    let rate = |samples: &mut Vec<Duration>| mib as f64 / median(samples).as_secs_f64();
    let plain = (rate(&mut samples[0]), "plain KVM memory");
    let gmem = rate(&mut samples[1]);
    for (&pages, samples) in fault_arounds.iter().zip(samples.iter_mut().skip(1)) {
        let figure = if pages == DEFAULT_FAULT_AROUND_PAGES {
            Figure::rate("first-touch", rate(samples), "MiB/s", plain).target(1.0)
        } else {
            let name = format!("first-touch-fault-around-{pages}");
            Figure::rate(&name, rate(samples), "MiB/s", plain)
        };
        figures.push(figure);
    }
    if native {
        let native = rate(samples.last_mut().expect("the native samples"));
        figures.push(Figure::rate("native-first-touch", native, "MiB/s", plain));
        figures.push(
            Figure::rate("first-touch-vs-native", gmem, "MiB/s", (native, "native backend"))
                .target(1.0),
        );
    }
    Ok(())
}

/// Real VM sizes: first touch on `vcpus` vCPUs (by default as many as the
/// host has cores, at least 2), each its share, and a sparse first touch by
/// one vCPU (one page per 64 KiB of 32x as much RAM, at most 2 GiB, the
/// default), gmem against plain KVM memory; and the pages gmem allocates
/// per page the sparse guest touches.
fn size_figures(
    mib: u64,
    reps: u64,
    vcpus: Option<u32>,
    native: bool,
    figures: &mut Vec<Figure>,
) -> Result<(), String> {
    let cores = || std::thread::available_parallelism().map_or(2, |n| n.get().max(2)) as u32;
    let vcpus = vcpus.unwrap_or_else(cores);
    let touch = gmem_guest::guest("touch").expect("the touch guest is built in");
    let sparse = gmem_guest::guest("sparse").expect("the sparse guest is built in");
    let gmem = Backing::Gmem { fault_around: DEFAULT_FAULT_AROUND_PAGES };
    let sparse_mib = (32 * mib).min(2048);
    // Indexes: 0 plain, 1 gmem, 2 plain memfd (sparse only), 3 native.
    let mut backings = vec![Backing::Anonymous, gmem, Backing::Memfd];
    if native {
        backings.push(Backing::Native);
    }
    let (mut smp, mut sparse_times, mut per_page) =
        (vec![vec![]; backings.len()], vec![vec![]; backings.len()], vec![]);
    for rep in 1..=reps {
        progress(&format!("first touch on {vcpus} vCPUs, and sparse, round {rep}/{reps}"));
        for (i, backing) in backings.iter().enumerate() {
            if *backing != Backing::Memfd {
                let (time, _, _) = first_touch(touch, mib, backing.clone(), vcpus)
                    .map_err(|e| format!("smp: {e}"))?;
                smp[i].push(time);
            }
            let (time, console, allocated) = first_touch(sparse, sparse_mib, backing.clone(), 1)
                .map_err(|e| format!("sparse: {e}"))?;
            sparse_times[i].push(time);
            if let (Backing::Gmem { .. }, Some(allocated)) = (backing, allocated) {
                let touched = touched_pages(&console).ok_or_else(|| {
                    format!("no touched= in the sparse guest's report: {console}")
                })?;
                per_page.push(allocated as f64 / touched as f64);
            }
        }
    }
    let rate = |mib: u64, samples: &mut Vec<Duration>| mib as f64 / median(samples).as_secs_f64();
    for (name, mib, samples, target) in [
        ("first-touch-smp", mib, &mut smp, 1.0),
        ("first-touch-sparse", sparse_mib, &mut sparse_times, 0.8),
    ] {
        let ours = rate(mib, &mut samples[1]);
        let baseline = (rate(mib, &mut samples[0]), "plain KVM memory");
        figures.push(Figure::rate(name, ours, "MiB/s", baseline).target(target));
        if native {
            let native = (rate(mib, &mut samples[3]), "native backend");
            figures.push(
                Figure::rate(&format!("{name}-vs-native"), ours, "MiB/s", native).target(1.0),
            );
        }
    }
    // Where the sparse row's limit is: the kernel's own shmem fault, with
    // nothing of gmem, against gmem and against the native backend.
    let memfd = rate(sparse_mib, &mut sparse_times[2]);
    let ours = rate(sparse_mib, &mut sparse_times[1]);
    figures.push(Figure::rate(
        "first-touch-sparse-vs-memfd",
        ours,
        "MiB/s",
        (memfd, "plain memfd, kernel faults"),
    ));
    if native {
        let native = (rate(sparse_mib, &mut sparse_times[3]), "native backend");
        figures.push(Figure::rate("sparse-memfd-vs-native", memfd, "MiB/s", native));
    }
    per_page.sort_by(f64::total_cmp);
    let bound = (1.1, "bound: 1.1 per page touched");
    let allocated = per_page[per_page.len() / 2];
    figures.push(Figure::cost("memory-sparse", allocated, "pages/page", bound).target(1.0));
    Ok(())
}

/// The median of `samples` (not empty).
fn middle(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Random 8-byte reads over `mib` MiB of first-touched RAM, by the `tlb`
/// guest in user mode: gmem against plain KVM memory (both 4 KiB pages).
fn tlb_figures(mib: u64, reps: u64, figures: &mut Vec<Figure>) -> Result<(), String> {
    let tlb = gmem_guest::guest("tlb").expect("the tlb guest is built in");
    let gmem = Backing::Gmem { fault_around: DEFAULT_FAULT_AROUND_PAGES };
    let mut samples = [vec![], vec![]];
    for rep in 1..=reps {
        progress(&format!("random reads over {mib} MiB, round {rep}/{reps}"));
        for (backing, samples) in [Backing::Anonymous, gmem.clone()].into_iter().zip(&mut samples) {
            samples.push(tlb_read_ns(tlb, mib, backing).map_err(|e| format!("tlb: {e}"))?);
        }
    }
    let [plain, ours] = &mut samples;
    let baseline = (middle(plain), "plain KVM memory");
    figures.push(Figure::cost("tlb-random", middle(ours), "ns", baseline));
    Ok(())
}

/// Launch-time populate of private memory against a plain memcpy, on gmem
/// and on the native backend.
fn populate_figures(
    mib: u64,
    reps: u64,
    native: bool,
    figures: &mut Vec<Figure>,
) -> Result<(), String> {
    let (mut gmem, mut memcpy, mut on_native) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=reps {
        progress(&format!("populate {mib} MiB, round {rep}/{reps}"));
        let gmem_backing = Backing::Gmem { fault_around: DEFAULT_FAULT_AROUND_PAGES };
        let (g, m) = populate(mib, gmem_backing).map_err(|e| format!("populate: {e}"))?;
        gmem.push(g);
        memcpy.push(m);
        if native {
            let (n, _) = populate(mib, Backing::Native).map_err(|e| format!("populate: {e}"))?;
            on_native.push(n);
        }
    }
    let rate = |samples: &mut Vec<Duration>| mib as f64 / median(samples).as_secs_f64();
    let baseline = (rate(&mut memcpy), "memcpy to fresh memory");
    figures.push(Figure::rate("populate", rate(&mut gmem), "MiB/s", baseline).target(0.8));
    if native {
        figures.push(Figure::rate("native-populate", rate(&mut on_native), "MiB/s", baseline));
    }
    Ok(())
}

/// Punch with invalidation against raw punches of a memfd (unmapped and
/// mapped) and a guest_memfd.
fn punch_figures(mib: u64, reps: u64, figures: &mut Vec<Figure>) -> Result<(), String> {
    let (mut gmem, mut memfd, mut mapped, mut native, mut on_native) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=reps {
        progress(&format!("punch {mib} MiB, round {rep}/{reps}"));
        let times = punch(mib).map_err(|e| format!("punch: {e}"))?;
        gmem.push(times.gmem);
        memfd.push(times.memfd);
        mapped.push(times.mapped_memfd);
        native.extend(times.guest_memfd);
        on_native.extend(times.native);
    }
    let rate = |samples: &mut Vec<Duration>| mib as f64 / median(samples).as_secs_f64();
    let gmem = rate(&mut gmem);
    let raw = (rate(&mut memfd), "raw memfd punch");
    figures.push(Figure::rate("punch", gmem, "MiB/s", raw).target(0.8));
    let raw = (rate(&mut mapped), "raw punch, mapped memfd");
    figures.push(Figure::rate("punch-vs-mapped-memfd", gmem, "MiB/s", raw));
    if !native.is_empty() {
        let raw = (rate(&mut native), "raw guest_memfd punch");
        figures.push(Figure::rate("punch-vs-guest_memfd", gmem, "MiB/s", raw));
        if !on_native.is_empty() {
            figures.push(Figure::rate("native-punch", rate(&mut on_native), "MiB/s", raw));
        }
    }
    Ok(())
}

/// Conversion round trips (4 KiB, 2 MiB) against a bare port-I/O exit.
fn conversion_figures(reps: u64, native: bool, figures: &mut Vec<Figure>) -> Result<(), String> {
    let guest = gmem_guest::guest("convbench").expect("the convbench guest is built in");
    let (mut bare, mut small, mut large, mut small_native) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=reps {
        progress(&format!("conversion round trips, round {rep}/{reps}"));
        let gmem_backing = Backing::Gmem { fault_around: DEFAULT_FAULT_AROUND_PAGES };
        let times = conversions(guest, gmem_backing).map_err(|e| format!("conversions: {e}"))?;
        bare.push(times.bare_exit);
        small.push(times.convert_4k);
        large.push(times.convert_2m);
        if native {
            let times =
                conversions(guest, Backing::Native).map_err(|e| format!("conversions: {e}"))?;
            small_native.push(times.convert_4k);
        }
    }
    let micros = |samples: &mut Vec<Duration>| median(samples).as_secs_f64() * 1e6;
    let exit = (micros(&mut bare), "bare port-I/O exit");
    // Target: a 4 KiB conversion costs at most 3 bare exits.
    figures.push(Figure::cost("convert-4k", micros(&mut small), "us", exit).target(1.0 / 3.0));
    figures.push(Figure::cost("convert-2m", micros(&mut large), "us", exit));
    if native {
        figures.push(Figure::cost("native-convert-4k", micros(&mut small_native), "us", exit));
    }
    Ok(())
}

/// virtio-blk through bounce buffers against the same guest and device
/// with the data already in shared pages (64 KiB requests).
fn virtio_figures(reps: u64, figures: &mut Vec<Figure>) -> Result<(), String> {
    let guest = gmem_guest::guest("diskbench").expect("the diskbench guest is built in");
    let (mut bounced, mut direct) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        progress(&format!("virtio-blk, 64 KiB requests, round {rep}/{reps}"));
        let (b, d) =
            virtio_blk(guest, &std::env::temp_dir()).map_err(|e| format!("virtio-blk: {e}"))?;
        bounced.push(b);
        direct.push(d);
    }
    let baseline = (middle(&mut direct), "no bounce (64 KiB)");
    figures.push(Figure::rate("virtio-blk", middle(&mut bounced), "MiB/s", baseline).target(0.8));
    Ok(())
}

/// Snapshots of a 1 GiB guest (64 MiB with `--quick`; at most 3 rounds):
/// saving against a plain write of as many bytes (durable: both end with
/// `fsync`; and into the page cache only), a lazy restore against
/// an eager one (until the guest may run, and until it exits after
/// revisiting a tenth of its memory), and snapshot bytes per byte of a
/// sparse guest and per byte changed for a diff.
fn snapshot_figures(quick: bool, reps: u64, figures: &mut Vec<Figure>) -> Result<(), String> {
    let ram: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let guest = gmem_guest::guest("revisit").expect("the revisit guest is built in");
    let reps = reps.min(3);
    let mut rounds = Vec::new();
    for rep in 1..=reps {
        progress(&format!("snapshots of {} MiB, round {rep}/{reps}", ram >> 20));
        rounds.push(
            snapshots(guest, ram, &std::env::temp_dir()).map_err(|e| format!("snapshots: {e}"))?,
        );
    }
    let mib = rounds[0].bytes as f64 / f64::from(1 << 20);
    let times = |pick: fn(&gmem_runner::bench::SnapshotFigures) -> Duration| {
        let mut samples: Vec<Duration> = rounds.iter().map(pick).collect();
        median(&mut samples).as_secs_f64()
    };
    let (save, plain) = (mib / times(|r| r.save), mib / times(|r| r.plain_write));
    let baseline = (plain, "plain write + fsync");
    figures.push(Figure::rate("snapshot", save, "MiB/s", baseline).target(0.8));
    let (save, plain) = (mib / times(|r| r.save_cached), mib / times(|r| r.plain_write_cached));
    figures.push(Figure::rate("snapshot-cached", save, "MiB/s", (plain, "plain write")));
    let ms = 1e3;
    let (lazy, eager) = (times(|r| r.restore_lazy) * ms, times(|r| r.restore_eager) * ms);
    figures.push(Figure::cost("restore-lazy", lazy, "ms", (eager, "eager restore")).target(10.0));
    let (lazy, eager) = (times(|r| r.run_lazy) * ms, times(|r| r.run_eager) * ms);
    let baseline = (eager, "run after eager");
    figures.push(Figure::cost("restore-run", lazy, "ms", baseline).target(1.0));
    let sparse_guest = gmem_guest::guest("sparse").expect("the sparse guest is built in");
    progress("snapshot of a sparse guest");
    let sparse =
        sparse_snapshot_ratio(sparse_guest, ram).map_err(|e| format!("sparse snapshot: {e}"))?;
    let bound = (1.1, "bound: 1.1 per byte");
    figures.push(Figure::cost("snapshot-sparse", sparse, "x", bound).target(1.0));
    let mut diffs: Vec<f64> =
        rounds.iter().map(|r| r.diff_bytes as f64 / r.changed_bytes as f64).collect();
    let bound = (1.1, "bound: 1.1 per byte changed");
    figures.push(Figure::cost("diff-snapshot", middle(&mut diffs), "x", bound).target(1.0));
    Ok(())
}

/// Live migrations of a 1 GiB `dirty` guest (64 MiB with `--quick`; at
/// most 3 rounds) between two VMs over a Unix socket pair: the pause of a
/// pre-copy while the guest rewrites 1% of its pages every 100 ms,
/// against the whole migration; pages sent per page allocated, pre-copy
/// (that guest) and post-copy; and the rate memory moves at (nothing
/// changing meanwhile) against a plain copy of as many bytes over a Unix
/// socket pair into fresh memory (as a destination's), and into memory
/// already there.
fn migration_figures(quick: bool, reps: u64, figures: &mut Vec<Figure>) -> Result<(), String> {
    use gmem_kvm::MigrationMode::{PostCopy, PreCopy};
    let ram: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let guest = gmem_guest::guest("dirty").expect("the dirty guest is built in");
    let migrate = |mode, paced| {
        gmem_runner::bench::migration(guest, ram, mode, paced)
            .map_err(|e| format!("migration: {e}"))
    };
    let (mut pauses, mut totals, mut precopy, mut postcopy) = (vec![], vec![], vec![], vec![]);
    let (mut moved, mut plain, mut warm) = (vec![], vec![], vec![]);
    let mib = |bytes: u64, time: Duration| bytes as f64 / f64::from(1 << 20) / time.as_secs_f64();
    for rep in 1..=reps.min(3) {
        progress(&format!("migrations of {} MiB, round {rep}/{}", ram >> 20, reps.min(3)));
        let live = migrate(PreCopy, true)?;
        pauses.push(live.info.downtime.as_secs_f64() * 1e3);
        totals.push(live.info.total.as_secs_f64() * 1e3);
        precopy.push(live.info.pages() as f64 / live.allocated as f64);
        let post = migrate(PostCopy, false)?;
        postcopy.push(post.info.pages() as f64 / post.allocated as f64);
        let still = migrate(PreCopy, false)?;
        moved.push(mib(still.info.pages() * gmem::PAGE_SIZE, still.info.total));
        plain.push(mib(still.info.pages() * gmem::PAGE_SIZE, still.plain_copy));
        warm.push(mib(still.info.pages() * gmem::PAGE_SIZE, still.plain_copy_warm));
    }
    let total = (middle(&mut totals), "whole migration");
    figures.push(Figure::cost("migrate-downtime", middle(&mut pauses), "ms", total).target(20.0));
    let bound = (1.5, "bound: 1.5 per page allocated");
    figures
        .push(Figure::cost("migrate-pages-precopy", middle(&mut precopy), "x", bound).target(1.0));
    let bound = (1.0, "bound: 1.0 per page allocated");
    figures.push(
        Figure::cost("migrate-pages-postcopy", middle(&mut postcopy), "x", bound).target(1.0),
    );
    let moved = middle(&mut moved);
    let baseline = (middle(&mut plain), "plain copy, Unix socket");
    figures.push(Figure::rate("migrate-throughput", moved, "MiB/s", baseline).target(0.7));
    let baseline = (middle(&mut warm), "the same, memory there");
    figures.push(Figure::rate("migrate-throughput-warm", moved, "MiB/s", baseline));
    Ok(())
}

/// Host accesses from many threads: `read` throughput on every core
/// against one thread, and 4 KiB conversions of one page while device
/// threads (one fewer than the cores, at least one) read other pages,
/// against none.
fn host_access_figures(reps: u64, figures: &mut Vec<Figure>) -> Result<(), String> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let readers = cores.saturating_sub(1).max(1);
    let time = Duration::from_millis(200);
    let (mut one, mut all, mut alone, mut busy) = (vec![], vec![], vec![], vec![]);
    for rep in 1..=reps {
        progress(&format!("host reads and conversions on {cores} threads, round {rep}/{reps}"));
        let rate = |threads| host_read_rate(threads, time).map_err(|e| format!("host reads: {e}"));
        one.push(rate(1)? / f64::from(1 << 20));
        all.push(rate(cores)? / f64::from(1 << 20));
        let rate =
            |readers| conversion_rate(readers, time).map_err(|e| format!("conversions: {e}"));
        alone.push(rate(0)?);
        busy.push(rate(readers)?);
    }
    let baseline = (middle(&mut one) * cores as f64, "one thread x cores");
    figures
        .push(Figure::rate("host-read-threads", middle(&mut all), "MiB/s", baseline).target(0.8));
    let baseline = (middle(&mut alone), "no device threads");
    figures
        .push(Figure::rate("view-contention", middle(&mut busy), "conv/s", baseline).target(0.9));
    Ok(())
}

/// Per-page metadata of a 16 GiB sparse guest, against the single-digit
/// bound (9 bytes per page).
fn metadata_figures(figures: &mut Vec<Figure>) -> Result<(), String> {
    const RAM: u64 = 16 << 30;
    progress("metadata of a 16 GiB sparse guest");
    let bytes = metadata_bytes_per_page(RAM).map_err(|e| format!("metadata: {e}"))?;
    let bound = (9.0, "single-digit bound");
    figures.push(Figure::cost("metadata-bytes-per-page", bytes, "B/page", bound).target(1.0));
    Ok(())
}

/// Guest RAM of the huge-page rows that the issue sizes at 1 GiB (64 MiB
/// for `--quick`).
fn huge_ram_mib(args: &BenchArgs) -> u64 {
    if args.quick {
        64
    } else {
        1024
    }
}

/// The huge pages to measure on: `--huge-pages`, or a tmpfs of our own
/// (root); `Err` says why the rows are left out.
fn huge_pages_for(args: &BenchArgs) -> Result<(gmem::HugePages, Option<gmem::TmpfsMount>), String> {
    if let Some(huge) = &args.huge.huge_pages {
        huge.offered().map_err(|why| format!("--huge-pages {huge}: {why}"))?;
        return Ok((huge.clone(), None));
    }
    if !rustix::process::geteuid().is_root() {
        return Err("not root: no tmpfs of its own can be mounted (give --huge-pages DIR)".into());
    }
    let size = (2 * huge_ram_mib(args) + 256) << 20;
    let mount = gmem::TmpfsMount::huge(size).map_err(|e| format!("mounting a tmpfs: {e}"))?;
    Ok((mount.huge_pages(), Some(mount)))
}

/// Guests on 2 MiB pages: first touch against anonymous memory with
/// transparent huge pages, random reads against 4 KiB gmem pages, the
/// memory and the time of 4 KiB conversions inside huge pages, and how
/// soon and at what cost split pages are huge again.
fn huge_figures(
    args: &BenchArgs,
    mib: u64,
    reps: u64,
    figures: &mut Vec<Figure>,
) -> Result<(), String> {
    let (huge, _mount) = match huge_pages_for(args) {
        Ok(huge) => huge,
        Err(why) => {
            eprintln!("gmem bench: the huge-page rows are left out: {why}");
            return Ok(());
        }
    };
    let on_huge = Backing::GmemHuge(huge);
    let small = Backing::Gmem { fault_around: DEFAULT_FAULT_AROUND_PAGES };
    let guest = |name| gmem_guest::guest(name).expect("built in");
    let big = huge_ram_mib(args);
    let (mut touch, mut tlb, mut conv) = ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
    let (mut after_convert, mut huge_again, mut collapse_cost) = (vec![], vec![], vec![]);
    // Round 0 warms up and is not counted: memory this machine has not
    // used for a while costs milliseconds per 2 MiB on its first use here
    // (a VM's RAM, backed lazily by its own host), whoever touches it.
    for rep in 0..=reps {
        progress(&format!("huge pages, round {rep}/{reps}"));
        if rep == 1 {
            touch.iter_mut().chain(&mut tlb).chain(&mut conv).for_each(Vec::clear);
            after_convert.clear();
            huge_again.clear();
            collapse_cost.clear();
        }
        for (backing, samples) in [&on_huge, &Backing::AnonymousHuge].into_iter().zip(&mut touch) {
            let (time, _, _) = first_touch(guest("touch"), mib, backing.clone(), 1)
                .map_err(|e| format!("first touch on huge pages: {e}"))?;
            samples.push(mib as f64 / time.as_secs_f64());
        }
        for (backing, samples) in [&on_huge, &small].into_iter().zip(&mut tlb) {
            let ns = tlb_read_ns(guest("tlb"), big, backing.clone())
                .map_err(|e| format!("tlb on huge pages: {e}"))?;
            samples.push(ns);
        }
        let ram = (big + 8) << 20;
        for (backing, samples) in [&on_huge, &small].into_iter().zip(&mut conv) {
            let seen = huge_conversions(guest("hugeconv"), backing, ram)
                .map_err(|e| format!("conversions on huge pages: {e}"))?;
            samples.push(seen.convert_4k.as_secs_f64() * 1e6);
            if matches!(backing, Backing::GmemHuge(_)) {
                after_convert.push(seen.allocated_converted as f64 / seen.allocated_touched as f64);
                huge_again.extend(seen.huge_again_after.map(|d| d.as_secs_f64() * 1e3));
                collapse_cost.extend(seen.collapse_cost.map(|d| d.as_secs_f64() * 1e6));
            }
        }
    }
    let [gmem, anonymous] = &mut touch;
    let baseline = (middle(anonymous), "anonymous THP");
    figures.push(Figure::rate("first-touch-huge", middle(gmem), "MiB/s", baseline).target(1.0));
    let [on_huge, on_small] = &mut tlb;
    let baseline = (middle(on_small), "gmem 4 KiB pages");
    figures.push(Figure::cost("tlb-huge", middle(on_huge), "ns", baseline).target(1.2));
    let bound = (1.01, "bound: 1.01x before");
    figures.push(
        Figure::cost("memory-after-convert", middle(&mut after_convert), "x", bound).target(1.0),
    );
    let [on_huge, on_small] = &mut conv;
    let baseline = (middle(on_small), "on 4 KiB pages");
    figures.push(Figure::cost("convert-4k-huge", middle(on_huge), "us", baseline).target(0.5));
    if huge_again.is_empty() || collapse_cost.is_empty() {
        return Err("split 2 MiB pages were not made huge again within 10 s".into());
    }
    let delay = gmem_kvm::collapse::COLLAPSE_AFTER.as_secs_f64() * 1e3;
    figures.push(Figure::cost(
        "collapse",
        middle(&mut huge_again),
        "ms",
        (delay, "the delay asked"),
    ));
    let copy = (middle(&mut copy_2m_micros()), "2 MiB memcpy");
    figures.push(Figure::cost("collapse-cost", middle(&mut collapse_cost), "us", copy));
    Ok(())
}

/// Microseconds of copying 2 MiB between two buffers already touched: 21 samples.
fn copy_2m_micros() -> Vec<f64> {
    let src = vec![1u8; 2 << 20];
    let mut dst = vec![0u8; 2 << 20];
    (0..21)
        .map(|_| {
            let start = std::time::Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

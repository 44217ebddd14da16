//! Arguments of `gmem run` and their parsers.

use clap::{Args, ValueEnum};

/// Where guest memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Backend {
    /// The user-space backend, unless the kernel's guest_memfd protects
    /// more on this host (`gmem probe` says which, and why).
    Auto,
    /// The kernel's guest_memfd (refused where it does not serve guests).
    Native,
    /// gmem's user-space backend: sealed memfds served through userfaultfd.
    Userspace,
}

/// `--migrate-mode`: how memory moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum MigrateMode {
    /// All of memory while the guest runs, then rounds of what changed,
    /// then a short pause for the rest.
    Precopy,
    /// Pause at once; the destination runs and pulls pages as it touches
    /// them while the rest are pushed.
    Postcopy,
    /// One round of everything while the guest runs (two at most), then
    /// post-copy.
    Hybrid,
}

impl From<MigrateMode> for gmem_kvm::MigrationMode {
    fn from(mode: MigrateMode) -> Self {
        match mode {
            MigrateMode::Precopy => Self::PreCopy,
            MigrateMode::Postcopy => Self::PostCopy,
            MigrateMode::Hybrid => Self::Hybrid,
        }
    }
}

/// One `--sync N:ACTION`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SyncSpec {
    pub(crate) stage: u64,
    pub(crate) action: Action,
}

/// A host action at a sync point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Discard the range from its backing.
    Punch { gpa: u64, len: u64 },
    /// Read guest memory.
    Read { gpa: u64, len: u64 },
    /// Write bytes into guest memory.
    Write { gpa: u64, data: Vec<u8> },
}

impl Action {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Action::Punch { .. } => "punch",
            Action::Read { .. } => "read",
            Action::Write { .. } => "write",
        }
    }

    pub(crate) fn range(&self) -> (u64, u64) {
        match self {
            Action::Punch { gpa, len } | Action::Read { gpa, len } => (*gpa, *len),
            Action::Write { gpa, data } => (*gpa, data.len() as u64),
        }
    }
}

/// `gmem run` arguments (GUEST_ABI 1.2, "Host side of gmem run").
#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// Guest ELF image: a path, or the name of a built-in guest (badbell,
    /// badport, convbench, convert, convsmp, convstorm, demo, dirty, halt, hugeconv,
    /// hypercall, memmap, punch, revisit, smp, sparse, spin, stress, tlb,
    /// touch, user, disk, diskbench). Default: the demo guest. Without
    /// --sync, a built-in guest gets its own host side (demo, convert,
    /// punch, user, stress).
    #[arg(long)]
    pub(crate) guest: Option<String>,
    /// Guest RAM size, e.g. 64M, 1G (a multiple of 2 MiB, at most 64G)
    /// [default: 64M; a restored snapshot's own].
    #[arg(long, value_parser = parse_size)]
    pub(crate) mem: Option<u64>,
    /// Number of vCPUs, one thread each [default: 1; 2 for convsmp].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=255))]
    pub(crate) vcpus: Option<u32>,
    /// Stop the guest after this many seconds (exit status 124); 0 = never
    /// [default: 60; 2 for spin and halt, which never exit].
    #[arg(long, value_parser = parse_timeout)]
    pub(crate) timeout: Option<f64>,
    /// Memory backend.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub(crate) backend: Backend,
    /// Host action at sync stage N: N:punch:GPA:LEN, N:read:GPA:LEN or
    /// N:write:GPA:HEX. Repeatable; a stage's actions run in order.
    #[arg(long = "sync", value_name = "N:ACTION", value_parser = parse_sync)]
    pub(crate) syncs: Vec<SyncSpec>,
    /// Pages served per fault on the user-space backend: a power of two
    /// from 1 to 512, decimal or 0x-prefixed hex.
    #[arg(long, default_value_t = gmem_kvm::DEFAULT_FAULT_AROUND_PAGES, value_parser = parse_fault_around)]
    pub(crate) fault_around: u64,
    /// Also take KVM_HC_MAP_GPA_RANGE hypercalls (vmcall, RAX = 12) as
    /// conversion requests, where KVM offers hypercall exits. Off by
    /// default: on kvm_pvm hosts a vmcall hangs the vCPU regardless.
    #[arg(long)]
    pub(crate) hypercall_exits: bool,
    /// A virtio-blk disk for the guest (GUEST_ABI 1.1 devices): PATH, or
    /// PATH:SIZE; created with SIZE bytes (default 8M) if missing.
    #[arg(long, value_name = "PATH[:SIZE]", value_parser = parse_disk)]
    pub(crate) disk: Option<(std::path::PathBuf, u64)>,
    #[command(flatten)]
    pub(crate) huge: HugePagesArg,
    /// At sync stage N, after that stage's --sync actions, save a snapshot
    /// of the VM to PATH (sealed with --key-file; written whole or not at
    /// all) and stop: exit status 0, JSON reason "saved". If it cannot be
    /// saved, the guest runs on to its end and the exit status is 4.
    #[arg(long = "save-at", value_name = "N:PATH", value_parser = parse_save_at)]
    pub(crate) save_at: Option<(u64, std::path::PathBuf)>,
    /// With --save-at on a restored VM: save only what changed since BASE,
    /// the last snapshot given to --restore (a diff, restored on top of it).
    #[arg(long = "save-diff", value_name = "BASE", requires = "save_at", requires = "restore")]
    pub(crate) save_diff: Option<std::path::PathBuf>,
    /// The key snapshots are sealed with: a file of exactly 32 bytes.
    #[arg(long = "key-file", value_name = "KEY")]
    pub(crate) key_file: Option<std::path::PathBuf>,
    /// Resume the VM of a snapshot instead of booting a guest: a full
    /// snapshot, then diffs on it in order (repeatable). Memory comes
    /// lazily, as the guest touches it. --sync gives the host side of the
    /// stages still to come; --disk the same disk file again.
    #[arg(long = "restore", value_name = "PATH", conflicts_with = "guest")]
    pub(crate) restore: Vec<std::path::PathBuf>,
    /// With --restore: read and check all of memory before the guest runs.
    #[arg(long = "restore-eager", requires = "restore")]
    pub(crate) restore_eager: bool,
    /// With --restore: fetch the memory the guest has not touched yet in
    /// the background while it runs.
    #[arg(long, requires = "restore", conflicts_with = "restore_eager")]
    pub(crate) prefetch: bool,
    /// Migrate the running VM to a `gmem run --incoming` at ADDR
    /// (tcp:HOST:PORT or unix:PATH), sealed with --key-file. The source
    /// stops once the destination runs the VM: exit status 0, JSON reason
    /// "migrated". If it fails before that, the guest runs on here to its
    /// end and the exit status is 5.
    #[arg(long = "migrate-to", value_name = "ADDR", value_parser = parse_address, conflicts_with_all = ["save_at", "incoming"])]
    pub(crate) migrate_to: Option<gmem_runner::MigrationAddress>,
    /// With --migrate-to: start at sync stage N (after its --sync actions;
    /// the vCPU that reached it waits there, the others run on) instead of
    /// at once.
    #[arg(long = "migrate-at", value_name = "N", value_parser = parse_number, requires = "migrate_to")]
    pub(crate) migrate_at: Option<u64>,
    /// With --migrate-to: how memory moves.
    #[arg(long = "migrate-mode", value_enum, default_value_t = MigrateMode::Precopy, requires = "migrate_to")]
    pub(crate) migrate_mode: MigrateMode,
    /// Instead of booting a guest, wait at ADDR (tcp:HOST:PORT or
    /// unix:PATH) for a VM migrated by `gmem run --migrate-to`, then run
    /// it (--timeout bounds the wait too). --sync gives the host side of
    /// the stages still to come; --disk the same disk file (shared storage).
    #[arg(long, value_name = "ADDR", value_parser = parse_address, conflicts_with_all = ["guest", "restore", "save_at", "mem", "vcpus"])]
    pub(crate) incoming: Option<gmem_runner::MigrationAddress>,
    /// Print one JSON object on stdout at the end (console still on stderr).
    #[arg(long)]
    pub(crate) json: bool,
}

/// `--huge-pages`: guest RAM on 2 MiB pages (user-space backend).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct HugePagesArg {
    /// Guest RAM on 2 MiB pages: DIR, a tmpfs mounted with huge=always or
    /// huge=within_size (files are created there, unnamed); `memfd`, where
    /// the host's shmem_enabled gives memfds huge pages; or `hugetlb`, the
    /// host's reserved hugetlbfs pool. `gmem probe` lists what this host
    /// offers. User-space backend only.
    #[arg(long = "huge-pages", value_name = "DIR|memfd|hugetlb", value_parser = parse_huge_pages)]
    pub(crate) huge_pages: Option<gmem::HugePages>,
}

fn parse_huge_pages(text: &str) -> Result<gmem::HugePages, String> {
    match text {
        "" => Err("--huge-pages takes DIR, memfd or hugetlb".into()),
        "hugetlb" => Ok(gmem::HugePages::HugeTlb),
        "memfd" => Ok(gmem::HugePages::Memfd),
        dir => Ok(gmem::HugePages::Tmpfs(dir.into())),
    }
}

/// `tcp:HOST:PORT` or `unix:PATH`.
fn parse_address(text: &str) -> Result<gmem_runner::MigrationAddress, String> {
    text.parse()
}

/// `N:PATH`: a sync stage and where to save a snapshot.
fn parse_save_at(text: &str) -> Result<(u64, std::path::PathBuf), String> {
    let (stage, path) = text.split_once(':').ok_or(format!("'{text}': expected N:PATH"))?;
    let stage = parse_number(stage).map_err(|e| format!("'{text}': stage: {e}"))?;
    if path.is_empty() {
        return Err(format!("'{text}': expected N:PATH"));
    }
    Ok((stage, path.into()))
}

/// `PATH` or `PATH:SIZE` (a whole number of 512-byte sectors, at most 1 TiB).
fn parse_disk(text: &str) -> Result<(std::path::PathBuf, u64), String> {
    let (path, size) = match text.rsplit_once(':') {
        Some((path, size)) => (path, parse_size(size)?),
        None => (text, 8 << 20),
    };
    if path.is_empty() || size == 0 || size % 512 != 0 || size > 1 << 40 {
        return Err(format!(
            "'{text}': a disk is PATH or PATH:SIZE, SIZE a multiple of 512 up to 1T"
        ));
    }
    Ok((path.into(), size))
}

/// A number in decimal or 0x-prefixed hex.
pub(crate) fn parse_number(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is not a decimal or 0x-prefixed hex number"))
}

/// A size with an optional K, M or G suffix (powers of 1024).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&text[..text.len() - 1], 10),
        Some(b'M') => (&text[..text.len() - 1], 20),
        Some(b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value = parse_number(digits)?;
    value.checked_mul(1 << shift).ok_or_else(|| format!("size '{text}' is too large"))
}

/// The longest `--timeout`: ten years, in seconds.
pub(crate) const MAX_TIMEOUT: f64 = 10.0 * 365.0 * 86400.0;

fn parse_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if (0.0..=MAX_TIMEOUT).contains(&t) => Ok(t),
        _ => Err(format!("'{text}' is not a number of seconds from 0 to {MAX_TIMEOUT}")),
    }
}

/// Pages per fault: a power of two from 1 to 512.
fn parse_fault_around(text: &str) -> Result<u64, String> {
    match parse_number(text)? {
        pages if pages.is_power_of_two() && pages <= 512 => Ok(pages),
        pages => Err(format!("{pages} pages: fault-around is a power of two from 1 to 512")),
    }
}

/// The most bytes one `read` sync may ask for.
pub(crate) const MAX_SYNC_READ: u64 = 16 << 20;

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.as_bytes();
    if digits.is_empty() || digits.len() % 2 != 0 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!("'{text}': write data must be hex digits, two per byte"));
    }
    let nibble = |d: u8| (d as char).to_digit(16).unwrap_or(0) as u8;
    Ok(digits.chunks_exact(2).map(|pair| nibble(pair[0]) << 4 | nibble(pair[1])).collect())
}

/// `N:punch:GPA:LEN`, `N:read:GPA:LEN` or `N:write:GPA:HEX`.
pub(crate) fn parse_sync(text: &str) -> Result<SyncSpec, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [stage, action, gpa, arg] = parts[..] else {
        return Err(format!(
            "'{text}': expected N:punch:GPA:LEN, N:read:GPA:LEN or N:write:GPA:HEX"
        ));
    };
    let (stage, gpa) = (parse_number(stage)?, parse_number(gpa)?);
    let action = match action {
        "punch" => Action::Punch { gpa, len: parse_number(arg)? },
        "read" => Action::Read { gpa, len: parse_number(arg)? },
        "write" => Action::Write { gpa, data: parse_hex(arg)? },
        other => return Err(format!("unknown sync action '{other}' (punch, read, write)")),
    };
    if action.range().1 == 0 {
        return Err(format!("'{text}': the range is empty"));
    }
    if matches!(action, Action::Read { len, .. } if len > MAX_SYNC_READ) {
        return Err(format!("'{text}': a read sync reads at most {MAX_SYNC_READ:#x} bytes"));
    }
    Ok(SyncSpec { stage, action })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` names every built-in guest, so that the list cannot go stale.
    #[test]
    fn help_lists_every_built_in_guest() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let help = Cli::command().render_long_help().to_string();
        for (name, _) in gmem_guest::GUESTS {
            assert!(help.contains(name), "--help does not name the {name} guest");
        }
    }

    #[test]
    fn sizes_and_numbers() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("0x200000"), Ok(0x20_0000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert!(parse_number("0xzz").is_err());
    }

    #[test]
    fn sync_specs() {
        assert_eq!(
            parse_sync("1:punch:0x600000:8192"),
            Ok(SyncSpec { stage: 1, action: Action::Punch { gpa: 0x60_0000, len: 8192 } })
        );
        assert_eq!(
            parse_sync("2:write:4096:414243"),
            Ok(SyncSpec { stage: 2, action: Action::Write { gpa: 4096, data: b"ABC".to_vec() } })
        );
        for bad in [
            "1:punch:0x1000",
            "x:read:0:1",
            "1:poke:0:1",
            "1:write:0:414",
            "1:write:0:zz",
            "1:read:0:0",
            // Not ASCII: must not be sliced inside a character.
            "1:write:0x800000:aéb",
            "1:write:0:é1",
            // `+1` is not two hex digits.
            "1:write:0:+1",
            // An absurd read is refused before anything is allocated.
            "1:read:0:0xf00000000",
        ] {
            assert!(parse_sync(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_hex("00fFa5"), Ok(vec![0, 0xff, 0xa5]));
    }

    #[test]
    fn disks() {
        assert_eq!(parse_disk("d.img"), Ok(("d.img".into(), 8 << 20)));
        assert_eq!(parse_disk("/tmp/d.img:1M"), Ok(("/tmp/d.img".into(), 1 << 20)));
        // A SIZE without a PATH used to create a file named ':8M'.
        for bad in [":8M", ":", "", "d.img:", "d.img:100", "d.img:0", "d.img:2T"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timeouts_and_fault_around() {
        assert_eq!(parse_timeout("0.5"), Ok(0.5));
        assert_eq!(parse_timeout("0"), Ok(0.0));
        for bad in ["1e19", "1e20", "-1", "NaN", "inf", "-0.5", "x"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_fault_around("0x10"), Ok(16));
        assert_eq!(parse_fault_around("512"), Ok(512));
        for bad in ["0", "3", "1024", "1048576", "-1"] {
            assert!(parse_fault_around(bad).is_err(), "{bad}");
        }
    }
}

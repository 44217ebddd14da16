//! Files on 2 MiB pages: where their huge pages come from, and what this
//! host offers.
//!
//! Two kinds exist. Transparent huge pages of shmem (a file on a tmpfs
//! mounted with `huge=`, or a memfd where `shmem_enabled` allows) are
//! split by a 4 KiB hole punch, so a 4 KiB conversion discards exactly
//! 4 KiB, and are made huge again by `MADV_COLLAPSE`. hugetlbfs pages are
//! reserved by the host and never split: a file on them takes 2 MiB
//! punches only (`EINVAL` otherwise), so nothing ever discards a whole
//! huge page for 4 KiB.
//!
//! Nothing here changes a host-wide setting: `shmem_enabled` and
//! `nr_hugepages` are only read.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{self, MemfdFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// The huge page size gmem uses: 2 MiB (x86-64's PMD size).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// `TMPFS_MAGIC` of `statfs`.
const TMPFS_MAGIC: i64 = 0x0102_1994;

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Where a file's 2 MiB pages come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HugePages {
    /// Transparent huge pages of a file created (`O_TMPFILE`) on the tmpfs
    /// at this directory, mounted with `huge=always`, `huge=within_size`
    /// or `huge=advise`.
    Tmpfs(PathBuf),
    /// Transparent huge pages of a memfd, where the host's
    /// `shmem_enabled` is `always`, `within_size`, `advise` or `force`.
    Memfd,
    /// hugetlbfs pages (`MFD_HUGETLB | MFD_HUGE_2MB`), from the host's
    /// reserved pool: never split.
    HugeTlb,
}

/// How a file's pages are sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// 4 KiB pages (an ordinary memfd).
    Small,
    /// Transparent 2 MiB pages of shmem: a 4 KiB punch splits one.
    TransparentHuge,
    /// hugetlbfs 2 MiB pages: never split.
    HugeTlb,
}

impl PageKind {
    /// The size of the file's pages as the kernel allocates them.
    pub fn page_size(self) -> u64 {
        match self {
            PageKind::Small => crate::PAGE_SIZE,
            PageKind::TransparentHuge | PageKind::HugeTlb => HUGE_PAGE_SIZE,
        }
    }

    /// The smallest unit a punch may free: 4 KiB, except on hugetlbfs.
    pub fn punch_unit(self) -> u64 {
        match self {
            PageKind::HugeTlb => HUGE_PAGE_SIZE,
            _ => crate::PAGE_SIZE,
        }
    }
}

/// Why a kind of huge pages is unavailable: `EINVAL` (or the kernel's
/// errno where it refused).
fn unavailable(what: &HugePages, why: String) -> Error {
    Error::NoHugePages { what: what.to_string(), why }
}

impl std::fmt::Display for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HugePages::Tmpfs(dir) => write!(f, "tmpfs huge pages at {}", dir.display()),
            HugePages::Memfd => f.write_str("memfd transparent huge pages"),
            HugePages::HugeTlb => f.write_str("hugetlbfs pages"),
        }
    }
}

impl HugePages {
    /// Creates an empty file of this kind (close-on-exec, mode 0600) and
    /// says which kind of pages it has and whether the kernel seals it.
    pub(crate) fn create(&self, name: &str) -> Result<(OwnedFd, PageKind, bool)> {
        match self {
            HugePages::Tmpfs(dir) => {
                tmpfs_huge_option(dir).map_err(|why| unavailable(self, why))?;
                // O_TMPFILE: the file has no name, and goes with its last fd.
                let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
                let fd = fs::open(dir, flags, Mode::RUSR | Mode::WUSR)
                    .map_err(|errno| Error::Os { op: "open(O_TMPFILE)", errno })?;
                // Kernel seals exist for memfds only.
                Ok((fd, PageKind::TransparentHuge, false))
            }
            HugePages::Memfd => {
                memfd_thp_setting().map_err(|why| unavailable(self, why))?;
                let fd = memfd(name, MemfdFlags::empty())?;
                Ok((fd, PageKind::TransparentHuge, true))
            }
            HugePages::HugeTlb => {
                let fd =
                    memfd(name, MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB).map_err(|e| match e
                        .errno()
                    {
                        Errno::INVAL | Errno::NOENT | Errno::NOSYS => {
                            unavailable(self, format!("memfd_create(MFD_HUGETLB): {}", e.errno()))
                        }
                        _ => e,
                    })?;
                Ok((fd, PageKind::HugeTlb, true))
            }
        }
    }

    /// Whether this host offers these huge pages, and why not: what `gmem
    /// probe` lists. hugetlbfs counts as offered while it has free pages.
    pub fn offered(&self) -> std::result::Result<String, String> {
        match self {
            HugePages::Tmpfs(dir) => tmpfs_huge_option(dir).map(|o| format!("tmpfs huge={o}")),
            HugePages::Memfd => memfd_thp_setting().map(|s| format!("shmem_enabled={s}")),
            HugePages::HugeTlb => {
                let meminfo = std::fs::read_to_string("/proc/meminfo")
                    .map_err(|e| format!("/proc/meminfo: {e}"))?;
                let field = |name: &str| {
                    meminfo.lines().find_map(|l| {
                        l.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok()
                    })
                };
                match (field("HugePages_Free:"), field("Hugepagesize:")) {
                    (Some(free), Some(2048)) if free > 0 => Ok(format!("{free} free 2 MiB pages")),
                    (Some(_), Some(2048)) => Err("no free hugetlbfs pages (nr_hugepages)".into()),
                    (_, size) => Err(format!("default hugetlbfs page size {size:?} kB")),
                }
            }
        }
    }
}

/// A tmpfs mounted with `huge=always` in a new temporary directory, for
/// tests and benchmarks that need huge pages without touching a host-wide
/// setting (root only). Unmounted and removed on drop.
#[derive(Debug)]
pub struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of at most `size` bytes with `options` (say
    /// `huge=always`) in a new directory under the system's temporary one.
    pub fn new(size: u64, options: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name =
            format!("gmem-tmpfs-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir(&dir).map_err(Error::io("create the mount directory"))?;
        let data = std::ffi::CString::new(format!("size={size},mode=0700,{options}"))
            .map_err(|_| Error::InvalidArgument { op: "mount tmpfs", why: "NUL in options" })?;
        let flags = rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV;
        if let Err(errno) = rustix::mount::mount("gmem", &dir, "tmpfs", flags, data.as_c_str()) {
            let _ = std::fs::remove_dir(&dir);
            return Err(Error::Os { op: "mount tmpfs", errno });
        }
        Ok(Self { dir })
    }

    /// A 2 MiB-page tmpfs (`huge=always`) of at most `size` bytes.
    pub fn huge(size: u64) -> Result<Self> {
        Self::new(size, "huge=always")
    }

    /// The mount's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Huge pages on this mount.
    pub fn huge_pages(&self) -> HugePages {
        HugePages::Tmpfs(self.dir.clone())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        // Detached: files still open (a VM's) keep it alive until closed.
        let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The tmpfs mounts of this process's mount namespace that give files
/// 2 MiB pages (`huge=always`, `within_size` or `advise`), with the option.
pub fn huge_tmpfs_mounts() -> Vec<(PathBuf, String)> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    mountinfo
        .lines()
        .filter_map(MountInfo::parse)
        .filter(|m| m.fs_type == "tmpfs")
        .filter_map(|m| {
            let option = m.options.split(',').find_map(|o| o.strip_prefix("huge="))?;
            matches!(option, "always" | "within_size" | "advise")
                .then(|| (m.point.clone(), option.to_string()))
        })
        .collect()
}

fn memfd(name: &str, extra: MemfdFlags) -> Result<OwnedFd> {
    fs::memfd_create(name, MemfdFlags::ALLOW_SEALING | MemfdFlags::CLOEXEC | extra)
        .map_err(|errno| Error::Os { op: "memfd_create", errno })
}

/// The host's `shmem_enabled` where it gives memfds huge pages.
fn memfd_thp_setting() -> std::result::Result<String, String> {
    let setting =
        std::fs::read_to_string(SHMEM_ENABLED).map_err(|e| format!("{SHMEM_ENABLED}: {e}"))?;
    let chosen = bracketed(&setting).ok_or_else(|| format!("{SHMEM_ENABLED}: {setting:?}"))?;
    match chosen {
        "always" | "within_size" | "advise" | "force" => Ok(chosen.to_string()),
        other => Err(format!("shmem_enabled is {other}: memfds get no huge pages")),
    }
}

/// The `[chosen]` word of a sysfs THP setting.
fn bracketed(setting: &str) -> Option<&str> {
    let start = setting.find('[')? + 1;
    Some(&setting[start..start + setting[start..].find(']')?])
}

/// The `huge=` option of the tmpfs that `dir` lies on, where it gives
/// files huge pages.
fn tmpfs_huge_option(dir: &Path) -> std::result::Result<String, String> {
    let stat = fs::statfs(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if stat.f_type as i64 != TMPFS_MAGIC {
        return Err(format!("{} is not on a tmpfs", dir.display()));
    }
    if let Ok(setting) = std::fs::read_to_string(SHMEM_ENABLED) {
        if bracketed(&setting) == Some("deny") {
            return Err("shmem_enabled is deny: no tmpfs gets huge pages".into());
        }
    }
    let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let mount = mountinfo
        .lines()
        .filter_map(MountInfo::parse)
        .filter(|m| m.fs_type == "tmpfs" && dir.starts_with(&m.point))
        .max_by_key(|m| m.point.as_os_str().len())
        .ok_or_else(|| format!("{}: no tmpfs mount found", dir.display()))?;
    let huge = mount.options.split(',').find_map(|o| o.strip_prefix("huge="));
    match huge {
        Some(option @ ("always" | "within_size" | "advise")) => Ok(option.to_string()),
        other => Err(format!(
            "the tmpfs at {} is mounted with huge={}: mount it with huge=always or huge=within_size",
            mount.point.display(),
            other.unwrap_or("never")
        )),
    }
}

/// The fields of a `/proc/self/mountinfo` line gmem reads.
struct MountInfo {
    point: PathBuf,
    fs_type: String,
    options: String,
}

impl MountInfo {
    /// `ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - TYPE SOURCE SUPER_OPTS`
    fn parse(line: &str) -> Option<Self> {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        let mut right = right.split(' ');
        let fs_type = right.next()?.to_string();
        let options = right.nth(1)?.to_string();
        Some(Self { point: PathBuf::from(unescape(point)), fs_type, options })
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let line = "36 25 0:32 / /tmp/my\\040dir rw,relatime shared:1 - tmpfs tmpfs rw,size=4096k,huge=within_size";
        let m = MountInfo::parse(line).unwrap();
        assert_eq!(m.point, PathBuf::from("/tmp/my dir"));
        assert_eq!(m.fs_type, "tmpfs");
        assert!(m.options.ends_with("huge=within_size"));
        assert!(MountInfo::parse("garbage").is_none());
    }

    #[test]
    fn sysfs_settings_read_their_bracketed_word() {
        assert_eq!(bracketed("always within_size advise [never] deny force\n"), Some("never"));
        assert_eq!(bracketed("no brackets"), None);
    }

    #[test]
    fn a_directory_off_tmpfs_is_refused() {
        let why = tmpfs_huge_option(Path::new("/proc")).unwrap_err();
        assert!(why.contains("not on a tmpfs"), "{why}");
        let err = HugePages::Tmpfs("/proc".into()).create("x").unwrap_err();
        assert_eq!(err.errno(), Errno::INVAL, "{err}");
    }
}

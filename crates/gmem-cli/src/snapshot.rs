//! `gmem run`'s snapshot files: the key file, the save path (written
//! whole or not at all) and the chain to restore, each checked before a
//! VM is made.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use gmem_kvm::{SnapshotFile, SnapshotInfo, SnapshotKey};
use gmem_runner::Vm;

/// Opens `path` for reading without blocking on a FIFO (its type is
/// checked by the reader).
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

/// The key in `path`: a regular file of exactly 32 bytes.
pub(crate) fn read_key(path: &Path) -> Result<SnapshotKey, String> {
    let what = |e: &dyn std::fmt::Display| format!("key file {}: {e}", path.display());
    let file = open_nonblocking(path).map_err(|e| what(&e))?;
    let meta = file.metadata().map_err(|e| what(&e))?;
    if !meta.is_file() || meta.len() != 32 {
        return Err(what(&"must be a regular file of exactly 32 bytes"));
    }
    let mut key = [0u8; 32];
    file.take(32).read_exact(&mut key).map_err(|e| what(&e))?;
    let key = SnapshotKey::new(key);
    Ok(key)
}

/// Checks that a snapshot can be written to `path`: a regular file or a
/// new name in an existing directory (never a FIFO, device or directory).
pub(crate) fn check_save_path(path: &Path) -> Result<(), String> {
    let what = |why: &str| format!("--save-at {}: {why}", path.display());
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            return Err(what(
                "not a regular file (a snapshot is never written to a FIFO, device or directory)",
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(what(&e.to_string())),
    }
    let dir = directory_of(path);
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(what("its directory is not a directory")),
        Err(e) => Err(what(&format!("its directory {}: {e}", dir.display()))),
    }
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Saves `vm` (paused) to `path`: into a new file next to it, synced, then
/// renamed over `path`, so that `path` is a whole snapshot or untouched
/// (a full file system halfway leaves nothing behind).
pub(crate) fn save(
    vm: &Vm,
    path: &Path,
    key: &SnapshotKey,
    diff: bool,
) -> Result<SnapshotInfo, String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = directory_of(path).join(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| format!("create {}: {e}", temp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        let info = vm.save_snapshot(&mut out, key, diff).map_err(|e| e.to_string())?;
        out.flush().map_err(|e| format!("write: {e}"))?;
        drop(out);
        file.sync_all().map_err(|e| format!("fsync: {e}"))?;
        std::fs::rename(&temp, path).map_err(|e| format!("rename into place: {e}"))?;
        if let Ok(dir) = File::open(directory_of(path)) {
            let _ = dir.sync_all();
        }
        Ok(info)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Opens and checks the snapshots of `paths` (a full one, then diffs).
pub(crate) fn open_chain(
    paths: &[PathBuf],
    key: &SnapshotKey,
) -> Result<Vec<SnapshotFile>, String> {
    paths
        .iter()
        .map(|path| {
            let file = open_nonblocking(path).map_err(|e| format!("{}: {e}", path.display()))?;
            SnapshotFile::open(file, key).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}

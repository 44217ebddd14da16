//! virtio-blk (virtio 1.x, 5.2) over a host file, one request queue.
//!
//! Every guest byte goes through the vm-memory `GuestMemory` the transport
//! passes in: for gmem, a view of the shared pages, which refuses private
//! ones. A request whose buffers cannot all be reached gets
//! `VIRTIO_BLK_S_IOERR` and moves no data: an OUT reads every buffer before
//! the file is written; an IN writes only into buffers the view accepts.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory};

use crate::mmio::Device;

/// Bytes of a sector.
pub const SECTOR: u64 = 512;

/// The largest request the device serves (bytes of data).
pub const MAX_REQUEST: u64 = 1 << 20;

/// Counts of what the device did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests completed OK.
    pub ok: u64,
    /// Requests answered with an I/O error (bad buffers, out of range).
    pub errors: u64,
    /// Bytes read from the file into guest memory.
    pub bytes_in: u64,
    /// Bytes written from guest memory into the file.
    pub bytes_out: u64,
    /// FLUSH requests (each an fsync).
    pub flushes: u64,
}

/// A virtio-blk device backed by a host file.
#[derive(Debug)]
pub struct Block {
    file: File,
    sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: BlockStats,
}

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

impl Block {
    /// Opens `path` as the disk, creating it with `size` bytes if it does
    /// not exist (an existing file keeps its size). The size is a whole
    /// number of sectors.
    pub fn open(path: &Path, size: u64) -> std::io::Result<Self> {
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if !existed {
            file.set_len(size)?;
        }
        let len = file.metadata()?.len();
        if len == 0 || len % SECTOR != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "disk {}: {len} bytes, not a whole number of 512-byte sectors",
                    path.display()
                ),
            ));
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = b"gmem-virtio-blk";
        id[..name.len()].copy_from_slice(name);
        Ok(Self { file, sectors: len / SECTOR, id, stats: BlockStats::default() })
    }

    /// What the device did so far.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Writes what the disk holds through to storage (before another host
    /// takes the disk over: a migration's switch).
    pub fn sync_all(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves one request made of `descs`; returns the bytes written into
    /// the guest's buffers (the status byte included).
    fn request<M: GuestMemory>(&mut self, descs: &[Descriptor], mem: &M) -> Result<u32, String> {
        let status = descs.last().filter(|d| d.is_write_only() && d.len() >= 1);
        let Some(status) = status.copied() else {
            return Err("a request without a writable status byte".into());
        };
        let (result, written) = match self.serve(descs, mem) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(code) => (code, 0),
        };
        if result == VIRTIO_BLK_S_OK as u8 {
            self.stats.ok += 1;
        } else {
            self.stats.errors += 1;
        }
        mem.write_obj(result, status.addr()).map_err(|e| {
            format!("the status byte at {:#x} cannot be written: {e}", status.addr().0)
        })?;
        Ok(written + 1)
    }

    /// Carries out a request; `Err` is the status to report.
    fn serve<M: GuestMemory>(&mut self, descs: &[Descriptor], mem: &M) -> Result<u32, u8> {
        let header = descs.first().filter(|d| !d.is_write_only() && d.len() >= 16).ok_or(IOERR)?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, header.addr()).map_err(|_| IOERR)?;
        let kind = u32::from_le_bytes(raw[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
        let data = &descs[1..descs.len() - 1];
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let in_range = || {
            sector
                .checked_mul(SECTOR)
                .and_then(|at| at.checked_add(total))
                .is_some_and(|end| end <= self.sectors * SECTOR)
                && total <= MAX_REQUEST
        };
        match kind {
            VIRTIO_BLK_T_IN => {
                if !in_range() || data.iter().any(|d| !d.is_write_only()) {
                    return Err(IOERR);
                }
                let mut at = sector * SECTOR;
                let mut written = 0u32;
                for d in data {
                    let mut buf = vec![0u8; d.len() as usize];
                    self.file.read_exact_at(&mut buf, at).map_err(|_| IOERR)?;
                    mem.write_slice(&buf, d.addr()).map_err(|_| IOERR)?;
                    at += u64::from(d.len());
                    written += d.len();
                }
                self.stats.bytes_in += total;
                Ok(written)
            }
            VIRTIO_BLK_T_OUT => {
                if !in_range() || data.iter().any(|d| d.is_write_only()) {
                    return Err(IOERR);
                }
                // Every buffer is read before the file is touched: a buffer
                // in a private page writes nothing.
                let mut bytes = vec![0u8; total as usize];
                let mut at = 0;
                for d in data {
                    let buf = &mut bytes[at..at + d.len() as usize];
                    mem.read_slice(buf, d.addr()).map_err(|_| IOERR)?;
                    at += buf.len();
                }
                self.file.write_all_at(&bytes, sector * SECTOR).map_err(|_| IOERR)?;
                self.stats.bytes_out += total;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.file.sync_all().map_err(|_| IOERR)?;
                self.stats.flushes += 1;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let d = data.first().filter(|d| d.is_write_only()).ok_or(IOERR)?;
                let n = (d.len() as usize).min(self.id.len());
                mem.write_slice(&self.id[..n], d.addr()).map_err(|_| IOERR)?;
                Ok(n as u32)
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP as u8),
        }
    }
}

impl Device for Block {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_BLK_F_FLUSH
    }

    fn config(&self) -> Vec<u8> {
        // capacity (sectors), then the rest of virtio_blk_config as zeros.
        let mut config = self.sectors.to_le_bytes().to_vec();
        config.resize(64, 0);
        config
    }

    fn process<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<(), String> {
        loop {
            // An unreadable ring (private memory, outside RAM) would look
            // like an empty one to `pop_descriptor_chain`: ask first.
            queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(|e| format!("the available ring cannot be read: {e}"))?;
            let Some(chain) = queue.pop_descriptor_chain(mem) else { return Ok(()) };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            match descs.last() {
                None => return Err(format!("descriptor {head} cannot be read")),
                Some(last) if last.has_next() && descs.len() == usize::from(queue.size()) => {
                    return Err(format!(
                        "the chain at descriptor {head} loops or is longer than the queue"
                    ))
                }
                Some(last) if last.has_next() => {
                    return Err(format!("a descriptor of the chain at {head} cannot be read"))
                }
                Some(_) => {}
            }
            let written = self.request(&descs, mem)?;
            queue
                .add_used(mem, head, written)
                .map_err(|e| format!("the used ring cannot be written: {e}"))?;
        }
    }
}

//! KVM's per-VM binary statistics (`KVM_GET_STATS_FD`): how KVM's MMU
//! maps the guest (`pages_4k`, `pages_2m`, `pages_1g` on x86), which is how
//! a VMM sees that huge-page regions are mapped huge.
//!
//! Written by hand because kvm-ioctls has no binary-statistics call; the
//! layouts are kvm-bindings' `kvm_stats_header` and `kvm_stats_desc`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};

use crate::error::{Error, Result};

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;

/// One read of a VM's binary statistics: every statistic's name and
/// first value (histograms give their first bucket).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmStatistics {
    values: Vec<(String, u64)>,
}

impl VmStatistics {
    /// Reads the statistics of `vm` now.
    pub fn read(vm: &kvm_ioctls::VmFd) -> Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd
        // (or -1), which is owned from here.
        let fd = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return Err(Error::os("KVM_GET_STATS_FD")(rustix::io::Errno::from_raw_os_error(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
            )));
        }
        // SAFETY: `fd` was just returned by the kernel and has no other owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::parse(&fd)
    }

    fn parse(fd: &OwnedFd) -> Result<Self> {
        let read = |offset: u64, len: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len];
            let mut done = 0;
            while done < len {
                match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
                    Ok(0) => return Err(Error::os("read KVM stats")(rustix::io::Errno::IO)),
                    Ok(n) => done += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(errno) => return Err(Error::os("read KVM stats")(errno)),
                }
            }
            Ok(buf)
        };
        let header_bytes = read(0, std::mem::size_of::<kvm_stats_header>())?;
        // SAFETY: kvm_stats_header is plain integers, and the buffer holds
        // exactly one (read unaligned).
        let header: kvm_stats_header =
            unsafe { std::ptr::read_unaligned(header_bytes.as_ptr().cast()) };
        let desc_len = std::mem::size_of::<kvm_stats_desc>() + header.name_size as usize;
        let count = header.num_desc as usize;
        if count > 4096 || header.name_size as usize > 4096 {
            return Err(Error::os("KVM stats header")(rustix::io::Errno::INVAL));
        }
        let descs = read(u64::from(header.desc_offset), desc_len * count)?;
        let mut values = Vec::with_capacity(count);
        for chunk in descs.chunks_exact(desc_len) {
            // SAFETY: as above: plain integers, read unaligned from a chunk
            // at least as long.
            let desc: kvm_stats_desc = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
            let name = &chunk[std::mem::size_of::<kvm_stats_desc>()..];
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            let offset = u64::from(header.data_offset) + u64::from(desc.offset);
            let value = read(offset, 8)?;
            values.push((
                String::from_utf8_lossy(name).into_owned(),
                u64::from_ne_bytes(value.try_into().unwrap_or_default()),
            ));
        }
        Ok(Self { values })
    }

    /// The value of statistic `name`, if this KVM has it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.values.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    /// Every statistic, in KVM's order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.values.iter().map(|(n, v)| (n.as_str(), *v))
    }
}

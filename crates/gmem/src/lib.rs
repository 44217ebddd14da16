//! # gmem: fd-based guest private memory, in user space
//!
//! The RFC "KVM: mm: fd-based approach for supporting KVM guest private
//! memory" (2021) let a memfd carry a GUEST seal: once sealed, host user space
//! can no longer read, write or map it; a single owner (the VM) is bound to
//! it, takes pages with get-and-lock / put-and-unlock, and is told before
//! pages go away. It later became Linux's `guest_memfd`. This crate is that
//! file, on an ordinary memfd, with no KVM dependency: `gmem-kvm` serves KVM
//! guests from it.
//!
//! | seed (kernel)                 | here                                    |
//! |-------------------------------|-----------------------------------------|
//! | `fcntl(F_ADD_SEALS, F_SEAL_GUEST)` | [`PrivateMemFile::add_seals`]`(`[`Seals::GUEST`]`)` |
//! | `memfd_register_guest`        | [`PrivateMemFile::bind`]                |
//! | `get_lock_pfn`                | [`Binding::get_and_lock`]               |
//! | `put_unlock_pfn`              | dropping the [`PageGuard`]              |
//! | `invalidate_page_range`       | [`GuestOwner::invalidate_page_range`]   |
//!
//! A file may also live on 2 MiB pages ([`PrivateMemFile::new_huge`]:
//! a huge-page tmpfs, memfd THP, hugetlbfs; see [`HugePages`]), where a
//! 4 KiB punch splits one huge page and [`Binding::collapse`] makes it
//! huge again.
//!
//! ## Example: seal, bind, get-and-lock, punch, invalidation
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use gmem::{Errno, Fallocate, FileId, FileOffset, GuestOwner, PageIndex, PageRange,
//!            PrivateMemFile, Seals};
//!
//! #[derive(Default)]
//! struct Vm { invalidated: Mutex<Vec<PageRange>> }
//! impl GuestOwner for Vm {
//!     fn invalidate_page_range(&self, _file: FileId, pages: PageRange) {
//!         self.invalidated.lock().unwrap().push(pages);
//!     }
//! }
//!
//! let file = Arc::new(PrivateMemFile::new("guest-ram")?);
//! file.add_seals(Seals::GUEST)?;
//! file.set_len(2 << 20)?;
//! // The host can no longer touch the content.
//! assert_eq!(file.read_at(&mut [0; 4], FileOffset(0)).unwrap_err().errno(), Errno::PERM);
//!
//! let vm = Arc::new(Vm::default());
//! let binding = file.bind(&vm)?;
//! {
//!     let page = binding.get_and_lock(PageIndex(0x100))?; // allocated, zeroed, locked
//!     page.write(0, b"secret")?;
//! } // put-and-unlock
//!
//! file.fallocate(Fallocate::PunchHole, PageIndex(0x100).offset(), 4096)?;
//! assert_eq!(*vm.invalidated.lock().unwrap(),
//!            [PageRange::new(PageIndex(0x100), PageIndex(0x101))]);
//!
//! // The page comes back as a fresh zero page.
//! let page = binding.get_and_lock(PageIndex(0x100))?;
//! let mut buf = [0xff; 6];
//! page.read(0, &mut buf)?;
//! assert_eq!(buf, [0; 6]);
//! # Ok::<(), gmem::Error>(())
//! ```

mod error;
mod file;
mod huge;
mod locks;
mod mapping;
mod seals;
pub mod seed;
mod types;

pub use error::{Errno, Error, Result};
pub use file::{Binding, Fallocate, FileId, GuestOwner, PageGuard, PrivateMemFile, Stats};
pub use huge::{huge_tmpfs_mounts, HugePages, PageKind, TmpfsMount, HUGE_PAGE_SIZE};
pub use mapping::{HostMapping, OwnerWindow};
pub use seals::Seals;
pub use types::{FileOffset, PageIndex, PageRange, PAGE_SIZE};

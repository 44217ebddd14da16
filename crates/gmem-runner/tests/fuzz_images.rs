//! A mutation fuzzer of the guest image loader (bounded, run in CI): built-in
//! guest images with random bytes changed, truncated or extended never make
//! the loader panic; every answer is an image or `ENOEXEC`, and an accepted
//! image keeps GUEST_ABI's rules.

use gmem::Errno;
use gmem_runner::{boot, GuestImage};
use proptest::prelude::*;

const RAM: u64 = 64 << 20;

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let guests: Vec<&'static [u8]> = gmem_guest::GUESTS.iter().map(|(_, elf)| *elf).collect();
    (
        proptest::sample::select(guests),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(elf, edits, cut, truncate)| {
            let mut bytes = elf.to_vec();
            // Edits land mostly in the headers, where the loader looks.
            for (at, value) in edits {
                let span = if value % 2 == 0 { 256.min(bytes.len()) } else { bytes.len() };
                let i = at.index(span);
                bytes[i] = value;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_are_loaded_or_refused(bytes in mutated()) {
        match GuestImage::parse(&bytes, RAM) {
            Ok(image) => {
                for segment in &image.segments {
                    prop_assert!(segment.gpa.0 >= boot::IMAGE_BASE);
                    prop_assert!(boot::in_ram(RAM, segment.gpa.0, segment.mem_size));
                    prop_assert!(segment.data.len() as u64 <= segment.mem_size);
                }
                let _ = boot::check_layout(&image, RAM, 255);
            }
            Err(e) => prop_assert_eq!(e.errno(), Errno::NOEXEC, "{}", e),
        }
    }

    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let result = GuestImage::parse(&bytes, RAM);
        prop_assert!(result.is_err());
        prop_assert_eq!(result.unwrap_err().errno(), Errno::NOEXEC);
    }
}

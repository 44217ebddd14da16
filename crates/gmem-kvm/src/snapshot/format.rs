//! The snapshot file format, defined once for writer and reader, and its
//! sealing (RustCrypto's AES-256-GCM under a key derived per snapshot
//! with HKDF-SHA256: no cryptography is written here).
//!
//! Little-endian throughout:
//!
//! | part | bytes | sealed |
//! |---|---|---|
//! | header | 128 + 16 × regions | authenticated (associated data of the index) |
//! | index | 24 × entries + 16 | encrypted, nonce (INDEX, 0) |
//! | VMM state | state_len + 16 | encrypted, nonce (STATE, 0) |
//! | records | (4096 + 16) × records | each page encrypted, nonce (PAGE, n) |
//! | end | 16 | a tag over the identity and the record count, nonce (END, 0) |
//!
//! The header: magic `GMEMSNAP`, version, flags (bit 0: diff), the
//! snapshot's identity (16 random bytes and a generation: 0 for a full
//! snapshot, its base's + 1 for a diff), its base's identity, the region
//! count, entry count, record count, VMM state length, a key check (a tag
//! over nothing), 16 reserved bytes, then each region's GPA and size.
//!
//! An index entry is `{gpa, pages, kind}`: kind bit 0 says shared, bit 1
//! data; data entries own the next `pages` records, in order. Every page
//! is sealed under the snapshot's own key (derived from the VMM's key and
//! the identity), with its record number as nonce and its GPA, state and
//! the identity as associated data: a nonce is never reused under a key,
//! and a page cannot be moved, swapped with another, or replayed from
//! another snapshot.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Tag};

/// AES-GCM's 96-bit nonce.
type Nonce = aes_gcm::Nonce<aes_gcm::aead::consts::U12>;
use gmem::PAGE_SIZE;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::region::PageState;

pub(crate) const MAGIC: [u8; 8] = *b"GMEMSNAP";
pub(crate) const VERSION: u32 = 1;
const FLAG_DIFF: u32 = 1;
const HEADER_FIXED: usize = 128;
const REGION_BYTES: usize = 16;
pub(crate) const ENTRY_BYTES: usize = 24;
pub(crate) const TAG_BYTES: usize = 16;
/// One page record: the sealed page and its tag.
pub(crate) const RECORD_BYTES: u64 = PAGE_SIZE + TAG_BYTES as u64;
/// Bounds that keep every offset of a header far from overflow (and a
/// header of 1e20 entries from asking for memory before it is refused).
const MAX_REGIONS: u32 = 4096;
const MAX_PAGES: u64 = 1 << 36;
pub(crate) const MAX_STATE: u64 = 64 << 20;
/// Runs in an index at most (24 bytes each: 384 MiB), read whole before
/// it is checked: a header may not make a reader allocate more (a sparse
/// file of a terabyte is cheap). A save that would need more refuses.
pub(crate) const MAX_ENTRIES: u64 = 1 << 24;

/// The identity of a snapshot: random bytes and a generation (0 for a
/// full snapshot, one more than its base for a diff).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    /// Random, chosen at save.
    pub id: [u8; 16],
    /// 0 for a full snapshot; a diff's base's + 1.
    pub generation: u64,
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.id[..8] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "/{}", self.generation)
    }
}

impl SnapshotId {
    /// A new identity: fresh random bytes.
    pub(crate) fn new(generation: u64) -> Result<Self> {
        let mut id = [0u8; 16];
        let mut filled = 0;
        while filled < id.len() {
            filled +=
                rustix::rand::getrandom(&mut id[filled..], rustix::rand::GetRandomFlags::empty())
                    .map_err(Error::os("getrandom"))?;
        }
        Ok(Self { id, generation })
    }

    fn bytes(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..16].copy_from_slice(&self.id);
        out[16..].copy_from_slice(&self.generation.to_le_bytes());
        out
    }
}

/// The key a VMM seals its snapshots under: 32 bytes, wiped on drop.
pub struct SnapshotKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotKey(..)")
    }
}

impl SnapshotKey {
    /// A key of these bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A copy (wiped on drop too).
    pub(crate) fn duplicate(&self) -> Self {
        Self::new(*self.0)
    }

    /// A key of `bytes`, which must be 32 bytes long (`EINVAL` otherwise).
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::InvalidArgument(format!("a snapshot key is 32 bytes, not {}", bytes.len()))
        })?;
        Ok(Self::new(bytes))
    }
}

/// What a nonce seals: its first four bytes, the last eight a counter.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Sealed {
    Page = 0,
    Index = 1,
    State = 2,
    KeyCheck = 3,
    End = 4,
    /// A migration destination's message to its source.
    Control = 5,
}

fn nonce(what: Sealed, counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&(what as u32).to_le_bytes());
    bytes[4..].copy_from_slice(&counter.to_le_bytes());
    bytes.into()
}

/// Seals and opens the parts of one snapshot, under its own key.
pub(crate) struct Sealer {
    aead: Aes256Gcm,
    id: SnapshotId,
}

impl Sealer {
    /// The sealer of snapshot `id`: its key is HKDF-SHA256 of the VMM's
    /// key, salted with the random identity, for this format and
    /// generation.
    pub(crate) fn new(key: &SnapshotKey, id: SnapshotId) -> Self {
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(Some(&id.id), &key.0[..]);
        let mut derived = Zeroizing::new([0u8; 32]);
        let mut info = b"gmem snapshot v1 ".to_vec();
        info.extend_from_slice(&id.generation.to_le_bytes());
        hkdf.expand(&info, &mut derived[..]).expect("32 bytes is a valid HKDF-SHA256 length");
        Self { aead: Aes256Gcm::new((&*derived).into()), id }
    }

    fn seal(&self, nonce: Nonce, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_BYTES] {
        let tag = self.aead.encrypt_in_place_detached(&nonce, aad, buf);
        tag.expect("AES-GCM seals any buffer shorter than 64 GiB").into()
    }

    fn open(&self, nonce: Nonce, aad: &[u8], buf: &mut [u8], tag: &[u8]) -> bool {
        tag.len() == TAG_BYTES
            && self.aead.decrypt_in_place_detached(&nonce, aad, buf, Tag::from_slice(tag)).is_ok()
    }

    pub(crate) fn key_check(&self) -> [u8; TAG_BYTES] {
        self.seal(nonce(Sealed::KeyCheck, 0), b"gmem snapshot key check", &mut [])
    }

    pub(crate) fn check_key(&self, tag: &[u8]) -> Result<()> {
        let ok = self.open(nonce(Sealed::KeyCheck, 0), b"gmem snapshot key check", &mut [], tag);
        ok.then_some(()).ok_or(Error::WrongKey)
    }

    /// Seals a migration destination's message `body` (in place) as its
    /// `seq`th, with `clear` (the part sent in the clear) authenticated.
    pub(crate) fn seal_control(&self, seq: u64, clear: &[u8], body: &mut [u8]) -> [u8; TAG_BYTES] {
        self.seal(nonce(Sealed::Control, seq), clear, body)
    }

    /// Opens what [`seal_control`](Self::seal_control) sealed; `false` if
    /// it fails its check.
    pub(crate) fn open_control(&self, seq: u64, clear: &[u8], body: &mut [u8], tag: &[u8]) -> bool {
        self.open(nonce(Sealed::Control, seq), clear, body, tag)
    }

    fn page_aad(&self, gpa: u64, state: PageState) -> [u8; 33] {
        let mut aad = [0u8; 33];
        aad[..24].copy_from_slice(&self.id.bytes());
        aad[24..32].copy_from_slice(&gpa.to_le_bytes());
        aad[32] = u8::from(state == PageState::Shared);
        aad
    }

    /// Seals page `page` (4 KiB, in place) as record `record` at `gpa`.
    pub(crate) fn seal_page(
        &self,
        record: u64,
        gpa: u64,
        state: PageState,
        page: &mut [u8],
    ) -> [u8; TAG_BYTES] {
        self.seal(nonce(Sealed::Page, record), &self.page_aad(gpa, state), page)
    }

    /// Opens record `record` (the sealed page, in place, then its tag)
    /// as the page at `gpa` in `state`; `false` if it fails its check.
    pub(crate) fn open_page(
        &self,
        record: u64,
        gpa: u64,
        state: PageState,
        page: &mut [u8],
        tag: &[u8],
    ) -> bool {
        self.open(nonce(Sealed::Page, record), &self.page_aad(gpa, state), page, tag)
    }

    pub(crate) fn seal_index(&self, header: &[u8], index: &mut [u8]) -> [u8; TAG_BYTES] {
        self.seal(nonce(Sealed::Index, 0), header, index)
    }

    pub(crate) fn open_index(&self, header: &[u8], index: &mut [u8], tag: &[u8]) -> bool {
        self.open(nonce(Sealed::Index, 0), header, index, tag)
    }

    pub(crate) fn seal_state(&self, header: &[u8], state: &mut [u8]) -> [u8; TAG_BYTES] {
        self.seal(nonce(Sealed::State, 0), header, state)
    }

    pub(crate) fn open_state(&self, header: &[u8], state: &mut [u8], tag: &[u8]) -> bool {
        self.open(nonce(Sealed::State, 0), header, state, tag)
    }

    fn end_aad(&self, records: u64) -> [u8; 32] {
        let mut aad = [0u8; 32];
        aad[..24].copy_from_slice(&self.id.bytes());
        aad[24..].copy_from_slice(&records.to_le_bytes());
        aad
    }

    pub(crate) fn end_tag(&self, records: u64) -> [u8; TAG_BYTES] {
        self.seal(nonce(Sealed::End, 0), &self.end_aad(records), &mut [])
    }

    pub(crate) fn check_end(&self, records: u64, tag: &[u8]) -> bool {
        self.open(nonce(Sealed::End, 0), &self.end_aad(records), &mut [], tag)
    }
}

/// A run of pages in the index: data (its content in the next records)
/// or a hole, in a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) gpa: u64,
    pub(crate) pages: u64,
    pub(crate) state: PageState,
    pub(crate) data: bool,
}

impl Entry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.gpa.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        let kind = u32::from(self.state == PageState::Shared) | u32::from(self.data) << 1;
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let kind = le32(bytes, 16);
        if kind > 3 || le32(bytes, 20) != 0 {
            return Err(Error::BadSnapshot(format!("index entry of unknown kind {kind:#x}")));
        }
        let state = if kind & 1 != 0 { PageState::Shared } else { PageState::Private };
        Ok(Self { gpa: le64(bytes, 0), pages: le64(bytes, 8), state, data: kind & 2 != 0 })
    }

    /// Encodes `entries` (the index's plaintext).
    pub(crate) fn encode_all(entries: &[Entry]) -> Vec<u8> {
        let mut out = Vec::with_capacity(entries.len() * ENTRY_BYTES);
        entries.iter().for_each(|e| e.encode(&mut out));
        out
    }

    /// Decodes an index and checks it against `header`: entries page-aligned,
    /// inside the regions, ascending and not overlapping, with as many data
    /// pages as records.
    pub(crate) fn decode_all(header: &Header, bytes: &[u8]) -> Result<Vec<Entry>> {
        let entries =
            bytes.chunks_exact(ENTRY_BYTES).map(Entry::decode).collect::<Result<Vec<_>>>()?;
        let mut records = 0u64;
        let mut after = 0u64;
        for e in &entries {
            let end = e.pages.checked_mul(PAGE_SIZE).and_then(|len| e.gpa.checked_add(len));
            let inside = end.is_some_and(|end| {
                header.regions.iter().any(|&(gpa, size)| e.gpa >= gpa && end <= gpa + size)
            });
            if e.gpa % PAGE_SIZE != 0 || e.pages == 0 || !inside || e.gpa < after {
                return Err(Error::BadSnapshot(format!(
                    "index entry at GPA {:#x} of {} pages: out of order, overlapping or outside \
                     the regions",
                    e.gpa, e.pages
                )));
            }
            after = end.unwrap_or(u64::MAX);
            if e.data {
                records += e.pages;
            }
        }
        if records != header.records {
            return Err(Error::BadSnapshot(format!(
                "the index has {records} data pages, the header {} records",
                header.records
            )));
        }
        Ok(entries)
    }
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// A snapshot's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) id: SnapshotId,
    pub(crate) base: Option<SnapshotId>,
    /// The memory's regions: GPA and size, ascending.
    pub(crate) regions: Vec<(u64, u64)>,
    pub(crate) entries: u64,
    pub(crate) records: u64,
    pub(crate) state_len: u64,
    pub(crate) key_check: [u8; TAG_BYTES],
}

impl Header {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(if self.base.is_some() { FLAG_DIFF } else { 0 }).to_le_bytes());
        out.extend_from_slice(&self.id.bytes());
        let base = self.base.unwrap_or(SnapshotId { id: [0; 16], generation: 0 });
        out.extend_from_slice(&base.bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for value in [self.entries, self.records, self.state_len] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&self.key_check);
        out.extend_from_slice(&[0u8; 16]);
        for (gpa, size) in &self.regions {
            out.extend_from_slice(&gpa.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        out
    }

    /// The length of the header's fixed part (the regions follow it).
    pub(crate) const FIXED: usize = HEADER_FIXED;

    /// Decodes the fixed part: the header's length in all, or why not.
    pub(crate) fn length(fixed: &[u8]) -> Result<usize> {
        if fixed.len() < HEADER_FIXED || fixed[..8] != MAGIC {
            return Err(Error::BadSnapshot("not a gmem snapshot (no GMEMSNAP magic)".into()));
        }
        let version = le32(fixed, 8);
        if version != VERSION {
            return Err(Error::BadSnapshot(format!(
                "format version {version}; this gmem reads version {VERSION}"
            )));
        }
        let regions = le32(fixed, 64);
        if regions == 0 || regions > MAX_REGIONS {
            return Err(Error::BadSnapshot(format!("{regions} regions (1 to {MAX_REGIONS})")));
        }
        Ok(HEADER_FIXED + regions as usize * REGION_BYTES)
    }

    /// Decodes a whole header ([`length`](Self::length) bytes).
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let len = Self::length(bytes)?;
        if bytes.len() != len {
            return Err(Error::BadSnapshot("header cut short".into()));
        }
        let flags = le32(bytes, 12);
        let id = |at| SnapshotId {
            id: bytes[at..at + 16].try_into().expect("16 bytes"),
            generation: le64(bytes, at + 16),
        };
        let (own, base) = (id(16), id(40));
        let diff = match flags {
            0 => false,
            FLAG_DIFF => true,
            _ => return Err(Error::BadSnapshot(format!("unknown flags {flags:#x}"))),
        };
        if le32(bytes, 68) != 0 || bytes[112..128].iter().any(|&b| b != 0) {
            return Err(Error::BadSnapshot("reserved header bytes are not zero".into()));
        }
        if diff != (own.generation > 0) || (diff && base.generation + 1 != own.generation) {
            return Err(Error::BadSnapshot(format!(
                "generation {} does not follow its base's {}",
                own.generation, base.generation
            )));
        }
        let (entries, records, state_len) = (le64(bytes, 72), le64(bytes, 80), le64(bytes, 88));
        if entries > MAX_ENTRIES || records > MAX_PAGES || state_len > MAX_STATE {
            return Err(Error::BadSnapshot(format!(
                "{entries} entries, {records} records, {state_len} state bytes: too many"
            )));
        }
        let regions: Vec<(u64, u64)> = bytes[HEADER_FIXED..]
            .chunks_exact(REGION_BYTES)
            .map(|r| (le64(r, 0), le64(r, 8)))
            .collect();
        let ordered = regions.windows(2).all(|w| w[0].0.checked_add(w[0].1) <= Some(w[1].0));
        let sane = regions.iter().all(|&(gpa, size)| {
            gpa % PAGE_SIZE == 0
                && size % PAGE_SIZE == 0
                && size > 0
                && gpa.checked_add(size).is_some()
        });
        if !ordered || !sane {
            return Err(Error::BadSnapshot("regions unaligned, empty or out of order".into()));
        }
        // Entries are runs of distinct pages, records distinct pages: no
        // more of either than the regions hold (nothing is allocated for
        // more before the file's length is checked against them).
        let pages: u64 =
            regions.iter().map(|(_, size)| size / PAGE_SIZE).fold(0, u64::saturating_add);
        if entries > pages || records > pages {
            return Err(Error::BadSnapshot(format!(
                "{entries} entries and {records} records for regions of {pages} pages"
            )));
        }
        Ok(Self {
            id: own,
            base: diff.then_some(base),
            regions,
            entries,
            records,
            state_len,
            key_check: bytes[96..112].try_into().expect("16 bytes"),
        })
    }

    pub(crate) fn len(&self) -> usize {
        HEADER_FIXED + self.regions.len() * REGION_BYTES
    }

    pub(crate) fn index_offset(&self) -> u64 {
        self.len() as u64
    }

    pub(crate) fn index_len(&self) -> u64 {
        self.entries * ENTRY_BYTES as u64
    }

    pub(crate) fn state_offset(&self) -> u64 {
        self.index_offset() + self.index_len() + TAG_BYTES as u64
    }

    pub(crate) fn record_offset(&self, record: u64) -> u64 {
        self.state_offset() + self.state_len + TAG_BYTES as u64 + record * RECORD_BYTES
    }

    /// The length of the whole snapshot.
    pub(crate) fn total_len(&self) -> u64 {
        self.record_offset(self.records) + TAG_BYTES as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            id: SnapshotId { id: [7; 16], generation: 2 },
            base: Some(SnapshotId { id: [9; 16], generation: 1 }),
            regions: vec![(0, 1 << 20), (4 << 20, 2 << 20)],
            entries: 3,
            records: 4,
            state_len: 10,
            key_check: [5; 16],
        }
    }

    #[test]
    fn headers_round_trip_and_refuse_what_is_not_theirs() {
        let bytes = header().encode();
        assert_eq!(Header::length(&bytes).unwrap(), bytes.len());
        assert_eq!(Header::decode(&bytes).unwrap(), header());
        let refused = |at: usize, value: u8| {
            let mut bad = bytes.clone();
            bad[at] = value;
            Header::length(&bad).and_then(|_| Header::decode(&bad)).unwrap_err().errno()
        };
        // Magic, version, flags, base generation, reserved, counts, regions.
        for (at, value) in [(0, b'X'), (8, 2), (12, 2), (56, 5), (70, 1), (85, 0xff), (120, 1)] {
            assert_eq!(refused(at, value), crate::Errno::BADMSG, "byte {at}");
        }
        // An index of 2^25 runs (800 MiB) is refused before it is read,
        // even where the regions (1 TiB) could hold that many.
        let big = Header { regions: vec![(0, 1 << 40)], entries: 1 << 24, ..header() };
        assert!(Header::decode(&big.encode()).is_ok());
        let runs = Header { entries: 1 << 25, ..big }.encode();
        assert_eq!(Header::decode(&runs).unwrap_err().errno(), crate::Errno::BADMSG);
        // A region count of 1e9 is refused before anything is read for it.
        let mut many = bytes.clone();
        many[64..68].copy_from_slice(&1_000_000_000u32.to_le_bytes());
        assert_eq!(Header::length(&many).unwrap_err().errno(), crate::Errno::BADMSG);
    }

    #[test]
    fn index_entries_must_be_ordered_inside_and_match_the_records() {
        let h = header();
        let ok = [
            Entry { gpa: 0, pages: 2, state: PageState::Private, data: true },
            Entry { gpa: 0x3000, pages: 1, state: PageState::Shared, data: false },
            Entry { gpa: 4 << 20, pages: 2, state: PageState::Shared, data: true },
        ];
        assert_eq!(Entry::decode_all(&h, &Entry::encode_all(&ok)).unwrap(), ok);
        let mut overlapping = ok;
        overlapping[1].gpa = 0x1000;
        let mut outside = ok;
        outside[2].pages = 1 << 40;
        let mut records = ok;
        records[1].data = true;
        for bad in [overlapping, outside, records] {
            let err = Entry::decode_all(&h, &Entry::encode_all(&bad)).unwrap_err();
            assert_eq!(err.errno(), crate::Errno::BADMSG, "{bad:?}");
        }
    }

    #[test]
    fn pages_open_only_where_they_were_sealed() {
        let key = SnapshotKey::new([1; 32]);
        let id = SnapshotId { id: [3; 16], generation: 0 };
        let sealer = Sealer::new(&key, id);
        let mut page = vec![0xabu8; PAGE_SIZE as usize];
        let tag = sealer.seal_page(5, 0x1000, PageState::Private, &mut page);
        assert!(!page.iter().all(|&b| b == 0xab), "the page is encrypted");
        let opens = |record, gpa, state, key: &SnapshotKey, id| {
            let mut copy = page.clone();
            Sealer::new(key, id).open_page(record, gpa, state, &mut copy, &tag)
                && copy.iter().all(|&b| b == 0xab)
        };
        assert!(opens(5, 0x1000, PageState::Private, &key, id));
        assert!(!opens(6, 0x1000, PageState::Private, &key, id), "another record");
        assert!(!opens(5, 0x2000, PageState::Private, &key, id), "another GPA");
        assert!(!opens(5, 0x1000, PageState::Shared, &key, id), "another state");
        assert!(!opens(5, 0x1000, PageState::Private, &SnapshotKey::new([2; 32]), id));
        let other = SnapshotId { id: [3; 16], generation: 1 };
        assert!(!opens(5, 0x1000, PageState::Private, &key, other), "another snapshot");
        assert!(sealer.check_key(&sealer.key_check()).is_ok());
        let wrong = Sealer::new(&SnapshotKey::new([2; 32]), id);
        assert_eq!(
            wrong.check_key(&sealer.key_check()).unwrap_err().errno().raw_os_error(),
            libc::EKEYREJECTED
        );
    }
}

//! A destination against a crafted source that holds the key: each way a
//! stream can be bad is refused before anything runs (pre-copy), or stops
//! the pages' thread (post-copy).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use gmem::{FileOffset, PrivateMemFile, PAGE_SIZE};

use super::*;
use crate::region::PageState;
use crate::snapshot::format::{Entry, Header};
use crate::{Errno, Gpa, PrivateMemory, RegionSpec};

const SIZE: u64 = 1 << 20;
const SESSION: [u8; 16] = [0x42; 16];

fn key() -> SnapshotKey {
    SnapshotKey::new([7; 32])
}

/// Fresh memory of one region of [`SIZE`] at GPA 0, in a VM of its own.
fn memory() -> Option<(Arc<PrivateMemory>, Arc<kvm_ioctls::VmFd>)> {
    if !crate::test_support::kvm_available() {
        return None;
    }
    let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    let memory = PrivateMemory::new(crate::DEFAULT_FAULT_AROUND_PAGES).unwrap();
    let file = Arc::new(PrivateMemFile::new_guest("migrate-test").unwrap());
    file.set_len(SIZE).unwrap();
    let spec = RegionSpec { slot: 0, gpa: Gpa(0), file, file_offset: FileOffset(0), size: SIZE };
    memory.add_region(&vm, spec).unwrap();
    Some((memory, vm))
}

/// A data entry of `pages` pages at `gpa`, private.
fn data(gpa: u64, pages: u64) -> Entry {
    Entry { gpa, pages, state: PageState::Private, data: true }
}

/// Round `round` of the session, sealed under `key()`: `entries`, then a
/// record per data page at the GPAs of `records` (content 0x5a), whole.
fn round(round: u64, entries: &[Entry], records: &[u64]) -> (Vec<u8>, Vec<u8>) {
    let id = |generation| SnapshotId { id: SESSION, generation };
    let sealer = Sealer::new(&key(), id(round));
    let header = Header {
        id: id(round),
        base: round.checked_sub(1).map(id),
        regions: vec![(0, SIZE)],
        entries: entries.len() as u64,
        records: entries.iter().filter(|e| e.data).map(|e| e.pages).sum(),
        state_len: 0,
        key_check: sealer.key_check(),
    };
    let mut head = header.encode();
    let mut index = Entry::encode_all(entries);
    let index_tag = sealer.seal_index(&head, &mut index);
    let state_tag = sealer.seal_state(&head, &mut []);
    head.extend([&index[..], &index_tag, &state_tag].concat());
    let mut tail = Vec::new();
    for (n, &gpa) in records.iter().enumerate() {
        let mut page = vec![0x5a; PAGE_SIZE as usize];
        let tag = sealer.seal_page(n as u64, gpa, PageState::Private, &mut page);
        tail.extend(page);
        tail.extend(tag);
    }
    tail.extend(sealer.end_tag(header.records));
    (head, tail)
}

/// A source that sends the hello and `then`, then nothing, and keeps the
/// answers; the destination's end.
fn source(mode: MigrationMode, then: Vec<u8>) -> (UnixStream, UnixStream) {
    let (source, destination) = UnixStream::pair().unwrap();
    let sealer = session_sealer(&key(), SESSION);
    let mut out = source.try_clone().unwrap();
    out.write_all(&encode_hello(mode, &sealer, SESSION, &[(0, SIZE)])).unwrap();
    out.write_all(&then).unwrap();
    // Nothing more: the destination reads the end of the stream next.
    source.shutdown(std::net::Shutdown::Write).unwrap();
    (source, destination)
}

fn accept(destination: UnixStream) -> Result<IncomingMigration> {
    let output = Box::new(destination.try_clone().unwrap());
    IncomingMigration::accept(Box::new(destination), output, &key())
}

/// Receives a pre-copy stream of `then` into fresh memory: its error.
fn receive(then: Vec<u8>) -> Option<Error> {
    let (memory, _vm) = memory()?;
    let (_source, destination) = source(MigrationMode::PreCopy, then);
    let mut incoming = accept(destination).unwrap();
    Some(incoming.receive(&memory).unwrap_err())
}

fn framed(frame: Frame, round: u64, (head, tail): (Vec<u8>, Vec<u8>)) -> Vec<u8> {
    [&frame.encode(round, 0)[..], &head, &tail].concat()
}

#[test]
fn a_whole_precopy_stream_is_received() {
    let Some((memory, _vm)) = memory() else { return };
    let first = framed(Frame::Round, 0, round(0, &[data(0, 2)], &[0, PAGE_SIZE]));
    let switch = framed(Frame::Switch, 1, round(1, &[data(PAGE_SIZE, 1)], &[PAGE_SIZE]));
    let (_source, destination) = source(MigrationMode::PreCopy, [first, switch].concat());
    let mut incoming = accept(destination).unwrap();
    assert_eq!(incoming.regions(), vec![(Gpa(0), SIZE)]);
    assert_eq!(incoming.receive(&memory).unwrap(), Vec::<u8>::new());
    assert_eq!(memory.stats().allocated_pages, 2);
}

#[test]
fn a_peer_speaking_something_else_is_eproto_and_refused() {
    let (mut peer, destination) = UnixStream::pair().unwrap();
    peer.write_all(&[b'x'; 200]).unwrap();
    assert_eq!(accept(destination).unwrap_err().errno(), Errno::PROTO);
    let mut answer = [0u8; CONTROL_BYTES];
    peer.read_exact(&mut answer).unwrap();
    assert_eq!(answer[..8], REFUSED_MAGIC, "the peer is told");
}

#[test]
fn a_hello_under_another_key_is_refused_as_such() {
    let (mut peer, destination) = UnixStream::pair().unwrap();
    let sealer = session_sealer(&SnapshotKey::new([8; 32]), SESSION);
    peer.write_all(&encode_hello(MigrationMode::PreCopy, &sealer, SESSION, &[(0, SIZE)])).unwrap();
    assert!(matches!(accept(destination).unwrap_err(), Error::WrongKey));
    // The source reads the refusal as a wrong key too.
    let mut control = ControlReceiver::new(Box::new(peer), sealer);
    assert!(matches!(control.receive().unwrap_err(), Error::WrongKey));
}

#[test]
fn a_page_twice_outside_ram_or_out_of_order_is_refused() {
    let twice = framed(Frame::Round, 0, round(0, &[data(0, 1), data(0, 1)], &[0, 0]));
    let outside = framed(Frame::Round, 0, round(0, &[data(SIZE, 1)], &[SIZE]));
    let (head, mut tail) = round(0, &[data(0, 2)], &[0, PAGE_SIZE]);
    let record = RECORD_BYTES as usize;
    let (first, second) = tail.split_at_mut(record);
    first.swap_with_slice(&mut second[..record]);
    let swapped = framed(Frame::Round, 0, (head, tail));
    let skipped = framed(Frame::Round, 1, round(1, &[data(0, 1)], &[0]));
    let unknown = [9u8; super::FRAME_BYTES].to_vec();
    for (stream, errno, what) in [
        (twice, Errno::BADMSG, "a page twice"),
        (outside, Errno::BADMSG, "a page outside RAM"),
        (swapped, Errno::BADMSG, "pages out of order"),
        (skipped, Errno::PROTO, "a round out of order"),
        (unknown, Errno::PROTO, "an unknown frame"),
        (Vec::new(), Errno::CONNRESET, "a link closed before the switch"),
    ] {
        let Some(error) = receive(stream) else { return };
        assert_eq!(error.errno(), errno, "{what}: {error}");
    }
}

#[test]
fn postcopy_records_sent_twice_stop_the_pages_thread_naming_what_is_lost() {
    let Some((memory, _vm)) = memory() else { return };
    let (head, _) = round(0, &[data(0, 2)], &[0, PAGE_SIZE]);
    let (_, tail) = round(0, &[data(0, 2)], &[0, PAGE_SIZE]);
    let record = &tail[..RECORD_BYTES as usize];
    let records = Frame::Records.encode(0, 1);
    let then = [&Frame::SwitchLazy.encode(0, 0)[..], &head, &records, record, &records, record];
    let (_source, destination) = source(MigrationMode::PostCopy, then.concat());
    let mut incoming = accept(destination).unwrap();
    incoming.receive(&memory).unwrap();
    assert_eq!(memory.pending_snapshot_pages(), 2);
    let (lost, got) = std::sync::mpsc::channel();
    let pages = incoming.start(&memory, move |e| lost.send(e).unwrap()).unwrap();
    assert_eq!(pages.wait().unwrap_err().errno(), Errno::PROTO);
    let lost = got.recv().unwrap();
    assert_eq!(lost.errno(), Errno::NOLINK);
    assert!(
        matches!(lost, Error::MigrationLost { gpa: Gpa(0x1000), pages: 1, .. }),
        "the first page arrived, the second is lost: {lost}"
    );
}

#[test]
fn a_migration_that_fails_gives_the_changes_back_for_the_next_diff() {
    let Some((memory, _vm)) = memory() else { return };
    memory.populate(Gpa(0), &[0x11; 64 << 10]).unwrap();
    memory.finish_launch();
    memory.track_dirty_pages().unwrap();
    memory.save_snapshot(&mut std::io::sink(), &key(), &[]).unwrap();
    memory.punch(Gpa(0x4000), 0x3000).unwrap();
    assert_eq!(memory.changed_pages().unwrap(), 3);
    // A destination that takes the hello and is gone.
    let (here, there) = UnixStream::pair().unwrap();
    let destination = std::thread::spawn(move || drop(accept(there)));
    let input = Box::new(here.try_clone().unwrap());
    let mut output = here;
    let mut pause = || Ok(Vec::new());
    let sent =
        memory.send_migration(input, &mut output, &key(), MigrationMode::PreCopy, &mut pause);
    destination.join().unwrap();
    let failed = sent.unwrap_err();
    assert!(!failed.switched, "{failed}");
    // Its rounds took the three punched pages from the record of changes
    // since the last snapshot: they are there again for the next diff.
    assert_eq!(memory.changed_pages().unwrap(), 3);
    let info = memory.save_diff_snapshot(&mut std::io::sink(), &key(), &[]).unwrap();
    assert_eq!((info.pages, memory.changed_pages().unwrap()), (0, 0), "holes only: {info:?}");
}

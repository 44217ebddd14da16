//! The destination of a migration: the hello, each round checked and
//! applied as it arrives, the switch, then (post-copy) the records as
//! they come, on a thread of their own.

use std::io::{BufReader, Read, Write};
use std::sync::{Arc, Mutex};

use super::{decode_hello, read_exact, session_sealer, Control, ControlSender, Frame};
use super::{MigrationMode, Refusal, RemoteRecords, HELLO_FIXED};
use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::snapshot::format::{SnapshotId, SnapshotKey, RECORD_BYTES, TAG_BYTES};
use crate::snapshot::restore::{open_records, Head, Records};
use crate::Gpa;

/// A migration coming in: the hello taken (same key), the source told
/// so. Make memory of its [`regions`](Self::regions), then
/// [`receive`](Self::receive) into it until the switch, then
/// [`start`](Self::start) (or [`refuse`](Self::refuse)).
pub struct IncomingMigration {
    input: BufReader<Box<dyn Read + Send>>,
    control: Arc<Mutex<ControlSender>>,
    key: SnapshotKey,
    session: [u8; 16],
    mode: MigrationMode,
    regions: Vec<(u64, u64)>,
    round: u64,
    remote: Option<Arc<RemoteRecords>>,
}

impl std::fmt::Debug for IncomingMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingMigration")
            .field("mode", &self.mode)
            .field("regions", &self.regions)
            .field("round", &self.round)
            .finish_non_exhaustive()
    }
}

impl IncomingMigration {
    /// Reads the source's hello from `input` and answers on `output`:
    /// accepted if it was sealed under `key` ([`Error::WrongKey`], and the
    /// source is told, otherwise). `EPROTO` for a peer that does not speak
    /// gmem migration; `ECONNRESET` if the link closes first.
    pub fn accept(
        input: Box<dyn Read + Send>,
        mut output: Box<dyn Write + Send>,
        key: &SnapshotKey,
    ) -> Result<Self> {
        // Small: reads of records (256 KiB) go past it, straight from the link.
        let mut input = BufReader::with_capacity(64 << 10, input);
        let mut fixed = [0u8; HELLO_FIXED];
        read_exact(&mut input, &mut fixed)?;
        let (mode, session, key_check, count) = match decode_hello(&fixed) {
            Ok(hello) => hello,
            Err(e) => {
                ControlSender::refuse(&mut output, Refusal::Other);
                return Err(e);
            }
        };
        let mut bytes = vec![0u8; count as usize * 16];
        read_exact(&mut input, &mut bytes)?;
        let word = |r: &[u8], at: usize| u64::from_le_bytes(r[at..at + 8].try_into().expect("8"));
        let regions: Vec<(u64, u64)> =
            bytes.chunks_exact(16).map(|r| (word(r, 0), word(r, 8))).collect();
        let sealer = session_sealer(key, session);
        if sealer.check_key(&key_check).is_err() {
            ControlSender::refuse(&mut output, Refusal::WrongKey);
            return Err(Error::WrongKey);
        }
        let mut control = ControlSender::new(output, sealer);
        control.send(Control::Accept, 0, 0)?;
        Ok(Self {
            input,
            control: Arc::new(Mutex::new(control)),
            key: key.duplicate(),
            session,
            mode,
            regions,
            round: 0,
            remote: None,
        })
    }

    /// The source's memory layout: each region's GPA and size, ascending
    /// (checked against the memory [`receive`](Self::receive) fills).
    pub fn regions(&self) -> Vec<(Gpa, u64)> {
        self.regions.iter().map(|&(gpa, size)| (Gpa(gpa), size)).collect()
    }

    /// How the source sends.
    pub fn mode(&self) -> MigrationMode {
        self.mode
    }

    /// Receives the rounds into `memory` (fresh, with the source's layout:
    /// [`Error::SnapshotMismatch`] otherwise, `EBUSY` if it holds pages),
    /// each checked as a snapshot is, until the switch; returns the VMM
    /// state sent with it. Ends `memory`'s launch. In post-copy, the pages
    /// still at the source are pending: a first touch asks for them and
    /// waits (see [`start`](Self::start)).
    ///
    /// On bad data ([`Error::BadSnapshot`], [`Error::SnapshotPage`],
    /// `EPROTO` for a frame out of place) or a closed link, the VM must
    /// not run: nothing of it is complete.
    pub fn receive(&mut self, memory: &PrivateMemory) -> Result<Vec<u8>> {
        let mut regions: Vec<_> = memory.regions().to_vec();
        regions.sort_by_key(|r| r.gpa.0);
        let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa.0, r.size)).collect();
        if regions.iter().any(|r| r.file_backing().is_none()) {
            return Err(Error::Unsupported("receiving into native (guest_memfd) regions".into()));
        }
        if layout != self.regions {
            return Err(Error::SnapshotMismatch(format!(
                "the source's memory has regions {:?}; this memory {layout:?}",
                self.regions
            )));
        }
        memory.check_fresh(&regions)?;
        loop {
            let mut frame = [0u8; super::FRAME_BYTES];
            read_exact(&mut self.input, &mut frame)?;
            let (frame, round, _) = Frame::decode(&frame)?;
            if round != self.round
                || !matches!(frame, Frame::Round | Frame::Switch | Frame::SwitchLazy)
            {
                return Err(Error::Protocol(format!(
                    "{frame:?} frame for round {round} where round {} was due",
                    self.round
                )));
            }
            let head = self.read_head()?;
            let huge = regions
                .iter()
                .any(|r| r.file().is_some_and(|f| f.page_kind() != gmem::PageKind::Small));
            if frame == Frame::SwitchLazy && huge {
                return Err(Error::Unsupported(
                    "post-copy into huge-page regions (the kernel serves their faults)".into(),
                ));
            }
            if frame == Frame::SwitchLazy {
                let records = head.header.records;
                let remote = Arc::new(RemoteRecords::new(self.control.clone(), records));
                let state = head.vmm_state.clone();
                let snapshot = head.with_records(Records::Remote(remote.clone()));
                memory.restore_lazily(&regions, snapshot)?;
                self.remote = Some(remote);
                memory.finish_launch();
                return Ok(state);
            }
            let input = &mut self.input;
            let mut next = 0;
            memory.apply_entries(&regions, &head.entries, |record, gpa, state, count, plain| {
                if record != next {
                    return Err(Error::Protocol(format!("record {record} where {next} was due")));
                }
                next += count;
                crate::snapshot::scratch(
                    &crate::snapshot::SEALED,
                    (count * RECORD_BYTES) as usize,
                    |sealed| {
                        read_exact(input, sealed)?;
                        open_records(&head.sealer, record, gpa, state, sealed, plain)
                    },
                )
            })?;
            let mut end = [0u8; TAG_BYTES];
            read_exact(&mut self.input, &mut end)?;
            if !head.sealer.check_end(head.header.records, &end) {
                return Err(Error::BadSnapshot(format!(
                    "round {round}'s end tag failed its check"
                )));
            }
            self.round += 1;
            if frame == Frame::Switch {
                memory.finish_launch();
                return Ok(head.vmm_state);
            }
        }
    }

    /// Reads the head of the round due, checked: this session's, this
    /// round's generation, on the round before.
    fn read_head(&mut self) -> Result<Head> {
        let (session, round, layout) = (self.session, self.round, self.regions.clone());
        let input = &mut self.input;
        let read = |len: u64, _: &str| {
            let mut buf = vec![0u8; len as usize];
            read_exact(input, &mut buf)?;
            Ok(buf)
        };
        let check = |header: &crate::snapshot::format::Header| {
            let id = |generation| SnapshotId { id: session, generation };
            if header.id != id(round) || header.base != round.checked_sub(1).map(id) {
                return Err(Error::Protocol(format!(
                    "a round that is not round {round} of this session (generation {})",
                    header.id.generation
                )));
            }
            if header.regions != layout {
                return Err(Error::Protocol("a round of another layout than the hello's".into()));
            }
            Ok(())
        };
        Head::read(read, &self.key, check)
    }

    /// Tells the source that the VM will not run here (`error`'s errno):
    /// the source keeps it.
    pub fn refuse(self, error: &Error) {
        let errno = error.errno().raw_os_error() as u64;
        let _ =
            self.control.lock().unwrap_or_else(|p| p.into_inner()).send(Control::Failed, errno, 0);
    }

    /// Tells the source that the VM runs here (call it once the vCPUs have
    /// their state, just before they run): from now on the VM is this
    /// side's. In post-copy, starts the thread that receives the pages
    /// still at the source; if the link breaks before the last arrived,
    /// first touches of the missing pages fail with
    /// [`Error::MigrationLost`], and `on_error` gets it too (the VM should
    /// stop).
    pub fn start(
        self,
        memory: &Arc<PrivateMemory>,
        on_error: impl Fn(Error) + Send + 'static,
    ) -> Result<IncomingPages> {
        self.control.lock().unwrap_or_else(|p| p.into_inner()).send(Control::Running, 0, 0)?;
        let Some(remote) = self.remote else {
            return Ok(IncomingPages { thread: None, remote: None });
        };
        let (mut input, memory, records) = (self.input, memory.clone(), remote.clone());
        let thread = std::thread::Builder::new()
            .name("gmem-migrate-pages".into())
            .spawn(move || {
                let received = receive_records(&mut input, &memory, &records);
                if let Err(e) = &received {
                    records.lose(e.to_string());
                    if let Some(lost) = memory.migration_lost(e.to_string()) {
                        on_error(lost);
                    }
                }
                received
            })
            .map_err(Error::io("spawn the migration page thread"))?;
        Ok(IncomingPages { thread: Some(thread), remote: Some(remote) })
    }
}

/// Receives post-copy records until the end tag; then tells the source.
fn receive_records(
    input: &mut BufReader<Box<dyn Read + Send>>,
    memory: &PrivateMemory,
    remote: &RemoteRecords,
) -> Result<()> {
    let mut sealed = Vec::new();
    let mut plain = Vec::new();
    loop {
        let mut frame = [0u8; super::FRAME_BYTES];
        read_exact(input, &mut frame)?;
        match Frame::decode(&frame)? {
            (Frame::Records, first, count) => {
                remote.take_arrival(first, count)?;
                sealed.resize((count * RECORD_BYTES) as usize, 0);
                read_exact(input, &mut sealed)?;
                let written = memory.write_arrived(first, &mut sealed, &mut plain);
                remote.notify();
                written?;
            }
            (Frame::End, records, _) => {
                let mut end = [0u8; TAG_BYTES];
                read_exact(input, &mut end)?;
                memory.check_remote_end(records, &end)?;
                if remote.arrived_count() != records {
                    return Err(Error::Protocol(format!(
                        "the source ended with {} of {records} records sent",
                        remote.arrived_count()
                    )));
                }
                return remote.send(Control::Complete, 0, 0);
            }
            (frame, ..) => {
                return Err(Error::Protocol(format!("{frame:?} frame after the switch")))
            }
        }
    }
}

/// The pages of a post-copy migration still arriving: a thread that ends
/// when the last one did, or the link broke (it is not stopped on drop:
/// it ends with the link).
#[derive(Debug)]
pub struct IncomingPages {
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    remote: Option<Arc<RemoteRecords>>,
}

impl IncomingPages {
    /// Waits until every page arrived (or the link broke: the error).
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or_else(|_| {
                Err(Error::Protocol("the migration page thread panicked".into()))
            }),
            None => Ok(()),
        }
    }

    /// Pages received after the switch so far.
    pub fn received(&self) -> u64 {
        self.remote.as_ref().map_or(0, |r| r.arrived_count())
    }
}

impl std::fmt::Debug for RemoteRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRecords").finish_non_exhaustive()
    }
}

//! The source of a migration: rounds while the guest runs, the switch,
//! then (post-copy) every record of the last round, asked-for ones first.

use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{encode_hello, session_sealer, Control, ControlReceiver, Frame, MigrationInfo};
use super::{MigrationMode, MAX_FRAME_RECORDS};
use crate::bits::PageBits;
use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::snapshot::format::{SnapshotId, SnapshotKey};
use crate::snapshot::save::{seal_chunk, Chunk, SnapshotPlan};

/// Rounds while the guest runs, at most: pre-copy, hybrid.
const PRECOPY_ROUNDS: u32 = 30;
const HYBRID_ROUNDS: u32 = 2;
/// Pre-copy pauses once what is left would take this long to send (at
/// the last round's rate), or is this many pages or fewer.
const SMALL_ENOUGH: Duration = Duration::from_millis(20);
const FEW_PAGES: u64 = 256;
/// How long the source waits for the destination's word that it runs, or
/// that every record arrived.
const ANSWER_WAIT: Duration = Duration::from_secs(60);
/// Records pushed per frame in post-copy.
const PUSH_RECORDS: u64 = 64;

/// A failed migration: the error, and whether the VM had already moved
/// (`switched`: the destination runs it, so the source must not resume
/// it; in post-copy it may lack pages that were never sent).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SendError {
    /// What failed.
    pub error: Error,
    /// Whether the destination took the VM over before it failed.
    pub switched: bool,
}

/// Marks a memory as being sent until dropped.
struct Sending<'a>(&'a AtomicBool);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The destination's answers, read on a thread of their own (the source
/// writes meanwhile); the thread ends when the link closes or the
/// migration is over.
struct Answers {
    messages: Receiver<Result<(Control, u64, u64)>>,
    done: Arc<AtomicBool>,
}

impl Answers {
    fn start(mut control: ControlReceiver) -> Result<Self> {
        let (sender, messages) = std::sync::mpsc::channel();
        let done = Arc::new(AtomicBool::new(false));
        let over = done.clone();
        std::thread::Builder::new()
            .name("gmem-migrate-answers".into())
            .spawn(move || loop {
                let message = control.receive();
                // Idle: nothing to say until the destination needs a page.
                if message.as_ref().is_err_and(|e| e.errno() == crate::Errno::AGAIN) {
                    if over.load(Ordering::Relaxed) {
                        return;
                    }
                    continue;
                }
                let failed = message.is_err();
                if sender.send(message).is_err() || failed || over.load(Ordering::Relaxed) {
                    return;
                }
            })
            .map_err(Error::io("spawn the migration answer thread"))?;
        Ok(Self { messages, done })
    }

    /// The next answer, within `wait`.
    fn next(&self, wait: Duration) -> Result<(Control, u64, u64)> {
        match self.messages.recv_timeout(wait) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => Err(Error::Os {
                op: "wait for the migration destination",
                errno: crate::Errno::TIMEDOUT,
            }),
            Err(RecvTimeoutError::Disconnected) => {
                Err(Error::Os { op: "the migration link closed", errno: crate::Errno::CONNRESET })
            }
        }
    }

    /// An answer that came already, if any.
    fn ready(&self) -> Option<Result<(Control, u64, u64)>> {
        self.messages.try_recv().ok()
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

impl PrivateMemory {
    /// Sends this memory, whose guest runs, to a migration destination
    /// ([`IncomingMigration`](super::IncomingMigration)) over `output`,
    /// reading its answers from `input` (two halves of one link, a socket
    /// and its `try_clone`, say); pages are sealed under `key`, which the
    /// destination must share.
    ///
    /// A thread of its own reads the destination's answers from `input`;
    /// it ends when the link closes (close it once this returns: a socket's
    /// `shutdown`) or when a read times out after the migration ended.
    ///
    /// `mode` says how ([`MigrationMode`]). `pause` is called once, when
    /// the source should stop its vCPUs: it returns once they are out of
    /// `KVM_RUN` for good, with the VMM's state to send (at most 64 MiB).
    /// Turns dirty tracking on.
    ///
    /// On failure, [`SendError::switched`] says whether the destination
    /// took the VM over: if not, the VM is the source's still (resume
    /// it), and the changes the rounds took are recorded again for the
    /// next diff snapshot. A wrong key is [`Error::WrongKey`]; a peer that
    /// is not a gmem destination `EPROTO`; a dropped link its errno.
    /// `EOPNOTSUPP` for native regions, and for post-copy or hybrid on
    /// huge-page regions (the kernel serves their faults); `EBUSY` while
    /// another migration sends it; `EDEADLK` from inside a listener.
    pub fn send_migration(
        &self,
        input: Box<dyn Read + Send>,
        output: &mut dyn Write,
        key: &SnapshotKey,
        mode: MigrationMode,
        pause: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> std::result::Result<MigrationInfo, SendError> {
        let kept = |error| SendError { error, switched: false };
        let started = Instant::now();
        self.gate.check_not_held_here("send a migration").map_err(kept)?;
        if self.snapshots.sending.swap(true, Ordering::SeqCst) {
            return Err(kept(Error::Busy("a migration is sending this memory already".into())));
        }
        let _sending = Sending(&self.snapshots.sending);
        let mut regions: Vec<_> = self.regions().to_vec();
        regions.sort_by_key(|r| r.gpa.0);
        let huge = regions
            .iter()
            .any(|r| r.file().is_some_and(|f| f.page_kind() != gmem::PageKind::Small));
        if regions.is_empty() || regions.iter().any(|r| r.file_backing().is_none()) {
            return Err(kept(Error::Unsupported(
                "migrating memory without regions, or with native (guest_memfd) regions".into(),
            )));
        }
        if huge && mode != MigrationMode::PreCopy {
            return Err(kept(Error::Unsupported(
                "post-copy of huge-page regions (the kernel serves their faults): use pre-copy"
                    .into(),
            )));
        }
        let session = SnapshotId::new(0).map_err(kept)?.id;
        let sealer = session_sealer(key, session);
        let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa.0, r.size)).collect();
        let mut out = Counting { inner: BufWriter::with_capacity(1 << 20, output), bytes: 0 };
        let mut plans = Vec::new();
        let mut info = MigrationInfo::default();
        let result = self.send_until_switch(
            &mut out,
            input,
            (key, session, &encode_hello(mode, &sealer, session, &layout)),
            mode,
            pause,
            &mut plans,
            &mut info,
        );
        let (answers, last) = match result {
            Ok(done) => done,
            Err(error) => {
                plans.iter().for_each(SnapshotPlan::give_back);
                return Err(kept(error));
            }
        };
        if mode != MigrationMode::PreCopy {
            let served = self.push_records(&mut out, &answers, &last);
            info.postcopy_pages = served.map_err(|error| SendError { error, switched: true })?;
        }
        info.bytes = out.bytes;
        info.total = started.elapsed();
        Ok(info)
    }

    /// The hello, the rounds and the switch; the destination's answers,
    /// and the last round's plan, once it says it runs.
    #[allow(clippy::too_many_arguments)]
    fn send_until_switch(
        &self,
        out: &mut Counting<BufWriter<&mut dyn Write>>,
        input: Box<dyn Read + Send>,
        (key, session, hello): (&SnapshotKey, [u8; 16], &[u8]),
        mode: MigrationMode,
        pause: &mut dyn FnMut() -> Result<Vec<u8>>,
        plans: &mut Vec<SnapshotPlan>,
        info: &mut MigrationInfo,
    ) -> Result<(Answers, SnapshotPlan)> {
        let io = || Error::io("write to the migration destination");
        out.write_all(hello).and_then(|()| out.flush()).map_err(io())?;
        let answers = Answers::start(ControlReceiver::new(input, session_sealer(key, session)))?;
        match answers.next(ANSWER_WAIT)? {
            (Control::Accept, ..) => {}
            (other, ..) => {
                return Err(Error::Protocol(format!("the destination answered {other:?} to hello")))
            }
        }
        self.track_dirty_pages()?;
        let id = |round: u64| SnapshotId { id: session, generation: round };
        let base = |round: u64| round.checked_sub(1).map(id);
        let most = match mode {
            MigrationMode::PreCopy => PRECOPY_ROUNDS,
            MigrationMode::Hybrid => HYBRID_ROUNDS,
            MigrationMode::PostCopy => 0,
        };
        let mut round = 0u64;
        while info.rounds < most {
            let began = Instant::now();
            // Kept before it is written: a failure gives its changes back.
            plans.push(self.plan_snapshot(key, id(round), base(round), &[])?);
            let plan = plans.last().expect("just pushed");
            out.write_all(&Frame::Round.encode(round, 0)).map_err(io())?;
            plan.write_head(out)?;
            self.write_records(out, &plan.sealer, &plan.regions, &plan.entries)?;
            plan.write_end(out)?;
            let sent = plan.header.records;
            info.precopy_pages += sent;
            info.rounds += 1;
            round += 1;
            // A destination that gave up says so between rounds.
            if let Some(answer) = answers.ready() {
                return Err(answer.err().unwrap_or(Error::Protocol(
                    "the destination answered in the middle of the rounds".into(),
                )));
            }
            let left = self.changed_pages()?;
            let per_page = began.elapsed() / sent.max(1) as u32;
            if left <= FEW_PAGES || per_page * left.min(u32::MAX as u64) as u32 <= SMALL_ENOUGH {
                break;
            }
        }
        let paused = Instant::now();
        let state = pause()?;
        let _no_conversions = self.gate.conversion_turn()?;
        let last = self.plan_snapshot(key, id(round), base(round), &state)?;
        let switched = (|| {
            if mode == MigrationMode::PreCopy {
                out.write_all(&Frame::Switch.encode(round, 0)).map_err(io())?;
                last.write_head(out)?;
                self.write_records(out, &last.sealer, &last.regions, &last.entries)?;
                last.write_end(out)?;
            } else {
                out.write_all(&Frame::SwitchLazy.encode(round, 0)).map_err(io())?;
                last.write_head(out)?;
                out.flush().map_err(io())?;
            }
            match answers.next(ANSWER_WAIT)? {
                (Control::Running, ..) => Ok(()),
                (Control::Failed, errno, _) => Err(Error::Protocol(format!(
                    "the destination could not run the VM ({})",
                    crate::Errno::from_raw_os_error(errno as i32)
                ))),
                (other, ..) => Err(Error::Protocol(format!(
                    "the destination answered {other:?} to the switch"
                ))),
            }
        })();
        if let Err(e) = switched {
            plans.push(last);
            return Err(e);
        }
        if mode == MigrationMode::PreCopy {
            info.paused_pages = last.header.records;
        }
        info.downtime = paused.elapsed();
        Ok((answers, last))
    }

    /// Post-copy: pushes every record of `last`, those asked for first,
    /// then the end tag, and waits for the destination to have them all.
    /// How many were pushed.
    fn push_records(
        &self,
        out: &mut Counting<BufWriter<&mut dyn Write>>,
        answers: &Answers,
        last: &SnapshotPlan,
    ) -> Result<u64> {
        let io = || Error::io("write to the migration destination");
        let chunks = last.chunks();
        let records = last.header.records;
        let sent = PageBits::new(records);
        let send = |run: std::ops::Range<u64>, out: &mut Counting<_>| -> Result<u64> {
            let mut pushed = 0;
            for unsent in sent.runs(run, false) {
                let mut at = unsent.start;
                while at < unsent.end {
                    let chunk = chunk_at(&chunks, at, unsent.end);
                    let count = chunk.pages.end - chunk.pages.start;
                    let mut sealed = Vec::new();
                    seal_chunk(&chunk, &last.sealer, &mut sealed)?;
                    out.write_all(&Frame::Records.encode(at, count)).map_err(io())?;
                    out.write_all(&sealed).map_err(io())?;
                    sent.set(at..at + count, true);
                    pushed += count;
                    at += count;
                }
            }
            Ok(pushed)
        };
        let mut pushed = 0;
        let mut next = 0;
        loop {
            let answer = if next < records { answers.ready() } else { None };
            match answer {
                Some(Ok((Control::Request, first, count))) => {
                    let end = first.checked_add(count).filter(|&end| end <= records && count > 0);
                    let Some(end) = end.filter(|_| count <= MAX_FRAME_RECORDS) else {
                        return Err(Error::Protocol(format!(
                            "the destination asked for records {first}+{count} of {records}"
                        )));
                    };
                    pushed += send(first..end, out)?;
                    out.flush().map_err(io())?;
                }
                Some(Ok((other, ..))) => {
                    return Err(Error::Protocol(format!(
                        "the destination answered {other:?} before it had every page"
                    )))
                }
                Some(Err(e)) => return Err(e),
                None if next < records => {
                    let end = records.min(next + PUSH_RECORDS);
                    pushed += send(next..end, out)?;
                    next = end;
                }
                None => break,
            }
        }
        out.write_all(&Frame::End.encode(records, 0)).map_err(io())?;
        last.write_end(out)?;
        loop {
            match answers.next(ANSWER_WAIT)? {
                (Control::Complete, ..) => return Ok(pushed),
                // Asked for before it arrived: it is on its way.
                (Control::Request, ..) => {}
                (other, ..) => {
                    return Err(Error::Protocol(format!(
                        "the destination answered {other:?} at the end"
                    )))
                }
            }
        }
    }
}

/// The part of the chunk holding record `record` that ends by `end`.
fn chunk_at<'a>(chunks: &[Chunk<'a>], record: u64, end: u64) -> Chunk<'a> {
    let index = chunks.partition_point(|c| c.record + (c.pages.end - c.pages.start) <= record);
    let chunk = &chunks[index];
    let skip = record - chunk.record;
    let len = (chunk.pages.end - chunk.pages.start - skip).min(end - record);
    Chunk {
        region: chunk.region,
        pages: chunk.pages.start + skip..chunk.pages.start + skip + len,
        state: chunk.state,
        record,
    }
}

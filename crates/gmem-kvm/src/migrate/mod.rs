//! Live migration of private memory over any stream: pre-copy, post-copy,
//! or pre-copy then post-copy (hybrid), every page sealed as in
//! [snapshots](crate::snapshot).
//!
//! The source ([`PrivateMemory::send_migration`]) sends a hello (the
//! session's random identity, a key check and the region layout), then
//! rounds, each a whole snapshot of the session ([`format`] with the
//! session as identity and the round as generation): round 0 every
//! allocated page while the guest runs, then diffs of what the dirty log,
//! conversions and punches changed, until what is left is small. Then it
//! pauses the VM (the VMM's callback, which hands over its own state) and
//! switches:
//!
//! - pre-copy: the last diff and the VMM state are sent whole;
//! - post-copy and hybrid: only the last diff's header, index and VMM
//!   state. The destination resumes at once; a first touch of a page not
//!   yet there asks the source for its record and waits for it (the
//!   snapshot fault path, reading from the link), while the source pushes
//!   every record in order, asked-for ones first, then the end tag.
//!
//! Page states travel in each round's index, with the pages: a conversion
//! or punch during a round marks its pages changed, so the next round
//! (the last one runs paused) holds them in their new state. Rounds are
//! read under the conversion turn, so a page's state and content are
//! read together.
//!
//! The destination ([`IncomingMigration`]) checks every round as a
//! snapshot is checked (identity, generation, layout, index, tags: a page
//! sent twice in a round, out of order or outside RAM fails them), and
//! answers with sealed control messages: accepted, a request for records,
//! running, complete, failed. The source keeps its VM until the
//! destination says it runs: any failure before that ([`SendError`] with
//! `switched: false`) leaves it to the VMM to resume. In post-copy, a link
//! lost before the last record arrived stops the destination's faults
//! with [`Error::MigrationLost`], naming the pages still at the source.
//!
//! [`format`]: crate::snapshot::format

use std::io::{ErrorKind, Read, Write};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::bits::PageBits;
use crate::error::{Errno, Error, Result};
#[cfg(test)]
use crate::snapshot::format::RECORD_BYTES;
use crate::snapshot::format::{Sealer, SnapshotId, SnapshotKey, TAG_BYTES};
#[cfg(doc)]
use crate::PrivateMemory;

mod receive;
mod send;

pub use receive::{IncomingMigration, IncomingPages};
pub use send::SendError;

/// How memory moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationMode {
    /// Rounds while the guest runs, then a short pause for the rest.
    PreCopy,
    /// The destination runs at once; pages follow, asked for or pushed.
    PostCopy,
    /// One pre-copy round of everything (two at most), then post-copy.
    Hybrid,
}

impl MigrationMode {
    fn code(self) -> u32 {
        match self {
            MigrationMode::PreCopy => 0,
            MigrationMode::PostCopy => 1,
            MigrationMode::Hybrid => 2,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        [MigrationMode::PreCopy, MigrationMode::PostCopy, MigrationMode::Hybrid]
            .into_iter()
            .find(|m| m.code() == code)
    }
}

/// What a migration sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationInfo {
    /// Rounds sent while the guest ran.
    pub rounds: u32,
    /// Pages sent while the guest ran.
    pub precopy_pages: u64,
    /// Pages sent while the VM was paused (pre-copy's last round).
    pub paused_pages: u64,
    /// Pages sent after the destination ran (post-copy).
    pub postcopy_pages: u64,
    /// Bytes sent in all.
    pub bytes: u64,
    /// From the pause to the destination's word that it runs.
    pub downtime: Duration,
    /// From the hello to the end.
    pub total: Duration,
}

impl MigrationInfo {
    /// Pages sent in all.
    pub fn pages(&self) -> u64 {
        self.precopy_pages + self.paused_pages + self.postcopy_pages
    }
}

pub(crate) const HELLO_MAGIC: [u8; 8] = *b"GMEMMIG1";
const REFUSED_MAGIC: [u8; 8] = *b"GMEMNOPE";
const VERSION: u32 = 1;
/// The hello's fixed part: magic, version, mode, session, key check,
/// region count, reserved; each region's GPA and size follow.
pub(crate) const HELLO_FIXED: usize = 56;
const MAX_REGIONS: u32 = 4096;
/// A source's frame header: kind, reserved, two arguments.
pub(crate) const FRAME_BYTES: usize = 24;
/// A destination's control message: its number, then kind, reserved and
/// two arguments sealed, then the tag.
const CONTROL_BYTES: usize = 8 + 24 + TAG_BYTES;
/// How long a first touch waits for its page with nothing arriving from
/// the source before it fails (a source that stopped without closing).
const SILENCE: Duration = Duration::from_secs(60);
/// Records in one frame at most.
pub(crate) const MAX_FRAME_RECORDS: u64 = 1024;

/// The source's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Frame {
    /// A round, `a`: a whole snapshot follows.
    Round = 1,
    /// The switch at round `a`: a whole snapshot with the VMM state.
    Switch = 2,
    /// The switch at round `a`: its head only; records follow as asked.
    SwitchLazy = 3,
    /// Records `a..a + b` of the switch round.
    Records = 4,
    /// All `a` records were sent: the end tag follows.
    End = 5,
}

/// A message's 24 bytes: its kind, 4 bytes reserved (zero), two arguments.
fn encode_message(kind: u32, a: u64, b: u64) -> [u8; FRAME_BYTES] {
    let mut out = [0u8; FRAME_BYTES];
    out[..4].copy_from_slice(&kind.to_le_bytes());
    out[8..16].copy_from_slice(&a.to_le_bytes());
    out[16..].copy_from_slice(&b.to_le_bytes());
    out
}

/// What [`encode_message`] encoded: the kind (`None` where the reserved
/// bytes are not zero) and the arguments.
fn decode_message(bytes: &[u8]) -> (Option<u32>, u64, u64) {
    let kind = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    ((bytes[4..8] == [0; 4]).then_some(kind), word(8), word(16))
}

impl Frame {
    pub(crate) fn encode(self, a: u64, b: u64) -> [u8; FRAME_BYTES] {
        encode_message(self as u32, a, b)
    }

    pub(crate) fn decode(bytes: &[u8; FRAME_BYTES]) -> Result<(Self, u64, u64)> {
        let (kind, a, b) = decode_message(bytes);
        [Frame::Round, Frame::Switch, Frame::SwitchLazy, Frame::Records, Frame::End]
            .into_iter()
            .find(|f| Some(*f as u32) == kind)
            .map(|frame| (frame, a, b))
            .ok_or_else(|| Error::Protocol(format!("unknown frame {kind:?} from the source")))
    }
}

/// The destination's control messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Control {
    /// The hello was taken: same key, a layout it can receive.
    Accept = 1,
    /// Records `a..a + b`, please, first.
    Request = 2,
    /// The VM runs here: the source's VM is the destination's now.
    Running = 3,
    /// Every record arrived.
    Complete = 4,
    /// The destination cannot run the VM (`a`: the errno): keep it.
    Failed = 5,
}

/// Why a destination refused a hello, in the clear (it has no key to seal
/// with that the source would trust).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    WrongKey = 1,
    Other = 2,
}

/// The destination's side of the control channel: numbered, sealed.
pub(crate) struct ControlSender {
    out: Box<dyn Write + Send>,
    seq: u64,
    sealer: Sealer,
}

impl ControlSender {
    pub(crate) fn new(out: Box<dyn Write + Send>, sealer: Sealer) -> Self {
        Self { out, seq: 0, sealer }
    }

    pub(crate) fn send(&mut self, kind: Control, a: u64, b: u64) -> Result<()> {
        let mut message = [0u8; CONTROL_BYTES];
        message[..8].copy_from_slice(&self.seq.to_le_bytes());
        let (clear, rest) = message.split_at_mut(8);
        let (body, tag) = rest.split_at_mut(24);
        body.copy_from_slice(&encode_message(kind as u32, a, b));
        tag.copy_from_slice(&self.sealer.seal_control(self.seq, clear, body));
        self.seq += 1;
        let io = || Error::io("write to the migration source");
        self.out.write_all(&message).map_err(io())?;
        self.out.flush().map_err(io())
    }

    /// Refuses a hello, in the clear.
    pub(crate) fn refuse(out: &mut dyn Write, why: Refusal) {
        let mut message = [0u8; CONTROL_BYTES];
        message[..8].copy_from_slice(&REFUSED_MAGIC);
        message[8..12].copy_from_slice(&(why as u32).to_le_bytes());
        let _ = out.write_all(&message).and_then(|()| out.flush());
    }
}

/// The source's side of the control channel: each message checked, in
/// order.
pub(crate) struct ControlReceiver {
    input: Box<dyn Read + Send>,
    seq: u64,
    sealer: Sealer,
}

impl ControlReceiver {
    pub(crate) fn new(input: Box<dyn Read + Send>, sealer: Sealer) -> Self {
        Self { input, seq: 0, sealer }
    }

    /// The next message. `EAGAIN` if the link's read timeout passed
    /// before any of it came (the link is idle, not broken).
    pub(crate) fn receive(&mut self) -> Result<(Control, u64, u64)> {
        let mut message = [0u8; CONTROL_BYTES];
        match self.input.read(&mut message[..1]) {
            Ok(0) => read_exact(&mut self.input, &mut message)?,
            Ok(_) => read_exact(&mut self.input, &mut message[1..])?,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Error::Os { op: "wait for the migration peer", errno: Errno::AGAIN })
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => return self.receive(),
            Err(e) => return Err(Error::io("read from the migration link")(e)),
        }
        if message[..8] == REFUSED_MAGIC {
            let why = u32::from_le_bytes(message[8..12].try_into().expect("4 bytes"));
            return Err(match why {
                1 => Error::WrongKey,
                _ => Error::Protocol("the destination refused the migration".into()),
            });
        }
        let (clear, rest) = message.split_at_mut(8);
        let (body, tag) = rest.split_at_mut(24);
        if clear != self.seq.to_le_bytes() || !self.sealer.open_control(self.seq, clear, body, tag)
        {
            return Err(Error::Protocol(
                "a destination's message failed its check (altered, out of order, or another key)"
                    .into(),
            ));
        }
        self.seq += 1;
        let (kind, a, b) = decode_message(body);
        let all = [
            Control::Accept,
            Control::Request,
            Control::Running,
            Control::Complete,
            Control::Failed,
        ];
        let control = all.into_iter().find(|c| Some(*c as u32) == kind).ok_or_else(|| {
            Error::Protocol(format!("unknown message {kind:?} from the destination"))
        })?;
        Ok((control, a, b))
    }
}

/// Reads exactly `buf.len()` bytes; the end of the stream is `ECONNRESET`.
pub(crate) fn read_exact(input: &mut dyn Read, buf: &mut [u8]) -> Result<()> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            Error::Os { op: "the migration link closed", errno: Errno::CONNRESET }
        }
        _ => Error::io("read from the migration link")(e),
    })
}

/// The sealer of a session's control channel (and its round 0).
pub(crate) fn session_sealer(key: &SnapshotKey, session: [u8; 16]) -> Sealer {
    Sealer::new(key, SnapshotId { id: session, generation: 0 })
}

/// The hello: mode, session, key check, layout.
pub(crate) fn encode_hello(
    mode: MigrationMode,
    sealer: &Sealer,
    session: [u8; 16],
    regions: &[(u64, u64)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HELLO_FIXED + 16 * regions.len());
    out.extend_from_slice(&HELLO_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&mode.code().to_le_bytes());
    out.extend_from_slice(&session);
    out.extend_from_slice(&sealer.key_check());
    out.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for (gpa, size) in regions {
        out.extend_from_slice(&gpa.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
    }
    out
}

/// A hello read: mode, session, key check, and the region count to read.
pub(crate) fn decode_hello(
    fixed: &[u8; HELLO_FIXED],
) -> Result<(MigrationMode, [u8; 16], [u8; 16], u32)> {
    if fixed[..8] != HELLO_MAGIC {
        return Err(Error::Protocol(
            "the peer does not speak gmem migration (no GMEMMIG1 hello)".into(),
        ));
    }
    let word = |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().expect("4 bytes"));
    if word(8) != VERSION {
        return Err(Error::Protocol(format!(
            "migration version {}; this gmem speaks {VERSION}",
            word(8)
        )));
    }
    let mode = MigrationMode::from_code(word(12))
        .ok_or_else(|| Error::Protocol(format!("unknown migration mode {}", word(12))))?;
    let regions = word(48);
    if regions == 0 || regions > MAX_REGIONS || word(52) != 0 {
        return Err(Error::Protocol(format!("a hello of {regions} regions (1 to {MAX_REGIONS})")));
    }
    let session = fixed[16..32].try_into().expect("16 bytes");
    let key_check = fixed[32..48].try_into().expect("16 bytes");
    Ok((mode, session, key_check, regions))
}

/// The records of a post-copy switch round still at the source: asked
/// for by first touches, written as they arrive by the receiving thread.
pub(crate) struct RemoteRecords {
    control: std::sync::Arc<Mutex<ControlSender>>,
    records: u64,
    /// Records asked for (each once).
    requested: PageBits,
    /// Records arrived (each once: a second is the source's error).
    received: PageBits,
    /// Why the link is gone, once it is.
    lost: Mutex<Option<String>>,
    arrived: Condvar,
}

impl RemoteRecords {
    pub(crate) fn new(control: std::sync::Arc<Mutex<ControlSender>>, records: u64) -> Self {
        Self {
            control,
            records,
            requested: PageBits::new(records),
            received: PageBits::new(records),
            lost: Mutex::new(None),
            arrived: Condvar::new(),
        }
    }

    fn lost(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for records `first..first + count` (those not asked for yet).
    pub(crate) fn request(&self, first: u64, count: u64) {
        for run in self.requested.runs(first..first + count, false) {
            self.requested.set(run.clone(), true);
            let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
            for at in run.clone().step_by(MAX_FRAME_RECORDS as usize) {
                let count = MAX_FRAME_RECORDS.min(run.end - at);
                if let Err(e) = control.send(Control::Request, at, count) {
                    drop(control);
                    return self.lose(format!("asking for pages: {e}"));
                }
            }
        }
    }

    /// Waits until `done` holds (checked whenever records arrive), or the
    /// link is lost (its reason), or nothing arrived for [`SILENCE`].
    pub(crate) fn wait_until(&self, done: impl Fn() -> bool) -> std::result::Result<(), String> {
        let mut lost = self.lost();
        let mut quiet = Duration::ZERO;
        loop {
            if done() {
                return Ok(());
            }
            if let Some(why) = lost.as_ref() {
                return Err(why.clone());
            }
            if quiet >= SILENCE {
                return Err(format!("no page came from the source in {} s", SILENCE.as_secs()));
            }
            let step = Duration::from_millis(100);
            let (guard, waited) =
                self.arrived.wait_timeout(lost, step).unwrap_or_else(|p| p.into_inner());
            lost = guard;
            quiet = if waited.timed_out() { quiet + step } else { Duration::ZERO };
        }
    }

    /// Takes records `first..first + count` as arrived: `EPROTO` if one
    /// arrived before or lies past the end.
    pub(crate) fn take_arrival(&self, first: u64, count: u64) -> Result<()> {
        let records = self.records;
        if count == 0
            || count > MAX_FRAME_RECORDS
            || first.checked_add(count).is_none_or(|end| end > records)
        {
            return Err(Error::Protocol(format!(
                "records {first}+{count} from the source: the round has {records}"
            )));
        }
        if let Some(twice) = self.received.first(first..first + count, true) {
            return Err(Error::Protocol(format!("record {twice} sent twice by the source")));
        }
        self.received.set(first..first + count, true);
        Ok(())
    }

    /// Records arrived so far.
    pub(crate) fn arrived_count(&self) -> u64 {
        self.received.count()
    }

    /// Wakes whoever waits for records.
    pub(crate) fn notify(&self) {
        let _lost = self.lost();
        self.arrived.notify_all();
    }

    /// The link is gone: waiters fail from now on.
    pub(crate) fn lose(&self, why: String) {
        self.lost().get_or_insert(why);
        self.arrived.notify_all();
    }

    /// Sends a control message.
    pub(crate) fn send(&self, kind: Control, a: u64, b: u64) -> Result<()> {
        self.control.lock().unwrap_or_else(|p| p.into_inner()).send(kind, a, b)
    }
}

#[cfg(test)]
mod tests;

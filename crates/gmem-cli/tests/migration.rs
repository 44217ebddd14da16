//! `gmem run --migrate-to` and `--incoming`, two processes on this
//! machine over Unix sockets and loopback TCP: guests finish at the
//! destination as an uninterrupted run; failures before the switch leave
//! the guest finishing at the source (status 5); bad input is refused
//! with its status.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};

use common::{assert_adds_up, console, finish, json, kvm, run_json as run, status, stderr, Dir};
use common::{CONVERT_STAGE_1, CONVERT_SYNCS};

/// A `gmem run --incoming` in the background, listening.
struct Incoming {
    child: std::process::Child,
    /// Where it listens (a TCP port 0 is the one it got).
    address: String,
    stderr: std::thread::JoinHandle<String>,
}

impl Incoming {
    fn start(dir: &Dir, address: &str, args: &[&str]) -> Self {
        let key = dir.key();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gmem"))
            .args(
                [&["run", "--json", "--incoming", address, "--key-file", &key][..], args].concat(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let address = loop {
            let mut line = String::new();
            assert!(lines.read_line(&mut line).unwrap() > 0, "no listening line: {seen}");
            seen += &line;
            if let Some(at) = line.trim().strip_prefix("gmem run: waiting for a migration at ") {
                break at.to_owned();
            }
        };
        let stderr = std::thread::spawn(move || {
            lines.read_to_string(&mut seen).unwrap();
            seen
        });
        Self { child, address, stderr }
    }

    fn finish(self) -> (Output, String) {
        let out = finish(self.child);
        (out, self.stderr.join().unwrap())
    }
}

/// Runs `guest` uninterrupted, then migrated at stage 1 in `mode` to a
/// destination listening at `address` (`extra` for all, `before` and
/// `after` the sync actions up to and after the switch, `dest` for the
/// destination only); consoles, syncs and exit codes must match.
#[allow(clippy::too_many_arguments)]
fn migrates_as_uninterrupted(
    dir: &Dir,
    guest: &str,
    mode: &str,
    address: &str,
    extra: &[&str],
    before: &[&str],
    after: &[&str],
    dest: &[&str],
) {
    let whole = run(&[&["--guest", guest][..], extra, before, after].concat());
    assert_eq!(status(&whole), 0, "{}", stderr(&whole));
    let incoming = Incoming::start(dir, address, &[after, dest].concat());
    let source = run(&[
        &["--guest", guest, "--key-file", &dir.key(), "--migrate-to", &incoming.address][..],
        &["--migrate-at", "1", "--migrate-mode", mode],
        extra,
        before,
    ]
    .concat());
    let (destination, dest_err) = incoming.finish();
    let what = format!("{guest} {mode} {address}");
    assert_eq!(status(&source), 0, "{what}: {}", stderr(&source));
    assert_eq!(status(&destination), 0, "{what}: {dest_err}");
    let v = json(&source);
    assert_eq!(v["reason"], "migrated", "{v}");
    assert!(v["migration"]["pages"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(json(&destination)["exit_code"], 0);
    assert_adds_up(&source, &destination, &whole, &what);
}

#[test]
fn touch_convert_stress_and_disk_guests_finish_at_the_destination() {
    if !kvm() {
        return;
    }
    let dir = Dir::new("migrate");
    let sock = dir.path("m.sock");
    let unix = format!("unix:{sock}");
    let touch = ["--vcpus", "2", "--mem", "128M"];
    for mode in ["precopy", "postcopy", "hybrid"] {
        migrates_as_uninterrupted(&dir, "touch", mode, &unix, &touch, &[], &[], &[]);
    }
    // Without a stage: as soon as the vCPUs run. `spin` never ends: it
    // spins on at the destination until that one's timeout (which bounds
    // its wait for the source too).
    let incoming = Incoming::start(&dir, &unix, &["--timeout", "5"]);
    let to = incoming.address.clone();
    let spin = ["--guest", "spin", "--timeout", "30", "--key-file", &dir.key()];
    let source = run(&[&spin[..], &["--migrate-to", &to]].concat());
    let (destination, dest_err) = incoming.finish();
    assert_eq!((status(&source), status(&destination)), (0, 124), "{}{dest_err}", stderr(&source));
    assert_eq!(json(&source)["reason"], "migrated");
    assert_eq!(json(&destination)["reason"], "timeout", "{dest_err}");
    let (before, after) = CONVERT_SYNCS.split_at(CONVERT_STAGE_1);
    let tcp = "tcp:127.0.0.1:0";
    migrates_as_uninterrupted(&dir, "convert", "precopy", tcp, &[], before, after, &[]);
    migrates_as_uninterrupted(&dir, "convert", "postcopy", tcp, &[], before, after, &[]);
    let stop = ["--sync", "2:write:0xf00000:01"];
    migrates_as_uninterrupted(&dir, "stress", "hybrid", &unix, &["--vcpus", "2"], &[], &stop, &[]);
    // The disk is shared storage, flushed at the switch: the guest reads
    // back at the destination what it wrote at the source.
    for mode in ["precopy", "postcopy"] {
        let disk = dir.path(&format!("{mode}.img"));
        let incoming = Incoming::start(&dir, &unix, &["--disk", &disk]);
        let to = incoming.address.clone();
        let source = disk_source(&dir, &disk, &to, mode);
        let (destination, dest_err) = incoming.finish();
        assert_eq!(status(&source), 0, "{}", stderr(&source));
        assert_eq!(status(&destination), 0, "{dest_err}");
        let read_back = console(&destination);
        assert!(read_back.starts_with("disk: run 1: wrote, flushed and read back"), "{read_back}");
        // As a run on a fresh disk of its own that never moved.
        let alone = dir.path(&format!("{mode}-alone.img"));
        let whole = run(&["--guest", "disk", "--disk", &alone]);
        assert_eq!(console(&source) + &read_back, console(&whole), "disk {mode}");
    }
}

/// Runs the `disk` guest on `disk`, migrating at stage 1 to `to` in `mode`.
fn disk_source(dir: &Dir, disk: &str, to: &str, mode: &str) -> Output {
    let key = dir.key();
    let mut args = vec!["--guest", "disk", "--disk", disk, "--key-file", &key];
    args.extend(["--migrate-to", to, "--migrate-at", "1", "--migrate-mode", mode]);
    run(&args)
}

/// Runs `touch` migrating to `address` and checks that it finished at
/// the source: status 5, exit code 0, the error saying why.
fn finishes_at_the_source(dir: &Dir, address: &str, why: &str) {
    let source = run(&[
        "--guest",
        "touch",
        "--vcpus",
        "2",
        "--key-file",
        &dir.key(),
        "--migrate-to",
        address,
        "--migrate-at",
        "1",
    ]);
    assert_eq!(status(&source), 5, "{}", stderr(&source));
    let v = json(&source);
    assert_eq!((&v["reason"], &v["exit_code"]), (&"exit".into(), &0.into()), "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("the migration failed") && error.contains(why), "{error}");
}

#[test]
fn failures_before_the_switch_leave_the_guest_finishing_at_the_source() {
    if !kvm() {
        return;
    }
    let dir = Dir::new("migrate-fail");
    // Nothing listens there.
    let nowhere = format!("unix:{}", dir.path("none.sock"));
    finishes_at_the_source(&dir, &nowhere, "connect");
    // A stage never reached: no migration, and the status says so.
    let key = dir.key();
    let never = ["--guest", "touch", "--key-file", &key, "--migrate-to", &nowhere];
    let out = run(&[&never[..], &["--migrate-at", "7"]].concat());
    assert_eq!(status(&out), 5, "{}", stderr(&out));
    assert_eq!(json(&out)["exit_code"], 0);
    assert!(stderr(&out).contains("the run ended before the migration started"));
    // A destination under another key refuses, and says so.
    let other = Dir::new("migrate-other-key");
    std::fs::write(other.key(), [0x99u8; 32]).unwrap();
    let incoming = Incoming::start(&other, &format!("unix:{}", dir.path("k.sock")), &[]);
    finishes_at_the_source(&dir, &incoming.address.clone(), "key");
    let (destination, dest_err) = incoming.finish();
    assert_eq!(status(&destination), 2, "{dest_err}");
    assert!(dest_err.contains("key rejected"), "{dest_err}");
    // A destination that cannot take the VM (no disk for the guest's):
    // it says so at the switch, and the source resumes.
    let disk = dir.path("disk.img");
    let incoming = Incoming::start(&dir, &format!("unix:{}", dir.path("d.sock")), &[]);
    let source = disk_source(&dir, &disk, &incoming.address.clone(), "precopy");
    let (destination, dest_err) = incoming.finish();
    assert_eq!(status(&source), 5, "{}", stderr(&source));
    assert_eq!(json(&source)["exit_code"], 0, "{}", stderr(&source));
    assert!(console(&source).contains("disk: run 1: wrote, flushed and read back"));
    assert_eq!(status(&destination), 2, "{dest_err}");
    assert!(dest_err.contains("device"), "{dest_err}");
    // A destination that takes the connection, reads a little and dies.
    let path = dir.path("dies.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let dying = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut some = [0u8; 64];
        stream.read_exact(&mut some).unwrap();
    });
    finishes_at_the_source(&dir, &format!("unix:{path}"), "");
    dying.join().unwrap();
}

#[test]
fn bad_migration_input_is_refused_with_its_status() {
    if !kvm() {
        return;
    }
    let dir = Dir::new("migrate-bad");
    let key = dir.key();
    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = format!("tcp:{}", taken.local_addr().unwrap());
    let out = run(&["--incoming", &port, "--key-file", &key]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot listen"), "{}", stderr(&out));
    // Malformed addresses, a missing key, options without their migration.
    for args in [
        &["--incoming", "tcp:localhost", "--key-file", &key][..],
        &["--incoming", "udp:1.2.3.4:5", "--key-file", &key],
        &["--guest", "touch", "--migrate-to", "unix:", "--key-file", &key],
        &["--incoming", "unix:/nonexistent/dir/x.sock", "--key-file", &key],
        &["--guest", "touch", "--migrate-to", "tcp:127.0.0.1:1"],
        &["--guest", "touch", "--migrate-at", "1"],
        &["--incoming", "tcp:127.0.0.1:0", "--guest", "touch", "--key-file", &key],
        &["--incoming", "tcp:127.0.0.1:0", "--mem", "64M", "--key-file", &key],
    ] {
        let out = run(args);
        assert_eq!(status(&out), 2, "{args:?}: {}", stderr(&out));
    }
    // A peer that speaks something else.
    let incoming = Incoming::start(&dir, "tcp:127.0.0.1:0", &[]);
    let at = incoming.address.strip_prefix("tcp:").unwrap().to_owned();
    let mut peer = std::net::TcpStream::connect(at).unwrap();
    std::io::Write::write_all(&mut peer, &[b'G'; 4096]).unwrap();
    let (out, err) = incoming.finish();
    assert_eq!(status(&out), 2, "{err}");
    assert!(err.contains("does not speak gmem migration"), "{err}");
    // Nobody comes.
    let incoming = Incoming::start(&dir, "tcp:127.0.0.1:0", &["--timeout", "0.3"]);
    let (out, err) = incoming.finish();
    assert_eq!(status(&out), 124, "{err}");
}

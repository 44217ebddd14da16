//! `gmem run --save-at` and `--restore`, end to end: guests resumed from
//! full and diff snapshots, lazily and eagerly, finish as an uninterrupted
//! run; every bad input is refused with its status before a vCPU runs,
//! and a failed save loses nothing.

mod common;

use std::path::Path;

use common::{assert_adds_up, console, json, kvm, run_json as run, status, stderr, Dir};
use common::{CONVERT_STAGE_1, CONVERT_SYNCS};

/// Runs `guest` once uninterrupted, once saved at `stage` and restored
/// (with `before`/`after` the sync actions of the stages up to and after
/// the save, `extra` for both), in each restore mode; the consoles and exit
/// codes must match.
fn resumes_as_uninterrupted(
    dir: &Dir,
    guest: &str,
    extra: &[&str],
    before: &[&str],
    after: &[&str],
) {
    let whole = run(&[&["--guest", guest][..], extra, before, after].concat());
    assert_eq!(status(&whole), 0, "{}", stderr(&whole));
    let snap = dir.path(&format!("{guest}.snap"));
    let save_at = format!("1:{snap}");
    let saved = run(&[
        &["--guest", guest, "--save-at", &save_at, "--key-file", &dir.key()][..],
        extra,
        before,
    ]
    .concat());
    assert_eq!(status(&saved), 0, "{}", stderr(&saved));
    let v = json(&saved);
    assert_eq!(v["reason"], "saved", "{v}");
    assert_eq!(v["exit_code"], serde_json::Value::Null);
    assert!(v["snapshot"]["pages"].as_u64().unwrap() > 0, "{v}");
    for mode in [&[][..], &["--restore-eager"], &["--prefetch"]] {
        let resumed = run(&[
            &["--restore", &snap, "--key-file", &dir.key()][..],
            mode,
            extra,
            after,
        ]
        .concat());
        assert_eq!(status(&resumed), 0, "{guest} {mode:?}: {}", stderr(&resumed));
        assert_adds_up(&saved, &resumed, &whole, &format!("{guest} {mode:?}"));
    }
}

#[test]
fn convert_touch_stress_and_disk_guests_resume_as_if_never_stopped() {
    if !kvm() {
        return;
    }
    let dir = Dir::new("resume");
    let (before, after) = CONVERT_SYNCS.split_at(CONVERT_STAGE_1);
    resumes_as_uninterrupted(&dir, "convert", &[], before, after);
    resumes_as_uninterrupted(&dir, "touch", &["--vcpus", "2", "--mem", "128M"], &[], &[]);
    let stop = ["--sync", "2:write:0xf00000:01"];
    resumes_as_uninterrupted(&dir, "stress", &["--vcpus", "2"], &[], &stop);
    // The disk is shared storage: the saved run's writes are there for the
    // restored one (restored from the same snapshot each time).
    let disk = dir.path("disk.img");
    let snap = dir.path("disk.snap");
    let save_at = format!("1:{snap}");
    let saved =
        run(&["--guest", "disk", "--disk", &disk, "--save-at", &save_at, "--key-file", &dir.key()]);
    assert_eq!(status(&saved), 0, "{}", stderr(&saved));
    for mode in ["--restore-eager", "--prefetch"] {
        let resumed = run(&["--restore", &snap, mode, "--disk", &disk, "--key-file", &dir.key()]);
        assert_eq!(status(&resumed), 0, "{}", stderr(&resumed));
        assert!(console(&resumed).starts_with("disk: run 1: wrote, flushed and read back"));
    }
    // Without its disk, the snapshot does not fit.
    let out = run(&["--restore", &snap, "--key-file", &dir.key()]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("device"), "{}", stderr(&out));
}

#[test]
fn a_diff_snapshot_restores_on_its_base() {
    if !kvm() {
        return;
    }
    let dir = Dir::new("diff");
    let (full, diff) = (dir.path("full.snap"), dir.path("diff.snap"));
    let key = dir.key();
    let out = run(&[
        "--guest",
        "stress",
        "--vcpus",
        "2",
        "--save-at",
        &format!("1:{full}"),
        "--key-file",
        &key,
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let full_bytes = json(&out)["snapshot"]["bytes"].as_u64().unwrap();
    // Restored and saved again at stage 2, after the soak's stop is written.
    let save_diff =
        ["--save-at", &format!("2:{diff}"), "--save-diff", &full, "--sync", "2:write:0xf00000:01"];
    let out = run(&[&["--restore", &full, "--key-file", &key][..], &save_diff].concat());
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert!(v["snapshot"]["base"].is_string(), "{v}");
    assert!(v["snapshot"]["bytes"].as_u64().unwrap() < full_bytes, "{v}");
    for mode in [&[][..], &["--restore-eager"]] {
        let out = run(
            &[&["--restore", &full, "--restore", &diff, "--key-file", &key][..], mode].concat()
        );
        assert_eq!(status(&out), 0, "{mode:?}: {}", stderr(&out));
        assert_eq!(json(&out)["exit_code"], 0);
    }
    // The diff alone, or a diff on a base that is not the restored one.
    let out = run(&["--restore", &diff, "--key-file", &key]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("restore its base first"), "{}", stderr(&out));
    let out =
        run(&[&["--restore", &full, "--restore", &diff, "--key-file", &key][..], &save_diff]
            .concat());
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("is not the one this VM is restored from"), "{}", stderr(&out));
}

/// Makes a FIFO at `path`.
fn fifo(path: &str) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
}

#[test]
fn bad_snapshot_inputs_are_refused_before_the_guest_runs() {
    if !kvm() {
        return;
    }
    let dir = Dir::new("bad");
    let key = dir.key();
    let snap = dir.path("convert.snap");
    let saved = run(&["--guest", "convert", "--save-at", &format!("1:{snap}"), "--key-file", &key]);
    assert_eq!(status(&saved), 0, "{}", stderr(&saved));
    let (fifo_path, short_key, dir_path) = (dir.path("fifo"), dir.path("short.key"), dir.path(""));
    fifo(&fifo_path);
    std::fs::write(&short_key, [1u8; 31]).unwrap();
    let other_key = dir.path("other.key");
    std::fs::write(&other_key, [7u8; 32]).unwrap();
    let bytes = std::fs::read(&snap).unwrap();
    let tampered = |name: &str, bad: Vec<u8>| {
        let path = dir.path(name);
        std::fs::write(&path, bad).unwrap();
        path
    };
    let flipped = tampered("flipped.snap", {
        let mut b = bytes.clone();
        b[130] ^= 1; // in the region table
        b
    });
    let short = tampered("short.snap", bytes[..bytes.len() - 7].to_vec());
    let not_one = tampered("not.snap", b"hello".repeat(100));
    let save = |path: &str| format!("1:{path}");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "key of 31 bytes",
            vec!["--restore".into(), snap.clone(), "--key-file".into(), short_key.clone()],
            "32 bytes",
        ),
        (
            "key a FIFO",
            vec!["--restore".into(), snap.clone(), "--key-file".into(), fifo_path.clone()],
            "32 bytes",
        ),
        ("key missing", vec!["--restore".into(), snap.clone()], "--key-file"),
        (
            "another key",
            vec!["--restore".into(), snap.clone(), "--key-file".into(), other_key],
            "another key",
        ),
        (
            "restore a directory",
            vec!["--restore".into(), dir_path.clone(), "--key-file".into(), key.clone()],
            "regular file",
        ),
        (
            "restore a FIFO",
            vec!["--restore".into(), fifo_path.clone(), "--key-file".into(), key.clone()],
            "regular file",
        ),
        (
            "restore a device",
            vec!["--restore".into(), "/dev/zero".into(), "--key-file".into(), key.clone()],
            "regular file",
        ),
        (
            "not a snapshot",
            vec!["--restore".into(), not_one, "--key-file".into(), key.clone()],
            "not a gmem snapshot",
        ),
        (
            "flipped byte",
            vec!["--restore".into(), flipped, "--key-file".into(), key.clone()],
            "altered",
        ),
        (
            "cut short",
            vec!["--restore".into(), short, "--key-file".into(), key.clone()],
            "cut short",
        ),
        (
            "other --mem",
            vec![
                "--restore".into(),
                snap.clone(),
                "--mem".into(),
                "128M".into(),
                "--key-file".into(),
                key.clone(),
            ],
            "--mem 64M",
        ),
        (
            "other --vcpus",
            vec![
                "--restore".into(),
                snap.clone(),
                "--vcpus".into(),
                "2".into(),
                "--key-file".into(),
                key.clone(),
            ],
            "--vcpus 1",
        ),
        (
            "save to a directory",
            vec![
                "--guest".into(),
                "convert".into(),
                "--save-at".into(),
                save(&dir_path),
                "--key-file".into(),
                key.clone(),
            ],
            "not a regular file",
        ),
        (
            "save to a FIFO",
            vec![
                "--guest".into(),
                "convert".into(),
                "--save-at".into(),
                save(&fifo_path),
                "--key-file".into(),
                key.clone(),
            ],
            "not a regular file",
        ),
        (
            "save to a device",
            vec![
                "--guest".into(),
                "convert".into(),
                "--save-at".into(),
                save("/dev/null"),
                "--key-file".into(),
                key.clone(),
            ],
            "not a regular file",
        ),
        (
            "save nowhere",
            vec![
                "--guest".into(),
                "convert".into(),
                "--save-at".into(),
                save("/nonexistent/dir/x.snap"),
                "--key-file".into(),
                key.clone(),
            ],
            "directory",
        ),
        (
            "save without a key",
            vec!["--guest".into(), "convert".into(), "--save-at".into(), save(&snap)],
            "--key-file",
        ),
    ];
    for (what, args, says) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args);
        assert_eq!(status(&out), 2, "{what}: {}", stderr(&out));
        let v = json(&out);
        assert_eq!(v["reason"], "error", "{what}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{what}: {v}");
        assert_eq!(v["console"], "", "{what}: the guest ran");
    }
    // Usage errors are clap's status 2 too, absurd numbers among them.
    for args in [
        &["--restore", &snap, "--guest", "convert"][..],
        &["--save-diff", &snap],
        &["--save-at", "1e20:/tmp/x.snap", "--key-file", &key],
        &["--save-at", "18446744073709551616:/tmp/x.snap", "--key-file", &key],
        &["--save-at", "1:", "--key-file", &key],
    ] {
        assert_eq!(status(&run(args)), 2, "{args:?}");
    }
    assert_eq!(std::fs::read(&snap).unwrap(), bytes, "a refused save left the old snapshot");
}

#[test]
fn a_full_file_system_fails_the_save_and_the_guest_runs_on() {
    if !kvm() {
        return;
    }
    let dir = Dir::new("full");
    let small = gmem::TmpfsMount::new(32 << 10, "nr_inodes=16").expect("mount a tmpfs (root)");
    let path = small.path().join("convert.snap");
    let path = path.to_str().unwrap();
    let out = run(&[
        "--guest",
        "convert",
        "--save-at",
        &format!("1:{path}"),
        "--key-file",
        &dir.key(),
        "--sync",
        "1:read:0x600000:11",
        "--sync",
        "1:write:0x600040:686f73742d3e6775",
        "--sync",
        "2:read:0x600000:8",
    ]);
    assert_eq!(status(&out), 4, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["exit_code"], 0, "{v}");
    assert!(v["error"].as_str().unwrap().contains("No space left"), "{v}");
    assert!(console(&out).contains("convert: all conversions ok"), "{v}");
    assert_eq!(std::fs::read_dir(small.path()).unwrap().count(), 0, "nothing partial is left");
    assert!(!Path::new(path).exists());
    // A stage the guest never reaches: it runs to its end, nothing is saved.
    let never = dir.path("never.snap");
    let out =
        run(&["--guest", "demo", "--save-at", &format!("9:{never}"), "--key-file", &dir.key()]);
    assert_eq!(status(&out), 4, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["exit_code"], 0, "{v}");
    assert!(v["error"].as_str().unwrap().contains("before sync stage 9"), "{v}");
    assert!(!Path::new(&never).exists());
}

#[test]
fn a_snapshot_restores_onto_huge_pages_eagerly() {
    if !kvm() {
        return;
    }
    let dir = Dir::new("huge");
    let snap = dir.path("touch.snap");
    let saved =
        run(&["--guest", "touch", "--save-at", &format!("1:{snap}"), "--key-file", &dir.key()]);
    assert_eq!(status(&saved), 0, "{}", stderr(&saved));
    let mount = gmem::TmpfsMount::huge(256 << 20).expect("mount a huge tmpfs (root)");
    let huge = mount.path().to_str().unwrap();
    let out = run(&["--restore", &snap, "--key-file", &dir.key(), "--huge-pages", huge]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let stats = &json(&out)["stats"];
    // KVM's window on huge pages is served by the kernel: restored whole first.
    assert_eq!(stats["pending_snapshot_pages"], 0, "{stats}");
    assert!(stats["kvm_pages_2m"].as_u64().unwrap() > 0, "{stats}");
}

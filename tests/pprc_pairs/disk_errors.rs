//! Failing storage under a pair (files and loop devices on full scratch
//! file systems, devices that cannot discard): failed writes, flushes and
//! trims on either side suspend the pair as the critical mode says, and
//! the resync leaves the volumes equal.

use super::*;

/// Writes 64 KiB of random data (seed `argv[3]`) at `argv[2]` without
/// FUA, then flushes; prints `ok` or the flush's errno name.
const WRITE_THEN_FLUSH: &str = r#"
import nbd, random, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(random.Random(int(sys.argv[3])).randbytes(65536), int(sys.argv[2]))
try:
    h.flush()
    print("ok")
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.string))
h.shutdown()
"#;

/// Asserts that the pair view `p` is suspended for `reason` and not
/// current; `context` (may be empty) says what happened before.
fn assert_suspended_for(p: &serde_json::Value, reason: &str, context: &str) {
    assert_eq!(
        (
            p["state"].as_str(),
            p["reason"].as_str(),
            p["replication_status"].as_str()
        ),
        (Some("suspended"), Some(reason), Some("not current")),
        "{context}: {p}"
    );
}

/// A duplex pair whose volume at the server `serial` is a raw disk: a loop
/// device over a 64 MiB sparse file on a scratch file system (`fstype`,
/// mounted with `options`), which a test can fill up. The fields drop in
/// order: both servers stop before the device is detached and the file
/// system unmounted (also when the test fails).
struct PairOnLoopDevice {
    sites: Sites,
    dev: LoopDevice,
    fs: ScratchMount,
    _dir: tempfile::TempDir,
}

/// Starts two sites, the volume 0x10/0 at `serial` on a loop device (see
/// [`PairOnLoopDevice`]), and a pair of the two volumes 0x10/0, waited
/// for until duplex: returns them with the primary and the secondary.
fn pair_on_loop_device(
    name: &str,
    fstype: &str,
    options: &str,
    serial: &str,
) -> (PairOnLoopDevice, String, String) {
    pair_on_loop_device_tuned(name, fstype, options, serial, |_| {})
}

/// [`pair_on_loop_device`] with both sites' configurations changed by
/// `tune` too.
fn pair_on_loop_device_tuned(
    name: &str,
    fstype: &str,
    options: &str,
    serial: &str,
    tune: impl Fn(&mut TestConfig),
) -> (PairOnLoopDevice, String, String) {
    let dir = tempdir(name);
    let fs = ScratchMount::mount(fstype, options, &dir.path().join("fs"));
    let backing = fs.dir.join("volume.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = LoopDevice::attach(&backing);
    let sites = Sites::start(name, |cfg| {
        tune(cfg);
        if cfg.serial == serial {
            cfg.volumes[0].path = Some(dev.dev.clone());
        }
    });
    path(&sites.a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (sites.a.vol(0x10, 0), sites.b.vol(0x10, 0));
    essctl(&sites.a, &["pprc", "establish", &v, &sv]).ok();
    wait_duplex(&sites.a, &v);
    let setup = PairOnLoopDevice {
        sites,
        dev,
        fs,
        _dir: dir,
    };
    (setup, v, sv)
}

/// A raw-disk primary whose storage fails at write-back: a loop device over
/// a sparse file on a tmpfs that is full. The host's write lands in the
/// device's page cache and on the secondary; its FLUSH fails on the
/// primary. The host gets the error, and the pair must not stay `duplex,
/// current` — the secondary holds the write durably, the primary may not
/// (the failed pages are not written back again, and the error is
/// reported once, so the cleaner's next flush would succeed and clear the
/// track). It suspends (`primary I/O error`) with the track recorded; once
/// the storage has room again a resync leaves both volumes equal.
#[test]
fn a_flush_that_fails_on_the_primary_suspends_the_pair() {
    let (setup, v, sv) =
        pair_on_loop_device("pprc-primary-flush-fails", "tmpfs", "size=8m", "TSTA1");
    let (a, b) = (&setup.sites.a, &setup.sites.b);
    let fs = &setup.fs;
    // The copy's marks are cleared: the pair is current.
    let deadline = Instant::now() + Duration::from_secs(20);
    while show(a, &v)["replication_status"] != "current" {
        assert!(Instant::now() < deadline, "never current: {}", show(a, &v));
        std::thread::sleep(Duration::from_millis(100));
    }
    fs.fill("filler");
    let answer = python(
        WRITE_THEN_FLUSH,
        &[&a.uri(&v), &(5 * TRACK).to_string(), "7"],
    );
    let p = show(a, &v);
    assert_ne!(
        answer.trim(),
        "ok",
        "the flush must fail on the full storage"
    );
    assert_suspended_for(
        &p,
        "primary I/O error",
        &format!("after a failed flush ({})", answer.trim()),
    );
    assert!(p["out_of_sync_tracks"].as_u64() >= Some(1), "{p}");
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
}

/// Writes 4 tracks of random data at track 3, flushes, then trims
/// `argv[2]` bytes at `argv[3]` and flushes.
const WRITE_THEN_TRIM: &str = r#"
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(random.Random(11).randbytes(4 * 65536), 3 * 65536)
h.flush()
h.trim(int(sys.argv[2]), int(sys.argv[3]))
h.flush()
h.shutdown()
print("ok")
"#;

/// A secondary on a raw device that cannot discard (a loop device over a
/// file on ramfs, which has no fallocate) and a primary file that can:
/// a TRIM zeroes the primary's range, so the secondary must end zeroed
/// there too — the pair must not stay `duplex, current` with different
/// contents. Trimmed ranges are checked whole and unaligned.
#[test]
fn a_trim_at_a_secondary_that_cannot_discard_leaves_the_volumes_equal() {
    trim_with_one_side_unable_to_discard("TSTB2");
}

/// The other way round: the primary cannot discard, so its data stays,
/// and the secondary, which could, must keep it too.
#[test]
fn a_trim_at_a_primary_that_cannot_discard_leaves_the_volumes_equal() {
    trim_with_one_side_unable_to_discard("TSTA1");
}

/// Volume 0x10/0 of `serial` is a loop device over a file on ramfs (no
/// discard); the other side's is a file. Writes and trims the primary and
/// compares both volumes, whole, after each trim.
fn trim_with_one_side_unable_to_discard(serial: &'static str) {
    let (setup, v, sv) = pair_on_loop_device(
        &format!("pprc-trim-no-discard-{serial}"),
        "ramfs",
        "mode=0700",
        serial,
    );
    let (a, b) = (&setup.sites.a, &setup.sites.b);
    for (offset, len) in [(3 * TRACK, TRACK), (4 * TRACK + 1000, 2 * TRACK)] {
        let answer = python(
            WRITE_THEN_TRIM,
            &[&a.uri(&v), &offset.to_string(), &len.to_string()],
        );
        assert_eq!(answer.trim(), "ok");
        let p = show(a, &v);
        assert_eq!(p["state"], "duplex", "{p}");
        let (pa, pb) = (volume_sha(a, &v), volume_sha(b, &sv));
        assert_eq!(
            pa, pb,
            "after a trim of {len} bytes at {offset}, the pair is {} and {}, the volumes differ",
            p["state"], p["replication_status"]
        );
    }
}

/// Tries one 64 KiB write of random data (seed `argv[3]`) at `argv[2]`,
/// then a flush; prints `ok` or the errno name.
const TRY_WRITE_AT: &str = r#"
import nbd, random, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(random.Random(int(sys.argv[3])).randbytes(65536), int(sys.argv[2]))
    h.flush()
    print("ok")
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.string))
h.shutdown()
"#;

fn try_write_at(essd: &Essd, export: &str, offset: u64, seed: u64) -> String {
    python(
        TRY_WRITE_AT,
        &[&essd.uri(export), &offset.to_string(), &seed.to_string()],
    )
    .trim()
    .to_string()
}

/// The secondaries' storage is full (files on a tmpfs with no space
/// left): the secondary's write into a hole fails with ENOSPC while the
/// pairs are duplex. Each pair suspends with `secondary I/O error` (time
/// shown) and is `not current`; the host's write is answered per the
/// critical-mode table: not critical and `--critical` with a live link, it
/// succeeds on the primary and its track is recorded; `--critical` on a
/// critical heavy LSS, it fails with EIO and the primary is
/// write-inhibited. Once the storage has room again a resync copies the
/// recorded tracks and each pair's volumes are equal.
#[test]
fn a_secondary_write_that_fails_suspends_the_pair_per_the_critical_mode() {
    let dir = tempdir("pprc-secondary-enospc");
    let fs = ScratchMount::mount("tmpfs", "size=8m", &dir.path().join("fs"));
    let s = Sites::start("pprc-secondary-enospc", |cfg| {
        cfg.lss_extra = vec![(0x11, "critical_heavy = true".into())];
        if cfg.serial == "TSTB2" {
            cfg.volumes[0].path = Some(fs.dir.join("plain.img"));
            cfg.volumes[1].path = Some(fs.dir.join("critical.img"));
            cfg.volumes[2].path = Some(fs.dir.join("heavy.img"));
        }
    });
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    path(a, "0x11", "TSTB2", "0x11", "1");
    let pairs = [
        (a.vol(0x10, 0), b.vol(0x10, 0), false),
        (a.vol(0x10, 1), b.vol(0x10, 1), true),
        (a.vol(0x11, 0), b.vol(0x11, 0), true),
    ];
    for (v, sv, critical) in &pairs {
        let mut args = vec!["pprc", "establish", v.as_str(), sv.as_str()];
        if *critical {
            args.push("--critical");
        }
        essctl(a, &args).ok();
        wait_duplex(a, v);
        wait_current(a, v);
    }
    fs.fill("filler");
    let expected = ["ok", "ok", "EIO"];
    for ((v, _, _), want) in pairs.iter().zip(expected) {
        assert_eq!(try_write_at(a, v, 7 * TRACK, 3), want, "{v}");
        let p = show(a, v);
        assert_eq!(
            (
                p["state"].as_str(),
                p["reason"].as_str(),
                p["replication_status"].as_str(),
                p["write_inhibited"].as_bool(),
            ),
            (
                Some("suspended"),
                Some("secondary I/O error"),
                Some("not current"),
                Some(want == "EIO"),
            ),
            "{v}: {p}"
        );
        assert!(p["since"].as_str().is_some_and(|t| t.ends_with('Z')), "{p}");
        assert!(
            p["detail"].as_str().unwrap_or("").contains("ENOSPC"),
            "the detail names the secondary's error: {p}"
        );
        assert_eq!(p["out_of_sync_tracks"].as_u64(), Some(1), "{v}: {p}");
    }
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    for (v, sv, _) in &pairs {
        essctl(a, &["pprc", "resume", v]).ok();
        wait_duplex(a, v);
        assert_eq!(show(a, v)["write_inhibited"], false);
        assert_eq!(volume_sha(a, v), volume_sha(b, sv), "{v}");
    }
    drop(s);
    drop(fs);
}

/// The primary's storage is full (its file on a tmpfs with no space
/// left) while the secondary's is not: the write, sent to both in
/// parallel, lands on the secondary only. The host gets the primary's
/// ENOSPC, and the pair must not stay `duplex, current` with different
/// volumes: it suspends (`primary I/O error`) with the track recorded;
/// once the primary has room again a resync makes the volumes equal.
#[test]
fn a_primary_write_that_fails_suspends_the_pair_with_the_track_recorded() {
    let dir = tempdir("pprc-primary-enospc");
    let fs = ScratchMount::mount("tmpfs", "size=8m", &dir.path().join("fs"));
    let s = Sites::start("pprc-primary-enospc", |cfg| {
        if cfg.serial == "TSTA1" {
            cfg.volumes[0].path = Some(fs.dir.join("primary.img"));
        }
    });
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    essctl(a, &["pprc", "establish", &v, &sv]).ok();
    wait_duplex(a, &v);
    wait_current(a, &v);
    fs.fill("filler");
    assert_eq!(try_write_at(a, &v, 9 * TRACK, 4), "ENOSPC");
    let p = show(a, &v);
    assert_suspended_for(&p, "primary I/O error", "");
    assert_eq!(p["out_of_sync_tracks"].as_u64(), Some(1), "{p}");
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
    drop(s);
    drop(fs);
}

/// [`TRY_WRITE_AT`], in the background.
fn spawn_try_write_at(essd: &Essd, export: &str, offset: u64, seed: u64) -> std::process::Child {
    spawn_script_at(TRY_WRITE_AT, essd, export, offset, seed)
}

/// A write to a duplex pair of a consistency group fails on the primary's
/// own storage (its file on a full tmpfs): like a failure to update the
/// secondary, the group holds writes. A later (possibly dependent) write
/// to another pair of the group does not complete before the freeze, so
/// its secondary never holds it while the failed write's track is
/// missing from the first pair's. The freeze suspends both pairs (reason
/// `freeze`); the failed write gets its error, its track stays recorded,
/// and the held write goes on to its primary alone.
#[test]
fn a_primary_write_that_fails_in_a_consistency_group_holds_the_group() {
    let dir = tempdir("pprc-group-primary-enospc");
    let fs = ScratchMount::mount("tmpfs", "size=8m", &dir.path().join("fs"));
    let lss = "consistency_group = true\nconsistency_timeout = \"60s\"";
    let s = Sites::start("pprc-group-primary-enospc", |cfg| {
        cfg.lss_extra = vec![(0x10, lss.into()), (0x11, lss.into())];
        if cfg.serial == "TSTA1" {
            cfg.volumes[0].path = Some(fs.dir.join("primary.img"));
        }
    });
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    path(a, "0x11", "TSTB2", "0x11", "1");
    let (x, sx) = (a.vol(0x10, 0), b.vol(0x10, 0));
    let (y, sy) = (a.vol(0x11, 0), b.vol(0x11, 0));
    for (v, sv) in [(&x, &sx), (&y, &sy)] {
        essctl(a, &["pprc", "establish", v, sv, "--mode", "nocopy"]).ok();
        wait_duplex(a, v);
    }
    fs.fill("filler");
    let mut wx = spawn_try_write_at(a, &x, 9 * TRACK, 4);
    // Until X's write is answered or the group holds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while wx.try_wait().unwrap().is_none()
        && essctl_json(a, &["pprc", "group"])["group"]["state"] != "holding"
    {
        assert!(
            Instant::now() < deadline,
            "X's write neither failed nor held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut wy = spawn_write(a, &y, TRACK, 0xB7);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        wy.try_wait().unwrap(),
        None,
        "Y's write completed before the freeze after X's write failed on the primary: \
         group {}, X {}",
        essctl_json(a, &["pprc", "group"]),
        show(a, &x)
    );
    let g = essctl_json(a, &["pprc", "group"]);
    assert_eq!(
        (g["group"]["state"].as_str(), g["group"]["volume"].as_str()),
        (Some("holding"), Some(x.as_str())),
        "{g}"
    );
    assert_eq!(
        wx.try_wait().unwrap(),
        None,
        "X's failed write was answered"
    );
    freeze_suspends(a, 2);
    let out = wx.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ENOSPC");
    assert_eq!(
        wait_child(&mut wy, 10),
        Some(true),
        "Y's write after the freeze"
    );
    for v in [&x, &y] {
        let p = show(a, v);
        assert_eq!(
            (p["state"].as_str(), p["reason"].as_str()),
            (Some("suspended"), Some("freeze")),
            "{v}: {p}"
        );
        assert!(p["out_of_sync_tracks"].as_u64() >= Some(1), "{v}: {p}");
    }
    assert_eq!(block_at(a, &y, TRACK), vec![0xB7; 4096]);
    assert_ne!(
        block_at(b, &sy, TRACK),
        vec![0xB7; 4096],
        "Y's secondary holds the write made after X's failed"
    );
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    for (v, sv) in [(&x, &sx), (&y, &sy)] {
        essctl(a, &["pprc", "resume", v]).ok();
        wait_duplex(a, v);
        assert_eq!(volume_sha(a, v), volume_sha(b, sv), "{v}");
    }
    drop(s);
    drop(fs);
}

/// The primary's state directory for pairs (`STATE_DIR/pprc`, on a tmpfs)
/// is full, and the out-of-sync bitmap's bits are still a hole in its
/// file (a pair established without copy has not written them): a host
/// write whose track cannot be recorded fails with EIO and is made on
/// neither volume; the pair suspends (`primary I/O error`). Once the file
/// system has room again the primary takes writes and a resync leaves the
/// volumes equal.
#[test]
fn a_write_whose_track_cannot_be_recorded_on_a_full_file_system_fails() {
    let s = Sites::start("pprc-bitmap-enospc", |_| {});
    let (a, b) = (&s.a, &s.b);
    let fs = ScratchMount::mount("tmpfs", "size=1m", &s.dir_a.path().join("state/pprc"));
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    essctl(a, &["pprc", "establish", &v, &sv, "--mode", "nocopy"]).ok();
    let before = volume_sha(a, &v);
    fs.fill("filler");
    assert_eq!(try_write_at(a, &v, 11 * TRACK, 5), "EIO");
    let p = show(a, &v);
    assert_suspended_for(&p, "primary I/O error", "");
    assert!(
        p["detail"].as_str().unwrap_or("").contains(".oos"),
        "the detail names the bitmap file: {p}"
    );
    assert_eq!(volume_sha(a, &v), before, "the write landed on the primary");
    assert_eq!(
        volume_sha(b, &sv),
        before,
        "the write landed on the secondary"
    );
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    assert_eq!(try_write_at(a, &v, 11 * TRACK, 5), "ok");
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
    // Unmounted first (also when the test fails: declared last).
    drop(fs);
    drop(s);
}

/// An establish whose out-of-sync bitmap cannot be written on the primary
/// (its state directory full) fails with the reason, and the side it had
/// made on the secondary is ended: that volume is in no pair and hosts may
/// write it again.
#[test]
fn an_establish_that_cannot_write_its_bitmap_leaves_no_secondary_behind() {
    let s = Sites::start("pprc-establish-enospc", |_| {});
    let (a, b) = (&s.a, &s.b);
    let fs = ScratchMount::mount("tmpfs", "size=1m", &s.dir_a.path().join("state/pprc"));
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    fs.fill("filler");
    let refused = essctl(a, &["pprc", "establish", &v, &sv, "--mode", "copy"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains(".oos") && refused.stderr.contains("No space left"),
        "{refused:?}"
    );
    assert_eq!(try_write(b, &sv), "writable ok");
    let list = essctl_json(b, &["pprc", "list"]);
    assert_eq!(list["pairs"].as_array().map(Vec::len), Some(0), "{list}");
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "establish", &v, &sv, "--mode", "copy"]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
    // Unmounted first (also when the test fails: declared last).
    drop(fs);
    drop(s);
}

/// The other side: a secondary whose record of the pairs cannot be
/// written refuses to become the secondary, and its volume is in no pair
/// and writable; once the record can be written, the establish succeeds.
#[test]
fn a_secondary_that_cannot_record_the_pair_refuses_it_and_stays_writable() {
    let s = Sites::start("pprc-establish-unrecorded", |_| {});
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    let blocker = block_pair_records(s.dir_b.path());
    let refused = essctl(a, &["pprc", "establish", &v, &sv, "--mode", "copy"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("TSTB2 refused"), "{refused:?}");
    assert_eq!(try_write(b, &sv), "writable ok");
    let list = essctl_json(b, &["pprc", "list"]);
    assert_eq!(list["pairs"].as_array().map(Vec::len), Some(0), "{list}");
    std::fs::remove_dir(&blocker).unwrap();
    essctl(a, &["pprc", "establish", &v, &sv, "--mode", "copy"]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
}

/// A raw-disk secondary whose storage fails at write-back (a loop device
/// over a sparse file on a full tmpfs): the mirrored write lands in its
/// page cache, and the host's FLUSH fails there. The pair (not critical)
/// suspends with `secondary I/O error` and is `not current`; the FLUSH
/// succeeds, as the write is durable on the primary, and its track stays
/// recorded: once the storage has room again a resync leaves the volumes
/// equal.
#[test]
fn a_flush_that_fails_on_the_secondary_suspends_the_pair() {
    let (setup, v, sv) =
        pair_on_loop_device("pprc-secondary-flush-fails", "tmpfs", "size=8m", "TSTB2");
    let (a, b) = (&setup.sites.a, &setup.sites.b);
    let fs = &setup.fs;
    wait_current(a, &v);
    fs.fill("filler");
    let answer = python(
        WRITE_THEN_FLUSH,
        &[&a.uri(&v), &(5 * TRACK).to_string(), "8"],
    );
    assert_eq!(answer.trim(), "ok");
    let p = show(a, &v);
    assert_suspended_for(&p, "secondary I/O error", "");
    assert!(p["out_of_sync_tracks"].as_u64() >= Some(1), "{p}");
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
}

/// Writes 64 KiB of random data (seed `argv[3]`) at `argv[2]`, without
/// FUA and without a FLUSH; prints `ok`.
const WRITE_ONLY: &str = r#"
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(random.Random(int(sys.argv[3])).randbytes(65536), int(sys.argv[2]))
h.shutdown()
print("ok")
"#;

/// Sends one FLUSH; prints `ok` or its errno name.
const FLUSH_ONLY: &str = r#"
import nbd, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.flush()
    print("ok")
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.string))
h.shutdown()
"#;

/// A raw-disk secondary whose storage fails at write-back, and a host
/// that reads the secondary (hosts may, and may send FLUSH): a mirrored
/// write lands in the secondary's page cache, and the reader's FLUSH is
/// the one that learns its write-back failed (the kernel reports a failed
/// write-back to one sync of the file only). The primary must still learn
/// it at its next FLUSH: the pair suspends (`secondary I/O error`) with
/// the track recorded, instead of staying `duplex, current` while the
/// secondary's disk lacks the write. Once the storage has room a resync
/// leaves the volumes equal, also after the secondary's cache is dropped.
#[test]
fn a_failed_write_back_that_a_reader_of_the_secondary_flushed_still_suspends_the_pair() {
    let (setup, v, sv) =
        pair_on_loop_device("pprc-secondary-reader-flush", "tmpfs", "size=8m", "TSTB2");
    let (a, b) = (&setup.sites.a, &setup.sites.b);
    let (dev, fs) = (&setup.dev, &setup.fs);
    wait_current(a, &v);
    fs.fill("filler");
    let written = python(WRITE_ONLY, &[&a.uri(&v), &(5 * TRACK).to_string(), "10"]);
    assert_eq!(written.trim(), "ok");
    let reader = python(FLUSH_ONLY, &[&b.uri(&sv)]);
    assert_ne!(
        reader.trim(),
        "ok",
        "the reader's flush must fail on the full storage"
    );
    // Durable on the primary: the host's FLUSH succeeds.
    assert_eq!(python(FLUSH_ONLY, &[&a.uri(&v)]).trim(), "ok");
    let p = show(a, &v);
    assert_suspended_for(
        &p,
        "secondary I/O error",
        &format!(
            "after a failed write-back on the secondary that a reader's FLUSH learnt ({})",
            reader.trim()
        ),
    );
    assert!(p["out_of_sync_tracks"].as_u64() >= Some(1), "{p}");
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    // What the secondary's disk holds, not its page cache.
    run(std::process::Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&dev.dev));
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
}

/// A raw-disk secondary of a pair in a consistency group whose storage
/// fails at write-back: the host's FLUSH fails there, and the group holds
/// writes until the freeze, so the pair is not suspended yet and its
/// secondary not told. Meanwhile a host reading the secondary (as a
/// FlashCopy taken there reads it) gets what the secondary's disk holds,
/// not the cached pages whose write-back failed. After the freeze and a
/// resync once the storage has room the volumes are equal on disk.
#[test]
fn a_secondary_whose_flush_failed_reads_what_its_disk_holds() {
    let (setup, v, sv) = pair_on_loop_device_tuned(
        "pprc-secondary-flush-cache",
        "tmpfs",
        "size=8m",
        "TSTB2",
        |cfg| {
            cfg.lss_extra = vec![(
                0x10,
                "consistency_group = true\nconsistency_timeout = \"60s\"".into(),
            )]
        },
    );
    let (a, b) = (&setup.sites.a, &setup.sites.b);
    let (dev, fs) = (&setup.dev, &setup.fs);
    wait_current(a, &v);
    fs.fill("filler");
    let mut host = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(WRITE_THEN_FLUSH)
        .args([a.uri(&v), (5 * TRACK).to_string(), "12".to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_group(a, "holding");
    let on_disk = {
        use std::os::unix::fs::FileExt;
        let mut block = vec![0u8; 4096];
        let backing = std::fs::File::open(fs.dir.join("volume.img")).unwrap();
        backing.read_exact_at(&mut block, 5 * TRACK).unwrap();
        block
    };
    assert!(
        on_disk.iter().all(|&b| b == 0),
        "the write reached the secondary's disk"
    );
    assert!(
        block_at(b, &sv, 5 * TRACK) == on_disk,
        "the secondary serves a block its disk does not hold"
    );
    freeze_suspends(a, 1);
    assert_eq!(wait_child(&mut host, 10), Some(true), "the held FLUSH");
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    run(std::process::Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&dev.dev));
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
}

/// Writes 64 KiB of random data (seed `argv[3]`) at `argv[2]` with FUA;
/// prints `ok` or the errno name.
const WRITE_FUA: &str = r#"
import nbd, random, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(random.Random(int(sys.argv[3])).randbytes(65536), int(sys.argv[2]), nbd.CMD_FLAG_FUA)
    print("ok")
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.string))
h.shutdown()
"#;

/// A FUA write to a raw-disk primary whose storage fails at write-back (a
/// loop device over a sparse file on a full tmpfs): the data reaches the
/// device's page cache and the secondary, its write-back fails. The host
/// gets the error, the pair suspends (`primary I/O error`), and a resync
/// once the storage has room leaves the volumes equal — also after the
/// primary's page cache is dropped (the failed page is not kept cached as
/// data its disk does not hold).
#[test]
fn a_fua_write_that_fails_on_the_primary_leaves_the_resynced_volumes_equal() {
    let (setup, v, sv) = pair_on_loop_device("pprc-primary-fua-fails", "tmpfs", "size=8m", "TSTA1");
    let (a, b) = (&setup.sites.a, &setup.sites.b);
    let (dev, fs) = (&setup.dev, &setup.fs);
    wait_current(a, &v);
    fs.fill("filler");
    let answer = python(WRITE_FUA, &[&a.uri(&v), &(6 * TRACK).to_string(), "9"]);
    assert_ne!(answer.trim(), "ok");
    let p = show(a, &v);
    assert_eq!(
        (p["state"].as_str(), p["reason"].as_str()),
        (Some("suspended"), Some("primary I/O error")),
        "after a failed FUA write ({}): {p}",
        answer.trim()
    );
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
    // What the primary's disk holds, not its page cache.
    run(std::process::Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&dev.dev));
    assert_eq!(
        volume_sha(a, &v),
        volume_sha(b, &sv),
        "after dropping the cache"
    );
}

/// [`a_flush_that_fails_on_the_primary_suspends_the_pair`] with the pair
/// already suspended by an operator: the write is recorded, its FLUSH
/// fails on the primary's storage, and the resync once the storage has
/// room copies what the primary's disk holds, so the volumes stay equal
/// after the primary's page cache is dropped.
#[test]
fn a_flush_that_fails_on_a_suspended_primary_leaves_the_resynced_volumes_equal() {
    let (setup, v, sv) =
        pair_on_loop_device("pprc-suspended-flush-fails", "tmpfs", "size=8m", "TSTA1");
    let (a, b) = (&setup.sites.a, &setup.sites.b);
    let (dev, fs) = (&setup.dev, &setup.fs);
    essctl(a, &["pprc", "suspend", &v]).ok();
    fs.fill("filler");
    let answer = python(
        WRITE_THEN_FLUSH,
        &[&a.uri(&v), &(5 * TRACK).to_string(), "7"],
    );
    assert_ne!(
        answer.trim(),
        "ok",
        "the flush must fail on the full storage"
    );
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    run(std::process::Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&dev.dev));
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
}

/// The state of `volume`'s pair in `essd`'s record of its pairs
/// (`STATE_DIR/pprc/pairs.json`), as the file says now.
fn recorded_state(essd_dir: &Path, volume: &str) -> String {
    let text = std::fs::read_to_string(essd_dir.join("state/pprc/pairs.json")).unwrap();
    let records: serde_json::Value = serde_json::from_str(&text).unwrap();
    let record = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["spec"]["volume"] == volume)
        .unwrap_or_else(|| panic!("{volume} is not in the record: {text}"));
    record["status"]["state"].as_str().unwrap().to_string()
}

/// The primary's record of its pairs cannot be written (its file system,
/// `STATE_DIR/pprc` on a tmpfs, is full) when a pair suspends after its
/// link was lost: the host's write is taken (its track's bits were
/// written before, so recording it needs no room), the log says the
/// record failed, and the record still says `duplex`. Once the file
/// system has room again, the record is written within seconds with no
/// other change, so a crash then finds the pair suspended: the pair comes
/// back `link lost` after a `kill -9`, and does not resynchronise by
/// itself.
#[test]
fn a_record_of_the_pairs_that_failed_is_written_once_there_is_room() {
    let mut s = Sites::start("pprc-record-enospc", |_| {});
    let fs = ScratchMount::mount("tmpfs", "size=1m", &s.dir_a.path().join("state/pprc"));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    essctl(&s.a, &["pprc", "establish", &v, &sv, "--mode", "nocopy"]).ok();
    assert_eq!(try_write_at(&s.a, &v, 11 * TRACK, 5), "ok");
    fs.fill("filler");
    s.proxy.drop_all();
    assert_eq!(try_write_at(&s.a, &v, 11 * TRACK, 6), "ok");
    assert_suspended_for(&show(&s.a, &v), "link lost", "");
    wait_until("the failed record is logged", || {
        s.a.log().contains("cannot record PPRC pairs")
    });
    let dir_a = s.dir_a.path().to_path_buf();
    assert_eq!(recorded_state(&dir_a, &v), "duplex");
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    wait_until("the record is written again once there is room", || {
        recorded_state(&dir_a, &v) == "suspended"
    });
    assert!(
        s.a.log().contains("PPRC pairs recorded again"),
        "{}",
        s.a.log()
    );
    s.proxy.heal();
    s.a.kill_and_restart("TSTA1");
    std::thread::sleep(Duration::from_secs(2));
    assert_suspended_for(&show(&s.a, &v), "link lost", "");
    essctl(&s.a, &["pprc", "resume", &v]).ok();
    wait_duplex(&s.a, &v);
    assert_eq!(volume_sha(&s.a, &v), volume_sha(&s.b, &sv));
    // Unmounted first (also when the test fails: declared last).
    drop(s);
    drop(fs);
}

/// Writes 64 KiB of random data (seed `argv[3]`) at `argv[2]` without
/// FUA, prints `written`, waits for a line on stdin, then flushes and
/// prints `ok` or the flush's errno name.
const WRITE_WAIT_FLUSH: &str = r#"
import nbd, random, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(random.Random(int(sys.argv[3])).randbytes(65536), int(sys.argv[2]))
print("written", flush=True)
sys.stdin.readline()
try:
    h.flush()
    print("ok", flush=True)
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.string), flush=True)
h.shutdown()
"#;

/// The primary's storage fails at write-back, and the kernel reports it to
/// the first sync of the device that comes, here a FlashCopy's T0 flush
/// (the establish fails). The host that wrote must still learn of it: its
/// FLUSH fails too (it succeeded, the failure having been reported
/// already, while the device lacked the write), and the pair suspends
/// (`primary I/O error`) with the track recorded instead of the cleaner
/// clearing it as durable; once the storage has room a resync leaves both
/// volumes equal.
#[test]
fn a_failed_write_back_reported_to_another_flush_still_fails_the_hosts_flush() {
    let (setup, v, sv) =
        pair_on_loop_device("pprc-primary-flush-stolen", "tmpfs", "size=8m", "TSTA1");
    let (a, b) = (&setup.sites.a, &setup.sites.b);
    wait_current(a, &v);
    setup.fs.fill("filler");
    let mut host = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(WRITE_WAIT_FLUSH)
        .args([a.uri(&v), (5 * TRACK).to_string(), "11".into()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(host.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "written\n");
    // Within the cleaner's interval after the write, which leaves a
    // volume written in the last pass unflushed. On a slow machine the
    // cleaner's flush may come first and take the report itself (and
    // suspend the pair): the host must learn of it all the same.
    let target = a.vol(0x11, 0);
    let fc = essctl(
        a,
        &[
            "flashcopy",
            "establish",
            &format!("{v}:{target}"),
            "--nocopy",
        ],
    );
    if fc.code == 0 {
        assert_suspended_for(&show(a, &v), "primary I/O error", "the cleaner came first");
    } else {
        assert!(
            fc.stderr.contains(&format!("flushing source {v} at T0")),
            "the T0 flush must fail: {fc:?}"
        );
    }
    std::io::Write::write_all(host.stdin.as_mut().unwrap(), b"\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(host.wait().unwrap().success());
    assert_eq!(line.trim(), "EIO", "the host's flush");
    let p = show(a, &v);
    assert_suspended_for(&p, "primary I/O error", "after the host's flush");
    assert!(p["out_of_sync_tracks"].as_u64() >= Some(1), "{p}");
    std::fs::remove_file(setup.fs.dir.join("filler")).unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
}

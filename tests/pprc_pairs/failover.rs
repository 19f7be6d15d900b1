//! Failover at the secondary, failback of only the changed tracks and the
//! switch-back, and the refusals around them.

use super::*;

/// An NBD connection opened now that writes when told to, checking
/// nothing on the client's side (libnbd's strict mode off), so the
/// server's answer is what counts.
struct HeldConnection(std::process::Child);

const HELD_WRITE: &str = r#"
import errno, nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
print("read-only" if h.is_read_only() else "writable", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b"x" * 4096, 0)
    print("ok")
except nbd.Error as e:
    print(errno.errorcode.get(e.errnum, e.string))
"#;

impl HeldConnection {
    /// Connects to `export`, which must be read-only now.
    fn open(essd: &Essd, export: &str) -> HeldConnection {
        use std::io::BufRead;
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(HELD_WRITE)
            .arg(essd.uri(export))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "read-only");
        HeldConnection(child)
    }

    /// Sends one 4 KiB write at offset 0: `ok` or the error's name.
    fn write(self) -> String {
        use std::io::Write;
        let mut child = self.0;
        writeln!(child.stdin.take().unwrap()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

#[test]
fn failover_failback_and_switch_back_copy_only_changed_tracks() {
    let s = Sites::start("pprc-failover", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    fill(a, &va, s.dir_a.path(), 8, 11);
    path(a, "0x10", "TSTB2", "0x10", "2");
    essctl(a, &["pprc", "establish", &va, &vb]).ok();
    wait_duplex(a, &va);
    write_tracks(a, &va, 12, 20);
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));

    // The primary site loses its links and goes on writing: 5 tracks
    // changed on A are never mirrored.
    s.proxy.drop_all();
    write_tracks(a, &va, 13, 5);
    let lost = show(a, &va);
    assert_eq!(lost["reason"], "link lost");
    // Only tracks written since the pair became duplex may be marked (the
    // 20 mirrored ones are in sync, but their marks may not be cleared
    // yet): never the tracks of the initial copy.
    let marked = lost["out_of_sync_tracks"].as_u64().unwrap();
    assert!((5..=25).contains(&marked), "{marked} tracks out of sync");

    // Failover at B without contacting A: B becomes a suspended primary
    // and hosts write it (a connection told the export was read-only
    // reconnects first).
    let told_read_only = HeldConnection::open(b, &vb);
    let v = essctl_json(b, &["pprc", "failover", &vb]);
    assert_eq!(
        (v["role"].as_str(), v["state"].as_str()),
        (Some("primary"), Some("suspended"))
    );
    assert_eq!(v["reason"], "failover");
    assert_eq!(told_read_only.write(), "EPERM");
    assert_eq!(try_write(b, &vb), "writable ok");
    write_tracks(b, &vb, 14, 7);
    let changed_on_b = show(b, &vb)["out_of_sync_tracks"].as_u64().unwrap();
    assert!((7..=8).contains(&changed_on_b), "{changed_on_b}");

    // Failback B → A: A becomes the secondary and hands over its 5
    // tracks; only the union crosses the link.
    s.proxy.heal();
    path(b, "0x10", "TSTA1", "0x10", "1");
    s.back.reset_counters();
    essctl(b, &["pprc", "failback", &vb]).ok();
    wait_duplex(b, &vb);
    let sent = s.back.bytes_forward();
    let union = changed_on_b + 5;
    assert!(
        sent <= union * TRACK + (64 << 10) && sent >= union * 4096,
        "failback sent {sent} bytes for at most {union} tracks"
    );
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
    let side = show(a, &va);
    assert_eq!(
        (side["role"].as_str(), side["peer"].as_str()),
        (Some("secondary"), Some("TSTB2"))
    );
    assert_eq!(try_write(a, &va), "read-only EPERM");

    // Switch back: failover at A, failback at A; B is the secondary again.
    write_tracks(b, &vb, 15, 3);
    essctl(a, &["pprc", "failover", &va]).ok();
    path(a, "0x10", "TSTB2", "0x10", "2");
    s.proxy.reset_counters();
    essctl(a, &["pprc", "failback", &va]).ok();
    wait_duplex(a, &va);
    assert!(
        s.proxy.bytes_forward() < 16 * TRACK,
        "switch-back sent {} bytes",
        s.proxy.bytes_forward()
    );
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
    assert_eq!(show(b, &vb)["role"], "secondary");
    write_tracks(a, &va, 16, 10);
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
}

/// A failback interrupted after the old primary became the secondary
/// (keeping its unmirrored tracks as the hand-over bitmap) and before the
/// new primary fetched them: a failover at the old primary keeps those
/// tracks marked, and its later failback leaves both volumes equal.
#[test]
fn a_failover_keeps_the_handed_over_tracks() {
    let mut s = Sites::start("pprc-handover-failover", |cfg| with_timeout(cfg, "10s"));
    let (va, vb) = duplex_nocopy_pair(&s);
    write_tracks(&s.a, &va, 12, 4);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
    // A loses its links and writes on: 5 tracks never mirrored.
    s.proxy.drop_all();
    write_tracks(&s.a, &va, 13, 5);
    assert_eq!(show(&s.a, &va)["reason"], "link lost");
    // Failover at B; hosts write B.
    essctl(&s.b, &["pprc", "failover", &vb]).ok();
    write_tracks(&s.b, &vb, 14, 7);
    s.proxy.heal();
    path(&s.b, "0x10", "TSTA1", "0x10", "1");
    // Failback at B over a slow link; B dies once A took the secondary role.
    s.back.delay(Duration::from_millis(1500));
    let mut failback = spawn_essctl(&s.b, &["pprc", "failback", &vb]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while show(&s.a, &va)["role"] != "secondary" {
        assert!(Instant::now() < deadline, "A never became the secondary");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.b.crash();
    let _ = failback.wait();
    s.back.heal();
    let handover = s.dir_a.path().join(format!("state/pprc/{va}.handover"));
    assert!(handover.exists());
    // Production back to A, then B returns and A fails back to it.
    essctl(&s.a, &["pprc", "failover", &va]).ok();
    assert!(
        !handover.exists(),
        "the hand-over bitmap outlived the failover"
    );
    write_tracks(&s.a, &va, 15, 3);
    s.b.kill_and_restart("TSTB2");
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "failback", &va]).ok();
    wait_duplex(&s.a, &va);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// A failback that stops after the old primary became the secondary and
/// before the copy started (every link reset while the answers are on
/// their way) leaves the pair suspended at the volume that took over, and
/// the old primary's side says so too — suspended (failover), not a copy
/// in progress that nothing runs — however long one waits. The failback
/// issued again copies the union of both sides' tracks; once the pair is
/// duplex the old primary's hand-over bitmap is gone and the volumes are
/// equal.
#[test]
fn a_failback_that_stops_short_leaves_both_sides_suspended() {
    let s = Sites::start("pprc-failback-short", |cfg| with_timeout(cfg, "10s"));
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = duplex_nocopy_pair(&s);
    // A loses its links and writes on: 5 tracks never mirrored.
    s.proxy.drop_all();
    let mut union: BTreeSet<u64> = write_tracks(a, &va, 13, 5).into_iter().collect();
    essctl(b, &["pprc", "failover", &vb]).ok();
    union.extend(write_tracks(b, &vb, 20, 7));
    s.proxy.heal();
    path(b, "0x10", "TSTA1", "0x10", "1");
    // Failback at B over a slow link, cut once A took the secondary role.
    s.back.delay(Duration::from_millis(1500));
    let mut failback = spawn_essctl(b, &["pprc", "failback", &vb]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while show(a, &va)["role"] != "secondary" {
        assert!(Instant::now() < deadline, "A never became the secondary");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.back.reset();
    assert_eq!(
        wait_child(&mut failback, 30),
        Some(false),
        "the failback whose links were reset"
    );
    s.back.heal();
    let handover = s.dir_a.path().join(format!("state/pprc/{va}.handover"));
    assert!(handover.exists());
    // Both sides say the same, and keep saying it.
    std::thread::sleep(RETELL_INTERVAL * 3);
    let p = show(b, &vb);
    assert_eq!(
        (
            p["role"].as_str(),
            p["state"].as_str(),
            p["reason"].as_str()
        ),
        (Some("primary"), Some("suspended"), Some("failover")),
        "{p}"
    );
    let side = show(a, &va);
    assert_eq!(
        (
            side["role"].as_str(),
            side["state"].as_str(),
            side["reason"].as_str(),
            side["replication_status"].as_str()
        ),
        (
            Some("secondary"),
            Some("suspended"),
            Some("failover"),
            Some("not current")
        ),
        "the old primary's side after a failback that did not start its copy: {side}"
    );
    assert_eq!(try_write(a, &va), "read-only EPERM");
    // Issued again, the failback copies the union of B's 7 tracks and
    // A's 5 (a track more if the failover caught one in flight).
    path(b, "0x10", "TSTA1", "0x10", "1");
    s.back.reset_counters();
    essctl(b, &["pprc", "failback", &vb]).ok();
    wait_duplex(b, &vb);
    wait_state(a, &va, "duplex");
    assert!(
        !handover.exists(),
        "the hand-over bitmap outlived the copy that has its tracks"
    );
    // B's 7 blocks of data at least (A's tracks are holes on B: their
    // copy sends no data).
    let sent = s.back.bytes_forward();
    let n = union.len() as u64;
    assert!(
        (7 * 4096..=(n + 1) * TRACK + (64 << 10)).contains(&sent),
        "the failback sent {sent} bytes for the {n} tracks {union:?}"
    );
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
}

/// A failback makes the old primary the secondary of the volume that took
/// over; an old primary smaller than that volume is refused, as a
/// secondary smaller than its primary is at establish, and stays as it was.
#[test]
fn a_failback_to_a_smaller_old_primary_is_refused() {
    let s = Sites::start("pprc-failback-size", |cfg| {
        if cfg.serial == "TSTA1" {
            cfg.volumes[1] = Vol::new(0x10, 1, "32MiB");
        }
    });
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 1), b.vol(0x10, 1));
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    essctl(b, &["pprc", "failover", &vb]).ok();
    path(b, "0x10", "TSTA1", "0x10", "1");
    let failback = essctl(b, &["pprc", "failback", &vb]);
    assert_eq!(failback.code, 1, "{failback:?}");
    assert!(
        failback.stderr.contains(&format!(
            "secondary {va} (33554432 bytes) is smaller than primary {vb}"
        )),
        "{failback:?}"
    );
    assert_eq!(show(a, &va)["role"], "primary");
    assert_eq!(try_write(a, &va), "writable ok");
}

/// An old primary whose server counts tracks of another size cannot
/// hand its out-of-sync tracks over: the failback is refused before the
/// old primary changes (it used to become the secondary first, and every
/// failback then failed on the bitmap).
#[test]
fn a_failback_to_a_server_of_another_track_size_is_refused() {
    let s = Sites::start("pprc-failback-tracks", |cfg| {
        if cfg.serial == "TSTA1" {
            cfg.server_extra.push_str("track_size = \"128KiB\"\n");
        }
    });
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_sides_agree(a, &va, b, &vb, "established");
    essctl(b, &["pprc", "failover", &vb]).ok();
    path(b, "0x10", "TSTA1", "0x10", "1");
    essctl(b, &["pprc", "failback", &vb]).refused(
        "TSTA1 refused: the track size of TSTB2 (65536 bytes) differs from this server's \
         (131072 bytes): the out-of-sync tracks cannot be handed over",
    );
    let v = show(a, &va);
    assert_eq!(
        (&v["role"], &v["state"]),
        (&"primary".into(), &"duplex".into()),
        "{v}"
    );
    assert_eq!(show(b, &vb)["reason"], "failover");
}

/// A duplex pair A → B, failed over to B (which hosts write), and a
/// failback from B whose hand-over fails at A: a directory stands where A
/// keeps its bitmap for the hand-over. Returns the sites, both volumes and
/// that directory.
fn failed_hand_over(name: &str) -> (Sites, String, String, std::path::PathBuf) {
    let s = Sites::start(name, |_| {});
    let (va, vb) = duplex_nocopy_pair(&s);
    essctl(&s.b, &["pprc", "failover", &vb]).ok();
    write_tracks(&s.b, &vb, 61, 4);
    let blocker = s.dir_a.path().join(format!("state/pprc/{va}.handover"));
    std::fs::create_dir(&blocker).unwrap();
    path(&s.b, "0x10", "TSTA1", "0x10", "1");
    let failback = essctl(&s.b, &["pprc", "failback", &vb]);
    assert_eq!(failback.code, 1, "{failback:?}");
    assert!(
        failback
            .stderr
            .contains("cannot keep the out-of-sync bitmap"),
        "{failback:?}"
    );
    (s, va, vb, blocker)
}

/// A hand-over that fails at the old primary (see [`failed_hand_over`])
/// fails the failback and leaves the old primary's pair suspended for a
/// reason that allows no failback there: one would copy the old primary
/// over the volume that took over. A failback from the volume that took
/// over, run again once the state directory is fixed, completes with both
/// volumes equal.
#[test]
fn a_failed_hand_over_allows_no_failback_at_the_old_primary() {
    let (s, va, vb, blocker) = failed_hand_over("pprc-handover-fails");
    let (a, b) = (&s.a, &s.b);
    let v = show(a, &va);
    assert_eq!(
        (&v["role"], &v["state"], &v["reason"]),
        (
            &"primary".into(),
            &"suspended".into(),
            &"suspended at the secondary".into()
        ),
        "{v}"
    );
    let refused = essctl(a, &["pprc", "failback", &va]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("not taken over by a failover"),
        "{refused:?}"
    );
    std::fs::remove_dir(&blocker).unwrap();
    essctl(b, &["pprc", "failback", &vb]).ok();
    wait_duplex(b, &vb);
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
}

/// The old primary's terminate after a hand-over that failed makes its
/// volume writable again.
#[test]
fn a_terminate_after_a_failed_hand_over_makes_the_old_primary_writable() {
    let (s, va, _, _) = failed_hand_over("pprc-handover-terminate");
    assert_eq!(try_write(&s.a, &va), "read-only EPERM");
    essctl(&s.a, &["pprc", "terminate", &va]).ok();
    assert_eq!(try_write(&s.a, &va), "writable ok");
}

/// A failover whose record cannot be written changes nothing: the volume
/// stays a protected secondary. (It used to make the volume a writable
/// primary first and answer the error after: hosts wrote it, the restart
/// made it the secondary again from the old record, and the resumed pair
/// went duplex with those writes on the secondary only.)
#[test]
fn a_failover_that_cannot_be_recorded_leaves_the_secondary_protected() {
    let mut s = Sites::start("pprc-failover-unrecorded", |_| {});
    let (va, vb) = duplex_nocopy_pair(&s);
    essctl(&s.a, &["pprc", "suspend", &va]).ok();
    wait_state(&s.b, &vb, "suspended");
    // The record's temporary file cannot be created.
    let blocker = block_pair_records(s.dir_b.path());
    let failover = essctl(&s.b, &["pprc", "failover", &vb]);
    std::fs::remove_dir(&blocker).unwrap();
    assert_ne!(failover.code, 0, "{failover:?}");
    let answer = try_write(&s.b, &vb);
    assert_eq!(
        show(&s.b, &vb)["role"],
        "secondary",
        "failover answered {failover:?}"
    );
    s.b.kill_and_restart("TSTB2");
    assert_eq!(show(&s.b, &vb)["role"], "secondary", "after the restart");
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "resume", &va]).ok();
    wait_duplex(&s.a, &va);
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "duplex pair differs; a host write at B after the failed failover answered {answer:?}"
    );
}

/// The fan-out limit (a primary server mirrors to at most 4 peers) never
/// refuses a failover: a recovery site takes over a volume although it
/// mirrors to 4 other peers already, and then has pairs with 5. What
/// would mirror to a fifth at once is refused: the failback, until a pair
/// with one of the others is suspended; then a resume, or a new pair, with
/// that one.
#[test]
fn a_failover_beyond_four_peers_is_taken_but_mirrors_to_at_most_four() {
    let serials = ["TSTB1", "TSTB2", "TSTB3", "TSTB4", "TSTB5"];
    let ports: Vec<u16> = serials.iter().map(|_| free_port()).collect();
    let port_x = free_port();
    let mut keep = Vec::new();
    let mut peers = Vec::new();
    for (serial, port) in serials.iter().zip(&ports) {
        let dir = tempdir("pprc-fan-peer");
        let mut cfg = TestConfig::new("uring");
        cfg.serial = serial;
        cfg.volumes = vec![Vol::new(0x10, 0, "16MiB"), Vol::new(0x10, 1, "16MiB")];
        cfg.extra = format!(
            "\n[replication]\nlisten = \"127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\n\n\
             [[peer]]\nserial = \"TSTA1\"\naddress = \"127.0.0.1:{port_x}\"\n"
        );
        peers.push(Essd::start_in(dir.path(), &cfg));
        keep.push(dir);
    }
    let dir = tempdir("pprc-fan-failover");
    let mut cfg = TestConfig::new("uring");
    cfg.serial = "TSTA1";
    cfg.volumes = (0..6).map(|n| Vol::new(0x10, n, "16MiB")).collect();
    cfg.extra =
        format!("\n[replication]\nlisten = \"127.0.0.1:{port_x}\"\nsecret = \"{SECRET}\"\n");
    for (serial, port) in serials.iter().zip(&ports) {
        cfg.extra +=
            &format!("\n[[peer]]\nserial = \"{serial}\"\naddress = \"127.0.0.1:{port}\"\n");
    }
    let x = Essd::start_in(dir.path(), &cfg);
    for (n, serial) in serials[..4].iter().enumerate() {
        path(&x, "0x10", serial, "0x10", "1");
        let primary = x.vol(0x10, n as u8);
        let secondary = format!("000{serial}");
        essctl(
            &x,
            &[
                "pprc",
                "establish",
                &primary,
                &secondary,
                "--mode",
                "nocopy",
            ],
        )
        .ok();
    }
    // TSTB5 mirrors its volume to X.
    let b5 = &peers[4];
    let (taken, old) = (x.vol(0x10, 4), b5.vol(0x10, 0));
    path(b5, "0x10", "TSTA1", "0x10", "1");
    essctl(b5, &["pprc", "establish", &old, &taken, "--mode", "nocopy"]).ok();
    assert_eq!(show(&x, &taken)["role"], "secondary");

    // X takes over: a failover is never refused.
    let v = essctl_json(&x, &["pprc", "failover", &taken]);
    assert_eq!(
        (
            v["role"].as_str(),
            v["state"].as_str(),
            v["reason"].as_str()
        ),
        (Some("primary"), Some("suspended"), Some("failover")),
        "{v}"
    );
    assert_eq!(try_write(&x, &taken), "writable ok");

    // Failing back would mirror to a fifth peer while the 4 others are
    // duplex.
    path(&x, "0x10", "TSTB5", "0x10", "1");
    let limit = |peers: &str| {
        format!(
            "this server is mirroring to 4 peers ({peers}); a primary server mirrors to at most \
             4 at once: suspend or terminate its pairs with one of them first"
        )
    };
    essctl(&x, &["pprc", "failback", &taken]).refused(&limit("TSTB1, TSTB2, TSTB3, TSTB4"));
    let v = show(&x, &taken);
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("suspended"), Some("failover")),
        "{v}"
    );
    assert_eq!(show(b5, &old)["role"], "primary");

    // With the pair to TSTB1 suspended, the failback is made.
    let to_b1 = x.vol(0x10, 0);
    essctl(&x, &["pprc", "suspend", &to_b1]).ok();
    essctl(&x, &["pprc", "failback", &taken]).ok();
    wait_duplex(&x, &taken);
    assert_eq!(show(b5, &old)["role"], "secondary");
    assert_eq!(volume_sha(&x, &taken), volume_sha(b5, &old));

    // Now TSTB1 would be the fifth: neither a resume nor a new pair with
    // it is made.
    let others = limit("TSTB2, TSTB3, TSTB4, TSTB5");
    essctl(&x, &["pprc", "resume", &to_b1]).refused(&others);
    assert_eq!(show(&x, &to_b1)["state"], "suspended");
    let new = [
        "pprc",
        "establish",
        &x.vol(0x10, 5),
        "001TSTB1",
        "--mode",
        "nocopy",
    ];
    essctl(&x, &new).refused(&others);
    assert_eq!(
        essctl_json(&peers[0], &["volume", "show", "001TSTB1"])["pprc_secondary"],
        false
    );
    drop(peers);
}

/// `failback` belongs to a volume that took over by a failover. Given the
/// primary of a pair that merely suspended (here: a write stuck on a link
/// that timed out), it is refused, pointing to `resume` — which waits for
/// the stuck write before it copies, so the write cannot land over the
/// copy of its track.
#[test]
fn a_failback_of_a_pair_not_failed_over_is_refused() {
    let s = Sites::start("pprc-failback-no-failover", |cfg| with_timeout(cfg, "1s"));
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "2");
    let vol = a.vol(0x10, 0);
    let sec = b.vol(0x10, 0);
    essctl(a, &["pprc", "establish", &vol, &sec, "--mode", "nocopy"]).ok();
    s.proxy.stall_oldest();
    let mut stuck = None;
    for byte in 1..=8u8 {
        let out = python(WRITE_NO_FLUSH, &[&a.uri(&vol), "0", &byte.to_string()]);
        assert_eq!(out.trim(), "ok");
        if show(a, &vol)["state"] == "suspended" {
            stuck = Some(byte);
            break;
        }
    }
    let stuck = stuck.expect("no write went over the stalled link");
    assert_eq!(
        python(WRITE_NO_FLUSH, &[&a.uri(&vol), "0", "238"]).trim(),
        "ok"
    );
    essctl(a, &["pprc", "failback", &vol]).refused(&format!(
        "pair {vol} → {sec} is suspended (link lost), not taken over by a failover; \
         failback is done at a volume that took over: resume this pair with essctl pprc \
         resume {vol}"
    ));
    let v = show(a, &vol);
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("suspended"), Some("link lost")),
        "{v}"
    );
    essctl(a, &["pprc", "resume", &vol]).ok();
    wait_duplex(a, &vol);
    s.proxy.heal();
    std::thread::sleep(Duration::from_secs(2));
    let now = block_at(b, &sec, 0);
    assert!(
        now == vec![238u8; 4096],
        "duplex, the primary holds 238 at offset 0, the secondary {} (the write of {stuck} \
         stuck on the stalled link)",
        now[0]
    );
}

/// A failover at the recovery site while the old primary still mirrors
/// to it (B was cut off from A's view only, or the operator took over
/// too early): B takes none of A's later writes — they suspend A's pair
/// with their tracks marked, A's hosts carry on — so the data B's hosts
/// wrote stays as they wrote it; the failback makes A a copy of B.
#[test]
fn a_failover_while_the_old_primary_mirrors_takes_none_of_its_writes() {
    let s = Sites::start("pprc-failover-live", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    path(a, "0x10", "TSTB2", "0x10", "2");
    essctl(a, &["pprc", "establish", &va, &vb]).ok();
    wait_duplex(a, &va);
    write_tracks(a, &va, 31, 10);

    let v = essctl_json(b, &["pprc", "failover", &vb]);
    assert_eq!(
        (v["role"].as_str(), v["state"].as_str()),
        (Some("primary"), Some("suspended"))
    );
    write_tracks(b, &vb, 32, 4);
    let at_b = volume_sha(b, &vb);

    // A never heard of the failover: its hosts' writes are refused by B.
    let tracks_at_a = write_tracks(a, &va, 33, 6);
    let pa = show(a, &va);
    assert_eq!(
        (
            pa["state"].as_str(),
            pa["reason"].as_str(),
            pa["detail"].as_str()
        ),
        (
            Some("suspended"),
            Some("secondary I/O error"),
            Some("TSTB2 000TSTB2 answered EPERM (not a secondary of this pair)")
        ),
        "{pa}"
    );
    assert!(
        pa["out_of_sync_tracks"].as_u64().unwrap() >= tracks_at_a.len() as u64,
        "{pa}"
    );
    assert_eq!(try_write(a, &va), "writable ok");
    assert_eq!(
        volume_sha(b, &vb),
        at_b,
        "a write of the old primary landed at B"
    );

    path(b, "0x10", "TSTA1", "0x10", "1");
    essctl(b, &["pprc", "failback", &vb]).ok();
    wait_duplex(b, &vb);
    assert_eq!(volume_sha(b, &vb), at_b);
    assert_eq!(volume_sha(a, &va), at_b);
}

/// A failback that reaches the old primary just after its restart, while
/// a host write to its critical pair waits there for the restart's resync
/// (the path to the secondary still down). The hand-over waits for the
/// host's changes in flight; the resync, once the path is up, waits for
/// the hand-over. The hand-over releases the write — answered by the
/// critical mode, `EIO` with no live link — rather than waiting for it
/// forever, and the failback completes with both volumes equal.
#[test]
fn a_failback_during_the_restart_of_a_critical_primary_holding_a_write_completes() {
    let mut s = Sites::start("pprc-failback-restart", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(
        &s.a,
        &[
            "pprc",
            "establish",
            &va,
            &vb,
            "--mode",
            "nocopy",
            "--critical",
        ],
    )
    .ok();
    wait_state(&s.b, &vb, "duplex");
    path(&s.b, "0x10", "TSTA1", "0x10", "1");
    // B takes over; A dies while it still mirrors, and comes back with its
    // path to B down: the pair waits for its restart's resync.
    essctl(&s.b, &["pprc", "failover", &vb]).ok();
    s.a.crash();
    s.proxy.drop_all();
    s.a.kill_and_restart("TSTA1");
    let held = {
        let uri = s.a.uri(&va);
        std::thread::spawn(move || python(TRY_WRITE, &[&uri]).replace('\n', " "))
    };
    // B's path back to A reconnects.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let paths = essctl_json(&s.b, &["pprc", "path", "list"]);
        if paths["paths"][0]["state"] == "up" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B's path to A stays down: {paths}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!held.is_finished(), "the write did not wait for the resync");
    let mut failback = essctl_command(&s.b, &["pprc", "failback", &vb])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run essctl");
    std::thread::sleep(Duration::from_millis(500));
    s.proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = failback.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = failback.kill();
            panic!("the failback never completed: {}", s.a.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = failback.wait_with_output().unwrap();
    assert!(
        status.success(),
        "failback: {status}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(held.join().unwrap().trim(), "writable EIO");
    wait_duplex(&s.b, &vb);
    assert_eq!(show(&s.a, &va)["role"], "secondary");
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

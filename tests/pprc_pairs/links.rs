//! Broken links: suspend on a timeout or a lost path, the critical modes'
//! write inhibition, writes stranded on a timed-out link, state changes
//! that reach the other side only when the links return, and terminate at
//! the secondary with the primary dead.

use super::*;

/// Start of a script sending batches of writes with libnbd's async API:
/// `batch(writes)` sends `(data, offset)` writes together and waits for
/// all of them.
const AIO_WRITES: &str = r#"
import nbd, random, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
done = 0
def batch(writes):
    global done
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(d), o) for d, o in writes]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    done += sum(1 for c in cookies if h.aio_command_completed(c))
"#;

/// Writes different data to the same places several times at once: in
/// each round 8 writes to one range, in flight together (whole pages and
/// single sectors, alternately).
const OVERLAPPING_WRITES: &str = r#"
for r in range(int(sys.argv[2])):
    offset, size = (r % 64) * 8192 + (r % 2) * 512, 512 if r % 2 else 4096
    batch([(bytearray([1 + (r * 8 + k) % 255]) * size, offset) for k in range(8)])
"#;

/// 4 KiB writes, 8 in flight, to the volume's blocks in random order, each
/// at most once (so a write that misses the secondary is never covered by
/// a later one), for `argv[2]` seconds.
const KEEP_WRITING: &str = r#"
end = time.time() + float(sys.argv[2])
rnd = random.Random(5)
blocks = list(range(h.get_size() // 4096))
rnd.shuffle(blocks)
while time.time() < end and len(blocks) >= 8:
    batch([(rnd.randbytes(4096), blocks.pop() * 4096) for _ in range(8)])
"#;

/// An [`AIO_WRITES`] script with `body`, flushing at the end; it prints
/// how many writes completed.
fn aio_script(body: &str) -> String {
    format!("{AIO_WRITES}{body}h.flush()\nh.shutdown()\nprint(done)\n")
}

#[test]
fn broken_links_suspend_and_critical_modes_inhibit_writes() {
    let s = Sites::start("pprc-critical", |cfg| {
        cfg.lss_extra = vec![(0x11, "critical_heavy = true".into())];
    });
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "2");
    path(a, "0x11", "TSTB2", "0x11", "1");
    let plain = a.vol(0x10, 0);
    let critical = a.vol(0x10, 1);
    let heavy = a.vol(0x11, 0);
    for (vol, peer, opts) in [
        (&plain, b.vol(0x10, 0), &[][..]),
        (&critical, b.vol(0x10, 1), &["--critical"][..]),
        (&heavy, b.vol(0x11, 0), &["--critical"][..]),
    ] {
        let mut args = vec![
            "pprc",
            "establish",
            vol.as_str(),
            peer.as_str(),
            "--mode",
            "nocopy",
        ];
        args.extend_from_slice(opts);
        essctl(a, &args).ok();
        assert_eq!(show(a, vol)["state"], "duplex");
    }

    // Overlapping writes in flight together, spread over both links: the
    // secondary applies them in the primary's order, so the volumes agree.
    let out = python(&aio_script(OVERLAPPING_WRITES), &[&a.uri(&plain), "200"]);
    assert_eq!(out.trim(), "1600");
    assert_eq!(show(a, &plain)["state"], "duplex");
    assert_eq!(volume_sha(a, &plain), volume_sha(b, &b.vol(0x10, 0)));

    // Suspended and resumed three times while a host keeps writing: the
    // resyncs miss no change made while the pair was suspended, nor one
    // made alone as it started mirroring again.
    let writer = {
        let (uri, script) = (a.uri(&plain), aio_script(KEEP_WRITING));
        std::thread::spawn(move || python(&script, &[&uri, "3"]))
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let v = essctl(a, &["--json", "pprc", "suspend", &plain]).json();
        assert_eq!(
            (v["state"].as_str(), v["reason"].as_str()),
            (Some("suspended"), Some("manual"))
        );
        std::thread::sleep(Duration::from_millis(200));
        let v = essctl(a, &["--json", "pprc", "resume", &plain]).json();
        assert!(
            matches!(v["state"].as_str(), Some("duplex pending" | "duplex")),
            "{v}"
        );
    }
    let written: u64 = writer.join().unwrap().trim().parse().unwrap();
    // Writes went on through all three suspend/resume cycles.
    assert!(written >= 8 * 10, "only {written} writes");
    wait_duplex(a, &plain);
    assert_eq!(volume_sha(a, &plain), volume_sha(b, &b.vol(0x10, 0)));

    // Losing one link of two only degrades the path: writes go on over the
    // other, the pairs stay duplex.
    s.proxy.reset_one();
    write_tracks(a, &plain, 9, 30);
    assert_eq!(show(a, &plain)["state"], "duplex");
    assert_eq!(volume_sha(a, &plain), volume_sha(b, &b.vol(0x10, 0)));
    path(a, "0x10", "TSTB2", "0x10", "2");

    // A slow link (300 ms each way, under the 2 s timeout) slows writes
    // down but the pair stays duplex.
    s.proxy.delay(Duration::from_millis(300));
    let started = Instant::now();
    write_tracks(a, &plain, 10, 2);
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(show(a, &plain)["state"], "duplex");
    s.proxy.heal();

    // Every connection reset mid-write: the pair either carries on over
    // reopened links or suspends; after a resume both sides are equal.
    let writer = {
        let uri = a.uri(&plain);
        std::thread::spawn(move || {
            python(WRITE_TRACKS, &[&uri, "11", "200"]);
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    s.proxy.reset();
    writer.join().unwrap();
    path(a, "0x10", "TSTB2", "0x10", "2");
    if show(a, &plain)["state"] == "suspended" {
        essctl(a, &["pprc", "resume", &plain]).ok();
    }
    wait_duplex(a, &plain);
    assert_eq!(volume_sha(a, &plain), volume_sha(b, &b.vol(0x10, 0)));

    // A stalled link: the write waits for the timeout (2 s), then the
    // pair suspends and the host's write succeeds (not critical).
    s.proxy.stall();
    let started = Instant::now();
    let stalled = write_tracks(a, &plain, 1, 1)[0];
    assert!(started.elapsed() >= Duration::from_millis(1900));
    let v = show(a, &plain);
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("suspended"), Some("link lost"))
    );
    assert_eq!(v["detail"], "TSTB2 did not answer within 2s");
    assert_eq!(v["write_inhibited"], false);
    // Suspended, the bitmap file drops the rest of the regions it kept
    // for duplex writes: it holds exactly the tracks out of sync.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let file = durable_marks(a, &plain);
        let marked = show(a, &plain)["out_of_sync_tracks"].as_u64().unwrap();
        if file.len() as u64 == marked {
            assert!(
                file.contains(&stalled),
                "track {stalled} not marked: {file:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bitmap file has {} tracks, the pair {marked} out of sync",
            file.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.proxy.heal();
    path(a, "0x10", "TSTB2", "0x10", "2");

    // Every link lost: not critical → suspended, writable; critical →
    // write-inhibited once the last link is gone; critical + heavy →
    // write-inhibited. Reads go on.
    s.proxy.drop_all();
    write_tracks(a, &plain, 2, 1);
    assert_eq!(try_write(a, &critical), "writable EIO");
    assert_eq!(try_write(a, &heavy), "writable EIO");
    for (vol, inhibited) in [(&plain, false), (&critical, true), (&heavy, true)] {
        let v = show(a, vol);
        assert_eq!(v["state"], "suspended", "{v}");
        assert_eq!(v["reason"], "link lost", "{v}");
        assert_eq!(v["write_inhibited"], inhibited, "{v}");
    }
    volume_sha(a, &heavy);

    // The links come back; resync clears the inhibition.
    s.proxy.heal();
    path(a, "0x10", "TSTB2", "0x10", "2");
    path(a, "0x11", "TSTB2", "0x11", "1");
    for (vol, peer) in [
        (&plain, b.vol(0x10, 0)),
        (&critical, b.vol(0x10, 1)),
        (&heavy, b.vol(0x11, 0)),
    ] {
        essctl(a, &["pprc", "resume", vol]).ok();
        wait_duplex(a, vol);
        assert_eq!(show(a, vol)["write_inhibited"], false);
        write_tracks(a, vol, 3, 4);
        assert_eq!(volume_sha(a, vol), volume_sha(b, &peer), "{vol}");
    }

    // A duplex secondary whose primary is connected cannot be terminated
    // there: its primary would go on as if duplex.
    essctl(b, &["pprc", "terminate", &b.vol(0x10, 1)]).refused(&format!(
        "{} is the duplex secondary of TSTA1 {critical}, which is connected: suspend the \
         pair first, terminate it at TSTA1, or fail over here",
        b.vol(0x10, 1)
    ));
    // The secondary fails to apply a change (its volume was taken over by
    // a failover at B): critical without heavy only suspends while links
    // are up; heavy inhibits.
    essctl(b, &["pprc", "failover", &b.vol(0x10, 1)]).ok();
    essctl(b, &["pprc", "failover", &b.vol(0x11, 0)]).ok();
    assert_eq!(try_write(a, &critical), "writable ok");
    assert_eq!(show(a, &critical)["reason"], "secondary I/O error");
    assert_eq!(try_write(a, &heavy), "writable EIO");
    assert_eq!(show(a, &heavy)["write_inhibited"], true);
    // Terminating the pair also ends the inhibition.
    essctl(a, &["pprc", "terminate", &heavy]).ok();
    assert_eq!(try_write(a, &heavy), "writable ok");
}

#[test]
fn terminate_at_the_secondary_with_the_primary_dead_makes_it_writable() {
    let s = Sites::start("pprc-takeover", |_| {});
    let (_, vb) = duplex_nocopy_pair(&s);
    let v = show(&s.b, &vb);
    assert_eq!(
        (&v["primary_links"], &v["replication_status"]),
        (&1.into(), &"current".into())
    );
    s.a.kill();
    // Without a link from its primary the secondary cannot know that it
    // is current (the primary may be writing on, suspended).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = show(&s.b, &vb);
        if v["primary_links"] == 0 {
            assert_eq!(
                (&v["state"], &v["replication_status"]),
                (&"duplex".into(), &"not current".into())
            );
            assert!(v["primary_unreachable_since"].is_string(), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the primary's link stays: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(try_write(&s.b, &vb), "read-only EPERM");
    let v = essctl_json(&s.b, &["pprc", "terminate", &vb]);
    assert_eq!(v["state"], "simplex");
    assert_eq!(try_write(&s.b, &vb), "writable ok");
    let shown = essctl_json(&s.b, &["volume", "show", &vb]);
    assert_eq!(shown["pprc_secondary"], false);
}

/// `kill -9` of the primary while fio writes to it (seen writing), three
/// times: the pair comes back by itself and both volumes end equal; then
/// of the secondary between writes: the primary suspends, and a resume
/// makes them equal. (Which acknowledged writes survive such kills is
/// checked block by block in `seeded.rs`.)
#[test]
fn kill_9_of_either_server_mid_write_loses_nothing() {
    let mut s = Sites::start("pprc-kill", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    fill(&s.a, &va, s.dir_a.path(), 8, 21);
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb]).ok();
    wait_duplex(&s.a, &va);

    for round in 0..3u64 {
        // Kill the primary while fio writes.
        let fio = std::process::Command::new("fio")
            .args([
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={}", s.a.uri(&va)),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--time_based",
                "--runtime=30",
                "--verify_state_save=0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed while fio writes (mirrored writes in flight), not before
        // it connected.
        let writes = || essctl_json(&s.a, &["volume", "show", &va])["stats"]["writes"].as_u64();
        let at_start = writes().unwrap();
        wait_until("fio writing", || writes().unwrap() >= at_start + 1000);
        std::thread::sleep(Duration::from_millis(round * 300));
        s.a.kill_and_restart("TSTA1");
        let mut fio = fio;
        let _ = fio.kill();
        let _ = fio.wait();
        // The pair comes back by itself and resynchronises.
        wait_state(&s.a, &va, "duplex");
        assert_eq!(
            volume_sha(&s.a, &va),
            volume_sha(&s.b, &vb),
            "round {round}"
        );
    }

    // Kill the secondary mid-write: the primary suspends and goes on.
    write_tracks(&s.a, &va, 30, 4);
    s.b.kill_and_restart("TSTB2");
    write_tracks(&s.a, &va, 31, 6);
    let v = show(&s.a, &va);
    assert_eq!(v["state"], "suspended", "{v}");
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "resume", &va]).ok();
    wait_duplex(&s.a, &va);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// The primary is killed; the recovery site terminates its secondary and
/// hosts write it. The restarted primary's automatic resync must not make
/// that volume its secondary again (copying only its own out-of-sync
/// tracks over the recovery site's data).
#[test]
fn a_restarted_primary_does_not_resync_a_secondary_terminated_meanwhile() {
    let mut s = Sites::start("pprc-restart-terminated", |_| {});
    let (va, vb) = duplex_nocopy_pair(&s);
    write_tracks(&s.a, &va, 80, 4);
    s.a.crash();
    let recovery = take_over_at_the_recovery_site(&s, &vb);
    s.a.kill_and_restart("TSTA1");
    let pa = recovery_site_kept(&s, &va, &vb, &recovery);
    assert_eq!(pa["state"], "suspended", "{pa}");
}

/// A write whose link stalls past the timeout suspends the pair
/// (the link is dropped from the path, but its request is still on its
/// way). The resync copies the track over another link and the pair is
/// duplex; then the stalled link delivers the old write, which must not
/// land over the newer copy.
#[test]
fn a_write_stuck_on_a_timed_out_link_never_lands_after_the_resync() {
    let s = Sites::start("pprc-stale-link", |cfg| with_timeout(cfg, "1s"));
    let (a, b) = (&s.a, &s.b);
    let started = Instant::now();
    let (vol, sec, stuck) = a_write_stuck_on_a_stalled_link(&s);
    essctl(a, &["pprc", "resume", &vol]).ok();
    wait_duplex(a, &vol);
    assert_eq!(block_at(a, &vol, 0), vec![238u8; 4096]);
    assert_eq!(block_at(b, &sec, 0), vec![238u8; 4096]);
    let elapsed = started.elapsed();
    the_stalled_link_delivers_too_late(
        &s,
        &vol,
        &sec,
        &format!(
            "the write of {stuck} stuck on the stalled link; resync done {elapsed:?} after \
             the stall"
        ),
    );
}

/// A nocopy pair A 000 → B 000 over two links, one of which stops
/// delivering (both ways) while a write of offset 0 is on it: the pair
/// suspends once that write times out. Then the host writes 238 at offset
/// 0, recorded. Returns the volumes and the byte of the stuck write.
fn a_write_stuck_on_a_stalled_link(s: &Sites) -> (String, String, u8) {
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "2");
    let vol = a.vol(0x10, 0);
    let sec = b.vol(0x10, 0);
    essctl(a, &["pprc", "establish", &vol, &sec, "--mode", "nocopy"]).ok();
    assert_eq!(show(a, &vol)["state"], "duplex");
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
    (vol, sec, stuck)
}

/// As above, but the operator terminates the pair and establishes it
/// again with a full copy: the new pair's copy must wait for the link that
/// timed out as a resync does, or the old write lands over the copy of
/// its track.
#[test]
fn a_write_stuck_on_a_timed_out_link_never_lands_after_a_new_pairs_copy() {
    let s = Sites::start("pprc-stale-new-pair", |cfg| with_timeout(cfg, "1s"));
    let (a, b) = (&s.a, &s.b);
    let (vol, sec, stuck) = a_write_stuck_on_a_stalled_link(&s);
    essctl(a, &["pprc", "terminate", &vol]).ok();
    essctl(a, &["pprc", "establish", &vol, &sec, "--mode", "copy"]).ok();
    wait_duplex(a, &vol);
    assert_eq!(block_at(b, &sec, 0), vec![238u8; 4096]);
    the_stalled_link_delivers_too_late(
        &s,
        &vol,
        &sec,
        &format!("the write of {stuck} stuck on the stalled link of the terminated pair"),
    );
}

/// The stalled link delivers what it held, after the pair went duplex
/// again with 238 at offset 0: the pair stays duplex and the secondary
/// keeps 238 (`what` says which write was stuck).
fn the_stalled_link_delivers_too_late(s: &Sites, vol: &str, sec: &str, what: &str) {
    s.proxy.heal();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(show(&s.a, vol)["state"], "duplex");
    let now = block_at(&s.b, sec, 0);
    assert!(
        now == vec![238u8; 4096],
        "duplex, the primary holds 238 at offset 0, the secondary {} ({what})",
        now[0]
    );
}

/// As above, but the operator re-establishes the path with "force removal
/// of existing paths" before the resume: the new path's links must still
/// know that a link of the old one was dropped with a write unanswered, or
/// the resync does not wait for it and the stale write lands over the
/// resync's copy of its track.
#[test]
fn a_forced_path_establish_does_not_forget_a_timed_out_link() {
    a_replaced_path_does_not_forget_a_timed_out_link("pprc-stale-force", false);
}

/// The same when the operator removes the path and establishes it again.
#[test]
fn a_removed_and_reestablished_path_does_not_forget_a_timed_out_link() {
    a_replaced_path_does_not_forget_a_timed_out_link("pprc-stale-remove", true);
}

fn a_replaced_path_does_not_forget_a_timed_out_link(tag: &str, remove_first: bool) {
    let s = Sites::start(tag, |cfg| with_timeout(cfg, "1s"));
    let (a, b) = (&s.a, &s.b);
    let (vol, sec, stuck) = a_write_stuck_on_a_stalled_link(&s);
    let mut establish = vec![
        "pprc",
        "path",
        "establish",
        "0x10",
        "TSTB2",
        "0x10",
        "--links",
        "2",
    ];
    if remove_first {
        // The suspended pair still uses the path.
        essctl(
            a,
            &["pprc", "path", "remove", "0x10", "TSTB2", "0x10", "--force"],
        )
        .ok();
    } else {
        establish.push("--force");
    }
    essctl(a, &establish).ok();
    essctl(a, &["pprc", "resume", &vol]).ok();
    wait_duplex(a, &vol);
    assert_eq!(block_at(a, &vol, 0), vec![238u8; 4096]);
    s.proxy.heal();
    std::thread::sleep(Duration::from_secs(2));
    let now = block_at(b, &sec, 0);
    assert!(
        now == vec![238u8; 4096],
        "duplex, the primary holds 238 at offset 0, the secondary {} (the write of {stuck} \
         stuck on a link of the path replaced)",
        now[0]
    );
}

/// A duplex critical pair (nocopy) of volume `vol` of LSS 0x10, a write
/// of `byte`s to its track 1 made (not flushed), then the secondary's
/// server stopped: the sites, the primary and the secondary.
fn critical_pair_whose_secondary_is_gone(name: &str, vol: u8, byte: u8) -> (Sites, String, String) {
    let mut s = Sites::start(name, |_| {});
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (s.a.vol(0x10, vol), s.b.vol(0x10, vol));
    essctl(
        &s.a,
        &[
            "pprc",
            "establish",
            &v,
            &sv,
            "--mode",
            "nocopy",
            "--critical",
        ],
    )
    .ok();
    let written = spawn_write_unflushed(&s.a, &v, TRACK, byte);
    assert!(written.wait_with_output().unwrap().status.success());
    s.b.terminate();
    (s, v, sv)
}

/// The server's flush at the stop flushes a critical primary whose
/// secondaries' server is gone — the pair duplex until then — without an
/// error: it flushes the store, and mirrors nothing once the links are
/// closed (the pair's secondary is flushed, if at all, before).
#[test]
fn the_stop_flushes_a_critical_primary_whose_secondary_is_gone() {
    let (mut s, v, sv) = critical_pair_whose_secondary_is_gone("pprc-stop-flush-critical", 0, 0xF1);
    assert_eq!(show(&s.a, &v)["state"], "duplex");
    let status = s.a.terminate_within(Duration::from_secs(20));
    let log = s.a.log();
    assert!(
        status.success() && !log.contains("flush at shutdown failed"),
        "{status}:\n{log}"
    );
    assert_eq!(unwritten_pages(&s.dir_a.path().join("vol-10-0.img")), 0);
    // The pair kept its tracks and was not suspended by the stop: it
    // resynchronises by itself after the restart.
    s.b.restart("TSTB2");
    s.a.restart("TSTA1");
    wait_state(&s.a, &v, "duplex");
    assert_eq!(block_at(&s.b, &sv, TRACK), vec![0xF1; 4096]);
}

/// A FLUSH alone; prints `ok` or the errno name.
const TRY_FLUSH: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.flush()
    print("ok")
except nbd.Error as e:
    print(e.errnum and __import__("errno").errorcode[e.errnum] or e.string)
"#;

/// A write-inhibited primary refuses changes, not flushes: a host FLUSH
/// of what it wrote before is answered by the primary's own flush — also
/// the FLUSH that finds the secondary gone and write-inhibits the volume.
#[test]
fn a_host_flush_of_a_write_inhibited_primary_succeeds() {
    let (s, v, _) = critical_pair_whose_secondary_is_gone("pprc-inhibited-flush", 1, 0xF2);
    let a = &s.a;
    assert_eq!(python(TRY_FLUSH, &[&a.uri(&v)]).trim(), "ok");
    let p = show(a, &v);
    assert_eq!(
        (
            p["state"].as_str(),
            p["reason"].as_str(),
            p["write_inhibited"].as_bool()
        ),
        (Some("suspended"), Some("link lost"), Some(true)),
        "{p}"
    );
    assert_eq!(try_write(a, &v), "writable EIO");
    assert_eq!(python(TRY_FLUSH, &[&a.uri(&v)]).trim(), "ok");
    assert_eq!(block_at(a, &v, TRACK), vec![0xF2; 4096]);
}

/// The secondary's view of a pair once a link from its primary is open:
/// (state, reason, replication status), waited for until `state` (at most
/// 10 s, then whatever it shows).
fn secondary_view_once_linked(
    essd: &Essd,
    volume: &str,
    state: &str,
) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = show(essd, volume);
        let linked = v["primary_links"].as_u64().unwrap_or(0) > 0;
        if (linked && v["state"] == state) || Instant::now() > deadline {
            assert!(linked, "no link from the primary: {v}");
            return (
                v["state"].clone(),
                v["reason"].clone(),
                v["replication_status"].clone(),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A primary that suspends while every link is down cannot tell its
/// secondary then: it tells it once a link is back, so the recovery site
/// does not show a duplex, current secondary whose primary writes on alone.
#[test]
fn a_suspend_while_the_links_are_down_reaches_the_secondary_when_they_return() {
    let s = Sites::start("pprc-retell", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    assert_eq!(
        secondary_view_once_linked(&s.b, &vb, "duplex"),
        ("duplex".into(), serde_json::Value::Null, "current".into())
    );
    s.proxy.drop_all();
    write_tracks(&s.a, &va, 101, 3);
    let v = show(&s.a, &va);
    assert_eq!(
        (&v["state"], &v["reason"], &v["out_of_sync_tracks"]),
        (&"suspended".into(), &"link lost".into(), &3.into()),
        "{v}"
    );
    s.proxy.heal();
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    assert_eq!(
        secondary_view_once_linked(&s.b, &vb, "suspended"),
        ("suspended".into(), "link lost".into(), "not current".into())
    );
    let list = essctl(&s.b, &["pprc", "list"]).ok().to_string();
    let row: Vec<&str> = list
        .lines()
        .find(|l| l.starts_with(vb.as_str()))
        .unwrap_or_else(|| panic!("{list}"))
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        row,
        [
            vb.as_str(),
            "secondary",
            "suspended",
            "TSTA1",
            va.as_str(),
            "0",
            "not current",
            "link lost"
        ]
    );
    // Resumed, both sides are duplex and current again.
    essctl(&s.a, &["pprc", "resume", &va]).ok();
    wait_duplex(&s.a, &va);
    assert_eq!(show(&s.a, &va)["replication_status"], "current");
    assert_eq!(
        secondary_view_once_linked(&s.b, &vb, "duplex"),
        ("duplex".into(), serde_json::Value::Null, "current".into())
    );
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// A primary server mirroring to three peers ([`FanOut`]) whose link to
/// C stalls: C's pair suspends once a write is not answered within the
/// 2 s timeout, and C's server, told so over the stalled link, does not
/// answer. Meanwhile D's pair is suspended by hand: D's server, over a
/// live link, is told at once — a peer that does not answer does not
/// leave another peer's secondary shown duplex and current while its
/// primary is suspended.
#[test]
fn a_peer_that_does_not_answer_does_not_hold_up_telling_the_others() {
    let s = FanOut::start("pprc-tell-fan-out");
    let (c, d) = (&s.legs[2], &s.legs[3]);
    s.proxies[c.peer].stall();
    let mut write = spawn_write(&s.a, &c.va, 0, 7);
    assert_eq!(
        wait_child(&mut write, 10),
        Some(true),
        "the write to {}",
        c.va
    );
    let v = show(&s.a, &c.va);
    assert_eq!(
        (&v["state"], &v["reason"]),
        (&"suspended".into(), &"link lost".into()),
        "{v}"
    );
    essctl(&s.a, &["pprc", "suspend", &d.va]).ok();
    let suspended = Instant::now();
    // Told within a retelling or two; a wait for C's link (its 5 s
    // timeout) would be longer than the bound, which leaves room for a
    // slow machine.
    let bound = Duration::from_secs(4);
    loop {
        let v = show(&s.peers[d.peer], &d.vb);
        if v["state"] == "suspended" {
            assert_eq!(v["reason"], "manual", "{v}");
            break;
        }
        assert!(
            suspended.elapsed() < bound,
            "{} suspended by hand {:?} ago, its secondary still shows {} {} over {} link(s) \
             (TSTC3 does not answer)",
            d.va,
            suspended.elapsed(),
            v["state"],
            v["replication_status"],
            v["primary_links"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.heal();
}

/// A primary killed while duplex whose path stays down through its
/// restart: it comes back suspended and says why it is not resuming by
/// itself; once the path is up again the secondary shows the suspend too
/// (not duplex and current, which it was when the primary died).
#[test]
fn a_restarted_primary_whose_path_stays_down_is_suspended_on_both_sides() {
    let mut s = Sites::start("pprc-restart-path-down", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    assert_eq!(secondary_view_once_linked(&s.b, &vb, "duplex").2, "current");
    write_tracks(&s.a, &va, 102, 2);
    s.proxy.drop_all();
    s.a.kill_and_restart("TSTA1");
    let v = show(&s.a, &va);
    assert_eq!(
        (&v["state"], &v["reason"], &v["detail"]),
        (
            &"suspended".into(),
            &"primary restarted".into(),
            &"waiting for the path to resume".into()
        ),
        "{v}"
    );
    // It waits 10 s for a live link, then stays suspended.
    std::thread::sleep(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = show(&s.a, &va);
        if v["detail"] != "waiting for the path to resume" || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (&v["state"], &v["reason"], &v["detail"]),
        (
            &"suspended".into(),
            &"primary restarted".into(),
            &format!(
                "no live link within 10s of the restart; resume it with essctl pprc resume {va}"
            )
            .into()
        ),
        "{v}"
    );
    let text = essctl(&s.a, &["pprc", "show", &va]).ok().to_string();
    assert!(
        text.contains(&format!(
            "detail:             no live link within 10s of the restart; resume it with essctl pprc resume {va}\n"
        )),
        "{text}"
    );
    s.proxy.heal();
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    assert_eq!(
        secondary_view_once_linked(&s.b, &vb, "suspended"),
        (
            "suspended".into(),
            "primary restarted".into(),
            "not current".into()
        )
    );
    essctl(&s.a, &["pprc", "resume", &va]).ok();
    wait_duplex(&s.a, &va);
    assert_eq!(secondary_view_once_linked(&s.b, &vb, "duplex").2, "current");
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// A resume whose request reaches the secondary but whose answer comes
/// too late (a link slow both ways: 3 s each way, past the 5 s the
/// primary waits) fails, and the pair stays suspended at the primary;
/// the secondary, which took the resync and shows itself duplex pending,
/// is told the suspend again, so once the link is back both sides show
/// the pair suspended (manual), not a copy at the secondary that is not
/// running. A resume then brings both to duplex.
#[test]
fn a_resume_whose_answer_is_lost_leaves_both_sides_suspended() {
    let s = Sites::start("pprc-resume-lost", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_sides_agree(&s.a, &va, &s.b, &vb, "established");
    essctl(&s.a, &["pprc", "suspend", &va]).ok();
    write_tracks(&s.a, &va, 103, 2);
    wait_sides_agree(&s.a, &va, &s.b, &vb, "suspended");
    s.proxy.delay(Duration::from_secs(3));
    let run = essctl(&s.a, &["pprc", "resume", &va]);
    assert_eq!(run.code, 1, "{run:?}");
    let v = show(&s.a, &va);
    assert_eq!(
        (&v["state"], &v["reason"]),
        (&"suspended".into(), &"manual".into()),
        "{v}"
    );
    // The request has reached the secondary's server by now.
    std::thread::sleep(Duration::from_secs(1));
    s.proxy.heal();
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    wait_sides_agree(&s.a, &va, &s.b, &vb, "after a resume whose answer was lost");
    resume_to_equal(&s, &va, &vb, "resumed");
}

/// A resume whose request is held on one link of two (8 s: past the 5 s
/// the primary waits, short of the 10 s after which the secondary's server
/// gives up on a silent link) fails, and the primary's server tells the
/// secondary over the other link that the pair is suspended. When the old
/// request arrives after that, it changes nothing the secondary shows: the
/// pair stays suspended (manual) on both sides, and a resume then brings
/// both to duplex. (Links are picked in turn: a resume that went over the
/// undelayed link finds nothing to copy, and is suspended and tried again
/// with the other link delayed.)
#[test]
fn a_resume_request_that_arrives_after_its_primary_gave_up_changes_nothing() {
    let s = Sites::start("pprc-resume-late", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_sides_agree(&s.a, &va, &s.b, &vb, "established");
    let late = Duration::from_secs(8);
    let mut attempts = 0;
    let asked = loop {
        attempts += 1;
        assert!(attempts <= 6, "no resume went over the delayed link");
        essctl(&s.a, &["pprc", "suspend", &va]).ok();
        wait_sides_agree(&s.a, &va, &s.b, &vb, "suspended");
        s.proxy.delay_nth((attempts / 2) % 2, late);
        let asked = Instant::now();
        let run = essctl(&s.a, &["pprc", "resume", &va]);
        if run.code == 1 {
            break asked;
        }
        assert_eq!(run.code, 0, "{run:?}");
        wait_duplex(&s.a, &va);
        s.proxy.heal();
        path(&s.a, "0x10", "TSTB2", "0x10", "2");
        wait_sides_agree(&s.a, &va, &s.b, &vb, "resumed over the undelayed link");
    };
    wait_sides_agree(&s.a, &va, &s.b, &vb, "told over the other link");
    s.b.wait_log(
        "ignored a late request to take the pair back",
        (asked + late + Duration::from_secs(20)).saturating_duration_since(Instant::now()),
    );
    for (essd, volume) in [(&s.a, &va), (&s.b, &vb)] {
        let v = show(essd, volume);
        assert_eq!(
            (&v["state"], &v["reason"]),
            (&"suspended".into(), &"manual".into()),
            "after the late request arrived: {v}"
        );
    }
    s.proxy.heal();
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    resume_to_equal(&s, &va, &vb, "resumed");
}

/// A terminate whose request is held on one link of two (8 s: past the
/// 5 s the primary waits) ends the pair at the primary only, and the
/// operator establishes it again at once, over the other link. When the
/// old terminate arrives after that, it ends nothing: the secondary stays
/// the secondary of the new pair (hosts cannot write it), the pair stays
/// duplex on both sides, and a write reaches the secondary. (Links are
/// picked in turn: a terminate that went over the undelayed link was told,
/// and the pair is made again and tried with the other link delayed.)
#[test]
fn a_terminate_that_arrives_after_the_pair_was_made_again_ends_nothing() {
    let s = Sites::start("pprc-terminate-late", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    let establish = || {
        essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
        wait_sides_agree(&s.a, &va, &s.b, &vb, "established");
    };
    establish();
    let late = Duration::from_secs(8);
    let mut attempts = 0;
    let asked = loop {
        attempts += 1;
        assert!(attempts <= 6, "no terminate went over the delayed link");
        // Which link a terminate takes alternates or not; so does this.
        s.proxy.delay_nth((attempts / 2) % 2, late);
        let asked = Instant::now();
        let run = essctl(&s.a, &["pprc", "terminate", &va]);
        if run.ok().contains("secondary not told") {
            break asked;
        }
        s.proxy.heal();
        path(&s.a, "0x10", "TSTB2", "0x10", "2");
        establish();
    };
    // Over the other link (the next in turn).
    establish();
    s.b.wait_log(
        "ignored a late terminate",
        (asked + late + Duration::from_secs(20)).saturating_duration_since(Instant::now()),
    );
    wait_sides_agree(&s.a, &va, &s.b, &vb, "after the late terminate arrived");
    let v = show(&s.b, &vb);
    assert_eq!(
        (&v["role"], &v["state"]),
        (&"secondary".into(), &"duplex".into()),
        "{v}"
    );
    assert_eq!(try_write(&s.b, &vb), "read-only EPERM");
    s.proxy.heal();
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    write_tracks(&s.a, &va, 104, 3);
    wait_duplex(&s.a, &va);
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "after a write"
    );
}

/// A host that pipelines 24 writes of 32 MiB to a duplex primary whose
/// link stalls: the first waits for the secondary (until the 2 s timeout
/// suspends the pair), and the connection must not read and hold the
/// other 736 MiB meanwhile. Its requests start only while those in flight
/// hold less than 64 MiB, so the primary grows by far less; every write
/// is acknowledged once the pair has suspended.
#[test]
fn large_writes_pipelined_to_a_stalled_pair_hold_bounded_memory() {
    let s = Sites::start("pprc-write-budget", |_| {});
    let (va, _vb) = duplex_nocopy_pair(&s);
    let before = peak_memory(s.a.pid());
    s.proxy.stall();
    let acked = python(
        r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = nbd.Buffer.from_bytearray(bytearray(b"\x5a") * (32 << 20))
cookies = [h.aio_pwrite(data, (i % 2) * (32 << 20)) for i in range(24)]
while h.aio_in_flight() > 0:
    h.poll(-1)
print(sum(1 for c in cookies if h.aio_command_completed(c)))
"#,
        &[&s.a.uri(&va)],
    );
    let grown = peak_memory(s.a.pid()) - before;
    assert_eq!(acked.trim(), "24");
    assert_eq!(show(&s.a, &va)["reason"], "link lost");
    assert!(grown < 256 << 20, "the primary grew by {} MiB", grown >> 20);
    s.proxy.heal();
}

/// Two servers that mirror to each other (pairs both ways), every pair
/// suspended by hand and written, then `essctl pprc resume` of every
/// pair on both servers at the same moment, with 300 ms each way on the
/// links (each server's request to take its pairs back arrives while the
/// other's is in flight): every resume succeeds and every pair is duplex,
/// its volumes equal.
#[test]
fn resumes_on_both_servers_of_pairs_both_ways_at_once_all_succeed() {
    let (s, pairs) = active_active("pprc-resume-both");
    for (i, (at_a, pv, sv)) in pairs.iter().enumerate() {
        let (p, q) = sides(&s, *at_a);
        essctl(p, &["pprc", "suspend", pv]).ok();
        write_tracks(p, pv, 300 + i as u64, 5);
        wait_sides_agree(p, pv, q, sv, "suspended");
    }
    s.proxy.delay(Duration::from_millis(300));
    s.back.delay(Duration::from_millis(300));
    let runs: Vec<_> = pairs
        .iter()
        .map(|(at_a, pv, _)| {
            (
                pv,
                essctl_async(sides(&s, *at_a).0, &["pprc", "resume", pv]),
            )
        })
        .collect();
    for (pv, run) in runs {
        let out = run.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
        assert!(
            out.status.success(),
            "resume {pv}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    s.proxy.heal();
    s.back.heal();
    all_duplex_and_equal(&s, &pairs, Duration::from_secs(30), "after the resumes");
}

/// An initial copy over a path of two links, one slow (20 ms a 64 KiB
/// chunk each way: about 3 MiB/s) and one not, ends duplex. The copy's
/// requests in flight (8 of 1 MiB) go to the least busy link, and one
/// still queued on the slow link behind requests it answers is given
/// more time than the 2 s timeout: before, they were spread in turn, the
/// last on the slow link waited past the timeout for those ahead of it,
/// and the pair suspended (link lost) with both links working.
#[test]
fn a_copy_over_a_fast_and_a_slow_link_keeps_within_the_timeout() {
    let s = Sites::start("pprc-uneven-links", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    fill(&s.a, &va, s.dir_a.path(), 64, 0x51);
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    assert_eq!(s.proxy.connections(), 2);
    s.proxy.delay_nth(0, Duration::from_millis(20));
    let p = essctl_json(&s.a, &["pprc", "establish", &va, &vb, "--mode", "copy"]);
    assert_eq!(p["state"], "duplex pending", "{p}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = show(&s.a, &va);
        if v["state"] == "duplex" {
            break;
        }
        assert_ne!(v["state"], "suspended", "{v}");
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.proxy.heal();
    wait_current(&s.a, &va);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// A busy link is up: 32 MiB of writes queued on a link that carries about
/// 3 MiB/s (20 ms a 64 KiB chunk) keep a heartbeat sent meanwhile waiting
/// behind them for seconds, past the 5 s a heartbeat is given, while the
/// secondary answers the writes ahead of it all along. The link stays up
/// and the pair duplex; before, the heartbeat's timeout took the link down
/// and the next write suspended the pair (link lost).
#[test]
fn a_heartbeat_queued_behind_writes_on_a_slow_link_keeps_the_link_up() {
    let s = Sites::start("pprc-busy-link", |cfg| with_timeout(cfg, "5s"));
    let (va, vb) = duplex_nocopy_pair(&s);
    s.proxy.delay(Duration::from_millis(20));
    let started = Instant::now();
    let acked = python(
        r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = nbd.Buffer.from_bytearray(bytearray(b"\x6b") * (1 << 20))
cookies = [h.aio_pwrite(data, i << 20) for i in range(32)]
while h.aio_in_flight() > 0:
    h.poll(-1)
h.pwrite(b"\x6c" * 4096, 40 << 20)
print(sum(1 for c in cookies if h.aio_command_completed(c)))
"#,
        &[&s.a.uri(&va)],
    );
    let took = started.elapsed();
    s.proxy.heal();
    assert_eq!(acked.trim(), "32");
    assert!(
        took > Duration::from_secs(7),
        "the writes took {took:?}: too fast to have held a heartbeat back 5 s"
    );
    let downs: Vec<String> =
        s.a.log()
            .lines()
            .filter(|l| l.contains("peer link down"))
            .map(str::to_string)
            .collect();
    assert!(downs.is_empty(), "{downs:#?}");
    let v = show(&s.a, &va);
    assert_eq!(v["state"], "duplex", "{v}");
    wait_current(&s.a, &va);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

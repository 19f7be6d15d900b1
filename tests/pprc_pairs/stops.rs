//! Stopping and killing servers of a pair under load: SIGTERM of either
//! side, a clean stop that records the pair in sync only when it is,
//! `kill -9` and the restart's resync of the marked tracks, and the drain
//! time.

use super::*;

/// 4 KiB writes, up to 32 in flight, each block once with data derived
/// from its number (paced: a 64 MiB volume takes several seconds), until
/// `argv[2]` seconds have passed, a write fails (a server shutting down
/// answers ESHUTDOWN; what is in flight is still awaited) or the
/// connection ends. Prints one
/// JSON object: the blocks whose write was acknowledged, and the errors
/// (errno names) the others got.
const WRITE_UNTIL_GONE: &str = r#"
import errno, hashlib, json, nbd, random, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
end = time.time() + float(sys.argv[2])
def data(b):
    return hashlib.sha256(str(b).encode()).digest() * 128
blocks = list(range(h.get_size() // 4096))
random.Random(7).shuffle(blocks)
acked, errors, pending = [], {}, {}
def reap():
    for b, c in list(pending.items()):
        try:
            if h.aio_command_completed(c):
                acked.append(b)
                del pending[b]
        except nbd.Error as e:
            name = errno.errorcode.get(e.errnum, e.string) if e.errnum else e.string
            errors[name] = errors.get(name, 0) + 1
            del pending[b]
try:
    while time.time() < end and blocks and not errors:
        while len(pending) < 32 and blocks:
            b = blocks.pop()
            pending[b] = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data(b))), b * 4096)
        h.poll(-1)
        reap()
        time.sleep(0.002)
    while h.aio_in_flight() > 0:
        h.poll(-1)
        reap()
    h.flush()
    h.shutdown()
except nbd.Error as e:
    pass
reap()
print(json.dumps({"acked": acked, "errors": errors, "lost": len(pending)}))
"#;

/// Reads the given 4 KiB blocks of an export and returns those whose
/// content is not the data [`WRITE_UNTIL_GONE`] wrote there.
const MISSING_BLOCKS: &str = r#"
import hashlib, json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
blocks = json.loads(sys.stdin.read())
missing = [b for b in blocks if h.pread(4096, b * 4096) != hashlib.sha256(str(b).encode()).digest() * 128]
print(json.dumps(missing))
"#;

fn missing_blocks(essd: &Essd, export: &str, blocks: &serde_json::Value) -> Vec<u64> {
    check_blocks(MISSING_BLOCKS, essd, export, blocks)
}

/// Starts [`WRITE_UNTIL_GONE`] against `export` for at most `secs`.
fn spawn_writer(
    essd: &Essd,
    export: &str,
    secs: &str,
) -> std::thread::JoinHandle<serde_json::Value> {
    let (uri, secs) = (essd.uri(export), secs.to_string());
    std::thread::spawn(move || {
        serde_json::from_str(&python(WRITE_UNTIL_GONE, &[&uri, &secs])).unwrap()
    })
}

/// A primary stopped with SIGTERM (`systemctl stop`) while a host writes
/// to its duplex volume: the requests received before the signal are
/// served and mirrored (the links stay up until they are), later ones are
/// answered `ESHUTDOWN`, never `EIO`; every write the host saw
/// acknowledged is on the secondary; the restarted primary comes back
/// `primary restarted`, resynchronises by itself and ends equal.
#[test]
fn sigterm_of_a_duplex_primary_under_load_loses_nothing() {
    let mut s = Sites::start("pprc-term-primary", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    let writer = spawn_writer(&s.a, &va, "20");
    wait_writes(&s.a, &va, 200);
    assert_eq!(s.a.terminate().code(), Some(0));
    let out = writer.join().unwrap();
    let acked = out["acked"].as_array().unwrap().len();
    assert!(acked > 100, "only {acked} writes before the signal: {out}");
    let errors = out["errors"].as_object().unwrap();
    assert!(
        errors.keys().all(|e| e == "ESHUTDOWN"),
        "the host saw errors other than ESHUTDOWN: {out}"
    );
    assert_eq!(out["lost"], 0, "requests left unanswered: {out}");
    let log = s.a.log();
    assert!(
        !log.contains("PPRC pair suspended"),
        "the pair suspended during the stop:\n{log}"
    );
    let missing = missing_blocks(&s.b, &vb, &out["acked"]);
    assert!(
        missing.is_empty(),
        "{} of {acked} acknowledged writes are not on the secondary",
        missing.len()
    );
    s.a.restart("TSTA1");
    let v = show(&s.a, &va);
    assert!(
        matches!(
            (v["state"].as_str(), v["reason"].as_str()),
            (Some("suspended"), Some("primary restarted"))
                | (Some("duplex pending" | "duplex"), None)
        ),
        "{v}"
    );
    wait_state(&s.a, &va, "duplex");
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// A secondary stopped with SIGTERM while a host writes to its primary:
/// the host sees no error (the pair is not critical), the primary suspends
/// and records the changes, saying that the secondary's server shut down
/// (it answered what it had received and said goodbye); once the secondary is back and the path up,
/// its server says suspended and not current (it was told, although no
/// link was left when the primary suspended), not duplex; a resume copies
/// the changes and the volumes end equal.
#[test]
fn sigterm_of_a_secondary_under_load_leaves_both_sides_truthful() {
    let mut s = Sites::start("pprc-term-secondary", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    let writer = spawn_writer(&s.a, &va, "4");
    wait_writes(&s.a, &va, 200);
    assert_eq!(s.b.terminate().code(), Some(0));
    let v = wait_state(&s.a, &va, "suspended");
    assert_eq!(v["reason"], "link lost", "{v}");
    let detail = v["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("peer server shut down"),
        "the primary does not say that its secondary's server shut down: {v}"
    );
    let out = writer.join().unwrap();
    assert_eq!(out["errors"], serde_json::json!({}), "{out}");
    assert_eq!(out["lost"], 0, "{out}");
    s.b.restart("TSTB2");
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = show(&s.b, &vb);
        if v["state"] == "suspended" {
            assert_eq!(v["reason"], "link lost", "{v}");
            assert_eq!(v["replication_status"], "not current", "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary still says {} / {} while its primary is suspended: {v}",
            v["state"],
            v["replication_status"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(show(&s.a, &va)["state"], "suspended");
    essctl(&s.a, &["pprc", "resume", &va]).ok();
    wait_duplex(&s.a, &va);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// A duplex pair of 0x10/0 in `s`, then 300 of its 1024 tracks written
/// (every 64-track region of the bitmap) and flushed by a host; returns
/// the tracks.
fn duplex_then_written(s: &Sites, va: &str, vb: &str) -> Vec<u64> {
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", va, vb, "--mode", "nocopy"]).ok();
    wait_state(&s.a, va, "duplex");
    let tracks = write_tracks(&s.a, va, 41, 300);
    let regions: BTreeSet<u64> = tracks.iter().map(|t| t / 64).collect();
    assert_eq!(regions.len(), 16, "{tracks:?}");
    tracks
}

/// After [`restart_and_resync`]: the restart found at least the
/// `written` tracks marked, the resync sent at least their data, and
/// the primary `pair.0` and its secondary `pair.1` are equal.
fn written_tracks_resent(
    s: &Sites,
    pair: (&str, &str),
    at_restart: &serde_json::Value,
    resent: u64,
    written: usize,
) {
    let marked = at_restart["out_of_sync_tracks"].as_u64().unwrap();
    assert!(marked >= written as u64, "{at_restart}");
    assert!(
        resent >= written as u64 * 4096,
        "the resync sent only {resent} bytes for {marked} tracks"
    );
    assert_eq!(volume_sha(&s.a, pair.0), volume_sha(&s.b, pair.1));
}

/// A duplex primary stopped cleanly (SIGTERM, as `systemctl restart`
/// does) right after writes to every region of its volume: the stop
/// flushes both volumes and records the pair in sync, so the restart
/// comes back `primary restarted` with no track out of sync, resumes by
/// itself and is duplex having sent no data; the volumes are equal.
#[test]
fn a_clean_stop_of_a_duplex_primary_leaves_nothing_to_resync() {
    let mut s = Sites::start("pprc-clean-stop", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    duplex_then_written(&s, &va, &vb);
    assert_eq!(s.a.terminate().code(), Some(0));
    let log = s.a.log();
    let (at_restart, resent) = restart_and_resync(&mut s, &va, Some("primary restarted"));
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
    assert_eq!(at_restart["out_of_sync_tracks"], 0, "{at_restart}");
    assert!(
        resent < TRACK,
        "the resync after a clean restart sent {resent} bytes"
    );
    assert!(
        log.contains("PPRC pair stopped in sync"),
        "not recorded in sync:\n{log}"
    );
}

/// A duplex primary killed with SIGKILL right after writes to every
/// region: nothing was recorded in sync, so the restart finds every
/// written track still marked and its resync copies them; the volumes
/// end equal.
#[test]
fn a_kill_9_of_a_duplex_primary_resyncs_its_marked_tracks() {
    let mut s = Sites::start("pprc-kill-marks", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let tracks = duplex_then_written(&s, &va, &vb);
    s.a.crash();
    let (at_restart, resent) = restart_and_resync(&mut s, &va, Some("primary restarted"));
    written_tracks_resent(&s, (&va, &vb), &at_restart, resent, tracks.len());
}

/// A duplex primary stopped cleanly after its secondary became
/// unreachable (every link cut): the pair has suspended (`link lost`)
/// and is not recorded in sync; it comes back suspended with the written
/// tracks still marked, and a resume copies them once the links are back;
/// the volumes end equal.
#[test]
fn a_clean_stop_with_the_secondary_unreachable_keeps_the_marks() {
    let mut s = Sites::start("pprc-stop-cut", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let tracks = duplex_then_written(&s, &va, &vb);
    s.proxy.drop_all();
    wait_state(&s.a, &va, "suspended");
    assert_eq!(s.a.terminate().code(), Some(0));
    let log = s.a.log();
    assert!(!log.contains("PPRC pair stopped in sync"), "{log}");
    let (at_restart, resent) = restart_and_resync(&mut s, &va, Some("link lost"));
    written_tracks_resent(&s, (&va, &vb), &at_restart, resent, tracks.len());
}

/// A duplex primary recorded in sync at a clean stop still asks its
/// secondary at the restart: the recovery site terminated the secondary
/// and hosts wrote it meanwhile, so the pair stays suspended, the volume
/// there is in no pair and its data is untouched.
#[test]
fn a_pair_stopped_in_sync_does_not_resync_a_secondary_terminated_meanwhile() {
    let mut s = Sites::start("pprc-clean-stop-terminated", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    duplex_then_written(&s, &va, &vb);
    assert_eq!(s.a.terminate().code(), Some(0));
    assert!(s.a.log().contains("PPRC pair stopped in sync"));
    let recovery = take_over_at_the_recovery_site(&s, &vb);
    s.a.restart("TSTA1");
    let pa = recovery_site_kept(&s, &va, &vb, &recovery);
    assert_eq!(pa["state"], "suspended", "{pa}");
    assert_eq!(pa["reason"], "primary restarted", "{pa}");
}

/// A duplex primary stopped cleanly while its link is stalled (the
/// secondary's server neither answers nor breaks the link): the stop's
/// FLUSH to the secondary goes unanswered, so the pair must not be
/// recorded in sync. The stop ends within a bounded time (the link's
/// timeout, not the stall), and the restart finds the written tracks
/// marked; its resync copies them and the volumes end equal.
#[test]
fn a_clean_stop_whose_flush_to_the_secondary_goes_unanswered_keeps_the_marks() {
    let mut s = Sites::start("pprc-stop-stalled", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let tracks = duplex_then_written(&s, &va, &vb);
    s.proxy.stall();
    let started = Instant::now();
    let status = s.a.terminate();
    let took = started.elapsed();
    let log = s.a.log();
    assert!(
        took < Duration::from_secs(15),
        "the stop took {took:?} ({status:?}):\n{log}"
    );
    assert!(!log.contains("PPRC pair stopped in sync"), "{log}");
    assert!(
        log.contains("PPRC pair keeps its recorded tracks"),
        "the stop did not try to flush the secondary:\n{log}"
    );
    let (at_restart, resent) = restart_and_resync(&mut s, &va, None);
    written_tracks_resent(&s, (&va, &vb), &at_restart, resent, tracks.len());
}

/// A duplex primary stopped while a host write waits longer than the
/// drain time (`server.drain_timeout = "2s"`; the link is stalled and the
/// replication timeout is 60 s): the stop goes on after the drain time,
/// says so, and does not record the pair in sync — the write may still
/// change the primary — so it ends within a bounded time, the host never
/// sees the write acknowledged, and the restart finds the written tracks
/// marked; its resync copies them and the volumes end equal.
#[test]
fn a_stop_whose_host_write_outlasts_the_drain_time_keeps_the_marks() {
    let mut s = Sites::start("pprc-stop-undrained", |cfg| {
        with_timeout(cfg, "60s");
        cfg.server_extra = "drain_timeout = \"2s\"\n".into();
    });
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let tracks = duplex_then_written(&s, &va, &vb);
    s.proxy.stall();
    let mut host = spawn_write(&s.a, &va, 7 * TRACK, 0xD7);
    wait_client(&s.a, &va);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(host.try_wait().unwrap(), None, "the write did not wait");
    let started = Instant::now();
    let status = s.a.terminate_within(Duration::from_secs(30));
    let took = started.elapsed();
    let log = s.a.log();
    assert!(status.success(), "{status}:\n{log}");
    assert!(took >= Duration::from_secs(2), "the stop took {took:?}");
    assert!(
        log.contains("some connections did not finish within 2s (server.drain_timeout)"),
        "{log}"
    );
    assert!(!log.contains("PPRC pair stopped in sync"), "{log}");
    assert_eq!(wait_child(&mut host, 10), Some(false), "the host's write");
    let (at_restart, resent) = restart_and_resync(&mut s, &va, Some("primary restarted"));
    written_tracks_resent(&s, (&va, &vb), &at_restart, resent, tracks.len());
}

/// 4 KiB writes of data derived from each block's number, 32 in flight,
/// cycling over the volume, that go on after errors (ESHUTDOWN) until
/// `argv[2]` seconds have passed or the server closes the connection.
/// Prints one JSON object: the blocks whose write was acknowledged, and
/// the errors (errno names) the others got.
const WRITE_PAST_SHUTDOWN: &str = r#"
import errno, hashlib, json, nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
end = time.time() + float(sys.argv[2])
def data(b):
    return hashlib.sha256(str(b).encode()).digest() * 128
count = h.get_size() // 4096
acked, errors, pending, n = set(), {}, {}, 0
def reap():
    for c, b in list(pending.items()):
        try:
            if h.aio_command_completed(c):
                acked.add(b)
                del pending[c]
        except nbd.Error as e:
            name = errno.errorcode.get(e.errnum, e.string) if e.errnum else e.string
            errors[name] = errors.get(name, 0) + 1
            del pending[c]
try:
    while time.time() < end:
        while len(pending) < 32:
            b = (n * 7919) % count
            n += 1
            c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data(b))), b * 4096)
            pending[c] = b
        h.poll(-1)
        reap()
        time.sleep(0.002)
except nbd.Error as e:
    errors["closed"] = 1
reap()
print(json.dumps({"acked": sorted(acked), "errors": errors}))
"#;

/// A duplex primary stopped cleanly while a host keeps writing after it
/// was answered ESHUTDOWN: the host is cut off after the shutdown grace,
/// so the stop ends within a bounded time. Whatever the stop recorded,
/// it is true: every write the host saw acknowledged is on the secondary,
/// and after the restart and its resync (of nothing, if the pair was
/// recorded in sync) the volumes are equal.
#[test]
fn a_clean_stop_with_a_host_that_keeps_writing_is_bounded_and_truthful() {
    let mut s = Sites::start("pprc-stop-busy-host", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.a, &va, "duplex");
    let (uri, secs) = (s.a.uri(&va), "30".to_string());
    let writer = std::thread::spawn(move || {
        serde_json::from_str::<serde_json::Value>(&python(WRITE_PAST_SHUTDOWN, &[&uri, &secs]))
            .unwrap()
    });
    wait_writes(&s.a, &va, 200);
    let started = Instant::now();
    assert_eq!(s.a.terminate().code(), Some(0));
    let took = started.elapsed();
    let out = writer.join().unwrap();
    assert!(
        took < Duration::from_secs(12),
        "the stop took {took:?}: {}",
        out["errors"]
    );
    assert!(
        out["errors"]["ESHUTDOWN"].as_u64() > Some(0),
        "the host did not go on after ESHUTDOWN: {}",
        out["errors"]
    );
    let acked = out["acked"].as_array().unwrap().len();
    assert!(acked > 100, "only {acked} writes before the signal");
    let missing = missing_blocks(&s.b, &vb, &out["acked"]);
    assert!(
        missing.is_empty(),
        "{} of {acked} acknowledged writes are not on the secondary",
        missing.len()
    );
    let in_sync = s.a.log().contains("PPRC pair stopped in sync");
    let (at_restart, _) = restart_and_resync(&mut s, &va, Some("primary restarted"));
    if in_sync {
        assert_eq!(at_restart["out_of_sync_tracks"], 0, "{at_restart}");
    }
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// Two servers that mirror to each other (pairs both ways), both killed
/// with SIGKILL after writes on every primary and restarted: each
/// restarted primary resyncs its pairs by itself while the other does
/// the same, and every pair is duplex again, its volumes equal. The links
/// are held (stalled) until both servers are up and both have a link
/// waiting, then let through at once with 300 ms each way: both servers
/// ask the other to take their pairs back at the same moment, and each
/// request arrives while the other's is in flight.
#[test]
fn both_servers_of_pairs_both_ways_killed_and_restarted_resync_by_themselves() {
    let (mut s, pairs) = active_active("pprc-kill-both");
    s.a.crash();
    s.b.crash();
    wait_until("the links through the proxies stay open", || {
        s.proxy.connections() == 0 && s.back.connections() == 0
    });
    s.proxy.stall();
    s.back.stall();
    s.a.restart("TSTA1");
    s.b.restart("TSTB2");
    wait_until("no link waits at the proxies", || {
        s.proxy.connections() > 0 && s.back.connections() > 0
    });
    for proxy in [&s.proxy, &s.back] {
        proxy.heal();
        proxy.delay(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(3));
    s.proxy.heal();
    s.back.heal();
    all_duplex_and_equal(&s, &pairs, Duration::from_secs(20), "after both restarted");
}

/// After a `kill -9` of its primary's server, a pair that was mirroring
/// comes back suspended (`primary restarted`) and resynchronises by
/// itself once its path is up. Until then a critical pair takes no host
/// write on the primary alone: a write waits for the restart's resync;
/// if the path stays down it is answered per the critical-mode table —
/// `EIO` for a critical pair with no live link and for a critical pair on
/// a critical heavy LSS, while a plain pair takes it and records it. With
/// the path up, every write is taken and reaches the secondary.
#[test]
fn after_a_restart_critical_pairs_take_no_write_their_secondary_cannot_get() {
    let mut s = Sites::start("pprc-critical-restart", |cfg| {
        cfg.lss_extra = vec![(0x11, "critical_heavy = true".into())];
    });
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    path(&s.a, "0x11", "TSTB2", "0x11", "1");
    let pairs = [
        (s.a.vol(0x10, 0), s.b.vol(0x10, 0), false),
        (s.a.vol(0x10, 1), s.b.vol(0x10, 1), true),
        (s.a.vol(0x11, 0), s.b.vol(0x11, 0), true),
    ];
    for (va, vb, critical) in &pairs {
        let mut args = vec!["pprc", "establish", va, vb, "--mode", "nocopy"];
        if *critical {
            args.push("--critical");
        }
        essctl(&s.a, &args).ok();
    }
    for link_up in [false, true] {
        if !link_up {
            s.proxy.drop_all();
        }
        s.a.kill_and_restart("TSTA1");
        let answers: Vec<String> = pairs.iter().map(|(va, _, _)| try_write(&s.a, va)).collect();
        let want = if link_up {
            ["writable ok"; 3]
        } else {
            ["writable ok", "writable EIO", "writable EIO"]
        };
        assert_eq!(answers, want, "the path up after the restart: {link_up}");
        for (va, _, critical) in &pairs {
            let p = show(&s.a, va);
            if link_up {
                assert_ne!(p["write_inhibited"], true, "{p}");
            } else {
                assert_eq!(
                    (
                        p["state"].as_str(),
                        p["reason"].as_str(),
                        &p["write_inhibited"]
                    ),
                    (
                        Some("suspended"),
                        Some("primary restarted"),
                        &serde_json::json!(critical)
                    ),
                    "{p}"
                );
            }
        }
        s.proxy.heal();
        for (va, vb, _) in &pairs {
            if !link_up {
                path(&s.a, "0x10", "TSTB2", "0x10", "1");
                path(&s.a, "0x11", "TSTB2", "0x11", "1");
                essctl(&s.a, &["pprc", "resume", va]).ok();
            }
            wait_duplex(&s.a, va);
            assert_eq!(
                volume_sha(&s.a, va),
                volume_sha(&s.b, vb),
                "{va}, path up {link_up}"
            );
        }
    }
}

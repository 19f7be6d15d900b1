//! A pair's life at the operator's hand: establish (full copy, no copy,
//! out-of-sync tracks only), secondary protection, suspend and resume from
//! either side, terminate from either side, paths in use, names and
//! replication status, and what survives a restart of either server.

use super::*;

/// Rewrites the 4 KiB at `argv[2]` every 50 ms for `argv[3]` seconds,
/// never flushing; prints how many writes.
const KEEP_BUSY: &str = r#"
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
end, n = time.time() + float(sys.argv[3]), 0
while time.time() < end:
    h.pwrite(bytes([n % 251]) * 4096, int(sys.argv[2]))
    n += 1
    time.sleep(0.05)
h.shutdown()
print(n)
"#;

#[test]
fn pairs_copy_mirror_suspend_resync_and_terminate() {
    let s = Sites::start("pprc-pairs", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (pa, pb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    fill(a, &pa, s.dir_a.path(), 16, 1);

    // No path yet.
    essctl(a, &["pprc", "establish", &pa, &pb])
        .refused("no path 0x10 → TSTB2 0x10; establish one first (essctl pprc path establish)");
    path(a, "0x10", "TSTB2", "0x10", "2");
    path(a, "0x11", "TSTB2", "0x11", "1");
    // The secondary must be at least as large.
    essctl(a, &["pprc", "establish", &a.vol(0x11, 0), &b.vol(0x11, 1)]).refused(&format!(
        "TSTB2 refused: secondary {} (33554432 bytes) is smaller than primary {} (67108864 bytes)",
        b.vol(0x11, 1),
        a.vol(0x11, 0)
    ));

    // Initial copy; the 48 MiB of holes are sent as zeroing, not data.
    let primary_file = s.dir_a.path().join("vol-10-0.img");
    let secondary_file = s.dir_b.path().join("vol-10-0.img");
    let filled = cached_pages(&primary_file);
    assert!(filled > 1000, "{filled} pages of the primary cached");
    s.proxy.reset_counters();
    // A slow link keeps the pair duplex pending for a while: a wait with
    // a short timeout gives up with exit code 5.
    s.proxy.delay(Duration::from_millis(150));
    let out = essctl(a, &["pprc", "establish", &pa, &pb]);
    assert!(out.ok().contains("duplex pending"), "{out:?}");
    let timed_out = essctl(
        a,
        &[
            "pprc",
            "wait",
            &pa,
            "--interval",
            "0.002",
            "--timeout",
            "0.3",
        ],
    );
    assert_eq!(timed_out.code, 5, "{timed_out:?}");
    assert!(
        timed_out.stderr.contains(&format!(
            "timed out after 0.3 s waiting for {pa} → TSTB2 {pb}"
        )),
        "{timed_out:?}"
    );
    s.proxy.heal();
    wait_duplex(a, &pa);
    let sent = s.proxy.bytes_forward();
    assert!(
        (16 << 20..20 << 20).contains(&sent),
        "initial copy sent {sent} bytes for 16 MiB of data"
    );
    // The copy leaves neither volume in the page cache: the copier drops
    // what it read, the secondary drops what it wrote once the copy is
    // done (small writes into the large folios a copy leaves are slow).
    wait_uncached(&primary_file, "the primary after its copy");
    wait_uncached(&secondary_file, "the secondary after its copy");
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));
    let view = show(a, &pa);
    assert_eq!(view["role"], "primary");
    assert_eq!(view["replication_status"], "current");
    assert_eq!(view["out_of_sync_tracks"], 0);
    assert!(view["copy_completed"].is_string(), "{view}");
    let side = wait_state(b, &pb, "duplex");
    assert_eq!(side["role"], "secondary");
    assert_eq!(side["peer_volume"], pa.as_str());

    // Already in a pair, from either side.
    essctl(a, &["pprc", "establish", &pa, &b.vol(0x10, 1)]).refused(&format!(
        "volume {pa} is already the primary of a pair with TSTB2 {pb} (duplex)"
    ));
    essctl(a, &["pprc", "establish", &pa, &pb]).refused(&format!(
        "volume {pa} is already the primary of a pair with TSTB2 {pb} (duplex)"
    ));
    essctl(a, &["pprc", "establish", &a.vol(0x10, 1), &pb]).refused(&format!(
        "TSTB2 refused: volume {pb} is already the secondary of a pair with TSTA1 {pa}"
    ));

    // An idle duplex pair with nothing out of sync sends nothing: the
    // cleaner does not flush the secondary when it has no mark to clear.
    let idle_from = view["bytes_sent"].as_u64().unwrap();
    std::thread::sleep(CLEAN_INTERVAL * 2 + Duration::from_millis(500));
    assert_eq!(show(a, &pa)["bytes_sent"].as_u64().unwrap(), idle_from);

    // Duplex: every acknowledged write is on the secondary (checksums
    // below). While the volume is being written, idle tracks keep their marks: the
    // cleaner does not have both volumes written back every pass. A writer
    // keeps rewriting one track (never flushing) for four cleaning
    // intervals; once its mark is there, a host flush (the last flush of
    // both volumes) and then five tracks written once, not flushed.
    let busy_track = 1000;
    let keep_busy = {
        let uri = a.uri(&pa);
        let seconds = (CLEAN_INTERVAL * 4).as_secs_f64().to_string();
        let offset = (busy_track * TRACK).to_string();
        std::thread::spawn(move || python(KEEP_BUSY, &[&uri, &offset, &seconds]))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !durable_marks(a, &pa).contains(&busy_track) {
        assert!(
            Instant::now() < deadline,
            "the busy track never got its mark"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let flushed = write_tracks(a, &pa, 6, 1);
    let written = write_tracks_then(a, &pa, 7, 5, "noflush");
    assert!(!written.contains(&busy_track), "{written:?}");
    // Each written track was marked durably before it was written — with
    // the rest of its 64-track region, so the next writes there need no
    // bitmap commit.
    let regions: BTreeSet<u64> = written
        .iter()
        .chain(&flushed)
        .chain([&busy_track])
        .flat_map(|t| t / 64 * 64..t / 64 * 64 + 64)
        .collect();
    assert_eq!(durable_marks(a, &pa), regions);
    let rewrites: u64 = keep_busy.join().unwrap().trim().parse().unwrap();
    assert!(rewrites > 20, "{rewrites} rewrites");
    let marks = durable_marks(a, &pa);
    assert!(
        written.iter().all(|t| marks.contains(t)),
        "marks of idle tracks cleared while the volume was busy: {written:?} not all in {marks:?}"
    );
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));
    // Once the volume is idle, the cleaner flushes both volumes and clears
    // the marks (duplex reports 0 out of sync either way: the bitmap file
    // is what holds them). Both flushed: a power loss of the primary must
    // not undo writes the secondary keeps once their tracks are unmarked.
    let deadline = Instant::now() + CLEAN_INTERVAL * 4 + Duration::from_secs(5);
    while !durable_marks(a, &pa).is_empty() {
        assert!(Instant::now() < deadline, "marks never cleared");
        std::thread::sleep(Duration::from_millis(100));
    }
    for file in [&primary_file, &secondary_file] {
        assert_eq!(unwritten_pages(file), 0, "{} not flushed", file.display());
    }

    // The secondary is protected: read-only to hosts, and shown so.
    assert_eq!(try_write(b, &pb), "read-only EPERM");
    let shown = essctl_json(b, &["volume", "show", &pb]);
    assert_eq!(
        (shown["read_only"].clone(), shown["pprc_secondary"].clone()),
        (false.into(), true.into())
    );
    let listed = essctl(b, &["volume", "list"]);
    let row = listed
        .ok()
        .lines()
        .find(|l| l.starts_with(pb.as_str()))
        .expect("secondary listed");
    assert!(row.contains("yes (PPRC secondary)"), "{row}");

    // Suspend, change 1% of the tracks, resync: ~1% crosses the link.
    // The secondary drops its cached pages when the pair suspends (the
    // checksums above read them all), so the resync writes new ones.
    let cached = cached_pages(&secondary_file);
    assert!(cached > 1000, "{cached} pages of the secondary cached");
    let v = essctl(a, &["--json", "pprc", "suspend", &pa]).json();
    assert_eq!(v["state"], "suspended");
    assert_eq!(v["reason"], "manual");
    essctl(a, &["pprc", "establish", &pa, &pb]).refused(&format!(
        "volume {pa} is already the primary of a pair with TSTB2 {pb} (suspended); \
         resume it with mode resync"
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while cached_pages(&secondary_file) > 0 {
        assert!(
            Instant::now() < deadline,
            "the suspended secondary still has {} of {cached} pages cached",
            cached_pages(&secondary_file)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    write_tracks(a, &pa, 8, 10);
    let v = show(a, &pa);
    assert_eq!(v["out_of_sync_tracks"], 10, "{v}");
    assert_eq!(v["replication_status"], "not current");
    assert_ne!(volume_sha(a, &pa), volume_sha(b, &pb));
    // Waiting for a suspended pair fails at once.
    essctl(a, &["pprc", "wait", &pa, "--timeout", "30"])
        .refused(&format!("pair {pa} → TSTB2 {pb} is suspended (manual)"));
    s.proxy.reset_counters();
    essctl(a, &["pprc", "resume", &pa]).ok();
    wait_duplex(a, &pa);
    let sent = s.proxy.bytes_forward();
    // At most the 10 tracks (holes in them go as zeroing requests), at
    // least the 10 blocks written.
    assert!(
        (10 * 4096..10 * TRACK + (64 << 10)).contains(&sent),
        "resync of 10 tracks sent {sent} bytes"
    );
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));

    // Suspend from the secondary: the primary suspends at its next write.
    let v = essctl(b, &["--json", "pprc", "suspend", &pb]).json();
    assert_eq!(v["state"], "suspended");
    write_tracks(a, &pa, 9, 3);
    let v = wait_state(a, &pa, "suspended");
    assert_eq!(v["reason"], "suspended at the secondary");
    essctl(a, &["pprc", "resume", &pa]).ok();
    wait_duplex(a, &pa);
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));

    // Terminate from the primary: both sides simplex, B writable again.
    let v = essctl(a, &["--json", "pprc", "terminate", &pa]).json();
    assert_eq!(v["state"], "simplex");
    assert_eq!(essctl(a, &["pprc", "list"]).ok(), "no PPRC pairs\n");
    assert_eq!(essctl(b, &["pprc", "list"]).ok(), "no PPRC pairs\n");
    assert_eq!(try_write(b, &pb), "writable ok");
    let events = essctl(a, &["--json", "log"]).json();
    let names: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for e in [
        "pprc.pair.establish",
        "pprc.pair.suspend",
        "pprc.pair.resync",
        "pprc.pair.terminate",
    ] {
        assert!(names.contains(&e), "{e} missing from {names:?}");
    }
    assert_eq!(s.a.stop().code(), Some(0));
    assert_eq!(s.b.stop().code(), Some(0));
}

/// The redbook's split mirror: suspended (here at the backup site's
/// server), the secondary keeps its image while the primary writes on
/// (it can be read or FlashCopied meanwhile); `resume` at the primary
/// copies only the tracks changed meanwhile.
#[test]
fn a_split_mirror_is_suspended_at_the_secondary_and_resynced() {
    let s = Sites::start("pprc-split", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    write_tracks(a, &va, 51, 8);
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
    // The backup site splits the mirror: its image stays as it was.
    assert_eq!(
        essctl_json(b, &["pprc", "suspend", &vb])["state"],
        "suspended"
    );
    let split = volume_sha(b, &vb);
    write_tracks(a, &va, 52, 5);
    let v = show(a, &va);
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("suspended"), Some("suspended at the secondary")),
        "{v}"
    );
    assert_eq!(volume_sha(b, &vb), split);
    // The secondary is still protected while split.
    assert_eq!(
        essctl_json(b, &["volume", "show", &vb])["pprc_secondary"],
        true
    );
    let sent = s.proxy.bytes_forward();
    essctl(a, &["pprc", "resume", &va]).ok();
    wait_duplex(a, &va);
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
    // At most the 5 tracks changed meanwhile crossed the link.
    let resync = s.proxy.bytes_forward() - sent;
    assert!(
        resync < 5 * TRACK + (64 << 10),
        "resync sent {resync} bytes"
    );
}

/// `terminate` at the secondary ends the pair for good: hosts may write
/// the volume from then on and nothing records where, so a `resume` at the
/// primary (which would copy only the primary's changes) is refused and
/// the pair is established again with a full copy.
#[test]
fn a_pair_terminated_at_the_secondary_is_established_again_with_a_full_copy() {
    let s = Sites::start("pprc-split-terminated", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    write_tracks(a, &va, 51, 8);
    essctl(a, &["pprc", "suspend", &va]).ok();
    wait_state(b, &vb, "suspended");
    assert_eq!(
        essctl_json(b, &["pprc", "terminate", &vb])["state"],
        "simplex"
    );
    assert_eq!(
        essctl_json(b, &["volume", "show", &vb])["pprc_secondary"],
        false
    );
    // A backup host mounts the copy (a journal replay writes it).
    write_tracks(b, &vb, 61, 3);
    write_tracks(a, &va, 62, 2);
    essctl(a, &["pprc", "resume", &va]).refused(&format!(
        "TSTB2 refused: volume {vb} is no longer the secondary of TSTA1 {va} \
         (its side was terminated here and the volume may have been written since); establish \
         the pair again with mode copy"
    ));
    assert_eq!(show(a, &va)["state"], "suspended");
    essctl(a, &["pprc", "terminate", &va]).ok();
    essctl(a, &["pprc", "establish", &va, &vb, "--mode", "copy"]).ok();
    wait_duplex(a, &va);
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
}

#[test]
fn a_secondary_in_use_is_refused_unless_permitted_and_then_refuses_writes() {
    let s = Sites::start("pprc-online", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    path(a, "0x10", "TSTB2", "0x10", "1");
    // A host holds B's volume open (writable) and writes every 100 ms.
    let script = r#"
import nbd, sys, time, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("open", flush=True)
while True:
    try:
        h.pwrite(b"h" * 4096, 0)
    except nbd.Error as e:
        print(errno.errorcode[e.errnum], flush=True)
        break
    time.sleep(0.1)
"#;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), script).unwrap();
    let mut host = std::process::Command::new("/usr/bin/python3")
        .arg(file.path())
        .arg(b.uri(&vb))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(host.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "open");
    essctl(a, &["pprc", "establish", &va, &vb]).refused(&format!(
        "TSTB2 refused: secondary {vb} is in use by 1 host connection(s); establish with \
         --permit-online (API: \"permit_online\": true) to mirror to it anyway"
    ));
    essctl(a, &["pprc", "establish", &va, &vb, "--permit-online"]).ok();
    // The attached host's next write is refused: the volume is protected.
    assert_eq!(lines.next().unwrap().unwrap(), "EPERM");
    host.wait().unwrap();
    wait_duplex(a, &va);
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
}

/// A primary server TSTA1 (volumes 000–004 of LSS 0x10) and five peer
/// servers TSTB1–TSTB5 (volume 000 each), peer `n` listening on
/// `ports[n]` and configured at TSTA1 as `address(n)`.
struct FivePeers {
    a: Essd,
    peers: Vec<Essd>,
    _dirs: Vec<tempfile::TempDir>,
}

/// One site of [`a_pair_mirrors_over_ipv6_loopback`]: NBD on `[::1]`,
/// replication on `[::1]:listen`, the peer at `[::1]:peer_port`.
fn ipv6_site(
    serial: &'static str,
    listen: u16,
    peer: &str,
    peer_port: u16,
) -> (tempfile::TempDir, Essd) {
    let dir = tempdir(&format!("pprc-ipv6-{serial}"));
    let mut cfg = TestConfig::new("uring");
    cfg.serial = serial;
    cfg.tcp = true;
    cfg.tcp_address = "[::1]:0";
    cfg.volumes = vec![Vol::new(0x10, 0, "64MiB")];
    cfg.extra = format!(
        "\n[replication]\nlisten = \"[::1]:{listen}\"\nsecret = \"{SECRET}\"\n\n[[peer]]\nserial = \"{peer}\"\naddress = \"[::1]:{peer_port}\"\n"
    );
    let essd = Essd::start_in(dir.path(), &cfg);
    (dir, essd)
}

/// Servers that listen and name each other on IPv6 only: the path's
/// links come up to `[::1]`, the initial copy and the host's writes (over
/// NBD on `[::1]` too) reach the secondary, and both volumes end equal.
#[test]
fn a_pair_mirrors_over_ipv6_loopback() {
    let (port_a, port_b) = (free_port(), free_port());
    let (_dir_b, b) = ipv6_site("TSTB2", port_b, "TSTA1", port_a);
    let (dir_a, a) = ipv6_site("TSTA1", port_a, "TSTB2", port_b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    let host_uri = a.tcp_uri(&va);
    assert!(host_uri.starts_with("nbd://[::1]:"), "{host_uri}");

    let src = dir_a.path().join("fill.img");
    random_file(&src, 8 << 20, 61);
    run(std::process::Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(&host_uri));
    path(&a, "0x10", "TSTB2", "0x10", "2");
    let paths = essctl_json(&a, &["pprc", "path", "list"]);
    let shown = &paths["paths"][0];
    assert_eq!(
        (
            &shown["peer_address"],
            shown["links"].as_array().unwrap().len()
        ),
        (&format!("[::1]:{port_b}").into(), 2),
        "{paths}"
    );

    essctl(&a, &["pprc", "establish", &va, &vb]).ok();
    wait_duplex(&a, &va);
    let tracks = python(WRITE_TRACKS, &[&host_uri, "62", "40", "flush"]);
    assert_eq!(tracks.split_whitespace().count(), 40, "{tracks}");
    let v = show(&a, &va);
    assert_eq!(
        (&v["state"], &v["replication_status"]),
        (&"duplex".into(), &"current".into()),
        "{v}"
    );
    assert_eq!(volume_sha(&a, &va), volume_sha(&b, &vb));
}

const FIVE_PEERS: [&str; 5] = ["TSTB1", "TSTB2", "TSTB3", "TSTB4", "TSTB5"];

fn five_peers(ports: &[u16; 5], address: impl Fn(usize) -> SocketAddr) -> FivePeers {
    let mut dirs = Vec::new();
    let mut peers = Vec::new();
    for (serial, port) in FIVE_PEERS.iter().zip(ports) {
        let dir = tempdir("pprc-peer");
        let mut cfg = TestConfig::new("uring");
        cfg.serial = serial;
        cfg.volumes = vec![Vol::new(0x10, 0, "16MiB")];
        cfg.extra =
            format!("\n[replication]\nlisten = \"127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\n");
        peers.push(Essd::start_in(dir.path(), &cfg));
        dirs.push(dir);
    }
    let dir = tempdir("pprc-fan-out");
    let mut cfg = TestConfig::new("uring");
    cfg.serial = "TSTA1";
    cfg.volumes = (0..5).map(|n| Vol::new(0x10, n, "16MiB")).collect();
    cfg.extra = format!("\n[replication]\nsecret = \"{SECRET}\"\n");
    for (n, serial) in FIVE_PEERS.iter().enumerate() {
        cfg.extra += &format!(
            "\n[[peer]]\nserial = \"{serial}\"\naddress = \"{}\"\n",
            address(n)
        );
    }
    let a = Essd::start_in(dir.path(), &cfg);
    dirs.push(dir);
    FivePeers {
        a,
        peers,
        _dirs: dirs,
    }
}

/// The arguments of `essctl` establishing TSTA1's volume `n` with peer
/// `n`'s volume 000, no copy.
fn establish_with_peer(a: &Essd, n: usize) -> Vec<String> {
    [
        "pprc",
        "establish",
        &a.vol(0x10, n as u8),
        &format!("000{}", FIVE_PEERS[n]),
        "--mode",
        "nocopy",
    ]
    .map(String::from)
    .to_vec()
}

fn pair_count(a: &Essd) -> usize {
    essctl_json(a, &["pprc", "list"])["pairs"]
        .as_array()
        .unwrap()
        .len()
}

const FIVE_PEERS_REFUSAL: &str = "this server already mirrors to 4 peers (TSTB1, TSTB2, TSTB3, TSTB4); a primary server mirrors to at most 4";

#[test]
fn a_primary_server_mirrors_to_at_most_four_peers() {
    let ports = [(); 5].map(|()| free_port());
    let f = five_peers(&ports, |n| {
        format!("127.0.0.1:{}", ports[n]).parse().unwrap()
    });
    for (n, serial) in FIVE_PEERS.iter().enumerate() {
        path(&f.a, "0x10", serial, "0x10", "1");
        let args = establish_with_peer(&f.a, n);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if n < 4 {
            essctl(&f.a, &args).ok();
        } else {
            essctl(&f.a, &args).refused(FIVE_PEERS_REFUSAL);
        }
    }
    // The fifth pair was not made.
    assert_eq!(pair_count(&f.a), 4);
}

/// Two establishes with a fourth and a fifth peer at once, each waiting
/// on its secondary's answer (links delayed 300 ms each way): the limit
/// of four peers is checked again once the secondary answered, so one of
/// them is made and the other refused, and its secondary's side is ended
/// again (its volume is in no pair).
#[test]
fn establishes_with_two_new_peers_at_once_stay_within_four_peers() {
    let ports = [(); 5].map(|()| free_port());
    let slow: Vec<FaultProxy> = ports[3..]
        .iter()
        .map(|port| FaultProxy::start(format!("127.0.0.1:{port}").parse().unwrap()))
        .collect();
    let f = five_peers(&ports, |n| match n {
        3 | 4 => slow[n - 3].addr(),
        _ => format!("127.0.0.1:{}", ports[n]).parse().unwrap(),
    });
    for (n, serial) in FIVE_PEERS.iter().enumerate() {
        path(&f.a, "0x10", serial, "0x10", "1");
        if n < 3 {
            let args = establish_with_peer(&f.a, n);
            essctl(&f.a, &args.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        }
    }
    for proxy in &slow {
        proxy.delay(Duration::from_millis(300));
    }
    let runs: Vec<_> = std::thread::scope(|scope| {
        let started: Vec<_> = [3, 4]
            .map(|n| {
                let (a, args) = (&f.a, establish_with_peer(&f.a, n));
                scope.spawn(move || essctl(a, &args.iter().map(String::as_str).collect::<Vec<_>>()))
            })
            .into_iter()
            .collect();
        started.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let made: Vec<usize> = (0..2).filter(|&i| runs[i].code == 0).collect();
    assert_eq!(made.len(), 1, "exactly one establish is made: {runs:?}");
    let refused = &runs[1 - made[0]];
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("mirrors to at most 4"),
        "{refused:?}"
    );
    assert_eq!(pair_count(&f.a), 4);
    // The refused establish's secondary is in no pair.
    let loser = &f.peers[3 + (1 - made[0])];
    let deadline = Instant::now() + Duration::from_secs(10);
    while pair_count(loser) != 0 {
        assert!(
            Instant::now() < deadline,
            "{}",
            essctl_json(loser, &["pprc", "list"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The copier ends with a cleaning pass (a flush of both sides) before the
/// pair turns duplex: a suspend during that pass stands, and the writes
/// made on the primary alone after it are resynced, not forgotten.
#[test]
fn a_suspend_during_the_copys_last_flush_stays_suspended() {
    let s = Sites::start("pprc-copy-end", |cfg| with_timeout(cfg, "10s"));
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    essctl(a, &["pprc", "establish", &v, &sv, "--mode", "nocopy"]).ok();
    essctl(a, &["pprc", "suspend", &v]).ok();
    write_tracks(a, &v, 11, 3);
    // A slow link: each round trip takes about 3 s.
    s.proxy.delay(Duration::from_millis(1500));
    essctl(a, &["pprc", "resume", &v]).ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = show(a, &v);
        if p["state"] == "duplex pending" && p["out_of_sync_tracks"] == 0 {
            break;
        }
        assert!(p["state"] == "duplex pending", "{p}");
        assert!(Instant::now() < deadline, "{p}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Everything is copied; the copier's last flush is under way.
    let p = essctl_json(a, &["pprc", "suspend", &v]);
    assert_eq!(p["state"], "suspended", "{p}");
    write_tracks(a, &v, 12, 2);
    std::thread::sleep(Duration::from_secs(8));
    s.proxy.delay(Duration::ZERO);
    let p = show(a, &v);
    assert_eq!(
        p["state"], "suspended",
        "suspended by the operator during the copy's last flush: {p}"
    );
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv), "after the resync");
}

/// A copy of tracks 0..16 (data, hole, data; each request takes about 3 s
/// over the slow link) with a host write to track 2 waiting for the copy's
/// track lock while it holds the volume's gate; then `terminate`, which
/// takes the gate exclusively. Returns the volume, the host write and
/// essctl terminate's output when it comes.
fn copy_write_terminate(
    s: &Sites,
) -> (
    String,
    std::process::Child,
    std::sync::mpsc::Receiver<std::io::Result<std::process::Output>>,
) {
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    assert!(spawn_write(a, &v, 0, 1).wait().unwrap().success());
    assert!(spawn_write(a, &v, 2 * TRACK, 2).wait().unwrap().success());
    s.proxy.delay(Duration::from_millis(1500));
    essctl(a, &["pprc", "establish", &v, &sv]).ok();
    std::thread::sleep(Duration::from_millis(300));
    let host = spawn_write(a, &v, 2 * TRACK + 4096, 3);
    std::thread::sleep(Duration::from_millis(700));
    let (api, volume) = (a.api_sock.clone(), v.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_essctl"))
            .arg("--server")
            .arg(&api)
            .args(["pprc", "terminate", &volume])
            .output();
        let _ = tx.send(out);
    });
    (v, host, rx)
}

/// Host writes take the volume's gate, then track locks; the copier must
/// take them in the same order. When it took the gate for each read while
/// holding its track locks, a terminate queued for the gate between them
/// made the three wait on each other for ever.
#[test]
fn terminate_during_a_copy_with_a_host_write_to_the_copied_tracks_answers() {
    let s = Sites::start("pprc-copy-gate", |cfg| with_timeout(cfg, "10s"));
    let (v, mut host, rx) = copy_write_terminate(&s);
    let answer = rx.recv_timeout(Duration::from_secs(25));
    s.proxy.delay(Duration::ZERO);
    let host_done = host.wait().unwrap();
    let answer = answer
        .expect("terminate did not answer within 25 s")
        .unwrap();
    assert!(
        answer.status.success(),
        "{}",
        String::from_utf8_lossy(&answer.stderr)
    );
    assert!(host_done.success(), "the host write failed");
    assert_eq!(show_code(&s.a, &v), 1, "{v} is still in a pair");
}

/// Sends `DELETE /v1/pprc/pairs/VOLUME` and closes the connection after
/// half a second, whether answered or not.
const IMPATIENT_TERMINATE: &str = r#"
import http.client, socket, sys
class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=0.5)
        self.path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(0.5)
        self.sock.connect(self.path)
c = Unix(sys.argv[1])
c.request("DELETE", "/v1/pprc/pairs/" + sys.argv[2])
try:
    print("answered", c.getresponse().status)
except (socket.timeout, TimeoutError):
    print("gave up")
c.close()
"#;

/// A terminate whose client goes away before the answer (the secondary
/// is slow to reach) still completes: the primary's record, the secondary's
/// side and the log all show it. Stopped half-way, it left the pair gone
/// from the primary's list but not from its record, and the secondary
/// holding its side (read-only to hosts) for good.
#[test]
fn a_terminate_whose_client_goes_away_still_completes() {
    let s = Sites::start("pprc-terminate-dropped", |cfg| with_timeout(cfg, "10s"));
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    essctl(a, &["pprc", "establish", &v, &sv, "--mode", "nocopy"]).ok();
    // Telling the secondary takes about 3 s over this link.
    s.proxy.delay(Duration::from_millis(1500));
    let out = python(IMPATIENT_TERMINATE, &[a.api_sock.to_str().unwrap(), &v]);
    assert!(out.contains("gave up"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while essctl_json(b, &["pprc", "list"])["pairs"]
        .as_array()
        .is_some_and(|p| !p.is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "the secondary still holds its side: {}",
            essctl_json(b, &["pprc", "list"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.proxy.delay(Duration::ZERO);
    assert_eq!(show_code(a, &v), 1, "{v} is still in a pair");
    let record = std::fs::read_to_string(s.dir_a.path().join("state/pprc/pairs.json")).unwrap();
    assert!(
        !record.contains(&v),
        "the primary's record still has the pair: {record}"
    );
    let log = essctl(a, &["log"]).ok().to_string();
    assert!(log.contains("pprc.pair.terminate"), "{log}");
    // The secondary is an ordinary volume again: hosts may write it.
    assert!(spawn_write(b, &sv, 0, 9).wait().unwrap().success());
}

/// A duplex write whose tracks cannot be recorded (the out-of-sync bitmap
/// file refuses the write) is refused with EIO before it is made on either
/// side, and the pair suspends with the reason; once the file can be
/// written again a resync leaves both volumes equal.
#[test]
fn a_bitmap_that_cannot_be_written_suspends_the_pair() {
    require_root("making the bitmap file immutable (chattr +i)");
    require("chattr", "e2fsprogs");
    let s = Sites::start("pprc-bitmap-fails", |_| {});
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    essctl(a, &["pprc", "establish", &v, &sv, "--mode", "nocopy"]).ok();
    let oos = s.dir_a.path().join(format!("state/pprc/{v}.oos"));
    run(std::process::Command::new("chattr").arg("+i").arg(&oos));
    let answer = try_write(a, &v);
    run(std::process::Command::new("chattr").arg("-i").arg(&oos));
    assert_eq!(answer, "writable EIO");
    let p = show(a, &v);
    assert_eq!(
        (p["state"].as_str(), p["reason"].as_str()),
        (Some("suspended"), Some("primary I/O error")),
        "{p}"
    );
    assert!(
        p["detail"].as_str().unwrap_or("").contains(".oos"),
        "the detail names the bitmap file: {p}"
    );
    assert_eq!(try_write(a, &v), "writable ok");
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
}

/// Establishes 0x10 volume 0 of A → B without copy, suspends it at B and
/// returns both volumes and the checksum of B's split image.
fn split_at_the_secondary(s: &Sites) -> (String, String, String) {
    let (va, vb) = duplex_nocopy_pair(s);
    essctl(&s.b, &["pprc", "suspend", &vb]).ok();
    let split = volume_sha(&s.b, &vb);
    (va, vb, split)
}

/// A secondary suspended at its own server stays suspended across a
/// restart of that server: the primary's next write suspends the primary
/// and the secondary's image does not change.
#[test]
fn a_suspend_at_the_secondary_survives_its_restart() {
    let mut s = Sites::start("pprc-secondary-suspend-restart", |_| {});
    let (va, vb, split) = split_at_the_secondary(&s);
    s.b.kill_and_restart("TSTB2");
    assert_eq!(show(&s.b, &vb)["state"], "suspended");
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    write_tracks(&s.a, &va, 71, 4);
    let v = show(&s.a, &va);
    assert_eq!(volume_sha(&s.b, &vb), split, "primary: {v}");
    assert_eq!(v["state"], "suspended", "{v}");
}

/// A suspend at the secondary (a split for a backup) is not undone by a
/// restart of the primary: its automatic resync is refused by the
/// secondary, and the split image stays as it was.
#[test]
fn a_primary_restart_does_not_undo_a_suspend_at_the_secondary() {
    let mut s = Sites::start("pprc-primary-restart-split", |_| {});
    let (va, vb, split) = split_at_the_secondary(&s);
    s.a.kill_and_restart("TSTA1");
    // The automatic resync is tried within a few seconds of the restart.
    std::thread::sleep(Duration::from_secs(6));
    write_tracks(&s.a, &va, 75, 4);
    let (pa, pb) = (show(&s.a, &va), show(&s.b, &vb));
    assert_eq!(volume_sha(&s.b, &vb), split, "primary {pa}, secondary {pb}");
    assert_eq!(pa["state"], "suspended", "{pa}");
    assert_eq!(pb["state"], "suspended", "{pb}");
    // The primary says why it did not resume by itself.
    assert_eq!(pa["reason"], "primary restarted", "{pa}");
    assert_eq!(
        pa["detail"],
        format!(
            "the resync after the restart failed: TSTB2 refused: secondary {vb} was suspended \
             here; resume the pair at TSTA1"
        ),
        "{pa}"
    );
}

/// `terminate` at the primary records the end of the pair before it
/// tells the secondary: a crash of the primary once the secondary has
/// ended its side does not bring the pair back at the primary's restart.
#[test]
fn a_terminate_told_to_the_secondary_is_not_undone_by_a_crash() {
    let mut s = Sites::start("pprc-terminate-crash", |cfg| with_timeout(cfg, "10s"));
    let (va, vb) = duplex_nocopy_pair(&s);
    write_tracks(&s.a, &va, 90, 4);
    // The answer takes 1.5 s to come back.
    s.proxy.delay(Duration::from_millis(1500));
    let mut terminate = spawn_essctl(&s.a, &["pprc", "terminate", &va]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while show_code(&s.b, &vb) == 0 {
        assert!(Instant::now() < deadline, "the secondary was never told");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.a.crash();
    let _ = terminate.wait();
    s.proxy.heal();
    // Hosts use the (now simplex) volume at B.
    write_tracks(&s.b, &vb, 91, 6);
    let b_data = volume_sha(&s.b, &vb);
    s.a.kill_and_restart("TSTA1");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(show_code(&s.a, &va), 1, "{}", show(&s.a, &va));
    assert_eq!(
        show_code(&s.b, &vb),
        1,
        "the pair came back at the secondary"
    );
    assert_eq!(volume_sha(&s.b, &vb), b_data, "B's data was overwritten");
}

/// A pair terminated while duplex and established again without a copy
/// (duplex at once) is shown duplex and current at the secondary too.
#[test]
fn a_pair_established_again_without_copy_is_duplex_at_the_secondary() {
    let s = Sites::start("pprc-established-again", |_| {});
    let (va, vb) = duplex_nocopy_pair(&s);
    essctl(&s.a, &["pprc", "terminate", &va]).ok();
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    assert_eq!(show(&s.a, &va)["state"], "duplex");
    let v = wait_state(&s.b, &vb, "duplex");
    assert_eq!(v["replication_status"], "current", "{v}");
}

/// A terminate whose record cannot be written changes nothing: the pair
/// goes on mirroring. (It used to detach the pair first and answer the
/// error after: hosts then wrote the primary alone, unrecorded, and the
/// restart brought the pair back from the old record and resynced only
/// its marks, so the duplex pair's volumes differed.)
#[test]
fn a_terminate_that_cannot_be_recorded_leaves_the_pair_mirroring() {
    let mut s = Sites::start("pprc-terminate-unrecorded", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    fill(&s.a, &va, s.dir_a.path(), 4, 81);
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb]).ok();
    wait_duplex(&s.a, &va);
    // The record's temporary file cannot be created.
    let blocker = block_pair_records(s.dir_a.path());
    let terminate = essctl(&s.a, &["pprc", "terminate", &va]);
    std::fs::remove_dir(&blocker).unwrap();
    assert_ne!(terminate.code, 0, "{terminate:?}");
    assert_eq!(show(&s.a, &va)["state"], "duplex", "{terminate:?}");
    write_tracks(&s.a, &va, 82, 20);
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "writes after a terminate that failed were not mirrored ({terminate:?})"
    );
    s.a.kill_and_restart("TSTA1");
    wait_state(&s.a, &va, "duplex");
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "duplex pair differs after a terminate that failed and a restart ({terminate:?})"
    );
}

/// A primary named by its alias (or its ID in lower case, as `volume show`
/// and FlashCopy accept it) is the same volume as by its ID: show, wait and
/// suspend find its pair ("volume db is not in a PPRC pair" before), and a
/// second pair on it is refused as in a pair (before, the peer refused the
/// alias it was sent as the primary's volume ID).
#[test]
fn a_primary_named_by_its_alias_is_the_volume_of_its_pair() {
    let s = Sites::start("pprc-primary-alias", |cfg| {
        cfg.volumes[0].alias = Some("db");
    });
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let vb1 = s.b.vol(0x10, 1);
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    essctl(&s.a, &["pprc", "establish", "db", &vb1, "--mode", "nocopy"]).refused(&format!(
        "volume {va} is already the primary of a pair with TSTB2 {vb} (duplex)"
    ));
    let pairs = essctl(&s.a, &["--json", "pprc", "list"]).json();
    assert_eq!(pairs["pairs"].as_array().unwrap().len(), 1, "{pairs}");
    // A host write still reaches the first pair's secondary.
    write_tracks(&s.a, &va, 7, 4);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
    let lower = va.to_ascii_lowercase();
    for name in ["db", lower.as_str()] {
        let v = show(&s.a, name);
        assert_eq!(
            (&v["volume"], &v["state"]),
            (&va.as_str().into(), &"duplex".into()),
            "{name}: {v}"
        );
        essctl(&s.a, &["pprc", "wait", name, "--timeout", "10"]).ok();
    }
    let v = essctl(&s.a, &["--json", "pprc", "suspend", "db"]).json();
    assert_eq!(
        (&v["volume"], &v["state"]),
        (&va.as_str().into(), &"suspended".into()),
        "{v}"
    );
}

/// Serials and secondary volume IDs typed in lower case are taken like
/// primaries: `pprc path establish|remove` with a lower-case peer serial
/// and `pprc establish` with a lower-case secondary work, and the pair and
/// path are shown and kept in upper case.
#[test]
fn lower_case_serials_and_secondary_ids_are_accepted() {
    let s = Sites::start("pprc-lower-case", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    essctl(
        &s.a,
        &["pprc", "path", "establish", "0x10", "tstb2", "0x10"],
    )
    .ok();
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(
        &s.a,
        &[
            "pprc",
            "establish",
            &va.to_lowercase(),
            &vb.to_lowercase(),
            "--mode",
            "nocopy",
        ],
    )
    .ok();
    assert_eq!(show(&s.a, &va)["peer_volume"], vb.as_str());
    wait_state(&s.b, &vb.to_lowercase(), "duplex");
    essctl(&s.a, &["pprc", "terminate", &va]).ok();
    essctl(&s.a, &["pprc", "path", "remove", "0x10", "tstb2", "0x10"]).ok();
    let list = essctl_json(&s.a, &["pprc", "path", "list"]);
    assert_eq!(list["paths"].as_array().unwrap().len(), 0, "{list}");
}

/// `pprc resume` given the secondary's volume at the secondary's server
/// says that a pair is resumed at its primary's server, naming the primary,
/// and changes nothing.
#[test]
fn resume_at_the_secondary_names_the_primary() {
    let s = Sites::start("pprc-resume-at-secondary", |_| {});
    let (va, vb, _) = split_at_the_secondary(&s);
    essctl(&s.b, &["pprc", "resume", &vb]).refused(&format!(
        "volume {vb} is the secondary of a pair with TSTA1 {va}; a pair is resumed at its primary's server: essctl pprc resume {va} on TSTA1"
    ));
    assert_eq!(show(&s.b, &vb)["state"], "suspended");
    // Resumed at the primary (suspended at its next write), it syncs.
    write_tracks(&s.a, &va, 91, 2);
    wait_state(&s.a, &va, "suspended");
    essctl(&s.a, &["pprc", "resume", &va]).ok();
    wait_duplex(&s.a, &va);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// A path that pairs use is not removed unless the removal is forced: the
/// refusal names the pairs (suspended ones too, which need the path to
/// resume), and nothing changes. Replacing the path's links (`establish
/// --force`) is no removal: the pairs go on mirroring over the new links.
/// Removed by force, a critical pair is write-inhibited at its next write.
#[test]
fn a_path_that_pairs_use_is_removed_only_by_force() {
    let s = Sites::start("pprc-path-in-use", |_| {});
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (plain, critical) = (a.vol(0x10, 0), a.vol(0x10, 1));
    let (sec_plain, sec_critical) = (b.vol(0x10, 0), b.vol(0x10, 1));
    // Established in the reverse of the volumes' order: listed by volume.
    essctl(
        a,
        &[
            "pprc",
            "establish",
            &critical,
            &sec_critical,
            "--mode",
            "nocopy",
            "--critical",
        ],
    )
    .ok();
    essctl(
        a,
        &["pprc", "establish", &plain, &sec_plain, "--mode", "nocopy"],
    )
    .ok();
    let listed = essctl_json(a, &["pprc", "list"]);
    let volumes: Vec<&str> = listed["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["volume"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, [plain.as_str(), critical.as_str()], "{listed}");
    let remove = ["pprc", "path", "remove", "0x10", "TSTB2", "0x10"];
    let in_use = |pairs: &str| {
        format!(
            "path 0x10 → TSTB2 0x10 is used by the pair(s) {pairs}; terminate them first, or remove it \
             anyway with --force (API: ?force=true): they then stop mirroring (they suspend, and \
             critical ones are write-inhibited)"
        )
    };
    essctl(a, &remove).refused(&in_use(&format!(
        "{plain} → {sec_plain} (duplex), {critical} → {sec_critical} (duplex)"
    )));
    // Nothing changed: the path is up and both pairs mirror.
    let paths = essctl_json(a, &["pprc", "path", "list"]);
    assert_eq!(paths["paths"].as_array().unwrap().len(), 1, "{paths}");
    assert_eq!(paths["paths"][0]["state"], "up", "{paths}");
    assert_eq!(try_write(a, &critical), "writable ok");
    write_tracks(a, &plain, 71, 4);
    for (vol, sec) in [(&plain, &sec_plain), (&critical, &sec_critical)] {
        assert_eq!(show(a, vol)["state"], "duplex");
        assert_eq!(volume_sha(a, vol), volume_sha(b, sec));
    }

    // New links in the path's place: the pairs mirror over them.
    essctl(
        a,
        &[
            "pprc",
            "path",
            "establish",
            "0x10",
            "TSTB2",
            "0x10",
            "--links",
            "2",
            "--force",
        ],
    )
    .ok();
    write_tracks(a, &plain, 72, 4);
    assert_eq!(try_write(a, &critical), "writable ok");
    for (vol, sec) in [(&plain, &sec_plain), (&critical, &sec_critical)] {
        let v = show(a, vol);
        assert_eq!(
            (
                v["state"].as_str(),
                v["path"]["links"].as_array().map(Vec::len)
            ),
            (Some("duplex"), Some(2)),
            "{v}"
        );
        assert_eq!(volume_sha(a, vol), volume_sha(b, sec));
    }

    // A suspended pair still holds the path; a terminated one does not.
    essctl(a, &["pprc", "suspend", &plain]).ok();
    essctl(a, &remove).refused(&in_use(&format!(
        "{plain} → {sec_plain} (suspended), {critical} → {sec_critical} (duplex)"
    )));
    essctl(a, &["pprc", "terminate", &plain]).ok();
    essctl(a, &remove).refused(&in_use(&format!("{critical} → {sec_critical} (duplex)")));
    assert_eq!(try_write(a, &critical), "writable ok");

    // Forced: the path goes, and the critical pair cannot mirror.
    let mut forced = remove.to_vec();
    forced.push("--force");
    assert_eq!(essctl(a, &forced).ok(), "removed path 0x10 → TSTB2 0x10\n");
    assert_eq!(essctl(a, &["pprc", "path", "list"]).ok(), "no PPRC paths\n");
    assert_eq!(try_write(a, &critical), "writable EIO");
    let v = show(a, &critical);
    assert_eq!(
        (
            v["state"].as_str(),
            v["reason"].as_str(),
            &v["write_inhibited"]
        ),
        (Some("suspended"), Some("link lost"), &true.into()),
        "{v}"
    );
    let log = essctl(a, &["log"]).ok().to_string();
    assert!(
        log.contains(&format!(
            "path 0x10 → TSTB2 0x10 removed by force; pairs over it: {critical} → {sec_critical} (duplex)"
        )),
        "{log}"
    );
}

/// A path change whose record cannot be written changes nothing: a forced
/// establish keeps the old path, a forced remove keeps the path, both
/// listed and carrying the pair's writes. (Both used to drop the path from
/// the list and stop watching its links while the data path went on
/// using them, and a restart brought back the recorded path.)
#[test]
fn a_path_change_that_cannot_be_recorded_changes_nothing() {
    let s = Sites::start("pprc-path-unrecorded", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    let blocker = s.dir_a.path().join("state/pprc/.paths.json.tmp");
    let attempts: [&[&str]; 2] = [
        &[
            "pprc",
            "path",
            "establish",
            "0x10",
            "TSTB2",
            "0x10",
            "--links",
            "2",
            "--force",
        ],
        &["pprc", "path", "remove", "0x10", "TSTB2", "0x10", "--force"],
    ];
    for (n, args) in attempts.iter().enumerate() {
        std::fs::create_dir(&blocker).unwrap();
        let run = essctl(a, args);
        std::fs::remove_dir(&blocker).unwrap();
        assert_eq!(run.code, 1, "{run:?}");
        assert!(
            run.stderr.contains(".paths.json.tmp") && run.stdout.is_empty(),
            "{run:?}"
        );
        let list = essctl_json(a, &["pprc", "path", "list"]);
        let paths = list["paths"].as_array().unwrap();
        assert_eq!(paths.len(), 1, "{args:?}: {list}");
        assert_eq!(
            (
                paths[0]["state"].as_str(),
                paths[0]["links"].as_array().map(Vec::len)
            ),
            (Some("up"), Some(1)),
            "{args:?}: {list}"
        );
        write_tracks(a, &va, 90 + n as u64, 4);
        assert_eq!(show(a, &va)["state"], "duplex");
        assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
    }
}

/// The bytes a primary has sent its secondary are recorded with the pair:
/// a restart (kill -9 here) does not set them back to zero, and the
/// automatic resync after it adds to them.
#[test]
fn bytes_sent_are_kept_across_a_restart_of_the_primary() {
    let mut s = Sites::start("pprc-bytes-sent", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    fill(&s.a, &va, s.dir_a.path(), 4, 103);
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb]).ok();
    wait_duplex(&s.a, &va);
    let before = show(&s.a, &va);
    let sent = before["bytes_sent"].as_u64().unwrap();
    assert!(sent >= 4 << 20, "{before}");
    // The pair is recorded (in the background) once it is duplex.
    let record = s.a.dir.join("state/pprc/pairs.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pairs: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        if pairs[0]["bytes_sent"].as_u64().unwrap_or(0) >= sent {
            break;
        }
        assert!(Instant::now() < deadline, "not recorded: {pairs}");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.a.kill_and_restart("TSTA1");
    let v = show(&s.a, &va);
    assert!(
        v["bytes_sent"].as_u64().unwrap() >= sent,
        "before {before}\nafter {v}"
    );
    wait_state(&s.a, &va, "duplex");
    let text = essctl(&s.a, &["pprc", "show", &va]).ok().to_string();
    let shown: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("bytes sent:"))
        .unwrap_or_else(|| panic!("{text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(shown >= sent, "{text}");
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

/// The secondary's side shows its primary's server with the address it
/// is configured at (`[[peer]]`), in text and JSON, as the primary's side
/// shows the secondary's (also before it has a path, after a failover).
#[test]
fn the_secondary_shows_the_address_of_its_primarys_server() {
    let s = Sites::start("pprc-peer-address", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    let (at_a, at_b) = (show(&s.a, &va), wait_state(&s.b, &vb, "duplex"));
    assert_eq!(at_a["peer_address"], s.proxy.addr().to_string(), "{at_a}");
    assert_eq!(at_b["peer_address"], s.back.addr().to_string(), "{at_b}");
    let text = essctl(&s.b, &["pprc", "show", &vb]).ok().to_string();
    assert!(
        text.contains(&format!(
            "peer:               TSTA1\npeer address:       {}\n",
            s.back.addr()
        )),
        "{text}"
    );
    // The volume that took over has no path back yet: its side names the
    // configured address all the same.
    essctl(&s.b, &["pprc", "failover", &vb]).ok();
    let taken = show(&s.b, &vb);
    assert_eq!(taken["role"], "primary", "{taken}");
    assert_eq!(taken["peer_address"], s.back.addr().to_string(), "{taken}");
}

/// Fills `argv[2]` 4 KiB blocks with 0xAA and flushes; then, 16 blocks at
/// a time, writes 0x55 to the second 512 bytes of each block from one
/// connection while trimming its first 512 bytes from another, every
/// request in flight at once (unaligned: the export asks for 4 KiB), and
/// flushes. Prints the blocks whose first 512 bytes do not read zeroes.
const TRIM_BESIDE_WRITES: &str = r#"
import json, nbd, sys
hs = [nbd.NBD(), nbd.NBD()]
for h in hs:
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(sys.argv[1])
trim, write = hs
blocks = int(sys.argv[2])
write.pwrite(b"\xaa" * 4096 * blocks, 0)
write.flush()
for start in range(0, blocks, 16):
    cookies = []
    for b in range(start, min(start + 16, blocks)):
        cookies.append((write, write.aio_pwrite(b"\x55" * 512, b * 4096 + 512)))
        cookies.append((trim, trim.aio_trim(512, b * 4096)))
    for h, c in cookies:
        while not h.aio_command_completed(c):
            h.poll(-1)
write.flush()
data = write.pread(4096 * blocks, 0)
print(json.dumps([b for b in range(blocks) if data[b * 4096:b * 4096 + 512] != bytes(512)]))
"#;

/// A trim of part of a 4 KiB block on a duplex primary with direct I/O,
/// beside a write to the rest of that block in flight at the same time
/// (a read-modify-write of the block): the trimmed bytes read zeroes on
/// the primary, as the secondary was told, and the volumes are equal.
#[test]
fn a_trim_beside_an_unaligned_write_on_direct_io_leaves_the_volumes_equal() {
    let s = Sites::start("pprc-trim-rmw", |cfg| cfg.volumes[0].direct_io = true);
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.a, &va, "duplex");
    let kept: Vec<u64> =
        serde_json::from_str(&python(TRIM_BESIDE_WRITES, &[&s.a.uri(&va), "4096"])).unwrap();
    assert_eq!(show(&s.a, &va)["state"], "duplex");
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "the volumes differ; {} trimmed ranges hold their old data on the primary (blocks \
         {:?}…)",
        kept.len(),
        &kept[..kept.len().min(10)]
    );
    assert!(
        kept.is_empty(),
        "{} trimmed ranges hold their old data on both volumes (blocks {:?}…)",
        kept.len(),
        &kept[..kept.len().min(10)]
    );
}

/// The bytes of every file in `dir`'s `state/pprc`, by name.
fn pprc_state(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir.join("state/pprc"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A configuration that dropped the peer of a recorded path, or the volume
/// of a recorded pair (on either side), or changed the track size of a
/// primary's bitmap, stops the start with the record, what is missing or
/// changed and how to take it out properly; the state files are
/// untouched, and with the configuration put back the pair carries on.
#[test]
fn a_start_without_the_peer_or_volume_of_a_pair_is_refused_and_loses_nothing() {
    let mut s = Sites::start("pprc-dropped", |_| {});
    let (va, vb) = duplex_nocopy_pair(&s);
    assert_eq!(s.a.terminate().code(), Some(0));
    assert_eq!(s.b.terminate().code(), Some(0));
    let (state_a, state_b) = (pprc_state(s.dir_a.path()), pprc_state(s.dir_b.path()));

    let no_peer = s.a.start_edited(|c| {
        let at = c.find("\n[[peer]]").unwrap();
        let end = c[at + 1..].find("\n\n").map_or(c.len(), |e| at + 1 + e);
        format!("{}{}", &c[..at], &c[end..])
    });
    assert_eq!(
        no_peer,
        (
            Some(2),
            format!(
                "essd: {}: path 0x10 → TSTB2 0x10 needs [[peer]] serial = \"TSTB2\", which the \
                 configuration no longer has; put it back, start essd and remove the path (essctl \
                 pprc path remove) before taking it out",
                s.dir_a.path().join("state/pprc/paths.json").display()
            )
        )
    );
    for (essd, dir, pair, terminate) in [
        (
            &s.a,
            s.dir_a.path(),
            format!("primary {va} of the pair with TSTB2 {vb}"),
            va.clone(),
        ),
        (
            &s.b,
            s.dir_b.path(),
            format!("secondary {vb} of the pair with TSTA1 {va}"),
            format!("{va} at TSTA1"),
        ),
    ] {
        let refused = essd.start_edited(|c| without_volume(c, &dir.join("vol-10-0.img")));
        assert_eq!(
            refused,
            (
                Some(2),
                format!(
                    "essd: {}: {pair} is no longer in the configuration; put it back, start essd \
                     and terminate the pair (essctl pprc terminate {terminate}) before taking it \
                     out",
                    dir.join("state/pprc/pairs.json").display()
                )
            )
        );
    }
    // A changed track size would make the primary's recorded tracks mean
    // other bytes.
    let retracked =
        s.a.start_edited(|c| c.replacen("[server]\n", "[server]\ntrack_size = \"128KiB\"\n", 1));
    assert_eq!(
        retracked,
        (
            Some(2),
            format!(
                "essd: {}: the out-of-sync bitmap of primary {va} of the pair with TSTB2 {vb} has \
                 tracks of 65536 bytes, and server.track_size is now 131072; put the old setting \
                 back, start essd and terminate the pair (essctl pprc terminate {va}) before \
                 changing it",
                s.dir_a
                    .path()
                    .join(format!("state/pprc/{va}.oos"))
                    .display()
            )
        )
    );
    assert_eq!(pprc_state(s.dir_a.path()), state_a);
    assert_eq!(pprc_state(s.dir_b.path()), state_b);

    s.b.restart("TSTB2");
    s.a.restart("TSTA1");
    // The configuration put back passes the check, with the server running.
    let check = run(std::process::Command::new(essd_bin())
        .arg("--config")
        .arg(&s.a.config)
        .arg("--check"));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("configuration is valid (4 volumes;"),
        "{check:?}"
    );
    // Back `primary restarted`, it resumes by itself with nothing to copy.
    let v = wait_state(&s.a, &va, "duplex");
    assert_eq!(v["out_of_sync_tracks"], 0, "{v}");
    let tracks = write_tracks(&s.a, &va, 71, 8);
    assert_eq!(tracks.len(), 8);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb));
}

//! PPRC pairs between two real essd processes on loopback, driven with
//! essctl and written with libnbd: initial copy, duplex mirroring, secondary
//! protection, suspend and resync of changed tracks only (bytes counted on
//! the link through a fault-injecting proxy), terminate from either side,
//! broken links, critical modes, failover/failback, consistency groups and
//! kill -9 of the primary.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::*;
use essd::copy::pprc::pair::CLEAN_INTERVAL;

const SECRET: &str = "correct horse battery staple";
const TRACK: u64 = 64 << 10;

/// Two servers: A (TSTA1, primary site) and B (TSTB2); A's links to B go
/// through one fault proxy, B's links to A through another.
struct Sites {
    a: Essd,
    b: Essd,
    proxy: FaultProxy,
    back: FaultProxy,
    dir_a: tempfile::TempDir,
    dir_b: tempfile::TempDir,
}

fn site_config(serial: &'static str, listen: u16, peer: &str, peer_addr: SocketAddr) -> TestConfig {
    let mut cfg = TestConfig::new("uring");
    cfg.serial = serial;
    cfg.volumes = vec![
        Vol::new(0x10, 0, "64MiB"),
        Vol::new(0x10, 1, "64MiB"),
        Vol::new(0x11, 0, "64MiB"),
        Vol::new(0x11, 1, "32MiB"),
    ];
    cfg.extra = format!(
        "\n[replication]\nlisten = \"127.0.0.1:{listen}\"\nsecret = \"{SECRET}\"\ntimeout = \"2s\"\n\n[[peer]]\nserial = \"{peer}\"\naddress = \"{peer_addr}\"\n"
    );
    cfg
}

impl Sites {
    fn start(name: &str, tune: impl Fn(&mut TestConfig)) -> Sites {
        let (port_a, port_b) = (free_port(), free_port());
        let proxy = FaultProxy::start(format!("127.0.0.1:{port_b}").parse().unwrap());
        let back = FaultProxy::start(format!("127.0.0.1:{port_a}").parse().unwrap());
        let dir_a = tempdir(&format!("{name}-a"));
        let dir_b = tempdir(&format!("{name}-b"));
        let mut cfg_b = site_config("TSTB2", port_b, "TSTA1", back.addr());
        tune(&mut cfg_b);
        let b = Essd::start_in(dir_b.path(), &cfg_b);
        let mut cfg_a = site_config("TSTA1", port_a, "TSTB2", proxy.addr());
        tune(&mut cfg_a);
        let a = Essd::start_in(dir_a.path(), &cfg_a);
        Sites {
            a,
            b,
            proxy,
            back,
            dir_a,
            dir_b,
        }
    }
}

fn path(from: &Essd, lss: &str, peer: &str, peer_lss: &str, links: &str) {
    essctl(
        from,
        &[
            "pprc",
            "path",
            "establish",
            lss,
            peer,
            peer_lss,
            "--links",
            links,
            "--if-not-exists",
        ],
    )
    .ok();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = essctl(from, &["--json", "pprc", "path", "list"]).json();
        let up = list["paths"].as_array().unwrap().iter().any(|p| {
            p["lss"] == lss && p["peer"] == peer && p["peer_lss"] == peer_lss && p["state"] == "up"
        });
        if up {
            return;
        }
        assert!(Instant::now() < deadline, "path never came up: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn show(essd: &Essd, volume: &str) -> serde_json::Value {
    essctl(essd, &["--json", "pprc", "show", volume]).json()
}

fn wait_state(essd: &Essd, volume: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = show(essd, volume);
        if v["state"] == state {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{volume} never became {state}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_duplex(essd: &Essd, volume: &str) {
    essctl(
        essd,
        &[
            "pprc",
            "wait",
            volume,
            "--interval",
            "0.002",
            "--timeout",
            "120",
        ],
    )
    .ok();
}

/// Pages of `path` in the page cache that are dirty or under write-back
/// (`cachestat`, Linux 6.5).
fn unwritten_pages(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    /// `cachestat`'s number (the same on every architecture).
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    let file = std::fs::File::open(path).unwrap();
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: `range` and `stat` are live, properly laid out structs the
    // call reads and fills; the descriptor is open.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "cachestat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    stat.dirty + stat.writeback
}

/// SHA-256 of an export's whole content, read with nbdcopy.
fn volume_sha(essd: &Essd, export: &str) -> String {
    let out = tempfile::NamedTempFile::new().unwrap();
    run(std::process::Command::new("nbdcopy")
        .arg(essd.uri(export))
        .arg(out.path()));
    sha256_file(out.path())
}

/// Writes `count` 4 KiB blocks of random data, each in a different track,
/// and flushes unless told `noflush`; prints the tracks.
const WRITE_TRACKS: &str = r#"
import nbd, random, sys
uri, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
track = 65536
h = nbd.NBD()
h.connect_uri(uri)
rnd = random.Random(seed)
tracks = rnd.sample(range(h.get_size() // track), count)
for t in tracks:
    h.pwrite(rnd.randbytes(4096), t * track + rnd.randrange(0, track, 4096))
if sys.argv[4:] != ["noflush"]:
    h.flush()
h.shutdown()
print(" ".join(map(str, tracks)))
"#;

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

/// Tracks set in a primary's out-of-sync bitmap file (after its 4 KiB
/// header), i.e. the marks that survive a crash.
fn durable_marks(essd: &Essd, volume: &str) -> BTreeSet<u64> {
    let path = essd.dir.join("state/pprc").join(format!("{volume}.oos"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (0..(bytes.len() as u64 - 4096) * 8)
        .filter(|t| bytes[4096 + (t / 8) as usize] & (1 << (t % 8)) != 0)
        .collect()
}

/// Writes 4 KiB into each of `count` random distinct tracks, then
/// flushes; returns the tracks.
fn write_tracks(essd: &Essd, export: &str, seed: u64, count: usize) -> Vec<u64> {
    write_tracks_then(essd, export, seed, count, "flush")
}

/// [`write_tracks`], then `flush` or `noflush`.
fn write_tracks_then(essd: &Essd, export: &str, seed: u64, count: usize, then: &str) -> Vec<u64> {
    let out = python(
        WRITE_TRACKS,
        &[
            &essd.uri(export),
            &seed.to_string(),
            &count.to_string(),
            then,
        ],
    );
    let tracks: Vec<u64> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(tracks.len(), count, "{out}");
    tracks
}

/// Tries one write; prints `ok` or the errno name.
const TRY_WRITE: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("read-only" if h.is_read_only() else "writable")
try:
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    print("ok")
except nbd.Error as e:
    print(e.errnum and __import__("errno").errorcode[e.errnum] or e.string)
"#;

fn try_write(essd: &Essd, export: &str) -> String {
    python(TRY_WRITE, &[&essd.uri(export)])
        .replace('\n', " ")
        .trim()
        .to_string()
}

/// Writes `mib` MiB of random data at the start of the volume, flushed;
/// returns the file it wrote from (in `dir`).
fn fill(essd: &Essd, export: &str, dir: &Path, mib: usize, seed: u64) -> std::path::PathBuf {
    let src = dir.join(format!("fill-{seed}.img"));
    random_file(&src, mib << 20, seed);
    run(std::process::Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(essd.uri(export)));
    src
}

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

/// `essctl pprc freeze` at `a`, which must suspend `pairs` pairs.
fn freeze_suspends(a: &Essd, pairs: u64) {
    let f = essctl_json(a, &["pprc", "freeze"]);
    assert_eq!(f["suspended"], pairs, "{f}");
}

fn essctl_json(essd: &Essd, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    essctl(essd, &all).json()
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
    // and hosts write it.
    let v = essctl_json(b, &["pprc", "failover", &vb]);
    assert_eq!(
        (v["role"].as_str(), v["state"].as_str()),
        (Some("primary"), Some("suspended"))
    );
    assert_eq!(v["reason"], "failover");
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

#[test]
fn terminate_at_the_secondary_with_the_primary_dead_makes_it_writable() {
    let s = Sites::start("pprc-takeover", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.b, &vb, "duplex");
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

/// Writes a block of one letter to the first volume, then (dependent) a
/// block of another to the second, printing when each completed.
const DEPENDENT: &str = r#"
import nbd, sys, time
first, second = nbd.NBD(), nbd.NBD()
first.connect_uri(sys.argv[1])
second.connect_uri(sys.argv[2])
earlier, later = sys.argv[3].encode(), sys.argv[4].encode()
first.pwrite(earlier * 4096, 1 << 20)
print("A", time.time(), flush=True)
second.pwrite(later * 4096, 1 << 20)
print("B", time.time(), flush=True)
first.flush()
second.flush()
"#;

fn block_at(essd: &Essd, export: &str, offset: u64) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    run(std::process::Command::new("nbdcopy")
        .arg(essd.uri(export))
        .arg(out.path()));
    let all = std::fs::read(out.path()).unwrap();
    all[offset as usize..offset as usize + 4096].to_vec()
}

#[test]
fn consistency_group_holds_writes_until_freeze() {
    let s = Sites::start("pprc-group", |cfg| {
        cfg.lss_extra = vec![
            (
                0x10,
                "consistency_group = true\nconsistency_timeout = \"4s\"".into(),
            ),
            (
                0x11,
                "consistency_group = true\nconsistency_timeout = \"4s\"".into(),
            ),
        ];
    });
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    path(a, "0x11", "TSTB2", "0x11", "1");
    let (v1, v2) = (a.vol(0x10, 0), a.vol(0x11, 0));
    let (s1, s2) = (b.vol(0x10, 0), b.vol(0x11, 0));
    essctl(a, &["pprc", "establish", &v1, &s1, "--mode", "nocopy"]).ok();
    essctl(a, &["pprc", "establish", &v2, &s2, "--mode", "nocopy"]).ok();
    let g = essctl_json(a, &["pprc", "group"]);
    assert_eq!(g["group"]["state"], "normal");

    for (round, freeze, earlier, later) in [(0, true, b'A', b'B'), (1, false, b'C', b'D')] {
        // The link is cut; a write to v1 then a dependent write to v2.
        s.proxy.drop_all();
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), DEPENDENT).unwrap();
        let started = Instant::now();
        let child = std::process::Command::new("/usr/bin/python3")
            .arg(script.path())
            .args([a.uri(&v1), a.uri(&v2)])
            .args([(earlier as char).to_string(), (later as char).to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let g = essctl_json(a, &["pprc", "group"]);
        assert_eq!(g["group"]["state"], "holding", "round {round}: {g}");
        let released = Instant::now();
        if freeze {
            freeze_suspends(a, 2);
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("A ") && text.contains("\nB "), "{text}");
        let waited = started.elapsed();
        if freeze {
            // Held until the freeze, not longer.
            assert!(released.duration_since(started) >= Duration::from_millis(1400));
            assert!(waited < Duration::from_secs(4), "{waited:?}");
        } else {
            // Released by the 4 s consistency timeout.
            assert!(waited >= Duration::from_millis(3900), "{waited:?}");
        }
        for v in [&v1, &v2] {
            let p = show(a, v);
            assert_eq!(
                (p["state"].as_str(), p["reason"].as_str()),
                (Some("suspended"), Some("freeze")),
                "{p}"
            );
        }
        assert_eq!(
            essctl_json(a, &["pprc", "group"])["group"]["state"],
            "normal"
        );
        // The secondaries never hold B without A (here: neither).
        s.proxy.heal();
        path(a, "0x10", "TSTB2", "0x10", "1");
        path(a, "0x11", "TSTB2", "0x11", "1");
        let has_b = block_at(b, &s2, 1 << 20) == vec![later; 4096];
        let has_a = block_at(b, &s1, 1 << 20) == vec![earlier; 4096];
        assert!(!has_b || has_a, "round {round}: secondary has B without A");
        assert!(
            !has_b,
            "round {round}: B was written after the freeze, not mirrored"
        );
        for (v, sv) in [(&v1, &s1), (&v2, &s2)] {
            essctl(a, &["pprc", "resume", v]).ok();
            wait_duplex(a, v);
            assert_eq!(volume_sha(a, v), volume_sha(b, sv));
        }
    }

    // Freeze on demand holds writes until unfreeze.
    let f = essctl_json(a, &["pprc", "freeze"]);
    assert_eq!(f["group"]["state"], "frozen");
    let u = essctl_json(a, &["pprc", "unfreeze"]);
    assert_eq!(u["group"]["state"], "normal");
    write_tracks(a, &v1, 5, 2);
}

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
        std::thread::sleep(Duration::from_millis(700 + round * 300));
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

/// The redbook's "asynchronous PPRC with FlashCopy": A→B FlashCopy NOCOPY,
/// B→C PPRC full copy, wait for duplex, terminate, withdraw, C→D
/// FlashCopy; D equals A at T0.
#[test]
fn asynchronous_pprc_with_flashcopy_carries_the_point_in_time() {
    let s = Sites::start("pprc-async", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), a.vol(0x10, 1));
    let (vc, vd) = (b.vol(0x10, 0), b.vol(0x10, 1));
    fill(a, &va, s.dir_a.path(), 24, 41);
    let t0 = volume_sha(a, &va);
    essctl(
        a,
        &["flashcopy", "establish", &format!("{va}:{vb}"), "--nocopy"],
    )
    .ok();
    // A changes after T0, while B (the FlashCopy target) is mirrored to C.
    write_tracks(a, &va, 42, 40);
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &vb, &vc]).ok();
    write_tracks(a, &va, 43, 40);
    wait_duplex(a, &vb);
    essctl(a, &["pprc", "terminate", &vb]).ok();
    essctl(a, &["flashcopy", "withdraw", &format!("{va}:{vb}")]).ok();
    // C is now a simplex copy of A at T0; C → D on the remote server. C is
    // also a FlashCopy source while written.
    essctl(b, &["flashcopy", "establish", &format!("{vc}:{vd}")]).ok();
    essctl(b, &["flashcopy", "wait", &vd, "--timeout", "60"]).ok();
    assert_eq!(volume_sha(b, &vd), t0);
    assert_ne!(volume_sha(a, &va), t0);
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

#[test]
fn a_primary_server_mirrors_to_at_most_four_peers() {
    let serials = ["TSTB1", "TSTB2", "TSTB3", "TSTB4", "TSTB5"];
    let ports: Vec<u16> = serials.iter().map(|_| free_port()).collect();
    let mut keep = Vec::new();
    let mut peers = Vec::new();
    for (serial, port) in serials.iter().zip(&ports) {
        let dir = tempdir("pprc-peer");
        let mut cfg = TestConfig::new("uring");
        cfg.serial = serial;
        cfg.volumes = vec![Vol::new(0x10, 0, "16MiB")];
        cfg.extra =
            format!("\n[replication]\nlisten = \"127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\n");
        peers.push(Essd::start_in(dir.path(), &cfg));
        keep.push(dir);
    }
    let dir = tempdir("pprc-fan-out");
    let mut cfg = TestConfig::new("uring");
    cfg.serial = "TSTA1";
    cfg.volumes = (0..5).map(|n| Vol::new(0x10, n, "16MiB")).collect();
    cfg.extra = format!("\n[replication]\nsecret = \"{SECRET}\"\n");
    for (serial, port) in serials.iter().zip(&ports) {
        cfg.extra +=
            &format!("\n[[peer]]\nserial = \"{serial}\"\naddress = \"127.0.0.1:{port}\"\n");
    }
    let a = Essd::start_in(dir.path(), &cfg);
    for (n, serial) in serials.iter().enumerate() {
        path(&a, "0x10", serial, "0x10", "1");
        let pair = [
            "pprc",
            "establish",
            &a.vol(0x10, n as u8),
            &format!("000{serial}"),
            "--mode",
            "nocopy",
        ];
        if n < 4 {
            essctl(&a, &pair).ok();
        } else {
            essctl(&a, &pair).refused(
                "this server already mirrors to 4 peers (TSTB1, TSTB2, TSTB3, TSTB4); a primary server mirrors to at most 4",
            );
        }
    }
    // The fifth pair was not made.
    assert_eq!(
        essctl_json(&a, &["pprc", "list"])["pairs"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    drop(peers);
}

/// A PPRC secondary may be a FlashCopy source, duplex or suspended: the
/// target keeps the secondary's content at T0 while mirrored writes and a
/// resync change it.
#[test]
fn a_secondary_is_a_flashcopy_source_while_duplex_and_suspended() {
    let s = Sites::start("pprc-fc-source", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (pa, pb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    let (t1, t2) = (b.vol(0x10, 1), b.vol(0x11, 0));
    fill(a, &pa, s.dir_a.path(), 8, 51);
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &pa, &pb]).ok();
    wait_duplex(a, &pa);
    let first = volume_sha(b, &pb);
    essctl(
        b,
        &["flashcopy", "establish", &format!("{pb}:{t1}"), "--nocopy"],
    )
    .ok();
    write_tracks(a, &pa, 52, 30);
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));
    assert_eq!(volume_sha(b, &t1), first);

    // One relationship per volume: end the first, keep its copy.
    essctl(b, &["flashcopy", "withdraw", &format!("{pb}:{t1}")]).ok();
    essctl(a, &["pprc", "suspend", &pa]).ok();
    let second = volume_sha(b, &pb);
    essctl(
        b,
        &["flashcopy", "establish", &format!("{pb}:{t2}"), "--nocopy"],
    )
    .ok();
    write_tracks(a, &pa, 53, 30);
    essctl(a, &["pprc", "resume", &pa]).ok();
    wait_duplex(a, &pa);
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));
    assert_eq!(volume_sha(b, &t2), second);
    assert_ne!(first, second);
}

/// Writes `argv[3]` (a byte) × 4096 at offset `argv[2]`, flushes, prints ok.
const ONE_WRITE: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes([int(sys.argv[3])]) * 4096, int(sys.argv[2]))
h.flush()
h.shutdown()
print("ok", flush=True)
"#;

/// `script` run in the background on `export` with `offset` and `value`
/// as its arguments (after the export's URI); its output piped.
fn spawn_script_at(
    script: &str,
    essd: &Essd,
    export: &str,
    offset: u64,
    value: u64,
) -> std::process::Child {
    std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args([essd.uri(export), offset.to_string(), value.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// One write of `byte` at `offset`, in the background.
fn spawn_write(essd: &Essd, export: &str, offset: u64, byte: u8) -> std::process::Child {
    spawn_script_at(ONE_WRITE, essd, export, offset, byte.into())
}

/// `[replication] timeout` of both sites.
fn with_timeout(cfg: &mut TestConfig, timeout: &str) {
    cfg.extra = cfg
        .extra
        .replace("timeout = \"2s\"", &format!("timeout = \"{timeout}\""));
}

/// While a consistency group holds writes after one of its pairs failed,
/// that pair is still duplex; its cleaner must not go on, or once the link
/// is back it clears the mark of the very write that failed (the write has
/// ended), the freeze suspends the pair without it and the resync never
/// copies it.
#[test]
fn a_write_held_by_the_consistency_group_stays_recorded_until_the_freeze() {
    let s = Sites::start("pprc-group-held", |cfg| {
        cfg.lss_extra = vec![(
            0x10,
            "consistency_group = true\nconsistency_timeout = \"60s\"".into(),
        )];
    });
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    essctl(a, &["pprc", "establish", &v, &sv, "--mode", "nocopy"]).ok();
    assert_eq!(volume_sha(a, &v), volume_sha(b, &sv));
    // The write is sent into a stalled link, which then breaks: it never
    // reaches the secondary, and the group holds it.
    s.proxy.stall();
    let mut w = spawn_write(a, &v, 5 * TRACK, 0xAB);
    std::thread::sleep(Duration::from_millis(500));
    s.proxy.drop_all();
    s.proxy.heal();
    let g = essctl_json(a, &["pprc", "group"]);
    assert_eq!(g["group"]["state"], "holding", "{g}");
    // The link comes back; cleaning passes would run meanwhile.
    path(a, "0x10", "TSTB2", "0x10", "1");
    std::thread::sleep(CLEAN_INTERVAL * 4);
    let durable = durable_marks(a, &v);
    freeze_suspends(a, 1);
    assert!(w.wait().unwrap().success());
    let p = show(a, &v);
    assert_eq!(p["state"], "suspended", "{p}");
    let recorded = p["out_of_sync_tracks"].as_u64().unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    let (sa, sb) = (volume_sha(a, &v), volume_sha(b, &sv));
    assert!(
        recorded >= 1 && durable.contains(&5) && sa == sb,
        "the held write's track: out of sync after the freeze {recorded}, durable marks \
         before it {durable:?}; after the resync primary {sa} secondary {sb}"
    );
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

/// `pprc show`'s exit code (1: not in a pair).
fn show_code(essd: &Essd, volume: &str) -> i32 {
    essctl(essd, &["pprc", "show", volume]).code
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
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.b, &vb, "duplex");
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

/// Once the primary's link to `vb` is gone: terminates the pair at the
/// secondary's server (the recovery site takes over) and writes there;
/// returns the checksum of what it wrote.
fn take_over_at_the_recovery_site(s: &Sites, vb: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    while show(&s.b, vb)["primary_links"] != 0 {
        assert!(Instant::now() < deadline, "the primary's link stays");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        essctl_json(&s.b, &["pprc", "terminate", vb])["state"],
        "simplex"
    );
    write_tracks(&s.b, vb, 81, 6);
    volume_sha(&s.b, vb)
}

/// Some seconds after the primary of `va` restarted: `vb`, taken over by
/// the recovery site, is in no pair and holds `recovery` still. Returns
/// the primary's view of its pair.
fn recovery_site_kept(s: &Sites, va: &str, vb: &str, recovery: &str) -> serde_json::Value {
    std::thread::sleep(Duration::from_secs(6));
    let pa = show(&s.a, va);
    assert_eq!(show_code(&s.b, vb), 1, "{vb} is in a pair again ({pa})");
    assert_eq!(
        volume_sha(&s.b, vb),
        recovery,
        "the recovery site's data changed"
    );
    pa
}

/// The primary is killed; the recovery site terminates its secondary and
/// hosts write it. The restarted primary's automatic resync must not make
/// that volume its secondary again (copying only its own out-of-sync
/// tracks over the recovery site's data).
#[test]
fn a_restarted_primary_does_not_resync_a_secondary_terminated_meanwhile() {
    let mut s = Sites::start("pprc-restart-terminated", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.b, &vb, "duplex");
    write_tracks(&s.a, &va, 80, 4);
    s.a.crash();
    let recovery = take_over_at_the_recovery_site(&s, &vb);
    s.a.kill_and_restart("TSTA1");
    let pa = recovery_site_kept(&s, &va, &vb, &recovery);
    assert_eq!(pa["state"], "suspended", "{pa}");
}

/// `terminate` at the primary records the end of the pair before it
/// tells the secondary: a crash of the primary once the secondary has
/// ended its side does not bring the pair back at the primary's restart.
#[test]
fn a_terminate_told_to_the_secondary_is_not_undone_by_a_crash() {
    let mut s = Sites::start("pprc-terminate-crash", |cfg| with_timeout(cfg, "10s"));
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.b, &vb, "duplex");
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
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.b, &vb, "duplex");
    essctl(&s.a, &["pprc", "terminate", &va]).ok();
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    assert_eq!(show(&s.a, &va)["state"], "duplex");
    let v = wait_state(&s.b, &vb, "duplex");
    assert_eq!(v["replication_status"], "current", "{v}");
}

/// A failback interrupted after the old primary became the secondary
/// (keeping its unmirrored tracks as the hand-over bitmap) and before the
/// new primary fetched them: a failover at the old primary keeps those
/// tracks marked, and its later failback leaves both volumes equal.
#[test]
fn a_failover_keeps_the_handed_over_tracks() {
    let mut s = Sites::start("pprc-handover-failover", |cfg| with_timeout(cfg, "10s"));
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.b, &vb, "duplex");
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

/// `unfreeze` of a group frozen on demand releases held writes and leaves
/// a pair resumed while the group was frozen mirroring.
#[test]
fn unfreeze_does_not_suspend_a_pair_resumed_meanwhile() {
    let s = Sites::start("pprc-unfreeze-resumed", |cfg| {
        cfg.lss_extra = vec![(
            0x10,
            "consistency_group = true\nconsistency_timeout = \"60s\"".into(),
        )];
    });
    let (a, b) = (&s.a, &s.b);
    let (va, vb) = (a.vol(0x10, 0), b.vol(0x10, 0));
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    assert_eq!(
        essctl_json(a, &["pprc", "freeze"])["group"]["state"],
        "frozen"
    );
    assert_eq!(show(a, &va)["reason"], "freeze");
    essctl(a, &["pprc", "resume", &va]).ok();
    wait_state(a, &va, "duplex");
    assert_eq!(
        essctl_json(a, &["pprc", "unfreeze"])["group"]["state"],
        "normal"
    );
    let v = show(a, &va);
    assert_eq!(v["state"], "duplex", "{v}");
    write_tracks(a, &va, 77, 3);
    assert_eq!(volume_sha(a, &va), volume_sha(b, &vb));
}

/// One 4 KiB write of `argv[3]` at `argv[2]`, no flush.
const WRITE_NO_FLUSH: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes([int(sys.argv[3])]) * 4096, int(sys.argv[2]))
h.shutdown()
print("ok", flush=True)
"#;

/// A write whose link stalls past the timeout suspends the pair
/// (the link is dropped from the path, but its request is still on its
/// way). The resync copies the track over another link and the pair is
/// duplex; then the stalled link delivers the old write, which must not
/// land over the newer copy.
#[test]
fn a_write_stuck_on_a_timed_out_link_never_lands_after_the_resync() {
    let s = Sites::start("pprc-stale-link", |cfg| with_timeout(cfg, "1s"));
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "2");
    let vol = a.vol(0x10, 0);
    let sec = b.vol(0x10, 0);
    essctl(a, &["pprc", "establish", &vol, &sec, "--mode", "nocopy"]).ok();
    assert_eq!(show(a, &vol)["state"], "duplex");
    // One of the two links stops delivering (both ways); the other flows.
    s.proxy.stall_oldest();
    let started = Instant::now();
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
    // The host's newest data at offset 0, recorded while suspended.
    assert_eq!(
        python(WRITE_NO_FLUSH, &[&a.uri(&vol), "0", "238"]).trim(),
        "ok"
    );
    essctl(a, &["pprc", "resume", &vol]).ok();
    wait_duplex(a, &vol);
    assert_eq!(block_at(a, &vol, 0), vec![238u8; 4096]);
    assert_eq!(block_at(b, &sec, 0), vec![238u8; 4096]);
    let elapsed = started.elapsed();
    // The stalled link delivers what it held.
    s.proxy.heal();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(show(a, &vol)["state"], "duplex");
    let now = block_at(b, &sec, 0);
    assert!(
        now == vec![238u8; 4096],
        "duplex, the primary holds 238 at offset 0, the secondary {} (the write of {stuck} stuck on the stalled link; resync done {elapsed:?} after the stall)",
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

/// A FlashCopy onto the primary of a duplex pair gives the primary the
/// source's content at T0 in an instant, without a host write: unless it
/// is refused, the secondary must follow. Either way, once the pair is
/// duplex the two volumes are equal.
#[test]
fn a_flashcopy_onto_a_duplex_primary_leaves_the_secondary_equal() {
    let s = Sites::start("pprc-fc-onto-primary", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (src, pa, pb) = (a.vol(0x10, 0), a.vol(0x10, 1), b.vol(0x10, 0));
    fill(a, &src, s.dir_a.path(), 8, 61);
    fill(a, &pa, s.dir_a.path(), 8, 62);
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &pa, &pb]).ok();
    wait_duplex(a, &pa);
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));
    // Refused: the primary would change with nothing its secondary
    // could follow.
    let fc = essctl(
        a,
        &["flashcopy", "establish", &format!("{src}:{pa}"), "--nocopy"],
    );
    assert_eq!(fc.code, 1, "{fc:?}");
    assert!(fc.stderr.contains("terminate the pair first"), "{fc:?}");
    wait_duplex(a, &pa);
    assert_eq!(
        volume_sha(a, &pa),
        volume_sha(b, &pb),
        "duplex pair differs after a FlashCopy onto its primary ({fc:?})"
    );
}

/// The redbook's FlashCopy target as a PPRC primary: a withdraw of the
/// NOCOPY relationship while the pair is still duplex turns the target's
/// uncopied tracks back into whatever its own blocks hold, without a host
/// write. Unless that is refused, the secondary must follow.
#[test]
fn withdrawing_a_flashcopy_from_a_duplex_primary_leaves_the_secondary_equal() {
    let s = Sites::start("pprc-fc-withdraw", |_| {});
    let (a, b) = (&s.a, &s.b);
    let (src, pa, pb) = (a.vol(0x10, 0), a.vol(0x10, 1), b.vol(0x10, 0));
    fill(a, &src, s.dir_a.path(), 8, 63);
    fill(a, &pa, s.dir_a.path(), 8, 64);
    essctl(
        a,
        &["flashcopy", "establish", &format!("{src}:{pa}"), "--nocopy"],
    )
    .ok();
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(a, &["pprc", "establish", &pa, &pb]).ok();
    wait_duplex(a, &pa);
    // Some tracks are copied (copy-before-write), most are not.
    write_tracks(a, &src, 65, 20);
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));
    let withdraw = essctl(a, &["flashcopy", "withdraw", &format!("{src}:{pa}")]);
    assert_eq!(withdraw.code, 1, "{withdraw:?}");
    assert!(
        withdraw.stderr.contains("terminate the pair first"),
        "{withdraw:?}"
    );
    wait_duplex(a, &pa);
    assert_eq!(
        volume_sha(a, &pa),
        volume_sha(b, &pb),
        "duplex pair differs after a withdraw on its primary ({withdraw:?})"
    );
}

/// Makes the server's next save of its pair records fail: a directory
/// where the record's temporary file goes. The server may be saving a
/// record of its own just then (a state change it was told of): the
/// directory is made once that temporary file is renamed away.
fn block_pair_records(state_dir: &std::path::Path) -> std::path::PathBuf {
    let blocker = state_dir.join("state/pprc/.pairs.json.tmp");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::create_dir(&blocker) {
            Ok(()) => return blocker,
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot block {}: {e}", blocker.display()),
        }
    }
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

/// A failover whose record cannot be written changes nothing: the volume
/// stays a protected secondary. (It used to make the volume a writable
/// primary first and answer the error after: hosts wrote it, the restart
/// made it the secondary again from the old record, and the resumed pair
/// went duplex with those writes on the secondary only.)
#[test]
fn a_failover_that_cannot_be_recorded_leaves_the_secondary_protected() {
    let mut s = Sites::start("pprc-failover-unrecorded", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.b, &vb, "duplex");
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

/// Two LSSs in one consistency group (timeout `timeout`), a nocopy pair
/// in each: returns the primaries and the secondaries.
fn group_of_two(name: &str, timeout: &str) -> (Sites, [String; 2], [String; 2]) {
    let lss = format!("consistency_group = true\nconsistency_timeout = \"{timeout}\"");
    let s = Sites::start(name, |cfg| {
        cfg.lss_extra = vec![(0x10, lss.clone()), (0x11, lss.clone())];
    });
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    path(&s.a, "0x11", "TSTB2", "0x11", "1");
    let primaries = [s.a.vol(0x10, 0), s.a.vol(0x11, 0)];
    let secondaries = [s.b.vol(0x10, 0), s.b.vol(0x11, 0)];
    for (p, sp) in primaries.iter().zip(&secondaries) {
        essctl(&s.a, &["pprc", "establish", p, sp, "--mode", "nocopy"]).ok();
    }
    (s, primaries, secondaries)
}

/// Runs `essctl ARGS` against `essd` in a thread; the receiver gets its
/// output.
fn essctl_async(
    essd: &Essd,
    args: &[&str],
) -> std::sync::mpsc::Receiver<std::io::Result<std::process::Output>> {
    let api = essd.api_sock.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_essctl"))
            .arg("--server")
            .arg(&api)
            .args(&args)
            .output();
        let _ = tx.send(out);
    });
    rx
}

/// Waits up to `secs` for a background write; `None` if still running.
fn wait_child(child: &mut std::process::Child, secs: u64) -> Option<bool> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.success());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A terminate of a pair whose consistency group holds writes acts at
/// once: the pair leaves the group and is simplex, its held write goes on
/// to the primary alone, and the other pairs' writes stay held until the
/// freeze.
#[test]
fn terminate_while_the_group_holds_acts_at_once_and_keeps_the_others_held() {
    let (s, [v1, v2], _) = group_of_two("pprc-group-terminate", "60s");
    let a = &s.a;
    s.proxy.drop_all();
    let mut w1 = spawn_write(a, &v1, TRACK, 0xA1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while essctl_json(a, &["pprc", "group"])["group"]["state"] != "holding" {
        assert!(Instant::now() < deadline, "the group never held writes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut w2 = spawn_write(a, &v2, TRACK, 0xA2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w1.try_wait().unwrap(), None, "a held write completed");
    assert_eq!(w2.try_wait().unwrap(), None, "a held write completed");

    let started = Instant::now();
    let out = essctl_async(a, &["pprc", "terminate", &v1])
        .recv_timeout(Duration::from_secs(15))
        .expect("terminate did not answer within 15 s while the group held writes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(show_code(a, &v1), 1, "{v1} is still in a pair");
    assert_eq!(
        wait_child(&mut w1, 10),
        Some(true),
        "the terminated volume's write"
    );
    assert_eq!(block_at(a, &v1, TRACK), vec![0xA1; 4096]);
    // The rest of the group still holds.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        w2.try_wait().unwrap(),
        None,
        "{v2}'s write completed before the freeze"
    );
    let g = essctl_json(a, &["pprc", "group"]);
    assert_eq!(g["group"]["state"], "holding", "{g}");
    assert_eq!(g["volumes"], serde_json::json!([v2]), "{g}");
    freeze_suspends(a, 1);
    assert_eq!(
        wait_child(&mut w2, 10),
        Some(true),
        "{v2}'s write after the freeze"
    );
    let p = show(a, &v2);
    assert_eq!(
        (p["state"].as_str(), p["reason"].as_str()),
        (Some("suspended"), Some("freeze")),
        "{p}"
    );
    // The terminated volume is an ordinary volume: writes go straight on.
    assert_eq!(try_write(a, &v1), "writable ok");
}

/// `pprc show` of `volume` (JSON), asserted to answer within 3 s: list
/// and show never wait for the consistency group.
fn show_at_once(essd: &Essd, volume: &str) -> serde_json::Value {
    let started = Instant::now();
    let v = show(essd, volume);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "pprc show {volume} took {:?}",
        started.elapsed()
    );
    v
}

/// The seconds the consistency timeout has left, as a held pair's detail
/// says (`... consistency timeout (in 57s) ...`).
fn timeout_left(detail: &str) -> u64 {
    let at = detail
        .find("consistency timeout (in ")
        .unwrap_or_else(|| panic!("no time left in {detail:?}"))
        + "consistency timeout (in ".len();
    let secs: String = detail[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    secs.parse().unwrap()
}

/// While the consistency group holds writes, every pair of the group —
/// the one that failed and the others, all still duplex — is shown not
/// current, its detail saying that the group holds its writes, which pair
/// failed and why, and when the timeout ends it; `list` and `show` answer
/// at once. After the freeze the pairs are suspended (`freeze`); a pair
/// resumed while the group is frozen on demand is held too, and current
/// again after the unfreeze.
#[test]
fn pairs_whose_writes_the_group_holds_are_shown_not_current() {
    let (s, [v1, v2], _) = group_of_two("pprc-group-status", "60s");
    let a = &s.a;
    for v in [&v1, &v2] {
        let p = show(a, v);
        assert_eq!(p["replication_status"], "current", "{p}");
    }
    s.proxy.drop_all();
    let mut w1 = spawn_write(a, &v1, TRACK, 0xB1);
    wait_group(a, "holding");
    let g = essctl_json(a, &["pprc", "group"]);
    let why = g["group"]["detail"].as_str().unwrap().to_string();
    let since = g["group"]["since"].as_str().unwrap().to_string();
    assert_eq!(w1.try_wait().unwrap(), None, "the held write completed");

    let started = Instant::now();
    let list = essctl_json(a, &["pprc", "list"]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "pprc list took {:?}",
        started.elapsed()
    );
    for (v, who) in [(&v1, "this pair".to_string()), (&v2, format!("pair {v1}"))] {
        let p = show_at_once(a, v);
        assert_eq!(
            (
                p["state"].as_str(),
                p["reason"].as_str(),
                p["replication_status"].as_str()
            ),
            (Some("duplex"), None, Some("not current")),
            "{v} while its group holds writes: {p}"
        );
        let detail = p["detail"].as_str().unwrap_or("");
        assert!(
            detail.starts_with(&format!(
                "writes held by the consistency group since {since}: {who} failed: {why}; \
                 held until essctl pprc freeze or the consistency timeout (in "
            )),
            "{v}: {detail:?}"
        );
        let left = timeout_left(detail);
        assert!((45..=60).contains(&left), "{v}: {detail:?}");
        let listed = list["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["volume"] == v.as_str())
            .unwrap();
        assert_eq!(listed["replication_status"], "not current", "{listed}");
        assert!(
            listed["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("writes held by the consistency group since"),
            "{listed}"
        );
    }
    let text = essctl(a, &["pprc", "show", &v2]).ok().to_string();
    assert!(
        text.contains("replication status: not current")
            && text.contains(&format!("pair {v1} failed: {why}")),
        "{text}"
    );
    let text = essctl(a, &["pprc", "list"]).ok().to_string();
    for v in [&v1, &v2] {
        let row = text.lines().find(|l| l.starts_with(v.as_str())).unwrap();
        assert!(
            row.contains(" duplex ") && row.contains("not current"),
            "{text}"
        );
    }

    // The freeze suspends them (and releases the write).
    freeze_suspends(a, 2);
    assert_eq!(
        wait_child(&mut w1, 10),
        Some(true),
        "the write after the freeze"
    );
    for v in [&v1, &v2] {
        let p = show_at_once(a, v);
        assert_eq!(
            (
                p["state"].as_str(),
                p["reason"].as_str(),
                p["detail"].as_str(),
                p["replication_status"].as_str()
            ),
            (
                Some("suspended"),
                Some("freeze"),
                Some("consistency group frozen"),
                Some("not current")
            ),
            "{p}"
        );
    }
    s.proxy.heal();
    path(a, "0x10", "TSTB2", "0x10", "1");
    path(a, "0x11", "TSTB2", "0x11", "1");
    for v in [&v1, &v2] {
        essctl(a, &["pprc", "resume", v]).ok();
        wait_duplex(a, v);
        let p = show(a, v);
        assert_eq!(
            (p["replication_status"].as_str(), p["detail"].as_str()),
            (Some("current"), None),
            "{p}"
        );
    }

    // Frozen on demand: a pair resumed meanwhile is duplex, its writes
    // held until the unfreeze.
    essctl(a, &["pprc", "freeze"]).ok();
    essctl(a, &["pprc", "resume", &v1]).ok();
    wait_state(a, &v1, "duplex");
    let p = show_at_once(a, &v1);
    assert_eq!(p["replication_status"], "not current", "{p}");
    let detail = p["detail"].as_str().unwrap_or("");
    assert!(
        detail.starts_with("writes held by the consistency group, frozen on demand since ")
            && detail.contains("held until essctl pprc unfreeze or the consistency timeout (in "),
        "{p}"
    );
    let p = show_at_once(a, &v2);
    assert_eq!(
        (p["state"].as_str(), p["reason"].as_str()),
        (Some("suspended"), Some("freeze")),
        "{p}"
    );
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("consistency group frozen; writes held by the consistency group"),
        "{p}"
    );
    essctl(a, &["pprc", "unfreeze"]).ok();
    let p = show(a, &v1);
    assert_eq!(
        (
            p["state"].as_str(),
            p["replication_status"].as_str(),
            p["detail"].as_str()
        ),
        (Some("duplex"), Some("current"), None),
        "{p}"
    );
    let p = show(a, &v2);
    assert_eq!(
        (p["state"].as_str(), p["detail"].as_str()),
        (Some("suspended"), Some("consistency group frozen")),
        "{p}"
    );
}

/// A manual suspend of a pair whose write failed while its consistency
/// group holds (the link back meanwhile) keeps that write's track out of
/// sync: the resync copies it and both volumes end equal.
#[test]
fn a_suspend_while_the_group_holds_keeps_the_failed_writes_track() {
    let s = Sites::start("pprc-group-suspend", |cfg| {
        cfg.lss_extra = vec![(
            0x10,
            "consistency_group = true\nconsistency_timeout = \"60s\"".into(),
        )];
    });
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    let (v, sv) = (a.vol(0x10, 0), b.vol(0x10, 0));
    essctl(a, &["pprc", "establish", &v, &sv, "--mode", "nocopy"]).ok();
    s.proxy.stall();
    let mut w = spawn_write(a, &v, 5 * TRACK, 0xAB);
    std::thread::sleep(Duration::from_millis(500));
    s.proxy.drop_all();
    s.proxy.heal();
    let g = essctl_json(a, &["pprc", "group"]);
    assert_eq!(g["group"]["state"], "holding", "{g}");
    path(a, "0x10", "TSTB2", "0x10", "1");
    let p = essctl_json(a, &["pprc", "suspend", &v]);
    assert_eq!(p["state"], "suspended", "{p}");
    assert_eq!(
        w.try_wait().unwrap(),
        None,
        "the held write completed before the freeze"
    );
    let f = essctl_json(a, &["pprc", "freeze"]);
    assert_eq!(f["group"]["state"], "normal", "{f}");
    assert!(w.wait().unwrap().success());
    let recorded = show(a, &v)["out_of_sync_tracks"].as_u64().unwrap();
    essctl(a, &["pprc", "resume", &v]).ok();
    wait_duplex(a, &v);
    let (sa, sb) = (volume_sha(a, &v), volume_sha(b, &sv));
    assert!(
        recorded >= 1 && sa == sb,
        "out of sync after the suspend and freeze: {recorded}; after the resync primary {sa} \
         secondary {sb}"
    );
}

/// A terminate at the secondary's server, its primary cut off while the
/// primary's consistency group holds writes, acts at once there (the
/// volume is writable); the primary's held write stays held until the
/// freeze, which suspends its pair.
#[test]
fn terminate_at_the_secondary_while_the_primarys_group_holds_acts_there_only() {
    let (s, [v1, _], [s1, _]) = group_of_two("pprc-group-terminate-sec", "60s");
    let (a, b) = (&s.a, &s.b);
    s.proxy.drop_all();
    let mut w1 = spawn_write(a, &v1, TRACK, 0xB1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while essctl_json(a, &["pprc", "group"])["group"]["state"] != "holding" {
        assert!(Instant::now() < deadline, "the group never held writes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = essctl_async(b, &["pprc", "terminate", &s1])
        .recv_timeout(Duration::from_secs(10))
        .expect("terminate at the secondary did not answer within 10 s")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(show_code(b, &s1), 1, "{s1} is still in a pair");
    assert_eq!(try_write(b, &s1), "writable ok");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        w1.try_wait().unwrap(),
        None,
        "the held write completed before the freeze"
    );
    freeze_suspends(a, 2);
    assert_eq!(
        wait_child(&mut w1, 10),
        Some(true),
        "the held write after the freeze"
    );
    assert_eq!(show(a, &v1)["reason"], "freeze");
}

/// A primary restarts while its consistency group's pairs are duplex, and
/// one of them cannot resume (its secondary was suspended there
/// meanwhile): the group's pairs resume together or not at all. Resuming
/// the other alone let a write that depends on one made on the first
/// primary alone reach its secondary.
#[test]
fn after_a_restart_the_pairs_of_a_group_resume_together_or_not_at_all() {
    let (mut s, [v1, v2], [s1, s2]) = group_of_two("pprc-group-restart", "60s");
    s.a.crash();
    essctl(&s.b, &["pprc", "suspend", &s1]).ok();
    s.a.kill_and_restart("TSTA1");
    let a = &s.a;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.log().contains("stays suspended") {
        assert!(
            Instant::now() < deadline,
            "no resume was refused: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    for v in [&v1, &v2] {
        let p = show(a, v);
        assert_eq!(
            (p["state"].as_str(), p["reason"].as_str()),
            (Some("suspended"), Some("primary restarted")),
            "{p}"
        );
    }
    // A write to the first primary (alone), then a dependent one to the
    // second: its secondary must not have it.
    assert!(spawn_write(a, &v1, TRACK, 0xC1).wait().unwrap().success());
    assert!(spawn_write(a, &v2, TRACK, 0xC2).wait().unwrap().success());
    assert_ne!(block_at(&s.b, &s2, TRACK), vec![0xC2; 4096]);
    // Resumed by the operator, both end equal.
    for (v, sv) in [(&v1, &s1), (&v2, &s2)] {
        essctl(a, &["pprc", "resume", v]).ok();
        wait_duplex(a, v);
        assert_eq!(volume_sha(a, v), volume_sha(&s.b, sv));
    }
}

/// One write of `byte` at `offset`, not flushed, in the background (a
/// stop answers a FLUSH sent after the signal with `ESHUTDOWN`).
fn spawn_write_unflushed(essd: &Essd, export: &str, offset: u64, byte: u8) -> std::process::Child {
    spawn_script_at(WRITE_NO_FLUSH, essd, export, offset, byte.into())
}

/// A stop of a primary server whose consistency group holds writes (its
/// secondaries' server is gone) freezes the group at once instead of
/// waiting for the consistency timeout: every pair suspends (reason
/// `freeze`) before a held write completes; the held writes are answered
/// and recorded, and after the restart a resume copies them.
#[test]
fn a_stop_while_the_group_holds_freezes_it_at_once() {
    let (mut s, [v1, v2], [s1, s2]) = group_of_two("pprc-stop-holding", "60s");
    s.b.terminate();
    let mut w1 = spawn_write_unflushed(&s.a, &v1, TRACK, 0xD1);
    wait_group(&s.a, "holding");
    let mut w2 = spawn_write_unflushed(&s.a, &v2, TRACK, 0xD2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w1.try_wait().unwrap(), None, "a held write completed");
    assert_eq!(w2.try_wait().unwrap(), None, "a held write completed");

    let started = Instant::now();
    let status = s.a.terminate_within(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(status.success(), "{status}: {}", s.a.log());
    for (w, v) in [(&mut w1, &v1), (&mut w2, &v2)] {
        assert_eq!(wait_child(w, 5), Some(true), "{v}'s held write at the stop");
    }
    let log = s.a.log();
    assert!(
        log.contains("consistency group frozen at once"),
        "the stop did not say it froze the group ({took:?}):\n{log}"
    );
    assert!(!log.contains("flush at shutdown failed"), "{log}");

    s.b.restart("TSTB2");
    s.a.restart("TSTA1");
    let (a, b) = (&s.a, &s.b);
    for v in [&v1, &v2] {
        let p = show(a, v);
        assert_eq!(
            (p["state"].as_str(), p["reason"].as_str()),
            (Some("suspended"), Some("freeze")),
            "{p}"
        );
        assert!(p["out_of_sync_tracks"].as_u64().unwrap() >= 1, "{p}");
    }
    path(a, "0x10", "TSTB2", "0x10", "1");
    path(a, "0x11", "TSTB2", "0x11", "1");
    for (v, sv, byte) in [(&v1, &s1, 0xD1), (&v2, &s2, 0xD2)] {
        essctl(a, &["pprc", "resume", v]).ok();
        wait_duplex(a, v);
        assert_eq!(block_at(b, sv, TRACK), vec![byte; 4096], "{sv}");
        assert_eq!(volume_sha(a, v), volume_sha(b, sv));
    }
}

/// A stop of a primary server whose consistency group was frozen on
/// demand, with a host write held, is prompt too: the held write is
/// released as the timeout would (the pairs stay suspended, reason
/// `freeze`), answered and recorded.
#[test]
fn a_stop_while_the_group_is_frozen_releases_its_writes_at_once() {
    let (mut s, [v1, _], [s1, _]) = group_of_two("pprc-stop-frozen", "60s");
    let f = essctl_json(&s.a, &["pprc", "freeze"]);
    assert_eq!(f["group"]["state"], "frozen", "{f}");
    let mut w1 = spawn_write_unflushed(&s.a, &v1, TRACK, 0xE1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w1.try_wait().unwrap(), None, "a held write completed");

    let status = s.a.terminate_within(Duration::from_secs(10));
    assert!(status.success(), "{status}: {}", s.a.log());
    assert_eq!(
        wait_child(&mut w1, 5),
        Some(true),
        "the held write at the stop"
    );
    assert!(
        s.a.log().contains("frozen consistency group"),
        "{}",
        s.a.log()
    );

    s.a.restart("TSTA1");
    let (a, b) = (&s.a, &s.b);
    let p = show(a, &v1);
    assert_eq!(
        (p["state"].as_str(), p["reason"].as_str()),
        (Some("suspended"), Some("freeze")),
        "{p}"
    );
    assert!(p["out_of_sync_tracks"].as_u64().unwrap() >= 1, "{p}");
    assert_ne!(block_at(b, &s1, TRACK), vec![0xE1; 4096]);
    essctl(a, &["pprc", "resume", &v1]).ok();
    wait_duplex(a, &v1);
    assert_eq!(block_at(b, &s1, TRACK), vec![0xE1; 4096]);
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
    std::thread::sleep(Duration::from_secs(12));
    let v = show(&s.a, &va);
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
    assert_eq!(
        (
            p["state"].as_str(),
            p["reason"].as_str(),
            p["replication_status"].as_str()
        ),
        (
            Some("suspended"),
            Some("primary I/O error"),
            Some("not current")
        ),
        "after a failed flush ({}): {p}",
        answer.trim()
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

/// Waits until a pair's replication status is `current` (duplex, nothing
/// out of sync). A duplex pair is current at once: its marks, kept until
/// its cleaner clears them, are not tracks out of sync.
fn wait_current(essd: &Essd, volume: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while show(essd, volume)["replication_status"] != "current" {
        assert!(
            Instant::now() < deadline,
            "never current: {}",
            show(essd, volume)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
    assert_eq!(
        (
            p["state"].as_str(),
            p["reason"].as_str(),
            p["replication_status"].as_str()
        ),
        (
            Some("suspended"),
            Some("primary I/O error"),
            Some("not current")
        ),
        "{p}"
    );
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
    assert_eq!(
        (
            p["state"].as_str(),
            p["reason"].as_str(),
            p["replication_status"].as_str()
        ),
        (
            Some("suspended"),
            Some("primary I/O error"),
            Some("not current")
        ),
        "{p}"
    );
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
    assert_eq!(
        (
            p["state"].as_str(),
            p["reason"].as_str(),
            p["replication_status"].as_str()
        ),
        (
            Some("suspended"),
            Some("secondary I/O error"),
            Some("not current")
        ),
        "{p}"
    );
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
    assert_eq!(
        (
            p["state"].as_str(),
            p["reason"].as_str(),
            p["replication_status"].as_str()
        ),
        (
            Some("suspended"),
            Some("secondary I/O error"),
            Some("not current")
        ),
        "after a failed write-back on the secondary that a reader's FLUSH learnt ({}): {p}",
        reader.trim()
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

/// Runs a block checker (`script`, reading its JSON input on stdin)
/// against `export`; returns the blocks it printed.
fn check_blocks(script: &str, essd: &Essd, export: &str, input: &serde_json::Value) -> Vec<u64> {
    use std::io::Write;
    let file = tempfile::Builder::new().suffix(".py").tempfile().unwrap();
    std::fs::write(file.path(), script).unwrap();
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg(file.path())
        .arg(essd.uri(export))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
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
    std::thread::sleep(Duration::from_millis(1500));
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
    std::thread::sleep(Duration::from_millis(1500));
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

/// A failback to an old primary whose consistency group holds writes (it
/// lost its links; site B took over meanwhile) acts at once: the old
/// primary's pair leaves the group and hands over its tracks, the held
/// write of that volume goes on to it, recorded and then copied over, and
/// both volumes end equal; the other pair of the group stays held until
/// the freeze.
#[test]
fn failback_to_an_old_primary_whose_group_holds_acts_at_once() {
    let (s, [v1, v2], [s1, _]) = group_of_two("pprc-group-failback", "60s");
    let (a, b) = (&s.a, &s.b);
    write_tracks(a, &v1, 31, 4);
    s.proxy.drop_all();
    let mut w1 = spawn_write(a, &v1, TRACK, 0xC1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while essctl_json(a, &["pprc", "group"])["group"]["state"] != "holding" {
        assert!(Instant::now() < deadline, "the group never held writes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut w2 = spawn_write(a, &v2, TRACK, 0xC2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w1.try_wait().unwrap(), None, "a held write completed");

    // Site B takes over and writes; then fails back to A.
    let f = essctl_json(b, &["pprc", "failover", &s1]);
    assert_eq!(
        (f["role"].as_str(), f["state"].as_str()),
        (Some("primary"), Some("suspended")),
        "{f}"
    );
    write_tracks(b, &s1, 32, 6);
    path(b, "0x10", "TSTA1", "0x10", "1");
    s.back.reset_counters();
    let started = Instant::now();
    let out = essctl_async(b, &["pprc", "failback", &s1])
        .recv_timeout(Duration::from_secs(20))
        .expect("failback did not answer within 20 s while A's group held writes")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "failback after {took:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(4), "failback took {took:?}");
    assert_eq!(
        wait_child(&mut w1, 10),
        Some(true),
        "the write held on the old primary"
    );
    wait_duplex(b, &s1);
    let side = show(a, &v1);
    assert_eq!(
        (side["role"].as_str(), side["state"].as_str()),
        (Some("secondary"), Some("duplex")),
        "{side}"
    );
    assert_eq!(volume_sha(a, &v1), volume_sha(b, &s1));
    // Only changed tracks crossed: B's 6, A's held one and its 4 mirrored
    // ones whose marks may not have been cleared yet.
    let sent = s.back.bytes_forward();
    assert!(
        sent <= 11 * TRACK + (64 << 10),
        "failback sent {sent} bytes"
    );
    assert_eq!(try_write(a, &v1), "read-only EPERM");

    // The rest of A's group still holds until the freeze.
    assert_eq!(
        w2.try_wait().unwrap(),
        None,
        "{v2}'s write completed before the freeze"
    );
    let g = essctl_json(a, &["pprc", "group"]);
    assert_eq!(g["group"]["state"], "holding", "{g}");
    assert_eq!(g["volumes"], serde_json::json!([v2]), "{g}");
    freeze_suspends(a, 1);
    assert_eq!(
        wait_child(&mut w2, 10),
        Some(true),
        "{v2}'s write after the freeze"
    );
}

/// Waits until `essd`'s consistency group is in `state`.
fn wait_group(essd: &Essd, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let g = essctl_json(essd, &["pprc", "group"]);
        if g["group"]["state"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the group never got {state}: {g}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Tracks a copy may send again after a cut: those in flight (8 requests
/// of 1 MiB, 16 tracks each) may have reached the secondary unanswered.
const CUT_RESENT: u64 = 8 * 16 + 4;

/// Fails back `took_over` (the volumes that took over on `from`, in
/// consistency-group LSSs 0x10 and 0x11) over `link`, cuts the link once
/// the first volume's copy is under way, freezes `from`'s group, heals
/// and resumes. Returns the bytes that crossed `link`.
fn fail_back_with_a_cut(from: &Essd, to: &str, link: &FaultProxy, took_over: &[String; 2]) -> u64 {
    link.heal();
    path(from, "0x10", to, "0x10", "1");
    path(from, "0x11", to, "0x11", "1");
    link.reset_counters();
    // A slow link, so the cut comes in the middle of the copy (slow
    // enough, a request would miss the 2 s timeout: the copy would fail
    // by itself).
    link.delay(Duration::from_millis(5));
    let mut marked = Vec::new();
    for v in took_over {
        let p = essctl_json(from, &["pprc", "failback", v]);
        assert_eq!(
            (p["role"].as_str(), p["state"].as_str()),
            (Some("primary"), Some("duplex pending")),
            "{p}"
        );
        marked.push(p["out_of_sync_tracks"].as_u64().unwrap());
    }
    assert!(marked[0] >= 64, "{marked:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Two requests' worth on the link, watched here without a process
    // spawn per look: the copy is under way and has most of its way to go
    // (it sends at least 4 MiB, at about 12 MiB/s), so the looks below
    // through essctl, slow on a loaded machine, still catch it midway.
    while link.bytes_forward() < 2 << 20 {
        assert!(
            Instant::now() < deadline,
            "the copy never got under way: {} bytes sent",
            link.bytes_forward()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    loop {
        let left = show(from, &took_over[0])["out_of_sync_tracks"]
            .as_u64()
            .unwrap();
        if left + 16 <= marked[0] {
            assert!(left > 0, "the copy ended before the cut");
            break;
        }
        let g = essctl_json(from, &["pprc", "group"]);
        assert_eq!(
            g["group"]["state"], "normal",
            "the copy failed before the cut: {g}"
        );
        assert!(
            Instant::now() < deadline,
            "the copy never got under way: {left} of {marked:?} left, {} bytes sent",
            link.bytes_forward()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    link.drop_all();
    // The copier's failure holds the group (no host writes here: they
    // are stopped) until the freeze suspends both pairs.
    wait_group(from, "holding");
    let f = essctl_json(from, &["pprc", "freeze"]);
    assert_eq!(f["suspended"], 2, "{f}");
    for v in took_over {
        let p = show(from, v);
        assert_eq!(
            (p["state"].as_str(), p["reason"].as_str()),
            (Some("suspended"), Some("freeze")),
            "{p}"
        );
    }
    link.heal();
    path(from, "0x10", to, "0x10", "1");
    path(from, "0x11", to, "0x11", "1");
    for v in took_over {
        essctl(from, &["pprc", "resume", v]).ok();
    }
    for v in took_over {
        wait_duplex(from, v);
    }
    link.bytes_forward()
}

/// The whole cycle with a consistency group over two LSSs on each site:
/// A → B, A's links lost (the group holds, then freezes), failover to B,
/// writes on B, failback B → A with the link cut in the middle of the
/// copy, then the switch back to A → B with the link cut in the middle of
/// its copy. Every pair ends duplex with equal volumes, and only changed
/// tracks crossed the links.
#[test]
fn group_failover_failback_and_switch_back_survive_link_cuts_mid_copy() {
    let lss = "consistency_group = true\nconsistency_timeout = \"60s\"".to_string();
    let s = Sites::start("pprc-group-cycle", |cfg| {
        cfg.lss_extra = vec![(0x10, lss.clone()), (0x11, lss.clone())];
    });
    let (a, b) = (&s.a, &s.b);
    let va = [a.vol(0x10, 0), a.vol(0x11, 0)];
    let vb = [b.vol(0x10, 0), b.vol(0x11, 0)];
    fill(a, &va[0], s.dir_a.path(), 4, 51);
    fill(a, &va[1], s.dir_a.path(), 4, 52);
    path(a, "0x10", "TSTB2", "0x10", "1");
    path(a, "0x11", "TSTB2", "0x11", "1");
    for (p, sp) in va.iter().zip(&vb) {
        essctl(a, &["pprc", "establish", p, sp]).ok();
    }
    for p in &va {
        wait_duplex(a, p);
    }

    // Site A loses its links: a write holds A's group until the freeze;
    // then A goes on writing, recorded.
    s.proxy.drop_all();
    let mut held = spawn_write(a, &va[0], 3 * TRACK, 0xD1);
    wait_group(a, "holding");
    freeze_suspends(a, 2);
    assert_eq!(wait_child(&mut held, 10), Some(true), "the held write");
    write_tracks(a, &va[0], 53, 3);
    write_tracks(a, &va[1], 54, 3);
    let on_a: Vec<u64> = va
        .iter()
        .map(|v| show(a, v)["out_of_sync_tracks"].as_u64().unwrap())
        .collect();

    // Failover at B; hosts write there (most of the first volume).
    for v in &vb {
        let p = essctl_json(b, &["pprc", "failover", v]);
        assert_eq!(
            (p["state"].as_str(), p["reason"].as_str()),
            (Some("suspended"), Some("failover")),
            "{p}"
        );
    }
    fill(b, &vb[0], s.dir_b.path(), 16, 55);
    write_tracks(b, &vb[1], 56, 5);
    let on_b: Vec<u64> = vb
        .iter()
        .map(|v| show(b, v)["out_of_sync_tracks"].as_u64().unwrap())
        .collect();
    assert_eq!(on_b, [256, 5]);

    // Failback B → A, cut in the middle of the copy, resumed.
    let sent = fail_back_with_a_cut(b, "TSTA1", &s.back, &vb);
    let union: u64 = on_a.iter().sum::<u64>() + on_b.iter().sum::<u64>();
    assert!(
        sent <= (union + CUT_RESENT) * TRACK,
        "failback sent {sent} bytes for at most {union} changed tracks"
    );
    for (p, sp) in vb.iter().zip(&va) {
        assert_eq!(volume_sha(b, p), volume_sha(a, sp), "{p} and {sp}");
        assert_eq!(show(a, sp)["role"], "secondary");
    }

    // Switch back, hosts stopped at B: failover at A, hosts write at A,
    // failback A → B cut in the middle of its copy.
    for v in &va {
        let p = essctl_json(a, &["pprc", "failover", v]);
        assert_eq!(p["reason"], "failover", "{p}");
    }
    fill(a, &va[0], s.dir_a.path(), 16, 57);
    write_tracks(a, &va[1], 58, 2);
    let on_a: u64 = va
        .iter()
        .map(|v| show(a, v)["out_of_sync_tracks"].as_u64().unwrap())
        .sum();
    assert_eq!(on_a, 256 + 2);
    let sent = fail_back_with_a_cut(a, "TSTB2", &s.proxy, &va);
    assert!(
        sent <= (on_a + CUT_RESENT) * TRACK,
        "switch-back sent {sent} bytes for at most {on_a} changed tracks"
    );
    for (p, sp) in va.iter().zip(&vb) {
        assert_eq!(volume_sha(a, p), volume_sha(b, sp), "{p} and {sp}");
        assert_eq!(show(b, sp)["role"], "secondary");
        assert_eq!(try_write(b, sp), "read-only EPERM");
    }
    // Mirroring again.
    write_tracks(a, &va[1], 59, 4);
    assert_eq!(volume_sha(a, &va[1]), volume_sha(b, &vb[1]));
}

/// A FlashCopy establish from (or withdraw of) a primary whose
/// consistency group holds writes is refused at once, saying what
/// releases them (it waited for the gate the held writes keep until the
/// freeze; the client gave up after 30 s and the change was made later,
/// at the consistency timeout). After the freeze it is taken, its T0
/// after the held write; the same on a group frozen on demand, until the
/// unfreeze.
#[test]
fn flashcopy_from_a_primary_whose_group_holds_writes_is_refused_at_once() {
    let (s, [v1, _], _) = group_of_two("pprc-group-flashcopy", "60s");
    let a = &s.a;
    let target = a.vol(0x10, 1);
    let rel = format!("{v1}:{target}");
    // Runs `essctl flashcopy ARGS`: answered within 5 s, with `code` and
    // `message` on stderr.
    let flashcopy = |args: &[&str], code: i32, message: &str| {
        let mut all = vec!["flashcopy"];
        all.extend_from_slice(args);
        let started = Instant::now();
        let out = essctl_async(a, &all)
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{all:?} did not answer within 20 s"))
            .unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "after {took:?}: {stderr}");
        assert!(stderr.contains(message), "{stderr}");
        assert!(took < Duration::from_secs(5), "{all:?} took {took:?}");
    };
    let establish: [&str; 3] = ["establish", &rel, "--nocopy"];
    let withdraw: [&str; 2] = ["withdraw", &rel];

    s.proxy.drop_all();
    let mut w = spawn_write(a, &v1, TRACK, 0xE1);
    wait_group(a, "holding");
    flashcopy(
        &establish,
        1,
        &format!(
            "writes to {v1} are held by its PPRC consistency group (holding): the FlashCopy \
             needs them done; freeze the group (essctl pprc freeze), then try again"
        ),
    );
    assert_eq!(w.try_wait().unwrap(), None, "the held write completed");
    // Nothing was established, then or later.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(essctl(a, &["flashcopy", "show", &rel]).code, 1);
    freeze_suspends(a, 2);
    assert_eq!(wait_child(&mut w, 10), Some(true), "the held write");
    flashcopy(&establish, 0, "");
    assert_eq!(block_at(a, &target, TRACK), vec![0xE1; 4096]);
    assert_eq!(volume_sha(a, &v1), volume_sha(a, &target));

    // Frozen on demand, a write held: a withdraw and an establish are
    // refused until the unfreeze.
    s.proxy.heal();
    path(a, "0x10", "TSTB2", "0x10", "1");
    path(a, "0x11", "TSTB2", "0x11", "1");
    essctl(a, &["pprc", "resume", &v1]).ok();
    wait_duplex(a, &v1);
    let frozen = format!(
        "writes to {v1} are held by its PPRC consistency group (frozen): the FlashCopy needs \
         them done; unfreeze the group (essctl pprc unfreeze), then try again"
    );
    essctl(a, &["pprc", "freeze"]).ok();
    let mut w = spawn_write(a, &v1, 2 * TRACK, 0xE2);
    std::thread::sleep(Duration::from_millis(300));
    flashcopy(&withdraw, 1, &frozen);
    assert_eq!(essctl(a, &["flashcopy", "show", &rel]).code, 0);
    essctl(a, &["pprc", "unfreeze"]).ok();
    assert_eq!(
        wait_child(&mut w, 10),
        Some(true),
        "the write held by the freeze"
    );
    flashcopy(&withdraw, 0, "");

    essctl(a, &["pprc", "freeze"]).ok();
    let mut w = spawn_write(a, &v1, 3 * TRACK, 0xE3);
    std::thread::sleep(Duration::from_millis(300));
    flashcopy(&establish, 1, &frozen);
    assert_eq!(essctl(a, &["flashcopy", "show", &rel]).code, 1);
    essctl(a, &["pprc", "unfreeze"]).ok();
    assert_eq!(
        wait_child(&mut w, 10),
        Some(true),
        "the write held by the freeze"
    );
    flashcopy(&establish, 0, "");
    assert_eq!(volume_sha(a, &v1), volume_sha(a, &target));
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

/// Restarts the primary of `s` with its links held down until its view
/// is read (suspended, `reason` if given), then lets them come back; the
/// pair resumes by itself, or with `essctl pprc resume` unless its reason
/// is `primary restarted`. Returns the view at the restart and the bytes
/// the resync sent once the pair is duplex.
fn restart_and_resync(s: &mut Sites, va: &str, reason: Option<&str>) -> (serde_json::Value, u64) {
    s.proxy.drop_all();
    s.a.restart("TSTA1");
    let at_restart = show(&s.a, va);
    assert_eq!(at_restart["state"], "suspended", "{at_restart}");
    if let Some(reason) = reason {
        assert_eq!(at_restart["reason"], reason, "{at_restart}");
    }
    s.proxy.heal();
    if at_restart["reason"] != "primary restarted" {
        path(&s.a, "0x10", "TSTB2", "0x10", "2");
        essctl(&s.a, &["pprc", "resume", va]).ok();
    }
    let v = wait_state(&s.a, va, "duplex");
    let sent = at_restart["bytes_sent"].as_u64().unwrap();
    let total = v["bytes_sent"].as_u64().unwrap();
    assert!(total >= sent, "bytes sent went back: {at_restart}\n{v}");
    (at_restart, total - sent)
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

/// A FlashCopy whose source is a primary of a consistency group ends its
/// background copy while the group holds a write to that source: the end
/// of the relationship waits for the freeze, but nothing else does —
/// FlashCopy requests answer at once, and hosts read the source (the end
/// used to wait for the source's gate, which the held write keeps, with
/// every FlashCopy request behind it and, queued before them, every read
/// of the source, up to the consistency timeout).
#[test]
fn a_flashcopy_ending_while_its_sources_group_holds_stalls_nothing() {
    let (s, [v1, _], _) = group_of_two("pprc-group-flashcopy-end", "60s");
    let a = &s.a;
    let target = a.vol(0x10, 1);
    let rel = format!("{v1}:{target}");
    fill(a, &v1, s.dir_a.path(), 6, 7);
    let before = block_at(a, &v1, 5 * TRACK);
    // 6 MiB of data at 1 MiB/s: still copying when the group holds.
    essctl(a, &["flashcopy", "establish", &rel, "--rate", "1"]).ok();

    s.proxy.drop_all();
    let mut w = spawn_write(a, &v1, 5 * TRACK, 0xE1);
    wait_group(a, "holding");
    let shown = essctl_json(a, &["flashcopy", "show", &rel]);
    assert_eq!(shown["relationships"][0]["state"], "copying", "{shown}");

    // Answered within 5 s, every time, until the copy is complete.
    let answered = |args: &[&str]| -> std::process::Output {
        essctl_async(a, args)
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{args:?} did not answer within 5 s"))
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = answered(&["--json", "flashcopy", "show", &rel]);
        let copying = String::from_utf8_lossy(&out.stdout).contains("\"copying\"");
        if !copying {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never completed");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A moment for the end to begin (it used to wait for the gate then).
    std::thread::sleep(Duration::from_millis(500));
    answered(&["flashcopy", "list"]);
    let read = {
        let (uri, (tx, rx)) = (a.uri(&v1), std::sync::mpsc::channel());
        std::thread::spawn(move || {
            let out = tempfile::NamedTempFile::new().unwrap();
            let status = std::process::Command::new("nbdcopy")
                .arg(uri)
                .arg(out.path())
                .status();
            let _ = tx.send(status);
        });
        rx.recv_timeout(Duration::from_secs(5))
    };
    assert!(
        matches!(read, Ok(Ok(ref status)) if status.success()),
        "a read of the source did not complete within 5 s: {read:?}"
    );
    assert_eq!(w.try_wait().unwrap(), None, "the held write completed");

    // The freeze releases the write; the relationship then ends, with the
    // source's content at T0 on the target.
    essctl(a, &["pprc", "freeze"]).ok();
    assert_eq!(wait_child(&mut w, 10), Some(true), "the held write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while essctl(a, &["flashcopy", "show", &rel]).code == 0 {
        assert!(Instant::now() < deadline, "the relationship never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(block_at(a, &target, 5 * TRACK), before);
    assert_eq!(block_at(a, &v1, 5 * TRACK), vec![0xE1; 4096]);
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
    std::thread::sleep(Duration::from_millis(1500));
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

/// Overwrites 4 KiB blocks of the volume at random for `argv[2]` seconds
/// (random generator seeded with `argv[3]`), at most 8 writes in flight and
/// about 150 a second, never two to one block at once; each write's data
/// comes from its block and version. Paced so that most tracks go
/// untouched for several cleaning intervals: their marks are cleared while
/// duplex, and a suspend must record what is written after it. A block
/// whose latest write failed is left out (its content is not known). With
/// a directory `argv[4]`, whenever a file `ask` appears there it is
/// removed and the blocks acknowledged so far are written to `acked.json`,
/// and the writes also end when a file `stop` appears there (`""`: no
/// directory). A tag `argv[5]` prefixes every version (`t1`, `t2`, …: data
/// no untagged writer writes), `argv[6]` sets the seconds between writes
/// (default 0.006), versions count from `argv[7]` (default 0: a writer
/// started again after an earlier one passes the highest version that one
/// wrote), and with a JSON list of blocks `argv[8]` only those are
/// written.
/// Flushes at the end and prints one JSON object: the last acknowledged
/// version of every block written, the number of writes sent, and the
/// errors (errno names) writes and the final flush got. If the connection
/// breaks (the server killed) the writes end there: `broken` says why, and
/// `unsure` holds the blocks whose last write failed or was still in
/// flight, as `[version acknowledged before it (null: none in this run),
/// its version]` (they are not in `acked`).
const OVERWRITE_AT_RANDOM: &str = r#"
import errno, hashlib, json, nbd, os, random, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
end = time.time() + float(sys.argv[2])
rnd = random.Random(int(sys.argv[3]))
asks = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
tag = sys.argv[5] if len(sys.argv) > 5 else ""
pause = float(sys.argv[6]) if len(sys.argv) > 6 else 0.006
base = int(sys.argv[7]) if len(sys.argv) > 7 else 0
choices = json.loads(sys.argv[8]) if len(sys.argv) > 8 else None
def data(b, v):
    return hashlib.sha256(f"{b}:{v}".encode()).digest() * 128
acked, issued, errors, pending, unsure = {}, {}, {}, {}, {}
broken = None
def reap():
    for b, (v, c) in list(pending.items()):
        try:
            if h.aio_command_completed(c):
                acked[b] = v
                unsure.pop(b, None)
                del pending[b]
        except nbd.Error as e:
            name = errno.errorcode.get(e.errnum, e.string) if e.errnum else e.string
            errors[name] = errors.get(name, 0) + 1
            unsure[b] = [acked.pop(b, None), v]
            del pending[b]
def answer_ask():
    ask = os.path.join(asks, "ask")
    if os.path.exists(ask):
        os.remove(ask)
        with open(os.path.join(asks, "acked.tmp"), "w") as f:
            json.dump(acked, f)
        os.rename(os.path.join(asks, "acked.tmp"), os.path.join(asks, "acked.json"))
blocks = h.get_size() // 4096
due = time.time()
try:
    while time.time() < end and not (asks and os.path.exists(os.path.join(asks, "stop"))):
        now = time.time()
        b = rnd.choice(choices) if choices else rnd.randrange(blocks)
        if now >= due and len(pending) < 8 and b not in pending:
            v = issued[b] = issued.get(b, base) + 1
            if tag:
                v = f"{tag}{v}"
            pending[b] = (v, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data(b, v))), b * 4096))
            due = now + pause
        h.poll(max(1, int((due - now) * 1000)))
        reap()
        if asks:
            answer_ask()
    while h.aio_in_flight() > 0:
        h.poll(-1)
        reap()
except nbd.Error as e:
    broken = e.string
    for b, (v, c) in pending.items():
        unsure[b] = [acked.pop(b, None), v]
    pending.clear()
if broken is None:
    try:
        h.flush()
    except nbd.Error as e:
        name = "flush " + (errno.errorcode.get(e.errnum, e.string) if e.errnum else e.string)
        errors[name] = errors.get(name, 0) + 1
    h.shutdown()
out = {"acked": acked, "writes": sum(v - base for v in issued.values()), "errors": errors}
if broken is not None:
    out["broken"], out["unsure"] = broken, unsure
print(json.dumps(out))
"#;

/// Reads the blocks of a JSON object `{block: version}` from an export and
/// prints those whose content is not what [`OVERWRITE_AT_RANDOM`] wrote
/// there in that version (version 0: zeroes, a block never written).
const BLOCKS_NOT_AS_ACKED: &str = r#"
import hashlib, json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
acked = json.loads(sys.stdin.read())
def data(b, v):
    if v == 0:
        return bytes(4096)
    return hashlib.sha256(f"{b}:{v}".encode()).digest() * 128
print(json.dumps([int(b) for b, v in acked.items() if h.pread(4096, int(b) * 4096) != data(b, v)]))
"#;

/// The seed of a fault schedule: `ESSD_FAULT_SEED`, else the test's own.
fn fault_seed(default: u64) -> u64 {
    std::env::var("ESSD_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator for the fault schedule (xorshift64*).
struct Schedule(u64);

impl Schedule {
    /// A schedule drawn from `seed` (spread over the bits: small seeds
    /// differ in their first draws).
    fn new(seed: u64) -> Schedule {
        Schedule(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Milliseconds in `lo..hi`.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// Resumes a suspended pair as an operator would: again until its path
/// is back and the resume is taken.
fn resume_when_the_path_is_back(a: &Essd, volume: &str, seed: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = show(a, volume)["state"].clone();
        if state != "suspended" {
            return;
        }
        if essctl(a, &["pprc", "resume", volume]).code == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the pair could not be resumed: {}",
            show(a, volume)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until a pair is duplex, resuming it whenever it is suspended (a
/// fault may suspend it again after a resume).
fn resume_until_duplex(a: &Essd, volume: &str, seed: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        resume_when_the_path_is_back(a, volume, seed);
        let pair = show(a, volume);
        if pair["state"] == "duplex" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the pair never became duplex: {pair}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A host overwrites blocks of a duplex primary at random for 25 s while
/// the links between the two servers are stalled (past the 2 s
/// acknowledgement timeout and short of it), reset (all, or one of the two
/// links, in either direction), dropped and delayed, and the secondary's
/// server killed (`kill -9`) and restarted, in a seeded random order; the
/// pair is resumed whenever it suspended. No write fails
/// (the pair is not critical); at the end the pair is duplex, the two
/// volumes are equal, and every block holds its last acknowledged write on
/// the secondary. `ESSD_FAULT_SEED` picks another schedule.
#[test]
fn random_link_faults_under_random_overwrites_lose_nothing() {
    let seed = fault_seed(0x5EED_0004);
    let mut s = Sites::start("pprc-faults", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    let uri = s.a.uri(&va);
    let writer = std::thread::spawn(move || {
        let out = python(OVERWRITE_AT_RANDOM, &[&uri, "25", &seed.to_string()]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    });
    let mut schedule = Schedule::new(seed);
    let mut faults = Vec::new();
    // The first fault outlasts the acknowledgement timeout: the pair
    // suspends at least once.
    let mut next = 0;
    while !writer.is_finished() {
        std::thread::sleep(schedule.millis(200, 1000));
        let hold = match faults.len() {
            0 => Duration::from_millis(3000),
            _ => schedule.millis(100, 3000),
        };
        match next {
            0 => s.proxy.stall(),
            1 => s.proxy.reset(),
            2 => s.proxy.reset_one(),
            3 => s.proxy.drop_all(),
            4 => s.proxy.delay(schedule.millis(20, 120)),
            5 => s.proxy.stall_oldest(),
            6 => s.back.reset(),
            7 => s.back.stall(),
            _ => s.b.crash(),
        }
        faults.push((next, hold.as_millis()));
        std::thread::sleep(hold);
        if next == 8 {
            s.b.restart("TSTB2");
        }
        s.proxy.heal();
        s.back.heal();
        resume_when_the_path_is_back(&s.a, &va, seed);
        next = schedule.next() % 9;
    }
    let out = writer.join().unwrap();
    resume_until_duplex(&s.a, &va, seed);
    let acked = out["acked"].as_object().unwrap().len();
    let log = s.a.log();
    let suspends = log.matches("PPRC pair suspended").count();
    let context = format!("seed {seed}, faults (kind, ms) {faults:?}, {suspends} suspends");
    eprintln!("{context}, {acked} blocks written");
    assert!(acked > 1000, "{context}: only {acked} blocks written");
    assert!(suspends >= 1, "{context}: the pair never suspended");
    assert_eq!(
        out["errors"],
        serde_json::json!({}),
        "{context}: the host saw errors"
    );
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "{context}: the volumes differ"
    );
    let wrong = check_blocks(BLOCKS_NOT_AS_ACKED, &s.b, &vb, &out["acked"]);
    assert!(
        wrong.is_empty(),
        "{context}: {} of {acked} blocks on the secondary are not their last acknowledged write: {wrong:?}",
        wrong.len()
    );
}

/// A chain of dependent writes across two volumes, one at a time: write
/// `i` goes to block `i` of the first volume and, once acknowledged, to
/// block `i` of the second (each block holds its number, repeated), until
/// the file `argv[3]` exists; about 300 steps a second. Prints the number
/// of steps and the errors (errno names) writes got.
const DEPENDENT_CHAIN: &str = r#"
import errno, json, nbd, os, struct, sys, time
first, second = nbd.NBD(), nbd.NBD()
first.connect_uri(sys.argv[1])
second.connect_uri(sys.argv[2])
blocks = min(first.get_size(), second.get_size()) // 4096
i, errors = 1, {}
while not os.path.exists(sys.argv[3]) and i < blocks:
    try:
        first.pwrite(struct.pack("<Q", i) * 512, i * 4096)
        second.pwrite(struct.pack("<Q", i) * 512, i * 4096)
    except nbd.Error as e:
        name = errno.errorcode.get(e.errnum, e.string) if e.errnum else e.string
        errors[name] = errors.get(name, 0) + 1
        break
    i += 1
    time.sleep(0.003)
first.flush()
second.flush()
print(json.dumps({"steps": i - 1, "errors": errors}))
"#;

/// Which steps of [`DEPENDENT_CHAIN`] two exports hold: for each, the
/// highest step `n` such that steps 1..=n are all there, and the steps
/// there beyond it (a gap: not a prefix of the chain).
const CHAIN_HELD: &str = r#"
import json, nbd, struct, sys
def held(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    steps = []
    size = h.get_size()
    for offset in range(0, size, 1 << 20):
        chunk = h.pread(min(1 << 20, size - offset), offset)
        for b in range(0, len(chunk), 4096):
            (v,) = struct.unpack_from("<Q", chunk, b)
            if v and v == (offset + b) // 4096:
                steps.append(v)
    steps.sort()
    n = 0
    while n < len(steps) and steps[n] == n + 1:
        n += 1
    return {"prefix": n, "beyond": steps[n:][:10]}
print(json.dumps([held(sys.argv[1]), held(sys.argv[2])]))
"#;

/// Two pairs of a consistency group (on two LSSs, each path one link)
/// under a chain of dependent writes while the links are stalled,
/// dropped or reset in a seeded random order (`ESSD_FAULT_SEED`); each
/// time the group holds, it is frozen by hand at a random moment or by
/// its 2 s timeout. While the pairs are suspended the secondaries hold
/// one cut of the chain: steps 1..=k on the first, 1..=j on the second,
/// nothing beyond, and k is j or j + 1 — never a later write without the
/// earlier one. After a resume the volumes end equal, and the host saw no
/// error.
#[test]
fn random_link_faults_keep_the_group_dependent_write_consistent() {
    let seed = fault_seed(0x5EED_0005);
    let group = "consistency_group = true\nconsistency_timeout = \"2s\"";
    let s = Sites::start("pprc-group-faults", |cfg| {
        cfg.lss_extra = vec![(0x10, group.into()), (0x11, group.into())];
    });
    let (a, b) = (&s.a, &s.b);
    path(a, "0x10", "TSTB2", "0x10", "1");
    path(a, "0x11", "TSTB2", "0x11", "1");
    let (v1, v2) = (a.vol(0x10, 0), a.vol(0x11, 0));
    let (s1, s2) = (b.vol(0x10, 0), b.vol(0x11, 0));
    for (v, sv) in [(&v1, &s1), (&v2, &s2)] {
        essctl(a, &["pprc", "establish", v, sv, "--mode", "nocopy"]).ok();
    }
    let stop = tempfile::tempdir().unwrap();
    let stop_file = stop.path().join("stop");
    let writer = {
        let args = [a.uri(&v1), a.uri(&v2), stop_file.display().to_string()];
        std::thread::spawn(move || {
            let out = python(DEPENDENT_CHAIN, &[&args[0], &args[1], &args[2]]);
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        })
    };
    let mut schedule = Schedule::new(seed);
    let mut rounds = Vec::new();
    for round in 0..6 {
        std::thread::sleep(schedule.millis(300, 1200));
        let kind = if round == 0 { 0 } else { schedule.next() % 4 };
        match kind {
            0 => s.proxy.stall(),
            1 => s.proxy.drop_all(),
            2 => s.proxy.stall_oldest(),
            _ => s.proxy.reset(),
        }
        // Held writes: frozen by hand after a while, or by the timeout.
        let freeze_after = (schedule.next() % 2 == 0).then(|| schedule.millis(100, 1500));
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut held = false;
        while Instant::now() < deadline {
            if essctl_json(a, &["pprc", "group"])["group"]["state"] == "holding" {
                held = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if held {
            if let Some(after) = freeze_after {
                std::thread::sleep(after);
                // Too late, once the timeout released the writes, it
                // freezes on demand: undone, not to hold the chain.
                let f = essctl_json(a, &["pprc", "freeze"]);
                if f["group"]["state"] == "frozen" {
                    essctl(a, &["pprc", "unfreeze"]).ok();
                }
            }
            for v in [&v1, &v2] {
                wait_state(a, v, "suspended");
            }
        }
        s.proxy.heal();
        let states: Vec<_> = [&v1, &v2]
            .iter()
            .map(|v| show(a, v)["state"].clone())
            .collect();
        rounds.push((kind, held, freeze_after.map(|d| d.as_millis())));
        let context = format!("seed {seed}, rounds (fault, held, frozen after ms) {rounds:?}");
        if states.iter().any(|s| s == "suspended") {
            assert!(
                states.iter().all(|s| s == "suspended"),
                "{context}: one pair of the group suspended alone: {states:?}"
            );
            let text = python(CHAIN_HELD, &[&b.uri(&s1), &b.uri(&s2)]);
            let held: serde_json::Value = serde_json::from_str(&text).unwrap();
            let (k, j) = (
                held[0]["prefix"].as_u64().unwrap(),
                held[1]["prefix"].as_u64().unwrap(),
            );
            assert_eq!(
                held[0]["beyond"],
                serde_json::json!([]),
                "{context}: {held}"
            );
            assert_eq!(
                held[1]["beyond"],
                serde_json::json!([]),
                "{context}: {held}"
            );
            assert!(
                k == j || k == j + 1,
                "{context}: the secondaries hold steps 1..={k} and 1..={j}"
            );
        }
        for v in [&v1, &v2] {
            resume_until_duplex(a, v, seed);
        }
    }
    std::fs::write(&stop_file, b"").unwrap();
    let out = writer.join().unwrap();
    let context = format!("seed {seed}, rounds (fault, held, frozen after ms) {rounds:?}");
    eprintln!("{context}: {out}");
    assert_eq!(
        out["errors"],
        serde_json::json!({}),
        "{context}: the host saw errors"
    );
    assert!(
        rounds.iter().any(|r| r.1),
        "{context}: the group never held"
    );
    for (v, sv) in [(&v1, &s1), (&v2, &s2)] {
        resume_until_duplex(a, v, seed);
        assert_eq!(volume_sha(a, v), volume_sha(b, sv), "{context}: {v}");
    }
}

/// The blocks acknowledged so far by a running [`OVERWRITE_AT_RANDOM`]
/// started with the directory `asks`.
fn acked_so_far(asks: &Path) -> serde_json::Value {
    let answer = asks.join("acked.json");
    let _ = std::fs::remove_file(&answer);
    std::fs::write(asks.join("ask"), b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answer.exists() {
        assert!(Instant::now() < deadline, "the writer did not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
    serde_json::from_slice(&std::fs::read(&answer).unwrap()).unwrap()
}

/// Asserts that every block of `acked` ({block: version}) holds that
/// version on `export` of `essd` (what [`OVERWRITE_AT_RANDOM`] wrote).
fn assert_acked_on(essd: &Essd, export: &str, acked: serde_json::Value, what: &str) {
    let missing = check_blocks(BLOCKS_NOT_AS_ACKED, essd, export, &acked);
    assert!(
        missing.is_empty(),
        "{what}: {} acknowledged writes are not on {export}: {missing:?}",
        missing.len()
    );
}

/// Establishes `va` → `vb` from `essd` as a critical pair, without copy.
fn establish_critical_nocopy(essd: &Essd, va: &str, vb: &str) {
    let args = [
        "pprc",
        "establish",
        va,
        vb,
        "--mode",
        "nocopy",
        "--critical",
    ];
    essctl(essd, &args).ok();
}

/// A critical pair on a critical heavy LSS under random overwrites while
/// its links are stalled past the timeout, dropped, reset (all or one)
/// and its secondary's server killed, in a seeded random order
/// (`ESSD_FAULT_SEED`). Whenever the pair suspends, the primary is
/// write-inhibited and, before the resume, every write the host saw
/// acknowledged is on the secondary: a write that could not be mirrored
/// failed (EIO) rather than being acknowledged. At the end the volumes
/// are equal and the host saw no error but EIO.
#[test]
fn random_link_faults_never_leave_an_acknowledged_write_off_a_critical_heavy_secondary() {
    let seed = fault_seed(0x5EED_0006);
    let mut s = Sites::start("pprc-heavy-faults", |cfg| {
        cfg.lss_extra = vec![(0x11, "critical_heavy = true".into())];
    });
    let (va, vb) = (s.a.vol(0x11, 0), s.b.vol(0x11, 0));
    path(&s.a, "0x11", "TSTB2", "0x11", "2");
    establish_critical_nocopy(&s.a, &va, &vb);
    let asks = tempfile::tempdir().unwrap();
    let writer = {
        let args = [
            s.a.uri(&va),
            seed.to_string(),
            asks.path().display().to_string(),
        ];
        std::thread::spawn(move || {
            let out = python(OVERWRITE_AT_RANDOM, &[&args[0], "600", &args[1], &args[2]]);
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        })
    };
    let mut schedule = Schedule::new(seed);
    let mut rounds = Vec::new();
    let end = Instant::now() + Duration::from_secs(25);
    while Instant::now() < end {
        std::thread::sleep(schedule.millis(300, 1200));
        let kind = if rounds.is_empty() {
            0
        } else {
            schedule.next() % 5
        };
        let hold = schedule.millis(2500, 3500);
        match kind {
            0 => s.proxy.stall(),
            1 => s.proxy.drop_all(),
            2 => s.proxy.reset(),
            3 => s.proxy.stall_oldest(),
            _ => s.b.crash(),
        }
        std::thread::sleep(hold);
        if kind == 4 {
            s.b.restart("TSTB2");
        }
        let pair = show(&s.a, &va);
        let suspended = pair["state"] == "suspended";
        rounds.push((kind, suspended));
        let context = format!("seed {seed}, rounds (fault, suspended) {rounds:?}");
        if suspended {
            assert_eq!(pair["write_inhibited"], true, "{context}: {pair}");
            let acked = acked_so_far(asks.path());
            let missing = check_blocks(BLOCKS_NOT_AS_ACKED, &s.b, &vb, &acked);
            assert!(
                missing.is_empty(),
                "{context}: {} acknowledged writes are not on the secondary: {missing:?}",
                missing.len()
            );
        }
        s.proxy.heal();
        resume_until_duplex(&s.a, &va, seed);
    }
    std::fs::write(asks.path().join("stop"), b"").unwrap();
    let out = writer.join().unwrap();
    let context = format!("seed {seed}, rounds (fault, suspended) {rounds:?}");
    eprintln!("{context}: errors {}", out["errors"]);
    assert!(rounds.iter().any(|r| r.1), "{context}: never suspended");
    let errors = out["errors"].as_object().unwrap();
    assert!(
        errors.keys().all(|e| e == "EIO"),
        "{context}: the host saw errors other than EIO: {errors:?}"
    );
    assert!(errors.contains_key("EIO"), "{context}: no write failed");
    resume_until_duplex(&s.a, &va, seed);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb), "{context}");
}

/// Links of the path in [`random_multi_link_faults_inhibit_a_critical_primary_only_when_the_last_link_is_lost`].
const CRITICAL_LINKS: u64 = 4;

/// The state of the path 0x10 → TSTB2 0x10 at `essd`: `up`, `degraded`
/// or `down`.
fn path_state(essd: &Essd) -> String {
    let list = essctl(essd, &["--json", "pprc", "path", "list"]).json();
    list["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["lss"] == "0x10" && p["peer"] == "TSTB2" && p["peer_lss"] == "0x10")
        .map(|p| p["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A critical pair (not critical heavy) over a path of four links, a host
/// overwriting blocks at random (each round its own blocks, a writer of
/// its own), and a seeded schedule of rounds (`ESSD_FAULT_SEED`): links
/// reset, one to three of the four; one link stalled past the 2 s
/// timeout; every link dropped; or some reset and then the rest dropped.
/// While a link is up the primary is never write-inhibited: with links
/// reset the pair stays duplex, the path degraded, and no write fails; a
/// stalled link suspends the pair (`link lost`, the link did not answer)
/// without inhibiting it, and no write fails. Once every link is lost
/// the pair suspends write-inhibited: every write the host saw
/// acknowledged is on the secondary (read before the resume), no write is
/// acknowledged any more, and the inhibition lasts after the links are
/// back until the resume, whose resync makes the pair duplex and the
/// primary writable. At the end the volumes are equal.
#[test]
fn random_multi_link_faults_inhibit_a_critical_primary_only_when_the_last_link_is_lost() {
    let seed = fault_seed(0x5EED_0009);
    let s = Sites::start("pprc-critical-faults", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let links = CRITICAL_LINKS.to_string();
    path(&s.a, "0x10", "TSTB2", "0x10", &links);
    establish_critical_nocopy(&s.a, &va, &vb);
    let mut schedule = Schedule::new(seed);
    let mut rounds: Vec<(u64, u64, String)> = Vec::new();
    let mut acked_all = serde_json::Map::new();
    let mut degraded_seen = false;
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && rounds.len() < 24 {
        path(&s.a, "0x10", "TSTB2", "0x10", &links);
        assert_eq!(show(&s.a, &va)["state"], "duplex");
        let round = rounds.len() as u64;
        // Each round writes its own 600 blocks: a block whose write failed
        // is never written again, so the acknowledged versions of every
        // round together are what the secondary must hold.
        let blocks: Vec<u64> = (round * 600..(round + 1) * 600).collect();
        let asks = tempfile::tempdir().unwrap();
        let writer = {
            let args = [
                s.a.uri(&va),
                (seed + round).to_string(),
                asks.path().display().to_string(),
                format!("r{round}v"),
                serde_json::json!(blocks).to_string(),
            ];
            std::thread::spawn(move || {
                let out = python(
                    OVERWRITE_AT_RANDOM,
                    &[
                        &args[0], "60", &args[1], &args[2], &args[3], "0.006", "0", &args[4],
                    ],
                );
                serde_json::from_str::<serde_json::Value>(&out).unwrap()
            })
        };
        std::thread::sleep(schedule.millis(400, 800));
        // The first round cuts some links only.
        let kind = if round == 0 { 0 } else { schedule.next() % 4 };
        let cut = 1 + schedule.next() % (CRITICAL_LINKS - 1);
        let mut seen = Vec::new();
        if kind == 0 || kind == 3 {
            for _ in 0..cut {
                s.proxy.reset_one();
                std::thread::sleep(Duration::from_millis(50));
            }
            let until = Instant::now() + schedule.millis(800, 1500);
            while Instant::now() < until {
                seen.push(path_state(&s.a));
                std::thread::sleep(Duration::from_millis(20));
            }
            degraded_seen |= seen.iter().any(|p| p == "degraded");
        }
        let prefix = format!(
            "seed {seed}, rounds (fault, links cut, outcome) {rounds:?}, this round kind {kind} cut {cut}"
        );
        let context = |note: &str| format!("{prefix}: {note}");
        if kind == 0 || kind == 3 {
            assert!(
                !seen.iter().any(|p| p == "down"),
                "{}",
                context(&format!("path states {seen:?}"))
            );
            let pair = show(&s.a, &va);
            assert_eq!(pair["state"], "duplex", "{}", context(&pair.to_string()));
            assert_eq!(
                pair["write_inhibited"],
                false,
                "{}",
                context(&pair.to_string())
            );
        }
        let outcome = match kind {
            0 => "duplex".to_string(),
            1 => {
                s.proxy.stall_oldest();
                std::thread::sleep(schedule.millis(2600, 3400));
                let pair = show(&s.a, &va);
                let note = context(&pair.to_string());
                assert_eq!(pair["state"], "suspended", "{note}");
                assert_eq!(pair["reason"], "link lost", "{note}");
                assert_eq!(pair["detail"], "TSTB2 did not answer within 2s", "{note}");
                assert_eq!(pair["write_inhibited"], false, "{note}");
                assert_ne!(path_state(&s.a), "down", "{note}");
                "suspended, writable".to_string()
            }
            _ => {
                s.proxy.drop_all();
                std::thread::sleep(schedule.millis(800, 1500));
                let pair = show(&s.a, &va);
                let note = context(&pair.to_string());
                assert_eq!(pair["state"], "suspended", "{note}");
                assert_eq!(pair["reason"], "link lost", "{note}");
                assert_eq!(pair["write_inhibited"], true, "{note}");
                // Every write acknowledged so far is on the secondary.
                let acked = acked_so_far(asks.path());
                let mut so_far = acked_all.clone();
                so_far.extend(acked.as_object().unwrap().clone());
                assert_acked_on(&s.b, &vb, serde_json::Value::Object(so_far), &note);
                // The links come back; the primary stays inhibited and
                // acknowledges no write until the resume.
                s.proxy.heal();
                path(&s.a, "0x10", "TSTB2", "0x10", &links);
                std::thread::sleep(Duration::from_millis(300));
                let later = acked_so_far(asks.path());
                for (b, v) in later.as_object().unwrap() {
                    assert_eq!(
                        acked.get(b),
                        Some(v),
                        "{note}: block {b} acknowledged (version {v}) while write-inhibited"
                    );
                }
                assert_eq!(try_write(&s.a, &va), "writable EIO", "{note}");
                let pair = show(&s.a, &va);
                assert_eq!(pair["state"], "suspended", "{note}: {pair}");
                assert_eq!(pair["write_inhibited"], true, "{note}: {pair}");
                "suspended, inhibited".to_string()
            }
        };
        std::fs::write(asks.path().join("stop"), b"").unwrap();
        let out = writer.join().unwrap();
        let errors = out["errors"].as_object().unwrap();
        let note = context(&format!("writer {out}"));
        if kind < 2 {
            assert!(
                errors.is_empty(),
                "{note}: a write failed while a link was up"
            );
            assert!(
                out["acked"].as_object().unwrap().len() > 20,
                "{note}: too few writes acknowledged"
            );
        } else {
            assert!(
                errors.keys().all(|e| e == "EIO"),
                "{note}: errors other than EIO"
            );
            assert!(errors.contains_key("EIO"), "{note}: no write failed");
        }
        acked_all.extend(out["acked"].as_object().unwrap().clone());
        rounds.push((kind, cut, outcome));
        s.proxy.heal();
        resume_until_duplex(&s.a, &va, seed);
        let pair = show(&s.a, &va);
        assert_eq!(
            pair["write_inhibited"],
            false,
            "{}",
            context(&pair.to_string())
        );
    }
    let context = format!("seed {seed}, rounds (fault, links cut, outcome) {rounds:?}");
    eprintln!("{context}");
    assert!(degraded_seen, "{context}: the path was never seen degraded");
    assert_acked_on(&s.b, &vb, serde_json::Value::Object(acked_all), &context);
    assert_eq!(volume_sha(&s.a, &va), volume_sha(&s.b, &vb), "{context}");
}

/// Writes version `v` of each block of the JSON object `{block: v}` in
/// `argv[2]` (the data [`BLOCKS_NOT_AS_ACKED`] expects there), one write
/// at a time, then flushes.
const WRITE_VERSIONS: &str = r#"
import hashlib, json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for b, v in json.loads(sys.argv[2]).items():
    h.pwrite(hashlib.sha256(f"{b}:{v}".encode()).digest() * 128, int(b) * 4096)
h.flush()
h.shutdown()
"#;

/// Writes each block of `versions` with [`WRITE_VERSIONS`].
fn write_versions(essd: &Essd, export: &str, versions: &BTreeMap<u64, u64>) {
    python(
        WRITE_VERSIONS,
        &[&essd.uri(export), &serde_json::json!(versions).to_string()],
    );
}

/// Delay of every chunk on the link while a failback copies: a copy of a
/// few dozen tracks lasts long enough to be hit in its middle, and no
/// request misses the 2 s timeout by the delay alone.
const COPY_DELAY: Duration = Duration::from_millis(5);

/// The 4 KiB blocks hosts write in [`random_faults_during_failback_and_switch_back_lose_nothing`]:
/// `blocks` spread over the last 64-track region of a 64 MiB volume (one
/// bitmap region; the rest of that region is a hole, and the rest of the
/// volume is filled alike on both sides and never written), and the
/// version of each that the side that was primary wrote last: what both
/// volumes must hold in the end.
struct Slots {
    blocks: Vec<u64>,
    expected: BTreeMap<u64, u64>,
    version: u64,
    writes: u64,
}

impl Slots {
    /// 192 distinct blocks of the region, none written yet.
    fn new(schedule: &mut Schedule) -> Slots {
        let first = (64 << 20) / 4096 - 64 * TRACK / 4096;
        let mut blocks = BTreeSet::new();
        while blocks.len() < 192 {
            blocks.insert(first + schedule.next() % (64 * TRACK / 4096));
        }
        Slots {
            blocks: blocks.into_iter().collect(),
            expected: BTreeMap::new(),
            version: 0,
            writes: 0,
        }
    }

    /// `count` of the blocks, drawn from `schedule` (distinct).
    fn pick(&self, schedule: &mut Schedule, count: usize) -> Vec<u64> {
        let mut picked = BTreeSet::new();
        while picked.len() < count {
            picked.insert(self.blocks[(schedule.next() % self.blocks.len() as u64) as usize]);
        }
        picked.into_iter().collect()
    }

    /// Writes a new version of each of `blocks` on `export` (flushed),
    /// expected in the end if `kept` (not a write the failback is to
    /// overwrite); returns their tracks.
    fn write(&mut self, essd: &Essd, export: &str, blocks: &[u64], kept: bool) -> BTreeSet<u64> {
        let batch: BTreeMap<u64, u64> = blocks
            .iter()
            .map(|&b| {
                self.version += 1;
                (b, self.version)
            })
            .collect();
        write_versions(essd, export, &batch);
        self.writes += blocks.len() as u64;
        if kept {
            self.expected.extend(&batch);
        }
        blocks.iter().map(|b| b * 4096 / TRACK).collect()
    }

    /// Blocks of `export` that do not hold their expected version.
    fn wrong(&self, essd: &Essd, export: &str) -> Vec<u64> {
        check_blocks(
            BLOCKS_NOT_AS_ACKED,
            essd,
            export,
            &serde_json::json!(self.expected),
        )
    }
}

/// Brings a pair back as the README says: a pair suspended by a restart
/// of its primary resynchronises by itself once its path is up; any other
/// suspended pair is resumed at the primary.
fn bring_back(primary: &Essd, volume: &str, seed: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pair = show(primary, volume);
        if pair["state"] != "suspended" || pair["reason"] != "primary restarted" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the restarted primary never resynchronised by itself: {pair}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    resume_when_the_path_is_back(primary, volume, seed);
}

/// Waits until `link` has carried `at` bytes forward, the pair of `pv`
/// at `primary` is no longer duplex pending, or 10 s have passed; notes
/// (time, tracks the copy has left) in `progress` meanwhile. Returns the
/// pair's state.
fn wait_for_copy_point(
    primary: &Essd,
    pv: &str,
    link: &FaultProxy,
    at: u64,
    progress: &mut Vec<(Instant, u64)>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut looked = Instant::now();
    loop {
        if looked.elapsed() > Duration::from_millis(100) || link.bytes_forward() >= at {
            let pair = show(primary, pv);
            if let Some(left) = pair["out_of_sync_tracks"].as_u64() {
                progress.push((Instant::now(), left));
            }
            if pair["state"] != "duplex pending"
                || link.bytes_forward() >= at
                || Instant::now() >= deadline
            {
                return pair["state"].as_str().unwrap().to_string();
            }
            looked = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A fault for the middle of a copy, drawn from `schedule`: its kind (see
/// [`inject_copy_fault`]) and how long it lasts — a stall short of the
/// 2 s timeout or past it, a drop for a while; resets and crashes are
/// instants.
fn draw_copy_fault(schedule: &mut Schedule) -> (u64, Duration) {
    let kind = schedule.next() % 8;
    let hold = match kind {
        0 => schedule.millis(100, 1500),
        1 | 2 => schedule.millis(2500, 3500),
        5 => schedule.millis(300, 3000),
        _ => Duration::ZERO,
    };
    (kind, hold)
}

/// Injects a fault of `kind`: the link stalled (0, 1: all links; 2: the
/// oldest), reset (3: all; 4: one), dropped (5), or `kill -9` and restart
/// of the primary's server (6) or the secondary's (7). [`heal`] the link
/// after the fault's hold.
///
/// [`heal`]: FaultProxy::heal
fn inject_copy_fault(kind: u64, primary: &mut Essd, secondary: &mut Essd, link: &FaultProxy) {
    match kind {
        0 | 1 => link.stall(),
        2 => link.stall_oldest(),
        3 => link.reset(),
        4 => link.reset_one(),
        5 => link.drop_all(),
        6 => {
            let serial = primary.serial.clone();
            primary.kill_and_restart(&serial);
        }
        _ => {
            let serial = secondary.serial.clone();
            secondary.kill_and_restart(&serial);
        }
    }
}

/// The copy of a failback started at `primary` (volume `pv`, the one that
/// took over) to `secondary` over `link`, hit by one or two faults drawn
/// from `schedule`, each at a random point of what is left to copy: the
/// link stalled short of the 2 s timeout or past it (all links, or the
/// oldest), reset (all, or one of the two), dropped for a while, or
/// `kill -9` and restart of either server. After each, hosts write
/// `primary` again and the pair is brought back ([`bring_back`]); in the
/// end the pair is duplex and the link healed.
fn copy_under_faults(
    primary: &mut Essd,
    pv: &str,
    secondary: &mut Essd,
    link: &FaultProxy,
    slots: &mut Slots,
    schedule: &mut Schedule,
    seed: u64,
) -> FaultedCopy {
    let per_track = slots.blocks.len() as u64 * 4096 / 64;
    let writes_before = slots.writes;
    let (mut faults, mut written) = (Vec::new(), BTreeSet::new());
    for _ in 0..1 + schedule.next() % 2 {
        let left = show(primary, pv)["out_of_sync_tracks"].as_u64().unwrap();
        let at = link.bytes_forward() + schedule.next() % (left * per_track).max(1);
        let state = wait_for_copy_point(primary, pv, link, at, &mut Vec::new());
        let (kind, hold) = draw_copy_fault(schedule);
        inject_copy_fault(kind, primary, secondary, link);
        std::thread::sleep(hold);
        link.heal();
        link.delay(COPY_DELAY);
        faults.push((kind, hold.as_millis(), state));
        // Hosts write on, before the pair is back: recorded, or mirrored
        // if it did not suspend.
        let n = 1 + (schedule.next() % 8) as usize;
        let blocks = slots.pick(schedule, n);
        written.extend(slots.write(primary, pv, &blocks, true));
        bring_back(primary, pv, seed);
    }
    resume_until_duplex(primary, pv, seed);
    link.heal();
    FaultedCopy {
        bound: copy_bound(slots, faults.len(), slots.writes - writes_before),
        sent: link.bytes_forward(),
        faults,
        written,
    }
}

/// What [`copy_under_faults`] did.
struct FaultedCopy {
    /// (kind, hold in ms, the pair's state when it came) of each fault.
    faults: Vec<(u64, u128, String)>,
    /// The tracks hosts wrote meanwhile.
    written: BTreeSet<u64>,
    /// Bytes the link carried forward since its counters were reset.
    sent: u64,
    /// The most the copy may have sent ([`copy_bound`]).
    bound: u64,
}

/// What the last failback started at `essd` copied, from its log: the
/// tracks, and how many of them the old primary handed over.
fn failback_copied(essd: &Essd) -> (usize, usize) {
    let log = essd.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("event=pprc.pair.failback") && l.contains(": copying "))
        .unwrap_or_else(|| panic!("no failback in the log of {}", essd.serial));
    let words: Vec<&str> = line
        .split(": copying ")
        .nth(1)
        .unwrap()
        .split(' ')
        .collect();
    (
        words[0].parse().unwrap(),
        words[2].trim_start_matches('(').parse().unwrap(),
    )
}

/// The most a failback's copy under `faults` faults may send when hosts
/// made `writes` writes meanwhile: each pass of the copy sends at most
/// the written blocks of the one region hosts write (the tracks are
/// marked exactly, or, after a crash of the primary, whole regions from
/// its bitmap file: still that one region, whose other blocks are a
/// hole), and each fault costs at most one more pass and the resending
/// of what was in flight; plus the mirrored writes and the links'
/// handshakes.
fn copy_bound(slots: &Slots, faults: usize, writes: u64) -> u64 {
    let pass = slots.blocks.len() as u64 * 4096 + (64 << 10);
    (1 + 2 * faults as u64) * pass + writes * (4096 + 512) + (256 << 10)
}

/// The failover / failback / switch-back cycle under seeded random
/// faults (`ESSD_FAULT_SEED`): A → B duplex, A loses its links and hosts
/// write on there (never mirrored), failover at B and hosts write B,
/// failback B → A, then (hosts stopped at B) failover at A, hosts write
/// A, failback A → B. Each failback's copy is hit by one or two faults
/// (link stalls short of and past the timeout, resets, drops, `kill -9` of
/// either server) and brought back as the README says. The failback
/// copies exactly the union of both sides' changed tracks (the switch
/// back: A's alone, B having none); at the end the pair is duplex and
/// current, the volumes are equal, every written block holds the last
/// write made on the side that was primary then (A's unmirrored writes
/// overwritten by B's data), and the two failbacks sent far less than a
/// full copy.
#[test]
fn random_faults_during_failback_and_switch_back_lose_nothing() {
    let seed = fault_seed(0x5EED_0007);
    let started = Instant::now();
    let mut s = Sites::start("pprc-cycle-faults", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    // Alike on both sides (a full copy would send 60 MiB of data) but
    // for the last region, a hole but for the blocks hosts write, written
    // alike too: the pair starts with no track marked, so A hands over
    // exactly what it writes from then on.
    fill(&s.a, &va, s.dir_a.path(), 60, 71);
    fill(&s.b, &vb, s.dir_b.path(), 60, 71);
    let mut schedule = Schedule::new(seed);
    let mut slots = Slots::new(&mut schedule);
    let all = slots.blocks.clone();
    slots.write(&s.a, &va, &all, true);
    write_versions(&s.b, &vb, &slots.expected);
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.a, &va, "duplex");

    // A loses its links and hosts write on: never mirrored.
    s.proxy.drop_all();
    let n = 4 + (schedule.next() % 8) as usize;
    let cut = slots.pick(&mut schedule, n);
    let on_a_alone = slots.write(&s.a, &va, &cut, false);
    assert_eq!(show(&s.a, &va)["reason"], "link lost", "seed {seed}");

    // Failover at B; hosts write B.
    let p = essctl_json(&s.b, &["pprc", "failover", &vb]);
    assert_eq!(
        (
            p["role"].as_str(),
            p["state"].as_str(),
            p["reason"].as_str()
        ),
        (Some("primary"), Some("suspended"), Some("failover")),
        "seed {seed}: {p}"
    );
    let n = 8 + (schedule.next() % 24) as usize;
    let b_blocks = slots.pick(&mut schedule, n);
    let on_b = slots.write(&s.b, &vb, &b_blocks, true);

    // Failback B → A: the union of both sides' tracks, under faults.
    s.proxy.heal();
    path(&s.b, "0x10", "TSTA1", "0x10", "2");
    s.back.reset_counters();
    s.back.delay(COPY_DELAY);
    let p = essctl_json(&s.b, &["pprc", "failback", &vb]);
    assert_eq!(
        (p["role"].as_str(), p["state"].as_str()),
        (Some("primary"), Some("duplex pending")),
        "seed {seed}: {p}"
    );
    let union = on_a_alone.union(&on_b).count();
    assert_eq!(
        failback_copied(&s.b),
        (union, on_a_alone.len()),
        "seed {seed}: the failback's tracks (copied, handed over by A) are not the union of \
         {on_b:?} written on B and {on_a_alone:?} on A alone"
    );
    let back = copy_under_faults(
        &mut s.b,
        &vb,
        &mut s.a,
        &s.back,
        &mut slots,
        &mut schedule,
        seed,
    );
    let context = format!(
        "seed {seed}, failback faults (kind, ms, state) {:?}",
        back.faults
    );
    let wrong = slots.wrong(&s.a, &va);
    assert!(
        wrong.is_empty(),
        "{context}: blocks of A not as B's hosts (or A's before the cut) wrote them: {wrong:?}"
    );
    assert_eq!(show(&s.a, &va)["role"], "secondary", "{context}");

    // Switch back, hosts stopped at B: failover at A, hosts write A,
    // failback A → B, under faults. B hands over at most the tracks its
    // hosts wrote during the failback's copy (marks not cleared yet).
    let p = essctl_json(&s.a, &["pprc", "failover", &va]);
    assert_eq!(p["reason"], "failover", "{context}: {p}");
    let n = 8 + (schedule.next() % 24) as usize;
    let on_a = slots.pick(&mut schedule, n);
    let on_a = slots.write(&s.a, &va, &on_a, true);
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    s.proxy.reset_counters();
    s.proxy.delay(COPY_DELAY);
    let p = essctl_json(&s.a, &["pprc", "failback", &va]);
    assert_eq!(p["state"], "duplex pending", "{context}: {p}");
    let (copied, handed) = failback_copied(&s.a);
    assert!(
        handed <= back.written.len() && (on_a.len()..=on_a.len() + handed).contains(&copied),
        "{context}: the switch-back copies {copied} tracks, {handed} handed over by B, for \
         {on_a:?} written on A and {:?} on B during the failback's copy",
        back.written
    );
    let switch = copy_under_faults(
        &mut s.a,
        &va,
        &mut s.b,
        &s.proxy,
        &mut slots,
        &mut schedule,
        seed,
    );
    let context = format!("{context}, switch-back faults {:?}", switch.faults);

    wait_current(&s.a, &va);
    let pair = show(&s.a, &va);
    assert_eq!(
        (
            pair["role"].as_str(),
            pair["state"].as_str(),
            pair["replication_status"].as_str()
        ),
        (Some("primary"), Some("duplex"), Some("current")),
        "{context}: {pair}"
    );
    let side = wait_state(&s.b, &vb, "duplex");
    assert_eq!(side["role"], "secondary", "{context}: {side}");
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "{context}: the volumes differ"
    );
    for (essd, v) in [(&s.a, &va), (&s.b, &vb)] {
        let wrong = slots.wrong(essd, v);
        assert!(
            wrong.is_empty(),
            "{context}: blocks of {v} not as last written on the primary of the time: {wrong:?}"
        );
    }
    let (back_sent, back_bound) = (back.sent, back.bound);
    let (switch_sent, switch_bound) = (switch.sent, switch.bound);
    eprintln!(
        "{context}: failback sent {back_sent} bytes (bound {back_bound}), switch-back \
         {switch_sent} (bound {switch_bound}), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        back_sent >= cut.iter().chain(&b_blocks).collect::<BTreeSet<_>>().len() as u64 * 4096
            && back_sent <= back_bound,
        "{context}: the failback sent {back_sent} bytes for {union} tracks (bound {back_bound})"
    );
    assert!(
        switch_sent >= on_a.len() as u64 * 4096 && switch_sent <= switch_bound,
        "{context}: the switch-back sent {switch_sent} bytes for {} tracks (bound {switch_bound})",
        on_a.len()
    );
    assert!(
        back_bound + switch_bound < (60 << 20) / 6,
        "{context}: the bounds are no proof of partial copies"
    );
}

/// Reads every 4 KiB block of an export and prints those that do not hold
/// what the JSON input `{"image": FILE, "acked": {block: version}}` says:
/// the version [`OVERWRITE_AT_RANDOM`] last wrote there if the block is in
/// `acked`, else the block of `image` (zeros past its end).
const BLOCKS_NOT_AS_IMAGE_AND_ACKED: &str = r#"
import hashlib, json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
want = json.loads(sys.stdin.read())
acked = want["acked"]
with open(want["image"], "rb") as f:
    image = f.read()
def data(b, v):
    return hashlib.sha256(f"{b}:{v}".encode()).digest() * 128
wrong, size, step = [], h.get_size(), 1 << 20
for off in range(0, size, step):
    chunk = h.pread(min(step, size - off), off)
    for i in range(0, len(chunk), 4096):
        b = (off + i) // 4096
        v = acked.get(str(b))
        expect = data(b, v) if v is not None else image[b * 4096:(b + 1) * 4096].ljust(4096, b"\0")
        if chunk[i:i + 4096] != expect:
            wrong.append(b)
print(json.dumps(wrong))
"#;

/// Tracks of a FlashCopy relationship that `volume` is in still to be
/// copied; `None` once it has none.
fn flashcopy_remaining(essd: &Essd, volume: &str) -> Option<u64> {
    let run = essctl(essd, &["--json", "flashcopy", "show", volume]);
    if run.code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    v["relationships"][0]["tracks_remaining"].as_u64()
}

/// A FlashCopy target as the primary of a PPRC pair, under seeded random
/// link faults (`ESSD_FAULT_SEED`). At A, S (24 MiB of data, then a hole)
/// is copied onto T (48 MiB of other data) with a background copy at
/// 0.75 to 2 MiB/s or NOCOPY; then T → T' at B is established (its copy
/// reads T's point-in-time view) and hosts overwrite random blocks of S
/// (each first copying its track's T0 content into T) and of T, while
/// the links A → B are stalled short of and past the 2 s timeout, reset
/// (all or one), dropped, or B is killed (`kill -9`) and restarted; each
/// suspended pair is resumed, the FlashCopy still copying. At a random
/// fault a withdraw is tried: refused while tracks are uncopied (the pair
/// exists). A background copy is let finish, so T's own blocks are what
/// is read. In the end the pair is duplex and current, no host write
/// failed, S holds its T0 data but for its last acknowledged writes, T
/// and T' hold S's T0 data but for the last acknowledged writes to T —
/// none of T's own data from before T0 — and T' equals T.
#[test]
fn random_link_faults_on_a_flashcopy_target_as_primary_lose_nothing() {
    let seed = fault_seed(0x5EED_0008);
    let started = Instant::now();
    let mut s = Sites::start("pprc-fc-target-faults", |_| {});
    let (src, pa, pb) = (s.a.vol(0x10, 0), s.a.vol(0x10, 1), s.b.vol(0x10, 0));
    let mut schedule = Schedule::new(seed);
    let t0 = fill(&s.a, &src, s.dir_a.path(), 24, 81);
    fill(&s.a, &pa, s.dir_a.path(), 48, 82);
    let rates = ["0.75", "1", "1.5", "2"];
    let mode = match schedule.next() % 6 {
        r @ 0..=3 => rates[r as usize],
        _ => "nocopy",
    };
    let mode_text = match mode {
        "nocopy" => "NOCOPY".to_string(),
        rate => format!("COPY at {rate} MiB/s"),
    };
    let pair_of = format!("{src}:{pa}");
    let mut establish = vec!["flashcopy", "establish", &pair_of];
    if mode == "nocopy" {
        establish.push("--nocopy");
    } else {
        establish.extend(["--rate", mode]);
    }
    essctl(&s.a, &establish).ok();
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &pa, &pb]).ok();
    // Hosts write both volumes from the pair's initial copy on; T's
    // writer tags its versions, so no write to S can pass for one to T.
    let writer = |export: &str, rnd: u64, tag: &str| {
        let args = [s.a.uri(export), rnd.to_string(), tag.to_string()];
        std::thread::spawn(move || {
            let out = python(
                OVERWRITE_AT_RANDOM,
                &[&args[0], "22", &args[1], "", &args[2], "0.05"],
            );
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        })
    };
    let (on_src, on_pa) = (writer(&src, seed, ""), writer(&pa, seed + 1, "t"));
    wait_state(&s.a, &pa, "duplex");
    let mut faults = Vec::new();
    let withdraw_at = schedule.next() % 6;
    let mut withdraw = None;
    while !on_pa.is_finished() || !on_src.is_finished() {
        std::thread::sleep(schedule.millis(200, 1000));
        // The first fault outlasts the acknowledgement timeout: the pair
        // suspends at least once.
        let kind = if faults.is_empty() {
            0
        } else {
            schedule.next() % 6
        };
        let hold = match (faults.len(), kind) {
            (0, _) => Duration::from_millis(3000),
            (_, 0 | 4) => schedule.millis(100, 3000),
            _ => schedule.millis(100, 1500),
        };
        let copying = flashcopy_remaining(&s.a, &pa);
        match kind {
            0 => s.proxy.stall(),
            1 => s.proxy.reset(),
            2 => s.proxy.reset_one(),
            3 => s.proxy.drop_all(),
            4 => s.proxy.stall_oldest(),
            _ => s.b.crash(),
        }
        std::thread::sleep(hold);
        if kind == 5 {
            s.b.restart("TSTB2");
        }
        let state = show(&s.a, &pa)["state"].as_str().unwrap().to_string();
        faults.push((kind, hold.as_millis(), copying, state));
        s.proxy.heal();
        resume_when_the_path_is_back(&s.a, &pa, seed);
        if faults.len() as u64 == 1 + withdraw_at {
            // Refused while the pair exists and tracks are uncopied; else
            // the relationship is gone (ended by its copy, or withdrawn
            // complete).
            let before = flashcopy_remaining(&s.a, &pa);
            let run = essctl(&s.a, &["flashcopy", "withdraw", &pair_of]);
            let after = flashcopy_remaining(&s.a, &pa);
            let refused = run.code == 1 && run.stderr.contains("terminate the pair first");
            assert!(
                if refused {
                    before.is_some_and(|n| n > 0) && after.is_some()
                } else {
                    after.is_none() && !s.a.log().contains("is incomplete")
                },
                "seed {seed}, FlashCopy {mode_text}: a withdraw with {before:?} tracks uncopied \
                 ({after:?} after): {run:?}"
            );
            withdraw = Some((before, run.code));
        }
    }
    let (on_src, on_pa) = (on_src.join().unwrap(), on_pa.join().unwrap());
    resume_until_duplex(&s.a, &pa, seed);
    let suspends = s.a.log().matches("PPRC pair suspended").count();
    let context = format!(
        "seed {seed}, FlashCopy {mode_text}, faults (kind, ms, tracks left to copy, pair state) \
         {faults:?}, {suspends} suspends, withdraw (tracks left, code) {withdraw:?}"
    );
    if mode != "nocopy" {
        let deadline = Instant::now() + Duration::from_secs(40);
        while let Some(left) = flashcopy_remaining(&s.a, &pa) {
            assert!(
                Instant::now() < deadline,
                "{context}: the background copy never ended ({left} tracks left)"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    wait_current(&s.a, &pa);
    let pair = show(&s.a, &pa);
    assert_eq!(
        (pair["state"].as_str(), pair["replication_status"].as_str()),
        (Some("duplex"), Some("current")),
        "{context}: {pair}"
    );
    assert_eq!(
        wait_state(&s.b, &pb, "duplex")["role"],
        "secondary",
        "{context}"
    );
    let written = |out: &serde_json::Value| out["acked"].as_object().unwrap().len();
    eprintln!(
        "{context}: {} blocks of S and {} of T written, {:.1} s",
        written(&on_src),
        written(&on_pa),
        started.elapsed().as_secs_f64()
    );
    assert!(
        faults
            .iter()
            .any(|f| f.2.is_some_and(|n| n > 0) && f.3 == "suspended"),
        "{context}: the pair never suspended while the FlashCopy was copying"
    );
    for out in [&on_src, &on_pa] {
        assert_eq!(
            out["errors"],
            serde_json::json!({}),
            "{context}: host errors"
        );
        assert!(
            written(out) > 200,
            "{context}: only {} blocks written",
            written(out)
        );
    }
    let image = |acked: &serde_json::Value| {
        let file = t0.display().to_string();
        serde_json::json!({"image": file, "acked": acked})
    };
    for (essd, volume, what, acked) in [
        (&s.a, &src, "S", &on_src["acked"]),
        (&s.a, &pa, "T", &on_pa["acked"]),
        (&s.b, &pb, "T'", &on_pa["acked"]),
    ] {
        let wrong = check_blocks(BLOCKS_NOT_AS_IMAGE_AND_ACKED, essd, volume, &image(acked));
        assert!(
            wrong.is_empty(),
            "{context}: {} blocks of {what} ({volume}) are neither S's at T0 nor the last \
             acknowledged write there, among them {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(32)]
        );
    }
    assert_eq!(
        volume_sha(&s.a, &pa),
        volume_sha(&s.b, &pb),
        "{context}: the volumes of the pair differ"
    );
}

/// Punches a hole of `argv[2]` bytes at each offset of the JSON list
/// `argv[3]` (TRIM), then flushes.
const PUNCH_HOLES: &str = r#"
import json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for offset in json.loads(sys.argv[3]):
    h.trim(int(sys.argv[2]), offset)
h.flush()
h.shutdown()
"#;

/// Delay of every chunk on the link during the initial copy of
/// [`random_faults_during_the_initial_copy_lose_nothing`]: the copy lasts
/// long enough for several faults, and no request misses the 2 s timeout
/// by the delay alone.
const INITIAL_COPY_DELAY: Duration = Duration::from_millis(15);

/// A host running [`OVERWRITE_AT_RANDOM`] on `blocks` of `export` at
/// `essd`, answering and stopped through `asks`; its versions count from
/// `base`; one write every 6 ms (8 in flight at most).
fn overwriter(
    essd: &Essd,
    export: &str,
    seed: u64,
    asks: &Path,
    base: u64,
    blocks: &[u64],
) -> std::thread::JoinHandle<serde_json::Value> {
    overwriter_every(essd, export, seed, asks, base, blocks, "0.006")
}

/// [`overwriter`] with `pause` seconds between writes (`"0"`: as fast as
/// 8 in flight allow).
fn overwriter_every(
    essd: &Essd,
    export: &str,
    seed: u64,
    asks: &Path,
    base: u64,
    blocks: &[u64],
    pause: &str,
) -> std::thread::JoinHandle<serde_json::Value> {
    let _ = std::fs::remove_file(asks.join("stop"));
    let args = [
        essd.uri(export),
        seed.to_string(),
        asks.display().to_string(),
        base.to_string(),
        serde_json::json!(blocks).to_string(),
        pause.to_string(),
    ];
    std::thread::spawn(move || {
        let out = python(
            OVERWRITE_AT_RANDOM,
            &[
                &args[0], "600", &args[1], &args[2], "", &args[5], &args[3], &args[4],
            ],
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    })
}

/// Stops a host started by [`overwriter`]: adds its acknowledged writes
/// to `model`, and returns how many writes it sent and the errors it saw.
fn stop_overwriter(
    writer: std::thread::JoinHandle<serde_json::Value>,
    asks: &Path,
    model: &mut BTreeMap<u64, u64>,
) -> (u64, serde_json::Value) {
    std::fs::write(asks.join("stop"), b"").unwrap();
    let out = writer.join().unwrap();
    for (b, v) in out["acked"].as_object().unwrap() {
        model.insert(b.parse().unwrap(), v.as_u64().unwrap());
    }
    (out["writes"].as_u64().unwrap(), out["errors"].clone())
}

/// The initial copy (`--mode copy`) of a 64 MiB volume of data and holes
/// onto a secondary holding other data, raced by a host overwriting
/// blocks of 64 random tracks of the primary (about 150 writes a second,
/// so that the copy of those tracks and host writes to them meet), and hit
/// by three or four seeded random faults (`ESSD_FAULT_SEED`) at random
/// points of what is left to copy: the link stalled short of the 2 s
/// timeout or past it (all links, or the oldest), reset (all, or one of
/// the two), dropped for a while, or `kill -9` and restart of either
/// server. After each the pair is brought back as the README says (a
/// restarted primary resynchronises by itself, any other suspended pair
/// is resumed). The host saw no error; the pair ends duplex and current;
/// every block on both volumes holds the last write the host saw
/// acknowledged, the holes not written are zeroes on the secondary, and
/// the volumes are equal. A resume after a link fault does not copy the
/// volume from its start again: it copies what was left, the tracks
/// copied in the last cleaning intervals and the host's tracks; and the
/// link carries at most the volume, the host's writes and what the faults
/// justify.
#[test]
fn random_faults_during_the_initial_copy_lose_nothing() {
    let seed = fault_seed(0x5EED_0008);
    let started = Instant::now();
    let mut s = Sites::start("pprc-copy-faults", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let volume = 64u64 << 20;
    let tracks = volume / TRACK;
    let mut schedule = Schedule::new(seed);
    // The primary: data but for 16..24 holes of 1 MiB; the secondary
    // other data all over.
    fill(&s.a, &va, s.dir_a.path(), 64, seed);
    fill(&s.b, &vb, s.dir_b.path(), 64, !seed);
    let mut holes = BTreeSet::new();
    let n = 16 + schedule.next() % 9;
    while holes.len() < n as usize {
        holes.insert(schedule.next() % 64);
    }
    let offsets: Vec<u64> = holes.iter().map(|m| m << 20).collect();
    python(
        PUNCH_HOLES,
        &[
            &s.a.uri(&va),
            &(1u64 << 20).to_string(),
            &serde_json::json!(offsets).to_string(),
        ],
    );
    // The host's blocks: 4 in each of 64 tracks.
    let mut host_tracks = BTreeSet::new();
    while host_tracks.len() < 64 {
        host_tracks.insert(schedule.next() % tracks);
    }
    let per_track = TRACK / 4096;
    let mut blocks = BTreeSet::new();
    for t in &host_tracks {
        while blocks.len() < 4 * (1 + host_tracks.range(..t).count()) {
            blocks.insert(t * per_track + schedule.next() % per_track);
        }
    }
    let blocks: Vec<u64> = blocks.into_iter().collect();
    path(&s.a, "0x10", "TSTB2", "0x10", "2");

    let asks = tempfile::tempdir().unwrap();
    let mut model = BTreeMap::new();
    let (mut writes, mut errors) = (0, Vec::new());
    let mut writer = overwriter(&s.a, &va, seed, asks.path(), 0, &blocks);
    s.proxy.reset_counters();
    s.proxy.delay(INITIAL_COPY_DELAY);
    let p = essctl_json(&s.a, &["pprc", "establish", &va, &vb, "--mode", "copy"]);
    assert_eq!(p["state"], "duplex pending", "seed {seed}: {p}");
    let data = (64 - holes.len() as u64) << 20;
    // (kind, hold in ms, the pair's state when it came, tracks left then,
    // tracks to copy once suspended, tracks it may justify)
    let mut faults = Vec::new();
    let mut progress = Vec::new();
    for round in 0..3 + schedule.next() % 2 {
        let left = show(&s.a, &va)["out_of_sync_tracks"].as_u64().unwrap();
        let at = s.proxy.bytes_forward() + schedule.next() % (left * TRACK * data / volume).max(1);
        let state = wait_for_copy_point(&s.a, &va, &s.proxy, at, &mut progress);
        let left = progress.last().map_or(0, |p| p.1);
        let (kind, hold) = draw_copy_fault(&mut schedule);
        let hit = Instant::now();
        if kind == 6 {
            // The host's connection goes with the primary: it stops first.
            let (n, e) = stop_overwriter(writer, asks.path(), &mut model);
            writes += n;
            errors.push(e);
            inject_copy_fault(kind, &mut s.a, &mut s.b, &s.proxy);
            let base = model.values().max().copied().unwrap_or(0);
            writer = overwriter(&s.a, &va, seed + round + 1, asks.path(), base, &blocks);
        } else {
            inject_copy_fault(kind, &mut s.a, &mut s.b, &s.proxy);
        }
        std::thread::sleep(hold);
        s.proxy.heal();
        s.proxy.delay(INITIAL_COPY_DELAY);
        // A link fault may justify copying again, besides what was left:
        // the tracks the copier passed since the last cleaning pass, and
        // the host's 64 tracks (written before or during the suspend). A
        // pass clears the marks of the tracks the copier passed before it
        // (once both volumes are flushed; only tracks the host wrote in
        // its interval or the one before keep theirs), and passes start
        // CLEAN_INTERVAL after the previous one ended, which waited at
        // most the 2 s timeout for host writes and then for its flush.
        // What the copier passed: the fall of the tracks it has left (in
        // this copy pass: that count only falls until a resume starts the
        // copy again) since that long before the fault.
        let since = hit - CLEAN_INTERVAL - 2 * Duration::from_secs(2);
        let pass = &progress[progress
            .windows(2)
            .rposition(|w| w[1].1 > w[0].1)
            .map_or(0, |i| i + 1)..];
        let then = pass
            .iter()
            .rev()
            .find(|p| p.0 <= since)
            .or(pass.first())
            .map_or(tracks, |p| p.1);
        let justified = then.saturating_sub(left) + host_tracks.len() as u64;
        let pair = show(&s.a, &va);
        let resent = match (pair["state"].as_str(), pair["reason"].as_str()) {
            (Some("suspended"), Some(r)) if r != "primary restarted" => {
                pair["out_of_sync_tracks"].as_u64().unwrap()
            }
            _ => 0,
        };
        if pair["state"] == "suspended" {
            // All the marks: what the copy starts again from.
            progress.push((Instant::now(), pair["out_of_sync_tracks"].as_u64().unwrap()));
        }
        faults.push((kind, hold.as_millis(), state, left, resent, justified));
        bring_back(&s.a, &va, seed);
    }
    resume_until_duplex(&s.a, &va, seed);
    let sent = s.proxy.bytes_forward();
    let (n, e) = stop_overwriter(writer, asks.path(), &mut model);
    writes += n;
    errors.push(e);
    s.proxy.heal();
    let context = format!(
        "seed {seed}, faults (kind, ms, state, tracks left, to copy once suspended, justified) \
         {faults:?}"
    );
    assert!(
        errors.iter().all(|e| e == &serde_json::json!({})),
        "{context}: the host saw errors: {errors:?}"
    );
    assert!(
        faults.iter().any(|f| f.2 == "duplex pending"),
        "{context}: no fault hit the copy"
    );
    wait_current(&s.a, &va);
    let pair = show(&s.a, &va);
    assert_eq!(
        (pair["state"].as_str(), pair["replication_status"].as_str()),
        (Some("duplex"), Some("current")),
        "{context}: {pair}"
    );
    let side = wait_state(&s.b, &vb, "duplex");
    assert_eq!(side["role"], "secondary", "{context}: {side}");

    // Every block the host wrote holds its last acknowledged write, on
    // both volumes; the holes it did not write are zeroes.
    let mut expected = model.clone();
    for m in &holes {
        for b in (m << 20) / 4096..((m + 1) << 20) / 4096 {
            expected.entry(b).or_insert(0);
        }
    }
    let expected = serde_json::json!(expected);
    for (essd, v) in [(&s.a, &va), (&s.b, &vb)] {
        let wrong = check_blocks(BLOCKS_NOT_AS_ACKED, essd, v, &expected);
        assert!(
            wrong.is_empty(),
            "{context}: {} blocks of {v} are not the last acknowledged write (or zeroes in a \
             hole): {wrong:?}",
            wrong.len()
        );
    }
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "{context}: the volumes differ"
    );

    // A resume after a link fault copies what was left and what the fault
    // justifies (above), not the whole volume again.
    for f in &faults {
        assert!(
            f.4 <= f.3 + f.5,
            "{context}: a resume after fault {f:?} copies {} tracks, {} left and {} justified",
            f.4,
            f.3,
            f.5
        );
    }
    // The link carries the volume once (its data; holes as zeroing), each
    // host write (its data and a header), and what each fault justifies:
    // a link fault, the tracks above and the copies in flight (8 of at
    // most 1 MiB) sent again; a crash of the primary, whose bitmap file
    // keeps whole 64-track regions marked while hosts write there, at
    // most the volume again. Plus the links' handshakes and heartbeats.
    let crashes = faults.iter().filter(|f| f.0 == 6).count() as u64;
    let bound = volume
        + writes * (4096 + 512)
        + crashes * volume
        + faults
            .iter()
            .filter(|f| f.0 != 6)
            .map(|f| f.5 * TRACK + (8 << 20))
            .sum::<u64>()
        + (1 << 20);
    eprintln!(
        "{context}: sent {sent} bytes (bound {bound}), {writes} host writes, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        sent <= bound,
        "{context}: the link carried {sent} bytes for {data} bytes of data and {writes} host \
         writes (bound {bound})"
    );
}

/// The tracks whose content differs between two volume image files of
/// the same size, and the tracks of the first that hold data (not all
/// zeroes).
fn track_differences(first: &Path, second: &Path) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (a, b) = (
        std::fs::read(first).unwrap(),
        std::fs::read(second).unwrap(),
    );
    let zeroes = vec![0u8; TRACK as usize];
    let mut differ = BTreeSet::new();
    let mut data = BTreeSet::new();
    for (t, (x, y)) in a
        .chunks(zeroes.len())
        .zip(b.chunks(zeroes.len()))
        .enumerate()
    {
        if x != y {
            differ.insert(t as u64);
        }
        if x != &zeroes[..x.len()] {
            data.insert(t as u64);
        }
    }
    (differ, data)
}

/// A host overwrites random blocks of 48 tracks in 6 of the 16 64-track
/// regions of a duplex primary, 8 writes in flight, and at 3 to 5 seeded
/// moments (`ESSD_FAULT_SEED`) the primary's server is killed (`kill -9`),
/// sometimes with its link stalled just before so that the secondary lags,
/// then restarted; each time the host starts again with versions above
/// those it wrote. After each kill: every track that differs between the
/// two volume files, and every track of a write in flight, is set in the
/// primary's bitmap file, which marks nothing outside the host's regions.
/// The restart comes back suspended (`primary restarted`) and
/// resynchronises by itself, sending at most its marked tracks (on the
/// pair's count and on the link) and at least a block of each track in
/// flight that holds data. Then every block holds its last acknowledged
/// write on both volumes, a block whose write was in flight holds that
/// write or the one before, the same on both, and the volumes are equal.
#[test]
fn kill_9_of_a_duplex_primary_under_random_overwrites_resyncs_what_it_marked() {
    let seed = fault_seed(0x5EED_0009);
    let started = Instant::now();
    let mut s = Sites::start("pprc-kill-overwrites", |_| {});
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let mut schedule = Schedule::new(seed);
    let per_track = TRACK / 4096;
    let mut regions = BTreeSet::new();
    while regions.len() < 6 {
        regions.insert(schedule.next() % 16);
    }
    let mut blocks = BTreeSet::new();
    for r in &regions {
        let mut tracks = BTreeSet::new();
        while tracks.len() < 8 {
            tracks.insert(r * 64 + schedule.next() % 64);
        }
        for t in tracks {
            let before = blocks.len();
            while blocks.len() < before + 4 {
                blocks.insert(t * per_track + schedule.next() % per_track);
            }
        }
    }
    let blocks: Vec<u64> = blocks.into_iter().collect();
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.a, &va, "duplex");
    let images = (
        s.dir_a.path().join("vol-10-0.img"),
        s.dir_b.path().join("vol-10-0.img"),
    );
    let asks = tempfile::tempdir().unwrap();
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    let mut base = 0;
    // (ms written, ms stalled before the kill, writes acknowledged, writes
    // in flight, tracks marked at the restart, bytes the resync sent)
    let mut kills = Vec::new();
    let rounds = 3 + schedule.next() % 3;
    for round in 0..rounds {
        let writer = overwriter_every(&s.a, &va, seed + round, asks.path(), base, &blocks, "0");
        let run = schedule.millis(1000, 3000);
        let stall = (schedule.next() % 3 == 0).then(|| schedule.millis(50, 1000));
        std::thread::sleep(run);
        if let Some(lag) = stall {
            s.proxy.stall();
            std::thread::sleep(lag);
        }
        s.a.crash();
        let out = writer.join().unwrap();
        let context = format!(
            "seed {seed}, round {round}, kills so far (ms written, ms stalled, acked, in \
             flight, marked, resent) {kills:?}, host {}",
            serde_json::json!({"writes": out["writes"], "errors": out["errors"], "broken": out["broken"]})
        );
        assert!(
            out["broken"].is_string(),
            "{context}: the host's connection did not break"
        );
        let acked = out["acked"].as_object().unwrap();
        assert!(
            acked.len() > 50,
            "{context}: only {} blocks acknowledged",
            acked.len()
        );
        for (b, v) in acked {
            model.insert(b.parse().unwrap(), v.as_u64().unwrap());
        }
        base += out["writes"].as_u64().unwrap();
        // Blocks whose last write was in flight: (before, in flight).
        let unsure: BTreeMap<u64, (u64, u64)> = out["unsure"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(b, u)| {
                let b: u64 = b.parse().unwrap();
                let before = u[0].as_u64().or(model.get(&b).copied()).unwrap_or(0);
                (b, (before, u[1].as_u64().unwrap()))
            })
            .collect();

        // What the crash left: every possibly different track is marked in
        // the bitmap file, and nothing outside the host's regions.
        std::thread::sleep(Duration::from_millis(200));
        let marks = durable_marks(&s.a, &va);
        let (differ, with_data) = track_differences(&images.0, &images.1);
        let in_flight: BTreeSet<u64> = unsure.keys().map(|b| b / per_track).collect();
        let unmarked: Vec<&u64> = differ
            .union(&in_flight)
            .filter(|t| !marks.contains(t))
            .collect();
        assert!(
            unmarked.is_empty(),
            "{context}: tracks that differ ({differ:?}) or were written in flight \
             ({in_flight:?}) are not marked in the bitmap file: {unmarked:?}"
        );
        let outside: Vec<&u64> = marks
            .iter()
            .filter(|t| !regions.contains(&(*t / 64)))
            .collect();
        assert!(
            outside.is_empty(),
            "{context}: tracks marked outside the host's regions {regions:?}: {outside:?}"
        );

        s.proxy.reset_counters();
        let (at_restart, resent) = restart_and_resync(&mut s, &va, Some("primary restarted"));
        let carried = s.proxy.bytes_forward();
        let marked = at_restart["out_of_sync_tracks"].as_u64().unwrap();
        kills.push((
            run.as_millis(),
            stall.map_or(0, |d| d.as_millis()),
            acked.len(),
            unsure.len(),
            marked,
            resent,
        ));
        let context = format!("{context}, this kill {:?}", kills.last().unwrap());
        assert!(
            marked >= differ.union(&in_flight).count() as u64
                && marked <= 64 * regions.len() as u64,
            "{context}: {marked} tracks marked at the restart for {} differing or in flight \
             in {} regions: {at_restart}",
            differ.union(&in_flight).count(),
            regions.len()
        );
        let bound = marked * TRACK + (256 << 10);
        assert!(
            resent <= bound && carried <= bound,
            "{context}: the resync of {marked} tracks sent {resent} bytes ({carried} on the \
             link), bound {bound}"
        );
        let least = in_flight.intersection(&with_data).count() as u64 * 4096;
        assert!(
            resent >= least,
            "{context}: the resync sent {resent} bytes, less than a block of each of the \
             tracks in flight ({least})"
        );

        // Every block holds its last acknowledged write; one whose write
        // was in flight that write or the one before, on both volumes.
        let mut expected = model.clone();
        for (b, (_, new)) in &unsure {
            expected.insert(*b, *new);
        }
        let mut old = Vec::new();
        for (essd, v) in [(&s.a, &va), (&s.b, &vb)] {
            let wrong = check_blocks(BLOCKS_NOT_AS_ACKED, essd, v, &serde_json::json!(expected));
            let lost: Vec<&u64> = wrong.iter().filter(|b| !unsure.contains_key(b)).collect();
            assert!(
                lost.is_empty(),
                "{context}: blocks of {v} not their last acknowledged write: {lost:?}"
            );
            let before: BTreeMap<u64, u64> = wrong.iter().map(|b| (*b, unsure[b].0)).collect();
            let neither = check_blocks(BLOCKS_NOT_AS_ACKED, essd, v, &serde_json::json!(before));
            assert!(
                neither.is_empty(),
                "{context}: blocks of {v} written in flight hold neither that write nor the \
                 one before: {neither:?}"
            );
            old.push(wrong);
        }
        assert_eq!(
            old[0], old[1],
            "{context}: the volumes kept different writes in flight"
        );
        let (differ, _) = track_differences(&images.0, &images.1);
        assert!(
            differ.is_empty(),
            "{context}: the volumes differ in tracks {differ:?}"
        );
        if kills.len() as u64 == rounds {
            assert_eq!(
                volume_sha(&s.a, &va),
                volume_sha(&s.b, &vb),
                "{context}: the volumes differ"
            );
        }
        for (b, (before, new)) in &unsure {
            model.insert(*b, if old[0].contains(b) { *before } else { *new });
        }
    }
    eprintln!(
        "seed {seed}: kills (ms written, ms stalled, acked, in flight, marked, resent) \
         {kills:?}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

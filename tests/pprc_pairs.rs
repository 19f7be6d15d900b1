//! PPRC pairs between two real essd processes on loopback, driven with
//! essctl and written with libnbd: initial copy, duplex mirroring, secondary
//! protection, suspend and resync of changed tracks only (bytes counted on
//! the link through a fault-injecting proxy), terminate from either side,
//! broken links, critical modes, failover/failback, consistency groups and
//! kill -9 of the primary.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::*;

const SECRET: &str = "correct horse battery staple";
const TRACK: u64 = 64 << 10;

/// Two servers: A (TSTA1, primary site) and B (TSTB2), A's links to B
/// through a fault proxy; B can reach A directly (for failback).
struct Sites {
    a: Essd,
    b: Essd,
    proxy: FaultProxy,
    dir_a: tempfile::TempDir,
    dir_b: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let dir_a = tempdir(&format!("{name}-a"));
        let dir_b = tempdir(&format!("{name}-b"));
        let mut cfg_b = site_config(
            "TSTB2",
            port_b,
            "TSTA1",
            format!("127.0.0.1:{port_a}").parse().unwrap(),
        );
        tune(&mut cfg_b);
        let b = Essd::start_in(dir_b.path(), &cfg_b);
        let mut cfg_a = site_config("TSTA1", port_a, "TSTB2", proxy.addr());
        tune(&mut cfg_a);
        let a = Essd::start_in(dir_a.path(), &cfg_a);
        Sites {
            a,
            b,
            proxy,
            dir_a,
            dir_b,
        }
    }

    /// Restarts A from its configuration.
    fn restart_a(&mut self) {
        let cfg = self.dir_a.path().join("essd.toml");
        let a = Essd::start_config(self.dir_a.path(), &cfg, "TSTA1");
        let old = std::mem::replace(&mut self.a, a);
        std::mem::forget(old);
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

/// SHA-256 of an export's whole content, read with nbdcopy.
fn volume_sha(essd: &Essd, export: &str) -> String {
    let out = tempfile::NamedTempFile::new().unwrap();
    run(std::process::Command::new("nbdcopy")
        .arg(essd.uri(export))
        .arg(out.path()));
    sha256_file(out.path())
}

/// Writes `count` 4 KiB blocks of random data, each in a different track,
/// and flushes; prints how many.
const WRITE_TRACKS: &str = r#"
import nbd, random, sys
uri, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
track = 65536
h = nbd.NBD()
h.connect_uri(uri)
rnd = random.Random(seed)
for t in rnd.sample(range(h.get_size() // track), count):
    h.pwrite(rnd.randbytes(4096), t * track + rnd.randrange(0, track, 4096))
h.flush()
h.shutdown()
print(count)
"#;

fn write_tracks(essd: &Essd, export: &str, seed: u64, count: usize) {
    let out = python(
        WRITE_TRACKS,
        &[&essd.uri(export), &seed.to_string(), &count.to_string()],
    );
    assert_eq!(out.trim(), count.to_string());
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

fn fill(essd: &Essd, export: &str, dir: &Path, mib: usize, seed: u64) {
    let src = dir.join(format!("fill-{seed}.img"));
    random_file(&src, mib << 20, seed);
    run(std::process::Command::new("nbdcopy")
        .arg(&src)
        .arg(essd.uri(export)));
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
    s.proxy.reset_counters();
    let out = essctl(a, &["pprc", "establish", &pa, &pb]);
    assert!(
        out.ok().contains("duplex pending") || out.ok().contains("duplex"),
        "{out:?}"
    );
    wait_duplex(a, &pa);
    let sent = s.proxy.bytes_forward();
    assert!(
        (16 << 20..20 << 20).contains(&sent),
        "initial copy sent {sent} bytes for 16 MiB of data"
    );
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
    essctl(a, &["pprc", "establish", &a.vol(0x10, 1), &pb]).refused(&format!(
        "TSTB2 refused: volume {pb} is already the secondary of a pair with TSTA1 {pa}"
    ));

    // Duplex: every acknowledged write is on the secondary.
    write_tracks(a, &pa, 7, 50);
    assert_eq!(volume_sha(a, &pa), volume_sha(b, &pb));

    // The secondary is protected: read-only to hosts.
    assert_eq!(try_write(b, &pb), "read-only EPERM");

    // Suspend, change 1% of the tracks, resync: ~1% crosses the link.
    let v = essctl(a, &["--json", "pprc", "suspend", &pa]).json();
    assert_eq!(v["state"], "suspended");
    assert_eq!(v["reason"], "manual");
    write_tracks(a, &pa, 8, 10);
    let v = show(a, &pa);
    assert_eq!(v["out_of_sync_tracks"], 10, "{v}");
    assert_eq!(v["replication_status"], "not current");
    assert_ne!(volume_sha(a, &pa), volume_sha(b, &pb));
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

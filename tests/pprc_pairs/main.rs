//! PPRC pairs between two real essd processes on loopback, driven with
//! essctl and written with libnbd: initial copy, duplex mirroring, secondary
//! protection, suspend and resync of changed tracks only (bytes counted on
//! the link through a fault-injecting proxy), terminate from either side,
//! broken links, critical modes, failover/failback, consistency groups and
//! kill -9 of either server.
//!
//! This file holds the two-site harness, a fan-out harness (one primary
//! server mirroring to three) and the helpers the topics share; each
//! module below is one topic.

#[path = "../common/mod.rs"]
mod common;
mod disk_errors;
mod failover;
mod flashcopy;
mod groups;
mod lifecycle;
mod links;
mod seeded;
mod stops;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::*;
use essd::copy::pprc::manager::RETELL_INTERVAL;
use essd::copy::pprc::pair::CLEAN_INTERVAL;
use essd::copy::pprc::paths::{HEARTBEAT, LINK_TIMEOUT};

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

/// Pairs volume 0x10/0 of A with B's over a new path of one link, with
/// no copy (both volumes are new), and waits until B shows it duplex;
/// returns the two volume IDs.
fn duplex_nocopy_pair(s: &Sites) -> (String, String) {
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    essctl(&s.a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
    wait_state(&s.b, &vb, "duplex");
    (va, vb)
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

/// How long the secondary's side may take to show what its primary shows
/// once the faults are healed: a link that broke unnoticed is found dead
/// by its monitor within [`HEARTBEAT`] + [`LINK_TIMEOUT`] (a heartbeat
/// unanswered), reopened within as much again (the next attempt, a
/// connect given [`LINK_TIMEOUT`]); then the primary's server tells the
/// state again within [`RETELL_INTERVAL`] — three of them here — after a
/// tell sent over a link that died under it, which waits [`LINK_TIMEOUT`]
/// for its answer.
fn sides_agree_bound() -> Duration {
    (HEARTBEAT + LINK_TIMEOUT) * 2 + RETELL_INTERVAL * 3 + LINK_TIMEOUT
}

/// Waits until the secondary's side of a pair (`sv` at `secondary`) shows
/// the state and reason its primary (`pv` at `primary`) shows, with a
/// live link on the primary's path; fails after [`sides_agree_bound`],
/// printing both views, with `context`.
///
/// For a settle point: every fault healed, the servers running. The
/// differences that are legitimate do not last there, or are not looked
/// for:
/// * the secondary's side shows what its primary's server last told it:
///   `duplex pending` after a resume until told `duplex`, or `duplex`
///   while the primary suspends — until the primary's server tells it,
///   at once over a live link, else again every second once a link is up
///   (while no link is up the secondary cannot know: the bound counts
///   from the faults healed, covering the link's reopening);
/// * a resume or a restart's resync makes the secondary `duplex pending`
///   before the primary is (it is asked first), and a resume whose answer
///   is lost leaves the primary suspended until the secondary is told so
///   again;
/// * while the consistency group holds writes the primary stays in its
///   state (not current) until the freeze, as does the secondary;
/// * a suspend at the secondary (`manual` there, `suspended at the
///   secondary` or still `duplex` at the primary) and a terminate at the
///   secondary with the primary gone are the operator's and differ for
///   good: no settle point follows them;
/// * a failback that stopped short shows both sides `suspended
///   (failover)`, which agree.
///
/// Only the state and the reason are compared: the detail and the times
/// are each side's own.
fn wait_sides_agree(primary: &Essd, pv: &str, secondary: &Essd, sv: &str, context: &str) {
    let deadline = Instant::now() + sides_agree_bound();
    loop {
        let p = show(primary, pv);
        let s = show(secondary, sv);
        let live = p["path"]["state"] == "up" || p["path"]["state"] == "degraded";
        let agree = p["role"] == "primary"
            && s["role"] == "secondary"
            && s["peer_volume"] == pv
            && p["state"] == s["state"]
            && p["reason"] == s["reason"];
        if live && agree {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: within {:?} the secondary's side does not show what its primary shows{}:\n primary   {pv}: {p}\n secondary {sv}: {s}",
            sides_agree_bound(),
            if live { "" } else { " (the path has no live link)" }
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

/// Tracks set in a primary's out-of-sync bitmap file, i.e. the marks that
/// survive a crash.
fn durable_marks(essd: &Essd, volume: &str) -> BTreeSet<u64> {
    bitmap_file_tracks(&essd.dir.join("state/pprc").join(format!("{volume}.oos")))
}

/// Tracks set in a track bitmap file (after its 4 KiB header).
fn bitmap_file_tracks(path: &Path) -> BTreeSet<u64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
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

fn block_at(essd: &Essd, export: &str, offset: u64) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    run(std::process::Command::new("nbdcopy")
        .arg(essd.uri(export))
        .arg(out.path()));
    let all = std::fs::read(out.path()).unwrap();
    all[offset as usize..offset as usize + 4096].to_vec()
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

/// `pprc show`'s exit code (1: not in a pair).
fn show_code(essd: &Essd, volume: &str) -> i32 {
    essctl(essd, &["pprc", "show", volume]).code
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

/// One 4 KiB write of `argv[3]` at `argv[2]`, no flush.
const WRITE_NO_FLUSH: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes([int(sys.argv[3])]) * 4096, int(sys.argv[2]))
h.shutdown()
print("ok", flush=True)
"#;

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

/// One write of `byte` at `offset`, not flushed, in the background (a
/// stop answers a FLUSH sent after the signal with `ESHUTDOWN`).
fn spawn_write_unflushed(essd: &Essd, export: &str, offset: u64, byte: u8) -> std::process::Child {
    spawn_script_at(WRITE_NO_FLUSH, essd, export, offset, byte.into())
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

/// Resumes the pair of `va` at A, waits until both sides show it duplex
/// ([`wait_sides_agree`]), and checks that A's `va` and B's `vb` are
/// equal.
fn resume_to_equal(s: &Sites, va: &str, vb: &str, context: &str) {
    essctl(&s.a, &["pprc", "resume", va]).ok();
    wait_duplex(&s.a, va);
    wait_sides_agree(&s.a, va, &s.b, vb, context);
    assert_eq!(volume_sha(&s.a, va), volume_sha(&s.b, vb), "{context}");
}

/// Runs a block checker (`script`, reading its JSON input on stdin)
/// against `export`; returns the blocks it printed.
fn check_blocks(script: &str, essd: &Essd, export: &str, input: &serde_json::Value) -> Vec<u64> {
    serde_json::from_value(run_checker(script, essd, export, input)).unwrap()
}

/// Runs a checker (`script`, reading its JSON input on stdin) against
/// `export`; returns the JSON it printed.
fn run_checker(
    script: &str,
    essd: &Essd,
    export: &str,
    input: &serde_json::Value,
) -> serde_json::Value {
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

/// Waits until `essd`'s consistency group is in `state`.
/// Waits (bounded) until `ready` holds.
fn wait_until(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `volume` has completed `n` more writes than when called
/// (a spawned writer is under way).
fn wait_writes(essd: &Essd, volume: &str, n: u64) {
    let writes = || {
        essctl_json(essd, &["volume", "show", volume])["stats"]["writes"]
            .as_u64()
            .unwrap()
    };
    let start = writes();
    wait_until(&format!("{volume} never took {n} writes"), || {
        writes() >= start + n
    });
}

/// Waits until a host is attached to `volume` (a spawned writer has
/// connected; its write follows at once).
fn wait_client(essd: &Essd, volume: &str) {
    wait_until(&format!("no client attached to {volume}"), || {
        essctl_json(essd, &["volume", "show", volume])["clients"]
            .as_u64()
            .is_some_and(|n| n >= 1)
    });
}

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

/// Serials of the secondary servers of [`FanOut`]: B, C and D.
const FAN_OUT_PEERS: [&str; 3] = ["TSTB2", "TSTC3", "TSTD4"];

/// Size of every volume of [`FanOut`].
const FAN_OUT_VOLUME: u64 = 16 << 20;

/// One primary server A (TSTA1) mirroring to three secondary servers B,
/// C and D ([`FAN_OUT_PEERS`]), each over links of its own: A's links to
/// peer `i` go through `proxies[i]`, the peer's links to A through
/// `backs[i]`. Four pairs, all nocopy (the volumes start as zeroes), each
/// path two links: A 000 → B 000 and A 001 → B 001 (LSS 0x10), A 100 →
/// C 100 (0x11), A 200 → D 200 (0x12).
struct FanOut {
    a: Essd,
    peers: Vec<Essd>,
    proxies: Vec<FaultProxy>,
    backs: Vec<FaultProxy>,
    legs: Vec<Leg>,
    _dirs: Vec<tempfile::TempDir>,
}

/// One pair of a [`FanOut`].
struct Leg {
    /// Index of the secondary's server in [`FAN_OUT_PEERS`].
    peer: usize,
    /// The primary volume (at A).
    va: String,
    /// The secondary volume.
    vb: String,
}

/// The `[replication]` section of a [`FanOut`] server listening on
/// `listen`, with its `[[peer]]`s (serial, address).
fn fan_out_replication(listen: u16, peers: &[(&str, SocketAddr)]) -> String {
    let mut extra = format!(
        "\n[replication]\nlisten = \"127.0.0.1:{listen}\"\nsecret = \"{SECRET}\"\ntimeout = \"2s\"\n"
    );
    for (serial, address) in peers {
        extra += &format!("\n[[peer]]\nserial = \"{serial}\"\naddress = \"{address}\"\n");
    }
    extra
}

impl FanOut {
    /// Starts the four servers, establishes the paths and the pairs, and
    /// waits until every pair is duplex.
    fn start(name: &str) -> FanOut {
        let port_a = free_port();
        let mut dirs = Vec::new();
        let (mut peers, mut proxies, mut backs) = (Vec::new(), Vec::new(), Vec::new());
        let lss_of = [vec![(0x10, 0), (0x10, 1)], vec![(0x11, 0)], vec![(0x12, 0)]];
        for (serial, volumes) in FAN_OUT_PEERS.iter().zip(&lss_of) {
            let port = free_port();
            let back = FaultProxy::start(format!("127.0.0.1:{port_a}").parse().unwrap());
            let dir = tempdir(&format!("{name}-{}", serial.to_lowercase()));
            let mut cfg = TestConfig::new("uring");
            cfg.serial = serial;
            cfg.volumes = volumes
                .iter()
                .map(|(lss, n)| Vol::new(*lss, *n, "16MiB"))
                .collect();
            cfg.extra = fan_out_replication(port, &[("TSTA1", back.addr())]);
            peers.push(Essd::start_in(dir.path(), &cfg));
            proxies.push(FaultProxy::start(
                format!("127.0.0.1:{port}").parse().unwrap(),
            ));
            backs.push(back);
            dirs.push(dir);
        }
        let dir = tempdir(&format!("{name}-a"));
        let mut cfg = TestConfig::new("uring");
        cfg.serial = "TSTA1";
        cfg.volumes = lss_of
            .iter()
            .flatten()
            .map(|(lss, n)| Vol::new(*lss, *n, "16MiB"))
            .collect();
        let addresses: Vec<(&str, SocketAddr)> = FAN_OUT_PEERS
            .iter()
            .zip(&proxies)
            .map(|(serial, proxy)| (*serial, proxy.addr()))
            .collect();
        cfg.extra = fan_out_replication(port_a, &addresses);
        let a = Essd::start_in(dir.path(), &cfg);
        dirs.push(dir);
        let mut legs = Vec::new();
        for (peer, volumes) in lss_of.iter().enumerate() {
            let lss = format!("0x{:02X}", volumes[0].0);
            path(&a, &lss, FAN_OUT_PEERS[peer], &lss, "2");
            for (l, n) in volumes {
                let (va, vb) = (a.vol(*l, *n), peers[peer].vol(*l, *n));
                essctl(&a, &["pprc", "establish", &va, &vb, "--mode", "nocopy"]).ok();
                wait_state(&a, &va, "duplex");
                legs.push(Leg { peer, va, vb });
            }
        }
        FanOut {
            a,
            peers,
            proxies,
            backs,
            legs,
            _dirs: dirs,
        }
    }

    /// Every link back to normal.
    fn heal(&self) {
        for proxy in self.proxies.iter().chain(&self.backs) {
            proxy.heal();
        }
    }
}

/// Pairs both ways between A and B (active/active): A 000 → B 000 and
/// A 001 → B 001 over A's path 0x10 (through `proxy`), B 100 → A 100 and
/// B 101 → A 101 over B's path 0x11 (through `back`), all nocopy and
/// duplex; then tracks written on every primary. Returns the pairs as
/// (primary is A, primary volume, secondary volume).
fn active_active(name: &str) -> (Sites, Vec<(bool, String, String)>) {
    let s = Sites::start(name, |_| {});
    path(&s.a, "0x10", "TSTB2", "0x10", "1");
    path(&s.b, "0x11", "TSTA1", "0x11", "1");
    let mut pairs = Vec::new();
    for n in 0..2 {
        pairs.push((true, s.a.vol(0x10, n), s.b.vol(0x10, n)));
        pairs.push((false, s.b.vol(0x11, n), s.a.vol(0x11, n)));
    }
    for (i, (at_a, pv, sv)) in pairs.iter().enumerate() {
        let (p, _) = sides(&s, *at_a);
        essctl(p, &["pprc", "establish", pv, sv, "--mode", "nocopy"]).ok();
        wait_state(p, pv, "duplex");
        write_tracks(p, pv, 200 + i as u64, 20);
    }
    (s, pairs)
}

/// The primary's and the secondary's server of a pair of
/// [`active_active`].
fn sides(s: &Sites, at_a: bool) -> (&Essd, &Essd) {
    if at_a {
        (&s.a, &s.b)
    } else {
        (&s.b, &s.a)
    }
}

/// Every pair of [`active_active`] duplex by itself within `bound`, both
/// sides agreeing, and its volumes equal.
fn all_duplex_and_equal(
    s: &Sites,
    pairs: &[(bool, String, String)],
    bound: Duration,
    context: &str,
) {
    let deadline = Instant::now() + bound;
    for (at_a, pv, sv) in pairs {
        let (p, q) = sides(s, *at_a);
        loop {
            let v = show(p, pv);
            if v["state"] == "duplex" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{context}: {pv} → {sv} is not duplex within {bound:?}: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_sides_agree(p, pv, q, sv, context);
        assert_eq!(
            volume_sha(p, pv),
            volume_sha(q, sv),
            "{context}: {pv} → {sv}"
        );
    }
}

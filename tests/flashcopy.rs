//! FlashCopy through real clients: T0 under load (fio writes on the source
//! while the target is read), a byte model of mixed source/target I/O,
//! consistent multi-pair establish, kill -9 crash campaigns, and
//! permit-if-target-online.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn essctl_ok(essd: &Essd, args: &[&str]) -> String {
    essctl(essd, args).ok().to_string()
}

fn relationships(essd: &Essd) -> serde_json::Value {
    let text = essctl_ok(essd, &["--json", "flashcopy", "list"]);
    serde_json::from_str(&text).unwrap()
}

/// Copies an export to a file with nbdcopy and returns its SHA-256.
fn export_sha(essd: &Essd, export: &str, file: &std::path::Path) -> String {
    run(Command::new("nbdcopy").arg(essd.uri(export)).arg(file));
    sha256_file(file)
}

fn four_volumes(engine: &'static str, size: &'static str) -> TestConfig {
    let mut cfg = TestConfig::new(engine);
    cfg.volumes = (0..4).map(|n| Vol::new(0x10, n, size)).collect();
    cfg
}

#[test]
fn target_holds_t0_while_fio_writes_the_source() {
    require("fio", "fio");
    require("nbdcopy", "libnbd-bin");
    for (engine, mode) in [
        ("uring", "copy"),
        ("threads", "nocopy"),
        ("uring", "nocopy"),
        ("threads", "copy"),
    ] {
        let dir = tempdir("fc-t0");
        let essd = Essd::start_in(dir.path(), &four_volumes(engine, "64MiB"));
        let seed = dir.path().join("seed.bin");
        random_file(&seed, 48 << 20, 5); // the last 16 MiB stay a hole
        run(Command::new("nbdcopy").arg(&seed).arg(essd.uri("000TST01")));
        let t0_sha = export_sha(&essd, "000TST01", &dir.path().join("t0.bin"));

        let mut args = vec!["flashcopy", "establish", "000TST01:001TST01"];
        if mode == "nocopy" {
            args.push("--nocopy");
        } else {
            // A tiny rate so host writes race the background copier.
            args.extend(["--rate", "2"]);
        }
        essctl_ok(&essd, &args);

        let fio = Command::new("fio")
            .args([
                "--name=load",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--time_based",
                "--runtime=4",
                "--size=64M",
            ])
            .arg(format!("--uri={}", essd.uri("000TST01")))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut fio = scopeguard_child(fio);
        // Read the whole target twice while the source is being rewritten.
        std::thread::sleep(Duration::from_millis(500));
        for round in 0..2 {
            let sha = export_sha(
                &essd,
                "001TST01",
                &dir.path().join(format!("tgt{round}.bin")),
            );
            assert_eq!(
                sha, t0_sha,
                "{engine}/{mode}: target differs from T0 under load (round {round})"
            );
        }
        assert!(fio.0.wait().unwrap().success());
        let now_sha = export_sha(&essd, "000TST01", &dir.path().join("src-now.bin"));
        assert_ne!(now_sha, t0_sha, "fio did change the source");
        let rel = &relationships(&essd)["relationships"][0];
        if rel.is_null() {
            assert_eq!(mode, "copy", "only a COPY relationship ends by itself");
        } else {
            assert!(rel["tracks_copied"].as_u64().unwrap() > 0, "{rel}");
        }
        // After a clean restart the target still reads as T0.
        assert_eq!(essd.stop().code(), Some(0));
        let essd = Essd::start_config(dir.path(), &dir.path().join("essd.toml"), "TST01");
        let sha = export_sha(&essd, "001TST01", &dir.path().join("tgt-restart.bin"));
        assert_eq!(
            sha, t0_sha,
            "{engine}/{mode}: target differs from T0 after restart"
        );
        // fio touched every track, so a COPY relationship may have ended
        // by itself (all tracks copied by copy-before-write).
        if relationships(&essd)["relationships"][0]["source"] == "000TST01" {
            essctl_ok(&essd, &["flashcopy", "withdraw", "000TST01"]);
        } else {
            assert_eq!(mode, "copy", "a NOCOPY relationship never ends by itself");
        }
    }
}

/// Kills a child on drop.
struct ChildGuard(std::process::Child);
fn scopeguard_child(c: std::process::Child) -> ChildGuard {
    ChildGuard(c)
}
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const MODEL: &str = r#"
import nbd, random, sys
src_uri, tgt_uri, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
TRACK = 65536
SIZE = 4 << 20
rng = random.Random(seed)
s = nbd.NBD(); s.connect_uri(src_uri)
t = nbd.NBD(); t.connect_uri(tgt_uri)
model_src = bytearray(s.pread(SIZE, 0))
model_tgt = bytearray(t.pread(SIZE, 0))
assert model_src == model_tgt, "target must read as the source at T0"
for i in range(400):
    which = rng.random()
    off = rng.randrange(0, SIZE - 1)
    if rng.random() < 0.3:
        off -= off % TRACK
        n = min(rng.choice([TRACK, 2 * TRACK]), SIZE - off)
    else:
        n = min(rng.randrange(1, 3 * TRACK), SIZE - off)
    if which < 0.35:
        data = rng.randbytes(n)
        s.pwrite(data, off)
        model_src[off:off+n] = data
    elif which < 0.7:
        data = rng.randbytes(n)
        t.pwrite(data, off)
        model_tgt[off:off+n] = data
    elif which < 0.8:
        t.zero(n, off)
        model_tgt[off:off+n] = bytes(n)
    elif which < 0.85:
        s.zero(n, off)
        model_src[off:off+n] = bytes(n)
    else:
        assert t.pread(n, off) == model_tgt[off:off+n], f"target read {off}+{n} at step {i}"
assert t.pread(SIZE, 0) == model_tgt
assert s.pread(SIZE, 0) == model_src
t.flush(); s.flush()
print("model ok")
"#;

#[test]
fn mixed_source_and_target_io_matches_a_byte_model() {
    for (engine, mode) in [("uring", "--nocopy"), ("threads", "--rate=1")] {
        let dir = tempdir("fc-model");
        let essd = Essd::start_in(dir.path(), &four_volumes(engine, "4MiB"));
        let seed = dir.path().join("seed.bin");
        random_file(&seed, 4 << 20, 9);
        run(Command::new("nbdcopy").arg(&seed).arg(essd.uri("000TST01")));
        essctl_ok(
            &essd,
            &["flashcopy", "establish", "000TST01:001TST01", mode],
        );
        let out = python(MODEL, &[&essd.uri("000TST01"), &essd.uri("001TST01"), "42"]);
        assert_eq!(out.trim(), "model ok", "{engine}");
    }
}

const DEPENDENT: &str = r#"
import nbd, os, struct, sys, time
a_uri, b_uri, stop = sys.argv[1], sys.argv[2], sys.argv[3]
a = nbd.NBD(); a.connect_uri(a_uri)
b = nbd.NBD(); b.connect_uri(b_uri)
i = 0
deadline = time.time() + 20
while not os.path.exists(stop) and time.time() < deadline:
    i += 1
    rec = struct.pack(">Q", i) * 512
    a.pwrite(rec, (i % 1024) * 4096)   # write A ...
    b.pwrite(rec, (i % 1024) * 4096)   # ... then B, which depends on A
    if i == 1:
        print("up", flush=True)
print(i)
"#;

const CHECK_DEPENDENT: &str = r#"
import nbd, struct, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[2])
bad = 0
maxa = maxb = 0
for slot in range(1024):
    ra = struct.unpack(">Q", a.pread(8, slot * 4096))[0]
    rb = struct.unpack(">Q", b.pread(8, slot * 4096))[0]
    maxa, maxb = max(maxa, ra), max(maxb, rb)
    if rb > ra:
        bad += 1
# B's newest record must not be newer than A's newest: A was written first.
if maxb > maxa:
    bad += 1
print(bad, maxa, maxb)
"#;

#[test]
fn multi_pair_establish_is_one_consistent_point_in_time() {
    let dir = tempdir("fc-cg");
    let essd = Essd::start_in(dir.path(), &four_volumes("uring", "4MiB"));
    for attempt in 0..3u64 {
        let stop = dir.path().join(format!("stop{attempt}"));
        let writer = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(DEPENDENT)
            .args([
                &essd.uri("000TST01"),
                &essd.uri("001TST01"),
                stop.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut writer = scopeguard_child(writer);
        let mut out = std::io::BufReader::new(writer.0.stdout.take().unwrap());
        let mut up = String::new();
        std::io::BufRead::read_line(&mut out, &mut up).unwrap();
        assert_eq!(up, "up\n");
        std::thread::sleep(Duration::from_millis(100 + 200 * attempt));
        essctl_ok(
            &essd,
            &[
                "flashcopy",
                "establish",
                "000TST01:002TST01",
                "001TST01:003TST01",
                "--nocopy",
            ],
        );
        // Written on after T0, then stopped.
        let writes = || {
            essctl(&essd, &["--json", "volume", "show", "001TST01"]).json()["stats"]["writes"]
                .as_u64()
                .unwrap()
        };
        let at_t0 = writes();
        let deadline = Instant::now() + Duration::from_secs(15);
        while writes() < at_t0 + 2 {
            assert!(Instant::now() < deadline, "no write after T0");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(&stop, b"").unwrap();
        let mut count = String::new();
        std::io::Read::read_to_string(&mut out, &mut count).unwrap();
        assert!(writer.0.wait().unwrap().success());
        let written: u64 = count.trim().parse().unwrap();
        let out = python(
            CHECK_DEPENDENT,
            &[&essd.uri("002TST01"), &essd.uri("003TST01")],
        );
        let fields: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
        assert_eq!(fields[0], 0, "targets show B without A: {out}");
        assert!(
            fields[1] > 0 && fields[1] < written,
            "T0 ({out}) must fall inside the write stream of {written}"
        );
        essctl_ok(&essd, &["flashcopy", "withdraw", "000TST01", "001TST01"]);
    }
}

const CRASH_WRITER: &str = r#"
import nbd, random, sys, os
uri, log_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
h = nbd.NBD(); h.connect_uri(uri)
SIZE = 16 << 20
log = open(log_path, "ab")
def record(kind, payload=b""):
    log.write(kind + len(payload).to_bytes(8, "big") + payload)
    log.flush(); os.fsync(log.fileno())
try:
    while True:
        batch = []
        for _ in range(rng.randrange(1, 8)):
            off = rng.randrange(0, SIZE // 4096) * 4096
            batch.append((off, rng.randbytes(4096)))
        # Intent first: a write that lands without a completed FLUSH is
        # allowed to be there (or not) after a crash.
        record(b"P", b"".join(off.to_bytes(8, "big") + data for off, data in batch))
        for off, data in batch:
            h.pwrite(data, off)
        h.flush()
        # Only writes covered by a completed FLUSH are promised to survive.
        record(b"F")
except nbd.Error:
    pass
"#;

const CRASH_CHECK: &str = r#"
import nbd, sys
# The logs of the writers of one volume, one per round, in round order.
uri, seed_path, log_paths = sys.argv[1], sys.argv[2], sys.argv[3:]
h = nbd.NBD(); h.connect_uri(uri)
with open(seed_path, "rb") as f:
    seed = f.read()
flushed, maybe, older = {}, {}, {}
for log_path in log_paths:
    with open(log_path, "rb") as f:
        blob = f.read()
    pending = []
    i = 0
    while i < len(blob):
        kind, n = blob[i:i+1], int.from_bytes(blob[i+1:i+9], "big")
        if i + 9 + n > len(blob):
            # The writer was killed while appending this record: a P record
            # cut short came before any of its writes, an F record cut
            # short confirms nothing.
            break
        payload = blob[i+9:i+9+n]
        i += 9 + n
        if kind == b"P":
            assert not pending, f"{log_path}: two P records in a row"
            pending = [(int.from_bytes(payload[j:j+8], "big"), payload[j+8:j+8+4096])
                       for j in range(0, len(payload), 8 + 4096)]
        else:
            assert kind == b"F" and n == 0, f"{log_path}: bad record at {i - 9 - n}"
            for off, data in pending:
                if off in flushed:
                    older.setdefault(off, []).append(flushed[off])
                flushed[off] = data
                maybe[off] = []
            pending = []
    # A batch without its F record never completed its flush: its writes
    # may or may not be there.
    for off, data in pending:
        maybe.setdefault(off, []).append(data)
missing = [off for off, data in flushed.items()
           if h.pread(4096, off) not in [data] + maybe.get(off, [])]
print(len(flushed), len(missing))
# What a lost block holds instead, to tell a lost write from a stale one.
for off in missing[:8]:
    got = h.pread(4096, off)
    kind = ("zeroes" if got == bytes(4096)
            else "its T0 content" if got == seed[off:off + 4096]
            else "an older write" if got in older.get(off, [])
            else "other data")
    print(f"block {off // 4096} (track {off // 65536}): {kind}")
"#;

#[test]
fn kill_9_never_breaks_t0_or_loses_flushed_writes() {
    require("nbdcopy", "libnbd-bin");
    let dir = tempdir("fc-crash");
    let mut cfg = four_volumes("uring", "16MiB");
    cfg.volumes[0].size = Some("16MiB");
    let mut essd = Essd::start_in(dir.path(), &cfg);
    for (n, vol) in ["000TST01", "002TST01"].iter().enumerate() {
        let seed = dir.path().join(format!("seed{n}.bin"));
        random_file(&seed, 16 << 20, 100 + n as u64);
        run(Command::new("nbdcopy").arg(&seed).arg(essd.uri(vol)));
    }
    let t0_a = export_sha(&essd, "000TST01", &dir.path().join("t0a.bin"));
    let t0_b = export_sha(&essd, "002TST01", &dir.path().join("t0b.bin"));
    essctl_ok(
        &essd,
        &["flashcopy", "establish", "000TST01:001TST01", "--nocopy"],
    );
    essctl_ok(
        &essd,
        &["flashcopy", "establish", "002TST01:003TST01", "--rate", "2"],
    );
    // One log per writer process: a writer killed while appending a record
    // leaves it cut short at the end of its own log, not in the middle of
    // the next writer's records.
    let mut logs: [Vec<PathBuf>; 2] = [Vec::new(), Vec::new()];
    let mut rng_state = 0x1234_5678u64;
    let mut flushed = [0u64; 2];
    for round in 0..20 {
        let spawn = |n: usize, vol: &str, logs: &mut [Vec<PathBuf>; 2]| {
            let log = dir.path().join(format!("writes-{n}-{round}.log"));
            let child = Command::new("/usr/bin/python3")
                .arg("-c")
                .arg(CRASH_WRITER)
                .arg(essd.uri(vol))
                .arg(&log)
                .arg((round * 2 + n as u64).to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            logs[n].push(log);
            scopeguard_child(child)
        };
        let wa = spawn(0, "000TST01", &mut logs);
        let wb = spawn(1, "002TST01", &mut logs);
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        std::thread::sleep(Duration::from_millis(150 + rng_state % 600));
        essd.kill();
        drop(wa);
        drop(wb);
        essd = Essd::start_config(dir.path(), &dir.path().join("essd.toml"), "TST01");
        let a = export_sha(&essd, "001TST01", &dir.path().join("tgt-a.bin"));
        assert_eq!(
            a, t0_a,
            "round {round}: NOCOPY target differs from T0 after kill -9"
        );
        let b = export_sha(&essd, "003TST01", &dir.path().join("tgt-b.bin"));
        assert_eq!(
            b, t0_b,
            "round {round}: COPY target differs from T0 after kill -9"
        );
        for (n, vol) in ["000TST01", "002TST01"].into_iter().enumerate() {
            let seed = dir.path().join(format!("seed{n}.bin"));
            let mut args = vec![essd.uri(vol), seed.to_str().unwrap().to_string()];
            args.extend(
                logs[n]
                    .iter()
                    .filter(|log| log.exists())
                    .map(|log| log.to_str().unwrap().to_string()),
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = python(CRASH_CHECK, &args);
            let f: Vec<u64> = out
                .split_whitespace()
                .take(2)
                .map(|x| x.parse().unwrap())
                .collect();
            assert_eq!(
                f[1], 0,
                "round {round}: {} of {} flushed blocks lost on {vol}:\n{out}",
                f[1], f[0]
            );
            flushed[n] = f[0];
        }
    }
    // The writers got flushes through on both volumes.
    assert!(
        flushed.iter().all(|&n| n > 100),
        "too few flushed writes to judge: {flushed:?}"
    );
    // The background copy resumed after every restart and progressed.
    let list = relationships(&essd);
    let copy = list["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["source"] == "002TST01");
    if let Some(copy) = copy {
        assert!(copy["tracks_copied"].as_u64().unwrap() > 0);
    }
}

#[test]
fn permit_if_target_online() {
    require("nbdinfo", "libnbd-bin");
    let dir = tempdir("fc-online");
    let essd = Essd::start_in(dir.path(), &four_volumes("uring", "4MiB"));
    // Hold a connection to the target open.
    let holder = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg("import nbd, sys, time\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\nprint('up', flush=True)\ntime.sleep(30)\n")
        .arg(essd.uri("001TST01"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut holder = scopeguard_child(holder);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "up");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let run = essctl(
            &essd,
            &["flashcopy", "establish", "000TST01:001TST01", "--nocopy"],
        );
        if run.code == 1 {
            run.refused("target 001TST01 has 1 connected NBD client(s); disconnect them or permit establishing onto an online target");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "establish onto an online target was not refused: {run:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    essctl_ok(
        &essd,
        &[
            "flashcopy",
            "establish",
            "000TST01:001TST01",
            "--nocopy",
            "--permit-online",
        ],
    );
    assert_eq!(
        relationships(&essd)["relationships"][0]["target"],
        "001TST01"
    );
}

#[test]
fn a_background_copy_leaves_neither_volume_in_the_page_cache() {
    require("nbdcopy", "libnbd-bin");
    let dir = tempdir("fc-cache");
    let essd = Essd::start_in(dir.path(), &four_volumes("uring", "64MiB"));
    let seed = dir.path().join("seed.bin");
    random_file(&seed, 48 << 20, 8);
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&seed)
        .arg(essd.uri("000TST01")));
    let (source, target) = (
        dir.path().join("vol-10-0.img"),
        dir.path().join("vol-10-1.img"),
    );
    let filled = cached_pages(&source);
    assert!(filled > 10_000, "{filled} pages of the source cached");
    let t0_sha = export_sha(&essd, "000TST01", &dir.path().join("t0.bin"));

    // A COPY relationship ends by itself once every track is copied.
    essctl_ok(&essd, &["flashcopy", "establish", "000TST01:001TST01"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !relationships(&essd)["relationships"][0].is_null() {
        assert!(Instant::now() < deadline, "{}", relationships(&essd));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The copier drops what it copied from both volumes' cache: small
    // writes into the large folios a copy leaves are slow.
    wait_uncached(&source, "the source after the background copy");
    wait_uncached(&target, "the target after the background copy");
    let sha = export_sha(&essd, "001TST01", &dir.path().join("tgt.bin"));
    assert_eq!(sha, t0_sha, "target after the background copy");
}

/// Fills the source with 4 KiB of data every 8 KiB (so each chunk the
/// copier takes is thousands of small copies: a long window), establishes
/// a background copy onto the attached target, withdraws it 250 ms later,
/// then overwrites the target around the copier's position (its chunk
/// first, backwards), flushes, and checks that every byte written after
/// the withdraw is still there a second later.
const WITHDRAW_RACE: &str = r#"
import http.client, json, socket, sys, time
import nbd

api_sock, base, src, tgt = sys.argv[1:5]
MiB = 1 << 20

class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)

def api(method, url, body=None):
    c = UnixHTTP(api_sock)
    c.request(method, url, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    assert r.status < 300, f"{method} {url}: {r.status} {data!r}"
    return json.loads(data)

def connect(name):
    h = nbd.NBD()
    h.connect_uri(f"{base}/{name}")
    return h

s = connect(src)
size = s.get_size()
for off in range(0, size, 8192):
    s.aio_pwrite(b"S" * 4096, off)
    while s.aio_in_flight() > 32:
        s.poll(-1)
while s.aio_in_flight() > 0:
    s.poll(-1)
s.flush()

t = connect(tgt)
api("POST", "/v1/flashcopy", {"pairs": [{"source": src, "target": tgt}], "permit_online": True})
time.sleep(0.25)
rel = api("DELETE", f"/v1/flashcopy/{tgt}")["relationships"][0]
track = rel["track_size"]
chunk = 256 * track
cur = rel["tracks_copied"] * track // chunk * chunk
start, end = max(0, cur - chunk), min(size, cur + 2 * chunk)
order = list(range(cur, min(size, cur + chunk), MiB))[::-1]
order += [o for o in range(start, end, MiB) if o not in order]
for off in order:
    t.aio_pwrite(b"H" * MiB, off)
while t.aio_in_flight() > 0:
    t.poll(-1)
t.flush()
time.sleep(1.0)
for off in range(start, end, MiB):
    got = t.pread(MiB, off)
    if got != b"H" * MiB:
        i = next(k for k in range(MiB) if got[k:k+1] != b"H")
        sys.exit(f"offset {off + i} written after the withdraw now holds {got[i:i+1]!r}")
print(f"withdrawn at {rel['tracks_copied']}/{rel['tracks_total']}: target writes intact")
"#;

#[test]
fn withdraw_stops_the_background_copy_before_it_answers() {
    let dir = tempdir("fc-withdraw-copier");
    let mut cfg = TestConfig::new("uring");
    cfg.tcp = true;
    cfg.volumes = vec![Vol::new(0x10, 0, "256MiB"), Vol::new(0x10, 1, "256MiB")];
    let essd = Essd::start_in(dir.path(), &cfg);
    let base = essd.tcp_uri("");
    let base = base.trim_end_matches('/');
    for _ in 0..3 {
        let out = python(
            WITHDRAW_RACE,
            &[
                essd.api_sock.to_str().unwrap(),
                base,
                "000TST01",
                "001TST01",
            ],
        );
        assert!(out.contains("target writes intact"), "{out}");
    }
}

#[test]
fn a_withdraw_that_cannot_save_its_record_changes_nothing() {
    require_root("making the state directory immutable (chattr +i)");
    require("chattr", "e2fsprogs");
    let dir = tempdir("fc-withdraw-fails");
    let essd = Essd::start_in(dir.path(), &four_volumes("uring", "64MiB"));
    python(
        "import sys, nbd\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
         for o in range(0, 64 << 20, 1 << 20): h.pwrite(b'S' * (1 << 20), o)\nh.flush()\n",
        &[&essd.uri("000TST01")],
    );
    // 8 MiB/s: the copy of 64 MiB lasts about 8 s.
    essctl_ok(
        &essd,
        &["flashcopy", "establish", "000TST01:001TST01", "--rate", "8"],
    );
    let copied = || relationships(&essd)["relationships"][0]["tracks_copied"].as_u64();
    std::thread::sleep(Duration::from_millis(500));
    let state = dir.path().join("state/flashcopy");
    run(Command::new("chattr").arg("+i").arg(&state));
    let withdraw = essctl(&essd, &["flashcopy", "withdraw", "000TST01"]);
    run(Command::new("chattr").arg("-i").arg(&state));
    assert_eq!(withdraw.code, 1, "the withdraw should fail: {withdraw:?}");
    // Still there, and still copying.
    let before = copied().expect("the relationship is still listed");
    std::thread::sleep(Duration::from_secs(2));
    let after = copied().expect("the relationship is still listed");
    assert!(
        after > before,
        "the background copy stalled at {before} tracks after a failed withdraw"
    );
    essctl_ok(&essd, &["flashcopy", "withdraw", "000TST01"]);
    assert!(relationships(&essd)["relationships"][0].is_null());
}

#[test]
fn zero_length_trim_and_zero_on_flashcopy_volumes_answer_and_change_nothing() {
    let dir = tempdir("fc-zero-length");
    let essd = Essd::start_in(dir.path(), &four_volumes("uring", "16MiB"));
    python(
        "import sys, nbd\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
         h.pwrite(b'T' * 65536, 0)\nh.flush()\n",
        &[&essd.uri("000TST01")],
    );
    essctl_ok(
        &essd,
        &["flashcopy", "establish", "000TST01:001TST01", "--nocopy"],
    );
    // Zero-length requests are outside what the protocol defines, but
    // they must not cost the connection (or requests in flight on it).
    let out = python(
        r#"
import sys, nbd
for uri in sys.argv[1:]:
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri)
    for op in (lambda: h.trim(0, 0), lambda: h.zero(0, 0), lambda: h.trim(0, 65536)):
        cookie = h.aio_pread(nbd.Buffer(65536), 0)
        op()
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert h.aio_command_completed(cookie)
    assert h.pread(65536, 0) == b"T" * 65536, uri
    h.shutdown()
    print(uri, "ok")
"#,
        &[&essd.uri("000TST01"), &essd.uri("001TST01")],
    );
    assert_eq!(out.matches(" ok").count(), 2, "{out}");
}

/// A configuration that dropped the source or the target of a recorded
/// relationship stops the start with the record, the volume and how to take
/// it out properly; the record is untouched, and with the configuration put
/// back the target still reads as T0.
#[test]
fn a_start_without_a_volume_of_a_relationship_is_refused_and_loses_nothing() {
    let dir = tempdir("fc-dropped");
    let mut essd = Essd::start_in(dir.path(), &four_volumes("uring", "16MiB"));
    let seed = dir.path().join("seed.bin");
    random_file(&seed, 16 << 20, 9);
    run(Command::new("nbdcopy").arg(&seed).arg(essd.uri("000TST01")));
    essctl_ok(
        &essd,
        &["flashcopy", "establish", "000TST01:001TST01", "--nocopy"],
    );
    // Overwritten after T0: the target must keep the seed.
    random_file(&dir.path().join("later.bin"), 16 << 20, 10);
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(dir.path().join("later.bin"))
        .arg(essd.uri("000TST01")));
    assert_eq!(essd.terminate().code(), Some(0));
    let record = dir.path().join("state/flashcopy/relationships.json");
    let before = std::fs::read(&record).unwrap();

    for (file, role, volume) in [
        ("vol-10-0.img", "source", "000TST01"),
        ("vol-10-1.img", "target", "001TST01"),
    ] {
        let refused = essd.start_edited(|c| without_volume(c, &dir.path().join(file)));
        assert_eq!(
            refused,
            (
                Some(2),
                format!(
                    "essd: {}: relationship 000TST01 → 001TST01: {role} {volume} is no longer in \
                     the configuration; put it back, start essd and withdraw the relationship \
                     (essctl flashcopy withdraw 000TST01:001TST01) before taking it out",
                    record.display()
                )
            )
        );
    }
    assert_eq!(std::fs::read(&record).unwrap(), before);

    essd.restart("TST01");
    assert_eq!(
        export_sha(&essd, "001TST01", &dir.path().join("t0.bin")),
        sha256_file(&seed)
    );
}

/// Writes 64 KiB of `B` at track 3 twice, each time without flushing;
/// prints the outcome of each (`ok` or the errno name).
const WRITE_TRACK_3_TWICE: &str = r#"
import nbd, sys, errno
h = nbd.NBD()
h.connect_uri(sys.argv[1])
out = []
for _ in range(2):
    try:
        h.pwrite(b"B" * 65536, 3 * 65536)
        out.append("ok")
    except nbd.Error as e:
        out.append(errno.errorcode.get(e.errnum, e.string))
print(" ".join(out))
"#;

/// A NOCOPY target whose storage fails at write-back (a loop device over
/// a sparse file on a full tmpfs): a source write whose track's T0 must
/// first be copied to the target is refused (EIO), since the target's
/// flush failed before the copy could be recorded. Asked again, it must
/// be refused again: the failed write-back lost the copy, and the kernel
/// reports that once, so the second try's flush succeeded, the copy was
/// recorded as made and the source overwritten, T0 of that track then on
/// neither disk. The source keeps its T0 data, and the target reads it
/// there (not the lost copy), also once the page cache is dropped.
#[test]
fn a_target_whose_write_back_failed_never_records_a_copy_as_made() {
    require_root("losetup");
    require("losetup", "mount");
    let dir = tempdir("fc-target-write-back");
    let fs = ScratchMount::mount("tmpfs", "size=8m", &dir.path().join("fs"));
    let backing = fs.dir.join("target.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let dev = LoopDevice::attach(&backing);
    let mut cfg = TestConfig::new("threads");
    cfg.volumes = vec![
        Vol::new(0x10, 0, "16MiB"),
        Vol {
            size: None,
            path: Some(dev.dev.clone()),
            ..Vol::new(0x10, 1, "")
        },
    ];
    let essd = Essd::start_in(dir.path(), &cfg);
    let source = essd.uri("000TST01");
    python(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
         h.pwrite(b'A' * 65536, 3 * 65536); h.flush()\n",
        &[&source],
    );
    essctl_ok(
        &essd,
        &["flashcopy", "establish", "000TST01:001TST01", "--nocopy"],
    );
    fs.fill("filler");
    let tries = python(WRITE_TRACK_3_TWICE, &[&source]);
    assert_eq!(tries.trim(), "EIO EIO");
    let t0 = python(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
         print(h.pread(65536, 3 * 65536) == b'A' * 65536)\n",
        &[&source],
    );
    assert_eq!(t0.trim(), "True", "the source lost its T0 data");
    // The target reads T0 there, from the source: not the copy whose
    // write-back failed, gone once the cache lets its pages go.
    let device = std::fs::File::open(&dev.dev).unwrap();
    // SAFETY: advice on a descriptor `device` owns.
    let advised = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&device),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(advised, 0);
    let target = python(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
         print(h.pread(65536, 3 * 65536) == b'A' * 65536)\n",
        &[&essd.uri("001TST01")],
    );
    assert_eq!(target.trim(), "True", "the target does not read T0");
    let shown = essctl(&essd, &["--json", "flashcopy", "show", "000TST01"]).json();
    let rel = &shown["relationships"][0];
    assert_eq!(rel["state"], "failed", "{shown}");
    assert!(
        rel["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("a write-back of target 001TST01 failed")),
        "{shown}"
    );
    drop(essd);
}

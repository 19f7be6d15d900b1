//! Seeded fault schedules (`ESSD_FAULT_SEED=N` picks another one): random
//! overwrites and copies under stalls, resets, drops and `kill -9`, where
//! every acknowledged write must be on the secondary and the volumes end
//! equal.

use super::*;

/// Overwrites 4 KiB blocks of the volume at random for `argv[2]` seconds
/// (random generator seeded with `argv[3]`), at most 8 writes in flight and
/// about 150 a second, never two to one block at once; each write's data
/// comes from its block and version. Paced so that most tracks go
/// untouched for several cleaning intervals: their marks are cleared while
/// duplex, and a suspend must record what is written after it. A block
/// whose latest write failed is left out (its content is not known). With
/// a directory `argv[4]`, whenever a file `ask` appears there it is
/// removed and the blocks acknowledged so far are written to `acked.json`
/// (and, just before, the highest version sent to each block so far to
/// `issued.json`, acknowledged or not: numbered without the tag), and the
/// writes also end when a file `stop` appears there (`""`: no
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
        with open(os.path.join(asks, "issued.tmp"), "w") as f:
            json.dump(issued, f)
        os.rename(os.path.join(asks, "issued.tmp"), os.path.join(asks, "issued.json"))
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
/// is back and the resume is taken. The faults are healed: first the
/// secondary's side (`sv` at `b`) must show what the primary shows
/// ([`wait_sides_agree`]), the same suspend and reason before the resume.
fn resume_when_the_path_is_back(a: &Essd, volume: &str, b: &Essd, sv: &str, seed: u64) {
    wait_sides_agree(a, volume, b, sv, &format!("seed {seed}, before the resume"));
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
/// fault may suspend it again after a resume); then its secondary's side
/// (`sv` at `b`) must show it duplex too.
fn resume_until_duplex(a: &Essd, volume: &str, b: &Essd, sv: &str, seed: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        resume_when_the_path_is_back(a, volume, b, sv, seed);
        let pair = show(a, volume);
        if pair["state"] == "duplex" {
            wait_sides_agree(a, volume, b, sv, &format!("seed {seed}, once duplex"));
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
        resume_when_the_path_is_back(&s.a, &va, &s.b, &vb, seed);
        next = schedule.next() % 9;
    }
    let out = writer.join().unwrap();
    resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
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
        for (v, sv) in [(&v1, &s1), (&v2, &s2)] {
            resume_until_duplex(a, v, b, sv, seed);
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
        resume_until_duplex(a, v, b, sv, seed);
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
        resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
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
    resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
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
        resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
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
fn bring_back(primary: &Essd, volume: &str, secondary: &Essd, sv: &str, seed: u64) {
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
    resume_when_the_path_is_back(primary, volume, secondary, sv, seed);
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
#[allow(clippy::too_many_arguments)]
fn copy_under_faults(
    primary: &mut Essd,
    pv: &str,
    secondary: &mut Essd,
    sv: &str,
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
        bring_back(primary, pv, secondary, sv, seed);
    }
    resume_until_duplex(primary, pv, secondary, sv, seed);
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

/// The end of a failover cycle: the pair A → B (`va` → `vb`) is duplex
/// and current at A and duplex at B, the volumes are equal, and every
/// block `slots` wrote holds its last acknowledged write of the primary of
/// its time on both.
fn assert_cycle_ended(s: &Sites, va: &str, vb: &str, slots: &Slots, context: &str) {
    wait_current(&s.a, va);
    let pair = show(&s.a, va);
    assert_eq!(
        (
            pair["role"].as_str(),
            pair["state"].as_str(),
            pair["replication_status"].as_str()
        ),
        (Some("primary"), Some("duplex"), Some("current")),
        "{context}: {pair}"
    );
    let side = wait_state(&s.b, vb, "duplex");
    assert_eq!(side["role"], "secondary", "{context}: {side}");
    assert_eq!(
        volume_sha(&s.a, va),
        volume_sha(&s.b, vb),
        "{context}: the volumes differ"
    );
    for (essd, v) in [(&s.a, va), (&s.b, vb)] {
        let wrong = slots.wrong(essd, v);
        assert!(
            wrong.is_empty(),
            "{context}: blocks of {v} not as last acknowledged on the primary of the time: \
             {wrong:?}"
        );
    }
}

/// The start of the failover cycles, on sites named `tag`: A → B duplex
/// with no track marked, over volumes alike on both sides (a full copy
/// would send 60 MiB of data) but for the last region, a hole but for the
/// blocks hosts write, written alike too; then A loses its links and hosts
/// write 4 to 11 of those blocks there (`cut`, never mirrored: A hands
/// over exactly their tracks, `on_a_alone`), failover at B, and hosts
/// write 8 to 7 + `b_spread` blocks of B (`b_blocks`, in the tracks
/// `on_b`).
struct TakenOver {
    s: Sites,
    va: String,
    vb: String,
    schedule: Schedule,
    slots: Slots,
    cut: Vec<u64>,
    on_a_alone: BTreeSet<u64>,
    b_blocks: Vec<u64>,
    on_b: BTreeSet<u64>,
}

/// Runs the start of a failover cycle (see [`TakenOver`]).
fn take_over_after_a_cut(tag: &str, seed: u64, b_spread: u64) -> TakenOver {
    let s = Sites::start(tag, |_| {});
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
    let n = 8 + (schedule.next() % b_spread) as usize;
    let b_blocks = slots.pick(&mut schedule, n);
    let on_b = slots.write(&s.b, &vb, &b_blocks, true);
    TakenOver {
        s,
        va,
        vb,
        schedule,
        slots,
        cut,
        on_a_alone,
        b_blocks,
        on_b,
    }
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
    let TakenOver {
        mut s,
        va,
        vb,
        mut schedule,
        mut slots,
        cut,
        on_a_alone,
        b_blocks,
        on_b,
    } = take_over_after_a_cut("pprc-cycle-faults", seed, 24);

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
        &va,
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
        &vb,
        &s.proxy,
        &mut slots,
        &mut schedule,
        seed,
    );
    let context = format!("{context}, switch-back faults {:?}", switch.faults);
    for (copy, faults) in [("failback", &back.faults), ("switch-back", &switch.faults)] {
        assert!(
            faults.iter().any(|f| f.2 == "duplex pending"),
            "{context}: no fault hit the {copy}'s copy"
        );
    }

    assert_cycle_ended(&s, &va, &vb, &slots, &context);
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
    // Each copy's bound well under the 60 MiB a full copy sends (a seed
    // with several faults in both copies widens both bounds).
    assert!(
        back_bound.max(switch_bound) < (60 << 20) / 6,
        "{context}: the bounds are no proof of partial copies"
    );
}

/// Reads every 4 KiB block of an export (or only the blocks of the list
/// `"blocks"`, if the input has one) and prints those that do not hold
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
def expect(b):
    v = acked.get(str(b))
    if v is not None:
        return hashlib.sha256(f"{b}:{v}".encode()).digest() * 128
    return image[b * 4096:(b + 1) * 4096].ljust(4096, b"\0")
wrong, size, step = [], h.get_size(), 1 << 20
if "blocks" in want:
    wrong = [b for b in want["blocks"] if h.pread(4096, b * 4096) != expect(b)]
else:
    for off in range(0, size, step):
        chunk = h.pread(min(step, size - off), off)
        for i in range(0, len(chunk), 4096):
            if chunk[i:i + 4096] != expect((off + i) // 4096):
                wrong.append((off + i) // 4096)
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
        resume_when_the_path_is_back(&s.a, &pa, &s.b, &pb, seed);
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
    resume_until_duplex(&s.a, &pa, &s.b, &pb, seed);
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
        bring_back(&s.a, &va, &s.b, &vb, seed);
    }
    resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
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
        wait_sides_agree(&s.a, &va, &s.b, &vb, &context);
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

/// Delay of every chunk on the link while a `failback` command runs in
/// [`random_crashes_during_the_failback_command_lose_nothing`]: its three
/// round trips (the old primary's hand-over, its bitmap, the end of the
/// hand-over) take about 6 × this, long enough to be hit between any two.
const COMMAND_DELAY: Duration = Duration::from_millis(120);

/// Failback events logged at `essd` so far (one per failback taken).
fn failbacks_taken(essd: &Essd) -> usize {
    essd.log()
        .lines()
        .filter(|l| l.contains("event=pprc.pair.failback") && l.contains(": copying "))
        .count()
}

/// One `failback` command hit by a fault: (where: 0 a seeded moment after
/// it was issued, 1 just after the old primary recorded the hand-over;
/// the fault, see [`inject_command_fault`]; ms after the command was
/// issued; its exit code; what it printed on stderr).
type CommandFault = (u64, u64, u128, i32, String);

/// What [`failback_under_crashes`] saw.
struct CrashedFailback {
    /// Each faulted command.
    faults: Vec<CommandFault>,
    /// The errors of the operator's retries (exit code 1), in order.
    retries: Vec<String>,
    /// Tracks hosts wrote at the new primary between the commands (all
    /// before the failback was taken).
    between: BTreeSet<u64>,
    /// Tracks hosts wrote at the new primary while the commands ran, and
    /// rewrote after a crash left their writes unsure: copied if written
    /// before the failback was taken.
    racing: BTreeSet<u64>,
    /// (tracks copied, tracks handed over by the old primary) as logged
    /// by the failback taken.
    copied: (usize, usize),
    /// Whether the old primary still had its tracks to hand over when
    /// the command that was taken started (not fetched by an earlier one).
    had_handover: bool,
}

/// A fault for a running `failback` command, drawn from `schedule`: 0
/// `kill -9` of the new primary's server (restarted once the command
/// answered), 1 `kill -9` and restart of the old primary's, 2 a reset of
/// every link, 3 of one, 4 every link dropped for a while, 5 stalled past
/// the 2 s timeout. Returns (kind, how long the link stays faulted).
fn inject_command_fault(
    schedule: &mut Schedule,
    new: &mut Essd,
    old: &mut Essd,
    link: &FaultProxy,
) -> (u64, Duration) {
    let kind = schedule.next() % 6;
    match kind {
        0 => new.crash(),
        1 => {
            let serial = old.serial.clone();
            old.kill_and_restart(&serial);
        }
        2 => link.reset(),
        3 => link.reset_one(),
        4 => link.drop_all(),
        _ => link.stall(),
    }
    let hold = match kind {
        4 => schedule.millis(300, 2500),
        5 => schedule.millis(2500, 3500),
        _ => Duration::ZERO,
    };
    (kind, hold)
}

/// `failback` of `nv` at `new` (the volume that took over from `ov` at
/// `old`, whose hand-over bitmap file is `handover`), as an operator
/// does it when things break: one or two commands are hit by a seeded
/// fault ([`inject_command_fault`]) at a seeded moment of the command
/// or just after the old primary recorded its hand-over, while a host
/// overwrites blocks of `nv`; the killed server is restarted, hosts write
/// `nv` again and the command is issued again, until one is taken (or
/// was, before its answer got lost). Every command that is not taken
/// answers exit code 1 and a message (3 if its server was killed), and
/// leaves `nv` the suspended primary that took over and `ov` the
/// suspended primary, the protected secondary, or (a command lost on the
/// way, nothing written to `ov` since the failover) a primary still
/// duplex that never noticed.
#[allow(clippy::too_many_arguments)]
fn failback_under_crashes(
    new: &mut Essd,
    nv: &str,
    old: &mut Essd,
    ov: &str,
    handover: &Path,
    link: &FaultProxy,
    slots: &mut Slots,
    schedule: &mut Schedule,
    seed: u64,
) -> CrashedFailback {
    let asks = tempfile::tempdir().unwrap();
    let taken_before = failbacks_taken(new);
    let mut done = CrashedFailback {
        faults: Vec::new(),
        retries: Vec::new(),
        between: BTreeSet::new(),
        racing: BTreeSet::new(),
        copied: (0, 0),
        had_handover: true,
    };
    let mut taken = false;
    for i in 0..1 + schedule.next() % 2 {
        // A host writes 6 blocks of nv at random while the command runs.
        let racing = slots.pick(schedule, 6);
        let base = slots.version;
        let writer = overwriter_every(new, nv, seed + i, asks.path(), base, &racing, "0.02");
        std::thread::sleep(Duration::from_millis(100));
        done.had_handover = show(old, ov)["role"] == "primary" || handover.exists();
        let recorded = handover.exists();
        link.delay(COMMAND_DELAY);
        let issued = Instant::now();
        let answer = essctl_async(new, &["--json", "pprc", "failback", nv]);
        let window = schedule.next() % 2;
        if window == 1 && !recorded {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !handover.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(schedule.millis(0, COMMAND_DELAY.as_millis() as u64));
        } else {
            std::thread::sleep(schedule.millis(0, 7 * COMMAND_DELAY.as_millis() as u64));
        }
        let at = issued.elapsed().as_millis();
        let (kind, hold) = inject_command_fault(schedule, new, old, link);
        std::thread::sleep(hold);
        link.heal();
        let out = answer
            .recv_timeout(Duration::from_secs(30))
            .expect("the failback command never answered")
            .unwrap();
        if kind == 0 {
            let serial = new.serial.clone();
            new.restart(&serial);
        }
        let (code, said) = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
        );
        // The host's acknowledged writes are kept; those a crash left
        // unsure are written again.
        std::fs::write(asks.path().join("stop"), b"").unwrap();
        let wrote = writer.join().unwrap();
        for (b, v) in wrote["acked"].as_object().unwrap() {
            slots
                .expected
                .insert(b.parse().unwrap(), v.as_u64().unwrap());
        }
        let writes = wrote["writes"].as_u64().unwrap();
        slots.version = base + writes;
        slots.writes += writes;
        done.racing.extend(racing.iter().map(|b| b * 4096 / TRACK));
        let unsure: Vec<u64> = wrote["unsure"]
            .as_object()
            .map(|u| u.keys().map(|b| b.parse().unwrap()).collect())
            .unwrap_or_default();
        assert!(
            kind == 0 || (unsure.is_empty() && wrote["errors"] == serde_json::json!({})),
            "seed {seed}: the host saw errors at {nv}: {wrote}"
        );
        done.racing.extend(slots.write(new, nv, &unsure, true));
        let context = format!(
            "seed {seed}: failback of {nv} hit by fault {kind} {at} ms after it was issued \
             (window {window}) answered {code} {said:?}"
        );
        done.faults.push((window, kind, at, code, said.clone()));
        taken = failbacks_taken(new) > taken_before;
        match code {
            0 => {
                let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(p["role"], "primary", "{context}: {p}");
                assert!(taken, "{context}: answered, not logged");
            }
            1 => {
                assert!(kind != 0 && !taken, "{context}");
                assert!(said.starts_with("essctl: "), "{context}");
            }
            3 => assert!(kind == 0, "{context}"),
            _ => panic!("{context}: exit code {code}"),
        }
        if taken {
            break;
        }
        // Not taken: the volume that took over is as it was, the old
        // primary a suspended primary still or a secondary hosts cannot
        // write.
        let p = show(new, nv);
        assert_eq!(
            (
                p["role"].as_str(),
                p["state"].as_str(),
                p["reason"].as_str()
            ),
            (Some("primary"), Some("suspended"), Some("failover")),
            "{context}: {p}"
        );
        let side = show(old, ov);
        eprintln!("{context}: old primary {side}");
        match (side["role"].as_str(), side["state"].as_str()) {
            (Some("primary"), Some("suspended")) => {}
            // A command lost before it reached the old primary leaves it
            // as it was: at the switch-back (its hosts stopped) a primary
            // that never noticed the failover, with nothing to copy.
            (Some("primary"), Some("duplex")) => assert_eq!(
                side["out_of_sync_tracks"], 0,
                "{context}: the old primary is duplex with tracks to copy: {side}"
            ),
            (Some("secondary"), _) => {
                assert_eq!(try_write(old, ov), "read-only EPERM", "{context}")
            }
            _ => panic!("{context}: {side}"),
        }
        // A resume once the path is back is no way out: only a failback
        // fetches the tracks the old primary changed but never mirrored.
        path(new, "0x10", &old.serial.clone(), "0x10", "2");
        if side["role"] == "secondary" {
            // Both sides show the failback to run again.
            wait_sides_agree(new, nv, old, ov, &context);
        }
        essctl(new, &["pprc", "resume", nv]).refused(&format!(
            "pair {nv} → {ov} is suspended (failover): this volume took over, and only a \
             failback copies the tracks {} changed but never mirrored too: essctl pprc \
             failback {nv}",
            old.serial
        ));
        // Hosts go on writing the volume that took over.
        let n = 1 + (schedule.next() % 4) as usize;
        let blocks = slots.pick(schedule, n);
        done.between.extend(slots.write(new, nv, &blocks, true));
    }
    if !taken {
        // The operator issues the command again until it is taken.
        done.had_handover = show(old, ov)["role"] == "primary" || handover.exists();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = essctl(new, &["--json", "pprc", "failback", nv]);
            if r.code == 0 {
                assert_eq!(r.json()["role"], "primary", "seed {seed}: {r:?}");
                break;
            }
            assert_eq!(r.code, 1, "seed {seed}: {r:?}");
            done.retries.push(r.stderr.trim_end().to_string());
            assert!(
                Instant::now() < deadline,
                "seed {seed}: the failback of {nv} was never taken again: {:?}",
                done.retries
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(failbacks_taken(new), taken_before + 1, "seed {seed}");
    }
    done.copied = failback_copied(new);
    done
}

/// The failover / failback / switch-back cycle with its `failback`
/// commands themselves hit by seeded faults (`ESSD_FAULT_SEED`): A → B
/// duplex, A loses its links and hosts write on there (never mirrored),
/// failover at B and hosts write B; then one or two failbacks B → A are
/// hit by `kill -9` of either server, link resets (all, or one), drops or
/// stalls past the timeout at a seeded moment of the command or just after
/// A recorded its hand-over, while a host overwrites blocks of B; the
/// operator restarts the killed server and issues the failback again
/// until it is taken; the same for the switch-back A → B (failover at A,
/// hosts write A). Each command not taken answers exit code 1 (3 if its
/// server was killed) and leaves the volume that took over a suspended
/// primary (reason failover) and the old primary a suspended primary or a
/// protected secondary. The failback taken copies the union of the tracks
/// written on the volume that took over and those the old primary changed
/// but never mirrored (those handed over by a command not taken included);
/// at the end the pair is duplex and current, the volumes are equal, every
/// block holds the last acknowledged write of the primary of its time (A's
/// unmirrored writes overwritten by B's data), and the links carried far
/// less than a full copy.
#[test]
fn random_crashes_during_the_failback_command_lose_nothing() {
    let seed = fault_seed(0x5EED_0009);
    let started = Instant::now();
    let TakenOver {
        mut s,
        va,
        vb,
        mut schedule,
        mut slots,
        cut,
        on_a_alone,
        b_blocks,
        on_b,
    } = take_over_after_a_cut("pprc-failback-crashes", seed, 16);
    let handover_a = s.dir_a.path().join(format!("state/pprc/{va}.handover"));
    let handover_b = s.dir_b.path().join(format!("state/pprc/{vb}.handover"));

    // Failback B → A, its commands under faults.
    s.proxy.heal();
    path(&s.b, "0x10", "TSTA1", "0x10", "2");
    s.back.reset_counters();
    let writes = slots.writes;
    let back = failback_under_crashes(
        &mut s.b,
        &vb,
        &mut s.a,
        &va,
        &handover_a,
        &s.back,
        &mut slots,
        &mut schedule,
        seed,
    );
    let context = format!(
        "seed {seed}, failback faults (window, kind, ms, code, said) {:?}, retries {:?}",
        back.faults, back.retries
    );
    eprintln!("{context}");
    let least: BTreeSet<u64> = on_a_alone
        .iter()
        .chain(&on_b)
        .chain(&back.between)
        .copied()
        .collect();
    let most = least.union(&back.racing).count();
    let (copied, handed) = back.copied;
    assert!(
        (least.len()..=most).contains(&copied)
            && handed
                == if back.had_handover {
                    on_a_alone.len()
                } else {
                    0
                },
        "{context}: the failback taken copies {copied} tracks, {handed} handed over by A, for \
         {on_a_alone:?} written on A alone, {on_b:?} and {:?} on B, and {:?} by the host that \
         raced the commands (A had its tracks to hand over: {})",
        back.between,
        back.racing,
        back.had_handover
    );
    bring_back(&s.b, &vb, &s.a, &va, seed);
    resume_until_duplex(&s.b, &vb, &s.a, &va, seed);
    let back_sent = s.back.bytes_forward();
    let b_wrote = least.union(&back.racing).count();
    let back_bound = copy_bound(&slots, back.faults.len(), slots.writes - writes);
    let wrong = slots.wrong(&s.a, &va);
    assert!(
        wrong.is_empty(),
        "{context}: blocks of A not as B's hosts (or A's before the cut) wrote them: {wrong:?}"
    );
    let side = wait_state(&s.a, &va, "duplex");
    assert_eq!(side["role"], "secondary", "{context}: {side}");
    // Told duplex, A no longer keeps its hand-over, also when the word that
    // the copy fetched it got lost.
    assert!(
        !handover_a.exists(),
        "{context}: A's hand-over bitmap outlived the copy that has its tracks"
    );

    // Switch back, hosts stopped at B: failover at A, hosts write A,
    // failback A → B, its commands under faults.
    let p = essctl_json(&s.a, &["pprc", "failover", &va]);
    assert_eq!(p["reason"], "failover", "{context}: {p}");
    let n = 8 + (schedule.next() % 16) as usize;
    let a_blocks = slots.pick(&mut schedule, n);
    let on_a = slots.write(&s.a, &va, &a_blocks, true);
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    s.proxy.reset_counters();
    let writes = slots.writes;
    let switch = failback_under_crashes(
        &mut s.a,
        &va,
        &mut s.b,
        &vb,
        &handover_b,
        &s.proxy,
        &mut slots,
        &mut schedule,
        seed,
    );
    let context = format!(
        "{context}; switch-back faults {:?}, retries {:?}",
        switch.faults, switch.retries
    );
    eprintln!("{context}");
    // B hands over at most the tracks written while it was the primary.
    let least: BTreeSet<u64> = on_a.union(&switch.between).copied().collect();
    let most = least
        .iter()
        .chain(&switch.racing)
        .collect::<BTreeSet<_>>()
        .len();
    let (copied, handed) = switch.copied;
    assert!(
        handed <= b_wrote && (least.len()..=most + handed).contains(&copied),
        "{context}: the switch-back copies {copied} tracks, {handed} handed over by B, for \
         {on_a:?} and {:?} written on A, and {:?} by the host that raced the commands",
        switch.between,
        switch.racing
    );
    bring_back(&s.a, &va, &s.b, &vb, seed);
    resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
    let switch_sent = s.proxy.bytes_forward();
    let switch_bound = copy_bound(&slots, switch.faults.len(), slots.writes - writes);

    assert_cycle_ended(&s, &va, &vb, &slots, &context);
    assert!(
        !handover_b.exists(),
        "{context}: B's hand-over bitmap outlived the copy that has its tracks"
    );
    eprintln!(
        "{context}: failback sent {back_sent} bytes (bound {back_bound}), switch-back \
         {switch_sent} (bound {switch_bound}), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        back_sent >= cut.iter().chain(&b_blocks).collect::<BTreeSet<_>>().len() as u64 * 4096
            && back_sent <= back_bound,
        "{context}: the failback sent {back_sent} bytes (bound {back_bound})"
    );
    assert!(
        switch_sent >= a_blocks.len() as u64 * 4096 && switch_sent <= switch_bound,
        "{context}: the switch-back sent {switch_sent} bytes (bound {switch_bound})"
    );
    // Each copy's bound well under the 60 MiB a full copy sends (a seed
    // with several faults in both copies widens both bounds).
    assert!(
        back_bound.max(switch_bound) < (60 << 20) / 6,
        "{context}: the bounds are no proof of partial copies"
    );
}

/// The relationship `volume` is in, as `essctl flashcopy show` gives it.
fn flashcopy_view(essd: &Essd, volume: &str) -> serde_json::Value {
    essctl(essd, &["--json", "flashcopy", "show", volume]).json()["relationships"][0].clone()
}

/// Tracks whose copy the bitmap file of the (only) FlashCopy relationship
/// of `essd` records, i.e. what a crash keeps.
fn flashcopy_durable_copies(essd: &Essd) -> BTreeSet<u64> {
    let dir = essd.dir.join("state/flashcopy");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("relationships.json")).unwrap()).unwrap();
    bitmap_file_tracks(&dir.join(record["relationships"][0]["bitmap"].as_str().unwrap()))
}

/// A host running [`OVERWRITE_AT_RANDOM`] on `blocks` of `export` as fast
/// as 8 writes in flight allow until its connection breaks; its versions
/// count from `base` and carry `tag`.
fn overwriter_until_broken(
    essd: &Essd,
    export: &str,
    seed: u64,
    base: u64,
    blocks: &[u64],
    tag: &str,
) -> std::thread::JoinHandle<serde_json::Value> {
    let args = [
        essd.uri(export),
        seed.to_string(),
        tag.to_string(),
        base.to_string(),
        serde_json::json!(blocks).to_string(),
    ];
    std::thread::spawn(move || {
        let out = python(
            OVERWRITE_AT_RANDOM,
            &[
                &args[0], "600", &args[1], "", &args[2], "0", &args[3], &args[4],
            ],
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    })
}

/// Versions a host wrote, by block: what [`OVERWRITE_AT_RANDOM`] reports
/// (a number, or a tagged string); a block not in the model holds its T0
/// image.
type Versions = BTreeMap<u64, serde_json::Value>;

/// Adds the writes a host killed mid-run saw acknowledged to `model`, and
/// returns its blocks whose last write was in flight: (the version before,
/// `None` for the T0 image; the version in flight).
fn acked_and_in_flight(
    out: &serde_json::Value,
    model: &mut Versions,
) -> BTreeMap<u64, (Option<serde_json::Value>, serde_json::Value)> {
    for (b, v) in out["acked"].as_object().unwrap() {
        model.insert(b.parse().unwrap(), v.clone());
    }
    out["unsure"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(b, u)| {
            let b: u64 = b.parse().unwrap();
            let before = match &u[0] {
                serde_json::Value::Null => model.get(&b).cloned(),
                v => Some(v.clone()),
            };
            (b, (before, u[1].clone()))
        })
        .collect()
}

/// Checks every block of `export` against the T0 `image` and the host's
/// `model`: a block whose last write was in flight (`in_flight`) holds
/// that write or what it held before, any other block its last
/// acknowledged write or its T0 image. Returns the blocks that hold what
/// they held before their write in flight.
fn blocks_after_a_kill(
    essd: &Essd,
    export: &str,
    image: &Path,
    model: &Versions,
    in_flight: &BTreeMap<u64, (Option<serde_json::Value>, serde_json::Value)>,
    context: &str,
) -> BTreeSet<u64> {
    let image = image.display().to_string();
    let mut expected = model.clone();
    for (b, (_, new)) in in_flight {
        expected.insert(*b, new.clone());
    }
    let wrong = check_blocks(
        BLOCKS_NOT_AS_IMAGE_AND_ACKED,
        essd,
        export,
        &serde_json::json!({"image": image, "acked": expected}),
    );
    let lost: Vec<&u64> = wrong
        .iter()
        .filter(|b| !in_flight.contains_key(b))
        .collect();
    assert!(
        lost.is_empty(),
        "{context}: {} blocks of {export} are neither their T0 image nor their last \
         acknowledged write, among them {:?}",
        lost.len(),
        &lost[..lost.len().min(32)]
    );
    for b in &wrong {
        match &in_flight[b].0 {
            Some(v) => expected.insert(*b, v.clone()),
            None => expected.remove(b),
        };
    }
    let neither = check_blocks(
        BLOCKS_NOT_AS_IMAGE_AND_ACKED,
        essd,
        export,
        &serde_json::json!({"image": image, "acked": expected, "blocks": wrong}),
    );
    assert!(
        neither.is_empty(),
        "{context}: blocks of {export} written in flight hold neither that write nor what \
         they held before: {neither:?}"
    );
    wrong.into_iter().collect()
}

/// Settles `model` after a kill: each block written in flight holds its
/// write unless it is among the blocks found `old`.
fn settle(
    model: &mut Versions,
    in_flight: BTreeMap<u64, (Option<serde_json::Value>, serde_json::Value)>,
    old: &BTreeSet<u64>,
) {
    for (b, (before, new)) in in_flight {
        match if old.contains(&b) { before } else { Some(new) } {
            Some(v) => model.insert(b, v),
            None => model.remove(&b),
        };
    }
}

/// A FlashCopy S → T at server A (a background copy at 0.5 to 1 MiB/s of
/// S's 56 MiB of data, still running throughout, or NOCOPY) onto T
/// (64 MiB of other data), T the primary of T → T' at B. Hosts overwrite
/// blocks of 32 tracks of S (half of them tracks of T's) and of 32 tracks
/// in 4 of T's 64-track regions, 8 writes in flight each, and at 2 to 4
/// seeded moments (`ESSD_FAULT_SEED`) A, which holds the relationship
/// and the pair, is killed (`kill -9`), sometimes with its link stalled
/// just before so that T' lags, then restarted. After each kill the
/// FlashCopy bitmap file records every track of S or T with an
/// acknowledged write (NOCOPY: none that no host wrote), and the pair's
/// bitmap file every track of T with a write in flight and nothing
/// outside T's regions (neither S's writes nor the copy mark T's tracks). The restart restores the relationship
/// (same T0 and mode, as many tracks copied as the file records; a
/// background copy goes on) and the pair comes back `primary restarted`,
/// resynchronises by itself, sending at most its marked tracks, and ends
/// duplex and current. Every block of S holds S's T0 data or its last
/// acknowledged write, and every block of T and T' S's T0 data or T's
/// last acknowledged write (none of T's data from before T0); a block
/// whose write was in flight that write or what it held before, the same
/// on T and T'; and T equals T'. No host write fails but as its
/// connection goes.
#[test]
fn random_kill_9_of_a_flashcopy_target_as_primary_loses_nothing() {
    let seed = fault_seed(0x5EED_000A);
    let started = Instant::now();
    let mut s = Sites::start("pprc-fc-primary-kill", |_| {});
    let (src, pa, pb) = (s.a.vol(0x10, 0), s.a.vol(0x10, 1), s.b.vol(0x10, 0));
    let mut schedule = Schedule::new(seed);
    let t0 = fill(&s.a, &src, s.dir_a.path(), 56, 91);
    fill(&s.a, &pa, s.dir_a.path(), 64, 92);
    let mode = match schedule.next() % 4 {
        r @ 0..=2 => ["0.5", "0.75", "1"][r as usize],
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
    let at_t0 = flashcopy_view(&s.a, &pa);
    let state = if mode == "nocopy" {
        "nocopy"
    } else {
        "copying"
    };
    assert_eq!(
        (at_t0["track_size"].as_u64(), at_t0["tracks_total"].as_u64()),
        (Some(TRACK), Some(1024)),
        "{at_t0}"
    );
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &pa, &pb]).ok();
    wait_state(&s.a, &pa, "duplex");
    // The initial copy's marks are cleaned before the first kill, so the
    // bitmap file then holds T's host writes only.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !durable_marks(&s.a, &pa).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the initial copy's marks were never cleaned: {:?}",
            durable_marks(&s.a, &pa)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let per_track = TRACK / 4096;
    let mut regions = BTreeSet::new();
    while regions.len() < 4 {
        regions.insert(schedule.next() % 16);
    }
    let mut t_tracks = BTreeSet::new();
    for r in &regions {
        let before = t_tracks.len();
        while t_tracks.len() < before + 8 {
            t_tracks.insert(r * 64 + schedule.next() % 64);
        }
    }
    let mut s_tracks: BTreeSet<u64> = t_tracks.iter().copied().step_by(2).collect();
    while s_tracks.len() < 32 {
        s_tracks.insert(schedule.next() % 1024);
    }
    let mut blocks_of = |tracks: &BTreeSet<u64>| {
        let mut blocks = BTreeSet::new();
        for t in tracks {
            let before = blocks.len();
            while blocks.len() < before + 4 {
                blocks.insert(t * per_track + schedule.next() % per_track);
            }
        }
        blocks.into_iter().collect::<Vec<u64>>()
    };
    let (s_blocks, t_blocks) = (blocks_of(&s_tracks), blocks_of(&t_tracks));

    let (mut on_s, mut on_t) = (Versions::new(), Versions::new());
    let (mut base_s, mut base_t) = (0, 0);
    // (ms written, ms stalled, writes acknowledged on S and T, in flight on
    // S and T, tracks the FlashCopy bitmap file records, tracks marked at
    // the restart, bytes the resync sent)
    let mut kills = Vec::new();
    let rounds = 2 + schedule.next() % 3;
    for round in 0..rounds {
        let writer_s = overwriter_until_broken(&s.a, &src, seed + 2 * round, base_s, &s_blocks, "");
        let writer_t =
            overwriter_until_broken(&s.a, &pa, seed + 2 * round + 1, base_t, &t_blocks, "t");
        let run = schedule.millis(3000, 6000);
        let stall = (schedule.next() % 3 == 0).then(|| schedule.millis(50, 1000));
        std::thread::sleep(run);
        if let Some(lag) = stall {
            s.proxy.stall();
            std::thread::sleep(lag);
        }
        s.a.crash();
        let (out_s, out_t) = (writer_s.join().unwrap(), writer_t.join().unwrap());
        let context = format!(
            "seed {seed}, FlashCopy {mode_text}, round {round}, kills so far (ms written, ms \
             stalled, acked S/T, in flight S/T, copies recorded, marked, resent) {kills:?}, \
             hosts {}",
            serde_json::json!([
                {"writes": out_s["writes"], "errors": out_s["errors"], "broken": out_s["broken"]},
                {"writes": out_t["writes"], "errors": out_t["errors"], "broken": out_t["broken"]},
            ])
        );
        let acked = (
            out_s["acked"].as_object().map_or(0, |a| a.len()),
            out_t["acked"].as_object().map_or(0, |a| a.len()),
        );
        assert!(
            out_s["broken"].is_string() && out_t["broken"].is_string(),
            "{context}: a host's connection did not break"
        );
        assert!(
            acked.0 > 50 && acked.1 > 50,
            "{context}: only {acked:?} blocks acknowledged"
        );
        // A write fails only as its connection goes (ENOTCONN): the server
        // answered none with an error.
        for out in [&out_s, &out_t] {
            let errors = out["errors"].as_object().unwrap();
            assert!(
                errors.keys().all(|e| e == "ENOTCONN"),
                "{context}: a host saw errors {errors:?}"
            );
        }
        base_s += out_s["writes"].as_u64().unwrap();
        base_t += out_t["writes"].as_u64().unwrap();
        let flight_s = acked_and_in_flight(&out_s, &mut on_s);
        let flight_t = acked_and_in_flight(&out_t, &mut on_t);
        assert!(
            !flight_s.is_empty() && !flight_t.is_empty(),
            "{context}: no write in flight on S ({flight_s:?}) or T ({flight_t:?})"
        );

        // What the crash left: the copy of every track with an
        // acknowledged write is recorded, and the pair's marks cover T's
        // writes in flight and stay inside T's regions.
        let copies = flashcopy_durable_copies(&s.a);
        let unrecorded: Vec<u64> = on_s
            .keys()
            .chain(on_t.keys())
            .map(|b| b / per_track)
            .filter(|t| !copies.contains(t))
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        assert!(
            unrecorded.is_empty(),
            "{context}: tracks with acknowledged writes whose copy the FlashCopy bitmap \
             file does not record: {unrecorded:?}"
        );
        let beyond: Vec<&u64> = copies
            .iter()
            .filter(|t| !s_tracks.contains(t) && !t_tracks.contains(t))
            .collect();
        assert!(
            mode != "nocopy" || beyond.is_empty(),
            "{context}: NOCOPY recorded copies of tracks no host wrote: {beyond:?}"
        );
        let marks = durable_marks(&s.a, &pa);
        let in_flight: BTreeSet<u64> = flight_t.keys().map(|b| b / per_track).collect();
        let unmarked: Vec<&u64> = in_flight.difference(&marks).collect();
        assert!(
            unmarked.is_empty(),
            "{context}: tracks of T written in flight are not marked in the pair's bitmap \
             file: {unmarked:?}"
        );
        let outside: Vec<&u64> = marks
            .iter()
            .filter(|t| !regions.contains(&(*t / 64)))
            .collect();
        assert!(
            outside.is_empty(),
            "{context}: tracks marked outside T's regions {regions:?}: {outside:?}"
        );

        s.proxy.reset_counters();
        let (at_restart, resent) = restart_and_resync(&mut s, &pa, Some("primary restarted"));
        let carried = s.proxy.bytes_forward();
        let marked = at_restart["out_of_sync_tracks"].as_u64().unwrap();
        let restored = flashcopy_view(&s.a, &pa);
        kills.push((
            run.as_millis(),
            stall.map_or(0, |d| d.as_millis()),
            acked,
            (flight_s.len(), flight_t.len()),
            copies.len(),
            marked,
            resent,
        ));
        let context = format!("{context}, this kill {:?}", kills.last().unwrap());
        wait_sides_agree(&s.a, &pa, &s.b, &pb, &context);

        // The relationship is back as it was: same T0, mode and volumes,
        // the tracks its file records copied, still copying (or NOCOPY).
        let line =
            s.a.log()
                .lines()
                .rev()
                .find(|l| l.contains(&format!("{src} → {pa} restored")))
                .map(str::to_string);
        assert_eq!(
            line.as_deref()
                .and_then(|l| l.split(" restored (").nth(1))
                .and_then(|l| l.split(" tracks copied)").next()),
            Some(format!("{} of 1024", copies.len()).as_str()),
            "{context}: the restart did not restore the recorded copies: {line:?}"
        );
        for field in ["source", "target", "mode", "t0_unix", "tracks_total"] {
            assert_eq!(
                restored[field], at_t0[field],
                "{context}: {field} after the restart: {restored}"
            );
        }
        assert_eq!(
            restored["state"], state,
            "{context}: after the restart: {restored}"
        );
        let copied = restored["tracks_copied"].as_u64().unwrap();
        assert!(
            copied >= copies.len() as u64 && copied < 1024,
            "{context}: {copied} tracks copied after the restart: {restored}"
        );

        // The restart's resync sent at most the marked tracks, all inside
        // T's regions.
        assert!(
            marked >= in_flight.len() as u64 && marked <= 64 * regions.len() as u64,
            "{context}: {marked} tracks marked at the restart for {} in flight in {} \
             regions: {at_restart}",
            in_flight.len(),
            regions.len()
        );
        let bound = marked * TRACK + (256 << 10);
        assert!(
            resent <= bound && carried <= bound,
            "{context}: the resync of {marked} tracks sent {resent} bytes ({carried} on the \
             link), bound {bound}"
        );

        // No acknowledged write lost; a write in flight landed or not, the
        // same on T and T'.
        let old_s = blocks_after_a_kill(&s.a, &src, &t0, &on_s, &flight_s, &context);
        let old_t = blocks_after_a_kill(&s.a, &pa, &t0, &on_t, &flight_t, &context);
        let old_t2 = blocks_after_a_kill(&s.b, &pb, &t0, &on_t, &flight_t, &context);
        assert_eq!(
            old_t, old_t2,
            "{context}: T and T' kept different writes in flight"
        );
        settle(&mut on_s, flight_s, &old_s);
        settle(&mut on_t, flight_t, &old_t);
        assert_eq!(
            volume_sha(&s.a, &pa),
            volume_sha(&s.b, &pb),
            "{context}: T and T' differ"
        );
        if mode != "nocopy" {
            let now = flashcopy_view(&s.a, &pa);
            assert!(
                now["state"] == "copying" && now["tracks_copied"].as_u64().unwrap() > copied,
                "{context}: the background copy did not go on after the restart ({copied} \
                 tracks copied then): {now}"
            );
        }
    }
    wait_current(&s.a, &pa);
    let pair = show(&s.a, &pa);
    let context = format!(
        "seed {seed}, FlashCopy {mode_text}, kills (ms written, ms stalled, acked S/T, in \
         flight S/T, copies recorded, marked, resent) {kills:?}"
    );
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
    assert_eq!(
        flashcopy_view(&s.a, &pa)["state"],
        state,
        "{context}: the relationship at the end"
    );
    eprintln!(
        "{context}: {} blocks of S and {} of T written, {:.1} s",
        on_s.len(),
        on_t.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Reads every 4 KiB block of an export and prints those that hold none
/// of the versions the JSON input `{"image": FILE, "lo": {block: version},
/// "hi": {block: version}}` allows: a version [`OVERWRITE_AT_RANDOM`]
/// wrote there from `lo` up to `hi`, version 0 (a block not in `lo`) being
/// the block of `image` (zeros past its end); a block not in `hi` holds
/// its block of `image`.
const BLOCKS_NOT_IN_VERSIONS: &str = r#"
import hashlib, json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
want = json.loads(sys.stdin.read())
lo, hi = want["lo"], want["hi"]
with open(want["image"], "rb") as f:
    image = f.read()
def data(b, v):
    if v == 0:
        return image[b * 4096:(b + 1) * 4096].ljust(4096, b"\0")
    return hashlib.sha256(f"{b}:{v}".encode()).digest() * 128
wrong, size, step = [], h.get_size(), 1 << 20
for off in range(0, size, step):
    chunk = h.pread(min(step, size - off), off)
    for i in range(0, len(chunk), 4096):
        b = (off + i) // 4096
        allowed = range(lo.get(str(b), 0), hi.get(str(b), 0) + 1)
        if bytes(chunk[i:i + 4096]) not in {data(b, v) for v in allowed}:
            wrong.append(b)
print(json.dumps(wrong))
"#;

/// The blocks acknowledged so far by a running [`OVERWRITE_AT_RANDOM`]
/// started with the directory `asks`, and the highest version it sent to
/// each block (acknowledged or in flight) just before.
fn acked_and_issued_so_far(asks: &Path) -> (serde_json::Value, serde_json::Value) {
    let _ = std::fs::remove_file(asks.join("issued.json"));
    let acked = acked_so_far(asks);
    let issued = std::fs::read(asks.join("issued.json")).unwrap();
    (acked, serde_json::from_slice(&issued).unwrap())
}

/// Waits (up to 60 s) until the background copy onto `target` at `essd`
/// is done and its relationship gone.
fn copy_done(essd: &Essd, target: &str, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(left) = flashcopy_remaining(essd, target) {
        assert!(
            Instant::now() < deadline,
            "{context}: the background copy onto {target} never ended ({left} tracks left)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A FlashCopy of the secondary taken in
/// [`random_flashcopies_of_a_secondary_under_link_faults_and_kill_9_keep_their_point_in_time`].
struct SecondaryCopy {
    target: String,
    nocopy: bool,
    /// Checksum of the target once checked after its establish.
    sha: String,
    /// Withdrawn (NOCOPY, to free the source): the target is incomplete.
    withdrawn: bool,
}

/// FlashCopies of a PPRC secondary at random moments, as the split-mirror
/// backup procedures take them at the recovery site: A → B duplex (8 MiB
/// of data), a host overwrites random blocks of the primary, and at 3 to 5
/// seeded moments (`ESSD_FAULT_SEED`), with the pair duplex, or suspended
/// by the links stalled past the 2 s timeout or dropped, or after a reset
/// of every link (duplex or suspended), the pair is suspended by hand or
/// not, and the secondary S is copied onto a fresh target Ti at B (NOCOPY,
/// or a background copy at 2 to 4 MiB/s, during which B is sometimes
/// killed with `kill -9` and restarted); then the links are healed and the
/// pair resumed. Each Ti holds S's image at its T0: a block holds a
/// version the host wrote no earlier than its last write acknowledged
/// while the pair was known duplex before the establish, and no later than
/// the last write sent before the establish answered (duplex) or before
/// the suspend was seen (suspended; then Ti also equals S, which the
/// suspended pair leaves alone). Ti does not change afterwards, though S
/// keeps receiving mirrored writes, resync copies and the copies' crash:
/// read again before a NOCOPY relationship is withdrawn for the next
/// establish (one relationship per volume), and at the end, once the pair
/// is duplex and current and the background copies are done. The host saw
/// no error, the secondary holds the last acknowledged write of every
/// block, and the volumes are equal.
#[test]
fn random_flashcopies_of_a_secondary_under_link_faults_and_kill_9_keep_their_point_in_time() {
    let seed = fault_seed(0x5EED_000B);
    let started = Instant::now();
    let mut s = Sites::start("pprc-fc-secondary-faults", |cfg| {
        cfg.volumes = vec![Vol::new(0x10, 0, "8MiB")];
        cfg.volumes
            .extend((0..5).map(|n| Vol::new(0x11, n, "8MiB")));
    });
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let mut schedule = Schedule::new(seed);
    let image = fill(&s.a, &va, s.dir_a.path(), 8, 101);
    let image_file = image.display().to_string();
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    essctl(&s.a, &["pprc", "establish", &va, &vb]).ok();
    wait_duplex(&s.a, &va);
    let asks = tempfile::tempdir().unwrap();
    let blocks: Vec<u64> = (0..(8 << 20) / 4096).collect();
    let writer = overwriter(&s.a, &va, seed, asks.path(), 0, &blocks);

    let state = |s: &Sites| show(&s.a, &va)["state"].as_str().unwrap().to_string();
    let mut copies: Vec<SecondaryCopy> = Vec::new();
    const MOMENTS: &str = "moments (fault, by hand, state, mode, killed with tracks left)";
    // (fault, suspended by hand, state at the establish, mode, tracks left
    // to copy when B was killed)
    let mut moments = Vec::new();
    let rounds = 3 + schedule.next() % 3;
    for round in 0..rounds {
        std::thread::sleep(schedule.millis(800, 2500));
        let context = format!("seed {seed}, {MOMENTS} {moments:?}");
        // One relationship per volume: a background copy ends by itself;
        // a NOCOPY target is read again, then withdrawn.
        if let Some(last) = copies.last_mut() {
            if last.nocopy {
                assert_eq!(
                    volume_sha(&s.b, &last.target),
                    last.sha,
                    "{context}: NOCOPY target {} changed since its establish",
                    last.target
                );
                essctl(
                    &s.b,
                    &["flashcopy", "withdraw", &format!("{vb}:{}", last.target)],
                )
                .ok();
                last.withdrawn = true;
            } else {
                copy_done(&s.b, &last.target, &context);
            }
        }
        let target = s.b.vol(0x11, round as u8);
        let fault = schedule.next() % 4;
        let by_hand = schedule.next() % 2 == 0;
        let mode = match schedule.next() % 4 {
            r @ 0..=2 => ["2", "3", "4"][r as usize],
            _ => "nocopy",
        };
        let kill = mode != "nocopy" && schedule.next() % 2 == 0;

        // Every write acknowledged now is on S: the pair is duplex.
        let (known, _) = acked_and_issued_so_far(asks.path());
        assert_eq!(state(&s), "duplex", "{context}");
        match fault {
            1 => s.proxy.stall(),
            2 => s.proxy.drop_all(),
            3 => s.proxy.reset(),
            _ => {}
        }
        match fault {
            1 | 2 => {
                wait_state(&s.a, &va, "suspended");
            }
            3 => std::thread::sleep(schedule.millis(100, 1000)),
            _ => {}
        }
        if by_hand && state(&s) == "duplex" {
            essctl(&s.a, &["pprc", "suspend", &va]).ok();
        }
        let before = state(&s);
        let (acked, issued) = acked_and_issued_so_far(asks.path());
        let duplex_then = before == "duplex" && state(&s) == "duplex";
        let s_before = (before == "suspended").then(|| volume_sha(&s.b, &vb));
        let mut establish = vec!["flashcopy", "establish"];
        let rel = format!("{vb}:{target}");
        establish.push(&rel);
        if mode == "nocopy" {
            establish.push("--nocopy");
        } else {
            establish.extend(["--rate", mode]);
        }
        essctl(&s.b, &establish).ok();
        let (_, issued_after) = acked_and_issued_so_far(asks.path());
        let after = state(&s);
        let fault_name = ["none", "stall", "drop", "reset"][fault as usize];
        moments.push((fault_name, by_hand, before.clone(), mode, None::<u64>));
        let context = format!("seed {seed}, {MOMENTS} {moments:?}");
        // Writes acknowledged while the pair was known duplex are on S at
        // T0; writes sent after the suspend was seen, or after T0, are not.
        let lo = if duplex_then && after == "duplex" {
            acked
        } else {
            known
        };
        let hi = if before == "suspended" {
            issued
        } else {
            issued_after
        };
        let wrong = check_blocks(
            BLOCKS_NOT_IN_VERSIONS,
            &s.b,
            &target,
            &serde_json::json!({"image": image_file, "lo": lo, "hi": hi}),
        );
        assert!(
            wrong.is_empty(),
            "{context}: {} blocks of {target} hold no version S held at T0, among them {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(32)]
        );
        let sha = volume_sha(&s.b, &target);
        if let Some(s_before) = s_before {
            assert_eq!(
                volume_sha(&s.b, &vb),
                s_before,
                "{context}: the suspended secondary changed"
            );
            assert_eq!(
                sha, s_before,
                "{context}: {target} differs from the suspended secondary"
            );
        }
        copies.push(SecondaryCopy {
            target: target.clone(),
            nocopy: mode == "nocopy",
            sha,
            withdrawn: false,
        });
        s.proxy.heal();
        if kill {
            std::thread::sleep(schedule.millis(100, 800));
            let left = flashcopy_remaining(&s.b, &target);
            moments.last_mut().unwrap().4 = Some(left.unwrap_or(0));
            s.b.crash();
            std::thread::sleep(schedule.millis(100, 1500));
            s.b.restart("TSTB2");
        }
        resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
    }
    let mut model = BTreeMap::new();
    let (writes, errors) = stop_overwriter(writer, asks.path(), &mut model);
    resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
    let context = format!("seed {seed}, {MOMENTS} {moments:?}");
    assert_eq!(
        errors,
        serde_json::json!({}),
        "{context}: the host saw errors"
    );
    if let Some(last) = copies.last().filter(|c| !c.nocopy) {
        copy_done(&s.b, &last.target, &context);
    }
    wait_current(&s.a, &va);
    let pair = show(&s.a, &va);
    assert_eq!(
        (pair["state"].as_str(), pair["replication_status"].as_str()),
        (Some("duplex"), Some("current")),
        "{context}: {pair}"
    );
    for copy in copies.iter().filter(|c| !c.withdrawn) {
        assert_eq!(
            volume_sha(&s.b, &copy.target),
            copy.sha,
            "{context}: {} ({}) changed since its establish",
            copy.target,
            if copy.nocopy {
                "NOCOPY"
            } else {
                "background copy"
            }
        );
    }
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "{context}: the volumes differ"
    );
    let wrong = check_blocks(
        BLOCKS_NOT_AS_IMAGE_AND_ACKED,
        &s.b,
        &vb,
        &serde_json::json!({"image": image_file, "acked": model}),
    );
    assert!(
        wrong.is_empty(),
        "{context}: {} blocks of the secondary are not their last acknowledged write, among \
         them {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(32)]
    );
    eprintln!(
        "{context}: {writes} writes, {} blocks written, {:.1} s",
        model.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Reads the blocks of the JSON input `{"acked": {block: version}, "asks":
/// DIR}` from an export, then asks the [`OVERWRITE_AT_RANDOM`] writing
/// the primary (answering through `DIR`) the highest version it has sent
/// to each block so far, and prints the blocks that hold no version from
/// the acknowledged one up to that: a write acknowledged before the read
/// that the export lacks (a later one may be there already).
const BLOCKS_BEHIND_ACKED: &str = r#"
import hashlib, json, nbd, os, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
want = json.loads(sys.stdin.read())
acked, asks = want["acked"], want["asks"]
def data(b, v):
    return hashlib.sha256(f"{b}:{v}".encode()).digest() * 128
held = {b: bytes(h.pread(4096, int(b) * 4096)) for b in acked}
answer = os.path.join(asks, "issued.json")
if os.path.exists(answer):
    os.remove(answer)
open(os.path.join(asks, "ask"), "w").close()
deadline = time.time() + 20
while not os.path.exists(answer):
    assert time.time() < deadline, "the writer did not answer"
    time.sleep(0.02)
with open(answer) as f:
    issued = json.load(f)
print(json.dumps([int(b) for b, v in acked.items()
                  if held[b] not in {data(b, w) for w in range(v, issued.get(b, v) + 1)}]))
"#;

/// [`FanOut`] brought back after a fault, and checked at a settle point.
impl FanOut {
    /// Resumes every pair until it is duplex and both sides show it
    /// ([`resume_until_duplex`]).
    fn resume_all(&self, seed: u64) {
        for leg in &self.legs {
            resume_until_duplex(&self.a, &leg.va, &self.peers[leg.peer], &leg.vb, seed);
        }
    }

    /// At a settle point (every pair duplex, the faults healed): each
    /// pair's replication status is exact on both sides — duplex, its
    /// peer and volumes, nothing out of sync, current — and every path's
    /// links come back up.
    fn assert_status_exact(&self, context: &str) {
        for leg in &self.legs {
            let p = show(&self.a, &leg.va);
            let s = show(&self.peers[leg.peer], &leg.vb);
            let want = |v: &serde_json::Value, role: &str, peer: &str, peer_volume: &str| {
                v["role"] == role
                    && v["state"] == "duplex"
                    && v["reason"].is_null()
                    && v["peer"] == peer
                    && v["peer_volume"] == peer_volume
                    && v["out_of_sync_tracks"] == 0
                    && v["replication_status"] == "current"
            };
            assert!(
                want(&p, "primary", FAN_OUT_PEERS[leg.peer], &leg.vb)
                    && want(&s, "secondary", "TSTA1", &leg.va),
                "{context}: the replication status of {} → {} is not exact:\n primary   {p}\n secondary {s}",
                leg.va,
                leg.vb
            );
        }
        // A link the fault broke reopens within two of its monitor's
        // attempts.
        let deadline = Instant::now() + (HEARTBEAT + LINK_TIMEOUT) * 2;
        for leg in &self.legs {
            loop {
                let p = show(&self.a, &leg.va);
                if p["path"]["state"] == "up" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{context}: the path of {} does not come back up: {p}",
                    leg.va
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The range of versions each block of a volume may hold, across the
/// runs of its [`OVERWRITE_AT_RANDOM`] (a `kill -9` of the primary ends
/// a run, and leaves writes in flight that may or may not be there).
#[derive(Default)]
struct VersionRange {
    /// The last acknowledged version (absent: zeroes allowed).
    lo: BTreeMap<u64, u64>,
    /// The last version sent (absent: never written).
    hi: BTreeMap<u64, u64>,
    /// Where the next run's versions count from.
    base: u64,
}

impl VersionRange {
    /// Takes in the output of a finished run.
    fn ended(&mut self, out: &serde_json::Value) {
        for (b, v) in out["acked"].as_object().unwrap() {
            let (b, v) = (b.parse().unwrap(), v.as_u64().unwrap());
            self.lo.insert(b, v);
            self.hi.insert(b, v);
        }
        if let Some(unsure) = out["unsure"].as_object() {
            for (b, u) in unsure {
                let b: u64 = b.parse().unwrap();
                if let Some(before) = u[0].as_u64() {
                    self.lo.insert(b, before);
                }
                self.hi.insert(b, u[1].as_u64().unwrap());
            }
        }
        self.base += out["writes"].as_u64().unwrap();
    }
}

/// Writes between two of the fan-out test's overwriter's writes, in
/// seconds: four volumes written at once, about 80 writes a second each.
const FAN_OUT_PAUSE: &str = "0.012";

/// The sum of the acknowledged versions of `acked`: it grows with every
/// write acknowledged.
fn acked_progress(acked: &serde_json::Value) -> u64 {
    acked
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

/// One primary server mirroring to three secondary servers at once
/// ([`FanOut`]), a host overwriting every primary volume at random, and a
/// seeded schedule (`ESSD_FAULT_SEED`) of faults on one peer at a time:
/// its links stalled past the 2 s timeout (all, or the oldest), reset
/// (either direction), dropped for a while or delayed, its server killed
/// (`kill -9`) and restarted, or one of its pairs suspended by hand; and
/// now and then `kill -9` of the primary's server itself, after which
/// every pair comes back `primary restarted` and resyncs by itself. While
/// one peer is faulted the other pairs stay duplex, their hosts' writes
/// go on being acknowledged, and their secondaries hold every write
/// acknowledged so far. After each fault every pair is resumed until
/// duplex, and its replication status is exact on both sides. At the end
/// the host saw no error, each secondary equals its primary, and every
/// block holds its last acknowledged write.
#[test]
fn random_faults_on_one_of_three_peers_leave_the_others_mirroring() {
    let seed = fault_seed(0x5EED_000C);
    let started = Instant::now();
    let mut s = FanOut::start("pprc-fan-out");
    let mut schedule = Schedule::new(seed);
    let blocks: Vec<u64> = (0..FAN_OUT_VOLUME / 4096).collect();
    let asks: Vec<tempfile::TempDir> = s
        .legs
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let mut versions: Vec<VersionRange> = s.legs.iter().map(|_| VersionRange::default()).collect();
    let start_writers = |s: &FanOut, versions: &[VersionRange], run: u64| -> Vec<_> {
        s.legs
            .iter()
            .zip(&asks)
            .zip(versions)
            .enumerate()
            .map(|(i, ((leg, asks), v))| {
                let seed = seed + 16 * run + i as u64;
                overwriter_every(
                    &s.a,
                    &leg.va,
                    seed,
                    asks.path(),
                    v.base,
                    &blocks,
                    FAN_OUT_PAUSE,
                )
            })
            .collect()
    };
    let mut writers = start_writers(&s, &versions, 0);
    const KINDS: [&str; 8] = [
        "stall",
        "reset",
        "reset back",
        "drop",
        "delay",
        "stall oldest",
        "kill peer",
        "suspend",
    ];
    // (fault, peer, ms held); a kill of A is ("kill A", 3, 0).
    let mut faults: Vec<(&str, usize, u128)> = Vec::new();
    let mut runs = 1;
    while started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(schedule.millis(300, 1000));
        let kind = if faults.is_empty() {
            0
        } else {
            schedule.next() % 10
        };
        let context = format!("seed {seed}, faults (kind, peer, ms) {faults:?}");
        if kind >= 8 {
            // kill -9 of the primary's server; its links held down until
            // every pair's view is read at the restart.
            s.a.crash();
            for (i, writer) in std::mem::take(&mut writers).into_iter().enumerate() {
                let out = writer.join().unwrap();
                assert!(
                    out["broken"].is_string(),
                    "{context}: the host's connection to {} did not break: {out}",
                    s.legs[i].va
                );
                versions[i].ended(&out);
            }
            for proxy in &s.proxies {
                proxy.drop_all();
            }
            s.a.restart("TSTA1");
            for leg in &s.legs {
                let v = show(&s.a, &leg.va);
                assert!(
                    v["state"] == "suspended" && v["reason"] == "primary restarted",
                    "{context}: {} after the restart: {v}",
                    leg.va
                );
            }
            s.heal();
            for leg in &s.legs {
                let v = wait_state(&s.a, &leg.va, "duplex");
                assert_eq!(v["reason"], serde_json::Value::Null, "{context}: {v}");
            }
            faults.push(("kill A", 3, 0));
            writers = start_writers(&s, &versions, runs);
            runs += 1;
        } else {
            let kind = kind as usize;
            let peer = (schedule.next() % 3) as usize;
            let hold = match kind {
                0 | 5 => schedule.millis(2500, 3500),
                _ => schedule.millis(200, 2500),
            };
            let affected: Vec<usize> = match kind {
                7 => {
                    let mine: Vec<usize> = (0..s.legs.len())
                        .filter(|&l| s.legs[l].peer == peer)
                        .collect();
                    vec![mine[(schedule.next() % mine.len() as u64) as usize]]
                }
                _ => (0..s.legs.len())
                    .filter(|&l| s.legs[l].peer == peer)
                    .collect(),
            };
            let others: Vec<usize> = (0..s.legs.len())
                .filter(|l| !affected.contains(l))
                .collect();
            let before: Vec<u64> = others
                .iter()
                .map(|&l| acked_progress(&acked_so_far(asks[l].path())))
                .collect();
            match kind {
                0 => s.proxies[peer].stall(),
                1 => s.proxies[peer].reset(),
                2 => s.backs[peer].reset(),
                3 => s.proxies[peer].drop_all(),
                4 => s.proxies[peer].delay(schedule.millis(20, 120)),
                5 => s.proxies[peer].stall_oldest(),
                6 => s.peers[peer].crash(),
                _ => {
                    essctl(&s.a, &["pprc", "suspend", &s.legs[affected[0]].va]).ok();
                }
            }
            faults.push((KINDS[kind], peer, hold.as_millis()));
            let context = format!("seed {seed}, faults (kind, peer, ms) {faults:?}");
            std::thread::sleep(hold);
            // The fault is on: the other pairs mirror on.
            for (&l, before) in others.iter().zip(&before) {
                let leg = &s.legs[l];
                let p = show(&s.a, &leg.va);
                assert_eq!(
                    p["state"], "duplex",
                    "{context}: {} left duplex while the fault was on {}: {p}",
                    leg.va, FAN_OUT_PEERS[peer]
                );
                let acked = acked_so_far(asks[l].path());
                assert!(
                    acked_progress(&acked) > *before,
                    "{context}: no write to {} was acknowledged while the fault was on {}",
                    leg.va,
                    FAN_OUT_PEERS[peer]
                );
                let behind = check_blocks(
                    BLOCKS_BEHIND_ACKED,
                    &s.peers[leg.peer],
                    &leg.vb,
                    &serde_json::json!({"acked": acked, "asks": asks[l].path()}),
                );
                assert!(
                    behind.is_empty(),
                    "{context}: {} acknowledged writes to {} are not on {} while the fault was on {}: {behind:?}",
                    behind.len(),
                    leg.va,
                    leg.vb,
                    FAN_OUT_PEERS[peer]
                );
            }
            if kind == 6 {
                s.peers[peer].restart(FAN_OUT_PEERS[peer]);
            }
            s.heal();
        }
        let context = format!("seed {seed}, faults (kind, peer, ms) {faults:?}");
        s.resume_all(seed);
        s.assert_status_exact(&context);
    }
    for (i, writer) in std::mem::take(&mut writers).into_iter().enumerate() {
        std::fs::write(asks[i].path().join("stop"), b"").unwrap();
        let out = writer.join().unwrap();
        assert_eq!(
            out["errors"],
            serde_json::json!({}),
            "seed {seed}: the host of {} saw errors",
            s.legs[i].va
        );
        versions[i].ended(&out);
    }
    let context = format!("seed {seed}, faults (kind, peer, ms) {faults:?}");
    s.resume_all(seed);
    for leg in &s.legs {
        wait_current(&s.a, &leg.va);
    }
    s.assert_status_exact(&context);
    for (leg, v) in s.legs.iter().zip(&versions) {
        let b = &s.peers[leg.peer];
        assert_eq!(
            volume_sha(&s.a, &leg.va),
            volume_sha(b, &leg.vb),
            "{context}: {} and {} differ",
            leg.va,
            leg.vb
        );
        let wrong = check_blocks(
            BLOCKS_NOT_IN_VERSIONS,
            b,
            &leg.vb,
            &serde_json::json!({"image": "/dev/null", "lo": v.lo, "hi": v.hi}),
        );
        assert!(
            wrong.is_empty(),
            "{context}: {} blocks of {} are not their last acknowledged write, among them {:?}",
            wrong.len(),
            leg.vb,
            &wrong[..wrong.len().min(32)]
        );
    }
    eprintln!(
        "{context}: {} blocks written, {:.1} s",
        versions.iter().map(|v| v.hi.len()).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
}

/// A chain of dependent writes across two volumes, one at a time, from
/// step `argv[4]`: write `i` goes to block `i` of the first volume and,
/// once acknowledged, to block `i` of the second (each block holds its
/// number, repeated, as in [`DEPENDENT_CHAIN`]), until the file `argv[3]`
/// exists; about 300 steps a second. Prints `1 i` or `2 i` as soon as the
/// write of step `i` to the first or second volume is acknowledged, then
/// (on a line of its own) a JSON object: the next step and, if a write or
/// the final flush failed (the server killed), why.
const CHAIN_REPORTING: &str = r#"
import json, nbd, os, struct, sys, time
first, second = nbd.NBD(), nbd.NBD()
first.connect_uri(sys.argv[1])
second.connect_uri(sys.argv[2])
blocks = min(first.get_size(), second.get_size()) // 4096
i, broken = int(sys.argv[4]), None
try:
    while not os.path.exists(sys.argv[3]) and i < blocks:
        first.pwrite(struct.pack("<Q", i) * 512, i * 4096)
        print("1", i, flush=True)
        second.pwrite(struct.pack("<Q", i) * 512, i * 4096)
        print("2", i, flush=True)
        i += 1
        time.sleep(0.003)
    first.flush()
    second.flush()
except nbd.Error as e:
    broken = e.string
print(json.dumps({"next": i, "broken": broken}), flush=True)
"#;

/// A host running [`CHAIN_REPORTING`] on two volumes of one server: the
/// last step acknowledged on each is known while it runs.
struct ChainWriter {
    child: std::process::Child,
    acked: std::sync::Arc<std::sync::Mutex<[u64; 2]>>,
    /// The reader of its output; ends with its last line (the JSON
    /// object).
    reader: std::thread::JoinHandle<String>,
    stop: tempfile::TempDir,
}

impl ChainWriter {
    /// Starts the chain at `essd` on `volumes` from step `from`.
    fn start(essd: &Essd, volumes: &[String; 2], from: u64) -> ChainWriter {
        use std::io::BufRead;
        let stop = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(CHAIN_REPORTING)
            .args([essd.uri(&volumes[0]), essd.uri(&volumes[1])])
            .arg(stop.path().join("stop"))
            .arg(from.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let acked = std::sync::Arc::new(std::sync::Mutex::new([from - 1; 2]));
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let seen = acked.clone();
        let reader = std::thread::spawn(move || {
            let mut last = String::new();
            for line in out.lines() {
                let line = line.unwrap();
                if let Some((volume, step)) = line.split_once(' ') {
                    if let (Ok(v), Ok(step)) = (volume.parse::<usize>(), step.parse()) {
                        seen.lock().unwrap()[v - 1] = step;
                        continue;
                    }
                }
                last = line;
            }
            last
        });
        ChainWriter {
            child,
            acked,
            reader,
            stop,
        }
    }

    /// Ends the chain at once, as hosts lost with their site: its write
    /// in flight (held by the group, perhaps) is left to the server.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.reader.join();
    }

    /// The last step acknowledged on each volume so far.
    fn acked(&self) -> [u64; 2] {
        *self.acked.lock().unwrap()
    }

    /// Stops the chain (or, once its server was killed, waits for it to
    /// end); returns the last step acknowledged on each volume and its
    /// final JSON object.
    fn stop(self) -> ([u64; 2], serde_json::Value) {
        let ChainWriter {
            mut child,
            acked,
            reader,
            stop,
        } = self;
        std::fs::write(stop.path().join("stop"), b"").unwrap();
        let status = child.wait().unwrap();
        let last = reader.join().unwrap();
        assert!(status.success(), "the chain writer failed: {last}");
        let acked = *acked.lock().unwrap();
        (acked, serde_json::from_str(&last).unwrap())
    }
}

/// The cut of the [`CHAIN_REPORTING`] chain that `volumes` at `essd`
/// hold, asserted dependent-write consistent: steps 1..=k on the first,
/// 1..=j on the second, nothing beyond, k = j or j + 1 — and no fewer than
/// the steps `acked` acknowledged. Returns (k, j).
fn consistent_cut(essd: &Essd, volumes: &[String; 2], acked: [u64; 2], context: &str) -> [u64; 2] {
    let text = python(
        CHAIN_HELD,
        &[&essd.uri(&volumes[0]), &essd.uri(&volumes[1])],
    );
    let held: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cut = [0, 1].map(|i| held[i]["prefix"].as_u64().unwrap());
    let what = format!(
        "{context}: {} holds {held}, {acked:?} acknowledged",
        essd.serial
    );
    for h in held.as_array().unwrap() {
        assert_eq!(
            h["beyond"],
            serde_json::json!([]),
            "{what}: a gap in the chain"
        );
    }
    assert!(
        cut[0] == cut[1] || cut[0] == cut[1] + 1,
        "{what}: a later write without its earlier one"
    );
    assert!(
        cut[0] >= acked[0] && cut[1] >= acked[1],
        "{what}: acknowledged writes lost"
    );
    cut
}

/// Asserts that every pair of `volumes` at `essd` is `state` with
/// `reason` (`""`: none) and has the role `role`.
fn assert_pairs(
    essd: &Essd,
    volumes: &[String; 2],
    role: &str,
    state: &str,
    reason: &str,
    context: &str,
) {
    for v in volumes {
        let p = show(essd, v);
        assert_eq!(
            (
                p["role"].as_str(),
                p["state"].as_str(),
                p["reason"].as_str().unwrap_or("")
            ),
            (Some(role), Some(state), reason),
            "{context}: {v}: {p}"
        );
    }
}

/// Tracks of the steps `from..=to` of the chain (block `i` of each
/// volume).
fn chain_tracks(from: u64, to: u64) -> u64 {
    let per_track = TRACK / 4096;
    if to < from {
        0
    } else {
        to / per_track - from / per_track + 1
    }
}

/// A consistency group over two LSSs of A (pairs A → B, 2 s link
/// timeout, 5 s consistency timeout) under a chain of dependent writes
/// across its two volumes, and four seeded rounds (`ESSD_FAULT_SEED`): now and
/// then a freeze on demand during the writes (the pairs suspend `freeze`,
/// no write is acknowledged until the unfreeze, then writes flow,
/// recorded); then the links are cut (stalled, dropped, or reset and
/// dropped) and the group holds writes, after which the group is frozen by
/// command at a random moment, or by its timeout, or A is killed (`kill
/// -9`), or B is killed and restarted (and the links come back or not)
/// and then the group frozen or timed out, or site A is lost while its group holds (its hosts gone, no
/// freeze). No write is acknowledged while the group holds; frozen, both
/// pairs are suspended (`freeze`); killed, every track where A's volumes
/// differ from B's is recorded in A's bitmap files. B's volumes hold one
/// cut of the chain, with every write acknowledged before the links were
/// cut. Then the pairs are resumed until duplex (a killed A restarted: its
/// pairs come back suspended, `primary restarted`, and resynchronise by
/// themselves), or the site fails over: A unreachable (or down), every
/// secondary of the group fails over at B, hosts continue the chain there
/// from B's cut, failback B → A copies A's handed-over tracks and B's
/// only (and leaves A's group with no pair, holding nothing), and then
/// the switch back (failover at A, hosts write A, failback
/// A → B) copies A's and B's changed tracks only. At the end every pair is
/// duplex and current, both volumes of each pair are equal, and the chain
/// is whole with every acknowledged write it must keep.
#[test]
fn consistency_group_under_link_cuts_crashes_and_site_failover_stays_consistent() {
    let seed = fault_seed(0x5EED_000C);
    let started = Instant::now();
    let (mut s, va, vb) = group_of_two("pprc-group-crash-failover", "5s");
    let images =
        ["vol-10-0.img", "vol-11-0.img"].map(|f| (s.dir_a.path().join(f), s.dir_b.path().join(f)));
    let mut schedule = Schedule::new(seed);
    // The steps the volumes of the primary of the time must keep.
    let mut floor = [0u64; 2];
    let mut writer = Some(ChainWriter::start(&s.a, &va, 1));
    // (on demand, cut, resolution, then)
    let mut rounds: Vec<(bool, &str, &str, &str)> = Vec::new();
    for _ in 0..4 {
        let context = format!("seed {seed}, rounds (on demand, cut, resolution, then) {rounds:?}");
        let on_demand = schedule.next() % 3 == 0;
        if on_demand {
            std::thread::sleep(schedule.millis(200, 800));
            let f = essctl_json(&s.a, &["pprc", "freeze"]);
            assert_eq!(
                (f["suspended"].as_u64(), f["group"]["state"].as_str()),
                (Some(2), Some("frozen")),
                "{context}: {f}"
            );
            assert_pairs(&s.a, &va, "primary", "suspended", "freeze", &context);
            let w = writer.as_ref().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let held = w.acked();
            std::thread::sleep(schedule.millis(300, 800));
            assert_eq!(
                w.acked(),
                held,
                "{context}: a write acknowledged while frozen"
            );
            let u = essctl_json(&s.a, &["pprc", "unfreeze"]);
            assert_eq!(u["group"]["state"], "normal", "{context}: {u}");
            wait_acked_past(w, held, &context);
            assert_pairs(&s.a, &va, "primary", "suspended", "freeze", &context);
            for (v, sv) in va.iter().zip(&vb) {
                resume_until_duplex(&s.a, v, &s.b, sv, seed);
            }
        }
        std::thread::sleep(schedule.millis(300, 1000));
        let cut = ["stall", "drop", "reset"][(schedule.next() % 3) as usize];
        match cut {
            "stall" => s.proxy.stall(),
            "drop" => s.proxy.drop_all(),
            _ => {
                s.proxy.reset();
                s.proxy.drop_all();
            }
        }
        wait_group(&s.a, "holding");
        // What the writer saw acknowledged before the group held (its
        // output read).
        std::thread::sleep(Duration::from_millis(200));
        let before = writer.as_ref().unwrap().acked();
        let resolution =
            ["freeze", "timeout", "kill A", "kill B", "site lost"][(schedule.next() % 5) as usize];
        rounds.push((on_demand, cut, resolution, ""));
        let context = format!("seed {seed}, rounds (on demand, cut, resolution, then) {rounds:?}");
        let held_context = format!("{context}: a write acknowledged while the group held");
        let mut a_killed = false;
        match resolution {
            "site lost" => {
                // The site is lost while its group holds: its hosts are
                // gone, no freeze comes.
                std::thread::sleep(schedule.millis(0, 1000));
                let w = writer.take().unwrap();
                assert_eq!(w.acked(), before, "{held_context}");
                w.kill();
                wait_group(&s.a, "holding");
            }
            "kill A" => {
                std::thread::sleep(schedule.millis(0, 1000));
                s.a.crash();
                a_killed = true;
                let w = writer.take().unwrap();
                let (acked, end) = w.stop();
                assert_eq!(acked, before, "{held_context}");
                assert!(end["broken"].is_string(), "{context}: {end}");
                // Where A's volumes differ from B's, A's bitmap files
                // record it: the held write, on A or not.
                for (v, (on_a, on_b)) in va.iter().zip(&images) {
                    let (differ, _) = track_differences(on_a, on_b);
                    let marks = durable_marks(&s.a, v);
                    assert!(
                        differ.is_subset(&marks),
                        "{context}: tracks of {v} differ from its secondary ({differ:?}) but \
                         are not all in its bitmap file ({marks:?})"
                    );
                }
            }
            _ => {
                if resolution == "kill B" {
                    s.b.crash();
                    std::thread::sleep(schedule.millis(100, 1000));
                    s.b.restart("TSTB2");
                    if schedule.next() % 2 == 0 {
                        // The links come back before the freeze: the
                        // group holds on.
                        s.proxy.heal();
                        rounds.last_mut().unwrap().2 = "kill B, healed";
                    }
                }
                let by_timeout =
                    resolution == "timeout" || (resolution == "kill B" && schedule.next() % 2 == 0);
                let w = writer.as_ref().unwrap();
                if by_timeout {
                    loop {
                        // Read before the state: an answer `holding`
                        // vouches only for what the writer had seen before
                        // it was asked (the timeout may release the writes
                        // right after answering).
                        let acked = w.acked();
                        if essctl_json(&s.a, &["pprc", "group"])["group"]["state"] != "holding" {
                            break;
                        }
                        assert_eq!(acked, before, "{held_context}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                } else {
                    std::thread::sleep(schedule.millis(0, 1000));
                    let acked = w.acked();
                    // After a kill and restart of B on a slow machine the
                    // timeout may come first: it freezes just the same.
                    if essctl_json(&s.a, &["pprc", "group"])["group"]["state"] == "holding" {
                        assert_eq!(acked, before, "{held_context}");
                        freeze_suspends(&s.a, 2);
                    }
                }
                assert_eq!(
                    essctl_json(&s.a, &["pprc", "group"])["group"]["state"],
                    "normal",
                    "{context}"
                );
                assert_pairs(&s.a, &va, "primary", "suspended", "freeze", &context);
                // Writes flow again, recorded.
                wait_acked_past(w, before, &context);
            }
        }
        // B holds one cut of the chain, every write acknowledged before
        // the links were cut in it.
        let b_cut = consistent_cut(&s.b, &vb, before, &context);
        let failover = schedule.next() % 2 == 0 || resolution == "site lost";
        rounds.last_mut().unwrap().3 = if failover { "failover" } else { "resume" };
        let context = format!("seed {seed}, rounds (on demand, cut, resolution, then) {rounds:?}");
        if !failover {
            if a_killed {
                s.a.restart("TSTA1");
                assert_pairs(
                    &s.a,
                    &va,
                    "primary",
                    "suspended",
                    "primary restarted",
                    &context,
                );
            }
            s.proxy.heal();
            for (v, sv) in va.iter().zip(&vb) {
                bring_back(&s.a, v, &s.b, sv, seed);
            }
            for (v, sv) in va.iter().zip(&vb) {
                resume_until_duplex(&s.a, v, &s.b, sv, seed);
            }
            floor = before;
            if a_killed {
                let cut = consistent_cut(&s.a, &va, floor, &context);
                writer = Some(ChainWriter::start(&s.a, &va, cut[1] + 1));
            }
            continue;
        }

        // Site A is lost: its hosts stop, it is unreachable (or down).
        s.proxy.drop_all();
        if let Some(w) = writer.take() {
            let (_, end) = w.stop();
            assert_eq!(end["broken"], serde_json::Value::Null, "{context}: {end}");
        }
        for v in &vb {
            let p = essctl_json(&s.b, &["pprc", "failover", v]);
            assert_eq!(
                (
                    p["role"].as_str(),
                    p["state"].as_str(),
                    p["reason"].as_str()
                ),
                (Some("primary"), Some("suspended"), Some("failover")),
                "{context}: {p}"
            );
        }
        if a_killed {
            s.a.restart("TSTA1");
            assert_pairs(
                &s.a,
                &va,
                "primary",
                "suspended",
                "primary restarted",
                &context,
            );
        }
        // Hosts continue the chain at B from its cut.
        let b_from = b_cut[1] + 1;
        let on_b = ChainWriter::start(&s.b, &vb, b_from);
        wait_acked_past(&on_b, b_cut, &context);
        std::thread::sleep(schedule.millis(300, 1000));

        // Failback B → A: A hands over what it changed alone.
        s.proxy.heal();
        path(&s.b, "0x10", "TSTA1", "0x10", "1");
        path(&s.b, "0x11", "TSTA1", "0x11", "1");
        for (v, sv) in vb.iter().zip(&va) {
            let on_a = show(&s.a, sv)["out_of_sync_tracks"].as_u64().unwrap();
            let p = essctl_json(&s.b, &["pprc", "failback", v]);
            assert_eq!(
                (p["role"].as_str(), p["state"].as_str()),
                (Some("primary"), Some("duplex pending")),
                "{context}: {p}"
            );
            let acked = on_b.acked();
            let on_b_tracks = chain_tracks(b_from, acked[0].max(acked[1]) + 1) as usize;
            let (copied, handed) = failback_copied(&s.b);
            // A pair its group still held is duplex: it hands over its
            // marks, tracks it wrote (not all out of sync).
            let handed_ok = if resolution == "site lost" {
                handed as u64 <= chain_tracks(1, before[0] + 1)
            } else {
                handed as u64 == on_a
            };
            assert!(
                handed_ok && copied >= handed && copied <= handed + on_b_tracks,
                "{context}: the failback of {v} copies {copied} tracks, {handed} handed over, \
                 for {on_a} changed on A alone and at most {on_b_tracks} on B"
            );
        }
        // A's group has no pair left, and holds nothing.
        let g = essctl_json(&s.a, &["pprc", "group"]);
        assert_eq!(
            (g["group"]["state"].as_str(), &g["volumes"]),
            (Some("normal"), &serde_json::json!([])),
            "{context}: A's group once every pair failed back: {g}"
        );
        for (v, sv) in vb.iter().zip(&va) {
            wait_duplex(&s.b, v);
            wait_sides_agree(&s.b, v, &s.a, sv, &context);
        }
        let (acked, end) = on_b.stop();
        assert_eq!(end["broken"], serde_json::Value::Null, "{context}: {end}");
        floor = acked;
        for (v, sv) in vb.iter().zip(&va) {
            assert_eq!(
                volume_sha(&s.b, v),
                volume_sha(&s.a, sv),
                "{context}: {v} and {sv}"
            );
        }
        let cut = consistent_cut(&s.a, &va, floor, &context);

        // The switch back: failover at A, hosts write A, failback A → B.
        for v in &va {
            let p = essctl_json(&s.a, &["pprc", "failover", v]);
            assert_eq!(
                (
                    p["role"].as_str(),
                    p["state"].as_str(),
                    p["reason"].as_str()
                ),
                (Some("primary"), Some("suspended"), Some("failover")),
                "{context}: {p}"
            );
        }
        let a_from = cut[1] + 1;
        let on_a = ChainWriter::start(&s.a, &va, a_from);
        wait_acked_past(&on_a, cut, &context);
        path(&s.a, "0x10", "TSTB2", "0x10", "1");
        path(&s.a, "0x11", "TSTB2", "0x11", "1");
        for v in &va {
            let p = essctl_json(&s.a, &["pprc", "failback", v]);
            assert_eq!(
                (p["role"].as_str(), p["state"].as_str()),
                (Some("primary"), Some("duplex pending")),
                "{context}: {p}"
            );
            let acked = on_a.acked();
            let on_a_tracks = chain_tracks(a_from, acked[0].max(acked[1]) + 1) as usize;
            let on_b_tracks = chain_tracks(b_from, floor[0]) as usize;
            let (copied, handed) = failback_copied(&s.a);
            assert!(
                handed <= on_b_tracks && copied <= handed + on_a_tracks,
                "{context}: the switch-back of {v} copies {copied} tracks, {handed} handed over \
                 by B, for at most {on_a_tracks} changed on A and {on_b_tracks} on B"
            );
        }
        for (v, sv) in va.iter().zip(&vb) {
            wait_duplex(&s.a, v);
            wait_sides_agree(&s.a, v, &s.b, sv, &context);
        }
        writer = Some(on_a);
    }
    let context = format!("seed {seed}, rounds (on demand, cut, resolution, then) {rounds:?}");
    let (acked, end) = writer.take().unwrap().stop();
    assert_eq!(end["broken"], serde_json::Value::Null, "{context}: {end}");
    for (i, a) in acked.iter().enumerate() {
        floor[i] = floor[i].max(*a);
    }
    for v in &va {
        wait_current(&s.a, v);
    }
    assert_pairs(&s.a, &va, "primary", "duplex", "", &context);
    assert_pairs(&s.b, &vb, "secondary", "duplex", "", &context);
    assert_eq!(
        essctl_json(&s.a, &["pprc", "group"])["group"]["state"],
        "normal",
        "{context}"
    );
    for (v, sv) in va.iter().zip(&vb) {
        assert_eq!(
            volume_sha(&s.a, v),
            volume_sha(&s.b, sv),
            "{context}: {v} and {sv}"
        );
    }
    let cut = consistent_cut(&s.a, &va, floor, &context);
    consistent_cut(&s.b, &vb, floor, &context);
    eprintln!(
        "{context}: chain {cut:?}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Waits (up to 10 s) until `writer` has had a write acknowledged past
/// `steps` on both volumes: writes flow.
fn wait_acked_past(writer: &ChainWriter, steps: [u64; 2], context: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let acked = writer.acked();
        if acked[0] > steps[0] && acked[1] > steps[1] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: no write acknowledged past {steps:?} ({acked:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Changes a volume as hosts do besides 4 KiB writes, from `argv[4]` NBD
/// connections at once (random generator seeded with `argv[2]`): writes
/// of 512 B to 200 KiB (4 KiB-aligned, 512 B-aligned only, or across a
/// 64 KiB track boundary), some with FUA, trims, write-zeroes with and
/// without `NO_HOLE` or with `FAST_ZERO` (trims and zeroes sometimes of 1
/// to 32 whole tracks), and flushes; at most 8 requests in flight, about
/// 80 a second in bursts of 1 to 6, never two overlapping ones at once
/// (but some right beside one in flight, sharing a 4 KiB block), three in
/// four within a 16 MiB window. Each request has its own
/// version, counted from `argv[5]`: a written 512-byte sector holds
/// SHA-256 of `sector:version` 16 times, a trimmed or zeroed one zeroes
/// (essd punches a hole in a file volume for a trim, which reads zeroes).
/// With a JSON list of 1 MiB chunks `argv[6]` it fills the volume
/// instead: one 1 MiB write into each chunk not listed, then flushes.
///
/// Controlled through the directory `argv[3]`: while a file `pause` is
/// there it sends nothing, and once nothing is in flight writes the
/// sectors acknowledged so far to `acked.json` (as in its output); a file
/// `stop` ends it. Then it flushes every connection and prints one JSON
/// object: `acked`, the last acknowledged version of every sector it
/// changed as runs `[first sector, count, version]` (version 0: zeroes);
/// `top`, the highest version it used; the requests sent by kind; the
/// fast zeroes refused (`ENOTSUP`: nothing changed); the errors (errno
/// names) other requests and the flushes got. If a connection breaks
/// (the server killed) it ends there: `broken` says why, and `unsure`
/// holds the sectors whose last request failed or was still in flight,
/// as `[sector, [version acknowledged before (null: none in this run),
/// versions sent since (0: a trim or zeroing)…]]` (they are not in `acked`).
const MIXED_CHANGES: &str = r#"
import errno, hashlib, json, nbd, os, random, select, sys, time
uri, seed, asks = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conns, version = int(sys.argv[4]), int(sys.argv[5])
holes = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
hs = []
for _ in range(conns):
    h = nbd.NBD()
    # 512 B-aligned requests also where the export asks for 4 KiB (direct
    # I/O), which essd serves with read-modify-write.
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(uri)
    hs.append(h)
size = hs[0].get_size()
sectors, track, chunk = size // 512, 128, 2048
rnd = random.Random(seed)
hot = rnd.randrange(0, sectors - 32768 + 1, track)
def data(first, count, v):
    return b"".join(hashlib.sha256(b"%d:%d" % (s, v)).digest() * 16 for s in range(first, first + count))
plan = None
if holes is not None:
    plan = [("write", c * chunk, chunk) for c in range(sectors // chunk) if c not in holes]
    plan.reverse()
def pick():
    kind = rnd.choices(["write", "fua", "trim", "zero", "nohole", "fast", "flush"], [45, 12, 14, 9, 9, 4, 9])[0]
    if kind == "flush":
        return kind, 0, 0
    base = hot if rnd.random() < 0.75 else 0
    span = 32768 if base == hot else sectors
    shape = rnd.randrange(4)
    if kind in ("trim", "zero", "nohole", "fast") and shape == 0:
        count = track * rnd.choice([1, 2, 4, rnd.randint(1, 32)])
        first = base + rnd.randrange(0, span - count + 1, track)
        return kind, first, count
    count = rnd.choice([rnd.randint(1, 8), rnd.randint(8, 128), rnd.randint(128, 400)])
    beside = [p for p in pending if p[4]]
    if beside and rnd.random() < 0.4:
        # Next to a request in flight, sharing its first or last 4 KiB.
        p = rnd.choice(beside)
        first = p[3] + p[4] if rnd.random() < 0.5 else p[3] - count
        return kind, min(max(first, 0), sectors - count), count
    if shape == 1:
        count = (count + 7) // 8 * 8
        first = base + rnd.randrange(0, span - count + 1, 8)
    elif shape == 2 or count == 1:
        first = base + rnd.randrange(0, span - count + 1)
    else:
        boundary = base + track * rnd.randint(1, span // track - 4)
        first = max(base, boundary - rnd.randint(1, count - 1))
    return kind, first, count
state, unsure, pending, errors, sent, refused = {}, {}, [], {}, {}, {}
broken = None
def failed(p, e):
    name = errno.errorcode.get(e.errnum, e.string) if e.errnum else e.string
    errors[name] = errors.get(name, 0) + 1
    v = p[5] if p[2] in ("write", "fua") else 0
    for s in range(p[3], p[3] + p[4]):
        if s in unsure:
            unsure[s].append(v)
        else:
            unsure[s] = [state.pop(s, None), v]
def reap():
    for p in list(pending):
        try:
            done = p[0].aio_command_completed(p[1])
        except nbd.Error as e:
            pending.remove(p)
            if p[2] == "fast" and e.errnum == errno.ENOTSUP:
                # Not fast here: refused, nothing changed.
                refused[p[2]] = refused.get(p[2], 0) + 1
            else:
                failed(p, e)
            continue
        if done:
            pending.remove(p)
            v = p[5] if p[2] in ("write", "fua") else 0
            for s in range(p[3], p[3] + p[4]):
                state[s] = v
                unsure.pop(s, None)
def issue(kind, first, count):
    global version
    h = rnd.choice(hs)
    version += 1
    off, n = first * 512, count * 512
    if kind in ("write", "fua"):
        buf = nbd.Buffer.from_bytearray(bytearray(data(first, count, version)))
        c = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if kind == "fua" else 0)
    elif kind == "trim":
        c = h.aio_trim(n, off, flags=nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0)
    elif kind == "zero":
        c = h.aio_zero(n, off, flags=nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0)
    elif kind == "nohole":
        c = h.aio_zero(n, off, flags=nbd.CMD_FLAG_NO_HOLE)
    elif kind == "fast":
        c = h.aio_zero(n, off, flags=nbd.CMD_FLAG_FAST_ZERO | rnd.choice([0, nbd.CMD_FLAG_NO_HOLE]))
    else:
        c = h.aio_flush()
    pending.append((h, c, kind, first, count, version))
    sent[kind] = sent.get(kind, 0) + 1
def wait(seconds):
    rl, wl = [], []
    for h in hs:
        if h.aio_is_dead():
            raise nbd.Error("connection dead", 0)
        if h.aio_in_flight() == 0:
            continue
        d = h.aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(h.aio_get_fd())
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(h.aio_get_fd())
    if not rl and not wl:
        time.sleep(seconds)
        return
    r, w, _ = select.select(rl, wl, [], seconds)
    for h in hs:
        if h.aio_in_flight() == 0:
            continue
        fd = h.aio_get_fd()
        if fd in r:
            h.aio_notify_read()
        elif fd in w:
            h.aio_notify_write()
def runs(m):
    out = []
    for s in sorted(m):
        if out and out[-1][0] + out[-1][1] == s and out[-1][2] == m[s]:
            out[-1][1] += 1
        else:
            out.append([s, 1, m[s]])
    return out
def publish():
    with open(os.path.join(asks, "acked.tmp"), "w") as f:
        json.dump({"acked": runs(state), "top": version}, f)
    os.rename(os.path.join(asks, "acked.tmp"), os.path.join(asks, "acked.json"))
due, published = time.time(), False
try:
    while True:
        stopping = os.path.exists(os.path.join(asks, "stop")) or (plan is not None and not plan)
        if stopping and not pending:
            break
        pausing = os.path.exists(os.path.join(asks, "pause"))
        if not pausing:
            published = False
        elif not pending and not published:
            publish()
            published = True
        now = time.time()
        # Bursts of 1 to 6 requests, so that several are in flight.
        burst = 1 if plan is not None else rnd.randint(1, 6)
        while not stopping and not pausing and now >= due and len(pending) < 8 and burst:
            kind, first, count = plan.pop() if plan else pick()
            if not any(first < p[3] + p[4] and p[3] < first + count for p in pending):
                issue(kind, first, count)
            burst -= 1
            if not burst:
                due = now + (0 if plan is not None else 0.04)
        wait(max(0.001, min(0.02, due - now)))
        reap()
except nbd.Error as e:
    broken = e.string
    reap_failed = nbd.Error("in flight when the connection broke", 0)
    for p in pending:
        failed(p, reap_failed)
    pending.clear()
if broken is None:
    for h in hs:
        try:
            h.flush()
        except nbd.Error as e:
            name = "flush " + (errno.errorcode.get(e.errnum, e.string) if e.errnum else e.string)
            errors[name] = errors.get(name, 0) + 1
        h.shutdown()
out = {"acked": runs(state), "top": version, "sent": sent, "refused": refused, "errors": errors}
if broken is not None:
    out["broken"] = broken
    out["unsure"] = sorted([s, v] for s, v in unsure.items())
print(json.dumps(out))
"#;

/// Reads a whole export and compares every 512-byte sector with what
/// [`MIXED_CHANGES`] left there, given on stdin as `{"runs": [[first
/// sector, count, version]], "either": [[sector, [version…]]]}`: a sector
/// in no run holds zeroes (version 0), one in `either` any of its
/// versions. Prints how many sectors are wrong, the first of them as
/// `[sector, version expected, "zeroes" or "other data"]`, and the version
/// each sector of `either` holds (`chosen`).
const SECTORS_NOT_AS_MODELLED: &str = r#"
import hashlib, json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
want = json.loads(sys.stdin.read())
size = h.get_size()
expect = [0] * (size // 512)
for first, count, v in want["runs"]:
    expect[first:first + count] = [v] * count
either = {s: vs for s, vs in want["either"]}
zero = bytes(512)
def data(s, v):
    return zero if v == 0 else hashlib.sha256(b"%d:%d" % (s, v)).digest() * 16
wrong, first, chosen, step = 0, [], [], 1 << 20
for off in range(0, size, step):
    chunk = h.pread(min(step, size - off), off)
    for i in range(0, len(chunk), 512):
        s, got = (off + i) // 512, chunk[i:i + 512]
        if s in either:
            held = [v for v in either[s] if data(s, v) == got]
            if held:
                chosen.append([s, held[0]])
                continue
        elif got == data(s, expect[s]):
            continue
        wrong += 1
        if len(first) < 12:
            first.append([s, expect[s], "zeroes" if got == zero else "other data"])
print(json.dumps({"wrong": wrong, "first": first, "chosen": chosen}))
"#;

/// What a volume changed by [`MIXED_CHANGES`] holds: the version of each
/// 512-byte sector (0: zeroes), and the highest version used so far.
struct SectorModel {
    versions: Vec<u64>,
    top: u64,
}

impl SectorModel {
    /// A volume of `bytes` that holds zeroes.
    fn zeroes(bytes: u64) -> SectorModel {
        SectorModel {
            versions: vec![0; (bytes / 512) as usize],
            top: 0,
        }
    }

    /// Takes in what a writer reported (its `acked` runs and `top`).
    fn take(&mut self, report: &serde_json::Value) {
        for run in report["acked"].as_array().unwrap() {
            let [first, count, version] = [0, 1, 2].map(|i| run[i].as_u64().unwrap() as usize);
            self.versions[first..first + count].fill(version as u64);
        }
        self.top = self.top.max(report["top"].as_u64().unwrap());
    }

    /// The sectors that hold data, as runs `[first, count, version]`.
    fn runs(&self) -> Vec<[u64; 3]> {
        let mut runs: Vec<[u64; 3]> = Vec::new();
        for (s, &v) in self.versions.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if v != 0 && r[0] + r[1] == s as u64 && r[2] == v => r[1] += 1,
                _ if v != 0 => runs.push([s as u64, 1, v]),
                _ => {}
            }
        }
        runs
    }

    /// A writer's `unsure` sectors with every version each may hold (its
    /// `null`, none acknowledged in that run: what the model holds).
    fn either(&self, unsure: &serde_json::Value) -> Vec<(u64, Vec<u64>)> {
        unsure
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|u| {
                        let s = u[0].as_u64().unwrap();
                        let versions = u[1].as_array().unwrap().iter();
                        let held = versions
                            .map(|v| v.as_u64().unwrap_or(self.versions[s as usize]))
                            .collect();
                        (s, held)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Asserts that `export` at `essd` holds what the model says, each
    /// sector of `either` one of its versions; returns the version each of
    /// those holds.
    fn assert_held(
        &self,
        essd: &Essd,
        export: &str,
        either: &[(u64, Vec<u64>)],
        context: &str,
    ) -> Vec<(u64, u64)> {
        let input = serde_json::json!({"runs": self.runs(), "either": either});
        let found = run_checker(SECTORS_NOT_AS_MODELLED, essd, export, &input);
        assert_eq!(
            found["wrong"], 0,
            "{context}: sectors of {export} that do not hold their last acknowledged change \
             ([sector, version, found]): {}",
            found["first"]
        );
        found["chosen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c[0].as_u64().unwrap(), c[1].as_u64().unwrap()))
            .collect()
    }
}

/// A host running [`MIXED_CHANGES`] on `export` at `essd` from `conns`
/// connections, controlled through `asks`; its versions count from
/// `base`.
fn mixed_writer(
    essd: &Essd,
    export: &str,
    seed: u64,
    asks: &Path,
    conns: u64,
    base: u64,
) -> std::thread::JoinHandle<serde_json::Value> {
    for file in ["stop", "pause", "acked.json"] {
        let _ = std::fs::remove_file(asks.join(file));
    }
    let args = [
        essd.uri(export),
        seed.to_string(),
        asks.display().to_string(),
        conns.to_string(),
        base.to_string(),
    ];
    std::thread::spawn(move || {
        let out = python(
            MIXED_CHANGES,
            &[&args[0], &args[1], &args[2], &args[3], &args[4]],
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    })
}

/// Pauses a [`mixed_writer`] once nothing it sent is in flight; returns
/// what it had acknowledged then. [`go_on`] lets it write again.
fn pause_mixed_writer(
    writer: &std::thread::JoinHandle<serde_json::Value>,
    asks: &Path,
) -> serde_json::Value {
    let answer = asks.join("acked.json");
    let _ = std::fs::remove_file(&answer);
    std::fs::write(asks.join("pause"), b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answer.exists() {
        assert!(!writer.is_finished(), "the writer ended before pausing");
        assert!(Instant::now() < deadline, "the writer did not pause");
        std::thread::sleep(Duration::from_millis(20));
    }
    serde_json::from_slice(&std::fs::read(&answer).unwrap()).unwrap()
}

/// Lets a writer paused by [`pause_mixed_writer`] write again.
fn go_on(asks: &Path) {
    std::fs::remove_file(asks.join("pause")).unwrap();
}

/// Stops a [`mixed_writer`]; returns its report.
fn stop_mixed_writer(
    writer: std::thread::JoinHandle<serde_json::Value>,
    asks: &Path,
) -> serde_json::Value {
    std::fs::write(asks.join("stop"), b"").unwrap();
    let _ = std::fs::remove_file(asks.join("pause"));
    writer.join().unwrap()
}

/// With the pair of `va` duplex and no fault active: pauses the host, and
/// both volumes must hold every change it had acknowledged (taken into
/// `model`), the secondary as the primary; then the host goes on.
fn assert_mirrored_while_duplex(
    s: &Sites,
    (va, vb): (&str, &str),
    (writer, asks): (&std::thread::JoinHandle<serde_json::Value>, &Path),
    model: &mut SectorModel,
    context: &str,
) {
    let acked = pause_mixed_writer(writer, asks);
    model.take(&acked);
    let pair = show(&s.a, va);
    assert_eq!(pair["state"], "duplex", "{context}: {pair}");
    model.assert_held(&s.b, vb, &[], &format!("{context}, duplex"));
    model.assert_held(&s.a, va, &[], &format!("{context}, duplex"));
    let pair = show(&s.a, va);
    assert_eq!(pair["state"], "duplex", "{context}: {pair}");
    go_on(asks);
}

/// A fault for [`random_faults_under_mixed_writes_trims_and_zeroes_lose_nothing`],
/// drawn from `schedule`: its kind — the links stalled past the 2 s
/// timeout (0: all, 7: the oldest), reset (1: all, 2: one), dropped (3),
/// the pair suspended by hand (4), `kill -9` of the secondary's server,
/// restarted after the hold (5), of the primary's, restarted at once (6)
/// — and how long it lasts.
fn draw_mixed_fault(schedule: &mut Schedule) -> (u64, Duration) {
    let kind = schedule.next() % 8;
    let hold = match kind {
        0 | 7 => schedule.millis(2500, 3500),
        3 => schedule.millis(300, 3000),
        4 => schedule.millis(500, 2500),
        5 => schedule.millis(200, 2000),
        _ => Duration::ZERO,
    };
    (kind, hold)
}

/// The fault kind of [`draw_mixed_fault`] that kills the primary's server.
const KILL_THE_PRIMARY: u64 = 6;

/// A host changes a primary as hosts do besides 4 KiB writes
/// ([`MIXED_CHANGES`]: writes of 512 B to 200 KiB across track
/// boundaries, some beside a request in flight in the same 4 KiB block,
/// FUA writes, trims, write-zeroes with `NO_HOLE`, `FAST_ZERO` or
/// neither, flushes, from 2 or 3 connections with up to 8 requests in
/// flight; buffered or direct I/O at each site) from the start of the
/// initial copy (`--mode copy`, of the host's data and holes onto a
/// secondary holding other data) to the end, while 6 to 8 seeded faults
/// (`ESSD_FAULT_SEED`) hit the pair: the links stalled past the 2 s
/// timeout, reset, dropped, a suspend by hand, `kill -9` and restart of
/// either server. The first comes during the initial copy, one during a
/// resync (suspended, changed, resumed slowly); a stall of every link, a
/// drop or a kill of the secondary suspends the pair (`link lost`), as
/// does the suspend (`manual`); after each the pair is brought back until
/// duplex while the host goes on, so tracks trimmed or zeroed while
/// suspended, or ahead of or behind the copy, are resynchronised. Before
/// each fault, with the pair duplex and the host paused, both volumes
/// hold every change acknowledged (a trimmed sector reads zeroes: essd
/// punches a hole in a file volume); after a kill of the primary, each
/// sector whose change was in flight holds that change or the one
/// before, the same on both. The host saw no error but at the primary's
/// kills; at the end the pair is duplex and current and the volumes are
/// equal.
#[test]
fn random_faults_under_mixed_writes_trims_and_zeroes_lose_nothing() {
    let seed = fault_seed(0x5EED_000C);
    let started = Instant::now();
    let mut schedule = Schedule::new(seed);
    let conns = 2 + schedule.next() % 2;
    // Buffered or direct I/O, at each site.
    let direct = [schedule.next() % 2 == 0, schedule.next() % 2 == 0];
    let mut s = Sites::start("pprc-mixed-faults", |cfg| {
        cfg.volumes[0].direct_io = direct[usize::from(cfg.serial == "TSTB2")];
    });
    let (va, vb) = (s.a.vol(0x10, 0), s.b.vol(0x10, 0));
    let volume = 64u64 << 20;
    // The primary: the host's data but for 12..20 holes of 1 MiB; the
    // secondary other data all over.
    fill(&s.b, &vb, s.dir_b.path(), 64, !seed);
    let mut holes = BTreeSet::new();
    let n = 12 + schedule.next() % 9;
    while holes.len() < n as usize {
        holes.insert(schedule.next() % 64);
    }
    let asks = tempfile::tempdir().unwrap();
    let asks = asks.path();
    let mut model = SectorModel::zeroes(volume);
    let filled = python(
        MIXED_CHANGES,
        &[
            &s.a.uri(&va),
            &seed.to_string(),
            &asks.display().to_string(),
            "2",
            "0",
            &serde_json::json!(holes).to_string(),
        ],
    );
    model.take(&serde_json::from_str(&filled).unwrap());
    path(&s.a, "0x10", "TSTB2", "0x10", "2");
    s.proxy.delay(INITIAL_COPY_DELAY);
    let p = essctl_json(&s.a, &["pprc", "establish", &va, &vb, "--mode", "copy"]);
    assert_eq!(p["state"], "duplex pending", "seed {seed}: {p}");

    let mut writer = mixed_writer(&s.a, &va, seed, asks, conns, model.top);
    // (round, kind, ms, the pair's state when it came)
    let mut faults: Vec<(u64, u64, u128, String)> = Vec::new();
    let mut reports = Vec::new();
    let rounds = 6 + schedule.next() % 3;
    let resync_round = 1 + schedule.next() % (rounds - 1);
    for round in 0..rounds {
        let context = format!(
            "seed {seed}, {conns} connections, direct I/O (A, B) {direct:?}, round {round}, faults \
             (round, kind, ms, state) {faults:?}"
        );
        let state = if round == 0 {
            let left = show(&s.a, &va)["out_of_sync_tracks"].as_u64().unwrap();
            let at = s.proxy.bytes_forward() + schedule.next() % (left * TRACK / 2).max(1);
            wait_for_copy_point(&s.a, &va, &s.proxy, at, &mut Vec::new())
        } else {
            std::thread::sleep(schedule.millis(500, 1500));
            assert_mirrored_while_duplex(&s, (&va, &vb), (&writer, asks), &mut model, &context);
            if round == resync_round {
                // Tracks changed while suspended, then a slow resync for
                // the fault to hit.
                essctl(&s.a, &["pprc", "suspend", &va]).ok();
                std::thread::sleep(schedule.millis(1500, 3000));
                s.proxy.delay(INITIAL_COPY_DELAY);
                essctl(&s.a, &["pprc", "resume", &va]).ok();
                let left = show(&s.a, &va)["out_of_sync_tracks"].as_u64().unwrap();
                let at = s.proxy.bytes_forward() + schedule.next() % (left * TRACK / 2).max(1);
                wait_for_copy_point(&s.a, &va, &s.proxy, at, &mut Vec::new())
            } else {
                show(&s.a, &va)["state"].as_str().unwrap().to_string()
            }
        };
        // No fault yet: the copy went on (or ended) by itself.
        let pair = show(&s.a, &va);
        assert_ne!(pair["state"], "suspended", "{context}: {pair}");
        let (kind, hold) = draw_mixed_fault(&mut schedule);
        faults.push((round, kind, hold.as_millis(), state));
        let context = format!("{context}, this fault {:?}", faults.last().unwrap());
        match kind {
            0 => s.proxy.stall(),
            1 => s.proxy.reset(),
            2 => s.proxy.reset_one(),
            3 => s.proxy.drop_all(),
            4 => {
                essctl(&s.a, &["pprc", "suspend", &va]).ok();
            }
            5 => s.b.crash(),
            KILL_THE_PRIMARY => s.a.kill_and_restart("TSTA1"),
            _ => s.proxy.stall_oldest(),
        }
        std::thread::sleep(hold);
        // Every link stalled or gone while the host writes, or a suspend by
        // hand: the pair suspends, and says why.
        let reason = match kind {
            0 | 3 | 5 => Some("link lost"),
            4 => Some("manual"),
            _ => None,
        };
        if let Some(reason) = reason {
            let pair = wait_state(&s.a, &va, "suspended");
            assert_eq!(pair["reason"], reason, "{context}: {pair}");
        }
        if kind == 5 {
            s.b.restart("TSTB2");
        }
        if kind == KILL_THE_PRIMARY {
            let report = writer.join().unwrap();
            assert!(
                report["broken"].is_string(),
                "{context}: the host's connections did not break: {report}"
            );
            model.take(&report);
            let either = model.either(&report["unsure"]);
            reports.push(report);
            s.proxy.heal();
            bring_back(&s.a, &va, &s.b, &vb, seed);
            resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
            // Each sector changed in flight holds that change or the one
            // before, the same on both volumes.
            for (sector, version) in model.assert_held(&s.a, &va, &either, &context) {
                model.versions[sector as usize] = version;
            }
            model.assert_held(&s.b, &vb, &[], &format!("{context}, after the resync"));
            writer = mixed_writer(&s.a, &va, seed + round + 1, asks, conns, model.top);
        } else {
            s.proxy.heal();
            bring_back(&s.a, &va, &s.b, &vb, seed);
            resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
        }
    }
    let context = format!(
        "seed {seed}, {conns} connections, direct I/O (A, B) {direct:?}, faults (round, kind, ms, \
         state) {faults:?}"
    );
    assert_mirrored_while_duplex(&s, (&va, &vb), (&writer, asks), &mut model, &context);
    let report = stop_mixed_writer(writer, asks);
    model.take(&report);
    reports.push(report);
    let sent: Vec<[&serde_json::Value; 2]> = reports
        .iter()
        .map(|r| [&r["sent"], &r["refused"]])
        .collect();
    let context = format!(
        "{context}, requests sent and fast zeroes refused {}",
        serde_json::json!(sent)
    );
    for r in &reports {
        assert!(
            r["broken"].is_string() || r["errors"] == serde_json::json!({}),
            "{context}: the host saw errors: {}",
            r["errors"]
        );
    }
    assert!(
        faults.iter().any(|f| f.3 == "duplex pending"),
        "{context}: no fault hit a copy"
    );
    resume_until_duplex(&s.a, &va, &s.b, &vb, seed);
    wait_current(&s.a, &va);
    let side = wait_state(&s.b, &vb, "duplex");
    assert_eq!(side["role"], "secondary", "{context}: {side}");
    model.assert_held(&s.a, &va, &[], &context);
    model.assert_held(&s.b, &vb, &[], &context);
    assert_eq!(
        volume_sha(&s.a, &va),
        volume_sha(&s.b, &vb),
        "{context}: the volumes differ"
    );
    eprintln!("{context}: {:.1} s", started.elapsed().as_secs_f64());
}

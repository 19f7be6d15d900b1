//! FlashCopy through the management API and `essctl`: establish tables and
//! `--json` fields, waiting for a background copy, every refusal with its
//! exact message and exit code, withdraw by volume and by pair, the
//! FlashCopy role of volumes, incomplete targets, and the event log.
//!
//! LSS 0x10 holds four volumes: 000 and 001 of 32 MiB (512 tracks of the
//! default 64 KiB), 002 of 4 MiB, and 003, read-only, of 32 MiB.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use essd::cli::client::{Client, Endpoint};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Default track size.
const TRACK: u64 = 64 << 10;
/// Size of volumes 000, 001 and 003.
const BIG: u64 = 32 * MIB;
/// Tracks the background copier copies before it applies the rate limit.
const COPIER_CHUNK: u64 = 256;

/// Whitespace-separated cells of each line.
fn cells(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The value of `key` in `key: value` lines.
fn field(text: &str, key: &str) -> String {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
}

fn config() -> TestConfig {
    let mut cfg = TestConfig::new("threads");
    let mut ro = Vol::new(0x10, 3, "32MiB");
    ro.read_only = true;
    cfg.volumes = vec![
        Vol::new(0x10, 0, "32MiB"),
        Vol::new(0x10, 1, "32MiB"),
        Vol::new(0x10, 2, "4MiB"),
        ro,
    ];
    cfg
}

/// Starts essd on [`config`] (creating the read-only volume's file first).
fn start(dir: &std::path::Path) -> Essd {
    std::fs::File::create(dir.join("vol-10-3.img"))
        .and_then(|f| f.set_len(BIG))
        .expect("create the read-only backing file");
    Essd::start_in(dir, &config())
}

/// Writes `len` bytes of pseudo-random data at the start of `export`.
fn fill(essd: &Essd, export: &str, len: usize) {
    require("nbdcopy", "libnbd-bin");
    let data = essd.dir.join(format!("fill-{export}.bin"));
    random_file(&data, len, 11);
    run(Command::new("nbdcopy").arg(&data).arg(essd.uri(export)));
}

fn api(essd: &Essd) -> Client {
    Client::new(Endpoint::Unix(essd.api_sock.clone()), None).with_timeout(Duration::from_secs(10))
}

/// Polls `flashcopy show --json` until `pred` holds for the first relationship.
fn wait_for(essd: &Essd, selector: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = essctl(essd, &["--json", "flashcopy", "show", selector]);
        if run.code == 0 {
            let v: Value = serde_json::from_str(&run.stdout).unwrap();
            if pred(&v["relationships"][0]) {
                return v["relationships"][0].clone();
            }
        }
        assert!(Instant::now() < deadline, "condition not reached: {run:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn establish_wait_for_the_copy_and_log() {
    let dir = tempdir("fc-cli-copy");
    let essd = start(dir.path());
    // Data in the first copier chunk: at 4 MiB/s its 16 MiB keep the copy
    // running for about four seconds before the second chunk (a hole).
    fill(&essd, "000TST01", (COPIER_CHUNK * TRACK) as usize);

    let run = essctl(
        &essd,
        &["flashcopy", "establish", "000TST01:001TST01", "--rate", "4"],
    );
    let lines = cells(run.ok());
    assert_eq!(
        lines[0],
        ["SOURCE", "TARGET", "MODE", "STATE", "COPIED%", "T0"]
    );
    assert_eq!(lines[1][..3], ["000TST01", "001TST01", "copy"]);
    assert!(lines[1][5].ends_with('Z'), "{lines:?}");
    assert_eq!(lines.len(), 2);

    let list = essctl(&essd, &["--json", "flashcopy", "list"]).json();
    let rel = &list["relationships"][0];
    assert_eq!(rel["mode"], "copy");
    assert_eq!(rel["rate_mib_s"], 4.0);
    assert_eq!(rel["tracks_total"], BIG / TRACK);
    assert_eq!(list["incomplete_targets"], json!([]));

    // Plain progress lines on a pipe, then exit 0 once the copy is done.
    let wait = essctl(
        &essd,
        &["flashcopy", "wait", "001TST01", "--interval", "0.2"],
    );
    assert_eq!(
        wait.stdout
            .lines()
            .next()
            .unwrap_or_default()
            .split(" (")
            .next(),
        Some("000TST01 → 001TST01: background copy complete"),
        "{wait:?}"
    );
    assert_eq!(wait.code, 0, "{wait:?}");
    assert!(
        wait.stderr
            .lines()
            .any(|l| l.starts_with("000TST01 → 001TST01: ") && l.contains("/512 tracks")),
        "{wait:?}"
    );
    assert!(!wait.stderr.contains('\r'), "no bar without a terminal");

    // The relationship ended by itself; the target holds the source.
    let run = essctl(&essd, &["flashcopy", "list"]);
    assert_eq!(run.ok(), "no FlashCopy relationships\n");
    let list = essctl(&essd, &["--json", "flashcopy", "list"]).json();
    assert_eq!(list, json!({"relationships": [], "incomplete_targets": []}));
    require("nbdcopy", "libnbd-bin");
    let (s, t) = (dir.path().join("s.bin"), dir.path().join("t.bin"));
    run_text(Command::new("nbdcopy").arg(essd.uri("000TST01")).arg(&s));
    run_text(Command::new("nbdcopy").arg(essd.uri("001TST01")).arg(&t));
    assert_eq!(sha256_file(&s), sha256_file(&t));
    let v = essctl(&essd, &["--json", "volume", "show", "001TST01"]).json();
    assert_eq!(
        (&v["flashcopy_role"], &v["flashcopy_peer"], &v["incomplete"]),
        (&json!("none"), &Value::Null, &json!(false))
    );

    // The event log: establish and end, both timed.
    let log = essctl(&essd, &["--json", "log"]).json();
    let events = log["events"].as_array().unwrap();
    for name in ["flashcopy.establish", "flashcopy.end"] {
        let e = events
            .iter()
            .find(|e| e["event"] == name)
            .unwrap_or_else(|| panic!("no {name} in {log}"));
        assert!(e["duration_ms"].as_f64().unwrap() >= 0.0, "{e}");
        assert!(
            e["detail"]
                .as_str()
                .unwrap()
                .contains("000TST01 → 001TST01"),
            "{e}"
        );
    }
    let end = events.iter().position(|e| e["event"] == "flashcopy.end");
    let start = events
        .iter()
        .position(|e| e["event"] == "flashcopy.establish");
    assert!(start < end);
    let limited = essctl(&essd, &["--json", "log", "--limit", "1"]).json();
    assert_eq!(limited["events"].as_array().unwrap().len(), 1);
    let table = essctl(&essd, &["log"]);
    let lines = cells(table.ok());
    assert_eq!(lines[0], ["TIME", "EVENT", "DURATION", "DETAIL"]);
    assert!(
        lines
            .iter()
            .any(|l| l[1] == "flashcopy.end" && (l[3] == "ms" || l[3] == "s")),
        "{}",
        table.stdout
    );

    // Bad limits: a usage error in essctl, a 400 from the API.
    assert_eq!(essctl(&essd, &["log", "--limit", "0"]).code, 2);
    for query in ["limit=0", "limit=10001", "limit=x"] {
        let r = api(&essd).get(&format!("/v1/log?{query}")).unwrap();
        assert_eq!(r.status, 400, "{query}");
    }
    assert_eq!(essd.stop().code(), Some(0));
}

#[test]
fn refusals_roles_and_nocopy_withdraw() {
    let dir = tempdir("fc-cli-refuse");
    let essd = start(dir.path());
    let refusals = [
        (
            "000TST01:000TST01",
            "source and target are the same volume 000TST01",
        ),
        (
            "000TST01:002TST01",
            "target 002TST01 (4194304 bytes) is smaller than source 000TST01 (33554432 bytes)",
        ),
        (
            "000TST01:0FFTST01",
            "volume 0FFTST01 does not exist on this server",
        ),
        ("nosuch:001TST01", "volume nosuch does not exist on this server"),
        ("000TST01:003TST01", "target 003TST01 is a read-only volume"),
        (
            "000TST01:000ZZZ99",
            "volume 000ZZZ99 belongs to storage server ZZZ99, not TST01: FlashCopy source and target must be on the same server",
        ),
    ];
    for (pair, message) in refusals {
        essctl(&essd, &["flashcopy", "establish", pair]).refused(message);
    }
    essctl(
        &essd,
        &[
            "flashcopy",
            "establish",
            "000TST01:001TST01",
            "001TST01:003TST01",
        ],
    )
    .refused("volume 001TST01 appears more than once in the request");
    // Bad arguments never reach the server.
    for args in [
        &["flashcopy", "establish", "000TST01"][..],
        &["flashcopy", "establish", "000TST01:001TST01", "--rate", "0"],
    ] {
        assert_eq!(essctl(&essd, args).code, 2, "{args:?}");
    }

    // NOCOPY, in JSON; volume IDs may be typed in lower case.
    let created = essctl(
        &essd,
        &[
            "--json",
            "flashcopy",
            "establish",
            "000tst01:001TST01",
            "--nocopy",
        ],
    )
    .json();
    let rels = created["relationships"].as_array().unwrap();
    assert_eq!(rels.len(), 1);
    let rel = &rels[0];
    assert_eq!(rel["source"], "000TST01");
    assert_eq!(rel["target"], "001TST01");
    assert_eq!(rel["mode"], "nocopy");
    assert_eq!(rel["state"], "nocopy");
    assert_eq!(rel["rate_mib_s"], Value::Null);
    assert_eq!(rel["track_size"], TRACK);
    assert_eq!(rel["tracks_total"], BIG / TRACK);
    assert_eq!(rel["tracks_copied"], 0);
    assert_eq!(rel["tracks_remaining"], BIG / TRACK);
    assert_eq!(rel["percent"], 0.0);
    assert_eq!(rel["bytes_copied"], 0);
    assert!(rel.get("error").is_none(), "{rel}");
    assert!(rel["t0"].as_str().unwrap().ends_with('Z'));

    // Either volume is now taken.
    essctl(&essd, &["flashcopy", "establish", "000TST01:002TST01"]).refused(
        "volume 000TST01 is already the source of FlashCopy relationship 000TST01 → 001TST01",
    );
    essctl(&essd, &["flashcopy", "establish", "001TST01:003TST01"]).refused(
        "volume 001TST01 is already the target of FlashCopy relationship 000TST01 → 001TST01",
    );

    // Roles in volume show and list (SIZE is two cells: "32.0 MiB").
    let show = essctl(&essd, &["volume", "show", "000TST01"]);
    assert_eq!(field(show.ok(), "flashcopy role"), "source");
    assert_eq!(field(&show.stdout, "flashcopy peer"), "001TST01");
    assert_eq!(field(&show.stdout, "incomplete"), "no");
    let show = essctl(&essd, &["volume", "show", "001TST01"]);
    assert_eq!(field(show.ok(), "flashcopy role"), "target");
    assert_eq!(field(&show.stdout, "flashcopy peer"), "000TST01");
    let list = essctl(&essd, &["volume", "list"]);
    let lines = cells(list.ok());
    assert_eq!(
        lines[0],
        [
            "ID",
            "ALIAS",
            "LSS",
            "SIZE",
            "RO",
            "CLIENTS",
            "FLASHCOPY",
            "BACKING"
        ]
    );
    assert_eq!(lines[1][7..10], ["source", "→", "001TST01"]);
    assert_eq!(lines[2][7..10], ["target", "←", "000TST01"]);
    assert_eq!(lines[3][7], "-");
    let vols = essctl(&essd, &["--json", "volume", "list"]).json();
    let roles: Vec<(&str, &Value)> = vols["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["flashcopy_role"].as_str().unwrap(), &v["flashcopy_peer"]))
        .collect();
    assert_eq!(
        roles,
        [
            ("source", &json!("001TST01")),
            ("target", &json!("000TST01")),
            ("none", &Value::Null),
            ("none", &Value::Null)
        ]
    );

    // list and show.
    let lines = cells(essctl(&essd, &["flashcopy", "list"]).ok());
    assert_eq!(
        lines[0],
        ["SOURCE", "TARGET", "MODE", "STATE", "COPIED", "TRACKS", "RATE", "T0"]
    );
    assert_eq!(
        lines[1][..7],
        [
            "000TST01",
            "001TST01",
            "nocopy",
            "nocopy",
            "0.0%",
            "0/512",
            "unlimited"
        ]
    );
    let show = essctl(&essd, &["flashcopy", "show", "000TST01:001TST01"]);
    let text = show.ok();
    for (key, value) in [
        ("source", "000TST01"),
        ("target", "001TST01"),
        ("state", "nocopy"),
        ("mode", "nocopy"),
        ("rate", "unlimited"),
        ("track size", "64.0 KiB (65536 bytes)"),
        ("tracks total", "512"),
        ("tracks copied", "0"),
        ("tracks remaining", "512"),
        ("percent", "0.0%"),
        ("error", "-"),
    ] {
        assert_eq!(field(text, key), value, "{key}");
    }
    assert_eq!(field(text, "T0"), rel["t0"].as_str().unwrap());
    essctl(&essd, &["flashcopy", "show", "002TST01"])
        .refused("no FlashCopy relationship involves 002TST01");

    // Nothing to wait for.
    essctl(&essd, &["flashcopy", "wait", "000TST01"]).refused(
        "FlashCopy relationship 000TST01 → 001TST01 is NOCOPY: it has no background copy to wait for",
    );
    essctl(&essd, &["flashcopy", "wait", "002TST01"])
        .refused("no FlashCopy relationship involves 002TST01");

    // A host write to the source copies its track first.
    fill(&essd, "000TST01", 4096);
    let rel = wait_for(&essd, "000TST01", |r| r["tracks_copied"] == 1);
    // Its T0 content was a hole, copied as a hole.
    assert_eq!(rel["bytes_copied"], 0, "{rel}");

    // Withdraw by pair: the target is left incomplete.
    essctl(&essd, &["flashcopy", "withdraw", "002TST01"])
        .refused("no FlashCopy relationship involves 002TST01");
    let run = essctl(&essd, &["flashcopy", "withdraw", "000TST01:001TST01"]);
    assert_eq!(
        run.ok(),
        "withdrew 000TST01 → 001TST01 (nocopy, 1 of 512 tracks copied)\n"
    );
    assert_eq!(
        run.stderr,
        "warning: target 001TST01 is incomplete (NOCOPY relationship: 0.1% of its tracks were copied)\n"
    );
    let show = essctl(&essd, &["volume", "show", "001TST01"]);
    assert_eq!(field(show.ok(), "incomplete"), "yes");
    assert_eq!(field(&show.stdout, "flashcopy role"), "none");
    assert_eq!(field(&show.stdout, "flashcopy peer"), "-");
    let run = essctl(&essd, &["flashcopy", "list"]);
    assert_eq!(
        run.ok(),
        "no FlashCopy relationships\nincomplete targets: 001TST01\n"
    );
    let lines = cells(essctl(&essd, &["volume", "list"]).ok());
    assert_eq!(lines[2][7], "incomplete");

    // A new establish onto the target clears the mark; withdraw by source.
    essctl(
        &essd,
        &["flashcopy", "establish", "000TST01:001TST01", "--nocopy"],
    )
    .ok();
    let v = essctl(&essd, &["--json", "volume", "show", "001TST01"]).json();
    assert_eq!(v["incomplete"], false);
    let withdrawn = essctl(&essd, &["--json", "flashcopy", "withdraw", "000TST01"]);
    let body: Value = serde_json::from_str(withdrawn.ok()).unwrap();
    assert_eq!(body["relationships"][0]["target"], "001TST01");
    assert!(
        withdrawn
            .stderr
            .starts_with("warning: target 001TST01 is incomplete"),
        "{withdrawn:?}"
    );
    assert_eq!(
        essctl(&essd, &["--json", "flashcopy", "list"]).json()["relationships"],
        json!([])
    );

    // The raw API: statuses and JSON errors.
    let client = api(&essd);
    let post = |path: &str, body: Value| {
        let r = client.post_json(path, body.to_string().as_bytes()).unwrap();
        (r.status, r.error_message())
    };
    let pair = json!([{"source": "000TST01", "target": "001TST01"}]);
    assert_eq!(
        post("/v1/flashcopy", json!({"pairs": []})),
        (400, "no source:target pair given".to_string())
    );
    assert_eq!(
        post("/v1/flashcopy", json!({"pairs": pair, "rate_mib_s": 0})).0,
        400
    );
    assert_eq!(
        post("/v1/flashcopy", json!({"pairs": pair, "speed": 1})).0,
        400
    );
    assert_eq!(
        post(
            "/v1/flashcopy",
            json!({"pairs": [{"source": "000TST01", "target": "000TST01"}]})
        )
        .0,
        409
    );
    assert_eq!(
        post(
            "/v1/flashcopy",
            json!({"pairs": [{"source": "000TST01", "target": "0FFTST01"}]})
        )
        .0,
        404
    );
    assert_eq!(
        post("/v1/flashcopy/withdraw", json!({"volumes": []})).0,
        400
    );
    assert_eq!(
        post("/v1/flashcopy/withdraw", json!({"volumes": ["000TST01"]})).0,
        404
    );
    let r = client
        .post_json(
            "/v1/flashcopy",
            json!({"pairs": pair, "nocopy": true})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.error_message());
    let r = client.get("/v1/flashcopy/000TST01%3A001TST01").unwrap();
    assert_eq!(r.status, 200);
    let r = client.delete("/v1/flashcopy/001TST01").unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["relationships"][0]["source"], "000TST01");
    let r = client.delete("/v1/flashcopy/001TST01").unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        r.error_message(),
        "no FlashCopy relationship involves 001TST01"
    );

    let log = essctl(&essd, &["--json", "log"]).json();
    let withdraws = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "flashcopy.withdraw")
        .count();
    assert_eq!(withdraws, 3, "{log}");
    assert_eq!(essd.stop().code(), Some(0));
}

#[test]
fn withdraw_in_the_middle_of_a_copy() {
    let dir = tempdir("fc-cli-mid");
    let essd = start(dir.path());
    // 16 MiB of data at 1 MiB/s: the copy takes about 16 s.
    fill(&essd, "000TST01", (COPIER_CHUNK * TRACK) as usize);
    essctl(
        &essd,
        &["flashcopy", "establish", "000TST01:001TST01", "--rate", "1"],
    )
    .ok();
    let rel = wait_for(&essd, "001TST01", |r| r["tracks_copied"].as_u64() > Some(0));
    assert_eq!(rel["state"], "copying");
    assert_eq!(rel["rate_mib_s"], 1.0);

    // The wait times out: exit code 5.
    let started = Instant::now();
    let wait = essctl(
        &essd,
        &[
            "flashcopy",
            "wait",
            "000TST01",
            "--interval",
            "0.1",
            "--timeout",
            "0.5",
        ],
    );
    assert_eq!(wait.code, 5, "{wait:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        wait.stderr.contains(
            "essctl: timed out after 0.5 s waiting for the background copy of 000TST01 → 001TST01 ("
        ),
        "{wait:?}"
    );
    assert!(wait.stderr.contains("/512 tracks"), "{wait:?}");

    let run = essctl(&essd, &["flashcopy", "withdraw", "000TST01"]);
    let out = run.ok().to_string();
    assert!(
        out.starts_with("withdrew 000TST01 → 001TST01 (copy, ")
            && out.ends_with(" of 512 tracks copied)\n"),
        "{out}"
    );
    assert!(
        run.stderr
            .starts_with("warning: target 001TST01 is incomplete (background copy was ")
            && run.stderr.ends_with("% done)\n"),
        "{run:?}"
    );
    let show = essctl(&essd, &["volume", "show", "001TST01"]);
    assert_eq!(field(show.ok(), "incomplete"), "yes");
    let list = essctl(&essd, &["--json", "flashcopy", "list"]).json();
    assert_eq!(
        list,
        json!({"relationships": [], "incomplete_targets": ["001TST01"]})
    );
    let log = essctl(&essd, &["--json", "log"]).json();
    let withdraw = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "flashcopy.withdraw")
        .cloned()
        .unwrap_or_else(|| panic!("no withdraw event in {log}"));
    assert!(
        withdraw["detail"]
            .as_str()
            .unwrap()
            .contains("target 001TST01 is incomplete"),
        "{withdraw}"
    );
    assert!(withdraw["duration_ms"].is_number());
    // The mark survives a restart.
    assert_eq!(essd.stop().code(), Some(0));
    let essd = Essd::start_in(dir.path(), &config());
    let v = essctl(&essd, &["--json", "volume", "show", "001TST01"]).json();
    assert_eq!(v["incomplete"], true);
    assert_eq!(essd.stop().code(), Some(0));
}

//! Consistency groups: writes held (not failed) from the first failure to
//! the freeze or the timeout, terminate, suspend, stop and restart while a
//! group holds, and failover/failback of a group's pairs.

use super::*;

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

#[test]
fn consistency_group_holds_writes_until_freeze() {
    let s = Sites::start("pprc-group", |cfg| {
        cfg.lss_extra = vec![
            (
                0x10,
                "consistency_group = true\nconsistency_timeout = \"8s\"".into(),
            ),
            (
                0x11,
                "consistency_group = true\nconsistency_timeout = \"8s\"".into(),
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
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg(script.path())
            .args([a.uri(&v1), a.uri(&v2)])
            .args([(earlier as char).to_string(), (later as char).to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_group(a, "holding");
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: the writes were not held"
        );
        if freeze {
            freeze_suspends(a, 2);
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("A ") && text.contains("\nB "), "{text}");
        let waited = started.elapsed();
        if freeze {
            // Released by the freeze, before the consistency timeout.
            assert!(waited < Duration::from_secs(8), "{waited:?}");
        } else {
            // Released by the 8 s consistency timeout.
            assert!(waited >= Duration::from_millis(7900), "{waited:?}");
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
    wait_client(a, &v);
    std::thread::sleep(Duration::from_millis(500));
    s.proxy.drop_all();
    s.proxy.heal();
    wait_group(a, "holding");
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
    held_until_the_freeze(a, &mut w2, &v2);
    let p = show(a, &v2);
    assert_eq!(
        (p["state"].as_str(), p["reason"].as_str()),
        (Some("suspended"), Some("freeze")),
        "{p}"
    );
    // The terminated volume is an ordinary volume: writes go straight on.
    assert_eq!(try_write(a, &v1), "writable ok");
}

/// Asserts that the group of `essd` still holds the write of `writer` to
/// `volume`, the only volume whose writes it holds; then freezes the group
/// (one pair suspends) and asserts that the write completes.
fn held_until_the_freeze(essd: &Essd, writer: &mut std::process::Child, volume: &str) {
    assert_eq!(
        writer.try_wait().unwrap(),
        None,
        "{volume}'s write completed before the freeze"
    );
    let g = essctl_json(essd, &["pprc", "group"]);
    assert_eq!(g["group"]["state"], "holding", "{g}");
    assert_eq!(g["volumes"], serde_json::json!([volume]), "{g}");
    freeze_suspends(essd, 1);
    assert_eq!(
        wait_child(writer, 10),
        Some(true),
        "{volume}'s write after the freeze"
    );
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
    wait_client(a, &v);
    std::thread::sleep(Duration::from_millis(500));
    s.proxy.drop_all();
    s.proxy.heal();
    wait_group(a, "holding");
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
    // Not held for the group's 60 s consistency timeout.
    assert!(took < Duration::from_secs(20), "failback took {took:?}");
    assert_eq!(
        wait_child(&mut w1, 10),
        Some(true),
        "the write held on the old primary"
    );
    wait_duplex(b, &s1);
    // The secondary's side is told in the background.
    wait_sides_agree(b, &s1, a, &v1, "failed back");
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
    held_until_the_freeze(a, &mut w2, &v2);
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

/// A consistency group that every pair leaves while it holds writes —
/// site B took over every volume of the group and failed them back to A,
/// whose links were lost — holds nothing any more: it is normal again at
/// once, and a pair that joins it later (the failover at A of the switch
/// back) takes host writes at once, not after the consistency timeout.
#[test]
fn a_holding_group_that_every_pair_left_holds_no_pair_that_joins_later() {
    let (s, va, vb) = group_of_two("pprc-group-emptied", "60s");
    let (a, b) = (&s.a, &s.b);
    s.proxy.drop_all();
    let mut held = spawn_write(a, &va[0], TRACK, 0xE1);
    wait_group(a, "holding");

    // Site B takes over every volume of the group and fails back to A.
    for v in &vb {
        let p = essctl_json(b, &["pprc", "failover", v]);
        assert_eq!(p["reason"], "failover", "{p}");
    }
    path(b, "0x10", "TSTA1", "0x10", "1");
    path(b, "0x11", "TSTA1", "0x11", "1");
    for v in &vb {
        let p = essctl_json(b, &["pprc", "failback", v]);
        assert_eq!(p["role"], "primary", "{p}");
    }
    assert_eq!(wait_child(&mut held, 10), Some(true), "the held write");
    let g = essctl_json(a, &["pprc", "group"]);
    assert_eq!(
        (g["group"]["state"].as_str(), &g["volumes"]),
        (Some("normal"), &serde_json::json!([])),
        "the group no pair is left in: {g}"
    );
    for v in &vb {
        wait_duplex(b, v);
    }

    // The switch back: failover at A, where hosts write at once.
    for v in &va {
        let p = essctl_json(a, &["pprc", "failover", v]);
        assert_eq!(
            (p["state"].as_str(), p["reason"].as_str()),
            (Some("suspended"), Some("failover")),
            "{p}"
        );
    }
    let mut w = spawn_write(a, &va[1], TRACK, 0xE2);
    assert_eq!(
        wait_child(&mut w, 10),
        Some(true),
        "a write after the switch back's failover: {}",
        essctl_json(a, &["pprc", "group"])
    );
}

/// Writes `0xE1` × 4096 at `argv[2]` and, the moment it is acknowledged,
/// kills the server whose pid is `argv[3]` (no flush: the
/// acknowledgement is what counts).
const WRITE_THEN_KILL: &str = r#"
import nbd, os, signal, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\xe1" * 4096, int(sys.argv[2]))
os.kill(int(sys.argv[3]), signal.SIGKILL)
print("killed", flush=True)
"#;

/// The primary's server crashes the moment a write held by its
/// consistency group is acknowledged — released by `essctl pprc freeze`,
/// or by the consistency timeout. The freeze's suspensions were recorded
/// before that write was released: after the restart the pairs stay
/// suspended (reason `freeze`) and the secondaries keep the frozen image,
/// rather than resynchronising by themselves as after a crash of
/// mirroring pairs.
#[test]
fn a_crash_right_after_a_freeze_releases_held_writes_keeps_the_frozen_image() {
    for by_timeout in [false, true] {
        let timeout = if by_timeout { "3s" } else { "60s" };
        let (mut s, [v1, v2], [s1, s2]) = group_of_two("pprc-freeze-crash", timeout);
        write_tracks(&s.a, &v2, 3, 4);
        let frozen = [volume_sha(&s.b, &s1), volume_sha(&s.b, &s2)];
        s.proxy.drop_all();
        let writer = spawn_script_at(WRITE_THEN_KILL, &s.a, &v1, TRACK, s.a.pid() as u64);
        wait_group(&s.a, "holding");
        if !by_timeout {
            // Its answer may be lost in the crash.
            let _ = essctl_async(&s.a, &["pprc", "freeze"]);
        }
        let out = writer.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "killed\n",
            "timeout {by_timeout}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.a.crash();
        // The link is back: pairs recorded as mirroring would resume.
        s.proxy.heal();
        s.a.restart("TSTA1");
        std::thread::sleep(Duration::from_secs(4));
        for v in [&v1, &v2] {
            let p = show(&s.a, v);
            assert_eq!(
                (p["state"].as_str(), p["reason"].as_str()),
                (Some("suspended"), Some("freeze")),
                "released by the timeout {by_timeout}: {p}"
            );
        }
        assert_eq!(
            [volume_sha(&s.b, &s1), volume_sha(&s.b, &s2)],
            frozen,
            "released by the timeout {by_timeout}: the secondaries lost the frozen image"
        );
        assert_eq!(block_at(&s.a, &v1, TRACK), vec![0xE1; 4096]);
        for (v, sv) in [(&v1, &s1), (&v2, &s2)] {
            resume_to_equal(&s, v, sv, &format!("released by the timeout {by_timeout}"));
        }
    }
}

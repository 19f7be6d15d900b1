//! FlashCopy and PPRC together: a FlashCopy target as a PPRC primary, a
//! PPRC secondary as a FlashCopy source, and the redbook's asynchronous
//! PPRC with FlashCopy procedure.

use super::*;

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
    wait_client(a, &v1);
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
    wait_client(a, &v1);
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

/// A withdraw of S:T held up (S's host write waits on a stalled link) while
/// a PPRC pair of T is established: before, the withdraw had found T no
/// primary, the pair attached meanwhile and copied T0 to its secondary,
/// and the withdraw then left T reading its own pre-T0 data — a duplex
/// pair with different volumes. Now the establish is refused while the
/// withdraw is under way (or, had it come first, the withdraw is refused):
/// never both done.
#[test]
fn a_pair_of_a_target_is_not_established_while_its_flashcopy_is_withdrawn() {
    let s = Sites::start("pprc-withdraw-vs-establish", |cfg| with_timeout(cfg, "10s"));
    let (a, b) = (&s.a, &s.b);
    let (source, target) = (a.vol(0x10, 0), a.vol(0x11, 0));
    let (secondary, other) = (b.vol(0x10, 0), b.vol(0x11, 0));
    path(a, "0x10", "TSTB2", "0x10", "1");
    essctl(
        a,
        &["pprc", "establish", &source, &secondary, "--mode", "nocopy"],
    )
    .ok();
    wait_duplex(a, &source);
    path(a, "0x11", "TSTB2", "0x11", "1");
    write_tracks(a, &source, 61, 8);
    write_tracks(a, &target, 62, 8);
    let pair = format!("{source}:{target}");
    essctl(a, &["flashcopy", "establish", &pair, "--nocopy"]).ok();
    // The source's link stalls under a host write, which holds the
    // source until the 10 s timeout: the withdraw waits for it.
    s.proxy.stall_oldest();
    let mut host = spawn_write(a, &source, 3 * TRACK, 0x5C);
    wait_client(a, &source);
    std::thread::sleep(Duration::from_millis(500));
    let withdraw = essctl_async(a, &["flashcopy", "withdraw", &pair]);
    std::thread::sleep(Duration::from_millis(1500));
    let establish = essctl(a, &["pprc", "establish", &target, &other, "--mode", "copy"]);
    s.proxy.heal();
    let withdrawn = withdraw
        .recv_timeout(Duration::from_secs(60))
        .unwrap()
        .unwrap();
    assert_eq!(wait_child(&mut host, 30), Some(true), "the host's write");
    assert!(
        !(establish.code == 0 && withdrawn.status.success()),
        "both the pair of {target} and the withdraw were made"
    );
    if withdrawn.status.success() {
        establish.refused(&format!(
            "volume {target} is the target of a FlashCopy relationship being withdrawn; \
             establish the pair once the withdraw has ended"
        ));
    }
}

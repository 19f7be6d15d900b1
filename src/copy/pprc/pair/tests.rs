//! Races between the cleaner, the copier's end and host writes, against a
//! fake secondary that holds its answers to writes or flushes until told.

use super::*;
use crate::copy::pprc::group::tests::gated_record;
use crate::copy::pprc::group::GroupState;
use crate::copy::pprc::link::handshake;
use crate::copy::pprc::wire::Frame;
use crate::volume::id::Serial;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &[u8] = b"a test secret of enough bytes";
const TRACK: u64 = 64 << 10;
const TRACKS: u64 = 256;

/// A secondary that acknowledges everything, except writes or flushes
/// while told to hold them.
#[derive(Default)]
struct FakePeer {
    hold_writes: AtomicBool,
    hold_flushes: AtomicBool,
    /// Closes every link and refuses new ones (the secondary's server is
    /// gone).
    gone: AtomicBool,
    held_writes: Mutex<Vec<u64>>,
    held_flushes: Mutex<Vec<u64>>,
    writes: AtomicU64,
    flushes: AtomicU64,
    outbox: Mutex<Vec<Frame>>,
    kick: Notify,
}

impl FakePeer {
    fn answer(&self, ids: Vec<u64>, error: u32) {
        let mut out = self.outbox.lock().unwrap();
        for id in ids {
            out.push(Frame {
                id,
                message: Message::Ack { error },
            });
        }
        drop(out);
        self.kick.notify_one();
    }

    /// Answers the held writes with `error` (and holds no more).
    fn release_writes(&self, error: u32) {
        self.hold_writes.store(false, Ordering::SeqCst);
        let ids = std::mem::take(&mut *self.held_writes.lock().unwrap());
        self.answer(ids, error);
    }

    /// Answers the oldest held write (and holds the next ones still).
    fn release_oldest_write(&self) {
        let id = self.held_writes.lock().unwrap().remove(0);
        self.answer(vec![id], 0);
    }

    /// Answers the held flushes (and holds no more).
    fn release_flushes(&self) {
        self.hold_flushes.store(false, Ordering::SeqCst);
        let ids = std::mem::take(&mut *self.held_flushes.lock().unwrap());
        self.answer(ids, 0);
    }

    async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(self.clone().connection(stream));
        }
    }

    /// Closes every link and refuses new ones.
    fn vanish(&self) {
        self.gone.store(true, Ordering::SeqCst);
        self.kick.notify_waiters();
    }

    async fn connection(self: Arc<Self>, mut stream: tokio::net::TcpStream) {
        if self.gone.load(Ordering::SeqCst) {
            return;
        }
        let mut buf = BytesMut::new();
        let me = Serial::new("TSTB2").unwrap();
        if handshake(
            &mut stream,
            &mut buf,
            &me,
            None,
            SECRET,
            Duration::from_secs(5),
        )
        .await
        .is_err()
        {
            return;
        }
        loop {
            while let Ok(Some(frame)) = Frame::decode(&mut buf) {
                let id = frame.id;
                let answer = match frame.message {
                    Message::Write { .. } | Message::Zero { .. } | Message::Trim { .. } => {
                        self.writes.fetch_add(1, Ordering::SeqCst);
                        if self.hold_writes.load(Ordering::SeqCst) {
                            self.held_writes.lock().unwrap().push(id);
                            None
                        } else {
                            Some(Message::Ack { error: 0 })
                        }
                    }
                    Message::Flush { .. } => {
                        self.flushes.fetch_add(1, Ordering::SeqCst);
                        if self.hold_flushes.load(Ordering::SeqCst) {
                            self.held_flushes.lock().unwrap().push(id);
                            None
                        } else {
                            Some(Message::Ack { error: 0 })
                        }
                    }
                    Message::Control { .. } => Some(Message::Reply {
                        error: 0,
                        body: Bytes::from_static(b"{}"),
                    }),
                    _ => Some(Message::Ack { error: 0 }),
                };
                if let Some(message) = answer {
                    self.outbox.lock().unwrap().push(Frame { id, message });
                }
            }
            let frames = std::mem::take(&mut *self.outbox.lock().unwrap());
            for f in frames {
                for part in f.encode() {
                    if stream.write_all(&part).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                n = stream.read_buf(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = self.kick.notified() => {}
            }
            if self.gone.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

struct Harness {
    peer: Arc<FakePeer>,
    pair: Arc<Pair>,
    _dir: tempfile::TempDir,
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A duplex pair over one link to a fake secondary.
async fn harness() -> Harness {
    harness_with(false, false, None).await
}

/// A duplex pair over one link to a fake secondary, in critical mode
/// (`critical`, `heavy`) and consistency group `group` as given.
async fn harness_with(
    critical: bool,
    heavy: bool,
    group: Option<Arc<ConsistencyGroup>>,
) -> Harness {
    harness_timed(critical, heavy, group, Duration::from_secs(30)).await
}

/// [`harness_with`], the secondary having `timeout` to answer.
async fn harness_timed(
    critical: bool,
    heavy: bool,
    group: Option<Arc<ConsistencyGroup>>,
    timeout: Duration,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = Arc::new(FakePeer::default());
    tokio::spawn(peer.clone().serve(listener));
    std::fs::create_dir_all(dir.path().join("pprc")).unwrap();
    std::fs::write(
        dir.path().join("pprc/paths.json"),
        r#"[{"lss":16,"peer":"TSTB2","peer_lss":16,"links":1}]"#,
    )
    .unwrap();
    let log = Arc::new(crate::control::log::EventLog::open(dir.path()).unwrap());
    let paths = Arc::new(
        PathManager::open(
            dir.path(),
            Serial::new("TSTA1").unwrap(),
            vec![0x10],
            vec![(Serial::new("TSTB2").unwrap(), addr)],
            Some(SECRET.to_vec()),
            log,
        )
        .unwrap(),
    );
    let p = paths.clone();
    wait_until("the link", move || {
        p.route(0x10, "TSTB2", 0x10).is_some_and(|r| r.live() > 0)
    })
    .await;
    let engine = crate::io::Engine::start(crate::config::IoEngineChoice::Threads).unwrap();
    let data = dir.path().join("data");
    let probe = BackingStore::probe(&data, Some(TRACK * TRACKS), false, false).unwrap();
    let store = Arc::new(BackingStore::open(&data, probe, false, false, engine).unwrap());
    let oos = TrackBitmap::create(&dir.path().join("v.oos"), TRACK, TRACKS).unwrap();
    let pair = Arc::new(Pair::new(
        PairSpec {
            volume: "000TSTA1".into(),
            peer: "TSTB2".into(),
            peer_volume: "000TSTB2".into(),
            lss: 0x10,
            peer_lss: 0x10,
            critical,
        },
        store,
        TRACK,
        oos,
        Status {
            state: PairState::Duplex,
            reason: None,
            detail: None,
            since: SystemTime::now(),
            copy_started: None,
            copy_completed: None,
            write_inhibited: false,
        },
        PairEnv {
            paths,
            timeout,
            heavy,
            group: group.clone(),
            changed: Arc::new(Notify::new()),
        },
    ));
    if let Some(g) = group {
        g.join(&pair);
    }
    Harness {
        peer,
        pair,
        _dir: dir,
    }
}

/// A host write of 4 KiB into `track` (the local part does nothing).
fn write(pair: &Arc<Pair>, track: u64) -> tokio::task::JoinHandle<Result<(), VolumeError>> {
    let pair = pair.clone();
    tokio::spawn(async move {
        pair.mirror(
            VolumeOp::Write,
            track * TRACK,
            4096,
            Change::Write(Bytes::from(vec![7u8; 4096]), false),
            |_| async { Ok(()) },
        )
        .await
    })
}

/// Starts a write of `track` that the secondary holds, and waits until it
/// is the secondary's `nth` write.
async fn a_write_held_at_the_secondary(
    h: &Harness,
    track: u64,
    nth: u64,
) -> tokio::task::JoinHandle<Result<(), VolumeError>> {
    h.peer.hold_writes.store(true, Ordering::SeqCst);
    let w = write(&h.pair, track);
    let peer = h.peer.clone();
    wait_until("the write at the secondary", move || {
        peer.writes.load(Ordering::SeqCst) == nth
    })
    .await;
    w
}

/// A critical pair (`heavy` or not) of a consistency group whose write of
/// track 5 failed at the secondary (EIO) while its link stayed up: the
/// group now holds writes. Returns the group, the harness and the write.
async fn a_group_holding_after_a_failed_write(
    heavy: bool,
) -> (
    Arc<ConsistencyGroup>,
    Harness,
    tokio::task::JoinHandle<Result<(), VolumeError>>,
) {
    let group = ConsistencyGroup::new(Duration::from_secs(60));
    let h = harness_with(true, heavy, Some(group.clone())).await;
    let failed = a_write_held_at_the_secondary(&h, 5, 1).await;
    h.peer.release_writes(crate::nbd::proto::errno::EIO);
    let g = group.clone();
    wait_until("the group holding writes", move || {
        matches!(g.state(), GroupState::Holding { .. })
    })
    .await;
    (group, h, failed)
}

/// A pass that returns early (nothing it may clear yet) flips the
/// cleaning epoch without waiting for the writes of the old one; the
/// next pass then waits only for the other epoch's writes and clears
/// the mark of a write still in flight. When that write then fails on
/// the secondary it is acknowledged on the primary alone, unrecorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_keeps_its_mark_across_two_cleaning_passes() {
    let h = harness().await;
    let w = a_write_held_at_the_secondary(&h, 5, 1).await;
    assert_eq!(h.pair.marked(), 1);
    // Two periodic passes while the write is in flight.
    let passes = {
        let pair = h.pair.clone();
        tokio::spawn(async move {
            pair.clean(true).await.unwrap();
            pair.clean(true).await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let marked_in_flight = h.pair.marked();
    // The secondary fails the write: the pair suspends, and the host
    // gets success (not critical) for a write only the primary has.
    h.peer.release_writes(crate::nbd::proto::errno::EIO);
    w.await.unwrap().unwrap();
    passes.await.unwrap();
    assert_eq!(h.pair.state(), PairState::Suspended);
    assert_eq!(
        (marked_in_flight, h.pair.marked(), h.pair.oos().get(5)),
        (1, 1, true),
        "the track of a write acknowledged on the primary alone is not recorded"
    );
}

/// Writes track 10 and cleans (clearable now, written before the pass),
/// then starts a periodic pass and returns it held at its secondary
/// flush.
async fn a_pass_held_at_its_flush(
    h: &Harness,
) -> tokio::task::JoinHandle<Result<u64, super::Failure>> {
    write(&h.pair, 10).await.unwrap().unwrap();
    h.pair.clean(true).await.unwrap();
    h.peer.hold_flushes.store(true, Ordering::SeqCst);
    let periodic = {
        let pair = h.pair.clone();
        tokio::spawn(async move { pair.clean(true).await })
    };
    let peer = h.peer.clone();
    wait_until("the periodic pass's flush", move || {
        peer.flushes.load(Ordering::SeqCst) == 1
    })
    .await;
    periodic
}

/// Two cleaning passes at once (the periodic one, and the copier's last
/// or a manual suspend's): the second resets what the first relies on
/// (`touched`, `recent`, the epoch), so the first clears the mark of a
/// write that began between them and is still in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_cleaning_passes_keep_the_mark_of_a_write_in_flight() {
    let h = harness().await;
    let periodic = a_pass_held_at_its_flush(&h).await;
    let w = a_write_held_at_the_secondary(&h, 20, 2).await;
    let other = {
        let pair = h.pair.clone();
        tokio::spawn(async move { pair.clean(false).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.peer.release_flushes();
    periodic.await.unwrap().unwrap();
    let marked_in_flight = h.pair.oos().get(20);
    h.peer.release_writes(crate::nbd::proto::errno::EIO);
    w.await.unwrap().unwrap();
    other.await.unwrap().unwrap();
    assert_eq!(h.pair.state(), PairState::Suspended);
    assert!(
        marked_in_flight && h.pair.oos().get(20),
        "the track of a write acknowledged on the primary alone is not recorded \
         (marked while in flight: {marked_in_flight})"
    );
}

/// A cleaning pass that started while the pair was duplex goes on after
/// it suspends, and clears the marks that writes made on the primary
/// alone meanwhile (they do not count as touched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_running_when_the_pair_suspends_keeps_the_marks_of_suspended_writes() {
    let h = harness().await;
    let periodic = a_pass_held_at_its_flush(&h).await;
    h.pair.suspend(SuspendReason::Manual, None);
    // A write on the primary alone: recorded durably, then made.
    write(&h.pair, 30).await.unwrap().unwrap();
    assert!(h.pair.oos().get(30) && h.pair.oos().is_durable(30));
    h.peer.release_flushes();
    periodic.await.unwrap().unwrap();
    assert!(
        h.pair.oos().get(30) && h.pair.oos().is_durable(30),
        "a track written on the primary alone while suspended is no longer recorded"
    );
}

/// Critical heavy mode in a consistency group: the secondary cannot be
/// updated, the group holds the write until the freeze, which suspends the
/// pair (reason `freeze`). The primary must still be write-inhibited — the
/// write that could not be mirrored answered `EIO`, and a write held by the
/// group meanwhile too — not left writable because the freeze came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_heavy_in_a_consistency_group_inhibits_writes_after_the_freeze() {
    let (group, h, failed) = a_group_holding_after_a_failed_write(true).await;
    let held = write(&h.pair, 6);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!failed.is_finished() && !held.is_finished());
    assert_eq!(group.freeze().await, 1);
    let failed = failed.await.unwrap();
    let held = held.await.unwrap();
    assert_eq!(h.pair.state(), PairState::Suspended);
    assert!(
        matches!(failed, Err(VolumeError::WriteInhibited { .. }))
            && matches!(held, Err(VolumeError::WriteInhibited { .. }))
            && h.pair.write_inhibited(),
        "critical heavy pair writable after the freeze: the write that failed {failed:?}, \
         the held one {held:?}, inhibited {}",
        h.pair.write_inhibited()
    );
    assert!(matches!(
        write(&h.pair, 7).await.unwrap(),
        Err(VolumeError::WriteInhibited { .. })
    ));
}

/// A suspended primary of a consistency group with a write to track 5
/// made locally, then held: another pair of the group failed while the
/// write was between its local write and its reply.
async fn a_held_write_to_a_suspended_group_primary() -> (
    Arc<ConsistencyGroup>,
    Harness,
    tokio::task::JoinHandle<Result<(), VolumeError>>,
) {
    let group = ConsistencyGroup::new(Duration::from_secs(60));
    let h = harness_with(false, false, Some(group.clone())).await;
    h.pair.suspend(SuspendReason::Manual, None);
    let (in_local, mut reached) = tokio::sync::mpsc::channel::<()>(1);
    let go = Arc::new(Notify::new());
    let w = {
        let (pair, go) = (h.pair.clone(), go.clone());
        tokio::spawn(async move {
            pair.mirror(
                VolumeOp::Write,
                5 * TRACK,
                4096,
                Change::Write(Bytes::from(vec![7u8; 4096]), false),
                |_| async move {
                    let _ = in_local.send(()).await;
                    go.notified().await;
                    Ok(())
                },
            )
            .await
        })
    };
    reached.recv().await.unwrap();
    // Another pair of the group cannot update its secondary.
    group.hold("001TSTA1", "link lost");
    go.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    (group, h, w)
}

/// A write to a suspended primary of a consistency group, made locally
/// when another pair of the group fails, is held like every write of the
/// group: it completes only after the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_suspended_group_primary_does_not_complete_while_the_group_holds() {
    let (group, h, w) = a_held_write_to_a_suspended_group_primary().await;
    assert!(
        !w.is_finished(),
        "a write to a group primary completed while the group holds writes"
    );
    group.freeze().await;
    w.await.unwrap().unwrap();
    assert!(h.pair.oos().get(5) && h.pair.oos().is_durable(5));
}

/// Critical volume mode (not heavy) in a consistency group: the secondary
/// answers an error while the link is up, so the pair is not inhibited and
/// the group's freeze suspends it (reason `freeze`). Once the last link of
/// its path is lost too, the primary must be write-inhibited, as it is for
/// the same pair outside a group — the freeze's reason must not hide that
/// this pair could not update its secondary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_group_pair_is_inhibited_once_its_last_link_is_lost_after_the_freeze() {
    let (group, h, failed) = a_group_holding_after_a_failed_write(false).await;
    assert_eq!(group.freeze().await, 1);
    // The link is still up: suspended, not inhibited.
    failed.await.unwrap().unwrap();
    assert!(!h.pair.write_inhibited());
    write(&h.pair, 6).await.unwrap().unwrap();
    // The last (only) link of the path is lost.
    h.peer.vanish();
    let route = h.pair.route().unwrap();
    wait_until("the link down", move || route.live() == 0).await;
    let after = write(&h.pair, 7).await.unwrap();
    assert!(
        matches!(after, Err(VolumeError::WriteInhibited { .. })) && h.pair.write_inhibited(),
        "critical pair that could not update its secondary is writable with no live link \
         left: {after:?}"
    );
}

/// A resume of a suspended group primary while one of its writes, made
/// locally, is held by the group (another pair failed): the write's change
/// is made and marked, so the resume need not wait for the freeze (or the
/// whole consistency timeout); the write itself still completes only after
/// the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_does_not_wait_for_a_held_write_to_a_suspended_group_primary() {
    let (group, h, w) = a_held_write_to_a_suspended_group_primary().await;
    assert!(!w.is_finished());
    let resumed = tokio::time::timeout(
        Duration::from_secs(5),
        h.pair.start_mirroring(PairState::DuplexPending),
    )
    .await;
    assert!(
        resumed.is_ok(),
        "the resume of a suspended group primary waits for the group's freeze while one of \
         its writes, made locally, is held"
    );
    assert_eq!(h.pair.state(), PairState::DuplexPending);
    assert!(h.pair.oos().get(5) && h.pair.oos().is_durable(5));
    assert!(
        !w.is_finished(),
        "a write to a group primary completed while the group holds writes"
    );
    // The freeze suspends the resumed pair with the others and releases
    // the write.
    assert_eq!(group.freeze().await, 1);
    w.await.unwrap().unwrap();
    assert_eq!(h.pair.state(), PairState::Suspended);
    assert!(h.pair.oos().get(5));
}

/// A flush that fails on the primary of a duplex pair of a consistency
/// group holds the group's writes, as a failure at the secondary does:
/// it is answered (with its error) only after the freeze, which suspends
/// the pair with the written track still marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_fails_on_a_group_primary_holds_the_group_until_the_freeze() {
    let group = ConsistencyGroup::new(Duration::from_secs(60));
    let h = harness_with(false, false, Some(group.clone())).await;
    write(&h.pair, 5).await.unwrap().unwrap();
    let flush = {
        let pair = h.pair.clone();
        tokio::spawn(async move {
            pair.flush(async {
                Err(VolumeError::Io {
                    op: VolumeOp::Flush,
                    path: "data".into(),
                    offset: 0,
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                })
            })
            .await
        })
    };
    let g = group.clone();
    wait_until("the group holding writes", move || {
        matches!(g.state(), GroupState::Holding { .. })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !flush.is_finished(),
        "the failed flush was answered before the freeze"
    );
    assert_eq!(group.freeze().await, 1);
    let answer = flush.await.unwrap();
    assert!(matches!(answer, Err(VolumeError::Io { .. })), "{answer:?}");
    assert_eq!(h.pair.status().reason, Some(SuspendReason::Freeze));
    assert!(h.pair.oos().get(5));
}

/// An operator resumes a group pair in the moment between the freeze's
/// suspensions and the release of the held writes (while the freeze
/// records the suspensions): the write that failed and was held goes on
/// when released, its track still marked for the resync, and leaves the
/// resumed pair mirroring — it must not suspend the pair again for the
/// failure the freeze already handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_resumed_before_its_held_write_is_released_stays_resumed() {
    let (group, h, failed) = a_group_holding_after_a_failed_write(false).await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let recorded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    group.set_record(gated_record(gate, recorded.clone(), Ok(())));
    let freeze = {
        let group = group.clone();
        tokio::spawn(async move { group.freeze().await })
    };
    let pair = h.pair.clone();
    wait_until("the freeze's suspension", move || {
        pair.state() == PairState::Suspended
    })
    .await;
    assert!(!failed.is_finished(), "released before the record");
    h.peer.hold_writes.store(false, Ordering::SeqCst);
    h.pair.start_mirroring(PairState::DuplexPending).await;
    open.send(true).unwrap();
    assert_eq!(freeze.await.unwrap(), 1);
    assert_eq!(recorded.load(Ordering::SeqCst), 1);
    failed.await.unwrap().unwrap();
    let status = h.pair.status();
    assert_eq!(
        (status.state, status.reason),
        (PairState::DuplexPending, None),
        "the released write undid the resume: {:?}",
        status.detail
    );
    assert!(h.pair.oos().get(5) && h.pair.oos().is_durable(5));
    write(&h.pair, 6).await.unwrap().unwrap();
    assert_eq!(h.pair.state(), PairState::DuplexPending);
}

/// A write queued behind another on a link that answers that one is
/// given more time than the timeout: the pair stays duplex. A write the
/// secondary never answers fails after the timeout, although the link
/// answers its heartbeats (every 2 s) meanwhile: the pair suspends then,
/// not four timeouts later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_behind_answered_ones_waits_longer_and_a_hung_one_does_not() {
    let timeout = Duration::from_secs(3);
    let h = harness_timed(false, false, None, timeout).await;
    let first = a_write_held_at_the_secondary(&h, 1, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = a_write_held_at_the_secondary(&h, 2, 2).await;
    // Answered before its timeout; the second's passes at 4.5 s.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    h.peer.release_oldest_write();
    first.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.pair.state(), PairState::Duplex);
    h.peer.release_oldest_write();
    second.await.unwrap().unwrap();
    assert_eq!(h.pair.state(), PairState::Duplex);

    let started = Instant::now();
    let hung = a_write_held_at_the_secondary(&h, 3, 3).await;
    hung.await.unwrap().unwrap();
    let waited = started.elapsed();
    assert_eq!(h.pair.state(), PairState::Suspended);
    assert_eq!(h.pair.status().reason, Some(SuspendReason::LinkLost));
    assert!(
        waited >= timeout && waited < timeout + Duration::from_millis(1500),
        "the hung write failed after {waited:?}"
    );
}

/// A suspend while the copier's copies are in flight, then a resume: the
/// resume waits until that copier has ended, and the new activation's copy
/// starts from the first track. The old copier's late answers would
/// otherwise move the new cursor, below which cleaning passes clear marks
/// the new copy has not reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_waits_for_the_last_copier_and_starts_its_copy_from_the_first_track() {
    let h = harness().await;
    h.pair.suspend(SuspendReason::Manual, None);
    for track in [0, 1, 2, 3, 100] {
        write(&h.pair, track).await.unwrap().unwrap();
    }
    assert_eq!(h.pair.marked(), 5);
    let engine = crate::io::Engine::start(crate::config::IoEngineChoice::Threads).unwrap();
    // The copier reads through a volume (what it reads does not matter
    // here): one of the same size beside the pair's.
    let data = h._dir.path().join("copied");
    let probe = BackingStore::probe(&data, Some(TRACK * TRACKS), false, false).unwrap();
    let volume = Arc::new(Volume::new(
        crate::volume::VolumeInfo {
            id: crate::volume::id::VolumeId::new(0x10, 0, Serial::new("TSTA1").unwrap()).unwrap(),
            alias: None,
            description: None,
            read_only: false,
        },
        BackingStore::open(&data, probe, false, false, engine).unwrap(),
    ));
    // Resumed with the secondary holding the copies, then suspended.
    h.peer.hold_writes.store(true, Ordering::SeqCst);
    h.pair.start_mirroring(PairState::DuplexPending).await;
    h.pair.spawn_copier(volume.clone(), h.pair.restart_tasks());
    let peer = h.peer.clone();
    wait_until("both runs held at the secondary", move || {
        peer.writes.load(Ordering::SeqCst) == 2
    })
    .await;
    h.pair.suspend(SuspendReason::Manual, None);
    let ended = {
        let pair = h.pair.clone();
        tokio::spawn(async move { pair.await_copier_ended().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !ended.is_finished(),
        "the resume did not wait for the copier"
    );
    // The held copies are answered: the last copier settles its cursor.
    h.peer.release_writes(0);
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the copier ended")
        .unwrap();
    assert_eq!(h.pair.cursor.load(Ordering::Acquire), 101);
    h.pair.start_mirroring(PairState::DuplexPending).await;
    assert_eq!(
        h.pair.cursor.load(Ordering::Acquire),
        0,
        "the resync's copy starts where the last one stopped"
    );
}

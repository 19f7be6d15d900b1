//! The FlashCopy data path against a byte-level model: random host writes,
//! zeroes and trims on source and target, reads through the target, with
//! and without a concurrent background copier, on both I/O engines.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::config::IoEngineChoice;
use crate::copy::bitmap::TrackBitmap;
use crate::io::Engine;
use crate::volume::store::BackingStore;

const TRACK: u64 = 4096;
const SIZE: u64 = 16 * TRACK + 1000; // a partial last track

fn store(dir: &Path, name: &str, size: u64, engine: &Engine) -> Arc<BackingStore> {
    let path = dir.join(name);
    let probe = BackingStore::probe(&path, Some(size), false, false).unwrap();
    Arc::new(BackingStore::open(&path, probe, false, false, engine.clone()).unwrap())
}

/// A relationship over `tracks` tracks with its bitmap in `dir`.
fn relationship(
    dir: &Path,
    source: Arc<BackingStore>,
    target: Arc<BackingStore>,
    mode: CopyMode,
    rate: u64,
    tracks: u64,
) -> Relationship {
    let bitmap = TrackBitmap::create(&dir.join("bm"), TRACK, tracks).unwrap();
    Relationship::new(
        "S".into(),
        "T".into(),
        source,
        target,
        mode,
        rate,
        SystemTime::now(),
        TRACK,
        bitmap,
    )
}

#[derive(Debug, Clone)]
enum Op {
    Write(Role, u64, usize, u8),
    Zero(Role, u64, u64, bool),
    Trim(Role, u64, u64),
    ReadTarget(u64, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let role = prop_oneof![Just(Role::Source), Just(Role::Target)];
    prop_oneof![
        4 => (role.clone(), 0..SIZE - 1, 1usize..3 * TRACK as usize, any::<u8>())
            .prop_map(|(r, o, n, s)| Op::Write(r, o, n.min((SIZE - o) as usize), s)),
        1 => (role.clone(), 0..SIZE - 1, 1u64..3 * TRACK, any::<bool>())
            .prop_map(|(r, o, n, p)| Op::Zero(r, o, n.min(SIZE - o), p)),
        1 => (role, 0..SIZE - 1, 1u64..3 * TRACK).prop_map(|(r, o, n)| Op::Trim(r, o, n.min(SIZE - o))),
        2 => (0..SIZE - 1, 1usize..3 * TRACK as usize).prop_map(|(o, n)| Op::ReadTarget(o, n.min((SIZE - o) as usize))),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

async fn scenario(
    engine: Engine,
    ops: Vec<Op>,
    mode: CopyMode,
    rate: u64,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let source = store(dir.path(), "src", SIZE, &engine);
    // The target is larger than the source; the tail is outside the relationship.
    let target = store(dir.path(), "tgt", SIZE + 2 * TRACK, &engine);
    let t0 = pattern(SIZE as usize, 7);
    source
        .write(0, Bytes::from(t0.clone()), false)
        .await
        .unwrap();
    // Leave a hole in the source at T0 and junk on the target.
    source
        .write_zeroes(4 * TRACK, 2 * TRACK, true, false)
        .await
        .unwrap();
    target
        .write(
            0,
            Bytes::from(vec![0xEE; (SIZE + 2 * TRACK) as usize]),
            false,
        )
        .await
        .unwrap();
    let mut model_src = t0.clone();
    model_src[4 * TRACK as usize..6 * TRACK as usize].fill(0);
    let mut model_tgt = model_src.clone();
    model_tgt.extend(vec![0xEE; 2 * TRACK as usize]);

    let tracks = SIZE.div_ceil(TRACK);
    let rel = Arc::new(relationship(
        dir.path(),
        source.clone(),
        target.clone(),
        mode,
        rate,
        tracks,
    ));
    let copier = (mode == CopyMode::Copy).then(|| tokio::spawn(copier::run(rel.clone())));

    for op in &ops {
        match *op {
            Op::Write(role, off, len, seed) => {
                let data = pattern(len, seed);
                rel.modify(
                    role,
                    off,
                    len as u64,
                    Change::Write(Bytes::from(data.clone()), seed % 5 == 0),
                )
                .await
                .unwrap();
                let m = if role == Role::Source {
                    &mut model_src
                } else {
                    &mut model_tgt
                };
                m[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Zero(role, off, len, punch) => {
                rel.modify(role, off, len, Change::Zero(punch, false, false))
                    .await
                    .unwrap();
                let m = if role == Role::Source {
                    &mut model_src
                } else {
                    &mut model_tgt
                };
                m[off as usize..(off + len) as usize].fill(0);
            }
            Op::Trim(role, off, len) => {
                rel.modify(role, off, len, Change::Trim).await.unwrap();
                let m = if role == Role::Source {
                    &mut model_src
                } else {
                    &mut model_tgt
                };
                m[off as usize..(off + len) as usize].fill(0);
            }
            Op::ReadTarget(off, len) => {
                let got = rel.read(Role::Target, off, len).await.unwrap();
                prop_assert_eq!(&got[..], &model_tgt[off as usize..off as usize + len]);
            }
        }
    }
    let src_now = rel.read(Role::Source, 0, SIZE as usize).await.unwrap();
    prop_assert_eq!(&src_now[..], &model_src[..]);
    let tgt_now = rel
        .read(Role::Target, 0, (SIZE + 2 * TRACK) as usize)
        .await
        .unwrap();
    prop_assert_eq!(&tgt_now[..], &model_tgt[..]);
    // Block status through the target agrees with its content: every hole reads as zeroes.
    let extents = rel.extents(Role::Target, 0, SIZE, 4096).await.unwrap();
    let mut pos = 0u64;
    for e in &extents {
        if e.hole {
            prop_assert!(tgt_now[pos as usize..(pos + e.length) as usize]
                .iter()
                .all(|&b| b == 0));
        }
        pos += e.length;
    }
    prop_assert_eq!(pos, SIZE);
    if let Some(copier) = copier {
        prop_assert_eq!(copier.await.unwrap(), copier::CopierEnd::Complete);
        // Every track is on the target itself now.
        let raw = target.read(0, (SIZE + 2 * TRACK) as usize).await.unwrap();
        prop_assert_eq!(&raw[..], &model_tgt[..]);
    }
    // No track was copied twice.
    prop_assert!(rel.copies() <= tracks);
    // The durable bitmap equals the in-memory one after the last commit.
    rel.commit().await.unwrap();
    let reopened = TrackBitmap::open(&dir.path().join("bm"), TRACK, tracks).unwrap();
    for t in 0..tracks {
        prop_assert_eq!(reopened.get(t), rel.bitmap().get(t), "track {}", t);
    }
    Ok(())
}

fn run(ops: Vec<Op>, mode: CopyMode, rate: u64) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for choice in [IoEngineChoice::Uring, IoEngineChoice::Threads] {
            let engine = Engine::start(choice).unwrap();
            scenario(engine, ops.clone(), mode, rate).await?;
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn nocopy_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, CopyMode::NoCopy, 0)?;
    }

    #[test]
    fn copy_with_racing_copier_matches_model(ops in proptest::collection::vec(op(), 1..60), slow in any::<bool>()) {
        // A slow copier (64 KiB/s) interleaves with host I/O track by track.
        run(ops, CopyMode::Copy, if slow { 64 << 10 } else { 0 })?;
    }
}

/// A NOCOPY relationship in `dir` of two 8-track volumes, the source all
/// ones.
async fn nocopy_of_ones(dir: &Path) -> Relationship {
    let engine = Engine::start(IoEngineChoice::Uring).unwrap();
    let source = store(dir, "src", 8 * TRACK, &engine);
    let target = store(dir, "tgt", 8 * TRACK, &engine);
    source
        .write(0, Bytes::from(vec![1u8; 8 * TRACK as usize]), false)
        .await
        .unwrap();
    relationship(dir, source, target, CopyMode::NoCopy, 0, 8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_track_target_write_skips_the_copy_and_source_tracks_copy_once() {
    let dir = tempfile::tempdir().unwrap();
    let rel = nocopy_of_ones(dir.path()).await;
    rel.modify(
        Role::Target,
        TRACK,
        TRACK,
        Change::Write(Bytes::from(vec![2u8; TRACK as usize]), false),
    )
    .await
    .unwrap();
    assert_eq!(rel.copies(), 0, "a whole-track target write copies nothing");
    assert!(rel.bitmap().get(1));
    for _ in 0..3 {
        rel.modify(
            Role::Source,
            0,
            10,
            Change::Write(Bytes::from_static(b"0123456789"), false),
        )
        .await
        .unwrap();
    }
    assert_eq!(rel.copies(), 1, "track 0 is copied once");
    assert_eq!(
        &rel.read(Role::Target, 0, 10).await.unwrap()[..],
        &[1u8; 10]
    );
    assert_eq!(
        &rel.read(Role::Target, TRACK, 4).await.unwrap()[..],
        &[2u8; 4]
    );
    // Untouched tracks are served from the source.
    assert_eq!(
        &rel.read(Role::Target, 5 * TRACK, 4).await.unwrap()[..],
        &[1u8; 4]
    );
    assert_eq!(rel.bitmap().count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_track_is_durable_before_its_source_changes() {
    let engine = Engine::start(IoEngineChoice::Uring).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = store(dir.path(), "src", 4 * TRACK, &engine);
    let target = store(dir.path(), "tgt", 4 * TRACK, &engine);
    let rel = relationship(dir.path(), source, target, CopyMode::Copy, 0, 4);
    // As the background copier does: copy and mark, commit later.
    rel.copy_track(2).await.unwrap();
    rel.bitmap().set(2);
    assert!(!rel.bitmap().is_durable(2));
    rel.modify(
        Role::Source,
        2 * TRACK,
        10,
        Change::Write(Bytes::from_static(b"0123456789"), false),
    )
    .await
    .unwrap();
    assert!(
        rel.bitmap().is_durable(2),
        "the host write must wait for the copier's bit"
    );
    let reopened = TrackBitmap::open(&dir.path().join("bm"), TRACK, 4).unwrap();
    assert!(reopened.get(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copier_turns_large_source_holes_into_target_holes() {
    for choice in [IoEngineChoice::Uring, IoEngineChoice::Threads] {
        let engine = Engine::start(choice).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tracks = 2048u64;
        let source = store(dir.path(), "src", tracks * TRACK, &engine);
        let target = store(dir.path(), "tgt", tracks * TRACK, &engine);
        for t in [5u64, 1500, 2047] {
            source
                .write(t * TRACK, Bytes::from(vec![t as u8; TRACK as usize]), false)
                .await
                .unwrap();
        }
        for t in [100u64, 1800] {
            target
                .write(t * TRACK, Bytes::from(vec![0xEE; TRACK as usize]), false)
                .await
                .unwrap();
        }
        let rel = Arc::new(relationship(
            dir.path(),
            source.clone(),
            target.clone(),
            CopyMode::Copy,
            0,
            tracks,
        ));
        // A write inside the hole before the copier reaches it.
        rel.modify(
            Role::Source,
            300 * TRACK,
            5,
            Change::Write(Bytes::from_static(b"later"), false),
        )
        .await
        .unwrap();
        assert_eq!(copier::run(rel.clone()).await, copier::CopierEnd::Complete);
        assert_eq!(rel.copies(), tracks, "each track copied exactly once");
        let src = source.read(0, (tracks * TRACK) as usize).await.unwrap();
        let tgt = target.read(0, (tracks * TRACK) as usize).await.unwrap();
        let mut expected = src.to_vec();
        expected[(300 * TRACK) as usize..(300 * TRACK) as usize + 5].fill(0);
        assert!(
            tgt[..] == expected[..],
            "target must equal the source at T0"
        );
        // The hole stayed a hole on the target.
        let holes = target.extents(200 * TRACK, 1000 * TRACK, 16).await.unwrap();
        assert!(holes.iter().any(|e| e.hole), "{holes:?}");
    }
}

/// A source grown since T0 (a block device without a configured size,
/// restored with the bitmap of its size at T0): the tail did not exist
/// at T0 and is outside the relationship — changes there go straight to
/// their volume and the target reads its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_of_a_source_grown_since_t0_is_outside_the_relationship() {
    let engine = Engine::start(IoEngineChoice::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = store(dir.path(), "src", 6 * TRACK, &engine);
    let target = store(dir.path(), "tgt", 6 * TRACK, &engine);
    let rel = relationship(dir.path(), source, target, CopyMode::NoCopy, 0, 4);
    let data = Bytes::from(pattern(2 * TRACK as usize, 9));
    rel.modify(
        Role::Source,
        3 * TRACK,
        2 * TRACK,
        Change::Write(data.clone(), false),
    )
    .await
    .unwrap();
    rel.modify(
        Role::Target,
        5 * TRACK,
        10,
        Change::Write(Bytes::from_static(b"0123456789"), false),
    )
    .await
    .unwrap();
    assert_eq!(rel.bitmap().count(), 1, "only track 3 existed at T0");
    let target = rel
        .read(Role::Target, 3 * TRACK, 3 * TRACK as usize)
        .await
        .unwrap();
    assert_eq!(
        &target[..2 * TRACK as usize],
        &[0u8; 2 * TRACK as usize][..]
    );
    assert_eq!(&target[2 * TRACK as usize..][..10], b"0123456789");
    let source = rel
        .read(Role::Source, 3 * TRACK, 2 * TRACK as usize)
        .await
        .unwrap();
    assert_eq!(source, data);
}

/// A trim of whole uncopied target tracks on a backing that cannot
/// discard changes nothing: the tracks stay uncopied and read T0 from the
/// source, not the target's old data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_the_target_cannot_carry_out_leaves_its_tracks_reading_t0() {
    let engine = Engine::start(IoEngineChoice::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = store(dir.path(), "src", 4 * TRACK, &engine);
    let target = store(dir.path(), "tgt", 4 * TRACK, &engine);
    let t0 = Bytes::from(pattern(4 * TRACK as usize, 3));
    source.write(0, t0.clone(), false).await.unwrap();
    target
        .write(0, Bytes::from(pattern(4 * TRACK as usize, 8)), false)
        .await
        .unwrap();
    target.refuse_discards();
    let rel = relationship(dir.path(), source, target, CopyMode::NoCopy, 0, 4);
    rel.modify(Role::Target, TRACK, 2 * TRACK, Change::Trim)
        .await
        .unwrap();
    assert_eq!(rel.bitmap().count(), 0);
    let read = rel.read(Role::Target, 0, 4 * TRACK as usize).await.unwrap();
    assert!(read == t0, "the target reads other data than T0");
}

/// A fast zero must fail quickly rather than wait for copies of T0: on
/// the source over uncopied tracks, and on the target over a track it
/// covers in part, it is refused (EOPNOTSUPP) with nothing copied or
/// changed; on the target over whole tracks (no copy needed) it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_zero_that_would_copy_tracks_is_refused_before_any_copy() {
    let dir = tempfile::tempdir().unwrap();
    let rel = nocopy_of_ones(dir.path()).await;
    let fast_zero = Change::Zero(true, true, false);
    for (role, offset, len) in [(Role::Source, 0, 2 * TRACK), (Role::Target, 100, TRACK)] {
        let e = rel.modify(role, offset, len, fast_zero.clone()).await;
        assert_eq!(
            e.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EOPNOTSUPP)),
            "{role:?}"
        );
    }
    assert_eq!(rel.copies(), 0);
    assert_eq!(rel.bitmap().count(), 0);
    assert_eq!(
        &rel.read(Role::Target, 0, 2 * TRACK as usize).await.unwrap()[..],
        &vec![1u8; 2 * TRACK as usize][..]
    );
    // Whole target tracks need no copy: zeroed (a hole may be punched),
    // and no longer read from the source.
    rel.modify(Role::Target, 2 * TRACK, 2 * TRACK, fast_zero)
        .await
        .unwrap();
    assert_eq!(rel.copies(), 0);
    assert_eq!(
        &rel.read(Role::Target, 2 * TRACK, 2 * TRACK as usize)
            .await
            .unwrap()[..],
        &vec![0u8; 2 * TRACK as usize][..]
    );
}

/// A background copy whose source grew since T0 into a long hole (a block
/// device without a configured size, or a file whose size was raised
/// across a restart) copies the relationship's tracks and ends: the hole
/// beyond them is not skipped as if it were the source's (before, the
/// skip ran past the last track and punched the target's own data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_source_grown_into_a_hole_stays_within_its_tracks() {
    let engine = Engine::start(IoEngineChoice::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = store(dir.path(), "src", 1000 * TRACK, &engine);
    let target = store(dir.path(), "tgt", 1000 * TRACK, &engine);
    let tail = Bytes::from(pattern(TRACK as usize, 5));
    target.write(10 * TRACK, tail.clone(), false).await.unwrap();
    let rel = Arc::new(relationship(
        dir.path(),
        source,
        target.clone(),
        CopyMode::Copy,
        0,
        4,
    ));
    assert_eq!(copier::run(rel.clone()).await, copier::CopierEnd::Complete);
    assert_eq!(rel.copies(), 4);
    assert_eq!(target.read(10 * TRACK, TRACK as usize).await.unwrap(), tail);
}

//! The same checks against every engine, plus a differential property test
//! of io_uring against the thread pool.

use std::fs::{File, OpenOptions};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

fn engines() -> Vec<Engine> {
    vec![
        Engine::start(IoEngineChoice::Uring).expect("io_uring must be available for tests"),
        Engine::start(IoEngineChoice::Threads).unwrap(),
    ]
}

fn scratch(len: u64) -> (tempfile::TempDir, Arc<File>) {
    let dir = tempfile::tempdir().unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("disk"))
        .unwrap();
    file.set_len(len).unwrap();
    (dir, Arc::new(file))
}

async fn read_write_sync_punch(engine: &Engine) {
    let (_dir, file) = scratch(1 << 20);
    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    engine
        .write_buffered_at(&file, 4096, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    engine
        .write_at(
            &file,
            200_000,
            IoBuf::Owned(IoBuffer::copy_from(b"fua!", 1)),
            true,
        )
        .await
        .unwrap();
    let back = engine.read_at(&file, 4096, data.len(), 1).await.unwrap();
    assert_eq!(back.as_slice(), &data[..]);
    let fua = engine.read_at(&file, 200_000, 4, 4096).await.unwrap();
    assert_eq!(fua.as_slice(), b"fua!");
    engine.sync(&file, true).await.unwrap();
    engine.sync(&file, false).await.unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    engine.fallocate(&file, punch, 4096, 8192).await.unwrap();
    let zeroed = engine.read_at(&file, 4096, 8192, 1).await.unwrap();
    assert!(zeroed.as_slice().iter().all(|&b| b == 0));
    assert_eq!(file.metadata().unwrap().len(), 1 << 20);
    // Reading past end of file yields zeroes, not an error.
    let tail = engine.read_at(&file, (1 << 20) - 10, 20, 1).await.unwrap();
    assert_eq!(tail.as_slice(), &[0u8; 20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_engine_reads_writes_syncs_and_punches() {
    for engine in engines() {
        read_write_sync_punch(&engine).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_back_with_the_buffer() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, b"x").unwrap();
        let ro = Arc::new(File::open(&path).unwrap());
        let err = engine
            .write_buffered_at(&ro, 0, Bytes::from_static(b"no"), false)
            .await
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{}", engine.kind());
        // A whole-page write is done inline: same error.
        let err = engine
            .write_buffered_at(&ro, 0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{}", engine.kind());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_ops_all_complete() {
    for engine in engines() {
        let (_dir, file) = scratch(8 << 20);
        let mut tasks = Vec::new();
        for i in 0..512u64 {
            let engine = engine.clone();
            let file = file.clone();
            tasks.push(tokio::spawn(async move {
                let block = vec![(i % 256) as u8; 4096];
                engine
                    .write_buffered_at(&file, i * 4096, Bytes::from(block), false)
                    .await
                    .unwrap();
                let back = engine.read_at(&file, i * 4096, 4096, 1).await.unwrap();
                assert!(back.as_slice().iter().all(|&b| b == (i % 256) as u8));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write { offset: u64, len: usize, seed: u8 },
    Punch { offset: u64, len: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        // Whole pages (written inline) and anything else (through the engine).
        (0u64..14, 1usize..5, any::<u8>()).prop_map(|(page, pages, seed)| Step::Write {
            offset: page * 4096,
            len: pages * 4096,
            seed
        }),
        (0u64..60_000, 1usize..9000, any::<u8>()).prop_map(|(offset, len, seed)| Step::Write {
            offset,
            len,
            seed
        }),
        (0u64..60_000, 1u64..9000).prop_map(|(offset, len)| Step::Punch { offset, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Random operation sequences leave io_uring and the thread pool with
    /// byte-identical files, equal to an in-memory model.
    #[test]
    fn uring_matches_threads_and_model(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let size = 72_000usize;
            let mut model = vec![0u8; size];
            let mut images = Vec::new();
            for engine in engines() {
                let (dir, file) = scratch(size as u64);
                for s in &steps {
                    match *s {
                        Step::Write { offset, len, seed } => {
                            let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
                            engine.write_buffered_at(&file, offset, Bytes::from(data), false).await.unwrap();
                        }
                        Step::Punch { offset, len } => {
                            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                            engine.fallocate(&file, mode, offset, len).await.unwrap();
                        }
                    }
                }
                let all = engine.read_at(&file, 0, size, 1).await.unwrap();
                images.push(all.as_slice().to_vec());
                drop(dir);
            }
            for s in &steps {
                match *s {
                    Step::Write { offset, len, seed } => {
                        for i in 0..len {
                            model[offset as usize + i] = seed.wrapping_add(i as u8);
                        }
                    }
                    Step::Punch { offset, len } => {
                        let end = ((offset + len) as usize).min(size);
                        model[offset as usize..end].fill(0);
                    }
                }
            }
            prop_assert_eq!(&images[0][..], &model[..]);
            prop_assert_eq!(&images[1][..], &model[..]);
            Ok(())
        })?;
    }
}

/// A pipe as (read end, write end).
fn pipe() -> (Arc<File>, File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe() writes two fresh descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the descriptors are fresh and owned by nothing else.
    unsafe {
        (
            Arc::new(File::from_raw_fd(fds[0])),
            File::from_raw_fd(fds[1]),
        )
    }
}

/// A one-byte read of `file` through `engine`, in a task.
fn read_one(engine: &Arc<uring::UringEngine>, file: Arc<File>) -> tokio::task::JoinHandle<usize> {
    let engine = engine.clone();
    tokio::spawn(async move {
        let op = Op::Read {
            file,
            offset: 0,
            buf: IoBuffer::with_capacity(1, 1),
        };
        engine.run(op).await.result.unwrap()
    })
}

/// More operations complete at once than the completion queue holds: the
/// rest wait on the kernel's overflow list, which only a system call
/// flushes. They are delivered with no later submission, and so is a
/// completion that comes after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_beyond_the_completion_queue_are_delivered() {
    const OPS: usize = 2 * uring::CQ_ENTRIES as usize;
    let engine = Arc::new(uring::UringEngine::new().unwrap());
    let (many, mut many_in) = pipe();
    let (one, mut one_in) = pipe();
    let reads: Vec<_> = (0..OPS).map(|_| read_one(&engine, many.clone())).collect();
    let later = read_one(&engine, one);
    // Every read is submitted and waits for data.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    std::io::Write::write_all(&mut many_in, &vec![1u8; OPS]).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut done = 0;
    for read in reads {
        if let Ok(n) = tokio::time::timeout_at(deadline, read).await {
            assert_eq!(n.unwrap(), 1);
            done += 1;
        }
    }
    assert_eq!(done, OPS, "completions beyond the queue were not delivered");
    std::io::Write::write_all(&mut one_in, &[1u8]).unwrap();
    let later = tokio::time::timeout(std::time::Duration::from_secs(5), later).await;
    assert_eq!(later.expect("the completion after the burst").unwrap(), 1);
}

#[test]
fn a_ring_without_an_operation_the_engine_submits_is_refused() {
    use io_uring::opcode;
    assert!(uring::missing_operations(|_| true).is_empty());
    assert_eq!(
        uring::missing_operations(|code| code != opcode::Fallocate::CODE),
        ["IORING_OP_FALLOCATE"]
    );
    assert_eq!(
        uring::missing_operations(|code| code > opcode::Write::CODE).len(),
        4
    );
}

/// A kernel before 5.12 may answer a submission with EBUSY while
/// completions wait on its overflow list, after the reap that follows has
/// submitted the queue: an operation that completes right then (a read
/// from the page cache) is reaped before its submitter waits for it, and
/// must still reach it (it was dropped, and the submitter panicked).
#[tokio::test]
async fn an_op_completed_during_an_ebusy_submission_reaches_its_submitter() {
    let engine = uring::UringEngine::new().unwrap();
    let (_dir, file) = scratch(1 << 16);
    std::os::unix::fs::FileExt::write_all_at(&*file, &[7u8; 4096], 0).unwrap();
    engine.busy_on_next_submit();
    let op = Op::Read {
        file,
        offset: 0,
        buf: IoBuffer::with_capacity(4096, 1),
    };
    let done = tokio::time::timeout(std::time::Duration::from_secs(5), engine.run(op))
        .await
        .expect("the read never completed");
    assert_eq!(done.result.unwrap(), 4096);
}

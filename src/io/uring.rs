//! The io_uring engine.
//!
//! One ring per engine, shared by all volumes. A tokio task pushes its
//! operation's SQE under a short mutex and enters the kernel; operations the
//! kernel finishes during submission (page-cache hits) are reaped right
//! there and returned without any thread hop. Everything else completes
//! later: the ring signals a registered eventfd, a reaper task watching it
//! through `AsyncFd` reaps the CQEs and wakes the waiting tasks.
//!
//! Notifications are switched off while a submitter is inside the ring
//! (it reaps what completes inline itself, then reaps once more after
//! switching them back on), so page-cache hits never wake the reaper. The
//! kernel gives no ordering guarantee between posting a CQE and reading the
//! notification flag, so while operations wait the reaper also polls every
//! `SAFETY_TICK` (5 ms); an idle engine sleeps until an operation waits again.
//!
//! The ring owns in-flight operations: each op (with its buffer and file
//! handle) sits in a slab under its `user_data` key until its CQE arrives,
//! even if the waiting task was cancelled, so the kernel never writes freed
//! memory. Dropping the engine waits for outstanding completions, or leaks
//! the buffers if it cannot.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::{Completion, EngineError, Op};

/// Submission queue entries.
const SQ_ENTRIES: u32 = 256;
/// Completion queue entries. Nothing bounds the operations in flight to
/// this: completions beyond it wait on the kernel's overflow list
/// (`IORING_FEAT_NODROP`) until [`RingState::reap`] flushes them.
pub(crate) const CQ_ENTRIES: u32 = 1024;

/// Poll interval of the reaper while some operation waits for a CQE.
const SAFETY_TICK: std::time::Duration = std::time::Duration::from_millis(5);

/// An operation the kernel owns until its CQE arrives.
struct InFlight {
    /// Keeps buffers and the file alive while the kernel uses them.
    op: Op,
    /// Where the completion goes when it is reaped by someone else.
    waiter: Option<oneshot::Sender<Completion>>,
}

struct RingState {
    ring: IoUring,
    /// Invariant: exactly the operations submitted and not yet reaped.
    in_flight: Slab<InFlight>,
    /// Operations with a waiter, i.e. that did not complete inline.
    waiting: usize,
    /// Wakes the reaper when the first operation starts waiting.
    reaper_wake: Arc<tokio::sync::Notify>,
    /// Makes the next submission answer EBUSY after submitting (tests).
    #[cfg(test)]
    busy_once: bool,
}

/// io_uring engine. See the module docs.
pub struct UringEngine {
    state: Arc<Mutex<RingState>>,
    reaper: tokio::task::JoinHandle<()>,
}

/// The io_uring operations [`build_sqe`] submits, with their names.
const OPERATIONS: [(u8, &str); 4] = [
    (opcode::Read::CODE, "IORING_OP_READ"),
    (opcode::Write::CODE, "IORING_OP_WRITE"),
    (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    (opcode::Fallocate::CODE, "IORING_OP_FALLOCATE"),
];

/// The names of the [`OPERATIONS`] that `supported` says the kernel lacks:
/// a ring without one of them would fail every request that needs it.
pub(crate) fn missing_operations(supported: impl Fn(u8) -> bool) -> Vec<&'static str> {
    OPERATIONS
        .iter()
        .filter(|(code, _)| !supported(*code))
        .map(|(_, name)| *name)
        .collect()
}

/// Why io_uring is unusable here, or `None` if it looks usable.
fn disabled_by_sysctl() -> Option<String> {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) if v.trim() == "2" => Some("kernel.io_uring_disabled = 2".into()),
        _ => None,
    }
}

impl UringEngine {
    /// Creates the ring and its reaper task. Must be called inside a tokio
    /// runtime.
    pub fn new() -> Result<Self, EngineError> {
        if let Some(why) = disabled_by_sysctl() {
            return Err(EngineError::UringUnavailable(why));
        }
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .map_err(|e| EngineError::UringUnavailable(format!("io_uring_setup: {e}")))?;
        if !ring.params().is_feature_nodrop() {
            return Err(EngineError::UringUnavailable(
                "kernel lacks IORING_FEAT_NODROP (needs Linux 5.5 or later)".into(),
            ));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| {
            EngineError::UringUnavailable(format!(
                "cannot ask io_uring which operations it has (needs Linux 5.6 or later): {e}"
            ))
        })?;
        let missing = missing_operations(|code| probe.is_supported(code));
        if !missing.is_empty() {
            return Err(EngineError::UringUnavailable(format!(
                "kernel's io_uring lacks {}",
                missing.join(", ")
            )));
        }
        // SAFETY: eventfd has no memory-safety preconditions.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(EngineError::Setup(io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(|e| EngineError::UringUnavailable(format!("register eventfd: {e}")))?;
        // SAFETY: `eventfd` is an OwnedFd moved into the AsyncFd, so the
        // descriptor stays open and unchanged for the AsyncFd's lifetime.
        let watcher =
            unsafe { AsyncFd::register_with_interest(eventfd, tokio::io::Interest::READABLE) }
                .map_err(|e| EngineError::Setup(io::Error::other(e.to_string())))?;
        let reaper_wake = Arc::new(tokio::sync::Notify::new());
        let state = Arc::new(Mutex::new(RingState {
            ring,
            in_flight: Slab::with_capacity(SQ_ENTRIES as usize),
            waiting: 0,
            reaper_wake: reaper_wake.clone(),
            #[cfg(test)]
            busy_once: false,
        }));
        let reaper = tokio::spawn(reap_forever(Arc::downgrade(&state), watcher, reaper_wake));
        tracing::debug!(sq = SQ_ENTRIES, cq = CQ_ENTRIES, "io_uring engine started");
        Ok(UringEngine { state, reaper })
    }

    /// Makes the next submission answer EBUSY once it has submitted, as a
    /// kernel before 5.12 does when completions wait on its overflow list
    /// (tests).
    #[cfg(test)]
    pub(crate) fn busy_on_next_submit(&self) {
        lock(&self.state).busy_once = true;
    }

    /// Submits `op` and waits for its completion.
    pub async fn run(&self, op: Op) -> Completion {
        let rx = {
            let mut st = lock(&self.state);
            match st.submit(op) {
                Ok(Ok(done)) => return done,
                Ok(Err(rx)) => rx,
                Err(failed) => return failed,
            }
        };
        match rx.await {
            Ok(done) => done,
            Err(_) => unreachable!("io_uring op dropped without completion"),
        }
    }
}

fn lock(state: &Mutex<RingState>) -> MutexGuard<'_, RingState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl RingState {
    /// Pushes one op, enters the kernel, and reaps what is ready. Returns
    /// the op's own completion if it finished during submission, else a
    /// receiver for it. The waiter is attached under the same lock as the
    /// reaping, so no completion can slip past it; inline completions (the
    /// common case on a warm page cache) allocate no channel at all.
    #[allow(clippy::type_complexity)]
    fn submit(
        &mut self,
        op: Op,
    ) -> Result<Result<Completion, oneshot::Receiver<Completion>>, Completion> {
        let entry = self.in_flight.vacant_entry();
        let key = entry.key();
        let sqe = build_sqe(&op).user_data(key as u64);
        entry.insert(InFlight { op, waiter: None });
        self.ring.completion().disable_eventfd();
        let own = self.push_enter_reap(key, sqe);
        self.ring.completion().enable_eventfd();
        // Catch completions posted while notifications were off.
        let own = match own {
            Ok(None) => Ok(self.reap(Some(key))),
            Ok(Some(done)) => {
                self.reap(None);
                Ok(Some(done))
            }
            Err(failed) => Err(failed),
        };
        match own {
            Err(failed) => Err(failed),
            Ok(Some(done)) => Ok(Ok(done)),
            Ok(None) => {
                let (tx, rx) = oneshot::channel();
                // Not reaped: every reap during this submission kept the
                // op's own completion for it.
                self.in_flight
                    .get_mut(key)
                    .expect("an op not reaped is in flight")
                    .waiter = Some(tx);
                self.waiting += 1;
                if self.waiting == 1 {
                    self.reaper_wake.notify_one();
                }
                Ok(Err(rx))
            }
        }
    }

    /// Pushes `sqe` (for slab entry `key`), submits, and reaps; returns the
    /// op's own completion if it is already there. Every reap on the way
    /// keeps that completion for it: the op has no waiter yet.
    fn push_enter_reap(
        &mut self,
        key: usize,
        sqe: squeue::Entry,
    ) -> Result<Option<Completion>, Completion> {
        loop {
            // SAFETY: the SQE points into buffers and a file owned by the
            // slab entry `key`, which stays until its CQE is reaped.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                break;
            }
            // Queue full: submit what is queued, make room and retry (the
            // op's own SQE is not in the queue yet).
            if let Err(e) = self.enter(false, None) {
                return Err(self.fail(key, e));
            }
            self.reap(None);
        }
        let own = match self.enter(false, Some(key)) {
            Ok(own) => own,
            Err(e) => {
                // The SQE may still be in the queue; the reaper, which
                // polls while an operation waits, submits it
                // (`submit_left`) and its completion goes to the waiter as
                // usual.
                tracing::warn!("io_uring submit failed, retrying later: {e}");
                None
            }
        };
        Ok(own.or_else(|| self.reap(Some(key))))
    }

    /// Enters the kernel to submit queued SQEs, optionally waiting for one
    /// completion. Retries on EINTR; EBUSY means completions must be
    /// reaped, and the completion of `mine`, if reaped, is returned.
    fn enter(&mut self, wait: bool, mine: Option<usize>) -> io::Result<Option<Completion>> {
        loop {
            let r = if wait {
                self.ring.submit_and_wait(1)
            } else {
                self.ring.submit()
            };
            #[cfg(test)]
            let r = if std::mem::take(&mut self.busy_once) {
                r.and(Err(io::Error::from_raw_os_error(libc::EBUSY)))
            } else {
                r
            };
            match r {
                Ok(_) => return Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(self.reap(mine)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits SQEs an earlier submit left in the queue (it failed, for
    /// want of memory say): their operations must not wait for unrelated
    /// I/O to enter the kernel for them.
    fn submit_left(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(e) = self.enter(false, None) {
            tracing::warn!("io_uring submit failed, retrying later: {e}");
        }
    }

    /// Removes an op whose SQE never reached the kernel and fails it.
    fn fail(&mut self, key: usize, e: io::Error) -> Completion {
        let inflight = self.in_flight.remove(key);
        Completion {
            result: Err(e),
            op: inflight.op,
        }
    }

    /// Reaps every available CQE. The completion for `mine` is returned
    /// instead of being sent to its waiter.
    fn reap(&mut self, mine: Option<usize>) -> Option<Completion> {
        let mut own = self.reap_cq(mine);
        // Completions the CQ had no room for wait on the kernel's overflow
        // list (IORING_FEAT_NODROP), and later ones join them, until an
        // io_uring_enter flushes them; `submit` enters with GETEVENTS while
        // the overflow flag is set. The reaper never enters otherwise.
        let mut rounds = 0;
        while self.ring.submission().cq_overflow() && rounds < 64 && self.ring.submit().is_ok() {
            own = own.or(self.reap_cq(mine));
            rounds += 1;
        }
        own
    }

    /// Reaps the CQEs in the completion ring.
    fn reap_cq(&mut self, mine: Option<usize>) -> Option<Completion> {
        let mut own = None;
        let ready: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, res) in ready {
            let key = user_data as usize;
            let Some(mut inflight) = self.in_flight.try_remove(key) else {
                tracing::error!(key, "io_uring completion for an unknown operation");
                continue;
            };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            if let (Ok(n), Op::Read { buf, .. }) = (&result, &mut inflight.op) {
                // SAFETY: the kernel reported n bytes read into the spare
                // capacity this SQE described.
                unsafe { buf.advance(*n) };
            }
            let done = Completion {
                result,
                op: inflight.op,
            };
            if Some(key) == mine {
                own = Some(done);
            } else if let Some(waiter) = inflight.waiter {
                self.waiting -= 1;
                // A dropped receiver means the requester went away; the
                // buffers are freed here, after the kernel is done.
                let _ = waiter.send(done);
            }
        }
        own
    }
}

fn build_sqe(op: &Op) -> squeue::Entry {
    match op {
        Op::Read { file, offset, buf } => {
            let (ptr, len) = buf.spare_raw();
            opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, len as u32)
                .offset(*offset)
                .build()
        }
        Op::Write {
            file,
            offset,
            buf,
            pos,
            dsync,
        } => {
            let data = &buf.as_slice()[*pos..];
            opcode::Write::new(
                types::Fd(file.as_raw_fd()),
                data.as_ptr(),
                data.len() as u32,
            )
            .offset(*offset)
            .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
            .build()
        }
        Op::Sync { file, data_only } => {
            let flags = if *data_only {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                .flags(flags)
                .build()
        }
        Op::Fallocate {
            file,
            mode,
            offset,
            len,
        } => opcode::Fallocate::new(types::Fd(file.as_raw_fd()), *len)
            .offset(*offset)
            .mode(*mode)
            .build(),
    }
}

/// Reaps completions signalled through the eventfd until the engine goes;
/// polls every [`SAFETY_TICK`] while operations wait, sleeps when none do.
async fn reap_forever(
    state: std::sync::Weak<Mutex<RingState>>,
    eventfd: AsyncFd<OwnedFd>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut idle = false;
    loop {
        let signalled = async {
            match eventfd.readable().await {
                Ok(mut guard) => {
                    let mut counter = [0u8; 8];
                    // SAFETY: reading 8 bytes into a local array from an owned eventfd.
                    let n = unsafe {
                        libc::read(
                            eventfd.get_ref().as_raw_fd(),
                            counter.as_mut_ptr().cast(),
                            counter.len(),
                        )
                    };
                    if n < 0 {
                        guard.clear_ready();
                    }
                    true
                }
                Err(_) => false,
            }
        };
        let alive = if idle {
            tokio::select! {
                ok = signalled => ok,
                _ = wake.notified() => true,
            }
        } else {
            tokio::time::timeout(SAFETY_TICK, signalled)
                .await
                .unwrap_or(true)
        };
        if !alive {
            return;
        }
        let Some(state) = state.upgrade() else { return };
        let mut st = lock(&state);
        st.submit_left();
        st.reap(None);
        idle = st.waiting == 0;
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.reaper.abort();
        let mut st = lock(&self.state);
        let mut attempts = 0;
        while !st.in_flight.is_empty() && attempts < 1000 {
            if st.enter(true, None).is_err() {
                break;
            }
            st.reap(None);
            attempts += 1;
        }
        if !st.in_flight.is_empty() {
            tracing::error!(
                outstanding = st.in_flight.len(),
                "io_uring engine dropped with operations in flight; leaking their buffers"
            );
            let leaked = std::mem::take(&mut st.in_flight);
            std::mem::forget(leaked);
        }
    }
}

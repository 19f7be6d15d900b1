//! The consistency group: the PPRC pairs whose primary LSS has
//! `consistency_group = true`, across every such LSS of this server.
//!
//! When one pair of the group cannot update its secondary, or its
//! primary's own storage fails a host change, a flush or the out-of-sync
//! bitmap, the group *holds* writes: no write to any volume of the group completes (nor
//! starts) until the group is frozen — by an operator (`freeze`) or by the
//! consistency timeout. Freezing suspends every pair of the group at once,
//! then releases the writes, which go on to the primaries with change
//! recording. So the secondaries hold a dependent-write-consistent image:
//! a write that depends on a held one cannot even be issued. An operator
//! may also freeze a healthy group on demand (pairs suspend, writes are
//! held until `unfreeze` or the timeout).
//!
//! A stop of the server does at once what the timeout would do, then and
//! for every hold until the process ends (see [`ConsistencyGroup::stop`]).
//!
//! Held writes are released only once the suspensions are recorded (see
//! [`ConsistencyGroup::set_record`]): a crash right after a released write
//! was acknowledged finds the pairs suspended, not mirroring, and does not
//! resynchronise them over the secondaries' frozen image.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::pair::{Pair, SuspendReason};

/// What the group is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum GroupState {
    /// Writes flow.
    Normal,
    /// A pair failed; writes are held until a freeze.
    Holding {
        /// The pair that failed.
        volume: String,
        /// Why.
        detail: String,
        /// Since when (RFC 3339).
        since: String,
    },
    /// Frozen on demand; writes are held until unfreeze.
    Frozen {
        /// Since when (RFC 3339).
        since: String,
    },
}

/// Makes the pairs' current states durable (the server's record of its
/// pairs); an error says why it could not.
pub type Record =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How long a release waits for the record before it releases the held
/// writes anyway (the record waits for no host write, so only a stalled
/// disk makes it this slow).
const RECORD_WAIT: Duration = Duration::from_secs(10);

/// One server's consistency group.
pub struct ConsistencyGroup {
    timeout: Duration,
    /// Records the pairs' suspensions before held writes are released.
    record: OnceLock<Record>,
    members: Mutex<Vec<Weak<Pair>>>,
    /// Generation, state, and when the state was entered (a state that
    /// holds writes releases them `timeout` after that).
    state: watch::Sender<(u64, GroupState, Instant)>,
    /// The server stops: a hold is released at once. Taken around every
    /// change of state, so a hold either sees it set or is released by
    /// [`ConsistencyGroup::stop`].
    stopping: Mutex<bool>,
}

impl std::fmt::Debug for ConsistencyGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsistencyGroup")
            .field("timeout", &self.timeout)
            .field("state", &self.state.borrow().1)
            .finish_non_exhaustive()
    }
}

impl ConsistencyGroup {
    /// An empty group whose held writes are released after `timeout`.
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(ConsistencyGroup {
            timeout,
            record: OnceLock::new(),
            members: Mutex::new(Vec::new()),
            state: watch::channel((0, GroupState::Normal, Instant::now())).0,
            stopping: Mutex::new(false),
        })
    }

    /// The consistency timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets how the pairs' suspensions are recorded before held writes
    /// are released (once; later calls change nothing).
    pub fn set_record(&self, record: Record) {
        let _ = self.record.set(record);
    }

    /// Records the pairs' states durably. A record that fails or stalls
    /// is logged, and the release goes on: hosts are not held for the
    /// server's own record.
    async fn record(&self) {
        let Some(record) = self.record.get() else {
            return;
        };
        let failure = match tokio::time::timeout(RECORD_WAIT, record()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => format!("not done within {}s", RECORD_WAIT.as_secs()),
        };
        tracing::error!(
            "consistency group: cannot record the suspended pairs before releasing held \
             writes ({failure}); releasing them anyway: if this server crashes before the \
             record is written (it is tried again every second), the pairs resynchronise \
             over the secondaries' frozen image"
        );
    }

    /// Adds a pair to the group.
    pub fn join(&self, pair: &Arc<Pair>) {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.retain(|m| m.strong_count() > 0);
        members.push(Arc::downgrade(pair));
    }

    /// Takes a pair out of the group (terminated, or taken over by a
    /// failback).
    ///
    /// A group that holds writes after a failure and that the last of its
    /// pairs leaves has no pair left to freeze: it is normal again at once.
    /// Else a pair that joins it later — the failover at this site of a
    /// switch back, after the recovery site failed every pair back here —
    /// would have its writes held, and be suspended by the timeout, for a
    /// failure of pairs gone from the group. A group frozen on demand stays
    /// frozen until `unfreeze` or its timeout.
    pub fn leave(self: &Arc<Self>, pair: &Arc<Pair>) {
        let emptied = {
            let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
            members
                .retain(|m| m.strong_count() > 0 && !std::ptr::eq(m.as_ptr(), Arc::as_ptr(pair)));
            members.is_empty()
        };
        if emptied && matches!(self.state(), GroupState::Holding { .. }) {
            tracing::warn!(
                "consistency group: its last pair left it while it held writes; writes flow again"
            );
            self.enter(GroupState::Normal);
        }
    }

    /// The current state.
    pub fn state(&self) -> GroupState {
        self.state.borrow().1.clone()
    }

    /// While the group holds writes (after a failure, or frozen on
    /// demand): what a pair of the group, `volume`, says about it — why,
    /// and what releases them when (the consistency timeout's time left).
    /// `None` while writes flow. Reads the state only, never waits.
    pub fn hold_detail(&self, volume: &str) -> Option<String> {
        let (state, left) = {
            let s = self.state.borrow();
            (s.1.clone(), self.timeout.saturating_sub(s.2.elapsed()))
        };
        // Whole seconds, rounded up: "in 0s" only once it is due.
        let left = format!("{}s", left.as_millis().div_ceil(1000));
        match state {
            GroupState::Normal => None,
            GroupState::Holding {
                volume: failed,
                detail,
                since,
            } => Some(format!(
                "writes held by the consistency group since {since}: {} failed: {detail}; \
                 held until essctl pprc freeze or the consistency timeout (in {left}) \
                 suspends the group's pairs",
                if failed == volume {
                    "this pair".to_string()
                } else {
                    format!("pair {failed}")
                }
            )),
            GroupState::Frozen { since } => Some(format!(
                "writes held by the consistency group, frozen on demand since {since}; \
                 held until essctl pprc unfreeze or the consistency timeout (in {left})"
            )),
        }
    }

    /// Volumes of the group's pairs.
    pub fn volumes(&self) -> Vec<String> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .map(|p| p.spec.volume.clone())
            .collect()
    }

    /// Waits while the group holds writes.
    pub async fn pass(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|(_, s, _)| *s == GroupState::Normal).await;
    }

    /// Returns once the group has held writes (after a failure or on
    /// demand) for `grace` without a break, with its state then.
    pub async fn held_for(&self, grace: Duration) -> GroupState {
        let mut rx = self.state.subscribe();
        loop {
            if rx
                .wait_for(|(_, s, _)| *s != GroupState::Normal)
                .await
                .is_err()
            {
                return self.state();
            }
            tokio::time::sleep(grace).await;
            let state = self.state();
            if state != GroupState::Normal {
                return state;
            }
        }
    }

    fn enter(self: &Arc<Self>, next: GroupState) {
        self.enter_from(None, next);
    }

    /// Enters `next`: if `from` is given, only while the group is still
    /// in that generation of its state. A state that holds writes is
    /// released by the timeout, or at once while the server stops.
    fn enter_from(self: &Arc<Self>, from: Option<u64>, next: GroupState) {
        let holds = next != GroupState::Normal;
        let mut generation = 0;
        let (entered, stopping) = {
            let stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
            let entered = self.state.send_if_modified(|(g, s, at)| {
                if from.is_some_and(|from| from != *g) {
                    return false;
                }
                *g += 1;
                generation = *g;
                *s = next;
                *at = Instant::now();
                true
            });
            (entered, *stopping)
        };
        if !(entered && holds) {
            return;
        }
        let me = Arc::downgrade(self);
        let wait = if stopping {
            Duration::ZERO
        } else {
            self.timeout
        };
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let Some(me) = me.upgrade() else { return };
            let state = me.state();
            if stopping {
                let n = me.release(Some(generation)).await;
                Self::log_stop(&state, n);
            } else if me.state.borrow().0 == generation {
                tracing::warn!("consistency group timeout: releasing writes");
                me.release(Some(generation)).await;
            }
        });
    }

    /// A pair of the group failed to mirror: holds every write of the
    /// group (if not held already) and waits for the freeze.
    pub async fn trip(self: &Arc<Self>, volume: &str, detail: &str) {
        self.hold(volume, detail);
        self.pass().await;
    }

    /// A pair of the group failed to mirror (its secondary or its
    /// primary's storage): holds every write of the group, if not held
    /// already.
    pub fn hold(self: &Arc<Self>, volume: &str, detail: &str) {
        // Also when frozen on demand: the unfreeze must then suspend the
        // group's pairs (a pair resumed meanwhile failed).
        if matches!(self.state(), GroupState::Normal | GroupState::Frozen { .. }) {
            tracing::warn!(volume, "consistency group holds writes: {detail}");
            self.enter(GroupState::Holding {
                volume: volume.to_string(),
                detail: detail.to_string(),
                since: crate::control::log::rfc3339(SystemTime::now()),
            });
        }
    }

    fn suspend_all(&self) -> usize {
        let members: Vec<Arc<Pair>> = self
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        members
            .iter()
            .filter(|p| {
                p.suspend(
                    SuspendReason::Freeze,
                    Some("consistency group frozen".into()),
                )
            })
            .count()
    }

    /// Suspends every pair of the group. A group holding writes after a
    /// failure releases them, once the suspensions are recorded; a healthy
    /// group holds them until [`ConsistencyGroup::unfreeze`] or the
    /// timeout. Returns how many pairs were suspended.
    pub async fn freeze(self: &Arc<Self>) -> usize {
        let n = self.suspend_all();
        let (generation, state) = self.generation();
        match state {
            GroupState::Holding { .. } => self.release_recorded(generation).await,
            GroupState::Normal => self.enter(GroupState::Frozen {
                since: crate::control::log::rfc3339(SystemTime::now()),
            }),
            GroupState::Frozen { .. } => {}
        }
        n
    }

    /// Releases held writes (after suspending the group's pairs if a
    /// failure was holding them), once the pairs' states are recorded.
    pub async fn unfreeze(self: &Arc<Self>) -> usize {
        self.release(None).await
    }

    /// The generation of the group's state, and the state.
    fn generation(&self) -> (u64, GroupState) {
        let s = self.state.borrow();
        (s.0, s.1.clone())
    }

    /// Releases the writes the group holds — in generation `from` of its
    /// state if given, else now — after suspending its pairs if a failure
    /// was holding them, and once the pairs' states are recorded. A group
    /// whose state changed meanwhile (a failure while frozen, another
    /// release) is left as it is. Returns how many pairs it suspended.
    async fn release(self: &Arc<Self>, from: Option<u64>) -> usize {
        let (generation, state) = self.generation();
        if from.is_some_and(|from| from != generation) {
            return 0;
        }
        // A group frozen on demand has its pairs suspended already; a pair
        // resumed since is left mirroring.
        let n = match state {
            GroupState::Normal => return 0,
            GroupState::Holding { .. } => self.suspend_all(),
            GroupState::Frozen { .. } => 0,
        };
        self.release_recorded(generation).await;
        n
    }

    /// Records the pairs' states, then releases the writes held in
    /// `generation` of the group's state (if it is still in it).
    async fn release_recorded(self: &Arc<Self>, generation: u64) {
        self.record().await;
        self.enter_from(Some(generation), GroupState::Normal);
    }

    /// The server stops: if the group holds writes, does at once what the
    /// consistency timeout would — after a failure, suspends every pair of
    /// the group (reason `freeze`, marks kept) and then releases the held
    /// writes; frozen on demand, releases them (the pairs it suspended
    /// stay suspended, as after `unfreeze`) —
    /// and from now on releases every new hold the same way, so the stop
    /// does not wait for the timeout. Returns the state it released and
    /// how many pairs it suspended, if the group held writes.
    pub async fn stop(self: &Arc<Self>) -> Option<(GroupState, usize)> {
        let (generation, state) = {
            let mut stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
            *stopping = true;
            self.generation()
        };
        if state == GroupState::Normal {
            return None;
        }
        let n = self.release(Some(generation)).await;
        Self::log_stop(&state, n);
        Some((state, n))
    }

    fn log_stop(state: &GroupState, suspended: usize) {
        match state {
            GroupState::Holding { volume, detail, .. } => tracing::warn!(
                volume,
                "server stopping: consistency group frozen at once ({detail}): \
                 {suspended} pair(s) suspended (freeze), held writes released"
            ),
            GroupState::Frozen { .. } => tracing::warn!(
                "server stopping: the frozen consistency group releases its held writes \
                 (the pairs it suspended stay suspended)"
            ),
            GroupState::Normal => {}
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn held_writes_wait_for_the_freeze_or_the_timeout() {
        let group = ConsistencyGroup::new(Duration::from_secs(60));
        group.pass().await;
        // A failure holds writes until the freeze.
        let writer = {
            let g = group.clone();
            tokio::spawn(async move { g.trip("000FCA31", "link lost").await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            matches!(group.state(), GroupState::Holding { ref volume, .. } if volume == "000FCA31")
        );
        // Every pair of the group says so, and when the timeout ends it.
        let since = match group.state() {
            GroupState::Holding { since, .. } => since,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            group.hold_detail("000FCA31").unwrap(),
            format!(
                "writes held by the consistency group since {since}: this pair failed: \
                 link lost; held until essctl pprc freeze or the consistency timeout \
                 (in 55s) suspends the group's pairs"
            )
        );
        assert!(group
            .hold_detail("100FCA31")
            .unwrap()
            .contains(": pair 000FCA31 failed: link lost; "));
        assert!(!writer.is_finished());
        let other = {
            let g = group.clone();
            tokio::spawn(async move { g.pass().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!other.is_finished());
        assert_eq!(group.freeze().await, 0);
        writer.await.unwrap();
        other.await.unwrap();
        assert_eq!(group.state(), GroupState::Normal);
        assert_eq!(group.hold_detail("000FCA31"), None);

        // A freeze on demand holds writes until the timeout.
        group.freeze().await;
        assert!(matches!(group.state(), GroupState::Frozen { .. }));
        let held = {
            let g = group.clone();
            tokio::spawn(async move { g.pass().await })
        };
        tokio::time::sleep(Duration::from_millis(58_500)).await;
        assert!(!held.is_finished());
        assert!(group
            .hold_detail("000FCA31")
            .unwrap()
            .ends_with("; held until essctl pprc unfreeze or the consistency timeout (in 2s)"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        held.await.unwrap();
        assert_eq!(group.state(), GroupState::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_releases_held_writes_at_once_and_every_hold_after_it() {
        let group = ConsistencyGroup::new(Duration::from_secs(60));
        assert_eq!(group.stop().await, None);
        let group = ConsistencyGroup::new(Duration::from_secs(60));
        let writer = {
            let g = group.clone();
            tokio::spawn(async move { g.trip("000FCA31", "link lost").await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!writer.is_finished());
        assert!(matches!(
            group.stop().await,
            Some((GroupState::Holding { .. }, 0))
        ));
        writer.await.unwrap();
        assert_eq!(group.state(), GroupState::Normal);
        // Until the process ends, a hold or a freeze on demand holds
        // nothing.
        tokio::time::timeout(Duration::from_secs(1), group.trip("001FCA31", "link lost"))
            .await
            .expect("a hold during the stop waited");
        group.freeze().await;
        tokio::time::timeout(Duration::from_secs(1), group.pass())
            .await
            .expect("a freeze on demand during the stop held writes");

        // Frozen on demand: released at once too.
        let group = ConsistencyGroup::new(Duration::from_secs(60));
        group.freeze().await;
        assert!(matches!(
            group.stop().await,
            Some((GroupState::Frozen { .. }, 0))
        ));
        tokio::time::timeout(Duration::from_secs(1), group.pass())
            .await
            .expect("the frozen group still holds writes");
    }

    /// A record that waits until `open` is true, then counts itself and
    /// answers `result`.
    pub(in crate::copy::pprc) fn gated_record(
        open: watch::Receiver<bool>,
        done: Arc<std::sync::atomic::AtomicUsize>,
        result: Result<(), String>,
    ) -> Record {
        Box::new(move || {
            let (mut open, done, result) = (open.clone(), done.clone(), result.clone());
            Box::pin(async move {
                let _ = open.wait_for(|o| *o).await;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                result
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn held_writes_are_released_only_once_the_suspensions_are_recorded() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for by_timeout in [false, true] {
            let group = ConsistencyGroup::new(Duration::from_secs(5));
            let (open, gate) = watch::channel(false);
            let recorded = Arc::new(AtomicUsize::new(0));
            group.set_record(gated_record(gate, recorded.clone(), Ok(())));
            let writer = {
                let g = group.clone();
                tokio::spawn(async move { g.trip("000FCA31", "link lost").await })
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            let freezer = (!by_timeout).then(|| {
                let g = group.clone();
                tokio::spawn(async move { g.freeze().await })
            });
            // The release waits for the record (by the timeout: past it,
            // within RECORD_WAIT of the release's start).
            let wait = if by_timeout { 7 } else { 3 };
            tokio::time::sleep(Duration::from_secs(wait)).await;
            assert!(!writer.is_finished(), "released before the record");
            assert!(matches!(group.state(), GroupState::Holding { .. }));
            open.send(true).unwrap();
            writer.await.unwrap();
            if let Some(freezer) = freezer {
                assert_eq!(freezer.await.unwrap(), 0);
            }
            assert_eq!(group.state(), GroupState::Normal);
            assert_eq!(
                recorded.load(Ordering::SeqCst),
                1,
                "by timeout {by_timeout}"
            );
        }

        // A record that fails, or never ends, does not hold writes for
        // ever: the release goes on (and says so in the log).
        for (result, opens) in [(Err("disk full".to_string()), true), (Ok(()), false)] {
            let group = ConsistencyGroup::new(Duration::from_secs(60));
            let (open, gate) = watch::channel(opens);
            let recorded = Arc::new(AtomicUsize::new(0));
            group.set_record(gated_record(gate, recorded.clone(), result));
            let writer = {
                let g = group.clone();
                tokio::spawn(async move { g.trip("000FCA31", "link lost").await })
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            let started = Instant::now();
            group.freeze().await;
            writer.await.unwrap();
            let waited = started.elapsed();
            assert_eq!(group.state(), GroupState::Normal);
            if opens {
                assert_eq!(recorded.load(Ordering::SeqCst), 1);
                assert!(waited < Duration::from_secs(1), "{waited:?}");
            } else {
                assert_eq!(recorded.load(Ordering::SeqCst), 0);
                assert_eq!(waited, RECORD_WAIT);
            }
            drop(open);
        }
    }
}

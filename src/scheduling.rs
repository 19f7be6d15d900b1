//! The kernel's CPU scheduling policy for essd's threads (`server.scheduling`).
//!
//! With the default policy a thread woken by I/O may preempt the task running
//! on its CPU. When essd shares its CPUs with its clients or a peer server,
//! that splits batches: a primary that has just sent half its requests to the
//! secondary is preempted by the secondary, which then acknowledges half a
//! batch. Under `SCHED_BATCH` a woken essd thread waits until the running task
//! blocks or has used its time slice, so work moves between processes in
//! whole batches. The cost is wake-up latency when the CPUs are busy with
//! other work.

use serde::{Deserialize, Serialize};

/// The policy essd's threads run under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduling {
    /// The kernel's default policy (`SCHED_OTHER`).
    #[default]
    Normal,
    /// `SCHED_BATCH`: woken threads do not preempt the running task.
    Batch,
}

impl Scheduling {
    /// The name used in the configuration and the API.
    pub fn name(self) -> &'static str {
        match self {
            Scheduling::Normal => "normal",
            Scheduling::Batch => "batch",
        }
    }

    /// Puts the calling thread under this policy. Threads it starts later
    /// inherit it, so call this before any other thread exists.
    pub fn apply_to_this_thread(self) -> std::io::Result<()> {
        let policy = match self {
            Scheduling::Normal => libc::SCHED_OTHER,
            Scheduling::Batch => libc::SCHED_BATCH,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param that outlives the call; pid
        // 0 is the calling thread.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The policy of the calling thread, if it is one of these.
    pub fn of_this_thread() -> Option<Scheduling> {
        // SAFETY: plain query of the calling thread's policy.
        match unsafe { libc::sched_getscheduler(0) } {
            libc::SCHED_OTHER => Some(Scheduling::Normal),
            libc::SCHED_BATCH => Some(Scheduling::Batch),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_takes_the_policy_and_its_children_inherit_it() {
        std::thread::spawn(|| {
            assert_eq!(Scheduling::of_this_thread(), Some(Scheduling::Normal));
            Scheduling::Batch.apply_to_this_thread().unwrap();
            assert_eq!(Scheduling::of_this_thread(), Some(Scheduling::Batch));
            let child = std::thread::spawn(Scheduling::of_this_thread);
            assert_eq!(child.join().unwrap(), Some(Scheduling::Batch));
            Scheduling::Normal.apply_to_this_thread().unwrap();
            assert_eq!(Scheduling::of_this_thread(), Some(Scheduling::Normal));
        })
        .join()
        .unwrap();
    }
}

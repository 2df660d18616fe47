//! Which payload runs when: the decisions of a terminal's run queue, with
//! no I/O. One payload runs at a time, in arrival order, because package
//! managers hold a global lock and two installs at once fail one of them.
//! A newer dispatch for a policy supersedes that policy's older one: the
//! running one is stopped, a waiting one is dropped (its envelope stays
//! recorded as used, so it can never run later). Nothing starts while a
//! stopped job is still ending: its package manager may hold the lock.
//!
//! [`crate::session::Runs`] carries these decisions out: it starts the
//! jobs, stops the superseded ones and reports the ends back here.

use std::collections::VecDeque;

/// The queue of one terminal, over jobs of type `J`.
#[derive(Debug)]
pub struct RunQueue<J> {
    next_id: u64,
    running: Option<Running>,
    waiting: VecDeque<(String, J)>,
}

#[derive(Debug)]
struct Running {
    id: u64,
    policy: String,
    /// Asked to stop; it still runs until its end is reported.
    stopping: bool,
}

/// A job to start now, under the id its end is reported with.
#[derive(Debug, PartialEq, Eq)]
pub struct Start<J> {
    pub id: u64,
    pub policy: String,
    pub job: J,
}

/// What to do when a job arrives.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted<J> {
    /// The running job it supersedes: stop it.
    pub stop: Option<u64>,
    /// The job to start now, if any (the new one, or one that was waiting).
    pub start: Option<Start<J>>,
    /// Whether the new job waits behind another.
    pub waits: bool,
}

impl<J> Default for RunQueue<J> {
    fn default() -> Self {
        RunQueue {
            next_id: 1,
            running: None,
            waiting: VecDeque::new(),
        }
    }
}

impl<J> RunQueue<J> {
    /// A job for `policy` arrives.
    pub fn push(&mut self, policy: String, job: J) -> Admitted<J> {
        let stop = match &mut self.running {
            Some(r) if r.policy == policy && !r.stopping => {
                r.stopping = true;
                Some(r.id)
            }
            _ => None,
        };
        self.waiting.retain(|(p, _)| *p != policy);
        self.waiting.push_back((policy, job));
        let start = self.start_next();
        // The new job is last in line: it waits unless it just started.
        Admitted {
            stop,
            waits: !self.waiting.is_empty(),
            start,
        }
    }

    /// Job `id` ended (or was stopped): what to start next.
    pub fn finished(&mut self, id: u64) -> Option<Start<J>> {
        if self.running.as_ref().is_some_and(|r| r.id == id) {
            self.running = None;
        }
        self.start_next()
    }

    /// The policy of the running job (one being stopped included).
    pub fn running(&self) -> Option<&str> {
        self.running.as_ref().map(|r| r.policy.as_str())
    }

    /// The policies waiting, in the order they will run.
    pub fn waiting(&self) -> impl Iterator<Item = &str> {
        self.waiting.iter().map(|(p, _)| p.as_str())
    }

    fn start_next(&mut self) -> Option<Start<J>> {
        if self.running.is_some() {
            return None;
        }
        let (policy, job) = self.waiting.pop_front()?;
        let id = self.next_id;
        self.next_id += 1;
        self.running = Some(Running {
            id,
            policy: policy.clone(),
            stopping: false,
        });
        Some(Start { id, policy, job })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(id: u64, policy: &str, job: u32) -> Option<Start<u32>> {
        Some(Start {
            id,
            policy: policy.into(),
            job,
        })
    }

    #[test]
    fn an_idle_queue_starts_a_job_at_once() {
        let mut q = RunQueue::default();
        let a = q.push("ns/a".into(), 1);
        assert_eq!(
            a,
            Admitted {
                stop: None,
                start: start(1, "ns/a", 1),
                waits: false
            }
        );
        assert_eq!(q.running(), Some("ns/a"));
    }

    #[test]
    fn jobs_run_one_at_a_time_in_arrival_order() {
        let mut q = RunQueue::default();
        q.push("ns/a".into(), 1);
        let b = q.push("ns/b".into(), 2);
        let c = q.push("ns/c".into(), 3);
        assert!(b.waits && c.waits && b.start.is_none() && c.start.is_none());
        assert_eq!(q.waiting().collect::<Vec<_>>(), ["ns/b", "ns/c"]);
        assert_eq!(q.finished(1), start(2, "ns/b", 2));
        assert_eq!(q.finished(2), start(3, "ns/c", 3));
        assert_eq!(q.finished(3), None);
        assert_eq!(q.running(), None);
    }

    #[test]
    fn a_newer_job_for_the_running_policy_stops_it_and_waits_its_turn() {
        let mut q = RunQueue::default();
        q.push("ns/a".into(), 1);
        q.push("ns/b".into(), 2);
        let a2 = q.push("ns/a".into(), 3);
        // The running one is asked to stop; nothing starts until it has
        // ended. Then the waiting one, which came first, and the newer job
        // of ns/a after it.
        assert_eq!(a2.stop, Some(1));
        assert_eq!(a2.start, None);
        assert!(a2.waits);
        assert_eq!(q.running(), Some("ns/a"));
        assert_eq!(q.waiting().collect::<Vec<_>>(), ["ns/b", "ns/a"]);
        // A third job of ns/a does not stop it twice.
        let a3 = q.push("ns/a".into(), 4);
        assert_eq!(a3.stop, None);
        assert_eq!(q.finished(1), start(2, "ns/b", 2));
        assert_eq!(q.finished(2), start(3, "ns/a", 4));
        assert_eq!(q.finished(3), None);
    }

    #[test]
    fn a_newer_job_replaces_a_waiting_one_of_the_same_policy() {
        let mut q = RunQueue::default();
        q.push("ns/a".into(), 1);
        q.push("ns/b".into(), 2);
        q.push("ns/c".into(), 3);
        let b2 = q.push("ns/b".into(), 4);
        assert_eq!(b2.stop, None);
        assert!(b2.waits);
        assert_eq!(q.waiting().collect::<Vec<_>>(), ["ns/c", "ns/b"]);
        assert_eq!(q.finished(1), start(2, "ns/c", 3));
        assert_eq!(q.finished(2), start(3, "ns/b", 4));
    }

    #[test]
    fn a_newer_job_for_the_only_running_policy_starts_once_the_old_one_ended() {
        let mut q = RunQueue::default();
        q.push("ns/a".into(), 1);
        let a2 = q.push("ns/a".into(), 2);
        assert_eq!(
            a2,
            Admitted {
                stop: Some(1),
                start: None,
                waits: true
            }
        );
        assert_eq!(q.finished(1), start(2, "ns/a", 2));
    }

    #[test]
    fn the_end_of_an_unknown_job_changes_nothing() {
        let mut q = RunQueue::default();
        q.push("ns/a".into(), 1);
        q.push("ns/b".into(), 2);
        assert_eq!(q.finished(7), None);
        assert_eq!(q.running(), Some("ns/a"));
    }
}

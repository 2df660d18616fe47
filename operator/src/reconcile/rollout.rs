//! How many drifted terminals a policy may start remediating now: at most K
//! (or P% of the selected terminals) in flight, an optional canary batch
//! that must all succeed first, and a halt when the share of failures
//! passes the policy's threshold.

use tenet_crds::policy::Rollout;

/// Where a policy's rollout stands, counted over its selected terminals for
/// the current generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub selected: usize,
    /// Drifted and ready to start.
    pub ready: usize,
    /// Dispatched or verifying.
    pub in_flight: usize,
    /// Remediated and converged.
    pub succeeded: usize,
    /// Failed for good.
    pub failed: usize,
    /// Drifted after a failed attempt in this generation, retrying later
    /// or now; and of those, how many are ready now.
    pub retrying: usize,
    pub retry_ready: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start this many dispatches now (maybe 0: the limit is reached).
    Start { count: usize, canary: bool },
    /// Start nothing until the policy changes.
    Halted { reason: String },
}

/// Finished remediations a policy needs (or all its selected terminals,
/// when it selects fewer) before the failure threshold can halt it: one
/// terminal failing its first dispatch must not stop the whole fleet's.
pub const HALT_MIN_FINISHED: usize = 10;

/// The next step of a rollout.
pub fn step(rollout: &Rollout, c: &Counts) -> Step {
    let finished = c.succeeded + c.failed;
    let enough = finished > 0 && finished >= HALT_MIN_FINISHED.min(c.selected);
    if enough && c.failed * 100 > rollout.halt_on_failure_percent as usize * finished {
        return Step::Halted {
            reason: format!(
                "{} of {} finished remediations failed ({}%), over the {}% threshold",
                c.failed,
                finished,
                c.failed * 100 / finished,
                rollout.halt_on_failure_percent
            ),
        };
    }
    let limit = match (rollout.max_in_flight, rollout.max_in_flight_percent) {
        (Some(k), _) => k as usize,
        (None, Some(p)) => (c.selected * p as usize).div_ceil(100).max(1),
        (None, None) => c.selected.max(1),
    };
    let mut room = limit.saturating_sub(c.in_flight);
    let mut canary = false;
    if let Some(size) = rollout.canary.map(|s| s as usize) {
        if finished < size {
            // The canary batch: start up to `size` in all, then wait for
            // them. One that failed an attempt and retries keeps its place
            // (no other terminal starts in it), and may start its retry.
            canary = true;
            let fresh = size.saturating_sub(finished + c.in_flight + c.retrying);
            room = room.min(fresh + c.retry_ready);
        } else if c.failed > 0 && c.succeeded < size {
            return Step::Halted {
                reason: format!("{} of the {size} canary remediations failed", c.failed),
            };
        }
    }
    Step::Start {
        count: room.min(c.ready),
        canary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(k: Option<u32>, p: Option<u32>, canary: Option<u32>, halt: u32) -> Rollout {
        Rollout {
            max_in_flight: k,
            max_in_flight_percent: p,
            canary,
            halt_on_failure_percent: halt,
            windows: Vec::new(),
        }
    }

    fn counts(
        selected: usize,
        ready: usize,
        in_flight: usize,
        succeeded: usize,
        failed: usize,
    ) -> Counts {
        Counts {
            selected,
            ready,
            in_flight,
            succeeded,
            failed,
            retrying: 0,
            retry_ready: 0,
        }
    }

    #[test]
    fn a_canary_that_retries_keeps_its_place_in_the_batch() {
        let r = rollout(None, None, Some(1), 20);
        let retrying = |ready: usize| Counts {
            retrying: 1,
            retry_ready: ready,
            ..counts(10, 10, 0, 0, 0)
        };
        // Waiting for its retry: no other terminal starts in its place.
        assert_eq!(
            step(&r, &retrying(0)),
            Step::Start {
                count: 0,
                canary: true
            }
        );
        // Its retry is due: it (first in line) starts again, alone.
        assert_eq!(
            step(&r, &retrying(1)),
            Step::Start {
                count: 1,
                canary: true
            }
        );
        // Failed for good: halted.
        assert!(matches!(
            step(&r, &counts(10, 9, 0, 0, 1)),
            Step::Halted { .. }
        ));
    }

    #[test]
    fn limits_in_flight_by_count_or_percentage() {
        let r = rollout(Some(50), None, None, 100);
        assert_eq!(
            step(&r, &counts(1000, 900, 30, 0, 0)),
            Step::Start {
                count: 20,
                canary: false
            }
        );
        assert_eq!(
            step(&r, &counts(1000, 900, 50, 0, 0)),
            Step::Start {
                count: 0,
                canary: false
            }
        );
        let p = rollout(None, Some(25), None, 100);
        assert_eq!(
            step(&p, &counts(10, 10, 0, 0, 0)),
            Step::Start {
                count: 3,
                canary: false
            }
        );
        let unlimited = rollout(None, None, None, 100);
        assert_eq!(
            step(&unlimited, &counts(10_000, 10_000, 0, 0, 0)),
            Step::Start {
                count: 10_000,
                canary: false
            }
        );
    }

    #[test]
    fn the_canary_goes_first_and_must_succeed() {
        let r = rollout(Some(50), None, Some(10), 100);
        assert_eq!(
            step(&r, &counts(1000, 1000, 0, 0, 0)),
            Step::Start {
                count: 10,
                canary: true
            }
        );
        // Canary running: nothing more until it finishes.
        assert_eq!(
            step(&r, &counts(1000, 990, 10, 0, 0)),
            Step::Start {
                count: 0,
                canary: true
            }
        );
        assert_eq!(
            step(&r, &counts(1000, 990, 4, 6, 0)),
            Step::Start {
                count: 0,
                canary: true
            }
        );
        // All ten succeeded: the main rollout, up to 50 in flight.
        assert_eq!(
            step(&r, &counts(1000, 990, 0, 10, 0)),
            Step::Start {
                count: 50,
                canary: false
            }
        );
        // One canary failed.
        assert_eq!(
            step(&r, &counts(1000, 990, 0, 9, 1)),
            Step::Halted {
                reason: "1 of the 10 canary remediations failed".into()
            }
        );
    }

    #[test]
    fn one_failing_terminal_does_not_halt_the_fleet() {
        let r = rollout(Some(50), None, None, 20);
        // The first finished remediation failed: 100%, but of one.
        assert_eq!(
            step(&r, &counts(1000, 900, 10, 0, 1)),
            Step::Start {
                count: 40,
                canary: false
            }
        );
        assert_eq!(
            step(&r, &counts(1000, 900, 10, 7, 2)),
            Step::Start {
                count: 40,
                canary: false
            }
        );
        // Ten finished: the threshold applies.
        assert!(matches!(
            step(&r, &counts(1000, 900, 10, 8, 2)),
            Step::Start { .. }
        ));
        assert!(matches!(
            step(&r, &counts(1000, 900, 10, 7, 3)),
            Step::Halted { .. }
        ));
        // A policy selecting three terminals: all three count.
        assert!(matches!(
            step(&r, &counts(3, 0, 0, 1, 2)),
            Step::Halted { .. }
        ));
    }

    #[test]
    fn halts_when_failures_pass_the_threshold() {
        let r = rollout(Some(50), None, None, 20);
        assert_eq!(
            step(&r, &counts(100, 50, 10, 40, 10)),
            Step::Start {
                count: 40,
                canary: false
            }
        );
        assert_eq!(
            step(&r, &counts(100, 50, 10, 38, 12)),
            Step::Halted {
                reason: "12 of 50 finished remediations failed (24%), over the 20% threshold"
                    .into()
            }
        );
    }
}

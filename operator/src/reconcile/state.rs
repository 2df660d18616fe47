//! Where one terminal stands with one policy.
//!
//! ```text
//!             inventory drifts                 rollout starts it
//! Compliant ------------------> Drifted ----------------------------> Dispatched
//!    ^                           ^   ^                                 |  |  |
//!    |                           |   | failure, attempts left         |  |  | report verified,
//!    |                           |   +--------------------------------+  |  | payload succeeded
//!    |                           |     (retry after backoff)             |  v
//!    |   inventory satisfies     | terminal was offline: reissue         | Verifying
//!    +---------------------------+---------------------------------------+  |
//!    |                                                                      | inventory
//!    +----------------------------------------------------------------------+ satisfies
//!
//! Dispatched or Verifying --failure, no attempts left--> Failed (until the
//! drift goes away or the policy changes)
//! ```
//!
//! A terminal is Compliant after a remediation only when its report
//! verified (Verifying) *and* the next inventory satisfies the policy.

use std::time::Duration;

use tenet_protocol::report::REPORT_GRACE_MS;

use crate::store::PairRecord;

/// The state of one (terminal, policy) pair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PairState {
    /// No verified inventory yet.
    Unknown,
    Compliant,
    /// Drift seen; `attempts` dispatches failed so far; not before `retry_at_ms`.
    Drifted {
        attempts: u32,
        retry_at_ms: u64,
        reason: String,
    },
    /// An envelope is out (or queued for an offline terminal).
    Dispatched {
        attempt: u32,
        sequence: u64,
        deadline_ms: u64,
    },
    /// The report verified and the payload succeeded; waiting for an
    /// inventory that satisfies the policy.
    Verifying {
        attempt: u32,
        since_ms: u64,
    },
    Failed {
        attempts: u32,
        reason: String,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A verified inventory was evaluated: compliant, or the drift's reason.
    Inventory { drift: Option<String> },
    /// The rollout started a dispatch with this envelope.
    Started { sequence: u64, deadline_ms: u64 },
    /// The report for the live envelope verified and says the payload succeeded.
    Succeeded,
    /// The report verified but the payload failed, or the report was refused.
    Failed { reason: String },
    /// The live envelope's deadline (and the report grace) passed.
    Expired,
    /// The terminal reconnected before the live envelope was delivered: it
    /// gets a fresh envelope, and this attempt does not count.
    Undelivered,
    /// The terminal did not start the payload, and that is no failure of
    /// it (outside a maintenance window): it gets a fresh envelope when it
    /// may, and this attempt does not count.
    NotStarted { reason: String },
    /// The policy has a new generation: attempts start over.
    PolicyChanged,
}

/// Retry policy of a pair, from the policy's remediation section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub max_attempts: u32,
    /// The first retry's delay; doubled per attempt, capped at `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 5,
            base_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(3600),
        }
    }
}

impl Retry {
    /// Delay before the attempt after `failed_attempts` failures, with
    /// `jitter` in [0, 1] adding up to half again.
    pub fn delay(&self, failed_attempts: u32, jitter: f64) -> Duration {
        let doubled = self
            .base_delay
            .saturating_mul(1u32 << failed_attempts.saturating_sub(1).min(20));
        let base = doubled.min(self.max_delay);
        base + base.mul_f64(0.5 * jitter.clamp(0.0, 1.0))
    }
}

impl PairState {
    /// Whether the rollout may start a dispatch for this pair now.
    pub fn ready(&self, now_ms: u64) -> bool {
        matches!(self, PairState::Drifted { retry_at_ms, .. } if *retry_at_ms <= now_ms)
    }

    /// Whether an envelope is live (at most one per pair).
    pub fn in_flight(&self) -> bool {
        matches!(
            self,
            PairState::Dispatched { .. } | PairState::Verifying { .. }
        )
    }

    /// The state name a person sees.
    pub fn name(&self) -> &'static str {
        match self {
            PairState::Unknown => "Unknown",
            PairState::Compliant => "Compliant",
            PairState::Drifted { .. } => "Drifted",
            PairState::Dispatched { .. } => "Dispatched",
            PairState::Verifying { .. } => "Verifying",
            PairState::Failed { .. } => "Failed",
        }
    }
}

/// The next state. Events that do not apply to a state leave it as it is.
/// A pair drifting after as many failed attempts as its policy allows is
/// Failed. (Reports are taken where the policy is not at hand; the pass
/// applies the policy's `maxAttempts` with this.)
pub fn exhausted(state: &PairState, max_attempts: u32) -> Option<PairState> {
    match state {
        PairState::Drifted {
            attempts, reason, ..
        } if *attempts > 0 && *attempts >= max_attempts => Some(PairState::Failed {
            attempts: *attempts,
            reason: reason.clone(),
        }),
        _ => None,
    }
}

pub fn next(
    state: &PairState,
    event: &Event,
    retry: &Retry,
    now_ms: u64,
    jitter: f64,
) -> PairState {
    use PairState as S;
    let fail = |attempt: u32, reason: &str| {
        if attempt >= retry.max_attempts {
            S::Failed {
                attempts: attempt,
                reason: reason.to_string(),
            }
        } else {
            S::Drifted {
                attempts: attempt,
                retry_at_ms: now_ms + retry.delay(attempt, jitter).as_millis() as u64,
                reason: reason.to_string(),
            }
        }
    };
    match (state, event) {
        // A live envelope resolves first, whatever the inventory says.
        (S::Dispatched { .. }, Event::Inventory { .. }) => state.clone(),
        (S::Verifying { .. }, Event::Inventory { drift: None }) => S::Compliant,
        (
            S::Verifying { attempt, .. },
            Event::Inventory {
                drift: Some(reason),
            },
        ) => fail(
            *attempt,
            &format!("the payload succeeded but the terminal still drifts: {reason}"),
        ),
        (_, Event::Inventory { drift: None }) => S::Compliant,
        (
            S::Unknown | S::Compliant,
            Event::Inventory {
                drift: Some(reason),
            },
        ) => S::Drifted {
            attempts: 0,
            retry_at_ms: now_ms,
            reason: reason.clone(),
        },
        // After a failed attempt the reason says why it failed; before, what drifts.
        (
            S::Drifted {
                attempts,
                retry_at_ms,
                reason: last,
            },
            Event::Inventory {
                drift: Some(reason),
            },
        ) => S::Drifted {
            attempts: *attempts,
            retry_at_ms: *retry_at_ms,
            reason: if *attempts == 0 {
                reason.clone()
            } else {
                last.clone()
            },
        },
        (
            S::Drifted { attempts, .. },
            Event::Started {
                sequence,
                deadline_ms,
            },
        ) => S::Dispatched {
            attempt: attempts + 1,
            sequence: *sequence,
            deadline_ms: *deadline_ms,
        },
        (S::Dispatched { attempt, .. }, Event::Succeeded) => S::Verifying {
            attempt: *attempt,
            since_ms: now_ms,
        },
        (S::Dispatched { attempt, .. }, Event::Failed { reason }) => fail(*attempt, reason),
        (S::Dispatched { attempt, .. }, Event::Expired) => {
            fail(*attempt, "no verified report before the deadline")
        }
        (S::Dispatched { attempt, .. }, Event::NotStarted { reason }) => S::Drifted {
            attempts: attempt.saturating_sub(1),
            retry_at_ms: now_ms,
            reason: reason.clone(),
        },
        (S::Dispatched { attempt, .. }, Event::Undelivered) => S::Drifted {
            attempts: attempt.saturating_sub(1),
            retry_at_ms: now_ms,
            reason: "reissued: the terminal was offline".into(),
        },
        (S::Failed { reason, .. } | S::Drifted { reason, .. }, Event::PolicyChanged) => {
            S::Drifted {
                attempts: 0,
                retry_at_ms: now_ms,
                reason: reason.clone(),
            }
        }
        _ => state.clone(),
    }
}

/// What a reconcile pass sees of one pair: the policy's generation, the
/// terminal's drift from it (`None`: compliant) and when the inventory it
/// was judged on arrived.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub generation: u64,
    pub drift: Option<&'a str>,
    pub received_ms: u64,
}

/// Every transition a reconcile pass makes to a pair, in order: a new
/// policy generation, an expired dispatch, the inventory (a Verifying pair
/// only takes one that arrived after its report), and the policy's attempt
/// limit. `None` is a pair seen for the first time. `updated_ms` is the
/// caller's to set when the record changed.
pub fn apply_pass(
    current: Option<&PairRecord>,
    seen: Observed<'_>,
    retry: &Retry,
    now_ms: u64,
    jitter: f64,
) -> PairRecord {
    let mut record = current.cloned().unwrap_or(PairRecord {
        generation: seen.generation,
        state: PairState::Unknown,
        updated_ms: now_ms,
        remediated: false,
    });
    let step = |s: &PairState, e: Event| next(s, &e, retry, now_ms, jitter);
    if record.generation != seen.generation {
        record.state = step(&record.state, Event::PolicyChanged);
        record.generation = seen.generation;
        record.remediated = false;
    }
    if let PairState::Dispatched { deadline_ms, .. } = record.state
        && now_ms > deadline_ms.saturating_add(REPORT_GRACE_MS)
    {
        record.state = step(&record.state, Event::Expired);
    }
    let fresh = match record.state {
        PairState::Verifying { since_ms, .. } => seen.received_ms >= since_ms,
        _ => true,
    };
    if fresh {
        let was_verifying = matches!(record.state, PairState::Verifying { .. });
        let drift = seen.drift.map(str::to_string);
        record.state = step(&record.state, Event::Inventory { drift });
        if was_verifying && record.state == PairState::Compliant {
            record.remediated = true;
        }
    }
    if let Some(failed) = exhausted(&record.state, retry.max_attempts) {
        record.state = failed;
    }
    record
}

/// The pass's fast path: whether [`apply_pass`] would leave `record` as it
/// is (still compliant; still drifting for the same reason, or between
/// attempts; still out before its deadline), so the pass can skip it
/// without copying anything. A property test holds the two together.
pub fn unchanged_by_pass(
    record: &PairRecord,
    seen: Observed<'_>,
    retry: &Retry,
    now_ms: u64,
) -> bool {
    if record.generation != seen.generation {
        return false;
    }
    match (&record.state, seen.drift) {
        (PairState::Compliant, None) => true,
        (
            PairState::Drifted {
                attempts, reason, ..
            },
            Some(d),
        ) => (*attempts > 0 && *attempts < retry.max_attempts) || (*attempts == 0 && reason == d),
        (PairState::Dispatched { deadline_ms, .. }, _) => {
            now_ms <= deadline_ms.saturating_add(REPORT_GRACE_MS)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Retry = Retry {
        max_attempts: 3,
        base_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(60),
    };

    fn drift(reason: &str) -> Event {
        Event::Inventory {
            drift: Some(reason.into()),
        }
    }

    fn run(events: &[(u64, Event)]) -> PairState {
        events
            .iter()
            .fold(PairState::Unknown, |s, (now, e)| next(&s, e, &R, *now, 0.0))
    }

    #[test]
    fn drift_dispatch_verify_converge() {
        let started = Event::Started {
            sequence: 7,
            deadline_ms: 600_000,
        };
        let s = run(&[(0, drift("browser-a 118 < 120")), (1, started.clone())]);
        assert_eq!(
            s,
            PairState::Dispatched {
                attempt: 1,
                sequence: 7,
                deadline_ms: 600_000
            }
        );
        assert!(s.in_flight());
        // An inventory while the envelope is live changes nothing.
        assert_eq!(next(&s, &Event::Inventory { drift: None }, &R, 2, 0.0), s);
        let v = next(&s, &Event::Succeeded, &R, 3, 0.0);
        assert_eq!(
            v,
            PairState::Verifying {
                attempt: 1,
                since_ms: 3
            }
        );
        // Compliant only once the next inventory satisfies the policy.
        assert_eq!(
            next(&v, &Event::Inventory { drift: None }, &R, 4, 0.0),
            PairState::Compliant
        );
    }

    #[test]
    fn a_policy_with_fewer_attempts_fails_sooner() {
        let drifted = |attempts| PairState::Drifted {
            attempts,
            retry_at_ms: 5,
            reason: "dpkg: error".into(),
        };
        assert_eq!(exhausted(&drifted(0), 1), None);
        assert_eq!(exhausted(&drifted(2), 3), None);
        assert_eq!(
            exhausted(&drifted(3), 3),
            Some(PairState::Failed {
                attempts: 3,
                reason: "dpkg: error".into()
            })
        );
        assert_eq!(exhausted(&PairState::Compliant, 0), None);
    }

    #[test]
    fn failures_back_off_then_fail_with_the_reason() {
        let started = |seq| Event::Started {
            sequence: seq,
            deadline_ms: 10_000,
        };
        let fail = Event::Failed {
            reason: "exit code 1".into(),
        };
        let s = run(&[(0, drift("d")), (0, started(1)), (100, fail.clone())]);
        assert_eq!(
            s,
            PairState::Drifted {
                attempts: 1,
                retry_at_ms: 10_100,
                reason: "exit code 1".into()
            }
        );
        assert!(!s.ready(10_099));
        assert!(s.ready(10_100));
        let s = next(&s, &started(2), &R, 10_100, 0.0);
        let s = next(&s, &Event::Expired, &R, 20_000, 0.0);
        // Second failure: 20 s.
        assert!(
            matches!(
                s,
                PairState::Drifted {
                    attempts: 2,
                    retry_at_ms: 40_000,
                    ..
                }
            ),
            "{s:?}"
        );
        let s = next(&s, &started(3), &R, 40_000, 0.0);
        let s = next(&s, &fail, &R, 41_000, 0.0);
        assert_eq!(
            s,
            PairState::Failed {
                attempts: 3,
                reason: "exit code 1".into()
            }
        );
        // Failed stays failed while the drift remains...
        assert_eq!(next(&s, &drift("d"), &R, 50_000, 0.0), s);
        // ...and starts over when the policy changes.
        assert!(next(&s, &Event::PolicyChanged, &R, 60_000, 0.0).ready(60_000));
    }

    #[test]
    fn a_payload_that_succeeds_without_fixing_the_drift_is_a_failure() {
        let s = run(&[
            (0, drift("d")),
            (
                0,
                Event::Started {
                    sequence: 1,
                    deadline_ms: 1,
                },
            ),
            (1, Event::Succeeded),
            (2, drift("browser-a 118 < 120")),
        ]);
        assert!(
            matches!(&s, PairState::Drifted { attempts: 1, reason, .. } if reason == "the payload succeeded but the terminal still drifts: browser-a 118 < 120"),
            "{s:?}"
        );
    }

    #[test]
    fn a_payload_not_started_outside_its_window_does_not_count() {
        let event = crate::fleet::report_event(
            &tenet_protocol::report::Outcome::Refused {
                reason: "OutsideWindow".into(),
                message:
                    "not now: outside the maintenance windows (the next opens Thu 02:00 Asia/Tokyo)"
                        .into(),
            },
            b"",
        );
        let s = run(&[
            (0, drift("d")),
            (
                0,
                Event::Started {
                    sequence: 1,
                    deadline_ms: 100,
                },
            ),
            (50, event),
        ]);
        assert_eq!(
            s,
            PairState::Drifted {
                attempts: 0,
                retry_at_ms: 50,
                reason: "the terminal did not start it: not now: outside the maintenance windows (the next opens Thu 02:00 Asia/Tokyo)".into(),
            }
        );
    }

    #[test]
    fn an_undelivered_envelope_is_reissued_without_counting() {
        let s = run(&[
            (0, drift("d")),
            (
                0,
                Event::Started {
                    sequence: 1,
                    deadline_ms: 100,
                },
            ),
            (50, Event::Undelivered),
        ]);
        assert!(
            matches!(
                s,
                PairState::Drifted {
                    attempts: 0,
                    retry_at_ms: 50,
                    ..
                }
            ),
            "{s:?}"
        );
    }

    #[test]
    fn drift_that_comes_back_is_remediated_again() {
        let s = run(&[
            (0, drift("d")),
            (1, Event::Inventory { drift: None }),
            (2, drift("again")),
        ]);
        assert!(s.ready(2));
    }

    #[test]
    fn retry_delays_double_jitter_and_cap() {
        assert_eq!(R.delay(1, 0.0), Duration::from_secs(10));
        assert_eq!(R.delay(2, 0.0), Duration::from_secs(20));
        assert_eq!(R.delay(3, 1.0), Duration::from_secs(60));
        assert_eq!(R.delay(10, 0.0), Duration::from_secs(60));
        assert_eq!(R.delay(10, 1.0), Duration::from_secs(90));
    }

    mod pass_fast_path {
        use super::super::*;
        use proptest::prelude::*;

        fn state() -> impl Strategy<Value = PairState> {
            let reason = prop::sample::select(vec!["a", "b"]).prop_map(str::to_string);
            prop_oneof![
                Just(PairState::Unknown),
                Just(PairState::Compliant),
                (0u32..5, 0u64..200_000, reason.clone()).prop_map(
                    |(attempts, retry_at_ms, reason)| {
                        PairState::Drifted {
                            attempts,
                            retry_at_ms,
                            reason,
                        }
                    }
                ),
                (0u32..5, 0u64..5, 0u64..200_000).prop_map(|(attempt, sequence, deadline_ms)| {
                    PairState::Dispatched {
                        attempt,
                        sequence,
                        deadline_ms,
                    }
                }),
                (0u32..5, 0u64..200_000)
                    .prop_map(|(attempt, since_ms)| PairState::Verifying { attempt, since_ms }),
                (0u32..5, reason)
                    .prop_map(|(attempts, reason)| PairState::Failed { attempts, reason }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4096, rng_seed: proptest::test_runner::RngSeed::Fixed(19), ..ProptestConfig::default() })]
            /// Whatever the pair, the pass and the time: when the fast path
            /// skips a pair, the full transition would not have changed it.
            #[test]
            fn the_fast_path_skips_only_what_apply_leaves_unchanged(
                state in state(),
                generation in 1u64..3,
                seen_generation in 1u64..3,
                remediated: bool,
                drift in prop::option::of(prop::sample::select(vec!["a", "b"])),
                received_ms in 0u64..300_000,
                now_ms in 0u64..300_000,
                max_attempts in 1u32..4,
                jitter in 0.0f64..1.0,
            ) {
                let record = PairRecord { generation, state, updated_ms: 0, remediated };
                let seen = Observed { generation: seen_generation, drift, received_ms };
                let retry = Retry { max_attempts, ..Retry::default() };
                if unchanged_by_pass(&record, seen, &retry, now_ms) {
                    prop_assert_eq!(apply_pass(Some(&record), seen, &retry, now_ms, jitter), record);
                }
            }
        }
    }
}

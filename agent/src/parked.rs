//! Dispatches waiting for their bundle, in the order they came: a pure
//! queue, no I/O. A dispatch by digest whose bundle the terminal lacks
//! waits while the bundle is asked for; every later dispatch waits behind
//! it, even one whose bundle is at hand, because a terminal takes
//! envelopes in sequence order and refuses one older than the last it
//! took. A dispatch that waits too long is handed over without a bundle
//! (it is refused, with a signed report), and so is one that finds the
//! queue full.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tenet_protocol::session::SharedBytes;

/// At most this many dispatches wait in one session.
pub const MAX_PARKED: usize = 64;
/// How long a dispatch waits for its bundle before it is refused.
pub const PATIENCE: Duration = Duration::from_secs(120);

struct Entry {
    envelope: Vec<u8>,
    digest: Option<[u8; 32]>,
    bundle: Option<SharedBytes>,
    since: Instant,
}

#[derive(Default)]
pub struct Parked {
    queue: VecDeque<Entry>,
}

/// What to do with a dispatch that arrives.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Queued; ask for this digest (nothing queued waits for it yet).
    Ask([u8; 32]),
    /// Queued (its bundle is at hand, or already asked for).
    Queued,
    /// The queue is full: take it now without a bundle (refused).
    Full,
}

impl Parked {
    /// A dispatch arrives, with its bundle or waiting for the one with
    /// `digest`.
    pub fn push(
        &mut self,
        envelope: Vec<u8>,
        bundle: Result<SharedBytes, [u8; 32]>,
        now: Instant,
    ) -> Arrival {
        if self.queue.len() >= MAX_PARKED {
            return Arrival::Full;
        }
        let arrival = match &bundle {
            Err(digest) if !self.waits_for(digest) => Arrival::Ask(*digest),
            _ => Arrival::Queued,
        };
        let (digest, bundle) = match bundle {
            Ok(b) => (None, Some(b)),
            Err(d) => (Some(d), None),
        };
        self.queue.push_back(Entry {
            envelope,
            digest,
            bundle,
            since: now,
        });
        arrival
    }

    fn waits_for(&self, digest: &[u8; 32]) -> bool {
        self.queue
            .iter()
            .any(|e| e.bundle.is_none() && e.digest.as_ref() == Some(digest))
    }

    /// The bundle with `digest` came: every dispatch waiting for it has it.
    /// Whether any was waiting (a bundle nobody asked for is not kept).
    pub fn fill(&mut self, digest: &[u8; 32], bundle: &SharedBytes) -> bool {
        let mut any = false;
        for e in &mut self.queue {
            if e.bundle.is_none() && e.digest.as_ref() == Some(digest) {
                e.bundle = Some(bundle.clone());
                any = true;
            }
        }
        any
    }

    /// The dispatches to take now, in order: from the front, each with its
    /// bundle, or without one (to be refused) once it waited `patience`.
    pub fn ready(&mut self, now: Instant, patience: Duration) -> Vec<(Vec<u8>, SharedBytes)> {
        let mut out = Vec::new();
        while let Some(front) = self.queue.front() {
            let give_up = now.duration_since(front.since) >= patience;
            if front.bundle.is_none() && !give_up {
                break;
            }
            let Some(e) = self.queue.pop_front() else {
                break;
            };
            out.push((e.envelope, e.bundle.unwrap_or_default()));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u8) -> SharedBytes {
        SharedBytes::new(vec![n])
    }

    #[test]
    fn a_dispatch_at_hand_waits_behind_one_that_waits_for_its_bundle() {
        let mut p = Parked::default();
        let t = Instant::now();
        assert_eq!(
            p.push(b"n".to_vec(), Err([1; 32]), t),
            Arrival::Ask([1; 32])
        );
        assert_eq!(p.push(b"n+1".to_vec(), Ok(b(2)), t), Arrival::Queued);
        // A second dispatch of the same missing bundle does not ask again.
        assert_eq!(p.push(b"n+2".to_vec(), Err([1; 32]), t), Arrival::Queued);
        assert!(p.ready(t, PATIENCE).is_empty(), "n+1 waits behind n");
        assert!(!p.fill(&[9; 32], &b(9)), "nobody asked for that");
        assert!(p.fill(&[1; 32], &b(1)));
        assert_eq!(
            p.ready(t, PATIENCE),
            vec![
                (b"n".to_vec(), b(1)),
                (b"n+1".to_vec(), b(2)),
                (b"n+2".to_vec(), b(1))
            ]
        );
        assert!(p.is_empty());
    }

    #[test]
    fn a_bundle_that_never_comes_gives_way_after_the_patience() {
        let mut p = Parked::default();
        let t = Instant::now();
        p.push(b"n".to_vec(), Err([1; 32]), t);
        p.push(b"n+1".to_vec(), Ok(b(2)), t);
        assert!(p.ready(t + PATIENCE / 2, PATIENCE).is_empty());
        assert_eq!(
            p.ready(t + PATIENCE, PATIENCE),
            vec![
                (b"n".to_vec(), SharedBytes::default()),
                (b"n+1".to_vec(), b(2))
            ]
        );
        // Asked for again by the next dispatch that lacks it.
        assert_eq!(
            p.push(b"n+2".to_vec(), Err([1; 32]), t),
            Arrival::Ask([1; 32])
        );
    }

    #[test]
    fn a_full_queue_takes_no_more() {
        let mut p = Parked::default();
        let t = Instant::now();
        for i in 0..MAX_PARKED {
            assert_ne!(p.push(vec![i as u8], Err([1; 32]), t), Arrival::Full);
        }
        assert_eq!(p.push(b"x".to_vec(), Ok(b(1)), t), Arrival::Full);
    }
}

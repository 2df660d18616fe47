//! One reconcile pass: for every policy and every enrolled terminal with a
//! verified inventory, evaluate the policy, move the pair's state machine
//! (policy changes, expired dispatches, fresh inventories), count the
//! rollout, and start the dispatches it allows: a fresh nonce, the next
//! sequence number (committed first), a signed envelope, and the live
//! dispatch recorded with only the nonce's commitment before anything is
//! sent. Offline terminals wait; they get a fresh envelope once online.

use std::collections::HashMap;

use serde::Serialize;
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::keys::random_bytes;
use tenet_protocol::report::{DispatchRecord, nonce_commitment};
use tenet_protocol::wire::{digest_string, parse_digest};
use tenet_protocol::{SignedMessage, Signer};

use super::rollout::{Counts, Step, step};
use super::state::{Event, Observed, PairState, Retry, apply_pass, next, unchanged_by_pass};
use crate::policy::{CompiledPolicy, TerminalView, evaluate};
use crate::store::{LiveDispatch, PairRecord, Store, StoreError, StoredInventory};

/// A signed bundle the operator can dispatch.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub digest: [u8; 32],
    /// Shared: the operator keeps bundles across passes without copying them.
    pub bytes: std::sync::Arc<Vec<u8>>,
}

/// What to push to a terminal.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub terminal: String,
    /// `namespace/name` of the policy.
    pub policy: String,
    pub envelope_digest: [u8; 32],
    pub envelope: Vec<u8>,
    /// Shared with the operator's bundle cache.
    pub bundle: tenet_protocol::session::SharedBytes,
    /// Its body digest (what the envelope names).
    pub bundle_digest: [u8; 32],
}

/// A policy's status after a pass (also what `tenet status` shows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PolicyStatus {
    pub policy: String,
    pub generation: i64,
    /// The resource's `metadata.generation` (see `CompiledPolicy`).
    #[serde(default)]
    pub observed_generation: i64,
    pub selected: u32,
    pub compliant: u32,
    pub drifted: u32,
    pub remediating: u32,
    pub failed: u32,
    /// Why nothing is dispatched, when something stops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// Whether the policy remediates drift (it has a remediation and is not
    /// suspended); if not, its drift is only reported.
    #[serde(default)]
    pub remediates: bool,
    /// Why the policy's latest version is not in force: its edit is not
    /// approved by the admins (`policy::approval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unapproved: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot sign an envelope: {0}")]
    Sign(#[from] tenet_protocol::keys::KeyError),
}

/// Each terminal's verdict per policy (`None`: not selected; `Some(None)`:
/// compliant; `Some(Some(reason))`: drifted), for the inventory it was
/// computed from and the policies in force then.
#[derive(Default)]
pub struct Evaluations {
    policies: Vec<(String, i64)>,
    /// The store's labels epoch the verdicts were made under.
    labels_epoch: u64,
    #[allow(clippy::type_complexity)]
    terminals: HashMap<String, (std::sync::Arc<StoredInventory>, Vec<Option<Option<String>>>)>,
}

enum CacheRef<'a> {
    Shared(std::sync::MutexGuard<'a, Evaluations>),
    Own(&'a mut Evaluations),
}

impl CacheRef<'_> {
    fn get(&mut self) -> &mut Evaluations {
        match self {
            CacheRef::Shared(g) => g,
            CacheRef::Own(e) => e,
        }
    }
}

/// A terminal a policy selects, as this pass saw it.
#[derive(Clone)]
struct Seen<'a> {
    terminal: &'a str,
    /// When its inventory was received.
    received_ms: u64,
    /// Why it drifts from the policy, if it does.
    drift: Option<&'a str>,
}

pub struct Pass<'a> {
    pub store: &'a Store,
    pub policies: &'a [CompiledPolicy],
    /// Signed bundles by name.
    pub bundles: &'a HashMap<String, Bundle>,
    pub dispatch_key: &'a dyn Signer,
    pub online: &'a dyn Fn(&str) -> bool,
    pub retry: Retry,
    pub now_ms: u64,
    pub jitter: f64,
    /// Evaluations kept between passes (`None`: evaluate everything).
    pub evaluations: Option<&'a std::sync::Mutex<Evaluations>>,
}

/// A dispatch that could not be handed to its terminal (it went offline
/// between the pass and the send): it goes back to Drifted, ready, and the
/// attempt does not count; the next pass issues a fresh envelope.
pub fn undelivered(store: &Store, o: &Outgoing, retry: &Retry, now_ms: u64) {
    if let Some(mut record) = store.pair(&o.terminal, &o.policy) {
        record.state = next(&record.state, &Event::Undelivered, retry, now_ms, 0.0);
        record.updated_ms = now_ms;
        store.set_pair(&o.terminal, &o.policy, &record);
    }
}

impl Pass<'_> {
    pub fn run(&self) -> Result<(Vec<Outgoing>, Vec<PolicyStatus>), PassError> {
        let inventories = self.store.inventories();
        // Terminal by terminal: one indexed view at a time (indexing every
        // terminal first cost ~9 KiB per terminal at the pass's peak), and
        // per policy only what the state machine needs.
        // A terminal is evaluated again only when its inventory or the
        // policies in force changed since the last pass.
        let mut fresh_cache = Evaluations::default();
        let mut cache = match self.evaluations {
            Some(m) => {
                CacheRef::Shared(m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            }
            None => CacheRef::Own(&mut fresh_cache),
        };
        let cache = cache.get();
        let in_force: Vec<(String, i64)> = self
            .policies
            .iter()
            .map(|p| (p.key(), p.generation))
            .collect();
        let labels_epoch = self.store.labels_epoch();
        if cache.policies != in_force || cache.labels_epoch != labels_epoch {
            cache.terminals.clear();
            cache.policies = in_force;
            cache.labels_epoch = labels_epoch;
        }
        if cache.terminals.len() > inventories.len() {
            let names: std::collections::HashSet<&str> =
                inventories.iter().map(|(n, _)| n.as_str()).collect();
            cache.terminals.retain(|n, _| names.contains(n.as_str()));
        }
        for (name, inv) in &inventories {
            let cached = cache
                .terminals
                .get(name)
                .is_some_and(|(known, _)| std::sync::Arc::ptr_eq(known, inv));
            if !cached {
                let assigned = self.store.assigned_labels(name);
                let view = TerminalView::new(&inv.inventory, &assigned);
                let verdicts = self
                    .policies
                    .iter()
                    .map(|policy| {
                        let eval = evaluate(policy, &view);
                        eval.selected.then(|| {
                            let drift: Vec<String> = eval
                                .drift()
                                .iter()
                                .map(|r| format!("{}: {}", r.requirement, r.reason))
                                .collect();
                            (!drift.is_empty()).then(|| drift.join("; "))
                        })
                    })
                    .collect();
                cache
                    .terminals
                    .insert(name.clone(), (inv.clone(), verdicts));
            }
        }
        let cache = &*cache;
        let mut seen: Vec<Vec<Seen<'_>>> = vec![Vec::new(); self.policies.len()];
        for (name, inv) in &inventories {
            let Some((_, verdicts)) = cache.terminals.get(name) else {
                continue;
            };
            for (verdict, seen) in verdicts.iter().zip(seen.iter_mut()) {
                if let Some(drift) = verdict {
                    seen.push(Seen {
                        terminal: name.as_str(),
                        received_ms: inv.received_ms,
                        drift: drift.as_deref(),
                    });
                }
            }
        }
        let mut outgoing = Vec::new();
        let mut statuses = Vec::new();
        for (policy, seen) in self.policies.iter().zip(seen) {
            let (status, out) = self.policy(policy, seen)?;
            statuses.push(status);
            outgoing.extend(out);
        }
        Ok((outgoing, statuses))
    }

    fn policy(
        &self,
        policy: &CompiledPolicy,
        seen: Vec<Seen<'_>>,
    ) -> Result<(PolicyStatus, Vec<Outgoing>), PassError> {
        let key = policy.key();
        let generation = policy.generation.max(0) as u64;
        let mut status = PolicyStatus {
            policy: key.clone(),
            generation: policy.generation,
            observed_generation: policy.observed_generation,
            remediates: policy.spec.remediation.is_some() && !policy.spec.suspend,
            ..PolicyStatus::default()
        };
        // The policy's own retry limit (the operator's default otherwise).
        let retry = Retry {
            max_attempts: policy
                .spec
                .remediation
                .as_ref()
                .map_or(self.retry.max_attempts, |r| r.max_attempts.max(1)),
            ..self.retry
        };
        let mut counts = Counts::default();
        let mut changes: Vec<(&str, Option<PairRecord>, PairRecord)> = Vec::new();
        // Terminals ready for a dispatch, in name order.
        let mut candidates: Vec<&str> = Vec::new();
        // ... of which retries of a remediation already attempted in this
        // generation: they go first (a canary that failed an attempt holds
        // its place in the canary batch).
        let mut retries: Vec<&str> = Vec::new();
        // Every pair of the policy is read under one lock (one lock per
        // pair fought the gateway's threads at 10,000 terminals); the
        // changes are written back together, each only if the pair did
        // not change meanwhile (a report can land during the pass).
        // More pairs than terminals selected: some it selects no more. (The
        // common case costs a length comparison.)
        let unselected = self.store.pair_count(&key) > seen.len();
        let selected: std::collections::HashSet<&str> = if unselected {
            seen.iter().map(|s| s.terminal).collect()
        } else {
            Default::default()
        };
        self.store.with_policy_pairs(&key, |pairs| {
            for Seen {
                terminal,
                received_ms,
                drift,
            } in seen
            {
                counts.selected += 1;
                let current = pairs.get(terminal);
                let seen = Observed {
                    generation,
                    drift,
                    received_ms,
                };
                // The common cases change nothing and copy nothing: still
                // compliant, still drifting for the same reason, still out.
                if let Some(r) = current.filter(|r| unchanged_by_pass(r, seen, &retry, self.now_ms))
                {
                    match &r.state {
                        PairState::Compliant => {
                            status.compliant += 1;
                            counts.succeeded += usize::from(r.remediated);
                        }
                        PairState::Drifted { attempts, .. } => {
                            status.drifted += 1;
                            let retry = *attempts > 0;
                            counts.retrying += usize::from(retry);
                            if r.state.ready(self.now_ms) {
                                if retry {
                                    retries.push(terminal);
                                } else {
                                    candidates.push(terminal);
                                }
                            }
                        }
                        _ => {
                            status.remediating += 1;
                            counts.in_flight += 1;
                        }
                    }
                    continue;
                }
                let before = current.cloned();
                let mut record = apply_pass(current, seen, &retry, self.now_ms, self.jitter);
                match &record.state {
                    PairState::Compliant => {
                        status.compliant += 1;
                        if record.remediated {
                            counts.succeeded += 1;
                        }
                    }
                    PairState::Drifted { .. } | PairState::Unknown => status.drifted += 1,
                    PairState::Dispatched { .. } | PairState::Verifying { .. } => {
                        status.remediating += 1;
                        counts.in_flight += 1;
                    }
                    PairState::Failed { .. } => {
                        status.failed += 1;
                        counts.failed += 1;
                    }
                }
                let retry =
                    matches!(record.state, PairState::Drifted { attempts, .. } if attempts > 0);
                counts.retrying += usize::from(retry);
                if record.state.ready(self.now_ms) {
                    if retry {
                        retries.push(terminal);
                    } else {
                        candidates.push(terminal);
                    }
                }
                if before.as_ref() != Some(&record) {
                    record.updated_ms = self.now_ms;
                    changes.push((terminal, before, record));
                }
            }
        });
        // A pair that changed under the pass is looked at again next pass.
        let lost = self.store.swap_pairs(&key, &changes);
        // Terminals it no longer selects (their assigned labels or claims
        // changed): their pairs go, so that they count no more.
        if unselected {
            self.store.forget_unselected_pairs(&key, &selected);
        }
        counts.retry_ready = retries.len();
        let ready = retries
            .into_iter()
            .chain(candidates)
            .filter(|t| !lost.contains(*t));
        status.selected = counts.selected as u32;
        let mut ready = ready.peekable();
        // Only a bound (some may be offline): the rollout never starts
        // more than its room anyway.
        counts.ready = if ready.peek().is_some() {
            usize::MAX
        } else {
            0
        };

        let Some(remediation) = policy.spec.remediation.as_ref() else {
            return Ok((status, Vec::new()));
        };
        if policy.spec.suspend {
            status.held = Some("the policy is suspended".into());
            return Ok((status, Vec::new()));
        }
        let count = match step(&policy.spec.rollout, &counts) {
            Step::Halted { reason } => {
                status.held = Some(format!("rollout halted: {reason}"));
                return Ok((status, Vec::new()));
            }
            Step::Start { count, .. } => count,
        };
        if count == 0 {
            return Ok((status, Vec::new()));
        }
        // Only inside a maintenance window the admins approved (and said
        // only when something waits for one).
        let windows = policy
            .statement
            .remediation
            .as_ref()
            .map_or(&[][..], |r| &r.windows[..]);
        if let Some(next) = tenet_protocol::window::closed(windows, self.now_ms) {
            status.held = Some(format!("waiting for a maintenance window ({next})"));
            return Ok((status, Vec::new()));
        }
        // Only approved policies reach a pass (`policy::approval::Gate`);
        // the terminal checks the approval again against each envelope.
        let approval = match &policy.approval {
            Ok(frame) => frame.clone(),
            Err(why) => {
                status.held = Some(format!("not approved: {why}"));
                return Ok((status, Vec::new()));
            }
        };
        // What runs is what the admins approved: the statement's
        // remediation (for an auto policy, computed by Tenet with the
        // bundle its approval names).
        let Some(approved) = policy.statement.remediation.as_ref() else {
            status.held = Some("nothing to remediate with".into());
            return Ok((status, Vec::new()));
        };
        let bundle = match &remediation.payload {
            Some(payload) => match self.bundles.get(&payload.name) {
                Some(b) if Some(b.digest) == parse_digest(&payload.digest) => b,
                Some(b) => {
                    status.held = Some(format!(
                        "bundle {} has digest {}, the policy pins {}",
                        payload.name,
                        digest_string(&b.digest),
                        payload.digest
                    ));
                    return Ok((status, Vec::new()));
                }
                None => {
                    status.held = Some(format!("bundle {} is missing", payload.name));
                    return Ok((status, Vec::new()));
                }
            },
            None => match self
                .bundles
                .values()
                .find(|b| b.digest == approved.payload_digest)
            {
                Some(b) => b,
                None => {
                    status.held = Some(format!(
                        "the standard-library bundle its approval names ({}) is not in the bundle directory",
                        digest_string(&approved.payload_digest)
                    ));
                    return Ok((status, Vec::new()));
                }
            },
        };
        let mut out = Vec::new();
        // In terminal-name order (the inventories are), online ones only.
        let chosen: Vec<(&str, PairRecord)> = ready
            .filter(|t| (self.online)(t))
            .filter_map(|t| Some((t, self.store.pair(t, &key)?)))
            .take(count)
            .collect();
        for (terminal, record) in chosen {
            let Some(sequence) = self.store.next_sequence(terminal) else {
                continue;
            };
            let nonce = random_bytes()?;
            let deadline_ms = self.now_ms + u64::from(remediation.timeout_seconds) * 1000;
            let envelope = DispatchEnvelope {
                terminal: terminal.to_string(),
                policy: key.clone(),
                policy_generation: generation,
                payload_digest: bundle.digest,
                nonce,
                issued_at_ms: self.now_ms,
                deadline_ms,
                sequence,
                args: approved.args.clone(),
                capabilities: approved.capabilities.clone(),
                write_paths: approved.write_paths.clone(),
                approval: approval.to_vec(),
            };
            let frame = SignedMessage::signed(&envelope, self.dispatch_key)?;
            let live = LiveDispatch {
                policy_generation: generation,
                issued_ms: self.now_ms,
                sequence,
                record: DispatchRecord {
                    terminal: terminal.to_string(),
                    envelope_digest: frame.body_digest(),
                    nonce_commitment: nonce_commitment(&nonce),
                    payload_digest: bundle.digest,
                    deadline_ms,
                    consumed: false,
                },
            };
            let started = PairRecord {
                state: next(
                    &record.state,
                    &Event::Started {
                        sequence,
                        deadline_ms,
                    },
                    &retry,
                    self.now_ms,
                    self.jitter,
                ),
                updated_ms: self.now_ms,
                ..record
            };
            // Recorded before it is sent: a crash now reissues, never
            // duplicates; with it, the envelope as sent in the evidence
            // history.
            let envelope = frame.encode();
            self.store.start_dispatch(
                terminal,
                &key,
                &live,
                &started,
                Some((
                    self.now_ms,
                    tenet_protocol::evidence::Record::Dispatched {
                        envelope: envelope.clone(),
                    },
                )),
            );
            status.drifted = status.drifted.saturating_sub(1);
            status.remediating += 1;
            out.push(Outgoing {
                terminal: terminal.to_string(),
                policy: key.clone(),
                envelope_digest: frame.body_digest(),
                envelope,
                bundle: tenet_protocol::session::SharedBytes(bundle.bytes.clone()),
                bundle_digest: bundle.digest,
            });
        }
        Ok((status, out))
    }
}

#[cfg(test)]
mod tests;

//! The standalone operator's embedded database (redb: ACID, every commit
//! fsynced, a crash leaves the last committed state). It holds what the
//! operator must never lose: enrolled terminals and their identity keys,
//! one-time bootstrap tokens (as hashes), per-terminal envelope sequence
//! numbers, the live dispatch of each (terminal, policy) with only the
//! commitment of its nonce, and each pair's reconcile state.
//!
//! Values are the protocol's canonical encoding. A database that cannot be
//! opened (corrupt, unreadable, full disk) is an error at start, never a
//! silent reset: the file is left exactly as it was.
//!
//! The working set lives in memory (loaded at open) and every change is
//! written behind to redb by a flusher thread in *group commits*: all the
//! changes made while one commit is being fsynced go into the next. Nothing
//! a change implies leaves the operator before it is durable: callers
//! wait for [`Store::durable`] (an agent's acknowledgement, an enrolment's
//! answer, an envelope's sending), so a crash loses only changes nobody
//! outside has seen. One fsync covers thousands of changes: that is what
//! lets one operator take 10,000 reports a second on a small machine.
//!
//! - `records`: what is kept, as it is encoded;
//! - `memory`: the working set and the queue of changes;
//! - `write_behind`: the flusher thread and its group commits;
//! - `backend`: the seam to durable storage, `disk` its redb side (the
//!   Kubernetes side is `crate::kubernetes::KubeBackend`).

mod backend;
mod disk;
mod memory;
pub mod migrate;
mod records;
mod write_behind;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tenet_protocol::enrol::EnrolmentRequest;
use tenet_protocol::evidence::Record;

use crate::reconcile::posture::CertRecord;
use crate::reconcile::state::PairState;
use crate::tpm_trust::TpmTrust;

pub use backend::{Backend, Change, Table};
pub use disk::Redb;
use memory::{Mem, token_verdict};
use records::pair_key;
pub use records::{
    ApprovedPolicy, LiveDispatch, PairRecord, StoredInventory, TerminalRecord, TokenRecord,
    token_key,
};
pub(crate) use write_behind::off_runtime;
use write_behind::{Durable, Inner, flusher};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot open the database ({source}); it was left as it is")]
    Open {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("database record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("the database cannot commit now: {0}")]
    Unavailable(String),
    #[error(
        "{store} holds store format {found}, written by a newer Tenet: this one ({}) reads formats 1 to {}. \
         Run the newer release, or restore the copy taken before it migrated the store; nothing was changed",
        tenet_protocol::release::THIS,
        migrate::FORMAT
    )]
    NewerFormat { store: String, found: u32 },
}

/// The pairs of one policy, read under the store's lock.
pub struct PolicyPairs<'a>(Option<&'a HashMap<String, PairRecord>>);

impl<'a> PolicyPairs<'a> {
    pub fn get(&self, terminal: &str) -> Option<&'a PairRecord> {
        self.0.and_then(|p| p.get(terminal))
    }
}

pub struct Store {
    inner: Arc<Inner>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Store {
    /// Open the redb database at `path` (created when there is none) and
    /// load the working set.
    /// The evidence history is kept beside it (`evidence.log`).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let backend = Box::new(Redb::open(path)?);
        let log_path = crate::evidence::path_in(path.parent().unwrap_or(Path::new(".")));
        let (log, _created) =
            crate::evidence::EvidenceLog::open(&log_path).map_err(|e| StoreError::Open {
                path: log_path.display().to_string(),
                source: redb::Error::Io(e),
            })?;
        let store = Store::build(backend, Some(log))?;
        // Every enrolled terminal's key is in the history (those enrolled
        // before it began, or whose entry a crash lost).
        let missing: Vec<(String, tenet_protocol::PublicKey)> = match &store.inner.evidence {
            Some(log) => {
                let log = log
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                store
                    .mem()
                    .terminals
                    .iter()
                    .filter(|(name, r)| log.key_of(name) != Some(&r.identity))
                    .map(|(name, r)| (name.clone(), r.identity.clone()))
                    .collect()
            }
            None => Vec::new(),
        };
        if !missing.is_empty() {
            store.change(|m| {
                for (name, identity) in missing {
                    m.evidence(
                        tenet_protocol::host::now_ms(),
                        &name,
                        Record::Enrolled { identity },
                    );
                }
            });
        }
        Ok(store)
    }

    /// A store over any backend: load every record, then keep the working
    /// set in memory and write changes behind. It keeps no evidence
    /// history.
    pub fn with_backend(backend: Box<dyn Backend>) -> Result<Store, StoreError> {
        Store::build(backend, None)
    }

    fn build(
        backend: Box<dyn Backend>,
        evidence: Option<crate::evidence::EvidenceLog>,
    ) -> Result<Store, StoreError> {
        let format = backend.format()?;
        migrate::check(&backend.describe(), format)?;
        let records = backend.load()?;
        if format < migrate::FORMAT {
            let changes = migrate::upgrade(format, &records)?;
            backend.migrate(&changes, migrate::FORMAT)?;
            tracing::info!(
                store = %backend.describe(),
                from = format,
                to = migrate::FORMAT,
                records = changes.len(),
                "store migrated"
            );
        }
        let mem = Mem::load(records)?;
        let inner = Arc::new(Inner {
            backend,
            mem: Mutex::new(mem),
            committing: Mutex::new(()),
            wake: (Mutex::new((false, false)), Condvar::new()),
            durable: tokio::sync::watch::Sender::new(Durable::default()),
            commits: std::sync::atomic::AtomicU64::new(0),
            evidence: evidence.map(Mutex::new),
        });
        let flusher = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("tenet-store".into())
                .spawn(move || flusher(inner))
                .map_err(|e| StoreError::Db(redb::Error::Io(e)))?
        };
        Ok(Store {
            inner,
            flusher: Some(flusher),
        })
    }

    fn mem(&self) -> MutexGuard<'_, Mem> {
        self.inner.mem()
    }

    /// Make a change (in memory, queued for the next commit).
    fn change<R>(&self, f: impl FnOnce(&mut Mem) -> R) -> R {
        let (r, queued) = {
            let mut m = self.mem();
            let before = m.written;
            let r = f(&mut m);
            (r, m.written != before)
        };
        if queued {
            self.inner.wake_flusher();
        }
        r
    }

    /// How many commits (fsyncs) were made since the store was opened.
    pub fn commits(&self) -> u64 {
        self.inner
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The number of the newest change made so far.
    pub fn written(&self) -> u64 {
        self.mem().written
    }

    /// Wait until every change up to `written` is committed. `Err` (the
    /// database's error) when a commit is failing now; the changes stay
    /// queued and are committed when the database works again.
    pub async fn durable(&self, written: u64) -> Result<(), StoreError> {
        let mut rx = self.inner.durable.subscribe();
        let d = rx
            .wait_for(|d| d.written >= written || d.error.is_some())
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        match (&d.error, d.written >= written) {
            (_, true) => Ok(()),
            (Some(e), false) => Err(StoreError::Unavailable(e.clone())),
            (None, false) => Ok(()),
        }
    }

    /// Commit everything queued, now (tests, and the end of a run).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.inner.commit()
    }

    /// Record an entry of the evidence history, committed with the
    /// changes made with it (nothing, when the store keeps no history).
    pub fn evidence(&self, at_ms: u64, terminal: &str, record: Record) {
        if self.inner.evidence.is_some() {
            self.change(|m| m.evidence(at_ms, terminal, record));
        }
    }

    /// The last approved version of each policy, by `namespace/name`.
    pub fn approved_policies(&self) -> Vec<(String, ApprovedPolicy)> {
        self.mem()
            .approved
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Whether the kept approved version of policy `key` is the one this
    /// approval frame approves (cheap: the caller builds a record only
    /// when it is not).
    pub fn approved_is(&self, key: &str, frame: &[u8]) -> bool {
        self.mem()
            .approved
            .get(key)
            .is_some_and(|r| r.approval == frame)
    }

    /// The policies whose approved version is kept.
    pub fn approved_keys(&self) -> Vec<String> {
        self.mem().approved.keys().cloned().collect()
    }

    /// Keep `record` as the last approved version of policy `key` (nothing
    /// is written when it is that already).
    pub fn set_approved(&self, key: &str, record: &ApprovedPolicy) {
        self.change(|m| {
            if m.approved.get(key) != Some(record) {
                m.write(Table::Approved, key, record);
                m.approved.insert(key.to_string(), record.clone());
            }
        });
    }

    /// Forget the approved version of a policy no longer read.
    pub fn forget_approved(&self, key: &str) {
        self.change(|m| {
            if m.approved.remove(key).is_some() {
                m.delete(Table::Approved, key.to_string());
            }
        });
    }

    /// Record a one-time bootstrap token (only its hash is kept).
    pub fn add_token(&self, token: &str, record: &TokenRecord) {
        self.add_token_hash(&token_key(token), record)
    }

    /// Record a bootstrap token by the hex SHA-256 of its text.
    pub fn add_token_hash(&self, hash: &str, record: &TokenRecord) {
        self.change(|m| {
            m.tokens.insert(hash.to_string(), record.clone());
            m.write(Table::Tokens, hash, record);
        });
    }

    /// The generation of a policy: 1 at first sight, one more each time
    /// its spec (by digest) changes. Never goes back.
    pub fn policy_generation(&self, policy: &str, spec_digest: [u8; 32]) -> u64 {
        self.change(|m| match m.policies.get(policy) {
            Some((digest, generation)) if *digest == spec_digest => *generation,
            other => {
                let generation = other.map_or(1, |(_, g)| g + 1);
                m.policies
                    .insert(policy.to_string(), (spec_digest, generation));
                m.write(Table::Policies, policy, &(spec_digest, generation));
                generation
            }
        })
    }

    /// Enrol a terminal: the token must exist, have uses left, be unexpired
    /// and (when bound) name this terminal, and the name must be free; then
    /// one use of the token is spent and the terminal registered, in one
    /// change, with the client key of the certificate it is about to be
    /// given. `Err(reason)` is a refusal to tell the agent.
    pub fn enrol(
        &self,
        request: &EnrolmentRequest,
        client_key: [u8; 32],
        tpm_trust: TpmTrust,
        now_ms: u64,
    ) -> Result<(), String> {
        self.change(|m| {
            token_verdict(m, request, now_ms)?;
            let key = token_key(&request.token);
            // One TPM proves one terminal: an EK already proving another
            // would let one real TPM vouch for any number of fakes.
            let tpm_trust = match tpm_trust {
                TpmTrust::Proven { ek } => match m
                    .terminals
                    .iter()
                    .find(|(_, r)| r.tpm_trust == TpmTrust::Proven { ek })
                {
                    Some((other, _)) => TpmTrust::Claimed {
                        reason: format!(
                            "its TPM (EK sha256:{}) already proves terminal {other:?}",
                            hex::encode(ek)
                        ),
                    },
                    None => TpmTrust::Proven { ek },
                },
                other => other,
            };
            match m.tokens.get(&key).cloned() {
                None => Err("the bootstrap token is not valid".to_string()),
                Some(mut t) => {
                    let labels = t.labels.clone();
                    t.uses_left -= 1;
                    m.write(Table::Tokens, &key, &t);
                    m.tokens.insert(key, t);
                    let record = TerminalRecord {
                        identity: request.identity.clone(),
                        // What admins assigned on the token, never what
                        // the terminal says of itself.
                        labels,
                        tpm: request.tpm,
                        attestation_key: request.attestation_key.clone(),
                        enrolled_at_ms: now_ms,
                        last_sequence: 0,
                        offline_since_ms: 0,
                        client_keys: vec![client_key],
                        tpm_trust,
                        claimed_labels: request.labels.clone(),
                        agent_version: String::new(),
                    };
                    m.write(Table::Terminals, &request.terminal, &record);
                    m.evidence(
                        now_ms,
                        &request.terminal,
                        Record::Enrolled {
                            identity: record.identity.clone(),
                        },
                    );
                    m.terminals.insert(request.terminal.clone(), record);
                    Ok(())
                }
            }
        })
    }

    pub fn terminal(&self, name: &str) -> Option<TerminalRecord> {
        self.mem().terminals.get(name).cloned()
    }

    /// The labels admins assigned a terminal (none when it is unknown).
    pub fn assigned_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.mem()
            .terminals
            .get(name)
            .map(|r| r.labels.clone())
            .unwrap_or_default()
    }

    /// Give a terminal the labels admins assigned it now (relabelling);
    /// whether they changed. An unknown terminal is left alone.
    pub fn relabel(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.change(|m| {
            let Some(mut r) = m.terminals.get(name).cloned() else {
                return false;
            };
            if r.labels == *labels {
                return false;
            }
            r.labels = labels.clone();
            m.write(Table::Terminals, name, &r);
            m.terminals.insert(name.to_string(), r);
            m.labels_epoch += 1;
            true
        })
    }

    /// Whether `name` is a known terminal, of identity `fingerprint` (hex),
    /// whose assigned labels are not `labels`.
    pub fn labels_differ(
        &self,
        name: &str,
        fingerprint: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        self.mem().terminals.get(name).is_some_and(|r| {
            r.labels != *labels && r.identity.fingerprint().to_hex() == fingerprint
        })
    }

    /// Changes each time a terminal is relabelled (see [`Store::relabel`]).
    pub fn labels_epoch(&self) -> u64 {
        self.mem().labels_epoch
    }

    /// Record that a terminal is connected, with an agent of `agent_version`.
    pub fn set_connected(&self, name: &str, agent_version: &str) {
        self.change(|m| {
            if let Some(mut r) = m.terminals.get(name).cloned() {
                r.offline_since_ms = 0;
                r.agent_version = agent_version.to_string();
                m.write(Table::Terminals, name, &r);
                m.terminals.insert(name.to_string(), r);
            }
        });
    }

    /// Record that a terminal's connection ended at `now_ms`.
    pub fn set_offline_since(&self, name: &str, now_ms: u64) {
        self.change(|m| {
            if let Some(mut r) = m.terminals.get(name).cloned() {
                r.offline_since_ms = now_ms;
                m.write(Table::Terminals, name, &r);
                m.terminals.insert(name.to_string(), r);
            }
        });
    }

    /// The next envelope sequence number for `terminal`. It is committed
    /// before any envelope carrying it is sent (the sender waits for
    /// [`Store::durable`]), so a restart never reuses one.
    pub fn next_sequence(&self, terminal: &str) -> Option<u64> {
        self.change(|m| {
            let mut r = m.terminals.get(terminal).cloned()?;
            r.last_sequence += 1;
            let next = r.last_sequence;
            m.write(Table::Terminals, terminal, &r);
            m.terminals.insert(terminal.to_string(), r);
            Some(next)
        })
    }

    pub fn pair(&self, terminal: &str, policy: &str) -> Option<PairRecord> {
        self.mem()
            .pairs
            .get(policy)
            .and_then(|p| p.get(terminal))
            .cloned()
    }

    /// Read every pair of `policy` under one lock: `f` gets a lookup by
    /// terminal. Keep `f` short: the gateway waits for it.
    pub fn with_policy_pairs<R>(&self, policy: &str, f: impl FnOnce(PolicyPairs<'_>) -> R) -> R {
        let m = self.mem();
        f(PolicyPairs(m.pairs.get(policy)))
    }

    /// Set pairs of `policy` in one change, each only if it is still what
    /// the caller read (`before`). The terminals whose pair had changed
    /// meanwhile (and were left alone).
    pub fn swap_pairs(
        &self,
        policy: &str,
        changes: &[(&str, Option<PairRecord>, PairRecord)],
    ) -> std::collections::HashSet<String> {
        if changes.is_empty() {
            return Default::default();
        }
        self.change(|m| {
            let mut lost = std::collections::HashSet::new();
            for (terminal, before, after) in changes {
                let current = m.pairs.get(policy).and_then(|p| p.get(*terminal));
                if current != before.as_ref() {
                    lost.insert(terminal.to_string());
                    continue;
                }
                m.write(Table::Pairs, &pair_key(terminal, policy), after);
                m.set_pair(terminal, policy, after.clone());
            }
            lost
        })
    }

    /// Whether a pair is Compliant in `generation` (and then whether it got
    /// there by a remediation), without copying it: the common case of a
    /// pass.
    pub fn compliant_pair(&self, terminal: &str, policy: &str, generation: u64) -> Option<bool> {
        self.mem()
            .pairs
            .get(policy)
            .and_then(|p| p.get(terminal))
            .filter(|r| r.generation == generation && r.state == PairState::Compliant)
            .map(|r| r.remediated)
    }

    pub fn set_pair(&self, terminal: &str, policy: &str, record: &PairRecord) {
        let key = pair_key(terminal, policy);
        self.change(|m| {
            m.write(Table::Pairs, &key, record);
            m.set_pair(terminal, policy, record.clone());
        });
    }

    /// The live dispatch of a pair, if any.
    pub fn dispatch(&self, terminal: &str, policy: &str) -> Option<LiveDispatch> {
        self.mem()
            .dispatches
            .get(&pair_key(terminal, policy))
            .cloned()
    }

    /// Record a new live dispatch for a pair (replacing one that is over)
    /// and its pair state in one change: a crash leaves both or neither.
    pub fn start_dispatch(
        &self,
        terminal: &str,
        policy: &str,
        dispatch: &LiveDispatch,
        pair: &PairRecord,
        evidence: Option<(u64, Record)>,
    ) {
        let key = pair_key(terminal, policy);
        self.change(|m| {
            // In the evidence history in the same change.
            if let Some((at_ms, record)) = evidence {
                m.evidence(at_ms, terminal, record);
            }
            m.write(Table::Dispatches, &key, dispatch);
            m.write(Table::Pairs, &key, pair);
            m.dispatches.insert(key, dispatch.clone());
            m.set_pair(terminal, policy, pair.clone());
        });
    }

    /// Mark the live dispatch with `envelope_digest` as answered and set the
    /// pair's new state, in one change. `None` (and nothing changed) when
    /// that dispatch is no longer live or was already answered: two copies
    /// of one report can never both count. `Some` is the answered dispatch.
    pub fn consume_dispatch(
        &self,
        terminal: &str,
        policy: &str,
        envelope_digest: &[u8; 32],
        pair: &PairRecord,
        evidence: Option<(u64, Record)>,
    ) -> Option<LiveDispatch> {
        let key = pair_key(terminal, policy);
        self.change(|m| {
            let mut live = m.dispatches.get(&key).cloned()?;
            if live.record.consumed || live.record.envelope_digest != *envelope_digest {
                return None;
            }
            // In the evidence history in the same change.
            if let Some((at_ms, record)) = evidence {
                m.evidence(at_ms, terminal, record);
            }
            live.record.consumed = true;
            m.write(Table::Dispatches, &key, &live);
            m.write(Table::Pairs, &key, pair);
            m.dispatches.insert(key, live.clone());
            m.set_pair(terminal, policy, pair.clone());
            Some(live)
        })
    }

    /// Keep a terminal's verified inventory unless a newer one (by the
    /// agent's sequence) is stored already; whether it was kept.
    pub fn put_inventory(&self, terminal: &str, stored: StoredInventory) -> bool {
        self.change(|m| {
            if m.inventories
                .get(terminal)
                .is_some_and(|old| old.sequence >= stored.sequence)
            {
                return false;
            }
            m.write(Table::Inventories, terminal, &stored);
            m.inventories.insert(terminal.to_string(), Arc::new(stored));
            true
        })
    }

    /// A verified run's report came after an inventory the terminal
    /// collected once the run had finished (its sequence, the agent's
    /// collection time, at or after `finished_at_ms`): that inventory shows
    /// the state after the run, so it counts as received now, which is
    /// what a Verifying pair waits for. Whether it did.
    /// Only one received after the dispatch was issued (`issued_ms`, the
    /// operator's own clock) counts: the agent's clock alone does not decide.
    pub fn restamp_inventory_after(
        &self,
        terminal: &str,
        finished_at_ms: u64,
        issued_ms: u64,
        now_ms: u64,
    ) -> bool {
        self.change(|m| {
            let Some(old) = m.inventories.get(terminal) else {
                return false;
            };
            if old.sequence < finished_at_ms
                || old.received_ms < issued_ms
                || old.received_ms >= now_ms
            {
                return false;
            }
            let mut stored = (**old).clone();
            stored.received_ms = now_ms;
            m.write(Table::Inventories, terminal, &stored);
            m.inventories.insert(terminal.to_string(), Arc::new(stored));
            true
        })
    }

    /// The latest verified inventory of a terminal.
    pub fn inventory(&self, terminal: &str) -> Option<Arc<StoredInventory>> {
        self.mem().inventories.get(terminal).cloned()
    }

    /// Every enrolled terminal with its newest verified inventory (shared,
    /// not copied), by name.
    pub fn inventories(&self) -> Vec<(String, Arc<StoredInventory>)> {
        let m = self.mem();
        // In name order: `terminals` is a BTreeMap.
        m.terminals
            .keys()
            .filter_map(|name| Some((name.clone(), m.inventories.get(name)?.clone())))
            .collect()
    }

    /// Every enrolled terminal's name.
    pub fn terminal_names(&self) -> Vec<String> {
        self.mem().terminals.keys().cloned().collect()
    }

    /// Every enrolled terminal.
    pub fn terminals(&self) -> Vec<(String, TerminalRecord)> {
        self.mem()
            .terminals
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The live dispatches of one terminal, by policy.
    pub fn dispatches_of(&self, terminal: &str) -> Vec<(String, LiveDispatch)> {
        let prefix = format!("{terminal}\u{0}");
        self.mem()
            .dispatches
            .range(prefix.clone()..)
            .map_while(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
            .collect()
    }

    /// How many pairs `policy` has.
    pub fn pair_count(&self, policy: &str) -> usize {
        self.mem().pairs.get(policy).map_or(0, HashMap::len)
    }

    /// Forget the pairs of `policy` whose terminal it no longer selects
    /// (`selected` are those it does): a pair kept would go on counting in
    /// the terminal's security level and certificate policy. A pair with a
    /// live dispatch stays until its report or deadline. How many went.
    pub fn forget_unselected_pairs(
        &self,
        policy: &str,
        selected: &std::collections::HashSet<&str>,
    ) -> usize {
        self.change(|m| {
            let Some(pairs) = m.pairs.get(policy) else {
                return 0;
            };
            let gone: Vec<String> = pairs
                .keys()
                .filter(|t| !selected.contains(t.as_str()))
                .filter(|t| !m.dispatches.contains_key(&pair_key(t, policy)))
                .cloned()
                .collect();
            for t in &gone {
                if let Some(p) = m.pairs.get_mut(policy) {
                    p.remove(t);
                }
                m.delete(Table::Pairs, pair_key(t, policy));
            }
            gone.len()
        })
    }

    /// Forget a deleted policy: its pair states and live dispatches go, in
    /// one change (written as deletions: an empty value). How many pairs.
    pub fn forget_policy(&self, policy: &str) -> usize {
        self.change(|m| {
            let terminals: Vec<String> = m
                .pairs
                .remove(policy)
                .map(|p| p.into_keys().collect())
                .unwrap_or_default();
            for t in &terminals {
                let key = pair_key(t, policy);
                m.delete(Table::Pairs, key.clone());
                if m.dispatches.remove(&key).is_some() {
                    m.delete(Table::Dispatches, key);
                }
            }
            // Its generation stays: a policy re-created under the same name
            // goes on from there (its spec digest is forgotten, so the
            // re-created one is a new generation), never back to 1.
            if let Some((_, generation)) = m.policies.get(policy).copied() {
                m.policies.insert(policy.to_string(), ([0; 32], generation));
                m.write(Table::Policies, policy, &([0u8; 32], generation));
            }
            terminals.len()
        })
    }

    /// De-enrol a terminal: its record, pair states, live dispatches,
    /// inventory and certificate record go, in one change (deletions).
    /// Whether it was enrolled.
    pub fn forget_terminal(&self, name: &str) -> bool {
        self.change(|m| {
            if m.terminals.remove(name).is_none() {
                return false;
            }
            m.delete(Table::Terminals, name.to_string());
            let mut gone = Vec::new();
            for (policy, pairs) in m.pairs.iter_mut() {
                if pairs.remove(name).is_some() {
                    gone.push((Table::Pairs, pair_key(name, policy)));
                }
            }
            let prefix = format!("{name}\u{0}");
            let dispatches: Vec<String> = m
                .dispatches
                .range(prefix.clone()..)
                .map_while(|(k, _)| k.starts_with(&prefix).then(|| k.clone()))
                .collect();
            for k in dispatches {
                m.dispatches.remove(&k);
                gone.push((Table::Dispatches, k));
            }
            if m.inventories.remove(name).is_some() {
                gone.push((Table::Inventories, name.to_string()));
            }
            if m.certificates.remove(name).is_some() {
                gone.push((Table::Certificates, name.to_string()));
            }
            for (table, key) in gone {
                m.delete(table, key);
            }
            true
        })
    }

    /// Whether a session of `terminal` may use the client key `key`: one of
    /// its registered keys. The newest key's first use retires the older
    /// one (a renewal is complete once the new certificate is in use).
    pub fn admit_client_key(&self, terminal: &str, key: &[u8; 32]) -> bool {
        if !self.client_key_admitted(terminal, key) {
            return false;
        }
        self.change(|m| {
            let Some(record) = m.terminals.get(terminal) else {
                return false;
            };
            match record.client_keys.iter().position(|k| k == key) {
                None => false,
                Some(i) if i + 1 == record.client_keys.len() && i > 0 => {
                    let mut r = record.clone();
                    r.client_keys = vec![*key];
                    m.write(Table::Terminals, terminal, &r);
                    m.terminals.insert(terminal.to_string(), r);
                    true
                }
                Some(_) => true,
            }
        })
    }

    /// Whether `key` is (still) one of `terminal`'s client keys, without
    /// changing anything: checked on every message of a session, so a
    /// session whose key was retired or whose terminal was de-enrolled (and
    /// maybe enrolled again by another device) can do nothing more.
    pub fn client_key_admitted(&self, terminal: &str, key: &[u8; 32]) -> bool {
        self.mem()
            .terminals
            .get(terminal)
            .is_some_and(|r| r.client_keys.contains(key))
    }

    /// Whether an enrolment request's token would be accepted now, without
    /// spending it (the gateway checks before it does costly work).
    pub fn check_enrolment(&self, request: &EnrolmentRequest, now_ms: u64) -> Result<(), String> {
        token_verdict(&self.mem(), request, now_ms)
    }

    /// A renewed certificate for `key` is about to be given to `terminal`,
    /// whose session uses `current`: both are accepted until `key` is used.
    /// False when the terminal is no longer enrolled, or `current` is no
    /// longer one of its keys (a retired key cannot renew itself back).
    pub fn renew_client_key(&self, terminal: &str, current: &[u8; 32], key: [u8; 32]) -> bool {
        self.change(|m| {
            let Some(mut r) = m.terminals.get(terminal).cloned() else {
                return false;
            };
            if !r.client_keys.contains(current) {
                return false;
            }
            r.client_keys = vec![*current, key];
            m.write(Table::Terminals, terminal, &r);
            m.terminals.insert(terminal.to_string(), r);
            true
        })
    }

    /// Whether a token with this hash was ever added.
    pub fn has_token_hash(&self, hash: &str) -> bool {
        self.mem().tokens.contains_key(hash)
    }

    /// A terminal's security certificate record.
    pub fn certificate(&self, terminal: &str) -> Option<CertRecord> {
        self.mem().certificates.get(terminal).cloned()
    }

    /// Every certificate record, by terminal.
    pub fn certificates(&self) -> Vec<(String, CertRecord)> {
        self.mem()
            .certificates
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn set_certificate(&self, terminal: &str, record: &CertRecord) {
        self.change(|m| {
            m.write(Table::Certificates, terminal, record);
            m.certificates.insert(terminal.to_string(), record.clone());
        });
    }

    /// Every pair's record (for status and for resuming after a restart).
    pub fn pairs(&self) -> Vec<(String, String, PairRecord)> {
        let mut out: Vec<(String, String, PairRecord)> = self
            .mem()
            .pairs
            .iter()
            .flat_map(|(policy, terminals)| {
                terminals
                    .iter()
                    .map(|(t, r)| (t.clone(), policy.clone(), r.clone()))
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }
}

#[cfg(test)]
mod tests;

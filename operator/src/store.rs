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

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tenet_protocol::PublicKey;
use tenet_protocol::enrol::EnrolmentRequest;
use tenet_protocol::inventory::Inventory;
use tenet_protocol::report::DispatchRecord;
use tenet_protocol::wire::{decode, encode, sha256};

use crate::reconcile::certificate::CertRecord;
use crate::reconcile::state::PairState;
use crate::tpm_trust::TpmTrust;

const TERMINALS: TableDefinition<&str, &[u8]> = TableDefinition::new("terminals");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const PAIRS: TableDefinition<&str, &[u8]> = TableDefinition::new("pairs");
const DISPATCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("dispatches");
const INVENTORIES: TableDefinition<&str, &[u8]> = TableDefinition::new("inventories");
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const CERTIFICATES: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");

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
}

/// An enrolled terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalRecord {
    pub identity: PublicKey,
    pub labels: BTreeMap<String, String>,
    pub tpm: bool,
    /// The TPM attestation key its quotes must be signed with.
    pub attestation_key: Option<PublicKey>,
    pub enrolled_at_ms: u64,
    /// The last envelope sequence number issued to it.
    pub last_sequence: u64,
    /// When its last connection ended (0: never connected, or connected now).
    pub offline_since_ms: u64,
    /// The mTLS client keys (SHA-256 of the SubjectPublicKeyInfo) its
    /// sessions may use, newest last: the key certified at enrolment, and
    /// after a renewal the old and the new one until the new one is used.
    /// A certificate for this name with any other key opens no session.
    pub client_keys: Vec<[u8; 32]>,
    /// Whether its TPM was proven at enrolment (`tpm` is only its claim).
    pub tpm_trust: TpmTrust,
}

/// Whether `request` may enrol now: its token exists, has uses left, has
/// not expired, names this terminal when bound to one, and the name is free.
fn token_verdict(m: &Mem, request: &EnrolmentRequest, now_ms: u64) -> Result<(), String> {
    match m.tokens.get(&token_key(&request.token)) {
        None => Err("the bootstrap token is not valid".to_string()),
        Some(t) if t.uses_left == 0 => Err("the bootstrap token was already used".into()),
        Some(t) if t.expires_ms <= now_ms => Err("the bootstrap token has expired".into()),
        Some(TokenRecord {
            terminal: Some(name),
            ..
        }) if *name != request.terminal => {
            Err(format!("the bootstrap token is for terminal {name:?}"))
        }
        Some(_) if m.terminals.contains_key(&request.terminal) => Err(format!(
            "terminal {:?} is already enrolled",
            request.terminal
        )),
        Some(_) => Ok(()),
    }
}

/// A bootstrap token, kept as its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The terminal name the token is for, when an admin bound it to one.
    pub terminal: Option<String>,
    pub expires_ms: u64,
    /// How many more terminals may enrol with it (1 for a one-time token).
    pub uses_left: u32,
}

/// The live dispatch of a pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDispatch {
    pub policy_generation: u64,
    /// When it was issued (the operator's clock).
    pub issued_ms: u64,
    pub sequence: u64,
    pub record: DispatchRecord,
}

/// A terminal's latest verified inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInventory {
    /// The agent's sequence (its collection time): newer replaces older.
    pub sequence: u64,
    /// When the operator received it (its own clock).
    pub received_ms: u64,
    pub inventory: Inventory,
}

/// The reconcile state of a pair, with the generation it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairRecord {
    pub generation: u64,
    pub state: PairState,
    pub updated_ms: u64,
    /// Converged through a verified remediation in this generation (what a
    /// rollout counts as a success).
    pub remediated: bool,
}

/// The kinds of record the store keeps; a [`Backend`] stores each kind
/// under its own name (a redb table here; API resources in Kubernetes
/// mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Terminals,
    Tokens,
    Pairs,
    Dispatches,
    Inventories,
    Policies,
    Certificates,
}

impl Table {
    pub const ALL: [Table; 7] = [
        Table::Terminals,
        Table::Tokens,
        Table::Pairs,
        Table::Dispatches,
        Table::Inventories,
        Table::Policies,
        Table::Certificates,
    ];

    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Terminals => TERMINALS,
            Table::Tokens => TOKENS,
            Table::Pairs => PAIRS,
            Table::Dispatches => DISPATCHES,
            Table::Inventories => INVENTORIES,
            Table::Policies => POLICIES,
            Table::Certificates => CERTIFICATES,
        }
    }
}

/// The working set, and the changes not yet committed.
#[derive(Default)]
struct Mem {
    terminals: BTreeMap<String, TerminalRecord>,
    tokens: HashMap<String, TokenRecord>,
    /// Pair states by policy, then terminal: a pass reads them without
    /// building keys.
    pairs: HashMap<String, HashMap<String, PairRecord>>,
    dispatches: BTreeMap<String, LiveDispatch>,
    inventories: HashMap<String, Arc<StoredInventory>>,
    policies: HashMap<String, ([u8; 32], u64)>,
    certificates: BTreeMap<String, CertRecord>,
    /// Changes in the order they were made, not yet committed.
    pending: Vec<(Table, String, Vec<u8>)>,
    /// How many changes were ever made (the newest change's number).
    written: u64,
}

impl Mem {
    fn set_pair(&mut self, terminal: &str, policy: &str, record: PairRecord) {
        match self.pairs.get_mut(policy) {
            Some(p) => {
                p.insert(terminal.to_string(), record);
            }
            None => {
                self.pairs.insert(
                    policy.to_string(),
                    HashMap::from([(terminal.to_string(), record)]),
                );
            }
        }
    }

    fn write<T: Serialize>(&mut self, table: Table, key: &str, value: &T) {
        self.pending.push((table, key.to_string(), encode(value)));
        self.written += 1;
    }

    /// Queue the deletion of a record: an empty value.
    fn delete(&mut self, table: Table, key: String) {
        self.pending.push((table, key, Vec::new()));
        self.written += 1;
    }
}

/// How far the database on disk has caught up.
#[derive(Debug, Clone, Default)]
struct Durable {
    /// Every change up to this number is committed.
    written: u64,
    /// Why the last commit failed, while it keeps failing.
    error: Option<String>,
}

/// One change as a backend stores it: the kind, the key and the canonical
/// encoding of the record.
pub type Change = (Table, String, Vec<u8>);

/// Where the store's records live durably. The store keeps the working set
/// in memory and hands the backend batches of changes in order; a batch is
/// durable (or failed, and handed again) before anything it implies leaves
/// the operator.
pub trait Backend: Send + Sync + 'static {
    /// Every record, at open.
    fn load(&self) -> Result<Vec<Change>, StoreError>;
    /// Store a batch of changes atomically and durably.
    fn commit(&self, batch: &[Change]) -> Result<(), StoreError>;
}

/// The standalone backend: an embedded redb database (ACID, fsync per
/// commit).
pub struct Redb {
    db: Database,
}

impl Redb {
    /// Open the database at `path`, creating it (and its tables) when there
    /// is none.
    pub fn open(path: &Path) -> Result<Redb, StoreError> {
        let open_err = |e: redb::DatabaseError| StoreError::Open {
            path: path.display().to_string(),
            source: e.into(),
        };
        // The working set lives in memory already; redb's page cache
        // (1 GiB by default) would hold a second copy of it.
        let db = redb::Builder::new()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
            .map_err(open_err)?;
        // Create the tables, so readers never meet a missing one.
        let tx = db.begin_write().map_err(err)?;
        for t in Table::ALL {
            tx.open_table(t.definition()).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(Redb { db })
    }
}

impl Backend for Redb {
    fn load(&self) -> Result<Vec<Change>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let mut out = Vec::new();
        for table in Table::ALL {
            let t = tx.open_table(table.definition()).map_err(err)?;
            for item in t.iter().map_err(err)? {
                let (k, v) = item.map_err(err)?;
                out.push((table, k.value().to_string(), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut tables: Vec<(Table, redb::Table<'_, &str, &[u8]>)> = Vec::new();
            for (table, key, value) in batch {
                let i = match tables.iter().position(|(t, _)| t == table) {
                    Some(i) => i,
                    None => {
                        tables.push((*table, tx.open_table(table.definition()).map_err(err)?));
                        tables.len() - 1
                    }
                };
                // An empty value deletes (see `Store::forget_policy`).
                if value.is_empty() {
                    tables[i].1.remove(key.as_str()).map_err(err)?;
                } else {
                    tables[i]
                        .1
                        .insert(key.as_str(), value.as_slice())
                        .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }
}

struct Inner {
    backend: Box<dyn Backend>,
    mem: Mutex<Mem>,
    /// Serialises commits, so they reach the disk in order.
    committing: Mutex<()>,
    /// Set when there is something to commit, or the store closes.
    wake: (Mutex<(bool, bool)>, Condvar),
    durable: tokio::sync::watch::Sender<Durable>,
    /// Commits made (each one fsync).
    commits: std::sync::atomic::AtomicU64,
}

/// redb's page cache: writes only, the reads come from memory.
const PAGE_CACHE_BYTES: usize = 8 * 1024 * 1024;

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

fn pair_key(terminal: &str, policy: &str) -> String {
    format!("{terminal}\u{0}{policy}")
}

/// The key a bootstrap token is stored under: the hex SHA-256 of its text.
pub fn token_key(token: &str) -> String {
    hex::encode(sha256(token.as_bytes()))
}

fn err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

fn decoded<T: Serialize + DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

impl Inner {
    fn mem(&self) -> MutexGuard<'_, Mem> {
        // A panic while holding the lock cannot leave a half-made change:
        // every change is made in memory and queued in one step.
        self.mem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Commit everything queued so far, in one transaction.
    fn commit(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self
            .committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (batch, written) = {
            let mut m = self.mem();
            (std::mem::take(&mut m.pending), m.written)
        };
        if batch.is_empty() {
            return Ok(());
        }
        let result = self.backend.commit(&batch);
        match result {
            Ok(()) => {
                self.commits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.durable.send_replace(Durable {
                    written,
                    error: None,
                });
                Ok(())
            }
            Err(e) => {
                // Keep the batch, in order, ahead of what came since: the
                // next commit tries it again.
                let mut m = self.mem();
                let newer = std::mem::take(&mut m.pending);
                m.pending = batch;
                m.pending.extend(newer);
                drop(m);
                self.durable.send_modify(|d| d.error = Some(e.to_string()));
                Err(e)
            }
        }
    }

    fn wake_flusher(&self) {
        let (lock, cv) = &self.wake;
        if let Ok(mut w) = lock.lock() {
            w.0 = true;
            cv.notify_one();
        }
    }
}

/// The flusher thread: commit whenever something is queued; after a failed
/// commit, try again every second.
fn flusher(inner: Arc<Inner>) {
    let (lock, cv) = &inner.wake;
    loop {
        {
            let Ok(mut w) = lock.lock() else { return };
            while !w.0 && !w.1 {
                w = match cv.wait(w) {
                    Ok(w) => w,
                    Err(_) => return,
                };
            }
            if w.1 {
                return;
            }
            w.0 = false;
        }
        if let Err(e) = inner.commit() {
            tracing::error!(error = %e, "cannot commit to the database; retrying every second");
            std::thread::sleep(Duration::from_secs(1));
            inner.wake_flusher();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        {
            let (lock, cv) = &self.inner.wake;
            if let Ok(mut w) = lock.lock() {
                w.1 = true;
                cv.notify_one();
            }
        }
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
        if let Err(e) = self.inner.commit() {
            tracing::error!(error = %e, "changes not committed at close");
        }
    }
}

impl Store {
    /// Open the redb database at `path` (created when there is none) and
    /// load the working set.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::with_backend(Box::new(Redb::open(path)?))
    }

    /// A store over any backend: load every record, then keep the working
    /// set in memory and write changes behind.
    pub fn with_backend(backend: Box<dyn Backend>) -> Result<Store, StoreError> {
        let mut mem = Mem::default();
        for (table, key, bytes) in backend.load()? {
            match table {
                Table::Terminals => {
                    mem.terminals.insert(key.clone(), decoded(&key, &bytes)?);
                }
                Table::Tokens => {
                    mem.tokens.insert(key.clone(), decoded(&key, &bytes)?);
                }
                Table::Pairs => {
                    let record: PairRecord = decoded(&key, &bytes)?;
                    if let Some((terminal, policy)) = key.split_once('\u{0}') {
                        mem.set_pair(terminal, policy, record);
                    }
                }
                Table::Dispatches => {
                    mem.dispatches.insert(key.clone(), decoded(&key, &bytes)?);
                }
                Table::Inventories => {
                    let inv: StoredInventory = decoded(&key, &bytes)?;
                    mem.inventories.insert(key, Arc::new(inv));
                }
                Table::Policies => {
                    mem.policies.insert(key.clone(), decoded(&key, &bytes)?);
                }
                Table::Certificates => {
                    mem.certificates.insert(key.clone(), decoded(&key, &bytes)?);
                }
            }
        }
        let inner = Arc::new(Inner {
            backend,
            mem: Mutex::new(mem),
            committing: Mutex::new(()),
            wake: (Mutex::new((false, false)), Condvar::new()),
            durable: tokio::sync::watch::Sender::new(Durable::default()),
            commits: std::sync::atomic::AtomicU64::new(0),
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

    /// Record a one-time bootstrap token (only its hash is kept).
    pub fn add_token(&self, token: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.add_token_hash(&token_key(token), record)
    }

    /// Record a bootstrap token by the hex SHA-256 of its text.
    pub fn add_token_hash(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.change(|m| {
            m.tokens.insert(hash.to_string(), record.clone());
            m.write(Table::Tokens, hash, record);
        });
        Ok(())
    }

    /// The generation of a policy: 1 at first sight, one more each time
    /// its spec (by digest) changes. Never goes back.
    pub fn policy_generation(
        &self,
        policy: &str,
        spec_digest: [u8; 32],
    ) -> Result<u64, StoreError> {
        Ok(self.change(|m| match m.policies.get(policy) {
            Some((digest, generation)) if *digest == spec_digest => *generation,
            other => {
                let generation = other.map_or(1, |(_, g)| g + 1);
                m.policies
                    .insert(policy.to_string(), (spec_digest, generation));
                m.write(Table::Policies, policy, &(spec_digest, generation));
                generation
            }
        }))
    }

    /// Enrol a terminal: the token must exist, have uses left, be unexpired
    /// and (when bound) name this terminal, and the name must be free; then
    /// one use of the token is spent and the terminal registered, in one
    /// change. `Ok(Err(reason))` is a refusal to tell the agent.
    /// Spend the bootstrap token and register the terminal, with the
    /// client key of the certificate it is about to be given.
    pub fn enrol(
        &self,
        request: &EnrolmentRequest,
        client_key: [u8; 32],
        tpm_trust: TpmTrust,
        now_ms: u64,
    ) -> Result<Result<(), String>, StoreError> {
        Ok(self.change(|m| {
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
                    t.uses_left -= 1;
                    m.write(Table::Tokens, &key, &t);
                    m.tokens.insert(key, t);
                    let record = TerminalRecord {
                        identity: request.identity.clone(),
                        labels: request.labels.clone(),
                        tpm: request.tpm,
                        attestation_key: request.attestation_key.clone(),
                        enrolled_at_ms: now_ms,
                        last_sequence: 0,
                        offline_since_ms: 0,
                        client_keys: vec![client_key],
                        tpm_trust,
                    };
                    m.write(Table::Terminals, &request.terminal, &record);
                    m.terminals.insert(request.terminal.clone(), record);
                    Ok(())
                }
            }
        }))
    }

    pub fn terminal(&self, name: &str) -> Result<Option<TerminalRecord>, StoreError> {
        Ok(self.mem().terminals.get(name).cloned())
    }

    /// Record that a terminal's connection ended at `now_ms` (0: it is connected).
    pub fn set_offline_since(&self, name: &str, now_ms: u64) -> Result<(), StoreError> {
        self.change(|m| {
            if let Some(mut r) = m.terminals.get(name).cloned() {
                r.offline_since_ms = now_ms;
                m.write(Table::Terminals, name, &r);
                m.terminals.insert(name.to_string(), r);
            }
        });
        Ok(())
    }

    /// The next envelope sequence number for `terminal`. It is committed
    /// before any envelope carrying it is sent (the sender waits for
    /// [`Store::durable`]), so a restart never reuses one.
    pub fn next_sequence(&self, terminal: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.change(|m| {
            let mut r = m.terminals.get(terminal).cloned()?;
            r.last_sequence += 1;
            let next = r.last_sequence;
            m.write(Table::Terminals, terminal, &r);
            m.terminals.insert(terminal.to_string(), r);
            Some(next)
        }))
    }

    pub fn pair(&self, terminal: &str, policy: &str) -> Result<Option<PairRecord>, StoreError> {
        Ok(self
            .mem()
            .pairs
            .get(policy)
            .and_then(|p| p.get(terminal))
            .cloned())
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

    pub fn set_pair(
        &self,
        terminal: &str,
        policy: &str,
        record: &PairRecord,
    ) -> Result<(), StoreError> {
        let key = pair_key(terminal, policy);
        self.change(|m| {
            m.write(Table::Pairs, &key, record);
            m.set_pair(terminal, policy, record.clone());
        });
        Ok(())
    }

    /// The live dispatch of a pair, if any.
    pub fn dispatch(
        &self,
        terminal: &str,
        policy: &str,
    ) -> Result<Option<LiveDispatch>, StoreError> {
        Ok(self
            .mem()
            .dispatches
            .get(&pair_key(terminal, policy))
            .cloned())
    }

    /// Record a new live dispatch for a pair (replacing one that is over)
    /// and its pair state in one change: a crash leaves both or neither.
    pub fn start_dispatch(
        &self,
        terminal: &str,
        policy: &str,
        dispatch: &LiveDispatch,
        pair: &PairRecord,
    ) -> Result<(), StoreError> {
        let key = pair_key(terminal, policy);
        self.change(|m| {
            m.write(Table::Dispatches, &key, dispatch);
            m.write(Table::Pairs, &key, pair);
            m.dispatches.insert(key, dispatch.clone());
            m.set_pair(terminal, policy, pair.clone());
        });
        Ok(())
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
    ) -> Result<Option<LiveDispatch>, StoreError> {
        let key = pair_key(terminal, policy);
        Ok(self.change(|m| {
            let mut live = m.dispatches.get(&key).cloned()?;
            if live.record.consumed || live.record.envelope_digest != *envelope_digest {
                return None;
            }
            live.record.consumed = true;
            m.write(Table::Dispatches, &key, &live);
            m.write(Table::Pairs, &key, pair);
            m.dispatches.insert(key, live.clone());
            m.set_pair(terminal, policy, pair.clone());
            Some(live)
        }))
    }

    /// Keep a terminal's verified inventory unless a newer one (by the
    /// agent's sequence) is stored already; whether it was kept.
    pub fn put_inventory(
        &self,
        terminal: &str,
        stored: StoredInventory,
    ) -> Result<bool, StoreError> {
        Ok(self.change(|m| {
            if m.inventories
                .get(terminal)
                .is_some_and(|old| old.sequence >= stored.sequence)
            {
                return false;
            }
            m.write(Table::Inventories, terminal, &stored);
            m.inventories.insert(terminal.to_string(), Arc::new(stored));
            true
        }))
    }

    /// The latest verified inventory of a terminal.
    pub fn inventory(&self, terminal: &str) -> Result<Option<Arc<StoredInventory>>, StoreError> {
        Ok(self.mem().inventories.get(terminal).cloned())
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
    pub fn terminal_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.mem().terminals.keys().cloned().collect())
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
    pub fn dispatches_of(&self, terminal: &str) -> Result<Vec<(String, LiveDispatch)>, StoreError> {
        let prefix = format!("{terminal}\u{0}");
        Ok(self
            .mem()
            .dispatches
            .range(prefix.clone()..)
            .map_while(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
            .collect())
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
    pub fn pairs(&self) -> Result<Vec<(String, String, PairRecord)>, StoreError> {
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
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenet_protocol::{Algorithm, KeyPair, Signer};

    fn request(token: &str, terminal: &str) -> EnrolmentRequest {
        EnrolmentRequest {
            token: token.into(),
            terminal: terminal.into(),
            labels: BTreeMap::new(),
            identity: KeyPair::generate(Algorithm::Ed25519)
                .expect("key")
                .public_key(),
            tpm: false,
            attestation_key: None,
            ek_certificate: None,
            tls_csr_pem: String::new(),
            requested_at_ms: 0,
        }
    }

    fn token(terminal: Option<&str>, expires_ms: u64) -> TokenRecord {
        TokenRecord {
            terminal: terminal.map(str::to_string),
            expires_ms,
            uses_left: 1,
        }
    }

    #[test]
    fn a_forgotten_terminal_or_policy_is_gone_after_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenet.redb");
        let pair = PairRecord {
            generation: 1,
            state: PairState::Compliant,
            updated_ms: 1,
            remediated: false,
        };
        {
            let s = Store::open(&path).expect("open");
            for t in ["ward-01", "ward-02"] {
                s.add_token(&format!("tok-{t}"), &token(None, 1000))
                    .expect("token");
                assert_eq!(
                    s.enrol(&request(&format!("tok-{t}"), t), [0; 32], TpmTrust::None, 1)
                        .expect("db"),
                    Ok(())
                );
                s.set_pair(t, "it/a", &pair).expect("pair");
                s.set_pair(t, "it/b", &pair).expect("pair");
            }
            assert!(s.forget_terminal("ward-01"));
            assert!(!s.forget_terminal("ward-01"), "only once");
            assert_eq!(s.forget_policy("it/b"), 1);
            s.sync().expect("sync");
        }
        let s = Store::open(&path).expect("reopen");
        assert!(s.terminal("ward-01").expect("db").is_none());
        assert!(s.terminal("ward-02").expect("db").is_some());
        let pairs: Vec<(String, String)> = s
            .pairs()
            .expect("db")
            .into_iter()
            .map(|(t, p, _)| (t, p))
            .collect();
        assert_eq!(pairs, vec![("ward-02".to_string(), "it/a".to_string())]);
    }

    #[test]
    fn bootstrap_tokens_are_one_time_bound_and_expiring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("tenet.redb")).expect("open");
        s.add_token("t-1", &token(None, 1000)).expect("token");
        s.add_token("t-2", &token(Some("ward-02"), 1000))
            .expect("token");
        s.add_token("t-3", &token(None, 10)).expect("token");
        let refusal = |t: &str, name: &str| {
            s.enrol(&request(t, name), [0; 32], TpmTrust::None, 100)
                .expect("db")
                .err()
        };
        assert_eq!(
            refusal("nope", "ward-01").as_deref(),
            Some("the bootstrap token is not valid")
        );
        assert_eq!(
            refusal("t-3", "ward-01").as_deref(),
            Some("the bootstrap token has expired")
        );
        assert_eq!(
            refusal("t-2", "ward-01").as_deref(),
            Some("the bootstrap token is for terminal \"ward-02\"")
        );
        assert_eq!(refusal("t-1", "ward-01"), None);
        assert_eq!(
            refusal("t-1", "ward-03").as_deref(),
            Some("the bootstrap token was already used")
        );
        assert_eq!(refusal("t-2", "ward-02"), None);
        assert!(s.terminal("ward-01").expect("db").is_some());
        // Only hashes of tokens are stored.
        let bytes = std::fs::read(dir.path().join("tenet.redb")).expect("file");
        assert!(!bytes.windows(3).any(|w| w == b"t-1"));
    }

    #[test]
    fn sequences_and_pairs_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenet.redb");
        {
            let s = Store::open(&path).expect("open");
            s.add_token("t", &token(None, u64::MAX)).expect("token");
            assert_eq!(
                s.enrol(&request("t", "ward-01"), [0; 32], TpmTrust::None, 0)
                    .expect("db"),
                Ok(())
            );
            assert_eq!(s.next_sequence("ward-01").expect("db"), Some(1));
            assert_eq!(s.next_sequence("ward-01").expect("db"), Some(2));
            assert_eq!(s.next_sequence("nobody").expect("db"), None);
            let pair = PairRecord {
                generation: 3,
                state: PairState::Compliant,
                updated_ms: 5,
                remediated: false,
            };
            s.set_pair("ward-01", "ns/p", &pair).expect("pair");
        }
        let s = Store::open(&path).expect("reopen (the changes were committed at close)");
        assert_eq!(s.next_sequence("ward-01").expect("db"), Some(3));
        let pairs = s.pairs().expect("pairs");
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].2.state, PairState::Compliant);
    }

    #[test]
    fn changes_are_group_committed_and_durable_when_awaited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenet.redb");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        {
            let s = Arc::new(Store::open(&path).expect("open"));
            let writers: Vec<_> = (0..4)
                .map(|w| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        for i in 0..500 {
                            let pair = PairRecord {
                                generation: 1,
                                state: PairState::Compliant,
                                updated_ms: i,
                                remediated: false,
                            };
                            s.set_pair(&format!("t-{w}-{i}"), "ns/p", &pair)
                                .expect("set");
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().expect("writer");
            }
            let written = s.written();
            assert_eq!(written, 2_000);
            rt.block_on(s.durable(written)).expect("durable");
            // Far fewer fsyncs than changes.
            assert!(
                s.commits() < 500,
                "{} commits for 2,000 changes",
                s.commits()
            );
            assert!(s.commits() >= 1);
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.pairs().expect("pairs").len(), 2_000);
    }

    #[test]
    fn swapped_pairs_never_overwrite_a_change_made_meanwhile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        let rec = |state: PairState| PairRecord {
            generation: 1,
            state,
            updated_ms: 0,
            remediated: false,
        };
        let dispatched = rec(PairState::Dispatched {
            attempt: 1,
            sequence: 1,
            deadline_ms: 10,
        });
        s.set_pair("a", "ns/p", &dispatched).expect("set");
        s.set_pair("b", "ns/p", &dispatched).expect("set");
        // A pass read both as Dispatched; a report then verified "a".
        let verifying = rec(PairState::Verifying {
            attempt: 1,
            since_ms: 5,
        });
        s.set_pair("a", "ns/p", &verifying).expect("report");
        let expired = rec(PairState::Failed {
            attempts: 1,
            reason: "expired".into(),
        });
        let lost = s.swap_pairs(
            "ns/p",
            &[
                ("a", Some(dispatched.clone()), expired.clone()),
                ("b", Some(dispatched.clone()), expired.clone()),
            ],
        );
        assert_eq!(lost, ["a".to_string()].into());
        assert_eq!(s.pair("a", "ns/p").expect("db"), Some(verifying));
        assert_eq!(s.pair("b", "ns/p").expect("db"), Some(expired));
    }

    /// A backend whose disk can fill up.
    #[derive(Default)]
    struct Flaky {
        full: std::sync::atomic::AtomicBool,
        stored: Mutex<Vec<Change>>,
    }

    impl Backend for Arc<Flaky> {
        fn load(&self) -> Result<Vec<Change>, StoreError> {
            Ok(self.stored.lock().expect("lock").clone())
        }
        fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Db(redb::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device",
                ))));
            }
            self.stored.lock().expect("lock").extend_from_slice(batch);
            Ok(())
        }
    }

    #[test]
    fn a_full_disk_delays_durability_and_loses_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let disk = Arc::new(Flaky::default());
        disk.full.store(true, std::sync::atomic::Ordering::SeqCst);
        let s = Store::with_backend(Box::new(disk.clone())).expect("open");
        s.add_token("t", &token(None, u64::MAX)).expect("token");
        assert_eq!(
            s.enrol(&request("t", "ward-01"), [0; 32], TpmTrust::None, 0)
                .expect("db"),
            Ok(())
        );
        let written = s.written();
        // Whoever waits to acknowledge is told why, and acknowledges nothing.
        let e = rt.block_on(s.durable(written)).expect_err("not durable");
        assert_eq!(
            e.to_string(),
            "the database cannot commit now: database: I/O error: No space left on device"
        );
        assert!(disk.stored.lock().expect("lock").is_empty());
        // Space again: the flusher's retry commits everything, in order.
        disk.full.store(false, std::sync::atomic::Ordering::SeqCst);
        let waited = std::time::Instant::now();
        while rt.block_on(s.durable(written)).is_err() {
            assert!(waited.elapsed() < Duration::from_secs(10), "never retried");
            std::thread::sleep(Duration::from_millis(50));
        }
        let stored = disk.stored.lock().expect("lock").clone();
        assert_eq!(
            stored.iter().map(|(t, _, _)| *t).collect::<Vec<_>>(),
            [Table::Tokens, Table::Tokens, Table::Terminals]
        );
        drop(s);
        // What the disk holds is the whole state: a restart sees the terminal
        // and the spent token.
        let again = Store::with_backend(Box::new(disk.clone())).expect("reopen");
        assert!(again.terminal("ward-01").expect("db").is_some());
        assert_eq!(
            again
                .enrol(&request("t", "ward-02"), [0; 32], TpmTrust::None, 0)
                .expect("db"),
            Err("the bootstrap token was already used".into())
        );
    }

    #[test]
    fn client_keys_renew_once_and_a_retired_key_stays_retired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        s.add_token("t", &token(None, u64::MAX)).expect("token");
        let (k1, k2, k3) = ([1; 32], [2; 32], [3; 32]);
        assert_eq!(
            s.enrol(&request("t", "ward-01"), k1, TpmTrust::None, 0)
                .expect("db"),
            Ok(())
        );
        assert!(s.admit_client_key("ward-01", &k1));
        assert!(!s.admit_client_key("ward-01", &k2), "not yet");
        assert!(s.renew_client_key("ward-01", &k1, k2));
        assert!(
            s.admit_client_key("ward-01", &k1),
            "until the new one is used"
        );
        assert!(
            s.admit_client_key("ward-01", &k2),
            "first use of the new key"
        );
        assert!(!s.client_key_admitted("ward-01", &k1), "retired");
        // A session still open on the retired key cannot renew back in.
        assert!(!s.renew_client_key("ward-01", &k1, k3));
        assert!(!s.client_key_admitted("ward-01", &k3));
        assert!(s.client_key_admitted("ward-01", &k2));
    }

    #[test]
    fn policy_generations_only_go_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        let g = |d: u8| s.policy_generation("ns/p", [d; 32]).expect("db");
        assert_eq!(g(1), 1);
        assert_eq!(g(1), 1);
        assert_eq!(g(2), 2);
        assert_eq!(g(1), 3, "going back to an old spec is a new generation");
        // Deleted and re-created with the same spec: a new generation, not 1
        // (agents would refuse generation 1 as a rollback).
        s.forget_policy("ns/p");
        assert_eq!(g(1), 4);
    }

    #[test]
    fn a_corrupt_database_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenet.redb");
        let garbage = vec![0x5a; 8192];
        std::fs::write(&path, &garbage).expect("write");
        let e = Store::open(&path).err().expect("refused");
        let message = e.to_string();
        assert!(
            message.starts_with(&format!("{}: cannot open the database (", path.display())),
            "{message}"
        );
        assert!(message.ends_with("); it was left as it is"), "{message}");
        assert_eq!(std::fs::read(&path).expect("file"), garbage);
    }
}

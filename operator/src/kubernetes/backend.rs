//! The store's durable side in Kubernetes mode: the API server (etcd
//! underneath) instead of redb. The operator keeps the same in-memory
//! working set and hands this backend the same batches of changes, in two
//! tiers:
//!
//! - **The ledger** (what a group commit waits for): every record in
//!   canonical encoding, packed into 16 ConfigMaps `tenet-ledger-NN` of the
//!   operator's namespace by a hash of its key. A commit patches only the
//!   shards it touched, in parallel, each with just the keys that changed
//!   (a JSON merge patch: the ledger is the operator's own, nobody else
//!   manages its fields): 1,000 dispatch records are 16 writes, not 1,000. Inventories are not in it:
//!   agents send theirs on every connection, so a new leader has them
//!   again within moments.
//! - **The resources people read**, written behind (never waited on),
//!   latest state per object, by one writer task: `Terminal` (spec from the
//!   enrolment; status: connected, compliance with each policy),
//!   `Remediation` TERMINAL.POLICYHASH in the policy's namespace, owned by
//!   the policy (spec: the dispatch; status: phase), `SecurityCertificate`
//!   (status: level, validity, conditions, the certificate).
//!
//! Server-side apply under one field manager, `tenet-operator`, for the
//! resources.

use crate::time::now_ms;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use tenet_crds::Terminal;

use crate::reconcile::posture::CertRecord;
use crate::store::{
    Backend, Change, LiveDispatch, PairRecord, StoreError, StoredInventory, Table, TerminalRecord,
};

pub const FIELD_MANAGER: &str = "tenet-operator";
pub const TOKENS_SECRET: &str = "tenet-tokens";
/// Ledger shards.
pub const SHARDS: usize = 16;
const LEDGER_LABEL: &str = "tenet.dev/ledger";
/// The store format of a shard's entries (`crate::store::migrate`); a
/// shard without it was written by release 0.1 (format 1).
const FORMAT_ANNOTATION: &str = "tenet.dev/ledger-format";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A short stable name part for a policy key (`namespace/name`).
pub fn policy_hash(policy: &str) -> String {
    hex::encode(&tenet_protocol::wire::sha256(policy.as_bytes())[..6])
}

/// The Remediation object of a (terminal, policy) pair.
pub fn remediation_name(terminal: &str, policy: &str) -> String {
    format!("{terminal}.{}", policy_hash(policy))
}

fn shard_name(shard: usize) -> String {
    format!("tenet-ledger-{shard:02}")
}

fn table_code(t: Table) -> u8 {
    match t {
        Table::Terminals => 1,
        Table::Tokens => 2,
        Table::Pairs => 3,
        Table::Dispatches => 4,
        Table::Inventories => 5,
        Table::Policies => 6,
        Table::Certificates => 7,
        Table::Approved => 8,
    }
}

fn table_of(code: u8) -> Option<Table> {
    Table::ALL.into_iter().find(|t| table_code(*t) == code)
}

/// Where a record lives in the ledger: its shard and its data key.
fn slot(table: Table, key: &str) -> (usize, String) {
    let mut input = vec![table_code(table)];
    input.extend_from_slice(key.as_bytes());
    let h = tenet_protocol::wire::sha256(&input);
    (usize::from(h[0]) % SHARDS, hex::encode(&h[..12]))
}

/// A ledger entry: table, key and record, so a shard decodes alone.
fn entry(table: Table, key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + key.len() + value.len());
    out.push(table_code(table));
    out.extend_from_slice(&(key.len() as u16).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value);
    out
}

fn unentry(bytes: &[u8]) -> Option<Change> {
    let table = table_of(*bytes.first()?)?;
    let len = usize::from(u16::from_be_bytes(bytes.get(1..3)?.try_into().ok()?));
    let key = std::str::from_utf8(bytes.get(3..3 + len)?)
        .ok()?
        .to_string();
    Some(Change::put(table, key, bytes.get(3 + len..)?.to_vec()))
}

/// The state the resources for people are written from.
#[derive(Default)]
struct Objects {
    terminals: BTreeMap<String, TerminalRecord>,
    /// Terminal → policy → pair.
    pairs: BTreeMap<String, BTreeMap<String, PairRecord>>,
    /// Pair key → live dispatch.
    dispatches: BTreeMap<String, LiveDispatch>,
    certificates: BTreeMap<String, CertRecord>,
    /// Terminal → when its newest verified inventory arrived (inventories
    /// stay out of the ledger; only their time is kept here).
    inventory_ms: HashMap<String, u64>,
    /// Terminal → the `lastReportTime` its resource was last written with.
    report_written_ms: HashMap<String, u64>,
    /// Terminals whose certificate's expiry was seen (their resources were
    /// written again for it); cleared by the next certificate record.
    expiry_seen: BTreeSet<String>,
    /// What was last written of each object (to skip unchanged ones).
    written: HashMap<String, serde_json::Value>,
}

/// An object for people that changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Dirty {
    Terminal(String),
    Remediation(String),
    Certificate(String),
}

pub struct KubeBackend {
    client: Client,
    namespace: String,
    handle: tokio::runtime::Handle,
    objects: Mutex<Objects>,
    dirty: Mutex<BTreeSet<Dirty>>,
    wake: tokio::sync::Notify,
    /// API writes made (ledger shards, resources, statuses, deletes).
    pub writes: Arc<AtomicU64>,
    /// ... of which ledger writes (the ones commits wait for).
    pub ledger_writes: Arc<AtomicU64>,
    /// Objects for people being written now.
    in_flight: AtomicU64,
    /// When the last ledger commit ended (ms).
    last_commit_ms: AtomicU64,
    /// Terminals whose resource this operator wrote (so that one missing
    /// was deleted by a person, not yet to be created).
    published: Mutex<BTreeSet<String>>,
    /// Policy key → uid, for owner references (filled by the policy watcher).
    pub policy_uids: Arc<Mutex<HashMap<String, String>>>,
    /// Each Terminal's identity fingerprint and `spec.labels` as last seen
    /// (filled by [`KubeBackend::watch_terminals`]); unset ones are left out.
    terminal_labels: Mutex<HashMap<String, SeenLabels>>,
    /// Terminals seen without `spec.labels` (written by an earlier
    /// version): given their labels once, so that an edit starts from them.
    unlabelled: Mutex<BTreeSet<String>>,
    /// Why a Terminal's labels were not taken, as last said (said once).
    refused_labels: Mutex<HashMap<String, String>>,
    /// Terminals a person deleted, with the identity fingerprint they had.
    deleted: Mutex<HashMap<String, String>>,
}

/// What a Terminal resource says of its terminal's labels.
#[derive(Debug, Clone)]
struct SeenLabels {
    /// Its `spec.identity.fingerprint`: labels count only for that terminal.
    fingerprint: String,
    labels: BTreeMap<String, String>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("the API server: {e}"))
}

/// A record of a change; `None` when it was deleted (or is unreadable).
fn decode<T: serde::de::DeserializeOwned + serde::Serialize>(raw: Option<&Vec<u8>>) -> Option<T> {
    tenet_protocol::wire::decode(raw?).ok()
}

impl KubeBackend {
    /// A backend; call [`KubeBackend::start_writer`] once the runtime runs.
    pub fn new(client: Client, namespace: &str, handle: tokio::runtime::Handle) -> KubeBackend {
        KubeBackend {
            client,
            namespace: namespace.to_string(),
            handle,
            objects: Mutex::default(),
            dirty: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            writes: Arc::default(),
            ledger_writes: Arc::default(),
            in_flight: AtomicU64::new(0),
            last_commit_ms: AtomicU64::new(0),
            published: Mutex::default(),
            policy_uids: Arc::default(),
            terminal_labels: Mutex::default(),
            unlabelled: Mutex::default(),
            refused_labels: Mutex::default(),
            deleted: Mutex::default(),
        }
    }

    /// Watch the Terminal resources: each one there counts as published
    /// (its spec is never applied again, so a relabelling made while no
    /// operator ran is not undone), and its `spec.labels` are kept for
    /// [`KubeBackend::relabelled`]. `changed` wakes the loop. Returns once
    /// the first full list is in.
    pub async fn watch_terminals(self: &Arc<Self>, changed: Arc<tokio::sync::Notify>) {
        use kube::runtime::watcher::{self, Event};
        let api: Api<Terminal> = Api::namespaced(self.client.clone(), &self.namespace);
        let me = self.clone();
        let (listed_tx, listed) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut listed_tx = Some(listed_tx);
            // A (re-)list is gathered apart and replaces what was seen at
            // its end: a Terminal deleted while the watch was down is not
            // remembered (its labels must not come back to a terminal
            // enrolled again under its name).
            let mut listing: Option<HashMap<String, SeenLabels>> = None;
            let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(event) = stream.next().await {
                match event {
                    Ok(Event::Init) => listing = Some(HashMap::new()),
                    Ok(Event::InitApply(t)) => {
                        if let Some((name, seen)) = me.saw_terminal(&t) {
                            match listing.as_mut() {
                                Some(l) => {
                                    l.insert(name, seen);
                                }
                                None => me.remember_labels(name, seen),
                            }
                        }
                    }
                    Ok(Event::Apply(t)) => {
                        if let Some((name, seen)) = me.saw_terminal(&t) {
                            me.remember_labels(name, seen);
                        }
                    }
                    Ok(Event::Delete(t)) => {
                        if let (Some(name), Ok(mut l)) =
                            (t.metadata.name.as_ref(), me.terminal_labels.lock())
                        {
                            l.remove(name);
                        }
                    }
                    Ok(Event::InitDone) => {
                        if let (Some(l), Ok(mut all)) = (listing.take(), me.terminal_labels.lock())
                        {
                            *all = l;
                        }
                        if let Some(tx) = listed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching Terminals"),
                }
                changed.notify_one();
            }
        });
        let _ = listed.await;
    }

    /// A Terminal is there: it counts as published; its labels, when set,
    /// are returned to be remembered; unset, it is to be given them.
    fn saw_terminal(&self, t: &Terminal) -> Option<(String, SeenLabels)> {
        let name = t.metadata.name.clone()?;
        if let Ok(mut p) = self.published.lock() {
            p.insert(name.clone());
        }
        match &t.spec.labels {
            Some(labels) => Some((
                name,
                SeenLabels {
                    fingerprint: t.spec.identity.fingerprint.clone(),
                    labels: labels.clone(),
                },
            )),
            None => {
                if let Ok(mut u) = self.unlabelled.lock() {
                    u.insert(name);
                }
                None
            }
        }
    }

    fn remember_labels(&self, name: String, seen: SeenLabels) {
        if let Ok(mut l) = self.terminal_labels.lock() {
            l.insert(name, seen);
        }
    }

    /// Give each Terminal seen without `spec.labels` the labels `assigned`
    /// to it (`None`: not enrolled here), once.
    pub async fn backfill_labels(
        &self,
        assigned: impl Fn(&str) -> Option<BTreeMap<String, String>>,
    ) {
        let names: Vec<String> = self
            .unlabelled
            .lock()
            .map(|mut u| std::mem::take(&mut *u).into_iter().collect())
            .unwrap_or_default();
        let api: Api<Terminal> = Api::namespaced(self.client.clone(), &self.namespace);
        for name in names {
            let Some(labels) = assigned(&name) else {
                continue;
            };
            let patch = json!({ "spec": { "labels": labels } });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => self.count(),
                Err(e) => {
                    tracing::warn!(terminal = %name, error = %e, "cannot write the labels of a Terminal")
                }
            }
        }
    }

    /// Terminals whose `spec.labels` `differs` from the labels the store
    /// assigned the terminal of that identity fingerprint, with the labels
    /// to give them; labels that are not valid
    /// are left out and said once (a warning).
    pub fn relabelled(
        &self,
        differs: impl Fn(&str, &str, &BTreeMap<String, String>) -> bool,
    ) -> Vec<(String, BTreeMap<String, String>)> {
        // Copied first: the store is not called under this lock.
        let seen: Vec<(String, SeenLabels)> = self
            .terminal_labels
            .lock()
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let mut changed = Vec::new();
        for (
            name,
            SeenLabels {
                fingerprint,
                labels,
            },
        ) in seen
        {
            if !differs(&name, &fingerprint, &labels) {
                continue;
            }
            match crate::tokens::check_labels(&labels) {
                Ok(()) => changed.push((name, labels)),
                Err(why) => {
                    let said = self
                        .refused_labels
                        .lock()
                        .map(|mut r| r.insert(name.clone(), why.clone()) == Some(why.clone()))
                        .unwrap_or(true);
                    if !said {
                        tracing::warn!(terminal = %name, error = %why, "the labels on the Terminal resource are not valid; the terminal keeps its labels");
                    }
                }
            }
        }
        changed
    }

    fn pp() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    fn count(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Write the resources for people behind the commits: whatever changed,
    /// latest state, a batch at a time.
    pub fn start_writer(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.wake.notified().await;
                // Out of the way of the commits (the API server's CPU is
                // theirs first): wait for 300 ms without one, at most 2 s.
                let started = std::time::Instant::now();
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let quiet = now_ms().saturating_sub(me.last_commit_ms.load(Ordering::Relaxed));
                    if quiet >= 300 || started.elapsed() >= std::time::Duration::from_secs(2) {
                        break;
                    }
                }
                let batch: Vec<Dirty> = match me.dirty.lock() {
                    Ok(mut d) => {
                        me.in_flight.fetch_add(d.len() as u64, Ordering::SeqCst);
                        std::mem::take(&mut *d).into_iter().collect()
                    }
                    Err(_) => continue,
                };
                let taken = batch.len() as u64;
                let failed: Vec<Dirty> = futures::stream::iter(batch)
                    .map(|d| {
                        let me = me.clone();
                        async move {
                            match me.write_object(&d).await {
                                Ok(()) => None,
                                Err(e) => {
                                    tracing::warn!(object = ?d, error = %e, "status not written; will retry");
                                    Some(d)
                                }
                            }
                        }
                    })
                    .buffer_unordered(16)
                    .filter_map(|x| async move { x })
                    .collect()
                    .await;
                let retry = !failed.is_empty();
                if let Ok(mut d) = me.dirty.lock() {
                    d.extend(failed);
                    me.in_flight.fetch_sub(taken, Ordering::SeqCst);
                }
                if retry {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    me.wake.notify_one();
                }
            }
        });
    }

    /// Terminals whose resource was deleted (by a person: `kubectl delete
    /// terminal NAME` de-enrols it), among those this operator wrote.
    pub async fn deleted_terminals(&self) -> Result<Vec<String>, StoreError> {
        let published: Vec<String> = self
            .published
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default();
        if published.is_empty() {
            return Ok(vec![]);
        }
        let api: Api<Terminal> = Api::namespaced(self.client.clone(), &self.namespace);
        let present: BTreeSet<String> = api
            .list_metadata(&ListParams::default())
            .await
            .map_err(err)?
            .into_iter()
            .filter_map(|t| t.metadata.name)
            .collect();
        let gone: Vec<String> = published
            .into_iter()
            .filter(|t| !present.contains(t))
            .collect();
        // Never created again for the identity a person deleted it with
        // (a write in flight still sees the record until the store's
        // forgetting is committed); a terminal enrolled again under the
        // name has another identity key.
        let identities: Vec<(String, Option<String>)> = gone
            .iter()
            .map(|t| {
                let fp = self.objects.lock().ok().and_then(|o| {
                    o.terminals
                        .get(t)
                        .map(|r| r.identity.fingerprint().to_hex())
                });
                (t.clone(), fp)
            })
            .collect();
        if let Ok(mut d) = self.deleted.lock() {
            for (t, fp) in identities {
                if let Some(fp) = fp {
                    d.insert(t, fp);
                }
            }
        }
        if let Ok(mut p) = self.published.lock() {
            for t in &gone {
                p.remove(t);
            }
        }
        Ok(gone)
    }

    /// Whether the Terminal `name` of identity `fingerprint` was deleted by
    /// a person (and is not to be created again).
    pub(super) fn deleted_by_a_person(&self, name: &str, fingerprint: &str) -> bool {
        self.deleted
            .lock()
            .is_ok_and(|d| d.get(name).is_some_and(|f| f == fingerprint))
    }

    /// A certificate that expired changes its resource (its Ready
    /// condition) and its Terminal's (no level) with no change of record:
    /// mark both to be written again, once per expiry.
    pub fn mark_expired(&self, now_ms: u64) {
        let (Ok(mut o), Ok(mut dirty)) = (self.objects.lock(), self.dirty.lock()) else {
            return;
        };
        let expired: Vec<String> = o
            .certificates
            .iter()
            .filter(|(t, c)| {
                c.issued.as_ref().is_some_and(|i| i.not_after_ms <= now_ms)
                    && !o.expiry_seen.contains(*t)
            })
            .map(|(t, _)| t.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        for t in expired {
            dirty.insert(Dirty::Certificate(t.clone()));
            dirty.insert(Dirty::Terminal(t.clone()));
            o.expiry_seen.insert(t);
        }
        drop((o, dirty));
        self.wake.notify_one();
    }

    /// Objects for people not yet written (0: everything is out).
    pub fn pending(&self) -> u64 {
        self.dirty.lock().map_or(0, |d| d.len() as u64) + self.in_flight.load(Ordering::SeqCst)
    }

    /// Write the changed entries of one ledger shard: a JSON merge patch
    /// with just those keys (`null` deletes one), so the API server neither
    /// rewrites nor re-tracks the rest of the shard.
    async fn write_shard(
        &self,
        shard: usize,
        changed: BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let data: BTreeMap<String, Option<String>> = changed
            .iter()
            .map(|(k, v)| (k.clone(), v.as_deref().map(b64)))
            .collect();
        let body = json!({ "binaryData": data });
        api.patch(
            &shard_name(shard),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
        .map_err(err)?;
        self.count();
        self.ledger_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Create the ledger's shards that do not exist yet.
    async fn create_shards(&self, existing: &BTreeSet<String>) -> Result<(), StoreError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        for shard in 0..SHARDS {
            let name = shard_name(shard);
            if existing.contains(&name) {
                continue;
            }
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {
                    "name": name,
                    "labels": { LEDGER_LABEL: "true" },
                    "annotations": { FORMAT_ANNOTATION: crate::store::migrate::FORMAT.to_string() },
                },
            }))
            .map_err(err)?;
            match api.create(&kube::api::PostParams::default(), &cm).await {
                Ok(_) => self.count(),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(())
    }

    /// The oldest format among the ledger's shards (the current one when
    /// there are none yet).
    async fn ledger_format(&self) -> Result<u32, StoreError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = api
            .list_metadata(&ListParams::default().labels(&format!("{LEDGER_LABEL}=true")))
            .await
            .map_err(err)?;
        let mut oldest = None;
        for cm in &list {
            let format = match cm
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(FORMAT_ANNOTATION))
            {
                None => crate::store::migrate::UNMARKED,
                Some(v) => v.parse().map_err(|_| StoreError::Corrupt {
                    key: cm.metadata.name.clone().unwrap_or_default(),
                    message: format!("{FORMAT_ANNOTATION} is {v:?}, not a number"),
                })?,
            };
            oldest = Some(oldest.map_or(format, |o: u32| o.min(format)));
        }
        Ok(oldest.unwrap_or(crate::store::migrate::FORMAT))
    }

    /// Mark every shard as holding `format`.
    async fn mark_format(&self, format: u32) -> Result<(), StoreError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        for shard in 0..SHARDS {
            let body =
                json!({ "metadata": { "annotations": { FORMAT_ANNOTATION: format.to_string() } } });
            api.patch(
                &shard_name(shard),
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await
            .map_err(err)?;
            self.count();
        }
        Ok(())
    }

    async fn load_all(&self) -> Result<Vec<Change>, StoreError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut out = Vec::new();
        let list = api
            .list(&ListParams::default().labels(&format!("{LEDGER_LABEL}=true")))
            .await
            .map_err(err)?;
        let names: BTreeSet<String> = list
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        self.create_shards(&names).await?;
        for cm in list {
            out.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .values()
                    .filter_map(|v| unentry(&v.0)),
            );
        }
        self.remember(&out);
        Ok(out)
    }

    /// Keep what the resources for people are made of; mark them dirty.
    fn remember(&self, batch: &[Change]) {
        let (Ok(mut o), Ok(mut dirty)) = (self.objects.lock(), self.dirty.lock()) else {
            return;
        };
        for Change { table, key, value } in batch {
            let value = value.as_ref();
            match table {
                Table::Terminals => {
                    match value.and_then(|v| TerminalRecord::decode(v).ok()) {
                        Some(r) => {
                            o.terminals.insert(key.clone(), r);
                            dirty.insert(Dirty::Terminal(key.clone()));
                            // Its remediations show whether it is online
                            // (Pending while it is not).
                            let prefix = format!("{key}\u{0}");
                            for live in o.dispatches.range(prefix.clone()..) {
                                if !live.0.starts_with(&prefix) {
                                    break;
                                }
                                dirty.insert(Dirty::Remediation(live.0.clone()));
                            }
                        }
                        // De-enrolled: its resource was deleted by a person.
                        _ => {
                            o.terminals.remove(key);
                            o.pairs.remove(key);
                            o.inventory_ms.remove(key);
                            o.report_written_ms.remove(key);
                        }
                    }
                }
                Table::Pairs => {
                    if let Some((terminal, policy)) = key.split_once('\u{0}') {
                        let pairs = o.pairs.entry(terminal.to_string()).or_default();
                        match decode::<PairRecord>(value) {
                            Some(p) => {
                                pairs.insert(policy.to_string(), p);
                            }
                            _ => {
                                pairs.remove(policy);
                            }
                        }
                        dirty.insert(Dirty::Terminal(terminal.to_string()));
                        if o.dispatches.contains_key(key) {
                            dirty.insert(Dirty::Remediation(key.clone()));
                        }
                    }
                }
                Table::Dispatches => {
                    match decode::<LiveDispatch>(value) {
                        Some(d) => {
                            o.dispatches.insert(key.clone(), d);
                        }
                        _ => {
                            o.dispatches.remove(key);
                        }
                    }
                    dirty.insert(Dirty::Remediation(key.clone()));
                }
                Table::Certificates => {
                    match decode(value) {
                        Some(c) => {
                            o.certificates.insert(key.clone(), c);
                        }
                        _ => {
                            o.certificates.remove(key);
                        }
                    }
                    o.expiry_seen.remove(key);
                    dirty.insert(Dirty::Certificate(key.clone()));
                    // Its security level is in the Terminal's status.
                    dirty.insert(Dirty::Terminal(key.clone()));
                }
                Table::Inventories => {
                    let Some(received_ms) = value.and_then(|v| StoredInventory::received_ms_of(v))
                    else {
                        continue;
                    };
                    o.inventory_ms.insert(key.clone(), received_ms);
                    // The Terminal's lastReportTime follows its inventories
                    // at most every LAST_REPORT_EVERY_MS (an inventory
                    // comes every few minutes per terminal; a write per
                    // inventory would multiply the API writes), and with
                    // every other change of its status.
                    let written = o.report_written_ms.get(key).copied().unwrap_or(0);
                    if received_ms >= written + LAST_REPORT_EVERY_MS {
                        dirty.insert(Dirty::Terminal(key.clone()));
                    }
                }
                Table::Tokens | Table::Policies | Table::Approved => {}
            }
        }
        drop((o, dirty));
        self.wake.notify_one();
    }

    /// The tokens in the Secret `tenet token create --kubernetes` writes
    /// (by hash), with their records.
    pub async fn tokens(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(s) = secrets.get_opt(TOKENS_SECRET).await.map_err(err)? else {
            return Ok(vec![]);
        };
        Ok(s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect())
    }
}

/// Run `work` on `runtime` and wait for its end on this thread, which may
/// be one of that runtime's workers: the store commits from its flusher
/// thread, and also on whatever thread drops it (an async fn returning an
/// error drops it on a worker). `Handle::block_on` panics there; this hands
/// the worker's other tasks over while it waits ([`crate::store::off_runtime`]).
/// On a current-thread runtime's own thread it would wait for ever: the
/// operator's runtime is multi-thread.
pub(crate) fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(work.await);
    });
    crate::store::off_runtime(move || rx.recv()).unwrap_or_else(|_| {
        Err(StoreError::Unavailable(
            "the runtime stopped before the write ended".into(),
        ))
    })
}

/// Shared with the daemon, which reads its counts and its tokens.
impl Backend for Arc<KubeBackend> {
    fn load(&self) -> Result<Vec<Change>, StoreError> {
        let me = self.clone();
        wait_on(&self.handle, async move { me.load_all().await })
    }

    fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
        // Inventories stay out of the ledger (agents resend them). The
        // latest change of a key in the batch wins.
        let mut touched: BTreeMap<usize, BTreeMap<String, Option<Vec<u8>>>> = BTreeMap::new();
        for Change { table, key, value } in batch {
            if *table == Table::Inventories {
                continue;
            }
            let (shard, data_key) = slot(*table, key);
            let value = value.as_ref().map(|v| entry(*table, key, v));
            touched.entry(shard).or_default().insert(data_key, value);
        }
        let me = self.clone();
        wait_on(&self.handle, async move {
            let results: Vec<Result<(), StoreError>> = futures::stream::iter(touched)
                .map(|(shard, changed)| me.write_shard(shard, changed))
                .buffer_unordered(SHARDS)
                .collect()
                .await;
            results.into_iter().collect::<Result<(), StoreError>>()
        })?;
        self.last_commit_ms.store(now_ms(), Ordering::Relaxed);
        self.remember(batch);
        Ok(())
    }

    fn format(&self) -> Result<u32, StoreError> {
        let me = self.clone();
        wait_on(&self.handle, async move { me.ledger_format().await })
    }

    /// The records, then the shards' markers: a migration cut short is
    /// done again at the next start (records of either format decode).
    fn migrate(&self, batch: &[Change], format: u32) -> Result<(), StoreError> {
        self.commit(batch)?;
        let me = self.clone();
        wait_on(&self.handle, async move { me.mark_format(format).await })
    }

    fn describe(&self) -> String {
        format!(
            "the Kubernetes ledger (ConfigMaps tenet-ledger-NN in namespace {})",
            self.namespace
        )
    }
}

mod objects;
mod people;

use people::LAST_REPORT_EVERY_MS;

#[cfg(test)]
mod mock_api;
#[cfg(test)]
mod tests;

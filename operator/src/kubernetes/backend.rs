//! The store's durable side in Kubernetes mode: the API server (etcd
//! underneath) instead of redb. The operator keeps the same in-memory
//! working set and hands this backend the same batches of changes; each
//! batch becomes at most one server-side apply per object it touched (under
//! one field manager), all of a batch in parallel:
//!
//! | store record            | resource                                              |
//! |-------------------------|-------------------------------------------------------|
//! | terminal, inventory,    | `Terminal` NAME (operator namespace): spec from the   |
//! | pair states             | enrolment; records as `tenet.dev/...` annotations;    |
//! |                         | status (connected, compliance, policies) when changed |
//! | live dispatch           | `Remediation` TERMINAL.POLICYHASH in the policy's     |
//! |                         | namespace, owned by the policy; status phase          |
//! | certificate             | `SecurityCertificate` NAME (operator namespace)       |
//! | tokens                  | the Secret `tenet-tokens`, one key per token hash     |
//!
//! The records themselves travel as the store's canonical encoding
//! (base64) in annotations, so loading after a fail-over gives back exactly
//! what was stored; the spec and status fields are for people and kubectl.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tenet_crds::{Remediation, SecurityCertificate, Terminal};

use crate::reconcile::certificate::CertRecord;
use crate::reconcile::state::PairState;
use crate::store::{Backend, Change, LiveDispatch, PairRecord, StoreError, Table, TerminalRecord};

pub const FIELD_MANAGER: &str = "tenet-operator";
pub const TOKENS_SECRET: &str = "tenet-tokens";
const A_TERMINAL: &str = "tenet.dev/terminal";
const A_INVENTORY: &str = "tenet.dev/inventory";
const A_CERTIFICATE: &str = "tenet.dev/certificate";
const A_DISPATCH: &str = "tenet.dev/dispatch";
const A_POLICY: &str = "tenet.dev/policy";
const PAIR_PREFIX: &str = "pair.tenet.dev/";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// A short stable name part for a policy key (`namespace/name`).
pub fn policy_hash(policy: &str) -> String {
    hex::encode(&tenet_protocol::wire::sha256(policy.as_bytes())[..6])
}

/// The Remediation object of a (terminal, policy) pair.
pub fn remediation_name(terminal: &str, policy: &str) -> String {
    format!("{terminal}.{}", policy_hash(policy))
}

/// What the backend last wrote of one terminal.
#[derive(Default, Clone)]
struct TerminalObject {
    record: Option<Vec<u8>>,
    inventory: Option<Vec<u8>>,
    /// Policy key → encoded pair record.
    pairs: BTreeMap<String, Vec<u8>>,
    status: Option<serde_json::Value>,
}

#[derive(Default)]
struct Objects {
    terminals: BTreeMap<String, TerminalObject>,
    /// Pair key → encoded live dispatch, and the phase last written.
    dispatches: BTreeMap<String, (Vec<u8>, String)>,
    certificates: BTreeMap<String, Vec<u8>>,
    tokens: BTreeMap<String, Vec<u8>>,
}

/// A write the backend makes, counted.
enum Write {
    Terminal(String),
    Dispatch(String),
    DeleteDispatch(String),
    Certificate(String),
    Tokens,
}

pub struct KubeBackend {
    client: Client,
    namespace: String,
    handle: tokio::runtime::Handle,
    objects: Mutex<Objects>,
    /// API writes made (applies, status applies, deletes).
    pub writes: Arc<AtomicU64>,
    /// Policy key → uid, for owner references (filled by the policy watcher).
    pub policy_uids: Arc<Mutex<HashMap<String, String>>>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("the API server: {e}"))
}

impl KubeBackend {
    pub fn new(client: Client, namespace: &str, handle: tokio::runtime::Handle) -> KubeBackend {
        KubeBackend {
            client,
            namespace: namespace.to_string(),
            handle,
            objects: Mutex::default(),
            writes: Arc::default(),
            policy_uids: Arc::default(),
        }
    }

    fn apply_params() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    async fn write(&self, w: Write) -> Result<(), StoreError> {
        let pp = Self::apply_params();
        let snapshot = {
            let o = self.objects.lock().map_err(|_| err("poisoned"))?;
            match &w {
                Write::Terminal(t) => {
                    Snap::Terminal(o.terminals.get(t).cloned().unwrap_or_default())
                }
                Write::Dispatch(k) | Write::DeleteDispatch(k) => {
                    Snap::Dispatch(o.dispatches.get(k).cloned())
                }
                Write::Certificate(t) => Snap::Certificate(o.certificates.get(t).cloned()),
                Write::Tokens => Snap::Tokens(o.tokens.clone()),
            }
        };
        match (w, snapshot) {
            (Write::Terminal(name), Snap::Terminal(obj)) => {
                let Some(record) = obj
                    .record
                    .as_ref()
                    .and_then(|r| tenet_protocol::wire::decode::<TerminalRecord>(r).ok())
                else {
                    return Ok(());
                };
                let mut annotations = BTreeMap::new();
                annotations.insert(
                    A_TERMINAL.to_string(),
                    b64(obj.record.as_deref().unwrap_or_default()),
                );
                if let Some(inv) = &obj.inventory {
                    annotations.insert(A_INVENTORY.to_string(), b64(inv));
                }
                for (policy, raw) in &obj.pairs {
                    annotations.insert(
                        format!("{PAIR_PREFIX}{}", policy_hash(policy)),
                        format!("{policy} {}", b64(raw)),
                    );
                }
                let api: Api<Terminal> = Api::namespaced(self.client.clone(), &self.namespace);
                let body = json!({
                    "apiVersion": "tenet.dev/v1alpha1",
                    "kind": "Terminal",
                    "metadata": { "name": name, "annotations": annotations },
                    "spec": {
                        "identity": {
                            "algorithm": record.identity.algorithm().name(),
                            "publicKey": b64(&record.identity.to_bytes()),
                            "fingerprint": record.identity.fingerprint().to_hex(),
                            "tpm": record.tpm,
                        },
                        "site": record.labels.get("site"),
                    }
                });
                api.patch(&name, &pp, &Patch::Apply(&body))
                    .await
                    .map_err(err)?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                let status = terminal_status(&record, &obj.pairs);
                if obj.status.as_ref() != Some(&status) {
                    let body = json!({
                        "apiVersion": "tenet.dev/v1alpha1",
                        "kind": "Terminal",
                        "metadata": { "name": name },
                        "status": status,
                    });
                    api.patch_status(&name, &pp, &Patch::Apply(&body))
                        .await
                        .map_err(err)?;
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut o) = self.objects.lock()
                        && let Some(t) = o.terminals.get_mut(&name)
                    {
                        t.status = Some(status);
                    }
                }
            }
            (Write::Dispatch(key), Snap::Dispatch(Some((raw, phase_written)))) => {
                let Some((terminal, policy)) = key.split_once('\u{0}') else {
                    return Ok(());
                };
                let Ok(live) = tenet_protocol::wire::decode::<LiveDispatch>(&raw) else {
                    return Ok(());
                };
                let (namespace, _) = policy.split_once('/').unwrap_or((&self.namespace, policy));
                let name = remediation_name(terminal, policy);
                let api: Api<Remediation> = Api::namespaced(self.client.clone(), namespace);
                let owner = self
                    .policy_uids
                    .lock()
                    .ok()
                    .and_then(|u| u.get(policy).cloned())
                    .map(|uid| OwnerReference {
                        api_version: "tenet.dev/v1alpha1".into(),
                        kind: "TerminalPolicy".into(),
                        name: policy.split_once('/').map_or(policy, |(_, n)| n).into(),
                        uid,
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    });
                let attempt = self
                    .objects
                    .lock()
                    .ok()
                    .and_then(|o| {
                        o.terminals
                            .get(terminal)
                            .and_then(|t| t.pairs.get(policy).cloned())
                    })
                    .and_then(|raw| tenet_protocol::wire::decode::<PairRecord>(&raw).ok())
                    .map_or(1, |p| match p.state {
                        PairState::Dispatched { attempt, .. }
                        | PairState::Verifying { attempt, .. } => attempt.max(1),
                        _ => 1,
                    });
                let rfc = crate::cli::payload::rfc3339;
                let body = json!({
                    "apiVersion": "tenet.dev/v1alpha1",
                    "kind": "Remediation",
                    "metadata": {
                        "name": name,
                        "labels": { "tenet.dev/terminal": terminal, "tenet.dev/policy": policy_hash(policy) },
                        "annotations": { A_DISPATCH: b64(&raw), A_POLICY: policy },
                        "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
                    },
                    "spec": {
                        "terminal": terminal,
                        "policy": policy,
                        "policyGeneration": live.policy_generation,
                        "payloadDigest": tenet_protocol::wire::digest_string(&live.record.payload_digest),
                        "nonceCommitment": hex::encode(live.record.nonce_commitment),
                        "sequence": live.sequence,
                        "attempt": attempt,
                        "issuedAt": rfc(live.issued_ms),
                        "deadline": rfc(live.record.deadline_ms),
                    }
                });
                api.patch(&name, &pp, &Patch::Apply(&body))
                    .await
                    .map_err(err)?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                let phase = if live.record.consumed {
                    "Succeeded"
                } else {
                    "Dispatched"
                };
                if phase != phase_written {
                    let body = json!({
                        "apiVersion": "tenet.dev/v1alpha1",
                        "kind": "Remediation",
                        "metadata": { "name": name },
                        "status": { "phase": phase },
                    });
                    api.patch_status(&name, &pp, &Patch::Apply(&body))
                        .await
                        .map_err(err)?;
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut o) = self.objects.lock()
                        && let Some(d) = o.dispatches.get_mut(&key)
                    {
                        d.1 = phase.to_string();
                    }
                }
            }
            (Write::DeleteDispatch(key), _) => {
                if let Some((terminal, policy)) = key.split_once('\u{0}') {
                    let (namespace, _) =
                        policy.split_once('/').unwrap_or((&self.namespace, policy));
                    let api: Api<Remediation> = Api::namespaced(self.client.clone(), namespace);
                    match api
                        .delete(
                            &remediation_name(terminal, policy),
                            &DeleteParams::default(),
                        )
                        .await
                    {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(err(e)),
                    }
                    self.writes.fetch_add(1, Ordering::Relaxed);
                }
            }
            (Write::Certificate(terminal), Snap::Certificate(Some(raw))) => {
                let Ok(record) = tenet_protocol::wire::decode::<CertRecord>(&raw) else {
                    return Ok(());
                };
                let api: Api<SecurityCertificate> =
                    Api::namespaced(self.client.clone(), &self.namespace);
                let issued = record.issued.as_ref();
                let validity = issued.map_or(0, |i| (i.not_after_ms - i.not_before_ms) / 1000);
                let body = json!({
                    "apiVersion": "tenet.dev/v1alpha1",
                    "kind": "SecurityCertificate",
                    "metadata": { "name": terminal, "annotations": { A_CERTIFICATE: b64(&raw) } },
                    "spec": {
                        "terminal": terminal,
                        "policy": record.policy,
                        "validity": format!("{}s", validity.max(2)),
                        "renewBefore": format!("{}s", (record.renew_before_ms / 1000).min(validity.max(2) - 1)),
                    }
                });
                api.patch(&terminal, &pp, &Patch::Apply(&body))
                    .await
                    .map_err(err)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let rfc = crate::cli::payload::rfc3339;
                let conditions: Vec<serde_json::Value> =
                    crate::reconcile::certificate::conditions(&record, now)
                        .into_iter()
                        .map(|c| {
                            json!({
                                "type": c.type_, "status": c.status, "reason": c.reason,
                                "message": c.message, "lastTransitionTime": rfc(now),
                            })
                        })
                        .collect();
                let body = json!({
                    "apiVersion": "tenet.dev/v1alpha1",
                    "kind": "SecurityCertificate",
                    "metadata": { "name": terminal },
                    "status": {
                        "level": issued.map(|i| i.level),
                        "serial": issued.map(|i| hex::encode(i.serial)),
                        "notBefore": issued.map(|i| rfc(i.not_before_ms)),
                        "notAfter": issued.map(|i| rfc(i.not_after_ms)),
                        "renewalTime": issued.map(|i| rfc(i.not_after_ms.saturating_sub(record.renew_before_ms))),
                        "certificate": issued.map(|i| b64(&i.bytes)),
                        "conditions": conditions,
                    }
                });
                api.patch_status(&terminal, &pp, &Patch::Apply(&body))
                    .await
                    .map_err(err)?;
                self.writes.fetch_add(2, Ordering::Relaxed);
            }
            (Write::Tokens, Snap::Tokens(tokens)) => {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
                let data: BTreeMap<String, String> =
                    tokens.iter().map(|(k, v)| (k.clone(), b64(v))).collect();
                let body = json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": { "name": TOKENS_SECRET },
                    "data": data,
                });
                api.patch(TOKENS_SECRET, &pp, &Patch::Apply(&body))
                    .await
                    .map_err(err)?;
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        Ok(())
    }

    async fn load_all(&self) -> Result<Vec<Change>, StoreError> {
        let mut out = Vec::new();
        let mut objects = Objects::default();
        let terminals: Api<Terminal> = Api::namespaced(self.client.clone(), &self.namespace);
        for t in terminals.list(&ListParams::default()).await.map_err(err)? {
            let name = t.metadata.name.clone().unwrap_or_default();
            let a = t.metadata.annotations.clone().unwrap_or_default();
            let mut obj = TerminalObject {
                status: t.status.as_ref().and_then(|s| serde_json::to_value(s).ok()),
                ..Default::default()
            };
            if let Some(raw) = a.get(A_TERMINAL).and_then(|v| unb64(v)) {
                out.push((Table::Terminals, name.clone(), raw.clone()));
                obj.record = Some(raw);
            }
            if let Some(raw) = a.get(A_INVENTORY).and_then(|v| unb64(v)) {
                out.push((Table::Inventories, name.clone(), raw.clone()));
                obj.inventory = Some(raw);
            }
            for (k, v) in &a {
                if k.starts_with(PAIR_PREFIX)
                    && let Some((policy, raw)) = v.split_once(' ')
                    && let Some(raw) = unb64(raw)
                {
                    out.push((Table::Pairs, format!("{name}\u{0}{policy}"), raw.clone()));
                    obj.pairs.insert(policy.to_string(), raw);
                }
            }
            objects.terminals.insert(name, obj);
        }
        let remediations: Api<Remediation> = Api::all(self.client.clone());
        for r in remediations
            .list(&ListParams::default())
            .await
            .map_err(err)?
        {
            let a = r.metadata.annotations.clone().unwrap_or_default();
            if let (Some(raw), Some(policy)) =
                (a.get(A_DISPATCH).and_then(|v| unb64(v)), a.get(A_POLICY))
            {
                let key = format!("{}\u{0}{policy}", r.spec.terminal);
                out.push((Table::Dispatches, key.clone(), raw.clone()));
                let phase = r
                    .status
                    .as_ref()
                    .map(|s| format!("{:?}", s.phase))
                    .unwrap_or_default();
                objects.dispatches.insert(key, (raw, phase));
            }
        }
        let certs: Api<SecurityCertificate> = Api::namespaced(self.client.clone(), &self.namespace);
        for c in certs.list(&ListParams::default()).await.map_err(err)? {
            let a = c.metadata.annotations.clone().unwrap_or_default();
            if let Some(raw) = a.get(A_CERTIFICATE).and_then(|v| unb64(v)) {
                let name = c.metadata.name.clone().unwrap_or_default();
                out.push((Table::Certificates, name.clone(), raw.clone()));
                objects.certificates.insert(name, raw);
            }
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Some(s) = secrets.get_opt(TOKENS_SECRET).await.map_err(err)? {
            for (k, v) in s.data.unwrap_or_default() {
                out.push((Table::Tokens, k.clone(), v.0.clone()));
                objects.tokens.insert(k, v.0);
            }
        }
        if let Ok(mut o) = self.objects.lock() {
            *o = objects;
        }
        Ok(out)
    }

    /// Tokens added to the Secret by `tenet token create --kubernetes` since
    /// the last look (by hash), with their records.
    pub async fn new_tokens(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(s) = secrets.get_opt(TOKENS_SECRET).await.map_err(err)? else {
            return Ok(vec![]);
        };
        let known = self
            .objects
            .lock()
            .map(|o| {
                o.tokens
                    .keys()
                    .cloned()
                    .collect::<std::collections::HashSet<_>>()
            })
            .unwrap_or_default();
        Ok(s.data
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !known.contains(k))
            .map(|(k, v)| (k, v.0))
            .collect())
    }
}

enum Snap {
    Terminal(TerminalObject),
    Dispatch(Option<(Vec<u8>, String)>),
    Certificate(Option<Vec<u8>>),
    Tokens(BTreeMap<String, Vec<u8>>),
}

/// A Terminal's status for people: compliance with each policy selecting it.
fn terminal_status(
    record: &TerminalRecord,
    pairs: &BTreeMap<String, Vec<u8>>,
) -> serde_json::Value {
    let mut policies = Vec::new();
    let mut compliant = 0;
    for (policy, raw) in pairs {
        let Ok(p) = tenet_protocol::wire::decode::<PairRecord>(raw) else {
            continue;
        };
        if p.state == PairState::Compliant {
            compliant += 1;
        }
        let reason = match &p.state {
            PairState::Drifted { reason, .. } | PairState::Failed { reason, .. } => reason.clone(),
            _ => String::new(),
        };
        policies.push(json!({
            "policy": policy, "generation": p.generation, "state": p.state.name(), "reason": reason,
        }));
    }
    json!({
        "connected": record.offline_since_ms == 0,
        "offlineSince": (record.offline_since_ms > 0).then(|| crate::cli::payload::rfc3339(record.offline_since_ms)),
        "compliance": format!("{compliant}/{}", policies.len()),
        "policies": policies,
    })
}

impl Backend for KubeBackend {
    fn load(&self) -> Result<Vec<Change>, StoreError> {
        self.handle.block_on(self.load_all())
    }

    fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
        let mut writes: Vec<Write> = Vec::new();
        let mut touched_terminals = std::collections::BTreeSet::new();
        let mut touched_dispatches = std::collections::BTreeMap::new();
        let mut touched_certs = std::collections::BTreeSet::new();
        let mut tokens = false;
        {
            let mut o = self.objects.lock().map_err(|_| err("poisoned"))?;
            for (table, key, value) in batch {
                match table {
                    Table::Terminals => {
                        o.terminals.entry(key.clone()).or_default().record = Some(value.clone());
                        touched_terminals.insert(key.clone());
                    }
                    Table::Inventories => {
                        o.terminals.entry(key.clone()).or_default().inventory = Some(value.clone());
                        touched_terminals.insert(key.clone());
                    }
                    Table::Pairs => {
                        if let Some((terminal, policy)) = key.split_once('\u{0}') {
                            let t = o.terminals.entry(terminal.to_string()).or_default();
                            if value.is_empty() {
                                t.pairs.remove(policy);
                            } else {
                                t.pairs.insert(policy.to_string(), value.clone());
                            }
                            touched_terminals.insert(terminal.to_string());
                        }
                    }
                    Table::Dispatches => {
                        if value.is_empty() {
                            o.dispatches.remove(key);
                            touched_dispatches.insert(key.clone(), true);
                        } else {
                            let phase = o
                                .dispatches
                                .get(key)
                                .map(|d| d.1.clone())
                                .unwrap_or_default();
                            o.dispatches.insert(key.clone(), (value.clone(), phase));
                            touched_dispatches.insert(key.clone(), false);
                        }
                    }
                    Table::Certificates => {
                        o.certificates.insert(key.clone(), value.clone());
                        touched_certs.insert(key.clone());
                    }
                    Table::Tokens => {
                        o.tokens.insert(key.clone(), value.clone());
                        tokens = true;
                    }
                    // Generations come from metadata.generation here.
                    Table::Policies => {}
                }
            }
        }
        writes.extend(touched_terminals.into_iter().map(Write::Terminal));
        writes.extend(touched_dispatches.into_iter().map(|(k, deleted)| {
            if deleted {
                Write::DeleteDispatch(k)
            } else {
                Write::Dispatch(k)
            }
        }));
        writes.extend(touched_certs.into_iter().map(Write::Certificate));
        if tokens {
            writes.push(Write::Tokens);
        }
        self.handle.block_on(async {
            let results: Vec<Result<(), StoreError>> = futures::stream::iter(writes)
                .map(|w| self.write(w))
                .buffer_unordered(32)
                .collect()
                .await;
            results.into_iter().collect::<Result<(), StoreError>>()
        })
    }
}

/// The backend shared with the daemon (which reads its write count and
/// asks it for new tokens).
pub struct Shared(pub Arc<KubeBackend>);

impl Backend for Shared {
    fn load(&self) -> Result<Vec<Change>, StoreError> {
        self.0.load()
    }

    fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
        self.0.commit(batch)
    }
}

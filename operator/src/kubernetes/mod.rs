//! Kubernetes mode: the same daemon, reconciler and gateway as the
//! standalone operator, with the API server as the store and as the source
//! of policies. `TerminalPolicy` objects are watched (every namespace);
//! each carries the finalizer `tenet.dev/cleanup`, so deleting one first
//! lets the operator remove its Remediations and pair states; its status
//! (counts, observed generation, a Ready condition) is written with
//! server-side apply when it changes, with an Event when Ready changes.
//! Only the replica holding the Lease runs any of this ([`leader`]).

pub mod backend;
pub mod leader;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tenet_crds::TerminalPolicy;

use crate::policy::compile::{CompiledPolicy, compile};
use crate::reconcile::pass::PolicyStatus;
use crate::store::Store;

pub use backend::{FIELD_MANAGER, KubeBackend, TOKENS_SECRET};

pub const FINALIZER: &str = "tenet.dev/cleanup";

/// Policies from the API server, compiled, and what the operator wrote of
/// their status.
pub struct Policies {
    client: Client,
    reader: reflector::Store<TerminalPolicy>,
    /// key → the resource (uid), generation and approval annotation it
    /// was compiled at (an annotation edit, such as an admin's signature,
    /// does not move the generation; a re-created resource starts again
    /// at 1), and the compiled policy or its errors.
    #[allow(clippy::type_complexity)]
    compiled: HashMap<
        String,
        (
            (Option<String>, i64, Option<String>),
            Result<CompiledPolicy, Vec<String>>,
        ),
    >,
    statuses: tokio::sync::watch::Sender<Vec<PolicyStatus>>,
    pub uids: Arc<Mutex<HashMap<String, String>>>,
    pub writes: Arc<AtomicU64>,
}

fn key_of(p: &TerminalPolicy) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

impl Policies {
    /// Start watching; `changed` is notified on every change.
    pub fn watch(
        client: Client,
        changed: Arc<tokio::sync::Notify>,
        uids: Arc<Mutex<HashMap<String, String>>>,
        writes: Arc<AtomicU64>,
        identity: &str,
    ) -> Policies {
        let api: Api<TerminalPolicy> = Api::all(client.clone());
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()));
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watching TerminalPolicies");
                }
                changed.notify_one();
            }
        });
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "tenet-operator".into(),
                instance: Some(identity.to_string()),
            },
        );
        let (statuses, mut latest) = tokio::sync::watch::channel(Vec::new());
        let mut writer = StatusWriter {
            client: client.clone(),
            written: HashMap::new(),
            ready: HashMap::new(),
            recorder,
            writes: writes.clone(),
        };
        tokio::spawn(async move {
            while latest.changed().await.is_ok() {
                let now = crate::time::now_ms();
                let s = latest.borrow_and_update().clone();
                writer.publish(&s, now).await;
            }
        });
        Policies {
            client,
            reader,
            compiled: HashMap::new(),
            statuses,
            uids,
            writes,
        }
    }

    /// Wait for the first full list.
    pub async fn ready(&self) {
        let _ = self.reader.wait_until_ready().await;
    }

    /// The policies in force, and the errors of those that do not compile
    /// (the API server's schema and CEL rules refuse most bad ones first).
    /// Deleted policies are cleaned up (their pairs and Remediations) and
    /// released; new ones get the finalizer.
    pub async fn refresh(&mut self, store: &Store) -> (Vec<CompiledPolicy>, Vec<String>) {
        let mut policies = Vec::new();
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in self.reader.state() {
            let key = key_of(&p);
            let api: Api<TerminalPolicy> =
                Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
            if p.meta().deletion_timestamp.is_some() {
                if p.finalizers().iter().any(|f| f == FINALIZER) {
                    self.cleanup(store, &key, &api, &p).await;
                }
                continue;
            }
            seen.insert(key.clone());
            if let (Some(uid), Ok(mut u)) = (p.uid(), self.uids.lock()) {
                u.insert(key.clone(), uid);
            }
            if !p.finalizers().iter().any(|f| f == FINALIZER) {
                let mut finalizers = p.finalizers().to_vec();
                finalizers.push(FINALIZER.into());
                if let Err(e) = self.set_finalizers(&api, &p, finalizers).await {
                    tracing::warn!(policy = %key, error = %e, "cannot add the finalizer");
                }
            }
            let generation = p.meta().generation.unwrap_or(1);
            let version = (
                p.uid(),
                generation,
                p.annotations()
                    .get(tenet_protocol::approval::APPROVAL_ANNOTATION)
                    .cloned(),
            );
            let fresh = self.compiled.get(&key).is_none_or(|(v, _)| *v != version);
            if fresh {
                let result = compile(&p)
                    .map(|mut c| {
                        c.generation = generation;
                        // Each namespace is a tenant: its policies select
                        // only the terminals admins assigned to it.
                        c.tenant_scoped = true;
                        c
                    })
                    .map_err(|errs| {
                        errs.iter()
                            .map(|e| format!("{key}: {}: {}", e.path, e.message))
                            .collect()
                    });
                self.compiled.insert(key.clone(), (version, result));
            }
            match self.compiled.get(&key) {
                Some((_, Ok(c))) => policies.push(c.clone()),
                Some((_, Err(e))) => errors.extend(e.iter().cloned()),
                None => {}
            }
        }
        self.compiled.retain(|k, _| seen.contains(k));
        policies.sort_by_key(CompiledPolicy::key);
        (policies, errors)
    }

    async fn cleanup(
        &mut self,
        store: &Store,
        key: &str,
        api: &Api<TerminalPolicy>,
        p: &TerminalPolicy,
    ) {
        let removed = store.forget_policy(key);
        if let Err(e) = store.durable(store.written()).await {
            tracing::warn!(policy = %key, error = %e, "cleanup not yet durable");
            return;
        }
        // Its Remediations go before the policy does (owner references
        // would too, but only where a garbage collector runs).
        let remediations: Api<tenet_crds::Remediation> =
            Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
        let selector = format!("tenet.dev/policy={}", backend::policy_hash(key));
        match remediations
            .delete_collection(
                &kube::api::DeleteParams::default(),
                &kube::api::ListParams::default().labels(&selector),
            )
            .await
        {
            Ok(_) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(policy = %key, error = %e, "cannot delete its Remediations; will retry");
                return;
            }
        }
        let finalizers: Vec<String> = p
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        match self.set_finalizers(api, p, finalizers).await {
            Ok(()) => {
                tracing::info!(policy = %key, pairs = removed, "policy deleted: its pairs and remediations removed");
            }
            Err(e) => tracing::warn!(policy = %key, error = %e, "cannot remove the finalizer"),
        }
    }

    /// Set a policy's finalizers, on the version read (a merge patch with
    /// its resourceVersion: refused if the policy changed since).
    async fn set_finalizers(
        &self,
        api: &Api<TerminalPolicy>,
        p: &TerminalPolicy,
        finalizers: Vec<String>,
    ) -> Result<(), kube::Error> {
        let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": p.resource_version() } });
        api.patch(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Hand the pass's statuses to the status writer (never waits for
    /// the API server: the reconcile loop goes on).
    pub fn publish(&self, statuses: &[PolicyStatus]) {
        let _ = self.statuses.send(statuses.to_vec());
    }
}

/// Writes policies' status and Events behind the reconcile loop, the
/// latest statuses first.
struct StatusWriter {
    client: Client,
    written: HashMap<String, serde_json::Value>,
    ready: HashMap<String, String>,
    recorder: Recorder,
    writes: Arc<AtomicU64>,
}

impl StatusWriter {
    /// Write the status of each policy whose status changed (server-side
    /// apply of the status subresource), and an Event when its Ready
    /// condition changes.
    async fn publish(&mut self, statuses: &[PolicyStatus], now_ms: u64) {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        for s in statuses {
            let (reason, message) = ready_reason(s);
            let status = json!({
                "observedGeneration": s.observed_generation,
                "selected": s.selected,
                "compliant": s.compliant,
                "drifted": s.drifted,
                "remediating": s.remediating,
                "failed": s.failed,
                "reason": reason,
                // The Ready message too: a policy stays Unapproved while
                // the reason changes (one admin of two has signed).
                "message": message,
            });
            if self.written.get(&s.policy) == Some(&status) {
                continue;
            }
            let Some((namespace, name)) = s.policy.split_once('/') else {
                continue;
            };
            let changed = self.ready.get(&s.policy).is_none_or(|r| r != reason);
            let transition = if changed {
                crate::time::rfc3339(now_ms)
            } else {
                self.written
                    .get(&s.policy)
                    .and_then(|w| w["since"].as_str().map(str::to_string))
                    .unwrap_or_else(|| crate::time::rfc3339(now_ms))
            };
            let body = json!({
                "apiVersion": "tenet.dev/v1alpha1",
                "kind": "TerminalPolicy",
                "metadata": { "name": name },
                "status": {
                    "observedGeneration": s.observed_generation,
                    "selected": s.selected,
                    "compliant": s.compliant,
                    "drifted": s.drifted,
                    "remediating": s.remediating,
                    "failed": s.failed,
                    "conditions": [{
                        "type": "Ready",
                        "status": if reason == "Converged" { "True" } else { "False" },
                        "reason": reason,
                        "message": message,
                        "lastTransitionTime": transition,
                        "observedGeneration": s.observed_generation,
                    }],
                }
            });
            let api: Api<TerminalPolicy> = Api::namespaced(self.client.clone(), namespace);
            match api.patch_status(name, &pp, &Patch::Apply(&body)).await {
                Ok(p) => {
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    let mut w = status.clone();
                    w["since"] = json!(transition);
                    self.written.insert(s.policy.clone(), w);
                    if changed {
                        self.ready.insert(s.policy.clone(), reason.to_string());
                        let event = Event {
                            type_: if matches!(reason, "Failed" | "Unapproved") {
                                EventType::Warning
                            } else {
                                EventType::Normal
                            },
                            reason: reason.to_string(),
                            note: Some(message.clone()),
                            action: "Reconcile".into(),
                            secondary: None,
                        };
                        match self.recorder.publish(&event, &p.object_ref(&())).await {
                            Ok(()) => {
                                self.writes.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::warn!(policy = %s.policy, error = %e, "cannot record an Event")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(policy = %s.policy, error = %e, "cannot write the policy status")
                }
            }
        }
        let present: std::collections::HashSet<&str> =
            statuses.iter().map(|s| s.policy.as_str()).collect();
        self.written.retain(|k, _| present.contains(k.as_str()));
        self.ready.retain(|k, _| present.contains(k.as_str()));
    }
}

/// The Ready condition's reason and message for a policy's counts.
pub fn ready_reason(s: &PolicyStatus) -> (&'static str, String) {
    let counts = format!(
        "{}/{} compliant, {} drifted, {} remediating, {} failed",
        s.compliant, s.selected, s.drifted, s.remediating, s.failed
    );
    let reason = if s.unapproved.is_some() {
        "Unapproved"
    } else if s.failed > 0 {
        "Failed"
    } else if s.remediating > 0 {
        "Remediating"
    } else if s.drifted > 0 {
        "Drifted"
    } else {
        "Converged"
    };
    let mut message = match &s.held {
        Some(h) => format!("{counts}; held: {h}"),
        None => counts,
    };
    if let Some(u) = &s.unapproved {
        message = format!("{u}; {message}");
    }
    (reason, message)
}

/// Tokens written to the `tenet-tokens` Secret by `tenet token create
/// --kubernetes`: one data key per token hash, each added by its own field
/// manager so that adding one never removes another.
pub async fn add_token(
    client: Client,
    namespace: &str,
    hash: &str,
    record: &[u8],
) -> Result<(), kube::Error> {
    use base64::Engine;
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, namespace);
    let data: BTreeMap<&str, String> = [(
        hash,
        base64::engine::general_purpose::STANDARD.encode(record),
    )]
    .into();
    let body = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": TOKENS_SECRET },
        "data": data,
    });
    let manager = format!("tenet-token-{}", &hash[..hash.len().min(12)]);
    api.patch(
        TOKENS_SECRET,
        &PatchParams::apply(&manager),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

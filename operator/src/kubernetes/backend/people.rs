//! The resources for people, written behind the ledger from what it holds:
//! a Terminal per terminal (compliance, level, last report), a Remediation
//! per live dispatch, a SecurityCertificate per certificate. Built from the
//! `tenet-crds` types where they are typed.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{DeleteParams, Patch};
use serde_json::json;
use tenet_crds::terminal::{IdentityKey, PolicyCompliance, TerminalSpec, TerminalStatus};
use tenet_crds::{Remediation, SecurityCertificate, Terminal};

use super::{Dirty, KubeBackend, b64, policy_hash, remediation_name};
use crate::reconcile::certificate::{Audit, CertRecord};
use crate::reconcile::state::PairState;
use crate::store::{PairRecord, TerminalRecord};

impl KubeBackend {
    /// Apply `body` to an object (and `status` to its status), unless it is
    /// what was last written. With `create` false only the status is
    /// written, which never creates the object (a 404 when it is gone).
    async fn apply<K>(
        &self,
        api: &Api<K>,
        name: &str,
        body: serde_json::Value,
        status: Option<serde_json::Value>,
        create: bool,
    ) -> Result<(), kube::Error>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let id = format!(
            "{}/{}/{name}",
            K::kind(&K::DynamicType::default()),
            api.resource_url()
        );
        let both = json!([body, status]);
        if self
            .objects
            .lock()
            .is_ok_and(|o| o.written.get(&id) == Some(&both))
        {
            return Ok(());
        }
        if create {
            api.patch(name, &Self::pp(), &Patch::Apply(&body)).await?;
            self.count();
        }
        if let Some(status) = &status {
            let mut s = body.clone();
            s["status"] = status.clone();
            if let Some(m) = s.get_mut("metadata") {
                *m = json!({ "name": name });
            }
            if let Some(spec) = s.as_object_mut() {
                spec.remove("spec");
            }
            api.patch_status(name, &Self::pp(), &Patch::Apply(&s))
                .await?;
            self.count();
        }
        if let Ok(mut o) = self.objects.lock() {
            o.written.insert(id, both);
        }
        Ok(())
    }

    pub(super) async fn write_object(&self, d: &Dirty) -> Result<(), kube::Error> {
        let rfc = crate::time::rfc3339;
        match d {
            Dirty::Terminal(name) => {
                let (record, pairs, certificate, inventory_ms) = {
                    let Ok(o) = self.objects.lock() else {
                        return Ok(());
                    };
                    (
                        o.terminals.get(name).cloned(),
                        o.pairs.get(name).cloned().unwrap_or_default(),
                        o.certificates.get(name).cloned(),
                        o.inventory_ms.get(name).copied(),
                    )
                };
                let Some(record) = record else { return Ok(()) };
                let api: Api<Terminal> = Api::namespaced(self.client.clone(), &self.namespace);
                // Once written, only its status is: a status write never
                // creates the object, so a Terminal a person deleted stays
                // deleted and the daemon de-enrols it. (A GET first, then an
                // apply, re-created one deleted in between: the de-enrolment
                // was lost, about one e2e run in twelve.)
                let published = self.published.lock().is_ok_and(|p| p.contains(name));
                let status = terminal_status(
                    &record,
                    &pairs,
                    certificate.as_ref(),
                    inventory_ms,
                    crate::time::now_ms(),
                );
                let last_report_ms = last_report_ms(certificate.as_ref(), inventory_ms);
                let body = serde_json::to_value(Terminal::new(name, terminal_spec(&record)))
                    .map_err(kube::Error::SerdeError)?;
                let status = serde_json::to_value(status).map_err(kube::Error::SerdeError)?;
                match self.apply(&api, name, body, Some(status), !published).await {
                    Err(kube::Error::Api(e)) if published && e.code == 404 => return Ok(()),
                    written => written?,
                }
                if let Ok(mut o) = self.objects.lock() {
                    o.report_written_ms
                        .insert(name.clone(), last_report_ms.unwrap_or(0));
                }
                if let Ok(mut p) = self.published.lock() {
                    p.insert(name.clone());
                }
                Ok(())
            }
            Dirty::Remediation(key) => {
                let Some((terminal, policy)) = key.split_once('\u{0}') else {
                    return Ok(());
                };
                let (namespace, _) = policy.split_once('/').unwrap_or((&self.namespace, policy));
                let name = remediation_name(terminal, policy);
                let api: Api<Remediation> = Api::namespaced(self.client.clone(), namespace);
                let (live, pair) = {
                    let Ok(o) = self.objects.lock() else {
                        return Ok(());
                    };
                    (
                        o.dispatches.get(key).cloned(),
                        o.pairs.get(terminal).and_then(|p| p.get(policy).cloned()),
                    )
                };
                let Some(live) = live else {
                    // Gone from the ledger (the policy was deleted).
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => self.count(),
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                    return Ok(());
                };
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
                let attempt = pair.as_ref().map_or(1, |p| match p.state {
                    PairState::Dispatched { attempt, .. }
                    | PairState::Verifying { attempt, .. } => attempt.max(1),
                    _ => 1,
                });
                let (phase, reason) = match (&live.record.consumed, pair.as_ref().map(|p| &p.state))
                {
                    (true, Some(PairState::Failed { reason, .. })) => {
                        ("Failed", Some(reason.clone()))
                    }
                    (true, Some(PairState::Drifted { reason, .. })) => {
                        ("Failed", Some(reason.clone()))
                    }
                    (true, _) => ("Succeeded", None),
                    (false, _) => ("Dispatched", None),
                };
                let body = json!({
                    "apiVersion": "tenet.dev/v1alpha1",
                    "kind": "Remediation",
                    "metadata": {
                        "name": name,
                        "labels": { "tenet.dev/terminal": terminal, "tenet.dev/policy": policy_hash(policy) },
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
                let status = json!({ "phase": phase, "reason": reason });
                self.apply(&api, &name, body, Some(status), true).await
            }
            Dirty::Certificate(terminal) => {
                let record = self
                    .objects
                    .lock()
                    .ok()
                    .and_then(|o| o.certificates.get(terminal).cloned());
                let api: Api<SecurityCertificate> =
                    Api::namespaced(self.client.clone(), &self.namespace);
                let Some(record) = record else {
                    // Its terminal was de-enrolled.
                    match api.delete(terminal, &DeleteParams::default()).await {
                        Ok(_) => self.count(),
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                    return Ok(());
                };
                let issued = record.issued.as_ref();
                let validity = issued
                    .map_or(3600, |i| (i.not_after_ms - i.not_before_ms) / 1000)
                    .max(2);
                let body = json!({
                    "apiVersion": "tenet.dev/v1alpha1",
                    "kind": "SecurityCertificate",
                    "metadata": { "name": terminal },
                    "spec": {
                        "terminal": terminal,
                        "policy": record.policy,
                        "validity": format!("{validity}s"),
                        "renewBefore": format!("{}s", (record.renew_before_ms / 1000).min(validity - 1)),
                    }
                });
                let now = crate::time::now_ms();
                let conditions: Vec<serde_json::Value> =
                    crate::reconcile::certificate::conditions(&record, now)
                        .into_iter()
                        .map(|c| {
                            json!({
                                "type": c.type_, "status": c.status, "reason": c.reason,
                                "message": c.message,
                                "lastTransitionTime": rfc(record.decided_ms.max(1)),
                            })
                        })
                        .collect();
                let status = json!({
                    "level": issued.map(|i| i.level),
                    "serial": issued.map(|i| hex::encode(i.serial)),
                    "notBefore": issued.map(|i| rfc(i.not_before_ms)),
                    "notAfter": issued.map(|i| rfc(i.not_after_ms)),
                    "renewalTime": issued.map(|i| rfc(i.not_after_ms.saturating_sub(record.renew_before_ms))),
                    "certificate": issued.map(|i| b64(&i.bytes)),
                    "conditions": conditions,
                });
                self.apply(&api, terminal, body, Some(status), true).await
            }
        }
    }
}

/// How often at most a terminal's inventories alone rewrite its
/// `lastReportTime`: 15 minutes.
pub(super) const LAST_REPORT_EVERY_MS: u64 = 15 * 60 * 1000;

/// A Terminal's spec: its identity key and site, from enrolment.
fn terminal_spec(record: &TerminalRecord) -> TerminalSpec {
    TerminalSpec {
        identity: IdentityKey {
            algorithm: record.identity.algorithm().name().to_string(),
            public_key: b64(&record.identity.to_bytes()),
            fingerprint: record.identity.fingerprint().to_hex(),
            tpm: record.tpm,
        },
        site: record.labels.get("site").cloned(),
    }
}

/// When the terminal last sent a verified inventory or audit report.
fn last_report_ms(certificate: Option<&CertRecord>, inventory_ms: Option<u64>) -> Option<u64> {
    let audit_ms = certificate.and_then(|c| match c.audit {
        Audit::Passed { at_ms, .. } => Some(at_ms),
        _ => None,
    });
    inventory_ms.max(audit_ms).filter(|ms| *ms > 0)
}

/// A Terminal's status for people: compliance with each policy selecting
/// it, the security level of its certificate while that is valid at
/// `now_ms` (none once it expired: `KubeBackend::mark_expired` has the
/// Terminal written again then), and its last report.
pub(super) fn terminal_status(
    record: &TerminalRecord,
    pairs: &BTreeMap<String, PairRecord>,
    certificate: Option<&CertRecord>,
    inventory_ms: Option<u64>,
    now_ms: u64,
) -> TerminalStatus {
    let policies: Vec<PolicyCompliance> = pairs
        .iter()
        .map(|(policy, p)| PolicyCompliance {
            policy: policy.clone(),
            generation: i64::try_from(p.generation).unwrap_or(i64::MAX),
            state: p.state.name().to_string(),
            reason: match &p.state {
                PairState::Drifted { reason, .. } | PairState::Failed { reason, .. } => {
                    reason.clone()
                }
                _ => String::new(),
            },
        })
        .collect();
    let compliant = pairs
        .values()
        .filter(|p| p.state == PairState::Compliant)
        .count();
    TerminalStatus {
        connected: record.offline_since_ms == 0,
        offline_since: (record.offline_since_ms > 0)
            .then(|| crate::time::rfc3339(record.offline_since_ms)),
        last_report_time: last_report_ms(certificate, inventory_ms).map(crate::time::rfc3339),
        compliance: Some(format!("{compliant}/{}", policies.len())),
        policies,
        security_level: certificate
            .and_then(|c| c.issued.as_ref())
            .filter(|i| now_ms < i.not_after_ms)
            .map(|i| u32::from(i.level)),
        facts: BTreeMap::new(),
        conditions: Vec::new(),
    }
}

//! The resources for people, written behind the ledger from what it holds:
//! a Terminal per terminal (compliance, level, last report), a Remediation
//! per live dispatch, a SecurityCertificate per certificate. What each
//! holds is [`super::objects`]; this writes them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{DeleteParams, Patch};
use serde::Serialize;
use serde_json::json;
use tenet_crds::{Remediation, SecurityCertificate, Terminal};

use super::{Dirty, KubeBackend, objects, remediation_name};

impl KubeBackend {
    /// Apply `body` to an object and `status` to its status, unless they
    /// are what was last written. With `create` false only the status is
    /// written, which never creates the object (a 404 when it is gone).
    async fn apply<K, S>(
        &self,
        api: &Api<K>,
        name: &str,
        body: &K,
        status: &S,
        create: bool,
    ) -> Result<(), kube::Error>
    where
        K: kube::Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
        K::DynamicType: Default,
        S: Serialize,
    {
        let body = serde_json::to_value(body).map_err(kube::Error::SerdeError)?;
        let status = serde_json::to_value(status).map_err(kube::Error::SerdeError)?;
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
        // The status alone, under the object's kind and name.
        let s = json!({
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": { "name": name },
            "status": status,
        });
        api.patch_status(name, &Self::pp(), &Patch::Apply(&s))
            .await?;
        self.count();
        if let Ok(mut o) = self.objects.lock() {
            o.written.insert(id, both);
        }
        Ok(())
    }

    pub(super) async fn write_object(&self, d: &Dirty) -> Result<(), kube::Error> {
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
                if !published
                    && self.deleted_by_a_person(name, &record.identity.fingerprint().to_hex())
                {
                    return Ok(());
                }
                let status = objects::terminal_status(
                    &record,
                    &pairs,
                    certificate.as_ref(),
                    inventory_ms,
                    crate::time::now_ms(),
                );
                let last_report_ms = objects::last_report_ms(certificate.as_ref(), inventory_ms);
                let body = Terminal::new(name, objects::terminal_spec(&record));
                match self.apply(&api, name, &body, &status, !published).await {
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
                let (live, pair, offline) = {
                    let Ok(o) = self.objects.lock() else {
                        return Ok(());
                    };
                    (
                        o.dispatches.get(key).cloned(),
                        o.pairs.get(terminal).and_then(|p| p.get(policy).cloned()),
                        o.terminals
                            .get(terminal)
                            .is_some_and(|t| t.offline_since_ms > 0),
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
                let state = pair.as_ref().map(|p| &p.state);
                let body = objects::remediation(terminal, policy, &live, state, owner);
                let remediated = pair
                    .as_ref()
                    .is_some_and(|p| p.remediated && p.generation == live.policy_generation);
                let status = objects::remediation_status(
                    &live,
                    state,
                    remediated,
                    offline,
                    crate::time::now_ms(),
                );
                self.apply(&api, &name, &body, &status, true).await
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
                let body = objects::security_certificate(terminal, &record);
                let status = objects::security_certificate_status(&record, crate::time::now_ms());
                self.apply(&api, terminal, &body, &status, true).await
            }
        }
    }
}

/// How often at most a terminal's inventories alone rewrite its
/// `lastReportTime`: 15 minutes.
pub(super) const LAST_REPORT_EVERY_MS: u64 = 15 * 60 * 1000;

//! Issuing security certificates: the I/O around
//! [`crate::reconcile::posture::decide`]. For each terminal a policy
//! with a `certificate` section selects: work out its compliance, decide,
//! record the decision, and return the messages for its agent (an audit
//! request, a certificate, or "stop presenting").

use tenet_protocol::certificate::{CERTIFICATE_VERSION, SecurityCertificate};
use tenet_protocol::session::ToAgent;
use tenet_protocol::{SignedMessage, Signer};

use crate::policy::compile::{Check, CompiledPolicy};
use crate::reconcile::posture::{
    AUDIT_RETRY_MS, Action, Audit, CertPolicy, CertRecord, Issued, decide,
};
use crate::reconcile::state::PairState;
use crate::store::{Store, StoreError};
use crate::time::parse_duration;

/// The issuer's name in every certificate.
pub const ISSUER_NAME: &str = "tenet-operator";

/// A compiled policy's certificate settings, if it has any.
pub fn cert_policy(p: &CompiledPolicy) -> Option<CertPolicy> {
    let c = p.spec.certificate.as_ref()?;
    let ms = |d: &str| parse_duration(d).ok().map(|s| (s * 1000.0) as u64);
    Some(CertPolicy {
        policy: p.key(),
        validity_ms: ms(&c.validity)?,
        renew_before_ms: ms(&c.renew_before)?,
        minimum_level: c.minimum_level.min(100) as u8,
        pcrs: c
            .pcrs
            .iter()
            .filter_map(|i| u8::try_from(*i).ok())
            .collect(),
        pinned: c
            .expected_pcrs
            .iter()
            .filter_map(|(i, v)| {
                Some(tenet_protocol::audit::PcrValue {
                    index: i.parse().ok()?,
                    sha256: crate::policy::compile::pinned_value(v)?,
                })
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    })
}

/// What one round of certificate reconciliation produced.
#[derive(Debug, Default)]
pub struct Round {
    /// Messages for agents, to send once the store has them durable.
    pub outgoing: Vec<(String, ToAgent)>,
    /// One line per transition, for the operator's output.
    pub events: Vec<String>,
}

/// Reconcile every certificate once.
pub fn reconcile(
    store: &Store,
    policies: &[CompiledPolicy],
    issuer: &dyn Signer,
    online: &dyn Fn(&str) -> bool,
    now_ms: u64,
) -> Result<Round, StoreError> {
    let mut round = Round::default();
    let cert_policies: Vec<(&CompiledPolicy, CertPolicy)> = policies
        .iter()
        .filter_map(|p| Some((p, cert_policy(p)?)))
        .collect();
    if cert_policies.is_empty() {
        return Ok(round);
    }
    let selects = |terminal: &str, p: &CompiledPolicy| -> Option<PairState> {
        store
            .pair(terminal, &p.key())
            .filter(|r| r.generation == p.generation.max(0) as u64)
            .map(|r| r.state)
    };
    for (terminal, enrolled) in store.terminals() {
        // The first certificate policy (by name) that selects it.
        let Some((_, cp)) = cert_policies
            .iter()
            .find(|(p, _)| selects(&terminal, p).is_some())
        else {
            continue;
        };
        let mut compliance = Vec::new();
        let (mut packages, mut services) = (Vec::new(), Vec::new());
        for p in policies {
            let Some(state) = selects(&terminal, p) else {
                continue;
            };
            compliance.push((p.spec.security_weight, state == PairState::Compliant));
            for r in &p.requirements {
                match &r.check {
                    Check::PackagePresent { name, .. } | Check::PackageAbsent { name } => {
                        packages.push(name.clone())
                    }
                    Check::Service { name, .. } => services.push(name.clone()),
                    _ => {}
                }
            }
        }
        packages.sort();
        packages.dedup();
        services.sort();
        services.dedup();
        let mut record = store
            .certificate(&terminal)
            .unwrap_or_else(|| CertRecord::new(&cp.policy));
        record.policy.clone_from(&cp.policy);
        record.renew_before_ms = cp.renew_before_ms;
        let step = decide(&record, cp, &compliance, online(&terminal), now_ms);
        match step {
            Action::Nothing => continue,
            Action::RequestAudit => {
                let nonce = tenet_protocol::keys::random_bytes()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                record.audit = Audit::Requested {
                    nonce,
                    at_ms: now_ms,
                    pcrs: if enrolled.tpm_trust.proven() {
                        cp.pcrs.clone()
                    } else {
                        vec![]
                    },
                    pinned: cp.pinned.clone(),
                };
                round.outgoing.push((
                    terminal.clone(),
                    ToAgent::Audit {
                        nonce,
                        pcrs: if enrolled.tpm_trust.proven() {
                            cp.pcrs.clone()
                        } else {
                            vec![]
                        },
                        packages,
                        services,
                    },
                ));
            }
            Action::Issue { level, reason } => {
                let Audit::Passed {
                    presentation_key, ..
                } = &record.audit
                else {
                    continue;
                };
                let serial: [u8; 16] = tenet_protocol::keys::random_bytes()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?[..16]
                    .try_into()
                    .unwrap_or([0; 16]);
                let cert = SecurityCertificate {
                    version: CERTIFICATE_VERSION,
                    serial,
                    issuer: ISSUER_NAME.into(),
                    issuer_key: issuer.public_key().fingerprint(),
                    not_before_ms: now_ms,
                    not_after_ms: now_ms.saturating_add(cp.validity_ms),
                    subject: terminal.clone(),
                    subject_key: presentation_key.clone(),
                    level,
                };
                let bytes = SignedMessage::signed(&cert, issuer)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?
                    .encode();
                record.issued = Some(Issued {
                    serial,
                    level,
                    not_before_ms: now_ms,
                    not_after_ms: now_ms.saturating_add(cp.validity_ms),
                    bytes: bytes.clone(),
                });
                record.withheld = None;
                record.decided_ms = now_ms;
                round.events.push(format!(
                    "certificate {} for {terminal}: level {level}, valid {} s ({})",
                    hex::encode(&serial[..4]),
                    cp.validity_ms / 1000,
                    reason.as_str()
                ));
                tracing::info!(terminal, level, reason = reason.as_str(), serial = %hex::encode(serial), "security certificate issued");
                round.outgoing.push((
                    terminal.clone(),
                    ToAgent::SecurityCertificate {
                        certificate: Some(bytes),
                    },
                ));
            }
            Action::Withhold { reason } => {
                round
                    .events
                    .push(format!("certificate for {terminal} withheld: {reason}"));
                tracing::warn!(terminal, %reason, "security certificate withheld");
                record.issued = None;
                record.withheld = Some(reason);
                record.decided_ms = now_ms;
                record.retry_after_ms = now_ms + AUDIT_RETRY_MS.min(cp.validity_ms / 2);
                round.outgoing.push((
                    terminal.clone(),
                    ToAgent::SecurityCertificate { certificate: None },
                ));
            }
        }
        store.set_certificate(&terminal, &record);
    }
    Ok(round)
}

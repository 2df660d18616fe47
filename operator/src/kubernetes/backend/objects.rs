//! The resources for people, built from the ledger's records with the
//! `tenet-crds` types: pure functions of the records and the clock, so the
//! CRDs and what the operator writes cannot drift apart unnoticed (a field
//! the CRD lacks does not compile). [`super::people`] writes them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use tenet_crds::certificate::{SecurityCertificateSpec, SecurityCertificateStatus};
use tenet_crds::common::Condition;
use tenet_crds::remediation::{RemediationPhase, RemediationSpec, RemediationStatus};
use tenet_crds::terminal::{IdentityKey, PolicyCompliance, TerminalSpec, TerminalStatus};
use tenet_crds::{Remediation, SecurityCertificate};

use super::{b64, policy_hash};
use crate::reconcile::posture::{Audit, CertRecord};
use crate::reconcile::state::PairState;
use crate::store::{LiveDispatch, PairRecord, TerminalRecord};
use crate::time::rfc3339;

/// A Terminal's spec: its identity key and site, from enrolment.
pub(super) fn terminal_spec(record: &TerminalRecord) -> TerminalSpec {
    TerminalSpec {
        identity: IdentityKey {
            algorithm: record.identity.algorithm().name().to_string(),
            public_key: b64(&record.identity.to_bytes()),
            fingerprint: record.identity.fingerprint().to_hex(),
            tpm: record.tpm,
        },
        labels: Some(record.labels.clone()),
        site: None,
    }
}

/// When the terminal last sent a verified inventory or audit report.
pub(super) fn last_report_ms(
    certificate: Option<&CertRecord>,
    inventory_ms: Option<u64>,
) -> Option<u64> {
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
        offline_since: (record.offline_since_ms > 0).then(|| rfc3339(record.offline_since_ms)),
        last_report_time: last_report_ms(certificate, inventory_ms).map(rfc3339),
        agent_version: Some(record.agent_version.clone()).filter(|v| !v.is_empty()),
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

/// The Remediation of a live dispatch of `policy` to `terminal`, owned by
/// its TerminalPolicy (`owner`) when its uid is known.
pub(super) fn remediation(
    terminal: &str,
    policy: &str,
    live: &LiveDispatch,
    pair: Option<&PairState>,
    owner: Option<OwnerReference>,
) -> Remediation {
    let attempt = match pair {
        Some(PairState::Dispatched { attempt, .. } | PairState::Verifying { attempt, .. }) => {
            (*attempt).max(1)
        }
        _ => 1,
    };
    let mut r = Remediation::new(
        &super::remediation_name(terminal, policy),
        RemediationSpec {
            terminal: terminal.to_string(),
            policy: policy.to_string(),
            policy_generation: i64::try_from(live.policy_generation).unwrap_or(i64::MAX),
            payload_digest: tenet_protocol::wire::digest_string(&live.record.payload_digest),
            nonce_commitment: hex::encode(live.record.nonce_commitment),
            sequence: live.sequence,
            attempt,
            issued_at: rfc3339(live.issued_ms),
            deadline: rfc3339(live.record.deadline_ms),
        },
    );
    r.metadata.labels = Some(BTreeMap::from([
        ("tenet.dev/terminal".to_string(), terminal.to_string()),
        ("tenet.dev/policy".to_string(), policy_hash(policy)),
    ]));
    r.metadata.owner_references = Some(owner.into_iter().collect());
    r
}

/// Where a live dispatch is in its life, with a CamelCase reason:
///
/// | phase | reason | when |
/// |---|---|---|
/// | `Pending` | `TerminalOffline` | queued for a terminal that is offline |
/// | `Dispatched` | `AwaitingReport` | out, no report yet |
/// | `Expired` | `DeadlinePassed` | its deadline passed without a report |
/// | `Verifying` | `ReportVerified` | the report verified; waiting for an inventory that satisfies the policy |
/// | `Succeeded` | `Compliant` | the terminal's inventory satisfied the policy after it, in its generation (`remediated`; a later drift is the next remediation's) |
/// | `Failed` | `Superseded` | its report came, but the terminal did not converge through it (the policy changed, or it converged another way) |
/// | `Failed` | see [`failure_reason`] | the report verified and says the run failed, or it was refused |
pub(super) fn remediation_status(
    live: &LiveDispatch,
    pair: Option<&PairState>,
    remediated: bool,
    terminal_offline: bool,
    now_ms: u64,
) -> RemediationStatus {
    let status = |phase, reason: &str, message: Option<String>| RemediationStatus {
        phase,
        reason: Some(reason.to_string()),
        message,
        exit_code: None,
        verified_at: None,
    };
    if !live.record.consumed {
        return if now_ms > live.record.deadline_ms {
            status(
                RemediationPhase::Expired,
                "DeadlinePassed",
                Some(format!(
                    "no report before the deadline {}",
                    rfc3339(live.record.deadline_ms)
                )),
            )
        } else if terminal_offline {
            status(
                RemediationPhase::Pending,
                "TerminalOffline",
                Some("queued until the terminal connects".into()),
            )
        } else {
            status(RemediationPhase::Dispatched, "AwaitingReport", None)
        };
    }
    match pair {
        // No verified inventory yet (a new generation, or none at all).
        None | Some(PairState::Unknown | PairState::Verifying { .. }) => status(
            RemediationPhase::Verifying,
            "ReportVerified",
            Some(
                "the payload succeeded; waiting for an inventory that satisfies the policy".into(),
            ),
        ),
        // Converged through this remediation (compliant since, or drifting
        // anew later: the next remediation is another one).
        Some(PairState::Compliant | PairState::Drifted { attempts: 0, .. }) if remediated => {
            status(RemediationPhase::Succeeded, "Compliant", None)
        }
        // Compliant or drifting anew, but not through this remediation: the
        // policy changed since, or the terminal converged some other way.
        Some(PairState::Compliant | PairState::Drifted { attempts: 0, .. }) => status(
            RemediationPhase::Failed,
            "Superseded",
            Some("the terminal did not converge through this remediation".into()),
        ),
        Some(PairState::Failed { reason, .. } | PairState::Drifted { reason, .. }) => status(
            RemediationPhase::Failed,
            failure_reason(reason),
            Some(reason.clone()),
        ),
        // A report consumed while a newer dispatch is out: that one's
        // record replaces this one, so this is only ever a moment.
        Some(PairState::Dispatched { .. }) => {
            status(RemediationPhase::Dispatched, "AwaitingReport", None)
        }
    }
}

/// The CamelCase reason of a failed attempt, from the sentence the
/// reconciler wrote (`crate::fleet::report_event` and `state::next`; a
/// test holds them together).
pub(super) fn failure_reason(sentence: &str) -> &'static str {
    const REASONS: [(&str, &str); 6] = [
        ("the payload exited with", "PayloadExited"),
        ("the payload trapped", "PayloadTrapped"),
        ("the payload ran out of time", "PayloadTimedOut"),
        ("the terminal refused the dispatch", "DispatchRefused"),
        ("the report was refused", "ReportRefused"),
        (
            "the payload succeeded but the terminal still drifts",
            "StillDrifted",
        ),
    ];
    REASONS
        .iter()
        .find(|(prefix, _)| sentence.starts_with(prefix))
        .map_or("AttemptFailed", |(_, reason)| reason)
}

/// The SecurityCertificate of a terminal's certificate record.
pub(super) fn security_certificate(terminal: &str, record: &CertRecord) -> SecurityCertificate {
    let validity = record
        .issued
        .as_ref()
        .map_or(3600, |i| (i.not_after_ms - i.not_before_ms) / 1000)
        .max(2);
    SecurityCertificate::new(
        terminal,
        SecurityCertificateSpec {
            terminal: terminal.to_string(),
            policy: record.policy.clone(),
            validity: format!("{validity}s"),
            renew_before: format!("{}s", (record.renew_before_ms / 1000).min(validity - 1)),
        },
    )
}

/// Its status at `now_ms`: the issued certificate and its conditions.
pub(super) fn security_certificate_status(
    record: &CertRecord,
    now_ms: u64,
) -> SecurityCertificateStatus {
    let issued = record.issued.as_ref();
    SecurityCertificateStatus {
        level: issued.map(|i| u32::from(i.level)),
        serial: issued.map(|i| hex::encode(i.serial)),
        not_before: issued.map(|i| rfc3339(i.not_before_ms)),
        not_after: issued.map(|i| rfc3339(i.not_after_ms)),
        renewal_time: issued
            .map(|i| rfc3339(i.not_after_ms.saturating_sub(record.renew_before_ms))),
        certificate: issued.map(|i| b64(&i.bytes)),
        conditions: crate::reconcile::posture::conditions(record, now_ms)
            .into_iter()
            .map(|c| Condition {
                type_: c.type_,
                status: c.status,
                reason: c.reason,
                message: c.message,
                last_transition_time: rfc3339(record.decided_ms.max(1)),
                observed_generation: None,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;

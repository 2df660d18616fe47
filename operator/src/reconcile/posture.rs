//! Security certificates as a reconciled resource, in the manner of
//! cert-manager's `Certificate`: for each terminal a certificate policy
//! selects, the operator audits it, issues a short-lived certificate
//! carrying only its security level, renews it when `renewBefore` is
//! reached, and reissues it at once when the level changes. Nothing is ever
//! revoked: expiry is revocation, so validity is short. Below the policy's
//! minimum level no certificate is issued, and the agent is told to stop
//! presenting the one it holds.
//!
//! `decide` is the whole decision, a pure function of the record, the
//! policy, the terminal's compliance and the clock.

use crate::tpm_trust::TpmTrust;
use serde::{Deserialize, Serialize};
use tenet_protocol::PublicKey;
use tenet_protocol::audit::{AuditReport, PcrValue, QuoteError, verify_quote};
use tenet_protocol::inventory::Inventory;

use super::level::{Attestation, level};

/// How long an audit request may stay unanswered before it is asked again.
pub const AUDIT_TIMEOUT_MS: u64 = 30_000;
/// The least time between two audits after one that led to no certificate.
pub const AUDIT_RETRY_MS: u64 = 60_000;

/// A certificate policy's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPolicy {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub validity_ms: u64,
    pub renew_before_ms: u64,
    pub minimum_level: u8,
    /// PCRs to quote (SHA-256 bank).
    pub pcrs: Vec<u8>,
    /// Values the admins pinned for some of them (ascending by index);
    /// empty: the first verified quote sets the baseline.
    pub pinned: Vec<PcrValue>,
}

/// The certificate currently issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub serial: [u8; 16],
    pub level: u8,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// The signed certificate.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// Where the audit of a terminal stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Audit {
    None,
    Requested {
        nonce: [u8; 32],
        at_ms: u64,
        /// The PCRs asked for.
        pcrs: Vec<u8>,
        /// The values the policy pins, at the time of the request.
        pinned: Vec<PcrValue>,
    },
    /// The external audit accepted the agent's report.
    Passed {
        at_ms: u64,
        attestation: AuditAttestation,
        presentation_key: PublicKey,
    },
    /// It did not: the reason a person reads.
    Failed {
        at_ms: u64,
        reason: String,
    },
}

/// `Attestation` as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAttestation {
    /// A TPM quote verified.
    Quoted,
    /// No TPM: the posture is the terminal's word.
    Unattested,
    /// A TPM the terminal claims but never proved (no EK certificate from
    /// a configured manufacturer, or the credential activation failed):
    /// counted as no TPM, and its quotes count for nothing.
    Claimed,
}

/// A terminal's certificate record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub policy: String,
    pub issued: Option<Issued>,
    pub audit: Audit,
    /// The PCR values of the first verified quote: later quotes must match.
    pub baseline: Option<Vec<PcrValue>>,
    /// Set when the last decision withheld a certificate, with the reason.
    pub withheld: Option<String>,
    /// No audit before this time (set when a certificate is withheld).
    pub retry_after_ms: u64,
    /// When the last certificate was issued or withheld: audits before it
    /// have been used.
    pub decided_ms: u64,
    /// The policy's renewBefore, for the Renewing condition.
    pub renew_before_ms: u64,
}

impl CertRecord {
    pub fn new(policy: &str) -> CertRecord {
        CertRecord {
            policy: policy.to_string(),
            issued: None,
            audit: Audit::None,
            baseline: None,
            withheld: None,
            retry_after_ms: 0,
            decided_ms: 0,
            renew_before_ms: 0,
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Send an audit request (with a fresh nonce).
    RequestAudit,
    /// Issue a certificate at this level to the audited presentation key.
    Issue {
        level: u8,
        reason: IssueReason,
    },
    /// Issue nothing; tell the agent to drop what it holds.
    Withhold {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueReason {
    First,
    Renewal,
    LevelChanged,
    /// The previous one expired without a renewal (the terminal was away).
    Expired,
}

impl IssueReason {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueReason::First => "Issued",
            IssueReason::Renewal => "Renewed",
            IssueReason::LevelChanged => "LevelChanged",
            IssueReason::Expired => "ReissuedAfterExpiry",
        }
    }
}

fn attestation(audit: &Audit) -> Attestation {
    match audit {
        Audit::Passed {
            attestation: AuditAttestation::Quoted,
            ..
        } => Attestation::Verified,
        Audit::Passed {
            attestation: AuditAttestation::Unattested | AuditAttestation::Claimed,
            ..
        } => Attestation::NoTpm,
        _ => Attestation::Failed,
    }
}

/// The level the terminal has now: `compliance` is (weight, compliant) for
/// every policy selecting it.
pub fn current_level(record: &CertRecord, compliance: &[(u32, bool)]) -> u8 {
    level(compliance, attestation(&record.audit))
}

/// The decision for one terminal.
pub fn decide(
    record: &CertRecord,
    policy: &CertPolicy,
    compliance: &[(u32, bool)],
    online: bool,
    now_ms: u64,
) -> Action {
    if let Audit::Requested { at_ms, .. } = record.audit
        && now_ms < at_ms + AUDIT_TIMEOUT_MS
    {
        // Waiting for the answer.
        return Action::Nothing;
    }
    let (audit_at, passed) = match &record.audit {
        Audit::Passed { at_ms, .. } => (Some(*at_ms), true),
        Audit::Failed { at_ms, .. } => (Some(*at_ms), false),
        Audit::Requested { .. } | Audit::None => (None, false),
    };
    // An audit no decision has used yet.
    let fresh = audit_at.is_some_and(|t| t > record.decided_ms);
    let level_now = current_level(record, compliance);
    let verdict = |reason: IssueReason| -> Action {
        let step = if let Audit::Failed { reason, .. } = &record.audit {
            Action::Withhold {
                reason: format!("the audit failed: {reason}"),
            }
        } else if level_now < policy.minimum_level {
            Action::Withhold {
                reason: format!(
                    "level {level_now} is below the policy's minimum {}",
                    policy.minimum_level
                ),
            }
        } else {
            Action::Issue {
                level: level_now,
                reason,
            }
        };
        match step {
            // Already in force: nothing to tell anybody.
            Action::Withhold { reason } if record.withheld.as_ref() == Some(&reason) => {
                Action::Nothing
            }
            s => s,
        }
    };
    let audit_again = || {
        if online && now_ms >= record.retry_after_ms {
            Action::RequestAudit
        } else {
            Action::Nothing
        }
    };
    match &record.issued {
        None => {
            if fresh {
                verdict(IssueReason::First)
            } else if passed
                && record.withheld.is_some()
                && audit_at.is_some_and(|t| t + policy.validity_ms > now_ms)
            {
                // Withheld for its level; compliance may have changed since.
                match verdict(IssueReason::LevelChanged) {
                    Action::Withhold { .. } => audit_again(),
                    s => s,
                }
            } else {
                audit_again()
            }
        }
        Some(cert) => {
            let due = now_ms + policy.renew_before_ms >= cert.not_after_ms;
            if fresh && !passed {
                // A failed audit withdraws the certificate at once.
                verdict(IssueReason::LevelChanged)
            } else if due {
                if fresh {
                    verdict(if now_ms >= cert.not_after_ms {
                        IssueReason::Expired
                    } else {
                        IssueReason::Renewal
                    })
                } else {
                    audit_again()
                }
            } else if level_now != cert.level {
                // Compliance changed; the audit behind the current
                // certificate still stands, so reissue at once.
                verdict(IssueReason::LevelChanged)
            } else {
                Action::Nothing
            }
        }
    }
}

/// What an audit report must show: the request's nonce and PCRs, and what
/// the operator knows of the terminal's TPM.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub nonce: &'a [u8; 32],
    /// The attestation key registered at enrolment.
    pub attestation_key: Option<&'a PublicKey>,
    pub tpm: &'a TpmTrust,
    /// The PCRs asked for.
    pub pcrs: &'a [u8],
    /// Values the policy pins (checked from the first quote on).
    pub pinned: &'a [PcrValue],
    /// The values the first verified quote showed, when nothing is pinned.
    pub baseline: Option<&'a [PcrValue]>,
}

/// The issuer's external audit of an agent's (signature-verified) audit
/// report: the nonce is the one sent; with a TPM, the quote verifies with
/// the attestation key registered at enrolment, covers the policy's PCRs
/// and matches the baseline (the first verified quote sets it); the posture
/// claims agree with the terminal's verified inventory (kept current by
/// verified remediation reports). What attestation it earns, and the
/// baseline when this quote set it.
pub fn external_audit(
    report: &AuditReport,
    expected: &Expected<'_>,
    inventory: Option<&Inventory>,
) -> Result<(AuditAttestation, Option<Vec<PcrValue>>), String> {
    let Expected {
        nonce: expected_nonce,
        attestation_key,
        tpm,
        pcrs,
        pinned,
        baseline,
    } = *expected;
    if report.nonce != *expected_nonce {
        return Err("the audit answers another request (wrong nonce)".into());
    }
    if let Some(inv) = inventory {
        for (name, claimed) in &report.posture.packages {
            let verified = inv
                .packages
                .iter()
                .find(|p| p.name == *name)
                .map(|p| p.version.as_str());
            if verified != claimed.as_deref() {
                return Err(format!(
                    "the audit says package {name} is {}, the verified inventory {}",
                    claimed.as_deref().unwrap_or("absent"),
                    verified.unwrap_or("absent")
                ));
            }
        }
        for (name, running) in &report.posture.services {
            let verified = inv.services.iter().any(|s| {
                s.name == *name && s.state == tenet_protocol::inventory::ServiceState::Running
            });
            if verified != *running {
                return Err(format!(
                    "the audit says service {name} is {}, the verified inventory not",
                    if *running { "running" } else { "stopped" }
                ));
            }
        }
    }
    match tpm {
        TpmTrust::None => return Ok((AuditAttestation::Unattested, None)),
        // Its quotes are signed by a key nobody proved to be in a TPM: they
        // neither raise the level nor set the PCR baseline.
        TpmTrust::Claimed { .. } => return Ok((AuditAttestation::Claimed, None)),
        TpmTrust::Proven { .. } => {}
    }
    let key = attestation_key.ok_or_else(|| QuoteError::NoAttestationKey.to_string())?;
    let quote = report
        .quote
        .as_ref()
        .ok_or("the terminal enrolled with a TPM but sent no quote")?;
    let quoted: Vec<u8> = quote.pcrs.iter().map(|p| p.index).collect();
    let mut wanted = pcrs.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    if quoted != wanted {
        return Err(format!("the quote covers PCRs {quoted:?}, not {wanted:?}"));
    }
    // Pinned values are checked from the first quote on; the others against
    // the baseline the first verified quote set (trust on first use).
    let expected = expected_pcrs(pinned, baseline);
    verify_quote(quote, key, expected_nonce, expected.as_deref()).map_err(|e| e.to_string())?;
    Ok((
        AuditAttestation::Quoted,
        baseline.is_none().then(|| quote.pcrs.clone()),
    ))
}

/// The values a quote must show: the pinned ones, and the baseline's for
/// the PCRs nothing pins. `None`: anything (the first quote).
fn expected_pcrs(pinned: &[PcrValue], baseline: Option<&[PcrValue]>) -> Option<Vec<PcrValue>> {
    if pinned.is_empty() && baseline.is_none() {
        return None;
    }
    let mut expected = pinned.to_vec();
    for b in baseline.unwrap_or_default() {
        if !pinned.iter().any(|p| p.index == b.index) {
            expected.push(*b);
        }
    }
    expected.sort_unstable();
    Some(expected)
}

/// A condition as `tenet status` and the SecurityCertificate resource show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// Ready / Renewing / Expired, as cert-manager shows them.
pub fn conditions(record: &CertRecord, now_ms: u64) -> Vec<CertCondition> {
    let c = |type_: &str, ok: bool, reason: &str, message: String| CertCondition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
    };
    let mut out = Vec::new();
    let expired = record
        .issued
        .as_ref()
        .is_some_and(|i| now_ms >= i.not_after_ms);
    let ready = match (&record.issued, &record.withheld) {
        (_, Some(why)) => c("Ready", false, "Withheld", why.clone()),
        (Some(i), None) if !expired => c(
            "Ready",
            true,
            "Issued",
            format!("level {} until {} ms", i.level, i.not_after_ms),
        ),
        (Some(_), None) => c("Ready", false, "Expired", "the certificate expired".into()),
        (None, None) => c(
            "Ready",
            false,
            "AwaitingAudit",
            "no certificate yet: the terminal has not been audited".into(),
        ),
    };
    out.push(ready);
    let renewing = record.issued.as_ref().is_some_and(|i| {
        now_ms + record.renew_before_ms >= i.not_after_ms
            && matches!(record.audit, Audit::Requested { .. })
    });
    out.push(c(
        "Renewing",
        renewing,
        if renewing { "AuditRequested" } else { "NotDue" },
        String::new(),
    ));
    out.push(c(
        "Expired",
        expired,
        if expired { "Expired" } else { "Valid" },
        String::new(),
    ));
    out
}

#[cfg(test)]
mod tests;

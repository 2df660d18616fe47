//! Policy approvals: what K of the n admins sign about a policy, so that
//! nothing runs on a terminal with parameters a quorum did not approve.
//!
//! An approval is a signed frame of kind [`Kind::PolicyApproval`] whose body
//! is a [`PolicyApproval`]: a [`PolicyStatement`] (the policy's
//! `namespace/name`, the SHA-256 of the canonical form of its whole spec,
//! that is selector, requirements, remediation, rollout, certificate:
//! everything that decides what runs where, and, when it remediates, the
//! exact [`ApprovedRemediation`] an envelope may carry) and when the admins
//! approved it. Each admin adds a signature to the same frame (like a
//! payload bundle's, k of n). The frame travels base64 in the policy's
//! `tenet.dev/approval` annotation, so the same file serves a policy
//! directory and `kubectl apply`.
//!
//! The approval time orders the approvals of one policy: a terminal refuses
//! an approval older than one it already ran under (a `Rollback`), so an
//! older approved version cannot be brought back by whoever holds the
//! dispatch key or can write the policy; admins re-approve an old version
//! by signing it anew.
//!
//! The operator computes the statement from the policy it read and checks
//! the frame against it ([`verify_approval`]); the remediation part is what
//! a terminal can check against an envelope without the policy
//! ([`ApprovedRemediation::covers`]).

use serde::{Deserialize, Serialize};

use crate::bundle::{Capability, MAX_NAME};
use crate::envelope::{DispatchEnvelope, MAX_ARG_BYTES, MAX_ARGS};
use crate::keys::{Fingerprint, PublicKey};
use crate::reject::Rejection;
use crate::wire::{Kind, Message, SignedMessage, digest_string, limit};

/// The annotation that carries a policy's approval frame (base64).
pub const APPROVAL_ANNOTATION: &str = "tenet.dev/approval";

/// What the admins approve about one version of one policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatement {
    /// `namespace/name`.
    pub policy: String,
    /// SHA-256 of the canonical form of the policy's spec.
    pub spec_digest: [u8; 32],
    /// What an envelope of this policy may carry; `None`: it remediates nothing.
    pub remediation: Option<ApprovedRemediation>,
}

/// What the admins sign: a statement and when they approved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApproval {
    pub statement: PolicyStatement,
    /// When the first admin signed this approval (unix ms); the others
    /// sign the same body.
    pub approved_at_ms: u64,
}

/// The parameters of a remediation, exactly as an envelope carries them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovedRemediation {
    pub payload_digest: [u8; 32],
    pub args: Vec<String>,
    pub capabilities: Vec<Capability>,
    pub write_paths: Vec<String>,
    /// The longest an envelope may give the payload: its deadline at most
    /// this long after its issue.
    pub timeout_ms: u64,
    /// When a payload may start (none: any time); the terminal checks it
    /// when it starts one.
    pub windows: Vec<crate::window::Window>,
}

impl ApprovedRemediation {
    /// Whether `envelope` asks for exactly this: the same payload, the same
    /// arguments in the same order, no capability or write path more, no
    /// longer a deadline.
    pub fn covers(&self, envelope: &DispatchEnvelope) -> Result<(), Rejection> {
        let not = |why: String| Err(Rejection::NotApproved(why));
        if envelope.payload_digest != self.payload_digest {
            return not(format!(
                "payload {} is not the approved {}",
                digest_string(&envelope.payload_digest),
                digest_string(&self.payload_digest)
            ));
        }
        if envelope.args != self.args {
            return not("the envelope's arguments differ from what the admins approved".into());
        }
        if let Some(c) = envelope
            .capabilities
            .iter()
            .find(|c| !self.capabilities.contains(c))
        {
            return not(format!(
                "the envelope grants capability {}, which the admins did not approve",
                c.name()
            ));
        }
        if let Some(p) = envelope
            .write_paths
            .iter()
            .find(|p| !self.write_paths.contains(p))
        {
            return not(format!(
                "the envelope grants write path {p}, which the admins did not approve"
            ));
        }
        let given = envelope.deadline_ms.saturating_sub(envelope.issued_at_ms);
        if given > self.timeout_ms {
            return not(format!(
                "the envelope gives the payload {given} ms, more than the approved {} ms",
                self.timeout_ms
            ));
        }
        Ok(())
    }
}

impl Message for PolicyApproval {
    const KIND: Kind = Kind::PolicyApproval;

    fn check(&self) -> Result<(), Rejection> {
        limit("the policy name", self.statement.policy.len(), MAX_NAME * 2)?;
        if let Some(r) = &self.statement.remediation {
            limit("the argument list", r.args.len(), MAX_ARGS)?;
            for a in &r.args {
                limit("an argument", a.len(), MAX_ARG_BYTES)?;
            }
            limit(
                "the capability list",
                r.capabilities.len(),
                Capability::ALL.len(),
            )?;
            limit("the write path list", r.write_paths.len(), MAX_ARGS)?;
            limit("the window list", r.windows.len(), 16)?;
            for w in &r.windows {
                limit("a time zone name", w.time_zone.len(), MAX_NAME)?;
            }
            for p in &r.write_paths {
                limit("a write path", p.len(), MAX_ARG_BYTES)?;
            }
        }
        Ok(())
    }
}

/// Who approved, and when, once the approval verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved {
    pub signers: Vec<Fingerprint>,
    pub approved_at_ms: u64,
    /// The maintenance windows approved with the remediation.
    pub windows: Vec<crate::window::Window>,
}

/// Check an approval frame against the statement computed from the policy
/// as it is now: it must approve exactly that statement, with at least
/// `threshold` valid signatures by distinct `admin_keys` (a key counts
/// once, however often it signed). Every failure is `NotApproved` with the
/// reason a person reads.
pub fn verify_approval(
    frame: &[u8],
    expected: &PolicyStatement,
    admin_keys: &[PublicKey],
    threshold: usize,
) -> Result<Approved, Rejection> {
    let not = |why: String| Rejection::NotApproved(why);
    let frame = SignedMessage::decode(frame, Kind::PolicyApproval)
        .map_err(|e| not(format!("the approval cannot be read: {e}")))?;
    let approval: PolicyApproval = frame
        .open()
        .map_err(|e| not(format!("the approval cannot be read: {e}")))?;
    let approved = &approval.statement;
    if approved.policy != expected.policy {
        return Err(not(format!(
            "the approval is for policy {}, not {}",
            approved.policy, expected.policy
        )));
    }
    if approved != expected {
        return Err(not(
            "the approval is for another version of this policy (it changed since it was signed)"
                .into(),
        ));
    }
    let signers = frame
        .verify_threshold(admin_keys, threshold)
        .map_err(|e| not(e.to_string()))?;
    Ok(Approved {
        signers,
        approved_at_ms: approval.approved_at_ms,
        windows: approval
            .statement
            .remediation
            .map(|r| r.windows)
            .unwrap_or_default(),
    })
}

/// What a terminal checks before it runs anything (see
/// `EnvelopeState::verify_approved`, which also refuses an approval older
/// than one already run): the approval an
/// envelope carries is signed by at least `threshold` of the pinned
/// `admin_keys`, it approves this envelope's policy, and its remediation
/// covers exactly what the envelope asks for. The terminal has no copy of
/// the policy: the dispatch key alone (or a compromised operator) can no
/// longer make it run a payload, arguments, capabilities or write paths
/// that no quorum of admins approved.
pub fn check_envelope(
    envelope: &DispatchEnvelope,
    admin_keys: &[PublicKey],
    threshold: usize,
) -> Result<Approved, Rejection> {
    let not = |why: String| Rejection::NotApproved(why);
    if envelope.approval.is_empty() {
        return Err(not(format!(
            "the envelope for policy {} carries no approval by the admins",
            envelope.policy
        )));
    }
    let frame = SignedMessage::decode(&envelope.approval, Kind::PolicyApproval)
        .map_err(|e| not(format!("the approval cannot be read: {e}")))?;
    let signers = frame
        .verify_threshold(admin_keys, threshold)
        .map_err(|e| not(e.to_string()))?;
    let approval: PolicyApproval = frame
        .open()
        .map_err(|e| not(format!("the approval cannot be read: {e}")))?;
    let approved = &approval.statement;
    if approved.policy != envelope.policy {
        return Err(not(format!(
            "the approval is for policy {}, not {}",
            approved.policy, envelope.policy
        )));
    }
    let Some(remediation) = &approved.remediation else {
        return Err(not(format!(
            "the admins approved policy {} without a remediation",
            approved.policy
        )));
    };
    remediation.covers(envelope)?;
    Ok(Approved {
        signers,
        approved_at_ms: approval.approved_at_ms,
        windows: remediation.windows.clone(),
    })
}

/// Who signed a frame, whatever it approves (for a person's report):
/// the fingerprints of its signatures, in order.
pub fn signers_of(frame: &[u8]) -> Result<Vec<Fingerprint>, Rejection> {
    Ok(SignedMessage::decode(frame, Kind::PolicyApproval)?
        .signatures
        .iter()
        .map(|s| s.key)
        .collect())
}

#[cfg(test)]
mod tests;

//! Policy approvals, the operator's side: the statement a policy's approval
//! must sign (computed from the policy as read), the verdict on the
//! approval a policy carries, and the [`Gate`] that keeps each policy's
//! last approved generation in force. Signing a policy file in place is
//! [`sign`]. The format itself (`PolicyStatement`, `verify_approval`) is
//! the protocol's, `tenet_protocol::approval`.
//!
//! What is signed is a canonical form of the spec: the spec as Tenet read
//! it (defaults filled in, fields in their declared order, serialised as
//! JSON), without its `description`. Comments, key order, quoting and
//! whitespace do not change it; any change of meaning does.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tenet_crds::policy::TerminalPolicySpec;
use tenet_protocol::approval::{
    APPROVAL_ANNOTATION, ApprovedRemediation, PolicyStatement, signers_of, verify_approval,
};
use tenet_protocol::bundle::{BundleTrust, Capability};
use tenet_protocol::keys::Fingerprint;
use tenet_protocol::wire::{parse_digest, sha256};

use super::CompiledPolicy;

mod sign;
pub use sign::{SignError, SignOptions, SignedPolicy, sign};

/// SHA-256 of the canonical form of `spec` (see the module's comment).
pub fn spec_digest(spec: &TerminalPolicySpec) -> [u8; 32] {
    let mut canonical = spec.clone();
    canonical.description = None;
    // Plain data (strings, numbers, booleans, ordered maps): serialising
    // it cannot fail, and a default here would approve every spec at once.
    sha256(&serde_json::to_vec(&canonical).expect("a policy spec serialises to JSON"))
}

/// The protocol's name of a capability a policy grants.
pub fn capability(c: tenet_crds::policy::Capability) -> Capability {
    use tenet_crds::policy::Capability as C;
    match c {
        C::RunArtifact => Capability::RunArtifact,
        C::ReadInventory => Capability::ReadInventory,
        C::WriteFiles => Capability::WriteFiles,
        C::Log => Capability::Log,
    }
}

/// What an envelope of this policy carries: exactly what the approval of
/// its remediation must name. `None` when it remediates nothing, and while
/// it is suspended (approving a suspended policy lets nothing run; lifting
/// the suspension is an edit the admins approve). An auto remediation
/// runs the standard-library bundle `auto_bundle` (the one its approval
/// names, see `auto`) with the steps computed from the requirements.
pub fn remediation(
    spec: &TerminalPolicySpec,
    auto_bundle: Option<[u8; 32]>,
) -> Option<ApprovedRemediation> {
    if spec.suspend {
        return None;
    }
    let r = spec.remediation.as_ref()?;
    // Zeros approve nothing: a digest that does not parse never compiles,
    // and an auto policy nobody signed names no bundle yet.
    let (payload_digest, args, capabilities, write_paths) = match (&r.auto, &r.payload) {
        (Some(_), _) => (
            auto_bundle.unwrap_or([0; 32]),
            super::auto::steps(spec)
                .map(|s| super::auto::args(&s))
                .unwrap_or_default(),
            super::auto::CAPABILITIES.to_vec(),
            Vec::new(),
        ),
        (None, Some(p)) => (
            parse_digest(&p.digest).unwrap_or([0; 32]),
            r.args.clone(),
            r.capabilities.iter().map(|c| capability(*c)).collect(),
            r.write_paths.clone(),
        ),
        // Never compiles.
        (None, None) => return None,
    };
    Some(ApprovedRemediation {
        payload_digest,
        args,
        capabilities,
        write_paths,
        timeout_ms: u64::from(r.timeout_seconds) * 1000,
        // Windows that do not parse never compile.
        windows: spec
            .rollout
            .windows
            .iter()
            .filter_map(|w| super::compile::window(w).ok())
            .collect(),
    })
}

/// The statement the admins approve for the policy `key` (`namespace/name`);
/// `auto_bundle` as for [`remediation`].
pub fn statement(
    key: &str,
    spec: &TerminalPolicySpec,
    auto_bundle: Option<[u8; 32]>,
) -> PolicyStatement {
    PolicyStatement {
        policy: key.to_string(),
        spec_digest: spec_digest(spec),
        remediation: remediation(spec, auto_bundle),
    }
}

/// The approval frame in a policy's `tenet.dev/approval` annotation, or
/// why there is none.
pub fn annotation_frame(meta: &ObjectMeta) -> Result<Vec<u8>, String> {
    let text = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(APPROVAL_ANNOTATION))
        .ok_or_else(|| {
            format!("not signed by any admin (no {APPROVAL_ANNOTATION} annotation; run `tenet policy sign`)")
        })?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("the {APPROVAL_ANNOTATION} annotation is not base64: {e}"))
}

/// The verdict on a policy's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Approved {
        signers: Vec<Fingerprint>,
        approved_at_ms: u64,
    },
    Unapproved {
        /// Why, as a person reads it.
        reason: String,
        /// Who signed the frame, valid or not (empty when unreadable).
        signers: Vec<Fingerprint>,
    },
}

/// Judge the approval of a compiled policy against the admins' keys.
pub fn judge(policy: &CompiledPolicy, trust: &BundleTrust) -> Verdict {
    let frame = match &policy.approval {
        Ok(frame) => frame,
        Err(why) => {
            return Verdict::Unapproved {
                reason: why.clone(),
                signers: Vec::new(),
            };
        }
    };
    match verify_approval(frame, &policy.statement, &trust.admin_keys, trust.threshold) {
        Ok(a) => Verdict::Approved {
            signers: a.signers,
            approved_at_ms: a.approved_at_ms,
        },
        Err(e) => Verdict::Unapproved {
            // "not approved by the admins: ..." is the agent's wording;
            // here the policy is named already.
            reason: e
                .to_string()
                .trim_start_matches("not approved by the admins: ")
                .to_string(),
            signers: signers_of(frame).unwrap_or_default(),
        },
    }
}

/// A policy whose latest version is not approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unapproved {
    pub reason: String,
    /// The generation in force instead (the last approved), if any: the
    /// gate gives the one it kept, the source the one it stamped.
    pub in_force: Option<i64>,
}

impl Unapproved {
    /// One line for status and the Ready condition.
    pub fn message(&self) -> String {
        match self.in_force {
            Some(g) => format!(
                "the latest edit is not approved ({}); generation {g}, the last approved, stays in force",
                self.reason
            ),
            None => format!("not approved ({}); nothing of it is in force", self.reason),
        }
    }
}

/// What the gate lets through.
#[derive(Debug, Default)]
pub struct Admitted {
    pub policies: Vec<CompiledPolicy>,
    /// By `namespace/name`.
    pub unapproved: BTreeMap<String, Unapproved>,
}

/// Keeps, for each policy, the last version whose approval verified: an
/// unapproved edit leaves that one in force (as a broken file does), a
/// policy never approved is not in force at all, and an approval older
/// than the one in force (an old approved version brought back) is not
/// taken. It lives in memory: after a restart, the policies as read are
/// judged afresh (the terminals still refuse an approval older than one
/// they ran).
#[derive(Default)]
pub struct Gate {
    /// Given the versions approved before a restart (`seed`).
    seeded: bool,
    /// The version in force and when it was approved.
    approved: BTreeMap<String, (CompiledPolicy, u64)>,
    /// The last verdict per policy, with the statement and frame it was
    /// for: a refresh that changed nothing verifies nothing again.
    verdicts: BTreeMap<String, Judged>,
}

/// A verdict and what it was on: a statement and the approval (or why
/// there was none).
type Judged = (Arc<PolicyStatement>, Result<Arc<[u8]>, String>, Verdict);

impl Gate {
    /// Whether [`Gate::seed`] was called.
    pub fn seeded(&self) -> bool {
        self.seeded
    }

    /// Start from the versions approved before a restart (kept by the
    /// store): each whose approval still verifies is in force until a
    /// newer approved version is read. Those that do not (the admin keys
    /// were rotated since) are dropped, and said.
    pub fn seed(&mut self, versions: Vec<CompiledPolicy>, trust: &BundleTrust) {
        self.seeded = true;
        for p in versions {
            match judge(&p, trust) {
                Verdict::Approved { approved_at_ms, .. } => {
                    self.approved.insert(p.key(), (p, approved_at_ms));
                }
                Verdict::Unapproved { reason, .. } => {
                    tracing::warn!(policy = %p.key(), reason = %reason, "the version approved before the restart is not approved now; not kept");
                }
            }
        }
    }

    /// Take the policies as read now; return those in force and why the
    /// others are not. A policy no longer read is forgotten.
    pub fn admit(&mut self, candidates: Vec<CompiledPolicy>, trust: &BundleTrust) -> Admitted {
        let mut admitted = Admitted::default();
        let mut approved = BTreeMap::new();
        let mut verdicts = BTreeMap::new();
        for candidate in candidates {
            let key = candidate.key();
            let verdict = match self.verdicts.remove(&key) {
                Some((s, f, v)) if s == candidate.statement && f == candidate.approval => v,
                _ => judge(&candidate, trust),
            };
            verdicts.insert(
                key.clone(),
                (
                    candidate.statement.clone(),
                    candidate.approval.clone(),
                    verdict.clone(),
                ),
            );
            let in_force = self.approved.remove(&key);
            let reason = match verdict {
                Verdict::Approved { approved_at_ms, .. } => match &in_force {
                    Some((_, at)) if approved_at_ms < *at => format!(
                        "its approval, of {}, is older than the one in force, of {}: an earlier approved version cannot come back as it was; sign it anew with `tenet policy sign --renew`",
                        crate::time::rfc3339(approved_at_ms),
                        crate::time::rfc3339(*at)
                    ),
                    _ => {
                        approved.insert(key, (candidate, approved_at_ms));
                        continue;
                    }
                },
                Verdict::Unapproved { reason, .. } => reason,
            };
            admitted.unapproved.insert(
                key.clone(),
                Unapproved {
                    reason,
                    in_force: in_force.as_ref().map(|(p, _)| p.generation),
                },
            );
            if let Some(kept) = in_force {
                approved.insert(key, kept);
            }
        }
        admitted.policies = approved.values().map(|(p, _)| p.clone()).collect();
        self.approved = approved;
        self.verdicts = verdicts;
        admitted
    }
}

#[cfg(test)]
mod tests;

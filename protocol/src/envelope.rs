//! Dispatch envelopes: the operator's signed order to run one bundle on one
//! terminal, once, before a deadline, with given arguments and capabilities.
//! The nonce is the first paper's evidence: fresh per dispatch and terminal,
//! it must come back in the execution report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bundle::{Capability, MAX_NAME, PayloadBundle};
use crate::keys::PublicKey;
use crate::reject::Rejection;
use crate::wire::{Kind, Message, SignedMessage, digest_string, limit};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchEnvelope {
    pub terminal: String,
    /// `namespace/name` of the policy.
    pub policy: String,
    pub policy_generation: u64,
    /// Body digest of the bundle to run.
    pub payload_digest: [u8; 32],
    /// 256 bits from the operator's CSPRNG.
    pub nonce: [u8; 32],
    pub issued_at_ms: u64,
    pub deadline_ms: u64,
    /// Per terminal, strictly increasing.
    pub sequence: u64,
    pub args: Vec<String>,
    pub capabilities: Vec<Capability>,
    /// Path prefixes the `WriteFiles` capability may write under.
    pub write_paths: Vec<String>,
    /// The admins' approval of the policy (a signed `PolicyStatement`
    /// frame, from its `tenet.dev/approval` annotation): the terminal runs
    /// nothing its approved remediation does not cover
    /// ([`crate::approval::check_envelope`]).
    #[serde(with = "serde_bytes")]
    pub approval: Vec<u8>,
}

pub const MAX_ARGS: usize = 64;
pub const MAX_ARG_BYTES: usize = 4096;
/// An approval frame: a statement (at most its arguments' bytes) and a
/// signature per admin.
pub const MAX_APPROVAL_BYTES: usize = MAX_ARGS * MAX_ARG_BYTES * 2 + 64 * 1024;

impl Message for DispatchEnvelope {
    const KIND: Kind = Kind::DispatchEnvelope;

    fn check(&self) -> Result<(), Rejection> {
        limit("the terminal name", self.terminal.len(), MAX_NAME * 2)?;
        limit("the policy name", self.policy.len(), MAX_NAME * 2)?;
        limit("the argument list", self.args.len(), MAX_ARGS)?;
        for a in &self.args {
            limit("an argument", a.len(), MAX_ARG_BYTES)?;
        }
        limit(
            "the capability list",
            self.capabilities.len(),
            Capability::ALL.len(),
        )?;
        limit("the write path list", self.write_paths.len(), MAX_ARGS)?;
        for p in &self.write_paths {
            limit("a write path", p.len(), MAX_ARG_BYTES)?;
            if !p.starts_with('/') || p.split('/').any(|s| s == "..") {
                return Err(Rejection::Malformed(format!(
                    "write path {p:?} is not absolute and clean"
                )));
            }
        }
        limit("the approval", self.approval.len(), MAX_APPROVAL_BYTES)?;
        if self.deadline_ms <= self.issued_at_ms {
            return Err(Rejection::Malformed(
                "the deadline is not after the issue time".into(),
            ));
        }
        Ok(())
    }
}

/// What an agent remembers between envelopes, to refuse replays and
/// rollbacks. Kept on disk by the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeState {
    pub terminal: String,
    /// The highest sequence number accepted.
    pub last_sequence: u64,
    /// The highest generation accepted, per policy.
    pub policy_generations: BTreeMap<String, u64>,
    /// The newest admins' approval run, per policy (its `approved_at_ms`):
    /// an older one is a rollback.
    pub approvals: BTreeMap<String, u64>,
}

/// Clocks disagree a little; an envelope issued up to this far in the
/// future is accepted.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

#[derive(Debug, Clone)]
pub struct VerifiedEnvelope {
    pub envelope: DispatchEnvelope,
    /// Body digest; the report names it.
    pub digest: [u8; 32],
    /// When the admins approved what it asks for (0: not checked, see
    /// [`EnvelopeState::verify`]).
    pub approved_at_ms: u64,
}

impl EnvelopeState {
    pub fn new(terminal: impl Into<String>) -> EnvelopeState {
        EnvelopeState {
            terminal: terminal.into(),
            ..EnvelopeState::default()
        }
    }

    /// What a terminal checks before anything runs: [`EnvelopeState::verify`],
    /// then the admins' approval the envelope carries against the pinned
    /// admin keys and threshold ([`crate::approval::check_envelope`]), and
    /// that this approval is not older than one already run for the policy.
    pub fn verify_approved(
        &self,
        bytes: &[u8],
        trust: &crate::enrol::TrustAnchors,
        now_ms: u64,
    ) -> Result<VerifiedEnvelope, Rejection> {
        let mut verified = self.verify(bytes, &trust.dispatch_key, now_ms)?;
        let approved = crate::approval::check_envelope(
            &verified.envelope,
            &trust.admin_keys,
            usize::from(trust.admin_threshold),
        )?;
        if let Some(seen) = self.approvals.get(&verified.envelope.policy)
            && approved.approved_at_ms < *seen
        {
            return Err(Rejection::Rollback {
                what: "policy approval time",
                seen: *seen,
                got: approved.approved_at_ms,
            });
        }
        // Started only inside a maintenance window the admins approved.
        crate::window::check(&approved.windows, now_ms).map_err(Rejection::OutsideWindow)?;
        verified.approved_at_ms = approved.approved_at_ms;
        Ok(verified)
    }

    /// Verify an envelope: the operator's signature, this terminal, the
    /// clock, and that it is neither a replay nor a rollback. Not the
    /// admins' approval: a terminal calls [`EnvelopeState::verify_approved`].
    /// Does not change the state: call [`EnvelopeState::accept`] once it is
    /// run.
    pub fn verify(
        &self,
        bytes: &[u8],
        dispatch_key: &PublicKey,
        now_ms: u64,
    ) -> Result<VerifiedEnvelope, Rejection> {
        let frame = SignedMessage::decode(bytes, Kind::DispatchEnvelope)?;
        frame.verify_by(dispatch_key)?;
        let envelope: DispatchEnvelope = frame.open()?;
        if envelope.terminal != self.terminal {
            return Err(Rejection::WrongTerminal {
                expected: self.terminal.clone(),
                found: envelope.terminal,
            });
        }
        if now_ms > envelope.deadline_ms {
            return Err(Rejection::Expired {
                deadline_ms: envelope.deadline_ms,
                now_ms,
            });
        }
        if envelope.issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(Rejection::NotYetValid {
                not_before_ms: envelope.issued_at_ms,
                now_ms,
            });
        }
        if envelope.sequence == self.last_sequence && self.last_sequence != 0 {
            return Err(Rejection::Replay(format!(
                "envelope sequence {} was already run",
                envelope.sequence
            )));
        }
        if envelope.sequence <= self.last_sequence {
            return Err(Rejection::Rollback {
                what: "sequence",
                seen: self.last_sequence,
                got: envelope.sequence,
            });
        }
        if let Some(seen) = self.policy_generations.get(&envelope.policy)
            && envelope.policy_generation < *seen
        {
            return Err(Rejection::Rollback {
                what: "policy generation",
                seen: *seen,
                got: envelope.policy_generation,
            });
        }
        Ok(VerifiedEnvelope {
            digest: frame.body_digest(),
            envelope,
            approved_at_ms: 0,
        })
    }

    /// Record an envelope as used: its sequence, policy generation and
    /// approval time.
    pub fn accept(&mut self, v: &VerifiedEnvelope) {
        self.last_sequence = self.last_sequence.max(v.envelope.sequence);
        let g = self
            .policy_generations
            .entry(v.envelope.policy.clone())
            .or_insert(0);
        *g = (*g).max(v.envelope.policy_generation);
        let a = self.approvals.entry(v.envelope.policy.clone()).or_insert(0);
        *a = (*a).max(v.approved_at_ms);
    }
}

/// The bundle must be the one the envelope names, and every capability it
/// asks for must be granted.
pub fn check_bundle_against_envelope(
    bundle_digest: &[u8; 32],
    bundle: &PayloadBundle,
    envelope: &DispatchEnvelope,
) -> Result<(), Rejection> {
    if *bundle_digest != envelope.payload_digest {
        return Err(Rejection::WrongPayloadDigest {
            expected: digest_string(&envelope.payload_digest),
            found: digest_string(bundle_digest),
        });
    }
    if let Some(c) = bundle
        .manifest
        .capabilities
        .iter()
        .find(|c| !envelope.capabilities.contains(c))
    {
        return Err(Rejection::CapabilityNotGranted(c.name().into()));
    }
    Ok(())
}

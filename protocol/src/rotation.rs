//! Trust rotation, after TUF's root rotation: the keys a terminal pinned at
//! enrolment (the admin keys and their threshold, the dispatch key, the
//! certificate issuer's key) are replaced only by a [`TrustRotation`] that
//! K of the admin keys in force signed, and that K' of the new admin keys
//! signed too (so nobody rotates to keys no one holds).
//!
//! Each set of trust anchors has a version: 1 is what enrolment pins, and a
//! rotation names the next one. A terminal walks the chain of rotations the
//! operator sends it ([`apply_chain`]), one version at a time, each checked
//! against the one before it; a rotation it already has is skipped, one
//! that skips a version or does not verify stops the walk, and what it
//! pinned so far stays. Once a rotation is pinned the old keys count for
//! nothing: approvals and bundles must be signed by the new admin set, and
//! envelopes by the new dispatch key.
//!
//! So whoever holds the dispatch key, or the operator itself, cannot swap
//! the admin keys a terminal trusts: a rotation they sign alone is refused.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::enrol::TrustAnchors;
use crate::keys::Fingerprint;
use crate::reject::Rejection;
use crate::wire::{Kind, MAX_SIGNATURES, Message, SignedMessage, limit};

/// The most admin keys a trust root names.
pub const MAX_ADMIN_KEYS: usize = 32;

/// The most rotations a terminal verifies in one walk (those it has are
/// skipped, however many).
pub const MAX_CHAIN: usize = 256;

/// What the admins sign to replace the trust anchors in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRotation {
    /// The new anchors; their `version` is one more than the one replaced.
    pub anchors: TrustAnchors,
    /// When the rotation was written (unix ms); for people, not checked.
    pub created_at_ms: u64,
}

impl Message for TrustRotation {
    const KIND: Kind = Kind::TrustRotation;

    fn check(&self) -> Result<(), Rejection> {
        check_anchors(&self.anchors)
    }
}

/// The anchors make sense: a known number of distinct admin keys, a
/// threshold between 1 and their number, a version from 1.
pub fn check_anchors(t: &TrustAnchors) -> Result<(), Rejection> {
    limit("the admin key list", t.admin_keys.len(), MAX_ADMIN_KEYS)?;
    // A frame carries at most MAX_SIGNATURES: a higher threshold could
    // never be met, and nothing could be signed again.
    limit(
        "the admin threshold",
        usize::from(t.admin_threshold),
        MAX_SIGNATURES,
    )?;
    if t.admin_threshold == 0 || usize::from(t.admin_threshold) > t.admin_keys.len() {
        return Err(Rejection::Malformed(format!(
            "admin threshold {} of {} keys",
            t.admin_threshold,
            t.admin_keys.len()
        )));
    }
    let distinct: BTreeSet<Fingerprint> = t.admin_keys.iter().map(|k| k.fingerprint()).collect();
    if distinct.len() != t.admin_keys.len() {
        return Err(Rejection::Malformed(
            "an admin key is named twice (each counts once)".into(),
        ));
    }
    if t.version == 0 {
        return Err(Rejection::Malformed(
            "trust anchors start at version 1".into(),
        ));
    }
    Ok(())
}

/// Who signed a rotation, once it verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub anchors: TrustAnchors,
    /// The admin keys in force before that signed it.
    pub old_signers: Vec<Fingerprint>,
    /// The new admin keys that signed it.
    pub new_signers: Vec<Fingerprint>,
}

/// Check one rotation frame against the anchors in force: it names the
/// next version, at least `current.admin_threshold` of the current admin
/// keys signed it, and at least the new threshold of the new admin keys.
/// A refusal says which of these failed.
pub fn verify_rotation(frame: &[u8], current: &TrustAnchors) -> Result<Rotated, Rejection> {
    let signed = SignedMessage::decode(frame, Kind::TrustRotation)?;
    let next = current.version + 1;
    // The admins in force first: nothing of the body is read before.
    let old_signers = signed
        .verify_threshold(&current.admin_keys, usize::from(current.admin_threshold))
        .map_err(|e| {
            Rejection::NotApproved(format!(
                "the rotation to version {next} is not signed by {} of the {} admin key(s) of version {}: {e}",
                current.admin_threshold,
                current.admin_keys.len(),
                current.version
            ))
        })?;
    let rotation: TrustRotation = signed.open()?;
    let new = rotation.anchors;
    if new.version != next {
        return Err(Rejection::Malformed(format!(
            "the rotation is to version {}, and the version in force is {} (rotations go one version at a time)",
            new.version, current.version
        )));
    }
    let new_signers = signed
        .verify_threshold(&new.admin_keys, usize::from(new.admin_threshold))
        .map_err(|e| {
            Rejection::NotApproved(format!(
                "the rotation to version {} is not signed by {} of its own {} new admin key(s): {e}",
                new.version,
                new.admin_threshold,
                new.admin_keys.len()
            ))
        })?;
    Ok(Rotated {
        anchors: new,
        old_signers,
        new_signers,
    })
}

/// What walking a chain of rotations gave: the anchors to pin (the last
/// that verified), how many rotations were applied, and why the walk
/// stopped early, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walked {
    pub anchors: TrustAnchors,
    pub applied: usize,
    pub refused: Option<(u64, Rejection)>,
}

/// Walk `chain` (rotation frames, in version order) from `pinned`: frames
/// of versions already pinned are skipped, the others applied one by one
/// (at most [`MAX_CHAIN`]); the first that does not verify stops the walk
/// (later ones cannot verify without it), and is named by the version it
/// says it is.
pub fn apply_chain(pinned: &TrustAnchors, chain: &[Vec<u8>]) -> Walked {
    let mut anchors = pinned.clone();
    let mut applied = 0;
    for frame in chain {
        let version = version_of(frame);
        if version.is_some_and(|v| v <= anchors.version) {
            continue;
        }
        // At most MAX_CHAIN verified in one walk (the next session walks
        // on from there).
        if applied == MAX_CHAIN {
            break;
        }
        match verify_rotation(frame, &anchors) {
            Ok(r) => {
                anchors = r.anchors;
                applied += 1;
            }
            Err(e) => {
                return Walked {
                    refused: Some((version.unwrap_or(anchors.version + 1), e)),
                    anchors,
                    applied,
                };
            }
        }
    }
    Walked {
        anchors,
        applied,
        refused: None,
    }
}

/// The version a rotation frame names, read without checking signatures
/// (to skip what is already pinned); `None` when it cannot be read.
pub fn version_of(frame: &[u8]) -> Option<u64> {
    let signed = SignedMessage::decode(frame, Kind::TrustRotation).ok()?;
    let rotation: TrustRotation = signed.open().ok()?;
    Some(rotation.anchors.version)
}

#[cfg(test)]
mod tests;

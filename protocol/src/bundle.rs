//! Payload bundles: a WASM module, the artifacts it ships (installers,
//! packages), and a manifest; signed by one or more admin keys. A policy pins
//! a bundle by the digest of its body, so adding signatures keeps the digest.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::keys::{Fingerprint, PublicKey};
use crate::reject::Rejection;
use crate::wire::{Kind, Message, SignedMessage, digest_string, limit, sha256};

/// A host capability a payload asks for and an envelope grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Capability {
    /// Write a bundled artifact to a private directory and run it.
    RunArtifact,
    /// Read the terminal's inventory.
    ReadInventory,
    /// Write files under the envelope's granted path prefixes.
    WriteFiles,
    /// Write log lines that travel in the report.
    Log,
}

impl Capability {
    pub const ALL: [Capability; 4] = [
        Capability::RunArtifact,
        Capability::ReadInventory,
        Capability::WriteFiles,
        Capability::Log,
    ];

    /// The name used in policies and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Capability::RunArtifact => "run-artifact",
            Capability::ReadInventory => "read-inventory",
            Capability::WriteFiles => "write-files",
            Capability::Log => "log",
        }
    }

    pub fn parse(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// What a bundle is and what it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub description: String,
    /// Capabilities the module calls; an envelope must grant all of them.
    pub capabilities: Vec<Capability>,
    pub created_ms: u64,
    /// After this the bundle is never run (a frozen bundle).
    pub expires_ms: u64,
}

/// A file shipped with the module, digest-pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// A plain file name (no directories).
    pub name: String,
    pub sha256: [u8; 32],
    pub size: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadBundle {
    pub manifest: Manifest,
    /// The WASM module (binary format).
    #[serde(with = "serde_bytes")]
    pub module: Vec<u8>,
    pub artifacts: Vec<Artifact>,
}

pub const MAX_MODULE_BYTES: usize = 16 * 1024 * 1024;
pub const MAX_ARTIFACTS: usize = 32;
pub const MAX_NAME: usize = 128;
pub const MAX_DESCRIPTION: usize = 4096;

const WASM_MAGIC: &[u8] = b"\0asm";

impl Message for PayloadBundle {
    const KIND: Kind = Kind::PayloadBundle;

    fn check(&self) -> Result<(), Rejection> {
        let m = &self.manifest;
        limit("the bundle name", m.name.len(), MAX_NAME)?;
        limit("the bundle version", m.version.len(), MAX_NAME)?;
        limit("the description", m.description.len(), MAX_DESCRIPTION)?;
        limit(
            "the capability list",
            m.capabilities.len(),
            Capability::ALL.len(),
        )?;
        limit("the module", self.module.len(), MAX_MODULE_BYTES)?;
        limit("the artifact list", self.artifacts.len(), MAX_ARTIFACTS)?;
        if m.name.is_empty() {
            return Err(Rejection::Malformed("the bundle has no name".into()));
        }
        if !self.module.starts_with(WASM_MAGIC) {
            return Err(Rejection::Malformed(
                "the module is not a WASM binary".into(),
            ));
        }
        let mut names = BTreeSet::new();
        for a in &self.artifacts {
            limit("an artifact name", a.name.len(), MAX_NAME)?;
            if !safe_file_name(&a.name) {
                return Err(Rejection::Malformed(format!(
                    "artifact name {:?} is not a plain file name",
                    a.name
                )));
            }
            if !names.insert(&a.name) {
                return Err(Rejection::Malformed(format!(
                    "two artifacts are named {:?}",
                    a.name
                )));
            }
            if a.size != a.data.len() as u64 {
                return Err(Rejection::Malformed(format!(
                    "artifact {:?} says {} bytes but holds {}",
                    a.name,
                    a.size,
                    a.data.len()
                )));
            }
            if sha256(&a.data) != a.sha256 {
                return Err(Rejection::WrongPayloadDigest {
                    expected: digest_string(&a.sha256),
                    found: digest_string(&sha256(&a.data)),
                });
            }
        }
        Ok(())
    }
}

/// A name that stays inside the directory it is written to.
pub fn safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~%".contains(&b))
}

/// Who may sign bundles, and how many of them must.
#[derive(Debug, Clone)]
pub struct BundleTrust {
    pub admin_keys: Vec<PublicKey>,
    /// k of the n admin keys.
    pub threshold: usize,
}

/// A bundle whose signatures, digest, freshness and contents verified.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    pub bundle: PayloadBundle,
    pub digest: [u8; 32],
    pub signers: Vec<Fingerprint>,
}

/// Verify a bundle's frame: k-of-n admin signatures, the digest a policy or
/// envelope pinned (when given), expiry, and its contents.
pub fn verify_bundle(
    bytes: &[u8],
    trust: &BundleTrust,
    expected_digest: Option<&[u8; 32]>,
    now_ms: u64,
) -> Result<VerifiedBundle, Rejection> {
    let frame = SignedMessage::decode(bytes, Kind::PayloadBundle)?;
    let digest = frame.body_digest();
    if let Some(expected) = expected_digest
        && *expected != digest
    {
        return Err(Rejection::WrongPayloadDigest {
            expected: digest_string(expected),
            found: digest_string(&digest),
        });
    }
    let signers = frame.verify_threshold(&trust.admin_keys, trust.threshold)?;
    let bundle: PayloadBundle = frame.open()?;
    if now_ms >= bundle.manifest.expires_ms {
        return Err(Rejection::Expired {
            deadline_ms: bundle.manifest.expires_ms,
            now_ms,
        });
    }
    Ok(VerifiedBundle {
        bundle,
        digest,
        signers,
    })
}

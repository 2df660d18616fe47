//! The canonical encoding and the signed frame every message travels in.
//!
//! # Encoding
//!
//! Message bodies are [postcard](https://docs.rs/postcard) (serde's compact
//! binary format): fields in declaration order, integers as LEB128 varints
//! (signed ones zig-zag), byte strings and sequences length-prefixed, enums
//! by variant index, maps as sorted `BTreeMap`s, no floats. The same value
//! always gives the same bytes, and decoding refuses trailing bytes and any
//! input that does not re-encode to itself, so every accepted message has
//! exactly one encoding and digests over bodies are canonical.
//!
//! # Frame
//!
//! ```text
//! SignedMessage = format:u16  kind:u8  body:bytes  signatures:[SignatureEntry]
//! SignatureEntry = key:Fingerprint(32)  algorithm:enum  signature:bytes
//! ```
//!
//! `format` comes first and is read alone, so a frame of an unknown future
//! format is refused as such. A signature covers
//! `"TENET-SIG-V1\0" || context(kind) || "\0" || body`: the context names the
//! message kind (`tenet.dev/dispatch-envelope`), so a signature made for one
//! kind never verifies as another. Signatures sit outside the body, so a
//! payload bundle keeps its digest as admins add their signatures.

use std::fmt;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

use crate::keys::{Algorithm, Fingerprint, KeyError, PublicKey, Signer};
use crate::reject::Rejection;

/// The frame format this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;

const SIGNATURE_DOMAIN: &[u8] = b"TENET-SIG-V1\0";

/// The kinds of message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    PayloadBundle = 1,
    DispatchEnvelope = 2,
    ExecutionReport = 3,
    SecurityCertificate = 4,
    EnrolmentRequest = 5,
    EnrolmentResponse = 6,
    InventoryReport = 7,
    Presentation = 8,
    AuditReport = 9,
    PolicyApproval = 10,
    TrustRotation = 11,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::PayloadBundle,
        Kind::DispatchEnvelope,
        Kind::ExecutionReport,
        Kind::SecurityCertificate,
        Kind::EnrolmentRequest,
        Kind::EnrolmentResponse,
        Kind::InventoryReport,
        Kind::Presentation,
        Kind::AuditReport,
        Kind::PolicyApproval,
        Kind::TrustRotation,
    ];

    fn from_u8(b: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == b)
    }

    /// The signature context of this kind.
    pub fn context(self) -> &'static str {
        match self {
            Kind::PayloadBundle => "tenet.dev/payload-bundle",
            Kind::DispatchEnvelope => "tenet.dev/dispatch-envelope",
            Kind::ExecutionReport => "tenet.dev/execution-report",
            Kind::SecurityCertificate => "tenet.dev/security-certificate",
            Kind::EnrolmentRequest => "tenet.dev/enrolment-request",
            Kind::EnrolmentResponse => "tenet.dev/enrolment-response",
            Kind::InventoryReport => "tenet.dev/inventory-report",
            Kind::Presentation => "tenet.dev/presentation",
            Kind::AuditReport => "tenet.dev/audit-report",
            Kind::PolicyApproval => "tenet.dev/policy-approval",
            Kind::TrustRotation => "tenet.dev/trust-rotation",
        }
    }

    /// The largest whole frame of this kind that is read at all.
    pub fn max_frame_bytes(self) -> usize {
        self.max_frame_bytes_const()
    }

    /// [`Kind::max_frame_bytes`], usable in constants.
    pub const fn max_frame_bytes_const(self) -> usize {
        match self {
            // A module and its artifacts (installers, packages).
            Kind::PayloadBundle => 256 * 1024 * 1024,
            // Reports and inventories carry a terminal's whole package list.
            Kind::ExecutionReport | Kind::InventoryReport => 8 * 1024 * 1024,
            _ => 1024 * 1024,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::PayloadBundle => "payload bundle",
            Kind::DispatchEnvelope => "dispatch envelope",
            Kind::ExecutionReport => "execution report",
            Kind::SecurityCertificate => "security certificate",
            Kind::EnrolmentRequest => "enrolment request",
            Kind::EnrolmentResponse => "enrolment response",
            Kind::InventoryReport => "inventory report",
            Kind::Presentation => "certificate presentation",
            Kind::AuditReport => "audit report",
            Kind::PolicyApproval => "policy approval",
            Kind::TrustRotation => "trust rotation",
        })
    }
}

/// A message type that travels in a signed frame.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: Kind;
    /// Field-level limits (lengths, counts) and internal consistency, checked
    /// after decoding and before anything else looks at the message.
    fn check(&self) -> Result<(), Rejection>;
}

/// One signature in a frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    pub key: Fingerprint,
    pub algorithm: Algorithm,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A message body and its signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedMessage {
    pub kind: Kind,
    pub body: Vec<u8>,
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Serialize, Deserialize)]
struct Frame {
    format: u16,
    kind: u8,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    signatures: Vec<SignatureEntry>,
}

/// At most this many signatures on one message (k-of-n admin signing).
pub const MAX_SIGNATURES: usize = 16;

/// Encode a value canonically.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Decode exactly one canonical encoding of `T` from `bytes`.
pub fn decode<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, Rejection> {
    let (value, rest): (T, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Rejection::Malformed(format!(
            "{} trailing byte(s)",
            rest.len()
        )));
    }
    if encode(&value) != bytes {
        return Err(Rejection::Malformed("not in canonical encoding".into()));
    }
    Ok(value)
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `sha256:<hex>`, as digests are written in policies and logs.
pub fn digest_string(d: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(d))
}

/// Parse `sha256:<64 hex digits>`.
pub fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    hex::decode(hex_part).ok()?.try_into().ok()
}

impl SignedMessage {
    /// An unsigned frame holding `message`.
    pub fn new<M: Message>(message: &M) -> SignedMessage {
        SignedMessage {
            kind: M::KIND,
            body: encode(message),
            signatures: Vec::new(),
        }
    }

    /// `message` signed by `signer`.
    pub fn signed<M: Message>(message: &M, signer: &dyn Signer) -> Result<SignedMessage, KeyError> {
        let mut m = SignedMessage::new(message);
        m.sign(signer)?;
        Ok(m)
    }

    /// What a signature over this body covers.
    pub fn signing_input(kind: Kind, body: &[u8]) -> Vec<u8> {
        let context = kind.context().as_bytes();
        let mut v = Vec::with_capacity(SIGNATURE_DOMAIN.len() + context.len() + 1 + body.len());
        v.extend_from_slice(SIGNATURE_DOMAIN);
        v.extend_from_slice(context);
        v.push(0);
        v.extend_from_slice(body);
        v
    }

    /// Add `signer`'s signature (replacing an earlier one by the same key).
    pub fn sign(&mut self, signer: &dyn Signer) -> Result<(), KeyError> {
        let public = signer.public_key();
        let signature = signer.sign(&Self::signing_input(self.kind, &self.body))?;
        let key = public.fingerprint();
        self.signatures.retain(|s| s.key != key);
        self.signatures.push(SignatureEntry {
            key,
            algorithm: public.algorithm(),
            signature,
        });
        Ok(())
    }

    /// The digest of the body: what policies pin (bundles) and reports name
    /// (envelopes).
    pub fn body_digest(&self) -> [u8; 32] {
        sha256(&self.body)
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(&Frame {
            format: FORMAT_VERSION,
            kind: self.kind as u8,
            body: self.body.clone(),
            signatures: self.signatures.clone(),
        })
    }

    /// Decode a frame of kind `expected`, refusing oversized input before
    /// reading it, unknown formats, other kinds and non-canonical bytes.
    pub fn decode(bytes: &[u8], expected: Kind) -> Result<SignedMessage, Rejection> {
        let limit = expected.max_frame_bytes();
        if bytes.len() > limit {
            return Err(Rejection::SizeLimitExceeded {
                what: "the message",
                limit,
                actual: bytes.len(),
            });
        }
        let (format, _): (u16, _) =
            postcard::take_from_bytes(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
        if format != FORMAT_VERSION {
            return Err(Rejection::UnknownFormatVersion {
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        let frame: Frame = decode(bytes)?;
        let kind = Kind::from_u8(frame.kind)
            .ok_or_else(|| Rejection::Malformed(format!("unknown message kind {}", frame.kind)))?;
        if kind != expected {
            return Err(Rejection::WrongKind {
                expected,
                found: kind,
            });
        }
        if frame.signatures.len() > MAX_SIGNATURES {
            return Err(Rejection::SizeLimitExceeded {
                what: "the signature list",
                limit: MAX_SIGNATURES,
                actual: frame.signatures.len(),
            });
        }
        Ok(SignedMessage {
            kind,
            body: frame.body,
            signatures: frame.signatures,
        })
    }

    /// Decode and check the body. Call only after the signature verified:
    /// nothing unauthenticated is parsed further than the frame.
    pub fn open<M: Message>(&self) -> Result<M, Rejection> {
        if self.kind != M::KIND {
            return Err(Rejection::WrongKind {
                expected: M::KIND,
                found: self.kind,
            });
        }
        let m: M = decode(&self.body)?;
        m.check()?;
        Ok(m)
    }

    /// The frame must carry a valid signature by `key`.
    pub fn verify_by(&self, key: &PublicKey) -> Result<(), Rejection> {
        let fp = key.fingerprint();
        let Some(entry) = self.signatures.iter().find(|s| s.key == fp) else {
            return Err(match self.signatures.first() {
                Some(other) => Rejection::UnknownKey { key: other.key },
                None => Rejection::ThresholdNotMet {
                    valid: 0,
                    required: 1,
                },
            });
        };
        let input = Self::signing_input(self.kind, &self.body);
        if entry.algorithm == key.algorithm() && key.verify(&input, &entry.signature) {
            Ok(())
        } else {
            Err(Rejection::BadSignature { key: fp })
        }
    }

    /// At least `threshold` distinct keys of `trusted` must have signed
    /// validly. Any signature that fails is refused outright (a tampered
    /// message is refused, not merely under-signed); signatures by keys not
    /// in `trusted` count for nothing. Returns the keys that signed.
    pub fn verify_threshold(
        &self,
        trusted: &[PublicKey],
        threshold: usize,
    ) -> Result<Vec<Fingerprint>, Rejection> {
        let input = Self::signing_input(self.kind, &self.body);
        let mut valid = Vec::new();
        let mut unknown = None;
        for entry in &self.signatures {
            let Some(key) = trusted.iter().find(|k| k.fingerprint() == entry.key) else {
                unknown.get_or_insert(entry.key);
                continue;
            };
            if entry.algorithm != key.algorithm() || !key.verify(&input, &entry.signature) {
                return Err(Rejection::BadSignature { key: entry.key });
            }
            if !valid.contains(&entry.key) {
                valid.push(entry.key);
            }
        }
        if valid.len() >= threshold.max(1) {
            Ok(valid)
        } else if let (0, Some(key)) = (valid.len(), unknown) {
            Err(Rejection::UnknownKey { key })
        } else {
            Err(Rejection::ThresholdNotMet {
                valid: valid.len(),
                required: threshold.max(1),
            })
        }
    }
}

/// Refuse a string or list over `limit`.
pub(crate) fn limit(what: &'static str, actual: usize, limit: usize) -> Result<(), Rejection> {
    if actual > limit {
        Err(Rejection::SizeLimitExceeded {
            what,
            limit,
            actual,
        })
    } else {
        Ok(())
    }
}

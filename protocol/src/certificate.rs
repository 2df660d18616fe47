//! Security certificates (the second paper's figure 6): who vouches, for
//! whom, until when, and one number, the security level. Nothing about what
//! was audited, so a certificate leaks no weakness. There is no revocation:
//! expiry is revocation, so validity is short.

use serde::{Deserialize, Serialize};

use crate::bundle::MAX_NAME;
use crate::keys::{Fingerprint, PublicKey};
use crate::reject::Rejection;
use crate::wire::{Kind, Message, SignedMessage, limit};

pub const CERTIFICATE_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityCertificate {
    pub version: u8,
    pub serial: [u8; 16],
    /// The issuer's name (the operator's certificate authority).
    pub issuer: String,
    pub issuer_key: Fingerprint,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// The terminal's name.
    pub subject: String,
    /// The terminal's identity key: a peer checks challenge responses with it.
    pub subject_key: PublicKey,
    /// The security level index, 0-100.
    pub level: u8,
}

impl Message for SecurityCertificate {
    const KIND: Kind = Kind::SecurityCertificate;

    fn check(&self) -> Result<(), Rejection> {
        if self.version != CERTIFICATE_VERSION {
            return Err(Rejection::UnknownFormatVersion {
                found: u16::from(self.version),
                supported: u16::from(CERTIFICATE_VERSION),
            });
        }
        limit("the issuer name", self.issuer.len(), MAX_NAME)?;
        limit("the subject name", self.subject.len(), MAX_NAME * 2)?;
        if self.level > 100 {
            return Err(Rejection::Malformed(format!(
                "level {} is over 100",
                self.level
            )));
        }
        if self.not_after_ms <= self.not_before_ms {
            return Err(Rejection::Malformed("the validity period is empty".into()));
        }
        Ok(())
    }
}

/// Verify a certificate's signature by the issuer and its validity now.
pub fn verify_certificate(
    bytes: &[u8],
    issuer_key: &PublicKey,
    now_ms: u64,
) -> Result<SecurityCertificate, Rejection> {
    let frame = SignedMessage::decode(bytes, Kind::SecurityCertificate)?;
    frame.verify_by(issuer_key)?;
    let cert: SecurityCertificate = frame.open()?;
    if cert.issuer_key != issuer_key.fingerprint() {
        return Err(Rejection::UnknownKey {
            key: cert.issuer_key,
        });
    }
    if now_ms < cert.not_before_ms {
        return Err(Rejection::NotYetValid {
            not_before_ms: cert.not_before_ms,
            now_ms,
        });
    }
    if now_ms >= cert.not_after_ms {
        return Err(Rejection::Expired {
            deadline_ms: cert.not_after_ms,
            now_ms,
        });
    }
    Ok(cert)
}

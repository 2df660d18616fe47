//! Enrolment: a terminal proves it holds its new identity key and presents a
//! bootstrap token; the operator answers with the keys the terminal will
//! trust from then on (pinned), and its mTLS client certificate.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bundle::MAX_NAME;
use crate::keys::PublicKey;
use crate::reject::Rejection;
use crate::wire::{Kind, Message, SignedMessage, limit};

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentRequest {
    /// The one-time bootstrap token an admin gave the terminal. Secret.
    pub token: String,
    pub terminal: String,
    /// What the terminal says its labels are: kept as a claim; the labels
    /// policies select on are those admins put on the token.
    pub labels: BTreeMap<String, String>,
    pub identity: PublicKey,
    /// Whether the identity key is held in a TPM.
    pub tpm: bool,
    /// With a TPM: the restricted attestation key (P-256) its quotes are
    /// signed with, registered here so the issuer can check them.
    pub attestation_key: Option<PublicKey>,
    /// With a TPM: its endorsement key certificate (DER, RSA 2048, as the
    /// manufacturer wrote it into the TPM's NV index 0x01c00002). The
    /// operator checks it against the manufacturers' roots and proves,
    /// by credential activation, that the attestation key lives in that
    /// TPM; until then the TPM is only claimed.
    #[serde(with = "serde_bytes")]
    pub ek_certificate: Option<Vec<u8>>,
    /// A PKCS#10 request (PEM) for the mTLS client certificate; its key is
    /// the agent's transport key, kept apart from the identity key.
    pub tls_csr_pem: String,
    pub requested_at_ms: u64,
}

impl fmt::Debug for EnrolmentRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrolmentRequest")
            .field("token", &"<redacted>")
            .field("terminal", &self.terminal)
            .field("labels", &self.labels)
            .field("identity", &self.identity)
            .field("tpm", &self.tpm)
            .field("attestation_key", &self.attestation_key)
            .field(
                "ek_certificate",
                &self.ek_certificate.as_ref().map(Vec::len),
            )
            .field("tls_csr_pem", &self.tls_csr_pem.len())
            .field("requested_at_ms", &self.requested_at_ms)
            .finish()
    }
}

pub const MAX_LABELS: usize = 64;
pub const MAX_PEM: usize = 16 * 1024;

/// The grammar of terminal names: a DNS name in lower case, dot-separated
/// labels of `a-z`, `0-9` and `-` (1 to 63 characters, neither first nor
/// last a hyphen), 253 characters at most. No upper case, no `*`, no
/// control characters: two names that differ are different terminals to
/// every component, whatever it compares with (a TLS name check ignores
/// case, a map key does not), and a name can be a certificate's DNS name.
pub fn check_terminal_name(name: &str) -> Result<(), String> {
    let bad = |why: String| Err(format!("terminal name {name:?} is not valid: {why}"));
    if name.is_empty() {
        return bad("it is empty".into());
    }
    if name.len() > MAX_TERMINAL_NAME {
        return bad(format!("it is longer than {MAX_TERMINAL_NAME} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("it has an empty label (two dots, or a dot at an end)".into());
        }
        if label.len() > 63 {
            return bad(format!("the label {label:?} is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return bad(format!(
                "{c:?} is not allowed (lower-case letters, digits, '-' and '.' are)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad(format!("the label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// The longest terminal name (a DNS name's limit).
pub const MAX_TERMINAL_NAME: usize = 253;

impl Message for EnrolmentRequest {
    const KIND: Kind = Kind::EnrolmentRequest;

    fn check(&self) -> Result<(), Rejection> {
        limit("the token", self.token.len(), 256)?;
        check_terminal_name(&self.terminal).map_err(Rejection::Malformed)?;
        limit("the label list", self.labels.len(), MAX_LABELS)?;
        limit("the certificate request", self.tls_csr_pem.len(), MAX_PEM)?;
        limit(
            "the EK certificate",
            self.ek_certificate.as_ref().map_or(0, Vec::len),
            MAX_PEM,
        )?;
        for (k, v) in &self.labels {
            limit("a label", k.len() + v.len(), MAX_NAME * 4)?;
        }
        Ok(())
    }
}

/// Verify an enrolment request: signed by the identity key it presents
/// (proof of possession). The token is checked by the operator.
pub fn verify_enrolment_request(bytes: &[u8]) -> Result<EnrolmentRequest, Rejection> {
    let frame = SignedMessage::decode(bytes, Kind::EnrolmentRequest)?;
    // The key is inside the body: read it, then check the body's signature
    // with it before trusting anything else in it.
    let request: EnrolmentRequest = frame.open()?;
    frame.verify_by(&request.identity)?;
    Ok(request)
}

/// The keys an enrolled terminal trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustAnchors {
    /// 1 at enrolment; each rotation (`rotation::TrustRotation`) adds one.
    pub version: u64,
    /// Keys that sign payload bundles and approve policies.
    pub admin_keys: Vec<PublicKey>,
    /// How many of them must sign a bundle.
    pub admin_threshold: u8,
    /// The operator's dispatch key (envelopes).
    pub dispatch_key: PublicKey,
    /// The certificate issuer's key.
    pub issuer_key: PublicKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentResponse {
    pub terminal: String,
    pub trust: TrustAnchors,
    /// The terminal's mTLS client certificate, PEM, from the operator's CA.
    pub client_certificate_pem: String,
    /// The CA that signs the gateway's and the clients' certificates.
    pub ca_certificate_pem: String,
    pub issued_at_ms: u64,
}

impl Message for EnrolmentResponse {
    const KIND: Kind = Kind::EnrolmentResponse;

    fn check(&self) -> Result<(), Rejection> {
        limit("the terminal name", self.terminal.len(), MAX_NAME * 2)?;
        limit(
            "the client certificate",
            self.client_certificate_pem.len(),
            MAX_PEM,
        )?;
        limit("the CA certificate", self.ca_certificate_pem.len(), MAX_PEM)?;
        crate::rotation::check_anchors(&self.trust)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_names_follow_the_grammar() {
        for ok in ["ward-01", "nagoya-ward3-01", "a", "pc1.nagoya.example", "0"] {
            assert_eq!(check_terminal_name(ok), Ok(()), "{ok}");
        }
        let refused = |name: &str| check_terminal_name(name).expect_err(name);
        assert_eq!(
            refused("NAGOYA-WARD3-01"),
            "terminal name \"NAGOYA-WARD3-01\" is not valid: 'N' is not allowed (lower-case letters, digits, '-' and '.' are)"
        );
        assert_eq!(
            refused("*.nagoya.example"),
            "terminal name \"*.nagoya.example\" is not valid: '*' is not allowed (lower-case letters, digits, '-' and '.' are)"
        );
        assert!(refused("ward\u{0}01").contains("'\\0' is not allowed"));
        assert!(refused("").contains("it is empty"));
        assert!(refused("a..b").contains("empty label"));
        assert!(refused("ward.").contains("empty label"));
        assert!(refused("-ward").contains("starts or ends with '-'"));
        assert!(refused(&"a".repeat(64)).contains("longer than 63"));
        assert!(refused(&["a"; 128].join(".")).contains("longer than 253"));
    }
}

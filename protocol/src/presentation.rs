//! Presenting a security certificate to a peer (the second paper's
//! challenge-response): the peer sends a fresh random challenge; the
//! terminal answers with its certificate and a signature over that
//! challenge by its identity key, the key the certificate names. The peer
//! checks the issuer's signature and the validity period, that the answer
//! is signed by the certificate's subject and is to *its* challenge (a
//! recorded answer to an earlier one is refused), the subject it expected
//! to talk to, and the level it requires.

use serde::{Deserialize, Serialize};

use crate::certificate::{SecurityCertificate, verify_certificate};
use crate::keys::{KeyError, PublicKey, Signer};
use crate::reject::Rejection;
use crate::wire::{Kind, Message, SignedMessage, limit};

/// The largest certificate a presentation carries.
const MAX_CERTIFICATE: usize = 64 * 1024;

/// The terminal's answer to a challenge, signed by its identity key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presentation {
    pub challenge: [u8; 32],
    /// The signed certificate (a `SecurityCertificate` frame).
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
    pub presented_at_ms: u64,
}

impl Message for Presentation {
    const KIND: Kind = Kind::Presentation;

    fn check(&self) -> Result<(), Rejection> {
        limit("the certificate", self.certificate.len(), MAX_CERTIFICATE)
    }
}

/// Answer `challenge` with `certificate`, signed by the terminal's identity.
pub fn present(
    certificate: &[u8],
    challenge: [u8; 32],
    identity: &dyn Signer,
    now_ms: u64,
) -> Result<Vec<u8>, KeyError> {
    let p = Presentation {
        challenge,
        certificate: certificate.to_vec(),
        presented_at_ms: now_ms,
    };
    Ok(SignedMessage::signed(&p, identity)?.encode())
}

/// What the verifying peer requires.
#[derive(Debug, Clone)]
pub struct Requirements<'a> {
    /// The certificate issuer's public key (the operator's).
    pub issuer_key: &'a PublicKey,
    /// The terminal the peer means to talk to, when it knows.
    pub subject: Option<&'a str>,
    pub min_level: u8,
}

/// Verify an answer to `challenge`; the certificate it presented.
pub fn verify_presentation(
    bytes: &[u8],
    challenge: &[u8; 32],
    required: &Requirements<'_>,
    now_ms: u64,
) -> Result<SecurityCertificate, Rejection> {
    let frame = SignedMessage::decode(bytes, Kind::Presentation)?;
    // Opened before its signature is checked only to find the certificate,
    // which names the key that must have signed it; nothing else is used
    // until both verify.
    let presentation: Presentation = frame.open()?;
    let cert = verify_certificate(&presentation.certificate, required.issuer_key, now_ms)?;
    // Signed by another key than the one the certificate names (someone
    // else's certificate): a bad signature, not an unknown issuer.
    frame.verify_by(&cert.subject_key).map_err(|e| match e {
        Rejection::UnknownKey { .. } => Rejection::BadSignature {
            key: cert.subject_key.fingerprint(),
        },
        e => e,
    })?;
    if presentation.challenge != *challenge {
        return Err(Rejection::ChallengeMismatch);
    }
    if let Some(subject) = required.subject
        && cert.subject != subject
    {
        return Err(Rejection::WrongTerminal {
            expected: subject.to_string(),
            found: cert.subject,
        });
    }
    if cert.level < required.min_level {
        return Err(Rejection::LevelTooLow {
            level: cert.level,
            required: required.min_level,
        });
    }
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certificate::CERTIFICATE_VERSION;
    use crate::keys::{Algorithm, KeyPair};

    const NOW: u64 = 1_790_000_000_000;

    struct World {
        issuer: KeyPair,
        terminal: KeyPair,
        other: KeyPair,
    }

    fn world() -> World {
        World {
            issuer: KeyPair::generate(Algorithm::Ed25519).expect("key"),
            terminal: KeyPair::generate(Algorithm::EcdsaP256).expect("key"),
            other: KeyPair::generate(Algorithm::EcdsaP256).expect("key"),
        }
    }

    fn cert(w: &World, subject: &str, key: &KeyPair, level: u8, from: u64, to: u64) -> Vec<u8> {
        let c = SecurityCertificate {
            version: CERTIFICATE_VERSION,
            serial: [7; 16],
            issuer: "tenet-operator".into(),
            issuer_key: w.issuer.public_key().fingerprint(),
            not_before_ms: from,
            not_after_ms: to,
            subject: subject.into(),
            subject_key: key.public_key(),
            level,
        };
        SignedMessage::signed(&c, &w.issuer).expect("sign").encode()
    }

    fn check(w: &World, answer: &[u8], challenge: &[u8; 32], min_level: u8) -> Result<u8, String> {
        let issuer = w.issuer.public_key();
        let required = Requirements {
            issuer_key: &issuer,
            subject: Some("ward-01"),
            min_level,
        };
        verify_presentation(answer, challenge, &required, NOW)
            .map(|c| c.level)
            .map_err(|r| format!("{} ({})", r, r.reason()))
    }

    #[test]
    fn a_genuine_answer_verifies() {
        let w = world();
        let c = cert(&w, "ward-01", &w.terminal, 80, NOW - 1, NOW + 3_600_000);
        let answer = present(&c, [1; 32], &w.terminal, NOW).expect("present");
        assert_eq!(check(&w, &answer, &[1; 32], 70), Ok(80));
    }

    #[test]
    fn every_bad_answer_is_refused_with_its_reason() {
        let w = world();
        let good = cert(&w, "ward-01", &w.terminal, 80, NOW - 1, NOW + 3_600_000);
        let reason = |answer: Vec<u8>, challenge: [u8; 32], min: u8| {
            check(&w, &answer, &challenge, min).expect_err("refused")
        };
        let ends = |got: String, word: &str| {
            assert!(got.ends_with(&format!("({word})")), "{got}");
        };

        // A forged certificate: signed by a key that is not the issuer's.
        let by_other = {
            let c = SecurityCertificate {
                version: CERTIFICATE_VERSION,
                serial: [7; 16],
                issuer: "tenet-operator".into(),
                issuer_key: w.issuer.public_key().fingerprint(),
                not_before_ms: NOW - 1,
                not_after_ms: NOW + 3_600_000,
                subject: "ward-01".into(),
                subject_key: w.terminal.public_key(),
                level: 100,
            };
            SignedMessage::signed(&c, &w.other).expect("sign").encode()
        };
        ends(
            reason(
                present(&by_other, [1; 32], &w.terminal, NOW).expect("p"),
                [1; 32],
                0,
            ),
            "UnknownKey",
        );

        // A level the issuer never signed: the body's level raised, the
        // issuer's signature kept.
        let raised = {
            let mut frame = SignedMessage::decode(&good, crate::wire::Kind::SecurityCertificate)
                .expect("frame");
            let mut c: SecurityCertificate = frame.open().expect("certificate");
            c.level = 100;
            frame.body = crate::wire::encode(&c);
            frame.encode()
        };
        ends(
            reason(
                present(&raised, [1; 32], &w.terminal, NOW).expect("p"),
                [1; 32],
                0,
            ),
            "BadSignature",
        );

        // Another terminal's certificate, presented by this one: the answer
        // is not signed by the key the certificate names.
        let theirs = cert(&w, "ward-01", &w.other, 80, NOW - 1, NOW + 3_600_000);
        ends(
            reason(
                present(&theirs, [1; 32], &w.terminal, NOW).expect("p"),
                [1; 32],
                0,
            ),
            "BadSignature",
        );
        // ... or a genuine certificate of another terminal than the one the
        // peer meant to talk to.
        let elsewhere = cert(&w, "ward-02", &w.terminal, 80, NOW - 1, NOW + 3_600_000);
        let got = reason(
            present(&elsewhere, [1; 32], &w.terminal, NOW).expect("p"),
            [1; 32],
            0,
        );
        assert_eq!(
            got,
            "meant for terminal \"ward-02\", but this is \"ward-01\" (WrongTerminal)"
        );

        // Expired, and not yet valid.
        let old = cert(
            &w,
            "ward-01",
            &w.terminal,
            80,
            NOW - 7_200_000,
            NOW - 3_600_000,
        );
        ends(
            reason(
                present(&old, [1; 32], &w.terminal, NOW).expect("p"),
                [1; 32],
                0,
            ),
            "Expired",
        );
        let early = cert(
            &w,
            "ward-01",
            &w.terminal,
            80,
            NOW + 60_000,
            NOW + 3_600_000,
        );
        ends(
            reason(
                present(&early, [1; 32], &w.terminal, NOW).expect("p"),
                [1; 32],
                0,
            ),
            "NotYetValid",
        );

        // A replayed answer: recorded for an earlier challenge.
        let recorded = present(&good, [1; 32], &w.terminal, NOW).expect("p");
        assert_eq!(
            reason(recorded.clone(), [2; 32], 0),
            "the answer is not to this challenge (ChallengeMismatch)"
        );

        // A tampered answer (the challenge field rewritten to the new one).
        let mut tampered = recorded;
        let at = tampered
            .windows(32)
            .position(|c| c == [1; 32])
            .expect("the challenge");
        tampered[at..at + 32].copy_from_slice(&[2; 32]);
        ends(reason(tampered, [2; 32], 0), "BadSignature");

        // A level too low for this peer.
        let answer = present(&good, [1; 32], &w.terminal, NOW).expect("p");
        assert_eq!(
            reason(answer, [1; 32], 90),
            "security level 80 is below the required 90 (LevelTooLow)"
        );

        // A truncated answer.
        let answer = present(&good, [1; 32], &w.terminal, NOW).expect("p");
        ends(
            reason(answer[..answer.len() / 2].to_vec(), [1; 32], 0),
            "Malformed",
        );
    }
}

//! Whether a terminal's TPM is real: its endorsement key (EK) certificate
//! must chain to a TPM manufacturer's root the admins configured
//! (`--tpm-ca`), and credential activation must prove that the attestation
//! key (AK) the terminal registered lives in that same TPM.
//!
//! The proof (TPM 2.0 Part 1, "Credential Protection"): the operator makes
//! a credential, a random secret sealed to the EK's public key and bound to
//! the AK's name, the software half of TPM2_MakeCredential. Only a TPM
//! holding the EK's private key *and* an object with that name (with the
//! fixed AK template: restricted, fixedTPM) can recover the secret with
//! TPM2_ActivateCredential. A software key claimed as an AK, or a real EK
//! certificate copied from another machine, recovers nothing.
//!
//! Until the proof succeeds a terminal's TPM is only *claimed*: its quotes
//! count for nothing, and its security level is capped as without a TPM.

use std::path::PathBuf;

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use hmac::Mac;
use rsa::pkcs8::DecodePublicKey;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use tenet_protocol::wire::sha256;

/// How far a terminal's TPM is trusted, recorded at enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TpmTrust {
    /// The terminal enrolled without a TPM.
    None,
    /// It says it has one, but that is not proven; the reason a person reads.
    Claimed { reason: String },
    /// EK certificate verified, attestation key proven in that TPM; `ek`
    /// is the SHA-256 of the EK's SubjectPublicKeyInfo (one TPM proves one
    /// terminal).
    Proven { ek: [u8; 32] },
}

impl TpmTrust {
    pub fn proven(&self) -> bool {
        matches!(self, TpmTrust::Proven { .. })
    }
}

/// TCG's EK certificate extended key usage (tcg-kp-EKCertificate,
/// 2.23.133.8.1), required when the certificate names any.
const EK_CERTIFICATE_EKU: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];

/// The TPM manufacturers' CA certificates: self-signed ones are roots,
/// the others intermediates.
#[derive(Default)]
pub struct TpmRoots {
    roots: Vec<CertificateDer<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
}

impl TpmRoots {
    /// Read every certificate in the PEM files `paths`.
    pub fn load(paths: &[PathBuf]) -> Result<TpmRoots, String> {
        let mut out = TpmRoots::default();
        for path in paths {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate in it", path.display()));
            }
            for cert in certs {
                let parsed = x509_names(&cert)
                    .ok_or_else(|| format!("{}: a certificate does not parse", path.display()))?;
                if parsed.0 == parsed.1 {
                    out.roots.push(cert);
                } else {
                    out.intermediates.push(cert);
                }
            }
        }
        Ok(out)
    }

    /// Verify an EK certificate (DER) against the roots; its RSA public key,
    /// and the SHA-256 of its SubjectPublicKeyInfo (which TPM it is).
    pub fn verify_ek(&self, der: &[u8], now_ms: u64) -> Result<(rsa::PublicKey, [u8; 32]), String> {
        if self.roots.is_empty() {
            return Err(
                "no TPM manufacturer roots are configured (tenet operator --tpm-ca)".into(),
            );
        }
        let anchors: Vec<_> = self
            .roots
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        let cert = CertificateDer::from(der);
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| format!("the EK certificate does not parse: {e:?}"))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &self.intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_millis(now_ms)),
            webpki::KeyUsage::required_if_present(EK_CERTIFICATE_EKU),
            None,
            None,
        )
        .map_err(|e| {
            format!(
                "the EK certificate does not chain to a configured TPM manufacturer root: {e:?}"
            )
        })?;
        let spki = ee.subject_public_key_info();
        let key = rsa::PublicKey::from_public_key_der(spki.as_ref())
            .map_err(|e| format!("the EK certificate's key is not RSA: {e}"))?;
        Ok((key, sha256(spki.as_ref())))
    }
}

/// The subject and issuer of a certificate, as DER (to tell roots apart).
fn x509_names(cert: &CertificateDer<'_>) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((
        parsed.subject().as_raw().to_vec(),
        parsed.issuer().as_raw().to_vec(),
    ))
}

/// A credential for TPM2_ActivateCredential: the contents of the
/// TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET to send, and the secret the
/// TPM recovers from them.
pub struct Credential {
    pub credential_blob: Vec<u8>,
    pub secret: Vec<u8>,
    pub credential: [u8; 32],
}

/// TPM2_MakeCredential in software, for an RSA EK with the default EK
/// template (name algorithm SHA-256, AES-128-CFB): a random seed sealed to
/// the EK by RSA-OAEP with the label "IDENTITY", keys derived from it for
/// the AK's name, the credential encrypted and MACed under them.
pub fn make_credential(ek: &rsa::PublicKey, ak_name: &[u8]) -> Result<Credential, String> {
    let mut seed = [0u8; 32];
    let mut credential = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| e.to_string())?;
    getrandom::fill(&mut credential).map_err(|e| e.to_string())?;
    let secret = ek
        .encrypt(
            &mut rsa::rand_core::UnwrapErr(getrandom::SysRng),
            rsa::Oaep::<sha2::Sha256>::new_with_label(&b"IDENTITY\0"[..]),
            &seed,
        )
        .map_err(|e| format!("cannot seal the seed to the EK: {e}"))?;
    Ok(Credential {
        credential_blob: credential_blob(&seed, ak_name, &credential),
        secret,
        credential,
    })
}

/// The TPM2B_ID_OBJECT contents for `credential`, from the seed.
fn credential_blob(seed: &[u8; 32], ak_name: &[u8], credential: &[u8; 32]) -> Vec<u8> {
    let sym_key = kdfa(seed, b"STORAGE", ak_name, &[], 128);
    let hmac_key = kdfa(seed, b"INTEGRITY", &[], &[], 256);
    // The credential as a TPM2B_DIGEST, encrypted with AES-128-CFB, IV 0.
    let mut enc_identity = Vec::with_capacity(34);
    enc_identity.extend_from_slice(&(credential.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(credential);
    aes128_cfb_encrypt(&sym_key, &mut enc_identity);
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&hmac_key)
        .expect("HMAC takes any key length");
    mac.update(&enc_identity);
    mac.update(ak_name);
    let outer = mac.finalize().into_bytes();
    let mut blob = Vec::with_capacity(2 + outer.len() + enc_identity.len());
    blob.extend_from_slice(&(outer.len() as u16).to_be_bytes());
    blob.extend_from_slice(&outer);
    blob.extend_from_slice(&enc_identity);
    blob
}

/// KDFa (TPM 2.0 Part 1, 11.4.10.2) with HMAC-SHA-256: SP 800-108 counter
/// mode, the label with its terminating zero.
fn kdfa(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter = 1u32;
    while out.len() < bytes {
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(key)
            .expect("HMAC takes any key length");
        mac.update(&counter.to_be_bytes());
        mac.update(label);
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// AES-128 in CFB mode (full-block feedback) with a zero IV, in place.
fn aes128_cfb_encrypt(key: &[u8], data: &mut [u8]) {
    let cipher = aes::Aes128::new_from_slice(key).expect("a 16-byte key");
    let mut feedback = [0u8; 16];
    for chunk in data.chunks_mut(16) {
        let mut block = aes::Block::from(feedback);
        cipher.encrypt_block(&mut block);
        for (b, k) in chunk.iter_mut().zip(block.iter()) {
            *b ^= k;
        }
        feedback = [0u8; 16];
        feedback[..chunk.len()].copy_from_slice(chunk);
    }
}

/// Whether the secret a terminal sent back is the credential made for it.
pub fn activation_matches(credential: &[u8; 32], returned: &[u8]) -> bool {
    // Compared as digests: no early exit on the first differing byte.
    sha256(credential) == sha256(returned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_follows_the_counter_mode_construction() {
        // Two blocks of HMAC output for 512 bits, the second with counter 2.
        let long = kdfa(b"key", b"LABEL", b"u", b"v", 512);
        assert_eq!(long.len(), 64);
        let short = kdfa(b"key", b"LABEL", b"u", b"v", 128);
        assert_eq!(short.len(), 16);
        // The bit count is part of the input: not a prefix of the longer.
        assert_ne!(&long[..16], &short[..]);
        assert_ne!(kdfa(b"key", b"OTHER", b"u", b"v", 128), short);
    }

    #[test]
    fn cfb_round_trips_with_the_feedback_of_each_block() {
        let key = [7u8; 16];
        let mut data: Vec<u8> = (0..34).collect();
        aes128_cfb_encrypt(&key, &mut data);
        assert_ne!(data, (0..34).collect::<Vec<u8>>());
        // Decrypt: the keystream of block n is E(ciphertext of block n-1).
        let cipher = aes::Aes128::new_from_slice(&key).expect("key");
        let mut plain = data.clone();
        let mut feedback = [0u8; 16];
        for (chunk, enc) in plain.chunks_mut(16).zip(data.chunks(16)) {
            let mut block = aes::Block::from(feedback);
            cipher.encrypt_block(&mut block);
            for (b, k) in chunk.iter_mut().zip(block.iter()) {
                *b ^= k;
            }
            feedback = [0u8; 16];
            feedback[..enc.len()].copy_from_slice(enc);
        }
        assert_eq!(plain, (0..34).collect::<Vec<u8>>());
    }

    #[test]
    fn without_roots_no_ek_is_trusted() {
        assert_eq!(
            TpmRoots::default()
                .verify_ek(b"anything", 0)
                .err()
                .as_deref(),
            Some("no TPM manufacturer roots are configured (tenet operator --tpm-ca)")
        );
    }
}

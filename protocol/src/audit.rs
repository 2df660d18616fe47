//! The audit of a terminal (the second paper's internal and external
//! audit). The issuer sends a fresh nonce; the agent answers with an
//! `AuditReport` signed by its identity key: posture facts (the versions of
//! the packages the issuer asked about, whether services run, the firewall,
//! disk encryption) and, on a terminal with a TPM, a TPM2 quote over
//! selected PCRs with the issuer's nonce as qualifying data, signed by a
//! restricted attestation key registered at enrolment.
//!
//! The issuer checks the quote itself (`verify_quote`): the TPMS_ATTEST
//! structure the TPM signed is parsed here (TPM 2.0 Part 2, 10.12), its
//! signature checked with the registered key, its nonce compared with the
//! one sent, the PCR values the agent reports hashed and compared with the
//! digest the TPM signed, and those values compared with the expected ones.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bundle::MAX_NAME;
use crate::keys::PublicKey;
use crate::reject::Rejection;
use crate::wire::{Kind, Message, limit, sha256};

/// TPM_GENERATED_VALUE: every structure the TPM signs starts with it.
const TPM_GENERATED: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE.
const ST_ATTEST_QUOTE: u16 = 0x8018;
/// TPM_ALG_SHA256.
const ALG_SHA256: u16 = 0x000b;
/// PCRs a quote may select (a TPM has 24).
pub const MAX_PCR: u8 = 23;
const MAX_ATTEST: usize = 1024;
const MAX_POSTURE_ITEMS: usize = 4096;

/// One PCR of the SHA-256 bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PcrValue {
    pub index: u8,
    pub sha256: [u8; 32],
}

/// A TPM2_Quote and the PCR values it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// The marshalled TPMS_ATTEST the TPM signed.
    #[serde(with = "serde_bytes")]
    pub attest: Vec<u8>,
    /// ECDSA P-256 over SHA-256 of `attest`, `r || s`, low S.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// The values of the quoted PCRs, ascending by index.
    pub pcrs: Vec<PcrValue>,
}

/// What the terminal says of itself. Claims: the issuer compares them with
/// what it verified (the terminal's inventories and remediation reports).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posture {
    /// Version of each package asked about; `None` when not installed.
    pub packages: BTreeMap<String, Option<String>>,
    /// Whether each service asked about is running.
    pub services: BTreeMap<String, bool>,
    /// A firewall service runs (`None`: the platform does not tell).
    pub firewall: Option<bool>,
    /// The root file system is on an encrypted volume (`None`: unknown).
    pub disk_encryption: Option<bool>,
}

/// The agent's answer to an audit request, signed by its identity key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    pub terminal: String,
    /// The issuer's nonce, echoed (and inside the quote, when there is one).
    pub nonce: [u8; 32],
    pub audited_at_ms: u64,
    /// The key the terminal answers presentation challenges with: the
    /// certificate issued on this audit names it. Signed here by the
    /// identity key, which binds the two.
    pub presentation_key: PublicKey,
    pub posture: Posture,
    /// `None` on a terminal without a TPM.
    pub quote: Option<Quote>,
}

impl Message for AuditReport {
    const KIND: Kind = Kind::AuditReport;

    fn check(&self) -> Result<(), Rejection> {
        limit("the terminal name", self.terminal.len(), MAX_NAME * 2)?;
        limit(
            "the posture's packages",
            self.posture.packages.len(),
            MAX_POSTURE_ITEMS,
        )?;
        limit(
            "the posture's services",
            self.posture.services.len(),
            MAX_POSTURE_ITEMS,
        )?;
        if let Some(q) = &self.quote {
            limit("the quote", q.attest.len(), MAX_ATTEST)?;
            limit("the quoted PCRs", q.pcrs.len(), usize::from(MAX_PCR) + 1)?;
            if q.pcrs.windows(2).any(|w| w[0].index >= w[1].index)
                || q.pcrs.iter().any(|p| p.index > MAX_PCR)
            {
                return Err(Rejection::Malformed(
                    "the quoted PCRs are not distinct indices 0-23 in ascending order".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Why a quote is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("the attestation structure is malformed: {0}")]
    Malformed(String),
    #[error("the TPM did not sign it as a quote (magic or type is wrong)")]
    NotAQuote,
    #[error("the quote's signature does not verify with the terminal's attestation key")]
    BadSignature,
    #[error("the quote carries another nonce than the issuer's: a replayed or forged quote")]
    WrongNonce,
    #[error("the quote covers other PCRs than those reported: {0}")]
    WrongSelection(String),
    #[error("the reported PCR values do not hash to the digest the TPM signed")]
    PcrDigestMismatch,
    #[error("PCR {index} is {found}, expected {expected}")]
    PcrChanged {
        index: u8,
        expected: String,
        found: String,
    },
    #[error("the terminal registered no attestation key")]
    NoAttestationKey,
}

impl QuoteError {
    pub fn reason(&self) -> &'static str {
        match self {
            QuoteError::Malformed(_) => "QuoteMalformed",
            QuoteError::NotAQuote => "NotAQuote",
            QuoteError::BadSignature => "QuoteBadSignature",
            QuoteError::WrongNonce => "QuoteWrongNonce",
            QuoteError::WrongSelection(_) => "QuoteWrongSelection",
            QuoteError::PcrDigestMismatch => "PcrDigestMismatch",
            QuoteError::PcrChanged { .. } => "PcrChanged",
            QuoteError::NoAttestationKey => "NoAttestationKey",
        }
    }
}

/// The fields of a quote's TPMS_ATTEST the issuer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteInfo {
    pub extra_data: Vec<u8>,
    /// TPM clock (ms) and how often the TPM was reset and restarted.
    pub clock_ms: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    /// (hash algorithm, selected PCR indices) per bank.
    pub selection: Vec<(u16, Vec<u8>)>,
    pub pcr_digest: Vec<u8>,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], QuoteError> {
        if self.0.len() < n {
            return Err(QuoteError::Malformed("truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, QuoteError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, QuoteError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or([0; 2]),
        ))
    }
    fn u32(&mut self) -> Result<u32, QuoteError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self) -> Result<u64, QuoteError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn sized(&mut self) -> Result<Vec<u8>, QuoteError> {
        let n = usize::from(self.u16()?);
        Ok(self.take(n)?.to_vec())
    }
}

/// Parse a marshalled TPMS_ATTEST of type quote.
pub fn parse_quote(attest: &[u8]) -> Result<QuoteInfo, QuoteError> {
    let mut r = Reader(attest);
    if r.u32()? != TPM_GENERATED || r.u16()? != ST_ATTEST_QUOTE {
        return Err(QuoteError::NotAQuote);
    }
    let _qualified_signer = r.sized()?;
    let extra_data = r.sized()?;
    let clock_ms = r.u64()?;
    let reset_count = r.u32()?;
    let restart_count = r.u32()?;
    let _safe = r.u8()?;
    let _firmware = r.u64()?;
    let banks = r.u32()?;
    if banks > 16 {
        return Err(QuoteError::Malformed(format!("{banks} PCR banks")));
    }
    let mut selection = Vec::new();
    for _ in 0..banks {
        let alg = r.u16()?;
        let size = usize::from(r.u8()?);
        let bits = r.take(size)?;
        let indices = bits
            .iter()
            .enumerate()
            .flat_map(|(byte, b)| {
                (0..8u8)
                    .filter(move |bit| b & (1 << bit) != 0)
                    .map(move |bit| (byte as u8) * 8 + bit)
            })
            .collect();
        selection.push((alg, indices));
    }
    let pcr_digest = r.sized()?;
    if !r.0.is_empty() {
        return Err(QuoteError::Malformed("trailing bytes".into()));
    }
    Ok(QuoteInfo {
        extra_data,
        clock_ms,
        reset_count,
        restart_count,
        selection,
        pcr_digest,
    })
}

/// The digest a TPM computes over PCR values: SHA-256 of their
/// concatenation in selection order.
pub fn pcr_digest(pcrs: &[PcrValue]) -> [u8; 32] {
    let mut all = Vec::with_capacity(pcrs.len() * 32);
    for p in pcrs {
        all.extend_from_slice(&p.sha256);
    }
    sha256(&all)
}

/// Verify a quote: signed by `attestation_key` (the terminal's registered
/// one), over `nonce`, covering exactly the reported PCRs with the values
/// reported, and those equal to `expected` (when given: the baseline).
pub fn verify_quote(
    quote: &Quote,
    attestation_key: &PublicKey,
    nonce: &[u8; 32],
    expected: Option<&[PcrValue]>,
) -> Result<QuoteInfo, QuoteError> {
    if !matches!(attestation_key, PublicKey::EcdsaP256(_))
        || !attestation_key.verify(&quote.attest, &quote.signature)
    {
        return Err(QuoteError::BadSignature);
    }
    let info = parse_quote(&quote.attest)?;
    if info.extra_data != nonce {
        return Err(QuoteError::WrongNonce);
    }
    let reported: Vec<u8> = quote.pcrs.iter().map(|p| p.index).collect();
    match info.selection.as_slice() {
        [(ALG_SHA256, quoted)] if *quoted == reported => {}
        other => {
            return Err(QuoteError::WrongSelection(format!(
                "quoted {other:?}, reported SHA-256 PCRs {reported:?}"
            )));
        }
    }
    if info.pcr_digest != pcr_digest(&quote.pcrs) {
        return Err(QuoteError::PcrDigestMismatch);
    }
    if let Some(expected) = expected {
        for e in expected {
            let found = quote.pcrs.iter().find(|p| p.index == e.index);
            if found.map(|f| f.sha256) != Some(e.sha256) {
                return Err(QuoteError::PcrChanged {
                    index: e.index,
                    expected: hex::encode(e.sha256),
                    found: found.map_or("not quoted".into(), |f| hex::encode(f.sha256)),
                });
            }
        }
    }
    Ok(info)
}

/// Marshal a TPMS_ATTEST of type quote, as a TPM does. Anyone can make
/// one and sign it with a software key: a quote proves something only when
/// its attestation key was proven to live in a TPM (credential activation
/// at enrolment). The tests use it to forge quotes.
pub fn marshal_quote(extra_data: &[u8], pcrs: &[PcrValue], clock_ms: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&TPM_GENERATED.to_be_bytes());
    out.extend_from_slice(&ST_ATTEST_QUOTE.to_be_bytes());
    let signer = [0u8; 34];
    out.extend_from_slice(&(signer.len() as u16).to_be_bytes());
    out.extend_from_slice(&signer);
    out.extend_from_slice(&(extra_data.len() as u16).to_be_bytes());
    out.extend_from_slice(extra_data);
    out.extend_from_slice(&clock_ms.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.push(1);
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&ALG_SHA256.to_be_bytes());
    out.push(3);
    let mut bits = [0u8; 3];
    for p in pcrs {
        bits[usize::from(p.index / 8)] |= 1 << (p.index % 8);
    }
    out.extend_from_slice(&bits);
    let digest = pcr_digest(pcrs);
    out.extend_from_slice(&(digest.len() as u16).to_be_bytes());
    out.extend_from_slice(&digest);
    out
}

/// The marshalled TPMT_PUBLIC of the attestation key the agent derives
/// for `key`: its fixed template (ECDSA P-256 over SHA-256, restricted
/// signing, fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, no
/// policy) with the point filled in. What the TPM hashes into the key's
/// name; `None` for a key that is not P-256.
pub fn attestation_key_public_area(key: &PublicKey) -> Option<Vec<u8>> {
    let PublicKey::EcdsaP256(k) = key else {
        return None;
    };
    let point = k.to_sec1_point(false);
    let xy = point.as_bytes().get(1..65)?;
    let mut out = Vec::with_capacity(92);
    let u16be = |out: &mut Vec<u8>, v: u16| out.extend_from_slice(&v.to_be_bytes());
    u16be(&mut out, 0x0023); // type: TPM_ALG_ECC
    u16be(&mut out, 0x000B); // nameAlg: TPM_ALG_SHA256
    // fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | sign
    out.extend_from_slice(&0x0005_0072u32.to_be_bytes());
    u16be(&mut out, 0); // authPolicy: empty
    u16be(&mut out, 0x0010); // symmetric: TPM_ALG_NULL
    u16be(&mut out, 0x0018); // scheme: TPM_ALG_ECDSA
    u16be(&mut out, 0x000B); //   with SHA-256
    u16be(&mut out, 0x0003); // curve: TPM_ECC_NIST_P256
    u16be(&mut out, 0x0010); // kdf: TPM_ALG_NULL
    for half in [&xy[..32], &xy[32..]] {
        u16be(&mut out, 32);
        out.extend_from_slice(half);
    }
    Some(out)
}

/// The TPM name of the attestation key for `key`: the name algorithm
/// (SHA-256) and the digest of its public area. Credential activation
/// binds a secret to it.
pub fn attestation_key_name(key: &PublicKey) -> Option<Vec<u8>> {
    let area = attestation_key_public_area(key)?;
    let mut name = vec![0x00, 0x0B];
    name.extend_from_slice(&sha256(&area));
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Algorithm, KeyPair, Signer};

    fn pcrs(seed: u8) -> Vec<PcrValue> {
        (0..8)
            .map(|i| PcrValue {
                index: i,
                sha256: [seed.wrapping_add(i); 32],
            })
            .collect()
    }

    fn quote(ak: &KeyPair, nonce: &[u8; 32], values: &[PcrValue]) -> Quote {
        let attest = marshal_quote(nonce, values, 42);
        let signature = ak.sign(&attest).expect("sign");
        Quote {
            attest,
            signature,
            pcrs: values.to_vec(),
        }
    }

    #[test]
    fn a_good_quote_verifies_and_parses() {
        let ak = KeyPair::generate(Algorithm::EcdsaP256).expect("ak");
        let q = quote(&ak, &[7; 32], &pcrs(0));
        let info = verify_quote(&q, &ak.public_key(), &[7; 32], Some(&pcrs(0))).expect("verifies");
        assert_eq!(info.clock_ms, 42);
        assert_eq!(info.selection, vec![(ALG_SHA256, (0..8).collect())]);
    }

    #[test]
    fn each_bad_quote_is_refused_with_its_reason() {
        let ak = KeyPair::generate(Algorithm::EcdsaP256).expect("ak");
        let ak_pub = ak.public_key();
        let good = quote(&ak, &[7; 32], &pcrs(0));

        // Another nonce: an old quote replayed.
        assert_eq!(
            verify_quote(&good, &ak_pub, &[8; 32], None),
            Err(QuoteError::WrongNonce)
        );
        // Signed by another key.
        let other = KeyPair::generate(Algorithm::EcdsaP256).expect("other");
        assert_eq!(
            verify_quote(&good, &other.public_key(), &[7; 32], None),
            Err(QuoteError::BadSignature)
        );
        // An Ed25519 key is never an attestation key.
        let ed = KeyPair::generate(Algorithm::Ed25519).expect("ed");
        assert_eq!(
            verify_quote(&good, &ed.public_key(), &[7; 32], None),
            Err(QuoteError::BadSignature)
        );
        // The attest changed after signing.
        let mut tampered = good.clone();
        tampered.attest[40] ^= 1;
        assert_eq!(
            verify_quote(&tampered, &ak_pub, &[7; 32], None),
            Err(QuoteError::BadSignature)
        );
        // Values reported other than those the TPM hashed.
        let mut lying = good.clone();
        lying.pcrs[3].sha256 = [0xee; 32];
        assert_eq!(
            verify_quote(&lying, &ak_pub, &[7; 32], None),
            Err(QuoteError::PcrDigestMismatch)
        );
        // Fewer PCRs reported than quoted.
        let mut fewer = good.clone();
        fewer.pcrs.pop();
        assert!(matches!(
            verify_quote(&fewer, &ak_pub, &[7; 32], None),
            Err(QuoteError::WrongSelection(_))
        ));
        // Genuine, but PCR 7 differs from the baseline (the boot changed).
        let mut changed = pcrs(0);
        changed[7].sha256 = [0xab; 32];
        let q = quote(&ak, &[7; 32], &changed);
        let err = verify_quote(&q, &ak_pub, &[7; 32], Some(&pcrs(0))).expect_err("changed");
        assert_eq!(err.reason(), "PcrChanged");
        assert!(err.to_string().starts_with("PCR 7 is abab"), "{err}");
        // Not a quote at all (a signed blob of the AK's that is no TPMS_ATTEST).
        let blob = b"anything".to_vec();
        let q = Quote {
            signature: ak.sign(&blob).expect("sign"),
            attest: blob,
            pcrs: vec![],
        };
        assert_eq!(
            verify_quote(&q, &ak_pub, &[7; 32], None),
            Err(QuoteError::NotAQuote)
        );
        // Truncated.
        assert!(matches!(
            parse_quote(&good.attest[..good.attest.len() - 5]),
            Err(QuoteError::Malformed(_))
        ));
    }
}

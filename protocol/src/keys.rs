//! Signing keys, public keys and their fingerprints.
//!
//! Two algorithms: Ed25519 (software keys: the operator, admins, simulated
//! terminals) and ECDSA P-256 (what a TPM can hold). Private keys are stored
//! as PKCS#8 PEM, public keys as SubjectPublicKeyInfo PEM: the standard
//! formats, readable by `openssl pkey`. Private key files are written 0600
//! and are never printed; `Debug` on a key shows its fingerprint only.

use std::fmt;
use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use p256::pkcs8::LineEnding;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Algorithm {
    Ed25519,
    /// ECDSA over P-256 with SHA-256; signatures are 64 bytes `r || s`, low-S.
    EcdsaP256,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256 => "ecdsa-p256",
        }
    }

    pub fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "ed25519" => Some(Algorithm::Ed25519),
            "ecdsa-p256" | "p256" => Some(Algorithm::EcdsaP256),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// SHA-256 of a public key's algorithm name and bytes: how keys are named
/// in signatures, pins and logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn parse(text: &str) -> Option<Fingerprint> {
        let text = text.strip_prefix("sha256:").unwrap_or(text);
        let bytes = hex::decode(text).ok()?;
        Some(Fingerprint(bytes.try_into().ok()?))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form: enough to tell keys apart in logs and test output.
        write!(f, "Fingerprint({})", &hex::encode(self.0)[..16])
    }
}

/// A public key.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    EcdsaP256(p256::ecdsa::VerifyingKey),
}

/// The serialised form: algorithm and raw bytes (32 for Ed25519, 33-byte
/// compressed SEC1 for P-256).
#[derive(Serialize, Deserialize)]
struct PublicKeyWire {
    algorithm: Algorithm,
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PublicKeyWire {
            algorithm: self.algorithm(),
            bytes: self.to_bytes(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = PublicKeyWire::deserialize(d)?;
        PublicKey::from_bytes(wire.algorithm, &wire.bytes).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey({}, {:?})",
            self.algorithm(),
            self.fingerprint()
        )
    }
}

/// Why a key cannot be read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a valid {algorithm} public key")]
    BadPublicKey { algorithm: Algorithm },
    #[error("{path}: cannot read the key file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write the key file: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a PKCS#8 PEM private key of a supported algorithm (ed25519, ecdsa-p256)")]
    BadPrivateKeyFile { path: String },
    #[error("{path}: not a PEM public key of a supported algorithm (ed25519, ecdsa-p256)")]
    BadPublicKeyFile { path: String },
    #[error("{path}: the private key file is readable by others (mode {mode:o}); chmod 600 it")]
    Permissions { path: String, mode: u32 },
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

impl PublicKey {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            PublicKey::Ed25519(_) => Algorithm::Ed25519,
            PublicKey::EcdsaP256(_) => Algorithm::EcdsaP256,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            PublicKey::Ed25519(k) => k.to_bytes().to_vec(),
            PublicKey::EcdsaP256(k) => k.to_sec1_point(true).as_bytes().to_vec(),
        }
    }

    pub fn from_bytes(algorithm: Algorithm, bytes: &[u8]) -> Result<PublicKey, KeyError> {
        let bad = || KeyError::BadPublicKey { algorithm };
        match algorithm {
            Algorithm::Ed25519 => {
                let arr: &[u8; 32] = bytes.try_into().map_err(|_| bad())?;
                ed25519_dalek::VerifyingKey::from_bytes(arr)
                    .map(PublicKey::Ed25519)
                    .map_err(|_| bad())
            }
            Algorithm::EcdsaP256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
                .map(PublicKey::EcdsaP256)
                .map_err(|_| bad()),
        }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(self.algorithm().name().as_bytes());
        h.update([0u8]);
        h.update(self.to_bytes());
        Fingerprint(h.finalize().into())
    }

    /// Check `signature` over `message`. Ed25519 uses strict verification
    /// (no malleable or small-order encodings); ECDSA refuses high-S
    /// signatures, so every signature has one encoding.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            PublicKey::Ed25519(k) => {
                let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
                    return false;
                };
                k.verify_strict(message, &sig).is_ok()
            }
            PublicKey::EcdsaP256(k) => {
                use p256::ecdsa::signature::Verifier;
                let Ok(sig) = p256::ecdsa::Signature::from_slice(signature) else {
                    return false;
                };
                if sig.normalize_s() != sig {
                    return false;
                }
                k.verify(message, &sig).is_ok()
            }
        }
    }

    /// SubjectPublicKeyInfo PEM.
    pub fn to_pem(&self) -> String {
        let pem = match self {
            PublicKey::Ed25519(k) => k.to_public_key_pem(LineEnding::LF),
            PublicKey::EcdsaP256(k) => k.to_public_key_pem(LineEnding::LF),
        };
        // Encoding a valid key cannot fail.
        pem.unwrap_or_default()
    }

    pub fn from_pem(pem: &str) -> Option<PublicKey> {
        if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(pem) {
            return Some(PublicKey::Ed25519(k));
        }
        p256::ecdsa::VerifyingKey::from_public_key_pem(pem)
            .ok()
            .map(PublicKey::EcdsaP256)
    }

    pub fn read_pem_file(path: &Path) -> Result<PublicKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        PublicKey::from_pem(&text).ok_or_else(|| KeyError::BadPublicKeyFile {
            path: path.display().to_string(),
        })
    }
}

/// Something that signs: a key in memory, or one held in a TPM (the agent
/// implements this for its TPM key).
pub trait Signer {
    fn public_key(&self) -> PublicKey;
    /// Sign `message` (the whole domain-separated signing input).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError>;
}

/// A private key held in memory.
pub enum KeyPair {
    Ed25519(ed25519_dalek::SigningKey),
    EcdsaP256(p256::ecdsa::SigningKey),
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private key.
        write!(
            f,
            "KeyPair({}, {:?})",
            self.public_key().algorithm(),
            self.public_key().fingerprint()
        )
    }
}

fn random_32() -> Result<[u8; 32], KeyError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(b)
}

/// 32 bytes from the operating system's CSPRNG (nonces, serials, tokens).
pub fn random_bytes() -> Result<[u8; 32], KeyError> {
    random_32()
}

impl KeyPair {
    /// A new key from the operating system's CSPRNG.
    pub fn generate(algorithm: Algorithm) -> Result<KeyPair, KeyError> {
        match algorithm {
            Algorithm::Ed25519 => Ok(KeyPair::Ed25519(ed25519_dalek::SigningKey::from_bytes(
                &random_32()?,
            ))),
            Algorithm::EcdsaP256 => loop {
                // A random 32-byte string is a valid scalar with probability
                // 1 - 2^-32; draw again otherwise.
                if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&random_32()?) {
                    return Ok(KeyPair::EcdsaP256(k));
                }
            },
        }
    }

    /// A key from a 32-byte seed: for tests and simulations that need many
    /// reproducible keys, never for real ones.
    pub fn from_seed(algorithm: Algorithm, seed: [u8; 32]) -> Option<KeyPair> {
        match algorithm {
            Algorithm::Ed25519 => Some(KeyPair::Ed25519(ed25519_dalek::SigningKey::from_bytes(
                &seed,
            ))),
            Algorithm::EcdsaP256 => p256::ecdsa::SigningKey::from_slice(&seed)
                .ok()
                .map(KeyPair::EcdsaP256),
        }
    }

    /// PKCS#8 PEM. Handle with care: this is the secret.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let pem = match self {
            KeyPair::Ed25519(k) => k.to_pkcs8_pem(LineEnding::LF),
            KeyPair::EcdsaP256(k) => k.to_pkcs8_pem(LineEnding::LF),
        };
        pem.map(|p| p.to_string())
            .map_err(|e| KeyError::Sign(e.to_string()))
    }

    pub fn from_pkcs8_pem(pem: &str) -> Option<KeyPair> {
        if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            return Some(KeyPair::Ed25519(k));
        }
        p256::ecdsa::SigningKey::from_pkcs8_pem(pem)
            .ok()
            .map(KeyPair::EcdsaP256)
    }

    /// Write the private key to `path` with mode 0600 (created so; an
    /// existing file is refused, never overwritten) and the public key to
    /// `path.pub`.
    pub fn write_files(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let werr = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(werr)?;
        f.write_all(self.to_pkcs8_pem()?.as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        let pub_path = public_key_path(path);
        std::fs::write(&pub_path, self.public_key().to_pem()).map_err(|source| KeyError::Write {
            path: pub_path.display().to_string(),
            source,
        })
    }

    /// Read a private key file, refusing one that others can read.
    pub fn read_file(path: &Path) -> Result<KeyPair, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = || path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: shown(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: shown(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: shown(),
            source,
        })?;
        KeyPair::from_pkcs8_pem(&text).ok_or_else(|| KeyError::BadPrivateKeyFile { path: shown() })
    }
}

/// `KEY.pub` beside `KEY`.
pub fn public_key_path(private: &Path) -> std::path::PathBuf {
    let mut p = private.as_os_str().to_owned();
    p.push(".pub");
    p.into()
}

impl Signer for KeyPair {
    fn public_key(&self) -> PublicKey {
        match self {
            KeyPair::Ed25519(k) => PublicKey::Ed25519(k.verifying_key()),
            KeyPair::EcdsaP256(k) => PublicKey::EcdsaP256(*k.verifying_key()),
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match self {
            KeyPair::Ed25519(k) => {
                use ed25519_dalek::Signer as _;
                Ok(k.sign(message).to_bytes().to_vec())
            }
            KeyPair::EcdsaP256(k) => {
                use p256::ecdsa::signature::Signer as _;
                let sig: p256::ecdsa::Signature = k.sign(message);
                let sig = sig.normalize_s();
                Ok(sig.to_bytes().to_vec())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        for alg in [Algorithm::Ed25519, Algorithm::EcdsaP256] {
            let k = KeyPair::generate(alg).expect("key");
            let path = dir.path().join(alg.name());
            k.write_files(&path).expect("written");
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let back = KeyPair::read_file(&path).expect("read back");
            assert_eq!(back.public_key(), k.public_key());
            let public = PublicKey::read_pem_file(&public_key_path(&path)).expect("pub");
            assert_eq!(public.fingerprint(), k.public_key().fingerprint());
            // Never overwritten.
            assert!(k.write_files(&path).is_err());
            let sig = k.sign(b"message").expect("signs");
            assert!(public.verify(b"message", &sig));
            assert!(!public.verify(b"messagf", &sig));
            assert!(!format!("{k:?}").contains(&k.to_pkcs8_pem().expect("pem")[30..60]));
        }
    }

    #[test]
    fn a_private_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        KeyPair::generate(Algorithm::Ed25519)
            .expect("key")
            .write_files(&path)
            .expect("written");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = KeyPair::read_file(&path).expect_err("refused");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: the private key file is readable by others (mode 644); chmod 600 it",
                path.display()
            )
        );
    }

    #[test]
    fn high_s_ecdsa_signatures_are_refused() {
        let k = KeyPair::generate(Algorithm::EcdsaP256).expect("key");
        let sig = k.sign(b"m").expect("sign");
        let parsed = p256::ecdsa::Signature::from_slice(&sig).expect("sig");
        let (r, s) = parsed.split_scalars();
        let high = p256::ecdsa::Signature::from_scalars(r, -*s).expect("high-s");
        assert!(k.public_key().verify(b"m", &sig));
        assert!(!k.public_key().verify(b"m", &high.to_bytes()));
    }
}

//! The agent's identity key held in a TPM: ECDSA P-256, created as a
//! primary key under the owner hierarchy from a fixed template, so the TPM
//! derives the same key on every start without storing anything, and the
//! private key never leaves the TPM. The TCTI comes from the configuration
//! (`device:/dev/tpmrm0` on a real terminal, `swtpm:host=127.0.0.1,port=2321`
//! in tests). A software TPM is announced with a loud warning.

use std::cell::RefCell;
use std::str::FromStr;

use tenet_protocol::keys::KeyError;
use tenet_protocol::wire::sha256;
use tenet_protocol::{PublicKey, Signer};
use tss_esapi::constants::PropertyTag;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, EccScheme, HashScheme, Signature, SignatureScheme};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::utils::{PublicKey as TpmPublicKey, create_unrestricted_signing_ecc_public};
use tss_esapi::{Context, TctiNameConf};

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("TPM TCTI {tcti:?}: {message}")]
    Tcti { tcti: String, message: String },
    #[error("TPM {operation}: {source}")]
    Tss {
        operation: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("the TPM returned a key that is not a P-256 point")]
    BadKey,
}

pub struct TpmIdentity {
    context: RefCell<Context>,
    key: KeyHandle,
    public: PublicKey,
    /// The manufacturer the TPM reports (`IBM ` for libtpms/swtpm).
    pub manufacturer: String,
}

/// TCTIs and manufacturers of software TPMs.
fn is_software(tcti: &str, manufacturer: &str) -> bool {
    tcti.starts_with("swtpm") || tcti.starts_with("mssim") || manufacturer.trim() == "IBM"
}

impl TpmIdentity {
    /// Connect to the TPM and derive the identity key.
    pub fn open(tcti: &str) -> Result<TpmIdentity, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| TpmError::Tcti {
            tcti: tcti.into(),
            message: e.to_string(),
        })?;
        let mut context = Context::new(conf).map_err(|e| TpmError::Tcti {
            tcti: tcti.into(),
            message: format!("cannot open the TPM ({e}); check that the TPM or swtpm is running and the TCTI names it"),
        })?;
        let template = create_unrestricted_signing_ecc_public(
            EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
            EccCurve::NistP256,
        )
        .map_err(|source| TpmError::Tss {
            operation: "key template",
            source,
        })?;
        let created = context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|source| TpmError::Tss {
                operation: "create primary key",
                source,
            })?;
        let public = match TpmPublicKey::try_from(created.out_public) {
            Ok(TpmPublicKey::Ecc { x, y }) if x.len() <= 32 && y.len() <= 32 => {
                let mut sec1 = vec![4u8];
                sec1.extend(std::iter::repeat_n(0, 32 - x.len()));
                sec1.extend_from_slice(&x);
                sec1.extend(std::iter::repeat_n(0, 32 - y.len()));
                sec1.extend_from_slice(&y);
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map(PublicKey::EcdsaP256)
                    .map_err(|_| TpmError::BadKey)?
            }
            _ => return Err(TpmError::BadKey),
        };
        let manufacturer = context
            .get_tpm_property(PropertyTag::Manufacturer)
            .ok()
            .flatten()
            .map(|m| String::from_utf8_lossy(&m.to_be_bytes()).into_owned())
            .unwrap_or_default();
        if is_software(tcti, &manufacturer) {
            eprintln!(
                "WARNING: the TPM at {tcti:?} is a software TPM (manufacturer {:?}): the identity key is NOT protected by hardware. Use it for tests only.",
                manufacturer.trim()
            );
        }
        Ok(TpmIdentity {
            context: RefCell::new(context),
            key: created.key_handle,
            public,
            manufacturer,
        })
    }
}

impl Signer for TpmIdentity {
    fn public_key(&self) -> PublicKey {
        self.public.clone()
    }

    /// ECDSA over SHA-256 of `message`, computed in the TPM; returned as the
    /// 64-byte low-S `r || s` the protocol expects.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let digest = Digest::try_from(sha256(message).to_vec())
            .map_err(|e| KeyError::Sign(e.to_string()))?;
        let validation = TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        };
        let validation = validation
            .try_into()
            .map_err(|e: tss_esapi::Error| KeyError::Sign(e.to_string()))?;
        let mut ctx = self
            .context
            .try_borrow_mut()
            .map_err(|_| KeyError::Sign("the TPM context is busy".into()))?;
        let key = self.key;
        let signature = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.sign(key, digest, SignatureScheme::Null, validation)
            })
            .map_err(|e| KeyError::Sign(format!("TPM sign: {e}")))?;
        let Signature::EcDsa(ecc) = signature else {
            return Err(KeyError::Sign(
                "the TPM returned a non-ECDSA signature".into(),
            ));
        };
        let (r, s) = (ecc.signature_r().value(), ecc.signature_s().value());
        if r.len() > 32 || s.len() > 32 {
            return Err(KeyError::Sign(
                "the TPM returned an oversized signature".into(),
            ));
        }
        let mut rs = [0u8; 64];
        rs[32 - r.len()..32].copy_from_slice(r);
        rs[64 - s.len()..].copy_from_slice(s);
        let sig =
            p256::ecdsa::Signature::from_slice(&rs).map_err(|e| KeyError::Sign(e.to_string()))?;
        Ok(sig.normalize_s().to_bytes().to_vec())
    }
}

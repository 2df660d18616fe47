//! The agent's identity key held in a TPM: ECDSA P-256, created as a
//! primary key under the owner hierarchy from a fixed template, so the TPM
//! derives the same key on every start without storing anything, and the
//! private key never leaves the TPM. The TCTI comes from the configuration
//! (`device:/dev/tpmrm0` on a real terminal, `swtpm:host=127.0.0.1,port=2321`
//! in tests). A software TPM is announced with a loud warning.

use std::cell::RefCell;
use std::str::FromStr;

use tenet_protocol::audit::{PcrValue, Quote};
use tenet_protocol::keys::KeyError;
use tenet_protocol::wire::sha256;
use tenet_protocol::{PublicKey, Signer};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::PropertyTag;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::handles::PcrHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::algorithm::PublicAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Data, Digest, DigestValues, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme,
    PcrSelectionList, PcrSelectionListBuilder, PcrSlot, PublicBuilder, PublicEccParametersBuilder,
    Signature, SignatureScheme,
};
use tss_esapi::traits::Marshall;
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
    #[error("the TPM is busy with another command")]
    Busy,
    #[error("PCRs: {0}")]
    Pcrs(String),
}

pub struct TpmIdentity {
    context: RefCell<Context>,
    key: KeyHandle,
    public: PublicKey,
    /// The restricted attestation key's public half, once derived. The key
    /// itself is loaded only for the quote that needs it and flushed right
    /// after: a TPM holds three or so transient objects, and without a
    /// resource manager (swtpm over TCP) a killed process never frees its.
    attestation: RefCell<Option<PublicKey>>,
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
        let public = p256_public(created.out_public)?;
        let manufacturer = context
            .get_tpm_property(PropertyTag::Manufacturer)
            .ok()
            .flatten()
            .map(|m| String::from_utf8_lossy(&m.to_be_bytes()).into_owned())
            .unwrap_or_default();
        if is_software(tcti, &manufacturer) {
            tracing::warn!(
                tcti = %tcti,
                manufacturer = manufacturer.trim_matches(|c: char| c == '\0' || c.is_whitespace()),
                "a software TPM: the identity key is NOT protected by hardware; use it for tests only"
            );
        }
        Ok(TpmIdentity {
            context: RefCell::new(context),
            key: created.key_handle,
            public,
            attestation: RefCell::new(None),
            manufacturer,
        })
    }

    fn tss<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> Result<T, TpmError> {
        let mut ctx = self.context.try_borrow_mut().map_err(|_| TpmError::Busy)?;
        f(&mut ctx).map_err(|source| TpmError::Tss { operation, source })
    }

    /// The attestation key: ECDSA P-256, *restricted* (the TPM signs with
    /// it only structures it made itself, such as quotes, never outside
    /// data that could pass for one), a primary key from a fixed template
    /// under the endorsement hierarchy, so the same key on every start.
    pub fn attestation_key(&self) -> Result<PublicKey, TpmError> {
        if let Some(k) = self.attestation.borrow().as_ref() {
            return Ok(k.clone());
        }
        let (handle, public) = self.load_attestation_key()?;
        self.flush(handle);
        Ok(public)
    }

    fn flush(&self, handle: KeyHandle) {
        if let Ok(mut ctx) = self.context.try_borrow_mut() {
            let _ = ctx.flush_context(handle.into());
        }
    }

    /// Derive and load the attestation key; the caller flushes it.
    fn load_attestation_key(&self) -> Result<(KeyHandle, PublicKey), TpmError> {
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .with_restricted(true)
            .build()
            .map_err(|source| TpmError::Tss {
                operation: "attestation key template",
                source,
            })?;
        let params = PublicEccParametersBuilder::new()
            .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
            .with_curve(EccCurve::NistP256)
            .with_is_signing_key(true)
            .with_restricted(true)
            .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
            .build()
            .map_err(|source| TpmError::Tss {
                operation: "attestation key template",
                source,
            })?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_ecc_parameters(params)
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(|source| TpmError::Tss {
                operation: "attestation key template",
                source,
            })?;
        let created = self.tss("create the attestation key", |ctx| {
            ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
        })?;
        let public = match p256_public(created.out_public) {
            Ok(p) => p,
            Err(e) => {
                self.flush(created.key_handle);
                return Err(e);
            }
        };
        *self.attestation.borrow_mut() = Some(public.clone());
        Ok((created.key_handle, public))
    }

    /// The TPM's RSA 2048 endorsement key certificate (DER) as its maker
    /// wrote it to NV index 0x01c00002; `None` when it holds none.
    pub fn ek_certificate(&self) -> Option<Vec<u8>> {
        use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
        use tss_esapi::interface_types::key_bits::RsaKeyBits;
        self.tss("read the EK certificate", |ctx| {
            tss_esapi::abstraction::ek::retrieve_ek_pubcert(
                ctx,
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            )
        })
        .ok()
    }

    /// TPM2_ActivateCredential: recover the secret an issuer sealed to this
    /// TPM's endorsement key (RSA 2048, default template) for the
    /// attestation key's name. Works only if both keys are in this TPM.
    pub fn activate_credential(
        &self,
        credential_blob: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>, TpmError> {
        use tss_esapi::abstraction::ek::create_ek_object_2;
        use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey};
        use tss_esapi::constants::SessionType;
        use tss_esapi::handles::AuthHandle;
        use tss_esapi::interface_types::key_bits::RsaKeyBits;
        use tss_esapi::interface_types::session_handles::PolicySession;
        use tss_esapi::structures::{EncryptedSecret, IdObject, SymmetricDefinition};

        let blob =
            IdObject::try_from(credential_blob.to_vec()).map_err(|source| TpmError::Tss {
                operation: "read the credential",
                source,
            })?;
        let secret =
            EncryptedSecret::try_from(secret.to_vec()).map_err(|source| TpmError::Tss {
                operation: "read the credential's secret",
                source,
            })?;
        let (ak, _) = self.load_attestation_key()?;
        let ek = match self.tss("create the endorsement key", |ctx| {
            create_ek_object_2(
                ctx,
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                DefaultKey,
            )
        }) {
            Ok(ek) => ek,
            Err(e) => {
                self.flush(ak);
                return Err(e);
            }
        };
        // The EK's policy: PolicySecret on the endorsement hierarchy.
        let activated = self.tss("activate the credential", |ctx| {
            let session = ctx
                .start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )?
                .ok_or(tss_esapi::Error::WrapperError(
                    tss_esapi::WrapperErrorKind::WrongValueFromTpm,
                ))?;
            let result = (|| {
                let policy = PolicySession::try_from(session)?;
                ctx.execute_with_session(Some(AuthSession::Password), |c| {
                    c.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })?;
                ctx.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                    c.activate_credential(ak, ek, blob, secret)
                })
            })();
            let handle = tss_esapi::handles::SessionHandle::from(session);
            let _ = ctx.flush_context(handle.into());
            result
        });
        self.flush(ek);
        self.flush(ak);
        Ok(activated?.value().to_vec())
    }

    /// The SHA-256 bank's values of `pcrs` (at most 8, ascending).
    pub fn read_pcrs(&self, pcrs: &[u8]) -> Result<Vec<PcrValue>, TpmError> {
        let selection = selection(pcrs)?;
        let (_, _, digests) = self.tss("read PCRs", |ctx| ctx.pcr_read(selection))?;
        let values = digests.value();
        if values.len() != pcrs.len() {
            return Err(TpmError::Pcrs(format!(
                "asked for {} PCRs, the TPM returned {}",
                pcrs.len(),
                values.len()
            )));
        }
        let mut out = Vec::with_capacity(pcrs.len());
        for (index, d) in pcrs.iter().zip(values) {
            let sha256: [u8; 32] = d
                .value()
                .try_into()
                .map_err(|_| TpmError::Pcrs("a PCR value is not 32 bytes".into()))?;
            out.push(PcrValue {
                index: *index,
                sha256,
            });
        }
        Ok(out)
    }

    /// A quote over `pcrs` with `nonce` as qualifying data, signed by the
    /// attestation key, and the values quoted.
    pub fn quote(&self, nonce: &[u8; 32], pcrs: &[u8]) -> Result<Quote, TpmError> {
        let mut pcrs = pcrs.to_vec();
        pcrs.sort_unstable();
        pcrs.dedup();
        let (ak, _) = self.load_attestation_key()?;
        let quoted = self.quote_with(ak, nonce, &pcrs);
        self.flush(ak);
        quoted
    }

    fn quote_with(&self, ak: KeyHandle, nonce: &[u8; 32], pcrs: &[u8]) -> Result<Quote, TpmError> {
        let values = self.read_pcrs(pcrs)?;
        let data = Data::try_from(nonce.to_vec()).map_err(|source| TpmError::Tss {
            operation: "quote nonce",
            source,
        })?;
        let sel = selection(pcrs)?;
        let (attest, signature) = self.tss("quote", |ctx| {
            ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.quote(ak, data, SignatureScheme::Null, sel)
            })
        })?;
        let attest = attest.marshall().map_err(|source| TpmError::Tss {
            operation: "marshal the quote",
            source,
        })?;
        Ok(Quote {
            attest,
            signature: low_s(signature).map_err(TpmError::Pcrs)?,
            pcrs: values,
        })
    }

    /// Extend a PCR (0-15) of the SHA-256 bank with `digest`: what a boot
    /// component does when it measures the next. Used by tests to change
    /// what a quote shows.
    pub fn extend_pcr(&self, index: u8, digest: [u8; 32]) -> Result<(), TpmError> {
        let handle = PcrHandle::try_from(u32::from(index))
            .map_err(|_| TpmError::Pcrs(format!("PCR {index} cannot be extended")))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(|source| TpmError::Tss {
                operation: "extend",
                source,
            })?,
        );
        self.tss("extend a PCR", |ctx| {
            ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.pcr_extend(handle, values)
            })
        })
    }
}

fn selection(pcrs: &[u8]) -> Result<PcrSelectionList, TpmError> {
    if pcrs.is_empty() || pcrs.len() > 8 {
        return Err(TpmError::Pcrs(format!(
            "quote 1 to 8 PCRs, not {}",
            pcrs.len()
        )));
    }
    let slots = pcrs
        .iter()
        .map(|i| {
            (*i <= 23)
                .then(|| PcrSlot::try_from(1u32 << i).ok())
                .flatten()
                .ok_or_else(|| TpmError::Pcrs(format!("there is no PCR {i}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|source| TpmError::Tss {
            operation: "PCR selection",
            source,
        })
}

fn p256_public(public: tss_esapi::structures::Public) -> Result<PublicKey, TpmError> {
    match TpmPublicKey::try_from(public) {
        Ok(TpmPublicKey::Ecc { x, y }) if x.len() <= 32 && y.len() <= 32 => {
            let mut sec1 = vec![4u8];
            sec1.extend(std::iter::repeat_n(0, 32 - x.len()));
            sec1.extend_from_slice(&x);
            sec1.extend(std::iter::repeat_n(0, 32 - y.len()));
            sec1.extend_from_slice(&y);
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                .map(PublicKey::EcdsaP256)
                .map_err(|_| TpmError::BadKey)
        }
        _ => Err(TpmError::BadKey),
    }
}

/// A TPM ECDSA signature as the 64-byte low-S `r || s` the protocol expects.
fn low_s(signature: Signature) -> Result<Vec<u8>, String> {
    let Signature::EcDsa(ecc) = signature else {
        return Err("the TPM returned a non-ECDSA signature".into());
    };
    let (r, s) = (ecc.signature_r().value(), ecc.signature_s().value());
    if r.len() > 32 || s.len() > 32 {
        return Err("the TPM returned an oversized signature".into());
    }
    let mut rs = [0u8; 64];
    rs[32 - r.len()..32].copy_from_slice(r);
    rs[64 - s.len()..].copy_from_slice(s);
    let sig = p256::ecdsa::Signature::from_slice(&rs).map_err(|e| e.to_string())?;
    Ok(sig.normalize_s().to_bytes().to_vec())
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
        low_s(signature).map_err(KeyError::Sign)
    }
}

impl Drop for TpmIdentity {
    /// Free the identity key's slot in the TPM.
    fn drop(&mut self) {
        let key = self.key;
        self.flush(key);
    }
}

/// The TPM identity as a `Signer`, shared with whoever takes quotes.
pub struct SharedTpm(pub std::rc::Rc<TpmIdentity>);

impl Signer for SharedTpm {
    fn public_key(&self) -> PublicKey {
        self.0.public_key()
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.0.sign(message)
    }
}

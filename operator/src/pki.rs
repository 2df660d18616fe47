//! The operator's own certificate authority for the agent links: it signs
//! the gateway's server certificate and each terminal's short-lived mTLS
//! client certificate (from the CSR the agent sends at enrolment). Agents
//! pin it by the SHA-256 of its DER, given to them with the bootstrap token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tenet_protocol::wire::sha256;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the certificate request is not acceptable: {0}")]
    BadCsr(String),
}

pub use rustls::ServerConfig;

pub struct Ca {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn now_plus(d: Duration) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + d
}

impl Ca {
    /// Load `DIR/ca.pem` and `DIR/ca.key`, or create them (the key 0600).
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| PkiError::Io { path: p, source }
        };
        if cert_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
            let der = pem_to_der(&cert_pem)
                .ok_or_else(|| PkiError::BadCsr("ca.pem holds no certificate".into()))?;
            return Ok(Ca {
                cert_pem,
                cert_der: der,
                issuer,
            });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Tenet agent CA");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now_plus(Duration::ZERO) - Duration::from_secs(60);
        params.not_after = now_plus(Duration::from_secs(10 * 365 * 86_400));
        let cert = params.self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// `sha256:<hex>` of the CA certificate's DER: what agents pin.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", hex::encode(sha256(&self.cert_der)))
    }

    /// A TLS server configuration for the gateway: a fresh server key and
    /// certificate for `names` (DNS names or IP addresses), client
    /// certificates from this CA verified when presented (enrolment comes
    /// without one).
    pub fn server_config(&self, names: &[String]) -> Result<rustls::ServerConfig, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Tenet gateway");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now_plus(Duration::ZERO) - Duration::from_secs(60);
        params.not_after = now_plus(Duration::from_secs(30 * 86_400));
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone(), self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        Ok(config)
    }

    /// A client certificate for `terminal` from its CSR: the subject and
    /// names are the operator's choice (the terminal's name), not the CSR's.
    /// Also the [`client_key`] it certifies, which the terminal's sessions
    /// are bound to.
    pub fn issue_client(
        &self,
        csr_pem: &str,
        terminal: &str,
        validity: Duration,
    ) -> Result<(String, ClientKey), PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, terminal);
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::DnsName(terminal.to_string().try_into().map_err(
                |_| PkiError::BadCsr(format!("{terminal:?} is not a DNS name")),
            )?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now_plus(Duration::ZERO) - Duration::from_secs(60);
        params.not_after = now_plus(validity);
        csr.params = params;
        let cert = csr.signed_by(&self.issuer)?;
        let key = client_key(cert.der())
            .ok_or_else(|| PkiError::BadCsr("the issued certificate does not parse".into()))?;
        Ok((cert.pem(), key))
    }
}

/// The SHA-256 of a certificate's SubjectPublicKeyInfo: which key a client
/// certificate certifies. A terminal's sessions are bound to this, not to a
/// name match (names in certificates compare without regard to case and
/// with wildcards).
pub type ClientKey = [u8; 32];

/// The [`ClientKey`] of a DER certificate, `None` when it does not parse.
pub fn client_key(cert_der: &[u8]) -> Option<ClientKey> {
    let der = CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    Some(sha256(cert.subject_public_key_info().as_ref()))
}

fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)
}

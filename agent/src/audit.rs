//! The internal audit and the presentation of the security certificate.
//!
//! Audit: on the issuer's request (a nonce, the PCRs to quote, the packages
//! and services its policies watch), the agent collects posture facts and,
//! with a TPM, a quote by its attestation key over the PCRs with the nonce;
//! the `AuditReport` is signed by the identity key. The issuer checks it all
//! again (external audit) before it issues a certificate.
//!
//! Presentation: the certificate the issuer sends names a *presentation
//! key*, an Ed25519 key the agent keeps in `DATA/presentation.key` (0600)
//! and binds to its identity by naming it in the signed audit report. Peers'
//! challenges are answered with it, so a presentation costs one Ed25519
//! signature (about 16 µs) instead of a TPM signature (about 3 ms on swtpm,
//! hundreds on hardware) while the identity key stays in the TPM.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tenet_protocol::audit::{AuditReport, Posture};
use tenet_protocol::certificate::verify_certificate;
use tenet_protocol::inventory::{Inventory, ServiceState};
use tenet_protocol::present_tls::PresentAnswer;
use tenet_protocol::{Algorithm, KeyPair, PublicKey, SignedMessage, Signer};

use crate::store::{LocalState, StoreError, write_atomically};
use crate::tpm::TpmIdentity;

/// What the issuer asks for.
#[derive(Debug, Clone, Default)]
pub struct AuditRequest {
    pub nonce: [u8; 32],
    pub pcrs: Vec<u8>,
    pub packages: Vec<String>,
    pub services: Vec<String>,
}

/// Services whose running means a firewall is up.
const FIREWALLS: [&str; 4] = ["nftables", "ufw", "firewalld", "netfilter-persistent"];

/// Posture facts from the terminal's inventory and root file system.
pub fn posture(inv: &Inventory, root: &Path, packages: &[String], services: &[String]) -> Posture {
    let running = |name: &str| {
        inv.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.state == ServiceState::Running)
    };
    let firewall = FIREWALLS
        .iter()
        .filter_map(|f| running(f))
        .reduce(|a, b| a || b);
    let disk_encryption = std::fs::read_to_string(root.join("etc/crypttab"))
        .ok()
        .map(|t| {
            t.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        });
    Posture {
        packages: packages
            .iter()
            .map(|p| {
                let v = inv
                    .packages
                    .iter()
                    .find(|q| q.name == *p)
                    .map(|q| q.version.clone());
                (p.clone(), v)
            })
            .collect(),
        services: services
            .iter()
            .map(|s| (s.clone(), running(s).unwrap_or(false)))
            .collect(),
        firewall,
        disk_encryption,
    }
}

/// Audit now: posture, a quote when there is a TPM, signed by the identity.
#[allow(clippy::too_many_arguments)]
pub fn audit(
    terminal: &str,
    identity: &dyn Signer,
    tpm: Option<&TpmIdentity>,
    presentation_key: PublicKey,
    inventory: &Inventory,
    root: &Path,
    request: &AuditRequest,
    now_ms: u64,
) -> Result<Vec<u8>, String> {
    let quote = match tpm {
        Some(t) if !request.pcrs.is_empty() => Some(
            t.quote(&request.nonce, &request.pcrs)
                .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let report = AuditReport {
        terminal: terminal.to_string(),
        nonce: request.nonce,
        audited_at_ms: now_ms,
        presentation_key,
        posture: posture(inventory, root, &request.packages, &request.services),
        quote,
    };
    SignedMessage::signed(&report, identity)
        .map(|m| m.encode())
        .map_err(|e| e.to_string())
}

/// The presentation key and the certificate held for it.
pub struct Presenter {
    terminal: String,
    key: KeyPair,
    certificate: RwLock<Option<Vec<u8>>>,
    dir: std::path::PathBuf,
}

impl Presenter {
    /// The presentation key (made on first use) and the certificate kept
    /// from the last run, if any.
    pub fn open(store: &LocalState, terminal: &str) -> Result<Presenter, StoreError> {
        let path = store.dir().join("presentation.key");
        if !path.exists() {
            KeyPair::generate(Algorithm::Ed25519)?.write_files(&path)?;
        }
        let key = KeyPair::read_file(&path)?;
        let certificate = std::fs::read(store.dir().join("certificate")).ok();
        Ok(Presenter {
            terminal: terminal.to_string(),
            key,
            certificate: RwLock::new(certificate),
            dir: store.dir().to_path_buf(),
        })
    }

    /// A presenter with a key in memory (benchmarks, simulated terminals).
    pub fn ephemeral(terminal: &str) -> Result<Presenter, StoreError> {
        Ok(Presenter {
            terminal: terminal.to_string(),
            key: KeyPair::generate(Algorithm::Ed25519)?,
            certificate: RwLock::new(None),
            dir: std::path::PathBuf::new(),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Take a certificate from the issuer, after checking it is for this
    /// terminal and this presentation key, signed by `issuer`, and valid;
    /// `None` drops the one held.
    pub fn hold(
        &self,
        certificate: Option<Vec<u8>>,
        issuer: &PublicKey,
        now_ms: u64,
    ) -> Result<Option<u8>, String> {
        let level = match &certificate {
            Some(bytes) => {
                let cert = verify_certificate(bytes, issuer, now_ms).map_err(|e| e.to_string())?;
                if cert.subject != self.terminal {
                    return Err(format!("the certificate is for {:?}", cert.subject));
                }
                if cert.subject_key != self.key.public_key() {
                    return Err("the certificate names another presentation key".into());
                }
                Some(cert.level)
            }
            None => None,
        };
        if !self.dir.as_os_str().is_empty() {
            let path = self.dir.join("certificate");
            match &certificate {
                Some(bytes) => write_atomically(&path, bytes, 0o644).map_err(|e| e.to_string())?,
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if let Ok(mut held) = self.certificate.write() {
            *held = certificate;
        }
        Ok(level)
    }

    /// Whether a certificate is held.
    pub fn holds(&self) -> bool {
        self.certificate.read().is_ok_and(|c| c.is_some())
    }

    /// Answer a (session-bound) challenge.
    pub fn answer(&self, bound: [u8; 32], now_ms: u64) -> PresentAnswer {
        let held = self.certificate.read().ok().and_then(|c| c.clone());
        match held {
            None => PresentAnswer::Unavailable(
                "no security certificate: not issued yet, or withdrawn".into(),
            ),
            Some(cert) => {
                match tenet_protocol::presentation::present(&cert, bound, &self.key, now_ms) {
                    Ok(p) => PresentAnswer::Presentation(p),
                    Err(e) => PresentAnswer::Unavailable(format!("cannot sign: {e}")),
                }
            }
        }
    }
}

/// A self-signed TLS certificate for the presentation listener (it does not
/// authenticate the terminal; the presentation does, bound to the session).
pub fn presentation_tls(terminal: &str) -> Result<rustls::ServerConfig, String> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let cert = rcgen::CertificateParams::new(vec![terminal.to_string()])
        .and_then(|p| p.self_signed(&key))
        .map_err(|e| e.to_string())?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| e.to_string())?;
    tenet_protocol::present_tls::server_config(cert.der().clone(), der).map_err(|e| e.to_string())
}

/// What runs before each answer in the synchronous mode (the paper's
/// comparison): an internal audit on every request.
pub type SyncAudit = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Peers served at once by the presentation listener, in all and from one
/// address; one more is closed.
pub const MAX_PEERS: usize = 1024;
pub const MAX_PEERS_PER_ADDRESS: usize = 64;
/// How long one peer connection may last, however busy.
const PEER_LIFETIME: Duration = Duration::from_secs(600);
/// How long a peer has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay silent between two challenges.
const PEER_IDLE: Duration = Duration::from_secs(30);

/// Serve presentations on `listener` until the task is dropped: at most
/// [`MAX_PEERS`] at once, each with a handshake timeout and an idle
/// timeout, and accept errors (out of file descriptors) waited out.
pub async fn serve(
    presenter: Arc<Presenter>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    sync_audit: Option<SyncAudit>,
    now_ms: fn() -> u64,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tenet_protocol::listen::accept_loop(
        listener,
        MAX_PEERS,
        MAX_PEERS_PER_ADDRESS,
        move |tcp, _| {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let presenter = presenter.clone();
            let sync_audit = sync_audit.clone();
            async move {
                let Ok(Ok(mut tls)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                else {
                    return;
                };
                // One connection may ask again and again, for a while.
                let until = tokio::time::Instant::now() + PEER_LIFETIME;
                while tokio::time::Instant::now() < until {
                    let answered = tenet_protocol::present_tls::answer(&mut tls, |bound| {
                        let presenter = presenter.clone();
                        let sync_audit = sync_audit.clone();
                        async move {
                            if let Some(audit) = sync_audit {
                                match tokio::task::spawn_blocking(move || audit()).await {
                                    Ok(Ok(())) => {}
                                    Ok(Err(e)) => return PresentAnswer::Unavailable(e),
                                    Err(e) => return PresentAnswer::Unavailable(e.to_string()),
                                }
                            }
                            presenter.answer(bound, now_ms())
                        }
                    });
                    if !matches!(tokio::time::timeout(PEER_IDLE, answered).await, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        },
    )
    .await;
}

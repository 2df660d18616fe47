//! The agent's link to the operator: enrolment, then a held mutual-TLS
//! connection over which the operator pushes dispatches and the agent sends
//! reports and inventories. The agent dials out and reconnects with
//! jittered exponential backoff; a report leaves the outbox only when the
//! operator acknowledges it, so none is lost across reconnects or restarts.
//!
//! Trust at enrolment comes from the CA fingerprint given with the
//! bootstrap token (as `kubeadm join` pins its CA): the gateway must
//! present a chain ending in that CA. Afterwards the CA certificate itself
//! is pinned in the data directory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tenet_protocol::enrol::{EnrolmentRequest, EnrolmentResponse};
use tenet_protocol::inventory::InventoryReport;
use tenet_protocol::session::{FrameError, MAX_SESSION_FRAME, ToAgent, ToOperator};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Kind, Rejection, SignedMessage, Signer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::config::AgentConfig;
use crate::dispatch::{self, Dispatched};
use crate::store::{Store, StoreError, write_atomically};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Protocol(#[from] Rejection),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("enrolment refused by the operator: {0}")]
    EnrolmentRefused(String),
    #[error("the agent has no operator address in its configuration (operator.address)")]
    NoOperator,
    #[error("cannot sign: {0}")]
    Sign(#[from] tenet_protocol::keys::KeyError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts a server whose chain includes the CA with the pinned SHA-256,
/// and verifies the chain against that CA as an ordinary root.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General("the gateway's CA is not the pinned one".into())
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS client of an enrolment: no client certificate yet; the gateway
/// must present the CA with `fingerprint`.
pub fn enrolment_tls(fingerprint: [u8; 32]) -> Result<rustls::ClientConfig, ConnError> {
    let verifier = PinnedCa {
        fingerprint,
        provider: provider(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The TLS client of a session: the pinned CA, and the terminal's client
/// certificate.
pub fn session_tls(
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, ConnError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)?)
}

/// The answer of a terminal without a TPM to a credential activation.
pub fn no_tpm(_credential_blob: &[u8], _secret: &[u8]) -> Result<Vec<u8>, String> {
    Err("this terminal has no TPM".into())
}

/// Send a signed enrolment request over `tls` and check the answer: signed
/// by the dispatch key it announces, naming the pinned CA and `terminal`.
/// With a TPM, the operator first asks it to activate a credential:
/// `activate` answers with the secret the TPM recovered (from the
/// credential blob and the encrypted seed), or why not ([`no_tpm`]).
pub async fn exchange_enrolment<S, F>(
    mut tls: S,
    signed_request: Vec<u8>,
    fingerprint: [u8; 32],
    terminal: &str,
    activate: F,
) -> Result<EnrolmentResponse, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&[u8], &[u8]) -> Result<Vec<u8>, String>,
{
    write_frame(&mut tls, &ToOperator::Enrol(signed_request)).await?;
    let mut answer: ToAgent = read_frame(&mut tls, MAX_SESSION_FRAME).await?;
    if let ToAgent::ActivateCredential {
        credential_blob,
        secret,
    } = &answer
    {
        let reply = match activate(credential_blob, secret) {
            Ok(secret) => ToOperator::CredentialActivated { secret },
            Err(reason) => ToOperator::ActivationFailed { reason },
        };
        write_frame(&mut tls, &reply).await?;
        answer = read_frame(&mut tls, MAX_SESSION_FRAME).await?;
    }
    let bytes = match answer {
        ToAgent::Enrolled(b) => b,
        ToAgent::EnrolmentRefused { reason } => {
            return Err(ConnError::EnrolmentRefused(reason));
        }
        _ => return Err(Rejection::Malformed("unexpected answer to enrolment".into()).into()),
    };
    // The channel is authenticated by the pinned CA; the response must
    // also be signed by the dispatch key it announces, and name the CA.
    let frame = SignedMessage::decode(&bytes, Kind::EnrolmentResponse)?;
    let response: EnrolmentResponse = frame.open()?;
    frame.verify_by(&response.trust.dispatch_key)?;
    let ca_der = CertificateDer::from_pem_slice(response.ca_certificate_pem.as_bytes())
        .map_err(|e| ConnError::Certificate(e.to_string()))?;
    if sha256(&ca_der) != fingerprint || response.terminal != terminal {
        return Err(ConnError::Certificate(
            "the enrolment response names another CA or terminal".into(),
        ));
    }
    Ok(response)
}

pub use tenet_protocol::session::{read_frame, write_frame};

pub(crate) use tenet_protocol::host::now_ms;

/// A running agent.
pub struct Agent {
    pub config: AgentConfig,
    pub config_path: PathBuf,
    pub store: Store,
    pub identity: Box<dyn Signer>,
    /// The TPM the identity key lives in, for quotes.
    pub tpm: Option<std::rc::Rc<crate::tpm::TpmIdentity>>,
    /// The presentation key and the security certificate held for it.
    pub presenter: Arc<crate::audit::Presenter>,
    /// The `tenet-agent` binary, for loaders.
    pub exe: PathBuf,
}

impl Agent {
    fn address(&self) -> Result<(String, ServerName<'static>), ConnError> {
        let op = self.config.operator.as_ref().ok_or(ConnError::NoOperator)?;
        let host = op.server_name.clone().unwrap_or_else(|| {
            op.address
                .rsplit_once(':')
                .map_or(op.address.clone(), |(h, _)| h.to_string())
        });
        let name = ServerName::try_from(host.clone())
            .map_err(|_| ConnError::Certificate(format!("bad server name {host:?}")))?;
        Ok((op.address.clone(), name))
    }

    async fn connect(
        &self,
        tls: rustls::ClientConfig,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ConnError> {
        let (address, name) = self.address()?;
        let tcp = tokio::net::TcpStream::connect(&address).await?;
        let _ = tcp.set_nodelay(true);
        Ok(tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await?)
    }

    /// Enrol with a bootstrap token, trusting the gateway whose CA has
    /// `ca_fingerprint` (`sha256:<hex>`). Stores the pinned keys, the CA and
    /// the client certificate; the transport key stays in `DATA/tls.key`.
    pub async fn enrol(
        &self,
        token: &str,
        ca_fingerprint: &str,
    ) -> Result<EnrolmentResponse, ConnError> {
        let fingerprint = tenet_protocol::wire::parse_digest(ca_fingerprint).ok_or_else(|| {
            ConnError::Certificate(format!("{ca_fingerprint:?} is not sha256:<64 hex digits>"))
        })?;
        let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        let csr = rcgen::CertificateParams::new(vec![self.config.terminal.clone()])
            .and_then(|p| p.serialize_request(&tls_key))
            .and_then(|r| r.pem())
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        let request = EnrolmentRequest {
            token: token.to_string(),
            terminal: self.config.terminal.clone(),
            labels: self.config.labels.clone(),
            identity: self.identity.public_key(),
            tpm: self.config.identity.tpm.is_some(),
            attestation_key: match &self.tpm {
                Some(t) => Some(
                    t.attestation_key()
                        .map_err(|e| ConnError::Certificate(e.to_string()))?,
                ),
                None => None,
            },
            ek_certificate: self.tpm.as_ref().and_then(|t| t.ek_certificate()),
            tls_csr_pem: csr,
            requested_at_ms: now_ms(),
        };
        let signed = SignedMessage::signed(&request, self.identity.as_ref())?.encode();
        let tls = self.connect(enrolment_tls(fingerprint)?).await?;
        let tpm = self.tpm.clone();
        let activate = move |blob: &[u8], secret: &[u8]| match &tpm {
            Some(t) => t
                .activate_credential(blob, secret)
                .map_err(|e| e.to_string()),
            None => Err("this terminal has no TPM".to_string()),
        };
        let response =
            exchange_enrolment(tls, signed, fingerprint, &self.config.terminal, activate).await?;
        let dir = self.store.dir();
        write_atomically(
            &dir.join("tls.key"),
            tls_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_atomically(
            &dir.join("tls.crt"),
            response.client_certificate_pem.as_bytes(),
            0o644,
        )?;
        write_atomically(
            &dir.join("ca.pem"),
            response.ca_certificate_pem.as_bytes(),
            0o644,
        )?;
        self.store.set_trust(&response.trust)?;
        Ok(response)
    }

    fn session_tls(&self) -> Result<rustls::ClientConfig, ConnError> {
        let dir = self.store.dir();
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                ConnError::Certificate(format!("{}: {e}; enrol first", dir.join(name).display()))
            })
        };
        let ca = CertificateDer::from_pem_slice(&read("ca.pem")?)
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        let cert = CertificateDer::from_pem_slice(&read("tls.crt")?)
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&read("tls.key")?)
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        session_tls(ca, cert, key)
    }

    fn inventory_report(&self) -> Result<Vec<u8>, ConnError> {
        let inventory = self
            .config
            .inventory_source()
            .collect()
            .map_err(|e| ConnError::Io(std::io::Error::other(e.to_string())))?;
        let now = now_ms();
        let report = InventoryReport {
            terminal: self.config.terminal.clone(),
            sequence: now,
            collected_at_ms: now,
            inventory,
        };
        Ok(SignedMessage::signed(&report, self.identity.as_ref())?.encode())
    }

    /// Hold a connection to the operator for ever, reconnecting with
    /// jittered exponential backoff (200 ms doubling to 30 s).
    pub async fn run(&self) -> ! {
        if let Some(p) = &self.config.presentation {
            match self.presentation_listener(&p.listen).await {
                Ok((listener, tls)) => {
                    tracing::info!(
                        address = %listener
                            .local_addr()
                            .map_or(p.listen.clone(), |a| a.to_string()),
                        "answering certificate challenges"
                    );
                    tokio::spawn(crate::audit::serve(
                        self.presenter.clone(),
                        listener,
                        tls,
                        None,
                        now_ms,
                    ));
                }
                Err(e) => tracing::error!(error = %e, "no presentation listener"),
            }
        }
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            match self.session().await {
                Ok(()) => tracing::warn!("the operator closed the connection"),
                Err(e) => tracing::warn!(error = %e, "connection lost"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                failures = 0;
            }
            let delay = backoff(failures, jitter());
            failures = failures.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
    }

    /// One connection, until it ends.
    pub async fn session(&self) -> Result<(), ConnError> {
        let tls = self.connect(self.session_tls()?).await?;
        let (mut reader, mut writer) = tokio::io::split(tls);
        write_frame(
            &mut writer,
            &ToOperator::Hello {
                terminal: self.config.terminal.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            },
        )
        .await?;
        let (msg_tx, mut msg_rx) = mpsc::channel::<Result<ToAgent, ConnError>>(16);
        let reader_task = tokio::spawn(async move {
            loop {
                let m = read_frame::<_, ToAgent>(&mut reader, MAX_SESSION_FRAME)
                    .await
                    .map_err(ConnError::from);
                let stop = m.is_err();
                if msg_tx.send(m).await.is_err() || stop {
                    break;
                }
            }
        });
        let result = self.converse(&mut writer, &mut msg_rx).await;
        reader_task.abort();
        result
    }

    async fn converse<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
        msg_rx: &mut mpsc::Receiver<Result<ToAgent, ConnError>>,
    ) -> Result<(), ConnError> {
        // Reports not yet acknowledged, by digest.
        let mut unacked: HashMap<[u8; 32], PathBuf> = HashMap::new();
        for (path, bytes) in self.store.pending_reports()? {
            unacked.insert(sha256(&bytes), path);
            write_frame(writer, &ToOperator::Report(bytes)).await?;
        }
        let mut last_inventory = self.inventory_report().ok();
        if let Some(inv) = &last_inventory {
            write_frame(writer, &ToOperator::Inventory(inv.clone())).await?;
        }
        // A renewal in flight: the new transport key, until the certificate comes.
        let mut renewing: Option<rcgen::KeyPair> = None;
        let mut ticks: u64 = 0;
        if self.certificate_due() {
            renewing = self.request_renewal(writer).await?;
        }
        let interval = Duration::from_secs(self.config.inventory_interval_seconds.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let (done_tx, mut done_rx) = mpsc::channel::<Result<Dispatched, String>>(16);
        let mut running: HashMap<String, oneshot::Sender<()>> = HashMap::new();
        // Dispatches waiting for the running one to end, in arrival order.
        let mut waiting: std::collections::VecDeque<dispatch::Prepared> = Default::default();
        let start = |prepared: dispatch::Prepared,
                     running: &mut HashMap<String, oneshot::Sender<()>>|
         -> Result<(), ConnError> {
            let (kill_tx, kill_rx) = oneshot::channel();
            running.insert(prepared.policy.clone(), kill_tx);
            let cmd = dispatch::loader_command(&self.exe, &self.config_path, prepared.sequence);
            let store = Store::open(self.store.dir())?;
            let done = done_tx.clone();
            tokio::spawn(async move {
                let r = run_loader(cmd, prepared, store, kill_rx).await;
                let _ = done.send(r).await;
            });
            Ok(())
        };
        loop {
            tokio::select! {
                m = msg_rx.recv() => {
                    let m = match m {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return Err(e),
                        None => return Ok(()),
                    };
                    match m {
                        ToAgent::Dispatch { envelope, bundle } => {
                            match dispatch::prepare(&self.store, self.identity.as_ref(), &self.config.terminal, &envelope, &bundle, now_ms()) {
                                Ok(Ok(prepared)) => {
                                    if let Some(kill) = running.remove(&prepared.policy) {
                                        // A newer dispatch for the same policy supersedes it.
                                        let _ = kill.send(());
                                    }
                                    waiting.retain(|w| w.policy != prepared.policy);
                                    // One payload at a time, in arrival order: package
                                    // managers hold a global lock, and two installs at
                                    // once fail one of them.
                                    if !running.is_empty() {
                                        tracing::info!(
                                            "dispatch {} for {} waits for the running payload",
                                            prepared.sequence,
                                            prepared.policy
                                        );
                                    }
                                    waiting.push_back(prepared);
                                    if running.is_empty() && let Some(next) = waiting.pop_front() {
                                        start(next, &mut running)?;
                                    }
                                }
                                Ok(Err(refused)) => {
                                    unacked.insert(sha256(&refused.report), refused.queued.clone());
                                    write_frame(writer, &ToOperator::Report(refused.report)).await?;
                                }
                                Err(e) => tracing::error!(error = %e, "cannot take the dispatch"),
                            }
                        }
                        ToAgent::Ack { digest } => {
                            if let Some(path) = unacked.remove(&digest) {
                                self.store.acknowledge(&path)?;
                            }
                        }
                        ToAgent::InventoryWanted => {
                            if let Ok(inv) = self.inventory_report() {
                                write_frame(writer, &ToOperator::Inventory(inv.clone())).await?;
                                last_inventory = Some(inv);
                            }
                        }
                        ToAgent::Ping => write_frame(writer, &ToOperator::Pong).await?,
                        ToAgent::Certificate { pem } => {
                            if let Some(key) = renewing.take() {
                                // Used from the next connection on.
                                let dir = self.store.dir();
                                write_atomically(&dir.join("tls.key"), key.serialize_pem().as_bytes(), 0o600)?;
                                write_atomically(&dir.join("tls.crt"), pem.as_bytes(), 0o644)?;
                            }
                        }
                        ToAgent::RenewalRefused { reason } => {
                            renewing = None;
                            tracing::warn!(%reason, "client certificate renewal refused");
                        }
                        ToAgent::Audit { nonce, pcrs, packages, services } => {
                            let request = crate::audit::AuditRequest { nonce, pcrs, packages, services };
                            match self.audit(&request) {
                                Ok(report) => write_frame(writer, &ToOperator::Audit(report)).await?,
                                Err(e) => tracing::error!(error = %e, "audit failed"),
                            }
                        }
                        ToAgent::SecurityCertificate { certificate } => {
                            let issuer = self.store.trust()?.issuer_key;
                            match self.presenter.hold(certificate, &issuer, now_ms()) {
                                Ok(Some(level)) => tracing::info!(level, "security certificate held"),
                                Ok(None) => tracing::warn!("security certificate withdrawn by the issuer"),
                                Err(e) => tracing::error!(error = %e, "security certificate refused"),
                            }
                        }
                        ToAgent::Enrolled(_)
                        | ToAgent::EnrolmentRefused { .. }
                        | ToAgent::ActivateCredential { .. } => {}
                    }
                }
                Some(done) = done_rx.recv() => {
                    match done {
                        Ok(d) => {
                            running.retain(|_, k| !k.is_closed());
                            unacked.insert(sha256(&d.report), d.queued.clone());
                            write_frame(writer, &ToOperator::Report(d.report)).await?;
                        }
                        Err(e) => {
                            running.retain(|_, k| !k.is_closed());
                            tracing::error!(error = %e, "a dispatch failed");
                        }
                    }
                    if running.is_empty() && let Some(next) = waiting.pop_front() {
                        start(next, &mut running)?;
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    if renewing.is_none() && self.certificate_due() {
                        renewing = self.request_renewal(writer).await?;
                    }
                    // On change, and at least every tenth interval.
                    if let Ok(inv) = self.inventory_report() {
                        let changed = last_inventory.as_ref().is_none_or(|last| inventory_changed(last, &inv));
                        if changed || ticks.is_multiple_of(10) {
                            write_frame(writer, &ToOperator::Inventory(inv.clone())).await?;
                            last_inventory = Some(inv);
                        }
                    }
                }
            }
        }
    }
}

impl Agent {
    /// The internal audit the issuer asked for, signed.
    fn audit(&self, request: &crate::audit::AuditRequest) -> Result<Vec<u8>, String> {
        let inventory = self
            .config
            .inventory_source()
            .collect()
            .map_err(|e| e.to_string())?;
        crate::audit::audit(
            &self.config.terminal,
            self.identity.as_ref(),
            self.tpm.as_deref(),
            self.presenter.public_key(),
            &inventory,
            &self.config.root,
            request,
            now_ms(),
        )
    }

    async fn presentation_listener(
        &self,
        listen: &str,
    ) -> Result<(tokio::net::TcpListener, Arc<rustls::ServerConfig>), String> {
        let tls = crate::audit::presentation_tls(&self.config.terminal)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("{listen}: {e}"))?;
        Ok((listener, Arc::new(tls)))
    }

    /// Whether less than half of the client certificate's validity is left.
    fn certificate_due(&self) -> bool {
        let Ok(pem) = std::fs::read(self.store.dir().join("tls.crt")) else {
            return false;
        };
        let Ok(der) = CertificateDer::from_pem_slice(&pem) else {
            return false;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            return false;
        };
        let v = cert.validity();
        let (start, end) = (v.not_before.timestamp(), v.not_after.timestamp());
        let now = (now_ms() / 1000) as i64;
        now >= start + (end - start) / 2
    }

    /// Ask for a new client certificate for a fresh transport key.
    async fn request_renewal<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
    ) -> Result<Option<rcgen::KeyPair>, ConnError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        let csr_pem = rcgen::CertificateParams::new(vec![self.config.terminal.clone()])
            .and_then(|p| p.serialize_request(&key))
            .and_then(|r| r.pem())
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        write_frame(writer, &ToOperator::RenewCertificate { csr_pem }).await?;
        Ok(Some(key))
    }
}

/// Whether two signed inventory reports hold different inventories.
fn inventory_changed(a: &[u8], b: &[u8]) -> bool {
    let open = |bytes: &[u8]| {
        SignedMessage::decode(bytes, Kind::InventoryReport)
            .and_then(|f| f.open::<InventoryReport>())
            .map(|r| r.inventory)
            .ok()
    };
    open(a) != open(b)
}

/// Run a loader to its end, or kill it when superseded.
async fn run_loader(
    cmd: std::process::Command,
    prepared: dispatch::Prepared,
    store: Store,
    kill: oneshot::Receiver<()>,
) -> Result<Dispatched, String> {
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the loader: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&prepared.request)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let read = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    });
    tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|e| e.to_string())?;
            let out = read.await.map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("the loader exited with {status}"));
            }
            dispatch::finish(&store, prepared.sequence, &out).map_err(|e| e.to_string())
        }
        _ = kill => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(format!("dispatch {} of {} was superseded by a newer one", prepared.sequence, prepared.policy))
        }
    }
}

/// 200 ms doubling per failure up to 30 s, plus up to half again at random.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let base = 200u64.saturating_mul(1u64 << failures.min(8)).min(30_000);
    Duration::from_millis(base + (base as f64 * 0.5 * jitter.clamp(0.0, 1.0)) as u64)
}

pub(crate) fn jitter() -> f64 {
    tenet_protocol::keys::random_bytes().map_or(0.5, |b| f64::from(b[0]) / 255.0)
}

#[cfg(test)]
mod tests;

//! The agent gateway: agents dial in over mutual TLS and hold the
//! connection, so the operator can push dispatches. The first message says
//! what the connection is for: `Enrol` (allowed without a client
//! certificate: a bootstrap token and a self-signed request), or `Hello`
//! (the client certificate must name the terminal). Then reports and
//! inventories flow up, dispatches and acknowledgements down.
//!
//! What the operator does with each message is behind [`Fleet`], so the
//! standalone store and the Kubernetes store share this code.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tenet_protocol::enrol::{
    EnrolmentRequest, EnrolmentResponse, TrustAnchors, verify_enrolment_request,
};
use tenet_protocol::session::{ToAgent, ToOperator};
use tenet_protocol::wire::sha256;
use tenet_protocol::{KeyPair, Rejection, SignedMessage};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::pki::Ca;

pub use tokio_rustls::TlsAcceptor;

/// Why a report or inventory was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// It does not verify: counted, acknowledged, never retried.
    #[error("{0}")]
    Refused(#[from] Rejection),
    /// The operator could not store it now: not acknowledged, so the agent
    /// sends it again on its next connection.
    #[error("the operator cannot take it now: {0}")]
    Unavailable(String),
}

impl FleetError {
    /// The CamelCase word of the refusal (`Unavailable` for the operator's own failures).
    pub fn reason(&self) -> &'static str {
        match self {
            FleetError::Refused(r) => r.reason(),
            FleetError::Unavailable(_) => "Unavailable",
        }
    }
}

/// What the operator does with what agents send.
pub trait Fleet: Send + Sync + 'static {
    /// Check the bootstrap token and register the terminal and its identity
    /// key; `Err` is the reason given to the agent.
    fn enrol(&self, request: &EnrolmentRequest) -> Result<(), String>;
    /// A terminal connected; `to_agent` reaches it until it disconnects.
    fn connected(&self, terminal: &str, to_agent: mpsc::Sender<ToAgent>);
    fn disconnected(&self, terminal: &str);
    /// A signed execution report; `Ok` means it is stored (and acknowledged).
    fn report(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError>;
    /// A signed inventory report; `Ok` means it is taken.
    fn inventory(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError>;
    /// A signed audit report, the answer to an audit request.
    fn audit(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError>;
    /// Whether the terminal is (still) enrolled; its session ends when not.
    fn enrolled(&self, _terminal: &str) -> bool {
        true
    }
    /// Wait until everything taken so far is durable: the gateway answers
    /// an enrolment and acknowledges a report only then. `Err` says why
    /// it cannot be now.
    fn settled(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

pub struct Gateway {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub ca: Arc<Ca>,
    pub trust: TrustAnchors,
    pub dispatch_key: Arc<KeyPair>,
    pub fleet: Arc<dyn Fleet>,
    /// Validity of the client certificates issued at enrolment.
    pub client_cert_validity: Duration,
    pub now_ms: fn() -> u64,
    /// Connections held at most (each costs memory and a file descriptor);
    /// one more is closed as soon as it is accepted.
    pub max_connections: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("TLS: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] tenet_protocol::session::FrameError),
    #[error("{0}")]
    Protocol(#[from] Rejection),
    #[error("refused: {0}")]
    Refused(String),
}

pub use tenet_protocol::session::{read_frame, write_frame};

/// How long a new connection has to finish TLS and send its first message.
const OPENING_TIMEOUT: Duration = Duration::from_secs(15);

/// Messages from agents are small but for reports with an inventory.
const MAX_FROM_AGENT: usize = 16 * 1024 * 1024;

impl Gateway {
    /// Accept connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let mut refused: u64 = 0;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                // Out of file descriptors, or a connection reset before it
                // was accepted: keep serving the others.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%peer, refused, limit = self.max_connections, "connection limit reached; connection closed");
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            tokio::spawn(async move {
                // A connection's failure ends that connection only.
                let _ = gw.handle(stream).await;
                drop(slot);
            });
        }
    }

    async fn handle(&self, stream: tokio::net::TcpStream) -> Result<(), GatewayError> {
        // A client that does not finish its handshake and first message in
        // time is dropped, so idle sockets cannot pile up.
        let opening = async {
            let mut tls = self.acceptor.accept(stream).await?;
            let first: ToOperator = read_frame(&mut tls, MAX_FROM_AGENT).await?;
            Ok::<_, GatewayError>((tls, first))
        };
        let (mut tls, first) = tokio::time::timeout(OPENING_TIMEOUT, opening)
            .await
            .map_err(|_| {
                GatewayError::Refused("no handshake and first message in time".into())
            })??;
        match first {
            ToOperator::Enrol(bytes) => {
                let answer = match self.enrol(&bytes) {
                    Ok(response) => match self.fleet.settled().await {
                        Ok(()) => ToAgent::Enrolled(response),
                        Err(e) => ToAgent::EnrolmentRefused {
                            reason: format!("the operator cannot record the enrolment now: {e}"),
                        },
                    },
                    Err(reason) => ToAgent::EnrolmentRefused { reason },
                };
                write_frame(&mut tls, &answer).await?;
                tls.shutdown().await?;
                Ok(())
            }
            ToOperator::Hello { terminal, .. } => {
                let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
                if !cert_names(certs.first(), &terminal) {
                    return Err(GatewayError::Refused(format!(
                        "the client certificate does not name terminal {terminal:?}"
                    )));
                }
                self.session(tls, terminal).await
            }
            _ => Err(GatewayError::Refused(
                "a connection starts with Hello or Enrol".into(),
            )),
        }
    }

    fn enrol(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let request = verify_enrolment_request(bytes).map_err(|e| e.to_string())?;
        self.fleet.enrol(&request)?;
        let cert = self
            .ca
            .issue_client(
                &request.tls_csr_pem,
                &request.terminal,
                self.client_cert_validity,
            )
            .map_err(|e| e.to_string())?;
        let response = EnrolmentResponse {
            terminal: request.terminal,
            trust: self.trust.clone(),
            client_certificate_pem: cert,
            ca_certificate_pem: self.ca.cert_pem.clone(),
            issued_at_ms: (self.now_ms)(),
        };
        SignedMessage::signed(&response, self.dispatch_key.as_ref())
            .map(|m| m.encode())
            .map_err(|e| e.to_string())
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        tls: S,
        terminal: String,
    ) -> Result<(), GatewayError> {
        let (mut reader, mut writer) = tokio::io::split(tls);
        let (tx, mut rx) = mpsc::channel::<ToAgent>(64);
        self.fleet.connected(&terminal, tx.clone());
        let writer_task = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if write_frame(&mut writer, &m).await.is_err() {
                    break;
                }
            }
        });
        let result = loop {
            let message: ToOperator = match read_frame(&mut reader, MAX_FROM_AGENT).await {
                Ok(m) => m,
                Err(e) => break Err(e.into()),
            };
            if !self.fleet.enrolled(&terminal) {
                break Err(GatewayError::Refused(format!(
                    "{terminal} is no longer enrolled"
                )));
            }
            let ack = match &message {
                ToOperator::Report(bytes) => {
                    self.fleet.report(&terminal, bytes).map(|()| sha256(bytes))
                }
                ToOperator::Inventory(bytes) => self
                    .fleet
                    .inventory(&terminal, bytes)
                    .map(|()| sha256(bytes)),
                ToOperator::RenewCertificate { csr_pem } => {
                    // The session's certificate already names this terminal.
                    let answer =
                        match self
                            .ca
                            .issue_client(csr_pem, &terminal, self.client_cert_validity)
                        {
                            Ok(pem) => ToAgent::Certificate { pem },
                            Err(e) => ToAgent::RenewalRefused {
                                reason: e.to_string(),
                            },
                        };
                    if tx.send(answer).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                ToOperator::Audit(bytes) => {
                    // Not queued by the agent: nothing to acknowledge.
                    if let Err(e) = self.fleet.audit(&terminal, bytes) {
                        tracing::warn!(terminal, error = %e, "audit report refused");
                    }
                    continue;
                }
                ToOperator::Pong => continue,
                ToOperator::Hello { .. } | ToOperator::Enrol(_) => {
                    break Err(GatewayError::Refused(
                        "Hello and Enrol come first, once".into(),
                    ));
                }
            };
            // A refused report is acknowledged too: it was counted by reason,
            // and sending it again would not make it verify. One the operator
            // could not store is not: the agent sends it again.
            let digest = match (ack, &message) {
                (Ok(d), _) => d,
                (Err(FleetError::Refused(_)), ToOperator::Report(b) | ToOperator::Inventory(b)) => {
                    sha256(b)
                }
                (Err(_), _) => continue,
            };
            // Acknowledged only once what it changed is durable.
            if let Err(e) = self.fleet.settled().await {
                tracing::warn!(terminal, error = %e, "not acknowledged: the operator cannot commit now");
                continue;
            }
            if tx.send(ToAgent::Ack { digest }).await.is_err() {
                break Ok(());
            }
        };
        self.fleet.disconnected(&terminal);
        drop(tx);
        writer_task.abort();
        result
    }
}

/// Whether the (already CA-verified) client certificate is valid for `terminal`.
fn cert_names(cert: Option<&CertificateDer<'_>>, terminal: &str) -> bool {
    let (Some(cert), Ok(name)) = (cert, ServerName::try_from(terminal)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
}

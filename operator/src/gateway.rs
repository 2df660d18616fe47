//! The agent gateway: agents dial in over mutual TLS and hold the
//! connection, so the operator can push dispatches. The first message says
//! what the connection is for: `Enrol` (allowed without a client
//! certificate: a bootstrap token and a self-signed request), or `Hello`
//! (the client certificate must certify the exact key enrolled or last
//! renewed for the terminal: a name match is not enough). Then reports and
//! inventories flow up, dispatches and acknowledgements down.
//!
//! A stranger costs little: before a connection authenticates it may send
//! one small frame ([`MAX_OPENING_FRAME`]) within a timeout, and connections
//! still opening are limited in all and per source address, apart from the
//! sessions' own slots. A terminal has one session: a newer one replaces
//! the older.
//!
//! What the operator does with each message is behind [`Fleet`], so the
//! standalone store and the Kubernetes store share this code.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tenet_protocol::enrol::{EnrolmentRequest, EnrolmentResponse, verify_enrolment_request};
use tenet_protocol::release::{self, Release};
use tenet_protocol::session::{ToAgent, ToOperator};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Rejection, SignedMessage};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::pki::{Ca, ClientKey, client_key};
use crate::tpm_trust::{TpmRoots, TpmTrust, activation_matches, make_credential};
use tenet_protocol::audit::attestation_key_name;

mod sessions;

pub use sessions::{NotQueued, Session, SessionRx, SessionTx, Sessions};
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
    /// Check the bootstrap token and register the terminal, its identity
    /// key and the client key of the certificate it will be given; `Err`
    /// is the reason given to the agent (and no token is spent).
    fn enrol(
        &self,
        request: &EnrolmentRequest,
        client_key: ClientKey,
        tpm: TpmTrust,
    ) -> Result<(), String>;
    /// Whether a session of `terminal` may use the client key its
    /// certificate certifies (the one enrolled or last renewed).
    fn admit(&self, terminal: &str, client_key: &ClientKey) -> bool;
    /// A renewed certificate for `renewed` is about to be given to a
    /// session that uses `current`; false when the terminal is gone.
    fn renewing(&self, terminal: &str, current: &ClientKey, renewed: ClientKey) -> bool;
    /// A terminal's session started; it replaces any older one.
    fn connected(&self, terminal: &str, session: Session);
    /// `bytes` of bundles were sent to an agent.
    fn bundle_sent(&self, _bytes: usize) {}
    /// Session `id` of `terminal` ended (a replaced one changes nothing).
    fn disconnected(&self, terminal: &str, id: u64);
    /// A signed execution report; `Ok` means it is stored (and acknowledged).
    fn report(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError>;
    /// A signed inventory report; `Ok` means it is taken.
    fn inventory(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError>;
    /// A signed audit report, the answer to an audit request.
    fn audit(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError>;
    /// Whether a session of `terminal` with `client_key` may still act:
    /// the terminal is enrolled and the key is still one of its keys. Asked
    /// on every message; the session ends when not.
    fn still_admitted(&self, terminal: &str, client_key: &ClientKey) -> bool;
    /// Whether an enrolment request's token would be accepted now, without
    /// spending it: asked before the costly work (a certificate, the TPM's
    /// credential), so a stranger without a token gets none of it.
    fn check_enrolment(&self, request: &EnrolmentRequest) -> Result<(), String>;
    /// Wait until everything taken so far is durable: the gateway answers
    /// an enrolment and acknowledges a report only then. `Err` says why
    /// it cannot be now.
    fn settled(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// What a connection may cost before and after it authenticates.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Authenticated sessions held at most (each costs memory and a file
    /// descriptor); one more is closed.
    pub max_sessions: usize,
    /// Connections that have not authenticated yet (TLS handshake and first
    /// message), in all and from one address. Over either, a new
    /// connection is closed at once: strangers cannot take the sessions'
    /// slots, and one address cannot take all of theirs.
    pub max_opening: usize,
    pub max_opening_per_address: usize,
    /// How long a new connection has to finish TLS and send its first
    /// message (at most [`MAX_OPENING_FRAME`] bytes).
    pub opening_timeout: Duration,
    /// A session silent this long is pinged; silent as long again, closed.
    pub idle_timeout: Duration,
    /// Bytes queued for one agent at most (see [`SessionTx`]).
    pub max_queued_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_sessions: 16_384,
            max_opening: 2_048,
            max_opening_per_address: 256,
            opening_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_queued_bytes: 1024 * 1024,
        }
    }
}

/// The message that carries the chain of trust rotations to an agent.
pub fn rotations_message(rotations: &[Vec<u8>]) -> ToAgent {
    ToAgent::TrustRotations {
        rotations: rotations
            .iter()
            .map(|r| serde_bytes::ByteBuf::from(r.clone()))
            .collect(),
    }
}

pub struct Gateway {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub ca: Arc<Ca>,
    /// The trust in force: what enrolment pins (signed with its dispatch
    /// key), and the rotations sent first on every session.
    pub trust: crate::trust::SharedTrust,
    pub fleet: Arc<dyn Fleet>,
    /// Validity of the client certificates issued at enrolment.
    pub client_cert_validity: Duration,
    pub now_ms: fn() -> u64,
    pub limits: Limits,
    /// The TPM manufacturers' roots EK certificates must chain to.
    pub tpm_roots: Arc<TpmRoots>,
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

use tenet_protocol::listen::{ConnectionSlots, Slot};
pub use tenet_protocol::session::{MAX_OPENING_FRAME, read_frame, write_frame, write_message};

/// Messages from authenticated agents are small but for reports with an
/// inventory. A frame's buffer grows with the bytes that arrive.
const MAX_FROM_AGENT: usize = 16 * 1024 * 1024;

/// Messages queued for one agent at most.
const QUEUED_MESSAGES: usize = 64;

/// The unit the per-address limit counts: an IPv4 address, or an IPv6 /64
/// (one host gets a whole /64, and can pick any address in it).
fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

fn next_session_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Gateway {
    /// Accept connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let sessions = Arc::new(tokio::sync::Semaphore::new(self.limits.max_sessions));
        let opening =
            ConnectionSlots::new(self.limits.max_opening, self.limits.max_opening_per_address);
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
            let Some(slot) = opening.take(address_group(peer.ip())) else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%peer, refused, "too many connections opening (in all or from this address); connection closed");
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            let sessions = sessions.clone();
            tokio::spawn(async move {
                // A connection's failure ends that connection only.
                if let Err(e) = gw.handle(stream, slot, &sessions).await {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
            });
        }
    }

    async fn handle(
        &self,
        stream: tokio::net::TcpStream,
        opening: Slot,
        sessions: &Arc<tokio::sync::Semaphore>,
    ) -> Result<(), GatewayError> {
        // A client that does not finish its handshake and a small first
        // message in time is dropped, so idle sockets cannot pile up.
        let open = async {
            let mut tls = self.acceptor.accept(stream).await?;
            let first: ToOperator = read_frame(&mut tls, MAX_OPENING_FRAME).await?;
            Ok::<_, GatewayError>((tls, first))
        };
        let (mut tls, first) = tokio::time::timeout(self.limits.opening_timeout, open)
            .await
            .map_err(|_| {
                GatewayError::Refused("no handshake and first message in time".into())
            })??;
        match first {
            ToOperator::Enrol(bytes) => {
                let answer = match self.enrol(&mut tls, &bytes).await {
                    Ok(response) => match self.fleet.settled().await {
                        Ok(()) => ToAgent::Enrolled(response),
                        Err(e) => ToAgent::EnrolmentRefused {
                            reason: format!("the operator cannot record the enrolment now: {e}"),
                        },
                    },
                    Err(reason) => ToAgent::EnrolmentRefused { reason },
                };
                self.answer_and_close(&mut tls, &answer).await?;
                drop(opening);
                Ok(())
            }
            ToOperator::Hello {
                terminal,
                agent_version,
            } => {
                let (key, agent) = self.admit(&tls, &terminal, &agent_version)?;
                let Ok(slot) = sessions.clone().try_acquire_owned() else {
                    tracing::warn!(
                        terminal,
                        limit = self.limits.max_sessions,
                        "session limit reached; connection closed"
                    );
                    return Err(GatewayError::Refused("too many sessions".into()));
                };
                drop(opening);
                let result = self
                    .session(tls, terminal, key, (agent, agent_version))
                    .await;
                drop(slot);
                result
            }
            // Would this agent be served? Answered, and no session starts:
            // nothing is dispatched to it, and the terminal's session (if
            // any) goes on.
            ToOperator::Probe {
                terminal,
                agent_version,
            } => {
                self.admit(&tls, &terminal, &agent_version)?;
                let welcome = ToAgent::Welcome {
                    operator_version: release::THIS.to_string(),
                };
                self.answer_and_close(&mut tls, &welcome).await?;
                tracing::info!(terminal, agent_version, "probed");
                drop(opening);
                Ok(())
            }
            _ => Err(GatewayError::Refused(
                "a connection starts with Hello, Probe or Enrol".into(),
            )),
        }
    }

    /// Send the one answer a connection gets, and close it, within the
    /// opening timeout.
    async fn answer_and_close<S: AsyncWrite + Unpin>(
        &self,
        tls: &mut S,
        answer: &ToAgent,
    ) -> Result<(), GatewayError> {
        let written = async {
            write_frame(tls, answer).await?;
            tls.shutdown().await
        };
        tokio::time::timeout(self.limits.opening_timeout, written)
            .await
            .map_err(|_| GatewayError::Refused("the answer was not read in time".into()))??;
        Ok(())
    }

    /// The client key a `Hello` (or `Probe`) of `terminal` comes with, if it
    /// is the one enrolled or renewed for it; then whether this operator
    /// serves its agent's version.
    fn admit(
        &self,
        tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        terminal: &str,
        agent_version: &str,
    ) -> Result<(ClientKey, Release), GatewayError> {
        let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
        let key = certs.first().and_then(|c| client_key(c));
        let Some(key) = key.filter(|k| self.fleet.admit(terminal, k)) else {
            return Err(GatewayError::Refused(format!(
                "the client certificate is not the one enrolled or renewed for terminal {terminal:?}"
            )));
        };
        match release::serves(Release::this(), agent_version) {
            Ok(agent) => Ok((key, agent)),
            Err(unserved) => {
                tracing::warn!(terminal, reason = unserved.reason(), "{unserved}");
                Err(GatewayError::Refused(unserved.to_string()))
            }
        }
    }

    async fn enrol<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        tls: &mut S,
        bytes: &[u8],
    ) -> Result<Vec<u8>, String> {
        let request = verify_enrolment_request(bytes).map_err(|e| e.to_string())?;
        self.fleet.check_enrolment(&request)?;
        // Everything that can refuse the request comes before the token is
        // spent: the certificate is made first, and thrown away if the
        // token is then refused.
        let (cert, client_key) = self
            .ca
            .issue_client(
                &request.tls_csr_pem,
                &request.terminal,
                self.client_cert_validity,
            )
            .map_err(|e| e.to_string())?;
        let tpm = tokio::time::timeout(self.limits.opening_timeout, self.tpm_trust(tls, &request))
            .await
            .unwrap_or_else(|_| TpmTrust::Claimed {
                reason: "the credential activation was not answered in time".into(),
            });
        match &tpm {
            TpmTrust::Claimed { reason } => {
                tracing::warn!(terminal = %request.terminal, %reason, "TPM claimed, not proven: counted as no TPM");
            }
            TpmTrust::Proven { .. } => {
                tracing::info!(terminal = %request.terminal, "TPM proven: EK certificate verified, attestation key activated");
            }
            TpmTrust::None => {}
        }
        self.fleet.enrol(&request, client_key, tpm)?;
        let (anchors, key) = {
            let t = self.trust.read().unwrap_or_else(PoisonError::into_inner);
            (t.anchors.clone(), t.dispatch_key.clone())
        };
        let response = EnrolmentResponse {
            terminal: request.terminal,
            trust: anchors,
            client_certificate_pem: cert,
            ca_certificate_pem: self.ca.cert_pem.clone(),
            issued_at_ms: (self.now_ms)(),
        };
        SignedMessage::signed(&response, key.as_ref())
            .map(|m| m.encode())
            .map_err(|e| e.to_string())
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        tls: S,
        terminal: String,
        key: ClientKey,
        (agent, agent_version): (Release, String),
    ) -> Result<(), GatewayError> {
        let (mut reader, mut writer) = tokio::io::split(tls);
        let (tx, mut rx) = SessionTx::channel(QUEUED_MESSAGES, self.limits.max_queued_bytes);
        let tx = tx.of_release(agent);
        let id = next_session_id();
        let replaced = Arc::new(Notify::new());
        // The writer gives up on an agent that does not read what it is sent
        // (one message not taken within the idle timeout), and says so.
        let writer_gone = Arc::new(Notify::new());
        // The rotations first, and registered under the same read lock: an
        // envelope signed by a rotated dispatch key verifies only once the
        // rotation is pinned, and a rotation installed meanwhile is pushed
        // to every registered session under the write lock.
        // The operator's version first, to the agents that read it.
        if release::knows(agent, release::WELCOME) {
            let _ = tx.try_send(ToAgent::Welcome {
                operator_version: release::THIS.to_string(),
            });
        }
        {
            let trust = self.trust.read().unwrap_or_else(PoisonError::into_inner);
            if !trust.rotations.is_empty()
                && tx.try_send(rotations_message(&trust.rotations)).is_err()
            {
                tracing::error!(
                    terminal,
                    rotations = trust.rotations.len(),
                    "the trust rotations do not fit the session's queue; envelopes signed by a rotated key will be refused"
                );
            }
            self.fleet.connected(
                &terminal,
                Session {
                    id,
                    to_agent: tx.clone(),
                    replaced: replaced.clone(),
                    agent_version,
                },
            );
        }
        let write_timeout = self.limits.idle_timeout;
        let gone = writer_gone.clone();
        let writer_task = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let written = tokio::time::timeout(write_timeout, write_message(&mut writer, &m));
                if !matches!(written.await, Ok(Ok(()))) {
                    break;
                }
            }
            gone.notify_one();
        });
        // One idle timer per session, not one per message: when it fires,
        // it is pushed back to the last message's time plus the timeout
        // unless the session really was silent that long (a timer per
        // message cost the 10,000-terminal benchmark about a tenth).
        let idle = self.limits.idle_timeout;
        let mut last_heard = tokio::time::Instant::now();
        let mut pinged = false;
        let timer = tokio::time::sleep(idle);
        tokio::pin!(timer);
        let result = loop {
            // One read per frame, kept across pings: a frame that arrives
            // slowly is not cut in two.
            let read = read_frame::<_, ToOperator>(&mut reader, MAX_FROM_AGENT);
            tokio::pin!(read);
            let message = loop {
                tokio::select! {
                    // An ended session handles nothing more, even frames
                    // that already arrived.
                    biased;
                    () = replaced.notified() => break Err(GatewayError::Refused(
                        "ended: a newer session of this terminal replaced it, or it was de-enrolled".into(),
                    )),
                    () = writer_gone.notified() => break Err(GatewayError::Refused(
                        "the agent does not read what it is sent".into(),
                    )),
                    m = &mut read => break m.map_err(GatewayError::from),
                    () = &mut timer => {
                        let silent_until = last_heard + idle;
                        if tokio::time::Instant::now() < silent_until {
                            timer.as_mut().reset(silent_until);
                            continue;
                        }
                        if pinged {
                            break Err(GatewayError::Refused("the agent stopped answering".into()));
                        }
                        pinged = true;
                        last_heard = tokio::time::Instant::now();
                        timer.as_mut().reset(last_heard + idle);
                        let _ = tx.try_send(ToAgent::Ping);
                    }
                }
            };
            last_heard = tokio::time::Instant::now();
            pinged = false;
            let message = match message {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            if !self.fleet.still_admitted(&terminal, &key) {
                break Err(GatewayError::Refused(format!(
                    "{terminal} is no longer enrolled with this session's key"
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
                    let answer = self.renew(&terminal, &key, csr_pem).await;
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
                // Only a bundle offered to this session by digest: nothing
                // else is sent for the asking.
                ToOperator::Want { digest } => {
                    match tx.take_offered(digest) {
                        Some(bundle) => {
                            let size = bundle.len();
                            if tx.send(ToAgent::Bundle { bundle }).await.is_err() {
                                break Ok(());
                            }
                            self.fleet.bundle_sent(size);
                            tracing::info!(terminal, digest = %hex::encode(digest), bytes = size, "bundle sent");
                        }
                        None => tracing::warn!(
                            terminal,
                            digest = %hex::encode(digest),
                            "asked for a bundle not offered to it; nothing sent"
                        ),
                    }
                    continue;
                }
                ToOperator::Hello { .. }
                | ToOperator::Probe { .. }
                | ToOperator::Enrol(_)
                | ToOperator::CredentialActivated { .. }
                | ToOperator::ActivationFailed { .. } => {
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
        self.fleet.disconnected(&terminal, id);
        drop(tx);
        writer_task.abort();
        result
    }

    /// How far the enrolling terminal's TPM is trusted: its EK certificate
    /// against the manufacturers' roots, then credential activation (one
    /// more round on the enrolment connection) for its attestation key.
    async fn tpm_trust<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        tls: &mut S,
        request: &EnrolmentRequest,
    ) -> TpmTrust {
        if !request.tpm {
            return TpmTrust::None;
        }
        let claimed = |reason: String| TpmTrust::Claimed { reason };
        let (Some(ak), Some(ek_der)) = (&request.attestation_key, &request.ek_certificate) else {
            return claimed("no attestation key or EK certificate was sent".into());
        };
        let (ek, ek_id) = match self.tpm_roots.verify_ek(ek_der, (self.now_ms)()) {
            Ok(verified) => verified,
            Err(reason) => return claimed(reason),
        };
        let Some(name) = attestation_key_name(ak) else {
            return claimed("the attestation key is not an ECDSA P-256 key".into());
        };
        let credential = match make_credential(&ek, &name) {
            Ok(c) => c,
            Err(reason) => return claimed(reason),
        };
        let challenge = ToAgent::ActivateCredential {
            credential_blob: credential.credential_blob,
            secret: credential.secret,
        };
        if write_frame(tls, &challenge).await.is_err() {
            return claimed("the credential could not be sent".into());
        }
        match read_frame::<_, ToOperator>(tls, MAX_OPENING_FRAME).await {
            Ok(ToOperator::CredentialActivated { secret })
                if activation_matches(&credential.credential, &secret) =>
            {
                TpmTrust::Proven { ek: ek_id }
            }
            Ok(ToOperator::CredentialActivated { .. }) => claimed(
                "the TPM recovered another secret: the attestation key is not in the TPM the EK certificate belongs to".into(),
            ),
            Ok(ToOperator::ActivationFailed { reason }) => {
                claimed(format!("the terminal's TPM could not activate the credential: {reason}"))
            }
            Ok(_) | Err(_) => claimed("no answer to the credential activation".into()),
        }
    }

    /// A renewed client certificate for the session's terminal (the name is
    /// the session's, never the request's), registered before it is given.
    async fn renew(&self, terminal: &str, current: &ClientKey, csr_pem: &str) -> ToAgent {
        let (pem, renewed) =
            match self
                .ca
                .issue_client(csr_pem, terminal, self.client_cert_validity)
            {
                Ok(issued) => issued,
                Err(e) => {
                    return ToAgent::RenewalRefused {
                        reason: e.to_string(),
                    };
                }
            };
        if !self.fleet.renewing(terminal, current, renewed) {
            return ToAgent::RenewalRefused {
                reason: format!("{terminal} is no longer enrolled"),
            };
        }
        match self.fleet.settled().await {
            Ok(()) => ToAgent::Certificate { pem },
            Err(e) => ToAgent::RenewalRefused {
                reason: format!("the operator cannot record the renewal now: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests;

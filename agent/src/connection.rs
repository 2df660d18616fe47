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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tenet_protocol::enrol::{EnrolmentRequest, EnrolmentResponse, TrustAnchors};
use tenet_protocol::inventory::InventoryReport;
use tenet_protocol::session::SharedBytes;
use tenet_protocol::session::{FrameError, MAX_SESSION_FRAME, ToAgent, ToOperator};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Kind, Rejection, SignedMessage, Signer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::AgentConfig;
use crate::dispatch;
use crate::self_update;
use crate::session::{Runs, Taken, Terminal};
use crate::store::{LocalState, StoreError, write_atomically};
pub use crate::tls::{enrolment_tls, session_tls};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    LocalState(#[from] StoreError),
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
    pub store: LocalState,
    pub identity: Box<dyn Signer>,
    /// The TPM the identity key lives in, for quotes.
    pub tpm: Option<std::rc::Rc<crate::tpm::TpmIdentity>>,
    /// The presentation key and the security certificate held for it.
    pub presenter: Arc<crate::audit::Presenter>,
    /// The `tenet-agent` binary, for loaders.
    pub exe: PathBuf,
    /// The payloads running and waiting.
    pub runs: Runs,
    /// The binary this process runs, to see a run replace it (`None`: not
    /// known, no self-update).
    pub running: Arc<std::sync::Mutex<Option<self_update::Exe>>>,
    /// Runs that replaced the binary ask the connection loop to hand over
    /// ([`Agent::hand_over`]); each waits for its answer.
    pub handovers: Handovers,
    /// The version the operator said in its last `Welcome` (`None`: an
    /// operator of 0.1, or not connected yet). Nothing this agent writes
    /// differs by it yet; a future format will (`protocol/README.md`).
    pub operator_version: std::sync::Mutex<Option<String>>,
}

/// The way from a payload run to the connection loop: a run that replaced
/// the agent's binary asks for the handover and waits until it is done
/// (the new agent runs in this process by then, or the old one goes on).
pub struct Handovers {
    tx: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
    rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>>,
}

impl Default for Handovers {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Handovers {
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
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
        let (tls_key, csr) = crate::tls::csr(&self.config.terminal)?;
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
            None => no_tpm(blob, secret),
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
        // Stamped when collection starts: a collection that overlaps the
        // end of a payload's run is not taken for the state after it
        // (the operator compares the stamp with the run's finish).
        let started = now_ms();
        let inventory = self
            .config
            .inventory_source()
            .collect()
            .map_err(|e| ConnError::Io(std::io::Error::other(e.to_string())))?;
        let report = InventoryReport {
            terminal: self.config.terminal.clone(),
            sequence: started,
            collected_at_ms: started,
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
        // A handover a crash or a restart cut short ends here.
        self.at_start().await;
        let mut handovers = self.handovers.rx.lock().await;
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let connected = async {
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
            };
            tokio::select! {
                () = connected => {}
                // The session ends here (its connection is dropped).
                Some(done) = handovers.recv() => {
                    self.hand_over().await;
                    let _ = done.send(());
                }
            }
        }
    }

    /// A run replaced this agent's binary: prove the new one, then run it
    /// in this process, or put the previous one back
    /// ([`crate::self_update`]). Returns only when rolled back. Each step
    /// is recorded first (`DATA/handover/state`), so an agent that starts
    /// in the middle ends it ([`Agent::at_start`]).
    pub async fn hand_over(&self) {
        let data = self.store.dir().to_path_buf();
        let previous = data.join("agent-previous");
        if let Err(e) = self_update::keep_running_binary(&previous) {
            // Nothing to roll back to: the new binary stays, and nothing
            // says it works. The run's report says so, not that it worked.
            let reason = format!(
                "the running agent could not be kept ({e}) to roll back to, so the new agent ({}) was not tried; it stays at its path and runs at the agent's next start",
                self.exe.display()
            );
            tracing::error!(%reason, "self-update not handed over");
            self.rewrite_held(&reason, None);
            return;
        }
        let deadline = self.config.self_update.deadline();
        if let Err(e) = self_update::write_state(
            &data,
            &self_update::Handover::Proving { since_ms: now_ms() },
        ) {
            tracing::error!(error = %e, "cannot record the handover");
        }
        tracing::info!(
            new = %self.exe.display(),
            deadline_s = deadline.as_secs(),
            "the agent's binary was replaced: proving the new one"
        );
        let end = self_update::probe(&self.exe, &self.config_path, deadline).await;
        let reason = match self_update::rollback_reason(&end, &self.exe, deadline) {
            None => {
                // The held reports stay held: the new agent sends them as
                // it starts (or, when it cannot be executed, they are
                // rewritten below).
                if let Err(e) = self_update::clear_state(&data) {
                    tracing::error!(error = %e, "cannot record the end of the handover");
                }
                tracing::info!(new = %self.exe.display(), ?end, "handing over to the new agent");
                let err = self.execute();
                format!(
                    "the new agent ({}) does not start: {err}",
                    self.exe.display()
                )
            }
            Some(reason) => reason,
        };
        self.roll_back(&reason);
    }

    /// Execute the binary at the agent's path in this process, with this
    /// process's arguments; returns only when that fails.
    fn execute(&self) -> std::io::Error {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(&self.exe)
            .args(std::env::args_os().skip(1))
            .exec()
    }

    /// Roll back: recorded first, then the previous binary put back at the
    /// agent's path, the package flagged, the held reports rewritten.
    fn roll_back(&self, reason: &str) {
        let reason = format!(
            "{reason}; the previous agent ({}) runs again",
            env!("CARGO_PKG_VERSION")
        );
        if let Err(e) = self_update::write_state(
            self.store.dir(),
            &self_update::Handover::RollingBack {
                reason: reason.clone(),
            },
        ) {
            tracing::error!(error = %e, "cannot record the rollback");
        }
        self.finish_roll_back(&reason);
    }

    /// Put the kept binary back at the agent's path (again, if it is there
    /// already), record the rollback, rewrite the held reports.
    fn finish_roll_back(&self, reason: &str) {
        let data = self.store.dir();
        let previous = data.join("agent-previous");
        let reason = match self_update::restore(&previous, &self.exe) {
            Ok(()) => reason.to_string(),
            Err(e) => format!(
                "{reason} (but it could not be put back at {}: {e})",
                self.exe.display()
            ),
        };
        tracing::warn!(%reason, "self-update rolled back");
        *self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = self_update::Exe::at(&self.exe);
        let restored_sha256 = self_update::file_sha256(&previous).unwrap_or_default();
        self.rewrite_held(&reason, Some(restored_sha256));
        if let Err(e) = self_update::clear_state(data) {
            tracing::error!(error = %e, "cannot record the end of the rollback");
        }
    }

    /// Flag the agent's package at the version the package database names
    /// now (`restored`: the SHA-256 of the binary put back, if one was),
    /// and queue each held report rewritten as refused `RolledBack` with
    /// `reason`, observing the terminal as it is now.
    fn rewrite_held(&self, reason: &str, restored: Option<[u8; 32]>) {
        let source = self.config.inventory_source();
        let mut observed = source.collect().ok();
        if let Some(version) = observed.as_ref().and_then(|inv| {
            inv.packages
                .iter()
                .find(|p| p.name == self_update::PACKAGE)
                .map(|p| p.version.clone())
        }) {
            let record = self_update::RolledBack {
                package_version: version,
                reason: reason.to_string(),
                at_ms: now_ms(),
                restored_sha256: restored.unwrap_or_default(),
            };
            if let Err(e) = self_update::write_record(self.store.dir(), &record) {
                tracing::error!(error = %e, "cannot record the rollback");
            }
            if let Some(inv) = observed.as_mut() {
                self_update::flag(inv, &record);
            }
        }
        let held = match self.store.held_reports() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the held reports");
                return;
            }
        };
        for (path, bytes) in held {
            let rewritten = SignedMessage::decode(&bytes, Kind::ExecutionReport)
                .and_then(|f| f.open::<tenet_protocol::report::ExecutionReport>())
                .map_err(|e| e.to_string())
                .and_then(|report| {
                    let report =
                        self_update::rolled_back_report(report, reason, observed.clone(), now_ms());
                    SignedMessage::signed(&report, self.identity.as_ref())
                        .map(|m| m.encode())
                        .map_err(|e| e.to_string())
                });
            let sequence = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or_else(now_ms);
            let queued = match rewritten {
                Ok(report) => self.store.push_report(sequence, &report),
                // Sent as it is rather than lost.
                Err(e) => {
                    tracing::error!(error = %e, "cannot rewrite a held report");
                    self.store.push_report(sequence, &bytes)
                }
            };
            match queued {
                Ok(_) => {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => tracing::error!(error = %e, "cannot queue a held report"),
            }
        }
    }

    /// Before the first session: end a handover a crash or a restart cut
    /// short ([`self_update::at_start`]).
    async fn at_start(&self) {
        let data = self.store.dir().to_path_buf();
        match self_update::at_start(self_update::read_state(&data)) {
            self_update::AtStart::ReleaseHeld => match self.store.release_held() {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    reports = n,
                    "the new agent sends the reports held for its handover"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot release the reports held for a handover")
                }
            },
            // Restarted while on probation: this binary proves itself.
            self_update::AtStart::Prove => {
                let deadline = self.config.self_update.deadline();
                match self.probe_until(deadline).await {
                    Ok(_) => {
                        tracing::info!("the new agent proved itself after a restart");
                        let _ = self_update::clear_state(&data);
                        let _ = self.store.release_held();
                    }
                    Err(e) => {
                        self.roll_back(&format!(
                            "the new agent ({}) did not reach the operator within {} s after a restart: {e}",
                            self.exe.display(),
                            deadline.as_secs()
                        ));
                        self.run_previous_if_not_it();
                    }
                }
            }
            self_update::AtStart::FinishRollBack { reason } => {
                self.finish_roll_back(&reason);
                self.run_previous_if_not_it();
            }
        }
    }

    /// `tenet-agent resume-handover`, run before the agent starts by the
    /// binary kept before the last self-update (it worked): end a handover
    /// a crash or a restart cut short, whatever the binary on probation
    /// does at its start, even when it does not start at all. What it did.
    pub async fn resume_handover(&self) -> String {
        let data = self.store.dir().to_path_buf();
        match self_update::at_start(self_update::read_state(&data)) {
            self_update::AtStart::ReleaseHeld => "no handover in progress".into(),
            self_update::AtStart::Prove => {
                let deadline = self.config.self_update.deadline();
                let end = self_update::probe(&self.exe, &self.config_path, deadline).await;
                match self_update::rollback_reason(&end, &self.exe, deadline) {
                    None => {
                        let _ = self_update::clear_state(&data);
                        format!("the new agent ({}) proved itself", self.exe.display())
                    }
                    Some(reason) => {
                        self.roll_back(&format!("{reason}, proved again after a restart"));
                        format!("rolled back: {reason}")
                    }
                }
            }
            self_update::AtStart::FinishRollBack { reason } => {
                self.finish_roll_back(&reason);
                format!("rolled back: {reason}")
            }
        }
    }

    /// After a rollback at start: when this process is not the binary put
    /// back, execute it.
    fn run_previous_if_not_it(&self) {
        let running = self_update::file_sha256(Path::new("/proc/self/exe"));
        if running.is_some() && running != self_update::file_sha256(&self.exe) {
            let e = self.execute();
            tracing::error!(error = %e, "cannot execute the agent put back; this one goes on");
        }
    }

    /// Ask until `deadline` whether the operator serves this agent
    /// ([`Agent::probe`]), trying again after a failure.
    pub async fn probe_until(&self, deadline: Duration) -> Result<String, ConnError> {
        let until = tokio::time::Instant::now() + deadline;
        let mut failures = 0;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let e = match tokio::time::timeout(left, self.probe()).await {
                Ok(Ok(version)) => return Ok(version),
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(ConnError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "not welcomed by the operator within {} s",
                            deadline.as_secs()
                        ),
                    )));
                }
            };
            let delay = backoff(failures, jitter()).min(Duration::from_secs(5));
            failures += 1;
            if tokio::time::Instant::now() + delay >= until {
                return Err(e);
            }
            tracing::info!(error = %e, "probe failed; trying again");
            tokio::time::sleep(delay).await;
        }
    }

    /// Connect, authenticate, and ask whether the operator serves this
    /// agent (`Probe`: no session starts). The operator's version.
    pub async fn probe(&self) -> Result<String, ConnError> {
        let mut tls = self.connect(self.session_tls()?).await?;
        write_frame(
            &mut tls,
            &ToOperator::Probe {
                terminal: self.config.terminal.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            },
        )
        .await?;
        match read_frame::<_, ToAgent>(&mut tls, MAX_SESSION_FRAME).await? {
            ToAgent::Welcome { operator_version } => Ok(operator_version),
            _ => Err(Rejection::Malformed(
                "the operator answered a probe with something else".into(),
            )
            .into()),
        }
    }

    /// Whether `bytes` is the bundle `digest` names, signed by the pinned
    /// admins, unexpired, its artifacts whole.
    fn verify_bundle(&self, digest: &[u8; 32], bytes: &[u8]) -> Result<(), String> {
        let trust = self.store.trust().map_err(|e| e.to_string())?;
        let trust = tenet_protocol::bundle::BundleTrust {
            admin_keys: trust.admin_keys.clone(),
            threshold: usize::from(trust.admin_threshold),
        };
        tenet_protocol::bundle::verify_bundle(bytes, &trust, Some(digest), now_ms())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// One connection, until it ends.
    pub async fn session(&self) -> Result<(), ConnError> {
        let tls = self.connect(self.session_tls()?).await?;
        let every = Duration::from_secs(self.config.inventory_interval_seconds.max(1));
        crate::session::hold(
            self,
            tls,
            crate::session::Settings {
                inventory_every: Some(every),
            },
        )
        .await
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
}

/// A real terminal: reports queue in files of the data directory, each
/// payload runs in a loader process of its own.
impl Terminal for Agent {
    type Queued = PathBuf;

    fn name(&self) -> &str {
        &self.config.terminal
    }

    fn agent_version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }

    fn inventory(&self) -> Result<Vec<u8>, ConnError> {
        self.inventory_report()
    }

    fn outbox(&self) -> Result<Vec<(PathBuf, Vec<u8>)>, ConnError> {
        Ok(self.store.pending_reports()?)
    }

    fn acknowledge(&self, queued: PathBuf, _digest: &[u8; 32]) -> Result<(), ConnError> {
        Ok(self.store.acknowledge(&queued)?)
    }

    fn pinned_trust(&self) -> Result<TrustAnchors, String> {
        self.store.trust().map_err(|e| e.to_string())
    }

    fn pin_trust(&self, anchors: &TrustAnchors) -> Result<(), String> {
        self.store.set_trust(anchors).map_err(|e| e.to_string())
    }

    fn take(&self, envelope: &[u8], bundle: SharedBytes) -> Result<Taken<PathBuf>, String> {
        // Opened first: once the envelope is recorded as used, nothing may
        // stop it from running or being refused with a report.
        let store = LocalState::open(self.store.dir()).map_err(|e| e.to_string())?;
        let prepared = dispatch::prepare(
            &self.store,
            self.identity.as_ref(),
            &self.config.terminal,
            envelope,
            &bundle,
            now_ms(),
        )
        .map_err(|e| e.to_string())?;
        let prepared = match prepared {
            Ok(p) => p,
            Err(refused) => {
                return Ok(Taken::Refused {
                    queued: refused.queued,
                    report: refused.report,
                });
            }
        };
        let (exe, config) = (self.exe.clone(), self.config_path.clone());
        let (policy, sequence) = (prepared.policy.clone(), prepared.sequence);
        let running = self.running.clone();
        let handovers = self.handovers.tx.clone();
        Ok(Taken::Run {
            policy,
            sequence,
            run: Box::new(move |stop| {
                Box::pin(async move {
                    let agent = running
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    let ran =
                        dispatch::run_loader(&exe, &config, &store, prepared, stop, agent.as_ref())
                            .await;
                    // However the run ended (its report held, or none: it
                    // was superseded, or its loader failed), a replaced
                    // binary is handed over to or rolled back.
                    let replaced = match &ran {
                        Ok(d) => d.held,
                        Err(e) => {
                            tracing::error!(error = %e, "a dispatch failed");
                            agent.as_ref().is_some_and(self_update::Exe::replaced)
                        }
                    };
                    // Nothing else starts until the handover is over: this
                    // run holds the terminal's one run slot.
                    if replaced {
                        let (done, over) = tokio::sync::oneshot::channel();
                        if handovers.send(done).is_ok() {
                            let _ = over.await;
                        }
                    }
                })
            }),
        })
    }

    fn runs(&self) -> &Runs {
        &self.runs
    }

    fn cached_bundle(&self, digest: &[u8; 32]) -> Option<SharedBytes> {
        let bytes = self.store.cached_bundle(digest)?;
        // Signed as the pinned admins require now (they may have rotated,
        // or raised the threshold since): otherwise it goes, and the
        // operator's copy is asked for.
        if let Err(e) = self.verify_bundle(digest, &bytes) {
            tracing::warn!(digest = %hex::encode(digest), error = %e, "a cached bundle no longer verifies; removed");
            self.store.drop_bundle(digest);
            return None;
        }
        tracing::info!(digest = %hex::encode(digest), "bundle from the cache");
        Some(SharedBytes::new(bytes))
    }

    fn keep_bundle(&self, digest: &[u8; 32], bundle: &SharedBytes) {
        if let Err(e) = self.verify_bundle(digest, bundle) {
            tracing::warn!(digest = %hex::encode(digest), error = %e, "a bundle that does not verify is not kept");
            return;
        }
        let limit = self.config.bundle_cache_mib.saturating_mul(1 << 20);
        if let Err(e) = self.store.keep_bundle(digest, bundle, limit) {
            tracing::warn!(error = %e, "cannot keep the bundle; it will be asked for again");
        }
    }

    fn welcomed(&self, operator_version: &str) {
        *self
            .operator_version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(operator_version.to_string());
        // Another binary than the one put back runs at the agent's path
        // and reached the operator: the rollback record is history.
        if let Some(record) = self_update::read_record(self.store.dir())
            && self_update::file_sha256(&self.exe).is_some_and(|h| h != record.restored_sha256)
            && self_update::file_sha256(Path::new("/proc/self/exe"))
                == self_update::file_sha256(&self.exe)
        {
            tracing::info!(version = %record.package_version, "the agent at the path runs and reached the operator: its rollback record goes");
            let _ = std::fs::remove_file(self.store.dir().join("rolled-back"));
        }
    }

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

    fn hold(&self, certificate: Option<Vec<u8>>) {
        let issuer = match self.store.trust() {
            Ok(t) => t.issuer_key,
            Err(e) => {
                tracing::error!(error = %e, "no pinned issuer key");
                return;
            }
        };
        match self.presenter.hold(certificate, &issuer, now_ms()) {
            Ok(Some(level)) => tracing::info!(level, "security certificate held"),
            Ok(None) => tracing::warn!("security certificate withdrawn by the issuer"),
            Err(e) => tracing::error!(error = %e, "security certificate refused"),
        }
    }

    /// Whether less than half of the client certificate's validity is left.
    fn renewal_due(&self) -> bool {
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

    fn renewed(&self, key: rcgen::KeyPair, pem: &str) -> Result<(), ConnError> {
        let dir = self.store.dir();
        write_atomically(&dir.join("tls.key"), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&dir.join("tls.crt"), pem.as_bytes(), 0o644)?;
        Ok(())
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

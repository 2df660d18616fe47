//! `tenet-agent simulate`: many terminals in one process, for the quick
//! start and the benchmark. Each simulated terminal is a real agent on the
//! wire: its own Ed25519 identity key, its own enrolment (bootstrap token,
//! proof of possession, its own mTLS client certificate), its own held
//! connection, its own signed inventories, and every dispatch verified and
//! run exactly as a real terminal's loader does (operator signature,
//! freshness, target, sequence, the admins' signatures on the bundle, the
//! capabilities), then a signed report carrying the nonce back.
//!
//! What is simulated is the machine under the agent: the WASM payload runs
//! in this process (one shared engine, modules compiled once per bundle),
//! and its host calls act on an in-memory terminal:
//!
//! | artifact the payload runs | what the simulated terminal does |
//! |---|---|
//! | `install-deb.sh X.deb...` | installs each named `.deb` artifact, its package name and version read from the Debian file name `NAME_VERSION_ARCH.deb` |
//! | `remove-packages.sh P...` | removes the named packages |
//! | `ensure-service.sh S` | marks service `S` running and enabled |
//! | anything else | exits 127: the simulation has no model of it |
//!
//! `write_file` records the file's SHA-256 in the inventory. Identities live
//! in memory only: a new simulation enrols new terminals (use another
//! `--prefix`, or a fresh operator).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tenet_protocol::bundle::Artifact;
use tenet_protocol::enrol::{EnrolmentRequest, TrustAnchors};
use tenet_protocol::envelope::EnvelopeState;
use tenet_protocol::inventory::{
    FileEntry, Inventory, InventoryReport, Package, PackageManager, Service, ServiceState,
};
use tenet_protocol::session::{MAX_SESSION_FRAME, ToAgent, ToOperator};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Algorithm, KeyPair, SignedMessage, Signer};
use tokio::sync::Semaphore;

use crate::connection::{
    ConnError, backoff, enrolment_tls, exchange_enrolment, jitter, no_tpm, now_ms, read_frame,
    session_tls, write_frame,
};
use crate::exec::{Limits, Loader, Runtime, System};

/// What to simulate, and where the operator is.
pub struct Options {
    /// The operator's gateway, `host:port`.
    pub operator: String,
    /// The name the gateway's certificate carries (defaults to the host).
    pub server_name: Option<String>,
    pub count: usize,
    /// Terminal names are `PREFIX-00001`, ...
    pub prefix: String,
    /// A bootstrap token with at least `count` uses.
    pub token: String,
    /// `sha256:<hex>` of the operator's agent CA.
    pub ca_fingerprint: String,
    /// Inventories the terminals start from, taken in turn.
    pub templates: Vec<Inventory>,
    /// How many connections are opened at once.
    pub connect_parallelism: usize,
    /// How long a simulated payload takes (an install is not instant).
    pub run_delay: Duration,
}

/// Counters of the whole simulation.
#[derive(Default)]
pub struct Counters {
    pub enrolled: AtomicU64,
    pub connected: AtomicU64,
    pub dispatches: AtomicU64,
    pub reports_acked: AtomicU64,
    pub refused: AtomicU64,
    pub failures: AtomicU64,
    /// Dispatches for a (policy, generation) whose successful report the
    /// operator had already acknowledged: a verified result it lost. Must
    /// stay 0, crashes included.
    pub redispatched: AtomicU64,
}

/// The machine under one simulated agent.
pub struct SimSystem {
    inventory: Mutex<Inventory>,
}

/// Package name and version of a Debian file name `NAME_VERSION_ARCH.deb`.
pub fn deb_file_name(name: &str) -> Option<(String, String)> {
    let stem = name.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (package, version, _arch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || package.is_empty() || version.is_empty() {
        return None;
    }
    // Debian file names write an epoch's colon as %3a.
    Some((package.to_string(), version.replace("%3a", ":")))
}

impl SimSystem {
    pub fn new(inventory: Inventory) -> SimSystem {
        SimSystem {
            inventory: Mutex::new(inventory),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inventory) -> R) -> R {
        let mut inv = self
            .inventory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut inv)
    }
}

impl System for SimSystem {
    fn inventory(&self) -> Result<Inventory, String> {
        Ok(self.with(|i| i.clone()))
    }

    fn write_file(&self, path: &str, data: &[u8]) -> i32 {
        self.with(|inv| {
            inv.files.retain(|f| f.path != path);
            inv.files.push(FileEntry {
                path: path.to_string(),
                sha256: hex::encode(sha256(data)),
                size: data.len() as u64,
            });
        });
        0
    }

    fn run_artifact(
        &self,
        artifacts: &[Artifact],
        artifact: &Artifact,
        args: &[&str],
        _deadline: Instant,
    ) -> (i32, Vec<u8>) {
        if sha256(&artifact.data) != artifact.sha256 {
            return (
                -3,
                format!(
                    "artifact {} does not match its digest; not run\n",
                    artifact.name
                )
                .into_bytes(),
            );
        }
        let mut out = String::new();
        let code = match artifact.name.as_str() {
            "install-deb.sh" => self.with(|inv| {
                for arg in args {
                    let known = artifacts.iter().any(|a| a.name == *arg);
                    let Some((name, version)) = deb_file_name(arg).filter(|_| known) else {
                        out.push_str(&format!("dpkg: error: cannot access archive '{arg}'\n"));
                        return 2;
                    };
                    inv.packages.retain(|p| p.name != name);
                    out.push_str(&format!("Setting up {name} ({version}) ...\n"));
                    inv.packages.push(Package {
                        name,
                        version,
                        manager: PackageManager::Dpkg,
                    });
                }
                0
            }),
            "remove-packages.sh" => self.with(|inv| {
                for arg in args {
                    if inv.packages.iter().any(|p| p.name == *arg) {
                        out.push_str(&format!("Purging configuration files for {arg} ...\n"));
                    }
                    inv.packages.retain(|p| p.name != *arg);
                }
                0
            }),
            "ensure-service.sh" => self.with(|inv| {
                let Some(name) = args.first() else {
                    out.push_str("usage: ensure-service.sh SERVICE\n");
                    return 2;
                };
                inv.services.retain(|s| s.name != *name);
                inv.services.push(Service {
                    name: name.to_string(),
                    state: ServiceState::Running,
                    enabled: true,
                });
                0
            }),
            other => {
                out.push_str(&format!("the simulation has no model of {other}\n"));
                127
            }
        };
        (code, out.into_bytes())
    }
}

/// A (policy, generation) a successful report settles.
type Settles = Option<(String, u64)>;

/// A report in the outbox: its bytes, what it settles, the session it was
/// first sent in.
type Outgoing = (Vec<u8>, Settles, u64);

/// One simulated terminal.
struct Terminal {
    name: String,
    identity: KeyPair,
    system: Arc<SimSystem>,
    envelopes: Mutex<EnvelopeState>,
    trust: OnceLock<TrustAnchors>,
    tls: OnceLock<Arc<rustls::ClientConfig>>,
    /// Signed reports not yet acknowledged, with the (policy, generation)
    /// of the successful ones and the session they were first sent in.
    outbox: Mutex<Vec<Outgoing>>,
    /// Sessions so far.
    sessions: AtomicU64,
    /// (policy, generation) whose successful report was acknowledged.
    settled: Mutex<std::collections::HashSet<(String, u64)>>,
}

struct Shared {
    address: String,
    server_name: ServerName<'static>,
    token: String,
    fingerprint: [u8; 32],
    runtime: Runtime,
    counters: Arc<Counters>,
    /// Opening connections (TLS handshakes) a few at a time.
    opening: Semaphore,
    /// Payload runs at once (CPU bound).
    running: Arc<Semaphore>,
    run_delay: Duration,
}

impl Shared {
    async fn tcp(&self) -> Result<tokio::net::TcpStream, ConnError> {
        let tcp = tokio::net::TcpStream::connect(&self.address).await?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

impl Terminal {
    fn inventory_report(&self) -> Result<Vec<u8>, ConnError> {
        let inventory = self.system.with(|i| i.clone());
        let now = now_ms();
        let report = InventoryReport {
            terminal: self.name.clone(),
            sequence: now,
            collected_at_ms: now,
            inventory,
        };
        Ok(SignedMessage::signed(&report, &self.identity)?.encode())
    }

    async fn enrol(&self, shared: &Shared) -> Result<(), ConnError> {
        let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        let csr = rcgen::CertificateParams::new(vec![self.name.clone()])
            .and_then(|p| p.serialize_request(&tls_key))
            .and_then(|r| r.pem())
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        let labels = self.system.with(|i| i.labels.clone());
        let request = EnrolmentRequest {
            token: shared.token.clone(),
            terminal: self.name.clone(),
            labels,
            identity: self.identity.public_key(),
            tpm: false,
            attestation_key: None,
            ek_certificate: None,
            tls_csr_pem: csr,
            requested_at_ms: now_ms(),
        };
        let signed = SignedMessage::signed(&request, &self.identity)?.encode();
        let response = {
            let _permit = shared.opening.acquire().await;
            let tls =
                tokio_rustls::TlsConnector::from(Arc::new(enrolment_tls(shared.fingerprint)?))
                    .connect(shared.server_name.clone(), shared.tcp().await?)
                    .await?;
            exchange_enrolment(tls, signed, shared.fingerprint, &self.name, no_tpm).await?
        };
        let bad = |e: rustls::pki_types::pem::Error| ConnError::Certificate(e.to_string());
        let ca =
            CertificateDer::from_pem_slice(response.ca_certificate_pem.as_bytes()).map_err(bad)?;
        let cert = CertificateDer::from_pem_slice(response.client_certificate_pem.as_bytes())
            .map_err(bad)?;
        let key = PrivateKeyDer::from_pem_slice(tls_key.serialize_pem().as_bytes()).map_err(bad)?;
        let _ = self.tls.set(Arc::new(session_tls(ca, cert, key)?));
        let _ = self.trust.set(response.trust);
        Ok(())
    }

    /// Verify and run one dispatch in this process; the signed report, and
    /// the (policy, generation) it settles when it succeeded.
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        shared: &Shared,
        envelope: &[u8],
        bundle: &[u8],
    ) -> Result<(Vec<u8>, Option<(String, u64)>), ConnError> {
        let trust = self
            .trust
            .get()
            .ok_or_else(|| ConnError::Certificate("not enrolled".into()))?;
        let mut state = self
            .envelopes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let loader = Loader {
            terminal: &self.name,
            trust,
            identity: &self.identity,
            system: self.system.clone(),
            runtime: &shared.runtime,
            limits: Limits {
                memory_bytes: 16 * 1024 * 1024,
                max_run: Duration::from_secs(60),
            },
            now_ms,
        };
        let result = loader
            .run(envelope, bundle, &state)
            .map_err(|e| ConnError::Certificate(e.to_string()))?;
        let settles = match &result.accepted {
            Some(v) => {
                state.accept(v);
                let key = (v.envelope.policy.clone(), v.envelope.policy_generation);
                if self.settled.lock().is_ok_and(|s| s.contains(&key)) {
                    shared.counters.redispatched.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        terminal = %self.name,
                        policy = %key.0,
                        generation = key.1,
                        "dispatched again after its success was acknowledged"
                    );
                }
                matches!(
                    result.outcome,
                    tenet_protocol::report::Outcome::Exited { code: 0 }
                )
                .then_some(key)
            }
            None => {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        Ok((result.report, settles))
    }

    /// One connection, until it ends.
    async fn session(self: &Arc<Self>, shared: &Arc<Shared>) -> Result<(), ConnError> {
        let tls = self
            .tls
            .get()
            .cloned()
            .ok_or_else(|| ConnError::Certificate("not enrolled".into()))?;
        let stream = {
            let _permit = shared.opening.acquire().await;
            tokio_rustls::TlsConnector::from(tls)
                .connect(shared.server_name.clone(), shared.tcp().await?)
                .await?
        };
        self.sessions.fetch_add(1, Ordering::Relaxed);
        let (mut reader, mut writer) = tokio::io::split(stream);
        write_frame(
            &mut writer,
            &ToOperator::Hello {
                terminal: self.name.clone(),
                agent_version: concat!(env!("CARGO_PKG_VERSION"), "-simulated").into(),
            },
        )
        .await?;
        let pending: Vec<Vec<u8>> = self.outbox_snapshot();
        for report in pending {
            write_frame(&mut writer, &ToOperator::Report(report)).await?;
        }
        write_frame(
            &mut writer,
            &ToOperator::Inventory(self.inventory_report()?),
        )
        .await?;
        shared.counters.connected.fetch_add(1, Ordering::Relaxed);
        let result = async {
            loop {
                let message: ToAgent = read_frame(&mut reader, MAX_SESSION_FRAME).await?;
                match message {
                    ToAgent::Dispatch { envelope, bundle } => {
                        shared.counters.dispatches.fetch_add(1, Ordering::Relaxed);
                        if !shared.run_delay.is_zero() {
                            tokio::time::sleep(shared.run_delay).await;
                        }
                        let permit = shared.running.clone().acquire_owned().await;
                        let (t, s) = (self.clone(), shared.clone());
                        let report = tokio::task::spawn_blocking(move || {
                            let _permit = permit;
                            t.run(&s, &envelope, &bundle)
                        })
                        .await
                        .map_err(|e| ConnError::Io(std::io::Error::other(e)))??;
                        let (report, settles) = report;
                        self.outbox_push(report.clone(), settles);
                        write_frame(&mut writer, &ToOperator::Report(report)).await?;
                    }
                    ToAgent::Ack { digest } => {
                        // A digest no longer in the outbox: acknowledged before.
                        if self.outbox_remove(&digest) {
                            shared
                                .counters
                                .reports_acked
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    ToAgent::InventoryWanted => {
                        write_frame(
                            &mut writer,
                            &ToOperator::Inventory(self.inventory_report()?),
                        )
                        .await?;
                    }
                    ToAgent::Ping => write_frame(&mut writer, &ToOperator::Pong).await?,
                    ToAgent::Audit {
                        nonce,
                        pcrs,
                        packages,
                        services,
                    } => {
                        // No TPM here: posture only. The certificate names
                        // the identity key: simulated terminals answer no peers.
                        let request = crate::audit::AuditRequest {
                            nonce,
                            pcrs,
                            packages,
                            services,
                        };
                        let inventory = self.system.with(|i| i.clone());
                        let presentation = self.identity.public_key();
                        let report = crate::audit::audit(
                            &self.name,
                            &self.identity,
                            None,
                            presentation,
                            &inventory,
                            std::path::Path::new("/nonexistent"),
                            &request,
                            now_ms(),
                        )
                        .map_err(|e| ConnError::Io(std::io::Error::other(e)))?;
                        write_frame(&mut writer, &ToOperator::Audit(report)).await?;
                    }
                    // Simulated terminals answer no peers, so they keep no
                    // security certificate, and they never ask to renew
                    // their client certificate (a simulation is shorter
                    // than its validity).
                    ToAgent::SecurityCertificate { .. }
                    | ToAgent::Certificate { .. }
                    | ToAgent::RenewalRefused { .. } => {}
                    // Enrolment messages: never within a session.
                    ToAgent::Enrolled(_)
                    | ToAgent::EnrolmentRefused { .. }
                    | ToAgent::ActivateCredential { .. } => {}
                }
            }
        }
        .await;
        shared.counters.connected.fetch_sub(1, Ordering::Relaxed);
        result
    }

    fn outbox_snapshot(&self) -> Vec<Vec<u8>> {
        self.outbox
            .lock()
            .map(|o| o.iter().map(|(r, _, _)| r.clone()).collect())
            .unwrap_or_default()
    }

    fn outbox_push(&self, report: Vec<u8>, settles: Option<(String, u64)>) {
        let session = self.sessions.load(Ordering::Relaxed);
        if let Ok(mut o) = self.outbox.lock() {
            o.push((report, settles, session));
        }
    }

    /// Drop an acknowledged report; whether it was there.
    fn outbox_remove(&self, digest: &[u8; 32]) -> bool {
        let Ok(mut o) = self.outbox.lock() else {
            return false;
        };
        let Some(i) = o.iter().position(|(r, _, _)| sha256(r) == *digest) else {
            return false;
        };
        // An acknowledgement says "taken", accepted or refused. One in the
        // session that carried the envelope means the operator verified it
        // (a genuine report of its own live dispatch); one resent after a
        // reconnect may be refused because the envelope was superseded
        // meanwhile (an operator restart reissues what was out).
        let (_, settles, session) = o.remove(i);
        if let (Some(key), true, Ok(mut settled)) = (
            settles,
            session == self.sessions.load(Ordering::Relaxed),
            self.settled.lock(),
        ) {
            settled.insert(key);
        }
        true
    }

    /// Enrol (retrying), then hold a connection for ever, reconnecting
    /// with the agent's jittered exponential backoff.
    async fn live(self: Arc<Self>, shared: Arc<Shared>) {
        let mut failures = 0u32;
        loop {
            match self.enrol(&shared).await {
                Ok(()) => break,
                Err(ConnError::EnrolmentRefused(reason)) => {
                    tracing::error!(terminal = %self.name, %reason, "enrolment refused");
                    shared.counters.failures.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(backoff(failures, jitter())).await;
                    failures = failures.saturating_add(1);
                }
            }
        }
        shared.counters.enrolled.fetch_add(1, Ordering::Relaxed);
        failures = 0;
        loop {
            let started = Instant::now();
            let _ = self.session(&shared).await;
            if started.elapsed() > Duration::from_secs(30) {
                failures = 0;
            }
            tokio::time::sleep(backoff(failures, jitter())).await;
            failures = failures.saturating_add(1);
        }
    }
}

/// The inventory terminal `index` starts from: its template, renamed.
pub fn terminal_inventory(templates: &[Inventory], prefix: &str, index: usize) -> Inventory {
    let mut inv = templates
        .get(index % templates.len().max(1))
        .cloned()
        .unwrap_or_default();
    inv.terminal = format!("{prefix}-{:05}", index + 1);
    inv.labels
        .insert("simulated".to_string(), "true".to_string());
    inv
}

/// Run the simulation until the process is stopped, printing progress
/// every `report_every` to stderr.
pub async fn run(options: Options, report_every: Duration) -> Result<(), ConnError> {
    let fingerprint =
        tenet_protocol::wire::parse_digest(&options.ca_fingerprint).ok_or_else(|| {
            ConnError::Certificate(format!(
                "{:?} is not sha256:<64 hex digits>",
                options.ca_fingerprint
            ))
        })?;
    let host = options.server_name.clone().unwrap_or_else(|| {
        options
            .operator
            .rsplit_once(':')
            .map_or(options.operator.clone(), |(h, _)| h.to_string())
    });
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| ConnError::Certificate(format!("bad server name {host:?}")))?;
    let counters = Arc::new(Counters::default());
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let shared = Arc::new(Shared {
        address: options.operator.clone(),
        server_name,
        token: options.token.clone(),
        fingerprint,
        runtime: Runtime::new().map_err(|e| ConnError::Io(std::io::Error::other(e)))?,
        counters: counters.clone(),
        opening: Semaphore::new(options.connect_parallelism.max(1)),
        running: Arc::new(Semaphore::new(cores)),
        run_delay: options.run_delay,
    });
    for i in 0..options.count {
        let inventory = terminal_inventory(&options.templates, &options.prefix, i);
        let terminal = Arc::new(Terminal {
            name: inventory.terminal.clone(),
            identity: KeyPair::generate(Algorithm::Ed25519)?,
            envelopes: Mutex::new(EnvelopeState::new(inventory.terminal.clone())),
            system: Arc::new(SimSystem::new(inventory)),
            trust: OnceLock::new(),
            tls: OnceLock::new(),
            outbox: Mutex::default(),
            settled: Mutex::default(),
            sessions: AtomicU64::new(0),
        });
        tokio::spawn(terminal.live(shared.clone()));
    }
    let started = Instant::now();
    let mut last = String::new();
    loop {
        tokio::time::sleep(report_every).await;
        let c = &counters;
        let line = format!(
            "{} terminals: {} enrolled, {} connected, {} dispatches run, {} reports acknowledged, {} refused, {} failed, {} re-dispatched after an acknowledged success",
            options.count,
            c.enrolled.load(Ordering::Relaxed),
            c.connected.load(Ordering::Relaxed),
            c.dispatches.load(Ordering::Relaxed),
            c.reports_acked.load(Ordering::Relaxed),
            c.refused.load(Ordering::Relaxed),
            c.failures.load(Ordering::Relaxed),
            c.redispatched.load(Ordering::Relaxed),
        );
        if line != last {
            eprintln!(
                "tenet-agent simulate [{:>6.1}s] {line}",
                started.elapsed().as_secs_f64()
            );
            last = line;
        }
    }
}

#[cfg(test)]
mod tests;

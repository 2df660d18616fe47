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
//! | `tenet-std.sh STEP...` | the standard library's steps (`tenet_protocol::stdlib`), as the real script does them |
//! | anything else | exits 127: the simulation has no model of it |
//!
//! `write_file` records the file's SHA-256 in the inventory. Identities live
//! in memory only: a new simulation enrols new terminals (use another
//! `--prefix`, or a fresh operator).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tenet_protocol::enrol::{EnrolmentRequest, TrustAnchors};
use tenet_protocol::envelope::EnvelopeState;
use tenet_protocol::inventory::{Inventory, InventoryReport};
use tenet_protocol::session::SharedBytes;
use tenet_protocol::wire::sha256;
use tenet_protocol::{Algorithm, KeyPair, SignedMessage, Signer};
use tokio::sync::Semaphore;

use crate::audit::AuditRequest;
use crate::connection::{
    ConnError, backoff, enrolment_tls, exchange_enrolment, jitter, no_tpm, now_ms, session_tls,
};
use crate::exec::{Limits, Loader, Runtime};
use crate::session::{self, Runs, Settings, Taken, Terminal};

mod system;

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

pub use system::SimSystem;

/// A (policy, generation) a successful report settles.
type Settles = Option<(String, u64)>;

/// A report in the outbox: its bytes, what it settles, the session it was
/// first sent in.
type Outgoing = (Vec<u8>, Settles, u64);

/// One simulated terminal.
struct Simulated {
    name: String,
    identity: Arc<KeyPair>,
    system: Arc<SimSystem>,
    envelopes: Mutex<EnvelopeState>,
    trust: Mutex<Option<Arc<TrustAnchors>>>,
    tls: OnceLock<Arc<rustls::ClientConfig>>,
    /// Signed reports not yet acknowledged, with the (policy, generation)
    /// of the successful ones and the session they were first sent in.
    outbox: Arc<Mutex<Vec<Outgoing>>>,
    /// Sessions so far.
    sessions: AtomicU64,
    /// (policy, generation) whose successful report was acknowledged.
    settled: Mutex<std::collections::HashSet<(String, u64)>>,
    runs: Runs,
    shared: Arc<Shared>,
    /// The bundles this terminal holds (the bytes are shared by all).
    bundles: Mutex<std::collections::HashSet<[u8; 32]>>,
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
    /// Every bundle some terminal holds, by body digest: one copy.
    bundles: Mutex<HashMap<[u8; 32], SharedBytes>>,
}

impl Shared {
    async fn tcp(&self) -> Result<tokio::net::TcpStream, ConnError> {
        let tcp = tokio::net::TcpStream::connect(&self.address).await?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Simulated {
    async fn enrol(&self) -> Result<(), ConnError> {
        let shared = &self.shared;
        let (tls_key, csr) = crate::tls::csr(&self.name)?;
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
        let signed = SignedMessage::signed(&request, self.identity.as_ref())?.encode();
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
        *lock(&self.trust) = Some(Arc::new(response.trust));
        Ok(())
    }

    /// One connection, until it ends.
    async fn session(&self) -> Result<(), ConnError> {
        let shared = &self.shared;
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
        shared.counters.connected.fetch_add(1, Ordering::Relaxed);
        // Simulated inventories change only by payloads, whose reports
        // carry them: no periodic look.
        let result = session::hold(
            self,
            stream,
            Settings {
                inventory_every: None,
            },
        )
        .await;
        shared.counters.connected.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// Enrol (retrying), then hold a connection for ever, reconnecting
    /// with the agent's jittered exponential backoff.
    async fn live(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            match self.enrol().await {
                Ok(()) => break,
                Err(ConnError::EnrolmentRefused(reason)) => {
                    tracing::error!(terminal = %self.name, %reason, "enrolment refused");
                    self.shared
                        .counters
                        .failures
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(backoff(failures, jitter())).await;
                    failures = failures.saturating_add(1);
                }
            }
        }
        self.shared
            .counters
            .enrolled
            .fetch_add(1, Ordering::Relaxed);
        failures = 0;
        loop {
            let started = Instant::now();
            let _ = self.session().await;
            if started.elapsed() > Duration::from_secs(30) {
                failures = 0;
            }
            tokio::time::sleep(backoff(failures, jitter())).await;
            failures = failures.saturating_add(1);
        }
    }

    fn trust(&self) -> Result<Arc<TrustAnchors>, String> {
        lock(&self.trust)
            .clone()
            .ok_or_else(|| "not enrolled".to_string())
    }

    /// Queue a signed report of a dispatch taken in `session`.
    fn push(outbox: &Mutex<Vec<Outgoing>>, session: u64, report: Vec<u8>, settles: Settles) {
        lock(outbox).push((report, settles, session));
    }
}

/// A simulated terminal in a session: reports queue in memory, payloads
/// run in this process on the simulated machine.
impl Terminal for Simulated {
    type Queued = ();

    fn name(&self) -> &str {
        &self.name
    }

    fn cached_bundle(&self, digest: &[u8; 32]) -> Option<SharedBytes> {
        if !lock(&self.bundles).contains(digest) {
            return None;
        }
        lock(&self.shared.bundles).get(digest).cloned()
    }

    fn keep_bundle(&self, digest: &[u8; 32], bundle: &SharedBytes) {
        lock(&self.bundles).insert(*digest);
        lock(&self.shared.bundles)
            .entry(*digest)
            .or_insert_with(|| bundle.clone());
    }

    fn agent_version(&self) -> String {
        concat!(env!("CARGO_PKG_VERSION"), "-simulated").into()
    }

    fn pinned_trust(&self) -> Result<TrustAnchors, String> {
        self.trust().map(|t| t.as_ref().clone())
    }

    fn pin_trust(&self, anchors: &TrustAnchors) -> Result<(), String> {
        *lock(&self.trust) = Some(Arc::new(anchors.clone()));
        Ok(())
    }

    fn inventory(&self) -> Result<Vec<u8>, ConnError> {
        // Stamped before it is read, as a real agent's: a copy taken while
        // a payload runs is never taken for the state after the run.
        let started = now_ms();
        let inventory = self.system.with(|i| i.clone());
        let report = InventoryReport {
            terminal: self.name.clone(),
            sequence: started,
            collected_at_ms: started,
            inventory,
        };
        Ok(SignedMessage::signed(&report, self.identity.as_ref())?.encode())
    }

    fn outbox(&self) -> Result<Vec<((), Vec<u8>)>, ConnError> {
        Ok(lock(&self.outbox)
            .iter()
            .map(|(r, _, _)| ((), r.clone()))
            .collect())
    }

    fn acknowledge(&self, (): (), digest: &[u8; 32]) -> Result<(), ConnError> {
        let mut outbox = lock(&self.outbox);
        let Some(i) = outbox.iter().position(|(r, _, _)| sha256(r) == *digest) else {
            return Ok(());
        };
        self.shared
            .counters
            .reports_acked
            .fetch_add(1, Ordering::Relaxed);
        // An acknowledgement says "taken", accepted or refused. One in the
        // session that carried the envelope means the operator verified it
        // (a genuine report of its own live dispatch); one resent after a
        // reconnect may be refused because the envelope was superseded
        // meanwhile (an operator restart reissues what was out).
        let (_, settles, session) = outbox.remove(i);
        if let Some(key) = settles
            && session == self.sessions.load(Ordering::Relaxed)
        {
            lock(&self.settled).insert(key);
        }
        Ok(())
    }

    /// Verify the envelope (signature, approval, freshness) and record it
    /// as used, as a real agent does; the payload then runs as a real
    /// loader runs it, without verifying it a second time in the same
    /// process.
    fn take(&self, envelope: &[u8], bundle: SharedBytes) -> Result<Taken<()>, String> {
        let shared = self.shared.clone();
        shared.counters.dispatches.fetch_add(1, Ordering::Relaxed);
        let trust = self.trust()?;
        let now = now_ms();
        let mut state = lock(&self.envelopes);
        let before = state.clone();
        let verified = match before.verify_approved(envelope, &trust, now) {
            Ok(v) => v,
            Err(r) => {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                let report = crate::exec::refusal(&self.name, envelope, &r, now);
                let report = SignedMessage::signed(&report, self.identity.as_ref())
                    .map_err(|e| e.to_string())?
                    .encode();
                let session = self.sessions.load(Ordering::Relaxed);
                Self::push(&self.outbox, session, report.clone(), None);
                return Ok(Taken::Refused { queued: (), report });
            }
        };
        state.accept(&verified);
        let checked = verified.clone();
        let env = &verified.envelope;
        let key = (env.policy.clone(), env.policy_generation);
        if lock(&self.settled).contains(&key) {
            shared.counters.redispatched.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                terminal = %self.name,
                policy = %key.0,
                generation = key.1,
                "dispatched again after its success was acknowledged"
            );
        }
        let (policy, sequence) = (env.policy.clone(), env.sequence);
        let (name, identity, system) = (
            self.name.clone(),
            self.identity.clone(),
            self.system.clone(),
        );
        // The session that carried the envelope (the run may end in a later one).
        let (outbox, session) = (self.outbox.clone(), self.sessions.load(Ordering::Relaxed));
        Ok(Taken::Run {
            policy,
            sequence,
            run: Box::new(move |mut stop| {
                // A superseded run stops while it waits (the simulated
                // install time, a CPU); once in wasmtime it runs to its end
                // and is reported like any other.
                Box::pin(async move {
                    let permit = async {
                        if !shared.run_delay.is_zero() {
                            tokio::time::sleep(shared.run_delay).await;
                        }
                        shared.running.clone().acquire_owned().await
                    };
                    let permit = tokio::select! {
                        permit = permit => permit,
                        Ok(()) = &mut stop => return,
                    };
                    let s = shared.clone();
                    let ran = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        Loader {
                            terminal: &name,
                            trust: &trust,
                            identity: identity.as_ref(),
                            system,
                            runtime: &s.runtime,
                            limits: Limits {
                                memory_bytes: 16 * 1024 * 1024,
                                max_run: Duration::from_secs(60),
                            },
                            now_ms,
                        }
                        // Verified on arrival, in this process: the
                        // loader's own check would only repeat it.
                        .run_verified(checked, &bundle)
                    })
                    .await;
                    match ran {
                        Ok(Ok(result)) => {
                            let settles = matches!(
                                result.outcome,
                                tenet_protocol::report::Outcome::Exited { code: 0 }
                            )
                            .then_some(key);
                            Simulated::push(&outbox, session, result.report, settles);
                        }
                        Ok(Err(e)) => tracing::error!(error = %e, "a simulated run failed"),
                        Err(e) => tracing::error!(error = %e, "a simulated run panicked"),
                    }
                })
            }),
        })
    }

    fn runs(&self) -> &Runs {
        &self.runs
    }

    /// No TPM here: posture only. The certificate names the identity key:
    /// simulated terminals answer no peers.
    fn audit(&self, request: &AuditRequest) -> Result<Vec<u8>, String> {
        let inventory = self.system.with(|i| i.clone());
        crate::audit::audit(
            &self.name,
            self.identity.as_ref(),
            None,
            self.identity.public_key(),
            &inventory,
            std::path::Path::new("/nonexistent"),
            request,
            now_ms(),
        )
    }

    // Simulated terminals answer no peers, so they keep no security
    // certificate, and they never renew their client certificate (a
    // simulation is shorter than its validity): the trait's defaults.
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
        bundles: Mutex::default(),
    });
    for i in 0..options.count {
        let inventory = terminal_inventory(&options.templates, &options.prefix, i);
        let terminal = Arc::new(Simulated {
            name: inventory.terminal.clone(),
            identity: Arc::new(KeyPair::generate(Algorithm::Ed25519)?),
            envelopes: Mutex::new(EnvelopeState::new(inventory.terminal.clone())),
            system: Arc::new(SimSystem::new(inventory)),
            trust: Mutex::new(None),
            tls: OnceLock::new(),
            outbox: Arc::default(),
            settled: Mutex::default(),
            sessions: AtomicU64::new(0),
            runs: Runs::default(),
            shared: shared.clone(),
            bundles: Mutex::default(),
        });
        tokio::spawn(terminal.live());
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

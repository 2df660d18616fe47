//! `tenet operator`: the standalone operator. It keeps its state in an
//! embedded database under `--data`, reads policies from a directory (a git
//! checkout) and signed bundles from another, serves the agent gateway, and
//! reconciles continuously: on every agent message and every tick.
//!
//! ```text
//! DATA/dispatch.key(.pub)  the operator's dispatch key (signs envelopes)
//! DATA/ca.pem, ca.key      the CA of the agent links
//! DATA/tenet.redb          terminals, tokens, sequences, dispatches, states
//! DATA/tokens/*.token      bootstrap tokens waiting to be imported
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tenet_protocol::bundle::{BundleTrust, verify_bundle};
use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::session::ToAgent;
use tenet_protocol::wire::{decode, encode, sha256};
use tenet_protocol::{Algorithm, KeyPair, PublicKey, Signer};

use crate::cli::payload::now_ms;
use crate::fleet::StandaloneFleet;
use crate::gateway::{Gateway, TlsAcceptor};
use crate::pki::Ca;
use crate::policy::{CompiledPolicy, load_dir};
use crate::reconcile::pass::{Bundle, Pass, PolicyStatus};
use crate::reconcile::state::Retry;
use crate::store::{Store, TokenRecord, token_key};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] tenet_protocol::keys::KeyError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Pass(#[from] crate::reconcile::pass::PassError),
    #[error("{0}")]
    Usage(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What `tenet operator` runs with.
pub struct Daemon {
    pub policies: PathBuf,
    pub bundles: PathBuf,
    pub data: PathBuf,
    pub listen: String,
    /// Names the gateway's certificate carries (DNS names or IPs).
    pub names: Vec<String>,
    pub admin_keys: Vec<PathBuf>,
    pub admin_threshold: u8,
    pub tick: Duration,
    /// Where `/metrics` is served, if anywhere.
    pub metrics: Option<String>,
    /// What a program embedding the operator (the benchmark) watches.
    pub probe: Option<Arc<Probe>>,
    /// What the gateway's connections may cost (sessions, connections
    /// still opening, timeouts, queues).
    pub limits: crate::gateway::Limits,
    /// PEM files of TPM manufacturers' CA certificates: a terminal's TPM
    /// counts only once its EK certificate chains to one of them.
    pub tpm_roots: Vec<PathBuf>,
    /// Kubernetes mode: the API server is the store and the policy source.
    pub kubernetes: Option<KubeSettings>,
}

/// How the operator runs on Kubernetes.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Where Terminals, SecurityCertificates, the Lease and the token
    /// Secret live (policies and their Remediations: any namespace).
    pub namespace: String,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
    pub lease: Duration,
}

/// What the operator shows a program that embeds it: where it listens,
/// the policies' counts after each pass, the connected terminals, and
/// every dispatch-to-verified-report time.
#[derive(Default)]
pub struct Probe {
    pub address: tokio::sync::watch::Sender<Option<std::net::SocketAddr>>,
    pub passes: tokio::sync::watch::Sender<(usize, Vec<PolicyStatus>)>,
    pub round_trips: std::sync::Mutex<Vec<Duration>>,
    /// Database commits (fsyncs) so far.
    pub store_commits: std::sync::atomic::AtomicU64,
    /// Envelopes handed to a connection, and envelopes that could not be.
    pub handed_over: std::sync::atomic::AtomicU64,
    /// Reconcile passes run, and their total time in microseconds.
    pub passes_run: std::sync::atomic::AtomicU64,
    pub pass_micros: std::sync::atomic::AtomicU64,
    pub undelivered: std::sync::atomic::AtomicU64,
    /// Kubernetes mode: writes to the API server so far, of which to the
    /// ledger, and resources for people not yet written.
    pub api_writes: std::sync::atomic::AtomicU64,
    pub api_ledger_writes: std::sync::atomic::AtomicU64,
    pub api_pending: std::sync::atomic::AtomicU64,
}

/// Wake the loop when anything changes in the policy, bundle or token
/// directory (an edit, a new file, a `git pull`); the tick still catches
/// anything a watcher misses.
fn watch_dirs(
    dirs: &[&Path],
    wake: Arc<tokio::sync::Notify>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |_event| wake.notify_one())
        .inspect_err(
            |e| tracing::warn!(error = %e, "cannot watch the policy directory; polling only"),
        )
        .ok()?;
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::Recursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch; polling only");
        }
    }
    Some(watcher)
}

/// After a restart, a dispatch that is still out may or may not have
/// reached its terminal: it is reissued with a fresh envelope (a new
/// nonce and sequence number, which supersedes the old one on the
/// terminal), and the attempt does not count. A report for the old one is
/// refused as a replay. Verified results are already committed.
pub fn reissue_pending(store: &Store, retry: &Retry, now_ms: u64) -> Result<usize, DaemonError> {
    let mut reissued = 0;
    for (terminal, policy, mut record) in store.pairs()? {
        if matches!(
            record.state,
            crate::reconcile::state::PairState::Dispatched { .. }
        ) {
            record.state = crate::reconcile::state::next(
                &record.state,
                &crate::reconcile::state::Event::Undelivered,
                retry,
                now_ms,
                0.0,
            );
            record.updated_ms = now_ms;
            store.set_pair(&terminal, &policy, &record)?;
            reissued += 1;
        }
    }
    Ok(reissued)
}

/// The data directory, opened (and created on first start).
pub struct DataDir {
    pub dispatch_key: Arc<KeyPair>,
    pub ca: Arc<Ca>,
    pub store: Arc<Store>,
}

pub fn open_data(dir: &Path, out: &mut dyn Write) -> Result<DataDir, DaemonError> {
    let (dispatch_key, ca) = open_keys(dir, out)?;
    let tokens = dir.join("tokens");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tokens)
            .map_err(io(&tokens))?;
    }
    let store = Arc::new(Store::open(&dir.join("tenet.redb"))?);
    Ok(DataDir {
        dispatch_key,
        ca,
        store,
    })
}

/// The dispatch key and the agent CA in `dir`, created when missing.
pub fn open_keys(dir: &Path, out: &mut dyn Write) -> Result<(Arc<KeyPair>, Arc<Ca>), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    let fresh = !dir.join("dispatch.key").exists();
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let key_path = dir.join("dispatch.key");
    if fresh {
        KeyPair::generate(Algorithm::Ed25519)?.write_files(&key_path)?;
    }
    let dispatch_key = Arc::new(KeyPair::read_file(&key_path)?);
    let ca = Arc::new(Ca::load_or_create(dir)?);
    if fresh {
        let _ = writeln!(
            out,
            "created {}: dispatch key {}, agent CA {}",
            dir.display(),
            dispatch_key.public_key().fingerprint(),
            ca.fingerprint()
        );
    }
    Ok((dispatch_key, ca))
}

/// A bootstrap token waiting in `DATA/tokens/` for the operator to import.
#[derive(Serialize, Deserialize)]
struct PendingToken {
    hash: String,
    record: TokenRecord,
}

/// `tenet token create`: a one-time bootstrap token. Only its hash is
/// written (for the operator to import); the token is printed once.
pub fn create_token(
    data: &Path,
    terminal: Option<String>,
    uses: u32,
    ttl: Duration,
    namespace: Option<&str>,
    out: &mut dyn Write,
) -> Result<IssuedToken, DaemonError> {
    if uses == 0 || (uses > 1 && terminal.is_some()) {
        return Err(DaemonError::Usage(
            "--uses must be at least 1, and 1 for a token bound to one --terminal".into(),
        ));
    }
    let dir = data.join("tokens");
    if namespace.is_none() && !dir.is_dir() {
        return Err(DaemonError::Usage(format!(
            "{} has no tokens/ directory: start `tenet operator --data {}` once first",
            data.display(),
            data.display()
        )));
    }
    let token = hex::encode(tenet_protocol::keys::random_bytes()?);
    let pending = PendingToken {
        hash: token_key(&token),
        record: TokenRecord {
            terminal,
            expires_ms: now_ms() + ttl.as_millis() as u64,
            uses_left: uses,
        },
    };
    match namespace {
        None => {
            let path = dir.join(format!("{}.token", &pending.hash[..16]));
            crate_write(&path, &encode(&pending))?;
        }
        Some(ns) => {
            // Kubernetes mode: into the token Secret, which the leader reads.
            let write = async {
                let client = kube::Client::try_default().await?;
                crate::kubernetes::add_token(client, ns, &pending.hash, &encode(&pending.record))
                    .await
            };
            let written = match tokio::runtime::Handle::try_current() {
                // Called from async code (the benchmark).
                Ok(handle) => tokio::task::block_in_place(|| handle.block_on(write)),
                Err(_) => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| DaemonError::Usage(e.to_string()))?
                    .block_on(write),
            };
            written
                .map_err(|e| DaemonError::Usage(format!("cannot write the token Secret: {e}")))?;
        }
    }
    let ca = std::fs::read(data.join("ca.pem")).map_err(io(&data.join("ca.pem")))?;
    let ca_der =
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            &ca,
        )
        .map_err(|e| DaemonError::Usage(format!("ca.pem: {e}")))?;
    let ca_fingerprint = format!("sha256:{}", hex::encode(sha256(&ca_der)));
    let _ = writeln!(
        out,
        "token {token}\nca-fingerprint {ca_fingerprint}\nenrol a terminal with:\n  tenet-agent enrol --config agent.yaml --token {token} --ca-fingerprint {ca_fingerprint}"
    );
    Ok(IssuedToken {
        token,
        ca_fingerprint,
    })
}

/// A bootstrap token just made, and the fingerprint of the CA agents must
/// find at the gateway.
pub struct IssuedToken {
    pub token: String,
    pub ca_fingerprint: String,
}

/// Write a new file whole: under a temporary name first, then renamed, so
/// the running operator (which imports and deletes `*.token` files as soon
/// as the directory changes) never reads half of one. It did: the demo's
/// token for 200 simulated terminals was read empty and thrown away.
fn crate_write(path: &Path, bytes: &[u8]) -> Result<(), DaemonError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("partial");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    if path.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Err(DaemonError::Usage(format!(
            "{} exists already",
            path.display()
        )));
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn import_tokens(data: &Path, store: &Store) -> Result<(), DaemonError> {
    let dir = data.join("tokens");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "token") {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        match decode::<PendingToken>(&bytes) {
            Ok(p) => store.add_token_hash(&p.hash, &p.record)?,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "not a token file; ignored")
            }
        }
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// The signed bundles of a directory, verified against the admin keys. A
/// file is read and verified again only when its size or modification time
/// changes: the operator looks every tick, and bundles can be large.
#[derive(Default)]
pub struct BundleCache {
    files: HashMap<PathBuf, CachedBundle>,
}

struct CachedBundle {
    stamp: (std::time::SystemTime, u64),
    /// The bundle's name, its expiry and the bundle; or why it is refused.
    verdict: Result<(String, u64, Bundle), String>,
}

impl BundleCache {
    /// Every `*.bundle` in `dir` that verifies and has not expired, by
    /// name, and the problems with the others.
    pub fn load(
        &mut self,
        dir: &Path,
        trust: &BundleTrust,
        now: u64,
    ) -> (HashMap<String, Bundle>, Vec<String>) {
        let mut bundles = HashMap::new();
        let mut problems = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return (
                bundles,
                vec![format!(
                    "{}: cannot read the bundle directory",
                    dir.display()
                )],
            );
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
            .collect();
        paths.sort();
        self.files.retain(|p, _| paths.contains(p));
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
            if self.files.get(&path).is_none_or(|c| c.stamp != stamp) {
                let verdict = match std::fs::read(&path) {
                    Err(e) => Err(format!("{}: {e}", path.display())),
                    Ok(bytes) => match verify_bundle(&bytes, trust, None, now) {
                        Ok(v) => Ok((
                            v.bundle.manifest.name.clone(),
                            v.bundle.manifest.expires_ms,
                            Bundle {
                                digest: v.digest,
                                bytes: Arc::new(bytes),
                            },
                        )),
                        Err(e) => Err(format!("{}: refused: {e} ({})", path.display(), e.reason())),
                    },
                };
                self.files
                    .insert(path.clone(), CachedBundle { stamp, verdict });
            }
            match self.files.get(&path).map(|c| &c.verdict) {
                Some(Ok((_, expires_ms, _))) if now >= *expires_ms => problems.push(format!(
                    "{}: refused: the bundle expired (Expired)",
                    path.display()
                )),
                Some(Ok((name, _, bundle))) => {
                    bundles.insert(name.clone(), bundle.clone());
                }
                Some(Err(problem)) => problems.push(problem.clone()),
                None => {}
            }
        }
        (bundles, problems)
    }
}

/// The policies in force: the last good generation of each, kept while its
/// file is broken.
#[derive(Default)]
struct PolicyCache {
    good: BTreeMap<String, (PathBuf, CompiledPolicy)>,
    last_errors: Vec<String>,
    /// Path, modification time and size of every file last loaded: the
    /// directory is parsed and compiled again only when this changes.
    stamp: Vec<(PathBuf, std::time::SystemTime, u64)>,
    /// The git commit of the directory when it was last loaded.
    revision: Option<String>,
    /// Kubernetes mode: the policies from the API server.
    kube_policies: Option<Vec<CompiledPolicy>>,
}

impl PolicyCache {
    fn reload(&mut self, dir: &Path, store: &Store) -> Result<(), DaemonError> {
        let stamp: Vec<_> = crate::policy::yaml_files(dir)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                let m = std::fs::metadata(&p).ok()?;
                Some((p, m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
            })
            .collect();
        if !self.stamp.is_empty() && stamp == self.stamp {
            return Ok(());
        }
        self.stamp = stamp;
        self.revision = git_revision(dir);
        let set = load_dir(dir);
        let broken: std::collections::HashSet<&Path> =
            set.errors.iter().map(|e| e.file.as_path()).collect();
        let mut next = BTreeMap::new();
        for p in &set.policies {
            let mut compiled = p.compiled.clone();
            let spec = serde_json::to_vec(&p.policy.spec).unwrap_or_default();
            compiled.generation = store.policy_generation(&compiled.key(), sha256(&spec))? as i64;
            next.insert(compiled.key(), (p.file.clone(), compiled));
        }
        // A policy whose file is broken now keeps its last good generation.
        for (key, (file, compiled)) in &self.good {
            if !next.contains_key(key) && broken.contains(file.as_path()) {
                next.insert(key.clone(), (file.clone(), compiled.clone()));
            }
        }
        let errors: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
        if errors != self.last_errors {
            for e in &errors {
                tracing::error!(error = %e, "policy error; the last good version stays in force");
            }
            self.last_errors = errors;
        }
        self.good = next;
        Ok(())
    }

    fn policies(&self) -> Vec<CompiledPolicy> {
        if let Some(p) = &self.kube_policies {
            return p.clone();
        }
        self.good.values().map(|(_, p)| p.clone()).collect()
    }
}

/// The commit checked out in `dir`, when it is in a git work tree.
fn git_revision(dir: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|r| !r.is_empty())
}

fn write_status(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn jitter() -> f64 {
    tenet_protocol::keys::random_bytes().map_or(0.5, |b| f64::from(b[0]) / 255.0)
}

impl Daemon {
    pub async fn run(self, out: &mut (dyn Write + Send)) -> Result<(), DaemonError> {
        let open_files = tenet_protocol::listen::raise_open_files_limit();
        tracing::info!(open_files, "open files limit");
        let files_changed = Arc::new(tokio::sync::Notify::new());
        let mut kube = None;
        let data = match &self.kubernetes {
            None => open_data(&self.data, out)?,
            Some(k) => {
                let client = kube::Client::try_default().await.map_err(|e| {
                    DaemonError::Usage(format!(
                        "cannot reach the Kubernetes API (KUBECONFIG or in-cluster): {e}"
                    ))
                })?;
                let _ = writeln!(
                    out,
                    "{}: waiting for the Lease {}/{}",
                    k.identity,
                    k.namespace,
                    crate::kubernetes::leader::LEASE
                );
                let _ = out.flush();
                crate::kubernetes::leader::lead(
                    kube::Api::namespaced(client.clone(), &k.namespace),
                    k.identity.clone(),
                    k.lease,
                )
                .await;
                let _ = writeln!(out, "{}: leader", k.identity);
                let (dispatch_key, ca) = open_keys(&self.data, out)?;
                let backend = Arc::new(crate::kubernetes::KubeBackend::new(
                    client.clone(),
                    &k.namespace,
                    tokio::runtime::Handle::current(),
                ));
                backend.start_writer();
                let store =
                    tokio::task::block_in_place(|| Store::with_backend(Box::new(backend.clone())))?;
                let policies = crate::kubernetes::Policies::watch(
                    client,
                    files_changed.clone(),
                    backend.policy_uids.clone(),
                    backend.writes.clone(),
                    &k.identity,
                );
                policies.ready().await;
                kube = Some((backend, policies));
                DataDir {
                    dispatch_key,
                    ca,
                    store: Arc::new(store),
                }
            }
        };
        let admin_keys = self
            .admin_keys
            .iter()
            .map(|p| PublicKey::read_pem_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        if admin_keys.is_empty()
            || usize::from(self.admin_threshold) > admin_keys.len()
            || self.admin_threshold == 0
        {
            return Err(DaemonError::Usage(format!(
                "need at least {} admin key(s) (--admin-key) for a threshold of {}",
                self.admin_threshold.max(1),
                self.admin_threshold
            )));
        }
        let trust = TrustAnchors {
            admin_keys: admin_keys.clone(),
            admin_threshold: self.admin_threshold,
            dispatch_key: data.dispatch_key.public_key(),
            issuer_key: data.dispatch_key.public_key(),
        };
        let bundle_trust = BundleTrust {
            admin_keys,
            threshold: usize::from(self.admin_threshold),
        };
        let (fleet, mut changes) =
            StandaloneFleet::new(data.store.clone(), Retry::default(), now_ms, jitter);
        let fleet = Arc::new(fleet);
        let tls = data.ca.server_config(&self.names)?;
        let gateway = Arc::new(Gateway {
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            ca: data.ca.clone(),
            trust,
            dispatch_key: data.dispatch_key.clone(),
            fleet: fleet.clone(),
            client_cert_validity: Duration::from_secs(24 * 3600),
            now_ms,
            limits: self.limits.clone(),
            tpm_roots: Arc::new(
                crate::tpm_trust::TpmRoots::load(&self.tpm_roots).map_err(DaemonError::Usage)?,
            ),
        });
        let reissued = reissue_pending(&data.store, &Retry::default(), now_ms())?;
        if reissued > 0 {
            let _ = writeln!(
                out,
                "{reissued} dispatch(es) pending at the last stop will be reissued with fresh envelopes"
            );
        }
        let listener = tokio::net::TcpListener::bind(&self.listen)
            .await
            .map_err(io(Path::new(&self.listen)))?;
        let address = listener.local_addr().map_err(io(Path::new(&self.listen)))?;
        let _ = writeln!(
            out,
            "gateway listening on {address} (agent CA {}); policies from {}, bundles from {}",
            data.ca.fingerprint(),
            self.policies.display(),
            self.bundles.display()
        );
        let _ = out.flush();
        tokio::spawn(gateway.serve(listener));
        let metrics = Arc::new(crate::metrics::Metrics::new());
        if let Some(addr) = &self.metrics {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(Path::new(addr)))?;
            let _ = writeln!(
                out,
                "metrics at http://{}/metrics",
                l.local_addr().map_err(io(Path::new(addr)))?
            );
            tokio::spawn(metrics.clone().serve(l));
        }

        if let Some(p) = &self.probe {
            p.address.send_replace(Some(address));
        }
        let _watcher = watch_dirs(
            &[&self.policies, &self.bundles, &self.data.join("tokens")],
            files_changed.clone(),
        );

        let mut cache = PolicyCache::default();
        let evaluations = std::sync::Mutex::new(crate::reconcile::pass::Evaluations::default());
        let mut last_status: Vec<PolicyStatus> = Vec::new();
        let mut last_bundle_problems: Vec<String> = Vec::new();
        let mut last_written: Option<crate::status::Status> = None;
        let mut status_at = std::time::Instant::now() - STATUS_EVERY;
        let mut bundle_cache = BundleCache::default();
        let mut bundles = HashMap::new();
        let mut policies = Vec::new();
        // The directories are looked at when the watcher says something
        // changed, and at least every tick (bundles expire; a watcher can
        // miss events): not on every agent message.
        let mut scanned_at: Option<std::time::Instant> = None;
        let mut certs_at = std::time::Instant::now() - CERTS_EVERY;
        loop {
            if scanned_at.is_none_or(|t| t.elapsed() >= self.tick) {
                scanned_at = Some(std::time::Instant::now());
                match &mut kube {
                    None => {
                        import_tokens(&self.data, &data.store)?;
                        cache.reload(&self.policies, &data.store)?;
                    }
                    Some((backend, source)) => {
                        match backend.tokens().await {
                            Ok(tokens) => {
                                for (hash, raw) in tokens {
                                    if data.store.has_token_hash(&hash) {
                                        continue;
                                    }
                                    match decode::<TokenRecord>(&raw) {
                                        Ok(record) => data.store.add_token_hash(&hash, &record)?,
                                        Err(e) => {
                                            tracing::warn!(error = %e, "not a token; ignored")
                                        }
                                    }
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot read the token Secret"),
                        }
                        match backend.deleted_terminals().await {
                            Ok(gone) => {
                                for t in gone {
                                    if fleet.forget_terminal(&t) {
                                        let _ = writeln!(
                                            out,
                                            "terminal {t} de-enrolled (its Terminal resource was deleted)"
                                        );
                                        tracing::warn!(terminal = %t, "de-enrolled: its Terminal resource was deleted");
                                    }
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot list Terminals"),
                        }
                        let (mut compiled, errors) = source.refresh(&data.store).await;
                        // metadata.generation starts again at 1 when a policy is
                        // deleted and re-created: envelopes carry the store's
                        // generation, which only goes up.
                        for c in &mut compiled {
                            let spec = serde_json::to_vec(c.spec.as_ref()).unwrap_or_default();
                            c.generation =
                                data.store.policy_generation(&c.key(), sha256(&spec))? as i64;
                        }
                        if errors != cache.last_errors {
                            for e in &errors {
                                tracing::error!(error = %e, "policy error");
                            }
                            cache.last_errors = errors;
                        }
                        cache.kube_policies = Some(compiled);
                    }
                }
                let (loaded, problems) = bundle_cache.load(&self.bundles, &bundle_trust, now_ms());
                if problems != last_bundle_problems {
                    for p in &problems {
                        tracing::warn!(problem = %p, "bundle not used");
                    }
                    last_bundle_problems = problems;
                }
                bundles = loaded;
                policies = cache.policies();
            }
            let started = std::time::Instant::now();
            let (outgoing, statuses) = {
                let online = |t: &str| fleet.sender(t).is_some();
                Pass {
                    store: &data.store,
                    policies: &policies,
                    bundles: &bundles,
                    dispatch_key: data.dispatch_key.as_ref(),
                    online: &online,
                    retry: Retry::default(),
                    now_ms: now_ms(),
                    jitter: jitter(),
                    evaluations: Some(&evaluations),
                }
                .run()?
            };
            metrics.observe_pass(started.elapsed());
            if let Some((backend, source)) = &kube {
                source.publish(&statuses);
                if let Some(p) = &self.probe {
                    p.api_writes.store(
                        backend.writes.load(std::sync::atomic::Ordering::Relaxed),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    p.api_ledger_writes.store(
                        backend
                            .ledger_writes
                            .load(std::sync::atomic::Ordering::Relaxed),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    p.api_pending
                        .store(backend.pending(), std::sync::atomic::Ordering::Relaxed);
                }
            }
            if let Some(p) = &self.probe {
                p.passes_run
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                p.pass_micros.fetch_add(
                    started.elapsed().as_micros() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            metrics.dispatches.inc_by(outgoing.len() as u64);
            if !outgoing.is_empty() {
                self.send(&data.store, &fleet, outgoing).await?;
                // Handing envelopes over woke thousands of connection
                // writers; the last one woken sits in this worker's LIFO
                // slot, which no other worker may steal. Found by `tenet
                // bench converge`: without this yield, that terminal's
                // envelope waited seconds, or for ever, while this loop
                // kept running passes. Yield so the slot runs now.
                tokio::task::yield_now().await;
            }
            // Security certificates: audits, issuance, renewal. Their
            // decisions are in seconds (renewal, audit timeouts): a sweep of
            // every terminal at most four times a second, not on every
            // agent message.
            let certs_due = certs_at.elapsed() >= CERTS_EVERY;
            if certs_due {
                certs_at = std::time::Instant::now();
            }
            let round = if !certs_due {
                crate::certs::Round::default()
            } else {
                let online = |t: &str| fleet.sender(t).is_some();
                crate::certs::reconcile(
                    &data.store,
                    &policies,
                    data.dispatch_key.as_ref(),
                    &online,
                    now_ms(),
                )?
            };
            for e in &round.events {
                let _ = writeln!(out, "{e}");
            }
            if !round.outgoing.is_empty() {
                if let Err(e) = data.store.durable(data.store.written()).await {
                    tracing::error!(error = %e, "certificate messages not sent: the database cannot commit");
                } else {
                    for (terminal, message) in round.outgoing {
                        if let Some(tx) = fleet.sender(&terminal) {
                            let _ = tx.try_send(message);
                        }
                    }
                }
            }
            let round_trips = fleet.take_round_trips();
            for d in &round_trips {
                metrics.round_trip_seconds.observe(d.as_secs_f64());
            }
            if let Some(p) = &self.probe {
                if let Ok(mut r) = p.round_trips.lock() {
                    r.extend(round_trips);
                }
                p.store_commits
                    .store(data.store.commits(), std::sync::atomic::Ordering::Relaxed);
                p.passes
                    .send_replace((fleet.connected_count(), statuses.clone()));
            }
            // Status for people: at most twice a second (it lists every terminal).
            let status_due = status_at.elapsed() >= STATUS_EVERY;
            if status_due {
                status_at = std::time::Instant::now();
                let status = crate::status::collect(
                    &data.store,
                    &statuses,
                    &fleet.connected_terminals(),
                    fleet.refusals(),
                    &cache.last_errors,
                    now_ms(),
                )?;
                let status = crate::status::Status {
                    source_revision: cache.revision.clone(),
                    ..status
                };
                metrics.update(&status);
                // Kubernetes mode: the resources are the status (and the
                // data directory is a read-only Secret).
                if self.kubernetes.is_none() && last_written.as_ref() != Some(&status) {
                    let json = serde_json::to_vec_pretty(&status).unwrap_or_default();
                    if let Err(e) = write_status(&self.data.join("status.json"), &json) {
                        tracing::error!(error = %e, "cannot write the status file");
                    }
                    last_written = Some(status);
                }
                if statuses != last_status {
                    print_statuses(&statuses, out);
                    last_status = statuses;
                }
            }
            // Until the next agent message, file change or tick; a burst of
            // messages is taken by one pass.
            let wait = if status_due {
                self.tick
            } else {
                STATUS_EVERY
                    .saturating_sub(status_at.elapsed())
                    .min(self.tick)
            };
            tokio::select! {
                _ = changes.recv() => {}
                _ = files_changed.notified() => scanned_at = None,
                _ = tokio::time::sleep(wait) => {}
            }
            while changes.try_recv().is_ok() {}
        }
    }

    /// Hand the envelopes of a pass to their terminals' connections, once
    /// they are durable (with their sequence numbers and nonce
    /// commitments). One that cannot be handed over is reissued fresh.
    async fn send(
        &self,
        store: &Store,
        fleet: &StandaloneFleet,
        outgoing: Vec<crate::reconcile::pass::Outgoing>,
    ) -> Result<(), DaemonError> {
        if let Err(e) = store.durable(store.written()).await {
            // Not sent: they stay out and are retried after their deadline.
            tracing::error!(error = %e, count = outgoing.len(), "dispatches not sent: the database cannot commit");
            return Ok(());
        }
        for o in outgoing {
            let delivered = fleet.sender(&o.terminal).is_some_and(|tx| {
                tx.try_send(ToAgent::Dispatch {
                    envelope: o.envelope.clone(),
                    bundle: o.bundle.clone(),
                })
                .is_ok()
            });
            if let Some(p) = &self.probe {
                let counter = if delivered {
                    &p.handed_over
                } else {
                    &p.undelivered
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if delivered {
                fleet.sent(o.envelope_digest);
                tracing::info!(terminal = %o.terminal, policy = %o.policy, "dispatched");
            } else {
                tracing::info!(terminal = %o.terminal, policy = %o.policy, "undelivered; will reissue");
                crate::reconcile::pass::undelivered(store, &o, &Retry::default(), now_ms())?;
            }
        }
        Ok(())
    }
}

/// How often security certificates are reconciled at most.
const CERTS_EVERY: Duration = Duration::from_millis(250);

/// How often the status file and the policy lines are brought up to date.
const STATUS_EVERY: Duration = Duration::from_millis(500);

fn print_statuses(statuses: &[PolicyStatus], out: &mut (dyn Write + Send)) {
    for s in statuses {
        let held = s
            .held
            .as_deref()
            .map(|h| format!(" (held: {h})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{} gen {}: {} selected, {} compliant, {} drifted, {} remediating, {} failed{held}",
            s.policy, s.generation, s.selected, s.compliant, s.drifted, s.remediating, s.failed
        );
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenet_protocol::SignedMessage;
    use tenet_protocol::bundle::{Manifest, PayloadBundle};

    fn bundle(name: &str, expires_ms: u64, key: &KeyPair) -> Vec<u8> {
        let b = PayloadBundle {
            manifest: Manifest {
                name: name.into(),
                version: "1".into(),
                description: String::new(),
                capabilities: vec![],
                created_ms: 0,
                expires_ms,
            },
            module: b"\0asm\x01\0\0\0".to_vec(),
            artifacts: vec![],
        };
        SignedMessage::signed(&b, key).expect("sign").encode()
    }

    #[test]
    fn bundles_are_verified_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let stranger = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let trust = BundleTrust {
            admin_keys: vec![admin.public_key()],
            threshold: 1,
        };
        std::fs::write(dir.path().join("a.bundle"), bundle("a", 1_000, &admin)).expect("write");
        std::fs::write(dir.path().join("b.bundle"), bundle("b", 1_000, &stranger)).expect("write");
        let mut cache = BundleCache::default();
        let (bundles, problems) = cache.load(dir.path(), &trust, 10);
        assert_eq!(bundles.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].ends_with("(UnknownKey)"), "{problems:?}");
        // A cached bundle still expires.
        let (bundles, problems) = cache.load(dir.path(), &trust, 1_000);
        assert!(bundles.is_empty());
        assert_eq!(problems.len(), 2);
        // A replaced file is verified again.
        std::fs::write(dir.path().join("b.bundle"), bundle("b", 5_000, &admin)).expect("write");
        let (bundles, _) = cache.load(dir.path(), &trust, 1_000);
        assert_eq!(bundles.keys().collect::<Vec<_>>(), ["b"]);
    }
}

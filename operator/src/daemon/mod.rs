//! `tenet operator`: the operator as a long-running process. It starts
//! ([`start`]: the data directory or the Kubernetes Lease, the gateway, the
//! metrics), then runs one loop of named steps ([`steps`]) until it is
//! stopped:
//!
//! ```text
//! loop {
//!     refresh      policies, tokens and bundles, when a file changed or a tick passed
//!     reconcile    one pass: every (terminal, policy) pair against the policies
//!     dispatch     envelopes handed to their terminals once durable
//!     certificates audits, issuance and renewal of security certificates
//!     report       status.json, the policies' status, metrics, stdout lines
//!     wait         for an agent message, a file change or the tick
//! }
//! ```
//!
//! Where the inputs come from is a [`source::Source`]: a policy directory or
//! the Kubernetes API.

mod bundles;
pub mod remote;
pub mod source;
mod start;
mod steps;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::reconcile::pass::PolicyStatus;
use crate::store::Store;

pub use bundles::{BundleCache, bundle_files};

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

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What `tenet operator` runs with.
pub struct Daemon {
    /// The policy directory (with `policy_remote`, the checkout of it).
    pub policies: PathBuf,
    /// Where the policies come from when they are not a local directory:
    /// a git remote, pulled every `pull_every`.
    pub policy_remote: Option<remote::GitRemote>,
    pub pull_every: Duration,
    /// With `policy_remote`: enforce only commits whose SSH signature
    /// verifies against this allowed signers file (absolute).
    pub allowed_signers: Option<PathBuf>,
    /// With `policy_remote`: the file holding the secret that signs the
    /// git host's push webhooks (`POST /webhook` on the metrics listener).
    pub webhook_secret: Option<PathBuf>,
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

/// What the operator shows a program that embeds it: where it listens, the
/// policies' counts after each pass, every dispatch-to-verified-report time,
/// and its metrics registry (the same counters `/metrics` serves).
#[derive(Default)]
pub struct Probe {
    pub address: tokio::sync::watch::Sender<Option<std::net::SocketAddr>>,
    pub passes: tokio::sync::watch::Sender<(usize, Vec<PolicyStatus>)>,
    pub round_trips: std::sync::Mutex<Vec<Duration>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// After a restart, a dispatch that is still out may or may not have
/// reached its terminal: it is reissued with a fresh envelope (a new
/// nonce and sequence number, which supersedes the old one on the
/// terminal), and the attempt does not count. A report for the old one is
/// refused as a replay. Verified results are already committed.
pub fn reissue_pending(
    store: &Store,
    retry: &crate::reconcile::state::Retry,
    now_ms: u64,
) -> usize {
    use crate::reconcile::state::{Event, PairState, next};
    let mut reissued = 0;
    for (terminal, policy, mut record) in store.pairs() {
        if matches!(record.state, PairState::Dispatched { .. }) {
            record.state = next(&record.state, &Event::Undelivered, retry, now_ms, 0.0);
            record.updated_ms = now_ms;
            store.set_pair(&terminal, &policy, &record);
            reissued += 1;
        }
    }
    reissued
}

impl Daemon {
    /// Start, then reconcile until stopped (or until an error the operator
    /// cannot go on from: the database cannot be read).
    pub async fn run(self, out: &mut (dyn Write + Send)) -> Result<(), DaemonError> {
        let mut running = self.start(out).await?;
        loop {
            running.refresh(out).await?;
            let pass = running.reconcile()?;
            running.dispatch(pass.outgoing).await?;
            running.certificates(out).await?;
            running.report(pass.statuses, out)?;
            running.wait().await;
        }
    }
}

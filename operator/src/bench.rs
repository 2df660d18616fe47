//! `tenet bench converge`: one convergence of N simulated terminals, the
//! first paper's experiment. The operator runs in this process (its memory
//! is this process's); the terminals run in a `tenet-agent simulate` child
//! process, each with its own key, mTLS connection and inventory. Once all
//! N are connected and compliant with the first generation of the policy,
//! the policy file is changed (a newer package version required) and the
//! clock starts; it stops when every terminal's remediation is verified and
//! the inventory it reported satisfies the new generation.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tenet_protocol::bundle::{Artifact, Capability, Manifest, PayloadBundle};
use tenet_protocol::wire::{digest_string, sha256};
use tenet_protocol::{Algorithm, KeyPair, SignedMessage};

use crate::daemon::{Daemon, Probe};
use crate::metrics::Metrics;
use crate::tokens::{Inbox, create_token};

const INSTALLER_WAT: &str = include_str!("../../examples/payloads/install-deb.wat");
const INSTALLER_SH: &str = include_str!("../../examples/payloads/install-deb.sh");

/// What one convergence measured.
#[derive(Debug, Serialize)]
pub struct Converge {
    pub terminals: usize,
    /// The rollout's in-flight limit (`null`: all at once).
    pub max_in_flight: Option<usize>,
    /// Terminals compliant with the new generation at the end.
    pub converged: usize,
    /// From the policy change to the last terminal verified compliant.
    pub wall_ms: f64,
    /// Per terminal: envelope handed to its connection -> verified report.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Resident memory of the operator (this process) at the end.
    pub operator_rss_bytes: u64,
    /// ... before any terminal connected.
    pub operator_rss_baseline_bytes: u64,
    /// ... once every terminal was connected and compliant, before the change.
    pub operator_rss_connected_bytes: u64,
    /// (end - baseline) / terminals.
    pub rss_per_terminal_bytes: u64,
    /// Time to enrol and connect every terminal (not part of wall_ms).
    pub setup_ms: f64,
    /// Database commits (fsyncs) during the convergence.
    pub store_commits: u64,
    /// Envelopes handed to connections during the convergence (one per
    /// terminal when nothing was retried), and those that could not be.
    pub dispatches: u64,
    pub undelivered: u64,
    /// Bundle bytes sent to the terminals during the convergence (a
    /// terminal that holds the bundle is sent none).
    pub bytes_sent: u64,
    /// Reconcile passes during the convergence, and their mean duration.
    pub passes: u64,
    pub pass_mean_ms: f64,
    pub cores: usize,
    /// Kubernetes mode: writes to the API server during the convergence,
    /// and per terminal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_writes_per_terminal: Option<f64>,
    /// ... of which to the ledger before the last terminal converged (the
    /// writes the convergence waited for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_ledger_writes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("{what} did not happen within {seconds} s: {state}")]
    Timeout {
        what: &'static str,
        seconds: u64,
        state: String,
    },
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

/// Resident set size of this process.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `text` signed by `admin` (through a scratch file in `work`): the
/// operator enforces only approved policies.
fn signed_policy(work: &Path, text: String, admin: &KeyPair) -> Result<String, BenchError> {
    let scratch = work.join("signing.yaml");
    write(&scratch, text.as_bytes())?;
    let now_ms = tenet_protocol::host::now_ms();
    crate::policy::approval::sign(
        &scratch,
        admin,
        crate::policy::approval::SignOptions {
            renew: false,
            now_ms,
            bundles: None,
        },
    )
    .map_err(setup)?;
    std::fs::read_to_string(&scratch).map_err(setup)
}

pub fn policy_yaml(version: &str, digest: &str, window: Option<usize>) -> String {
    let rollout = match window {
        Some(k) => format!("maxInFlight: {k}"),
        None => "maxInFlightPercent: 100".to_string(),
    };
    format!(
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: {{ name: bench-app, namespace: bench }}\nspec:\n  selector: {{ matchLabels: {{ fleet: bench }} }}\n  requirements:\n    - package: {{ name: bench-app, version: '>= {version}' }}\n  remediation:\n    payload: {{ name: install-bench-app, digest: '{digest}' }}\n    args: [bench-app_2.0-1_all.deb]\n    capabilities: [run-artifact, log]\n    timeoutSeconds: 120\n  rollout: {{ {rollout}, haltOnFailurePercent: 50 }}\n"
    )
}

/// A terminal of the benchmark fleet: bench-app 1.0 among thirty packages.
pub fn template() -> String {
    let mut yaml = String::from(
        "terminal: template\nlabels: { fleet: bench, site: nagoya }\nfacts:\n  os: { family: debian, distribution: debian, version: \"12\" }\npackages:\n  - { name: bench-app, version: 1.0-1 }\n",
    );
    for i in 0..30 {
        yaml.push_str(&format!("  - {{ name: lib{i}, version: 1.{i}-1 }}\n"));
    }
    yaml
}

fn write(path: &Path, text: &[u8]) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|e| setup(format!("{}: {e}", path.display())))
}

/// A signed bundle for simulated terminals: the install-deb payload and a
/// `PACKAGE_VERSION_all.deb` (the simulation installs it by its file name;
/// its content is a placeholder). Returns the bundle's bytes and digest.
pub fn simulated_install_bundle(
    admin: &KeyPair,
    name: &str,
    package: &str,
    version: &str,
) -> Result<(Vec<u8>, String), BenchError> {
    let module = wat::parse_str(INSTALLER_WAT).map_err(setup)?;
    let artifact = |name: &str, data: &[u8]| Artifact {
        name: name.into(),
        sha256: sha256(data),
        size: data.len() as u64,
        data: data.to_vec(),
    };
    let now = crate::time::now_ms();
    let b = PayloadBundle {
        manifest: Manifest {
            name: name.into(),
            version: version.into(),
            description: format!("installs {package} {version}"),
            capabilities: vec![Capability::RunArtifact, Capability::Log],
            created_ms: now,
            expires_ms: now + 24 * 3600 * 1000,
        },
        module,
        artifacts: vec![
            artifact("install-deb.sh", INSTALLER_SH.as_bytes()),
            artifact(
                &format!("{package}_{version}_all.deb"),
                format!("{package} {version} (simulated package)").as_bytes(),
            ),
        ],
    };
    let frame = SignedMessage::signed(&b, admin).map_err(setup)?;
    Ok((frame.encode(), digest_string(&frame.body_digest())))
}

async fn wait_until(
    probe: &Probe,
    what: &'static str,
    timeout: Duration,
    mut done: impl FnMut(usize, &[crate::reconcile::pass::PolicyStatus]) -> bool,
    child: &mut std::process::Child,
) -> Result<(), BenchError> {
    let mut rx = probe.passes.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        {
            let v = rx.borrow_and_update();
            if done(v.0, &v.1) {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Setup(format!(
                "tenet-agent simulate exited ({status}) while waiting: {what}"
            )));
        }
        match tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            rx.changed(),
        )
        .await
        {
            Ok(Ok(())) | Err(_) if tokio::time::Instant::now() < deadline => {}
            _ => {
                let v = rx.borrow();
                return Err(BenchError::Timeout {
                    what,
                    seconds: timeout.as_secs(),
                    state: format!("{} connected, {:?}", v.0, v.1),
                });
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// Run one convergence of `terminals` simulated terminals in `work`.
pub async fn converge(
    terminals: usize,
    window: Option<usize>,
    work: &Path,
    agent: &Path,
    kubernetes: Option<crate::daemon::KubeSettings>,
    progress: &mut (dyn Write + Send),
) -> Result<Converge, BenchError> {
    // Kubernetes mode: the policy is applied to the API server, not written.
    let kube_client = match &kubernetes {
        Some(k) => {
            let client = kube::Client::try_default().await.map_err(setup)?;
            for ns in ["bench", k.namespace.as_str()] {
                let api: kube::Api<k8s_openapi::api::core::v1::Namespace> =
                    kube::Api::all(client.clone());
                let body = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                api.patch(
                    ns,
                    &kube::api::PatchParams::apply("tenet-bench"),
                    &kube::api::Patch::Apply(&body),
                )
                .await
                .map_err(setup)?;
            }
            Some(client)
        }
        None => None,
    };
    let apply_policy = |yaml: String| {
        let client = kube_client.clone();
        async move {
            let Some(client) = client else {
                return Ok::<(), BenchError>(());
            };
            let policy: tenet_crds::TerminalPolicy = serde_yaml::from_str(&yaml).map_err(setup)?;
            let api: kube::Api<tenet_crds::TerminalPolicy> = kube::Api::namespaced(client, "bench");
            api.patch(
                "bench-app",
                &kube::api::PatchParams::apply("tenet-bench").force(),
                &kube::api::Patch::Apply(&policy),
            )
            .await
            .map_err(setup)?;
            Ok(())
        }
    };
    let (policies, bundles, data) = (
        work.join("policies"),
        work.join("bundles"),
        work.join("data"),
    );
    for d in [&policies, &bundles] {
        std::fs::create_dir_all(d).map_err(setup)?;
    }
    let admin = KeyPair::generate(Algorithm::Ed25519).map_err(setup)?;
    admin.write_files(&work.join("admin.key")).map_err(setup)?;
    let (bundle, digest) =
        simulated_install_bundle(&admin, "install-bench-app", "bench-app", "2.0-1")?;
    write(&bundles.join("install-bench-app.bundle"), &bundle)?;
    let first = signed_policy(work, policy_yaml("1.0", &digest, window), &admin)?;
    write(&policies.join("bench.yaml"), first.as_bytes())?;
    write(&work.join("template.yaml"), template().as_bytes())?;

    let probe = Arc::new(Probe::default());
    let daemon = Daemon {
        policies: policies.clone(),
        policy_remote: None,
        pull_every: Duration::from_secs(60),
        allowed_signers: None,
        webhook_secret: None,
        bundles,
        data: data.clone(),
        listen: "127.0.0.1:0".into(),
        names: vec!["127.0.0.1".into(), "localhost".into()],
        admin_keys: vec![work.join("admin.key.pub")],
        admin_threshold: 1,
        tick: Duration::from_secs(1),
        metrics: None,
        probe: Some(probe.clone()),
        // The whole simulated fleet connects at once, from one address.
        limits: crate::gateway::Limits {
            max_sessions: terminals + 64,
            max_opening: terminals + 64,
            max_opening_per_address: terminals + 64,
            ..Default::default()
        },
        kubernetes: kubernetes.clone(),
        tpm_roots: Vec::new(),
    };
    apply_policy(first).await?;
    let operator = tokio::spawn(async move {
        let mut sink = std::io::sink();
        daemon.run(&mut sink).await
    });
    let mut address = probe.address.subscribe();
    let address = tokio::time::timeout(Duration::from_secs(30), address.wait_for(Option::is_some))
        .await
        .map_err(|_| setup("the operator did not start listening"))?
        .map_err(setup)?
        .ok_or_else(|| setup("no address"))?;
    let issued = create_token(
        &data,
        None,
        u32::try_from(terminals).map_err(setup)?,
        Duration::from_secs(3600),
        [
            ("fleet".to_string(), "bench".to_string()),
            // The bench policy's namespace: Kubernetes mode selects only
            // terminals assigned to it.
            (
                crate::policy::NAMESPACE_LABEL.to_string(),
                "bench".to_string(),
            ),
        ]
        .into(),
        kubernetes
            .as_ref()
            .map_or(Inbox::Directory, |k| Inbox::Secret {
                namespace: &k.namespace,
            }),
        &mut std::io::sink(),
    )
    .await
    .map_err(setup)?;
    let baseline = rss_bytes();
    let log = std::fs::File::create(work.join("simulate.log")).map_err(setup)?;
    let started = Instant::now();
    let mut child = std::process::Command::new(agent)
        .args(["simulate", "--count", &terminals.to_string()])
        .args(["--operator", &address.to_string()])
        .args(["--ca-fingerprint", &issued.ca_fingerprint])
        .arg("--inventory")
        .arg(work.join("template.yaml"))
        .args(["--prefix", "bench", "--progress-seconds", "1"])
        .env("TENET_BOOTSTRAP_TOKEN", &issued.token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| setup(format!("{}: {e}", agent.display())))?;
    let result = async {
        let _ = writeln!(
            progress,
            "enrolling and connecting {terminals} simulated terminals"
        );
        let setup_timeout = Duration::from_secs(60 + terminals as u64 / 20);
        wait_until(
            &probe,
            "every terminal connected and compliant with generation 1",
            setup_timeout,
            |connected, s| {
                connected == terminals
                    && s.first().is_some_and(|p| {
                        p.selected as usize == terminals && p.compliant as usize == terminals
                    })
            },
            &mut child,
        )
        .await?;
        let setup_ms = started.elapsed().as_secs_f64() * 1000.0;
        if kubernetes.is_some() {
            // Start from a quiet operator, as in standalone mode: the
            // enrolments' resources for people written first.
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut rx = probe.passes.subscribe();
            while {
                let now = Counters::read(&probe.metrics);
                now.api_pending > 0 || now.api_writes == 0
            } {
                if Instant::now() > deadline {
                    return Err(setup(
                        "the enrolments' resources were not written within 120 s",
                    ));
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
            }
        }
        let connected_rss = rss_bytes();
        let _ = writeln!(
            progress,
            "{terminals} connected in {:.1} s; changing the policy",
            setup_ms / 1000.0
        );
        if let Ok(mut r) = probe.round_trips.lock() {
            r.clear();
        }
        let before = Counters::read(&probe.metrics);
        let changed = signed_policy(work, policy_yaml("2.0", &digest, window), &admin)?;
        let t0 = Instant::now();
        write(&policies.join("bench.yaml"), changed.as_bytes())?;
        apply_policy(changed).await?;
        wait_until(
            &probe,
            "every terminal compliant with generation 2",
            Duration::from_secs(120 + terminals as u64 / 50),
            |_, s| {
                s.first()
                    .is_some_and(|p| p.generation >= 2 && p.compliant as usize == terminals)
            },
            &mut child,
        )
        .await?;
        let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let ledger_at_convergence = Counters::read(&probe.metrics).api_ledger_writes;
        if kubernetes.is_some() {
            // The resources for people are written behind: count those too.
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut rx = probe.passes.subscribe();
            while {
                let now = Counters::read(&probe.metrics);
                now.api_pending > 0 || now.api_writes == before.api_writes
            } {
                if Instant::now() > deadline {
                    return Err(setup(
                        "the resources for people were not all written within 120 s",
                    ));
                }
                // The loop publishes the counts at every pass or tick.
                let _ = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
            }
        }
        let mut trips = probe
            .round_trips
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        trips.sort();
        let end = rss_bytes();
        let after = Counters::read(&probe.metrics);
        let passes = after.passes.saturating_sub(before.passes);
        let pass_time = after.pass_time.saturating_sub(before.pass_time);
        let converged = probe
            .passes
            .borrow()
            .1
            .first()
            .map_or(0, |p| p.compliant as usize);
        Ok(Converge {
            terminals,
            max_in_flight: window,
            converged,
            wall_ms,
            p50_ms: percentile(&trips, 0.50),
            p99_ms: percentile(&trips, 0.99),
            max_ms: percentile(&trips, 1.0),
            operator_rss_bytes: end,
            operator_rss_baseline_bytes: baseline,
            operator_rss_connected_bytes: connected_rss,
            rss_per_terminal_bytes: end.saturating_sub(baseline) / terminals.max(1) as u64,
            setup_ms,
            store_commits: after.commits.saturating_sub(before.commits),
            passes,
            pass_mean_ms: pass_time.as_secs_f64() * 1000.0 / passes.max(1) as f64,
            dispatches: after.handed_over.saturating_sub(before.handed_over),
            undelivered: after.undelivered.saturating_sub(before.undelivered),
            bytes_sent: after.bundle_bytes.saturating_sub(before.bundle_bytes),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            api_writes: kubernetes
                .as_ref()
                .map(|_| after.api_writes.saturating_sub(before.api_writes)),
            api_ledger_writes: kubernetes
                .as_ref()
                .map(|_| ledger_at_convergence.saturating_sub(before.api_ledger_writes)),
            api_writes_per_terminal: kubernetes.as_ref().map(|_| {
                after.api_writes.saturating_sub(before.api_writes) as f64 / terminals.max(1) as f64
            }),
        })
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    operator.abort();
    result
}

/// The operator's counters at one moment, read from its metrics registry.
struct Counters {
    commits: u64,
    handed_over: u64,
    undelivered: u64,
    bundle_bytes: u64,
    passes: u64,
    pass_time: Duration,
    api_writes: u64,
    api_ledger_writes: u64,
    api_pending: u64,
}

impl Counters {
    fn read(m: &Metrics) -> Counters {
        let (passes, pass_time) = m.passes();
        let (api_writes, api_ledger_writes, api_pending) = m.api();
        Counters {
            commits: m.store_commits.get() as u64,
            handed_over: m.handed_over.get(),
            undelivered: m.undelivered.get(),
            bundle_bytes: m.bundle_bytes_sent.get() as u64,
            passes,
            pass_time,
            api_writes,
            api_ledger_writes,
            api_pending,
        }
    }
}

/// The `tenet-agent` next to this executable.
pub fn default_agent() -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name("tenet-agent"))
        .unwrap_or_else(|_| PathBuf::from("tenet-agent"))
}

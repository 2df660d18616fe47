//! Start-up: open the data directory (or win the Kubernetes Lease and read
//! the state from the API server), check the admin keys, start the gateway
//! and the metrics endpoint, and reissue what was in flight at the last
//! stop. What it returns is the loop's state.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tenet_protocol::bundle::BundleTrust;
use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::host::now_ms;
use tenet_protocol::{KeyPair, PublicKey, Signer};

use super::source::{DirectorySource, KubeSource, Source};
use super::steps::Running;
use super::{Daemon, DaemonError, KubeSettings, io, reissue_pending};
use crate::data_dir::{DataDir, open_data, open_keys, tokens_dir};
use crate::fleet::OperatorFleet;
use crate::gateway::{Gateway, TlsAcceptor};
use crate::reconcile::state::Retry;
use crate::store::Store;

impl Daemon {
    pub(super) async fn start(self, out: &mut (dyn Write + Send)) -> Result<Running, DaemonError> {
        let open_files = tenet_protocol::listen::raise_open_files_limit();
        tracing::info!(open_files, "open files limit");
        let files_changed = Arc::new(tokio::sync::Notify::new());
        let mut webhook = None;
        let (data, source) = match &self.kubernetes {
            None => {
                let data = open_data(&self.data, out)?;
                let mut source = DirectorySource::new(self.policies.clone(), self.data.clone());
                if let Some(remote) = &self.policy_remote {
                    if let Some(signers) = &self.allowed_signers {
                        super::remote::drop_unverified_checkout(&self.policies, signers).await;
                    }
                    // The checkout exists from the start, for the watcher.
                    std::fs::create_dir_all(&self.policies).map_err(io(&self.policies))?;
                    let mut pull = super::remote::Pull::new(
                        remote.clone(),
                        self.policies.clone(),
                        self.pull_every,
                    );
                    if let Some(signers) = &self.allowed_signers {
                        pull = pull.requiring_signatures(signers.clone());
                    }
                    if let Some(path) = &self.webhook_secret {
                        webhook = Some(Arc::new(super::remote::Webhook {
                            secret: read_secret(path)?,
                            asked: pull.asked.clone(),
                            wake: files_changed.clone(),
                        }));
                    }
                    source = source.pulling(pull);
                }
                (data, Source::Directory(source))
            }
            Some(k) => self.lead(k, files_changed.clone(), out).await?,
        };
        let mut data = data;
        let Trust {
            first,
            anchors,
            rotations,
            bundles: bundle_trust,
            dispatch_key,
        } = self.trust(&data.dispatch_key)?;
        let _ = writeln!(out, "{}", super::steps::describe_trust(&anchors));
        data.dispatch_key = dispatch_key.clone();
        let trust = Arc::new(std::sync::RwLock::new(crate::trust::InForce {
            anchors,
            rotations,
            dispatch_key,
        }));
        let (fleet, changes) = OperatorFleet::new(
            data.store.clone(),
            Retry::default(),
            now_ms,
            super::steps::jitter,
        );
        let fleet = Arc::new(fleet);
        let gateway = Arc::new(Gateway {
            acceptor: TlsAcceptor::from(Arc::new(data.ca.server_config(&self.names)?)),
            ca: data.ca.clone(),
            trust: trust.clone(),
            fleet: fleet.clone(),
            client_cert_validity: Duration::from_secs(24 * 3600),
            now_ms,
            limits: self.limits.clone(),
            tpm_roots: Arc::new(
                crate::tpm_trust::TpmRoots::load(&self.tpm_roots).map_err(DaemonError::Usage)?,
            ),
        });
        let reissued = reissue_pending(&data.store, &Retry::default(), now_ms());
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
            self.policy_remote
                .as_ref()
                .map_or_else(|| self.policies.display().to_string(), |r| r.display()),
            self.bundles.display()
        );
        let _ = out.flush();
        tokio::spawn(gateway.serve(listener));
        let metrics = self
            .probe
            .as_ref()
            .map_or_else(Default::default, |p| p.metrics.clone());
        if let Some(addr) = &self.metrics {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(Path::new(addr)))?;
            let _ = writeln!(
                out,
                "metrics at http://{}/metrics",
                l.local_addr().map_err(io(Path::new(addr)))?
            );
            tokio::spawn(metrics.clone().serve(l, webhook.clone()));
        }
        if let Some(p) = &self.probe {
            p.address.send_replace(Some(address));
        }
        let watcher = watch_dirs(
            &[&self.policies, &self.bundles, &tokens_dir(&self.data)],
            files_changed.clone(),
        );
        Ok(Running::new(
            self,
            data,
            source,
            fleet,
            changes,
            super::steps::TrustState {
                first,
                shared: trust,
                bundles: bundle_trust,
                refused: None,
            },
            metrics,
            files_changed,
            watcher,
        ))
    }

    /// Kubernetes mode: wait for the Lease, then read the state from the API
    /// server; the keys and the CA come from the data directory (a Secret).
    async fn lead(
        &self,
        k: &KubeSettings,
        files_changed: Arc<tokio::sync::Notify>,
        out: &mut (dyn Write + Send),
    ) -> Result<(DataDir, Source), DaemonError> {
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
        // Before the store's records are written out: Terminals already
        // there are not applied again (a relabelling stands).
        backend.watch_terminals(files_changed.clone()).await;
        let store = tokio::task::block_in_place(|| Store::with_backend(Box::new(backend.clone())))?;
        let policies = crate::kubernetes::Policies::watch(
            client,
            files_changed,
            backend.policy_uids.clone(),
            backend.writes.clone(),
            &k.identity,
        );
        policies.ready().await;
        Ok((
            DataDir {
                dispatch_key,
                ca,
                store: Arc::new(store),
            },
            Source::Kubernetes(KubeSource::new(backend, policies)),
        ))
    }

    /// What agents are told to trust (pinned at enrolment, rotated by the
    /// chain in DATA), what a bundle or an approval needs (the admin keys
    /// in force and their threshold), and the dispatch key in force.
    fn trust(&self, first_dispatch_key: &Arc<KeyPair>) -> Result<Trust, DaemonError> {
        let admin_keys = self
            .admin_keys
            .iter()
            .map(|p| PublicKey::read_pem_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        let first = crate::trust::first_anchors(
            admin_keys,
            self.admin_threshold,
            first_dispatch_key.public_key(),
        )
        .map_err(DaemonError::Usage)?;
        crate::trust::check_first(&self.data, &first).map_err(DaemonError::Usage)?;
        let chain =
            crate::trust::load_chain(&self.data, first.clone()).map_err(DaemonError::Usage)?;
        let dispatch_key = if chain.rotations.is_empty() {
            first_dispatch_key.clone()
        } else {
            Arc::new(
                crate::trust::dispatch_key_in_force(&self.data, &chain.anchors)
                    .map_err(DaemonError::Usage)?,
            )
        };
        let bundles = BundleTrust {
            admin_keys: chain.anchors.admin_keys.clone(),
            threshold: usize::from(chain.anchors.admin_threshold),
        };
        Ok(Trust {
            first,
            anchors: chain.anchors,
            rotations: Arc::new(chain.rotations),
            bundles,
            dispatch_key,
        })
    }
}

/// The trust in force: see [`Daemon::trust`].
struct Trust {
    first: TrustAnchors,
    anchors: TrustAnchors,
    rotations: Arc<Vec<Vec<u8>>>,
    bundles: BundleTrust,
    dispatch_key: Arc<KeyPair>,
}

/// Wake the loop when anything changes in the policy, bundle or token
/// directory (an edit, a new file, a `git pull`); the tick still catches
/// anything a watcher misses.
fn watch_dirs(
    dirs: &[&Path],
    wake: Arc<tokio::sync::Notify>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the directories (what a wake-up does) must not wake the
        // loop again: only changes count. An error may hide a change.
        if event.as_ref().map_or(true, |e| changes_content(&e.kind)) {
            wake.notify_one();
        }
    })
    .inspect_err(|e| tracing::warn!(error = %e, "cannot watch the policy directory; polling only"))
    .ok()?;
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::Recursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch; polling only");
        }
    }
    Some(watcher)
}

/// Whether a file system event may change what the operator reads: not a
/// read (an open, an access, a close without writing, a new access time),
/// which the operator's own scan of the directories makes.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, MetadataKind, ModifyKind};
    match kind {
        // A file closed after writing: its new content is complete.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_)
        | EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        _ => true,
    }
}

/// The webhook secret shared with the git host: the file's content,
/// trimmed, never empty.
fn read_secret(path: &Path) -> Result<Vec<u8>, DaemonError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(DaemonError::Usage(format!(
            "{}: the webhook secret is empty",
            path.display()
        )));
    }
    Ok(secret.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::changes_content;
    use notify::EventKind;
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind,
        RenameMode,
    };

    #[test]
    fn reads_do_not_wake_the_loop_changes_do() {
        for read in [
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)),
        ] {
            assert!(!changes_content(&read), "{read:?}");
        }
        for change in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(changes_content(&change), "{change:?}");
        }
    }
}

//! The steps of the operator's loop, each a method of [`Running`], the
//! loop's state. `Daemon::run` calls them in order, for ever.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tenet_protocol::KeyPair;
use tenet_protocol::bundle::BundleTrust;
use tenet_protocol::host::now_ms;
use tokio::sync::mpsc::UnboundedReceiver;

use super::bundles::BundleCache;
use super::source::Source;
use super::{Daemon, DaemonError};
use crate::data_dir::{DataDir, status_file};
use crate::fleet::{OperatorFleet, Wake};
use crate::metrics::Metrics;
use crate::reconcile::pass::{Bundle, Evaluations, Outgoing, Pass, PolicyStatus};
use crate::reconcile::state::Retry;
use crate::store::Store;

/// How often security certificates are reconciled at most.
const CERTS_EVERY: Duration = Duration::from_millis(250);

/// How often the status file and the policy lines are brought up to date.
const STATUS_EVERY: Duration = Duration::from_millis(500);

pub(super) fn jitter() -> f64 {
    tenet_protocol::keys::random_bytes().map_or(0.5, |b| f64::from(b[0]) / 255.0)
}

/// The pass's statuses, with each policy whose latest version is not
/// approved marked so (and listed, when nothing of it is in force), so
/// that status, the Ready condition and the metrics all show it.
pub(super) fn with_unapproved(
    mut statuses: Vec<PolicyStatus>,
    unapproved: &std::collections::BTreeMap<String, crate::policy::approval::Unapproved>,
) -> Vec<PolicyStatus> {
    for (key, u) in unapproved {
        match statuses.iter_mut().find(|s| s.policy == *key) {
            Some(s) => s.unapproved = Some(u.message()),
            None => statuses.push(PolicyStatus {
                policy: key.clone(),
                unapproved: Some(u.message()),
                ..PolicyStatus::default()
            }),
        }
    }
    statuses
}

/// The trust the loop keeps: version 1 (to walk the rotations from), the
/// trust in force it shares with the gateway, what bundles and approvals
/// need, and the last rotation refused (said once).
pub(super) struct TrustState {
    pub first: tenet_protocol::enrol::TrustAnchors,
    pub shared: crate::trust::SharedTrust,
    pub bundles: BundleTrust,
    pub refused: Option<String>,
}

impl TrustState {
    fn version(&self) -> u64 {
        self.shared
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .anchors
            .version
    }

    /// The key envelopes and certificates are signed with now.
    fn dispatch_key(&self) -> Arc<KeyPair> {
        self.shared
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .dispatch_key
            .clone()
    }
}

/// The line that says which trust is in force.
pub(super) fn describe_trust(anchors: &tenet_protocol::enrol::TrustAnchors) -> String {
    format!(
        "trust anchors version {}: {} of {} admin key(s), dispatch key {}",
        anchors.version,
        anchors.admin_threshold,
        anchors.admin_keys.len(),
        anchors.dispatch_key.fingerprint()
    )
}

/// What one reconcile pass produced.
pub(super) struct PassResult {
    pub outgoing: Vec<Outgoing>,
    pub statuses: Vec<PolicyStatus>,
}

/// The state the loop carries from one round to the next.
pub(super) struct Running {
    settings: Daemon,
    store: Arc<Store>,
    fleet: Arc<OperatorFleet>,
    /// What the gateway saw (a report, a connection): a reason to run now.
    changes: UnboundedReceiver<Wake>,
    /// A file changed in a watched directory (or a policy resource changed).
    files_changed: Arc<tokio::sync::Notify>,
    _watcher: Option<notify::RecommendedWatcher>,
    source: Source,
    trust: TrustState,
    bundle_cache: BundleCache,
    bundle_problems: Vec<String>,
    bundles: HashMap<String, Bundle>,
    evaluations: Mutex<Evaluations>,
    metrics: Arc<Metrics>,
    /// The directories are looked at when the watcher says something
    /// changed, and at least every tick (bundles expire; a watcher can miss
    /// events): not on every agent message.
    refreshed_at: Option<Instant>,
    certs_at: Instant,
    status_at: Instant,
    /// The status was brought up to date in this round.
    reported: bool,
    last_statuses: Vec<PolicyStatus>,
    last_written: Option<crate::status::Status>,
}

impl Running {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        settings: Daemon,
        data: DataDir,
        source: Source,
        fleet: Arc<OperatorFleet>,
        changes: UnboundedReceiver<Wake>,
        trust: TrustState,
        metrics: Arc<Metrics>,
        files_changed: Arc<tokio::sync::Notify>,
        watcher: Option<notify::RecommendedWatcher>,
    ) -> Running {
        let long_ago = Instant::now() - STATUS_EVERY.max(CERTS_EVERY);
        Running {
            settings,
            store: data.store,
            fleet,
            changes,
            files_changed,
            _watcher: watcher,
            source,
            trust,
            bundle_cache: BundleCache::default(),
            bundle_problems: Vec::new(),
            bundles: HashMap::new(),
            evaluations: Mutex::new(Evaluations::default()),
            metrics,
            refreshed_at: None,
            certs_at: long_ago,
            status_at: long_ago,
            reported: false,
            last_statuses: Vec::new(),
            last_written: None,
        }
    }

    /// Policies, tokens and bundles: read again when a watched file changed
    /// or a tick passed.
    pub(super) async fn refresh(
        &mut self,
        out: &mut (dyn Write + Send),
    ) -> Result<(), DaemonError> {
        if self
            .refreshed_at
            .is_some_and(|t| t.elapsed() < self.settings.tick)
        {
            return Ok(());
        }
        self.refreshed_at = Some(Instant::now());
        self.rotate(out);
        self.source
            .refresh(&self.store, &self.fleet, &self.trust.bundles, out)
            .await?;
        let (loaded, problems) =
            self.bundle_cache
                .load(&self.settings.bundles, &self.trust.bundles, now_ms());
        if problems != self.bundle_problems {
            for p in &problems {
                tracing::warn!(problem = %p, "bundle not used");
            }
            self.bundle_problems = problems;
        }
        self.bundles = loaded;
        Ok(())
    }

    /// A trust rotation installed in DATA while the operator runs: walked
    /// from version 1 like at start; when it verifies and its dispatch key
    /// is there, it is in force from now on, and every connected session
    /// gets it under the write lock, before anything signed by the new key.
    /// One that does not verify is said once and changes nothing.
    fn rotate(&mut self, out: &mut (dyn Write + Send)) {
        let data = &self.settings.data;
        let current = self.trust.version();
        // One stat a tick: the chain is read and verified again only when
        // the next version's file is there.
        if !crate::trust::rotation_path(data, current + 1).exists() {
            return;
        }
        let next = crate::trust::load_chain(data, self.trust.first.clone()).and_then(|chain| {
            if chain.anchors.version == current {
                return Ok(None);
            }
            let key = crate::trust::dispatch_key_in_force(data, &chain.anchors)?;
            Ok(Some((chain, key)))
        });
        let (chain, key) = match next {
            Ok(None) => return,
            Ok(Some(next)) => next,
            Err(e) => {
                if self.trust.refused.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "trust rotation not taken; the trust in force stays");
                    let _ = writeln!(out, "trust rotation not taken: {e}");
                    self.trust.refused = Some(e);
                }
                return;
            }
        };
        self.trust.refused = None;
        self.trust.bundles = BundleTrust {
            admin_keys: chain.anchors.admin_keys.clone(),
            threshold: usize::from(chain.anchors.admin_threshold),
        };
        let _ = writeln!(out, "{}", describe_trust(&chain.anchors));
        tracing::info!(version = chain.anchors.version, "trust rotated");
        let rotations = Arc::new(chain.rotations);
        let mut shared = self
            .trust
            .shared
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *shared = crate::trust::InForce {
            anchors: chain.anchors,
            rotations: rotations.clone(),
            dispatch_key: Arc::new(key),
        };
        let message = crate::gateway::rotations_message(&rotations);
        for terminal in self.fleet.connected_terminals() {
            if let Some(tx) = self.fleet.sender(&terminal)
                && tx.try_send(message.clone()).is_err()
            {
                tracing::warn!(%terminal, "the trust rotation did not fit the session's queue; it gets it on its next session");
            }
        }
    }

    /// One pass over every (terminal, policy) pair.
    pub(super) fn reconcile(&mut self) -> Result<PassResult, DaemonError> {
        let started = Instant::now();
        let dispatch_key = self.trust.dispatch_key();
        let online = |t: &str| self.fleet.sender(t).is_some();
        let (outgoing, statuses) = Pass {
            store: &self.store,
            policies: &self.source.loaded().policies,
            bundles: &self.bundles,
            dispatch_key: dispatch_key.as_ref(),
            online: &online,
            retry: Retry::default(),
            now_ms: now_ms(),
            jitter: jitter(),
            evaluations: Some(&self.evaluations),
        }
        .run()?;
        let statuses = with_unapproved(statuses, &self.source.loaded().unapproved);
        self.metrics.observe_pass(started.elapsed());
        self.source.publish(&statuses);
        if let Source::Kubernetes(k) = &self.source {
            self.metrics.observe_api(
                k.backend.writes.load(std::sync::atomic::Ordering::Relaxed),
                k.backend
                    .ledger_writes
                    .load(std::sync::atomic::Ordering::Relaxed),
                k.backend.pending(),
            );
        }
        self.metrics.dispatches.inc_by(outgoing.len() as u64);
        Ok(PassResult { outgoing, statuses })
    }

    /// Hand the envelopes of a pass to their terminals' connections, once
    /// they are durable (with their sequence numbers and nonce
    /// commitments). One that cannot be handed over is reissued fresh.
    pub(super) async fn dispatch(&mut self, outgoing: Vec<Outgoing>) -> Result<(), DaemonError> {
        if outgoing.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.durable(self.store.written()).await {
            // Not sent: they stay out and are retried after their deadline.
            tracing::error!(error = %e, count = outgoing.len(), "dispatches not sent: the database cannot commit");
            return Ok(());
        }
        for o in outgoing {
            let delivered = self.fleet.sender(&o.terminal).is_some_and(|tx| {
                match tx.dispatch(o.envelope.clone(), o.bundle_digest, o.bundle.clone()) {
                    Ok(bytes) => {
                        crate::gateway::Fleet::bundle_sent(&*self.fleet, bytes);
                        true
                    }
                    Err(_) => false,
                }
            });
            if delivered {
                self.metrics.handed_over.inc();
                self.fleet.sent(o.envelope_digest);
                tracing::info!(terminal = %o.terminal, policy = %o.policy, "dispatched");
            } else {
                self.metrics.undelivered.inc();
                tracing::info!(terminal = %o.terminal, policy = %o.policy, "undelivered; will reissue");
                crate::reconcile::pass::undelivered(&self.store, &o, &Retry::default(), now_ms());
            }
        }
        // Handing envelopes over woke thousands of connection writers; the
        // last one woken sits in this worker's LIFO slot, which no other
        // worker may steal. Found by `tenet bench converge`: without this
        // yield, that terminal's envelope waited seconds, or for ever, while
        // this loop kept running passes. Yield so the slot runs now.
        tokio::task::yield_now().await;
        Ok(())
    }

    /// Security certificates: audits, issuance, renewal. Their decisions are
    /// in seconds (renewal, audit timeouts): a sweep of every terminal at
    /// most four times a second, not on every agent message.
    pub(super) async fn certificates(
        &mut self,
        out: &mut (dyn Write + Send),
    ) -> Result<(), DaemonError> {
        if self.certs_at.elapsed() < CERTS_EVERY {
            return Ok(());
        }
        self.certs_at = Instant::now();
        let online = |t: &str| self.fleet.sender(t).is_some();
        let issuer = self.trust.dispatch_key();
        let round = crate::posture::reconcile(
            &self.store,
            &self.source.loaded().policies,
            issuer.as_ref(),
            &online,
            now_ms(),
        )?;
        for e in &round.events {
            let _ = writeln!(out, "{e}");
        }
        if round.outgoing.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.durable(self.store.written()).await {
            tracing::error!(error = %e, "certificate messages not sent: the database cannot commit");
            return Ok(());
        }
        for (terminal, message) in round.outgoing {
            if let Some(tx) = self.fleet.sender(&terminal) {
                let _ = tx.try_send(message);
            }
        }
        Ok(())
    }

    /// What people and programs see: round-trip times, the probe, and at
    /// most twice a second the status file, the metrics and the policy
    /// lines on stdout (it lists every terminal).
    pub(super) fn report(
        &mut self,
        statuses: Vec<PolicyStatus>,
        out: &mut (dyn Write + Send),
    ) -> Result<(), DaemonError> {
        let round_trips = self.fleet.take_round_trips();
        for d in &round_trips {
            self.metrics.round_trip_seconds.observe(d.as_secs_f64());
        }
        self.metrics.store_commits.set(self.store.commits() as i64);
        self.metrics
            .bundle_bytes_sent
            .set(self.fleet.bundle_bytes_sent() as i64);
        if let Some(p) = &self.settings.probe {
            if let Ok(mut r) = p.round_trips.lock() {
                r.extend(round_trips);
            }
            p.passes
                .send_replace((self.fleet.connected_count(), statuses.clone()));
        }
        self.reported = self.status_at.elapsed() >= STATUS_EVERY;
        if !self.reported {
            return Ok(());
        }
        self.status_at = Instant::now();
        let loaded = self.source.loaded();
        let status = crate::status::Status {
            source_revision: loaded.revision.clone(),
            ..crate::status::collect(
                &self.store,
                &statuses,
                &self.fleet.connected_terminals(),
                self.fleet.refusals(),
                &loaded.errors,
                now_ms(),
            )?
        };
        self.metrics.update(&status);
        // Kubernetes mode: the resources are the status (and the data
        // directory is a read-only Secret).
        if matches!(self.source, Source::Directory(_))
            && self.last_written.as_ref() != Some(&status)
        {
            let json = serde_json::to_vec_pretty(&status).unwrap_or_default();
            if let Err(e) =
                tenet_protocol::host::replace(&status_file(&self.settings.data), &json, 0o644)
            {
                tracing::error!(error = %e, "cannot write the status file");
            }
            self.last_written = Some(status);
        }
        if statuses != self.last_statuses {
            print_statuses(&statuses, out);
            self.last_statuses = statuses;
        }
        Ok(())
    }

    /// Until the next agent message, file change or tick (or the status is
    /// due); a burst of messages is taken by one pass.
    pub(super) async fn wait(&mut self) {
        let wait = if self.reported {
            self.settings.tick
        } else {
            STATUS_EVERY
                .saturating_sub(self.status_at.elapsed())
                .min(self.settings.tick)
        };
        tokio::select! {
            _ = self.changes.recv() => {}
            _ = self.files_changed.notified() => self.refreshed_at = None,
            _ = tokio::time::sleep(wait) => {}
        }
        while self.changes.try_recv().is_ok() {}
    }
}

fn print_statuses(statuses: &[PolicyStatus], out: &mut (dyn Write + Send)) {
    for s in statuses {
        let held = s
            .held
            .as_deref()
            .map(|h| format!(" (held: {h})"))
            .unwrap_or_default();
        if let Some(u) = &s.unapproved {
            let _ = writeln!(out, "{} UNAPPROVED: {u}", s.policy);
            if s.generation == 0 {
                continue;
            }
        }
        let _ = writeln!(
            out,
            "{} gen {}: {} selected, {} compliant, {} drifted, {} remediating, {} failed{held}",
            s.policy, s.generation, s.selected, s.compliant, s.drifted, s.remediating, s.failed
        );
    }
    let _ = out.flush();
}

//! The agent's side of a session, once: the one loop that a real agent
//! ([`crate::connection::Agent`]) and each simulated terminal
//! ([`crate::simulate`]) hold with the operator. What differs between them
//! (where reports are queued, how a payload runs, what answers an audit)
//! is the [`Terminal`] trait; what a session does is here.
//!
//! A session opens with `Hello`, every report not yet acknowledged, and an
//! inventory. Then it answers the operator: dispatches go to the
//! terminal's [`Runs`], acknowledgements leave the outbox, audits and
//! inventories are answered, the client certificate is renewed when half
//! its validity is gone. Payloads outlive a session: a run is never
//! stopped by a lost connection, and its report, queued in the outbox, is
//! sent by whichever session is open when it ends.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::inventory::InventoryReport;
use tenet_protocol::rotation::apply_chain;
use tenet_protocol::session::{MAX_SESSION_FRAME, SharedBytes, ToAgent, ToOperator};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Kind, SignedMessage};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::audit::AuditRequest;
use crate::connection::{ConnError, read_frame, write_frame};
use crate::parked::{Arrival, PATIENCE, Parked};
use crate::run_queue::{RunQueue, Start};

/// A payload run, started when its turn comes. It queues its report in
/// the outbox itself; the receiver fires when a newer dispatch for the
/// same policy supersedes it, and the run should then stop.
pub type Run = Box<dyn FnOnce(oneshot::Receiver<()>) -> BoxedRun + Send>;
pub type BoxedRun = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Queued reports: where each lives, and its bytes.
pub type Outbox<Q> = Vec<(Q, Vec<u8>)>;

/// A dispatch the terminal took.
pub enum Taken<Q> {
    /// Verified and recorded as used: run it when its turn comes.
    Run {
        policy: String,
        sequence: u64,
        run: Run,
    },
    /// Refused; the signed refusal is already queued as `queued`.
    Refused { queued: Q, report: Vec<u8> },
}

/// What a session needs from the terminal it speaks for.
pub trait Terminal {
    /// Where a queued report lives until the operator acknowledges it.
    type Queued;

    fn name(&self) -> &str;
    fn agent_version(&self) -> String;
    /// A signed inventory report of the terminal as it is now.
    fn inventory(&self) -> Result<Vec<u8>, ConnError>;
    /// Reports not yet acknowledged, oldest first.
    fn outbox(&self) -> Result<Outbox<Self::Queued>, ConnError>;
    /// The operator took the report with `digest`: drop it from the outbox.
    fn acknowledge(&self, queued: Self::Queued, digest: &[u8; 32]) -> Result<(), ConnError>;
    /// Verify a dispatch and record it as used, or refuse it.
    fn take(&self, envelope: &[u8], bundle: SharedBytes) -> Result<Taken<Self::Queued>, String>;
    /// The terminal's payload runs, which outlive a session.
    fn runs(&self) -> &Runs;
    /// The signed answer to an internal audit.
    fn audit(&self, request: &AuditRequest) -> Result<Vec<u8>, String>;
    /// The trust anchors pinned (at enrolment or by the last rotation).
    fn pinned_trust(&self) -> Result<TrustAnchors, String>;
    /// Pin `anchors` from now on (a rotation verified).
    fn pin_trust(&self, anchors: &TrustAnchors) -> Result<(), String>;
    /// A security certificate the issuer sent (`None`: withdrawn).
    fn hold(&self, _certificate: Option<Vec<u8>>) {}
    /// The operator accepted the session and said its version (operators
    /// of release 0.2 or later, first on every session).
    fn welcomed(&self, _operator_version: &str) {}
    /// The bundle with this body digest, if the terminal holds it (checked
    /// against the digest as it is read).
    fn cached_bundle(&self, _digest: &[u8; 32]) -> Option<SharedBytes> {
        None
    }
    /// Keep a bundle whose body digest is `digest` (asked for, and checked).
    fn keep_bundle(&self, _digest: &[u8; 32], _bundle: &SharedBytes) {}
    /// Whether the client certificate should be renewed now.
    fn renewal_due(&self) -> bool {
        false
    }
    /// The renewed client certificate for the transport `key`, used from
    /// the next connection on.
    fn renewed(&self, _key: rcgen::KeyPair, _pem: &str) -> Result<(), ConnError> {
        Ok(())
    }
}

/// How often a session looks at the inventory (and at the client
/// certificate's age); `None` only on demand.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub inventory_every: Option<Duration>,
}

/// One session over `stream`, until the connection ends.
pub async fn hold<T, S>(terminal: &T, stream: S, settings: Settings) -> Result<(), ConnError>
where
    T: Terminal,
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    write_frame(
        &mut writer,
        &ToOperator::Hello {
            terminal: terminal.name().to_string(),
            agent_version: terminal.agent_version(),
        },
    )
    .await?;
    // Frames are read in a task of their own: reading one is not
    // cancel-safe, so it must not be a branch of the select below.
    let (msg_tx, mut msg_rx) = mpsc::channel::<Result<ToAgent, ConnError>>(16);
    let reader_task = tokio::spawn(async move {
        loop {
            let m = read_frame::<_, ToAgent>(&mut reader, MAX_SESSION_FRAME)
                .await
                .map_err(ConnError::from);
            let stop = m.is_err();
            if msg_tx.send(m).await.is_err() || stop {
                break;
            }
        }
    });
    // Aborted however the session ends, also when this future is dropped
    // (an agent handing over to a new binary drops it): the task holds
    // the connection's read half, and the operator would otherwise see the
    // session live until the new one replaced it.
    let _reader = AbortOnDrop(reader_task);
    let mut session = Session {
        terminal,
        unacked: HashMap::new(),
        renewing: None,
        last_inventory: None,
        parked: Parked::default(),
    };
    session.converse(&mut writer, &mut msg_rx, settings).await
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The state of one session.
struct Session<'a, T: Terminal> {
    terminal: &'a T,
    /// Reports sent in this session and not yet acknowledged, by digest.
    unacked: HashMap<[u8; 32], T::Queued>,
    /// A renewal in flight: the new transport key, until its certificate.
    renewing: Option<rcgen::KeyPair>,
    last_inventory: Option<Vec<u8>>,
    /// Dispatches waiting for their bundle, and those behind them.
    parked: Parked,
}

/// The bundle body digest a signed envelope names, once its signature by
/// the pinned dispatch key verified (`None`: it did not, or it is
/// unreadable; taking it refuses it with the reason).
fn named_bundle<T: Terminal>(terminal: &T, envelope: &[u8]) -> Option<[u8; 32]> {
    let trust = terminal.pinned_trust().ok()?;
    let frame = SignedMessage::decode(envelope, Kind::DispatchEnvelope).ok()?;
    frame.verify_by(&trust.dispatch_key).ok()?;
    frame
        .open::<tenet_protocol::envelope::DispatchEnvelope>()
        .map(|e| e.payload_digest)
        .ok()
}

/// Walk the operator's chain of trust rotations from what `terminal`
/// pinned, and pin where it leads. A rotation that does not verify is
/// refused (logged), and the anchors stay those that verified before it:
/// neither the operator nor the dispatch key can change them alone.
fn rotate_trust<T: Terminal>(terminal: &T, rotations: &[Vec<u8>]) -> Result<(), String> {
    let pinned = terminal.pinned_trust()?;
    let walked = apply_chain(&pinned, rotations);
    if walked.applied > 0 {
        terminal.pin_trust(&walked.anchors)?;
        tracing::info!(
            from = pinned.version,
            to = walked.anchors.version,
            admin_keys = walked.anchors.admin_keys.len(),
            admin_threshold = walked.anchors.admin_threshold,
            dispatch_key = %walked.anchors.dispatch_key.fingerprint(),
            "trust rotated"
        );
    }
    if let Some((version, why)) = walked.refused {
        tracing::warn!(
            version,
            pinned = walked.anchors.version,
            error = %why,
            "trust rotation refused; the anchors pinned stay in force"
        );
    }
    Ok(())
}

impl<T: Terminal> Session<'_, T> {
    async fn converse<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        messages: &mut mpsc::Receiver<Result<ToAgent, ConnError>>,
        settings: Settings,
    ) -> Result<(), ConnError> {
        self.send_outbox(writer).await?;
        self.send_inventory(writer, true).await?;
        self.renew_if_due(writer).await?;
        let mut tick = settings
            .inventory_every
            .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
        let mut ticks: u64 = 0;
        let reported = self.terminal.runs().reported.clone();
        loop {
            tokio::select! {
                m = messages.recv() => match m {
                    Some(Ok(m)) => self.answer(writer, m).await?,
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
                () = reported.notified() => self.send_outbox(writer).await?,
                _ = async {
                    match tick.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    ticks += 1;
                    self.take_ready(writer).await?;
                    self.renew_if_due(writer).await?;
                    // On change, and at least every tenth interval.
                    self.send_inventory(writer, ticks.is_multiple_of(10)).await?;
                }
            }
        }
    }

    async fn answer<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        message: ToAgent,
    ) -> Result<(), ConnError> {
        let terminal = self.terminal;
        match message {
            // Every dispatch goes through the queue of those waiting for a
            // bundle, so envelopes are taken in the order they came.
            ToAgent::Dispatch { envelope, bundle } => {
                self.park(writer, envelope, Ok(bundle)).await?;
            }
            // The bundle by digest: from the cache, or asked for.
            ToAgent::DispatchRef { envelope } => {
                let named = named_bundle(terminal, &envelope);
                let bundle = match named {
                    // Not signed by the pinned dispatch key, or unreadable:
                    // taken with no bundle, refused and reported.
                    None => Ok(SharedBytes::default()),
                    Some(digest) => terminal.cached_bundle(&digest).ok_or(digest),
                };
                self.park(writer, envelope, bundle).await?;
            }
            ToAgent::Bundle { bundle } => {
                let digest = SignedMessage::decode(&bundle, Kind::PayloadBundle)
                    .map(|f| f.body_digest())
                    .ok();
                match digest.filter(|d| self.parked.fill(d, &bundle)) {
                    Some(digest) => {
                        terminal.keep_bundle(&digest, &bundle);
                        self.take_ready(writer).await?;
                    }
                    None => tracing::warn!("a bundle nobody asked for; dropped"),
                }
            }
            ToAgent::Ack { digest } => {
                // A digest not sent in this session was acknowledged before.
                if let Some(queued) = self.unacked.remove(&digest) {
                    terminal.acknowledge(queued, &digest)?;
                }
            }
            ToAgent::InventoryWanted => self.send_inventory(writer, true).await?,
            ToAgent::Ping => write_frame(writer, &ToOperator::Pong).await?,
            ToAgent::Certificate { pem } => {
                if let Some(key) = self.renewing.take() {
                    terminal.renewed(key, &pem)?;
                }
            }
            ToAgent::RenewalRefused { reason } => {
                self.renewing = None;
                tracing::warn!(%reason, "client certificate renewal refused");
            }
            ToAgent::Audit {
                nonce,
                pcrs,
                packages,
                services,
            } => {
                let request = AuditRequest {
                    nonce,
                    pcrs,
                    packages,
                    services,
                };
                match terminal.audit(&request) {
                    Ok(report) => write_frame(writer, &ToOperator::Audit(report)).await?,
                    Err(e) => tracing::error!(error = %e, "audit failed"),
                }
            }
            ToAgent::SecurityCertificate { certificate } => terminal.hold(certificate),
            ToAgent::Welcome { operator_version } => {
                tracing::info!(operator = %operator_version, "the operator welcomed this agent");
                terminal.welcomed(&operator_version);
            }
            ToAgent::TrustRotations { rotations } => {
                let rotations: Vec<Vec<u8>> = rotations.into_iter().map(|r| r.into_vec()).collect();
                if let Err(e) = rotate_trust(terminal, &rotations) {
                    tracing::error!(error = %e, "cannot pin the rotated trust anchors");
                }
            }
            // Enrolment messages: never within a session.
            ToAgent::Enrolled(_)
            | ToAgent::EnrolmentRefused { .. }
            | ToAgent::ActivateCredential { .. } => {
                tracing::warn!("an enrolment message within a session; ignored");
            }
        }
        Ok(())
    }

    /// Queue a dispatch behind those waiting for a bundle, ask for its
    /// own when it lacks it, and take what is ready.
    async fn park<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        envelope: Vec<u8>,
        bundle: Result<SharedBytes, [u8; 32]>,
    ) -> Result<(), ConnError> {
        match self.parked.push(envelope.clone(), bundle, Instant::now()) {
            Arrival::Ask(digest) => write_frame(writer, &ToOperator::Want { digest }).await?,
            Arrival::Queued => {}
            Arrival::Full => {
                tracing::warn!("too many dispatches wait for their bundles; refused");
                self.take(writer, &envelope, SharedBytes::default()).await?;
            }
        }
        self.take_ready(writer).await
    }

    /// Take the dispatches whose turn it is (refused, those that waited for
    /// their bundle too long).
    async fn take_ready<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> Result<(), ConnError> {
        for (envelope, bundle) in self.parked.ready(Instant::now(), PATIENCE) {
            self.take(writer, &envelope, bundle).await?;
        }
        Ok(())
    }

    /// Take a dispatch: run it when its turn comes, or send its signed
    /// refusal.
    async fn take<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        envelope: &[u8],
        bundle: SharedBytes,
    ) -> Result<(), ConnError> {
        match self.terminal.take(envelope, bundle) {
            Ok(Taken::Run {
                policy,
                sequence,
                run,
            }) => self.terminal.runs().submit(policy, sequence, run),
            Ok(Taken::Refused { queued, report }) => {
                self.unacked.insert(sha256(&report), queued);
                write_frame(writer, &ToOperator::Report(report)).await?;
            }
            Err(e) => tracing::error!(error = %e, "cannot take the dispatch"),
        }
        Ok(())
    }

    /// Send every queued report this session has not sent yet.
    async fn send_outbox<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
    ) -> Result<(), ConnError> {
        for (queued, report) in self.terminal.outbox()? {
            let digest = sha256(&report);
            if self.unacked.contains_key(&digest) {
                continue;
            }
            self.unacked.insert(digest, queued);
            write_frame(writer, &ToOperator::Report(report)).await?;
        }
        Ok(())
    }

    /// Send the inventory when it changed since the last one sent, or
    /// when `always`.
    async fn send_inventory<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        always: bool,
    ) -> Result<(), ConnError> {
        let inventory = match self.terminal.inventory() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot collect the inventory");
                return Ok(());
            }
        };
        let changed = self
            .last_inventory
            .as_ref()
            .is_none_or(|last| inventory_changed(last, &inventory));
        if always || changed {
            write_frame(writer, &ToOperator::Inventory(inventory.clone())).await?;
            self.last_inventory = Some(inventory);
        }
        Ok(())
    }

    async fn renew_if_due<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
    ) -> Result<(), ConnError> {
        if self.renewing.is_some() || !self.terminal.renewal_due() {
            return Ok(());
        }
        let (key, csr_pem) = crate::tls::csr(self.terminal.name())?;
        write_frame(writer, &ToOperator::RenewCertificate { csr_pem }).await?;
        self.renewing = Some(key);
        Ok(())
    }
}

/// Whether two signed inventory reports hold different inventories.
fn inventory_changed(a: &[u8], b: &[u8]) -> bool {
    let open = |bytes: &[u8]| {
        SignedMessage::decode(bytes, Kind::InventoryReport)
            .and_then(|f| f.open::<InventoryReport>())
            .map(|r| r.inventory)
            .ok()
    };
    open(a) != open(b)
}

/// A terminal's payload runs: the [`RunQueue`]'s decisions carried out.
/// Runs outlive sessions; each end wakes the open session ([`Runs::reported`])
/// to send what the run queued.
#[derive(Clone, Default)]
pub struct Runs {
    inner: Arc<Mutex<Inner>>,
    /// Notified when a run ends.
    pub reported: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    queue: RunQueue<Run>,
    /// How to stop each started run.
    stops: HashMap<u64, oneshot::Sender<()>>,
}

impl Runs {
    /// Queue a taken dispatch; it starts when its turn comes.
    pub fn submit(&self, policy: String, sequence: u64, run: Run) {
        let mut inner = self.lock();
        let admitted = inner.queue.push(policy.clone(), run);
        if let Some(stop) = admitted.stop.and_then(|id| inner.stops.remove(&id)) {
            let _ = stop.send(());
        }
        if admitted.waits {
            tracing::info!("dispatch {sequence} for {policy} waits for the running payload");
        }
        if let Some(start) = admitted.start {
            self.start(&mut inner, start);
        }
    }

    fn start(&self, inner: &mut Inner, start: Start<Run>) {
        let (stop_tx, stop_rx) = oneshot::channel();
        inner.stops.insert(start.id, stop_tx);
        let runs = self.clone();
        let run = tokio::spawn((start.job)(stop_rx));
        // Its end is reported even when it panicked: the queue must go on.
        tokio::spawn(async move {
            if let Err(e) = run.await {
                tracing::error!(error = %e, "a payload run ended abnormally");
            }
            runs.finished(start.id);
        });
    }

    fn finished(&self, id: u64) {
        let mut inner = self.lock();
        inner.stops.remove(&id);
        if let Some(next) = inner.queue.finished(id) {
            self.start(&mut inner, next);
        }
        drop(inner);
        self.reported.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

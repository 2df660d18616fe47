//! The standalone operator's side of the gateway: what happens to what the
//! agents send. Enrolment spends a bootstrap token in the embedded store;
//! inventories are verified against the terminal's registered identity key
//! and kept (newest only); execution reports are verified against the live
//! dispatch they answer (the evidence, the payload, the deadline, no replay)
//! and move the (terminal, policy) state machine. Verification failures are
//! counted by reason. Every change is announced on a channel for the
//! reconcile loop.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tenet_protocol::audit::AuditReport;
use tenet_protocol::enrol::EnrolmentRequest;
use tenet_protocol::inventory::InventoryReport;
use tenet_protocol::report::{ExecutionReport, Outcome, check_report};
use tenet_protocol::{Kind, Rejection, SignedMessage};
use tokio::sync::mpsc;

use crate::gateway::{Fleet, FleetError, Session, SessionTx, Sessions};
use crate::pki::ClientKey;
use crate::reconcile::posture::{Audit, Expected, external_audit};
use crate::reconcile::state::{Event, PairState, Retry, next};
use crate::store::{PairRecord, Store, StoredInventory};
use crate::tpm_trust::TpmTrust;

/// Something the reconcile loop should wake up for and look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    Connected(String),
    Disconnected(String),
    Inventory(String),
    Report { terminal: String, policy: String },
}

/// The operator's side of the agents' sessions, in both modes: it holds
/// the sessions, verifies what agents send (reports, inventories, audits)
/// and records it in the store, and wakes the reconcile loop.
pub struct OperatorFleet {
    pub store: Arc<Store>,
    pub retry: Retry,
    pub now_ms: fn() -> u64,
    pub jitter: fn() -> f64,
    sessions: Sessions,
    /// Reports and inventories refused, by reason.
    refused: Mutex<BTreeMap<&'static str, u64>>,
    changes: mpsc::UnboundedSender<Wake>,
    /// When each envelope in flight was handed to its connection.
    sent: Mutex<HashMap<[u8; 32], Instant>>,
    /// Dispatch-to-verified-report times not yet collected.
    round_trips: Mutex<Vec<Duration>>,
    /// Bundle bytes sent to agents.
    bundle_bytes: std::sync::atomic::AtomicU64,
}

/// The event a verified report means for its pair.
pub fn report_event(outcome: &Outcome, output_tail: &[u8]) -> Event {
    let tail = || {
        let text = String::from_utf8_lossy(output_tail);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        }
    };
    match outcome {
        Outcome::Exited { code: 0 } => Event::Succeeded,
        Outcome::Exited { code } => Event::Failed {
            reason: format!("the payload exited with {code}{}", tail()),
        },
        Outcome::Trapped { message } => Event::Failed {
            reason: format!("the payload trapped: {message}"),
        },
        Outcome::TimedOut => Event::Failed {
            reason: "the payload ran out of time".into(),
        },
        // Not a failure of the payload: it waits for the next window.
        Outcome::Refused { reason, message } if reason == "OutsideWindow" => Event::NotStarted {
            reason: format!("the terminal did not start it: {message}"),
        },
        // The payload installed a new agent, which did not prove itself.
        Outcome::Refused { reason, message } if reason == tenet_protocol::report::ROLLED_BACK => {
            Event::Failed {
                reason: format!("the terminal rolled its agent back: {message}"),
            }
        }
        Outcome::Refused { reason, message } => Event::Failed {
            reason: format!("the terminal refused the dispatch: {message} ({reason})"),
        },
    }
}

impl OperatorFleet {
    pub fn new(
        store: Arc<Store>,
        retry: Retry,
        now_ms: fn() -> u64,
        jitter: fn() -> f64,
    ) -> (OperatorFleet, mpsc::UnboundedReceiver<Wake>) {
        let (changes, rx) = mpsc::unbounded_channel();
        (
            OperatorFleet {
                store,
                retry,
                now_ms,
                jitter,
                sessions: Sessions::default(),
                refused: Mutex::default(),
                changes,
                sent: Mutex::default(),
                round_trips: Mutex::default(),
                bundle_bytes: Default::default(),
            },
            rx,
        )
    }

    /// Refusals counted by reason, for metrics and status.
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.refused.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The terminals connected now.
    pub fn connected_terminals(&self) -> Vec<String> {
        self.sessions.names()
    }

    /// Bundle bytes sent to agents since the start.
    pub fn bundle_bytes_sent(&self) -> u64 {
        self.bundle_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many terminals are connected now.
    pub fn connected_count(&self) -> usize {
        self.sessions.len()
    }

    /// An envelope was handed to its terminal's connection now.
    pub fn sent(&self, envelope_digest: [u8; 32]) {
        if let Ok(mut s) = self.sent.lock() {
            s.insert(envelope_digest, Instant::now());
        }
    }

    /// The dispatch-to-verified-report times measured since the last call.
    pub fn take_round_trips(&self) -> Vec<Duration> {
        self.round_trips
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// De-enrol a terminal (its Terminal resource was deleted): its records
    /// go, and its session ends now, not at its next message. Whether it
    /// was enrolled.
    pub fn forget_terminal(&self, terminal: &str) -> bool {
        let gone = self.store.forget_terminal(terminal);
        self.sessions.end(terminal);
        gone
    }

    /// The sender of a connected terminal.
    pub fn sender(&self, terminal: &str) -> Option<SessionTx> {
        self.sessions.sender(terminal)
    }

    fn count(&self, e: &FleetError) {
        tracing::warn!(reason = e.reason(), error = %e, "message from an agent not taken");
        if let (FleetError::Refused(r), Ok(mut m)) = (e, self.refused.lock()) {
            *m.entry(r.reason()).or_insert(0) += 1;
        }
    }

    /// Decode a signed message and check it was signed by `terminal`'s
    /// registered identity key.
    fn verified_frame(
        &self,
        terminal: &str,
        kind: Kind,
        bytes: &[u8],
    ) -> Result<SignedMessage, FleetError> {
        let record = self
            .store
            .terminal(terminal)
            .ok_or_else(|| Rejection::Malformed(format!("{terminal} is not enrolled")))?;
        let frame = SignedMessage::decode(bytes, kind)?;
        frame.verify_by(&record.identity)?;
        Ok(frame)
    }

    /// Take a report: `Err` when it is refused (nothing taken), `Ok(Err)`
    /// when it was taken and the attempt failed.
    fn take_report(
        &self,
        terminal: &str,
        bytes: &[u8],
    ) -> Result<Result<(), Rejection>, FleetError> {
        let frame = self.verified_frame(terminal, Kind::ExecutionReport, bytes)?;
        let report: ExecutionReport = frame.open()?;
        let now = (self.now_ms)();
        let (policy, live) = self
            .store
            .dispatches_of(terminal)
            .into_iter()
            .find(|(_, d)| d.record.envelope_digest == report.envelope_digest)
            .ok_or_else(|| {
                Rejection::Replay("the report answers no dispatch of this terminal".into())
            })?;
        let pair = self.store.pair(terminal, &policy);
        let state = pair
            .as_ref()
            .map_or(PairState::Unknown, |p| p.state.clone());
        let generation = pair
            .as_ref()
            .map_or(live.policy_generation, |p| p.generation);
        let (event, result) = match check_report(&report, &live.record, now) {
            Ok(()) => (report_event(&report.outcome, &report.output_tail), Ok(())),
            // A replay changes nothing; any other failure fails the attempt.
            Err(r @ Rejection::Replay(_)) => return Err(r.into()),
            Err(r) => (
                Event::Failed {
                    reason: format!("the report was refused: {r}"),
                },
                Err(r),
            ),
        };
        let record = PairRecord {
            generation,
            state: next(&state, &event, &self.retry, now, (self.jitter)()),
            updated_ms: now,
            remediated: pair.as_ref().is_some_and(|p| p.remediated),
        };
        // In the evidence history with the change, as received, with what
        // was made of it.
        let evidence = tenet_protocol::evidence::Record::Reported {
            report: bytes.to_vec(),
            verdict: match &result {
                Ok(()) => "verified".into(),
                Err(r) => format!("the attempt failed: {r}"),
            },
        };
        let consumed = self.store.consume_dispatch(
            terminal,
            &policy,
            &report.envelope_digest,
            &record,
            Some((now, evidence)),
        );
        if consumed.is_none() {
            // Another copy of this report got there first.
            return Err(Rejection::Replay(
                "a report for this dispatch was already accepted".into(),
            )
            .into());
        }
        let sent = self
            .sent
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&report.envelope_digest));
        if let (Some(at), Ok(mut r)) = (sent, self.round_trips.lock()) {
            r.push(at.elapsed());
        }
        // What the terminal observed after a verified run is its newest
        // inventory; unless one it collected after the run reached the
        // operator first, which then counts as received now (otherwise the
        // pair would wait for the agent's next routine inventory).
        if let (Ok(()), Some(inventory)) = (&result, report.observed) {
            let stored = StoredInventory {
                sequence: report.finished_at_ms,
                received_ms: now,
                inventory,
            };
            if !self.store.put_inventory(terminal, stored) {
                self.store.restamp_inventory_after(
                    terminal,
                    report.finished_at_ms,
                    live.issued_ms,
                    now,
                );
            }
        }
        let _ = self.changes.send(Wake::Report {
            terminal: terminal.to_string(),
            policy,
        });
        Ok(result)
    }

    fn take_inventory(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError> {
        let frame = self.verified_frame(terminal, Kind::InventoryReport, bytes)?;
        let report: InventoryReport = frame.open()?;
        if report.terminal != terminal {
            return Err(Rejection::WrongTerminal {
                expected: terminal.to_string(),
                found: report.terminal,
            }
            .into());
        }
        let stored = StoredInventory {
            sequence: report.sequence,
            received_ms: (self.now_ms)(),
            inventory: report.inventory,
        };
        if self.store.put_inventory(terminal, stored) {
            let _ = self.changes.send(Wake::Inventory(terminal.to_string()));
        }
        Ok(())
    }
}

impl OperatorFleet {
    /// The external audit of an agent's audit report: its signature by the
    /// terminal, an outstanding request with its nonce, then
    /// `external_audit`. The verdict goes in the certificate record.
    fn take_audit(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError> {
        let frame = self.verified_frame(terminal, Kind::AuditReport, bytes)?;
        let report: AuditReport = frame.open()?;
        if report.terminal != terminal {
            return Err(Rejection::WrongTerminal {
                expected: terminal.to_string(),
                found: report.terminal,
            }
            .into());
        }
        let Some(mut record) = self.store.certificate(terminal) else {
            return Err(Rejection::Replay("an audit report nobody asked for".into()).into());
        };
        let Audit::Requested {
            nonce,
            pcrs,
            pinned,
            ..
        } = &record.audit
        else {
            return Err(Rejection::Replay("an audit report nobody asked for".into()).into());
        };
        if report.nonce != *nonce {
            return Err(Rejection::Replay("an audit report for an earlier request".into()).into());
        }
        let enrolled = self
            .store
            .terminal(terminal)
            .ok_or_else(|| Rejection::Malformed(format!("{terminal} is not enrolled")))?;
        let inventory = self.store.inventory(terminal);
        let now = (self.now_ms)();
        let expected = Expected {
            nonce,
            attestation_key: enrolled.attestation_key.as_ref(),
            tpm: &enrolled.tpm_trust,
            pcrs,
            pinned,
            baseline: record.baseline.as_deref(),
        };
        record.audit =
            match external_audit(&report, &expected, inventory.as_ref().map(|i| &i.inventory)) {
                Ok((attestation, baseline)) => {
                    if baseline.is_some() {
                        record.baseline = baseline;
                    }
                    tracing::info!(terminal, ?attestation, "audit passed");
                    Audit::Passed {
                        at_ms: now,
                        attestation,
                        presentation_key: report.presentation_key,
                    }
                }
                Err(reason) => {
                    tracing::warn!(terminal, %reason, "audit failed");
                    Audit::Failed { at_ms: now, reason }
                }
            };
        self.store.set_certificate(terminal, &record);
        let _ = self.changes.send(Wake::Inventory(terminal.to_string()));
        Ok(())
    }
}

impl Fleet for OperatorFleet {
    fn enrol(
        &self,
        request: &EnrolmentRequest,
        client_key: ClientKey,
        tpm: TpmTrust,
    ) -> Result<(), String> {
        tracing::info!(terminal = %request.terminal, tpm = request.tpm, key = %request.identity.fingerprint(), "enrolment request");
        self.store.enrol(request, client_key, tpm, (self.now_ms)())
    }

    fn admit(&self, terminal: &str, client_key: &ClientKey) -> bool {
        let admitted = self.store.admit_client_key(terminal, client_key);
        if !admitted {
            tracing::warn!(
                terminal,
                key = %hex::encode(client_key),
                "session refused: not the client key enrolled or renewed for this terminal"
            );
        }
        admitted
    }

    fn renewing(&self, terminal: &str, current: &ClientKey, renewed: ClientKey) -> bool {
        self.store.renew_client_key(terminal, current, renewed)
    }

    fn bundle_sent(&self, bytes: usize) {
        self.bundle_bytes
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn connected(&self, terminal: &str, session: Session) {
        tracing::info!(
            terminal,
            session = session.id,
            agent = %session.agent_version,
            "connected"
        );
        let agent_version = session.agent_version.clone();
        let replaced = self.sessions.insert_then(terminal, session, || {
            self.store.set_connected(terminal, &agent_version);
        });
        if replaced {
            tracing::warn!(
                terminal,
                "a newer session replaced the terminal's older one"
            );
        }
        let _ = self.changes.send(Wake::Connected(terminal.to_string()));
    }

    fn disconnected(&self, terminal: &str, id: u64) {
        let now = (self.now_ms)();
        let live = self.sessions.remove_then(terminal, id, || {
            self.store.set_offline_since(terminal, now);
        });
        if !live {
            // A replaced session: the terminal is still connected.
            tracing::info!(terminal, session = id, "replaced session ended");
            return;
        }
        tracing::info!(terminal, session = id, "disconnected");
        let _ = self.changes.send(Wake::Disconnected(terminal.to_string()));
    }

    fn report(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError> {
        /// What of a refused message the evidence history keeps, besides
        /// its digest and size.
        const REFUSED_HEAD: usize = 4096;
        match self.take_report(terminal, bytes) {
            Ok(taken) => taken.map_err(FleetError::from),
            Err(e) => {
                // A refusal is in the evidence history too, with the
                // bytes as they came.
                if let FleetError::Refused(r) = &e {
                    self.store.evidence(
                        (self.now_ms)(),
                        terminal,
                        tenet_protocol::evidence::Record::Refused {
                            sha256: tenet_protocol::wire::sha256(bytes),
                            size: bytes.len() as u64,
                            head: bytes[..bytes.len().min(REFUSED_HEAD)].to_vec(),
                            reason: r.to_string(),
                        },
                    );
                }
                Err(e)
            }
        }
        .inspect_err(|r| self.count(r))
    }

    fn inventory(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError> {
        self.take_inventory(terminal, bytes)
            .inspect_err(|r| self.count(r))
    }

    fn audit(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError> {
        self.take_audit(terminal, bytes)
            .inspect_err(|r| self.count(r))
    }

    fn still_admitted(&self, terminal: &str, client_key: &ClientKey) -> bool {
        self.store.client_key_admitted(terminal, client_key)
    }

    fn check_enrolment(&self, request: &EnrolmentRequest) -> Result<(), String> {
        self.store.check_enrolment(request, (self.now_ms)())
    }

    fn settled(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        let written = self.store.written();
        Box::pin(async move { self.store.durable(written).await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests;

//! Prometheus metrics of the standalone operator, served at `/metrics`:
//! pairs by state, connected terminals, dispatches started, messages
//! refused by reason, and a histogram of reconcile pass durations.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::status::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pairs: Family<StateLabel, Gauge>,
    certificates: Family<StateLabel, Gauge>,
    connected: Gauge,
    terminals: Gauge,
    /// Policies whose latest version the admins did not approve.
    unapproved: Gauge,
    pub dispatches: Counter,
    refused: Family<ReasonLabel, Counter>,
    refused_seen: Mutex<BTreeMap<String, u64>>,
    pub reconcile_seconds: Histogram,
    /// Passes run and their total time: the histogram's count and sum,
    /// which prometheus-client reads back only in its tests, so kept again
    /// for a program that embeds the operator (the benchmark).
    passes: Counter,
    pass_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub round_trip_seconds: Histogram,
    /// Envelopes handed to a terminal's connection, and envelopes that
    /// could not be (reissued fresh).
    pub handed_over: Counter,
    pub undelivered: Counter,
    /// Database commits (each one fsync, or one API write batch).
    pub store_commits: Gauge,
    /// Bundle bytes sent to agents (whole dispatches, and bundles asked
    /// for by digest).
    pub bundle_bytes_sent: Gauge,
    /// Kubernetes mode: writes to the API server so far, of which to the
    /// ledger (Remediation status), and resources not yet written.
    api_writes: Gauge,
    api_ledger_writes: Gauge,
    api_pending: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tenet");
        let pairs = Family::<StateLabel, Gauge>::default();
        let certificates = Family::<StateLabel, Gauge>::default();
        registry.register(
            "security_certificates",
            "security certificates by the reason of their Ready condition (Issued, Withheld, Expired, AwaitingAudit)",
            certificates.clone(),
        );
        let connected = Gauge::default();
        let terminals = Gauge::default();
        let unapproved = Gauge::default();
        registry.register(
            "policies_unapproved",
            "policies whose latest version the admins did not approve (the last approved generation, if any, stays in force)",
            unapproved.clone(),
        );
        let dispatches = Counter::default();
        let refused = Family::<ReasonLabel, Counter>::default();
        // 100 µs to ~1.6 s.
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "pairs",
            "(terminal, policy) pairs by reconcile state",
            pairs.clone(),
        );
        registry.register(
            "terminals_connected",
            "terminals holding a connection",
            connected.clone(),
        );
        registry.register(
            "terminals_enrolled",
            "enrolled terminals",
            terminals.clone(),
        );
        registry.register("dispatches", "dispatches started", dispatches.clone());
        registry.register(
            "refused_messages",
            "reports and inventories refused, by reason",
            refused.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "duration of one reconcile pass over every policy and terminal",
            reconcile_seconds.clone(),
        );
        // 1 ms to ~65 s.
        let round_trip_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "remediation_round_trip_seconds",
            "from handing an envelope to its terminal's connection to its verified report",
            round_trip_seconds.clone(),
        );
        let passes = Counter::default();
        registry.register("reconcile_passes", "reconcile passes run", passes.clone());
        let pass_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "reconcile_pass_seconds",
            "time spent in reconcile passes",
            pass_seconds.clone(),
        );
        let handed_over = Counter::default();
        registry.register(
            "envelopes_handed_over",
            "envelopes handed to a terminal's connection",
            handed_over.clone(),
        );
        let undelivered = Counter::default();
        registry.register(
            "envelopes_undelivered",
            "envelopes that could not be handed over (the terminal went away); reissued fresh",
            undelivered.clone(),
        );
        let store_commits = Gauge::default();
        registry.register(
            "store_commits",
            "database commits since the start",
            store_commits.clone(),
        );
        let bundle_bytes_sent = Gauge::default();
        registry.register(
            "bundle_bytes_sent",
            "bytes of payload bundles sent to agents since the start (a bundle an agent holds is not sent again)",
            bundle_bytes_sent.clone(),
        );
        let api_writes = Gauge::default();
        registry.register(
            "kubernetes_writes",
            "Kubernetes mode: writes to the API server since the start",
            api_writes.clone(),
        );
        let api_ledger_writes = Gauge::default();
        registry.register(
            "kubernetes_ledger_writes",
            "Kubernetes mode: writes of Remediation status (the ledger) since the start",
            api_ledger_writes.clone(),
        );
        let api_pending = Gauge::default();
        registry.register(
            "kubernetes_pending_writes",
            "Kubernetes mode: resources changed but not yet written to the API server",
            api_pending.clone(),
        );
        Metrics {
            passes,
            pass_seconds,
            handed_over,
            undelivered,
            store_commits,
            bundle_bytes_sent,
            api_writes,
            api_ledger_writes,
            api_pending,
            round_trip_seconds,
            registry,
            pairs,
            certificates,
            connected,
            terminals,
            unapproved,
            dispatches,
            refused,
            refused_seen: Mutex::default(),
            reconcile_seconds,
        }
    }

    /// Bring the gauges and counters up to date with a status.
    pub fn update(&self, status: &Status) {
        let mut by_state: BTreeMap<&str, i64> = BTreeMap::new();
        for state in [
            "Unknown",
            "Compliant",
            "Drifted",
            "Dispatched",
            "Verifying",
            "Failed",
        ] {
            by_state.insert(state, 0);
        }
        for t in &status.terminals {
            for p in &t.policies {
                *by_state.entry(p.state.as_str()).or_insert(0) += 1;
            }
        }
        for (state, n) in by_state {
            self.pairs
                .get_or_create(&StateLabel {
                    state: state.to_string(),
                })
                .set(n);
        }
        let mut certs: BTreeMap<&str, i64> = ["Issued", "Withheld", "Expired", "AwaitingAudit"]
            .into_iter()
            .map(|r| (r, 0))
            .collect();
        for t in &status.terminals {
            if let Some(ready) = t
                .certificate
                .as_ref()
                .and_then(|c| c.conditions.iter().find(|k| k.type_ == "Ready"))
            {
                *certs.entry(ready.reason.as_str()).or_insert(0) += 1;
            }
        }
        for (state, n) in certs {
            self.certificates
                .get_or_create(&StateLabel {
                    state: state.to_string(),
                })
                .set(n);
        }
        self.terminals.set(status.terminals.len() as i64);
        self.unapproved.set(
            status
                .policies
                .iter()
                .filter(|p| p.unapproved.is_some())
                .count() as i64,
        );
        self.connected
            .set(status.terminals.iter().filter(|t| t.connected).count() as i64);
        if let Ok(mut seen) = self.refused_seen.lock() {
            for (reason, total) in &status.refused {
                let before = seen.insert(reason.clone(), *total).unwrap_or(0);
                if *total > before {
                    self.refused
                        .get_or_create(&ReasonLabel {
                            reason: reason.clone(),
                        })
                        .inc_by(total - before);
                }
            }
        }
    }

    pub fn observe_pass(&self, took: Duration) {
        self.reconcile_seconds.observe(took.as_secs_f64());
        self.passes.inc();
        self.pass_seconds.inc_by(took.as_secs_f64());
    }

    /// Reconcile passes run so far, and their total time.
    pub fn passes(&self) -> (u64, Duration) {
        (
            self.passes.get(),
            Duration::from_secs_f64(self.pass_seconds.get()),
        )
    }

    /// Kubernetes mode: the API writes so far, of which to the ledger, and
    /// the resources not yet written.
    pub fn observe_api(&self, writes: u64, ledger_writes: u64, pending: u64) {
        self.api_writes.set(writes as i64);
        self.api_ledger_writes.set(ledger_writes as i64);
        self.api_pending.set(pending as i64);
    }

    /// What `observe_api` last saw: (writes, ledger writes, pending).
    pub fn api(&self) -> (u64, u64, u64) {
        (
            self.api_writes.get() as u64,
            self.api_ledger_writes.get() as u64,
            self.api_pending.get() as u64,
        )
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Serve `GET /metrics` on `listener`, and `POST /webhook` when the
    /// policies come from a git remote whose host signs its push
    /// notifications: 64 connections at once at most (16 from one
    /// address); accept errors (out of file descriptors) are waited out.
    pub async fn serve(
        self: std::sync::Arc<Self>,
        listener: tokio::net::TcpListener,
        webhook: Option<std::sync::Arc<crate::daemon::remote::Webhook>>,
    ) {
        tenet_protocol::listen::accept_loop(listener, 64, 16, move |mut stream, _| {
            let metrics = self.clone();
            let webhook = webhook.clone();
            async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                // Read the request head, at most 8 KiB, for at most 5 s.
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await;
                let response = if let (Ok(()), Some(hook), true) =
                    (&read, &webhook, request.starts_with(b"POST /webhook "))
                {
                    answer_webhook(hook, request, &mut stream).await
                } else if read.is_ok() && request.starts_with(b"GET /metrics ") {
                    let body = metrics.encode();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        })
        .await;
    }
}

/// Read a webhook's body (as long as its Content-Length says, at most
/// [`crate::daemon::remote::MAX_WEBHOOK_BODY`], within 5 s) after the
/// `head` already read, and answer: 204 and a fetch when its signature
/// verifies, 401 otherwise.
async fn answer_webhook(
    hook: &crate::daemon::remote::Webhook,
    mut request: Vec<u8>,
    stream: &mut tokio::net::TcpStream,
) -> String {
    let respond = |status: &str| {
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    };
    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
        return respond("400 Bad Request");
    };
    let head = String::from_utf8_lossy(&request[..end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) else {
        return respond("411 Length Required");
    };
    if length > crate::daemon::remote::MAX_WEBHOOK_BODY {
        return respond("413 Content Too Large");
    }
    let mut body = request.split_off(end + 4);
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 8192];
        while body.len() < length {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    body.truncate(length);
    if read.is_err() || body.len() < length {
        return respond("408 Request Timeout");
    }
    let signature = header("x-hub-signature-256").unwrap_or_default();
    if !hook.verifies(&body, &signature) {
        // Anyone can post: not worth a warning each.
        tracing::debug!("webhook refused: its signature does not verify");
        return respond("401 Unauthorized");
    }
    tracing::info!("webhook: the policy branch changed; fetching");
    hook.pushed();
    respond("204 No Content")
}

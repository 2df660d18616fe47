//! `tenet-agent bench present`: the second paper's experiment. A
//! presentation listener (the agent's own code: TLS 1.3, session-bound
//! challenge, Ed25519 presentation key) answers peers over loopback; C
//! peers hold a connection each and ask for the certificate; the latency of
//! each request is from the challenge sent to the answer read (the TLS
//! handshake before it is not counted, as in the paper; every answer is
//! then verified, untimed). Two modes, one run:
//!
//! - **async**: the certificate is ready (audited beforehand); answering
//!   is one signature.
//! - **sync**: an internal audit runs on every request before the answer:
//!   posture facts from an inventory and, with `--tcti`, a TPM quote over
//!   PCRs 0-7 signed by the attestation key plus the report signed by the
//!   TPM identity key (one TPM, one request at a time, as on a terminal).
//!
//! Two load shapes: **burst** (all C peers send at the same instant, a few
//! rounds) and **steady** (each of the C peers asks once a second at a
//! random phase, for a few seconds).
//!
//! The server runs on one tokio worker, the peers on another: the two
//! cores of the machine, one each.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tenet_protocol::certificate::{CERTIFICATE_VERSION, SecurityCertificate};
use tenet_protocol::present_tls::{PresentAnswer, ask, client_config};
use tenet_protocol::presentation::{Requirements, verify_presentation};
use tenet_protocol::{Algorithm, KeyPair, SignedMessage, Signer};

use crate::audit::{AuditRequest, Presenter, SyncAudit, presentation_tls, serve};

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub mode: &'static str,
    pub load: &'static str,
    pub connections: usize,
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub verified: usize,
}

use tenet_protocol::host::now_ms;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// An internal audit per request: posture, and with a TPM a quote and a
/// TPM-signed report; the TPM is driven by one thread, as on a terminal.
fn sync_audit(tcti: Option<String>) -> Result<SyncAudit, String> {
    let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<Result<(), String>>>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tenet-bench-tpm".into())
        .spawn(move || {
            let tpm = match tcti.as_deref().map(crate::tpm::TpmIdentity::open) {
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
                None => None,
            };
            let software = KeyPair::generate(Algorithm::Ed25519).ok();
            let _ = ready_tx.send(Ok(()));
            let presentation = KeyPair::generate(Algorithm::Ed25519)
                .map(|k| k.public_key())
                .ok();
            let inventory = sample_inventory();
            for reply in rx {
                let r = (|| {
                    let nonce = tenet_protocol::keys::random_bytes().map_err(|e| e.to_string())?;
                    let request = AuditRequest {
                        nonce,
                        pcrs: if tpm.is_some() {
                            (0..8).collect()
                        } else {
                            vec![]
                        },
                        packages: vec!["browser-a".into(), "openssl".into()],
                        services: vec!["clamav-daemon".into()],
                    };
                    let identity: &dyn Signer = match (&tpm, &software) {
                        (Some(t), _) => t,
                        (None, Some(k)) => k,
                        (None, None) => return Err("no key".to_string()),
                    };
                    crate::audit::audit(
                        "bench",
                        identity,
                        tpm.as_ref(),
                        presentation.clone().ok_or("no key")?,
                        &inventory,
                        std::path::Path::new("/nonexistent"),
                        &request,
                        now_ms(),
                    )
                    .map(|_| ())
                })();
                let _ = reply.send(r);
            }
        })
        .map_err(|e| e.to_string())?;
    ready_rx.recv().map_err(|e| e.to_string())??;
    let tx = Mutex::new(tx);
    Ok(Arc::new(move || {
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        tx.lock()
            .map_err(|_| "poisoned".to_string())?
            .send(reply_tx)
            .map_err(|e| e.to_string())?;
        reply_rx.recv().map_err(|e| e.to_string())?
    }))
}

fn sample_inventory() -> tenet_protocol::inventory::Inventory {
    serde_yaml::from_str(
        "terminal: bench\npackages:\n  - { name: browser-a, version: 120.0-1 }\n  - { name: openssl, version: 3.0.15-1~deb12u1 }\nservices:\n  - { name: clamav-daemon, state: running, enabled: true }\n",
    )
    .unwrap_or_default()
}

/// Run the whole table.
pub fn run(
    connections: &[usize],
    tcti: Option<String>,
    steady_seconds: u64,
) -> Result<Vec<Row>, String> {
    let issuer = KeyPair::generate(Algorithm::Ed25519).map_err(|e| e.to_string())?;
    let presenter = Arc::new(Presenter::ephemeral("bench").map_err(|e| e.to_string())?);
    let cert = SecurityCertificate {
        version: CERTIFICATE_VERSION,
        serial: [1; 16],
        issuer: "tenet-operator".into(),
        issuer_key: issuer.public_key().fingerprint(),
        not_before_ms: now_ms() - 1_000,
        not_after_ms: now_ms() + 3_600_000,
        subject: "bench".into(),
        subject_key: presenter.public_key(),
        level: 80,
    };
    let bytes = SignedMessage::signed(&cert, &issuer)
        .map_err(|e| e.to_string())?
        .encode();
    presenter.hold(Some(bytes), &issuer.public_key(), now_ms())?;
    let tls = Arc::new(presentation_tls("bench")?);
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-server")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-peers")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let audit = sync_audit(tcti)?;
    let mut rows = Vec::new();
    for (mode, sync) in [("async", None), ("sync", Some(audit))] {
        let listener = server
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let task = server.spawn(serve(
            presenter.clone(),
            listener,
            tls.clone(),
            sync,
            now_ms,
        ));
        for &c in connections {
            let rounds = if mode == "sync" {
                (200 / c).clamp(1, 5)
            } else {
                (3000 / c).clamp(3, 50)
            };
            let issuer_key = issuer.public_key();
            let row = clients.block_on(burst(addr, c, rounds, &issuer_key))?;
            rows.push(Row { mode, ..row });
            if mode == "async" && steady_seconds > 0 {
                let row = clients.block_on(steady(addr, c, steady_seconds, &issuer_key))?;
                rows.push(Row { mode, ..row });
            }
            eprintln!("{mode} {c}: done");
        }
        task.abort();
    }
    Ok(rows)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect_all(addr: std::net::SocketAddr, c: usize) -> Result<Vec<Tls>, String> {
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config().map_err(|e| e.to_string())?));
    let mut out = Vec::with_capacity(c);
    // Opened a few at a time: the handshakes are not what is measured.
    for _ in 0..c {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from("bench").map_err(|e| e.to_string())?;
        out.push(
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(out)
}

/// One request on one connection: latency, the answer and the bound
/// challenge it must verify against (verified later, untimed, so peers do
/// not slow each other down with their checks).
async fn once(tls: &mut Tls) -> Result<(f64, PresentAnswer, [u8; 32]), String> {
    let challenge = tenet_protocol::keys::random_bytes().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let (answer, bound) = ask(tls, challenge).await.map_err(|e| e.to_string())?;
    Ok((started.elapsed().as_secs_f64() * 1000.0, answer, bound))
}

type Sample = Result<(f64, PresentAnswer, [u8; 32]), String>;

/// Latencies, and how many answers verified.
fn verify_all(
    samples: Vec<Sample>,
    issuer: &tenet_protocol::PublicKey,
) -> Result<(Vec<f64>, usize), String> {
    let mut lat = Vec::with_capacity(samples.len());
    let mut verified = 0;
    for s in samples {
        let (ms, answer, bound) = s?;
        lat.push(ms);
        if let PresentAnswer::Presentation(b) = answer {
            let ok = verify_presentation(
                &b,
                &bound,
                &Requirements {
                    issuer_key: issuer,
                    subject: Some("bench"),
                    min_level: 60,
                },
                now_ms(),
            )
            .is_ok();
            verified += usize::from(ok);
        }
    }
    Ok((lat, verified))
}

async fn burst(
    addr: std::net::SocketAddr,
    c: usize,
    rounds: usize,
    issuer: &tenet_protocol::PublicKey,
) -> Result<Row, String> {
    let conns = connect_all(addr, c).await?;
    let start = Arc::new(tokio::sync::Barrier::new(c));
    let mut tasks = Vec::new();
    for mut tls in conns {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..rounds {
                start.wait().await;
                out.push(once(&mut tls).await);
            }
            out
        }));
    }
    finish("burst", c, tasks, issuer).await
}

async fn steady(
    addr: std::net::SocketAddr,
    c: usize,
    seconds: u64,
    issuer: &tenet_protocol::PublicKey,
) -> Result<Row, String> {
    let conns = connect_all(addr, c).await?;
    let mut tasks = Vec::new();
    for (i, mut tls) in conns.into_iter().enumerate() {
        // Spread the phases over the second.
        let phase = Duration::from_micros((i as u64 * 1_000_000) / c as u64);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + phase,
                Duration::from_secs(1),
            );
            for _ in 0..seconds {
                tick.tick().await;
                out.push(once(&mut tls).await);
            }
            out
        }));
    }
    finish("steady 1/s each", c, tasks, issuer).await
}

/// Every peer's samples, verified, as a row.
async fn finish(
    load: &'static str,
    c: usize,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
    issuer: &tenet_protocol::PublicKey,
) -> Result<Row, String> {
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.map_err(|e| e.to_string())?);
    }
    let (lat, verified) = verify_all(samples, issuer)?;
    Ok(row(load, c, lat, verified))
}

fn row(load: &'static str, c: usize, mut lat: Vec<f64>, verified: usize) -> Row {
    lat.sort_by(f64::total_cmp);
    Row {
        mode: "",
        load,
        connections: c,
        requests: lat.len(),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        verified,
    }
}

//! The agent against a gateway that misbehaves or expects more of it, all
//! real processes over real TLS: a corrupted frame drops the connection and
//! the agent reconnects; the client certificate is renewed before it
//! expires and the renewed one is what the agent connects with; a newer
//! dispatch for the same policy kills the loader still running.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenet::pki::Ca;
use tenet_e2e::{
    Event, MemoryFleet, Running, TestGateway, agent, binary, now_ms, processes_with, wait_for,
    wait_until,
};
use tenet_protocol::bundle::{Manifest, PayloadBundle};
use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::report::{ExecutionReport, Outcome};
use tenet_protocol::session::{ToAgent, ToOperator};
use tenet_protocol::{Algorithm, KeyPair, Kind, SignedMessage, Signer};
use tokio::io::AsyncWriteExt;

struct Fixture {
    tmp: tempfile::TempDir,
    ca: Arc<Ca>,
    admin: KeyPair,
    operator: Arc<KeyPair>,
    trust: TrustAnchors,
    fleet: Arc<MemoryFleet>,
    events: std::sync::mpsc::Receiver<Event>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(Ca::load_or_create(tmp.path()).expect("ca"));
        let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let operator = Arc::new(KeyPair::generate(Algorithm::Ed25519).expect("key"));
        let trust = TrustAnchors {
            admin_keys: vec![admin.public_key()],
            admin_threshold: 1,
            dispatch_key: operator.public_key(),
            issuer_key: operator.public_key(),
        };
        let (tx, events) = std::sync::mpsc::channel();
        let fleet = Arc::new(MemoryFleet {
            token: "token".into(),
            identities: Mutex::default(),
            senders: Mutex::default(),
            events: Mutex::new(tx),
        });
        std::fs::write(tmp.path().join("inventory.yaml"), "terminal: t1\n").expect("inventory");
        Fixture {
            tmp,
            ca,
            admin,
            operator,
            trust,
            fleet,
            events,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn gateway(&self, address: &str, validity: Duration) -> TestGateway {
        TestGateway::start_with(
            address,
            self.ca.clone(),
            self.trust.clone(),
            self.operator.clone(),
            self.fleet.clone(),
            validity,
        )
    }

    /// Configure and enrol terminal `t1` against `address`.
    fn enrol(&self, address: &str) {
        std::fs::write(
            self.dir().join("agent.yaml"),
            format!(
                "terminal: t1\ndata: data\ninventory:\n  file: inventory.yaml\noperator: {{ address: \"{address}\", serverName: 127.0.0.1 }}\ninventoryIntervalSeconds: 1\n"
            ),
        )
        .expect("config");
        let out = agent(
            self.dir(),
            &[
                "enrol",
                "--config",
                "agent.yaml",
                "--token",
                "token",
                "--ca-fingerprint",
                &self.ca.fingerprint(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn run_agent(&self) -> Running {
        Running(
            Command::new(binary("tenet-agent"))
                .args(["run", "--config", "agent.yaml"])
                .current_dir(self.dir())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("agent"),
        )
    }

    fn connected(&self) {
        wait_for(&self.events, Duration::from_secs(30), |e| {
            matches!(e, Event::Connected(_)).then_some(())
        });
    }

    /// A signed bundle of `wat` and a signed envelope for it in policy `ns/p`.
    fn dispatch(&self, wat: &str, sequence: u64) -> ToAgent {
        let bundle = PayloadBundle {
            manifest: Manifest {
                name: "test".into(),
                version: "1".into(),
                description: String::new(),
                capabilities: vec![],
                created_ms: now_ms(),
                expires_ms: now_ms() + 3_600_000,
            },
            module: wat::parse_str(wat).expect("wat"),
            artifacts: vec![],
        };
        let bundle = SignedMessage::signed(&bundle, &self.admin).expect("sign");
        let env = DispatchEnvelope {
            terminal: "t1".into(),
            policy: "ns/p".into(),
            policy_generation: 1,
            payload_digest: bundle.body_digest(),
            nonce: [sequence as u8; 32],
            issued_at_ms: now_ms(),
            deadline_ms: now_ms() + 60_000,
            sequence,
            args: vec![],
            capabilities: vec![],
            write_paths: vec![],
        };
        ToAgent::Dispatch {
            envelope: SignedMessage::signed(&env, self.operator.as_ref())
                .expect("sign")
                .encode(),
            bundle: bundle.encode(),
        }
    }
}

/// A gateway that answers every Hello with a frame announcing 4 GiB.
fn start_corrupting_gateway(
    ca: &Ca,
    connections: Arc<AtomicUsize>,
) -> (tokio::runtime::Runtime, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        ca.server_config(&["127.0.0.1".into()]).expect("tls"),
    ));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            if let Ok(ToOperator::Hello { .. }) =
                tenet::gateway::read_frame(&mut tls, 1 << 20).await
            {
                connections.fetch_add(1, Ordering::SeqCst);
                let _ = tls.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
                let _ = tls.flush().await;
            }
        }
    });
    (rt, address)
}

#[test]
fn a_corrupted_frame_drops_the_connection_and_the_agent_reconnects() {
    let f = Fixture::new();
    let mut real = f.gateway("127.0.0.1:0", Duration::from_secs(3600));
    f.enrol(&real.address.to_string());
    real.stop();
    // The same agent now points at a gateway that corrupts every session.
    let connections = Arc::new(AtomicUsize::new(0));
    let (evil, evil_address) = start_corrupting_gateway(&f.ca, connections.clone());
    let config = std::fs::read_to_string(f.dir().join("agent.yaml")).expect("config");
    std::fs::write(
        f.dir().join("agent.yaml"),
        config.replace(&real.address.to_string(), &evil_address),
    )
    .expect("config");
    let mut running = f.run_agent();
    wait_until(Duration::from_secs(30), "three corrupted sessions", || {
        connections.load(Ordering::SeqCst) >= 3
    });
    assert!(
        running.0.try_wait().expect("status").is_none(),
        "the agent survived"
    );
    // Back to the real gateway: the agent connects as if nothing happened.
    drop(running);
    evil.shutdown_timeout(Duration::from_secs(5));
    let _real = f.gateway(&evil_address, Duration::from_secs(3600));
    let _running = f.run_agent();
    f.connected();
}

#[test]
fn the_client_certificate_is_renewed_before_it_expires() {
    let f = Fixture::new();
    // Certificates valid for 3 s (plus a minute of clock skew before).
    let mut gw = f.gateway("127.0.0.1:0", Duration::from_secs(3));
    let address = gw.address.to_string();
    f.enrol(&address);
    let crt = f.dir().join("data/tls.crt");
    let enrolled = std::fs::read(&crt).expect("cert");
    let enrolled_at = now_ms();
    let _agent = f.run_agent();
    f.connected();
    wait_until(Duration::from_secs(20), "a renewed certificate", || {
        std::fs::read(&crt).is_ok_and(|c| c != enrolled)
    });
    // Once the enrolment certificate has expired, a new connection can only
    // be made with a renewed one.
    wait_until(
        Duration::from_secs(20),
        "the first certificate to expire",
        || now_ms() > enrolled_at + 4_000,
    );
    gw.stop();
    let _gw2 = f.gateway(&address, Duration::from_secs(3));
    f.connected();
}

#[test]
fn a_newer_dispatch_for_the_same_policy_kills_the_running_loader() {
    let f = Fixture::new();
    let gw = f.gateway("127.0.0.1:0", Duration::from_secs(3600));
    f.enrol(&gw.address.to_string());
    let _agent = f.run_agent();
    f.connected();
    let forever = r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;
    assert!(f.fleet.send("t1", f.dispatch(forever, 1)));
    wait_until(Duration::from_secs(10), "the first loader to start", || {
        processes_with(&["load", "--run-id", "1"]) == 1
    });
    let noop =
        r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(f.fleet.send("t1", f.dispatch(noop, 2)));
    let report = wait_for(&f.events, Duration::from_secs(20), |e| match e {
        Event::Report(b) => Some(b.clone()),
        _ => None,
    });
    let report: ExecutionReport = SignedMessage::decode(&report, Kind::ExecutionReport)
        .and_then(|frame| frame.open())
        .expect("report");
    assert_eq!(
        report.nonce, [2; 32],
        "the first report is the newer dispatch's"
    );
    assert_eq!(report.outcome, Outcome::Exited { code: 0 });
    assert_eq!(
        processes_with(&["load", "--run-id", "1"]),
        0,
        "the superseded loader is gone"
    );
}

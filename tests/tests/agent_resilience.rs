//! The agent against a gateway that misbehaves or expects more of it, all
//! real processes over real TLS: a corrupted frame drops the connection and
//! the agent reconnects; the client certificate is renewed before it
//! expires and the renewed one is what the agent connects with; a newer
//! dispatch for the same policy kills the loader still running; a lost
//! connection does not.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tenet::pki::Ca;
use tenet_e2e::{Event, Fixture, now_ms, processes_with, wait_for, wait_until};
use tenet_protocol::report::{ExecutionReport, Outcome};
use tenet_protocol::session::ToOperator;
use tenet_protocol::{Kind, SignedMessage};
use tokio::io::AsyncWriteExt;

/// The next execution report the gateway receives, opened.
fn next_report(f: &Fixture) -> ExecutionReport {
    let report = wait_for(&f.events, Duration::from_secs(20), |e| match e {
        Event::Report(b) => Some(b.clone()),
        _ => None,
    });
    SignedMessage::decode(&report, Kind::ExecutionReport)
        .and_then(|frame| frame.open())
        .expect("report")
}

/// A gateway that answers every Hello with a broken frame, in turn: one
/// announcing 4 GiB, one cut short, one whose body is not a message.
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
                let bad: &[u8] = match connections.fetch_add(1, Ordering::SeqCst) % 3 {
                    0 => &[0xff, 0xff, 0xff, 0xff, 1, 2, 3],
                    1 => &[0, 0, 0, 10, 1, 2, 3],
                    _ => &[0, 0, 0, 4, 0xee, 0xee, 0xee, 0xee],
                };
                let _ = tls.write_all(bad).await;
                let _ = tls.flush().await;
                let _ = tls.shutdown().await;
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
    wait_until(Duration::from_secs(60), "four corrupted sessions", || {
        connections.load(Ordering::SeqCst) >= 4
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
fn payloads_run_one_at_a_time_in_arrival_order() {
    let f = Fixture::new();
    let gw = f.gateway("127.0.0.1:0", Duration::from_secs(3600));
    f.enrol(&gw.address.to_string());
    let _agent = f.run_agent_logged();
    f.connected();
    let forever = r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;
    let noop =
        r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(f.fleet.send("t1", f.dispatch_for("ns/a", forever, 1)));
    wait_until(Duration::from_secs(10), "the first loader to start", || {
        processes_with(&["load", "--run-id", "1"]) == 1
    });
    // Another policy's dispatch waits while the first payload runs.
    assert!(f.fleet.send("t1", f.dispatch_for("ns/b", noop, 2)));
    let log = f.dir().join("agent.log");
    wait_until(
        Duration::from_secs(10),
        "the agent to queue dispatch 2",
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("dispatch 2 for ns/b waits for the running payload"))
        },
    );
    assert_eq!(processes_with(&["load", "--run-id", "2"]), 0);
    assert_eq!(processes_with(&["load", "--run-id", "1"]), 1);
    // A newer dispatch of the first policy stops it; the waiting one runs
    // first (it came first), then the newer one.
    assert!(f.fleet.send("t1", f.dispatch_for("ns/a", noop, 3)));
    let mut nonces = Vec::new();
    while nonces.len() < 2 {
        let report = next_report(&f);
        assert_eq!(report.outcome, Outcome::Exited { code: 0 });
        nonces.push(report.nonce[0]);
    }
    assert_eq!(nonces, [2, 3]);
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
    let report = next_report(&f);
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

#[test]
fn a_running_payload_outlives_its_session_and_is_superseded_in_the_next() {
    let f = Fixture::new();
    let mut gw = f.gateway("127.0.0.1:0", Duration::from_secs(3600));
    let address = gw.address.to_string();
    f.enrol(&address);
    let _agent = f.run_agent_logged();
    f.connected();
    let forever = r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;
    assert!(f.fleet.send("t1", f.dispatch(forever, 1)));
    wait_until(Duration::from_secs(10), "the first loader to start", || {
        processes_with(&["load", "--run-id", "1"]) == 1
    });
    // The operator goes away mid-install: the install goes on (killing
    // dpkg half way would leave a half-installed package).
    gw.stop();
    let log = f.dir().join("agent.log");
    wait_until(
        Duration::from_secs(10),
        "the agent to see its connection end",
        || {
            std::fs::read_to_string(&log).is_ok_and(|l| {
                l.contains("connection lost") || l.contains("the operator closed the connection")
            })
        },
    );
    assert_eq!(
        processes_with(&["load", "--run-id", "1"]),
        1,
        "a lost connection does not stop the payload"
    );
    // The next session's newer dispatch for the same policy supersedes it.
    let _gw2 = f.gateway(&address, Duration::from_secs(3600));
    f.connected();
    let noop =
        r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(f.fleet.send("t1", f.dispatch(noop, 2)));
    let report = next_report(&f);
    assert_eq!(report.nonce, [2; 32]);
    assert_eq!(report.outcome, Outcome::Exited { code: 0 });
    assert_eq!(
        processes_with(&["load", "--run-id", "1"]),
        0,
        "the superseded loader is gone"
    );
}

#[test]
fn a_report_the_operator_cannot_store_is_sent_again() {
    let f = Fixture::new();
    let mut gw = f.gateway("127.0.0.1:0", Duration::from_secs(3600));
    let address = gw.address.to_string();
    f.enrol(&address);
    // A report queued while no agent runs: a dispatch run from files.
    let noop =
        r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;
    let tenet_protocol::session::ToAgent::Dispatch { envelope, bundle } = f.dispatch(noop, 1)
    else {
        unreachable!("a dispatch")
    };
    std::fs::write(f.dir().join("envelope"), envelope).expect("write");
    std::fs::write(f.dir().join("bundle"), &bundle[..]).expect("write");
    let out = tenet_e2e::agent(
        f.dir(),
        &[
            "dispatch",
            "--config",
            "agent.yaml",
            "--envelope",
            "envelope",
            "--bundle",
            "bundle",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outbox = f.dir().join("data/outbox");
    let queued = || std::fs::read_dir(&outbox).map_or(0, |d| d.count());
    assert_eq!(queued(), 1);

    f.fleet.unavailable.store(true, Ordering::SeqCst);
    let _agent = f.run_agent();
    wait_for(&f.events, Duration::from_secs(30), |e| {
        matches!(e, Event::Unavailable).then_some(())
    });
    // The inventory comes after the report on the same connection: once it is
    // in, the report's (absent) acknowledgement would have come before it.
    wait_for(&f.events, Duration::from_secs(10), |e| {
        matches!(e, Event::Inventory(_)).then_some(())
    });
    assert_eq!(
        queued(),
        1,
        "a report the operator could not store stays queued"
    );

    f.fleet.unavailable.store(false, Ordering::SeqCst);
    gw.stop();
    let _gw2 = f.gateway(&address, Duration::from_secs(3600));
    wait_for(&f.events, Duration::from_secs(60), |e| {
        matches!(e, Event::Report(_)).then_some(())
    });
    wait_until(
        Duration::from_secs(10),
        "the stored report leaves the outbox",
        || queued() == 0,
    );
}

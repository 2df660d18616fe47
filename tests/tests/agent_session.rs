//! The agent and the gateway as real processes over real mutual TLS on
//! loopback: enrolment with a bootstrap token and a pinned CA, the held
//! connection, inventories, a pushed dispatch that installs a package
//! through real dpkg, acknowledgements emptying the outbox, and a report
//! queued while the operator was away delivered when it comes back.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tenet_e2e::{
    Event, Fixture, Running, TestGateway, agent, binary, build_deb, dpkg_root, install_bundle,
    now_ms, wait_for, wait_until,
};
use tenet_protocol::bundle::Capability;
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::inventory::InventoryReport;
use tenet_protocol::keys::random_bytes;
use tenet_protocol::report::{DispatchRecord, Outcome, nonce_commitment, verify_report};
use tenet_protocol::session::ToAgent;
use tenet_protocol::{Kind, PublicKey, SignedMessage};

fn browser_version(bytes: &[u8]) -> Option<String> {
    let report: InventoryReport = SignedMessage::decode(bytes, Kind::InventoryReport)
        .and_then(|f| f.open())
        .expect("inventory");
    report
        .inventory
        .packages
        .into_iter()
        .find(|p| p.name == "browser-a")
        .map(|p| p.version)
}

fn outbox_len(data: &Path) -> usize {
    std::fs::read_dir(data.join("outbox")).map_or(0, |d| d.count())
}

#[test]
fn enrol_connect_dispatch_acknowledge_and_reconnect() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "dpkg-deb is required under CI"
        );
        eprintln!("skipping: dpkg-deb is not installed");
        return;
    }
    let f = Fixture::new();
    let dir = f.dir();
    let (ca, admin, operator, trust, fleet, events) =
        (&f.ca, &f.admin, &f.operator, &f.trust, &f.fleet, &f.events);
    let mut gateway = TestGateway::start(
        "127.0.0.1:0",
        ca.clone(),
        trust.clone(),
        operator.clone(),
        fleet.clone(),
    );
    let address = gateway.address;

    // A terminal root with browser-a 118, installed by dpkg.
    let old = build_deb(dir, "browser-a", "118.0.2-1");
    let new = build_deb(dir, "browser-a", "120.0-1");
    let _root = dpkg_root(dir, &[&old]);
    std::fs::write(
        dir.join("agent.yaml"),
        format!(
            "terminal: nagoya-ward3-01\ndata: data\nroot: root\nlabels: {{ site: nagoya }}\ninventory:\n  dpkg: {{}}\noperator: {{ address: \"{address}\" }}\ninventoryIntervalSeconds: 1\n"
        ),
    )
    .expect("config");

    // Enrolment: a wrong token and a wrong CA are refused with reasons.
    let fp = ca.fingerprint();
    let wrong_token = agent(
        dir,
        &[
            "enrol",
            "--config",
            "agent.yaml",
            "--token",
            "guess",
            "--ca-fingerprint",
            &fp,
        ],
    );
    assert_eq!(wrong_token.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&wrong_token.stderr),
        "tenet-agent: enrolment refused by the operator: the bootstrap token is not valid\n"
    );
    let other_ca = format!("sha256:{}", "ab".repeat(32));
    let wrong_ca = agent(
        dir,
        &[
            "enrol",
            "--config",
            "agent.yaml",
            "--token",
            "token",
            "--ca-fingerprint",
            &other_ca,
        ],
    );
    assert_eq!(wrong_ca.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong_ca.stderr);
    assert!(
        err.contains("the gateway's CA is not the pinned one"),
        "{err}"
    );
    let ok = agent(
        dir,
        &[
            "enrol",
            "--config",
            "agent.yaml",
            "--token",
            "token",
            "--ca-fingerprint",
            &fp,
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout)
            .starts_with("enrolled as nagoya-ward3-01; pinned dispatch key")
    );
    wait_for(events, Duration::from_secs(5), |e| {
        matches!(e, Event::Enrolled(_)).then_some(())
    });
    let data = dir.join("data");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("tls.key"))
        .expect("tls key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let identity = PublicKey::read_pem_file(&data.join("identity.key.pub")).expect("identity");

    // The held connection and the first inventory.
    let _agent = Running(
        Command::new(binary("tenet-agent"))
            .args(["run", "--config", "agent.yaml"])
            .current_dir(dir)
            .spawn()
            .expect("agent"),
    );
    wait_for(events, Duration::from_secs(10), |e| {
        matches!(e, Event::Connected(_)).then_some(())
    });
    let v = wait_for(events, Duration::from_secs(10), |e| match e {
        Event::Inventory(b) => Some(browser_version(b)),
        _ => None,
    });
    assert_eq!(v.as_deref(), Some("118.0.2-1"));

    // Push a dispatch that installs 120 through dpkg.
    let caps = vec![Capability::RunArtifact, Capability::Log];
    let bundle = install_bundle(admin, &new);
    let envelope = |sequence: u64| {
        let mut e = DispatchEnvelope {
            terminal: "nagoya-ward3-01".into(),
            policy: "hospital-it/browser-a-minimum".into(),
            policy_generation: 1,
            payload_digest: bundle.body_digest(),
            nonce: random_bytes().expect("rng"),
            issued_at_ms: now_ms(),
            deadline_ms: now_ms() + 60_000,
            sequence,
            args: vec!["browser-a_120.0-1_all.deb".into()],
            capabilities: caps.clone(),
            write_paths: vec![],
            approval: Vec::new(),
        };
        tenet_test_support::approve(&mut e, &[admin]);
        e
    };
    let env = envelope(1);
    let env_frame = SignedMessage::signed(&env, operator.as_ref()).expect("sign");
    assert!(fleet.send(
        "nagoya-ward3-01",
        ToAgent::Dispatch {
            envelope: env_frame.encode(),
            bundle: bundle.encode().into()
        }
    ));
    let report = wait_for(events, Duration::from_secs(30), |e| match e {
        Event::Report(b) => Some(b.clone()),
        _ => None,
    });
    let record = DispatchRecord {
        terminal: env.terminal.clone(),
        envelope_digest: env_frame.body_digest(),
        nonce_commitment: nonce_commitment(&env.nonce),
        payload_digest: env.payload_digest,
        deadline_ms: env.deadline_ms,
        consumed: false,
    };
    let verified =
        verify_report(&report, &identity, &record, now_ms()).expect("the report verifies");
    assert_eq!(verified.outcome, Outcome::Exited { code: 0 });
    // The next inventory shows 120, and the acknowledged report left the outbox.
    wait_for(events, Duration::from_secs(10), |e| match e {
        Event::Inventory(b) if browser_version(b).as_deref() == Some("120.0-1") => Some(()),
        _ => None,
    });
    wait_until(
        Duration::from_secs(10),
        "the acknowledged report leaves the outbox",
        || outbox_len(&data) == 0,
    );

    // The operator goes away; a report is queued meanwhile (a dispatch run
    // from files); when the operator comes back the agent reconnects and
    // delivers it.
    gateway.stop();
    let env2 = envelope(2);
    let env2_frame = SignedMessage::signed(&env2, operator.as_ref()).expect("sign");
    std::fs::write(dir.join("envelope"), env2_frame.encode()).expect("write");
    std::fs::write(dir.join("bundle"), bundle.encode()).expect("write");
    let offline = agent(
        dir,
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
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    assert_eq!(outbox_len(&data), 1);
    let _gateway2 = TestGateway::start(
        &address.to_string(),
        ca.clone(),
        trust.clone(),
        operator.clone(),
        fleet.clone(),
    );
    let delivered = wait_for(events, Duration::from_secs(60), |e| match e {
        Event::Report(b) => Some(b.clone()),
        _ => None,
    });
    let record2 = DispatchRecord {
        envelope_digest: env2_frame.body_digest(),
        nonce_commitment: nonce_commitment(&env2.nonce),
        deadline_ms: env2.deadline_ms,
        ..record
    };
    verify_report(&delivered, &identity, &record2, now_ms()).expect("the queued report verifies");
    wait_until(
        Duration::from_secs(10),
        "the delivered report leaves the outbox",
        || outbox_len(&data) == 0,
    );
}

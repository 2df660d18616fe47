//! Trust rotation with real processes: a real agent refuses a rotation the
//! operator (or whoever holds the dispatch key) signed without the admins,
//! and pins one the admins signed, after which only the new keys count;
//! and the admins' whole workflow through the `tenet trust` commands, the
//! running `tenet operator` taking the rotation and sending it over the
//! connection the agent holds, and a package installed under the new admin
//! and dispatch keys.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tenet_e2e::{
    Event, Fixture, binary, build_deb, dpkg_root, free_port, install_bundle, nagoya_agent,
    next_line, sign_policies, start_operator, wait_for, wait_until, write_browser_policy,
};
use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::report::{ExecutionReport, Outcome};
use tenet_protocol::rotation::TrustRotation;
use tenet_protocol::session::ToAgent;
use tenet_protocol::wire::decode;
use tenet_protocol::{Algorithm, KeyPair, Kind, SignedMessage, Signer};

const NOOP: &str =
    r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;

/// The version of the trust anchors the agent in `data` pinned.
fn pinned(data: &Path) -> Option<TrustAnchors> {
    decode(&std::fs::read(data.join("trust-anchors")).ok()?).ok()
}

fn rotation(to: &TrustAnchors, signers: &[&KeyPair]) -> serde_bytes::ByteBuf {
    let mut frame = SignedMessage::new(&TrustRotation {
        anchors: to.clone(),
        created_at_ms: 0,
    });
    for s in signers {
        frame.sign(*s).expect("sign");
    }
    serde_bytes::ByteBuf::from(frame.encode())
}

fn next_outcome(f: &Fixture) -> Outcome {
    let bytes = wait_for(&f.events, Duration::from_secs(30), |e| match e {
        Event::Report(b) => Some(b.clone()),
        _ => None,
    });
    let report: ExecutionReport = SignedMessage::decode(&bytes, Kind::ExecutionReport)
        .and_then(|f| f.open())
        .expect("report");
    report.outcome
}

#[test]
fn the_dispatch_key_cannot_rotate_trust_and_the_admins_can() {
    let f = Fixture::new();
    let address = format!("127.0.0.1:{}", free_port());
    let _gateway = f.gateway(&address, Duration::from_secs(3600));
    f.enrol(&address);
    let _agent = f.run_agent_logged();
    f.connected();
    let data = f.dir().join("data");
    assert_eq!(pinned(&data).expect("pinned").version, 1);

    // A compromised operator names its own key as the only admin and the
    // dispatch key, signed by the real dispatch key and by itself.
    let evil = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let forged = TrustAnchors {
        version: 2,
        admin_keys: vec![evil.public_key()],
        admin_threshold: 1,
        dispatch_key: evil.public_key(),
        issuer_key: evil.public_key(),
    };
    assert!(f.fleet.send(
        "t1",
        ToAgent::TrustRotations {
            rotations: vec![rotation(&forged, &[f.operator.as_ref(), &evil])],
        }
    ));
    // Then a payload it approved and dispatched itself: refused.
    assert!(
        f.fleet
            .send("t1", f.dispatch_signed("ns/p", NOOP, 1, &evil, &evil))
    );
    match next_outcome(&f) {
        Outcome::Refused { reason, message } => {
            assert_eq!(reason, "UnknownKey", "{message}");
            assert_eq!(
                message,
                format!(
                    "signed by key {}, which is not trusted here",
                    evil.public_key().fingerprint()
                )
            );
        }
        other => panic!("the forged dispatch ran: {other:?}"),
    }
    assert_eq!(pinned(&data).expect("pinned").version, 1);
    let log = std::fs::read_to_string(f.dir().join("agent.log")).expect("log");
    assert!(
        log.contains("trust rotation refused")
            && log.contains(
                "the rotation to version 2 is not signed by 1 of the 1 admin key(s) of version 1"
            ),
        "{log}"
    );

    // The admin rotates to a new admin and a new dispatch key, signed by
    // the admin in force and by the new one.
    let admin2 = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let dispatch2 = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let v2 = TrustAnchors {
        version: 2,
        admin_keys: vec![admin2.public_key()],
        admin_threshold: 1,
        dispatch_key: dispatch2.public_key(),
        issuer_key: dispatch2.public_key(),
    };
    assert!(f.fleet.send(
        "t1",
        ToAgent::TrustRotations {
            rotations: vec![rotation(&v2, &[&f.admin, &admin2])],
        }
    ));
    // Under the new keys a payload runs...
    assert!(f.fleet.send(
        "t1",
        f.dispatch_signed("ns/p", NOOP, 2, &admin2, &dispatch2)
    ));
    assert_eq!(next_outcome(&f), Outcome::Exited { code: 0 });
    assert_eq!(pinned(&data).expect("pinned"), v2);
    // ...and under the old ones it no longer does.
    assert!(f.fleet.send(
        "t1",
        f.dispatch_signed("ns/p", NOOP, 3, &f.admin, &dispatch2)
    ));
    match next_outcome(&f) {
        Outcome::Refused { reason, .. } => assert_eq!(reason, "NotApproved"),
        other => panic!("an approval by the rotated-out admin counted: {other:?}"),
    }
}

fn installed(root: &Path) -> Option<String> {
    let out = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Version}", "browser-a"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn admins_rotate_the_keys_with_the_tenet_trust_commands() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "dpkg-deb is required under CI"
        );
        eprintln!("skipping: dpkg-deb is not installed");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let tenet = |args: &[&str]| {
        Command::new(binary("tenet"))
            .args(args)
            .current_dir(dir)
            .output()
            .expect("tenet")
    };
    let ok = |args: &[&str]| {
        let out = tenet(args);
        assert!(
            out.status.success(),
            "tenet {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["keygen", "--out", "admin.key"]);
    let admin = KeyPair::read_file(&dir.join("admin.key")).expect("admin");
    let old = build_deb(dir, "browser-a", "118.0.2-1");
    let v120 = build_deb(dir, "browser-a", "120.0-1");
    let v121 = build_deb(dir, "browser-a", "121.0-1");
    std::fs::create_dir_all(dir.join("bundles")).expect("mkdir");
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    let bundle = install_bundle(&admin, &v120);
    std::fs::write(
        dir.join("bundles/install-browser-a.bundle"),
        bundle.encode(),
    )
    .expect("bundle");
    write_browser_policy(dir, "120.0", &bundle, "browser-a_120.0-1_all.deb");
    sign_policies(&dir.join("policies"), &dir.join("admin.key"));

    // Version 1: the operator's flags. A terminal enrols and converges.
    let port = free_port();
    let (operator, lines) = start_operator(dir, port);
    next_line(&lines, "trust anchors version 1: 1 of 1 admin key(s)");
    next_line(&lines, "gateway listening on");
    let root = dpkg_root(dir, &[&old]);
    let _agent = nagoya_agent(dir, port);
    wait_until(
        Duration::from_secs(60),
        "browser-a 120 under version 1",
        || installed(&root).as_deref() == Some("120.0-1"),
    );

    // The rotation: a new admin replaces the old one, and a new dispatch
    // key, made in the data directory.
    ok(&["keygen", "--out", "admin2.key"]);
    ok(&["keygen", "--out", "data/dispatch-2.key"]);
    let admin2 = KeyPair::read_file(&dir.join("admin2.key")).expect("admin2");
    let written = ok(&[
        "trust",
        "rotate",
        "--data",
        "data",
        "--admin-key",
        "admin.key.pub",
        "--new-admin-key",
        "admin2.key.pub",
        "--new-admin-threshold",
        "1",
        "--new-dispatch-key",
        "data/dispatch-2.key.pub",
        "--out",
        "rotation",
    ]);
    assert!(
        written
            .contains("it needs signatures by 1 of the admin keys of version 1 and 1 of its own"),
        "{written}"
    );
    // Signed by the new admin alone: not enough.
    ok(&["trust", "sign", "rotation", "--key", "admin2.key"]);
    let install = [
        "trust",
        "install",
        "rotation",
        "--data",
        "data",
        "--admin-key",
        "admin.key.pub",
    ];
    let refused = tenet(&install);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        format!(
            "tenet: rotation: not approved by the admins: the rotation to version 2 is not signed by 1 of the 1 admin key(s) of version 1: signed by key {}, which is not trusted here\n",
            admin2.public_key().fingerprint()
        )
    );
    assert!(!dir.join("data/trust-2.rotation").exists());
    // The admin in force signs too; it installs, and the operator restarts.
    ok(&["trust", "sign", "rotation", "--key", "admin.key"]);
    let installed_out = ok(&install);
    assert!(
        installed_out.contains("installed data/trust-2.rotation"),
        "{installed_out}"
    );
    // Version 1 was recorded at the operator's first start: show needs
    // no flags.
    let shown = ok(&["trust", "show", "--data", "data"]);
    assert!(
        shown.starts_with("in force: version 2: 1 of 1 admin key(s)"),
        "{shown}"
    );
    // The running operator takes it: version 2 is in force, and the agent
    // pins it over the connection it holds (no reconnection).
    let dispatch2 = KeyPair::read_file(&dir.join("data/dispatch-2.key")).expect("dispatch 2");
    let version_2 = format!(
        "trust anchors version 2: 1 of 1 admin key(s), dispatch key {}",
        dispatch2.public_key().fingerprint()
    );
    next_line(&lines, &version_2);
    wait_until(
        Duration::from_secs(60),
        "the agent to pin version 2",
        || pinned(&dir.join("agent-data")).is_some_and(|t| t.version == 2),
    );
    let anchors = pinned(&dir.join("agent-data")).expect("pinned");
    assert_eq!(anchors.admin_keys, vec![admin2.public_key()]);
    assert_eq!(anchors.dispatch_key, dispatch2.public_key());
    // Logged once pinned (the file may lag the pin by a moment).
    let agent_log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    wait_until(
        Duration::from_secs(10),
        "the agent to log the rotation",
        || agent_log().contains("trust rotated"),
    );
    let agent_log = agent_log();
    assert!(
        !agent_log.contains("connection lost") && !agent_log.contains("closed the connection"),
        "{agent_log}"
    );

    // The new admin alone now signs a bundle and approves a policy, and
    // the operator dispatches it with the new dispatch key: it installs.
    let bundle = install_bundle(&admin2, &v121);
    std::fs::write(
        dir.join("bundles/install-browser-a.bundle"),
        bundle.encode(),
    )
    .expect("bundle");
    write_browser_policy(dir, "121.0", &bundle, "browser-a_121.0-1_all.deb");
    sign_policies(&dir.join("policies"), &dir.join("admin2.key"));
    wait_until(
        Duration::from_secs(60),
        "browser-a 121 under version 2",
        || installed(&root).as_deref() == Some("121.0-1"),
    );

    // Restarted, the operator walks the chain again. Swapping the admin
    // key in its flags instead of rotating is refused.
    drop(operator);
    let swapped = Command::new(binary("tenet"))
        .args(["operator", "--policies", "policies", "--data", "data"])
        .args(["--admin-key", "admin2.key.pub", "--metrics", "127.0.0.1:0"])
        .current_dir(dir)
        .output()
        .expect("operator");
    assert_eq!(swapped.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&swapped.stderr)
            .contains("are not version 1 of the trust anchors recorded in data/trust-1.anchors"),
        "{}",
        String::from_utf8_lossy(&swapped.stderr)
    );
    let (_operator, lines) = start_operator(dir, port);
    next_line(&lines, &version_2);
}

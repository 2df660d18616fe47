//! The whole execution path with real parts: real .deb files built with
//! dpkg-deb, a terminal root with browser-a 118 installed by dpkg, the real
//! agent binary starting a real loader process, the install payload running
//! in wasmtime and installing browser-a 120 from its bundled artifact
//! through real dpkg, a report that verifies, and an inventory that shows 120.

mod common;

use common::*;
use tenet_protocol::bundle::Capability;
use tenet_protocol::report::Outcome;
use tenet_test_support::build_deb;

#[test]
fn install_payload_upgrades_browser_a_through_dpkg() {
    if !have_dpkg() {
        return;
    }
    let t = Terminal::new("nagoya-ward3-01");
    let old = build_deb(t.dir.path(), "browser-a", "118.0.2-1");
    let new = build_deb(t.dir.path(), "browser-a", "120.0-1");
    t.preinstall(&old);
    assert_eq!(t.installed("browser-a").as_deref(), Some("118.0.2-1"));

    let inv = t.agent(&["inventory", "--config", "agent.yaml"]);
    let inv = String::from_utf8_lossy(&inv.stdout);
    assert!(
        inv.contains("name: browser-a\n  version: 118.0.2-1"),
        "{inv}"
    );

    let caps = [Capability::RunArtifact, Capability::Log];
    let (bundle, digest) = t.bundle(
        "install-deb.wat",
        &[
            (
                "install-deb.sh",
                std::fs::read(payloads().join("install-deb.sh")).expect("script"),
            ),
            (
                "browser-a_120.0-1_all.deb",
                std::fs::read(&new).expect("deb"),
            ),
        ],
        &caps,
    );
    let env = t.envelope(digest, 1, &["browser-a_120.0-1_all.deb"], &caps);
    let env_bytes = t.sign(&env);
    let (_, report) = t.dispatch(&env_bytes, &bundle);

    let verified = t
        .verify(&report, &env, &env_bytes)
        .expect("the report verifies");
    assert_eq!(
        verified.outcome,
        Outcome::Exited { code: 0 },
        "{}",
        String::from_utf8_lossy(&verified.output_tail)
    );
    assert_eq!(verified.nonce, env.nonce, "the report carries the evidence");
    let tail = String::from_utf8_lossy(&verified.output_tail);
    assert!(tail.contains("installing the bundled package"), "{tail}");
    assert!(tail.contains("Setting up browser-a (120.0-1)"), "{tail}");
    let observed = verified.observed.expect("the inventory after the run");
    let browser = observed
        .packages
        .iter()
        .find(|p| p.name == "browser-a")
        .expect("browser-a");
    assert_eq!(browser.version, "120.0-1");
    assert_eq!(t.installed("browser-a").as_deref(), Some("120.0-1"));

    // The report waits in the outbox until the operator acknowledges it.
    let outbox: Vec<_> = std::fs::read_dir(t.data.join("outbox"))
        .expect("outbox")
        .collect();
    assert_eq!(outbox.len(), 1);
    // The loader's private directory is gone.
    assert_eq!(
        std::fs::read_dir(t.data.join("run")).expect("run").count(),
        0
    );
}

#[test]
fn ensure_service_payload_starts_a_stopped_service() {
    if !have_dpkg() {
        return;
    }
    let t = Terminal::new("nagoya-reception-02");
    std::fs::create_dir_all(t.root.join("var/lib/tenet/services")).expect("mkdir");
    std::fs::write(
        t.root.join("var/lib/tenet/services/clamav-daemon"),
        "stopped\n",
    )
    .expect("state");
    let caps = [Capability::RunArtifact, Capability::Log];
    let (bundle, digest) = t.bundle(
        "ensure-service.wat",
        &[(
            "ensure-service.sh",
            std::fs::read(payloads().join("ensure-service.sh")).expect("script"),
        )],
        &caps,
    );
    let env = t.envelope(digest, 1, &["clamav-daemon"], &caps);
    let env_bytes = t.sign(&env);
    let (_, report) = t.dispatch(&env_bytes, &bundle);
    let verified = t.verify(&report, &env, &env_bytes).expect("verifies");
    assert_eq!(verified.outcome, Outcome::Exited { code: 0 });
    let observed = verified.observed.expect("inventory");
    let svc = observed
        .services
        .iter()
        .find(|s| s.name == "clamav-daemon")
        .expect("service");
    assert_eq!(svc.state, tenet_protocol::inventory::ServiceState::Running);
    assert!(svc.enabled);
}

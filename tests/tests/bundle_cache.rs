//! Bundles travel by digest and are sent once: a real agent keeps them in
//! its data directory (`DATA/bundles`) and asks only for what it lacks.
//!
//! Two policies remediated by the same bundle converge with the bundle
//! sent once. A later drift is remediated from the agent's cache, with
//! nothing sent. A cached bundle corrupted on disk is noticed when it is
//! read, dropped, and asked for again.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tenet_e2e::{
    build_deb, dpkg_query, free_port, install_bundle_of, nagoya_agent, next_line, sign_policies,
    start_operator, wait_until,
};
use tenet_protocol::wire::digest_string;
use tenet_protocol::{Algorithm, KeyPair, SignedMessage};

fn policy(dir: &Path, package: &str, version: &str, bundle: &SignedMessage) {
    std::fs::write(
        dir.join(format!("policies/{package}.yaml")),
        format!(
            "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: {package}\n  namespace: hospital-it\nspec:\n  selector: {{ matchLabels: {{ site: nagoya }} }}\n  requirements:\n    - package: {{ name: {package}, version: '>= {version}' }}\n  remediation:\n    payload: {{ name: install-both, digest: '{}' }}\n    args: [{package}_{version}-1_all.deb]\n    capabilities: [run-artifact, log]\n",
            digest_string(&bundle.body_digest())
        ),
    )
    .expect("policy");
}

fn purge(root: &Path, package: &str) {
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--log=/dev/null", "--purge", package])
        .output()
        .expect("dpkg");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_bundle_is_sent_once_then_taken_from_the_agents_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for d in ["policies", "bundles"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    let browser = build_deb(dir, "browser-a", "120.0-1");
    let viewer = build_deb(dir, "viewer-b", "2.0-1");
    let bundle = install_bundle_of(&admin, &[&browser, &viewer], "install-both");
    std::fs::write(dir.join("bundles/install-both.bundle"), bundle.encode()).expect("bundle");
    policy(dir, "browser-a", "120.0", &bundle);
    policy(dir, "viewer-b", "2.0", &bundle);
    sign_policies(&dir.join("policies"), &dir.join("admin.key"));
    let port = free_port();
    let (_operator, lines) = start_operator(dir, port);
    next_line(&lines, "gateway listening on");
    let root = tenet_e2e::dpkg_root(dir, &[]);
    let _agent = nagoya_agent(dir, port);
    let installed =
        |package: &str| dpkg_query(&root, "${Status}", package) == "install ok installed";
    wait_until(Duration::from_secs(60), "both packages installed", || {
        installed("browser-a") && installed("viewer-b")
    });
    let sent = || {
        std::fs::read_to_string(dir.join("operator.log"))
            .unwrap_or_default()
            .matches("bundle sent")
            .count()
    };
    let agent_log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert_eq!(sent(), 1, "one bundle, sent once for two policies");
    let cached = dir.join(format!(
        "agent-data/bundles/{}.bundle",
        hex::encode(bundle.body_digest())
    ));
    // The file: the SHA-256 of the frame, then the frame.
    let frame = |path: &Path| std::fs::read(path).expect("kept")[32..].to_vec();
    assert!(frame(&cached) == bundle.encode(), "kept by digest");

    // A drift: remediated with the bundle the agent holds.
    purge(&root, "browser-a");
    wait_until(Duration::from_secs(60), "browser-a back", || {
        installed("browser-a")
    });
    assert!(agent_log().contains("bundle from the cache"));
    assert_eq!(sent(), 1, "nothing sent again");

    // A cached bundle corrupted on disk: dropped when read, asked for again.
    let mut bytes = std::fs::read(&cached).expect("kept");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&cached, &bytes).expect("corrupt");
    purge(&root, "viewer-b");
    wait_until(Duration::from_secs(60), "viewer-b back", || {
        installed("viewer-b")
    });
    assert!(agent_log().contains("a cached bundle does not match its digest; removed"));
    assert_eq!(sent(), 2, "asked for again once");
    assert!(frame(&cached) == bundle.encode(), "kept again");
}

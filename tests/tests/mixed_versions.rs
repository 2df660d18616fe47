//! Releases side by side, as a fleet is upgraded: the previous release
//! (v0.1.0, built from its tag by `scripts/old-release`) and HEAD.
//!
//! One fleet lives through an upgrade. First the operator is of the
//! previous release, with one agent of that release and one of HEAD (an
//! agent upgraded before its operator); both install a package. Then the
//! operator is replaced by HEAD over the same data directory: it migrates
//! the `tenet.redb` the old one wrote (copying it aside first), both
//! agents reconnect, and a new version of the policy converges on both.
//! HEAD's status names each terminal's agent version, and only the HEAD
//! agent is welcomed (an old agent cannot read `Welcome`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tenet_e2e::{
    Running, binary, build_deb, dpkg_query, dpkg_root, free_port, install_bundle, next_line,
    old_release, start_operator_of, wait_until, write_browser_policy,
};
use tenet_protocol::SignedMessage;

fn run(bin: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The policy, and its bundle in `bundles/`.
fn write_policy(dir: &Path, version: &str, bundle: &SignedMessage, deb: &str) {
    write_browser_policy(dir, version, bundle, deb);
    std::fs::write(
        dir.join("bundles/install-browser-a.bundle"),
        bundle.encode(),
    )
    .expect("bundle");
}

/// A terminal `name` of the Nagoya site in `dir/name` (its dpkg root with
/// browser-a 118, its data, its log), enrolled with a token made by
/// `tenet` and running the agent `agent`.
fn terminal(
    dir: &Path,
    name: &str,
    tenet: &Path,
    agent: &Path,
    port: u16,
    old: &Path,
) -> (PathBuf, Running) {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).expect("mkdir");
    let root = dpkg_root(&home, &[old]);
    let out = run(
        tenet,
        dir,
        &[
            "token",
            "create",
            "--data",
            "data",
            "--terminal",
            name,
            "--label",
            "site=nagoya",
        ],
    );
    let field = |f: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(f))
            .expect("token output")
            .trim()
            .to_string()
    };
    let (token, fingerprint) = (field("token "), field("ca-fingerprint "));
    std::fs::write(
        home.join("agent.yaml"),
        format!(
            "terminal: {name}\ndata: data\nroot: root\ninventory:\n  dpkg: {{}}\noperator: {{ address: \"127.0.0.1:{port}\" }}\ninventoryIntervalSeconds: 1\n"
        ),
    )
    .expect("config");
    wait_until(Duration::from_secs(30), "the token to be imported", || {
        Command::new(agent)
            .args(["enrol", "--config", "agent.yaml", "--token", &token])
            .args(["--ca-fingerprint", &fingerprint])
            .current_dir(&home)
            .output()
            .expect("enrol")
            .status
            .success()
    });
    let running = Running(
        Command::new(agent)
            .args(["run", "--config", "agent.yaml"])
            .current_dir(&home)
            .stderr(std::fs::File::create(home.join("agent.log")).expect("log"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("agent"),
    );
    (root, running)
}

fn installed(root: &Path) -> String {
    dpkg_query(root, "${Version}", "browser-a")
}

fn sign(tenet: &Path, dir: &Path) {
    run(
        tenet,
        dir,
        &[
            "policy",
            "sign",
            "policies/browser.yaml",
            "--key",
            "admin.key",
        ],
    );
}

#[test]
fn a_fleet_lives_through_an_upgrade_of_its_operator_and_its_database() {
    let previous = old_release("v0.1.0");
    let (old_tenet, old_agent) = (previous.join("tenet"), previous.join("tenet-agent"));
    assert!(run(&old_agent, Path::new("."), &["--version"]).contains("0.1.0"));
    let (tenet, agent) = (binary("tenet"), binary("tenet-agent"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for d in ["policies", "bundles"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    run(&old_tenet, dir, &["keygen", "--out", "admin.key"]);
    let admin = tenet_protocol::KeyPair::read_file(&dir.join("admin.key")).expect("admin");
    let v118 = build_deb(dir, "browser-a", "118.0.2-1");
    let v120 = build_deb(dir, "browser-a", "120.0-1");
    let v121 = build_deb(dir, "browser-a", "121.0-1");
    write_policy(
        dir,
        "120.0",
        &install_bundle(&admin, &v120),
        "browser-a_120.0-1_all.deb",
    );
    sign(&old_tenet, dir);

    // The previous release's operator, with an agent of each release.
    let port = free_port();
    let (old_operator, lines) = start_operator_of(&old_tenet, dir, port);
    next_line(&lines, "gateway listening on");
    let (old_root, _old_agent) = terminal(dir, "ward-old", &old_tenet, &old_agent, port, &v118);
    let (new_root, _new_agent) = terminal(dir, "ward-new", &old_tenet, &agent, port, &v118);
    for root in [&old_root, &new_root] {
        wait_until(
            Duration::from_secs(90),
            "browser-a 120 under the old operator",
            || installed(root) == "120.0-1",
        );
    }
    let new_log = || std::fs::read_to_string(dir.join("ward-new/agent.log")).unwrap_or_default();
    assert!(
        !new_log().contains("welcomed"),
        "an operator of 0.1 sends no Welcome"
    );
    drop(old_operator);
    drop(lines);
    assert!(!dir.join("data/tenet.redb.format-1").exists());

    // HEAD's operator over the same data: the database is migrated, both
    // agents come back, and the next version converges on both.
    let (_operator, lines) = start_operator_of(&tenet, dir, port);
    next_line(&lines, "gateway listening on");
    assert!(
        dir.join("data/tenet.redb.format-1").exists(),
        "the old database is copied aside before its migration"
    );
    wait_until(
        Duration::from_secs(60),
        "the HEAD agent to be welcomed",
        || new_log().contains("the operator welcomed this agent"),
    );
    write_policy(
        dir,
        "121.0",
        &install_bundle(&admin, &v121),
        "browser-a_121.0-1_all.deb",
    );
    sign(&tenet, dir);
    for root in [&old_root, &new_root] {
        wait_until(
            Duration::from_secs(90),
            "browser-a 121 under the HEAD operator",
            || installed(root) == "121.0-1",
        );
    }
    let shown = |name: &str| run(&tenet, dir, &["status", "--data", "data", "terminal", name]);
    wait_until(
        Duration::from_secs(30),
        "status to show both agents' versions",
        || {
            shown("ward-old").contains("agent 0.1.0")
                && shown("ward-new").contains(&format!("agent {}", env!("CARGO_PKG_VERSION")))
        },
    );
    let status = shown("ward-old");
    assert!(status.contains("Compliant"), "{status}");
}

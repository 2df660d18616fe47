//! The agent as a Debian package (`scripts/agent-deb`): lintian finds
//! nothing to warn of; dpkg installs it with the libraries it depends on
//! into a debootstrapped bookworm root; the service waits for enrolment;
//! the packaged binary, run in that root, enrols with a real operator over
//! loopback and connects; a purge takes the terminal's keys with it and
//! leaves dpkg consistent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tenet_e2e::{
    Running, audit, binary, create_token, dpkg_query, free_port, next_line, start_operator,
    wait_until,
};
use tenet_protocol::{Algorithm, KeyPair};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// `dpkg --root=ROOT ARGS`: it runs the maintainer scripts in the root.
fn dpkg(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("dpkg")
        .env("LC_ALL", "C")
        .arg(format!("--root={}", root.display()))
        .arg("--log=/dev/null")
        .args(args)
        .output()
        .expect("dpkg")
}

/// The packaged agent, run inside `root`.
fn chrooted(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("chroot");
    c.arg(root).arg("/usr/bin/tenet-agent").args(args);
    c
}

#[test]
fn the_agent_package_installs_waits_for_enrolment_runs_and_purges() {
    let Some(cache) = tenet_e2e::debian_cache() else {
        return;
    };
    if !tenet_test_support::have("lintian") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();

    // Built from the binary the tests run.
    let built = Command::new(workspace().join("scripts/agent-deb"))
        .arg("--binary")
        .arg(binary("tenet-agent"))
        .arg("--out")
        .arg(dir)
        .output()
        .expect("scripts/agent-deb");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
    assert!(deb.exists(), "{}", deb.display());

    // Lintian: no error, no warning.
    let lintian = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--no-tag-display-limit"])
        .arg(&deb)
        .output()
        .expect("lintian");
    assert!(
        lintian.status.success(),
        "{}{}",
        String::from_utf8_lossy(&lintian.stdout),
        String::from_utf8_lossy(&lintian.stderr)
    );

    // Installed, with the TPM libraries it depends on, in a real root.
    let root = dir.join("root");
    tenet_e2e::copy_root(&cache.join("bookworm"), &root);
    let alone = dpkg(&root, &["-i", deb.to_str().expect("path")]);
    assert!(
        !alone.status.success(),
        "its dependencies are not there yet"
    );
    assert!(
        String::from_utf8_lossy(&alone.stderr)
            .contains("tenet-agent depends on libtss2-esys-3.0.2-0"),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
    let mut all: Vec<String> = tenet_e2e::debs_in(&cache.join("agent-deps"))
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    all.push(deb.display().to_string());
    let mut args = vec!["-i"];
    args.extend(all.iter().map(String::as_str));
    let installed = dpkg(&root, &args);
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    assert_eq!(
        dpkg_query(&root, "${db:Status-Abbrev} ${Version}", "tenet-agent"),
        format!("ii  {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(audit(&root), "");
    use std::os::unix::fs::PermissionsExt;
    let state = root.join("var/lib/tenet-agent");
    assert_eq!(
        std::fs::metadata(&state)
            .expect("state")
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    // The service starts only once enrolment pinned the trust anchors.
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/tenet-agent.service")).expect("unit");
    assert!(
        unit.contains("ConditionPathExists=|/var/lib/tenet-agent/trust-anchors"),
        "{unit}"
    );
    assert!(!state.join("trust-anchors").exists());

    // Enrolled with a real operator, over loopback, by the packaged binary
    // in the root (its libraries are the root's).
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    let port = free_port();
    let (_operator, lines) = start_operator(dir, port);
    next_line(&lines, "gateway listening on");
    let (token, fingerprint) = create_token(dir, &["--terminal", "ward-pc-07"]);
    let config = root.join("etc/tenet-agent/agent.yaml");
    let shipped = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        shipped
            .replace("terminal: CHANGE-ME", "terminal: ward-pc-07")
            .replace("tenet.example:7443", &format!("127.0.0.1:{port}")),
    )
    .expect("config");
    let config_arg = "/etc/tenet-agent/agent.yaml";
    wait_until(
        Duration::from_secs(30),
        "the packaged agent to enrol",
        || {
            chrooted(
                &root,
                &[
                    "enrol",
                    "--config",
                    config_arg,
                    "--token",
                    &token,
                    "--ca-fingerprint",
                    &fingerprint,
                ],
            )
            .output()
            .is_ok_and(|o| o.status.success())
        },
    );
    assert!(
        state.join("trust-anchors").exists(),
        "the unit may start now"
    );
    let _running = Running(
        chrooted(&root, &["run", "--config", config_arg])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).expect("log"))
            .spawn()
            .expect("the packaged agent"),
    );
    wait_until(
        Duration::from_secs(60),
        "the packaged agent to connect",
        || {
            let out = Command::new(binary("tenet"))
                .args(["status", "--data", "data"])
                .current_dir(dir)
                .output()
                .expect("tenet status");
            String::from_utf8_lossy(&out.stdout).contains("1 terminal(s), 1 connected")
        },
    );
    drop(_running);

    // An upgrade keeps the configuration the admins edited (a conffile).
    let again = dpkg(&root, &["-i", deb.to_str().expect("path")]);
    assert!(again.status.success());
    assert!(
        std::fs::read_to_string(&config)
            .expect("config")
            .contains("terminal: ward-pc-07")
    );

    // A purge takes the terminal's identity with it.
    let purged = dpkg(&root, &["--purge", "tenet-agent"]);
    assert!(
        purged.status.success(),
        "{}",
        String::from_utf8_lossy(&purged.stderr)
    );
    assert!(!state.exists());
    assert!(!config.exists());
    assert!(!root.join("usr/bin/tenet-agent").exists());
    assert_eq!(dpkg_query(&root, "${db:Status-Abbrev}", "tenet-agent"), "");
    assert_eq!(audit(&root), "");
}

//! The operator's OCI image (`scripts/operator-image`), built without a
//! container engine: skopeo reads the layout as an image (its user, entry
//! point, labels); umoci unpacks it; the operator runs from the unpacked
//! root file system alone, as the image's unprivileged user, and an agent
//! on this machine enrols with it and connects.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tenet_e2e::{Running, binary, create_token_with, free_port, wait_until};
use tenet_protocol::{Algorithm, KeyPair};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The static `tenet` scripts/test builds for this test, or `None`
/// (skipped) outside CI.
fn static_operator() -> Option<PathBuf> {
    let path = binary("tenet")
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("x86_64-unknown-linux-gnu/debug/tenet"))?;
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "scripts/test builds the static operator under CI ({})",
        path.display()
    );
    eprintln!("skipping: no static operator at {}", path.display());
    None
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().expect("runs");
    assert!(
        out.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_operator_image_runs_from_its_own_root_file_system() {
    let Some(operator) = static_operator() else {
        return;
    };
    let root_user = run_ok(Command::new("id").arg("-u")).trim() == "0";
    if !root_user || !tenet_test_support::have("umoci") || !tenet_test_support::have("skopeo") {
        assert!(std::env::var_os("CI").is_none(), "CI runs this as root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let layout = dir.join("oci");
    let reference = run_ok(
        Command::new(workspace().join("scripts/operator-image"))
            .arg("--binary")
            .arg(&operator)
            .arg("--out")
            .arg(&layout)
            .args(["--tag", "test"]),
    );
    assert_eq!(reference.trim(), format!("oci:{}:test", layout.display()));

    // A real OCI tool reads it as an image.
    let config: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}:test", layout.display())),
    ))
    .expect("the image's configuration");
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/bin/tenet");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.title"],
        "tenet"
    );

    // Unpacked, it holds the binary and its user, nothing else to run on.
    let bundle = dir.join("bundle");
    run_ok(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:test", layout.display()))
            .arg(&bundle),
    );
    let rootfs = bundle.join("rootfs");
    assert!(rootfs.join("usr/bin/tenet").exists());
    assert!(!rootfs.join("lib").exists(), "no shared libraries in it");

    // The devices a container runtime gives every container (runc makes
    // /dev/null, /dev/random, /dev/urandom, ...): the randomness the keys
    // are made of.
    std::fs::create_dir_all(rootfs.join("dev")).expect("mkdir");
    for (name, minor) in [("null", "3"), ("random", "8"), ("urandom", "9")] {
        run_ok(
            Command::new("mknod")
                .args(["-m", "666"])
                .arg(rootfs.join("dev").join(name))
                .args(["c", "1", minor]),
        );
    }

    // The operator, from that root file system, as the image's user; its
    // data and keys in the image's volume.
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let state = rootfs.join("var/lib/tenet");
    admin
        .write_files(&state.join("admin.key"))
        .expect("admin key");
    std::fs::create_dir_all(state.join("policies")).expect("mkdir");
    run_ok(
        Command::new("chown")
            .args(["-R", "65532:65532"])
            .arg(&state),
    );
    let port = free_port();
    let log = dir.join("operator.log");
    let _operator = Running(
        Command::new("/usr/sbin/chroot")
            .arg("--userspec=65532:65532")
            .arg(&rootfs)
            .args([
                "/usr/bin/tenet",
                "operator",
                "--policies",
                "/var/lib/tenet/policies",
                "--data",
                "/var/lib/tenet/data",
                "--admin-key",
                "/var/lib/tenet/admin.key.pub",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics",
                "127.0.0.1:0",
            ])
            .env_clear()
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(dir.join("operator.err")).expect("log"))
            .spawn()
            .expect("the operator in the image"),
    );
    wait_until(Duration::from_secs(30), "the gateway to listen", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("gateway listening on"))
    });

    // An agent of this machine enrols with it and connects.
    let (token, fingerprint) = create_token_with(&state, &["--terminal", "ward-pc-09"], &[]);
    // The token was written by root: the operator's user takes it.
    run_ok(
        Command::new("chown")
            .args(["-R", "65532:65532"])
            .arg(&state),
    );
    std::fs::write(
        dir.join("agent.yaml"),
        format!(
            "terminal: ward-pc-09\ndata: agent-data\nroot: /\ninventory:\n  file: inventory.yaml\noperator: {{ address: \"127.0.0.1:{port}\" }}\ninventoryIntervalSeconds: 1\n"
        ),
    )
    .expect("config");
    std::fs::write(dir.join("inventory.yaml"), "terminal: ward-pc-09\n").expect("inventory");
    wait_until(Duration::from_secs(30), "the agent to enrol", || {
        Command::new(binary("tenet-agent"))
            .args(["enrol", "--config", "agent.yaml", "--token", &token])
            .args(["--ca-fingerprint", &fingerprint])
            .current_dir(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let _agent = Running(
        Command::new(binary("tenet-agent"))
            .args(["run", "--config", "agent.yaml"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).expect("log"))
            .spawn()
            .expect("agent"),
    );
    wait_until(Duration::from_secs(60), "the agent to connect", || {
        let out = Command::new(binary("tenet"))
            .args(["status", "--data"])
            .arg(state.join("data"))
            .output()
            .expect("tenet status");
        String::from_utf8_lossy(&out.stdout).contains("1 terminal(s), 1 connected")
    });
}

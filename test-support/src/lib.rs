//! Helpers the tests of several crates share: the agent's tests and the
//! end-to-end tests (which depend on the operator) use the same ones, so
//! they cannot drift apart. Nothing here depends on kube or the operator.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tenet_protocol::SignedMessage;
use tenet_protocol::approval::{ApprovedRemediation, PolicyApproval, PolicyStatement};
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::keys::KeyPair;

/// Have `admins` approve exactly what `envelope` asks for (its policy, its
/// payload, arguments, capabilities, write paths and time), as the
/// operator's envelopes carry it from a policy's `tenet.dev/approval`
/// annotation; approved when the envelope was issued.
pub fn approve(envelope: &mut DispatchEnvelope, admins: &[&KeyPair]) {
    approve_at(envelope, admins, envelope.issued_at_ms);
}

/// [`approve`], approved at `approved_at_ms`.
pub fn approve_at(envelope: &mut DispatchEnvelope, admins: &[&KeyPair], approved_at_ms: u64) {
    let statement = PolicyStatement {
        policy: envelope.policy.clone(),
        spec_digest: [0; 32],
        remediation: Some(ApprovedRemediation {
            payload_digest: envelope.payload_digest,
            args: envelope.args.clone(),
            capabilities: envelope.capabilities.clone(),
            write_paths: envelope.write_paths.clone(),
            timeout_ms: envelope.deadline_ms.saturating_sub(envelope.issued_at_ms),
            windows: Vec::new(),
        }),
    };
    let mut frame = SignedMessage::new(&PolicyApproval {
        statement,
        approved_at_ms,
    });
    for a in admins {
        frame.sign(*a).expect("sign the approval");
    }
    envelope.approval = frame.encode();
}

/// Whether `tool` runs (`tool --version`); under CI it must, and a missing
/// one fails the test instead of skipping it.
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required under CI (scripts/lib.sh installs it)"
        );
        eprintln!("skipping: {tool} is not installed (scripts/test installs it)");
    }
    ok
}

/// Wait until `done` holds, checking every 20 ms, at most `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real .deb of an empty package with one file, built with dpkg-deb.
pub fn build_deb(dir: &Path, name: &str, version: &str) -> PathBuf {
    build_deb_depending(dir, name, version, "")
}

/// [`build_deb`] of a package that depends on `depends` (a Debian
/// `Depends:` field; empty: none).
pub fn build_deb_depending(dir: &Path, name: &str, version: &str, depends: &str) -> PathBuf {
    let tree = dir.join(format!("{name}_{version}"));
    std::fs::create_dir_all(tree.join("DEBIAN")).expect("mkdir");
    std::fs::create_dir_all(tree.join(format!("usr/lib/{name}"))).expect("mkdir");
    let depends = if depends.is_empty() {
        String::new()
    } else {
        format!("Depends: {depends}\n")
    };
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!("Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Tenet Tests <tests@tenet.invalid>\n{depends}Description: a package for Tenet's tests\n"),
    )
    .expect("control");
    std::fs::write(
        tree.join(format!("usr/lib/{name}/VERSION")),
        format!("{name} {version}\n"),
    )
    .expect("file");
    let deb = dir.join(format!("{name}_{version}_all.deb"));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&tree)
        .arg(&deb)
        .output()
        .expect("dpkg-deb runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    deb
}

/// A software TPM (swtpm) on loopback, started by the test and stopped
/// when dropped. It is manufactured first as a real one is: RSA and ECC
/// endorsement keys, and their EK certificates written into its NV memory,
/// signed by a local CA of its own (swtpm_setup with swtpm_localca), whose
/// certificates [`Swtpm::manufacturer_ca`] names.
pub struct Swtpm {
    child: std::process::Child,
    state: tempfile::TempDir,
    pub port: u16,
}

impl Swtpm {
    /// `None` (with a message) when swtpm is not installed; under CI it must be.
    pub fn start() -> Option<Swtpm> {
        if Command::new("swtpm").arg("--version").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "swtpm is required under CI (scripts/lib.sh installs it)"
            );
            eprintln!("skipping: swtpm is not installed (scripts/test installs it)");
            return None;
        }
        let state = tempfile::tempdir().expect("tempdir");
        let dir = state.path();
        // A local CA of this TPM's own (tests run in parallel; the default
        // one under /var/lib is shared).
        std::fs::create_dir_all(dir.join("ca")).expect("mkdir");
        std::fs::create_dir_all(dir.join("tpm")).expect("mkdir");
        std::fs::write(
            dir.join("swtpm-localca.conf"),
            format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n",
                ca = dir.join("ca").display()
            ),
        )
        .expect("localca config");
        std::fs::write(
            dir.join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n",
                dir.join("swtpm-localca.conf").display()
            ),
        )
        .expect("setup config");
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--create-ek-cert", "--tpm-state"])
            .arg(dir.join("tpm"))
            .arg("--config")
            .arg(dir.join("swtpm_setup.conf"))
            .output()
            .expect("swtpm_setup runs");
        assert!(
            out.status.success(),
            "swtpm_setup: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The swtpm TCTI expects the control port right after the server port.
        let port = loop {
            let a = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
            let p = a.local_addr().expect("addr").port();
            if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.join("tpm").display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("swtpm starts");
        wait_until(Duration::from_secs(10), "swtpm listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(Swtpm { child, state, port })
    }

    /// The PEM files of the CA that signed this TPM's EK certificates (its
    /// "manufacturer"): the root and the issuing CA, for `--tpm-ca`.
    pub fn manufacturer_ca(&self) -> Vec<PathBuf> {
        let ca = self.state.path().join("ca");
        vec![
            ca.join("swtpm-localca-rootca-cert.pem"),
            ca.join("issuercert.pem"),
        ]
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

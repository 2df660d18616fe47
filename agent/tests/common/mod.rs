//! A terminal for tests: a real dpkg root, an agent data directory with
//! pinned keys, and the operator's and an admin's keys to sign dispatches
//! with. The agent runs as the real `tenet-agent` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tenet_protocol::bundle::{Artifact, Capability, Manifest, PayloadBundle};
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::keys::random_bytes;
use tenet_protocol::report::{DispatchRecord, ExecutionReport, nonce_commitment, verify_report};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Algorithm, KeyPair, Kind, PublicKey, Rejection, SignedMessage, Signer};

pub use tenet_protocol::host::now_ms;

pub fn payloads() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/payloads")
}

/// dpkg and dpkg-deb are on every Debian terminal; under CI they must be here.
pub fn have_dpkg() -> bool {
    tenet_test_support::have("dpkg-deb")
}

pub struct Terminal {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub config: PathBuf,
    pub data: PathBuf,
    pub root: PathBuf,
    pub admin: KeyPair,
    pub operator: KeyPair,
}

impl Terminal {
    pub fn new(name: &str) -> Terminal {
        Terminal::build(name, "")
    }

    /// A terminal whose agent configuration has `extra` appended.
    pub fn build(name: &str, extra: &str) -> Terminal {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        for d in [
            "var/lib/dpkg/info",
            "var/lib/dpkg/updates",
            "var/lib/dpkg/triggers",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::write(root.join("var/lib/dpkg/status"), "").expect("status");
        std::fs::write(root.join("var/lib/dpkg/available"), "").expect("available");
        let data = dir.path().join("data");
        let config = dir.path().join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "terminal: {name}\ndata: data\nroot: root\nlabels: {{ site: nagoya }}\nfacts: {{ os: {{ family: debian, distribution: debian, version: '12' }} }}\ninventory:\n  dpkg: {{ watchedFiles: [/etc/hospital/motd] }}\n{extra}"
            ),
        )
        .expect("config");
        let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let operator = KeyPair::generate(Algorithm::Ed25519).expect("key");
        std::fs::write(dir.path().join("admin.pub"), admin.public_key().to_pem()).expect("pub");
        std::fs::write(
            dir.path().join("operator.pub"),
            operator.public_key().to_pem(),
        )
        .expect("pub");
        let t = Terminal {
            dir,
            name: name.into(),
            config,
            data,
            root,
            admin,
            operator,
        };
        let out = t.pin();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    pub fn pin(&self) -> Output {
        self.agent(&[
            "pin",
            "--config",
            "agent.yaml",
            "--dispatch-key",
            "operator.pub",
            "--admin-key",
            "admin.pub",
        ])
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn agent(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tenet-agent"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("tenet-agent runs")
    }

    /// dpkg --root install, as an image would come with the package.
    pub fn preinstall(&self, deb: &Path) {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", self.root.display()))
            .args(["--log=/dev/null", "-i"])
            .arg(deb)
            .output()
            .expect("dpkg runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn installed(&self, package: &str) -> Option<String> {
        let out = Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                self.root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f=${Version}", package])
            .output()
            .expect("dpkg-query runs");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn identity(&self) -> PublicKey {
        PublicKey::read_pem_file(&self.data.join("identity.key.pub")).expect("identity")
    }

    /// A bundle signed by the admin: a module (WAT text or a file) and artifacts.
    pub fn bundle(
        &self,
        wat: &str,
        artifacts: &[(&str, Vec<u8>)],
        capabilities: &[Capability],
    ) -> (Vec<u8>, [u8; 32]) {
        let module = if wat.ends_with(".wat") {
            wat::parse_file(payloads().join(wat)).expect("payload compiles")
        } else if wat.ends_with(".wasm") {
            std::fs::read(wat).expect("a built module")
        } else {
            wat::parse_str(wat).expect("test module compiles")
        };
        let bundle = PayloadBundle {
            manifest: Manifest {
                name: "test".into(),
                version: "1".into(),
                description: String::new(),
                capabilities: capabilities.to_vec(),
                created_ms: now_ms(),
                expires_ms: now_ms() + 3_600_000,
            },
            module,
            artifacts: artifacts
                .iter()
                .map(|(name, data)| Artifact {
                    name: name.to_string(),
                    sha256: sha256(data),
                    size: data.len() as u64,
                    data: data.clone(),
                })
                .collect(),
        };
        let frame = SignedMessage::signed(&bundle, &self.admin).expect("sign");
        (frame.encode(), frame.body_digest())
    }

    pub fn envelope(
        &self,
        payload_digest: [u8; 32],
        sequence: u64,
        args: &[&str],
        capabilities: &[Capability],
    ) -> DispatchEnvelope {
        let mut envelope = DispatchEnvelope {
            terminal: self.name.clone(),
            policy: "hospital-it/browser-a-minimum".into(),
            policy_generation: 1,
            payload_digest,
            nonce: random_bytes().expect("rng"),
            issued_at_ms: now_ms(),
            deadline_ms: now_ms() + 60_000,
            sequence,
            args: args.iter().map(|a| a.to_string()).collect(),
            capabilities: capabilities.to_vec(),
            write_paths: vec![],
            approval: Vec::new(),
        };
        tenet_test_support::approve(&mut envelope, &[&self.admin]);
        envelope
    }

    pub fn sign(&self, env: &DispatchEnvelope) -> Vec<u8> {
        SignedMessage::signed(env, &self.operator)
            .expect("sign")
            .encode()
    }

    /// Hand the agent a dispatch; return its output and the signed report.
    pub fn dispatch(&self, envelope: &[u8], bundle: &[u8]) -> (Output, Vec<u8>) {
        std::fs::write(self.path("envelope"), envelope).expect("write");
        std::fs::write(self.path("bundle"), bundle).expect("write");
        let _ = std::fs::remove_file(self.path("report"));
        let out = self.agent(&[
            "dispatch",
            "--config",
            "agent.yaml",
            "--envelope",
            "envelope",
            "--bundle",
            "bundle",
            "--report",
            "report",
        ]);
        assert!(
            out.status.success(),
            "agent failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = std::fs::read(self.path("report")).expect("a report");
        (out, report)
    }

    /// Verify a report as the operator does, against the dispatch it answers.
    pub fn verify(
        &self,
        report: &[u8],
        env: &DispatchEnvelope,
        envelope_bytes: &[u8],
    ) -> Result<ExecutionReport, Rejection> {
        let digest = SignedMessage::decode(envelope_bytes, Kind::DispatchEnvelope)
            .expect("frame")
            .body_digest();
        let record = DispatchRecord {
            terminal: env.terminal.clone(),
            envelope_digest: digest,
            nonce_commitment: nonce_commitment(&env.nonce),
            payload_digest: env.payload_digest,
            deadline_ms: env.deadline_ms,
            consumed: false,
        };
        verify_report(report, &self.identity(), &record, now_ms())
    }

    /// The report's contents, checking only its signature (for refusals,
    /// which name no nonce).
    pub fn open(&self, report: &[u8]) -> ExecutionReport {
        let f = SignedMessage::decode(report, Kind::ExecutionReport).expect("frame");
        f.verify_by(&self.identity())
            .expect("signed by the terminal");
        f.open().expect("report")
    }
}

//! A real Kubernetes control plane for the tests: etcd and kube-apiserver
//! (built from the Go module proxy by `scripts/k8s-binaries`) on loopback,
//! with token authentication and RBAC on, torn down on drop. There is no
//! controller-manager: namespace deletion never finishes and owner
//! references are not garbage-collected, so tests must not wait on either.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// Where `scripts/k8s-binaries` put the binaries, if it ran: the directory
/// it prints (it builds them on the first run and skips after).
pub fn binaries() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/k8s-binaries"))
        .env("TENET_K8S_ONLY_IF_BUILT", "1")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last()?.trim());
    (out.status.success() && dir.join("kube-apiserver").exists()).then_some(dir)
}

/// The control plane, or why not: skipped with a message when the binaries
/// are not built, but under `CI=true` they must be.
pub fn control_plane_or_skip() -> Option<ControlPlane> {
    match binaries() {
        Some(dir) => Some(ControlPlane::start(&dir)),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "under CI the Kubernetes binaries must be built (scripts/k8s-binaries)"
            );
            eprintln!("skipping: no Kubernetes binaries; run scripts/k8s-binaries (needs Go)");
            None
        }
    }
}

pub struct ControlPlane {
    _dir: tempfile::TempDir,
    etcd: Child,
    apiserver: Child,
    bin: PathBuf,
    /// A kubeconfig for cluster-admin (group system:masters).
    pub kubeconfig: PathBuf,
    pub server: String,
    pub log: PathBuf,
}

impl ControlPlane {
    pub fn start(bin: &Path) -> ControlPlane {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let etcd = Command::new(bin.join("etcd"))
            .arg("--data-dir")
            .arg(d.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("etcd.log")).expect("log"))
            .spawn()
            .expect("etcd");
        // The service-account signing key (ECDSA P-256).
        let sa = d.join("sa.key");
        let ok = Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&sa)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "openssl could not make the service-account key");
        let token = "tenet-test-admin-token";
        std::fs::write(
            d.join("tokens.csv"),
            format!("{token},admin,admin,\"system:masters\"\n"),
        )
        .expect("tokens");
        let log = d.join("kube-apiserver.log");
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg(format!("--secure-port={secure}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-key-file={}", sa.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            .arg("--enable-priority-and-fairness=false")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("kube-apiserver");
        let server = format!("https://127.0.0.1:{secure}");
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{ cluster: test, user: admin }}\ncurrent-context: test\n"
            ),
        )
        .expect("kubeconfig");
        let mut cp = ControlPlane {
            _dir: dir,
            etcd,
            apiserver,
            bin: bin.to_path_buf(),
            kubeconfig,
            server,
            log,
        };
        cp.wait_ready(Duration::from_secs(120));
        cp
    }

    fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return;
            }
            if let Ok(Some(status)) = self.apiserver.try_wait() {
                panic!(
                    "kube-apiserver exited ({status}):\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < limit,
                "kube-apiserver not ready within {limit:?}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Install the Tenet CRDs and wait until they are Established.
    pub fn install_crds(&self) {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/crds.yaml");
        self.kubectl_ok(&["apply", "-f", &crds.display().to_string()]);
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/terminalpolicies.tenet.dev",
            "crd/terminals.tenet.dev",
            "crd/remediations.tenet.dev",
            "crd/securitycertificates.tenet.dev",
        ]);
    }

    /// Run kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl")
    }

    /// kubectl, which must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

//! Helpers for the end-to-end tests in `tests/tests/`: where the real
//! binaries are, a gateway with an in-memory fleet, and real .deb files.

pub mod k8s;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tenet::gateway::{Fleet, FleetError, Gateway, Session, Sessions};
use tenet::pki::Ca;
use tenet::pki::ClientKey;
use tenet::tpm_trust::TpmTrust;
use tenet_protocol::bundle::{Manifest, PayloadBundle};
use tenet_protocol::enrol::{EnrolmentRequest, TrustAnchors};
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::session::ToAgent;
use tenet_protocol::{Algorithm, KeyPair, Kind, PublicKey, Rejection, SignedMessage, Signer};

/// A binary of the workspace, built by `cargo test --workspace` (the agent
/// and operator packages have integration tests, so cargo builds their
/// binaries first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo test --workspace` (scripts/test)",
        path.display()
    );
    path
}

/// `git ARGS` in `dir` (as a test author, no global configuration
/// needed), which must succeed; its output, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Tenet Tests",
            "-c",
            "user.email=tests@tenet.invalid",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Have the admin whose private key is `key` sign every policy file in
/// `policies` (a directory, or one file) with the real `tenet policy
/// sign`, as an admin does before committing: the operator enforces only
/// approved policies.
pub fn sign_policies(policies: &Path, key: &Path) {
    let mut files: Vec<PathBuf> = if policies.is_dir() {
        std::fs::read_dir(policies)
            .expect("policy directory")
            .map(|e| e.expect("entry").path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect()
    } else {
        vec![policies.to_path_buf()]
    };
    files.sort();
    let out = std::process::Command::new(binary("tenet"))
        .args(["policy", "sign", "--key"])
        .arg(key)
        .args(&files)
        .output()
        .expect("tenet policy sign");
    assert!(
        out.status.success(),
        "tenet policy sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the fleet saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Enrolled(String),
    Connected(String),
    Disconnected(String),
    Report(Vec<u8>),
    Inventory(Vec<u8>),
    Audit(Vec<u8>),
    /// A report arrived while the fleet played unavailable.
    Unavailable,
}

/// A fleet held in memory: one bootstrap token, the registered identity
/// keys, the connected terminals, and every event on a channel.
pub struct MemoryFleet {
    pub token: String,
    pub identities: Mutex<HashMap<String, PublicKey>>,
    pub sessions: Sessions,
    /// The client keys each terminal's sessions may use, newest last.
    pub client_keys: Mutex<HashMap<String, Vec<ClientKey>>>,
    /// How far each terminal's TPM was trusted at enrolment.
    pub tpm_trust: Mutex<HashMap<String, TpmTrust>>,
    pub events: Mutex<mpsc::Sender<Event>>,
    /// While set, reports are refused as "cannot store now".
    pub unavailable: std::sync::atomic::AtomicBool,
}

impl MemoryFleet {
    fn emit(&self, e: Event) {
        if let Ok(tx) = self.events.lock() {
            let _ = tx.send(e);
        }
    }

    fn verify(&self, terminal: &str, kind: Kind, bytes: &[u8]) -> Result<(), Rejection> {
        let key = self
            .identities
            .lock()
            .map_err(|_| Rejection::Malformed("poisoned".into()))?
            .get(terminal)
            .cloned()
            .ok_or_else(|| Rejection::Malformed(format!("{terminal} is not enrolled")))?;
        SignedMessage::decode(bytes, kind)?.verify_by(&key)
    }

    /// Push a message to a connected terminal.
    pub fn send(&self, terminal: &str, m: ToAgent) -> bool {
        let tx = self.sessions.sender(terminal);
        tx.is_some_and(|tx| tx.try_send(m).is_ok())
    }
}

impl Fleet for MemoryFleet {
    fn enrol(
        &self,
        request: &EnrolmentRequest,
        client_key: ClientKey,
        tpm: TpmTrust,
    ) -> Result<(), String> {
        if request.token != self.token {
            return Err("the bootstrap token is not valid".into());
        }
        let mut ids = self.identities.lock().map_err(|_| "poisoned")?;
        if ids.contains_key(&request.terminal) {
            return Err(format!("{} is already enrolled", request.terminal));
        }
        ids.insert(request.terminal.clone(), request.identity.clone());
        drop(ids);
        if let Ok(mut k) = self.client_keys.lock() {
            k.insert(request.terminal.clone(), vec![client_key]);
        }
        if let Ok(mut t) = self.tpm_trust.lock() {
            t.insert(request.terminal.clone(), tpm);
        }
        self.emit(Event::Enrolled(request.terminal.clone()));
        Ok(())
    }

    fn still_admitted(&self, terminal: &str, client_key: &ClientKey) -> bool {
        self.client_keys
            .lock()
            .is_ok_and(|k| k.get(terminal).is_some_and(|k| k.contains(client_key)))
    }

    fn check_enrolment(&self, request: &EnrolmentRequest) -> Result<(), String> {
        if request.token != self.token {
            return Err("the bootstrap token is not valid".into());
        }
        Ok(())
    }

    fn admit(&self, terminal: &str, client_key: &ClientKey) -> bool {
        let Ok(mut keys) = self.client_keys.lock() else {
            return false;
        };
        let Some(k) = keys.get_mut(terminal) else {
            return false;
        };
        if k.last() == Some(client_key) {
            *k = vec![*client_key];
        }
        k.contains(client_key)
    }

    fn renewing(&self, terminal: &str, current: &ClientKey, renewed: ClientKey) -> bool {
        let Ok(mut keys) = self.client_keys.lock() else {
            return false;
        };
        keys.get_mut(terminal)
            .filter(|k| k.contains(current))
            .map(|k| *k = vec![*current, renewed])
            .is_some()
    }

    fn connected(&self, terminal: &str, session: Session) {
        self.sessions.insert(terminal, session);
        self.emit(Event::Connected(terminal.to_string()));
    }

    fn disconnected(&self, terminal: &str, id: u64) {
        if self.sessions.remove(terminal, id) {
            self.emit(Event::Disconnected(terminal.to_string()));
        }
    }

    fn report(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError> {
        if self.unavailable.load(std::sync::atomic::Ordering::SeqCst) {
            self.emit(Event::Unavailable);
            return Err(FleetError::Unavailable("the store is down".into()));
        }
        self.verify(terminal, Kind::ExecutionReport, bytes)?;
        self.emit(Event::Report(bytes.to_vec()));
        Ok(())
    }

    fn audit(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError> {
        self.verify(terminal, Kind::AuditReport, bytes)?;
        self.emit(Event::Audit(bytes.to_vec()));
        Ok(())
    }

    fn inventory(&self, terminal: &str, bytes: &[u8]) -> Result<(), FleetError> {
        self.verify(terminal, Kind::InventoryReport, bytes)?;
        self.emit(Event::Inventory(bytes.to_vec()));
        Ok(())
    }

    /// Held in memory: everything taken is as durable as it gets.
    fn settled(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A gateway on loopback, in a runtime of its own so that stopping it
/// closes every connection at once.
pub struct TestGateway {
    runtime: Option<tokio::runtime::Runtime>,
    pub address: std::net::SocketAddr,
}

impl TestGateway {
    pub fn start(
        address: &str,
        ca: Arc<Ca>,
        trust: TrustAnchors,
        dispatch_key: Arc<KeyPair>,
        fleet: Arc<MemoryFleet>,
    ) -> TestGateway {
        TestGateway::start_with(
            address,
            ca,
            trust,
            dispatch_key,
            fleet,
            Duration::from_secs(3600),
        )
    }

    /// Like [`TestGateway::start`], issuing client certificates valid for `validity`.
    pub fn start_with(
        address: &str,
        ca: Arc<Ca>,
        trust: TrustAnchors,
        dispatch_key: Arc<KeyPair>,
        fleet: Arc<MemoryFleet>,
        validity: Duration,
    ) -> TestGateway {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let tls = ca
            .server_config(&["127.0.0.1".into()])
            .expect("server config");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let gw = Arc::new(Gateway {
            acceptor: tokio_rustls_acceptor(tls),
            ca,
            trust: tenet::trust::shared(trust, dispatch_key),
            fleet,
            client_cert_validity: validity,
            now_ms,
            limits: Default::default(),
            tpm_roots: Default::default(),
        });
        runtime.spawn(gw.serve(listener));
        TestGateway {
            runtime: Some(runtime),
            address,
        }
    }

    /// Stop accepting and drop every connection.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tokio_rustls_acceptor(config: tenet::pki::ServerConfig) -> tenet::gateway::TlsAcceptor {
    tenet::gateway::TlsAcceptor::from(Arc::new(config))
}

pub use tenet_protocol::host::now_ms;
pub use tenet_test_support::{Swtpm, build_deb, build_deb_depending, have, wait_until};

/// A child process killed when dropped.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next event that `pick` accepts, within `limit`.
pub fn wait_for<T>(
    events: &mpsc::Receiver<Event>,
    limit: Duration,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match events.recv_timeout(left) {
            Ok(e) => {
                if let Some(t) = pick(&e) {
                    return t;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no such event within {limit:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the fleet is gone"),
        }
    }
}

/// A process's resident memory (KiB), from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A TCP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `tenet token create --data data ARGS` in `dir`: the token and the CA
/// fingerprint it prints.
pub fn create_token(dir: &Path, args: &[&str]) -> (String, String) {
    create_token_with(dir, args, &[])
}

/// [`create_token`] with environment variables (KUBECONFIG).
pub fn create_token_with(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> (String, String) {
    let out = Command::new(binary("tenet"))
        .args(["token", "create", "--data", "data"])
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .expect("tenet token create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .expect("token output")
            .trim()
            .to_string()
    };
    (field("token "), field("ca-fingerprint "))
}

/// Run `tenet-agent ARGS` in `dir`.
pub fn agent(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary("tenet-agent"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("tenet-agent runs")
}

/// A file of `examples/payloads/`.
pub fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/payloads")
        .join(path)
}

/// The processes whose command line holds every one of `words`.
pub fn processes_with(words: &[&str]) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| {
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            words.iter().all(|w| args.contains(&w.as_bytes()))
        })
        .count()
}

/// One operator side (CA, keys, an in-memory fleet) and the directory of
/// one terminal `t1` whose inventory is a file.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub ca: Arc<Ca>,
    pub admin: KeyPair,
    pub operator: Arc<KeyPair>,
    pub trust: TrustAnchors,
    pub fleet: Arc<MemoryFleet>,
    pub events: std::sync::mpsc::Receiver<Event>,
}

impl Default for Fixture {
    fn default() -> Fixture {
        Fixture::new()
    }
}

impl Fixture {
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(Ca::load_or_create(tmp.path()).expect("ca"));
        let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let operator = Arc::new(KeyPair::generate(Algorithm::Ed25519).expect("key"));
        let trust = TrustAnchors {
            version: 1,
            admin_keys: vec![admin.public_key()],
            admin_threshold: 1,
            dispatch_key: operator.public_key(),
            issuer_key: operator.public_key(),
        };
        let (tx, events) = std::sync::mpsc::channel();
        let fleet = Arc::new(MemoryFleet {
            token: "token".into(),
            identities: Mutex::default(),
            sessions: Sessions::default(),
            client_keys: Mutex::default(),
            tpm_trust: Mutex::default(),
            events: Mutex::new(tx),
            unavailable: Default::default(),
        });
        std::fs::write(tmp.path().join("inventory.yaml"), "terminal: t1\n").expect("inventory");
        Fixture {
            tmp,
            ca,
            admin,
            operator,
            trust,
            fleet,
            events,
        }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn gateway(&self, address: &str, validity: Duration) -> TestGateway {
        TestGateway::start_with(
            address,
            self.ca.clone(),
            self.trust.clone(),
            self.operator.clone(),
            self.fleet.clone(),
            validity,
        )
    }

    /// Configure and enrol terminal `t1` against `address`.
    pub fn enrol(&self, address: &str) {
        std::fs::write(
            self.dir().join("agent.yaml"),
            format!(
                "terminal: t1\ndata: data\ninventory:\n  file: inventory.yaml\noperator: {{ address: \"{address}\", serverName: 127.0.0.1 }}\ninventoryIntervalSeconds: 1\n"
            ),
        )
        .expect("config");
        let out = agent(
            self.dir(),
            &[
                "enrol",
                "--config",
                "agent.yaml",
                "--token",
                "token",
                "--ca-fingerprint",
                &self.ca.fingerprint(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn run_agent(&self) -> Running {
        Running(
            Command::new(binary("tenet-agent"))
                .args(["run", "--config", "agent.yaml"])
                .current_dir(self.dir())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("agent"),
        )
    }

    /// The agent, its stderr in `DIR/agent.log`.
    pub fn run_agent_logged(&self) -> Running {
        Running(
            Command::new(binary("tenet-agent"))
                .args(["run", "--config", "agent.yaml"])
                .current_dir(self.dir())
                .stderr(std::fs::File::create(self.dir().join("agent.log")).expect("log"))
                .spawn()
                .expect("agent"),
        )
    }

    pub fn connected(&self) {
        wait_for(&self.events, Duration::from_secs(30), |e| {
            matches!(e, Event::Connected(_)).then_some(())
        });
    }

    /// A signed bundle of `wat` and a signed envelope for it in policy `ns/p`.
    pub fn dispatch(&self, wat: &str, sequence: u64) -> ToAgent {
        self.dispatch_for("ns/p", wat, sequence)
    }

    /// A dispatch of `wat` for `policy`.
    pub fn dispatch_for(&self, policy: &str, wat: &str, sequence: u64) -> ToAgent {
        self.dispatch_signed(policy, wat, sequence, &self.admin, &self.operator)
    }

    /// A dispatch of `wat` for `policy` whose bundle and approval `admin`
    /// signed and whose envelope `dispatch` signed.
    pub fn dispatch_signed(
        &self,
        policy: &str,
        wat: &str,
        sequence: u64,
        admin: &KeyPair,
        dispatch: &KeyPair,
    ) -> ToAgent {
        let bundle = PayloadBundle {
            manifest: Manifest {
                name: "test".into(),
                version: "1".into(),
                description: String::new(),
                capabilities: vec![],
                created_ms: now_ms(),
                expires_ms: now_ms() + 3_600_000,
            },
            module: wat::parse_str(wat).expect("wat"),
            artifacts: vec![],
        };
        let bundle = SignedMessage::signed(&bundle, admin).expect("sign");
        let mut env = DispatchEnvelope {
            terminal: "t1".into(),
            policy: policy.into(),
            policy_generation: 1,
            payload_digest: bundle.body_digest(),
            nonce: [sequence as u8; 32],
            issued_at_ms: now_ms(),
            deadline_ms: now_ms() + 60_000,
            sequence,
            args: vec![],
            capabilities: vec![],
            write_paths: vec![],
            approval: Vec::new(),
        };
        tenet_test_support::approve(&mut env, &[admin]);
        ToAgent::Dispatch {
            envelope: SignedMessage::signed(&env, dispatch)
                .expect("sign")
                .encode(),
            bundle: bundle.encode().into(),
        }
    }
}

/// A terminal root under `dir/root` with an empty dpkg database and `debs`
/// installed by dpkg, as an image would come.
pub fn dpkg_root(dir: &Path, debs: &[&Path]) -> PathBuf {
    let root = dir.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("status");
    for deb in debs {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
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
    root
}

/// The install-deb example payload with `deb` as its artifact, signed by `admin`.
pub fn install_bundle(admin: &KeyPair, deb: &Path) -> SignedMessage {
    install_bundle_named(admin, deb, "install-browser-a")
}

/// [`install_bundle`] under another name (policies name a bundle by it).
pub fn install_bundle_named(admin: &KeyPair, deb: &Path, name: &str) -> SignedMessage {
    install_bundle_of(admin, &[deb], name)
}

/// A signed `name` bundle of the install-deb payload shipping `debs`
/// (installed in one dpkg run: the envelope names them all).
pub fn install_bundle_of(admin: &KeyPair, debs: &[&Path], name: &str) -> SignedMessage {
    use tenet_protocol::bundle::{Artifact, Capability};
    let mut artifacts = vec![(
        "install-deb.sh".to_string(),
        std::fs::read(example("install-deb.sh")).expect("script"),
    )];
    for deb in debs {
        artifacts.push((
            deb.file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned(),
            std::fs::read(deb).expect("deb"),
        ));
    }
    let bundle = PayloadBundle {
        manifest: Manifest {
            name: name.into(),
            version: "1".into(),
            description: String::new(),
            capabilities: vec![Capability::RunArtifact, Capability::Log],
            created_ms: now_ms(),
            expires_ms: now_ms() + 3_600_000,
        },
        module: wat::parse_file(example("install-deb.wat")).expect("wat"),
        artifacts: artifacts
            .into_iter()
            .map(|(name, data)| Artifact {
                name,
                sha256: tenet_protocol::wire::sha256(&data),
                size: data.len() as u64,
                data,
            })
            .collect(),
    };
    SignedMessage::signed(&bundle, admin).expect("sign")
}

/// `tenet operator` in `dir` over `policies/` and `data/`, admin key
/// `admin.key.pub`, the gateway on `port`, JSON logs appended to
/// `operator.log`; its stdout lines on a channel.
pub fn start_operator(dir: &Path, port: u16) -> (Running, mpsc::Receiver<String>) {
    start_operator_of(&binary("tenet"), dir, port)
}

/// [`start_operator`] with another `tenet` binary (an earlier release's).
pub fn start_operator_of(tenet: &Path, dir: &Path, port: u16) -> (Running, mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut operator = Command::new(tenet)
        .args([
            "operator",
            "--policies",
            "policies",
            "--data",
            "data",
            "--admin-key",
            "admin.key.pub",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--metrics", "127.0.0.1:0", "--log-format", "json"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("operator.log"))
                .expect("log file"),
        )
        .spawn()
        .expect("operator");
    let (tx, lines) = mpsc::channel::<String>();
    let stdout = operator.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Running(operator), lines)
}

/// The next line on `lines` holding `want`, within a minute.
pub fn next_line(lines: &mpsc::Receiver<String>, want: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no operator line with {want:?}"));
        if line.contains(want) {
            return line;
        }
    }
}

/// A terminal `nagoya-ward3-01` of the Nagoya site (assigned on its
/// token) on the dpkg root `dir/root`, its agent enrolled with the
/// operator whose gateway is on `port` (once the operator imported the
/// token) and running, logging to `dir/agent.log`.
pub fn nagoya_agent(dir: &Path, port: u16) -> Running {
    let (token, fingerprint) = create_token(
        dir,
        &["--terminal", "nagoya-ward3-01", "--label", "site=nagoya"],
    );
    std::fs::write(
        dir.join("agent.yaml"),
        format!(
            "terminal: nagoya-ward3-01\ndata: agent-data\nroot: root\ninventory:\n  dpkg: {{}}\noperator: {{ address: \"127.0.0.1:{port}\" }}\ninventoryIntervalSeconds: 1\n"
        ),
    )
    .expect("config");
    wait_until(Duration::from_secs(30), "the token to be imported", || {
        agent(
            dir,
            &[
                "enrol",
                "--config",
                "agent.yaml",
                "--token",
                &token,
                "--ca-fingerprint",
                &fingerprint,
            ],
        )
        .status
        .success()
    });
    Running(
        Command::new(binary("tenet-agent"))
            .args(["run", "--config", "agent.yaml"])
            .current_dir(dir)
            .stderr(std::fs::File::create(dir.join("agent.log")).expect("log"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("agent"),
    )
}

/// The cache `scripts/debian-root` makes (`bookworm/`, a debootstrapped
/// root; `debs/`; `agent-deps/`), or `None` (skipped) outside CI when it
/// was never made or this is not root (dpkg into a root, and its
/// maintainer scripts, need root).
pub fn debian_cache() -> Option<PathBuf> {
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root_user {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Debian root tests run as root under CI"
        );
        eprintln!("skipping: not root");
        return None;
    }
    let cache = PathBuf::from(std::env::var_os("HOME")?).join(".cache/tenet/debian");
    let ready = ["bookworm", "debs", "agent-deps"]
        .iter()
        .all(|d| cache.join(d).join(".complete").exists());
    if !ready {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Debian root is required under CI (scripts/test makes it with scripts/debian-root)"
        );
        eprintln!("skipping: no Debian root (run scripts/debian-root)");
        return None;
    }
    Some(cache)
}

/// The `.deb` files in `dir`, sorted.
pub fn debs_in(dir: &Path) -> Vec<PathBuf> {
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "deb"))
                .collect()
        })
        .unwrap_or_default();
    debs.sort();
    debs
}

/// A copy of the cached Debian root at `to` (reflinked where the file
/// system can).
pub fn copy_root(cached: &Path, to: &Path) {
    let copied = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(cached)
        .arg(to)
        .status()
        .expect("cp");
    assert!(copied.success(), "copying the Debian root");
}

/// `dpkg-query -W -f=FORMAT PACKAGE` on the dpkg database of `root`.
pub fn dpkg_query(root: &Path, format: &str, package: &str) -> String {
    let out = Command::new("dpkg-query")
        .env("LC_ALL", "C")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", &format!("-f={format}"), package])
        .output()
        .expect("dpkg-query");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What `dpkg --audit` says of `root`'s packages (empty: consistent).
pub fn audit(root: &Path) -> String {
    let out = Command::new("dpkg")
        .env("LC_ALL", "C")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .arg("--audit")
        .output()
        .expect("dpkg --audit");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The directory holding `tenet` and `tenet-agent` of an earlier release
/// (`v0.1.0`), built once by `scripts/old-release` and cached.
pub fn old_release(tag: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/old-release");
    let out = Command::new(&script)
        .arg(tag)
        .output()
        .expect("scripts/old-release runs");
    assert!(
        out.status.success(),
        "scripts/old-release {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `policies/browser.yaml`: browser-a at `version` or later on the Nagoya
/// terminals, remediated by the install-deb `bundle` installing `deb`.
pub fn write_browser_policy(dir: &Path, version: &str, bundle: &SignedMessage, deb: &str) {
    std::fs::write(
        dir.join("policies/browser.yaml"),
        format!(
            "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: browser-a\n  namespace: hospital-it\nspec:\n  selector: {{ matchLabels: {{ site: nagoya }} }}\n  requirements:\n    - package: {{ name: browser-a, version: '>= {version}' }}\n  remediation:\n    payload: {{ name: install-browser-a, digest: '{}' }}\n    args: [{deb}]\n    capabilities: [run-artifact, log]\n",
            tenet_protocol::wire::digest_string(&bundle.body_digest())
        ),
    )
    .expect("policy");
}

//! The gateway as an attacker meets it: someone holding a batch token,
//! an enrolled terminal that wants to pass for another, a stranger on the
//! network. Each attack here worked before the hardening and must not now.
//! The gateway is the real one (TLS on loopback) over the standalone fleet
//! and its store; the clients speak the protocol by hand, so they can do
//! what no genuine agent would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tenet::fleet::OperatorFleet;
use tenet::gateway::{Gateway, Limits, TlsAcceptor};
use tenet::pki::Ca;
use tenet::reconcile::state::Retry;
use tenet::store::{Store, TokenRecord};
use tenet::tpm_trust::{TpmRoots, TpmTrust};
use tenet_agent::connection::{ConnError, enrolment_tls, exchange_enrolment, no_tpm, session_tls};
use tenet_protocol::enrol::{EnrolmentRequest, TrustAnchors};
use tenet_protocol::inventory::{Inventory, InventoryReport};
use tenet_protocol::session::{ToAgent, ToOperator, read_frame, write_frame};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Algorithm, KeyPair, SignedMessage, Signer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// How long any one step may take before the test calls it hung. Generous:
/// a loaded machine is slow, not wrong.
const PATIENCE: Duration = Duration::from_secs(60);

use tenet_e2e::now_ms;

/// A gateway over the standalone fleet, with a batch token "batch" for ten
/// terminals and a one-time token "once".
struct Operator {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    store: Arc<Store>,
    fleet: Arc<OperatorFleet>,
    address: SocketAddr,
    fingerprint: [u8; 32],
}

impl Operator {
    fn start(limits: Limits) -> Operator {
        Operator::start_with(limits, TpmRoots::default())
    }

    fn start_with(limits: Limits, tpm_roots: TpmRoots) -> Operator {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let ca = Arc::new(Ca::load_or_create(dir.path()).expect("ca"));
        let store = Arc::new(Store::open(&dir.path().join("db")).expect("store"));
        for (token, uses) in [("batch", 10), ("once", 1)] {
            store.add_token(
                token,
                &TokenRecord {
                    terminal: None,
                    expires_ms: u64::MAX,
                    uses_left: uses,
                    labels: Default::default(),
                },
            );
        }
        let (fleet, changes) = OperatorFleet::new(store.clone(), Retry::default(), now_ms, || 0.0);
        // Nobody runs the reconcile loop here; its channel may fill.
        drop(changes);
        let fleet = Arc::new(fleet);
        let dispatch_key = Arc::new(KeyPair::generate(Algorithm::Ed25519).expect("key"));
        let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let gateway = Arc::new(Gateway {
            acceptor: TlsAcceptor::from(Arc::new(
                ca.server_config(&["127.0.0.1".into()]).expect("tls"),
            )),
            trust: tenet::trust::shared(
                TrustAnchors {
                    version: 1,
                    admin_keys: vec![admin.public_key()],
                    admin_threshold: 1,
                    dispatch_key: dispatch_key.public_key(),
                    issuer_key: dispatch_key.public_key(),
                },
                dispatch_key,
            ),
            ca: ca.clone(),
            fleet: fleet.clone(),
            client_cert_validity: Duration::from_secs(3600),
            now_ms,
            limits,
            tpm_roots: Arc::new(tpm_roots),
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let address = listener.local_addr().expect("address");
        runtime.spawn(gateway.serve(listener));
        let fingerprint = sha256(&ca.cert_der);
        Operator {
            _dir: dir,
            runtime,
            store,
            fleet,
            address,
            fingerprint,
        }
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.runtime
            .block_on(async { tokio::time::timeout(PATIENCE, f).await })
            .expect("the step hung")
    }
}

/// A device: its identity key, and its TLS key and certificate once enrolled.
struct Device {
    name: String,
    identity: KeyPair,
    tls_key: rcgen::KeyPair,
    cert_pem: String,
    ca_pem: String,
}

fn csr(name: &str, key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(vec![name.to_string()])
        .and_then(|p| p.serialize_request(key))
        .and_then(|r| r.pem())
        .expect("csr")
}

async fn connect(op: &Operator, config: rustls::ClientConfig) -> Result<Tls, ConnError> {
    let tcp = TcpStream::connect(op.address).await?;
    let name = ServerName::IpAddress(op.address.ip().into());
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

/// Enrol `name` with `token`; the device, or the gateway's reason.
async fn enrol(op: &Operator, name: &str, token: &str) -> Result<Device, String> {
    enrol_with_csr(op, name, token, None).await
}

async fn enrol_with_csr(
    op: &Operator,
    name: &str,
    token: &str,
    csr_pem: Option<&str>,
) -> Result<Device, String> {
    enrol_claiming(op, name, token, csr_pem, |_| {}, no_tpm).await
}

/// Enrol with the request changed by `claim` (a TPM, its keys), answering
/// a credential activation with `activate`.
async fn enrol_claiming(
    op: &Operator,
    name: &str,
    token: &str,
    csr_pem: Option<&str>,
    claim: impl FnOnce(&mut EnrolmentRequest),
    activate: impl FnOnce(&[u8], &[u8]) -> Result<Vec<u8>, String>,
) -> Result<Device, String> {
    let identity = KeyPair::generate(Algorithm::EcdsaP256).expect("key");
    let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut request = EnrolmentRequest {
        token: token.into(),
        terminal: name.into(),
        labels: BTreeMap::new(),
        identity: identity.public_key(),
        tpm: false,
        attestation_key: None,
        ek_certificate: None,
        tls_csr_pem: csr_pem.map_or_else(|| csr(name, &tls_key), str::to_string),
        requested_at_ms: now_ms(),
    };
    claim(&mut request);
    let signed = SignedMessage::signed(&request, &identity)
        .expect("sign")
        .encode();
    let tls = connect(op, enrolment_tls(op.fingerprint).expect("tls"))
        .await
        .map_err(|e| e.to_string())?;
    match exchange_enrolment(tls, signed, op.fingerprint, name, activate).await {
        Ok(response) => Ok(Device {
            name: name.into(),
            identity,
            tls_key,
            cert_pem: response.client_certificate_pem,
            ca_pem: response.ca_certificate_pem,
        }),
        Err(ConnError::EnrolmentRefused(reason)) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

impl Device {
    fn tls(&self, cert_pem: &str, key: &rcgen::KeyPair) -> rustls::ClientConfig {
        session_tls(
            CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).expect("ca"),
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert"),
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key"),
        )
        .expect("tls")
    }

    /// A session claiming to be `claimed`, with this device's certificate.
    async fn hello_as(&self, op: &Operator, claimed: &str) -> Tls {
        self.hello_with(op, claimed, &self.cert_pem, &self.tls_key)
            .await
    }

    /// A session of this device's own terminal whose agent says it is of
    /// `version`.
    async fn hello_of_version(&self, op: &Operator, version: &str) -> Tls {
        let mut tls = connect(op, self.tls(&self.cert_pem, &self.tls_key))
            .await
            .expect("TLS");
        write_frame(
            &mut tls,
            &ToOperator::Hello {
                terminal: self.name.clone(),
                agent_version: version.into(),
            },
        )
        .await
        .expect("hello");
        tls
    }

    async fn hello_with(
        &self,
        op: &Operator,
        claimed: &str,
        cert_pem: &str,
        key: &rcgen::KeyPair,
    ) -> Tls {
        let mut tls = connect(op, self.tls(cert_pem, key))
            .await
            .expect("TLS with a certificate of the agent CA");
        write_frame(
            &mut tls,
            &ToOperator::Hello {
                terminal: claimed.into(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            },
        )
        .await
        .expect("hello");
        tls
    }

    /// An inventory signed by this device, claiming to be `terminal`.
    fn inventory(&self, terminal: &str) -> Vec<u8> {
        let report = InventoryReport {
            terminal: terminal.into(),
            sequence: now_ms(),
            collected_at_ms: now_ms(),
            inventory: Inventory {
                terminal: terminal.into(),
                ..Default::default()
            },
        };
        SignedMessage::signed(&report, &self.identity)
            .expect("sign")
            .encode()
    }
}

/// Whether the session serves: an inventory sent on it is acknowledged
/// (true), or the gateway closes it (false).
async fn serves(tls: &mut Tls, inventory: Vec<u8>) -> bool {
    let digest = sha256(&inventory);
    if write_frame(tls, &ToOperator::Inventory(inventory))
        .await
        .is_err()
    {
        return false;
    }
    loop {
        match read_frame::<_, ToAgent>(tls, 1 << 20).await {
            Ok(ToAgent::Ack { digest: d }) if d == digest => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// Wait until the gateway closes `tls` (whatever it sends first is read).
async fn closed(tls: &mut Tls) {
    while read_frame::<_, ToAgent>(tls, 1 << 20).await.is_ok() {}
}

#[test]
fn names_that_could_pass_for_another_terminal_are_refused_at_enrolment() {
    let op = Operator::start(Limits::default());
    op.run(async {
        enrol(&op, "nagoya-ward3-01", "batch")
            .await
            .expect("victim");
        // Names matched as DNS names (case-insensitive, wildcards) let these
        // open the victim's sessions; now they are not names at all.
        for (impostor, why) in [
            (
                "NAGOYA-WARD3-01",
                "'N' is not allowed (lower-case letters, digits, '-' and '.' are)",
            ),
            (
                "*.nagoya.example",
                "'*' is not allowed (lower-case letters, digits, '-' and '.' are)",
            ),
            (
                "nagoya-ward3-01\n",
                "'\\n' is not allowed (lower-case letters, digits, '-' and '.' are)",
            ),
        ] {
            assert_eq!(
                enrol(&op, impostor, "batch").await.err(),
                Some(format!(
                    "malformed message: terminal name {impostor:?} is not valid: {why}"
                )),
            );
        }
    });
    assert!(op.store.terminal("NAGOYA-WARD3-01").is_none());
    assert_eq!(op.store.terminals().len(), 1);
}

#[test]
fn a_session_needs_the_key_enrolled_for_that_terminal() {
    let op = Operator::start(Limits::default());
    op.run(async {
        let old = enrol(&op, "nagoya-ward3-01", "batch").await.expect("enrol");
        let mallory = enrol(&op, "mallory-01", "batch").await.expect("enrol");
        // Mallory's own certificate does not open the victim's session.
        let mut s = mallory.hello_as(&op, "nagoya-ward3-01").await;
        assert!(!serves(&mut s, mallory.inventory("nagoya-ward3-01")).await);
        // The device is replaced: de-enrolled (its session ends at once,
        // not at its next message), the name enrolled again by a new
        // device. The old device's certificate names the terminal exactly,
        // and is still unexpired: it opens nothing any more.
        let mut live = old.hello_as(&op, "nagoya-ward3-01").await;
        assert!(serves(&mut live, old.inventory("nagoya-ward3-01")).await);
        assert!(op.fleet.forget_terminal("nagoya-ward3-01"));
        closed(&mut live).await;
        let new = enrol(&op, "nagoya-ward3-01", "batch")
            .await
            .expect("re-enrol");
        let mut s = old.hello_as(&op, "nagoya-ward3-01").await;
        assert!(!serves(&mut s, old.inventory("nagoya-ward3-01")).await);
        let mut s = new.hello_as(&op, "nagoya-ward3-01").await;
        assert!(serves(&mut s, new.inventory("nagoya-ward3-01")).await);
    });
}

#[test]
fn agents_more_than_a_release_away_are_refused_and_the_others_welcomed() {
    let op = Operator::start(Limits::default());
    let this = tenet_protocol::release::Release::this();
    let too_new = format!("{}.{}.0", this.major, this.minor + 2);
    op.run(async {
        let device = enrol(&op, "nagoya-ward3-01", "batch").await.expect("enrol");
        for version in ["0.0.9", too_new.as_str(), "test"] {
            let mut s = device.hello_of_version(&op, version).await;
            assert!(
                !serves(&mut s, device.inventory("nagoya-ward3-01")).await,
                "agent {version} served"
            );
        }
        assert!(op.fleet.connected_terminals().is_empty());
        // The previous release: served, never sent Welcome (it could not
        // decode it: the first frame it gets answers its inventory), and
        // its version recorded.
        let mut s = device.hello_of_version(&op, "0.1.0").await;
        let inventory = device.inventory("nagoya-ward3-01");
        let digest = sha256(&inventory);
        write_frame(&mut s, &ToOperator::Inventory(inventory))
            .await
            .expect("inventory");
        assert_eq!(
            read_frame::<_, ToAgent>(&mut s, 1 << 20)
                .await
                .expect("a frame"),
            ToAgent::Ack { digest }
        );
        assert_eq!(
            op.store
                .terminal("nagoya-ward3-01")
                .expect("there")
                .agent_version,
            "0.1.0"
        );
        drop(s);
        // This release: Welcome comes first, naming the operator's version.
        let mut s = device.hello_as(&op, "nagoya-ward3-01").await;
        assert_eq!(
            read_frame::<_, ToAgent>(&mut s, 1 << 20)
                .await
                .expect("a frame"),
            ToAgent::Welcome {
                operator_version: env!("CARGO_PKG_VERSION").into()
            }
        );
        assert!(serves(&mut s, device.inventory("nagoya-ward3-01")).await);
    });
    assert_eq!(
        op.store
            .terminal("nagoya-ward3-01")
            .expect("there")
            .agent_version,
        env!("CARGO_PKG_VERSION")
    );
}

/// A probe (an agent proving a new binary of itself) is answered and
/// closed: no session starts, the terminal's session goes on, and nothing
/// is recorded of it. Only the terminal's own key may probe.
#[test]
fn a_probe_is_welcomed_and_starts_no_session() {
    let op = Operator::start(Limits::default());
    op.run(async {
        let device = enrol(&op, "nagoya-ward3-01", "batch").await.expect("enrol");
        let mallory = enrol(&op, "mallory-01", "batch").await.expect("enrol");
        let mut live = device.hello_of_version(&op, "0.1.0").await;
        assert!(serves(&mut live, device.inventory("nagoya-ward3-01")).await);
        let probe = |d: &Device, version: &str| {
            let message = ToOperator::Probe {
                terminal: "nagoya-ward3-01".into(),
                agent_version: version.into(),
            };
            let config = d.tls(&d.cert_pem, &d.tls_key);
            let op = &op;
            async move {
                let mut tls = connect(op, config).await.expect("TLS");
                write_frame(&mut tls, &message).await.expect("probe");
                let mut frames = Vec::new();
                while let Ok(f) = read_frame::<_, ToAgent>(&mut tls, 1 << 20).await {
                    frames.push(f);
                }
                frames
            }
        };
        assert_eq!(
            probe(&device, env!("CARGO_PKG_VERSION")).await,
            vec![ToAgent::Welcome {
                operator_version: env!("CARGO_PKG_VERSION").into()
            }]
        );
        // Another terminal's key, or a version not served: nothing.
        assert_eq!(probe(&mallory, env!("CARGO_PKG_VERSION")).await, vec![]);
        assert_eq!(probe(&device, "0.0.1").await, vec![]);
        // The session it held goes on (checked while it is held), with its
        // version as it said it.
        assert!(serves(&mut live, device.inventory("nagoya-ward3-01")).await);
        assert_eq!(
            op.fleet.connected_terminals(),
            vec!["nagoya-ward3-01".to_string()]
        );
    });
    assert_eq!(
        op.store
            .terminal("nagoya-ward3-01")
            .expect("there")
            .agent_version,
        "0.1.0"
    );
}

#[test]
fn a_renewal_moves_the_session_binding_to_the_new_key() {
    let op = Operator::start(Limits::default());
    op.run(async {
        let d = enrol(&op, "ward-01", "batch").await.expect("enrol");
        let mut s = d.hello_as(&op, &d.name).await;
        assert!(serves(&mut s, d.inventory(&d.name)).await);
        let key2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        write_frame(
            &mut s,
            &ToOperator::RenewCertificate {
                csr_pem: csr("someone-else", &key2),
            },
        )
        .await
        .expect("renew");
        let cert2 = loop {
            match read_frame::<_, ToAgent>(&mut s, 1 << 20)
                .await
                .expect("answer")
            {
                ToAgent::Certificate { pem } => break pem,
                ToAgent::RenewalRefused { reason } => panic!("renewal refused: {reason}"),
                _ => continue,
            }
        };
        drop(s);
        // Until the new certificate is used, the old one still works (an
        // agent that crashed before saving the new one is not locked out).
        let mut s = d.hello_as(&op, &d.name).await;
        assert!(serves(&mut s, d.inventory(&d.name)).await);
        drop(s);
        // A session on the old key stays open while the new key is first used.
        let mut stale = d.hello_as(&op, &d.name).await;
        assert!(serves(&mut stale, d.inventory(&d.name)).await);
        let mut s = d.hello_with(&op, &d.name, &cert2, &key2).await;
        assert!(serves(&mut s, d.inventory(&d.name)).await);
        drop(s);
        // Once it is, the old certificate opens nothing ...
        let mut s = d.hello_as(&op, &d.name).await;
        assert!(!serves(&mut s, d.inventory(&d.name)).await);
        // ... and the session still open on it (replaced anyway) cannot
        // renew its way back in with a key of its own.
        let key3 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let _ = write_frame(
            &mut stale,
            &ToOperator::RenewCertificate {
                csr_pem: csr("ward-01", &key3),
            },
        )
        .await;
        loop {
            match read_frame::<_, ToAgent>(&mut stale, 1 << 20).await {
                Ok(ToAgent::Certificate { .. }) => panic!("a retired key renewed itself"),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        assert!(
            !op.store.client_key_admitted(
                "ward-01",
                &tenet::pki::client_key(
                    &CertificateDer::from_pem_slice(d.cert_pem.as_bytes()).expect("pem")
                )
                .expect("key")
            ),
            "the retired key stays retired"
        );
    });
}

#[test]
fn a_newer_session_replaces_the_older_which_leaves_the_terminal_online() {
    let op = Operator::start(Limits::default());
    op.run(async {
        let d = enrol(&op, "ward-01", "batch").await.expect("enrol");
        let mut older = d.hello_as(&op, &d.name).await;
        assert!(serves(&mut older, d.inventory(&d.name)).await);
        let mut newer = d.hello_as(&op, &d.name).await;
        assert!(serves(&mut newer, d.inventory(&d.name)).await);
        // The gateway ends the older session itself ...
        closed(&mut older).await;
        // ... and its end (recorded before the gateway closed it) does not
        // mark the terminal offline.
        assert_eq!(op.fleet.connected_terminals(), vec!["ward-01".to_string()]);
        let record = op.store.terminal("ward-01").expect("enrolled");
        assert_eq!(record.offline_since_ms, 0, "connected, not offline");
        assert!(serves(&mut newer, d.inventory(&d.name)).await);
    });
}

#[test]
fn a_refused_enrolment_spends_no_token() {
    let op = Operator::start(Limits::default());
    op.run(async {
        let refused = enrol_with_csr(&op, "ward-01", "once", Some("not a CSR")).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|r| r.starts_with("the certificate request is not acceptable")),
            "{:?}",
            refused.as_ref().map(|d| &d.name)
        );
        // The one-time token is still good.
        enrol(&op, "ward-01", "once").await.expect("enrol");
        assert_eq!(
            enrol(&op, "ward-02", "once").await.err().as_deref(),
            Some("the bootstrap token was already used")
        );
    });
}

#[test]
fn an_oversized_first_frame_is_refused_before_it_is_read() {
    // With a long opening timeout, only the size check can close it.
    let op = Operator::start(Limits {
        opening_timeout: Duration::from_secs(3600),
        ..Limits::default()
    });
    op.run(async {
        let mut tls = connect(&op, enrolment_tls(op.fingerprint).expect("tls"))
            .await
            .expect("tls");
        // Announce 16 MiB, send a little of it.
        tls.write_all(&(16u32 << 20).to_be_bytes())
            .await
            .expect("header");
        tls.write_all(&[0u8; 1024]).await.expect("body");
        tls.flush().await.expect("flush");
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "closed without an answer");
    });
}

#[test]
fn connections_that_never_authenticate_do_not_lock_out_terminals() {
    // Room for two sessions only; strangers' connections are not sessions.
    let op = Operator::start(Limits {
        max_sessions: 2,
        max_opening_per_address: 60,
        opening_timeout: Duration::from_secs(3600),
        ..Limits::default()
    });
    op.run(async {
        let d = enrol(&op, "ward-01", "batch").await.expect("enrol");
        let mut idle = Vec::new();
        for _ in 0..50 {
            idle.push(TcpStream::connect(op.address).await.expect("connect"));
        }
        let mut s = d.hello_as(&op, &d.name).await;
        assert!(serves(&mut s, d.inventory(&d.name)).await);
        // One address cannot take every opening slot: over its share, its
        // connections are closed at once, while other addresses get in.
        for _ in 0..10 {
            idle.push(TcpStream::connect(op.address).await.expect("connect"));
        }
        let mut over = TcpStream::connect(op.address).await.expect("connect");
        let mut buf = [0u8; 1];
        assert!(
            matches!(over.read(&mut buf).await, Ok(0) | Err(_)),
            "closed at once"
        );
        let other = tokio::net::TcpSocket::new_v4().expect("socket");
        other
            .bind("127.0.0.2:0".parse().expect("address"))
            .expect("bind 127.0.0.2");
        let tcp = other.connect(op.address).await.expect("connect");
        let name = ServerName::IpAddress(op.address.ip().into());
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(d.tls(&d.cert_pem, &d.tls_key)))
            .connect(name, tcp)
            .await
            .expect("TLS from another address");
        write_frame(
            &mut s,
            &ToOperator::Hello {
                terminal: d.name.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            },
        )
        .await
        .expect("hello");
        assert!(serves(&mut s, d.inventory(&d.name)).await);
    });
}

#[test]
fn a_silent_session_is_pinged_then_closed() {
    let op = Operator::start(Limits {
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    });
    op.run(async {
        let d = enrol(&op, "ward-01", "batch").await.expect("enrol");
        let mut s = d.hello_as(&op, &d.name).await;
        assert!(matches!(
            read_frame::<_, ToAgent>(&mut s, 1 << 20).await,
            Ok(ToAgent::Welcome { .. })
        ));
        // Answering pings keeps it open.
        for _ in 0..3 {
            assert_eq!(
                read_frame::<_, ToAgent>(&mut s, 1 << 20)
                    .await
                    .expect("ping"),
                ToAgent::Ping
            );
            write_frame(&mut s, &ToOperator::Pong).await.expect("pong");
        }
        assert!(serves(&mut s, d.inventory(&d.name)).await);
        // Not answering closes it.
        assert_eq!(
            read_frame::<_, ToAgent>(&mut s, 1 << 20)
                .await
                .expect("ping"),
            ToAgent::Ping
        );
        closed(&mut s).await;
    });
    assert!(op.fleet.connected_terminals().is_empty());
}

/// `GET /metrics` on `port`: the body, or why not.
fn scrape(port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

#[test]
fn the_metrics_listener_outlives_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    std::fs::write(dir.join("admin.pub"), admin.public_key().to_pem()).expect("pub");
    let (port, metrics) = (tenet_e2e::free_port(), tenet_e2e::free_port());
    // A hard limit of 64 open files: the operator cannot raise it, and a
    // flood of scrapers runs it out of descriptors.
    let operator = std::process::Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg(tenet_e2e::binary("tenet"))
        .args(["operator", "--policies", "policies", "--data", "data"])
        .args(["--admin-key", "admin.pub", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics")
        .arg(format!("127.0.0.1:{metrics}"))
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("operator.log")).expect("log"))
        .spawn()
        .expect("prlimit runs the operator");
    let _operator = tenet_e2e::Running(operator);
    tenet_e2e::wait_until(PATIENCE, "metrics served", || {
        scrape(metrics).is_ok_and(|b| b.starts_with("HTTP/1.1 200"))
    });
    // From eight addresses (16 scrapes each are served at once): enough
    // held connections to exhaust the 64 descriptors.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let flood: Vec<tokio::net::TcpStream> = runtime.block_on(async {
        let mut flood = Vec::new();
        for i in 0..200u8 {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            let from: std::net::SocketAddr =
                format!("127.0.0.{}:0", 1 + i % 8).parse().expect("address");
            socket.bind(from).expect("bind a loopback address");
            if let Ok(s) = socket.connect(([127, 0, 0, 1], metrics).into()).await {
                flood.push(s);
            }
        }
        flood
    });
    assert!(flood.len() > 64, "the flood got in: {}", flood.len());
    runtime.block_on(async move { drop(flood) });
    // Once the descriptors are free again, scrapes are answered again.
    tenet_e2e::wait_until(PATIENCE, "metrics served after the flood", || {
        scrape(metrics).is_ok_and(|b| b.starts_with("HTTP/1.1 200"))
    });
    let log = std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

/// The TPM trust the operator recorded for `terminal`.
fn tpm_trust(op: &Operator, terminal: &str) -> TpmTrust {
    op.store.terminal(terminal).expect("enrolled").tpm_trust
}

#[test]
fn only_a_tpm_that_proves_itself_counts_as_one() {
    let Some(swtpm) = tenet_e2e::Swtpm::start() else {
        return;
    };
    let roots = TpmRoots::load(&swtpm.manufacturer_ca()).expect("manufacturer CA");
    let op = Operator::start_with(Limits::default(), roots);
    let tpm = tenet_agent::tpm::TpmIdentity::open(&swtpm.tcti()).expect("TPM");
    let real_ak = tpm.attestation_key().expect("AK");
    let real_ek = tpm
        .ek_certificate()
        .expect("swtpm_setup wrote an EK certificate");
    let software_ak = KeyPair::generate(Algorithm::EcdsaP256)
        .expect("key")
        .public_key();
    let claim = |ak: &tenet_protocol::PublicKey, ek: Option<Vec<u8>>| {
        let ak = ak.clone();
        move |r: &mut EnrolmentRequest| {
            r.tpm = true;
            r.attestation_key = Some(ak);
            r.ek_certificate = ek;
        }
    };
    // A forged EK certificate: a CA of the attacker's own.
    let forged_ek = {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let ek_key = rcgen::KeyPair::generate().expect("key");
        rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .signed_by(&ek_key, &issuer)
            .expect("ek")
            .der()
            .to_vec()
    };
    op.run(async {
        // 1. A software key said to be the AK, nothing else: claimed.
        enrol_claiming(
            &op,
            "soft-01",
            "batch",
            None,
            claim(&software_ak, None),
            no_tpm,
        )
        .await
        .expect("enrolled");
        // 2. A forged EK certificate: claimed, with the reason.
        enrol_claiming(
            &op,
            "forged-01",
            "batch",
            None,
            claim(&software_ak, Some(forged_ek)),
            no_tpm,
        )
        .await
        .expect("enrolled");
        // 3. The genuine EK certificate (copied) with a software AK: the
        // operator's credential is sealed to the real TPM, which cannot open
        // it for an AK it does not hold; the attacker cannot open it at all.
        enrol_claiming(
            &op,
            "copied-ek-01",
            "batch",
            None,
            claim(&software_ak, Some(real_ek.clone())),
            |blob, secret| {
                tpm.activate_credential(blob, secret)
                    .map_err(|e| e.to_string())
            },
        )
        .await
        .expect("enrolled");
        enrol_claiming(
            &op,
            "copied-ek-02",
            "batch",
            None,
            claim(&software_ak, Some(real_ek.clone())),
            |_, _| Ok(vec![0x42; 32]),
        )
        .await
        .expect("enrolled");
        // 4. The real TPM with its own AK and EK: proven, once.
        for name in ["genuine-01", "genuine-02"] {
            enrol_claiming(
                &op,
                name,
                "batch",
                None,
                claim(&real_ak, Some(real_ek.clone())),
                |blob, secret| {
                    tpm.activate_credential(blob, secret)
                        .map_err(|e| e.to_string())
                },
            )
            .await
            .expect("enrolled");
        }
    });
    let claimed = |name: &str| match tpm_trust(&op, name) {
        TpmTrust::Claimed { reason } => reason,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(
        claimed("soft-01"),
        "no attestation key or EK certificate was sent"
    );
    assert!(
        claimed("forged-01")
            .starts_with("the EK certificate does not chain to a configured TPM manufacturer root"),
        "{}",
        claimed("forged-01")
    );
    assert!(
        claimed("copied-ek-01")
            .starts_with("the terminal's TPM could not activate the credential: "),
        "{}",
        claimed("copied-ek-01")
    );
    assert_eq!(
        claimed("copied-ek-02"),
        "the TPM recovered another secret: the attestation key is not in the TPM the EK certificate belongs to"
    );
    assert!(tpm_trust(&op, "genuine-01").proven());
    // One TPM proves one terminal: the same TPM enrolled again as another
    // name activates the credential, but stays claimed.
    assert!(
        claimed("genuine-02").starts_with("its TPM (EK sha256:")
            && claimed("genuine-02").ends_with("already proves terminal \"genuine-01\""),
        "{}",
        claimed("genuine-02")
    );
}

//! Security certificates end to end, standalone mode, with real processes
//! and a real software TPM: `tenet operator` audits a `tenet-agent` whose
//! identity and attestation keys live in swtpm (a TPM quote over PCRs 0-7
//! with the operator's nonce), issues a short-lived certificate, renews it
//! before it expires, reissues it at once when the terminal's level
//! changes, withholds it below the policy's minimum; `tenet cert verify`
//! asks the agent's presentation listener and gives the right verdict and
//! reason for every bad case, the forged ones served by fake peers.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenet_e2e::{
    Running, Swtpm, agent, binary, create_token, free_port, now_ms, sign_policies, wait_until,
};
use tenet_protocol::certificate::{CERTIFICATE_VERSION, SecurityCertificate};
use tenet_protocol::present_tls::PresentAnswer;
use tenet_protocol::{Algorithm, KeyPair, SignedMessage, Signer};

const TERMINAL: &str = "nagoya-ward3-01";

/// How a fake peer answers a (session-bound) challenge.
type Answer = Box<dyn Fn([u8; 32]) -> PresentAnswer + Send + Sync>;

fn inventory(browser: &str, clamav: &str) -> String {
    format!(
        "terminal: {TERMINAL}\nlabels: {{ site: nagoya }}\nfacts:\n  hardware: {{ tpm: true }}\npackages:\n  - {{ name: browser-a, version: {browser} }}\n  - {{ name: clamav-daemon, version: 1.0.7 }}\nservices:\n  - {{ name: clamav-daemon, state: {clamav}, enabled: true }}\n"
    )
}

/// `tenet cert verify` against `peer`: exit code and stdout + stderr.
fn verify(dir: &Path, peer: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new(binary("tenet"))
        .args(["cert", "verify", "--peer", peer])
        .args(extra)
        .current_dir(dir)
        .output()
        .expect("tenet cert verify");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The terminal's line in the operator's status file.
fn terminal_status(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("data/status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["terminals"]
        .as_array()?
        .iter()
        .find(|t| t["terminal"] == TERMINAL)
        .cloned()
}

/// The certificate line of the terminal in the operator's status file.
fn cert_status(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("data/status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["terminals"]
        .as_array()?
        .iter()
        .find(|t| t["terminal"] == TERMINAL)?
        .get("certificate")
        .cloned()
}

fn field(c: &serde_json::Value, name: &str) -> u64 {
    c[name].as_u64().unwrap_or_default()
}

/// A fake peer on loopback that answers every challenge with `answer`
/// (given the session-bound challenge).
fn fake_peer(
    answer: impl Fn([u8; 32]) -> PresentAnswer + Send + Sync + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    listener.set_nonblocking(true).expect("nonblocking");
    let answer = Arc::new(answer);
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let cert = rcgen::CertificateParams::new(vec!["fake".to_string()])
                .and_then(|p| p.self_signed(&key))
                .expect("cert");
            let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("der");
            let tls =
                tenet_protocol::present_tls::server_config(cert.der().clone(), der).expect("tls");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
            // One connection, one answer: each fake serves one verify.
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(tcp).await.expect("tls");
            let answer = answer.clone();
            let _ =
                tenet_protocol::present_tls::answer(&mut tls, |bound| async move { answer(bound) })
                    .await;
        });
    });
    (addr, handle)
}

#[test]
fn certificates_are_issued_renewed_reissued_and_verified() {
    let Some(tpm) = Swtpm::start() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    std::fs::write(dir.join("admin.pub"), admin.public_key().to_pem()).expect("pub");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    // Two policies of weight 1: the level is 100 with both compliant, 50
    // with one. Certificates: 12 s, renewed in the last 6 s, minimum 50.
    std::fs::write(
        dir.join("policies/posture.yaml"),
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: { name: antivirus, namespace: it }\nspec:\n  selector: { matchLabels: { site: nagoya } }\n  requirements:\n    - service: { name: clamav-daemon, state: running }\n  certificate: { validity: 12s, renewBefore: 6s, minimumLevel: 50, pcrs: [0, 1, 2, 3, 4, 5, 6, 7] }\n---\napiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: { name: browser, namespace: it }\nspec:\n  selector: { matchLabels: { site: nagoya } }\n  requirements:\n    - package: { name: browser-a, version: '>= 120.0' }\n",
    )
    .expect("policy");
    sign_policies(&dir.join("policies"), &dir.join("admin.key"));
    std::fs::write(dir.join("inventory.yaml"), inventory("120.0-1", "running")).expect("inv");

    let port = free_port();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut operator = start_operator(dir, port, &lines, &tpm.manufacturer_ca());
    let present_port = free_port();
    let peer = format!("127.0.0.1:{present_port}");
    enrol_agent(
        dir,
        &tpm,
        port,
        &format!("presentation: {{ listen: \"{peer}\" }}\n"),
    );
    let mut agent_process = start_agent(dir);
    let issuer = ["--issuer-key", "data/dispatch.key.pub"];
    let with = |more: &[&'static str]| -> Vec<&str> {
        let mut v: Vec<&str> = issuer.to_vec();
        v.extend_from_slice(more);
        v
    };

    // 1. Audited (TPM quote) and issued: level 100.
    wait_until(
        Duration::from_secs(30),
        "a certificate at level 100",
        || cert_status(dir).is_some_and(|c| c["level"] == 100),
    );
    let first = cert_status(dir).expect("status");
    assert_eq!(first["audit"], "passed (Quoted)", "{first}");
    // The TPM proved itself at enrolment: its EK certificate chains to the
    // manufacturer's CA, and it activated the credential for its AK.
    assert_eq!(
        terminal_status(dir).expect("status")["tpm"],
        "proven",
        "{:?}",
        terminal_status(dir)
    );
    let (code, text) = verify(
        dir,
        &peer,
        &with(&["--min-level", "100", "--subject", TERMINAL]),
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("verified: {TERMINAL} at security level 100")),
        "{text}"
    );

    // 2. Renewed inside the renew window, before it expired.
    let (serial1, nb1, na1) = (
        first["serial"].clone(),
        field(&first, "notBeforeMs"),
        field(&first, "notAfterMs"),
    );
    assert_eq!(na1 - nb1, 12_000);
    wait_until(Duration::from_secs(20), "a renewal", || {
        cert_status(dir).is_some_and(|c| c["serial"] != serial1)
    });
    let renewed = cert_status(dir).expect("status");
    let nb2 = field(&renewed, "notBeforeMs");
    assert!(
        nb2 >= na1 - 6_000 && nb2 < na1,
        "renewed at {nb2}, the window was {}..{na1}",
        na1 - 6_000
    );
    assert_eq!(renewed["level"], 100);
    let (code, text) = verify(dir, &peer, &with(&["--min-level", "100"]));
    assert_eq!(code, 0, "{text}");
    // Without --subject any terminal with a certificate would pass: said.
    assert!(
        text.contains(&format!("tenet: warning: no --subject given, so any terminal with a valid certificate passes; this one is \"{TERMINAL}\". Pin the terminal you expect with --subject NAME")),
        "{text}"
    );

    // 3. The level changes (browser-a falls below the policy): reissued at
    // once at 50, long before the next renewal is due.
    let changed_at = now_ms();
    std::fs::write(
        dir.join("inventory.yaml"),
        inventory("118.0.2-1", "running"),
    )
    .expect("inv");
    wait_until(Duration::from_secs(10), "a reissue at level 50", || {
        cert_status(dir).is_some_and(|c| c["level"] == 50)
    });
    let reissued = cert_status(dir).expect("status");
    let nb3 = field(&reissued, "notBeforeMs");
    assert!(nb3 >= changed_at && nb3 < nb2 + 6_000, "reissued at {nb3}");
    let (code, text) = verify(dir, &peer, &with(&["--min-level", "51"]));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(
            "refused: level too low: security level 50 is below the required 51 (LevelTooLow)"
        ),
        "{text}"
    );
    let (code, text) = verify(dir, &peer, &with(&["--min-level", "50"]));
    assert_eq!(code, 0, "{text}");
    {
        let l = lines.lock().expect("lines");
        for reason in ["(Issued)", "(Renewed)", "(LevelChanged)"] {
            assert!(l.iter().any(|x| x.contains(reason)), "{reason} in {l:?}");
        }
    }

    // 4. Every refusal, with its reason.
    let (code, text) = verify(dir, &peer, &["--issuer-key", "admin.pub"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("refused: wrong issuer") && text.contains("(UnknownKey)"),
        "{text}"
    );
    let (code, text) = verify(dir, &peer, &with(&["--subject", "osaka-visiting-nurse-07"]));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("refused: wrong subject: the certificate is for \"nagoya-ward3-01\", not \"osaka-visiting-nurse-07\" (WrongTerminal)"),
        "{text}"
    );

    let genuine =
        std::fs::read(dir.join("agent-data/certificate")).expect("the agent's certificate");
    let issuer_key = KeyPair::read_file(&dir.join("data/dispatch.key"))
        .expect("the issuer's key (the test is the admin)");
    let thief = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let cert_for = |key: &KeyPair, signer: &KeyPair, level: u8, from: u64, to: u64| {
        SignedMessage::signed(
            &SecurityCertificate {
                version: CERTIFICATE_VERSION,
                serial: [9; 16],
                issuer: "tenet-operator".into(),
                issuer_key: issuer_key.public_key().fingerprint(),
                not_before_ms: from,
                not_after_ms: to,
                subject: TERMINAL.into(),
                subject_key: key.public_key(),
                level,
            },
            signer,
        )
        .expect("sign")
        .encode()
    };
    let presenting = |cert: Vec<u8>, key: KeyPair| {
        move |bound: [u8; 32]| {
            PresentAnswer::Presentation(
                tenet_protocol::presentation::present(&cert, bound, &key, now_ms())
                    .expect("present"),
            )
        }
    };
    let now = now_ms();
    let cases: Vec<(&str, Answer, &str)> = vec![
        (
            "a forged certificate (signed by a key that is not the issuer's)",
            Box::new(presenting(
                cert_for(&thief, &thief, 100, now, now + 60_000),
                thief.clone_key(),
            )),
            "refused: wrong issuer",
        ),
        (
            "another terminal's certificate, presented with the thief's key",
            Box::new(presenting(genuine.clone(), thief.clone_key())),
            "(BadSignature)",
        ),
        (
            "a level the issuer never signed",
            Box::new({
                let mut frame =
                    SignedMessage::decode(&genuine, tenet_protocol::Kind::SecurityCertificate)
                        .expect("frame");
                let mut c: SecurityCertificate = frame.open().expect("cert");
                c.level = 100;
                frame.body = tenet_protocol::wire::encode(&c);
                presenting(frame.encode(), thief.clone_key())
            }),
            "refused: bad signature",
        ),
        (
            "an expired certificate",
            Box::new(presenting(
                cert_for(&thief, &issuer_key, 100, now - 60_000, now - 1_000),
                thief.clone_key(),
            )),
            "refused: the certificate expired at",
        ),
        (
            "a certificate not valid yet",
            Box::new(presenting(
                cert_for(&thief, &issuer_key, 100, now + 600_000, now + 660_000),
                thief.clone_key(),
            )),
            "refused: the certificate is not valid before",
        ),
        (
            "a replayed answer (recorded for another challenge)",
            Box::new({
                let cert = cert_for(&thief, &issuer_key, 100, now, now + 60_000);
                let key = thief.clone_key();
                move |_bound: [u8; 32]| {
                    PresentAnswer::Presentation(
                        tenet_protocol::presentation::present(&cert, [0x42; 32], &key, now_ms())
                            .expect("present"),
                    )
                }
            }),
            "refused: challenge mismatch",
        ),
    ];
    for (what, answer, expected) in cases {
        let (addr, handle) = fake_peer(answer);
        let (code, text) = verify(dir, &addr, &issuer);
        assert_eq!(code, 1, "{what}: {text}");
        assert!(
            text.contains(expected),
            "{what}: expected {expected:?} in {text}"
        );
        let _ = handle.join();
    }

    // 5. Below the minimum: withheld, and the agent stops presenting.
    std::fs::write(
        dir.join("inventory.yaml"),
        inventory("118.0.2-1", "stopped"),
    )
    .expect("inv");
    wait_until(Duration::from_secs(10), "the certificate withheld", || {
        cert_status(dir).is_some_and(|c| {
            c["conditions"][0]["reason"] == "Withheld"
                && c["conditions"][0]["message"] == "level 0 is below the policy's minimum 50"
        })
    });
    wait_until(
        Duration::from_secs(10),
        "the agent to stop presenting",
        || verify(dir, &peer, &issuer).1.contains("(NoCertificate)"),
    );

    // 6. Compliant again: issued again. Then the operator stops: nothing
    // renews it, and at its expiry the peer refuses it (expiry is
    // revocation).
    std::fs::write(dir.join("inventory.yaml"), inventory("120.0-1", "running")).expect("inv");
    wait_until(Duration::from_secs(90), "a certificate again", || {
        cert_status(dir)
            .is_some_and(|c| c["level"] == 100 && c["conditions"][0]["status"] == "True")
    });
    let last = cert_status(dir).expect("status");
    let _ = operator.0.kill();
    let _ = operator.0.wait();
    let expires = field(&last, "notAfterMs");
    wait_until(Duration::from_secs(20), "the expiry", || {
        now_ms() > expires + 100
    });
    let (code, text) = verify(dir, &peer, &issuer);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("refused: the certificate expired at") && text.contains("(Expired)"),
        "{text}"
    );

    // 7. The boot changed while the terminal was off (PCR 7 extended, as a
    // different boot chain would): the next audit's quote is genuine but
    // does not match the baseline, and no certificate is issued.
    drop(agent_process);
    tenet_agent::tpm::TpmIdentity::open(&tpm.tcti())
        .expect("TPM")
        .extend_pcr(7, [0x77; 32])
        .expect("extend PCR 7");
    let _operator = start_operator(dir, port, &lines, &tpm.manufacturer_ca());
    agent_process = start_agent(dir);
    let failed_on_pcr = || {
        cert_status(dir).is_some_and(|c| {
            c["audit"]
                .as_str()
                .is_some_and(|a| a.starts_with("failed: PCR 7 is "))
                && c["conditions"][0]["reason"] == "Withheld"
        })
    };
    let started = std::time::Instant::now();
    while !failed_on_pcr() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the audit did not fail on PCR 7: {:?}\noperator: {}\nagent: {}",
            cert_status(dir),
            std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = cert_status(dir).expect("status");
    assert!(
        c["conditions"][0]["message"].as_str().is_some_and(|m| m
            .starts_with("the audit failed: PCR 7 is ")
            && m.contains(", expected ")),
        "{c}"
    );
    wait_until(
        Duration::from_secs(10),
        "the agent to stop presenting",
        || verify(dir, &peer, &issuer).1.contains("(NoCertificate)"),
    );
    drop(agent_process);
}

fn start_operator(
    dir: &Path,
    port: u16,
    lines: &Arc<Mutex<Vec<String>>>,
    tpm_ca: &[std::path::PathBuf],
) -> Running {
    let mut operator = Command::new(binary("tenet"))
        .args([
            "operator",
            "--policies",
            "policies",
            "--data",
            "data",
            "--admin-key",
            "admin.pub",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--metrics", "127.0.0.1:0"])
        .args(
            tpm_ca
                .iter()
                .flat_map(|p| [std::ffi::OsStr::new("--tpm-ca"), p.as_os_str()]),
        )
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("operator.log"))
                .expect("log"),
        )
        .spawn()
        .expect("operator");
    let stdout = operator.stdout.take().expect("stdout");
    let lines = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            lines.lock().expect("lines").push(l);
        }
    });
    let mut running = Running(operator);
    let started = std::time::Instant::now();
    while !(dir.join("data/dispatch.key.pub").exists()
        && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    {
        let exited = running.0.try_wait().ok().flatten();
        assert!(
            exited.is_none() && started.elapsed() < Duration::from_secs(60),
            "the operator's gateway is not up ({exited:?}): {}",
            std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

/// Write the agent's configuration (its keys in `tpm`, the operator on
/// `port`, `extra` YAML lines) and enrol it with a token bound to TERMINAL.
fn enrol_agent(dir: &Path, tpm: &Swtpm, port: u16, extra: &str) {
    std::fs::write(
        dir.join("agent.yaml"),
        format!(
            "terminal: {TERMINAL}\ndata: agent-data\nlabels: {{ site: nagoya }}\ninventory: {{ file: inventory.yaml }}\nidentity:\n  tpm: {{ tcti: \"{}\" }}\noperator: {{ address: \"127.0.0.1:{port}\" }}\ninventoryIntervalSeconds: 1\n{extra}",
            tpm.tcti()
        ),
    )
    .expect("agent config");
    // Admins assign it to the Nagoya site, which the policies select.
    let (token, fingerprint) =
        create_token(dir, &["--terminal", TERMINAL, "--label", "site=nagoya"]);
    let out = agent(
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
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_agent(dir: &Path) -> Running {
    Running(
        Command::new(binary("tenet-agent"))
            .args(["run", "--config", "agent.yaml"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("agent.log"))
                    .expect("log"),
            )
            .spawn()
            .expect("agent"),
    )
}

trait CloneKey {
    fn clone_key(&self) -> KeyPair;
}

impl CloneKey for KeyPair {
    fn clone_key(&self) -> KeyPair {
        KeyPair::from_pkcs8_pem(&self.to_pkcs8_pem().expect("pem")).expect("key")
    }
}

/// A TPM that cannot prove itself counts as none: the operator trusts
/// another manufacturer than the one that certified this TPM's EK, so the
/// terminal's TPM is only claimed, its quotes count for nothing, and its
/// level is capped at 60 although every policy is met.
#[test]
fn an_unproven_tpm_is_capped_as_if_there_were_none() {
    let Some(tpm) = Swtpm::start() else { return };
    let Some(other) = Swtpm::start() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    std::fs::write(dir.join("admin.pub"), admin.public_key().to_pem()).expect("pub");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    std::fs::write(
        dir.join("policies/posture.yaml"),
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: { name: antivirus, namespace: it }\nspec:\n  selector: { matchLabels: { site: nagoya } }\n  requirements:\n    - service: { name: clamav-daemon, state: running }\n  certificate: { validity: 1h, renewBefore: 15m, minimumLevel: 50 }\n",
    )
    .expect("policy");
    sign_policies(&dir.join("policies"), &dir.join("admin.key"));
    std::fs::write(dir.join("inventory.yaml"), inventory("120.0-1", "running")).expect("inv");
    let port = free_port();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let _operator = start_operator(dir, port, &lines, &other.manufacturer_ca());
    enrol_agent(dir, &tpm, port, "");
    let _agent = start_agent(dir);
    wait_until(Duration::from_secs(30), "a certificate", || {
        cert_status(dir).is_some_and(|c| c["level"].is_u64())
    });
    let c = cert_status(dir).expect("status");
    assert_eq!(c["level"], 60, "{c}");
    assert_eq!(c["audit"], "passed (Claimed)", "{c}");
    let t = terminal_status(dir).expect("status");
    assert!(
        t["tpm"].as_str().is_some_and(|s| s.starts_with(
            "claimed: the EK certificate does not chain to a configured TPM manufacturer root"
        )),
        "{t}"
    );
}

//! The identity key in a TPM: swtpm started by the test, the agent signing
//! its reports with a key that never leaves the TPM.

mod common;

use common::*;
use tenet_protocol::report::Outcome;
use tenet_protocol::{Algorithm, Signer};

#[test]
fn reports_are_signed_by_a_tpm_held_key() {
    let Some(tpm) = Swtpm::start() else { return };
    let t = Terminal::build(
        "nagoya-ward3-01",
        &format!("identity:\n  tpm: {{ tcti: \"{}\" }}\n", tpm.tcti()),
    );
    let identity = t.identity();
    assert_eq!(identity.algorithm(), Algorithm::EcdsaP256);
    // No private key on disk.
    assert!(!t.data.join("identity.key").exists());

    // The same key on every start, and a loud warning that this TPM is software.
    let again = t.pin();
    let stdout = String::from_utf8_lossy(&again.stdout);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stdout.contains(&identity.fingerprint().to_string()),
        "{stdout}"
    );
    assert!(
        stderr.contains("WARNING: the TPM at") && stderr.contains("software TPM"),
        "{stderr}"
    );

    let noop = std::fs::read_to_string(payloads().join("noop.wat")).expect("noop");
    let (bundle, digest) = t.bundle(&noop, &[], &[]);
    let env = t.envelope(digest, 1, &[], &[]);
    let bytes = t.sign(&env);
    let (_, report) = t.dispatch(&bytes, &bundle);
    let verified = t
        .verify(&report, &env, &bytes)
        .expect("the TPM-signed report verifies");
    assert_eq!(verified.outcome, Outcome::Exited { code: 0 });

    // A report signed by any other key does not pass as this terminal's.
    let other = tenet_protocol::KeyPair::generate(Algorithm::EcdsaP256).expect("key");
    let forged = tenet_protocol::SignedMessage::signed(&verified, &other)
        .expect("sign")
        .encode();
    assert!(t.verify(&forged, &env, &bytes).is_err());
    let _ = other.public_key();
}

#[test]
fn an_unreachable_tpm_is_a_clear_error() {
    if !have_dpkg() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("agent.yaml"),
        "terminal: t\ndata: data\ninventory:\n  file: inv.yaml\nidentity:\n  tpm: { tcti: \"swtpm:host=127.0.0.1,port=1\" }\n",
    )
    .expect("config");
    std::fs::write(
        dir.path().join("k.pub"),
        tenet_protocol::KeyPair::generate(Algorithm::Ed25519)
            .expect("k")
            .public_key()
            .to_pem(),
    )
    .expect("pub");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenet-agent"))
        .args([
            "pin",
            "--config",
            "agent.yaml",
            "--dispatch-key",
            "k.pub",
            "--admin-key",
            "k.pub",
        ])
        .current_dir(dir.path())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().any(|l| l.starts_with(
            "tenet-agent: TPM TCTI \"swtpm:host=127.0.0.1,port=1\": cannot open the TPM"
        )),
        "{err}"
    );
}

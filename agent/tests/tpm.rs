//! The identity key in a TPM: swtpm started by the test, the agent signing
//! its reports with a key that never leaves the TPM.

mod common;

use common::*;
use tenet_protocol::report::Outcome;
use tenet_protocol::{Algorithm, Signer};
use tenet_test_support::Swtpm;

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
        stderr.contains("WARN")
            && stderr.contains("a software TPM: the identity key is NOT protected by hardware"),
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

#[test]
fn quotes_from_swtpm_verify_and_bad_ones_are_refused() {
    use tenet_protocol::audit::{QuoteError, verify_quote};
    let Some(tpm) = Swtpm::start() else { return };
    let t = tenet_agent::tpm::TpmIdentity::open(&tpm.tcti()).expect("TPM");
    let ak = t.attestation_key().expect("attestation key");
    assert_eq!(ak.algorithm(), Algorithm::EcdsaP256);
    // A restricted key is not the identity key, and is the same on every start.
    assert_ne!(ak, t.public_key());
    let pcrs: Vec<u8> = (0..8).collect();
    let nonce = [0x5a; 32];
    let baseline = t.read_pcrs(&pcrs).expect("PCRs");
    let q = t.quote(&nonce, &pcrs).expect("quote");
    verify_quote(&q, &ak, &nonce, Some(&baseline)).expect("a genuine quote verifies");

    // The issuer sent another nonce: this quote is a replay.
    assert_eq!(
        verify_quote(&q, &ak, &[0x5b; 32], Some(&baseline)),
        Err(QuoteError::WrongNonce)
    );
    // The agent lies about a PCR value.
    let mut lying = q.clone();
    lying.pcrs[0].sha256[0] ^= 1;
    assert_eq!(
        verify_quote(&lying, &ak, &nonce, Some(&baseline)),
        Err(QuoteError::PcrDigestMismatch)
    );
    // Signed by the identity key (unrestricted: it could sign anything that
    // looks like a quote), not the attestation key.
    let forged = tenet_protocol::audit::Quote {
        signature: t.sign(&q.attest).expect("sign"),
        ..q.clone()
    };
    assert_eq!(
        verify_quote(&forged, &ak, &nonce, None),
        Err(QuoteError::BadSignature)
    );
    // The boot changed: PCR 7 extended. The new quote is genuine, but it
    // does not match the baseline.
    t.extend_pcr(7, [0x77; 32]).expect("extend");
    let q2 = t.quote(&nonce, &pcrs).expect("quote");
    let err = verify_quote(&q2, &ak, &nonce, Some(&baseline)).expect_err("PCR 7 changed");
    assert_eq!(err.reason(), "PcrChanged");
    assert!(err.to_string().starts_with("PCR 7 is "), "{err}");
    drop(t);
    let again = tenet_agent::tpm::TpmIdentity::open(&tpm.tcti()).expect("TPM");
    assert_eq!(again.attestation_key().expect("ak"), ak);
}

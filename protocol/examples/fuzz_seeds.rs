//! Writes genuine signed messages as seed inputs for the fuzz targets:
//! `cargo run -p tenet-protocol --example fuzz_seeds -- fuzz/corpus`.

use std::path::PathBuf;

use tenet_protocol::bundle::{Artifact, Capability, Manifest, PayloadBundle};
use tenet_protocol::certificate::SecurityCertificate;
use tenet_protocol::enrol::EnrolmentRequest;
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::inventory::{Inventory, InventoryReport, Package, PackageManager};
use tenet_protocol::report::{ExecutionReport, Outcome};
use tenet_protocol::wire::{encode, sha256};
use tenet_protocol::{Algorithm, KeyPair, SignedMessage, Signer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let key = KeyPair::from_seed(Algorithm::Ed25519, [3; 32]).ok_or("key")?;
    let tkey = KeyPair::from_seed(Algorithm::EcdsaP256, [4; 32]).ok_or("key")?;
    let data = b"artifact".to_vec();
    let bundle = PayloadBundle {
        manifest: Manifest {
            name: "noop".into(),
            version: "1".into(),
            description: String::new(),
            capabilities: vec![Capability::Log],
            created_ms: 1,
            expires_ms: u64::MAX,
        },
        module: b"\0asm\x01\0\0\0".to_vec(),
        artifacts: vec![Artifact {
            name: "a.deb".into(),
            sha256: sha256(&data),
            size: 8,
            data,
        }],
    };
    let env = DispatchEnvelope {
        terminal: "t".into(),
        policy: "ns/p".into(),
        policy_generation: 1,
        payload_digest: [7; 32],
        nonce: [9; 32],
        issued_at_ms: 1,
        deadline_ms: u64::MAX,
        sequence: 1,
        args: vec!["x".into()],
        capabilities: vec![Capability::Log],
        write_paths: vec!["/tmp".into()],
        approval: Vec::new(),
    };
    let inv = Inventory {
        terminal: "t".into(),
        packages: vec![Package {
            name: "a".into(),
            version: "1.0".into(),
            manager: PackageManager::Dpkg,
            state: Default::default(),
            problems: Vec::new(),
        }],
        ..Inventory::default()
    };
    let report = ExecutionReport {
        terminal: "t".into(),
        envelope_digest: [1; 32],
        nonce: [9; 32],
        payload_digest: [7; 32],
        outcome: Outcome::Exited { code: 0 },
        output_tail: b"ok".to_vec(),
        observed: Some(inv.clone()),
        started_at_ms: 1,
        finished_at_ms: 2,
    };
    let cert = SecurityCertificate {
        version: 1,
        serial: [1; 16],
        issuer: "i".into(),
        issuer_key: key.public_key().fingerprint(),
        not_before_ms: 1,
        not_after_ms: u64::MAX,
        subject: "t".into(),
        subject_key: tkey.public_key(),
        level: 80,
    };
    let enrol = EnrolmentRequest {
        token: "tok".into(),
        terminal: "t".into(),
        labels: [("site".to_string(), "nagoya".to_string())].into(),
        identity: tkey.public_key(),
        tpm: true,
        attestation_key: None,
        ek_certificate: None,
        tls_csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n"
            .into(),
        requested_at_ms: 1,
    };
    let inv_report = InventoryReport {
        terminal: "t".into(),
        sequence: 1,
        collected_at_ms: 1,
        inventory: inv,
    };
    let seeds: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "bundle",
            vec![
                SignedMessage::signed(&bundle, &key)?.encode(),
                encode(&bundle),
            ],
        ),
        (
            "envelope",
            vec![SignedMessage::signed(&env, &key)?.encode(), encode(&env)],
        ),
        (
            "report",
            vec![
                SignedMessage::signed(&report, &tkey)?.encode(),
                encode(&report),
            ],
        ),
        (
            "certificate",
            vec![SignedMessage::signed(&cert, &key)?.encode(), encode(&cert)],
        ),
        (
            "enrolment",
            vec![
                SignedMessage::signed(&enrol, &tkey)?.encode(),
                encode(&enrol),
                encode(&inv_report),
            ],
        ),
        (
            "frame",
            vec![
                SignedMessage::signed(&env, &key)?.encode(),
                SignedMessage::signed(&report, &tkey)?.encode(),
            ],
        ),
    ];
    for (target, inputs) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (i, bytes) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), bytes)?;
        }
    }
    println!("seeds written under {}", root.display());
    Ok(())
}

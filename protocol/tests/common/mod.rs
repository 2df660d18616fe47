//! Fixtures: keys, a bundle, an envelope and its report, all real and signed.
#![allow(dead_code)]

use tenet_protocol::bundle::{Artifact, Capability, Manifest, PayloadBundle};
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::report::{DispatchRecord, ExecutionReport, Outcome, nonce_commitment};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Algorithm, KeyPair, Signer};

pub const NOW: u64 = 1_790_000_000_000;

pub fn key(seed: u8) -> KeyPair {
    KeyPair::from_seed(Algorithm::Ed25519, [seed; 32]).expect("seed key")
}

pub fn p256_key(seed: u8) -> KeyPair {
    KeyPair::from_seed(Algorithm::EcdsaP256, [seed; 32]).expect("seed key")
}

pub struct Fixture {
    pub admin: KeyPair,
    pub admin2: KeyPair,
    pub operator: KeyPair,
    pub terminal: KeyPair,
    pub stranger: KeyPair,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture {
            admin: key(1),
            admin2: key(2),
            operator: key(3),
            terminal: p256_key(4),
            stranger: key(5),
        }
    }
}

pub fn bundle() -> PayloadBundle {
    let data = b"Package: browser-a\nVersion: 120.0-1\n".to_vec();
    PayloadBundle {
        manifest: Manifest {
            name: "install-browser-a".into(),
            version: "1.0.0".into(),
            description: "installs browser-a 120".into(),
            capabilities: vec![Capability::RunArtifact, Capability::Log],
            created_ms: NOW - 1000,
            expires_ms: NOW + 86_400_000,
        },
        module: b"\0asm\x01\0\0\0".to_vec(),
        artifacts: vec![Artifact {
            name: "browser-a_120.0-1_amd64.deb".into(),
            sha256: sha256(&data),
            size: data.len() as u64,
            data,
        }],
    }
}

pub fn envelope(payload_digest: [u8; 32], sequence: u64) -> DispatchEnvelope {
    DispatchEnvelope {
        terminal: "nagoya-ward3-01".into(),
        policy: "hospital-it/browser-a-minimum".into(),
        policy_generation: 3,
        payload_digest,
        nonce: [sequence as u8 ^ 0x5a; 32],
        issued_at_ms: NOW,
        deadline_ms: NOW + 600_000,
        sequence,
        args: vec!["browser-a_120.0-1_amd64.deb".into()],
        capabilities: vec![Capability::RunArtifact, Capability::Log],
        write_paths: vec![],
        approval: Vec::new(),
    }
}

pub fn report(env: &DispatchEnvelope, envelope_digest: [u8; 32]) -> ExecutionReport {
    ExecutionReport {
        terminal: env.terminal.clone(),
        envelope_digest,
        nonce: env.nonce,
        payload_digest: env.payload_digest,
        outcome: Outcome::Exited { code: 0 },
        output_tail: b"Setting up browser-a (120.0-1) ...\n".to_vec(),
        observed: None,
        started_at_ms: NOW + 10,
        finished_at_ms: NOW + 900,
    }
}

pub fn record(env: &DispatchEnvelope, envelope_digest: [u8; 32]) -> DispatchRecord {
    DispatchRecord {
        terminal: env.terminal.clone(),
        envelope_digest,
        nonce_commitment: nonce_commitment(&env.nonce),
        payload_digest: env.payload_digest,
        deadline_ms: env.deadline_ms,
        consumed: false,
    }
}

pub fn signer_fp(k: &KeyPair) -> tenet_protocol::Fingerprint {
    k.public_key().fingerprint()
}

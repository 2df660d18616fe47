//! The operator's cryptographic work per dispatch: sign an envelope, verify
//! the report that comes back; against raw ed25519-dalek sign + verify of
//! messages of the same sizes, measured in the same run. Target: within
//! 1.5x. Also batch verification of many reports.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tenet_protocol::bundle::Capability;
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::keys::random_bytes;
use tenet_protocol::report::{
    DispatchRecord, ExecutionReport, Outcome, nonce_commitment, verify_report, verify_reports_batch,
};
use tenet_protocol::{Algorithm, KeyPair, Kind, PublicKey, SignedMessage, Signer};

const NOW: u64 = 1_790_000_000_000;

fn envelope(nonce: [u8; 32], sequence: u64) -> DispatchEnvelope {
    DispatchEnvelope {
        terminal: format!("nagoya-ward3-{sequence:05}"),
        policy: "hospital-it/browser-a-minimum".into(),
        policy_generation: 3,
        payload_digest: [7; 32],
        nonce,
        issued_at_ms: NOW,
        deadline_ms: NOW + 600_000,
        sequence,
        args: vec!["browser-a_120.0-1_amd64.deb".into()],
        capabilities: vec![Capability::RunArtifact, Capability::Log],
        write_paths: vec![],
        approval: Vec::new(),
    }
}

fn report(env: &DispatchEnvelope, digest: [u8; 32]) -> ExecutionReport {
    ExecutionReport {
        terminal: env.terminal.clone(),
        envelope_digest: digest,
        nonce: env.nonce,
        payload_digest: env.payload_digest,
        outcome: Outcome::Exited { code: 0 },
        output_tail: b"Setting up browser-a (120.0-1) ...\n".to_vec(),
        observed: None,
        started_at_ms: NOW + 10,
        finished_at_ms: NOW + 900,
    }
}

fn record(env: &DispatchEnvelope, digest: [u8; 32]) -> DispatchRecord {
    DispatchRecord {
        terminal: env.terminal.clone(),
        envelope_digest: digest,
        nonce_commitment: nonce_commitment(&env.nonce),
        payload_digest: env.payload_digest,
        deadline_ms: env.deadline_ms,
        consumed: false,
    }
}

fn bench(c: &mut Criterion) {
    let operator = KeyPair::from_seed(Algorithm::Ed25519, [3; 32]).expect("key");
    let terminal = KeyPair::from_seed(Algorithm::Ed25519, [4; 32]).expect("key");
    let terminal_pub = terminal.public_key();

    let env = envelope([9; 32], 1);
    let env_frame = SignedMessage::signed(&env, &operator).expect("sign");
    let digest = env_frame.body_digest();
    let rep_bytes = SignedMessage::signed(&report(&env, digest), &terminal)
        .expect("sign")
        .encode();
    let rec = record(&env, digest);

    // Raw: the same byte counts, signed and verified with ed25519-dalek alone.
    let env_input = SignedMessage::signing_input(Kind::DispatchEnvelope, &env_frame.body);
    let rep_frame = SignedMessage::decode(&rep_bytes, Kind::ExecutionReport).expect("frame");
    let rep_input = SignedMessage::signing_input(Kind::ExecutionReport, &rep_frame.body);
    let (KeyPair::Ed25519(op_raw), KeyPair::Ed25519(term_raw)) = (&operator, &terminal) else {
        unreachable!("ed25519 keys")
    };
    let term_vk = term_raw.verifying_key();
    let rep_sig =
        ed25519_dalek::Signature::from_slice(&rep_frame.signatures[0].signature).expect("sig");

    let mut g = c.benchmark_group("per dispatch");
    g.bench_function("raw ed25519-dalek sign + verify_strict", |b| {
        b.iter(|| {
            use ed25519_dalek::Signer as _;
            let s = op_raw.sign(black_box(&env_input));
            black_box(s);
            term_vk
                .verify_strict(black_box(&rep_input), &rep_sig)
                .expect("verifies");
        })
    });
    let mut seq = 1;
    g.bench_function("tenet envelope sign + report verify", |b| {
        b.iter(|| {
            seq += 1;
            let nonce = random_bytes().expect("rng");
            let e = envelope(nonce, seq);
            let frame = SignedMessage::signed(&e, &operator).expect("sign");
            black_box(frame.encode());
            let r = verify_report(black_box(&rep_bytes), &terminal_pub, &rec, NOW + 1000)
                .expect("verifies");
            black_box(r);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("report verification");
    for n in [64usize, 1024] {
        let items: Vec<(Vec<u8>, DispatchRecord)> = (0..n as u64)
            .map(|i| {
                let e = envelope([i as u8; 32], i + 1);
                let d = [i as u8 ^ 0x33; 32];
                let bytes = SignedMessage::signed(&report(&e, d), &terminal)
                    .expect("sign")
                    .encode();
                (bytes, record(&e, d))
            })
            .collect();
        let refs: Vec<(&[u8], &PublicKey, &DispatchRecord)> = items
            .iter()
            .map(|(b, r)| (b.as_slice(), &terminal_pub, r))
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("one by one", n), &refs, |b, refs| {
            b.iter(|| {
                for (bytes, key, rec) in refs {
                    black_box(verify_report(bytes, key, rec, NOW + 1000).expect("ok"));
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("batch", n), &refs, |b, refs| {
            b.iter(|| {
                let results = verify_reports_batch(refs, NOW + 1000);
                assert!(results.iter().all(Result::is_ok));
                black_box(results)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

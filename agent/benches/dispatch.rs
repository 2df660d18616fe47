//! Per-dispatch overhead on the terminal for a no-op payload: verify the
//! envelope, record it, start a loader process, verify everything again
//! there, compile and instantiate the module, run it, collect the
//! inventory, sign the report and queue it. Target: at most 20 ms.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tenet_agent::store::LocalState;
use tenet_protocol::bundle::{Manifest, PayloadBundle};
use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::envelope::DispatchEnvelope;
use tenet_protocol::report::Outcome;
use tenet_protocol::{Algorithm, KeyPair, SignedMessage, Signer};

use tenet_protocol::host::now_ms;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("inventory.yaml"),
        "terminal: bench-01\npackages:\n  - { name: browser-a, version: 120.0-1 }\n",
    )
    .expect("inv");
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        "terminal: bench-01\ndata: data\ninventory:\n  file: inventory.yaml\n",
    )
    .expect("config");
    let store = LocalState::open(&dir.path().join("data")).expect("store");
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let operator = KeyPair::generate(Algorithm::Ed25519).expect("key");
    store
        .set_trust(&TrustAnchors {
            version: 1,
            admin_keys: vec![admin.public_key()],
            admin_threshold: 1,
            dispatch_key: operator.public_key(),
            issuer_key: operator.public_key(),
        })
        .expect("trust");
    let identity = store.file_identity().expect("identity");
    let module = wat::parse_file(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/payloads/noop.wat"),
    )
    .expect("noop");
    let bundle = PayloadBundle {
        manifest: Manifest {
            name: "noop".into(),
            version: "1".into(),
            description: String::new(),
            capabilities: vec![],
            created_ms: now_ms(),
            expires_ms: now_ms() + 86_400_000,
        },
        module,
        artifacts: vec![],
    };
    let frame = SignedMessage::signed(&bundle, &admin).expect("sign");
    let (bundle_bytes, digest) = (frame.encode(), frame.body_digest());
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_tenet-agent"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut sequence = 0;
    let mut group = c.benchmark_group("agent");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("dispatch a no-op payload through a loader process", |b| {
        b.iter(|| {
            sequence += 1;
            let mut env = DispatchEnvelope {
                terminal: "bench-01".into(),
                policy: "bench/noop".into(),
                policy_generation: 1,
                payload_digest: digest,
                nonce: [sequence as u8; 32],
                issued_at_ms: now_ms(),
                deadline_ms: now_ms() + 60_000,
                sequence,
                args: vec![],
                capabilities: vec![],
                write_paths: vec![],
                approval: Vec::new(),
            };
            tenet_test_support::approve(&mut env, &[&admin]);
            let env_bytes = SignedMessage::signed(&env, &operator)
                .expect("sign")
                .encode();
            let done = runtime
                .block_on(tenet_agent::dispatch::dispatch(
                    &exe,
                    &config,
                    &store,
                    &identity,
                    "bench-01",
                    &env_bytes,
                    &bundle_bytes,
                    now_ms(),
                ))
                .expect("dispatch");
            assert_eq!(done.outcome, Outcome::Exited { code: 0 });
            let _ = std::fs::remove_file(&done.queued);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

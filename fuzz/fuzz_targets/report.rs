//! Report decoding and verification: nothing random verifies, nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tenet_protocol::report::{DispatchRecord, ExecutionReport, verify_report};
use tenet_protocol::wire::{decode, encode};
use tenet_protocol::{Algorithm, KeyPair, Message, Signer};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode::<ExecutionReport>(data) {
        assert_eq!(encode(&r), data);
        let _ = r.check();
    }
    let key = KeyPair::from_seed(Algorithm::EcdsaP256, [0x78; 32]).expect("key");
    let record = DispatchRecord {
        terminal: "t".into(),
        envelope_digest: [1; 32],
        nonce_commitment: [2; 32],
        payload_digest: [3; 32],
        deadline_ms: u64::MAX,
        consumed: false,
    };
    assert!(verify_report(data, &key.public_key(), &record, 1_790_000_000_000).is_err());
});

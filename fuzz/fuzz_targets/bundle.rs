//! Bundle decoding and verification: nothing random verifies, nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tenet_protocol::bundle::{BundleTrust, PayloadBundle, verify_bundle};
use tenet_protocol::wire::{decode, encode};
use tenet_protocol::{Algorithm, KeyPair, Message, Signer};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = decode::<PayloadBundle>(data) {
        assert_eq!(encode(&b), data);
        let _ = b.check();
    }
    let key = KeyPair::from_seed(Algorithm::Ed25519, [1; 32]).expect("key");
    let trust = BundleTrust { admin_keys: vec![key.public_key()], threshold: 1 };
    assert!(verify_bundle(data, &trust, None, 1_790_000_000_000).is_err());
});

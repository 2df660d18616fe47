//! Certificate decoding and verification: nothing random verifies, nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tenet_protocol::certificate::{SecurityCertificate, verify_certificate};
use tenet_protocol::wire::{decode, encode};
use tenet_protocol::{Algorithm, KeyPair, Message, Signer};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = decode::<SecurityCertificate>(data) {
        assert_eq!(encode(&c), data);
        let _ = c.check();
    }
    let key = KeyPair::from_seed(Algorithm::Ed25519, [0x77; 32]).expect("key");
    assert!(verify_certificate(data, &key.public_key(), 1_790_000_000_000).is_err());
});

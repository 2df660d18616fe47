//! Envelope decoding and verification: nothing random verifies, nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tenet_protocol::envelope::{DispatchEnvelope, EnvelopeState};
use tenet_protocol::wire::{decode, encode};
use tenet_protocol::{Algorithm, KeyPair, Message, Signer};

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = decode::<DispatchEnvelope>(data) {
        assert_eq!(encode(&e), data);
        let _ = e.check();
    }
    let key = KeyPair::from_seed(Algorithm::Ed25519, [0x77; 32]).expect("key");
    let state = EnvelopeState::new("t");
    assert!(state.verify(data, &key.public_key(), 1_790_000_000_000).is_err());
});

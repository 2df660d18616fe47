//! The signed frame decoder, for every kind: never panics, and whatever it
//! accepts re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tenet_protocol::{Kind, SignedMessage};

fuzz_target!(|data: &[u8]| {
    for kind in Kind::ALL {
        if let Ok(frame) = SignedMessage::decode(data, kind) {
            assert_eq!(frame.encode(), data, "accepted a non-canonical frame");
        }
    }
});

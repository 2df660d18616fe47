//! Enrolment and inventory messages: decoders never panic and accept only
//! canonical bytes. An enrolment request is self-signed (proof of
//! possession), so a genuine one verifies by design: here verification must
//! only never panic, and what verifies must be canonical.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tenet_protocol::enrol::{EnrolmentRequest, EnrolmentResponse, verify_enrolment_request};
use tenet_protocol::inventory::InventoryReport;
use tenet_protocol::wire::{decode, encode};
use tenet_protocol::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode::<EnrolmentRequest>(data) {
        assert_eq!(encode(&r), data);
        let _ = r.check();
    }
    if let Ok(r) = decode::<EnrolmentResponse>(data) {
        assert_eq!(encode(&r), data);
        let _ = r.check();
    }
    if let Ok(r) = decode::<InventoryReport>(data) {
        assert_eq!(encode(&r), data);
        let _ = r.check();
    }
    if verify_enrolment_request(data).is_ok() {
        let frame = tenet_protocol::SignedMessage::decode(data, tenet_protocol::Kind::EnrolmentRequest)
            .expect("a verified request decodes");
        assert_eq!(frame.encode(), data);
    }
});

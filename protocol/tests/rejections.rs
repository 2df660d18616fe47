//! Every rejection reason, each with a really tampered or misused message.

mod common;

use common::*;
use tenet_protocol::bundle::{BundleTrust, Capability, verify_bundle};
use tenet_protocol::certificate::{SecurityCertificate, verify_certificate};
use tenet_protocol::envelope::{DispatchEnvelope, EnvelopeState, check_bundle_against_envelope};
use tenet_protocol::report::{ExecutionReport, verify_report, verify_reports_batch};
use tenet_protocol::wire::{FORMAT_VERSION, encode};
use tenet_protocol::{Kind, Rejection, SignedMessage, Signer};

fn signed_envelope(f: &Fixture, env: &DispatchEnvelope) -> Vec<u8> {
    SignedMessage::signed(env, &f.operator)
        .expect("sign")
        .encode()
}

fn state() -> EnvelopeState {
    EnvelopeState::new("nagoya-ward3-01")
}

fn reason<T: std::fmt::Debug>(r: Result<T, Rejection>) -> &'static str {
    r.expect_err("must be refused").reason()
}

#[test]
fn a_genuine_round_trip_verifies() {
    let f = Fixture::new();
    let bundle_frame = {
        let mut m = SignedMessage::new(&bundle());
        m.sign(&f.admin).expect("sign");
        m
    };
    let digest = bundle_frame.body_digest();
    let trust = BundleTrust {
        admin_keys: vec![f.admin.public_key()],
        threshold: 1,
    };
    let vb =
        verify_bundle(&bundle_frame.encode(), &trust, Some(&digest), NOW).expect("bundle verifies");
    let env = envelope(digest, 1);
    let mut st = state();
    let ve = st
        .verify(&signed_envelope(&f, &env), &f.operator.public_key(), NOW)
        .expect("envelope verifies");
    check_bundle_against_envelope(&vb.digest, &vb.bundle, &ve.envelope).expect("granted");
    st.accept(&ve);
    let rep = SignedMessage::signed(&report(&env, ve.digest), &f.terminal)
        .expect("sign")
        .encode();
    let got = verify_report(
        &rep,
        &f.terminal.public_key(),
        &record(&env, ve.digest),
        NOW + 1000,
    )
    .expect("report");
    assert!(got.outcome.succeeded());
}

#[test]
fn bad_signature() {
    let f = Fixture::new();
    let env = envelope([7; 32], 1);
    let mut frame = SignedMessage::signed(&env, &f.operator).expect("sign");
    frame.signatures[0].signature[10] ^= 1;
    assert_eq!(
        reason(state().verify(&frame.encode(), &f.operator.public_key(), NOW)),
        "BadSignature"
    );
    // A body bit flipped under an intact signature.
    let mut frame = SignedMessage::signed(&env, &f.operator).expect("sign");
    let last = frame.body.len() - 1;
    frame.body[last] ^= 0x80;
    assert_eq!(
        reason(state().verify(&frame.encode(), &f.operator.public_key(), NOW)),
        "BadSignature"
    );
}

#[test]
fn unknown_key_and_swapped_keys() {
    let f = Fixture::new();
    let env = envelope([7; 32], 1);
    let by_stranger = SignedMessage::signed(&env, &f.stranger)
        .expect("sign")
        .encode();
    let r = state().verify(&by_stranger, &f.operator.public_key(), NOW);
    assert_eq!(
        r.expect_err("refused"),
        Rejection::UnknownKey {
            key: signer_fp(&f.stranger)
        }
    );
    // The stranger's signature relabelled as the operator's: swapped keys.
    let mut frame = SignedMessage::signed(&env, &f.stranger).expect("sign");
    frame.signatures[0].key = signer_fp(&f.operator);
    assert_eq!(
        reason(state().verify(&frame.encode(), &f.operator.public_key(), NOW)),
        "BadSignature"
    );
}

#[test]
fn a_signature_for_one_kind_never_passes_as_another() {
    let f = Fixture::new();
    let env = envelope([7; 32], 1);
    let rep = report(&env, [9; 32]);
    // The terminal signs a report; an attacker relabels the frame an envelope.
    let mut frame = SignedMessage::signed(&rep, &f.operator).expect("sign");
    frame.kind = Kind::DispatchEnvelope;
    assert_eq!(
        reason(state().verify(&frame.encode(), &f.operator.public_key(), NOW)),
        "BadSignature"
    );
    // The same body and signature, unrelabelled, is the wrong kind.
    let frame = SignedMessage::signed(&rep, &f.operator).expect("sign");
    let r = state().verify(&frame.encode(), &f.operator.public_key(), NOW);
    assert_eq!(
        r.expect_err("refused"),
        Rejection::WrongKind {
            expected: Kind::DispatchEnvelope,
            found: Kind::ExecutionReport
        }
    );
}

#[test]
fn wrong_terminal() {
    let f = Fixture::new();
    let mut env = envelope([7; 32], 1);
    env.terminal = "osaka-visiting-nurse-07".into();
    let r = state().verify(&signed_envelope(&f, &env), &f.operator.public_key(), NOW);
    assert_eq!(
        r.expect_err("refused").to_string(),
        "meant for terminal \"osaka-visiting-nurse-07\", but this is \"nagoya-ward3-01\""
    );
}

#[test]
fn wrong_payload_digest() {
    let f = Fixture::new();
    let frame = SignedMessage::signed(&bundle(), &f.admin).expect("sign");
    let trust = BundleTrust {
        admin_keys: vec![f.admin.public_key()],
        threshold: 1,
    };
    assert_eq!(
        reason(verify_bundle(&frame.encode(), &trust, Some(&[0; 32]), NOW)),
        "WrongPayloadDigest"
    );
    // An envelope naming another bundle.
    let vb = verify_bundle(&frame.encode(), &trust, None, NOW).expect("verifies");
    let env = envelope([1; 32], 1);
    assert_eq!(
        reason(check_bundle_against_envelope(&vb.digest, &vb.bundle, &env)),
        "WrongPayloadDigest"
    );
    // A report about another payload.
    let env = envelope(vb.digest, 1);
    let mut rep = report(&env, [9; 32]);
    rep.payload_digest = [2; 32];
    let bytes = SignedMessage::signed(&rep, &f.terminal)
        .expect("sign")
        .encode();
    assert_eq!(
        reason(verify_report(
            &bytes,
            &f.terminal.public_key(),
            &record(&env, [9; 32]),
            NOW
        )),
        "WrongPayloadDigest"
    );
    // An artifact whose bytes do not match its digest: the admin signed a
    // broken bundle, and it is still refused.
    let mut b = bundle();
    b.artifacts[0].data[0] ^= 1;
    let bytes = SignedMessage::signed(&b, &f.admin).expect("sign").encode();
    assert_eq!(
        reason(verify_bundle(&bytes, &trust, None, NOW)),
        "WrongPayloadDigest"
    );
}

#[test]
fn nonce_mismatch() {
    let f = Fixture::new();
    let env = envelope([7; 32], 1);
    let mut rep = report(&env, [9; 32]);
    rep.nonce[0] ^= 1;
    let bytes = SignedMessage::signed(&rep, &f.terminal)
        .expect("sign")
        .encode();
    let r = verify_report(
        &bytes,
        &f.terminal.public_key(),
        &record(&env, [9; 32]),
        NOW,
    );
    assert_eq!(r.expect_err("refused"), Rejection::NonceMismatch);
}

#[test]
fn replays_are_refused() {
    let f = Fixture::new();
    let env = envelope([7; 32], 4);
    let bytes = signed_envelope(&f, &env);
    let mut st = state();
    let v = st
        .verify(&bytes, &f.operator.public_key(), NOW)
        .expect("first time");
    st.accept(&v);
    assert_eq!(
        reason(st.verify(&bytes, &f.operator.public_key(), NOW)),
        "Replay"
    );
    // A report accepted once is not accepted again.
    let rep = SignedMessage::signed(&report(&env, v.digest), &f.terminal)
        .expect("sign")
        .encode();
    let mut rec = record(&env, v.digest);
    verify_report(&rep, &f.terminal.public_key(), &rec, NOW).expect("first report");
    rec.consumed = true;
    assert_eq!(
        reason(verify_report(&rep, &f.terminal.public_key(), &rec, NOW)),
        "Replay"
    );
}

#[test]
fn rollbacks_are_refused() {
    let f = Fixture::new();
    let mut st = state();
    let v = st
        .verify(
            &signed_envelope(&f, &envelope([7; 32], 10)),
            &f.operator.public_key(),
            NOW,
        )
        .expect("ok");
    st.accept(&v);
    let r = st.verify(
        &signed_envelope(&f, &envelope([7; 32], 9)),
        &f.operator.public_key(),
        NOW,
    );
    assert_eq!(
        r.expect_err("refused"),
        Rejection::Rollback {
            what: "sequence",
            seen: 10,
            got: 9
        }
    );
    let mut older_policy = envelope([7; 32], 11);
    older_policy.policy_generation = 2;
    let r = st.verify(
        &signed_envelope(&f, &older_policy),
        &f.operator.public_key(),
        NOW,
    );
    assert_eq!(
        r.expect_err("refused"),
        Rejection::Rollback {
            what: "policy generation",
            seen: 3,
            got: 2
        }
    );
}

#[test]
fn expired_and_not_yet_valid() {
    let f = Fixture::new();
    let env = envelope([7; 32], 1);
    let bytes = signed_envelope(&f, &env);
    assert_eq!(
        state()
            .verify(&bytes, &f.operator.public_key(), env.deadline_ms + 1)
            .expect_err("frozen"),
        Rejection::Expired {
            deadline_ms: env.deadline_ms,
            now_ms: env.deadline_ms + 1
        }
    );
    assert_eq!(
        reason(state().verify(&bytes, &f.operator.public_key(), NOW - 3_600_000)),
        "NotYetValid"
    );
    let frame = SignedMessage::signed(&bundle(), &f.admin).expect("sign");
    let trust = BundleTrust {
        admin_keys: vec![f.admin.public_key()],
        threshold: 1,
    };
    assert_eq!(
        reason(verify_bundle(
            &frame.encode(),
            &trust,
            None,
            NOW + 86_400_000
        )),
        "Expired"
    );
    let rep = SignedMessage::signed(&report(&env, [9; 32]), &f.terminal)
        .expect("sign")
        .encode();
    assert_eq!(
        reason(verify_report(
            &rep,
            &f.terminal.public_key(),
            &record(&env, [9; 32]),
            env.deadline_ms + tenet_protocol::report::REPORT_GRACE_MS + 1
        )),
        "Expired"
    );
}

#[test]
fn size_limits() {
    let f = Fixture::new();
    // An endless frame is refused before it is read.
    let huge = vec![0u8; Kind::DispatchEnvelope.max_frame_bytes() + 1];
    assert_eq!(
        reason(state().verify(&huge, &f.operator.public_key(), NOW)),
        "SizeLimitExceeded"
    );
    let mut env = envelope([7; 32], 1);
    env.args = vec!["x".into(); 1000];
    let r = state().verify(&signed_envelope(&f, &env), &f.operator.public_key(), NOW);
    assert_eq!(
        r.expect_err("refused").to_string(),
        "the argument list is too large: 1000 (the limit is 64)"
    );
    let mut rep = report(&env, [9; 32]);
    rep.output_tail = vec![b'x'; 100_000];
    let bytes = SignedMessage::signed(&rep, &f.terminal)
        .expect("sign")
        .encode();
    assert_eq!(
        reason(verify_report(
            &bytes,
            &f.terminal.public_key(),
            &record(&env, [9; 32]),
            NOW
        )),
        "SizeLimitExceeded"
    );
}

#[test]
fn capability_not_granted() {
    let f = Fixture::new();
    let frame = SignedMessage::signed(&bundle(), &f.admin).expect("sign");
    let trust = BundleTrust {
        admin_keys: vec![f.admin.public_key()],
        threshold: 1,
    };
    let vb = verify_bundle(&frame.encode(), &trust, None, NOW).expect("verifies");
    let mut env = envelope(vb.digest, 1);
    env.capabilities = vec![Capability::Log];
    assert_eq!(
        check_bundle_against_envelope(&vb.digest, &vb.bundle, &env).expect_err("refused"),
        Rejection::CapabilityNotGranted("run-artifact".into())
    );
}

#[test]
fn unknown_format_version() {
    let f = Fixture::new();
    let mut bytes = signed_envelope(&f, &envelope([7; 32], 1));
    assert_eq!(bytes[0], FORMAT_VERSION as u8);
    bytes[0] = 2;
    assert_eq!(
        state()
            .verify(&bytes, &f.operator.public_key(), NOW)
            .expect_err("refused"),
        Rejection::UnknownFormatVersion {
            found: 2,
            supported: 1
        }
    );
}

#[test]
fn k_of_n_threshold() {
    let f = Fixture::new();
    let trust = BundleTrust {
        admin_keys: vec![f.admin.public_key(), f.admin2.public_key()],
        threshold: 2,
    };
    let mut frame = SignedMessage::signed(&bundle(), &f.admin).expect("sign");
    assert_eq!(
        verify_bundle(&frame.encode(), &trust, None, NOW).expect_err("one of two"),
        Rejection::ThresholdNotMet {
            valid: 1,
            required: 2
        }
    );
    // The same admin signing twice still counts once.
    frame.sign(&f.admin).expect("sign again");
    assert_eq!(
        reason(verify_bundle(&frame.encode(), &trust, None, NOW)),
        "ThresholdNotMet"
    );
    // A stranger's signature counts for nothing.
    frame.sign(&f.stranger).expect("sign");
    assert_eq!(
        reason(verify_bundle(&frame.encode(), &trust, None, NOW)),
        "ThresholdNotMet"
    );
    let digest = frame.body_digest();
    frame.sign(&f.admin2).expect("second admin");
    assert_eq!(frame.body_digest(), digest, "signing keeps the digest");
    let vb = verify_bundle(&frame.encode(), &trust, Some(&digest), NOW).expect("two of two");
    assert_eq!(vb.signers.len(), 2);
    // Unsigned.
    let unsigned = SignedMessage::new(&bundle()).encode();
    assert_eq!(
        reason(verify_bundle(&unsigned, &trust, None, NOW)),
        "ThresholdNotMet"
    );
}

/// Flip every bit of a signed envelope, bundle and report, one at a time:
/// none of the results verifies.
#[test]
fn no_single_bit_flip_verifies() {
    let f = Fixture::new();
    let env = envelope([7; 32], 1);
    let env_bytes = signed_envelope(&f, &env);
    let bundle_bytes = SignedMessage::signed(&bundle(), &f.admin)
        .expect("sign")
        .encode();
    let env_digest = SignedMessage::decode(&env_bytes, Kind::DispatchEnvelope)
        .expect("ok")
        .body_digest();
    let rep_bytes = SignedMessage::signed(&report(&env, env_digest), &f.terminal)
        .expect("sign")
        .encode();
    let trust = BundleTrust {
        admin_keys: vec![f.admin.public_key()],
        threshold: 1,
    };
    let rec = record(&env, env_digest);
    let mut checked = 0;
    for i in 0..env_bytes.len() * 8 {
        let mut b = env_bytes.clone();
        b[i / 8] ^= 1 << (i % 8);
        assert!(
            state().verify(&b, &f.operator.public_key(), NOW).is_err(),
            "envelope bit {i}"
        );
        checked += 1;
    }
    for i in 0..bundle_bytes.len() * 8 {
        let mut b = bundle_bytes.clone();
        b[i / 8] ^= 1 << (i % 8);
        assert!(
            verify_bundle(&b, &trust, None, NOW).is_err(),
            "bundle bit {i}"
        );
        checked += 1;
    }
    for i in 0..rep_bytes.len() * 8 {
        let mut b = rep_bytes.clone();
        b[i / 8] ^= 1 << (i % 8);
        assert!(
            verify_report(&b, &f.terminal.public_key(), &rec, NOW).is_err(),
            "report bit {i}"
        );
        checked += 1;
    }
    assert!(checked > 5000, "{checked}");
}

#[test]
fn non_canonical_encodings_are_refused() {
    let f = Fixture::new();
    let bytes = signed_envelope(&f, &envelope([7; 32], 1));
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(
        state()
            .verify(&trailing, &f.operator.public_key(), NOW)
            .expect_err("refused"),
        Rejection::Malformed("1 trailing byte(s)".into())
    );
    // An overlong varint for the format (0x81 0x00 also reads as 1).
    let mut overlong = vec![0x81, 0x00];
    overlong.extend_from_slice(&bytes[1..]);
    assert_eq!(
        reason(state().verify(&overlong, &f.operator.public_key(), NOW)),
        "Malformed"
    );
}

#[test]
fn certificates_verify_and_expire() {
    let f = Fixture::new();
    let cert = SecurityCertificate {
        version: 1,
        serial: [1; 16],
        issuer: "tenet-issuer".into(),
        issuer_key: f.operator.public_key().fingerprint(),
        not_before_ms: NOW,
        not_after_ms: NOW + 3_600_000,
        subject: "nagoya-ward3-01".into(),
        subject_key: f.terminal.public_key(),
        level: 80,
    };
    let bytes = SignedMessage::signed(&cert, &f.operator)
        .expect("sign")
        .encode();
    let got = verify_certificate(&bytes, &f.operator.public_key(), NOW + 1).expect("valid");
    assert_eq!(got.level, 80);
    assert_eq!(
        reason(verify_certificate(
            &bytes,
            &f.operator.public_key(),
            NOW + 3_600_000
        )),
        "Expired"
    );
    assert_eq!(
        reason(verify_certificate(
            &bytes,
            &f.operator.public_key(),
            NOW - 1
        )),
        "NotYetValid"
    );
    assert_eq!(
        reason(verify_certificate(
            &bytes,
            &f.stranger.public_key(),
            NOW + 1
        )),
        "UnknownKey"
    );
    let mut forged = SignedMessage::decode(&bytes, Kind::SecurityCertificate).expect("frame");
    let mut c: SecurityCertificate = tenet_protocol::wire::decode(&forged.body).expect("body");
    c.level = 100;
    forged.body = encode(&c);
    assert_eq!(
        reason(verify_certificate(
            &forged.encode(),
            &f.operator.public_key(),
            NOW + 1
        )),
        "BadSignature"
    );
}

#[test]
fn batch_verification_names_the_bad_reports() {
    let f = Fixture::new();
    let terminal = common::key(9);
    let mut items = Vec::new();
    for seq in 1..=20u64 {
        let env = envelope([7; 32], seq);
        let digest = [seq as u8; 32];
        let mut rep = report(&env, digest);
        if seq == 13 {
            rep.nonce[0] ^= 1;
        }
        let mut frame = SignedMessage::signed(&rep, &terminal).expect("sign");
        if seq == 7 {
            frame.signatures[0].signature[0] ^= 1;
        }
        items.push((frame.encode(), record(&env, digest)));
    }
    let pk = terminal.public_key();
    let refs: Vec<(&[u8], &tenet_protocol::PublicKey, &_)> =
        items.iter().map(|(b, r)| (b.as_slice(), &pk, r)).collect();
    let results: Vec<Result<ExecutionReport, Rejection>> = verify_reports_batch(&refs, NOW);
    for (i, r) in results.iter().enumerate() {
        match i + 1 {
            7 => assert_eq!(r.as_ref().expect_err("bad sig").reason(), "BadSignature"),
            13 => assert_eq!(
                r.as_ref().expect_err("bad nonce"),
                &Rejection::NonceMismatch
            ),
            _ => assert!(r.is_ok(), "report {} should verify: {r:?}", i + 1),
        }
    }
    let _ = f;
}

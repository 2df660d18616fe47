use super::*;
use crate::keys::{Algorithm, KeyPair, PublicKey, Signer};

fn seeded(n: u8) -> KeyPair {
    KeyPair::from_seed(Algorithm::Ed25519, [n; 32]).expect("key")
}

fn anchors(version: u64, admins: &[&KeyPair], threshold: u8, dispatch: &KeyPair) -> TrustAnchors {
    TrustAnchors {
        version,
        admin_keys: admins.iter().map(|k| k.public_key()).collect(),
        admin_threshold: threshold,
        dispatch_key: dispatch.public_key(),
        issuer_key: dispatch.public_key(),
    }
}

fn rotation(to: &TrustAnchors, signers: &[&KeyPair]) -> Vec<u8> {
    let mut frame = SignedMessage::new(&TrustRotation {
        anchors: to.clone(),
        created_at_ms: 1_790_000_000_000,
    });
    for s in signers {
        frame.sign(*s).expect("sign");
    }
    frame.encode()
}

/// Two of three admins (a, b, c) in force at version 1; version 2 replaces
/// c by d, keeps the threshold at 2, and rotates the dispatch key.
struct Fleet {
    a: KeyPair,
    b: KeyPair,
    c: KeyPair,
    d: KeyPair,
    v1: TrustAnchors,
    v2: TrustAnchors,
}

fn fleet() -> Fleet {
    let (a, b, c, d) = (seeded(1), seeded(2), seeded(3), seeded(4));
    let (dispatch1, dispatch2) = (seeded(10), seeded(11));
    let v1 = anchors(1, &[&a, &b, &c], 2, &dispatch1);
    let v2 = anchors(2, &[&a, &b, &d], 2, &dispatch2);
    Fleet { a, b, c, d, v1, v2 }
}

#[test]
fn a_rotation_signed_by_k_old_and_k_new_admins_is_pinned() {
    let f = fleet();
    // a and b are in both sets: their two signatures are enough.
    let r = verify_rotation(&rotation(&f.v2, &[&f.a, &f.b]), &f.v1).expect("verifies");
    assert_eq!(r.anchors, f.v2);
    assert_eq!(r.old_signers.len(), 2);
    assert_eq!(r.new_signers.len(), 2);
}

#[test]
fn a_rotation_signed_by_fewer_than_k_old_admins_is_refused() {
    let f = fleet();
    // b and d: d is not an admin of version 1, so only one old key signed.
    let e = verify_rotation(&rotation(&f.v2, &[&f.b, &f.d]), &f.v1).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "not approved by the admins: the rotation to version 2 is not signed by 2 of the 3 admin key(s) of version 1: 1 valid signature(s) by trusted keys, 2 required"
    );
    assert_eq!(e.reason(), "NotApproved");
}

#[test]
fn the_dispatch_key_alone_cannot_rotate_the_admin_keys() {
    // What a compromised operator would try: name its own key as the only
    // admin, signed by the dispatch key and that key.
    let f = fleet();
    let dispatch1 = seeded(10);
    let mine = seeded(66);
    let to = anchors(2, &[&mine], 1, &dispatch1);
    let e = verify_rotation(&rotation(&to, &[&dispatch1, &mine]), &f.v1).expect_err("refused");
    assert_eq!(
        e.to_string(),
        format!(
            "not approved by the admins: the rotation to version 2 is not signed by 2 of the 3 admin key(s) of version 1: signed by key {}, which is not trusted here",
            dispatch1.public_key().fingerprint()
        )
    );
}

#[test]
fn a_rotation_to_keys_nobody_signed_with_is_refused() {
    let f = fleet();
    // a and c are old admins, but only a of the new set signed.
    let e = verify_rotation(&rotation(&f.v2, &[&f.a, &f.c]), &f.v1).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "not approved by the admins: the rotation to version 2 is not signed by 2 of its own 3 new admin key(s): 1 valid signature(s) by trusted keys, 2 required"
    );
}

#[test]
fn the_same_admin_signing_twice_counts_once() {
    let f = fleet();
    let mut frame =
        SignedMessage::decode(&rotation(&f.v2, &[&f.a]), Kind::TrustRotation).expect("ok");
    let again = frame.signatures[0].clone();
    frame.signatures.push(again);
    let e = verify_rotation(&frame.encode(), &f.v1).expect_err("refused");
    assert!(
        e.to_string()
            .ends_with("1 valid signature(s) by trusted keys, 2 required"),
        "{e}"
    );
}

#[test]
fn a_rotation_must_name_the_next_version() {
    let f = fleet();
    let mut v3 = f.v2.clone();
    v3.version = 3;
    let e = verify_rotation(&rotation(&v3, &[&f.a, &f.b]), &f.v1).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "malformed message: the rotation is to version 3, and the version in force is 1 (rotations go one version at a time)"
    );
    // Replaying version 2 once 2 is pinned: the same refusal.
    let e = verify_rotation(&rotation(&f.v2, &[&f.a, &f.b]), &f.v2).expect_err("refused");
    assert!(
        e.to_string()
            .contains("to version 2, and the version in force is 2")
    );
}

#[test]
fn a_tampered_rotation_is_refused() {
    let f = fleet();
    let mut frame =
        SignedMessage::decode(&rotation(&f.v2, &[&f.a, &f.b]), Kind::TrustRotation).expect("ok");
    // Swap the new dispatch key after the admins signed.
    let mut body: TrustRotation = frame.open().expect("ok");
    body.anchors.dispatch_key = seeded(66).public_key();
    frame.body = crate::wire::encode(&body);
    let e = verify_rotation(&frame.encode(), &f.v1).expect_err("refused");
    assert!(e.to_string().contains("does not verify"), "{e}");
}

#[test]
fn bad_anchors_are_malformed() {
    let f = fleet();
    let mut twice = f.v2.clone();
    twice.admin_keys = vec![f.a.public_key(), f.a.public_key()];
    let e = verify_rotation(&rotation(&twice, &[&f.a, &f.b]), &f.v1).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "malformed message: an admin key is named twice (each counts once)"
    );
    let mut none = f.v2.clone();
    none.admin_threshold = 0;
    let e = verify_rotation(&rotation(&none, &[&f.a, &f.b]), &f.v1).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "malformed message: admin threshold 0 of 3 keys"
    );
}

#[test]
fn a_chain_is_walked_from_what_is_pinned() {
    let f = fleet();
    let e = seeded(5);
    // Version 3: d and e only, threshold 1; signed by 2 of version 2 (a, d)
    // and by 1 of its own (d).
    let v3 = anchors(3, &[&f.d, &e], 1, &seeded(12));
    let chain = vec![rotation(&f.v2, &[&f.a, &f.b]), rotation(&v3, &[&f.a, &f.d])];
    let walked = apply_chain(&f.v1, &chain);
    assert_eq!(walked.anchors, v3);
    assert_eq!(walked.applied, 2);
    assert_eq!(walked.refused, None);
    // A terminal that already pinned version 2 skips it.
    let walked = apply_chain(&f.v2, &chain);
    assert_eq!((walked.anchors.version, walked.applied), (3, 1));
    // Nothing to do at version 3.
    let walked = apply_chain(&v3, &chain);
    assert_eq!((walked.anchors.version, walked.applied), (3, 0));
}

#[test]
fn a_bad_link_stops_the_walk_and_keeps_what_verified() {
    let f = fleet();
    let v3 = anchors(3, &[&f.d], 1, &seeded(12));
    // Version 3 signed by d alone: 1 of the 2 version 2 needs.
    let chain = vec![rotation(&f.v2, &[&f.a, &f.b]), rotation(&v3, &[&f.d])];
    let walked = apply_chain(&f.v1, &chain);
    assert_eq!(walked.anchors, f.v2);
    assert_eq!(walked.applied, 1);
    let (version, why) = walked.refused.expect("refused");
    assert_eq!(version, 3);
    assert_eq!(why.reason(), "NotApproved");
}

#[test]
fn once_rotated_the_old_keys_stop_counting() {
    // An approval by c (dropped at version 2) and a (kept) verifies under
    // version 1 and not under version 2.
    let f = fleet();
    let frame = {
        let mut m = SignedMessage::new(&TrustRotation {
            anchors: f.v1.clone(),
            created_at_ms: 0,
        });
        m.sign(&f.a).expect("ok");
        m.sign(&f.c).expect("ok");
        m
    };
    let keys = |t: &TrustAnchors| -> Vec<PublicKey> { t.admin_keys.clone() };
    assert!(frame.verify_threshold(&keys(&f.v1), 2).is_ok());
    assert_eq!(
        frame
            .verify_threshold(&keys(&f.v2), 2)
            .expect_err("refused")
            .to_string(),
        "1 valid signature(s) by trusted keys, 2 required"
    );
}

#[test]
fn a_long_chain_is_walked_past_what_is_pinned() {
    // 299 rotations, each by the one admin; the dispatch key changes each time.
    let a = seeded(1);
    let mut chain = Vec::new();
    let mut all = vec![anchors(1, &[&a], 1, &seeded(10))];
    for version in 2..=300u64 {
        let to = anchors(version, &[&a], 1, &seeded((version % 200) as u8 + 20));
        chain.push(rotation(&to, &[&a]));
        all.push(to);
    }
    // An agent at version 280 skips 279 frames and verifies the last 20.
    let walked = apply_chain(&all[279], &chain);
    assert_eq!((walked.anchors.version, walked.applied), (300, 20));
    assert_eq!(walked.refused, None);
    // From version 1, at most MAX_CHAIN in one walk; the next goes on.
    let walked = apply_chain(&all[0], &chain);
    assert_eq!(walked.applied, MAX_CHAIN);
    let walked = apply_chain(&walked.anchors, &chain);
    assert_eq!(walked.anchors.version, 300);
}

#[test]
fn a_threshold_no_frame_can_meet_is_refused() {
    let f = fleet();
    let keys: Vec<KeyPair> = (100..120).map(seeded).collect();
    let mut big = anchors(2, &keys.iter().collect::<Vec<_>>(), 17, &seeded(10));
    let e = verify_rotation(&rotation(&big, &[&f.a, &f.b]), &f.v1).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "the admin threshold is too large: 17 (the limit is 16)"
    );
    big.admin_threshold = 16;
    assert!(check_anchors(&big).is_ok());
}

#[test]
fn a_refused_link_is_named_by_the_version_it_claims() {
    let f = fleet();
    let mut v5 = f.v2.clone();
    v5.version = 5;
    let walked = apply_chain(&f.v1, &[rotation(&v5, &[&f.a, &f.b])]);
    let (version, why) = walked.refused.expect("refused");
    assert_eq!(version, 5);
    assert_eq!(why.reason(), "Malformed");
}

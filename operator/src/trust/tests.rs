use tenet_protocol::rotation::TrustRotation;
use tenet_protocol::{Algorithm, SignedMessage};

use super::*;

fn seeded(n: u8) -> KeyPair {
    KeyPair::from_seed(Algorithm::Ed25519, [n; 32]).expect("key")
}

fn rotation(to: &TrustAnchors, signers: &[&KeyPair]) -> Vec<u8> {
    let mut frame = SignedMessage::new(&TrustRotation {
        anchors: to.clone(),
        created_at_ms: 0,
    });
    for s in signers {
        frame.sign(*s).expect("sign");
    }
    frame.encode()
}

struct Setup {
    dir: tempfile::TempDir,
    a: KeyPair,
    b: KeyPair,
    v1: TrustAnchors,
    v2: TrustAnchors,
}

/// Version 1: a alone; version 2: a and b, 2 of 2, and a new dispatch key
/// kept as DATA/dispatch-2.key.
fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (seeded(1), seeded(2));
    let first = seeded(10);
    first
        .write_files(&dir.path().join("dispatch.key"))
        .expect("ok");
    let v1 = first_anchors(vec![a.public_key()], 1, first.public_key()).expect("ok");
    let second = seeded(11);
    second
        .write_files(&dir.path().join("dispatch-2.key"))
        .expect("ok");
    let v2 = TrustAnchors {
        version: 2,
        admin_keys: vec![a.public_key(), b.public_key()],
        admin_threshold: 2,
        dispatch_key: second.public_key(),
        issuer_key: second.public_key(),
    };
    Setup { dir, a, b, v1, v2 }
}

#[test]
fn without_rotations_version_1_is_in_force() {
    let s = setup();
    let chain = load_chain(s.dir.path(), s.v1.clone()).expect("ok");
    assert_eq!(chain.anchors, s.v1);
    assert!(chain.rotations.is_empty());
    assert_eq!(
        dispatch_key_in_force(s.dir.path(), &chain.anchors)
            .expect("ok")
            .public_key(),
        seeded(10).public_key()
    );
}

#[test]
fn a_verified_rotation_is_in_force_with_its_dispatch_key() {
    let s = setup();
    let frame = rotation(&s.v2, &[&s.a, &s.b]);
    std::fs::write(rotation_path(s.dir.path(), 2), &frame).expect("ok");
    let chain = load_chain(s.dir.path(), s.v1.clone()).expect("ok");
    assert_eq!(chain.anchors, s.v2);
    assert_eq!(chain.rotations, vec![frame]);
    assert_eq!(
        dispatch_key_in_force(s.dir.path(), &chain.anchors)
            .expect("ok")
            .public_key(),
        seeded(11).public_key()
    );
}

#[test]
fn a_rotation_signed_by_fewer_than_k_is_refused_at_start() {
    let s = setup();
    // b is not an admin of version 1: a's signature is missing.
    std::fs::write(rotation_path(s.dir.path(), 2), rotation(&s.v2, &[&s.b])).expect("ok");
    let e = load_chain(s.dir.path(), s.v1.clone()).expect_err("refused");
    assert_eq!(
        e,
        format!(
            "{}: not approved by the admins: the rotation to version 2 is not signed by 1 of the 1 admin key(s) of version 1: signed by key {}, which is not trusted here",
            rotation_path(s.dir.path(), 2).display(),
            s.b.public_key().fingerprint()
        )
    );
}

#[test]
fn a_gap_in_the_versions_is_refused() {
    let s = setup();
    let mut v3 = s.v2.clone();
    v3.version = 3;
    std::fs::write(rotation_path(s.dir.path(), 3), rotation(&v3, &[&s.a, &s.b])).expect("ok");
    let e = load_chain(s.dir.path(), s.v1.clone()).expect_err("refused");
    assert_eq!(
        e,
        format!(
            "{}: there is no {} before it (rotations go one version at a time)",
            rotation_path(s.dir.path(), 3).display(),
            rotation_path(s.dir.path(), 2).display()
        )
    );
}

#[test]
fn odd_rotation_file_names_are_refused() {
    for name in ["trust-02.rotation", "trust-1.rotation", "trust-x.rotation"] {
        let s = setup();
        std::fs::write(s.dir.path().join(name), b"").expect("ok");
        let e = load_chain(s.dir.path(), s.v1.clone()).expect_err("refused");
        assert!(
            e.ends_with("not a rotation file name (trust-N.rotation, N from 2, no leading zeros)"),
            "{name}: {e}"
        );
    }
}

#[test]
fn a_dispatch_key_nobody_holds_is_an_error() {
    let s = setup();
    std::fs::remove_file(s.dir.path().join("dispatch-2.key")).expect("ok");
    std::fs::write(
        rotation_path(s.dir.path(), 2),
        rotation(&s.v2, &[&s.a, &s.b]),
    )
    .expect("ok");
    let chain = load_chain(s.dir.path(), s.v1.clone()).expect("ok");
    let e = dispatch_key_in_force(s.dir.path(), &chain.anchors).expect_err("refused");
    assert!(
        e.starts_with(&format!(
            "trust version 2 names dispatch key {}, and no dispatch*.key in",
            seeded(11).public_key().fingerprint()
        )),
        "{e}"
    );
    assert!(
        e.ends_with("dispatch-2.key` before the rotation names it)"),
        "{e}"
    );
}

#[test]
fn two_keys_for_dispatch_and_issuer_are_refused() {
    let s = setup();
    let mut v2 = s.v2.clone();
    v2.issuer_key = seeded(12).public_key();
    std::fs::write(rotation_path(s.dir.path(), 2), rotation(&v2, &[&s.a, &s.b])).expect("ok");
    let e = load_chain(s.dir.path(), s.v1.clone()).expect_err("refused");
    assert!(
        e.contains("a rotation must name the same key for both"),
        "{e}"
    );
}

#[test]
fn version_1_is_recorded_and_other_flags_are_refused_later() {
    let s = setup();
    assert_eq!(recorded_first(s.dir.path()).expect("read"), None);
    check_first(s.dir.path(), &s.v1).expect("first start records it");
    assert_eq!(
        recorded_first(s.dir.path()).expect("read"),
        Some(s.v1.clone())
    );
    check_first(s.dir.path(), &s.v1).expect("the same flags again");
    // Restarted with another admin key instead of rotating.
    let other = first_anchors(vec![s.b.public_key()], 1, seeded(10).public_key()).expect("v1");
    let e = check_first(s.dir.path(), &other).expect_err("refused");
    assert_eq!(
        e,
        format!(
            "the admin keys given (--admin-key, --admin-threshold) and DATA/dispatch.key are not version 1 of the trust anchors recorded in {} (1 of 1 admin key(s): {}); agents pinned those: change admin keys by rotation (tenet trust rotate), not by the operator's flags",
            first_path(s.dir.path()).display(),
            s.a.public_key().fingerprint()
        )
    );
}

#[test]
fn the_dispatch_key_is_found_by_its_public_half() {
    let s = setup();
    std::fs::write(
        rotation_path(s.dir.path(), 2),
        rotation(&s.v2, &[&s.a, &s.b]),
    )
    .expect("write");
    let chain = load_chain(s.dir.path(), s.v1.clone()).expect("chain");
    has_dispatch_key(s.dir.path(), &chain.anchors).expect("dispatch-2.key.pub");
    std::fs::remove_file(s.dir.path().join("dispatch-2.key.pub")).expect("rm");
    assert!(has_dispatch_key(s.dir.path(), &chain.anchors).is_err());
    // The operator itself still finds the private key.
    assert_eq!(
        dispatch_key_in_force(s.dir.path(), &chain.anchors)
            .expect("key")
            .public_key(),
        seeded(11).public_key()
    );
}

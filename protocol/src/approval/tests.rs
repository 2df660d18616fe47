use super::*;
use crate::keys::{Algorithm, KeyPair, Signer};

fn statement() -> PolicyStatement {
    PolicyStatement {
        policy: "hospital-it/browser-a".into(),
        spec_digest: [7; 32],
        remediation: Some(ApprovedRemediation {
            payload_digest: [1; 32],
            args: vec!["browser-a_120.0-1_all.deb".into()],
            capabilities: vec![Capability::RunArtifact, Capability::Log],
            write_paths: vec![],
            timeout_ms: 600_000,
            windows: Vec::new(),
        }),
    }
}

fn admins(n: usize) -> Vec<KeyPair> {
    (0..n)
        .map(|_| KeyPair::generate(Algorithm::Ed25519).expect("key"))
        .collect()
}

fn keys(admins: &[KeyPair]) -> Vec<PublicKey> {
    admins.iter().map(|a| a.public_key()).collect()
}

/// An approval of `statement` signed by each of `signers`, in turn (as
/// each admin runs `tenet policy sign`).
fn approve(statement: &PolicyStatement, signers: &[&KeyPair]) -> Vec<u8> {
    let mut frame = SignedMessage::new(&PolicyApproval {
        statement: statement.clone(),
        approved_at_ms: 1_790_000_000_000,
    });
    for s in signers {
        frame.sign(*s).expect("sign");
    }
    frame.encode()
}

#[test]
fn two_of_three_admins_approve_exactly_this_statement() {
    let a = admins(3);
    let frame = approve(&statement(), &[&a[0], &a[2]]);
    let approved = verify_approval(&frame, &statement(), &keys(&a), 2).expect("approved");
    assert_eq!(
        approved.signers,
        [
            a[0].public_key().fingerprint(),
            a[2].public_key().fingerprint()
        ]
    );
}

#[test]
fn each_bad_approval_is_refused_with_its_reason() {
    let a = admins(3);
    let trusted = keys(&a);
    let refused = |frame: &[u8], expected: &PolicyStatement| {
        verify_approval(frame, expected, &trusted, 2)
            .expect_err("refused")
            .to_string()
    };
    // One admin is not two.
    assert_eq!(
        refused(&approve(&statement(), &[&a[0]]), &statement()),
        "not approved by the admins: 1 valid signature(s) by trusted keys, 2 required"
    );
    // The same key twice counts once.
    assert_eq!(
        refused(&approve(&statement(), &[&a[1], &a[1]]), &statement()),
        "not approved by the admins: 1 valid signature(s) by trusted keys, 2 required"
    );
    // Keys nobody trusts.
    let strangers = admins(2);
    let by_strangers = approve(&statement(), &[&strangers[0], &strangers[1]]);
    assert_eq!(
        refused(&by_strangers, &statement()),
        format!(
            "not approved by the admins: signed by key {}, which is not trusted here",
            strangers[0].public_key().fingerprint()
        )
    );
    // Another policy's approval, copied onto this one.
    let mut other = statement();
    other.policy = "hospital-it/antivirus".into();
    assert_eq!(
        refused(&approve(&other, &[&a[0], &a[1]]), &statement()),
        "not approved by the admins: the approval is for policy hospital-it/antivirus, not hospital-it/browser-a"
    );
    // An older version: the spec changed since, or only its args did.
    let mut older = statement();
    older.spec_digest = [6; 32];
    let mut edited = statement();
    if let Some(r) = edited.remediation.as_mut() {
        r.args = vec!["backdoor_6.6.6_all.deb".into()];
    }
    for changed in [older, edited] {
        assert_eq!(
            refused(&approve(&statement(), &[&a[0], &a[1]]), &changed),
            "not approved by the admins: the approval is for another version of this policy (it changed since it was signed)"
        );
    }
    // A signature that does not verify.
    let mut forged = SignedMessage::new(&PolicyApproval {
        statement: statement(),
        approved_at_ms: 1,
    });
    forged.sign(&a[0]).expect("sign");
    forged.sign(&a[1]).expect("sign");
    forged.signatures[1].signature[0] ^= 1;
    assert_eq!(
        refused(&forged.encode(), &statement()),
        format!(
            "not approved by the admins: the signature by key {} does not verify",
            a[1].public_key().fingerprint()
        )
    );
    // Not an approval at all.
    let garbage = refused(b"garbage", &statement());
    assert!(
        garbage.starts_with("not approved by the admins: the approval cannot be read: "),
        "{garbage}"
    );
}

#[test]
fn an_envelope_is_covered_only_by_exactly_the_approved_parameters() {
    let approved = statement().remediation.expect("remediation");
    let envelope = DispatchEnvelope {
        terminal: "ward-01".into(),
        policy: "hospital-it/browser-a".into(),
        policy_generation: 3,
        payload_digest: [1; 32],
        nonce: [9; 32],
        issued_at_ms: 1,
        deadline_ms: 2,
        sequence: 1,
        args: vec!["browser-a_120.0-1_all.deb".into()],
        capabilities: vec![Capability::RunArtifact],
        write_paths: vec![],
        approval: Vec::new(),
    };
    assert_eq!(approved.covers(&envelope), Ok(()));
    let reason = |e: DispatchEnvelope| approved.covers(&e).expect_err("refused").to_string();
    let mut backdoor = envelope.clone();
    backdoor.args = vec!["backdoor_6.6.6_all.deb".into()];
    assert_eq!(
        reason(backdoor),
        "not approved by the admins: the envelope's arguments differ from what the admins approved"
    );
    let mut wider = envelope.clone();
    wider.capabilities.push(Capability::WriteFiles);
    assert_eq!(
        reason(wider),
        "not approved by the admins: the envelope grants capability write-files, which the admins did not approve"
    );
    let mut path = envelope.clone();
    path.write_paths = vec!["/etc".into()];
    assert_eq!(
        reason(path),
        "not approved by the admins: the envelope grants write path /etc, which the admins did not approve"
    );
    let mut longer = envelope.clone();
    longer.deadline_ms = longer.issued_at_ms + 600_001;
    assert_eq!(
        reason(longer),
        "not approved by the admins: the envelope gives the payload 600001 ms, more than the approved 600000 ms"
    );
    let mut other = envelope;
    other.payload_digest = [2; 32];
    assert!(reason(other).contains("is not the approved"));
}

#[test]
fn a_terminal_runs_an_envelope_only_under_its_policys_approval() {
    let a = admins(3);
    let trusted = keys(&a);
    let envelope = |approval: Vec<u8>, policy: &str, args: &[&str]| DispatchEnvelope {
        terminal: "ward-01".into(),
        policy: policy.into(),
        policy_generation: 3,
        payload_digest: [1; 32],
        nonce: [9; 32],
        issued_at_ms: 1,
        deadline_ms: 2,
        sequence: 1,
        args: args.iter().map(|s| s.to_string()).collect(),
        capabilities: vec![Capability::RunArtifact],
        write_paths: vec![],
        approval,
    };
    let good = approve(&statement(), &[&a[0], &a[1]]);
    let ok = envelope(
        good.clone(),
        "hospital-it/browser-a",
        &["browser-a_120.0-1_all.deb"],
    );
    let approved = check_envelope(&ok, &trusted, 2).expect("approved");
    assert_eq!(approved.signers.len(), 2);
    assert_eq!(approved.approved_at_ms, 1_790_000_000_000);
    let refused = |e: DispatchEnvelope| {
        check_envelope(&e, &trusted, 2)
            .expect_err("refused")
            .to_string()
    };
    // The dispatch key alone: no approval at all.
    assert_eq!(
        refused(envelope(
            Vec::new(),
            "hospital-it/browser-a",
            &["browser-a_120.0-1_all.deb"]
        )),
        "not approved by the admins: the envelope for policy hospital-it/browser-a carries no approval by the admins"
    );
    // The approved policy's approval, with the arguments edited.
    assert_eq!(
        refused(envelope(
            good.clone(),
            "hospital-it/browser-a",
            &["backdoor_6.6.6_all.deb"]
        )),
        "not approved by the admins: the envelope's arguments differ from what the admins approved"
    );
    // Another policy's approval, lent to a policy nobody approved.
    assert_eq!(
        refused(envelope(
            good,
            "hospital-it/cleanup",
            &["browser-a_120.0-1_all.deb"]
        )),
        "not approved by the admins: the approval is for policy hospital-it/browser-a, not hospital-it/cleanup"
    );
    // Too few admins.
    assert_eq!(
        refused(envelope(
            approve(&statement(), &[&a[2]]),
            "hospital-it/browser-a",
            &["browser-a_120.0-1_all.deb"]
        )),
        "not approved by the admins: 1 valid signature(s) by trusted keys, 2 required"
    );
    // Approved as a policy that remediates nothing.
    let mut report_only = statement();
    report_only.remediation = None;
    assert_eq!(
        refused(envelope(
            approve(&report_only, &[&a[0], &a[1]]),
            "hospital-it/browser-a",
            &["browser-a_120.0-1_all.deb"]
        )),
        "not approved by the admins: the admins approved policy hospital-it/browser-a without a remediation"
    );
}

#[test]
fn a_terminal_starts_a_payload_only_inside_an_approved_window() {
    use crate::enrol::TrustAnchors;
    use crate::envelope::EnvelopeState;
    use crate::window::Window;
    let admin = &admins(1)[0];
    let dispatch = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let trust = TrustAnchors {
        version: 1,
        admin_keys: vec![admin.public_key()],
        admin_threshold: 1,
        dispatch_key: dispatch.public_key(),
        issuer_key: dispatch.public_key(),
    };
    // Tuesdays and Thursdays, 02:00 to 05:00 in Tokyo.
    let mut approved = statement();
    if let Some(r) = approved.remediation.as_mut() {
        r.windows = vec![Window {
            days: 0b0000_1010,
            start_minute: 120,
            end_minute: 300,
            time_zone: "Asia/Tokyo".into(),
        }];
    }
    // Tue 2026-12-01 03:00 and Wed 2026-12-02 12:00 in Tokyo.
    let (tuesday_night, wednesday_noon) = (1_796_061_600_000u64, 1_796_180_400_000u64);
    let signed_at = |now: u64| {
        let envelope = DispatchEnvelope {
            terminal: "ward-01".into(),
            policy: "hospital-it/browser-a".into(),
            policy_generation: 3,
            payload_digest: [1; 32],
            nonce: [9; 32],
            issued_at_ms: now,
            deadline_ms: now + 60_000,
            sequence: 1,
            args: vec!["browser-a_120.0-1_all.deb".into()],
            capabilities: vec![Capability::RunArtifact],
            write_paths: vec![],
            approval: approve(&approved, &[admin]),
        };
        SignedMessage::signed(&envelope, &dispatch)
            .expect("sign")
            .encode()
    };
    let state = EnvelopeState::new("ward-01");
    assert!(
        state
            .verify_approved(&signed_at(tuesday_night), &trust, tuesday_night)
            .is_ok()
    );
    // The operator (or whoever holds the dispatch key) sends it outside
    // the window: refused, with when the next opens.
    let e = state
        .verify_approved(&signed_at(wednesday_noon), &trust, wednesday_noon)
        .expect_err("refused");
    assert_eq!(e.reason(), "OutsideWindow");
    assert_eq!(
        e.to_string(),
        "not now: outside the maintenance windows (the next opens Thu 02:00 Asia/Tokyo)"
    );
}

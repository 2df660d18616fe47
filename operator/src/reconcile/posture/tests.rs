use super::*;
use tenet_protocol::{Algorithm, KeyPair, Signer};

const NOW: u64 = 1_800_000_000_000;

fn policy() -> CertPolicy {
    CertPolicy {
        policy: "it/cert".into(),
        validity_ms: 3_600_000,
        renew_before_ms: 900_000,
        minimum_level: 60,
        pcrs: (0..8).collect(),
        pinned: vec![],
    }
}

fn passed(at_ms: u64, attestation: AuditAttestation) -> Audit {
    Audit::Passed {
        at_ms,
        attestation,
        presentation_key: KeyPair::generate(Algorithm::Ed25519)
            .expect("key")
            .public_key(),
    }
}

fn issued(level: u8, from: u64) -> Issued {
    Issued {
        serial: [1; 16],
        level,
        not_before_ms: from,
        not_after_ms: from + 3_600_000,
        bytes: vec![],
    }
}

const ALL: &[(u32, bool)] = &[(1, true), (1, true)];
const HALF: &[(u32, bool)] = &[(1, true), (1, false)];

/// An audit report whose quote a software "attestation key" forged:
/// any PCR values, signed over the right nonce.
fn forged(ak: &KeyPair, nonce: [u8; 32]) -> AuditReport {
    let pcrs: Vec<PcrValue> = (0..8)
        .map(|index| PcrValue {
            index,
            sha256: [0x42; 32],
        })
        .collect();
    let attest = tenet_protocol::audit::marshal_quote(&nonce, &pcrs, 1);
    AuditReport {
        terminal: "ward-01".into(),
        nonce,
        audited_at_ms: NOW,
        presentation_key: ak.public_key(),
        posture: Default::default(),
        quote: Some(tenet_protocol::audit::Quote {
            signature: ak.sign(&attest).expect("sign"),
            attest,
            pcrs,
        }),
    }
}

#[test]
fn quotes_of_an_unproven_tpm_count_for_nothing() {
    let ak = KeyPair::generate(Algorithm::EcdsaP256).expect("key");
    let report = forged(&ak, [9; 32]);
    let pcrs: Vec<u8> = (0..8).collect();
    let audit = |trust: &TpmTrust| {
        let key = ak.public_key();
        let expected = Expected {
            nonce: &[9; 32],
            attestation_key: Some(&key),
            tpm: trust,
            pcrs: &pcrs,
            pinned: &[],
            baseline: None,
        };
        external_audit(&report, &expected, None)
    };
    // Had the key been proven (the old code took the enrolment's word for
    // it), the forged quote would count and its PCRs become the baseline.
    let (attestation, baseline) = audit(&TpmTrust::Proven { ek: [1; 32] }).expect("verifies");
    assert_eq!(attestation, AuditAttestation::Quoted);
    assert!(baseline.is_some());
    // Claimed, not proven: nothing of the quote is used.
    let claimed = TpmTrust::Claimed {
        reason: "no attestation key or EK certificate was sent".into(),
    };
    assert_eq!(audit(&claimed), Ok((AuditAttestation::Claimed, None)));
    assert_eq!(
        attestation_level_of(AuditAttestation::Claimed),
        Attestation::NoTpm,
        "capped as without a TPM"
    );
}

#[test]
fn pinned_pcr_values_are_checked_from_the_first_quote() {
    let ak = KeyPair::generate(Algorithm::EcdsaP256).expect("key");
    let report = forged(&ak, [9; 32]);
    let pcrs: Vec<u8> = (0..8).collect();
    let audit = |pinned: &[PcrValue]| {
        let key = ak.public_key();
        let expected = Expected {
            nonce: &[9; 32],
            attestation_key: Some(&key),
            tpm: &TpmTrust::Proven { ek: [1; 32] },
            pcrs: &pcrs,
            pinned,
            baseline: None,
        };
        external_audit(&report, &expected, None)
    };
    // The admins pinned PCR 7 to another value: the very first quote fails.
    let other = [PcrValue {
        index: 7,
        sha256: [0x07; 32],
    }];
    let refused = audit(&other).expect_err("refused");
    assert!(refused.starts_with("PCR 7 is "), "{refused}");
    // Pinned to what the terminal shows: quoted; the quote still sets
    // the baseline for the PCRs nothing pins.
    let same = [PcrValue {
        index: 7,
        sha256: [0x42; 32],
    }];
    let (attestation, baseline) = audit(&same).expect("quoted");
    assert_eq!(attestation, AuditAttestation::Quoted);
    assert_eq!(baseline.map(|b| b.len()), Some(8));
    // A pin on PCR 7 does not turn off the baseline of the others.
    let mut changed: Vec<PcrValue> = report.quote.as_ref().expect("quote").pcrs.clone();
    changed[3].sha256 = [0x33; 32];
    changed[7].sha256 = [0x77; 32];
    assert_eq!(
        expected_pcrs(&same, Some(&changed)).map(|e| e[3].sha256),
        Some([0x33; 32])
    );
    assert_eq!(
        expected_pcrs(&same, Some(&changed)).map(|e| e[7].sha256),
        Some([0x42; 32]),
        "the pin wins over the baseline"
    );
}

fn attestation_level_of(a: AuditAttestation) -> Attestation {
    attestation(&passed(NOW, a))
}

#[test]
fn first_an_audit_then_a_certificate() {
    let p = policy();
    let mut r = CertRecord::new("it/cert");
    assert_eq!(decide(&r, &p, ALL, true, NOW), Action::RequestAudit);
    // Not while the terminal is offline.
    assert_eq!(decide(&r, &p, ALL, false, NOW), Action::Nothing);
    r.audit = Audit::Requested {
        nonce: [0; 32],
        pcrs: vec![],
        pinned: vec![],
        at_ms: NOW,
    };
    assert_eq!(decide(&r, &p, ALL, true, NOW + 1_000), Action::Nothing);
    // Unanswered for too long: ask again.
    assert_eq!(
        decide(&r, &p, ALL, true, NOW + AUDIT_TIMEOUT_MS),
        Action::RequestAudit
    );
    r.audit = passed(NOW + 10, AuditAttestation::Quoted);
    assert_eq!(
        decide(&r, &p, ALL, true, NOW + 20),
        Action::Issue {
            level: 100,
            reason: IssueReason::First
        }
    );
}

#[test]
fn renewed_when_renew_before_is_reached_after_a_fresh_audit() {
    let p = policy();
    let mut r = CertRecord::new("it/cert");
    r.audit = passed(NOW - 1, AuditAttestation::Quoted);
    r.issued = Some(issued(100, NOW));
    r.decided_ms = NOW;
    // Not due yet.
    assert_eq!(decide(&r, &p, ALL, true, NOW + 2_000_000), Action::Nothing);
    // Due (45 minutes in): audit first, since the last one is older
    // than the certificate.
    let due = NOW + 2_700_000;
    r.audit = passed(NOW - 5, AuditAttestation::Quoted);
    assert_eq!(decide(&r, &p, ALL, true, due), Action::RequestAudit);
    r.audit = passed(due + 5, AuditAttestation::Quoted);
    assert_eq!(
        decide(&r, &p, ALL, true, due + 10),
        Action::Issue {
            level: 100,
            reason: IssueReason::Renewal
        }
    );
    // Expired while the terminal was away: the new one says so.
    r.decided_ms = NOW;
    r.audit = passed(NOW + 4_000_000, AuditAttestation::Quoted);
    assert_eq!(
        decide(&r, &p, ALL, true, NOW + 4_000_001),
        Action::Issue {
            level: 100,
            reason: IssueReason::Expired
        }
    );
}

#[test]
fn a_level_change_reissues_at_once_or_withholds_below_the_minimum() {
    let p = policy();
    let mut r = CertRecord::new("it/cert");
    r.audit = passed(NOW - 1, AuditAttestation::Quoted);
    r.issued = Some(issued(100, NOW));
    r.decided_ms = NOW;
    // Half compliant: 50, below the minimum 60.
    assert_eq!(
        decide(&r, &p, HALF, true, NOW + 1_000),
        Action::Withhold {
            reason: "level 50 is below the policy's minimum 60".into()
        }
    );
    let low = CertPolicy {
        minimum_level: 40,
        ..p.clone()
    };
    assert_eq!(
        decide(&r, &low, HALF, true, NOW + 1_000),
        Action::Issue {
            level: 50,
            reason: IssueReason::LevelChanged
        }
    );
    // Once withheld (and withdrawn), a rise in compliance issues again
    // on the same audit.
    let mut w = r.clone();
    w.issued = None;
    w.withheld = Some("level 50 is below the policy's minimum 60".into());
    w.retry_after_ms = NOW + AUDIT_RETRY_MS;
    assert_eq!(decide(&w, &p, HALF, true, NOW + 2_000), Action::Nothing);
    assert_eq!(
        decide(&w, &p, ALL, true, NOW + 3_000),
        Action::Issue {
            level: 100,
            reason: IssueReason::LevelChanged
        }
    );
    // Without a TPM the level is capped at 60.
    r.audit = passed(NOW - 1, AuditAttestation::Unattested);
    assert_eq!(
        decide(&r, &p, ALL, true, NOW + 1_000),
        Action::Issue {
            level: 60,
            reason: IssueReason::LevelChanged
        }
    );
}

#[test]
fn a_failed_audit_withholds_and_is_retried_later() {
    let p = policy();
    let mut r = CertRecord::new("it/cert");
    r.audit = Audit::Failed {
        at_ms: NOW,
        reason: "PCR 7 changed".into(),
    };
    assert_eq!(
        decide(&r, &p, ALL, true, NOW + 1),
        Action::Withhold {
            reason: "the audit failed: PCR 7 changed".into()
        }
    );
    // Once withheld, the next audit waits for the retry time.
    r.withheld = Some("the audit failed: PCR 7 changed".into());
    r.decided_ms = NOW + 1;
    r.retry_after_ms = NOW + AUDIT_RETRY_MS;
    assert_eq!(decide(&r, &p, ALL, true, NOW + 2), Action::Nothing);
    assert_eq!(
        decide(&r, &p, ALL, true, NOW + AUDIT_RETRY_MS),
        Action::RequestAudit
    );
    // A failed audit during a certificate's life withdraws it at once.
    let mut r = CertRecord::new("it/cert");
    r.issued = Some(issued(100, NOW));
    r.decided_ms = NOW;
    r.audit = Audit::Failed {
        at_ms: NOW + 5,
        reason: "wrong nonce".into(),
    };
    assert!(matches!(
        decide(&r, &p, ALL, true, NOW + 6),
        Action::Withhold { .. }
    ));
}

#[test]
fn conditions_read_like_cert_managers() {
    let p = policy();
    let mut r = CertRecord::new("it/cert");
    r.renew_before_ms = p.renew_before_ms;
    let ready = |r: &CertRecord, now| conditions(r, now)[0].clone();
    assert_eq!(ready(&r, NOW).reason, "AwaitingAudit");
    r.issued = Some(issued(80, NOW));
    r.audit = passed(NOW, AuditAttestation::Quoted);
    assert_eq!(ready(&r, NOW + 1).status, "True");
    r.audit = Audit::Requested {
        nonce: [0; 32],
        pcrs: vec![],
        pinned: vec![],
        at_ms: NOW + 2_700_000,
    };
    let c = conditions(&r, NOW + 2_700_001);
    assert_eq!(
        (c[1].type_.as_str(), c[1].status.as_str()),
        ("Renewing", "True")
    );
    let c = conditions(&r, NOW + 3_600_000);
    assert_eq!(
        (c[0].status.as_str(), c[0].reason.as_str()),
        ("False", "Expired")
    );
    assert_eq!(
        (c[2].type_.as_str(), c[2].status.as_str()),
        ("Expired", "True")
    );
}

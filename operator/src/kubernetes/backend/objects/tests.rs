use std::collections::BTreeMap;

use tenet_crds::remediation::RemediationPhase;
use tenet_protocol::report::{DispatchRecord, Outcome};

use super::*;
use crate::reconcile::state::Event;

#[test]
fn a_terminal_shows_its_level_only_while_its_certificate_is_valid() {
    use crate::reconcile::posture::{Audit, AuditAttestation, Issued};
    use tenet_protocol::{Algorithm, KeyPair, Signer};
    let key = KeyPair::generate(Algorithm::Ed25519)
        .expect("key")
        .public_key();
    let terminal = TerminalRecord {
        identity: key.clone(),
        labels: BTreeMap::new(),
        tpm: false,
        attestation_key: None,
        enrolled_at_ms: 1,
        last_sequence: 0,
        offline_since_ms: 0,
        client_keys: vec![[1; 32]],
        tpm_trust: crate::tpm_trust::TpmTrust::None,
        claimed_labels: BTreeMap::new(),
        agent_version: String::new(),
    };
    let mut certificate = CertRecord::new("it/posture");
    certificate.issued = Some(Issued {
        serial: [7; 16],
        level: 60,
        not_before_ms: 1_000,
        not_after_ms: 5_000,
        bytes: vec![],
    });
    certificate.audit = Audit::Passed {
        at_ms: 900,
        attestation: AuditAttestation::Unattested,
        presentation_key: key,
    };
    let status = |now_ms, inventory_ms| {
        terminal_status(
            &terminal,
            &BTreeMap::new(),
            Some(&certificate),
            inventory_ms,
            now_ms,
        )
    };
    let valid = status(4_999, Some(2_000));
    assert_eq!(valid.security_level, Some(60));
    // The newest verified report: the inventory here, the audit without one.
    assert_eq!(valid.last_report_time, Some(crate::time::rfc3339(2_000)));
    assert_eq!(
        status(4_999, None).last_report_time,
        Some(crate::time::rfc3339(900))
    );
    // Expired: no level, whatever the record still holds.
    assert_eq!(status(5_000, Some(2_000)).security_level, None);
}

fn live(consumed: bool, deadline_ms: u64) -> LiveDispatch {
    LiveDispatch {
        policy_generation: 3,
        issued_ms: 1_000,
        sequence: 7,
        record: DispatchRecord {
            terminal: "ward-01".into(),
            envelope_digest: [1; 32],
            nonce_commitment: [2; 32],
            payload_digest: [3; 32],
            deadline_ms,
            consumed,
        },
    }
}

#[test]
fn a_remediation_shows_each_phase_of_its_life_with_a_camel_case_reason() {
    let dispatched = PairState::Dispatched {
        attempt: 2,
        sequence: 7,
        deadline_ms: 5_000,
    };
    // Whether the pair converged through this remediation.
    let remediated = |pair: &PairState| {
        matches!(
            pair,
            PairState::Compliant | PairState::Drifted { attempts: 0, .. }
        )
    };
    let phase = |consumed, pair: &PairState, offline, now| {
        let s = remediation_status(
            &live(consumed, 5_000),
            Some(pair),
            remediated(pair),
            offline,
            now,
        );
        (s.phase, s.reason.unwrap_or_default())
    };
    assert_eq!(
        phase(false, &dispatched, true, 2_000),
        (RemediationPhase::Pending, "TerminalOffline".into())
    );
    assert_eq!(
        phase(false, &dispatched, false, 2_000),
        (RemediationPhase::Dispatched, "AwaitingReport".into())
    );
    assert_eq!(
        phase(false, &dispatched, false, 5_001),
        (RemediationPhase::Expired, "DeadlinePassed".into())
    );
    let verifying = PairState::Verifying {
        attempt: 2,
        since_ms: 3_000,
    };
    assert_eq!(
        phase(true, &verifying, false, 3_000),
        (RemediationPhase::Verifying, "ReportVerified".into())
    );
    assert_eq!(
        phase(true, &PairState::Compliant, false, 4_000),
        (RemediationPhase::Succeeded, "Compliant".into())
    );
    // It succeeded; the terminal drifting again later does not make it fail.
    let drifted_anew = PairState::Drifted {
        attempts: 0,
        retry_at_ms: 0,
        reason: "browser-a 118 < 120".into(),
    };
    assert_eq!(
        phase(true, &drifted_anew, false, 9_000),
        (RemediationPhase::Succeeded, "Compliant".into())
    );
    // Compliant, but not through this remediation (the policy changed
    // since, or the terminal converged another way): never Succeeded.
    let superseded = remediation_status(
        &live(true, 5_000),
        Some(&PairState::Compliant),
        false,
        false,
        4_000,
    );
    assert_eq!(superseded.phase, RemediationPhase::Failed);
    assert_eq!(superseded.reason.as_deref(), Some("Superseded"));
    assert_eq!(
        phase(true, &PairState::Unknown, false, 4_000),
        (RemediationPhase::Verifying, "ReportVerified".into())
    );
    let failed = PairState::Failed {
        attempts: 5,
        reason: "the payload exited with 2: dpkg: error".into(),
    };
    let s = remediation_status(&live(true, 5_000), Some(&failed), false, false, 4_000);
    assert_eq!(s.phase, RemediationPhase::Failed);
    assert_eq!(s.reason.as_deref(), Some("PayloadExited"));
    assert_eq!(
        s.message.as_deref(),
        Some("the payload exited with 2: dpkg: error")
    );
}

#[test]
fn every_failure_sentence_of_the_reconciler_has_its_own_reason() {
    let sentence = |outcome: Outcome| match crate::fleet::report_event(&outcome, b"") {
        Event::Failed { reason } => reason,
        other => panic!("{other:?}"),
    };
    let cases = [
        (sentence(Outcome::Exited { code: 2 }), "PayloadExited"),
        (
            sentence(Outcome::Trapped {
                message: "unreachable".into(),
            }),
            "PayloadTrapped",
        ),
        (sentence(Outcome::TimedOut), "PayloadTimedOut"),
        (
            sentence(Outcome::Refused {
                reason: "Expired".into(),
                message: "too old".into(),
            }),
            "DispatchRefused",
        ),
    ];
    for (sentence, reason) in cases {
        assert_eq!(failure_reason(&sentence), reason, "{sentence}");
    }
    // The payload succeeded but the next inventory still drifts.
    let drifted = crate::reconcile::state::next(
        &PairState::Verifying {
            attempt: 1,
            since_ms: 0,
        },
        &Event::Inventory {
            drift: Some("browser-a 118 < 120".into()),
        },
        &crate::reconcile::state::Retry::default(),
        1_000,
        0.5,
    );
    let (PairState::Drifted { reason, .. } | PairState::Failed { reason, .. }) = drifted else {
        panic!("{drifted:?}")
    };
    assert_eq!(failure_reason(&reason), "StillDrifted");
    assert_eq!(failure_reason("something new"), "AttemptFailed");
}

#[test]
fn the_typed_objects_serialize_as_their_crds_expect() {
    let r = remediation("ward-01", "it/browser", &live(false, 5_000), None, None);
    let v = serde_json::to_value(&r).expect("json");
    assert_eq!(v["apiVersion"], "tenet.dev/v1alpha1");
    assert_eq!(v["kind"], "Remediation");
    assert_eq!(v["spec"]["policyGeneration"], 3);
    assert_eq!(v["spec"]["attempt"], 1);
    assert_eq!(v["metadata"]["labels"]["tenet.dev/terminal"], "ward-01");
    assert!(v.get("status").is_none(), "status is written on its own");
    let mut record = CertRecord::new("it/posture");
    record.renew_before_ms = 900_000;
    let c = serde_json::to_value(security_certificate("ward-01", &record)).expect("json");
    assert_eq!(c["spec"]["validity"], "3600s");
    assert_eq!(c["spec"]["renewBefore"], "900s");
    let status = serde_json::to_value(security_certificate_status(&record, 0)).expect("json");
    assert_eq!(status["conditions"][0]["reason"], "AwaitingAudit");
}

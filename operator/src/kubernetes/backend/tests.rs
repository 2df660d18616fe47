use super::*;

#[test]
fn ledger_entries_round_trip_and_spread() {
    let e = entry(Table::Pairs, "ward-01\u{0}it/browser", b"\x01\x02");
    assert_eq!(
        unentry(&e),
        Some((
            Table::Pairs,
            "ward-01\u{0}it/browser".to_string(),
            vec![1, 2]
        ))
    );
    assert_eq!(unentry(&[99, 0, 0]), None);
    assert_eq!(unentry(&[3, 0, 9, b'a']), None);
    // A thousand terminals' records land in (nearly) every shard.
    let shards: BTreeSet<usize> = (0..1000)
        .map(|i| slot(Table::Dispatches, &format!("t{i}\u{0}p")).0)
        .collect();
    assert_eq!(shards.len(), SHARDS);
}

#[test]
fn a_terminal_shows_its_level_only_while_its_certificate_is_valid() {
    use crate::reconcile::certificate::{Audit, AuditAttestation, Issued};
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
        people::terminal_status(
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

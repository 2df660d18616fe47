use super::*;
use crate::store::{LiveDispatch, TokenRecord};
use tenet_protocol::report::{DispatchRecord, nonce_commitment};
use tenet_protocol::{Algorithm, KeyPair, Signer};

const NOW: u64 = 1_790_000_000_000;

struct Setup {
    _dir: tempfile::TempDir,
    fleet: OperatorFleet,
    changes: mpsc::UnboundedReceiver<Wake>,
    terminal: KeyPair,
}

fn setup() -> Setup {
    setup_with(|| NOW)
}

/// A fleet whose clock is `now`, with terminal `ward-01` enrolled.
fn setup_with(now: fn() -> u64) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(&dir.path().join("db")).expect("store"));
    store.add_token(
        "tok",
        &TokenRecord {
            terminal: None,
            expires_ms: u64::MAX,
            uses_left: 1,
            labels: BTreeMap::new(),
        },
    );
    let (fleet, changes) = OperatorFleet::new(store, Retry::default(), now, || 0.0);
    let terminal = KeyPair::generate(Algorithm::EcdsaP256).expect("key");
    let request = EnrolmentRequest {
        token: "tok".into(),
        terminal: "ward-01".into(),
        labels: BTreeMap::new(),
        identity: terminal.public_key(),
        tpm: true,
        attestation_key: None,
        ek_certificate: None,
        tls_csr_pem: String::new(),
        requested_at_ms: NOW,
    };
    assert_eq!(fleet.enrol(&request, [0; 32], TpmTrust::None), Ok(()));
    assert_eq!(
        fleet.enrol(&request, [0; 32], TpmTrust::None),
        Err("the bootstrap token was already used".into())
    );
    Setup {
        _dir: dir,
        fleet,
        changes,
        terminal,
    }
}

fn live(s: &Setup, nonce: [u8; 32]) -> DispatchRecord {
    let record = DispatchRecord {
        terminal: "ward-01".into(),
        envelope_digest: [7; 32],
        nonce_commitment: nonce_commitment(&nonce),
        payload_digest: [9; 32],
        deadline_ms: NOW + 60_000,
        consumed: false,
    };
    let pair = PairRecord {
        generation: 1,
        state: PairState::Dispatched {
            attempt: 1,
            sequence: 1,
            deadline_ms: NOW + 60_000,
        },
        updated_ms: NOW,
        remediated: false,
    };
    s.fleet.store.start_dispatch(
        "ward-01",
        "ns/browser",
        &LiveDispatch {
            policy_generation: 1,
            issued_ms: NOW,
            sequence: 1,
            record: record.clone(),
        },
        &pair,
        None,
    );
    record
}

fn report(nonce: [u8; 32], outcome: Outcome) -> ExecutionReport {
    ExecutionReport {
        terminal: "ward-01".into(),
        envelope_digest: [7; 32],
        nonce,
        payload_digest: [9; 32],
        outcome,
        output_tail: b"dpkg: error processing archive\n".to_vec(),
        observed: None,
        started_at_ms: NOW,
        finished_at_ms: NOW + 10,
    }
}

fn state(s: &Setup) -> PairState {
    s.fleet
        .store
        .pair("ward-01", "ns/browser")
        .expect("pair")
        .state
}

#[test]
fn a_verified_report_moves_the_pair_to_verifying_once() {
    let mut s = setup();
    live(&s, [1; 32]);
    let bytes = SignedMessage::signed(&report([1; 32], Outcome::Exited { code: 0 }), &s.terminal)
        .expect("sign")
        .encode();
    assert_eq!(s.fleet.report("ward-01", &bytes), Ok(()));
    assert_eq!(
        state(&s),
        PairState::Verifying {
            attempt: 1,
            since_ms: NOW
        }
    );
    assert_eq!(
        s.changes.try_recv(),
        Ok(Wake::Report {
            terminal: "ward-01".into(),
            policy: "ns/browser".into()
        })
    );
    // The same report again is a replay, and changes nothing.
    assert_eq!(
        s.fleet.report("ward-01", &bytes).map_err(|r| r.reason()),
        Err("Replay")
    );
    assert_eq!(
        state(&s),
        PairState::Verifying {
            attempt: 1,
            since_ms: NOW
        }
    );
    assert_eq!(s.fleet.refusals().get("Replay"), Some(&1));
}

#[test]
fn a_wrong_nonce_fails_the_attempt_with_the_reason() {
    let s = setup();
    live(&s, [1; 32]);
    let bytes = SignedMessage::signed(&report([2; 32], Outcome::Exited { code: 0 }), &s.terminal)
        .expect("sign")
        .encode();
    assert_eq!(
        s.fleet.report("ward-01", &bytes),
        Err(FleetError::Refused(Rejection::NonceMismatch))
    );
    match state(&s) {
        PairState::Drifted {
            attempts: 1,
            reason,
            ..
        } => assert_eq!(
            reason,
            "the report was refused: the evidence (nonce) does not match the dispatch"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.fleet.refusals().get("NonceMismatch"), Some(&1));
}

#[test]
fn a_failed_payload_fails_the_attempt_with_its_output() {
    let s = setup();
    live(&s, [1; 32]);
    let bytes = SignedMessage::signed(&report([1; 32], Outcome::Exited { code: 2 }), &s.terminal)
        .expect("sign")
        .encode();
    assert_eq!(s.fleet.report("ward-01", &bytes), Ok(()));
    assert!(
        matches!(state(&s), PairState::Drifted { attempts: 1, ref reason, .. } if reason == "the payload exited with 2: dpkg: error processing archive"),
        "{:?}",
        state(&s)
    );
}

#[test]
fn reports_and_inventories_signed_by_another_key_are_refused() {
    let s = setup();
    live(&s, [1; 32]);
    let other = KeyPair::generate(Algorithm::EcdsaP256).expect("key");
    let bytes = SignedMessage::signed(&report([1; 32], Outcome::Exited { code: 0 }), &other)
        .expect("sign")
        .encode();
    assert_eq!(
        s.fleet.report("ward-01", &bytes).map_err(|r| r.reason()),
        Err("UnknownKey")
    );
    let garbage = s.fleet.report("ward-01", b"\x01\x03garbage");
    assert_eq!(garbage.map_err(|r| r.reason()), Err("Malformed"));
    assert!(matches!(state(&s), PairState::Dispatched { .. }));
    assert_eq!(s.fleet.refusals().get("UnknownKey"), Some(&1));
}

#[test]
fn only_the_newest_inventory_is_kept() {
    let mut s = setup();
    let inv = |seq| {
        let r = InventoryReport {
            terminal: "ward-01".into(),
            sequence: seq,
            collected_at_ms: seq,
            inventory: tenet_protocol::inventory::Inventory {
                terminal: "ward-01".into(),
                ..Default::default()
            },
        };
        SignedMessage::signed(&r, &s.terminal)
            .expect("sign")
            .encode()
    };
    let (new, old) = (inv(20), inv(10));
    let _ = &new;
    assert_eq!(s.fleet.inventory("ward-01", &new), Ok(()));
    assert_eq!(s.fleet.inventory("ward-01", &old), Ok(()));
    assert_eq!(
        s.fleet.store.inventory("ward-01").map(|i| i.sequence),
        Some(20)
    );
    assert_eq!(s.changes.try_recv(), Ok(Wake::Inventory("ward-01".into())));
    assert!(
        s.changes.try_recv().is_err(),
        "the older one announces nothing"
    );
}

/// The operator's clock for the next test: it moves.
static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(NOW);

fn clock() -> u64 {
    CLOCK.load(std::sync::atomic::Ordering::SeqCst)
}

/// An inventory the agent collected after the run, arriving before the
/// run's report, shows the state after the run: once the report verifies
/// it counts as received then, so the Verifying pair takes it at once
/// instead of waiting for the agent's next routine inventory (up to ten
/// intervals).
#[test]
fn an_inventory_that_beats_its_report_counts_after_the_report() {
    use std::sync::atomic::Ordering;
    let s = setup_with(clock);
    live(&s, [1; 32]);
    // The run finished at NOW + 10 (the agent's clock); the agent's 1 s
    // inventory, collected at NOW + 500, arrives at NOW + 600.
    CLOCK.store(NOW + 600, Ordering::SeqCst);
    let inventory = SignedMessage::signed(
        &InventoryReport {
            terminal: "ward-01".into(),
            sequence: NOW + 500,
            collected_at_ms: NOW + 500,
            inventory: tenet_protocol::inventory::Inventory {
                terminal: "ward-01".into(),
                ..Default::default()
            },
        },
        &s.terminal,
    )
    .expect("sign")
    .encode();
    assert_eq!(s.fleet.inventory("ward-01", &inventory), Ok(()));
    // Its report, observing the state at NOW + 10, arrives at NOW + 900.
    CLOCK.store(NOW + 900, Ordering::SeqCst);
    let mut r = report([1; 32], Outcome::Exited { code: 0 });
    r.observed = Some(tenet_protocol::inventory::Inventory {
        terminal: "ward-01".into(),
        ..Default::default()
    });
    let bytes = SignedMessage::signed(&r, &s.terminal)
        .expect("sign")
        .encode();
    assert_eq!(s.fleet.report("ward-01", &bytes), Ok(()));
    assert_eq!(
        state(&s),
        PairState::Verifying {
            attempt: 1,
            since_ms: NOW + 900
        }
    );
    let stored = s.fleet.store.inventory("ward-01").expect("inventory");
    assert_eq!(stored.sequence, NOW + 500, "the newer one is kept");
    assert_eq!(
        stored.received_ms,
        NOW + 900,
        "and counts from the report on: the Verifying pair takes it"
    );
}

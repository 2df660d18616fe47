use std::collections::BTreeMap;

use tenet_crds::TerminalPolicy;
use tenet_protocol::bundle::Capability;
use tenet_protocol::enrol::EnrolmentRequest;
use tenet_protocol::envelope::EnvelopeState;
use tenet_protocol::inventory::{Inventory, Package, PackageManager};
use tenet_protocol::{Algorithm, KeyPair, Signer};

use super::*;
use crate::store::{StoredInventory, TokenRecord};
use tenet_protocol::report::REPORT_GRACE_MS;

const NOW: u64 = 1_790_000_000_000;

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    operator: KeyPair,
    policy: CompiledPolicy,
    bundles: HashMap<String, Bundle>,
}

fn policy(rollout: &str, digest: &str) -> CompiledPolicy {
    let yaml = format!(
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: {{ name: browser, namespace: it, generation: 2 }}\nspec:\n  selector: {{ matchLabels: {{ site: nagoya }} }}\n  requirements:\n    - package: {{ name: browser-a, version: '>= 120' }}\n  remediation:\n    payload: {{ name: install-browser-a, digest: '{digest}' }}\n    args: [browser-a.deb]\n    capabilities: [run-artifact, log]\n    timeoutSeconds: 60\n  rollout: {rollout}\n"
    );
    let p: TerminalPolicy = serde_yaml::from_str(&yaml).expect("policy");
    let mut c = crate::policy::compile(&p).expect("compiles");
    // Approved by the admin, as every policy that reaches a pass is.
    let approval = tenet_protocol::approval::PolicyApproval {
        statement: c.statement.as_ref().clone(),
        approved_at_ms: NOW - 1_000,
    };
    let frame = SignedMessage::signed(&approval, admin()).expect("sign");
    c.approval = Ok(std::sync::Arc::from(frame.encode()));
    c
}

/// The one admin of these tests.
fn admin() -> &'static KeyPair {
    static ADMIN: std::sync::OnceLock<KeyPair> = std::sync::OnceLock::new();
    ADMIN.get_or_init(|| KeyPair::generate(Algorithm::Ed25519).expect("key"))
}

fn world(terminals: &[(&str, &str)], rollout: &str) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    for (name, version) in terminals {
        let token = format!("token-{name}");
        store.add_token(
            &token,
            &TokenRecord {
                terminal: None,
                expires_ms: u64::MAX,
                uses_left: 1,
                // The policy selects the Nagoya site, which admins assign.
                labels: [("site".to_string(), "nagoya".to_string())].into(),
            },
        );
        let req = EnrolmentRequest {
            token,
            terminal: name.to_string(),
            labels: BTreeMap::new(),
            identity: KeyPair::generate(Algorithm::Ed25519)
                .expect("key")
                .public_key(),
            tpm: false,
            attestation_key: None,
            ek_certificate: None,
            tls_csr_pem: String::new(),
            requested_at_ms: NOW,
        };
        assert_eq!(
            store.enrol(&req, [0; 32], crate::tpm_trust::TpmTrust::None, NOW),
            Ok(())
        );
        set_inventory(&store, name, version, 1, NOW);
    }
    let bundle = Bundle {
        digest: [0xab; 32],
        bytes: std::sync::Arc::new(b"bundle".to_vec()),
    };
    let policy = policy(rollout, &digest_string(&bundle.digest));
    World {
        _dir: dir,
        store,
        operator: KeyPair::generate(Algorithm::Ed25519).expect("key"),
        policy,
        bundles: [("install-browser-a".to_string(), bundle)].into(),
    }
}

fn set_inventory(store: &Store, name: &str, version: &str, sequence: u64, received_ms: u64) {
    let inventory = Inventory {
        terminal: name.into(),
        labels: [("site".to_string(), "nagoya".to_string())].into(),
        packages: vec![Package {
            name: "browser-a".into(),
            version: version.into(),
            manager: PackageManager::Dpkg,
            state: Default::default(),
            problems: Vec::new(),
        }],
        ..Inventory::default()
    };
    store.put_inventory(
        name,
        StoredInventory {
            sequence,
            received_ms,
            inventory,
        },
    );
}

fn pass(w: &World, now_ms: u64, online: &dyn Fn(&str) -> bool) -> (Vec<Outgoing>, PolicyStatus) {
    let policies = [w.policy.clone()];
    let p = Pass {
        store: &w.store,
        policies: &policies,
        bundles: &w.bundles,
        dispatch_key: &w.operator,
        online,
        retry: Retry::default(),
        now_ms,
        jitter: 0.0,
        evaluations: None,
    };
    let (out, mut statuses) = p.run().expect("pass");
    (out, statuses.remove(0))
}

fn state(w: &World, terminal: &str) -> PairState {
    w.store.pair(terminal, "it/browser").expect("pair").state
}

#[test]
fn dispatches_within_the_rollout_limit_with_verifiable_envelopes() {
    let w = world(
        &[("a", "118.0-1"), ("b", "119.0-1"), ("c", "120.1-1")],
        "{ maxInFlight: 1 }",
    );
    let (out, status) = pass(&w, NOW, &|_| true);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].terminal, "a");
    assert_eq!(
        (
            status.selected,
            status.compliant,
            status.drifted,
            status.remediating,
            status.failed
        ),
        (3, 1, 1, 1, 0)
    );
    // The envelope verifies on the terminal, and the operator kept only
    // the nonce's commitment.
    let v = EnvelopeState::new("a")
        .verify(&out[0].envelope, &w.operator.public_key(), NOW)
        .expect("verifies");
    assert_eq!(v.envelope.sequence, 1);
    assert_eq!(v.envelope.policy_generation, 2);
    assert_eq!(
        v.envelope.capabilities,
        vec![Capability::RunArtifact, Capability::Log]
    );
    // It carries the admin's approval, which covers it on the terminal.
    tenet_protocol::approval::check_envelope(&v.envelope, &[admin().public_key()], 1)
        .expect("approved");
    let live = w.store.dispatch("a", "it/browser").expect("live");
    assert_eq!(
        live.record.nonce_commitment,
        nonce_commitment(&v.envelope.nonce)
    );
    assert!(matches!(
        state(&w, "a"),
        PairState::Dispatched {
            attempt: 1,
            sequence: 1,
            ..
        }
    ));
    // One in flight: nothing more until it resolves.
    let (out, _) = pass(&w, NOW + 1, &|_| true);
    assert!(out.is_empty());
}

#[test]
fn the_policys_max_attempts_decides_when_a_pair_fails() {
    let mut w = world(&[("a", "118.0-1")], "{}");
    if let Some(r) = std::sync::Arc::make_mut(&mut w.policy.spec)
        .remediation
        .as_mut()
    {
        r.max_attempts = 2;
    }
    pass(&w, NOW, &|_| true);
    // Two failed attempts, as the fleet records them (it applies the
    // operator's default limit of 5, not knowing the policy).
    let failed_twice = PairRecord {
        generation: 2,
        state: PairState::Drifted {
            attempts: 2,
            retry_at_ms: NOW + 20_000,
            reason: "the payload exited with 2".into(),
        },
        updated_ms: NOW,
        remediated: false,
    };
    w.store.set_pair("a", "it/browser", &failed_twice);
    let (out, status) = pass(&w, NOW + 30_000, &|_| true);
    assert!(out.is_empty(), "no third attempt");
    assert_eq!(status.failed, 1);
    assert_eq!(
        state(&w, "a"),
        PairState::Failed {
            attempts: 2,
            reason: "the payload exited with 2".into()
        }
    );
}

#[test]
fn offline_terminals_wait() {
    let w = world(&[("a", "118.0-1")], "{}");
    let (out, status) = pass(&w, NOW, &|_| false);
    assert!(out.is_empty());
    assert_eq!(status.drifted, 1);
    let (out, _) = pass(&w, NOW + 1, &|_| true);
    assert_eq!(out.len(), 1);
}

#[test]
fn an_expired_dispatch_is_retried_after_backoff() {
    let w = world(&[("a", "118.0-1")], "{}");
    assert_eq!(pass(&w, NOW, &|_| true).0.len(), 1);
    let late = NOW + 60_000 + REPORT_GRACE_MS + 1;
    let (out, _) = pass(&w, late, &|_| true);
    assert!(out.is_empty(), "not before the backoff");
    match state(&w, "a") {
        PairState::Drifted {
            attempts: 1,
            retry_at_ms,
            reason,
        } => {
            assert_eq!(retry_at_ms, late + 10_000);
            assert_eq!(reason, "no verified report before the deadline");
        }
        other => panic!("{other:?}"),
    }
    let (out, _) = pass(&w, late + 10_000, &|_| true);
    assert_eq!(out.len(), 1);
    let v = EnvelopeState::new("a")
        .verify(&out[0].envelope, &w.operator.public_key(), late + 10_000)
        .expect("verifies");
    assert_eq!(
        v.envelope.sequence, 2,
        "a fresh envelope, never the stale one"
    );
}

#[test]
fn verifying_converges_only_on_an_inventory_received_after_the_report() {
    let w = world(&[("a", "118.0-1")], "{}");
    pass(&w, NOW, &|_| true);
    let rec = w.store.pair("a", "it/browser").expect("pair");
    let verifying = PairRecord {
        state: PairState::Verifying {
            attempt: 1,
            since_ms: NOW + 5,
        },
        ..rec
    };
    w.store.set_pair("a", "it/browser", &verifying);
    // The old inventory (received before) changes nothing.
    pass(&w, NOW + 6, &|_| true);
    assert!(matches!(state(&w, "a"), PairState::Verifying { .. }));
    set_inventory(&w.store, "a", "120.0-1", 2, NOW + 7);
    let (_, status) = pass(&w, NOW + 8, &|_| true);
    assert_eq!(state(&w, "a"), PairState::Compliant);
    assert_eq!(status.compliant, 1);
    assert!(w.store.pair("a", "it/browser").expect("pair").remediated);
}

#[test]
fn an_undelivered_dispatch_is_reissued_fresh() {
    let w = world(&[("a", "118.0-1")], "{}");
    let (out, _) = pass(&w, NOW, &|_| true);
    undelivered(&w.store, &out[0], &Retry::default(), NOW + 1);
    assert!(matches!(
        state(&w, "a"),
        PairState::Drifted { attempts: 0, .. }
    ));
    let (out, _) = pass(&w, NOW + 2, &|_| true);
    let v = EnvelopeState::new("a")
        .verify(&out[0].envelope, &w.operator.public_key(), NOW + 2)
        .expect("verifies");
    assert_eq!(v.envelope.sequence, 2, "a fresh envelope");
    assert!(matches!(
        state(&w, "a"),
        PairState::Dispatched { attempt: 1, .. }
    ));
}

#[test]
fn a_missing_or_different_bundle_holds_the_policy() {
    let mut w = world(&[("a", "118.0-1")], "{}");
    w.bundles.clear();
    let (out, status) = pass(&w, NOW, &|_| true);
    assert!(out.is_empty());
    assert_eq!(
        status.held.as_deref(),
        Some("bundle install-browser-a is missing")
    );
    w.bundles.insert(
        "install-browser-a".into(),
        Bundle {
            digest: [1; 32],
            bytes: Default::default(),
        },
    );
    let (_, status) = pass(&w, NOW, &|_| true);
    assert!(
        status
            .held
            .as_deref()
            .is_some_and(|h| h.starts_with("bundle install-browser-a has digest sha256:0101")),
        "{status:?}"
    );
    assert!(matches!(
        state(&w, "a"),
        PairState::Drifted { attempts: 0, .. }
    ));
}

/// A terminal the policy selects no more (its claims changed, for a
/// selector that reads them) loses its pair: the pair would go on counting
/// in its security level and choosing its certificate policy.
#[test]
fn a_terminal_no_longer_selected_loses_its_pair() {
    let mut w = world(&[("a", "120.0-1"), ("b", "120.0-1")], "{}");
    let yaml = "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: { name: browser, namespace: it }\nspec:\n  selector: { expression: \"claims.labels.site == 'nagoya'\" }\n  requirements:\n    - package: { name: browser-a, version: '>= 120' }\n";
    let p: TerminalPolicy = serde_yaml::from_str(yaml).expect("policy");
    w.policy = crate::policy::compile(&p).expect("compiles");
    let (_, status) = pass(&w, NOW, &|_| true);
    assert_eq!((status.selected, status.compliant), (2, 2));
    assert_eq!(state(&w, "a"), PairState::Compliant);

    // Terminal a now says it is in Osaka.
    let mut inventory = w.store.inventory("a").expect("inventory").inventory.clone();
    inventory.labels = [("site".to_string(), "osaka".to_string())].into();
    w.store.put_inventory(
        "a",
        StoredInventory {
            sequence: 2,
            received_ms: NOW + 1,
            inventory,
        },
    );
    let (_, status) = pass(&w, NOW + 2, &|_| true);
    assert_eq!((status.selected, status.compliant), (1, 1));
    assert_eq!(w.store.pair("a", "it/browser"), None);
    assert_eq!(state(&w, "b"), PairState::Compliant);
}

#[test]
fn a_terminal_admins_relabel_is_selected_by_its_new_labels() {
    let w = world(&[("a", "120.0-1"), ("b", "120.0-1")], "{}");
    // The daemon's pass keeps its evaluations between passes.
    let cache = std::sync::Mutex::new(Evaluations::default());
    let run = |now_ms: u64| {
        let policies = [w.policy.clone()];
        let (_, mut statuses) = Pass {
            store: &w.store,
            policies: &policies,
            bundles: &w.bundles,
            dispatch_key: &w.operator,
            online: &|_| true,
            retry: Retry::default(),
            now_ms,
            jitter: 0.0,
            evaluations: Some(&cache),
        }
        .run()
        .expect("pass");
        statuses.remove(0)
    };
    let status = run(NOW);
    assert_eq!((status.selected, status.compliant), (2, 2));

    // An admin moves a to Osaka; nothing else changed (not its inventory).
    let osaka: BTreeMap<String, String> = [("site".to_string(), "osaka".to_string())].into();
    assert!(w.store.relabel("a", &osaka));
    assert!(
        !w.store.relabel("a", &osaka),
        "the same labels again change nothing"
    );
    assert!(
        !w.store.relabel("nobody", &osaka),
        "an unknown terminal is left alone"
    );
    let status = run(NOW + 1);
    assert_eq!((status.selected, status.compliant), (1, 1));
    assert_eq!(w.store.pair("a", "it/browser"), None);
    assert_eq!(w.store.assigned_labels("a"), osaka);
}

#[test]
fn remediations_start_only_inside_a_maintenance_window() {
    let mut w = world(&[("a", "118.0-1")], "{}");
    let digest = digest_string(&[0xab; 32]);
    w.policy = policy(
        "{ windows: [{ days: [Tue, Thu], start: \"02:00\", end: \"05:00\", timeZone: Asia/Tokyo }] }",
        &digest,
    );
    // Wed 2026-12-02 12:00 in Tokyo: closed; held, and status says until when.
    let (out, status) = pass(&w, 1_796_180_400_000, &|_| true);
    assert!(out.is_empty());
    assert_eq!(
        status.held.as_deref(),
        Some("waiting for a maintenance window (the next opens Thu 02:00 Asia/Tokyo)")
    );
    // Thu 2026-12-03 03:00 in Tokyo: open.
    let (out, status) = pass(&w, 1_796_234_400_000, &|_| true);
    assert_eq!(out.len(), 1, "{status:?}");
    assert_eq!(status.held, None);
}

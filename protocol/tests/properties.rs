//! Properties over generated values: every message decodes to what was
//! encoded, and no random or mutated byte string decodes into something
//! that verifies.

mod common;

use common::*;
use proptest::prelude::*;
use tenet_protocol::bundle::{BundleTrust, Capability, verify_bundle};
use tenet_protocol::envelope::{DispatchEnvelope, EnvelopeState};
use tenet_protocol::inventory::{Inventory, InventoryReport, Package, PackageManager};
use tenet_protocol::report::{ExecutionReport, Outcome, verify_report};
use tenet_protocol::wire::{decode, encode};
use tenet_protocol::{Kind, SignedMessage, Signer};

fn capability() -> impl Strategy<Value = Capability> {
    prop::sample::select(Capability::ALL.to_vec())
}

prop_compose! {
    fn arb_envelope()(
        terminal in "[a-z0-9-]{1,40}",
        policy in "[a-z0-9-]{1,20}/[a-z0-9-]{1,40}",
        policy_generation in any::<u64>(),
        payload_digest in any::<[u8; 32]>(),
        nonce in any::<[u8; 32]>(),
        issued_at_ms in 0u64..u64::MAX / 2,
        span in 1u64..1_000_000_000,
        sequence in any::<u64>(),
        args in prop::collection::vec(".{0,50}", 0..8),
        capabilities in prop::collection::vec(capability(), 0..4),
        write_paths in prop::collection::vec("/[a-z]{1,10}(/[a-z]{1,10}){0,3}", 0..3),
        approval in prop::collection::vec(any::<u8>(), 0..300),
    ) -> DispatchEnvelope {
        DispatchEnvelope {
            terminal, policy, policy_generation, payload_digest, nonce, issued_at_ms,
            deadline_ms: issued_at_ms + span, sequence, args, capabilities, write_paths, approval,
        }
    }
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        any::<i32>().prop_map(|code| Outcome::Exited { code }),
        ".{0,100}".prop_map(|message| Outcome::Trapped { message }),
        Just(Outcome::TimedOut),
        ("[A-Za-z]{1,20}", ".{0,100}")
            .prop_map(|(reason, message)| Outcome::Refused { reason, message }),
    ]
}

prop_compose! {
    fn arb_inventory()(
        terminal in "[a-z0-9-]{1,40}",
        labels in prop::collection::btree_map("[a-z]{1,10}", "[a-z0-9]{0,10}", 0..5),
        packages in prop::collection::vec(("[a-z0-9.+-]{1,30}", "[0-9][a-z0-9.+~:-]{0,20}"), 0..20),
    ) -> Inventory {
        Inventory {
            terminal,
            labels,
            packages: packages.into_iter().map(|(name, version)| Package { name, version, manager: PackageManager::Dpkg, state: Default::default(), problems: Vec::new() }).collect(),
            ..Inventory::default()
        }
    }
}

prop_compose! {
    fn arb_report()(
        env in arb_envelope(),
        envelope_digest in any::<[u8; 32]>(),
        outcome in outcome(),
        output_tail in prop::collection::vec(any::<u8>(), 0..500),
        observed in prop::option::of(arb_inventory()),
        started in any::<u64>(),
        finished in any::<u64>(),
    ) -> ExecutionReport {
        ExecutionReport {
            terminal: env.terminal, envelope_digest, nonce: env.nonce, payload_digest: env.payload_digest,
            outcome, output_tail, observed, started_at_ms: started, finished_at_ms: finished,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn envelopes_round_trip(env in arb_envelope()) {
        let bytes = encode(&env);
        prop_assert_eq!(decode::<DispatchEnvelope>(&bytes).expect("decodes"), env.clone());
        let frame = SignedMessage::signed(&env, &key(3)).expect("sign");
        let back = SignedMessage::decode(&frame.encode(), Kind::DispatchEnvelope).expect("frame");
        prop_assert_eq!(&back, &frame);
        prop_assert_eq!(back.open::<DispatchEnvelope>().expect("opens"), env);
    }

    #[test]
    fn reports_round_trip(rep in arb_report()) {
        let bytes = encode(&rep);
        prop_assert_eq!(decode::<ExecutionReport>(&bytes).expect("decodes"), rep);
    }

    #[test]
    fn inventory_reports_round_trip(inv in arb_inventory(), seq in any::<u64>(), at in any::<u64>()) {
        let r = InventoryReport { terminal: inv.terminal.clone(), sequence: seq, collected_at_ms: at, inventory: inv };
        prop_assert_eq!(decode::<InventoryReport>(&encode(&r)).expect("decodes"), r);
    }

    #[test]
    fn random_bytes_never_verify(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let f = Fixture::new();
        let st = EnvelopeState::new("nagoya-ward3-01");
        prop_assert!(st.verify(&bytes, &f.operator.public_key(), NOW).is_err());
        let trust = BundleTrust { admin_keys: vec![f.admin.public_key()], threshold: 1 };
        prop_assert!(verify_bundle(&bytes, &trust, None, NOW).is_err());
        let env = envelope([7; 32], 1);
        prop_assert!(verify_report(&bytes, &f.terminal.public_key(), &record(&env, [9; 32]), NOW).is_err());
    }

    /// Overwrite, insert, delete and truncate bytes of genuine messages.
    #[test]
    fn mutated_messages_never_verify(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let f = Fixture::new();
        let env = envelope([7; 32], 1);
        let genuine = SignedMessage::signed(&env, &f.operator).expect("sign").encode();
        let mut b = genuine.clone();
        for (at, byte, op) in edits {
            let i = at.index(b.len().max(1));
            match op {
                0 if !b.is_empty() => b[i] = byte,
                1 => b.insert(i.min(b.len()), byte),
                2 if !b.is_empty() => { b.remove(i); }
                _ => b.truncate(i),
            }
        }
        prop_assume!(b != genuine);
        let st = EnvelopeState::new("nagoya-ward3-01");
        prop_assert!(st.verify(&b, &f.operator.public_key(), NOW).is_err());
    }
}

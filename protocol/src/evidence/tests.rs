use super::*;
use crate::approval::{ApprovedRemediation, PolicyApproval, PolicyStatement};
use crate::bundle::Capability;
use crate::keys::{Algorithm, KeyPair, Signer};

struct World {
    admin: KeyPair,
    operator: KeyPair,
    terminal: KeyPair,
}

fn world() -> World {
    let key = || KeyPair::generate(Algorithm::Ed25519).expect("key");
    World {
        admin: key(),
        operator: key(),
        terminal: key(),
    }
}

fn envelope(w: &World, nonce: u8) -> (Vec<u8>, [u8; 32]) {
    let mut approval = SignedMessage::new(&PolicyApproval {
        statement: PolicyStatement {
            policy: "hospital-it/jq".into(),
            spec_digest: [7; 32],
            remediation: Some(ApprovedRemediation {
                payload_digest: [1; 32],
                args: vec!["install jq ge 1.6".into()],
                capabilities: vec![Capability::RunArtifact, Capability::Log],
                write_paths: vec![],
                timeout_ms: 600_000,
                windows: Vec::new(),
            }),
        },
        approved_at_ms: 1_790_000_000_000,
    });
    approval.sign(&w.admin).expect("sign");
    let env = DispatchEnvelope {
        terminal: "ward-01".into(),
        policy: "hospital-it/jq".into(),
        policy_generation: 3,
        payload_digest: [1; 32],
        nonce: [nonce; 32],
        issued_at_ms: 1_000,
        deadline_ms: 61_000,
        sequence: u64::from(nonce),
        args: vec!["install jq ge 1.6".into()],
        capabilities: vec![Capability::RunArtifact, Capability::Log],
        write_paths: vec![],
        approval: approval.encode(),
    };
    let frame = SignedMessage::signed(&env, &w.operator).expect("sign");
    (frame.encode(), frame.body_digest())
}

fn report(w: &World, envelope_digest: [u8; 32], nonce: u8) -> Vec<u8> {
    SignedMessage::signed(
        &ExecutionReport {
            terminal: "ward-01".into(),
            envelope_digest,
            nonce: [nonce; 32],
            payload_digest: [1; 32],
            outcome: Outcome::Exited { code: 0 },
            output_tail: b"Setting up jq".to_vec(),
            observed: None,
            started_at_ms: 2_000,
            finished_at_ms: 3_000,
        },
        &w.terminal,
    )
    .expect("sign")
    .encode()
}

/// A log of two terminals, and the export of `ward-01`'s chain.
fn export(w: &World, records: Vec<(&str, Record)>) -> Export {
    let mut prev = [0; 32];
    let mut own: std::collections::HashMap<&str, [u8; 32]> = Default::default();
    let mut items = Vec::new();
    for (i, (terminal, record)) in records.into_iter().enumerate() {
        let entry = Entry {
            prev,
            own_prev: own.get(terminal).copied().unwrap_or_default(),
            at_ms: 1_000 + i as u64,
            terminal: terminal.into(),
            record,
        };
        own.insert(terminal, entry.body_digest());
        prev = link(&prev, &entry.body_digest());
        items.push(if terminal == "ward-01" {
            Item::Entry(entry.encode())
        } else {
            Item::Elided(entry.body_digest())
        });
    }
    let _ = w;
    Export {
        terminal: "ward-01".into(),
        items,
    }
}

fn keys(w: &World) -> AuditorKeys {
    AuditorKeys {
        admin_keys: vec![w.admin.public_key()],
        threshold: 1,
        dispatch_keys: vec![w.operator.public_key()],
    }
}

fn history(w: &World) -> Export {
    let (env, digest) = envelope(w, 9);
    export(
        w,
        vec![
            (
                "ward-01",
                Record::Enrolled {
                    identity: w.terminal.public_key(),
                },
            ),
            (
                "ward-02",
                Record::Enrolled {
                    identity: w.admin.public_key(),
                },
            ),
            ("ward-01", Record::Dispatched { envelope: env }),
            (
                "ward-01",
                Record::Reported {
                    report: report(w, digest, 9),
                    verdict: "verified".into(),
                },
            ),
        ],
    )
}

#[test]
fn an_honest_history_verifies_with_the_auditors_keys() {
    let w = world();
    let checked = verify(&history(&w), &keys(&w), None)
        .expect("verifies")
        .checked;
    let what: Vec<&str> = checked.iter().map(|c| c.what.as_str()).collect();
    assert_eq!(what.len(), 3);
    assert!(what[0].starts_with("enrolled with identity key"));
    assert!(
        what[1].starts_with("dispatched hospital-it/jq generation 3: payload sha256:0101"),
        "{}",
        what[1]
    );
    assert!(what[1].ends_with("1 argument(s), approved by 1 admin(s)"));
    assert!(
        what[2].ends_with(": exited 0 (operator's verdict: \"verified\")"),
        "{}",
        what[2]
    );
    assert_eq!(
        checked.iter().map(|c| c.index).collect::<Vec<_>>(),
        [0, 2, 3]
    );
}

/// Any byte changed is found: by a signature, or the chain, or, for the
/// unsigned parts of the last entry, by the head the auditor recorded.
#[test]
fn one_changed_byte_anywhere_is_found() {
    let w = world();
    let honest = history(&w);
    let head = verify(&honest, &keys(&w), None).expect("verifies").head;
    // Every byte of every whole entry, and of the elided hash.
    for (i, item) in honest.items.iter().enumerate() {
        let len = match item {
            Item::Entry(b) => b.len(),
            Item::Elided(_) => 32,
        };
        for at in 0..len {
            let mut tampered = honest.clone();
            match &mut tampered.items[i] {
                Item::Entry(b) => b[at] ^= 1,
                Item::Elided(h) => h[at] ^= 1,
            }
            assert!(
                verify(&tampered, &keys(&w), Some(head)).is_err(),
                "item {i}, byte {at} changed and still verifies"
            );
        }
    }
}

#[test]
fn what_fails_is_said_exactly() {
    let w = world();
    // An entry dropped: the next one's link breaks.
    let mut dropped = history(&w);
    dropped.items.remove(2);
    let e = verify(&dropped, &keys(&w), None).expect_err("broken");
    assert_eq!(e.index, 2);
    assert!(
        e.message
            .starts_with("the chain breaks here: it follows sha256:"),
        "{e}"
    );
    // Another operator's key: the envelope is not the operator's.
    let mut other = keys(&w);
    other.dispatch_keys = vec![w.terminal.public_key()];
    assert_eq!(
        verify(&history(&w), &other, None)
            .expect_err("refused")
            .to_string(),
        "entry 2: the envelope is not signed by any of the operator's dispatch keys given"
    );
    // Admins the auditor does not trust.
    let mut other = keys(&w);
    other.admin_keys = vec![w.terminal.public_key()];
    assert!(
        verify(&history(&w), &other, None)
            .expect_err("refused")
            .to_string()
            .starts_with("entry 2: the envelope is not approved: not approved by the admins:"),
    );
    // A report signed by another key than the enrolled one.
    let (env, digest) = envelope(&w, 9);
    let forged = export(
        &w,
        vec![
            (
                "ward-01",
                Record::Enrolled {
                    identity: w.terminal.public_key(),
                },
            ),
            ("ward-01", Record::Dispatched { envelope: env }),
            (
                "ward-01",
                Record::Reported {
                    report: {
                        let other = World {
                            terminal: KeyPair::generate(Algorithm::Ed25519).expect("key"),
                            ..world()
                        };
                        report(&other, digest, 9)
                    },
                    verdict: "verified".into(),
                },
            ),
        ],
    );
    let e = verify(&forged, &keys(&w), None).expect_err("refused");
    assert_eq!(e.index, 2);
    assert!(
        e.message
            .starts_with("the report is not signed by the terminal's identity key"),
        "{e}"
    );
    // A report of a dispatch the chain never sent, or with another nonce.
    let (env, digest) = envelope(&w, 9);
    for (answers, nonce, says) in [
        ([5; 32], 9, "the report answers envelope sha256:0505"),
        (digest, 8, "the report does not carry its envelope's nonce"),
    ] {
        let e = verify(
            &export(
                &w,
                vec![
                    (
                        "ward-01",
                        Record::Enrolled {
                            identity: w.terminal.public_key(),
                        },
                    ),
                    (
                        "ward-01",
                        Record::Dispatched {
                            envelope: env.clone(),
                        },
                    ),
                    (
                        "ward-01",
                        Record::Reported {
                            report: report(&w, answers, nonce),
                            verdict: "verified".into(),
                        },
                    ),
                ],
            ),
            &keys(&w),
            None,
        )
        .expect_err("refused");
        assert!(e.message.starts_with(says), "{e}");
    }
}

#[test]
fn a_history_rewritten_since_an_earlier_export_is_found() {
    let w = world();
    let earlier = history(&w);
    let head = verify(&earlier, &keys(&w), None).expect("verifies").head;
    // Later: the log grew; the earlier head is one of its links.
    let (env, _) = envelope(&w, 10);
    let mut later = earlier.clone();
    let prev = head;
    let Item::Entry(last) = &earlier.items[3] else {
        panic!("an entry")
    };
    let entry = Entry {
        prev,
        own_prev: Entry::decode(last).expect("entry").body_digest(),
        at_ms: 9_000,
        terminal: "ward-01".into(),
        record: Record::Dispatched { envelope: env },
    };
    later.items.push(Item::Entry(entry.encode()));
    assert!(verify(&later, &keys(&w), Some(head)).is_ok());
    // A rewritten history (the last report's verdict changed, and the
    // links after it recomputed) does not pass through it.
    let mut rewritten = history(&w);
    let Item::Entry(bytes) = &rewritten.items[3] else {
        panic!("an entry")
    };
    let mut e = Entry::decode(bytes).expect("entry");
    e.record = match e.record {
        Record::Reported { report, .. } => Record::Reported {
            report,
            verdict: "the attempt failed".into(),
        },
        other => other,
    };
    rewritten.items[3] = Item::Entry(e.encode());
    let e = verify(&rewritten, &keys(&w), Some(head)).expect_err("refused");
    assert_eq!(e.index, 4);
    assert!(
        e.message
            .starts_with("the chain does not pass through the head recorded before"),
        "{e}"
    );
}

#[test]
fn an_entry_of_the_terminals_passed_off_as_anothers_is_found() {
    let w = world();
    let mut hidden = history(&w);
    // The operator elides the terminal's own dispatch as if it were
    // another terminal's: the chain still links, the terminal's own
    // links do not.
    let Item::Entry(bytes) = &hidden.items[2] else {
        panic!("an entry")
    };
    hidden.items[2] = Item::Elided(Entry::decode(bytes).expect("entry").body_digest());
    let e = verify(&hidden, &keys(&w), None).expect_err("refused");
    assert_eq!(e.index, 3);
    assert!(
        e.message
            .starts_with("an entry of this terminal's is withheld before it"),
        "{e}"
    );
}

//! Bad dispatches, each through the real agent binary and loader: refused
//! or stopped, the reason in a signed report, nothing run, and the agent
//! goes on serving genuine dispatches.

mod common;

use common::*;
use tenet_protocol::bundle::Capability;
use tenet_protocol::report::Outcome;
use tenet_protocol::{Algorithm, KeyPair, SignedMessage};
use tenet_test_support::build_deb;

const CAPS: [Capability; 2] = [Capability::RunArtifact, Capability::Log];

/// A terminal with browser-a 118 and a signed bundle that would install 120.
fn setup() -> Option<(Terminal, Vec<u8>, [u8; 32])> {
    if !have_dpkg() {
        return None;
    }
    let t = Terminal::new("nagoya-ward3-01");
    let old = build_deb(t.dir.path(), "browser-a", "118.0.2-1");
    let new = build_deb(t.dir.path(), "browser-a", "120.0-1");
    t.preinstall(&old);
    let (bundle, digest) = t.bundle(
        "install-deb.wat",
        &[
            (
                "install-deb.sh",
                std::fs::read(payloads().join("install-deb.sh")).expect("script"),
            ),
            (
                "browser-a_120.0-1_all.deb",
                std::fs::read(new).expect("deb"),
            ),
        ],
        &CAPS,
    );
    Some((t, bundle, digest))
}

fn refusal(t: &Terminal, report: &[u8]) -> (String, String) {
    match t.open(report).outcome {
        Outcome::Refused { reason, message } => (reason, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// After a refusal, nothing ran, and a genuine dispatch still works.
fn still_serving(t: &Terminal, bundle: &[u8], digest: [u8; 32], sequence: u64) {
    assert_eq!(
        t.installed("browser-a").as_deref(),
        Some("118.0.2-1"),
        "something ran"
    );
    let env = t.envelope(digest, sequence, &["browser-a_120.0-1_all.deb"], &CAPS);
    let bytes = t.sign(&env);
    let (_, report) = t.dispatch(&bytes, bundle);
    let r = t.verify(&report, &env, &bytes).expect("verifies");
    assert_eq!(r.outcome, Outcome::Exited { code: 0 });
    assert_eq!(t.installed("browser-a").as_deref(), Some("120.0-1"));
}

#[test]
fn refused_envelopes() {
    let Some((t, bundle, digest)) = setup() else {
        return;
    };
    let genuine = t.envelope(digest, 10, &["browser-a_120.0-1_all.deb"], &CAPS);

    let unsigned = SignedMessage::new(&genuine).encode();
    let (_, r) = t.dispatch(&unsigned, &bundle);
    assert_eq!(refusal(&t, &r).0, "ThresholdNotMet");

    let stranger = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let mis_signed = SignedMessage::signed(&genuine, &stranger)
        .expect("sign")
        .encode();
    let (_, r) = t.dispatch(&mis_signed, &bundle);
    assert_eq!(refusal(&t, &r).0, "UnknownKey");

    let mut tampered = t.sign(&genuine);
    let i = tampered.len() / 2;
    tampered[i] ^= 1;
    let (_, r) = t.dispatch(&tampered, &bundle);
    assert_eq!(refusal(&t, &r).0, "BadSignature");

    let mut expired = genuine.clone();
    expired.issued_at_ms = now_ms() - 120_000;
    expired.deadline_ms = now_ms() - 60_000;
    let (_, r) = t.dispatch(&t.sign(&expired), &bundle);
    assert_eq!(refusal(&t, &r).0, "Expired");

    let mut elsewhere = genuine.clone();
    elsewhere.terminal = "osaka-visiting-nurse-07".into();
    let (_, r) = t.dispatch(&t.sign(&elsewhere), &bundle);
    let (reason, message) = refusal(&t, &r);
    assert_eq!(reason, "WrongTerminal");
    assert_eq!(
        message,
        "meant for terminal \"osaka-visiting-nurse-07\", but this is \"nagoya-ward3-01\""
    );

    let other_payload = t.envelope([0x42; 32], 10, &["x"], &CAPS);
    let (_, r) = t.dispatch(&t.sign(&other_payload), &bundle);
    assert_eq!(refusal(&t, &r).0, "WrongPayloadDigest");

    // That envelope verified before the bundle did, so sequence 10 is used.
    let (_, r) = t.dispatch(&t.sign(&genuine), &bundle);
    assert_eq!(refusal(&t, &r).0, "Replay");
    let older = t.envelope(digest, 9, &["browser-a_120.0-1_all.deb"], &CAPS);
    let (_, r) = t.dispatch(&t.sign(&older), &bundle);
    assert_eq!(refusal(&t, &r).0, "Rollback");

    still_serving(&t, &bundle, digest, 11);
    // The refusals are queued for the operator, counted by reason.
    let queued = std::fs::read_dir(t.data.join("outbox"))
        .expect("outbox")
        .count();
    assert_eq!(queued, 9);
}

/// The operator's dispatch key alone cannot make a terminal run anything:
/// an envelope signed with it but asking for what no admin approved (the
/// approved installer pointed at a backdoor package lying on the
/// terminal) is refused before anything runs. Before approvals, this
/// installed the backdoor.
#[test]
fn what_the_admins_did_not_approve_is_refused_whoever_signed_the_envelope() {
    let Some((t, bundle, digest)) = setup() else {
        return;
    };
    let backdoor = build_deb(t.dir.path(), "backdoor", "6.6.6");
    let approved = t.envelope(digest, 1, &["browser-a_120.0-1_all.deb"], &CAPS);
    let mut forged = approved.clone();
    forged.args = vec![backdoor.display().to_string()];
    let (_, r) = t.dispatch(&t.sign(&forged), &bundle);
    assert_eq!(
        refusal(&t, &r),
        (
            "NotApproved".to_string(),
            "not approved by the admins: the envelope's arguments differ from what the admins approved".to_string()
        )
    );
    assert_eq!(t.installed("backdoor"), None);

    // No approval at all, and an approval by a key the terminal does not
    // pin (the operator's own, say).
    let mut bare = approved.clone();
    bare.sequence = 2;
    bare.approval = Vec::new();
    let (_, r) = t.dispatch(&t.sign(&bare), &bundle);
    assert_eq!(
        refusal(&t, &r).1,
        "not approved by the admins: the envelope for policy hospital-it/browser-a-minimum carries no approval by the admins"
    );
    let stranger = KeyPair::generate(Algorithm::Ed25519).expect("key");
    let mut self_approved = approved;
    self_approved.sequence = 3;
    tenet_test_support::approve(&mut self_approved, &[&stranger]);
    let (_, r) = t.dispatch(&t.sign(&self_approved), &bundle);
    assert_eq!(refusal(&t, &r).0, "NotApproved");
    assert_eq!(t.installed("browser-a").as_deref(), Some("118.0.2-1"));

    still_serving(&t, &bundle, digest, 4);

    // An approval older than the one it last ran under (an earlier
    // approved version, brought back): refused as a rollback.
    let mut older = t.envelope(digest, 5, &["browser-a_120.0-1_all.deb"], &CAPS);
    let last = older.issued_at_ms - 60_000;
    tenet_test_support::approve_at(&mut older, &[&t.admin], last);
    let (_, r) = t.dispatch(&t.sign(&older), &bundle);
    let (reason, message) = refusal(&t, &r);
    assert_eq!(reason, "Rollback");
    assert!(
        message.starts_with("rollback: policy approval time ")
            && message.ends_with(" already seen"),
        "{message}"
    );
}

#[test]
fn a_replayed_envelope_is_refused_after_a_restart() {
    let Some((t, bundle, digest)) = setup() else {
        return;
    };
    let env = t.envelope(digest, 1, &["browser-a_120.0-1_all.deb"], &CAPS);
    let bytes = t.sign(&env);
    let (_, r) = t.dispatch(&bytes, &bundle);
    assert!(t.verify(&r, &env, &bytes).is_ok());
    // Each dispatch is a new agent process: the state came from disk.
    let (_, r) = t.dispatch(&bytes, &bundle);
    assert_eq!(refusal(&t, &r).0, "Replay");
}

#[test]
fn an_artifact_that_does_not_match_its_digest_is_never_run() {
    let Some((t, _, _)) = setup() else { return };
    let new = build_deb(t.dir.path(), "browser-a", "120.0-1");
    let (bundle, digest) = t.bundle(
        "install-deb.wat",
        &[
            (
                "install-deb.sh",
                std::fs::read(payloads().join("install-deb.sh")).expect("script"),
            ),
            (
                "browser-a_120.0-1_all.deb",
                std::fs::read(new).expect("deb"),
            ),
        ],
        &CAPS,
    );
    // The admin signs a bundle whose artifact bytes were swapped after hashing.
    let mut frame =
        tenet_protocol::SignedMessage::decode(&bundle, tenet_protocol::Kind::PayloadBundle)
            .expect("frame");
    let mut b: tenet_protocol::bundle::PayloadBundle = frame.open().expect("bundle");
    b.artifacts[0].data = b"#!/bin/sh\necho pwned > /tmp/tenet-pwned\n".to_vec();
    b.artifacts[0].size = b.artifacts[0].data.len() as u64;
    frame = SignedMessage::signed(&b, &t.admin).expect("sign");
    let env = t.envelope(
        frame.body_digest(),
        1,
        &["browser-a_120.0-1_all.deb"],
        &CAPS,
    );
    let (_, r) = t.dispatch(&t.sign(&env), &frame.encode());
    let (reason, _) = refusal(&t, &r);
    assert_eq!(reason, "WrongPayloadDigest");
    let _ = digest;
    assert_eq!(t.installed("browser-a").as_deref(), Some("118.0.2-1"));
}

fn run_module(
    t: &Terminal,
    wat: &str,
    caps: &[Capability],
    sequence: u64,
    deadline_ms: u64,
) -> Outcome {
    let (bundle, digest) = t.bundle(wat, &[], caps);
    let mut env = t.envelope(digest, sequence, &[], caps);
    env.deadline_ms = now_ms() + deadline_ms;
    // The admins approve this timeout (the envelope's issue to its deadline).
    tenet_test_support::approve(&mut env, &[&t.admin]);
    let bytes = t.sign(&env);
    let (_, report) = t.dispatch(&bytes, &bundle);
    t.verify(&report, &env, &bytes)
        .expect("a stopped payload's report verifies too")
        .outcome
}

#[test]
fn payloads_that_trap_loop_or_allocate_are_stopped() {
    let Some((t, bundle, digest)) = setup() else {
        return;
    };
    let trap =
        r#"(module (memory (export "memory") 1) (func (export "run") (result i32) unreachable))"#;
    match run_module(&t, trap, &[], 1, 60_000) {
        Outcome::Trapped { message } => assert!(message.contains("unreachable"), "{message}"),
        other => panic!("{other:?}"),
    }
    let forever = r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;
    assert_eq!(run_module(&t, forever, &[], 2, 1_500), Outcome::TimedOut);
    let greedy = r#"(module (memory (export "memory") 1)
        (func (export "run") (result i32)
          (loop $l (drop (memory.grow (i32.const 16))) (br $l))
          (i32.const 0)))"#;
    match run_module(&t, greedy, &[], 3, 60_000) {
        Outcome::Trapped { message } => assert!(message.contains("memory"), "{message}"),
        other => panic!("{other:?}"),
    }
    still_serving(&t, &bundle, digest, 4);
}

#[test]
fn ungranted_capabilities_are_refused_before_anything_runs() {
    let Some((t, bundle, digest)) = setup() else {
        return;
    };
    let writer = r#"(module
        (import "tenet" "write_file" (func $w (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 0) "/etc/hospital/motd")
        (func (export "run") (result i32) (call $w (i32.const 0) (i32.const 18) (i32.const 0) (i32.const 4))))"#;
    // The bundle asks for nothing, the envelope grants only log: the import is refused.
    let (b, d) = t.bundle(writer, &[], &[]);
    let env = t.envelope(d, 1, &[], &[Capability::Log]);
    let (_, r) = t.dispatch(&t.sign(&env), &b);
    let report = t.open(&r);
    assert_eq!(
        report.outcome,
        Outcome::Refused {
            reason: "CapabilityNotGranted".into(),
            message: "capability write-files is not granted".into()
        }
    );
    assert!(!t.root.join("etc/hospital/motd").exists());
    still_serving(&t, &bundle, digest, 2);
}

#[test]
fn write_files_stays_under_its_granted_paths() {
    let Some((t, _, _)) = setup() else { return };
    let writer = |path: &str| {
        format!(
            r#"(module
            (import "tenet" "write_file" (func $w (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "{path}")
            (data (i32.const 512) "welcome")
            (func (export "run") (result i32) (call $w (i32.const 0) (i32.const {}) (i32.const 512) (i32.const 7))))"#,
            path.len()
        )
    };
    let caps = [Capability::WriteFiles];
    let mut seq = 0;
    let mut run = |path: &str| {
        seq += 1;
        let (b, d) = t.bundle(&writer(path), &[], &caps);
        let mut env = t.envelope(d, seq, &[], &caps);
        env.write_paths = vec!["/etc/hospital".into()];
        tenet_test_support::approve(&mut env, &[&t.admin]);
        let bytes = t.sign(&env);
        let (_, r) = t.dispatch(&bytes, &b);
        t.verify(&r, &env, &bytes).expect("verifies").outcome
    };
    assert_eq!(run("/etc/hospital/motd"), Outcome::Exited { code: 0 });
    assert_eq!(
        std::fs::read_to_string(t.root.join("etc/hospital/motd")).expect("written"),
        "welcome"
    );
    assert_eq!(run("/etc/passwd"), Outcome::Exited { code: -6 });
    assert_eq!(run("/etc/hospital/../passwd"), Outcome::Exited { code: -6 });
    assert!(!t.root.join("etc/passwd").exists());
    // A symbolic link inside the grant does not lead out of it: the agent
    // runs as root, and this would have written the terminal's /etc/passwd.
    std::os::unix::fs::symlink(t.root.join("etc"), t.root.join("etc/hospital/conf"))
        .expect("symlink");
    assert_eq!(
        run("/etc/hospital/conf/passwd"),
        Outcome::Exited { code: -6 }
    );
    assert!(!t.root.join("etc/passwd").exists());
    // Nor does a link planted where the old writer put its temporary file.
    std::fs::write(t.root.join("etc/shadow"), "root:secret\n").expect("write");
    std::os::unix::fs::symlink(
        t.root.join("etc/shadow"),
        t.root.join("etc/hospital/motd.tmp"),
    )
    .expect("symlink");
    assert_eq!(run("/etc/hospital/motd"), Outcome::Exited { code: 0 });
    assert_eq!(
        std::fs::read_to_string(t.root.join("etc/shadow")).expect("read"),
        "root:secret\n"
    );
}

#[test]
fn imports_the_admins_did_not_declare_are_refused_even_when_granted() {
    let Some((t, bundle, digest)) = setup() else {
        return;
    };
    let writer = r#"(module
        (import "tenet" "write_file" (func $w (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 0) "/etc/hospital/motd")
        (func (export "run") (result i32) (call $w (i32.const 0) (i32.const 18) (i32.const 0) (i32.const 4))))"#;
    // The admins signed a manifest that declares only log; the envelope
    // (the operator's word alone) grants write-files.
    let (b, d) = t.bundle(writer, &[], &[Capability::Log]);
    let mut env = t.envelope(d, 1, &[], &[Capability::Log, Capability::WriteFiles]);
    env.write_paths = vec!["/etc/hospital".into()];
    tenet_test_support::approve(&mut env, &[&t.admin]);
    let (_, r) = t.dispatch(&t.sign(&env), &b);
    assert_eq!(
        t.open(&r).outcome,
        Outcome::Refused {
            reason: "Malformed".into(),
            message: "malformed message: the module imports tenet.write_file, but its signed manifest does not declare capability write-files".into()
        }
    );
    assert!(!t.root.join("etc/hospital/motd").exists());
    still_serving(&t, &bundle, digest, 2);
}

#[test]
fn huge_wasm_tables_are_refused() {
    let Some((t, bundle, digest)) = setup() else {
        return;
    };
    // 100 million entries: outside linear memory, so the 64 MiB memory
    // limit did not stop it (816 MB resident).
    let table = r#"(module (memory (export "memory") 1) (table 100000000 funcref)
        (func (export "run") (result i32) (i32.const 0)))"#;
    match run_module(&t, table, &[], 1, 60_000) {
        Outcome::Trapped { message } => {
            assert!(message.contains("table"), "{message}")
        }
        other => panic!("a 100M-entry table ran: {other:?}"),
    }
    let growing = r#"(module (memory (export "memory") 1) (table 1 funcref)
        (func (export "run") (result i32)
          (drop (table.grow (ref.null func) (i32.const 50000000)))
          (i32.const 0)))"#;
    match run_module(&t, growing, &[], 2, 60_000) {
        Outcome::Trapped { message } => assert!(message.contains("table"), "{message}"),
        other => panic!("a table grew to 50M entries: {other:?}"),
    }
    still_serving(&t, &bundle, digest, 3);
}

#[test]
fn a_payload_reads_the_inventory_and_logs_it() {
    let Some((t, _, _)) = setup() else { return };
    let reader = r#"(module
        (import "tenet" "read_inventory" (func $inv (param i32 i32) (result i32)))
        (import "tenet" "log" (func $log (param i32 i32)))
        (memory (export "memory") 2)
        (func (export "run") (result i32)
          (local $len i32)
          (local.set $len (call $inv (i32.const 1024) (i32.const 100000)))
          (if (i32.lt_s (local.get $len) (i32.const 0)) (then (return (i32.const 1))))
          (call $log (i32.const 1024) (local.get $len))
          (i32.const 0)))"#;
    let caps = [Capability::ReadInventory, Capability::Log];
    let (b, d) = t.bundle(reader, &[], &caps);
    let env = t.envelope(d, 1, &[], &caps);
    let bytes = t.sign(&env);
    let (_, r) = t.dispatch(&bytes, &b);
    let report = t.verify(&r, &env, &bytes).expect("verifies");
    assert_eq!(report.outcome, Outcome::Exited { code: 0 });
    let logged = String::from_utf8_lossy(&report.output_tail);
    let inv: serde_json::Value =
        serde_json::from_str(logged.trim()).expect("the inventory as JSON");
    assert_eq!(inv["terminal"], "nagoya-ward3-01");
    assert_eq!(inv["packages"][0]["name"], "browser-a");
    assert_eq!(inv["packages"][0]["version"], "118.0.2-1");
}

#[test]
fn artifacts_run_with_a_clean_environment_and_die_whole_at_the_deadline() {
    let Some((t, bundle, digest)) = setup() else {
        return;
    };
    // The "installer" records its environment, starts a child that would
    // outlive it, and hangs.
    let script = b"#!/bin/sh\nenv > \"$TENET_ROOT/env.txt\"\nsleep 600 &\necho $! > \"$TENET_ROOT/child.pid\"\nsleep 600\n";
    let (b, d) = t.bundle(
        "install-deb.wat",
        &[("install-deb.sh", script.to_vec())],
        &CAPS,
    );
    let mut env = t.envelope(d, 1, &["anything"], &CAPS);
    env.deadline_ms = now_ms() + 2_000;
    let bytes = t.sign(&env);
    let (_, r) = t.dispatch(&bytes, &b);
    let report = t.verify(&r, &env, &bytes).expect("verifies");
    assert_eq!(report.outcome, Outcome::Exited { code: -5 }, "killed");
    let seen = std::fs::read_to_string(t.root.join("env.txt")).expect("env written");
    let names: Vec<&str> = seen
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for leaked in ["CARGO", "HOME", "RUST_", "CI"] {
        assert!(
            !names.iter().any(|n| n.starts_with(leaked)),
            "the agent's environment leaked into the artifact: {names:?}"
        );
    }
    assert!(
        names.contains(&"TENET_ROOT") && names.contains(&"PATH"),
        "{names:?}"
    );
    // The child it started was killed with it (gone, or a zombie nobody reaped).
    let pid = std::fs::read_to_string(t.root.join("child.pid")).expect("pid");
    let stat = format!("/proc/{}/stat", pid.trim());
    let dead = |s: Option<String>| {
        s.is_none_or(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !dead(std::fs::read_to_string(&stat).ok()) {
        assert!(
            std::time::Instant::now() < until,
            "the artifact's child outlived the deadline: {stat}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    still_serving(&t, &bundle, digest, 2);
}

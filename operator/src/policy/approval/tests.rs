use std::path::Path;

use tenet_protocol::Signer;
use tenet_protocol::keys::{Algorithm, KeyPair, PublicKey};

use super::*;
use crate::policy::load_dir;

const POLICY: &str = "\
# Browser A at 120 or later in Nagoya.
apiVersion: tenet.dev/v1alpha1
kind: TerminalPolicy
metadata:
  name: browser-a-minimum   # the name people know
  namespace: hospital-it
spec:
  selector:
    matchLabels: { site: nagoya }
  requirements:
    - package: { name: browser-a, version: \">= 120\" }
  remediation:
    payload:
      name: install-browser-a
      digest: sha256:0101010101010101010101010101010101010101010101010101010101010101
    args: [browser-a_120.0-1_all.deb]
    capabilities: [run-artifact, log]
";

/// Sign at `now_ms`.
fn at(now_ms: u64) -> SignOptions<'static> {
    SignOptions {
        renew: false,
        now_ms,
        bundles: None,
    }
}

fn admins(n: usize) -> Vec<KeyPair> {
    (0..n)
        .map(|_| KeyPair::generate(Algorithm::Ed25519).expect("key"))
        .collect()
}

fn trust(admins: &[KeyPair], threshold: usize) -> BundleTrust {
    BundleTrust {
        admin_keys: admins
            .iter()
            .map(|a| a.public_key())
            .collect::<Vec<PublicKey>>(),
        threshold,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn compiled(path: &Path) -> Vec<CompiledPolicy> {
    let set = load_dir(path);
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    set.policies.into_iter().map(|p| p.compiled).collect()
}

fn digest_of(text: &str) -> [u8; 32] {
    let p: tenet_crds::TerminalPolicy = serde_yaml::from_str(text).expect("policy");
    spec_digest(&p.spec)
}

#[test]
fn the_signed_form_ignores_layout_and_catches_every_change_of_meaning() {
    let base = digest_of(POLICY);
    // Same meaning: comments, key order, flow or block style, quoting,
    // whitespace, defaults written out, the description.
    let same = [
        POLICY.replace("# Browser A at 120 or later in Nagoya.\n", ""),
        POLICY.replace(
            "    args: [browser-a_120.0-1_all.deb]\n    capabilities: [run-artifact, log]\n",
            "    capabilities:\n      - run-artifact\n      - log\n    args: ['browser-a_120.0-1_all.deb']\n",
        ),
        POLICY.replace("{ site: nagoya }", "{site:    \"nagoya\"}"),
        POLICY.replace("spec:\n", "spec:\n  description: anything at all\n"),
        POLICY.replace("spec:\n", "spec:\n  suspend: false\n"),
    ];
    for text in &same {
        assert_eq!(digest_of(text), base, "{text}");
    }
    // Any change of meaning: what runs, where, how fast, what is required.
    let changed = [
        POLICY.replace("browser-a_120.0-1_all.deb", "backdoor_6.6.6_all.deb"),
        POLICY.replace("site: nagoya", "site: osaka"),
        POLICY.replace("[run-artifact, log]", "[run-artifact, log, write-files]"),
        POLICY.replace(">= 120", ">= 121"),
        POLICY.replace("0101010101", "0202020202"),
        POLICY.replace("spec:\n", "spec:\n  suspend: true\n"),
        POLICY.replace("spec:\n", "spec:\n  rollout: { maxInFlight: 50 }\n"),
        POLICY.replace("spec:\n", "spec:\n  securityWeight: 0\n"),
    ];
    for text in &changed {
        assert_ne!(digest_of(text), base, "{text}");
    }
}

#[test]
fn k_admins_sign_the_file_in_place_and_it_keeps_every_comment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "browser.yaml", POLICY);
    let a = admins(3);
    let trust = trust(&a, 2);
    assert_eq!(
        judge(&compiled(&file)[0], &trust),
        Verdict::Unapproved {
            reason: "not signed by any admin (no tenet.dev/approval annotation; run `tenet policy sign`)".into(),
            signers: vec![],
        }
    );

    let first = sign(&file, &a[0], at(1_000)).expect("signed");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].policy, "hospital-it/browser-a-minimum");
    assert!(first[0].added);
    let text = std::fs::read_to_string(&file).expect("read");
    // Every line of the original is still there, in order; one block more.
    let original: Vec<&str> = POLICY.lines().collect();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("annotations:") && !l.contains(APPROVAL_ANNOTATION))
        .collect();
    assert_eq!(kept, original);
    assert!(
        text.contains("metadata:\n  annotations:\n    tenet.dev/approval: "),
        "{text}"
    );
    match judge(&compiled(&file)[0], &trust) {
        Verdict::Unapproved { reason, signers } => {
            assert_eq!(reason, "1 valid signature(s) by trusted keys, 2 required");
            assert_eq!(signers, [a[0].public_key().fingerprint()]);
        }
        v => panic!("{v:?}"),
    }

    // The second admin adds a signature to the same approval.
    let second = sign(&file, &a[2], at(1_000)).expect("signed");
    assert_eq!(
        second[0].signers,
        [
            a[0].public_key().fingerprint(),
            a[2].public_key().fingerprint()
        ]
    );
    assert_eq!(
        judge(&compiled(&file)[0], &trust),
        Verdict::Approved {
            signers: second[0].signers.clone(),
            approved_at_ms: 1_000,
        }
    );
    // Signing again adds nothing and changes nothing that matters.
    let again = sign(&file, &a[2], at(1_000)).expect("signed");
    assert!(!again[0].added);
    assert_eq!(again[0].signers, second[0].signers);

    // An edit of the args voids the approval; signing it again starts anew.
    let approved = std::fs::read_to_string(&file).expect("read");
    std::fs::write(
        &file,
        approved.replace("browser-a_120.0-1_all.deb", "backdoor_6.6.6_all.deb"),
    )
    .expect("write");
    assert_eq!(
        judge(&compiled(&file)[0], &trust),
        Verdict::Unapproved {
            reason: "the approval is for another version of this policy (it changed since it was signed)".into(),
            signers: second[0].signers.clone(),
        }
    );
    let anew = sign(&file, &a[1], at(1_000)).expect("signed");
    assert_eq!(anew[0].dropped, 2);
    assert_eq!(anew[0].signers, [a[1].public_key().fingerprint()]);
}

#[test]
fn each_document_of_a_file_gets_its_own_approval_wherever_its_metadata_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let second = POLICY
        .replace("browser-a-minimum   # the name people know", "other")
        .replace(
            "metadata:\n",
            "metadata:\n  annotations:\n    owner: it-team   # who to call\n",
        );
    let file = write(dir.path(), "two.yaml", &format!("{POLICY}---\n{second}"));
    let a = admins(1);
    let signed = sign(&file, &a[0], at(1_000)).expect("signed");
    assert_eq!(signed.len(), 2);
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(
        text.contains("    owner: it-team   # who to call\n"),
        "{text}"
    );
    for p in compiled(&file) {
        assert!(
            matches!(judge(&p, &trust(&a, 1)), Verdict::Approved { .. }),
            "{}",
            p.key()
        );
    }
}

#[test]
fn flow_style_metadata_is_signed_in_flow_style() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = admins(1);
    let flow = POLICY.replace(
        "metadata:\n  name: browser-a-minimum   # the name people know\n  namespace: hospital-it\n",
        "metadata: { name: browser-a-minimum, namespace: hospital-it }\n",
    );
    let with_annotations = flow.replace("browser-a-minimum,", "other, annotations: { owner: it },");
    for text in [flow, with_annotations] {
        let file = write(dir.path(), "flow.yaml", &text);
        sign(&file, &a[0], at(1_000)).expect("signed");
        let signed = std::fs::read_to_string(&file).expect("read");
        assert_eq!(signed.lines().count(), text.lines().count(), "{signed}");
        assert!(
            matches!(
                judge(&compiled(&file)[0], &trust(&a, 1)),
                Verdict::Approved { .. }
            ),
            "{signed}"
        );
    }
}

#[test]
fn crlf_files_and_commas_in_comments_are_signed_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = admins(1);
    let crlf = POLICY
        .replace("metadata:\n", "# owners: alice, bob,\nmetadata:\n")
        .replace('\n', "\r\n");
    let file = write(dir.path(), "crlf.yaml", &crlf);
    sign(&file, &a[0], at(1_000)).expect("signed");
    let signed = std::fs::read_to_string(&file).expect("read");
    assert_eq!(signed.matches('\n').count(), signed.matches("\r\n").count());
    assert!(signed.contains("metadata:\r\n  annotations:\r\n    tenet.dev/approval: "));
    assert!(matches!(
        judge(&compiled(&file)[0], &trust(&a, 1)),
        Verdict::Approved { .. }
    ));
}

#[test]
fn a_suspended_policy_approves_no_remediation() {
    let p: tenet_crds::TerminalPolicy =
        serde_yaml::from_str(&POLICY.replace("spec:\n", "spec:\n  suspend: true\n"))
            .expect("policy");
    assert_eq!(
        statement("hospital-it/browser-a-minimum", &p.spec, None).remediation,
        None
    );
    let p: tenet_crds::TerminalPolicy = serde_yaml::from_str(POLICY).expect("policy");
    let r = statement("hospital-it/browser-a-minimum", &p.spec, None)
        .remediation
        .expect("remediation");
    assert_eq!(r.args, ["browser-a_120.0-1_all.deb"]);
    // The CRD's default timeout, 300 s.
    assert_eq!(r.timeout_ms, 300_000);
}

#[test]
fn an_older_approval_never_replaces_a_newer_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = admins(1);
    let trust = trust(&a, 1);
    let file = write(dir.path(), "browser.yaml", POLICY);
    let mut gate = Gate::default();
    sign(&file, &a[0], at(1_000)).expect("signed");
    let version_1 = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, version_1.replace("site: nagoya", "site: osaka")).expect("edit");
    sign(&file, &a[0], at(2_000)).expect("signed");
    assert_eq!(gate.admit(compiled(&file), &trust).policies.len(), 1);
    // Version 1 brought back with its old approval, as git history has it.
    std::fs::write(&file, &version_1).expect("revert");
    let admitted = gate.admit(compiled(&file), &trust);
    assert_eq!(
        admitted.policies[0].spec.selector.match_labels["site"],
        "osaka"
    );
    assert_eq!(
        admitted.unapproved["hospital-it/browser-a-minimum"].reason,
        "its approval, of 1970-01-01T00:00:01Z, is older than the one in force, of 1970-01-01T00:00:02Z: an earlier approved version cannot come back as it was; sign it anew with `tenet policy sign --renew`"
    );
    // Signing it again as it is adds to the old approval; --renew starts anew.
    sign(&file, &a[0], at(3_000)).expect("signed");
    assert!(!gate.admit(compiled(&file), &trust).unapproved.is_empty());
    let renewed = sign(
        &file,
        &a[0],
        SignOptions {
            renew: true,
            now_ms: 3_000,
            bundles: None,
        },
    )
    .expect("signed");
    assert_eq!(renewed[0].dropped, 1);
    let admitted = gate.admit(compiled(&file), &trust);
    assert!(admitted.unapproved.is_empty());
    assert_eq!(
        admitted.policies[0].spec.selector.match_labels["site"],
        "nagoya"
    );
}

#[test]
fn a_file_that_cannot_be_signed_is_left_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = admins(1);
    let empty = POLICY.replace(
        "  namespace: hospital-it\n",
        "  namespace: hospital-it\n  annotations: {}\n",
    );
    let file = write(dir.path(), "empty.yaml", &empty);
    let e = sign(&file, &a[0], at(1_000)).expect_err("refused");
    assert_eq!(
        e.to_string(),
        format!(
            "{}:7:3: metadata.annotations is empty; remove it, or give it an entry, so that the approval can be added; nothing was written",
            file.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read"), empty);

    let broken = POLICY.replace("version: \">= 120\"", "version: \">= banana\"");
    let file = write(dir.path(), "broken.yaml", &broken);
    let e = sign(&file, &a[0], at(1_000))
        .expect_err("refused")
        .to_string();
    assert!(
        e.starts_with(&format!("{}:11:", file.display())),
        "a broken policy is not signed: {e}"
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read"), broken);
}

#[test]
fn the_gate_keeps_the_last_approved_generation_and_lets_no_unapproved_one_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = admins(2);
    let trust = trust(&a, 1);
    let file = write(dir.path(), "browser.yaml", POLICY);
    let mut gate = Gate::default();

    // Never approved: not in force.
    let admitted = gate.admit(compiled(&file), &trust);
    assert!(admitted.policies.is_empty());
    assert_eq!(
        admitted.unapproved["hospital-it/browser-a-minimum"].message(),
        "not approved (not signed by any admin (no tenet.dev/approval annotation; run `tenet policy sign`)); nothing of it is in force"
    );

    // Approved: in force.
    sign(&file, &a[0], at(1_000)).expect("signed");
    let mut approved = compiled(&file);
    approved[0].generation = 7;
    let admitted = gate.admit(approved, &trust);
    assert_eq!(admitted.policies.len(), 1);
    assert!(admitted.unapproved.is_empty());

    // An unapproved edit: the approved version stays in force.
    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, text.replace("site: nagoya", "site: osaka")).expect("write");
    let admitted = gate.admit(compiled(&file), &trust);
    assert_eq!(admitted.policies.len(), 1);
    assert_eq!(admitted.policies[0].generation, 7);
    assert_eq!(
        admitted.policies[0].spec.selector.match_labels["site"],
        "nagoya"
    );
    assert_eq!(
        admitted.unapproved["hospital-it/browser-a-minimum"].message(),
        "the latest edit is not approved (the approval is for another version of this policy (it changed since it was signed)); generation 7, the last approved, stays in force"
    );
    // Still so on the next refresh, and once signed, the edit is in force.
    assert_eq!(
        gate.admit(compiled(&file), &trust).policies[0].generation,
        7
    );
    sign(&file, &a[1], at(1_000)).expect("signed");
    let admitted = gate.admit(compiled(&file), &trust);
    assert_eq!(
        admitted.policies[0].spec.selector.match_labels["site"],
        "osaka"
    );
    assert!(admitted.unapproved.is_empty());

    // A policy no longer read is forgotten.
    assert!(gate.admit(Vec::new(), &trust).policies.is_empty());
}

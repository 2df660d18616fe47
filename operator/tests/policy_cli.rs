//! `tenet policy check` and `tenet policy plan` run as a person runs them:
//! the real binary, real files, exact output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ sits in the workspace")
        .to_path_buf()
}

/// Run `tenet ARGS` from the workspace root with the address space capped
/// at 1 GiB, so a parser that expanded without bound would fail here.
fn tenet(args: &[&str]) -> Output {
    let mut script = String::from("ulimit -v 1048576; exec \"$0\"");
    for i in 0..args.len() {
        script.push_str(&format!(" \"${{{}}}\"", i + 1));
    }
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_tenet"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("tenet runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Each committed broken policy and the exact line a person sees.
const BROKEN: &[(&str, &str)] = &[
    (
        "unknown-field.yaml",
        "9:9: spec.requirements[0].package.verison: unknown field `verison`, expected one of `name`, `version`, `absent`, `scheme`",
    ),
    (
        "wrong-type.yaml",
        "11:18: spec.rollout.maxInFlight: invalid type: string \"ten\", expected u32",
    ),
    (
        "duplicate-name.yaml",
        "12:9: metadata.name: duplicate TerminalPolicy default/browser: first defined at tests/policies/broken/duplicate-name.yaml:4:9",
    ),
    (
        "cel-syntax.yaml",
        "7:55: spec.selector.expression: CEL syntax error at column 39: Syntax error: mismatched input '<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER}",
    ),
    (
        "cel-type.yaml",
        "7:17: spec.selector.expression: CEL type error: found no matching overload for '_>_' applied to '(int, string)'",
    ),
    (
        "cel-unknown-variable.yaml",
        "8:14: spec.requirements[0].expression.cel: CEL type error: unknown name 'fact' (the variables are terminal, labels, claims, inventory, packages)",
    ),
    (
        "cel-not-bool.yaml",
        "8:14: spec.requirements[0].expression.cel: CEL expression must be a bool, but it gives int",
    ),
    (
        "impossible-version.yaml",
        "9:18: spec.requirements[0].package.version: \">= 130, < 120\" can never be satisfied: >= 130 and < 120 leave no version",
    ),
    (
        "bad-version-constraint.yaml",
        "9:18: spec.requirements[0].package.version: \"=> 120\" is not a comparison: write an operator (=, !=, <, <=, >, >=) and a version, e.g. \">= 120.0\"",
    ),
    ("empty.yaml", "1:1: the file holds no YAML document"),
    (
        "wrong-kind.yaml",
        "2:7: kind: expected apiVersion tenet.dev/v1alpha1 and kind TerminalPolicy, found apiVersion \"apps/v1\" and kind \"Deployment\"",
    ),
    (
        "yaml-syntax.yaml",
        "8:1: invalid YAML: found unexpected end of stream, while scanning a quoted scalar at line 7 column 24",
    ),
    (
        "two-kinds-in-one-requirement.yaml",
        "7:14: spec.requirements[0]: a requirement sets exactly one of package, file, service, expression (this one sets 2)",
    ),
    (
        "window-unknown-time-zone.yaml",
        "10:69: spec.rollout.windows[0].timeZone: \"Asia/Nagoya\" is not a time zone this system knows (an IANA name such as Asia/Tokyo or UTC)",
    ),
    (
        "window-bad-time.yaml",
        "11:16: spec.rollout.windows[0].start: \"2:00\" is not a time of day (HH:MM, 00:00 to 24:00)",
    ),
    (
        "canary-larger-than-batch.yaml",
        "9:13: spec.rollout.canary: canary (20) must not be larger than maxInFlight (5)",
    ),
    (
        "percentage-out-of-range.yaml",
        "9:25: spec.rollout.maxInFlightPercent: 150 is not a percentage between 1 and 100",
    ),
    (
        "missing-name.yaml",
        "3:1: metadata.name: missing field `name`",
    ),
    (
        "pinned-pcr-not-quoted.yaml",
        "13:12: spec.certificate.expectedPcrs.9: PCR 9 is pinned but not quoted: add it to spec.certificate.pcrs",
    ),
    (
        "service-unit-suffix.yaml",
        "7:24: spec.requirements[0].service.name: \"sshd.service\": name the service without .service (\"sshd\"), as the inventory lists it",
    ),
    (
        "auto-expression.yaml",
        "8:12: spec.requirements[0].expression: remediation auto cannot make an expression true: move this requirement to a policy without remediation, or give a payload of your own",
    ),
    (
        "auto-and-payload.yaml",
        "9:9: spec.remediation: a remediation sets exactly one of auto (Tenet computes it) and payload (a bundle of your own)",
    ),
    (
        "auto-with-args.yaml",
        "10:11: spec.remediation.args: an auto remediation computes its arguments and capabilities from the requirements; remove this",
    ),
    (
        "certificate-validity-too-long.yaml",
        "11:15: spec.certificate.validity: \"100000000000h\" is longer than the longest validity the operator issues (720h): security certificates are short-lived",
    ),
];

#[test]
fn each_broken_policy_gets_its_exact_error() {
    let mut failures = Vec::new();
    for (file, expected) in BROKEN {
        let path = format!("tests/policies/broken/{file}");
        let out = tenet(&["policy", "check", &path]);
        let want = format!("{path}:{expected}\n");
        if out.status.code() != Some(1) || stdout(&out) != want {
            failures.push(format!(
                "{file}: exit {:?}\n  got:  {}  want: {want}",
                out.status.code(),
                stdout(&out)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_case_in_the_corpus_has_an_expected_message() {
    let dir = root().join("tests/policies/broken");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("corpus exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut listed: Vec<String> = BROKEN.iter().map(|(f, _)| f.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[test]
fn one_bad_file_never_hides_the_errors_of_the_others() {
    let out = tenet(&["policy", "check", "tests/policies/broken"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    for (file, expected) in BROKEN {
        let line = format!("tests/policies/broken/{file}:{expected}");
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert_eq!(
        text.lines().count(),
        BROKEN.len(),
        "one error per case:\n{text}"
    );
}

#[test]
fn the_example_policies_are_valid() {
    let out = tenet(&["policy", "check", "policies"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(stdout(&out), "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("6 valid policies, 0 error(s)"), "{err}");
}

#[test]
fn check_json_lists_policies_and_errors() {
    let ok = tenet(&["policy", "check", "policies", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(v["policies"].as_array().map(Vec::len), Some(6));
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0));

    let bad = tenet(&[
        "policy",
        "check",
        "tests/policies/broken/impossible-version.yaml",
        "--output",
        "json",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&bad.stdout).expect("json");
    let e = &v["errors"][0];
    assert_eq!(e["line"], 9);
    assert_eq!(e["column"], 18);
    assert_eq!(e["field"], "spec.requirements[0].package.version");
}

/// Broken files too large or too strange to commit, made here.
#[test]
fn hostile_files_are_refused_with_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let header =
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: x\nspec:\n";

    let mut not_utf8 = header.as_bytes().to_vec();
    not_utf8.extend_from_slice(b"  description: caf\xe9\n");
    std::fs::write(d.join("not-utf8.yaml"), not_utf8).expect("write");

    let big = std::fs::File::create(d.join("huge.yaml")).expect("create");
    big.set_len(50 * 1024 * 1024).expect("50 MB sparse file");

    let depth = 100_000;
    let deep = format!(
        "{header}  description: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    std::fs::write(d.join("deep.yaml"), deep).expect("write");

    let mut deep_block = format!("{header}  description:\n");
    for i in 0..2000 {
        deep_block.push_str(&format!("{}- \n", " ".repeat(4 + i)));
    }
    std::fs::write(d.join("deep-block.yaml"), deep_block).expect("write");

    // The "billion laughs": nine levels of nine aliases each.
    let mut bomb = String::from("a0: &a0 [\"lol\"]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    std::fs::write(d.join("anchors.yaml"), bomb).expect("write");

    let path = |f: &str| d.join(f).display().to_string();
    let cases = [
        (
            "not-utf8.yaml",
            "6:19: the file is not valid UTF-8".to_string(),
        ),
        (
            "huge.yaml",
            "1:1: the file is 52428800 bytes, over the limit of 4194304 bytes".to_string(),
        ),
        (
            "deep.yaml",
            "6:80: invalid YAML: nested more than 64 levels deep".to_string(),
        ),
        (
            "deep-block.yaml",
            "133:131: invalid YAML: recursion limit exceeded".to_string(),
        ),
        (
            "anchors.yaml",
            "1:1: invalid YAML: repetition limit exceeded".to_string(),
        ),
    ];
    for (file, expected) in cases {
        let out = tenet(&["policy", "check", &path(file)]);
        assert_eq!(
            (out.status.code(), stdout(&out)),
            (Some(1), format!("{}:{expected}\n", path(file))),
            "{file}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn plan_shows_each_terminals_drift_with_reasons() {
    let out = tenet(&[
        "policy",
        "plan",
        "policies",
        "--inventory",
        "examples/inventories",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    for line in [
        "nagoya-ward3-01: 6 policies select it, 2 drifted",
        "  DRIFT  hospital-it/browser-a-minimum",
        "           browser-a: browser-a 118.0.2-1 does not satisfy >= 120.0",
        "           package telnetd absent: telnetd 0.17+2.4-2+deb12u1 is installed but must be absent",
        "nagoya-reception-02: 5 policies select it, 2 drifted",
        "           clamav-running: service clamav-daemon is stopped, must be running",
        "           openssl-fixed: openssl is older than 3.0.15-1~deb12u1",
        "osaka-visiting-nurse-07: 5 policies select it, 1 drifted",
        "  -      hospital-it/browser-a-minimum: not selected",
        "           firewall-active: the host firewall is not active",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[test]
fn plan_json_names_the_payload_that_would_be_dispatched() {
    let out = tenet(&[
        "policy",
        "plan",
        "policies",
        "--inventory",
        "examples/inventories/nagoya-ward3-01.yaml",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let policies = v[0]["policies"].as_array().expect("policies");
    let browser = policies
        .iter()
        .find(|p| p["policy"] == "hospital-it/browser-a-minimum")
        .expect("browser policy");
    assert_eq!(browser["selected"], true);
    assert_eq!(browser["compliant"], false);
    // Its remediation is auto: the steps Tenet computed; no admin signed
    // it yet, so no bundle is named.
    assert_eq!(browser["dispatch"]["auto"], true);
    assert_eq!(
        browser["dispatch"]["args"],
        serde_json::json!(["install browser-a ge 120.0"])
    );
    assert_eq!(browser["dispatch"]["digest"], "");
    assert!(
        browser["dispatch"]["payload"]
            .as_str()
            .is_some_and(|p| p.starts_with("the standard library (no admin signed it yet")),
        "{browser}"
    );
    assert_eq!(
        browser["drift"][0]["reason"],
        "browser-a 118.0.2-1 does not satisfy >= 120.0"
    );
}

#[test]
fn plan_refuses_a_broken_inventory_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = dir.path().join("inv.yaml");
    std::fs::write(
        &inv,
        "terminal: t1\npackages:\n  - { name: a, versoin: '1' }\n",
    )
    .expect("write");
    let out = tenet(&[
        "policy",
        "plan",
        "policies",
        "--inventory",
        &inv.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":3:16: packages[0].versoin: unknown field `versoin`, expected one of `name`, `version`, `manager`"),
        "{err}"
    );
}

/// The admins' workflow: keys, signatures k of n, `check --trust` naming
/// who signed and what is missing, `plan` showing it, an edit voiding it.
#[test]
fn sign_check_and_plan_show_who_approved_and_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |name: &str| dir.path().join(name).display().to_string();
    let policies = d("policies");
    std::fs::create_dir_all(&policies).expect("mkdir");
    let file = d("policies/browser.yaml");
    let original = std::fs::read_to_string(root().join("examples/policies/custom-payload.yaml"))
        .expect("example");
    std::fs::write(&file, &original).expect("copy");
    for admin in ["alice", "bob", "carol", "mallory"] {
        let out = tenet(&["keygen", "--out", &d(&format!("{admin}.key"))]);
        assert_eq!(out.status.code(), Some(0));
    }
    let (alice, bob, carol) = (d("alice.key.pub"), d("bob.key.pub"), d("carol.key.pub"));
    let check = || {
        tenet(&[
            "policy",
            "check",
            &policies,
            "--trust",
            &alice,
            "--trust",
            &bob,
            "--trust",
            &carol,
            "--threshold",
            "2",
        ])
    };
    let sign = |key: &str| {
        let out = tenet(&["policy", "sign", &file, "--key", &d(key)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout(&out)
    };

    // Nobody signed: the error points at the metadata.
    let out = check();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout(&out),
        format!(
            "{file}:10:1: metadata.annotations.tenet.dev/approval: hospital-it/browser-a-minimum is not approved: not signed by any admin (no tenet.dev/approval annotation; run `tenet policy sign`)\n"
        )
    );

    // One of two: who signed, what is missing; the comments are kept.
    assert_eq!(
        sign("alice.key"),
        format!("{file}: hospital-it/browser-a-minimum signed by 1 key(s)\n")
    );
    let signed = std::fs::read_to_string(&file).expect("read");
    assert!(signed.starts_with("# A policy whose remediation is a payload of the admins' own"));
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out),
        format!(
            "{file}:12:5: metadata.annotations.tenet.dev/approval: hospital-it/browser-a-minimum is not approved: 1 valid signature(s) by trusted keys, 2 required; signed by {alice}\n"
        )
    );

    // Two of three: approved.
    sign("bob.key");
    let out = check();
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{policies}: 1 file(s), 1 valid policy, 1 approved by 2 of 3 trusted key(s), 0 error(s)\n"
        )
    );
    let plan = |policies: &str| {
        let out = tenet(&[
            "policy",
            "plan",
            policies,
            "--inventory",
            "examples/inventories/nagoya-ward3-01.yaml",
            "--trust",
            &alice,
            "--trust",
            &bob,
            "--threshold",
            "2",
        ]);
        assert_eq!(out.status.code(), Some(0));
        stdout(&out)
    };
    let text = plan(&policies);
    assert!(
        text.starts_with(&format!(
            "hospital-it/browser-a-minimum: approved by 2 key(s), 2 required: {alice}, {bob}\n"
        )),
        "{text}"
    );

    // An edit of the args voids it; a stranger's signature counts for nothing.
    let approved = std::fs::read_to_string(&file).expect("read");
    std::fs::write(
        &file,
        approved.replace("browser-a_120.0-1_all.deb", "backdoor_6.6.6_all.deb"),
    )
    .expect("edit");
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out),
        format!(
            "{file}:12:5: metadata.annotations.tenet.dev/approval: hospital-it/browser-a-minimum is not approved: the approval is for another version of this policy (it changed since it was signed); signed by {alice}, {bob}\n"
        )
    );
    let text = plan(&policies);
    assert!(
        text.contains("hospital-it/browser-a-minimum: NOT APPROVED: the approval is for another version of this policy (it changed since it was signed) (the operator will not enforce it)\n"),
        "{text}"
    );
    assert!(
        text.contains("would dispatch payload install-browser-a"),
        "{text}"
    );
    assert!(
        text.contains("(held: the policy is not approved)"),
        "{text}"
    );
    let resigned = sign("mallory.key");
    assert_eq!(
        resigned,
        format!(
            "{file}: hospital-it/browser-a-minimum signed by 1 key(s) (2 signature(s) of an earlier version dropped: it changed since)\n"
        )
    );
    let out = check();
    let text = stdout(&out);
    assert!(
        text.contains("is not approved: signed by key sha256:")
            && text.contains("which is not trusted here; signed by sha256:")
            && text.ends_with(" (not a --trust key)\n"),
        "{text}"
    );

    // A threshold the keys cannot meet is a usage error.
    let out = tenet(&[
        "policy",
        "check",
        &policies,
        "--trust",
        &alice,
        "--threshold",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tenet: --threshold 2 needs between 1 and 1 (the distinct --trust keys given)\n"
    );
}

/// A policy whose only maintenance window is on another day than today:
/// the plan says it would hold its dispatch, and until when.
#[test]
fn plan_says_when_a_dispatch_waits_for_a_maintenance_window() {
    let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let today = jiff::Zoned::now()
        .with_time_zone(jiff::tz::TimeZone::UTC)
        .weekday()
        .to_monday_zero_offset() as usize;
    // Two days on: closed all of today, whatever the hour.
    let day = days[(today + 2) % 7];
    let tmp = tempfile::tempdir().expect("tempdir");
    let policy = tmp.path().join("browser.yaml");
    let text = std::fs::read_to_string(root().join("examples/policies/custom-payload.yaml"))
        .expect("policy");
    let with_window = text.replacen(
        "  rollout:",
        &format!(
            "  rollout:\n    windows:\n      - {{ days: [{day}], start: \"02:00\", end: \"05:00\", timeZone: UTC }}"
        ),
        1,
    );
    assert_ne!(
        with_window, text,
        "the example policy has a rollout section"
    );
    std::fs::write(&policy, with_window).expect("write");
    let out = tenet(&[
        "policy",
        "plan",
        policy.to_str().expect("path"),
        "--inventory",
        "examples/inventories/nagoya-ward3-01.yaml",
    ]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "(held: waiting for a maintenance window (the next opens {day} 02:00 UTC))"
        )),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A policy that says only what must hold (`remediation: {auto: {}}`):
/// signing it needs the bundle directory and a standard-library bundle
/// that carries its steps out, and the approval names that bundle; `plan`
/// shows the steps Tenet computed; a newer bundle is pointed out and taken
/// only with --renew. Standard-library bundles build byte for byte the
/// same with SOURCE_DATE_EPOCH.
#[test]
fn an_auto_remediation_is_signed_against_the_bundles_and_planned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |name: &str| dir.path().join(name).display().to_string();
    for sub in ["policies", "bundles", "empty"] {
        std::fs::create_dir_all(d(sub)).expect("mkdir");
    }
    let file = d("policies/browser.yaml");
    let original =
        std::fs::read_to_string(root().join("policies/browser-a-nagoya.yaml")).expect("example");
    std::fs::write(&file, &original).expect("copy");
    assert_eq!(
        tenet(&["keygen", "--out", &d("admin.key")]).status.code(),
        Some(0)
    );
    let key = d("admin.key");
    let sign = |extra: &[&str]| {
        let mut args = vec!["policy", "sign", &file, "--key", &key];
        args.extend(extra);
        tenet(&args)
    };
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let out = sign(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "{file}: hospital-it/browser-a-minimum: its remediation is auto: name the bundle directory with --bundles, so the approval can name the standard-library bundle that carries it out; nothing was written\n"
        )
    );
    let empty = d("empty");
    let out = sign(&["--bundles", &empty]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("hospital-it/browser-a-minimum: no standard-library bundle to remediate it with: build one (`tenet payload build --std"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read"), original);

    // Bundles: the library alone, then with browser-a 120 and 121 (the
    // choice reads the .deb file names; the terminal reads the .debs).
    let build = |name: &str, extra: &[&str]| {
        let out_file = d(&format!("bundles/{name}.bundle"));
        let mut args = vec![
            "payload", "build", "--std", "--name", name, "--out", &out_file,
        ];
        args.extend(extra);
        let out = tenet(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .find_map(|l| l.strip_prefix("digest ").map(str::to_string))
            .expect("digest")
    };
    build("tenet-std", &[]);
    let bundles = d("bundles");
    let out = sign(&["--bundles", &bundles]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "{file}: hospital-it/browser-a-minimum: no standard-library bundle carries what it needs (tenet-std: it carries no .deb of browser-a); build one with `tenet payload build --std --apt PACKAGE[=VERSION] --target ROOT` and sign it; nothing was written\n"
        )
    );
    let deb = |version: &str| {
        let path = d(&format!("browser-a_{version}_all.deb"));
        std::fs::write(&path, version).expect("deb");
        path
    };
    let d120 = build("browser-a-120", &["--artifact", &deb("120.0-1")]);
    let out = sign(&["--bundles", &bundles]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "{file}: hospital-it/browser-a-minimum signed by 1 key(s)\n  its auto remediation runs bundle browser-a-120 ({d120})\n  it carries browser-a 120.0-1\n"
        )
    );

    let plan = tenet(&[
        "policy",
        "plan",
        &d("policies"),
        "--inventory",
        "examples/inventories/nagoya-ward3-01.yaml",
        "--trust",
        &d("admin.key.pub"),
        "--bundles",
        &bundles,
    ]);
    assert_eq!(plan.status.code(), Some(0), "{}", stderr(&plan));
    assert!(
        stdout(&plan).contains(&format!(
            "           would remediate automatically with browser-a-120 (standard library) {d120}:\n             install browser-a ge 120.0\n"
        )),
        "{}",
        stdout(&plan)
    );

    // A newer bundle: pointed out, not taken, until --renew.
    let d121 = build("browser-a-121", &["--artifact", &deb("121.0-1")]);
    let out = sign(&["--bundles", &bundles]);
    assert_eq!(
        stdout(&out),
        format!(
            "{file}: hospital-it/browser-a-minimum signed by 1 key(s) (this key had signed this version already)\n  its auto remediation runs bundle browser-a-120 ({d120})\n  it carries browser-a 120.0-1\n  note: bundle browser-a-121 ({d121}) would install newer versions than the approved browser-a-120; sign with --renew to move to it\n"
        )
    );
    let out = sign(&["--bundles", &bundles, "--renew"]);
    assert!(
        stdout(&out).contains(&format!(
            "its auto remediation runs bundle browser-a-121 ({d121})"
        )),
        "{}",
        stdout(&out)
    );

    // Reproducible: the same inputs and SOURCE_DATE_EPOCH, the same digest.
    let again = |name: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tenet"))
            .env("SOURCE_DATE_EPOCH", "1767225600")
            .args(["payload", "build", "--std", "--name", "tenet-std", "--out"])
            .arg(d(name))
            .output()
            .expect("tenet");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        std::fs::read(d(name)).expect("bundle")
    };
    assert_eq!(again("a.bundle"), again("b.bundle"));
}

//! The whole loop on one machine with real processes: `tenet operator` over
//! a policy directory and a signed bundle, a bootstrap token from `tenet
//! token create`, `tenet-agent` enrolling and holding its connection, the
//! operator finding browser-a 118 below the policy's 120, dispatching the
//! install payload, verifying the report, and the terminal's real dpkg
//! database ending at 120 with the policy compliant.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tenet_e2e::{
    Running, agent, binary, build_deb, create_token, dpkg_root, free_port, install_bundle,
    sign_policies, wait_until,
};
use tenet_protocol::wire::digest_string;
use tenet_protocol::{Algorithm, KeyPair};

/// Whether `tenet status` shows the policy at generation 1 with its one
/// terminal compliant, nothing drifted, remediating or failed.
fn generation_1_compliant(status: &str) -> bool {
    status.lines().any(|l| {
        l.split_whitespace().collect::<Vec<_>>()
            == ["hospital-it/browser-a-minimum", "1", "1/1", "0", "0", "0"]
    })
}

fn installed(root: &Path) -> Option<String> {
    let out = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Version}", "browser-a"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_operator_brings_a_terminal_to_its_policy() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "dpkg-deb is required under CI"
        );
        eprintln!("skipping: dpkg-deb is not installed");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();

    // The admin's key and a signed bundle that installs browser-a 120.
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    let old = build_deb(dir, "browser-a", "118.0.2-1");
    let new = build_deb(dir, "browser-a", "120.0-1");
    let frame = install_bundle(&admin, &new);
    std::fs::create_dir_all(dir.join("bundles")).expect("mkdir");
    std::fs::write(dir.join("bundles/install-browser-a.bundle"), frame.encode()).expect("bundle");

    // The policy: browser-a >= 120 on Nagoya terminals.
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    std::fs::write(
        dir.join("policies/browser.yaml"),
        format!(
            "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: browser-a-minimum\n  namespace: hospital-it\nspec:\n  selector: {{ matchLabels: {{ site: nagoya }} }}\n  requirements:\n    - package: {{ name: browser-a, version: '>= 120.0' }}\n  remediation:\n    payload: {{ name: install-browser-a, digest: '{}' }}\n    args: [browser-a_120.0-1_all.deb]\n    capabilities: [run-artifact, log]\n",
            digest_string(&frame.body_digest())
        ),
    )
    .expect("policy");
    // The admin approves it (one admin, the operator's threshold of 1).
    sign_policies(&dir.join("policies"), &dir.join("admin.key"));

    // The policy directory is a git checkout (GitOps).
    let policies = dir.join("policies");
    let git = |args: &[&str]| tenet_e2e::git(&policies, args);
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "browser-a 120 in Nagoya"]);
    let commit = git(&["rev-parse", "HEAD"]);

    // The operator.
    let port = free_port();
    let metrics_port = free_port();
    let mut operator = Command::new(binary("tenet"))
        .args([
            "operator",
            "--policies",
            "policies",
            "--data",
            "data",
            "--admin-key",
            "admin.key.pub",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .args(["--log-format", "json"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("operator.log")).expect("log file"))
        .spawn()
        .expect("operator");
    let (tx, lines) = mpsc::channel::<String>();
    let stdout = operator.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let _operator = Running(operator);
    let next_line = |want: &str| loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("operator output");
        if line.contains(want) {
            return line;
        }
    };
    next_line("gateway listening on");

    // A token and an enrolled, connected agent on a root with browser-a 118.
    // Admins assign it to the Nagoya site; what its agent.yaml says of its
    // labels is only a claim.
    let (token, fingerprint) = create_token(
        dir,
        &["--terminal", "nagoya-ward3-01", "--label", "site=nagoya"],
    );
    let root = dpkg_root(dir, &[&old]);
    std::fs::write(
        dir.join("agent.yaml"),
        format!(
            "terminal: nagoya-ward3-01\ndata: agent-data\nroot: root\nlabels: {{ site: nagoya }}\ninventory:\n  dpkg: {{}}\noperator: {{ address: \"127.0.0.1:{port}\" }}\ninventoryIntervalSeconds: 1\n"
        ),
    )
    .expect("config");
    // The operator imports the token on its next tick.
    let mut enrolled = false;
    for _ in 0..50 {
        let out = agent(
            dir,
            &[
                "enrol",
                "--config",
                "agent.yaml",
                "--token",
                &token,
                "--ca-fingerprint",
                &fingerprint,
            ],
        );
        if out.status.success() {
            enrolled = true;
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("the bootstrap token is not valid"), "{err}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(enrolled, "the token was never imported");
    let _agent = Running(
        Command::new(binary("tenet-agent"))
            .args(["run", "--config", "agent.yaml"])
            .current_dir(dir)
            .stderr(Stdio::null())
            .spawn()
            .expect("agent"),
    );

    // The loop closes: dpkg shows 120 and the operator reports compliance.
    wait_until(
        Duration::from_secs(60),
        "browser-a 120 installed through the loop",
        || installed(&root).as_deref() == Some("120.0-1"),
    );
    next_line(
        "hospital-it/browser-a-minimum gen 1: 1 selected, 1 compliant, 0 drifted, 0 remediating, 0 failed",
    );

    // What a person asks the running operator.
    let tenet = |args: &[&str]| {
        let out = Command::new(binary("tenet"))
            .args(args)
            .current_dir(dir)
            .output()
            .expect("tenet");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = tenet(&["status", "--data", "data"]);
    assert!(generation_1_compliant(&status), "{status}");
    assert!(status.contains("1 terminal(s), 1 connected"), "{status}");
    assert!(
        status.contains(&format!("policies at git commit {commit}")),
        "{status}"
    );
    let terminal = tenet(&["status", "--data", "data", "terminal", "nagoya-ward3-01"]);
    assert!(
        terminal.starts_with("nagoya-ward3-01: connected, last inventory "),
        "{terminal}"
    );
    assert!(
        terminal.contains("  Compliant   hospital-it/browser-a-minimum\n"),
        "{terminal}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&tenet(&["status", "--data", "data", "--output", "json"]))
            .expect("json");
    assert_eq!(json["policies"][0]["compliant"], 1);

    // Prometheus metrics.
    let scrape = || {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", metrics_port)).expect("metrics port");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        text
    };
    let metrics = scrape();
    for line in [
        "HTTP/1.1 200 OK",
        "tenet_pairs{state=\"Compliant\"} 1",
        "tenet_pairs{state=\"Failed\"} 0",
        "tenet_terminals_connected 1",
        "tenet_dispatches_total 1",
    ] {
        assert!(
            metrics.lines().any(|l| l.trim_end() == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains("tenet_reconcile_duration_seconds_count"),
        "{metrics}"
    );

    // What an auditor receives, and checks with only the admins' and the
    // operator's public keys: the terminal's enrolment, the envelope, the
    // report that carried its nonce back.
    let export = tenet(&[
        "evidence",
        "export",
        "--data",
        "data",
        "--terminal",
        "nagoya-ward3-01",
    ]);
    std::fs::write(dir.join("evidence.json"), &export).expect("export");
    let verified = tenet(&[
        "evidence",
        "verify",
        "evidence.json",
        "--trust",
        "admin.key.pub",
        "--threshold",
        "1",
        "--dispatch-key",
        "data/dispatch.key.pub",
    ]);
    let lines: Vec<&str> = verified.lines().collect();
    assert!(
        lines[0].contains("enrolled with identity key"),
        "{verified}"
    );
    assert!(
        lines[1].contains("dispatched hospital-it/browser-a-minimum generation 1: payload"),
        "{verified}"
    );
    assert!(lines[1].ends_with("approved by 1 admin(s)"), "{verified}");
    assert!(
        lines[2].ends_with(": exited 0 (operator's verdict: \"verified\")"),
        "{verified}"
    );
    assert_eq!(
        lines[3],
        "verified: 3 entries of terminal nagoya-ward3-01 in a chain of 3"
    );
    assert!(lines[4].starts_with("head sha256:"), "{verified}");
    // One byte of the report the terminal signed changed: the auditor
    // sees which entry and why.
    let mut file: serde_json::Value = serde_json::from_str(&export).expect("json");
    let encoded = file["items"][2]["entry"]
        .as_str()
        .expect("an entry")
        .to_string();
    use base64::Engine;
    use tenet_protocol::evidence::{Entry, Record};
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut entry = Entry::decode(&b64.decode(encoded).expect("base64")).expect("entry");
    let Record::Reported { report, .. } = &mut entry.record else {
        panic!("the third entry is the report: {:?}", entry.record)
    };
    let middle = report.len() / 2;
    report[middle] ^= 1;
    file["items"][2]["entry"] = serde_json::Value::String(b64.encode(entry.encode()));
    std::fs::write(dir.join("tampered.json"), file.to_string()).expect("write");
    let out = Command::new(binary("tenet"))
        .args([
            "evidence",
            "verify",
            "tampered.json",
            "--trust",
            "admin.key.pub",
        ])
        .args(["--threshold", "1"])
        .args(["--dispatch-key", "data/dispatch.key.pub"])
        .current_dir(dir)
        .output()
        .expect("tenet");
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.starts_with("tenet: tampered.json: entry 2: the report"),
        "{said}"
    );

    // An edit no admin approved: the args now name a backdoor package
    // lying on the terminal, and the version requirement moves so that the
    // terminal drifts. The approved generation stays in force, nothing is
    // dispatched, and status, the log and the metrics say why.
    let approved = std::fs::read_to_string(dir.join("policies/browser.yaml")).expect("read");
    std::fs::write(
        dir.join("policies/browser.yaml"),
        approved
            .replace("browser-a_120.0-1_all.deb", "backdoor_6.6.6_all.deb")
            .replace(">= 120.0", ">= 121.0"),
    )
    .expect("edit");
    let unapproved = "\n  UNAPPROVED: the latest edit is not approved (the approval is for another version of this policy (it changed since it was signed)); generation 1, the last approved, stays in force";
    wait_until(
        Duration::from_secs(20),
        "the unapproved edit in status",
        || tenet(&["status", "--data", "data"]).contains(unapproved),
    );
    let status = tenet(&["status", "--data", "data"]);
    assert!(
        generation_1_compliant(&status),
        "the approved generation is still in force, the terminal compliant with it:\n{status}"
    );
    let metrics = scrape();
    for line in ["tenet_policies_unapproved 1", "tenet_dispatches_total 1"] {
        assert!(
            metrics.lines().any(|l| l.trim_end() == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert_eq!(installed(&root).as_deref(), Some("120.0-1"));

    // A broken edit of the policy file: the last good version stays in
    // force, and status says why.
    std::fs::write(
        dir.join("policies/browser.yaml"),
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: { name: browser-a-minimum, namespace: hospital-it }\nspec:\n  requirements:\n    - package: { name: browser-a, version: '>= 130, < 120' }\n",
    )
    .expect("edit");
    wait_until(
        Duration::from_secs(20),
        "the policy error in status",
        || {
            tenet(&["status", "--data", "data"]).contains(
                "policy error (the last good version stays in force): policies/browser.yaml:6:",
            )
        },
    );
    let status = tenet(&["status", "--data", "data"]);
    assert!(status.contains("can never be satisfied"), "{status}");
    assert!(
        generation_1_compliant(&status),
        "the last good version is still in force:\n{status}"
    );

    // Structured logs: one JSON object per line, the dispatch among them.
    let log = std::fs::read_to_string(dir.join("operator.log")).expect("log");
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["fields"]["message"] == "dispatched"
            && e["fields"]["terminal"] == "nagoya-ward3-01"
            && e["fields"]["policy"] == "hospital-it/browser-a-minimum"),
        "{log}"
    );

    // A package whose dependency the terminal lacks, installed by hand
    // with the real dpkg: dpkg unpacks it and leaves it unconfigured
    // (`iU`). That is not installed: a policy requiring it does not say
    // Compliant (it did before), and status gives dpkg's word for the state.
    let jq = tenet_e2e::build_deb_depending(dir, "jq", "1.6-2.1", "libjq1 (>= 1.6)");
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--log=/dev/null", "-i"])
        .arg(&jq)
        .output()
        .expect("dpkg");
    assert!(!out.status.success(), "jq's dependency is missing");
    let state = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${db:Status-Abbrev}", "jq"])
        .output()
        .expect("dpkg-query");
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "iU");
    std::fs::write(
        dir.join("policies/jq.yaml"),
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: jq\n  namespace: hospital-it\nspec:\n  selector: { matchLabels: { site: nagoya } }\n  requirements:\n    - package: { name: jq, version: '>= 1.6' }\n",
    )
    .expect("policy");
    sign_policies(&dir.join("policies/jq.yaml"), &dir.join("admin.key"));
    let jq_line = || {
        tenet(&["status", "--data", "data", "terminal", "nagoya-ward3-01"])
            .lines()
            .find(|l| l.contains("hospital-it/jq"))
            .map(str::to_string)
    };
    wait_until(
        Duration::from_secs(60),
        "the jq policy to judge the unpacked jq",
        || {
            jq_line().is_some_and(|l| {
                l.contains("is unpacked but not configured") || l.contains("Compliant")
            })
        },
    );
    assert_eq!(
        jq_line().as_deref(),
        Some(
            "  Drifted     hospital-it/jq: package jq: jq 1.6-2.1 is unpacked but not configured (needs >= 1.6)"
        )
    );
}

/// The install-deb installer itself, on a real dpkg root: a package the
/// terminal has at a newer version than the bundle's is left as it is
/// (never a downgrade), while the others are installed.
#[test]
fn the_installer_never_downgrades() {
    if !tenet_e2e::have("dpkg-deb") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let newer = build_deb(dir, "browser-a", "121.0-1");
    let root = dpkg_root(dir, &[&newer]);
    // The payload's working directory: the script and the bundle's .debs.
    let work = dir.join("run");
    std::fs::create_dir_all(&work).expect("mkdir");
    let older = build_deb(&work, "browser-a", "120.0-1");
    let helper = build_deb(&work, "helper", "1.0-1");
    let installer = tenet_e2e::example("install-deb.sh");
    let run = |debs: &[&Path]| {
        let out = Command::new("sh")
            .arg(&installer)
            .args(debs.iter().map(|d| d.file_name().expect("name")))
            .env("TENET_ROOT", &root)
            .current_dir(&work)
            .output()
            .expect("sh");
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            said.trim().lines().last().unwrap_or("").to_string(),
        )
    };
    assert_eq!(
        run(&[&older]),
        (
            Some(0),
            "nothing to install: already at these versions or newer: browser-a 121.0-1".into()
        )
    );
    assert_eq!(installed(&root).as_deref(), Some("121.0-1"));
    let (code, _) = run(&[&older, &helper]);
    assert_eq!(code, Some(0));
    assert_eq!(installed(&root).as_deref(), Some("121.0-1"));
    let helper_state = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${db:Status-Abbrev}", "helper"])
        .output()
        .expect("dpkg-query");
    assert_eq!(String::from_utf8_lossy(&helper_state.stdout).trim(), "ii");
}

//! Crash safety with real processes at scale: `tenet operator` rolls a
//! policy out to 1,000 simulated terminals (`tenet-agent simulate`: 1,000
//! enrolled identities, 1,000 mTLS connections), is killed with SIGKILL in
//! the middle of the rollout and started again on the same data directory.
//!
//! It must lose no verified result (no terminal is ever sent the same
//! policy generation again once the operator acknowledged its successful
//! report: the simulator counts such re-dispatches), never let a terminal
//! hold two live envelopes for one policy (an older envelope arriving after
//! a newer one would be refused by the terminal: the simulator counts
//! refusals), reissue the dispatches that were out with fresh envelopes,
//! and finish the rollout.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tenet_e2e::{Running, binary, create_token, free_port, sign_policies, wait_until};
use tenet_protocol::{Algorithm, KeyPair};

const TERMINALS: usize = 1_000;

/// Start the operator; its stdout lines arrive on the channel.
fn operator(dir: &Path, port: u16, log: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(binary("tenet"))
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
        .arg(format!("127.0.0.1:{}", free_port()))
        .current_dir(dir)
        .env("TENET_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join(log)).expect("log"))
        .spawn()
        .expect("operator");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn line_with(rx: &mpsc::Receiver<String>, words: &str, limit: Duration) -> String {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(words) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {words:?} from the operator: {e}"),
        }
    }
}

/// (compliant, generation) of the policy in the operator's status file.
fn compliant(dir: &Path) -> Option<(u64, i64)> {
    let text = std::fs::read_to_string(dir.join("data/status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let p = v["policies"].as_array()?.first()?;
    Some((p["compliant"].as_u64()?, p["generation"].as_i64()?))
}

/// The simulator's last progress counters, by name.
fn simulator_counts(log: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rev().find(|l| l.contains(" terminals: ")) else {
        return Vec::new();
    };
    line.split_once(" terminals: ")
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split(", ")
        .filter_map(|part| {
            let (n, what) = part.split_once(' ')?;
            Some((what.to_string(), n.parse().ok()?))
        })
        .collect()
}

fn count(counts: &[(String, u64)], what: &str) -> u64 {
    counts
        .iter()
        .find(|(w, _)| w == what)
        .map_or_else(|| panic!("no {what:?} in {counts:?}"), |(_, n)| *n)
}

#[test]
fn a_killed_operator_loses_no_verified_result_and_finishes_the_rollout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    let (bundle, digest) =
        tenet::bench::simulated_install_bundle(&admin, "install-app", "ward-app", "2.0-1")
            .expect("bundle");
    for d in ["policies", "bundles"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    std::fs::write(dir.join("bundles/install-app.bundle"), bundle).expect("bundle");
    // At most 100 in flight: the rollout runs in waves, so a kill lands
    // with dispatches out, reports in flight and terminals converged.
    std::fs::write(
        dir.join("policies/app.yaml"),
        format!(
            "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: {{ name: ward-app, namespace: hospital-it }}\nspec:\n  selector: {{ matchLabels: {{ fleet: crash }} }}\n  requirements:\n    - package: {{ name: ward-app, version: '>= 2.0' }}\n  remediation:\n    payload: {{ name: install-app, digest: '{digest}' }}\n    args: [ward-app_2.0-1_all.deb]\n    capabilities: [run-artifact, log]\n    timeoutSeconds: 20\n  rollout: {{ maxInFlight: 100, haltOnFailurePercent: 10 }}\n"
        ),
    )
    .expect("policy");
    sign_policies(&dir.join("policies"), &dir.join("admin.key"));
    std::fs::write(
        dir.join("template.yaml"),
        "terminal: template\nlabels: { fleet: crash, site: nagoya }\npackages:\n  - { name: ward-app, version: 1.0-1 }\n  - { name: openssl, version: 3.0.15-1~deb12u1 }\n",
    )
    .expect("template");

    let port = free_port();
    let (first, lines) = operator(dir, port, "operator-1.log");
    let mut first = Running(first);
    line_with(&lines, "gateway listening", Duration::from_secs(60));
    let (token, fingerprint) = create_token(
        dir,
        &["--uses", &TERMINALS.to_string(), "--label", "fleet=crash"],
    );
    let sim_log = dir.join("simulate.log");
    let _simulator = Running(
        Command::new(binary("tenet-agent"))
            .args(["simulate", "--count"])
            .arg(TERMINALS.to_string())
            .arg("--operator")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--ca-fingerprint", &fingerprint])
            .args(["--inventory", "template.yaml", "--prefix", "ward"])
            // A simulated install takes 100 ms: a wave of 100 is in flight
            // for a while, so the kill finds dispatches out.
            .args(["--run-delay-ms", "100", "--progress-seconds", "0.2"])
            .env("TENET_BOOTSTRAP_TOKEN", &token)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&sim_log).expect("log"))
            .spawn()
            .expect("simulator"),
    );

    // Mid-rollout: some hundreds converged, the rest not.
    wait_until(Duration::from_secs(300), "300 terminals compliant", || {
        compliant(dir).is_some_and(|(c, _)| c >= 300)
    });
    first.0.kill().expect("SIGKILL");
    first.0.wait().expect("reaped");
    let (before, generation) = compliant(dir).expect("status");
    assert!(
        (before as usize) < TERMINALS,
        "the kill came after the rollout finished ({before} compliant); nothing was tested"
    );

    // Started again on the same data: the dispatches that were out are
    // reissued fresh, and the rollout completes.
    let (second, lines) = operator(dir, port, "operator-2.log");
    let _second = Running(second);
    let reissued = line_with(
        &lines,
        "will be reissued with fresh envelopes",
        Duration::from_secs(60),
    );
    let n: usize = reissued
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(n >= 1, "{reissued}");
    line_with(&lines, "gateway listening", Duration::from_secs(60));
    wait_until(Duration::from_secs(300), "every terminal compliant", || {
        compliant(dir).is_some_and(|(c, _)| c as usize == TERMINALS)
    });
    assert_eq!(
        compliant(dir).map(|(_, g)| g),
        Some(generation),
        "the same generation, not a new one"
    );

    // The terminals' side: every one enrolled once and converged; none was
    // sent a generation again after its success was acknowledged; none
    // refused an envelope (an older one after a newer one would be).
    wait_until(
        Duration::from_secs(60),
        "the simulator's counters settle",
        || {
            // Its progress line lags the operator's status a little.
            let c = simulator_counts(&sim_log);
            !c.is_empty()
                && count(&c, "connected") == TERMINALS as u64
                && count(&c, "dispatches run") >= TERMINALS as u64
                && count(&c, "reports acknowledged") >= count(&c, "dispatches run")
        },
    );
    let c = simulator_counts(&sim_log);
    assert_eq!(count(&c, "enrolled"), TERMINALS as u64, "{c:?}");
    assert_eq!(count(&c, "failed"), 0, "{c:?}");
    assert_eq!(count(&c, "refused"), 0, "{c:?}");
    assert_eq!(
        count(&c, "re-dispatched after an acknowledged success"),
        0,
        "{c:?}"
    );
    assert!(
        count(&c, "dispatches run") >= TERMINALS as u64,
        "every terminal ran the payload: {c:?}"
    );
    eprintln!(
        "killed at {before}/{TERMINALS} compliant; {n} dispatches reissued; simulator: {c:?}"
    );
}

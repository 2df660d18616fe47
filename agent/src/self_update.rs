//! The agent upgrading itself through an ordinary policy: a requirement
//! `tenet-agent >= X`, remediated by installing the new package, with the
//! rollout's canary and halt like any other package.
//!
//! 1. A payload run replaces the agent's own binary (dpkg installs the
//!    package; its postinst does not restart the agent under a payload,
//!    which it sees by `TENET_PAYLOAD`). When the run ends the agent sees
//!    that the file at its path is not the one it runs, and holds the run's
//!    report back (`DATA/handover/`).
//! 2. It ends its session and keeps a copy of the binary it runs
//!    (`DATA/agent-previous`).
//! 3. It proves the new binary: `NEW probe --config CONFIG` must connect,
//!    authenticate and be welcomed by the operator within the deadline
//!    (`selfUpdate.deadlineSeconds`, 60 s by default).
//! 4. Proven: the held report goes to the outbox, and the agent executes
//!    the new binary in its own process (the same PID: systemd sees no
//!    restart). The new agent connects and sends the report.
//! 5. Not proven, or the new binary cannot be executed: the previous
//!    binary is put back at its path, the held report is rewritten as
//!    refused (`RolledBack`, with the reason and the inventory as it is
//!    now), and the agent goes on as it was. The package database still
//!    names the new version; the inventory flags the package at that
//!    version (`DATA/rolled-back`), so it never counts as installed, and
//!    the rollout halts as for any failed package.
//!
//!
//! Each step is recorded first (`DATA/handover/state`, [`Handover`]). An
//! agent that starts mid-way ends the handover ([`at_start`]); so does the
//! binary kept from before it, which the unit runs first
//! (`tenet-agent resume-handover`), so a new binary that does not start at
//! all is rolled back after a crash too.
//!
//! The decisions are pure functions; the file and process work is at the
//! bottom.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tenet_protocol::inventory::Inventory;
use tenet_protocol::report::{ExecutionReport, Outcome};

/// The agent's own package.
pub const PACKAGE: &str = "tenet-agent";
/// How long a new binary has to prove itself, unless configured.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
pub use tenet_protocol::report::ROLLED_BACK;

/// A self-update that was rolled back: the version of the agent's package
/// the package database names since, why, and the SHA-256 of the binary
/// put back. Once another binary is at the agent's path and runs (it was
/// welcomed by the operator), the record no longer applies and goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    pub package_version: String,
    pub reason: String,
    pub at_ms: u64,
    pub restored_sha256: [u8; 32],
}

/// Where a handover stands, on disk (`DATA/handover/state`), so that a
/// crash or a restart at any step ends it the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handover {
    /// The binary at the agent's path is on probation; the one before it
    /// is kept (`DATA/agent-previous`). An agent that starts in this state
    /// is the binary on probation: it proves itself, or puts the previous
    /// one back and executes it.
    Proving { since_ms: u64 },
    /// The binary on probation failed, for this reason: the previous one
    /// goes back, and the held reports are rewritten.
    RollingBack { reason: String },
}

/// What an agent that starts does about a handover it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtStart {
    /// None in progress: held reports left by one (the new agent runs
    /// now) go out as they are.
    ReleaseHeld,
    /// This binary is on probation: prove it.
    Prove,
    /// Finish rolling back.
    FinishRollBack { reason: String },
}

pub fn at_start(state: Option<Handover>) -> AtStart {
    match state {
        None => AtStart::ReleaseHeld,
        Some(Handover::Proving { .. }) => AtStart::Prove,
        Some(Handover::RollingBack { reason }) => AtStart::FinishRollBack { reason },
    }
}

/// Flag the agent's package while the package database still names the
/// version that was rolled back: the binary at its path is the previous
/// one, so that version is not installed.
pub fn flag(inventory: &mut Inventory, record: &RolledBack) {
    for p in &mut inventory.packages {
        if p.name == PACKAGE && p.version == record.package_version {
            p.problems.push(format!(
                "rolled back to the previous agent: {}",
                record.reason
            ));
        }
    }
}

/// The report of the run that installed a new agent which was rolled
/// back: the same evidence (envelope, nonce, payload, output), refused as
/// `RolledBack` with the reason, observing the terminal as it is now.
pub fn rolled_back_report(
    held: ExecutionReport,
    reason: &str,
    observed: Option<Inventory>,
    now_ms: u64,
) -> ExecutionReport {
    ExecutionReport {
        outcome: Outcome::Refused {
            reason: ROLLED_BACK.into(),
            message: reason.chars().take(1024).collect(),
        },
        observed,
        finished_at_ms: now_ms.max(held.finished_at_ms),
        ..held
    }
}

/// How the probe of a new binary ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEnd {
    /// Welcomed by an operator of this version.
    Welcomed(String),
    /// Exited otherwise, with its status and the last line it wrote.
    Failed { status: String, last_line: String },
    /// Still going at the deadline (killed).
    TimedOut,
    /// Could not be started.
    NotStarted(String),
}

/// Why a probe's end means a rollback (`None`: the new agent is proven).
pub fn rollback_reason(end: &ProbeEnd, new: &Path, deadline: Duration) -> Option<String> {
    let new = new.display();
    match end {
        ProbeEnd::Welcomed(_) => None,
        ProbeEnd::TimedOut => Some(format!(
            "the new agent ({new}) did not reach the operator within {} s",
            deadline.as_secs()
        )),
        ProbeEnd::Failed { status, last_line } if last_line.is_empty() => Some(format!(
            "the new agent ({new}) did not reach the operator: it {status}"
        )),
        ProbeEnd::Failed { status, last_line } => Some(format!(
            "the new agent ({new}) did not reach the operator: it {status}: {last_line}"
        )),
        ProbeEnd::NotStarted(e) => Some(format!("the new agent ({new}) does not start: {e}")),
    }
}

/// The file a process runs, by identity: replacing the file at the path
/// (dpkg unpacks beside it and renames) gives another identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exe {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Exe {
    /// The file at `path` now.
    pub fn at(path: &Path) -> Option<Exe> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Exe {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Whether another file is at the path now (a missing one is not a
    /// replacement: the package was removed, and nothing is handed over).
    pub fn replaced(&self) -> bool {
        Exe::at(&self.path).is_some_and(|now| now != *self)
    }
}

/// Copy the binary this process runs (even when its path was replaced or
/// removed) to `to`, privately.
pub fn keep_running_binary(to: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read("/proc/self/exe")?;
    tenet_protocol::host::write_atomically(to, &bytes, 0o700)
}

/// Put `previous` back at `exe`: written beside it, then renamed over it.
pub fn restore(previous: &Path, exe: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(previous)?;
    tenet_protocol::host::write_atomically(exe, &bytes, 0o755)
}

/// Run `new probe --config CONFIG --timeout DEADLINE` (it tries until the
/// deadline) until it ends; killed a little after the deadline.
pub async fn probe(new: &Path, config: &Path, deadline: Duration) -> ProbeEnd {
    let child = tokio::process::Command::new(new)
        .arg("probe")
        .arg("--config")
        .arg(config)
        .arg("--timeout")
        .arg(deadline.as_secs().max(1).to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return ProbeEnd::NotStarted(e.to_string()),
    };
    let grace = Duration::from_secs(5);
    match tokio::time::timeout(deadline + grace, child.wait_with_output()).await {
        Err(_) => ProbeEnd::TimedOut,
        Ok(Err(e)) => ProbeEnd::NotStarted(e.to_string()),
        Ok(Ok(out)) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = |text: &str| {
                text.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .chars()
                    .take(300)
                    .collect::<String>()
            };
            match stdout.lines().find_map(|l| l.strip_prefix(WELCOMED)) {
                Some(version) if out.status.success() => ProbeEnd::Welcomed(version.trim().into()),
                _ => ProbeEnd::Failed {
                    status: exit_words(&out.status),
                    last_line: last(&stderr),
                },
            }
        }
    }
}

/// What `tenet-agent probe` prints when the operator welcomed it.
pub const WELCOMED: &str = "welcomed by operator ";

fn exit_words(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended".into(),
    }
}

fn state_path(data: &Path) -> PathBuf {
    data.join("handover").join("state")
}

pub fn read_state(data: &Path) -> Option<Handover> {
    tenet_protocol::wire::decode(&std::fs::read(state_path(data)).ok()?).ok()
}

pub fn write_state(data: &Path, state: &Handover) -> std::io::Result<()> {
    tenet_protocol::host::write_atomically(
        &state_path(data),
        &tenet_protocol::wire::encode(state),
        0o600,
    )
}

pub fn clear_state(data: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(state_path(data)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The SHA-256 of a file (`None`: unreadable).
pub fn file_sha256(path: &Path) -> Option<[u8; 32]> {
    std::fs::read(path)
        .ok()
        .map(|b| tenet_protocol::wire::sha256(&b))
}

/// The rollback record in `data`, if any.
pub fn read_record(data: &Path) -> Option<RolledBack> {
    tenet_protocol::wire::decode(&std::fs::read(data.join("rolled-back")).ok()?).ok()
}

pub fn write_record(data: &Path, record: &RolledBack) -> std::io::Result<()> {
    tenet_protocol::host::write_atomically(
        &data.join("rolled-back"),
        &tenet_protocol::wire::encode(record),
        0o600,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenet_protocol::inventory::{Package, PackageManager};

    #[test]
    fn only_the_rolled_back_version_of_the_agent_package_is_flagged() {
        let record = RolledBack {
            package_version: "0.2.1".into(),
            reason: "the new agent (/usr/bin/tenet-agent) did not reach the operator within 60 s"
                .into(),
            at_ms: 5,
            restored_sha256: [7; 32],
        };
        let mut inventory = Inventory {
            packages: vec![
                Package::installed("tenet-agent", "0.2.1", PackageManager::Dpkg),
                Package::installed("browser-a", "0.2.1", PackageManager::Dpkg),
            ],
            ..Default::default()
        };
        flag(&mut inventory, &record);
        assert_eq!(
            inventory.packages[0].problems,
            vec![
                "rolled back to the previous agent: the new agent (/usr/bin/tenet-agent) did not reach the operator within 60 s"
                    .to_string()
            ]
        );
        assert!(inventory.packages[1].problems.is_empty());
        // A later version installed since: the record says nothing of it.
        let mut later = Inventory {
            packages: vec![Package::installed(
                "tenet-agent",
                "0.2.2",
                PackageManager::Dpkg,
            )],
            ..Default::default()
        };
        flag(&mut later, &record);
        assert!(later.packages[0].problems.is_empty());
    }

    #[test]
    fn a_rolled_back_report_keeps_the_evidence_and_says_why() {
        let held = ExecutionReport {
            terminal: "ward-01".into(),
            envelope_digest: [1; 32],
            nonce: [2; 32],
            payload_digest: [3; 32],
            outcome: Outcome::Exited { code: 0 },
            output_tail: b"Setting up tenet-agent (0.2.1) ...\n".to_vec(),
            observed: None,
            started_at_ms: 10,
            finished_at_ms: 20,
        };
        let now = Inventory::default();
        let r = rolled_back_report(held.clone(), "it exited with 1", Some(now.clone()), 30);
        assert_eq!(
            (
                r.envelope_digest,
                r.nonce,
                r.payload_digest,
                r.output_tail.clone()
            ),
            (
                held.envelope_digest,
                held.nonce,
                held.payload_digest,
                held.output_tail
            )
        );
        assert_eq!(
            r.outcome,
            Outcome::Refused {
                reason: "RolledBack".into(),
                message: "it exited with 1".into()
            }
        );
        assert_eq!(
            (r.observed, r.started_at_ms, r.finished_at_ms),
            (Some(now), 10, 30)
        );
    }

    #[test]
    fn each_way_a_probe_fails_is_a_reason_to_roll_back() {
        let new = Path::new("/usr/bin/tenet-agent");
        let d = Duration::from_secs(60);
        assert_eq!(
            rollback_reason(&ProbeEnd::Welcomed("0.2.0".into()), new, d),
            None
        );
        assert_eq!(
            rollback_reason(&ProbeEnd::TimedOut, new, d).as_deref(),
            Some("the new agent (/usr/bin/tenet-agent) did not reach the operator within 60 s")
        );
        assert_eq!(
            rollback_reason(
                &ProbeEnd::Failed {
                    status: "exited with 1".into(),
                    last_line: "tenet-agent: TLS: bad certificate".into()
                },
                new,
                d
            )
            .as_deref(),
            Some(
                "the new agent (/usr/bin/tenet-agent) did not reach the operator: it exited with 1: tenet-agent: TLS: bad certificate"
            )
        );
        assert_eq!(
            rollback_reason(&ProbeEnd::NotStarted("Exec format error".into()), new, d).as_deref(),
            Some("the new agent (/usr/bin/tenet-agent) does not start: Exec format error")
        );
    }

    #[test]
    fn an_agent_that_starts_mid_handover_ends_it() {
        assert_eq!(at_start(None), AtStart::ReleaseHeld);
        assert_eq!(
            at_start(Some(Handover::Proving { since_ms: 1 })),
            AtStart::Prove
        );
        assert_eq!(
            at_start(Some(Handover::RollingBack {
                reason: "it exited with 1".into()
            })),
            AtStart::FinishRollBack {
                reason: "it exited with 1".into()
            }
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("handover")).expect("mkdir");
        assert_eq!(read_state(dir.path()), None);
        let proving = Handover::Proving { since_ms: 9 };
        write_state(dir.path(), &proving).expect("write");
        assert_eq!(read_state(dir.path()), Some(proving));
        clear_state(dir.path()).expect("clear");
        clear_state(dir.path()).expect("clearing twice is no error");
        assert_eq!(read_state(dir.path()), None);
    }

    #[test]
    fn a_file_replaced_at_the_path_is_another_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenet-agent");
        std::fs::write(&path, b"one").expect("write");
        let exe = Exe::at(&path).expect("there");
        assert!(!exe.replaced());
        std::fs::write(dir.path().join("new"), b"two").expect("write");
        std::fs::rename(dir.path().join("new"), &path).expect("rename");
        assert!(exe.replaced());
        std::fs::remove_file(&path).expect("rm");
        assert!(!exe.replaced(), "removed is not replaced");
    }
}

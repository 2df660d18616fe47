//! What `tenet status` shows: written by the running operator to
//! `DATA/status.json` whenever it changes (the database allows one process,
//! so the CLI reads this file rather than the database), and printed for a
//! person or as JSON.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::reconcile::pass::PolicyStatus;
use crate::reconcile::state::PairState;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub policies: Vec<PolicyLine>,
    pub terminals: Vec<TerminalLine>,
    /// Reports and inventories refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Errors in the policy directory (the last good version of an affected
    /// policy stays in force).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_errors: Vec<String>,
    /// The git commit of the policy directory, when it is a git checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_revision: Option<String>,
}

/// A policy's line: the pass's own status.
pub type PolicyLine = PolicyStatus;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerminalLine {
    pub terminal: String,
    pub connected: bool,
    /// When the operator last received its inventory (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_inventory_ms: Option<u64>,
    /// Since when it is offline (unix ms), when it was connected before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since_ms: Option<u64>,
    /// Its TPM: `none`, `proven`, or `claimed: <why not proven>`.
    #[serde(default)]
    pub tpm: String,
    /// The version its agent said on its latest session (absent: none
    /// since the operator's upgrade to 0.2).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    pub policies: Vec<PairLine>,
    /// Its security certificate, when a policy asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertLine>,
}

/// A terminal's security certificate as people and tests read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertLine {
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<u64>,
    /// `passed (quoted)`, `failed: <reason>`, `requested`, `none`.
    pub audit: String,
    pub conditions: Vec<crate::reconcile::posture::CertCondition>,
}

fn cert_line(record: &crate::reconcile::posture::CertRecord, now_ms: u64) -> CertLine {
    use crate::reconcile::posture::{Audit, conditions};
    let i = record.issued.as_ref();
    CertLine {
        policy: record.policy.clone(),
        level: i.map(|i| i.level),
        serial: i.map(|i| hex::encode(i.serial)),
        not_before_ms: i.map(|i| i.not_before_ms),
        not_after_ms: i.map(|i| i.not_after_ms),
        audit: match &record.audit {
            Audit::None => "none".into(),
            Audit::Requested { .. } => "requested".into(),
            Audit::Passed { attestation, .. } => format!("passed ({attestation:?})"),
            Audit::Failed { reason, .. } => format!("failed: {reason}"),
        },
        conditions: conditions(record, now_ms),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairLine {
    pub policy: String,
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub attempts: u32,
}

fn pair_line(policy: String, state: &PairState) -> PairLine {
    let (reason, attempts) = match state {
        PairState::Drifted {
            attempts, reason, ..
        } => (reason.clone(), *attempts),
        PairState::Failed { attempts, reason } => (reason.clone(), *attempts),
        PairState::Dispatched { attempt, .. } | PairState::Verifying { attempt, .. } => {
            (String::new(), *attempt)
        }
        PairState::Compliant | PairState::Unknown => (String::new(), 0),
    };
    PairLine {
        policy,
        state: state.name().to_string(),
        reason,
        attempts,
    }
}

/// The status from the store, the pass's policy counts and who is connected.
pub fn collect(
    store: &Store,
    policies: &[PolicyStatus],
    connected: &[String],
    refused: BTreeMap<&'static str, u64>,
    policy_errors: &[String],
    now_ms: u64,
) -> Result<Status, StoreError> {
    let mut by_terminal: BTreeMap<String, Vec<PairLine>> = BTreeMap::new();
    for (terminal, policy, record) in store.pairs() {
        by_terminal
            .entry(terminal)
            .or_default()
            .push(pair_line(policy, &record.state));
    }
    let connected: std::collections::HashSet<&str> = connected.iter().map(String::as_str).collect();
    let mut certificates: BTreeMap<String, CertLine> = store
        .certificates()
        .into_iter()
        .map(|(t, r)| (t, cert_line(&r, now_ms)))
        .collect();
    let mut terminals = Vec::new();
    for (name, record) in store.terminals() {
        let online = connected.contains(name.as_str());
        terminals.push(TerminalLine {
            certificate: certificates.remove(&name),
            connected: online,
            last_inventory_ms: store.inventory(&name).map(|i| i.received_ms),
            offline_since_ms: (!online && record.offline_since_ms > 0)
                .then_some(record.offline_since_ms),
            tpm: match &record.tpm_trust {
                crate::tpm_trust::TpmTrust::None => "none".into(),
                crate::tpm_trust::TpmTrust::Proven { .. } => "proven".into(),
                crate::tpm_trust::TpmTrust::Claimed { reason } => format!("claimed: {reason}"),
            },
            policies: by_terminal.remove(&name).unwrap_or_default(),
            agent_version: record.agent_version,
            terminal: name,
        });
    }
    Ok(Status {
        policies: policies.to_vec(),
        terminals,
        refused: refused
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        policy_errors: policy_errors.to_vec(),
        source_revision: None,
    })
}

/// Print the fleet: each policy with counts by state.
pub fn print(status: &Status, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<40} {:>4} {:>9} {:>8} {:>11} {:>6}",
        "POLICY", "GEN", "COMPLIANT", "DRIFTED", "REMEDIATING", "FAILED"
    )?;
    for p in &status.policies {
        writeln!(
            out,
            "{:<40} {:>4} {:>5}/{:<3} {:>8} {:>11} {:>6}{}",
            p.policy,
            p.generation,
            p.compliant,
            p.selected,
            p.drifted,
            p.remediating,
            p.failed,
            p.held
                .as_deref()
                .map(|h| format!("  held: {h}"))
                .unwrap_or_default()
        )?;
        if let Some(u) = &p.unapproved {
            writeln!(out, "  UNAPPROVED: {u}")?;
        }
    }
    if let Some(rev) = &status.source_revision {
        writeln!(out, "\npolicies at git commit {rev}")?;
    }
    let online = status.terminals.iter().filter(|t| t.connected).count();
    writeln!(
        out,
        "\n{} terminal(s), {} connected",
        status.terminals.len(),
        online
    )?;
    let certs: Vec<&CertLine> = status
        .terminals
        .iter()
        .filter_map(|t| t.certificate.as_ref())
        .collect();
    if !certs.is_empty() {
        let count = |type_: &str, reason: Option<&str>| {
            certs
                .iter()
                .filter(|c| {
                    c.conditions.iter().any(|k| {
                        k.type_ == type_ && reason.map_or(k.status == "True", |r| k.reason == r)
                    })
                })
                .count()
        };
        writeln!(
            out,
            "security certificates: {} ready, {} renewing, {} expired, {} withheld, {} awaiting audit",
            count("Ready", None),
            count("Renewing", None),
            count("Expired", None),
            count("Ready", Some("Withheld")),
            count("Ready", Some("AwaitingAudit")),
        )?;
    }
    for e in &status.policy_errors {
        writeln!(
            out,
            "policy error (the last good version stays in force): {e}"
        )?;
    }
    if !status.refused.is_empty() {
        let r: Vec<String> = status
            .refused
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(out, "refused messages: {}", r.join(", "))?;
    }
    Ok(())
}

/// Print one terminal: per policy its state and why.
pub fn print_terminal(status: &Status, name: &str, out: &mut dyn Write) -> std::io::Result<bool> {
    let Some(t) = status.terminals.iter().find(|t| t.terminal == name) else {
        return Ok(false);
    };
    writeln!(
        out,
        "{}: {}{}",
        t.terminal,
        match (t.connected, t.offline_since_ms) {
            (true, _) => "connected".to_string(),
            (false, Some(ms)) => format!("offline since {}", crate::time::rfc3339(ms)),
            (false, None) => "offline (never connected)".to_string(),
        },
        t.last_inventory_ms
            .map(|ms| format!(", last inventory {}", crate::time::rfc3339(ms)))
            .unwrap_or_default()
    )?;
    if !t.agent_version.is_empty() {
        writeln!(out, "  agent {}", t.agent_version)?;
    }
    if t.tpm != "none" && !t.tpm.is_empty() {
        writeln!(out, "  TPM {}", t.tpm)?;
    }
    for p in &t.policies {
        let attempts = if p.attempts > 0 {
            format!(" (attempt {})", p.attempts)
        } else {
            String::new()
        };
        let reason = if p.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", p.reason)
        };
        writeln!(out, "  {:<11} {}{attempts}{reason}", p.state, p.policy)?;
    }
    if let Some(c) = &t.certificate {
        let ready = c.conditions.iter().find(|k| k.type_ == "Ready");
        writeln!(
            out,
            "  certificate ({}): {}{}; audit {}",
            c.policy,
            match (c.level, c.not_after_ms) {
                (Some(l), Some(until)) => format!(
                    "level {l}, serial {}, until {}",
                    c.serial.as_deref().unwrap_or("?"),
                    crate::time::rfc3339(until)
                ),
                _ => "none".to_string(),
            },
            ready
                .map(|r| format!(
                    " [Ready={} {}{}]",
                    r.status,
                    r.reason,
                    if r.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.message)
                    }
                ))
                .unwrap_or_default(),
            c.audit
        )?;
    }
    Ok(true)
}

/// Read `DATA/status.json`.
pub fn read(data: &Path) -> Result<Status, String> {
    let path = data.join("status.json");
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "{}: {e} (is `tenet operator --data {}` running?)",
            path.display(),
            data.display()
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Pairs compliant, pairs selected and pairs in flight over every policy.
fn totals(status: &Status) -> (u32, u32, u32) {
    status.policies.iter().fold((0, 0, 0), |(c, s, r), p| {
        (c + p.compliant, s + p.selected, r + p.remediating)
    })
}

/// Wait, drawing a progress bar on `out`, until at least `terminals` are
/// connected, nothing is in flight, no drift is waiting for a remediation
/// (a retry after a failure waits its backoff) and the counts have not
/// changed for two seconds. Polls the status file the operator rewrites.
pub fn wait_settled(
    data: &Path,
    terminals: usize,
    timeout: std::time::Duration,
    out: &mut dyn Write,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut last: Option<(Vec<PolicyLine>, std::time::Instant)> = None;
    let mut drawn = String::new();
    loop {
        if let Ok(status) = read(data) {
            let connected = status.terminals.iter().filter(|t| t.connected).count();
            let (compliant, selected, remediating) = totals(&status);
            let width = 30usize;
            let filled = (compliant as usize * width)
                .checked_div(selected as usize)
                .unwrap_or(0)
                .min(width);
            let line = format!(
                "\r[{}{}] {compliant}/{selected} compliant, {remediating} remediating, {connected}/{terminals} terminals connected, {:.0} s   ",
                "#".repeat(filled),
                ".".repeat(width - filled),
                started.elapsed().as_secs_f64()
            );
            if line != drawn {
                let _ = write!(out, "{line}");
                let _ = out.flush();
                drawn = line;
            }
            let unchanged_since = match &last {
                Some((p, since)) if *p == status.policies => *since,
                _ => std::time::Instant::now(),
            };
            let waiting: u32 = status
                .policies
                .iter()
                .filter(|p| p.remediates && p.held.is_none())
                .map(|p| p.drifted)
                .sum();
            if connected >= terminals
                && remediating == 0
                && waiting == 0
                && unchanged_since.elapsed() >= std::time::Duration::from_secs(2)
            {
                let _ = writeln!(out);
                return Ok(());
            }
            last = Some((status.policies, unchanged_since));
        }
        if started.elapsed() > timeout {
            let _ = writeln!(out);
            return Err(format!(
                "the fleet did not settle within {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

//! Execution reports: what the terminal says happened, carrying the
//! dispatch's nonce back as evidence, signed by the terminal's identity key.
//! The operator keeps only a commitment (a hash) of each nonce, so nothing
//! it stores lets anyone forge a report.

use serde::{Deserialize, Serialize};

use crate::bundle::MAX_NAME;
use crate::inventory::Inventory;
use crate::keys::PublicKey;
use crate::reject::Rejection;
use crate::wire::{Kind, Message, SignedMessage, digest_string, limit, sha256};

/// How a dispatch ended on the terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The payload ran to the end; its exit code (0 = success).
    Exited { code: i32 },
    /// The module trapped (a fault, a memory limit, a denied call).
    Trapped { message: String },
    /// The time limit stopped it.
    TimedOut,
    /// The agent refused to run it; `reason` is the rejection's word.
    Refused { reason: String, message: String },
}

/// The refusal reason of a report whose payload installed a new agent
/// binary that did not prove itself and was rolled back (the agent's
/// self-update).
pub const ROLLED_BACK: &str = "RolledBack";

impl Outcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Exited { code: 0 })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionReport {
    pub terminal: String,
    /// Body digest of the envelope this answers.
    pub envelope_digest: [u8; 32],
    /// The envelope's nonce: the evidence.
    pub nonce: [u8; 32],
    pub payload_digest: [u8; 32],
    pub outcome: Outcome,
    /// The last bytes of the payload's output.
    #[serde(with = "serde_bytes")]
    pub output_tail: Vec<u8>,
    /// The inventory observed after the run.
    pub observed: Option<Inventory>,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

pub const MAX_OUTPUT_TAIL: usize = 8 * 1024;
pub const MAX_MESSAGE_TEXT: usize = 4096;

impl Message for ExecutionReport {
    const KIND: Kind = Kind::ExecutionReport;

    fn check(&self) -> Result<(), Rejection> {
        limit("the terminal name", self.terminal.len(), MAX_NAME * 2)?;
        limit("the output tail", self.output_tail.len(), MAX_OUTPUT_TAIL)?;
        match &self.outcome {
            Outcome::Trapped { message } => {
                limit("the trap message", message.len(), MAX_MESSAGE_TEXT)?
            }
            Outcome::Refused { reason, message } => {
                limit("the refusal reason", reason.len(), MAX_NAME)?;
                limit("the refusal message", message.len(), MAX_MESSAGE_TEXT)?;
            }
            _ => {}
        }
        if let Some(inv) = &self.observed {
            inv.check()?;
        }
        Ok(())
    }
}

/// The hash the operator keeps in place of a nonce.
pub fn nonce_commitment(nonce: &[u8; 32]) -> [u8; 32] {
    let mut input = b"tenet.dev/nonce-commitment\0".to_vec();
    input.extend_from_slice(nonce);
    sha256(&input)
}

/// The envelope's deadline bounds the run; its report may take this much
/// longer to arrive (a payload stopped at its deadline still reports).
pub const REPORT_GRACE_MS: u64 = 60_000;

/// What the operator keeps of a dispatch until its report arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchRecord {
    pub terminal: String,
    pub envelope_digest: [u8; 32],
    pub nonce_commitment: [u8; 32],
    pub payload_digest: [u8; 32],
    pub deadline_ms: u64,
    /// A verified report was already accepted for this dispatch.
    pub consumed: bool,
}

/// Verify a report against the dispatch it answers and the terminal's
/// registered key. On success the caller marks the record consumed.
pub fn verify_report(
    bytes: &[u8],
    terminal_key: &PublicKey,
    record: &DispatchRecord,
    now_ms: u64,
) -> Result<ExecutionReport, Rejection> {
    let frame = SignedMessage::decode(bytes, Kind::ExecutionReport)?;
    frame.verify_by(terminal_key)?;
    let report: ExecutionReport = frame.open()?;
    check_report(&report, record, now_ms)?;
    Ok(report)
}

/// The checks of [`verify_report`] after the signature: a pure function of
/// the report, the record and the time.
pub fn check_report(
    report: &ExecutionReport,
    record: &DispatchRecord,
    now_ms: u64,
) -> Result<(), Rejection> {
    if report.terminal != record.terminal {
        return Err(Rejection::WrongTerminal {
            expected: record.terminal.clone(),
            found: report.terminal.clone(),
        });
    }
    if report.envelope_digest != record.envelope_digest {
        return Err(Rejection::Malformed(format!(
            "the report answers envelope {}, not {}",
            digest_string(&report.envelope_digest),
            digest_string(&record.envelope_digest)
        )));
    }
    if nonce_commitment(&report.nonce) != record.nonce_commitment {
        return Err(Rejection::NonceMismatch);
    }
    if report.payload_digest != record.payload_digest {
        return Err(Rejection::WrongPayloadDigest {
            expected: digest_string(&record.payload_digest),
            found: digest_string(&report.payload_digest),
        });
    }
    if record.consumed {
        return Err(Rejection::Replay(
            "a report for this dispatch was already accepted".into(),
        ));
    }
    let last_call = record.deadline_ms.saturating_add(REPORT_GRACE_MS);
    if now_ms > last_call {
        return Err(Rejection::Expired {
            deadline_ms: last_call,
            now_ms,
        });
    }
    Ok(())
}

/// Verify many reports at once. Ed25519 signatures are checked in one
/// batch (faster than one by one); on a batch failure each is checked alone
/// so the bad ones are named. Returns one result per input.
pub fn verify_reports_batch(
    items: &[(&[u8], &PublicKey, &DispatchRecord)],
    now_ms: u64,
) -> Vec<Result<ExecutionReport, Rejection>> {
    let mut frames = Vec::with_capacity(items.len());
    for (bytes, key, _) in items {
        frames.push(
            SignedMessage::decode(bytes, Kind::ExecutionReport).and_then(|f| {
                let fp = key.fingerprint();
                match f.signatures.iter().find(|s| s.key == fp) {
                    Some(_) => Ok(f),
                    None => f.verify_by(key).map(|_| f),
                }
            }),
        );
    }
    // Gather the Ed25519 signatures of well-formed frames.
    let mut inputs = Vec::new();
    let mut sigs = Vec::new();
    let mut keys = Vec::new();
    let mut batchable = vec![false; items.len()];
    for (i, frame) in frames.iter().enumerate() {
        let (Ok(f), PublicKey::Ed25519(k)) = (frame, items[i].1) else {
            continue;
        };
        let fp = items[i].1.fingerprint();
        let Some(entry) = f.signatures.iter().find(|s| s.key == fp) else {
            continue;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&entry.signature) else {
            continue;
        };
        inputs.push(SignedMessage::signing_input(f.kind, &f.body));
        sigs.push(sig);
        keys.push(*k);
        batchable[i] = true;
    }
    let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let batch_ok = !refs.is_empty() && ed25519_dalek::verify_batch(&refs, &sigs, &keys).is_ok();
    frames
        .into_iter()
        .enumerate()
        .map(|(i, frame)| {
            let f = frame?;
            let (_, key, record) = items[i];
            if !(batch_ok && batchable[i]) {
                f.verify_by(key)?;
            }
            let report: ExecutionReport = f.open()?;
            check_report(&report, record, now_ms)?;
            Ok(report)
        })
        .collect()
}

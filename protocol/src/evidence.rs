//! The evidence history: an append-only, hash-chained log of what the
//! operator recorded of each terminal: the identity key it enrolled, every
//! envelope it signed and sent, every report it took (and the verdict),
//! every report it refused (and why). Each entry names the hash of the
//! one before it, so no entry can be changed, dropped or reordered
//! without breaking every hash after it.
//!
//! What an auditor receives ([`Export`]) is the chain of one terminal:
//! its entries whole, the other terminals' as their hashes only, so the
//! chain still verifies end to end. [`verify`] checks it with only the
//! public keys the auditor holds (the admins' and the operator's dispatch
//! keys), not trusting the operator:
//! - the chain links;
//! - every envelope is signed by a dispatch key, names this terminal, and
//!   carries an approval K admins signed that covers exactly what it asks
//!   (`approval::check_envelope`, what the terminal itself checked);
//! - every report is signed by the identity key the terminal enrolled
//!   with, names this terminal, and a report taken answers an envelope of
//!   the chain with that envelope's nonce: the evidence it ran that very
//!   dispatch.

use serde::{Deserialize, Serialize};

use crate::approval::check_envelope;
use crate::envelope::DispatchEnvelope;
use crate::keys::PublicKey;
use crate::report::{ExecutionReport, Outcome};
use crate::wire::{Kind, SignedMessage, decode, digest_string, encode, sha256};

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The chain's link before it (zeros for the first).
    pub prev: [u8; 32],
    /// The body digest of the same terminal's entry before it (zeros for
    /// its first): an export cannot leave one of the terminal's own
    /// entries out as if it were another's.
    pub own_prev: [u8; 32],
    /// When the operator recorded it (unix ms).
    pub at_ms: u64,
    pub terminal: String,
    pub record: Record,
}

/// What an entry records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// The terminal enrolled (or was known when the log began) with this
    /// identity key.
    Enrolled { identity: PublicKey },
    /// An envelope the operator signed and sent, as sent.
    Dispatched {
        #[serde(with = "serde_bytes")]
        envelope: Vec<u8>,
    },
    /// A report the operator took, as received; `verdict` is what it
    /// made of it (`verified`, or why the attempt failed).
    Reported {
        #[serde(with = "serde_bytes")]
        report: Vec<u8>,
        verdict: String,
    },
    /// A message the operator refused, and why: its digest, its size and
    /// its first bytes (an agent sending junk cannot fill the log).
    Refused {
        sha256: [u8; 32],
        size: u64,
        #[serde(with = "serde_bytes")]
        head: Vec<u8>,
        reason: String,
    },
}

/// The chain's next link: the hash the next entry names, from the link
/// before it and this entry's body digest. An export can give an entry of
/// another terminal as its body digest alone and the chain still links
/// through it.
pub fn link(prev: &[u8; 32], body_digest: &[u8; 32]) -> [u8; 32] {
    sha256(&[b"tenet-evidence-1:".as_slice(), prev, body_digest].concat())
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, String> {
        decode(bytes).map_err(|e| e.to_string())
    }

    /// The digest of everything but its link: when, whose, what, and its
    /// link to the terminal's entry before it.
    pub fn body_digest(&self) -> [u8; 32] {
        sha256(&encode(&(
            &self.own_prev,
            self.at_ms,
            &self.terminal,
            &self.record,
        )))
    }
}

/// One terminal's chain, as an auditor receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub terminal: String,
    /// The whole chain, in order.
    pub items: Vec<Item>,
}

/// An entry of the chain in an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    /// An entry of the terminal's, encoded as it was hashed.
    Entry(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Another terminal's entry (or one before `--since`): its body
    /// digest ([`Entry::body_digest`]).
    Elided([u8; 32]),
}

/// The keys an auditor checks an export with.
#[derive(Debug, Clone)]
pub struct AuditorKeys {
    pub admin_keys: Vec<PublicKey>,
    pub threshold: usize,
    /// Every dispatch key the operator used (one per trust version).
    pub dispatch_keys: Vec<PublicKey>,
}

/// What one entry of the terminal's proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Its position in the chain (0-based).
    pub index: usize,
    pub at_ms: u64,
    /// What it is, as a person reads it.
    pub what: String,
}

/// Why an export does not verify: the first entry that fails, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {index}: {message}")]
pub struct Broken {
    pub index: usize,
    pub message: String,
}

/// The whole entries of a chain, by position, and the link after each item.
type Followed = (Vec<(usize, Entry)>, Vec<[u8; 32]>);

/// Follow the chain: the whole entries in it, each linked to what came
/// before, and the link after each item.
fn follow(export: &Export) -> Result<Followed, Broken> {
    let mut prev = [0u8; 32];
    // The body digest of the terminal's last whole entry.
    let mut own = [0u8; 32];
    let mut whole = Vec::new();
    let mut links = Vec::with_capacity(export.items.len());
    for (index, item) in export.items.iter().enumerate() {
        let broken = |message: String| Broken { index, message };
        let body = match item {
            Item::Elided(body) => *body,
            Item::Entry(bytes) => {
                let entry =
                    Entry::decode(bytes).map_err(|e| broken(format!("cannot be read: {e}")))?;
                if entry.prev != prev {
                    return Err(broken(format!(
                        "the chain breaks here: it follows {}, but the chain before it ends in {}",
                        digest_string(&entry.prev),
                        digest_string(&prev)
                    )));
                }
                if entry.terminal != export.terminal {
                    return Err(broken(format!(
                        "it is of terminal {:?}, not {:?}",
                        entry.terminal, export.terminal
                    )));
                }
                if entry.own_prev != own {
                    return Err(broken(format!(
                        "an entry of this terminal's is withheld before it: it follows its entry {}, but the one before it in the export is {}",
                        digest_string(&entry.own_prev),
                        digest_string(&own)
                    )));
                }
                let body = entry.body_digest();
                own = body;
                whole.push((index, entry));
                body
            }
        };
        prev = link(&prev, &body);
        links.push(prev);
    }
    Ok((whole, links))
}

/// What a verified export proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Each entry of the terminal's, in order.
    pub checked: Vec<Checked>,
    /// The chain's last link: record it, and a later export must pass
    /// through it (`anchor`), or something up to it was changed.
    pub head: [u8; 32],
}

/// Check an export with the auditor's keys: every entry of the terminal,
/// in order, or the first that fails and why. The chain alone shows the
/// entries were not changed relative to its head; `anchor`, a head the
/// auditor recorded from an earlier export, must be one of its links:
/// then nothing up to it changed since.
pub fn verify(
    export: &Export,
    keys: &AuditorKeys,
    anchor: Option<[u8; 32]>,
) -> Result<Verified, Broken> {
    let (entries, links) = follow(export)?;
    if let Some(a) = anchor
        && !links.contains(&a)
    {
        return Err(Broken {
            index: export.items.len(),
            message: format!(
                "the chain does not pass through the head recorded before, {}: something up to it was changed or dropped since",
                digest_string(&a)
            ),
        });
    }
    let head = links.last().copied().unwrap_or([0; 32]);
    let mut identity: Option<PublicKey> = None;
    // Envelopes sent.
    struct Sent {
        digest: [u8; 32],
        nonce: [u8; 32],
        policy: String,
        payload: [u8; 32],
    }
    let mut sent: Vec<Sent> = Vec::new();
    // Reports taken, by the envelope they answer: their bytes.
    let mut answered: Vec<([u8; 32], Vec<u8>)> = Vec::new();
    let mut checked = Vec::with_capacity(entries.len());
    for (index, entry) in entries {
        let broken = |message: String| Broken { index, message };
        let what = match &entry.record {
            Record::Enrolled { identity: key } => {
                identity = Some(key.clone());
                format!("enrolled with identity key {}", key.fingerprint())
            }
            Record::Dispatched { envelope } => {
                let frame = SignedMessage::decode(envelope, Kind::DispatchEnvelope)
                    .map_err(|e| broken(format!("the envelope cannot be read: {e}")))?;
                if !keys
                    .dispatch_keys
                    .iter()
                    .any(|k| frame.verify_by(k).is_ok())
                {
                    return Err(broken(
                        "the envelope is not signed by any of the operator's dispatch keys given"
                            .into(),
                    ));
                }
                let env: DispatchEnvelope = frame
                    .open()
                    .map_err(|e| broken(format!("the envelope cannot be read: {e}")))?;
                if env.terminal != export.terminal {
                    return Err(broken(format!(
                        "the envelope is for terminal {:?}",
                        env.terminal
                    )));
                }
                let approved = check_envelope(&env, &keys.admin_keys, keys.threshold)
                    .map_err(|e| broken(format!("the envelope is not approved: {e}")))?;
                sent.push(Sent {
                    digest: frame.body_digest(),
                    nonce: env.nonce,
                    policy: env.policy.clone(),
                    payload: env.payload_digest,
                });
                format!(
                    "dispatched {} generation {}: payload {}, {} argument(s), approved by {} admin(s)",
                    env.policy,
                    env.policy_generation,
                    digest_string(&env.payload_digest),
                    env.args.len(),
                    approved.signers.len()
                )
            }
            Record::Reported { report, verdict } => {
                let Some(key) = &identity else {
                    return Err(broken(
                        "a report before any enrolment of the terminal: no key to check it with"
                            .into(),
                    ));
                };
                let frame = SignedMessage::decode(report, Kind::ExecutionReport)
                    .map_err(|e| broken(format!("the report cannot be read: {e}")))?;
                frame.verify_by(key).map_err(|e| {
                    broken(format!(
                        "the report is not signed by the terminal's identity key {}: {e}",
                        key.fingerprint()
                    ))
                })?;
                let r: ExecutionReport = frame
                    .open()
                    .map_err(|e| broken(format!("the report cannot be read: {e}")))?;
                if r.terminal != export.terminal {
                    return Err(broken(format!(
                        "the report is from terminal {:?}",
                        r.terminal
                    )));
                }
                let Some(Sent {
                    nonce,
                    policy,
                    payload,
                    ..
                }) = sent.iter().find(|s| s.digest == r.envelope_digest)
                else {
                    return Err(broken(format!(
                        "the report answers envelope {}, which the chain never sent",
                        digest_string(&r.envelope_digest)
                    )));
                };
                if *nonce != r.nonce {
                    return Err(broken(
                        "the report does not carry its envelope's nonce".into(),
                    ));
                }
                if *payload != r.payload_digest {
                    return Err(broken(format!(
                        "the report says payload {} ran, not the envelope's {}",
                        digest_string(&r.payload_digest),
                        digest_string(payload)
                    )));
                }
                // One report per envelope; the same bytes again are a
                // crash's duplicate.
                match answered.iter().find(|(d, _)| *d == r.envelope_digest) {
                    Some((_, bytes)) if bytes != report => {
                        return Err(broken(
                            "a second, different report for the same envelope".into(),
                        ));
                    }
                    Some(_) => {}
                    None => answered.push((r.envelope_digest, report.clone())),
                }
                format!(
                    "reported on {policy} (envelope {}, its nonce back), finished {} by the terminal's clock: {} (operator's verdict: {verdict:?})",
                    digest_string(&r.envelope_digest),
                    timestamp(r.finished_at_ms),
                    outcome(&r.outcome)
                )
            }
            Record::Refused {
                sha256: digest,
                size,
                reason,
                ..
            } => {
                format!(
                    "refused a message of {size} byte(s), {}: {reason:?}",
                    digest_string(digest)
                )
            }
        };
        checked.push(Checked {
            index,
            at_ms: entry.at_ms,
            what,
        });
    }
    Ok(Verified { checked, head })
}

/// Text from the entries is quoted (`{:?}`): a verdict or a message cannot
/// forge lines of the listing.
fn outcome(o: &Outcome) -> String {
    match o {
        Outcome::Exited { code } => format!("exited {code}"),
        Outcome::Trapped { message } => format!("trapped: {message:?}"),
        Outcome::TimedOut => "timed out".into(),
        Outcome::Refused { reason, .. } => format!("refused by the terminal ({reason:?})"),
    }
}

fn timestamp(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
}

#[cfg(test)]
mod tests;

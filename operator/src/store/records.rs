//! The records the store keeps, as they are encoded (the protocol's
//! canonical encoding) in every backend.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenet_protocol::PublicKey;
use tenet_protocol::inventory::Inventory;
use tenet_protocol::report::DispatchRecord;
use tenet_protocol::wire::sha256;

use crate::reconcile::state::PairState;
use crate::tpm_trust::TpmTrust;

/// An enrolled terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalRecord {
    pub identity: PublicKey,
    /// The labels admins assigned it (on its bootstrap token): what
    /// policies select on. What it reports about itself is in its
    /// inventory, a claim (`claims.labels` in CEL).
    pub labels: BTreeMap<String, String>,
    pub tpm: bool,
    /// The TPM attestation key its quotes must be signed with.
    pub attestation_key: Option<PublicKey>,
    pub enrolled_at_ms: u64,
    /// The last envelope sequence number issued to it.
    pub last_sequence: u64,
    /// When its last connection ended (0: never connected, or connected now).
    pub offline_since_ms: u64,
    /// The mTLS client keys (SHA-256 of the SubjectPublicKeyInfo) its
    /// sessions may use, newest last: the key certified at enrolment, and
    /// after a renewal the old and the new one until the new one is used.
    /// A certificate for this name with any other key opens no session.
    pub client_keys: Vec<[u8; 32]>,
    /// Whether its TPM was proven at enrolment (`tpm` is only its claim).
    pub tpm_trust: TpmTrust,
    /// The labels it claimed in its enrolment request (kept for people to
    /// read; nothing selects on them).
    pub claimed_labels: BTreeMap<String, String>,
    /// The version its agent said on its latest session (empty: none
    /// since this operator's store format 2).
    pub agent_version: String,
}

/// A terminal as store format 1 (release 0.1) wrote it: no agent version.
#[derive(Serialize, Deserialize)]
struct TerminalRecordFormat1 {
    identity: PublicKey,
    labels: BTreeMap<String, String>,
    tpm: bool,
    attestation_key: Option<PublicKey>,
    enrolled_at_ms: u64,
    last_sequence: u64,
    offline_since_ms: u64,
    client_keys: Vec<[u8; 32]>,
    tpm_trust: TpmTrust,
    claimed_labels: BTreeMap<String, String>,
}

/// A terminal as written before labels were assigned by admins: its
/// `labels` were what it claimed.
#[derive(Serialize, Deserialize)]
struct TerminalRecordBeforeAssignedLabels {
    identity: PublicKey,
    labels: BTreeMap<String, String>,
    tpm: bool,
    attestation_key: Option<PublicKey>,
    enrolled_at_ms: u64,
    last_sequence: u64,
    offline_since_ms: u64,
    client_keys: Vec<[u8; 32]>,
    tpm_trust: TpmTrust,
}

impl TerminalRecord {
    /// Decode a terminal record of any store format. Format 1's has no
    /// agent version. One written before labels were assigned (an earlier
    /// shape of format 1) has the labels it claimed then, claims only now,
    /// and none assigned: admins assign them by enrolling it again with a
    /// labelled token. The canonical encoding tells the shapes apart: a
    /// record decodes as exactly one.
    pub fn decode(bytes: &[u8]) -> Result<TerminalRecord, tenet_protocol::Rejection> {
        use tenet_protocol::wire::decode;
        decode::<TerminalRecord>(bytes).or_else(|e| {
            if let Ok(old) = decode::<TerminalRecordFormat1>(bytes) {
                return Ok(TerminalRecord {
                    identity: old.identity,
                    labels: old.labels,
                    tpm: old.tpm,
                    attestation_key: old.attestation_key,
                    enrolled_at_ms: old.enrolled_at_ms,
                    last_sequence: old.last_sequence,
                    offline_since_ms: old.offline_since_ms,
                    client_keys: old.client_keys,
                    tpm_trust: old.tpm_trust,
                    claimed_labels: old.claimed_labels,
                    agent_version: String::new(),
                });
            }
            decode::<TerminalRecordBeforeAssignedLabels>(bytes)
                .map(|old| TerminalRecord {
                    identity: old.identity,
                    labels: BTreeMap::new(),
                    tpm: old.tpm,
                    attestation_key: old.attestation_key,
                    enrolled_at_ms: old.enrolled_at_ms,
                    last_sequence: old.last_sequence,
                    offline_since_ms: old.offline_since_ms,
                    client_keys: old.client_keys,
                    tpm_trust: old.tpm_trust,
                    claimed_labels: old.labels,
                    agent_version: String::new(),
                })
                .map_err(|_| e)
        })
    }
}

/// A bootstrap token, kept as its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The terminal name the token is for, when an admin bound it to one.
    pub terminal: Option<String>,
    pub expires_ms: u64,
    /// How many more terminals may enrol with it (1 for a one-time token).
    pub uses_left: u32,
    /// The labels admins assign the terminals that enrol with it.
    pub labels: BTreeMap<String, String>,
}

/// A token as written before tokens carried labels.
#[derive(Serialize, Deserialize)]
struct TokenRecordBeforeLabels {
    terminal: Option<String>,
    expires_ms: u64,
    uses_left: u32,
}

impl TokenRecord {
    /// Decode a token record, also one written before tokens carried
    /// labels (it assigns none).
    pub fn decode(bytes: &[u8]) -> Result<TokenRecord, tenet_protocol::Rejection> {
        use tenet_protocol::wire::decode;
        decode::<TokenRecord>(bytes).or_else(|e| {
            decode::<TokenRecordBeforeLabels>(bytes)
                .map(|old| TokenRecord {
                    terminal: old.terminal,
                    expires_ms: old.expires_ms,
                    uses_left: old.uses_left,
                    labels: BTreeMap::new(),
                })
                .map_err(|_| e)
        })
    }
}

/// The live dispatch of a pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDispatch {
    pub policy_generation: u64,
    /// When it was issued (the operator's clock).
    pub issued_ms: u64,
    pub sequence: u64,
    pub record: DispatchRecord,
}

/// A terminal's latest verified inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInventory {
    /// The agent's sequence (its collection time): newer replaces older.
    pub sequence: u64,
    /// When the operator received it (its own clock).
    pub received_ms: u64,
    pub inventory: Inventory,
}

impl StoredInventory {
    /// `received_ms` of an encoded record, without decoding its inventory
    /// (the Kubernetes backend keeps only that of each inventory).
    pub fn received_ms_of(encoded: &[u8]) -> Option<u64> {
        // The first two fields, in order: postcard encodes a struct as its
        // fields one after the other.
        let ((_sequence, received_ms), _rest): ((u64, u64), _) =
            postcard::take_from_bytes(encoded).ok()?;
        Some(received_ms)
    }
}

/// The reconcile state of a pair, with the generation it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairRecord {
    pub generation: u64,
    pub state: PairState,
    pub updated_ms: u64,
    /// Converged through a verified remediation in this generation (what a
    /// rollout counts as a success).
    pub remediated: bool,
}

/// The last version of a policy the admins approved, as it was read: kept
/// so that after a restart an edit nobody approved does not take the
/// policy out of force (the gate keeps it in force, as while running).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovedPolicy {
    pub namespace: String,
    pub name: String,
    /// Its spec as JSON: what its approval's spec digest covers.
    pub spec_json: String,
    /// Its approval frame.
    #[serde(with = "serde_bytes")]
    pub approval: Vec<u8>,
    /// The resource's own generation when it was read.
    pub observed_generation: i64,
    /// It selects only its namespace's terminals (Kubernetes mode).
    pub tenant_scoped: bool,
}

/// The key of a pair's records: terminal, NUL, policy.
pub(super) fn pair_key(terminal: &str, policy: &str) -> String {
    format!("{terminal}\u{0}{policy}")
}

/// The key a bootstrap token is stored under: the hex SHA-256 of its text.
pub fn token_key(token: &str) -> String {
    hex::encode(sha256(token.as_bytes()))
}

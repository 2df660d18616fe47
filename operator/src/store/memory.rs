//! The working set: every record, in memory, and the changes not yet
//! committed, in the order they were made.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tenet_protocol::enrol::EnrolmentRequest;
use tenet_protocol::wire::{decode, encode};

use super::StoreError;
use super::backend::{Change, Table};
use super::records::{
    ApprovedPolicy, LiveDispatch, PairRecord, StoredInventory, TerminalRecord, TokenRecord,
    token_key,
};
use crate::reconcile::posture::CertRecord;

/// The working set, and the changes not yet committed.
#[derive(Default)]
pub(super) struct Mem {
    pub(super) terminals: BTreeMap<String, TerminalRecord>,
    pub(super) tokens: HashMap<String, TokenRecord>,
    /// Pair states by policy, then terminal: a pass reads them without
    /// building keys.
    pub(super) pairs: HashMap<String, HashMap<String, PairRecord>>,
    pub(super) dispatches: BTreeMap<String, LiveDispatch>,
    pub(super) inventories: HashMap<String, Arc<StoredInventory>>,
    pub(super) policies: HashMap<String, ([u8; 32], u64)>,
    pub(super) certificates: BTreeMap<String, CertRecord>,
    /// The last approved version of each policy, by `namespace/name`.
    pub(super) approved: BTreeMap<String, ApprovedPolicy>,
    /// Changes in the order they were made, not yet committed.
    pub(super) pending: Vec<Change>,
    /// Entries for the evidence history, appended before the changes
    /// they came with are committed (when the store keeps one).
    pub(super) evidence: Vec<(u64, String, tenet_protocol::evidence::Record)>,
    /// How many changes were ever made (the newest change's number).
    pub(super) written: u64,
    /// Bumped whenever admins relabel a terminal (not stored): what was
    /// evaluated against the old labels is stale.
    pub(super) labels_epoch: u64,
}

impl Mem {
    /// The working set of every record a backend holds.
    pub(super) fn load(records: Vec<Change>) -> Result<Mem, StoreError> {
        let mut mem = Mem::default();
        for Change { table, key, value } in records {
            // A backend loads records, never deletions.
            let Some(bytes) = value else { continue };
            match table {
                Table::Terminals => {
                    let record =
                        TerminalRecord::decode(&bytes).map_err(|e| StoreError::Corrupt {
                            key: key.clone(),
                            message: e.to_string(),
                        })?;
                    mem.terminals.insert(key.clone(), record);
                }
                Table::Tokens => {
                    let record = TokenRecord::decode(&bytes).map_err(|e| StoreError::Corrupt {
                        key: key.clone(),
                        message: e.to_string(),
                    })?;
                    mem.tokens.insert(key.clone(), record);
                }
                Table::Pairs => {
                    let record: PairRecord = decoded(&key, &bytes)?;
                    if let Some((terminal, policy)) = key.split_once('\u{0}') {
                        mem.set_pair(terminal, policy, record);
                    }
                }
                Table::Dispatches => {
                    mem.dispatches.insert(key.clone(), decoded(&key, &bytes)?);
                }
                Table::Inventories => {
                    let inv: StoredInventory = decoded(&key, &bytes)?;
                    mem.inventories.insert(key, Arc::new(inv));
                }
                Table::Policies => {
                    mem.policies.insert(key.clone(), decoded(&key, &bytes)?);
                }
                Table::Certificates => {
                    mem.certificates.insert(key.clone(), decoded(&key, &bytes)?);
                }
                Table::Approved => {
                    mem.approved.insert(key.clone(), decoded(&key, &bytes)?);
                }
            }
        }
        Ok(mem)
    }

    pub(super) fn set_pair(&mut self, terminal: &str, policy: &str, record: PairRecord) {
        match self.pairs.get_mut(policy) {
            Some(p) => {
                p.insert(terminal.to_string(), record);
            }
            None => {
                self.pairs.insert(
                    policy.to_string(),
                    HashMap::from([(terminal.to_string(), record)]),
                );
            }
        }
    }

    pub(super) fn write<T: Serialize>(&mut self, table: Table, key: &str, value: &T) {
        self.pending.push(Change::put(table, key, encode(value)));
        self.written += 1;
    }

    /// Queue an entry of the evidence history.
    pub(super) fn evidence(
        &mut self,
        at_ms: u64,
        terminal: &str,
        record: tenet_protocol::evidence::Record,
    ) {
        self.evidence.push((at_ms, terminal.to_string(), record));
        self.written += 1;
    }

    /// Queue the deletion of a record.
    pub(super) fn delete(&mut self, table: Table, key: String) {
        self.pending.push(Change::delete(table, key));
        self.written += 1;
    }
}

/// Whether `request` may enrol now: its token exists, has uses left, has
/// not expired, names this terminal when bound to one, and the name is free.
pub(super) fn token_verdict(
    m: &Mem,
    request: &EnrolmentRequest,
    now_ms: u64,
) -> Result<(), String> {
    match m.tokens.get(&token_key(&request.token)) {
        None => Err("the bootstrap token is not valid".to_string()),
        Some(t) if t.uses_left == 0 => Err("the bootstrap token was already used".into()),
        Some(t) if t.expires_ms <= now_ms => Err("the bootstrap token has expired".into()),
        Some(TokenRecord {
            terminal: Some(name),
            ..
        }) if *name != request.terminal => {
            Err(format!("the bootstrap token is for terminal {name:?}"))
        }
        Some(_) if m.terminals.contains_key(&request.terminal) => Err(format!(
            "terminal {:?} is already enrolled",
            request.terminal
        )),
        Some(_) => Ok(()),
    }
}

fn decoded<T: Serialize + DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

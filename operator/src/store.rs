//! The standalone operator's embedded database (redb: ACID, every commit
//! fsynced, a crash leaves the last committed state). It holds what the
//! operator must never lose: enrolled terminals and their identity keys,
//! one-time bootstrap tokens (as hashes), per-terminal envelope sequence
//! numbers, the live dispatch of each (terminal, policy) with only the
//! commitment of its nonce, and each pair's reconcile state.
//!
//! Values are the protocol's canonical encoding. A database that cannot be
//! opened (corrupt, unreadable, full disk) is an error at start, never a
//! silent reset: the file is left exactly as it was.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tenet_protocol::PublicKey;
use tenet_protocol::enrol::EnrolmentRequest;
use tenet_protocol::inventory::Inventory;
use tenet_protocol::report::DispatchRecord;
use tenet_protocol::wire::{decode, encode, sha256};

use crate::reconcile::state::PairState;

const TERMINALS: TableDefinition<&str, &[u8]> = TableDefinition::new("terminals");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const PAIRS: TableDefinition<&str, &[u8]> = TableDefinition::new("pairs");
const DISPATCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("dispatches");
const INVENTORIES: TableDefinition<&str, &[u8]> = TableDefinition::new("inventories");
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot open the database ({source}); it was left as it is")]
    Open {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("database record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

/// An enrolled terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalRecord {
    pub identity: PublicKey,
    pub labels: BTreeMap<String, String>,
    pub tpm: bool,
    pub enrolled_at_ms: u64,
    /// The last envelope sequence number issued to it.
    pub last_sequence: u64,
}

/// A bootstrap token, kept as its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The terminal name the token is for, when an admin bound it to one.
    pub terminal: Option<String>,
    pub expires_ms: u64,
    pub used: bool,
}

/// The live dispatch of a pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDispatch {
    pub policy_generation: u64,
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

pub struct Store {
    db: Database,
}

fn pair_key(terminal: &str, policy: &str) -> String {
    format!("{terminal}\u{0}{policy}")
}

/// The key a bootstrap token is stored under: the hex SHA-256 of its text.
pub fn token_key(token: &str) -> String {
    hex::encode(sha256(token.as_bytes()))
}

fn err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

impl Store {
    /// Open the database at `path`, creating it when there is none.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |e: redb::DatabaseError| StoreError::Open {
            path: path.display().to_string(),
            source: e.into(),
        };
        let db = Database::create(path).map_err(open_err)?;
        // Create the tables, so readers never meet a missing one.
        let tx = db.begin_write().map_err(err)?;
        for t in [TERMINALS, TOKENS, PAIRS, DISPATCHES, INVENTORIES, POLICIES] {
            tx.open_table(t).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(Store { db })
    }

    fn get<T: Serialize + DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(table).map_err(err)?;
        let Some(v) = t.get(key).map_err(err)? else {
            return Ok(None);
        };
        decode(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                message: e.to_string(),
            })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut t = tx.open_table(table).map_err(err)?;
            t.insert(key, encode(value).as_slice()).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Record a one-time bootstrap token (only its hash is kept).
    pub fn add_token(&self, token: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.add_token_hash(&token_key(token), record)
    }

    /// Record a bootstrap token by the hex SHA-256 of its text.
    pub fn add_token_hash(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.put(TOKENS, hash, record)
    }

    /// The generation of a policy: 1 at first sight, one more each time
    /// its spec (by digest) changes. Committed, so it never goes back.
    pub fn policy_generation(
        &self,
        policy: &str,
        spec_digest: [u8; 32],
    ) -> Result<u64, StoreError> {
        // The common case, an unchanged policy, needs no write (and no fsync).
        if let Some((digest, generation)) = self.get::<([u8; 32], u64)>(POLICIES, policy)?
            && digest == spec_digest
        {
            return Ok(generation);
        }
        let tx = self.db.begin_write().map_err(err)?;
        let generation = {
            let mut t = tx.open_table(POLICIES).map_err(err)?;
            let known: Option<([u8; 32], u64)> = match t.get(policy).map_err(err)? {
                Some(v) => Some(decode(v.value()).map_err(|e| StoreError::Corrupt {
                    key: policy.into(),
                    message: e.to_string(),
                })?),
                None => None,
            };
            match known {
                Some((digest, generation)) if digest == spec_digest => generation,
                other => {
                    let generation = other.map_or(1, |(_, g)| g + 1);
                    t.insert(policy, encode(&(spec_digest, generation)).as_slice())
                        .map_err(err)?;
                    generation
                }
            }
        };
        tx.commit().map_err(err)?;
        Ok(generation)
    }

    /// Enrol a terminal: in one transaction, the token must exist, be
    /// unused, unexpired and (when bound) name this terminal, and the name
    /// must be free; then the token is spent and the terminal registered.
    /// `Err(Ok(reason))` is a refusal to tell the agent.
    pub fn enrol(
        &self,
        request: &EnrolmentRequest,
        now_ms: u64,
    ) -> Result<Result<(), String>, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        let refusal = {
            let mut tokens = tx.open_table(TOKENS).map_err(err)?;
            let mut terminals = tx.open_table(TERMINALS).map_err(err)?;
            let key = token_key(&request.token);
            let token: Option<TokenRecord> = match tokens.get(key.as_str()).map_err(err)? {
                Some(v) => Some(decode(v.value()).map_err(|e| StoreError::Corrupt {
                    key: "token".into(),
                    message: e.to_string(),
                })?),
                None => None,
            };
            let exists = terminals
                .get(request.terminal.as_str())
                .map_err(err)?
                .is_some();
            match token {
                None => Some("the bootstrap token is not valid".to_string()),
                Some(t) if t.used => Some("the bootstrap token was already used".into()),
                Some(t) if t.expires_ms <= now_ms => Some("the bootstrap token has expired".into()),
                Some(TokenRecord {
                    terminal: Some(name),
                    ..
                }) if name != request.terminal => {
                    Some(format!("the bootstrap token is for terminal {name:?}"))
                }
                Some(_) if exists => Some(format!(
                    "terminal {:?} is already enrolled",
                    request.terminal
                )),
                Some(mut t) => {
                    t.used = true;
                    tokens
                        .insert(key.as_str(), encode(&t).as_slice())
                        .map_err(err)?;
                    let record = TerminalRecord {
                        identity: request.identity.clone(),
                        labels: request.labels.clone(),
                        tpm: request.tpm,
                        enrolled_at_ms: now_ms,
                        last_sequence: 0,
                    };
                    terminals
                        .insert(request.terminal.as_str(), encode(&record).as_slice())
                        .map_err(err)?;
                    None
                }
            }
        };
        match refusal {
            Some(reason) => Ok(Err(reason)),
            None => {
                tx.commit().map_err(err)?;
                Ok(Ok(()))
            }
        }
    }

    pub fn terminal(&self, name: &str) -> Result<Option<TerminalRecord>, StoreError> {
        self.get(TERMINALS, name)
    }

    /// The next envelope sequence number for `terminal`, committed before
    /// it is used, so a restart never reuses one.
    pub fn next_sequence(&self, terminal: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        let next = {
            let mut t = tx.open_table(TERMINALS).map_err(err)?;
            let record: Option<TerminalRecord> = match t.get(terminal).map_err(err)? {
                Some(v) => Some(decode(v.value()).map_err(|e| StoreError::Corrupt {
                    key: terminal.into(),
                    message: e.to_string(),
                })?),
                None => None,
            };
            match record {
                None => None,
                Some(mut r) => {
                    r.last_sequence += 1;
                    t.insert(terminal, encode(&r).as_slice()).map_err(err)?;
                    Some(r.last_sequence)
                }
            }
        };
        tx.commit().map_err(err)?;
        Ok(next)
    }

    pub fn pair(&self, terminal: &str, policy: &str) -> Result<Option<PairRecord>, StoreError> {
        self.get(PAIRS, &pair_key(terminal, policy))
    }

    pub fn set_pair(
        &self,
        terminal: &str,
        policy: &str,
        record: &PairRecord,
    ) -> Result<(), StoreError> {
        self.put(PAIRS, &pair_key(terminal, policy), record)
    }

    /// The live dispatch of a pair, if any.
    pub fn dispatch(
        &self,
        terminal: &str,
        policy: &str,
    ) -> Result<Option<LiveDispatch>, StoreError> {
        self.get(DISPATCHES, &pair_key(terminal, policy))
    }

    /// Record a new live dispatch for a pair (replacing one that is over)
    /// and its pair state in one transaction: a crash leaves both or neither.
    pub fn start_dispatch(
        &self,
        terminal: &str,
        policy: &str,
        dispatch: &LiveDispatch,
        pair: &PairRecord,
    ) -> Result<(), StoreError> {
        let key = pair_key(terminal, policy);
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut d = tx.open_table(DISPATCHES).map_err(err)?;
            d.insert(key.as_str(), encode(dispatch).as_slice())
                .map_err(err)?;
            let mut p = tx.open_table(PAIRS).map_err(err)?;
            p.insert(key.as_str(), encode(pair).as_slice())
                .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Mark the live dispatch with `envelope_digest` as answered and set the
    /// pair's new state, in one transaction. `false` (and nothing written)
    /// when that dispatch is no longer live or was already answered: two
    /// copies of one report can never both count.
    pub fn consume_dispatch(
        &self,
        terminal: &str,
        policy: &str,
        envelope_digest: &[u8; 32],
        pair: &PairRecord,
    ) -> Result<bool, StoreError> {
        let key = pair_key(terminal, policy);
        let tx = self.db.begin_write().map_err(err)?;
        let consumed = {
            let mut d = tx.open_table(DISPATCHES).map_err(err)?;
            let live: Option<LiveDispatch> = match d.get(key.as_str()).map_err(err)? {
                Some(v) => Some(decode(v.value()).map_err(|e| StoreError::Corrupt {
                    key: key.clone(),
                    message: e.to_string(),
                })?),
                None => None,
            };
            match live {
                Some(mut live)
                    if !live.record.consumed && live.record.envelope_digest == *envelope_digest =>
                {
                    live.record.consumed = true;
                    d.insert(key.as_str(), encode(&live).as_slice())
                        .map_err(err)?;
                    let mut p = tx.open_table(PAIRS).map_err(err)?;
                    p.insert(key.as_str(), encode(pair).as_slice())
                        .map_err(err)?;
                    true
                }
                _ => false,
            }
        };
        if consumed {
            tx.commit().map_err(err)?;
        }
        Ok(consumed)
    }

    /// Keep a terminal's verified inventory unless a newer one (by the
    /// agent's sequence) is stored already; whether it was kept.
    pub fn put_inventory(
        &self,
        terminal: &str,
        stored: &StoredInventory,
    ) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        let kept = {
            let mut t = tx.open_table(INVENTORIES).map_err(err)?;
            let newer = match t.get(terminal).map_err(err)? {
                Some(v) => {
                    let old: StoredInventory =
                        decode(v.value()).map_err(|e| StoreError::Corrupt {
                            key: terminal.into(),
                            message: e.to_string(),
                        })?;
                    old.sequence >= stored.sequence
                }
                None => false,
            };
            if !newer {
                t.insert(terminal, encode(stored).as_slice()).map_err(err)?;
            }
            !newer
        };
        tx.commit().map_err(err)?;
        Ok(kept)
    }

    /// The latest verified inventory of a terminal.
    pub fn inventory(&self, terminal: &str) -> Result<Option<StoredInventory>, StoreError> {
        self.get(INVENTORIES, terminal)
    }

    /// Every enrolled terminal's name.
    pub fn terminal_names(&self) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(TERMINALS).map_err(err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(err)? {
            out.push(item.map_err(err)?.0.value().to_string());
        }
        Ok(out)
    }

    /// The live dispatches of one terminal, by policy.
    pub fn dispatches_of(&self, terminal: &str) -> Result<Vec<(String, LiveDispatch)>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(DISPATCHES).map_err(err)?;
        let prefix = format!("{terminal}\u{0}");
        let mut out = Vec::new();
        for item in t.range(prefix.as_str()..).map_err(err)? {
            let (k, v) = item.map_err(err)?;
            let Some(policy) = k.value().strip_prefix(prefix.as_str()) else {
                break;
            };
            let live: LiveDispatch = decode(v.value()).map_err(|e| StoreError::Corrupt {
                key: k.value().to_string(),
                message: e.to_string(),
            })?;
            out.push((policy.to_string(), live));
        }
        Ok(out)
    }

    /// Every pair's record (for status and for resuming after a restart).
    pub fn pairs(&self) -> Result<Vec<(String, String, PairRecord)>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(PAIRS).map_err(err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            let key = k.value().to_string();
            let Some((terminal, policy)) = key.split_once('\u{0}') else {
                continue;
            };
            let record: PairRecord = decode(v.value()).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                message: e.to_string(),
            })?;
            out.push((terminal.to_string(), policy.to_string(), record));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenet_protocol::{Algorithm, KeyPair, Signer};

    fn request(token: &str, terminal: &str) -> EnrolmentRequest {
        EnrolmentRequest {
            token: token.into(),
            terminal: terminal.into(),
            labels: BTreeMap::new(),
            identity: KeyPair::generate(Algorithm::Ed25519)
                .expect("key")
                .public_key(),
            tpm: false,
            tls_csr_pem: String::new(),
            requested_at_ms: 0,
        }
    }

    fn token(terminal: Option<&str>, expires_ms: u64) -> TokenRecord {
        TokenRecord {
            terminal: terminal.map(str::to_string),
            expires_ms,
            used: false,
        }
    }

    #[test]
    fn bootstrap_tokens_are_one_time_bound_and_expiring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("tenet.redb")).expect("open");
        s.add_token("t-1", &token(None, 1000)).expect("token");
        s.add_token("t-2", &token(Some("ward-02"), 1000))
            .expect("token");
        s.add_token("t-3", &token(None, 10)).expect("token");
        let refusal = |t: &str, name: &str| s.enrol(&request(t, name), 100).expect("db").err();
        assert_eq!(
            refusal("nope", "ward-01").as_deref(),
            Some("the bootstrap token is not valid")
        );
        assert_eq!(
            refusal("t-3", "ward-01").as_deref(),
            Some("the bootstrap token has expired")
        );
        assert_eq!(
            refusal("t-2", "ward-01").as_deref(),
            Some("the bootstrap token is for terminal \"ward-02\"")
        );
        assert_eq!(refusal("t-1", "ward-01"), None);
        assert_eq!(
            refusal("t-1", "ward-03").as_deref(),
            Some("the bootstrap token was already used")
        );
        assert_eq!(refusal("t-2", "ward-02"), None);
        assert!(s.terminal("ward-01").expect("db").is_some());
        // Only hashes of tokens are stored.
        let bytes = std::fs::read(dir.path().join("tenet.redb")).expect("file");
        assert!(!bytes.windows(3).any(|w| w == b"t-1"));
    }

    #[test]
    fn sequences_and_pairs_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenet.redb");
        {
            let s = Store::open(&path).expect("open");
            s.add_token("t", &token(None, u64::MAX)).expect("token");
            assert_eq!(s.enrol(&request("t", "ward-01"), 0).expect("db"), Ok(()));
            assert_eq!(s.next_sequence("ward-01").expect("db"), Some(1));
            assert_eq!(s.next_sequence("ward-01").expect("db"), Some(2));
            assert_eq!(s.next_sequence("nobody").expect("db"), None);
            let pair = PairRecord {
                generation: 3,
                state: PairState::Compliant,
                updated_ms: 5,
                remediated: false,
            };
            s.set_pair("ward-01", "ns/p", &pair).expect("pair");
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.next_sequence("ward-01").expect("db"), Some(3));
        let pairs = s.pairs().expect("pairs");
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].2.state, PairState::Compliant);
    }

    #[test]
    fn policy_generations_only_go_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        let g = |d: u8| s.policy_generation("ns/p", [d; 32]).expect("db");
        assert_eq!(g(1), 1);
        assert_eq!(g(1), 1);
        assert_eq!(g(2), 2);
        assert_eq!(g(1), 3, "going back to an old spec is a new generation");
    }

    #[test]
    fn a_corrupt_database_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenet.redb");
        let garbage = vec![0x5a; 8192];
        std::fs::write(&path, &garbage).expect("write");
        let e = Store::open(&path).err().expect("refused");
        let message = e.to_string();
        assert!(
            message.starts_with(&format!("{}: cannot open the database (", path.display())),
            "{message}"
        );
        assert!(message.ends_with("); it was left as it is"), "{message}");
        assert_eq!(std::fs::read(&path).expect("file"), garbage);
    }
}

use super::*;
use std::collections::BTreeMap;
use std::time::Duration;
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
        attestation_key: None,
        ek_certificate: None,
        tls_csr_pem: String::new(),
        requested_at_ms: 0,
    }
}

fn token(terminal: Option<&str>, expires_ms: u64) -> TokenRecord {
    TokenRecord {
        terminal: terminal.map(str::to_string),
        expires_ms,
        uses_left: 1,
        labels: [("site".to_string(), "nagoya".to_string())].into(),
    }
}

#[test]
fn a_forgotten_terminal_or_policy_is_gone_after_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tenet.redb");
    let pair = PairRecord {
        generation: 1,
        state: PairState::Compliant,
        updated_ms: 1,
        remediated: false,
    };
    {
        let s = Store::open(&path).expect("open");
        for t in ["ward-01", "ward-02"] {
            s.add_token(&format!("tok-{t}"), &token(None, 1000));
            assert_eq!(
                s.enrol(&request(&format!("tok-{t}"), t), [0; 32], TpmTrust::None, 1),
                Ok(())
            );
            s.set_pair(t, "it/a", &pair);
            s.set_pair(t, "it/b", &pair);
        }
        assert!(s.forget_terminal("ward-01"));
        assert!(!s.forget_terminal("ward-01"), "only once");
        assert_eq!(s.forget_policy("it/b"), 1);
        s.sync().expect("sync");
    }
    let s = Store::open(&path).expect("reopen");
    assert!(s.terminal("ward-01").is_none());
    assert!(s.terminal("ward-02").is_some());
    let pairs: Vec<(String, String)> = s.pairs().into_iter().map(|(t, p, _)| (t, p)).collect();
    assert_eq!(pairs, vec![("ward-02".to_string(), "it/a".to_string())]);
}

#[test]
fn bootstrap_tokens_are_one_time_bound_and_expiring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(&dir.path().join("tenet.redb")).expect("open");
    s.add_token("t-1", &token(None, 1000));
    s.add_token("t-2", &token(Some("ward-02"), 1000));
    s.add_token("t-3", &token(None, 10));
    let refusal = |t: &str, name: &str| {
        s.enrol(&request(t, name), [0; 32], TpmTrust::None, 100)
            .err()
    };
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
    assert!(s.terminal("ward-01").is_some());
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
        s.add_token("t", &token(None, u64::MAX));
        assert_eq!(
            s.enrol(&request("t", "ward-01"), [0; 32], TpmTrust::None, 0),
            Ok(())
        );
        assert_eq!(s.next_sequence("ward-01"), Some(1));
        assert_eq!(s.next_sequence("ward-01"), Some(2));
        assert_eq!(s.next_sequence("nobody"), None);
        let pair = PairRecord {
            generation: 3,
            state: PairState::Compliant,
            updated_ms: 5,
            remediated: false,
        };
        s.set_pair("ward-01", "ns/p", &pair);
    }
    let s = Store::open(&path).expect("reopen (the changes were committed at close)");
    assert_eq!(s.next_sequence("ward-01"), Some(3));
    let pairs = s.pairs();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].2.state, PairState::Compliant);
}

#[test]
fn changes_are_group_committed_and_durable_when_awaited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tenet.redb");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    {
        let s = Arc::new(Store::open(&path).expect("open"));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let pair = PairRecord {
                            generation: 1,
                            state: PairState::Compliant,
                            updated_ms: i,
                            remediated: false,
                        };
                        s.set_pair(&format!("t-{w}-{i}"), "ns/p", &pair);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let written = s.written();
        assert_eq!(written, 2_000);
        rt.block_on(s.durable(written)).expect("durable");
        // Far fewer fsyncs than changes.
        assert!(
            s.commits() < 500,
            "{} commits for 2,000 changes",
            s.commits()
        );
        assert!(s.commits() >= 1);
    }
    let s = Store::open(&path).expect("reopen");
    assert_eq!(s.pairs().len(), 2_000);
}

#[test]
fn swapped_pairs_never_overwrite_a_change_made_meanwhile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(&dir.path().join("db")).expect("open");
    let rec = |state: PairState| PairRecord {
        generation: 1,
        state,
        updated_ms: 0,
        remediated: false,
    };
    let dispatched = rec(PairState::Dispatched {
        attempt: 1,
        sequence: 1,
        deadline_ms: 10,
    });
    s.set_pair("a", "ns/p", &dispatched);
    s.set_pair("b", "ns/p", &dispatched);
    // A pass read both as Dispatched; a report then verified "a".
    let verifying = rec(PairState::Verifying {
        attempt: 1,
        since_ms: 5,
    });
    s.set_pair("a", "ns/p", &verifying);
    let expired = rec(PairState::Failed {
        attempts: 1,
        reason: "expired".into(),
    });
    let lost = s.swap_pairs(
        "ns/p",
        &[
            ("a", Some(dispatched.clone()), expired.clone()),
            ("b", Some(dispatched.clone()), expired.clone()),
        ],
    );
    assert_eq!(lost, ["a".to_string()].into());
    assert_eq!(s.pair("a", "ns/p"), Some(verifying));
    assert_eq!(s.pair("b", "ns/p"), Some(expired));
}

/// A backend whose disk can fill up.
#[derive(Default)]
struct Flaky {
    full: std::sync::atomic::AtomicBool,
    stored: Mutex<Vec<Change>>,
}

impl Backend for Arc<Flaky> {
    fn load(&self) -> Result<Vec<Change>, StoreError> {
        Ok(self.stored.lock().expect("lock").clone())
    }
    fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Db(redb::Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device",
            ))));
        }
        self.stored.lock().expect("lock").extend_from_slice(batch);
        Ok(())
    }
}

#[test]
fn a_full_disk_delays_durability_and_loses_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let disk = Arc::new(Flaky::default());
    disk.full.store(true, std::sync::atomic::Ordering::SeqCst);
    let s = Store::with_backend(Box::new(disk.clone())).expect("open");
    s.add_token("t", &token(None, u64::MAX));
    assert_eq!(
        s.enrol(&request("t", "ward-01"), [0; 32], TpmTrust::None, 0),
        Ok(())
    );
    let written = s.written();
    // Whoever waits to acknowledge is told why, and acknowledges nothing.
    let e = rt.block_on(s.durable(written)).expect_err("not durable");
    assert_eq!(
        e.to_string(),
        "the database cannot commit now: database: I/O error: No space left on device"
    );
    assert!(disk.stored.lock().expect("lock").is_empty());
    // Space again: the flusher's retry commits everything, in order.
    disk.full.store(false, std::sync::atomic::Ordering::SeqCst);
    let waited = std::time::Instant::now();
    while rt.block_on(s.durable(written)).is_err() {
        assert!(waited.elapsed() < Duration::from_secs(10), "never retried");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stored = disk.stored.lock().expect("lock").clone();
    assert_eq!(
        stored.iter().map(|c| c.table).collect::<Vec<_>>(),
        [Table::Tokens, Table::Tokens, Table::Terminals]
    );
    drop(s);
    // What the disk holds is the whole state: a restart sees the terminal
    // and the spent token.
    let again = Store::with_backend(Box::new(disk.clone())).expect("reopen");
    assert!(again.terminal("ward-01").is_some());
    assert_eq!(
        again.enrol(&request("t", "ward-02"), [0; 32], TpmTrust::None, 0),
        Err("the bootstrap token was already used".into())
    );
}

#[test]
fn client_keys_renew_once_and_a_retired_key_stays_retired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(&dir.path().join("db")).expect("open");
    s.add_token("t", &token(None, u64::MAX));
    let (k1, k2, k3) = ([1; 32], [2; 32], [3; 32]);
    assert_eq!(
        s.enrol(&request("t", "ward-01"), k1, TpmTrust::None, 0),
        Ok(())
    );
    assert!(s.admit_client_key("ward-01", &k1));
    assert!(!s.admit_client_key("ward-01", &k2), "not yet");
    assert!(s.renew_client_key("ward-01", &k1, k2));
    assert!(
        s.admit_client_key("ward-01", &k1),
        "until the new one is used"
    );
    assert!(
        s.admit_client_key("ward-01", &k2),
        "first use of the new key"
    );
    assert!(!s.client_key_admitted("ward-01", &k1), "retired");
    // A session still open on the retired key cannot renew back in.
    assert!(!s.renew_client_key("ward-01", &k1, k3));
    assert!(!s.client_key_admitted("ward-01", &k3));
    assert!(s.client_key_admitted("ward-01", &k2));
}

#[test]
fn policy_generations_only_go_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(&dir.path().join("db")).expect("open");
    let g = |d: u8| s.policy_generation("ns/p", [d; 32]);
    assert_eq!(g(1), 1);
    assert_eq!(g(1), 1);
    assert_eq!(g(2), 2);
    assert_eq!(g(1), 3, "going back to an old spec is a new generation");
    // Deleted and re-created with the same spec: a new generation, not 1
    // (agents would refuse generation 1 as a rollback).
    s.forget_policy("ns/p");
    assert_eq!(g(1), 4);
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

#[test]
fn an_inventory_records_arrival_time_reads_without_decoding_the_rest() {
    let stored = StoredInventory {
        sequence: 300,
        received_ms: 1_764_000_000_123,
        inventory: tenet_protocol::inventory::Inventory {
            terminal: "ward-01".into(),
            ..Default::default()
        },
    };
    let bytes = tenet_protocol::wire::encode(&stored);
    assert_eq!(
        StoredInventory::received_ms_of(&bytes),
        Some(1_764_000_000_123)
    );
    assert_eq!(StoredInventory::received_ms_of(&bytes[..2]), None);
}

/// A terminal's labels are what admins put on its token; what it claims
/// in its enrolment request is not kept as an assignment.
#[test]
fn a_terminal_is_assigned_its_tokens_labels_not_the_ones_it_claims() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(&dir.path().join("tenet.redb")).expect("open");
    s.add_token("t", &token(None, u64::MAX));
    let mut claiming = request("t", "ward-01");
    claiming.labels = [
        ("site".to_string(), "osaka".to_string()),
        (
            "tenet.dev/namespace".to_string(),
            "other-tenant".to_string(),
        ),
    ]
    .into();
    assert_eq!(s.enrol(&claiming, [0; 32], TpmTrust::None, 0), Ok(()));
    assert_eq!(
        s.assigned_labels("ward-01"),
        BTreeMap::from([("site".to_string(), "nagoya".to_string())])
    );
    assert_eq!(
        s.terminal("ward-01").expect("enrolled").claimed_labels,
        claiming.labels
    );
}

/// A terminal enrolled before labels were assigned: what it claimed then
/// is a claim now, and it has no assigned labels (so no tenancy it named
/// itself).
#[test]
fn a_terminal_record_from_before_assigned_labels_keeps_its_labels_as_claims() {
    let identity = KeyPair::generate(Algorithm::Ed25519)
        .expect("key")
        .public_key();
    let claimed: BTreeMap<String, String> = [(
        "tenet.dev/namespace".to_string(),
        "other-tenant".to_string(),
    )]
    .into();
    let old = tenet_protocol::wire::encode(&(
        identity.clone(),
        claimed.clone(),
        false,
        Option::<tenet_protocol::PublicKey>::None,
        5u64,
        9u64,
        0u64,
        vec![[1u8; 32]],
        TpmTrust::None,
    ));
    let record = TerminalRecord::decode(&old).expect("reads");
    assert_eq!(record.labels, BTreeMap::new());
    assert_eq!(record.claimed_labels, claimed);
    assert_eq!((record.enrolled_at_ms, record.last_sequence), (5, 9));
    assert_eq!(record.identity, identity);
}

/// A token written before tokens carried labels still reads (assigning
/// none); anything else is refused.
#[test]
fn a_token_record_from_before_labels_still_reads() {
    #[derive(serde::Serialize)]
    struct Old {
        terminal: Option<String>,
        expires_ms: u64,
        uses_left: u32,
    }
    let old = tenet_protocol::wire::encode(&Old {
        terminal: Some("ward-01".into()),
        expires_ms: 7,
        uses_left: 2,
    });
    assert_eq!(
        TokenRecord::decode(&old),
        Ok(TokenRecord {
            terminal: Some("ward-01".into()),
            expires_ms: 7,
            uses_left: 2,
            labels: BTreeMap::new(),
        })
    );
    let new = token(None, 9);
    assert_eq!(
        TokenRecord::decode(&tenet_protocol::wire::encode(&new)),
        Ok(new)
    );
    assert!(TokenRecord::decode(b"\x01").is_err());
}

/// A terminal as release 0.1 (store format 1) encoded it: every field of
/// today's but the agent version.
fn format_1_terminal(identity: &tenet_protocol::PublicKey) -> Vec<u8> {
    let labels: BTreeMap<String, String> = [("site".to_string(), "nagoya".to_string())].into();
    tenet_protocol::wire::encode(&(
        identity.clone(),
        labels,
        false,
        Option::<tenet_protocol::PublicKey>::None,
        5u64,
        9u64,
        0u64,
        vec![[1u8; 32]],
        TpmTrust::None,
        BTreeMap::<String, String>::new(),
    ))
}

/// A database without a format marker, as release 0.1 wrote it.
fn write_format_1(path: &Path, terminal: &[u8]) {
    use redb::TableDefinition;
    let db = redb::Database::create(path).expect("create");
    let tx = db.begin_write().expect("tx");
    for name in [
        "tokens",
        "pairs",
        "dispatches",
        "inventories",
        "policies",
        "certificates",
        "approved",
    ] {
        tx.open_table(TableDefinition::<&str, &[u8]>::new(name))
            .expect("table");
    }
    tx.open_table(TableDefinition::<&str, &[u8]>::new("terminals"))
        .expect("table")
        .insert("ward-01", terminal)
        .expect("insert");
    tx.commit().expect("commit");
}

fn raw_terminal(path: &Path) -> Vec<u8> {
    use redb::{ReadableDatabase, TableDefinition};
    let db = redb::Database::open(path).expect("open");
    let tx = db.begin_read().expect("tx");
    let t = tx
        .open_table(TableDefinition::<&str, &[u8]>::new("terminals"))
        .expect("table");
    t.get("ward-01")
        .expect("get")
        .expect("there")
        .value()
        .to_vec()
}

#[test]
fn a_database_of_release_0_1_is_copied_aside_then_migrated_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tenet.redb");
    let identity = KeyPair::generate(Algorithm::Ed25519)
        .expect("key")
        .public_key();
    let old = format_1_terminal(&identity);
    write_format_1(&path, &old);
    let before = std::fs::read(&path).expect("read");

    let store = Store::open(&path).expect("a format 1 database opens");
    let t = store.terminal("ward-01").expect("kept");
    assert_eq!((t.identity.clone(), t.last_sequence), (identity, 9));
    assert_eq!(t.agent_version, "");
    store.set_connected("ward-01", "0.1.0");
    store.sync().expect("sync");
    drop(store);

    let backup = disk::backup_path(&path, 1);
    assert_eq!(backup.file_name().expect("a name"), "tenet.redb.format-1");
    let copy = std::fs::read(&backup).expect("the copy");
    assert!(copy == before, "copied as it was");
    let now = raw_terminal(&path);
    assert_ne!(now, old, "written again in the current format");
    assert_eq!(
        TerminalRecord::decode(&now).expect("reads").agent_version,
        "0.1.0"
    );
    // Marked: a second open migrates nothing and copies nothing again.
    std::fs::remove_file(&backup).expect("rm");
    let store = Store::open(&path).expect("reopens");
    assert_eq!(
        store.terminal("ward-01").expect("kept").agent_version,
        "0.1.0"
    );
    drop(store);
    assert!(!backup.exists());
}

#[test]
fn a_database_of_a_newer_format_is_refused_unchanged() {
    use redb::TableDefinition;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tenet.redb");
    {
        let db = redb::Database::create(&path).expect("create");
        let tx = db.begin_write().expect("tx");
        tx.open_table(TableDefinition::<&str, u32>::new("meta"))
            .expect("table")
            .insert("format", migrate::FORMAT + 1)
            .expect("insert");
        tx.commit().expect("commit");
    }
    let before = std::fs::read(&path).expect("read");
    let err = Store::open(&path).err().expect("refused").to_string();
    assert_eq!(
        err,
        format!(
            "{} holds store format {}, written by a newer Tenet: this one ({}) reads formats 1 to {}. \
             Run the newer release, or restore the copy taken before it migrated the store; nothing was changed",
            path.display(),
            migrate::FORMAT + 1,
            tenet_protocol::release::THIS,
            migrate::FORMAT
        )
    );
    assert!(
        std::fs::read(&path).expect("read") == before,
        "left as it was"
    );
}

#[test]
fn an_upgrade_rewrites_only_the_records_whose_encoding_changed() {
    let identity = KeyPair::generate(Algorithm::Ed25519)
        .expect("key")
        .public_key();
    let old = format_1_terminal(&identity);
    let current = tenet_protocol::wire::encode(&TerminalRecord::decode(&old).expect("reads"));
    let records = vec![
        Change::put(Table::Terminals, "old", old.clone()),
        Change::put(Table::Terminals, "new", current.clone()),
        Change::put(
            Table::Tokens,
            "t",
            tenet_protocol::wire::encode(&token(None, 9)),
        ),
        Change::put(Table::Pairs, "p", vec![1, 2, 3]),
    ];
    assert_eq!(
        migrate::upgrade(1, &records).expect("upgrades"),
        vec![Change::put(Table::Terminals, "old", current)]
    );
    let broken = [Change::put(Table::Terminals, "ward-09", vec![0xff])];
    assert!(matches!(
        migrate::upgrade(1, &broken),
        Err(StoreError::Corrupt { key, .. }) if key == "ward-09"
    ));
}

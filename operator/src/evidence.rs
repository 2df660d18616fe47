//! The evidence history on disk: `DATA/evidence.log`, the entries of
//! `tenet_protocol::evidence` appended one after another (each a 4-byte
//! big-endian length and the entry), never rewritten. The store appends
//! the entries of a change and syncs the file before it commits the
//! change, so what an agent's acknowledgement or an envelope implies is
//! in the history first (an entry may be there twice after a crash, never
//! missing).
//!
//! Reading it needs no lock: an export reads the complete entries there
//! are, while the operator goes on appending.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use tenet_protocol::PublicKey;
use tenet_protocol::evidence::{Entry, Export, Item, Record, link};

/// The largest entry read back (an envelope or a report, with room).
const MAX_ENTRY: usize = 64 * 1024 * 1024;

/// The log file, open for appending, its head, and per terminal the body
/// digest of its last entry and the identity key it last enrolled with.
pub struct EvidenceLog {
    path: PathBuf,
    file: File,
    /// The length of its complete entries.
    len: u64,
    head: [u8; 32],
    own: HashMap<String, [u8; 32]>,
    keys: HashMap<String, PublicKey>,
}

/// The log beside the database in a data directory.
pub fn path_in(data: &Path) -> PathBuf {
    data.join("evidence.log")
}

impl EvidenceLog {
    /// Open (or create, mode 0600) the log at `path`, reading it through
    /// to find its head. `Ok((log, created))`.
    pub fn open(path: &Path) -> std::io::Result<(EvidenceLog, bool)> {
        let created = !path.exists();
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .mode(0o600)
                .open(path)?
        };
        let mut log = EvidenceLog {
            path: path.to_path_buf(),
            file,
            len: 0,
            head: [0; 32],
            own: HashMap::new(),
            keys: HashMap::new(),
        };
        let mut broken = None;
        let mut last_unreadable = None;
        for_each(path, |bytes, end| {
            if let Some(e) = last_unreadable.take() {
                // Something follows an entry that cannot be read: not a
                // torn tail.
                broken = Some(e);
                return false;
            }
            match Entry::decode(bytes) {
                Ok(entry) if entry.prev != log.head => {
                    broken = Some(format!(
                        "the entry at offset {} does not link to the one before it",
                        log.len
                    ));
                    false
                }
                Ok(entry) => {
                    log.take(&entry);
                    log.len = end;
                    true
                }
                Err(e) => {
                    last_unreadable = Some(format!(
                        "the entry at offset {} cannot be read ({e})",
                        log.len
                    ));
                    true
                }
            }
        })?;
        if let Some(why) = broken {
            return Err(std::io::Error::other(format!(
                "{}: {why}; the log is left as it is",
                path.display()
            )));
        }
        // A torn last entry (a crash in the middle of an append, or a tail
        // of zeros) is cut off: what follows must link to the last complete
        // one.
        if log.file.metadata()?.len() > log.len {
            log.file.set_len(log.len)?;
        }
        Ok((log, created))
    }

    /// Follow one more entry.
    fn take(&mut self, entry: &Entry) {
        let body = entry.body_digest();
        self.head = link(&self.head, &body);
        self.own.insert(entry.terminal.clone(), body);
        if let Record::Enrolled { identity } = &entry.record {
            self.keys.insert(entry.terminal.clone(), identity.clone());
        }
    }

    /// The identity key the log last recorded for `terminal`.
    pub fn key_of(&self, terminal: &str) -> Option<&PublicKey> {
        self.keys.get(terminal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append entries (not yet synced). On an error nothing of them stays:
    /// the file is cut back to where it was.
    pub fn append(&mut self, entries: &[(u64, String, Record)]) -> std::io::Result<()> {
        let mut out = Vec::new();
        let mut next = Vec::with_capacity(entries.len());
        let mut head = self.head;
        let mut own = HashMap::new();
        for (at_ms, terminal, record) in entries {
            let entry = Entry {
                prev: head,
                own_prev: own
                    .get(terminal)
                    .or_else(|| self.own.get(terminal))
                    .copied()
                    .unwrap_or_default(),
                at_ms: *at_ms,
                terminal: terminal.clone(),
                record: record.clone(),
            };
            let bytes = entry.encode();
            if bytes.len() > MAX_ENTRY {
                return Err(std::io::Error::other(format!(
                    "an entry of {} bytes for {terminal}: more than the {MAX_ENTRY} an entry may hold",
                    bytes.len()
                )));
            }
            head = link(&head, &entry.body_digest());
            own.insert(terminal.clone(), entry.body_digest());
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(&bytes);
            next.push(entry);
        }
        if let Err(e) = self.file.write_all(&out) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += out.len() as u64;
        for entry in &next {
            self.take(entry);
        }
        Ok(())
    }

    /// Make what was appended durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Call `f` with each complete entry's bytes and the offset after it,
/// until it returns false.
fn for_each(path: &Path, mut f: impl FnMut(&[u8], u64) -> bool) -> std::io::Result<()> {
    let mut r = BufReader::new(File::open(path)?);
    let mut offset = 0u64;
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(len) as usize;
        // No entry is empty: zeros are a torn tail.
        if len == 0 {
            return Ok(());
        }
        if len > MAX_ENTRY {
            return Err(std::io::Error::other(format!(
                "{}: an entry of {len} bytes at offset {offset}: not an evidence log",
                path.display()
            )));
        }
        let mut bytes = vec![0; len];
        match r.read_exact(&mut bytes) {
            Ok(()) => {}
            // Torn: being appended now, or cut by a crash.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        offset += 4 + len as u64;
        if !f(&bytes, offset) {
            return Ok(());
        }
    }
}

/// The chain of `terminal` from the log at `path`: its entries whole,
/// every other as its body digest.
pub fn export(path: &Path, terminal: &str) -> Result<Export, String> {
    let mut items = Vec::new();
    let mut problem = None;
    for_each(path, |bytes, _| {
        let entry = match Entry::decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                problem = Some(format!("an entry cannot be read: {e}"));
                return false;
            }
        };
        items.push(if entry.terminal == terminal {
            Item::Entry(bytes.to_vec())
        } else {
            Item::Elided(entry.body_digest())
        });
        true
    })
    .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(p) = problem {
        return Err(format!("{}: {p}", path.display()));
    }
    Ok(Export {
        terminal: terminal.to_string(),
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenet_protocol::{Algorithm, KeyPair, Signer};

    #[test]
    fn the_log_chains_survives_a_torn_tail_and_exports_one_terminal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_in(dir.path());
        let key = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let enrolled = |t: &str| {
            (
                1_000,
                t.to_string(),
                Record::Enrolled {
                    identity: key.public_key(),
                },
            )
        };
        {
            let (mut log, created) = EvidenceLog::open(&path).expect("open");
            assert!(created);
            log.append(&[enrolled("a"), enrolled("b")]).expect("append");
            log.sync().expect("sync");
        }
        // Half an entry, as a crash mid-append leaves it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open")
            .write_all(&[0, 0, 0, 50, 1, 2, 3])
            .expect("torn");
        {
            let (mut log, created) = EvidenceLog::open(&path).expect("reopen");
            assert!(!created);
            log.append(&[enrolled("a")]).expect("append");
        }
        let export = export(&path, "a").expect("export");
        assert_eq!(export.items.len(), 3);
        assert!(matches!(export.items[1], Item::Elided(_)));
        let keys = tenet_protocol::evidence::AuditorKeys {
            admin_keys: vec![],
            threshold: 1,
            dispatch_keys: vec![],
        };
        let verified =
            tenet_protocol::evidence::verify(&export, &keys, None).expect("the chain links");
        assert_eq!(verified.checked.len(), 2);
        // A tail of zeros (a crash on some file systems) is cut off too.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open")
            .write_all(&[0; 12])
            .expect("zeros");
        let (log, _) = EvidenceLog::open(&path).expect("reopen after zeros");
        assert!(log.key_of("a").is_some());
        // An entry changed in the middle: the operator does not start on
        // a log that does not link.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let e = EvidenceLog::open(&path).err().expect("refused");
        assert!(e.to_string().contains("the log is left as it is"), "{e}");
    }
}

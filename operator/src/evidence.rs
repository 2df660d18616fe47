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

use tenet_protocol::evidence::{Entry, Export, Item, Record, link};

/// The largest entry read back (an envelope or a report, with room).
const MAX_ENTRY: usize = 64 * 1024 * 1024;

/// The log file, open for appending, and the hash of its last entry.
pub struct EvidenceLog {
    path: PathBuf,
    file: File,
    head: [u8; 32],
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
        let mut head = [0; 32];
        let mut complete = 0u64;
        let mut unreadable = None;
        for_each(path, |bytes, end| match Entry::decode(bytes) {
            Ok(entry) => {
                head = link(&head, &entry.body_digest());
                complete = end;
                true
            }
            Err(e) => {
                unreadable = Some(e);
                false
            }
        })?;
        if let Some(e) = unreadable {
            return Err(std::io::Error::other(format!(
                "{}: an entry at offset {complete} cannot be read ({e}); the log is left as it is",
                path.display()
            )));
        }
        // A torn last entry (a crash in the middle of an append) is cut
        // off: what follows must link to the last complete one.
        if file.metadata()?.len() > complete {
            file.set_len(complete)?;
        }
        Ok((
            EvidenceLog {
                path: path.to_path_buf(),
                file,
                head,
            },
            created,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append entries (not yet synced).
    pub fn append(&mut self, entries: &[(u64, String, Record)]) -> std::io::Result<()> {
        let mut out = Vec::new();
        let mut head = self.head;
        for (at_ms, terminal, record) in entries {
            let entry = Entry {
                prev: head,
                at_ms: *at_ms,
                terminal: terminal.clone(),
                record: record.clone(),
            };
            head = link(&head, &entry.body_digest());
            let bytes = entry.encode();
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(&bytes);
        }
        self.file.write_all(&out)?;
        self.head = head;
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

/// The chain of `terminal` from the log at `path`: its entries whole
/// (those from `since_ms` on), every other as its hash.
pub fn export(path: &Path, terminal: &str, since_ms: u64) -> Result<Export, String> {
    let mut items = Vec::new();
    let mut problem = None;
    for_each(path, |bytes, _| {
        // Its enrolments always whole: the keys its reports are checked with.
        let entry = match Entry::decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                problem = Some(format!("an entry cannot be read: {e}"));
                return false;
            }
        };
        let whole = entry.terminal == terminal
            && (entry.at_ms >= since_ms || matches!(entry.record, Record::Enrolled { .. }));
        items.push(if whole {
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
        let export = export(&path, "a", 0).expect("export");
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
        // From a time on: the earlier entries elided but the enrolments,
        // the chain intact.
        let later = super::export(&path, "a", 1_001).expect("export");
        assert!(matches!(later.items[0], Item::Entry(_)));
    }
}

//! The standalone backend: an embedded redb database (ACID, fsync per
//! commit). Each table holds one kind of record, by key.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::StoreError;
use super::backend::{Backend, Change, Table};

const TERMINALS: TableDefinition<&str, &[u8]> = TableDefinition::new("terminals");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const PAIRS: TableDefinition<&str, &[u8]> = TableDefinition::new("pairs");
const DISPATCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("dispatches");
const INVENTORIES: TableDefinition<&str, &[u8]> = TableDefinition::new("inventories");
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const CERTIFICATES: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
const APPROVED: TableDefinition<&str, &[u8]> = TableDefinition::new("approved");
/// The store format (`super::migrate`), under the key `format`; a file
/// without it was written by release 0.1 (format 1).
const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const FORMAT_KEY: &str = "format";

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match table {
        Table::Terminals => TERMINALS,
        Table::Tokens => TOKENS,
        Table::Pairs => PAIRS,
        Table::Dispatches => DISPATCHES,
        Table::Inventories => INVENTORIES,
        Table::Policies => POLICIES,
        Table::Certificates => CERTIFICATES,
        Table::Approved => APPROVED,
    }
}

fn err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// redb's page cache: writes only, the reads come from memory.
const PAGE_CACHE_BYTES: usize = 8 * 1024 * 1024;

/// The standalone backend: an embedded redb database (ACID, fsync per
/// commit).
pub struct Redb {
    db: Database,
    path: std::path::PathBuf,
}

/// The store format of an open database: the marker, or for a file that
/// has tables but no marker, format 1. `None`: a new, empty file.
fn format_of(db: &impl ReadableDatabase) -> Result<Option<u32>, StoreError> {
    let tx = db.begin_read().map_err(err)?;
    let marked = match tx.open_table(META) {
        Ok(t) => t.get(FORMAT_KEY).map_err(err)?.map(|v| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(err(e)),
    };
    if marked.is_some() {
        return Ok(marked);
    }
    let has_tables = tx.list_tables().map_err(err)?.next().is_some();
    Ok(has_tables.then_some(super::migrate::UNMARKED))
}

/// Refuse a database of a newer format; copy one of an older format
/// aside as it is now (the migration is one transaction, so an older
/// format means nothing of it was migrated yet). The copy is written
/// beside, synced, then renamed: a crash leaves the earlier copy or this
/// one, never half of one. `true` once done.
fn set_aside(path: &Path, found: u32) -> Result<bool, StoreError> {
    super::migrate::check(&path.display().to_string(), found)?;
    if found == super::migrate::FORMAT {
        return Ok(true);
    }
    let backup = backup_path(path, found);
    let copy = || -> std::io::Result<()> {
        let mut tmp = backup.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::copy(path, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &backup)?;
        if let Some(dir) = backup.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    copy().map_err(|e| StoreError::Open {
        path: backup.display().to_string(),
        source: redb::Error::Io(e),
    })?;
    tracing::info!(
        from = %path.display(),
        to = %backup.display(),
        "the database of an earlier release is copied aside before its migration"
    );
    Ok(true)
}

/// Where an older database is copied before it is migrated.
pub fn backup_path(path: &Path, format: u32) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".format-{format}"));
    path.with_file_name(name)
}

impl Redb {
    /// Open the database at `path`, creating it (and its tables) when there
    /// is none.
    pub fn open(path: &Path) -> Result<Redb, StoreError> {
        let open_err = |e: redb::DatabaseError| StoreError::Open {
            path: path.display().to_string(),
            source: e.into(),
        };
        // The working set lives in memory already; redb's page cache
        // (1 GiB by default) would hold a second copy of it.
        let open = || {
            redb::Builder::new()
                .set_cache_size(PAGE_CACHE_BYTES)
                .create(path)
                .map_err(open_err)
        };
        // The format is read without writing to the file (a read-write
        // open writes to it): a newer file is refused exactly as it is,
        // and an older one copied aside as it is. A file that needs a
        // repair (a crash) opens only read-write: it is copied after.
        let existing = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        let mut copied = false;
        if existing
            && let Ok(read_only) = redb::Builder::new().open_read_only(path)
            && let Some(found) = format_of(&read_only)?
        {
            drop(read_only);
            copied = set_aside(path, found)?;
        }
        let mut db = open()?;
        let format = format_of(&db)?;
        if let Some(found) = format
            && !copied
        {
            drop(db);
            set_aside(path, found)?;
            db = open()?;
        }
        // Create the tables, so readers never meet a missing one; a new
        // file is in the current format from the start.
        let tx = db.begin_write().map_err(err)?;
        for t in Table::ALL {
            tx.open_table(definition(t)).map_err(err)?;
        }
        {
            let mut meta = tx.open_table(META).map_err(err)?;
            if format.is_none() {
                meta.insert(FORMAT_KEY, super::migrate::FORMAT)
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(Redb {
            db,
            path: path.to_path_buf(),
        })
    }
}

/// Write `batch` in `tx`.
fn write(tx: &redb::WriteTransaction, batch: &[Change]) -> Result<(), StoreError> {
    let mut tables: Vec<(Table, redb::Table<'_, &str, &[u8]>)> = Vec::new();
    for Change { table, key, value } in batch {
        let i = match tables.iter().position(|(t, _)| t == table) {
            Some(i) => i,
            None => {
                tables.push((*table, tx.open_table(definition(*table)).map_err(err)?));
                tables.len() - 1
            }
        };
        match value {
            Some(value) => {
                tables[i]
                    .1
                    .insert(key.as_str(), value.as_slice())
                    .map_err(err)?;
            }
            None => {
                tables[i].1.remove(key.as_str()).map_err(err)?;
            }
        }
    }
    Ok(())
}

impl Backend for Redb {
    fn load(&self) -> Result<Vec<Change>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let mut out = Vec::new();
        for table in Table::ALL {
            let t = tx.open_table(definition(table)).map_err(err)?;
            for item in t.iter().map_err(err)? {
                let (k, v) = item.map_err(err)?;
                out.push(Change::put(table, k.value(), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        write(&tx, batch)?;
        tx.commit().map_err(err)
    }

    fn format(&self) -> Result<u32, StoreError> {
        Ok(format_of(&self.db)?.unwrap_or(super::migrate::FORMAT))
    }

    /// The records and the marker in one transaction: the file is all of
    /// the old format or all of the new.
    fn migrate(&self, batch: &[Change], format: u32) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        write(&tx, batch)?;
        tx.open_table(META)
            .map_err(err)?
            .insert(FORMAT_KEY, format)
            .map_err(err)?;
        tx.commit().map_err(err)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

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
        let db = redb::Builder::new()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
            .map_err(open_err)?;
        // Create the tables, so readers never meet a missing one.
        let tx = db.begin_write().map_err(err)?;
        for t in Table::ALL {
            tx.open_table(definition(t)).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(Redb { db })
    }
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
        {
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
        }
        tx.commit().map_err(err)
    }
}

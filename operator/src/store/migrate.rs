//! Store formats, and the migration of an older store when it is opened.
//!
//! A store (a `tenet.redb`, or the Kubernetes ledger) says which format
//! its records are in; a store without a marker was written by release
//! 0.1 and is format 1. On open an older store is migrated: every record
//! whose current encoding differs is written again, and the marker set,
//! before anything else is written (a `tenet.redb` is first copied aside:
//! [`Redb`](super::Redb)). A store of a newer format is refused unchanged.
//! Readers decode every earlier shape of a record (the canonical encoding
//! tells them apart), so a migration cut short by a crash is simply
//! done again.
//!
//! | format | release | change |
//! |---|---|---|
//! | 1 | 0.1 | (no marker) |
//! | 2 | 0.2 | `TerminalRecord.agent_version` |

use super::StoreError;
use super::backend::{Change, Table};
use super::records::{TerminalRecord, TokenRecord};

/// The format this build writes, and the newest it reads.
pub const FORMAT: u32 = 2;
/// The format of a store without a marker.
pub const UNMARKED: u32 = 1;

/// The changes that bring `records` of store format `from` to [`FORMAT`]:
/// the records whose current encoding differs, written again. An
/// undecodable record is an error naming it (nothing is written then).
pub fn upgrade(from: u32, records: &[Change]) -> Result<Vec<Change>, StoreError> {
    debug_assert!(from < FORMAT);
    let mut out = Vec::new();
    for Change { table, key, value } in records {
        let Some(bytes) = value else { continue };
        let corrupt = |e: tenet_protocol::Rejection| StoreError::Corrupt {
            key: key.clone(),
            message: e.to_string(),
        };
        let current = match table {
            Table::Terminals => {
                tenet_protocol::wire::encode(&TerminalRecord::decode(bytes).map_err(corrupt)?)
            }
            Table::Tokens => {
                tenet_protocol::wire::encode(&TokenRecord::decode(bytes).map_err(corrupt)?)
            }
            // Unchanged since format 1.
            Table::Pairs
            | Table::Dispatches
            | Table::Inventories
            | Table::Policies
            | Table::Certificates
            | Table::Approved => continue,
        };
        if current != *bytes {
            out.push(Change::put(*table, key.clone(), current));
        }
    }
    Ok(out)
}

/// Refuse a store of a format this build does not read.
pub fn check(store: &str, found: u32) -> Result<(), StoreError> {
    if found > FORMAT {
        return Err(StoreError::NewerFormat {
            store: store.to_string(),
            found,
        });
    }
    Ok(())
}

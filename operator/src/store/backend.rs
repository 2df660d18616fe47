//! The seam between the store's working set and where records live
//! durably: an embedded redb database ([`super::Redb`]) or the
//! Kubernetes API (`crate::kubernetes::KubeBackend`).

use super::StoreError;

/// The kinds of record the store keeps; a [`Backend`] stores each kind
/// under its own name (a redb table here; API resources in Kubernetes
/// mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Terminals,
    Tokens,
    Pairs,
    Dispatches,
    Inventories,
    Policies,
    Certificates,
    /// The last approved version of each policy.
    Approved,
}

impl Table {
    pub const ALL: [Table; 8] = [
        Table::Terminals,
        Table::Tokens,
        Table::Pairs,
        Table::Dispatches,
        Table::Inventories,
        Table::Policies,
        Table::Certificates,
        Table::Approved,
    ];
}

/// One change as a backend stores it: the kind of record, its key, and
/// its canonical encoding, or `None` when it is deleted. What
/// [`Backend::load`] returns are changes too: every record, none deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub table: Table,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl Change {
    pub fn put(table: Table, key: impl Into<String>, value: Vec<u8>) -> Change {
        Change {
            table,
            key: key.into(),
            value: Some(value),
        }
    }

    pub fn delete(table: Table, key: impl Into<String>) -> Change {
        Change {
            table,
            key: key.into(),
            value: None,
        }
    }
}

/// Where the store's records live durably. The store keeps the working set
/// in memory and hands the backend batches of changes in order; a batch is
/// durable (or failed, and handed again) before anything it implies leaves
/// the operator.
pub trait Backend: Send + Sync + 'static {
    /// Every record, at open.
    fn load(&self) -> Result<Vec<Change>, StoreError>;
    /// Store a batch of changes atomically and durably.
    fn commit(&self, batch: &[Change]) -> Result<(), StoreError>;
    /// The store format its records are in (`super::migrate`); a store
    /// without a marker is [`super::migrate::UNMARKED`].
    fn format(&self) -> Result<u32, StoreError> {
        Ok(super::migrate::FORMAT)
    }
    /// Write `batch` (an older store's records in the current format) and
    /// mark the store as `format`.
    fn migrate(&self, batch: &[Change], _format: u32) -> Result<(), StoreError> {
        self.commit(batch)
    }
    /// What people call this store in an error.
    fn describe(&self) -> String {
        "the store".into()
    }
}

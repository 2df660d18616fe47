//! What the terminal looks like, behind one trait: the real dpkg database of
//! a root file system, or a YAML file (for simulated terminals).

pub mod dpkg;
pub mod facts;

use std::path::{Path, PathBuf};

pub use dpkg::DpkgInventory;
use tenet_protocol::inventory::Inventory;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("dpkg-query failed ({status}): {stderr}")]
    DpkgQuery { status: String, stderr: String },
}

/// A source of inventories.
pub trait InventorySource: Send + Sync {
    fn collect(&self) -> Result<Inventory, InventoryError>;
}

/// A source whose agent may have rolled a self-update back: the agent's
/// package at the version rolled back is flagged ([`crate::self_update`]).
pub struct RollbackAware<S> {
    pub inner: S,
    /// The agent's data directory (`rolled-back`).
    pub data: PathBuf,
}

impl<S: InventorySource> InventorySource for RollbackAware<S> {
    fn collect(&self) -> Result<Inventory, InventoryError> {
        let mut inventory = self.inner.collect()?;
        if let Some(record) = crate::self_update::read_record(&self.data) {
            crate::self_update::flag(&mut inventory, &record);
        }
        Ok(inventory)
    }
}

/// A terminal described by a YAML file (the format of
/// `examples/inventories/`), re-read on every collection so a test or a
/// simulation can change it.
pub struct FileInventory {
    pub path: PathBuf,
}

impl InventorySource for FileInventory {
    fn collect(&self) -> Result<Inventory, InventoryError> {
        read_inventory_file(&self.path)
    }
}

pub fn read_inventory_file(path: &Path) -> Result<Inventory, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|e| InventoryError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

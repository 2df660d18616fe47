//! The agent's configuration file (YAML).
//!
//! ```yaml
//! terminal: nagoya-ward3-01        # the Terminal resource name
//! data: /var/lib/tenet-agent       # keys, pinned trust, state, outbox (0700)
//! root: /                          # the terminal's root file system
//! labels: { site: nagoya }
//! facts: { os: { family: debian } }
//! inventory:
//!   dpkg: { watchedFiles: [/etc/hospital-ca.pem] }   # or: file: inventory.yaml
//! identity:
//!   tpm: { tcti: "device:/dev/tpmrm0" }              # omit for a file key
//! operator: { address: "tenet.example:7443" }        # the gateway
//! inventoryIntervalSeconds: 60
//! selfUpdate: { deadlineSeconds: 60 }   # a new agent binary's time to reach the operator
//! bundleCacheMiB: 1024                  # bundles kept by digest, least recently used out
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tenet_protocol::inventory::Facts;

use tenet_protocol::Signer;

use crate::inventory::{DpkgInventory, FileInventory, InventorySource};
use crate::store::{LocalState, StoreError};
use std::rc::Rc;

use crate::tpm::{SharedTpm, TpmError, TpmIdentity};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Tpm(#[from] TpmError),
    #[error(transparent)]
    LocalState(#[from] StoreError),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    pub terminal: String,
    pub data: PathBuf,
    #[serde(default = "default_root")]
    pub root: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub facts: Facts,
    pub inventory: InventoryConfig,
    /// Where the identity key lives: in a TPM when configured, otherwise in
    /// `DATA/identity.key` (mode 0600).
    #[serde(default)]
    pub identity: IdentityConfig,
    /// The operator's gateway.
    #[serde(default)]
    pub operator: Option<OperatorConfig>,
    /// How often the inventory is collected; it is sent when it changed.
    #[serde(default = "default_inventory_interval")]
    pub inventory_interval_seconds: u64,
    /// Answer peers' certificate challenges (`tenet cert verify`) here.
    #[serde(default)]
    pub presentation: Option<PresentationConfig>,
    /// How a new agent binary, installed by a payload, is proven
    /// (`crate::self_update`).
    #[serde(default)]
    pub self_update: SelfUpdateConfig,
    /// At most this many MiB of bundles are kept (`DATA/bundles`), the
    /// least recently used going first (default 1024).
    #[serde(default = "default_bundle_cache_mib", rename = "bundleCacheMiB")]
    pub bundle_cache_mib: u64,
}

fn default_bundle_cache_mib() -> u64 {
    1024
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelfUpdateConfig {
    /// How long the new binary has to reach the operator before the
    /// previous one is put back (default 60).
    #[serde(default)]
    pub deadline_seconds: Option<u64>,
}

impl SelfUpdateConfig {
    pub fn deadline(&self) -> std::time::Duration {
        self.deadline_seconds
            .map_or(crate::self_update::DEFAULT_DEADLINE, |s| {
                std::time::Duration::from_secs(s.max(1))
            })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PresentationConfig {
    /// `host:port` to listen on, e.g. `0.0.0.0:7444`.
    pub listen: String,
}

fn default_inventory_interval() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorConfig {
    /// `host:port` of the gateway.
    pub address: String,
    /// The name the gateway's certificate must carry; defaults to the host.
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub tpm: Option<TpmConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TpmConfig {
    /// The TSS TCTI, e.g. `device:/dev/tpmrm0`. The environment variable
    /// `TENET_TPM_TCTI` overrides it.
    pub tcti: String,
}

fn default_root() -> PathBuf {
    PathBuf::from("/")
}

/// Where the inventory comes from: exactly one of `dpkg` and `file`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InventoryConfig {
    #[serde(default)]
    pub dpkg: Option<DpkgConfig>,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DpkgConfig {
    /// Files (absolute paths inside the root) whose digest is reported.
    #[serde(default)]
    pub watched_files: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl AgentConfig {
    pub fn read(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut c: AgentConfig = serde_yaml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        // Relative paths are relative to the config file; all become absolute,
        // since loaders run artifacts from their own working directory.
        let absolute = std::path::absolute(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        c.data = base.join(&c.data);
        c.root = base.join(&c.root);
        if let Some(p) = &mut c.inventory.file {
            *p = base.join(&*p);
        }
        if c.inventory.dpkg.is_some() == c.inventory.file.is_some() {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                message: "inventory: set exactly one of dpkg and file".into(),
            });
        }
        Ok(c)
    }

    /// The identity key: the TPM's when configured, otherwise the file key
    /// (created on first use). The public key is written to
    /// `DATA/identity.key.pub` either way.
    pub fn identity(&self, store: &LocalState) -> Result<Box<dyn Signer>, IdentityError> {
        Ok(self.identity_and_tpm(store)?.0)
    }

    /// The identity key, and the TPM it lives in (for quotes) when it does.
    #[allow(clippy::type_complexity)]
    pub fn identity_and_tpm(
        &self,
        store: &LocalState,
    ) -> Result<(Box<dyn Signer>, Option<Rc<TpmIdentity>>), IdentityError> {
        Ok(match &self.identity.tpm {
            Some(tpm) => {
                let tcti = std::env::var("TENET_TPM_TCTI").unwrap_or_else(|_| tpm.tcti.clone());
                let t = TpmIdentity::open(&tcti)?;
                let pub_path = store.dir().join("identity.key.pub");
                crate::store::write_atomically(
                    &pub_path,
                    t.public_key().to_pem().as_bytes(),
                    0o644,
                )?;
                let t = Rc::new(t);
                (Box::new(SharedTpm(t.clone())), Some(t))
            }
            None => (Box::new(store.file_identity()?), None),
        })
    }

    pub fn inventory_source(&self) -> Arc<dyn InventorySource> {
        match (&self.inventory.file, &self.inventory.dpkg) {
            (Some(path), _) => Arc::new(FileInventory { path: path.clone() }),
            (None, dpkg) => Arc::new(crate::inventory::RollbackAware {
                inner: DpkgInventory {
                    terminal: self.terminal.clone(),
                    root: self.root.clone(),
                    labels: self.labels.clone(),
                    facts: self.facts.clone(),
                    watched_files: dpkg.clone().unwrap_or_default().watched_files,
                },
                data: self.data.clone(),
            }),
        }
    }
}

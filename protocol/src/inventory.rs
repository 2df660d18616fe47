//! What an agent observes on its terminal: facts, packages, services and
//! files. The operator evaluates policies against this; the agent produces it
//! (from dpkg, systemd and the file system, or from a YAML file for simulated
//! terminals).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One terminal's observed state. Field names are camelCase on the wire and
/// in inventory files, as in the Kubernetes resources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inventory {
    /// The terminal's name (its `Terminal` resource name).
    pub terminal: String,
    /// Labels the terminal reports about itself (`site`, `role`, ...): a
    /// claim (`claims.labels` in CEL). Policies select on the labels admins
    /// assigned on its bootstrap token, not on these.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub facts: Facts,
    #[serde(default)]
    pub packages: Vec<Package>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// Facts about a terminal that policies select on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Facts {
    #[serde(default)]
    pub os: OsFacts,
    /// The site the terminal belongs to, when known.
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub hardware: HardwareFacts,
    /// Anything else the agent or the admin adds, as strings.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OsFacts {
    /// `debian`, `windows`, `macos`, ...
    #[serde(default)]
    pub family: String,
    /// `debian`, `ubuntu`, ...
    #[serde(default)]
    pub distribution: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kernel: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HardwareFacts {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub cpu_cores: u32,
    #[serde(default)]
    pub memory_mib: u64,
    /// Whether the terminal has a TPM the agent can use.
    #[serde(default)]
    pub tpm: bool,
}

/// Which package manager a package belongs to; it decides how versions
/// compare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageManager {
    #[default]
    Dpkg,
    /// Anything versioned with semantic versioning (an MSI, a tarball, ...).
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Package {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub manager: PackageManager,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Running,
    #[default]
    Stopped,
    Failed,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Running => "running",
            ServiceState::Stopped => "stopped",
            ServiceState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub state: ServiceState,
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
    #[serde(default)]
    pub size: u64,
}

/// Bounds on what one inventory may hold.
pub const MAX_PACKAGES: usize = 20_000;
pub const MAX_SERVICES: usize = 2_000;
pub const MAX_FILES: usize = 5_000;
const MAX_TEXT: usize = 1024;

impl Inventory {
    /// Refuse an inventory too large to be real (endless data).
    pub fn check(&self) -> Result<(), crate::reject::Rejection> {
        use crate::wire::limit;
        limit("the package list", self.packages.len(), MAX_PACKAGES)?;
        limit("the service list", self.services.len(), MAX_SERVICES)?;
        limit("the file list", self.files.len(), MAX_FILES)?;
        limit("the label list", self.labels.len(), 256)?;
        limit("the extra facts", self.facts.extra.len(), 256)?;
        let longest = self
            .packages
            .iter()
            .flat_map(|p| [p.name.len(), p.version.len()])
            .chain(self.services.iter().map(|s| s.name.len()))
            .chain(self.files.iter().map(|f| f.path.len()))
            .max()
            .unwrap_or(0);
        limit("a name in the inventory", longest, MAX_TEXT)
    }
}

/// An agent's signed inventory, sent on start, on change and periodically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReport {
    pub terminal: String,
    /// Per terminal, strictly increasing: an older report never overwrites a newer one.
    pub sequence: u64,
    pub collected_at_ms: u64,
    pub inventory: Inventory,
}

impl crate::wire::Message for InventoryReport {
    const KIND: crate::wire::Kind = crate::wire::Kind::InventoryReport;

    fn check(&self) -> Result<(), crate::reject::Rejection> {
        if self.inventory.terminal != self.terminal {
            return Err(crate::reject::Rejection::WrongTerminal {
                expected: self.terminal.clone(),
                found: self.inventory.terminal.clone(),
            });
        }
        self.inventory.check()
    }
}

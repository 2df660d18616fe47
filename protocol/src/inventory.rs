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
    /// Labels the admin gave the terminal at enrolment (`site`, `role`, ...).
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default)]
    pub hardware: HardwareFacts,
    /// Anything else the agent or the admin adds, as strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
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

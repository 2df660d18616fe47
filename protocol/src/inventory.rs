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
    #[serde(default)]
    pub security: SecurityFacts,
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
    /// Debian's name for it: `amd64`, `arm64`, ...
    #[serde(default)]
    pub architecture: String,
}

/// How the terminal protects itself, as the agent finds it; `None` where
/// it could not tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityFacts {
    /// The root file system sits on an encrypted block device (dm-crypt).
    #[serde(default)]
    pub disk_encrypted: Option<bool>,
    /// A firewall ruleset is loaded (nftables).
    #[serde(default)]
    pub firewall: Option<bool>,
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
    /// How far the package manager got with it; only `installed` counts as
    /// installed.
    #[serde(default)]
    pub state: PackageState,
    /// What is wrong with it besides its state, as the package manager
    /// says (`dpkg --audit`, a reinst-required flag); any makes it count as
    /// not installed.
    #[serde(default)]
    pub problems: Vec<String>,
}

impl Package {
    /// A fully installed package.
    pub fn installed(name: &str, version: &str, manager: PackageManager) -> Package {
        Package {
            name: name.to_string(),
            version: version.to_string(),
            manager,
            state: PackageState::Installed,
            problems: Vec::new(),
        }
    }

    /// Fully installed, with nothing wrong: the only way a package
    /// satisfies a requirement that it be there.
    pub fn is_installed(&self) -> bool {
        self.state == PackageState::Installed && self.problems.is_empty()
    }

    /// Any of its files are there (every state but `config-files`): what a
    /// requirement that it be absent looks at.
    pub fn is_present(&self) -> bool {
        self.state != PackageState::ConfigFiles
    }

    /// Why it does not count as installed, for a person (`jq 1.6-2.1 is
    /// unpacked but not configured`); `None` when it does.
    pub fn not_installed_because(&self) -> Option<String> {
        let (name, version) = (&self.name, &self.version);
        let state = match self.state {
            PackageState::Installed => None,
            PackageState::Unpacked => {
                Some(format!("{name} {version} is unpacked but not configured"))
            }
            PackageState::HalfConfigured => Some(format!(
                "{name} {version} is half-configured (its configuration failed)"
            )),
            PackageState::HalfInstalled => Some(format!(
                "{name} {version} is half-installed (its installation or removal did not finish)"
            )),
            PackageState::TriggersAwaited => Some(format!(
                "{name} {version} awaits the triggers of another package"
            )),
            PackageState::TriggersPending => Some(format!("{name} {version} has triggers pending")),
            PackageState::ConfigFiles => Some(format!(
                "{name} is removed; only its configuration files remain"
            )),
        };
        match (state, self.problems.is_empty()) {
            (None, true) => None,
            (Some(s), true) => Some(s),
            (None, false) => Some(format!(
                "{name} {version} is installed, but {}",
                self.problems.join("; ")
            )),
            (Some(s), false) => Some(format!("{s}; {}", self.problems.join("; "))),
        }
    }
}

/// How far dpkg got with a package: the second letter of `dpkg-query`'s
/// `${db:Status-Abbrev}` (`ii` is installed, `iU` unpacked, and so on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PackageState {
    /// `i`: unpacked and configured.
    #[default]
    Installed,
    /// `U`: unpacked, not configured (a dependency was missing, say).
    Unpacked,
    /// `F`: configuration started and failed.
    HalfConfigured,
    /// `H`: installation or removal started and did not finish.
    HalfInstalled,
    /// `W`: waits for another package's triggers.
    TriggersAwaited,
    /// `t`: its own triggers are pending.
    TriggersPending,
    /// `c`: removed; only its configuration files are left.
    ConfigFiles,
}

impl PackageState {
    /// From dpkg's one-letter status; `None` for `n` (not installed) or an
    /// unknown letter.
    pub fn from_dpkg(letter: u8) -> Option<PackageState> {
        Some(match letter {
            b'i' => PackageState::Installed,
            b'U' => PackageState::Unpacked,
            b'F' => PackageState::HalfConfigured,
            b'H' => PackageState::HalfInstalled,
            b'W' => PackageState::TriggersAwaited,
            b't' => PackageState::TriggersPending,
            b'c' => PackageState::ConfigFiles,
            _ => return None,
        })
    }

    /// The name in inventories and policies (`half-configured`).
    pub fn name(self) -> &'static str {
        match self {
            PackageState::Installed => "installed",
            PackageState::Unpacked => "unpacked",
            PackageState::HalfConfigured => "half-configured",
            PackageState::HalfInstalled => "half-installed",
            PackageState::TriggersAwaited => "triggers-awaited",
            PackageState::TriggersPending => "triggers-pending",
            PackageState::ConfigFiles => "config-files",
        }
    }
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
        for p in &self.packages {
            limit("a package's problem list", p.problems.len(), 16)?;
        }
        let longest = self
            .packages
            .iter()
            .flat_map(|p| {
                [p.name.len(), p.version.len()]
                    .into_iter()
                    .chain(p.problems.iter().map(String::len))
            })
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

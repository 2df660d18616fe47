//! The inventory of a Debian root file system: packages from its real dpkg
//! database (`dpkg-query --admindir=ROOT/var/lib/dpkg`), services and
//! watched files.
//!
//! Services: on the running system (root `/`) from `systemctl`; for another
//! root (a terminal image, a test root) from `ROOT/var/lib/tenet/services/`,
//! one file per service holding `running` or `stopped` and optionally
//! `enabled`, because no service manager runs inside such a root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tenet_protocol::inventory::{
    Facts, FileEntry, Inventory, Package, PackageManager, Service, ServiceState,
};
use tenet_protocol::wire::sha256;

use super::{InventoryError, InventorySource};

pub struct DpkgInventory {
    pub terminal: String,
    pub root: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub facts: Facts,
    /// Absolute paths (inside the root) whose digest is reported.
    pub watched_files: Vec<String>,
}

impl DpkgInventory {
    fn packages(&self) -> Result<Vec<Package>, InventoryError> {
        let admindir = self.root.join("var/lib/dpkg");
        let out = Command::new("dpkg-query")
            .arg(format!("--admindir={}", admindir.display()))
            .args(["-W", "-f=${Package}\\t${Version}\\t${db:Status-Abbrev}\\n"])
            .output()
            .map_err(|source| InventoryError::Io {
                path: "dpkg-query".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(InventoryError::DpkgQuery {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(parse_dpkg_query(&String::from_utf8_lossy(&out.stdout)))
    }

    fn services(&self) -> Vec<Service> {
        if self.root == Path::new("/") {
            return systemd_services();
        }
        let dir = self.root.join("var/lib/tenet/services");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut services: Vec<Service> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(e.path()).ok()?;
                let words: Vec<&str> = text.split_whitespace().collect();
                let state = match words.first().copied() {
                    Some("running") => ServiceState::Running,
                    Some("failed") => ServiceState::Failed,
                    _ => ServiceState::Stopped,
                };
                Some(Service {
                    name,
                    state,
                    enabled: words.contains(&"enabled"),
                })
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        services
    }

    fn files(&self) -> Vec<FileEntry> {
        self.watched_files
            .iter()
            .filter_map(|p| {
                let data = std::fs::read(inside(&self.root, p)).ok()?;
                Some(FileEntry {
                    path: p.clone(),
                    sha256: hex::encode(sha256(&data)),
                    size: data.len() as u64,
                })
            })
            .collect()
    }
}

/// Services of the running system, from systemd: whether each is active
/// (`systemctl list-units`) and enabled (`systemctl list-unit-files`). A
/// system without systemd reports none.
fn systemd_services() -> Vec<Service> {
    let run = |args: &[&str]| {
        Command::new("systemctl")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    parse_systemctl(
        &run(&[
            "list-units",
            "--type=service",
            "--all",
            "--no-legend",
            "--plain",
        ]),
        &run(&[
            "list-unit-files",
            "--type=service",
            "--no-legend",
            "--plain",
        ]),
    )
}

/// Merge `systemctl list-units` (UNIT LOAD ACTIVE SUB ...) and
/// `systemctl list-unit-files` (UNIT STATE ...) output; names lose `.service`.
pub fn parse_systemctl(units: &str, unit_files: &str) -> Vec<Service> {
    let name = |unit: &str| unit.strip_suffix(".service").map(str::to_string);
    let enabled: std::collections::HashSet<String> = unit_files
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (unit, state) = (f.next()?, f.next()?);
            (state == "enabled").then(|| name(unit)).flatten()
        })
        .collect();
    let mut services: Vec<Service> = units
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (unit, _load, active, sub) = (f.next()?, f.next()?, f.next()?, f.next()?);
            let name = name(unit)?;
            let state = match (active, sub) {
                ("active", "running") => ServiceState::Running,
                ("failed", _) => ServiceState::Failed,
                _ => ServiceState::Stopped,
            };
            Some(Service {
                enabled: enabled.contains(&name),
                name,
                state,
            })
        })
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    services.dedup_by(|a, b| a.name == b.name);
    services
}

/// `path` (absolute on the terminal) under `root`.
pub fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Installed packages from `dpkg-query -W` output (`name\tversion\tstatus`):
/// only those dpkg considers installed (`ii`, or half-configured states
/// whose files are there: `iU`, `iF`, `iH`, `iW`, `it`).
pub fn parse_dpkg_query(text: &str) -> Vec<Package> {
    let mut packages: Vec<Package> = text
        .lines()
        .filter_map(|line| {
            let mut f = line.split('\t');
            let (name, version, status) = (f.next()?, f.next()?, f.next()?);
            let installed = status
                .as_bytes()
                .get(1)
                .is_some_and(|s| b"iUFHWt".contains(s));
            (installed && !version.is_empty()).then(|| Package {
                name: name.to_string(),
                version: version.to_string(),
                manager: PackageManager::Dpkg,
            })
        })
        .collect();
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    packages
}

impl InventorySource for DpkgInventory {
    fn collect(&self) -> Result<Inventory, InventoryError> {
        Ok(Inventory {
            terminal: self.terminal.clone(),
            labels: self.labels.clone(),
            facts: self.facts.clone(),
            packages: self.packages()?,
            services: self.services(),
            files: self.files(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_states() {
        let units = "clamav-daemon.service loaded active running ClamAV daemon\ncups.service loaded inactive dead CUPS\nbad.service loaded failed failed Bad\nx.socket loaded active listening X\n";
        let files = "clamav-daemon.service enabled enabled\ncups.service disabled enabled\n";
        let got = parse_systemctl(units, files);
        let summary: Vec<(String, ServiceState, bool)> = got
            .into_iter()
            .map(|s| (s.name, s.state, s.enabled))
            .collect();
        assert_eq!(
            summary,
            [
                ("bad".to_string(), ServiceState::Failed, false),
                ("clamav-daemon".to_string(), ServiceState::Running, true),
                ("cups".to_string(), ServiceState::Stopped, false),
            ]
        );
    }

    #[test]
    fn only_installed_packages_count() {
        let text =
            "browser-a\t120.0-1\tii \ntelnetd\t0.17-44\trc \nhalf\t1.0\tiU \nnothing\t\tun \n";
        let names: Vec<String> = parse_dpkg_query(text).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["browser-a", "half"]);
    }
}

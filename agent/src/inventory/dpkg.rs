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
    Facts, FileEntry, Inventory, Package, PackageManager, PackageState, Service, ServiceState,
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
            // dpkg's own words, whatever the terminal's language.
            .env("LC_ALL", "C")
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
        let mut packages = parse_dpkg_query(&String::from_utf8_lossy(&out.stdout));
        let audit = self.audit();
        for p in &mut packages {
            // A state other than installed already says what is wrong.
            if p.state == PackageState::Installed
                && let Some(problems) = audit.get(&p.name)
            {
                p.problems.extend(problems.iter().cloned());
            }
        }
        Ok(packages)
    }

    /// What `dpkg --audit` finds wrong, by package (nothing when it cannot
    /// run: the states dpkg-query gave still count).
    fn audit(&self) -> BTreeMap<String, Vec<String>> {
        let admindir = self.root.join("var/lib/dpkg");
        match Command::new("dpkg")
            .env("LC_ALL", "C")
            .arg(format!("--admindir={}", admindir.display()))
            .arg("--audit")
            .output()
        {
            Ok(out) if out.status.success() => {
                parse_dpkg_audit(&String::from_utf8_lossy(&out.stdout))
            }
            Ok(out) => {
                tracing::warn!(status = %out.status, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "dpkg --audit failed");
                BTreeMap::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot run dpkg --audit");
                BTreeMap::new()
            }
        }
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

/// Packages from `dpkg-query -W` output (`name\tversion\tstatus`), each
/// with its state: every package dpkg has files or configuration of (all
/// but `n`, not installed), fully installed (`ii`) or not (`iU` unpacked,
/// `iF` half-configured, `iH` half-installed, `iW`/`it` triggers, `rc`
/// configuration files only). A reinst-required flag (`R`) is a problem.
pub fn parse_dpkg_query(text: &str) -> Vec<Package> {
    let mut packages: Vec<Package> = text
        .lines()
        .filter_map(|line| {
            let mut f = line.split('\t');
            let (name, version, status) = (f.next()?, f.next()?, f.next()?);
            let status = status.as_bytes();
            let state = PackageState::from_dpkg(*status.get(1)?)?;
            if version.is_empty() && state != PackageState::ConfigFiles {
                return None;
            }
            let mut package = Package::installed(name, version, PackageManager::Dpkg);
            package.state = state;
            if status.get(2) == Some(&b'R') {
                package
                    .problems
                    .push("dpkg marks it reinst-required: it must be reinstalled".into());
            }
            Some(package)
        })
        .collect();
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    // One entry per name: a multi-arch package (libfoo:amd64 and
    // libfoo:i386 both read as libfoo) is only as installed as its least
    // installed instance (leaving out the configuration files of a removed
    // one).
    packages.dedup_by(|later, kept| {
        if later.name != kept.name {
            return false;
        }
        let rank = |p: &Package| match (p.state, p.is_installed()) {
            (PackageState::ConfigFiles, _) => 0,
            (_, true) => 1,
            _ => 2,
        };
        if rank(later) > rank(kept) {
            std::mem::swap(later, kept);
        }
        true
    });
    packages
}

/// The problems `dpkg --audit` reports, by package (without its `:arch`):
/// each section's first clause ("The following packages are missing the
/// md5sums control file in the database, ..."), as `dpkg --audit finds it
/// missing the md5sums control file in the database`, for every package
/// listed under it. Read with `LC_ALL=C`.
pub fn parse_dpkg_audit(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for section in text.split("\n\n") {
        let mut explanation = Vec::new();
        let mut listed = Vec::new();
        for line in section.lines() {
            if line.starts_with(' ') {
                if let Some(name) = line.split_whitespace().next() {
                    listed.push(name.to_string());
                }
            } else if listed.is_empty() {
                explanation.push(line.trim());
            }
        }
        if listed.is_empty() {
            continue;
        }
        let explanation = explanation.join(" ");
        let sentence = explanation
            .split(". ")
            .next()
            .unwrap_or_default()
            .trim_end_matches([':', '.'])
            .trim();
        let sentence = sentence
            .strip_prefix("The following packages are ")
            .or_else(|| sentence.strip_prefix("The following packages "))
            .unwrap_or(sentence);
        // Its first clause: "missing the md5sums control file in the database".
        let clause = sentence.split(',').next().unwrap_or(sentence).trim();
        let problem = format!("dpkg --audit finds it {clause}");
        for name in listed {
            // dpkg names a Multi-Arch: same package with its architecture.
            let name = name.split(':').next().unwrap_or(&name).to_string();
            let p = problems.entry(name).or_default();
            if !p.contains(&problem) {
                p.push(problem.clone());
            }
        }
    }
    problems
}

impl InventorySource for DpkgInventory {
    fn collect(&self) -> Result<Inventory, InventoryError> {
        Ok(Inventory {
            terminal: self.terminal.clone(),
            labels: self.labels.clone(),
            facts: super::facts::observe(&self.root, &self.facts),
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
    fn each_package_comes_with_its_dpkg_state() {
        let text = "browser-a\t120.0-1\tii \ntelnetd\t0.17-44\trc \njq\t1.6-2.1\tiU \nzsh\t5.9-4\tiUR\nnothing\t\tun \nlibc\t2.36\tiF \n";
        let got: Vec<(String, PackageState, Option<String>)> = parse_dpkg_query(text)
            .into_iter()
            .map(|p| {
                let why = p.not_installed_because();
                (p.name, p.state, why)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("browser-a".into(), PackageState::Installed, None),
                (
                    "jq".into(),
                    PackageState::Unpacked,
                    Some("jq 1.6-2.1 is unpacked but not configured".into())
                ),
                (
                    "libc".into(),
                    PackageState::HalfConfigured,
                    Some("libc 2.36 is half-configured (its configuration failed)".into())
                ),
                (
                    "telnetd".into(),
                    PackageState::ConfigFiles,
                    Some("telnetd is removed; only its configuration files remain".into())
                ),
                (
                    "zsh".into(),
                    PackageState::Unpacked,
                    Some("zsh 5.9-4 is unpacked but not configured; dpkg marks it reinst-required: it must be reinstalled".into())
                ),
            ]
        );
    }

    /// What dpkg 1.21 prints for a database with a reinst-required, a
    /// half-configured and a fully installed package without list files.
    #[test]
    fn dpkg_audit_problems_are_read_by_package() {
        let text = "The following packages are in a mess due to serious problems during\ninstallation.  They must be reinstalled for them (and any packages\nthat depend on them) to function properly:\n zsh                  shell with lots of features\n\nThe following packages are only half configured, probably due to problems\nconfiguring them the first time.  The configuration should be retried using\ndpkg --configure <package> or the configure menu option in dselect:\n jq                   lightweight and flexible command-line JSON processor\n\nThe following packages are missing the list control file in the\ndatabase, they need to be reinstalled:\n hello                example package based on GNU hello\n jq                   lightweight and flexible command-line JSON processor\n\n";
        let audit = parse_dpkg_audit(text);
        assert_eq!(
            audit.get("hello").map(Vec::as_slice),
            Some(
                &[
                    "dpkg --audit finds it missing the list control file in the database"
                        .to_string()
                ][..]
            )
        );
        assert_eq!(
            audit.get("zsh").map(Vec::as_slice),
            Some(
                &[
                    "dpkg --audit finds it in a mess due to serious problems during installation"
                        .to_string()
                ][..]
            )
        );
        assert_eq!(audit.get("jq").map(Vec::len), Some(2));
        assert!(parse_dpkg_audit("").is_empty());
        // A Multi-Arch: same library is named with its architecture.
        let lib = "The following packages are missing the md5sums control file in the\ndatabase, they need to be reinstalled:\n libssl3:amd64        Secure Sockets Layer toolkit\n";
        assert_eq!(parse_dpkg_audit(lib).get("libssl3").map(Vec::len), Some(1));
    }

    /// libfoo:amd64 and libfoo:i386 both read as libfoo: the name is only
    /// as installed as its least installed instance.
    #[test]
    fn a_multi_arch_package_is_as_installed_as_its_worst_instance() {
        let both = "libfoo\t1.0-1\tii \nlibfoo\t1.0-1\tiU \n";
        let got = parse_dpkg_query(both);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].state, PackageState::Unpacked);
        let removed_one = "libfoo\t1.0-1\trc \nlibfoo\t1.0-1\tii \n";
        let got = parse_dpkg_query(removed_one);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_installed());
    }
}

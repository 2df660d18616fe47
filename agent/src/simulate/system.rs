//! The machine under a simulated agent: an inventory in memory, changed by
//! the artifacts a payload runs as the table in [`super`] says.

use std::sync::Mutex;
use std::time::Instant;

use tenet_protocol::bundle::Artifact;
use tenet_protocol::inventory::{
    FileEntry, Inventory, Package, PackageManager, PackageState, Service, ServiceState,
};
use tenet_protocol::stdlib::{Step, deb_file_name};
use tenet_protocol::wire::sha256;

use crate::exec::System;

/// The machine under one simulated agent.
pub struct SimSystem {
    inventory: Mutex<Inventory>,
}

impl SimSystem {
    pub fn new(inventory: Inventory) -> SimSystem {
        SimSystem {
            inventory: Mutex::new(inventory),
        }
    }

    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Inventory) -> R) -> R {
        let mut inv = self
            .inventory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut inv)
    }
}

impl System for SimSystem {
    fn inventory(&self) -> Result<Inventory, String> {
        Ok(self.with(|i| i.clone()))
    }

    fn write_file(&self, path: &str, data: &[u8]) -> i32 {
        self.with(|inv| {
            inv.files.retain(|f| f.path != path);
            inv.files.push(FileEntry {
                path: path.to_string(),
                sha256: hex::encode(sha256(data)),
                size: data.len() as u64,
            });
        });
        0
    }

    fn run_artifact(
        &self,
        artifacts: &[Artifact],
        artifact: &Artifact,
        args: &[&str],
        _deadline: Instant,
    ) -> (i32, Vec<u8>) {
        if sha256(&artifact.data) != artifact.sha256 {
            return (
                -3,
                format!(
                    "artifact {} does not match its digest; not run\n",
                    artifact.name
                )
                .into_bytes(),
            );
        }
        let mut out = String::new();
        let code = match artifact.name.as_str() {
            "install-deb.sh" => self.with(|inv| {
                for arg in args {
                    let known = artifacts.iter().any(|a| a.name == *arg);
                    let Some((name, version)) = deb_file_name(arg).filter(|_| known) else {
                        out.push_str(&format!("dpkg: error: cannot access archive '{arg}'\n"));
                        return 2;
                    };
                    inv.packages.retain(|p| p.name != name);
                    out.push_str(&format!("Setting up {name} ({version}) ...\n"));
                    inv.packages.push(Package {
                        name,
                        version,
                        manager: PackageManager::Dpkg,
                        state: Default::default(),
                        problems: Vec::new(),
                    });
                }
                0
            }),
            "tenet-std.sh" => self.with(|inv| standard_library(inv, artifacts, args, &mut out)),
            "remove-packages.sh" => self.with(|inv| {
                for arg in args {
                    if inv.packages.iter().any(|p| p.name == *arg) {
                        out.push_str(&format!("Purging configuration files for {arg} ...\n"));
                    }
                    inv.packages.retain(|p| p.name != *arg);
                }
                0
            }),
            "ensure-service.sh" => self.with(|inv| {
                let Some(name) = args.first() else {
                    out.push_str("usage: ensure-service.sh SERVICE\n");
                    return 2;
                };
                inv.services.retain(|s| s.name != *name);
                inv.services.push(Service {
                    name: name.to_string(),
                    state: ServiceState::Running,
                    enabled: true,
                });
                0
            }),
            other => {
                out.push_str(&format!("the simulation has no model of {other}\n"));
                127
            }
        };
        (code, out.into_bytes())
    }
}

/// The standard library's steps on the in-memory terminal, as
/// `tenet-std.sh` does them on a real one (in its order: purges, installs,
/// files, services; a step whose requirement holds does nothing).
fn standard_library(
    inv: &mut Inventory,
    artifacts: &[Artifact],
    args: &[&str],
    out: &mut String,
) -> i32 {
    let mut steps = Vec::new();
    for arg in args {
        match Step::parse(arg) {
            Ok(step) => steps.push(step),
            Err(e) => {
                out.push_str(&format!("{e}\n"));
                return 1;
            }
        }
    }
    steps.sort_by_key(Step::phase);
    let debs: Vec<(String, String)> = artifacts
        .iter()
        .filter_map(|a| deb_file_name(&a.name))
        .collect();
    let primaries: Vec<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Install { package, .. } => Some(package.as_str()),
            _ => None,
        })
        .collect();
    let mut installed_any = false;
    for step in &steps {
        match step {
            Step::Purge { package } => inv.packages.retain(|p| p.name != *package),
            Step::Install {
                package,
                constraint,
            } => {
                let holds = inv.packages.iter().any(|p| {
                    p.name == *package
                        && p.state == PackageState::Installed
                        && constraint
                            .iter()
                            .all(|(op, v)| dpkg_order(&p.version, v).is_some_and(|o| op.holds(o)))
                });
                if holds {
                    continue;
                }
                let Some((_, version)) = debs.iter().find(|(p, _)| p == package) else {
                    out.push_str(&format!("the bundle carries no .deb of {package}\n"));
                    return 1;
                };
                install(inv, package, version, out);
                installed_any = true;
            }
            Step::File { path, sha256: want } => {
                let Some(a) = artifacts.iter().find(|a| hex::encode(a.sha256) == *want) else {
                    out.push_str(&format!(
                        "the bundle carries no file with the SHA-256 {path} must have\n"
                    ));
                    return 1;
                };
                inv.files.retain(|f| f.path != *path);
                inv.files.push(FileEntry {
                    path: path.clone(),
                    sha256: want.clone(),
                    size: a.size,
                });
            }
            Step::FileAbsent { path } => inv.files.retain(|f| f.path != *path),
            Step::Service {
                name,
                running,
                enabled,
            } => {
                let was = inv.services.iter().find(|s| s.name == *name);
                let enabled = enabled.unwrap_or(was.is_some_and(|s| s.enabled));
                inv.services.retain(|s| s.name != *name);
                inv.services.push(Service {
                    name: name.clone(),
                    state: if *running {
                        ServiceState::Running
                    } else {
                        ServiceState::Stopped
                    },
                    enabled,
                });
            }
        }
    }
    // The bundle's other .debs go along where the terminal lacks them.
    if installed_any {
        for (package, version) in debs
            .iter()
            .filter(|(p, _)| !primaries.contains(&p.as_str()))
        {
            if !inv.packages.iter().any(|p| p.name == *package) {
                install(inv, package, version, out);
            }
        }
    }
    0
}

fn install(inv: &mut Inventory, package: &str, version: &str, out: &mut String) {
    inv.packages.retain(|p| p.name != package);
    out.push_str(&format!("Setting up {package} ({version}) ...\n"));
    inv.packages.push(Package {
        name: package.to_string(),
        version: version.to_string(),
        manager: PackageManager::Dpkg,
        state: Default::default(),
        problems: Vec::new(),
    });
}

/// Debian's order of two versions (`None` when either is not one).
fn dpkg_order(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let a: debversion::Version = a.parse().ok()?;
    let b: debversion::Version = b.parse().ok()?;
    Some(a.cmp(&b))
}

#[cfg(test)]
mod tests;

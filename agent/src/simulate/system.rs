//! The machine under a simulated agent: an inventory in memory, changed by
//! the artifacts a payload runs as the table in [`super`] says.

use std::sync::Mutex;
use std::time::Instant;

use tenet_protocol::bundle::Artifact;
use tenet_protocol::inventory::{
    FileEntry, Inventory, Package, PackageManager, Service, ServiceState,
};
use tenet_protocol::wire::sha256;

use crate::exec::System;

/// The machine under one simulated agent.
pub struct SimSystem {
    inventory: Mutex<Inventory>,
}

/// Package name and version of a Debian file name `NAME_VERSION_ARCH.deb`.
pub fn deb_file_name(name: &str) -> Option<(String, String)> {
    let stem = name.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (package, version, _arch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || package.is_empty() || version.is_empty() {
        return None;
    }
    // Debian file names write an epoch's colon as %3a.
    Some((package.to_string(), version.replace("%3a", ":")))
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

#[cfg(test)]
mod tests;

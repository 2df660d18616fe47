//! The signed payload bundles of the bundle directory, verified against
//! the admin keys, and cached: a file is read and verified again only when
//! its size or modification time changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tenet_protocol::bundle::{BundleTrust, verify_bundle};

use crate::reconcile::pass::Bundle;

/// The `*.bundle` files of a directory, in name order.
pub fn bundle_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// The signed bundles of a directory, verified against the admin keys. A
/// file is read and verified again only when its size or modification time
/// changes: the operator looks every tick, and bundles can be large.
#[derive(Default)]
pub struct BundleCache {
    files: HashMap<PathBuf, CachedBundle>,
}

struct CachedBundle {
    stamp: (std::time::SystemTime, u64),
    /// The bundle's name, its expiry and the bundle; or why it is refused.
    verdict: Result<(String, u64, Bundle), String>,
}

impl BundleCache {
    /// Every `*.bundle` in `dir` that verifies and has not expired, by
    /// name, and the problems with the others.
    pub fn load(
        &mut self,
        dir: &Path,
        trust: &BundleTrust,
        now: u64,
    ) -> (HashMap<String, Bundle>, Vec<String>) {
        let mut bundles = HashMap::new();
        let mut problems = Vec::new();
        let Ok(paths) = bundle_files(dir) else {
            return (
                bundles,
                vec![format!(
                    "{}: cannot read the bundle directory",
                    dir.display()
                )],
            );
        };
        self.files.retain(|p, _| paths.contains(p));
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
            if self.files.get(&path).is_none_or(|c| c.stamp != stamp) {
                let verdict = match std::fs::read(&path) {
                    Err(e) => Err(format!("{}: {e}", path.display())),
                    Ok(bytes) => match verify_bundle(&bytes, trust, None, now) {
                        Ok(v) => Ok((
                            v.bundle.manifest.name.clone(),
                            v.bundle.manifest.expires_ms,
                            Bundle {
                                digest: v.digest,
                                bytes: Arc::new(bytes),
                            },
                        )),
                        Err(e) => Err(format!("{}: refused: {e} ({})", path.display(), e.reason())),
                    },
                };
                self.files
                    .insert(path.clone(), CachedBundle { stamp, verdict });
            }
            match self.files.get(&path).map(|c| &c.verdict) {
                Some(Ok((_, expires_ms, _))) if now >= *expires_ms => problems.push(format!(
                    "{}: refused: the bundle expired (Expired)",
                    path.display()
                )),
                Some(Ok((name, _, bundle))) => {
                    bundles.insert(name.clone(), bundle.clone());
                }
                Some(Err(problem)) => problems.push(problem.clone()),
                None => {}
            }
        }
        (bundles, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenet_protocol::bundle::BundleTrust;
    use tenet_protocol::bundle::{Manifest, PayloadBundle};
    use tenet_protocol::{Algorithm, KeyPair, SignedMessage, Signer};

    fn bundle(name: &str, expires_ms: u64, key: &KeyPair) -> Vec<u8> {
        let b = PayloadBundle {
            manifest: Manifest {
                name: name.into(),
                version: "1".into(),
                description: String::new(),
                capabilities: vec![],
                created_ms: 0,
                expires_ms,
            },
            module: b"\0asm\x01\0\0\0".to_vec(),
            artifacts: vec![],
        };
        SignedMessage::signed(&b, key).expect("sign").encode()
    }

    #[test]
    fn bundles_are_verified_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let stranger = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let trust = BundleTrust {
            admin_keys: vec![admin.public_key()],
            threshold: 1,
        };
        std::fs::write(dir.path().join("a.bundle"), bundle("a", 1_000, &admin)).expect("write");
        std::fs::write(dir.path().join("b.bundle"), bundle("b", 1_000, &stranger)).expect("write");
        let mut cache = BundleCache::default();
        let (bundles, problems) = cache.load(dir.path(), &trust, 10);
        assert_eq!(bundles.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].ends_with("(UnknownKey)"), "{problems:?}");
        // A cached bundle still expires.
        let (bundles, problems) = cache.load(dir.path(), &trust, 1_000);
        assert!(bundles.is_empty());
        assert_eq!(problems.len(), 2);
        // A replaced file is verified again.
        std::fs::write(dir.path().join("b.bundle"), bundle("b", 5_000, &admin)).expect("write");
        let (bundles, _) = cache.load(dir.path(), &trust, 1_000);
        assert_eq!(bundles.keys().collect::<Vec<_>>(), ["b"]);
    }
}

//! The agent's data directory: its identity key, the keys it pinned at
//! enrolment, what it remembers of envelopes (so replays and rollbacks are
//! refused across restarts), and the outbox of signed reports not yet
//! acknowledged (so none is lost across reconnects or restarts).
//!
//! ```text
//! DATA/identity.key      private key, PKCS#8 PEM, 0600 (when not in a TPM)
//! DATA/identity.key.pub
//! DATA/trust-anchors     pinned TrustAnchors (canonical encoding), replaced
//!                        by each verified rotation (`DATA/trust`: before
//!                        anchors had versions, read as version 1)
//! DATA/envelope-state    EnvelopeState
//! DATA/outbox/NNNN.report signed reports waiting for the operator
//! DATA/handover/NNNN.report the report of a run that replaced the agent's
//!                        own binary, held until the new agent is proven
//!                        (`crate::self_update`)
//! DATA/agent-previous    the binary that ran before the last self-update
//! DATA/rolled-back       the last self-update rolled back: why
//! DATA/bundles/HEX.bundle signed bundles by body digest (after the
//!                        SHA-256 of the frame), the least recently used
//!                        going when over the size bound
//! DATA/run/              private 0700 working directories of loaders
//! ```
//! Every file is replaced atomically (write, fsync, rename).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::envelope::EnvelopeState;
use tenet_protocol::keys::KeyError;
use tenet_protocol::wire::{decode, encode};
use tenet_protocol::{Algorithm, KeyPair};

/// The trust anchors as agents before trust rotation pinned them (the
/// file `trust`, now `trust-anchors`).
#[derive(serde::Serialize, serde::Deserialize)]
struct TrustAnchorsBeforeVersions {
    admin_keys: Vec<tenet_protocol::PublicKey>,
    admin_threshold: u8,
    dispatch_key: tenet_protocol::PublicKey,
    issuer_key: tenet_protocol::PublicKey,
}

/// The layout of `envelope-state` before approvals were remembered.
#[derive(serde::Serialize, serde::Deserialize)]
struct EnvelopeStateBeforeApprovals {
    terminal: String,
    last_sequence: u64,
    policy_generations: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the file is corrupt ({message}); it was left as it is")]
    Corrupt { path: String, message: String },
    #[error("{path}: missing; enrol the agent first")]
    NotEnrolled { path: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The agent's state in its data directory (named apart from the
/// operator's `Store` and wasmtime's `Store`).
#[derive(Debug, Clone)]
pub struct LocalState {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Replace `path` with `bytes`, readable as `mode`: a crash leaves the old
/// or the new file, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    tenet_protocol::host::write_atomically(path, bytes, mode).map_err(io(path))
}

impl LocalState {
    /// Open (creating, mode 0700) a data directory.
    pub fn open(dir: &Path) -> Result<LocalState, StoreError> {
        for d in [
            dir.to_path_buf(),
            dir.join("outbox"),
            dir.join("run"),
            dir.join("handover"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(io(&d))?;
        }
        Ok(LocalState {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file identity key, created on first use.
    pub fn file_identity(&self) -> Result<KeyPair, StoreError> {
        let path = self.dir.join("identity.key");
        if !path.exists() {
            KeyPair::generate(Algorithm::Ed25519)?.write_files(&path)?;
        }
        Ok(KeyPair::read_file(&path)?)
    }

    fn read_decoded<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).map(Some).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The trust anchors pinned at enrolment, or by the last rotation.
    pub fn trust(&self) -> Result<TrustAnchors, StoreError> {
        if let Some(t) = self.read_decoded("trust-anchors")? {
            return Ok(t);
        }
        // Pinned before anchors had versions (the file `trust`): version 1.
        let old: TrustAnchorsBeforeVersions =
            self.read_decoded("trust")?
                .ok_or_else(|| StoreError::NotEnrolled {
                    path: self.dir.join("trust-anchors").display().to_string(),
                })?;
        Ok(TrustAnchors {
            version: 1,
            admin_keys: old.admin_keys,
            admin_threshold: old.admin_threshold,
            dispatch_key: old.dispatch_key,
            issuer_key: old.issuer_key,
        })
    }

    pub fn set_trust(&self, trust: &TrustAnchors) -> Result<(), StoreError> {
        write_atomically(&self.dir.join("trust-anchors"), &encode(trust), 0o600)?;
        match std::fs::remove_file(self.dir.join("trust")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(&self.dir.join("trust"))(e))
            }
            _ => Ok(()),
        }
    }

    /// What the agent remembers of envelopes; fresh for `terminal` on first use.
    pub fn envelope_state(&self, terminal: &str) -> Result<EnvelopeState, StoreError> {
        // Written before approvals were remembered: the same, with none.
        if let Ok(Some(old)) = self.read_decoded::<EnvelopeStateBeforeApprovals>("envelope-state") {
            return Ok(EnvelopeState {
                terminal: old.terminal,
                last_sequence: old.last_sequence,
                policy_generations: old.policy_generations,
                approvals: Default::default(),
            });
        }
        Ok(self
            .read_decoded("envelope-state")?
            .unwrap_or_else(|| EnvelopeState::new(terminal)))
    }

    pub fn save_envelope_state(&self, state: &EnvelopeState) -> Result<(), StoreError> {
        write_atomically(&self.dir.join("envelope-state"), &encode(state), 0o600)
    }

    /// Queue a signed report; it stays until [`LocalState::acknowledge`].
    pub fn push_report(&self, sequence: u64, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let path = self
            .dir
            .join("outbox")
            .join(format!("{sequence:020}.report"));
        write_atomically(&path, bytes, 0o600)?;
        Ok(path)
    }

    /// Hold a report back (not in the outbox, so not sent): the run
    /// replaced the agent's binary, and the report goes out once the new
    /// agent is proven, or is rewritten when it is rolled back.
    pub fn hold_report(&self, sequence: u64, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let path = self
            .dir
            .join("handover")
            .join(format!("{sequence:020}.report"));
        write_atomically(&path, bytes, 0o600)?;
        Ok(path)
    }

    /// Reports held back, oldest first.
    pub fn held_reports(&self) -> Result<Vec<(PathBuf, Vec<u8>)>, StoreError> {
        self.reports_in("handover")
    }

    /// Move the held reports to the outbox, as they are.
    pub fn release_held(&self) -> Result<usize, StoreError> {
        let held = self.held_reports()?;
        for (path, _) in &held {
            let to = self
                .dir
                .join("outbox")
                .join(path.file_name().unwrap_or_default());
            std::fs::rename(path, &to).map_err(io(path))?;
        }
        Ok(held.len())
    }

    fn bundle_path(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir
            .join("bundles")
            .join(format!("{}.bundle", hex::encode(digest)))
    }

    /// The signed bundle whose body digest is `digest`, if held and still
    /// that bundle (one that is not any more, corrupted on disk, is
    /// removed: it is asked for again). Its use is recorded (least
    /// recently used goes first).
    pub fn cached_bundle(&self, digest: &[u8; 32]) -> Option<Vec<u8>> {
        let path = self.bundle_path(digest);
        let len = std::fs::metadata(&path).ok()?.len();
        if len > 32 + tenet_protocol::Kind::PayloadBundle.max_frame_bytes_const() as u64 {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let mut bytes = std::fs::read(&path).ok()?;
        // The file is the SHA-256 of the whole frame, then the frame: the
        // body digest alone would not catch a damaged signature.
        if bytes.len() < 32 {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let frame = bytes.split_off(32);
        let (sum, bytes) = (bytes, frame);
        let intact = sum == tenet_protocol::wire::sha256(&bytes)
            && tenet_protocol::SignedMessage::decode(&bytes, tenet_protocol::Kind::PayloadBundle)
                .is_ok_and(|f| f.body_digest() == *digest);
        if !intact {
            tracing::warn!(path = %path.display(), "a cached bundle does not match its digest; removed");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Some(bytes)
    }

    /// Forget the bundle `digest`.
    pub fn drop_bundle(&self, digest: &[u8; 32]) {
        let _ = std::fs::remove_file(self.bundle_path(digest));
    }

    /// Keep a signed bundle (its body digest `digest`, checked by the
    /// caller), then drop the least recently used others while all of them
    /// take more than `limit` bytes.
    pub fn keep_bundle(
        &self,
        digest: &[u8; 32],
        bytes: &[u8],
        limit: u64,
    ) -> Result<(), StoreError> {
        let dir = self.dir.join("bundles");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let kept = self.bundle_path(digest);
        let mut file = tenet_protocol::wire::sha256(bytes).to_vec();
        file.extend_from_slice(bytes);
        write_atomically(&kept, &file, 0o600)?;
        let mut held: Vec<(std::time::SystemTime, u64, PathBuf)> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "bundle"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = held.iter().map(|(_, len, _)| len).sum();
        held.sort();
        for (_, len, path) in held {
            if total <= limit {
                break;
            }
            if path != kept && std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        Ok(())
    }

    /// Reports waiting, oldest first.
    pub fn pending_reports(&self) -> Result<Vec<(PathBuf, Vec<u8>)>, StoreError> {
        self.reports_in("outbox")
    }

    fn reports_in(&self, name: &str) -> Result<Vec<(PathBuf, Vec<u8>)>, StoreError> {
        let dir = self.dir.join(name);
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "report"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|p| std::fs::read(&p).map(|b| (p.clone(), b)).map_err(io(&p)))
            .collect()
    }

    pub fn acknowledge(&self, path: &Path) -> Result<(), StoreError> {
        std::fs::remove_file(path).map_err(io(path))
    }

    /// A fresh private working directory for one run (mode 0700).
    pub fn run_dir(&self, sequence: u64) -> Result<PathBuf, StoreError> {
        let d = self.dir.join("run").join(format!("{sequence:020}"));
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(io(&d))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .map_err(io(&d))?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenet_protocol::bundle::{Manifest, PayloadBundle};

    /// A signed bundle of `module` (whose size sets the bundle's).
    fn bundle(module: Vec<u8>) -> Vec<u8> {
        let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let b = PayloadBundle {
            manifest: Manifest {
                name: "b".into(),
                version: "1".into(),
                description: String::new(),
                capabilities: vec![],
                created_ms: 0,
                expires_ms: u64::MAX,
            },
            module,
            artifacts: vec![],
        };
        tenet_protocol::SignedMessage::signed(&b, &admin)
            .expect("sign")
            .encode()
    }

    fn digest(bytes: &[u8]) -> [u8; 32] {
        tenet_protocol::SignedMessage::decode(bytes, tenet_protocol::Kind::PayloadBundle)
            .expect("decodes")
            .body_digest()
    }

    #[test]
    fn bundles_are_kept_by_digest_within_the_bound_least_recently_used_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalState::open(dir.path()).expect("open");
        let (a, b, c) = (
            bundle(vec![1; 4000]),
            bundle(vec![2; 4000]),
            bundle(vec![3; 4000]),
        );
        let limit = 9000;
        // Kept some minutes ago, a before b.
        let kept_ago = |bytes: &[u8], seconds: u64| {
            store
                .keep_bundle(&digest(bytes), bytes, limit)
                .expect("keep");
            std::fs::File::options()
                .append(true)
                .open(store.bundle_path(&digest(bytes)))
                .and_then(|f| {
                    f.set_modified(
                        std::time::SystemTime::now() - std::time::Duration::from_secs(seconds),
                    )
                })
                .expect("mtime");
        };
        kept_ago(&a, 300);
        kept_ago(&b, 200);
        // Using a makes b the least recently used.
        assert_eq!(store.cached_bundle(&digest(&a)), Some(a.clone()));
        store.keep_bundle(&digest(&c), &c, limit).expect("keep");
        assert_eq!(store.cached_bundle(&digest(&b)), None, "b went");
        assert_eq!(store.cached_bundle(&digest(&a)), Some(a));
        assert_eq!(store.cached_bundle(&digest(&c)), Some(c.clone()));
        // One byte changed on disk (a signature's): dropped, not used.
        let path = store.bundle_path(&digest(&c));
        let mut file = std::fs::read(&path).expect("read");
        let last = file.len() - 1;
        file[last] ^= 1;
        std::fs::write(&path, file).expect("write");
        assert_eq!(store.cached_bundle(&digest(&c)), None);
        assert!(!path.exists());
    }
}

//! The trust anchors the operator hands out and enforces, and their
//! rotations.
//!
//! Version 1 is what the operator is started with: `--admin-key`,
//! `--admin-threshold` and `DATA/dispatch.key` (envelopes and security
//! certificates are signed with the one key). Each later version is a
//! `TrustRotation` the admins signed (K of the old set and K' of the new),
//! kept as `DATA/trust-N.rotation`, N = 2, 3, ...; the operator walks them
//! at start (refusing to start when one does not verify) and again on
//! every tick (a new one is taken while it runs), signs with the dispatch
//! key of the last, pushes a new one to every connected agent and sends
//! the chain first on every session, so each agent pins the same anchors. A rotation's private
//! dispatch key is a `dispatch*.key` file in DATA (`tenet keygen --out
//! DATA/dispatch-2.key`), found by its public key.
//!
//! ```text
//! DATA/trust-1.anchors     version 1, recorded at the first start
//! DATA/trust-2.rotation    version 2, signed by the admins of version 1
//! DATA/trust-3.rotation    version 3, signed by the admins of version 2
//! DATA/dispatch-2.key      a rotated dispatch key named by a rotation
//! ```

use std::path::{Path, PathBuf};

use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::rotation::{self, Rotated};
use tenet_protocol::{KeyPair, PublicKey, Signer};

/// The trust in force, as the gateway and the loop share it: the anchors
/// enrolment pins, the rotations every session gets first, and the key
/// envelopes and certificates are signed with. The loop replaces it whole,
/// under the write lock, when a rotation is installed; a session sends the
/// rotations and registers under the read lock, so no envelope signed by
/// a rotated key reaches a session before the rotation does.
pub struct InForce {
    pub anchors: TrustAnchors,
    pub rotations: std::sync::Arc<Vec<Vec<u8>>>,
    pub dispatch_key: std::sync::Arc<KeyPair>,
}

/// The trust in force, shared.
pub type SharedTrust = std::sync::Arc<std::sync::RwLock<InForce>>;

/// Shared trust of `anchors` signed with `dispatch_key`, never rotated.
pub fn shared(anchors: TrustAnchors, dispatch_key: std::sync::Arc<KeyPair>) -> SharedTrust {
    std::sync::Arc::new(std::sync::RwLock::new(InForce {
        anchors,
        rotations: Default::default(),
        dispatch_key,
    }))
}

/// Where the rotation to `version` is kept.
pub fn rotation_path(data: &Path, version: u64) -> PathBuf {
    data.join(format!("trust-{version}.rotation"))
}

/// The anchors in force and the rotations that lead to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustChain {
    pub anchors: TrustAnchors,
    /// The rotation frames, versions 2 to `anchors.version`, in order.
    pub rotations: Vec<Vec<u8>>,
}

/// Version 1: the admin keys the operator is started with and its first
/// dispatch key (which also issues certificates).
pub fn first_anchors(
    admin_keys: Vec<PublicKey>,
    admin_threshold: u8,
    dispatch_key: PublicKey,
) -> Result<TrustAnchors, String> {
    if admin_keys.is_empty()
        || admin_threshold == 0
        || usize::from(admin_threshold) > admin_keys.len()
    {
        return Err(format!(
            "need at least {} admin key(s) (--admin-key) for a threshold of {}",
            admin_threshold.max(1),
            admin_threshold
        ));
    }
    let anchors = TrustAnchors {
        version: 1,
        admin_keys,
        admin_threshold,
        issuer_key: dispatch_key.clone(),
        dispatch_key,
    };
    rotation::check_anchors(&anchors).map_err(|e| format!("the admin keys: {e}"))?;
    Ok(anchors)
}

/// Where version 1 is recorded once the operator first starts.
pub fn first_path(data: &Path) -> PathBuf {
    data.join("trust-1.anchors")
}

/// The version 1 recorded in `data`, if any.
pub fn recorded_first(data: &Path) -> Result<Option<TrustAnchors>, String> {
    let path = first_path(data);
    match std::fs::read(&path) {
        Ok(bytes) => tenet_protocol::wire::decode(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Hold the operator's flags to version 1: the first start records it in
/// `data` (when `data` cannot be written, a read-only Secret, it is not
/// recorded); later starts must give the same, since agents pinned it and
/// admin keys change only by rotation.
pub fn check_first(data: &Path, given: &TrustAnchors) -> Result<(), String> {
    match recorded_first(data)? {
        Some(recorded) if recorded == *given => Ok(()),
        Some(recorded) => Err(not_first(data, &recorded)),
        None => {
            let path = first_path(data);
            if let Err(e) = tenet_protocol::host::write_atomically(
                &path,
                &tenet_protocol::wire::encode(given),
                0o644,
            ) {
                tracing::warn!(path = %path.display(), error = %e, "cannot record version 1 of the trust anchors");
            }
            Ok(())
        }
    }
}

/// Why admin keys given are refused: they are not the recorded version 1.
pub fn not_first(data: &Path, recorded: &TrustAnchors) -> String {
    format!(
        "the admin keys given (--admin-key, --admin-threshold) and DATA/dispatch.key are not version 1 of the trust anchors recorded in {} ({} of {} admin key(s): {}); agents pinned those: change admin keys by rotation (tenet trust rotate), not by the operator's flags",
        first_path(data).display(),
        recorded.admin_threshold,
        recorded.admin_keys.len(),
        recorded
            .admin_keys
            .iter()
            .map(|k| k.fingerprint().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Walk the rotations kept in `data` from `first`. Each must verify
/// against the one before; a gap in the versions, or a file that does not
/// verify, is an error naming the file (nothing is enforced past it: the
/// operator does not start, rather than hand out anchors the agents would
/// refuse).
pub fn load_chain(data: &Path, first: TrustAnchors) -> Result<TrustChain, String> {
    let mut versions = rotation_versions(data)?;
    versions.sort_unstable();
    let mut chain = TrustChain {
        anchors: first,
        rotations: Vec::new(),
    };
    for version in versions {
        let path = rotation_path(data, version);
        if version != chain.anchors.version + 1 {
            return Err(format!(
                "{}: there is no {} before it (rotations go one version at a time)",
                path.display(),
                rotation_path(data, chain.anchors.version + 1).display()
            ));
        }
        let frame = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let Rotated { anchors, .. } = rotation::verify_rotation(&frame, &chain.anchors)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        check_one_key(&anchors).map_err(|e| format!("{}: {e}", path.display()))?;
        chain.anchors = anchors;
        chain.rotations.push(frame);
    }
    Ok(chain)
}

/// This operator signs envelopes and certificates with one key: a rotation
/// must name the same key for both.
pub fn check_one_key(anchors: &TrustAnchors) -> Result<(), String> {
    if anchors.issuer_key != anchors.dispatch_key {
        return Err(format!(
            "version {} names issuer key {} and dispatch key {}; this operator signs envelopes and certificates with one key, so a rotation must name the same key for both",
            anchors.version,
            anchors.issuer_key.fingerprint(),
            anchors.dispatch_key.fingerprint()
        ));
    }
    Ok(())
}

/// The versions of the rotation files in `data` (`trust-N.rotation`).
fn rotation_versions(data: &Path) -> Result<Vec<u64>, String> {
    let entries = match std::fs::read_dir(data) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", data.display())),
    };
    let mut versions = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", data.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(number) = name
            .strip_prefix("trust-")
            .and_then(|n| n.strip_suffix(".rotation"))
        else {
            continue;
        };
        match number.parse::<u64>() {
            Ok(v) if v >= 2 && rotation_path(data, v) == entry.path() => versions.push(v),
            _ => {
                return Err(format!(
                    "{}: not a rotation file name (trust-N.rotation, N from 2, no leading zeros)",
                    entry.path().display()
                ));
            }
        }
    }
    Ok(versions)
}

/// The private key in `data` whose public key is the dispatch key in
/// force: `dispatch.key`, or a `dispatch*.key` a rotation named. Keys are
/// told apart by their public halves (`KEY.pub`) where those are there.
pub fn dispatch_key_in_force(data: &Path, anchors: &TrustAnchors) -> Result<KeyPair, String> {
    for path in dispatch_key_files(data)? {
        let public = tenet_protocol::keys::public_key_path(&path);
        if let Ok(p) = PublicKey::read_pem_file(&public)
            && p != anchors.dispatch_key
        {
            continue;
        }
        let key = KeyPair::read_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if key.public_key() == anchors.dispatch_key {
            return Ok(key);
        }
    }
    Err(missing_dispatch_key(data, anchors))
}

/// Whether `data` holds the dispatch key in force, by its public half
/// (`dispatch*.key.pub`), without reading a private key.
pub fn has_dispatch_key(data: &Path, anchors: &TrustAnchors) -> Result<(), String> {
    for path in dispatch_key_files(data)? {
        let public = tenet_protocol::keys::public_key_path(&path);
        if PublicKey::read_pem_file(&public).is_ok_and(|p| p == anchors.dispatch_key) {
            return Ok(());
        }
    }
    Err(missing_dispatch_key(data, anchors))
}

/// The `dispatch*.key` files in `data`, in name order.
fn dispatch_key_files(data: &Path) -> Result<Vec<PathBuf>, String> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(data)
        .map_err(|e| format!("{}: {e}", data.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("dispatch") && n.ends_with(".key"))
        })
        .collect();
    candidates.sort();
    Ok(candidates)
}

fn missing_dispatch_key(data: &Path, anchors: &TrustAnchors) -> String {
    format!(
        "trust version {} names dispatch key {}, and no dispatch*.key in {} holds it (make it with `tenet keygen --out {}` before the rotation names it)",
        anchors.version,
        anchors.dispatch_key.fingerprint(),
        data.display(),
        data.join(format!("dispatch-{}.key", anchors.version))
            .display()
    )
}

#[cfg(test)]
mod tests;

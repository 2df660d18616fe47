//! The standalone operator's data directory: its keys, the agent CA, the
//! database, the token inbox and the status file. Created on first start
//! (mode 0700); Kubernetes mode keeps only the keys and the CA here (a
//! read-only Secret shared by the replicas).
//!
//! ```text
//! DATA/dispatch.key(.pub)  the operator's dispatch key (signs envelopes)
//! DATA/dispatch-N.key      a dispatch key a trust rotation named
//! DATA/trust-N.rotation    the trust rotations, versions 2.. (`trust.rs`)
//! DATA/ca.pem, ca.key      the CA of the agent links
//! DATA/tenet.redb          terminals, tokens, sequences, dispatches, states
//! DATA/tokens/*.token      bootstrap tokens waiting to be imported
//! DATA/status.json         the fleet as the operator last saw it
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tenet_protocol::{Algorithm, KeyPair, Signer};

use crate::daemon::{DaemonError, io};
use crate::pki::Ca;
use crate::store::Store;

/// The data directory, opened (and created on first start).
pub struct DataDir {
    pub dispatch_key: Arc<KeyPair>,
    pub ca: Arc<Ca>,
    pub store: Arc<Store>,
}

/// Where `tenet token create` leaves tokens for the operator to import.
pub fn tokens_dir(data: &Path) -> PathBuf {
    data.join("tokens")
}

/// Where the operator writes the fleet's status for `tenet status`.
pub fn status_file(data: &Path) -> PathBuf {
    data.join("status.json")
}

/// Open the standalone operator's data directory: keys, CA, token inbox
/// and database, each created when missing.
pub fn open_data(dir: &Path, out: &mut dyn Write) -> Result<DataDir, DaemonError> {
    let (dispatch_key, ca) = open_keys(dir, out)?;
    let tokens = tokens_dir(dir);
    create_private_dir(&tokens)?;
    let store = Arc::new(Store::open(&dir.join("tenet.redb"))?);
    Ok(DataDir {
        dispatch_key,
        ca,
        store,
    })
}

/// The dispatch key and the agent CA in `dir`, created when missing.
pub fn open_keys(dir: &Path, out: &mut dyn Write) -> Result<(Arc<KeyPair>, Arc<Ca>), DaemonError> {
    let key_path = dir.join("dispatch.key");
    let fresh = !key_path.exists();
    if !dir.is_dir() {
        create_private_dir(dir)?;
    }
    if fresh {
        KeyPair::generate(Algorithm::Ed25519)?.write_files(&key_path)?;
    }
    let dispatch_key = Arc::new(KeyPair::read_file(&key_path)?);
    let ca = Arc::new(Ca::load_or_create(dir)?);
    if fresh {
        let _ = writeln!(
            out,
            "created {}: dispatch key {}, agent CA {}",
            dir.display(),
            dispatch_key.public_key().fingerprint(),
            ca.fingerprint()
        );
    }
    Ok((dispatch_key, ca))
}

fn create_private_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

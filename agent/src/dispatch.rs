//! The agent's side of a dispatch: check the envelope, record it as used
//! before anything runs (so a replay is refused even while the first run
//! goes on), start a separate loader process (killing one still running
//! for the same policy), hand it the dispatch, and queue the signed report
//! it returns.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use tenet_protocol::envelope::EnvelopeState;
use tenet_protocol::report::{ExecutionReport, Outcome};
use tenet_protocol::wire::{decode, encode, sha256};
use tenet_protocol::{Kind, Rejection, SignedMessage, Signer};

use crate::store::{Store, StoreError};

/// What the agent hands its loader on stdin.
#[derive(Serialize, Deserialize)]
pub struct LoadRequest {
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub bundle: Vec<u8>,
    /// The envelope state before this envelope: the loader verifies
    /// against it again.
    pub state: EnvelopeState,
}

/// What the loader prints on stdout.
#[derive(Serialize, Deserialize)]
pub struct LoadResponse {
    #[serde(with = "serde_bytes")]
    pub report: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the loader {exe}: {source}")]
    Spawn {
        exe: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the loader failed: {0}")]
    Loader(String),
    #[error("cannot sign: {0}")]
    Sign(#[from] tenet_protocol::keys::KeyError),
}

/// A finished dispatch: the signed report (already queued in the outbox).
pub struct Dispatched {
    pub report: Vec<u8>,
    pub outcome: Outcome,
    pub queued: PathBuf,
}

/// Runs loaders, one process per dispatch.
pub struct Dispatcher {
    /// The `tenet-agent` binary (the loader is its `load` subcommand).
    pub exe: PathBuf,
    /// The agent's configuration file, passed to the loader.
    pub config: PathBuf,
    pub terminal: String,
}

impl Dispatcher {
    pub fn new(exe: PathBuf, config: PathBuf, terminal: String) -> Dispatcher {
        Dispatcher {
            exe,
            config,
            terminal,
        }
    }

    /// Verify and run one dispatch to its end.
    pub fn dispatch(
        &self,
        store: &Store,
        identity: &dyn Signer,
        envelope: &[u8],
        bundle: &[u8],
        now_ms: u64,
    ) -> Result<Dispatched, DispatchError> {
        let trust = store.trust()?;
        let before = store.envelope_state(&self.terminal)?;
        let verified = match before.verify(envelope, &trust.dispatch_key, now_ms) {
            Ok(v) => v,
            Err(r) => return self.refuse(store, identity, envelope, &r, now_ms),
        };
        // Used from now on, whatever happens next.
        let mut after = before.clone();
        after.accept(&verified);
        store.save_envelope_state(&after)?;

        let request = LoadRequest {
            envelope: envelope.to_vec(),
            bundle: bundle.to_vec(),
            state: before,
        };
        let mut child = Command::new(&self.exe)
            .arg("load")
            .arg("--config")
            .arg(&self.config)
            .arg("--run-id")
            .arg(verified.envelope.sequence.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| DispatchError::Spawn {
                exe: self.exe.display().to_string(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&encode(&request)).map_err(|e| {
                DispatchError::Loader(format!("cannot hand over the dispatch: {e}"))
            })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| DispatchError::Loader(e.to_string()))?;
        if !out.status.success() {
            return Err(DispatchError::Loader(format!("exited with {}", out.status)));
        }
        let response: LoadResponse = decode(&out.stdout)
            .map_err(|e| DispatchError::Loader(format!("unreadable answer: {e}")))?;
        let frame = SignedMessage::decode(&response.report, Kind::ExecutionReport)
            .map_err(|e| DispatchError::Loader(format!("unreadable report: {e}")))?;
        let report: ExecutionReport = frame
            .open()
            .map_err(|e| DispatchError::Loader(format!("unreadable report: {e}")))?;
        let queued = store.push_report(verified.envelope.sequence, &response.report)?;
        Ok(Dispatched {
            report: response.report,
            outcome: report.outcome,
            queued,
        })
    }

    /// A refused envelope never reaches a loader: the agent signs the
    /// refusal itself. The report names the envelope only by digest.
    fn refuse(
        &self,
        store: &Store,
        identity: &dyn Signer,
        envelope: &[u8],
        r: &Rejection,
        now_ms: u64,
    ) -> Result<Dispatched, DispatchError> {
        let digest = SignedMessage::decode(envelope, Kind::DispatchEnvelope)
            .map(|f| f.body_digest())
            .unwrap_or_else(|_| sha256(envelope));
        let outcome = Outcome::Refused {
            reason: r.reason().to_string(),
            message: r.to_string(),
        };
        let report = ExecutionReport {
            terminal: self.terminal.clone(),
            envelope_digest: digest,
            nonce: [0; 32],
            payload_digest: [0; 32],
            outcome: outcome.clone(),
            output_tail: Vec::new(),
            observed: None,
            started_at_ms: now_ms,
            finished_at_ms: now_ms,
        };
        let bytes = SignedMessage::signed(&report, identity)?.encode();
        // Refusals queue after everything else, keyed by time.
        let queued = store.push_report(u64::MAX / 2 + now_ms, &bytes)?;
        Ok(Dispatched {
            report: bytes,
            outcome,
            queued,
        })
    }
}

pub fn exe_path() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| Path::new("tenet-agent").to_path_buf())
}

//! The agent's side of a dispatch: check the envelope, record it as used
//! before anything runs (so a replay is refused even while the first run
//! goes on), start a separate loader process, hand it the dispatch, and
//! queue the signed report it returns. A refused envelope never reaches a
//! loader: the agent signs the refusal itself.
//!
//! [`prepare`] and [`finish`] are the synchronous halves; the loader runs
//! in between, waited for by [`run_loader`], which a newer dispatch for the
//! same policy can stop ([`crate::session::Runs`]). The loader's own side,
//! the `tenet-agent load` process, is [`crate::load`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use tenet_protocol::envelope::EnvelopeState;
use tenet_protocol::report::{ExecutionReport, Outcome};
use tenet_protocol::wire::{decode, encode};
use tenet_protocol::{Kind, Rejection, SignedMessage, Signer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::store::{LocalState, StoreError};

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
    LocalState(#[from] StoreError),
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
    #[error("dispatch {sequence} of {policy} was superseded by a newer one")]
    Superseded { sequence: u64, policy: String },
}

/// A finished dispatch: the signed report (already queued in the outbox,
/// or held back when the run replaced the agent's own binary).
pub struct Dispatched {
    pub report: Vec<u8>,
    pub outcome: Outcome,
    pub queued: PathBuf,
    /// Held back (`DATA/handover/`) for the self-update to release or
    /// rewrite ([`crate::self_update`]).
    pub held: bool,
}

/// A verified envelope, recorded as used, ready for a loader.
pub struct Prepared {
    pub policy: String,
    pub sequence: u64,
    /// The encoded [`LoadRequest`] for the loader's stdin.
    pub request: Vec<u8>,
}

/// Verify `envelope` against the pinned keys (the dispatch key's signature,
/// the admins' approval) and the remembered state; record it as used. A refusal comes back signed and queued.
pub fn prepare(
    store: &LocalState,
    identity: &dyn Signer,
    terminal: &str,
    envelope: &[u8],
    bundle: &[u8],
    now_ms: u64,
) -> Result<Result<Prepared, Dispatched>, DispatchError> {
    let trust = store.trust()?;
    let before = store.envelope_state(terminal)?;
    let verified = match before.verify_approved(envelope, &trust, now_ms) {
        Ok(v) => v,
        Err(r) => return refuse(store, identity, terminal, envelope, &r, now_ms).map(Err),
    };
    let mut after = before.clone();
    after.accept(&verified);
    store.save_envelope_state(&after)?;
    Ok(Ok(Prepared {
        policy: verified.envelope.policy.clone(),
        sequence: verified.envelope.sequence,
        request: encode(&LoadRequest {
            envelope: envelope.to_vec(),
            bundle: bundle.to_vec(),
            state: before,
        }),
    }))
}

/// Read the loader's answer and queue its report, or hold it back when
/// `hold` (the run replaced the agent's binary).
pub fn finish(
    store: &LocalState,
    sequence: u64,
    stdout: &[u8],
    hold: bool,
) -> Result<Dispatched, DispatchError> {
    let response: LoadResponse =
        decode(stdout).map_err(|e| DispatchError::Loader(format!("unreadable answer: {e}")))?;
    let frame = SignedMessage::decode(&response.report, Kind::ExecutionReport)
        .map_err(|e| DispatchError::Loader(format!("unreadable report: {e}")))?;
    let report: ExecutionReport = frame
        .open()
        .map_err(|e| DispatchError::Loader(format!("unreadable report: {e}")))?;
    let queued = if hold {
        store.hold_report(sequence, &response.report)?
    } else {
        store.push_report(sequence, &response.report)?
    };
    Ok(Dispatched {
        report: response.report,
        outcome: report.outcome,
        queued,
        held: hold,
    })
}

fn refuse(
    store: &LocalState,
    identity: &dyn Signer,
    terminal: &str,
    envelope: &[u8],
    r: &Rejection,
    now_ms: u64,
) -> Result<Dispatched, DispatchError> {
    let report = crate::exec::refusal(terminal, envelope, r, now_ms);
    let outcome = report.outcome.clone();
    let bytes = SignedMessage::signed(&report, identity)?.encode();
    // Refusals queue after everything else, keyed by time.
    let queued = store.push_report(u64::MAX / 2 + now_ms, &bytes)?;
    Ok(Dispatched {
        report: bytes,
        outcome,
        queued,
        held: false,
    })
}

/// The loader command for one run.
pub fn loader_command(exe: &Path, config: &Path, sequence: u64) -> Command {
    let mut c = Command::new(exe);
    c.arg("load")
        .arg("--config")
        .arg(config)
        .arg("--run-id")
        .arg(sequence.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

/// Run a loader for `prepared` to its end and queue its report; stop it
/// when `stop` fires (a newer dispatch for the same policy). A dropped
/// sender does not stop it. When the run replaced `agent`, the binary the
/// agent runs, the report is held back for the self-update.
pub async fn run_loader(
    exe: &Path,
    config: &Path,
    store: &LocalState,
    prepared: Prepared,
    mut stop: oneshot::Receiver<()>,
    agent: Option<&crate::self_update::Exe>,
) -> Result<Dispatched, DispatchError> {
    let mut child = tokio::process::Command::from(loader_command(exe, config, prepared.sequence))
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DispatchError::Spawn {
            exe: exe.display().to_string(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&prepared.request)
            .await
            .map_err(|e| DispatchError::Loader(format!("cannot hand over the dispatch: {e}")))?;
    }
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| DispatchError::Loader("no stdout".into()))?;
    let read = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    });
    let ended = tokio::select! {
        status = child.wait() => Some(status),
        // Asked to stop: unless it has just ended (its signed report is
        // then kept, the payload ran), it is killed.
        Ok(()) = &mut stop => child.try_wait().transpose(),
    };
    let Some(status) = ended else {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(DispatchError::Superseded {
            sequence: prepared.sequence,
            policy: prepared.policy,
        });
    };
    let status = status.map_err(|e| DispatchError::Loader(e.to_string()))?;
    let out = read
        .await
        .map_err(|e| DispatchError::Loader(e.to_string()))?;
    if !status.success() {
        return Err(DispatchError::Loader(format!("exited with {status}")));
    }
    let replaced = agent.is_some_and(crate::self_update::Exe::replaced);
    finish(store, prepared.sequence, &out, replaced)
}

/// Verify one dispatch and run it through a loader to its end (the
/// `tenet-agent dispatch` command, and the benchmark).
#[allow(clippy::too_many_arguments)]
pub async fn dispatch(
    exe: &Path,
    config: &Path,
    store: &LocalState,
    identity: &dyn Signer,
    terminal: &str,
    envelope: &[u8],
    bundle: &[u8],
    now_ms: u64,
) -> Result<Dispatched, DispatchError> {
    match prepare(store, identity, terminal, envelope, bundle, now_ms)? {
        Ok(prepared) => {
            // Nothing supersedes a run from the command line.
            let (_never, stop) = oneshot::channel();
            run_loader(exe, config, store, prepared, stop, None).await
        }
        Err(refused) => Ok(refused),
    }
}

pub fn exe_path() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| Path::new("tenet-agent").to_path_buf())
}

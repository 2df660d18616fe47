//! The loader process, `tenet-agent load`: started by the agent once per
//! dispatch ([`crate::dispatch::run_loader`]), it reads a
//! [`LoadRequest`] on stdin, verifies everything again against the
//! envelope state it was handed (signatures, freshness, target, the
//! admins' signatures on the bundle, the capabilities), runs the payload
//! in wasmtime, and prints the signed report as a [`LoadResponse`].

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tenet_protocol::host::now_ms;
use tenet_protocol::wire::{decode, encode};

use crate::config::AgentConfig;
use crate::dispatch::{LoadRequest, LoadResponse};
use crate::exec::{Limits, Loader, Os, Runtime};
use crate::store::LocalState;

/// Serve one load request from stdin; `run_id` names the private working
/// directory of the run.
pub fn serve(config: &Path, run_id: u64) -> anyhow::Result<()> {
    let c = AgentConfig::read(config)?;
    let store = LocalState::open(&c.data)?;
    let identity = c.identity(&store)?;
    let trust = store.trust()?;
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("cannot read the load request")?;
    let request: LoadRequest =
        decode(&input).map_err(|e| anyhow::anyhow!("bad load request: {e}"))?;
    let work_dir = store.run_dir(run_id)?;
    let os = Arc::new(Os {
        root: c.root.clone(),
        work_dir: work_dir.clone(),
        inventory: c.inventory_source(),
        artifacts_written: Default::default(),
    });
    let runtime = Runtime::new().map_err(std::io::Error::other)?;
    let loader = Loader {
        terminal: &c.terminal,
        trust: &trust,
        identity: identity.as_ref(),
        system: os,
        runtime: &runtime,
        limits: Limits::default(),
        now_ms,
    };
    let result = loader.run(&request.envelope, &request.bundle, &request.state)?;
    let _ = std::fs::remove_dir_all(&work_dir);
    std::io::stdout().write_all(&encode(&LoadResponse {
        report: result.report,
    }))?;
    Ok(())
}

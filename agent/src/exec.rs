//! The loader: the first paper's separate loader process. It verifies a
//! dispatch completely (the operator's signature, this terminal, freshness,
//! sequence, the admins' signatures on the bundle, its digest, the
//! capabilities), runs the WASM module from memory (never from disk) in
//! wasmtime with a time limit, a memory limit and only the granted host
//! functions, and signs a report that carries the dispatch's nonce back.
//!
//! # Host API for payload authors
//!
//! A payload is a WASM module exporting `memory` and `run: () -> i32` (its
//! exit code, 0 for success). It may import these functions from module
//! `tenet`; importing one whose capability the envelope does not grant gets
//! the dispatch refused before anything runs.
//!
//! | import | signature | capability | what it does |
//! |---|---|---|---|
//! | `arg_count` | `() -> i32` | none | number of envelope arguments |
//! | `arg` | `(index, buf, buf_len) -> i32` | none | copies argument `index` into `buf`; returns its length (nothing copied when longer than `buf_len`), -1 when there is no such argument |
//! | `log` | `(ptr, len)` | `log` | appends a line to the output the report carries |
//! | `run_artifact` | `(name, name_len, args, args_len) -> i32` | `run-artifact` | writes the bundle's artifacts to a private 0700 directory, re-checks the named one's digest, runs it with the NUL-separated `args`, its working directory that directory, in a process group of its own (killed whole at the deadline) and a clean environment (`PATH`, `LANG`, and `TENET_ROOT`, the terminal's root); returns its exit code |
//! | `read_inventory` | `(buf, buf_len) -> i32` | `read-inventory` | the terminal's inventory as JSON; returns its length (nothing copied when longer than `buf_len`) |
//! | `write_file` | `(path, path_len, data, data_len) -> i32` | `write-files` | writes a file under one of the envelope's write paths (inside the terminal root); 0 on success |
//!
//! Negative results: -1 bad argument (out-of-bounds memory, not UTF-8, no
//! such argument), -2 no such artifact, -3 artifact digest mismatch (nothing
//! run), -4 could not start, -5 killed (time limit or signal), -6 path not
//! granted (also: a symbolic link on the way), -7 I/O error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tenet_protocol::bundle::{Artifact, BundleTrust, Capability, verify_bundle};
use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::envelope::{EnvelopeState, VerifiedEnvelope, check_bundle_against_envelope};
use tenet_protocol::inventory::Inventory;
use tenet_protocol::report::{ExecutionReport, MAX_OUTPUT_TAIL, Outcome};
use tenet_protocol::wire::sha256;
use tenet_protocol::{Kind, Rejection, SignedMessage, Signer};
use wasmtime::{
    Caller, Config, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder, Trap,
};

/// Bounds on one payload run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Linear memory a module may grow to.
    pub memory_bytes: usize,
    /// Wall-clock time a run may take (the envelope's deadline may cut it shorter).
    pub max_run: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 * 1024 * 1024,
            max_run: Duration::from_secs(300),
        }
    }
}

/// What a payload's host calls act on: the terminal's real system
/// ([`Os`]), or a simulated one (`tenet-agent simulate`).
pub trait System: Send + Sync {
    /// The terminal's inventory (`read_inventory`, and the report's
    /// observed state after the run).
    fn inventory(&self) -> Result<Inventory, String>;
    /// Run the bundle's artifact `name` (already checked to exist; its
    /// digest is `artifact.sha256`) with `args`, until it ends or `deadline`.
    /// The exit code (or a negative host error) and the output.
    fn run_artifact(
        &self,
        artifacts: &[Artifact],
        artifact: &Artifact,
        args: &[&str],
        deadline: Instant,
    ) -> (i32, Vec<u8>);
    /// Write a file at `path` (already checked against the granted write
    /// paths); 0 or a negative host error.
    fn write_file(&self, path: &str, data: &[u8]) -> i32;
}

/// A wasmtime engine with its epoch ticker, and the modules it compiled
/// (by bundle digest). The loader process makes one per run; a simulation
/// of many terminals shares one.
pub struct Runtime {
    engine: Engine,
    modules: std::sync::Mutex<std::collections::HashMap<[u8; 32], Module>>,
    stop: Arc<AtomicBool>,
}

impl Runtime {
    pub fn new() -> Result<Runtime, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| format!("wasm engine: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| format!("epoch thread: {e}"))?;
        }
        Ok(Runtime {
            engine,
            modules: Default::default(),
            stop,
        })
    }

    /// The compiled module of a verified bundle.
    fn module(&self, bundle_digest: [u8; 32], wasm: &[u8]) -> Result<Module, Rejection> {
        if let Some(m) = self
            .modules
            .lock()
            .ok()
            .and_then(|m| m.get(&bundle_digest).cloned())
        {
            return Ok(m);
        }
        let module = Module::new(&self.engine, wasm)
            .map_err(|e| Rejection::Malformed(format!("the module does not compile: {e:#}")))?;
        if let Ok(mut m) = self.modules.lock() {
            m.insert(bundle_digest, module.clone());
        }
        Ok(module)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Everything a loader needs besides the dispatch itself.
pub struct Loader<'a> {
    pub terminal: &'a str,
    pub trust: &'a TrustAnchors,
    pub identity: &'a dyn Signer,
    pub system: Arc<dyn System>,
    pub runtime: &'a Runtime,
    pub limits: Limits,
    pub now_ms: fn() -> u64,
}

/// The result of a dispatch: the signed report, and the envelope to record
/// as used when it verified (even if the payload then failed).
pub struct LoadResult {
    pub report: Vec<u8>,
    pub outcome: Outcome,
    pub accepted: Option<VerifiedEnvelope>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot sign the report: {0}")]
    Sign(#[from] tenet_protocol::keys::KeyError),
}

const TICK: Duration = Duration::from_millis(10);

impl Loader<'_> {
    /// Verify and run one dispatch. Every refusal is a signed report too.
    pub fn run(
        &self,
        envelope: &[u8],
        bundle: &[u8],
        state: &EnvelopeState,
    ) -> Result<LoadResult, LoaderError> {
        let started = (self.now_ms)();
        let verified = match state.verify_approved(envelope, self.trust, started) {
            Ok(v) => v,
            Err(r) => {
                let report = refusal(self.terminal, envelope, &r, started);
                return self.finish(report, None);
            }
        };
        self.run_verified(verified, bundle)
    }

    /// Run a dispatch whose envelope (signature, approval, freshness) this
    /// very process verified already: the simulator's, which verifies it
    /// on arrival. A real loader is its own process and verifies again
    /// ([`Loader::run`]).
    pub fn run_verified(
        &self,
        verified: VerifiedEnvelope,
        bundle: &[u8],
    ) -> Result<LoadResult, LoaderError> {
        let started = (self.now_ms)();
        let (outcome, output) = match self.verify_and_execute(&verified, bundle, started) {
            Ok(done) => done,
            Err(r) => (refused(&r), Vec::new()),
        };
        let env = &verified.envelope;
        let report = ExecutionReport {
            terminal: self.terminal.to_string(),
            envelope_digest: verified.digest,
            nonce: env.nonce,
            payload_digest: env.payload_digest,
            outcome,
            output_tail: output,
            observed: self.system.inventory().ok(),
            started_at_ms: started,
            finished_at_ms: (self.now_ms)(),
        };
        self.finish(report, Some(verified))
    }

    fn finish(
        &self,
        report: ExecutionReport,
        accepted: Option<VerifiedEnvelope>,
    ) -> Result<LoadResult, LoaderError> {
        let outcome = report.outcome.clone();
        let bytes = SignedMessage::signed(&report, self.identity)?.encode();
        Ok(LoadResult {
            report: bytes,
            outcome,
            accepted,
        })
    }

    fn verify_and_execute(
        &self,
        verified: &VerifiedEnvelope,
        bundle: &[u8],
        started_ms: u64,
    ) -> Result<(Outcome, Vec<u8>), Rejection> {
        let env = &verified.envelope;
        let trust = BundleTrust {
            admin_keys: self.trust.admin_keys.clone(),
            threshold: usize::from(self.trust.admin_threshold),
        };
        let vb = verify_bundle(bundle, &trust, Some(&env.payload_digest), started_ms)?;
        check_bundle_against_envelope(&vb.digest, &vb.bundle, env)?;

        let engine = &self.runtime.engine;
        let module = self.runtime.module(vb.digest, &vb.bundle.module)?;
        for import in module.imports() {
            check_import(
                import.module(),
                import.name(),
                &vb.bundle.manifest.capabilities,
                &env.capabilities,
            )?;
        }

        let budget_ms = env.deadline_ms.saturating_sub(started_ms);
        let budget = self.limits.max_run.min(Duration::from_millis(budget_ms));
        let host = Host {
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.memory_bytes)
                .instances(1)
                .tables(4)
                .table_elements(MAX_TABLE_ELEMENTS)
                .memories(1)
                .trap_on_grow_failure(true)
                .build(),
            args: env.args.clone(),
            write_paths: env.write_paths.clone(),
            artifacts: vb.bundle.artifacts,
            output: Vec::new(),
            system: self.system.clone(),
            deadline: Instant::now() + budget,
        };
        let mut store = Store::new(engine, host);
        store.limiter(|h| &mut h.limits);
        store.set_epoch_deadline((budget.as_millis() / TICK.as_millis()).max(1) as u64);
        store.epoch_deadline_trap();

        let linker =
            linker(engine).map_err(|e| Rejection::Malformed(format!("host functions: {e}")))?;
        let outcome = match linker
            .instantiate(&mut store, &module)
            .and_then(|i| i.get_typed_func::<(), i32>(&mut store, "run"))
        {
            Err(e) => Outcome::Trapped {
                message: truncate(&format!("cannot start the payload: {e:#}")),
            },
            Ok(run) => match run.call(&mut store, ()) {
                Ok(code) => Outcome::Exited { code },
                Err(e) if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) => {
                    Outcome::TimedOut
                }
                Err(e) => Outcome::Trapped {
                    message: truncate(&format!("{e:#}")),
                },
            },
        };
        Ok((outcome, std::mem::take(&mut store.data_mut().output)))
    }
}

/// The report of a refused envelope. It names the envelope by its digest
/// only: nothing in an unverified envelope is trusted.
pub fn refusal(terminal: &str, envelope: &[u8], r: &Rejection, now_ms: u64) -> ExecutionReport {
    let digest = SignedMessage::decode(envelope, Kind::DispatchEnvelope)
        .map(|f| f.body_digest())
        .unwrap_or_else(|_| sha256(envelope));
    ExecutionReport {
        terminal: terminal.to_string(),
        envelope_digest: digest,
        nonce: [0; 32],
        payload_digest: [0; 32],
        outcome: refused(r),
        output_tail: Vec::new(),
        observed: None,
        started_at_ms: now_ms,
        finished_at_ms: now_ms,
    }
}

fn refused(r: &Rejection) -> Outcome {
    Outcome::Refused {
        reason: r.reason().to_string(),
        message: truncate(&r.to_string()),
    }
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(4000);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Entries a wasm table may hold (tables are not linear memory, so the
/// memory limit does not bound them: a table of 100 million entries took
/// 816 MB). C programs built with clang use a few thousand at most.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Whether the module may import `module.name`: a host function whose
/// capability both the admins declared in the signed manifest and the
/// envelope grants (the operator alone cannot widen what a payload does).
pub fn check_import(
    module: &str,
    name: &str,
    declared: &[Capability],
    granted: &[Capability],
) -> Result<(), Rejection> {
    let capability = import_capability(module, name)
        .ok_or_else(|| Rejection::Malformed(format!("unknown import {module}.{name}")))?;
    let Some(c) = capability else {
        return Ok(());
    };
    if !granted.contains(&c) {
        return Err(Rejection::CapabilityNotGranted(c.name().into()));
    }
    if !declared.contains(&c) {
        return Err(Rejection::Malformed(format!(
            "the module imports {module}.{name}, but its signed manifest does not declare capability {}",
            c.name()
        )));
    }
    Ok(())
}

/// The capability an import needs: `Some(None)` for none, `None` for an
/// unknown import.
fn import_capability(module: &str, name: &str) -> Option<Option<Capability>> {
    if module != "tenet" {
        return None;
    }
    match name {
        "arg_count" | "arg" => Some(None),
        "log" => Some(Some(Capability::Log)),
        "run_artifact" => Some(Some(Capability::RunArtifact)),
        "read_inventory" => Some(Some(Capability::ReadInventory)),
        "write_file" => Some(Some(Capability::WriteFiles)),
        _ => None,
    }
}

struct Host {
    limits: StoreLimits,
    args: Vec<String>,
    write_paths: Vec<String>,
    artifacts: Vec<Artifact>,
    output: Vec<u8>,
    system: Arc<dyn System>,
    deadline: Instant,
}

impl Host {
    fn append_output(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
        if self.output.len() > MAX_OUTPUT_TAIL {
            let cut = self.output.len() - MAX_OUTPUT_TAIL;
            self.output.drain(..cut);
        }
    }
}

pub(crate) const E_ARG: i32 = -1;
pub(crate) const E_NO_ARTIFACT: i32 = -2;
pub(crate) const E_DIGEST: i32 = -3;
pub(crate) const E_LAUNCH: i32 = -4;
pub(crate) const E_KILLED: i32 = -5;
pub(crate) const E_PATH: i32 = -6;
pub(crate) const E_IO: i32 = -7;

/// The largest buffer a host call reads from guest memory.
const MAX_GUEST_READ: usize = 16 * 1024 * 1024;

fn read_guest(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = caller.get_export("memory")?.into_memory()?;
    let (ptr, len) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
    if len > MAX_GUEST_READ {
        return None;
    }
    let data = mem.data(&*caller);
    data.get(ptr..ptr.checked_add(len)?).map(<[u8]>::to_vec)
}

fn write_guest(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(mem) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return false;
    };
    usize::try_from(ptr).is_ok_and(|p| mem.write(&mut *caller, p, bytes).is_ok())
}

/// Copy `bytes` to the guest when it fits; the length either way.
fn give(caller: &mut Caller<'_, Host>, buf: i32, buf_len: i32, bytes: &[u8]) -> i32 {
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    if usize::try_from(buf_len).is_ok_and(|l| bytes.len() <= l) && !write_guest(caller, buf, bytes)
    {
        return E_ARG;
    }
    len
}

fn linker(engine: &Engine) -> wasmtime::Result<Linker<Host>> {
    let mut l: Linker<Host> = Linker::new(engine);
    l.func_wrap("tenet", "arg_count", |c: Caller<'_, Host>| {
        c.data().args.len() as i32
    })?;
    l.func_wrap(
        "tenet",
        "arg",
        |mut c: Caller<'_, Host>, index: i32, buf: i32, buf_len: i32| {
            let Some(arg) = usize::try_from(index)
                .ok()
                .and_then(|i| c.data().args.get(i).cloned())
            else {
                return E_ARG;
            };
            give(&mut c, buf, buf_len, arg.as_bytes())
        },
    )?;
    l.func_wrap(
        "tenet",
        "log",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| {
            if let Some(mut line) = read_guest(&mut c, ptr, len) {
                line.push(b'\n');
                c.data_mut().append_output(&line);
            }
        },
    )?;
    l.func_wrap(
        "tenet",
        "read_inventory",
        |mut c: Caller<'_, Host>, buf: i32, buf_len: i32| {
            let Ok(inv) = c.data().system.inventory() else {
                return E_IO;
            };
            let Ok(json) = serde_json::to_vec(&inv) else {
                return E_IO;
            };
            give(&mut c, buf, buf_len, &json)
        },
    )?;
    l.func_wrap(
        "tenet",
        "write_file",
        |mut c: Caller<'_, Host>, path: i32, path_len: i32, data: i32, data_len: i32| {
            let (Some(path), Some(data)) = (
                read_guest(&mut c, path, path_len),
                read_guest(&mut c, data, data_len),
            ) else {
                return E_ARG;
            };
            let Ok(path) = String::from_utf8(path) else {
                return E_ARG;
            };
            let host = c.data();
            if !path_granted(&path, &host.write_paths) {
                return E_PATH;
            }
            host.system.write_file(&path, &data)
        },
    )?;
    l.func_wrap(
        "tenet",
        "run_artifact",
        |mut c: Caller<'_, Host>, name: i32, name_len: i32, args: i32, args_len: i32| {
            let (Some(name), Some(args)) = (
                read_guest(&mut c, name, name_len),
                read_guest(&mut c, args, args_len),
            ) else {
                return E_ARG;
            };
            let (Ok(name), Ok(args)) = (String::from_utf8(name), String::from_utf8(args)) else {
                return E_ARG;
            };
            let args: Vec<&str> = args.split('\0').filter(|a| !a.is_empty()).collect();
            let host = c.data();
            let (code, output) = match host.artifacts.iter().find(|a| a.name == name) {
                None => (
                    E_NO_ARTIFACT,
                    format!("no artifact named {name:?} in the bundle\n").into_bytes(),
                ),
                Some(artifact) => {
                    host.system
                        .run_artifact(&host.artifacts, artifact, &args, host.deadline)
                }
            };
            c.data_mut().append_output(&output);
            code
        },
    )?;
    Ok(l)
}

/// Whether `path` is absolute, clean, and under one of `granted`.
pub fn path_granted(path: &str, granted: &[String]) -> bool {
    let clean = path.starts_with('/') && !path.split('/').any(|s| s == ".." || s == ".");
    clean
        && granted.iter().any(|g| {
            let g = g.trim_end_matches('/');
            path == g
                || path
                    .strip_prefix(g)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
}

mod os;
pub use os::Os;

#[cfg(test)]
mod tests;

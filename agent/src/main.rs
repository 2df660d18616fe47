//! `tenet-agent`: the terminal agent. `main` parses arguments and calls the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tenet_agent::config::AgentConfig;
use tenet_agent::dispatch::exe_path;
use tenet_agent::store::LocalState;
use tenet_protocol::PublicKey;
use tenet_protocol::enrol::TrustAnchors;

/// The Tenet terminal agent: reports what the terminal holds, and runs
/// signed remediation payloads in a sandbox, proving each run with a
/// signed report that carries the dispatch's evidence.
#[derive(Parser)]
#[command(name = "tenet-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print this terminal's inventory as YAML.
    Inventory {
        #[arg(long)]
        config: PathBuf,
    },
    /// Pin the keys this agent trusts, by hand (enrolment does this too).
    Pin {
        #[arg(long)]
        config: PathBuf,
        /// The operator's dispatch public key (PEM).
        #[arg(long)]
        dispatch_key: PathBuf,
        /// An admin public key that signs payload bundles (repeat).
        #[arg(long = "admin-key", required = true)]
        admin_keys: Vec<PathBuf>,
        /// How many admins must sign a bundle.
        #[arg(long, default_value_t = 1)]
        threshold: u8,
        /// The certificate issuer's public key (defaults to the dispatch key).
        #[arg(long)]
        issuer_key: Option<PathBuf>,
        /// The version of these trust anchors (`tenet trust show` on the
        /// operator): rotations after it are walked from there.
        #[arg(long, default_value_t = 1)]
        trust_version: u64,
    },
    /// Verify and run one dispatch from files, through a loader process, as
    /// if the operator had pushed it; queue and print the signed report.
    Dispatch {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        envelope: PathBuf,
        #[arg(long)]
        bundle: PathBuf,
        /// Also write the signed report here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Enrol with the operator: present a bootstrap token, pin the keys it
    /// answers with, and get an mTLS client certificate.
    Enrol {
        #[arg(long)]
        config: PathBuf,
        /// The one-time bootstrap token an admin issued for this terminal.
        #[arg(long, env = "TENET_BOOTSTRAP_TOKEN", hide_env_values = true)]
        token: String,
        /// The SHA-256 of the operator's CA certificate (sha256:...), given
        /// with the token; the gateway must present that CA.
        #[arg(long)]
        ca_fingerprint: String,
    },
    /// Run the agent: hold a connection to the operator, report the
    /// inventory, run what it dispatches, send the signed reports.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Connect to the operator, authenticate, and exit 0 once it says it
    /// serves this agent (printing its version); no session starts. An
    /// agent upgrading itself runs the new binary this way before it hands
    /// over to it. Tries again until the timeout.
    Probe {
        #[arg(long)]
        config: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// End a self-update a crash or a restart cut short: prove the new
    /// binary at --exe, or put this one back there. The agent's unit runs
    /// it before the agent starts, with the binary kept before the last
    /// self-update (DATA/agent-previous); nothing to do without one.
    ResumeHandover {
        #[arg(long)]
        config: PathBuf,
        /// The agent's binary (the one on probation).
        #[arg(long, default_value = "/usr/bin/tenet-agent")]
        exe: PathBuf,
    },
    /// Benchmark certificate presentation (the second paper's experiment):
    /// latency p50/p99 against concurrent peer connections, with the audit
    /// done beforehand (async) and on every request (sync; a TPM quote
    /// with `--tcti`). Prints a table, or JSON with `--output json`.
    BenchPresent {
        /// Concurrent peer connections, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
        connections: Vec<usize>,
        /// The TPM for the sync mode's quotes (e.g. swtpm:host=127.0.0.1,port=2321).
        #[arg(long)]
        tcti: Option<String>,
        /// Seconds of the steady load (each peer asks once a second); 0: none.
        #[arg(long, default_value_t = 3)]
        steady_seconds: u64,
        /// `text` or `json`.
        #[arg(long, default_value = "text")]
        output: String,
    },
    /// Simulate many terminals in this one process, for demos and
    /// benchmarks: each enrols with its own key and mTLS certificate, holds
    /// its own connection, reports its own inventory, and verifies and runs
    /// every dispatch like a real agent; only the machine under it is
    /// simulated (the payload runs in-process against an in-memory
    /// terminal: packages, services, files). Runs until stopped.
    Simulate {
        /// How many terminals.
        #[arg(long)]
        count: usize,
        /// The operator's gateway, host:port.
        #[arg(long)]
        operator: String,
        /// The name on the gateway's certificate (defaults to the host).
        #[arg(long)]
        server_name: Option<String>,
        /// A bootstrap token with at least COUNT uses
        /// (`tenet token create --uses COUNT`).
        #[arg(long, env = "TENET_BOOTSTRAP_TOKEN", hide_env_values = true)]
        token: String,
        /// The SHA-256 of the operator's CA certificate (sha256:...).
        #[arg(long)]
        ca_fingerprint: String,
        /// Inventory YAML files (or directories of them) the terminals
        /// start from, taken in turn (their labels are what the terminals
        /// claim; policies select on the labels the token assigned).
        #[arg(long = "inventory", required = true)]
        inventories: Vec<PathBuf>,
        /// Terminal names are PREFIX-00001, PREFIX-00002, ...
        #[arg(long, default_value = "sim")]
        prefix: String,
        /// How many connections open at once.
        #[arg(long, default_value_t = 32)]
        connect_parallelism: usize,
        /// Seconds between progress lines on stderr.
        #[arg(long, default_value_t = 1.0)]
        progress_seconds: f64,
        /// How long each simulated payload run takes, in milliseconds.
        #[arg(long, default_value_t = 0)]
        run_delay_ms: u64,
    },
    /// The loader process (started by the agent, one per dispatch): reads
    /// the dispatch on stdin, writes the signed report on stdout.
    #[command(hide = true)]
    Load {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        run_id: u64,
    },
}

use tenet_protocol::host::now_ms;

fn agent(config: &std::path::Path) -> anyhow::Result<tenet_agent::connection::Agent> {
    let c = AgentConfig::read(config)?;
    let store = LocalState::open(&c.data)?;
    let (identity, tpm) = c.identity_and_tpm(&store)?;
    let presenter = std::sync::Arc::new(tenet_agent::audit::Presenter::open(&store, &c.terminal)?);
    Ok(tenet_agent::connection::Agent {
        config: c,
        config_path: std::path::absolute(config)?,
        store,
        identity,
        tpm,
        presenter,
        running: std::sync::Arc::new(std::sync::Mutex::new(tenet_agent::self_update::Exe::at(
            &exe_path(),
        ))),
        exe: exe_path(),
        runs: Default::default(),
        handovers: Default::default(),
        operator_version: Default::default(),
    })
}

/// Logs on stderr (stdout carries the loader's answers): TENET_LOG sets
/// the filter (default `info`; wasmtime's and cranelift's chatter is
/// quietened).
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TENET_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,cranelift=warn,wasmtime=warn,rustls=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inventory { config } => {
            let c = AgentConfig::read(&config)?;
            let inv = c.inventory_source().collect()?;
            print!("{}", serde_yaml::to_string(&inv)?);
        }
        Command::Pin {
            config,
            dispatch_key,
            admin_keys,
            threshold,
            issuer_key,
            trust_version,
        } => {
            let c = AgentConfig::read(&config)?;
            let store = LocalState::open(&c.data)?;
            let dispatch_key = PublicKey::read_pem_file(&dispatch_key)?;
            let admin_keys = admin_keys
                .iter()
                .map(|p| PublicKey::read_pem_file(p))
                .collect::<Result<Vec<_>, _>>()?;
            let issuer_key = match issuer_key {
                Some(p) => PublicKey::read_pem_file(&p)?,
                None => dispatch_key.clone(),
            };
            if threshold == 0 || usize::from(threshold) > admin_keys.len() {
                anyhow::bail!(
                    "--threshold {threshold} with {} admin key(s)",
                    admin_keys.len()
                );
            }
            store.set_trust(&TrustAnchors {
                version: trust_version,
                admin_keys,
                admin_threshold: threshold,
                dispatch_key,
                issuer_key,
            })?;
            let identity = c.identity(&store)?;
            let public = identity.public_key();
            println!(
                "pinned; this terminal's identity key is {} {}",
                public.algorithm(),
                public.fingerprint()
            );
        }
        Command::Dispatch {
            config,
            envelope,
            bundle,
            report,
        } => {
            let c = AgentConfig::read(&config)?;
            let store = LocalState::open(&c.data)?;
            let identity = c.identity(&store)?;
            let envelope =
                std::fs::read(&envelope).with_context(|| envelope.display().to_string())?;
            let bundle = std::fs::read(&bundle).with_context(|| bundle.display().to_string())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let done = runtime.block_on(tenet_agent::dispatch::dispatch(
                &exe_path(),
                &std::path::absolute(&config)?,
                &store,
                identity.as_ref(),
                &c.terminal,
                &envelope,
                &bundle,
                now_ms(),
            ))?;
            if let Some(path) = report {
                std::fs::write(&path, &done.report).with_context(|| path.display().to_string())?;
            }
            println!("{:?}\nqueued {}", done.outcome, done.queued.display());
        }
        Command::Enrol {
            config,
            token,
            ca_fingerprint,
        } => {
            let agent = agent(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let response = runtime.block_on(agent.enrol(&token, &ca_fingerprint))?;
            println!(
                "enrolled as {}; pinned dispatch key {}, {} admin key(s) ({} required), issuer key {}",
                response.terminal,
                response.trust.dispatch_key.fingerprint(),
                response.trust.admin_keys.len(),
                response.trust.admin_threshold,
                response.trust.issuer_key.fingerprint()
            );
        }
        Command::Run { config } => {
            // The presentation listener serves up to 1,024 peers at once.
            tenet_protocol::listen::raise_open_files_limit();
            let agent = agent(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(agent.run());
        }
        Command::Probe { config, timeout } => {
            let agent = agent(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let version = runtime
                .block_on(agent.probe_until(std::time::Duration::from_secs(timeout.max(1))))?;
            println!("{}{version}", tenet_agent::self_update::WELCOMED);
        }
        Command::ResumeHandover { config, exe } => {
            let mut agent = agent(&config)?;
            agent.running = std::sync::Arc::new(std::sync::Mutex::new(
                tenet_agent::self_update::Exe::at(&exe),
            ));
            agent.exe = exe;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            println!("{}", runtime.block_on(agent.resume_handover()));
        }
        Command::BenchPresent {
            connections,
            tcti,
            steady_seconds,
            output,
        } => {
            let rows = tenet_agent::bench::run(&connections, tcti, steady_seconds)
                .map_err(anyhow::Error::msg)?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<6} {:<16} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9}",
                    "MODE",
                    "LOAD",
                    "CONNECTIONS",
                    "REQUESTS",
                    "P50_MS",
                    "P99_MS",
                    "MAX_MS",
                    "VERIFIED"
                );
                for r in rows {
                    println!(
                        "{:<6} {:<16} {:>11} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9}",
                        r.mode,
                        r.load,
                        r.connections,
                        r.requests,
                        r.p50_ms,
                        r.p99_ms,
                        r.max_ms,
                        r.verified
                    );
                }
            }
        }
        Command::Simulate {
            count,
            operator,
            server_name,
            token,
            ca_fingerprint,
            inventories,
            prefix,
            connect_parallelism,
            progress_seconds,
            run_delay_ms,
        } => {
            // One connection (a descriptor) per simulated terminal.
            tenet_protocol::listen::raise_open_files_limit();
            let mut templates = Vec::new();
            for path in &inventories {
                let files = if path.is_dir() {
                    let mut f: Vec<PathBuf> = std::fs::read_dir(path)
                        .with_context(|| path.display().to_string())?
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                        .collect();
                    f.sort();
                    f
                } else {
                    vec![path.clone()]
                };
                for f in files {
                    templates.push(tenet_agent::inventory::read_inventory_file(&f)?);
                }
            }
            if templates.is_empty() {
                anyhow::bail!("no inventory templates found in {inventories:?}");
            }
            let options = tenet_agent::simulate::Options {
                operator,
                server_name,
                count,
                prefix,
                token,
                ca_fingerprint,
                templates,
                connect_parallelism,
                run_delay: std::time::Duration::from_millis(run_delay_ms),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(tenet_agent::simulate::run(
                options,
                std::time::Duration::from_secs_f64(progress_seconds.max(0.05)),
            ))?;
        }
        Command::Load { config, run_id } => tenet_agent::load::serve(&config, run_id)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

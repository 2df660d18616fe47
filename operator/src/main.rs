//! `tenet`: the Tenet operator and its admin CLI.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tenet::cli::{self, Output, payload};
use tenet_protocol::Algorithm;

/// Tenet keeps a fleet of endpoint terminals in the state its admins
/// declared, and proves that they are.
///
/// Policies are YAML `TerminalPolicy` documents (the same files `kubectl
/// apply` takes). Start with `tenet policy check policies/` and `tenet
/// policy plan policies/ --inventory examples/inventories/`.
#[derive(Parser)]
#[command(name = "tenet", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check and dry-run policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Make a signing key: KEY (private, PKCS#8 PEM, mode 0600) and KEY.pub.
    Keygen {
        /// Where to write the private key; the public key goes to OUT.pub.
        /// An existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// ed25519 (admins, the operator) or ecdsa-p256 (what a TPM holds).
        #[arg(long, default_value = "ed25519", value_parser = parse_algorithm)]
        algorithm: Algorithm,
    },
    /// Build, sign, verify and inspect signed payload bundles.
    #[command(subcommand)]
    Payload(PayloadCommand),
    /// Run the standalone operator: reconcile the terminals that enrol
    /// against the policies in a directory, for as long as it runs.
    Operator {
        /// The policy directory (a git checkout: GitOps). Re-read continuously;
        /// a broken file keeps the last good version of its policies in force.
        /// Not with --kubernetes, where policies are TerminalPolicy resources.
        #[arg(long, required_unless_present = "kubernetes")]
        policies: Option<PathBuf>,
        /// Signed payload bundles (*.bundle); default: `bundles` beside the policies.
        #[arg(long)]
        bundles: Option<PathBuf>,
        /// Where the operator keeps its keys, CA and database (created on
        /// first start). With --kubernetes only the keys and CA (mount the
        /// Secret tenet-operator-keys here, the same for every replica).
        #[arg(long)]
        data: PathBuf,
        /// Run on Kubernetes: policies from TerminalPolicy resources, state
        /// in Terminal, Remediation and SecurityCertificate resources, one
        /// leader among the replicas (a Lease). In-cluster config or KUBECONFIG.
        #[arg(long)]
        kubernetes: bool,
        /// The operator's namespace (Terminals, certificates, the Lease).
        #[arg(long, env = "POD_NAMESPACE", default_value = "tenet-system")]
        namespace: String,
        /// This replica's name in the Lease.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds a leader's Lease lasts without renewal.
        #[arg(long, default_value_t = 15)]
        lease_seconds: u64,
        /// The agent gateway's address.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// A name (DNS or IP) the gateway certificate carries (repeat); default: the listen host and localhost.
        #[arg(long = "name")]
        names: Vec<String>,
        /// An admin public key whose signatures on bundles count (repeat); agents pin them.
        #[arg(long = "admin-key", required = true)]
        admin_keys: Vec<PathBuf>,
        /// How many admin signatures a bundle needs.
        #[arg(long, default_value_t = 1)]
        admin_threshold: u8,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics: String,
        /// Logs on stderr as text or JSON lines; the level comes from TENET_LOG (default info).
        #[arg(long, value_enum, default_value_t)]
        log_format: Output,
        /// Agent sessions held at most; more are closed at once (each
        /// costs memory and a file descriptor: see `ulimit -n`).
        #[arg(long, default_value_t = 16384)]
        max_connections: usize,
        /// Connections that have not authenticated yet (TLS handshake and
        /// first message, 10 s at most), in all: over it, new ones are
        /// closed at once. They never take the sessions' slots.
        #[arg(long, default_value_t = 2048)]
        max_opening: usize,
        /// Connections from one address that have not authenticated yet.
        #[arg(long, default_value_t = 256)]
        max_opening_per_address: usize,
        /// A PEM file of TPM manufacturer CA certificates (roots and
        /// intermediates; repeat for more). A terminal's TPM counts only when
        /// its EK certificate chains to one of them and credential activation
        /// proves its attestation key is in that TPM; otherwise it is "claimed"
        /// and capped as if it had none.
        #[arg(long = "tpm-ca", value_name = "PEM")]
        tpm_roots: Vec<PathBuf>,
    },
    /// Bootstrap tokens for enrolling terminals.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Security certificates: check a peer's by challenge-response.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Benchmarks of the whole system on this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The fleet as the running operator sees it: each policy with counts by
    /// state; or one terminal (`tenet status terminal NAME`).
    Status {
        /// The operator's data directory.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// First wait, with a progress bar, until at least this many
        /// terminals are connected and the fleet has settled (nothing in
        /// flight, no change for two seconds); then print.
        #[arg(long, value_name = "TERMINALS")]
        wait_settled: Option<usize>,
        /// Give up waiting after this many seconds (exit 1).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(subcommand)]
        what: Option<StatusWhat>,
    },
}

#[derive(Subcommand)]
enum StatusWhat {
    /// One terminal: per policy its state, attempts and reason.
    Terminal { name: String },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One convergence: N simulated terminals (a `tenet-agent simulate`
    /// process: own keys, own mTLS connections) connect to an operator in
    /// this process and comply with a policy; the policy then requires a
    /// newer package, and the clock runs until every terminal's remediation
    /// is verified. Prints terminals, converged, wall_ms, p50_ms/p99_ms
    /// (envelope sent -> verified report) and operator_rss_bytes.
    Converge {
        #[arg(long, default_value_t = 1000)]
        terminals: usize,
        /// The rollout's window: at most this many dispatches in flight
        /// (default: all at once).
        #[arg(long)]
        max_in_flight: Option<usize>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// Working directory (default: a new temporary one, removed after).
        #[arg(long)]
        work: Option<PathBuf>,
        /// The tenet-agent binary (default: the one next to `tenet`).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Kubernetes mode against the API server of KUBECONFIG (CRDs
        /// installed): the policy is a TerminalPolicy in namespace `bench`,
        /// the state in Terminal and Remediation resources; also reports
        /// the API writes.
        #[arg(long)]
        kubernetes: bool,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Ask a terminal (or a server running the agent) for its security
    /// certificate over TLS with a fresh challenge, and check it: signed by
    /// the issuer, valid now, answered to this challenge on this connection
    /// by the key the certificate names, for the expected subject, at the
    /// required level. Exit 0: verified; 1: refused, with the reason
    /// (expired, wrong issuer, level too low, bad signature, challenge
    /// mismatch, wrong subject); 2: the peer could not be asked.
    Verify {
        /// The peer's presentation address (the agent's `presentation.listen`).
        #[arg(long, value_name = "HOST:PORT")]
        peer: String,
        /// The lowest acceptable security level (0-100).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        min_level: u8,
        /// The issuer's public key (the operator's DATA/dispatch.key.pub).
        #[arg(long, value_name = "FILE")]
        issuer_key: PathBuf,
        /// The terminal the peer must be.
        #[arg(long)]
        subject: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a bootstrap token; prints it with the CA fingerprint agents need.
    /// Only its hash is kept. One-time by default; `--uses N` lets N
    /// terminals enrol with it (a batch of new terminals, or a simulation).
    Create {
        /// The operator's data directory.
        #[arg(long)]
        data: PathBuf,
        /// Only this terminal may enrol with it.
        #[arg(long)]
        terminal: Option<String>,
        /// How many terminals may enrol with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it stays valid, in hours.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
        /// Kubernetes mode: put the token in the Secret tenet-tokens of this
        /// namespace (KUBECONFIG) instead of DATA/tokens/.
        #[arg(long, value_name = "NAMESPACE")]
        kubernetes: Option<String>,
    },
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    Algorithm::parse(s).ok_or_else(|| format!("{s:?}: use ed25519 or ecdsa-p256"))
}

#[derive(Subcommand)]
enum PayloadCommand {
    /// Build an unsigned bundle from a WASM module (.wat or .wasm) and artifacts.
    Build {
        /// The module: WebAssembly text (.wat) or binary (.wasm).
        #[arg(long)]
        module: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "1.0.0")]
        version: String,
        #[arg(long, default_value = "")]
        description: String,
        /// A capability the module needs (repeat): run-artifact, read-inventory, write-files, log.
        #[arg(long = "capability")]
        capabilities: Vec<String>,
        /// A file shipped with the module, digest-pinned (repeat).
        #[arg(long = "artifact")]
        artifacts: Vec<PathBuf>,
        /// How long the bundle may be run: 30d, 12h, 90m.
        #[arg(long, default_value = "30d")]
        expires_in: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a signature with an admin key. The bundle's digest does not change.
    Sign {
        bundle: PathBuf,
        /// The admin's private key file.
        #[arg(long)]
        key: PathBuf,
        /// Write the signed bundle here instead of in place.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify signatures (k of n trusted keys), digest and expiry. Exits 0
    /// when the bundle verifies; otherwise 1 with the reason.
    Verify {
        bundle: PathBuf,
        /// A trusted admin public key (repeat).
        #[arg(long = "trust")]
        trust: Vec<PathBuf>,
        /// How many of the trusted keys must have signed.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// The digest a policy pins (sha256:...); the bundle must have it.
        #[arg(long)]
        digest: Option<String>,
    },
    /// Show what a bundle holds (signatures are listed, not checked).
    Inspect {
        bundle: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate every policy in a directory. Exits 0 when all are valid;
    /// otherwise 1, with every error on its own line as FILE:LINE:COL: message.
    Check {
        /// The policy directory (read recursively; hidden files are skipped).
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show, for each terminal in an inventory, which policies select it,
    /// which requirements fail and why, and which payload would be sent.
    /// Nothing is sent.
    Plan {
        /// The policy directory.
        dir: PathBuf,
        /// An inventory file (one YAML document per terminal) or a directory of them.
        #[arg(long)]
        inventory: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// Structured logs on stderr: TENET_LOG sets the filter (default `info`;
/// wasmtime's and cranelift's chatter is quietened).
fn init_logging(format: Output) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TENET_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,cranelift=warn,wasmtime=warn,rustls=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        Output::Json => builder.json().init(),
        Output::Text => builder.init(),
    }
}

/// A command that prints its result and fails with a reason.
fn done(r: Result<(), payload::CliError>) -> std::io::Result<i32> {
    report(r.map(|()| 0))
}

fn report(r: Result<i32, payload::CliError>) -> std::io::Result<i32> {
    match r {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("tenet: {e}");
            Ok(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Not locked for the whole run: the operator's log writer (other
    // threads) writes to stderr too.
    let stdout = &mut std::io::stdout();
    let stderr = &mut std::io::stderr();
    let result = match cli.command {
        Command::Policy(PolicyCommand::Check { dir, output }) => {
            cli::policy::check(&dir, output, stdout, stderr)
        }
        Command::Policy(PolicyCommand::Plan {
            dir,
            inventory,
            output,
        }) => cli::policy::plan(&dir, &inventory, output, stdout, stderr),
        Command::Keygen { out, algorithm } => done(payload::keygen(&out, algorithm, stdout)),
        Command::Payload(cmd) => match cmd {
            PayloadCommand::Build {
                module,
                name,
                version,
                description,
                capabilities,
                artifacts,
                expires_in,
                out,
            } => done(payload::build(
                &payload::BuildArgs {
                    module,
                    name,
                    version,
                    description,
                    capabilities,
                    artifacts,
                    expires_in,
                    out,
                },
                stdout,
            )),
            PayloadCommand::Sign { bundle, key, out } => {
                done(payload::sign(&bundle, &key, out.as_deref(), stdout))
            }
            PayloadCommand::Verify {
                bundle,
                trust,
                threshold,
                digest,
            } => report(payload::verify(
                &bundle,
                &trust,
                threshold,
                digest.as_deref(),
                stdout,
            )),
            PayloadCommand::Inspect { bundle, output } => {
                done(payload::inspect(&bundle, output, stdout))
            }
        },
        Command::Operator {
            policies,
            bundles,
            data,
            kubernetes,
            namespace,
            identity,
            lease_seconds,
            listen,
            names,
            admin_keys,
            admin_threshold,
            metrics,
            log_format,
            max_connections,
            max_opening,
            max_opening_per_address,
            tpm_roots,
        } => {
            init_logging(log_format);
            let policies = policies.unwrap_or_default();
            let bundles = bundles.unwrap_or_else(|| {
                policies
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join("bundles")
            });
            let kubernetes = kubernetes.then(|| tenet::daemon::KubeSettings {
                namespace,
                identity: identity.unwrap_or_else(|| {
                    format!(
                        "{}-{}",
                        std::fs::read_to_string("/etc/hostname")
                            .map(|h| h.trim().to_string())
                            .unwrap_or_else(|_| "tenet".into()),
                        std::process::id()
                    )
                }),
                lease: std::time::Duration::from_secs(lease_seconds.max(3)),
            });
            let names = if names.is_empty() {
                let host = listen.rsplit_once(':').map_or(listen.as_str(), |(h, _)| h);
                vec![host.to_string(), "localhost".to_string()]
            } else {
                names
            };
            let daemon = tenet::daemon::Daemon {
                policies,
                bundles,
                data,
                listen,
                names,
                admin_keys,
                admin_threshold,
                tick: std::time::Duration::from_secs(1),
                metrics: Some(metrics),
                probe: None,
                limits: tenet::gateway::Limits {
                    max_sessions: max_connections,
                    max_opening,
                    max_opening_per_address,
                    ..Default::default()
                },
                kubernetes,
                tpm_roots,
            };
            let result = tokio::runtime::Runtime::new()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    let mut out = std::io::stdout();
                    rt.block_on(daemon.run(&mut out)).map_err(|e| e.to_string())
                });
            match result {
                Ok(()) => Ok(0),
                Err(e) => {
                    eprintln!("tenet: {e}");
                    Ok(1)
                }
            }
        }
        Command::Bench(BenchCommand::Converge {
            terminals,
            max_in_flight,
            output,
            work,
            agent,
            kubernetes,
        }) => bench_converge(
            terminals,
            max_in_flight,
            output,
            work,
            agent,
            kubernetes,
            stdout,
        ),
        Command::Status {
            data,
            output,
            what,
            wait_settled,
            timeout,
        } => match wait_settled
            .map_or(Ok(()), |n| {
                tenet::status::wait_settled(
                    &data,
                    n,
                    std::time::Duration::from_secs(timeout),
                    &mut std::io::stderr(),
                )
            })
            .and_then(|()| tenet::status::read(&data))
        {
            Err(e) => {
                eprintln!("tenet: {e}");
                Ok(1)
            }
            Ok(status) => match (what, output) {
                (None, Output::Json) => serde_json::to_writer_pretty(&mut *stdout, &status)
                    .map_err(std::io::Error::from)
                    .and_then(|()| writeln!(stdout))
                    .map(|()| 0),
                (None, Output::Text) => tenet::status::print(&status, stdout).map(|()| 0),
                (Some(StatusWhat::Terminal { name }), output) => {
                    let found = match output {
                        Output::Json => {
                            match status.terminals.iter().find(|t| t.terminal == name) {
                                Some(t) => serde_json::to_writer_pretty(&mut *stdout, t)
                                    .map_err(std::io::Error::from)
                                    .and_then(|()| writeln!(stdout))
                                    .map(|()| true),
                                None => Ok(false),
                            }
                        }
                        Output::Text => tenet::status::print_terminal(&status, &name, stdout),
                    };
                    found.map(|f| {
                        if f {
                            0
                        } else {
                            eprintln!("tenet: no terminal named {name:?}");
                            1
                        }
                    })
                }
            },
        },
        Command::Cert(CertCommand::Verify {
            peer,
            min_level,
            issuer_key,
            subject,
            timeout,
        }) => cli::cert::verify(
            &peer,
            &issuer_key,
            min_level,
            subject.as_deref(),
            std::time::Duration::from_secs(timeout),
            stdout,
            stderr,
        ),
        Command::Token(TokenCommand::Create {
            data,
            terminal,
            uses,
            ttl_hours,
            kubernetes,
        }) => match tenet::daemon::create_token(
            &data,
            terminal,
            uses,
            std::time::Duration::from_secs(ttl_hours * 3600),
            kubernetes.as_deref(),
            stdout,
        ) {
            Ok(_) => Ok(0),
            Err(e) => {
                eprintln!("tenet: {e}");
                Ok(1)
            }
        },
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("tenet: cannot write the output: {e}");
            ExitCode::from(2)
        }
    }
}

fn bench_converge(
    terminals: usize,
    max_in_flight: Option<usize>,
    output: Output,
    work: Option<PathBuf>,
    agent: Option<PathBuf>,
    kubernetes: bool,
    stdout: &mut dyn Write,
) -> std::io::Result<i32> {
    let temp = match &work {
        Some(_) => None,
        None => Some(tempfile::tempdir()?),
    };
    let dir = work
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_path_buf()))
        .unwrap_or_default();
    std::fs::create_dir_all(&dir)?;
    let agent = agent.unwrap_or_else(tenet::bench::default_agent);
    let rt = tokio::runtime::Runtime::new()?;
    let mut progress = std::io::stderr();
    match rt.block_on(tenet::bench::converge(
        terminals,
        max_in_flight,
        &dir,
        &agent,
        kubernetes.then(|| tenet::daemon::KubeSettings {
            namespace: "tenet-system".into(),
            identity: "tenet-bench".into(),
            lease: std::time::Duration::from_secs(15),
        }),
        &mut progress,
    )) {
        Ok(r) => {
            match output {
                Output::Json => {
                    serde_json::to_writer(&mut *stdout, &r).map_err(std::io::Error::from)?;
                    writeln!(stdout)?;
                }
                Output::Text => writeln!(
                    stdout,
                    "{} terminals: {} converged in {:.0} ms; per terminal p50 {:.1} ms, p99 {:.1} ms; operator RSS {:.1} MiB ({:.1} KiB per terminal over the {:.1} MiB baseline); {} database commits",
                    r.terminals,
                    r.converged,
                    r.wall_ms,
                    r.p50_ms,
                    r.p99_ms,
                    r.operator_rss_bytes as f64 / 1048576.0,
                    r.rss_per_terminal_bytes as f64 / 1024.0,
                    r.operator_rss_baseline_bytes as f64 / 1048576.0,
                    r.store_commits
                )?,
            }
            rt.shutdown_background();
            Ok(0)
        }
        Err(e) => {
            eprintln!(
                "tenet: bench converge: {e} (work directory {})",
                dir.display()
            );
            if let Some(t) = temp {
                // Keep what the failed run left, for a look.
                let _ = t.keep();
            }
            rt.shutdown_background();
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

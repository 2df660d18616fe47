//! The `tenet` binary's command line: one module per command, each with its
//! arguments (clap) and a `run` from them to an exit code and text on
//! stdout/stderr. `main.rs` only calls [`main`].

pub mod apt;
pub mod bench;
pub mod cert;
pub mod evidence;
pub mod operator;
pub mod payload;
pub mod policy;
pub mod status;
pub mod token;
pub mod trust;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tenet_protocol::Algorithm;

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// For a person.
    #[default]
    Text,
    /// One JSON document on stdout, for programs.
    Json,
}

/// Tenet keeps a fleet of endpoint terminals in the state its admins
/// declared, and proves that they are.
///
/// Policies are YAML `TerminalPolicy` documents (the same files `kubectl
/// apply` takes). Start with `tenet policy check policies/` and `tenet
/// policy plan policies/ --inventory examples/inventories/`.
#[derive(Parser)]
#[command(name = "tenet", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check and dry-run policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
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
    Payload(payload::PayloadCommand),
    /// Run the standalone operator: reconcile the terminals that enrol
    /// against the policies in a directory, for as long as it runs.
    Operator(operator::OperatorArgs),
    /// Bootstrap tokens for enrolling terminals.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Security certificates: check a peer's by challenge-response.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Rotate the keys agents trust: the admin keys and threshold, and the
    /// dispatch key, signed by the admins (TUF-style).
    #[command(subcommand)]
    Trust(trust::TrustCommand),
    /// Export one terminal's evidence history for an auditor, and verify
    /// an export offline with the admins' and the operator's public keys.
    #[command(subcommand)]
    Evidence(evidence::EvidenceCommand),
    /// Benchmarks of the whole system on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The fleet as the running operator sees it: each policy with counts by
    /// state; or one terminal (`tenet status terminal NAME`).
    Status(status::StatusArgs),
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    Algorithm::parse(s).ok_or_else(|| format!("{s:?}: use ed25519 or ecdsa-p256"))
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

/// 0 when a command did what it says; 1 with the reason on stderr.
fn exit_code(r: Result<i32, payload::CliError>) -> i32 {
    r.unwrap_or_else(|e| {
        eprintln!("tenet: {e}");
        1
    })
}

/// Parse the command line and run the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Not locked for the whole run: the operator's log writer (other
    // threads) writes to stderr too.
    let stdout = &mut std::io::stdout();
    let stderr = &mut std::io::stderr();
    let result = match cli.command {
        Command::Policy(command) => policy::run(command, stdout, stderr),
        Command::Keygen { out, algorithm } => Ok(exit_code(
            payload::keygen(&out, algorithm, stdout).map(|()| 0),
        )),
        Command::Payload(command) => payload::run(command, stdout),
        Command::Operator(args) => Ok(operator::run(args)),
        Command::Bench(command) => bench::run(command, stdout),
        Command::Status(args) => status::run(args, stdout),
        Command::Cert(command) => cert::run(command, stdout, stderr),
        Command::Token(command) => token::run(command, stdout),
        Command::Trust(command) => trust::run(command, stdout),
        Command::Evidence(command) => evidence::run(command, stdout),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("tenet: cannot write the output: {e}");
            ExitCode::from(2)
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

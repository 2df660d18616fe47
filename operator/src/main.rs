//! `tenet`: the Tenet operator and its admin CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tenet::cli::{self, Output};

/// Tenet keeps a fleet of endpoint terminals in the state its admins
/// declared, and proves that they are.
///
/// Policies are YAML `TerminalPolicy` documents (the same files `kubectl
/// apply` takes). Start with `tenet policy check policies/` and `tenet
/// policy plan policies/ --inventory examples/inventories/`.
#[derive(Parser)]
#[command(name = "tenet", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check and dry-run policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = &mut std::io::stdout().lock();
    let stderr = &mut std::io::stderr().lock();
    let result = match cli.command {
        Command::Policy(PolicyCommand::Check { dir, output }) => {
            cli::policy::check(&dir, output, stdout, stderr)
        }
        Command::Policy(PolicyCommand::Plan {
            dir,
            inventory,
            output,
        }) => cli::policy::plan(&dir, &inventory, output, stdout, stderr),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("tenet: cannot write the output: {e}");
            ExitCode::from(2)
        }
    }
}

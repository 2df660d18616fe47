//! `tenet token`: bootstrap tokens for enrolling terminals.

use std::io::Write;
use std::path::PathBuf;

use crate::tokens::{Inbox, create_token};

#[derive(clap::Subcommand)]
pub enum TokenCommand {
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
        /// A label admins assign the terminals that enrol with it
        /// (KEY=VALUE, repeat): policies select on these, never on what a
        /// terminal reports about itself. In Kubernetes mode,
        /// `tenet.dev/namespace=NS` puts them in namespace NS's tenancy:
        /// only NS's TerminalPolicies select them.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::tokens::parse_label)]
        labels: Vec<(String, String)>,
        /// How long it stays valid, in hours.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
        /// Kubernetes mode: put the token in the Secret tenet-tokens of this
        /// namespace (KUBECONFIG) instead of DATA/tokens/.
        #[arg(long, value_name = "NAMESPACE")]
        kubernetes: Option<String>,
    },
}

pub fn run(command: TokenCommand, stdout: &mut dyn Write) -> std::io::Result<i32> {
    let TokenCommand::Create {
        data,
        terminal,
        uses,
        labels,
        ttl_hours,
        kubernetes,
    } = command;
    let inbox = match &kubernetes {
        None => Inbox::Directory,
        Some(namespace) => Inbox::Secret { namespace },
    };
    let created = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(create_token(
            &data,
            terminal,
            uses,
            std::time::Duration::from_secs(ttl_hours * 3600),
            labels.into_iter().collect(),
            inbox,
            stdout,
        ));
    match created {
        Ok(_) => Ok(0),
        Err(e) => {
            eprintln!("tenet: {e}");
            Ok(1)
        }
    }
}

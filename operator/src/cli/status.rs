//! `tenet status`: the fleet as the running operator last wrote it.

use std::io::Write;
use std::path::PathBuf;

use super::Output;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The operator's data directory.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// First wait, with a progress bar, until at least this many
    /// terminals are connected and the fleet has settled (nothing in
    /// flight, no change for two seconds); then print.
    #[arg(long, value_name = "TERMINALS")]
    pub wait_settled: Option<usize>,
    /// Give up waiting after this many seconds (exit 1).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    #[command(subcommand)]
    pub what: Option<StatusWhat>,
}

#[derive(clap::Subcommand)]
pub enum StatusWhat {
    /// One terminal: per policy its state, attempts and reason.
    Terminal { name: String },
}

pub fn run(args: StatusArgs, stdout: &mut dyn Write) -> std::io::Result<i32> {
    let status = args
        .wait_settled
        .map_or(Ok(()), |n| {
            crate::status::wait_settled(
                &args.data,
                n,
                std::time::Duration::from_secs(args.timeout),
                &mut std::io::stderr(),
            )
        })
        .and_then(|()| crate::status::read(&args.data));
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            eprintln!("tenet: {e}");
            return Ok(1);
        }
    };
    let found = match (args.what, args.output) {
        (None, Output::Json) => {
            serde_json::to_writer_pretty(&mut *stdout, &status)?;
            writeln!(stdout)?;
            return Ok(0);
        }
        (None, Output::Text) => {
            crate::status::print(&status, stdout)?;
            return Ok(0);
        }
        (Some(StatusWhat::Terminal { name }), Output::Json) => {
            match status.terminals.iter().find(|t| t.terminal == name) {
                Some(t) => {
                    serde_json::to_writer_pretty(&mut *stdout, t)?;
                    writeln!(stdout)?;
                    Ok(name)
                }
                None => Err(name),
            }
        }
        (Some(StatusWhat::Terminal { name }), Output::Text) => {
            if crate::status::print_terminal(&status, &name, stdout)? {
                Ok(name)
            } else {
                Err(name)
            }
        }
    };
    match found {
        Ok(_) => Ok(0),
        Err(name) => {
            eprintln!("tenet: no terminal named {name:?}");
            Ok(1)
        }
    }
}

//! `tenet bench`: benchmarks of the whole system on this machine.

use std::io::Write;
use std::path::PathBuf;

use super::Output;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// One convergence: N simulated terminals (a `tenet-agent simulate`
    /// process: own keys, own mTLS connections) connect to an operator in
    /// this process and comply with a policy; the policy then requires a
    /// newer package, and the clock runs until every terminal's remediation
    /// is verified. Prints terminals, converged, wall_ms, p50_ms/p99_ms
    /// (envelope sent -> verified report), operator_rss_bytes and
    /// bytes_sent (bundle bytes sent to the terminals).
    Converge(ConvergeArgs),
}

#[derive(clap::Args)]
pub struct ConvergeArgs {
    #[arg(long, default_value_t = 1000)]
    pub terminals: usize,
    /// The rollout's window: at most this many dispatches in flight
    /// (default: all at once).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// Working directory (default: a new temporary one, removed after).
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// The tenet-agent binary (default: the one next to `tenet`).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Kubernetes mode against the API server of KUBECONFIG (CRDs
    /// installed): the policy is a TerminalPolicy in namespace `bench`,
    /// the state in Terminal and Remediation resources; also reports
    /// the API writes.
    #[arg(long)]
    pub kubernetes: bool,
}

pub fn run(command: BenchCommand, stdout: &mut dyn Write) -> std::io::Result<i32> {
    let BenchCommand::Converge(args) = command;
    converge(args, stdout)
}

fn converge(args: ConvergeArgs, stdout: &mut dyn Write) -> std::io::Result<i32> {
    let ConvergeArgs {
        terminals,
        max_in_flight,
        output,
        work,
        agent,
        kubernetes,
    } = args;
    let temp = match &work {
        Some(_) => None,
        None => Some(tempfile::tempdir()?),
    };
    let dir = work
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_path_buf()))
        .unwrap_or_default();
    std::fs::create_dir_all(&dir)?;
    let agent = agent.unwrap_or_else(crate::bench::default_agent);
    let rt = tokio::runtime::Runtime::new()?;
    let mut progress = std::io::stderr();
    match rt.block_on(crate::bench::converge(
        terminals,
        max_in_flight,
        &dir,
        &agent,
        kubernetes.then(|| crate::daemon::KubeSettings {
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
                    "{} terminals: {} converged in {:.0} ms; per terminal p50 {:.1} ms, p99 {:.1} ms; operator RSS {:.1} MiB ({:.1} KiB per terminal over the {:.1} MiB baseline); {} database commits; {} bundle bytes sent",
                    r.terminals,
                    r.converged,
                    r.wall_ms,
                    r.p50_ms,
                    r.p99_ms,
                    r.operator_rss_bytes as f64 / 1048576.0,
                    r.rss_per_terminal_bytes as f64 / 1024.0,
                    r.operator_rss_baseline_bytes as f64 / 1048576.0,
                    r.store_commits,
                    r.bytes_sent
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

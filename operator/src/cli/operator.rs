//! `tenet operator`: run the operator until stopped.

use std::path::PathBuf;

use super::Output;
use crate::daemon::remote::GitRemote;
use crate::daemon::{Daemon, KubeSettings};

/// Run the standalone operator: reconcile the terminals that enrol
/// against the policies in a directory, for as long as it runs.
#[derive(clap::Args)]
pub struct OperatorArgs {
    /// The policy directory (a git checkout: GitOps), or a git remote,
    /// `git+URL[#BRANCH]` (file://, git://, http(s)://, ssh://), pulled
    /// every --pull-seconds into DATA/policies-remote. Re-read
    /// continuously; a broken file keeps the last good version of its
    /// policies in force. Not with --kubernetes, where policies are
    /// TerminalPolicy resources.
    #[arg(long, required_unless_present = "kubernetes")]
    pub policies: Option<String>,
    /// With --policies git+URL: how often to fetch the branch.
    #[arg(long, default_value_t = 60)]
    pub pull_seconds: u64,
    /// With --policies git+URL: a file holding the secret the git host
    /// signs its push webhooks with. The host posts to
    /// http://METRICS/webhook (X-Hub-Signature-256, as GitHub, Gitea and
    /// Forgejo send it), and the operator fetches at once.
    #[arg(long, requires = "policies")]
    pub webhook_secret_file: Option<PathBuf>,
    /// With --policies git+URL: enforce only commits whose SSH signature
    /// (git commit -S with gpg.format=ssh) verifies against this allowed
    /// signers file (git's format: `alice@example ssh-ed25519 AAAA...` a
    /// line). Any other commit is not checked out; what is in force stays
    /// and status names the commit and why.
    #[arg(long, value_name = "ALLOWED_SIGNERS")]
    pub require_signed_commits: Option<PathBuf>,
    /// Signed payload bundles (*.bundle); default: `bundles` beside the policies.
    #[arg(long)]
    pub bundles: Option<PathBuf>,
    /// Where the operator keeps its keys, CA and database (created on
    /// first start). With --kubernetes only the keys and CA (mount the
    /// Secret tenet-operator-keys here, the same for every replica).
    #[arg(long)]
    pub data: PathBuf,
    /// Run on Kubernetes: policies from TerminalPolicy resources, state
    /// in Terminal, Remediation and SecurityCertificate resources, one
    /// leader among the replicas (a Lease). In-cluster config or KUBECONFIG.
    #[arg(long)]
    pub kubernetes: bool,
    /// The operator's namespace (Terminals, certificates, the Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tenet-system")]
    pub namespace: String,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a leader's Lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// The agent gateway's address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: String,
    /// A name (DNS or IP) the gateway certificate carries (repeat); default: the listen host and localhost.
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// An admin public key whose signatures on bundles and policy
    /// approvals count (repeat); agents pin them at enrolment. These are
    /// version 1 of the trust anchors, for good: later versions come from
    /// rotations the admins signed (`tenet trust`, DATA/trust-N.rotation),
    /// never from changing these flags.
    #[arg(long = "admin-key", required = true)]
    pub admin_keys: Vec<PathBuf>,
    /// How many admin signatures a bundle or an approval needs (version 1).
    #[arg(long, default_value_t = 1)]
    pub admin_threshold: u8,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics: String,
    /// Logs on stderr as text or JSON lines; the level comes from TENET_LOG (default info).
    #[arg(long, value_enum, default_value_t)]
    pub log_format: Output,
    /// Agent sessions held at most; more are closed at once (each
    /// costs memory and a file descriptor: see `ulimit -n`).
    #[arg(long, default_value_t = 16384)]
    pub max_connections: usize,
    /// Connections that have not authenticated yet (TLS handshake and
    /// first message, 10 s at most), in all: over it, new ones are
    /// closed at once. They never take the sessions' slots.
    #[arg(long, default_value_t = 2048)]
    pub max_opening: usize,
    /// Connections from one address that have not authenticated yet.
    #[arg(long, default_value_t = 256)]
    pub max_opening_per_address: usize,
    /// A PEM file of TPM manufacturer CA certificates (roots and
    /// intermediates; repeat for more). A terminal's TPM counts only when
    /// its EK certificate chains to one of them and credential activation
    /// proves its attestation key is in that TPM; otherwise it is "claimed"
    /// and capped as if it had none.
    #[arg(long = "tpm-ca", value_name = "PEM")]
    pub tpm_roots: Vec<PathBuf>,
}

/// Parse the settings, start the operator, and run it until it stops.
pub fn run(args: OperatorArgs) -> i32 {
    super::init_logging(args.log_format);
    let given = args.policies.unwrap_or_default();
    let (policies, policy_remote) = match GitRemote::parse(&given) {
        None if args.webhook_secret_file.is_some() => {
            eprintln!("tenet: --webhook-secret-file needs --policies git+URL");
            return 2;
        }
        None if args.require_signed_commits.is_some() => {
            eprintln!("tenet: --require-signed-commits needs --policies git+URL");
            return 2;
        }
        None => (PathBuf::from(&given), None),
        Some(Ok(remote)) => (args.data.join("policies-remote"), Some(remote)),
        Some(Err(e)) => {
            eprintln!("tenet: --policies {e}");
            return 2;
        }
    };
    let allowed_signers = match args.require_signed_commits.as_deref().map(allowed_signers) {
        None => None,
        Some(Ok(path)) => Some(path),
        Some(Err(e)) => {
            eprintln!("tenet: --require-signed-commits {e}");
            return 2;
        }
    };
    let bundles = args.bundles.unwrap_or_else(|| {
        match &policy_remote {
            // A remote's bundles are not in the data directory.
            Some(_) => PathBuf::from("bundles"),
            None => policies
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("bundles"),
        }
    });
    let kubernetes = args.kubernetes.then(|| KubeSettings {
        namespace: args.namespace,
        identity: args.identity.unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "tenet".into()),
                std::process::id()
            )
        }),
        lease: std::time::Duration::from_secs(args.lease_seconds.max(3)),
    });
    let names = if args.names.is_empty() {
        let host = args
            .listen
            .rsplit_once(':')
            .map_or(args.listen.as_str(), |(h, _)| h);
        vec![host.to_string(), "localhost".to_string()]
    } else {
        args.names
    };
    let daemon = Daemon {
        policies,
        policy_remote,
        pull_every: std::time::Duration::from_secs(args.pull_seconds.max(1)),
        allowed_signers,
        webhook_secret: args.webhook_secret_file,
        bundles,
        data: args.data,
        listen: args.listen,
        names,
        admin_keys: args.admin_keys,
        admin_threshold: args.admin_threshold,
        tick: std::time::Duration::from_secs(1),
        metrics: Some(args.metrics),
        probe: None,
        limits: crate::gateway::Limits {
            max_sessions: args.max_connections,
            max_opening: args.max_opening,
            max_opening_per_address: args.max_opening_per_address,
            ..Default::default()
        },
        kubernetes,
        tpm_roots: args.tpm_roots,
    };
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            let mut out = std::io::stdout();
            rt.block_on(daemon.run(&mut out)).map_err(|e| e.to_string())
        });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tenet: {e}");
            1
        }
    }
}

/// The allowed signers file, as an absolute path (git runs in the
/// checkout), holding at least one key.
fn allowed_signers(path: &std::path::Path) -> Result<PathBuf, String> {
    let absolute = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text =
        std::fs::read_to_string(&absolute).map_err(|e| format!("{}: {e}", path.display()))?;
    if !text
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    {
        return Err(format!(
            "{}: no signer in it (lines of `PRINCIPAL KEY-TYPE BASE64-KEY`, as git's gpg.ssh.allowedSignersFile)",
            path.display()
        ));
    }
    Ok(absolute)
}

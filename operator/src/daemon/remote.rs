//! Policies from a git remote (`--policies git+URL[#BRANCH]`): the
//! operator keeps a checkout of the remote's branch in its data directory
//! and brings it up to date on an interval; the policy directory source
//! then reads the checkout as it reads any directory. Every transport git
//! knows works (`file://`, `git://`, `http(s)://`, `ssh://`), through the
//! `git` command, which also brings the user's credential helpers and SSH
//! configuration.
//!
//! A fetch that fails changes nothing: what is in force stays, and the
//! failure shows in status until a fetch succeeds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// A branch of a git remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRemote {
    pub url: String,
    /// `None`: the remote's default branch (its HEAD).
    pub branch: Option<String>,
}

impl GitRemote {
    /// `git+URL[#BRANCH]`; `None` for anything else (a directory).
    pub fn parse(arg: &str) -> Option<Result<GitRemote, String>> {
        let rest = arg.strip_prefix("git+")?;
        let (url, branch) = match rest.rsplit_once('#') {
            Some((url, branch)) => (url, Some(branch)),
            None => (rest, None),
        };
        let known = ["file://", "git://", "http://", "https://", "ssh://"];
        if !known.iter().any(|k| url.starts_with(k)) {
            return Some(Err(format!(
                "{arg}: the URL after git+ must start with one of {}",
                known.join(", ")
            )));
        }
        if let Some(b) = branch
            && (b.is_empty() || b.starts_with('-') || b.contains(char::is_whitespace))
        {
            return Some(Err(format!("{arg}: {b:?} is not a branch name")));
        }
        Some(Ok(GitRemote {
            url: url.to_string(),
            branch: branch.map(str::to_string),
        }))
    }

    /// How people see it, in status and logs: `git+URL#BRANCH`, without
    /// the credentials a URL may carry (`https://user:token@host/...`).
    pub fn display(&self) -> String {
        let url = match self.url.split_once("://") {
            Some((scheme, rest)) => {
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
                format!("{scheme}://{host}/{path}")
            }
            None => self.url.clone(),
        };
        match &self.branch {
            Some(b) => format!("git+{url}#{b}"),
            None => format!("git+{url}"),
        }
    }
}

/// The checkout of a remote and when it was last brought up to date.
pub struct Pull {
    remote: GitRemote,
    checkout: PathBuf,
    every: Duration,
    last: Option<Instant>,
    /// The fetch under way, in the background: the loop never waits for
    /// the network.
    fetching: Option<tokio::task::JoinHandle<Result<(), String>>>,
    /// Set by a verified webhook: fetch on the next refresh (at most one
    /// fetch every [`MIN_FETCH_GAP`]).
    pub asked: Arc<AtomicBool>,
    /// The last fetch's failure, until one succeeds.
    pub failure: Option<String>,
    /// With `--require-signed-commits`: the allowed signers file (git's
    /// `gpg.ssh.allowedSignersFile`, an absolute path); a fetched commit
    /// is checked out only when its SSH signature verifies against it.
    pub allowed_signers: Option<PathBuf>,
}

/// The longest a fetch may take before it is killed and counts as failed.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Webhooks (a replayed one, say) start a fetch at most this often.
pub const MIN_FETCH_GAP: Duration = Duration::from_secs(5);

impl Pull {
    pub fn new(remote: GitRemote, checkout: PathBuf, every: Duration) -> Pull {
        Pull {
            remote,
            checkout,
            every,
            last: None,
            fetching: None,
            asked: Arc::new(AtomicBool::new(false)),
            failure: None,
            allowed_signers: None,
        }
    }

    /// Check out only commits signed by one of `allowed_signers` (SSH
    /// signatures, git's allowed signers format).
    pub fn requiring_signatures(mut self, allowed_signers: PathBuf) -> Pull {
        self.allowed_signers = Some(allowed_signers);
        self
    }

    /// Start a fetch of the branch when `every` has passed since the last
    /// one, or a webhook asked; when one has ended, check out what it
    /// fetched (local and quick). Whether the checkout changed: what is
    /// checked out changes only once a fetch succeeded.
    pub async fn sync(&mut self) -> bool {
        let mut changed = false;
        if self.fetching.as_ref().is_some_and(|f| f.is_finished()) {
            let fetched = match self.fetching.take() {
                Some(task) => task
                    .await
                    .unwrap_or_else(|e| Err(format!("the fetch failed: {e}"))),
                None => Ok(()),
            };
            const FETCHED: &str = "refs/tenet/fetched";
            let result = match (fetched, &self.allowed_signers) {
                (Ok(()), None) => check_out(&self.checkout, FETCHED).await,
                (Ok(()), Some(signers)) => {
                    match verify_signed(&self.checkout, FETCHED, signers).await {
                        Ok(commit) => check_out(&self.checkout, &commit).await,
                        Err(e) => Err(e),
                    }
                }
                (Err(e), _) => Err(e),
            };
            changed = result.is_ok();
            let failure = result.err();
            if failure != self.failure {
                match &failure {
                    Some(e) => {
                        tracing::error!(remote = %self.remote.display(), error = %e, "cannot fetch the policies; what is in force stays")
                    }
                    None => tracing::info!(remote = %self.remote.display(), "policies fetched"),
                }
            }
            self.failure = failure;
        }
        let due = self.last.is_none_or(|t| t.elapsed() >= self.every)
            || (self.asked.load(Ordering::Relaxed)
                && self.last.is_none_or(|t| t.elapsed() >= MIN_FETCH_GAP));
        if due && self.fetching.is_none() {
            self.asked.store(false, Ordering::Relaxed);
            self.last = Some(Instant::now());
            let (remote, dir) = (self.remote.clone(), self.checkout.clone());
            self.fetching = Some(tokio::spawn(async move {
                tokio::time::timeout(FETCH_TIMEOUT, fetch(&remote, &dir))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "cannot fetch {}: no answer within {} s",
                            remote.display(),
                            FETCH_TIMEOUT.as_secs()
                        ))
                    })
            }));
        }
        changed
    }
}

/// Fetch the remote's branch into the checkout's repository (created the
/// first time), as `refs/tenet/fetched`.
async fn fetch(remote: &GitRemote, dir: &Path) -> Result<(), String> {
    if !dir.join(".git").exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        git(dir, &["init", "--quiet"]).await?;
        // A remote's symbolic link is checked out as a plain file holding
        // its target, never followed: the policy loader reads only files
        // the commit holds.
        git(dir, &["config", "core.symlinks", "false"]).await?;
        git(dir, &["remote", "add", "origin", &remote.url]).await?;
    } else {
        git(dir, &["remote", "set-url", "origin", &remote.url]).await?;
    }
    // Neither the URL (it starts with a scheme) nor the branch (checked
    // by `parse`) can pass for an option.
    let branch = remote.branch.as_deref().unwrap_or("HEAD");
    let refspec = format!("+{branch}:refs/tenet/fetched");
    git(
        dir,
        &[
            "-c",
            "http.lowSpeedLimit=1000",
            "-c",
            "http.lowSpeedTime=30",
            "fetch",
            "--quiet",
            "--no-tags",
            "--depth=1",
            "origin",
            &refspec,
        ],
    )
    .await
    .map_err(|e| format!("cannot fetch {}: {e}", remote.display()))
}

/// The commit `revision` names carries an SSH signature by a key of
/// `allowed_signers` (`git verify-commit` with that file as
/// `gpg.ssh.allowedSignersFile`; GPG and X.509 signatures never count).
/// Returns the full commit name, to check out exactly what was verified.
/// The error names the commit and why: not signed, signed otherwise than
/// with SSH, signed by a key the file does not hold, or a signature that
/// does not verify.
async fn verify_signed(
    dir: &Path,
    revision: &str,
    allowed_signers: &Path,
) -> Result<String, String> {
    let commit = git_stdout(
        dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{revision}^{{commit}}"),
        ],
    )
    .await?
    .trim()
    .to_string();
    let short = &commit[..commit.len().min(12)];
    let raw = git_stdout(dir, &["cat-file", "commit", &commit]).await?;
    let signature = raw
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.split_once(' ').filter(|(h, _)| h.starts_with("gpgsig")));
    let not = |why: String| {
        Err(format!(
            "commit {short} is not enforced: {why} (--require-signed-commits {})",
            allowed_signers.display()
        ))
    };
    match signature {
        None => return not("it is not signed".into()),
        Some((_, armour)) if armour.trim() != "-----BEGIN SSH SIGNATURE-----" => {
            return not("it is not signed with SSH (GPG and X.509 signatures do not count)".into());
        }
        Some(_) => {}
    }
    let setting = format!("gpg.ssh.allowedSignersFile={}", allowed_signers.display());
    let out = git_output(
        dir,
        &[
            "-c",
            &setting,
            "-c",
            "gpg.openpgp.program=false",
            "-c",
            "gpg.x509.program=false",
            "verify-commit",
            &commit,
        ],
    )
    .await?;
    if out.status.success() {
        return Ok(commit);
    }
    let said = String::from_utf8_lossy(&out.stderr);
    match said.split_whitespace().skip_while(|w| *w != "key").nth(1) {
        Some(key) if said.contains("No principal matched") => not(format!(
            "it is signed by key {key}, which is not an admin's"
        )),
        _ => not(format!(
            "its signature does not verify: {}",
            said.trim()
                .lines()
                .last()
                .unwrap_or("git verify-commit failed")
        )),
    }
}

/// Check out `revision` (what the last fetch brought, or the very commit
/// that was verified).
async fn check_out(dir: &Path, revision: &str) -> Result<(), String> {
    git(
        dir,
        &[
            "-c",
            "submodule.recurse=false",
            "checkout",
            "--quiet",
            "--force",
            "--detach",
            revision,
        ],
    )
    .await
    .map_err(|e| format!("cannot check out what was fetched: {e}"))
}

/// With `--require-signed-commits`, at start: a checkout left by an earlier
/// run whose commit does not verify now (the flag is new, or the allowed
/// signers changed) is removed, so that nothing unverified is read; the
/// first fetch brings the branch again.
pub async fn drop_unverified_checkout(dir: &Path, allowed_signers: &Path) {
    if !dir.join(".git").exists() {
        return;
    }
    if let Err(e) = verify_signed(dir, "HEAD", allowed_signers).await {
        tracing::warn!(checkout = %dir.display(), error = %e, "the policy checkout left by the last run is not verified; removed");
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::error!(checkout = %dir.display(), error = %e, "cannot remove the unverified policy checkout");
        }
    }
}

/// A git host's push notification: `POST /webhook` on the metrics
/// listener, its body signed with a secret shared with the host
/// (HMAC-SHA256 in `X-Hub-Signature-256: sha256=<hex>`, as GitHub, Gitea
/// and Forgejo send it). A verified one makes the next refresh fetch.
pub struct Webhook {
    pub secret: Vec<u8>,
    pub asked: Arc<AtomicBool>,
    pub wake: Arc<tokio::sync::Notify>,
}

/// The largest webhook body read; hosts send a few KiB.
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

impl Webhook {
    /// Whether `header` (the `X-Hub-Signature-256` value) is the HMAC of
    /// `body` under the secret (compared in constant time).
    pub fn verifies(&self, body: &[u8], header: &str) -> bool {
        let Some(hex_mac) = header.trim().strip_prefix("sha256=") else {
            return false;
        };
        let Ok(mac) = hex::decode(hex_mac) else {
            return false;
        };
        let Ok(mut h) = Hmac::<Sha256>::new_from_slice(&self.secret) else {
            return false;
        };
        h.update(body);
        h.verify_slice(&mac).is_ok()
    }

    /// Take a verified push: fetch on the next refresh, now.
    pub fn pushed(&self) {
        self.asked.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// Run `git -C dir ARGS` without a terminal to prompt on; its error output
/// is the error.
async fn git(dir: &Path, args: &[&str]) -> Result<(), String> {
    git_stdout(dir, args).await.map(drop)
}

/// [`git`], and what it printed on its standard output.
async fn git_stdout(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = git_output(dir, args).await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err
            .trim()
            .lines()
            .last()
            .unwrap_or("git failed")
            .to_string())
    }
}

/// How `git -C dir ARGS` ended, whatever it was.
async fn git_output(dir: &Path, args: &[&str]) -> Result<std::process::Output, String> {
    tokio::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        // ssh never asks (no terminal), and gives up on a silent host.
        .env(
            "GIT_SSH_COMMAND",
            "ssh -o BatchMode=yes -o ConnectTimeout=15",
        )
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run git: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_counts_only_with_the_hmac_of_its_body() {
        let hook = Webhook {
            secret: b"shared secret".to_vec(),
            asked: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(tokio::sync::Notify::new()),
        };
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mut h = Hmac::<Sha256>::new_from_slice(b"shared secret").expect("key");
        h.update(body);
        let good = format!("sha256={}", hex::encode(h.finalize().into_bytes()));
        assert!(hook.verifies(body, &good));
        assert!(!hook.verifies(br#"{"ref":"refs/heads/evil"}"#, &good));
        assert!(!hook.verifies(body, &good.replace("sha256=", "sha1=")));
        assert!(!hook.verifies(body, "sha256=zz"));
        assert!(!hook.verifies(body, ""));
    }

    #[test]
    fn what_people_see_of_a_remote_carries_no_credentials() {
        let remote = GitRemote {
            url: "https://deploy:s3cr3t@git.example/it/policies.git".into(),
            branch: Some("main".into()),
        };
        assert_eq!(
            remote.display(),
            "git+https://git.example/it/policies.git#main"
        );
    }

    #[test]
    fn remotes_are_git_plus_a_url_and_an_optional_branch() {
        assert_eq!(GitRemote::parse("policies/"), None);
        assert_eq!(
            GitRemote::parse("git+https://git.example/it/policies.git#main"),
            Some(Ok(GitRemote {
                url: "https://git.example/it/policies.git".into(),
                branch: Some("main".into()),
            }))
        );
        assert_eq!(
            GitRemote::parse("git+file:///srv/policies.git"),
            Some(Ok(GitRemote {
                url: "file:///srv/policies.git".into(),
                branch: None,
            }))
        );
        assert_eq!(
            GitRemote::parse("git+/srv/policies.git"),
            Some(Err("git+/srv/policies.git: the URL after git+ must start with one of file://, git://, http://, https://, ssh://".into()))
        );
        assert_eq!(
            GitRemote::parse("git+ssh://git.example/p.git#--upload-pack=x"),
            Some(Err("git+ssh://git.example/p.git#--upload-pack=x: \"--upload-pack=x\" is not a branch name".into()))
        );
    }
}

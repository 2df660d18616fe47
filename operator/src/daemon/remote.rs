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

    /// How people see it: `git+URL#BRANCH`.
    pub fn display(&self) -> String {
        match &self.branch {
            Some(b) => format!("git+{}#{b}", self.url),
            None => format!("git+{}", self.url),
        }
    }
}

/// The checkout of a remote and when it was last brought up to date.
pub struct Pull {
    remote: GitRemote,
    checkout: PathBuf,
    every: Duration,
    last: Option<Instant>,
    /// Set by a verified webhook: fetch on the next refresh.
    pub asked: Arc<AtomicBool>,
    /// The last fetch's failure, until one succeeds.
    pub failure: Option<String>,
}

impl Pull {
    pub fn new(remote: GitRemote, checkout: PathBuf, every: Duration) -> Pull {
        Pull {
            remote,
            checkout,
            every,
            last: None,
            asked: Arc::new(AtomicBool::new(false)),
            failure: None,
        }
    }

    /// Fetch the branch and check it out when `every` has passed since the
    /// last time, or a webhook asked. What is checked out changes only
    /// once the fetch succeeded.
    pub async fn sync(&mut self) {
        let asked = self.asked.swap(false, Ordering::Relaxed);
        if !asked && self.last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.last = Some(Instant::now());
        let failure = self.fetch_and_check_out().await.err();
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

    async fn fetch_and_check_out(&self) -> Result<(), String> {
        let dir = &self.checkout;
        if !dir.join(".git").exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            git(dir, &["init", "--quiet"]).await?;
            git(dir, &["remote", "add", "origin", &self.remote.url]).await?;
        } else {
            git(dir, &["remote", "set-url", "origin", &self.remote.url]).await?;
        }
        // Neither the URL (it starts with a scheme) nor the branch (checked
        // by `parse`) can pass for an option.
        let branch = self.remote.branch.as_deref().unwrap_or("HEAD");
        git(dir, &["fetch", "--quiet", "--no-tags", "origin", branch])
            .await
            .map_err(|e| format!("cannot fetch {}: {e}", self.remote.display()))?;
        git(
            dir,
            &["checkout", "--quiet", "--force", "--detach", "FETCH_HEAD"],
        )
        .await?;
        Ok(())
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
    let out = tokio::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(())
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

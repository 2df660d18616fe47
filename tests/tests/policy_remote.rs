//! GitOps from a remote: `tenet operator --policies git+git://...#main`
//! against a bare repository served by a real `git daemon` on loopback.
//! The operator enforces the branch's signed policies, fetches a new
//! commit when the host's signed webhook says so (and not for a forged
//! one), and when the remote is gone keeps what is in force and says why
//! in status.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tenet_e2e::{Running, binary, free_port, git, sign_policies, wait_until};
use tenet_protocol::{Algorithm, KeyPair};

/// POST `body` to the operator's webhook with `signature`; the status line.
fn post_webhook(port: u16, body: &str, signature: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    write!(
        s,
        "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Hub-Signature-256: {signature}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("response");
    answer.lines().next().unwrap_or_default().to_string()
}

/// What `tenet status` says of the operator whose data is `dir/data`.
fn status_of(dir: &Path) -> String {
    let out = Command::new(binary("tenet"))
        .args(["status", "--data", "data"])
        .current_dir(dir)
        .output()
        .expect("tenet status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The signature a git host puts on `body` with `secret`.
fn sign_webhook(secret: &[u8], body: &str) -> String {
    let mut h = Hmac::<Sha256>::new_from_slice(secret).expect("key");
    h.update(body.as_bytes());
    format!("sha256={}", hex::encode(h.finalize().into_bytes()))
}

const POLICY: &str = "apiVersion: tenet.dev/v1alpha1
kind: TerminalPolicy
metadata:
  name: browser-a-minimum
  namespace: hospital-it
spec:
  selector: { matchLabels: { site: nagoya } }
  requirements:
    - package: { name: browser-a, version: '>= 120.0' }
";

#[test]
fn the_operator_follows_a_remote_branch_and_keeps_what_is_in_force_when_it_is_gone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");

    // The admins' repository: one signed policy on main, pushed to a bare
    // repository that git daemon serves.
    let work = dir.join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    git(&work, &["init", "--quiet", "-b", "main"]);
    std::fs::write(work.join("browser.yaml"), POLICY).expect("policy");
    sign_policies(&work, &dir.join("admin.key"));
    git(&work, &["add", "."]);
    git(
        &work,
        &["commit", "--quiet", "-m", "browser-a 120 in Nagoya"],
    );
    let first = git(&work, &["rev-parse", "HEAD"]);
    git(dir, &["clone", "--quiet", "--bare", "work", "policies.git"]);
    git(&work, &["remote", "add", "origin", "../policies.git"]);

    // git-daemon itself, not `git daemon`, which would run it as a child
    // that outlives the stop below.
    let exec_path = git(dir, &["--exec-path"]);
    let git_port = free_port();
    let daemon = Running(
        Command::new(Path::new(&exec_path).join("git-daemon"))
            .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
            .arg(format!("--port={git_port}"))
            .arg(format!("--base-path={}", dir.display()))
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon"),
    );
    wait_until(Duration::from_secs(10), "git daemon listening", || {
        std::net::TcpStream::connect(("127.0.0.1", git_port)).is_ok()
    });

    // Pulls an hour apart: after the first, only a webhook fetches.
    std::fs::write(dir.join("webhook.secret"), "shared with the git host\n").expect("secret");
    let (port, metrics_port) = (free_port(), free_port());
    let _operator = Running(
        Command::new(binary("tenet"))
            .args(["operator", "--policies"])
            .arg(format!("git+git://127.0.0.1:{git_port}/policies.git#main"))
            .args([
                "--pull-seconds",
                "3600",
                "--webhook-secret-file",
                "webhook.secret",
            ])
            .args(["--data", "data", "--admin-key", "admin.key.pub"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("operator.log")).expect("log"))
            .spawn()
            .expect("operator"),
    );
    let status = || status_of(dir);
    let in_force = |text: &str| {
        text.lines()
            .any(|l| l.starts_with("hospital-it/browser-a-minimum "))
    };
    wait_until(
        Duration::from_secs(30),
        "the remote's first commit in force",
        || {
            let s = status();
            in_force(&s) && s.contains(&format!("policies at git commit {first}"))
        },
    );

    // A new signed commit on main, and the host's webhook: followed. A
    // forged webhook (another secret, or another body) is refused.
    std::fs::write(
        work.join("browser.yaml"),
        POLICY.replace(">= 120.0", ">= 121.0"),
    )
    .expect("edit");
    sign_policies(&work, &dir.join("admin.key"));
    // Whoever can push also commits a symbolic link to a signed policy
    // outside the repository: the operator reads only what the commit
    // holds (the link's text), never the file it points to.
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(
        outside.join("outside.yaml"),
        POLICY.replace("browser-a-minimum", "outside"),
    )
    .expect("outside policy");
    sign_policies(&outside, &dir.join("admin.key"));
    std::os::unix::fs::symlink(outside.join("outside.yaml"), work.join("evil.yaml"))
        .expect("symlink");
    git(&work, &["add", "."]);
    git(&work, &["commit", "--quiet", "-am", "browser-a 121"]);
    git(&work, &["push", "--quiet", "origin", "main"]);
    let second = git(&work, &["rev-parse", "HEAD"]);
    let body = r#"{"ref":"refs/heads/main"}"#;
    let secret = b"shared with the git host";
    assert_eq!(
        post_webhook(metrics_port, body, &sign_webhook(b"guessed", body)),
        "HTTP/1.1 401 Unauthorized"
    );
    assert_eq!(
        post_webhook(metrics_port, body, &sign_webhook(secret, "{}")),
        "HTTP/1.1 401 Unauthorized"
    );
    // A verified webhook is logged as it is taken, before its answer: the
    // forged ones were not.
    let log = std::fs::read_to_string(dir.join("operator.log")).expect("log");
    assert!(!log.contains("webhook: the policy branch changed"), "{log}");
    assert_eq!(
        post_webhook(metrics_port, body, &sign_webhook(secret, body)),
        "HTTP/1.1 204 No Content"
    );
    let log = std::fs::read_to_string(dir.join("operator.log")).expect("log");
    assert!(log.contains("webhook: the policy branch changed"), "{log}");
    wait_until(
        Duration::from_secs(30),
        "the second commit in force",
        || status().contains(&format!("policies at git commit {second}")),
    );
    let s = status();
    assert!(!s.contains("hospital-it/outside"), "{s}");
    assert!(
        s.contains("evil.yaml:1:1: kind: a document must be a mapping with apiVersion, kind, metadata and spec"),
        "{s}"
    );

    // The remote goes away: what is in force stays, and status says why.
    drop(daemon);
    assert_eq!(
        post_webhook(metrics_port, body, &sign_webhook(secret, body)),
        "HTTP/1.1 204 No Content"
    );
    wait_until(
        Duration::from_secs(30),
        "the failed fetch in status",
        || {
            status().contains(&format!(
            "policy error (the last good version stays in force): cannot fetch git+git://127.0.0.1:{git_port}/policies.git#main: "
        ))
        },
    );
    let s = status();
    assert!(in_force(&s), "{s}");
    assert!(
        s.contains(&format!("policies at git commit {second}")),
        "{s}"
    );
}

/// Make an SSH key pair with ssh-keygen, as an admin has for git.
fn ssh_key(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .output()
        .expect("ssh-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// Commit everything in `work` signed with the SSH key `key` (`None`:
/// unsigned), push it, and return the commit's short name (12 digits).
fn commit(work: &Path, message: &str, key: Option<&Path>) -> String {
    git(work, &["add", "."]);
    match key {
        Some(key) => {
            let signing_key = format!("user.signingkey={}", key.display());
            git(
                work,
                &[
                    "-c",
                    "gpg.format=ssh",
                    "-c",
                    &signing_key,
                    "commit",
                    "--quiet",
                    "-S",
                    "-m",
                    message,
                ],
            )
        }
        None => git(work, &["commit", "--quiet", "-m", message]),
    };
    git(work, &["push", "--quiet", "origin", "main"]);
    git(work, &["rev-parse", "--short=12", "HEAD"])
}

#[test]
fn with_require_signed_commits_only_commits_an_admin_signed_are_enforced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    // Alice signs commits with her SSH key; Mallory can push, but her key
    // is not an admin's.
    let alice = ssh_key(dir, "alice");
    let mallory = ssh_key(dir, "mallory");
    let alice_pub = std::fs::read_to_string(dir.join("alice.pub")).expect("alice.pub");
    std::fs::write(
        dir.join("allowed_signers"),
        format!("# the admins\nalice@hospital.example {alice_pub}"),
    )
    .expect("allowed signers");

    let work = dir.join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    git(&work, &["init", "--quiet", "-b", "main"]);
    git(
        dir,
        &["init", "--quiet", "--bare", "-b", "main", "policies.git"],
    );
    git(&work, &["remote", "add", "origin", "../policies.git"]);
    std::fs::write(work.join("browser.yaml"), POLICY).expect("policy");
    sign_policies(&work, &dir.join("admin.key"));
    let first = commit(&work, "browser-a 120, signed by alice", Some(&alice));

    let port = free_port();
    let _operator = Running(
        Command::new(binary("tenet"))
            .args(["operator", "--policies"])
            .arg(format!("git+file://{}/policies.git#main", dir.display()))
            .args(["--pull-seconds", "1"])
            .args(["--require-signed-commits", "allowed_signers"])
            .args(["--data", "data", "--admin-key", "admin.key.pub"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--metrics", "127.0.0.1:0"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("operator.log")).expect("log"))
            .spawn()
            .expect("operator"),
    );
    let status = || status_of(dir);
    wait_until(Duration::from_secs(30), "alice's commit in force", || {
        let s = status();
        s.contains("hospital-it/browser-a-minimum ")
            && s.contains(&format!("policies at git commit {first}"))
    });

    // An unsigned commit, even with approved policies, is not enforced.
    std::fs::write(
        work.join("browser.yaml"),
        POLICY.replace(">= 120.0", ">= 121.0"),
    )
    .expect("edit");
    sign_policies(&work, &dir.join("admin.key"));
    let unsigned = commit(&work, "browser-a 121, unsigned", None);
    let signers = std::fs::canonicalize(dir.join("allowed_signers")).expect("path");
    wait_until(
        Duration::from_secs(30),
        "the unsigned commit refused",
        || {
            status().contains(&format!(
            "policy error (the last good version stays in force): commit {unsigned} is not enforced: it is not signed (--require-signed-commits {})",
            signers.display()
        ))
        },
    );
    assert!(status().contains(&format!("policies at git commit {first}")));

    // Signed by a key that is not an admin's: not enforced either.
    std::fs::write(work.join("note.txt"), "mallory was here\n").expect("edit");
    let forged = commit(&work, "browser-a 121, signed by mallory", Some(&mallory));
    let mallory_fp = Command::new("ssh-keygen")
        .args(["-l", "-f"])
        .arg(dir.join("mallory.pub"))
        .output()
        .expect("ssh-keygen -l");
    let mallory_fp = String::from_utf8_lossy(&mallory_fp.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string();
    wait_until(Duration::from_secs(30), "mallory's commit refused", || {
        status().contains(&format!(
            "commit {forged} is not enforced: it is signed by key {mallory_fp}, which is not an admin's (--require-signed-commits {})",
            signers.display()
        ))
    });
    let s = status();
    assert!(
        s.contains(&format!("policies at git commit {first}")),
        "{s}"
    );

    // A commit carrying a GPG signature: only SSH signatures count (git
    // would check a GPG one against the operator's keyring instead).
    let tree = git(&work, &["rev-parse", "HEAD^{tree}"]);
    let parent = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(
        dir.join("pgp-commit"),
        format!(
            "tree {tree}\nparent {parent}\nauthor Mallory <m@x> 1790000000 +0000\ncommitter Mallory <m@x> 1790000000 +0000\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n iQEzBAABCAAdFiEE\n -----END PGP SIGNATURE-----\n\nsigned with gpg\n"
        ),
    )
    .expect("commit object");
    let pgp = git(
        &work,
        &["hash-object", "-t", "commit", "-w", "../pgp-commit"],
    );
    git(&work, &["update-ref", "refs/heads/main", &pgp]);
    git(&work, &["push", "--quiet", "origin", "main"]);
    wait_until(
        Duration::from_secs(30),
        "the GPG-signed commit refused",
        || {
            status().contains(&format!(
            "commit {} is not enforced: it is not signed with SSH (GPG and X.509 signatures do not count)",
            &pgp[..12]
        ))
        },
    );

    // Alice signs the next commit: it is enforced.
    std::fs::remove_file(work.join("note.txt")).expect("rm");
    let signed = commit(&work, "browser-a 121, signed by alice", Some(&alice));
    wait_until(
        Duration::from_secs(30),
        "alice's second commit in force",
        || status().contains(&format!("policies at git commit {signed}")),
    );
    let s = status();
    assert!(!s.contains("is not enforced"), "{s}");
}

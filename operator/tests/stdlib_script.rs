//! The standard library's script (`stdlib/tenet-std.sh`) run by the real
//! `sh` on a terminal root, as the agent runs it: the file steps write
//! and remove beneath the root and nowhere else, and what the grammar
//! does not allow is refused before anything is done.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../stdlib/tenet-std.sh")
}

/// `sh tenet-std.sh STEPS...` in the payload's directory `work`, on `root`.
fn run(work: &Path, root: &Path, steps: &[&str]) -> Output {
    Command::new("sh")
        .arg(script())
        .args(steps)
        .env("TENET_ROOT", root)
        .current_dir(work)
        .output()
        .expect("sh runs")
}

fn last_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn file_steps_write_and_remove_beneath_the_root_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (work, root, outside) = (
        tmp.path().join("work"),
        tmp.path().join("root"),
        tmp.path().join("outside"),
    );
    for d in [&work, &root, &outside] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(work.join("motd"), "welcome\n").expect("artifact");
    let digest = hex::encode(tenet_protocol::wire::sha256(b"welcome\n"));
    let write = format!("file /etc/motd {digest}");

    let out = run(&work, &root, &[&write]);
    assert!(out.status.success(), "{}", last_line(&out));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/motd")).expect("written"),
        "welcome\n"
    );
    // Again: nothing to do.
    let out = run(&work, &root, &[&write]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/etc/motd: already has its content\n"
    );

    // A directory on the way that is a link out of the root.
    std::os::unix::fs::symlink(&outside, root.join("evil")).expect("link");
    let out = run(&work, &root, &[&format!("file /evil/motd {digest}")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        last_line(&out),
        format!(
            "/evil/motd: {}/evil is a symbolic link; not followed",
            root.display()
        )
    );
    let out = run(&work, &root, &["file-absent /evil/motd"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 0);

    // A directory others may write in: they could swap the file for a link.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("etc"), std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    let out = run(&work, &root, &["file-absent /etc/motd"]);
    assert_eq!(
        last_line(&out),
        format!("/etc/motd: {}/etc is writable by others", root.display())
    );
    std::fs::set_permissions(root.join("etc"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let out = run(&work, &root, &["file-absent /etc/motd"]);
    assert!(out.status.success(), "{}", last_line(&out));
    assert!(!root.join("etc/motd").exists());

    // Content the bundle does not carry.
    let out = run(&work, &root, &[&format!("file /etc/x {}", "0".repeat(64))]);
    assert_eq!(
        last_line(&out),
        "the bundle carries no file with the SHA-256 /etc/x must have"
    );
}

#[test]
fn what_the_grammar_does_not_allow_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("root/etc")).expect("mkdir");
    std::fs::write(tmp.path().join("root/etc/keep"), "x").expect("file");
    for step in [
        "purge a$(touch /tmp/pwned)",
        "purge  jq",
        "file-absent /etc/keep;",
        "reboot now",
        "file-absent /etc/*",
    ] {
        // A valid step first: nothing runs when any step is refused.
        let out = run(
            tmp.path(),
            &tmp.path().join("root"),
            &["file-absent /etc/keep", step],
        );
        assert_eq!(out.status.code(), Some(1), "{step}");
        assert_eq!(
            last_line(&out),
            format!("not a standard library step: {step}")
        );
        assert!(tmp.path().join("root/etc/keep").exists(), "{step}");
    }
}

//! A real Debian terminal: a bookworm root made by debootstrap from
//! Debian's packages (`scripts/debian-root`, cached), a real agent on it
//! reporting its real dpkg database, and Debian's own jq with the
//! libraries it needs. A bundle that lacks one of them fails: dpkg could
//! not configure jq, the installer takes it back out, `dpkg --audit` is
//! clean and status says Failed with the reason, never Compliant. The
//! admins then build a bundle with the whole closure (`tenet payload build
//! --apt jq --target ROOT`, apt from the root's own sources), sign it and
//! approve the policy again: jq is installed, `dpkg --audit` is clean and
//! status says Compliant, as dpkg does. Then a real upgrade path Debian
//! published (bookworm's jq to bookworm-security's), a purge, and a service
//! started (its state recorded in the root, where no service manager
//! runs); after each, dpkg and status agree and `dpkg --audit` is clean.
//!
//! Every policy says only what must hold (`remediation: {auto: {}}`):
//! Tenet computes the standard library's steps, and `tenet policy sign
//! --bundles` names the standard-library bundle that carries them out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tenet_e2e::{
    agent, audit, binary, dpkg_query, free_port, nagoya_agent, next_line, start_operator,
    wait_until,
};
use tenet_protocol::{Algorithm, KeyPair};

/// The cached root and Debian's jq (`scripts/debian-root`), or `None`
/// (skipped) outside CI when they were never made.
fn debian() -> Option<(PathBuf, Vec<PathBuf>)> {
    let cache = tenet_e2e::debian_cache()?;
    Some((
        cache.join("bookworm"),
        tenet_e2e::debs_in(&cache.join("debs")),
    ))
}

/// The policy `name` requiring `requirement` (YAML) of the Nagoya
/// terminal, remediated automatically; approved by the admin, the
/// approval naming a bundle of `bundles/`. What `tenet policy sign` said.
fn write_policy(dir: &Path, name: &str, requirement: &str) -> String {
    let file = format!("policies/{name}.yaml");
    std::fs::write(
        dir.join(&file),
        format!(
            "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: {name}\n  namespace: hospital-it\nspec:\n  selector: {{ matchLabels: {{ site: nagoya }} }}\n  requirements:\n    - {requirement}\n  remediation:\n    auto: {{}}\n    maxAttempts: 1\n"
        ),
    )
    .expect("policy");
    approve(dir, name)
}

/// The admin signs policy `name` again, against the bundles there now.
fn approve(dir: &Path, name: &str) -> String {
    tenet_ok(
        dir,
        &[
            "policy",
            "sign",
            &format!("policies/{name}.yaml"),
            "--key",
            "admin.key",
            "--bundles",
            "bundles",
        ],
    )
}

/// `tenet CLI-ARGS` in `dir`, which must succeed; its standard output.
fn tenet_ok(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(binary("tenet"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("tenet");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tenet {args:?}: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

/// Sign `file` as the admin and put it in the operator's bundles.
fn ship(dir: &Path, file: &str) {
    tenet_ok(dir, &["payload", "sign", file, "--key", "admin.key"]);
    std::fs::copy(dir.join(file), dir.join("bundles").join(file)).expect("bundle");
}

/// `tenet payload build --std EXTRA...`, signed and shipped as `name`.
fn build_std(dir: &Path, name: &str, extra: &[&str]) -> String {
    let file = format!("{name}.bundle");
    let mut args = vec!["payload", "build", "--std", "--name", name, "--out", &file];
    args.extend(extra);
    let said = tenet_ok(dir, &args);
    ship(dir, &file);
    said
}

/// `tenet payload build --apt SPEC --target root`, signed and shipped as
/// `name`: the .debs it carries.
fn build_apt(dir: &Path, spec: &str, name: &str) -> Vec<String> {
    let said = build_std(dir, name, &["--apt", spec, "--target", "root"]);
    said.lines()
        .find_map(|l| l.strip_prefix("carries "))
        .unwrap_or_else(|| panic!("no .debs in {said}"))
        .split(' ')
        .map(str::to_string)
        .collect()
}

#[test]
fn a_debootstrapped_debian_terminal_installs_upgrades_purges_and_starts_a_service() {
    let Some((cached, debs)) = debian() else {
        return;
    };
    let jq = debs
        .iter()
        .find(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("jq_"))
        })
        .expect("jq's .deb");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // The terminal: a copy of the cached root.
    let root = dir.join("root");
    tenet_e2e::copy_root(&cached, &root);
    assert_eq!(dpkg_query(&root, "${db:Status-Abbrev}", "jq"), "");
    assert_eq!(audit(&root), "", "the debootstrapped root is consistent");

    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    std::fs::create_dir_all(dir.join("bundles")).expect("mkdir");
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");

    // First the admins approve a bundle of jq alone: its libraries are not
    // on a minbase root.
    build_std(dir, "jq-alone", &["--artifact", jq.to_str().expect("path")]);
    let said = write_policy(dir, "jq", "package: { name: jq, version: '>= 1.6' }");
    assert!(
        said.contains("its auto remediation runs bundle jq-alone"),
        "{said}"
    );

    let port = free_port();
    let (_operator, lines) = start_operator(dir, port);
    next_line(&lines, "gateway listening on");
    let _agent = nagoya_agent(dir, port);
    let tenet = |args: &[&str]| {
        let out = Command::new(binary("tenet"))
            .args(args)
            .current_dir(dir)
            .output()
            .expect("tenet");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The jq policy's generation, and whether its one terminal complies
    // with it (the summary line of `tenet status`).
    let generation = || {
        tenet(&["status", "--data", "data"])
            .lines()
            .find(|l| l.starts_with("hospital-it/jq "))
            .map(|l| {
                let c: Vec<&str> = l.split_whitespace().collect();
                (
                    c.get(1).and_then(|g| g.parse::<u64>().ok()).unwrap_or(0),
                    c.get(2) == Some(&"1/1"),
                )
            })
            .unwrap_or((0, false))
    };
    let jq_line = || {
        tenet(&["status", "--data", "data", "terminal", "nagoya-ward3-01"])
            .lines()
            .find(|l| l.contains("hospital-it/jq"))
            .map(str::to_string)
            .unwrap_or_default()
    };
    wait_until(
        Duration::from_secs(90),
        "the incomplete bundle to fail",
        || jq_line().starts_with("  Failed"),
    );
    let line = jq_line();
    assert!(
        line.contains("dpkg could not install every package (dpkg: dependency problems prevent configuration of jq:); taken out again, not installed before: jq"),
        "{line}"
    );
    // dpkg is left as it was: no jq, nothing half-configured.
    assert_eq!(dpkg_query(&root, "${db:Status-Abbrev}", "jq"), "");
    assert_eq!(audit(&root), "");

    // The admins build the bundle with the closure apt resolves for a
    // root like the terminal's (its sources, archive keys and installed
    // packages; a scratch apt state), sign it and approve the policy: one
    // dpkg run installs jq, libjq1 and libonig5 in dependency order.
    let unknown = Command::new(binary("tenet"))
        .args([
            "payload",
            "build",
            "--apt",
            "jq-does-not-exist",
            "--target",
            "root",
        ])
        .args(["--name", "x", "--out", "x.bundle"])
        .current_dir(dir)
        .output()
        .expect("tenet payload build");
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr),
        "tenet: apt cannot resolve jq-does-not-exist: E: Unable to locate package jq-does-not-exist\n"
    );
    assert!(!dir.join("x.bundle").exists());
    let shipped = build_apt(dir, "jq", "install-jq");
    // At least jq and the two libraries a minbase root lacks.
    for package in ["jq_", "libjq1_", "libonig5_"] {
        assert!(
            shipped.iter().any(|d| d.starts_with(package)),
            "{shipped:?}"
        );
    }
    // The incomplete bundle is withdrawn; signed again, the approval names
    // the whole closure (the spec is the same: a new generation all the
    // same, so the terminal where the old bundle failed is tried again).
    std::fs::remove_file(dir.join("bundles/jq-alone.bundle")).expect("withdrawn");
    let said = approve(dir, "jq");
    assert!(
        said.contains("its auto remediation runs bundle install-jq"),
        "{said}"
    );
    wait_until(
        Duration::from_secs(90),
        "jq installed through the loop",
        || jq_line() == "  Compliant   hospital-it/jq",
    );
    // Status says what dpkg says.
    assert_eq!(dpkg_query(&root, "${db:Status-Abbrev}", "jq"), "ii");
    for lib in ["libjq1", "libonig5"] {
        assert_eq!(dpkg_query(&root, "${db:Status-Abbrev}", lib), "ii", "{lib}");
    }
    assert_eq!(audit(&root), "");
    let version = dpkg_query(&root, "${Version}", "jq");
    let inventory =
        String::from_utf8_lossy(&agent(dir, &["inventory", "--config", "agent.yaml"]).stdout)
            .into_owned();
    assert!(
        inventory.contains(&format!(
            "- name: jq\n  version: {version}\n  manager: dpkg\n  state: installed\n"
        )),
        "{inventory}"
    );
    // A real upgrade path between two versions Debian published: the
    // terminal also follows bookworm-security, and the admins require its
    // jq. The closure is the newer jq and its libjq1 (libonig5 is there).
    // Its entry names its key by path, a keyring only the terminal has:
    // apt reads it under the target, not on the admins' machine.
    std::fs::copy(
        root.join("usr/share/keyrings/debian-archive-keyring.gpg"),
        root.join("usr/share/keyrings/tenet-e2e-terminal-only.gpg"),
    )
    .expect("keyring");
    assert!(!Path::new("/usr/share/keyrings/tenet-e2e-terminal-only.gpg").exists());
    std::fs::write(
        root.join("etc/apt/sources.list.d/security.list"),
        "deb [signed-by=/usr/share/keyrings/tenet-e2e-terminal-only.gpg] http://deb.debian.org/debian-security bookworm-security main\n",
    )
    .expect("sources");
    let security = "1.6-2.1+deb12u3";
    let shipped = build_apt(dir, &format!("jq={security}"), "upgrade-jq");
    assert!(
        !shipped.iter().any(|d| d.starts_with("libonig5_")),
        "only what the terminal lacks: {shipped:?}"
    );
    let (before, _) = generation();
    let said = write_policy(
        dir,
        "jq",
        &format!("package: {{ name: jq, version: '>= {security}' }}"),
    );
    // bookworm's jq does not satisfy it: the newer bundle is named.
    assert!(
        said.contains("its auto remediation runs bundle upgrade-jq"),
        "{said}"
    );
    // Compliant with the new generation: judged on an inventory after it.
    wait_until(
        Duration::from_secs(90),
        "jq upgraded through the loop",
        || generation() == (before + 1, true),
    );
    assert_eq!(dpkg_query(&root, "${Version}", "jq"), security);
    assert_eq!(dpkg_query(&root, "${db:Status-Abbrev}", "jq"), "ii");
    assert_eq!(dpkg_query(&root, "${Version}", "libjq1"), security);
    assert_eq!(audit(&root), "");

    // Then jq must be absent: the standard library purges it, from the
    // bundle that ships nothing more than its scripts.
    build_std(dir, "tenet-std", &[]);
    let (before, _) = generation();
    let said = write_policy(dir, "jq", "package: { name: jq, absent: true }");
    assert!(
        said.contains("its auto remediation runs bundle tenet-std"),
        "{said}"
    );
    wait_until(
        Duration::from_secs(90),
        "jq purged through the loop",
        || generation() == (before + 1, true),
    );
    assert_eq!(dpkg_query(&root, "${db:Status-Abbrev}", "jq"), "");
    assert_eq!(audit(&root), "");

    // A service started: no service manager runs in the root, so the
    // standard library records its state where the agent reads it.
    write_policy(
        dir,
        "cron-running",
        "service: { name: cron, state: running, enabled: true }",
    );
    wait_until(
        Duration::from_secs(90),
        "cron started through the loop",
        || {
            tenet(&["status", "--data", "data", "terminal", "nagoya-ward3-01"])
                .contains("  Compliant   hospital-it/cron-running")
        },
    );
    assert_eq!(
        std::fs::read_to_string(root.join("var/lib/tenet/services/cron")).expect("state"),
        "running enabled\n"
    );
    assert_eq!(audit(&root), "");
}

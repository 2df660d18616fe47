//! The agent upgrades itself through an ordinary policy, on a real Debian
//! root (debootstrapped bookworm) with its real package
//! (`scripts/agent-deb`) installed by dpkg.
//!
//! The agent runs the packaged binary, `ROOT/usr/bin/tenet-agent`, against
//! a real operator. A policy asks for `tenet-agent >= 0.2.0+1`: the
//! payload installs that package, which replaces the running binary; the
//! agent proves the new one (`tenet-agent probe`), then executes it in its
//! own process (the same PID, now running the new file), and the new agent
//! sends the report: Compliant. Then a policy asks for `0.2.0+2`, a package
//! whose binary never reaches the operator: after the deadline the
//! previous binary is back at its path, byte for byte, the agent that ran
//! before goes on in the same process and stays connected, and the status
//! says why the terminal is not compliant: the report says it rolled the
//! agent back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tenet_e2e::{
    Running, binary, create_token, dpkg_query, free_port, install_bundle_named, next_line,
    sign_policies, start_operator, wait_until,
};
use tenet_protocol::wire::digest_string;
use tenet_protocol::{Algorithm, KeyPair, SignedMessage};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn dpkg_install(root: &Path, debs: &[PathBuf]) {
    let out = Command::new("dpkg")
        .env("LC_ALL", "C")
        .arg(format!("--root={}", root.display()))
        .args(["--log=/dev/null", "-i"])
        .args(debs)
        .output()
        .expect("dpkg");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The agent's package at `version`, from the binary the tests run.
fn agent_deb(dir: &Path, version: &str) -> PathBuf {
    let out = Command::new(workspace().join("scripts/agent-deb"))
        .arg("--binary")
        .arg(binary("tenet-agent"))
        .args(["--out"])
        .arg(dir)
        .args(["--version", version])
        .output()
        .expect("scripts/agent-deb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The bytes the upgrade's binary ends with: an ELF file runs the same
/// with bytes after its end, and the process that runs it can be told
/// from one running the first package's.
const UPGRADE_MARK: &[u8] = b"\ntenet-test: the upgraded agent\n";

/// `deb` with [`UPGRADE_MARK`] after its binary (its md5sums mended).
fn marked(deb: &Path) -> PathBuf {
    let tree = deb.with_extension("tree");
    let run = |c: &mut Command| {
        let out = c.output().expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let bin = tree.join("usr/bin/tenet-agent");
    let mut bytes = std::fs::read(&bin).expect("binary");
    bytes.extend_from_slice(UPGRADE_MARK);
    std::fs::write(&bin, &bytes).expect("binary");
    run(Command::new("sh").arg("-c").arg(
        "cd \"$0\" && find . -type f ! -path './DEBIAN/*' -printf '%P\\0' | sort -z | xargs -0 md5sum > DEBIAN/md5sums",
    ).arg(&tree));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "-b"])
        .arg(&tree)
        .arg(deb));
    deb.to_path_buf()
}

/// A `tenet-agent` package whose binary starts and never reaches anyone.
fn hanging_deb(dir: &Path, version: &str) -> PathBuf {
    let tree = dir.join("hanging");
    std::fs::create_dir_all(tree.join("DEBIAN")).expect("mkdir");
    std::fs::create_dir_all(tree.join("usr/bin")).expect("mkdir");
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!("Package: tenet-agent\nVersion: {version}\nArchitecture: all\nMaintainer: Tenet Tests <tests@tenet.invalid>\nDescription: an agent that never connects\n"),
    )
    .expect("control");
    let bin = tree.join("usr/bin/tenet-agent");
    std::fs::write(&bin, "#!/bin/sh\nexec sleep 600\n").expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let deb = dir.join(format!("tenet-agent_{version}_all.deb"));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&tree)
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    deb
}

fn write_policy(dir: &Path, version: &str, rollout: &str, bundle: &SignedMessage, deb: &Path) {
    let name = deb.file_name().expect("name").to_string_lossy();
    std::fs::write(
        dir.join("policies/agent.yaml"),
        format!(
            "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: tenet-agent\n  namespace: hospital-it\nspec:\n  selector: {{ matchLabels: {{ site: nagoya }} }}\n  requirements:\n    - package: {{ name: tenet-agent, version: '>= {version}' }}\n  remediation:\n    payload: {{ name: install-tenet-agent, digest: '{}' }}\n    args: ['{name}']\n    capabilities: [run-artifact, log]\n{rollout}",
            digest_string(&bundle.body_digest())
        ),
    )
    .expect("policy");
    std::fs::write(
        dir.join("bundles/install-tenet-agent.bundle"),
        bundle.encode(),
    )
    .expect("bundle");
    sign_policies(&dir.join("policies"), &dir.join("admin.key"));
}

fn status(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(binary("tenet"))
        .args(["status", "--data", "data"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("tenet status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the process `pid` runs, as the kernel says.
fn running_file(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// A terminal of the Nagoya site in `dir/NAME`: a copy of the Debian root
/// with the agent's package `first` installed, its agent (the packaged
/// binary) enrolled with the operator on `port` and running.
struct Terminal {
    name: String,
    home: PathBuf,
    root: PathBuf,
    agent: Running,
}

impl Terminal {
    fn start(dir: &Path, cache: &Path, name: &str, first: &Path, port: u16) -> Terminal {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).expect("mkdir");
        let root = home.join("root");
        tenet_e2e::copy_root(&cache.join("bookworm"), &root);
        let mut debs = tenet_e2e::debs_in(&cache.join("agent-deps"));
        debs.push(first.to_path_buf());
        dpkg_install(&root, &debs);
        let (token, fingerprint) =
            create_token(dir, &["--terminal", name, "--label", "site=nagoya"]);
        std::fs::write(
            home.join("agent.yaml"),
            format!(
                "terminal: {name}\ndata: agent-data\nroot: root\ninventory:\n  dpkg: {{}}\noperator: {{ address: \"127.0.0.1:{port}\" }}\ninventoryIntervalSeconds: 1\nselfUpdate: {{ deadlineSeconds: 5 }}\n"
            ),
        )
        .expect("config");
        let bin = root.join("usr/bin/tenet-agent");
        wait_until(Duration::from_secs(30), "the agent to enrol", || {
            Command::new(&bin)
                .args(["enrol", "--config", "agent.yaml", "--token", &token])
                .args(["--ca-fingerprint", &fingerprint])
                .current_dir(&home)
                .output()
                .is_ok_and(|o| o.status.success())
        });
        let agent = Running(
            Command::new(&bin)
                .args(["run", "--config", "agent.yaml"])
                .current_dir(&home)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(home.join("agent.log")).expect("log"))
                .spawn()
                .expect("the packaged agent"),
        );
        let t = Terminal {
            name: name.into(),
            home,
            root,
            agent,
        };
        wait_until(Duration::from_secs(30), "the agent to be welcomed", || {
            t.log().contains("the operator welcomed this agent")
        });
        t
    }

    fn bin(&self) -> PathBuf {
        self.root.join("usr/bin/tenet-agent")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("agent.log")).unwrap_or_default()
    }

    fn package(&self) -> String {
        dpkg_query(&self.root, "${db:Status-Abbrev} ${Version}", "tenet-agent")
    }

    fn pid(&self) -> u32 {
        self.agent.0.id()
    }
}

#[test]
fn the_agent_upgrades_itself_and_rolls_back_a_binary_that_cannot_connect() {
    let Some(cache) = tenet_e2e::debian_cache() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for d in ["policies", "bundles", "debs"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    let this = env!("CARGO_PKG_VERSION");
    let first = agent_deb(&dir.join("debs"), this);
    let upgrade = marked(&agent_deb(&dir.join("debs"), &format!("{this}+1")));
    let hanging = hanging_deb(&dir.join("debs"), &format!("{this}+2"));
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    let port = free_port();
    let (_operator, lines) = start_operator(dir, port);
    next_line(&lines, "gateway listening on");
    // Two terminals with the agent's package installed, as `apt install`
    // puts it, each running the packaged binary.
    let mut terminals = [
        Terminal::start(dir, &cache, "ward-01", &first, port),
        Terminal::start(dir, &cache, "ward-02", &first, port),
    ];
    for t in &terminals {
        assert_eq!(running_file(t.pid()), t.bin().display().to_string());
    }

    // The upgrade: installed by a payload, proven, handed over.
    write_policy(
        dir,
        &format!("{this}+1"),
        "",
        &install_bundle_named(&admin, &upgrade, "install-tenet-agent"),
        &upgrade,
    );
    for t in &terminals {
        wait_until(
            Duration::from_secs(90),
            "the upgrade to be compliant",
            || status(dir, &["terminal", &t.name]).contains("Compliant   hospital-it/tenet-agent"),
        );
        assert_eq!(t.package(), format!("ii  {this}+1"));
        let log = t.log();
        assert!(
            log.contains("the agent's binary was replaced: proving the new one"),
            "{log}"
        );
        assert!(log.contains("handing over to the new agent"), "{log}");
        // The same process runs the new file (had it kept running the
        // old one, the kernel would say "(deleted)"), the upgrade's.
        assert_eq!(running_file(t.pid()), t.bin().display().to_string());
        let running = std::fs::read(format!("/proc/{}/exe", t.pid())).expect("its binary");
        assert!(running.ends_with(UPGRADE_MARK), "the upgraded binary runs");
        assert!(!t.home.join("agent-data/rolled-back").exists());
    }
    let upgraded = std::fs::read(terminals[0].bin()).expect("the binary");

    // A package whose binary never reaches the operator, rolled out with a
    // canary of one and no retry: the canary rolls it back, and the
    // rollout halts.
    write_policy(
        dir,
        &format!("{this}+2"),
        "    maxAttempts: 1\n  rollout: { canary: 1 }\n",
        &install_bundle_named(&admin, &hanging, "install-tenet-agent"),
        &hanging,
    );
    let start = std::time::Instant::now();
    loop {
        let summary = status(dir, &[]);
        if summary.contains("held: rollout halted: 1 of the 1 canary remediations failed") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the rollout to halt within 90 s:\n{summary}\n{}\n{}",
            status(dir, &["terminal", "ward-01"]),
            status(dir, &["terminal", "ward-02"])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (canary, other) = if terminals[0].package().ends_with("+2") {
        (&terminals[0], &terminals[1])
    } else {
        (&terminals[1], &terminals[0])
    };
    let shown = status(dir, &["terminal", &canary.name]);
    let bin = canary.bin().display().to_string();
    assert!(
        shown.contains(&format!(
            "the terminal rolled its agent back: the new agent ({bin}) did not reach the operator within 5 s; the previous agent ({this}) runs again"
        )),
        "{shown}"
    );
    assert!(
        !shown.contains("Compliant   hospital-it/tenet-agent"),
        "{shown}"
    );
    assert!(
        shown.starts_with(&format!("{}: connected", canary.name)),
        "{shown}"
    );
    // The package database names the new version; the binary at its path
    // is the previous one, byte for byte; the same process goes on with
    // it (the file it runs was replaced at the path, hence "(deleted)").
    assert_eq!(canary.package(), format!("ii  {this}+2"));
    assert!(
        std::fs::read(canary.bin()).expect("the binary") == upgraded,
        "the previous binary is back"
    );
    assert_eq!(running_file(canary.pid()), format!("{bin} (deleted)"));
    let running = std::fs::read(format!("/proc/{}/exe", canary.pid())).expect("its binary");
    assert!(
        running.ends_with(UPGRADE_MARK),
        "the upgraded binary runs on"
    );
    assert!(
        !canary.home.join("agent-data/handover/state").exists(),
        "the handover ended"
    );
    assert!(
        std::fs::read(canary.home.join("agent-data/agent-previous")).expect("kept") == upgraded
    );
    assert!(canary.log().contains("self-update rolled back"));
    // The inventory flags the version rolled back: it never counts as
    // installed, so the requirement stays unmet.
    let inventory = Command::new(canary.bin())
        .args(["inventory", "--config", "agent.yaml"])
        .current_dir(&canary.home)
        .output()
        .expect("inventory");
    let inventory = String::from_utf8_lossy(&inventory.stdout);
    assert!(
        inventory.contains("rolled back to the previous agent"),
        "{inventory}"
    );
    // A crash while a binary that does not even start was on probation:
    // the binary kept before it ends the handover before the agent starts
    // again (the unit's ExecStartPre), and puts itself back.
    // The halted rollout never reached the other terminal.
    assert_eq!(other.package(), format!("ii  {this}+1"));
    assert!(!other.log().contains("self-update rolled back"));
    let canary = if std::ptr::eq(canary, &terminals[0]) {
        0
    } else {
        1
    };
    let t = &mut terminals[canary];
    let _ = t.agent.0.kill();
    let _ = t.agent.0.wait();
    let (home, root) = (&t.home, &t.root);
    std::fs::copy(
        dir.join("debs/hanging/usr/bin/tenet-agent"),
        root.join("usr/bin/tenet-agent"),
    )
    .expect("a binary that never connects");
    std::fs::create_dir_all(home.join("agent-data/handover")).expect("mkdir");
    tenet_agent::self_update::write_state(
        &home.join("agent-data"),
        &tenet_agent::self_update::Handover::Proving { since_ms: 1 },
    )
    .expect("state");
    let resumed = Command::new(home.join("agent-data/agent-previous"))
        .args(["resume-handover", "--config", "agent.yaml", "--exe"])
        .arg(root.join("usr/bin/tenet-agent"))
        .current_dir(home)
        .output()
        .expect("resume-handover");
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&resumed.stdout),
        format!("rolled back: the new agent ({bin}) did not reach the operator within 5 s\n")
    );
    assert!(std::fs::read(root.join("usr/bin/tenet-agent")).expect("the binary") == upgraded);
    assert!(!home.join("agent-data/handover/state").exists());
}

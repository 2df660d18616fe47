//! A payload written in C, not WAT (`examples/payloads/c`): built by its
//! script with Debian's clang for wasm32-wasi and wasi-libc, bundled and
//! run by the real agent like any other. It reads the terminal's
//! inventory and writes the message of the day under the path the
//! envelope grants; outside it, the write is refused.

mod common;

use std::process::Command;

use common::*;
use tenet_protocol::bundle::Capability;
use tenet_protocol::report::Outcome;
use tenet_test_support::build_deb;

#[test]
fn a_payload_written_in_c_runs_like_any_other() {
    if !have_dpkg() || !tenet_test_support::have("clang") {
        return;
    }
    let t = Terminal::new("nagoya-ward3-01");
    t.preinstall(&build_deb(t.dir.path(), "browser-a", "120.0-1"));
    let module = t.dir.path().join("motd.wasm");
    let built = Command::new(payloads().join("c/build"))
        .arg(&module)
        .output()
        .expect("the build script runs");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let caps = [
        Capability::ReadInventory,
        Capability::WriteFiles,
        Capability::Log,
    ];
    let (bundle, digest) = t.bundle(module.to_str().expect("path"), &[], &caps);
    let run = |sequence: u64, path: &str| {
        let mut env = t.envelope(digest, sequence, &[path, "Nagoya ward 3"], &caps);
        env.write_paths = vec!["/etc/motd".into()];
        tenet_test_support::approve(&mut env, &[&t.admin]);
        let bytes = t.sign(&env);
        let (_, report) = t.dispatch(&bytes, &bundle);
        t.verify(&report, &env, &bytes)
            .expect("the report verifies")
    };

    let verified = run(1, "/etc/motd");
    let tail = String::from_utf8_lossy(&verified.output_tail).into_owned();
    assert_eq!(verified.outcome, Outcome::Exited { code: 0 }, "{tail}");
    assert!(tail.contains("wrote the message of the day"), "{tail}");
    assert_eq!(
        std::fs::read_to_string(t.root.join("etc/motd")).expect("motd"),
        "Nagoya ward 3\n1 packages installed; this terminal is kept in its declared state by Tenet.\n"
    );

    // A path the envelope does not grant: the host refuses the write.
    let verified = run(2, "/etc/shadow");
    assert_eq!(verified.outcome, Outcome::Exited { code: 73 });
    assert!(!t.root.join("etc/shadow").exists());
}

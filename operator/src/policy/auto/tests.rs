use super::*;
use tenet_protocol::stdlib::DpkgOp;

fn spec(requirements: &str) -> TerminalPolicySpec {
    serde_yaml::from_str(&format!(
        "requirements:\n{requirements}\nremediation:\n  auto: {{}}\n"
    ))
    .expect("spec")
}

#[test]
fn steps_follow_the_requirements_in_the_payloads_order() {
    let s = spec(
        "  - service: { name: clamav-daemon, state: running, enabled: true }
  - package: { name: browser-a, version: '>= 120.0, < 130' }
  - file: { path: /etc/motd, sha256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa }
  - package: { name: telnetd, absent: true }
  - file: { path: /etc/cron.d/rsh, absent: true }
  - package: { name: clamav-daemon }",
    );
    assert_eq!(
        args(&steps(&s).expect("steps")),
        [
            "purge telnetd",
            "install browser-a ge 120.0 lt 130",
            "install clamav-daemon",
            &format!("file /etc/motd {}", "a".repeat(64)),
            "file-absent /etc/cron.d/rsh",
            "service clamav-daemon running enabled",
        ]
    );
}

#[test]
fn what_auto_cannot_remediate_is_said_at_its_field() {
    let s = spec(
        "  - expression: { cel: 'true' }
  - file: { path: /etc/motd }
  - package: { name: tool, version: '>= 1.0.0', scheme: semver }
  - file: { path: '/etc/a b', absent: true }",
    );
    let errors = steps(&s).expect_err("refused");
    let at: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| (e.path.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(at.len(), 4, "{at:?}");
    assert_eq!(at[0].0, "spec.requirements[0].expression");
    assert!(at[0].1.contains("cannot make an expression true"));
    assert_eq!(at[1].0, "spec.requirements[1].file");
    assert!(at[1].1.contains("without knowing its content"));
    assert_eq!(at[2].0, "spec.requirements[2].package.scheme");
    assert_eq!(at[3].0, "spec.requirements[3].file.path");
    assert!(
        at[3].1.contains("not a plain absolute path: \"/etc/a b\""),
        "{}",
        at[3].1
    );
}

fn bundle(name: &str, debs: &[&str], files: &[[u8; 32]], standard: bool) -> Contents {
    Contents {
        name: name.into(),
        digest: tenet_protocol::wire::sha256(name.as_bytes()),
        standard,
        debs: debs
            .iter()
            .filter_map(|d| stdlib::deb_file_name(d))
            .collect(),
        files: files.iter().map(hex::encode).collect(),
        artifacts: 2 + debs.len() + files.len(),
    }
}

fn install(package: &str, constraint: &[(DpkgOp, &str)]) -> Step {
    Step::Install {
        package: package.into(),
        constraint: constraint
            .iter()
            .map(|(o, v)| (*o, v.to_string()))
            .collect(),
    }
}

#[test]
fn the_newest_bundle_that_satisfies_is_chosen_and_then_kept() {
    let steps = [install("jq", &[(DpkgOp::Ge, "1.6")])];
    let old = bundle(
        "jq-bookworm",
        &["jq_1.6-2.1_amd64.deb", "libjq1_1.6-2.1_amd64.deb"],
        &[],
        true,
    );
    let new = bundle(
        "jq-security",
        &[
            "jq_1.6-2.1+deb12u3_amd64.deb",
            "libjq1_1.6-2.1+deb12u3_amd64.deb",
        ],
        &[],
        true,
    );
    let plain = bundle("tenet-std", &[], &[], true);
    let custom = bundle("jq-custom", &["jq_1.7_amd64.deb"], &[], false);
    let all = [old.clone(), plain.clone(), new.clone(), custom];
    let chosen = choose(&steps, &all, None, false).expect("chosen");
    assert_eq!(chosen.name, "jq-security");
    assert_eq!(chosen.note, None);
    // An approval that names the older bundle keeps it (the admins'
    // signatures add up), and says a newer one is there.
    let kept = choose(&steps, &all, Some(old.digest), false).expect("kept");
    assert_eq!(kept.name, "jq-bookworm");
    assert!(
        kept.note
            .as_deref()
            .is_some_and(|n| n.contains("jq-security") && n.contains("--renew")),
        "{kept:?}"
    );
    assert_eq!(
        choose(&steps, &all, Some(old.digest), true)
            .expect("renewed")
            .name,
        "jq-security"
    );
    // Pinned below the security update: only the old one will do.
    let pinned = [install("jq", &[(DpkgOp::Lt, "1.6-2.1+deb12u1")])];
    assert_eq!(
        choose(&pinned, &all, Some(new.digest), false)
            .expect("chosen")
            .name,
        "jq-bookworm"
    );
    // Nothing to install: the smallest standard bundle.
    let purge = [Step::Purge {
        package: "telnetd".into(),
    }];
    assert_eq!(
        choose(&purge, &all, None, false).expect("chosen").name,
        "tenet-std"
    );
}

#[test]
fn why_no_bundle_will_do_is_said() {
    let steps = [
        install("jq", &[(DpkgOp::Ge, "1.7")]),
        Step::File {
            path: "/etc/motd".into(),
            sha256: "b".repeat(64),
        },
    ];
    let e = choose(&steps, &[], None, false).expect_err("none");
    assert!(
        e.starts_with(
            "no standard-library bundle to remediate it with: build one (`tenet payload build --std"
        ),
        "{e}"
    );
    let e = choose(
        &steps,
        &[
            bundle("old", &["jq_1.6-2.1_amd64.deb"], &[], true),
            bundle(
                "twice",
                &["jq_1.7_amd64.deb", "jq_1.7.1_amd64.deb"],
                &[],
                true,
            ),
            bundle("nofile", &["jq_1.7_amd64.deb"], &[], true),
            bundle("custom", &["jq_1.7_amd64.deb"], &[], false),
        ],
        None,
        false,
    )
    .expect_err("none");
    assert_eq!(
        e,
        "no standard-library bundle carries what it needs (old: its jq 1.6-2.1 does not satisfy ge 1.7; twice: it carries more than one .deb of jq; nofile: it carries no file with the SHA-256 /etc/motd must have); build one with `tenet payload build --std --apt PACKAGE[=VERSION] --target ROOT` and sign it"
    );
}

#[test]
fn an_epoch_in_a_file_name_counts() {
    let steps = [install("bsdutils", &[(DpkgOp::Ge, "1:2.38")])];
    let b = bundle("b", &["bsdutils_1%3a2.38.1-5+deb12u3_amd64.deb"], &[], true);
    assert_eq!(b.lacks(&steps), None);
}

#[test]
fn a_bundle_is_the_standard_library_only_byte_for_byte() {
    use tenet_protocol::bundle::{Artifact, Manifest};
    assert!(std_module().starts_with(b"\0asm"), "the module parses");
    let artifact = |name: &str, data: &[u8]| Artifact {
        name: name.into(),
        sha256: tenet_protocol::wire::sha256(data),
        size: data.len() as u64,
        data: data.to_vec(),
    };
    let mut bundle = PayloadBundle {
        manifest: Manifest {
            name: "tenet-std".into(),
            version: "1".into(),
            description: String::new(),
            capabilities: CAPABILITIES.to_vec(),
            created_ms: 0,
            expires_ms: 1,
        },
        module: std_module().to_vec(),
        artifacts: vec![
            artifact(stdlib::SCRIPT, STD_SH.as_bytes()),
            artifact(INSTALLER, INSTALLER_SH.as_bytes()),
            artifact("telnetd_0.17_amd64.deb", b"deb"),
        ],
    };
    let c = Contents::of(&bundle, [1; 32]);
    assert!(c.standard);
    // It carries telnetd: never chosen to purge it (it would come back
    // with the next install).
    let purge = [Step::Purge {
        package: "telnetd".into(),
    }];
    assert_eq!(
        c.lacks(&purge).as_deref(),
        Some("it carries a .deb of telnetd, which the policy purges")
    );
    // A script of the same name that is not the library's.
    bundle.artifacts[0] = artifact(stdlib::SCRIPT, b"#!/bin/sh\nrm -rf /\n");
    assert!(!Contents::of(&bundle, [1; 32]).standard);
}

#[test]
fn steps_that_overflow_the_modules_page_are_refused() {
    let long = format!("/{}", "a".repeat(1015));
    let mut yaml = String::new();
    for i in 0..64 {
        yaml.push_str(&format!(
            "  - file: {{ path: '{long}{i}', absent: true }}\n"
        ));
    }
    let Err(errors) = steps(&spec(yaml.trim_end())) else {
        panic!("64 steps of 1,030 bytes are refused");
    };
    assert!(
        errors[0]
            .message
            .starts_with("remediation auto passes the steps in at most 65279 bytes"),
        "{}",
        errors[0].message
    );
}

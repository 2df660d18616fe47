use super::*;

#[test]
fn the_simulated_terminal_installs_removes_and_starts() {
    let sys = SimSystem::new(Inventory {
        packages: vec![Package {
            name: "telnetd".into(),
            version: "0.17".into(),
            manager: PackageManager::Dpkg,
            state: Default::default(),
            problems: Vec::new(),
        }],
        ..Inventory::default()
    });
    let artifact = |name: &str| Artifact {
        name: name.into(),
        sha256: sha256(b"x"),
        size: 1,
        data: b"x".to_vec(),
    };
    let deb = artifact("browser-a_120.0-1_all.deb");
    let installer = artifact("install-deb.sh");
    let deadline = Instant::now();
    let all = [installer.clone(), deb];
    assert_eq!(
        sys.run_artifact(&all, &installer, &["browser-a_120.0-1_all.deb"], deadline)
            .0,
        0
    );
    let (code, out) = sys.run_artifact(&all, &installer, &["browser-a_121.0-1_all.deb"], deadline);
    assert_eq!(code, 2, "not an artifact of the bundle");
    assert!(String::from_utf8_lossy(&out).contains("cannot access archive"));
    let remove = artifact("remove-packages.sh");
    assert_eq!(sys.run_artifact(&[], &remove, &["telnetd"], deadline).0, 0);
    let svc = artifact("ensure-service.sh");
    assert_eq!(
        sys.run_artifact(&[], &svc, &["clamav-daemon"], deadline).0,
        0
    );
    let mut tampered = artifact("install-deb.sh");
    tampered.data = b"y".to_vec();
    assert_eq!(sys.run_artifact(&[], &tampered, &[], deadline).0, -3);
    assert_eq!(
        sys.run_artifact(&[], &artifact("rm-rf.sh"), &[], deadline)
            .0,
        127
    );
    let inv = sys.inventory().expect("inventory");
    assert_eq!(
        inv.packages
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect::<Vec<_>>(),
        [("browser-a", "120.0-1")]
    );
    assert_eq!(inv.services[0].state, ServiceState::Running);
}

#[test]
fn the_simulated_terminal_runs_the_standard_library_steps() {
    let package = |name: &str, version: &str| Package {
        name: name.into(),
        version: version.into(),
        manager: PackageManager::Dpkg,
        state: Default::default(),
        problems: Vec::new(),
    };
    let sys = SimSystem::new(Inventory {
        packages: vec![
            package("telnetd", "0.17"),
            package("browser-a", "118.0.2-1"),
            package("jq", "1.7-1"),
        ],
        ..Inventory::default()
    });
    let artifact = |name: &str, data: &[u8]| Artifact {
        name: name.into(),
        sha256: sha256(data),
        size: data.len() as u64,
        data: data.to_vec(),
    };
    let script = artifact("tenet-std.sh", b"#!/bin/sh");
    let motd = artifact("motd", b"welcome\n");
    let all = [
        script.clone(),
        artifact("browser-a_120.0-1_all.deb", b"a"),
        artifact("libbrowser_2.0_all.deb", b"b"),
        artifact("jq_1.7-1_all.deb", b"c"),
        motd.clone(),
    ];
    let file_step = format!("file /etc/motd {}", hex::encode(motd.sha256));
    let steps = [
        "service clamav-daemon running enabled",
        "install browser-a ge 120.0",
        "install jq ge 1.6",
        "purge telnetd",
        &file_step,
    ];
    let (code, out) = sys.run_artifact(&all, &script, &steps, Instant::now());
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out));
    let inv = sys.inventory().expect("inventory");
    let mut packages: Vec<(&str, &str)> = inv
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    packages.sort();
    // telnetd purged, browser-a up to the bundle's with its library, jq
    // (already satisfying) untouched.
    assert_eq!(
        packages,
        [
            ("browser-a", "120.0-1"),
            ("jq", "1.7-1"),
            ("libbrowser", "2.0")
        ]
    );
    assert_eq!(inv.files[0].path, "/etc/motd");
    assert_eq!(inv.services[0].state, ServiceState::Running);
    assert!(inv.services[0].enabled);
    // What the script would refuse, the simulation refuses.
    let (code, out) = sys.run_artifact(&all, &script, &["reboot now"], Instant::now());
    assert_eq!(code, 1);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "not a standard library step: \"reboot now\"\n"
    );
}

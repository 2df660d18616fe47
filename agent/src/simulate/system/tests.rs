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

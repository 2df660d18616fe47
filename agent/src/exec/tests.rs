use super::*;

#[test]
fn imports_need_the_manifest_and_the_envelope() {
    let (w, l) = (Capability::WriteFiles, Capability::Log);
    assert_eq!(check_import("tenet", "write_file", &[w], &[w]), Ok(()));
    assert_eq!(check_import("tenet", "arg", &[], &[]), Ok(()));
    // Granted by the envelope, but the admins never declared it.
    assert_eq!(
        check_import("tenet", "write_file", &[l], &[w, l]),
        Err(Rejection::Malformed(
            "the module imports tenet.write_file, but its signed manifest does not declare capability write-files".into()
        ))
    );
    assert_eq!(
        check_import("tenet", "write_file", &[w], &[l]),
        Err(Rejection::CapabilityNotGranted("write-files".into()))
    );
    assert_eq!(
        check_import("wasi", "fd_write", &[w], &[w]),
        Err(Rejection::Malformed("unknown import wasi.fd_write".into()))
    );
}

#[test]
fn write_paths_stay_inside_their_grant() {
    let g = vec!["/etc/tenet/".to_string()];
    assert!(path_granted("/etc/tenet/motd", &g));
    assert!(path_granted("/etc/tenet/a/b", &g));
    assert!(!path_granted("/etc/tenetx/motd", &g));
    assert!(!path_granted("/etc/tenet/../passwd", &g));
    assert!(!path_granted("etc/tenet/motd", &g));
    assert!(!path_granted("/etc/passwd", &g));
}

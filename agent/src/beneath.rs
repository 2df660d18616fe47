//! Writing a file for a payload without leaving its grant. The path was
//! already checked lexically (absolute, no `.` or `..`, under a granted
//! write path); here it is resolved one directory at a time from the
//! terminal's root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`,
//! so a symlink anywhere on the way (a planted `etc/tenet -> /etc`, or a
//! link in place of a directory) refuses the write instead of redirecting
//! it. The data goes to a new temporary file (`O_CREAT | O_EXCL`, a random
//! name: a planted file or link of that name is never opened), is synced,
//! and is renamed over the target (a link at the target is replaced, not
//! followed). The agent runs as root: without this, a payload granted
//! `/etc/tenet/` could be made to write `/etc/shadow`.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Why a write was not done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    /// The path leaves its grant: a symlink on the way, or not a plain path.
    #[error("{path}: {why}; nothing was written")]
    Escapes { path: String, why: String },
    #[error("{path}: {source}")]
    Io { path: String, source: Errno },
}

const DIR_MODE: u32 = 0o755;

/// Write `data` to `path` (absolute, already granted) under `root`,
/// creating missing directories, never through a symlink.
pub fn write_beneath(root: &Path, path: &str, data: &[u8], mode: u32) -> Result<(), WriteError> {
    let escapes = |why: &str| WriteError::Escapes {
        path: path.to_string(),
        why: why.to_string(),
    };
    let io = |source: Errno| WriteError::Io {
        path: path.to_string(),
        source,
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let Some((name, dirs)) = parts.split_last() else {
        return Err(escapes("no file name"));
    };
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(escapes("'.' and '..' are not allowed"));
    }
    // The root itself is the agent's configuration, trusted as it is.
    let mut dir: OwnedFd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    for component in dirs {
        dir = match open_dir(&dir, component) {
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&dir, *component, Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io(e)),
                }
                open_dir(&dir, component)
            }
            other => other,
        }
        .map_err(|e| match e {
            Errno::LOOP | Errno::XDEV => escapes(&format!("{component:?} is a symbolic link")),
            Errno::NOTDIR => escapes(&format!("{component:?} is not a directory")),
            e => io(e),
        })?;
    }
    let temp = format!(".{name}.tenet-{}", random_suffix());
    let fd = rustix::fs::openat(
        &dir,
        temp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(io)?;
    let mut file = std::fs::File::from(fd);
    let written = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|e| io(Errno::from_io_error(&e).unwrap_or(Errno::IO)));
    let renamed = written.and_then(|()| {
        rustix::fs::renameat(&dir, temp.as_str(), &dir, *name).map_err(|e| match e {
            Errno::ISDIR => escapes(&format!("{name:?} is a directory")),
            e => io(e),
        })
    });
    if renamed.is_err() {
        let _ = rustix::fs::unlinkat(&dir, temp.as_str(), rustix::fs::AtFlags::empty());
    }
    renamed?;
    let _ = rustix::fs::fsync(&dir);
    Ok(())
}

fn open_dir(dir: &OwnedFd, component: &str) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        component,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    )
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Root {
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
        /// A file outside the grant (a stand-in for /etc/shadow).
        secret: std::path::PathBuf,
    }

    fn root() -> Root {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc/tenet")).expect("mkdir");
        let secret = root.join("etc/shadow");
        std::fs::write(&secret, "root:secret\n").expect("write");
        Root {
            _dir: dir,
            root,
            secret,
        }
    }

    fn secret_intact(r: &Root) {
        assert_eq!(
            std::fs::read_to_string(&r.secret).expect("read"),
            "root:secret\n",
            "the file outside the grant was changed"
        );
    }

    #[test]
    fn writes_and_replaces_a_file_creating_its_directories() {
        let r = root();
        write_beneath(&r.root, "/etc/tenet/a/b/motd", b"one", 0o644).expect("write");
        write_beneath(&r.root, "/etc/tenet/a/b/motd", b"two", 0o644).expect("write");
        assert_eq!(
            std::fs::read(r.root.join("etc/tenet/a/b/motd")).expect("read"),
            b"two"
        );
        let left: Vec<_> = std::fs::read_dir(r.root.join("etc/tenet/a/b"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec!["motd"], "no temporary file is left behind");
    }

    #[test]
    fn a_planted_temporary_symlink_is_never_followed() {
        // The old writer used NAME.tmp, following a link planted there.
        let r = root();
        symlink(&r.secret, r.root.join("etc/tenet/motd.tmp")).expect("symlink");
        write_beneath(&r.root, "/etc/tenet/motd", b"hello", 0o644).expect("write");
        secret_intact(&r);
        assert_eq!(
            std::fs::read(r.root.join("etc/tenet/motd")).expect("read"),
            b"hello"
        );
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let r = root();
        symlink(&r.secret, r.root.join("etc/tenet/motd")).expect("symlink");
        write_beneath(&r.root, "/etc/tenet/motd", b"hello", 0o644).expect("write");
        secret_intact(&r);
        let meta = std::fs::symlink_metadata(r.root.join("etc/tenet/motd")).expect("meta");
        assert!(meta.is_file(), "the link itself was replaced by a file");
    }

    #[test]
    fn a_symlinked_directory_on_the_way_refuses_the_write() {
        let r = root();
        symlink(r.root.join("etc"), r.root.join("etc/tenet/conf")).expect("symlink");
        assert_eq!(
            write_beneath(&r.root, "/etc/tenet/conf/shadow", b"pwned", 0o644),
            Err(WriteError::Escapes {
                path: "/etc/tenet/conf/shadow".into(),
                why: "\"conf\" is a symbolic link".into()
            })
        );
        secret_intact(&r);
        // The same with an absolute link, and with the grant itself a link.
        std::fs::remove_file(r.root.join("etc/tenet/conf")).expect("rm");
        symlink("/etc", r.root.join("etc/tenet/conf")).expect("symlink");
        assert!(matches!(
            write_beneath(&r.root, "/etc/tenet/conf/shadow", b"pwned", 0o644),
            Err(WriteError::Escapes { .. })
        ));
        std::fs::create_dir_all(r.root.join("var")).expect("mkdir");
        symlink(r.root.join("etc"), r.root.join("var/tenet")).expect("symlink");
        assert!(matches!(
            write_beneath(&r.root, "/var/tenet/shadow", b"pwned", 0o644),
            Err(WriteError::Escapes { .. })
        ));
        secret_intact(&r);
    }

    #[test]
    fn dot_dot_is_refused() {
        let r = root();
        assert!(matches!(
            write_beneath(&r.root, "/etc/tenet/../shadow", b"x", 0o644),
            Err(WriteError::Escapes { .. })
        ));
        secret_intact(&r);
    }
}

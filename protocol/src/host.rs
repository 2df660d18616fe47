//! What the operator and the agent both need from the machine they run on:
//! the wall clock, and files replaced whole. Everything else in this crate
//! is pure (callers pass `now`); only the edges call these.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// The wall clock in milliseconds since the Unix epoch (0 before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Replace `path` with `bytes`, readable as `mode`: written to a temporary
/// file beside it, synced, then renamed over it, so a crash or a reader
/// sees the old file or the new one, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temporary_beside(path, mode)?;
    fill(tmp, bytes)?.persist(path).map_err(|e| e.error)?;
    sync_parent(path);
    Ok(())
}

/// Replace `path` with `bytes` as [`write_atomically`] does, without
/// waiting for the disk: for a file rewritten often whose loss at a crash
/// costs nothing (a status file), so its fsyncs do not compete with the
/// ones that matter.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = temporary_beside(path, mode)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Write a file that must not exist yet, whole: a reader watching the
/// directory never sees half of it (the operator imports `*.token` files
/// as soon as they appear). An existing file is left alone and is an
/// `AlreadyExists` error.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temporary_beside(path, mode)?;
    fill(tmp, bytes)?
        .persist_noclobber(path)
        .map_err(|e| e.error)?;
    sync_parent(path);
    Ok(())
}

fn temporary_beside(path: &Path, mode: u32) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A leading dot: directory readers skip hidden files, and the suffix
    // keeps it from matching the pattern they look for (`*.token`).
    tempfile::Builder::new()
        .prefix(".tenet-")
        .suffix(".partial")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
}

fn fill(
    mut tmp: tempfile::NamedTempFile,
    bytes: &[u8],
) -> std::io::Result<tempfile::NamedTempFile> {
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    Ok(tmp)
}

fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_replaced_file_is_whole_and_keeps_the_mode_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        write_atomically(&path, b"one", 0o600).expect("write");
        write_atomically(&path, b"two", 0o644).expect("replace");
        replace(&path, b"three", 0o644).expect("replace without sync");
        assert_eq!(std::fs::read(&path).expect("read"), b"three");
        write_atomically(&path, b"two", 0o644).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o644
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_new_file_never_replaces_one_that_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.token");
        write_new(&path, b"first", 0o600).expect("write");
        let e = write_new(&path, b"second", 0o600).expect_err("exists");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"first");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }
}

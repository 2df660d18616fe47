//! The real machine under a loader: artifacts run as processes in their
//! own process group, files are written beneath the terminal's root.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tenet_protocol::bundle::Artifact;
use tenet_protocol::inventory::Inventory;
use tenet_protocol::report::MAX_OUTPUT_TAIL;
use tenet_protocol::wire::sha256;

use super::{E_DIGEST, E_IO, E_KILLED, E_LAUNCH, E_PATH, System};
use crate::inventory::InventorySource;

/// The terminal's real system: artifacts run as processes, files written
/// under its root.
pub struct Os {
    /// The terminal's root file system (`/` on a real terminal).
    pub root: std::path::PathBuf,
    /// A private 0700 working directory for this run.
    pub work_dir: std::path::PathBuf,
    pub inventory: Arc<dyn InventorySource>,
    /// Whether the artifacts were written to `work_dir` already.
    pub artifacts_written: std::sync::Mutex<bool>,
}

impl System for Os {
    fn inventory(&self) -> Result<Inventory, String> {
        self.inventory.collect().map_err(|e| e.to_string())
    }

    fn write_file(&self, path: &str, data: &[u8]) -> i32 {
        match crate::beneath::write_beneath(&self.root, path, data, 0o644) {
            Ok(()) => 0,
            Err(crate::beneath::WriteError::Escapes { .. }) => E_PATH,
            Err(crate::beneath::WriteError::Io { .. }) => E_IO,
        }
    }

    /// Write the artifacts, re-check the digest of the one to run just
    /// before launching it, run it as its own process until it ends or time
    /// runs out.
    fn run_artifact(
        &self,
        artifacts: &[Artifact],
        artifact: &Artifact,
        args: &[&str],
        deadline: Instant,
    ) -> (i32, Vec<u8>) {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::process::CommandExt;
        let name = artifact.name.as_str();
        let expected = artifact.sha256;
        {
            let mut written = self
                .artifacts_written
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !*written {
                for a in artifacts {
                    let path = self.work_dir.join(&a.name);
                    let ok = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o700)
                        .open(&path)
                        .and_then(|mut f| {
                            std::io::Write::write_all(&mut f, &a.data).and_then(|()| f.sync_all())
                        });
                    if ok.is_err() {
                        return (
                            E_IO,
                            format!("cannot write artifact {}\n", a.name).into_bytes(),
                        );
                    }
                }
                *written = true;
            }
        }
        let path = self.work_dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) if sha256(&bytes) == expected => {}
            _ => {
                return (
                    E_DIGEST,
                    format!("artifact {name} does not match its digest; not run\n").into_bytes(),
                );
            }
        }
        // '@' is not allowed in artifact names, so this never collides with one.
        let log_path = self.work_dir.join(format!("{name}@output"));
        let Ok(log) = std::fs::File::create(&log_path) else {
            return (E_IO, b"cannot create the output file\n".to_vec());
        };
        let Ok(log2) = log.try_clone() else {
            return (E_IO, Vec::new());
        };
        // A clean environment (nothing of the agent's leaks in), and a
        // process group of its own, so that whatever it starts is killed
        // with it at the deadline.
        let child = std::process::Command::new(&path)
            .args(args)
            .current_dir(&self.work_dir)
            .env_clear()
            .env("PATH", ARTIFACT_PATH)
            .env("LANG", "C.UTF-8")
            .env("TENET_ROOT", &self.root)
            // Maintainer scripts see it: the agent's own package does not
            // restart the agent under a payload (it hands over itself).
            .env("TENET_PAYLOAD", "1")
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return (E_LAUNCH, format!("cannot start {name}: {e}\n").into_bytes()),
        };
        // Supervise: the process ends, or the run's time runs out.
        let code = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status.code().unwrap_or(E_KILLED),
                Ok(None) if Instant::now() >= deadline => {
                    kill_group(&child);
                    let _ = child.wait();
                    break E_KILLED;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => break E_LAUNCH,
            }
        };
        (code, read_tail(&log_path, MAX_OUTPUT_TAIL))
    }
}

/// The search path artifacts run with (their environment is otherwise empty
/// but for `LANG` and `TENET_ROOT`).
const ARTIFACT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Kill an artifact and every process in its group.
fn kill_group(child: &std::process::Child) {
    use rustix::process::{Pid, Signal, kill_process_group};
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        let _ = kill_process_group(pid, Signal::KILL);
    }
}

/// The last `max` bytes of a file, reading no more than that.
fn read_tail(path: &std::path::Path, max: usize) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    let mut out = Vec::with_capacity((len - start) as usize);
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.take(max as u64).read_to_end(&mut out);
    }
    out
}

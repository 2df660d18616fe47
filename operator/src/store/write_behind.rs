//! Write-behind: a flusher thread commits the queued changes in *group
//! commits* (all the changes made while one commit is being made go into
//! the next), and [`super::Store::durable`] waits for a change's commit.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::backend::Backend;
use super::memory::Mem;
use super::{Store, StoreError};

/// How far the database on disk has caught up.
#[derive(Debug, Clone, Default)]
pub(super) struct Durable {
    /// Every change up to this number is committed.
    pub(super) written: u64,
    /// Why the last commit failed, while it keeps failing.
    pub(super) error: Option<String>,
}

pub(super) struct Inner {
    pub(super) backend: Box<dyn Backend>,
    pub(super) mem: Mutex<Mem>,
    /// Serialises commits, so they reach the disk in order.
    pub(super) committing: Mutex<()>,
    /// Set when there is something to commit, or the store closes.
    pub(super) wake: (Mutex<(bool, bool)>, Condvar),
    pub(super) durable: tokio::sync::watch::Sender<Durable>,
    /// Commits made (each one fsync).
    pub(super) commits: std::sync::atomic::AtomicU64,
    /// The evidence history, appended and synced before each commit.
    pub(super) evidence: Option<Mutex<crate::evidence::EvidenceLog>>,
}

impl Inner {
    pub(super) fn mem(&self) -> MutexGuard<'_, Mem> {
        // A panic while holding the lock cannot leave a half-made change:
        // every change is made in memory and queued in one step.
        self.mem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Commit everything queued so far, in one transaction.
    pub(super) fn commit(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self
            .committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (batch, evidence, written) = {
            let mut m = self.mem();
            (
                std::mem::take(&mut m.pending),
                std::mem::take(&mut m.evidence),
                m.written,
            )
        };
        if batch.is_empty() && evidence.is_empty() {
            return Ok(());
        }
        // The history first: what the changes imply is in it before they
        // are committed (after a crash between the two, an entry may come
        // again, never go missing).
        if let (Some(log), false) = (&self.evidence, evidence.is_empty()) {
            let mut log = log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = log.append(&evidence).and_then(|()| log.sync()) {
                drop(log);
                let mut m = self.mem();
                let newer_evidence = std::mem::take(&mut m.evidence);
                m.evidence = evidence;
                m.evidence.extend(newer_evidence);
                let newer = std::mem::take(&mut m.pending);
                m.pending = batch;
                m.pending.extend(newer);
                drop(m);
                let e = StoreError::Unavailable(format!("the evidence history: {e}"));
                self.durable.send_modify(|d| d.error = Some(e.to_string()));
                return Err(e);
            }
        }
        let result = if batch.is_empty() {
            Ok(())
        } else {
            self.backend.commit(&batch)
        };
        match result {
            Ok(()) => {
                self.commits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.durable.send_replace(Durable {
                    written,
                    error: None,
                });
                Ok(())
            }
            Err(e) => {
                // Keep the batch, in order, ahead of what came since: the
                // next commit tries it again.
                let mut m = self.mem();
                let newer = std::mem::take(&mut m.pending);
                m.pending = batch;
                m.pending.extend(newer);
                drop(m);
                self.durable.send_modify(|d| d.error = Some(e.to_string()));
                Err(e)
            }
        }
    }

    pub(super) fn wake_flusher(&self) {
        let (lock, cv) = &self.wake;
        if let Ok(mut w) = lock.lock() {
            w.0 = true;
            cv.notify_one();
        }
    }
}

/// The flusher thread: commit whenever something is queued; after a failed
/// commit, try again every second.
pub(super) fn flusher(inner: Arc<Inner>) {
    let (lock, cv) = &inner.wake;
    loop {
        {
            let Ok(mut w) = lock.lock() else { return };
            while !w.0 && !w.1 {
                w = match cv.wait(w) {
                    Ok(w) => w,
                    Err(_) => return,
                };
            }
            if w.1 {
                return;
            }
            w.0 = false;
        }
        if let Err(e) = inner.commit() {
            tracing::error!(error = %e, "cannot commit to the database; retrying every second");
            std::thread::sleep(Duration::from_secs(1));
            inner.wake_flusher();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        {
            let (lock, cv) = &self.inner.wake;
            if let Ok(mut w) = lock.lock() {
                w.1 = true;
                cv.notify_one();
            }
        }
        // Waiting for the flusher and committing block: on a runtime's
        // worker (a store dropped in an async fn), its other tasks are
        // handed over first, since a backend may need them to commit.
        off_runtime(|| {
            if let Some(t) = self.flusher.take() {
                let _ = t.join();
            }
            if let Err(e) = self.inner.commit() {
                tracing::error!(error = %e, "changes not committed at close");
            }
        });
    }
}

/// Run blocking `work` on this thread. On a worker of a multi-thread
/// tokio runtime the worker's tasks move to another thread first
/// (`block_in_place`), so blocking here never starves them; elsewhere it
/// just runs.
pub(crate) fn off_runtime<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(current) if current.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

//! The live sessions, one per terminal, and each session's queue to its
//! agent, bounded in bytes as well as in messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tenet_protocol::session::{SharedBytes, ToAgent};
use tokio::sync::{Notify, mpsc};

/// One live session of a terminal.
#[derive(Clone)]
pub struct Session {
    /// Unique within the process: which session a disconnection is about.
    pub id: u64,
    pub to_agent: SessionTx,
    /// Notified when a newer session of the same terminal replaces it.
    pub replaced: Arc<Notify>,
    /// The version its agent said in `Hello`.
    pub agent_version: String,
}

/// The live sessions by terminal: one each. A newer session replaces the
/// older (which is told to end); the older one ending then changes nothing.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register `session`; true when it replaced an older one.
    pub fn insert(&self, terminal: &str, session: Session) -> bool {
        self.insert_then(terminal, session, || ())
    }

    /// Register `session` and run `then` before anyone else can see or
    /// change `terminal`'s session (what records it as online). `then`
    /// runs under the sessions lock: it may take the store's lock (the
    /// store never calls back into the sessions), never this one.
    pub fn insert_then(&self, terminal: &str, session: Session, then: impl FnOnce()) -> bool {
        let mut map = self.map();
        let old = map.insert(terminal.to_string(), session);
        then();
        old.inspect(|o| o.replaced.notify_one()).is_some()
    }

    /// Forget session `id` of `terminal`, when it is still the live one;
    /// true when it was.
    pub fn remove(&self, terminal: &str, id: u64) -> bool {
        self.remove_then(terminal, id, || ())
    }

    /// Like [`Sessions::remove`], running `then` (what records the terminal
    /// as offline) only when it was the live one, before a newer session
    /// can register.
    pub fn remove_then(&self, terminal: &str, id: u64, then: impl FnOnce()) -> bool {
        let mut map = self.map();
        if map.get(terminal).is_some_and(|s| s.id == id) {
            map.remove(terminal);
            then();
            true
        } else {
            false
        }
    }

    /// End `terminal`'s live session, if any (it was de-enrolled).
    pub fn end(&self, terminal: &str) {
        if let Some(s) = self.map().remove(terminal) {
            s.replaced.notify_one();
        }
    }

    pub fn sender(&self, terminal: &str) -> Option<SessionTx> {
        self.map().get(terminal).map(|s| s.to_agent.clone())
    }

    pub fn names(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sending side of a session's queue to its agent, bounded in bytes as
/// well as in messages: an agent that stops reading holds at most
/// `limit` bytes of the operator's memory (a bundle is one shared copy,
/// counted once per message as its envelope only).
#[derive(Clone)]
pub struct SessionTx {
    /// Boxed: a tokio channel allocates a block of 32 slots up front, and a
    /// `ToAgent` is 104 bytes; boxed, an idle session's block is 32
    /// pointers (measured with heaptrack at 3,000 terminals: 3.6 KB per
    /// session unboxed).
    tx: mpsc::Sender<Queued>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    /// The agent's release (what it reads), from its `Hello`.
    pub release: Option<tenet_protocol::release::Release>,
    /// The bundles offered to it by digest (`DispatchRef`), the newest
    /// last: what it may ask for (`Want`), each once per offer, and
    /// nothing else.
    offered: Arc<Mutex<Offers>>,
}

/// A queued message and the bytes it holds.
type Queued = Box<(ToAgent, usize)>;

/// Bundles on offer to a session by digest, the newest last.
type Offers = std::collections::VecDeque<([u8; 32], SharedBytes)>;

/// At most this many bundles are on offer to one session (the newest; a
/// dispatch of an older one offers it again).
pub const MAX_OFFERED: usize = 16;

/// A message was not queued: the queue is full or the session ended.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the session's queue is full or closed")]
pub struct NotQueued;

/// The bytes a queued message holds of its own (shared bundles aside).
fn queued_size(m: &ToAgent) -> usize {
    64 + match m {
        ToAgent::Enrolled(b) => b.len(),
        ToAgent::EnrolmentRefused { reason } | ToAgent::RenewalRefused { reason } => reason.len(),
        ToAgent::Dispatch { envelope, .. } => envelope.len(),
        ToAgent::Certificate { pem } => pem.len(),
        ToAgent::Audit {
            pcrs,
            packages,
            services,
            ..
        } => {
            pcrs.len()
                + packages
                    .iter()
                    .chain(services)
                    .map(String::len)
                    .sum::<usize>()
        }
        ToAgent::SecurityCertificate { certificate } => certificate.as_ref().map_or(0, Vec::len),
        ToAgent::ActivateCredential {
            credential_blob,
            secret,
        } => credential_blob.len() + secret.len(),
        ToAgent::TrustRotations { rotations } => rotations.iter().map(|r| r.len()).sum(),
        ToAgent::Welcome { operator_version } => operator_version.len(),
        ToAgent::DispatchRef { envelope } => envelope.len(),
        // Shared, like a dispatch's: counted once however many queue it.
        ToAgent::Bundle { .. } => 0,
        ToAgent::Ack { .. } | ToAgent::InventoryWanted | ToAgent::Ping => 0,
    }
}

impl SessionTx {
    /// A queue of at most `messages` messages and `limit` bytes, and its receiver.
    pub fn channel(messages: usize, limit: usize) -> (SessionTx, SessionRx) {
        let (tx, rx) = mpsc::channel(messages);
        let queued = Arc::new(AtomicUsize::new(0));
        (
            SessionTx {
                tx,
                queued: queued.clone(),
                limit,
                release: None,
                offered: Arc::default(),
            },
            SessionRx { rx, queued },
        )
    }

    /// The session of an agent of `release`.
    pub fn of_release(mut self, release: tenet_protocol::release::Release) -> SessionTx {
        self.release = Some(release);
        self
    }

    /// Queue a dispatch of `envelope`, whose bundle is `bundle` (body
    /// digest `digest`): by reference to an agent that reads `DispatchRef`
    /// (it holds the bundle, or asks for it), whole to an older one. The
    /// bundle bytes it queued.
    pub fn dispatch(
        &self,
        envelope: Vec<u8>,
        digest: [u8; 32],
        bundle: SharedBytes,
    ) -> Result<usize, NotQueued> {
        let by_digest = self
            .release
            .is_some_and(|r| tenet_protocol::release::knows(r, tenet_protocol::release::BY_DIGEST));
        if by_digest {
            self.try_send(ToAgent::DispatchRef { envelope })?;
            let mut offered = self
                .offered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            offered.retain(|(d, _)| *d != digest);
            offered.push_back((digest, bundle));
            while offered.len() > MAX_OFFERED {
                offered.pop_front();
            }
            Ok(0)
        } else {
            let size = bundle.len();
            self.try_send(ToAgent::Dispatch { envelope, bundle })
                .map(|()| size)
        }
    }

    /// The bundle with `digest`, if it is on offer to this session; taken
    /// off the offer (a second `Want` gets nothing until it is offered
    /// again).
    pub fn take_offered(&self, digest: &[u8; 32]) -> Option<SharedBytes> {
        let mut offered = self
            .offered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = offered.iter().position(|(d, _)| d == digest)?;
        offered.remove(i).map(|(_, b)| b)
    }

    /// Queue `m` unless the queue is full (in messages or in bytes).
    pub fn try_send(&self, m: ToAgent) -> Result<(), NotQueued> {
        let size = queued_size(&m);
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        if before + size > self.limit {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            return Err(NotQueued);
        }
        self.tx.try_send(Box::new((m, size))).map_err(|_| {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            NotQueued
        })
    }

    /// Queue an answer to the agent's own message, waiting for room: the
    /// agent that does not read its answers stops being read.
    pub async fn send(&self, m: ToAgent) -> Result<(), NotQueued> {
        let size = queued_size(&m);
        self.queued.fetch_add(size, Ordering::AcqRel);
        self.tx.send(Box::new((m, size))).await.map_err(|_| {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            NotQueued
        })
    }

    /// The bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// The receiving side of a [`SessionTx`].
pub struct SessionRx {
    rx: mpsc::Receiver<Queued>,
    queued: Arc<AtomicUsize>,
}

impl SessionRx {
    pub async fn recv(&mut self) -> Option<ToAgent> {
        let (m, size) = *self.rx.recv().await?;
        self.queued.fetch_sub(size, Ordering::AcqRel);
        Some(m)
    }
}

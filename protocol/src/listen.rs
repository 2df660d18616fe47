//! Accepting connections without being knocked over: at most a set number
//! of connections served at once (one more is closed as soon as it is
//! accepted), and a failing `accept` (out of file descriptors, above all)
//! waits and tries again, backing off, instead of spinning on the error or
//! ending the listener for good.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Raise this process's soft limit on open files to its hard limit (a
/// server holding thousands of connections needs one descriptor each);
/// the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum
        && limit.current != Some(hard)
    {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return hard;
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

/// Connections held at once, in all and by address group: a place is
/// taken when a connection is accepted and given back when its [`Slot`] is
/// dropped. Shared by [`accept_loop`] and the operator's gateway (for its
/// connections that have not authenticated yet).
pub struct ConnectionSlots {
    max: usize,
    per_address: usize,
    counts: std::sync::Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One place among [`ConnectionSlots`].
pub struct Slot {
    slots: Arc<ConnectionSlots>,
    address: IpAddr,
}

impl ConnectionSlots {
    pub fn new(max: usize, per_address: usize) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots {
            max,
            per_address,
            counts: Default::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a connection from `address` (callers may group
    /// addresses, an IPv6 /64 as one), or `None` when either limit is reached.
    pub fn take(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let mut c = self.counts();
        let from_here = c.by_address.get(&address).copied().unwrap_or(0);
        if c.total >= self.max || from_here >= self.per_address {
            return None;
        }
        c.total += 1;
        *c.by_address.entry(address).or_insert(0) += 1;
        Some(Slot {
            slots: self.clone(),
            address,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.counts();
        c.total -= 1;
        if let Some(n) = c.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                c.by_address.remove(&self.address);
            }
        }
    }
}

/// The longest wait after failed accepts in a row.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accept connections on `listener` for ever, handing each to `serve` in a
/// task of its own, at most `max` at once and `per_address` from one IP
/// address.
pub async fn accept_loop<F, Fut>(listener: TcpListener, max: usize, per_address: usize, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = ConnectionSlots::new(max, per_address);
    let mut backoff = Duration::ZERO;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::ZERO;
                accepted
            }
            Err(_) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_BACKOFF);
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let Some(slot) = slots.take(peer.ip()) else {
            drop(stream);
            continue;
        };
        let served = serve(stream, peer);
        tokio::spawn(async move {
            served.await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_the_others_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(accept_loop(listener, 2, 2, move |mut s, _| {
            let mut hold = hold_rx.clone();
            async move {
                let _ = s.write_all(b"hi").await;
                // Held until the test lets go.
                let _ = hold.wait_for(|released| *released).await;
            }
        }));
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(address).await.expect("connect");
            let mut buf = [0u8; 2];
            c.read_exact(&mut buf).await.expect("served");
            held.push(c);
        }
        // A third is closed without a word.
        let mut third = TcpStream::connect(address).await.expect("connect");
        let mut buf = Vec::new();
        assert_eq!(third.read_to_end(&mut buf).await.expect("closed"), 0);
        // Once one is let go, a new one is served again.
        hold_tx.send_replace(true);
        drop(held);
        // The slots come back when the held tasks end: try until one is served.
        let served = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let mut c = TcpStream::connect(address).await.expect("connect");
                let mut buf = Vec::new();
                if c.read_to_end(&mut buf).await.is_ok_and(|n| n == 2) {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(served.is_ok(), "served again once a slot was free");
    }
}

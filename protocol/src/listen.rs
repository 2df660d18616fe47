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

/// A place among one address's connections, given back on drop.
struct AddressSlot {
    counts: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl AddressSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
        address: IpAddr,
        limit: usize,
    ) -> Option<AddressSlot> {
        let mut c = counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = c.entry(address).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: counts.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = c.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.address);
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
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let by_address: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let Some(from_here) = AddressSlot::take(&by_address, peer.ip(), per_address) else {
            drop(stream);
            continue;
        };
        let served = serve(stream, peer);
        tokio::spawn(async move {
            served.await;
            drop(from_here);
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

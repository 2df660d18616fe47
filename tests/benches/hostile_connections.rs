//! What strangers cost the gateway before they authenticate: the operator's
//! resident memory with 1,000 hostile connections held open at once, from
//! four loopback addresses (250 each, under the per-address limit), in
//! three shapes:
//! - `idle`: TCP connected, nothing sent;
//! - `handshake`: TLS done, no first message;
//! - `big-frame`: TLS done, a first frame announcing 16 MiB and 60 KiB of it
//!   sent (the attack that took the operator from 31 MiB to 1.3 GiB with 80
//!   connections before the opening frame limit): refused at its header;
//! - `partial-frame`: TLS done, a first frame announcing 127 KiB (just under
//!   the limit) and 60 KiB of it sent: the worst a stranger can hold.
//!
//! Each shape runs against a fresh operator. Prints one JSON object per shape. Run with `scripts/bench-hostile` (it
//! builds the release binaries first).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tenet_agent::connection::enrolment_tls;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const CONNECTIONS: usize = 1000;
const ADDRESSES: [&str; 4] = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];

async fn tcp(from: &str, to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().expect("address"))?;
    socket.connect(to).await
}

/// Open `CONNECTIONS` of `shape`; how many the gateway still holds once
/// they are all open (it closes the ones it refuses).
async fn open(
    shape: &str,
    to: std::net::SocketAddr,
    fingerprint: [u8; 32],
) -> Vec<Box<dyn std::any::Any + Send>> {
    let config = Arc::new(enrolment_tls(fingerprint).expect("tls"));
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for i in 0..CONNECTIONS {
        let from = ADDRESSES[i % ADDRESSES.len()];
        let Ok(stream) = tcp(from, to).await else {
            continue;
        };
        if shape == "idle" {
            held.push(Box::new(stream));
            continue;
        }
        let name = ServerName::IpAddress(to.ip().into());
        let Ok(mut tls) = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, stream)
            .await
        else {
            continue;
        };
        let announced: u32 = match shape {
            "big-frame" => 16 << 20,
            "partial-frame" => 127 * 1024,
            _ => 0,
        };
        if announced > 0 {
            let _ = tls.write_all(&announced.to_be_bytes()).await;
            let _ = tls.write_all(&[0u8; 60 * 1024]).await;
            let _ = tls.flush().await;
        }
        held.push(Box::new(tls));
    }
    held
}

/// A fresh operator in `dir`: its pid, its gateway address, the CA fingerprint.
fn operator(dir: &std::path::Path) -> (tenet_e2e::Running, std::net::SocketAddr, [u8; 32]) {
    let port = tenet_e2e::free_port();
    let operator = std::process::Command::new(tenet_e2e::binary("tenet"))
        .args(["operator", "--policies", "policies", "--data", "data"])
        .args(["--admin-key", "admin.pub", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--metrics", "127.0.0.1:0"])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("operator");
    let running = tenet_e2e::Running(operator);
    let address = format!("127.0.0.1:{port}").parse().expect("address");
    tenet_e2e::wait_until(Duration::from_secs(30), "the gateway", || {
        std::net::TcpStream::connect(address).is_ok()
    });
    let (_, fingerprint) = tenet_e2e::create_token(dir, &[]);
    let fingerprint: [u8; 32] = hex::decode(fingerprint.trim_start_matches("sha256:"))
        .ok()
        .and_then(|b| b.try_into().ok())
        .expect("fingerprint");
    (running, address, fingerprint)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    let admin = tenet_protocol::KeyPair::generate(tenet_protocol::Algorithm::Ed25519).expect("key");
    std::fs::write(
        dir.join("admin.pub"),
        tenet_protocol::Signer::public_key(&admin).to_pem(),
    )
    .expect("pub");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for shape in ["idle", "handshake", "big-frame", "partial-frame"] {
        let (running, to, fingerprint) = operator(dir);
        let pid = running.0.id();
        // Settled: the gateway's first connections (the probe above) gone.
        std::thread::sleep(Duration::from_secs(1));
        let before = tenet_e2e::rss_kib(pid).unwrap_or(0);
        let held = runtime.block_on(open(shape, to, fingerprint));
        // Let the gateway take what was sent.
        std::thread::sleep(Duration::from_secs(2));
        let during = tenet_e2e::rss_kib(pid).unwrap_or(0);
        println!(
            "{{\"shape\": \"{shape}\", \"opened\": {}, \"rss_kib_before\": {before}, \"rss_kib_during\": {during}, \"kib_per_connection\": {:.1}}}",
            held.len(),
            (during.saturating_sub(before)) as f64 / held.len().max(1) as f64
        );
        runtime.block_on(async move { drop(held) });
        drop(running);
    }
}

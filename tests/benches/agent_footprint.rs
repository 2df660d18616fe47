//! The agent's resident memory while idle: enrolled, connected to the
//! gateway over mTLS, its first inventory sent, nothing to do. Target: at
//! most 15 MiB. Prints one JSON object.
//!
//! Run with `scripts/bench-agent` (it builds the release agent first), or
//! `cargo build --release -p tenet-agent && cargo bench -p tenet-e2e --bench agent_footprint`.

use std::time::Duration;

use tenet_e2e::{Event, Fixture, wait_for};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let f = Fixture::new();
    let gw = f.gateway("127.0.0.1:0", Duration::from_secs(3600));
    f.enrol(&gw.address.to_string());
    let agent = f.run_agent();
    f.connected();
    wait_for(&f.events, Duration::from_secs(10), |e| {
        matches!(e, Event::Inventory(_)).then_some(())
    });
    // Idle: sample once a second for ten seconds (inventory every second).
    let pid = agent.0.id();
    let mut samples = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(kib) = tenet_e2e::rss_kib(pid) {
            samples.push(kib);
        }
    }
    let max = samples.iter().copied().max().unwrap_or(0);
    let last = samples.last().copied().unwrap_or(0);
    println!(
        "{{\"idle_rss_kib_max\": {max}, \"idle_rss_kib_last\": {last}, \"samples\": {}, \"target_kib\": 15360}}",
        samples.len()
    );
}

//! The operator's clock and how it writes times for people.

pub use tenet_protocol::host::now_ms;

/// A unix time in milliseconds as RFC 3339 (UTC).
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
}

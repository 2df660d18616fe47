//! The operator's clock and how it writes times for people.

pub use tenet_protocol::host::now_ms;

/// A unix time in milliseconds as RFC 3339 (UTC).
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
}

/// A duration as Kubernetes CEL's `duration()` reads it: a sequence of
/// number-unit pairs (`1h30m`, `90s`, `500ms`). Returns seconds.
pub fn parse_duration(text: &str) -> Result<f64, String> {
    let bad = || format!("{text:?} is not a duration such as 1h, 30m or 1h30m");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let (unit, len) = [
            ("ms", 0.001),
            ("us", 1e-6),
            ("ns", 1e-9),
            ("h", 3600.0),
            ("m", 60.0),
            ("s", 1.0),
        ]
        .iter()
        .find(|(u, _)| rest.starts_with(u))
        .map(|(u, f)| (*f, u.len()))
        .ok_or_else(bad)?;
        total += n * unit;
        rest = &rest[len..];
    }
    Ok(total)
}

/// A lifetime in milliseconds: days (`30d`), or a [`parse_duration`]
/// duration (`12h`, `90m`, `1h30m`).
pub fn parse_lifetime_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?}: write a number and d, h, m or s, e.g. 30d");
    let seconds = match text.trim().strip_suffix('d') {
        Some(days) => days
            .parse::<u64>()
            .map_err(|_| bad())?
            .checked_mul(86_400)
            .ok_or_else(bad)? as f64,
        None => parse_duration(text).map_err(|_| bad())?,
    };
    if !(seconds.is_finite() && seconds > 0.0 && seconds < 1e15) {
        return Err(bad());
    }
    Ok((seconds * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_kubernetes_cel_reads_them() {
        assert_eq!(parse_duration("1h"), Ok(3600.0));
        assert_eq!(parse_duration("1h30m"), Ok(5400.0));
        assert_eq!(parse_duration("500ms"), Ok(0.5));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("1 hour").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").is_err());
    }

    #[test]
    fn lifetimes_take_days_too() {
        assert_eq!(parse_lifetime_ms("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_lifetime_ms("12h"), Ok(12 * 3_600_000));
        assert_eq!(parse_lifetime_ms("1h30m"), Ok(5_400_000));
        assert_eq!(
            parse_lifetime_ms("soon"),
            Err("\"soon\": write a number and d, h, m or s, e.g. 30d".into())
        );
        assert!(parse_lifetime_ms("0s").is_err());
        assert!(parse_lifetime_ms("99999999999999999d").is_err());
    }
}

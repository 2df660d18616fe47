//! Maintenance windows: when a remediation may start. A window is days of
//! the week, a start and an end time of day, in a time zone (an IANA name,
//! looked up in the system's time zone database). An end before the start
//! runs past midnight into the next day. The admins approve a policy's
//! windows with the rest of its remediation; the operator dispatches only
//! inside one, and the terminal refuses to start a payload outside all of
//! them ([`check`]).
//!
//! Times are civil times in the zone: on the day clocks go forward, a
//! window wholly inside the skipped hour does not open; on the day they
//! go back, one inside the repeated hour is open through both.

use jiff::Timestamp;
use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// One maintenance window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// The days it opens on: bit 0 Monday ... bit 6 Sunday.
    pub days: u8,
    /// When it opens and closes, in minutes after midnight (0..1440);
    /// `end <= start` closes on the next day.
    pub start_minute: u16,
    pub end_minute: u16,
    /// An IANA time zone name (`Asia/Tokyo`, `UTC`).
    pub time_zone: String,
}

/// The days' names, Monday first, as policies write them.
pub const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

fn day_index(w: Weekday) -> u8 {
    (w.to_monday_zero_offset()) as u8
}

impl Window {
    fn zone(&self) -> Result<TimeZone, String> {
        TimeZone::get(&self.time_zone)
            .map_err(|e| format!("time zone {:?} is not known here: {e}", self.time_zone))
    }

    fn opens_on(&self, day: Weekday) -> bool {
        self.days & (1 << day_index(day)) != 0
    }

    fn time(minute: u16) -> Time {
        Time::constant((minute / 60 % 24) as i8, (minute % 60) as i8, 0, 0)
    }

    /// Whether the window is open at `at_ms` (unix ms).
    pub fn contains(&self, at_ms: u64) -> Result<bool, String> {
        let zone = self.zone()?;
        let at = Timestamp::from_millisecond(at_ms as i64).map_err(|e| e.to_string())?;
        let local = at.to_zoned(zone);
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        let today = local.weekday();
        let yesterday = today.previous();
        Ok(if self.start_minute < self.end_minute {
            self.opens_on(today) && (self.start_minute..self.end_minute).contains(&minute)
        } else {
            // Past midnight: open from the start on an opening day, and
            // until the end on the day after one.
            (self.opens_on(today) && minute >= self.start_minute)
                || (self.opens_on(yesterday) && minute < self.end_minute)
        })
    }

    /// When it next opens after `at_ms` (unix ms), within a week.
    pub fn next_opening(&self, at_ms: u64) -> Result<Option<u64>, String> {
        let zone = self.zone()?;
        let at = Timestamp::from_millisecond(at_ms as i64).map_err(|e| e.to_string())?;
        let local = at.to_zoned(zone.clone());
        for ahead in 0..8 {
            let date = local
                .date()
                .checked_add(jiff::Span::new().days(ahead))
                .map_err(|e| e.to_string())?;
            if !self.opens_on(date.weekday()) {
                continue;
            }
            let opening = date
                .to_datetime(Self::time(self.start_minute))
                .to_zoned(zone.clone())
                .map_err(|e| e.to_string())?;
            let ms = opening.timestamp().as_millisecond();
            if ms > at_ms as i64 {
                return Ok(Some(ms as u64));
            }
        }
        Ok(None)
    }

    /// `Tue 02:00 Asia/Tokyo` for an opening at `at_ms`.
    pub fn describe_opening(&self, at_ms: u64) -> String {
        let Ok(zone) = self.zone() else {
            return self.time_zone.clone();
        };
        let Ok(at) = Timestamp::from_millisecond(at_ms as i64) else {
            return self.time_zone.clone();
        };
        let local = at.to_zoned(zone);
        format!(
            "{} {:02}:{:02} {}",
            DAY_NAMES[day_index(local.weekday()) as usize],
            local.hour(),
            local.minute(),
            self.time_zone
        )
    }
}

/// Whether `at_ms` is inside one of `windows` (no windows: always).
/// Otherwise why not, naming when the next one opens.
pub fn check(windows: &[Window], at_ms: u64) -> Result<(), String> {
    match closed(windows, at_ms) {
        None => Ok(()),
        Some(next) => Err(format!("outside the maintenance windows ({next})")),
    }
}

/// `None` when `at_ms` is inside one of `windows` (or there are none);
/// otherwise when the next opens (`the next opens Thu 02:00 Asia/Tokyo`),
/// or why it cannot be told.
pub fn closed(windows: &[Window], at_ms: u64) -> Option<String> {
    let mut open = windows.is_empty();
    let mut unknown = None;
    for w in windows {
        match w.contains(at_ms) {
            Ok(true) => open = true,
            Ok(false) => {}
            // A window this system cannot place does not close the others.
            Err(e) => unknown = Some(e),
        }
    }
    if open {
        return None;
    }
    if let Some(e) = unknown {
        return Some(e);
    }
    Some(match next_opening(windows, at_ms) {
        Ok(Some((w, ms))) => format!("the next opens {}", w.describe_opening(ms)),
        Ok(None) => "none opens".into(),
        Err(e) => e,
    })
}

/// The window that opens next after `at_ms`, and when.
pub fn next_opening(windows: &[Window], at_ms: u64) -> Result<Option<(&Window, u64)>, String> {
    let mut next: Option<(&Window, u64)> = None;
    for w in windows {
        if let Some(ms) = w.next_opening(at_ms)?
            && next.is_none_or(|(_, n)| ms < n)
        {
            next = Some((w, ms));
        }
    }
    Ok(next)
}

/// Parse `HH:MM` (00:00 to 24:00) into minutes after midnight.
pub fn parse_time_of_day(text: &str) -> Result<u16, String> {
    let bad = || format!("{text:?} is not a time of day (HH:MM, 00:00 to 24:00)");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// Check that `name` is a time zone this system knows.
pub fn check_time_zone(name: &str) -> Result<(), String> {
    TimeZone::get(name).map(drop).map_err(|_| {
        format!(
            "{name:?} is not a time zone this system knows (an IANA name such as Asia/Tokyo or UTC)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-01 is a Tuesday.
    fn ms(rfc3339: &str) -> u64 {
        rfc3339
            .parse::<Timestamp>()
            .expect("timestamp")
            .as_millisecond() as u64
    }

    fn tokyo_nights() -> Window {
        // Tue and Thu, 02:00 to 05:00 in Tokyo.
        Window {
            days: 0b0000_1010,
            start_minute: 120,
            end_minute: 300,
            time_zone: "Asia/Tokyo".into(),
        }
    }

    #[test]
    fn open_on_its_days_between_its_hours_in_its_zone() {
        let w = tokyo_nights();
        // Tue 03:00 in Tokyo is Mon 18:00 UTC.
        assert_eq!(w.contains(ms("2026-11-30T18:00:00Z")), Ok(true));
        // Tue 05:00 in Tokyo: closed (the end is excluded).
        assert_eq!(w.contains(ms("2026-11-30T20:00:00Z")), Ok(false));
        // Wed 03:00 in Tokyo: not an opening day.
        assert_eq!(w.contains(ms("2026-12-01T18:00:00Z")), Ok(false));
        // Tue 02:00 UTC is Tue 11:00 in Tokyo.
        assert_eq!(w.contains(ms("2026-12-01T02:00:00Z")), Ok(false));
    }

    #[test]
    fn a_window_past_midnight_runs_into_the_next_day() {
        // Fri 22:00 to Sat 04:00 UTC.
        let w = Window {
            days: 1 << 4,
            start_minute: 22 * 60,
            end_minute: 4 * 60,
            time_zone: "UTC".into(),
        };
        assert_eq!(w.contains(ms("2026-12-04T23:00:00Z")), Ok(true)); // Fri
        assert_eq!(w.contains(ms("2026-12-05T03:59:00Z")), Ok(true)); // Sat
        assert_eq!(w.contains(ms("2026-12-05T04:00:00Z")), Ok(false));
        assert_eq!(w.contains(ms("2026-12-05T23:00:00Z")), Ok(false)); // Sat night
    }

    #[test]
    fn outside_every_window_names_the_next_opening() {
        let w = tokyo_nights();
        // Wed 12:00 in Tokyo: the next opening is Thu 02:00.
        assert_eq!(
            check(std::slice::from_ref(&w), ms("2026-12-02T03:00:00Z")),
            Err("outside the maintenance windows (the next opens Thu 02:00 Asia/Tokyo)".into())
        );
        assert_eq!(check(&[w], ms("2026-11-30T18:00:00Z")), Ok(()));
        assert_eq!(check(&[], 0), Ok(()));
    }

    #[test]
    fn the_daylight_saving_change_is_the_zones_business() {
        // Sundays 01:30 to 03:30 in Berlin; on 2026-10-25 clocks go back.
        let w = Window {
            days: 1 << 6,
            start_minute: 90,
            end_minute: 210,
            time_zone: "Europe/Berlin".into(),
        };
        // 00:30 UTC is 02:30 CEST (summer time, still on that morning).
        assert_eq!(w.contains(ms("2026-10-25T00:30:00Z")), Ok(true));
        // 02:45 UTC is 03:45 CET: closed.
        assert_eq!(w.contains(ms("2026-10-25T02:45:00Z")), Ok(false));
    }

    #[test]
    fn times_and_zones_are_checked() {
        assert_eq!(parse_time_of_day("02:00"), Ok(120));
        assert_eq!(parse_time_of_day("24:00"), Ok(1440));
        assert_eq!(
            parse_time_of_day("2:00"),
            Err("\"2:00\" is not a time of day (HH:MM, 00:00 to 24:00)".into())
        );
        assert!(parse_time_of_day("24:30").is_err());
        assert!(parse_time_of_day("12:60").is_err());
        assert_eq!(check_time_zone("Asia/Tokyo"), Ok(()));
        assert_eq!(
            check_time_zone("Mars/Olympus"),
            Err("\"Mars/Olympus\" is not a time zone this system knows (an IANA name such as Asia/Tokyo or UTC)".into())
        );
        let unknown = Window {
            time_zone: "Mars/Olympus".into(),
            ..tokyo_nights()
        };
        assert!(
            unknown
                .contains(0)
                .expect_err("unknown")
                .starts_with("time zone \"Mars/Olympus\" is not known here")
        );
    }
}

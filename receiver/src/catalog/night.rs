//! Observation times and the night rule.
//!
//! A night is the observatory's local date of the evening: local times from noon of day D
//! to just before noon of day D+1 belong to night D. Times are UTC in the headers; the
//! timezone is `catalog.timezone` (default Asia/Tokyo, which has no daylight saving time;
//! zones that have it are handled by chrono-tz).

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};

/// MJD 0 is 1858-11-17T00:00:00 UTC; the Unix epoch is MJD 40587.
const UNIX_EPOCH_MJD: f64 = 40_587.0;

/// The night rule lives in common, where the agent's `replay --night` uses it too.
pub use skyferry_common::night::{night_of, parse_night};

pub fn mjd_of(t: DateTime<Utc>) -> f64 {
    t.timestamp_micros() as f64 / 86_400e6 + UNIX_EPOCH_MJD
}

/// The UTC time of a modified Julian date, to the microsecond; `None` far outside the
/// range of dates a header can mean.
pub fn utc_of_mjd(mjd: f64) -> Option<DateTime<Utc>> {
    if !mjd.is_finite() || !(0.0..=200_000.0).contains(&mjd) {
        return None;
    }
    DateTime::from_timestamp_micros(((mjd - UNIX_EPOCH_MJD) * 86_400e6).round() as i64)
}

/// An ISO date-time (`2024-05-01T10:40:30.5`, with or without `Z`, fractional seconds
/// optional), read as UTC.
pub fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim().trim_end_matches('Z');
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    None
}

/// A date only (`2024-05-01`; also the old `01/05/24` form is not accepted).
pub fn parse_date(s: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok()
}

/// A time of day (`10:40:30`, `10:40:30.123`).
pub fn parse_time(s: &str) -> Option<NaiveTime> {
    let s = s.trim().trim_end_matches('Z');
    NaiveTime::parse_from_str(s, "%H:%M:%S%.f")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M"))
        .ok()
}

/// `obs_release_date`: `months` after `t` (clamped to the end of a shorter month).
pub fn release_date(t: DateTime<Utc>, months: u32) -> DateTime<Utc> {
    t.checked_add_months(chrono::Months::new(months))
        .unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        parse_datetime(s).unwrap()
    }

    #[test]
    fn the_night_runs_from_noon_to_noon_local_time() {
        let tokyo = chrono_tz::Asia::Tokyo;
        let d = |s| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        // 19:30 JST on May 1st: night of May 1st.
        assert_eq!(night_of(utc("2024-05-01T10:30:00"), tokyo), d("2024-05-01"));
        // 04:00 JST on May 2nd: still the night of May 1st.
        assert_eq!(night_of(utc("2024-05-01T19:00:00"), tokyo), d("2024-05-01"));
        // 11:59:59 JST is the same night; 12:00 JST starts the next.
        assert_eq!(night_of(utc("2024-05-02T02:59:59"), tokyo), d("2024-05-01"));
        assert_eq!(night_of(utc("2024-05-02T03:00:00"), tokyo), d("2024-05-02"));
        // Another observatory: Chile, with daylight saving time (UTC-3 in January).
        let santiago = chrono_tz::America::Santiago;
        assert_eq!(
            night_of(utc("2024-01-10T14:59:00"), santiago),
            d("2024-01-09")
        );
        assert_eq!(
            night_of(utc("2024-01-10T15:00:00"), santiago),
            d("2024-01-10")
        );
    }

    #[test]
    fn times_parse_in_the_forms_headers_use() {
        assert_eq!(utc("2024-05-01T10:40:30Z"), utc("2024-05-01T10:40:30.000"));
        assert_eq!(
            mjd_of(utc("2024-05-01T10:30:00")),
            60431.4375,
            "the generator's first exposure"
        );
        let back = utc_of_mjd(60431.4375).unwrap();
        assert_eq!(back, utc("2024-05-01T10:30:00"));
        assert!(parse_time("10:40:30.5").is_some());
        assert!(parse_datetime("2024-05-01").is_none());
        assert_eq!(parse_night("20240501"), parse_night("2024-05-01"));
        assert!(utc_of_mjd(f64::NAN).is_none());
        assert_eq!(
            release_date(utc("2024-08-31T00:00:00"), 6),
            utc("2025-02-28T00:00:00")
        );
    }
}

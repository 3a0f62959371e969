//! The observatory night rule: a night is the local date of the evening; local times from
//! noon of day D to just before noon of day D+1 belong to night D. Shared by the
//! receiver's catalog (observation times) and the agent's `replay --night` (mtimes).

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};

/// The night a UTC time belongs to in `tz`.
pub fn night_of(t: DateTime<Utc>, tz: chrono_tz::Tz) -> NaiveDate {
    (tz.from_utc_datetime(&t.naive_utc()) - Duration::hours(12)).date_naive()
}

/// The UTC instants `[start, end)` of night `night` in `tz`: local noon of its date to
/// local noon of the next (noon is never skipped or repeated by a DST change).
pub fn night_bounds(night: NaiveDate, tz: chrono_tz::Tz) -> (DateTime<Utc>, DateTime<Utc>) {
    let noon = |d: NaiveDate| {
        let local = d.and_time(NaiveTime::from_hms_opt(12, 0, 0).unwrap_or_default());
        tz.from_local_datetime(&local)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|| local.and_utc())
    };
    (noon(night), noon(night + Duration::days(1)))
}

/// A night given on the command line: `2024-05-01` or `20240501`.
pub fn parse_night(s: &str) -> Option<NaiveDate> {
    let s = s.trim();
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(s, "%Y%m%d"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_agree_with_the_rule_on_both_sides_of_each_edge() {
        for tz in [chrono_tz::Asia::Tokyo, chrono_tz::America::Santiago] {
            let night = parse_night("20240405").unwrap();
            let (start, end) = night_bounds(night, tz);
            assert_eq!(night_of(start, tz), night);
            assert_eq!(night_of(end - Duration::seconds(1), tz), night);
            assert_eq!(
                night_of(start - Duration::seconds(1), tz),
                night - Duration::days(1)
            );
            assert_eq!(night_of(end, tz), night + Duration::days(1));
        }
        let (start, _) = night_bounds(parse_night("2024-05-01").unwrap(), chrono_tz::Asia::Tokyo);
        assert_eq!(start.to_rfc3339(), "2024-05-01T03:00:00+00:00");
        assert!(parse_night("2024-13-01").is_none());
    }
}

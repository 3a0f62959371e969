//! Bandwidth caps with a day schedule: `"200MB/s"`, `"off"`, or
//! `"08:00 200MB/s, 18:00 off"` (from 08:00 local time 200 MB/s, from 18:00 no cap; the
//! last step of the day runs on past midnight to the first). Rates are byte sizes
//! ([`super::reader::parse_size`] units) per second; `off` means unlimited.

use super::reader::parse_size;

/// A cap that may change with the time of day.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateSchedule {
    /// (minute of the day it starts, bytes per second or `None` for no cap), sorted by
    /// minute; empty for no cap at all.
    steps: Vec<(u16, Option<u64>)>,
}

impl RateSchedule {
    /// No cap.
    pub fn off() -> RateSchedule {
        RateSchedule::default()
    }

    /// A cap that is the same all day.
    pub fn constant(bytes_per_second: u64) -> RateSchedule {
        RateSchedule {
            steps: vec![(0, Some(bytes_per_second))],
        }
    }

    pub fn parse(text: &str) -> Result<RateSchedule, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("an empty rate (write \"off\" for no cap)".into());
        }
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        // A lone time of day ("08:00") is a step without its rate, not a rate.
        if parts.len() == 1 && !parts[0].contains(' ') && !parts[0].contains(':') {
            return Ok(RateSchedule {
                steps: vec![(0, parse_rate(parts[0])?)],
            });
        }
        let mut steps = Vec::with_capacity(parts.len());
        for part in parts {
            let (time, rate) = part.split_once(' ').ok_or_else(|| {
                format!("{part:?}: a step is \"HH:MM RATE\", e.g. \"08:00 200MB/s\"")
            })?;
            let minute = parse_minute(time)?;
            if steps.last().is_some_and(|(m, _)| *m >= minute) {
                return Err(format!(
                    "{part:?}: the steps must be in order of time of day, each time once"
                ));
            }
            steps.push((minute, parse_rate(rate.trim())?));
        }
        Ok(RateSchedule { steps })
    }

    /// The cap in force at `minute` of the day (0..1440).
    pub fn at(&self, minute: u16) -> Option<u64> {
        let step = self
            .steps
            .iter()
            .rev()
            .find(|(m, _)| *m <= minute)
            .or(self.steps.last());
        step.and_then(|(_, r)| *r)
    }

    pub fn is_off(&self) -> bool {
        self.steps.iter().all(|(_, r)| r.is_none())
    }
}

fn parse_minute(t: &str) -> Result<u16, String> {
    let bad = || format!("{t:?} is not a time of day (HH:MM, 00:00 to 23:59)");
    let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || t.trim().len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// `200MB/s`, `1.5GiB/s`, `off`.
pub fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let size = s.strip_suffix("/s").ok_or_else(|| {
        format!("{s:?} is not a rate: write a size per second (e.g. \"200MB/s\") or \"off\"")
    })?;
    match parse_size(size)? {
        0 => Err(format!(
            "{s:?}: a rate of zero would stop all traffic (\"off\" is no cap)"
        )),
        n => Ok(Some(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn schedules_parse_and_wrap_past_midnight() {
        let s = RateSchedule::parse("08:00 200MB/s, 18:00 off").unwrap();
        assert_eq!(
            s.at(7 * 60 + 59),
            None,
            "before 08:00 the 18:00 step still holds"
        );
        assert_eq!(s.at(8 * 60), Some(200_000_000));
        assert_eq!(s.at(17 * 60 + 59), Some(200_000_000));
        assert_eq!(s.at(18 * 60), None);
        let s = RateSchedule::parse("00:30 1MiB/s, 12:00 2MB/s").unwrap();
        assert_eq!(s.at(0), Some(2_000_000));
        assert_eq!(s.at(30), Some(1 << 20));
        assert_eq!(
            RateSchedule::parse("20MB/s").unwrap(),
            RateSchedule::constant(20_000_000)
        );
        assert!(RateSchedule::parse("off").unwrap().is_off());
    }

    #[test]
    fn bad_schedules_name_the_problem() {
        for (text, says) in [
            ("", "empty"),
            ("200MB", "not a rate"),
            ("0MB/s", "zero"),
            ("25:00 1MB/s", "not a time of day"),
            ("8:00 1MB/s", "not a time of day"),
            ("18:00 off, 08:00 1MB/s", "in order"),
            ("08:00", "HH:MM RATE"),
            ("08:00 fast/s", "fast"),
        ] {
            let e = RateSchedule::parse(text).expect_err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn the_step_in_force_is_the_latest_one_started(
            mut mins in proptest::collection::btree_set(0u16..1440, 1..6),
            rates in proptest::collection::vec(1u64..1_000_000_000, 6),
            at in 0u16..1440,
        ) {
            let mins: Vec<u16> = std::mem::take(&mut mins).into_iter().collect();
            let text: Vec<String> = mins.iter().zip(&rates)
                .map(|(m, r)| format!("{:02}:{:02} {r}B/s", m / 60, m % 60)).collect();
            let s = RateSchedule::parse(&text.join(", ")).unwrap();
            let i = mins.iter().rposition(|m| *m <= at).unwrap_or(mins.len() - 1);
            prop_assert_eq!(s.at(at), Some(rates[i]));
        }
    }
}

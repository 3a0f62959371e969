//! A TOML table walker that collects problems instead of stopping at the first one.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// Reads the keys of one TOML table, remembering which were used so that the rest can be
/// reported as unknown.
pub(crate) struct Section<'a> {
    name: String,
    table: Option<&'a toml::Table>,
    used: BTreeSet<&'static str>,
}

pub(crate) type Problems = Vec<String>;

impl<'a> Section<'a> {
    /// The sub-table `key` of `parent` (absent tables read as empty).
    pub fn of(parent: &'a toml::Table, key: &str, problems: &mut Problems) -> Section<'a> {
        let table = match parent.get(key) {
            None => None,
            Some(toml::Value::Table(t)) => Some(t),
            Some(other) => {
                problems.push(format!(
                    "[{key}] must be a table, found {}",
                    other.type_str()
                ));
                None
            }
        };
        Section {
            name: key.to_owned(),
            table,
            used: BTreeSet::new(),
        }
    }

    pub fn from_table(name: String, table: &'a toml::Table) -> Section<'a> {
        Section {
            name,
            table: Some(table),
            used: BTreeSet::new(),
        }
    }

    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }

    fn value(&mut self, key: &'static str) -> Option<&'a toml::Value> {
        self.used.insert(key);
        self.table.and_then(|t| t.get(key))
    }

    fn typed<T>(
        &mut self,
        key: &'static str,
        want: &str,
        p: &mut Problems,
        f: impl FnOnce(&'a toml::Value) -> Option<T>,
    ) -> Option<T> {
        let v = self.value(key)?;
        let out = f(v);
        if out.is_none() {
            p.push(format!(
                "{} must be {want}, found {}",
                self.key(key),
                v.type_str()
            ));
        }
        out
    }

    pub fn string(&mut self, key: &'static str, p: &mut Problems) -> Option<String> {
        self.typed(key, "a string", p, |v| v.as_str().map(str::to_owned))
    }

    pub fn required_string(&mut self, key: &'static str, p: &mut Problems) -> Option<String> {
        let present = self.table.is_some_and(|t| t.contains_key(key));
        let v = self.string(key, p);
        if !present {
            p.push(format!("{} is required", self.key(key)));
        }
        v
    }

    pub fn required_path(&mut self, key: &'static str, p: &mut Problems) -> Option<PathBuf> {
        self.required_string(key, p).map(PathBuf::from)
    }

    /// Marks `key` as known without reading it (a sub-table read on its own).
    pub fn known(&mut self, key: &'static str) {
        self.used.insert(key);
    }

    pub fn boolean(&mut self, key: &'static str, default: bool, p: &mut Problems) -> bool {
        self.typed(key, "true or false", p, toml::Value::as_bool)
            .unwrap_or(default)
    }

    pub fn integer(&mut self, key: &'static str, p: &mut Problems) -> Option<i64> {
        self.typed(key, "an integer", p, toml::Value::as_integer)
    }

    /// An integer within `[min, max]`, or `default` when absent.
    pub fn integer_in(
        &mut self,
        key: &'static str,
        default: i64,
        (min, max): (i64, i64),
        p: &mut Problems,
    ) -> i64 {
        match self.integer(key, p) {
            None => default,
            Some(v) if v < min || v > max => {
                p.push(format!(
                    "{} = {v} is out of range ({min}..={max})",
                    self.key(key)
                ));
                default
            }
            Some(v) => v,
        }
    }

    pub fn strings(&mut self, key: &'static str, p: &mut Problems) -> Vec<String> {
        self.typed(key, "an array of strings", p, |v| {
            v.as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
    }

    pub fn duration(&mut self, key: &'static str, default: Duration, p: &mut Problems) -> Duration {
        let Some(s) = self.string(key, p) else {
            return default;
        };
        parse_duration(&s).unwrap_or_else(|e| {
            p.push(format!("{}: {e}", self.key(key)));
            default
        })
    }

    pub fn size(&mut self, key: &'static str, default: u64, p: &mut Problems) -> u64 {
        let Some(v) = self.value(key) else {
            return default;
        };
        let parsed = match v {
            toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| format!("{i} is negative")),
            toml::Value::String(s) => parse_size(s),
            other => Err(format!("expected a size, found {}", other.type_str())),
        };
        parsed.unwrap_or_else(|e| {
            p.push(format!("{}: {e}", self.key(key)));
            default
        })
    }

    /// Reports every key of this table that was never asked for.
    pub fn finish(self, p: &mut Problems) {
        let Some(t) = self.table else { return };
        for k in t.keys() {
            if !self.used.contains(k.as_str()) {
                let known: Vec<_> = self.used.iter().copied().collect();
                p.push(format!(
                    "unknown key {}.{k} (known keys: {})",
                    self.name,
                    known.join(", ")
                ));
            }
        }
    }
}

/// Reports unknown top-level tables.
pub(crate) fn unknown_tables(root: &toml::Table, known: &[&str], p: &mut Problems) {
    for k in root.keys() {
        if !known.contains(&k.as_str()) {
            p.push(format!(
                "unknown section [{k}] (known sections: {})",
                known.join(", ")
            ));
        }
    }
}

/// Parses "500ms", "5s", "2m", "1h 30m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. \"5s\" or \"2m\""))
}

/// Parses a byte size: a plain number of bytes, or a number with a unit
/// (B, KiB, MiB, GiB, TiB, or the decimal kB, MB, GB, TB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let err = || format!("{s:?} is not a size; use e.g. \"4 MiB\" or \"65536\"");
    let num: f64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(err()),
    };
    let bytes = num * mult as f64;
    if !(0.0..1.8e19).contains(&bytes) {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4 MiB"), Ok(4 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("10 MB"), Ok(10_000_000));
        assert!(parse_size("four").is_err());
        assert!(parse_size("4 parsecs").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
    }
}

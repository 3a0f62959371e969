//! Reading the catalog back: `catalog query` (by night, time, object, cone, agent) and
//! `catalog nights`. Reads the Arrow files only, never the staging database, so it runs
//! beside a live receiver.
//!
//! A cone search turns the cone into HEALPix index ranges (`sky::cone_ranges`), reads only
//! the batches whose index range (in the file's footer) meets one of them, and keeps the
//! rows within the exact angular distance.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Float64Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::FileReader;
use arrow_schema::{DataType, SchemaRef};
use chrono::{DateTime, NaiveDate};
use serde_json::Value;

use super::arrow_file::{self, NightSummary, BATCH_RANGES_KEY, SUMMARY_FILE};
use super::sky;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Usage(String),
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cone {
    pub ra: f64,
    pub dec: f64,
    pub radius: f64,
}

impl Cone {
    /// `RA,DEC,RADIUS` in degrees; RA and Dec may be sexagesimal (RA in hours).
    pub fn parse(s: &str) -> Result<Cone, QueryError> {
        let usage = |m: String| QueryError::Usage(m);
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let [ra, dec, radius] = parts[..] else {
            return Err(usage(format!(
                "--cone {s:?}: expected RA,DEC,RADIUS (degrees, e.g. 83.82,-5.39,0.5 or 05:35:17,-05:23:28,0.5)"
            )));
        };
        let ra = sky::parse_ra(ra).ok_or_else(|| {
            usage(format!(
                "--cone: RA {ra:?} is not a right ascension (degrees in [0, 360) or hh:mm:ss in [0h, 24h))"
            ))
        })?;
        let dec = sky::parse_dec(dec).ok_or_else(|| {
            usage(format!(
                "--cone: Dec {dec:?} is not a declination (degrees in [-90, 90] or ±dd:mm:ss)"
            ))
        })?;
        let radius = radius
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0 && *r <= 180.0)
            .ok_or_else(|| {
                usage(format!(
                    "--cone: radius {radius:?} is not a number of degrees in (0, 180]"
                ))
            })?;
        Ok(Cone { ra, dec, radius })
    }
}

/// What to look for. Times are MJD, compared with `t_min`.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub night: Option<NaiveDate>,
    pub since: Option<f64>,
    pub until: Option<f64>,
    /// `target_name`, compared without regard to case.
    pub object: Option<String>,
    pub cone: Option<Cone>,
    pub agent: Option<String>,
    /// Superseded versions too (by default only current rows).
    pub all_versions: bool,
    pub limit: Option<usize>,
}

/// A time on the command line: `2024-05-01`, `2024-05-01T10:40:00[Z]` (UTC), or an MJD.
pub fn parse_time_arg(flag: &str, s: &str) -> Result<f64, QueryError> {
    if let Some(t) = super::night::parse_datetime(s) {
        return Ok(super::night::mjd_of(t));
    }
    if let Some(d) = super::night::parse_date(s) {
        return Ok(super::night::mjd_of(
            d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc(),
        ));
    }
    match s.trim().parse::<f64>() {
        Ok(m) if (0.0..200_000.0).contains(&m) => Ok(m),
        _ => Err(QueryError::Usage(format!(
            "{flag} {s:?}: not a time (YYYY-MM-DD, YYYY-MM-DDThh:mm:ss in UTC, or an MJD)"
        ))),
    }
}

/// The matching rows, as a batch each of the batches read (column order of the files).
pub struct Matches {
    pub schema: SchemaRef,
    pub batches: Vec<(RecordBatch, Vec<usize>)>,
    /// Record batches read (for the benchmark and `--stats`).
    pub batches_read: usize,
    pub files_opened: usize,
}

impl Matches {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|(_, r)| r.len()).sum()
    }
}

/// Runs `q` over the catalog in `dir`.
pub fn run(dir: &Path, q: &Query) -> Result<Matches, QueryError> {
    let summaries = read_summary(dir)?;
    let nights: Vec<&NightSummary> = summaries
        .iter()
        .filter(|s| q.night.is_none_or(|n| s.night == n))
        .filter(|s| q.since.is_none_or(|t| s.t_max.is_some_and(|m| m >= t)))
        .filter(|s| q.until.is_none_or(|t| s.t_min.is_some_and(|m| m <= t)))
        .filter(|s| {
            q.cone.is_none_or(|c| match (s.dec_min, s.dec_max) {
                (Some(lo), Some(hi)) => c.dec + c.radius >= lo && c.dec - c.radius <= hi,
                _ => false,
            })
        })
        .collect();
    let ranges = q.cone.map(|c| sky::cone_ranges(c.ra, c.dec, c.radius));
    let mut out = Matches {
        schema: arrow_file::schema(),
        batches: Vec::new(),
        batches_read: 0,
        files_opened: 0,
    };
    let mut found = 0usize;
    for s in nights {
        let path = arrow_file::night_file(dir, s.night);
        let read_err = |reason: String| QueryError::Read {
            path: path.clone(),
            reason,
        };
        let file = File::open(&path).map_err(|e| read_err(e.to_string()))?;
        let mut reader = FileReader::try_new(BufReader::with_capacity(256 * 1024, file), None)
            .map_err(|e| read_err(e.to_string()))?;
        out.files_opened += 1;
        let wanted: Vec<usize> = match &ranges {
            None => (0..reader.num_batches()).collect(),
            Some(ranges) => {
                let meta = reader
                    .custom_metadata()
                    .get(BATCH_RANGES_KEY)
                    .cloned()
                    .unwrap_or_default();
                let per_batch: Vec<Option<(u64, u64)>> = serde_json::from_str(&meta)
                    .map_err(|e| read_err(format!("{BATCH_RANGES_KEY} in the footer: {e}")))?;
                per_batch
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| {
                        r.is_some_and(|(lo, hi)| ranges.iter().any(|c| c.start <= hi && lo < c.end))
                    })
                    .map(|(i, _)| i)
                    .collect()
            }
        };
        for i in wanted {
            reader.set_index(i).map_err(|e| read_err(e.to_string()))?;
            let Some(batch) = reader.next() else { break };
            let batch = batch.map_err(|e| read_err(e.to_string()))?;
            out.batches_read += 1;
            let rows = matching(&batch, q);
            if rows.is_empty() {
                continue;
            }
            found += rows.len();
            out.batches.push((batch, rows));
            if q.limit.is_some_and(|l| found >= l) {
                truncate(&mut out.batches, q.limit.unwrap_or(usize::MAX));
                return Ok(out);
            }
        }
    }
    Ok(out)
}

fn truncate(batches: &mut Vec<(RecordBatch, Vec<usize>)>, limit: usize) {
    let mut left = limit;
    for (_, rows) in batches.iter_mut() {
        rows.truncate(left);
        left -= rows.len();
    }
    batches.retain(|(_, r)| !r.is_empty());
}

/// Row indices of `batch` that match every condition of `q`.
fn matching(batch: &RecordBatch, q: &Query) -> Vec<usize> {
    let col = |name: &str| batch.column_by_name(name);
    let f64s = |name: &str| col(name).and_then(|c| c.as_primitive_opt::<Float64Type>());
    let strs = |name: &str| col(name).and_then(|c| c.as_string_opt::<i32>());
    let (ra, dec, t_min) = (f64s("s_ra"), f64s("s_dec"), f64s("t_min"));
    let (target, agent) = (strs("target_name"), strs("agent"));
    let superseded = col("superseded_at");
    let object = q.object.as_ref().map(|o| o.to_lowercase());
    (0..batch.num_rows())
        .filter(|&i| {
            if !q.all_versions && superseded.is_some_and(|s| s.is_valid(i)) {
                return false;
            }
            if let Some(a) = &q.agent {
                if agent.is_none_or(|c| c.is_null(i) || c.value(i) != a) {
                    return false;
                }
            }
            if let Some(o) = &object {
                if target.is_none_or(|c| c.is_null(i) || c.value(i).to_lowercase() != *o) {
                    return false;
                }
            }
            if q.since.is_some() || q.until.is_some() {
                let Some(t) = t_min.filter(|c| c.is_valid(i)).map(|c| c.value(i)) else {
                    return false;
                };
                if q.since.is_some_and(|s| t < s) || q.until.is_some_and(|u| t > u) {
                    return false;
                }
            }
            if let Some(c) = &q.cone {
                let (Some(ra), Some(dec)) = (ra, dec) else {
                    return false;
                };
                if ra.is_null(i) || dec.is_null(i) {
                    return false;
                }
                if sky::separation(c.ra, c.dec, ra.value(i), dec.value(i)) > c.radius {
                    return false;
                }
            }
            true
        })
        .collect()
}

/// The cell of column `c` at row `i`, as JSON (times as ISO strings, the night as a date,
/// the header as an object).
pub fn cell(c: &dyn Array, i: usize) -> Value {
    if c.is_null(i) {
        return Value::Null;
    }
    match c.data_type() {
        DataType::Utf8 => Value::from(c.as_string::<i32>().value(i)),
        DataType::Float64 => Value::from(c.as_primitive::<Float64Type>().value(i)),
        DataType::Int64 => Value::from(c.as_primitive::<Int64Type>().value(i)),
        DataType::Int32 => Value::from(c.as_primitive::<Int32Type>().value(i)),
        DataType::Int16 => Value::from(c.as_primitive::<Int16Type>().value(i)),
        DataType::UInt64 => Value::from(c.as_primitive::<UInt64Type>().value(i)),
        DataType::Date32 => {
            let days = c.as_primitive::<Date32Type>().value(i);
            let d = NaiveDate::from_ymd_opt(1970, 1, 1)
                .and_then(|e| e.checked_add_signed(chrono::Duration::days(days.into())));
            d.map_or(Value::Null, |d| Value::from(d.to_string()))
        }
        DataType::Timestamp(_, _) => {
            let us = c.as_primitive::<TimestampMicrosecondType>().value(i);
            DateTime::from_timestamp_micros(us).map_or(Value::Null, |t| {
                Value::from(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            })
        }
        DataType::Map(_, _) => {
            let m = c.as_map();
            let entries = m.value(i);
            let keys = entries.column(0).as_string::<i32>();
            let values = entries.column(1).as_string::<i32>();
            let mut obj = serde_json::Map::new();
            for j in 0..entries.len() {
                obj.insert(keys.value(j).to_owned(), Value::from(values.value(j)));
            }
            Value::Object(obj)
        }
        other => Value::from(format!("<{other}>")),
    }
}

/// Columns printed when `--columns` is not given.
pub const DEFAULT_COLUMNS: &[&str] = &[
    "night",
    "agent",
    "path",
    "target_name",
    "s_ra",
    "s_dec",
    "t_min",
    "exp_id",
    "det_id",
    "t_xel",
    "version",
    "data_format",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Prints the chosen columns of the matches.
pub fn print(
    m: &Matches,
    columns: &[String],
    format: Format,
    out: &mut impl Write,
) -> Result<(), QueryError> {
    let idx: Vec<usize> = columns
        .iter()
        .map(|c| {
            m.schema.index_of(c).map_err(|_| {
                let known: Vec<&str> = m
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                QueryError::Usage(format!(
                    "--columns: no column {c:?} (columns: {})",
                    known.join(", ")
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let rows = m.batches.iter().flat_map(|(b, rows)| {
        let idx = &idx;
        rows.iter().map(move |&i| {
            idx.iter()
                .map(|&c| cell(b.column(c).as_ref(), i))
                .collect::<Vec<_>>()
        })
    });
    let text = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let w = |out: &mut dyn Write, s: &str| out.write_all(s.as_bytes()).map_err(QueryError::Output);
    match format {
        Format::Json => {
            w(out, "[")?;
            for (n, row) in rows.enumerate() {
                let obj: serde_json::Map<String, Value> =
                    columns.iter().cloned().zip(row).collect();
                w(out, if n == 0 { "\n" } else { ",\n" })?;
                w(out, &Value::Object(obj).to_string())?;
            }
            w(out, "\n]\n")?;
        }
        Format::Csv => {
            let quote = |s: String| {
                if s.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s
                }
            };
            w(out, &format!("{}\n", columns.join(",")))?;
            for row in rows {
                let line: Vec<String> = row.iter().map(|v| quote(text(v))).collect();
                w(out, &format!("{}\n", line.join(",")))?;
            }
        }
        Format::Table => {
            let cells: Vec<Vec<String>> = rows
                .map(|r| r.iter().map(|v| text(v).replace('\n', " ")).collect())
                .collect();
            let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
            for r in &cells {
                for (wd, c) in widths.iter_mut().zip(r) {
                    *wd = (*wd).max(c.chars().count()).min(60);
                }
            }
            let line = |vals: &[String]| {
                let parts: Vec<String> = vals
                    .iter()
                    .zip(&widths)
                    .map(|(v, wd)| {
                        let v: String = v.chars().take(*wd).collect();
                        format!("{v:<wd$}")
                    })
                    .collect();
                format!("{}\n", parts.join("  ").trim_end())
            };
            w(out, &line(columns))?;
            for r in &cells {
                w(out, &line(r))?;
            }
            w(out, &format!("({} rows)\n", cells.len()))?;
        }
    }
    Ok(())
}

/// The nights in `nights.arrow`; none when the catalog has no summary yet.
pub fn read_summary(dir: &Path) -> Result<Vec<NightSummary>, QueryError> {
    let path = dir.join(SUMMARY_FILE);
    let read_err = |reason: String| QueryError::Read {
        path: path.clone(),
        reason,
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return Err(read_err(e.to_string())),
    };
    let reader =
        FileReader::try_new(BufReader::new(file), None).map_err(|e| read_err(e.to_string()))?;
    let mut out = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| read_err(e.to_string()))?;
        let col = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| read_err(format!("no column {name}")))
        };
        let night = col("night")?
            .as_primitive_opt::<Date32Type>()
            .ok_or_else(|| read_err("night is not a date".into()))?
            .clone();
        let int = |name: &str| -> Result<_, QueryError> {
            Ok(col(name)?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| read_err(format!("{name} is not Int64")))?
                .clone())
        };
        let float = |name: &str| -> Result<_, QueryError> {
            Ok(col(name)?
                .as_primitive_opt::<Float64Type>()
                .ok_or_else(|| read_err(format!("{name} is not Float64")))?
                .clone())
        };
        let (rows, versions, bytes, file_bytes) = (
            int("rows")?,
            int("versions")?,
            int("bytes")?,
            int("file_bytes")?,
        );
        let fl: Vec<_> = ["t_min", "t_max", "ra_min", "ra_max", "dec_min", "dec_max"]
            .iter()
            .map(|n| float(n))
            .collect::<Result<_, _>>()?;
        let opt = |a: &arrow_array::Float64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        for i in 0..b.num_rows() {
            out.push(NightSummary {
                night: epoch + chrono::Duration::days(night.value(i).into()),
                rows: rows.value(i),
                versions: versions.value(i),
                bytes: bytes.value(i),
                file_bytes: file_bytes.value(i),
                t_min: opt(&fl[0], i),
                t_max: opt(&fl[1], i),
                ra_min: opt(&fl[2], i),
                ra_max: opt(&fl[3], i),
                dec_min: opt(&fl[4], i),
                dec_max: opt(&fl[5], i),
            });
        }
    }
    Ok(out)
}

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
use std::sync::Arc;

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
use super::projected::ProjectedReader;
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
    /// The columns to return (`None`: all). Only these and the ones the conditions test
    /// are read from the files.
    pub columns: Option<Vec<String>>,
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
    /// Bytes read from the night files.
    pub bytes_read: u64,
}

impl Matches {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|(_, r)| r.len()).sum()
    }
}

/// The columns `q` reads: those it prints (all when `q.columns` is `None`) and those its
/// conditions test, as ascending indices into the night files' schema.
fn projection(q: &Query, schema: &arrow_schema::Schema) -> Result<Vec<usize>, QueryError> {
    let mut names: Vec<&str> = match &q.columns {
        None => return Ok((0..schema.fields().len()).collect()),
        Some(c) => c.iter().map(String::as_str).collect(),
    };
    if !q.all_versions {
        names.push("superseded_at");
    }
    if q.agent.is_some() {
        names.push("agent");
    }
    if q.object.is_some() {
        names.push("target_name");
    }
    if q.since.is_some() || q.until.is_some() {
        names.push("t_min");
    }
    if q.cone.is_some() {
        names.extend(["s_ra", "s_dec"]);
    }
    let mut idx = names
        .iter()
        .map(|c| {
            schema.index_of(c).map_err(|_| {
                let known: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                QueryError::Usage(format!(
                    "--columns: no column {c:?} (columns: {})",
                    known.join(", ")
                ))
            })
        })
        .collect::<Result<Vec<usize>, _>>()?;
    idx.sort_unstable();
    idx.dedup();
    Ok(idx)
}

/// Whether a night with the sky bounds of `s` can hold a row inside cone `c`. The RA
/// bounds are an arc that may run through 0° (`ra_min > ra_max`).
fn night_may_meet(s: &NightSummary, c: &Cone) -> bool {
    let (Some(dlo), Some(dhi)) = (s.dec_min, s.dec_max) else {
        return false;
    };
    if c.dec + c.radius < dlo || c.dec - c.radius > dhi {
        return false;
    }
    let (Some(rlo), Some(rhi)) = (s.ra_min, s.ra_max) else {
        return true;
    };
    match sky::cone_ra_half_width(c.ra, c.dec, c.radius) {
        None => true,
        Some(w) => sky::arcs_meet(c.ra - w, 2.0 * w, rlo, (rhi - rlo).rem_euclid(360.0)),
    }
}

/// Runs `q` over the catalog in `dir`.
pub fn run(dir: &Path, q: &Query) -> Result<Matches, QueryError> {
    let full = arrow_file::schema();
    let projection = projection(q, &full)?;
    let summaries = read_summary(dir)?;
    let nights: Vec<&NightSummary> = summaries
        .iter()
        .filter(|s| q.night.is_none_or(|n| s.night == n))
        .filter(|s| q.since.is_none_or(|t| s.t_max.is_some_and(|m| m >= t)))
        .filter(|s| q.until.is_none_or(|t| s.t_min.is_some_and(|m| m <= t)))
        .filter(|s| q.cone.is_none_or(|c| night_may_meet(s, &c)))
        .collect();
    let ranges = q.cone.map(|c| sky::cone_ranges(c.ra, c.dec, c.radius));
    let mut out = Matches {
        schema: Arc::new(
            full.project(&projection)
                .map_err(|e| QueryError::Usage(e.to_string()))?,
        ),
        batches: Vec::new(),
        batches_read: 0,
        files_opened: 0,
        bytes_read: 0,
    };
    let mut found = 0usize;
    for s in nights {
        let path = arrow_file::night_file(dir, s.night);
        let read_err = |reason: String| QueryError::Read {
            path: path.clone(),
            reason,
        };
        let mut reader = ProjectedReader::open(&path, &projection).map_err(read_err)?;
        if reader.schema().fields() != out.schema.fields() {
            return Err(read_err(
                "its columns are not the catalog's (written by another skyferry version?)".into(),
            ));
        }
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
        let mut stop = false;
        for i in wanted {
            let batch = reader.batch(i).map_err(read_err)?;
            out.batches_read += 1;
            let rows = matching(&batch, q);
            if rows.is_empty() {
                continue;
            }
            found += rows.len();
            out.batches.push((batch, rows));
            if q.limit.is_some_and(|l| found >= l) {
                truncate(&mut out.batches, q.limit.unwrap_or(usize::MAX));
                stop = true;
                break;
            }
        }
        out.bytes_read += reader.bytes_read;
        if stop {
            break;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::arrow_file::{write_night, write_summary, NightSummary};
    use crate::catalog::row::{Fields, Row};
    use proptest::prelude::*;

    /// Rows spread over the sphere, denser near the poles and around RA = 0/360, in two
    /// nights of several batches each; one row in ten has no position.
    fn catalog() -> (tempfile::TempDir, Vec<Row>) {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut rows = Vec::new();
        let nights: [NaiveDate; 2] = ["2024-05-01".parse().unwrap(), "2024-05-02".parse().unwrap()];
        for i in 0..12_000u32 {
            let (ra, dec) = match i % 4 {
                0 => (next() * 360.0, (2.0 * next() - 1.0).asin().to_degrees()),
                1 => (next() * 360.0, 85.0 + 5.0 * next()),
                2 => (next() * 360.0, -85.0 - 5.0 * next()),
                _ => ((next() * 4.0 - 2.0).rem_euclid(360.0), next() * 10.0 - 5.0),
            };
            let positioned = i % 10 != 9;
            let mut f = Fields {
                data_format: "fits".into(),
                ..Fields::default()
            };
            if positioned {
                f.s_ra = Some(ra);
                f.s_dec = Some(dec);
                f.healpix = Some(sky::index(ra, dec));
            }
            rows.push(Row {
                agent: "kiso".into(),
                path: format!("f{i}.fits"),
                blake3: [0; 32],
                size_bytes: 1,
                mtime_ns: 0,
                received_at_us: 0,
                version: 1,
                superseded_at_us: None,
                night: nights[(i % 2) as usize],
                fields: f,
            });
        }
        let mut summaries = Vec::new();
        for n in nights {
            let of: Vec<Row> = rows.iter().filter(|r| r.night == n).cloned().collect();
            let bytes = write_night(dir.path(), n, of.clone(), "test").unwrap();
            summaries.push(NightSummary::of(n, &of, bytes));
        }
        write_summary(dir.path(), &summaries).unwrap();
        (dir, rows)
    }

    fn brute_force(rows: &[Row], c: Cone) -> Vec<String> {
        let mut v: Vec<String> = rows
            .iter()
            .filter(|r| match (r.fields.s_ra, r.fields.s_dec) {
                (Some(ra), Some(dec)) => sky::separation(c.ra, c.dec, ra, dec) <= c.radius,
                _ => false,
            })
            .map(|r| r.path.clone())
            .collect();
        v.sort();
        v
    }

    fn searched(dir: &Path, c: Cone) -> (Vec<String>, usize) {
        let m = run(
            dir,
            &Query {
                cone: Some(c),
                ..Query::default()
            },
        )
        .unwrap();
        let path = m.schema.index_of("path").unwrap();
        let mut v: Vec<String> = m
            .batches
            .iter()
            .flat_map(|(b, rows)| {
                let col = b.column(path).as_string::<i32>().clone();
                rows.iter()
                    .map(move |&i| col.value(i).to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort();
        (v, m.batches_read)
    }

    static CATALOG: std::sync::OnceLock<(tempfile::TempDir, Vec<Row>)> = std::sync::OnceLock::new();

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// The cone search is exact: it finds what a brute-force distance test over every
        /// row finds, for cones anywhere (across RA = 0/360 and over the poles), small and
        /// large.
        #[test]
        fn cone_search_equals_brute_force(
            ra in prop_oneof![0.0..360.0, 358.0..360.0, 0.0..2.0],
            dec in prop_oneof![-90.0..=90.0, 80.0..=90.0, -90.0..=-80.0],
            radius in prop_oneof![0.01..1.0, 1.0..20.0, 20.0..120.0],
        ) {
            let (dir, rows) = CATALOG.get_or_init(catalog);
            let c = Cone { ra, dec, radius };
            prop_assert_eq!(searched(dir.path(), c).0, brute_force(rows, c));
        }
    }

    #[test]
    fn a_small_cone_reads_few_batches_and_the_pole_and_ra_zero_are_found() {
        let (dir, rows) = CATALOG.get_or_init(catalog);
        for c in [
            Cone {
                ra: 0.0,
                dec: 90.0,
                radius: 2.0,
            },
            Cone {
                ra: 359.9,
                dec: 0.0,
                radius: 1.5,
            },
            Cone {
                ra: 120.0,
                dec: -89.0,
                radius: 3.0,
            },
        ] {
            let (found, _) = searched(dir.path(), c);
            assert!(!found.is_empty(), "{c:?} found nothing");
            assert_eq!(found, brute_force(rows, c));
        }
        let (_, read) = searched(
            dir.path(),
            Cone {
                ra: 200.0,
                dec: 30.0,
                radius: 0.1,
            },
        );
        let total = rows.len().div_ceil(2).div_ceil(arrow_file::BATCH_ROWS) * 2;
        assert!(read <= 2, "read {read} of {total} batches for a 0.1° cone");
    }

    /// Nights whose sky bounds cannot meet the cone are not opened, and a night whose
    /// pointings straddle RA 0° is not skipped for a cone at RA 0.5° (nor one at 359.5°).
    #[test]
    fn nights_are_skipped_by_their_sky_bounds_across_ra_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |night: &str, i: usize, ra: f64| Row {
            agent: "kiso".into(),
            path: format!("{night}/f{i}.fits"),
            blake3: [0; 32],
            size_bytes: 1,
            mtime_ns: 0,
            received_at_us: 0,
            version: 1,
            superseded_at_us: None,
            night: night.parse().unwrap(),
            fields: Fields {
                data_format: "fits".into(),
                s_ra: Some(ra),
                s_dec: Some(0.0),
                healpix: Some(sky::index(ra, 0.0)),
                ..Fields::default()
            },
        };
        // Night 1 points from 358° through 0° to 2°; night 2 at 100°–110°.
        let n1: Vec<Row> = (0..40)
            .map(|i| mk("2024-05-01", i, (358.0 + i as f64 * 0.1).rem_euclid(360.0)))
            .collect();
        let n2: Vec<Row> = (0..40)
            .map(|i| mk("2024-05-02", i, 100.0 + i as f64 * 0.25))
            .collect();
        let mut summaries = Vec::new();
        for rows in [&n1, &n2] {
            let night = rows[0].night;
            let bytes = write_night(dir.path(), night, rows.clone(), "t").unwrap();
            summaries.push(NightSummary::of(night, rows, bytes));
        }
        assert!(
            summaries[0].ra_min > summaries[0].ra_max,
            "{:?}",
            summaries[0]
        );
        write_summary(dir.path(), &summaries).unwrap();
        for (ra, want_night) in [
            (0.5, "2024-05-01"),
            (359.5, "2024-05-01"),
            (105.0, "2024-05-02"),
        ] {
            let c = Cone {
                ra,
                dec: 0.0,
                radius: 0.3,
            };
            let m = run(
                dir.path(),
                &Query {
                    cone: Some(c),
                    columns: Some(vec!["path".into()]),
                    ..Query::default()
                },
            )
            .unwrap();
            assert_eq!(m.files_opened, 1, "cone at {ra}: one night can hold it");
            let all: Vec<Row> = n1.iter().chain(&n2).cloned().collect();
            let want = brute_force(&all, c);
            assert!(!want.is_empty() && want.iter().all(|p| p.starts_with(want_night)));
            let mut got: Vec<String> = m
                .batches
                .iter()
                .flat_map(|(b, r)| {
                    let c = b.column_by_name("path").unwrap().as_string::<i32>().clone();
                    r.iter()
                        .map(move |&i| c.value(i).to_owned())
                        .collect::<Vec<_>>()
                })
                .collect();
            got.sort();
            assert_eq!(got, want, "cone at {ra}");
        }
        // A cone far from both nights opens neither.
        let m = run(
            dir.path(),
            &Query {
                cone: Some(Cone {
                    ra: 200.0,
                    dec: 0.0,
                    radius: 1.0,
                }),
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(m.files_opened, 0);
    }

    /// Only the printed and tested columns are read: the same rows as a read of all
    /// columns, from fewer bytes; a column that does not exist is a usage error.
    #[test]
    fn a_query_reads_only_the_columns_it_needs() {
        let (dir, _) = CATALOG.get_or_init(catalog);
        let c = Cone {
            ra: 0.0,
            dec: 0.0,
            radius: 20.0,
        };
        let all = run(
            dir.path(),
            &Query {
                cone: Some(c),
                ..Query::default()
            },
        )
        .unwrap();
        let some = run(
            dir.path(),
            &Query {
                cone: Some(c),
                columns: Some(vec!["path".into(), "night".into()]),
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(all.rows(), some.rows());
        assert_eq!(
            some.schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>(),
            ["s_ra", "s_dec", "path", "night", "superseded_at"]
        );
        assert!(
            some.bytes_read < all.bytes_read,
            "{} vs {}",
            some.bytes_read,
            all.bytes_read
        );
        let e = run(
            dir.path(),
            &Query {
                columns: Some(vec!["nope".into()]),
                ..Query::default()
            },
        )
        .err()
        .unwrap();
        assert!(matches!(e, QueryError::Usage(m) if m.contains("no column \"nope\"")));
    }

    #[test]
    fn bad_cones_and_times_say_what_is_wrong() {
        for (arg, want) in [
            ("361,0,1", "RA \"361\""),
            ("10,-91,1", "Dec \"-91\""),
            ("10,0,0", "radius \"0\""),
            ("10,0", "expected RA,DEC,RADIUS"),
            ("24:00:00,0,1", "RA"),
        ] {
            let e = Cone::parse(arg).unwrap_err().to_string();
            assert!(e.contains(want), "{arg}: {e}");
        }
        let c = Cone::parse("05:35:17.3,-05:23:28,0.5").unwrap();
        assert!((c.ra - 83.822).abs() < 1e-3 && (c.dec + 5.391).abs() < 1e-3);
        assert!(parse_time_arg("--since", "2024-13-40").is_err());
        assert_eq!(
            parse_time_arg("--since", "2024-05-01T10:30:00Z").unwrap(),
            60431.4375
        );
    }
}

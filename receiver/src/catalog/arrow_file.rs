//! The Arrow IPC files readers use: one file per night, `<catalog dir>/<YYYY-MM-DD>.arrow`,
//! rows sorted by HEALPix index, zstd-compressed record batches of [`BATCH_ROWS`]; and
//! `nights.arrow`, one summary row per night. Both are written atomically (temp file,
//! fsync, rename, fsync of the directory).
//!
//! Each night file carries, in its footer's custom metadata, the HEALPix range of every
//! batch (`skyferry.batch_healpix`, JSON `[[min, max] | null, ...]`), so that a cone search
//! reads only the batches that can match.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    Date32Builder, Float64Builder, Int16Builder, Int32Builder, Int64Builder, MapBuilder,
    StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_ipc::writer::{FileWriter, IpcWriteOptions};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::NaiveDate;

use super::row::Row;

/// Rows per record batch: small enough that a cone search reads little, large enough
/// that zstd compresses well and per-batch overhead stays small.
pub const BATCH_ROWS: usize = 2048;
/// Format version, in each file's schema metadata (`skyferry.catalog.version`).
pub const FORMAT_VERSION: &str = "1";
pub const BATCH_RANGES_KEY: &str = "skyferry.batch_healpix";
pub const SUMMARY_FILE: &str = "nights.arrow";

#[derive(Debug, thiserror::Error)]
pub enum ArrowFileError {
    #[error("{doing} {path}: {source}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("arrow {path}: {source}")]
    Arrow { path: PathBuf, source: ArrowError },
}

/// The name of a night's file.
pub fn night_file(dir: &Path, night: NaiveDate) -> PathBuf {
    dir.join(format!("{night}.arrow"))
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn header_type() -> DataType {
    let mut b = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    b.finish().data_type().clone()
}

/// The night files' schema. Column order is part of the format (docs/catalog.md).
pub fn schema() -> SchemaRef {
    use DataType::*;
    let f = |name: &str, t: DataType, nullable: bool| Field::new(name, t, nullable);
    let fields = vec![
        f("obs_id", Utf8, true),
        f("obs_collection", Utf8, false),
        f("dataproduct_type", Utf8, true),
        f("calib_level", Int16, true),
        f("target_name", Utf8, true),
        f("s_ra", Float64, true),
        f("s_dec", Float64, true),
        f("t_min", Float64, true),
        f("t_max", Float64, true),
        f("t_exptime", Float64, true),
        f("t_xel", Int64, true),
        f("obs_release_date", utc_micros(), true),
        f("access_url", Utf8, false),
        f("access_format", Utf8, false),
        f("access_estsize", Int64, false),
        f("agent", Utf8, false),
        f("path", Utf8, false),
        f("size_bytes", Int64, false),
        f("blake3", Utf8, false),
        f("received_at", utc_micros(), false),
        f("night", Date32, false),
        f("exp_id", Utf8, true),
        f("det_id", Utf8, true),
        f("project", Utf8, true),
        f("data_type", Utf8, true),
        f("frame_rate", Float64, true),
        f("t_frame", Float64, true),
        f("version", Int32, false),
        f("superseded_at", utc_micros(), true),
        f("healpix", UInt64, true),
        f("data_format", Utf8, false),
        f("format_error", Utf8, true),
        f("header", header_type(), false),
    ];
    let meta = [(
        "skyferry.catalog.version".to_string(),
        FORMAT_VERSION.to_string(),
    )];
    Arc::new(
        Schema::new(fields).with_metadata(
            meta.into_iter()
                .collect::<std::collections::HashMap<String, String>>(),
        ),
    )
}

/// Sorts a night's rows as the file holds them: by HEALPix index (rows without a
/// position last), then by agent and path and version.
pub fn sort_rows(rows: &mut [Row]) {
    rows.sort_by(|a, b| {
        (
            a.fields.healpix.is_none(),
            a.fields.healpix,
            &a.agent,
            &a.path,
            a.version,
        )
            .cmp(&(
                b.fields.healpix.is_none(),
                b.fields.healpix,
                &b.agent,
                &b.path,
                b.version,
            ))
    });
}

/// One record batch of `rows`.
pub fn batch(rows: &[Row], collection: &str) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let s = |f: &dyn Fn(&Row) -> Option<String>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let f64s = |f: &dyn Fn(&Row) -> Option<f64>| -> ArrayRef {
        let mut b = Float64Builder::with_capacity(n);
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let i64s = |f: &dyn Fn(&Row) -> Option<i64>| -> ArrayRef {
        let mut b = Int64Builder::with_capacity(n);
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let ts = |f: &dyn Fn(&Row) -> Option<i64>| -> ArrayRef {
        let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let is_fits = |r: &Row| r.fields.data_format.starts_with("fits");
    let mut calib = Int16Builder::with_capacity(n);
    let mut night = Date32Builder::with_capacity(n);
    let mut version = Int32Builder::with_capacity(n);
    let mut healpix = UInt64Builder::with_capacity(n);
    let mut header = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    for r in rows {
        calib.append_option(is_fits(r).then_some(1));
        night.append_value((r.night - epoch).num_days() as i32);
        version.append_value(r.version as i32);
        healpix.append_option(r.fields.healpix);
        for (k, v) in &r.fields.header {
            header.keys().append_value(k);
            header.values().append_value(v);
        }
        header.append(true)?;
    }
    let columns: Vec<ArrayRef> = vec![
        s(&|r| r.fields.obs_id.clone()),
        s(&|_| Some(collection.to_owned())),
        s(&|r| {
            is_fits(r).then(|| {
                if r.fields.t_xel.unwrap_or(1) > 1 {
                    "cube".to_owned()
                } else {
                    "image".to_owned()
                }
            })
        }),
        Arc::new(calib.finish()),
        s(&|r| r.fields.target_name.clone()),
        f64s(&|r| r.fields.s_ra),
        f64s(&|r| r.fields.s_dec),
        f64s(&|r| r.fields.t_min),
        f64s(&|r| r.fields.t_max),
        f64s(&|r| r.fields.t_exptime),
        i64s(&|r| r.fields.t_xel),
        ts(&|r| r.fields.obs_release_us),
        s(&|r| Some(r.access_url())),
        s(&|r| Some(r.fields.access_format.clone())),
        // ObsCore's access_estsize is in kilobytes.
        i64s(&|r| Some(r.size_bytes.div_ceil(1024) as i64)),
        s(&|r| Some(r.agent.clone())),
        s(&|r| Some(r.path.clone())),
        i64s(&|r| Some(r.size_bytes as i64)),
        s(&|r| Some(r.blake3_hex())),
        ts(&|r| Some(r.received_at_us)),
        Arc::new(night.finish()),
        s(&|r| r.fields.exp_id.clone()),
        s(&|r| r.fields.det_id.clone()),
        s(&|r| r.fields.project.clone()),
        s(&|r| r.fields.data_type.clone()),
        f64s(&|r| r.fields.frame_rate),
        f64s(&|r| r.fields.t_frame),
        Arc::new(version.finish()),
        ts(&|r| r.superseded_at_us),
        Arc::new(healpix.finish()),
        s(&|r| Some(r.fields.data_format.clone())),
        s(&|r| r.fields.format_error.clone()),
        Arc::new(header.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// Writes a night's file from its rows (sorted here) and returns its size in bytes.
pub fn write_night(
    dir: &Path,
    night: NaiveDate,
    mut rows: Vec<Row>,
    collection: &str,
) -> Result<u64, ArrowFileError> {
    sort_rows(&mut rows);
    let path = night_file(dir, night);
    let mut ranges = Vec::new();
    let mut batches = Vec::new();
    for chunk in rows.chunks(BATCH_ROWS) {
        let hp: Vec<u64> = chunk.iter().filter_map(|r| r.fields.healpix).collect();
        ranges.push(match (hp.iter().min(), hp.iter().max()) {
            (Some(lo), Some(hi)) => serde_json::json!([lo, hi]),
            _ => serde_json::Value::Null,
        });
        batches.push(
            batch(chunk, collection).map_err(|source| ArrowFileError::Arrow {
                path: path.clone(),
                source,
            })?,
        );
    }
    let meta = [(
        BATCH_RANGES_KEY,
        serde_json::Value::from(ranges).to_string(),
    )];
    write_atomic(&path, &schema(), &batches, &meta)
}

/// Writes `batches` to `path` through a temporary file in the same directory.
pub fn write_atomic(
    path: &Path,
    schema: &Schema,
    batches: &[RecordBatch],
    metadata: &[(&str, String)],
) -> Result<u64, ArrowFileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let io = |doing: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| ArrowFileError::Io {
            doing,
            path: p,
            source,
        }
    };
    // Unique per process: `catalog rebuild` may write beside a live receiver.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let arrow = |source| ArrowFileError::Arrow {
        path: path.to_owned(),
        source,
    };
    let result = (|| {
        let file = File::create(&tmp).map_err(io("creating", &tmp))?;
        let options = IpcWriteOptions::default()
            .try_with_compression(Some(arrow_ipc::CompressionType::ZSTD))
            .map_err(arrow)?;
        let mut w = FileWriter::try_new_with_options(
            BufWriter::with_capacity(1 << 20, file),
            schema,
            options,
        )
        .map_err(arrow)?;
        for (k, v) in metadata {
            w.write_metadata(*k, v.clone());
        }
        for b in batches {
            w.write(b).map_err(arrow)?;
        }
        w.finish().map_err(arrow)?;
        let file = w
            .into_inner()
            .map_err(arrow)?
            .into_inner()
            .map_err(|e| io("writing", &tmp)(e.into_error()))?;
        file.sync_all().map_err(io("fsync", &tmp))?;
        let size = file.metadata().map_err(io("checking", &tmp))?.len();
        fs::rename(&tmp, path).map_err(io("renaming into place", path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory", dir))?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// One night's line of `nights.arrow`.
#[derive(Clone, Debug, PartialEq)]
pub struct NightSummary {
    pub night: NaiveDate,
    /// Current rows (superseded versions not counted).
    pub rows: i64,
    /// All rows, superseded versions included.
    pub versions: i64,
    /// Bytes of the current files.
    pub bytes: i64,
    pub file_bytes: i64,
    pub t_min: Option<f64>,
    pub t_max: Option<f64>,
    /// The shortest arc of RA holding every row's: from `ra_min` up to `ra_max`, through
    /// 0° when `ra_min > ra_max`.
    pub ra_min: Option<f64>,
    pub ra_max: Option<f64>,
    pub dec_min: Option<f64>,
    pub dec_max: Option<f64>,
}

impl NightSummary {
    pub fn of(night: NaiveDate, rows: &[Row], file_bytes: u64) -> NightSummary {
        let current: Vec<&Row> = rows
            .iter()
            .filter(|r| r.superseded_at_us.is_none())
            .collect();
        let fold = |f: &dyn Fn(&Row) -> Option<f64>, min: bool| {
            rows.iter().filter_map(f).fold(None, |acc: Option<f64>, v| {
                Some(match acc {
                    None => v,
                    Some(a) if min => a.min(v),
                    Some(a) => a.max(v),
                })
            })
        };
        // The shortest arc: a night around RA 0° has ra_min > ra_max.
        let ra = super::sky::ra_arc(rows.iter().filter_map(|r| r.fields.s_ra));
        NightSummary {
            night,
            rows: current.len() as i64,
            versions: rows.len() as i64,
            bytes: current.iter().map(|r| r.size_bytes as i64).sum(),
            file_bytes: file_bytes as i64,
            t_min: fold(&|r| r.fields.t_min, true),
            t_max: fold(&|r| r.fields.t_max, false),
            ra_min: ra.map(|a| a.0),
            ra_max: ra.map(|a| a.1),
            dec_min: fold(&|r| r.fields.s_dec, true),
            dec_max: fold(&|r| r.fields.s_dec, false),
        }
    }
}

pub fn summary_schema() -> SchemaRef {
    use DataType::*;
    let fields = vec![
        Field::new("night", Date32, false),
        Field::new("rows", Int64, false),
        Field::new("versions", Int64, false),
        Field::new("bytes", Int64, false),
        Field::new("file_bytes", Int64, false),
        Field::new("t_min", Float64, true),
        Field::new("t_max", Float64, true),
        Field::new("ra_min", Float64, true),
        Field::new("ra_max", Float64, true),
        Field::new("dec_min", Float64, true),
        Field::new("dec_max", Float64, true),
    ];
    let meta = [(
        "skyferry.catalog.version".to_string(),
        FORMAT_VERSION.to_string(),
    )];
    Arc::new(
        Schema::new(fields).with_metadata(
            meta.into_iter()
                .collect::<std::collections::HashMap<String, String>>(),
        ),
    )
}

/// Writes `nights.arrow` (nights in date order).
pub fn write_summary(dir: &Path, nights: &[NightSummary]) -> Result<u64, ArrowFileError> {
    let path = dir.join(SUMMARY_FILE);
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    let mut night = Date32Builder::new();
    let mut ints: Vec<Int64Builder> = (0..4).map(|_| Int64Builder::new()).collect();
    let mut floats: Vec<Float64Builder> = (0..6).map(|_| Float64Builder::new()).collect();
    for n in nights {
        night.append_value((n.night - epoch).num_days() as i32);
        for (b, v) in ints
            .iter_mut()
            .zip([n.rows, n.versions, n.bytes, n.file_bytes])
        {
            b.append_value(v);
        }
        for (b, v) in floats
            .iter_mut()
            .zip([n.t_min, n.t_max, n.ra_min, n.ra_max, n.dec_min, n.dec_max])
        {
            b.append_option(v);
        }
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(night.finish())];
    columns.extend(ints.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.extend(floats.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    let batch = RecordBatch::try_new(summary_schema(), columns).map_err(|source| {
        ArrowFileError::Arrow {
            path: path.clone(),
            source,
        }
    })?;
    write_atomic(&path, &summary_schema(), &[batch], &[])
}

//! One catalog row: what a stored file version is, derived from its header cards by the
//! configured key mapping (`catalog.keys`). Pure: no I/O.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use skyferry_common::config::{CatalogConfig, HeaderKeys};

use super::header::{self, Encoding, HeaderRead};
use super::night;
use super::sky;

/// What the header gave: the columns derived from cards, and the cards themselves.
/// Stored as JSON in the staging database, so that adding a column needs no migration of
/// the rows' identity columns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fields {
    /// `fits`, `fits_gzip`, `fits_fpack`, or why not: `not_fits`, `fits_truncated`,
    /// `fits_broken`.
    pub data_format: String,
    /// The reason, for the last three.
    pub format_error: Option<String>,
    pub access_format: String,
    pub obs_id: Option<String>,
    pub target_name: Option<String>,
    pub s_ra: Option<f64>,
    pub s_dec: Option<f64>,
    pub healpix: Option<u64>,
    /// MJD.
    pub t_min: Option<f64>,
    pub t_max: Option<f64>,
    pub t_exptime: Option<f64>,
    pub t_xel: Option<i64>,
    pub frame_rate: Option<f64>,
    pub t_frame: Option<f64>,
    pub exp_id: Option<String>,
    pub det_id: Option<String>,
    pub project: Option<String>,
    pub data_type: Option<String>,
    /// Microseconds since the Unix epoch.
    pub obs_release_us: Option<i64>,
    pub header: Vec<(String, String)>,
}

/// A row as the staging database holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub agent: String,
    pub path: String,
    pub blake3: [u8; 32],
    pub size_bytes: u64,
    pub mtime_ns: i64,
    pub received_at_us: i64,
    pub version: u32,
    pub superseded_at_us: Option<i64>,
    pub night: NaiveDate,
    pub fields: Fields,
}

impl Row {
    pub fn blake3_hex(&self) -> String {
        blake3::Hash::from(self.blake3).to_hex().to_string()
    }

    /// `access_url`: the stored path relative to the storage root.
    pub fn access_url(&self) -> String {
        format!("{}/{}", self.agent, self.path)
    }
}

/// Derives the fields of a file from what reading its header gave. `mtime` (the source
/// file's, kept by the receiver) gives the night of a file without an observation time.
pub fn derive(
    read: HeaderRead,
    path: &str,
    mtime: DateTime<Utc>,
    config: &CatalogConfig,
) -> (Fields, NaiveDate) {
    let (encoding, cards, format, error) = match read {
        HeaderRead::Fits {
            encoding, cards, ..
        } => {
            let format = match encoding {
                Encoding::Plain => "fits",
                Encoding::Gzip => "fits_gzip",
                Encoding::Fpack => "fits_fpack",
            };
            (Some(encoding), cards, format, None)
        }
        HeaderRead::NotFits { reason } => (None, Vec::new(), "not_fits", Some(reason)),
        HeaderRead::Truncated {
            encoding,
            cards,
            reason,
        } => (Some(encoding), cards, "fits_truncated", Some(reason)),
        HeaderRead::Broken {
            encoding,
            cards,
            reason,
        } => (Some(encoding), cards, "fits_broken", Some(reason)),
    };
    let access_format = match encoding {
        Some(Encoding::Plain) => "application/fits",
        Some(Encoding::Gzip) => "application/gzip",
        Some(Encoding::Fpack) => "application/x-fits-fpack",
        None => "application/octet-stream",
    };
    let keys = &config.keys;
    let mut f = Fields {
        data_format: format.into(),
        format_error: error,
        access_format: access_format.into(),
        ..Fields::default()
    };
    let text = |list: &[String]| first(&cards, list).map(str::to_owned);
    let num = |list: &[String]| first(&cards, list).and_then(|v| v.trim().parse::<f64>().ok());
    f.obs_id = text(&keys.obs_id).or_else(|| encoding.map(|_| stem(path)));
    f.target_name = text(&keys.target_name);
    f.s_ra = first(&cards, &keys.ra).and_then(sky::parse_ra);
    f.s_dec = first(&cards, &keys.dec).and_then(sky::parse_dec);
    if let (Some(ra), Some(dec)) = (f.s_ra, f.s_dec) {
        f.healpix = Some(sky::index(ra, dec));
    }
    let start = start_time(&cards, keys);
    f.t_xel = first(&cards, &keys.frames)
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(encoding.filter(|_| !cards.is_empty()).map(|_| 1));
    f.frame_rate = num(&keys.frame_rate).filter(|r| *r > 0.0);
    f.t_frame = num(&keys.frame_time);
    f.t_exptime = num(&keys.exptime).or_else(|| {
        let frames = f.t_xel? as f64;
        f.t_frame
            .map(|t| t * frames)
            .or(f.frame_rate.map(|r| frames / r))
    });
    f.t_min = start.map(night::mjd_of);
    let end = first(&cards, &keys.date_end).and_then(night::parse_datetime);
    f.t_max = end
        .map(night::mjd_of)
        .or_else(|| Some(f.t_min? + f.t_exptime.unwrap_or(0.0) / 86_400.0));
    f.exp_id = text(&keys.exp_id);
    f.det_id = text(&keys.det_id);
    f.project = text(&keys.project);
    f.data_type = text(&keys.data_type);
    f.obs_release_us =
        start.map(|t| night::release_date(t, config.proprietary_months).timestamp_micros());
    let night = night::night_of(start.unwrap_or(mtime), config.timezone);
    f.header = cards;
    (f, night)
}

/// The observation start: a date key with a full date-time; else a date-only value
/// completed by a time key (Tomo-e: `DATE-OBS = '2024-05-01'`, `UTC = '10:40:30'`); else
/// a modified Julian date key.
fn start_time(cards: &[(String, String)], keys: &HeaderKeys) -> Option<DateTime<Utc>> {
    if let Some(date) = first(cards, &keys.date) {
        if let Some(t) = night::parse_datetime(date) {
            return Some(t);
        }
        if let (Some(d), Some(t)) = (
            night::parse_date(date),
            first(cards, &keys.time).and_then(night::parse_time),
        ) {
            return Some(d.and_time(t).and_utc());
        }
    }
    first(cards, &keys.mjd)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(night::utc_of_mjd)
}

fn first<'a>(cards: &'a [(String, String)], keys: &[String]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| header::value(cards, k))
        .filter(|v| !v.trim().is_empty())
}

/// The file name without its FITS and compression extensions.
fn stem(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut s = name;
    for ext in [".gz", ".fz", ".fits", ".fit", ".fts"] {
        if let Some(t) = s.strip_suffix(ext) {
            s = t;
        }
    }
    s.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cards(list: &[(&str, &str)]) -> HeaderRead {
        HeaderRead::Fits {
            encoding: Encoding::Plain,
            cards: list
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            expected_size: None,
        }
    }

    fn derived(read: HeaderRead) -> (Fields, NaiveDate) {
        let config = CatalogConfig::defaults(Path::new("/s"));
        let mtime = night::parse_datetime("2020-01-01T00:00:00").unwrap();
        derive(read, "20240501/TMQ1_17.fits", mtime, &config)
    }

    #[test]
    fn tomoe_headers_give_time_pointing_ids_and_frames() {
        let (f, night) = derived(cards(&[
            ("OBJECT", "TMQ-F0042"),
            ("DATE-OBS", "2024-05-01"),
            ("UTC", "10:40:30.0"),
            ("RA", "05:35:17.3"),
            ("DEC", "-05:23:28"),
            ("EXP_ID", "42"),
            ("DET-ID", "17"),
            ("NAXIS3", "4"),
            ("DATA-FPS", "2.0"),
            ("TFRAME", "0.5"),
        ]));
        assert_eq!(night.to_string(), "2024-05-01");
        assert_eq!(f.target_name.as_deref(), Some("TMQ-F0042"));
        assert_eq!(f.exp_id.as_deref(), Some("42"));
        assert_eq!(f.det_id.as_deref(), Some("17"));
        assert_eq!(f.t_xel, Some(4));
        assert_eq!(f.t_exptime, Some(2.0), "TFRAME × NAXIS3");
        let t_min = f.t_min.unwrap();
        assert!(
            (t_min - (60431.4375 + 630.0 / 86_400.0)).abs() < 1e-9,
            "{t_min}"
        );
        assert!((f.t_max.unwrap() - t_min - 2.0 / 86_400.0).abs() < 1e-9);
        assert!((f.s_ra.unwrap() - 83.822_083).abs() < 1e-5);
        assert!(f.healpix.is_some());
        assert_eq!(f.obs_id.as_deref(), Some("TMQ1_17"));
        assert_eq!(f.data_format, "fits");
    }

    #[test]
    fn plain_headers_use_iso_times_mjd_and_degrees() {
        let (f, _) = derived(cards(&[
            ("DATE-OBS", "2024-05-01T10:40:30Z"),
            ("RA", "83.5"),
            ("DEC", "-5.25"),
            ("EXPTIME", "3.0"),
        ]));
        assert_eq!(f.s_ra, Some(83.5));
        assert_eq!(f.t_exptime, Some(3.0));
        assert_eq!(f.t_xel, Some(1));
        let (g, _) = derived(cards(&[("MJD-OBS", "60431.4375")]));
        assert_eq!(g.t_min, Some(60431.4375));
    }

    #[test]
    fn a_file_that_is_not_fits_gets_its_night_from_its_mtime() {
        let (f, night) = derived(HeaderRead::NotFits {
            reason: "no SIMPLE".into(),
        });
        assert_eq!(f.data_format, "not_fits");
        assert_eq!(f.format_error.as_deref(), Some("no SIMPLE"));
        assert_eq!(f.obs_id, None);
        assert_eq!(f.t_xel, None);
        assert_eq!(
            night.to_string(),
            "2019-12-31",
            "09:00 JST on Jan 1st: before noon"
        );
    }
}

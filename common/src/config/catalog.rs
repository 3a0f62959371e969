//! The receiver's `[catalog]` table: where the catalog lives, the observatory's timezone
//! for the night rule, the proprietary period, and which FITS header keys feed which
//! column (`[catalog.keys]`), so that another telescope needs no code change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::reader::{Problems, Section};

/// Header keys tried in order for each derived column (the first present card wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderKeys {
    pub target_name: Vec<String>,
    pub obs_id: Vec<String>,
    /// Right ascension: degrees, or a sexagesimal string in hours (`'05:35:17.3'`).
    pub ra: Vec<String>,
    /// Declination: degrees, or a sexagesimal string (`'-05:23:28'`).
    pub dec: Vec<String>,
    /// Start: an ISO date-time, or a date only completed by a `time` key.
    pub date: Vec<String>,
    /// Time of day (UTC) when the date key holds a date only (Tomo-e: `UTC`, `TIME-OBS`).
    pub time: Vec<String>,
    /// Start as a modified Julian date, used when no date key gives a time.
    pub mjd: Vec<String>,
    /// End as an ISO date-time, if the header has one.
    pub date_end: Vec<String>,
    pub exptime: Vec<String>,
    pub frames: Vec<String>,
    pub frame_rate: Vec<String>,
    pub frame_time: Vec<String>,
    pub exp_id: Vec<String>,
    pub det_id: Vec<String>,
    pub project: Vec<String>,
    pub data_type: Vec<String>,
}

impl Default for HeaderKeys {
    /// Tomo-e Gozen's keys first, then the plain FITS / common forms.
    fn default() -> HeaderKeys {
        let v = |keys: &[&str]| keys.iter().map(|k| (*k).to_owned()).collect();
        HeaderKeys {
            target_name: v(&["OBJECT"]),
            obs_id: v(&["OBS-ID", "OBS_ID", "FRAMEID"]),
            ra: v(&["RA", "OBJCTRA", "RA_DEG"]),
            dec: v(&["DEC", "OBJCTDEC", "DEC_DEG"]),
            date: v(&["DATE-OBS", "DATE_OBS"]),
            time: v(&["UTC", "TIME-OBS", "UT", "UTSTART"]),
            mjd: v(&["MJD-OBS", "MJD_OBS", "MJD"]),
            date_end: v(&["DATE-END"]),
            exptime: v(&["EXPTIME", "EXPOSURE"]),
            frames: v(&["NAXIS3", "ZNAXIS3"]),
            frame_rate: v(&["DATA-FPS", "DATA_FPS", "FPS"]),
            frame_time: v(&["TFRAME"]),
            exp_id: v(&["EXP_ID", "EXP-ID", "EXPID"]),
            det_id: v(&["DET_ID", "DET-ID", "DETID"]),
            project: v(&["PROJECT"]),
            data_type: v(&["DATA-TYP", "DATA_TYP", "DATATYPE", "IMAGETYP", "OBSTYPE"]),
        }
    }
}

/// The `[catalog]` table, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogConfig {
    /// `catalog.enabled` (default true): off, files are stored and acknowledged without
    /// a catalog row.
    pub enabled: bool,
    /// `catalog.dir`: where the Arrow files go (default `<storage root>/.skyferry/catalog`).
    pub dir: PathBuf,
    /// `catalog.timezone`: the observatory's timezone for the night rule (IANA name,
    /// default `Asia/Tokyo`).
    pub timezone: chrono_tz::Tz,
    /// `catalog.proprietary_months`: `obs_release_date` is this many months after the
    /// observation (default 6).
    pub proprietary_months: u32,
    /// `catalog.collection`: `obs_collection` of every row (default `tomoe`).
    pub collection: String,
    /// `catalog.flush_delay`: how long after a row arrives its night file is rewritten
    /// (rows arriving meanwhile share the rewrite; default 2 s).
    pub flush_delay: Duration,
    pub keys: HeaderKeys,
}

impl CatalogConfig {
    pub fn defaults(storage_root: &Path) -> CatalogConfig {
        CatalogConfig {
            enabled: true,
            dir: storage_root.join(".skyferry").join("catalog"),
            timezone: chrono_tz::Asia::Tokyo,
            proprietary_months: 6,
            collection: "tomoe".into(),
            flush_delay: Duration::from_secs(2),
            keys: HeaderKeys::default(),
        }
    }

    /// Reads `[catalog]` and `[catalog.keys]`; `base` resolves a relative `dir`.
    pub(crate) fn read(
        root: &toml::Table,
        base: &Path,
        storage_root: Option<&Path>,
        p: &mut Problems,
    ) -> CatalogConfig {
        let mut c = CatalogConfig::defaults(storage_root.unwrap_or(Path::new(".")));
        let mut s = Section::of(root, "catalog", p);
        c.enabled = s.boolean("enabled", true, p);
        if let Some(dir) = s.string("dir", p) {
            c.dir = base.join(dir);
        }
        if let Some(tz) = s.string("timezone", p) {
            match tz.parse::<chrono_tz::Tz>() {
                Ok(tz) => c.timezone = tz,
                Err(_) => p.push(format!(
                    "catalog.timezone: {tz:?} is not an IANA timezone name (e.g. \"Asia/Tokyo\", \"UTC\", \"America/Santiago\")"
                )),
            }
        }
        c.proprietary_months = s.integer_in("proprietary_months", 6, (0, 1200), p) as u32;
        if let Some(collection) = s.string("collection", p) {
            c.collection = collection;
        }
        c.flush_delay = s.duration("flush_delay", c.flush_delay, p);
        if c.flush_delay > Duration::from_secs(3600) {
            p.push(format!(
                "catalog.flush_delay: {:?} is too long (at most \"1h\"; the default is \"2s\")",
                c.flush_delay
            ));
        }
        // `[catalog.keys]` is a sub-table: read it before the unknown-key check.
        let keys_table = match root.get("catalog").and_then(|t| t.get("keys")) {
            None => None,
            Some(toml::Value::Table(t)) => Some(t),
            Some(other) => {
                p.push(format!(
                    "[catalog.keys] must be a table, found {}",
                    other.type_str()
                ));
                None
            }
        };
        s.known("keys");
        s.finish(p);
        if let Some(t) = keys_table {
            let mut k = Section::from_table("catalog.keys".into(), t);
            let keys = &mut c.keys;
            for (name, slot) in [
                ("target_name", &mut keys.target_name),
                ("obs_id", &mut keys.obs_id),
                ("ra", &mut keys.ra),
                ("dec", &mut keys.dec),
                ("date", &mut keys.date),
                ("time", &mut keys.time),
                ("mjd", &mut keys.mjd),
                ("date_end", &mut keys.date_end),
                ("exptime", &mut keys.exptime),
                ("frames", &mut keys.frames),
                ("frame_rate", &mut keys.frame_rate),
                ("frame_time", &mut keys.frame_time),
                ("exp_id", &mut keys.exp_id),
                ("det_id", &mut keys.det_id),
                ("project", &mut keys.project),
                ("data_type", &mut keys.data_type),
            ] {
                if t.contains_key(name) {
                    let list = k.strings(name, p);
                    for key in &list {
                        if key.is_empty() || key.len() > 70 || !key.is_ascii() {
                            p.push(format!(
                                "catalog.keys.{name}: {key:?} is not a FITS keyword (1 to 70 ASCII characters)"
                            ));
                        }
                    }
                    *slot = list.iter().map(|s| s.to_ascii_uppercase()).collect();
                }
            }
            k.finish(p);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (CatalogConfig, Problems) {
        let mut p = Problems::new();
        let table: toml::Table = text.parse().unwrap();
        let c = CatalogConfig::read(&table, Path::new("/etc"), Some(Path::new("/data")), &mut p);
        (c, p)
    }

    #[test]
    fn defaults_are_tokyo_six_months_and_the_tomoe_keys() {
        let (c, p) = read("");
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(c, CatalogConfig::defaults(Path::new("/data")));
        assert_eq!(c.dir, Path::new("/data/.skyferry/catalog"));
        assert_eq!(c.timezone, chrono_tz::Asia::Tokyo);
        assert_eq!(c.keys.det_id, ["DET_ID", "DET-ID", "DETID"]);
    }

    #[test]
    fn every_bad_value_is_reported() {
        let (_, p) = read(
            "[catalog]\ntimezone = \"Mars/Olympus\"\nproprietary_months = -1\ncolour = 1\n\
             [catalog.keys]\nra = [\"\"]\nplanet = [\"X\"]\n",
        );
        let all = p.join("\n");
        for want in [
            "\"Mars/Olympus\" is not an IANA timezone",
            "proprietary_months = -1",
            "unknown key catalog.colour",
            "catalog.keys.ra",
            "unknown key catalog.keys.planet",
        ] {
            assert!(all.contains(want), "{want:?} not in {all}");
        }
    }

    #[test]
    fn keys_and_settings_can_be_changed() {
        let (c, p) = read(
            "[catalog]\nenabled = false\ndir = \"cat\"\ntimezone = \"America/Santiago\"\n\
             [catalog.keys]\nexp_id = [\"frameno\"]\n",
        );
        assert!(p.is_empty(), "{p:?}");
        assert!(!c.enabled);
        assert_eq!(c.dir, Path::new("/etc/cat"));
        assert_eq!(c.keys.exp_id, ["FRAMENO"]);
        assert_eq!(c.keys.ra, HeaderKeys::default().ra);
    }
}

//! The FITS header: cards in fixed format, and the observation metadata they carry (time,
//! night, pointing of each of the 84 sensors).

use anyhow::{bail, Result};

use super::{padded, FitsParams, HeaderStyle};

/// MJD of the first exposure: 2024-05-01T10:30:00 UTC (19:30 JST at Kiso).
const FIRST_EXPOSURE_MJD: f64 = 60431.4375;
/// Seconds between exposures.
pub(super) const CADENCE_SECONDS: f64 = 15.0;
/// Exposure time of one frame (the camera films at 2 frames per second).
const FRAME_SECONDS: f64 = 0.5;

/// A header value, formatted as FITS fixed format requires.
enum Value {
    Logical(bool),
    Int(i64),
    Real(f64, usize),
    Str(String),
}

fn header_cards(p: &FitsParams) -> Vec<(&'static str, Value, &'static str)> {
    use Value::*;
    let mjd = exposure_mjd(p.exposure_id);
    let (ra, dec) = detector_centre(p.exposure_id, p.detector);
    let tomoe = p.style == HeaderStyle::TomoE;
    let mut cards = vec![
        ("SIMPLE", Logical(true), "conforms to FITS standard"),
        ("BITPIX", Int(16), "array data type"),
        (
            "NAXIS",
            Int(if p.frames > 1 { 3 } else { 2 }),
            "number of array dimensions",
        ),
        ("NAXIS1", Int(p.width.into()), "[pixel] columns"),
        ("NAXIS2", Int(p.height.into()), "[pixel] rows"),
    ];
    if p.frames > 1 {
        cards.push(("NAXIS3", Int(p.frames.into()), "frames"));
    }
    cards.extend([
        (
            "BZERO",
            Int(32768),
            "offset data range to that of unsigned short",
        ),
        ("BSCALE", Int(1), "default scaling factor"),
        ("TELESCOP", Str("Kiso 105cm Schmidt".into()), "telescope"),
        ("INSTRUME", Str("Tomo-e Gozen".into()), "instrument"),
        ("OBSERVAT", Str("Kiso Observatory".into()), "observatory"),
        (
            "PROJECT",
            Str("Tomo-e Gozen transient survey".into()),
            "project",
        ),
        ("OBJECT", Str(object(p.exposure_id)), "field name"),
    ]);
    if tomoe {
        let iso = iso_time(mjd);
        let (date, time) = iso.split_once('T').unwrap_or((&iso, ""));
        let det_key = if p.detector % 2 == 1 {
            "DET_ID"
        } else {
            "DET-ID"
        };
        cards.extend([
            ("EXP_ID", Int(p.exposure_id.into()), "exposure id"),
            (det_key, Int(p.detector.into()), "detector id (1..84)"),
            ("DATA-TYP", Str("OBJECT".into()), "data type"),
            (
                "DATE-OBS",
                Str(date.to_owned()),
                "[UTC] date of the exposure start",
            ),
            (
                "UTC",
                Str(time.to_owned()),
                "[UTC] time of the exposure start",
            ),
            (
                "TIME-OBS",
                Str(time.to_owned()),
                "[UTC] time of the exposure start",
            ),
            (
                "DATA-FPS",
                Real(1.0 / FRAME_SECONDS, 3),
                "[Hz] frames per second",
            ),
            (
                "TFRAME",
                Real(FRAME_SECONDS, 3),
                "[s] exposure time of one frame",
            ),
            (
                "RA",
                Str(ra_sexagesimal(ra)),
                "[h:m:s] telescope pointing (J2000)",
            ),
            (
                "DEC",
                Str(dec_sexagesimal(dec)),
                "[d:m:s] telescope pointing (J2000)",
            ),
            ("EQUINOX", Real(2000.0, 1), "equinox of coordinates"),
        ]);
        return cards;
    }
    cards.extend([
        ("EXP-ID", Int(p.exposure_id.into()), "exposure id"),
        ("DET-ID", Int(p.detector.into()), "detector id (1..84)"),
        ("DATE-OBS", Str(iso_time(mjd)), "[UTC] start of exposure"),
        ("MJD-OBS", Real(mjd, 8), "[d] MJD at start of exposure"),
        (
            "EXPTIME",
            Real(FRAME_SECONDS * f64::from(p.frames), 3),
            "[s] total exposure time",
        ),
        (
            "TFRAME",
            Real(FRAME_SECONDS, 3),
            "[s] exposure time of one frame",
        ),
        ("RA", Real(ra, 6), "[deg] detector centre (J2000)"),
        ("DEC", Real(dec, 6), "[deg] detector centre (J2000)"),
        ("EQUINOX", Real(2000.0, 1), "equinox of coordinates"),
    ]);
    cards
}

fn object(exposure_id: u32) -> String {
    format!("TMQ-F{:04}", exposure_id % 10_000)
}

/// `hh:mm:ss.s` of a right ascension in degrees.
pub fn ra_sexagesimal(ra: f64) -> String {
    let tenths = (ra / 15.0 * 36_000.0).round() as i64 % (24 * 36_000);
    format!(
        "{:02}:{:02}:{:02}.{}",
        tenths / 36_000,
        tenths / 600 % 60,
        tenths / 10 % 60,
        tenths % 10
    )
}

/// `±dd:mm:ss` of a declination in degrees.
pub fn dec_sexagesimal(dec: f64) -> String {
    let secs = (dec.abs() * 3600.0).round() as i64;
    let sign = if dec < 0.0 { '-' } else { '+' };
    format!(
        "{sign}{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// What the header of `p` says, for tests to compare the catalog with.
pub(super) fn expected(p: &FitsParams) -> super::Expected {
    let mjd = exposure_mjd(p.exposure_id);
    let (mut ra, mut dec) = detector_centre(p.exposure_id, p.detector);
    if p.style == HeaderStyle::TomoE {
        let t = (ra / 15.0 * 36_000.0).round() % (24.0 * 36_000.0);
        ra = t / 36_000.0 * 15.0;
        dec = dec.signum() * (dec.abs() * 3600.0).round() / 3600.0;
    } else {
        ra = (ra * 1e6).round() / 1e6;
        dec = (dec * 1e6).round() / 1e6;
    }
    let n = night_of(mjd);
    super::Expected {
        object: object(p.exposure_id),
        exp_id: p.exposure_id.to_string(),
        det_id: p.detector.to_string(),
        ra,
        dec,
        // The header holds milliseconds (ISO) or 8 decimals (MJD-OBS).
        mjd: (mjd * 86_400_000.0).round() / 86_400_000.0,
        night: format!("{}-{}-{}", &n[..4], &n[4..6], &n[6..]),
        frames: p.frames,
    }
}

/// Size of the header in bytes: cards and END, padded to whole blocks.
pub(super) fn header_len(p: &FitsParams) -> u64 {
    padded((header_cards(p).len() as u64 + 1) * 80)
}

/// The header: cards, END, padded with spaces to a whole block.
pub(super) fn header(p: &FitsParams) -> Result<Vec<u8>> {
    let mut text = String::new();
    for (key, value, comment) in header_cards(p) {
        let value = match value {
            Value::Logical(b) => format!("{:>20}", if b { "T" } else { "F" }),
            Value::Int(i) => format!("{i:>20}"),
            Value::Real(x, decimals) => format!("{x:>20.decimals$}"),
            Value::Str(s) => format!("'{:<8}'", s.replace('\'', "''")),
        };
        let card = format!("{key:<8}= {value} / {comment}");
        if card.len() > 80 || !card.is_ascii() {
            bail!("FITS card for {key} does not fit in 80 ASCII characters: {card:?}");
        }
        text.push_str(&format!("{card:<80}"));
    }
    text.push_str(&format!("{:<80}", "END"));
    let len = padded(text.len() as u64) as usize;
    let mut bytes = text.into_bytes();
    bytes.resize(len, b' ');
    Ok(bytes)
}

fn exposure_mjd(exposure_id: u32) -> f64 {
    FIRST_EXPOSURE_MJD + f64::from(exposure_id) * CADENCE_SECONDS / 86_400.0
}

/// Field centre moves with the exposure; the 84 sensors tile a 12×7 grid on the sky
/// (about 0.74° × 0.44° per sensor).
fn detector_centre(exposure_id: u32, detector: u8) -> (f64, f64) {
    let ra0 = (150.0 + f64::from(exposure_id) * 0.7) % 360.0;
    let dec0 = 20.0 + (f64::from(exposure_id % 9) - 4.0) * 2.0;
    let index = f64::from(detector.saturating_sub(1));
    let (col, row) = (index % 12.0, (index / 12.0).floor());
    let dec = dec0 + (row - 3.0) * 0.44;
    let ra = (ra0 + (col - 5.5) * 0.74 / dec.to_radians().cos()).rem_euclid(360.0);
    (ra, dec)
}

/// `YYYY-MM-DDThh:mm:ss.sss` (UTC) of a modified Julian date.
fn iso_time(mjd: f64) -> String {
    let millis = ((mjd - 40_587.0) * 86_400_000.0).round() as i64; // since 1970-01-01
    let (days, ms_of_day) = (millis.div_euclid(86_400_000), millis.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let s = ms_of_day / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms_of_day % 1000
    )
}

/// `YYYYMMDD` of the night of exposure `exposure_id`.
pub(super) fn night(exposure_id: u32) -> String {
    night_of(exposure_mjd(exposure_id))
}

/// `YYYYMMDD` of the night a time belongs to: the JST (UTC+9) date, noon to noon.
fn night_of(mjd: f64) -> String {
    let days = (mjd - 40_587.0 + (9.0 - 12.0) / 24.0).floor() as i64;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}")
}

/// Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::exposure_file;
    use super::*;

    #[test]
    fn exposure_files_are_named_by_night_exposure_and_detector() {
        assert_eq!(
            exposure_file(42, 7),
            PathBuf::from("20240501/TMQ120240501000042_07.fits")
        );
        // 16.5 h after the first exposure it is past noon JST: the next night.
        let next_night = (16.5 * 3600.0 / CADENCE_SECONDS) as u32 + 1;
        assert!(exposure_file(next_night, 1).starts_with("20240502"));
    }

    #[test]
    fn dates_convert_to_iso() {
        assert_eq!(iso_time(60431.4375), "2024-05-01T10:30:00.000");
        assert_eq!(iso_time(51544.0), "2000-01-01T00:00:00.000");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }
}

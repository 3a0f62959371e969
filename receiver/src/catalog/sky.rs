//! Sky positions: sexagesimal and degree parsing, the HEALPix index of a pointing, cone
//! coverage as index ranges, and the exact angular distance that decides a cone match.

use std::ops::Range;

/// Depth (order) of the stored index: cells of ~0.4 milliarcseconds. An index of a
/// coarser order `d` is `healpix >> 2 * (29 - d)`.
pub const DEPTH: u8 = 29;

/// The nested HEALPix index of (ra, dec) in degrees at [`DEPTH`].
pub fn index(ra: f64, dec: f64) -> u64 {
    cdshealpix::nested::hash(DEPTH, ra.to_radians(), dec.to_radians())
}

/// Index ranges at [`DEPTH`] that together cover every position within `radius` degrees
/// of (ra, dec) (and some more: the exact test is [`separation`]). The coverage is
/// computed at a depth whose cells are a few times smaller than the radius, so that the
/// superfluous area stays small and the number of ranges bounded.
pub fn cone_ranges(ra: f64, dec: f64, radius: f64) -> Vec<Range<u64>> {
    if radius >= 180.0 {
        return std::iter::once(0..12u64 << (2 * DEPTH as u32)).collect();
    }
    // Cell size at depth d is about 58.6° / 2^d.
    let mut depth = 0u8;
    while depth < 14 && 58.6 / f64::from(1u32 << (depth + 1)) > radius / 4.0 {
        depth += 1;
    }
    let bmoc = cdshealpix::nested::cone_coverage_approx(
        depth,
        ra.to_radians(),
        dec.to_radians(),
        radius.to_radians(),
    );
    let shift = 2 * u32::from(DEPTH - depth);
    bmoc.to_ranges()
        .iter()
        .map(|r| (r.start << shift)..(r.end << shift))
        .collect()
}

/// Angular distance in degrees between two positions (haversine, stable for small
/// angles).
pub fn separation(ra1: f64, dec1: f64, ra2: f64, dec2: f64) -> f64 {
    let (p1, p2) = (dec1.to_radians(), dec2.to_radians());
    let dp = p2 - p1;
    let dl = (ra2 - ra1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * a.sqrt().min(1.0).asin().to_degrees()
}

/// Half the width in RA (degrees) of the cone of `radius` around (ra, dec): every point
/// of the cone has an RA within this of `ra`. `None` when the cone holds a pole (then
/// every RA is in it). A hair wider than exact, so rounding never excludes a match.
pub fn cone_ra_half_width(_ra: f64, dec: f64, radius: f64) -> Option<f64> {
    if dec.abs() + radius >= 89.999 {
        return None;
    }
    let w = (radius.to_radians().sin() / dec.to_radians().cos())
        .min(1.0)
        .asin()
        .to_degrees();
    (w < 179.9).then_some(w + 1e-6)
}

/// Whether two arcs of RA meet; an arc starts at `start` (any real; taken modulo 360)
/// and runs `len` degrees up (0 ≤ len; 360 or more is the whole circle).
pub fn arcs_meet(start_a: f64, len_a: f64, start_b: f64, len_b: f64) -> bool {
    let within = |x: f64, s: f64, len: f64| len >= 360.0 || (x - s).rem_euclid(360.0) <= len;
    within(start_a, start_b, len_b) || within(start_b, start_a, len_a)
}

/// The shortest arc of RA that holds every one of `ras` (degrees in [0, 360)), as
/// (lowest, highest): it runs up from the first to the second, through 0° when the first
/// is the larger. Found as the complement of the widest gap between neighbours on the
/// circle.
pub fn ra_arc(ras: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = ras
        .filter(|r| r.is_finite())
        .map(|r| r.rem_euclid(360.0))
        .collect();
    v.sort_by(f64::total_cmp);
    let (&first, &last) = (v.first()?, v.last()?);
    // The gap from the last up through 360/0 to the first, then the ones between.
    let mut best = (first + 360.0 - last, first, last);
    for w in v.windows(2) {
        let gap = w[1] - w[0];
        if gap > best.0 {
            best = (gap, w[1], w[0]);
        }
    }
    Some((best.1, best.2))
}

/// A right ascension: degrees (`83.82`), or sexagesimal hours (`05:35:17.3`,
/// `5 35 17.3`, `5h35m17.3s`). `None` if unparsable or outside [0, 360).
pub fn parse_ra(s: &str) -> Option<f64> {
    let deg = match sexagesimal(s) {
        Some((false, h, m, sec)) if h < 24.0 => (h + m / 60.0 + sec / 3600.0) * 15.0,
        Some(_) => return None,
        None => number(s)?,
    };
    (0.0..360.0).contains(&deg).then_some(deg)
}

/// A declination: degrees (`-5.39`), or sexagesimal (`-05:23:28`, `-5d23m28s`). `None`
/// if unparsable or outside [-90, 90].
pub fn parse_dec(s: &str) -> Option<f64> {
    let deg = match sexagesimal(s) {
        Some((neg, d, m, sec)) => {
            let v = d + m / 60.0 + sec / 3600.0;
            if neg {
                -v
            } else {
                v
            }
        }
        None => number(s)?,
    };
    (-90.0..=90.0).contains(&deg).then_some(deg)
}

fn number(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// `[sign]a:b[:c]`, `a b c` or `a[hd]b[m]c[s]`: (negative, a, b, c). Plain numbers are
/// not sexagesimal.
fn sexagesimal(s: &str) -> Option<(bool, f64, f64, f64)> {
    let t = s.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let parts: Vec<&str> = t
        .split([':', ' ', 'h', 'd', 'm', 's', '°', '\'', '"'])
        .filter(|p| !p.is_empty())
        .collect();
    if parts.len() < 2 || parts.len() > 3 {
        return None;
    }
    let v: Vec<f64> = parts
        .iter()
        .map(|p| p.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0))
        .collect::<Option<_>>()?;
    let (a, b, c) = (v[0], v[1], v.get(2).copied().unwrap_or(0.0));
    (b < 60.0 && c < 60.0).then_some((neg, a, b, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sexagesimal_and_degrees_parse() {
        let ra = parse_ra("05:35:17.3").unwrap();
        assert!((ra - 83.822_083).abs() < 1e-5, "{ra}");
        assert!((parse_dec("-05:23:28").unwrap() + 5.391_111).abs() < 1e-5);
        assert_eq!(parse_ra("5h35m17.3s"), parse_ra("05 35 17.3"));
        assert_eq!(parse_dec("-0:30:00"), Some(-0.5), "negative zero degrees");
        assert_eq!(parse_ra("83.5"), Some(83.5));
        assert_eq!(parse_ra("360"), None);
        assert_eq!(parse_ra("24:00:00"), None);
        assert_eq!(parse_dec("91"), None);
        assert_eq!(parse_dec("12:61:00"), None);
        assert_eq!(parse_ra("abc"), None);
    }

    #[test]
    fn the_index_of_a_position_lies_in_its_cone_coverage() {
        for (ra, dec) in [(0.0, 0.0), (359.99, -89.9), (83.8, -5.4), (180.0, 89.99)] {
            let h = index(ra, dec);
            assert!(cone_ranges(ra, dec, 0.01).iter().any(|r| r.contains(&h)));
        }
        assert!((separation(0.0, 0.0, 359.0, 0.0) - 1.0).abs() < 1e-9);
        assert!((separation(10.0, 90.0, 190.0, 89.0) - 1.0).abs() < 1e-9);
    }
    #[test]
    fn ra_arcs_run_through_zero_when_that_is_shorter() {
        assert_eq!(ra_arc([10.0, 20.0, 15.0].into_iter()), Some((10.0, 20.0)));
        // Around 0°: 358 .. 2, not 2 .. 358.
        assert_eq!(
            ra_arc([359.0, 1.0, 358.0, 2.0].into_iter()),
            Some((358.0, 2.0))
        );
        assert_eq!(ra_arc(std::iter::empty()), None);
        assert_eq!(ra_arc([5.0].into_iter()), Some((5.0, 5.0)));
        assert!(arcs_meet(
            359.5,
            1.0,
            358.0,
            (2.0f64 - 358.0).rem_euclid(360.0)
        ));
        assert!(
            arcs_meet(-1.0, 2.0, 0.5, 0.0),
            "a cone arc starting below 0°"
        );
        assert!(!arcs_meet(100.0, 2.0, 358.0, 4.0));
        assert!(arcs_meet(100.0, 360.0, 358.0, 4.0));
        // Half-widths grow with |dec| and give up at the poles.
        let w0 = cone_ra_half_width(0.0, 0.0, 1.0).unwrap();
        let w60 = cone_ra_half_width(0.0, 60.0, 1.0).unwrap();
        assert!(
            (w0 - 1.0).abs() < 1e-3 && (w60 - 2.0).abs() < 1e-2,
            "{w0} {w60}"
        );
        assert!(cone_ra_half_width(0.0, 89.5, 1.0).is_none());
    }
}

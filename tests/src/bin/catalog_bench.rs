//! `skyferry-catalog-bench [ROWS] [NIGHTS] [DIR]`: the catalog benchmark (issue 9).
//!
//! Writes ROWS (default 10 000 000) synthetic rows over NIGHTS (default 40) nights into
//! night files through the receiver's own Arrow writer, measures the durable ingest rate
//! (one fsynced staging transaction per row, as at publish) on a sample, then times the
//! real `skyferry-receiver catalog query` for a 1° cone, a 0.1° cone and a whole night,
//! cold (page cache dropped: `echo 3 > /proc/sys/vm/drop_caches`, needs root) and warm.
//! Reports rows/s, bytes per row and each query's wall time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use chrono::NaiveDate;
use skyferry_receiver::catalog::arrow_file::{write_night, write_summary, NightSummary};
use skyferry_receiver::catalog::row::{Fields, Row};
use skyferry_receiver::catalog::sky;
use skyferry_receiver::catalog::staging::Staging;
use skyferry_tests::binaries::binary;

/// Rows of the durable-ingest sample (each one an fsynced transaction).
const INGEST_SAMPLE: usize = 3000;

struct Rng(u64);

impl Rng {
    fn f(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A row like a Tomo-e file's: 84 detectors per exposure, a pointing that moves, about 30
/// header cards.
fn row(night: NaiveDate, i: usize, rng: &mut Rng) -> Row {
    let exposure = i / 84;
    let det = i % 84 + 1;
    // Each exposure points somewhere on the sky visible from Kiso (dec -30..+90).
    let field = exposure as u64;
    let mut frng = Rng(field.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let ra0 = frng.f() * 360.0;
    let dec0 = (frng.f() * 1.5 - 0.5).asin().to_degrees();
    let ra = (ra0 + (det % 12) as f64 * 0.74 + rng.f() * 0.01).rem_euclid(360.0);
    let dec = (dec0 + (det / 12) as f64 * 0.44).clamp(-90.0, 90.0);
    let t_min = 60431.4375
        + (night - NaiveDate::from_ymd_opt(2024, 5, 1).unwrap_or_default()).num_days() as f64
        + exposure as f64 * 15.0 / 86_400.0;
    let header: Vec<(String, String)> = [
        ("SIMPLE", "T".to_string()),
        ("BITPIX", "16".into()),
        ("NAXIS", "3".into()),
        ("NAXIS1", "2000".into()),
        ("NAXIS2", "1128".into()),
        ("NAXIS3", "6".into()),
        ("BZERO", "32768".into()),
        ("BSCALE", "1".into()),
        ("TELESCOP", "Kiso 105cm Schmidt".into()),
        ("INSTRUME", "Tomo-e Gozen".into()),
        ("OBSERVAT", "Kiso Observatory".into()),
        ("PROJECT", "Tomo-e Gozen transient survey".into()),
        ("OBJECT", format!("TMQ-F{:04}", exposure % 10_000)),
        ("EXP_ID", exposure.to_string()),
        ("DET_ID", det.to_string()),
        ("DATA-TYP", "OBJECT".into()),
        ("DATE-OBS", night.to_string()),
        (
            "UTC",
            format!(
                "{:02}:{:02}:{:02}.000",
                exposure / 240 % 24,
                exposure / 4 % 60,
                exposure * 15 % 60
            ),
        ),
        ("DATA-FPS", "2.000".into()),
        ("TFRAME", "0.500".into()),
        ("RA", format!("{ra:.5}")),
        ("DEC", format!("{dec:.5}")),
        ("EQUINOX", "2000.0".into()),
        ("GAIN", "1.23".into()),
        ("CCD-TEMP", format!("{:.2}", -20.0 + rng.f())),
        ("AIRMASS", format!("{:.3}", 1.0 + rng.f())),
        ("FILTER", "None".into()),
        ("COMMENT", "Tomo-e Gozen raw movie".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let path = format!(
        "{}/TMQ1{}{exposure:06}_{det:02}.fits",
        night.format("%Y%m%d"),
        night.format("%Y%m%d")
    );
    Row {
        agent: "kiso-01".into(),
        blake3: *blake3::hash(path.as_bytes()).as_bytes(),
        path,
        size_bytes: 27_072_000 + 5760,
        mtime_ns: 0,
        received_at_us: 1_714_560_000_000_000 + i as i64,
        version: 1,
        superseded_at_us: None,
        night,
        fields: Fields {
            data_format: "fits".into(),
            access_format: "application/fits".into(),
            obs_id: Some(format!("TMQ1{exposure:06}_{det:02}")),
            target_name: Some(format!("TMQ-F{:04}", exposure % 10_000)),
            s_ra: Some(ra),
            s_dec: Some(dec),
            healpix: Some(sky::index(ra, dec)),
            t_min: Some(t_min),
            t_max: Some(t_min + 3.0 / 86_400.0),
            t_exptime: Some(3.0),
            t_xel: Some(6),
            frame_rate: Some(2.0),
            t_frame: Some(0.5),
            exp_id: Some(exposure.to_string()),
            det_id: Some(det.to_string()),
            project: Some("Tomo-e Gozen transient survey".into()),
            data_type: Some("OBJECT".into()),
            obs_release_us: None,
            header,
            ..Fields::default()
        },
    }
}

fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn query(receiver: &Path, config: &Path, args: &[&str]) -> Result<(f64, usize)> {
    let started = Instant::now();
    let out = Command::new(receiver)
        .args(["catalog", "query", "--config"])
        .arg(config)
        .args(["--format", "csv", "--columns", "path,s_ra,s_dec,night"])
        .args(args)
        .output()?;
    let took = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("query {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((took, out.stdout.iter().filter(|&&b| b == b'\n').count() - 1))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows: usize = args
        .first()
        .map_or(Ok(10_000_000), |s| s.parse())
        .context("ROWS")?;
    let nights: usize = args
        .get(1)
        .map_or(Ok(40), |s| s.parse())
        .context("NIGHTS")?;
    let dir = PathBuf::from(
        args.get(2)
            .cloned()
            .unwrap_or_else(|| "/tmp/skyferry-catalog-bench".into()),
    );
    let storage = dir.join("storage");
    let catalog = storage.join(".skyferry/catalog");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&catalog)?;
    let receiver = binary("skyferry-receiver")?;

    // Durable ingest, as at publish: one fsynced transaction per row.
    let mut staging = Staging::open(&dir.join("ingest.sqlite"))?;
    let night0 = NaiveDate::from_ymd_opt(2024, 5, 1).unwrap_or_default();
    let mut rng = Rng(7);
    let sample: Vec<Row> = (0..INGEST_SAMPLE)
        .map(|i| row(night0, i, &mut rng))
        .collect();
    let started = Instant::now();
    for r in &sample {
        staging.insert(r, 0)?;
    }
    let ingest = INGEST_SAMPLE as f64 / started.elapsed().as_secs_f64();
    println!("durable ingest (one fsynced SQLite transaction per row): {ingest:.0} rows/s ({INGEST_SAMPLE} rows)");

    // Night files for all rows, through the exporter's writer.
    let per_night = rows / nights;
    let started = Instant::now();
    let mut summaries = Vec::new();
    let mut cone_targets = Vec::new();
    for n in 0..nights {
        let night = night0 + chrono::Duration::days(n as i64);
        let list: Vec<Row> = (0..per_night).map(|i| row(night, i, &mut rng)).collect();
        if n % 10 == 3 {
            let r = &list[per_night / 2];
            cone_targets.push((r.fields.s_ra.unwrap_or(0.0), r.fields.s_dec.unwrap_or(0.0)));
        }
        let bytes = write_night(&catalog, night, list.clone(), "tomoe")?;
        summaries.push(NightSummary::of(night, &list, bytes));
        eprint!("\rnight {}/{nights} written", n + 1);
    }
    eprintln!();
    write_summary(&catalog, &summaries)?;
    let export_secs = started.elapsed().as_secs_f64();
    let total_bytes: i64 = summaries.iter().map(|s| s.file_bytes).sum();
    let total_rows = per_night * nights;
    println!(
        "export: {total_rows} rows in {export_secs:.1} s = {:.0} rows/s (row generation included); \
         {total_bytes} bytes = {:.0} bytes/row",
        total_rows as f64 / export_secs,
        total_bytes as f64 / total_rows as f64
    );

    // A receiver config for the query command (its TLS files only need to exist).
    for f in ["ca.pem", "r.pem", "r.key"] {
        std::fs::write(dir.join(f), "x")?;
    }
    let config = dir.join("receiver.toml");
    std::fs::write(
        &config,
        format!(
            "[receiver]\nlisten = \"127.0.0.1:1\"\nstorage_root = {:?}\nca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\n",
            storage.display().to_string()
        ),
    )?;
    let (ra, dec) = cone_targets.first().copied().unwrap_or((180.0, 30.0));
    let night = (night0 + chrono::Duration::days(nights as i64 / 2)).to_string();
    let cone1 = format!("{ra},{dec},1");
    let cone01 = format!("{ra},{dec},0.1");
    let cases: [(&str, Vec<&str>); 3] = [
        ("cone 1°", vec!["--cone", &cone1]),
        ("cone 0.1°", vec!["--cone", &cone01]),
        ("night", vec!["--night", &night]),
    ];
    let dropped = drop_caches();
    if !dropped {
        eprintln!("cannot drop the page cache (not root?): the cold figures are warm");
    }
    for (name, args) in &cases {
        drop_caches();
        let (cold, n) = query(&receiver, &config, args)?;
        let mut warm = f64::MAX;
        for _ in 0..3 {
            warm = warm.min(query(&receiver, &config, args)?.0);
        }
        println!("{name:<10} {n:>8} rows   cold {cold:.3} s   warm {warm:.3} s");
    }
    Ok(())
}

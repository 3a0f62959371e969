//! The catalog end to end with the real binaries (issue 9): every stored file version is
//! one row, read back through `skyferry-receiver catalog query`, by Python readers, and
//! rebuilt from the stored tree.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use skyferry_tests::catalog::{python, rows, wait_rows, FAST_CATALOG};
use skyferry_tests::faults::must_write;
use skyferry_tests::fits::{self, exposure_file, FitsParams, HeaderStyle};
use skyferry_tests::tree::blake3_file;
use skyferry_tests::{Pair, PairOptions};

const EXPOSURE: u32 = 42;

/// Small sensors (the catalog reads headers only); detectors 1–42 with Tomo-e headers,
/// 43–84 with plain ones; 3 frames each.
fn params(detector: u8) -> FitsParams {
    let mut p = if detector <= 42 {
        FitsParams::tomoe(EXPOSURE, detector, 3)
    } else {
        FitsParams::new(EXPOSURE, detector, 3)
    };
    p.width = 200;
    p.height = 100;
    p
}

fn write_exposure(source: &Path) {
    for d in 1..=fits::DETECTORS {
        fits::write_fits(&source.join(exposure_file(EXPOSURE, d)), &params(d)).expect("write FITS");
    }
}

fn options() -> PairOptions {
    PairOptions {
        include: vec!["**/*".into()],
        ..PairOptions::default()
    }
}

fn start(opts: PairOptions) -> Pair {
    let mut pair = Pair::new(opts).expect("pair");
    pair.write_receiver_config(|t| t.push_str(FAST_CATALOG))
        .expect("receiver config");
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent");
    pair
}

fn current(rows: &[Value]) -> Vec<&Value> {
    rows.iter()
        .filter(|r| r["superseded_at"].is_null())
        .collect()
}

fn s<'a>(r: &'a Value, k: &str) -> &'a str {
    r[k].as_str().unwrap_or_default()
}

/// Checks that every current FITS row says what its file's header says, and that its
/// BLAKE3 is the stored file's.
fn check_exposure_rows(pair: &Pair, rows: &[Value]) {
    for d in 1..=fits::DETECTORS {
        let rel = exposure_file(EXPOSURE, d);
        let rel = rel.to_string_lossy();
        let matching: Vec<&Value> = current(rows)
            .into_iter()
            .filter(|r| s(r, "path") == rel)
            .collect();
        assert_eq!(matching.len(), 1, "{rel}: one current row");
        let r = matching[0];
        let want = fits::expected(&params(d));
        assert_eq!(s(r, "night"), want.night, "{rel}");
        assert_eq!(s(r, "target_name"), want.object, "{rel}");
        assert_eq!(s(r, "exp_id"), want.exp_id, "{rel}");
        assert_eq!(s(r, "det_id"), want.det_id, "{rel}");
        assert_eq!(r["t_xel"], 3, "{rel}");
        let ra = r["s_ra"].as_f64().expect("s_ra");
        let dec = r["s_dec"].as_f64().expect("s_dec");
        assert!((ra - want.ra).abs() < 1e-6, "{rel}: ra {ra} vs {}", want.ra);
        assert!(
            (dec - want.dec).abs() < 1e-6,
            "{rel}: dec {dec} vs {}",
            want.dec
        );
        let t = r["t_min"].as_f64().expect("t_min");
        assert!(
            (t - want.mjd).abs() < 2e-8,
            "{rel}: t_min {t} vs {}",
            want.mjd
        );
        assert_eq!(s(r, "data_format"), "fits");
        assert!(r["healpix"].as_u64().is_some(), "{rel}: healpix");
        assert!(
            r["header"]["TELESCOP"] == "Kiso 105cm Schmidt",
            "{rel}: header map"
        );
        let stored = blake3_file(&pair.published().join(rel.as_ref())).expect("hash");
        assert_eq!(
            s(r, "blake3"),
            blake3::Hash::from(stored).to_hex().as_str(),
            "{rel}: blake3 of the stored file"
        );
    }
}

#[test]
fn an_exposure_becomes_84_rows_reoffers_add_none_and_a_change_supersedes_one() {
    let mut pair = start(options());
    write_exposure(&pair.source());
    pair.wait_replicated(Duration::from_secs(120))
        .expect("replicated")
        .ensure_identical()
        .expect("identical");
    let all = wait_rows(&pair, Duration::from_secs(20), |r| r.len() >= 84).expect("84 rows");
    assert_eq!(all.len(), 84);
    check_exposure_rows(&pair, &all);

    // The journal is lost and rebuilt: every file is offered again.
    pair.stop_agent().expect("stop agent");
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", pair.journal().display()));
    }
    pair.start_agent().expect("agent again");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while pair.agent_status().map(|s| s["done"] != 84).unwrap_or(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "re-offers not done\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = pair.receiver_log().expect("log");
    assert!(log.contains("already stored"), "files were re-offered");
    std::thread::sleep(Duration::from_millis(600)); // a flush, had anything changed
    assert_eq!(rows(&pair, &["--all-versions"]).expect("rows").len(), 84);

    // One file changes at the source: a new version row, the old one superseded.
    let changed = exposure_file(EXPOSURE, 5);
    let mut p = params(5);
    p.seed ^= 0xdead_beef;
    fits::write_fits(&pair.source().join(&changed), &p).expect("rewrite");
    let all = wait_rows(&pair, Duration::from_secs(60), |r| r.len() >= 85).expect("85 rows");
    assert_eq!(all.len(), 85);
    let versions: Vec<&Value> = all
        .iter()
        .filter(|r| s(r, "path") == changed.to_string_lossy())
        .collect();
    assert_eq!(versions.len(), 2);
    let superseded: Vec<&&Value> = versions
        .iter()
        .filter(|r| !r["superseded_at"].is_null())
        .collect();
    assert_eq!(superseded.len(), 1, "one superseded");
    assert_eq!(superseded[0]["version"], 1);
    assert_eq!(current(&all).len(), 84);
    pair.wait_replicated(Duration::from_secs(60))
        .expect("replicated");
    check_exposure_rows(&pair, &all);
    // By default a query shows current versions only.
    assert_eq!(rows(&pair, &[]).expect("rows").len(), 84);

    // A file that is not FITS and a truncated FITS file: stored, and catalogued as such.
    must_write(
        &pair.source().join("notes/readme.txt"),
        b"observing log, not FITS\n",
    );
    let whole = fs::read(pair.source().join(exposure_file(EXPOSURE, 1))).expect("read");
    must_write(&pair.source().join("broken/cut.fits"), &whole[..5000]);
    pair.wait_replicated(Duration::from_secs(60))
        .expect("stored")
        .ensure_identical()
        .expect("identical");
    let all = wait_rows(&pair, Duration::from_secs(20), |r| r.len() >= 87).expect("87 rows");
    let by_path: BTreeMap<&str, &Value> = all.iter().map(|r| (s(r, "path"), r)).collect();
    let text = by_path["notes/readme.txt"];
    assert_eq!(s(text, "data_format"), "not_fits");
    assert!(s(text, "format_error").contains("SIMPLE"), "{text}");
    assert_eq!(text["size_bytes"], 24);
    let cut = by_path["broken/cut.fits"];
    assert_eq!(s(cut, "data_format"), "fits_truncated");
    assert!(s(cut, "format_error").contains("cut short"), "{cut}");
    assert_eq!(
        s(cut, "target_name"),
        "TMQ-F0042",
        "what the header gave is kept"
    );
    let status = pair
        .wait_done(84 + 1 + 2, Duration::from_secs(10))
        .expect("status");
    // 84 files, a second version of one, two more files.
    assert_eq!(status["done"], 84 + 1 + 2, "{status}");
    assert_eq!(status["failed"], 0, "{status}");

    // Queries by object, cone and night find the exposure; bad input exits 64.
    let want = fits::expected(&params(30));
    let cone = format!("{},{},0.05", want.ra, want.dec);
    let hits = rows(&pair, &["--cone", &cone]).expect("cone");
    assert!(hits.iter().any(|r| s(r, "det_id") == "30"), "{hits:?}");
    assert_eq!(
        rows(&pair, &["--object", "tmq-f0042"])
            .expect("object")
            .len(),
        85
    );
    // The text file's night comes from its mtime (today), not the exposure's.
    assert_eq!(
        rows(&pair, &["--night", "20240501"]).expect("night").len(),
        85
    );
    for bad in [
        ["--cone", "361,0,1"],
        ["--since", "yesterday"],
        ["--night", "2024-13-01"],
    ] {
        let out = Command::new(pair.receiver_bin())
            .args(["catalog", "query", "--config"])
            .arg(pair.receiver_config_path())
            .args(bad)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(bad[0]), "{bad:?}: {err}");
    }

    // The catalog rebuilt from the stored tree equals the live one.
    pair.stop_both().expect("stop");
    let live = rows(&pair, &["--all-versions"]).expect("live rows");
    fs::remove_dir_all(pair.storage().join(".skyferry/catalog")).expect("remove catalog");
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!(
            "{}{suffix}",
            pair.storage().join(".skyferry/catalog.sqlite").display()
        ));
    }
    let out = Command::new(pair.receiver_bin())
        .args(["catalog", "rebuild", "--config"])
        .arg(pair.receiver_config_path())
        .output()
        .expect("rebuild");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("rebuild: 87/87"));
    let rebuilt = rows(&pair, &["--all-versions"]).expect("rebuilt rows");
    let comparable = |rows: &[Value]| {
        let mut v: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                let o = r.as_object_mut().expect("object");
                // When a version arrived or was replaced is not in the stored tree to
                // the microsecond: whether it was replaced is.
                o.remove("received_at");
                let sup = o.remove("superseded_at").is_some_and(|v| !v.is_null());
                o.insert("superseded".into(), sup.into());
                r
            })
            .collect();
        v.sort_by_key(|r| (r["path"].to_string(), r["version"].to_string()));
        v
    };
    assert_eq!(comparable(&rebuilt), comparable(&live));
}

#[test]
fn killed_between_publish_and_catalog_write_every_stored_file_ends_with_one_row() {
    let mut pair = Pair::new(options()).expect("pair");
    pair.write_receiver_config(|t| t.push_str(FAST_CATALOG))
        .expect("config");
    // The receiver kills itself (-9) before writing its 30th row: 29 rows are in, the
    // 30th file is published without one, and its agent never got the Ack.
    pair.set_receiver_wrapper(vec![
        "env".into(),
        "SKYFERRY_CATALOG_KILL_BEFORE_ROW=30".into(),
    ]);
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent");
    write_exposure(&pair.source());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while pair.receiver_exit().expect("exit").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the receiver was not killed\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = pair.receiver_log().expect("log");
    assert!(log.contains("SKYFERRY_CATALOG_KILL_BEFORE_ROW"), "{log}");
    pair.set_receiver_wrapper(Vec::new());
    pair.restart(skyferry_tests::Side::Receiver)
        .expect("restart");
    pair.wait_replicated(Duration::from_secs(120))
        .expect("replicated")
        .ensure_identical()
        .expect("identical");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while pair.agent_status().map(|s| s["done"] != 84).unwrap_or(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "not all done\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = wait_rows(&pair, Duration::from_secs(20), |r| r.len() >= 84).expect("rows");
    std::thread::sleep(Duration::from_millis(600));
    let all_again = rows(&pair, &["--all-versions"]).expect("rows");
    assert_eq!(all.len(), 84, "one row per stored file, no duplicate");
    assert_eq!(all_again.len(), 84);
    check_exposure_rows(&pair, &all_again);
}

#[test]
fn python_readers_read_the_night_file_and_the_summary() {
    // A missing interpreter fails here, with how to get one.
    let python = python().expect("python with pyarrow, polars, duckdb");
    let mut pair = start(options());
    write_exposure(&pair.source());
    pair.wait_replicated(Duration::from_secs(120))
        .expect("replicated");
    wait_rows(&pair, Duration::from_secs(20), |r| r.len() >= 84).expect("84 rows");
    pair.stop_both().expect("stop");
    let want = fits::expected(&params(7));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/read_catalog.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(pair.storage().join(".skyferry/catalog"))
        .arg(exposure_file(EXPOSURE, 7))
        .arg(want.night)
        .arg(want.object)
        .arg(format!("{}", want.ra))
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python readers failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for reader in [
        "pyarrow.ipc ok",
        "pyarrow.dataset ok",
        "polars ok",
        "duckdb ok",
        "summary ok",
    ] {
        assert!(stdout.contains(reader), "{reader} missing from:\n{stdout}");
    }
}

/// Compressed files are catalogued from their headers: gzip, and fpack (keywords in the
/// first BINTABLE extension).
#[test]
fn gzip_and_fpack_files_are_catalogued_from_their_headers() {
    let mut pair = start(options());
    let plain = pair.source().join("gz/a.fits");
    fits::write_fits(&plain, &params(9)).expect("write");
    let bytes = fs::read(&plain).expect("read");
    fs::remove_file(&plain).expect("rm");
    must_write(&pair.source().join("gz/a.fits.gz"), &gzip(&bytes));
    let has_fpack = Command::new("sh")
        .args(["-c", "command -v fpack"])
        .output()
        .is_ok_and(|o| o.status.success());
    let fz_expected = match has_fpack {
        true => {
            let src = pair.dir().join("b.fits");
            fits::write_fits(
                &src,
                &FitsParams {
                    style: HeaderStyle::TomoE,
                    ..params(11)
                },
            )
            .expect("write");
            let st = Command::new("fpack").arg(&src).status().expect("fpack");
            assert!(st.success());
            let fz = fs::read(pair.dir().join("b.fits.fz")).expect("fz");
            must_write(&pair.source().join("fz/b.fits.fz"), &fz);
            true
        }
        false => {
            // .ci/run installs fpack (libcfitsio-bin); a developer machine may lack it.
            eprintln!("skipped the .fz part: no fpack on PATH (apt-get install libcfitsio-bin)");
            false
        }
    };
    let n = 1 + usize::from(fz_expected);
    pair.wait_replicated(Duration::from_secs(60))
        .expect("replicated");
    let all = wait_rows(&pair, Duration::from_secs(20), |r| r.len() >= n).expect("rows");
    let by_path: BTreeMap<&str, &Value> = all.iter().map(|r| (s(r, "path"), r)).collect();
    let gz = by_path["gz/a.fits.gz"];
    assert_eq!(s(gz, "data_format"), "fits_gzip");
    assert_eq!(s(gz, "det_id"), "9");
    assert_eq!(s(gz, "obs_id"), "a");
    if fz_expected {
        let fz = by_path["fz/b.fits.fz"];
        assert_eq!(s(fz, "data_format"), "fits_fpack");
        assert_eq!(s(fz, "det_id"), "11");
        assert_eq!(fz["t_xel"], 3, "ZNAXIS3");
        assert_eq!(s(fz, "target_name"), "TMQ-F0042");
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    // gzip(1) is everywhere the tests run; no compression crate needed in the harness.
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().expect("gzip output");
    writer.join().expect("join").expect("write");
    out.stdout
}

//! Reading a FITS header: only the header blocks, never the data.
//!
//! A small parser of its own over the 2880-byte blocks rather than `fitsrs`: the catalog
//! needs the header of plain, gzip-compressed and fpack (`.fz`, keywords in the first
//! BINTABLE extension) files through one streaming read that stops at `END`; it must keep
//! whatever it could read from a broken header (a card `fitsrs` cannot parse fails its
//! whole header), and `fitsrs` 0.4 brings `wcs`, `futures` and `async-trait` with it (3.5
//! minutes to build here). Values are kept as text, as the header map stores them; the
//! catalog interprets the few it needs (`row.rs`).

use std::io::Read;

/// FITS block size.
pub const BLOCK: usize = 2880;
const CARD: usize = 80;
/// Headers longer than this (per HDU) are treated as broken: 360 blocks are 12 960 cards.
const MAX_HEADER_BLOCKS: usize = 360;

/// How the file is encoded, as far as the header tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Plain,
    Gzip,
    /// Tile-compressed image in a BINTABLE extension (`ZIMAGE = T`).
    Fpack,
}

/// What reading the header gave.
#[derive(Debug, PartialEq)]
pub enum HeaderRead {
    /// A complete header.
    Fits {
        encoding: Encoding,
        cards: Vec<(String, String)>,
        /// Bytes of the (uncompressed) HDUs the header describes: header blocks plus the
        /// data it announces, when that can be told without reading further (plain files).
        expected_size: Option<u64>,
    },
    /// Not a FITS file at all.
    NotFits { reason: String },
    /// Starts like FITS, but the header (or, for plain files, the data it announces) is
    /// cut short.
    Truncated {
        encoding: Encoding,
        cards: Vec<(String, String)>,
        reason: String,
    },
    /// Starts like FITS, but the header cannot be read as FITS.
    Broken {
        encoding: Encoding,
        cards: Vec<(String, String)>,
        reason: String,
    },
}

/// Reads the header of the file in `input` (of `file_size` bytes on disk).
pub fn read(mut input: impl Read, file_size: u64) -> HeaderRead {
    let mut magic = [0u8; 2];
    let got = read_full(&mut input, &mut magic);
    match got {
        Ok(2) if magic == [0x1f, 0x8b] => {
            let chained = std::io::Cursor::new(magic).chain(input);
            let gz = flate2::read::MultiGzDecoder::new(chained);
            read_hdus(gz, Encoding::Gzip, None)
        }
        Ok(n) => {
            let head = magic[..n].to_vec();
            let chained = std::io::Cursor::new(head).chain(input);
            read_hdus(chained, Encoding::Plain, Some(file_size))
        }
        Err(e) => HeaderRead::NotFits {
            reason: format!("cannot read the file: {e}"),
        },
    }
}

/// Reads the primary header and, when the primary HDU has no data and the file goes on,
/// the first extension's header (fpack puts the image's keywords there). Cards of the
/// extension are added after the primary's.
fn read_hdus(mut input: impl Read, encoding: Encoding, file_size: Option<u64>) -> HeaderRead {
    let (primary, primary_blocks) = match read_one(&mut input, true) {
        One::Cards(c, blocks) => (c, blocks),
        One::NotFits(reason) => return HeaderRead::NotFits { reason },
        One::Truncated(cards, reason) => {
            return HeaderRead::Truncated {
                encoding,
                cards,
                reason,
            }
        }
        One::Broken(cards, reason) => {
            return HeaderRead::Broken {
                encoding,
                cards,
                reason,
            }
        }
        One::End => {
            return HeaderRead::Truncated {
                encoding,
                cards: Vec::new(),
                reason: "empty file".into(),
            }
        }
    };
    let primary_len = primary_blocks as u64 * BLOCK as u64;
    let primary_data = match data_size(&primary) {
        Ok(d) => d,
        Err(reason) => {
            return HeaderRead::Broken {
                encoding,
                cards: primary,
                reason,
            }
        }
    };
    let mut cards = primary;
    let mut encoding = encoding;
    let mut expected = primary_len + padded(primary_data);
    if primary_data == 0 && value(&cards, "EXTEND").is_some_and(|v| v == "T") {
        match read_one(&mut input, false) {
            One::Cards(ext, ext_blocks) => {
                let zimage = value(&ext, "ZIMAGE").is_some_and(|v| v == "T");
                let bintable = value(&ext, "XTENSION").is_some_and(|v| v == "BINTABLE");
                if zimage && bintable {
                    encoding = Encoding::Fpack;
                    // Compressed data sizes do not tell the file's size cheaply.
                    expected = 0;
                } else if let Ok(d) = data_size(&ext) {
                    expected += ext_blocks as u64 * BLOCK as u64 + padded(d);
                }
                cards.extend(ext);
            }
            // A primary header alone is a complete FITS file.
            One::End => {}
            One::Truncated(ext, reason) => {
                cards.extend(ext);
                return HeaderRead::Truncated {
                    encoding,
                    cards,
                    reason: format!("first extension: {reason}"),
                };
            }
            One::NotFits(reason) | One::Broken(_, reason) => {
                return HeaderRead::Broken {
                    encoding,
                    cards,
                    reason: format!("first extension: {reason}"),
                }
            }
        }
    }
    if let (Some(size), Encoding::Plain) = (file_size, encoding) {
        if expected > 0 && size < expected {
            return HeaderRead::Truncated {
                encoding,
                cards,
                reason: format!(
                    "the header announces {expected} bytes, the file has {size} (cut short)"
                ),
            };
        }
    }
    HeaderRead::Fits {
        encoding,
        cards,
        expected_size: (encoding == Encoding::Plain && expected > 0).then_some(expected),
    }
}

enum One {
    /// The cards and the number of header blocks they took.
    Cards(Vec<(String, String)>, usize),
    /// No byte at all where a header could start.
    End,
    NotFits(String),
    Truncated(Vec<(String, String)>, String),
    Broken(Vec<(String, String)>, String),
}

/// Reads one header, block by block, up to its `END` card.
fn read_one(input: &mut impl Read, primary: bool) -> One {
    let mut cards: Vec<(String, String)> = Vec::new();
    let mut block = [0u8; BLOCK];
    for n in 0..MAX_HEADER_BLOCKS {
        let got = match read_full(input, &mut block) {
            Ok(g) => g,
            Err(e) => {
                let reason = format!("read error in header block {}: {e}", n + 1);
                return if n == 0 && primary {
                    One::NotFits(reason)
                } else {
                    One::Truncated(cards, reason)
                };
            }
        };
        if got == 0 && n == 0 {
            return One::End;
        }
        if n == 0 {
            let first = &block[..got.min(CARD)];
            let want: &[u8] = if primary { b"SIMPLE  =" } else { b"XTENSION=" };
            let partial = got < want.len() && want.starts_with(first);
            if !(first.starts_with(want) || partial) {
                return if primary {
                    One::NotFits("does not start with a FITS SIMPLE card".into())
                } else {
                    One::Broken(
                        cards,
                        "no XTENSION card where an extension must start".into(),
                    )
                };
            }
            if primary && first.len() >= 30 && first[29] != b'T' {
                return One::Broken(cards, "SIMPLE is not T (not standard FITS)".into());
            }
        }
        for card in block[..got - got % CARD].chunks(CARD) {
            if !card.iter().all(|b| (b' '..=b'~').contains(b)) {
                let at = n * 36 + cards.len() + 1;
                return One::Broken(
                    cards,
                    format!("header card {at} holds bytes that are not printable ASCII"),
                );
            }
            // Checked ASCII above, so this is valid UTF-8.
            let text = String::from_utf8_lossy(card);
            let keyword = text[..8].trim_end();
            if keyword == "END" {
                return One::Cards(cards, n + 1);
            }
            parse_card(&text, &mut cards);
        }
        if got < BLOCK {
            return One::Truncated(
                cards,
                format!(
                    "the header ends after {} bytes without an END card",
                    n * BLOCK + got
                ),
            );
        }
    }
    One::Broken(
        cards,
        format!("no END card within {MAX_HEADER_BLOCKS} header blocks"),
    )
}

/// Adds one card's keyword and value. Comment cards (`COMMENT`, `HISTORY`, blank) are
/// kept, their text joined by newlines; `CONTINUE` extends the previous long string;
/// `HIERARCH` keywords keep their full name; of a repeated keyword the first wins.
fn parse_card(card: &str, cards: &mut Vec<(String, String)>) {
    let keyword = card[..8].trim_end();
    let rest = &card[8..];
    if keyword == "HIERARCH" {
        if let Some((name, value)) = rest.split_once('=') {
            push(cards, name.trim().to_owned(), parse_value(value));
        }
        return;
    }
    if keyword == "CONTINUE" {
        let more = parse_value(&card[8..]);
        if let Some((_, last)) = cards.last_mut() {
            if let Some(stripped) = last.strip_suffix('&') {
                *last = format!("{stripped}{more}");
            }
        }
        return;
    }
    if let Some(value) = rest.strip_prefix("= ") {
        push(cards, keyword.to_owned(), parse_value(value));
    } else if matches!(keyword, "COMMENT" | "HISTORY" | "") {
        let text = rest.trim_end();
        if keyword.is_empty() && text.trim().is_empty() {
            return;
        }
        let key = if keyword.is_empty() {
            "COMMENT"
        } else {
            keyword
        };
        match cards.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => {
                v.push('\n');
                v.push_str(text.trim());
            }
            None => cards.push((key.to_owned(), text.trim().to_owned())),
        }
    }
}

fn push(cards: &mut Vec<(String, String)>, key: String, value: String) {
    if !cards.iter().any(|(k, _)| *k == key) {
        cards.push((key, value));
    }
}

/// The value of a card's value field, without its comment: strings unquoted (with `''`
/// unescaped and trailing blanks removed), anything else trimmed.
fn parse_value(field: &str) -> String {
    let field = field.trim_start();
    if let Some(body) = field.strip_prefix('\'') {
        let mut out = String::new();
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    out.push('\'');
                } else {
                    break;
                }
            } else {
                out.push(c);
            }
        }
        return out.trim_end().to_owned();
    }
    match field.find('/') {
        Some(i) => field[..i].trim().to_owned(),
        None => field.trim().to_owned(),
    }
}

/// The value of `key`, if the header has it.
pub fn value<'a>(cards: &'a [(String, String)], key: &str) -> Option<&'a str> {
    cards
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// Data bytes the header announces: |BITPIX|/8 × GCOUNT × (PCOUNT + NAXIS1 × … × NAXISn).
fn data_size(cards: &[(String, String)]) -> Result<u64, String> {
    let int = |key: &str| -> Result<Option<i64>, String> {
        match value(cards, key) {
            None => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .map(Some)
                .map_err(|_| format!("{key} = {v:?} is not an integer")),
        }
    };
    let bitpix = int("BITPIX")?.ok_or("no BITPIX card")?;
    if ![8, 16, 32, 64, -32, -64].contains(&bitpix) {
        return Err(format!("BITPIX = {bitpix} is not a FITS data type"));
    }
    let naxis = int("NAXIS")?.ok_or("no NAXIS card")?;
    if !(0..=999).contains(&naxis) {
        return Err(format!("NAXIS = {naxis} is out of range (0..=999)"));
    }
    if naxis == 0 {
        return Ok(0);
    }
    let mut elements: u64 = 1;
    for i in 1..=naxis {
        let n = int(&format!("NAXIS{i}"))?.ok_or(format!("no NAXIS{i} card"))?;
        let n = u64::try_from(n).map_err(|_| format!("NAXIS{i} = {n} is negative"))?;
        elements = elements
            .checked_mul(n)
            .ok_or("the announced data size overflows")?;
    }
    let pcount = int("PCOUNT")?.unwrap_or(0).max(0) as u64;
    let gcount = int("GCOUNT")?.unwrap_or(1).max(0) as u64;
    elements
        .checked_add(pcount)
        .and_then(|e| e.checked_mul(gcount))
        .and_then(|e| e.checked_mul(bitpix.unsigned_abs() / 8))
        .ok_or_else(|| "the announced data size overflows".into())
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cards: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in cards.iter().chain(["END"].iter()) {
            out.extend(format!("{c:<80}").as_bytes());
        }
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, b' ');
        out
    }

    fn simple(extra: &[&str]) -> Vec<String> {
        let mut c: Vec<String> = [
            "SIMPLE  =                    T / standard",
            "BITPIX  =                   16",
            "NAXIS   =                    2",
            "NAXIS1  =                   10",
            "NAXIS2  =                   10",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        c.extend(extra.iter().map(|s| s.to_string()));
        c
    }

    fn file(extra: &[&str]) -> Vec<u8> {
        let cards = simple(extra);
        let refs: Vec<&str> = cards.iter().map(String::as_str).collect();
        let mut bytes = header(&refs);
        bytes.resize(bytes.len() + BLOCK, 0);
        bytes
    }

    #[test]
    fn tomoe_cards_are_read_with_strings_comments_and_quotes() {
        let bytes = file(&[
            "OBJECT  = 'M42 ''Orion'''        / field",
            "RA      = '05:35:17.3'         / pointing",
            "DEC     = '-05:23:28'",
            "DATE-OBS= '2024-05-01'",
            "UTC     = '10:40:30.5'",
            "DET-ID  =                   17",
            "EXP_ID  =                   42 / exposure",
            "COMMENT first",
            "COMMENT second",
            "HIERARCH ESO DET CHIP = 'x' / eso",
        ]);
        let HeaderRead::Fits {
            cards, encoding, ..
        } = read(&bytes[..], bytes.len() as u64)
        else {
            panic!("not read")
        };
        assert_eq!(encoding, Encoding::Plain);
        assert_eq!(value(&cards, "OBJECT"), Some("M42 'Orion'"));
        assert_eq!(value(&cards, "RA"), Some("05:35:17.3"));
        assert_eq!(value(&cards, "DEC"), Some("-05:23:28"));
        assert_eq!(value(&cards, "DET-ID"), Some("17"));
        assert_eq!(value(&cards, "EXP_ID"), Some("42"));
        assert_eq!(value(&cards, "SIMPLE"), Some("T"));
        assert_eq!(value(&cards, "COMMENT"), Some("first\nsecond"));
        assert_eq!(value(&cards, "ESO DET CHIP"), Some("x"));
    }

    #[test]
    fn gzip_files_are_read_through_the_stream() {
        use std::io::Write;
        let bytes = file(&["OBJECT  = 'gz'"]);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).unwrap();
        let gz = enc.finish().unwrap();
        let HeaderRead::Fits {
            cards, encoding, ..
        } = read(&gz[..], gz.len() as u64)
        else {
            panic!("not read")
        };
        assert_eq!(encoding, Encoding::Gzip);
        assert_eq!(value(&cards, "OBJECT"), Some("gz"));
    }

    #[test]
    fn fpack_keywords_come_from_the_first_bintable() {
        let mut bytes = header(&[
            "SIMPLE  =                    T",
            "BITPIX  =                   16",
            "NAXIS   =                    0",
            "EXTEND  =                    T",
        ]);
        bytes.extend(header(&[
            "XTENSION= 'BINTABLE'",
            "BITPIX  =                    8",
            "NAXIS   =                    2",
            "NAXIS1  =                    8",
            "NAXIS2  =                    3",
            "ZIMAGE  =                    T",
            "ZNAXIS3 =                    6",
            "OBJECT  = 'packed'",
        ]));
        let HeaderRead::Fits {
            cards, encoding, ..
        } = read(&bytes[..], bytes.len() as u64)
        else {
            panic!("not read")
        };
        assert_eq!(encoding, Encoding::Fpack);
        assert_eq!(value(&cards, "OBJECT"), Some("packed"));
        assert_eq!(value(&cards, "ZNAXIS3"), Some("6"));
    }

    #[test]
    fn broken_truncated_and_foreign_files_say_why() {
        let ok = file(&["OBJECT  = 'x'"]);
        // Cut in the data: the header announces more bytes than the file has.
        match read(&ok[..BLOCK + 10], (BLOCK + 10) as u64) {
            HeaderRead::Truncated { reason, cards, .. } => {
                assert!(reason.contains("cut short"), "{reason}");
                assert_eq!(value(&cards, "OBJECT"), Some("x"));
            }
            other => panic!("{other:?}"),
        }
        // Cut in the header.
        match read(&ok[..300], 300) {
            HeaderRead::Truncated { reason, .. } => {
                assert!(reason.contains("without an END card"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        match read(&b"PNG and other things"[..], 20) {
            HeaderRead::NotFits { reason } => assert!(reason.contains("SIMPLE"), "{reason}"),
            other => panic!("{other:?}"),
        }
        match read(&b""[..], 0) {
            HeaderRead::Truncated { reason, .. } => assert_eq!(reason, "empty file"),
            other => panic!("{other:?}"),
        }
        let mut binary = ok.clone();
        binary[400] = 0xff;
        assert!(matches!(
            read(&binary[..], binary.len() as u64),
            HeaderRead::Broken { .. }
        ));
    }

    proptest::proptest! {
        /// Whatever the bytes, reading never panics.
        #[test]
        fn any_bytes_are_handled(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6000),
                                 fits_prefix in proptest::prelude::any::<bool>()) {
            let mut input = if fits_prefix { file(&[])[..80].to_vec() } else { Vec::new() };
            input.extend(bytes);
            let _ = read(&input[..], input.len() as u64);
        }
    }
}

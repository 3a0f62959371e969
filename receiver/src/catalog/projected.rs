//! Reading a night file's record batches with a projection that also saves the disk
//! reads: arrow-ipc's `FileReader` reads every batch whole and only then drops the
//! columns not asked for. Here a batch's metadata is read first, and of its body only the
//! bytes up to the end of the last projected column's buffers. The `header` map, by far
//! the largest column, is the last one, so a query that does not print it never reads it
//! from disk.
//!
//! The files are plain Arrow IPC files (any reader reads them); this is only a reader.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::{read_footer_length, FileDecoder};
use arrow_ipc::Block;
use arrow_schema::{DataType, SchemaRef};

pub struct ProjectedReader {
    file: File,
    decoder: FileDecoder,
    blocks: Vec<Block>,
    schema: SchemaRef,
    /// Buffers of the fields up to and including the last projected one (`None`: the
    /// layout of some field is not known here, so bodies are read whole).
    buffers_needed: Option<usize>,
    custom_metadata: HashMap<String, String>,
    /// Bytes read from the file (footer, metadata and bodies), for tests and the bench.
    pub bytes_read: u64,
}

fn err(m: impl Into<String>) -> String {
    m.into()
}

/// How many IPC buffers a field of type `t` has (the Arrow columnar format's layout);
/// `None` for types this catalog does not write.
fn buffer_count(t: &DataType) -> Option<usize> {
    use DataType::*;
    Some(match t {
        Utf8 | Binary => 3,
        Boolean
        | Int8
        | Int16
        | Int32
        | Int64
        | UInt8
        | UInt16
        | UInt32
        | UInt64
        | Float32
        | Float64
        | Date32
        | Date64
        | Timestamp(_, _) => 2,
        Struct(fields) => {
            1 + fields
                .iter()
                .map(|f| buffer_count(f.data_type()))
                .sum::<Option<usize>>()?
        }
        Map(entries, _) | List(entries) => 2 + buffer_count(entries.data_type())?,
        _ => return None,
    })
}

impl ProjectedReader {
    /// Opens `path` for reading the columns `projection` (indices into the file's
    /// schema, ascending).
    pub fn open(path: &Path, projection: &[usize]) -> Result<ProjectedReader, String> {
        let mut file = File::open(path).map_err(|e| e.to_string())?;
        let mut tail = [0u8; 10];
        let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
        if len < 10 {
            return Err(err("too short to be an Arrow IPC file"));
        }
        file.seek(SeekFrom::End(-10)).map_err(|e| e.to_string())?;
        file.read_exact(&mut tail).map_err(|e| e.to_string())?;
        let footer_len = read_footer_length(tail).map_err(|e| e.to_string())?;
        if footer_len as u64 + 10 > len {
            return Err(err("footer length past the start of the file"));
        }
        let mut footer = vec![0u8; footer_len];
        file.seek(SeekFrom::End(-10 - footer_len as i64))
            .map_err(|e| e.to_string())?;
        file.read_exact(&mut footer).map_err(|e| e.to_string())?;
        let fb = arrow_ipc::root_as_footer(&footer).map_err(|e| format!("footer: {e}"))?;
        let ipc_schema = fb.schema().ok_or_else(|| err("no schema in the footer"))?;
        let schema =
            Arc::new(arrow_ipc::convert::try_fb_to_schema(ipc_schema).map_err(|e| e.to_string())?);
        if projection.iter().any(|&i| i >= schema.fields().len()) {
            return Err(err("projection past the file's columns"));
        }
        if fb.dictionaries().is_some_and(|d| !d.is_empty()) {
            return Err(err("dictionary batches: not a catalog night file"));
        }
        let blocks: Vec<Block> = fb
            .recordBatches()
            .map(|b| b.iter().copied().collect())
            .unwrap_or_default();
        let mut custom_metadata = HashMap::new();
        for kv in fb.custom_metadata().into_iter().flatten() {
            if let (Some(k), Some(v)) = (kv.key(), kv.value()) {
                custom_metadata.insert(k.to_owned(), v.to_owned());
            }
        }
        let buffers_needed = projection.iter().max().and_then(|&last| {
            schema.fields()[..=last]
                .iter()
                .map(|f| buffer_count(f.data_type()))
                .sum::<Option<usize>>()
        });
        let decoder =
            FileDecoder::new(schema.clone(), fb.version()).with_projection(projection.to_vec());
        let schema = Arc::new(schema.project(projection).map_err(|e| e.to_string())?);
        Ok(ProjectedReader {
            file,
            decoder,
            blocks,
            schema,
            buffers_needed,
            custom_metadata,
            bytes_read: 10 + footer_len as u64,
        })
    }

    pub fn num_batches(&self) -> usize {
        self.blocks.len()
    }

    /// The projected schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn custom_metadata(&self) -> &HashMap<String, String> {
        &self.custom_metadata
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|e| e.to_string())?;
        self.bytes_read += buf.len() as u64;
        Ok(())
    }

    /// Batch `i`, its projected columns only.
    pub fn batch(&mut self, i: usize) -> Result<RecordBatch, String> {
        let block = *self.blocks.get(i).ok_or_else(|| format!("no batch {i}"))?;
        let (offset, meta_len, body_len) = (
            u64::try_from(block.offset()).map_err(|_| err("negative block offset"))?,
            usize::try_from(block.metaDataLength()).map_err(|_| err("negative metadata length"))?,
            usize::try_from(block.bodyLength()).map_err(|_| err("negative body length"))?,
        );
        let mut buf = vec![0u8; meta_len];
        self.read_at(offset, &mut buf)?;
        let body_needed = self
            .buffers_needed
            .and_then(|n| body_prefix(&buf, n))
            .unwrap_or(body_len)
            .min(body_len);
        buf.resize(meta_len + body_needed, 0);
        let start = offset + meta_len as u64;
        let (_, body) = buf.split_at_mut(meta_len);
        self.file
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.file.read_exact(body))
            .map_err(|e| e.to_string())?;
        self.bytes_read += body.len() as u64;
        // The decoder slices the body only where the projected buffers are.
        let block = Block::new(block.offset(), block.metaDataLength(), body_needed as i64);
        self.decoder
            .read_record_batch(&block, &Buffer::from_vec(buf))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("batch {i} is not a record batch"))
    }
}

/// The body bytes the first `n` buffers of the record batch message in `meta` (an
/// encapsulated message: continuation marker, length, flatbuffer) end at; `None` if the
/// message cannot be read or does not have that many buffers, so the caller reads all.
fn body_prefix(meta: &[u8], n: usize) -> Option<usize> {
    let (len_at, fb_at) = if meta.get(..4) == Some(&[0xff; 4]) {
        (4, 8)
    } else {
        (0, 4)
    };
    let len = i32::from_le_bytes(meta.get(len_at..len_at + 4)?.try_into().ok()?);
    let fb = meta.get(fb_at..fb_at + usize::try_from(len).ok()?)?;
    let message = arrow_ipc::root_as_message(fb).ok()?;
    let buffers = message.header_as_record_batch()?.buffers()?;
    let total = buffers.len();
    if n > total {
        return None;
    }
    // Every buffer of the fields that come first ends by the end of the last of them.
    buffers
        .iter()
        .take(n)
        .map(|b| usize::try_from(b.offset() + b.length()).ok())
        .try_fold(0usize, |acc, end| Some(acc.max(end?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::arrow_file::{self, write_night};
    use crate::catalog::row::{Fields, Row};
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    use arrow_ipc::reader::FileReader;

    fn rows(n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                agent: "kiso".into(),
                path: format!("f{i:05}.fits"),
                blake3: [i as u8; 32],
                size_bytes: i as u64,
                mtime_ns: 0,
                received_at_us: i as i64,
                version: 1,
                superseded_at_us: None,
                night: "2024-05-01".parse().unwrap(),
                fields: Fields {
                    data_format: "fits".into(),
                    s_ra: Some(i as f64 * 0.01),
                    s_dec: Some(1.0),
                    healpix: Some(crate::catalog::sky::index(i as f64 * 0.01, 1.0)),
                    header: (0..30)
                        .map(|k| (format!("KEY{k}"), format!("value {k} of file {i}")))
                        .collect(),
                    ..Fields::default()
                },
            })
            .collect()
    }

    /// The projected batches equal the same columns read by arrow-ipc's own reader, and
    /// leaving out the header map leaves most of the file unread.
    #[test]
    fn projected_batches_equal_the_full_read_and_skip_the_header_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let night = "2024-05-01".parse().unwrap();
        let size = write_night(dir.path(), night, rows(5000), "test").unwrap();
        let path = arrow_file::night_file(dir.path(), night);
        let schema = arrow_file::schema();
        let cols = ["path", "s_ra", "superseded_at"];
        let projection: Vec<usize> = cols.iter().map(|c| schema.index_of(c).unwrap()).collect();
        let mut r = ProjectedReader::open(&path, &projection).unwrap();
        let full = FileReader::try_new(File::open(&path).unwrap(), None).unwrap();
        assert_eq!(r.num_batches(), full.num_batches());
        for (i, b) in full.enumerate() {
            let b = b.unwrap();
            let p = r.batch(i).unwrap();
            assert_eq!(p.num_columns(), cols.len());
            for c in cols {
                assert_eq!(p.column_by_name(c).unwrap(), b.column_by_name(c).unwrap());
            }
        }
        assert!(
            r.bytes_read * 3 < size,
            "read {} of {size} bytes without the header column",
            r.bytes_read
        );
        // With the header asked for, every byte of the bodies is read, and the map is whole.
        let h = schema.index_of("header").unwrap();
        let mut all = ProjectedReader::open(&path, &[h]).unwrap();
        let b = all.batch(1).unwrap();
        let m = b.column(0).as_map();
        assert_eq!(m.value(0).len(), 30);
        assert!(all.bytes_read > size / 4);
    }

    #[test]
    fn a_file_that_is_not_arrow_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.arrow");
        std::fs::write(&p, b"not an arrow file at all, really").unwrap();
        assert!(ProjectedReader::open(&p, &[0]).is_err());
        std::fs::write(&p, b"ab").unwrap();
        assert!(ProjectedReader::open(&p, &[0])
            .err()
            .unwrap()
            .contains("too short"));
    }
}

"""Reads a skyferry catalog the ways users do: pyarrow (ipc.open_file and
dataset(format="arrow")), polars scan_ipc, and DuckDB over the pyarrow dataset.

Usage: read_catalog.py CATALOG_DIR PATH NIGHT OBJECT RA
Checks one exposure of 84 files in night NIGHT: row counts, column types, the values of
the row of PATH (target OBJECT, right ascension RA) and the header map; prints
"<reader> ok" for each reader that passed and exits non-zero at the first failure.
"""

import datetime
import math
import os
import sys

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.ipc as ipc

catalog, path, night, obj, ra = sys.argv[1:6]
ra = float(ra)
night_file = os.path.join(catalog, f"{night}.arrow")
night_date = datetime.date.fromisoformat(night)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)


# pyarrow, the IPC file reader.
with pa.memory_map(night_file) as source:
    reader = ipc.open_file(source)
    table = reader.read_all()
check(table.num_rows == 84, f"pyarrow rows {table.num_rows}")
schema = table.schema
check(schema.field("s_ra").type == pa.float64(), "s_ra float64")
check(schema.field("night").type == pa.date32(), "night date32")
check(schema.field("healpix").type == pa.uint64(), "healpix uint64")
check(schema.field("received_at").type == pa.timestamp("us", tz="UTC"), "received_at")
check(pa.types.is_map(schema.field("header").type), "header is a map")
rows = table.to_pylist()
row = next(r for r in rows if r["path"] == path)
check(row["target_name"] == obj, f"target {row['target_name']}")
check(abs(row["s_ra"] - ra) < 1e-6, f"ra {row['s_ra']}")
check(row["night"] == night_date, f"night {row['night']}")
header = dict(row["header"])
check(header.get("TELESCOP") == "Kiso 105cm Schmidt", f"header {header}")
check(header.get("OBJECT") == obj, "header OBJECT")
hp = [r["healpix"] for r in rows]
check(hp == sorted(hp), "rows sorted by healpix")
check(reader.num_record_batches >= 1, "record batches")
print("pyarrow.ipc ok")

# pyarrow datasets over the whole catalog directory (night files only).
nights = [
    os.path.join(catalog, f)
    for f in sorted(os.listdir(catalog))
    if f.endswith(".arrow") and f != "nights.arrow"
]
dataset = ds.dataset(nights, format="arrow")
filtered = dataset.to_table(filter=ds.field("det_id") == row["det_id"])
check(filtered.num_rows == 1, f"dataset filter rows {filtered.num_rows}")
check(dataset.count_rows() == 84, "dataset rows")
print("pyarrow.dataset ok")

# polars, lazily (zstd-compressed batches need polars >= 1.34).
lf = pl.scan_ipc(night_file)
df = lf.filter(pl.col("path") == path).collect()
check(df.height == 1, f"polars rows {df.height}")
check(df["target_name"][0] == obj, "polars target")
check(df.schema["night"] == pl.Date, f"polars night type {df.schema['night']}")
check(pl.scan_ipc(night_file).select(pl.len()).collect().item() == 84, "polars count")
hdr = df["header"][0]
check(any(e["key"] == "TELESCOP" for e in hdr), f"polars header {hdr}")
print("polars ok")

# DuckDB querying the pyarrow dataset (not its own Arrow extension).
con = duckdb.connect()
con.register("catalog", dataset)
n = con.execute("SELECT count(*) FROM catalog WHERE night = ?", [night_date]).fetchone()[0]
check(n == 84, f"duckdb night rows {n}")
got = con.execute(
    "SELECT target_name, s_ra, header['TELESCOP'] FROM catalog WHERE path = ?", [path]
).fetchone()
check(got[0] == obj and abs(got[1] - ra) < 1e-6, f"duckdb row {got}")
telescop = got[2][0] if isinstance(got[2], list) else got[2]
check(telescop == "Kiso 105cm Schmidt", f"duckdb map value {got[2]}")
print("duckdb ok")

# The summary.
summary = ipc.open_file(os.path.join(catalog, "nights.arrow")).read_all().to_pylist()
check(len(summary) == 1, f"summary nights {len(summary)}")
s = summary[0]
check(s["night"] == night_date and s["rows"] == 84, f"summary {s}")
check(s["dec_min"] <= s["dec_max"] and not math.isnan(s["t_min"]), f"summary bounds {s}")
print("summary ok")

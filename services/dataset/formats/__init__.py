"""Upload files read record by record in bounded memory; pure (no I/O beyond the given paths).

    upload --decompress (gz, bz2, xz, zst)--> file --detect_file_format--> read_records
        -> (location, dict | RecordError), one per record, in file order

File formats:

    jsonl    one JSON object per line; blank lines skipped
    json     a top-level array of objects, or an object whose only field is that array
             ({"data": [...]}); streamed item by item, never loaded whole
    csv      a header row, then one record per row (a quoted cell may span lines); cells stay
             text: schemas decodes the conversation fields that CSV can only hold as JSON text
    parquet  read by record batch, a few rows at a time
    hf_disk  a folder written by `datasets`' save_to_disk: a Dataset, or a DatasetDict whose
             splits are read one after another in its dataset_dict.json order (or one of them:
             read_records' `split`)

Text formats must be UTF-8; a UTF-8 byte-order mark at the start is ignored. A JSONL line, a CSV
record (all the lines it spans: a quoted cell may hold newlines) or a JSON item longer than
max_line_bytes is skipped without being held in memory and reported as a RecordError. (csv holds
the record it parses as 4-byte characters: up to 4 * max_line_bytes.)

Parquet and saved datasets compress inside the file, where the upload's expansion limit does not
see: a 2 KB Parquet file can hold 400 MB of rows. Arrow sizes each row before Python sees it: the
bytes of its values (strings and binaries by length, other values by width, lists and structs by
their values' sum). A row larger than max_line_bytes is a RecordError and never a Python object;
past max_total_bytes of rows in all, the upload is a SourceError; and rows become Python objects
a few at a time (PYTHON_ROWS, and max_line_bytes of values). Not bounded: what pyarrow decodes
whole to read a row. That is, of Parquet, a page of a column (a dictionary page too) and a batch
of rows (PARQUET_BATCH_ROWS, fewer where the row group's metadata tells of long rows); of a saved
dataset, a record batch of its Arrow files, decompressed (datasets writes 1,000 rows a batch).

Locations name the file and where the record starts: "data.jsonl:12", "data.csv:7" (lines count
from 1, as in editors), "data.json:item 5 (line 12)", "data.parquet:row 3", "data:train:row 3"
(items and rows count from 0, as in pandas, datasets and jq).

Upload-level problems raise SourceError, whose message starts with the filename: read_records
raises it when called for what shows at once (an empty file), and while iterating for what
shows late (a truncated JSON or Parquet file).
A record that cannot be read is yielded as a RecordError: one bad line costs that line only.

One module per format family, each a reader in the table of `readers.READERS` (by format name):
json_formats (jsonl, json), csv_format, parquet and saved_dataset (hf_disk) over arrow (Arrow
rows sized before Python sees them); and what they share: text (UTF-8 lines), compression,
detection, limits (sizes, the expansion bound), errors.
"""

from .compression import COMPRESSION_SUFFIXES, compression_of, decompress
from .detection import detect_file_format
from .errors import RecordError, SourceError
from .readers import FILE_FORMATS, READERS, read_records

__all__ = [
    "COMPRESSION_SUFFIXES",
    "FILE_FORMATS",
    "READERS",
    "RecordError",
    "SourceError",
    "compression_of",
    "decompress",
    "detect_file_format",
    "read_records",
]

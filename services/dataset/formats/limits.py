"""What a reader may hold in memory, shared by every format. Readers look the sizes up here when
they run (`limits.CHUNK_BYTES`), so a test can shrink a read to a few bytes."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RecordError, SourceError

CHUNK_BYTES = 256 << 10  # read size; about what a reader holds beyond one record
SNIFF_BYTES = 64 << 10  # how much of a file format detection looks at
PARQUET_BATCH_ROWS = 64  # rows pyarrow decodes at once, at most: few, for long texts
PYTHON_ROWS = 64  # Parquet and Arrow rows made Python objects at once
MAX_KEY_BYTES = 4096  # a JSON object key around a streamed array ({"data": [...]})


def too_long(what: str, length: int, limit: int) -> RecordError:
    return RecordError(f"{what} is {length} bytes, longer than the limit of {limit} bytes")


class Expansion:
    """The decoded bytes of an upload's records so far, against max_total_bytes: Parquet and
    Arrow compress inside the file, so the upload's own expansion limit does not see them."""

    def __init__(self, filename: str, limit: int | None):
        self.filename = filename
        self.limit = limit
        self.total = 0

    def room(self) -> float:
        """How many more bytes fit."""
        return float("inf") if self.limit is None else self.limit - self.total

    def add(self, size: int, location: str) -> None:
        self.total += size
        if self.limit is not None and self.total > self.limit:
            raise SourceError(
                f"{self.filename}: expands to more than {self.limit} bytes of values, the limit "
                f"for an upload (passed at {location})"
            )


@dataclass(frozen=True)
class ReadRequest:
    """What `read_records` asks of a format's reader."""

    filename: str  # names the upload in locations and errors
    max_line_bytes: int  # one JSONL line, CSV record, JSON item, or Parquet/Arrow row's values
    expansion: Expansion  # all the rows' decoded values (Parquet, saved datasets)
    split: str | None = None  # one split of a saved DatasetDict (None: all)

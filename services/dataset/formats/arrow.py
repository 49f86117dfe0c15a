"""Arrow rows (of Parquet files and saved datasets) sized before Python sees them, and made
Python objects a few at a time: the bounds the package's notes describe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import limits
from .errors import SourceError
from .limits import Expansion, too_long


def pyarrow_for(filename: str, file_format: str):
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise SourceError(
            f"{filename}: reading {file_format} needs pyarrow, which the dataset service does "
            "not have installed"
        ) from None
    return pyarrow


def _value_bytes(pa, array) -> Any:
    """Each row's decoded size (a numpy int64 array): strings and binaries by their length,
    other values by their width, lists, maps and structs by the sum of their values, nulls 0.
    Computed by Arrow and numpy, without making Python objects of the values."""
    import numpy as np  # pyarrow's own dependency

    string_arrays = (pa.StringArray, pa.BinaryArray, pa.LargeStringArray, pa.LargeBinaryArray)
    if isinstance(array.type, pa.ExtensionType):
        return _value_bytes(pa, array.storage)
    if isinstance(array, pa.DictionaryArray):
        return _value_bytes(pa, array.dictionary_decode())
    n = len(array)
    if n == 0 or array.null_count == n:
        return np.zeros(n, np.int64)
    if isinstance(array, string_arrays):
        sizes = np.diff(_offsets(pa, array))
    elif isinstance(array, (pa.ListArray, pa.LargeListArray)):  # maps too
        offsets = _offsets(pa, array)
        first, last = int(offsets[0]), int(offsets[-1])
        sums = np.zeros(last - first + 1, np.int64)
        np.cumsum(_value_bytes(pa, array.values.slice(first, last - first)), out=sums[1:])
        sizes = sums[offsets[1:] - first] - sums[offsets[:-1] - first]
    elif isinstance(array, pa.FixedSizeListArray):
        sizes = np.zeros(n, np.int64)
        parents = pa.compute.list_parent_indices(array).to_numpy(zero_copy_only=False)
        np.add.at(sizes, parents, _value_bytes(pa, pa.compute.list_flatten(array)))
    elif isinstance(array, pa.StructArray):
        sizes = np.zeros(n, np.int64)
        for field in array.flatten():  # the fields of this slice, null where the struct is
            sizes += _value_bytes(pa, field)
    else:
        try:
            sizes = np.full(n, max(1, array.type.bit_width // 8), np.int64)
        except ValueError:  # not fixed-width
            if str(array.type) in ("string_view", "binary_view"):  # pyarrow 16 on
                sizes = _value_bytes(pa, array.cast(pa.large_binary()))
            else:  # unions and the like: what each row references
                sizes = np.array([array.slice(i, 1).nbytes for i in range(n)])
    sizes = sizes.astype(np.int64, copy=False)
    if array.null_count:  # a null may still span bytes (a list's offsets); it holds none
        sizes = np.where(array.is_valid().to_numpy(zero_copy_only=False), sizes, 0)
    return sizes


def _offsets(pa, array) -> Any:
    """The n + 1 offsets of a string, binary or list array's rows into its values (which a
    slice shares whole), from its buffer: Array.offsets.to_numpy() is 100 times slower."""
    import numpy as np  # pyarrow's own dependency

    large = isinstance(array, (pa.LargeStringArray, pa.LargeBinaryArray, pa.LargeListArray))
    offsets = np.frombuffer(array.buffers()[1], np.int64 if large else np.int32)
    return offsets[array.offset : array.offset + len(array) + 1].astype(np.int64)


def batch_records(
    pa,
    batch,
    label: str,
    first_row: int,
    max_record_bytes: int,
    expansion: Expansion,
) -> Iterator[tuple[str, Any]]:
    """The rows of an Arrow record batch, made Python objects a few at a time: at most
    PYTHON_ROWS rows and max_record_bytes of values (or one row). A row larger than
    max_record_bytes is a RecordError, never made a Python object."""
    import numpy as np  # pyarrow's own dependency

    sizes = np.zeros(batch.num_rows, np.int64)
    for column in batch.columns:
        sizes += _value_bytes(pa, column)
    start = 0
    while start < len(sizes):
        size = int(sizes[start])
        if size > max_record_bytes:
            location = f"{label}:row {first_row + start}"
            expansion.add(size, location)
            yield location, too_long("record", size, max_record_bytes)
            start += 1
            continue
        # the rows from start whose sizes add up to max_record_bytes at most (one at least)
        held = np.cumsum(sizes[start : start + limits.PYTHON_ROWS])
        count = int(np.searchsorted(held, max_record_bytes, side="right"))
        records = batch.slice(start, count).to_pylist()
        if expansion.room() >= held[count - 1]:
            expansion.add(int(held[count - 1]), label)
            for row, record in enumerate(records, first_row + start):
                yield f"{label}:row {row}", record
        else:  # the limit falls in these rows: name the row that passes it
            for i, record in enumerate(records, start):
                location = f"{label}:row {first_row + i}"
                expansion.add(int(sizes[i]), location)
                yield location, record
        start += count

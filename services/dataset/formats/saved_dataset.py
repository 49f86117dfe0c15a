"""Folders written by `datasets`' save_to_disk: a Dataset (state.json lists its Arrow files), or
a DatasetDict (dataset_dict.json lists its splits, a folder each) whose splits are read one after
another in that order, or one of them (`ReadRequest.split`). A record batch of the Arrow files is
read whole (datasets writes 1,000 rows a batch); names from the folder's own metadata never lead
out of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .arrow import batch_records, pyarrow_for
from .errors import SourceError
from .limits import Expansion, ReadRequest

HF_DICT_FILE = "dataset_dict.json"  # DatasetDict.save_to_disk: {"splits": [...]}, a folder each
HF_STATE_FILE = "state.json"  # Dataset.save_to_disk: lists the Arrow files, in order


def is_saved_dataset(folder: Path) -> bool:
    return (folder / HF_DICT_FILE).is_file() or (folder / HF_STATE_FILE).is_file()


def read_saved_dataset(folder: Path, request: ReadRequest) -> Iterator[tuple[str, Any]]:
    filename, split = request.filename, request.split
    max_record_bytes, expansion = request.max_line_bytes, request.expansion
    if (folder / HF_DICT_FILE).is_file():
        splits = _json_file(folder / HF_DICT_FILE, filename).get("splits")
        if not (isinstance(splits, list) and all(isinstance(s, str) for s in splits)):
            raise SourceError(f"{filename}: {HF_DICT_FILE} has no list of splits")
        if split is not None:
            if split not in splits:
                raise SourceError(
                    f"{filename}: has no split '{split}'; its splits: {', '.join(splits)}"
                )
            splits = [split]
        for name in splits:
            yield from _read_arrow_dataset(
                _inside(folder, name, filename),
                f"{filename}:{name}",
                filename,
                max_record_bytes,
                expansion,
            )
    elif (folder / HF_STATE_FILE).is_file():
        if split is not None:
            raise SourceError(f"{filename}: holds one dataset, no splits; cannot read '{split}'")
        yield from _read_arrow_dataset(folder, filename, filename, max_record_bytes, expansion)
    else:
        raise not_a_saved_dataset(filename)


def not_a_saved_dataset(filename: str) -> SourceError:
    return SourceError(
        f"{filename}: a folder that is not a saved Hugging Face dataset (no {HF_DICT_FILE} or "
        f"{HF_STATE_FILE}, as datasets' save_to_disk writes)"
    )


def _read_arrow_dataset(
    folder: Path, label: str, filename: str, max_record_bytes: int, expansion: Expansion
) -> Iterator[tuple[str, Any]]:
    """The rows of one saved Dataset: its Arrow stream files in state.json's order."""
    pa = pyarrow_for(filename, "hf_disk")
    state = _json_file(folder / HF_STATE_FILE, filename)
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError) as e:
        raise SourceError(f"{label}: {HF_STATE_FILE} lists no data files (_data_files)") from e
    row = 0
    for name in names:
        arrow_file = _inside(folder, name, filename)
        try:  # read, not memory-mapped: mapped pages would count against the service's memory
            with pa.OSFile(str(arrow_file)) as source:
                for batch in pa.ipc.open_stream(source):  # a batch is read whole
                    yield from batch_records(pa, batch, label, row, max_record_bytes, expansion)
                    row += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise SourceError(f"{label}: cannot read {name}: {e}") from e


def _json_file(path: Path, filename: str) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SourceError(f"{filename}: unreadable {path.name}: {e}") from e
    if not isinstance(value, dict):
        raise SourceError(f"{filename}: {path.name} is not a JSON object")
    return value


def _inside(folder: Path, name: str, filename: str) -> Path:
    """folder/name, refusing a name (from the upload's own metadata) that leads out of it."""
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise SourceError(f"{filename}: refers to {name!r}, outside the dataset folder")
    return target

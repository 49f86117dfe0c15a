"""Which file format an upload is: from its content where it tells (Parquet's magic, a datasets
folder, JSON's first bytes), from its name where it does not (.jsonl, .csv)."""

from __future__ import annotations

import json
from pathlib import Path

from . import limits
from .compression import COMPRESSION_NAMES, COMPRESSION_SUFFIXES, compression_in
from .errors import SourceError
from .readers import READERS
from .saved_dataset import is_saved_dataset, not_a_saved_dataset
from .text import UTF8_BOM, check_not_utf16

_EXTENSIONS = {extension: name for name, r in READERS.items() for extension in r.extensions}


def _extension(filename: str) -> str:
    """The format extension, under any compression suffix: "d.jsonl.gz" -> ".jsonl"."""
    name = filename.lower()
    for compression in COMPRESSION_SUFFIXES:
        name = name.removesuffix(f".{compression}")
    return Path(name).suffix



def _sniff_json(head: bytes, extension: str) -> str | None:
    """ "json" or "jsonl" for JSON text, None for anything else."""
    text = head.removeprefix(UTF8_BOM).lstrip()
    if text.startswith(b"["):
        return "json"
    if not text.startswith(b"{"):
        return None
    first, newline, rest = text.partition(b"\n")
    # one line that goes on past what was read
    if not newline and len(head) == limits.SNIFF_BYTES:
        return "json" if extension == ".json" else "jsonl"
    try:
        value = json.loads(first)
    except (ValueError, RecursionError):  # '{' alone on its line: an indented document
        return "json"
    if rest.strip():  # a second line after a complete object
        return "jsonl"
    wrapper = len(value) == 1 and isinstance(next(iter(value.values())), list)
    return "json" if extension == ".json" and wrapper else "jsonl"


def detect_file_format(path: Path, filename: str) -> str:
    """One of FILE_FORMATS, from the content where it tells (Parquet's magic, a datasets folder,
    JSON's first bytes) and the extension where it does not (.jsonl, .csv). Raises SourceError
    for an empty or unknown file, or a folder that save_to_disk did not write."""
    if path.is_dir():
        if is_saved_dataset(path):
            return "hf_disk"
        raise not_a_saved_dataset(filename)
    with open(path, "rb") as f:
        head = f.read(limits.SNIFF_BYTES)
    if not head:
        raise SourceError(f"{filename}: empty file: no rows")
    if compression := compression_in(head):
        raise SourceError(
            f"{filename}: is {COMPRESSION_NAMES[compression]}-compressed; decompress it first"
        )
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK\x03\x04"):
        raise SourceError(
            f"{filename}: is a zip archive, which is not supported; upload the file itself, "
            "or compress it with gzip, bzip2, xz or zstd"
        )
    extension = _extension(filename)
    if _EXTENSIONS.get(extension) == "parquet":
        raise SourceError(f"{filename}: not a Parquet file (it does not start with PAR1)")
    check_not_utf16(head, filename)
    if _EXTENSIONS.get(extension) in ("jsonl", "csv"):
        return _EXTENSIONS[extension]
    if sniffed := _sniff_json(head, extension):
        return sniffed
    if extension == ".json":  # not JSON after all: the JSON reader says what it found
        return "json"
    raise SourceError(
        f"{filename}: unknown file format: expected JSON Lines (.jsonl), JSON (.json), CSV "
        "(.csv), Parquet (.parquet), optionally compressed (.gz, .bz2, .xz, .zst), or a "
        "folder written by datasets' save_to_disk"
    )

"""The ingest pipeline: a source file on local disk -> a validated, cleaned, split dataset version.

    ingest(source, options, limits, workdir)  ->  Ingested (files under workdir, report, verdict)
                                               or Rejected (errors naming file, line and field)

It streams: every pass reads one record at a time and writes to files under `workdir`, and what
it keeps per row is a few fixed-size numbers in numpy arrays (hashes, lengths, split scores), so
memory is bounded by the row count, never by the file size.

    pass 1  decompress (bounded) -> read records -> normalize and validate each -> redact PII if
            asked -> canonical JSON rows to workdir/candidates.jsonl, each row's split score;
            scan: exact and near duplicates (in a worker process for large files), PII, lengths
            (chars, and tokens with a base model's tokenizer)
    verdict policy thresholds on invalid rows, duplicates and PII -> Rejected, or warnings
    pass 2  drop removed duplicates -> workdir/rows.jsonl (its sha256 is the version's identity)
            and the train / validation / test files, in one read

The split is a pure function of (seed, canonical row): the same content and seed always give the
same split, and identical rows land on the same side (no train/validation leakage).
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from . import core, formats, schemas
from .dedup import ROWS_PER_BATCH
from .duplicate_worker import DuplicateScan, DuplicateWorker
from .outliers import Fences, length_fences
from .pii import find_pii, redact

SPLITS = ("train", "validation", "test")
MAX_FINDINGS_PER_KIND = 20  # row references kept in the report for each kind of finding
PROGRESS_EVERY_ROWS = 100_000
CHECK_STOP_EVERY_ROWS = 1_000
MAX_TAR_MEMBERS = 10_000  # a datasets folder: arrow files, state.json, dataset_info.json


@dataclass(frozen=True)
class Policy:
    """Thresholds, as fractions of the rows read (invalid) or of the valid rows (the others)."""

    max_invalid_fraction: float = 0.0
    max_duplicate_fraction: float = 1.0
    max_pii_fraction: float = 1.0

    def error(self) -> str | None:
        for name in ("max_invalid_fraction", "max_duplicate_fraction", "max_pii_fraction"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                return f"policy.{name}: must be between 0 and 1, got {value}"
        return None


@dataclass(frozen=True)
class Quality:
    remove_duplicates: bool = False
    remove_near_duplicates: bool = False
    redact_pii: bool = False


@dataclass(frozen=True)
class Limits:
    max_expanded_bytes: int = 64 << 30  # what a compressed upload may expand to
    max_line_bytes: int = 16 << 20  # one JSONL line / record
    near_duplicate_max_rows: int = 1_000_000  # MinHash scan stops (with a warning) beyond this
    # Sources this large scan duplicates in a worker process, in parallel with the rest.
    duplicate_worker_min_bytes: int = 32 << 20


@dataclass(frozen=True)
class Options:
    name: str
    filename: str = ""
    file_format: str = ""  # "" = detect
    schema: str = ""  # "" = detect
    source_split: str = ""  # one split of a saved DatasetDict ("" = all)
    column_map: dict[str, str] = field(default_factory=dict)
    validation_fraction: float = 0.0  # 0 = core.DEFAULT_VALIDATION_FRACTION
    test_fraction: float = 0.0
    seed: int = 0
    policy: Policy = Policy()
    quality: Quality = Quality()
    base_model: str = ""
    max_length: int = 0

    @property
    def fractions(self) -> dict[str, float]:
        validation = self.validation_fraction or core.DEFAULT_VALIDATION_FRACTION
        return {"test": self.test_fraction, "validation": validation}

    def errors(self) -> list[str]:
        errors = [e for e in (core.name_error(self.name), self.policy.error()) if e]
        for split, value in (("validation_fraction", self.validation_fraction),
                             ("test_fraction", self.test_fraction)):
            if not (math.isfinite(value) and 0 <= value < 1):
                errors.append(f"{split}: must be >= 0 and < 1, got {value}")
        held_out = sum(self.fractions.values())  # with the default validation fraction
        if not errors and held_out >= 1:
            errors.append("validation_fraction + test_fraction: must be < 1 (no training rows "
                          f"left), got {held_out:g}")
        if self.file_format and self.file_format not in formats.FILE_FORMATS:
            errors.append(f"file_format: must be one of {', '.join(formats.FILE_FORMATS)} or empty "
                          f"to detect, got {self.file_format!r}")
        if self.schema and self.schema not in schemas.SCHEMAS:
            errors.append(f"schema: must be one of {', '.join(schemas.SCHEMAS)} or empty to "
                          f"detect, got {self.schema!r}")
        if self.source_split and self.file_format not in ("", "hf_disk"):
            errors.append(f"source_split: applies to datasets folders (hf_disk), not "
                          f"{self.file_format}")
        if self.column_map and not self.schema:
            errors.append("column_map: needs an explicit schema (which fields it maps to)")
        if self.max_length < 0:
            errors.append(f"max_length: must be >= 0, got {self.max_length}")
        return errors


@dataclass
class Ingested:
    """A valid version's files (under workdir) and what is known about it."""

    format: str  # the normalized format the trainer reads
    source_schema: str
    source_format: str
    sha256: str  # of rows.jsonl
    num_rows: int
    counts: dict[str, int]  # split -> rows
    rows_path: Path
    split_paths: dict[str, Path]
    split_sha256: dict[str, str]
    status: str  # accepted | accepted_with_warnings
    warnings: list[str]
    report: dict[str, Any]


class Cancelled(Exception):
    """The caller went away (should_stop): nothing was written but the workdir."""


class Rejected(Exception):
    def __init__(self, rejection: core.Rejection, report: dict[str, Any] | None = None):
        self.rejection, self.report = rejection, report or {}
        super().__init__(rejection.summary())


def reject(errors: list[str], invalid_rows: int = 0, total: int | None = None) -> Rejected:
    return Rejected(core.Rejection(errors[: core.MAX_REPORTED_ERRORS], invalid_rows,
                                   len(errors) if total is None else total))


# -- the pipeline -------------------------------------------------------------------------------


def ingest(
    source: Path,
    options: Options,
    workdir: Path,
    limits: Limits = Limits(),
    *,
    token_counter: Callable[[dict], int] | None = None,
    on_progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Ingested:
    """Run the three passes over `source` (a file, or a `datasets` folder). Raises Rejected,
    or Cancelled when `should_stop()` turns true (checked every CHECK_STOP_EVERY_ROWS records).

    `token_counter(row) -> tokens` (from the base model's tokenizer, see `tokens.py`) adds
    token-length stats; `on_progress(rows_read)` is called every PROGRESS_EVERY_ROWS records
    and at the end."""
    errors = options.errors()
    if errors:
        raise reject(errors)
    workdir.mkdir(parents=True, exist_ok=True)
    filename = Path(options.filename or source.name).name  # only a name: no client paths in logs
    try:
        path, filename = _expanded(source, filename, workdir, limits)
        file_format = options.file_format or formats.detect_file_format(path, filename)
        if options.source_split and file_format != "hf_disk":
            raise formats.SourceError(f"{filename}: source_split applies to datasets folders "
                                      f"(hf_disk), not {file_format}")
        records = formats.read_records(path, filename, file_format,
                                       max_line_bytes=limits.max_line_bytes,
                                       max_total_bytes=limits.max_expanded_bytes,
                                       split=options.source_split or None)
        scan = _Scan(options, limits, token_counter, _duplicate_scan(path, limits))
    except formats.SourceError as e:
        raise reject([str(e)]) from None
    try:
        try:
            scan.run(records, workdir / "candidates.jsonl", on_progress, should_stop)
        except formats.SourceError as e:
            raise reject([str(e)]) from None
        scan.source_format = file_format
        warnings = scan.verdict(filename)
    finally:
        scan.duplicates.close()
    return _write_version(scan, options, workdir, warnings)


def _duplicate_scan(path: Path, limits: Limits) -> DuplicateScan | DuplicateWorker:
    size = path.stat().st_size if path.is_file() else 0
    if size >= limits.duplicate_worker_min_bytes and limits.near_duplicate_max_rows > 0:
        return DuplicateWorker(limits.near_duplicate_max_rows)
    return DuplicateScan(limits.near_duplicate_max_rows)


def _expanded(source: Path, filename: str, workdir: Path, limits: Limits) -> tuple[Path, str]:
    """The source itself, its decompressed copy (bounded) with the compression suffix gone, or
    the folder a tar holds (a `datasets` folder sent by the CLI)."""
    if source.is_dir():
        return source, filename
    if formats.compression_of(source):
        target = workdir / "expanded"
        formats.decompress(source, target, limits.max_expanded_bytes, filename=filename)
        stem, dot, suffix = filename.rpartition(".")
        filename = stem if dot and suffix.lower() in formats.COMPRESSION_SUFFIXES else filename
        source = target
    if filename.lower().endswith(".tar"):
        return _untarred(source, filename, workdir / "untarred", limits), filename[:-4]
    return source, filename


def _untarred(archive: Path, filename: str, target: Path, limits: Limits) -> Path:
    """Extract a tar holding one folder: regular files only, no absolute paths or '..'
    (tarfile's "data" filter), at most max_expanded_bytes in total."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for member in tar:  # one at a time: a tar of a million entries is refused early
                if len(members) == MAX_TAR_MEMBERS:
                    raise formats.SourceError(f"{filename}: more than {MAX_TAR_MEMBERS} entries; "
                                              "a datasets folder has a few files")
                if member.isfile() or member.isdir():
                    members.append(member)
                    total += member.size if member.isfile() else 0
                if total > limits.max_expanded_bytes:
                    raise formats.SourceError(f"{filename}: expands to more than the limit of "
                                              f"{limits.max_expanded_bytes} bytes")
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise formats.SourceError(f"{filename}: not a readable tar archive: {e}") from None
    entries = list(target.iterdir()) if target.exists() else []
    if len(entries) != 1 or not entries[0].is_dir():
        raise formats.SourceError(f"{filename}: a tar upload must hold exactly one folder "
                                  "(a datasets save_to_disk folder)")
    return entries[0]


class _Growable:
    """An append-only numpy vector (amortized doubling): a few bytes per row, not an object."""

    def __init__(self, dtype):
        self.data, self.n = np.empty(1024, dtype=dtype), 0

    def append(self, value) -> None:
        if self.n == len(self.data):
            self.data = np.resize(self.data, 2 * self.n)
        self.data[self.n] = value
        self.n += 1

    def view(self) -> np.ndarray:
        return self.data[: self.n]


# Joins a row's fields for duplicate detection and length stats. Not whitespace (the dedup
# normalizer collapses whitespace), so text moved across a field boundary is a different row.
FIELD_SEPARATOR = " \u241f "


def row_text(row: dict) -> str:
    """The text a row carries, for duplicate detection and length stats."""
    if "messages" in row:
        return FIELD_SEPARATOR.join(f"{m['role']}: {m['content']}" for m in row["messages"])
    return FIELD_SEPARATOR.join(str(row[k]) for k in sorted(row))


def _with_texts(row: dict, change) -> dict:
    """`row` with `change(path, text)` applied to each of its texts (message contents, or
    every field), in a stable order."""
    if "messages" in row:
        return {"messages": [{"role": m["role"], "content": change(f"messages[{i}]", m["content"])}
                             for i, m in enumerate(row["messages"])]}
    return {k: change(k, row[k]) for k in sorted(row)}


def _canonical(row: dict) -> bytes:
    """core.canonical(row) as a UTF-8 line: orjson writes the same bytes for a row's strings
    (sorted keys, no spaces, no ASCII escaping), 4x faster."""
    try:
        return orjson.dumps(row, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:  # not a normalized row's types: json says what it is
        return (core.canonical(row) + "\n").encode()


class _Scan:
    """Pass 1: read, validate, normalize, redact if asked, and scan every record."""

    def __init__(self, options: Options, limits: Limits, token_counter,
                 duplicates: DuplicateScan | DuplicateWorker):
        self.options, self.limits, self.token_counter = options, limits, token_counter
        self.duplicates = duplicates
        self.schema = options.schema
        self.first_line = ""  # where the detected schema came from
        self.format = schemas.NORMALIZED_FORMAT.get(self.schema, "")
        self.source_format = ""
        self.rows_read = self.invalid_rows = self.total_errors = 0
        self.errors: list[str] = []
        self.near_stopped_at = 0
        self.unscanned: list[str] = []  # row texts waiting for the duplicate scan, in a batch
        # a few bytes per valid row, indexed by its position among the valid rows
        self.chars = _Growable(np.int32)  # a row is at most max_line_bytes
        self.tokens = _Growable(np.int32)
        self.has_pii = _Growable(np.bool_)
        # split_unit of each row's canonical line; float32: 4 bytes a row, rounded the same way
        self.units = _Growable(np.float32)
        self._seeded = hashlib.sha256(f"{options.seed}:".encode())
        self.pii_counts: Counter = Counter()  # occurrences found in the source rows
        self.redacted_counts: Counter = Counter()
        self.findings: dict[str, list[dict]] = {}
        self.valid = 0

    def finding(self, kind: str, row: int, **detail) -> None:
        kept = self.findings.setdefault(kind, [])
        if len(kept) < MAX_FINDINGS_PER_KIND:
            kept.append({"kind": kind, "row": row, **detail})

    def error(self, location: str, reasons: list[str]) -> None:
        self.invalid_rows += 1
        self.total_errors += len(reasons)
        room = core.MAX_REPORTED_ERRORS - len(self.errors)
        self.errors.extend(f"{location}: {r}" for r in reasons[:max(room, 0)])

    def run(self, records: Iterator[tuple[str, Any]], out: Path, on_progress,
            should_stop) -> None:
        with out.open("wb") as sink:
            for location, value in records:
                self.rows_read += 1
                if on_progress and self.rows_read % PROGRESS_EVERY_ROWS == 0:
                    on_progress(self.rows_read)
                if should_stop and self.rows_read % CHECK_STOP_EVERY_ROWS == 0 and should_stop():
                    raise Cancelled(f"stopped after {self.rows_read} records")
                row = self.normalized(location, value)
                if row is not None:
                    line = _canonical(row)
                    sink.write(line)
                    unit = self._seeded.copy()  # split_unit(seed, line) without re-encoding
                    unit.update(memoryview(line)[:-1])
                    self.units.append(int.from_bytes(unit.digest()[:8], "big") / 2**64)
        self.scan_duplicates()
        if on_progress:
            on_progress(self.rows_read)

    def normalized(self, location: str, value: Any) -> dict | None:
        if isinstance(value, formats.RecordError):
            self.error(location, [value.reason])
            return None
        schema = self.options.schema or schemas.detect_schema(value)
        if not self.options.schema and schema and not self.schema:
            self.schema, self.first_line = schema, location
            self.format = schemas.NORMALIZED_FORMAT[schema]
        if schema is None:
            self.error(location, [f"row matches no known schema ({', '.join(schemas.SCHEMAS)}); "
                                  f"got keys {sorted(value) or 'none'}"])
            return None
        if schema != self.schema:
            self.error(location, [f"mixed schemas: a {schema} row in a file of {self.schema} "
                                  f"rows (set by {self.first_line})"])
            return None
        # Without an explicit schema, normalize detects again and refuses rows that mix two.
        row, reasons = schemas.normalize(value, self.options.schema or None,
                                         self.options.column_map or None)
        if reasons or row is None:  # a row comes without reasons, and only then
            self.error(location, reasons)
            return None
        row = self._privacy(row, location)
        self._observe(row)
        return row

    def _privacy(self, row: dict, location: str) -> dict:
        """Scan each text for PII, as redaction sees it; redact it if asked."""
        index, found_any = self.valid, False

        def scan(path: str, text: str) -> str:
            nonlocal found_any
            found = find_pii(text)
            if not found:
                return text
            found_any = True
            self.pii_counts.update(f.type for f in found)
            for f in found:
                self.finding(f"pii:{f.type}", index + 1,
                             detail=f"{location}: {path}: {_masked(text[f.start:f.end])}")
            if not self.options.quality.redact_pii:
                return text
            redacted, counts = redact(text)
            self.redacted_counts.update(counts)
            return redacted

        row = _with_texts(row, scan)
        self.has_pii.append(found_any)
        return row

    def _observe(self, row: dict) -> None:
        """Duplicates and lengths, of the row as it is stored (after redaction)."""
        index = self.valid
        self.valid += 1
        text = row_text(row)
        self.unscanned.append(text)
        if len(self.unscanned) == ROWS_PER_BATCH:
            self.scan_duplicates()
        if 0 < self.limits.near_duplicate_max_rows <= index:
            self.near_stopped_at = self.near_stopped_at or index
        self.chars.append(len(text))
        if self.token_counter is not None:
            self.tokens.append(self.token_counter(row))

    def scan_duplicates(self) -> None:
        if self.unscanned:
            self.duplicates.add(self.unscanned)
            self.unscanned = []

    # -- verdict ---------------------------------------------------------------------------------

    def verdict(self, filename: str) -> list[str]:
        """Decide which rows the version keeps; raise Rejected by the policy, else return the
        warnings. Thresholds, stats and warnings are about the rows kept: duplicates removed
        at ingest no longer count against the version (the report still lists them)."""
        policy, q, warnings = self.options.policy, self.options.quality, []
        if self.valid == 0:
            if not self.errors:
                raise reject([f"{filename}: empty file: no rows"])
            raise reject(self.errors, self.invalid_rows, self.total_errors)
        if self.invalid_rows:
            fraction = self.invalid_rows / self.rows_read
            if fraction > policy.max_invalid_fraction:
                raise reject(self.errors, self.invalid_rows, self.total_errors)
            warnings.append(f"{self.invalid_rows} invalid row(s) dropped ({fraction:.2%} of "
                            f"{self.rows_read}, policy allows {policy.max_invalid_fraction:.2%}); "
                            f"first: {self.errors[0]}")
        (exact_rows, exact_firsts), near = self.duplicates.finish()
        none = (np.empty(0, np.int64),) * 2 + (np.empty(0),)
        near_rows, near_firsts, jaccard = near or none
        near_only = ~np.isin(near_rows, exact_rows)
        near_rows, near_firsts, jaccard = near_rows[near_only], near_firsts[near_only], jaccard[
            near_only]
        self.kept = np.ones(self.valid, dtype=bool)
        if q.remove_duplicates:
            self.kept[exact_rows] = False
        if q.remove_near_duplicates:  # exact duplicates are the near-duplicates at Jaccard 1
            self.kept[near_rows] = False
            self.kept[exact_rows] = False
        kept_count = int(self.kept.sum())
        self.counts = {
            "exact": int(self.kept[exact_rows].sum()),
            "near": int(self.kept[near_rows].sum()),
            "removed_exact": int((~self.kept[exact_rows]).sum()),
            "removed_near": int((~self.kept[near_rows]).sum()),
            "pii_rows": 0 if q.redact_pii else int(self.has_pii.view()[self.kept].sum()),
        }
        for row, first in zip(exact_rows[:MAX_FINDINGS_PER_KIND].tolist(),
                              exact_firsts[:MAX_FINDINGS_PER_KIND].tolist(), strict=True):
            self.finding("duplicate", row + 1, other_row=first + 1,
                         detail="removed" if not self.kept[row] else "")
        for row, first, j in zip(near_rows[:MAX_FINDINGS_PER_KIND].tolist(),
                                 near_firsts[:MAX_FINDINGS_PER_KIND].tolist(),
                                 jaccard[:MAX_FINDINGS_PER_KIND].tolist(), strict=True):
            removed = "; removed" if not self.kept[row] else ""
            self.finding("near_duplicate", row + 1, other_row=first + 1,
                         detail=f"estimated Jaccard {j:.2f}{removed}")
        checks = (
            ("exact duplicate", self.counts["exact"], policy.max_duplicate_fraction),
            ("with PII", self.counts["pii_rows"], policy.max_pii_fraction),
        )
        for what, count, limit in checks:
            if count / kept_count > limit:
                raise reject([f"{filename}: {count} of {kept_count} rows {what} "
                               f"({count / kept_count:.2%}) is above the policy's {limit:.2%}"])
        if self.counts["exact"]:
            warnings.append(f"{self.counts['exact']} exact duplicate row(s)")
        if self.counts["near"]:
            warnings.append(f"{self.counts['near']} near-duplicate row(s)")
        if self.near_stopped_at:
            warnings.append(f"near-duplicate scan covered the first {self.near_stopped_at} rows "
                            f"only (limit {self.limits.near_duplicate_max_rows})")
        if q.remove_near_duplicates and self.limits.near_duplicate_max_rows <= 0:
            warnings.append("near-duplicates were not removed: the near-duplicate scan is off "
                            "(LLMSTUDIO_DATASET_NEAR_DUPLICATE_MAX_ROWS=0)")
        if self.counts["pii_rows"]:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.pii_counts.items()))
            warnings.append(f"PII in {self.counts['pii_rows']} row(s): {kinds}")
        self.outliers, fences = self._length_outliers()
        if self.outliers and fences:
            warnings.append(f"{self.outliers} row(s) are length outliers ({fences.describe()})")
        self.truncated = 0
        if self.token_counter is not None and self.options.max_length:
            kept_tokens = self.tokens.view()[self.kept]
            self.truncated = int((kept_tokens > self.options.max_length).sum())
            if self.truncated:
                warnings.append(f"{self.truncated} row(s) are longer than max_length "
                                f"{self.options.max_length} tokens and would be truncated")
        return warnings

    def _length_outliers(self) -> tuple[int, Fences | None]:
        kept_rows = np.flatnonzero(self.kept)
        chars = self.chars.view()[kept_rows]
        fences = length_fences(chars)
        if fences is None:
            return 0, None
        outlying = fences.outside(chars)
        for position in outlying[:MAX_FINDINGS_PER_KIND].tolist():
            self.finding("outlier", int(kept_rows[position]) + 1,
                         detail=f"{int(chars[position])} characters")
        return len(outlying), fences


def _masked(value: str) -> str:
    """A finding's value as the report shows it: enough to locate it, not enough to leak it."""
    return value[:2] + "*" * max(len(value) - 4, 1) + value[-2:] if len(value) > 6 else "*" * 6


def length_stats(values: np.ndarray) -> dict[str, float | int]:
    if len(values) == 0:
        return {"count": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99], method="nearest")
    return {"count": int(len(values)), "min": int(values.min()), "max": int(values.max()),
            "mean": float(values.mean()), "p50": int(p50), "p95": int(p95), "p99": int(p99)}


# -- passes 2 and 3 -----------------------------------------------------------------------------


def split_unit(seed: int, row: str) -> float:
    """The row's position in [0, 1), from sha256(seed:row): test below the test fraction,
    validation in the next band, train above."""
    digest = hashlib.sha256(f"{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(units: np.ndarray, fractions: dict[str, float]) -> np.ndarray:
    """Split index per row (0 train, 1 validation, 2 test).

    Bands: test [0, t), validation [t, t + v), train [t + v, 1). A requested split left empty
    by the bands (train first) takes the row nearest to its band from the largest split (which
    keeps >= 1 row), so with enough rows every requested split is non-empty. A single row is
    training data.
    """
    t, v = fractions["test"], fractions["validation"]
    sides = np.zeros(len(units), dtype=np.int8)  # int8 throughout: a byte a row
    sides[units < t + v] = 1
    sides[units < t] = 2
    if len(units) == 1:
        return np.zeros(1, dtype=np.int8)
    bands = {0: (t + v, 1.0), 1: (t, t + v), 2: (0.0, t)}
    for side in (0, 1, 2):
        lo, hi = bands[side]
        if hi <= lo or (sides == side).any():
            continue
        counts = np.bincount(sides, minlength=3)
        donor = int(counts.argmax())
        if counts[donor] < 2:
            continue
        distance = np.where(units < lo, lo - units, units - hi)
        candidates = np.flatnonzero(sides == donor)
        sides[candidates[np.argmin(distance[candidates])]] = side
    return sides


def _write_version(scan: _Scan, options: Options, workdir: Path,
                   warnings: list[str]) -> Ingested:
    """Pass 2: the kept rows to rows.jsonl and, by their split scores, to the split files."""
    sides = assign_splits(scan.units.view()[scan.kept], options.fractions)
    wanted = [s for s in SPLITS if s != "test" or options.test_fraction > 0]
    rows_path = workdir / "rows.jsonl"
    digest = hashlib.sha256()
    split_paths = {s: workdir / f"{s}.jsonl" for s in wanted}
    split_digests = {s: hashlib.sha256() for s in wanted}
    handles = {s: p.open("wb") for s, p in split_paths.items()}
    try:
        with (workdir / "candidates.jsonl").open("rb") as src, rows_path.open("wb") as dst:
            kept_lines = (line for line, kept in zip(src, scan.kept, strict=True) if kept)
            for line, side in zip(kept_lines, sides.tolist(), strict=True):
                dst.write(line)
                digest.update(line)
                split = SPLITS[side]
                handles[split].write(line)
                split_digests[split].update(line)
    finally:
        for h in handles.values():
            h.close()
    (workdir / "candidates.jsonl").unlink()
    counts = {s: int((sides == i).sum()) for i, s in enumerate(SPLITS) if s in wanted}
    report = _report(scan, options, warnings, len(sides))
    return Ingested(
        format=scan.format, source_schema=scan.schema, source_format=scan.source_format,
        sha256=digest.hexdigest(), num_rows=len(sides), counts=counts, rows_path=rows_path,
        split_paths=split_paths,
        split_sha256={s: d.hexdigest() for s, d in split_digests.items()},
        status="accepted_with_warnings" if warnings else "accepted",
        warnings=warnings, report=report,
    )


def _report(scan: _Scan, options: Options, warnings: list[str], kept: int) -> dict[str, Any]:
    return {
        "status": "accepted_with_warnings" if warnings else "accepted",
        "warnings": warnings,
        "source": {"format": scan.source_format, "schema": scan.schema},
        "rows_read": scan.rows_read,
        "valid_rows": scan.valid,
        "rows": kept,
        "invalid_rows": scan.invalid_rows,
        "errors": scan.errors,
        "total_errors": scan.total_errors,
        # Rows of the version (after the quality options) with duplicates or PII ...
        "exact_duplicates": scan.counts["exact"],
        "near_duplicates": scan.counts["near"],
        "pii_rows": scan.counts["pii_rows"],
        # ... PII occurrences found in the source rows (none left when redacted) ...
        "pii_counts": {} if options.quality.redact_pii else dict(sorted(scan.pii_counts.items())),
        # ... and what the quality options took out of the source rows.
        "removed": {"exact_duplicates": scan.counts["removed_exact"],
                    "near_duplicates": scan.counts["removed_near"]},
        "redacted": dict(sorted(scan.redacted_counts.items())),
        "near_duplicate_scan_rows": scan.near_stopped_at or scan.valid,
        "length_outliers": scan.outliers,
        "chars": length_stats(scan.chars.view()[scan.kept]),
        "tokens": (length_stats(scan.tokens.view()[scan.kept]) if scan.token_counter
                   else {"count": 0}),
        "tokenizer": options.base_model if scan.token_counter else "",
        "max_length": options.max_length,
        "truncated_rows": scan.truncated,
        "quality": {"remove_duplicates": options.quality.remove_duplicates,
                    "remove_near_duplicates": options.quality.remove_near_duplicates,
                    "redact_pii": options.quality.redact_pii},
        "findings": [f for kind in sorted(scan.findings) for f in scan.findings[kind]],
    }


def report_json(report: dict[str, Any]) -> bytes:
    return json.dumps(report, indent=1, sort_keys=True).encode("utf-8")

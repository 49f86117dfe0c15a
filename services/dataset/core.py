"""Dataset domain rules, pure: names, normalized formats, which objective reads which format,
content addressing, rejections, version lineage.

The normalized formats (what the trainer reads; a version holds one):

    prompt_completion  {"prompt": str, "completion": str}                      (sft)
    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                       (>= 1 assistant message)                                (sft)
    text               {"text": str}                                           (pretrain)
    preference         {"prompt": str, "chosen": str, "rejected": str}         (dpo, orpo)

Input schemas (Alpaca, ShareGPT, OpenAI chat, ...) map onto these in `schemas.py`; file formats
are read in `formats/`; the streaming pipeline is `ingest.py`.

Rows are stored as canonical JSON (sorted keys, only the format's fields, no whitespace), so a
version's sha256 identifies its content, not its formatting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from llmstudio import names
from llmstudio.artifactkeys import tenant_key

PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
TEXT = "text"
PREFERENCE = "preference"
FORMATS = (PROMPT_COMPLETION, MESSAGES, TEXT, PREFERENCE)
DEFAULT_VALIDATION_FRACTION = 0.1
MAX_REPORTED_ERRORS = 20  # kept in the rejection event and the report
ERRORS_IN_MESSAGE = 3  # named in the gRPC status message


@dataclass(frozen=True)
class DatasetRecord:
    """One version of a dataset, immutable once stored. (tenant, name, version) is unique."""

    id: str
    tenant: str
    name: str
    sha256: str  # of its normalized rows: its content's identity
    format: str  # the normalized format (FORMATS)
    num_rows: int
    train_rows: int
    validation_rows: int
    artifacts: dict[str, str]  # "raw" | "rows" | "train" | "validation" | "test" | "report" -> key
    split_sha256: dict[str, str]  # split -> sha256 of its file
    validation_fraction: float
    seed: int
    created_at: str
    created_by: str
    test_rows: int = 0
    test_fraction: float = 0.0
    version: int = 1
    parent_id: str = ""  # "" for an upload
    transformation: str = "{}"  # JSON: how it was made
    status: str = "accepted"  # accepted | accepted_with_warnings
    warnings: list[str] = field(default_factory=list)
    source_schema: str = ""
    source_format: str = ""
    description: str = ""
    idempotency_key: str | None = None  # None when the caller sent none
    request_sha256: str = ""  # core.request_fingerprint of the request that made it


@dataclass(frozen=True)
class Rejection:
    """Why an upload was refused: the first errors and how many rows were bad in total."""

    errors: list[str]  # at most MAX_REPORTED_ERRORS
    invalid_lines: int
    total_errors: int

    def summary(self) -> str:
        shown = "; ".join(self.errors[:ERRORS_IN_MESSAGE])
        more = self.total_errors - min(len(self.errors), ERRORS_IN_MESSAGE)
        head = f"{self.invalid_lines} invalid row{'s' if self.invalid_lines != 1 else ''}; "
        if self.invalid_lines == 0:  # only upload-level errors (name, empty file, params)
            head = ""
        return head + shown + (f"; and {more} more" if more > 0 else "")


def name_error(name: str) -> str | None:
    """Names become artifact keys and event subjects: the platform's one rule (llmstudio.names:
    one subject token, no paths, no '.', no spaces)."""
    problem = names.name_error(name)
    return f"name: {problem}" if problem else None


# Which dataset formats each training objective reads (JobSpec.objective -> formats).
OBJECTIVE_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": (PROMPT_COMPLETION, MESSAGES),
    "pretrain": (TEXT,),
    "dpo": (PREFERENCE,),
    "orpo": (PREFERENCE,),
}


def objective_error(objective: str, fmt: str) -> str | None:
    """Why a job with `objective` cannot train on a dataset of format `fmt` (None if it can)."""
    wanted = OBJECTIVE_FORMATS.get(objective)
    if wanted is None or fmt in wanted:
        return None
    return (
        f"objective {objective} needs a dataset of format {' or '.join(wanted)}; "
        f"this dataset is {fmt or 'of unknown format'}"
    )


def canonical(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def rows_key(tenant: str, sha256: str) -> str:
    """Where a version's normalized rows live: content-addressed within the tenant's prefix,
    stored once per tenant (sharing across tenants would tell one what another uploaded)."""
    return tenant_key(tenant, "datasets", sha256, "rows.jsonl")


def raw_prefix(tenant: str) -> str:
    """Where the tenant's raw uploads live (content-addressed blobs)."""
    return tenant_key(tenant, "datasets", "raw")


def split_prefix(tenant: str, sha256: str, validation_fraction: float, seed: int,
                 test_fraction: float = 0.0) -> str:
    """Where a version's split files live. The split parameters are part of the key, so the same
    content split another way never overwrites files an existing version points at."""
    fraction = validation_fraction or DEFAULT_VALIDATION_FRACTION
    test = f"-test{test_fraction!r}" if test_fraction else ""
    return tenant_key(tenant, "datasets", sha256, f"seed{seed}-val{fraction!r}{test}")


def schema_of_format(fmt: str) -> str:
    """The input schema that reads a normalized format as is (for derived versions)."""
    return "openai_chat" if fmt == MESSAGES else fmt


def report_key(tenant: str, dataset_id: str) -> str:
    return tenant_key(tenant, "datasets", "reports", f"{dataset_id}.json")


def request_fingerprint(*parts: Any, content_sha256: str = "") -> str:
    """Identifies what a mutating request asks for, to refuse an idempotency key reused for a
    different request. Filenames only shape error messages, so callers leave them out."""
    head = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(head + b"\n" + content_sha256.encode()).hexdigest()


def transformation(op: str, **params: Any) -> str:
    """A version's recipe as stored with it (JSON, stable key order)."""
    return json.dumps({"op": op, **params}, sort_keys=True)

"""`llmstudio datasets ...`: push, import, derive, list, report, preview, show."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import CliError, add_command, add_group, connect, output


def _dataset_line(d) -> str:
    test = f" / test {d.test_rows}" if d.test_rows else ""
    status = "" if d.status in ("", "accepted") else f"  [{d.status}]"
    return (f"{d.id}  {d.name:<24} v{d.version:<3} {d.format:<18} rows={d.num_rows} "
            f"(train {d.train_rows} / validation {d.validation_rows}{test})  "
            f"sha256={d.sha256[:12]}{status}")


def _dataset_text(d) -> str:
    lines = [_dataset_line(d)]
    lines += [f"  warning: {w}" for w in d.warnings]
    if d.parent_id:
        lines.append(f"  derived from {d.parent_id}: {d.transformation}")
    return "\n".join(lines)


def _held_out_line(d, args) -> str:
    """Ingest holds out validation rows unless told not to: say how many, and how to change it."""
    if not d.validation_rows:
        return ""
    chosen = ("from --validation-fraction" if args.validation_fraction
              else "the default; --validation-fraction F changes it")
    return (f"\n  validation: {d.validation_rows} of {d.num_rows} rows held out for evaluation, "
            f"not trained on (fraction {d.validation_fraction:g}, {chosen})")


def _column_map(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise CliError(f"--map {pair!r}: expected FIELD=COLUMN, e.g. prompt=question")
        mapping[field] = column
    return mapping


def _ingest_options(args) -> dict:
    return {
        "validation_fraction": args.validation_fraction, "test_fraction": args.test_fraction,
        "seed": args.seed, "file_format": args.format or "", "schema": args.schema or "",
        "column_map": _column_map(args.map), "source_split": args.split or "",
        "max_invalid_fraction": args.max_invalid_fraction,
        "max_duplicate_fraction": args.max_duplicate_fraction,
        "max_pii_fraction": args.max_pii_fraction, "remove_duplicates": args.dedup,
        "remove_near_duplicates": args.near_dedup, "redact_pii": args.redact_pii,
        "base_model": args.base_model or "", "max_length": args.max_length,
        "description": args.description or "",
        "idempotency_key": args.idempotency_key or "",
    }


def cmd_push(args):
    from tqdm import tqdm

    from ..client import to_dict

    path = Path(args.file)
    if not path.exists():
        raise CliError(f"{path}: no such file or folder")
    with tqdm(total=0, unit="B", unit_scale=True, desc=f"uploading {path.name}",
              file=sys.stderr, disable=args.json or not sys.stderr.isatty()) as bar:
        def progress(sent: int, total: int) -> None:
            bar.total = total
            bar.update(sent - bar.n)
            if sent == total:
                bar.set_description(f"validating {path.name}")

        d = connect(args).datasets.push(path, name=args.name or "", on_progress=progress,
                                        **_ingest_options(args))
    output(args, to_dict(d), _dataset_text(d) + _held_out_line(d, args))


def cmd_import(args):
    from ..client import to_dict

    d = connect(args).datasets.import_uri(args.uri, name=args.name or "", **_ingest_options(args))
    output(args, to_dict(d), _dataset_text(d) + _held_out_line(d, args))


def cmd_derive(args):
    from ..client import to_dict

    d = connect(args).datasets.derive(
        args.id, name=args.name or "", remove_duplicates=args.dedup,
        remove_near_duplicates=args.near_dedup, redact_pii=args.redact_pii,
        resplit=args.resplit, validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction, seed=args.seed, description=args.description or "",
        idempotency_key=args.idempotency_key or "")
    output(args, to_dict(d), _dataset_text(d))


def cmd_list(args):
    from ..client import to_dict

    items = connect(args).datasets.list(args.name or "", limit=args.limit)
    output(args, [to_dict(d) for d in items], "\n".join(map(_dataset_line, items)) or "no datasets")


def cmd_show(args):
    from ..client import to_dict

    d = connect(args).datasets.get(args.id)
    output(args, to_dict(d), json.dumps(to_dict(d), indent=2))


def _report_text(r) -> str:
    def stats(s) -> str:
        return (f"min {s.min}  p50 {s.p50}  p95 {s.p95}  p99 {s.p99}  max {s.max}  "
                f"mean {s.mean:.1f}") if s.count else "-"

    lines = [
        f"dataset {r.dataset_id}: {r.status}",
        f"  rows read {r.rows_read}, invalid {r.invalid_rows} ({r.total_errors} errors)",
        f"  exact duplicates {r.exact_duplicates}, near-duplicates {r.near_duplicates}, "
        f"length outliers {r.length_outliers}",
        f"  PII rows {r.pii_rows}: " + (", ".join(f"{k} {v}" for k, v in sorted(
            r.pii_counts.items())) or "none"),
        f"  characters: {stats(r.chars)}",
    ]
    if r.removed_exact_duplicates or r.removed_near_duplicates:
        lines.append(f"  removed: {r.removed_exact_duplicates} exact and "
                     f"{r.removed_near_duplicates} near-duplicate rows")
    if r.redacted_counts:
        lines.append("  redacted: " + ", ".join(f"{k} {v}" for k, v in sorted(
            r.redacted_counts.items())))
    if r.tokenizer:
        lines.append(f"  tokens ({r.tokenizer}): {stats(r.tokens)}")
        if r.max_length:
            lines.append(f"  rows over max_length {r.max_length}: {r.truncated_rows}")
    lines += [f"  warning: {w}" for w in r.warnings]
    lines += [f"  error: {e}" for e in r.errors]
    lines += [f"  {f.kind} row {f.row}" + (f" (repeats row {f.other_row})" if f.other_row else "")
              + (f": {f.detail}" if f.detail else "") for f in r.findings]
    return "\n".join(lines)


def cmd_report(args):
    from ..client import to_dict

    r = connect(args).datasets.report(args.id)
    data = to_dict(r)
    data["report_json"] = json.loads(r.report_json)
    output(args, data, _report_text(r))


def cmd_preview(args):
    from ..client import to_dict

    p = connect(args).datasets.preview(args.id, args.base_model, split=args.split or "",
                                       offset=args.offset, limit=args.limit,
                                       max_length=args.max_length)
    text = [f"{p.split}: {p.split_rows} rows"]
    for row in p.rows:
        cut = ", truncated" if row.truncated else ""
        text += [f"--- row {row.index} ({row.num_tokens} tokens, {row.learned_tokens} learned"
                 f"{cut}) ---", row.rendered, "--- learned ---", row.learned]
    output(args, to_dict(p), "\n".join(text))


def _ingest_flags(sp, derive: bool = False) -> None:
    default = "the parent's name" if derive else "the file name"
    sp.add_argument("--name", help="dataset name; the same name again makes a new version "
                    f"(default: {default})")
    sp.add_argument("--validation-fraction", type=float, default=0.0,
                    help="rows held out for evaluation, not trained on (default 0.1)")
    sp.add_argument("--test-fraction", type=float, default=0.0, help="default 0: no test split")
    sp.add_argument("--seed", type=int, default=0, help="split seed")
    sp.add_argument("--dedup", action="store_true", help="drop exact duplicate rows")
    sp.add_argument("--near-dedup", action="store_true",
                    help="drop near-duplicate rows (MinHash LSH, Jaccard >= 0.8)")
    sp.add_argument("--redact-pii", action="store_true",
                    help="replace e-mails, phones, cards, IBANs, IPs, ids, secrets")
    sp.add_argument("--description")
    sp.add_argument("--idempotency-key", metavar="KEY",
                    help="a retry with the same key returns the version the first call made")
    if derive:
        sp.add_argument("--resplit", action="store_true",
                        help="split again with the fractions and seed given here")
        return
    sp.add_argument("--format", choices=["jsonl", "json", "csv", "parquet", "hf_disk"],
                    help="file format (default: detected)")
    sp.add_argument("--schema", choices=["prompt_completion", "alpaca", "sharegpt",
                                         "openai_chat", "preference", "text"],
                    help="row schema (default: detected)")
    sp.add_argument("--split", metavar="NAME",
                    help="a datasets folder with several splits: read only this one")
    sp.add_argument("--map", action="append", metavar="FIELD=COLUMN",
                    help="map a schema field to a column of the file (needs --schema)")
    sp.add_argument("--max-invalid-fraction", type=float,
                    help="drop invalid rows up to this fraction instead of rejecting "
                    "(default 0)")
    sp.add_argument("--max-duplicate-fraction", type=float,
                    help="reject above this fraction of exact duplicates (default 1)")
    sp.add_argument("--max-pii-fraction", type=float,
                    help="reject above this fraction of rows with PII (default 1)")
    sp.add_argument("--base-model", help="tokenizer for token-length stats (model dir)")
    sp.add_argument("--max-length", type=int, default=0,
                    help="with --base-model: count rows longer than this many tokens")


def register(sub) -> None:
    ds = add_group(sub, "datasets", "dataset versions")
    sp = add_command(ds, "push", cmd_push, "upload, validate and version a dataset file")
    sp.add_argument("file", help="JSONL, JSON, CSV, Parquet (optionally .gz/.bz2/.xz/.zst) or "
                    "a datasets save_to_disk folder; rows: prompt/completion, Alpaca, ShareGPT, "
                    "OpenAI chat messages, prompt/chosen/rejected (dpo/orpo) or text (pretrain)")
    _ingest_flags(sp)
    sp = add_command(ds, "import", cmd_import,
                     "version a file the service reads itself: s3://bucket/key or a server path")
    sp.add_argument("uri", help="s3://bucket/key (allowed buckets) or file:///path (allowed "
                    "roots)")
    _ingest_flags(sp)
    sp = add_command(ds, "derive", cmd_derive,
                     "a new version of a dataset: deduplicated, PII-redacted or re-split")
    sp.add_argument("id", help="the parent version")
    _ingest_flags(sp, derive=True)
    sp = add_command(ds, "list", cmd_list, "list dataset versions")
    sp.add_argument("--name", help="only this dataset's versions")
    sp.add_argument("--limit", type=int, default=0,
                    help="at most N versions (default: all, read page by page)")
    add_command(ds, "report", cmd_report,
                "stats and quality findings of a version").add_argument("id")
    sp = add_command(ds, "preview", cmd_preview,
                     "rows rendered exactly as the trainer sees them (chat template, learned part)")
    sp.add_argument("id")
    sp.add_argument("--base-model", required=True, help="model dir whose tokenizer renders rows")
    sp.add_argument("--split", choices=["train", "validation", "test"], default="train")
    sp.add_argument("--offset", type=int, default=0)
    sp.add_argument("--limit", type=int, default=5)
    sp.add_argument("--max-length", type=int, default=0, help="default 2048")
    add_command(ds, "show", cmd_show, "one dataset").add_argument("id")

"""`llmstudio models ...`: list, show, stage, promote, requests, approve, reject, alias, tag,
describe, compare, card, delete, download, export."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .common import CliError, add_command, add_group, connect, output


def _version_line(v) -> str:
    from ..client import stage_name

    m = v.metrics
    em = ""
    if "tuned_exact_match" in m:
        em = f" exact_match {m.get('base_exact_match', 0):.2f} -> {m['tuned_exact_match']:.2f}"
    return (f"{v.model_name}@{v.version}  {stage_name(v.stage):<11} job={v.lineage.job_id} "
            f"dataset_sha256={v.lineage.dataset_sha256[:12]}{em}")


def parse_model_ref(ref: str) -> tuple[str, int]:
    name, _, version = ref.partition("@")
    if not name:
        raise CliError(f"bad model reference {ref!r}: use NAME or NAME@VERSION")
    if version and not version.isdigit():
        raise CliError(f"bad version in {ref!r}: must be a number")
    return name, int(version or 0)


def parse_version_ref(ref: str) -> tuple[str, int, str]:
    """`NAME` | `NAME@VERSION` | `NAME@ALIAS` -> (name, version or 0, alias or "")."""
    name, _, which = ref.partition("@")
    if not name:
        raise CliError(f"bad model reference {ref!r}: use NAME, NAME@VERSION or NAME@ALIAS")
    if which.isdigit():
        return name, int(which), ""
    return name, 0, which


def _version_of(c, ref: str, what: str = "version"):
    """The version `ref` names (NAME@VERSION or NAME@ALIAS; NAME alone is refused)."""
    name, version, alias = parse_version_ref(ref)
    if not version and not alias:
        raise CliError(f"give the {what}: NAME@VERSION or NAME@ALIAS")
    return c.models.get_version(name, version, alias)


def cmd_alias(args):
    """Point ALIAS at NAME@VERSION, or (--delete) remove it."""
    from ..client import to_dict

    c = connect(args)
    name, version, alias = parse_version_ref(args.ref)
    if args.delete:
        model = c.models.delete_alias(name, args.alias)
        text = f"{name}@{args.alias} removed"
    else:
        if not version:
            version = _version_of(c, args.ref).version if alias else 0
        if not version:
            raise CliError("give the version the alias names: NAME@VERSION ALIAS")
        model = c.models.set_alias(name, args.alias, version)
        text = f"{name}@{args.alias} -> v{version}"
    aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(model.aliases.items())) or "none"
    output(args, to_dict(model), f"{text}\n  aliases: {aliases}")


def _parse_tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"bad tag {pair!r}: use KEY=VALUE")
        tags[key] = value
    return tags


def _tags_text(tags) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "no tags"


def cmd_tag(args):
    """Set KEY=VALUE tags (and --remove KEY) on a model, or on NAME@VERSION."""
    from ..client import to_dict

    c = connect(args)
    name, version, alias = parse_version_ref(args.ref)
    tags, remove = _parse_tags(args.tags), list(args.remove or [])
    if not tags and not remove:
        raise CliError("give KEY=VALUE tags to set, or --remove KEY")
    if version or alias:
        v = c.models.update_version(name, _version_of(c, args.ref).version, set_tags=tags,
                                    remove_tags=remove)
        output(args, to_dict(v), f"{name}@{v.version}  {_tags_text(v.tags)}")
    else:
        m = c.models.update(name, set_tags=tags, remove_tags=remove)
        output(args, to_dict(m), f"{name}  {_tags_text(m.tags)}")


def cmd_describe(args):
    """Set the description of a model, or of NAME@VERSION."""
    from ..client import to_dict

    c = connect(args)
    name, version, alias = parse_version_ref(args.ref)
    if version or alias:
        v = c.models.update_version(name, _version_of(c, args.ref).version,
                                    description=args.text)
        output(args, to_dict(v), f"{name}@{v.version}: {v.description}")
    else:
        m = c.models.update(name, description=args.text)
        output(args, to_dict(m), f"{name}: {m.description}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def comparison_text(c) -> str:
    """A VersionComparison as tables: metrics (a, b, b - a, intervals), hyperparameters that
    differ, training data."""
    a, b = f"v{c.a.version}", f"v{c.b.version}"
    rows = [("metric", a, b, "delta", f"{a} 95% CI", f"{b} 95% CI")]
    for m in c.metrics:
        def ci(field: str, m=m) -> str:
            if not m.HasField(field):
                return ""
            iv = getattr(m, field)
            return f"[{_fmt(iv.low)}, {_fmt(iv.high)}]"

        delta = _fmt(m.delta) if m.HasField("delta") else "-"
        if m.HasField("delta") and m.delta > 0:
            delta = "+" + delta
        rows.append((m.name, _fmt(m.a) if m.HasField("a") else "-",
                     _fmt(m.b) if m.HasField("b") else "-", delta, ci("a_interval"),
                     ci("b_interval")))
    lines = [f"{c.a.model_name}: {a} vs {b}", "", *_table(rows)]
    lines += ["", "hyperparameters that differ:"]
    if c.hyperparameters:
        lines += _table([("key", a, b)] + [(d.key, d.a or "-", d.b or "-")
                                           for d in c.hyperparameters])
    else:
        lines.append("  none")
    lines += ["", "training data:"]
    lines += _table([("field", a, b, "")] + [
        (d.key, d.a.strip('"') or "-", d.b.strip('"') or "-", "same" if d.same else "DIFFERS")
        for d in c.dataset])
    return "\n".join(lines)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def cmd_compare(args):
    from ..client import to_dict

    c = connect(args)
    va, vb = _version_of(c, args.a), _version_of(c, args.b)
    if va.model_name != vb.model_name:
        raise CliError("compare two versions of one model: NAME@A NAME@B")
    comparison = c.models.compare(va.model_name, va.version, vb.version)
    output(args, to_dict(comparison), comparison_text(comparison))


def cmd_card(args):
    from ..client import to_dict

    c = connect(args)
    name, version, alias = parse_version_ref(args.ref)
    if alias:
        version = _version_of(c, args.ref).version
    card = c.models.model_card(name, version)
    if args.out:
        Path(args.out).write_text(card.markdown)
    output(args, to_dict(card), card.markdown.rstrip("\n") if not args.out else
           f"{args.out} ({card.artifact_key or 'not stored'})")


def cmd_delete(args):
    from ..client import to_dict

    name, version = parse_model_ref(args.ref)
    if not version:
        raise CliError("give the version to delete: NAME@VERSION")
    v = connect(args).models.delete_version(name, version, args.reason)
    output(args, to_dict(v), f"{name}@{version} deleted (kept for the audit; hidden from lists)")


def cmd_list(args):
    from ..client import to_dict

    models = connect(args).models.list(limit=args.limit)
    lines = [_version_line(v) for m in models for v in m.versions]
    output(args, [to_dict(m) for m in models], "\n".join(lines) or "no models")


def cmd_show(args):
    from ..client import to_dict

    name, version, alias = parse_version_ref(args.ref)
    c = connect(args)
    msg = c.models.get_version(name, version, alias) if version or alias else c.models.get(name)
    output(args, to_dict(msg), json.dumps(to_dict(msg), indent=2))


def cmd_stage(args):
    from ..client import to_dict

    name, version = parse_model_ref(args.ref)
    if not version:
        raise CliError("give the version to move: NAME@VERSION")
    v = connect(args).models.set_stage(name, version, args.stage)
    output(args, to_dict(v), _version_line(v))


def request_line(r) -> str:
    """One line of a governance promotion request, with its unmet rules below it."""
    approvals = ", ".join(a.approver for a in r.approvals) or "none"
    lines = [f"{r.request_id}  {r.model_name}@{r.version} -> {r.stage:<10} {r.status:<16} "
             f"by {r.requester}  approvals: {approvals}  policy v{r.policy_version}"]
    lines += [f"    unmet: {v.message}" for v in r.verdicts if not v.ok]
    return "\n".join(lines)


def cmd_promote(args):
    """File a promotion request and show governance's first decision on it."""
    import time

    from ..client import to_dict

    name, version = parse_model_ref(args.ref)
    if not version:
        raise CliError("give the version to promote: NAME@VERSION")
    c = connect(args)
    record = c.models.request_promotion(name, version, args.stage, args.justification)
    deadline = time.monotonic() + args.wait
    while record.status == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
        record = c.models.promotion(record.request_id)
    text = f"{record.request_id}  {name}@{version} -> {args.stage}: {record.status}"
    text += "".join(f"\n    unmet: {u}" for u in record.unmet)
    if record.status == "pending_approval":
        text += f"\n  a reviewer approves it: llmstudio models approve {record.request_id}"
    output(args, to_dict(record), text)


def cmd_requests(args):
    from ..client import to_dict

    requests = connect(args).governance.promotion_requests(args.status or "", limit=args.limit)
    output(args, [to_dict(r) for r in requests],
           "\n".join(request_line(r) for r in requests) or "no promotion requests")


def cmd_approve(args):
    from ..client import to_dict

    r = connect(args).governance.approve(args.request_id, args.comment or "")
    output(args, to_dict(r), request_line(r))


def cmd_reject(args):
    from ..client import to_dict

    r = connect(args).governance.reject(args.request_id, args.reason)
    output(args, to_dict(r), request_line(r))


def cmd_export(args):
    """Download a version's checkpoint and export it: the adapter alone, or merged (--merged)."""
    import tempfile

    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise CliError(f"export needs the training extras ({e.name or e} is not installed): "
                       "pip install 'llm-studio[train]'") from None
    from ..ml.export import export_adapter, export_merged

    name, version = parse_model_ref(args.ref)
    c = connect(args)
    v = c.models.get_version(name, version)
    artifact = next((a for a in ("checkpoint", "adapter") if v.artifacts.get(a)), None)
    if artifact is None:
        raise CliError(f"{v.model_name}@{v.version} has no checkpoint or adapter artifact")
    key = v.artifacts[artifact]
    lineage = {"model_name": v.model_name, "model_version": v.version,
               "job_id": v.lineage.job_id, "dataset_id": v.lineage.dataset_id,
               "dataset_sha256": v.lineage.dataset_sha256, "artifact": key}
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="llmstudio-export-") as tmp:
        # through the registry (DownloadArtifact): no artifact store credentials needed here
        ckpt = c.models.download(v.model_name, v.version, Path(tmp) / "checkpoint",
                                 artifact=artifact)
        if args.merged:
            path = export_merged(ckpt, out, base_model=args.base_model, dtype=args.dtype,
                                 lineage=lineage)
        else:
            path = export_adapter(ckpt, out, lineage=lineage)
    kind = "merged" if args.merged else "adapter"
    output(args, {"path": str(path), "kind": kind, "model": v.model_name, "version": v.version,
                  "artifact": key}, str(path))


def cmd_download(args):
    """Download a version's checkpoint (or adapter) files through the registry."""
    name, version = parse_model_ref(args.ref)
    path = connect(args).models.download(name, version, args.out, artifact=args.artifact)
    output(args, {"path": str(path), "model": name, "version": version,
                  "artifact": args.artifact}, str(path))


def register(sub) -> None:
    ms = add_group(sub, "models", "model registry")
    add_command(ms, "list", cmd_list, "list models and versions").add_argument(
        "--limit", type=int, default=0, help="at most N models (default: all, read page by page)")
    add_command(ms, "show", cmd_show,
                "a model, or one version with NAME@VERSION or NAME@ALIAS").add_argument("ref")
    sp = add_command(ms, "stage", cmd_stage, "move a version to a stage")
    sp.add_argument("ref", help="NAME@VERSION")
    sp.add_argument("stage", choices=["development", "staging", "production", "archived"])
    sp = add_command(ms, "promote", cmd_promote, "request a promotion through the tenant's "
                     "policy (a reviewer approves it: models approve)")
    sp.add_argument("ref", help="NAME@VERSION")
    sp.add_argument("stage", choices=["staging", "production"])
    sp.add_argument("--justification", default="", help="why (shown to the reviewers)")
    sp.add_argument("--wait", type=float, default=10.0,
                    help="seconds to wait for governance's first decision (default 10)")
    sp = add_command(ms, "requests", cmd_requests, "promotion requests and their decisions")
    sp.add_argument("--status", choices=["pending_approval", "approved", "rejected", "expired"])
    sp.add_argument("--limit", type=int, default=0, help="default 1000")
    sp = add_command(ms, "approve", cmd_approve,
                     "approve a promotion request (a reviewer other than the requester)")
    sp.add_argument("request_id")
    sp.add_argument("--comment", default="")
    sp = add_command(ms, "reject", cmd_reject, "reject a promotion request")
    sp.add_argument("request_id")
    sp.add_argument("--reason", required=True)
    sp = add_command(ms, "alias", cmd_alias, "point an alias (champion, candidate, ...) at a "
                     "version, or remove it (--delete); deployments of NAME@ALIAS follow it")
    sp.add_argument("ref", help="NAME@VERSION (NAME with --delete)")
    sp.add_argument("alias")
    sp.add_argument("--delete", action="store_true", help="remove the alias")
    sp = add_command(ms, "tag", cmd_tag, "set KEY=VALUE tags on a model or a version")
    sp.add_argument("ref", help="NAME (the model) or NAME@VERSION")
    sp.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    sp.add_argument("--remove", action="append", metavar="KEY", help="remove a tag (repeatable)")
    sp = add_command(ms, "describe", cmd_describe, "set the description of a model or a version")
    sp.add_argument("ref", help="NAME (the model) or NAME@VERSION")
    sp.add_argument("text")
    sp = add_command(ms, "compare", cmd_compare, "two versions side by side: metric deltas, "
                     "intervals, differing hyperparameters, training data")
    sp.add_argument("a", help="NAME@VERSION or NAME@ALIAS")
    sp.add_argument("b", help="NAME@VERSION or NAME@ALIAS")
    sp = add_command(ms, "card", cmd_card, "a version's model card (Markdown)")
    sp.add_argument("ref", help="NAME@VERSION or NAME@ALIAS (NAME alone: the latest)")
    sp.add_argument("--out", help="write it to this file")
    sp = add_command(ms, "delete", cmd_delete, "delete a version (not in production, named by "
                     "no alias): hidden from lists, its record and audit kept")
    sp.add_argument("ref", help="NAME@VERSION")
    sp.add_argument("--reason", default="", help="kept in the audit log")
    sp = add_command(ms, "download", cmd_download,
                     "download a version's checkpoint (or --artifact adapter) files")
    sp.add_argument("ref", help="NAME@VERSION (NAME alone: the latest version)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--artifact", default="checkpoint", choices=["checkpoint", "adapter"])
    sp = add_command(ms, "export", cmd_export, "export a version: its adapter, or (--merged) a "
                     "plain transformers model with the adapter merged into the base")
    sp.add_argument("ref", help="NAME@VERSION (NAME alone: the latest version)")
    sp.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    sp.add_argument("--merged", action="store_true", help="merge the adapter into the base model")
    sp.add_argument("--base-model",
                    help="local base model dir (default: the one it was trained on)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights dtype of a merged export")

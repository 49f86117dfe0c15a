"""Registry domain logic, pure: versions built from finished jobs, evaluation metrics, and the
stage lifecycle of a model version.

Stage lifecycle (`ALLOWED_TRANSITIONS`)::

    development -> staging | archived
    staging     -> production | development | archived
    production  -> archived
    archived    -> development

A version reaches production only through staging (someone looked at it there first). Production
is left only by archiving: rolling back means promoting an older version again, which archives
the current one. An archived version can be revived, but only into development, so it has to
pass staging again before it can serve. At most one version of a model is in production:
promoting one archives the previous production version.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound
from llmstudio.events import EvalCompleted, JobCompleted
from llmstudio.names import name_error


class Stage(enum.StrEnum):
    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"
    ARCHIVED = "archived"


ALLOWED_TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.DEVELOPMENT: frozenset({Stage.STAGING, Stage.ARCHIVED}),
    Stage.STAGING: frozenset({Stage.PRODUCTION, Stage.DEVELOPMENT, Stage.ARCHIVED}),
    Stage.PRODUCTION: frozenset({Stage.ARCHIVED}),
    Stage.ARCHIVED: frozenset({Stage.DEVELOPMENT}),
}


@dataclass(frozen=True)
class ModelVersion:
    tenant: str
    model_name: str
    version: int
    stage: Stage
    job_id: str
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    aliases: tuple[str, ...] = ()  # the model's aliases naming this version (read, not stored)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    deleted_at: str = ""  # set: deleted (hidden from reads and lists; row kept)

    @property
    def ref(self) -> str:
        return ref(self.model_name, self.version)


@dataclass(frozen=True)
class Model:
    tenant: str
    name: str
    created_at: str
    versions: list[ModelVersion] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)  # alias -> version
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class StageChange:
    """One version moving from one stage to another, as a SetStage applies and announces it."""

    version: ModelVersion  # already in its new stage
    from_stage: Stage
    to_stage: Stage


@dataclass(frozen=True)
class StageRequest:
    """What a SetStage asks: kept under its idempotency key, so a retry is answered, not
    re-applied."""

    model_name: str
    version: int
    stage: Stage


def check_same_request(earlier: StageRequest, asked: StageRequest) -> None:
    """An idempotency key names one request: reusing it for another is refused."""
    if earlier != asked:
        raise InvalidArgument(
            "idempotency_key",
            f"already used to move {ref(earlier.model_name, earlier.version)} to {earlier.stage}",
        )


def ref(model_name: str, version: int) -> str:
    """`<model>-v<version>`: the entity id of model events (subject-token safe)."""
    return f"{model_name}-v{version}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def version_from_job(
    tenant: str, job: JobCompleted, version: int, trace_id: str, now: str
) -> ModelVersion:
    """The version a finished fine-tuning job registers, with its full lineage."""
    spec = job.spec
    method = spec.get("method")
    return ModelVersion(
        tenant=tenant,
        model_name=job.model_name,
        version=version,
        stage=Stage.DEVELOPMENT,
        job_id=job.job_id,
        lineage={
            "dataset_id": job.dataset_id,
            "dataset_sha256": job.dataset_sha256,
            "base_model": spec.get("base_model", ""),
            "job_id": job.job_id,
            "method": method or "",
            "hyperparameters": {
                "method": method,
                "lora": spec.get("lora"),
                **spec.get("hyperparameters", {}),
            },
            "trace_id": trace_id,
            "evaluation_id": "",
            # the dataset's report (PII found in its rows): evidence for promotion policies
            "dataset_report_key": job.dataset_artifacts.get("report", ""),
        },
        metrics={"final_loss": float(job.final_loss), "steps": float(job.steps)},
        artifacts={"checkpoint": job.checkpoint_key, "adapter": job.adapter_key},
        created_at=now,
        updated_at=now,
    )


def with_evaluation(v: ModelVersion, ev: EvalCompleted, now: str) -> ModelVersion:
    """`v` with an evaluation's base-vs-tuned metrics, its id and its report attached.

    Applying the same evaluation twice gives the same version (but for `updated_at`)."""
    metrics = dict(v.metrics)
    metrics.update({f"base_{k}": float(x) for k, x in ev.base_metrics.items()})
    metrics.update({f"tuned_{k}": float(x) for k, x in ev.tuned_metrics.items()})
    return replace(
        v,
        metrics=metrics,
        lineage={**v.lineage, "evaluation_id": ev.evaluation_id},
        artifacts={**v.artifacts, "eval_report": ev.report_key},
        updated_at=now,
    )


def check_transition(from_stage: Stage, to_stage: Stage) -> None:
    if to_stage not in ALLOWED_TRANSITIONS[from_stage]:
        allowed = ", ".join(sorted(ALLOWED_TRANSITIONS[from_stage]))
        raise FailedPrecondition(
            f"cannot move a version from {from_stage} to {to_stage} (from {from_stage}: {allowed})"
        )


def plan_stage_change(
    versions: list[ModelVersion], version: int, to_stage: Stage, now: str
) -> tuple[ModelVersion, list[StageChange]]:
    """Move `version` of a model (all of whose `versions` are given) to `to_stage`.

    Returns the version as it ends up and the changes to apply, in order: promoting to
    production first archives the model's current production version. Moving a version to
    the stage it is in changes nothing (an idempotent retry)."""
    by_number = {v.version: v for v in versions}
    target = by_number.get(version)
    if target is None:
        name = versions[0].model_name if versions else "?"
        raise NotFound(f"model {name} has no version {version}")
    if target.stage == to_stage:
        return target, []
    check_transition(target.stage, to_stage)
    changes = []
    if to_stage == Stage.PRODUCTION:
        changes += [
            StageChange(replace(v, stage=Stage.ARCHIVED, updated_at=now), v.stage, Stage.ARCHIVED)
            for v in versions
            if v.stage == Stage.PRODUCTION and v.version != version
        ]
    moved = replace(target, stage=to_stage, updated_at=now)
    changes.append(StageChange(moved, target.stage, to_stage))
    return moved, changes


# -- promotion requests ---------------------------------------------------------------------------

# The stages a tenant's policy gates while governance has announced none for it: those of
# governance's built-in default policy (staging: evaluated; production: staging first, tuned >=
# base, one approval). A tenant's PolicyChanged replaces them.
DEFAULT_GATED_STAGES: tuple[str, ...] = ("staging", "production")
# A request's status as the registry knows it: "pending" until governance decides, then
# governance's (pending_approval, rejected, approved, expired), "applied" once moved.
PENDING, PENDING_APPROVAL, APPROVED, APPLIED = "pending", "pending_approval", "approved", "applied"
OPEN = (PENDING, PENDING_APPROVAL)


@dataclass(frozen=True)
class Promotion:
    request_id: str
    tenant: str
    model_name: str
    version: int
    stage: Stage
    from_stage: Stage
    justification: str
    requester: str  # key id
    status: str
    unmet: tuple[str, ...] = ()
    policy_version: int = 0
    created_at: str = ""
    updated_at: str = ""

    @property
    def ref(self) -> str:
        return ref(self.model_name, self.version)


@dataclass(frozen=True)
class Evidence:
    """What a version's artifacts add to a request: the evaluation's suite and intervals, and
    the training dataset's PII report (read from the store before the transaction)."""

    evaluation_suites: tuple[str, ...] = ()
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)
    dataset_report: bool = False
    dataset_pii_rows: int = 0
    dataset_pii_counts: dict[str, int] = field(default_factory=dict)


def evidence_from_reports(eval_report: dict[str, Any] | None,
                          dataset_report: dict[str, Any] | None, evaluated: bool) -> Evidence:
    """The evidence two stored reports give (None: not readable). A job's own evaluation runs
    the default suite, so an evaluated version without a readable report has that one."""
    suites: tuple[str, ...] = ("default",) if evaluated else ()
    intervals: dict[str, dict[str, float]] = {}
    if eval_report is not None:
        suites = (str(eval_report.get("suite") or "default"),)
        for c in eval_report.get("comparisons", []) or []:
            try:
                intervals[str(c["name"])] = {"ci_low": float(c["ci_low"]),
                                             "ci_high": float(c["ci_high"])}
            except (KeyError, TypeError, ValueError):
                continue
    if dataset_report is None:
        return Evidence(suites, intervals)
    counts = {str(k): int(v) for k, v in (dataset_report.get("pii_counts") or {}).items()}
    return Evidence(suites, intervals, True, int(dataset_report.get("pii_rows") or 0), counts)


def check_promotable(versions: list[ModelVersion], version: int, to_stage: Stage) -> ModelVersion:
    """The version a request names, if the lifecycle lets it move to `to_stage`."""
    target = next((v for v in versions if v.version == version), None)
    if target is None:
        name = versions[0].model_name if versions else "?"
        raise NotFound(f"model {name} has no version {version}")
    if target.stage == to_stage:
        raise FailedPrecondition(f"{target.ref} is already in {to_stage}")
    check_transition(target.stage, to_stage)
    return target


def refusal(p: Promotion) -> str:
    """Why SetStage cannot move a version through request `p` (not approved)."""
    head = f"{p.ref} -> {p.stage} needs an approved promotion request; request {p.request_id} " \
        f"is {p.status}"
    if p.status == PENDING:
        return head + " (governance has not decided yet)"
    return head + (": unmet: " + "; ".join(p.unmet) if p.unmet else "")


# -- aliases --------------------------------------------------------------------------------------

def check_alias(alias: str) -> str:
    """An alias is a name (`llmstudio.names`: it appears in NAME@ALIAS and in subjects) that is
    neither a stage's name nor a number, so NAME@X is never ambiguous."""
    if why := name_error(alias):
        raise InvalidArgument("alias", f"alias {why}")
    if alias.isdigit():
        raise InvalidArgument("alias", f"{alias!r} is a number (NAME@{alias} names a version)")
    if alias in {s.value for s in Stage} or alias == "latest":
        raise InvalidArgument("alias", f"{alias!r} is reserved (a stage, or the latest version)")
    return alias


def with_aliases(versions: list[ModelVersion], aliases: dict[str, int]) -> list[ModelVersion]:
    """`versions`, each with the aliases that name it (sorted)."""
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(number, []).append(alias)
    return [replace(v, aliases=tuple(sorted(by_version.get(v.version, ())))) for v in versions]


# -- tags and descriptions ------------------------------------------------------------------------

TAG_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
MAX_TAG_VALUE, MAX_TAGS, MAX_DESCRIPTION = 256, 50, 4000


def updated_tags(tags: dict[str, str], set_tags: dict[str, str],
                 remove: list[str]) -> dict[str, str]:
    """`tags` with `set_tags` set and `remove` removed (a key in both: refused)."""
    if both := sorted(set(set_tags) & set(remove)):
        raise InvalidArgument("remove_tags", f"{', '.join(both)} also set")
    for key, value in set_tags.items():
        if not TAG_KEY.fullmatch(key):
            raise InvalidArgument("set_tags", f"tag key {key!r} must match {TAG_KEY.pattern}")
        if len(value) > MAX_TAG_VALUE:
            raise InvalidArgument("set_tags", f"tag {key}: at most {MAX_TAG_VALUE} characters")
    out = {k: v for k, v in tags.items() if k not in remove}
    out.update(set_tags)
    if len(out) > MAX_TAGS:
        raise InvalidArgument("set_tags", f"at most {MAX_TAGS} tags")
    return dict(sorted(out.items()))


def check_description(description: str | None) -> str | None:
    if description is not None and len(description) > MAX_DESCRIPTION:
        raise InvalidArgument("description", f"at most {MAX_DESCRIPTION} characters")
    return description


# -- CompareVersions ------------------------------------------------------------------------------

_MISSING = object()
DATASET_FIELDS = ("dataset_id", "dataset_sha256", "base_model", "method")


@dataclass(frozen=True)
class MetricDelta:
    name: str
    a: float | None
    b: float | None
    delta: float | None  # b - a, when both have it
    a_interval: tuple[float, float] | None = None  # the evaluation's 95% interval of tuned - base
    b_interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class ValueDiff:
    key: str
    a: Any  # _MISSING: the version has none (`has_a`)
    b: Any

    @property
    def same(self) -> bool:
        return self.a == self.b

    @property
    def has_a(self) -> bool:
        return self.a is not _MISSING

    @property
    def has_b(self) -> bool:
        return self.b is not _MISSING


@dataclass(frozen=True)
class Comparison:
    a: ModelVersion
    b: ModelVersion
    metrics: list[MetricDelta]
    hyperparameters: list[ValueDiff]  # only those that differ
    dataset: list[ValueDiff]  # every DATASET_FIELDS field


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"lora": {"r": 8}} -> {"lora.r": 8}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _interval(intervals: dict[str, dict[str, float]], metric: str) -> tuple[float, float] | None:
    if not metric.startswith("tuned_"):
        return None
    ci = intervals.get(metric.removeprefix("tuned_"))
    return (ci["ci_low"], ci["ci_high"]) if ci else None


def compare_versions(a: ModelVersion, b: ModelVersion,
                     a_intervals: dict[str, dict[str, float]] | None = None,
                     b_intervals: dict[str, dict[str, float]] | None = None) -> Comparison:
    """`a` and `b` side by side (intervals: each version's evaluation's, by metric name)."""
    metrics = []
    for name in sorted(set(a.metrics) | set(b.metrics)):
        x, y = a.metrics.get(name), b.metrics.get(name)
        metrics.append(MetricDelta(
            name, x, y, None if x is None or y is None else y - x,
            _interval(a_intervals or {}, name), _interval(b_intervals or {}, name)))
    hp_a = flatten(a.lineage.get("hyperparameters") or {})
    hp_b = flatten(b.lineage.get("hyperparameters") or {})
    hyperparameters = [d for d in (ValueDiff(k, hp_a.get(k, _MISSING), hp_b.get(k, _MISSING))
                                   for k in sorted(set(hp_a) | set(hp_b))) if not d.same]
    dataset = [ValueDiff(k, a.lineage.get(k, ""), b.lineage.get(k, "")) for k in DATASET_FIELDS]
    return Comparison(a, b, metrics, hyperparameters, dataset)


# -- model cards ----------------------------------------------------------------------------------

MODEL_CARD = "MODEL_CARD.md"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text.replace("|", "\\|").replace("\n", " ")


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else _cell(x)


def model_card(mv: ModelVersion, model_description: str = "",
               dataset_report: dict[str, Any] | None = None,
               eval_report: dict[str, Any] | None = None) -> str:
    """A version's model card, Markdown: what it is (description, stage, aliases, tags), its
    lineage and hyperparameters, its training dataset's report summary (None: not readable)
    and its evaluation (the metrics, and the report's comparisons with their intervals).
    Deterministic: the same facts give the same bytes."""
    lin = mv.lineage
    lines = ["---", "library_name: peft" if lin.get("method") != "full"
             else "library_name: transformers",
             f"base_model: {json.dumps(lin.get('base_model') or 'unknown')}",
             "tags:", "  - llm-studio", f"  - {lin.get('method') or 'fine-tuned'}",
             *(f"  - {json.dumps(f'{k}={v}')}" for k, v in sorted(mv.tags.items())), "---", "",
             f"# {mv.model_name} v{mv.version}", ""]
    for text in (model_description, mv.description):
        if text:
            lines += [text, ""]
    facts = [("stage", mv.stage.value), ("aliases", ", ".join(mv.aliases)),
             ("registered", mv.created_at), ("base model", lin.get("base_model")),
             ("method", lin.get("method")), ("job", lin.get("job_id") or mv.job_id),
             ("dataset", lin.get("dataset_id")), ("dataset sha256", lin.get("dataset_sha256")),
             ("evaluation", lin.get("evaluation_id")), ("trace", lin.get("trace_id"))]
    lines += ["## Lineage", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in facts if v not in (None, "")]
    hp = flatten(lin.get("hyperparameters") or {})
    lines += ["", "## Hyperparameters", ""]
    if hp:
        lines += ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in sorted(hp.items()))]
    else:
        lines.append("None recorded.")
    lines += ["", "## Training data", ""]
    if dataset_report is None:
        lines.append("The dataset's report is not readable here.")
    else:
        keys = ("status", "rows_read", "invalid_rows", "exact_duplicates", "near_duplicates",
                "pii_rows", "length_outliers", "truncated_rows")
        rows = [(k.replace("_", " "), dataset_report[k]) for k in keys if k in dataset_report]
        counts = dataset_report.get("pii_counts") or {}
        if counts:
            rows.append(("pii by kind", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
        lines += ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)]
        if dataset_report.get("pii_rows"):
            lines += ["", f"**{dataset_report['pii_rows']} training row(s) hold unredacted PII.**"]
    lines += ["", "## Evaluation", ""]
    if mv.metrics:
        lines += ["| metric | value |", "|---|---|",
                  *(f"| {k} | {_num(v)} |" for k, v in sorted(mv.metrics.items()))]
    comparisons = (eval_report or {}).get("comparisons") or []
    if comparisons:
        suite = (eval_report or {}).get("suite") or "default"
        lines += ["", f"Base vs tuned (suite {suite}; 95% bootstrap interval of tuned - base):",
                  "", "| metric | base | tuned | tuned - base | 95% interval |",
                  "|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {_cell(c.get('name', ''))} | {_num(c.get('base'))} | "
                         f"{_num(c.get('tuned'))} | {_num(c.get('diff'))} | "
                         f"[{_num(c.get('ci_low'))}, {_num(c.get('ci_high'))}] |")
    if not mv.metrics and not comparisons:
        lines.append("Not evaluated yet.")
    return "\n".join(lines) + "\n"


# -- DeleteVersion --------------------------------------------------------------------------------

def check_deletable(v: ModelVersion, aliases: dict[str, int]) -> None:
    """A version may be deleted unless it serves production or an alias names it."""
    if v.stage == Stage.PRODUCTION:
        raise FailedPrecondition(f"{v.ref} is in production: promote another version (which "
                                 "archives it) before deleting it")
    named = sorted(a for a, number in aliases.items() if number == v.version)
    if named:
        raise FailedPrecondition(f"{v.ref} is named by alias(es) {', '.join(named)}: move or "
                                 "delete them first")

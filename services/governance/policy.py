"""Promotion policies, pure: a tenant's YAML policy parsed into rules per gated stage, and the
decision on a promotion request (every rule's verdict, then a status).

A policy names, for each stage it gates (staging, production), the rules a version must pass to
be promoted there; a stage it does not name is not gated. Each rule is one item, a mapping of
one rule kind to its options::

    stages:
      staging:
        - evaluated: {}
      production:
        - from_stage: {stage: staging}
        - metric: {name: exact_match, compare: base}             # tuned >= base
        - metric: {name: exact_match, compare: production}       # >= the production version
        - metric: {name: exact_match, min: 0.9, lower_bound: true}
        - metric: {name: perplexity, max: 5.0}
        - suites: {required: [default]}
        - pii_clean: {}
        - approvals: {count: 1, role: reviewer}

`RULES` is the registry of rule kinds: one class each, parsed from its options and checked
against the request's facts (what `model.promotion_requested` carried, and the approvals),
giving a `Verdict` whose message names the threshold and the measured value. Failing any rule
but `approvals` rejects the request; with only approvals missing it waits for them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from llmstudio.errors import InvalidArgument

GATEABLE_STAGES = ("staging", "production")
PENDING_APPROVAL, REJECTED, APPROVED, EXPIRED = "pending_approval", "rejected", "approved", \
    "expired"
OPEN_STATUSES = (PENDING_APPROVAL,)
# Metrics where lower is better; every other metric is better higher.
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity", "loss", "final_loss"})
PRIMARY = "primary"  # exact_match when the evaluation measured it, else eval_loss
MAX_POLICY_BYTES = 64 * 1024

DEFAULT_POLICY_YAML = """\
# The built-in policy, in force while a tenant has set none.
stages:
  staging:
    - evaluated: {}
  production:
    - from_stage: {stage: staging}
    - evaluated: {}
    - metric: {name: primary, compare: base}
    - approvals: {count: 1, role: reviewer}
"""


@dataclass(frozen=True)
class Approval:
    approver: str  # key id
    roles: tuple[str, ...]
    time: str = ""
    comment: str = ""


@dataclass(frozen=True)
class Facts:
    """What a rule is checked against: the request's event data (`model.promotion_requested`)
    and the approvals given so far."""

    data: Mapping[str, Any]
    approvals: tuple[Approval, ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    @property
    def ref(self) -> str:
        return f"{self.get('model_name', '?')}@{self.get('version', '?')}"


@dataclass(frozen=True)
class Verdict:
    rule: str
    ok: bool
    message: str
    pending: bool = False  # failing only for want of approvals: the request waits

    def as_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "ok": self.ok, "message": self.message}


class Rule:
    KIND: ClassVar[str]

    @classmethod
    def parse(cls, options: Mapping[str, Any], where: str) -> Rule:
        raise NotImplementedError

    def check(self, facts: Facts) -> Verdict:
        raise NotImplementedError


RULES: dict[str, type[Rule]] = {}


def rule(cls: type[Rule]) -> type[Rule]:
    RULES[cls.KIND] = cls
    return cls


def _options(options: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise InvalidArgument(
            "policy", f"{where}: unknown option(s) {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(allowed)) or 'none'})")


def _number(options: Mapping[str, Any], key: str, where: str) -> float | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument("policy", f"{where}: {key} must be a number, not {value!r}")
    return float(value)


@rule
@dataclass(frozen=True)
class FromStage(Rule):
    KIND: ClassVar[str] = "from_stage"
    stage: str

    @classmethod
    def parse(cls, options, where):
        _options(options, where, {"stage"})
        stage = options.get("stage")
        if stage not in ("development", "staging", "production", "archived"):
            raise InvalidArgument("policy", f"{where}: stage must be a stage, not {stage!r}")
        return cls(stage)

    def check(self, facts):
        current = facts.get("from_stage", "")
        ok = current == self.stage
        return Verdict(self.KIND, ok, f"from_stage: must be in {self.stage}; {facts.ref} is in "
                       f"{current or 'no stage'}")


@rule
@dataclass(frozen=True)
class Evaluated(Rule):
    KIND: ClassVar[str] = "evaluated"

    @classmethod
    def parse(cls, options, where):
        _options(options, where, set())
        return cls()

    def check(self, facts):
        evaluation = facts.get("evaluation_id", "")
        if evaluation:
            return Verdict(self.KIND, True, f"evaluated: {facts.ref} has evaluation {evaluation}")
        return Verdict(self.KIND, False, f"evaluated: {facts.ref} has no evaluation yet")


@rule
@dataclass(frozen=True)
class Metric(Rule):
    """A threshold on one metric of the tuned model: absolute (`min` / `max`), or relative to the
    base model (`compare: base`) or to the model's current production version
    (`compare: production`), better by at least `margin`. `lower_bound`: judge by the
    pessimistic end of the evaluation's 95% interval of tuned - base where it gives one."""

    KIND: ClassVar[str] = "metric"
    name: str
    min: float | None = None
    max: float | None = None
    compare: str = ""
    margin: float = 0.0
    lower_bound: bool = False

    @classmethod
    def parse(cls, options, where):
        _options(options, where, {"name", "min", "max", "compare", "margin", "lower_bound"})
        name = options.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("policy", f"{where}: name (the metric) is required")
        compare = options.get("compare", "") or ""
        if compare not in ("", "base", "production"):
            raise InvalidArgument(
                "policy", f"{where}: compare must be base or production, not {compare!r}")
        low, high = _number(options, "min", where), _number(options, "max", where)
        if not compare and low is None and high is None:
            raise InvalidArgument("policy", f"{where}: give min, max or compare")
        lower_bound = options.get("lower_bound", False)
        if not isinstance(lower_bound, bool):
            raise InvalidArgument("policy", f"{where}: lower_bound must be true or false")
        return cls(name.removeprefix("tuned_"), low, high, compare,
                   _number(options, "margin", where) or 0.0, lower_bound)

    def check(self, facts):
        metrics = facts.get("metrics", {}) or {}
        name = self.name
        if name == PRIMARY:
            name = "exact_match" if "tuned_exact_match" in metrics else "eval_loss"
        lower_better = name in LOWER_IS_BETTER
        tuned = metrics.get(f"tuned_{name}", metrics.get(name))
        label = f"metric {name}"
        if tuned is None:
            return Verdict(self.KIND, False, f"{label}: not measured for {facts.ref}")
        measured, how = float(tuned), "tuned"
        interval = (facts.get("intervals", {}) or {}).get(name)
        base = metrics.get(f"base_{name}")
        if self.lower_bound and interval and base is not None:
            # the pessimistic end of tuned: base + the interval's worse end of tuned - base
            end = interval["ci_high"] if lower_better else interval["ci_low"]
            measured, how = float(base) + float(end), "tuned (95% interval's pessimistic end)"
        if self.compare:
            if self.compare == "base":
                reference, what = base, "base"
            else:
                reference = (facts.get("production_metrics", {}) or {}).get(f"tuned_{name}")
                what = f"production v{facts.get('production_version', 0)}"
                if not facts.get("production_version"):
                    return Verdict(self.KIND, True,
                                   f"{label}: no version in production to compare with")
            if reference is None:
                return Verdict(self.KIND, False, f"{label}: {what} value not measured")
            threshold = float(reference) - self.margin if lower_better else \
                float(reference) + self.margin
            ok = measured <= threshold if lower_better else measured >= threshold
            sign = "<=" if lower_better else ">="
            return Verdict(self.KIND, ok, f"{label}: {how} {measured:.4g} must be {sign} "
                           f"{what} {float(reference):.4g}"
                           + (f" {'-' if lower_better else '+'} {self.margin:g}"
                              if self.margin else "")
                           + f" (threshold {threshold:.4g})")
        problems, parts = [], []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
            if measured < self.min:
                problems.append(f"below the minimum {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
            if measured > self.max:
                problems.append(f"above the maximum {self.max:g}")
        return Verdict(self.KIND, not problems,
                       f"{label}: {how} {measured:.4g} must be {' and '.join(parts)}"
                       + (f" ({'; '.join(problems)})" if problems else ""))


@rule
@dataclass(frozen=True)
class Suites(Rule):
    KIND: ClassVar[str] = "suites"
    required: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, options, where):
        _options(options, where, {"required"})
        required = options.get("required")
        if not isinstance(required, list) or not required or \
                not all(isinstance(s, str) and s for s in required):
            raise InvalidArgument("policy", f"{where}: required must be a list of suite names")
        return cls(tuple(required))

    def check(self, facts):
        have = set(facts.get("evaluation_suites", []) or [])
        missing = [s for s in self.required if s not in have]
        if missing:
            return Verdict(self.KIND, False, f"suites: {facts.ref} lacks an evaluation of suite(s) "
                           f"{', '.join(missing)} (evaluated: {', '.join(sorted(have)) or 'none'})")
        return Verdict(self.KIND, True, f"suites: evaluated on {', '.join(self.required)}")


@rule
@dataclass(frozen=True)
class PiiClean(Rule):
    KIND: ClassVar[str] = "pii_clean"

    @classmethod
    def parse(cls, options, where):
        _options(options, where, set())
        return cls()

    def check(self, facts):
        dataset = facts.get("dataset_id", "") or "?"
        sha = (facts.get("dataset_sha256", "") or "")[:12]
        named = f"dataset {dataset}" + (f" (sha256 {sha})" if sha else "")
        if not facts.get("dataset_report"):
            return Verdict(self.KIND, False,
                           f"pii_clean: {named} has no report: its PII status is unknown")
        rows = int(facts.get("dataset_pii_rows", 0) or 0)
        if rows:
            counts = facts.get("dataset_pii_counts", {}) or {}
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            return Verdict(self.KIND, False, f"pii_clean: PII found in {named}: {rows} row(s)"
                           + (f" ({kinds})" if kinds else "") + "; redact it and retrain")
        return Verdict(self.KIND, True, f"pii_clean: no unredacted PII in {named}")


@rule
@dataclass(frozen=True)
class Approvals(Rule):
    """`count` approvals by keys with `role` (an admin's count too), none by the requester."""

    KIND: ClassVar[str] = "approvals"
    count: int = 1
    role: str = "reviewer"

    @classmethod
    def parse(cls, options, where):
        _options(options, where, {"count", "role"})
        count = options.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArgument("policy", f"{where}: count must be an integer >= 0")
        role = options.get("role", "reviewer")
        if role not in ("reviewer", "admin"):
            raise InvalidArgument("policy", f"{where}: role must be reviewer or admin")
        return cls(count, role)

    def may_approve(self, roles: tuple[str, ...]) -> bool:
        return self.role in roles or "admin" in roles

    def check(self, facts):
        requester = facts.get("requester", "")
        given = sorted({a.approver for a in facts.approvals
                        if a.approver != requester and self.may_approve(a.roles)})
        ok = len(given) >= self.count
        msg = (f"approvals: {len(given)} of {self.count} approval(s) by a {self.role} other than "
               f"the requester")
        if not ok:
            msg += f": missing {self.count - len(given)}"
        return Verdict(self.KIND, ok, msg, pending=not ok)


@dataclass(frozen=True)
class Policy:
    version: int  # 0: the built-in default
    yaml: str
    stages: Mapping[str, tuple[Rule, ...]]
    author: str = ""
    created_at: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.yaml.encode("utf-8")).hexdigest()

    @property
    def gated_stages(self) -> list[str]:
        return [s for s in GATEABLE_STAGES if self.stages.get(s)]

    def approvals_rule(self, stage: str) -> Approvals | None:
        return next((r for r in self.stages.get(stage, ()) if isinstance(r, Approvals)), None)


def parse_policy(text: str, version: int = 0, author: str = "", created_at: str = "") -> Policy:
    """The policy a YAML text states; InvalidArgument naming what is wrong and where."""
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise InvalidArgument("policy", f"larger than {MAX_POLICY_BYTES} bytes")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument("policy", f"not valid YAML: {e}") from None
    if not isinstance(doc, dict) or set(doc) - {"stages"}:
        raise InvalidArgument("policy", "must be a mapping with one key, stages")
    stages_doc = doc.get("stages") or {}
    if not isinstance(stages_doc, dict):
        raise InvalidArgument("policy", "stages must map a stage to its list of rules")
    stages: dict[str, tuple[Rule, ...]] = {}
    for stage, items in stages_doc.items():
        if stage not in GATEABLE_STAGES:
            raise InvalidArgument("policy", f"stages.{stage}: only "
                                  f"{' and '.join(GATEABLE_STAGES)} can be gated")
        if not isinstance(items, list):
            raise InvalidArgument("policy", f"stages.{stage} must be a list of rules")
        rules = []
        for i, item in enumerate(items):
            where = f"stages.{stage}[{i}]"
            if not isinstance(item, dict) or len(item) != 1:
                raise InvalidArgument("policy", f"{where}: a rule is one mapping "
                                      f"{{kind: options}}; kinds: {', '.join(sorted(RULES))}")
            [(kind, options)] = item.items()
            if kind not in RULES:
                raise InvalidArgument("policy", f"{where}: unknown rule {kind!r} "
                                      f"(kinds: {', '.join(sorted(RULES))})")
            if options is None:
                options = {}
            if not isinstance(options, dict):
                raise InvalidArgument("policy", f"{where}.{kind}: options must be a mapping")
            rules.append(RULES[kind].parse(options, f"{where}.{kind}"))
        if sum(isinstance(r, Approvals) for r in rules) > 1:
            raise InvalidArgument("policy", f"stages.{stage}: at most one approvals rule")
        stages[stage] = tuple(rules)
    return Policy(version, text, stages, author, created_at)


DEFAULT_POLICY = parse_policy(DEFAULT_POLICY_YAML)


@dataclass(frozen=True)
class Decision:
    status: str
    verdicts: tuple[Verdict, ...]

    @property
    def unmet(self) -> list[str]:
        return [v.message for v in self.verdicts if not v.ok]


def decide(policy: Policy, stage: str, facts: Facts) -> Decision:
    """Every rule of `stage` checked against `facts`: rejected when one fails, pending_approval
    when only approvals are missing, else approved."""
    verdicts = tuple(r.check(facts) for r in policy.stages.get(stage, ()))
    if any(not v.ok and not v.pending for v in verdicts):
        return Decision(REJECTED, verdicts)
    if any(not v.ok for v in verdicts):
        return Decision(PENDING_APPROVAL, verdicts)
    return Decision(APPROVED, verdicts)


def may_approve(policy: Policy, stage: str, roles: tuple[str, ...]) -> bool:
    """May a key of `roles` approve a request for `stage` under `policy`?"""
    approvals = policy.approvals_rule(stage)
    if approvals is None:
        return "admin" in roles or "reviewer" in roles
    return approvals.may_approve(roles)


def policy_id(tenant: str, version: int) -> str:
    """A subject-safe id of a tenant's policy version (tenant names may hold dots)."""
    return hashlib.sha256(f"{tenant}\n{version}".encode()).hexdigest()[:20]


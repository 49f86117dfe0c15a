"""`llmstudio lineage NAME@VERSION`: where a model version came from and what happened to it,
from governance's audit log: a tree (dataset versions -> job -> attempts -> checkpoints ->
evaluations -> version -> promotion requests, approvals, stage changes), `--json` the graph,
`--prov` the same graph as W3C PROV-JSON."""

from __future__ import annotations

import json

from .common import CliError, add_command, connect, output

# The attributes a tree line shows for each kind of node (hashes are always shown).
SHOWN = {
    "dataset": ("registered",),
    "job": ("method", "base_model", "status"),
    "attempt": ("worker_id", "status", "resumed_from_step", "reason"),
    "checkpoint": ("step", "final"),
    "evaluation": ("status", "tuned_metrics", "base_metrics", "reason"),
    "promotion_request": ("status", "requester", "justification"),
    "approval": ("role", "comment"),
    "rejection": ("reason",),
    "refusal": ("reason",),
    "stage_change": ("request_id",),
}


def parse_version_ref(ref: str) -> tuple[str, int]:
    name, at, version = ref.rpartition("@")
    if not at or not name or not version.isdigit() or int(version) < 1:
        raise CliError(f"model {ref!r}: expected NAME@VERSION (a version number, e.g. tiny@2)")
    return name, int(version)


def _short(value: str) -> str:
    is_hash = len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return value[:12] if is_hash else value


def _line(node) -> str:
    parts = [f"{node.kind} {node.label}"]
    parts += [f"{k} {_short(v)}" for k, v in sorted(node.hashes.items())]
    parts += [f"{k}={node.attributes[k]}" for k in SHOWN.get(node.kind, ())
              if node.attributes.get(k)]
    if node.time:
        parts.append(node.time)
    if node.actors:
        parts.append("by " + ", ".join(node.actors))
    if node.trace_ids:
        more = f" +{len(node.trace_ids) - 1}" if len(node.trace_ids) > 1 else ""
        parts.append(f"trace {node.trace_ids[0]}{more}")
    return "  ".join(parts)


def render_tree(graph) -> str:
    """The graph (a governance_pb2.LineageGraph) as an indented tree, upstream first: each
    node under the one it came from (the edge's relation before it); a node reached again is
    named, not repeated."""
    order = {n.id: i for i, n in enumerate(graph.nodes)}
    nodes = {n.id: n for n in graph.nodes}
    children: dict[str, list[tuple[str, str]]] = {}
    has_parent = set()
    for e in graph.edges:
        children.setdefault(e.source, []).append((e.target, e.relation))
        has_parent.add(e.target)
    for kids in children.values():
        kids.sort(key=lambda kid: order.get(kid[0], len(order)))
    lines = [f"lineage of {graph.model_name}@{graph.version} (tenant {graph.tenant})"]
    shown: set[str] = set()

    def walk(node_id: str, relation: str, prefix: str, last: bool, top: bool) -> None:
        node = nodes[node_id]
        branch = "" if top else ("└─ " if last else "├─ ")
        label = f"{relation}: " if relation else ""
        if node_id in shown:
            lines.append(f"{prefix}{branch}{label}{node.kind} {node.label} (above)")
            return
        shown.add(node_id)
        lines.append(f"{prefix}{branch}{label}{_line(node)}")
        inner = prefix if top else prefix + ("   " if last else "│  ")
        kids = children.get(node_id, [])
        for i, (kid, rel) in enumerate(kids):
            walk(kid, rel, inner, i == len(kids) - 1, False)

    for n in graph.nodes:
        if n.id not in has_parent and n.id not in shown:
            walk(n.id, "", "", True, True)
    for n in graph.nodes:  # anything on a cycle (none expected)
        if n.id not in shown:
            walk(n.id, "", "", True, True)
    return "\n".join(lines)


def cmd_lineage(args):
    from ..client import to_dict

    name, version = parse_version_ref(args.ref)
    graph = connect(args).governance.lineage(name, version, args.tenant or "", prov=args.prov)
    if args.prov:
        print(json.dumps(json.loads(graph.prov_json), indent=2, sort_keys=True))
        return
    output(args, to_dict(graph), render_tree(graph))


def register(sub) -> None:
    sp = add_command(sub, "lineage", cmd_lineage,
                     "a model version's lineage from the audit log: datasets, job, attempts, "
                     "checkpoints, evaluations, promotion requests, approvals, stage changes")
    sp.add_argument("ref", help="NAME@VERSION")
    sp.add_argument("--prov", action="store_true",
                    help="print the graph as W3C PROV-JSON (for auditors)")
    sp.add_argument("--tenant", help="another tenant (a platform admin)")

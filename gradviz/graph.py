"""Turn a recorded run into a networkx graph that carries domain data only.

Nodes are layers (and parameter-free modules and junctions), edges are dataflow
connections; both carry the latest recorded norms and a status ("ok", "nonfinite",
"absent"). Colours, sizes and positions belong to gradviz.render. No torch here.

Everything in the file is untrusted: fields the format does not check (shapes, counts,
metadata, findings) are coerced to plain, JSON-safe values or dropped.

Big graphs are rolled up by module depth (:func:`rollup`): layers whose names share their
first N parts ("blocks.3.attn.qkv", "blocks.3.mlp.fc1" -> "blocks.3") become one group
node. A group's norm is the norm of all its layers' gradients together (the square root of
the sum of their squared norms); edges between two groups are aggregated the same way, and
edges inside a group are hidden.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Iterable
from typing import Any

import networkx as nx
import numpy as np

from . import schema
from .diagnose import diagnose
from .store import Run

OK, NONFINITE, ABSENT = "ok", "nonfinite", "absent"
GROUP = "group"  # the kind of a rolled-up node
ROLLUP_ABOVE = 1000  # graphs with more nodes are rolled up by default (--depth auto)
DEPTH_MAX = 64  # the deepest roll-up offered (--depth N, as web's and visualize.py's check)
ROLLUP_TARGET = 300  # ...to the depth whose node count is closest to this, on a log scale
SEVERITIES = ("critical", "warning", "info")
_MAX_TEXT = 500  # longer strings from the file are cut: they only feed labels and panels


def value_status(x: float | None) -> str:
    """Status of one recorded value: "absent" (None), "nonfinite" (NaN/Inf) or "ok"."""
    if x is None:
        return ABSENT
    return OK if math.isfinite(x) else NONFINITE


def node_status(has_params: bool, grad: float | None, act: float | None) -> str:
    """A node's status from its parameter-gradient norm and its activation-gradient norm.

    NaN/Inf anywhere wins; otherwise a layer is absent without a parameter gradient and a
    parameter-free node (junction, module) is absent without an activation gradient.
    """
    if value_status(grad) == NONFINITE or value_status(act) == NONFINITE:
        return NONFINITE
    return value_status(grad if has_params else act)


def build_graph(run: Run) -> nx.DiGraph:
    """A DiGraph of the run's latest step: one node per layer, one edge per connection.

    Node attributes: kind, type, order, has_params, param_count, params (name -> shape,
    numel, trainable, gradient_norm, status), gradient_norm, activation_grad_norm,
    input_grad_norm, stats (forward statistics, when recorded), status. Edge attributes:
    id, gradient_norm, status, via; a second file edge between the same two nodes goes
    into the first one's ``parallel`` list.
    Graph attributes: version, steps, loss, meta, findings, edge_ids, norm_range, edge_range.
    """
    g = nx.DiGraph()
    for node in run.nodes:
        params = {
            _text(name): _param(info)
            for name, info in _dict(node.get("params")).items()
            if isinstance(info, dict)
        }
        kind = node.get("kind") if node.get("kind") in schema.NODE_KINDS else "layer"
        has_params = kind == "layer"
        grad = node.get("gradient_norm")
        act = node.get("activation_grad_norm")
        g.add_node(
            node["id"],
            kind=kind,
            type=_text(node.get("type") or node["id"]),
            order=_int(node.get("order")),
            has_params=has_params,
            param_count=_param_count(node.get("param_count"), params),
            params=params,
            gradient_norm=grad,
            activation_grad_norm=act,
            input_grad_norm=node.get("input_grad_norm"),
            stats={
                k: v
                for k, v in _dict(node.get("stats")).items()
                if k in schema.STAT_SERIES and (v is None or isinstance(v, float))
            },
            status=node_status(has_params, grad, act),
        )
    edge_ids: list[str] = []
    for edge in run.edges:
        attrs: dict[str, Any] = {
            "id": str(edge["id"]),
            "gradient_norm": edge.get("gradient_norm"),
            "status": value_status(edge.get("gradient_norm")),
            "via": [_text(v) for v in _list(edge.get("via")) if isinstance(v, str)],
        }
        edge_ids.append(attrs["id"])
        u, v = edge["source"], edge["target"]
        if g.has_edge(u, v):  # same output read twice by one consumer: keep both
            g.edges[u, v]["parallel"].append(attrs)
        else:
            g.add_edge(u, v, parallel=[], **attrs)
    node_vals = [run.array(("node", n, "gradient_norm")) for n in g.nodes]
    node_vals.append(_as_array(d["gradient_norm"] for _, d in g.nodes(data=True)))
    edge_vals = [run.array(("edge", e)) for e in edge_ids]
    edge_vals.append(_as_array(e.get("gradient_norm") for e in run.edges))
    g.graph.update(
        version=run.version,
        steps=list(run.steps),
        loss=run.loss,
        meta=clean_meta(run.meta),
        # A file written by gradviz.record alone has no findings yet: diagnose it here.
        findings=clean_findings(run.findings or diagnose(run), set(g.nodes)),
        edge_ids=edge_ids,
        norm_range=positive_range(node_vals),
        edge_range=positive_range(edge_vals),
    )
    return g


def iter_edges(g: nx.DiGraph) -> list[tuple[str, str, dict[str, Any]]]:
    """Every file edge as (source, target, attributes), parallel ones included, in file order."""
    out = []
    for u, v, d in g.edges(data=True):
        out.append((u, v, d))
        out.extend((u, v, p) for p in d.get("parallel", []))
    order = {eid: i for i, eid in enumerate(g.graph.get("edge_ids", []))}
    out.sort(key=lambda t: order.get(t[2]["id"], len(order)))
    return out


def positive_range(series: list[np.ndarray]) -> tuple[float, float] | None:
    """Smallest and largest finite positive value over some series; None if there is none."""
    if not series:
        return None
    a = np.concatenate([np.asarray(s, dtype=np.float32).ravel() for s in series])
    a = a[~schema.absent_mask(a)]
    a = a[np.isfinite(a) & (a > 0)]
    if a.size == 0:
        return None
    return float(a.min()), float(a.max())


def _as_array(values: Any) -> np.ndarray:
    vals = [v for v in values if v is not None]
    with np.errstate(over="ignore"):  # a norm beyond float32 (a file's 1e154) is inf here
        return np.asarray(vals, dtype=np.float32)


def _dict(v: Any) -> dict[Any, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _text(v: Any) -> str:
    s = v if isinstance(v, str) else schema.safe_repr(v, str)
    return s if len(s) <= _MAX_TEXT else s[: _MAX_TEXT - 1] + "…"


MAX_INT = 2**53  # whole numbers beyond this are not exact in JSON readers (or in the page)


def _int(v: Any) -> int | None:
    """A whole number from the file, or None (orjson reads 1e300 and big integers as floats)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if not (math.isfinite(v) and float(v).is_integer() and abs(v) <= MAX_INT):
        return None
    return int(v)


def _param(info: dict[str, Any]) -> dict[str, Any]:
    shape = info.get("shape")
    if not (isinstance(shape, list) and all(_int(s) is not None and s >= 0 for s in shape)):
        shape = None
    numel = _int(info.get("numel"))
    trainable = info.get("trainable")
    norm = info.get("gradient_norm")
    return {
        "shape": [int(s) for s in shape] if shape is not None else None,
        "numel": numel if numel is not None and numel >= 0 else None,
        "trainable": trainable if isinstance(trainable, bool) else None,
        "gradient_norm": norm,
        "status": value_status(norm),
    }


def _param_count(v: Any, params: dict[str, dict[str, Any]]) -> int | None:
    n = _int(v)
    if n is not None and n >= 0:
        return n
    numels = [p["numel"] for p in params.values()]
    return _total(numels) if numels else None


def clean_meta(meta: Any) -> dict[str, str | int | float | bool | None]:
    """The file's metadata as flat scalars: nested values become short text."""
    if not isinstance(meta, dict):
        return {}
    out: dict[str, str | int | float | bool | None] = {}
    for k, v in meta.items():
        if v is None or isinstance(v, (bool, int)):
            out[_text(k)] = v
        elif isinstance(v, float):
            out[_text(k)] = v if math.isfinite(v) else str(v)
        elif isinstance(v, str):
            out[_text(k)] = _text(v)
        else:
            out[_text(k)] = _text(schema.safe_repr(v))
    return out


def clean_findings(findings: Any, ids: set[str]) -> list[dict[str, Any]]:
    """Findings reduced to known fields; layers not in the graph are dropped."""
    if not isinstance(findings, list):
        return []
    out: list[dict[str, Any]] = []
    for f in findings:
        if not isinstance(f, dict):
            continue
        severity = f.get("severity") if f.get("severity") in SEVERITIES else "info"
        layers = [x for x in _list(f.get("layers")) if isinstance(x, str) and x in ids]
        steps = [s for s in _list(f.get("steps")) if _int(s) is not None][:2]
        out.append(
            {
                "kind": _text(f.get("kind") or "finding"),
                "severity": severity,
                "layers": layers,
                "steps": [int(s) for s in steps],
                "message": _text(f.get("message") or ""),
                "suggestions": [
                    _text(s) for s in _list(f.get("suggestions")) if isinstance(s, str)
                ],
            }
        )
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    out.sort(key=lambda f: rank[f["severity"]])  # stable: file order within a severity
    return out


# -- roll-up by module depth -------------------------------------------------------------

SeriesKey = tuple[str, ...]


def name_depth(name: str) -> int:
    """How many dotted parts a module name has: "blocks.3.fc1" has 3."""
    return name.count(".") + 1


def max_depth(g: nx.DiGraph) -> int:
    """The deepest module name among the graph's layers and modules (1 without any)."""
    return max((name_depth(str(n)) for n, d in g.nodes(data=True) if d["kind"] != "junction"),
               default=1)


def group_map(
    g: nx.DiGraph, depth: int, expanded: Collection[str] = ()
) -> dict[Hashable, str]:
    """The view node of every node at a depth: its group's name, or its own id.

    A layer's group is the first ``depth`` parts of its name, one part more for each
    enclosing group in ``expanded``. A group forms only when it holds two or more layers
    or modules (a lone layer stays itself) and its name is no other node's id. A junction
    joins a group when every layer feeding it is in that one group (a residual add inside
    a block); otherwise it stays a node of its own.
    """
    ids = {str(n) for n in g.nodes}
    prefix: dict[Hashable, str] = {}
    for n, d in g.nodes(data=True):
        if d["kind"] == "junction":
            continue
        parts = str(n).split(".")
        k = depth
        while k < len(parts) and ".".join(parts[:k]) in expanded:
            k += 1
        prefix[n] = ".".join(parts[:k])
    size: dict[str, int] = {}
    for p in prefix.values():
        size[p] = size.get(p, 0) + 1
    groups = {p for p, k in size.items() if k >= 2 and (p not in ids or p in prefix)}
    view = {n: p if p in groups else str(n) for n, p in prefix.items()}
    # Junctions in forward order, so that one fed only by junctions sees theirs decided.
    junctions = [n for n, d in g.nodes(data=True) if d["kind"] == "junction"]
    junctions.sort(key=lambda n: _order_of(g, n))
    for _ in range(2):  # a second pass settles junctions listed before those feeding them
        for j in junctions:
            feeders = {view.get(p) for p in g.predecessors(j) if p in prefix}
            if not feeders:
                feeders = {view.get(p) for p in g.predecessors(j) if p != j}
            one = feeders.pop() if len(feeders) == 1 else None
            view[j] = one if one in groups else str(j)
    return view


def _order_of(g: nx.DiGraph, n: Hashable) -> float:
    o = g.nodes[n].get("order")
    return float(o) if isinstance(o, int) else math.inf


def depth_options(g: nx.DiGraph) -> list[tuple[int | None, int]]:
    """(depth, node count) for every depth that rolls something up, then (None, all nodes)."""
    out: list[tuple[int | None, int]] = []
    # (each depth costs a pass over every name's parts: names of a thousand dotted parts,
    # never a real model's, took 14 s over all depths)
    for depth in range(1, min(max_depth(g), DEPTH_MAX + 1)):
        n = len(set(group_map(g, depth).values()))
        if n < g.number_of_nodes() and (not out or n != out[-1][1]):
            out.append((depth, n))
    return [*out, (None, g.number_of_nodes())]


def auto_depth(
    g: nx.DiGraph, options: list[tuple[int | None, int]] | None = None
) -> int | None:
    """The depth shown by default: None (every layer) up to ROLLUP_ABOVE nodes; above, the
    depth whose node count is closest to ROLLUP_TARGET on a log scale (deeper on ties).

    options: depth_options(g), if already computed.
    """
    if g.number_of_nodes() <= ROLLUP_ABOVE:
        return None
    options = [(d, n) for d, n in (options or depth_options(g)) if d is not None]
    if not options:
        return None
    return min(options, key=lambda o: (abs(math.log(o[1] / ROLLUP_TARGET)), -(o[0] or 0)))[0]


def rollup(
    g: nx.DiGraph, run: Run, depth: int | None, expanded: Collection[str] = ()
) -> nx.DiGraph:
    """The graph as seen at a depth (None: every layer, g itself), groups expanded as asked.

    A group node has kind "group", type "N layers" (and junctions), the members' parameter
    counts summed, ``members`` (their ids), and as gradient_norm and activation_grad_norm
    the norm of its members' values together: sqrt of the sum of squares, absent when
    every member is absent, NaN/Inf when any member is. All edges from one view node to
    another become one edge whose norm is formed the same way from the file edges it
    stands for (``members``); edges inside a group are hidden. Series for new nodes and
    edges are in ``g.graph["series"]``, keyed like Run.array: use :func:`series`.
    """
    if depth is None:
        return g
    view = group_map(g, depth, expanded)
    members: dict[str, list[Hashable]] = {}
    for n in g.nodes:
        members.setdefault(view[n], []).append(n)
    v = nx.DiGraph()
    new_series: dict[SeriesKey, np.ndarray] = {}
    for vid, ms in members.items():
        if ms == [vid] or (len(ms) == 1 and str(ms[0]) == vid):
            v.add_node(ms[0], **g.nodes[ms[0]])
            continue
        layers = [m for m in ms if g.nodes[m]["kind"] != "junction"]
        junctions = len(ms) - len(layers)
        grad = _combine(g.nodes[m]["gradient_norm"] for m in layers)
        act = _combine(g.nodes[m]["activation_grad_norm"] for m in ms)
        counts = [g.nodes[m]["param_count"] for m in layers]
        v.add_node(
            vid,
            kind=GROUP,
            type=f"{len(layers)} layers"
            + (f", {junctions} junction{'s' if junctions > 1 else ''}" if junctions else ""),
            order=min((o for m in ms if (o := g.nodes[m].get("order")) is not None),
                      default=None),
            has_params=any(g.nodes[m]["has_params"] for m in layers),
            param_count=_total(counts),
            params={},
            gradient_norm=grad,
            activation_grad_norm=act,
            input_grad_norm=None,
            stats={},
            status=node_status(True, grad, act),
            members=[str(m) for m in ms],
        )
        for key in ("gradient_norm", "activation_grad_norm"):
            new_series[("node", vid, key)] = combine_series(
                [run.array(("node", str(m), key)) for m in (layers if key == "gradient_norm"
                                                            else ms)], len(run.steps))
    pairs: dict[tuple[str, str], list[tuple[Hashable, Hashable, dict[str, Any]]]] = {}
    hidden = 0
    for a, b, d in iter_edges(g):
        va, vb = view[a], view[b]
        if va == vb and (a != b or va != str(a)):  # inside a group (a self-loop stays)
            hidden += 1
            continue
        pairs.setdefault((va, vb), []).append((a, b, d))
    edge_ids: list[str] = []
    used = set(g.graph.get("edge_ids", []))
    for (va, vb), es in pairs.items():
        na, nb = _node_of(v, va, es[0][0]), _node_of(v, vb, es[0][1])
        if v.nodes[na]["kind"] != GROUP and v.nodes[nb]["kind"] != GROUP:  # kept as it is
            first = {k: x for k, x in es[0][2].items() if k != "parallel"}
            rest = [d for _, _, d in es[1:]]
            v.add_edge(na, nb, **first, parallel=rest)
            edge_ids.extend(e["id"] for e in [first, *rest])
            continue
        eid = f"{va}->{vb}"
        while eid in used:  # a file edge may already carry that id
            eid += "'"
        used.add(eid)
        norm = _combine(d["gradient_norm"] for _, _, d in es)
        v.add_edge(na, nb, id=eid, gradient_norm=norm, status=value_status(norm),
                   via=[], parallel=[], members=[d["id"] for _, _, d in es])
        new_series[("edge", eid)] = combine_series(
            [run.array(("edge", d["id"])) for _, _, d in es], len(run.steps))
        edge_ids.append(eid)
    ids = set(v.nodes)
    findings = []
    for f in g.graph.get("findings", []):
        layers = list(dict.fromkeys(view[x] for x in f["layers"] if x in view))
        findings.append({**f, "layers": [x for x in layers if x in ids]})
    v.graph.update(g.graph)
    v.graph["series"] = new_series  # before the ranges below, which read it
    v.graph.update(
        findings=findings,
        edge_ids=edge_ids,
        view={"depth": depth, "expanded": sorted(set(expanded)), "hidden_edges": hidden},
        norm_range=positive_range([series(run, v, ("node", str(n), "gradient_norm"))
                                   for n in v.nodes]),
        edge_range=positive_range([series(run, v, ("edge", e)) for e in edge_ids]),
    )
    return v


def _node_of(v: nx.DiGraph, vid: str, original: Hashable) -> Hashable:
    """The view graph's key for a view id: the group's name, or the node's own key."""
    return vid if vid in v else original


def series(run: Run, g: nx.DiGraph, key: SeriesKey) -> np.ndarray:
    """A series of a graph's node or edge: a rolled-up one from the view, else the file's."""
    a = g.graph.get("series", {}).get(key)
    return a if a is not None else run.array(key)


def _combine(values: Iterable[float | None]) -> float | None:
    """sqrt of the sum of squares of the present values; None if none is present."""
    present = [x for x in values if x is not None]
    if not present:
        return None
    try:
        total = math.fsum(x * x for x in present)
    except OverflowError:  # finite squares whose sum is beyond a float
        total = math.inf
    if total == math.inf and all(math.isfinite(x) for x in present):
        return math.hypot(*present)  # (norms above about 1e154: their squares overflow)
    return math.sqrt(total)


def _total(counts: list[int | None]) -> int | None:
    """The sum of parameter counts, None if one is unknown or the sum is not a safe integer."""
    if any(c is None for c in counts):
        return None
    total = sum(counts)  # type: ignore[arg-type]
    return total if total <= MAX_INT else None


def combine_series(arrays: list[np.ndarray], n: int) -> np.ndarray:
    """Element-wise :func:`_combine` of float32 series (absent marker where all are absent)."""
    if not arrays:
        return schema.absent_array(n)
    a = np.stack(arrays)
    absent = schema.absent_mask(a)
    x = np.where(absent, 0.0, a.astype(np.float64))
    out = np.sqrt((x * x).sum(axis=0)).astype("<f4")
    out.view("<u4")[absent.all(axis=0)] = schema.ABSENT_BITS
    return out

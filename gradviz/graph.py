"""Turn a recorded run into a networkx graph that carries domain data only.

Nodes are layers (and parameter-free modules and junctions), edges are dataflow
connections; both carry the latest recorded norms and a status ("ok", "nonfinite",
"absent"). Colours, sizes and positions belong to gradviz.render. No torch here.

Everything in the file is untrusted: fields the format does not check (shapes, counts,
metadata, findings) are coerced to plain, JSON-safe values or dropped.
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np

from . import schema
from .diagnose import diagnose
from .store import Run

OK, NONFINITE, ABSENT = "ok", "nonfinite", "absent"
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
    return np.asarray(vals, dtype=np.float32)


def _dict(v: Any) -> dict[Any, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _text(v: Any) -> str:
    s = v if isinstance(v, str) else str(v)
    return s if len(s) <= _MAX_TEXT else s[: _MAX_TEXT - 1] + "…"


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return int(v) if math.isfinite(v) and float(v).is_integer() else None


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
    if numels and all(x is not None for x in numels):
        return sum(numels)
    return None


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
            out[_text(k)] = _text(repr(v))
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

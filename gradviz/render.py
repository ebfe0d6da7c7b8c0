"""Turn a gradient-flow graph into positions, styles, JSON payloads and an HTML page.

Layout is computed here (layered, left to right), so the browser draws with physics off.
The same encoding runs twice: here for the first frame, and in templates/gradviz.js when
the threshold or the step changes; the page receives the scale and palette from here, so
the two cannot drift apart.

pyvis is only the last step (DESIGN.md 5): nodes and edges are set on ``net.nodes`` /
``net.edges`` directly (its add_* helpers are quadratic) and ``generate_html`` renders our
own autoescaped template (its own loads CDNs and has autoescape off). Every value from the
file reaches the page as JSON in ``<script type="application/json">`` blocks.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import math
import re
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import networkx as nx
import numpy as np
import orjson
import pyvis
from markupsafe import Markup
from pyvis.network import Network

from . import schema
from .errors import GradvizError
from .graph import ABSENT, GROUP, NONFINITE, iter_edges, series
from .store import Run

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
VIS_JS = Path(pyvis.__file__).resolve().parent / "lib" / "vis-9.1.2" / "vis-network.min.js"
PAGE = "page.html"
ASSETS = {"gradviz.js": "text/javascript", "gradviz.css": "text/css"}

DEFAULT_THRESHOLD = 1e-7  # diagnose.Thresholds().vanishing: red edges are where gradient vanished
NODE_SIZE = (10.0, 42.0)  # radius range of a layer, in canvas pixels
EDGE_WIDTH = (1.0, 9.0)
SMALL_SIZE = 9.0  # junctions, parameter-free modules, layers without a gradient
MAX_DECADES = 10  # a wider range would squeeze the interesting middle into a few pixels
DX, DY = 190.0, 120.0  # spacing between layout columns and rows
ASPECT = 1.6  # width / height the layout aims for: roughly the page's graph area

PALETTE = {
    "above": "#2ca02c",
    "below": "#d62728",
    "nonfinite": "#9c27b0",
    "absent": "#b8b8b8",
    "layer": "#4a86c8",
    "layer_border": "#24527f",
    "junction": "#7a7a7a",
    "junction_border": "#4a4a4a",
    "absent_fill": "#ececec",
    "nonfinite_border": "#4a0a5a",
    "critical": "#c62828",
    "warning": "#ef8c00",
    "info": "#1e88e5",
    "label": "#222222",
}


@dataclass(frozen=True)
class LogScale:
    """Maps a positive value to an output range linearly in log10, clamped at both ends."""

    lo: float  # log10 of the value mapped to out_lo
    hi: float  # log10 of the value mapped to out_hi
    out_lo: float
    out_hi: float

    def __call__(self, x: float) -> float:
        """The output for x; zero and below give out_lo."""
        if x <= 0:
            return self.out_lo
        t = (math.log10(x) - self.lo) / (self.hi - self.lo)
        t = 0.0 if t < 0.0 else 1.0 if t > 1.0 else t  # (min/max are slow on big graphs)
        return self.out_lo + t * (self.out_hi - self.out_lo)


def log_scale(value_range: tuple[float, float] | None, out: tuple[float, float]) -> LogScale:
    """A scale over whole decades covering value_range (1e-3..1 when there is no data)."""
    if value_range is None:
        return LogScale(-3.0, 0.0, *out)
    hi = math.ceil(math.log10(value_range[1]))
    lo = math.floor(math.log10(value_range[0]))
    if hi - lo < 1:
        lo = hi - 1
    lo = max(lo, hi - MAX_DECADES)
    return LogScale(float(lo), float(hi), *out)


# -- layout ------------------------------------------------------------------------------


def layer_columns(g: nx.DiGraph) -> dict[Hashable, int]:
    """Column of each node: its topological generation, cycles collapsed into one column.

    Strongly connected parts (a module called in a loop) are collapsed first, so a cycle
    never breaks the ordering; sources sit just left of their first consumer. A graph
    without edges gets one column per node, in forward order.
    """
    order = _forward_order(g)
    if g.number_of_edges() == 0:
        return {n: i for i, n in enumerate(sorted(g.nodes, key=order.__getitem__))}
    cond = nx.condensation(g)
    column: dict[int, int] = {}
    for k, generation in enumerate(nx.topological_generations(cond)):
        for c in generation:
            column[c] = k
    for c in cond.nodes:  # pull sources right, next to the first layer that reads them
        succ = [column[s] for s in cond.successors(c)]
        if cond.in_degree(c) == 0 and succ:
            column[c] = min(succ) - 1
    return {n: column[c] for c in cond.nodes for n in cond.nodes[c]["members"]}


def layered_layout(
    g: nx.DiGraph, dx: float = DX, dy: float = DY, aspect: float = ASPECT
) -> dict[Hashable, tuple[float, float]]:
    """Positions by column (see layer_columns), wrapped into bands.

    Rows in a column follow the mean row of their predecessors (fewer crossings), ties
    broken by forward order. A long chain (a deep residual net) is wrapped into bands, as
    many as bring the picture closest to the given aspect ratio. The bands run back and
    forth (left to right, then right to left below it), so a band goes on right below
    where the one above it ended: wrapped like lines of text, the edges into the next band,
    skip connections too, ran diagonally across the whole picture.
    """
    if g.number_of_nodes() == 0:
        return {}
    order = _forward_order(g)
    columns: dict[int, list[Hashable]] = {}
    for n, k in layer_columns(g).items():
        columns.setdefault(k, []).append(n)
    row: dict[Hashable, float] = {}
    for k in sorted(columns):
        members = columns[k]

        def key(n: Hashable) -> tuple[float, tuple[float, int]]:
            preds = [row[p] for p in g.predecessors(n) if p in row]
            return (sum(preds) / len(preds) if preds else 0.0, order[n])

        members.sort(key=key)
        for i, n in enumerate(members):
            row[n] = i - (len(members) - 1) / 2
    n_cols = max(columns) + 1
    band_height = (max(len(m) for m in columns.values()) + 1) * dy
    bands = min(
        range(1, n_cols + 1),
        key=lambda b: abs(math.log(math.ceil(n_cols / b) * dx / (b * band_height) / aspect)),
    )
    per_band = math.ceil(n_cols / bands)

    def x(k: int) -> float:
        at = k % per_band
        return (at if (k // per_band) % 2 == 0 else per_band - 1 - at) * dx

    return {
        n: (x(k), (k // per_band) * band_height + row[n] * dy)
        for k, members in columns.items()
        for n in members
    }


def _forward_order(g: nx.DiGraph) -> dict[Hashable, tuple[float, int]]:
    return {n: (schema.order_key(d.get("order")), i)
            for i, (n, d) in enumerate(g.nodes(data=True))}


# -- encoding ----------------------------------------------------------------------------


def fmt(x: float | None) -> str:
    """A norm as short text; templates/gradviz.js formats the same way."""
    if x is None:
        return "absent"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        s = repr(float(f"{x:.3g}"))
        return s[:-2] if s.endswith(".0") else s
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant}e{int(exp):+d}"


def node_style(
    d: dict[str, Any], node_scale: LogScale, severity: str | None = None
) -> dict[str, Any]:
    """Size, shape and colour of one node from its domain attributes."""
    status = d["status"]
    grad = d.get("gradient_norm")
    if not d.get("has_params"):
        shape, size, fill, border = "diamond", SMALL_SIZE, PALETTE["junction"], "junction_border"
    else:
        # a rolled-up group of layers is a square, so it does not pass for one layer
        shape = "square" if d.get("kind") == GROUP else "dot"
        fill, border = PALETTE["layer"], "layer_border"
        size = node_scale(grad) if status == "ok" and grad is not None else node_scale.out_hi
    if status == ABSENT:
        size, fill, border = SMALL_SIZE, PALETTE["absent_fill"], "absent"
    elif status == NONFINITE:
        fill, border = PALETTE["nonfinite"], "nonfinite_border"
    border_colour = PALETTE[severity] if severity else PALETTE[border]
    width = 4.0 if severity else 3.0 if status == NONFINITE else 1.5
    return {
        "shape": shape,
        "size": round(size, 3),
        "borderWidth": width,
        "color": {
            "background": fill,
            "border": border_colour,
            "highlight": {"background": fill, "border": "#000000"},
            "hover": {"background": fill, "border": "#000000"},
        },
        "shapeProperties": {"borderDashes": [4, 3] if status == ABSENT else False},
    }


def edge_style(d: dict[str, Any], threshold: float, edge_scale: LogScale) -> dict[str, Any]:
    """Colour, width and dashes of one edge: green above threshold, red at or below it."""
    status, x = d["status"], d.get("gradient_norm")
    dashes: list[int] | bool
    if status == NONFINITE:
        colour, width, dashes = PALETTE["nonfinite"], edge_scale.out_hi, [8, 4]
    elif status == ABSENT or x is None:
        colour, width, dashes = PALETTE["absent"], edge_scale.out_lo, [2, 4]
    else:
        colour = PALETTE["above"] if x > threshold else PALETTE["below"]
        width, dashes = edge_scale(x), False
    return {
        "width": round(width, 3),
        "dashes": dashes,
        "color": {"color": colour, "highlight": colour, "hover": colour, "inherit": False},
    }


MAX_LABEL = 48  # characters of a node's label; its title and the details keep the name


def label(name: str) -> str:
    """A node's label: the name, or its end (the distinctive part of a module path) if long."""
    return name if len(name) <= MAX_LABEL else "…" + name[-(MAX_LABEL - 1):]


def node_title(nid: str, d: dict[str, Any], step: int | None) -> str:
    """Plain-text tooltip of a node (vis-network shows string titles as text)."""
    count = d.get("param_count")
    lines = [
        nid,
        f"{d.get('type')} · {d.get('kind')}" + (f" · {count:,} parameters" if count else ""),
    ]
    if d.get("has_params"):
        lines.append(f"gradient norm {fmt(d.get('gradient_norm'))}")
    lines.append(f"activation gradient norm {fmt(d.get('activation_grad_norm'))}")
    if step is not None:
        lines.append(f"step {step}")
    if d.get("kind") == GROUP:
        lines.append("double-click to expand")
    return "\n".join(lines)


def edge_title(u: str, v: str, d: dict[str, Any], threshold: float) -> str:
    """Plain-text tooltip of an edge."""
    x = d.get("gradient_norm")
    lines = [f"{u} → {v}"]
    if d.get("via"):
        lines.append("via " + ", ".join(d["via"]))
    side = ""
    if d["status"] == "ok" and x is not None:
        side = " (above threshold)" if x > threshold else " (at or below threshold)"
    lines.append(f"gradient norm {fmt(x)}{side}")
    return "\n".join(lines)


def options(g: nx.DiGraph) -> dict[str, Any]:
    """vis-network options: physics off, positions fixed, hover tooltips on."""
    # Big graphs: edges hidden while panning keep them fluid, and arrowheads (too small to
    # see at the zoom that shows them whole; direction is left to right) halve each redraw.
    big = g.number_of_edges() > 3000
    return {
        "autoResize": True,
        "physics": {"enabled": False},
        "layout": {"improvedLayout": False, "hierarchical": {"enabled": False}},
        "interaction": {
            "hover": True,
            "tooltipDelay": 120,
            "hideEdgesOnDrag": big,
            "hideEdgesOnZoom": big,
            "multiselect": False,
        },
        "nodes": {
            "font": {
                "size": 14,
                "face": "system-ui, sans-serif",
                "color": PALETTE["label"],
                "strokeWidth": 3,
                "strokeColor": "#ffffff",
            }
        },
        "edges": {
            "arrows": {"to": {"enabled": not big, "scaleFactor": 0.5}},
            "smooth": False,
            "selectionWidth": 1.5,
            "hoverWidth": 1.5,
        },
    }


def vis_data(
    g: nx.DiGraph,
    threshold: float,
    pos: dict[Hashable, tuple[float, float]] | None = None,
    all_edges: list[tuple[str, str, dict[str, Any]]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The vis-network node and edge dicts: Python floats and str ids only.

    all_edges: iter_edges(g), if already computed.

    vis ids are positions ("n0", "e0"), not the file's names: vis-network keeps nodes in
    plain objects, and a layer called "__proto__" would break it. The name travels as
    ``name`` (and as the label).
    """
    pos = pos if pos is not None else layered_layout(g)
    vis_id = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    node_scale, edge_scale = scales(g)
    severity = finding_severity(g)
    steps = g.graph.get("steps") or []
    step = steps[-1] if steps else None
    nodes = []
    for n, d in g.nodes(data=True):
        x, y = pos[n]
        nodes.append(
            {
                "id": vis_id[n],
                "name": str(n),
                "label": label(str(n)),
                "x": float(x),
                "y": float(y),
                "title": node_title(str(n), d, step),
                **node_style(d, node_scale, severity.get(n)),
            }
        )
    edges = []
    seen: dict[tuple[str, str], int] = {}
    for i, (u, v, d) in enumerate(all_edges if all_edges is not None else iter_edges(g)):
        e: dict[str, Any] = {
            "id": f"e{i}",
            "name": d["id"],
            "from": vis_id[u],
            "to": vis_id[v],
            "title": edge_title(str(u), str(v), d, threshold),
            **edge_style(d, threshold, edge_scale),
        }
        k = seen[(u, v)] = seen.get((u, v), -1) + 1
        span = abs(pos[v][0] - pos[u][0])
        same_row = pos[v][1] == pos[u][1]
        if k or (same_row and span > 1.5 * DX) or u == v:
            # long edges along one row would run through the nodes between: bend them
            e["smooth"] = {"enabled": True, "type": "curvedCW", "roundness": 0.25 + 0.15 * k}
        edges.append(e)
    return nodes, edges


def scales(g: nx.DiGraph) -> tuple[LogScale, LogScale]:
    """Node-size and edge-width scales over every recorded step, so steps compare."""
    return (
        log_scale(g.graph.get("norm_range"), NODE_SIZE),
        log_scale(g.graph.get("edge_range"), EDGE_WIDTH),
    )


def finding_severity(g: nx.DiGraph) -> dict[str, str]:
    """The worst finding severity of each affected layer (findings come sorted worst first)."""
    out: dict[str, str] = {}
    for f in g.graph.get("findings", []):
        for n in f["layers"]:
            out.setdefault(n, f["severity"])
    return out


# -- payloads ----------------------------------------------------------------------------


@dataclass
class Frames:
    """Every recorded step as matrices (steps x nodes, steps x edges), for per-step data."""

    steps: list[int]
    node_ids: list[str]
    edge_ids: list[str]
    grad: np.ndarray
    act: np.ndarray
    edge: np.ndarray
    loss: np.ndarray

    def index(self, step: int) -> int | None:
        """Position of a recorded step number, None if it was not recorded."""
        i = bisect.bisect_left(self.steps, step)
        return i if i < len(self.steps) and self.steps[i] == step else None


def frames(run: Run, g: nx.DiGraph) -> Frames:
    """Stack the run's series in the graph's node and edge order."""
    nodes = [str(n) for n in g.nodes]
    edges = list(g.graph.get("edge_ids", []))
    n = len(run.steps)

    def stack(keys: list[tuple[str, ...]]) -> np.ndarray:
        if not keys:
            return schema.absent_array(0).reshape(n, 0)
        return np.stack([series(run, g, k) for k in keys], axis=1).astype("<f4", copy=False)

    return Frames(
        steps=list(run.steps),
        node_ids=nodes,
        edge_ids=edges,
        grad=stack([("node", i, "gradient_norm") for i in nodes]),
        act=stack([("node", i, "activation_grad_norm") for i in nodes]),
        edge=stack([("edge", e) for e in edges]),
        loss=run.array(("loss",)),
    )


def _values(a: np.ndarray) -> list[float | str | None]:
    return [schema.encode_value(v) for v in schema.series_to_list(a)]


def step_payload(fr: Frames, index: int) -> dict[str, Any]:
    """The values of one recorded step, in the order of graph_payload's nodes and edges."""
    return {
        "step": fr.steps[index],
        "index": index,
        "loss": _values(fr.loss[index : index + 1])[0],
        "gradient_norm": _values(fr.grad[index]),
        "activation_grad_norm": _values(fr.act[index]),
        "edges": _values(fr.edge[index]),
    }


def layer_payload(run: Run, g: nx.DiGraph, node_id: str) -> dict[str, Any]:
    """One layer (or group) over every recorded step: its norms and each parameter's norm."""
    d = g.nodes[node_id]
    stats = _stat_keys(run, node_id) if d["kind"] != GROUP else []
    return {
        "id": node_id,
        "steps": list(run.steps),
        "gradient_norm": _values(series(run, g, ("node", node_id, "gradient_norm"))),
        "activation_grad_norm": _values(series(run, g, ("node", node_id, "activation_grad_norm"))),
        "params": {p: _values(run.array(("param", node_id, p))) for p in d["params"]},
        "stats": {k: _values(run.array(("node", node_id, k))) for k in stats},
        "members": d.get("members", []),
    }


def _stat_keys(run: Run, node_id: str) -> list[str]:
    keys = set(run.keys())
    return [k for k in schema.STAT_SERIES if ("node", node_id, k) in keys]


def graph_payload(
    g: nx.DiGraph,
    threshold: float,
    *,
    source: str = "",
    revision: int = 0,
    view: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the page draws from: vis nodes and edges, options, and the run's data.

    view describes the roll-up shown (see gradviz.web): depth, expanded groups, the depths
    to choose from; per-step and per-layer data are not included (api/step, api/layer).
    """
    all_edges = iter_edges(g)
    nodes, edges = vis_data(g, threshold, all_edges=all_edges)
    node_scale, edge_scale = scales(g)
    enc = schema.encode_value
    node_info = []
    for n, d in g.nodes(data=True):
        node_info.append(
            {
                "id": str(n),
                "type": d["type"],
                "kind": d["kind"],
                "has_params": d["has_params"],
                "param_count": d["param_count"],
                "order": d["order"],
                **({"members": d["members"]} if d["kind"] == GROUP else {}),  # for the search
                "stats": {k: enc(v) for k, v in d.get("stats", {}).items()},
                "params": [
                    {
                        "name": p,
                        "shape": i["shape"],
                        "numel": i["numel"],
                        "trainable": i["trainable"],
                        "gradient_norm": enc(i["gradient_norm"]),
                    }
                    for p, i in d["params"].items()
                ],
            }
        )
    edge_info = [
        {"id": d["id"], "source": str(u), "target": str(v), "via": d["via"]}
        for u, v, d in all_edges
    ]
    steps = g.graph.get("steps") or []
    return {
        "nodes": nodes,
        "edges": edges,
        "options": options(g),
        "threshold": float(threshold),
        "palette": PALETTE,
        "sizes": {"small": SMALL_SIZE},
        "scales": {"node": asdict(node_scale), "edge": asdict(edge_scale)},
        "run": {
            "source": source,
            "revision": revision,
            "version": g.graph.get("version", 0),
            "meta": [[k, v] for k, v in g.graph.get("meta", {}).items()],
            "steps": list(steps),
            "loss": [enc(x) for x in g.graph.get("loss", [])],
            "nodes": node_info,
            "edges": edge_info,
            "findings": g.graph.get("findings", []),
            "view": view or {"depth": None, "expanded": [], "auto": False, "options": []},
            "latest": {
                "step": steps[-1] if steps else None,
                "gradient_norm": [enc(d["gradient_norm"]) for _, d in g.nodes(data=True)],
                "activation_grad_norm": [
                    enc(d["activation_grad_norm"]) for _, d in g.nodes(data=True)
                ],
                "edges": [enc(d["gradient_norm"]) for _, _, d in all_edges],
            },
        },
    }


def history_payload(run: Run, g: nx.DiGraph, fr: Frames | None = None) -> dict[str, Any]:
    """The whole history as base64 float32 (schema encoding), embedded by --export."""
    fr = fr if fr is not None else frames(run, g)
    b64 = schema.encode_series
    return {
        "encoding": schema.SERIES_ENCODING,
        "n_nodes": len(fr.node_ids),
        "n_edges": len(fr.edge_ids),
        "grad": b64(fr.grad.ravel()),
        "act": b64(fr.act.ravel()),
        "edge": b64(fr.edge.ravel()),
        "params": {
            n: {p: b64(run.array(("param", n, p))) for p in g.nodes[n]["params"]}
            for n in fr.node_ids
        },
        "stats": {
            n: {k: b64(run.array(("node", n, k))) for k in _stat_keys(run, n)} for n in fr.node_ids
        },
    }


# -- page --------------------------------------------------------------------------------


def json_script(value: Any) -> Markup:
    """JSON that is safe inside <script type="application/json">: no "<", ">" or "&"."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)


_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    """Our template environment (autoescape on); GradvizError if templates/ is missing."""
    global _ENV
    if _ENV is None:
        missing = [n for n in (PAGE, *ASSETS) if not (TEMPLATES / n).is_file()]
        if missing or not VIS_JS.is_file():
            where = TEMPLATES / missing[0] if missing else VIS_JS
            raise GradvizError(
                f"{where} is missing; install gradviz from a checkout with its templates/ "
                "folder (pip install -e .) and pyvis==0.3.2"
            )
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["json_script"] = json_script
        _ENV = env
    return _ENV


class _BoundEnvironment:
    """Stands in for pyvis's template environment: our template, plus our variables."""

    def __init__(self, env: jinja2.Environment, extra: dict[str, Any]) -> None:
        self.env, self.extra = env, extra

    def get_template(self, name: str) -> _BoundEnvironment:
        self.template = self.env.get_template(name)
        return self

    def render(self, **pyvis_vars: Any) -> str:
        return self.template.render(**pyvis_vars, **self.extra)


def vis_script() -> str:
    """vis-network's script without its source-map comment (a browser's developer tools
    would ask for vis-network.min.js.map, which the wheel does not ship)."""
    text = VIS_JS.read_text(encoding="utf-8")
    return re.sub(r"\n//# sourceMappingURL=\S*\s*$", "\n", text)


def asset_text(name: str) -> str:
    """Our own script or stylesheet from templates/ (only the names in ASSETS)."""
    if name not in ASSETS:
        raise KeyError(name)
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render_page(
    payload: dict[str, Any],
    *,
    title: str,
    live: bool = False,
    history: dict[str, Any] | None = None,
) -> str:
    """The HTML page for a graph_payload, rendered through pyvis with our template.

    With history (see history_payload) the page is self-contained: scripts and styles
    inlined, per-step data embedded, and a meta CSP that allows nothing else, so the file
    works from file:// with no network. Without it the page loads assets/ and api/ from
    the server that serves it.
    """
    env = environment()
    data = {k: v for k, v in payload.items() if k not in ("nodes", "edges", "options")}
    data["mode"] = "export" if history is not None else "server"
    data["live"] = live and history is None
    if history is not None:
        data["history"] = history
    extra: dict[str, Any] = {"title": title, "data": data, "inline": history is not None, "csp": ""}
    if history is not None:
        vis_js, app_js, css = (
            vis_script(),
            asset_text("gradviz.js"),
            asset_text("gradviz.css"),
        )
        for name, text in (("vis-network", vis_js), ("gradviz.js", app_js)):
            if "</script" in text.lower():
                raise ValueError(f"{name} contains '</script' and cannot be inlined")
        extra.update(vis_js=Markup(vis_js), app_js=Markup(app_js), css=Markup(css))
        extra["csp"] = (
            f"default-src 'none'; script-src {_sha256(vis_js)} {_sha256(app_js)}; "
            f"style-src {_sha256(css)}; img-src data:; base-uri 'none'; "
            "form-action 'none'"
        )
    net = Network(height="100%", width="100%", directed=True, cdn_resources="in_line")
    net.nodes = payload["nodes"]
    net.edges = payload["edges"]
    net.options = payload["options"]
    net.templateEnv = _BoundEnvironment(env, extra)  # type: ignore[assignment]
    net.path = PAGE
    return net.generate_html(name="gradviz.html")

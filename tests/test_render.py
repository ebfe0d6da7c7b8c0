"""Layout, encoding, payloads and the HTML page (no browser here; see test_browser.py)."""

from __future__ import annotations

import base64
import hashlib
import html as htmllib
import math
import re
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import orjson
import pytest

from gradviz import render, schema, store
from gradviz.graph import build_graph


def load(path: Path) -> tuple[store.Run, nx.DiGraph]:
    run = store.load(path)
    return run, build_graph(run)


# -- layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chain", "residual", "nonfinite"])
def test_columns_follow_the_edges(make_file, kind: str) -> None:
    _, g = load(make_file(kind))
    col = render.layer_columns(g)
    assert all(col[u] < col[v] for u, v in g.edges)


def test_layout_is_distinct_and_deterministic(residual_file: Path) -> None:
    _, g = load(residual_file)
    pos = render.layered_layout(g)
    assert set(pos) == set(g.nodes)
    assert len(set(pos.values())) == len(pos)
    assert pos == render.layered_layout(build_graph(store.load(residual_file)))
    assert all(isinstance(c, float) for xy in pos.values() for c in xy)


def test_long_chain_wraps_into_bands(residual_file: Path, chain_file: Path) -> None:
    _, g = load(residual_file)
    pos = render.layered_layout(g)
    ys = {y for _, y in pos.values()}
    assert len(ys) > 1  # 20 columns in a row would be 15 times wider than high
    # the bands go back and forth: an edge into the next band drops straight down (as
    # lines of text, it ran from the right end back to the left, across the picture)
    col = render.layer_columns(g)
    per_band = len({x for x, _ in pos.values()})
    wraps = [(u, v) for u, v in g.edges
             if col[v] == col[u] + 1 and col[v] // per_band != col[u] // per_band]
    assert wraps
    for u, v in wraps:
        assert pos[u][0] == pos[v][0] and pos[u][1] < pos[v][1], (u, v)
    longest = max(abs(pos[u][0] - pos[v][0]) for u, v in g.edges)
    assert longest < (per_band - 1) * render.DX  # (no edge spans the picture's width)
    _, g = load(chain_file)
    pos = render.layered_layout(g)
    assert {y for _, y in pos.values()} == {0.0}
    assert pos["fc1"][0] < pos["fc2"][0] < pos["fc3"][0]


def test_layout_survives_cycles_and_self_loops() -> None:
    g = nx.DiGraph(
        [("in", "cell"), ("cell", "cell"), ("cell", "gate"), ("gate", "cell"), ("gate", "out")]
    )
    col = render.layer_columns(g)
    assert col["cell"] == col["gate"]  # one strongly connected part, one column
    assert col["in"] < col["cell"] < col["out"]
    pos = render.layered_layout(g)
    assert len(set(pos.values())) == 4


def test_layout_edge_cases() -> None:
    assert render.layered_layout(nx.DiGraph()) == {}
    g = nx.DiGraph()
    g.add_node("b", order=1)
    g.add_node("a", order=0)
    g.add_node("c")
    pos = render.layered_layout(g)  # no edges: forward order, unordered last
    assert sorted(pos, key=lambda n: (pos[n][1], pos[n][0])) == ["a", "b", "c"]
    g = nx.DiGraph([("late_source", "z"), ("a", "b"), ("b", "z")])
    col = render.layer_columns(g)
    assert col["late_source"] == col["z"] - 1  # a source sits next to its reader


def test_big_layout_is_fast(big_file: Path) -> None:
    import time

    _, g = load(big_file)
    t = time.perf_counter()
    pos = render.layered_layout(g)
    assert time.perf_counter() - t < 2.0
    assert len(set(pos.values())) == g.number_of_nodes()


# -- encoding ----------------------------------------------------------------------------


def test_log_scale() -> None:
    s = render.log_scale((2e-4, 0.5), (10.0, 40.0))
    assert (s.lo, s.hi) == (-4.0, 0.0)
    assert s(1e-4) == 10.0 and s(1.0) == 40.0
    assert s(1e-9) == 10.0 and s(1e9) == 40.0  # clamped
    assert s(0.0) == 10.0
    assert s(1e-2) == pytest.approx(25.0)
    assert render.log_scale(None, (1.0, 2.0)).lo == -3.0
    flat = render.log_scale((0.5, 0.5), (1.0, 2.0))
    assert flat.hi - flat.lo == 1.0
    wide = render.log_scale((1e-30, 1e5), (1.0, 2.0))
    assert wide.hi - wide.lo == render.MAX_DECADES


def node(status: str, grad: float | None = 0.1, has_params: bool = True) -> dict[str, Any]:
    return {"status": status, "gradient_norm": grad, "has_params": has_params}


def test_node_style() -> None:
    s = render.log_scale((1e-3, 1.0), render.NODE_SIZE)
    ok = render.node_style(node("ok", 1e-3), s)
    big = render.node_style(node("ok", 1.0), s)
    assert ok["size"] < big["size"] and ok["shape"] == "dot"
    assert ok["shapeProperties"]["borderDashes"] is False
    absent = render.node_style(node("absent", None), s)
    assert absent["size"] == render.SMALL_SIZE and absent["shapeProperties"]["borderDashes"]
    nan = render.node_style(node("nonfinite", math.nan), s)
    assert nan["color"]["background"] == render.PALETTE["nonfinite"]
    assert nan["size"] == render.NODE_SIZE[1]  # NaN/Inf stand out
    junction = render.node_style(node("ok", None, has_params=False), s)
    assert junction["shape"] == "diamond"
    group = render.node_style({**node("ok", 1.0), "kind": "group"}, s)
    assert group["shape"] == "square" and group["size"] == big["size"]
    flagged = render.node_style(node("ok"), s, "critical")
    assert flagged["color"]["border"] == render.PALETTE["critical"]
    assert flagged["borderWidth"] > ok["borderWidth"]


def test_edge_style_threshold_is_strict() -> None:
    s = render.log_scale((1e-3, 1.0), render.EDGE_WIDTH)

    def colour(x: float | None, status: str = "ok") -> str:
        style = render.edge_style({"status": status, "gradient_norm": x}, 0.01, s)
        return style["color"]["color"]

    assert colour(0.0100001) == render.PALETTE["above"]
    assert colour(0.01) == render.PALETTE["below"]  # at the threshold: red
    assert colour(0.0) == render.PALETTE["below"]
    assert colour(math.nan, "nonfinite") == render.PALETTE["nonfinite"]
    assert colour(None, "absent") == render.PALETTE["absent"]
    thin = render.edge_style({"status": "ok", "gradient_norm": 1e-3}, 0.01, s)
    wide = render.edge_style({"status": "ok", "gradient_norm": 1.0}, 0.01, s)
    assert thin["width"] < wide["width"] and not thin["dashes"]
    assert render.edge_style({"status": "nonfinite", "gradient_norm": math.inf}, 0.01, s)["dashes"]


def test_fmt() -> None:
    assert render.fmt(None) == "absent"
    assert render.fmt(math.nan) == "NaN" and render.fmt(-math.inf) == "-Infinity"
    assert render.fmt(0.0) == "0"
    assert render.fmt(0.012345) == "0.0123"
    assert render.fmt(1234.5) == "1230"
    assert render.fmt(2.0) == "2"
    assert render.fmt(1.5e-7) == "1.50e-7"
    assert render.fmt(3e6) == "3.00e+6"


def walk(x: Any) -> list[Any]:
    if isinstance(x, dict):
        assert all(isinstance(k, str) for k in x)
        return [v for item in x.values() for v in walk(item)]
    if isinstance(x, list):
        return [v for item in x for v in walk(item)]
    return [x]


@pytest.mark.parametrize("kind", ["chain", "residual", "nonfinite", "minimal", "evil"])
def test_vis_data_is_plain_python(make_file, kind: str) -> None:
    _, g = load(make_file(kind))
    nodes, edges = render.vis_data(g, 0.01)
    assert len(nodes) == g.number_of_nodes()
    assert len({e["id"] for e in edges}) == len(edges)
    for leaf in walk([nodes, edges]):
        assert leaf is None or type(leaf) in (str, float, int, bool), (leaf, type(leaf))
    assert all(type(n["size"]) is float and type(n["x"]) is float for n in nodes)


def test_long_names_get_short_labels() -> None:
    g = nx.DiGraph()
    long = "encoder." + "very_long_module_name." * 120 + "qkv"
    g.add_node(long, kind="layer", type="Linear", has_params=True, gradient_norm=1.0,
               activation_grad_norm=1.0, status="ok", order=0)
    g.add_node("fc", kind="layer", type="Linear", has_params=True, gradient_norm=1.0,
               activation_grad_norm=1.0, status="ok", order=1)
    g.add_edge(long, "fc", id=f"{long}->fc", gradient_norm=1.0, status="ok", via=[])
    nodes, _ = render.vis_data(g, 0.01)
    by_name = {n["name"]: n for n in nodes}
    assert by_name["fc"]["label"] == "fc"
    lab = by_name[long]["label"]
    assert len(lab) == render.MAX_LABEL and lab.startswith("…") and long.endswith(lab[1:])
    assert by_name[long]["name"] == long  # the full name still travels, for the panel


def test_options_keep_physics_off(residual_file: Path) -> None:
    _, g = load(residual_file)
    opts = render.options(g)
    assert opts["physics"]["enabled"] is False
    assert opts["layout"]["improvedLayout"] is False
    assert opts["edges"]["arrows"]["to"]["enabled"] is True
    big = nx.DiGraph((i, i + 1) for i in range(3001))
    opts = render.options(big)  # arrowheads too small to see, and half of each redraw
    assert opts["edges"]["arrows"]["to"]["enabled"] is False
    assert opts["interaction"]["hideEdgesOnDrag"] is True


def test_skip_edges_bend(residual_file: Path) -> None:
    _, g = load(residual_file)
    _, edges = render.vis_data(g, 0.01)
    by_id = {e["name"]: e for e in edges}
    assert "smooth" in by_id["stem->add#0"]  # along the row, past two layers
    assert "smooth" not in by_id["stem->blocks.0.fc1"]


# -- payloads ----------------------------------------------------------------------------


def test_step_payload_matches_history(residual_file: Path) -> None:
    run, g = load(residual_file)
    fr = render.frames(run, g)
    p = render.step_payload(fr, 3)
    assert p["step"] == run.steps[3] and p["index"] == 3
    ids = list(g.nodes)
    assert len(p["gradient_norm"]) == len(ids)
    for i, nid in enumerate(ids):
        want = run.node_history(nid)[3]
        assert p["gradient_norm"][i] == (None if want is None else pytest.approx(want))
    for k, eid in enumerate(g.graph["edge_ids"]):
        assert p["edges"][k] == pytest.approx(run.edge_history(eid)[3])
    assert p["loss"] == pytest.approx(run.loss[3])
    assert fr.index(run.steps[3]) == 3 and fr.index(run.steps[3] + 1) is None


def test_payloads_encode_nonfinite(nonfinite_file: Path) -> None:
    run, g = load(nonfinite_file)
    p = render.step_payload(render.frames(run, g), 2)
    assert "NaN" in p["gradient_norm"] and "Infinity" in p["gradient_norm"]
    assert None in p["edges"]
    assert p["loss"] == "NaN"
    orjson.dumps(p)  # plain JSON: no float NaN anywhere
    layer = render.layer_payload(run, g, "embed")
    assert layer["gradient_norm"] == [None, None, None]
    assert layer["params"] == {"weight": [None, None, None]}
    assert layer["stats"] == {}


def test_forward_statistics_reach_the_page(residual_file: Path) -> None:
    run, g = load(residual_file)
    assert set(g.nodes["stem"]["stats"]) == {"act_mean", "dead_frac"}
    assert g.nodes["add#0"]["stats"] == {}
    layer = render.layer_payload(run, g, "stem")
    assert layer["stats"]["dead_frac"][0] == pytest.approx(0.05)
    h = render.history_payload(run, g)
    assert set(h["stats"]["stem"]) == {"act_mean", "dead_frac"} and h["stats"]["add#0"] == {}
    info = render.graph_payload(g, 0.01)["run"]["nodes"][0]
    assert info["stats"]["dead_frac"] == pytest.approx(g.nodes["stem"]["stats"]["dead_frac"])


def test_graph_payload_is_consistent(residual_file: Path) -> None:
    run, g = load(residual_file)
    p = render.graph_payload(g, 0.02, source="r.json", revision=4)
    assert [n["name"] for n in p["nodes"]] == [n["id"] for n in p["run"]["nodes"]]
    assert [e["name"] for e in p["edges"]] == [e["id"] for e in p["run"]["edges"]]
    assert [n["id"] for n in p["nodes"]] == [f"n{i}" for i in range(len(p["nodes"]))]
    assert p["edges"][0]["from"] == "n0"
    assert p["threshold"] == 0.02 and p["run"]["revision"] == 4
    assert p["run"]["steps"] == run.steps
    assert len(p["run"]["latest"]["edges"]) == len(p["edges"])
    assert p["run"]["findings"][0]["layers"] == ["blocks.0.fc1", "blocks.1.fc1"]
    orjson.dumps(p)


def test_history_payload_round_trips(residual_file: Path) -> None:
    run, g = load(residual_file)
    fr = render.frames(run, g)
    h = render.history_payload(run, g, fr)
    grad = np.frombuffer(base64.b64decode(h["grad"]), dtype="<f4").reshape(len(run.steps), -1)
    assert np.array_equal(grad.view("<u4"), fr.grad.view("<u4"))
    w = schema.decode_series(h["params"]["stem"]["weight"], len(run.steps), "w")
    assert schema.series_to_list(w) == run.param_history("stem", "weight")


# -- page --------------------------------------------------------------------------------


def test_json_script_escapes_markup() -> None:
    out = str(render.json_script({"a": "</script><b>&"}))
    assert "<" not in out and ">" not in out and "&" not in out
    assert orjson.loads(out) == {"a": "</script><b>&"}


def page_data(html: str, block: str) -> Any:
    m = re.search(rf'<script type="application/json" id="{block}">(.*?)</script>', html, re.S)
    assert m, block
    return orjson.loads(m.group(1))


def test_server_page(residual_file: Path, tmp_path: Path, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # pyvis must not write lib/ or any file anywhere
    _, g = load(residual_file)
    html = render.render_page(render.graph_payload(g, 0.01), title="residual.json", live=True)
    assert list(cwd.iterdir()) == []
    assert "<title>gradviz · residual.json</title>" in html
    assert re.findall(r'<script src="([^"]+)"', html) == [
        "assets/vis-network.min.js",
        "assets/gradviz.js",
    ]
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "<script>" not in html  # no inline script: CSP script-src 'self' holds
    assert len(page_data(html, "gv-nodes")) == g.number_of_nodes()
    assert page_data(html, "gv-options")["physics"]["enabled"] is False
    data = page_data(html, "gv-data")
    assert data["mode"] == "server" and data["live"] is True


def test_export_page_is_self_contained(residual_file: Path) -> None:
    run, g = load(residual_file)
    html = render.render_page(
        render.graph_payload(g, 0.01), title="r", history=render.history_payload(run, g)
    )
    assert "<script src=" not in html and '<link rel="stylesheet"' not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    m = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    csp = htmllib.unescape(m.group(1))
    assert "default-src 'none'" in csp and "unsafe" not in csp
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 2
    for text in scripts:  # each inline script is allowed by its hash, and only those
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    data = page_data(html, "gv-data")
    assert data["mode"] == "export" and data["live"] is False
    assert data["history"]["n_nodes"] == g.number_of_nodes()
    assert "sourceMappingURL" not in html  # (developer tools would ask for a .map file)


def test_evil_names_stay_data(evil_file: Path) -> None:
    _, g = load(evil_file)
    html = render.render_page(render.graph_payload(g, 0.01), title="<i>evil</i>.json")
    assert "<img" not in html and "<svg" not in html and "<b>" not in html
    assert "alert(" not in html.split('<script type="application/json"')[0]
    assert "<title>gradviz · &lt;i&gt;evil&lt;/i&gt;.json</title>" in html
    assert "{{ 7*7 }}" in html and "49" not in html  # never evaluated as a template
    assert html.count("</script>") == 6  # four JSON blocks, two script tags: none from data
    ids = [n["name"] for n in page_data(html, "gv-nodes")]
    assert ids == list(g.nodes)


@pytest.mark.parametrize("name", ["mlp", "transformer", "deep-sigmoid"])
def test_default_threshold_paints_red_only_where_the_gradient_vanished(
        name: str, tmp_path: Path) -> None:
    """At 0.01 every edge of a healthy transformer was red, as on a broken deep sigmoid
    stack: a threshold on the absolute scale of dL/d(activation) (a mean over the batch)
    said nothing. The default is the diagnosis's vanishing threshold: a healthy run is all
    green; the deep sigmoid stack is red from its input up to where the flow breaks."""
    from gradviz.diagnose import Thresholds
    from gradviz.train import train

    assert render.DEFAULT_THRESHOLD == Thresholds().vanishing
    path = tmp_path / "run.json"
    train(name, steps=30, output=path, progress=False)
    g = build_graph(store.load(path))
    nodes, edges = render.vis_data(g, render.DEFAULT_THRESHOLD)
    red = [e for e in edges if e["color"]["color"] == render.PALETTE["below"]]
    if name == "deep-sigmoid":
        assert 0 < len(red) < len(edges)
        name_of = {n["id"]: n["name"] for n in nodes}
        first = min(edges, key=lambda e: g.nodes[name_of[e["from"]]]["order"])
        last = max(edges, key=lambda e: g.nodes[name_of[e["from"]]]["order"])
        assert first in red and last not in red  # (red at the input end)
    else:
        assert not red, [e["id"] for e in red]

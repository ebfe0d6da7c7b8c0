"""build_graph: the networkx graph carries the file's domain data, and nothing else."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import numpy as np
import orjson
import pytest

from gradviz import schema, store
from gradviz.graph import (
    ABSENT,
    DEPTH_MAX,
    GROUP,
    NONFINITE,
    OK,
    ROLLUP_ABOVE,
    auto_depth,
    build_graph,
    clean_findings,
    clean_meta,
    combine_series,
    depth_options,
    group_map,
    iter_edges,
    max_depth,
    node_status,
    positive_range,
    rollup,
    series,
    value_status,
)
from gradviz.schema import absent_array


def graph_of(path: Path) -> nx.DiGraph:
    return build_graph(store.load(path))


def v0(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "v0.json"
    p.write_bytes(orjson.dumps(doc))
    return p


def test_chain_nodes_edges_and_attributes(chain_file: Path) -> None:
    run = store.load(chain_file)
    g = build_graph(run)
    assert isinstance(g, nx.DiGraph)
    assert list(g.nodes) == ["fc1", "fc2", "fc3"]
    assert list(g.edges) == [("fc1", "fc2"), ("fc2", "fc3")]
    fc1 = g.nodes["fc1"]
    assert fc1["type"] == "Linear" and fc1["kind"] == "layer" and fc1["has_params"]
    assert fc1["param_count"] == 784 * 256 + 256
    assert fc1["order"] == 0
    assert fc1["params"]["weight"]["shape"] == [256, 784]
    assert fc1["params"]["weight"]["trainable"] is True
    assert fc1["gradient_norm"] == pytest.approx(run.node_history("fc1")[-1])
    assert fc1["params"]["bias"]["gradient_norm"] == pytest.approx(
        run.param_history("fc1", "bias")[-1]
    )
    assert fc1["status"] == OK
    edge = g.edges["fc1", "fc2"]
    assert edge["id"] == "fc1->fc2" and edge["via"] == ["relu1"] and edge["status"] == OK
    assert edge["gradient_norm"] == pytest.approx(run.edge_history("fc1->fc2")[-1])
    assert g.graph["steps"] == list(range(20))
    assert g.graph["loss"] == run.loss
    assert g.graph["meta"]["model"] == "MLP"
    assert g.graph["version"] == 1


def test_graph_holds_no_presentation(residual_file: Path) -> None:
    g = graph_of(residual_file)
    keys = set()
    for _, d in g.nodes(data=True):
        keys |= set(d)
    for _, _, d in g.edges(data=True):
        keys |= set(d)
    assert not keys & {"x", "y", "size", "color", "colour", "width", "title", "label"}


def test_junctions_and_residual_edges(residual_file: Path) -> None:
    g = graph_of(residual_file)
    add = g.nodes["add#0"]
    assert add["kind"] == "junction" and add["type"] == "add" and not add["has_params"]
    assert add["gradient_norm"] is None and add["status"] == OK  # judged by its activation
    assert set(g.predecessors("add#0")) == {"stem", "blocks.0.fc2"}
    assert g.number_of_nodes() == 1 + 6 * 3 + 1
    assert g.number_of_edges() == 6 * 4 + 1
    assert nx.is_directed_acyclic_graph(g)


def test_nonfinite_and_absent_statuses(nonfinite_file: Path) -> None:
    g = graph_of(nonfinite_file)
    assert g.nodes["embed"]["status"] == ABSENT  # frozen: no parameter gradient
    assert g.nodes["embed"]["gradient_norm"] is None
    assert g.nodes["embed"]["params"]["weight"]["trainable"] is False
    assert g.nodes["embed"]["params"]["weight"]["status"] == ABSENT
    assert g.nodes["fc_nan"]["status"] == NONFINITE
    assert math.isnan(g.nodes["fc_nan"]["gradient_norm"])
    assert g.nodes["fc_inf"]["status"] == NONFINITE
    assert g.nodes["cat#1"]["status"] == OK
    status = {d["id"]: d["status"] for _, _, d in iter_edges(g)}
    assert status == {"e1": ABSENT, "e2": OK, "e3": NONFINITE, "e4": NONFINITE, "e5": OK}
    # NaN, Inf and absent values never widen the scale ranges
    lo, hi = g.graph["norm_range"]
    assert 0 < lo <= hi < math.inf


def test_minimal_format_is_drawn(minimal_file: Path) -> None:
    g = graph_of(minimal_file)
    assert g.graph["version"] == 0 and g.graph["steps"] == [] and g.graph["loss"] == []
    assert list(g.nodes) == ["fc1", "fc2", "fc3"]
    assert g.nodes["fc1"]["type"] == "fc1" and g.nodes["fc1"]["kind"] == "layer"
    assert g.nodes["fc1"]["gradient_norm"] == pytest.approx(0.8044)
    assert g.nodes["fc1"]["param_count"] is None
    assert g.number_of_edges() == 2
    assert g.graph["norm_range"] == pytest.approx((0.0021, 0.8044))


def test_no_history_and_no_edges(make_file) -> None:
    g = graph_of(make_file("no_history"))
    assert g.graph["steps"] == [] and g.graph["norm_range"] is None
    assert all(d["status"] == ABSENT for _, d in g.nodes(data=True))
    g = graph_of(make_file("no_edges"))
    assert g.number_of_edges() == 0 and g.graph["edge_range"] is None
    assert g.graph["edge_ids"] == []


def test_names_are_kept_verbatim(evil_file: Path) -> None:
    g = graph_of(evil_file)
    assert "<img src=x onerror=alert(1)>" in g and "{{ 7*7 }}" in g
    assert g.nodes["{{ 7*7 }}"]["type"] == "<b>Bold</b>"
    assert g.graph["meta"]["nested"] == "{'x': 1}"  # nested metadata becomes text


def test_parallel_edges_and_cycles(tmp_path: Path) -> None:
    doc = {
        "nodes": [{"id": n, "gradient_norm": 0.5} for n in "abc"],
        "edges": [
            {"source": "a", "target": "b", "gradient_norm": 0.1},
            {"source": "a", "target": "b", "gradient_norm": 0.2},
            {"source": "b", "target": "c", "gradient_norm": 0.3},
            {"source": "c", "target": "b", "gradient_norm": 0.4},
            {"source": "c", "target": "c", "gradient_norm": 0.5},
        ],
    }
    g = graph_of(v0(tmp_path, doc))
    assert g.number_of_edges() == 4  # a->b once in the DiGraph...
    assert len(g.edges["a", "b"]["parallel"]) == 1
    every = iter_edges(g)  # ...but every file edge survives, in file order
    assert [d["gradient_norm"] for _, _, d in every] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert len({d["id"] for _, _, d in every}) == 5


def test_untrusted_fields_are_coerced(tmp_path: Path, chain_file: Path) -> None:
    doc = orjson.loads(chain_file.read_bytes())
    node = doc["nodes"][0]
    node["param_count"] = "many"
    node["order"] = True
    node["params"]["weight"].update(shape="big", numel=-3, trainable="yes")
    doc["edges"][0]["via"] = "relu"
    p = tmp_path / "odd.json"
    p.write_bytes(orjson.dumps(doc))
    d = graph_of(p).nodes["fc1"]
    assert d["order"] is None
    w = d["params"]["weight"]
    assert w["shape"] is None and w["numel"] is None and w["trainable"] is None
    assert d["param_count"] is None  # neither given nor computable from numel
    assert graph_of(p).edges["fc1", "fc2"]["via"] == []


def test_clean_findings() -> None:
    raw = [
        "junk",
        {"severity": "info", "layers": ["a"], "message": "later"},
        {
            "severity": "critical",
            "layers": ["a", "ghost", 3],
            "steps": [1, "x", 5, 7],
            "message": "<b>m</b>",
            "suggestions": ["s", 1],
            "kind": "nan",
        },
        {"severity": "apocalyptic", "layers": "a"},
    ]
    out = clean_findings(raw, {"a"})
    assert [f["severity"] for f in out] == ["critical", "info", "info"]
    first = out[0]
    assert first["layers"] == ["a"] and first["steps"] == [1, 5]
    assert first["message"] == "<b>m</b>" and first["suggestions"] == ["s"]
    assert out[2]["layers"] == [] and out[2]["kind"] == "finding"
    assert clean_findings({"not": "a list"}, set()) == []


def test_clean_meta() -> None:
    meta = clean_meta({"lr": 0.1, "steps": 3, "x": None, "inf": math.inf, "l": [1], "s": "t" * 900})
    assert meta["lr"] == 0.1 and meta["steps"] == 3 and meta["x"] is None
    assert meta["inf"] == "inf" and meta["l"] == "[1]"
    assert len(meta["s"]) == 500
    assert clean_meta(["not", "a", "dict"]) == {}


def test_status_helpers() -> None:
    assert value_status(None) == ABSENT
    assert value_status(0.0) == OK
    assert value_status(math.nan) == NONFINITE and value_status(-math.inf) == NONFINITE
    assert node_status(True, None, 1.0) == ABSENT
    assert node_status(False, None, 1.0) == OK
    assert node_status(True, 1.0, math.nan) == NONFINITE
    assert node_status(False, None, None) == ABSENT


def test_positive_range() -> None:
    import numpy as np

    a = np.array([0.0, 1e-3, math.nan, math.inf, 2.0], dtype=np.float32)
    lo, hi = positive_range([a, absent_array(3)])
    assert lo == pytest.approx(1e-3) and hi == 2.0
    assert positive_range([absent_array(2)]) is None
    assert positive_range([]) is None


def test_big_graph_builds(big_file: Path) -> None:
    g = graph_of(big_file)
    assert g.number_of_nodes() > 1000
    assert len(g.graph["edge_ids"]) == g.number_of_edges()


# -- roll-up by module depth -------------------------------------------------------------


def _sqss(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.sqrt(sum(v * v for v in present)) if present else None


def test_group_map_by_name_and_junctions(make_file) -> None:
    g = graph_of(make_file("transformer"))
    view = group_map(g, 2)
    assert view["blocks.1.attn.qkv"] == view["blocks.1.mlp.fc2"] == "blocks.1"
    assert view["add#3"] == view["add#4"] == "blocks.1"  # the block's residual adds
    assert view["add"] == "add"  # embed + pos: fed by two groups' worth, stays a junction
    assert view["embed"] == "embed" and view["head"] == "head"  # shallow names stay
    view3 = group_map(g, 3)
    assert view3["blocks.1.attn.qkv"] == view3["blocks.1.attn.proj"] == "blocks.1.attn"
    assert view3["blocks.1.ln1"] == "blocks.1.ln1"  # a lone layer is never a group of one
    # the attention's residual add goes with the layers feeding it: "attention with its skip"
    assert view3["add#3"] == "blocks.1.attn" and view3["add#4"] == "blocks.1.mlp"
    expanded = group_map(g, 2, ["blocks.1"])
    assert expanded["blocks.1.attn.qkv"] == "blocks.1.attn"
    assert expanded["blocks.1.ln1"] == "blocks.1.ln1"
    assert expanded["blocks.2.ln1"] == "blocks.2"
    assert group_map(g, 2, ["blocks.1", "blocks.1.attn"])["blocks.1.attn.qkv"] == (
        "blocks.1.attn.qkv"
    )


def test_rollup_norms_and_edges(make_file) -> None:
    run = store.load(make_file("transformer"))
    g = build_graph(run)
    v = rollup(g, run, 2)
    assert set(v.nodes) == {"embed", "pos", "add", "blocks.0", "blocks.1", "blocks.2",
                            "blocks.3", "ln_f", "head"}
    b1 = v.nodes["blocks.1"]
    members = [n for n in g.nodes if str(n).startswith("blocks.1.") or n in ("add#3", "add#4")]
    assert sorted(b1["members"]) == sorted(members)
    assert b1["kind"] == GROUP and b1["type"] == "6 layers, 2 junctions" and b1["has_params"]
    assert b1["param_count"] == sum(g.nodes[m]["param_count"] for m in members)
    layers = [m for m in members if g.nodes[m]["kind"] == "layer"]
    assert b1["gradient_norm"] == pytest.approx(_sqss([g.nodes[m]["gradient_norm"]
                                                      for m in layers]))
    assert b1["activation_grad_norm"] == pytest.approx(
        _sqss([g.nodes[m]["activation_grad_norm"] for m in members]))
    # one edge per pair of view nodes, its norm from the file edges it stands for
    assert set(v.edges) == {("embed", "add"), ("pos", "add"), ("add", "blocks.0"),
                            ("blocks.0", "blocks.1"), ("blocks.1", "blocks.2"),
                            ("blocks.2", "blocks.3"), ("blocks.3", "ln_f"), ("ln_f", "head")}
    e = v.edges["blocks.0", "blocks.1"]
    assert sorted(e["members"]) == ["add#2->add#3", "add#2->blocks.1.ln1"]
    norms = {d["id"]: d["gradient_norm"] for _, _, d in iter_edges(g)}
    assert e["gradient_norm"] == pytest.approx(_sqss([norms[m] for m in e["members"]]))
    assert v.edges["ln_f", "head"]["id"] == "ln_f->head"  # between two layers: as it was
    hidden = v.graph["view"]["hidden_edges"]
    kept = sum(len(d.get("members", [d["id"]])) for _, _, d in v.edges(data=True))
    assert hidden + kept == len(run.edges) and hidden == 4 * 8
    assert len(v.graph["edge_ids"]) == v.number_of_edges()
    # findings point at what is drawn: the group holding the layer
    assert v.graph["findings"][0]["layers"] == ["blocks.2"]
    assert rollup(g, run, None) is g


def test_rollup_series_over_steps(make_file) -> None:
    run = store.load(make_file("transformer"))
    g = build_graph(run)
    v = rollup(g, run, 3)
    attn = v.nodes["blocks.1.attn"]
    assert attn["members"] == ["blocks.1.attn.qkv", "blocks.1.attn.proj", "add#3"]
    got = series(run, v, ("node", "blocks.1.attn", "gradient_norm"))
    act = series(run, v, ("node", "blocks.1.attn", "activation_grad_norm"))
    for i in range(len(run.steps)):
        want = _sqss([run.node_history(m)[i] for m in attn["members"][:2]])
        assert float(got[i]) == pytest.approx(want, rel=1e-6)
        want = _sqss([run.node_history(m, "activation_grad_norm")[i] for m in attn["members"]])
        assert float(act[i]) == pytest.approx(want, rel=1e-6)
    assert float(got[-1]) == pytest.approx(attn["gradient_norm"], rel=1e-6)
    # ungrouped nodes and kept edges read the file's own series
    assert series(run, v, ("node", "head", "gradient_norm")) is run.array(
        ("node", "head", "gradient_norm"))
    lo, hi = v.graph["norm_range"]
    assert hi >= max(float(x) for x in got)


def test_combine_series_absent_and_nonfinite() -> None:
    absent = absent_array(1)[0]
    a = np.array([1.0, absent, absent, np.nan, 3.0], dtype="<f4")
    b = np.array([absent, 2.0, absent, 1.0, np.inf], dtype="<f4")
    out = combine_series([a, b], 5)
    assert out[0] == 1.0 and out[1] == 2.0
    assert schema.absent_mask(out).tolist() == [False, False, True, False, False]
    assert math.isnan(out[3]) and out[4] == math.inf
    assert schema.absent_mask(combine_series([], 3)).all()


def test_auto_depth_and_options(make_file, big_file: Path) -> None:
    g = graph_of(make_file("transformer"))
    assert auto_depth(g) is None  # small: every layer
    assert max_depth(g) == 4
    options = depth_options(g)
    assert options[-1] == (None, g.number_of_nodes())
    assert [d for d, _ in options] == [1, 2, 3, None]
    assert all(n < g.number_of_nodes() for d, n in options if d is not None)
    big = graph_of(big_file)  # ~1,000 nodes in 340 residual blocks of three
    assert big.number_of_nodes() > ROLLUP_ABOVE
    assert auto_depth(big) == 2  # one node per block, not one node for everything
    flat = nx.DiGraph()
    for i in range(ROLLUP_ABOVE + 5):  # names without dots: nothing to roll up
        flat.add_node(str(i), kind="layer")
    assert auto_depth(flat) is None
    deep = nx.DiGraph()  # names of up to 1,200 dotted parts: only the depths --depth offers
    for i in range(1200):
        deep.add_node("." * i + "x", kind="layer")
    options = depth_options(deep)
    assert max(d for d, _ in options if d is not None) <= DEPTH_MAX == 64


def test_rollup_keeps_odd_names_apart(tmp_path: Path) -> None:
    """A group name that is another node's id, or an edge id already taken, stays unique."""
    from conftest import _edge, junction, linear, write_recording

    nodes = {"a.x": linear("a.x", 0, 2, 2), "a.y": linear("a.y", 1, 2, 2),
             "a": junction("cat", 2), "c.p": linear("c.p", 3, 2, 2),
             "c.q": linear("c.q", 4, 2, 2)}
    edges = {"e1": _edge("a.x", "a"), "e2": _edge("a.y", "a"), "a->c": _edge("a", "c.p"),
             "e4": _edge("c.p", "c.q")}
    run = store.load(write_recording(tmp_path / "odd.json", nodes, edges, [0, 1],
                                     lambda k, s: 0.5))
    v = rollup(build_graph(run), run, 1)
    assert set(v.nodes) == {"a.x", "a.y", "a", "c"}  # no group "a": a junction has the name
    ids = {d["id"]: d for _, _, d in v.edges(data=True)}
    assert set(ids) == {"e1", "e2", "a->c'"}  # "a->c" is taken by the file edge inside it
    assert ids["a->c'"]["members"] == ["a->c"]


def test_combining_huge_norms_does_not_overflow() -> None:
    from gradviz.graph import _combine

    assert _combine([1e200]) == pytest.approx(1e200)  # (its square alone is inf)
    assert _combine([1.3e154, 1.3e154]) == pytest.approx(1.3e154 * 2**0.5)
    assert _combine([3.0, None, 4.0]) == 5.0 and _combine([None]) is None
    assert math.isinf(_combine([math.inf, 1.0])) and math.isnan(_combine([math.nan, 1.0]))

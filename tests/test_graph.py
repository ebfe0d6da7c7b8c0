"""build_graph: the networkx graph carries the file's domain data, and nothing else."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import orjson
import pytest

from gradviz import store
from gradviz.graph import (
    ABSENT,
    NONFINITE,
    OK,
    build_graph,
    clean_findings,
    clean_meta,
    iter_edges,
    node_status,
    positive_range,
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

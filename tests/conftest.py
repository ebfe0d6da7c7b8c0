"""Synthetic training_output.json files for the viewer tests, built without torch."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from gradviz import store

# The suite records in Python, whatever the machine has built: the native recorder's numbers
# differ from torch's norm op in the last bits, and tests compare histories bit for bit.
# tests/test_native.py turns it on where it tests it (subprocesses inherit this).
os.environ["GRADVIZ_NATIVE"] = "0"

Value = float | None
Spec = dict[str, Any]

EVIL_NAMES = (
    "<img src=x onerror=alert(1)>",
    "{{ 7*7 }}",
    "</script><script>alert(2)</script>",
    "__proto__",
)


def write_recording(
    path: Path,
    nodes: dict[str, Spec],
    edges: dict[str, Spec],
    steps: list[int],
    value: Callable[[tuple[str, ...], int], Value],
    meta: dict[str, Any] | None = None,
    findings: list[dict[str, Any]] | None = None,
    stats: tuple[str, ...] = (),
) -> Path:
    """Write a version-1 file; value(key, step) gives each series' value (None = absent).

    stats names forward statistics (gradviz.schema.STAT_SERIES) to record for every layer.
    """
    rec = store.Recording(
        meta=dict(meta or {}), nodes=nodes, edges=edges, findings=list(findings or [])
    )
    keys: list[tuple[str, ...]] = [("loss",)]
    for nid, info in nodes.items():
        if info["kind"] == "layer":
            keys.append(("node", nid, "gradient_norm"))
        keys.append(("node", nid, "activation_grad_norm"))
        keys.extend(("param", nid, p) for p in info.get("params", {}))
        if info["kind"] == "layer":
            keys.extend(("node", nid, k) for k in stats)
    keys.extend(("edge", eid) for eid in edges)
    if not steps:  # History.series() fails on columns that were never appended to
        keys = []
    cols = [rec.history.column(k) for k in keys]
    for step in steps:
        row = [(c, value(k, step)) for c, k in zip(cols, keys, strict=True)]
        present = [(c, v) for c, v in row if v is not None]
        rec.history.append(step, [c for c, _ in present], [v for _, v in present])
    path.write_bytes(store.dumps(rec.to_document()))
    return path


def linear(nid: str, order: int, n_in: int, n_out: int, bias: bool = True) -> Spec:
    """A Linear layer's static description, as the recorder writes it."""
    params = {"weight": {"shape": [n_out, n_in], "numel": n_in * n_out, "trainable": True}}
    if bias:
        params["bias"] = {"shape": [n_out], "numel": n_out, "trainable": True}
    count = sum(p["numel"] for p in params.values())
    return {
        "kind": "layer",
        "type": "Linear",
        "order": order,
        "params": params,
        "param_count": count,
    }


def junction(op: str, order: int) -> Spec:
    """A parameter-free merge point."""
    return {"kind": "junction", "type": op, "order": order, "params": {}, "param_count": 0}


def _edge(src: str, dst: str, via: list[str] | None = None) -> Spec:
    return {"source": src, "target": dst, "via": via or []}


def chain(path: Path, n_steps: int = 20) -> Path:
    """An MLP fc1 -> fc2 -> fc3 whose gradients shrink towards the input."""
    dims = [784, 256, 128, 10]
    nodes = {f"fc{i + 1}": linear(f"fc{i + 1}", i, dims[i], dims[i + 1]) for i in range(3)}
    edges = {"fc1->fc2": _edge("fc1", "fc2", ["relu1"]), "fc2->fc3": _edge("fc2", "fc3", ["relu2"])}
    depth = {"fc1": 0, "fc2": 1, "fc3": 2, "fc1->fc2": 0, "fc2->fc3": 1}

    def value(key: tuple[str, ...], step: int) -> Value:
        decay = 1.0 / (1 + step)
        if key == ("loss",):
            return 2.3 * math.exp(-step / 8) + 0.1
        d = depth[key[1]]
        return 0.5 * 10.0 ** (d - 2) * (0.5 + decay) * (0.5 if key[-1] == "bias" else 1.0)

    meta = {"model": "MLP", "optimizer": "SGD", "lr": 0.1, "seed": 0}
    return write_recording(path, nodes, edges, list(range(n_steps)), value, meta)


def residual(
    path: Path,
    n_blocks: int = 6,
    n_steps: int = 30,
    every: int = 10,
    findings: bool = True,
    stats: bool = True,
) -> Path:
    """A residual MLP: stem, n blocks of fc1 -> fc2 joined by add junctions, and a head."""
    rng = np.random.default_rng(0)
    nodes: dict[str, Spec] = {"stem": linear("stem", 0, 784, 128)}
    edges: dict[str, Spec] = {}
    stream = "stem"
    order = 1
    for b in range(n_blocks):
        fc1, fc2, add = f"blocks.{b}.fc1", f"blocks.{b}.fc2", f"add#{b}"
        nodes[fc1] = linear(fc1, order, 128, 128)
        nodes[fc2] = linear(fc2, order + 1, 128, 128)
        nodes[add] = junction("add", order + 2)
        order += 3
        edges[f"{stream}->{fc1}"] = _edge(stream, fc1)
        edges[f"{fc1}->{fc2}"] = _edge(fc1, fc2, [f"blocks.{b}.act"])
        edges[f"{fc2}->{add}"] = _edge(fc2, add)
        edges[f"{stream}->{add}"] = _edge(stream, add)
        stream = add
    nodes["head"] = linear("head", order, 128, 10)
    edges[f"{stream}->head"] = _edge(stream, "head")
    scale = {nid: float(rng.uniform(0.3, 3.0)) for nid in list(nodes) + list(edges)}
    steps = list(range(0, n_steps * every, every))

    def value(key: tuple[str, ...], step: int) -> Value:
        t = step / max(steps[-1], 1)
        if key == ("loss",):
            return 2.3 * math.exp(-4 * t) + 0.05 + 0.02 * math.sin(step)
        name = key[1]
        if key[-1] == "dead_frac":
            return 0.05 + 0.4 * t * scale[name] / 3
        if key[-1] == "act_mean":
            return 0.1 * scale[name]
        # the blocks' first layers learn slowly: their edges dip under the threshold late on
        base = 0.004 if ".fc1" in name else 0.05
        v = base * scale[name] * (1.5 - t) * (1 + 0.2 * math.sin(step / 7 + scale[name]))
        return v * (0.3 if key[-1] == "bias" else 1.0)

    meta = {
        "model": "ResidualMLP",
        "optimizer": "AdamW",
        "lr": 3e-4,
        "seed": 0,
        "every": every,
        "torch_version": "2.13.0",
    }
    found = [
        {
            "kind": "vanishing",
            "severity": "warning",
            "layers": ["blocks.0.fc1", "blocks.1.fc1"],
            "steps": [steps[len(steps) // 2], steps[-1]],
            "message": "blocks.0.fc1 gradient norm fell below 1e-3",
            "suggestions": ["raise the learning rate of early blocks", "check the init"],
        },
    ]
    return write_recording(
        path,
        nodes,
        edges,
        steps,
        value,
        meta,
        found if findings else [],
        ("act_mean", "dead_frac") if stats else (),
    )


def nonfinite(path: Path) -> Path:
    """NaN and Inf norms, a frozen layer (all null), an absent edge and a junction."""
    nodes = {
        "embed": {
            **linear("embed", 0, 10, 16),
            "param_count": 160,
            "params": {"weight": {"shape": [16, 10], "numel": 160, "trainable": False}},
        },
        "fc_nan": linear("fc_nan", 1, 16, 16),
        "fc_inf": linear("fc_inf", 2, 16, 16),
        "cat#1": junction("cat", 3),
        "out": linear("out", 4, 32, 1),
    }
    edges = {
        "e1": _edge("embed", "fc_nan"),
        "e2": _edge("embed", "fc_inf"),
        "e3": _edge("fc_nan", "cat#1"),
        "e4": _edge("fc_inf", "cat#1"),
        "e5": _edge("cat#1", "out"),
    }

    def value(key: tuple[str, ...], step: int) -> Value:
        if key == ("loss",):
            return math.nan if step == 2 else 1.0 / (1 + step)
        name = key[1]
        if name == "embed" and key[0] in ("param", "node") and key[-1] != "activation_grad_norm":
            return None  # frozen: no parameter gradient at all
        if name in ("fc_nan", "e3") and step >= 1:
            return math.nan
        if name in ("fc_inf", "e4") and step >= 2:
            return math.inf
        if name == "e1":
            return None  # never reached by a gradient
        return 0.1 * (step + 1)

    return write_recording(path, nodes, edges, [0, 1, 2], value, {"model": "Broken"})


def evil(path: Path) -> Path:
    """Layer names, types, metadata and findings that try to run script or template code."""
    a, b, c, d = EVIL_NAMES
    nodes = {
        a: linear(a, 0, 4, 4),
        b: {**linear(b, 1, 4, 4), "type": "<b>Bold</b>"},
        c: linear(c, 2, 4, 4),
        d: {**linear(d, 3, 4, 4), "params": {"__proto__": {"shape": [4], "numel": 4}}},
    }
    edges = {
        f"{a}->{b}": _edge(a, b, ["<svg onload=alert(3)>"]),
        f"{b}->{c}": _edge(b, c),
        "constructor": _edge(c, d),
    }

    def value(key: tuple[str, ...], step: int) -> Value:
        return 0.5 + step

    meta = {"model": "<script>alert(4)</script>", "optimizer": "{{ config }}", "nested": {"x": 1}}
    findings = [
        {
            "kind": "<i>x</i>",
            "severity": "critical",
            "layers": [a],
            "steps": [0, 1],
            "message": "<img src=y onerror=alert(5)>",
            "suggestions": ["{{ 7*7 }}"],
        }
    ]
    return write_recording(path, nodes, edges, [0, 1], value, meta, findings)


def minimal(path: Path) -> Path:
    """The original project's minimal format (version 0)."""
    doc = {
        "nodes": [
            {"id": "fc1", "gradient_norm": 0.8044},
            {"id": "fc2", "gradient_norm": 0.5383},
            {"id": "fc3", "gradient_norm": 0.0021},
        ],
        "edges": [
            {"source": "fc1", "target": "fc2", "gradient_norm": 2.9235},
            {"source": "fc2", "target": "fc3", "gradient_norm": 0.004},
        ],
    }
    path.write_bytes(orjson.dumps(doc))
    return path


def no_edges(path: Path) -> Path:
    """Layers with history but no connections (a recorder that could not trace the graph)."""
    nodes = {"a": linear("a", 0, 2, 2), "b": linear("b", 1, 2, 2)}
    return write_recording(path, nodes, {}, [0, 1, 2], lambda k, s: 0.1 * (s + 1))


def no_history(path: Path) -> Path:
    """A version-1 file written before the first step: structure only, every value null."""
    nodes = {"a": linear("a", 0, 2, 2), "b": linear("b", 1, 2, 2), "add#1": junction("add", 2)}
    edges = {"a->add#1": _edge("a", "add#1"), "b->add#1": _edge("b", "add#1")}
    return write_recording(path, nodes, edges, [], lambda k, s: None)


def transformer(path: Path, n_blocks: int = 4, n_steps: int = 6) -> Path:
    """A pre-norm transformer: embed + pos -> add, blocks of ln1, attn.qkv, attn.proj, ln2,
    mlp.fc1, mlp.fc2 with two residual add junctions each, then ln_f and head."""
    nodes: dict[str, Spec] = {"embed": linear("embed", 0, 16, 32),
                              "pos": linear("pos", 1, 12, 32), "add": junction("add", 2)}
    edges = {"embed->add": _edge("embed", "add"), "pos->add": _edge("pos", "add")}
    order, stream = 3, "add"
    for b in range(n_blocks):
        names = [f"blocks.{b}.{n}" for n in ("ln1", "attn.qkv", "attn.proj", "ln2", "mlp.fc1",
                                             "mlp.fc2")]
        for n in names:
            nodes[n] = linear(n, order, 32, 32)
            order += 1
        add1, add2 = f"add#{2 * b + 1}", f"add#{2 * b + 2}"
        nodes[add1], nodes[add2] = junction("add", order), junction("add", order + 1)
        order += 2
        ln1, qkv, proj, ln2, fc1, fc2 = names
        for a, c in ((stream, ln1), (ln1, qkv), (qkv, proj), (proj, add1), (stream, add1),
                     (add1, ln2), (ln2, fc1), (fc1, fc2), (fc2, add2), (add1, add2)):
            edges[f"{a}->{c}"] = _edge(a, c, [f"blocks.{b}.mlp.act"] if a == fc1 else None)
        stream = add2
    nodes["ln_f"] = linear("ln_f", order, 32, 32)
    nodes["head"] = linear("head", order + 1, 32, 16)
    edges[f"{stream}->ln_f"] = _edge(stream, "ln_f")
    edges["ln_f->head"] = _edge("ln_f", "head")
    rank = {k: i for i, k in enumerate([*nodes, *edges])}

    def value(key: tuple[str, ...], step: int) -> Value:
        if key == ("loss",):
            return 3.0 / (1 + step)
        if key[1] == "blocks.1.attn.qkv" and key[-1] == "bias" and step % 2:
            return None  # absent now and then: a group stays present through its others
        r = rank[key[1]]
        return 0.001 * (1 + r % 7) * (1 + step) * (2.0 if key[-1] == "bias" else 1.0)

    findings = [{"kind": "vanishing", "severity": "warning", "layers": ["blocks.2.mlp.fc1"],
                 "steps": [0, n_steps - 1], "message": "blocks.2.mlp.fc1 is small",
                 "suggestions": []}]
    return write_recording(path, nodes, edges, list(range(n_steps)), value,
                           {"model": "Transformer"}, findings)


def big(path: Path, n_blocks: int = 340, n_steps: int = 5) -> Path:
    """A residual net of about a thousand nodes, for scale."""
    return residual(path, n_blocks=n_blocks, n_steps=n_steps, every=1, findings=False)


FACTORIES: dict[str, Callable[[Path], Path]] = {
    "chain": chain,
    "residual": residual,
    "nonfinite": nonfinite,
    "evil": evil,
    "minimal": minimal,
    "no_edges": no_edges,
    "no_history": no_history,
    "transformer": transformer,
    "big": big,
}


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    """make_file(kind, **options) writes one synthetic file in tmp_path and returns its path."""

    def make(kind: str, name: str | None = None, **options: Any) -> Path:
        return FACTORIES[kind](tmp_path / (name or f"{kind}.json"), **options)

    return make


@pytest.fixture
def chain_file(make_file: Callable[..., Path]) -> Path:
    """A three-layer MLP over 20 steps."""
    return make_file("chain")


@pytest.fixture
def residual_file(make_file: Callable[..., Path]) -> Path:
    """A six-block residual MLP with add junctions, recorded every 10 steps."""
    return make_file("residual")


@pytest.fixture
def nonfinite_file(make_file: Callable[..., Path]) -> Path:
    """NaN, Inf and absent values."""
    return make_file("nonfinite")


@pytest.fixture
def evil_file(make_file: Callable[..., Path]) -> Path:
    """Names that try to inject HTML, script or template code."""
    return make_file("evil")


@pytest.fixture
def minimal_file(make_file: Callable[..., Path]) -> Path:
    """The original minimal format."""
    return make_file("minimal")


@pytest.fixture(scope="session")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About a thousand nodes; written once per session."""
    return big(tmp_path_factory.mktemp("big") / "big.json")

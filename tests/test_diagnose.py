"""diagnose() on labeled runs of the demo models: each pathology found, on the right layer;
healthy runs get no warning."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

import gradviz
from gradviz import store, train
from gradviz.diagnose import Thresholds, diagnose, format_report, worst

_cache: dict[tuple, gradviz.Run] = {}


def recorded(model: str, steps: int = 150, **kw) -> gradviz.Run:
    key = (model, steps, tuple(sorted(kw.items())))
    if key not in _cache:
        _cache[key] = train.train(model, steps=steps, output=None, device="cpu",
                                  progress=False, **kw).run
    return _cache[key]


def kinds(findings, severities=("critical", "warning")) -> dict[str, dict]:
    return {f["kind"]: f for f in findings if f["severity"] in severities}


def test_deep_sigmoid_vanishes_towards_the_input() -> None:
    f = kinds(diagnose(recorded("deep-sigmoid")))["vanishing"]
    assert f["severity"] == "critical"
    assert f["layers"][0] == "layers.0"
    assert f["evidence"]["first_last_ratio"] < 1e-6
    assert 0 < f["evidence"]["decay_per_layer"] < 0.5  # shrinks several-fold per layer
    assert any("ReLU" in s for s in f["suggestions"])
    assert any("residual" in s for s in f["suggestions"])


def test_deep_linear_explodes() -> None:
    f = kinds(diagnose(recorded("deep-linear")))["exploding"]
    assert f["severity"] == "critical"
    assert "layers.0" in f["layers"]
    above = f["evidence"]["above_threshold"]
    assert above["layers.0"] > 100 and max(above.values()) > 1e4  # critical: > 100 x 100
    assert any("clip_grad_norm_" in s for s in f["suggestions"])


def test_negative_biases_kill_relus() -> None:
    f = kinds(diagnose(recorded("dead-relu")))["dead-relu"]
    assert f["layers"][0] == "fc1"
    assert f["evidence"]["dead_fraction"]["fc1"] > 0.9
    assert any("LeakyReLU" in s for s in f["suggestions"])


def test_large_weights_saturate_sigmoids() -> None:
    f = kinds(diagnose(recorded("saturating")))["saturation"]
    assert f["layers"][0] == "fc1"
    assert f["evidence"]["saturated_fraction"]["fc1"] > 0.5


def test_huge_learning_rate_gives_non_finite_first_at_the_output() -> None:
    findings = diagnose(recorded("mlp", steps=30, lr=1e4, optimizer="sgd"))
    f = kinds(findings)["non-finite"]
    assert f["severity"] == "critical" and findings[0] is f  # ranked first
    assert f["evidence"]["first_layer"] == "fc3"  # backward order: the output layer first
    run = recorded("mlp", steps=30, lr=1e4, optimizer="sgd")
    first = f["evidence"]["first_step"]
    assert all(math.isfinite(v) for v in run.node_history("fc3")[:first])
    assert not math.isfinite(run.node_history("fc3")[first])
    assert any("learning rate" in s and "1000" in s for s in f["suggestions"])


def test_unused_layer_gets_no_gradient() -> None:
    f = kinds(diagnose(recorded("unused", steps=20)))["no-gradient"]
    assert f["layers"] == ["aux"] and f["severity"] == "warning"


@pytest.mark.parametrize("model", ["mlp", "residual", "transformer", "cnn"])
def test_healthy_runs_have_no_warnings(model: str) -> None:
    findings = diagnose(recorded(model))
    assert worst(findings) in (None, "info"), format_report(findings)


def test_thresholds_are_settable() -> None:
    run = recorded("dead-relu")
    assert "dead-relu" not in kinds(diagnose(run, Thresholds(dead=1.0)))
    run = recorded("deep-linear")
    assert "exploding" not in kinds(diagnose(run, Thresholds(exploding=1e30, depth_ratio=1e30)))


def _synthetic(loss: list[float], norms: dict[str, list[float | None]]) -> gradviz.Run:
    rec = store.Recording()
    for i, nid in enumerate(norms):
        rec.nodes[nid] = {"kind": "layer", "type": "Linear", "param_count": 1, "order": i,
                          "params": {"weight": {"shape": [1], "numel": 1, "trainable": True}}}
    h = rec.history
    for step, lv in enumerate(loss):
        cols, vals = [h.column(("loss",))], [lv]
        for nid, xs in norms.items():
            if xs[step] is not None:
                cols += [h.column(("node", nid, "gradient_norm")),
                         h.column(("param", nid, "weight"))]
                vals += [xs[step], xs[step]]
        h.append(step, cols, vals)
    doc = rec.to_document()
    return store.Run(doc, doc["version"])


def test_loss_spikes_and_norm_jumps_are_unstable() -> None:
    n = 60
    loss = [2.0 - 0.02 * i for i in range(n)]
    loss[40] = 5.0  # a spike back above the starting loss
    norm = [1.0] * n
    norm[30] = 50.0  # one step with 50x the usual gradient
    findings = [f for f in diagnose(_synthetic(loss, {"a": norm, "b": [1.0] * n}))
                if f["kind"] == "unstable"]
    spike = next(f for f in findings if "spiked" in f["message"])
    jump = next(f for f in findings if "jumped" in f["message"])
    assert spike["steps"][0] == 40
    assert jump["layers"] == ["a"] and jump["steps"][0] == 30
    calm = diagnose(_synthetic([2.0 - 0.02 * i for i in range(n)], {"a": [1.0] * n}))
    assert calm == []


def test_oscillating_loss_is_unstable() -> None:
    loss = [1.0 + (0.8 if i % 2 else -0.8) for i in range(60)]
    findings = diagnose(_synthetic(loss, {"a": [1.0] * 60}))
    assert any(f["kind"] == "unstable" and "oscillates" in f["message"] for f in findings)


def test_report_text() -> None:
    assert format_report([]) == "gradient flow looks healthy: no findings"
    text = format_report(diagnose(recorded("deep-sigmoid")))
    assert text.startswith("CRITICAL vanishing")
    assert "try:" in text


def test_frozen_layers_are_info_only() -> None:
    rec = _synthetic([1.0] * 5, {"a": [1.0] * 5, "b": [None] * 5})
    rec.nodes[1]["params"]["weight"]["trainable"] = False
    findings = diagnose(rec)
    got = [(f["kind"], f["severity"], f["layers"]) for f in findings]
    assert got == [("frozen", "info", ["b"])]


def test_diagnose_needs_no_torch() -> None:
    code = ("import sys, gradviz.diagnose; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

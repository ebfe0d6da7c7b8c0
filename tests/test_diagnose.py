"""diagnose() on labeled runs of the demo models: each pathology found, on the right layer;
healthy runs get no warning."""

from __future__ import annotations

import math
import re
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


def test_dead_relus_come_before_the_vanishing_gradient_they_cause() -> None:
    """The dead-relu demo's report led with "vanishing" and its cure for deep stacks
    ("residual connections") on a 3-layer MLP, the dead ReLUs second. The cause comes
    first; the symptom names it and takes its cures. A decay with depth (plain, 50 ReLU
    blocks, some units dead) keeps its own cures."""
    found = diagnose(recorded("dead-relu"))
    assert [f["kind"] for f in found[:2]] == ["dead-relu", "vanishing"]
    van = found[1]
    assert van["message"].endswith("; the dead ReLUs after fc1, fc2 stop it (see dead-relu)")
    assert van["evidence"]["explained_by"] == "dead-relu"
    assert van["suggestions"][:3] == found[0]["suggestions"][:3]
    assert not any("residual" in s for s in van["suggestions"][:3])
    assert found[0]["message"].endswith("; 2 layers)")
    text = format_report(found)
    assert text.index("dead-relu") < text.index("vanishing")
    plain = {f["kind"]: f for f in diagnose(recorded("plain", 60))}
    assert "explained_by" not in plain["vanishing"]["evidence"]
    assert plain["vanishing"]["suggestions"][0].startswith("residual connections")


def test_one_layer_is_one_layer() -> None:
    f = kinds(diagnose(recorded("saturating")))["saturation"]
    assert f["message"].endswith("(1 layer)"), f["message"]


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


def test_loss_oscillating_around_0_after_a_negative_start() -> None:
    """A loss that can go negative (a log-likelihood, say) may settle around 0: the share
    of its level is no number then (the reference divided by 0)."""
    loss = [-5.0] * 30 + [1.0 if i % 2 else -1.0 for i in range(30)]  # later median: 0
    run = _synthetic(loss, {"a": [1.0] * 60})
    findings = diagnose(run)
    f = next(f for f in findings if "oscillates" in f["message"])
    assert f["message"] == ("the loss oscillates: it changes by 2 (around a level of 0) from "
                            "step to step, up and down")
    assert f["evidence"]["level"] == 0 and f["steps"] == [30, 59]
    assert "oscillates" in format_report(findings)
    assert assert_same(run)[:2] == ("raised", "ZeroDivisionError")


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


# -- the vectorised diagnose() gives exactly what the per-step loops gave ------------------
#
# tests/_diagnose_reference.py is diagnose.py as it was before it worked on whole matrices
# (a Python loop over steps and layers, 10 s on 10,000 steps x 500 layers). Same findings,
# in the same order, with the same texts and the same numbers to the last bit: compared by
# repr, which also tells 0.0 from -0.0, a numpy float from a Python one, and key order.

import _diagnose_reference as reference  # noqa: E402
import numpy as np  # noqa: E402

from gradviz import schema  # noqa: E402


def outcome(module, run: gradviz.Run, t: Thresholds | None = None) -> tuple:
    """What diagnose gives on run, as comparable text; the error where it raises. For
    gradviz.diagnose: its checks, before a cause is set before the symptom it explains
    (diagnose._explained, tested on its own)."""
    checks = getattr(module, "_checks", module.diagnose)
    try:
        findings = checks(run, t)
    except Exception as e:  # the reference raises on a few odd inputs
        return ("raised", type(e).__name__, str(e))
    got = (repr(findings), module.format_report(findings), module.format_report(findings, 2),
           module.worst(findings))
    if module is reference:  # (fixed since: "1 layers")
        got = tuple(re.sub(r"\b1 (layer|frozen layer)s\b", r"1 \1", x)
                    if isinstance(x, str) else x for x in got)
    return got


# The reference's crashes, fixed since: what the new code reports instead.
FIXED = {
    # a NaN/Inf only in activation gradients: the reference read the last of no steps
    "IndexError": "'message': 'NaN/Inf activation gradients from step",
    # a loss oscillating around 0 after a negative start: the reference divided by 0
    "ZeroDivisionError": "(around a level of 0) from step to step",
}


def assert_same(run: gradviz.Run, t: Thresholds | None = None, what: str = "") -> tuple:
    """The reference's outcome, which the new code gives too; where the reference raised,
    the new code must not, and reports what the reference crashed on (FIXED)."""
    new, old = outcome(sys.modules[diagnose.__module__], run, t), outcome(reference, run, t)
    if old[0] == "raised":
        assert new[0] != "raised", (what, new)
        assert old[1] in FIXED, (what, old)
        assert FIXED[old[1]] in new[0], (what, new[0])
        return old
    assert new == old, what
    return old


RECORDED = [("deep-sigmoid", 150, {}), ("deep-linear", 150, {}), ("dead-relu", 150, {}),
            ("saturating", 150, {}), ("mlp", 30, {"lr": 1e4, "optimizer": "sgd"}),
            ("unused", 20, {}), ("mlp", 150, {}), ("residual", 150, {}),
            ("transformer", 150, {}), ("cnn", 150, {})]


@pytest.mark.parametrize(("model", "steps", "kw"), RECORDED,
                         ids=[f"{m}-{s}-{len(kw)}" for m, s, kw in RECORDED])
def test_same_findings_as_the_per_step_loops_on_recorded_runs(model, steps, kw) -> None:
    run = recorded(model, steps, **kw)
    for t in (None, Thresholds(dead=1.0), Thresholds(exploding=1e30, depth_ratio=1e30),
              Thresholds(vanishing=1e-2, exploding=1.0, dead=0.0, saturated=0.0, jump=1.5,
                         depth_ratio=2.0, spike=1.1)):
        assert_same(run, t, f"{model} {t}")


# Values a check compares against, and their float32 neighbours: a float32 value that
# rounds across a threshold must land on the same side in both.
_EDGES = [0.0, -0.0, 1e-45, 1e-13, 1e-12, 1e-7, 1e-5, 0.1, 0.2, 0.5, 0.9, 1.0, 3.0, 10.0,
          100.0, 1e4, 3e38, math.inf, -math.inf, math.nan]
EDGES = sorted({float(v) for x in _EDGES for v in np.float32(x) * np.array(
    [1, 1 + 2 ** -23, 1 - 2 ** -24], dtype=np.float32)} | {-0.0}, key=repr)


def random_run(seed: int) -> tuple[gradviz.Run, Thresholds | None]:
    """A small recorded run with a random mix of pathologies, and maybe other thresholds."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 3, 10, 19, 20, 21, 25, 40, 60, 120, 250]))
    depth = int(rng.choice([0, 1, 2, 4, 5, 6, 8, 12, 30]))
    flag = lambda p: bool(rng.random() < p)  # noqa: E731

    def noisy(shape: tuple[int, ...], sigma: float) -> np.ndarray:
        return np.exp(rng.normal(0, sigma, shape))

    steps = np.arange(n)[:, None]
    # gradient norms: a level per layer (trending with depth or not), noise, growth over
    # the steps, jumps, ties (rounded values), values at the thresholds, NaN/Inf, zeros
    slope = float(rng.choice([0.0, 0.0, rng.uniform(-3, 3)]))
    level = 10.0 ** (rng.uniform(-9, 4) + slope * np.arange(depth))[None, :]
    grad = level * noisy((n, depth), float(rng.choice([0.0, 0.01, 0.3, 1.5])))
    if flag(0.3):
        grad *= np.exp(rng.uniform(0, 12) * steps / max(n, 1))
    if flag(0.3):
        grad = np.round(grad, int(rng.integers(0, 3)))
    if flag(0.4):
        grad[rng.random((n, depth)) < 0.05] *= rng.choice([20.0, 1e3, 1e-3])
    if flag(0.4):
        pick = rng.random((n, depth)) < rng.choice([0.02, 0.2])
        grad[pick] = rng.choice(EDGES, size=int(pick.sum()))
    if flag(0.2) and n > 2:  # NaN from some step on, from the output backwards
        first = int(rng.integers(0, n))
        grad[first:, int(rng.integers(0, depth + 1)):] = rng.choice([math.nan, math.inf])
    with np.errstate(invalid="ignore"):  # finite values stay finite in float32
        grad = np.where(np.isfinite(grad), np.clip(grad, -3e38, 3e38), grad)
        act = grad * rng.uniform(0.5, 2) if flag(0.7) else None
        if act is not None:
            act = np.where(np.isfinite(act), np.clip(act, -3e38, 3e38), act)
    if act is not None and flag(0.15):  # non-finite only in activation gradients
        act[rng.random((n, depth)) < 0.1] = math.nan
    # absent values: at random, before a layer appears, or never (an unused layer)
    absent = rng.random((n, depth)) < float(rng.choice([0.0, 0.0, 0.1, 0.5]))
    for i in range(depth):
        if flag(0.1):
            absent[: int(rng.integers(0, n + 1)), i] = True
        if flag(0.05):
            absent[:, i] = True
    stats: dict[str, np.ndarray] = {}
    for key in ("dead_frac", "saturated_frac"):
        if flag(0.4):
            stats[key] = rng.uniform(0, 1, (n, depth)) ** rng.uniform(0.2, 4)
            if flag(0.3):
                stats[key] = np.round(stats[key], 1) * rng.choice([1, -1], (n, depth))
            stats[key][rng.random((n, depth)) < 0.2] = math.nan
    # the loss: falling, oscillating, spiking, sometimes negative or 0; NaN and absent too
    loss = 0.1 + 2.0 * np.exp(-steps[:, 0] / max(n / 4, 1))
    if flag(0.3):
        loss = loss + rng.choice([0.05, 0.8]) * (-1.0) ** steps[:, 0]
    if flag(0.3):
        loss[rng.random(n) < 0.1] *= rng.choice([5.0, 50.0])
    if flag(0.3):
        loss = loss * noisy((n,), 0.3)
    if flag(0.1):
        loss = loss - rng.choice([0.1, 3.0])
    if flag(0.1):
        loss = np.round(loss)
    if flag(0.2):
        loss[rng.random(n) < 0.1] = rng.choice([math.nan, math.inf, 0.0, -0.0])
    loss_absent = rng.random(n) < float(rng.choice([0.0, 0.0, 0.2, 1.0]))

    rec = store.Recording()
    if flag(0.5):
        rec.meta["lr"] = float(rng.choice([1e-3, 0.1, 3.0]))
    ids = [f"layers.{i}" for i in range(depth)]
    acts = ["ReLU", "Sigmoid", "Tanh", "GELU", None]
    for i, nid in enumerate(ids):
        params = {"weight": {"shape": [4, 4], "numel": 16,
                             "trainable": not flag(0.05)}}
        if flag(0.5):
            params["bias"] = {"shape": [4], "numel": 4, "trainable": True}
        node: dict = {"kind": "layer", "type": "Linear", "param_count": 20,
                      "params": {} if flag(0.05) else params}
        if not flag(0.05):  # a node without an order sorts last
            node["order"] = int(rng.permutation(depth)[i]) if flag(0.2) else 2 * i
        if (a := acts[int(rng.integers(0, len(acts)))]) is not None:
            node["activation"] = a
        rec.nodes[nid] = node
        if flag(0.1):
            rec.nodes[f"add#{i}"] = {"kind": "junction", "type": "add", "param_count": 0,
                                     "params": {}, "order": 2 * i + 1}
    h = rec.history
    first_step, every = int(rng.choice([0, 1, 100])), int(rng.choice([1, 1, 10]))
    for s in range(n):
        cols, vals = [], []
        if not loss_absent[s]:
            cols.append(h.column(("loss",)))
            vals.append(loss[s])
        for i, nid in enumerate(ids):
            if absent[s, i]:
                continue
            cols += [h.column(("node", nid, "gradient_norm"))]
            vals += [grad[s, i]]
            for p in rec.nodes[nid]["params"]:
                cols.append(h.column(("param", nid, p)))
                vals.append(grad[s, i])
            if act is not None and not flag(0.05):
                cols.append(h.column(("node", nid, "activation_grad_norm")))
                vals.append(act[s, i])
            for key, xs in stats.items():
                if not math.isnan(xs[s, i]):
                    cols.append(h.column(("node", nid, key)))
                    vals.append(xs[s, i])
        if flag(0.02) and s == n - 1:
            cols, vals = [], []
        h.append(first_step + every * s, cols, vals)
    if flag(0.2):  # GradScaler marked the non-finite steps as skipped (or some of them)
        bad = [st for s, st in enumerate(h.steps)
               if not np.isfinite(grad[s][~absent[s]]).all()
               or not (loss_absent[s] or math.isfinite(loss[s]))]
        rec.meta["skipped_steps"] = bad[: len(bad) - int(flag(0.3))]
    doc = rec.to_document()
    t = None
    if flag(0.3):
        t = Thresholds(vanishing=float(rng.choice([1e-7, 1e-3, 0.0])),
                       exploding=float(rng.choice([100.0, 1.0, 1e4])),
                       dead=float(rng.choice([0.2, 0.0, 0.9])),
                       saturated=float(rng.choice([0.5, 0.0, 1.0])),
                       jump=float(rng.choice([10.0, 2.0, 1.0])),
                       depth_ratio=float(rng.choice([1e3, 10.0, 1.0])),
                       spike=float(rng.choice([3.0, 1.5, 1.0])))
    return store.Run(doc, doc["version"]), t


def test_same_findings_as_the_per_step_loops_on_random_runs() -> None:
    seen: set[str] = set()
    for seed in range(400):
        run, t = random_run(seed)
        old = assert_same(run, t, f"seed {seed}")
        if old[0] == "raised":
            seen.add(f"raised {old[1]}")
            continue
        for f in eval(old[0], {"nan": math.nan, "inf": math.inf}):  # repr back to findings
            seen.add(f["kind"])
            seen.add(f"{f['kind']} {f['severity']}")
            seen.update(w for w in ("spiked", "oscillates", "jumped", "grew", "shrinks",
                                    "grows about") if w in f["message"])
    # the runs exercise every check, and the input the reference crashed on (a NaN only in
    # activation gradients), which assert_same checks the new code reports
    wanted = {"non-finite critical", "non-finite info", "exploding critical",
              "exploding warning", "vanishing critical", "vanishing warning",
              "dead-relu critical", "dead-relu warning", "saturation", "no-gradient",
              "frozen", "spiked", "oscillates", "jumped", "grew", "shrinks", "grows about",
              "raised IndexError"}
    assert wanted <= seen, wanted - seen


def test_same_findings_on_files_without_history() -> None:
    """The original format (version 0) and a file with no steps: top-level values only."""
    enc = schema.encode_value
    for seed in range(60):
        rng = np.random.default_rng(seed)
        pick = lambda xs, rng=rng: xs[int(rng.integers(len(xs)))]  # noqa: E731
        nodes = []
        for i in range(int(rng.integers(0, 9))):
            node: dict = {"id": f"l{i}", "order": i,
                          "gradient_norm": enc(pick([None, *EDGES, 1e-9, 1e300, 5.0]))}
            if rng.random() < 0.5:
                node["activation_grad_norm"] = enc(pick([None, 1.0, math.nan]))
            if rng.random() < 0.5:
                node["stats"] = {"dead_frac": enc(pick([None, 0.1, 0.5, 0.95])),
                                 "saturated_frac": enc(pick([None, 0.4, 0.7]))}
            if rng.random() < 0.7:
                node["params"] = {"weight": {"gradient_norm": node["gradient_norm"],
                                             "trainable": bool(rng.random() < 0.9)}}
            nodes.append(node)
        assert_same(store.Run({"nodes": nodes, "edges": []}, 0), what=f"seed {seed}")
        doc = store.Recording(nodes={n["id"]: {"kind": "layer", "type": "Linear"}
                                     for n in nodes}).to_document()
        assert_same(store.Run(doc, doc["version"]), what=f"seed {seed}, no steps")


def test_zeros_of_both_signs_keep_their_order_in_medians() -> None:
    """0.0 and -0.0 compare equal: a median is whichever zero sorted() leaves in the middle
    (np.partition leaves 0.0 in the middle of this later half, sorted() -0.0)."""
    norms: list[float | None] = [*[1.0] * 7, 0.0, 0.0, 1.0, 1.0, 0.0, -0.0, 0.0]
    f = assert_same(_synthetic([1.0] * 14, {"a": norms}))
    assert "gradient norm -0 (<" in f[1]
    for a, b in ((-0.0, 0.0), (0.0, -0.0), (-0.0, -0.0)):
        pair: list[float | None] = [a, b]
        run = _synthetic([1.0] * 8, {f"l{i}": pair * 4 for i in range(6)})
        assert "vanishing" in assert_same(run)[0]


def test_growth_of_exactly_100x_over_the_steps_is_found() -> None:
    """At the 100x boundary the totals must be exact: a rough sum may not decide it."""
    norms: list[float | None] = [*[1.0] * 4, *(1.0 + 3 * i for i in range(1, 33)), *[100.0] * 4]
    f = assert_same(_synthetic([1.0] * 40, {"a": norms}))
    assert "total norm grew 1e+02x" in f[1]


def _activation_nan_run(bad: set[int], skipped: list[int] | None = None) -> gradviz.Run:
    """Layers a (with a weight) and b (none) over 5 steps: finite loss and parameter
    gradients, b's activation gradient NaN at the steps in bad."""
    rec = store.Recording()
    rec.nodes["a"] = {"kind": "layer", "type": "Linear", "order": 0,
                      "params": {"weight": {"shape": [1], "numel": 1, "trainable": True}}}
    rec.nodes["b"] = {"kind": "layer", "type": "ReLU", "order": 1, "params": {}}
    if skipped is not None:
        rec.meta["skipped_steps"] = skipped
    h = rec.history
    for s in range(5):
        h.append(10 + s, [h.column(("loss",)), h.column(("node", "a", "gradient_norm")),
                          h.column(("param", "a", "weight")),
                          h.column(("node", "a", "activation_grad_norm")),
                          h.column(("node", "b", "activation_grad_norm"))],
                 [1.0, 1.0, 1.0, 1.0, math.nan if s in bad else 1.0])
    doc = rec.to_document()
    return store.Run(doc, doc["version"])


def test_non_finite_only_in_activation_gradients_is_reported() -> None:
    """A NaN activation gradient with finite parameter gradients and loss (the reference
    crashed here with an IndexError on an empty list of affected steps): a critical
    non-finite finding naming the first and last step, and the layer, where it went bad."""
    run = _activation_nan_run({1, 3})
    assert outcome(reference, run)[:2] == ("raised", "IndexError")
    findings = diagnose(run)
    f = kinds(findings)["non-finite"]
    assert findings[0] is f and f["severity"] == "critical"
    assert f["layers"] == ["b"] and f["steps"] == [11, 13]
    assert f["evidence"] == {"first_step": 11, "first_layer": "b", "steps_affected": 2,
                             "loss_at_first": 1.0, "activation_gradients_only": True}
    assert f["message"] == ("NaN/Inf activation gradients from step 11 first at b (in "
                            "backward order), 2 steps affected; parameter gradients and the "
                            "loss stayed finite")
    assert any("learning rate" in s for s in f["suggestions"])
    assert format_report(findings).startswith("CRITICAL non-finite  b (steps 11-13): NaN/Inf")
    assert_same(run)  # and the comparison with the reference accepts it
    # steps GradScaler skipped: info, as for any non-finite gradient it skipped
    f = diagnose(_activation_nan_run({2}, skipped=[12]))[0]
    assert (f["kind"], f["severity"], f["steps"]) == ("non-finite", "info", [12, 12])


def test_same_findings_on_a_long_run() -> None:
    """Long enough that a quadratic or an off-by-one in the windows would show."""
    rng = np.random.default_rng(7)
    n, depth = 3000, 12
    norms = np.exp(rng.normal(-2, 1.0, (n, depth)))
    norms[rng.random((n, depth)) < 0.01] *= 100
    loss = list(2.0 * np.exp(-np.arange(n) / 800) + rng.normal(0, 0.05, n))
    run = _synthetic(loss, {f"l{i}": list(norms[:, i]) for i in range(depth)})
    assert "jumped" in assert_same(run)[0]


def test_report_wraps_to_a_terminal_and_stays_one_line_a_finding_elsewhere() -> None:
    """Report lines ran to 194 characters in an 80-column terminal. Wrapped, each line fits
    and goes on under its text; without a width (a pipe, a file) a finding is one line,
    for grep."""
    found = diagnose(recorded("dead-relu"))
    flat = format_report(found)
    wrapped = format_report(found, width=70)
    assert max(len(line) for line in flat.splitlines()) > 70
    assert all(len(line) <= 70 for line in wrapped.splitlines())
    starts = [line for line in wrapped.splitlines() if not line.startswith(" ")]
    assert [s.split()[:2] for s in starts] == [["CRITICAL", "dead-relu"],
                                               ["CRITICAL", "vanishing"]]
    assert " ".join(wrapped.split()) == " ".join(flat.split())  # (the same words)

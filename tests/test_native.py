"""The native recorder (gradviz/native.cpp): the Python recorder's numbers, without its cost.

Built once per machine (about 20 s) into the test session's cache; skipped where there is
no C++ compiler. Every test here runs a recorder with native=True and checks that it really
recorded natively (armed passes), so none passes by falling back to Python.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from autograd_reference import Reference, rel_close
from test_capture import Nested, Unrolled
from torch import nn

import gradviz
from gradviz import capture, demos, native

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler to build the native recorder")


@pytest.fixture(autouse=True)
def native_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("GRADVIZ_NATIVE")  # (conftest turns it off for the rest of the suite)
    if native.load(build_if_missing=True) is None:
        pytest.fail(f"the native recorder did not build: {native.why_not()}")
    yield


def data(name: str, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return demos.DEMOS[name].data(n, torch.Generator().manual_seed(seed))


def train(name: str, native_: bool, steps: int = 8,
          before: Callable[[int, nn.Module, gradviz.Recorder], None] | None = None,
          **opts) -> gradviz.Recorder:
    """steps recorded SGD steps of a demo, each on its own batch of 16 (before(step, model,
    recorder): a check run before each)."""
    torch.manual_seed(0)
    model = demos.DEMOS[name].build()
    x, y = data(name, 16 * steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradviz.record(model, None, native=native_, **opts) as rec:
        for i in range(steps):
            if before is not None:
                before(i, model, rec)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[16 * i:16 * i + 16]),
                                               y[16 * i:16 * i + 16])
            loss.backward()
            rec.step(loss)
            opt.step()
    return rec


def table(rec: gradviz.Recorder) -> dict[tuple, np.ndarray]:
    """Every series of the history, by key: one value per step (NaN where none)."""
    hist = rec.recording.history
    return {key: np.asarray(hist.series(key), dtype=np.float64) for key in hist.columns}


def assert_same(a: dict[tuple, np.ndarray], b: dict[tuple, np.ndarray], rel: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert (np.isnan(x) == np.isnan(y)).all(), key
        ok = ~np.isnan(x)
        np.testing.assert_allclose(y[ok], x[ok], rtol=rel, atol=0, err_msg=str(key))


@pytest.mark.parametrize("name", [n for n in demos.DEMOS if n != "lstm"])
def test_native_records_what_python_records(name: str) -> None:
    python, fast = train(name, False), train(name, True)
    assert python._nat is None
    # the first step is Python's (it learns the shape), every later one native
    assert (fast._nat.armed, fast._nat.missed) == (7, 0)
    assert fast.recording.history.steps == python.recording.history.steps == list(range(8))
    assert fast.recording.nodes == python.recording.nodes
    assert fast.recording.edges == python.recording.edges
    # torch's float32 norm kernel and the native loop differ in the last bits (the loop is
    # the more exact: see test_native_norm_is_exact); "plain" vanishes below 1e-20, where
    # torch's float32 squares underflow to 0 and the loop's do not, so it is compared with
    # float64 below instead
    if name != "plain":
        assert_same(table(python), table(fast), rel=5e-5)


def five_sgd_steps(build: Callable[[], nn.Module],
                   batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                   native_: bool) -> gradviz.Recorder:
    """Five recorded SGD steps of build(), each on batch(generator): (input, labels)."""
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with gradviz.record(model, None, native=native_) as rec:
        for _ in range(5):
            x, y = batch(g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.step(loss)
            opt.step()
    return rec


def test_layers_that_call_child_layers_record_natively_what_python_records() -> None:
    """The input gradient of a layer that calls child layers is summed from ports in its
    children's regions and its own: the native recorder hooks the same ports."""
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(8, 4, generator=g, requires_grad=True) * 2, torch.arange(8) % 3

    python, fast = (five_sgd_steps(Nested, batch, n) for n in (False, True))
    assert (fast._nat.armed, fast._nat.missed) == (4, 0)
    assert fast.recording.edges == python.recording.edges
    a, b = table(python), table(fast)
    assert not np.isnan(a[("node", "enc", "input_grad_norm")]).any()
    assert_same(a, b, rel=5e-5)


def test_an_output_the_layer_also_reads_is_measured_natively_as_in_python() -> None:
    """An unrolled LSTMCell's c: its node's grad_output less the inner ports' gradients, a
    group with a part taken off, in C++ as in Python."""
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(4, 3, 8, generator=g), torch.arange(4)

    python, fast = (five_sgd_steps(Unrolled, batch, n) for n in (False, True))
    assert (fast._nat.armed, fast._nat.missed) == (4, 0)
    assert fast.recording.edges == python.recording.edges
    assert set(python.recording.edges) == {"p->cell", "cell->cell", "cell->h"}
    assert_same(table(python), table(fast), rel=5e-5)


class ManyOps(nn.Module):
    """A graph of more kinds of autograd node than the native recorder's class table holds
    at first (it grows): forty-odd elementwise functions of one layer's output, summed."""

    OPS = ("sin", "cos", "exp", "tanh", "sigmoid", "relu", "abs", "neg", "log1p", "sqrt",
           "square", "atan", "asinh", "erf", "expm1", "sinh", "cosh", "reciprocal", "rsqrt",
           "tan", "acos", "asin", "atanh", "erfinv", "lgamma", "digamma", "log", "log2",
           "log10", "exp2", "deg2rad", "rad2deg", "sinc")
    F = ("softplus", "gelu", "silu", "elu", "selu", "mish", "hardtanh", "logsigmoid", "celu",
         "hardswish", "hardsigmoid", "relu6", "softsign", "tanhshrink")

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.fc1(x)) * 0.5 + 0.1  # (in every function's domain)
        fns = [getattr(torch, o) for o in self.OPS] + [getattr(nn.functional, f) for f in self.F]
        return self.fc2(sum(f(z) for f in fns) / len(fns))


def test_native_learns_a_graph_of_many_node_kinds() -> None:
    def run(native_: bool) -> gradviz.Recorder:
        torch.manual_seed(0)
        model = ManyOps()
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        with gradviz.record(model, None, native=native_) as rec:
            for i in range(4):
                model.zero_grad()
                nn.functional.cross_entropy(model(x + 0.1 * i), y).backward()
                rec.step()
        return rec

    python, fast = run(False), run(True)
    assert (fast._nat.armed, fast._nat.missed) == (3, 0)
    assert_same(table(python), table(fast), rel=5e-5)


def test_native_keeps_tiny_gradients_that_torch_float32_loses() -> None:
    """The "plain" demo's early layers get gradients below 1e-20: torch's float32 norm gives
    0 or a value off by orders of magnitude there; the native loop gives float64's value."""
    torch.manual_seed(0)
    model = demos.DEMOS["plain"].build()
    x, y = data("plain", 16)
    with gradviz.record(model, None, native=True) as rec:
        for _ in range(3):  # (same batch, no update: every step has the same gradients)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
    assert rec._nat.armed == 2
    series = table(rec)
    tiny = 0
    for name, p in model.named_parameters():
        layer, pname = name.rsplit(".", 1)
        exact = float(p.grad.double().norm())
        got = series[("param", layer, pname)]
        assert got[2] == pytest.approx(exact, rel=1e-6), name  # native
        if exact < 1e-20:
            tiny += 1
    assert tiny > 10


@pytest.mark.parametrize("name", [n for n in demos.DEMOS if n != "lstm"])
def test_native_norms_equal_plain_autograd(name: str) -> None:
    torch.manual_seed(0)
    model = demos.DEMOS[name].build()
    x, y = data(name, 16)
    ref = Reference(model, x, y)
    with gradviz.record(model, None, native=True) as rec:
        for _ in range(3):  # step 0 learns, steps 1 and 2 are native (the same batch)
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.step(loss)
    assert rec._nat.armed == 2
    run = rec.to_run()
    checked = 0
    for node in (n for n in run.nodes if n["kind"] == "layer"):
        nid = node["id"]
        tol = 1e-4  # (torch's float32 norm, in the reference, is off by up to ~2e-5)
        want = ref.layer_norm(nid)
        if want is not None and want < 1e-18:
            continue  # (where float32 squares underflow, torch's is off: see the test above)
        assert rel_close(node["gradient_norm"], ref.layer_norm(nid), tol), nid
        for pname, want in ref.param_norms(nid).items():
            assert rel_close(node["params"][pname]["gradient_norm"], want, tol), f"{nid}.{pname}"
        assert rel_close(node["activation_grad_norm"], ref.activation_norm(nid), tol), nid
        checked += node["activation_grad_norm"] is not None
    assert checked > 0
    assert rel_close(run.loss[-1], float(ref.loss.detach()))


def test_lstm_stays_in_python() -> None:
    """The LSTM's h and c come from nodes the loss never reaches through the model's output,
    so the native recorder cannot follow its plan: Python records every step."""
    rec = train("lstm", True, steps=4)
    assert rec._nat.plans == 0 and rec._nat.armed == 0
    assert not rec._native_on and rec.recording.history.steps == [0, 1, 2, 3]


class Branchy(nn.Module):
    """A model whose graph changes when asked: how many hidden layers it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.head = nn.Linear(8, 3)
        self.depth = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.fc[:self.depth]:
            x = torch.relu(layer(x))
        return self.head(x)


def branchy_run(depth: Callable[[int], int], steps: int) -> tuple[gradviz.Recorder, list]:
    torch.manual_seed(0)
    model = Branchy()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught, gradviz.record(
            model, None, native=True) as rec:
        warnings.simplefilter("always")
        for i in range(steps):
            model.depth = depth(i)
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.step(loss)
    return rec, [str(w.message) for w in caught]


def test_a_new_graph_shape_is_recorded_with_parameter_norms_then_learnt() -> None:
    # steps 0-2 one layer (0 learns), 3-5 two (3: a miss, 4 and 5 in Python, which learns
    # it), 6-9 one again (native)
    rec, said = branchy_run(lambda i: 2 if i in (3, 4, 5) else 1, 10)
    assert rec._nat.missed == 1 and rec._nat.plans == 2
    assert rec._nat.armed == 6  # every step but 0 (learnt), 3 (missed), 4 and 5 (Python)
    s = table(rec)
    act = s[("node", "fc.0", "activation_grad_norm")]
    assert np.isnan(act[3])
    assert not np.isnan(np.delete(act, 3)).any()
    # the missed step still has its parameter norms (the second layer's too) and its loss
    assert not np.isnan(s[("param", "fc.1", "weight")][3])
    assert not np.isnan(s[("loss",)][3])
    assert [m for m in said if "graph" in m] == [
        "gradviz recorded step 3 with parameter norms only: its autograd graph had a shape "
        "the native recorder had not seen; the next steps are recorded in Python, which "
        "learns it (record(..., native=False) records every step in Python)"]


def test_a_graph_that_keeps_changing_goes_back_to_python() -> None:
    # a new depth every step, six in turn: misses at 1 (then 2 steps in Python), 4 (then
    # 3), 10 (then 5) and 16, where depth 5 has always come on a native step: Python
    rec, _ = branchy_run(lambda i: i % 6 + 1, 20)
    assert capture.NATIVE_MISSES == 4
    assert rec._nat is None and not rec._native_on
    assert rec.recording.history.steps == list(range(20))
    act = table(rec)[("node", "fc.0", "activation_grad_norm")]
    assert [i for i in range(20) if np.isnan(act[i])] == [1, 4, 10, 16]


def test_a_model_that_alternates_between_two_graphs_stays_native() -> None:
    """One task per batch (two heads, two graphs): after the first miss Python recorded one
    step, of the shape already learnt, and every native step missed the other one, until
    gradviz gave native up. Two steps in Python learn both."""
    rec, _ = branchy_run(lambda i: 1 + i % 2, 14)
    assert rec._nat.missed == 1 and rec._nat.plans == 2
    assert rec._nat.armed == 10 and rec._native_on  # all but 0 (learns), 1, 2 and 3
    act = table(rec)[("node", "fc.0", "activation_grad_norm")]
    assert [i for i in range(14) if np.isnan(act[i])] == [1]


def test_one_shape_with_two_plans_is_never_armed() -> None:
    """Passes the walk cannot tell apart but the Python recorder planned differently (which
    parameter-free module ran is invisible to it) are left to Python."""
    module = native.load()
    lin = nn.Linear(4, 4)
    params = list(lin.parameters())
    rec = module.Recorder(params)
    out = lin(torch.randn(2, 4, requires_grad=True))
    seq = out.grad_fn._sequence_nr()
    assert rec.learn([out], [(seq, [(0, 5)], [])], [])
    assert rec.learn([out], [(seq, [(0, 5)], [])], [])  # the same plan again: fine
    assert rec.arm([out]) == 1
    assert not rec.learn([out], [(seq, [(0, 6)], [])], [])  # another plan, the same shape
    assert rec.arm([out]) == 0 and rec.missed == 1
    assert not rec.learn([out], [(12345678, [(0, 5)], [])], [])  # a node not in the walk


def test_accumulation_every_and_loss_kinds_match_python() -> None:
    """Two passes a step, every=2, a loss given as a tensor, a number and not at all."""
    def run(native_: bool) -> gradviz.Recorder:
        torch.manual_seed(0)
        model = demos.DEMOS["residual"].build()
        x, y = data("residual", 64)
        with gradviz.record(model, None, native=native_, every=2) as rec:
            for i in range(12):
                model.zero_grad()
                total = 0.0
                for k in range(2):
                    xb, yb = x[32 * k:32 * k + 32], y[32 * k:32 * k + 32]
                    loss = nn.functional.cross_entropy(model(xb + 0.01 * i), yb) / 2
                    loss.backward()
                    total += float(loss.detach())
                rec.step(loss if i % 3 == 0 else total if i % 3 == 1 else None)
        return rec

    python, fast = run(False), run(True)
    assert fast._nat.armed == 2 * 5 and fast._nat.missed == 0  # 6 recorded steps, 1 learns
    assert fast.recording.history.steps == python.recording.history.steps == list(range(0, 12, 2))
    assert_same(table(python), table(fast), rel=5e-5)


@pytest.mark.parametrize("layouts", [capture.NATIVE_LAYOUTS, 2])
def test_rows_across_buffers_loss_kinds_and_renumbered_layouts_match_python(
        layouts: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """More steps than a row buffer holds, the loss's kind changing in runs (a new layout
    each time: a tensor, a number, none), and (2) the native layouts numbered afresh every
    third new one: each step's row lands where Python's does."""
    monkeypatch.setattr(capture, "NATIVE_LAYOUTS", layouts)
    steps = capture.ROWS_AT_ONCE + 60

    def kind(i: int) -> int:  # 0: a tensor, 1: a number, 2: no loss given
        return (i // 7) % 3 if i > capture.ROWS_AT_ONCE - 10 else 0

    def run(native_: bool) -> gradviz.Recorder:
        torch.manual_seed(0)
        model = demos.DEMOS["mlp"].build()
        x, y = data("mlp", 16)
        with gradviz.record(model, None, native=native_) as rec:
            for i in range(steps):
                model.zero_grad()
                loss = nn.functional.cross_entropy(model(x + 0.01 * i), y)
                loss.backward()
                rec.step(loss if kind(i) == 0 else float(loss.detach()) if kind(i) == 1
                         else None)
        return rec

    python, fast = run(False), run(True)
    assert fast._nat.armed == steps - 1 and fast._nat.missed == 0
    assert fast.recording.history.steps == python.recording.history.steps == list(range(steps))
    assert_same(table(python), table(fast), rel=5e-5)
    no_loss = [i for i in range(steps) if kind(i) == 2]
    assert len(no_loss) > 10 and [i for i, v in enumerate(table(fast)[("loss",)])
                                  if np.isnan(v)] == no_loss


def test_retain_graph_and_create_graph_match_python() -> None:
    def run(native_: bool) -> gradviz.Recorder:
        torch.manual_seed(0)
        model = demos.DEMOS["dense"].build()
        x, y = data("dense", 16)
        with gradviz.record(model, None, native=native_) as rec:
            for i in range(4):
                model.zero_grad()
                loss = nn.functional.cross_entropy(model(x * (1 + i)), y)
                loss.backward(retain_graph=True)
                loss.backward(create_graph=i % 2 == 0)
                rec.step(loss)
        return rec

    python, fast = run(False), run(True)
    assert fast._nat.armed == 3 and not fast._failed
    assert_same(table(python), table(fast), rel=5e-5)


def test_no_gradient_outlives_its_step() -> None:
    torch.manual_seed(0)
    model = demos.DEMOS["residual"].build()
    x, y = data("residual", 16)
    refs = []
    with gradviz.record(model, None, native=True) as rec:
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            out = model(x)
            refs.append(weakref.ref(out))
            out.register_hook(lambda g: refs.append(weakref.ref(g)))
            nn.functional.cross_entropy(out, y).backward()
            rec.step()
            del out
    model.zero_grad(set_to_none=True)
    assert rec._nat.armed == 3
    assert len(refs) == 8 and all(r() is None for r in refs)


def sizes() -> list[int]:
    """Around its blocks (1024 values), its 4 streams (4 blocks) and its chunks (1 << 18)."""
    return [1, 15, 16, 17, 1023, 1024, 1025, 4096 - 1, 4096 + 7, 5 * 1024 + 3, 200_000,
            (1 << 18) + 1, (1 << 20) + 4096 + 5]


@pytest.mark.parametrize("n", sizes())
def test_native_norm_is_exact(n: int) -> None:
    """Within 1e-6 of float64, a value in each part counted once (the parts as they would
    fall are scaled apart: a value missed or read twice moves the norm by far more)."""
    module = native.load()
    t = torch.randn(n, generator=torch.Generator().manual_seed(n))
    t[: n // 2] *= 1.5
    t[-7:] *= 3.0
    exact = float(t.double().norm())
    assert module.norm(t) == pytest.approx(exact, rel=1e-6)
    assert module.norm(t.double()) == pytest.approx(exact, rel=1e-7)  # (a float32 number)


def test_native_norm_of_a_large_gradient_is_the_same_on_any_number_of_threads() -> None:
    """A large gradient is read in parallel chunks: the same number on 1, 2 or 3 threads."""
    module = native.load()
    t = torch.randn((1 << 20) + 12_345, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        got = []
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            got.append(module.norm(t))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1] == got[2]
    assert got[0] == pytest.approx(float(t.double().norm()), rel=1e-6)


def test_native_norm_on_every_kind_of_gradient() -> None:
    module = native.load()
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    exact = float(t.double().norm())
    assert module.norm(t * 1e-25) == pytest.approx(exact * 1e-25, rel=1e-6)  # float32 squares: 0
    assert module.norm(t * 1e30) == pytest.approx(exact * 1e30, rel=1e-6)  # float32 squares: inf
    assert module.norm(t.double()) == pytest.approx(exact, rel=1e-7)
    assert module.norm(t.half()) == pytest.approx(float(t.half().double().norm()), rel=1e-3)
    assert module.norm(t.t()) == pytest.approx(exact, rel=1e-5)  # not contiguous
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 0, 3]]), torch.tensor([1.0, 2.0, 2.0]),
                                     (5,), check_invariants=True)
    assert module.norm(sparse) == pytest.approx(math.sqrt(9 + 4))  # coalesced: 3 and 2
    bad = t.clone()
    bad[3, 3] = float("nan")
    assert math.isnan(module.norm(bad))
    bad[3, 3] = float("inf")
    assert module.norm(bad) == math.inf
    assert module.norm(torch.zeros(0)) == 0.0


def test_not_for_all_modules_or_frozen_runs() -> None:
    model = demos.DEMOS["mlp"].build()
    for opts in ({"all_modules": True},):
        with pytest.warns(RuntimeWarning, match="gradviz records in Python: no native"), \
                gradviz.record(model, None, native=True, **opts) as rec:
            assert rec._nat is None
    model.fc1.weight.requires_grad_(False)
    with pytest.warns(RuntimeWarning, match="frozen parameters"), \
            gradviz.record(model, None, native=True) as rec:
        assert rec._nat is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradviz.record(model, None) as rec:  # by default: no warning, just Python
            assert rec._nat is None


def test_gradviz_native_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADVIZ_NATIVE", "0")
    assert native.load() is None and native.why_not() == "GRADVIZ_NATIVE=0"
    with pytest.warns(RuntimeWarning, match=r"no native recorder \(GRADVIZ_NATIVE=0\)"), \
            gradviz.record(demos.DEMOS["mlp"].build(), None, native=True) as rec:
        assert rec._nat is None
    r = subprocess.run([sys.executable, "-m", "gradviz.native"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unset it" in r.stderr


def test_auto_uses_a_built_recorder() -> None:
    rec = train("mlp", None, steps=3)  # type: ignore[arg-type]
    assert rec._nat is not None and rec._nat.armed == 2


def test_build_without_a_compiler_says_so_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "CXX": "/bin/false"}
    r = subprocess.run([sys.executable, "-m", "gradviz.native"], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == "gradviz: building the native recorder (once, 20-60 s)..."
    assert len(lines) == 2 and lines[1].startswith(
        "gradviz: the native recorder did not build: ") and "records in Python" in lines[1]
    assert "Traceback" not in r.stderr
    # and a recorder asked for it trains on, in Python, with a warning that says why
    code = ("import warnings, torch, gradviz\n"
            "from gradviz import demos\n"
            "m = demos.DEMOS['mlp'].build()\n"
            "with warnings.catch_warnings(record=True) as w, gradviz.record(m, None, "
            "native=True) as rec:\n"
            "    warnings.simplefilter('always')\n"
            "    m(torch.randn(4, 32)).sum().backward(); rec.step()\n"
            "print(rec._nat is None, rec.recording.history.steps, [str(x.message) for x in w])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("True [0] [")
    assert "'gradviz records in Python: no native recorder (CalledProcessError: " in \
        r.stdout.replace('"', "'")


def test_built_recorder_is_reused_not_rebuilt(tmp_path: Path) -> None:
    name, folder = native.folder_for("native", native.SOURCE)
    assert (folder / f"{name}.so").is_file()  # (the fixture built it)
    r = subprocess.run([sys.executable, "-m", "gradviz.native"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and "built already" in r.stderr


def test_capture_knows_nothing_native_at_import() -> None:
    """gradviz.native (and torch's cpp_extension) load only when a recorder starts."""
    code = ("import sys, gradviz.capture; "
            "print('gradviz.native' in sys.modules, 'torch.utils.cpp_extension' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.split() == ["False", "False"]
    assert capture.NATIVE_MISSES >= 2


def test_a_layer_called_after_the_models_forward_keeps_python() -> None:
    """model.head(model(x)), head a part of model: the native recorder would not see head's
    call (no forward hook of its own), so the recorder never goes native."""

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    torch.manual_seed(0)
    model = Body()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with gradviz.record(model, None, native=True) as rec:
        for _ in range(4):
            model.zero_grad()
            nn.functional.cross_entropy(model.head(model(x)), y).backward()
            rec.step()
    assert rec._nat.armed == 0 and not rec._native_on
    assert not np.isnan(table(rec)[("node", "head", "activation_grad_norm")]).any()


def test_inputs_that_require_grad_and_passes_without_backward_are_no_misses() -> None:
    torch.manual_seed(0)
    model = demos.DEMOS["mlp"].build()
    x, y = data("mlp", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "parameter norms only" warning either
        with gradviz.record(model, None, native=True) as rec:
            for i in range(5):
                model.zero_grad()
                xi = x.clone().requires_grad_(True)  # a new leaf every step (say, a PINN)
                nn.functional.cross_entropy(model(xi), y).backward()
                if i:  # a forward that never reaches backward (logging), of a shape not
                    model(x)  # learnt (no input leaf): not armed, and no miss either
                rec.step()
    assert rec._nat.missed == 4 and rec._nat.armed == 4  # (the extra passes: not armed)
    assert rec._native_on and rec._nat_misses == 0
    assert not np.isnan(table(rec)[("node", "fc1", "activation_grad_norm")]).any()


def test_compiled_autograd_sends_the_recorder_back_to_python(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = demos.DEMOS["mlp"].build()
    x, y = data("mlp", 16)
    with warnings.catch_warnings(record=True) as said, gradviz.record(
            model, None, native=True) as rec:
        warnings.simplefilter("always")
        for i in range(5):
            if i == 2:  # (as torch._dynamo.compiled_autograd._enable sets it)
                monkeypatch.setitem(sys.modules, "torch._dynamo.compiled_autograd",
                                    SimpleNamespace(compiled_autograd_enabled=True))
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
    assert rec._nat is None and not rec._failed
    assert rec.recording.history.steps == [0, 1, 2, 3, 4]
    act = table(rec)[("node", "fc1", "activation_grad_norm")]
    assert [i for i in range(5) if np.isnan(act[i])] == [2]
    assert any("compiled autograd is on" in str(w.message) for w in said)


def test_a_recorder_started_again_records_as_before() -> None:
    torch.manual_seed(0)
    model = demos.DEMOS["residual"].build()
    x, y = data("residual", 16)
    rec = gradviz.record(model, None, native=True)
    for _ in range(2):
        with rec:
            for _ in range(3):
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                rec.step()
    assert rec._nat.armed == 2 and not rec._failed
    s = table(rec)
    assert rec.recording.history.steps == list(range(6))
    for key, values in s.items():
        assert np.allclose(values, values[0], rtol=1e-5, equal_nan=True), key  # same batch


class _DoubleInPlace(torch.autograd.Function):
    """x * 2, whose backward doubles the incoming gradient in place and passes it on."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.mul_(2)


def test_a_gradient_changed_in_place_between_hooks_is_measured_again() -> None:
    """The same gradient tensor, changed in place after one hook measured it, is measured
    again by the next (its version moved on), as the Python recorder does."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(_DoubleInPlace.apply(self.fc1(x)))

    def run(native_: bool) -> gradviz.Recorder:
        torch.manual_seed(0)
        model = Model()
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        with gradviz.record(model, None, native=native_) as rec:
            for _ in range(3):
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                rec.step()
        return rec

    python, fast = run(False), run(True)
    assert fast._nat.armed == 2
    assert_same(table(python), table(fast), rel=1e-6)


# -- forward statistics ------------------------------------------------------------------

STAT_NAMES = (*capture.LAYER_STATS, "dead_frac", "saturated_frac")


def assert_same_stats(a: dict[tuple, np.ndarray], b: dict[tuple, np.ndarray],
                      norms: bool = True) -> None:
    """Statistics to 1e-5 of their layer's range (the mean of values around 0 has no
    relative precision to speak of: float32 sums and double sums differ there); norms (and
    the loss) as assert_same."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert (np.isnan(x) == np.isnan(y)).all(), key
        ok = ~np.isnan(x)
        if key[-1] in STAT_NAMES:
            if key[-1] in ("act_mean", "act_std", "act_min", "act_max"):
                lo, hi = a[(*key[:-1], "act_min")], a[(*key[:-1], "act_max")]
                scale = np.nan_to_num(np.maximum(np.abs(lo), np.abs(hi))[ok], nan=0.0)
            else:  # fractions: counts over the same size, only the division's rounding
                scale = np.ones(ok.sum())
            with np.errstate(invalid="ignore"):  # (inf - inf)
                near = np.abs(y[ok] - x[ok]) <= 1e-5 * scale + 1e-6 * np.abs(x[ok])
            assert ((y[ok] == x[ok]) | near).all(), (key, x[ok], y[ok])
        elif norms:
            np.testing.assert_allclose(y[ok], x[ok], rtol=5e-5, atol=0, err_msg=str(key))


@pytest.mark.parametrize("name", [n for n in demos.DEMOS if n != "lstm"])
def test_native_statistics_match_python(name: str) -> None:
    python = train(name, False, activation_stats=True)
    fast = train(name, True, activation_stats=True)
    assert (fast._nat.armed, fast._nat.missed) == (7, 0)
    assert fast.recording.history.steps == python.recording.history.steps == list(range(8))
    assert fast.recording.nodes == python.recording.nodes  # (which activation fed a layer)
    a, b = table(python), table(fast)
    assert any(k[-1] == "act_std" for k in a)
    assert_same_stats(a, b, norms=name != "plain")  # ("plain": see the test above)


class Zoo(nn.Module):
    """Every kind of output a statistic is taken of, and every activation credited."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu = nn.Linear(6, 8), nn.ReLU(inplace=True)
        self.fc2, self.sig = nn.Linear(8, 8), nn.Sigmoid()
        self.fc3, self.tanh = nn.Linear(8, 8), nn.Tanh()
        self.pair = Pair()
        self.fc4 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc1(x))
        h = self.sig(self.fc2(h) * 4)  # (a junction feeds the sigmoid: nothing credited)
        h = self.tanh(self.fc3(h))
        a, b = self.pair(h)
        return self.fc4(a + b)


class Pair(nn.Module):
    """A layer with two outputs, the first one transposed twice (not contiguous)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) * 3)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (h @ self.w).t().contiguous().t(), h * 2


def reference_stats(model: Zoo, x: torch.Tensor) -> dict[tuple, float]:
    """The statistics of one forward, in float64 from the outputs themselves."""
    out: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(
        lambda m, a, o, name=name: out.__setitem__(name, (o[0] if isinstance(o, tuple) else o)
                                                   .detach().clone()))
        for name, m in model.named_children()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    ref: dict[tuple, float] = {}
    for name in ("fc1", "fc2", "fc3", "pair", "fc4"):
        v = out[name].double()
        ref[("node", name, "act_mean")] = float(v.mean())
        ref[("node", name, "act_std")] = float(v.std())
        ref[("node", name, "act_min")] = float(v.min())
        ref[("node", name, "act_max")] = float(v.max())
        ref[("node", name, "act_zero_frac")] = float((v == 0).double().mean())
    relu = out["relu"]  # (in place: fc1's output, after the ReLU)
    ref[("node", "fc1", "dead_frac")] = float((relu == 0).all(dim=0).double().mean())
    tanh = out["tanh"]
    ref[("node", "fc3", "saturated_frac")] = float(((tanh <= -0.99) | (tanh >= 0.99))
                                                   .double().mean())
    return ref


def test_native_statistics_equal_a_float64_reference() -> None:
    """In-place ReLU (credited through its node to fc1), tanh, a sigmoid fed by a junction,
    a two-output layer whose first output is not contiguous: each recorded statistic is
    the float64 value of the output it describes."""
    torch.manual_seed(0)
    model = Zoo()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with torch.no_grad():  # (some dead units for the ReLU, some saturation for tanh)
        model.fc1.bias[:3] = -100.0
        model.fc3.weight.mul_(20)
    refs = []
    with gradviz.record(model, None, native=True, activation_stats=True) as rec:
        for i in range(4):
            xi = x * (1 + i)
            refs.append(reference_stats(model, xi))
            model.zero_grad()
            nn.functional.cross_entropy(model(xi), y).backward()
            rec.step()
    assert rec._nat.armed == 3 and not rec._failed
    s = table(rec)
    assert ("node", "fc2", "saturated_frac") not in s  # fed by a junction
    assert rec.recording.nodes["fc1"]["activation"] == "ReLU"
    assert rec.recording.nodes["fc3"]["activation"] == "Tanh"
    assert 0 < s[("node", "fc1", "dead_frac")][3] < 1  # (else it would test little)
    assert s[("node", "fc3", "saturated_frac")][3] > 0
    for step in (1, 2, 3):  # native steps
        for key, want in refs[step].items():
            got = s[key][step]
            scale = max(abs(refs[step][(*key[:2], "act_min")]),
                        abs(refs[step][(*key[:2], "act_max")]), 1.0) if key[2].startswith(
                            "act_") else 1.0
            assert abs(got - want) <= 2e-6 * scale + 1e-6 * abs(want), (step, key, got, want)


def native_stats(t: torch.Tensor) -> list[float]:
    """The C++ recorder's five statistics of one layer output."""
    module = native.load()
    r = module.Recorder([])
    slot = r.add_layer([10, 11, 12, 13, 14])
    r.stat_one(t, slot)
    lid = r.take(True, None)
    assert r.layout(lid) == ([], [], [[10, 11, 12, 13, 14]])
    buf = torch.zeros(1, 5)
    r.put(buf, 0)
    return buf[0].tolist()


def expected_stats(t: torch.Tensor) -> list[float]:
    v = t.detach().double().reshape(-1)
    n = v.numel()
    if torch.isnan(v).any():
        return [math.nan] * 4 + [float((v == 0).double().mean())]
    std = float(v.std()) if n > 1 else 0.0
    return [float(v.mean()), std, float(v.min()), float(v.max()), float((v == 0).sum()) / n]


def produced(values: torch.Tensor) -> torch.Tensor:
    """values as a layer output: with an autograd node, the same numbers."""
    return values.clone().requires_grad_(True) * 1.0


@pytest.mark.parametrize("case", ["plain", "zeros", "neg-zero", "nan", "inf", "one", "big",
                                  "float64", "half", "strided", "constant", "offset"])
def test_native_layer_stats_edge_cases(case: str) -> None:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(5000, generator=g)
    t = {
        "plain": lambda: produced(v),
        "zeros": lambda: produced(torch.where(v > 0, v, 0.0)),
        "neg-zero": lambda: produced(torch.where(v > 0, v, -0.0)),  # -0.0 counts as zero
        "nan": lambda: produced(torch.where(v > 2, math.nan, v)),
        "inf": lambda: produced(torch.where(v > 2.5, math.inf, v)),
        "one": lambda: produced(v[:1]),
        "big": lambda: produced(v * 1e30),  # squares beyond float32's range
        "float64": lambda: produced(v.double()),
        "half": lambda: produced(v).half(),
        "strided": lambda: produced(v.reshape(50, 100)).t(),
        "constant": lambda: produced(torch.full((999,), 0.1)),
        "offset": lambda: produced(v * 1e-3 + 1e4),  # a mean far larger than the spread
    }[case]()
    got, want = native_stats(t), expected_stats(t)
    if case == "inf":  # the mean is inf, and the std of x - inf is NaN (as torch's)
        want[:2] = [math.inf, math.nan]
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        if math.isnan(b):
            assert math.isnan(a), (k, a)
        elif k == 0 and math.isfinite(b):  # to float32's rounding, a millionth of the spread
            assert abs(a - b) <= 1e-7 * abs(b) + 1e-6 * want[1], (k, a, b)
        else:  # std, min, max, the fraction of zeros: to float32's rounding
            assert a == pytest.approx(b, rel=1e-6, abs=0), (k, a, b)
    if case == "constant":  # no spread at all: none made up by rounding
        assert got[0] == np.float32(0.1) and got[1] == 0.0
    if case == "plain":  # and what the Python recorder takes agrees
        np.testing.assert_allclose(got, capture._layer_stats(t).tolist(), rtol=1e-5, atol=1e-6)


def test_native_unit_stats_edge_cases() -> None:
    module = native.load()
    r = module.Recorder([])
    slot = r.add_layer([0, 1, 2, 3, 4])
    dead, sat = r.add_activation(0, 0.0, 0.0), r.add_activation(1, -1 + 0.01, 1 - 0.01)
    for kind, col in ((0, 7), (1, 8)):
        r.unit_column(slot, kind, col)
    g = torch.Generator().manual_seed(4)
    pre = produced(torch.randn(64, 40, generator=g))
    pre.data[:, :10] = -1.0  # ten units dead
    pre.data[3, 0] = math.nan  # ... but a NaN keeps one alive (as amax == 0 says)
    with torch.no_grad():  # (statistics are not taken with grad off: nothing recorded)
        r.stat_one(pre, slot)
    r.stat_one(pre, slot)
    relu, tanh = torch.relu(pre), torch.tanh(pre * 3)
    assert r.unit(pre, relu, dead) == -1 and r.unit(pre, tanh, sat) == -1
    lid = r.take(True, None)
    assert r.layout(lid)[2] == [[0, 1, 2, 3, 4], [7], [8]]
    buf = torch.zeros(1, 7)
    r.put(buf, 0)
    assert buf[0, 5] == pytest.approx(9 / 40)
    assert buf[0, 5] == pytest.approx(float((relu.amax(dim=0) == 0).float().mean()))
    near = (tanh <= -0.99) | (tanh >= 0.99)
    assert 0 < near.sum() < near.numel()
    assert buf[0, 6] == pytest.approx(float(near.sum()) / near.numel())
    # a layer with no column yet for a kind: its slot back, nothing recorded
    other = r.add_layer([20, 21, 22, 23, 24])
    r.stat_one(pre, other)
    assert r.unit(pre, relu, dead) == other
    assert r.layout(r.take(True, None))[2] == [[20, 21, 22, 23, 24]]


def test_a_statistic_that_fails_stops_the_recorder_not_the_forward() -> None:
    module = native.load()
    r = module.Recorder([])
    r.stat_one(produced(torch.ones(3)), 5)  # no layer 5: kept, not raised here
    with pytest.raises(RuntimeError, match="the native recorder failed: in forward"):
        r.take(True, None)
    assert r.take(True, None) >= 0  # raised once


def test_a_pass_that_raised_leaves_no_statistics_and_misses_keep_them() -> None:
    """A forward that raised between two layers is forgotten at the next pass's start; a
    step of a graph not learnt is recorded with its statistics (and parameter norms)."""

    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
            self.fail = self.twice = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(x))
            if self.fail:
                raise ValueError("bad batch")
            if self.twice:  # another graph shape: a miss
                h = torch.relu(self.fc1(x)) + h
            return self.fc2(h)

    torch.manual_seed(0)
    model = Flaky()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as said, gradviz.record(
            model, None, native=True, activation_stats=True) as rec:
        warnings.simplefilter("always")
        for i in range(4):
            model.zero_grad()
            if i == 2:
                model.fail = True
                with pytest.raises(ValueError):
                    model(x * 100)  # (fc1's statistics of this input must not count)
                model.fail = False
            model.twice = i == 3
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
    assert rec._nat.armed == 2 and rec._nat.missed == 1
    s = table(rec)
    want = float(model.fc1(x).detach().mean())
    assert s[("node", "fc1", "act_mean")][2] == pytest.approx(want, rel=1e-5)
    assert not np.isnan(s[("node", "fc1", "act_mean")][3])  # the miss kept its statistics
    assert np.isnan(s[("node", "fc1", "activation_grad_norm")][3])
    assert any("step 3 with parameter norms and forward statistics only" in str(w.message)
               for w in said)


def test_the_compiled_autograd_config_is_read_as_torch_reads_it() -> None:
    """_dynamo_config_compiled_autograd reads torch._dynamo.config's entry directly (its
    __getattr__ is slow): it must agree with the module in every way the flag is set."""
    import torch._dynamo.config as cfg

    rec = gradviz.record(nn.Linear(2, 2), None, native=True).start()
    # (the root's C++ hook, as capture makes it: its half reads what capture reads)
    rec._nat.root_hook(capture._grad_outputs, capture._dynamo_config_compiled_autograd,
                       vars(capture))
    cxx = rec._nat.compiled_autograd_on

    def both() -> tuple[bool, bool]:
        python = capture._dynamo_config_compiled_autograd()
        assert cxx() == capture._compiled_autograd_on() == python  # (C++: the root's hook)
        return python, bool(cfg.compiled_autograd)

    assert both() == (False, False)
    with cfg.patch(compiled_autograd=True):
        assert both() == (True, True)
        assert capture._compiled_autograd_on()
    assert both() == (False, False)
    cfg.compiled_autograd = True
    try:
        assert both() == (True, True)
    finally:
        cfg.compiled_autograd = False
    assert both() == (False, False) and not capture._compiled_autograd_on()
    import torch._dynamo.compiled_autograd as ca

    for flag in ("compiled_autograd_enabled", "in_compiled_autograd_region"):
        was = getattr(ca, flag)
        setattr(ca, flag, True)
        try:
            assert cxx() and capture._compiled_autograd_on()
        finally:
            setattr(ca, flag, was)
    assert not cxx()
    rec.close()


def test_the_compiled_autograd_config_read_follows_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment's values (torch reads them once, at import; so does the cached read):
    a default counts only where the user set nothing, a forced one over the user's."""
    import contextvars

    import torch._dynamo.config as cfg
    from torch.utils._config_module import _UNSET_SENTINEL

    entry = cfg._config["compiled_autograd"]

    rec = gradviz.record(nn.Linear(2, 2), None, native=True).start()
    rec._nat.root_hook(capture._grad_outputs, capture._dynamo_config_compiled_autograd,
                       vars(capture))
    cxx = rec._nat.compiled_autograd_on  # (the root's hook's read, in C++)

    def both() -> tuple[bool, bool]:
        python = capture._dynamo_config_compiled_autograd()
        assert cxx() == python
        return python, bool(cfg.compiled_autograd)

    def environment(name: str) -> None:
        monkeypatch.setattr(entry, name, True)
        monkeypatch.setattr(capture, "_CA_ENTRY", None)  # (as at import)

    def check() -> None:  # (in a copy of the context: the user's value does not leak)
        entry.user_override.set(_UNSET_SENTINEL)  # (the user set nothing)
        environment("env_value_default")
        assert both() == (True, True)
        cfg.compiled_autograd = False
        assert both() == (False, False)
        environment("env_value_force")
        assert both() == (True, True)

    contextvars.copy_context().run(check)
    rec.close()


def test_a_copy_of_the_model_made_on_a_native_step_gets_inert_hooks(tmp_path: Path) -> None:
    """The root's C++ hook, as capture._Hook: deepcopy and torch.save copy it as _Inert (the
    copy trains and records nothing), and the recorder goes on recording the model."""
    import copy

    torch.manual_seed(0)
    model = demos.DEMOS["mlp"].build()
    x, y = data("mlp", 16)
    with gradviz.record(model, None, native=True) as rec:
        for i in range(4):
            if i == 3:
                assert rec._native_on
                twin = copy.deepcopy(model)
                torch.save(model, tmp_path / "model.pt")
                saved = torch.load(tmp_path / "model.pt", weights_only=False)
                for other in (twin, saved):
                    hooks = list(other._forward_hooks.values())
                    assert hooks and all(type(h) is capture._Inert for h in hooks)
                    nn.functional.cross_entropy(other(x), y).backward()
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
    assert rec._nat.armed == 3 and rec._nat.missed == 0  # (the copies' passes: not seen)
    assert not np.isnan(table(rec)[("node", "fc1", "activation_grad_norm")]).any()


def test_the_root_hook_is_a_plain_c_type_that_refuses_misuse() -> None:
    """The root's hook (and the step's notes and take_into on it) is a bare CPython type, for
    a cheap call: made only by root_hook, it refuses a Python construction (which would
    hold no recorder) and arguments of the wrong kind with a TypeError, never a crash."""
    rec = gradviz.record(nn.Linear(2, 2), None, native=True).start()
    hook = rec._nat_hook
    assert type(hook).__name__ == "RootHook" and hook.notes() is not None  # (no pass armed)
    with pytest.raises(TypeError):
        type(hook)()
    with pytest.raises(TypeError, match="module, args, output"):
        hook(rec.model, ())
    with pytest.raises(TypeError, match="take_into"):
        hook.take_into(1.5, None, 0, -1)
    with pytest.raises(TypeError, match="take_into"):
        hook.take_into(None, None, 0)
    with pytest.raises(OverflowError):
        hook.take_into(None, None, 2**70, -1)
    out = rec.model(torch.ones(1, 2))  # (Python records this pass and teaches C++ its shape)
    assert hook(rec.model, (), out) is None and hook.notes() is None  # (armed: all seen)
    assert hook.take_into(torch.tensor(2.0), None, 0, -1) >= 0
    rec.close()


def test_the_native_hooks_go_back_in_place_between_recorded_steps() -> None:
    """every=3, native: the root's hook comes off after a recorded step and goes back before
    the next as the same hook under the same id (no handle built each time), after a user's
    hook added meanwhile, as a fresh registration would; close() leaves none of gradviz's."""
    torch.manual_seed(0)
    model = demos.DEMOS["mlp"].build()
    x, y = data("mlp", 16)
    calls: list[str] = []
    ids = []
    with gradviz.record(model, None, native=True, every=3) as rec:
        for i in range(10):
            if i == 4:  # (between recorded steps 3 and 6: gradviz's hook is off)
                assert not model._forward_hooks
                model.register_forward_hook(lambda *_: calls.append("user"))
            if i % 3 == 0:
                ids.append(list(model._forward_hooks))
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
        assert rec._nat.armed == 3  # (steps 3, 6 and 9; step 0 was recorded in Python)
        hook_id = ids[1][-1]
        assert ids[2] == ids[3] == [ids[2][0], hook_id]  # (the user's first, then gradviz's)
        assert calls == ["user"] * 6
    assert list(model._forward_hooks) == [ids[2][0]]  # (only the user's is left)
    assert rec.recording.history.steps == [0, 3, 6, 9]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_saturation_is_counted_in_the_outputs_dtype(dtype: torch.dtype) -> None:
    """torch compares a bfloat16 tensor with bounds rounded to bfloat16 (0.99 is 0.98828125
    there): the native count must do the same, as capture._unit_stat does."""
    module = native.load()
    r = module.Recorder([])
    slot = r.add_layer([0, 1, 2, 3, 4])
    margin = 0.01
    sat = r.add_activation(1, -1 + margin, 1 - margin)
    r.unit_column(slot, 1, 7)
    # (bfloat16(0.99) = 0.98828125; float16(0.99) = 0.990234375, which changes no count)
    values = torch.tensor([0.98828125, 0.9892578125, 0.98974609375, 0.99, 0.995, -0.98828125,
                           -0.98974609375, 0.5, -0.999, 1.0, 0.0] * 8)
    pre = produced(torch.atanh(values.clamp(-0.9999, 0.9999)).to(dtype))
    out = values.to(dtype)  # (these values in the dtype: what tanh(pre) is, near enough)
    r.stat_one(pre, slot)
    assert r.unit(pre, out, sat) == -1
    buf = torch.zeros(1, 6)
    r.put(buf, r.take(True, None))
    want = float(capture._unit_stat(nn.Tanh(), out, margin))
    assert buf[0, 5].item() == pytest.approx(want, rel=1e-6)
    if dtype == torch.bfloat16:  # (+-0.98828125 are saturated only counted in bfloat16)
        assert want > float(capture._unit_stat(nn.Tanh(), out.float(), margin))


def test_an_eval_pass_then_a_layer_outside_the_model_keeps_its_statistics() -> None:
    """A root forward under no_grad (evaluation) ends its pass too: the statistics of a
    layer called outside the model afterwards stand, as in the Python recorder."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.tanh = nn.Linear(6, 16), nn.ReLU(), nn.Tanh()
            self.out = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.tanh(self.act(self.fc1(x))))

    def run(native_: bool) -> gradviz.Recorder:
        torch.manual_seed(0)
        model = Net()
        x, y = torch.randn(32, 6) * 3, torch.randint(0, 3, (32,))
        with gradviz.record(model, None, native=native_, activation_stats=True) as rec:
            for i in range(5):
                model.zero_grad()
                aux = 0.0
                if i == 3:
                    with torch.no_grad():
                        model(x)
                    aux = model.tanh(model.fc1(x * 5)).sum()
                (nn.functional.cross_entropy(model(x * (1 + i)), y) + 0 * aux).backward()
                rec.step()
        return rec

    python, fast = run(False), run(True)
    assert fast._nat.armed == 4
    a, b = table(python), table(fast)
    assert not np.isnan(b[("node", "fc1", "saturated_frac")][3])
    # (norms differ at step 3: the native recorder does not see the call outside the model)
    assert_same_stats(a, b, norms=False)


def test_a_step_while_another_thread_drains_a_full_buffer_leaves_its_rows_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A native step writes its row without the lock. A History read from another thread
    that is draining all 64 waiting rows (held here in the middle, the steps taken off)
    while a step comes: every value recorded is still the same as without the read."""
    steps = capture.ROWS_AT_ONCE + 8
    torch.manual_seed(0)
    x, y = data("mlp", 16)
    start = demos.DEMOS["mlp"].build().state_dict()
    inside, go = threading.Event(), threading.Event()
    wait = capture._Rows.wait

    def held(self: Any, at: list[int]) -> None:  # (the reader's drain, mid-way)
        inside.set()
        assert go.wait(10)
        wait(self, at)

    def run(drain_at: int | None) -> gradviz.Recorder:
        model = demos.DEMOS["mlp"].build()
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def one_step(i: int) -> None:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x * (1 + i / 10)), y)
            loss.backward()
            rec.step(loss)
            opt.step()

        with gradviz.record(model, None, native=True) as rec:
            for i in range(steps):
                if i != drain_at:
                    one_step(i)
                    continue
                assert len(rec._rows.steps) == capture.ROWS_AT_ONCE  # (every row waiting)
                monkeypatch.setattr(capture._Rows, "wait", held)
                reader = threading.Thread(target=lambda: rec.recording.history.steps)
                reader.start()
                assert inside.wait(10)  # the reader has taken the 64 steps off
                stepper = threading.Thread(target=one_step, args=(i,))
                stepper.start()
                stepper.join(0.3)  # (its row must not land in a waiting step's)
                go.set()
                reader.join(10)
                stepper.join(10)
                monkeypatch.setattr(capture._Rows, "wait", wait)
        assert rec._nat.armed == steps - 1 and not rec._failed
        return rec

    alone = table(run(None))
    read = table(run(capture.ROWS_AT_ONCE))  # (steps 0-63 wait: step 0's row is Python's)
    assert read.keys() == alone.keys()
    for key in alone:
        np.testing.assert_array_equal(read[key], alone[key], err_msg=str(key))


def test_a_native_step_with_a_loss_of_several_values_is_kept_without_it() -> None:
    """rec.step(loss) with a loss of two values, a string, then one value again, on native
    steps: each step is kept with its norms, the odd losses left out with one warning."""
    torch.manual_seed(0)
    model = demos.DEMOS["mlp"].build()
    x, y = data("mlp", 16)
    losses: list[Any] = [None, None, "stack", "x", None, 2.5, None]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with gradviz.record(model, None, native=True) as rec:
            for how in losses:
                model.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                rec.step(torch.stack([loss, loss]) if how == "stack" else
                         loss if how is None else how)
    assert rec._nat.armed == len(losses) - 1 and not rec._failed
    run = rec.to_run()
    assert run.steps == list(range(len(losses)))
    assert all(v is not None for v in run.node_history("fc1"))
    assert [v is None for v in run.loss] == [False, False, True, True, False, False, False]
    assert run.loss[5] == 2.5
    said = [str(w.message) for w in said if "loss must be one number" in str(w.message)]
    assert len(said) == 1 and "got a tensor of shape [2]" in said[0], said


@pytest.mark.parametrize("native_", [False, True])
def test_a_block_closed_between_recorded_steps_counts_right_and_refuses_more(
        native_: bool) -> None:
    """Closed while quiet steps count down (every=10, after 13 steps): step_count says 13,
    rec.step() then raises as outside any block, and the recorded steps are 0 and 10."""
    torch.manual_seed(0)
    model = demos.DEMOS["mlp"].build()
    x, y = data("mlp", 16)
    with gradviz.record(model, None, native=native_, every=10) as rec:
        for i in range(13):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
            assert rec.step_count == i + 1
        assert rec._quiet_left == 7 if native_ else rec._quiet_left in (0, 7)
    assert rec.step_count == 13 and rec._quiet_left == 0
    assert rec.recording.history.steps == [0, 10]
    with pytest.raises(gradviz.RecordingError, match="outside the"):
        rec.step()
    assert not model._forward_hooks  # (a quiet step after the block attaches nothing)


def test_every_fourth_step_matches_python_and_hooks_only_those() -> None:
    """every=4 with statistics: between recorded steps step() only counts (no hook is
    attached, nothing can arrive; after a native step, from the next one on: its take()
    closed the step); the recorded steps match the Python recorder's."""
    def hooked_only_when_recorded(i: int, model: nn.Module, rec: gradviz.Recorder) -> None:
        assert bool(model._forward_hooks) == (i % 4 == 0), i  # (the root's: in both modes)
        after_native = i % 4 == 1 and rec._nat is not None and rec._nat.armed > 0
        assert (rec._quiet_left > 0) == (i % 4 in (2, 3) or after_native), i
        assert rec.step_count == i  # (exact while quiet steps count down)

    def run(native_: bool) -> gradviz.Recorder:
        return train("saturating", native_, steps=13, before=hooked_only_when_recorded,
                     every=4, activation_stats=True)

    python, fast = run(False), run(True)
    assert (fast._nat.armed, fast._nat.missed) == (3, 0)
    assert fast.recording.history.steps == python.recording.history.steps == [0, 4, 8, 12]
    assert_same_stats(table(python), table(fast))


class _Squash(nn.Module):
    """tanh(w * x): a layer whose output's autograd node reads no parameter itself."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w * x)


def _other_gradient_in_the_step(kind: str, model: nn.Module, x: torch.Tensor,
                                y: torch.Tensor) -> torch.Tensor:
    """A step's loss that runs torch.autograd.grad (or a backward limited by inputs=) too."""
    mse = nn.functional.mse_loss
    if kind == "gradient penalty":  # (a PINN's du/dx, WGAN-GP, R1: create_graph=True)
        x = x.detach().requires_grad_()
        u = model(x)
        du, = torch.autograd.grad(u.sum(), x, create_graph=True)
        return (du.pow(2).sum(1) - 1).pow(2).mean() + mse(u, y)
    if kind.startswith(("adversarial example", "input gradient by backward")):  # (FGSM)
        x = x.detach().requires_grad_()
        attack = mse(model(x), y)
        if kind.startswith("adversarial example"):
            dx, = torch.autograd.grad(attack, x)
        else:
            attack.backward(inputs=[x])
            dx = x.grad
        return mse(model((x + 0.1 * dx.sign()).detach()), y)
    return mse(model(x), y)  # ("inputs=", "create_graph", "torch.autograd.grad of params")


@pytest.mark.parametrize("native_", [False, True])
@pytest.mark.parametrize("kind", ["gradient penalty", "inputs=", "create_graph",
                                  "adversarial example", "input gradient by backward",
                                  "adversarial example, tanh last",
                                  "torch.autograd.grad of params"])
def test_torch_autograd_grad_inside_a_step_is_not_counted(kind: str, native_: bool) -> None:
    """A backward with create_graph=True counts only if it fills .grad: the hooks on a
    layer's output fired for a gradient penalty's torch.autograd.grad too, and its gradient
    (of du/dx) was summed in, about 200x the true dL/d(output). A backward without it
    counts unless it takes only an input's gradient: an adversarial example's (FGSM) was
    summed in. loss.backward(inputs=params), loss.backward(create_graph=True) and
    torch.autograd.grad(loss, params) (gradients set by hand) count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 1))
    if kind.endswith("tanh last"):  # (the first node the attack's backward runs, a tanh,
        model.append(_Squash())     # has no parameter beside it: Python looked no further)
    x, y = torch.randn(32, 2), torch.randn(32, 1)
    twin = copy.deepcopy(model)  # plain autograd: the last forward's outputs, dL/d of each
    outs: dict[str, torch.Tensor] = {}
    for name in ("0", "2", "4"):
        twin.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: outs.__setitem__(name, out))
    loss = _other_gradient_in_the_step(kind, twin, x, y)
    want = dict(zip(outs, (float(g.norm()) for g in torch.autograd.grad(loss, list(
        outs.values()))), strict=True))
    with gradviz.record(model, None, native=native_) as rec:
        for _ in range(3):  # (no update: every step the same; step 0 learns the graph)
            model.zero_grad()
            loss = _other_gradient_in_the_step(kind, model, x, y)
            if kind == "inputs=":
                loss.backward(inputs=list(model.parameters()))
            elif kind == "torch.autograd.grad of params":
                grads = torch.autograd.grad(loss, list(model.parameters()))
                for p, g in zip(model.parameters(), grads, strict=True):
                    p.grad = g
            else:
                loss.backward(create_graph=kind == "create_graph")
            rec.step(loss)
            model.zero_grad(set_to_none=True)  # (create_graph: .grad holds a graph)
    if native_:  # (steps 1 and 2; the attack's forward is a pass too)
        assert rec._nat.armed == (4 if kind.startswith(("adversarial example",
                                                        "input gradient by backward")) else 2)
    run = rec.to_run()
    for name, norm in want.items():
        got = run.node_history(name, "activation_grad_norm")
        assert got == [pytest.approx(norm, rel=1e-5)] * 3, (name, got, norm)
    for edge in run.edges:
        got = run.edge_history(edge["id"])
        assert got == [pytest.approx(want[edge["source"]], rel=1e-5)] * 3, edge["id"]


@pytest.mark.parametrize("attack", [False, True])
@pytest.mark.parametrize("native_", [False, True])
def test_parameter_gradients_by_hand_after_the_model_is_converted(native_: bool,
                                                                  attack: bool) -> None:
    """record() started, then model.double(): the AccumulateGrad nodes gradviz holds are
    no longer in any graph, and a step whose gradients come from torch.autograd.grad(loss,
    params) recorded no activation or edge at all. An adversarial example's input gradient
    (attack) is still left out: natively it was counted once the held nodes were stale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    ce = nn.functional.cross_entropy

    def adversarial(m: nn.Module) -> torch.Tensor:
        if not attack:
            return x
        xa = x.clone().requires_grad_()
        dx, = torch.autograd.grad(ce(m(xa), y), xa)
        return (x + 0.1 * dx.sign()).detach()

    twin = copy.deepcopy(model).double()
    out = twin(adversarial(twin))
    want = float(torch.autograd.grad(ce(out, y), out)[0].norm())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (native: the parameters changed: Python)
        with gradviz.record(model, None, native=native_) as rec:
            model.double()
            for _ in range(3):
                loss = ce(model(adversarial(model)), y)
                grads = torch.autograd.grad(loss, list(model.parameters()))
                for p, g in zip(model.parameters(), grads, strict=True):
                    p.grad = g
                rec.step(loss)
    if native_ and attack:  # (the C++ path asked of: steps 1 and 2, two passes each)
        assert rec._nat is not None and rec._nat.armed == 4
    got = rec.to_run().node_history("2", "activation_grad_norm")
    assert got == [pytest.approx(want, rel=1e-5)] * 3


def test_an_adversarial_example_far_from_any_trainable_layer_is_left_out() -> None:
    """Only the first of 40 layers trainable: the attack's backward runs 80-odd nodes
    before the first that it skips (that layer's parameters). Python looked 64 nodes far,
    and summed the attack's gradients in (1.41x)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(40):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    model = nn.Sequential(*layers)
    for p in list(model.parameters())[2:]:
        p.requires_grad_(False)
    x = torch.randn(4, 8)
    h = copy.deepcopy(model[0])(x)  # plain autograd: dL/d(output of the first layer)
    want = float(torch.autograd.grad(copy.deepcopy(model)[1:](h).pow(2).sum(), h)[0].norm())
    with gradviz.record(model, None, native=False) as rec:
        for _ in range(2):
            xa = x.clone().requires_grad_()
            torch.autograd.grad(model(xa).pow(2).sum(), xa)  # (the attack: left out)
            model.zero_grad()
            model(x).pow(2).sum().backward()
            rec.step()
    got = rec.to_run().node_history("0", "activation_grad_norm")
    assert got == [pytest.approx(want, rel=1e-5)] * 2


@pytest.mark.parametrize("native_", [False, True])
def test_an_inner_part_across_two_backwards(native_: bool) -> None:
    """An LSTMCell's c, with two backwards a step: the first reaches only c, the second
    only h (and c through h). The first's c gradient waited in its group for an inner part
    that never came, the second's took it off the wrong one: 7 % low. The gradient of c
    itself closes the group."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p, self.cell = nn.Linear(4, 8), nn.LSTMCell(8, 8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.cell(self.p(x))

    net, x = Net(), torch.randn(3, 4)
    twin = copy.deepcopy(net)
    gouts: list[torch.Tensor] = []
    twin.cell.register_full_backward_hook(
        lambda m, gi, go: gouts.extend(g for g in go if g is not None))
    h, c = twin(x)
    (c ** 2).sum().backward(retain_graph=True)
    (h ** 3).sum().backward()
    want = math.sqrt(sum(float(g.norm()) ** 2 for g in gouts))
    with gradviz.record(net, None, native=native_) as rec:
        for _ in range(3):
            net.zero_grad()
            h, c = net(x)
            (c ** 2).sum().backward(retain_graph=True)
            (h ** 3).sum().backward()
            rec.step()
    if native_:
        assert rec._nat.armed == 2
    got = rec.to_run().node_history("cell", "activation_grad_norm")
    assert got == [pytest.approx(want, rel=1e-5)] * 3


class _TwoPaths(nn.Module):
    """stem -> mid_a or mid_b (chosen per batch) -> head: two graphs of one shape once the
    mid layers are frozen (no parameter leaf tells them apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        self.mid_a, self.mid_b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(self.mid_a(h) if task == "a" else self.mid_b(h)))


def test_layers_frozen_during_the_run_leave_native() -> None:
    """Frozen mid-run, mid_b's gradient was recorded natively as mid_a's (the same graph
    shape): a parameter frozen during the run sends the recorder to Python for good."""
    torch.manual_seed(0)
    model = _TwoPaths()
    tasks = ["a"] * 4 + ["a", "b", "a", "b", "b", "a"]
    want: list[tuple[float | None, float | None]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradviz.record(model, None, native=True) as rec:
            for i, task in enumerate(tasks):
                if i == 4:
                    model.mid_a.requires_grad_(False)
                    model.mid_b.requires_grad_(False)
                outs: dict[str, torch.Tensor] = {}
                hooks = [model.get_submodule(n).register_forward_hook(
                    lambda m, a, out, n=n, outs=outs: outs.__setitem__(n, out))
                    for n in ("mid_a", "mid_b")]
                model.zero_grad()
                loss = model(torch.randn(16, 4), task).pow(2).mean()
                for h in hooks:
                    h.remove()
                g, = torch.autograd.grad(loss, outs[f"mid_{task}"], retain_graph=True)
                want.append((float(g.norm()), None) if task == "a" else (None, float(g.norm())))
                loss.backward()
                rec.step(loss)
                if i == 3:
                    assert rec._nat.armed == 3  # (steps 1-3 native)
    assert any("records in Python from now on: a parameter was frozen" in str(w.message)
               for w in caught)
    run = rec.to_run()
    got = list(zip(run.node_history("mid_a", "activation_grad_norm"),
                   run.node_history("mid_b", "activation_grad_norm"), strict=True))
    # step 4 (the first frozen one): parameter norms only; then Python, every value right
    assert got[4] == (None, None)
    for step in [*range(4), *range(5, len(tasks))]:
        assert got[step] == tuple(None if v is None else pytest.approx(v, rel=1e-5)
                                  for v in want[step]), step


@pytest.mark.parametrize("native_", [False, True])
def test_per_sample_gradients_with_torch_func_inside_a_step_change_nothing(
        native_: bool) -> None:
    """vmap(grad(f)) over the model (DP-SGD's per-sample gradients) ran gradviz's forward
    hooks on batched tensors: the recording stopped at the first step (with forward
    statistics). Every series equals that of the same run without it."""
    from torch.func import functional_call, grad, vmap

    def run(per_sample: bool) -> dict[tuple[str, ...], list[float | None]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        params = {k: v.detach() for k, v in model.named_parameters()}

        def f(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (functional_call(model, p, (x.unsqueeze(0),)) - y).pow(2).mean()

        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (gradviz stopping says so in a warning)
            with gradviz.record(model, None, native=native_, activation_stats=True) as rec:
                for _ in range(4):
                    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
                    if per_sample:
                        vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
                    model.zero_grad()
                    loss = (model(x) - y).pow(2).mean()
                    loss.backward()
                    rec.step(loss)
        if native_:
            assert rec._nat.armed == 3
        out = rec.to_run()
        return {k: gradviz.schema.series_to_list(out.array(k)) for k in out.keys()}

    plain, with_vmap = run(False), run(True)
    assert ("node", "0", "act_mean") in plain and ("node", "0", "dead_frac") in plain
    assert with_vmap == plain


class _SpectralIn(nn.Module):
    """FNO-style: the input's first Fourier modes mixed by complex weights (complex out)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8, 5, dtype=torch.cfloat) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bix,iox->box", torch.fft.rfft(x)[..., :5], self.w)


class _SpectralOut(_SpectralIn):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft(torch.einsum("bix,iox->box", z, self.w), n=16)


@pytest.mark.parametrize("native_", [False, True])
def test_complex_parameters_and_activations(native_: bool) -> None:
    """A norm with dtype=float32 refuses complex tensors: the first step with a complex
    parameter stopped the recording. A complex gradient's norm is sqrt(sum |z|^2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 1), _SpectralIn(), _SpectralOut(), nn.ReLU(),
                          nn.Conv1d(8, 1, 1))
    x = torch.randn(4, 1, 16)
    outs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: outs.__setitem__(n, out)) for n in ("0", "1", "2", "4")]
    loss = model(x).pow(2).mean()
    for h in hooks:
        h.remove()
    assert outs["1"].is_complex()
    acts = {n: float(g.norm()) for n, g in zip(outs, torch.autograd.grad(loss, list(
        outs.values()), retain_graph=True), strict=True)}
    loss.backward()
    params = {name: float(p.grad.norm()) for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (gradviz stopping says so in a warning)
        with gradviz.record(model, None, native=native_) as rec:
            for _ in range(3):  # (no update: every step the same; step 0 learns the graph)
                model.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                rec.step(loss)
    if native_:
        assert rec._nat.armed == 2
    run = rec.to_run()
    for name, norm in params.items():
        layer, pname = name.rsplit(".", 1)
        assert run.param_history(layer, pname) == [pytest.approx(norm, rel=1e-5)] * 3, name
    for name, norm in acts.items():
        got = run.node_history(name, "activation_grad_norm")
        assert got == [pytest.approx(norm, rel=1e-5)] * 3, name


@pytest.mark.parametrize("native_", [False, True])
def test_a_model_converted_during_the_run_keeps_its_activations(native_: bool) -> None:
    """model.double() (or .to(device)) gives each parameter a new AccumulateGrad node: with
    the old ones held, every later backward was judged not to fill .grad, and activations
    and edges went missing without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with gradviz.record(model, None, native=native_) as rec:
        for step in range(4):
            if step == 2:
                model.double()
                x, y = x.double(), y.double()
            model.zero_grad()
            out = model(x)
            loss = nn.functional.mse_loss(out, y)
            want, = torch.autograd.grad(loss, out, retain_graph=True)
            loss.backward()
            rec.step(loss)
            got = rec.to_run().node_history("2", "activation_grad_norm")[step]
            assert got == pytest.approx(float(want.norm()), rel=1e-5), step


def test_reentrant_checkpointing_around_the_only_trainable_layers() -> None:
    """LoRA-style: frozen embedding, norm and head; trainable blocks under reentrant
    checkpointing. .grad is filled by the backward nested in the checkpoint, so the outer
    one (the frozen head's) was judged not to fill it, and the head's activations and
    edges went missing."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.norm, self.head = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x).requires_grad_()
            for b in self.blocks:
                h = checkpoint(b, h, use_reentrant=True)
            return self.head(self.norm(h))

    torch.manual_seed(0)
    model = Net()
    for m in (model.emb, model.norm, model.head):
        m.requires_grad_(False)
    x = torch.randn(16, 4)
    outs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: outs.__setitem__(n, out)) for n in ("norm", "head")]
    loss = model(x).pow(2).mean()
    for h in hooks:
        h.remove()
    want = {n: float(g.norm()) for n, g in zip(outs, torch.autograd.grad(loss, list(
        outs.values())), strict=True)}
    with gradviz.record(model, None) as rec:
        for _ in range(2):
            model.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            rec.step(loss)
    run = rec.to_run()
    for name, norm in want.items():
        got = run.node_history(name, "activation_grad_norm")
        assert got == [pytest.approx(norm, rel=1e-5)] * 2, name
    assert run.edge_history("norm->head") == [pytest.approx(want["norm"], rel=1e-5)] * 2


def test_a_forgotten_rec_step_is_capped_natively_as_in_python() -> None:
    """capture.MAX_PASSES held in Python only: natively every pass was armed and kept for
    the step that never came (all 30,000 summed into it, memory growing), without a word."""
    said: dict[bool, list[str]] = {}
    got: dict[bool, list[float | None]] = {}
    for native_ in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with gradviz.record(model, None, native=native_) as rec:
                for step in range(3):
                    passes = capture.MAX_PASSES + 50 if step == 2 else 1
                    for _ in range(passes):  # (step 2: rec.step() "forgotten" meanwhile)
                        model.zero_grad()
                        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
                    rec.step()
        if native_:
            assert rec._nat.armed == 1 + capture.MAX_PASSES  # step 1, and step 2's first
        said[native_] = [str(w.message) for w in caught if "rec.step()" in str(w.message)]
        got[native_] = rec.to_run().node_history("2", "activation_grad_norm")
    assert said[True] == said[False] == [capture._capped_warning(capture.MAX_PASSES)]
    assert got[True] == pytest.approx(got[False], rel=1e-5)


def test_a_step_of_more_passes_than_the_default_cap_is_recorded_whole() -> None:
    """REINFORCE over a long episode: one backward through 1,500 forward passes. With
    max_passes above that, every pass counts, natively as in Python, and nothing warns."""
    for native_ in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        g = torch.Generator().manual_seed(1)
        want = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no warning of a forgotten step)
            with gradviz.record(model, None, native=native_, max_passes=2000) as rec:
                for _ in range(2):
                    model.zero_grad()
                    episode = torch.cat([model(torch.randn(1, 4, generator=g))
                                         for _ in range(1500)])
                    episode.pow(2).mean().backward()
                    rec.step()
                    # dL/d(output) of every pass, combined: the norm of 2 * o / 1500
                    want.append(float((2 * episode.detach() / 1500).norm()))
        if native_:
            assert rec._nat.armed == 1500  # step 1's passes (step 0 taught the graph)
        got = rec.to_run().node_history("2", "activation_grad_norm")
        assert got == pytest.approx(want, rel=1e-5), native_

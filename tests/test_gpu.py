"""On a CUDA device: no host-device synchronisation while recording, one transfer a step.

torch.cuda.set_sync_debug_mode("error") makes every operation that synchronises the host
with the device (``.item()``, ``.tolist()``, a blocking copy to the host, ``nonzero``...)
raise. Forward and backward of a recorded step must run under it untouched: the norms stay
device tensors until ``rec.step()``, which queues them to the host in one copy without
waiting for it (a pinned buffer, non_blocking); the wait comes when rows are read. Skipped
without CUDA.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradviz
from gradviz import demos

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODELS = ["mlp", "residual", "dense", "cnn", "resnet", "transformer"]


@contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    """torch.cuda.set_sync_debug_mode for a block; back to what it was after."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _setup(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    demo = demos.DEMOS[name]
    torch.manual_seed(0)
    model = demo.build().cuda()
    x, y = demo.data(32, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # one plain step first: CUDA, cuBLAS and cuDNN initialise here, not under the check
    F.cross_entropy(model(x.cuda()), y.cuda()).backward()
    opt.zero_grad()
    torch.cuda.synchronize()
    return model, x.cuda(), y.cuda(), opt


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


@pytest.mark.parametrize("how", ["plain", "stats", "early"])
@pytest.mark.parametrize("name", MODELS)
def test_no_sync_during_forward_and_backward(name: str, how: str) -> None:
    model, x, y, opt = _setup(name)
    try:
        with sync_debug("error"):  # control: the same step without gradviz
            _forward_backward(model, x, y)
    except RuntimeError as e:  # e.g. a CUDA embedding backward counts its unique indices
        pytest.skip(f"torch itself synchronises in this model's step ({e}): nothing to check")
    opt.zero_grad()
    with gradviz.record(model, path=None, activation_stats=how == "stats",
                        early_param_norms=how == "early") as rec:
        for _ in range(3):
            with sync_debug("error"):
                loss = _forward_backward(model, x, y)
                rec.step(loss)  # its one transfer is queued, not waited for
            opt.step()
            opt.zero_grad()
    assert not rec._failed
    run = rec.to_run()
    assert len(run.steps) == 3 and run.loss[-1] is not None
    layer = next(n["id"] for n in run.nodes if n["kind"] == "layer")
    assert run.node_history(layer)[-1] is not None


def _syncs(fn: Callable[[], object]) -> int:
    """How many synchronising operations fn() runs (sync debug mode "warn", counted)."""
    with warnings.catch_warnings(record=True) as caught, sync_debug("warn"):
        warnings.simplefilter("always")
        fn()
    return sum("synchronizing" in str(w.message) for w in caught)


def _device_to_host_copies(fn: Callable[[], object]) -> int | None:
    """Device-to-host copies fn() makes, from the CUDA profiler; None if it sees no kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    device = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not device:
        return None  # the profiler saw no device activity (no CUPTI): cannot count
    # kineto names copies "Memcpy DtoH (Device -> Pageable)" (or "-> Pinned")
    return sum("Memcpy DtoH" in n for n in device)


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("name", ["mlp", "residual", "transformer"])
def test_one_transfer_per_recorded_step(name: str, stats: bool) -> None:
    model, x, y, opt = _setup(name)
    with gradviz.record(model, path=None, activation_stats=stats, every=2) as rec:
        for step in range(8):
            loss = _forward_backward(model, x, y)
            torch.cuda.synchronize()
            if step in (4, 5):  # profile a late step of each kind: columns exist, nothing new
                copies = _device_to_host_copies(functools.partial(rec.step, loss))
                if copies is not None:
                    want = 1 if step % 2 == 0 else 0
                    assert copies == want, f"step {step}: {copies} device-to-host copies"
            else:
                # a recorded step queues every norm (and the loss) to the host in one copy
                # and does not wait for it; a step that is not recorded touches the device
                # not at all
                n = _syncs(functools.partial(rec.step, loss))
                assert n == 0, f"step {step}: {n} synchronisations in rec.step()"
            opt.step()
            opt.zero_grad()
    assert rec.to_run().steps == [0, 2, 4, 6]


def _layer_norms(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's gradient norm (all its parameters together), as device tensors."""
    out = {}
    for name in names:
        grads = [p.grad for p in model.get_submodule(name).parameters() if p.grad is not None]
        out[name] = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.float()) for g in grads]))
    return out


def test_a_read_right_after_a_step_waits_for_its_transfer() -> None:
    """The copy is queued, not waited for: reading the history while the device is still
    busy (a long kernel queued before the step) must wait for the row, not read the buffer
    as it was."""
    model, x, y, opt = _setup("mlp")
    with gradviz.record(model, path=None) as rec:
        for step in range(3):
            loss = _forward_backward(model, x, y)
            torch.cuda._sleep(300_000_000)  # about 0.2 s of device time, queued first
            rec.step(loss)
            busy = not torch.cuda.current_stream().query()
            run = rec.to_run()  # reads the history now
            layers = [n["id"] for n in run.nodes if n["kind"] == "layer"]
            got = {name: run.node_history(name)[-1] for name in layers}
            got_loss = run.loss[-1]
            want = {k: float(v) for k, v in _layer_norms(model, layers).items()}
            assert busy, "the device finished before the read: this checks nothing"
            assert got == pytest.approx(want, rel=1e-5), f"step {step}"
            assert got_loss == pytest.approx(float(loss), rel=1e-6)
            opt.step()
            opt.zero_grad()
    assert rec.to_run().steps == [0, 1, 2]


def test_layer_statistics_on_the_device_match_the_cpu() -> None:
    """On CUDA the forward statistics take a shorter path (mean, std, count_nonzero): the
    same numbers as the CPU's passes, NaN, infinities and negative zeros included."""
    from gradviz import capture

    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(64, 256, generator=g),
        torch.randn(64, 256, generator=g).relu(),
        torch.randn(4000, generator=g, dtype=torch.float64) * 1e3 + 5,
        torch.tensor([0.0, 1.0, float("nan"), 2.0, -0.0, 0.0, 3.0, float("inf")]),
        torch.tensor([1.0, float("inf"), 2.0]),  # the mean is inf, as on the CPU
        torch.tensor([float("inf"), float("inf")]),
        torch.tensor([-float("inf"), float("inf"), 1.0]),
        torch.tensor([-0.0, 0.0, 0.0]),
        torch.tensor([2.5]),
        torch.randn(32, 8, generator=g).half(),
    ]
    for t in cases:
        cpu = capture._layer_stats(t)
        gpu = capture._layer_stats(t.cuda()).cpu()
        assert gpu.dtype == cpu.dtype == torch.float32
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_no_step_waits_for_the_device_and_every_row_arrives(tmp_path: Path) -> None:
    """150 recorded steps, each with the device kept busy past its rec.step(): the step
    returns while the device still works at every one (through full-buffer drains when
    they come, a change of layout at 100, the first step's setup, the file flushed as often
    as it can be: the flush takes only rows already on the host), and every row in the file
    equals autograd's norms."""
    model, x, y, opt = _setup("mlp")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    want: list[dict[str, torch.Tensor]] = []
    waited = []
    stream = torch.cuda.current_stream()
    path = tmp_path / "run.json"
    with gradviz.record(model, path=path, flush_seconds=0.0) as rec:
        for step in range(150):
            if step == 100:  # no gradient for the first layer from here: another layout
                model.get_submodule(linears[0]).requires_grad_(False)
            loss = _forward_backward(model, x, y)
            live = [n for n in linears if model.get_submodule(n).weight.grad is not None]
            want.append(_layer_norms(model, live))
            # about 50 ms of device time, queued before: far more than the host needs for
            # a step, even the first (pinned buffer, writer thread) on a slow host
            torch.cuda._sleep(100_000_000)
            rec.step(loss)
            if stream.query():  # the device is idle: this rec.step() waited for it
                waited.append(step)
            opt.step()
            opt.zero_grad()
    assert not rec._failed
    assert waited == [], f"rec.step() waited for the device at steps {waited}"
    run = gradviz.load(path)
    assert run.steps == list(range(150))
    for name in linears:
        got = run.node_history(name)
        for step in range(150):
            if name in want[step]:
                assert got[step] == pytest.approx(float(want[step][name]), rel=1e-5), (
                    name, step)
            else:
                assert got[step] is None, (name, step)


def test_a_model_moved_to_the_gpu_mid_run_gets_the_queued_copy() -> None:
    """Recording starts on the CPU; the model moves to the GPU at step 3: from there the
    rows go through a pinned buffer with events, and every norm is right on both sides."""
    demo = demos.DEMOS["mlp"]
    torch.manual_seed(0)
    model = demo.build()
    x, y = demo.data(32, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    want = []
    with gradviz.record(model, path=None) as rec:
        for step in range(6):
            if step == 3:
                model.cuda()
                x, y = x.cuda(), y.cuda()
            loss = _forward_backward(model, x, y)
            want.append(float(_layer_norms(model, [first])[first]))
            rec.step(loss)
            rows = rec._rows
            assert rows is not None and rows.device.type == ("cuda" if step >= 3 else "cpu")
            assert (rows.events is not None) == (step >= 3)
            opt.step()
            opt.zero_grad()
    got = rec.to_run().node_history(first)
    assert got == pytest.approx(want, rel=1e-5)

"""Memory: nothing from a step outlives it, and the history costs about its own float32 size.

Autograd nodes take no weak references, but a tensor saved by the graph is kept alive (its
Python object too) for as long as any node of that graph is: so weak references to every
module output and every gradient that flowed through one are dead after a step exactly
when no tensor and no graph of that step survived it.
"""

from __future__ import annotations

import copy
import gc
import pickle
import tracemalloc
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradviz
from gradviz import demos, schema, store


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


class Watch:
    """Weak references to every module output of a model, and to the gradients they get."""

    def __init__(self, model: nn.Module) -> None:
        self.refs: list[weakref.ref[torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules()]

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        for t in _tensors(output):
            self.refs.append(weakref.ref(t))
            if t.requires_grad:
                t.register_hook(self.grad_hook)

    def grad_hook(self, g: torch.Tensor) -> None:
        self.refs.append(weakref.ref(g))

    def alive(self) -> list[torch.Tensor]:
        gc.collect()
        return [t for r in self.refs if (t := r()) is not None]


def _setup(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    demo = demos.DEMOS[name]
    torch.manual_seed(0)
    model = demo.build()
    x, y = demo.data(16, torch.Generator().manual_seed(0))
    return model, x, y, torch.optim.SGD(model.parameters(), lr=0.01)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
           rec: gradviz.Recorder, n: int = 1) -> None:
    """n recorded training steps; everything the user holds is local: gone on return."""
    for _ in range(n):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        rec.step(loss)
        opt.step()


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("name", ["mlp", "residual", "dense", "resnet", "transformer"])
def test_no_tensor_or_graph_outlives_its_step(name: str, stats: bool) -> None:
    model, x, y, opt = _setup(name)
    watch = Watch(model)
    with gradviz.record(model, path=None, activation_stats=stats) as rec:
        for _ in range(3):
            watch.refs.clear()
            _train(model, x, y, opt, rec)
            assert len(watch.refs) > 10  # the watch saw outputs and gradients
            alive = watch.alive()
            assert alive == [], f"{len(alive)} tensors of the step are still alive"
        assert len(rec.recording.history) == 3


def test_forward_without_backward_frees_its_graph() -> None:
    """A forward that is never backpropagated (evaluation with grad on) leaves nothing."""
    model, x, y, opt = _setup("residual")
    watch = Watch(model)
    with gradviz.record(model, path=None) as rec:
        F.cross_entropy(model(x), y)  # dropped at once: its graph must go with it
        assert watch.alive() == []
        with pytest.warns(RuntimeWarning, match="no parameter gradient"):  # (as it should)
            rec.step()
        watch.refs.clear()
        loss = F.cross_entropy(model(x), y)
        assert watch.alive() != []  # control: while the user holds the loss, the graph lives
        del loss
        assert watch.alive() == []


def test_live_tensors_do_not_grow_over_steps() -> None:
    model, x, y, opt = _setup("residual")

    def count() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated names
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    with gradviz.record(model, path=None, activation_stats=True) as rec:
        counts = []
        for n in (6, 24):  # after 6 steps and after 30
            _train(model, x, y, opt, rec, n)
            counts.append(count())
    assert counts[0] == counts[1]


# -- the history's own memory --------------------------------------------------------------


def test_history_across_chunks_and_late_columns() -> None:
    h = store.History()
    n = 3 * store.CHUNK_ROWS + 100
    want: dict[tuple[str, ...], np.ndarray] = {}
    for step in range(n):
        if step in (0, 7, store.CHUNK_ROWS + 5):  # series appear mid-chunk, as layers do
            for k in range(3):
                new: tuple[str, ...] = ("edge", f"s{step}-{k}")
                h.column(new)
                want[new] = schema.absent_array(n)
        cols = list(h.columns.values())
        vals = [float(step * 10 + c) for c in cols]
        h.append(step * 2, cols, vals)
        for key, c in h.columns.items():
            want[key][step] = step * 10 + c
    for key, a in want.items():
        assert np.array_equal(h.series(key).view("<u4"), a.view("<u4")), key
    mat = h.matrix()
    assert mat.shape == (len(h.columns), n) and mat.flags.c_contiguous
    for key, c in h.columns.items():
        assert np.array_equal(mat[c].view("<u4"), want[key].view("<u4"))
    assert h.last(("edge", "s0-0")) == (n - 1) * 10
    own = n * len(h.columns) * 4
    assert own <= h.nbytes() <= own + store.CHUNK_ROWS * len(h.columns) * 4


def test_huge_and_non_finite_values_append_quietly_and_exactly() -> None:
    """Exploding norms near float32's top must not make numpy warn on the user's console
    (a float32 sum of them overflows), and NaN keeps its one bit pattern."""
    h = store.History()
    cols = [h.column(("edge", str(k))) for k in range(4)]
    big = float(np.finfo(np.float32).max)
    rows = [[big, big, big, 1.0], [big, float("inf"), -float("inf"), 2.0],
            [float("nan"), big, 0.0, 3.0], [1e39, -1e39, big, 4.0]]  # (1e39: past float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, row in enumerate(rows):
            h.append(step, cols, row)
    got = h.matrix().T
    assert got[0].tolist() == rows[0] and got[1].tolist() == rows[1]
    assert np.isnan(got[2][0]) and got[2][1:].tolist() == rows[2][1:]
    assert got[2][:1].view("<u4")[0] == np.float32("nan").view("<u4")
    assert not schema.absent_mask(got[2][:1])[0]
    assert got[3].tolist() == [float("inf"), -float("inf"), big, 4.0]


def test_snapshot_shares_full_chunks_and_stays_independent() -> None:
    h = store.History()
    col = h.column(("loss",))
    for step in range(2 * store.CHUNK_ROWS + 10):
        h.append(step, [col], [float(step)])
    snap = h.snapshot()
    assert np.shares_memory(snap._chunks[0], h._chunks[0])  # no copy of what is final
    h.append(10**6, [col], [-1.0])
    h.column(("edge", "late"))
    h.append(10**6 + 1, [col, 1], [-2.0, 5.0])
    assert len(snap) == 2 * store.CHUNK_ROWS + 10
    assert snap.series(("loss",))[-1] == 2 * store.CHUNK_ROWS + 9
    assert snap.last(("edge", "late")) is None
    assert h.series(("loss",))[-2:].tolist() == [-1.0, -2.0]
    snap.append(10**7, [col], [7.0])  # a snapshot can grow on its own, too
    assert snap.last(("loss",)) == 7.0 and h.last(("loss",)) == -2.0


def _write_peak(path: Path, rec: store.Recording) -> int:
    """store.write(path, rec), and the most it had allocated at once (tracemalloc)."""
    tracemalloc.start()
    try:
        store.write(path, rec)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writing_the_file_holds_no_copy_of_the_history(tmp_path) -> None:
    """store.write streams the series: what it allocates on top of the history stays a small
    fraction of it (the whole document at once, to_document + dumps, took 2.8 times the
    history by this measure)."""
    h_rec = store.Recording(meta={"model": "Toy"})
    h = h_rec.history
    series = 3000
    for k in range(series):
        h_rec.edges[f"e{k}"] = {"source": "a", "target": "b", "via": []}
        h.column(("edge", f"e{k}"))
    cols = list(range(series))
    values = np.linspace(0.5, 1.5, series, dtype=np.float32)
    for step in range(1000):
        h.append(step, cols, values)
    own = len(h) * series * 4  # 12 MB
    path = tmp_path / "t.json"
    peak = _write_peak(path, h_rec)
    assert path.stat().st_size > own  # (base64: the whole history went in)
    assert peak < 0.5 * own, f"writing took {peak / own:.2f}x the history on top"


def test_the_writer_waits_longer_after_a_slow_write(tmp_path, monkeypatch) -> None:
    """Writing stays at most a tenth of wall time: after a write that took 1 s, the next is
    due 10 s after it began, not at the usual interval (on a clock the test moves: each
    write takes what the test says)."""
    clock, cost = [100.0], [0.01]

    def write(path: Path, rec: store.Recording) -> None:
        clock[0] += cost[0]

    monkeypatch.setattr(store.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(store, "write", write)
    w = store.Writer(tmp_path / "t.json", every_seconds=2.0)

    def due() -> bool:  # (as rec.step() asks)
        return clock[0] >= w.due_at

    assert due()  # never written
    w.flush(store.Recording(), wait=True)  # a quick write: the usual 2 s
    clock[0] = 101.9
    assert not due()
    clock[0] = 102.0
    assert due() and w.due_at == 102.0
    cost[0] = 1.0
    w.flush(store.Recording(), wait=True)  # began at 102, took 1 s: due at 112
    clock[0] = 111.9
    assert not due()
    clock[0] = 112.0
    assert due()


def test_a_long_narrow_history_is_written_in_pieces(tmp_path, monkeypatch) -> None:
    """Few series over many steps: blocks are bounded by BLOCK_VALUES, a series longer than
    that goes in pieces whose base64 joins into the series' own, and memory on top stays
    within a few blocks however long the history is."""
    monkeypatch.setattr(store, "BLOCK_VALUES", 1 << 12)
    rec = store.Recording(meta={"model": "Toy"})
    h = rec.history
    rec.nodes["a"] = {"kind": "layer", "type": "Linear", "param_count": 4, "params": {
        "weight": {"shape": [4], "numel": 4, "trainable": True},
        "bias": {"shape": [4], "numel": 4, "trainable": True}}}  # bias: absent throughout
    for k in range(8):
        rec.edges[f"e{k}"] = {"source": "a", "target": "a", "via": []}
    cols = [h.column(("edge", f"e{k}")) for k in range(8)] + [h.column(("loss",)),
                                                              h.column(("param", "a", "weight"))]
    steps = 12 * (1 << 12) + 7  # (not a multiple of the piece length)
    rng = np.random.default_rng(0)
    values = rng.random((steps, len(cols))).astype(np.float32)
    for step in range(steps):
        h.append(step, cols, values[step])
    own = steps * len(cols) * 4  # 2 MB
    path = tmp_path / "t.json"
    peak = _write_peak(path, rec)
    assert path.read_bytes() == store.dumps(rec.to_document())
    run = gradviz.load(path)
    assert np.array_equal(run.array(("edge", "e3")), values[:, 3])
    assert run.param_history("a", "bias") == [None] * steps
    assert peak < 0.5 * own, f"writing took {peak / own:.2f}x the history on top"


def test_reads_in_the_middle_of_an_append_see_the_rows_before_it() -> None:
    """append changes len(steps) last, and every read counts rows from it: a read that
    comes in the middle (a signal handler) sees a whole history, without the new row."""
    h = store.History()
    col = h.column(("loss",))
    for step in range(16):  # the first chunk (16 rows) exactly full
        h.append(step, [col], [float(step)])
    before = (h.matrix().copy(), h.steps[:], h.last(("loss",)))
    h._chunks.append(store._absent((16, 1)))  # an append that has made its new chunk,
    h._chunks[-1][0, 0] = 99.0  # written its row
    h._used = 1  # and moved its cursor, but not yet added the step
    assert np.array_equal(h.matrix(), before[0]) and h.steps == before[1]
    assert h.last(("loss",)) == before[2] == 15.0
    snap = h.snapshot()
    assert len(snap) == 16 and np.array_equal(snap.matrix(), before[0])
    assert h.series(("loss",)).tolist() == list(map(float, range(16)))
    h._steps.append(16)  # the append ends: now the row is there
    assert h.last(("loss",)) == 99.0 and h.matrix().shape == (1, 17)


def test_step_numbers_are_ints_and_places_are_not_negative() -> None:
    """The file writes step numbers as integers: a float step is refused at append, a numpy
    or bool one becomes an int (so the streamed file and orjson's agree); rows() counts
    places from 0 and refuses negative ones rather than read them as slices would."""
    h = store.History()
    col = h.column(("loss",))
    h.append(True, [col], [1.0])  # type: ignore[arg-type]
    h.append(np.int64(3), [col], [2.0])  # type: ignore[arg-type]
    assert h.steps == [1, 3] and all(type(s) is int for s in h.steps)
    with pytest.raises(TypeError):
        h.append(6.5, [col], [3.0])  # type: ignore[arg-type]
    assert h.steps == [1, 3]
    assert h.rows([col], 1).tolist() == [[2.0]]
    for start, stop in ((-1, None), (0, -1)):
        with pytest.raises(ValueError, match="count from 0"):
            h.rows([col], start, stop)


def test_a_recording_pickles_and_deep_copies_without_its_recorder() -> None:
    """torch.save(rec.recording) or a multiprocessing queue: the lock and the recorder's
    callback stay behind, every buffered step comes along."""
    model, x, y, opt = _setup("mlp")
    with gradviz.record(model, path=None) as rec:
        h = rec.recording.history
        _train(model, x, y, opt, rec, 5)
        assert h.before_read is not None
        for copied in (pickle.loads(pickle.dumps(rec._recording)), copy.deepcopy(rec._recording)):
            assert copied.history.before_read is None
            assert copied.history.steps == list(range(5))
            assert np.array_equal(copied.history.matrix().view("<u4"), h.matrix().view("<u4"))
            copied.history.append(5, [0], [1.0])  # it is a History of its own
        assert len(h) == 5


def test_recording_grows_by_about_the_history_size() -> None:
    """Over many recorded steps, memory grows by the float32 values and little else."""
    model, x, y, opt = _setup("mlp")
    with gradviz.record(model, path=None) as rec:
        _train(model, x, y, opt, rec, 20)
        h = rec.recording.history
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        steps = 1500
        _train(model, x, y, opt, rec, steps)
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    row = len(h.columns) * 4
    # the values themselves, at most one chunk ahead, the step number, and nothing per layer
    assert grown <= steps * row + store.CHUNK_ROWS * row + steps * 80

"""Attach to a PyTorch model, measure its gradient flow each recorded step, keep the history.

How it captures (DESIGN.md 4):

- A forward hook on every recorded layer notes the call: the autograd nodes of its inputs
  and outputs, nothing more (it runs for every layer of every recorded forward).
- When the root module's forward returns, gradviz.dataflow walks the autograd graph between
  those calls and returns the edges (and junctions). One post-hook per autograd node sees
  both sides of it: its grad_outputs are dL/d(output) of the layer call or junction that
  made it (what a full backward hook gets as ``grad_output``, but it survives in-place ops
  after the layer, ``nn.ReLU(inplace=True)`` or ``out += identity``, and causes no graph
  break under ``torch.compile``); its grad_inputs are the ports of edges: each edge's share
  of dL/d(producer output), exactly. A layer called outside the root's forward (no pass end
  follows) gets a tensor hook on its output at once instead.
- Parameter gradients are read in :meth:`Recorder.step`, after ``backward()`` returned, when
  ``.grad`` is final: one fused ``torch._foreach_norm`` over all of them.

Every norm stays a float32 tensor on its device until ``step()``, which moves them all to the
host in one transfer. Several values for one series in one step (a layer called twice, several
micro-batches) combine as the norm of their concatenation: sqrt of the sum of squares.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import math
import operator
import os
import platform
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from time import monotonic as _monotonic
from typing import Any

import numpy as np
import torch
from torch import nn

from . import dataflow, store
from .errors import RecordingError

__all__ = ["Recorder", "record"]


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in a nested structure of tuples, lists and mappings (ModelOutput too)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 8:
        return
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), depth + 1)


# Activation functions whose outputs say something on their own: exact zeros for every
# sample mean a dead unit; values pinned near a bound mean saturation (derivative near 0).
DEAD_AT_ZERO = ("ReLU", "ReLU6")
BOUNDS = {"Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0), "Hardtanh": (-1.0, 1.0),
          "Hardsigmoid": (0.0, 1.0), "Softsign": (-1.0, 1.0)}
LAYER_STATS = ("act_mean", "act_std", "act_min", "act_max", "act_zero_frac")


def _layer_stats(t: torch.Tensor) -> torch.Tensor:
    """Mean, std, min, max and fraction of exact zeros of a layer's output, in float32.

    Written for speed, not brevity: torch's std and (x == 0).mean() are slow elementwise
    passes on CPU. The sum, the norm of x - mean (the two-pass standard deviation) and
    the sum of |sign(x)| (how many are not zero) are fast vectorised passes.
    """
    x = t.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    n = x.numel()
    lo, hi = torch.aminmax(x)
    if x.is_cuda and n > 1:
        # On a GPU a small model's step is bound by kernel launches, not arithmetic: there
        # torch's one-kernel std (Welford) and count_nonzero (NaN is not zero, -0.0 is) cost
        # about 8 launches where the passes below cost 14. The mean is the CPU's (an inf
        # activation gives inf, where std_mean's Welford mean would give NaN); the std
        # agrees too, except that it stays finite where the CPU's passes overflow (a sum
        # of values beyond float32's range).
        mean = x.mean()
        std = torch.std(x)
        nonzero = torch.count_nonzero(x).to(x.dtype)
        return torch.stack([mean, std, lo, hi, 1 - nonzero / n]).float()
    mean = x.sum() / n
    if n > 1:
        std = torch.linalg.vector_norm(x - mean) / math.sqrt(n - 1)
    else:
        std = torch.zeros((), dtype=x.dtype, device=x.device)
    # how many are not zero: |sign(x)| (-0.0 counts as zero, as with x == 0), with NaN, whose
    # sign is 0 but which is not zero, made 1 first (isnan(x).sum() would cost 5x as much)
    nonzero = x.nan_to_num(nan=1.0).sign_().abs_().sum()
    return torch.stack([mean, std, lo, hi, 1 - nonzero / n]).float()


def _unit_stat(module: nn.Module, out: torch.Tensor, margin: float) -> torch.Tensor:
    """ReLU: fraction of units zero for every sample; sigmoid/tanh: fraction near a bound."""
    x = out.detach()
    name = type(module).__name__
    if name in DEAD_AT_ZERO:
        units = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
        # A ReLU's outputs are >= 0, so "zero for every sample" is "largest value is 0"
        # (one reduction, no boolean copy); NaN stays "not dead", as with (x == 0).all().
        return (units.amax(dim=0) == 0).float().mean()
    lo, hi = BOUNDS[name]
    near = (x <= lo + margin) | (x >= hi - margin)
    return near.sum() / max(near.numel(), 1)


def _norm(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2 norm reduced in float32 (a half-precision norm overflows although no element does).

    A float64 gradient is reduced in float64 (torch will not narrow it), then converted.
    A gradient with a graph of its own (a backward with create_graph=True: gradient
    penalties, second-order methods) is measured without extending that graph.
    """
    if t.requires_grad:
        t = t.detach()
    if t.is_sparse or t.is_complex():  # (checked first: _norm runs in backward, for each)
        t = _plain(t)
    if t.dtype == torch.float64 and dtype != torch.float64:
        return torch.linalg.vector_norm(t).to(dtype)
    return torch.linalg.vector_norm(t, dtype=dtype)


_CPU = torch.device("cpu")
HOT_NUMEL = 1 << 15  # parameters this large get their norm in backward (see _hot_hook)
MAX_PLANS = 32  # graph shapes (and value layouts) remembered; a model may have a few
MAX_PASSES = 1024  # default max_passes: forward passes gathered for one step (micro-batches)
NATIVE_MISSES = 4  # native steps with a pass of a new shape before a recorder stays in Python
NATIVE_LAYOUTS = 4 * MAX_PLANS  # layouts the native recorder numbers before it starts afresh


@dataclasses.dataclass
class _Plan:
    """Which autograd nodes of a pass to hook, by their place in dataflow.shape's walk.

    One post-hook per node sees both sides: its grad_outputs (dL/d(output) of the layer
    call or junction that made the node) and its grad_inputs (the ports of edges).
    """

    # (node, outs, ins); outs: (output index or -1 for all, column, call index or -1),
    # ins: (input index, column, group): grad_inputs[index], or for index < 0
    # grad_outputs[-1 - index]; measured alone (group -1), added to group g (g >= 0) or
    # taken from group -2 - g (g <= -2)
    hooks: list[tuple[int, tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]]
    groups: list[tuple[int, int]]  # (column, parts) of series that arrive in several parts
    # (call index, group) of outputs a call also reads: dL/d(output) less the inner part
    inner: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class _Parts:
    """A hooked pass's series that arrive in parts: [column, running sum, parts left, parts]."""

    __slots__ = ("groups", "open")

    def __init__(self, groups: list[list[Any]]) -> None:
        self.groups = groups
        self.open = True  # False once its step is recorded: later gradients are ignored


@dataclasses.dataclass
class _Layout:
    """Index arrays that put one step's vector of values into its history columns.

    Most series get one value a step (a parameter's norm, a layer's output gradient, the
    loss): those are taken from the vector as they are. Only series with several values (a
    layer's norm over its parameters, a layer called twice) need arithmetic.
    """

    cols: np.ndarray  # the row's columns: taken as they are, squared-norm sums, means
    take: np.ndarray  # places in the vector of the values taken as they are
    sq_at: np.ndarray  # per squared norm added up: its place in the vector
    sq_group: np.ndarray  # ... and which series it adds to
    n_sq: int
    stat_at: np.ndarray  # per statistic averaged: its place in the vector
    stat_group: np.ndarray
    n_stat: int
    stat_count: np.ndarray  # values per averaged series
    has_params: bool
    width: int  # length of the step's vector


ROWS_AT_ONCE = 64  # lean steps buffered before they go into the history together


class _Rows:
    """Lean steps of one layout, their values in a host buffer, waiting for _drain.

    Turning values into history rows is a dozen numpy calls: done for 64 steps at once, it
    costs a step a fraction of what it would alone (with the caches cold after backward).

    From a CUDA device the buffer is pinned and each row is copied in with non_blocking:
    the step queues its one transfer behind the backward's kernels and goes on at once,
    without waiting for the device. A CUDA event recorded after each copy says when that
    row has arrived; _drain waits for those events before it reads (once per 64 steps, or
    when the history is read), so the device's queue is not emptied at every step.
    """

    __slots__ = ("buf", "device", "draining", "events", "layout", "nat_key", "next", "steps")

    def __init__(self, layout: _Layout, device: torch.device) -> None:
        self.layout = layout
        self.device = device  # where the vectors come from (a new one: new _Rows)
        shape = (ROWS_AT_ONCE, layout.width)
        # per row: the event recorded after its copy from the device (None: copied already)
        self.events: list[Any] | None = None
        if device.type == "cuda":
            try:
                self.buf = torch.empty(shape, dtype=torch.float32, pin_memory=True)
                self.events = [None] * ROWS_AT_ONCE
            except RuntimeError:  # no pinned memory to be had: blocking copies, as on CPU
                self.buf = torch.empty(shape, dtype=torch.float32)
        else:
            self.buf = torch.empty(shape, dtype=torch.float32)
        # (step, its row of buf, its loss if given as a number), added once the row is
        # written, in one append: a drain between the two (a signal handler reading the
        # history) leaves this step for the next. Rows are used in turn (next), so the at
        # most ROWS_AT_ONCE steps waiting are in different rows.
        self.steps: list[tuple[int, int, float | None]] = []
        self.next = 0
        # ROWS_AT_ONCE while a drain reads rows (its steps already taken off): a native step
        # writes its row without the lock only while steps + draining leave a row free.
        self.draining = 0
        # Native steps: this layout's key in Recorder._nat_layouts (None: unknown to the
        # native recorder now, whose numbers start afresh with each C++ recorder)
        self.nat_key: int | None = None

    def put(self, at: int, flat: torch.Tensor) -> None:
        """Copy a step's vector into row ``at``: the step's one transfer from the device."""
        events = self.events
        if events is not None and flat.is_cuda:
            self.buf[at].copy_(flat, non_blocking=True)
            event = events[at]
            if event is None:
                event = events[at] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(flat.device))
        else:
            self.buf[at].copy_(flat)
            if events is not None:
                events[at] = None

    def arrived(self, waiting: list[tuple[int, int, float | None]]) -> int:
        """How many of the waiting steps, from the first, have their row on the host."""
        if self.events is None:
            return len(waiting)
        k = 0
        for _, a, _ in waiting:
            event = self.events[a]
            if event is not None and not event.query():  # (query: does not wait)
                break
            k += 1
        return k

    def wait(self, at: list[int]) -> None:
        """Until the copies into these rows have arrived (nothing to wait for on CPU)."""
        if self.events is not None:
            for a in at:
                event = self.events[a]
                if event is not None:
                    event.synchronize()


class _Hook:
    """A gradviz hook on the user's model, which a copy of the model does not take along.

    copy.deepcopy(model) and torch.save(model) copy a module's hooks with it (an EMA or
    SWA model, a best-model snapshot): the copy gets an inert hook, not one that records
    the copy's passes into this run, and the recorder (which holds locks, so cannot be
    copied or pickled) stays out of it. Loading such a pickle needs gradviz importable.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Inert:
        return _Inert()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Inert, ())


class _Inert:
    """What a gradviz hook becomes on a copy of the model: nothing."""

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
        return None


class _Reg:
    """A native-mode forward hook, put back in its module's hook dict on each recorded step.

    With every=N the native hooks come off after a recorded step and go back on before the
    next. register_forward_hook builds a handle each time (weak references, a counter):
    cold, 1 in N steps, that costs ~10 us, a tenth of what every=10 may cost on a 1 ms
    step. The dict entry under the first registration's id is the same hook, in the same
    place (last), as a fresh registration.
    """

    __slots__ = ("attach", "remove")

    def __init__(self, handle: Any, hooks: dict[int, Any]) -> None:
        # (bound C calls, not methods: no Python frame in rec.step(), cold after backward)
        self.attach = functools.partial(operator.setitem, hooks, handle.id, hooks[handle.id])
        self.remove = functools.partial(hooks.pop, handle.id, None)


def _grad_outputs(output: Any) -> list[torch.Tensor]:
    """A call's output tensors that have an autograd node, one per (node, output index)."""
    seen: list[tuple[Any, int]] = []
    out = []
    for t in _tensors(output):
        if t.grad_fn is not None and (t.grad_fn, t.output_nr) not in seen:
            seen.append((t.grad_fn, t.output_nr))
            out.append(t)
    return out


def _grad_fns(args: Any, kwargs: Any) -> list[Any]:
    """The autograd nodes of a call's input tensors (positional and keyword, nested too)."""
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
        fn = args[0].grad_fn  # the common case, without a generator
        return [fn] if fn is not None else []
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        return [a.grad_fn for a in args if a.grad_fn is not None]
    return [t.grad_fn for t in _tensors((args, kwargs)) if t.grad_fn is not None]


# -- record()'s arguments, checked when it is called ------------------------------------
# (a bad one otherwise failed far away: every periodic write, the first step, or the end)


def _whole(v: Any) -> int | None:
    """v as an int if it is a whole number (numpy's too), not a bool; else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _json_value(v: Any, where: str) -> Any:
    """A metadata value as the file (JSON) holds it: numpy scalars and one-value tensors as
    numbers, paths as text; anything JSON has no form for is refused, naming its key."""
    if isinstance(v, np.generic) or (isinstance(v, torch.Tensor) and v.numel() == 1):
        return _json_value(v.item(), where)  # (numpy's float64 is a float orjson refuses)
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, float):
        return float(v)
    if isinstance(v, int):
        if not store.int_fits(v):
            raise RecordingError(f"{where} is an integer beyond 64 bits, which the file "
                                 f"cannot hold; pass it as a float or a string")
        return int(v)
    if isinstance(v, os.PathLike):
        return str(v)
    if isinstance(v, Mapping):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise RecordingError(f"{where} has the key {k!r}; the file (JSON) takes only "
                                     f"text keys")
            out[k] = _json_value(x, f"{where}[{k!r}]")
        return out
    if isinstance(v, (list, tuple)):
        return [_json_value(x, f"{where}[{i}]") for i, x in enumerate(v)]
    raise RecordingError(f"{where} is a {type(v).__name__}, which the file (JSON) cannot "
                         f"hold; pass numbers, text, lists or dicts")


def _lr(opt: Any) -> float | None:
    """The optimizer's first learning rate, as a number (a tensor's too), or None."""
    groups = getattr(opt, "param_groups", None) if opt is not None else None
    lr = groups[0].get("lr") if groups and isinstance(groups[0], Mapping) else None
    try:
        return None if lr is None or isinstance(lr, bool) else float(lr)
    except (TypeError, ValueError, RuntimeError):
        return None


def _capped_warning(max_passes: int) -> str:
    """What both recorders say once when a step reaches max_passes forward passes."""
    return (f"gradviz saw {max_passes} forward passes without a rec.step(): call rec.step() "
            f"once per optimizer step, after backward; until it is called, gradviz records "
            f"nothing more (a step that really takes more passes, such as a long episode, "
            f"needs record(..., max_passes=N))")


def _checked(path: Any, every: Any, flush_seconds: Any, optimizer: Any, scaler: Any,
             seed: Any, meta: Any, saturation_margin: Any, flags: Mapping[str, Any],
             ) -> tuple[Path | None, int, int | None, dict[str, Any]]:
    """record()'s arguments, each refused in one line naming it and what it takes; returns
    (path, every, seed, meta) in the form the recorder keeps."""
    if path is not None and (isinstance(path, bytes) or not isinstance(path, (str, os.PathLike))):
        raise RecordingError(f"path must be a file path (a str or a pathlib.Path) or None, "
                             f"got {type(path).__name__}")
    n = _whole(every)
    if n is None or n < 1:
        raise RecordingError(f"every must be a whole number >= 1, got {every!r}")
    if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float)) or not (
            math.isfinite(flush_seconds) and flush_seconds >= 0):
        raise RecordingError(f"flush_seconds must be a number of seconds >= 0, got "
                             f"{flush_seconds!r}")
    if optimizer is not None and not isinstance(getattr(optimizer, "param_groups", None), list):
        raise RecordingError(f"optimizer must be a torch.optim.Optimizer (for the file's "
                             f"metadata) or None, got {type(optimizer).__name__}")
    if scaler is not None and not callable(getattr(scaler, "is_enabled", None)):
        raise RecordingError(f"scaler must be a torch.amp.GradScaler or None, got "
                             f"{type(scaler).__name__}")
    whole_seed = None if seed is None else _whole(seed)
    if seed is not None and whole_seed is None:
        raise RecordingError(f"seed must be a whole number or None, got {seed!r}")
    if isinstance(saturation_margin, bool) or not isinstance(
            saturation_margin, (int, float)) or not 0 <= saturation_margin < 0.5:
        raise RecordingError(f"saturation_margin must be a number from 0 to below 0.5 (the "
                             f"distance from a bound that counts as saturated), got "
                             f"{saturation_margin!r}")
    for name, v in flags.items():
        if v is not None and not isinstance(v, bool):
            raise RecordingError(f"{name} must be True, False or None, got {v!r}")
    if meta is not None and not isinstance(meta, Mapping):
        raise RecordingError(f"meta must be a dict of names to values, got "
                             f"{type(meta).__name__}")
    return (None if path is None else Path(path).expanduser(), n, whole_seed,
            _json_value(dict(meta or {}), "meta"))


# The files open recorders write (resolved paths): one recorder a file in a process.
_WRITING: set[Path] = set()
_WRITING_LOCK = threading.Lock()


class Recorder:
    """Records one model's gradient flow; use it through :func:`record`."""

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str] | None = "training_output.json",
        *,
        every: int = 1,
        all_modules: bool = False,
        activation_stats: bool = False,
        saturation_margin: float = 0.01,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        seed: int | None = None,
        flush_seconds: float = 2.0,
        meta: Mapping[str, Any] | None = None,
        distributed: bool | None = None,
        early_param_norms: bool = False,
        native: bool | None = None,
        max_passes: int = MAX_PASSES,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise RecordingError(
                f"gradviz.record needs a torch.nn.Module, got {type(model).__name__}; "
                "pass the model itself"
            )
        if type(model).__name__ == "OptimizedModule" or getattr(
            model, "_compiled_call_impl", None
        ) is not None:
            raise RecordingError(
                "this model is already compiled (torch.compile), and hooks added after "
                "compiling are ignored; attach gradviz first: "
                "with gradviz.record(model) as rec: compiled = torch.compile(model)"
            )
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # record the model inside; its names carry no "module."
        path, every, seed, meta = _checked(
            path, every, flush_seconds, optimizer, scaler, seed, meta, saturation_margin,
            {"native": native, "distributed": distributed})
        passes = _whole(max_passes)
        if passes is None or passes < 1:
            raise RecordingError(f"max_passes must be a whole number >= 1 (the forward "
                                 f"passes one step may take), got {max_passes!r}")
        self.max_passes = passes
        self.model = model
        self.path = path
        self.every = every
        self.all_modules = all_modules
        self.activation_stats = activation_stats
        self.saturation_margin = saturation_margin
        self.early_param_norms = early_param_norms
        self.optimizer = optimizer
        self.scaler = scaler
        # What scaler.unscale_(optimizer) was called for (see _watch_unscale): (id of the
        # optimizer, the scaler's state for it then, id() of its parameters)
        self._unscaled: list[tuple[int, Any, set[int]]] = []
        self._unscale_hook: Any = None
        # Loss-scaled gradients can be so large that their float32 norm overflows while every
        # element is finite; in float64 no float32 tensor's norm can, so inf means inf.
        self._dtype = torch.float64 if scaler is not None and scaler.is_enabled() else (
            torch.float32)
        # torch.distributed: combine ranks with one all-reduce per recorded step; only rank
        # 0 writes the file.
        dist = torch.distributed
        self._world, self._rank = 1, 0
        if distributed is not False and dist.is_available() and dist.is_initialized():
            self._world, self._rank = dist.get_world_size(), dist.get_rank()
        elif (path is not None and dist.is_available() and dist.is_initialized()
              and dist.get_rank() > 0):
            # distributed=False: each rank records on its own. All writing one path, only
            # the last rank's run was kept; rank 0 keeps the path, the others say theirs.
            rank = dist.get_rank()
            own = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
            print(f"gradviz: rank {rank} records on its own (distributed=False), to {own} "
                  f"(rank 0 writes {path})", file=sys.stderr)
            self.path = path = own
        self._sharded = any(hasattr(p, "to_local") for p in model.parameters())  # FSDP2
        self._local: list[tuple[int, torch.Tensor]] = []  # DDP: each rank's own param grads
        self._passes = 0  # forwards of the root module this step, and their batch sizes
        self._batch = 0
        self._recording = store.Recording()
        self._rows: _Rows | None = None  # recorded steps not yet in the history (_drain)
        # A History held on to (h = rec.recording.history) catches up whenever it is read,
        # from any thread: the lock keeps such a read from draining a half-added row.
        self._rows_lock = threading.RLock()
        # the thread in step()'s periodic flush: its drains take only rows already arrived
        self._ready_only: int | None = None
        self._recording.history.before_read = _drain_of(self)
        # rec.step() calls so far, and the quiet steps still to come (see step_count)
        self._count = 0
        self._writer = (store.Writer(self.path, flush_seconds)
                        if self.path and self._rank == 0 else None)
        # why the last write, at the block's end, failed (warned, not raised): None if not
        self.write_error: BaseException | None = None
        self._handles: list[Any] = []
        self._hooks: list[tuple[nn.Module, Any]] = []  # (module, forward hook) to attach
        self._pre_hooks: list[tuple[nn.Module, Any]] = []  # ... forward pre-hooks (in place)
        self._befores: list[list[Any]] = []  # their kept input nodes, one list per module
        self._open = False
        self._failed = False
        # Per forward pass: calls seen so far and names of parameter-free module outputs.
        self._calls: list[dataflow.Call] = []
        self._glue: dict[int, str] = {}
        # Inside the root's forward, a call's output gradient is hooked when the pass ends
        # (with its edges, one hook per autograd node); a call outside it, right away.
        self._in_root = False
        self._root_from = self._stats_from = 0  # where this root pass's calls and stats start
        self._eager: set[int] = set()  # id() of calls hooked right away
        # Per step: (column, 0-d float32 norm tensor) pairs filled in by the hooks, and
        # running vector sums for edges whose gradient arrives in several parts.
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._open_parts: list[_Parts] = []  # per hooked pass: its series measured in parts
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None  # see _emit
        self._hot: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # see _hot_hook
        # Caches for a graph that repeats: hooks by shape of the pass, and how a step's values
        # land in the history by what arrived (see _plan and _layout).
        self._plans: dict[Any, _Plan] = {}
        self._layouts: dict[Any, _Layout] = {}
        self._indices: dict[Any, tuple[Any, Any, Any]] = {}  # _record_general's index arrays
        self._generic = False  # tests: always take the general (distributed/scaler) path
        # Tests set this to see each measured gradient before it becomes a norm.
        self._probe: Any = None
        self._order = 0
        self._calls_seen = 0  # layer calls recorded this step
        # Forward statistics: (columns, values) to average per column at step(), and which
        # layer produced each output node in this pass (to credit an activation's stats).
        self._stats: list[tuple[tuple[int, ...], torch.Tensor]] = []
        self._made_by: dict[int, str] = {}
        self._warned: set[str] = set()
        self._nodes: dict[str, nn.Module] = {}
        self._params: list[tuple[str, str, nn.Parameter]] = []  # (node, param name, param)
        self._unique: list[nn.Parameter] = []  # each parameter tensor once (tied ones too)
        self._unique_of: list[int] = []  # per entry of _params: its place in _unique
        self._describe(meta or {}, seed)
        # The native recorder (gradviz/native.cpp): None, or its C++ half for this model.
        # Python records every pass whose graph shape is new and teaches it to the native
        # recorder; once a step's passes are all learnt, the next recorded steps run with
        # no Python in backward and no per-layer forward hook (with activation_stats, a
        # slim one per layer that calls C++: _native_stat_hooks) (see _on_pass_end, step).
        self._native_asked = native
        self._nat: Any = None
        # its root's forward hook, which also carries the recorded step's two calls to it
        # (notes, take_into) as plain C calls: native.cpp's RootHook
        self._nat_hook: Any = None
        self._native_on = False  # this step: native (root hooks only) or Python (all hooks)
        self._nat_learnt = True  # Python steps: every pass of this step was learnt
        self._nat_learnt_n = 0  # ... and how many passes were
        self._nat_missed = False  # native steps: a pass not armed (reached in backward?)
        self._nat_eager = False  # Python steps: a layer called outside the root's forward
        self._nat_stop: str | None = None  # why this recorder must leave native for good
        self._nat_misses = 0
        self._py_left = 0  # recorded steps still to run in Python after a miss (_native_next)
        # by the C++ layout's number (~number: with a loss given as a number, not a tensor)
        self._nat_layouts: dict[int, _Layout] = {}
        self._nat_hooks: list[tuple[nn.Module, Any]] = []  # forward statistics (native)
        self._nat_regs: list[_Reg] = []  # the native mode's forward hooks, once registered
        # Between recorded steps with every > 1, all cleared: how many rec.step() calls are
        # left that only count (see step); _count counts them already.
        self._quiet_left = 0
        self._writing: Path | None = None  # this recorder's path in _WRITING while open
        self._watch: list[Any] = []  # the global hooks that see the model change (start)

    # -- setup ---------------------------------------------------------------------------

    def _describe(self, extra: Mapping[str, Any], seed: int | None) -> None:
        """Static facts: which modules are nodes, their parameters, and run metadata."""
        owner: dict[int, str] = {}  # id(param) -> "module.param" that first owns it
        unique_at: dict[int, int] = {}  # id(param) -> its place in self._unique
        lazy = next((n for n, p in self.model.named_parameters()
                     if nn.parameter.is_lazy(p)), None)
        if lazy is not None:  # (its shape is unknown: torch's error, far from the cause)
            raise RecordingError(
                f"{lazy} is not initialised yet (a lazy module such as nn.LazyLinear); run "
                f"one forward pass, model(example_batch), before gradviz.record(model, ...)")
        for name, module in self.model.named_modules():
            own = list(module.named_parameters(recurse=False))
            is_leaf = next(iter(module.children()), None) is None
            if not own and not (self.all_modules and is_leaf and name):
                continue
            node_name = name or type(module).__name__
            params: dict[str, dict[str, Any]] = {}
            for pname, p in own:
                info: dict[str, Any] = {
                    "shape": list(p.shape),
                    "numel": p.numel(),
                    "trainable": bool(p.requires_grad),
                }
                first = owner.setdefault(id(p), f"{node_name}.{pname}")
                if first != f"{node_name}.{pname}":
                    info["tied_to"] = first
                params[pname] = info
                self._params.append((node_name, pname, p))
                if id(p) not in unique_at:
                    unique_at[id(p)] = len(self._unique)
                    self._unique.append(p)
                self._unique_of.append(unique_at[id(p)])
            self._nodes[node_name] = module
            self._recording.nodes[node_name] = {
                "kind": "layer" if own else "module",
                "type": type(module).__name__,
                "param_count": sum(p.numel() for _, p in own),
                "params": params,
            }
        unique = {id(p): p for p in self.model.parameters()}.values()
        opt = self.optimizer
        self._recording.meta = {
            "model": type(self.model).__name__,
            "param_count": sum(p.numel() for p in unique),
            "trainable_param_count": sum(p.numel() for p in unique if p.requires_grad),
            "optimizer": type(opt).__name__ if opt is not None else None,
            "lr": _lr(opt),
            "seed": seed,
            "every": self.every,
            "all_modules": self.all_modules,
            "activation_stats": self.activation_stats,
            "world_size": self._world,
            "distributed": (None if self._world == 1 else "fsdp2" if self._sharded else "ddp"),
            "device": str(next(iter(unique)).device) if unique else "cpu",
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "gradviz_version": _version(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **dict(extra),
        }

    @property
    def recording(self) -> store.Recording:
        """Everything recorded so far (steps still waiting in the row buffer included)."""
        self._drain()
        return self._recording

    def start(self) -> Recorder:
        """Attach the hooks (and move an older file at path aside, saying so)."""
        if self._open:
            raise RecordingError("this recorder is already attached; use one `with` block")
        try:
            return self._start()
        except BaseException:
            self._release()
            raise

    def _start(self) -> Recorder:
        if self.path is not None and self._rank == 0:
            why = store.unwritable(self.path)
            if why is not None:
                raise RecordingError(why)
            # (two recorders on one path: each write replaced the other's file, and the
            # older file's backup, made when each started, found nothing yet)
            key = self.path.resolve()
            with _WRITING_LOCK:
                if key in _WRITING:
                    raise RecordingError(f"{self.path} is being recorded to by another "
                                         f"gradviz.record block; give each one its own path")
                _WRITING.add(key)
            self._writing = key
            try:
                moved = store.backup_existing(self.path)
            except OSError as e:  # (a file bind-mounted into a container, or in /proc)
                raise RecordingError(
                    f"cannot keep the earlier {self.path} by renaming it to "
                    f"{self.path.stem}.N{self.path.suffix}: {e.strerror or e}; record to a "
                    f"path in a folder you can write to (--output), or move the file away "
                    f"first") from e
            if moved is not None:
                print(f"gradviz: kept the earlier {self.path} as {moved}", file=sys.stderr)
        self._watch_model()
        self._watch_unscale()
        self.write_error = None  # (a recorder started again: its last block's is gone)
        node_modules = {id(m) for m in self._nodes.values()}
        self._hooks = []
        self._pre_hooks = []
        self._befores = []
        layers: list[tuple[nn.Module, str]] = []
        glue: list[nn.Module] = []
        for name, module in self.model.named_modules():
            node_name = name or type(module).__name__
            if id(module) in node_modules and id(self._nodes.get(node_name)) == id(module):
                before: list[list[Any]] | None = None
                if getattr(module, "inplace", False) is True:
                    # (nn.ReLU(inplace=True) as a node: by its forward hook its input's
                    # autograd node is its own, so its inputs are read before it runs)
                    before = []
                    self._befores.append(before)
                    self._pre_hooks.append((module, self._inputs_hook(before)))
                self._hooks.append((module, self._call_hook(
                    node_name, "" if not name else None, before)))
                layers.append((module, node_name))
            elif next(iter(module.children()), None) is None and name:
                self._hooks.append((module, self._glue_hook(name)))
                glue.append(module)
        self._open, self._quiet_left = True, 0
        # Which backward the gradient hooks count: see _loss_backward
        self._accs = [] if self._sharded else _accumulators(self._unique)
        self._task_seen, self._task_ok = -2, True
        self._nat = self._native_recorder()
        self._nat_hook = None if self._nat is None else self._nat.root_hook(
            _grad_outputs, _dynamo_config_compiled_autograd, globals())
        self._nat_hooks = (self._native_stat_hooks(layers, glue)
                           if self._nat is not None and self.activation_stats else [])
        self._nat_regs = []
        # (a recorder started again: its new C++ half numbers its layouts afresh)
        self._native_on, self._nat_misses, self._nat_layouts = False, 0, {}
        self._py_left = 0
        if self._rows is not None:  # (rows buffered before: no number of this C++ half)
            self._rows.nat_key = None
        self._nat_learnt, self._nat_learnt_n, self._nat_missed = True, 0, False
        self._nat_eager, self._nat_stop = False, None
        self._attach()
        return self

    def _native_recorder(self) -> Any:
        """The C++ half of the native recorder for this model, or None (Python only).

        Only where the walk of the autograd graph tells passes apart as well as the
        forward hooks do, and where the Python recorder takes its lean path: one process,
        no loss scaling, every layer's parameters trainable (two frozen layers of one type
        look alike in the graph), on the CPU, not --all-modules.
        """
        if self._native_asked is False:
            return None
        from . import native

        module = native.load(build_if_missing=self._native_asked is True)
        why = native.why_not() if module is None else None
        if why is None and not (
                self._world == 1 and not self._sharded and not self.all_modules
                and (self.scaler is None or not self.scaler.is_enabled())
                and self._unique and all(p.requires_grad and p.device.type == "cpu"
                                         for p in self._unique)):
            why = ("it covers one process on the CPU without --all-modules, loss scaling "
                   "or frozen parameters")
        if why is not None:
            if self._native_asked:
                self._warn_once("native", f"gradviz records in Python: no native recorder ({why})")
            return None
        return module.Recorder(list(self._unique), self.max_passes,
                               _capped_warning(self.max_passes))

    def _native_stat_hooks(self, layers: list[tuple[nn.Module, str]],
                           glue: list[nn.Module]) -> list[tuple[nn.Module, Any]]:
        """Forward statistics on native steps: per layer and per activation module a slim
        forward hook, one call into the C++ recorder each (see native.cpp)."""
        nat, hist = self._nat, self._recording.history
        names: list[str] = []  # by the C++ recorder's layer slot
        hooks: list[tuple[nn.Module, Any]] = []

        def layer_hook(slot: int) -> Any:
            stat, stat_one = nat.stat, nat.stat_one

            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if self._failed:
                    return
                try:
                    if isinstance(output, torch.Tensor):
                        stat_one(output, slot)
                    else:
                        tensors = _grad_outputs(output)
                        if tensors:
                            stat(tensors, slot)
                except Exception as e:  # never break the user's forward
                    self._fail(e)

            return hook

        def activation_hook(act: int, kind: str) -> Any:
            unit, code = nat.unit, 0 if kind == "dead_frac" else 1

            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if self._failed or not (isinstance(output, torch.Tensor) and args
                                        and isinstance(args[0], torch.Tensor)):
                    return
                try:
                    slot = unit(args[0], output, act)
                    if slot >= 0:  # the first time this layer feeds this kind: its column
                        layer = names[slot]
                        self._recording.nodes[layer].setdefault("activation",
                                                                type(module).__name__)
                        nat.unit_column(slot, code, hist.column(("node", layer, kind)))
                        unit(args[0], output, act)
                except Exception as e:  # never break the user's forward
                    self._fail(e)

            return hook

        for module, name in layers:
            slot = nat.add_layer([hist.column(("node", name, k)) for k in LAYER_STATS])
            names.append(name)
            hooks.append((module, layer_hook(slot)))
        for module in glue:
            kind = _activation_kind(module)
            if kind == "dead_frac":
                act = nat.add_activation(0, 0.0, 0.0)
            elif kind == "saturated_frac":
                lo, hi = BOUNDS[type(module).__name__]
                act = nat.add_activation(1, lo + self.saturation_margin,
                                         hi - self.saturation_margin)
            else:
                continue
            hooks.append((module, activation_hook(act, kind)))
        return hooks

    def _attach(self) -> None:
        """Register the forward hooks (for a step that will be recorded)."""
        if self._handles:
            return
        if self._native_on:  # the root's forward hook alone (native.cpp on_root)
            if not self._nat_regs:  # (registered once, then put back: see _Reg)
                root = self.model
                if self._nat_hooks:  # ... and, for forward statistics, the slim ones
                    h = root.register_forward_pre_hook(_Hook(self._native_begin))
                    self._nat_regs.append(_Reg(h, root._forward_pre_hooks))
                    for module, hook in self._nat_hooks:
                        h = module.register_forward_hook(_Hook(hook))
                        self._nat_regs.append(_Reg(h, module._forward_hooks))
                # (C++ as it is: no Python runs for it; a copy of the model gets _Inert)
                h = root.register_forward_hook(self._nat_hook)
                self._nat_regs.append(_Reg(h, root._forward_hooks))
            else:
                for reg in self._nat_regs:
                    reg.attach()
            self._handles.extend(self._nat_regs)
            return
        for module, hook in self._hooks:
            self._handles.append(module.register_forward_hook(_Hook(hook), with_kwargs=True))
        for module, hook in self._pre_hooks:
            self._handles.append(module.register_forward_pre_hook(_Hook(hook),
                                                                  with_kwargs=True))
        # Registered last, so it runs after the root's own node hook: the pass is complete.
        self._handles.append(self.model.register_forward_hook(_Hook(self._on_pass_end),
                                                              with_kwargs=True))
        self._handles.append(self.model.register_forward_pre_hook(_Hook(self._on_pass_start)))
        if self.early_param_norms and self._world == 1 and not self._sharded and (
                self.scaler is None or not self.scaler.is_enabled()):
            # A large gradient's norm costs least right after autograd wrote it, while it
            # is still in cache: 1-3 % of a 40 ms step less than reading it again in step().
            # Opt-in: a change to .grad that bumps no version counter (p.grad.data.mul_(),
            # a GradScaler not passed to gradviz unscaling in place) would go unseen.
            for i, p in enumerate(self._unique):
                if p.requires_grad and p.numel() >= HOT_NUMEL:
                    self._handles.append(p.register_post_accumulate_grad_hook(
                        self._hot_hook(i)))
        if self._world > 1 and not self._sharded:
            # Under DDP .grad ends up averaged over ranks; a tensor hook on the parameter
            # still sees this rank's own gradient: with both, the noise scale comes free.
            seen: set[int] = set()
            for node, pname, p in self._params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    col = self._recording.history.column(("param", node, pname))
                    self._handles.append(p.register_hook(self._local_hook(col)))

    def _hot_hook(self, i: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            # With gradient accumulation only the first backward of a step measures here:
            # the later ones change .grad, and step() measures it again (see _record_one).
            if self._passes > 1 or self._failed:
                return
            try:
                g = p.grad
                if g is not None:
                    self._hot[i] = (g, g._version, _norm(g, self._dtype))
            except Exception as e:  # never break the user's backward
                self._fail(e)

        return hook

    def _local_hook(self, col: int) -> Any:
        task = torch._C._current_graph_task_id

        def hook(g: torch.Tensor) -> None:
            if task() != self._task_seen:
                self._loss_backward()
            if self._task_ok:
                self._local.append((col, _norm(g, self._dtype)))

        return hook

    def _detach(self) -> None:
        """Remove the forward hooks: steps that are not recorded then cost nothing at all."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forward hooks -------------------------------------------------------------------

    def _armed(self) -> bool:
        return (
            self._open
            and not self._failed
            and self.step_count % self.every == 0
            and torch.is_grad_enabled()
            # Not while backward runs: activation checkpointing re-runs forwards there,
            # and recording them again would count those layers twice.
            and torch._C._current_graph_task_id() == -1
            # Nor inside a torch.func transform (per-sample gradients: vmap(grad(f))): its
            # tensors are batched, and a hook on them broke the recording.
            and _functorch_level() is None
        )

    def _inputs_hook(self, before: list[list[Any]]) -> Any:
        """A forward pre-hook that keeps the call's input nodes for its forward hook."""
        compiling = _compiling

        def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not compiling():
                before.append(_grad_fns(args, kwargs))

        return pre

    def _call_hook(self, name: str, within: str | None, before: list[list[Any]] | None) -> Any:
        col = self._recording.history.column(("node", name, "activation_grad_norm"))
        stat_cols = tuple(self._recording.history.column(("node", name, k)) for k in LAYER_STATS)
        grad_enabled, task = torch.is_grad_enabled, torch._C._current_graph_task_id
        level, compiling = _functorch_level, _compiling
        next_seq = torch._C._autograd._get_sequence_nr

        def on_grad(g: torch.Tensor) -> None:
            if task() != self._task_seen:
                self._loss_backward()
            if not self._task_ok:
                return
            try:
                self._emit(col, g)
            except Exception as e:  # never break the user's backward
                self._fail(e)

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            ins = before.pop() if before else None  # (see _inputs_hook)
            # (_armed, inlined: hooks are attached only on recorded steps, and this runs for
            # every layer of every recorded forward)
            if compiling() or self._failed or not grad_enabled() or task() != -1 or (
                    level() is not None):
                return
            try:
                outs: list[tuple[Any, int]]
                if isinstance(output, torch.Tensor):  # the common case, without a generator
                    fn = output.grad_fn
                    if fn is None:
                        return
                    outs = [(fn, output.output_nr)]
                    tensors = [output]
                else:
                    tensors = _grad_outputs(output)
                    if not tensors:
                        return
                    outs = [(t.grad_fn, t.output_nr) for t in tensors]
                call = dataflow.Call(name, outs, _grad_fns(args, kwargs) if ins is None else ins,
                                     within, next_seq())
                self._calls.append(call)
                self._calls_seen += 1
                if not self._in_root:  # no pass end will hook this call: hook it now
                    self._eager.add(id(call))
                    self._nat_eager = True
                    for t in tensors:
                        t.register_hook(on_grad)
                    self._give_order(name)
                if self.activation_stats:
                    first = tensors[0]
                    if first.is_floating_point() and first.numel():
                        self._stats.append((stat_cols, _layer_stats(first)))
                    for node, _ in outs:
                        self._made_by[id(node)] = name
            except Exception as e:  # never break the user's forward
                self._fail(e)

        return hook

    def _give_order(self, name: str) -> None:
        info = self._recording.nodes[name]
        if "order" not in info:
            info["order"] = self._order
            self._order += 1

    def _glue_hook(self, name: str) -> Any:
        kind = _activation_kind(self.model.get_submodule(name))
        grad_enabled, task = torch.is_grad_enabled, torch._C._current_graph_task_id
        level, compiling = _functorch_level, _compiling

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if compiling() or self._failed or not grad_enabled() or task() != -1 or (
                    level() is not None):
                return
            if isinstance(output, torch.Tensor):
                if output.grad_fn is not None:
                    self._glue.setdefault(id(output.grad_fn), name)
            else:
                for t in _tensors(output):
                    if t.grad_fn is not None:
                        self._glue.setdefault(id(t.grad_fn), name)
            if kind and self.activation_stats and isinstance(output, torch.Tensor):
                try:
                    self._activation_stat(kind, module, args, output)
                except Exception as e:  # never break the user's forward
                    self._fail(e)

        return hook

    def _activation_stat(self, kind: str, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        """Credit an activation function's dead/saturated fraction to the layer feeding it."""
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        node = src.grad_fn if src is not None else None
        if node is not None and id(node) not in self._made_by and src is out:
            # In place (ReLU(inplace=True)): the tensor's node is now the ReLU's own.
            node = node.next_functions[0][0] if node.next_functions else None
        layer = self._made_by.get(id(node)) if node is not None else None
        if layer is None or out.numel() == 0:
            return  # fed by a junction or by data: nothing to credit
        info = self._recording.nodes[layer]
        info.setdefault("activation", type(module).__name__)
        col = self._recording.history.column(("node", layer, kind))
        self._stats.append(((col,), _unit_stat(module, out, self.saturation_margin).reshape(1)))

    def _on_pass_start(self, module: nn.Module, args: Any) -> None:
        if _compiling():  # (see _compiling)
            return
        if self._in_root:  # the last pass raised before it ended: forget what it left
            for before in self._befores:
                before.clear()
            del self._calls[self._root_from:]
            del self._stats[self._stats_from:]
            self._glue.clear()  # (keyed by id: a dead node's id may come back)
            self._made_by.clear()
        self._in_root = True
        self._root_from, self._stats_from = len(self._calls), len(self._stats)

    def _on_pass_end(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """The root's forward returned: find this pass's edges and hook their gradients."""
        if _compiling():  # (see _compiling)
            return
        calls, glue, eager = self._calls, self._glue, self._eager
        self._calls, self._glue, self._eager = [], {}, set()
        self._in_root = False
        self._made_by.clear()
        armed = self._armed()
        if armed and self._passes >= self.max_passes:
            # rec.step() forgotten: every pass's hooks and norms were kept for the step
            # that never came (memory without end). Keep what is there, take no more.
            armed = False
            del self._stats[self._stats_from:]
            self._warn_once("no-step", _capped_warning(self.max_passes))
        if armed:
            self._passes += 1
            # (the batch: the first tensor argument; model(input_ids=x) has only keywords)
            first = (args[0] if args and isinstance(args[0], torch.Tensor)
                     else next(_tensors((args, kwargs)), None))
            self._batch += int(first.shape[0]) if first is not None and first.dim() else 0
        if not calls or not armed:
            return
        try:
            # A training loop runs the same graph step after step: walk it (cheap), and only
            # when its shape is new analyse it and work out which nodes to hook (costly).
            key, nodes = dataflow.shape(calls, glue)
            plan = self._plans.get(key)
            if plan is None:
                # Junctions avoid node names only: one named after a folded-away activation
                # (the fan-out after `act`) may take that module's name.
                flow = dataflow.analyse(calls, glue, set(self._nodes))
                plan = self._plan(flow, calls, nodes)
                if len(self._plans) >= MAX_PLANS:  # a model whose graph changes every pass
                    del self._plans[next(iter(self._plans))]
                self._plans[key] = plan
            skip = frozenset(i for i, c in enumerate(calls) if id(c) in eager) if eager else None
            self._hook_pass(plan, nodes, skip)
            if self._nat is not None:
                # (a call outside the root's forward: the native recorder would not see it)
                self._nat_learnt_n += 1
                self._nat_learnt = self._nat_learnt and not eager and self._nat.learn(
                    _grad_outputs(output),
                    [(nodes[i]._sequence_nr(), [(nr, col) for nr, col, _ in outs], list(ins))
                     for i, outs, ins in plan.hooks],
                    plan.groups)
        except Exception as e:
            self._fail(e)

    def _native_begin(self, module: nn.Module, args: Any) -> None:
        try:
            self._nat.begin()  # (a pass that raised before its end leaves no statistics)
        except Exception as e:
            self._fail(e)

    def _plan(self, flow: dataflow.Flow, calls: list[dataflow.Call], nodes: list[Any]) -> _Plan:
        """Register the flow's junctions and edges; say which node of the walk gets which hook."""
        rec = self._recording
        hist = rec.history
        at = {id(n): i for i, n in enumerate(nodes)}
        # What each hooked node measures on its output side: the layer calls and junctions
        # that made it (dL/d(output)), by output index; -1: every output (a junction).
        outs: dict[int, list[tuple[int, int, int]]] = {}
        for ci, call in enumerate(calls):
            self._give_order(call.name)
            col = hist.column(("node", call.name, "activation_grad_norm"))
            for node, nr in call.outs:
                outs.setdefault(at[id(node)], []).append((nr, col, ci))
        for j in flow.junctions:
            if j.name not in rec.nodes:
                rec.nodes[j.name] = {"kind": "junction", "type": j.op, "param_count": 0,
                                     "params": {}, "order": self._order}
                self._order += 1
            col = hist.column(("node", j.name, "activation_grad_norm"))
            outs.setdefault(at[id(j.node)], []).append((-1, col, -1))
        # Ports by node: (input index, column, group). A series whose gradient into one output
        # arrives through several ports is a group: its parts are summed as vectors before the
        # norm. One port alone (group -1) is measured directly.
        slots: dict[int, list[tuple[int, int, int]]] = {}
        groups: list[tuple[int, int]] = []  # (column, number of parts)

        def add(col: int, ports: list[dataflow.Port]) -> None:
            by_target: dict[Any, list[dataflow.Port]] = {}
            for p in ports:
                by_target.setdefault(p.target, []).append(p)
            for group in by_target.values():
                gi = -1
                if len(group) > 1:
                    gi = len(groups)
                    groups.append((col, len(group)))
                for p in group:
                    slots.setdefault(at[id(p.node)], []).append((p.index, col, gi))

        for e in flow.edges:
            eid = f"{e.source}->{e.target}"
            if eid not in rec.edges:
                rec.edges[eid] = {"source": e.source, "target": e.target, "via": e.via}
            elif e.via:
                known = rec.edges[eid]["via"]
                rec.edges[eid]["via"] = list(dict.fromkeys([*known, *e.via]))
            add(hist.column(("edge", eid)), e.ports)
        for call, ports in zip(calls, flow.input_ports, strict=True):
            if ports:
                add(hist.column(("node", call.name, "input_grad_norm")), ports)
        # An output the call also reads (an LSTMCell's c, read by h = o * tanh(c)): what
        # reaches its node is the gradient from outside plus the inner part, which a full
        # backward hook does not see, and which was counted twice. Its gradient is a group:
        # the node's grad_output, less the inner ports'. The inner ports run first in a
        # backward (they are later in the forward), so the grad_output is the one part
        # counted: it closes the group (a backward that never reaches them, another that
        # does: each is measured on its own).
        inner: list[tuple[int, int]] = []
        for ci, (call, ports) in enumerate(zip(calls, flow.inner_ports, strict=True)):
            mine = {(id(node), nr) for node, nr in call.outs}
            by_target: dict[Any, list[dataflow.Port]] = {}
            for p in ports:
                if p.target in mine:
                    by_target.setdefault(p.target, []).append(p)
            if not by_target:
                continue
            col = hist.column(("node", call.name, "activation_grad_norm"))
            for (nid, nr), group in by_target.items():
                k = at[nid]
                outs[k] = [o for o in outs[k] if o != (nr, col, ci)]
                gi = len(groups)
                groups.append((col, 1))
                inner.append((ci, gi))
                slots.setdefault(k, []).append((-1 - nr, col, gi))
                for p in group:
                    slots.setdefault(at[id(p.node)], []).append((p.index, col, -2 - gi))
        hooks = [(i, tuple(outs.get(i, ())), tuple(slots.get(i, ())))
                 for i in sorted({*outs, *slots})]
        return _Plan(hooks, groups, inner)

    def _hook_pass(self, plan: _Plan, nodes: list[Any], skip: frozenset[int] | None) -> None:
        """Hook this pass's autograd nodes as the plan says (skip: calls already hooked)."""
        parts = _Parts([[col, None, n, n] for col, n in plan.groups])
        self._open_parts.append(parts)
        for i, outs, ins in plan.hooks:
            if skip:
                outs = tuple(o for o in outs if o[2] not in skip)
                if plan.inner:  # (its tensor hook takes what reaches the output: no group)
                    gone = {gi for ci, gi in plan.inner if ci in skip}
                    ins = tuple(e for e in ins if e[2] not in gone and -2 - e[2] not in gone)
                if not outs and not ins:
                    continue
            nodes[i].register_hook(self._node_hook(outs, ins, parts))

    # -- backward hooks ------------------------------------------------------------------

    def _emit(self, col: int, g: torch.Tensor) -> None:
        """One measured gradient for a series: keep its norm (on device) until step().

        Autograd often hands the same gradient tensor to several hooks in a row: a
        ``+`` passes its output's gradient on to each input unchanged, and a layer's
        dL/d(output) is the edge's part when nothing else reads that output. The last
        tensor is kept with its version counter; the same object, not changed in place
        since, has the same norm. Only one tensor is kept, so memory does not grow.
        """
        last = self._last
        if last is not None and last[0] is g and last[1] == g._version:
            norm = last[2]
        else:
            norm = _norm(g, self._dtype)
            self._last = (g, g._version, norm)
        self._pending.append((col, norm))
        if self._probe is not None:
            self._probe(col, g)

    def _loss_backward(self) -> bool:
        """Whether the backward running now counts. torch.autograd.grad(..., create_graph=
        True) inside a step (a gradient penalty as in WGAN-GP or R1, a PINN's du/dx) runs
        the same hooks on the same outputs: its gradients are of something else, and
        summed in they were 200x off. So a backward with create_graph (grad mode on in its
        hooks) counts only if it will fill a parameter's .grad.

        One without create_graph counts unless it takes no trainable parameter's gradient
        and is limited to some inputs (a node it leads to will not run: see _limited): an
        adversarial example's torch.autograd.grad(loss, x) or loss.backward(inputs=[x]).
        Whether it fills .grad cannot be asked of the parameters alone: none is in the
        graph of the outer backward of reentrant checkpointing around the only trainable
        layers (LoRA), which runs every node and counts; and the nodes held go stale when
        the model is converted (.to(), .double()). Decided once per backward (graph task)."""
        self._task_seen = torch._C._current_graph_task_id()
        if torch.is_grad_enabled():
            self._task_ok = _accumulates(self._accs)
        else:
            self._task_ok = _accumulates(self._accs, captured=True) or not _limited()
        return self._task_ok

    def _node_hook(self, outs: tuple[tuple[int, int, int], ...],
                   ins: tuple[tuple[int, int, int], ...], parts: _Parts) -> Any:
        task = torch._C._current_graph_task_id

        def hook(grad_inputs: tuple[torch.Tensor | None, ...],
                 grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            if not parts.open:  # the step was already recorded: this pass came too late
                return
            if task() != self._task_seen:
                self._loss_backward()
            if not self._task_ok:
                return
            try:
                for nr, col, _ in outs:
                    if nr >= 0:
                        g = grad_outputs[nr]
                        if g is not None:
                            self._emit(col, g)
                    else:
                        for g in grad_outputs:
                            if g is not None:
                                self._emit(col, g)
                for index, col, gi in ins:
                    g = grad_inputs[index] if index >= 0 else grad_outputs[-1 - index]
                    if g is None:
                        continue
                    if gi == -1:
                        self._emit(col, g)
                    elif gi >= 0:
                        self._add_part(parts.groups[gi], g)
                    else:
                        self._add_part(parts.groups[-2 - gi], g, minus=True)
            except Exception as e:  # never break the user's backward
                self._fail(e)

        return hook

    def _add_part(self, part: list[Any], g: torch.Tensor, minus: bool = False) -> None:
        col, acc, left, n = part
        g = g.detach()
        if minus:  # (an inner port's: it arrives before the part that closes its group)
            part[1] = -g if acc is None else acc - g
            return
        acc = g.clone() if acc is None else acc + g
        part[1], part[2] = acc, left - 1
        if left == 1:  # complete: measure it, and be ready for another backward
            self._emit(col, acc)
            part[1], part[2] = None, n  # (retain_graph=True), like single-port series

    def _close_parts(self, emit: bool) -> None:
        """End this step's passes; parts that never completed (a branch that got no gradient)
        count as they are."""
        for parts in self._open_parts:
            parts.open = False
            if emit:
                for group in parts.groups:
                    # (only parts taken off: an output's own gradient never came, nothing
                    # to take them from)
                    if group[1] is not None and group[2] < group[3]:
                        self._emit(group[0], group[1])
                    group[1] = None  # no gradient sum outlives its step
        self._open_parts.clear()
        self._last = None  # no gradient outlives its step
        if not emit:
            self._hot.clear()

    # -- steps ---------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Record this step: call after ``loss.backward()`` and before ``optimizer.step()``."""
        # Between recorded steps (every > 1) no hook is attached: only count down. (Two
        # attribute reads fewer than counting up: this runs cold, after the backward, on
        # 9 steps of 10; a closed block has none left.)
        left = self._quiet_left
        if left:
            self._quiet_left = left = left - 1
            if not left and not self._failed:  # the next step is recorded
                self._attach()
            return
        if not self._open:
            raise RecordingError(
                "rec.step() was called outside the `with gradviz.record(...)` block; "
                "call it inside, once per optimizer step"
            )
        step = self._count
        self._count += 1
        native_now, nat = self._native_on, self._nat
        if not native_now:  # (a native step has only the root's hook: these stay empty)
            # a forward without a root call leaves these (_made_by is keyed by ids of
            # autograd nodes that die with the step: a reused id would credit the wrong layer)
            self._calls, self._glue, self._eager, self._in_root = [], {}, set(), False
            self._made_by.clear()
        if self._failed:
            self._detach()
            return
        # What the root's hook saw (native.cpp on_root): None when every pass was armed.
        notes = self._nat_hook.notes() if native_now else None
        unseen = False  # (native: no pass armed, none missed, so no layer call)
        if notes is not None:  # (passes armed, a pass not armed that backward reached
            seen, self._nat_missed, stop = notes  # or never can be, why never)
            if stop is not None:
                self._nat_stop = stop
            unseen = not seen and not self._nat_missed
        if self._nat is not None and (not native_now or self._nat_missed):
            self._native_on = self._native_next(native_now, step)
            if self._native_on != native_now:
                self._detach()  # (the other mode's hooks go on below)
        # Hooks only around the steps that are recorded (with every=N, 1 in N). (Called only
        # when there is something to do: a call costs ~1-2 us here, cold after the backward.)
        handles = self._handles
        if self._count % self.every == 0:
            if not handles:
                self._attach()
        elif handles:
            self._detach()
        if step % self.every:
            if nat is not None:
                nat.take(False, None)
            self._pending.clear()
            self._close_parts(emit=False)
            self._stats.clear()
            self._local.clear()
            self._passes = self._batch = 0
            # (until the next recorded step nothing can arrive: step() only counts)
            if not self._handles:
                self._go_quiet()
            return
        if not native_now and loss is not None and not (
                isinstance(loss, torch.Tensor) and loss.numel() == 1):
            loss = self._loss_or_none(loss)  # (native: in _record_native, cheaper)
        try:
            if native_now:
                self._record_native(nat, step, loss, unseen)
            else:
                with torch.no_grad():  # (parameter gradients with a graph: create_graph=True)
                    self._record(step, loss)
        except Exception as e:
            self._fail(e)
            return
        writer = self._writer
        if writer is not None and _monotonic() >= writer.due_at:
            # The periodic file takes the rows already on the host and leaves this step's
            # (its copy may still be queued behind the backward) for the next: waiting for
            # it here would stall the device's queue. The last write, at close, has all.
            self._ready_only = threading.get_ident()
            try:
                writer.flush(self.recording)
            finally:
                self._ready_only = None
        if native_now and not self._handles:
            # take() closed this step's passes and nothing is hooked: until the next
            # recorded step nothing can arrive, so the next step() need not clear up.
            self._go_quiet()

    def _go_quiet(self) -> None:
        """The steps up to the next recorded one only count: _count counts them now."""
        left = -self._count % self.every
        self._count += left
        self._quiet_left = left

    @property
    def step_count(self) -> int:
        """How many times rec.step() was called in this block."""
        return self._count - self._quiet_left

    def _loss_or_none(self, loss: Any) -> Any:
        """A loss that is not a one-value tensor: a number as it is, anything else None,
        with a warning (it stopped the recording: every step's row ends with the loss)."""
        if isinstance(loss, torch.Tensor):
            what = f"a tensor of shape {list(loss.shape)}"
        else:
            try:
                if not isinstance(loss, (str, bytes)):
                    float(loss)
                    return loss
            except (TypeError, ValueError):
                pass
            what = f"a {type(loss).__name__}"
        self._warn_once("loss", f"rec.step(loss): the loss must be one number (a one-value "
                                f"tensor or a float), got {what}; steps are recorded without "
                                f"it (pass loss.mean(), or loss.item())")
        return None

    def _native_next(self, native_now: bool, step: int) -> bool:
        """Whether the next steps run native, from how this one went (and reset its notes)."""
        learnt = (self._nat_learnt and self._nat_learnt_n == self._passes > 0
                  and not self._nat_eager)
        missed = self._nat_missed
        only = "parameter norms and forward statistics" if self._nat_hooks else "parameter norms"
        self._nat_learnt, self._nat_learnt_n, self._nat_missed = True, 0, False
        self._nat_eager = False
        if native_now:
            if not missed:
                return True
            if self._nat_stop is not None:
                if "CPU" in self._nat_stop:  # (statistics are taken on the CPU only)
                    only = "parameter norms"
                self._warn_once(
                    "native-stop",
                    f"gradviz recorded step {step} with {only} only and records in "
                    f"Python from now on: {self._nat_stop}, which the native recorder does "
                    "not cover")
                self._nat = None
                return False
            # A pass of a shape not learnt: it was recorded with parameter norms (and forward
            # statistics) only.
            # Python records the next steps in full and learns their shapes: 2 after the
            # first miss, then 3, then 5 (a model that alternates between graphs, one task
            # per batch, missed the other shape on every native step); a model whose graph
            # keeps changing stays in Python.
            self._warn_once(
                "native-miss",
                f"gradviz recorded step {step} with {only} only: its autograd "
                "graph had a shape the native recorder had not seen; the next steps are "
                "recorded in Python, which learns it (record(..., native=False) records "
                "every step in Python)")
            self._nat_misses += 1
            self._py_left = 2 ** (self._nat_misses - 1)
            if self._nat_misses >= NATIVE_MISSES:
                self._nat = None
            return False
        if self._py_left and step % self.every == 0:  # (a Python step after a miss)
            self._py_left -= 1
            return False
        return (step % self.every == 0 and learnt and self._probe is None
                and not self._generic and not self._failed)

    def _record_native(self, nat: Any, step: int, loss: torch.Tensor | float | None,
                       unseen: bool) -> None:
        """A native step: the C++ recorder's row (parameter norms, then the hooks' values in
        the order they arrived) goes into the row buffer as _record_one's vector would."""
        # (raises the first error its hooks met in backward); a loss tensor ends the row
        tensor = isinstance(loss, torch.Tensor)
        if loss is not None and not tensor:
            loss = self._loss_or_none(loss)  # (a number as it is)
        loss_value = None if loss is None or tensor else float(loss)  # type: ignore[arg-type]
        # The usual step: the layout of the rows buffered last, with room for one more:
        # take() writes the row there itself (the layout's number, want, says it fits).
        # Without _rows_lock: acquiring it costs ~4 us here, cold after the backward. Steps
        # come from one thread; a drain from another (a History read) takes the waiting
        # steps off first, with draining set before, and reads only their rows. So a row
        # taken while steps + draining (read in that order) leave one free is no waiting
        # step's, and a step appended after the drain took the list waits for the next.
        rows, want, at = self._rows, -1, 0
        if rows is not None and rows.nat_key is not None and (
                len(rows.steps) + rows.draining < ROWS_AT_ONCE):
            want = ~rows.nat_key if loss_value is not None else rows.nat_key
            at = rows.next % ROWS_AT_ONCE
        try:
            lid = self._nat_hook.take_into(loss if tensor else None,
                                           rows.buf if want >= 0 else None, at, want)  # type: ignore[union-attr]
        except ValueError:  # a loss tensor of several values, refused before anything is taken
            loss, tensor, want = self._loss_or_none(loss), False, -1
            lid = self._nat_hook.take_into(None, None, 0, -1)
        if lid != want or unseen:  # (a new layout, a full buffer, a drain going on...)
            with self._rows_lock:
                if lid != want:  # (want < 0: none, or a number given as the loss's)
                    key: int | None = ~lid if loss_value is not None else lid
                    lay = self._nat_layouts.get(key)  # type: ignore[arg-type]
                    if lay is None:
                        present, cols, stats = nat.layout(lid)
                        lay = self._layout_for((tuple(present), tuple(cols),
                                                tuple(map(tuple, stats)),
                                                1 if tensor else 0 if loss is None else 2))
                        if len(self._nat_layouts) >= NATIVE_LAYOUTS:  # (numbered afresh)
                            nat.forget_layouts()
                            self._nat_layouts.clear()
                            key = None
                        else:
                            self._nat_layouts[key] = lay  # type: ignore[index]
                    rows, at = self._next_row(lay, _CPU)
                    nat.put(rows.buf, at)
                    rows.nat_key = key
                    if not lay.has_params:  # (a layout of its own: never the usual step)
                        self._no_grads(step)
                if unseen:  # no pass armed, none missed: no layer call (an armed pass counts)
                    self._check_calls(rows.layout.has_params)  # type: ignore[union-attr]
        # (outside the lock, as the usual step: the row is written, in a row no drain reads)
        self._calls_seen = self._passes = 0
        rows.next += 1  # type: ignore[union-attr]
        rows.steps.append((step, at, loss_value))  # type: ignore[union-attr]

    def _record(self, step: int, loss: torch.Tensor | float | None) -> None:
        self._close_parts(emit=True)
        if self._world == 1 and not self._generic and not self._sharded and (
                self.scaler is None or not self.scaler.is_enabled()):
            self._record_one(step, loss)
        else:
            self._record_general(step, loss)

    def _record_general(self, step: int, loss: torch.Tensor | float | None) -> None:
        """Any run: several ranks (one all-reduce), GradScaler (unscale in float64)."""
        self._drain()  # (a lean step's rows first: the history takes steps in order)
        self._hot.clear()  # (only the one-process path uses norms taken in backward)
        hist = self._recording.history
        # Parameter gradients, final now: one fused norm per device over unique tensors
        # (of an FSDP2 DTensor gradient, this rank's shard).
        grads = {id(p): _local(p.grad) for _, _, p in self._params if p.grad is not None}
        norm_of = _fused_norms(grads, self._dtype)
        sq_cols: list[int] = []
        sq_vals: list[torch.Tensor] = []
        param_cols: list[tuple[str, int]] = []
        for node, pname, p in self._params:
            if id(p) in norm_of:
                param_cols.append((node, hist.column(("param", node, pname))))
                sq_cols.append(param_cols[-1][1])
                sq_vals.append(norm_of[id(p)])
        for col, t in self._pending:
            sq_cols.append(col)
            sq_vals.append(t)
        self._pending.clear()
        stat_cols: list[int] = []
        stat_vals: list[torch.Tensor] = []
        for scols, t in self._stats:
            stat_cols.extend(scols)
            stat_vals.append(t)
        self._stats.clear()
        local_cols = [c for c, _ in self._local]
        local_vals = [t for _, t in self._local]
        self._local.clear()
        passes, batch = self._passes, self._batch
        self._passes = self._batch = 0

        # Everything goes into one float64 vector: squared norms per series, how many values
        # each series got, forward-statistic sums and counts, local squared norms (noise
        # scale), then scale, loss and batch size. Under torch.distributed it is summed over
        # ranks with one all-reduce on the device; it moves to the host once.
        width = len(hist.columns)
        first = (sq_vals or stat_vals or [torch.zeros(())])[0]
        dev = first.device
        scale_t = None
        if self.scaler is not None and self.scaler.is_enabled():
            scale_t = getattr(self.scaler, "_scale", None)
        f64 = torch.float64
        # torch.full fills on the device; torch.tensor(x, device=cuda) would copy from the host
        # and block: a second sync each step.
        loss_host = math.nan if loss is None or isinstance(loss, torch.Tensor) else float(loss)
        extras = torch.stack([
            scale_t.reshape(()).to(dev, f64) if scale_t is not None else
            torch.full((), 1.0, dtype=f64, device=dev),
            loss.detach().reshape(()).to(dev, f64) if isinstance(loss, torch.Tensor) else
            torch.full((), loss_host, dtype=f64, device=dev),
            torch.full((), float(batch), dtype=f64, device=dev),
        ])
        flat = torch.cat([
            torch.stack(sq_vals).to(f64).square() if sq_vals else extras[:0],
            torch.cat([t.reshape(-1) for t in stat_vals]).to(f64) if stat_vals else extras[:0],
            torch.stack(local_vals).to(f64).square() if local_vals else extras[:0],
            extras,
        ])
        w = width
        # Index arrays, on the host and (several ranks) on the device, depend only on which
        # series arrived: cached, so that a step sends nothing host-to-device.
        key = (w, tuple(sq_cols), tuple(stat_cols), tuple(local_cols),
               dev if self._world > 1 else None)
        cached = self._indices.get(key)
        if cached is None:
            idx_vals = np.concatenate([np.asarray(sq_cols, dtype=np.intp),
                                       np.asarray(stat_cols, dtype=np.intp) + 2 * w,
                                       np.asarray(local_cols, dtype=np.intp) + 4 * w,
                                       np.arange(3, dtype=np.intp) + 5 * w])
            idx_ones = np.concatenate([np.asarray(sq_cols, dtype=np.intp) + w,
                                       np.asarray(stat_cols, dtype=np.intp) + 3 * w])
            on_dev = None
            if self._world > 1:
                on_dev = (torch.as_tensor(idx_vals).to(dev), torch.as_tensor(idx_ones).to(dev),
                          torch.ones(len(idx_ones), dtype=f64, device=dev))
            cached = (idx_vals, idx_ones, on_dev)
            if len(self._indices) >= MAX_PLANS:
                del self._indices[next(iter(self._indices))]
            self._indices[key] = cached
        idx_vals, idx_ones, on_dev = cached
        if on_dev is not None:
            dense = torch.zeros(5 * w + 3, dtype=f64, device=dev)
            dense.index_add_(0, on_dev[0], flat)
            dense.index_add_(0, on_dev[1], on_dev[2])
            torch.distributed.all_reduce(dense)
            host = np.asarray(dense.tolist(), dtype=np.float64)
        else:  # one process: scatter on the host, no device work beyond the transfer
            host = np.zeros(5 * w + 3, dtype=np.float64)
            np.add.at(host, idx_vals, np.asarray(flat.tolist(), dtype=np.float64))
            np.add.at(host, idx_ones, 1.0)
        sq, count, stat_sum, stat_cnt, local_sq = (host[i * w:(i + 1) * w] for i in range(5))
        n = self._world
        # The extras are the same on every rank (the loss: averaged over them).
        scale, loss_value, b_small = (host[5 * w:] / n).tolist()

        # Back to this run's terms. Activation and edge gradients are each rank's own: the
        # global-batch mean loss weights every sample 1/n as much, so their squares sum to
        # n^2 times the single-process value. DDP parameter gradients are the same on every
        # rank (summed n times); FSDP2 shards sum to the whole.
        pcols = np.asarray(sorted({c for _, c in param_cols}), dtype=np.intp)
        is_param = np.zeros(width, dtype=bool)
        is_param[pcols] = True
        sq = np.where(is_param, sq / (1 if self._sharded else n), sq / (n * n))
        if scale_t is not None:
            # Already unscaled parameter gradients (the user called scaler.unscale_) stay:
            # with several optimizers, only those of the optimizers it was called for.
            unscaled = np.zeros(width, dtype=bool)
            if self._unscale_hook is not None:
                ids = self._unscaled_now()
                unscaled[[c for c, pid in self._param_columns() if pid in ids]] = True
            else:  # (unscale_ wrapped by the user: by the optimizers' stages, all or none)
                states = getattr(self.scaler, "_per_optimizer_states", {}).values()
                unscaled[:] = any(getattr(s.get("stage"), "name", "") == "UNSCALED"
                                  for s in states)
            sq = np.where(is_param & unscaled, sq, sq / (scale * scale))
        self._check_calls(bool(param_cols))
        row_cols = [int(c) for c in np.flatnonzero(count > 0)]
        row_vals = [float(math.sqrt(sq[c])) for c in row_cols]
        node_sq: dict[str, float] = {}  # a layer's gradient_norm: all its parameters together
        node_local: dict[str, float] = {}
        for node, col in param_cols:
            node_sq[node] = node_sq.get(node, 0.0) + float(sq[col])
            node_local[node] = node_local.get(node, 0.0) + float(local_sq[col]) / n
        for node, total in node_sq.items():
            row_cols.append(hist.column(("node", node, "gradient_norm")))
            row_vals.append(math.sqrt(total))
        for c in np.flatnonzero(stat_cnt > 0):  # a layer called several times: the mean
            row_cols.append(int(c))
            row_vals.append(float(stat_sum[c] / stat_cnt[c]))
        if local_cols and passes == 1 and n > 1:
            for node, big in node_sq.items():
                if node in node_local and b_small > 0:
                    row_cols.append(hist.column(("node", node, "noise_scale")))
                    row_vals.append(noise_scale(node_local[node], big, b_small, n * b_small))
        if loss is not None:
            row_cols.append(hist.column(("loss",)))
            row_vals.append(loss_value)
        if any(not math.isfinite(v) for v in node_sq.values()) and scale_t is not None:
            # GradScaler skips the optimizer step when it finds inf/NaN: say so, keep them.
            self._recording.meta = {**self._recording.meta, "skipped_steps": [
                *self._recording.meta.get("skipped_steps", []), step]}
        hist.append(step, row_cols, row_vals)

    def _check_calls(self, had_grads: bool) -> None:
        if self._calls_seen == 0 and had_grads:
            self._warn_once(
                "no-calls",
                "gradviz saw gradients but no layer calls this step, so it records "
                "parameter norms only: does the model run under torch.compile (gradviz "
                "keeps out of compiled code: run it without torch.compile for activations "
                "and edges), was it called outside the recorded module, or was rec.step() "
                "called twice for one backward?",
            )
        elif not had_grads:
            self._no_grads(self.step_count - 1)
        self._calls_seen = 0

    def _no_grads(self, step: int) -> None:
        """A recorded step without any parameter gradient, though some parameter takes one:
        rec.step() came before backward (every norm of the step is absent)."""
        if "no-grads" not in self._warned and any(p.requires_grad for p in self._unique):
            self._warn_once("no-grads", f"gradviz found no parameter gradient at rec.step() "
                                        f"(step {step}), so the step's norms are absent: call "
                                        f"rec.step(loss) after loss.backward() and before "
                                        f"optimizer.step()")

    def _record_one(self, step: int, loss: torch.Tensor | float | None) -> None:
        """One process, no loss scaling: the common case, kept lean.

        One fused norm over the parameter gradients, one stack with the norms and statistics
        the hooks left, one copy into the host row buffer (the one transfer: from a CUDA
        device queued, not waited for, see _Rows). The numpy work waits for _drain, which
        does it for many steps at once, with index arrays that depend only on what arrived
        (cached by _layout).
        """
        # (tuple(generator) would fill the tuple free lists step after step: lists here)
        grads = [p.grad for p in self._unique]
        present = tuple([i for i, g in enumerate(grads) if g is not None])
        if self._hot:
            # Norms taken in backward (_hot_hook) stand if .grad is still that tensor,
            # unchanged since (no clipping, no further accumulation); the rest in one call.
            hot, self._hot = self._hot, {}
            fresh: dict[int, torch.Tensor] = {}
            for i in present:
                g, h = grads[i], hot.get(i)
                if h is None or h[0] is not g or h[1] != g._version:
                    fresh[i] = g  # type: ignore[assignment]
            done = _fused_norms(fresh, self._dtype) if fresh else {}
            norms = [done[i] if i in done else hot[i][2] for i in present]
        else:
            norms = _norms([grads[i] for i in present], self._dtype)  # type: ignore[misc]
        pending, stats = self._pending, self._stats
        self._pending, self._stats = [], []
        self._local.clear()
        self._passes = self._batch = 0
        loss_kind = 0 if loss is None else 1 if isinstance(loss, torch.Tensor) else 2
        lay = self._layout_for(
            (present, tuple([c for c, _ in pending]), tuple([c for c, _ in stats]), loss_kind))
        self._check_calls(lay.has_params)
        for _, t in pending:
            norms.append(t)
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        flat: torch.Tensor
        if not stats and norms and (loss_kind != 1 or (  # the usual step: one stack
                loss.dtype == norms[0].dtype and loss.device == norms[0].device  # type: ignore[union-attr]
                and loss.dim() == 0)):  # type: ignore[union-attr]
            if loss_kind == 1:
                norms.append(loss)  # type: ignore[arg-type]
            flat = torch.stack(norms)
        else:
            tail = [t.reshape(-1) for _, t in stats]
            if isinstance(loss, torch.Tensor):
                tail.append(loss.reshape(1))
            if tail:
                dev = tail[0].device
                head = [torch.stack(norms).to(dev, torch.float32)] if norms else []
                flat = torch.cat([*head, *(t.to(dev, torch.float32) for t in tail)])
            else:
                flat = torch.stack(norms) if norms else torch.zeros(0)
        with self._rows_lock:
            rows, at = self._next_row(lay, flat.device)
            rows.put(at, flat)  # the one transfer (from a GPU: queued, not waited for)
            rows.next += 1
            rows.steps.append((step, at, float(loss) if loss_kind == 2 else None))  # type: ignore[arg-type]

    def _layout_for(self, key: tuple[Any, ...]) -> _Layout:
        """_layout's answer for a key (present, pending, stats, loss kind), cached."""
        lay = self._layouts.get(key)
        if lay is None:
            lay = self._layout(*key)
            if len(self._layouts) >= MAX_PLANS:
                del self._layouts[next(iter(self._layouts))]
            self._layouts[key] = lay
        return lay

    def _next_row(self, lay: _Layout, device: torch.device) -> tuple[_Rows, int]:
        """The row buffer for a lean step of this layout from this device, and the row to
        fill (under _rows_lock; the caller fills it, then counts it and adds its step)."""
        rows = self._rows
        if rows is None or rows.layout is not lay or rows.device != device:
            if rows is not None:
                self._drain()
            # (a new layout, or a model moved to the GPU: its pinned buffer and events)
            rows = self._rows = _Rows(lay, device)
        elif len(rows.steps) == ROWS_AT_ONCE:
            self._drain()
        return rows, rows.next % ROWS_AT_ONCE

    def _drain(self) -> None:
        """Put the buffered lean steps into the history, all in one go."""
        if self._rows is None or not self._rows.steps:  # (the usual read: nothing waiting)
            return
        with self._rows_lock:
            rows = self._rows  # (again: another thread may have drained them meanwhile)
            if rows is not None and rows.steps:
                self._drain_locked(rows)

    def _drain_locked(self, rows: _Rows) -> None:
        # Taken off the buffer first: a read coming back in here from the same thread (a
        # signal handler saving the file mid-drain) finds nothing left to add twice.
        rows.draining = ROWS_AT_ONCE  # (before the steps go: see _record_native)
        waiting, rows.steps = rows.steps, []
        rest: list[tuple[int, int, float | None]] = []
        try:
            if self._ready_only == threading.get_ident():  # (step()'s periodic flush)
                k = rows.arrived(waiting)  # (a CUDA error here goes to _fail too)
                waiting, rest = waiting[:k], waiting[k:]
            if not waiting:
                return
            k, lay = len(waiting), rows.layout
            at = [a for _, a, _ in waiting]
            rows.wait(at)
            host = rows.buf.numpy()[at].astype(np.float64)
            values = [host[:, lay.take]]  # sqrt(x^2) of a float32 x is x in float64
            if lay.n_sq:
                values.append(np.sqrt(_sums(np.square(host[:, lay.sq_at]), lay.sq_group,
                                            lay.n_sq)))
            if lay.n_stat:
                values.append(_sums(host[:, lay.stat_at], lay.stat_group, lay.n_stat)
                              / lay.stat_count)
            if waiting[0][2] is not None:  # (the layout says how the loss came: all alike)
                losses = [loss for _, _, loss in waiting]
                values.append(np.asarray(losses, dtype=np.float64).reshape(k, 1))
            table = np.concatenate(values, axis=1) if len(values) > 1 else values[0]
            with np.errstate(over="ignore"):  # a norm beyond float32's range is inf, quietly
                table = table.astype(np.float32)
            hist = self._recording.history
            for (step, _, _), row in zip(waiting, table, strict=True):
                hist.append(step, lay.cols, row)
        except Exception as e:
            self._fail(e)
        finally:
            if rest:  # back in front, after those taken have gone in: order is kept
                rows.steps[:0] = rest
            rows.draining = 0

    def _layout(self, present: tuple[int, ...], pending: tuple[int, ...],
                stats: tuple[tuple[int, ...], ...], loss_kind: int) -> _Layout:
        """Where each value of _record_one's vector goes: index arrays for numpy."""
        hist = self._recording.history
        pos = {u: k for k, u in enumerate(present)}  # unique parameter -> place in the vector
        sq: dict[int, list[int]] = {}  # squared-norm series -> its places in the vector
        per_node: dict[str, list[int]] = {}
        for (node, pname, _), u in zip(self._params, self._unique_of, strict=True):
            if u in pos:
                sq.setdefault(hist.column(("param", node, pname)), []).append(pos[u])
                per_node.setdefault(node, []).append(pos[u])
        has_params = bool(per_node)
        for k, col in enumerate(pending):
            sq.setdefault(col, []).append(len(present) + k)
        for node, at in per_node.items():  # gradient_norm: the layer's parameters together
            sq[hist.column(("node", node, "gradient_norm"))] = at
        mean: dict[int, list[int]] = {}  # statistic series -> its places (several: the mean)
        k = len(present) + len(pending)
        for group in stats:
            for col in group:
                mean.setdefault(col, []).append(k)
                k += 1
        take: list[int] = []
        cols: list[int] = []
        for series in (sq, mean):
            for col, at in series.items():
                if len(at) == 1:
                    take.append(at[0])
                    cols.append(col)
        if loss_kind == 1:
            take.append(k)
            cols.append(hist.column(("loss",)))

        def several(series: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray, int]:
            many = [(col, at) for col, at in series.items() if len(at) > 1]
            cols.extend(col for col, _ in many)
            at_ = [i for _, at in many for i in at]
            group = [g for g, (_, at) in enumerate(many) for _ in at]
            return np.asarray(at_, dtype=np.intp), np.asarray(group, dtype=np.intp), len(many)

        sq_at, sq_group, n_sq = several(sq)
        stat_at, stat_group, n_stat = several(mean)
        if loss_kind == 2:
            cols.append(hist.column(("loss",)))
        return _Layout(
            cols=np.asarray(cols, dtype=np.intp), take=np.asarray(take, dtype=np.intp),
            sq_at=sq_at, sq_group=sq_group, n_sq=n_sq,
            stat_at=stat_at, stat_group=stat_group, n_stat=n_stat,
            stat_count=np.bincount(stat_group, minlength=n_stat).astype(np.float64),
            has_params=has_params, width=k + (loss_kind == 1),
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _fail(self, e: BaseException | str) -> None:
        """Stop recording, keep training: gradviz must never break the user's loop.
        (e: an internal error, or why recording cannot go on, as a sentence.)"""
        if not self._failed:
            self._failed = True
            if self._nat is not None:  # (its root hook: nothing more from here on)
                self._nat.off = True
            why = (e if isinstance(e, str)
                   else f"after an internal error ({type(e).__name__}: {e})")
            warnings.warn(
                f"gradviz stopped recording {why}; training goes on and the steps recorded so "
                "far are kept",
                RuntimeWarning,
                stacklevel=2,
            )

    def _watch_model(self) -> None:
        """While the block is open, a layer or parameter set on the model (fc2 replaced, a
        layer added) stops the recording with a warning: the nodes and their parameters are
        fixed when it starts, and a replaced layer's old gradients were recorded on as its."""
        # (by id, with a weak reference: a module that left the model and died may leave
        # its id to a new one, made anywhere, whose own parameters would then look ours)
        names = {id(m): (n, weakref.ref(m)) for n, m in self.model.named_modules()}

        def changed(module: nn.Module, name: str, value: Any) -> None:
            where, ref = names.get(id(module), (None, None))
            if ref is None or ref() is not module or not self._open or self._failed:
                return None
            what = f"{where}.{name}" if where else name
            self._fail(f"at step {self.step_count}: the model changed ({what} was set "
                       f"anew), and its layers are fixed when the record block starts; start "
                       f"a new gradviz.record block after changing the model")
            return None

        module_hooks = nn.modules.module
        self._watch = [module_hooks.register_module_module_registration_hook(changed),
                       module_hooks.register_module_parameter_registration_hook(changed)]

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook gradviz added and write the file one last time."""
        try:
            self._close()
        finally:
            self._release()

    def _release(self) -> None:
        """Give up the path and stop watching the model (what start took)."""
        for h in self._watch:
            h.remove()
        self._watch = []
        hook = self._unscale_hook
        if hook is not None and self.scaler is not None:
            hook.lists[:] = [u for u in hook.lists if u is not self._unscaled]
            if not hook.lists and self.scaler.__dict__.get("unscale_") is hook:
                del self.scaler.unscale_  # (the class's method shows through again)
            self._unscale_hook = None
            self._unscaled.clear()
        if self._writing is not None:
            with _WRITING_LOCK:
                _WRITING.discard(self._writing)
            self._writing = None

    def _watch_unscale(self) -> None:
        """Note which optimizers' gradients scaler.unscale_ divides: with two optimizers and
        one unscaled (for its clipping), the other's were recorded as unscaled, 1/scale
        of their true size. A wrapper on this scaler object, removed when the block ends."""
        scaler = self.scaler
        if scaler is None:
            return
        hook = scaler.__dict__.get("unscale_")
        if hook is None:
            hook = _Unscale(scaler, scaler.unscale_)
            scaler.unscale_ = hook  # type: ignore[method-assign]
        elif not isinstance(hook, _Unscale):
            return  # (the user's own wrapper: kept, and unscaled by the optimizers' stages)
        hook.lists.append(self._unscaled)  # (another recorder's too: one scaler, a GAN)
        self._unscale_hook = hook

    def _unscaled_now(self) -> set[int]:
        """id() of the parameters whose gradients scaler.unscale_ divided this step."""
        return {pid for u in self._unscaled if _current(self.scaler, u) for pid in u[2]}

    def _param_columns(self) -> list[tuple[int, int]]:
        """(column, id of the parameter) for every recorded parameter."""
        col = self._recording.history.column
        return [(col(("param", node, pname)), id(p)) for node, pname, p in self._params]

    def _close(self) -> None:
        if not self._open:
            return
        self._detach()
        self._count, self._quiet_left = self.step_count, 0
        self._open = False
        self._calls, self._glue, self._eager, self._in_root = [], {}, set(), False
        self._pending.clear()
        self._close_parts(emit=False)
        if self._nat is not None:
            self._nat.take(False, None)
        self._stats.clear()
        self._local.clear()
        self._made_by.clear()
        # The last drain and write take every row, even from a signal handler that came in
        # during step()'s periodic flush (whose drains take only rows already arrived).
        self._ready_only = None
        self._drain()  # (without a file too: a History kept from rec.recording has it all)
        if self._writer is not None:
            try:
                self._writer.flush(self._recording, wait=True)
            except Exception as e:  # (a full disk, a folder removed meanwhile)
                # Raising here, after the last step, would stop the user's code after the
                # block (saving the model) for the sake of a file: say so instead, and keep
                # the recording, which lives on in memory.
                self.write_error = e
                warnings.warn(
                    f"gradviz could not write {self.path} at the end of the block "
                    f"({type(e).__name__}: {e}); every recorded step is still in memory: "
                    "gradviz.store.save(path, rec.recording) writes it elsewhere",
                    RuntimeWarning, stacklevel=4)

    def to_run(self) -> store.Run:
        """What has been recorded so far, as a Run (the same object gradviz.load returns)."""
        doc = self.recording.to_document()
        return store.Run(doc, doc["version"], self.path)


_functorch_level = torch._C._functorch.maybe_current_level  # None outside torch.func
# Whether torch.compile (dynamo) is tracing the forward: the hooks then do nothing. Reading
# a layer's autograd node (the dataflow edges) is a graph break dynamo cannot trace: every
# hooked layer split the compiled graph (a recorded step slower than eager, measured 2.6 ms
# -> 4.5 ms), and fullgraph=True raised in the user's forward. Compiled code stays whole;
# gradviz records parameter norms and the loss there (the warning of _check_calls).
_compiling = torch.compiler.is_compiling


class _Unscale:
    """A GradScaler's unscale_ while recorders watch it (Recorder._watch_unscale): notes
    which optimizer's parameters it divided, in each watching recorder's list. A copy or a
    pickle of the scaler (torch.save(scaler), copy.deepcopy) gets its own plain unscale_:
    this one, a local function once, could not be pickled, and a copy's called the
    original scaler's."""

    __slots__ = ("scaler", "original", "lists")

    def __init__(self, scaler: Any, original: Callable[[Any], None]) -> None:
        self.scaler, self.original = scaler, original
        self.lists: list[list[tuple[int, Any, set[int]]]] = []

    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        self.original(optimizer)
        # (scaler.step unscales the others after rec.step(): noted with the scaler's state
        # for the optimizer, which scaler.update() replaces, so not counted then)
        scaler = self.scaler
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
        params = {id(p) for group in getattr(optimizer, "param_groups", ())
                  for p in group.get("params", ())}
        for noted in self.lists:
            noted[:] = [u for u in noted if u[0] != id(optimizer) and _current(scaler, u)]
            noted.append((id(optimizer), state, params))

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return (_plain_unscale, (self.scaler,))


def _plain_unscale(scaler: Any) -> Any:
    """What a copy of a watched scaler gets as its unscale_: its class's, bound to it."""
    return type(scaler).unscale_.__get__(scaler)


def _current(scaler: Any, noted: tuple[int, Any, set[int]]) -> bool:
    """Whether an unscale_ noted by Recorder._watch_unscale is of this iteration (the
    scaler's state for that optimizer, which scaler.update() replaces, is the same)."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(noted[0])
    return state is not None and state is noted[1]


def _accumulators(params: list[nn.Parameter]) -> list[Any]:
    """Each trainable parameter's AccumulateGrad node, held (so every graph uses this one):
    a backward that will run one fills .grad. [] (count every backward) if torch cannot say."""
    try:
        edge = torch.autograd.graph.get_gradient_edge
        return [edge(p).node for p in params if p.requires_grad]
    except Exception:
        return []


def _accumulates(accs: list[Any], captured: bool = False) -> bool:
    """Whether the backward running now will accumulate into any of these nodes' .grad
    (captured: or hand any of them its gradient, as torch.autograd.grad(loss, params))."""
    if not accs:
        return True
    will = torch._C._will_engine_execute_node
    for node in accs:
        try:
            if will(node):
                return True
        except RuntimeError:  # (torch.autograd.grad taking this parameter's gradient)
            if captured:
                return True
    return False


def _limited(budget: int = 4096) -> bool:
    """Whether the backward running now runs only the nodes on the way to some inputs (it
    was given inputs=, or is torch.autograd.grad): the nodes the one running now leads to
    are in its graph, so a backward that runs every node runs them. The first that will not
    run is near (the next trainable layer's parameters); past budget nodes, the answer is
    no. (Asked only where no trainable parameter's gradient is taken: once a backward.)"""
    node = torch._C._current_autograd_node()
    if node is None:
        return False
    will = torch._C._will_engine_execute_node
    todo, seen = [node], {id(node)}
    while todo:
        for m, _ in todo.pop().next_functions:
            if m is None or id(m) in seen:
                continue
            if budget <= 0:
                return False
            budget -= 1
            seen.add(id(m))
            try:
                if not will(m):
                    return True
            except RuntimeError:  # (a leaf whose gradient torch.autograd.grad takes: an
                # input's is limited, a parameter's is the training gradient, by hand)
                if not isinstance(getattr(m, "variable", None), nn.Parameter):
                    return True
            if getattr(m, "next_functions", ()):
                todo.append(m)
    return False


def _compiled_autograd_on() -> bool:
    """Whether torch's compiled autograd is on (it cannot run the native recorder's hooks).

    native.cpp's compiled_autograd_on reads the same, in C++, for the root's hook."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    if ca is None:  # (never imported: never on)
        return False
    if getattr(ca, "compiled_autograd_enabled", False) or getattr(
            ca, "in_compiled_autograd_region", False):
        return True
    return _dynamo_config_compiled_autograd()


def _dynamo_config_compiled_autograd() -> bool:
    """torch._dynamo.config.compiled_autograd, read as torch's config module reads it: the
    environment's forced value, else the user's (a context variable: set, or patched), else
    the environment's default, else the default. The module's own __getattr__ costs 3-4 us
    warm; cold, once in every=N steps, each object read costs ~0.4 us, so all but the
    context variable is read once (the environment is read when the module is imported)."""
    cfg = sys.modules.get("torch._dynamo.config")
    if cfg is None:
        return False
    global _CA_ENTRY
    try:
        if _CA_ENTRY is None or _CA_ENTRY[0] is not cfg:
            from torch.utils._config_module import _UNSET_SENTINEL as unset

            e = cfg._config["compiled_autograd"]
            if e.alias is not None or e.justknob is not None or e.hide:
                raise LookupError  # (read through the module)
            forced = e.env_value_force
            later = e.env_value_default if e.env_value_default is not unset else e.default
            _CA_ENTRY = (cfg, e.user_override if forced is unset else None, unset,
                         bool(forced if forced is not unset else later))
        _, user, unset, value = _CA_ENTRY
        if user is not None:
            v = user.get()
            if v is not unset:
                return bool(v)
        return value
    except Exception:  # (another torch: ask the module)
        pass
    return bool(getattr(cfg, "compiled_autograd", False))


# (config module, its entry's context variable or None when the environment forces a value,
# the "unset" marker, the value when the variable is unset)
_CA_ENTRY: tuple[Any, Any, Any, bool] | None = None


def _drain_of(rec: Recorder) -> Callable[[], None]:
    """rec._drain, without keeping rec alive: a Recording may outlive its recorder."""
    ref = weakref.ref(rec)

    def drain() -> None:
        r = ref()
        if r is not None:
            r._drain()

    return drain


def _local(g: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: the local shard of an FSDP2 DTensor, else itself."""
    to_local = getattr(g, "to_local", None)
    return to_local() if callable(to_local) else g


def _plain(g: torch.Tensor) -> torch.Tensor:
    """g, or a sparse gradient's values (nn.Embedding(sparse=True)): the same norm, once
    coalesced (repeated indices summed); torch's norm kernels take no sparse tensors. A
    complex gradient (spectral layers: FNO) as real and imaginary parts, whose norm is its
    norm (sqrt of the sum of |z|^2): a norm with dtype=float32 refuses complex tensors."""
    if g.is_sparse:
        g = g.coalesce().values()
    return torch.view_as_real(g.resolve_conj()) if g.is_complex() else g


def _fused_norms(grads: dict[int, torch.Tensor], dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """One torch._foreach_norm per device over the gradients: id(param) -> 0-d norm."""
    plain = {key: _plain(g) for key, g in grads.items()}
    by_dev: dict[tuple[torch.device, bool], list[int]] = {}
    for key, g in plain.items():
        by_dev.setdefault((g.device, g.dtype == torch.float64), []).append(key)
    out: dict[int, torch.Tensor] = {}
    for (_, wide), keys in by_dev.items():
        tensors = [plain[k] for k in keys]
        if wide and dtype != torch.float64:  # torch will not narrow float64 in the reduction
            norms = [n.to(dtype) for n in torch._foreach_norm(tensors, 2)]
        else:
            norms = list(torch._foreach_norm(tensors, 2, dtype=dtype))  # type: ignore[call-arg]
        out.update(zip(keys, norms, strict=True))
    return out


def _sums(values: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """Per row of values (steps x entries), the sums of its entries by group (steps x n).

    One bincount over all rows, each row's groups offset: every sum adds its entries in
    order, from 0.0, as np.add.at does on the general path (the same bits).
    """
    k = values.shape[0]
    at = (group[None, :] + n * np.arange(k)[:, None]).ravel()
    return np.bincount(at, weights=values.ravel(), minlength=k * n).reshape(k, n)


def _norms(grads: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """0-d norms of gradients, in order: one torch._foreach_norm when they share a device."""
    if not grads:
        return []
    dev = grads[0].device
    if dtype == torch.float64 or any(
            g.device != dev or g.dtype == torch.float64 or g.is_sparse or g.is_complex()
            for g in grads):
        done = _fused_norms(dict(enumerate(grads)), dtype)
        return [done[i] for i in range(len(grads))]
    return list(torch._foreach_norm(grads, 2, dtype=dtype))  # type: ignore[call-arg]


def noise_scale(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> float:
    """B_simple = tr(Sigma)/|G|^2 from mean squared norms at two batch sizes.

    McCandlish et al. 2018, appendix A: unbiased |G|^2 and tr(Sigma) from |G_small|^2 (each
    rank's own gradient) and |G_big|^2 (the gradient averaged over ranks). NaN when the
    |G|^2 estimate is not positive (too noisy to say).
    """
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
    return trace / g2 if g2 > 0 else math.nan


def _activation_kind(module: nn.Module) -> str | None:
    """Which unit statistic an activation module gets: dead_frac, saturated_frac or none."""
    name = type(module).__name__
    if name in DEAD_AT_ZERO:
        return "dead_frac"
    if name in BOUNDS:
        return "saturated_frac"
    return None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gradviz-flow")
    except Exception:
        return "unknown"


def record(
    model: nn.Module,
    path: str | os.PathLike[str] | None = "training_output.json",
    **options: Any,
) -> Recorder:
    """Record ``model``'s gradient flow to ``path``; use as ``with gradviz.record(...) as rec``.

    Options: ``every`` (record every Nth step), ``all_modules`` (every leaf module is a node,
    not only those with parameters), ``optimizer`` and ``seed`` (for the file's metadata),
    ``flush_seconds`` (how often the file is rewritten while training), ``meta`` (extra
    metadata). ``path=None`` keeps the recording in memory only (``rec.to_run()``).
    ``early_param_norms=True`` takes large parameters' gradient norms in backward, while the
    gradient is in cache (1-3 % of a step faster on big layers); it is right as long as
    ``.grad`` changes after backward only through tracked ops (``clip_grad_norm_`` is fine;
    ``p.grad.data.mul_()`` or a GradScaler not passed to gradviz would go unseen).
    ``native``: None (default) records with the native recorder where it is built
    (``python -m gradviz.native``) and the run allows it (one process on the CPU, no
    ``all_modules``, no loss scaling, every parameter trainable), else in Python; True
    also builds it if it is not yet (20-60 s, once) and warns when it cannot be used;
    False always records in Python. The native recorder takes the numbers the Python one
    takes, from the second step on (the first teaches it the graph), at about a quarter of
    the cost; a step whose graph has a new shape gets parameter norms (and forward
    statistics) only, with a warning, and teaches it that shape (see gradviz/native.py).
    ``max_passes`` (1024): forward passes one step may take; past it, rec.step() is taken
    as forgotten (gradviz warns once and takes no more until it comes).
    """
    return Recorder(model, path, **options)

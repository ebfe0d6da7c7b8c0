"""The floor: what the cheapest recorder of the same numbers costs, next to gradviz.

Usage:
    python benchmarks/floor.py                 # the small MLP, 20 rounds (about a minute)
    python benchmarks/floor.py --models mlp cnn mlp-6x1024
    python benchmarks/floor.py --quick         # a few seconds: is it still working?
    python benchmarks/floor.py --no-native     # leave out the C++ floor (no compiler)

gradviz misses the 1.05x target on the small MLP (a 1.2 ms step; see RESULTS.md section
1). This asks how far below gradviz any hook-based recorder could go there. Each floor
measures what gradviz measures on a chain of layers, and nothing more: per layer the norm
of dL/d(output) and of the gradient into its data input (gradviz's activation_grad_norm
and input_grad_norm; its edges are the same tensors), every parameter gradient's norm and
the loss, into a row of a host buffer. It has none of gradviz's bookkeeping: no module
hooks, no graph analysis, no history, no file; it knows the model is a chain.

Conditions, each on its own copy of the model, interleaved in one process as in
overhead.py: bare; bare again; gradviz (every step, the Python recorder: overhead.py measures
the native one); "root hook" (one no-op forward hook
on the model: where any recorder must start); "Python floor" (at the model's forward
end, a walk of the autograd graph and one Python post-hook per layer node taking its
norms at once; in the step, one fused norm over the parameter gradients, one stack and
one copy); "C++ floor" (the same with the walk, the hooks and the step in C++:
benchmarks/floor_native.cpp, built here with torch.utils.cpp_extension on first use, about
20 s, then cached); "C++, loop norms" (the C++ floor taking each norm with a plain loop
over the floats instead of torch's norm op, whose dispatch, allocation and .item() cost
about 1 us a call before any arithmetic); "C++, no norms" (the C++ floor writing 0 for
every norm: what the plumbing costs without the arithmetic). At the end every floor's
last row is checked against gradviz's history: the same values, or the run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import machine, quartiles, ratio_cell, table  # noqa: E402
from overhead import BLOCK, WORKLOADS, _layers, copies, keep_freed_memory, race  # noqa: E402

import gradviz  # noqa: E402
from gradviz import native as native_build  # noqa: E402

CHAINS = ["mlp", "mlp-6x1024", "cnn"]  # the floors know only chains of layers
CONDITIONS = ["bare", "bare again", "gradviz", "root hook", "Python floor", "C++ floor",
              "C++, loop norms", "C++, no norms"]
MODES = {"C++ floor": 0, "C++, loop norms": 1, "C++, no norms": 2}  # floor_native.cpp's
NATIVE = set(MODES)
ROW = 256  # room in a floor's row for one step's values
# How close a floor's values must be to gradviz's. The floors that call torch's norm op get
# its very numbers; the loop floor sums more exactly than torch's one-thread float32 norm
# kernel, which is off by up to about 3e-5 on a 1M-value gradient and 2e-4 on 4M (measured
# against float64): close enough to say it measured the same thing, not the same bits.
REL = {"C++, loop norms": 1e-3}


def build_native() -> Any:
    """floor_native.cpp as a module (built once per torch, Python and source version), by
    gradviz.native.build: it raises BuildError with the compiler's first error, or whatever
    torch's cpp_extension raised, for main() to report in one line."""
    return native_build.build("floor", Path(__file__).resolve().parent / "floor_native.cpp")


def walk(out: torch.Tensor) -> list[Any]:
    """The autograd nodes behind a tensor, depth first: floor_native.cpp's order."""
    root = out.grad_fn
    if root is None:
        return []
    order, stack, seen = [], [root], {root}
    while stack:
        node = stack.pop()
        order.append(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return order


def shape(order: list[Any]) -> list[Any]:
    """What must stay the same for a learnt plan to hold: node types and their wiring."""
    s: list[Any] = []
    for node in order:
        s.append(type(node))
        s.extend(nr if nxt is not None else -1 for nxt, nr in node.next_functions)
    return s


def _param_of(node: Any) -> Any:
    """The parameter an input of a layer's node comes from (directly or through a .t())."""
    if node is None:
        return None
    if hasattr(node, "variable"):
        return node.variable
    nxt = node.next_functions
    if len(nxt) == 1 and nxt[0][0] is not None and hasattr(nxt[0][0], "variable"):
        return nxt[0][0].variable
    return None


def learn(model: nn.Module, order: list[Any]) -> list[tuple[int, int]]:
    """(place in the walk, index of the data input or -1) for each layer's node."""
    weights = {id(m.weight) for m in _layers(model)}
    plan = []
    for i, node in enumerate(order):
        if len(node.next_functions) < 2:  # (a parameter's .t(), not a layer)
            continue
        params = [_param_of(nxt) for nxt, _ in node.next_functions]
        if not any(p is not None and id(p) in weights for p in params):
            continue
        ports = [k for k, ((nxt, _), p) in enumerate(zip(node.next_functions, params,
                                                         strict=True))
                 if nxt is not None and p is None]
        if len(ports) > 1:
            raise SystemExit("floor.py: a layer with two gradient inputs: not a chain")
        plan.append((i, ports[0] if ports else -1))
    return plan


class _Floor:
    """What both floors share: the model's parameters, a 64-row buffer, the last row."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.rows = torch.zeros(64, ROW)
        self.at = 0
        self.width = 0
        self.handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _fits(self, width: int) -> int:
        if width > ROW:
            raise SystemExit(f"floor.py: {width} values a step, room for {ROW}")
        return width

    def last(self) -> list[float]:
        """The last step's values."""
        return self.rows[(self.at - 1) % len(self.rows), :self.width].tolist()


class PythonFloor(_Floor):
    """Root hook, graph walk, one Python post-hook per layer node, fused step."""

    def __init__(self, model: nn.Module) -> None:
        self.norms: list[torch.Tensor] = []
        self.plan: list[tuple[int, int]] | None = None
        self.shape: list[Any] = []
        self.missed = 0
        super().__init__(model)

    def _hook(self, port: int) -> Any:
        norms, f32 = self.norms, torch.float32

        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            g = grad_outputs[0]
            if g is not None:
                norms.append(torch.linalg.vector_norm(g, dtype=f32))
            if port >= 0 and grad_inputs[port] is not None:
                norms.append(torch.linalg.vector_norm(grad_inputs[port], dtype=f32))
        return hook

    def _on_forward(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        order = walk(out)
        if self.plan is None:
            self.plan, self.shape = learn(self.model, order), shape(order)
        elif shape(order) != self.shape:
            self.missed += 1
            return
        for i, port in self.plan:
            order[i].register_hook(self._hook(port))

    def step(self, loss: torch.Tensor) -> None:
        """After backward: parameter norms, the hooks' norms and the loss into a row."""
        grads = [p.grad for p in self.params if p.grad is not None]
        values = list(torch._foreach_norm(grads, 2, dtype=torch.float32))  # type: ignore[call-arg]
        values.extend(self.norms)
        self.norms.clear()
        values.append(loss.detach())
        self.width = self._fits(len(values))
        self.rows[self.at % len(self.rows), :self.width].copy_(torch.stack(values))
        self.at += 1


class NativeFloor(_Floor):
    """The same as PythonFloor, with the walk, hooks and step in C++ (floor_native.cpp)."""

    def __init__(self, model: nn.Module, native: Any, mode: int = 0) -> None:
        self.floor = native.Floor(mode)  # how it takes a norm: MODES
        self.learnt = False
        super().__init__(model)

    @property
    def missed(self) -> int:
        return int(self.floor.missed)

    def _on_forward(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if not self.learnt:
            self.floor.learn(out, learn(self.model, walk(out)))
            self.learnt = True
        self.floor.arm(out)

    def step(self, loss: torch.Tensor) -> None:
        """After backward: the row, written in C++ (which writes no further than ROW)."""
        row = self.rows[self.at % len(self.rows)]
        self.width = self._fits(self.floor.take(self.params, loss, row))
        self.at += 1


class RootHook:
    """One no-op forward hook on the model, and nothing in the step."""

    def __init__(self, model: nn.Module) -> None:
        model.register_forward_hook(lambda module, args, out: None)

    def step(self, loss: torch.Tensor) -> None:
        pass


def gradviz_values(rec: gradviz.Recorder) -> list[float]:
    """The last step's values of the series a floor measures, from gradviz's history."""
    if rec._failed:
        raise SystemExit("floor.py: gradviz stopped recording during the run; nothing to "
                         "compare the floors with")
    hist = rec.recording.history
    keep = {"activation_grad_norm", "input_grad_norm"}
    out = []
    for key in hist.columns:
        if key[0] == "param" or key[0] == "loss" or (key[0] == "node" and key[2] in keep):
            value = hist.last(key)
            if value is not None:
                out.append(value)
    return out


def check(name: str, cond: str, floor: Any, expected: list[float]) -> None:
    """A floor that measured something else is no floor: its values must be gradviz's."""
    got = sorted(floor.last())
    want = sorted(expected)
    rel = REL.get(cond, 1e-6)
    if floor.missed or len(got) != len(want) or any(
            abs(a - b) > rel * max(abs(b), 1e-12) for a, b in zip(got, want, strict=True)):
        raise SystemExit(f"floor.py: {name} / {cond} measured other values than gradviz "
                         f"({len(got)} against {len(want)}, {floor.missed} passes missed)")


def measure(name: str, native: Any, rounds: int, blocks: int, warmup: int
            ) -> tuple[dict[str, list[float]], float]:
    """Per condition, the per-round ratio of its fastest block to bare's; bare's ms a step."""
    conditions = [c for c in CONDITIONS if c not in NATIVE or native is not None]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainers = copies(WORKLOADS[name], conditions)
        for t in trainers:
            if t.condition == "gradviz":
                t.rec = stack.enter_context(gradviz.record(  # (Python: see the docstring)
                    t.model, Path(tmp) / "run.json", native=False))
            elif t.condition == "root hook":
                t.rec = RootHook(t.model)
            elif t.condition == "Python floor":
                t.rec = PythonFloor(t.model)
            elif t.condition in NATIVE:
                t.rec = NativeFloor(t.model, native, MODES[t.condition])
        ratios = race(trainers, rounds, blocks, warmup)
        # every copy took the same steps on the same data: the same last step everywhere
        rec = next(t.rec for t in trainers if t.condition == "gradviz")
        expected = gradviz_values(rec)
        loss = rec.recording.history.last(("loss",))
        for t in trainers:
            if t.condition == "C++, no norms":  # as many values, 0 but for the loss
                check(name, t.condition, t.rec, [0.0] * (len(expected) - 1) + [loss])
            elif t.condition == "Python floor" or t.condition in NATIVE:
                check(name, t.condition, t.rec, expected)
    return ratios, statistics.median(trainers[0].blocks) / BLOCK * 1e3  # (bare's)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:7]))
    p.add_argument("--models", nargs="+", choices=CHAINS, default=["mlp"],
                   help="chain models of overhead.py (default: mlp)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    p.add_argument("--blocks", type=int, default=3,
                   help=f"blocks of {BLOCK} steps per condition per round (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up blocks (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-native", action="store_true",
                   help="leave out the C++ floor (it needs a C++ compiler and ninja)")
    p.add_argument("--quick", action="store_true", help="a few seconds: 2 rounds of one block")
    args = p.parse_args(argv)
    for flag in ("rounds", "blocks", "warmup", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    if args.quick:
        args.rounds, args.blocks, args.warmup = 2, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the C++ floor if asked, measure each model, print the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    native = None
    if not args.no_native:
        try:
            t0 = time.perf_counter()
            native = build_native()
            print(f"  C++ floor ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        except Exception as e:  # no compiler, no ninja, headers missing
            why = str(e) if isinstance(e, native_build.BuildError) else (
                (str(e).strip().splitlines() or [type(e).__name__])[0])
            print(f"floor.py: the C++ floor could not be built: {why}; measuring without "
                  f"it (--no-native leaves it out up front)", file=sys.stderr)
    warnings.simplefilter("ignore")  # (after the build: its warnings say why it waits)
    gc.collect()
    print(f"# The floor: the cheapest recorder of the same numbers\n\n{machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} torch thread(s); {args.rounds} "
          f"rounds x {args.blocks} blocks of {BLOCK} steps per condition, interleaved in one "
          f"process; malloc {'keeps freed memory' if kept else 'as it is'}.\n")
    rows = []
    header = ["model", "bare ms/step"]
    for name in args.models:
        t0 = time.perf_counter()
        ratios, ms = measure(name, native, args.rounds, args.blocks, args.warmup)
        conds = [c for c in CONDITIONS if c in ratios and c != "bare"]
        header = ["model", "bare ms/step", *conds, *[f"{c} us" for c in conds[1:]]]
        row: list[object] = [f"{name}: {WORKLOADS[name].describe()}", f"{ms:.2f}"]
        meds = {c: quartiles(ratios[c]) for c in conds}
        row += [ratio_cell(*q) for q in meds.values()]
        row += [f"{(meds[c][1] - 1) * ms * 1e3:+.0f}" for c in conds[1:]]
        rows.append(row)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(header, rows))
    print("\nRatio: per round, each condition's fastest block of 10 steps over bare's; the "
          "median over rounds, in brackets its interquartile range. 'us': that ratio minus "
          "1, times bare's median step. 'bare again' is a second untouched copy: the "
          "method's own error. Each floor's last row equals gradviz's history for that "
          "step (checked).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

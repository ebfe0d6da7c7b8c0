"""Recording overhead: median training-step time with gradviz over the same step without it.

Usage:
    python benchmarks/overhead.py                  # full run, 4 models x 10 conditions (minutes)
    python benchmarks/overhead.py --quick          # a few seconds: is it still working?
    python benchmarks/overhead.py --models mlp --rounds 20
    python benchmarks/overhead.py --conditions 'bare again' 'gradviz every=10' --rounds 40
    python benchmarks/overhead.py --models mlp --processes 5   # 5 fresh processes in turn
    python benchmarks/overhead.py --profile mlp    # where a recorded step's time goes
    python benchmarks/overhead.py --cycle mlp      # every=10: each step of the cycle's cost
    python benchmarks/overhead.py --scaling        # recorded step time against depth
    python benchmarks/overhead.py --threads 2      # torch intra-op threads (default 1)
    python benchmarks/overhead.py --device cuda    # on a GPU (synchronised around each block)

All conditions run in ONE process, on their own copy of the same model, in interleaved
rounds (the order rotates each round), so that drift and noise on a shared machine hit
every condition alike. A measurement is a block of 10 consecutive steps (zero_grad,
forward, loss, backward, [rec.step], optimizer step): for ``every=10`` that holds exactly
one recorded step, so its time is the amortised cost. Per round, each condition's fastest
block (other processes only ever slow one down) is divided by bare's; the table shows the
median of those ratios over rounds and their interquartile range. A second untouched copy
("bare again") shows the method's own error. glibc's malloc is asked to keep freed memory
(mallopt: no mmap/munmap of each step's activations, no trimming; --malloc default turns
this off): without it, two identical copies of the small MLP differed by up to 1.7x.

Conditions: bare; gradviz every step; gradviz every 10th step; gradviz every step with
forward activation statistics; gradviz every step without and with statistics in Python
(no native recorder); gradviz every step with early_param_norms=True (large parameters'
norms taken in backward); the original project's naive hook (a full backward hook per
layer calling ``module.weight.grad.norm().item()``); the reference tutorial's
GradientMonitor (forward and backward hooks, mean/std/min/max/... by ``.item()`` each).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import gc
import io
import json
import pstats
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import machine, mark, quartiles, ratio_cell, table  # noqa: E402

import gradviz  # noqa: E402
from gradviz.demos import TransformerBlock  # noqa: E402

BLOCK = 10  # steps per measurement: one every=10 cycle
DEVICE = torch.device("cpu")  # --device
TARGETS = {"gradviz": 1.05, "gradviz every=10": 1.01, "gradviz + stats": 1.15}


# -- models ------------------------------------------------------------------------------


class TinyTransformer(nn.Module):
    """A 2-block pre-norm transformer language model (dim 128, 4 heads, 64 tokens)."""

    def __init__(self, vocab: int = 256, dim: int = 128, heads: int = 4, depth: int = 2,
                 seq_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    """Three 3x3 conv layers with pooling, then two linear layers, for 3x32x32 images."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


@dataclass(frozen=True)
class Workload:
    """A model, how to make a batch of a given size for it, and its loss."""

    name: str
    model: str
    build: Callable[[], nn.Module]
    batch_size: int  # the issue's: --batch changes it
    batch: Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def describe(self, batch: int | None = None) -> str:
        """The model and the batch size it is measured at."""
        return f"{self.model}, batch {batch or self.batch_size}"


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


WORKLOADS = {
    w.name: w
    for w in [
        Workload("mlp", "MLP 784-256-128-64-10", lambda: mlp([784, 256, 128, 64, 10]), 64,
                 lambda g, b: (torch.randn(b, 784, generator=g),
                               torch.randint(0, 10, (b,), generator=g)), _ce),
        Workload("mlp-6x1024", "MLP 6 x Linear(1024, 1024) + head",
                 lambda: mlp([1024] * 7 + [10]), 64,
                 lambda g, b: (torch.randn(b, 1024, generator=g),
                               torch.randint(0, 10, (b,), generator=g)), _ce),
        Workload("cnn", "CNN 3 conv + 2 linear on 3x32x32", cnn, 64,
                 lambda g, b: (torch.randn(b, 3, 32, 32, generator=g),
                               torch.randint(0, 10, (b,), generator=g)), _ce),
        Workload("transformer", "transformer LM, 2 blocks, dim 128, 64 tokens",
                 TinyTransformer, 16,
                 lambda g, b: (torch.randint(0, 256, (b, 64), generator=g),
                               torch.randint(0, 256, (b, 64), generator=g)), _ce),
    ]
}
BATCH: int | None = None  # --batch: every model's batch size (None: each model's own)


# -- the peers gradviz is compared with ---------------------------------------------------


def _layers(model: nn.Module) -> list[nn.Module]:
    """Modules owning a weight: the layers every condition watches."""
    return [m for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]


class NaiveHook:
    """The original project: a full backward hook per layer reading weight.grad.norm().item()."""

    def __init__(self, model: nn.Module) -> None:
        self.norms: dict[str, list[float]] = defaultdict(list)
        names = {id(m): n for n, m in model.named_modules()}
        self.handles = [m.register_full_backward_hook(self._hook(names[id(m)]))
                        for m in _layers(model)]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, grad_input: Any, grad_output: Any) -> None:
            if module.weight.grad is not None:  # None for the first layer: as the original
                self.norms[name].append(module.weight.grad.norm().item())
        return hook

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()


class GradientMonitor:
    """The reference tutorial's monitor: forward and backward hooks, one .item() per stat."""

    def __init__(self, model: nn.Module) -> None:
        self.activations: dict[str, list[dict[str, float]]] = defaultdict(list)
        self.gradients: dict[str, list[dict[str, float]]] = defaultdict(list)
        self.handles = []
        for name, m in model.named_modules():
            if m in _layers(model):
                self.handles.append(m.register_forward_hook(self._forward(name)))
                self.handles.append(m.register_full_backward_hook(self._backward(name)))

    def _forward(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            a = output.detach()
            self.activations[name].append({
                "mean": a.mean().item(), "std": a.std().item(), "min": a.min().item(),
                "max": a.max().item(), "dead": (a <= 0).float().mean().item(),
            })
        return hook

    def _backward(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            g = grad_output[0]
            if g is None:
                return
            self.gradients[name].append({
                "mean": g.mean().item(), "std": g.std().item(), "norm": g.norm().item(),
                "max": g.abs().max().item(),
            })
        return hook

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()


# -- running -----------------------------------------------------------------------------

# "bare again" is a second untouched copy: its ratio is the noise floor of the method
CONDITIONS = ["bare", "bare again", "gradviz", "gradviz every=10", "gradviz + stats",
              "gradviz Python", "gradviz + stats Python", "gradviz early norms", "naive hook",
              "GradientMonitor"]
NATIVE = True  # --no-native: "gradviz", "gradviz every=10" and "+ stats" record in Python too


@dataclass
class Trainer:
    """One condition: its own model copy, optimizer, data and whatever watches it."""

    condition: str
    model: nn.Module
    opt: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rec: Any = None
    watcher: Any = None
    at: int = 0
    blocks: list[float] = field(default_factory=list)

    def steps(self, n: int) -> None:
        """n ordinary training steps."""
        model, opt, rec = self.model, self.opt, self.rec
        for _ in range(n):
            x, y = self.batches[self.at % len(self.batches)]
            self.at += 1
            opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(model(x), y)
            loss.backward()
            if rec is not None:
                rec.step(loss)
            opt.step()

    def timed_step(self) -> tuple[float, float, float, float, float]:
        """One step, with the time at its start and after forward, backward, rec.step()
        and the optimizer step."""
        model, opt, rec = self.model, self.opt, self.rec
        x, y = self.batches[self.at % len(self.batches)]
        self.at += 1
        opt.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss = self.loss_fn(model(x), y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        if rec is not None:
            rec.step(loss)
        sync()
        t3 = time.perf_counter()
        opt.step()
        sync()
        return t0, t1, t2, t3, time.perf_counter()


def copies(w: Workload, conditions: list[str]) -> list[Trainer]:
    """A trainer per condition, each on an identical copy of the model, nothing attached."""
    torch.manual_seed(0)
    base = w.build()
    g = torch.Generator().manual_seed(1)
    size = BATCH or w.batch_size
    batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in (w.batch(g, size) for _ in range(4))]
    out = []
    for cond in conditions:
        model = w.build().to(DEVICE)
        model.load_state_dict(base.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        out.append(Trainer(cond, model, opt, batches, w.loss))
    return out


def make_trainers(w: Workload, stack: contextlib.ExitStack, folder: Path) -> list[Trainer]:
    """A trainer per condition, each on an identical copy of the model."""
    out = copies(w, CONDITIONS)
    for t in out:
        cond, model = t.condition, t.model
        path = folder / f"{w.name}-{cond.replace(' ', '_')}.json"
        native = NATIVE
        if cond == "gradviz":
            t.rec = stack.enter_context(gradviz.record(model, path, native=native))
        elif cond == "gradviz every=10":
            t.rec = stack.enter_context(gradviz.record(model, path, every=BLOCK, native=native))
        elif cond == "gradviz + stats":
            t.rec = stack.enter_context(gradviz.record(model, path, activation_stats=True,
                                                       native=native))
        elif cond == "gradviz + stats Python":
            t.rec = stack.enter_context(gradviz.record(model, path, activation_stats=True,
                                                       native=False))
        elif cond == "gradviz Python":
            t.rec = stack.enter_context(gradviz.record(model, path, native=False))
        elif cond == "gradviz early norms":
            t.rec = stack.enter_context(gradviz.record(model, path, early_param_norms=True,
                                                       native=False))
        elif cond == "naive hook":
            t.watcher = NaiveHook(model)
            stack.callback(t.watcher.close)
        elif cond == "GradientMonitor":
            t.watcher = GradientMonitor(model)
            stack.callback(t.watcher.close)
    return out


def keep_freed_memory() -> bool:
    """Ask glibc's malloc not to map and unmap big blocks each step; False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
            libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def sync() -> None:
    """Wait for the device (nothing to wait for on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def race(trainers: list[Trainer], rounds: int, blocks: int, warmup: int
         ) -> dict[str, list[float]]:
    """Per condition, the per-round ratio of its fastest block to bare's (the condition
    named "bare"); every block's time is kept in its trainer's ``blocks``."""
    ratios: dict[str, list[float]] = {t.condition: [] for t in trainers}
    for t in trainers:
        t.steps(warmup * BLOCK)
    for r in range(rounds):
        k = r % len(trainers)
        order = trainers[k:] + trainers[:k]  # rotate: no condition always goes first
        times: dict[str, list[float]] = {t.condition: [] for t in trainers}
        for _ in range(blocks):  # block by block across conditions: slow spells of the
            for t in order:      # machine fall on all of them alike
                sync()
                t0 = time.perf_counter()
                t.steps(BLOCK)
                sync()  # on a GPU: until the block's work is done, not just queued
                times[t.condition].append(time.perf_counter() - t0)
        for t in trainers:
            t.blocks.extend(times[t.condition])
        # another process can only slow a block down: the fastest is the least
        # disturbed reading of a condition in this round
        best = {c: min(ts) for c, ts in times.items()}
        for c in ratios:
            ratios[c].append(best[c] / best["bare"])
    return ratios


def measure(w: Workload, rounds: int, blocks: int, warmup: int) -> dict[str, list[float]]:
    """Per condition, the per-round ratio of its fastest block time to bare's."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainers = make_trainers(w, stack, Path(tmp))
        ratios = race(trainers, rounds, blocks, warmup)
        ratios["_ms"] = [statistics.median(t.blocks) / BLOCK * 1e3 for t in trainers]
        # the recorders really recorded: a benchmark of something that silently failed is void
        for t in trainers:
            if t.rec is not None and t.rec._failed:
                raise RuntimeError(f"gradviz failed during {w.name} / {t.condition}")
        ratios["_native"] = [t.condition for t in trainers  # type: ignore[misc]
                             if t.rec is not None and t.rec._nat is not None
                             and t.rec._nat.armed > 0]
    return ratios


def run_benchmark(args: argparse.Namespace) -> None:
    """Measure every chosen model and print the table."""
    where = "CPU" if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE)
    print(f"# Recording overhead ({where})\n\n{machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s); {args.rounds} rounds x {args.blocks} "
          f"blocks of {BLOCK} steps per condition, interleaved in one process; malloc "
          f"{'keeps freed memory' if args.kept else 'as it is'}.\n")
    header = ["model", "bare ms/step", *[c for c in CONDITIONS if c != "bare"]]
    rows = []
    verdict = []
    noise = []  # (--processes: 'bare again' per model, the method's own error beside them)
    native_in: list[str] = []
    for name in args.models:
        w = WORKLOADS[name]
        t0 = time.perf_counter()
        r = measure(w, args.rounds, args.blocks, args.warmup)
        row: list[object] = [f"{name}: {w.describe(BATCH)}", f"{r['_ms'][0]:.2f}"]
        for c in CONDITIONS[1:]:
            lo, med, hi = quartiles(r[c])
            row.append(ratio_cell(lo, med, hi))
            if c in TARGETS:
                verdict.append([name, c, f"{med:.3f}x", f"{TARGETS[c]:.2f}x",
                                mark(med <= TARGETS[c])])
            elif c == "bare again":
                noise.append([name, c, med])
        rows.append(row)
        native_in.append(f"{name}: {', '.join(r['_native']) or 'none'}")  # type: ignore[arg-type]
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(header, rows))
    print("\nRatio: per round, each condition's fastest block of 10 steps over bare's; the "
          "median of that over rounds, in brackets its interquartile range. bare ms/step: "
          "median over all of bare's blocks. 'bare again' is a second untouched copy of the "
          "model: how far 1.00 the method itself can be off.\n")
    print(f"Conditions that recorded with the native recorder: {'; '.join(native_in)}.\n")
    print(table(["model", "condition", "measured", "target", "met"], verdict))
    if args.verdicts:  # (--processes: for the parent process)
        Path(args.verdicts).write_text(json.dumps(
            noise + [[name, c, float(m[:-1])] for name, c, m, _, _ in verdict]))


def processes(args: argparse.Namespace, argv: list[str]) -> int:
    """--processes N: the benchmark in N fresh processes, one after the other, and each
    target's median over them. Where a process's memory lands (which a fresh process
    draws anew) moves a ratio by a few tenths of a percent: on a target as tight as
    1.01x, one process's verdict is a draw, the median over several is not."""
    own = []  # the command line without --processes
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            own.append(a)
    got: dict[tuple[str, str], list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"{i}.json"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, *own, "--verdicts", str(out)],
                               capture_output=True, text=True)
            if r.returncode != 0 or not out.exists():
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"overhead.py: process {i + 1} of {args.processes} failed: {last}",
                      file=sys.stderr)
                return 1
            for name, c, m in json.loads(out.read_text()):
                got[(name, c)].append(m)
            print(f"  process {i + 1} of {args.processes}: {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
    print(f"# Recording overhead over {args.processes} processes\n\n{machine()}, torch "
          f"{torch.__version__}; each process: {shlex.join(own) or 'the defaults'}.\n")
    rows = [[name, c, " ".join(f"{m:.3f}" for m in ms), f"{statistics.median(ms):.3f}x",
             f"{max(ms):.3f}x", f"{TARGETS[c]:.2f}x" if c in TARGETS else "-",
             mark(statistics.median(ms) <= TARGETS[c]) if c in TARGETS else "-"]
            for (name, c), ms in got.items()]
    print(table(["model", "condition", "per process", "median", "worst", "target", "met"],
                rows))
    print("\nEach process's ratio is its median over rounds, as in the one-process table; "
          "met: the median over processes is within the target. 'bare again' (an untouched "
          "copy of the model, when measured) shows how far from 1.00 the method itself "
          "lands in each process.")
    return 0


def profile(name: str, steps: int) -> None:
    """Where a recorded step's time goes: pyinstrument if installed, else cProfile."""
    w = WORKLOADS[name]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainers = {t.condition: t for t in make_trainers(w, stack, Path(tmp))}
        bare, rec = trainers["bare"], trainers["gradviz"]
        for t in (bare, rec):
            t.steps(20)
        t0 = time.perf_counter()
        bare.steps(steps)
        t_bare = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        rec.steps(steps)
        t_rec = (time.perf_counter() - t0) / steps
        print(f"# Profile: {name}, {steps} steps each, gradviz every step\n\n"
              f"bare {t_bare * 1e3:.2f} ms a step, recorded {t_rec * 1e3:.2f} ms "
              f"(+{(t_rec - t_bare) * 1e6:.0f} us, {t_rec / t_bare:.2f}x)\n")
        try:
            import pyinstrument
        except ImportError:
            pyinstrument = None  # type: ignore[assignment]
        if pyinstrument is not None:
            prof = pyinstrument.Profiler(interval=0.0002)
            prof.start()
            rec.steps(steps)
            prof.stop()
            print(prof.output_text(unicode=False, color=False, show_all=False))
            return
        cprof = cProfile.Profile()
        cprof.enable()
        rec.steps(steps)
        cprof.disable()
    out = io.StringIO()
    pstats.Stats(cprof, stream=out).sort_stats("cumulative").print_stats("gradviz", 30)
    print(f"cProfile (pip install pyinstrument for a call tree), gradviz's functions:\n"
          f"{out.getvalue()}")


def cycle(name: str, rounds: int) -> None:
    """Every 10th step, step by step: what each phase of each step of the 10-step cycle
    costs over the same step without gradviz (the recorded step is the first)."""
    w = WORKLOADS[name]
    phases = ["forward", "backward", "rec.step()", "optimizer"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainers = copies(w, ["bare", "bare again", "gradviz every=10"])
        watched = trainers[2]
        watched.rec = stack.enter_context(gradviz.record(
            watched.model, Path(tmp) / "cycle.json", every=BLOCK, native=NATIVE))
        times = {t.condition: [[[] for _ in phases] for _ in range(BLOCK)] for t in trainers}
        rng = random.Random(0)
        for r in range(rounds + 2):  # (two rounds to warm up)
            # a random order each round: with a fixed one each condition always follows the
            # same other, and which one shifts the first steps' times by microseconds
            order = trainers[:]
            rng.shuffle(order)
            for t in order:
                for i in range(BLOCK):
                    marks = t.timed_step()
                    if r >= 2:
                        for k in range(len(phases)):
                            times[t.condition][i][k].append(marks[k + 1] - marks[k])
        native_used = watched.rec._nat is not None and watched.rec._nat.armed > 0

    def extra(cond: str, i: int) -> list[float]:
        """Each phase's median time at step i of the cycle, minus bare's, in us."""
        return [(statistics.median(times[cond][i][k])
                 - statistics.median(times["bare"][i][k])) * 1e6 for k in range(len(phases))]

    rows = []
    total = noise = 0.0
    for i in range(BLOCK):
        cells, again = extra("gradviz every=10", i), sum(extra("bare again", i))
        total, noise = total + sum(cells), noise + again
        rows.append([i, *[f"{c:+.1f}" for c in cells], f"{sum(cells):+.1f}", f"{again:+.1f}"])
    bare_ms = sum(statistics.median(times["bare"][i][k])
                  for i in range(BLOCK) for k in range(len(phases))) * 1e3
    print(f"# Every 10th step, step by step: {name}\n\n{machine()}, torch {torch.__version__}; "
          f"{rounds} rounds in a random order of bare, bare again and gradviz every=10 "
          f"({'native' if native_used else 'Python'} recorder). Each cell: the median over "
          "rounds of that phase of that step, minus bare's, in microseconds.\n")
    print(table(["step of the cycle", *[f"{p} us" for p in phases], "total us",
                 "bare again us"], rows))
    print(f"\nA cycle of bare: {bare_ms:.2f} ms. gradviz every=10 adds {total:+.0f} us to it "
          f"({1 + total / (bare_ms * 1e3):.4f}x); 'bare again', an untouched copy, "
          f"{noise:+.0f} us ({1 + noise / (bare_ms * 1e3):.4f}x).")


def scaling(depths: list[int], rounds: int) -> None:
    """Recorded step time against depth: chains of Linear(16, 16) + ReLU, batch 8."""
    rows = []
    for depth in depths:
        torch.manual_seed(0)
        x, y = torch.randn(8, 16, device=DEVICE), torch.randint(0, 16, (8,), device=DEVICE)
        trainers = []
        for _ in range(2):  # two identical copies: one bare, one recorded
            torch.manual_seed(0)
            model = mlp([16] * (depth + 1)).to(DEVICE)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            trainers.append(Trainer("", model, opt, [(x, y)], _ce))
        with gradviz.record(trainers[1].model, path=None) as rec:
            trainers[1].rec = rec
            timed: dict[str, list[float]] = {"bare": [], "gradviz": []}
            for r in range(rounds + 1):
                for name, t in zip(("bare", "gradviz"), trainers, strict=True):
                    sync()
                    t0 = time.perf_counter()
                    t.steps(3)
                    sync()
                    if r:  # the first round warms up
                        timed[name].append((time.perf_counter() - t0) / 3)
        b, g = min(timed["bare"]), min(timed["gradviz"])
        rows.append([depth, f"{b * 1e3:.1f}", f"{g * 1e3:.1f}", f"{g / b:.2f}x",
                     f"{(g - b) / depth * 1e6:.0f}"])
        print(f"  {depth} layers: done", file=sys.stderr, flush=True)
    print("# Recorded step against depth (every step recorded)\n\nChains of Linear(16, 16) "
          "with ReLU, batch 8, SGD; fastest of "
          f"{rounds} rounds of 3 steps.\n")
    print(table(["layers", "bare ms", "recorded ms", "ratio", "added us per layer"], rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:12]))
    p.add_argument("--quick", action="store_true",
                   help="a few seconds: 2 rounds of one block, the MLP only (unless --models)")
    p.add_argument("--models", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    p.add_argument("--blocks", type=int, default=3,
                   help=f"blocks of {BLOCK} steps per condition per round (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up blocks (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where to train")
    p.add_argument("--batch", type=int, metavar="N",
                   help="every model's batch size (default: each its own, as in the issue); "
                        "on a GPU, a large one makes the step bound by the device, not by "
                        "launching kernels")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep (default): glibc keeps freed memory, less noise; default: as is")
    p.add_argument("--no-native", action="store_true",
                   help="no native recorder: 'gradviz', 'gradviz every=10' and 'gradviz + "
                        "stats' record in Python (by default it is built first if it is not "
                        "yet: 20-60 s, once)")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS[1:], metavar="CONDITION",
                   help="only these (and bare), for more rounds in the same time; quote "
                        "names with spaces, e.g. 'bare again' 'gradviz every=10' (default: "
                        "all)")
    p.add_argument("--profile", choices=list(WORKLOADS), help="profile this model and exit")
    p.add_argument("--profile-steps", type=int, default=200)
    p.add_argument("--cycle", choices=list(WORKLOADS), metavar="MODEL",
                   help="every 10th step, step by step: each phase's added time at each "
                        "step of the cycle, for this model, and exit")
    p.add_argument("--cycle-rounds", type=int, default=300, metavar="N",
                   help="rounds for --cycle (default 300)")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="run the benchmark in N fresh processes, one after the other, and "
                        "give each target's median over them (default 1: this process)")
    p.add_argument("--verdicts", help=argparse.SUPPRESS)  # (--processes: each one's results)
    p.add_argument("--scaling", nargs="*", type=int, metavar="LAYERS",
                   help="recorded step time against depth (default 25 50 100 200 500) and exit")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be at least 1, not {args.batch}")
    if args.cycle_rounds < 1:
        p.error(f"--cycle-rounds must be at least 1, not {args.cycle_rounds}")
    if args.processes < 1:
        p.error(f"--processes must be at least 1, not {args.processes}")
    if args.processes > 1 and (args.profile or args.cycle or args.scaling is not None):
        p.error("--processes repeats the benchmark's table; not with --profile, --cycle or "
                "--scaling")
    if args.quick:
        args.rounds, args.blocks, args.warmup = 2, 1, 1
        if args.models == list(WORKLOADS):
            args.models = ["mlp"]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or the profile)."""
    args = parse_args(argv)
    if args.processes > 1:
        return processes(args, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    args.kept = args.malloc == "keep" and keep_freed_memory()
    global DEVICE, BATCH, NATIVE
    DEVICE = torch.device(args.device)
    BATCH = args.batch
    NATIVE = not args.no_native
    if args.conditions:  # (in the usual order, bare first)
        CONDITIONS[:] = ["bare", *[c for c in CONDITIONS[1:] if c in args.conditions]]
    if NATIVE:
        from gradviz import native

        if native.load(build_if_missing=True) is None:
            print(f"overhead.py: no native recorder ({native.why_not()}): 'gradviz' records "
                  "in Python", file=sys.stderr)
    warnings.simplefilter("ignore")  # full backward hooks on embeddings warn every step
    gc.collect()
    if args.scaling is not None:
        scaling(args.scaling or ([10, 50] if args.quick else [25, 50, 100, 200, 500]),
                2 if args.quick else 5)
    elif args.profile:
        profile(args.profile, args.profile_steps)
    elif args.cycle:
        cycle(args.cycle, 3 if args.quick else args.cycle_rounds)
    else:
        run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

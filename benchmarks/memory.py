"""Memory: recording grows by the history's own float32 size, and by nothing per step else.

Usage:
    python benchmarks/memory.py               # 500-layer model; 10,000 steps of history
    python benchmarks/memory.py --quick       # 30 layers, 1,000 steps: a few seconds
    python benchmarks/memory.py --layers 1000 --steps 20000 --real-steps 500

Two measurements, in one process:

1. A real run: a chain of LAYERS Linear(16, 16) layers with ReLU between them, recorded with
   gradviz.record (in memory) for REAL_STEPS steps after a warm-up. Python allocations
   (tracemalloc: gradviz's own, numpy's included; torch's tensors are not Python
   allocations) and the process RSS are read before and after: per recorded step, they
   grow by about one row of the history (series x 4 bytes) and nothing else.
2. The same recording's History, driven on to STEPS rows with that row's values: memory
   grows by the float32 matrix itself (steps x series x 4 bytes), within one chunk of rows;
   and what writing the file costs on top, transiently: store.write streams the series
   (what gradviz does), against the whole document at once (to_document + dumps).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import machine, table  # noqa: E402

import gradviz  # noqa: E402
from gradviz import store  # noqa: E402


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def chain(layers: int, width: int = 16) -> nn.Sequential:
    """LAYERS Linear layers with ReLU between them."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def mb(n: float) -> str:
    """Bytes as megabytes, one decimal."""
    return f"{n / 1e6:.1f}"


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:6]))
    p.add_argument("--layers", type=int, default=500)
    p.add_argument("--steps", type=int, default=10_000, help="history rows to reach (part 2)")
    p.add_argument("--real-steps", type=int, default=40, help="recorded steps (part 1)")
    p.add_argument("--quick", action="store_true", help="30 layers, 1,000 rows, 30 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.steps, args.real_steps = 30, 1000, 30
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = chain(args.layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 16), torch.randint(0, 16, (8,))

    def step(rec: gradviz.Recorder) -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        rec.step(loss)
        opt.step()

    print(f"# Memory\n\n{machine()}, torch {torch.__version__}. Model: {args.layers} x "
          f"Linear(16, 16) with ReLU, recorded every step, in memory (path=None).\n")
    with gradviz.record(model, path=None) as rec:
        for _ in range(20):  # warm-up: every series exists, caches are filled
            step(rec)
        h = rec.recording.history
        width = len(h.columns)
        row = width * 4
        gc.collect()
        tracemalloc.start()
        n = args.real_steps
        marks = []  # (python bytes, rss, history bytes, time) at the start, middle and end
        for i in range(n + 1):
            if i in (0, n // 2, n):
                gc.collect()
                # (rec.recording, not h: it first puts the buffered steps into the history)
                held_now = rec.recording.history.nbytes()
                marks.append((tracemalloc.get_traced_memory()[0], rss(), held_now,
                              time.perf_counter()))
            if i < n:
                step(rec)
        (py0, rss0, held0, t0), (pym, _, heldm, _), (py1, rss1, held1, t1) = marks
        held = held1 - held0
        late = n - n // 2
        rows = [
            ["history row (series x 4 bytes)", f"{row:,}", "1.00"],
            ["Python allocations (tracemalloc)", f"{(py1 - py0) / n:,.0f}",
             f"{(py1 - py0) / n / row:.2f}"],
            ["  of which new history chunks", f"{held / n:,.0f}", f"{held / n / row:.2f}"],
            ["  everything else", f"{(py1 - py0 - held) / n:,.0f}",
             f"{(py1 - py0 - held) / n / row:.2f}"],
            ["  everything else, second half of the run",
             f"{(py1 - pym - (held1 - heldm)) / late:,.0f}",
             f"{(py1 - pym - (held1 - heldm)) / late / row:.2f}"],
            ["process RSS", f"{(rss1 - rss0) / n:,.0f}", f"{(rss1 - rss0) / n / row:.2f}"],
        ]
        print(f"## 1. A real run: {n} recorded steps ({(t1 - t0) / n * 1e3:.0f} ms a step "
              f"under tracemalloc), {width:,} series\n")
        print(table(["per recorded step", "bytes", "x row"], rows))
        print("\nThe history allocates rows a chunk at a time (16 rows, doubling up to "
              f"{store.CHUNK_ROWS}), so over a short run its share comes in steps; what else "
              "the first steps allocate once (caches, free lists) shows in the first half. RSS "
              "moves in pages and allocator arenas, torch's included: a coarse reading; "
              "tracemalloc counts every Python and numpy byte.\n")

        # 2. the same history driven on to --steps rows, values as a real row looks
        last = np.asarray([h.last(k) or 0.0 for k in h.columns], dtype=np.float32)
        cols = list(range(width))
        start = len(h)
        gc.collect()
        tracemalloc.reset_peak()
        py0, rss0 = tracemalloc.get_traced_memory()[0], rss()
        t0 = time.perf_counter()
        for _ in range(start, args.steps):
            h.append(h.steps[-1] + 1, cols, last)
        t_append = time.perf_counter() - t0
        gc.collect()
        py1, rss1 = tracemalloc.get_traced_memory()[0], rss()
        added = args.steps - start
        own = added * row
        recording = rec.recording
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "training_output.json"
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            store.write(path, recording)
            t_write = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] - before
            size = path.stat().st_size
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        data = store.dumps(recording.to_document())
        peak_whole = tracemalloc.get_traced_memory()[1] - before
        del data
        tracemalloc.stop()
        total_own = len(h) * row
        rows = [
            [f"{added:,} rows x {width:,} series as float32 (own size)", mb(own), "1.00"],
            ["Python allocations grew by", mb(py1 - py0), f"{(py1 - py0) / own:.2f}"],
            ["process RSS grew by", mb(rss1 - rss0), f"{(rss1 - rss0) / own:.2f}"],
            ["History holds (allocated chunks)", mb(h.nbytes()),
             f"{h.nbytes() / total_own:.2f} of its {len(h):,} rows"],
            ["writing the file: transient peak on top (store.write, streamed)", mb(peak),
             f"{peak / total_own:.2f}"],
            ["  the whole document at once instead (to_document + dumps)", mb(peak_whole),
             f"{peak_whole / total_own:.2f}"],
            ["the file itself", mb(size), f"{size / total_own:.2f}"],
        ]
        print(f"## 2. The history alone, to {len(h):,} steps ({t_append:.1f} s of appends; "
              f"one write {t_write:.1f} s)\n")
        print(table(["", "MB", "x own size"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

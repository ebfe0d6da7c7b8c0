"""Shared bits of the benchmark scripts: the machine line, timing, markdown tables."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def machine() -> str:
    """One line naming the machine: CPU model, cores, Python (torch is added by callers)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, Python {platform.python_version()}"


def history_size_args(p: argparse.ArgumentParser) -> None:
    """--steps, --layers, --repeat and --quick, shared by the scripts timing a big history."""
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--layers", type=int, default=500)
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--quick", action="store_true", help="500 steps x 50 layers, one run")


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of fn over repeat runs, and the last run's result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        cols = zip(r[1:], widths[1:], strict=True)
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in cols]
        return "| " + " | ".join(parts) + " |"
    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]])
    return "\n".join([line(cells[0]), rule + "|", *[line(r) for r in cells[1:]]])


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles (the median of one value is itself)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def ratio_cell(lo: float, med: float, hi: float) -> str:
    """A ratio's table cell: its median, in brackets its interquartile range."""
    return f"{med:.3f}x ({lo:.2f}-{hi:.2f})"


def mark(ok: bool) -> str:
    """A pass/fail word for a results table."""
    return "yes" if ok else "**no**"

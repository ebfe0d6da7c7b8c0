"""On a CUDA GPU: what the recorded step's one transfer costs, queued or waited for.

Usage:
    python benchmarks/gpu_copy.py                  # 6x1024 MLP at batch 64 to 16384 (a minute)
    python benchmarks/gpu_copy.py --quick          # a few seconds: is it still working?
    python benchmarks/gpu_copy.py --batches 64 4096 --rounds 40

gradviz moves a recorded step's norms to the host in one copy. It queues that copy into a
pinned buffer (non_blocking) and waits for it only when rows are read, once every 64 steps
(see gradviz.capture._Rows). The alternative, a plain blocking copy, waits at every
recorded step until the device has finished the backward: the host stops queueing work and
the device then idles while the host catches up. This script measures both, side by side
in one process, on the same recorder, with the copy switched between them block by block:

- bare: the training step without gradviz;
- bare + sync: the same step with one torch.cuda.synchronize() after backward, what any
  loop that calls loss.item() each step pays;
- gradviz: recorded every step, its copy queued (what gradviz does);
- gradviz, blocking copy: the same recorder with a blocking copy in its place.

Small batches are bound by launching kernels (the device waits for the host anyway), so
the two copies cost the same there; large ones are bound by the device, where waiting
costs. A condition's time is its mean over all its blocks, so the rows' drain into the
history (every 64 steps) is in it. The blocking copy goes into the same pinned buffer:
gradviz's copy before it was queued went to pageable memory, a little slower still.
Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import machine, table  # noqa: E402
from overhead import WORKLOADS  # noqa: E402

import gradviz  # noqa: E402
from gradviz import capture  # noqa: E402

BLOCK = 10  # steps per timed block
CONDITIONS = ["bare", "bare + sync", "gradviz", "gradviz, blocking copy"]


def blocking_put(rows: Any, at: int, flat: torch.Tensor) -> None:
    """_Rows.put as a plain copy: waits for the device (the design gradviz does not use)."""
    rows.buf[at].copy_(flat)
    if rows.events is not None:
        rows.events[at] = None


def build(dev: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The 6x1024 MLP of benchmarks/overhead.py, with Adam."""
    torch.manual_seed(0)
    model = WORKLOADS["mlp-6x1024"].build().to(dev)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def measure(batch: int, rounds: int, dev: torch.device) -> dict[str, float]:
    """Per condition, its mean time per step (seconds) over blocks interleaved in rounds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1024, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    (bare, bare_opt), (watched, watched_opt) = build(dev), build(dev)
    queued = capture._Rows.put
    total = dict.fromkeys(CONDITIONS, 0.0)
    with gradviz.record(watched, path=None) as rec:

        def steps(model: nn.Module, opt: torch.optim.Optimizer, after: Callable[[Any], None],
                  n: int = BLOCK) -> None:
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                after(loss)
                opt.step()

        plain = {
            "bare": (bare, bare_opt, lambda loss: None),
            "bare + sync": (bare, bare_opt, lambda loss: torch.cuda.synchronize()),
            "gradviz": (watched, watched_opt, rec.step),
            "gradviz, blocking copy": (watched, watched_opt, rec.step),
        }
        try:
            for cond in CONDITIONS:  # warm-up
                steps(*plain[cond], n=3 * BLOCK)
            for r in range(rounds):
                k = r % len(CONDITIONS)
                for cond in CONDITIONS[k:] + CONDITIONS[:k]:
                    capture._Rows.put = blocking_put if "blocking" in cond else queued
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    steps(*plain[cond])
                    torch.cuda.synchronize()
                    total[cond] += time.perf_counter() - t0
        finally:
            capture._Rows.put = queued
    if rec._failed:
        raise RuntimeError(f"gradviz failed at batch {batch}")
    return {c: t / (rounds * BLOCK) for c, t in total.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:6]))
    p.add_argument("--quick", action="store_true", help="batches 64 and 4096, 3 rounds")
    p.add_argument("--batches", nargs="+", type=int, default=[64, 1024, 4096, 16384],
                   metavar="N", help="batch sizes (default 64 1024 4096 16384)")
    p.add_argument("--rounds", type=int, default=32,
                   help="interleaved rounds (default 32: 320 steps, 5 drains of 64 rows)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_copy.py: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.batches, args.rounds = [64, 4096], 3
    dev = torch.device("cuda")
    print(f"# The recorded step's transfer on {torch.cuda.get_device_name(dev)}\n\n"
          f"{machine()}, torch {torch.__version__}; 6 x Linear(1024, 1024) + ReLU + head, "
          f"Adam, every step recorded; mean over {args.rounds} interleaved rounds of one "
          f"block of {BLOCK} steps each.\n")
    rows = []
    for batch in args.batches:
        mean = measure(batch, args.rounds, dev)
        base = mean["bare"]
        rows.append([batch, f"{base * 1e3:.2f}",
                     *[f"{mean[c] / base:.3f}x" for c in CONDITIONS[1:]]])
        print(f"  batch {batch}: done", file=sys.stderr, flush=True)
    print(table(["batch", "bare ms/step", *CONDITIONS[1:]], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

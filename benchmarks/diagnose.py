"""Diagnosis speed: gradviz.diagnose on a long recorded history, as the viewer runs it.

Usage:
    python benchmarks/diagnose.py                # 10,000 steps x 500 layers
    python benchmarks/diagnose.py --quick        # 500 steps x 50 layers: a few seconds
    python benchmarks/diagnose.py --reference    # also the per-step loops it replaced (~25 s)
    python benchmarks/diagnose.py --steps 20000 --layers 1000 --repeat 5

The viewer diagnoses a file that gradviz.record wrote without findings when it opens it, so
diagnosis must not make opening a long run slow. Two files of a chain of LAYERS Linear
layers (per layer its gradient norm, activation-gradient norm, weight and bias norms; the
loss), read back through store.parse: a healthy run (smooth norms, a falling loss: no
findings) and a troubled one (log-normal norms that jump about at every step: thousands of
jumps to find). Target: diagnose in at most 1 s on 10,000 steps x 500 layers.
--reference also times tests/_diagnose_reference.py, the implementation with a Python loop
over steps and layers that diagnose replaced, and checks that both give the same findings.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import history_size_args, machine, mark, median_time, table  # noqa: E402

from gradviz import store  # noqa: E402
from gradviz.diagnose import diagnose  # noqa: E402

TARGET_S = 1.0


def chain_run(layers: int, steps: int, healthy: bool, seed: int = 0) -> store.Run:
    """A file of a LAYERS-deep chain of Linear layers, written and parsed back."""
    rec = store.Recording(meta={"model": "Synthetic", "every": 1, "seed": seed, "lr": 1e-3})
    keys: list[tuple[str, ...]] = [("loss",)]
    width = 256
    params = {"weight": {"shape": [width, width], "numel": width * width, "trainable": True},
              "bias": {"shape": [width], "numel": width, "trainable": True}}
    for i in range(layers):
        nid = f"layers.{i}"
        rec.nodes[nid] = {"kind": "layer", "type": "Linear", "param_count": width * width + width,
                          "params": params, "order": i, "activation": "ReLU"}
        keys += [("node", nid, "gradient_norm"), ("node", nid, "activation_grad_norm"),
                 ("param", nid, "weight"), ("param", nid, "bias")]
        if i:
            rec.edges[f"layers.{i - 1}->{nid}"] = {"source": f"layers.{i - 1}", "target": nid,
                                                   "via": ["relu"]}
    cols = [rec.history.column(k) for k in keys]
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None]
    if healthy:
        # each layer near its own level (within 20x of the others), 5% noise, slowly falling
        level = np.exp(rng.normal(-2.0, 0.5, size=(1, len(cols))))
        values = level * (1 - 0.5 * t / steps) * np.exp(rng.normal(0, 0.05, (steps, len(cols))))
        values[:, 0] = 0.3 + 2.0 * np.exp(-t[:, 0] / (steps / 4)) + rng.normal(0, 0.005, steps)
    else:
        values = np.exp(rng.normal(-3.0, 1.5, size=(steps, len(cols))))
    values = values.astype(np.float32)
    for step in range(steps):
        rec.history.append(step, cols, values[step])
    return store.parse(store.dumps(rec.to_document()))


def main(argv: list[str] | None = None) -> int:
    """Build both files, time diagnose on each, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:7]))
    history_size_args(p)
    p.add_argument("--reference", action="store_true",
                   help="also time the per-step loops diagnose replaced (one run each)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.layers, args.repeat = 500, 50, 1
    reference: Any = None
    if args.reference:
        sys.path.insert(0, str(ROOT / "tests"))
        reference = importlib.import_module("_diagnose_reference")

    print(f"# Diagnosis\n\n{machine()}. History: {args.steps:,} steps x {args.layers} layers "
          f"(4 series a layer, and the loss). Median of {args.repeat} runs.\n", flush=True)
    rows = []
    same = True
    for name, healthy in (("healthy (no findings)", True), ("troubled (norms jump)", False)):
        t0 = time.perf_counter()
        run = chain_run(args.layers, args.steps, healthy)
        built = time.perf_counter() - t0
        took, findings = median_time(lambda run=run: diagnose(run), args.repeat)
        row = [name, str(len(findings)), f"{took:.3f}"]
        if reference is not None:
            old_took, old = median_time(lambda run=run: reference.diagnose(run), 1)
            ok = repr(old) == repr(findings)
            same &= ok
            row += [f"{old_took:.2f}", f"{old_took / took:.0f}x", "yes" if ok else "**NO**"]
        rows.append([*row, f"{TARGET_S:.0f}", mark(took <= TARGET_S)])
        print(f"{name}: file built and parsed in {built:.1f} s", flush=True)
    header = ["run", "findings", "diagnose s"]
    if reference is not None:
        header += ["per-step loops s", "speed-up", "same findings"]
    print()
    print(table([*header, "target s", "met"], rows))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

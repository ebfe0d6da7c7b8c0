"""File speed: write and read a long recorded history (training_output.json).

Usage:
    python benchmarks/file_io.py                 # 10,000 steps x 500 layers (~1,000 edges)
    python benchmarks/file_io.py --quick         # 500 steps x 50 layers: a few seconds
    python benchmarks/file_io.py --steps 20000 --layers 1000 --repeat 5

The history is what gradviz.record writes for a residual network of LAYERS Linear layers
in pairs (fc1 -> fc2, joined to the stream by an add junction: two edges per layer): per
layer its gradient norm, activation- and input-gradient norms, weight and bias norms; per
junction its gradient norm; per edge its norm; the loss. Targets: write (Recording ->
bytes: ``to_document`` + ``dumps``) and read (bytes -> Run: ``store.parse``, which checks
every series) in at most 2 s each. Disk time (write_atomic with fsync, read_bytes) is shown
separately; it depends on the disk, not on gradviz. The viewer's first request (build the
graph and the page payload from the file) is timed too: it must not grow with the steps.

While training, gradviz rewrites the file every few seconds from a background thread.
The last table shows what that costs the training thread: a small MLP's training steps
run while the file is written, counted against how many fit in that time at full speed,
and the longest step. Writing the whole document at once (one orjson call) holds Python's
GIL for a third of a second on this history; store.write streams the series and lets go
of it after each one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import history_size_args, machine, mark, median_time, table  # noqa: E402

from gradviz import render, store  # noqa: E402
from gradviz.diagnose import diagnose  # noqa: E402
from gradviz.graph import build_graph  # noqa: E402

TARGET_S = 2.0


def residual_recording(layers: int, steps: int, seed: int = 0) -> store.Recording:
    """A Recording shaped like gradviz.record's output for a residual net, filled at random."""
    rec = store.Recording(meta={"model": "Synthetic", "every": 1, "seed": seed})
    keys: list[tuple[str, ...]] = [("loss",)]
    stream = "stem"
    rec.nodes[stream] = _linear(0)
    keys += _layer_keys(stream)
    order = 1
    for b in range(max(layers // 2 - 1, 0)):
        fc1, fc2, add = f"blocks.{b}.fc1", f"blocks.{b}.fc2", f"add#{b}"
        rec.nodes[fc1], rec.nodes[fc2] = _linear(order), _linear(order + 1)
        rec.nodes[add] = {"kind": "junction", "type": "add", "param_count": 0, "params": {},
                          "order": order + 2}
        order += 3
        keys += _layer_keys(fc1) + _layer_keys(fc2) + [("node", add, "activation_grad_norm")]
        for src, dst, via in ((stream, fc1, []), (fc1, fc2, [f"blocks.{b}.act"]),
                              (fc2, add, []), (stream, add, [])):
            eid = f"{src}->{dst}"
            rec.edges[eid] = {"source": src, "target": dst, "via": via}
            keys.append(("edge", eid))
        stream = add
    rec.nodes["head"] = _linear(order)
    keys += _layer_keys("head")
    rec.edges[f"{stream}->head"] = {"source": stream, "target": "head", "via": []}
    keys.append(("edge", f"{stream}->head"))
    cols = [rec.history.column(k) for k in keys]
    rng = np.random.default_rng(seed)
    # log-normal norms, as real ones look; a few absent values so the marker is exercised
    values = np.exp(rng.normal(-3.0, 1.5, size=(steps, len(cols)))).astype(np.float32)
    for step in range(steps):
        rec.history.append(step, cols, values[step])
    return rec


def _linear(order: int, width: int = 256) -> dict[str, Any]:
    params = {"weight": {"shape": [width, width], "numel": width * width, "trainable": True},
              "bias": {"shape": [width], "numel": width, "trainable": True}}
    return {"kind": "layer", "type": "Linear", "param_count": width * width + width,
            "params": params, "order": order}


def _layer_keys(nid: str) -> list[tuple[str, ...]]:
    return [("node", nid, "gradient_norm"), ("node", nid, "activation_grad_norm"),
            ("node", nid, "input_grad_norm"), ("param", nid, "weight"), ("param", nid, "bias")]


def main(argv: list[str] | None = None) -> int:
    """Build the history, time writing and reading it, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:6]))
    history_size_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.layers, args.repeat = 500, 50, 1

    t0 = time.perf_counter()
    rec = residual_recording(args.layers, args.steps)
    h = rec.history
    n_layers = sum(1 for n in rec.nodes.values() if n["kind"] == "layer")
    raw_mb = len(h) * len(h.columns) * 4 / 1e6
    print(f"# File write and read\n\n{machine()}. History: {len(h):,} steps x {n_layers} layers, "
          f"{len(rec.edges):,} edges, {len(h.columns):,} series ({raw_mb:.0f} MB as float32); "
          f"built in {time.perf_counter() - t0:.1f} s. Median of {args.repeat} runs.\n",
          flush=True)

    t_doc, document = median_time(rec.to_document, args.repeat)
    t_dumps, data = median_time(lambda: store.dumps(document), args.repeat)
    t_whole, _ = median_time(lambda: store.dumps(rec.to_document()), args.repeat)
    t_parse, run = median_time(lambda: store.parse(data), args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "training_output.json"
        t_write, _ = median_time(lambda: store.write(path, rec), args.repeat)
        assert path.read_bytes() == data  # streamed: the same bytes
        t_disk_w, _ = median_time(lambda: store.write_atomic(path, data), args.repeat)
        t_disk_r, _ = median_time(path.read_bytes, args.repeat)
        t_load, _ = median_time(lambda: store.load(path), args.repeat)
        stalls = training_during_writes(rec, path, args.repeat)

    # the viewer's first request: graph, layout and page payload (per-step data stays on the
    # server). A file written by gradviz.record alone carries no findings, so the viewer
    # diagnoses it on open: timed apart, as it is the part that grows with the steps.
    def first_view() -> int:
        g = build_graph(run)
        payload = render.graph_payload(g, render.DEFAULT_THRESHOLD)
        render.frames(run, g)
        return len(orjson.dumps(payload))

    run.findings = [{"kind": "none", "severity": "info", "layers": [], "steps": [0, 0]}]
    t_view, page_bytes = median_time(first_view, args.repeat)
    t_diag, _ = median_time(lambda: diagnose(run), 1)
    # sanity: what was read is what was written
    key = ("edge", next(iter(rec.edges)))
    assert np.array_equal(run.array(key).view("<u4"), h.series(key).view("<u4"))

    rows = [
        ["write: store.write, streamed, to disk with fsync", f"{t_write:.2f}",
         f"{TARGET_S:.0f}", mark(t_write <= TARGET_S)],
        ["write: to_document + dumps, the whole document at once", f"{t_whole:.2f}", "", ""],
        ["  of which to_document (base64 of every series)", f"{t_doc:.2f}", "", ""],
        ["  of which dumps (orjson)", f"{t_dumps:.2f}", "", ""],
        ["read: parse (orjson + checks + decode)", f"{t_parse:.2f}", f"{TARGET_S:.0f}",
         mark(t_parse <= TARGET_S)],
        ["disk: write_atomic (with fsync)", f"{t_disk_w:.2f}", "", ""],
        ["disk: read_bytes", f"{t_disk_r:.2f}", "", ""],
        ["load from disk (read + parse)", f"{t_load:.2f}", "", ""],
        ["viewer open: graph + layout + page payload + frames", f"{t_view:.2f}", "", ""],
        ["viewer open: diagnosis (files without findings)", f"{t_diag:.2f}", "", ""],
    ]
    print(table(["operation", "seconds", "target", "met"], rows))
    print(f"\nFile size {len(data) / 1e6:.0f} MB; the page's first payload (/api/graph) "
          f"{page_bytes / 1e3:.0f} kB, independent of the number of steps except the loss "
          "curve (one number per step); per-step and per-layer data come from /api/step and "
          "/api/layer on demand.")
    if stalls:
        print("\nTraining while the file is written in a background thread (a 784-256-128-64-10 "
              f"MLP, batch 64, one torch thread; median of {args.repeat} writes):\n")
        print(table(["writer", "write s", "steps done / at full speed", "longest step ms"],
                    stalls))
    return 0


def training_during_writes(rec: store.Recording, path: Path, repeat: int) -> list[list[str]]:
    """Train a small MLP in this thread while another writes the file: steps done against
    steps that fit at full speed, and the longest step. Empty without torch."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return []
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(200):
        step()
    full_speed = statistics.median(step() for _ in range(500))
    writers = {
        "to_document + dumps + write_atomic (whole document)":
            lambda: store.write_atomic(path, store.dumps(rec.to_document())),
        "store.write (streamed)": lambda: store.write(path, rec),
    }
    rows = []
    for name, write in writers.items():
        runs = []
        for _ in range(repeat):
            thread = threading.Thread(target=write)
            t0 = time.perf_counter()
            thread.start()
            steps = []
            while thread.is_alive():
                steps.append(step())
            took = time.perf_counter() - t0
            runs.append((took, len(steps) / (took / full_speed), max(steps, default=0.0)))
        took, share, longest = (statistics.median(r[i] for r in runs) for i in range(3))
        rows.append([name, f"{took:.2f}", f"{share:.0%}", f"{longest * 1e3:.0f}"])
    return rows


if __name__ == "__main__":
    sys.exit(main())

"""Viewer scale: server build, first draw and recolouring of a big graph, on synthetic files.

Usage:
    python benchmarks/viewer.py                  # 5,000 layers (~6,700 nodes, ~8,300 edges)
    python benchmarks/viewer.py --quick          # 300 layers, one repeat: a few seconds
    python benchmarks/viewer.py --layers 10000 --steps 200 --repeat 5
    python benchmarks/viewer.py --no-browser     # server side only

The file is a transformer of LAYERS layers: blocks of ln1, attn.qkv, attn.proj, ln2,
mlp.fc1, mlp.fc2 with two residual add junctions each (ten edges per block). Each view is
measured: every layer drawn (``--depth full``) and the automatic roll-up (one node per
block). Targets: the server builds a view (build_graph, roll-up, layout, page payload
and HTML; reading the file is timed apart) in at most 1 s; headless Chromium draws it
first in at most 2 s (navigation start to the first frame vis-network draws); a threshold
change recolours every edge, redraw included, in at most 150 ms (performance.now() in
the page).
Chromium: /usr/bin/chromium (or $GRADVIZ_CHROMIUM) through Playwright.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import machine, mark, median_time, table  # noqa: E402

from gradviz import render, store  # noqa: E402
from gradviz.web import create_app, parse_depth, read_run, snapshot  # noqa: E402

CHROMIUM = Path(os.environ.get("GRADVIZ_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--no-sandbox", "--disable-gpu", "--headless"]
TARGETS = {"server": 1.0, "draw": 2.0, "recolour": 0.150}


def transformer_file(path: Path, layers: int, steps: int, seed: int = 0) -> Path:
    """Write a synthetic transformer recording of about `layers` layers to path."""
    rec = store.Recording(meta={"model": "SyntheticTransformer", "every": 1, "seed": seed})
    keys: list[tuple[str, ...]] = [("loss",)]
    order = 0

    def layer(nid: str) -> None:
        nonlocal order
        rec.nodes[nid] = {"kind": "layer", "type": "Linear", "param_count": 4160, "order": order,
                          "params": {"weight": {"shape": [64, 64], "numel": 4096,
                                                "trainable": True},
                                     "bias": {"shape": [64], "numel": 64, "trainable": True}}}
        order += 1
        keys.extend([("node", nid, "gradient_norm"), ("node", nid, "activation_grad_norm"),
                     ("param", nid, "weight"), ("param", nid, "bias")])

    def junction(nid: str) -> None:
        nonlocal order
        rec.nodes[nid] = {"kind": "junction", "type": "add", "param_count": 0, "params": {},
                          "order": order}
        order += 1
        keys.append(("node", nid, "activation_grad_norm"))

    def edge(a: str, b: str) -> None:
        rec.edges[f"{a}->{b}"] = {"source": a, "target": b, "via": []}
        keys.append(("edge", f"{a}->{b}"))

    layer("embed")
    stream = "embed"
    for b in range(max((layers - 2) // 6, 1)):
        ln1, qkv, proj, ln2, fc1, fc2 = (f"blocks.{b}.{n}" for n in
                                         ("ln1", "attn.qkv", "attn.proj", "ln2", "mlp.fc1",
                                          "mlp.fc2"))
        for n in (ln1, qkv, proj, ln2, fc1, fc2):
            layer(n)
        add1, add2 = f"add#{2 * b}", f"add#{2 * b + 1}"
        junction(add1)
        junction(add2)
        for a, c in ((stream, ln1), (ln1, qkv), (qkv, proj), (proj, add1), (stream, add1),
                     (add1, ln2), (ln2, fc1), (fc1, fc2), (fc2, add2), (add1, add2)):
            edge(a, c)
        stream = add2
    layer("head")
    edge(stream, "head")
    cols = [rec.history.column(k) for k in keys]
    rng = np.random.default_rng(seed)
    # norms spread over decades around the default threshold 0.01: both colours appear
    values = np.exp(rng.normal(np.log(0.01), 2.0, size=(steps, len(cols)))).astype(np.float32)
    for step in range(steps):
        rec.history.append(step, cols, values[step])
    rec.findings = [{"kind": "vanishing", "severity": "warning", "layers": ["blocks.0.ln1"],
                     "steps": [0, steps - 1], "message": "synthetic", "suggestions": []}]
    path.write_bytes(store.dumps(rec.to_document()))
    return path


def server_times(path: Path, depth: str, repeat: int) -> tuple[float, float, dict[str, Any]]:
    """Seconds to read the file, and to build one view of it as the server does (graph,
    roll-up, layout, page payload, per-step matrices and page HTML); and the payload."""
    sig = (0, 0, 0)

    def build(run: store.Run) -> dict[str, Any]:
        snap = snapshot(run, sig, 1, threshold=0.01, source=path.name, depth=parse_depth(depth))
        render.render_page(snap.payload, title=path.name, live=True)
        return snap.payload

    run, _ = read_run(path)
    payload = build(run)
    return (median_time(lambda: read_run(path), repeat)[0],
            median_time(lambda: build(run), repeat)[0], payload)


def browser_times(path: Path, depth: str, repeat: int) -> dict[str, float]:
    """First draw and recolouring in headless Chromium, measured inside the page."""
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    srv = make_server("127.0.0.1", 0, create_app({"INPUT": path, "DEPTH": depth}),
                      threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/"
    out: dict[str, list[float]] = {"draw": [], "recolour": [], "update": [], "partial": []}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            for _ in range(repeat):
                page.goto(url)
                page.wait_for_function("() => window.gradviz && gradviz.state.firstDrawn",
                                       timeout=60000)
                out["draw"].append(page.evaluate("gradviz.state.firstDrawn") / 1e3)
                # every edge flips colour: thresholds below and above every norm, alternately
                for k in range(6):
                    t = 1e-12 if k % 2 == 0 else 1e12
                    upd, total = page.evaluate(RECOLOUR, t)
                    out["update"].append(upd / 1e3)
                    out["recolour"].append(total / 1e3)
                # a slider step: the threshold moves by a tenth of a decade
                for k in range(6):
                    _, total = page.evaluate(RECOLOUR, 0.01 * 10 ** (0.1 * (k % 2)))
                    out["partial"].append(total / 1e3)
                errors = page.evaluate("gradviz.state.errors")
                if errors:
                    raise RuntimeError(f"the page reported errors: {errors}")
            n_edges = page.evaluate("gradviz.edges.length")
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    return {**{k: statistics.median(v) for k, v in out.items()}, "edges": n_edges}


# Set the threshold, then wait for vis-network to finish the frame that shows it.
RECOLOUR = """async (t) => {
  const drawn = new Promise(r => gradviz.network.once("afterDrawing", r));
  const t0 = performance.now();
  gradviz.setThreshold(t);
  const t1 = performance.now();
  gradviz.network.redraw();
  await drawn;
  return [t1 - t0, performance.now() - t0];
}"""


def main(argv: list[str] | None = None) -> int:
    """Write the synthetic file, measure each view, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:7]))
    p.add_argument("--layers", type=int, default=5000)
    p.add_argument("--steps", type=int, default=100, help="recorded steps (default 100)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--depths", nargs="+", default=["full", "auto"],
                   help="views to measure (default: full auto)")
    p.add_argument("--no-browser", action="store_true", help="server side only")
    p.add_argument("--quick", action="store_true", help="300 layers, 20 steps, one run")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.steps, args.repeat = 300, 20, 1
        args.depths = ["full", "2"]  # 300 layers stay unrolled on auto: roll up anyway
    browser = not args.no_browser and CHROMIUM.exists()
    if not args.no_browser and not browser:
        print(f"{CHROMIUM} not found: browser timings skipped", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        path = transformer_file(Path(tmp) / "big.json", args.layers, args.steps)
        run = store.load(path)
        n_layers = sum(1 for n in run.nodes if n["kind"] == "layer")
        print(f"# Viewer scale\n\n{machine()}; headless Chromium {'yes' if browser else 'no'}. "
              f"Synthetic transformer: {n_layers:,} layers, {len(run.nodes):,} nodes, "
              f"{len(run.edges):,} edges, {args.steps} steps "
              f"({path.stat().st_size / 1e6:.0f} MB). Median of {args.repeat} runs.\n")
        rows = []
        for depth in args.depths:
            t_read, t_server, payload = server_times(path, depth, args.repeat)
            view = payload["run"]["view"]
            row: list[object] = [depth, view["depth"] or "full", f"{len(payload['nodes']):,}",
                                 f"{len(payload['edges']):,}",
                                 f"{t_server:.2f} {mark(t_server <= TARGETS['server'])}",
                                 f"{t_read:.2f}"]
            if browser:
                b = browser_times(path, depth, args.repeat)
                row += [f"{b['draw']:.2f} {mark(b['draw'] <= TARGETS['draw'])}",
                        f"{b['recolour'] * 1e3:.0f} "
                        f"{mark(b['recolour'] <= TARGETS['recolour'])}",
                        f"{b['update'] * 1e3:.0f}", f"{b['partial'] * 1e3:.0f}"]
            rows.append(row)
            print(f"  {depth}: done", file=sys.stderr, flush=True)
        header = ["--depth", "depth", "nodes", "edges", "server build s (<= 1)", "file read s"]
        if browser:
            header += ["first draw s (<= 2)", "recolour all edges ms (<= 150)",
                       "of which JS update ms", "slider step ms"]
        print(table(header, rows))
        print("\nserver build: build_graph, roll-up, layout, page payload, per-step matrices "
              "and page HTML, from the parsed file; file read: read, check and decode it "
              "(store.parse), once per change of the file. first draw: navigation start to "
              "vis-network's first frame (the page loads, parses its data and draws). "
              "recolour: setThreshold to the end of the next frame, every edge changing "
              "colour; slider step: a tenth of a decade, only edges that cross change.")
    render.environment()
    return 0


if __name__ == "__main__":
    sys.exit(main())

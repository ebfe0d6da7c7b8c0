"""The page in headless Chromium, against a real server (and the --export file).

Every test routes every request: anything not for 127.0.0.1 (or, for the export, not the
file itself) is aborted and recorded, and the list must stay empty. Console errors
(Content-Security-Policy violations among them) and dialogs fail the test too.
Without /usr/bin/chromium these tests skip, unless CI is set: then they fail.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from gradviz import render, store
from gradviz.graph import build_graph, node_status
from gradviz.web import create_app, export_html

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("GRADVIZ_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--no-sandbox", "--disable-gpu", "--headless"]
READY = "window.gradviz && gradviz.state.ready"


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install playwright")
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """serve(path, **config) starts a real threaded server on a free port; returns its URL."""
    from werkzeug.serving import make_server

    servers = []

    def start(path: Path, step_delay: float = 0.0, graph_delay: float = 0.0,
              **config: Any) -> str:
        app = create_app({"INPUT": path, **config})
        if step_delay or graph_delay:  # answers come late (a slow server)
            from flask import request

            delays = {"/api/step": step_delay, "/api/graph": graph_delay}
            app.before_request(lambda: time.sleep(delays.get(request.path, 0.0)))
        srv = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@dataclass
class Session:
    """One page, with everything it tried that it should not have."""

    page: Any
    outside: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def js(self, expr: str, arg: Any = None) -> Any:
        return self.page.evaluate(expr, arg)

    def check(self) -> None:
        assert self.outside == [], f"requests left 127.0.0.1: {self.outside}"
        assert self.dialogs == [], f"a dialog opened: {self.dialogs}"
        assert self.errors == [], f"console errors: {self.errors}"


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Session]]:
    contexts = []
    sessions: list[Session] = []

    def open_(url: str, offline: bool = False, width: int = 1400, height: int = 800) -> Session:
        ctx = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(ctx)
        page = ctx.new_page()
        s = Session(page)
        sessions.append(s)

        def route(r: Any) -> None:
            u = urlsplit(r.request.url)
            local = u.scheme == "http" and u.hostname == "127.0.0.1" and not offline
            if local or r.request.url == url or u.scheme == "data":
                r.continue_()
            else:
                s.outside.append(r.request.url)
                r.abort()

        def request(req: Any) -> None:  # file:// and data: may bypass routing: watch them too
            u = urlsplit(req.url)
            if u.scheme not in ("http", "data") and req.url != url:
                s.outside.append(req.url)

        ctx.route("**/*", route)
        if offline:
            ctx.set_offline(True)
        page.on("request", request)
        page.on("console", lambda m: s.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: s.errors.append(str(e)))
        page.on("dialog", lambda d: (s.dialogs.append(d.message), d.dismiss()))
        page.goto(url)
        page.wait_for_function(f"() => ({READY})", timeout=20000)
        return s

    yield open_
    for ctx in contexts:
        ctx.close()
    for s in sessions:
        s.check()


def wait(s: Session, condition: str, timeout: float = 10000) -> None:
    """Wait until a JS condition holds (as a function: the page's CSP forbids eval)."""
    try:
        s.page.wait_for_function(f"() => ({condition})", timeout=timeout)
    except Exception as e:  # say what the page itself reported
        said = s.js("window.gradviz ? gradviz.state.errors : null")
        raise AssertionError(f"waited {timeout:.0f} ms for {condition}; page errors: {said}"
                             ) from e


def edge_colours(s: Session) -> dict[str, str]:
    return dict(s.js("gradviz.edges.get().map(e => [e.name, e.color.color])"))


def node_sizes(s: Session) -> dict[str, float]:
    return dict(s.js("gradviz.nodes.get().map(n => [n.name, n.size])"))


def expected_colour(x: float | None, threshold: float) -> str:
    if x is None:
        return render.PALETTE["absent"]
    if not math.isfinite(x):
        return render.PALETTE["nonfinite"]
    return render.PALETTE["above"] if x > threshold else render.PALETTE["below"]


def node_xy(s: Session, node_id: str) -> tuple[float, float]:
    """Where a node is drawn, in page coordinates."""
    xy = s.js(
        """name => { const id = gradviz.visId(name);
        return gradviz.network.canvasToDOM(gradviz.network.getPositions([id])[id]); }""",
        node_id,
    )
    box = s.page.locator("#gv-network").bounding_box()
    return box["x"] + xy["x"], box["y"] + xy["y"]


def click_node(s: Session, node_id: str) -> None:
    s.page.mouse.click(*node_xy(s, node_id))


def hover_tooltip(s: Session, node_id: str) -> Any:
    """Move the mouse onto a node the way a hand does, and return the visible tooltip."""
    s.js("gradviz.network.fit({animation: false})")
    check = """id => { const t = document.querySelector('div.vis-tooltip');
        return !!t && t.style.visibility === 'visible' && t.textContent.startsWith(id); }"""
    for _ in range(3):  # a slow machine may miss the first pass; a hand would try again
        x, y = node_xy(s, node_id)
        s.page.mouse.move(x - 30, y - 30)
        s.page.mouse.move(x, y, steps=6)
        try:
            s.page.wait_for_function(check, arg=node_id, timeout=2000)
            break
        except Exception:
            continue
    assert s.js(check, node_id), f"no tooltip for {node_id}"
    return s.page.locator("div.vis-tooltip")


# -- tests -------------------------------------------------------------------------------


def test_page_draws_the_file(serve, open_page, residual_file: Path) -> None:
    run = store.load(residual_file)
    s = open_page(serve(residual_file))
    assert s.js("gradviz.nodes.length") == len(run.nodes)
    assert s.js("gradviz.edges.length") == len(run.edges)
    assert s.js("gradviz.network.physics.options.enabled") is False
    assert s.js("gradviz.state.firstDrawn") > 0
    # the page draws the server's styles first; re-styled in JS, it must agree with render.py
    s.js("gradviz.restyle()")
    first = s.js("JSON.parse(document.getElementById('gv-nodes').textContent)")
    now = {n["id"]: n for n in s.js("gradviz.nodes.get()")}
    for n in first:
        assert now[n["id"]]["size"] == pytest.approx(n["size"], abs=1e-3)
        assert now[n["id"]]["color"] == n["color"]
        assert now[n["id"]]["title"] == n["title"]
    first = s.js("JSON.parse(document.getElementById('gv-edges').textContent)")
    now = {e["id"]: e for e in s.js("gradviz.edges.get()")}
    for e in first:
        assert now[e["id"]]["width"] == pytest.approx(e["width"], abs=1e-3)
        assert now[e["id"]]["color"] == e["color"] and now[e["id"]]["title"] == e["title"]
    assert s.page.locator("#gv-threshold-value").text_content() == "1.00e-7"
    assert s.page.locator("#gv-notices").is_hidden()
    assert "ResidualMLP" in s.page.locator("#gv-meta").text_content()


def test_threshold_slider_recolours_exactly(serve, open_page, residual_file: Path) -> None:
    run = store.load(residual_file)
    latest = {e["id"]: e["gradient_norm"] for e in run.edges}
    s = open_page(serve(residual_file))
    seen = set()
    for log_t in ("-2", "-2.5", "-1.3", "-3.2", "-0.8"):
        s.page.locator("#gv-threshold").fill(log_t)
        t = s.js("gradviz.state.threshold")
        assert t == pytest.approx(10 ** float(log_t))
        colours = edge_colours(s)
        assert colours == {eid: expected_colour(x, t) for eid, x in latest.items()}
        seen.add(tuple(sorted(colours.items())))
        label = s.page.locator("#gv-threshold-value").text_content()
        assert label == render.fmt(t)
    assert len(seen) >= 3  # the thresholds above really split the edges differently


def test_step_slider_changes_sizes(serve, open_page, residual_file: Path) -> None:
    run = store.load(residual_file)
    g = build_graph(run)
    node_scale, _ = render.scales(g)
    s = open_page(serve(residual_file, THRESHOLD=0.01))
    before = node_sizes(s)
    s.page.locator("#gv-step").fill("0")
    wait(s, f"gradviz.state.shownStep === {run.steps[0]}")
    after = node_sizes(s)
    changed = [n for n in before if before[n] != pytest.approx(after[n], abs=1e-6)]
    assert len(changed) >= 5
    for nid, d in g.nodes(data=True):  # sizes are those of step 0, not just different
        grad, act = run.node_history(nid)[0], run.node_history(nid, "activation_grad_norm")[0]
        attrs = {**d, "gradient_norm": grad, "status": node_status(d["has_params"], grad, act)}
        want = render.node_style(attrs, node_scale)["size"]
        assert after[nid] == pytest.approx(want, abs=1e-3), nid
    assert s.page.locator("#gv-step-value").text_content().startswith("0 (1/30)")
    colours = edge_colours(s)
    for e in run.edges:
        assert colours[e["id"]] == expected_colour(run.edge_history(e["id"])[0], 0.01)


def test_details_search_findings_tooltip(serve, open_page, residual_file: Path) -> None:
    s = open_page(serve(residual_file))
    click_node(s, "blocks.1.fc2")
    wait(s, "gradviz.state.layers['blocks.1.fc2'] !== undefined")
    assert s.page.locator("#gv-details-title").text_content() == "blocks.1.fc2"
    assert "Linear · layer · 16,512 parameters" in s.page.locator("#gv-details-sub").text_content()
    table = s.page.locator("#gv-details-table").text_content()
    assert "weight [128×128]" in table and "bias [128]" in table and "…" not in table
    assert "dead ReLU units" in table and "%" in table  # forward statistics, when recorded
    inked = s.js(
        """() => { const c = document.getElementById('gv-layer-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""
    )
    assert inked > 200  # the chart drew something
    s.page.locator("#gv-search").fill("blocks.3.FC2")
    s.page.locator("#gv-search").press("Enter")
    assert s.js("gradviz.state.selected") == "blocks.3.fc2"
    s.page.locator("#gv-search").fill("no-such-layer")
    s.page.locator("#gv-search").press("Enter")
    assert "no layer matches" in s.page.locator("#gv-search-status").text_content()
    s.page.locator("#gv-findings > li").first.click()
    assert s.js("gradviz.state.selected") == "blocks.0.fc1"
    tip = hover_tooltip(s, "head")
    assert "head" in tip.text_content() and "gradient norm" in tip.text_content()


def test_clicking_an_edge_shows_its_details(serve, open_page, residual_file: Path) -> None:
    """A click on an edge only highlighted it: the panel kept the layer shown before, or
    stayed hidden. It shows the edge's gradient at the shown step, beside its ends'."""
    run = store.load(residual_file)
    s = open_page(serve(residual_file, THRESHOLD=0.01))
    click_node(s, "head")
    wait(s, "gradviz.state.selected === 'head'")
    s.js("gradviz.network.fit({animation: false})")
    # a straight edge (no bend), clicked half way along, as a hand would
    name, a, b = s.js("""() => { const e = gradviz.edges.get().find(e => !e.smooth);
        return [e.name, gradviz.nameOf(e.from), gradviz.nameOf(e.to)]; }""")
    (x1, y1), (x2, y2) = node_xy(s, a), node_xy(s, b)
    s.page.mouse.click((x1 + x2) / 2, (y1 + y2) / 2)
    wait(s, f"gradviz.state.selectedEdge === {name!r}")
    assert s.page.locator("#gv-details-title").text_content() == f"{a} → {b}"
    assert s.page.locator("#gv-details-sub").text_content().startswith("edge")
    table = s.page.locator("#gv-details-table").text_content()
    x = run.edge_history(name)[-1]
    side = "(above threshold)" if x > 0.01 else "(at or below threshold)"
    assert f"gradient norm{render.fmt(x)} {side}" in table, table
    assert f"output gradient of {a}" in table and f"output gradient of {b}" in table
    assert s.page.locator("#gv-layer-chart").is_hidden()
    click_node(s, "head")  # and back to a layer
    wait(s, "gradviz.state.selected === 'head' && gradviz.state.selectedEdge === null")
    assert s.page.locator("#gv-details-title").text_content() == "head"
    assert s.page.locator("#gv-layer-chart").is_visible()


def test_findings_name_their_kind_and_shorten_long_layer_lists(
        serve, open_page, residual_file: Path, tmp_path: Path) -> None:
    """The panel showed "CRITICAL gradient norm 4e-18 ..." without the word "vanishing",
    and an 88-layer finding listed every name, pushing the charts off screen."""
    doc = orjson.loads(residual_file.read_bytes())
    ids = [n["id"] for n in doc["nodes"] if n["kind"] == "layer"]
    assert len(ids) > 8
    doc["findings"][0]["layers"] = ids
    path = tmp_path / "many.json"
    path.write_bytes(orjson.dumps(doc))
    s = open_page(serve(path))
    first = s.page.locator("#gv-findings > li").first
    assert first.locator(".gv-kind").text_content() == "vanishing"
    text = first.text_content()
    assert f"layers: {', '.join(ids[:6])} and {len(ids) - 6} more" in text, text
    assert ids[-1] not in text
    first.click()  # (still selects the first layer named)
    assert s.js("gradviz.state.selected") == ids[0]


def test_nonfinite_and_absent_styles(serve, open_page, nonfinite_file: Path) -> None:
    s = open_page(serve(nonfinite_file))
    colours = edge_colours(s)
    assert colours["e1"] == render.PALETTE["absent"]
    assert colours["e3"] == colours["e4"] == render.PALETTE["nonfinite"]
    fills = dict(s.js("gradviz.nodes.get().map(n => [n.name, n.color.background])"))
    assert fills["fc_nan"] == fills["fc_inf"] == render.PALETTE["nonfinite"]
    assert fills["embed"] == render.PALETTE["absent_fill"]
    assert s.js("gradviz.nodes.get(gradviz.visId('cat#1')).shape") == "diamond"


def test_minimal_and_edgeless_files_say_so(serve, open_page, make_file) -> None:
    s = open_page(serve(make_file("minimal")))
    assert s.js("gradviz.nodes.length") == 3 and s.js("gradviz.edges.length") == 2
    assert "original minimal format" in s.page.locator("#gv-notices").text_content()
    assert s.page.locator("#gv-step-control").is_hidden()
    s = open_page(serve(make_file("no_edges")))
    assert "no edges" in s.page.locator("#gv-notices").text_content()
    s = open_page(serve(make_file("no_history")))
    assert "no recorded steps" in s.page.locator("#gv-notices").text_content()


def test_data_never_runs(serve, open_page, evil_file: Path) -> None:
    from conftest import EVIL_NAMES

    s = open_page(serve(evil_file))
    assert sorted(s.js("gradviz.nodes.get().map(n => n.name)")) == sorted(EVIL_NAMES)
    assert s.js("document.querySelectorAll('img, svg, b, i, iframe').length") == 0
    assert s.js("document.scripts.length") == 6  # four JSON blocks and our two scripts
    for name in EVIL_NAMES:
        s.page.locator("#gv-search").fill(name)
        s.page.locator("#gv-search").press("Enter")
        assert s.page.locator("#gv-details-title").text_content() == name
        if name == "{{ 7*7 }}":
            assert "<b>Bold</b>" in s.page.locator("#gv-details-sub").text_content()
    wait(s, "gradviz.state.layers['__proto__'] && gradviz.state.layers['__proto__'].params")
    assert "__proto__ [4]" in s.page.locator("#gv-details-table").text_content()
    assert "<b>Bold</b>" not in s.page.locator("#gv-details-sub").text_content()
    meta = s.page.locator("#gv-meta").text_content()
    assert "<script>alert(4)</script>" in meta and "{{ config }}" in meta
    findings = s.page.locator("#gv-findings").text_content()
    assert "<img src=y onerror=alert(5)>" in findings and "{{ 7*7 }}" in findings
    tip = hover_tooltip(s, EVIL_NAMES[0])
    assert EVIL_NAMES[0] in tip.text_content()
    assert s.js("document.querySelectorAll('div.vis-tooltip *:not(br)').length") == 0
    s.page.wait_for_timeout(300)  # give any injected handler a chance to fire
    assert s.dialogs == []


def test_export_works_offline(open_page, residual_file: Path, tmp_path: Path) -> None:
    run = store.load(residual_file)
    out = tmp_path / "graph.html"
    out.write_text(export_html(residual_file), encoding="utf-8")
    s = open_page(out.as_uri(), offline=True)
    assert s.js("gradviz.state.mode") == "export"
    assert s.js("gradviz.nodes.length") == len(run.nodes)
    assert s.js("gradviz.edges.length") == len(run.edges)
    before = node_sizes(s)
    s.page.locator("#gv-step").fill("0")
    wait(s, f"gradviz.state.shownStep === {run.steps[0]}")
    assert node_sizes(s) != before
    s.page.locator("#gv-threshold").fill("-3")
    t = s.js("gradviz.state.threshold")
    colours = edge_colours(s)
    assert colours == {e["id"]: expected_colour(run.edge_history(e["id"])[0], t) for e in run.edges}
    click_node(s, "blocks.2.fc1")
    wait(s, "gradviz.state.layers['blocks.2.fc1'] !== undefined")
    table = s.page.locator("#gv-details-table").text_content()
    want = render.fmt(run.param_history("blocks.2.fc1", "weight")[0])
    assert want in table and "…" not in table
    dead = run.node_history("blocks.2.fc1", "dead_frac")[0]
    assert f"{100 * dead:.1f} %" in table


def test_a_rolled_up_export_does_not_offer_a_double_click(
        serve, open_page, make_file, tmp_path: Path) -> None:
    """An exported page shows one roll-up: its groups' tooltips and the legend said
    "double-click to expand", and a double-click did nothing. They say how to expand."""
    path = make_file("transformer")
    out = tmp_path / "rolled.html"
    out.write_text(export_html(path, depth=2), encoding="utf-8")
    s = open_page(out.as_uri(), offline=True)
    title = s.js("gradviz.nodes.get(gradviz.visId('blocks.1')).title")
    assert "double-click" not in title and "serve the run with visualize.py" in title
    legend = s.page.locator("#gv-legend-expand").text_content()
    assert "double-click" not in legend and "visualize.py" in legend
    s.page.locator("#gv-step").fill("0")  # (titles redrawn for a step say the same)
    wait(s, "gradviz.state.shownStep === 0")
    assert "double-click" not in s.js("gradviz.nodes.get(gradviz.visId('blocks.1')).title")
    served = open_page(serve(path, DEPTH=2))  # (where double-click works, they say so)
    assert "double-click to expand" in served.js(
        "gradviz.nodes.get(gradviz.visId('blocks.1')).title")
    assert served.page.locator("#gv-legend-expand").text_content() == "double-click to expand"
    whole = open_page(serve(path))  # (every layer drawn: no group to explain)
    assert whole.page.locator("#gv-legend-expand").is_hidden()


def test_live_updates_without_reload(serve, open_page, make_file) -> None:
    path = make_file("residual", name="live.json")
    s = open_page(serve(path))
    s.js("window.__sameDocument = true")

    def replace(**options: Any) -> None:
        new = make_file("residual", name="next.json", **options)
        mtime = path.stat().st_mtime_ns
        os.replace(new, path)  # as the recorder does: temp file, then rename
        os.utime(path, ns=(mtime + 10**6, mtime + 10**6))

    replace(n_steps=33)
    wait(s, "gradviz.state.run.steps.length === 33")
    assert s.js("gradviz.state.shownStep") == 320  # it was at the last step: it follows
    assert s.page.locator("#gv-step").get_attribute("max") == "32"
    replace(n_steps=34, n_blocks=7)  # new layers appear: the graph is rebuilt
    wait(s, "gradviz.nodes.length === 23")
    assert s.js("gradviz.edges.length") == 29
    path.write_bytes(b'{"nodes": [')  # a broken write: the last good version stays
    wait(s, "document.getElementById('gv-live').textContent.includes('last good')")
    assert s.js("gradviz.nodes.length") == 23
    assert s.js("window.__sameDocument") is True  # never reloaded


def test_a_new_run_brings_its_own_threshold_unless_the_slider_moved(
        serve, open_page, make_file) -> None:
    """The file replaced by a run with its own vanishing threshold (meta.vanish_below): an
    open page kept the first one. It takes the new one, unless the user moved the slider."""
    path = make_file("residual", name="live.json")
    s = open_page(serve(path))
    assert s.js("gradviz.state.threshold") == 1e-7

    def replace(own: float) -> None:
        doc = orjson.loads(make_file("residual", name="next.json").read_bytes())
        doc["meta"]["vanish_below"] = own
        mtime = path.stat().st_mtime_ns
        path.write_bytes(orjson.dumps(doc))
        os.utime(path, ns=(mtime + 10**6, mtime + 10**6))

    replace(0.5)
    wait(s, "gradviz.state.threshold === 0.5")
    assert s.page.locator("#gv-threshold-value").text_content() == "0.5"
    run = store.load(path)
    assert edge_colours(s) == {e["id"]: expected_colour(run.edge_history(e["id"])[-1], 0.5)
                               for e in run.edges}
    s.page.locator("#gv-threshold").fill("-3")  # the user's choice from now on
    replace(0.25)
    wait(s, "gradviz.state.revision === 3")
    assert s.js("gradviz.state.threshold") == pytest.approx(1e-3)


def test_big_graph_draws_fast(serve, open_page, big_file: Path) -> None:
    run = store.load(big_file)
    url = serve(big_file, DEPTH="full")
    t = time.perf_counter()
    s = open_page(url)
    elapsed = time.perf_counter() - t
    assert s.js("gradviz.nodes.length") == len(run.nodes) > 1000
    assert s.js("gradviz.edges.length") == len(run.edges)
    assert elapsed < 20  # a few seconds at most; physics on would take minutes
    latest = {e["id"]: e["gradient_norm"] for e in run.edges}
    for log_t in ("-1", "-3", "-1.5"):  # hundreds of edges change: the direct path
        s.page.locator("#gv-threshold").fill(log_t)
        t = s.js("gradviz.state.threshold")
        assert edge_colours(s) == {eid: expected_colour(x, t) for eid, x in latest.items()}
        drawn = s.js("""() => gradviz.edges.get().map(e => [e.name,
            gradviz.network.body.edges[e.id].options.color.color,
            gradviz.network.body.edges[e.id].title === e.title])""")
        assert {name: c for name, c, _ in drawn} == edge_colours(s)  # what vis-network draws
        assert all(same for _, _, same in drawn)
    assert len(set(edge_colours(s).values())) == 2


def test_screenshot(serve, open_page, make_file) -> None:
    """The README's picture: a residual net with a finding, one layer selected."""
    path = make_file("residual", name="training_output.json", n_blocks=5, n_steps=40)
    s = open_page(serve(path), width=1500, height=860)
    click_node(s, "blocks.1.fc2")
    wait(s, "gradviz.state.layers['blocks.1.fc2'] !== undefined")
    s.page.mouse.move(5, 300)
    s.page.wait_for_timeout(200)
    out = ROOT / "docs" / "screenshot.png"
    out.parent.mkdir(exist_ok=True)
    s.page.screenshot(path=str(out))
    assert out.stat().st_size > 20000


def test_groups_expand_and_collapse(serve, open_page, make_file) -> None:
    from gradviz.graph import rollup, series

    path = make_file("transformer")
    run = store.load(path)
    s = open_page(serve(path, DEPTH=2, THRESHOLD=0.01))

    def names() -> set[str]:
        return set(s.js("gradviz.nodes.get().map(n => n.name)"))

    assert "blocks.1" in names() and "blocks.1.ln1" not in names()
    assert s.js("gradviz.nodes.get(gradviz.visId('blocks.1')).shape") == "square"
    assert "Rolled up by module name to depth 2" in s.page.locator("#gv-notices").text_content()
    assert s.page.locator("#gv-depth").input_value() == "2"
    s.js("gradviz.network.fit({animation: false})")
    s.page.mouse.dblclick(*node_xy(s, "blocks.1"))
    wait(s, "gradviz.nodes.get().some(n => n.name === 'blocks.1.attn')")
    assert {"blocks.1.ln1", "blocks.1.attn", "blocks.1.mlp", "blocks.0", "blocks.2"} <= names()
    assert "blocks.1" not in names()
    assert s.js("gradviz.state.view.expanded") == ["blocks.1"]
    # the step slider in the expanded view: values come from that view, groups combined
    g = rollup(build_graph(run), run, 2, ["blocks.1"])
    s.page.locator("#gv-step").fill("0")
    wait(s, "gradviz.state.shownStep === 0")
    want = {d["id"]: series(run, g, ("edge", d["id"]))[0] for _, _, d in g.edges(data=True)}
    assert edge_colours(s) == {e: expected_colour(float(x), 0.01) for e, x in want.items()}
    title = s.js("gradviz.nodes.get(gradviz.visId('blocks.0')).title")  # redrawn for step 0
    assert "\nstep 0\n" in title and title.endswith("double-click to expand")
    # a part of an expanded group offers to collapse it; a subgroup, to expand
    s.js("gradviz.select('blocks.1.attn', true)")
    wait(s, "gradviz.state.layers['blocks.1.attn'] !== undefined")
    buttons = s.page.locator("#gv-details-actions button")
    assert buttons.all_text_contents() == ["expand", "collapse blocks.1"]
    table = s.page.locator("#gv-details-sub").text_content()
    assert "2 layers, 1 junction · group" in table
    buttons.nth(1).click()
    wait(s, "gradviz.nodes.get().some(n => n.name === 'blocks.1')")
    assert "blocks.1.attn" not in names() and s.js("gradviz.state.selected") == "blocks.1"
    assert s.js("gradviz.state.shownStep") == 0  # the step stays where it was
    # searching for a layer inside a group expands what it takes to show it
    s.page.locator("#gv-search").fill("blocks.3.attn.qkv")
    s.page.locator("#gv-search").press("Enter")
    wait(s, "gradviz.state.selected === 'blocks.3.attn.qkv'")
    assert {"blocks.3.attn.qkv", "blocks.3.ln1", "blocks.1"} <= names()
    assert s.js("gradviz.state.view.expanded") == ["blocks.3", "blocks.3.attn"]
    s.page.locator("#gv-depth").select_option("full")
    wait(s, f"gradviz.nodes.length === {len(run.nodes)}")
    assert s.page.locator("#gv-notices").is_hidden()


def test_a_failed_view_change_keeps_the_view_drawn(serve, open_page, make_file) -> None:
    from gradviz.graph import rollup, series

    path = make_file("transformer")
    run = store.load(path)
    s = open_page(serve(path, DEPTH=2, THRESHOLD=0.01))
    drawn = set(s.js("gradviz.nodes.get().map(n => n.name)"))
    s.page.route("**/api/graph*", lambda r: r.fulfill(
        status=500, content_type="application/json", body='{"error": "server down"}'))
    s.page.locator("#gv-depth").select_option("1")
    wait(s, "document.getElementById('gv-live').textContent.includes('server down')")
    s.errors[:] = [e for e in s.errors if "status of 500" not in e]  # (the one we made)
    assert s.js("gradviz.state.view.depth") == 2
    assert s.page.locator("#gv-depth").input_value() == "2"
    assert set(s.js("gradviz.nodes.get().map(n => n.name)")) == drawn
    # steps asked for afterwards are the drawn view's, and painted right
    s.page.locator("#gv-step").fill("0")
    wait(s, "gradviz.state.shownStep === 0")
    g = rollup(build_graph(run), run, 2)
    want = {d["id"]: series(run, g, ("edge", d["id"]))[0] for _, _, d in g.edges(data=True)}
    assert edge_colours(s) == {e: expected_colour(float(x), 0.01) for e, x in want.items()}


def test_a_late_step_answer_is_not_drawn_on_a_newer_view(serve, open_page, make_file) -> None:
    path = make_file("transformer")
    s = open_page(serve(path, step_delay=1.5, DEPTH=2))
    last = len(store.load(path).steps) - 1
    s.js(f"gradviz.showStep({last})")  # follows the last step; its answer is 1.5 s away
    s.page.locator("#gv-depth").select_option("full")
    wait(s, "gradviz.state.view.depth === null")
    n = s.js("gradviz.nodes.length")
    time.sleep(2.5)  # the late answer, for depth 2, has come and must have been dropped
    assert s.js("gradviz.state.shown.gradient_norm.length") == n
    assert s.js("gradviz.state.view.depth") is None


def test_overlapping_view_changes_settle(serve, open_page, make_file) -> None:
    # Enter in the search box fires both "submit" and "change": two searches expand the
    # same groups at once. A view request overtaken by a later one waits for it; dropping
    # it outright made the two searches undo each other until they gave up.
    s = open_page(serve(make_file("transformer"), graph_delay=0.3, DEPTH=2))
    s.page.locator("#gv-search").fill("blocks.3.attn.qkv")
    s.page.locator("#gv-search").press("Enter")
    wait(s, "gradviz.state.selected === 'blocks.3.attn.qkv'")
    assert s.js("gradviz.state.view.expanded") == ["blocks.3", "blocks.3.attn"]
    # the contract that makes it so: an overtaken change is done when the later one is
    seen = s.js("""async () => {
        const first = gradviz.setView(2, ["blocks.1"]);
        const second = gradviz.setView(2, ["blocks.1", "blocks.2"]);
        await first;
        const atFirst = gradviz.state.view.expanded.slice();
        await second;
        return atFirst;
    }""")
    assert seen == ["blocks.1", "blocks.2"]
    # a change made while another is on its way builds on it, not on the view drawn
    s.js("""async () => {
        await gradviz.setView(2, []);
        const first = gradviz.expand("blocks.0");
        await gradviz.expand("blocks.2");
        await first;
    }""")
    assert s.js("gradviz.state.view.expanded") == ["blocks.0", "blocks.2"]
    names = set(s.js("gradviz.nodes.get().map(n => n.name)"))
    assert {"blocks.0.attn", "blocks.2.attn", "blocks.1"} <= names and "blocks.0" not in names

"""The Flask app through its test client: pages, JSON endpoints, errors, live re-reading."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from gradviz import store
from gradviz.errors import FileFormatError, GradvizError
from gradviz.graph import build_graph, rollup
from gradviz.web import CSP, create_app, export_html


def client_for(path: Path, **config: object) -> FlaskClient:
    return create_app({"INPUT": path, **config}).test_client()


@pytest.fixture
def app(residual_file: Path) -> Flask:
    return create_app({"INPUT": residual_file})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_page_and_headers(client: FlaskClient, app: Flask) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    assert r.headers["Content-Security-Policy"] == CSP
    assert "script-src 'self';" in CSP and "unsafe" not in CSP and "http" not in CSP
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert b"residual.json" in r.data
    assert app.debug is False


@pytest.mark.parametrize(
    ("name", "mimetype"),
    [
        ("vis-network.min.js", "text/javascript"),
        ("gradviz.js", "text/javascript"),
        ("gradviz.css", "text/css"),
    ],
)
def test_assets(client: FlaskClient, name: str, mimetype: str) -> None:
    r = client.get(f"/assets/{name}")
    assert r.status_code == 200 and r.mimetype == mimetype and len(r.data) > 1000
    assert b"sourceMappingURL" not in r.data  # no request for a .map the server lacks


@pytest.mark.parametrize("name", ["page.html", "..%2Fgradviz%2Fweb.py", "nope.js"])
def test_unknown_assets_are_404_json(client: FlaskClient, name: str) -> None:
    r = client.get(f"/assets/{name}")
    assert r.status_code == 404 and "error" in r.get_json()


@pytest.mark.parametrize(("own", "given", "want"), [
    (1e-4, None, 1e-4),  # the run's own --vanish-below
    (1e-4, 0.02, 0.02),  # --threshold wins
    (None, None, 1e-7),  # a file without it (gradviz.record alone)
    ("x", None, 1e-7), (-1, None, 1e-7), (True, None, 1e-7),  # odd values: the default
])
def test_the_threshold_follows_the_runs_own_vanishing_threshold(
        residual_file: Path, tmp_path: Path, own: object, given: float | None,
        want: float) -> None:
    """extract.py --vanish-below 1e-4 diagnosed with 1e-4 and the page painted at 1e-7."""
    doc = orjson.loads(residual_file.read_bytes())
    if own is not None:
        doc["meta"]["vanish_below"] = own
    path = tmp_path / "run.json"
    path.write_bytes(orjson.dumps(doc))
    assert client_for(path, THRESHOLD=given).get("/api/graph").get_json()["threshold"] == want
    page = export_html(path, given)  # (an exported page too)
    data = page.split('id="gv-data">', 1)[1].split("</script>", 1)[0]
    assert orjson.loads(data)["threshold"] == want


def test_graph_endpoint(client: FlaskClient, residual_file: Path) -> None:
    doc = orjson.loads(residual_file.read_bytes())
    p = client.get("/api/graph").get_json()
    assert len(p["nodes"]) == len(doc["nodes"]) and len(p["edges"]) == len(doc["edges"])
    assert p["run"]["steps"] == doc["history"]["steps"]
    assert p["threshold"] == 1e-7


def test_step_endpoint(client: FlaskClient, residual_file: Path) -> None:
    run = store.load(residual_file)
    r = client.get("/api/step?step=20")
    assert r.status_code == 200
    p = r.get_json()
    assert p["step"] == 20 and p["index"] == 2 and p["revision"] == 1
    assert p["loss"] == pytest.approx(run.loss[2])
    assert p["gradient_norm"][0] == pytest.approx(run.node_history("stem")[2])


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("", "missing ?step=N"),
        ("?step=", "must be an integer"),
        ("?step=abc", "must be an integer, got 'abc'"),
        ("?step=1.5", "must be an integer"),
        ("?step=11", "step 11 was not recorded"),
        ("?step=-10", "was not recorded"),
        ("?step=99999999999999999999999", "must be an integer"),
        ("?step=%3Cscript%3E", "must be an integer"),
    ],
)
def test_bad_step_is_400_json(client: FlaskClient, query: str, words: str) -> None:
    r = client.get("/api/step" + query)
    assert r.status_code == 400 and r.mimetype == "application/json"
    body = r.get_json()
    assert words in body["error"] and "0 to 290" in body["error"]


def test_step_without_history(make_file: Callable[..., Path]) -> None:
    c = client_for(make_file("minimal"))
    r = c.get("/api/step?step=0")
    assert r.status_code == 400 and "no recorded steps" in r.get_json()["error"]
    assert c.get("/").status_code == 200


def test_layer_endpoint(client: FlaskClient, residual_file: Path) -> None:
    run = store.load(residual_file)
    p = client.get("/api/layer?id=blocks.2.fc1").get_json()
    assert p["steps"] == run.steps
    assert p["gradient_norm"] == pytest.approx(run.node_history("blocks.2.fc1"))
    assert set(p["params"]) == {"weight", "bias"}
    assert client.get("/api/layer").status_code == 400
    r = client.get("/api/layer?id=nope")
    assert r.status_code == 404 and "no layer with id 'nope'" in r.get_json()["error"]


def test_layer_ids_with_odd_characters(evil_file: Path) -> None:
    c = client_for(evil_file)
    r = c.get("/api/layer", query_string={"id": "<img src=x onerror=alert(1)>"})
    assert r.status_code == 200 and r.get_json()["id"] == "<img src=x onerror=alert(1)>"


def test_hostile_numbers_are_served(tmp_path: Path) -> None:
    # Whole numbers past 64 bits (orjson reads 1e300 as a float) made writing the page's
    # JSON raise, and two norms near 1e154 made the roll-up's sum of squares overflow.
    one = "AACAPwAAgD8="  # float32 [1, 1]

    def layer(nid: str, order: object, count: object, norm: float) -> dict:
        return {"id": nid, "kind": "layer", "type": "Linear", "order": order,
                "gradient_norm": norm, "activation_grad_norm": 1.0, "param_count": count,
                "params": {"weight": {"shape": [1e300, 2], "numel": 4, "trainable": True,
                                      "gradient_norm": 1.0}}}
    big = 3 * 2**51  # a safe whole number; two of them are not
    nodes = [layer("blk.a", 1e300, big, 1.3e154), layer("blk.b", 1, 1e300, 1.3e154),
             layer("head", 2, 4, 2.0)]
    edges = [{"id": f"{s}->{t}", "source": s, "target": t, "gradient_norm": 1.0, "via": []}
             for s, t in (("blk.a", "blk.b"), ("blk.b", "head"))]
    series = {"gradient_norm": one, "activation_grad_norm": one, "params": {"weight": one}}
    doc = {"format": "gradviz", "version": 1, "meta": {}, "nodes": nodes, "edges": edges,
           "findings": [{"kind": "k", "severity": "warning", "layers": ["head"],
                         "steps": [1e300, 1], "message": "m"}],
           "history": {"encoding": "float32-le-base64", "steps": [0, 1], "loss": one,
                       "nodes": {n["id"]: series for n in nodes},
                       "edges": {e["id"]: {"gradient_norm": one} for e in edges}}}
    path = tmp_path / "hostile.json"
    path.write_bytes(orjson.dumps(doc))
    c = client_for(path)
    for depth in ("full", "1"):
        assert c.get(f"/?depth={depth}").status_code == 200
        g = c.get(f"/api/graph?depth={depth}")
        assert g.status_code == 200, g.get_json()
        assert c.get(f"/api/step?step=1&depth={depth}").status_code == 200
        assert c.get(f"/api/layer?id=head&depth={depth}").status_code == 200
    run = store.load(path)
    g = build_graph(run)
    a, b = g.nodes["blk.a"], g.nodes["blk.b"]
    assert a["order"] is None and a["param_count"] == big and a["params"]["weight"]["shape"] is None
    assert b["param_count"] == 4  # 1e300 is no count: the sum of its parameters' numel
    blk = rollup(g, run, 1).nodes["blk"]
    assert blk["gradient_norm"] == pytest.approx(1.3e154 * 2**0.5)
    assert blk["param_count"] == big + 4
    g.nodes["blk.b"]["param_count"] = big
    assert rollup(g, run, 1).nodes["blk"]["param_count"] is None  # past 2**53
    assert export_html(path, depth=1).startswith("<!doctype html>")


def test_unknown_route_and_method(client: FlaskClient) -> None:
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.get_json()["status"] == 404
    r = client.post("/api/step?step=0")
    assert r.status_code == 405 and "error" in r.get_json()


def test_every_fixture_serves(make_file: Callable[..., Path]) -> None:
    for kind in ("chain", "nonfinite", "evil", "minimal", "no_edges", "no_history"):
        c = client_for(make_file(kind))
        assert c.get("/").status_code == 200, kind
        p = c.get("/api/graph").get_json()
        if p["run"]["steps"]:
            assert c.get(f"/api/step?step={p['run']['steps'][0]}").status_code == 200


def test_bad_config(residual_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="does not exist"):
        create_app({"INPUT": tmp_path / "missing.json"})
    with pytest.raises(GradvizError, match="threshold must be a number >= 0, got -1"):
        create_app({"INPUT": residual_file, "THRESHOLD": -1})
    with pytest.raises(GradvizError, match="threshold"):
        create_app({"INPUT": residual_file, "THRESHOLD": "nan"})


def test_unexpected_shapes_become_file_format_errors(tmp_path: Path) -> None:
    p = tmp_path / "odd.json"
    p.write_bytes(orjson.dumps({"nodes": [{"id": "a", "gradient_norm": 1, "params": 5}]}))
    with pytest.raises(FileFormatError, match="odd.json"):
        create_app({"INPUT": p})


# -- live --------------------------------------------------------------------------------


def rewrite(make_file: Callable[..., Path], target: Path, **options: object) -> None:
    """Replace target atomically with a new recording, as the recorder does."""
    new = make_file("residual", name="next.json", **options)
    st = target.stat()
    os.replace(new, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks


def test_live_picks_up_new_steps(
    client: FlaskClient, residual_file: Path, make_file: Callable[..., Path]
) -> None:
    first = client.get("/api/poll").get_json()
    assert first == {"revision": 1, "steps": 30, "last_step": 290, "error": None}
    rewrite(make_file, residual_file, n_steps=35)
    p = client.get("/api/poll").get_json()
    assert p["revision"] == 2 and p["steps"] == 35 and p["error"] is None
    assert len(client.get("/api/graph").get_json()["run"]["steps"]) == 35
    assert client.get("/api/step?step=340").status_code == 200
    assert client.get("/api/poll").get_json()["revision"] == 2  # unchanged file: no re-read


def test_broken_rewrite_keeps_last_good(
    client: FlaskClient, residual_file: Path, make_file: Callable[..., Path]
) -> None:
    good = residual_file.read_bytes()
    residual_file.write_bytes(good[: len(good) // 2])  # a writer that is not atomic
    p = client.get("/api/poll").get_json()
    assert p["revision"] == 1 and "ends in the middle of its JSON" in p["error"]
    assert client.get("/").status_code == 200
    assert len(client.get("/api/graph").get_json()["run"]["steps"]) == 30
    assert client.get("/api/step?step=290").status_code == 200
    residual_file.unlink()
    p = client.get("/api/poll").get_json()
    assert p["revision"] == 1 and "gone" in p["error"]
    rewrite_target = make_file("residual", name="again.json", n_steps=31)
    os.replace(rewrite_target, residual_file)
    p = client.get("/api/poll").get_json()
    assert p == {"revision": 2, "steps": 31, "last_step": 300, "error": None}


def test_a_version_that_does_not_build_keeps_last_good(
    client: FlaskClient, residual_file: Path, make_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # an error other than a file's (a bug in building the view) was a 500 on every request,
    # retried on each one: the last good version is kept and the error shown, as for a file's
    import gradviz.web

    def broken(run: store.Run) -> None:
        raise TypeError("no good")

    monkeypatch.setattr(gradviz.web, "build_graph", broken)
    rewrite(make_file, residual_file, n_steps=35)
    p = client.get("/api/poll").get_json()
    assert p["revision"] == 1 and p["steps"] == 30
    assert "cannot be shown (TypeError: no good)" in p["error"]
    assert client.get("/").status_code == 200
    assert len(client.get("/api/graph").get_json()["run"]["steps"]) == 30
    monkeypatch.undo()
    rewrite(make_file, residual_file, n_steps=36)
    assert client.get("/api/poll").get_json() == {
        "revision": 2, "steps": 36, "last_step": 350, "error": None}


def test_a_file_name_that_is_not_utf8(residual_file: Path) -> None:
    # the name reached the page's JSON as a lone surrogate, which orjson cannot write: 500
    odd = residual_file.with_name(os.fsdecode(b"run-\xff.json"))
    os.replace(residual_file, odd)
    c = client_for(odd)
    page = c.get("/")
    assert page.status_code == 200 and "run-\ufffd.json" in page.get_data(as_text=True)
    assert c.get("/api/graph").get_json()["run"]["source"] == "run-\ufffd.json"
    assert "<title>gradviz · run-\ufffd.json</title>" in export_html(odd)
    odd.write_bytes(b"{broken")  # the error names the file: no 500 either
    os.utime(odd, ns=(odd.stat().st_atime_ns, odd.stat().st_mtime_ns + 1_000_000))
    poll = c.get("/api/poll")
    assert poll.status_code == 200 and "not valid JSON" in poll.get_json()["error"]
    assert "run-\ufffd" in poll.get_json()["error"]


def test_metadata_nested_too_deep_for_repr(residual_file: Path) -> None:
    data = orjson.dumps(orjson.loads(residual_file.read_bytes()))  # (compact: "meta":{)
    deep = b"[" * 1000 + b"]" * 1000
    residual_file.write_bytes(data.replace(b'"meta":{', b'"meta":{"deep":' + deep + b",", 1))
    meta = dict(client_for(residual_file).get("/api/graph").get_json()["run"]["meta"])
    assert meta["deep"] == "(list nested too deep to show)"
    assert "(list nested too deep to show)" in export_html(residual_file)


def test_not_live_never_rereads(residual_file: Path, make_file: Callable[..., Path]) -> None:
    c = client_for(residual_file, LIVE=False)
    rewrite(make_file, residual_file, n_steps=35)
    assert c.get("/api/poll").get_json()["steps"] == 30


def test_concurrent_requests_during_rewrites(
    app: Flask, residual_file: Path, make_file: Callable[..., Path]
) -> None:
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        c = app.test_client()
        while not stop.is_set():
            statuses.append(c.get("/api/poll").status_code)
            statuses.append(c.get("/api/graph").status_code)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for n in range(31, 37):
            rewrite(make_file, residual_file, n_steps=n)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}
    assert app.test_client().get("/api/poll").get_json()["steps"] == 36


def test_export_html(residual_file: Path) -> None:
    html = export_html(residual_file, 0.05)
    assert 'http-equiv="Content-Security-Policy"' in html
    assert '"mode":"export"' in html and '"threshold":0.05' in html
    with pytest.raises(GradvizError):
        export_html(residual_file, -1)


def test_missing_templates_fail_early(
    residual_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradviz import render

    monkeypatch.setattr(render, "TEMPLATES", tmp_path / "nowhere")
    monkeypatch.setattr(render, "_ENV", None)
    with pytest.raises(GradvizError, match="page.html is missing"):
        create_app({"INPUT": residual_file})


# -- what the page gets at load, and views ----------------------------------------------


def test_page_never_gets_the_whole_history(make_file: Callable[..., Path]) -> None:
    """Per-step and per-layer data are fetched on demand: the page and /api/graph grow by
    the loss curve (a number and a step per step), not by steps x layers."""
    sizes = {}
    for n_steps in (10, 1010):
        c = client_for(make_file("residual", name=f"r{n_steps}.json", n_steps=n_steps))
        page, graph = c.get("/").data, c.get("/api/graph").data
        assert b'"history"' not in page and b"float32-le-base64" not in page
        assert "history" not in orjson.loads(graph)
        sizes[n_steps] = (len(page), len(graph))
    for i in (0, 1):
        grown = sizes[1010][i] - sizes[10][i]
        assert grown < 1000 * 45, grown  # the loss and the step numbers: about 40 bytes a step
    # the history itself would be 4 bytes (as float32) a value, for 100+ series
    c = client_for(make_file("residual", name="r.json", n_steps=1010))
    assert len(list(c.application.extensions["gradviz"].current().run.keys())) > 100
    assert len(c.get("/api/layer?id=blocks.0.fc1").get_json()["gradient_norm"]) == 1010
    assert c.get("/api/step?step=50").status_code == 200


def test_views_by_depth_and_expand(make_file: Callable[..., Path]) -> None:
    path = make_file("transformer")
    run = store.load(path)
    c = client_for(path)
    default = c.get("/api/graph").get_json()
    assert default["run"]["view"]["depth"] is None  # small: every layer by default
    assert len(default["nodes"]) == len(run.nodes)
    assert [o[0] for o in default["run"]["view"]["options"]] == [1, 2, 3, None]
    p = c.get("/api/graph?depth=2").get_json()
    names = [n["name"] for n in p["nodes"]]
    assert "blocks.1" in names and "blocks.1.ln1" not in names
    info = {n["id"]: n for n in p["run"]["nodes"]}
    assert info["blocks.1"]["kind"] == "group" and info["blocks.1"]["type"].startswith("6 layers")
    assert p["run"]["view"] == {**p["run"]["view"], "depth": 2, "expanded": [], "auto": False}
    # a step in that view: values in its node order, groups as sqrt of sums of squares
    s = c.get("/api/step?step=3&depth=2").get_json()
    i = names.index("blocks.1")
    layers = [m for m in (n["id"] for n in run.nodes) if m.startswith("blocks.1.")]
    want = sum(run.node_history(m)[3] ** 2 for m in layers) ** 0.5
    assert s["gradient_norm"][i] == pytest.approx(want, rel=1e-6)
    assert len(s["edges"]) == len(p["edges"])
    layer = c.get("/api/layer?id=blocks.1&depth=2").get_json()
    assert layer["gradient_norm"][3] == pytest.approx(want, rel=1e-6)
    assert layer["params"] == {} and "blocks.1.ln1" in layer["members"]
    # expanding one group shows its parts, one level down; the others stay rolled up
    x = c.get("/api/graph?depth=2&expand=blocks.1").get_json()
    names = {n["name"] for n in x["nodes"]}
    assert {"blocks.1.ln1", "blocks.1.attn", "blocks.1.mlp", "blocks.0", "blocks.2"} <= names
    assert "blocks.1" not in names and x["run"]["view"]["expanded"] == ["blocks.1"]
    # a layer hidden in a group still answers /api/layer
    assert c.get("/api/layer?id=blocks.3.ln1&depth=2").status_code == 200
    assert c.get("/api/graph?depth=full").get_json()["run"]["view"]["depth"] is None
    assert c.get("/api/graph?depth=9").get_json()["run"]["view"]["depth"] is None


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("depth=0.5", "depth must be auto, full or a whole number"),
        ("depth=-1", "depth must be"),
        ("depth=%3Cb%3E", "depth must be"),
        ("depth=%C2%B2", "depth must be"),  # superscript two: a digit to isdigit(), not to int()
        ("depth=%EF%BC%92", "depth must be"),  # full-width two
        ("depth=2&expand=", "expand names"),
        ("depth=2" + "&expand=x" * 201, "at most 200 groups"),
    ],
)
def test_bad_view_is_400_json(make_file: Callable[..., Path], query: str, words: str) -> None:
    c = client_for(make_file("transformer"))
    for endpoint in ("/api/graph?", "/api/step?step=0&", "/api/layer?id=head&"):
        r = c.get(endpoint + query)
        assert r.status_code == 400 and words in r.get_json()["error"], endpoint


def test_depth_setting(make_file: Callable[..., Path], big_file: Path) -> None:
    path = make_file("transformer")
    p = client_for(path, DEPTH=2).get("/api/graph").get_json()
    assert p["run"]["view"]["depth"] == 2 and p["run"]["view"]["auto"] is False
    big = client_for(big_file).get("/api/graph").get_json()  # > 1,000 nodes: rolled up
    assert big["run"]["view"] == {**big["run"]["view"], "depth": 2, "auto": True}
    assert len(big["nodes"]) < 400
    full = client_for(big_file, DEPTH="full").get("/api/graph").get_json()
    assert len(full["nodes"]) > 1000
    with pytest.raises(GradvizError, match="depth must be auto, full or a whole number"):
        create_app({"INPUT": path, "DEPTH": "deep"})
    html = export_html(path, depth=2)
    assert '"depth":2' in html and "blocks.1" in html


def test_views_are_kept_per_reading(make_file: Callable[..., Path]) -> None:
    from gradviz.web import MAX_VIEWS

    c = client_for(make_file("transformer"))
    src = c.application.extensions["gradviz"]
    for b in range(MAX_VIEWS + 3):
        assert c.get(f"/api/graph?depth=2&expand=blocks.{b % 4}&expand=x{b}").status_code == 200
    snap = src.current()
    assert len(snap.views) <= MAX_VIEWS and snap.default in snap.views

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


@pytest.mark.parametrize("name", ["page.html", "..%2Fgradviz%2Fweb.py", "nope.js"])
def test_unknown_assets_are_404_json(client: FlaskClient, name: str) -> None:
    r = client.get(f"/assets/{name}")
    assert r.status_code == 404 and "error" in r.get_json()


def test_graph_endpoint(client: FlaskClient, residual_file: Path) -> None:
    doc = orjson.loads(residual_file.read_bytes())
    p = client.get("/api/graph").get_json()
    assert len(p["nodes"]) == len(doc["nodes"]) and len(p["edges"]) == len(doc["edges"])
    assert p["run"]["steps"] == doc["history"]["steps"]
    assert p["threshold"] == 0.01


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
    assert p["revision"] == 1 and "not valid JSON" in p["error"]
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

"""The Flask app that serves the gradient-flow page and its JSON endpoints.

    GET /                   the page (graph drawn from embedded JSON)
    GET /assets/<name>      vis-network (from the pyvis wheel), gradviz.js, gradviz.css
    GET /api/graph          nodes, edges, options and run data (what the page draws from)
    GET /api/step?step=N    the norms of recorded step N, in /api/graph's order
    GET /api/layer?id=ID    one layer's norms over every recorded step
    GET /api/poll           a cheap revision counter the page polls for live updates

The file is re-read when its mtime, size or inode change (the recorder replaces it
atomically every few seconds); a re-read that fails keeps the last good version.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import orjson
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from . import render, store
from .errors import FileFormatError, GradvizError
from .graph import build_graph

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
RETRY_SECONDS = 2.0  # a file that failed to parse is tried again this often, even unchanged
_STEP = re.compile(r"-?[0-9]{1,18}")

bp = Blueprint("gradviz", __name__)


def read_run(path: Path) -> tuple[store.Run, tuple[int, int, int]]:
    """Parse the file and return it with the (mtime, size, inode) of what was read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # of the file we read, even if it is replaced meanwhile
            data = f.read()
    except FileNotFoundError:
        return store.load(path), (0, 0, 0)  # store words the error
    except IsADirectoryError:
        return store.load(path), (0, 0, 0)
    except OSError as e:
        raise FileFormatError(f"cannot read {path}: {e.strerror}") from e
    try:
        run = store.parse(data, path)
    except GradvizError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # shapes store misses
        raise FileFormatError(
            f"{path}: unexpected content ({type(e).__name__}: {e}); "
            "is it a training_output.json written by gradviz?"
        ) from e
    return run, (st.st_mtime_ns, st.st_size, st.st_ino)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass
class Snapshot:
    """One good reading of the file, with everything derived from it."""

    revision: int
    signature: tuple[int, int, int]
    run: store.Run
    graph: nx.DiGraph
    frames: render.Frames
    payload: dict[str, Any]
    html: str | None = field(default=None)


class RunSource:
    """The file being viewed: re-read on change, last good version kept on failure."""

    def __init__(self, path: Path, threshold: float, live: bool = True) -> None:
        self.path = Path(path)
        self.threshold = threshold
        self.live = live
        self.error: str | None = None
        self._lock = threading.Lock()
        self._failed: tuple[tuple[int, int, int] | None, float] | None = None
        self._snap = self._build(*read_run(self.path), revision=1)

    def _build(self, run: store.Run, sig: tuple[int, int, int], revision: int) -> Snapshot:
        g = build_graph(run)
        payload = render.graph_payload(g, self.threshold, source=self.path.name, revision=revision)
        return Snapshot(revision, sig, run, g, render.frames(run, g), payload)

    def current(self) -> Snapshot:
        """The latest good snapshot, re-reading the file first if it changed."""
        if self.live:
            self.refresh()
        return self._snap

    def refresh(self) -> None:
        """Re-read the file if it changed since the last good (or failed) reading."""
        sig = _signature(self.path)
        if sig == self._snap.signature:
            return
        if self._failed and self._failed[0] == sig and time.monotonic() < self._failed[1]:
            return
        if not self._lock.acquire(blocking=False):
            return  # another request is reading it; serve the current version meanwhile
        try:
            if sig is None:
                raise FileFormatError(f"{self.path} is gone (moved or deleted)")
            run, read_sig = read_run(self.path)
            self._snap = self._build(run, read_sig, self._snap.revision + 1)
            self.error, self._failed = None, None
        except (GradvizError, OSError) as e:
            self.error = str(e)
            self._failed = (sig, time.monotonic() + RETRY_SECONDS)
        finally:
            self._lock.release()

    def html(self, snap: Snapshot) -> str:
        """The page for a snapshot, rendered once."""
        if snap.html is None:
            snap.html = render.render_page(snap.payload, title=self.path.name, live=self.live)
        return snap.html


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The app for one file. Config: INPUT (path), THRESHOLD (0.01), LIVE (True).

    Raises FileFormatError if the file cannot be read now, GradvizError for bad settings.
    """
    app = Flask(__name__, static_folder=None, template_folder=None)
    app.config.update(
        INPUT="training_output.json", THRESHOLD=render.DEFAULT_THRESHOLD, LIVE=True, DEBUG=False
    )
    app.config.update(config or {})
    threshold = check_threshold(app.config["THRESHOLD"])
    render.environment()  # fail now, not on the first request, if templates/ is missing
    app.extensions["gradviz"] = RunSource(
        Path(app.config["INPUT"]), threshold, bool(app.config["LIVE"])
    )
    app.register_blueprint(bp)
    app.after_request(_headers)
    app.register_error_handler(HTTPException, _http_error)
    return app


def check_threshold(value: Any) -> float:
    """A threshold as a float, or GradvizError naming the bad value."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not (t >= 0 and t != float("inf")):
        raise GradvizError(
            f"threshold must be a number >= 0, got {value!r}; edges at or below it are drawn "
            "red (the default is 0.01)"
        )
    return t


def _source() -> RunSource:
    src: RunSource = current_app.extensions["gradviz"]
    return src


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status=status, mimetype="application/json")


def _error(message: str, status: int = 400) -> Response:
    return _json({"error": message, "status": status}, status)


def _headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    if resp.mimetype == "application/json" or resp.mimetype == "text/html":
        resp.headers["Cache-Control"] = "no-store"
    return resp


def _http_error(e: HTTPException) -> Response:
    return _error(e.description or e.name, e.code or 500)


@bp.get("/")
def page() -> Response:
    """The page, with the latest good reading of the file embedded."""
    src = _source()
    return Response(src.html(src.current()), mimetype="text/html")


@bp.get("/assets/<name>")
def asset(name: str) -> Response:
    """vis-network from the pyvis wheel, and our own script and stylesheet."""
    if name == "vis-network.min.js":
        text = render.VIS_JS.read_text(encoding="utf-8")
        mimetype = "text/javascript"
    elif name in render.ASSETS:
        text, mimetype = render.asset_text(name), render.ASSETS[name]
    else:
        return _error(f"no asset named {name!r}", 404)
    resp = Response(text, mimetype=mimetype)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/api/graph")
def graph() -> Response:
    """Everything the page draws from, for the latest good reading."""
    return _json(_source().current().payload)


@bp.get("/api/poll")
def poll() -> Response:
    """Cheap: the revision (bumped when the file changed), step count, last error."""
    src = _source()
    snap = src.current()
    steps = snap.run.steps
    return _json(
        {
            "revision": snap.revision,
            "steps": len(steps),
            "last_step": steps[-1] if steps else None,
            "error": src.error,
        }
    )


@bp.get("/api/step")
def step() -> Response:
    """The norms of one recorded step; 400 with a JSON error for a bad step."""
    snap = _source().current()
    steps = snap.frames.steps
    raw = request.args.get("step")
    if not steps:
        return _error("this file has no recorded steps; only its latest values exist")
    rng = f"recorded steps run from {steps[0]} to {steps[-1]} ({len(steps)} of them)"
    if raw is None:
        return _error(f"missing ?step=N; {rng}")
    if not _STEP.fullmatch(raw):
        return _error(f"step must be an integer, got {raw[:40]!r}; {rng}")
    index = snap.frames.index(int(raw))
    if index is None:
        return _error(f"step {int(raw)} was not recorded; {rng}")
    return _json({**render.step_payload(snap.frames, index), "revision": snap.revision})


@bp.get("/api/layer")
def layer() -> Response:
    """One layer's norms over every recorded step, and each of its parameters'."""
    snap = _source().current()
    nid = request.args.get("id")
    if not nid:
        return _error("missing ?id=LAYER (a node id from /api/graph)")
    if nid not in snap.graph:
        return _error(f"no layer with id {nid[:200]!r}", 404)
    return _json({**render.layer_payload(snap.run, snap.graph, nid), "revision": snap.revision})


def export_html(path: str | os.PathLike[str], threshold: float = render.DEFAULT_THRESHOLD) -> str:
    """One self-contained HTML page for a file: same interactivity, no server, no network."""
    p = Path(path)
    run, _ = read_run(p)
    g = build_graph(run)
    payload = render.graph_payload(g, check_threshold(threshold), source=p.name)
    return render.render_page(payload, title=p.name, history=render.history_payload(run, g))

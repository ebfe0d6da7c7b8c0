"""The Flask app that serves the gradient-flow page and its JSON endpoints.

    GET /                   the page (graph drawn from embedded JSON)
    GET /assets/<name>      vis-network (from the pyvis wheel), gradviz.js, gradviz.css
    GET /api/graph          nodes, edges, options and run data (what the page draws from)
    GET /api/step?step=N    the norms of recorded step N, in /api/graph's order
    GET /api/layer?id=ID    one layer's norms over every recorded step
    GET /api/poll           a cheap revision counter the page polls for live updates

/api/graph, /api/step and /api/layer take the view as ``depth=N`` (or ``full``) and
``expand=GROUP`` (repeated): the roll-up of gradviz.graph.rollup. Without them they serve
the default view (``DEPTH``: ``auto`` rolls up graphs above gradviz.graph.ROLLUP_ABOVE
nodes). The page never receives the whole history: per-step and per-layer data come from
/api/step and /api/layer when it needs them.

The file is re-read when its mtime, size or inode change (the recorder replaces it
atomically every few seconds); a re-read that fails keeps the last good version.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import orjson
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from . import render, store
from .errors import FileFormatError, GradvizError
from .graph import DEPTH_MAX, auto_depth, build_graph, depth_options, max_depth, rollup

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
RETRY_SECONDS = 2.0  # a file that failed to parse is tried again this often, even unchanged
_STEP = re.compile(r"-?[0-9]{1,18}")
MAX_VIEWS = 8  # views kept per reading of the file (each holds its graph and frames)
MAX_EXPANDED = 200  # groups one view may expand
ViewKey = tuple[int | None, tuple[str, ...]]  # (depth or None for every layer, expanded)

bp = Blueprint("gradviz", __name__)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: building a big graph allocates many small
    containers, none of them in cycles, and collections over the parsed file's objects
    would otherwise double the time it takes."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_run(path: Path) -> tuple[store.Run, tuple[int, int, int]]:
    """Parse the file and return it with the (mtime, size, inode) of what was read."""
    data, st = store.read_file(path)  # (store words every error)
    try:
        with no_gc():
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


def parse_depth(value: Any) -> int | None | str:
    """A depth setting: "auto", None for "full" (every layer), or a depth >= 1."""
    if value is None or value == "auto":
        return "auto"
    if value in ("full", 0, "0"):
        return None
    text = str(value)
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= DEPTH_MAX:
        raise GradvizError(
            f"depth must be auto, full or a whole number from 1 to {DEPTH_MAX}, got {value!r}; "
            "it is how many parts of a layer's name (blocks.3.attn.qkv has 4) are kept"
        )
    return int(text)


def normal_depth(g: nx.DiGraph, depth: int | None | str) -> int | None:
    """None (every layer) for a depth at or below which no layer name is deeper."""
    if not isinstance(depth, int) or depth >= max_depth(g):
        return None
    return depth


@dataclass
class View:
    """The graph as shown at one roll-up, with its per-step matrices and page payload."""

    graph: nx.DiGraph
    frames: render.Frames
    payload: dict[str, Any]


@dataclass
class Snapshot:
    """One good reading of the file, with everything derived from it."""

    revision: int
    signature: tuple[int, int, int]
    run: store.Run
    full: nx.DiGraph  # every layer: what the views are rolled up from
    default: ViewKey
    auto: bool  # whether the default depth was chosen automatically
    threshold: float
    source: str  # the file's name, shown on the page
    views: dict[ViewKey, View] = field(default_factory=dict)
    html: str | None = field(default=None)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _options: list[tuple[int | None, int]] | None = field(default=None, repr=False)

    @property
    def graph(self) -> nx.DiGraph:
        """The default view's graph."""
        return self.view(self.default).graph

    @property
    def frames(self) -> render.Frames:
        """The default view's per-step matrices."""
        return self.view(self.default).frames

    @property
    def payload(self) -> dict[str, Any]:
        """The default view's page payload."""
        return self.view(self.default).payload

    def view(self, key: ViewKey) -> View:
        """A view, built on first use and kept (the default one and a few others)."""
        v = self.views.get(key)
        if v is not None:
            return v
        with self.lock, no_gc():  # one build at a time; others wait, then find it built
            v = self.views.get(key)
            if v is not None:
                return v
            depth, expanded = key
            g = rollup(self.full, self.run, depth, expanded)
            info = {
                "depth": depth,
                "expanded": list(expanded),
                "auto": self.auto and key == self.default,
                "options": [[d, n] for d, n in self.options],
                "hidden_edges": g.graph.get("view", {}).get("hidden_edges", 0),
            }
            payload = render.graph_payload(
                g, self.threshold, source=self.source, revision=self.revision, view=info
            )
            v = View(g, render.frames(self.run, g), payload)
            if len(self.views) >= MAX_VIEWS:  # drop the oldest other than the default
                del self.views[next(k for k in self.views if k != self.default)]
            self.views[key] = v
            return v

    @property
    def options(self) -> list[tuple[int | None, int]]:
        """(depth, node count) for each depth the page offers, computed once."""
        if self._options is None:
            self._options = depth_options(self.full)
        return self._options


def run_threshold(run: store.Run) -> float:
    """The edge threshold a run asks for: the vanishing threshold its diagnosis used
    (extract.py --vanish-below, kept as meta.vanish_below), else the default."""
    v = run.meta.get("vanish_below")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"):
        return float(v)
    return render.DEFAULT_THRESHOLD


def snapshot(
    run: store.Run,
    signature: tuple[int, int, int],
    revision: int,
    *,
    threshold: float | None,
    source: str,
    depth: int | None | str = "auto",
) -> Snapshot:
    """A snapshot of a run with its default view built (depth: "auto", None or N;
    threshold None: the run's own, see run_threshold)."""
    if threshold is None:
        threshold = run_threshold(run)
    with no_gc():
        g = build_graph(run)
        options = depth_options(g)
        chosen = auto_depth(g, options) if depth == "auto" else depth
    snap = Snapshot(revision, signature, run, g, (normal_depth(g, chosen), ()),
                    depth == "auto", threshold, source, _options=options)
    snap.view(snap.default)
    return snap


def shown_name(path: Path) -> str:
    """A file's name for the page: a name that is not UTF-8 (bytes the system kept as
    surrogates) gets U+FFFD for each bad byte, which JSON and HTML can carry."""
    return os.fsencode(path.name).decode("utf-8", "replace")


def shown_text(text: str) -> str:
    """Text for the page (an error naming the file): lone surrogates, which orjson refuses,
    become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class RunSource:
    """The file being viewed: re-read on change, last good version kept on failure."""

    def __init__(
        self, path: Path, threshold: float | None, live: bool = True,
        depth: int | None | str = "auto"
    ) -> None:
        self.path = Path(path)
        self.threshold = threshold
        self.live = live
        self.depth = depth
        self.error: str | None = None
        self._lock = threading.Lock()
        self._failed: tuple[tuple[int, int, int] | None, float] | None = None
        self._snap = self._build(*read_run(self.path), revision=1)

    def _build(self, run: store.Run, sig: tuple[int, int, int], revision: int) -> Snapshot:
        return snapshot(run, sig, revision, threshold=self.threshold, source=shown_name(self.path),
                        depth=self.depth)

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
            self.error = shown_text(str(e))
            self._failed = (sig, time.monotonic() + RETRY_SECONDS)
        except Exception as e:  # a version that reads but does not build: keep the last one
            self.error = shown_text(f"{self.path}: this version cannot be shown "
                                    f"({type(e).__name__}: {e}); showing the last one that could")
            self._failed = (sig, time.monotonic() + RETRY_SECONDS)
        finally:
            self._lock.release()

    def html(self, snap: Snapshot) -> str:
        """The page for a snapshot, rendered once."""
        if snap.html is None:
            snap.html = render.render_page(snap.payload, title=shown_name(self.path),
                                           live=self.live)
        return snap.html


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The app for one file. Config: INPUT (path), THRESHOLD (None: the run's own, else
    1e-7), LIVE (True), DEPTH
    ("auto", "full" or a depth >= 1: the roll-up shown first).

    Raises FileFormatError if the file cannot be read now, GradvizError for bad settings.
    """
    app = Flask(__name__, static_folder=None, template_folder=None)
    app.config.update(
        INPUT="training_output.json",
        THRESHOLD=None,
        LIVE=True,
        DEPTH="auto",
        DEBUG=False,
    )
    app.config.update(config or {})
    threshold = check_threshold(app.config["THRESHOLD"])
    depth = parse_depth(app.config["DEPTH"])
    render.environment()  # fail now, not on the first request, if templates/ is missing
    app.extensions["gradviz"] = RunSource(
        Path(app.config["INPUT"]), threshold, bool(app.config["LIVE"]), depth
    )
    app.register_blueprint(bp)
    app.after_request(_headers)
    app.register_error_handler(HTTPException, _http_error)
    return app


def check_threshold(value: Any) -> float | None:
    """A threshold as a float (None as None: the run's own), or GradvizError naming the
    bad value."""
    if value is None:
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not (t >= 0 and t != float("inf")):
        raise GradvizError(
            f"threshold must be a number >= 0, got {value!r}; edges at or below it are drawn "
            "red (the default is the run's own vanishing threshold, else 1e-07)"
        )
    return t


def _source() -> RunSource:
    src: RunSource = current_app.extensions["gradviz"]
    return src


class BadView(ValueError):
    """A depth or expand parameter that names no view."""


def _view(snap: Snapshot) -> View:
    """The view a request asks for (depth=, expand=), or the default one."""
    raw = request.args.get("depth")
    expand = request.args.getlist("expand")
    if raw is None and not expand:
        return snap.view(snap.default)
    try:
        depth = parse_depth(raw) if raw is not None else snap.default[0]
    except GradvizError as e:
        raise BadView(str(e)) from e
    if depth == "auto":
        depth = auto_depth(snap.full, snap.options)
    if len(expand) > MAX_EXPANDED or any(not e or len(e) > 1000 for e in expand):
        raise BadView(f"expand names at most {MAX_EXPANDED} groups, each a non-empty name")
    key = (normal_depth(snap.full, depth), tuple(sorted(set(expand))))
    if key[0] is None:
        key = (None, ())  # every layer shown: nothing to expand
    return snap.view(key)


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
        text = render.vis_script()
        mimetype = "text/javascript"
    elif name in render.ASSETS:
        text, mimetype = render.asset_text(name), render.ASSETS[name]
    else:
        return _error(f"no asset named {name!r}", 404)
    resp = Response(text, mimetype=mimetype)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.errorhandler(BadView)
def _bad_view(e: BadView) -> Response:
    return _error(str(e))


@bp.get("/api/graph")
def graph() -> Response:
    """Everything the page draws from, for the latest good reading, in the asked view."""
    return _json(_view(_source().current()).payload)


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
    view = _view(snap)
    steps = view.frames.steps
    raw = request.args.get("step")
    if not steps:
        return _error("this file has no recorded steps; only its latest values exist")
    rng = f"recorded steps run from {steps[0]} to {steps[-1]} ({len(steps)} of them)"
    if raw is None:
        return _error(f"missing ?step=N; {rng}")
    if not _STEP.fullmatch(raw):
        return _error(f"step must be an integer, got {raw[:40]!r}; {rng}")
    index = view.frames.index(int(raw))
    if index is None:
        return _error(f"step {int(raw)} was not recorded; {rng}")
    return _json({**render.step_payload(view.frames, index), "revision": snap.revision})


@bp.get("/api/layer")
def layer() -> Response:
    """One layer's norms over every recorded step, and each of its parameters'."""
    snap = _source().current()
    view = _view(snap)
    nid = request.args.get("id")
    if not nid:
        return _error("missing ?id=LAYER (a node id from /api/graph)")
    g = view.graph if nid in view.graph else snap.full
    if nid not in g:
        return _error(f"no layer with id {nid[:200]!r}", 404)
    return _json({**render.layer_payload(snap.run, g, nid), "revision": snap.revision})


def export_html(
    path: str | os.PathLike[str],
    threshold: float | None = None,
    depth: int | str | None = "auto",
) -> str:
    """One self-contained HTML page for a file: same interactivity, no server, no network.

    It shows one roll-up (depth), with every step of it embedded; expanding a group needs
    the server.
    """
    p = Path(path)
    run, sig = read_run(p)
    if (why := store.no_layers(run)) is not None:  # (the server waits for layers instead)
        raise FileFormatError(why)
    snap = snapshot(run, sig, 0, threshold=check_threshold(threshold), source=shown_name(p),
                    depth=parse_depth(depth))
    view = snap.view(snap.default)
    history = render.history_payload(run, view.graph, view.frames)
    return render.render_page(view.payload, title=shown_name(p), history=history)

"""Keep the recorded history, write it to training_output.json, and read it back.

The contract between the two halves of gradviz. No torch here: a file recorded on a GPU
box opens anywhere. History is a float32 matrix (recorded steps x series) that grows by
doubling; on disk each series is one base64 string (see gradviz.schema).
"""

from __future__ import annotations

import binascii
import json
import math
import operator
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from . import schema
from .errors import FileFormatError, UnknownVersionError

SeriesKey = tuple[str, ...]  # ("loss",), ("node", id, field), ("param", id, name), ("edge", id)


CHUNK_ROWS = 1024  # the most rows allocated at once: growth costs at most one such block


class History:
    """Recorded values: one row per recorded step, one column per series.

    Rows live in blocks of rows (chunks) that grow geometrically up to CHUNK_ROWS: appends
    are amortised O(1), memory stays within one chunk of the values' own float32 size, and
    a full chunk is never written again, so a snapshot shares it instead of copying it.
    """

    def __init__(self) -> None:
        self._steps: list[int] = []
        self.columns: dict[SeriesKey, int] = {}
        self._chunks: list[np.ndarray] = []  # (capacity, width) each; all but the last full
        self._used = 0  # rows used in the last chunk
        # Called before anything reads the values: a recorder that keeps steps in a buffer
        # of its own puts them in here, so that a History held on to is never behind.
        self.before_read: Callable[[], None] | None = None
        # Reads from another thread than the one appending see whole rows. (Taken after
        # before_read, never around it: the recorder takes its own lock, then this one.)
        self._lock = threading.RLock()

    def _catch_up(self) -> None:
        if self.before_read is not None:
            self.before_read()

    @property
    def steps(self) -> list[int]:
        """The recorded step numbers, in order: one per row."""
        self._catch_up()
        return self._steps

    def __len__(self) -> int:
        self._catch_up()
        return len(self._steps)

    def column(self, key: SeriesKey) -> int:
        """Index of a series' column, created (absent so far) on first use."""
        col = self.columns.get(key)
        if col is None:
            col = self.columns[key] = len(self.columns)
        return col

    def append(
        self, step: int, cols: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray
    ) -> None:
        """Add one recorded step; series not named in cols are absent in it."""
        with self._lock:
            self._append(step, cols, values)

    def _append(
        self, step: int, cols: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray
    ) -> None:
        step = operator.index(step)  # (an int, as the file writes it: not 1.0, not True)
        steps = self._steps  # (not self.steps: a recorder's buffer appends through here)
        if steps and step <= steps[-1]:
            raise ValueError(f"step {step} is not after step {steps[-1]}")
        ncols = len(self.columns)
        if not self._chunks or self._used == self._chunks[-1].shape[0]:
            rows = min(CHUNK_ROWS, max(16, len(steps)))  # small runs stay small
            self._chunks.append(_absent((rows, ncols)))
            self._used = 0
        chunk = self._chunks[-1]
        if ncols > chunk.shape[1]:  # new series: widen this chunk only, full ones stay as is
            grown = _absent((chunk.shape[0], max(2 * chunk.shape[1], ncols)))
            grown[:, : chunk.shape[1]] = chunk
            chunk = self._chunks[-1] = grown
        if isinstance(values, np.ndarray) and values.dtype == np.float32:
            row = values.copy()
        else:
            with np.errstate(over="ignore"):  # beyond float32's range is inf, quietly
                row = np.array(values, dtype=np.float32)
        nan = np.isnan(row)  # (not isnan(row.sum()): inf - inf and overflow would warn)
        if nan.any():
            row[nan] = np.float32("nan")  # one NaN bit pattern, never the absent one
        chunk[self._used, np.asarray(cols, dtype=np.intp)] = row
        self._used += 1
        steps.append(step)

    def _blocks(self, start: int = 0, stop: int | None = None) -> list[tuple[np.ndarray, int, int]]:
        """(chunk, first row, end row) of the recorded rows start:stop, oldest first.

        Counted from len(steps), which _append changes last: a read that comes in the
        middle of an append (a signal handler saving the file) sees the rows before it.
        """
        n = len(self._steps)
        stop = n if stop is None else min(stop, n)
        out, at = [], 0  # at: the first row of chunk c
        for c in self._chunks:
            if at >= stop:
                break
            lo, hi = max(start - at, 0), min(stop - at, c.shape[0])
            if lo < hi:
                out.append((c, lo, hi))
            at += c.shape[0]
        return out

    def series(self, key: SeriesKey) -> np.ndarray:
        """A copy of one series over all recorded steps (absent marker where missing)."""
        col = self.columns.get(key)
        if col is None:
            return schema.absent_array(len(self))
        return self.rows([col])[0]

    def matrix(self) -> np.ndarray:
        """Every series at once, one contiguous row per column: (series x steps) float32."""
        self._catch_up()
        with self._lock:
            return self._rows(range(len(self.columns)), 0, None)

    def rows(self, cols: Sequence[int], start: int = 0, stop: int | None = None) -> np.ndarray:
        """Some series at once, one contiguous row per column: (len(cols) x steps) float32,
        of the recorded steps start:stop (by place, not step number; not negative)."""
        if start < 0 or (stop is not None and stop < 0):
            raise ValueError(f"rows({start}, {stop}): places count from 0, not from the end")
        self._catch_up()
        with self._lock:
            return self._rows(cols, start, stop)

    def _rows(self, cols: Sequence[int], start: int, stop: int | None) -> np.ndarray:
        idx = np.asarray(cols, dtype=np.intp)
        blocks = self._blocks(start, stop)
        out = _absent((len(idx), sum(hi - lo for _, lo, hi in blocks)))
        at = 0
        for c, lo, hi in blocks:
            inside = idx < c.shape[1]  # (a series added later is absent before)
            out[inside, at : at + hi - lo] = c[lo:hi, idx[inside]].T
            at += hi - lo
        return out

    def last(self, key: SeriesKey) -> float | None:
        """The latest recorded value of a series, None if absent."""
        col = self.columns.get(key)
        if col is None:
            return None
        self._catch_up()
        with self._lock:
            v = self._rows([col], max(len(self._steps) - 1, 0), None)[0]
        return None if not len(v) or schema.absent_mask(v)[0] else float(v[0])

    def snapshot(self) -> History:
        """An independent copy, for writing in another thread (full chunks are shared)."""
        self._catch_up()
        h = History()
        with self._lock:
            blocks = self._blocks()
            h._steps = self._steps[: sum(hi - lo for _, lo, hi in blocks)]
            h.columns = dict(self.columns)
            if blocks:
                c, _, used = blocks[-1]
                h._chunks = [*[b[0] for b in blocks[:-1]], c[:used].copy()]
                h._used = used
        return h

    def nbytes(self) -> int:
        """Memory held by the values (allocated, not only used)."""
        self._catch_up()
        with self._lock:
            return sum(c.nbytes for c in self._chunks)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (or deep-copied) without the lock and the recorder's callback."""
        snap = self.snapshot()
        return {"steps": snap._steps, "columns": snap.columns, "chunks": snap._chunks,
                "used": snap._used}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self._steps, self.columns = state["steps"], state["columns"]
        self._chunks, self._used = state["chunks"], state["used"]


def _absent(shape: tuple[int, int]) -> np.ndarray:
    """A float32 matrix of absent values."""
    return schema.absent_array(shape[0] * shape[1]).reshape(shape)


@dataclass
class Recording:
    """Everything one file holds: metadata, layer and edge descriptions, history."""

    meta: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> static info
    edges: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> static info
    history: History = field(default_factory=History)
    findings: list[dict[str, Any]] = field(default_factory=list)

    def snapshot(self) -> Recording:
        """A copy that training may not change while it is written."""
        # (list(d.items()) copies in one go: a layer or edge added meanwhile by another
        # thread cannot change the dict while it is walked)
        return Recording(
            meta=dict(self.meta),
            nodes={k: dict(v) for k, v in list(self.nodes.items())},
            edges={k: dict(v) for k, v in list(self.edges.items())},
            history=self.history.snapshot(),
            findings=list(self.findings),
        )

    def to_document(self) -> dict[str, Any]:
        """The JSON document: latest step at top level, whole history below.

        Made from a snapshot: one consistent step count, also while training goes on in
        another thread.
        """
        rec = self.snapshot()
        h = rec.history
        mat = h.matrix()  # one transposing copy: each series is then a contiguous row
        absent = schema.encode_series(schema.absent_array(len(h)))

        def series(key: SeriesKey) -> str:
            col = h.columns.get(key)
            return absent if col is None else schema.encode_series(mat[col])

        return rec._document(series)

    def _document(self, series: Callable[[SeriesKey], str],
                  steps: Any = None) -> dict[str, Any]:
        """to_document, with each history series' text from series(key) (and the step list
        replaced by steps, if given)."""
        h = self.history
        n = len(h)
        final = h.rows(range(len(h.columns)), max(n - 1, 0))[:, -1:].reshape(-1)  # last row
        absent = schema.absent_mask(final)

        def enc(key: SeriesKey) -> Any:  # the latest value of a series, as JSON
            col = h.columns.get(key)
            if col is None or col >= len(final) or absent[col]:
                return None
            return schema.encode_value(float(final[col]))

        nodes = []
        hist_nodes: dict[str, Any] = {}
        for nid, info in self.nodes.items():
            node = {"id": nid, **info}
            params = {}
            for pname, pinfo in info.get("params", {}).items():
                params[pname] = {**pinfo, "gradient_norm": enc(("param", nid, pname))}
            node["params"] = params
            hist: dict[str, Any] = {}
            for key in schema.NODE_SERIES:
                node[key] = enc(("node", nid, key))
                if ("node", nid, key) in h.columns:
                    hist[key] = series(("node", nid, key))
            stats = {}
            for key in schema.STAT_SERIES:
                if ("node", nid, key) in h.columns:
                    stats[key] = enc(("node", nid, key))
                    hist[key] = series(("node", nid, key))
            if stats:
                node["stats"] = stats
            if params:
                hist["params"] = {p: series(("param", nid, p)) for p in params}
            nodes.append(node)
            hist_nodes[nid] = hist
        edges = []
        hist_edges = {}
        for eid, info in self.edges.items():
            edges.append({"id": eid, **info, "gradient_norm": enc(("edge", eid))})
            hist_edges[eid] = {"gradient_norm": series(("edge", eid))}
        meta = {**self.meta, "steps": n, "last_step": h.steps[-1] if n else None}
        return {
            "format": schema.FORMAT_NAME,
            "version": schema.FORMAT_VERSION,
            "meta": meta,
            "nodes": nodes,
            "edges": edges,
            "findings": self.findings,
            "history": {
                "encoding": schema.SERIES_ENCODING,
                "steps": list(h.steps) if steps is None else steps,
                "loss": series(("loss",)),
                "nodes": hist_nodes,
                "edges": hist_edges,
            },
        }


def dumps(doc: dict[str, Any]) -> bytes:
    """Serialize with orjson: sorted keys so equal runs give equal files."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside path, then rename: readers never see half a file."""
    _write_atomic_parts(path, (data,))


def _write_atomic_parts(path: Path, parts: Iterable[bytes | memoryview]) -> None:
    # (the name's first 100 characters: a name near the folder's limit, 255 bytes, still
    # fits with the dot, the process and thread numbers around it)
    tmp = path.with_name(f".{path.name[:100]}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for data in parts:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


SERIES_AT_ONCE = 64  # series gathered and encoded together when a file is streamed...
BLOCK_VALUES = 1 << 20  # ... up to this many values at once (4 MB of float32)
STEPS_AT_ONCE = 1 << 12  # step numbers written at once
_STEPS: SeriesKey = ("history.steps",)  # (the step list's placeholder, beside the series)


def write(path: Path, rec: Recording) -> None:
    """Write rec to path atomically: the bytes of ``dumps(rec.to_document())``, streamed.

    rec must not change meanwhile: pass a snapshot of a recording that is still growing.

    The document goes through orjson with a short placeholder for each history series and
    for the step list; these are then written into the file between the skeleton's
    pieces: the series up to SERIES_AT_ONCE series or BLOCK_VALUES values at a time (a
    longer series in pieces), base64-encoded by numpy. So memory on top stays within a
    few blocks whatever the history's size, and this thread (often a background writer)
    hardly holds the GIL: numpy encodes without it, where one orjson call over a big
    history holds it for a third of a second and stalls the training thread that long
    (benchmarks/file_io.py).
    """
    h = rec.history
    nonce = secrets.token_hex(8)
    keys: list[SeriesKey] = []

    def placeholder(key: SeriesKey) -> str:
        keys.append(key)
        return f"{nonce}{len(keys) - 1:08d}"

    # (the step list too: orjson takes about 15 bytes a step to indent one, 33 MB for
    # 200,000 steps)
    pieces = dumps(rec._document(placeholder, placeholder(_STEPS))).split(nonce.encode())
    if len(pieces) != len(keys) + 1:  # the nonce also in the user's own text: not streamed
        write_atomic(path, dumps(rec.to_document()))
        return
    order = [keys[int(p[:8])] for p in pieces[1:]]
    # after placeholder i comes pieces[1 + i][8:]; the step list is a list, not a string
    at = order.index(_STEPS)
    pieces[at], pieces[at + 1] = pieces[at][:-1], pieces[at + 1][:8] + pieces[at + 1][9:]
    indent = pieces[at].rsplit(b"\n", 1)[-1][: -len(b'"steps": ')]
    n = len(h)
    # Steps encoded at once: a multiple of 3 values (12 bytes), so that the base64 texts
    # of consecutive pieces of a series join into the base64 text of the whole series.
    span = max(3, BLOCK_VALUES // 3 * 3)
    per = max(1, min(SERIES_AT_ONCE, BLOCK_VALUES // max(n, 1)))
    absent: dict[int, memoryview] = {}

    def absent_text(length: int) -> memoryview:
        if length not in absent:
            one = schema.absent_array(length).reshape(1, length)
            absent[length] = schema.encode_rows(one)[0].data
        return absent[length]

    def block(first: int, cols: list[int | None]) -> Iterable[bytes | memoryview]:
        """The texts of the series at order[first:first + len(cols)], each with the piece
        after it."""
        if n <= span:  # each series whole, the block's together
            text = schema.encode_rows(h.rows([c for c in cols if c is not None]))
            row = 0
            for i, col in enumerate(cols):
                if col is None:
                    yield absent_text(n)
                else:
                    yield text[row].data
                    row += 1
                yield pieces[1 + first + i][8:]
            return
        for i, col in enumerate(cols):  # a long series, span steps at a time
            for lo in range(0, n, span):
                hi = min(n, lo + span)
                yield (absent_text(hi - lo) if col is None
                       else schema.encode_rows(h.rows([col], lo, hi))[0].data)
                time.sleep(0)
            yield pieces[1 + first + i][8:]

    def chunks() -> Iterable[bytes | memoryview]:
        yield pieces[0]
        first = 0
        while first < len(order):
            if order[first] == _STEPS:
                yield from _steps_text(h.steps, indent)
                yield pieces[1 + first][8:]
                first += 1
                continue
            cols: list[int | None] = []
            while (first + len(cols) < len(order) and len(cols) < per
                   and order[first + len(cols)] != _STEPS):
                cols.append(h.columns.get(order[first + len(cols)]))
            yield from block(first, cols)
            first += len(cols)
            time.sleep(0)  # let the training thread have the GIL

    _write_atomic_parts(path, chunks())


def _steps_text(steps: list[int], indent: bytes) -> Iterable[bytes]:
    """A list of step numbers as orjson writes it with OPT_INDENT_2, at this indent."""
    if not steps:
        yield b"[]"
        return
    between = b",\n" + indent + b"  "
    yield b"[\n" + indent + b"  "
    for at in range(0, len(steps), STEPS_AT_ONCE):
        if at:
            yield between
        yield between.join([b"%d" % s for s in steps[at : at + STEPS_AT_ONCE]])
        time.sleep(0)
    yield b"\n" + indent + b"]"


def save(path: Path, rec: Recording) -> None:
    """Write a whole Recording now (atomically), as it is when called."""
    write(path, rec.snapshot())


def unwritable(path: Path) -> str | None:
    """Why a recording cannot go to path (with the fix), or None if it can.

    Said before training starts, not after its last step when the file is written.
    """
    try:
        return _unwritable(path)
    except OSError as e:  # (a path the system cannot even look up)
        return f"cannot record to {path}: {e.strerror or e}; pass another file path"


def _unwritable(path: Path) -> str | None:
    folder = path.parent
    try:
        name_max = os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    room = name_max - len(".999")  # (an older file is kept as NAME.1.json, NAME.2.json...)
    if len(os.fsencode(path.name)) > room:
        return (f"cannot record to {path}: its file name is {len(os.fsencode(path.name))} "
                f"bytes, and this folder allows {room} (with room for NAME.1.json); "
                f"pass a shorter file name")
    if path.is_dir():
        return f"{path} is a directory; pass a file path to record to"
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        why = "does not exist" if not folder.exists() else "is not a writable folder"
        return (f"cannot record to {path}: {folder} {why}; create it or pass a path in a "
                f"writable folder")
    if path.exists() and not path.is_file():
        # (a device such as /dev/null, a pipe or a socket: moving it aside and renaming a
        # file over it would replace it for every other program)
        return (f"{path} is not a regular file (a device, pipe or socket); pass a file path "
                f"to record to")
    return None


def backup_existing(path: Path) -> Path | None:
    """Move an existing file at path to the first free NAME.N.json; return where it went."""
    if not path.exists():
        return None
    n = 1
    while True:
        target = path.with_name(f"{path.stem}.{n}{path.suffix}")
        if not target.exists():
            os.replace(path, target)
            return target
        n += 1


class Writer:
    """Writes a Recording now and then from a background thread, and once more at the end.

    Training never waits for the disk: a flush takes a snapshot and hands it over. The
    interval stretches when writes get slow (big histories) to WRITE_COST_SHARE's
    inverse times the last write, so writing takes at most a tenth of wall time (and
    slows training by a fifth of that on 2 cores: benchmarks/file_io.py).
    """

    WRITE_COST_SHARE = 0.1

    def __init__(self, path: Path, every_seconds: float = 2.0) -> None:
        self.path = path
        self.every_seconds = every_seconds
        self._last_flush = -float("inf")
        self._last_cost = 0.0
        # time.monotonic() from which the next flush is due: one attribute for rec.step() to
        # compare, which runs cold after each recorded step's backward (a method was ~5 us)
        self.due_at = -float("inf")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def _set_due(self) -> None:
        interval = max(self.every_seconds, self._last_cost / self.WRITE_COST_SHARE)
        self.due_at = self._last_flush + interval

    def flush(self, rec: Recording, wait: bool = False) -> None:
        """Write rec (a snapshot of it) in the background; with wait, write it now."""
        self._last_flush = time.monotonic()
        self._set_due()
        if self._thread is not None and self._thread.is_alive():
            if not wait:
                return  # the previous write is still going: skip, the next one catches up
            self._thread.join()
        snap = rec.snapshot()
        if wait:
            self._write(snap)
            if self.error is not None:
                raise self.error
            return
        self._thread = threading.Thread(target=self._write, args=(snap,), daemon=True)
        self._thread.start()

    def _write(self, rec: Recording) -> None:
        t0 = time.monotonic()
        try:
            with self._lock:
                write(self.path, rec)
            self.error = None
        except BaseException as e:  # reported by the next flush(wait=True)
            self.error = e
            print(f"gradviz: could not write {self.path}: {e}", file=sys.stderr)
        self._last_cost = time.monotonic() - t0
        self._set_due()  # (a slow write stretches the interval that began at its flush)

    def close(self) -> None:
        """Wait for a write in progress."""
        if self._thread is not None:
            self._thread.join()


# -- reading -----------------------------------------------------------------------------


class Run:
    """A recorded run read back from a file: latest values, metadata, and every series."""

    def __init__(self, doc: dict[str, Any], version: int, path: Path | None = None) -> None:
        self.path = path
        self.version = version
        self.meta: dict[str, Any] = doc.get("meta", {}) if version else {}
        self.findings: list[dict[str, Any]] = doc.get("findings", []) if version else []
        dv = schema.decode_value
        self.nodes: list[dict[str, Any]] = []
        for node in doc["nodes"]:
            node = dict(node)
            node.setdefault("type", node["id"])
            node.setdefault("kind", "layer")
            node.setdefault("params", {})
            for key in schema.NODE_SERIES:
                node[key] = dv(node.get(key))
            node["params"] = {
                p: {**info, "gradient_norm": dv(info.get("gradient_norm"))}
                for p, info in node["params"].items()
            }
            node["stats"] = {k: dv(v) for k, v in node.get("stats", {}).items()}
            for key in schema.STAT_SERIES:  # (beside the norm, in a minimal file)
                if key in node:
                    node[key] = dv(node[key])
            self.nodes.append(node)
        self.edges: list[dict[str, Any]] = []
        for i, edge in enumerate(doc.get("edges", [])):
            edge = dict(edge)
            edge.setdefault("id", f"{edge['source']}->{edge['target']}#{i}")
            edge.setdefault("via", [])
            edge["gradient_norm"] = dv(edge.get("gradient_norm"))
            self.edges.append(edge)
        h = doc.get("history") if version else None
        self.steps: list[int] = list(h["steps"]) if h else []
        self._series: dict[SeriesKey, np.ndarray] = {}
        if h:
            n = len(self.steps)
            dec = _decode_series
            self._series[("loss",)] = dec(h["loss"], n, "history.loss")
            for nid, series in h["nodes"].items():
                for key, text in series.items():
                    if key == "params":
                        for p, t in text.items():
                            self._series[("param", nid, p)] = dec(t, n, p)
                    else:
                        self._series[("node", nid, key)] = dec(text, n, key)
            for eid, series in h["edges"].items():
                self._series[("edge", eid)] = dec(series["gradient_norm"], n, eid)

    def array(self, key: SeriesKey) -> np.ndarray:
        """A raw float32 series (absent marker included; see gradviz.schema)."""
        a = self._series.get(key)
        return a if a is not None else schema.absent_array(len(self.steps))

    @property
    def loss(self) -> list[float | None]:
        """Loss of each recorded step (None where rec.step() was given no loss)."""
        return schema.series_to_list(self.array(("loss",)))

    def node_history(self, node_id: str, key: str = "gradient_norm") -> list[float | None]:
        """One node's series over all recorded steps: None where no gradient arrived."""
        return schema.series_to_list(self.array(("node", node_id, key)))

    def param_history(self, node_id: str, param: str) -> list[float | None]:
        """One parameter's gradient norm over all recorded steps."""
        return schema.series_to_list(self.array(("param", node_id, param)))

    def edge_history(self, edge_id: str) -> list[float | None]:
        """One edge's gradient norm over all recorded steps."""
        return schema.series_to_list(self.array(("edge", edge_id)))

    def keys(self) -> Iterable[SeriesKey]:
        """Every series the file holds."""
        return self._series.keys()


def _decode_series(text: Any, n: int, where: str) -> np.ndarray:
    """A series of a checked document, decoded without a copy (the array is read-only)."""
    if not isinstance(text, str):
        return schema.decode_series(text, n, where)  # words the error
    a = np.frombuffer(binascii.a2b_base64(text), dtype="<f4")
    if a.size != n:
        return schema.decode_series(text, n, where)
    return a


def int_fits(value: int) -> bool:
    """Whether orjson reads and writes this integer as one (64 bits, signed or not)."""
    return -(2**63) <= value < 2**64


class _OutOfRange(ValueError):
    """An integer in a file too large for any float."""


def _int_as_orjson(text: str) -> int | float:
    """An integer as orjson reads one (Python's parser, the fallback, takes any size: a
    float of it would overflow far from here): beyond 64 bits a float, beyond that refused."""
    value = int(text)
    if int_fits(value):
        return value
    as_float = float(text)
    if math.isinf(as_float):
        raise _OutOfRange(f"the integer {text[:12]}... ({len(text)} digits) is too large "
                          f"for a number")
    return as_float


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(doc: Any) -> str | None:
    """The first string (key or value) in a parsed document holding a lone surrogate."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                return v
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append(k)
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
    return None


def parse(data: bytes, path: Path | None = None) -> Run:
    """Parse and check a file's bytes; raise FileFormatError with the reason."""
    name = str(path) if path else "input"
    if not data.strip():
        raise FileFormatError(f"{name} is empty; record a run first with: python extract.py")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        # Python's json.dump writes a NaN or infinite norm as a bare NaN / Infinity, which
        # strict JSON (orjson) refuses: a file of the original project whose gradients blew
        # up is exactly such a file. Python's own parser takes those.
        try:
            doc = json.loads(data, parse_int=_int_as_orjson)
        except _OutOfRange as big:
            raise FileFormatError(f"{name}: {big}; is it a gradviz file?") from big
        except (ValueError, RecursionError) as fault:
            if "unexpected end of data" in str(e) or isinstance(fault, json.JSONDecodeError) and (
                    fault.pos >= len(data.rstrip()) or fault.msg.startswith("Unterminated string")):
                raise FileFormatError(  # (the text stops inside the JSON)
                    f"{name} ends in the middle of its JSON ({e}): it was cut off, as by a "
                    f"copy still running or a full disk (gradviz itself replaces a file "
                    f"whole); copy it again, or record the run again") from e
            raise FileFormatError(f"{name} is not valid JSON ({e}); is it a file gradviz "
                                  f"wrote? Record one with python extract.py") from e
        # orjson refuses an unpaired surrogate escape such as "\ud800" (not Unicode); Python
        # takes it, and the text then fails wherever it is written out (the page, the report)
        if (bad := _lone_surrogate(doc)) is not None:
            raise FileFormatError(
                f"{name}: the text {ascii(bad)[:60]} holds an unpaired surrogate escape "
                f"(\\ud800-\\udfff), which is not Unicode; is it a gradviz file?") from e
    try:
        version = schema.validate(doc)
        return Run(doc, version, path)
    except FileFormatError as e:
        why = str(e)
        if "?" not in why and not isinstance(e, UnknownVersionError):
            why += ("; is it a file gradviz wrote, unedited? Record one with python extract.py")
        raise type(e)(f"{name}: {why}") from e
    except (AttributeError, TypeError, KeyError, ValueError) as e:  # a shape validate missed
        raise FileFormatError(
            f"{name}: unexpected content ({type(e).__name__}: {e}); is it a gradviz file?"
        ) from e


def read_file(path: Path) -> tuple[bytes, os.stat_result]:
    """A recorded file's bytes and the stat of what was read; FileFormatError saying why not.

    Only a regular file is read: a device (/dev/zero), a pipe or a socket would never end or
    never answer.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # (before opening: opening a pipe waits for a writer)
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
            raise FileFormatError(f"{path} is {what}, not a file; pass the path of a "
                                  "training_output.json written by python extract.py")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # (of the file read, even if it is replaced meanwhile)
            if not stat.S_ISREG(st.st_mode):  # (replaced between the two looks)
                raise FileFormatError(f"{path} is not a regular file; pass the path of a "
                                      "training_output.json")
            return f.read(), st
    except FileNotFoundError as e:
        raise FileFormatError(
            f"{path} does not exist; record a run first with: python extract.py"
        ) from e
    except OSError as e:
        raise FileFormatError(f"cannot read {path}: {e.strerror}") from e


def no_layers(run: Run) -> str | None:
    """Why a run has nothing to show (with the fix), or None: a file with no layer at all
    would read as "healthy" and draw an empty page."""
    if run.nodes:
        return None
    where = run.path or "the file"
    return (f"{where} records no layers; record a run with python extract.py or "
            f"gradviz.record(model, path) around a model with parameters")


def load(path: str | os.PathLike[str] = "training_output.json") -> Run:
    """Read a training_output.json written by gradviz (or in the original minimal format)."""
    p = Path(path)
    return parse(read_file(p)[0], p)

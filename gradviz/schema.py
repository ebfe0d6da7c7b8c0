"""The training_output.json format: value encodings and the checks every reader runs.

Shared by the recording half (which writes) and the viewing half (which reads); imports
neither torch nor anything else heavy. ``schema.json`` beside this file is the same format
as a JSON Schema, for other tools and for the tests.

Values: a finite number is a JSON number; NaN, +Inf and -Inf are the strings "NaN",
"Infinity" and "-Infinity" (orjson would write them as null); null means *absent*: no
gradient reached this parameter or layer in that step (unused, detached or frozen), which is
not the same as a gradient of zero.

History series are arrays of little-endian float32 in base64 (5.3 bytes a value, exact,
NaN and Inf kept as themselves); the bit pattern 0xFFFFFFFF marks an absent value.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import FileFormatError, UnknownVersionError

FORMAT_NAME = "gradviz"
FORMAT_VERSION = 1
SERIES_ENCODING = "float32-le-base64"
ABSENT_BITS = 0xFFFFFFFF

NODE_KINDS = ("layer", "module", "junction")
NODE_SERIES = ("gradient_norm", "activation_grad_norm", "input_grad_norm")
# Forward statistics (recorded with activation_stats=True): layer output mean, std, min,
# max, fraction of exact zeros; and, credited to the layer feeding an activation function,
# the fraction of dead ReLU units and of saturated sigmoid/tanh values.
STAT_SERIES = ("act_mean", "act_std", "act_min", "act_max", "act_zero_frac", "dead_frac",
               "saturated_frac", "noise_scale")  # noise_scale: per layer, under DDP

Value = float | None


def order_key(v: Any) -> float:
    """A node's "order" (its place in the forward pass) as a sort key: last if the file
    gives none, or something that is not a number."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
        return float(v)
    return math.inf


def encode_value(x: float | None) -> float | str | None:
    """One number as it is written to JSON: NaN and Inf as strings, absent as null."""
    if x is None:
        return None
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(x)


def safe_repr(v: Any, how: Callable[[Any], str] = repr) -> str:
    """repr (or str) of a value read from a file, which may be nested deeper than repr goes
    (orjson reads 1,024 levels)."""
    try:
        return how(v)
    except RecursionError:
        return f"({type(v).__name__} nested too deep to show)"


def _short(v: Any, limit: int = 60) -> str:
    """A value for an error message: cut short (a file's values can be huge)."""
    text = safe_repr(v)
    return text if len(text) <= limit else f"{text[:limit]}..."


def decode_value(v: Any, where: str = "value") -> Value:
    """Inverse of :func:`encode_value`; raises FileFormatError for anything else."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise FileFormatError(f"{where}: expected a number, got {_short(v)}")
    if isinstance(v, (int, float)):
        return float(v)
    if v == "NaN":
        return math.nan
    if v == "Infinity":
        return math.inf
    if v == "-Infinity":
        return -math.inf
    raise FileFormatError(
        f'{where}: expected a number, null, "NaN", "Infinity" or "-Infinity", got {_short(v)}'
    )


def absent_array(n: int) -> np.ndarray:
    """A float32 array of n absent values."""
    return np.full(n, ABSENT_BITS, dtype="<u4").view("<f4")


def absent_mask(a: np.ndarray) -> np.ndarray:
    """True where a float32 array holds the absent marker."""
    return np.ascontiguousarray(a, dtype="<f4").view("<u4") == ABSENT_BITS


def encode_series(a: np.ndarray) -> str:
    """A float32 series (absent marker included) as base64 text."""
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


_ALPHABET = np.frombuffer(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", dtype=np.uint8)
_PIECE = 1 << 16  # characters mapped at once (np.take makes 8 bytes of each)


def encode_rows(block: np.ndarray) -> np.ndarray:
    """encode_series of each row of a float32 matrix at once, as rows of ASCII bytes.

    Numpy does the work, in place on uint8 arrays, and lets go of Python's GIL while it
    does: a background writer encoding a big history this way hardly holds up the training
    thread, where the standard library's base64 holds the GIL throughout.
    """
    rows, n = block.shape
    raw = np.ascontiguousarray(block, dtype="<f4").view(np.uint8).reshape(rows, 4 * n)
    return _base64_rows(raw)


def _base64_rows(raw: np.ndarray) -> np.ndarray:
    """(rows, n) bytes -> (rows, 4 ceil(n / 3)): each row's standard base64, = padded."""
    rows, n = raw.shape
    full, rem = divmod(n, 3)
    out = np.empty((rows, 4 * (full + (rem > 0))), dtype=np.uint8)
    if full:  # 3 bytes -> 4 six-bit values
        trio = raw[:, : 3 * full].reshape(rows, full, 3)
        b0, b1, b2 = trio[:, :, 0], trio[:, :, 1], trio[:, :, 2]
        quad = out[:, : 4 * full].reshape(rows, full, 4)  # (a view: written in place)
        np.right_shift(b0, 2, out=quad[:, :, 0])
        np.bitwise_or((b0 & 3) << 4, b1 >> 4, out=quad[:, :, 1])
        np.bitwise_or((b1 & 15) << 2, b2 >> 6, out=quad[:, :, 2])
        np.bitwise_and(b2, 63, out=quad[:, :, 3])
    if rem:  # the last 1 or 2 bytes, zero-filled to 3; = below for what was not there
        tail = np.zeros((rows, 3), dtype=np.uint8)
        tail[:, :rem] = raw[:, 3 * full :]
        out[:, 4 * full :] = _six_bits(tail)
    # 0-63 -> A-Z a-z 0-9 + /, a piece at a time: np.take widens each index to 8 bytes
    flat = out.reshape(-1)
    for at in range(0, flat.size, _PIECE):
        np.take(_ALPHABET, flat[at : at + _PIECE], out=flat[at : at + _PIECE])
    if rem:
        out[:, 4 * full + rem + 1 :] = ord("=")
    return out


def _six_bits(trio: np.ndarray) -> np.ndarray:
    """(rows, 3) bytes -> (rows, 4) six-bit values."""
    b0, b1, b2 = trio[:, 0], trio[:, 1], trio[:, 2]
    return np.stack([b0 >> 2, ((b0 & 3) << 4) | (b1 >> 4), ((b1 & 15) << 2) | (b2 >> 6),
                     b2 & 63], axis=1)


def decode_series(text: Any, n: int, where: str) -> np.ndarray:
    """Base64 text back to a float32 array of exactly n values."""
    if not isinstance(text, str):
        raise FileFormatError(f"{where}: expected a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise FileFormatError(f"{where}: not valid base64 ({e})") from e
    if len(raw) != 4 * n:
        raise FileFormatError(
            f"{where}: holds {len(raw) // 4} values but history.steps has {n}; "
            "the file was cut short or edited"
        )
    return np.frombuffer(raw, dtype="<f4").copy()


def check_norm_series(a: np.ndarray, where: str) -> None:
    """A norm series holds no negative value (absent and NaN are fine)."""
    finite = a[~absent_mask(a) & ~np.isnan(a)]
    if finite.size and float(finite.min()) < 0:
        raise FileFormatError(f"{where}: gradient norms cannot be negative, got {finite.min()}")


def series_to_list(a: np.ndarray) -> list[Value]:
    """A decoded float32 series as Python floats, None where absent."""
    mask = absent_mask(a)
    return [None if m else float(x) for x, m in zip(a.tolist(), mask.tolist(), strict=True)]


# -- checks ------------------------------------------------------------------------------


def _fail(msg: str) -> FileFormatError:
    return FileFormatError(msg)


def _norm(v: Any, where: str) -> Value:
    x = decode_value(v, where)
    if x is not None and x < 0:
        raise _fail(f"{where}: gradient norms cannot be negative, got {x}")
    return x


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(f"{where}: expected an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise _fail(f"{where}: expected a list, got {type(v).__name__}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(f"{where}: expected a non-empty string, got {_short(v)}")
    return v


def validate(doc: Any) -> int:
    """Check a parsed file; return its format version (0 for the original minimal format).

    Raises FileFormatError naming the first problem and where it is. The minimal format
    ``{"nodes": [{"id", "gradient_norm"}], "edges": [{"source", "target", "gradient_norm"}]}``
    from the original project is accepted as version 0.
    """
    doc = _obj(doc, "top level")
    if "nodes" not in doc:
        raise _fail('top level: no "nodes" list; is this a gradviz training_output.json?')
    version = 0
    if "format" in doc or "version" in doc:
        if doc.get("format") != FORMAT_NAME:
            raise _fail(f'"format": expected "{FORMAT_NAME}", got {_short(doc.get("format"))}')
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _fail(f'"version": expected a positive integer, got {_short(version)}')
        if version > FORMAT_VERSION:
            raise UnknownVersionError(
                f"format version {version} is newer than this gradviz reads "
                f"({FORMAT_VERSION}); upgrade gradviz-flow"
            )

    ids: set[str] = set()
    for i, node in enumerate(_list(doc["nodes"], '"nodes"')):
        where = f"nodes[{i}]"
        node = _obj(node, where)
        nid = _str(node.get("id"), f"{where}.id")
        if nid in ids:
            raise _fail(f"{where}: duplicate node id {nid!r}; node ids must be unique")
        ids.add(nid)
        if version == 0 and "gradient_norm" not in node:
            raise _fail(f'{where} ({nid}): no "gradient_norm" (a number, or null when the '
                        f'layer had none); is this a gradviz training_output.json?')
        for key in NODE_SERIES:
            if key in node:
                _norm(node[key], f"{where} ({nid}).{key}")
        for key, v in _obj(node.get("stats", {}), f"{where} ({nid}).stats").items():
            if key not in STAT_SERIES:
                raise _fail(f"{where} ({nid}).stats: unknown statistic {key!r}")
            decode_value(v, f"{where} ({nid}).stats.{key}")
        for key in STAT_SERIES:  # (a minimal file may give a statistic beside the norm)
            if key in node:
                decode_value(node[key], f"{where} ({nid}).{key}")
        if node.get("activation") is not None:
            _str(node["activation"], f"{where} ({nid}).activation")
        if version >= 1:
            if node.get("kind") not in NODE_KINDS:
                raise _fail(f"{where} ({nid}).kind: expected one of {NODE_KINDS}, "
                            f"got {_short(node.get('kind'))}")
            _str(node.get("type"), f"{where} ({nid}).type")
            for pname, p in _obj(node.get("params", {}), f"{where} ({nid}).params").items():
                _norm(_obj(p, f"{where} ({nid}).params.{pname}").get("gradient_norm"),
                      f"{where} ({nid}).params.{pname}.gradient_norm")

    edge_ids: set[str] = set()
    for i, edge in enumerate(_list(doc.get("edges", []), '"edges"')):
        where = f"edges[{i}]"
        edge = _obj(edge, where)
        src = _str(edge.get("source"), f"{where}.source")
        dst = _str(edge.get("target"), f"{where}.target")
        for end, name in (("source", src), ("target", dst)):
            if name not in ids:
                raise _fail(f"{where}: {end} {name!r} is not a node id; every edge must join "
                            "two listed nodes")
        if version == 0 and "gradient_norm" not in edge:
            raise _fail(f'{where} ({src} -> {dst}): no "gradient_norm" (a number, or null '
                        f'when no gradient flowed); is this a gradviz training_output.json?')
        _norm(edge.get("gradient_norm"), f"{where} ({src} -> {dst}).gradient_norm")
        if version >= 1:
            eid = _str(edge.get("id"), f"{where}.id")
            if eid in edge_ids:
                raise _fail(f"{where}: duplicate edge id {eid!r}")
            edge_ids.add(eid)

    if version >= 1:
        meta = _obj(doc.get("meta"), '"meta"')
        skipped = meta.get("skipped_steps", [])
        if not (isinstance(skipped, list) and all(_step_number(s) for s in skipped)):
            raise _fail(f"meta.skipped_steps: expected a list of step numbers (integers >= 0), "
                        f"got {_short(skipped)}")
        _validate_history(_obj(doc.get("history"), '"history"'), ids, edge_ids)
    return version


def _step_number(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _validate_history(h: dict[str, Any], ids: set[str], edge_ids: set[str]) -> None:
    if h.get("encoding") != SERIES_ENCODING:
        raise _fail(f'history.encoding: expected "{SERIES_ENCODING}", '
                    f'got {_short(h.get("encoding"))}')
    steps = _list(h.get("steps"), "history.steps")
    if not all(_step_number(s) for s in steps):
        raise _fail("history.steps: expected a list of step numbers (integers >= 0)")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise _fail("history.steps: step numbers must increase")
    n = len(steps)
    decode_series(h.get("loss"), n, "history.loss")
    for nid, series in _obj(h.get("nodes"), "history.nodes").items():
        if nid not in ids:
            raise _fail(f"history.nodes: {nid!r} is not a node id")
        for key, text in _obj(series, f"history.nodes[{nid!r}]").items():
            if key == "params":
                for pname, ptext in _obj(text, f"history.nodes[{nid!r}].params").items():
                    where = f"history.nodes[{nid!r}].params.{pname}"
                    check_norm_series(decode_series(ptext, n, where), where)
            elif key in NODE_SERIES:
                where = f"history.nodes[{nid!r}].{key}"
                check_norm_series(decode_series(text, n, where), where)
            elif key in STAT_SERIES:
                decode_series(text, n, f"history.nodes[{nid!r}].{key}")
            else:
                raise _fail(f"history.nodes[{nid!r}]: unknown series {key!r}")
    for eid, series in _obj(h.get("edges"), "history.edges").items():
        if eid not in edge_ids:
            raise _fail(f"history.edges: {eid!r} is not an edge id")
        text = _obj(series, f"history.edges[{eid!r}]").get("gradient_norm")
        where = f"history.edges[{eid!r}].gradient_norm"
        check_norm_series(decode_series(text, n, where), where)

"""training_output.json: values survive a round trip, files match schema.json, bad files fail."""

from __future__ import annotations

import base64
import json
import math
from importlib import resources

import jsonschema
import numpy as np
import orjson
import pytest

import gradviz
from gradviz import schema, store
from gradviz.errors import FileFormatError, UnknownVersionError

SCHEMA = json.loads(resources.files("gradviz").joinpath("schema.json").read_text())


def validate_against_schema(path) -> None:
    """Every file the project writes must match the published JSON Schema."""
    jsonschema.Draft202012Validator(SCHEMA).validate(orjson.loads(path.read_bytes()))


def _recording(values: list[float | None]) -> store.Recording:
    rec = store.Recording(meta={"model": "Toy"})
    rec.nodes["a"] = {"kind": "layer", "type": "Linear", "param_count": 2,
                      "params": {"weight": {"shape": [2], "numel": 2, "trainable": True}}}
    rec.nodes["b"] = {"kind": "layer", "type": "Linear", "param_count": 0, "params": {}}
    rec.edges["a->b"] = {"source": "a", "target": "b", "via": ["relu"]}
    h = rec.history
    cols = [h.column(("node", "a", "gradient_norm")), h.column(("param", "a", "weight")),
            h.column(("edge", "a->b")), h.column(("loss",))]
    for step, v in enumerate(values):
        present = [(c, v) for c in cols if v is not None]
        h.append(step, [c for c, _ in present], [x for _, x in present])
    return rec


SPECIAL = [0.0, 1.5e-30, 3.25, math.nan, math.inf, None, 1e38, None]


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_nan_inf_zero_and_absent_round_trip(tmp_path) -> None:
    path = tmp_path / "t.json"
    store.write_atomic(path, store.dumps(_recording(SPECIAL).to_document()))
    validate_against_schema(path)
    run = gradviz.load(path)
    want = [None if v is None else float(np.float32(v)) for v in SPECIAL]
    for got_series in (run.node_history("a"), run.param_history("a", "weight"),
                       run.edge_history("a->b"), run.loss):
        assert all(_same(g, w) for g, w in zip(got_series, want, strict=True)), got_series
    # The latest step is absent: top-level values say null, not 0.
    assert run.nodes[0]["gradient_norm"] is None and run.edges[0]["gradient_norm"] is None
    assert run.nodes[1]["gradient_norm"] is None  # never had a value at all


def test_top_level_special_values_are_spelled_out(tmp_path) -> None:
    for value, spelled in ((math.nan, "NaN"), (math.inf, "Infinity")):
        doc = _recording([1.0, value]).to_document()
        assert doc["nodes"][0]["gradient_norm"] == spelled
        assert doc["edges"][0]["gradient_norm"] == spelled
        path = tmp_path / "s.json"
        path.write_bytes(store.dumps(doc))
        validate_against_schema(path)
        got = gradviz.load(path).nodes[0]["gradient_norm"]
        assert _same(got, value)


def test_original_minimal_format_is_a_valid_subset(tmp_path) -> None:
    path = tmp_path / "orig.json"
    path.write_text(json.dumps({
        "nodes": [{"id": "fc1", "gradient_norm": 0.8044}, {"id": "fc2", "gradient_norm": 0.5383}],
        "edges": [{"source": "fc1", "target": "fc2", "gradient_norm": 2.9235}],
    }))
    run = gradviz.load(path)
    assert run.version == 0 and run.edges[0]["gradient_norm"] == 2.9235
    # ...and gradviz's own files keep the original keys at top level.
    doc = _recording([0.5]).to_document()
    assert {"id", "gradient_norm"} <= set(doc["nodes"][0])
    assert {"source", "target", "gradient_norm"} <= set(doc["edges"][0])


def test_large_integers_read_as_orjson_reads_them(tmp_path) -> None:
    """Beyond 64 bits a float, whichever parser reads the file (a bare NaN: Python's)."""
    for nan in (b"0.5", b"NaN"):
        path = tmp_path / "big.json"
        path.write_bytes(b'{"nodes": [{"id": "a", "gradient_norm": 1' + b"0" * 25 + b'}, '
                         b'{"id": "b", "gradient_norm": ' + nan + b'}], "edges": []}')
        norm = gradviz.load(path).nodes[0]["gradient_norm"]
        assert norm == 1e25 and isinstance(norm, float)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"{not json", "not valid JSON.*is it a file gradviz wrote"),
    # cut off (a copy still running): said so, with the fix
    (b'{"nodes": [{"id": "a", "gradient_norm": 1}], "edg', "ends in the middle of its JSON.*"
     "copy it again, or record the run again"),
    (b'{"nodes": [{"id": "a", "gradient_norm": 1}], "edges": [', "ends in the middle"),
    (b"[]", "expected an object, got list; is it a file gradviz wrote, unedited"),
    (b'{"edges": []}', 'no "nodes"'),
    (b'{"nodes": [{"id": "a"}], "edges": []}', 'no "gradient_norm" .a number, or null'),
    (b'{"format": "gradviz", "version": 99, "nodes": []}', "newer than this gradviz"),
    (b'{"nodes": [{"id": "a", "gradient_norm": -1}], "edges": []}', "cannot be negative"),
    (b'{"nodes": [{"id": "a", "gradient_norm": 1}], '
     b'"edges": [{"source": "a", "target": "zz", "gradient_norm": 1}]}', "'zz' is not a node id"),
    (b'{"nodes": [{"id": "a", "gradient_norm": 1}, {"id": "a", "gradient_norm": 2}]}',
     "duplicate node id"),
    # an integer too large for a float (an OverflowError far from the read), also where a
    # bare NaN sends the file to Python's parser, which takes integers of any size
    (b'{"nodes": [{"id": "a", "gradient_norm": 1' + b"0" * 400 + b'}], "edges": []}',
     "is too large for a number"),
    (b'{"nodes": [{"id": "a", "gradient_norm": NaN, "order": 1' + b"0" * 400 + b'}]}',
     "is too large for a number"),
])
def test_bad_files_name_the_problem(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=message) as info:
        gradviz.load(path)
    assert "\n" not in str(info.value)
    if b"99" in content:
        assert isinstance(info.value, UnknownVersionError)


def test_cut_short_history_is_detected(tmp_path) -> None:
    doc = _recording([1.0, 2.0, 3.0]).to_document()
    doc["history"]["steps"] = [0, 1]
    path = tmp_path / "cut.json"
    path.write_bytes(store.dumps(doc))
    with pytest.raises(FileFormatError, match="cut short"):
        gradviz.load(path)


def test_missing_file_says_how_to_make_one(tmp_path) -> None:
    with pytest.raises(FileFormatError, match="python extract.py"):
        gradviz.load(tmp_path / "nope.json")


def test_history_is_compact() -> None:
    """10,000 steps x 500 layers (+1,000 edges) stays small: about 5.3 bytes a value."""
    rec = store.Recording()
    n_steps, n_layers, n_edges = 10_000, 500, 1_000
    for i in range(n_layers):
        rec.nodes[f"l{i}"] = {"kind": "layer", "type": "Linear", "param_count": 1, "params": {}}
    for i in range(n_edges):
        rec.edges[f"e{i}"] = {"source": f"l{i % n_layers}", "target": f"l{(i + 1) % n_layers}",
                              "via": []}
    keys = [("node", f"l{i}", "gradient_norm") for i in range(n_layers)]
    keys += [("edge", f"e{i}") for i in range(n_edges)]
    cols = [rec.history.column(k) for k in keys]
    rng = np.random.default_rng(0)
    for step in range(n_steps):
        rec.history.append(step, cols, rng.random(len(cols), dtype=np.float32))
    data = store.dumps(rec.to_document())
    values = n_steps * len(cols)
    assert len(data) < 5.6 * values  # per-series base64 arrays, not a dict per value
    run = store.parse(data)
    assert len(run.steps) == n_steps
    want = float(rec.history.series(("edge", "e7"))[1234])
    assert run.edge_history("e7")[1234] == pytest.approx(want)


def test_negative_norm_inside_a_history_series_is_refused(tmp_path) -> None:
    rec = _recording([1.0, -2.0])
    path = tmp_path / "neg.json"
    path.write_bytes(store.dumps(rec.to_document()))
    with pytest.raises(FileFormatError, match="cannot be negative"):
        gradviz.load(path)


def test_odd_content_is_a_file_format_error(tmp_path) -> None:
    path = tmp_path / "odd.json"
    path.write_text('{"nodes": [{"id": "a", "gradient_norm": 1, "params": 5}]}')
    with pytest.raises(FileFormatError):
        gradviz.load(path)


def test_recording_without_steps_writes_a_valid_file(tmp_path) -> None:
    rec = _recording([])
    rec.history.column(("node", "b", "gradient_norm"))
    path = tmp_path / "empty.json"
    path.write_bytes(store.dumps(rec.to_document()))
    validate_against_schema(path)
    assert gradviz.load(path).steps == []


def _many_series(steps: int = 2 * store.CHUNK_ROWS + 5, layers: int = 45) -> store.Recording:
    """Over SERIES_AT_ONCE series over several chunks: columns that start late, a parameter
    that never gets one (absent throughout), NaN and inf, and user text that needs escaping."""
    rec = store.Recording(meta={"model": "Toy", "note": 'a "quote", a \\ and \u00fc'})
    rng = np.random.default_rng(0)
    h = rec.history
    for i in range(layers):
        rec.nodes[f"l{i}"] = {
            "kind": "layer", "type": "Linear", "param_count": 6, "order": i,
            "params": {"weight": {"shape": [2, 2], "numel": 4, "trainable": True},
                       "bias": {"shape": [2], "numel": 2, "trainable": True}}}
        if i:
            rec.edges[f"l{i - 1}->l{i}"] = {"source": f"l{i - 1}", "target": f"l{i}", "via": []}
    h.column(("loss",))
    for step in range(steps):
        i = step // 40
        if i < layers and step % 40 == 0:  # layer i's series start at step 40 i
            h.column(("node", f"l{i}", "gradient_norm"))
            h.column(("param", f"l{i}", "weight"))
            if i % 2:
                h.column(("param", f"l{i}", "bias"))  # even layers' biases: never
            if i:
                h.column(("edge", f"l{i - 1}->l{i}"))
        values = np.abs(rng.standard_normal(len(h.columns))).astype(np.float32)
        values[rng.random(len(values)) < 0.01] = np.nan
        values[rng.random(len(values)) < 0.01] = np.inf
        h.append(step, list(h.columns.values()), values)
    return rec


@pytest.mark.parametrize("block", [None, 5 * (2 * store.CHUNK_ROWS + 5), 7])
def test_streamed_write_gives_the_documents_exact_bytes(tmp_path, monkeypatch, block) -> None:
    """store.write streams the step list and the series between the pieces of a skeleton:
    the file must be byte for byte what orjson makes of the whole document, with blocks of
    64 series, of 5 (BLOCK_VALUES), and with every series in pieces of 6 steps."""
    if block is not None:
        monkeypatch.setattr(store, "BLOCK_VALUES", block)
        monkeypatch.setattr(store, "STEPS_AT_ONCE", 100)
    rec = _many_series()
    assert len(rec.history.columns) > 2 * store.SERIES_AT_ONCE
    path = tmp_path / "t.json"
    store.write(path, rec)
    assert path.read_bytes() == store.dumps(rec.to_document())
    validate_against_schema(path)
    run = gradviz.load(path)
    assert run.param_history("l0", "bias") == [None] * len(run.steps)  # absent throughout
    assert run.edge_history("l3->l4")[:160] == [None] * 160  # starts at step 160
    assert run.edge_history("l3->l4")[160] is not None


def test_streamed_write_with_the_placeholder_in_the_users_text(tmp_path, monkeypatch) -> None:
    """The placeholders carry a random nonce; should the user's text contain it, the write
    falls back to the whole document at once, with the same bytes."""
    rec = _many_series(steps=30, layers=3)
    monkeypatch.setattr(store.secrets, "token_hex", lambda n: "Linear")  # in every node
    path = tmp_path / "t.json"
    store.write(path, rec)
    assert path.read_bytes() == store.dumps(rec.to_document())


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 5, 7, 100])
def test_encode_rows_is_base64_of_each_row(steps: int) -> None:
    """The numpy encoder the file writer uses gives the standard library's bytes, whatever
    the length mod 3 (the = padding), for NaN, inf, absent and every other bit pattern."""
    rng = np.random.default_rng(steps)
    block = rng.integers(0, 2**32, size=(9, steps), dtype=np.uint32).view(np.float32)
    if steps:
        block[0, 0], block[1, -1], block[2, 0] = np.nan, np.inf, schema.absent_array(1)[0]
    got = schema.encode_rows(block)
    assert got.dtype == np.uint8 and got.shape[0] == 9
    for row, text in zip(block, got, strict=True):
        assert text.tobytes() == base64.b64encode(row.astype("<f4").tobytes())
        assert schema.encode_series(row) == text.tobytes().decode("ascii")
    assert schema.encode_rows(block[:0]).shape[0] == 0  # no series at all


def test_streamed_write_of_no_steps_and_of_long_runs_of_absent_series(tmp_path) -> None:
    """A block of series may all be absent (frozen layers' parameters), and a recording
    may have no step yet: the same bytes as the whole document, and a file that loads."""
    rec = store.Recording(meta={"model": "Toy"})
    path = tmp_path / "t.json"
    store.write(path, rec)  # nothing at all
    assert path.read_bytes() == store.dumps(rec.to_document())
    for i in range(3 * store.SERIES_AT_ONCE):
        rec.nodes[f"l{i}"] = {"kind": "layer", "type": "Linear", "param_count": 2, "params": {
            "weight": {"shape": [2], "numel": 2, "trainable": False}}}
    col = rec.history.column(("node", "l0", "gradient_norm"))
    store.write(path, rec)  # no step yet
    assert path.read_bytes() == store.dumps(rec.to_document())
    rec.history.append(0, [col], [1.0])  # one series present, 3 blocks of absent weights
    store.write(path, rec)
    assert path.read_bytes() == store.dumps(rec.to_document())
    run = gradviz.load(path)
    assert run.node_history("l0") == [1.0] and run.param_history("l9", "weight") == [None]


def test_a_document_of_a_growing_history_is_consistent(tmp_path) -> None:
    """to_document and save work on a snapshot: a history that gains a step at every read
    (as one that training keeps adding to from another thread) still gives series exactly
    as long as the step list."""
    rec = _many_series(steps=40, layers=4)
    h = rec.history
    cols = list(h.columns.values())

    def grow() -> None:  # a step more at every read
        h.before_read = None
        h.append(h._steps[-1] + 1, cols, np.ones(len(cols), dtype=np.float32))
        h.before_read = grow

    h.before_read = grow
    run = store.parse(store.dumps(rec.to_document()))  # (parse checks every length)
    assert len(run.steps) > 40 and len(run.loss) == len(run.steps)
    path = tmp_path / "t.json"
    store.save(path, rec)
    validate_against_schema(path)
    assert len(gradviz.load(path).steps) > len(run.steps)

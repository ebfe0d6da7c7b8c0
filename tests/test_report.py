"""Findings outside extract.py: visualize.py --report, and the viewer diagnosing files that
gradviz.record wrote without findings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import gradviz
from gradviz import train
from gradviz.graph import build_graph

ROOT = Path(__file__).resolve().parent.parent


def report(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "visualize.py"), "--report", "--input",
                           str(path)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runs")
    out = {}
    for name, steps in (("deep-sigmoid", 40), ("mlp", 60)):
        out[name] = d / f"{name}.json"
        train.train(name, steps=steps, output=out[name], device="cpu", progress=False)
    return out


def test_report_exits_1_on_a_critical_finding(files) -> None:
    assert gradviz.load(files["deep-sigmoid"]).findings == []  # record() alone writes none
    out = report(files["deep-sigmoid"])
    assert out.returncode == 1
    assert out.stdout.startswith("CRITICAL vanishing")
    assert "layers.0" in out.stdout and "try: " in out.stdout


def test_report_exits_0_when_healthy(files) -> None:
    out = report(files["mlp"])
    assert out.returncode == 0
    assert out.stdout.strip() == "gradient flow looks healthy: no findings"


def test_report_on_a_bad_file_is_one_line_and_2(tmp_path) -> None:
    out = report(tmp_path / "missing.json")
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_viewer_diagnoses_a_file_without_findings(files) -> None:
    g = build_graph(gradviz.load(files["deep-sigmoid"]))
    findings = g.graph["findings"]
    assert findings and findings[0]["kind"] == "vanishing"
    assert "layers.0" in findings[0]["layers"]


def test_report_reads_hand_edited_findings(files, tmp_path) -> None:
    # a file's findings are data from anywhere: odd ones are reduced, never a traceback
    # (exit 1 would read as "a critical finding" in CI)
    import orjson

    doc = orjson.loads(files["mlp"].read_bytes())
    for findings, code, first in (
            ([{"kind": "x"}], 0, "INFO     x"),
            ([{"kind": "nan", "severity": "critical", "layers": ["fc1", 3], "steps": [4],
               "message": "m", "suggestions": "no list"}], 1,
             "CRITICAL nan         fc1 (step 4): m"),
            ("oops", 0, "gradient flow looks healthy")):
        doc["findings"] = findings
        path = tmp_path / "edited.json"
        path.write_bytes(orjson.dumps(doc))
        out = report(path)
        assert out.returncode == code and out.stderr == "", (findings, out.stderr)
        assert out.stdout.startswith(first), out.stdout


def test_odd_layer_orders_are_diagnosed(files, tmp_path) -> None:
    import orjson

    doc = orjson.loads(files["deep-sigmoid"].read_bytes())
    for node, order in zip(doc["nodes"], ["first", None, True, float("nan")], strict=False):
        node["order"] = order  # sorted last, not compared with the numbers
    path = tmp_path / "orders.json"
    path.write_bytes(orjson.dumps(doc))
    out = report(path)
    assert out.stderr == "" and out.returncode == 1
    assert out.stdout.startswith("CRITICAL vanishing")


def test_report_on_values_the_diagnosis_reads(files, tmp_path) -> None:
    # each of these was a traceback (exit 1, read as "critical" in CI) from inside diagnose
    import orjson

    doc = orjson.loads(files["mlp"].read_bytes())
    path = tmp_path / "edited.json"
    doc["meta"]["skipped_steps"] = 5
    path.write_bytes(orjson.dumps(doc))
    out = report(path)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.strip().splitlines() == [
        f"visualize.py: {path}: meta.skipped_steps: expected a list of step numbers "
        "(integers >= 0), got 5; is it a file gradviz wrote, unedited? Record one with "
        "python extract.py"]
    # metadata nested deeper than repr goes (orjson reads 1,024 levels): shown, not a crash
    doc["meta"]["skipped_steps"] = []
    deep = b"[" * 1000 + b"]" * 1000
    path.write_bytes(orjson.dumps(doc).replace(b'"meta":{', b'"meta":{"deep":' + deep + b",", 1))
    out = report(path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.strip() == "gradient flow looks healthy: no findings"


def test_report_names_the_activations_of_saturated_layers(tmp_path) -> None:
    from gradviz import store

    nodes = {nid: {"kind": "layer", "type": "Linear", "order": i, "params": {},
                   "activation": act} for i, (nid, act) in enumerate(
                       [("a", "Sigmoid"), ("b", None), ("c", "Tanh")])}
    rec = store.Recording(nodes=nodes)
    cols = [rec.history.column(("node", nid, key)) for nid in nodes
            for key in ("gradient_norm", "saturated_frac")]
    for step in range(4):
        rec.history.append(step, cols, [0.5, 0.9] * 3)
    path = tmp_path / "saturated.json"
    path.write_bytes(store.dumps(rec.to_document()))
    out = report(path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("WARNING  saturation  a, b, c (steps 0-3): 90% of the "
                                 "Sigmoid/Tanh/sigmoid/tanh outputs after a"), out.stdout


def test_report_before_the_first_step_says_so(tmp_path) -> None:
    # a run that failed before its first rec.step() leaves its layers and no step: that is
    # neither "healthy" nor "no gradient reached these layers" (which it said, at step 0)
    import torch

    path = tmp_path / "early.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        with gradviz.record(torch.nn.Sequential(torch.nn.Linear(2, 2)), path):
            raise RuntimeError("out of memory")
    run = gradviz.load(path)
    assert run.steps == [] and [n["id"] for n in run.nodes] == ["0"]
    assert gradviz.diagnose(run) == []
    out = report(path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"visualize.py: {path} has no recorded steps: the run stopped before its first "
        "rec.step(), or has not reached it yet; report once it has"]

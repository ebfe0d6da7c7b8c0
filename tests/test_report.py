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

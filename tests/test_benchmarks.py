"""The benchmark scripts run (with --quick, small sizes): their timings are not tested here.

Their results, measured on a full run, are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize(
    ("script", "words"),
    [
        ("overhead.py", ["| model", "gradviz every=10", "GradientMonitor", "naive hook",
                         "target"]),
        ("memory.py", ["history row", "own size", "writing the file"]),
        ("file_io.py", ["write: store.write, streamed", "read: parse", "/api/graph",
                        "store.write (streamed)"]),
        ("viewer.py", ["| --depth", "server build s", "| full", "| 2 "]),
        ("diagnose.py", ["| run", "healthy (no findings)", "diagnose s"]),
    ],
)
def test_benchmark_runs(script: str, words: list[str]) -> None:
    r = run(script, "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    for w in words:
        assert w in r.stdout, (w, r.stdout[-2000:])


@pytest.mark.parametrize("script", ["overhead.py", "memory.py", "file_io.py", "viewer.py",
                                    "diagnose.py", "gpu_copy.py"])
def test_benchmark_help(script: str) -> None:
    r = run(script, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "--quick" in r.stdout


def test_gpu_copy_runs_or_says_it_needs_cuda() -> None:
    import torch

    r = run("gpu_copy.py", "--quick")
    if torch.cuda.is_available():
        assert r.returncode == 0, r.stderr[-3000:]
        cells = [[c.strip() for c in line.split("|")[1:-1]]
                 for line in r.stdout.splitlines() if line.startswith("|")]
        assert cells[0][-1] == "gradviz, blocking copy"
        assert [row[0] for row in cells[2:]] == ["64", "4096"]
    else:
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.strip().splitlines() == [
            "gpu_copy.py: no CUDA device here (torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU"]


def test_overhead_batch_size() -> None:
    r = run("overhead.py", "--quick", "--models", "cnn", "--batch", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 3x32x32, batch 3 |" in r.stdout
    r = run("overhead.py", "--batch", "0")
    assert r.returncode == 2 and "--batch must be at least 1, not 0" in r.stderr


def test_overhead_profile_and_scaling_run() -> None:
    r = run("overhead.py", "--profile", "mlp", "--profile-steps", "20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "capture.py" in r.stdout
    r = run("overhead.py", "--scaling", "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "added us per layer" in r.stdout

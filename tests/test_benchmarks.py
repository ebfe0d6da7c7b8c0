"""The benchmark scripts run (with --quick, small sizes): their timings are not tested here.

Their results, measured on a full run, are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300,
                          env=None if env is None else {**os.environ, **env})


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
                                    "diagnose.py", "gpu_copy.py", "floor.py"])
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


def test_overhead_some_conditions_only() -> None:
    r = run("overhead.py", "--quick", "--conditions", "gradviz every=10", "bare again")
    assert r.returncode == 0, r.stderr[-3000:]
    header = next(line for line in r.stdout.splitlines() if line.startswith("| model "))
    assert [c.strip() for c in header.split("|")[1:-1]] == [
        "model", "bare ms/step", "bare again", "gradviz every=10"]
    r = run("overhead.py", "--conditions", "nope")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


def test_overhead_in_several_processes_gives_each_targets_median() -> None:
    r = run("overhead.py", "--quick", "--conditions", "bare again", "gradviz every=10",
            "--processes", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    noise = next(line for line in r.stdout.splitlines() if " bare again |" in line)
    cells = [c.strip() for c in noise.split("|")[1:-1]]
    assert len(cells[2].split()) == 2 and cells[5:] == ["-", "-"]  # (no target of its own)
    row = next(line for line in r.stdout.splitlines() if "| gradviz every=10" in line)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == "mlp" and len(cells[2].split()) == 2  # (one ratio per process)
    ratios = sorted(float(v) for v in cells[2].split())
    assert float(cells[3][:-1]) == pytest.approx(sum(ratios) / 2, abs=1e-3)  # the median
    assert float(cells[4][:-1]) == ratios[-1] and cells[5] == "1.01x"
    assert r.stderr.count("process ") == 2
    r = run("overhead.py", "--processes", "0")
    assert r.returncode == 2 and "--processes must be at least 1" in r.stderr
    r = run("overhead.py", "--cycle", "mlp", "--processes", "2")
    assert r.returncode == 2 and "not with --profile, --cycle" in r.stderr


def test_overhead_profile_and_scaling_run() -> None:
    r = run("overhead.py", "--profile", "mlp", "--profile-steps", "20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "capture.py" in r.stdout
    r = run("overhead.py", "--scaling", "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "added us per layer" in r.stdout


def test_overhead_cycle_times_each_step_of_every_10() -> None:
    r = run("overhead.py", "--cycle", "mlp", "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].split("|")[1:-1] == [
        f" {c} " for c in ("step of the cycle", "forward us", "backward us", "rec.step() us",
                           "optimizer us", "total us", "bare again us")]
    steps = [line.split("|")[1].strip() for line in lines[1:]]
    assert steps == [str(i) for i in range(10)]
    assert "gradviz every=10 adds" in r.stdout and " recorder). Each cell" in r.stdout
    r = run("overhead.py", "--cycle", "mlp", "--cycle-rounds", "0")
    assert r.returncode == 2 and "--cycle-rounds must be at least 1, not 0" in r.stderr


def _floor_table(out: str) -> dict[str, str]:
    """floor.py's one model row, by column."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header, row = ([c.strip() for c in line.split("|")[1:-1]] for line in (lines[0], lines[2]))
    return dict(zip(header, row, strict=True))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="no C++ compiler to build the C++ floor")
def test_floor_builds_its_cpp_floor_and_checks_every_floor(tmp_path: Path) -> None:
    # A fresh cache: the C++ floor is compiled here (about 20 s). The run exits non-zero
    # if any floor's last row differs from gradviz's history, so returncode 0 is the check.
    # A lock left by a killed build (an hour old) must not make it wait forever.
    from gradviz import native

    _, folder = native.folder_for("floor", ROOT / "benchmarks" / "floor_native.cpp")
    folder = tmp_path / "gradviz" / folder.name
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    os.utime(folder / "lock", (time.time() - 3600, time.time() - 3600))
    r = run("floor.py", "--quick", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "C++ floor ready" in r.stderr
    row = _floor_table(r.stdout)
    assert row["model"].startswith("mlp: MLP 784-256-128-64-10")
    for cond in ("bare again", "gradviz", "root hook", "Python floor", "C++ floor",
                 "C++, loop norms", "C++, no norms"):
        assert row[cond].endswith(")") and "x (" in row[cond], (cond, row)
        if cond != "bare again":
            int(row[f"{cond} us"])  # a signed whole number of microseconds
    _check_loop_norm(tmp_path)


def _check_loop_norm(cache: Path) -> None:
    """The loop floor's norm is torch's, on sizes the benchmark's models do not reach."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import floor
    finally:
        sys.path.remove(str(BENCH))
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)  # (the build the run just made)
    try:
        native = floor.build_native()
    finally:
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old
    torch.manual_seed(0)
    cases = [torch.randn(n) * s for n in (1, 1023, 1024, 1025, 5000, 200_000)
             for s in (1e-20, 1.0, 1e6)]
    cases += [torch.randn(64, 100).t(),  # not contiguous: torch's own op
              torch.randn(3000).half()]
    for t in cases:
        torch_op = float(torch.linalg.vector_norm(t, dtype=torch.float32))
        assert native.norm(t, floor.MODES["C++ floor"]) == torch_op
        exact = float(torch.linalg.vector_norm(t.double()))
        assert native.norm(t, floor.MODES["C++, loop norms"]) == pytest.approx(exact, rel=1e-6)
        assert native.norm(t, floor.MODES["C++, no norms"]) == 0.0
    for bad, check in ((float("nan"), math.isnan), (float("inf"), math.isinf)):
        t = torch.ones(3000)
        t[2500] = bad
        assert check(native.norm(t, floor.MODES["C++, loop norms"]))


def test_floor_without_a_compiler_says_so_in_one_line(tmp_path: Path) -> None:
    r = run("floor.py", "--quick", env={"XDG_CACHE_HOME": str(tmp_path), "CXX": "/bin/false"})
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "could not be built" in line]
    assert len(said) == 1 and said[0].startswith(
        "floor.py: the C++ floor could not be built: CalledProcessError: ")
    assert "Traceback" not in r.stderr
    row = _floor_table(r.stdout)
    assert not [c for c in row if c.startswith("C++")], row
    assert "x (" in row["Python floor"]


def test_floor_names_the_compilers_first_error(tmp_path: Path) -> None:
    cxx = tmp_path / "cxx"  # a compiler that fails on the source, as a broken header would
    cxx.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in *.cpp) '
                   'echo "$a:3:1: error: no such header" >&2; exit 1;; esac; done\n'
                   'exec c++ "$@"\n')
    cxx.chmod(0o755)
    r = run("floor.py", "--quick", env={"XDG_CACHE_HOME": str(tmp_path), "CXX": str(cxx)})
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "could not be built" in line]
    assert len(said) == 1 and "floor_native.cpp:3:1: error: no such header (build folder " \
        in said[0], said


@pytest.mark.parametrize("flag", ["--rounds", "--blocks", "--warmup", "--threads"])
def test_floor_rejects_counts_below_one(flag: str) -> None:
    r = run("floor.py", flag, "0", "--no-native")
    assert r.returncode == 2 and f"{flag} must be at least 1, not 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_floor_check_rejects_a_floor_that_measured_something_else() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import floor
    finally:
        sys.path.remove(str(BENCH))

    class Fake:
        missed = 0

        def __init__(self, values: list[float]) -> None:
            self.values = values

        def last(self) -> list[float]:
            return self.values

    floor.check("m", "c", Fake([2.0, 1.0, 3.0]), [1.0, 2.0, 3.0])  # order does not matter
    for values in ([1.0, 2.0], [1.0, 2.0, 3.001]):
        with pytest.raises(SystemExit, match="other values than gradviz"):
            floor.check("m", "c", Fake(values), [1.0, 2.0, 3.0])
    floor.check("m", "C++, loop norms", Fake([1.0, 2.0001, 3.0]), [1.0, 2.0, 3.0])
    with pytest.raises(SystemExit, match="other values than gradviz"):
        floor.check("m", "C++, loop norms", Fake([1.0, 2.01, 3.0]), [1.0, 2.0, 3.0])
    missed = Fake([1.0, 2.0, 3.0])
    missed.missed = 1
    with pytest.raises(SystemExit, match="1 passes missed"):
        floor.check("m", "c", missed, [1.0, 2.0, 3.0])

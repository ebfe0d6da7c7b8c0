"""extract.py as a user runs it: defaults, flags, errors, interruptions."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from test_schema import validate_against_schema

import gradviz
from gradviz import demos, store, train

ROOT = Path(__file__).resolve().parent.parent
EXTRACT = str(ROOT / "extract.py")


def run_extract(*args: str, cwd: Path | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, EXTRACT, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_models_and_flags() -> None:
    out = run_extract("--help")
    assert out.returncode == 0
    for word in ["--model", "--steps", "--batch-size", "--lr", "--optimizer", "--seed",
                 "--every", "--output", "--device", "--all-modules", "--amp", "--accumulate",
                 *demos.DEMOS]:
        assert word in out.stdout, word


def test_default_demo_learns_and_reports_in_the_original_words(tmp_path) -> None:
    out = run_extract("--steps", "150", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "training_output.json"
    validate_against_schema(path)
    run = gradviz.load(path)
    assert [n["id"] for n in run.nodes] == ["fc1", "fc2", "fc3"]
    assert len(run.steps) == 150
    losses = run.loss
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)  # the model really learns
    for name in ["fc1.weight", "fc1.bias", "fc2.weight", "fc3.bias"]:
        assert re.search(rf"^{re.escape(name)} gradient norm: \d+\.\d{{4}}$", out.stdout, re.M)
    assert "training_output.json" in out.stdout
    # Running again keeps the first file instead of overwriting it.
    again = run_extract("--steps", "2", cwd=tmp_path)
    assert again.returncode == 0
    assert "training_output.1.json" in again.stderr
    assert len(gradviz.load(tmp_path / "training_output.1.json").steps) == 150


@pytest.mark.parametrize("name", list(demos.DEMOS))
def test_every_demo_writes_a_valid_file(tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.json"
    result = train.train(name, steps=3, batch_size=8, output=path, device="cpu")
    validate_against_schema(path)
    run = gradviz.load(path)
    assert run.steps == [0, 1, 2] and result.steps == 3
    assert run.meta["demo"] == name and run.meta["optimizer"] == "Adam"
    assert run.edges, "a demo model without edges"
    layer_norms = [n["gradient_norm"] for n in run.nodes
                   if n["kind"] == "layer" and n["id"] != "aux"]  # aux: the unused layer
    assert all(v is not None for v in layer_norms)


def test_findings_are_printed_and_written_into_the_file(tmp_path) -> None:
    out = run_extract("--model", "deep-sigmoid", "--steps", "40", "--noise-scale", "--hessian",
                      "--covariance", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^CRITICAL vanishing +layers\.0", out.stdout, re.M)
    assert "try: " in out.stdout
    path = tmp_path / "training_output.json"
    validate_against_schema(path)
    run = gradviz.load(path)
    assert run.findings[0]["kind"] == "vanishing" and run.findings[0]["layers"][0] == "layers.0"
    analyses = run.meta["analyses"]
    assert set(analyses) == {"noise_scale", "hessian", "covariance"}
    assert "B_simple" in out.stdout and "top eigenvalue" in out.stdout
    healthy = run_extract("--steps", "30", "--output", "h.json", "--no-stats", cwd=tmp_path)
    assert "gradient flow looks healthy" in healthy.stdout
    history = orjson.loads((tmp_path / "h.json").read_bytes())["history"]
    assert "dead_frac" not in history["nodes"]["fc1"]


def test_amp_and_accumulation(tmp_path) -> None:
    path = tmp_path / "amp.json"
    train.train("resnet", steps=3, batch_size=8, output=path, device="cpu", amp=True,
                accumulate=2)
    validate_against_schema(path)
    run = gradviz.load(path)
    assert run.steps == [0, 1, 2]  # one record per optimizer step, not per micro-batch
    assert run.meta["amp"] == "bfloat16" and run.meta["accumulate"] == 2
    assert all(n["gradient_norm"] < 100 for n in run.nodes if n["kind"] == "layer")


def test_all_modules_makes_activations_nodes(tmp_path) -> None:
    result = train.train("cnn", steps=1, output=None, device="cpu", all_modules=True)
    kinds = {n["id"]: n["kind"] for n in result.run.nodes}
    assert kinds["pool"] == "module" and kinds["act"] == "module" and kinds["conv1"] == "layer"
    edges = {(e["source"], e["target"]) for e in result.run.edges}
    assert ("conv1", "act") in edges and ("flatten", "fc") in edges


def test_same_seed_same_numbers(tmp_path) -> None:
    docs = []
    for i in range(2):
        path = tmp_path / f"r{i}.json"
        train.train("residual", steps=4, seed=3, output=path, device="cpu")
        doc = orjson.loads(path.read_bytes())
        doc["meta"].pop("started")
        docs.append(doc)
    assert docs[0] == docs[1]
    path = tmp_path / "other.json"
    train.train("residual", steps=4, seed=4, output=path, device="cpu")
    assert orjson.loads(path.read_bytes())["history"] != docs[0]["history"]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--model", "nope"], "invalid choice: 'nope'"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--every", "abc"], "invalid int value"),
    (["--output", "."], "is a directory"),
    (["--device", "tpu9"], "is not a device"),
    (["--dead-above", "1.5"], "--dead-above must be above 0 and at most 1"),
    (["--jump-above", "0.5"], "--jump-above is a factor"),
    (["--vanish-below", "100", "--explode-above", "10"], "must be below --explode-above"),
    (["--fsdp"], "--fsdp shards the model over processes: add --nproc"),
    (["--lr", "1e300"], "--lr must be a positive number"),
    (["--seed", "18446744073709551616"], "--seed must fit in 64 bits"),  # 2**64
    # checked before torchrun starts: one line, not one traceback per process
    (["--nproc", "2", "--steps", "0"], "--steps must be at least 1"),
    (["--nproc", "2", "--batch-size", "3"], "does not split over 2 processes"),
    (["--nproc", "2", "--output", "nodir/x.json"], "nodir does not exist"),  # (it hung)
    (["--nproc", "2", "--device", "foo"], "is not a device"),  # (once, not once per rank)
    (["--output", "newdir/"], "names a folder"),  # (it wrote a file called newdir)
    (["--output", ""], "--output is empty"),
    (["--output", "x" * 300 + ".json"], "pass a shorter file name"),  # (a traceback)
])
def test_bad_flags_get_one_clear_line(tmp_path, args: list[str], message: str) -> None:
    out = run_extract(*args, "--steps" if "--steps" not in args else "--seed", "2", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_an_output_folder_that_is_missing_is_said_before_training(tmp_path) -> None:
    out = run_extract("--output", "nodir/run.json", "--steps", "2", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "extract.py: cannot record to nodir/run.json: nodir does not exist; create it or "
        "pass a path in a writable folder"], out.stderr
    assert "step" not in out.stdout  # (no training ran)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX pipes")
def test_an_output_that_is_not_a_file_is_left_alone(tmp_path) -> None:
    # (a pipe stands in for /dev/null, which the recorder once moved aside and replaced)
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)
    out = run_extract("--output", str(pipe), "--steps", "2", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"extract.py: {pipe} is not a regular file (a device, pipe or socket); "
        f"pass a file path to record to"], out.stderr
    assert pipe.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe.json"]


def test_running_out_of_memory_names_the_batch_size_and_keeps_the_file(tmp_path) -> None:
    # 10**12 samples: no machine has the memory, so the first allocation fails at once
    out = run_extract("--batch-size", str(10**12), "--steps", "2", "--no-progress",
                      cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extract.py: out of memory at step 0 with "
                                                   f"--batch-size {10**12} ("), out.stderr
    assert lines[0].endswith("); try a smaller --batch-size")
    validate_against_schema(tmp_path / "training_output.json")  # (written, with no step)


def test_an_analysis_that_fails_leaves_the_run_and_its_diagnosis(tmp_path, monkeypatch
                                                                  ) -> None:
    import extract
    from gradviz import analyses

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("derivative for aten::something is not implemented\nmore")

    monkeypatch.setattr(analyses, "top_hessian_eigenvalue", fails)
    path = tmp_path / "run.json"
    result = train.train("mlp", steps=3, output=path, device="cpu", progress=False,
                         analyses=("hessian", "covariance"))
    got = orjson.loads(path.read_bytes())["meta"]["analyses"]
    assert got["hessian"] == {"error": "derivative for aten::something is not implemented"}
    assert got["covariance"]["batches"] == 8  # (the others still ran)
    assert result.steps == 3 and len(result.run.steps) == 3
    assert extract.analysis_line("hessian", got["hessian"]) == (
        "not computed: derivative for aten::something is not implemented")


def test_ctrl_c_during_the_analyses_keeps_the_trained_run(tmp_path, monkeypatch) -> None:
    from gradviz import analyses

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(analyses, "gradient_noise_scale", interrupted)
    path = tmp_path / "run.json"
    result = train.train("mlp", steps=3, output=path, device="cpu", progress=False,
                         analyses=("noise_scale",))
    assert result.interrupted and result.steps == 3
    doc = orjson.loads(path.read_bytes())
    assert "analyses" not in doc["meta"] and doc["history"]["steps"] == [0, 1, 2]


def test_hessian_of_the_transformer_demo(tmp_path) -> None:
    # torch's CPU attention kernel has no double backward: this ended in a traceback
    out = run_extract("--model", "transformer", "--steps", "2", "--hessian", "--no-progress",
                      cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^hessian: top eigenvalue -?[\d.]+(e[-+]\d+)? after \d+ iterations",
                     out.stdout, re.M), out.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_run_stopped_mid_way_leaves_a_valid_file(tmp_path, sig: int) -> None:
    path = tmp_path / "training_output.json"
    proc = subprocess.Popen([sys.executable, EXTRACT, "--steps", "1000000", "--no-progress"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert path.exists(), "no file written while training"
        time.sleep(3)  # past the first periodic flush
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    validate_against_schema(path)
    run = gradviz.load(path)
    assert len(run.steps) >= 2
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written temporary file left
    if sig in (signal.SIGINT, signal.SIGTERM):  # (SIGTERM once lost the steps since the
        # last periodic write; now it ends the run as Ctrl-C does)
        how, code = ("interrupted", 130) if sig == signal.SIGINT else ("terminated", 143)
        assert proc.returncode == code, err
        assert "Traceback" not in err
        done = int(re.search(rf"{how} after (\d+) steps", err).group(1))
        assert run.steps[-1] + 1 >= done  # every completed step is in the file


def test_a_long_output_name_that_fits_is_written(tmp_path) -> None:
    """A name near the folder's limit (255 bytes): the periodic writes' temporary file beside
    it was ".NAME.PID.TID.tmp", too long, so every write failed and the whole run was lost."""
    name = "x" * 240 + ".json"
    out = run_extract("--output", name, "--steps", "3", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "could not write" not in out.stderr
    assert len(gradviz.load(tmp_path / name).steps) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # (no temporary file left)


def test_a_disk_that_fails_at_the_end_keeps_the_run(tmp_path, monkeypatch, capsys) -> None:
    """The final write failing (a full disk) raised out of the recorder's with block, a
    traceback after the whole training: the run is written to the temporary folder instead,
    and extract.py says where (exit code 1)."""
    import errno
    import tempfile

    import extract

    target, rescued = tmp_path / "run.json", tmp_path / "tmp"
    rescued.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescued))
    real_write = store.write

    def full_disk(path: Path, rec: store.Recording) -> None:
        if Path(path) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, rec)

    monkeypatch.setattr(store, "write", full_disk)
    with pytest.warns(RuntimeWarning, match="could not write .*run.json at the end of the "
                      "block .*every recorded step is still in memory"):
        code = extract.main(["--steps", "4", "--output", str(target), "--no-progress"])
    assert code == 1 and not target.exists()
    kept = rescued / f"run.rescued-{os.getpid()}.json"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"extract.py: could not write {target} (No space left on device); "
                       f"the run was written to {kept} instead")
    assert gradviz.load(kept).steps == [0, 1, 2, 3]


@pytest.mark.skipif(not Path("/proc/version").is_file(), reason="needs Linux's /proc")
def test_an_output_that_cannot_be_moved_aside_is_one_line(tmp_path) -> None:
    """The earlier file could not be renamed to NAME.1.json (a file bind-mounted into a
    container, or in /proc): a traceback from os.replace."""
    out = run_extract("--steps", "2", "--output", "/proc/version", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        "extract.py: cannot keep the earlier /proc/version by renaming it to version.N: No "
        "such file or directory; record to a path in a folder you can write to (--output), "
        "or move the file away first"]


def test_a_busy_earlier_file_is_left_alone_and_refused(tmp_path, monkeypatch) -> None:
    """os.replace fails with EBUSY on a bind-mounted file: the recorder refuses in one line,
    the earlier file stays as it was, and the path is free for another recorder."""
    import errno

    import torch

    import gradviz
    from gradviz.errors import RecordingError

    path = tmp_path / "run.json"
    path.write_text("earlier")

    def busy(src, dst):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", busy)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RecordingError, match="Device or resource busy; record to a path"):
        with gradviz.record(model, path):
            pass
    monkeypatch.undo()
    assert path.read_text() == "earlier"
    with gradviz.record(model, path) as rec:  # (the path was released)
        model(torch.ones(1, 2)).sum().backward()
        rec.step()
    assert (tmp_path / "run.1.json").read_text() == "earlier"


def test_the_vanishing_threshold_goes_into_the_file_for_the_viewer(tmp_path) -> None:
    """The page paints edges red below the run's own --vanish-below, not a fixed 1e-7."""
    out = run_extract("--steps", "2", "--no-progress", "--vanish-below", "1e-4",
                      "--output", "run.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = orjson.loads((tmp_path / "run.json").read_bytes())
    assert doc["meta"]["vanish_below"] == 1e-4
    validate_against_schema(tmp_path / "run.json")

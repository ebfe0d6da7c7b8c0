"""visualize.py as a user runs it: exit codes, one-line errors, --export, the server, no torch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "visualize.py"


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def write(tmp_path: Path, content: bytes | object, name: str = "bad.json") -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else orjson.dumps(content))
    return p


NODE = {"id": "a", "gradient_norm": 0.5}


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", ["is empty", "extract.py"]),
        (b"   \n", ["is empty"]),
        (b"{not json", ["not valid JSON"]),
        (b"\xff\xfe", ["not valid JSON"]),
        ([1, 2, 3], ["top level", "expected an object"]),
        ({"edges": []}, ['no "nodes" list']),
        ({"nodes": "x"}, ['"nodes"', "expected a list"]),
        ({"format": "gradviz", "version": 99, "nodes": []}, ["version 99", "upgrade"]),
        ({"nodes": [{"id": "a", "gradient_norm": -1}]}, ["cannot be negative", "-1"]),
        (
            {"nodes": [NODE], "edges": [{"source": "a", "target": "ghost", "gradient_norm": 1}]},
            ["'ghost' is not a node id"],
        ),
        ({"nodes": [NODE, NODE]}, ["duplicate node id 'a'"]),
        ({"nodes": [{"id": "a", "gradient_norm": "lots"}]}, ["expected a number"]),
        ({"nodes": [{"id": "a", "gradient_norm": 1, "params": 5}]}, ["unexpected content"]),
        # fields the diagnosis reads: checked when the file is read, not a traceback later
        ({"nodes": [{"id": "a", "gradient_norm": 1e-9, "activation": ["Sigmoid"]}]},
         ["(a).activation", "expected a non-empty string"]),
        ({"nodes": [{"id": "a", "gradient_norm": 1, "dead_frac": "high"}]},
         ["(a).dead_frac", "expected a number", "'high'"]),
        # an unpaired surrogate: Python's parser takes it, orjson (the page) cannot write it
        (b'{"nodes": [{"id": "a\\ud800", "gradient_norm": 1}]}', ["unpaired surrogate"]),
        (b'{"nodes": [{"id": "a", "gradient_norm": ' + b"[" * 1000 + b"]" * 1000 + b"}]}",
         ["(a).gradient_norm", "nested too deep"]),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, content: object, words: list[str]) -> None:
    p = write(tmp_path, content)
    assert_one_line_error(run("--input", p, "--export", tmp_path / "out.html"), "bad.json", *words)
    assert not (tmp_path / "out.html").exists()


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert_one_line_error(run("--input", tmp_path / "nope.json"), "does not exist", "extract.py")
    assert_one_line_error(run("--input", tmp_path), "is a directory")


def test_a_device_or_pipe_is_refused_not_read(tmp_path: Path) -> None:
    # /dev/zero was read until memory ran out; a pipe with no writer waited forever
    pipe = tmp_path / "run.fifo"
    os.mkfifo(pipe)
    for path in (Path("/dev/zero"), pipe):
        r = run("--input", path, "--report", timeout=20)
        assert_one_line_error(r, str(path), "a device, pipe or socket", "training_output.json")
        assert_one_line_error(run("--input", path, "--port", "0", timeout=20), "not a file")


def test_bare_nan_and_infinity_as_python_json_writes_them(tmp_path: Path) -> None:
    # json.dump (the original project's writer) spells NaN and inf so; strict JSON does not
    p = write(tmp_path, b'{"nodes": [{"id": "fc1", "gradient_norm": NaN}, '
                        b'{"id": "fc2", "gradient_norm": Infinity}], '
                        b'"edges": [{"source": "fc1", "target": "fc2", "gradient_norm": 0.5}]}',
              "python.json")
    r = run("--input", p, "--report")
    assert r.returncode == 1, r.stderr  # critical: non-finite gradients
    assert "non-finite" in r.stdout and "fc1" in r.stdout
    # still not JSON: a lower-case nan, and -Infinity as a norm, each named
    assert_one_line_error(run("--input", write(tmp_path, b'{"nodes": [{"id": "a", '
                                                         b'"gradient_norm": nan}]}'),
                              "--report"), "bad.json", "not valid JSON")
    assert_one_line_error(run("--input", write(tmp_path, b'{"nodes": [{"id": "a", '
                                                         b'"gradient_norm": -Infinity}]}'),
                              "--report"), "cannot be negative")


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--threshold", "-1"], ["--threshold", "'-1'", ">= 0"]),
        (["--threshold", "abc"], ["--threshold", "'abc'"]),
        (["--threshold", "nan"], ["--threshold"]),
        (["--threshold", "inf"], ["--threshold"]),
        (["--port", "70000"], ["--port", "65535"]),
        (["--port", "http"], ["--port"]),
        (["--colour", "red"], ["unrecognized arguments"]),
        (["--export"], ["--export"]),
        (["--depth", "0"], ["--depth", "auto, full or a whole number", "'0'"]),
        (["--depth", "deep"], ["--depth", "'deep'"]),
        (["--depth", "\u00b2"], ["--depth", "auto, full or a whole number"]),
        (["--port", "\uff18\uff10"], ["--port", "65535"]),  # full-width 80
        (["--host", ""], ["--host", "127.0.0.1", "0.0.0.0"]),  # (it printed http://:5000/)
    ],
)
def test_bad_flags_are_one_line_exit_2(flags: list[str], words: list[str]) -> None:
    assert_one_line_error(run(*flags), *words, "--help")


def test_help() -> None:
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--input", "--threshold", "--depth", "--host", "--port", "--open", "--export"):
        assert flag in r.stdout


def test_export(residual_file: Path, minimal_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "graph.html"
    r = run("--input", residual_file, "--export", out, "--threshold", "0.002")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    html = out.read_text(encoding="utf-8")
    assert '"mode":"export"' in html and '"threshold":0.002' in html
    r = run("--input", minimal_file, "--export", tmp_path / "minimal.html")
    assert r.returncode == 0, r.stderr


def test_depth(make_file: Callable[..., Path], tmp_path: Path) -> None:
    path = make_file("transformer")
    for depth, groups in (("2", True), ("full", False), ("auto", False)):
        out = tmp_path / f"{depth}.html"
        r = run("--input", path, "--export", out, "--depth", depth)
        assert r.returncode == 0, r.stderr
        assert ('"kind":"group"' in out.read_text(encoding="utf-8")) == groups, depth


def test_export_never_writes_over_a_recording(residual_file: Path, tmp_path: Path) -> None:
    recorded = residual_file.read_bytes()
    r = run("--input", residual_file, "--export", residual_file)
    assert_one_line_error(r, "is the recorded run itself", "graph.html")
    other = tmp_path / "other_run.json"
    other.write_bytes(recorded)
    assert_one_line_error(run("--input", residual_file, "--export", other),
                          "exists and is not a web page")
    assert residual_file.read_bytes() == recorded and other.read_bytes() == recorded
    page = tmp_path / "graph.html"  # an earlier export is replaced: it is made from the run
    for said in ("wrote", "replaced the earlier page"):
        r = run("--input", residual_file, "--export", page)
        assert r.returncode == 0 and f"gradviz: {said} {page}" in r.stdout, r.stdout
    # a page gradviz did not write (the user's own index.html) was replaced without a word
    own = tmp_path / "index.html"
    own.write_text("<!doctype html><html><title>my site</title></html>")
    assert_one_line_error(run("--input", residual_file, "--export", own),
                          "exists and is a web page gradviz did not write", "move it away")
    assert own.read_text() == "<!doctype html><html><title>my site</title></html>"
    # a page exported before pages carried the generator mark: known by its title
    old = tmp_path / "old.html"
    old.write_text("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                   "<title>gradviz \u00b7 run.json</title>", encoding="utf-8")
    assert run("--input", residual_file, "--export", old).returncode == 0


def test_export_to_unwritable_place(residual_file: Path, tmp_path: Path) -> None:
    r = run("--input", residual_file, "--export", tmp_path / "no" / "such" / "dir.html")
    assert_one_line_error(r, "cannot write", "--export")
    r = run("--input", residual_file, "--export", tmp_path / ("y" * 300 + ".html"))
    assert_one_line_error(r, "cannot write", "--export")  # (name too long: a traceback)


def test_flags_that_cannot_go_together_are_refused(residual_file: Path, tmp_path: Path) -> None:
    page = tmp_path / "x.html"  # (--report printed and dropped the export without a word)
    assert_one_line_error(run("--input", residual_file, "--report", "--export", page),
                          "--report prints the findings and --export writes a page")
    assert_one_line_error(run("--input", residual_file, "--export", page, "--open"),
                          "--open opens the page this command serves")
    assert not page.exists()
    empty = tmp_path / "empty.json"  # (it read "healthy", and exported an empty page)
    empty.write_bytes(b'{"nodes": [], "edges": []}')
    for flags in (["--report"], ["--export", page]):
        assert_one_line_error(run("--input", empty, *flags), "records no layers")
    assert not page.exists()
    for flag in ("--input", "--export"):  # (Path("") is ".": "is a directory" named nothing)
        assert_one_line_error(run(flag, ""), f"argument {flag}: expected a file path, got ''")


def test_never_imports_torch(residual_file: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "x.html")
    code = f"""
import runpy, sys
sys.argv = ["visualize.py", "--input", {str(residual_file)!r}, "--export", {out!r}]
try:
    runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
import gradviz, gradviz.web, gradviz.render, gradviz.graph, gradviz.store
gradviz.web.create_app({{"INPUT": {str(residual_file)!r}}}).test_client().get("/")
print("torch" in sys.modules)
"""
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


def start(*args: str | Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
    return proc, line.split(" at ")[1].split()[0]


def test_serves_on_a_free_port(residual_file: Path) -> None:
    proc, url = start("--input", residual_file, "--port", "0")
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        with urllib.request.urlopen(url + "api/poll", timeout=10) as resp:
            assert orjson.loads(resp.read())["steps"] == 30
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_port_in_use(residual_file: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("--input", residual_file, "--port", str(port))
    assert_one_line_error(r, f"cannot listen on 127.0.0.1:{port}", "--port")


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_ctrl_c_exits_cleanly(residual_file: Path) -> None:
    import signal

    proc, _ = start("--input", residual_file, "--port", "0")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def test_prints_clear_url(make_file: Callable[..., Path]) -> None:
    proc, url = start("--input", make_file("chain"), "--port", "0")
    proc.terminate()
    proc.wait(timeout=10)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")


def test_export_to_a_pipe_is_written_not_read(residual_file: Path, tmp_path: Path) -> None:
    # (the check for "is this a web page?" once read the target first: /dev/stdout hung)
    pipe = tmp_path / "page.fifo"
    os.mkfifo(pipe)
    got = tmp_path / "got.html"
    with open(got, "wb") as sink:
        reader = subprocess.Popen(["cat", str(pipe)], stdout=sink)
        try:
            r = run("--input", residual_file, "--export", pipe)
            reader.wait(timeout=60)
        finally:
            reader.kill()
    assert r.returncode == 0, r.stderr
    assert got.read_bytes().lstrip().lower().startswith(b"<!doctype html")


def test_report_into_a_pipe_closed_early_is_quiet(make_file: Callable[..., Path]) -> None:
    """`--report | head -1`: a BrokenPipeError traceback once head had its line. The exit
    code still says whether a finding is critical."""
    path = make_file("transformer")
    for _ in range(3):
        p = subprocess.Popen([sys.executable, str(SCRIPT), "--input", str(path), "--report"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()  # (the reader is gone before the report is written)
        err = p.stderr.read().decode()
        code = p.wait(timeout=60)
        assert "Traceback" not in err and "Broken pipe" not in err, err
        assert code == run("--input", path, "--report").returncode

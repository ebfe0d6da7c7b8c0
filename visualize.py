"""Show how gradients flow through a recorded model, in the browser.

Usage:
    python visualize.py                          # serve training_output.json at 127.0.0.1:5000
    python visualize.py --input run.json --threshold 1e-4 --open
    python visualize.py --port 0                 # any free port (the URL is printed)
    python visualize.py --export graph.html      # one offline HTML file, then exit
    python visualize.py --depth 2                # one node per blocks.N (full: every layer)

Layers are nodes sized by their gradient norm (log scale); connections are edges, green
when their gradient norm is above --threshold and red at or below it; NaN/Inf in purple.
The page follows the file while training still writes it. Big graphs (more than 1,000
nodes) are rolled up by module name: layers sharing their first N name parts become one
group (norm: sqrt of the sum of their squared norms), expandable in the page; --depth
chooses N. Never imports torch.
`--report` prints the diagnosis as text instead (for CI: exit code 1 on a critical finding).
Exit codes: 0 fine, 1 --report found something critical, 2 bad input or flags (one line
on stderr says which and how to fix it).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import NoReturn

from gradviz.errors import GradvizError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"visualize.py: {message}; see python visualize.py --help\n")


def _path(text: str) -> Path:
    if not text.strip():  # (Path("") is ".", which was then "a directory")
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    return Path(text)


def _threshold(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not (t >= 0 and math.isfinite(t)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 such as 0.01, got {text!r}")
    return t


def _depth(text: str) -> str:
    if text not in ("auto", "full") and not (text.isascii() and text.isdigit()
                                              and 1 <= int(text) <= 64):
        raise argparse.ArgumentTypeError(
            f"expected auto, full or a whole number from 1 to 64, got {text!r}"
        )
    return text


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port number from 0 to 65535 (0 picks a free one), got {text!r}"
        )
    return int(text)


def _host(text: str) -> str:
    if not text.strip():  # (it listened on every interface and printed http://:5000/)
        raise argparse.ArgumentTypeError(
            "expected an address such as 127.0.0.1 (this machine) or 0.0.0.0 (every "
            "interface), got ''"
        )
    return text.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked."""
    p = _Parser(description="Serve (or export) the gradient-flow graph of a recorded run.",
                epilog="Exit codes: 0 done; 1 --report found a critical problem; 2 bad input "
                       "or flags (one line on stderr says which and how to fix it).")
    p.add_argument(
        "--input",
        default="training_output.json",
        type=_path,
        help="file written by extract.py or gradviz.record (default: %(default)s)",
    )
    p.add_argument(
        "--threshold",
        default=None,
        type=_threshold,
        help="edges with a gradient norm above this (a number >= 0) are green, others red "
        "(default: where the run's diagnosis calls a gradient vanished, extract.py "
        "--vanish-below, else 1e-07; the page has a slider)",
    )
    p.add_argument(
        "--depth",
        default="auto",
        type=_depth,
        help="roll layers up by the first N parts of their names (blocks.3.attn.qkv -> "
        "blocks.3 at 2), expandable in the page; full: every layer; auto (default): "
        "every layer up to 1,000 nodes, else about 300 nodes",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        type=_host,
        help="address to listen on (default: %(default)s, this machine only)",
    )
    p.add_argument("--port", default=5000, type=_port,
                   help="port (default: %(default)s; 0 picks a free one and prints it)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.add_argument(
        "--export",
        metavar="FILE",
        type=_path,
        help="write one self-contained HTML file (works offline) and exit",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="print the findings (diagnosis) as text and exit: 1 if any is critical, else 0",
    )
    return p.parse_args(argv)


def report(path: Path) -> int:
    """Print a file's findings (diagnosing it if it has none); 1 on any critical one."""
    from gradviz import store
    from gradviz.diagnose import diagnose, format_report, terminal_width, worst
    from gradviz.graph import clean_findings

    run = store.load(path)
    if (why := store.no_layers(run)) is not None:
        raise GradvizError(why)
    if run.version and not run.steps and not run.findings:
        # (its layers are listed when recording starts: a run that failed before its first
        # rec.step() leaves such a file, and "healthy" or "no gradient" would both be wrong)
        raise GradvizError(f"{path} has no recorded steps: the run stopped before its first "
                           f"rec.step(), or has not reached it yet; report once it has")
    # a file's own findings are data from anywhere: reduced to known fields, as the page does
    own = clean_findings(run.findings, {n["id"] for n in run.nodes}) if run.findings else []
    findings = own or diagnose(run)
    try:
        print(format_report(findings, width=terminal_width()), flush=True)
    except BrokenPipeError:  # (the reader stopped early, as `| head -3` does: its exit code
        _quiet_stdout()     # still says whether something is critical)
    return 1 if worst(findings) == "critical" else 0


def _quiet_stdout() -> None:
    """stdout's reader is gone: send the rest (and the flush at exit) nowhere, quietly."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# What marks a page gradviz wrote (the first from this version on, the second before)
_OUR_PAGE = (b'<meta name="generator" content="gradviz">', "<title>gradviz \u00b7 ".encode())


def _check_export_target(out: Path, recorded: Path) -> bool:
    """Refuse to write the page over the recording, or over a file that is not a page
    gradviz wrote (a page of the user's own, an index.html); True: there is one to replace."""
    try:
        is_file = out.is_file()
    except OSError as e:  # (a name too long for the system, say)
        raise GradvizError(
            f"cannot write {out}: {e.strerror or e}; pick a writable --export path") from e
    if not is_file:
        return False  # (nothing there, a folder, or a device or pipe such as /dev/stdout)
    try:
        same = os.path.samefile(out, recorded)
    except OSError:
        same = False
    if same:
        raise GradvizError(f"--export {out} is the recorded run itself; pick another file "
                           f"name for the page, such as graph.html")
    try:
        with open(out, "rb") as f:
            head = f.read(2048)
    except OSError:
        return False  # (unreadable: the write below says why)
    if not head.strip():
        return False  # (empty: nothing to lose)
    if not any(mark in head for mark in _OUR_PAGE):
        what = ("a web page gradviz did not write" if head.lstrip().lower().startswith(
            (b"<!doctype", b"<html")) else "not a web page")
        raise GradvizError(f"--export {out} exists and is {what}; pick another file name, "
                           f"or move it away first")
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = parse_args(argv)
    # Imported here so that --help stays instant; none of these imports torch.
    from werkzeug.serving import make_server

    from gradviz.web import create_app, export_html

    try:
        if args.report and args.export:
            raise GradvizError("--report prints the findings and --export writes a page; "
                               "run one, then the other")
        if args.open and (args.report or args.export):
            raise GradvizError(f"--open opens the page this command serves; with "
                               f"--{'report' if args.report else 'export'} nothing is served "
                               f"(open an exported page in a browser yourself)")
        if args.report:
            return report(args.input)
        if args.export:
            replacing = _check_export_target(args.export, args.input)
            html = export_html(args.input, args.threshold, args.depth)
            try:
                args.export.write_text(html, encoding="utf-8")
            except OSError as e:
                raise GradvizError(
                    f"cannot write {args.export}: {e.strerror}; pick a writable --export path"
                ) from e
            done = "replaced the earlier page" if replacing else "wrote"
            print(f"gradviz: {done} {args.export} (open it in a browser; no server needed)")
            return 0
        app = create_app({"INPUT": args.input, "THRESHOLD": args.threshold, "DEPTH": args.depth})
    except GradvizError as e:
        print(f"visualize.py: {e}", file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per poll
    # Bind here rather than in make_server: werkzeug prints two lines and exits 1 itself.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        sock = socket.create_server((args.host, args.port), family=family)
    except (OSError, OverflowError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        print(
            f"visualize.py: cannot listen on {args.host}:{args.port} ({reason}); "
            "pick another --port or --host",
            file=sys.stderr,
        )
        return 2
    server = make_server(args.host, args.port, app, threaded=True, fd=sock.fileno())
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}/"
    try:  # from the first line on: a Ctrl-C right after it must still exit cleanly
        print(f"gradviz: serving {args.input} at {url} (Ctrl-C to stop)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"gradviz: listening on {args.host}: other machines can see this page",
                file=sys.stderr,
            )
        if args.open:
            threading.Timer(0.3, webbrowser.open, [url]).start()
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sock.close()
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # (stdout's reader is gone: no traceback for that)
        _quiet_stdout()
        code = 141  # (as a shell reports a command ended by SIGPIPE)
    sys.exit(code)

"""Train a demo model with gradviz attached and write its gradient flow to a file.

Usage:
    python extract.py                          # MLP fc1-fc2-fc3, 200 steps -> training_output.json
    python extract.py --model deep-sigmoid     # watch gradients vanish
    python extract.py --model residual --steps 500 --every 10 --output residual.json

Then view it with: python visualize.py --input training_output.json
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import NoReturn

try:  # (torch loads here, a second or more: a Ctrl-C meanwhile ends quietly, as it does later)
    from gradviz import demos, store
    from gradviz.analyses import COST
    from gradviz.diagnose import Thresholds, diagnose, format_report, terminal_width
    from gradviz.errors import GradvizError
    from gradviz.store import Run
except KeyboardInterrupt:
    sys.exit(130)

_terminated = False  # SIGTERM arrived (it ends the run as Ctrl-C does)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every flag has a default, so no argument is needed."""
    models = "\n".join(f"  {d.name:13} {d.summary}" for d in demos.DEMOS.values())
    p = _Parser(
        description="Train a demo model and record its gradient flow to a JSON file.",
        epilog=f"models:\n{models}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="mlp", choices=list(demos.DEMOS), metavar="NAME",
                   help="demo model to train (default: mlp; list below)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1e-3 for adam/adamw, 0.05 for sgd)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"],
                   help="optimizer (default: adam)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="record every Nth step (default: 1, every step)")
    p.add_argument("--output", default="training_output.json",
                   help="file to write (default: training_output.json; an existing file "
                        "is kept as NAME.1.json)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1 or auto (default: auto, CUDA when available)")
    p.add_argument("--all-modules", action="store_true",
                   help="make every leaf module a node, not only layers with parameters")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: autocast (bfloat16 on CPU, float16 on CUDA) with a "
                        "GradScaler; recorded norms are unscaled")
    p.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="gradient accumulation: K micro-batches per optimizer step "
                        "(default: 1)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes of this machine with DistributedDataParallel, "
                        "started by torch.distributed's launcher (gloo on CPU, nccl on GPU); "
                        "--batch-size is the global batch (default: 1)")
    p.add_argument("--fsdp", action="store_true",
                   help="with --nproc: shard the model with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--no-stats", action="store_true",
                   help="skip forward statistics (activation mean/std/min/max, dead ReLU and "
                        "saturated fractions), which dead-ReLU and saturation checks need")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-native", action="store_true",
                   help="record in Python even where the native recorder is built "
                        "(python -m gradviz.native builds it; it records one process on "
                        "the CPU)")
    d = Thresholds()
    t = p.add_argument_group("diagnosis thresholds")
    t.add_argument("--vanish-below", type=float, default=d.vanishing, metavar="X",
                   help=f"a layer's gradient norm below X has vanished (default: {d.vanishing:g})")
    t.add_argument("--explode-above", type=float, default=d.exploding, metavar="X",
                   help=f"...above X is exploding (default: {d.exploding:g})")
    t.add_argument("--dead-above", type=float, default=d.dead, metavar="F",
                   help=f"fraction of always-zero ReLU units that counts as dead "
                        f"(default: {d.dead:g})")
    t.add_argument("--saturated-above", type=float, default=d.saturated, metavar="F",
                   help=f"fraction of sigmoid/tanh outputs at their bounds "
                        f"(default: {d.saturated:g})")
    t.add_argument("--jump-above", type=float, default=d.jump, metavar="K",
                   help=f"a layer's norm changing K-fold in one step is unstable "
                        f"(default: {d.jump:g})")
    a = p.add_argument_group("deeper analyses (off by default; run once, after training)")
    a.add_argument("--noise-scale", action="store_true",
                   help="gradient noise scale B_simple (McCandlish et al. 2018). "
                        f"Cost: {COST['noise_scale']}")
    a.add_argument("--hessian", action="store_true",
                   help=f"top Hessian eigenvalue by power iteration. Cost: {COST['hessian']}")
    a.add_argument("--covariance", action="store_true",
                   help="per-layer gradient variance and correlation across batches. "
                        f"Cost: {COST['covariance']}")
    return p.parse_args(argv)


def summary(run: Run) -> list[str]:
    """Per-parameter norms of the last recorded step, in the original example's words."""
    lines = []
    for node in run.nodes:
        for pname, info in node["params"].items():
            value = info["gradient_norm"]
            if not info.get("trainable", True):
                text = "frozen"
            elif value is None:
                text = "no gradient"
            else:
                text = f"{value:.4f}"
            lines.append(f"{node['id']}.{pname} gradient norm: {text}")
    return lines


def analysis_line(name: str, value: dict) -> str:
    """One line for a deeper analysis' headline number (or why it has none)."""
    if "error" in value:
        return f"not computed: {value['error']}"
    if name == "noise_scale":
        return f"B_simple = {value['model']['noise_scale']:.4g} (batch {value['b_small']})"
    if name == "hessian":
        return (f"top eigenvalue {value['eigenvalue']:.4g} after {value['iterations']} "
                f"iterations{'' if value['converged'] else ' (not converged)'}")
    return f"mean gradient variance {value['model']['variance']:.4g}, correlation " \
           f"{value['model']['correlation']:.3g} over {value['batches']} batches"


def launch(nproc: int, mode: str, argv: list[str] | None) -> int:
    """Re-run this script as nproc ranks under torch.distributed's own launcher (torchrun)."""
    import subprocess

    args, skip = [], False
    for a in (sys.argv[1:] if argv is None else argv):
        # torchrun would take --nproc for its own --nproc-per-node; the ranks need neither
        # (the world size says it, and the mode travels in GRADVIZ_DISTRIBUTED).
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith(("--nproc=", "--fsdp")):
            args.append(a)
    env = {**os.environ, "GRADVIZ_DISTRIBUTED": mode}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(Path(__file__).resolve()), *args]
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 130


def check_flags(args: argparse.Namespace, analyses: tuple[str, ...]) -> None:
    """GradvizError naming the first flag that cannot work, and how to fix it."""
    from gradviz import train

    if args.nproc < 1:
        raise GradvizError(f"--nproc must be at least 1, got {args.nproc}")
    if args.fsdp and args.nproc < 2:
        raise GradvizError("--fsdp shards the model over processes: add --nproc N (N >= 2)")
    for flag, value, top in (("--vanish-below", args.vanish_below, None),
                             ("--explode-above", args.explode_above, None),
                             ("--dead-above", args.dead_above, 1.0),
                             ("--saturated-above", args.saturated_above, 1.0)):
        if not value > 0 or (top is not None and value > top):
            limit = f" and at most {top:g}" if top else ""
            raise GradvizError(f"{flag} must be above 0{limit}, got {value:g}")
    if not args.jump_above > 1:
        raise GradvizError(f"--jump-above is a factor (a norm changing K-fold in one step): "
                           f"it must be above 1, got {args.jump_above:g}")
    if not args.vanish_below < args.explode_above:
        raise GradvizError(f"--vanish-below ({args.vanish_below:g}) must be below "
                           f"--explode-above ({args.explode_above:g})")
    if not args.output.strip():
        raise GradvizError("--output is empty; pass a file path such as training_output.json")
    if args.output.endswith(("/", os.sep)):  # (Path() drops the slash)
        raise GradvizError(f"--output {args.output} names a folder; pass a file path such "
                           f"as {args.output.rstrip('/' + os.sep) or '.'}/training_output.json")
    why = store.unwritable(Path(args.output))
    if why is not None:  # (in the recorder too, but with --nproc that is inside each rank)
        raise GradvizError(why)
    train.resolve_device(args.device)  # (else, with --nproc, once in each rank)
    train.check_args(args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     optimizer=args.optimizer, seed=args.seed, every=args.every,
                     accumulate=args.accumulate, analyses=analyses, world=args.nproc)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (kill, a job scheduler's stop) ends training as Ctrl-C does: the recorder
    writes every recorded step on its way out, instead of losing those since its last
    periodic write."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _rescue(path: Path, recording: store.Recording, error: OSError) -> int:
    """The file could not be written after training: write the run to the temporary
    folder instead (it lives only in this process's memory), and say where; exit code 1."""
    why = error.strerror or str(error)
    rescue = Path(tempfile.gettempdir()) / f"{path.stem}.rescued-{os.getpid()}{path.suffix}"
    try:
        store.save(rescue, recording)
    except OSError as again:
        print(f"extract.py: could not write {path} ({why}) nor {rescue} "
              f"({again.strerror or again}); the run is lost: free some disk space and run "
              f"again", file=sys.stderr)
        return 1
    print(f"extract.py: could not write {path} ({why}); the run was written to {rescue} "
          f"instead", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the process exit code."""
    args = parse_args(argv)
    chosen = tuple(name for name, on in (("noise_scale", args.noise_scale),
                                         ("hessian", args.hessian),
                                         ("covariance", args.covariance)) if on)
    try:  # every flag checked here, once, before any process is started
        check_flags(args, chosen)
    except GradvizError as e:
        print(f"extract.py: {e}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "GRADVIZ_DISTRIBUTED" not in os.environ:
        return launch(args.nproc, "fsdp" if args.fsdp else "ddp", argv)
    distributed = os.environ.get("GRADVIZ_DISTRIBUTED")
    rank = int(os.environ.get("RANK", "0"))
    thresholds = Thresholds(vanishing=args.vanish_below, exploding=args.explode_above,
                            dead=args.dead_above, saturated=args.saturated_above,
                            jump=args.jump_above)
    # (one process only: under torchrun the launcher stops the ranks itself; and signal
    # handlers can only be set from the main thread)
    term = (signal.signal(signal.SIGTERM, _on_sigterm) if distributed is None
            and threading.current_thread() is threading.main_thread() else None)
    try:
        return _run(args, chosen, distributed, rank, thresholds)
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _run(args: argparse.Namespace, chosen: tuple[str, ...], distributed: str | None,
         rank: int, thresholds: Thresholds) -> int:
    """Train, diagnose, write and report: main() once the flags are checked."""
    from gradviz import train

    try:
        result = train.train(
            args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            optimizer=args.optimizer, seed=args.seed, every=args.every, output=args.output,
            device=args.device, all_modules=args.all_modules, amp=args.amp,
            accumulate=args.accumulate, activation_stats=not args.no_stats, analyses=chosen,
            distributed=distributed,
            progress=False if args.no_progress else None,
            native=False if args.no_native else None,
            # (from the first write: a page opened while it trains paints edges red there)
            meta={"vanish_below": thresholds.vanishing},
        )
    except GradvizError as e:
        print(f"extract.py: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0  # rank 0 writes the file and reports
    run = result.run
    findings = diagnose(run, thresholds)
    result.recording.findings = findings
    if result.path is not None:
        try:
            store.save(result.path, result.recording)  # the file keeps the findings too
        except OSError as e:  # (a full disk, the folder removed during training)
            return _rescue(result.path, result.recording, e)
    print("\n".join(summary(run)))
    layers = sum(1 for n in run.nodes if n.get("kind") != "junction")
    print(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f} over {result.steps} steps")
    print(f"wrote {result.path}: {len(run.steps)} recorded steps, {layers} layers, "
          f"{len(run.nodes) - layers} junctions, {len(run.edges)} edges")
    for name, value in run.meta.get("analyses", {}).items():
        print(f"{name}: {analysis_line(name, value)}")
    print(format_report(findings, width=terminal_width()))
    print(f"view it with: python visualize.py --input {result.path}")
    if result.interrupted:
        how = "terminated" if _terminated else "interrupted"
        print(f"{how} after {result.steps} steps; every recorded step was kept",
              file=sys.stderr)
        return 143 if _terminated else 130
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
        sys.exit(code)
    except BrokenPipeError:  # (stdout's reader is gone, as with `| head`: the file is written
        # before anything is printed; no traceback for that)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # (as a shell reports a command ended by SIGPIPE)
    except KeyboardInterrupt:  # (while the flags are read, or the findings written at the end:
        # before training there is no file, after it the file is whole, written atomically)
        print("extract.py: interrupted", file=sys.stderr)
        sys.exit(143 if _terminated else 130)

"""Train a demo model under the recorder: the loop behind ``python extract.py``."""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import analyses as deep
from . import capture, demos, store
from .errors import RecordingError
from .store import Recording, Run

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.05}
DATASET_SIZE = 4096


@dataclass
class Result:
    """What a training run produced."""

    run: Run
    recording: Recording
    path: Path | None
    first_loss: float
    last_loss: float
    steps: int
    interrupted: bool = False


class Progress:
    """A one-line progress bar with the running loss, on stderr (silent when not a terminal)."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._t0 = time.monotonic()

    def update(self, done: int, loss: float) -> None:
        """Redraw at most ten times a second, and always on the last step."""
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done < self.total):
            return
        self._last = now
        width = 30
        filled = width * done // max(self.total, 1)
        rate = done / max(now - self._t0, 1e-9)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"loss {loss:.4f}  {rate:.0f} steps/s"
        )
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when there is one; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise RecordingError(f"--device {name!r} is not a device; use cpu, cuda or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecordingError(f"--device {name}: no CUDA device here; use --device cpu")
    return dev


def check_args(model_name: str, *, steps: int, batch_size: int, lr: float | None,
               optimizer: str, seed: int, every: int, accumulate: int,
               analyses: tuple[str, ...], world: int = 1) -> float:
    """Check train()'s arguments (RecordingError naming the flag); return the learning rate.

    extract.py calls it before it starts several processes, so a bad flag is one line there
    rather than one traceback per process.
    """
    if model_name not in demos.DEMOS:
        raise RecordingError(
            f"unknown model {model_name!r}; choose one of: {', '.join(demos.DEMOS)}"
        )
    if optimizer not in OPTIMIZERS:
        raise RecordingError(
            f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
        )
    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--every", every),
                        ("--accumulate", accumulate)):
        if value < 1:
            raise RecordingError(f"{flag} must be at least 1, got {value}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    unknown = [a for a in analyses if a not in deep.COST]
    if unknown:
        raise RecordingError(f"unknown analysis {unknown[0]!r}; choose from {', '.join(deep.COST)}")
    if not (0 < lr <= torch.finfo(torch.float32).max):  # (the weights are float32)
        raise RecordingError(f"--lr must be a positive number, got {lr}")
    if not -(2**63) <= seed < 2**64:  # (what torch.manual_seed takes)
        raise RecordingError(f"--seed must fit in 64 bits (-2**63 to 2**64 - 1), got {seed}")
    if batch_size % world:
        raise RecordingError(f"--batch-size {batch_size} does not split over {world} "
                             f"processes; use a multiple of {world}")
    return lr


def train(
    model_name: str = "mlp",
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float | None = None,
    optimizer: str = "adam",
    seed: int = 0,
    every: int = 1,
    output: str | Path | None = "training_output.json",
    device: str = "auto",
    all_modules: bool = False,
    amp: bool = False,
    accumulate: int = 1,
    activation_stats: bool = True,
    analyses: tuple[str, ...] = (),
    distributed: str | None = None,
    progress: bool | None = None,
    native: bool | None = None,
    meta: dict[str, Any] | None = None,
) -> Result:
    """Train a demo for ``steps`` optimizer steps, recording its gradient flow to ``output``.

    ``amp`` trains under autocast (bfloat16 on CPU, float16 on CUDA) with a GradScaler;
    ``accumulate`` sums the gradients of that many micro-batches per optimizer step.
    ``distributed`` ("ddp" or "fsdp") trains this process as one rank of a job started by
    torch.distributed's launcher: each rank takes its slice of the same global batch.
    ``analyses`` names deeper analyses (``noise_scale``, ``hessian``, ``covariance``) run on
    the trained model at the end; their results go to the file's ``meta.analyses``.
    ``meta`` adds to the file's metadata.
    """
    lr = check_args(model_name, steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer,
                    seed=seed, every=every, accumulate=accumulate, analyses=analyses)
    world, rank = 1, 0
    if distributed:
        dev, world, rank = _join(distributed, device)
        if batch_size % world:
            raise RecordingError(f"--batch-size {batch_size} does not split over {world} "
                                 f"processes; use a multiple of {world}")
        progress = progress if rank == 0 else False
    else:
        dev = resolve_device(device)
    demo = demos.DEMOS[model_name]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = demo.data(DATASET_SIZE, g)
    model = demo.build().to(dev)
    trained: nn.Module = model
    if distributed == "ddp":
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev] if dev.type == "cuda" else None)
    elif distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():  # shard every layer, then the rest at the root
            if m is not model and any(True for _ in m.parameters(recurse=False)):
                fully_shard(m)
        fully_shard(model)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    bar = Progress(steps, progress)
    first = last = math.nan
    done = 0
    interrupted = False
    try:
        rec = capture.record(
            trained, output, every=every, all_modules=all_modules, optimizer=opt, seed=seed,
            scaler=scaler if amp else None, activation_stats=activation_stats, native=native,
            meta={"demo": model_name, "batch_size": batch_size, "accumulate": accumulate,
                  "amp": str(amp_dtype).removeprefix("torch.") if amp else None,
                  **(meta or {})},
        )
        with rec:
            try:
                for step in range(steps):
                    opt.zero_grad(set_to_none=True)
                    total = torch.zeros((), device=dev)
                    for _ in range(accumulate):  # micro-batches: one optimizer step, one record
                        idx = torch.randint(0, DATASET_SIZE, (batch_size,), generator=g)
                        idx = idx.chunk(world)[rank]  # every rank its slice of one global batch
                        x, y = x_all[idx].to(dev), y_all[idx].to(dev)
                        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                            loss = loss_fn(trained(x), y) / accumulate
                        scaler.scale(loss).backward()
                        total += loss.detach().float()
                    rec.step(total)
                    scaler.step(opt)
                    scaler.update()
                    last = float(total)
                    first = last if step == 0 else first
                    done = step + 1
                    bar.update(done, last)
            except KeyboardInterrupt:
                interrupted = True  # leaving the with block writes every step recorded so far
            except RuntimeError as e:
                if not _out_of_memory(e):
                    raise
                # (the with block still writes every step recorded so far)
                raise RecordingError(f"out of memory at step {done} with --batch-size "
                                     f"{batch_size} ({_allocation(e)}); try a smaller "
                                     "--batch-size") from e
        if analyses and not interrupted and world == 1:
            try:
                results = run_analyses(model, loss_fn, x_all, y_all, batch_size, analyses, g,
                                       dev)
            except KeyboardInterrupt:  # (the training is written already: keep it as it is)
                interrupted = True
            else:
                rec.recording.meta = {**rec.recording.meta, "analyses": results}
                if rec.path is not None and rec.write_error is None:
                    try:
                        store.save(rec.path, rec.recording)
                    except OSError as e:  # (the run is in the Result: its caller may save it)
                        rec.write_error = e
        return Result(rec.to_run(), rec.recording, rec.path, first, last, done, interrupted)
    finally:
        if distributed:
            trained = model  # drop the DDP wrapper (and its reducer) before the group goes
            _leave()


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed (torch.OutOfMemoryError, or the CPU allocator's error)."""
    oom: Any = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom) or "can't allocate memory" in str(e)


def _allocation(e: BaseException) -> str:
    """What the failed allocation asked for, in a few words."""
    m = re.search(r"(?i)tried to allocate (\d+) bytes", str(e))  # (the CPU allocator)
    if m:
        return f"it asked for {int(m.group(1)) / 1e9:.3g} GB"
    m = re.search(r"(?i)tried to allocate ([\d.]+ ?[KMGT]i?B)", str(e))  # (CUDA's)
    return f"it asked for {m.group(1)}" if m else _first_line(e, 120)


def _first_line(e: BaseException, limit: int) -> str:
    """An error's first line, at most limit characters (its type's name if it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def _leave() -> None:
    """Leave the process group cleanly: a gloo rank that exits while still in it, or whose
    DDP reducer outlives it, sometimes aborts ('terminate called without an active
    exception'). All ranks meet first, then the wrapper goes, then the group."""
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def _join(mode: str, device: str) -> tuple[torch.device, int, int]:
    """Join the process group torch.distributed's launcher set up (gloo on CPU, nccl on GPU)."""
    import os

    import torch.distributed as dist

    if mode not in ("ddp", "fsdp"):
        raise RecordingError(f"unknown distributed mode {mode!r}; use ddp or fsdp")
    if "RANK" not in os.environ:
        raise RecordingError("not started by torch.distributed's launcher; "
                             "use python extract.py --nproc N")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, dist.get_world_size(), dist.get_rank()


def run_analyses(model: nn.Module, loss_fn: nn.Module, x_all: torch.Tensor,
                 y_all: torch.Tensor, batch_size: int, names: tuple[str, ...],
                 g: torch.Generator, dev: torch.device) -> dict[str, object]:
    """The deeper analyses on the trained model, on 8 fresh batches (outside the recorder).

    One that fails gives {"error": its first line} instead of a result.
    """
    def fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(m(x), y)

    batches = []
    for _ in range(8):
        idx = torch.randint(0, DATASET_SIZE, (batch_size,), generator=g)
        batches.append((x_all[idx].to(dev), y_all[idx].to(dev)))
    todo = {"noise_scale": lambda: deep.gradient_noise_scale(model, fn, batches),
            "hessian": lambda: deep.top_hessian_eigenvalue(model, fn, *batches[0]),
            "covariance": lambda: deep.gradient_covariance(model, fn, batches)}
    out: dict[str, object] = {}
    for name, analyse in todo.items():
        if name not in names:
            continue
        try:
            out[name] = analyse()
        except RuntimeError as e:  # (an op without the derivative it needs, memory: the
            # trained run and its diagnosis stand; the analysis says why it has no result)
            out[name] = {"error": _first_line(e, 300)}
    return out

"""gradviz: see how gradients flow through a PyTorch model, layer by layer and step by step.

Record inside any training loop::

    with gradviz.record(model, path="training_output.json") as rec:
        for x, y in loader:
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward()
            rec.step(loss)
            opt.step()
    run = gradviz.load("training_output.json")

``gradviz.record`` needs torch and is imported lazily, so the viewing half (``gradviz.load``
and everything behind visualize.py) runs on machines without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .diagnose import Thresholds, diagnose, format_report
from .errors import FileFormatError, GradvizError, RecordingError, UnknownVersionError
from .store import Run, load

if TYPE_CHECKING:
    from .capture import Recorder, record

__all__ = [
    "FileFormatError",
    "GradvizError",
    "Recorder",
    "RecordingError",
    "Run",
    "Thresholds",
    "UnknownVersionError",
    "diagnose",
    "format_report",
    "load",
    "record",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing gradviz must not import torch (visualize.py runs without it).
    if name in ("record", "Recorder"):
        from . import capture

        return getattr(capture, name)
    raise AttributeError(f"module 'gradviz' has no attribute {name!r}")

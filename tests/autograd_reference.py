"""Plain-autograd twins of what gradviz records: no gradviz code runs in here."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def flat_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from flat_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from flat_tensors(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from flat_tensors(getattr(obj, f.name))


def rebuilt(obj: Any, fn: Any) -> Any:
    """obj with fn applied to each tensor in it (nested tuples, lists, dicts, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, rebuilt(v, fn)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(rebuilt(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: rebuilt(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    return obj


class Reference:
    """One forward/backward of a copy of the model, with every module's output kept.

    apart=True: each module's outputs are handed on as aliases, so dL/d(output) holds only
    the gradient from outside the module, as a full backward hook's grad_output does (a
    module that reads its own output, h * 2 beside h, gives that part to h, not to the
    alias)."""

    def __init__(self, model: nn.Module, x: Any = None, y: Any = None,
                 loss_fn: Any = None, autograd_grad: bool = True, apart: bool = False) -> None:
        self.model = copy.deepcopy(model)
        # The same function without in-place ops: retain_grad on a tensor that is later
        # modified in place would report the gradient of its last version instead.
        for m in self.model.modules():
            if getattr(m, "inplace", False):
                m.inplace = False
        self.outputs: dict[str, list[torch.Tensor]] = {}
        handles = []
        for name, m in self.model.named_modules():
            def keep(mod: nn.Module, args: Any, out: Any, name: str = name) -> Any:
                if apart:
                    out = rebuilt(out, lambda t: t.view_as(t) if t.requires_grad else t)
                for t in flat_tensors(out):
                    if t.requires_grad:
                        t.retain_grad()
                        self.outputs.setdefault(name, []).append(t)
                return out if apart else None
            handles.append(m.register_forward_hook(keep))
        if loss_fn is None:
            self.loss = nn.functional.cross_entropy(self.model(x), y)
        else:
            self.loss = loss_fn(self.model)
        for h in handles:  # checkpointing re-runs forwards during backward: keep the first
            h.remove()
        layer_outs = [t for ts in self.outputs.values() for t in ts]
        if autograd_grad:  # dL/d(output) of every module, straight from torch.autograd.grad
            grads = torch.autograd.grad(self.loss, layer_outs, retain_graph=True,
                                        allow_unused=True)
        self.loss.backward()
        if not autograd_grad:  # for reentrant checkpointing, which forbids autograd.grad
            grads = tuple(t.grad for t in layer_outs)
        self.grad_of = {id(t): g for t, g in zip(layer_outs, grads, strict=True)}

    def output_grads(self, name: str) -> list[torch.Tensor]:
        """dL/d(each output of module `name`) that received a gradient."""
        gs = [self.grad_of[id(t)] for t in self.outputs.get(name, [])]
        return [g for g in gs if g is not None]

    def activation_norm(self, name: str) -> float | None:
        gs = self.output_grads(name)
        if not gs:
            return None
        return float(torch.sqrt(sum(torch.linalg.vector_norm(g).double() ** 2 for g in gs)))

    def param_norms(self, name: str) -> dict[str, float | None]:
        module = self.model.get_submodule(name)
        return {
            p: None if t.grad is None else float(torch.linalg.vector_norm(t.grad))
            for p, t in module.named_parameters(recurse=False)
        }

    def layer_norm(self, name: str) -> float | None:
        module = self.model.get_submodule(name)
        grads = [t.grad.flatten() for t in module.parameters(recurse=False) if t.grad is not None]
        return float(torch.linalg.vector_norm(torch.cat(grads))) if grads else None


def rel_close(a: float | None, b: float | None, tol: float = 1e-5) -> bool:
    """Relative error below tol (both None counts as equal)."""
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-30)

"""Deeper, costlier analyses of a model's gradients at one point of training (off by default).

- gradient_noise_scale: McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
  appendix A: B_simple = tr(Sigma) / |G|^2 from small-batch and big-batch gradients.
- top_hessian_eigenvalue: power iteration on Hessian-vector products (double backward).
- gradient_covariance: per layer, the spread of the gradient across batches.

Every function takes ``loss_fn(model, x, y) -> scalar loss`` (the mean over the batch) and
computes gradients with ``torch.autograd.grad``, so parameters and their ``.grad`` are never
touched and no hooks are registered. Buffers (BatchNorm running statistics) are restored
afterwards. The model's train/eval mode is left as the caller set it: call ``model.eval()``
first to switch dropout off. A recorder attached to the model sees these extra passes, so
run the analyses outside ``gradviz.record`` or between recorded steps.

Layers are the modules that own trainable parameters, named as in the recording
(qualified name from ``named_modules()``, the root by its class name); a parameter tied
between modules counts in each owner's layer and once in the model's total. Results are
plain Python (JSON-serialisable; NaN where a quantity is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import RecordingError

__all__ = ["COST", "gradient_covariance", "gradient_noise_scale", "top_hessian_eigenvalue"]

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]

COST: dict[str, str] = {
    "noise_scale": (
        "k forward/backward passes at the small batch size B (one per micro-batch, the big "
        "batch of k*B needs no extra pass) and one extra copy of the trainable parameters"
    ),
    "hessian": (
        "one forward/backward pass with create_graph=True, then per power iteration one "
        "Hessian-vector product (a double backward, about 2 backward passes); the graph of the "
        "gradient stays in memory throughout (about 2-3x a normal backward's memory)"
    ),
    "covariance": (
        "k forward/backward passes (one per batch), two extra copies of the trainable "
        "parameters for the running mean and variance, and k x sample stored coordinates "
        "per layer"
    ),
}

_Params = list[nn.Parameter]
_Layers = dict[str, list[int]]  # layer name -> indices into the unique trainable parameters


def _trainable(model: nn.Module) -> tuple[_Params, _Layers]:
    """Unique trainable parameters and, per layer that owns any, which of them it owns."""
    params: _Params = []
    index: dict[int, int] = {}
    layers: _Layers = {}
    for name, module in model.named_modules():
        own = [p for _, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        idx = []
        for p in own:
            if id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
            idx.append(index[id(p)])
        layers[name or type(model).__name__] = idx
    if not params:
        raise RecordingError(
            f"{type(model).__name__} has no trainable parameters; "
            "set requires_grad=True on the parameters to analyse"
        )
    return params, layers


@contextmanager
def _twice_differentiable_attention() -> Iterator[None]:
    """scaled_dot_product_attention by its math kernel, which has a double backward.

    The fused kernels torch picks otherwise (flash attention on the CPU among them) have
    none, so a Hessian-vector product through a transformer raised "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented".
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # (torch >= 2.3)
    except ImportError:
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def _restoring_buffers(model: nn.Module) -> Iterator[None]:
    """Put buffers (e.g. BatchNorm running statistics) back as they were, and enable grad."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def _loss(model: nn.Module, loss_fn: LossFn, x: Any, y: Any) -> torch.Tensor:
    loss = loss_fn(model, x, y)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise RecordingError(
            f"loss_fn returned {shape}, not a scalar tensor; return the mean loss over the "
            "batch, e.g. F.cross_entropy(model(x), y)"
        )
    if not loss.requires_grad:
        raise RecordingError(
            "loss_fn returned a loss that does not require grad; compute it from model(x) "
            "outside torch.no_grad()"
        )
    return loss


def _grads(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any, params: _Params
) -> list[torch.Tensor]:
    """dL/dparams for one batch, without touching .grad; unused parameters get zeros."""
    loss = _loss(model, loss_fn, x, y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params, strict=True)
    ]


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    # half-precision gradients summed over batches lose digits: accumulate in float32 or wider
    return torch.promote_types(p.dtype, torch.float32)


def _sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of each tensor, in float64, as one device tensor (no host sync)."""
    dev = tensors[0].device  # parameters may sit on several devices: gather on the first
    return torch.stack(
        [torch.linalg.vector_norm(t, dtype=torch.float64).square().to(dev) for t in tensors]
    )


def _batch_list(batches: Iterable[tuple[Any, Any]], what: str) -> list[tuple[Any, Any]]:
    items = list(batches)
    if len(items) < 2:
        raise RecordingError(
            f"{what} needs at least 2 batches, got {len(items)}; pass several (x, y) batches"
        )
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise RecordingError(
                f"batch {i} is a {type(item).__name__}, not an (x, y) pair; "
                "pass an iterable of (x, y) tuples"
            )
    return items


def _leading_dim(x: Any) -> int | None:
    """The batch size of an input: the first dimension of its first tensor."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else None
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for item in x:
            n = _leading_dim(item)
            if n is not None:
                return n
    return None


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else math.nan


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The simple gradient noise scale B_simple = tr(Sigma)/|G|^2, for the model and per layer.

    ``batches`` are k >= 2 micro-batches (x, y) of equal size B_small whose concatenation is
    the big batch (B_big = k * B_small); ``loss_fn(model, x, y)`` returns the mean loss over
    its batch, so the big-batch gradient G_big is the mean of the micro-batch gradients and
    needs no extra pass. |G_small|^2 is the mean of the k micro-batch squared norms. Then,
    as in McCandlish et al. 2018, appendix A:

        |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

    tr(Sigma) is never negative here; |G|^2 can be when the gradient is mostly noise, and
    then noise_scale is NaN (average more batches, or several calls, to settle it).
    B_small is read from the first dimension of x unless ``batch_size`` is given.

    Returns {"b_small", "b_big", "batches", "model": stats, "layers": {name: stats}} where
    stats = {"noise_scale", "trace_sigma", "grad_sq", "small_grad_sq", "big_grad_sq"}.
    """
    items = _batch_list(batches, "gradient_noise_scale")
    if batch_size is None:
        found = [_leading_dim(x) for x, _ in items]
        sizes = [n for n in found if n is not None]
        if len(sizes) != len(found):
            raise RecordingError(
                "cannot read the batch size from x (no tensor with a batch dimension); "
                "pass batch_size=B_small"
            )
        if len(set(sizes)) != 1:
            raise RecordingError(
                f"micro-batches must have equal sizes, got sizes {sorted(set(sizes))}; "
                "drop the last, shorter batch"
            )
        batch_size = sizes[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RecordingError(f"batch_size must be a positive integer, got {batch_size!r}")
    b_small = batch_size
    k = len(items)
    b_big = k * b_small
    params, layers = _trainable(model)

    with _restoring_buffers(model):
        total = [torch.zeros_like(p, dtype=_acc_dtype(p)) for p in params]
        small_sq = torch.zeros(len(params), dtype=torch.float64, device=params[0].device)
        for x, y in items:
            g = _grads(model, loss_fn, x, y, params)
            small_sq += _sq_norms(g)
            torch._foreach_add_(total, [t.to(a.dtype) for t, a in zip(g, total, strict=True)])
            del g
        big_sq = _sq_norms([t / k for t in total])
        small_sq /= k
        # one transfer to the host for every number
        small, big = small_sq.tolist(), big_sq.tolist()

    def stats(idx: list[int]) -> dict[str, float]:
        s = math.fsum(small[i] for i in idx)
        b = math.fsum(big[i] for i in idx)
        grad_sq = (b_big * b - b_small * s) / (b_big - b_small)
        trace = (s - b) / (1 / b_small - 1 / b_big)
        return {
            "noise_scale": _ratio(trace, grad_sq),
            "trace_sigma": trace,
            "grad_sq": grad_sq,
            "small_grad_sq": s,
            "big_grad_sq": b,
        }

    return {
        "b_small": b_small,
        "b_big": b_big,
        "batches": k,
        "model": stats(list(range(len(params)))),
        "layers": {name: stats(idx) for name, idx in layers.items()},
    }


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Sum of the elementwise products of two lists of tensors, in float64, on the host."""
    dev = a[0].device
    parts = [(s * t).sum(dtype=torch.float64).to(dev) for s, t in zip(a, b, strict=True)]
    return float(torch.stack(parts).sum().item())


def _hvp(
    live: list[tuple[torch.Tensor, int]], v: list[torch.Tensor], params: _Params
) -> list[torch.Tensor]:
    """H v by differentiating g.v once more; the gradient graph is kept for the next call."""
    if not live:
        return [torch.zeros_like(t) for t in v]
    dot = torch.stack([(g * v[i].to(g.dtype)).sum().to(live[0][0].device) for g, i in live]).sum()
    raw = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
    return [
        torch.zeros_like(t) if h is None else h.detach().to(t.dtype)
        for h, t in zip(raw, v, strict=True)
    ]


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """The Hessian's eigenvalue of largest magnitude, by power iteration on Hessian-vector products.

    The Hessian of ``loss_fn(model, x, y)`` with respect to all trainable parameters is never
    formed: each iteration is one double backward through the gradient's graph. The value is
    the Rayleigh quotient v.Hv, so it keeps its sign (negative where the largest-magnitude
    curvature is negative). It has converged when the value changed by at most tol (relative)
    over the last iteration and the relative residual |Hv - eigenvalue v| / |eigenvalue| is at
    most sqrt(tol), so an eigenvalue of H lies that close; otherwise it stops after ``iters``
    with converged False (e.g. eigenvalues +l and -l of equal magnitude, or a small gap).

    Returns {"eigenvalue", "iterations", "converged", "rel_change", "residual"}.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise RecordingError(f"iters must be a positive integer, got {iters!r}; try iters=20")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise RecordingError(f"tol must be a number >= 0, got {tol!r}; try tol=1e-4")
    params, _ = _trainable(model)
    gen = torch.Generator().manual_seed(seed)
    # drawn on the CPU so the start vector, and the result, do not depend on the device
    v = [torch.randn(p.shape, generator=gen, dtype=_acc_dtype(p)).to(p.device) for p in params]
    eig, prev, change, residual = math.nan, math.nan, math.nan, math.nan
    used, converged = 0, False

    with _restoring_buffers(model):
        with _twice_differentiable_attention():
            loss = _loss(model, loss_fn, x, y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # a gradient that is constant in the parameters contributes nothing to H v
        live = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        del loss, grads
        for step in range(1, iters + 1):
            used = step
            norm = torch.sqrt(_sq_norms(v).sum())
            if norm.item() == 0:  # H v = 0: the Hessian vanishes along every direction tried
                eig, change, residual, converged = 0.0, 0.0, 0.0, True
                break
            v = [t / norm.to(t.device, t.dtype) for t in v]
            hv = _hvp(live, v, params)
            eig = _dot(v, hv)  # Rayleigh quotient v.Hv, |v| = 1
            # |Hv - eig v|: some eigenvalue of H lies within it of eig (Bauer-Fike)
            residual = math.sqrt(max(_dot(hv, hv) - eig * eig, 0.0)) / max(abs(eig), 1e-30)
            change = abs(eig - prev) / max(abs(eig), 1e-30) if math.isfinite(prev) else math.nan
            v, prev = hv, eig
            # a small change alone is not enough: with eigenvalues +l and -l the quotient
            # settles while v keeps flipping between them; the residual then stays large
            if change <= tol and residual <= math.sqrt(tol):
                converged = True
                break
        del live  # frees the double-backward graph before returning
    return {
        "eigenvalue": eig,
        "iterations": used,
        "converged": converged,
        "rel_change": change,
        "residual": residual,
    }


def _draw(n: int, sample: int, gen: torch.Generator) -> torch.Tensor:
    """At most `sample` distinct indices below n, sorted, from the seeded generator."""
    if n <= max(1_000_000, 4 * sample):
        return torch.randperm(n, generator=gen)[:sample].sort().values
    # a permutation of a big embedding would cost 8 bytes per coordinate: draw twice as many
    # with replacement and keep the first `sample` distinct ones (collisions are rare here)
    drawn = torch.randint(n, (2 * sample,), generator=gen).tolist()
    return torch.tensor(list(dict.fromkeys(drawn))[:sample]).sort().values


def gradient_covariance(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    sample: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Per layer, how much batch gradients vary and how alike they are across k >= 2 batches.

    For each layer: "variance", the per-coordinate variance across batches (unbiased, over
    all the layer's coordinates, then averaged); "mean_grad_sq", the squared mean gradient
    averaged over coordinates (its ratio to variance is a signal-to-noise ratio); and
    "correlation", the mean over pairs of batches of the Pearson correlation between their
    gradients restricted to a fixed random sample (``seed``) of at most ``sample`` of the
    layer's coordinates (NaN if a sampled gradient is constant). "model" gives the same over
    all unique parameters, its correlation over the union of the layers' samples.

    Returns {"batches", "sample", "model": stats, "layers": {name: stats | "sampled": n}}.
    """
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 2:
        raise RecordingError(f"sample must be an integer >= 2, got {sample!r}; try sample=256")
    items = _batch_list(batches, "gradient_covariance")
    k = len(items)
    params, layers = _trainable(model)
    gen = torch.Generator().manual_seed(seed)
    # per layer, per owned parameter: the flat indices sampled from it (drawn on the CPU so
    # the sample is the same on every device)
    picks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, idx in layers.items():
        sizes = [params[i].numel() for i in idx]
        n = sum(sizes)
        chosen = _draw(n, sample, gen)
        start, pick = 0, []
        for i, size in zip(idx, sizes, strict=True):
            mine = chosen[(chosen >= start) & (chosen < start + size)] - start
            if mine.numel():
                pick.append((i, mine.to(params[i].device)))
            start += size
        picks[name] = pick

    with _restoring_buffers(model):
        # Welford's running mean and sum of squared deviations, per coordinate
        mean = [torch.zeros_like(p, dtype=_acc_dtype(p)) for p in params]
        m2 = [torch.zeros_like(p, dtype=_acc_dtype(p)) for p in params]
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        for n_seen, (x, y) in enumerate(items, start=1):
            g = _grads(model, loss_fn, x, y, params)
            for j, grad in enumerate(g):
                gj = grad.to(mean[j].dtype)
                delta = gj - mean[j]
                mean[j] += delta / n_seen
                m2[j] += delta * (gj - mean[j])
            for name, pick in picks.items():
                rows[name].append(
                    torch.cat([g[i].reshape(-1)[sel].to(torch.float64) for i, sel in pick])
                )
            del g
        var_sum = torch.stack([t.sum(dtype=torch.float64).to(m2[0].device) for t in m2]).tolist()
        mean_sq = _sq_norms(mean).tolist()
        numel = [p.numel() for p in params]
        stacked = {name: torch.stack(r).cpu() for name, r in rows.items()}

    def correlation(m: torch.Tensor) -> float:
        c = torch.corrcoef(m)
        off = c[~torch.eye(k, dtype=torch.bool)]
        return float(off.mean())

    def stats(idx: list[int], m: torch.Tensor) -> dict[str, Any]:
        count = sum(numel[i] for i in idx)
        return {
            "variance": math.fsum(var_sum[i] for i in idx) / (k - 1) / count,
            "mean_grad_sq": math.fsum(mean_sq[i] for i in idx) / count,
            "correlation": correlation(m),
            "sampled": int(m.shape[1]),
        }

    return {
        "batches": k,
        "sample": sample,
        "model": stats(list(range(len(params))), torch.cat(list(stacked.values()), dim=1)),
        "layers": {name: stats(idx, stacked[name]) for name, idx in layers.items()},
    }

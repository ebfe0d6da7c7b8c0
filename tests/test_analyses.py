"""gradviz.analyses checked against direct computations on small float64 models."""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradviz import analyses
from gradviz.errors import RecordingError

DT = torch.float64


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def mlp(seed: int = 0, n_in: int = 3, hidden: int = 5, n_out: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(DT)


def micro_batches(k: int, size: int, n_in: int = 3, n_out: int = 2, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k * size, n_in, generator=gen, dtype=DT)
    y = torch.randn(k * size, n_out, generator=gen, dtype=DT)
    return list(zip(x.split(size), y.split(size), strict=True))


def layer_grads(model: nn.Module, x: Any, y: Any) -> dict[str, torch.Tensor]:
    """Plain autograd: each layer's parameter gradients, flattened and concatenated."""
    names = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    mods = dict(model.named_modules())
    params = [p for n in names for p in mods[n].parameters(recurse=False)]
    grads = iter(torch.autograd.grad(mse(model, x, y), params))
    out = {}
    for n in names:
        out[n] = torch.cat([next(grads).reshape(-1) for _ in mods[n].parameters(recurse=False)])
    return out


def plain(obj: Any) -> bool:
    """Only JSON's own types all the way down (no tensors, no numpy scalars)."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(plain(v) for v in obj)
    return obj is None or type(obj) in (bool, int, float, str)


# -- gradient noise scale -------------------------------------------------------------------


def test_noise_scale_matches_the_estimator_by_hand() -> None:
    model, k, b = mlp(), 4, 3
    # targets far from the outputs: a gradient signal well above the noise, so |G|^2 > 0
    batches = [(x, y + 3) for x, y in micro_batches(k, b)]
    out = analyses.gradient_noise_scale(model, mse, batches)
    assert (out["b_small"], out["b_big"], out["batches"]) == (b, k * b, k)
    # G_big from one forward on the concatenated big batch, not from the micro-batches
    x_big = torch.cat([x for x, _ in batches])
    y_big = torch.cat([y for _, y in batches])
    big = layer_grads(model, x_big, y_big)
    small = [layer_grads(model, x, y) for x, y in batches]
    for name in ["0", "2"]:
        s = sum(float(g[name].square().sum()) for g in small) / k
        g_big = float(big[name].square().sum())
        grad_sq = (k * b * g_big - b * s) / (k * b - b)
        trace = (s - g_big) / (1 / b - 1 / (k * b))
        got = out["layers"][name]
        assert got["small_grad_sq"] == pytest.approx(s, rel=1e-12)
        assert got["big_grad_sq"] == pytest.approx(g_big, rel=1e-12)
        assert got["grad_sq"] == pytest.approx(grad_sq, rel=1e-10)
        assert got["trace_sigma"] == pytest.approx(trace, rel=1e-10)
        assert grad_sq > 0 and got["noise_scale"] == pytest.approx(trace / grad_sq, rel=1e-10)
    total = out["model"]
    assert total["trace_sigma"] == pytest.approx(
        sum(out["layers"][n]["trace_sigma"] for n in ["0", "2"]), rel=1e-12
    )
    assert sorted(out["layers"]) == ["0", "2"]
    assert plain(out) and json.loads(json.dumps(out)) == out


class LinearLoss(nn.Module):
    """Per-example loss -theta.z: the per-example gradient is -z, so G and Sigma are z's."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d, dtype=DT))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return -(z @ self.theta)


class TwoLosses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = LinearLoss(6), LinearLoss(4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.a(z[:, :6]) + self.b(z[:, 6:])


def test_noise_scale_recovers_a_known_distribution() -> None:
    # z ~ N(mu, diag(sigma^2)): |G|^2 = |mu|^2 and tr(Sigma) = sum(sigma^2), per layer and total
    mu = torch.tensor([0.5] * 6 + [1.0] * 4, dtype=DT)
    sigma = torch.tensor([1.0] * 6 + [0.5] * 4, dtype=DT)
    k, b = 1000, 4  # over 20 seeds the worst errors were 4% (trace), 4% (|G|^2), 6% (ratio)
    gen = torch.Generator().manual_seed(0)
    z = mu + sigma * torch.randn(k * b, 10, generator=gen, dtype=DT)
    batches = [(zi, None) for zi in z.split(b)]
    out = analyses.gradient_noise_scale(TwoLosses(), lambda m, x, _: m(x).mean(), batches)
    truth = {"a": (6 * 0.25, 6 * 1.0), "b": (4 * 1.0, 4 * 0.25), "model": (5.5, 7.0)}
    for name, (g2, tr) in truth.items():
        got = out["model"] if name == "model" else out["layers"][name]
        assert got["trace_sigma"] == pytest.approx(tr, rel=0.1)
        assert got["grad_sq"] == pytest.approx(g2, rel=0.1)
        assert got["noise_scale"] == pytest.approx(tr / g2, rel=0.15)


def test_noise_scale_is_nan_where_the_gradient_is_all_noise() -> None:
    # micro-batch gradients -v and +v: G_big = 0, so the |G|^2 estimate is -|v|^2 < 0
    v = torch.tensor([1.0, 2.0, 2.0], dtype=DT)
    batches = [(torch.stack([v, v]), None), (torch.stack([-v, -v]), None)]
    out = analyses.gradient_noise_scale(LinearLoss(3), lambda m, x, _: m(x).mean(), batches)
    got = out["model"]
    assert got["grad_sq"] == pytest.approx(-9.0)
    assert got["trace_sigma"] == pytest.approx(2 * 2 * 9.0)  # B_small * k/(k-1) * |v|^2
    assert math.isnan(got["noise_scale"])
    assert json.loads(json.dumps(out))["model"]["grad_sq"] == got["grad_sq"]


def test_noise_scale_input_errors() -> None:
    model = mlp()
    with pytest.raises(RecordingError, match="at least 2 batches, got 1"):
        analyses.gradient_noise_scale(model, mse, micro_batches(1, 4))
    uneven = micro_batches(2, 4) + micro_batches(1, 3)
    with pytest.raises(RecordingError, match=r"equal sizes, got sizes \[3, 4\]"):
        analyses.gradient_noise_scale(model, mse, uneven)
    with pytest.raises(RecordingError, match="pass batch_size"):
        analyses.gradient_noise_scale(model, lambda m, x, y: m(x[0]).sum(), [(["a"], 0)] * 2)
    with pytest.raises(RecordingError, match="not a scalar"):
        analyses.gradient_noise_scale(
            model, lambda m, x, y: (m(x) - y).square(), micro_batches(2, 4)
        )
    frozen = mlp().requires_grad_(False)
    with pytest.raises(RecordingError, match="no trainable parameters"):
        analyses.gradient_noise_scale(frozen, mse, micro_batches(2, 4))


# -- top Hessian eigenvalue ------------------------------------------------------------------


def full_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes, strict=True)]
        return F.mse_loss(functional_call(model, dict(zip(names, parts, strict=True)), (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def top_by_magnitude(h: torch.Tensor) -> float:
    eig = torch.linalg.eigvalsh(h)
    return float(eig[eig.abs().argmax()])


def test_hessian_eigenvalue_matches_the_full_hessian_of_an_mlp() -> None:
    model = mlp(seed=2)
    (x, y), *_ = micro_batches(1, 16, seed=5)
    expected = top_by_magnitude(full_hessian(model, x, y))
    out = analyses.top_hessian_eigenvalue(model, mse, x, y, iters=300, tol=1e-10)
    assert out["converged"] and out["iterations"] < 300
    assert out["eigenvalue"] == pytest.approx(expected, rel=1e-8)
    assert out["residual"] <= 1e-5
    assert plain(out)


class Quadratic(nn.Module):
    """loss = 0.5 theta^T A theta: the Hessian is A everywhere."""

    def __init__(self, eigenvalues: list[float], seed: int = 0) -> None:
        super().__init__()
        n = len(eigenvalues)
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
        self.a: torch.Tensor
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T)
        self.theta = nn.Parameter(torch.randn(n, generator=gen, dtype=DT))

    def forward(self, x: Any = None) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta


def quad_loss(model: nn.Module, x: Any, y: Any) -> torch.Tensor:
    return model()


def test_hessian_finds_a_negative_eigenvalue_of_largest_magnitude() -> None:
    model = Quadratic([-5.0, 2.0, 1.0, 0.5, -0.1])
    out = analyses.top_hessian_eigenvalue(model, quad_loss, None, None, iters=200, tol=1e-12)
    assert out["converged"]
    assert out["eigenvalue"] == pytest.approx(-5.0, rel=1e-9)
    assert out["eigenvalue"] == pytest.approx(top_by_magnitude(model.a), rel=1e-9)


def test_hessian_reports_no_convergence_for_plus_minus_pairs() -> None:
    # the Rayleigh quotient settles, but v flips between the +3 and -3 eigenvectors
    model = Quadratic([3.0, -3.0, 1.0])
    out = analyses.top_hessian_eigenvalue(model, quad_loss, None, None, iters=40)
    assert not out["converged"] and out["iterations"] == 40
    assert out["residual"] > 0.1


def test_hessian_is_seeded_and_checks_its_arguments() -> None:
    model = mlp()
    (x, y), *_ = micro_batches(1, 8)
    one = analyses.top_hessian_eigenvalue(model, mse, x, y, iters=5, seed=7)
    assert one == analyses.top_hessian_eigenvalue(model, mse, x, y, iters=5, seed=7)
    with pytest.raises(RecordingError, match="iters must be a positive integer, got 0"):
        analyses.top_hessian_eigenvalue(model, mse, x, y, iters=0)
    with pytest.raises(RecordingError, match="tol must be a number >= 0, got -1"):
        analyses.top_hessian_eigenvalue(model, mse, x, y, tol=-1)


class Attention(nn.Module):
    """One attention layer, by F.scaled_dot_product_attention or written out by hand."""

    def __init__(self, dim: int = 4, by_hand: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.qkv, self.out, self.by_hand = nn.Linear(dim, 3 * dim), nn.Linear(dim, 2), by_hand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (two heads: the fused kernels take (batch, heads, tokens, dim))
        q, k, v = (z.reshape(b, t, 2, d // 2).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        if self.by_hand:
            w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            y = w @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.mean(dim=2).reshape(b, d))


def test_hessian_through_scaled_dot_product_attention() -> None:
    # torch's fused attention kernels have no double backward: the analysis picks the math one
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=DT)
    fused, by_hand = Attention().to(DT), Attention(by_hand=True).to(DT)
    with pytest.raises(RuntimeError, match="not implemented"):  # (so the test can fail)
        grads = torch.autograd.grad(mse(fused, x, y), list(fused.parameters()),
                                    create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in grads), list(fused.parameters()))
    out = analyses.top_hessian_eigenvalue(fused, mse, x, y, iters=300, tol=1e-10)
    expected = top_by_magnitude(full_hessian(by_hand, x, y))
    assert out["converged"]
    assert out["eigenvalue"] == pytest.approx(expected, rel=1e-6)


def test_hessian_of_a_loss_linear_in_its_parameters_is_zero() -> None:
    model = LinearLoss(3)
    z = torch.ones(2, 3, dtype=DT)
    out = analyses.top_hessian_eigenvalue(model, lambda m, x, _: m(x).mean(), z, None)
    assert out["eigenvalue"] == 0.0 and out["converged"]


# -- gradient covariance ---------------------------------------------------------------------


def sampled_columns(layer_sizes: list[int], sample: int, seed: int) -> list[torch.Tensor]:
    """The documented draw: one randperm per layer, in order, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen)[:sample].sort().values for n in layer_sizes]


def mean_pair_corr(rows: torch.Tensor) -> float:
    c = torch.corrcoef(rows)
    k = rows.shape[0]
    return float(c[~torch.eye(k, dtype=torch.bool)].mean())


@pytest.mark.parametrize("sample", [1000, 7])
def test_covariance_matches_torch_var_and_corrcoef(sample: int) -> None:
    model, k = mlp(), 5
    batches = micro_batches(k, 4)
    out = analyses.gradient_covariance(model, mse, batches, sample=sample, seed=3)
    per = [layer_grads(model, x, y) for x, y in batches]
    names = ["0", "2"]
    cols = sampled_columns([per[0][n].numel() for n in names], sample, seed=3)
    for name, col in zip(names, cols, strict=True):
        stack = torch.stack([g[name] for g in per])  # k x n
        got = out["layers"][name]
        assert got["variance"] == pytest.approx(float(stack.var(dim=0).mean()), rel=1e-10)
        assert got["mean_grad_sq"] == pytest.approx(
            float(stack.mean(dim=0).square().mean()), rel=1e-10
        )
        assert got["sampled"] == min(sample, stack.shape[1])
        assert got["correlation"] == pytest.approx(mean_pair_corr(stack[:, col]), rel=1e-10)
        # torch.cov agrees with the variance on the sampled coordinates
        cov = torch.cov(stack[:, col].T)
        assert float(cov.diagonal().mean()) == pytest.approx(
            float(stack[:, col].var(dim=0).mean()), rel=1e-10
        )
    everything = torch.stack([torch.cat([g[n] for n in names]) for g in per])
    assert out["model"]["variance"] == pytest.approx(float(everything.var(dim=0).mean()), rel=1e-10)
    union = torch.cat(
        [torch.stack([g[n] for g in per])[:, c] for n, c in zip(names, cols, strict=True)], 1
    )
    assert out["model"]["correlation"] == pytest.approx(mean_pair_corr(union), rel=1e-10)
    assert out["batches"] == k and plain(out) and json.loads(json.dumps(out)) == out


def test_covariance_input_errors_and_unused_layers() -> None:
    model = mlp()
    with pytest.raises(RecordingError, match="at least 2 batches, got 0"):
        analyses.gradient_covariance(model, mse, [])
    with pytest.raises(RecordingError, match="sample must be an integer >= 2, got 1"):
        analyses.gradient_covariance(model, mse, micro_batches(2, 4), sample=1)
    with pytest.raises(RecordingError, match="not an \\(x, y\\) pair"):
        bad: Any = [torch.ones(2, 3)] * 2
        analyses.gradient_covariance(model, mse, bad)

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2).to(DT), nn.Linear(3, 2).to(DT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    out = analyses.gradient_covariance(WithUnused(), mse, micro_batches(3, 4))
    assert out["layers"]["unused"]["variance"] == 0.0
    assert math.isnan(out["layers"]["unused"]["correlation"])
    noise = analyses.gradient_noise_scale(WithUnused(), mse, micro_batches(3, 4))
    assert math.isnan(noise["layers"]["unused"]["noise_scale"])
    assert noise["layers"]["used"]["trace_sigma"] > 0


# -- side effects ----------------------------------------------------------------------------


class Net(nn.Module):
    """BatchNorm (buffers that a forward in train mode updates) and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 4)
        self.fc3.weight = self.fc2.weight
        self.head = nn.Linear(4, 2)
        self.out: weakref.ref[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc3(torch.tanh(self.fc2(torch.tanh(self.bn(self.fc1(x))))))
        out = self.head(h)
        self.out = weakref.ref(out)  # the autograd graph saves it: alive while the graph is
        return out


RUNS: dict[str, Callable[[nn.Module, list], dict[str, Any]]] = {
    "noise_scale": lambda m, b: analyses.gradient_noise_scale(m, mse, b),
    "hessian": lambda m, b: analyses.top_hessian_eigenvalue(m, mse, b[0][0], b[0][1], iters=5),
    "covariance": lambda m, b: analyses.gradient_covariance(m, mse, b, sample=5),
}


def hooks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(p._backward_hooks or {})
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_leaves_the_model_as_it_was(kind: str) -> None:
    model = Net().to(DT)
    batches = micro_batches(3, 4)
    mse(model, *batches[0]).backward()  # a .grad the caller is in the middle of using
    model.head.bias.grad = None  # and one that is absent
    with torch.no_grad():
        model.bn.running_mean.add_(0.5)  # type: ignore[union-attr]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    before = hooks(model)

    with torch.no_grad():  # the analyses turn grad on themselves
        out = RUNS[kind](model, batches)

    assert plain(out)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        want = grads[n]
        if want is None:
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.equal(p.grad, want), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert hooks(model) == before == 0
    module_globals = torch.nn.modules.module
    assert not module_globals._global_forward_hooks
    assert not module_globals._global_backward_hooks
    gc.collect()
    assert model.out is not None and model.out() is None  # no graph kept alive
    if kind != "hessian":
        # the tied weight counts in both owners' layers
        assert {"fc1", "bn", "fc2", "fc3", "head"} <= set(out["layers"])


def test_cost_is_stated_for_every_analysis() -> None:
    assert set(analyses.COST) == {"noise_scale", "hessian", "covariance"}
    assert all(isinstance(v, str) and len(v) > 20 for v in analyses.COST.values())

"""Frozen copy of gradviz/diagnose.py as of commit 2def0dc (the per-step Python loops).

The reference that tests/test_diagnose.py compares the vectorised diagnose() against: the
same findings, in the same order, with the same texts and numbers, on every input. Do not
edit it to follow changes in gradviz/diagnose.py; a change in behaviour there is meant to
show up as a difference here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradviz.store import Run

SEVERITIES = ("critical", "warning", "info")
KINDS = ("non-finite", "exploding", "vanishing", "dead-relu", "saturation", "no-gradient",
         "unstable", "frozen")
MIN_DEPTH = 5  # layers needed before a trend with depth means anything


@dataclass(frozen=True)
class Thresholds:
    """When a number counts as a problem; the defaults are the usual rules of thumb."""

    vanishing: float = 1e-7  # a layer's gradient norm below this has vanished
    exploding: float = 100.0  # ...above this is exploding (critical above 100x this)
    dead: float = 0.2  # fraction of a ReLU's units zero for every sample
    saturated: float = 0.5  # fraction of sigmoid/tanh values within a margin of a bound
    jump: float = 10.0  # a layer's norm changing by more than this factor in one step
    depth_ratio: float = 1e3  # first/last layer norm ratio that counts as a trend with depth
    spike: float = 3.0  # loss above this many times its recent median


def diagnose(run: Run, thresholds: Thresholds | None = None) -> list[dict[str, Any]]:
    """All findings for a run, most severe first."""
    t = thresholds or Thresholds()
    ctx = _Context(run)
    findings: list[dict[str, Any]] = []
    for check in (_non_finite, _exploding, _vanishing, _dead_relu, _saturation, _no_gradient,
                  _unstable):
        findings.extend(check(ctx, t))
    findings.sort(key=lambda f: (SEVERITIES.index(f["severity"]), KINDS.index(f["kind"])))
    return findings


def worst(findings: Sequence[dict[str, Any]]) -> str | None:
    """The most severe severity among findings, or None when there are none."""
    levels = [SEVERITIES.index(f["severity"]) for f in findings]
    return SEVERITIES[min(levels)] if levels else None


def format_report(findings: Sequence[dict[str, Any]], limit: int = 20) -> str:
    """A short ranked text report; one line when the flow looks healthy."""
    if not findings:
        return "gradient flow looks healthy: no findings"
    lines = []
    for f in findings[:limit]:
        layers = _layer_list(f["layers"])
        lo, hi = f["steps"]
        steps = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        lines.append(f"{f['severity'].upper():8} {f['kind']:11} {layers} ({steps}): "
                     f"{f['message']}")
        if f["suggestions"]:
            lines.append(f"{'':21}try: {f['suggestions'][0]}")
            lines.extend(f"{'':26}{s}" for s in f["suggestions"][1:3])
    if len(findings) > limit:
        lines.append(f"... and {len(findings) - limit} more")
    return "\n".join(lines)


# -- the run, as the checks need it ------------------------------------------------------


class _Context:
    """Layers in forward order and their series, read once."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.steps = run.steps or [0]
        nodes = [n for n in run.nodes if n.get("kind", "layer") != "junction"]
        nodes.sort(key=lambda n: n.get("order", math.inf))
        self.layers = nodes
        meta = run.meta if isinstance(run.meta, dict) else {}
        self.lr = meta.get("lr")
        self.skipped = set(meta.get("skipped_steps", []))
        # The checks index series step by step: converting a series once, not once per
        # step, keeps diagnosis linear in steps x layers (the viewer runs it on open).
        self._series: dict[tuple[str, str], list[float | None]] = {}

    def series(self, nid: str, key: str = "gradient_norm") -> list[float | None]:
        xs = self._series.get((nid, key))
        if xs is not None:
            return xs
        if not self.run.steps:  # a file without history: the top-level value is all there is
            node = next(n for n in self.run.nodes if n["id"] == nid)
            xs = [node.get(key, node.get("stats", {}).get(key))]
        else:
            xs = self.run.node_history(nid, key)
        self._series[(nid, key)] = xs
        return xs

    def typical(self, nid: str, key: str = "gradient_norm") -> float | None:
        """Median of the finite values over the later half of the run."""
        xs = self.series(nid, key)
        late = [x for x in xs[len(xs) // 2:] if x is not None and math.isfinite(x)]
        return statistics.median(late) if late else None

    def span(self, xs: Sequence[float | None], bad: Any) -> list[int]:
        """[first, last] step at which bad(x) holds, or the whole run."""
        hits = [s for s, x in zip(self.steps, xs, strict=False) if x is not None and bad(x)]
        return [hits[0], hits[-1]] if hits else [self.steps[0], self.steps[-1]]


def _finding(kind: str, severity: str, layers: list[str], steps: list[int], message: str,
             evidence: dict[str, Any], suggestions: list[str]) -> dict[str, Any]:
    return {"kind": kind, "severity": severity, "layers": layers, "steps": steps,
            "message": message, "evidence": evidence, "suggestions": suggestions}


def _lower_lr(ctx: _Context, factor: float = 10.0) -> str:
    if isinstance(ctx.lr, (int, float)) and ctx.lr > 0:
        return f"a lower learning rate: {ctx.lr / factor:g} instead of {ctx.lr:g}"
    return f"a learning rate {factor:g}x lower"


def _clip(value: float | None) -> str:
    if value is not None and math.isfinite(value) and value > 0:
        return ("gradient clipping: torch.nn.utils.clip_grad_norm_(model.parameters(), "
                f"max_norm={_round(value)})")
    return "gradient clipping: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)"


def _round(x: float) -> str:
    return f"{float(f'{x:.1g}'):g}"


def _layer_list(layers: Sequence[str], most: int = 3) -> str:
    if len(layers) <= most:
        return ", ".join(layers)
    return f"{', '.join(layers[:most])} and {len(layers) - most} more"


# -- the checks ---------------------------------------------------------------------------


def _non_finite(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    run = ctx.run
    loss = run.loss if run.steps else []
    first: int | None = None
    for i in range(len(ctx.steps)):
        values = [loss[i]] if i < len(loss) else []
        for n in ctx.layers:
            values += [ctx.series(n["id"])[i], ctx.series(n["id"], "activation_grad_norm")[i]]
        if any(v is not None and not math.isfinite(v) for v in values):
            first = i
            break
    if first is None:
        return []
    step = ctx.steps[first]

    def bad_at(key: str) -> list[dict[str, Any]]:
        return [n for n in ctx.layers
                if (v := ctx.series(n["id"], key)[first]) is not None and not math.isfinite(v)]

    # Backward runs from the output: the last layer in forward order is the first to go bad.
    bad = bad_at("activation_grad_norm") or bad_at("gradient_norm")
    origin = bad[-1]["id"] if bad else None
    def nonfinite(v: float | None) -> bool:
        return v is not None and not math.isfinite(v)

    bad_steps = [s for i, s in enumerate(ctx.steps)
                 if any(nonfinite(ctx.series(n["id"])[i]) for n in ctx.layers)
                 or (i < len(loss) and nonfinite(loss[i]))]
    if bad_steps and set(bad_steps) <= ctx.skipped:
        return [_finding(
            "non-finite", "info", [origin] if origin else [], [bad_steps[0], bad_steps[-1]],
            f"{len(bad_steps)} steps had inf/NaN gradients and GradScaler skipped them "
            "(expected now and then with loss scaling)",
            {"skipped_steps": len(bad_steps)}, [])]
    where = f" first at {origin}" if origin else " in the loss"
    return [_finding(
        "non-finite", "critical", [n["id"] for n in reversed(bad)] or [], [step, bad_steps[-1]],
        f"NaN/Inf gradients from step {step}{where} (in backward order), "
        f"{len(bad_steps)} steps affected",
        {"first_step": step, "first_layer": origin, "steps_affected": len(bad_steps),
         "loss_at_first": loss[first] if first < len(loss) else None},
        [_lower_lr(ctx), _clip(None),
         "check the inputs and the loss for NaN/Inf (log of 0, division by 0)",
         "mixed precision: use bfloat16, or torch.amp.GradScaler with float16"])]


def _trend(ctx: _Context, key: str = "gradient_norm") -> dict[str, Any] | None:
    """Per-layer factor and first/last ratio of typical norms along forward order."""
    pts = [(n["id"], v) for n in ctx.layers
           if (v := ctx.typical(n["id"], key)) is not None and v > 0]
    if len(pts) < MIN_DEPTH:
        return None
    ys = [math.log10(v) for _, v in pts]
    xs = list(range(len(ys)))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    return {"first": pts[0][0], "last": pts[-1][0], "ratio": pts[0][1] / pts[-1][1],
            "factor_per_layer": 10 ** (-slope), "layers": [nid for nid, _ in pts]}


def _vanishing(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    low = [(n["id"], v) for n in ctx.layers
           if (v := ctx.typical(n["id"])) is not None and v < t.vanishing]
    trend = _trend(ctx)
    decays = trend is not None and trend["ratio"] < 1 / t.depth_ratio
    if not low and not decays:
        return []
    evidence: dict[str, Any] = {"threshold": t.vanishing}
    parts = []
    if low:
        evidence["below_threshold"] = {nid: v for nid, v in low}
        parts.append(f"gradient norm {min(v for _, v in low):.2g} (< {t.vanishing:g}) "
                     f"in {len(low)} layers")
    if trend is not None and decays:
        evidence |= {"decay_per_layer": trend["factor_per_layer"],
                     "first_last_ratio": trend["ratio"]}
        parts.append(f"shrinks about {1 / trend['factor_per_layer']:.2g}x per layer towards "
                     f"the input, {trend['first']}/{trend['last']} = {trend['ratio']:.2g}")
    layers = [nid for nid, _ in low] or trend["layers"][: max(1, len(trend["layers"]) // 2)]  # type: ignore[index]
    xs = ctx.series(layers[0])
    acts = {n.get("activation") for n in ctx.layers}
    tips = []
    if acts & {"Sigmoid", "Tanh"}:
        tips.append("ReLU or GELU instead of sigmoid/tanh (their derivative is at most 0.25/1)")
    tips += ["residual connections (x + f(x)) so gradient skips the deep stack",
             "He (kaiming_normal_) initialisation for ReLU, Xavier for tanh",
             "BatchNorm or LayerNorm between layers"]
    return [_finding("vanishing", "critical" if low else "warning", layers,
                     ctx.span(xs, lambda x: x < t.vanishing) if low else
                     [ctx.steps[0], ctx.steps[-1]],
                     "; ".join(parts), evidence, tips)]


def _exploding(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    high = [(n["id"], v) for n in ctx.layers
            if (v := ctx.typical(n["id"])) is not None and v > t.exploding]
    trend = _trend(ctx)
    grows_depth = trend is not None and trend["ratio"] > t.depth_ratio
    growing = _growing_over_steps(ctx)
    if not high and not grows_depth and not growing:
        return []
    evidence: dict[str, Any] = {"threshold": t.exploding}
    parts = []
    top = max((v for _, v in high), default=None)
    if high:
        evidence["above_threshold"] = {nid: v for nid, v in high}
        parts.append(f"gradient norm up to {top:.3g} (> {t.exploding:g}) in {len(high)} layers")
    if trend is not None and grows_depth:
        evidence |= {"growth_per_layer": 1 / trend["factor_per_layer"],
                     "first_last_ratio": trend["ratio"]}
        parts.append(f"grows about {trend['factor_per_layer']:.2g}x per layer towards the "
                     f"input, {trend['first']}/{trend['last']} = {trend['ratio']:.2g}")
    if growing:
        evidence["growth_over_steps"] = growing
        parts.append(f"total norm grew {growing['factor']:.2g}x over the run")
    layers = [nid for nid, _ in high] or (trend["layers"][:1] if trend else
                                          [n["id"] for n in ctx.layers[:1]])
    severe = top is not None and top > t.exploding * 100
    return [_finding(
        "exploding", "critical" if severe else "warning", layers,
        ctx.span(ctx.series(layers[0]), lambda x: x > t.exploding),
        "; ".join(parts), evidence,
        [_clip(t.exploding / 10 if top else None), _lower_lr(ctx),
         "smaller initial weights: Xavier (xavier_normal_) or He (kaiming_normal_) init",
         "BatchNorm or LayerNorm between layers", "weight decay"])]


def _growing_over_steps(ctx: _Context) -> dict[str, float] | None:
    """The whole model's gradient norm rising steadily and a lot over the run."""
    n = len(ctx.steps)
    if n < 20:
        return None
    totals = []
    for i in range(n):
        sq = [v * v for nd in ctx.layers if (v := ctx.series(nd["id"])[i]) is not None]
        totals.append(math.sqrt(sum(sq)) if sq else None)
    vals = [(i, v) for i, v in enumerate(totals) if v is not None and math.isfinite(v) and v > 0]
    if len(vals) < 20:
        return None
    k = max(3, len(vals) // 10)
    start = statistics.median(v for _, v in vals[:k])
    end = statistics.median(v for _, v in vals[-k:])
    if end < 100 * start:
        return None
    rising = sum(b > a for (_, a), (_, b) in zip(vals, vals[1:], strict=False))
    if rising < 0.6 * (len(vals) - 1):
        return None
    return {"factor": end / start, "start": start, "end": end}


def _per_layer(ctx: _Context, key: str, limit: float) -> dict[str, float]:
    """Layers whose typical value of a forward statistic is above limit, in forward order."""
    return {n["id"]: v for n in ctx.layers
            if (v := ctx.typical(n["id"], key)) is not None and v > limit}


def _dead_relu(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    dead = _per_layer(ctx, "dead_frac", t.dead)
    if not dead:
        return []
    layers = sorted(dead, key=lambda nid: -dead[nid])
    top = dead[layers[0]]
    return [_finding(
        "dead-relu", "critical" if top >= 0.9 else "warning", layers,
        ctx.span(ctx.series(layers[0], "dead_frac"), lambda x: x > t.dead),
        f"up to {top:.0%} of the ReLU units after {layers[0]} output 0 for every sample "
        f"(> {t.dead:.0%}; {len(layers)} layers)",
        {"dead_fraction": dead, "threshold": t.dead},
        ["LeakyReLU(0.01) or GELU, which keep a gradient below 0",
         "He (kaiming_normal_) initialisation and biases at 0, not negative",
         _lower_lr(ctx), "BatchNorm before the ReLU"])]


def _saturation(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    sat = _per_layer(ctx, "saturated_frac", t.saturated)
    if not sat:
        return []
    layers = sorted(sat, key=lambda nid: -sat[nid])
    acts = sorted({n.get("activation", "sigmoid/tanh") for n in ctx.layers if n["id"] in sat})
    return [_finding(
        "saturation", "warning", layers,
        ctx.span(ctx.series(layers[0], "saturated_frac"), lambda x: x > t.saturated),
        f"{sat[layers[0]]:.0%} of the {'/'.join(acts)} outputs after {layers[0]} sit at "
        f"their bounds, where the derivative is about 0 ({len(layers)} layers)",
        {"saturated_fraction": sat, "threshold": t.saturated, "activation": acts},
        ["smaller initial weights: Xavier (xavier_normal_) initialisation",
         "BatchNorm or LayerNorm before the activation",
         "ReLU or GELU instead of sigmoid/tanh"])]


def _no_gradient(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    missing, frozen = [], []
    for n in ctx.layers:
        params = n.get("params", {})
        trainable = [p for p, info in params.items() if info.get("trainable", True)]
        if params and not trainable:
            frozen.append(n["id"])
            continue
        if not ctx.run.steps:
            if trainable and n.get("gradient_norm") is None:
                missing.append(n["id"])
            continue
        for p in trainable:
            if all(v is None for v in ctx.run.param_history(n["id"], p)):
                missing.append(n["id"])
                break
    out = []
    span = [ctx.steps[0], ctx.steps[-1]]
    if missing:
        out.append(_finding(
            "no-gradient", "warning", missing, span,
            "trainable parameters that never received a gradient: the layer is unused, "
            "or its output is detached from the loss",
            {"layers": len(missing)},
            ["remove the unused layer, or find where its output is detached "
             "(.detach(), torch.no_grad(), .item(), a numpy round trip)",
             "if it is meant to be fixed, freeze it: requires_grad_(False)"]))
    if frozen:
        out.append(_finding("frozen", "info", frozen, span,
                            f"{len(frozen)} frozen layers (requires_grad=False): no gradients "
                            "by design", {"layers": len(frozen)}, []))
    return out


def _unstable(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    out = []
    loss = ctx.run.loss if ctx.run.steps else []
    finite = [(s, v) for s, v in zip(ctx.steps, loss, strict=False)
              if v is not None and math.isfinite(v)]
    start = statistics.median(v for _, v in finite[:10]) if finite else None
    loss_at = dict(finite)
    if len(finite) >= 20:
        assert start is not None
        spikes = []
        for i in range(10, len(finite)):
            recent = statistics.median(v for _, v in finite[i - 10:i])
            s, v = finite[i]
            # A spike jumps well above the recent level and undoes real progress.
            if recent > 0 and v > t.spike * recent and v > 0.5 * start:
                spikes.append((s, v, recent))
        if spikes:
            out.append(_finding(
                "unstable", "warning", [], [spikes[0][0], spikes[-1][0]],
                f"the loss spiked {len(spikes)} times, up to "
                f"{max(v / r for _, v, r in spikes):.2g}x its recent level",
                {"spikes": len(spikes), "first_spike_step": spikes[0][0]},
                [_lower_lr(ctx), "learning-rate warm-up", _clip(None)]))
        late = [v for _, v in finite[len(finite) // 2:]]
        diffs = [b - a for a, b in zip(late, late[1:], strict=False)]
        turns = sum(1 for a, b in zip(diffs, diffs[1:], strict=False) if a * b < 0)
        swing = statistics.median(abs(d) for d in diffs) if diffs else 0.0
        level = statistics.median(late)
        # Oscillation: the loss goes up and down by more than half its level, at most
        # steps, and stays far from converged (noise around a tiny loss is no problem).
        if (len(diffs) >= 10 and turns > 0.6 * (len(diffs) - 1) and swing > 0.5 * level
                and level > 0.1 * start):
            out.append(_finding(
                "unstable", "warning", [], [finite[len(finite) // 2][0], finite[-1][0]],
                f"the loss oscillates: it changes by {swing:.2g} ({swing / level:.0%} of its "
                f"level) from step to step, up and down",
                {"median_change": swing, "level": level, "turns": turns},
                [_lower_lr(ctx), "a larger batch size", "learning-rate warm-up"]))
    jumps: dict[str, list[tuple[int, float]]] = {}
    warm = max(1, len(ctx.steps) // 20)  # the first steps move a lot in any healthy run
    for n in ctx.layers:
        xs = ctx.series(n["id"])
        ok = [x for x in xs if x is not None and math.isfinite(x) and x > 1e-12]
        if len(ok) < 3:
            continue
        level = statistics.median(ok)
        for i in range(max(warm, 1), len(xs)):
            b = xs[i]
            before = [x for x in xs[max(0, i - 5):i]
                      if x is not None and math.isfinite(x) and x > 1e-12]
            if b is None or not math.isfinite(b) or not before:
                continue
            # A jump leaves the recent level by > t.jump and lands above the run's usual
            # level: bursts among tiny gradients of a converged model do not count.
            base = statistics.median(before)
            factor = b / base
            step = ctx.steps[i]
            converged = start is not None and step in loss_at and loss_at[step] < 0.1 * start
            if factor > t.jump and b > level and not converged:
                jumps.setdefault(n["id"], []).append((step, factor))
    if jumps:
        steps = sorted(s for js in jumps.values() for s, _ in js)
        biggest = max(f for js in jumps.values() for _, f in js)
        out.append(_finding(
            "unstable", "warning", list(jumps), [steps[0], steps[-1]],
            f"gradient norms jumped more than {t.jump:g}x between consecutive steps "
            f"({len(steps)} times, up to {biggest:.2g}x)",
            {"jumps": len(steps), "largest_factor": biggest, "threshold": t.jump},
            [_lower_lr(ctx), _clip(None), "learning-rate warm-up"]))
    return out

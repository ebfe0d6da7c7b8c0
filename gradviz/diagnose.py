"""Find gradient pathologies in a recorded run, name the layers and steps, suggest fixes.

Pure data in, data out: ``diagnose(run)`` reads a :class:`gradviz.store.Run` (no torch) and
returns findings as plain dicts, the same objects training_output.json keeps under
``"findings"``::

    {"kind": "vanishing", "severity": "critical", "layers": ["layers.0", ...],
     "steps": [0, 199], "evidence": {...}, "message": "...", "suggestions": ["...", ...]}

"Typical" values are medians over the later half of the recorded steps, so a layer is
judged by how it settled, not by its first step. Thresholds default to the usual rules of
thumb and can be changed (:class:`Thresholds`).
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import schema
from .store import Run

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
    """All findings for a run, most severe first; of equal severity, a cause before the
    vanishing gradient it explains."""
    findings = _checks(run, thresholds)
    if not any(f["kind"] == "vanishing" for f in findings):
        return findings
    layers = sorted((n for n in run.nodes if n.get("kind", "layer") != "junction"),
                    key=lambda n: schema.order_key(n.get("order")))
    return _explained(findings, {n["id"]: i for i, n in enumerate(layers)})


def _checks(run: Run, thresholds: Thresholds | None = None) -> list[dict[str, Any]]:
    """Each check's findings, most severe first (tests/_diagnose_reference.py's, exactly)."""
    t = thresholds or Thresholds()
    if run.version and not run.steps:
        return []  # a recording that stopped before its first step: nothing was measured
    ctx = _Context(run)
    findings: list[dict[str, Any]] = []
    for check in (_non_finite, _exploding, _vanishing, _dead_relu, _saturation, _no_gradient,
                  _unstable):
        findings.extend(check(ctx, t))
    findings.sort(key=lambda f: (SEVERITIES.index(f["severity"]), KINDS.index(f["kind"])))
    return findings


# What stops the gradient at an activation, as a vanishing finding's cause: its words
_CAUSES = {"dead-relu": "dead ReLUs", "saturation": "saturated units"}


def _explained(findings: list[dict[str, Any]], order: dict[str, int]) -> list[dict[str, Any]]:
    """A vanishing gradient only in the layers up to a dead ReLU or a saturated sigmoid,
    not decaying with depth, is that finding's symptom: it says so and takes the cause's
    cures first (its own are for deep stacks: "residual connections" for a 3-layer MLP
    whose ReLUs died), and the cause comes first among findings of its severity (the
    report led with the symptom). A cause's layer is the one feeding the activation: the
    gradient stops there, so that layer and the ones before it lose theirs."""
    vanishing = next(f for f in findings if f["kind"] == "vanishing")
    if "decay_per_layer" in vanishing["evidence"]:
        return findings  # (a decay with depth: a deep stack's, whose cures are its own)
    for cause in findings:
        if cause["kind"] not in _CAUSES:
            continue
        last = max((order.get(nid, -1) for nid in cause["layers"]), default=-1)
        if not vanishing["layers"] or any(order.get(nid, last + 1) > last
                                          for nid in vanishing["layers"]):
            continue
        own = [s for s in vanishing["suggestions"] if s not in cause["suggestions"]]
        explained = {**vanishing,
                     "message": f"{vanishing['message']}; the {_CAUSES[cause['kind']]} after "
                                f"{_layer_list(cause['layers'])} stop it (see {cause['kind']})",
                     "evidence": {**vanishing["evidence"], "explained_by": cause["kind"]},
                     "suggestions": [*cause["suggestions"], *own]}
        out = [explained if f is vanishing else f for f in findings]
        out.sort(key=lambda f: (SEVERITIES.index(f["severity"]), f is explained,
                                KINDS.index(f["kind"])))
        return out
    return findings


def worst(findings: Sequence[dict[str, Any]]) -> str | None:
    """The most severe severity among findings, or None when there are none."""
    levels = [SEVERITIES.index(f["severity"]) for f in findings]
    return SEVERITIES[min(levels)] if levels else None


def terminal_width() -> int | None:
    """format_report's width for standard output: a terminal's; None into a pipe or a file
    (one line a finding, for grep)."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def format_report(findings: Sequence[dict[str, Any]], limit: int = 20,
                  width: int | None = None) -> str:
    """A short ranked text report; one line when the flow looks healthy. width: wrap each
    line to it (a terminal's), continuing under its text; None: one line a finding."""
    if not findings:
        return "gradient flow looks healthy: no findings"
    lines: list[str] = []

    def put(text: str, indent: int) -> None:
        if width is None or len(text) <= width:
            lines.append(text)
        else:  # (never narrower than 40 columns of text)
            lines.extend(textwrap.wrap(text, max(width, indent + 40),
                                       subsequent_indent=" " * indent,
                                       break_on_hyphens=False))

    for f in findings[:limit]:
        layers = _layer_list(f["layers"])
        span = list(f["steps"])  # [first, last]; a file's own findings may give fewer
        lo, hi = (span + span)[:2] if span else (None, None)
        steps = "no step" if lo is None else f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        put(f"{f['severity'].upper():8} {f['kind']:11} {layers} ({steps}): "
            f"{f['message']}", 21)
        if f["suggestions"]:  # (a cure's own next line goes further in than the next cure)
            put(f"{'':21}try: {f['suggestions'][0]}", 28)
            for s in f["suggestions"][1:3]:
                put(f"{'':26}{s}", 28)
    if len(findings) > limit:
        lines.append(f"... and {len(findings) - limit} more")
    return "\n".join(lines)


# -- the run, as the checks need it ------------------------------------------------------
#
# The checks work on whole (layers x steps) matrices with numpy: the viewer diagnoses a
# file on open, and a loop in Python over 10,000 steps x 500 layers takes seconds. Every
# number that reaches a finding is still computed as plain Python floats would compute it
# (medians as statistics.median, sums in the same order), so the findings stay exactly
# what the per-step loops gave; tests/_diagnose_reference.py keeps those loops to compare.


class _Context:
    """Layers in forward order and their series as matrices, read once."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.steps = run.steps or [0]
        nodes = [n for n in run.nodes if n.get("kind", "layer") != "junction"]
        nodes.sort(key=lambda n: schema.order_key(n.get("order")))
        self.layers = nodes
        self.ids = [n["id"] for n in nodes]
        self.row: dict[str, int] = {}  # a layer's row in the matrices (ids repeat: the first)
        for i, nid in enumerate(self.ids):
            self.row.setdefault(nid, i)
        meta = run.meta if isinstance(run.meta, dict) else {}
        self.lr = meta.get("lr")
        self.skipped = set(meta.get("skipped_steps", []))
        self.loss: list[float | None] = run.loss if run.steps else []
        self._matrix: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._typical: dict[str, list[Any]] = {}
        self._trend: dict[str, Any] | None = None
        self._trend_done = False

    def _top(self, nid: str, key: str) -> Any:
        """A file without history: the top-level value is all there is."""
        node = next(n for n in self.run.nodes if n["id"] == nid)
        return node.get(key, node.get("stats", {}).get(key))

    def matrix(self, key: str = "gradient_norm") -> tuple[np.ndarray, np.ndarray]:
        """(values, present): float64 (layers x steps), values NaN where absent."""
        got = self._matrix.get(key)
        if got is not None:
            return got
        n, rows = len(self.steps), len(self.ids)
        if not self.run.steps:
            tops = [self._top(nid, key) for nid in self.ids]
            present = np.array([v is not None for v in tops], dtype=bool).reshape(rows, 1)
            values = np.array([math.nan if v is None else float(v) for v in tops],
                              dtype=np.float64).reshape(rows, 1)
        else:
            raw = schema.absent_array(rows * n).reshape(rows, n)
            keys = self.run.keys()
            for i, nid in enumerate(self.ids):
                if ("node", nid, key) in keys:
                    raw[i] = self.run.array(("node", nid, key))
            present = ~schema.absent_mask(raw)
            values = raw.astype(np.float64)
        self._matrix[key] = values, present
        return values, present

    def typical(self, key: str = "gradient_norm") -> list[Any]:
        """Per layer: median of the finite values over the later half of the run, or None."""
        got = self._typical.get(key)
        if got is not None:
            return got
        out: list[Any] = []
        if not self.run.steps:
            # one value: its median is itself, whatever type the file gave it
            for nid in self.ids:
                x = self._top(nid, key)
                out.append(x if x is not None and math.isfinite(x) else None)
        else:
            values, present = self.matrix(key)
            late = values[:, len(self.steps) // 2:]
            valid = present[:, len(self.steps) // 2:] & np.isfinite(late)
            counts = valid.sum(axis=1)
            for i in range(len(self.ids)):
                out.append(_median(late[i][valid[i]]) if counts[i] else None)
        self._typical[key] = out
        return out

    def trend(self) -> dict[str, Any] | None:
        """The gradient norm's trend with depth (see _trend), computed once."""
        if not self._trend_done:
            self._trend, self._trend_done = _trend(self), True
        return self._trend

    def span(self, nid: str, key: str, bad: Callable[[np.ndarray], np.ndarray]) -> list[int]:
        """[first, last] step at which bad(x) holds in a layer's series, or the whole run."""
        values, present = self.matrix(key)
        i = self.row[nid]
        with np.errstate(invalid="ignore"):
            hits = np.flatnonzero(present[i] & bad(values[i]))
        if not hits.size:
            return [self.steps[0], self.steps[-1]]
        return [self.steps[int(hits[0])], self.steps[int(hits[-1])]]


def _median(a: np.ndarray) -> float:
    """statistics.median of a non-empty 1-d array of finite floats, to the last bit."""
    n = a.size
    h = n // 2
    if np.count_nonzero(a) < n:
        # 0.0 and -0.0 compare equal: which one lands in the middle depends on the order
        # a sort keeps them in, so let statistics.median sort as it always has.
        return statistics.median(a.tolist())
    if n % 2:
        return float(np.partition(a, h)[h])
    s = np.partition(a, (h - 1, h))
    return (float(s[h - 1]) + float(s[h])) / 2


def _finding(kind: str, severity: str, layers: list[str], steps: list[int], message: str,
             evidence: dict[str, Any], suggestions: list[str]) -> dict[str, Any]:
    return {"kind": kind, "severity": severity, "layers": layers, "steps": steps,
            "message": message, "evidence": evidence, "suggestions": suggestions}


def _count(n: int, what: str) -> str:
    """3 layers, 1 layer."""
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


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
    loss = ctx.loss
    grad, grad_present = ctx.matrix("gradient_norm")
    act, act_present = ctx.matrix("activation_grad_norm")
    bad_grad = grad_present & ~np.isfinite(grad)
    bad_act = act_present & ~np.isfinite(act)
    bad_loss = np.zeros(len(ctx.steps), dtype=bool)
    bad_loss[: len(loss)] = [v is not None and not math.isfinite(v) for v in loss]
    bad_step = bad_loss | bad_grad.any(axis=0)  # the steps counted as affected
    any_bad = bad_step | bad_act.any(axis=0)
    if not any_bad.any():
        return []
    first = int(np.argmax(any_bad))
    step = ctx.steps[first]

    def bad_at(bad: np.ndarray) -> list[dict[str, Any]]:
        return [ctx.layers[i] for i in np.flatnonzero(bad[:, first]).tolist()]

    # Backward runs from the output: the last layer in forward order is the first to go bad.
    bad = bad_at(bad_act) or bad_at(bad_grad)
    origin = bad[-1]["id"] if bad else None
    bad_steps = [ctx.steps[i] for i in np.flatnonzero(bad_step).tolist()]
    # Only activation gradients went bad, parameter gradients and the loss stayed finite
    # (a NaN that never reached a parameter, or a layer without any): the steps affected
    # are those where an activation gradient is NaN/Inf.
    act_only = not bad_steps
    if act_only:
        bad_steps = [ctx.steps[i] for i in np.flatnonzero(any_bad).tolist()]
    if set(bad_steps) <= ctx.skipped:
        return [_finding(
            "non-finite", "info", [origin] if origin else [], [bad_steps[0], bad_steps[-1]],
            f"{len(bad_steps)} steps had inf/NaN gradients and GradScaler skipped them "
            "(expected now and then with loss scaling)",
            {"skipped_steps": len(bad_steps)}, [])]
    where = f" first at {origin}" if origin else " in the loss"
    what, rest = "gradients", ""
    evidence: dict[str, Any] = {}
    if act_only:
        what, rest = "activation gradients", "; parameter gradients and the loss stayed finite"
        evidence = {"activation_gradients_only": True}
    return [_finding(
        "non-finite", "critical", [n["id"] for n in reversed(bad)] or [], [step, bad_steps[-1]],
        f"NaN/Inf {what} from step {step}{where} (in backward order), "
        f"{len(bad_steps)} steps affected{rest}",
        {"first_step": step, "first_layer": origin, "steps_affected": len(bad_steps),
         "loss_at_first": loss[first] if first < len(loss) else None} | evidence,
        [_lower_lr(ctx), _clip(None),
         "check the inputs and the loss for NaN/Inf (log of 0, division by 0)",
         "mixed precision: use bfloat16, or torch.amp.GradScaler with float16"])]


def _trend(ctx: _Context, key: str = "gradient_norm") -> dict[str, Any] | None:
    """Per-layer factor and first/last ratio of typical norms along forward order."""
    pts = [(nid, v) for nid, v in zip(ctx.ids, ctx.typical(key), strict=True)
           if v is not None and v > 0]
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
    low = [(nid, v) for nid, v in zip(ctx.ids, ctx.typical(), strict=True)
           if v is not None and v < t.vanishing]
    trend = ctx.trend()
    decays = trend is not None and trend["ratio"] < 1 / t.depth_ratio
    if not low and not decays:
        return []
    evidence: dict[str, Any] = {"threshold": t.vanishing}
    parts = []
    if low:
        evidence["below_threshold"] = {nid: v for nid, v in low}
        parts.append(f"gradient norm {min(v for _, v in low):.2g} (< {t.vanishing:g}) "
                     f"in {_count(len(low), 'layer')}")
    if trend is not None and decays:
        evidence |= {"decay_per_layer": trend["factor_per_layer"],
                     "first_last_ratio": trend["ratio"]}
        parts.append(f"shrinks about {1 / trend['factor_per_layer']:.2g}x per layer towards "
                     f"the input, {trend['first']}/{trend['last']} = {trend['ratio']:.2g}")
    layers = [nid for nid, _ in low] or trend["layers"][: max(1, len(trend["layers"]) // 2)]  # type: ignore[index]
    acts = {n.get("activation") for n in ctx.layers}
    tips = []
    if acts & {"Sigmoid", "Tanh"}:
        tips.append("ReLU or GELU instead of sigmoid/tanh (their derivative is at most 0.25/1)")
    tips += ["residual connections (x + f(x)) so gradient skips the deep stack",
             "He (kaiming_normal_) initialisation for ReLU, Xavier for tanh",
             "BatchNorm or LayerNorm between layers"]
    return [_finding("vanishing", "critical" if low else "warning", layers,
                     ctx.span(layers[0], "gradient_norm", lambda x: x < t.vanishing) if low
                     else [ctx.steps[0], ctx.steps[-1]],
                     "; ".join(parts), evidence, tips)]


def _exploding(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    high = [(nid, v) for nid, v in zip(ctx.ids, ctx.typical(), strict=True)
            if v is not None and v > t.exploding]
    trend = ctx.trend()
    grows_depth = trend is not None and trend["ratio"] > t.depth_ratio
    growing = _growing_over_steps(ctx)
    if not high and not grows_depth and not growing:
        return []
    evidence: dict[str, Any] = {"threshold": t.exploding}
    parts = []
    top = max((v for _, v in high), default=None)
    if high:
        evidence["above_threshold"] = {nid: v for nid, v in high}
        parts.append(f"gradient norm up to {top:.3g} (> {t.exploding:g}) in "
                     f"{_count(len(high), 'layer')}")
    if trend is not None and grows_depth:
        evidence |= {"growth_per_layer": 1 / trend["factor_per_layer"],
                     "first_last_ratio": trend["ratio"]}
        parts.append(f"grows about {trend['factor_per_layer']:.2g}x per layer towards the "
                     f"input, {trend['first']}/{trend['last']} = {trend['ratio']:.2g}")
    if growing:
        evidence["growth_over_steps"] = growing
        parts.append(f"total norm grew {growing['factor']:.2g}x over the run")
    layers = [nid for nid, _ in high] or (trend["layers"][:1] if trend else ctx.ids[:1])
    severe = top is not None and top > t.exploding * 100
    return [_finding(
        "exploding", "critical" if severe else "warning", layers,
        ctx.span(layers[0], "gradient_norm", lambda x: x > t.exploding),
        "; ".join(parts), evidence,
        [_clip(t.exploding / 10 if top else None), _lower_lr(ctx),
         "smaller initial weights: Xavier (xavier_normal_) or He (kaiming_normal_) init",
         "BatchNorm or LayerNorm between layers", "weight decay"])]


def _growing_over_steps(ctx: _Context) -> dict[str, float] | None:
    """The whole model's gradient norm rising steadily and a lot over the run."""
    n = len(ctx.steps)
    if n < 20:
        return None
    values, present = ctx.matrix()
    with np.errstate(invalid="ignore", over="ignore"):
        squares = np.where(present, values * values, 0.0)
        rough = np.sqrt(squares.sum(axis=0))  # numpy's order of summation, not Python's
    # Which totals count (finite, > 0) does not depend on the order of summation: the terms
    # are squares, so a total is NaN or inf exactly when a term is, and 0 when all are.
    counted = present.any(axis=0) & np.isfinite(rough) & (rough > 0)
    m = int(np.count_nonzero(counted))
    if m < 20:
        return None
    k = max(3, m // 10)
    kept = rough[counted]
    # Rounding moves each total by far less than 1e-6 of itself, and the medians with them:
    # well below 100x growth, the answer is None whatever the order of summation.
    if float(np.median(kept[-k:])) < 100 * float(np.median(kept[:k])) * (1 - 1e-6):
        return None
    # Near or above 100x: the totals exactly as Python's sum gives them (its algorithm
    # changed in Python 3.12), step by step.
    totals: list[float | None] = []
    all_present = bool(present.all())
    for row, here in zip(squares.T.tolist(), present.T.tolist(), strict=True):
        sq = row if all_present else [x for x, p in zip(row, here, strict=True) if p]
        totals.append(math.sqrt(sum(sq)) if sq else None)
    vals = [(i, v) for i, v in enumerate(totals) if v is not None and math.isfinite(v) and v > 0]
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
    return {nid: v for nid, v in zip(ctx.ids, ctx.typical(key), strict=True)
            if v is not None and v > limit}


def _dead_relu(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    dead = _per_layer(ctx, "dead_frac", t.dead)
    if not dead:
        return []
    layers = sorted(dead, key=lambda nid: -dead[nid])
    top = dead[layers[0]]
    return [_finding(
        "dead-relu", "critical" if top >= 0.9 else "warning", layers,
        ctx.span(layers[0], "dead_frac", lambda x: x > t.dead),
        f"up to {top:.0%} of the ReLU units after {layers[0]} output 0 for every sample "
        f"(> {t.dead:.0%}; {_count(len(layers), 'layer')})",
        {"dead_fraction": dead, "threshold": t.dead},
        ["LeakyReLU(0.01) or GELU, which keep a gradient below 0",
         "He (kaiming_normal_) initialisation and biases at 0, not negative",
         _lower_lr(ctx), "BatchNorm before the ReLU"])]


def _saturation(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    sat = _per_layer(ctx, "saturated_frac", t.saturated)
    if not sat:
        return []
    layers = sorted(sat, key=lambda nid: -sat[nid])
    acts = sorted({n.get("activation") or "sigmoid/tanh" for n in ctx.layers if n["id"] in sat})
    return [_finding(
        "saturation", "warning", layers,
        ctx.span(layers[0], "saturated_frac", lambda x: x > t.saturated),
        f"{sat[layers[0]]:.0%} of the {'/'.join(acts)} outputs after {layers[0]} sit at "
        f"their bounds, where the derivative is about 0 ({_count(len(layers), 'layer')})",
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
            if schema.absent_mask(ctx.run.array(("param", n["id"], p))).all():
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
                            f"{_count(len(frozen), 'frozen layer')} (requires_grad=False): no "
                            "gradients by design", {"layers": len(frozen)}, []))
    return out


def _unstable(ctx: _Context, t: Thresholds) -> list[dict[str, Any]]:
    out = []
    finite = [(s, v) for s, v in zip(ctx.steps, ctx.loss, strict=False)
              if v is not None and math.isfinite(v)]
    start = statistics.median(v for _, v in finite[:10]) if finite else None
    loss_at = dict(finite)
    if len(finite) >= 20:
        assert start is not None
        spikes = _loss_spikes(finite, start, t)
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
            # (a loss that can go negative may settle around 0: no share of its level then)
            share = f"{swing / level:.0%} of its level" if level else "around a level of 0"
            out.append(_finding(
                "unstable", "warning", [], [finite[len(finite) // 2][0], finite[-1][0]],
                f"the loss oscillates: it changes by {swing:.2g} ({share}) "
                f"from step to step, up and down",
                {"median_change": swing, "level": level, "turns": turns},
                [_lower_lr(ctx), "a larger batch size", "learning-rate warm-up"]))
    # Steps near convergence, where bursts among tiny gradients are no problem.
    converged = np.array([start is not None and s in loss_at and loss_at[s] < 0.1 * start
                          for s in ctx.steps], dtype=bool)
    jumps = _norm_jumps(ctx, t, converged)
    if jumps:
        layers, first, last, count, biggest = jumps
        out.append(_finding(
            "unstable", "warning", layers, [first, last],
            f"gradient norms jumped more than {t.jump:g}x between consecutive steps "
            f"({count} times, up to {biggest:.2g}x)",
            {"jumps": count, "largest_factor": biggest, "threshold": t.jump},
            [_lower_lr(ctx), _clip(None), "learning-rate warm-up"]))
    return out


def _loss_spikes(finite: list[tuple[int, float]], start: float,
                 t: Thresholds) -> list[tuple[int, float, float]]:
    """(step, loss, recent median) where the loss jumps well above its last 10 values."""
    loss = np.array([v for _, v in finite], dtype=np.float64)
    # Sorted windows of the 10 losses before each one from the 11th: the median is the mean
    # of the middle two, as statistics.median takes it. Equal values that differ (0.0 and
    # -0.0) only give a median of 0 either way, which is never a spike's level.
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(loss, 10)[:-1], axis=1)
    recent = (windows[:, 4] + windows[:, 5]) / 2
    now = loss[10:]
    # A spike jumps well above the recent level and undoes real progress.
    with np.errstate(over="ignore", invalid="ignore"):
        hit = (recent > 0) & (now > t.spike * recent) & (now > 0.5 * start)
    return [(finite[i + 10][0], finite[i + 10][1], float(recent[i]))
            for i in np.flatnonzero(hit).tolist()]


def _norm_jumps(ctx: _Context, t: Thresholds, converged: np.ndarray
                ) -> tuple[list[str], int, int, int, float] | None:
    """Layers whose norm left its recent level by more than t.jump: (layers, first step,
    last step, number of jumps, largest factor), or None."""
    values, present = ctx.matrix()
    rows, n = values.shape
    warm = max(1, n // 20)  # the first steps move a lot in any healthy run
    if not rows or n <= warm:
        return None
    with np.errstate(invalid="ignore"):
        finite = present & np.isfinite(values)
        ok = finite & (values > 1e-12)
    counts = ok.sum(axis=1)
    # A layer's usual level: the median of its usable values (layers with fewer than 3 are
    # left out; an infinite level keeps them out below).
    level = np.full(rows, np.inf)
    for i in np.flatnonzero(counts >= 3).tolist():
        level[i] = _median(values[i][ok[i]])
    # The recent level before step i: the median of the usable values among the 5 before
    # it. Their minimum bounds it from below, so b / minimum >= b / median for b > 0: the
    # steps where that ratio passes t.jump are the only candidates, checked exactly below.
    padded = np.full((rows, n + 5), np.inf)
    padded[:, 5:] = np.where(ok, values, np.inf)
    usable = np.zeros((rows, n + 5), dtype=np.int8)
    usable[:, 5:] = ok
    lowest = padded[:, 4:n + 4].copy()
    before = usable[:, 4:n + 4].copy()
    for k in range(2, 6):
        np.minimum(lowest, padded[:, 5 - k:n + 5 - k], out=lowest)
        before += usable[:, 5 - k:n + 5 - k]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # A jump leaves the recent level by > t.jump and lands above the run's usual level:
        # bursts among tiny gradients of a converged model do not count.
        cand = finite & (before > 0) & (values > level[:, None]) & ~converged[None, :]
        cand[:, :warm] = False
        cand &= values / lowest > t.jump
    r, c = np.nonzero(cand)
    if not r.size:
        return None
    at = r * (n + 5) + c + 5  # where step c of layer r is in padded, flattened
    flat = padded.ravel()
    window = np.sort(np.stack([flat[at - k] for k in range(1, 6)], axis=1), axis=1)
    have = before[r, c].astype(np.intp)
    mid = have // 2
    hi = window[np.arange(r.size), mid]
    lo = window[np.arange(r.size), np.maximum(mid - 1, 0)]
    base = np.where(have % 2 == 1, hi, (lo + hi) / 2)  # as statistics.median
    factor = values[r, c] / base
    jumped = factor > t.jump
    if not jumped.any():
        return None
    r, c, factor = r[jumped], c[jumped], factor[jumped]
    layers = list(dict.fromkeys(ctx.ids[i] for i in np.unique(r).tolist()))
    steps = [ctx.steps[i] for i in np.unique(c).tolist()]
    return layers, min(steps), max(steps), int(r.size), float(factor.max())

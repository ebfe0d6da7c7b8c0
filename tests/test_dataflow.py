"""gradviz.dataflow.analyse: same Flow as the frozen quadratic original, in linear time.

_reference_analyse below is a verbatim copy of analyse (and its helpers) as it was before it
was made linear (commit 2def0dc); only the function names differ. Every test compares the
current analyse against it on real autograd graphs, collected the way gradviz.capture does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from gradviz import dataflow, demos
from gradviz.dataflow import Call, Edge, Flow, Junction, Port

Node = Any
Key = tuple[str, int]

# -- frozen reference (verbatim copy of gradviz/dataflow.py at 2def0dc) ------------------


def _ref_op_name(node: Node) -> str:
    """'AddBackward0' -> 'add'."""
    name = type(node).__name__
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.lower() or "op"


def _ref_is_leaf(node: Node) -> bool:
    return type(node).__name__ == "AccumulateGrad" or not hasattr(node, "next_functions")


def _ref_seq(node: Node) -> int:
    return int(node._sequence_nr())



def _reference_analyse(
    calls: Sequence[Call], glue_names: dict[int, str], taken: set[str]
) -> Flow:
    """Find junctions, edges and ports among the given calls (see module docstring).

    glue_names maps id(autograd node) of a parameter-free module's output to that module's
    name, for the edges' ``via`` lists and for naming junctions; taken holds names already
    used by nodes, so a junction never collides with one.
    """
    producer: dict[int, int] = {}  # id(node) -> call index, for call outputs
    for ci, call in enumerate(calls):
        for node, _ in call.outs:
            producer.setdefault(id(node), ci)

    # 1. Each call's own region: from its outputs back to its inputs.
    owner_call: dict[int, int] = {}  # id(node) -> call index, for nodes inside a call
    boundary: list[tuple[Node, int, Node, int]] = []  # (node, index, target, output_nr)
    region_of: dict[int, Key] = {}  # id(region node) -> consumer key
    input_ports: list[list[Port]] = [[] for _ in calls]
    for ci, call in enumerate(calls):
        ins = {id(n) for n in call.ins}
        stack = [n for n, _ in call.outs if id(n) not in owner_call]
        for n in stack:
            owner_call[id(n)] = ci
        while stack:
            n = stack.pop()
            region_of[id(n)] = ("call", ci)
            for i, (m, nr) in enumerate(n.next_functions):
                if m is None or _ref_is_leaf(m):
                    continue
                if id(m) in ins:
                    input_ports[ci].append(Port(n, i, (id(m), nr)))
                if id(m) in producer or id(m) in ins:
                    boundary.append((n, i, m, nr))
                elif id(m) not in owner_call:
                    owner_call[id(m)] = ci
                    stack.append(m)

    # 2. Discover the glue between calls and who sits directly below each glue node.
    glue: dict[int, Node] = {}
    down: dict[int, set[Key]] = {}  # id(glue) -> {("call", ci) | ("glue", id)}

    def is_glue(m: Node) -> bool:
        return not _ref_is_leaf(m) and id(m) not in producer and id(m) not in owner_call

    stack = []
    for n, _, m, _ in boundary:
        if is_glue(m):
            down.setdefault(id(m), set()).add(region_of[id(n)])
            if id(m) not in glue:
                glue[id(m)] = m
                stack.append(m)
    while stack:
        g = stack.pop()
        for m, _ in g.next_functions:
            if m is not None and is_glue(m):
                down.setdefault(id(m), set()).add(("glue", id(g)))
                if id(m) not in glue:
                    glue[id(m)] = m
                    stack.append(m)
    order = sorted(glue.values(), key=_ref_seq)  # inputs before the ops that read them

    def source_of(m: Node) -> Key | None:
        if id(m) in producer:
            return ("call", producer[id(m)])
        if id(m) in owner_call:
            return ("call", owner_call[id(m)])
        return None

    junction_ids: set[int] = set()

    def upstream() -> dict[int, frozenset[Key]]:
        ups: dict[int, frozenset[Key]] = {}
        for g in order:
            acc: set[Key] = set()
            for m, _ in g.next_functions:
                if m is None or _ref_is_leaf(m):
                    continue
                if id(m) in junction_ids:
                    acc.add(("junction", id(m)))
                elif id(m) in glue:
                    acc |= ups[id(m)]
                else:
                    src = source_of(m)
                    if src is not None:
                        acc.add(src)
            ups[id(g)] = frozenset(acc)
        return ups

    # 3. Merges: glue reading two or more distinct producers through different inputs.
    ups: dict[int, frozenset[Key]] = {}
    for g in order:
        slots = []
        for m, _ in g.next_functions:
            if m is None or _ref_is_leaf(m):
                continue
            if id(m) in junction_ids:
                slots.append(frozenset([("junction", id(m))]))
            elif id(m) in glue:
                slots.append(ups[id(m)])
            else:
                src = source_of(m)
                slots.append(frozenset([src]) if src is not None else frozenset())
        union = frozenset().union(*slots) if slots else frozenset()
        if sum(1 for s in slots if s) >= 2 and len(union) >= 2:
            junction_ids.add(id(g))
            ups[id(g)] = frozenset([("junction", id(g))])
        else:
            ups[id(g)] = union

    # 4. Fan-outs: glue whose result reaches two or more consumers. Outputs first, so the
    #    junction sits where the paths split, not further up.
    consumer_of: dict[int, Key | None] = {}
    for g in reversed(order):
        if id(g) in junction_ids:
            consumer_of[id(g)] = ("junction", id(g))
            continue
        owners: set[Key | None] = set()
        for ref in down.get(id(g), ()):
            if ref[0] == "call":
                owners.add(ref)
            else:
                owners.add(consumer_of[ref[1]])
        owners.discard(None)
        if len(owners) == 1:
            consumer_of[id(g)] = owners.pop()
        elif owners and ups[id(g)]:
            junction_ids.add(id(g))
            consumer_of[id(g)] = ("junction", id(g))
        else:
            consumer_of[id(g)] = None
    ups = upstream()  # again, now that fan-out junctions cut some paths

    # 5. Name junctions and index consumers.
    junctions: list[Junction] = []
    jindex: dict[int, int] = {}
    counters: dict[str, int] = {}
    for g in order:
        if id(g) not in junction_ids:
            continue
        base = glue_names.get(id(g)) or _ref_op_name(g)
        name = base
        while name in taken:
            counters[base] = counters.get(base, 1) + 1
            name = f"{base}#{counters[base]}"
        taken.add(name)
        jindex[id(g)] = len(junctions)
        junctions.append(Junction(name, g, _ref_op_name(g)))

    def consumer_index(key: Key) -> tuple[str, int]:
        kind, ref = key
        if kind == "call":
            return calls[ref].name, ref
        j = jindex[ref]
        return junctions[j].name, len(calls) + j

    def source_name(m: Node) -> str | None:
        if id(m) in junction_ids:
            return junctions[jindex[id(m)]].name
        src = source_of(m)
        return calls[src[1]].name if src is not None else None

    # 6. Ports: every slot of a consumer's region that points at a producer or junction.
    edges: dict[tuple[str, int], Edge] = {}
    regions: list[tuple[Node, Key]] = [(n, region_of[id(n)]) for n, _, _, _ in boundary]
    regions += [(g, ("junction", id(g))) for g in order if id(g) in junction_ids]
    for g in order:
        ckey = consumer_of[id(g)]
        if id(g) not in junction_ids and ckey is not None:
            regions.append((g, ckey))
    seen: set[tuple[int, int]] = set()
    for n, key in regions:
        cname, cidx = consumer_index(key)
        for i, (m, nr) in enumerate(n.next_functions):
            if m is None or _ref_is_leaf(m) or (id(n), i) in seen:
                continue
            if id(m) in glue and id(m) not in junction_ids:
                continue  # not an end of a path yet: glue further up carries it
            if region_of.get(id(n)) == key and id(m) in owner_call and id(m) not in producer:
                continue  # inside the consumer itself
            sname = source_name(m)
            if sname is None:
                continue
            seen.add((id(n), i))
            edge = edges.get((sname, cidx))
            if edge is None:
                edge = edges[(sname, cidx)] = Edge(sname, cname, cidx)
            edge.ports.append(Port(n, i, (id(m), nr)))

    # 7. via: named parameter-free modules on the glue between source and consumer.
    for (sname, cidx), edge in edges.items():
        names = []
        for g in order:
            if id(g) in junction_ids or id(g) not in glue_names:
                continue
            ckey = consumer_of[id(g)]
            if ckey is None or consumer_index(ckey)[1] != cidx:
                continue
            if any(_ref_source_label(u, calls, junctions, jindex) == sname for u in ups[id(g)]):
                names.append(glue_names[id(g)])
        edge.via = list(dict.fromkeys(names))
    return Flow(junctions, list(edges.values()), input_ports)


def _ref_source_label(
    key: Key, calls: Sequence[Call], junctions: list[Junction], jindex: dict[int, int]
) -> str:
    kind, ref = key
    return calls[ref].name if kind == "call" else junctions[jindex[ref]].name


# -- collecting calls the way gradviz.capture does ----------------------------------------


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def collect(
    model: nn.Module, *inputs: Any, all_modules: bool = False
) -> tuple[list[Call], dict[int, str], set[str], Any]:
    """Run one forward pass; return (calls, glue names, node names, output), as capture has them.

    Mirrors gradviz.capture.Recorder: modules with parameters of their own (with all_modules,
    also every named leaf module) are nodes, and a forward hook on each appends a
    dataflow.Call of its outputs' and inputs' autograd nodes; every other named leaf module
    is glue, and its hook names its outputs' autograd nodes (first name wins).
    """
    calls: list[Call] = []
    glue: dict[int, str] = {}
    nodes: set[str] = set()

    def call_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            outs: list[tuple[Any, int]] = []
            for t in _tensors(output):
                if t.grad_fn is None or (t.grad_fn, t.output_nr) in outs:
                    continue
                outs.append((t.grad_fn, t.output_nr))
            if outs:
                ins = [t.grad_fn for t in _tensors((args, kwargs)) if t.grad_fn is not None]
                calls.append(Call(name, outs, ins))

        return hook

    def glue_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            for t in _tensors(output):
                if t.grad_fn is not None:
                    glue.setdefault(id(t.grad_fn), name)

        return hook

    handles = []
    for name, module in model.named_modules():
        is_leaf = next(iter(module.children()), None) is None
        if list(module.parameters(recurse=False)) or (all_modules and is_leaf and name):
            node = name or type(module).__name__
            nodes.add(node)
            handles.append(module.register_forward_hook(call_hook(node), with_kwargs=True))
        elif is_leaf and name:
            handles.append(module.register_forward_hook(glue_hook(name), with_kwargs=True))
    try:
        out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls, glue, nodes, out


def _ports(ports: list[Port]) -> list[tuple[int, int, tuple[int, int]]]:
    return [(id(p.node), p.index, p.target) for p in ports]


def _canonical(flow: Flow) -> dict[str, Any]:
    """Everything a Flow says, with autograd nodes replaced by their ids."""
    return {
        "junctions": [(j.name, id(j.node), j.op) for j in flow.junctions],
        "edges": [
            (e.source, e.target, e.consumer, list(e.via), _ports(e.ports)) for e in flow.edges
        ],
        "input_ports": [_ports(ps) for ps in flow.input_ports],
    }


def assert_same_flow(calls: list[Call], glue: dict[int, str], taken: set[str]) -> Flow:
    """The current analyse and the frozen reference agree exactly, taken names included."""
    taken_ref, taken_new = set(taken), set(taken)
    expected = _reference_analyse(calls, dict(glue), taken_ref)
    got = dataflow.analyse(calls, dict(glue), taken_new)
    assert _canonical(got) == _canonical(expected)
    assert taken_new == taken_ref
    return got


# -- models -------------------------------------------------------------------------------


class Residual(nn.Module):
    """Two residual blocks, one with `+` and one with in-place `+=`, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.a1, self.a2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b1, self.b2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.a2(self.act(self.a1(x)))
        y = self.b2(self.act(self.b1(x)))
        y += x
        return self.head(self.act(y))


class Concat(nn.Module):
    """Three branches joined by torch.cat, one of them through a named activation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.act(self.b(x)), self.c(x)], dim=1))


class FanOut(nn.Module):
    """One layer's output read by two layers, and an activation's output read by two more."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.left, self.right = nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.GELU()
        self.p, self.q = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(x)
        a, b = self.left(h), self.right(h)
        z = self.act(a * b)
        return self.p(z), self.q(z)


class Twice(nn.Module):
    """One layer called twice (shared weights), with a skip around the second call."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.shared = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.shared(self.inp(x)))
        h = self.act(self.shared(h)) + h
        return self.head(h)


class Mixer(nn.Module):
    """A layer that concatenates many inputs inside itself: one node, many boundary slots."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8 * k, 8) / k)

    def forward(self, *xs: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat(xs, dim=1) @ self.weight
        return y if extra is None else y + extra


class Mixed(nn.Module):
    """Chunked glue fanning out, keyword inputs, a dropout, a tuple-returning layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.branches = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.mix = Mixer(5)
        self.drop = nn.Dropout(0.5)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.inp(x).chunk(2, dim=1)
        outs = [b(lo if i % 2 else hi) for i, b in enumerate(self.branches)]
        m = self.mix(*outs, lo, extra=self.drop(hi))
        seq, h = self.gru(m.unsqueeze(1))
        return self.head(seq[:, -1] + h[0])


HAND_WRITTEN = {
    "residual": (Residual, lambda: torch.randn(4, 8)),
    "concat": (Concat, lambda: torch.randn(4, 8)),
    "fan-out": (FanOut, lambda: torch.randn(4, 8)),
    "twice": (Twice, lambda: torch.randn(4, 8)),
    "mixed": (Mixed, lambda: torch.randn(4, 8)),
}


# -- same output as the reference ---------------------------------------------------------


@pytest.mark.parametrize("all_modules", [False, True], ids=["layers", "all-modules"])
@pytest.mark.parametrize("name", list(demos.DEMOS))
def test_demo_flow_matches_reference(name: str, all_modules: bool) -> None:
    torch.manual_seed(0)
    demo = demos.DEMOS[name]
    x, _ = demo.data(8, torch.Generator().manual_seed(1))
    calls, glue, taken, _ = collect(demo.build(), x, all_modules=all_modules)
    assert calls
    flow = assert_same_flow(calls, glue, taken)
    assert flow.edges or len(calls) == 1


@pytest.mark.parametrize("all_modules", [False, True], ids=["layers", "all-modules"])
@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_flow_matches_reference(name: str, all_modules: bool) -> None:
    torch.manual_seed(0)
    build, data = HAND_WRITTEN[name]
    calls, glue, taken, _ = collect(build(), data(), all_modules=all_modules)
    flow = assert_same_flow(calls, glue, taken)
    assert flow.edges


def test_hand_written_models_exercise_junctions_and_via() -> None:
    """The hand-written models do reach the cases they are meant to: merges, fan-outs, via."""
    torch.manual_seed(0)
    seen_ops: set[str] = set()
    via: set[str] = set()
    for build, data in HAND_WRITTEN.values():
        calls, glue, taken, _ = collect(build(), data())
        flow = dataflow.analyse(calls, glue, taken)
        seen_ops |= {j.op for j in flow.junctions}
        via |= {v for e in flow.edges for v in e.via}
    assert {"add", "cat", "mul"} <= seen_ops
    assert {"act", "drop"} <= via


def test_same_flow_when_taken_names_collide() -> None:
    """Junction names skip names already taken, numbering on: same names as the reference."""
    torch.manual_seed(0)
    calls, glue, taken, _ = collect(Residual(), torch.randn(4, 8))
    flow = assert_same_flow(calls, glue, taken | {"add", "add#2", "act"})
    assert any(j.name.startswith("add#") for j in flow.junctions)


# -- scaling ------------------------------------------------------------------------------


def _chain(depth: int, d: int = 8) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(d, d), nn.ReLU()]
    return nn.Sequential(*layers)


class _Counter:
    n = 0


class _GlueNames(dict):  # type: ignore[type-arg]
    """glue_names that counts its lookups."""

    def __contains__(self, key: object) -> bool:
        _Counter.n += 1
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> str:
        _Counter.n += 1
        return super().__getitem__(key)  # type: ignore[no-any-return]

    def get(self, key: Any, default: Any = None) -> Any:
        _Counter.n += 1
        return super().get(key, default)


def _mirror(calls: list[Call], glue: dict[int, str]) -> tuple[list[Call], _GlueNames]:
    """Stand-ins for the autograd graph behind calls that count every look at a node.

    Each real node gets a proxy of a class with the same name (analyse reads type names),
    the same sequence number and mirrored next_functions. Reading next_functions or calling
    _sequence_nr counts one operation, as does each lookup in the returned glue names.
    """
    classes: dict[str, type] = {}

    def next_functions(self: Any) -> tuple[tuple[Any, int], ...]:
        _Counter.n += 1
        return self.nexts  # type: ignore[no-any-return]

    def _sequence_nr(self: Any) -> int:
        _Counter.n += 1
        return self.seq  # type: ignore[no-any-return]

    # Every node reachable from the calls, each once (iteratively: chains are deep).
    real: dict[int, Any] = {}
    stack = [n for c in calls for n in [*(n for n, _ in c.outs), *c.ins]]
    while stack:
        n = stack.pop()
        if n is None or id(n) in real:
            continue
        real[id(n)] = n
        stack.extend(m for m, _ in getattr(n, "next_functions", ()))
    proxies: dict[int, Any] = {}
    for key, n in real.items():
        name = type(n).__name__
        if name not in classes:
            attrs = {"next_functions": property(next_functions), "_sequence_nr": _sequence_nr}
            classes[name] = type(name, (), attrs)
        proxies[key] = classes[name]()
        proxies[key].seq = n._sequence_nr()
    for key, n in real.items():
        proxies[key].nexts = tuple(
            (proxies[id(m)] if m is not None else None, nr)
            for m, nr in getattr(n, "next_functions", ())
        )
    mirrored = [
        Call(c.name, [(proxies[id(n)], nr) for n, nr in c.outs], [proxies[id(n)] for n in c.ins])
        for c in calls
    ]
    names = _GlueNames()
    for key, name in glue.items():
        if key in proxies:
            names[id(proxies[key])] = name
    return mirrored, names


def _operations(analyse: Any, depth: int) -> int:
    """How many times analyse looks at a node or a glue name, for a Linear+ReLU chain."""
    torch.manual_seed(0)
    calls, glue, taken, out = collect(_chain(depth), torch.randn(2, 8))
    mirrored, names = _mirror(calls, glue)
    assert len(names) == depth - 1  # every ReLU output but the last (no call reads it)
    _Counter.n = 0
    flow = analyse(mirrored, names, set(taken))
    assert len(flow.edges) == depth - 1
    assert all(len(e.via) == 1 for e in flow.edges)  # each edge passes one ReLU
    return _Counter.n


def test_analyse_work_grows_linearly_with_depth() -> None:
    """4x the layers: about 4x the operations (the quadratic original did about 16x)."""
    ratio = _operations(dataflow.analyse, 400) / _operations(dataflow.analyse, 100)
    assert ratio < 5, f"analyse did {ratio:.1f}x the work for 4x the depth"


def test_operation_count_catches_the_quadratic_reference() -> None:
    """The probe above measures something: the original analyse fails it."""
    ratio = _operations(_reference_analyse, 400) / _operations(_reference_analyse, 100)
    assert ratio > 10


# -- shape: when a pass's analysis can be reused ------------------------------------------


def _by_place(flow: Flow, nodes: list[Any]) -> dict[str, Any]:
    """A Flow with each autograd node replaced by its place in shape()'s walk."""
    at = {id(n): i for i, n in enumerate(nodes)}

    def ports(ps: list[Port]) -> list[tuple[int, int, tuple[int, int]]]:
        return [(at[id(p.node)], p.index, (at[p.target[0]], p.target[1])) for p in ps]

    return {
        "junctions": [(j.name, at[id(j.node)], j.op) for j in flow.junctions],
        "edges": [(e.source, e.target, e.consumer, list(e.via), ports(e.ports))
                  for e in flow.edges],
        "input_ports": [ports(ps) for ps in flow.input_ports],
    }


def _two_passes(model: nn.Module, make: Any, all_modules: bool = False) -> list[Any]:
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        calls, glue, taken, result = collect(model, make(), all_modules=all_modules)
        key, nodes = dataflow.shape(calls, glue)
        flow = dataflow.analyse(calls, glue, taken)
        out.append((key, _by_place(flow, nodes), result))
    return out


@pytest.mark.parametrize("name", [*demos.DEMOS, *HAND_WRITTEN])
def test_equal_shapes_give_the_same_flow_node_for_node(name: str) -> None:
    """capture reuses a pass's hooks by shape: that is only right if the flow, written in
    places of the walk, is the same. Two passes with new data: equal shapes, equal flows."""
    torch.manual_seed(0)
    if name in demos.DEMOS:
        demo = demos.DEMOS[name]
        model = demo.build()
        gen = torch.Generator().manual_seed(3)
        make = lambda: demo.data(8, gen)[0]  # noqa: E731
    else:
        cls, make = HAND_WRITTEN[name]
        model = cls()
    for all_modules in (False, True):
        (k1, f1, _), (k2, f2, _) = _two_passes(model, make, all_modules)
        assert k1 == k2
        assert f1 == f2
        hash(k1)  # it is a dictionary key


class Branchy(nn.Module):
    """The glue between two layers depends on a flag: same calls, different graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.skip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y = self.b(torch.relu(h))
        return self.c(y + h if self.skip else y)


def test_a_different_graph_between_the_same_calls_changes_the_shape() -> None:
    model = Branchy()
    calls, glue, taken, _ = collect(model, torch.randn(4, 8))
    plain, _ = dataflow.shape(calls, glue)
    plain_flow = dataflow.analyse(calls, glue, set(taken))
    model.skip = True
    calls, glue, taken, _ = collect(model, torch.randn(4, 8))
    skip, _ = dataflow.shape(calls, glue)
    skip_flow = dataflow.analyse(calls, glue, set(taken))
    assert [c.name for c in calls] == ["a", "b", "c"]  # the calls alone look alike
    assert plain != skip
    assert {(e.source, e.target) for e in skip_flow.edges} != {
        (e.source, e.target) for e in plain_flow.edges}


def test_glue_names_are_part_of_the_shape() -> None:
    """The same graph with the activation module named or not: edges' via lists differ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    calls, glue, _, _ = collect(model, torch.randn(4, 8))
    named, _ = dataflow.shape(calls, glue)
    unnamed, _ = dataflow.shape(calls, {})
    assert glue and named != unnamed

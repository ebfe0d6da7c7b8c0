"""Recover the layer-to-layer dataflow of one forward pass from the autograd graph.

Given the module calls of a forward pass (each with the autograd nodes of its outputs and
inputs), walk ``grad_fn.next_functions`` between them and return:

- edges ``producer -> consumer`` for every path that carries data from one layer's output
  to another layer, through parameter-free glue (activations, reshapes, ``+``, ``cat``);
- junctions: glue nodes where several producers meet (``+`` of a residual, ``cat``) or
  where one glue result fans out to several consumers. A junction is a node of the graph,
  so each edge's gradient can be observed exactly (DESIGN.md 3);
- ports: ``(autograd node, input index)`` pairs whose ``grad_inputs[index]`` is a part of
  an edge's gradient. All ports of one edge into one producer output add up, as vectors,
  to that edge's share of dL/d(output).

Pure graph logic over autograd nodes: it registers nothing; gradviz.capture does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Node = Any  # torch.autograd.graph.Node; kept opaque so this module needs no torch import
Target = tuple[int, int]  # (id of a producer's autograd node, output index)
Key = tuple[str, int]  # ("call", call index) | ("glue" | "junction", id(autograd node))


@dataclass
class Call:
    """One call of a recorded module during a forward pass."""

    name: str
    outs: list[tuple[Node, int]]  # (grad_fn, output_nr) of each output tensor needing grad
    ins: list[Node]  # grad_fns of the input tensors (positional and keyword, nested too)
    # names of the calls inside this one start with this ("" for the root: all of them)
    within: str | None = None  # None: name + "."
    # the creation number the next autograd node would get when the call returned: every
    # node made after it has this one or a later one (-1: not known)
    ended: int = -1


@dataclass
class Port:
    """grad_inputs[index] of node is part of the gradient flowing along an edge (an index
    below 0: grad_outputs[-1 - index], all the gradient of that output)."""

    node: Node
    index: int
    target: Target  # which producer output it flows into


@dataclass
class Edge:
    """A dataflow connection, with the ports that carry its gradient."""

    source: str
    target: str
    consumer: int  # index of the consuming call or junction instance in this pass
    via: list[str] = field(default_factory=list)
    ports: list[Port] = field(default_factory=list)


@dataclass
class Junction:
    """A parameter-free node where producers meet or a result fans out."""

    name: str
    node: Node
    op: str


@dataclass
class Flow:
    """What one forward pass looks like: junctions, edges, and per-call input ports."""

    junctions: list[Junction]
    edges: list[Edge]
    input_ports: list[list[Port]]  # per call: ports whose gradient goes to the call's inputs
    # per call: ports inside it whose gradient goes to one of its own outputs (an LSTMCell's
    # h = o * tanh(c) reads its output c): the part of that output's gradient that did not
    # come from outside the call
    inner_ports: list[list[Port]] = field(default_factory=list)


def op_name(node: Node) -> str:
    """'AddBackward0' -> 'add'."""
    name = type(node).__name__
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.lower() or "op"


def _is_leaf(node: Node) -> bool:
    # (a torch.compile'd submodule's backward is one CompiledFunctionBackward node: gradviz
    # keeps out of compiled code, so the layers inside are not seen, and walking through
    # the node made up an edge from the layer before it to the layer after it)
    return type(node).__name__ in ("AccumulateGrad", "CompiledFunctionBackward") or not hasattr(
        node, "next_functions")


def _seq(node: Node) -> int:
    return int(node._sequence_nr())


def analyse(calls: Sequence[Call], glue_names: dict[int, str], taken: set[str]) -> Flow:
    """Find junctions, edges and ports among the given calls (see module docstring).

    glue_names maps id(autograd node) of a parameter-free module's output to that module's
    name, for the edges' ``via`` lists and for naming junctions; taken holds names already
    used by nodes, so a junction never collides with one.
    """
    producer: dict[int, int] = {}  # id(node) -> call index, for call outputs
    # A call that returns its input tensor itself (nn.Dropout(p=0) in training, nn.Identity,
    # under all_modules): its output's node is the one before it. It takes over as that
    # node's producer, so what reads it afterwards reads the call, and the edge into it
    # carries all of the node's gradient (its grad_output: port index -1 - output_nr).
    passed: list[tuple[int, int, Node, int]] = []  # (call, call before it, node, output_nr)
    for ci, call in enumerate(calls):
        for node, nr in call.outs:
            before = producer.setdefault(id(node), ci)
            if before != ci and any(n is node for n in call.ins):
                passed.append((ci, before, node, nr))
    if passed:
        # Only where nothing read the tensor before the call: a layer or an op that did
        # (h = a(x); b(h) or tanh(h); drop(h)) reads a's output, not drop's. "Before": made
        # before the call ended (without that number, before the last call that ended
        # before it did).
        first = _first_reader(calls, {id(node) for _, _, node, _ in passed})

        def ended(ci: int) -> int:
            if calls[ci].ended >= 0:
                return calls[ci].ended
            return max((_seq(n) + 1 for c in calls[:ci] for n, _ in c.outs), default=0)

        passed = [p for p in passed if first.get(id(p[2]), math.inf) >= ended(p[0])]
        for ci, _, node, _ in passed:
            producer[id(node)] = ci

    # 1. Each call's own region: from its outputs back to its inputs.
    owner_call: dict[int, int] = {}  # id(node) -> call index, for nodes inside a call
    boundary: list[tuple[Node, int, Node, int]] = []  # (node, index, target, output_nr)
    region_of: dict[int, Key] = {}  # id(region node) -> consumer key
    input_ports: list[list[Port]] = [[] for _ in calls]
    inner_ports: list[list[Port]] = [[] for _ in calls]

    def made_by(m: Node, ci: int) -> bool:
        """Whether m is calls[ci]'s own output node, made by it (not passed through)."""
        return producer.get(id(m)) == ci and owner_call.get(id(m)) == ci

    for ci, call in enumerate(calls):
        ins = {id(n) for n in call.ins}
        stack = [n for n, _ in call.outs if id(n) not in owner_call]
        for n in stack:
            owner_call[id(n)] = ci
        while stack:
            n = stack.pop()
            region_of[id(n)] = ("call", ci)
            for i, (m, nr) in enumerate(n.next_functions):
                if m is None or _is_leaf(m):
                    continue
                if id(m) in ins:
                    input_ports[ci].append(Port(n, i, (id(m), nr)))
                if made_by(m, ci):
                    # (the call's own node, made by it: an output it also reads, or a node
                    # with one output returned and another read, as a chunk's)
                    inner_ports[ci].append(Port(n, i, (id(m), nr)))
                elif id(m) in producer or id(m) in ins:
                    boundary.append((n, i, m, nr))
                elif id(m) not in owner_call:
                    owner_call[id(m)] = ci
                    stack.append(m)
    # (only calls whose name is another call's module path's start can have inner calls:
    # found once, not by comparing every call's name with every other's)
    parents = {c.name[:i] for c in calls for i, ch in enumerate(c.name) if ch == "."}
    for ci, call in enumerate(calls):
        if call.ins and (call.within == "" or call.name in parents):
            inner = _inner_calls(calls, ci)
            if inner:
                input_ports[ci] = _input_ports(call, ci, inner, producer, owner_call)

    # 2. Discover the glue between calls and who sits directly below each glue node.
    glue: dict[int, Node] = {}
    down: dict[int, set[Key]] = {}  # id(glue) -> {("call", ci) | ("glue", id)}

    def is_glue(m: Node) -> bool:
        return not _is_leaf(m) and id(m) not in producer and id(m) not in owner_call

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
    order = sorted(glue.values(), key=_seq)  # inputs before the ops that read them

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
                if m is None or _is_leaf(m):
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
            if m is None or _is_leaf(m):
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
        base = glue_names.get(id(g)) or op_name(g)
        name = base
        while name in taken:
            counters[base] = counters.get(base, 1) + 1
            name = f"{base}#{counters[base]}"
        taken.add(name)
        jindex[id(g)] = len(junctions)
        junctions.append(Junction(name, g, op_name(g)))

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
    #    A call's node is in boundary once per slot that leaves the call, always with the
    #    same key, and a second visit would only find its slots taken or skipped again: so
    #    each node is visited once, at its first place (k such slots cost k, not k * k).
    #    Call nodes, junctions and other glue are disjoint, so no node has two keys.
    edges: dict[tuple[str, int], Edge] = {}
    regions: dict[int, tuple[Node, Key]] = {}  # id(node) -> (node, consumer key)
    for n, _, _, _ in boundary:
        regions.setdefault(id(n), (n, region_of[id(n)]))
    for g in order:
        if id(g) in junction_ids:
            regions[id(g)] = (g, ("junction", id(g)))
    for g in order:
        ckey = consumer_of[id(g)]
        if id(g) not in junction_ids and ckey is not None:
            regions[id(g)] = (g, ckey)
    for n, key in regions.values():
        cname, cidx = consumer_index(key)
        for i, (m, nr) in enumerate(n.next_functions):
            if m is None or _is_leaf(m):
                continue
            if id(m) in glue and id(m) not in junction_ids:
                continue  # not an end of a path yet: glue further up carries it
            if region_of.get(id(n)) == key and id(m) in owner_call and (
                    id(m) not in producer or made_by(m, key[1])):
                continue  # inside the consumer itself (an inner port, when its own output)
            sname = source_name(m)
            if sname is None:
                continue
            edge = edges.get((sname, cidx))
            if edge is None:
                edge = edges[(sname, cidx)] = Edge(sname, cname, cidx)
            edge.ports.append(Port(n, i, (id(m), nr)))

    # 7. via: named parameter-free modules on the glue between source and consumer. One pass
    #    over the glue in order files each named glue node under every (source name, consumer
    #    index) pair it lies between: the key of the edge it belongs to. Each edge then takes
    #    its pair's names, in order, each once.
    via: dict[tuple[str, int], list[str]] = {}
    for g in order:
        if id(g) in junction_ids or id(g) not in glue_names:
            continue
        ckey = consumer_of[id(g)]
        if ckey is None:
            continue
        cidx = consumer_index(ckey)[1]
        for sname in {_source_label(u, calls, junctions, jindex) for u in ups[id(g)]}:
            via.setdefault((sname, cidx), []).append(glue_names[id(g)])
    for key, edge in edges.items():
        edge.via = list(dict.fromkeys(via.get(key, ())))
    for ci, before, node, nr in passed:
        port = Port(node, -1 - nr, (id(node), nr))
        edge = edges.get((calls[before].name, ci))
        if edge is None:
            edge = edges[(calls[before].name, ci)] = Edge(calls[before].name, calls[ci].name, ci)
        edge.ports.append(port)
        input_ports[ci].append(port)
    return Flow(junctions, list(edges.values()), input_ports, inner_ports)


def _first_reader(calls: Sequence[Call], targets: set[int]) -> dict[int, float]:
    """For each target node (by id), the creation order of the first node that reads it,
    among the nodes a walk from the calls' outputs reaches."""
    first: dict[int, float] = {}
    stack = [n for c in calls for n, _ in c.outs]
    seen = {id(n) for n in stack}
    while stack:
        n = stack.pop()
        for m, _ in n.next_functions:
            if m is None or _is_leaf(m):
                continue
            if id(m) in targets:
                first[id(m)] = min(first.get(id(m), math.inf), _seq(n))
            if id(m) not in seen:
                seen.add(id(m))
                stack.append(m)
    return first


def _inner_calls(calls: Sequence[Call], ci: int) -> set[int]:
    """Indexes of the calls made inside calls[ci] (its submodules' calls)."""
    call = calls[ci]
    within = call.name + "." if call.within is None else call.within
    return {cj for cj, c in enumerate(calls) if cj != ci and c.name.startswith(within)}


def _input_ports(call: Call, ci: int, inner: set[int], producer: dict[int, int],
                 owner_call: dict[int, int]) -> list[Port]:
    """The input ports of a call that calls recorded submodules (a block with its own
    layer-scale parameter, an encoder with a position embedding): its own region stops at
    its children's outputs, but the gradient it passes to its inputs flows through them
    too. So walk everything from its outputs back to its inputs, through its children and
    the glue between them, and stop at any other call's nodes."""
    ins = {id(n) for n in call.ins}
    mine = inner | {ci}
    ports: list[Port] = []
    stack: list[Node] = []
    seen: set[int] = set()
    for n, _ in call.outs:
        if id(n) not in seen and id(n) not in ins:
            seen.add(id(n))
            stack.append(n)
    while stack:
        n = stack.pop()
        for i, (m, nr) in enumerate(n.next_functions):
            if m is None or _is_leaf(m):
                continue
            if id(m) in ins:
                ports.append(Port(n, i, (id(m), nr)))
            elif id(m) not in seen and producer.get(id(m), ci) in mine and (
                    owner_call.get(id(m), ci) in mine):
                seen.add(id(m))
                stack.append(m)
    return ports


def _source_label(
    key: Key, calls: Sequence[Call], junctions: list[Junction], jindex: dict[int, int]
) -> str:
    kind, ref = key
    return calls[ref].name if kind == "call" else junctions[jindex[ref]].name


_LEAF_TYPES: dict[type, bool] = {}


def shape(calls: Sequence[Call], glue: dict[int, str]) -> tuple[Any, list[Node]]:
    """A pass's shape, and its autograd nodes in the order of a walk from the calls' outputs.

    Two passes with equal shapes get the same analyse() result, node for node: the
    shape holds every node reachable from a call's output (its type, and each input slot
    as (place in the walk, output index), or -1 for none or a leaf), the calls (name, outputs,
    inputs by place), the glue names by place, and the nodes' creation order.
    """
    at: dict[int, int] = {}
    nodes: list[Node] = []
    for call in calls:
        for n, _ in call.outs:
            if id(n) not in at:
                at[id(n)] = len(nodes)
                nodes.append(n)
    links: list[Any] = []
    i = 0
    while i < len(nodes):
        n = nodes[i]
        i += 1
        slots: list[Any] = []
        for m, nr in n.next_functions:
            if m is None:
                slots.append(-1)
                continue
            leaf = _LEAF_TYPES.get(type(m))
            if leaf is None:
                leaf = _LEAF_TYPES[type(m)] = _is_leaf(m)
            if leaf:
                slots.append(-1)
                continue
            k = at.get(id(m))
            if k is None:
                k = at[id(m)] = len(nodes)
                nodes.append(m)
            slots.append((k, nr))
        links.append((type(n), tuple(slots)))
    seq = [n._sequence_nr() for n in nodes]
    key = (
        tuple(links),
        tuple([(c.name, tuple([(at[id(n)], nr) for n, nr in c.outs]),
                tuple([at.get(id(n), -1) for n in c.ins])) for c in calls]),
        tuple(sorted([(at[k], name) for k, name in glue.items() if k in at])),
        tuple(sorted(range(len(nodes)), key=seq.__getitem__)),
    )
    return key, nodes

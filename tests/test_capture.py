"""The recorder's numbers against plain autograd, its edges, and its life cycle."""

from __future__ import annotations

import collections
import copy
import gc
import inspect
import math
import sys
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from autograd_reference import Reference, rel_close
from torch import nn

import gradviz
from gradviz import capture, demos, store
from gradviz.errors import RecordingError


def batch(name: str, n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return demos.DEMOS[name].data(n, torch.Generator().manual_seed(seed))


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **opts) -> gradviz.Recorder:
    """One recorded training step (no optimizer update, so the reference stays comparable)."""
    with gradviz.record(model, path=None, **opts) as rec:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        rec.step(loss)
    return rec


def recorded_steps(model: nn.Module, rec: gradviz.Recorder, x: torch.Tensor, y: torch.Tensor,
                   n: int) -> None:
    """n recorded steps on the same batch (gradients zeroed, no optimizer update)."""
    for _ in range(n):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        rec.step(loss)


@pytest.mark.parametrize("name", list(demos.DEMOS))
def test_norms_equal_plain_autograd(name: str) -> None:
    torch.manual_seed(0)
    model = demos.DEMOS[name].build()
    x, y = batch(name)
    ref = Reference(model, x, y)
    run = one_step(model, x, y).to_run()
    layers = [n for n in run.nodes if n["kind"] == "layer"]
    assert {n["id"] for n in layers} == {
        m for m, mod in model.named_modules() if list(mod.parameters(recurse=False))
    }
    checked = 0
    for node in layers:
        nid = node["id"]
        assert rel_close(node["gradient_norm"], ref.layer_norm(nid)), nid
        for pname, want in ref.param_norms(nid).items():
            assert rel_close(node["params"][pname]["gradient_norm"], want), f"{nid}.{pname}"
        assert rel_close(node["activation_grad_norm"], ref.activation_norm(nid)), nid
        checked += node["activation_grad_norm"] is not None
    # every layer's dL/d(output) was seen (all but the unused demo's never-called layer)
    assert checked == sum(ref.activation_norm(n["id"]) is not None for n in layers) > 0
    assert rel_close(run.loss[0], float(ref.loss.detach()))


@pytest.mark.parametrize("name", ["mlp", "cnn", "deep-sigmoid", "plain"])
def test_same_numbers_as_full_backward_hooks(name: str) -> None:
    """gradviz's tensor hooks see what register_full_backward_hook sees, output and input."""
    torch.manual_seed(0)
    model = demos.DEMOS[name].build()
    x, y = batch(name)
    seen: dict[str, tuple[float, float | None]] = {}
    twin = Reference(model, x, y).model  # a copy with the same weights
    for mname, m in twin.named_modules():
        if list(m.parameters(recurse=False)):
            def hook(mod, gin, gout, mname=mname):
                gi = gin[0]
                seen[mname] = (float(gout[0].norm()), None if gi is None else float(gi.norm()))
            m.register_full_backward_hook(hook)
    twin.zero_grad()
    nn.functional.cross_entropy(twin(x), y).backward()
    run = one_step(model, x, y).to_run()
    for node in run.nodes:
        if node["id"] in seen:
            out_norm, in_norm = seen[node["id"]]
            assert rel_close(node["activation_grad_norm"], out_norm), node["id"]
            assert rel_close(node["input_grad_norm"], in_norm), node["id"]
    assert len(seen) == sum(n["kind"] == "layer" for n in run.nodes)


class LayerScaleBlock(nn.Module):
    """A ConvNeXt-style block: its own parameter (gamma), two child layers, a residual."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.b(nn.functional.gelu(self.a(x)))


class Encoder(nn.Module):
    """A ViT-style encoder: its own position embedding added before its child blocks."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(d) * 0.1)
        self.blocks = nn.Sequential(LayerScaleBlock(d), LayerScaleBlock(d))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.blocks(x + self.pos))


class Nested(nn.Module):
    """Layers with their own parameters that call child layers, the root among them (its
    own `scale`; its input comes out of an autograd graph, as embeddings made outside do)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.stem, self.enc, self.head = nn.Linear(4, d), Encoder(d), nn.Linear(d, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.stem(x * self.scale)))


def test_input_gradient_of_a_layer_that_calls_child_layers() -> None:
    """A layer with its own parameter that calls child layers passes its inputs the gradient
    of all its paths, through the children too, as its full backward hook's grad_input says
    (it was the residual's share alone, or nothing, when the walk stopped at the children)."""
    torch.manual_seed(0)
    model = Nested()
    leaf = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    twin = copy.deepcopy(model)
    seen: dict[str, tuple[float, float]] = {}
    for mname, m in twin.named_modules():
        if list(m.parameters(recurse=False)):
            def hook(mod, gin, gout, mname=mname or "Nested"):
                seen[mname] = (float(gout[0].norm()), float(gin[0].norm()))
            m.register_full_backward_hook(hook)
    nn.functional.cross_entropy(twin(leaf * 2), y).backward()
    run = one_step(model, leaf * 2, y).to_run()
    nodes = {n["id"]: n for n in run.nodes if n["kind"] == "layer"}
    assert nodes.keys() == seen.keys()
    for nid, (out_norm, in_norm) in seen.items():
        assert rel_close(nodes[nid]["activation_grad_norm"], out_norm), nid
        assert rel_close(nodes[nid]["input_grad_norm"], in_norm), nid
    # (the parents' inputs reach them through their children: these were the broken ones)
    for nid in ("Nested", "enc", "enc.blocks.0", "enc.blocks.1"):
        assert nodes[nid]["input_grad_norm"] != nodes[nid]["activation_grad_norm"], nid


class Unrolled(nn.Module):
    """An nn.LSTMCell unrolled over 3 steps: it returns (h, c) and reads c itself, for
    h = o * tanh(c)."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.cell, self.h = nn.Linear(8, 8), nn.LSTMCell(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.p(x)
        h = c = torch.zeros(x.shape[0], 8)
        for t in range(seq.shape[1]):
            h, c = self.cell(seq[:, t], (h, c))
        return self.h(h)


class ChunkThenRead(nn.Module):
    """Returns one half of a chunk and a function of the other: one autograd node makes
    both, and the layer reads its second output itself."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (x @ self.w).chunk(2, -1)
        return a, torch.tanh(b)


def test_an_output_the_layer_also_reads_counts_once() -> None:
    """An LSTMCell's c is an output and is read inside the call (h = o * tanh(c)). What
    reaches c's node holds both the gradient from outside and that inner part: summed in,
    the cell's dL/d(output) was 10 % above a full backward hook's grad_output, and the inner
    part made up a cell -> cell edge. Now the inner part is taken off: the activation is
    the hook's, and the out-edges add up to it."""
    torch.manual_seed(0)
    model = Unrolled()
    x, y = torch.randn(2, 3, 8), torch.tensor([0, 3])
    twin = copy.deepcopy(model)
    gouts: list[torch.Tensor] = []
    twin.cell.register_full_backward_hook(
        lambda m, gi, go: gouts.extend(g for g in go if g is not None))
    nn.functional.cross_entropy(twin(x), y).backward()
    want = math.sqrt(sum(float(g.norm()) ** 2 for g in gouts))
    run = one_step(model, x, y).to_run()
    cell = next(n for n in run.nodes if n["id"] == "cell")
    assert rel_close(cell["activation_grad_norm"], want)
    assert {e["id"] for e in run.edges} == {"p->cell", "cell->cell", "cell->h"}
    recurrent, out = run.edge_history("cell->cell")[0], run.edge_history("cell->h")[0]
    assert rel_close(math.hypot(recurrent, out), want)  # (each output read once, outside)

    # One node's two outputs, one returned and one read inside: no edge from the layer to
    # itself (there was one, carrying the inner part)
    torch.manual_seed(0)
    layer, head = ChunkThenRead(), nn.Linear(4, 3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l, self.head = layer, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.l(x)
            return self.head(a * b)

    net = Net()
    x = torch.randn(5, 4)
    ref = Reference(net, x, torch.tensor([0, 1, 2, 0, 1]))
    run = one_step(net, x, torch.tensor([0, 1, 2, 0, 1])).to_run()
    assert [e["id"] for e in run.edges] == ["l->head"]
    a, b = ref.output_grads("l")
    assert rel_close(run.node_history("l", "activation_grad_norm")[0],
                     math.hypot(float(a.norm()), float(b.norm())))


def test_all_modules_an_in_place_module_and_one_that_returns_its_input() -> None:
    """all_modules=True: nn.ReLU(inplace=True) had no input gradient (by its forward hook
    its input's node is its own), and nn.Dropout(p=0) in training, which returns its input
    tensor, had neither input gradient nor edges (a -> act -> b, the dropout aside)."""
    torch.manual_seed(0)
    model = nn.Sequential(collections.OrderedDict(
        a=nn.Linear(8, 8), act=nn.ReLU(inplace=True), drop=nn.Dropout(0.0),
        b=nn.Linear(8, 4)))
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    twin = copy.deepcopy(model)
    a_out = twin.a(x)
    r = nn.functional.relu(a_out)
    for t in (a_out, r):
        t.retain_grad()
    nn.functional.cross_entropy(twin.b(r), y).backward()
    run = one_step(model, x, y, all_modules=True).to_run()
    assert {e["id"] for e in run.edges} == {"a->act", "act->drop", "drop->b"}
    nodes = {n["id"]: n for n in run.nodes}
    relu_in, relu_out = float(a_out.grad.norm()), float(r.grad.norm())
    assert rel_close(nodes["act"]["input_grad_norm"], relu_in)
    assert rel_close(nodes["act"]["activation_grad_norm"], relu_out)
    for key in ("input_grad_norm", "activation_grad_norm"):
        assert rel_close(nodes["drop"][key], relu_out), key
    assert rel_close(run.edge_history("act->drop")[0], relu_out)
    assert rel_close(run.edge_history("drop->b")[0], relu_out)
    assert rel_close(run.edge_history("a->act")[0], relu_in)


@pytest.mark.parametrize("reader", ["layer", "op"])
def test_a_module_that_returns_its_input_after_another_read_it_stands_aside(
        reader: str) -> None:
    """h = a(x); b(h) (or tanh(h)); drop(h): b read a's output before the dropout ran, and
    got an edge from the dropout. Where the tensor was read before, the module stands
    aside, as it did before it could take the place of the layer before it."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
            self.drop = nn.Dropout(0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if reader == "layer":
                u = self.b(h)
                return self.c(u + self.drop(h))
            s = torch.tanh(h)  # (an op, not a call: read before the dropout, used after it)
            v = self.drop(h)
            return self.c(self.b(s) + v)

    torch.manual_seed(0)
    run = one_step(Net(), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]),
                   all_modules=True).to_run()
    assert {e["id"] for e in run.edges} == {"a->b", "a->add", "b->add", "add->c"}


def _edge_vectors(rec: gradviz.Recorder, model: nn.Module, x, y) -> tuple[dict, dict]:
    """Record one step, keeping every measured gradient vector by series key."""
    vecs: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    cols = rec.recording.history.columns

    def probe(col: int, g: torch.Tensor) -> None:
        key = next(k for k, c in cols.items() if c == col)
        vecs[key].append(g.detach().clone())

    rec._probe = probe
    with rec:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        rec.step(loss)
    return vecs, rec.recording.edges


@pytest.mark.parametrize("name", ["mlp", "residual", "dense", "transformer", "cnn"])
def test_edge_gradients_sum_to_output_gradient(name: str) -> None:
    """For every producer, its out-edges' gradients add up (as vectors) to dL/d(output)."""
    torch.manual_seed(0)
    model = demos.DEMOS[name].build()
    x, y = batch(name)
    ref = Reference(model, x, y)
    rec = gradviz.record(model, path=None)
    vecs, edges = _edge_vectors(rec, model, x, y)
    out_edges: dict[str, list[str]] = defaultdict(list)
    for eid, e in edges.items():
        out_edges[e["source"]].append(eid)
    assert out_edges, "no edges recorded"
    for source, eids in out_edges.items():
        total = sum(sum(vecs[("edge", eid)]) for eid in eids)
        kind = rec.recording.nodes[source]["kind"]
        if kind == "junction":
            want = vecs[("node", source, "activation_grad_norm")]
            assert len(want) == 1, source
            want_vec = want[0]
        else:
            (want_vec,) = ref.output_grads(source)  # from torch.autograd.grad
        assert torch.allclose(total, want_vec, rtol=1e-4, atol=1e-7 * float(want_vec.abs().max()))
        # ...and each edge's recorded norm is the norm of its own vector.
        for eid in eids:
            v = torch.linalg.vector_norm(sum(vecs[("edge", eid)]))
            assert rel_close(rec.recording.history.last(("edge", eid)), float(v), 1e-5)


def test_residual_edges_exact() -> None:
    """Each block: stream -> fc1 -> fc2 -> add, plus the skip stream -> add; no fold-in."""
    torch.manual_seed(0)
    model = demos.DEMOS["residual"].build()
    run = one_step(model, *batch("residual")).to_run()
    junction = ["add"] + [f"add#{i}" for i in range(2, 51)]
    want = set()
    stream = "inp"
    for i in range(50):
        b = f"blocks.{i}"
        want |= {(stream, f"{b}.fc1"), (f"{b}.fc1", f"{b}.fc2"), (f"{b}.fc2", junction[i]),
                 (stream, junction[i])}  # the last one is the skip connection
        stream = junction[i]
    want.add((stream, "head"))
    got = {(e["source"], e["target"]) for e in run.edges}
    assert got == want
    vias = {(e["source"], e["target"]): e["via"] for e in run.edges}
    assert vias[("blocks.7.fc1", "blocks.7.fc2")] == ["blocks.7.act"]
    kinds = {n["id"]: (n["kind"], n["type"]) for n in run.nodes}
    assert all(kinds[j] == ("junction", "add") for j in junction)


def _reach_through_junctions(run: gradviz.Run) -> set[tuple[str, str]]:
    """Layer pairs (a, b) joined by a path whose inner nodes are all junctions."""
    kind = {n["id"]: n["kind"] for n in run.nodes}
    succ = defaultdict(set)
    for e in run.edges:
        succ[e["source"]].add(e["target"])
    pairs = set()
    for a in (n for n, k in kind.items() if k != "junction"):
        stack, seen = list(succ[a]), set()
        while stack:
            b = stack.pop()
            if b in seen:
                continue
            seen.add(b)
            if kind[b] == "junction":
                stack.extend(succ[b])
            else:
                pairs.add((a, b))
    return pairs


def test_dense_every_block_reaches_every_later_block() -> None:
    torch.manual_seed(0)
    model = demos.DEMOS["dense"].build()
    run = one_step(model, *batch("dense")).to_run()
    pairs = _reach_through_junctions(run)
    blocks = [f"blocks.{i}" for i in range(20)] + ["head"]
    want = {(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1:]}
    assert pairs == want
    assert any(n["type"] == "cat" for n in run.nodes if n["kind"] == "junction")
    # Junctions keep it linear-ish: far fewer edges than the 210 folded layer pairs.
    assert len(run.edges) < 3 * 20 * 5


def test_hooks_removed_after_with_block() -> None:
    torch.manual_seed(0)
    model = demos.DEMOS["transformer"].build()
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks", "_forward_hooks_with_kwargs")

    def hooks() -> dict:
        return {(n, d): dict(getattr(m, d)) for n, m in model.named_modules() for d in hook_dicts}

    before = hooks()
    x, y = batch("transformer")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradviz.record(model, path=None) as rec:
        assert hooks() != before
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
            opt.step()
    assert hooks() == before
    recorded = len(rec.recording.history)
    out = model(x)
    assert out._backward_hooks is None  # no tensor hook registered any more
    nn.functional.cross_entropy(out, y).backward()  # trains on, unchanged
    opt.step()
    assert len(rec.recording.history) == recorded == 2
    with pytest.raises(RecordingError, match="outside"):
        rec.step()


def test_a_copy_of_the_model_made_while_recording_trains_and_records_nothing(tmp_path) -> None:
    # An EMA/SWA model or a best-model snapshot, made inside the with block: deepcopy and
    # torch.save copy a module's hooks, and gradviz's used to take the recorder (and its
    # locks) along: "cannot pickle '_thread.RLock' object" in the user's loop.
    torch.manual_seed(0)
    model = demos.DEMOS["residual"].build()
    x, y = batch("residual")
    ref = Reference(model, x, y)
    with gradviz.record(model, path=None) as rec:
        twin = copy.deepcopy(model)
        ema = torch.optim.swa_utils.AveragedModel(model)
        torch.save(model, tmp_path / "model.pt")
        saved = torch.load(tmp_path / "model.pt", weights_only=False)
        for other in (twin, ema, saved):  # they train, and record nothing into rec
            nn.functional.cross_entropy(other(x), y).backward()
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        rec.step(loss)
    run = rec.to_run()
    assert run.steps == [0]
    for node in run.nodes:
        if node["kind"] == "layer":
            assert rel_close(node["activation_grad_norm"], ref.activation_norm(node["id"]))
            assert rel_close(node["gradient_norm"], ref.layer_norm(node["id"]))
    copied = [h for m in twin.modules() for h in (*m._forward_hooks.values(),
                                                  *m._forward_pre_hooks.values())]
    assert copied and all(type(h) is capture._Inert for h in copied)


def test_a_gradient_penalty_with_create_graph_keeps_recording() -> None:
    # WGAN-GP / R1: autograd.grad(..., create_graph=True) inside the step, so gradients
    # carry graphs. Their norms did too, and the step's copy to the host failed: gradviz
    # stopped recording at step 0 with a warning.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gradviz warns when it stops recording
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph")
        with gradviz.record(model, path=None) as rec:
            for _ in range(3):
                model.zero_grad()
                xi = x.clone().requires_grad_(True)
                out = model(xi)
                (gx,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
                loss = out.mean() + ((gx.norm(dim=1) - 1) ** 2).mean()
                loss.backward(create_graph=True)  # (second-order methods do this too)
                rec.step(loss)
    run = rec.to_run()
    assert run.steps == [0, 1, 2] and not rec._failed
    for name in ("0", "2"):
        want = torch.linalg.vector_norm(torch.cat(
            [p.grad.detach().flatten() for p in model.get_submodule(name).parameters()]))
        assert rel_close(run.node_history(name)[-1], float(want)), name


@pytest.mark.parametrize("early", [False, True])
def test_sparse_embedding_gradients_are_recorded(early: bool) -> None:
    # nn.Embedding(sparse=True) gives sparse gradients, which torch's norm kernels refuse:
    # gradviz stopped at step 0 and recorded nothing.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5000, 40, sparse=True), nn.Flatten(), nn.Linear(120, 3))
    x, y = torch.randint(0, 5000, (32, 3)), torch.randint(0, 3, (32,))
    x[:, 0] = 7  # repeated indices: the sparse gradient holds duplicates until coalesced
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradviz.record(model, path=None, early_param_norms=early) as rec:
            for _ in range(2):
                model.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                rec.step(loss)
    run = rec.to_run()
    assert run.steps == [0, 1]
    grad = model[0].weight.grad
    assert grad.is_sparse
    want = float(torch.linalg.vector_norm(grad.to_dense()))
    assert rel_close(run.node_history("0")[-1], want)


def test_layers_called_by_hand_leave_nothing_behind_a_step() -> None:
    # No root pass ends these steps' forwards: what they learnt about autograd nodes (keyed
    # by ids that die with the step) must still go at rec.step().
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with gradviz.record(model, path=None, activation_stats=True) as rec:
        for _ in range(20):
            model.zero_grad()
            out = model[2](model[1](model[0](x)))  # the layers, not the root
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            rec.step(loss)
            assert not rec._made_by and not rec._calls
    assert rec.to_run().steps == list(range(20))


def test_every_nth_step_and_no_grad_forward_cost_nothing() -> None:
    torch.manual_seed(0)
    model = demos.MLP()
    x, y = batch("mlp")
    with gradviz.record(model, path=None, every=3) as rec:
        for i in range(10):
            # hooks are attached only for the steps that are recorded
            assert bool(model.fc1._forward_hooks) == (i % 3 == 0)
            model.zero_grad()
            with torch.no_grad():
                model(x)  # an evaluation pass: nothing recorded
            assert rec._calls == [] and rec._pending == []
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
    assert rec.recording.history.steps == [0, 3, 6, 9]


def test_layers_called_outside_the_root_forward_are_measured() -> None:
    """Inside the root's forward, output gradients are hooked when the pass ends; a layer the
    user calls directly (no pass end follows) is hooked at once, with the same numbers."""
    torch.manual_seed(0)
    model = demos.MLP()
    x, y = batch("mlp")
    ref_model = demos.MLP()
    ref_model.load_state_dict(model.state_dict())
    h = ref_model.fc1(x)
    h.retain_grad()
    nn.functional.cross_entropy(ref_model.fc2(torch.relu(h)), y).backward()
    want = float(h.grad.norm())
    with gradviz.record(model, path=None) as rec:
        for _ in range(2):  # the second step: with a plan for the root's pass in the cache
            model.zero_grad()
            model(x)  # a root pass (not backpropagated), then the layers called by hand
            out = model.fc2(torch.relu(model.fc1(x)))
            nn.functional.cross_entropy(out, y).backward()
            rec.step()
        assert not rec._failed
    series = rec.recording.history.series(("node", "fc1", "activation_grad_norm"))
    assert len(series) == 2
    for v in series:
        assert rel_close(float(v), want)


def test_a_forward_that_raised_is_forgotten() -> None:
    """Calls and statistics of a root forward that raised before it returned must not reach
    the next pass: its numbers and edges are those of a clean run."""

    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
            self.fail = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if self.fail:
                raise ValueError("bad batch")
            return self.b(torch.relu(h))

    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    runs = []
    for flaky in (False, True):
        torch.manual_seed(0)
        model = Flaky()
        with gradviz.record(model, path=None, activation_stats=True) as rec:
            if flaky:
                model.fail = True
                with pytest.raises(ValueError):
                    model(10 * x)  # other statistics: they must not count either
                model.fail = False
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
        assert not rec._failed
        assert len(rec._plans) == 1
        (key,) = rec._plans
        assert [c[0] for c in key[1]] == ["a", "b"]  # the pass's calls: not the failed one's
        runs.append((rec.recording.edges, _rows(rec)))
    assert runs[0] == runs[1]


def test_nan_and_absent_are_kept_apart_from_zero() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)   # never called: no gradient at all
            self.zeroed = nn.Linear(4, 3)   # called, but its output is multiplied by 0
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(self.frozen(self.first(x))) + 0.0 * self.zeroed(x)

    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    run = one_step(model, x, y).to_run()
    by_id = {n["id"]: n for n in run.nodes}
    assert by_id["unused"]["gradient_norm"] is None
    assert by_id["zeroed"]["gradient_norm"] == 0.0
    assert by_id["frozen"]["gradient_norm"] is None
    assert by_id["frozen"]["params"]["weight"]["trainable"] is False
    assert by_id["frozen"]["activation_grad_norm"] > 0  # gradient still flows through it
    assert by_id["first"]["gradient_norm"] > 0  # ...to the trainable layer before it
    assert {("first", "frozen"), ("frozen", "used")} <= {(e["source"], e["target"])
                                                         for e in run.edges}

    with torch.no_grad():
        model.used.weight[0, 0] = math.nan
    run = one_step(model, x, y).to_run()
    by_id = {n["id"]: n for n in run.nodes}
    assert math.isnan(by_id["used"]["gradient_norm"])
    assert math.isnan(run.loss[-1])


def test_recording_to_a_file_and_loading_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = demos.MLP()
    x, y = batch("mlp")
    path = tmp_path / "out.json"
    path.write_text("earlier run")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradviz.record(model, path=path, optimizer=opt, seed=7) as rec:
        for _ in range(5):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.step(loss)
            opt.step()
    assert (tmp_path / "out.1.json").read_text() == "earlier run"  # kept, not overwritten
    run = gradviz.load(path)
    assert run.steps == [0, 1, 2, 3, 4]
    assert run.meta["optimizer"] == "Adam" and run.meta["lr"] == 1e-3 and run.meta["seed"] == 7
    assert run.meta["param_count"] == sum(p.numel() for p in model.parameters())
    assert len(run.node_history("fc1")) == 5
    assert run.node_history("fc1")[-1] == pytest.approx(
        float(torch.cat([p.grad.flatten() for p in model.fc1.parameters()]).norm()), rel=1e-5)


def test_bad_arguments_are_clear_errors(tmp_path) -> None:
    with pytest.raises(RecordingError, match="torch.nn.Module"):
        gradviz.record("not a model")  # type: ignore[arg-type]
    with pytest.raises(RecordingError, match="every"):
        gradviz.record(nn.Linear(2, 2), every=0)
    with pytest.raises(RecordingError, match="directory"):
        gradviz.record(nn.Linear(2, 2), path=tmp_path).start()


def test_internal_failure_never_breaks_training(monkeypatch) -> None:
    from gradviz import dataflow

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(dataflow, "analyse", broken)
    model = demos.MLP()
    x, y = batch("mlp")
    with pytest.warns(RuntimeWarning, match="stopped recording"):
        with gradviz.record(model, path=None) as rec:
            for _ in range(3):
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                rec.step()
    assert model.fc1.weight.grad is not None


def _rows(rec: gradviz.Recorder) -> dict[tuple[str, ...], list[float]]:
    h = rec.recording.history
    return {k: h.series(k).view("u4").tolist() for k in h.columns}  # bit patterns


def _lean_and_general(build, train, **opts) -> list[gradviz.Recorder]:
    """The same training recorded twice from the same seed: on the lean path of step() (one
    process, no loss scaling) and on the general one. train(model, rec, general) runs it."""
    recs = []
    for general in (False, True):
        torch.manual_seed(0)
        model = build()
        with gradviz.record(model, path=None, **opts) as rec:
            rec._generic = general
            train(model, rec, general)
        assert not rec._failed
        recs.append(rec)
    return recs


@pytest.mark.parametrize("name", list(demos.DEMOS))
def test_reused_hooks_and_the_lean_path_record_the_same_bits(name: str) -> None:
    """From the second pass on, capture hooks by a cached plan (dataflow.shape), and one
    process without loss scaling takes a lean path in step(). Both must change nothing: the
    same model and data, recorded with a fresh analysis every pass and the general path, give
    bit-identical histories over several steps, forward statistics included."""
    xs = [batch(name, seed=s) for s in (1, 2, 1)]

    def train(model: nn.Module, rec: gradviz.Recorder, fresh: bool) -> None:
        for x, y in xs:
            if fresh:
                rec._plans.clear()
            recorded_steps(model, rec, x, y, 1)

    cached, fresh_rec = _lean_and_general(demos.DEMOS[name].build, train,
                                          activation_stats=True)
    assert len(cached._plans) == 1  # one shape, analysed once
    # the general path's index arrays: built for the first step (whose own series widen the
    # history) and once more, then reused
    assert len(fresh_rec._indices) <= 2
    assert _rows(cached) == _rows(fresh_rec)
    assert cached.recording.edges == fresh_rec.recording.edges
    assert cached.recording.nodes == fresh_rec.recording.nodes
    # the third step saw the first step's data again: the same numbers, by a reused plan
    h = cached.recording.history
    for key in h.columns:
        s = h.series(key)
        assert s[0].view("u4") == s[2].view("u4"), key


@pytest.mark.parametrize("name", ["residual", "dense", "transformer"])
def test_norms_equal_plain_autograd_on_a_reused_plan(name: str) -> None:
    """The autograd reference check, on the third recorded step (hooks from the cache)."""
    torch.manual_seed(0)
    model = demos.DEMOS[name].build()
    x, y = batch(name)
    ref = Reference(model, x, y)
    with gradviz.record(model, path=None) as rec:
        recorded_steps(model, rec, x, y, 3)
    run = rec.to_run()
    for node in run.nodes:
        if node["kind"] == "layer":
            assert rel_close(node["activation_grad_norm"], ref.activation_norm(node["id"]))
            assert rel_close(node["gradient_norm"], ref.layer_norm(node["id"]))


def test_forward_statistics_equal_the_plain_definitions() -> None:
    """act_mean/std/min/max/zero_frac of each layer's output, dead_frac of the ReLU after it
    (units zero for every sample) and saturated_frac of the sigmoid (within 0.01 of a
    bound), against torch's own mean/std/aminmax and comparisons on the same tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.Sigmoid(),
                          nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias[:10] = -50.0  # ten units that never fire: dead
        model[2].weight.mul_(20.0)  # a sigmoid pushed to its bounds
        model[2].weight[:, 0] = 0.0  # an exact zero in every sample of a column...
    x = torch.randn(64, 6)
    x[:, 0] = 0.0
    outs = {}
    with torch.no_grad():
        h = x
        for i, m in enumerate(model):
            h = m(h)
            outs[i] = h.clone()
    with gradviz.record(model, path=None, activation_stats=True) as rec:
        loss = model(x).sum()
        loss.backward()
        rec.step(loss)
    run = rec.to_run()
    for idx in ("0", "2", "4"):
        o = outs[int(idx)]
        stats = {k: run.node_history(idx, k)[0] for k in capture.LAYER_STATS}
        assert rel_close(stats["act_mean"], float(o.mean()), 1e-5)
        assert rel_close(stats["act_std"], float(o.std()), 1e-5)
        assert stats["act_min"] == float(o.min()) and stats["act_max"] == float(o.max())
        assert stats["act_zero_frac"] == pytest.approx(float((o == 0).float().mean()), abs=1e-7)
    relu = outs[1]
    dead = float((relu == 0).all(dim=0).float().mean())
    assert dead >= 10 / 32
    assert run.node_history("0", "dead_frac")[0] == pytest.approx(dead, abs=1e-7)
    sig = outs[3]
    sat = float(((sig <= 0.01) | (sig >= 0.99)).float().mean())
    assert sat > 0.1
    assert run.node_history("2", "saturated_frac")[0] == pytest.approx(sat, abs=1e-7)


def _big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))


def test_norms_taken_in_backward_are_used_and_exact() -> None:
    """A large parameter's norm is taken right after autograd writes its gradient."""
    model = _big_model()
    assert model[0].weight.numel() >= capture.HOT_NUMEL > model[2].weight.numel()
    x = torch.randn(8, 256)
    with gradviz.record(model, path=None) as rec:  # off by default
        model(x).square().mean().backward()
        assert not rec._hot
        rec.step()
    model.zero_grad()
    with gradviz.record(model, path=None, early_param_norms=True) as rec:
        model(x).square().mean().backward()
        assert set(rec._hot) == {0}  # fc 0's weight, and only it
        rec.step()
    run = rec.to_run()
    want = float(torch.linalg.vector_norm(model[0].weight.grad))
    assert run.param_history("0", "weight")[0] == pytest.approx(want, rel=1e-6)
    assert not rec._hot


def test_gradients_changed_after_backward_are_measured_again() -> None:
    """Clipping (in place) or accumulating more micro-batches changes .grad after the
    norm was taken in backward: the recorded norm is that of .grad at rec.step()."""
    model = _big_model()
    x = torch.randn(8, 256)
    with gradviz.record(model, path=None, early_param_norms=True) as rec:
        model(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        clipped = float(torch.linalg.vector_norm(model[0].weight.grad))
        rec.step()
        model.zero_grad()
        for k in range(3):  # three micro-batches, one step
            model(x * (k + 1)).square().mean().backward()
        accumulated = float(torch.linalg.vector_norm(model[0].weight.grad))
        rec.step()
        model.zero_grad(set_to_none=False)  # zeroed in place: version changes, norm 0
        model(x).square().mean().backward()
        again = float(torch.linalg.vector_norm(model[0].weight.grad))
        rec.step()
    got = rec.to_run().param_history("0", "weight")
    assert got[0] == pytest.approx(clipped, rel=1e-6) and clipped <= 1.001e-3
    assert got[1] == pytest.approx(accumulated, rel=1e-6)
    assert got[2] == pytest.approx(again, rel=1e-6)


def test_zero_fraction_counts_nan_as_not_zero() -> None:
    t = torch.tensor([0.0, 1.0, float("nan"), 2.0, -0.0, 0.0, 3.0, float("inf")])
    stats = capture._layer_stats(t).tolist()
    assert stats[4] == pytest.approx(float((t == 0).float().mean()))  # 3 of 8
    assert stats[2] == 0.0 or math.isnan(stats[2])


class _Copy:
    """Stands in for the CUDA event after a row's queued copy: it arrives when waited for."""

    def __init__(self, arrived: bool) -> None:
        self.arrived = arrived
        self.waited = 0

    def query(self) -> bool:
        return self.arrived

    def synchronize(self) -> None:
        if not self.arrived:  # (on one that has arrived, synchronize returns at once)
            self.waited += 1
        self.arrived = True


@contextmanager
def _inside_flush(rec: gradviz.Recorder) -> Iterator[None]:
    """As during step()'s periodic flush: this thread's drains take only arrived rows."""
    rec._ready_only = threading.get_ident()
    try:
        yield
    finally:
        rec._ready_only = None


def test_a_periodic_flush_takes_only_rows_already_on_the_host() -> None:
    """step()'s periodic file flush must not wait for a copy still on its way (that would
    stall the device's queue): its drains take the rows that have arrived, from the first,
    and leave the rest, in order, for the next read, which waits for them."""
    x, y = batch("mlp")

    def train(rec: gradviz.Recorder, model: nn.Module) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.step(loss)
            opt.step()

    torch.manual_seed(0)
    model = demos.MLP()
    with gradviz.record(model, path=None) as rec:
        train(rec, model)
        rows = rec._rows
        assert rows is not None and [s for s, _, _ in rows.steps] == [0, 1, 2, 3, 4]
        copies = [_Copy(arrived=at in (0, 1, 2, 4)) for at in range(capture.ROWS_AT_ONCE)]
        rows.events = copies  # row 3 still on its way (and so row 4 after it)
        with _inside_flush(rec):
            assert rec.recording.history.steps == [0, 1, 2]
            assert [s for s, _, _ in rows.steps] == [3, 4]
            assert rec.recording.history.snapshot().steps == [0, 1, 2]  # (the flush's read)
            assert sum(c.waited for c in copies) == 0
        seen_elsewhere: list[list[int]] = []  # another thread's read is a full read
        t = threading.Thread(target=lambda: seen_elsewhere.append(rec.recording.history.steps))
        t.start()
        t.join()
        assert seen_elsewhere == [[0, 1, 2, 3, 4]] and rows.steps == []
        assert copies[3].waited == 1 and copies[4].waited == 0  # (4 had arrived: kept
        # back only to keep the order)
        got = rec.recording.history.matrix()
        assert not rec._failed
    torch.manual_seed(0)
    model = demos.MLP()
    with gradviz.record(model, path=None) as plain:
        train(plain, model)
        want = plain.recording.history.matrix()
    assert got.tobytes() == want.tobytes()  # the same rows, in the same order


def test_a_flush_whose_copy_check_fails_stops_recording_not_training() -> None:
    """A CUDA error while asking whether a copy has arrived (it would come again at every
    call) must go where every gradviz failure goes: a warning, recording stops, the user's
    loop goes on."""

    class Broken:
        def query(self) -> bool:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        def synchronize(self) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    x, y = batch("mlp")
    model = demos.MLP()
    with gradviz.record(model, path=None) as rec:
        recorded_steps(model, rec, x, y, 2)
        rows = rec._rows
        assert rows is not None
        rows.events = [Broken() for _ in range(capture.ROWS_AT_ONCE)]
        with _inside_flush(rec), pytest.warns(RuntimeWarning, match="illegal memory access"):
            rec.recording  # noqa: B018  (a read: the flush's drain)
        recorded_steps(model, rec, x, y, 2)  # training goes on
    assert rec._failed


def test_close_from_inside_a_flush_still_takes_every_row(tmp_path) -> None:
    """A signal handler that closes the recorder while step()'s flush is under way runs in
    the flush's thread: its last drain and write must still take the rows in transit."""
    x, y = batch("mlp")
    model = demos.MLP()
    path = tmp_path / "run.json"
    rec = gradviz.record(model, path=path, flush_seconds=1e9).start()
    recorded_steps(model, rec, x, y, 4)
    rows = rec._rows
    assert rows is not None and len(rows.steps) == 3  # (step 0 went out with the first flush)
    copies = [_Copy(arrived=False) for _ in range(capture.ROWS_AT_ONCE)]
    rows.events = copies
    with _inside_flush(rec):
        rec.close()  # (the handler)
    assert not rec._failed and rec.recording.history.steps == [0, 1, 2, 3]
    assert gradviz.load(path).steps == [0, 1, 2, 3]
    assert sum(c.waited for c in copies) == 3


def test_the_row_buffer_follows_the_vectors_to_another_device() -> None:
    """A model moved to another device (CPU to GPU, cuda:0 to cuda:1) gets a new row
    buffer, pinned and with events of that device: one kept from the old device would
    copy blocking, or record one device's event on another's stream. Here the buffer is
    marked as made for another device; the next step must drain it and make a new one."""
    x, y = batch("mlp")

    def train(rec: gradviz.Recorder, model: nn.Module, move_at: int | None) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(6):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            rec.step()
            opt.step()
            if step == move_at:
                old = rec._rows
                assert old is not None
                old.device = torch.device("meta")  # as if made for another device
        if move_at is not None:
            assert rec._rows is not old and rec._rows.device == torch.device("cpu")

    torch.manual_seed(0)
    model = demos.MLP()
    with gradviz.record(model, path=None) as rec:
        train(rec, model, move_at=2)
        got = rec.recording.history
    torch.manual_seed(0)
    model = demos.MLP()
    with gradviz.record(model, path=None) as plain:
        train(plain, model, move_at=None)
        want = plain.recording.history
    assert not rec._failed and got.steps == want.steps == list(range(6))
    assert got.matrix().tobytes() == want.matrix().tobytes()


def test_step_flushes_the_file_with_its_drains_taking_only_rows_on_the_host(tmp_path) -> None:
    x, y = batch("mlp")
    model = demos.MLP()
    flags: list[bool] = []
    with gradviz.record(model, path=tmp_path / "run.json", flush_seconds=0.0) as rec:
        writer = rec._writer
        assert writer is not None
        flush = writer.flush

        def watched(recording: store.Recording, wait: bool = False) -> None:
            flags.append(rec._ready_only == threading.get_ident())
            flush(recording, wait)

        writer.flush = watched  # type: ignore[method-assign]
        recorded_steps(model, rec, x, y, 3)
        assert flags and all(flags) and rec._ready_only is None
    assert flags[-1] is False  # the last write, at close, takes every row
    assert not rec._failed
    assert gradviz.load(tmp_path / "run.json").steps == [0, 1, 2]


def test_buffered_rows_reach_the_history_in_order_and_bit_for_bit() -> None:
    """Lean steps wait in a buffer of ROWS_AT_ONCE rows before they become history rows: a
    full buffer, a change of layout (a layer frozen, the loss given as a number), and reading
    the recording all put them in, in order, with the general path's bits."""
    x, y = batch("mlp")

    def train(model: nn.Module, rec: gradviz.Recorder, general: bool) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(capture.ROWS_AT_ONCE + 40):
            if step == capture.ROWS_AT_ONCE + 10:
                model.fc2.requires_grad_(False)  # other parameters: another layout
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.step(float(loss.detach()) if step % 7 == 0 else loss)
            opt.step()
            if step == 5:
                assert rec.recording.history.steps == list(range(6))  # read: drained

    recs = _lean_and_general(demos.MLP, train)
    for rec in recs:
        assert rec.recording.history.steps == list(range(capture.ROWS_AT_ONCE + 40))
    rows = [_rows(rec) for rec in recs]
    assert rows[0] == rows[1]
    loss_bits = rows[0][("loss",)]
    assert len(set(loss_bits)) > 50  # the loss changed step by step: real rows, not copies


def test_a_history_held_on_to_is_never_behind() -> None:
    """h = rec.recording.history, taken once before training: every read of it (steps, len,
    last, series, matrix) sees each lean step at once, though the steps wait in the row
    buffer. A thread reading it all along, while training runs past full buffers, changes
    no bit of what is recorded."""
    x, y = batch("mlp")
    steps = 3 * capture.ROWS_AT_ONCE

    def train(read_along: bool) -> gradviz.Recorder:
        torch.manual_seed(0)
        model = demos.MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        stop, errors, reads = threading.Event(), [], [0]
        with gradviz.record(model, path=None) as rec:
            h = rec.recording.history

            def reader() -> None:
                while not stop.is_set():
                    try:
                        n = len(h.steps)
                        assert h.steps[:n] == list(range(n))
                        assert h.matrix().shape[1] >= n
                        run = rec.to_run()  # one consistent document, checked on the way
                        assert len(run.steps) >= n and len(run.loss) == len(run.steps)
                        reads[0] += 1
                    except Exception as e:  # (reported below, in the test's thread)
                        errors.append(e)
                        return

            thread = threading.Thread(target=reader)
            switch = sys.getswitchinterval()
            sys.setswitchinterval(1e-6)  # threads take turns often: races show
            try:
                for step in range(steps):
                    if step == 10 and read_along:
                        thread.start()
                    opt.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    rec.step(loss)
                    opt.step()
                    if step < 10:  # read straight after the step: nothing may be missing
                        assert h.steps == list(range(step + 1)) and len(h) == step + 1
                        assert h.last(("loss",)) == float(loss.detach())
                        assert h.series(("loss",))[-1] == float(loss.detach())
                        assert h.matrix().shape[1] == step + 1
            finally:
                stop.set()
                if thread.is_alive():
                    thread.join()
                sys.setswitchinterval(switch)
        assert not errors, errors
        assert not rec._failed
        assert h.steps == list(range(steps))
        assert not read_along or reads[0] > 0
        return rec

    assert _rows(train(read_along=True)) == _rows(train(read_along=False))


@pytest.mark.parametrize("general", [False, True])
def test_exploding_norms_are_recorded_without_numpy_warnings(general: bool) -> None:
    """A layer whose two parameter norms are each near float32's top has a norm past it:
    recorded as inf, with nothing printed on the user's console, on both step() paths."""
    model = nn.Sequential(nn.Linear(1, 1))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    big = 3e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradviz.record(model, path=None) as rec:
            rec._generic = general
            for _ in range(2):
                model.zero_grad()
                loss = model(torch.ones(1, 1)).sum() * big
                loss.backward()
                rec.step(loss)
            run = rec.to_run()
    assert not rec._failed
    assert run.param_history("0", "weight") == [pytest.approx(big)] * 2
    assert run.param_history("0", "bias") == [pytest.approx(big)] * 2
    assert run.node_history("0") == [math.inf] * 2  # sqrt(2) * 3e38


def test_a_kept_history_has_every_step_after_the_recorder_is_gone() -> None:
    """Without a file, leaving the with block still empties the row buffer: a History kept
    from rec.recording does not depend on the recorder living on."""
    x, y = batch("mlp")
    model = demos.MLP()

    def train() -> store.History:
        with gradviz.record(model, path=None) as rec:
            h = rec.recording.history  # (taken before: reading rec.recording drains)
            recorded_steps(model, rec, x, y, 10)
        return h

    h = train()
    gc.collect()  # (the recorder is in reference cycles: now it is gone)
    assert h.before_read is not None  # its callback outlived it, harmlessly
    assert h.steps == list(range(10)) and len(h.series(("loss",))) == 10


def test_a_read_from_inside_a_drain_adds_nothing_twice() -> None:
    """A read of the history that comes back into the drain from the same thread (a signal
    handler saving the file while buffered rows go in) must not add them twice."""
    x, y = batch("mlp")
    model = demos.MLP()
    with gradviz.record(model, path=None) as rec:
        recorded_steps(model, rec, x, y, 5)
        h = rec._recording.history
        append, seen = h.append, []

        def append_then_read(*args: Any) -> None:
            append(*args)
            seen.append(len(h.snapshot()))  # a read: catches up, from inside the drain

        h.append = append_then_read  # type: ignore[method-assign]
        assert len(rec.recording.history) == 5
        h.append = append  # type: ignore[method-assign]
    assert not rec._failed
    assert seen == [1, 2, 3, 4, 5]
    assert h.steps == list(range(5))


def test_a_read_between_writing_a_row_and_noting_its_step_changes_nothing() -> None:
    """A signal handler may read the history right after step() has written a step's row
    into the buffer and before it has noted the step: that drain must leave this step (and
    its row) for the next, not pair it later with another row."""
    src, first = inspect.getsourcelines(capture.Recorder._record_one)
    copy_line = first + next(i for i, line in enumerate(src) if "rows.put(at, flat)" in line)
    x, y = batch("mlp")

    def train(read_between: bool) -> gradviz.Recorder:
        torch.manual_seed(0)
        model = demos.MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        reads: list[int] = []
        with gradviz.record(model, path=None) as rec:
            h = rec.recording.history

            def tracer(frame: Any, event: str, arg: Any) -> Any:
                if frame.f_code is not capture.Recorder._record_one.__code__:
                    return None
                done = [False]

                def local(frame: Any, event: str, arg: Any) -> Any:
                    if event == "line" and frame.f_lineno > copy_line and not done[0]:
                        done[0] = True  # one read a call, on the line after the copy
                        reads.append(len(h))
                    return local

                return local

            for step in range(20):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                if read_between:
                    sys.settrace(tracer)
                try:
                    rec.step(loss if step % 3 else float(loss.detach()))
                finally:
                    sys.settrace(None)
                opt.step()
        assert not rec._failed and h.steps == list(range(20))
        assert not read_between or len(reads) == 20
        return rec

    assert _rows(train(read_between=True)) == _rows(train(read_between=False))


def test_lean_path_combines_several_values_bit_for_bit() -> None:
    """Series with several values a step (a layer called three times, a weight tied to
    another layer, two micro-batches, statistics averaged over calls) take the lean path's
    summing branch: the same bits as the general path."""

    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.cell, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.out.weight = self.cell.weight  # tied
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.inp(x))
            for _ in range(3):
                h = self.act(self.cell(h)) + h
            return self.out(h)

    def train(model: nn.Module, rec: gradviz.Recorder, general: bool) -> None:
        for step in range(3):
            model.zero_grad()
            for s in (step, step + 10):
                x, y = batch("mlp", n=5, seed=s)
                nn.functional.cross_entropy(model(x[:, :4]), y % 6).backward()
            rec.step(0.5 * step)

    rows = [_rows(rec) for rec in _lean_and_general(Looped, train, activation_stats=True)]
    assert rows[0] == rows[1]
    assert len(rows[0]) > 20


@pytest.mark.parametrize("name", ["residual", "dense", "transformer"])
def test_two_backwards_of_one_graph_count_every_series_twice(name: str) -> None:
    """backward(retain_graph=True) twice: every series, multi-part edges included, gets the
    same gradient twice, so sqrt(2) times the norm of one backward."""
    torch.manual_seed(0)
    model = demos.DEMOS[name].build()
    x, y = batch(name)
    runs = []
    for times in (1, 2):
        model.zero_grad()
        with gradviz.record(model, path=None) as rec:
            loss = nn.functional.cross_entropy(model(x), y)
            for _ in range(times):
                loss.backward(retain_graph=True)
            rec.step(loss)
        assert not rec._failed
        runs.append(rec.recording.history)
    one, two = runs
    checked = 0
    for key in one.columns:
        if key[0] == "edge" or key[-1] in ("activation_grad_norm", "input_grad_norm"):
            a, b = one.last(key), two.last(key)
            if a:
                assert b == pytest.approx(math.sqrt(2) * a, rel=1e-5), key
                checked += 1
    assert checked > 5


def test_a_float64_model_is_recorded() -> None:
    torch.manual_seed(0)
    model = demos.DEMOS["residual"].build().double()
    x, y = batch("residual")
    with gradviz.record(model, path=None) as rec:
        loss = nn.functional.cross_entropy(model(x.double()), y)
        loss.backward()
        rec.step(loss)
    assert not rec._failed
    run = rec.to_run()
    assert all(n["gradient_norm"] is not None for n in run.nodes if n["kind"] == "layer")


# -- record()'s arguments and misuse, found by a probe of the API -------------------------


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("options, words", [
    # (each failed far from here: every write, the first step, or the block's end)
    ({"flush_seconds": "2"}, "flush_seconds must be a number of seconds >= 0"),
    ({"flush_seconds": math.nan}, "flush_seconds must be"),
    ({"optimizer": [1]}, "optimizer must be a torch.optim.Optimizer"),
    ({"scaler": object()}, "scaler must be a torch.amp.GradScaler"),
    ({"meta": "abc"}, "meta must be a dict"),
    ({"meta": {"s": {1, 2}}}, "meta['s'] is a set, which the file (JSON) cannot hold"),
    ({"meta": {"t": torch.ones(3)}}, "meta['t'] is a Tensor"),
    ({"meta": {"d": {1: 2}}}, "meta['d'] has the key 1"),
    ({"meta": {"big": 2**70}}, "meta['big'] is an integer beyond 64 bits"),
    ({"path": b"x.json"}, "path must be a file path"),
    ({"path": 123}, "path must be a file path"),
    ({"seed": "x"}, "seed must be a whole number"),
    ({"native": "yes"}, "native must be True, False or None"),
    ({"distributed": "no"}, "distributed must be True, False or None"),
    ({"saturation_margin": "x"}, "saturation_margin must be a number"),
    ({"every": 0}, "every must be a whole number >= 1"),
    ({"max_passes": 0}, "max_passes must be a whole number >= 1"),
    ({"max_passes": 2.5}, "max_passes must be a whole number >= 1"),
])
def test_bad_record_arguments_are_one_line_when_called(options: dict[str, Any],
                                                       words: str) -> None:
    with pytest.raises(RecordingError) as info:
        gradviz.record(_Two(), **{"path": None, **options})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_numpy_and_tensor_arguments_are_taken_as_numbers(tmp_path) -> None:
    """numpy scalars, one-value tensors and paths in meta (orjson could write none of them:
    every write failed, the block's end raised and no file was left), numpy whole numbers
    as every and seed, and ~ in the path."""
    import numpy as np

    model, path = _Two(), tmp_path / "run.json"
    meta = {"lr": np.float32(0.5), "n": np.int64(3), "t": torch.tensor(2.0),
            "where": tmp_path, "nested": {"k": [np.float64(1.5), (1, 2)]}}
    with gradviz.record(model, path, every=np.int64(2), seed=np.int64(5), meta=meta,
                        flush_seconds=0) as rec:
        for _ in range(4):
            model.zero_grad()
            model(torch.ones(3, 4)).sum().backward()
            rec.step()
    run = gradviz.load(path)
    assert run.steps == [0, 2] and run.meta["every"] == 2 and run.meta["seed"] == 5
    assert run.meta["lr"] == 0.5 and run.meta["n"] == 3 and run.meta["t"] == 2.0
    assert run.meta["where"] == str(tmp_path) and run.meta["nested"] == {"k": [1.5, [1, 2]]}
    assert str(gradviz.record(model, "~/run.json").path).startswith(str(Path.home()))


def test_two_recorders_on_one_path_are_refused(tmp_path) -> None:
    """Each one's writes replaced the other's file: one of the two runs was lost."""
    path = tmp_path / "run.json"
    with gradviz.record(_Two(), path):
        with pytest.raises(RecordingError, match="is being recorded to by another"):
            gradviz.record(_Two(), tmp_path / "." / "run.json").start()
    with gradviz.record(_Two(), path):  # (closed: the path is free again)
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.1.json", "run.json"]


def test_a_layer_set_anew_during_recording_stops_it_with_a_warning() -> None:
    """fc2 replaced at step 3: the old layer's last gradients were recorded on as fc2's, and
    a layer added was never seen. The recording stops there, training goes on."""
    torch.manual_seed(0)
    model = _Two()
    x = torch.randn(5, 4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with gradviz.record(model, None) as rec:
            for i in range(6):
                if i == 3:
                    model.fc2 = nn.Linear(8, 2)
                model.zero_grad()
                model(x).pow(2).mean().backward()
                rec.step()
        model.fc3 = nn.Linear(2, 2)  # (after the block: nothing watches the model)
    run = rec.to_run()
    assert run.steps == [0, 1, 2]
    said = [str(w.message) for w in said]
    assert len(said) == 1 and "at step 3: the model changed (fc2 was set anew)" in said[0]
    with gradviz.record(model, None) as again:  # (a new block records the new layers)
        model.zero_grad()
        model(x).pow(2).mean().backward()
        again.step()
    want = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten()
                                                     for p in model.fc2.parameters()])))
    assert rel_close(again.to_run().node_history("fc2")[0], want)


def test_a_loss_that_is_not_one_number_is_left_out_with_a_warning() -> None:
    """A loss of two values stopped the whole recording (its row ends with the loss)."""
    model = _Two()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with gradviz.record(model, None) as rec:
            for loss_of in (lambda v: torch.stack([v, v]), lambda v: "x", lambda v: v):
                model.zero_grad()
                loss = model(torch.ones(3, 4)).pow(2).mean()
                loss.backward()
                rec.step(loss_of(loss))
    run = rec.to_run()
    assert run.steps == [0, 1, 2] and all(v is not None for v in run.node_history("fc1"))
    assert run.loss[:2] == [None, None] and run.loss[2] is not None
    said = [str(w.message) for w in said]
    assert len(said) == 1 and "got a tensor of shape [2]" in said[0]


@pytest.mark.parametrize("native", [False, None])
def test_rec_step_before_backward_is_said_once(native: bool | None) -> None:
    """Every norm of such a step is absent; it was recorded so without a word."""
    model = _Two()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with gradviz.record(model, None, native=native) as rec:
            for i in range(5):
                model.zero_grad(set_to_none=True)
                loss = model(torch.ones(3, 4)).pow(2).mean()
                if i < 3:  # (right, then the wrong order)
                    loss.backward()
                    rec.step(loss)
                else:
                    rec.step(loss)
                    loss.backward()
    run = rec.to_run()
    assert run.node_history("fc1")[2] is not None and run.node_history("fc1")[3] is None
    said = [str(w.message) for w in said if "no parameter gradient" in str(w.message)]
    assert len(said) == 1 and "(step 3)" in said[0] and "after loss.backward()" in said[0]
    frozen = _Two().requires_grad_(False)  # (nothing takes a gradient: nothing to say)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradviz.record(frozen, None) as rec:
            frozen(torch.ones(3, 4))
            rec.step()


def test_a_last_write_that_fails_warns_and_keeps_the_recording(tmp_path) -> None:
    """The folder removed during training: the block's end raised FileNotFoundError, so the
    user's code after it (saving the model) never ran."""
    import shutil

    folder = tmp_path / "out"
    folder.mkdir()
    model = _Two()
    with pytest.warns(RuntimeWarning, match=r"could not write .*run.json at the end of the "
                      r"block \(FileNotFoundError: .*gradviz.store.save\(path, rec.recording\)"):
        with gradviz.record(model, folder / "run.json", flush_seconds=0) as rec:
            for _ in range(3):
                model.zero_grad()
                model(torch.ones(3, 4)).sum().backward()
                rec.step()
            shutil.rmtree(folder)
    assert isinstance(rec.write_error, FileNotFoundError)
    assert rec.to_run().steps == [0, 1, 2]
    gradviz.store.save(tmp_path / "elsewhere.json", rec.recording)
    assert gradviz.load(tmp_path / "elsewhere.json").steps == [0, 1, 2]


def test_a_lazy_module_is_one_line_until_its_first_forward() -> None:
    """Its parameters have no shape before the first forward: torch's own RuntimeError
    came out of record() ("Can't access the shape of an uninitialized parameter")."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(RecordingError) as info:
        gradviz.record(model, None)
    assert str(info.value) == (
        "0.weight is not initialised yet (a lazy module such as nn.LazyLinear); run one "
        "forward pass, model(example_batch), before gradviz.record(model, ...)")
    model(torch.ones(3, 4))
    with gradviz.record(model, None) as rec:
        model(torch.ones(3, 4)).sum().backward()
        rec.step()
    assert rec.to_run().node_history("0") == [pytest.approx(
        float(torch.linalg.vector_norm(torch.cat([p.grad.flatten()
                                                  for p in model[0].parameters()]))))]


def test_a_forgotten_rec_step_does_not_gather_memory_without_end() -> None:
    """Without rec.step(), every pass's hooks and norms were kept for the step that never
    came: 241 MB over 20,000 steps of a small model. Past MAX_PASSES passes gradviz warns
    once and takes no more; the next rec.step() records again."""
    from gradviz import capture

    model = _Two()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradviz.record(model, None, activation_stats=True) as rec:
            per_pass = 0
            for i in range(capture.MAX_PASSES + 50):
                model.zero_grad()
                model(torch.ones(3, 4)).sum().backward()
                if i == 0:
                    per_pass, stats = len(rec._pending), len(rec._stats)
            assert per_pass > 0 and rec._passes == capture.MAX_PASSES
            assert len(rec._pending) == per_pass * capture.MAX_PASSES  # none past the limit
            assert len(rec._stats) == stats * capture.MAX_PASSES
            rec.step()
            model.zero_grad()
            model(torch.ones(3, 4)).sum().backward()
            rec.step()
    said = [str(w.message) for w in caught if "without a rec.step()" in str(w.message)]
    assert said == [f"gradviz saw {capture.MAX_PASSES} forward passes without a rec.step(): "
                    "call rec.step() once per optimizer step, after backward; until it is "
                    "called, gradviz records nothing more (a step that really takes more "
                    "passes, such as a long episode, needs record(..., max_passes=N))"]
    run = rec.to_run()
    assert run.steps == [0, 1]
    fc1 = float(model.fc1.weight.grad.norm())  # step 1: one pass, as usual
    assert run.param_history("fc1", "weight")[1] == pytest.approx(fc1, rel=1e-6)

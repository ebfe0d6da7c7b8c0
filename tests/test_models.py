"""Real-world models record without breaking and with exact numbers (in-place ops, odd
outputs, a Hugging Face GPT-2, shared and frozen layers, accumulation, AMP, checkpointing,
torch.compile)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import math

import pytest
import torch
from autograd_reference import Reference, rel_close
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradviz
from gradviz import demos
from gradviz.errors import RecordingError


def check_against(run: gradviz.Run, ref: Reference, tol: float = 1e-5) -> int:
    """Every layer's norms equal the reference's; returns how many activations were checked."""
    checked = 0
    for node in run.nodes:
        if node["kind"] != "layer":
            continue
        nid = node["id"]
        assert rel_close(node["gradient_norm"], ref.layer_norm(nid), tol), nid
        want = ref.activation_norm(nid)
        if node["activation_grad_norm"] is not None or want is not None:
            assert rel_close(node["activation_grad_norm"], want, tol), nid
            checked += 1
    return checked


def record_step(model: nn.Module, loss_fn, **opts) -> gradviz.Run:
    with gradviz.record(model, path=None, **opts) as rec:
        loss = loss_fn(model)
        loss.backward()
        rec.step(loss)
    return rec.to_run()


def test_resnet_in_place_ops_record_exactly() -> None:
    """torchvision-style BasicBlocks: nn.ReLU(inplace=True) and out += identity."""
    torch.manual_seed(0)
    model = demos.DEMOS["resnet"].build()
    x, y = demos.DEMOS["resnet"].data(8, torch.Generator().manual_seed(1))
    # Full backward hooks break this model (why gradviz uses tensor hooks instead).
    twin = Reference(model, x, y).model
    for m in twin.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_full_backward_hook(lambda *a: None)
    for m in twin.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
    with pytest.raises(RuntimeError, match="inplace"):
        twin(x)
    ref = Reference(model, x, y)
    run = record_step(model, lambda m: nn.functional.cross_entropy(m(x), y))
    assert check_against(run, ref) == sum(n["kind"] == "layer" for n in run.nodes)
    edges = {(e["source"], e["target"]) for e in run.edges}
    kinds = {n["id"]: n["type"] for n in run.nodes}
    # The skip connection of block layer1.1 reaches its add, beside the conv path.
    adds = [t for s, t in edges if s == "layer1.1.bn2" and kinds[t] == "add"]
    assert len(adds) == 1
    assert any(t == adds[0] and s != "layer1.1.bn2" for s, t in edges)
    assert ("layer2.0.downsample.1", adds[0]) not in edges  # downsample joins block 2.0
    assert any(s == "layer2.0.downsample.1" and kinds[t] == "add" for s, t in edges)


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    extra: torch.Tensor


class OddOutputs(nn.Module):
    """Layers returning dicts, lists, dataclasses, nested tuples; a tensor passed by keyword."""

    class DictLayer(nn.Linear):
        def forward(self, x):  # type: ignore[override]
            return {"out": super().forward(x), "unused": x.detach()}

    class ListLayer(nn.Linear):
        def forward(self, x):  # type: ignore[override]
            h = super().forward(x)
            return [h, (h * 2, [h.sum()])]

    class OrderedLayer(nn.Linear):  # like a Hugging Face ModelOutput (an OrderedDict)
        def forward(self, x):  # type: ignore[override]
            return collections.OrderedDict(last_hidden_state=super().forward(x))

    class DataclassLayer(nn.Linear):
        def forward(self, x):  # type: ignore[override]
            h = super().forward(x)
            return Out(hidden=h, extra=h.mean(dim=1))

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))

        def forward(self, x, *, mask):  # a tensor that arrives as a keyword argument
            return x * mask * self.scale

    def __init__(self) -> None:
        super().__init__()
        self.a = self.DictLayer(6, 8)
        self.b = self.ListLayer(8, 8)
        self.c = self.OrderedLayer(8, 8)
        self.d = self.DataclassLayer(8, 8)
        self.m = nn.Linear(6, 8)
        self.gate = self.Gate()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)["out"]
        h, (h2, _) = self.b(h)
        h = self.c(h + h2)["last_hidden_state"]
        out = self.d(h)
        g = self.gate(out.hidden, mask=torch.sigmoid(self.m(x)))
        return self.head(g + out.extra[:, None])


def test_outputs_that_are_not_a_tensor() -> None:
    torch.manual_seed(0)
    model = OddOutputs()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    # (b reads its output h for h * 2 and h.sum(): dL/dh is what comes from outside)
    ref = Reference(model, x, y, apart=True)
    run = record_step(model, lambda m: nn.functional.cross_entropy(m(x), y))
    assert check_against(run, ref) == 7
    edges = {(e["source"], e["target"]) for e in run.edges}
    assert {("a", "b"), ("d", "gate"), ("m", "gate")} <= edges  # m's output came as mask=
    assert ("b", "c") in edges or any(s == "b" for s, _ in edges)


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64,
                                  n_positions=16, attn_pdrop=0.0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def test_hugging_face_gpt2_trains_under_the_recorder(gpt2) -> None:
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))

    def loss_fn(m):
        return m(input_ids=ids, labels=ids).loss  # a ModelOutput, not a tensor

    ref = Reference(gpt2, loss_fn=loss_fn)
    run = record_step(gpt2, loss_fn)
    assert check_against(run, ref, 1e-4) >= 14
    nodes = {n["id"]: n for n in run.nodes}
    # Tied weights: one tensor, counted once, the same norm on both layers.
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert nodes["lm_head"]["params"]["weight"]["tied_to"] == "transformer.wte.weight"
    assert (nodes["lm_head"]["params"]["weight"]["gradient_norm"]
            == nodes["transformer.wte"]["params"]["weight"]["gradient_norm"])
    assert run.meta["param_count"] == sum(p.numel() for p in gpt2.parameters())
    edges = {(e["source"], e["target"]) for e in run.edges}
    h0 = "transformer.h.0"
    assert (f"{h0}.attn.c_attn", f"{h0}.attn.c_proj") in edges  # attention
    assert (f"{h0}.mlp.c_fc", f"{h0}.mlp.c_proj") in edges  # MLP
    residual_adds = {t for s, t in edges if s == f"{h0}.attn.c_proj"}
    assert all(nodes[t]["kind"] == "junction" for t in residual_adds)
    # ...and the skip path into that add comes from the embeddings' junction.
    assert any((s, t) in edges for t in residual_adds for s in nodes
               if nodes[s]["kind"] == "junction" and s != t)


class Unrolled(nn.Module):
    """An RNN cell unrolled over 5 time steps: one module, five calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.cell = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(h) + self.inp(x[:, t]))
        return self.head(h)


def test_module_called_several_times_is_one_node() -> None:
    torch.manual_seed(0)
    model = Unrolled()
    x, y = torch.randn(3, 5, 4), torch.randint(0, 3, (3,))
    ref = Reference(model, x, y)
    assert len(ref.outputs["cell"]) == 5
    run = record_step(model, lambda m: nn.functional.cross_entropy(m(x), y))
    # activation norm of "cell" = sqrt(sum over the 5 calls of |dL/d out_t|^2)
    check_against(run, ref)
    ids = [n["id"] for n in run.nodes]
    assert ids.count("cell") == 1
    edge_ids = [e["id"] for e in run.edges]
    assert len(edge_ids) == len(set(edge_ids))
    pairs = {(e["source"], e["target"]) for e in run.edges}
    assert ("add", "cell") in pairs or ("cell", "add") in pairs


def test_frozen_layers_pass_gradient_on() -> None:
    torch.manual_seed(0)
    model = demos.MLP()
    model.fc2.requires_grad_(False)
    x, y = demos.DEMOS["mlp"].data(8, torch.Generator().manual_seed(1))
    ref = Reference(model, x, y)
    run = record_step(model, lambda m: nn.functional.cross_entropy(m(x), y))
    check_against(run, ref)
    nodes = {n["id"]: n for n in run.nodes}
    assert nodes["fc2"]["gradient_norm"] is None
    assert all(not p["trainable"] for p in nodes["fc2"]["params"].values())
    assert nodes["fc1"]["gradient_norm"] > 0
    assert {e["id"] for e in run.edges} == {"fc1->fc2", "fc2->fc3"}
    assert run.meta["trainable_param_count"] < run.meta["param_count"]


def test_gradient_accumulation_is_one_record_per_optimizer_step() -> None:
    torch.manual_seed(0)
    model = demos.DEMOS["residual"].build()
    micro = [demos.DEMOS["residual"].data(4, torch.Generator().manual_seed(s)) for s in range(3)]
    refs = [Reference(model, x, y) for x, y in micro]
    with gradviz.record(model, path=None) as rec:
        for x, y in micro:
            (nn.functional.cross_entropy(model(x), y) / 3).backward()
        rec.step()
    run = rec.to_run()
    assert run.steps == [0]
    for node in run.nodes:
        if node["kind"] != "layer":
            continue
        nid = node["id"]
        module = model.get_submodule(nid)
        acc = torch.cat([p.grad.flatten() for p in module.parameters()])  # accumulated
        assert rel_close(node["gradient_norm"], float(acc.norm()))
        # activations: the norm of all three micro-batches' gradients together
        # (each reference used loss/1, the recorded run loss/3)
        per = [r.activation_norm(nid) / 3 for r in refs]
        assert rel_close(node["activation_grad_norm"], math.sqrt(sum(v * v for v in per)), 1e-4)


def amp_step(model, x, y, scaler, opt, before_opt_step=None) -> gradviz.Run:
    """One recorded bfloat16 autocast step with a GradScaler, as a user writes it."""
    with gradviz.record(model, path=None, scaler=scaler, optimizer=opt) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        rec.step(loss)
        if before_opt_step is not None:
            before_opt_step()
        scaler.step(opt)
        scaler.update()
    return rec.to_run()


def test_mixed_precision_with_grad_scaler_records_unscaled_norms() -> None:
    torch.manual_seed(0)
    model = demos.MLP()
    x, y = demos.DEMOS["mlp"].data(16, torch.Generator().manual_seed(1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin = Reference(model, x, y).model
    # The reference: same autocast forward, no loss scaling, norms after backward.
    twin.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = nn.functional.cross_entropy(twin(x), y)
    ref_loss.backward()
    unscaled: dict[str, float] = {}

    def unscale() -> None:  # what the norms must equal: the gradients after unscale_
        scaler.unscale_(opt)
        unscaled.update({n: float(p.grad.norm()) for n, p in model.named_parameters()})

    run = amp_step(model, x, y, scaler, opt, unscale)
    for node in run.nodes:
        for pname, info in node["params"].items():
            name = f"{node['id']}.{pname}"
            assert rel_close(info["gradient_norm"], unscaled[name], 1e-5), name
            assert rel_close(info["gradient_norm"],
                             float(twin.get_parameter(name).grad.norm()), 1e-5), name
    assert run.nodes[0]["activation_grad_norm"] < 100  # divided by the 65536 scale too
    assert "skipped_steps" not in run.meta


def test_grad_scaler_with_two_optimizers_one_unscaled_for_clipping() -> None:
    """The AMP recipe's "multiple optimizers": unscale_ (to clip) only the body's. The
    head's gradients were taken as unscaled too, and recorded 1024x their size; and the
    head's unscale_ inside scaler.step, after rec.step(), must not count for the next step."""
    torch.manual_seed(0)
    model = demos.MLP()
    body = [*model.fc1.parameters(), *model.fc2.parameters()]
    head = list(model.fc3.parameters())
    ob, oh = torch.optim.SGD(body, lr=0.01), torch.optim.SGD(head, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    want: dict[str, list[float]] = {}
    with gradviz.record(model, path=None, scaler=scaler) as rec:
        for step in range(3):
            x, y = demos.DEMOS["mlp"].data(16, torch.Generator().manual_seed(step))
            ob.zero_grad()
            oh.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(ob)
            torch.nn.utils.clip_grad_norm_(body, 1.0)
            for name, p in model.named_parameters():  # the body's unscaled, the head's not
                scale = 1.0 if any(p is q for q in body) else scaler.get_scale()
                want.setdefault(name, []).append(float(p.grad.double().norm()) / scale)
            rec.step(loss)
            scaler.step(ob)
            scaler.step(oh)
            scaler.update()
    assert scaler.unscale_.__func__ is torch.amp.GradScaler.unscale_  # (put back)
    run = rec.to_run()
    for name, norms in want.items():
        layer, pname = name.rsplit(".", 1)
        assert run.param_history(layer, pname) == pytest.approx(norms, rel=1e-5), name


def test_steps_the_scaler_skips_are_marked_and_keep_their_values() -> None:
    torch.manual_seed(0)
    model = demos.MLP()
    x, y = demos.DEMOS["mlp"].data(16, torch.Generator().manual_seed(1))
    x[0, 0] = math.inf  # a bad sample: NaN gradients, which the scaler must skip
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # huge, yet finite, gradients
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc1.weight.detach().clone()
    run = amp_step(model, x, y, scaler, opt)
    assert torch.equal(model.fc1.weight, before)  # the scaler did skip
    assert run.meta["skipped_steps"] == [0]
    assert not math.isfinite(run.nodes[0]["gradient_norm"])  # kept, not hidden


def test_huge_scaled_gradients_are_not_mistaken_for_overflow() -> None:
    torch.manual_seed(0)
    model = demos.MLP()
    x, y = demos.DEMOS["mlp"].data(16, torch.Generator().manual_seed(1))
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # float32 norms would overflow
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wants: list[float] = []

    def unscale() -> None:
        scaler.unscale_(opt)
        wants.append(float(torch.cat([p.grad.flatten() for p in model.fc1.parameters()]).norm()))

    run = amp_step(model, x, y, scaler, opt, unscale)
    want = wants[0]
    assert "skipped_steps" not in run.meta
    assert rel_close(run.nodes[0]["gradient_norm"], want, 1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_gives_no_duplicate_records(reentrant: bool) -> None:
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc1(x)
            h = checkpoint(self.inner, h, use_reentrant=reentrant)
            return self.fc2(h)

    torch.manual_seed(0)
    model = Checkpointed()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    ref = Reference(model, x, y, autograd_grad=False)
    run = record_step(model, lambda m: nn.functional.cross_entropy(m(x), y))
    nodes = {n["id"]: n for n in run.nodes}
    for nid in ["fc1", "fc2", "inner.0", "inner.2"]:
        assert rel_close(nodes[nid]["gradient_norm"], ref.layer_norm(nid)), nid
    for nid in ["fc1", "fc2"]:
        assert rel_close(nodes[nid]["activation_grad_norm"], ref.activation_norm(nid)), nid
    for nid in ["inner.0", "inner.2"]:
        got = nodes[nid]["activation_grad_norm"]
        if reentrant:
            assert got is None  # recomputed inside backward: not recorded, never doubled
        else:
            assert rel_close(got, ref.activation_norm(nid)), nid


def test_forward_without_grad_registers_nothing() -> None:
    model = demos.MLP()
    x = torch.randn(4, 32)
    with gradviz.record(model, path=None) as rec:
        with torch.inference_mode():
            model(x)
        assert rec._calls == [] and rec._calls_seen == 0


@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_stays_whole_and_gets_parameter_norms(fullgraph: bool) -> None:
    """gradviz's layer hooks read each output's autograd node, which dynamo cannot trace:
    every hooked layer was a graph break (a compiled step slower than eager), and with
    fullgraph=True the user's forward raised. Under compile they do nothing: no break,
    and the step gets its parameter norms and loss (activations and edges absent)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = demos.DEMOS["residual"].build()
    x, y = demos.DEMOS["residual"].data(8, torch.Generator().manual_seed(1))
    ref = Reference(model, x, y)
    with pytest.warns(RuntimeWarning, match="does the model run under torch.compile"):
        with gradviz.record(model, path=None) as rec:
            compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
            for _ in range(2):
                model.zero_grad()
                loss = nn.functional.cross_entropy(compiled(x), y)
                loss.backward()
                rec.step(loss)
    assert sum(counters["graph_break"].values()) == 0
    run = rec.to_run()
    checked = 0
    for node in run.nodes:
        assert node["activation_grad_norm"] is None  # absent, never wrong
        for pname, info in node["params"].items():
            want = float(ref.model.get_submodule(node["id"]).get_parameter(pname).grad.norm())
            assert rel_close(info["gradient_norm"], want, 1e-4), (node["id"], pname)
            checked += 1
    assert checked > 10 and all(e["gradient_norm"] is None for e in run.edges)
    assert run.loss == [pytest.approx(float(loss.detach()))] * 2


def test_torch_compile_before_attaching_is_refused_or_flagged() -> None:
    model = demos.MLP()
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(RecordingError, match="already compiled"):
        gradviz.record(compiled)
    x, y = torch.randn(4, 32), torch.randint(0, 4, (4,))
    compiled(x)  # compiled (and run) before gradviz attaches: its hooks would be ignored
    with pytest.warns(RuntimeWarning, match="parameter norms only"):
        run = record_step(model, lambda m: nn.functional.cross_entropy(compiled(x), y))
    assert all(n["activation_grad_norm"] is None for n in run.nodes)  # absent, not wrong
    assert all(n["gradient_norm"] > 0 for n in run.nodes)


@pytest.mark.parametrize("native", [False, True])
def test_a_compiled_submodule_is_left_out_not_walked_through(
        native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.block compiled: its layers' hooks keep out of compiled code, and the walk went
    on through its one CompiledFunctionBackward node, making up an edge stem -> head."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 1)
            self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.block(torch.tanh(self.stem(x)))))

    if native:
        from gradviz import native as native_module

        monkeypatch.delenv("GRADVIZ_NATIVE", raising=False)  # (conftest turns it off)
        if native_module.load(build_if_missing=True) is None:
            pytest.skip(f"no native recorder: {native_module.why_not()}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    twin = copy.deepcopy(model)  # plain autograd, eager, the same weights (no update)
    outs: dict[str, torch.Tensor] = {}
    for n in ("stem", "head"):
        twin.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: outs.__setitem__(n, out))
    loss = nn.functional.mse_loss(twin(x), y)
    want = [float(g.norm()) for g in torch.autograd.grad(loss, [outs["stem"], outs["head"]])]
    with gradviz.record(model, None, native=native) as rec:
        model.block.compile(backend="aot_eager")
        for _ in range(2):
            model.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            rec.step(loss)
    if native:
        assert rec._nat.armed == 1  # (step 1)
    run = rec.to_run()
    assert run.edges == []  # (stem -> head was made up)
    assert run.node_history("block.0", "activation_grad_norm") == [None, None]
    assert run.node_history("stem", "activation_grad_norm")[-1] == pytest.approx(want[0],
                                                                                  rel=1e-5)
    assert run.node_history("head", "activation_grad_norm")[-1] == pytest.approx(want[1],
                                                                                  rel=1e-5)


def test_a_watched_grad_scaler_pickles_and_copies() -> None:
    """gradviz wraps the scaler's unscale_ during the block (see the test above): the wrapper,
    a local function, made torch.save(scaler) raise, and a deep copy's unscale_ worked on
    the original scaler."""
    import io
    import pickle

    model = demos.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gradviz.record(model, path=None, scaler=scaler):
        torch.save(scaler, io.BytesIO())
        again = pickle.loads(pickle.dumps(scaler))
        twin = copy.deepcopy(scaler)
    assert "unscale_" not in scaler.__dict__  # (put back)
    x, y = demos.DEMOS["mlp"].data(8, torch.Generator().manual_seed(0))
    for copied in (again, twin):
        model.zero_grad()
        copied.scale(nn.functional.cross_entropy(model(x), y)).backward()
        copied.unscale_(opt)  # its own state, not the original scaler's
        assert id(opt) in copied._per_optimizer_states
        assert id(opt) not in scaler._per_optimizer_states
        copied.step(opt)
        copied.update()


def test_two_recorders_on_one_grad_scaler() -> None:
    """A GAN: D and G recorded apart, one scaler, D's gradients unscaled to clip them. The
    second recorder took the first one's wrapper for the user's own and fell back to "any
    optimizer unscaled", recording G's norms 1024x too large."""
    torch.manual_seed(0)
    d, g = demos.MLP(), demos.MLP()
    od, og = torch.optim.SGD(d.parameters(), lr=0.01), torch.optim.SGD(g.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    want: dict[str, list[float]] = {"d": [], "g": []}
    with gradviz.record(d, None, scaler=scaler) as rd, gradviz.record(g, None,
                                                                      scaler=scaler) as rg:
        for step in range(3):
            x, y = demos.DEMOS["mlp"].data(16, torch.Generator().manual_seed(step))
            od.zero_grad()
            og.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ld = nn.functional.cross_entropy(d(x), y)
                lg = nn.functional.cross_entropy(g(x), y)
            scaler.scale(ld).backward()
            scaler.unscale_(od)
            scaler.scale(lg).backward()
            want["d"].append(float(d.fc1.weight.grad.double().norm()))
            want["g"].append(float(g.fc1.weight.grad.double().norm()) / scaler.get_scale())
            rd.step(ld)
            rg.step(lg)
            scaler.step(od)
            scaler.step(og)
            scaler.update()
    assert "unscale_" not in scaler.__dict__
    assert rd.to_run().param_history("fc1", "weight") == pytest.approx(want["d"], rel=1e-5)
    assert rg.to_run().param_history("fc1", "weight") == pytest.approx(want["g"], rel=1e-5)

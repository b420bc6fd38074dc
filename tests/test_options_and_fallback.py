"""Bad options raise a clear ValueError; graphs the passes can't handle compile unrewritten."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity, loss_of, rewritten_kinds, skipped_reasons
from torch import nn

import mst_fx
from mst_fx.models import MLPStack, SwiGLU, random_batch, tiny_llama

VOCAB = 300


@pytest.mark.parametrize(
    "options, named",
    [
        ({"chunks": 0}, "chunks"),
        ({"chunks": "many"}, "chunks"),
        ({"chunks": True}, "chunks"),
        ({"mlp": "yes"}, "mlp"),
        ({"keep_logits": 1}, "keep_logits"),
        ({"compiler": "tvm"}, "compiler"),
        ({"chunk": 4}, "chunk"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 512, "chunks": 4}, "chunk_size"),
        ({"grad_accumulation": "bf16"}, "grad_accumulation"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options, named):
    with pytest.raises(ValueError, match=named):
        mst_fx.backend(**options)
    model = torch.compile(nn.Linear(4, 4), backend="mst", options=options)
    with pytest.raises(Exception) as caught:  # validated on the first call; Dynamo wraps it
        model(torch.randn(2, 4))
    cause = caught.value
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    assert isinstance(cause, ValueError) and named in str(cause)


def test_backend_is_found_by_name_without_import():
    import subprocess
    import sys

    code = "import torch; assert 'mst' in torch._dynamo.list_backends(); import sys; assert 'mst_fx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


class LeakyMLP(nn.Module):
    """An MLP whose hidden activation is also used elsewhere: it must stay whole."""

    def __init__(self, d=32, intermediate=96):
        super().__init__()
        self.inner = SwiGLU(d, intermediate)
        self.probe = nn.Linear(intermediate, 1)

    def forward(self, x):
        h = F.silu(self.inner.gate(x)) * self.inner.up(x)
        return self.inner.down(h) + self.probe(h).mean()


class DropoutMLP(SwiGLU):
    def forward(self, x):
        return self.down(F.dropout(F.silu(self.gate(x)), p=0.1, training=True) * self.up(x))


class NormBetweenLinears(nn.Module):
    """fc -> gelu -> LayerNorm -> proj: the norm mixes a row's elements, so it is no activation."""

    def __init__(self, d=32, intermediate=96):
        super().__init__()
        self.fc, self.norm, self.proj = (
            nn.Linear(d, intermediate),
            nn.LayerNorm(intermediate),
            nn.Linear(intermediate, d),
        )

    def forward(self, x):
        return self.proj(self.norm(F.gelu(self.fc(x))))


class WeightedLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)
        self.register_buffer("class_weight", torch.rand(VOCAB))

    def forward(self, ids, labels):
        return F.cross_entropy(self.head(self.embed(ids)).view(-1, VOCAB), labels.view(-1), weight=self.class_weight)


def stack_of(block):
    torch.manual_seed(0)
    model = MLPStack(vocab=VOCAB, d=32, intermediate=96, layers=1)
    model.blocks[0] = block
    return model


@pytest.mark.parametrize(
    "model, reason",
    [
        (stack_of(LeakyMLP()), "also used by"),
        (stack_of(NormBetweenLinears()), "'layer_norm' between the linears is not elementwise"),
        (WeightedLoss(), "class weights"),
    ],
    ids=["intermediate-used-elsewhere", "norm-between-linears", "class-weights"],
)
def test_unsupported_sites_stay_whole_with_a_reason(model, reason):
    inputs = random_batch(VOCAB, 2, 20, ignore_every=5)
    assert_parity(model, loss_of, inputs, chunks=4)
    assert any(reason in r for r in skipped_reasons()), skipped_reasons()


def test_random_activation_is_not_recomputed():
    torch.manual_seed(0)
    model = torch.compile(stack_of(DropoutMLP(32, 96)), backend=mst_fx.backend(chunks=4, compiler="aot_eager"))
    loss_of(model, *random_batch(VOCAB, 2, 20)).backward()
    (report,) = mst_fx.compiled_reports()
    assert [s.kind for s in report.rewritten()] == ["lm_head"]
    assert any("dropout" in r for r in skipped_reasons()), skipped_reasons()


def test_a_failing_pass_leaves_the_graph_unrewritten_and_says_so(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("mst_fx.passes.manager.find_mlp_sites", broken)
    with caplog.at_level(logging.WARNING, logger="mst_fx"):
        kinds = assert_parity(stack_of(SwiGLU(32, 96)), loss_of, random_batch(VOCAB, 2, 20), chunks=4)
    assert not kinds
    assert [r.getMessage() for r in caplog.records if "unrewritten" in r.getMessage()] == [
        "mst: a pass failed on this graph (RuntimeError: simulated bug); compiling it unrewritten"
    ]


def llama():
    torch.manual_seed(0)
    return tiny_llama(hidden=32, intermediate=96, layers=1, vocab=VOCAB)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_training_drops_the_logits_loudly_and_says_so_once(compiler, caplog, monkeypatch):
    monkeypatch.setattr("mst_fx.dynamo_backend._warned", set())
    model = torch.compile(llama(), backend=mst_fx.backend(chunks=4, compiler=compiler))
    ids, labels = random_batch(VOCAB, 1, 16)
    with caplog.at_level(logging.WARNING, logger="mst_fx"):
        for _ in range(2):
            out = model(ids, labels=labels)
            out.loss.backward()
    assert out.logits.numel() == 0 and out.logits.shape == (0,) and "DroppedLogits" in repr(type(out.logits))
    for use in (lambda t: t.mean(), lambda t: t.argmax(-1), lambda t: t + 1, lambda t: t.float()):
        with pytest.raises(RuntimeError, match="keep_logits"):  # never a quiet NaN
            use(out.logits)
    warned = [r for r in caplog.records if "returns empty logits" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING]


def test_keep_logits_returns_the_real_logits_and_leaves_the_head_alone():
    ids, labels = random_batch(VOCAB, 1, 16)
    model = llama()
    expected = model(ids, labels=labels).logits
    out = torch.compile(model, backend=mst_fx.backend(chunks=4, compiler="aot_eager", keep_logits=True))(
        ids, labels=labels
    )
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    assert any("keep_logits=True" in r for r in skipped_reasons())


def test_no_grad_keeps_logits():
    ids, labels = random_batch(VOCAB, 1, 16)
    model = llama()
    with torch.no_grad():
        expected = model(ids, labels=labels)
        got = torch.compile(model, backend=mst_fx.backend(chunks=4, compiler="aot_eager"))(ids, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)


def test_a_rewritten_graph_the_compiler_rejects_is_compiled_unrewritten(monkeypatch):
    import mst_fx.dynamo_backend as backend

    real_hand_off = backend.hand_off

    def picky_hand_off(gm, *args, **kwargs):
        if any(name.startswith("mst_") for name, _ in gm.named_children()):
            raise RuntimeError("simulated compiler failure")
        return real_hand_off(gm, *args, **kwargs)

    monkeypatch.setattr(backend, "hand_off", picky_hand_off)
    assert not assert_parity(stack_of(SwiGLU(32, 96)), loss_of, random_batch(VOCAB, 2, 20), chunks=4)
    assert any("compiler rejected" in r for r in skipped_reasons()), skipped_reasons()


def test_a_chunk_body_inductor_cannot_compile_runs_uncompiled_and_says_so_once(monkeypatch, caplog):
    from mst_fx.runtime import chunk_bodies

    def broken(graph, inputs):
        raise RuntimeError("simulated Inductor bug")

    monkeypatch.setattr(chunk_bodies, "_inductor_compile", broken)
    monkeypatch.setattr(chunk_bodies, "_BODIES", {})
    monkeypatch.setattr(chunk_bodies, "_warned_compile_failure", [])
    with caplog.at_level(logging.WARNING, logger="mst_fx"):
        kinds = assert_parity(stack_of(SwiGLU(32, 96)), loss_of, random_batch(VOCAB, 2, 20), chunks=4,
                              compiler="inductor")  # fmt: skip
    assert kinds == {"mlp gated": 1, "lm_head": 1}
    warnings = [r.getMessage() for r in caplog.records if "chunk body" in r.getMessage()]
    assert warnings == ["mst: Inductor failed to compile a chunk body (RuntimeError: simulated Inductor bug); "
                        "running it uncompiled"]  # fmt: skip


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_double_backward_through_a_chunked_site_raises_instead_of_dropping_terms(compiler):
    """A gradient penalty differentiates the gradients again. The chunked ops compute their
    gradients chunk by chunk, outside autograd: a second derivative through them must be an error,
    never a silently partial result."""
    model = torch.compile(stack_of(SwiGLU(32, 96)), backend=mst_fx.backend(chunks=4, compiler=compiler))
    loss = model(*random_batch(VOCAB, 2, 20))
    with pytest.raises(RuntimeError, match="double backward|create_graph"):  # Inductor's own words, or ours
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        sum(g.square().sum() for g in grads).backward()


class MutatedHeadInput(nn.Module):
    """The head's input updated in place between the head and the loss (head frozen, so eager's
    autograd allows it): the rewrite, which computes the head where the loss is, must refuse."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(VOCAB, 32), nn.Linear(32, VOCAB, bias=False).requires_grad_(False)

    def forward(self, ids, labels):
        h = self.embed(ids)
        logits = self.head(h)
        h.mul_(2.0)
        return F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))


class MutatedMLPInput(nn.Module):
    """The MLP's input updated in place between its two linears (first linear frozen)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(VOCAB, 32), nn.Linear(32, VOCAB, bias=False)
        self.fc, self.proj = nn.Linear(32, 128).requires_grad_(False), nn.Linear(128, 32)

    def forward(self, ids, labels):
        x = self.embed(ids)
        hidden = F.gelu(self.fc(x))
        x.add_(1.0)
        return F.cross_entropy(self.head(x + self.proj(hidden)).view(-1, VOCAB), labels.view(-1))


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
@pytest.mark.parametrize("build, kind", [(MutatedHeadInput, "lm_head"), (MutatedMLPInput, "mlp")])
def test_an_input_updated_in_place_before_the_rewrite_point_is_left_alone(build, kind, grad):
    inputs = random_batch(VOCAB, 2, 24, ignore_every=5)
    if grad:
        kinds = assert_parity(build(), loss_of, inputs, chunks=4)
    else:
        with torch.no_grad():
            expected = build()(*inputs)
            got = torch.compile(build(), backend=mst_fx.backend(chunks=4, compiler="aot_eager"))(*inputs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        kinds = rewritten_kinds()
    assert not any(k.startswith(kind) for k in kinds)
    assert any(r.startswith(kind) and "in place" in r for r in skipped_reasons()), skipped_reasons()


class LoraLinear(nn.Module):
    """A linear with a LoRA adapter, as PEFT computes it: base(x) + B(A(x)) * scale."""

    def __init__(self, d_in, d_out, rank=4):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        self.lora_a, self.lora_b = nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x)) * 0.5


class LoraSwiGLU(nn.Module):
    def __init__(self, d=32, intermediate=96, bias=False):
        super().__init__()
        self.gate, self.up, self.down = LoraLinear(d, intermediate), LoraLinear(d, intermediate), LoraLinear(intermediate, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_a_lora_mlp_written_by_hand_is_rewritten():
    """The adapter is matched by its graph (passes/adapters.py), not by PEFT's classes."""
    kinds = assert_parity(stack_of(LoraSwiGLU()), loss_of, random_batch(VOCAB, 2, 20), chunks=4)
    assert kinds == {"mlp gated": 1, "lm_head": 1}


class ChannelScaledMLP(nn.Module):
    """The hidden activations scaled per channel by a parameter: still row-wise, but the product
    with another tensor between the linears is a form the MLP pass does not match."""

    def __init__(self, d=32, intermediate=96, bias=False):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, intermediate), nn.Linear(intermediate, d)
        self.channel_scale = nn.Parameter(torch.rand(intermediate))

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)) * self.channel_scale)


def test_an_mlp_in_a_form_the_pass_does_not_match_is_reported_not_missed():
    kinds = assert_parity(stack_of(ChannelScaledMLP()), loss_of, random_batch(VOCAB, 2, 20), chunks=4)
    assert kinds == {"lm_head": 1}
    reports = [s for r in mst_fx.compiled_reports() for s in r.left_alone() if s.kind == "mlp"]
    assert len(reports) == 1 and "MLP-shaped" in reports[0].reason, reports
    assert reports[0].location.endswith("blocks.0"), reports[0].location


def test_plain_models_get_no_mlp_shaped_reports():
    torch.manual_seed(0)
    assert_parity(tiny_llama(hidden=32, intermediate=96, layers=2, vocab=VOCAB), loss_of,
                  random_batch(VOCAB, 2, 20), chunks=4)  # fmt: skip
    assert not any("MLP-shaped" in r for r in skipped_reasons())


class BrokenMLP(nn.Module):
    """An MLP with a graph break between its linears: Dynamo compiles two graphs, each with half."""

    def __init__(self, d=32, intermediate=96, bias=False):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, intermediate), nn.Linear(intermediate, d)

    def forward(self, x):
        hidden = F.gelu(self.fc(x))
        torch._dynamo.graph_break()  # as DDP's optimizer splits a graph at a bucket boundary
        return self.proj(hidden)


def test_an_mlp_cut_across_graphs_is_reported_not_missed():
    kinds = assert_parity(stack_of(BrokenMLP()), loss_of, random_batch(VOCAB, 2, 20), chunks=4)
    assert not any(k.startswith("mlp") for k in kinds)
    reasons = [r for r in skipped_reasons() if "cut across two graphs" in r]
    assert len(reasons) == 1 and "optimize_ddp" in reasons[0]


def test_site_keys_change_with_the_runtime_code(monkeypatch):
    """Compile caches on disk key on the site key: a graph cached by another version of the runtime
    (another op signature) must not be reused, so the key carries a hash of the runtime's code."""
    from mst_fx.runtime import chunked_ops
    from mst_fx.options import MstOptions

    form = chunked_ops.CrossEntropyForm("mean", -100, 0.0, False)
    transform = torch.fx.symbolic_trace(torch.nn.Identity())
    before = chunked_ops.ChunkedLinearCrossEntropy(form, transform, (8, 64), MstOptions()).key
    monkeypatch.setattr(chunked_ops, "_RUNTIME_VERSION", "another-version")
    after = chunked_ops.ChunkedLinearCrossEntropy(form, transform, (8, 64), MstOptions()).key
    assert before != after

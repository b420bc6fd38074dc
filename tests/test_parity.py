"""Loss and every parameter's gradient under mst equal eager PyTorch's (fp32, rtol 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity, loss_of, skipped_reasons
from torch import nn

import mst_fx
from mst_fx.models import GeluMLP, MLPStack, SwiGLU, random_batch, tiny_gpt2, tiny_llama

VOCAB = 500


class FusedGateUp(nn.Module):
    """Phi-3's MLP: one gate_up linear split with chunk(2, -1); product written up * act."""

    def __init__(self, d, intermediate, bias=False):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * intermediate, bias=bias)
        self.down = nn.Linear(intermediate, d, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * F.gelu(gate, approximate="tanh"))


class QuickGelu(nn.Module):
    def __init__(self, d, intermediate, bias=True):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, intermediate, bias=bias), nn.Linear(intermediate, d, bias=bias)

    def forward(self, x):
        h = self.fc(x)
        return self.proj(h * torch.sigmoid(1.702 * h))


class ReluSquared(QuickGelu):
    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)) ** 2)


class MatmulDropoutInPlace(nn.Module):
    """Falcon's `x @ W.T` linears, BART's `dropout(p=0)` between them, an in-place add on the output."""

    def __init__(self, d, intermediate, bias=False):
        super().__init__()
        self.fc = nn.Parameter(torch.randn(intermediate, d) / d**0.5)
        self.proj = nn.Parameter(torch.randn(d, intermediate) / intermediate**0.5)

    def forward(self, x):
        out = F.dropout(F.gelu(x @ self.fc.T), p=0.0, training=self.training) @ self.proj.T
        out += x
        return out


class DropoutAfterProduct(SwiGLU):
    """CPM-Ant / ModernBERT: an inactive dropout between the gated product and the down linear."""

    def forward(self, x):
        return self.down(F.dropout(F.silu(self.gate(x)) * self.up(x), p=0.0, training=self.training))


class LinearChain(nn.Module):
    """Zaya's router: fc1 -> gelu -> fc2 -> gelu -> out, two plain MLPs sharing fc2; one is taken."""

    def __init__(self, d, intermediate, bias=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, intermediate), nn.Linear(intermediate, intermediate)
        self.out = nn.Linear(intermediate, d)

    def forward(self, x):
        return self.out(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class CappedHead(nn.Module):
    """A head with Granite's scaling, Gemma-2's soft-cap and label smoothing before the loss."""

    def __init__(self, vocab=VOCAB, d=32, cap=30.0, scale=2.0, smoothing=0.1):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab, bias=False)
        self.cap, self.scale, self.smoothing = cap, scale, smoothing

    def forward(self, ids, labels):
        logits = self.head(self.embed(ids)) / self.scale
        logits = torch.tanh(logits / self.cap) * self.cap
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), labels.view(-1), label_smoothing=self.smoothing
        )


def stack(mlp, bias=False):
    torch.manual_seed(0)
    return MLPStack(vocab=VOCAB, d=32, intermediate=96, layers=2, mlp=mlp, bias=bias)


@pytest.mark.parametrize(
    "build, kinds",
    [
        (lambda: stack(SwiGLU), {"mlp gated": 2, "lm_head": 1}),
        (lambda: stack(GeluMLP, bias=True), {"mlp plain": 2, "lm_head": 1}),
        (lambda: stack(FusedGateUp), {"mlp fused": 2, "lm_head": 1}),
        (lambda: stack(QuickGelu), {"mlp plain": 2, "lm_head": 1}),
        (lambda: stack(ReluSquared), {"mlp plain": 2, "lm_head": 1}),
        (lambda: stack(MatmulDropoutInPlace), {"mlp plain": 2, "lm_head": 1}),
        (lambda: stack(DropoutAfterProduct), {"mlp gated": 2, "lm_head": 1}),
        (lambda: stack(LinearChain), {"mlp plain": 2, "lm_head": 1}),
        (lambda: tiny_llama(hidden=32, intermediate=96, layers=2, vocab=VOCAB), {"mlp gated": 2, "lm_head": 1}),
        (lambda: tiny_gpt2(hidden=32, layers=2, vocab=VOCAB), {"mlp plain": 2, "lm_head": 1}),
        (lambda: CappedHead(), {"lm_head": 1}),
    ],
    ids=[
        "swiglu",
        "gelu-bias",
        "fused-gate-up",
        "quick-gelu",
        "relu-squared",
        "matmul-dropout-inplace",
        "dropout-after-product",
        "overlapping-linear-chain",
        "hf-llama",
        "hf-gpt2-conv1d",
        "softcap-scale-smoothing",
    ],
)
def test_models_match_eager_and_are_rewritten(build, kinds):
    torch.manual_seed(0)
    model = build()
    inputs = random_batch(VOCAB, batch=2, tokens=37, ignore_every=7)  # 74 tokens, 4 chunks: uneven
    assert assert_parity(model, loss_of, inputs, chunks=4) == kinds


@pytest.mark.parametrize(
    "batch, tokens, chunks",
    [(1, 3, 8), (3, 16, 5), (1, 64, 1)],
    ids=["fewer-tokens-than-chunks", "batch-3-uneven", "one-chunk"],
)
def test_chunking_edge_cases(batch, tokens, chunks):
    inputs = random_batch(VOCAB, batch, tokens, ignore_every=3)
    assert assert_parity(stack(SwiGLU), loss_of, inputs, chunks=chunks)["lm_head"] == 1


def test_all_labels_ignored_gives_what_pytorch_gives():
    ids, labels = random_batch(VOCAB, 2, 20)
    labels.fill_(-100)  # mean over no label: PyTorch says NaN, with zero gradients
    assert assert_parity(stack(GeluMLP, bias=True), loss_of, (ids, labels), chunks=4)["lm_head"] == 1


def test_hf_sum_reduction_divided_by_num_items_in_batch():
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, intermediate=96, layers=1, vocab=VOCAB)
    ids, labels = random_batch(VOCAB, 2, 30, ignore_every=5)
    count = torch.tensor(int((labels[:, 1:] != -100).sum()) + 7)  # as if more batches were accumulated

    def call(m, ids, labels):
        return m(ids, labels=labels, num_items_in_batch=count).loss

    assert assert_parity(model, call, (ids, labels), chunks=3)["lm_head"] == 1


def test_auto_chunks_leave_tiny_sites_alone_with_a_reason():
    inputs = random_batch(VOCAB, 1, 16)
    assert not assert_parity(stack(GeluMLP, bias=True), loss_of, inputs)  # chunks="auto"
    assert any("fit in one chunk" in r for r in skipped_reasons())


@pytest.mark.parametrize(
    "build",
    [lambda: stack(SwiGLU), lambda: tiny_llama(hidden=32, intermediate=96, layers=2, vocab=VOCAB)],
    ids=["swiglu", "hf-llama"],
)
def test_inductor_end_to_end(build):
    torch.manual_seed(0)
    inputs = random_batch(VOCAB, 2, 37, ignore_every=7)
    kinds = assert_parity(build(), loss_of, inputs, chunks=4, compiler="inductor")
    assert kinds["lm_head"] == 1 and kinds["mlp gated"] == 2


class ShiftedHead(nn.Module):
    """An LM head whose logits are shifted the ways HF code writes it before the loss."""

    def __init__(self, shift: str):
        super().__init__()
        torch.manual_seed(0)
        self.shift = shift
        self.embed, self.head = nn.Embedding(VOCAB, 32), nn.Linear(32, VOCAB, bias=False)

    def forward(self, ids, labels):
        logits = self.head(self.embed(ids))
        shifted = logits[:, :-1] if self.shift == "trailing dim implicit" else logits[..., :-1, :]
        return F.cross_entropy(shifted.reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("shift", ["trailing dim implicit", "ellipsis"])
def test_hf_slicing_forms_of_the_shift(shift):
    inputs = random_batch(VOCAB, 2, 30, ignore_every=5)
    assert assert_parity(ShiftedHead(shift), loss_of, inputs, chunks=3) == {"lm_head": 1}


def test_a_dead_op_on_the_logits_does_not_block_the_head():
    """An unused `.float()` of the logits (left in a graph by code whose result went unused)."""
    from test_saved_for_backward import dynamo_graph

    gm, inputs = dynamo_graph(ShiftedHead("ellipsis"), *random_batch(VOCAB, 1, 64))
    (head,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    with gm.graph.inserting_after(head):
        dead = gm.graph.call_method("float", (head,))
        dead.meta["example_value"] = head.meta["example_value"].float()
    gm.recompile()
    rewritten, report = mst_fx.rewrite(gm, inputs, mst_fx.MstOptions(chunks=4))
    assert [s.kind for s in report.rewritten()] == ["lm_head"]
    assert not any(n.op == "call_method" and n.target == "float" for n in rewritten.graph.nodes)
